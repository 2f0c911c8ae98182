"""vsa.io: atomic writes, JSON/JSONL, NPZ without pickles, stdin/stdout conventions."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import lock_held_elsewhere
from vsa import io as vio
from vsa.errors import VsaError


def test_atomic_write_replaces_only_on_success(tmp_path):
    p = tmp_path / "out" / "x.txt"
    with vio.atomic_write(p, "w") as fh:
        fh.write("first")
    assert p.read_text() == "first"
    with pytest.raises(RuntimeError):
        with vio.atomic_write(p, "w") as fh:
            fh.write("half of the second")
            raise RuntimeError("boom")
    assert p.read_text() == "first"
    with pytest.raises(KeyboardInterrupt):
        with vio.atomic_write(p, "w") as fh:
            fh.write("interrupted")
            raise KeyboardInterrupt
    assert p.read_text() == "first"
    assert [f.name for f in p.parent.iterdir()] == ["x.txt"]  # no temporary files left


def test_atomic_write_gives_the_usual_file_mode(tmp_path):
    """Outputs (features, checkpoints, JSONL) get the mode the umask gives any new file, not mkstemp's 0600:
    a features file written on a shared machine is readable by the group like the user's other files."""
    import os

    old = os.umask(0o027)
    try:
        p = tmp_path / "feats.npz"
        with vio.atomic_write(p) as fh:
            fh.write(b"x")
        assert p.stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)
    with vio.atomic_write(p) as fh:  # replacing keeps to the umask too
        fh.write(b"y")
    assert p.stat().st_mode & 0o777 == 0o666 & ~old


def test_a_signal_during_a_deferred_write_lands_after_the_rename(tmp_path):
    import os
    import signal

    p = tmp_path / "ck.bin"
    seen = []
    with pytest.raises(KeyboardInterrupt):
        with vio.deferred_signals(), vio.atomic_write(p) as fh:
            fh.write(b"part one ")
            os.kill(os.getpid(), signal.SIGINT)  # held back until the block ends
            seen.append("still writing")
            fh.write(b"part two")
    assert seen == ["still writing"]
    assert p.read_bytes() == b"part one part two"
    assert [f.name for f in tmp_path.iterdir()] == ["ck.bin"]
    # without the deferral the same signal stops the write and leaves the old file
    with pytest.raises(KeyboardInterrupt):
        with vio.atomic_write(p) as fh:
            fh.write(b"new")
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):
                seen.append("not reached")
    assert p.read_bytes() == b"part one part two" and "not reached" not in seen


def test_jsonl_round_trip_unicode_and_numpy(tmp_path):
    p = tmp_path / "r.jsonl"
    recs = [{"key": "caf\u00e9.jpg", "v": np.float32(0.5), "a": np.arange(3)}, {"key": "\u72ac.jpg", "n": None}]
    assert vio.write_jsonl(p, recs) == 2
    assert vio.read_jsonl(p) == [{"key": "caf\u00e9.jpg", "v": 0.5, "a": [0, 1, 2]}, {"key": "\u72ac.jpg", "n": None}]
    assert p.read_bytes().count(b"\n") == 2
    numbered = list(vio.iter_jsonl(p, with_lineno=True))
    assert [n for n, _ in numbered] == [1, 2]


def test_jsonl_writer_leaves_nothing_on_failure(tmp_path):
    p = tmp_path / "r.jsonl"
    with pytest.raises(ValueError):
        with vio.JsonlWriter(p) as w:
            w.write({"a": 1})
            raise ValueError
    assert not p.exists() and list(tmp_path.iterdir()) == []


def test_read_json_error_line(tmp_path):
    p = tmp_path / "x.json"
    p.write_text('{\n"a": 1,\n"b": [1, 2,,]\n}')
    with pytest.raises(VsaError, match=r"x\.json:3: invalid JSON"):
        vio.read_json(p)
    with pytest.raises(VsaError, match="is a folder, expected a file"):
        vio.read_json(tmp_path)
    with pytest.raises(VsaError, match="no such file"):
        vio.read_json(tmp_path / "none.json")


def test_write_json_indent_and_stdout(tmp_path):
    p = tmp_path / "x.json"
    vio.write_json(p, {"a": [1, 2]}, indent=True)
    assert p.read_text() == '{\n  "a": [\n    1,\n    2\n  ]\n}\n'
    code = "from vsa.io import write_json, write_jsonl; write_json('-', {'a': 1}); write_jsonl(None, [{'b': 2}])"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert r.stdout == b'{"a":1}\n{"b":2}\n'


def test_stdin_conventions(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b'{"a": 1}\n\n{"a": 2}\n')))
    assert vio.read_jsonl("-") == [{"a": 1}, {"a": 2}]


def test_stdin_errors_say_stdin():
    code = "from vsa.io import read_jsonl; read_jsonl('-')"
    r = subprocess.run([sys.executable, "-c", code], input=b'{"a": 1}\n{oops\n', capture_output=True, timeout=60)
    assert b"vsa.errors.VsaError: <stdin>:2: invalid JSON line" in r.stderr


def test_npz_round_trip_and_refusals(tmp_path):
    p = tmp_path / "a.npz"
    arrays = {"f": np.ones((3, 2), np.float16), "keys": np.array(["a.jpg", "caf\u00e9.jpg"]), "meta": np.array('{"x": 1}')}
    vio.save_npz(p, arrays)
    back = vio.load_npz(p, required=("f", "keys"))
    assert back["f"].dtype == np.float16 and back["keys"].tolist() == ["a.jpg", "caf\u00e9.jpg"]
    assert str(back["meta"]) == '{"x": 1}'
    with pytest.raises(VsaError, match=r"missing key\(s\) boxes \(has: f, keys, meta\)"):
        vio.load_npz(p, required=("boxes",))
    with pytest.raises(TypeError, match="dtype object"):
        vio.save_npz(tmp_path / "o.npz", {"k": np.array(["a", None], dtype=object)})
    assert not (tmp_path / "o.npz").exists()
    vio.save_npz(tmp_path / "c.npz", arrays, compress=True)
    assert vio.load_npz(tmp_path / "c.npz")["f"].shape == (3, 2)
    (tmp_path / "bad.npz").write_text("not a zip")
    with pytest.raises(VsaError, match="not a readable NPZ file"):
        vio.load_npz(tmp_path / "bad.npz")


def test_text_stream_lines(tmp_path):
    p = tmp_path / "list.txt"
    p.write_bytes(b"a.jpg\r\n\n  \nsub/b c.jpg\nbad\xff.jpg\n")
    lines = list(vio.text_stream_lines(p))
    assert lines[:2] == ["a.jpg", "sub/b c.jpg"]
    assert lines[2].encode("utf-8", "surrogateescape") == b"bad\xff.jpg"  # undecodable names survive
    assert len(lines) == 3


# ----------------------------------------------------------------------------- one writer per output

_HOLD = ("import sys\nfrom vsa.io import output_lock\nwith output_lock(sys.argv[1], 'vsa embed'):\n"
         "    print('held', flush=True)\n    sys.stdin.read()\n")


def _holder(out):
    """A real second process holding the lock of ``out`` until its stdin closes."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout.readline() == b"held\n"
    return proc


def test_a_second_writer_is_refused_at_once_naming_the_lock_file(tmp_path):
    out = tmp_path / "same.npz"
    proc = _holder(out)
    try:
        with pytest.raises(VsaError) as e:
            with vio.output_lock(out, "vsa embed"):
                pytest.fail("two writers of one output")
        msg = str(e.value)
        assert msg.startswith(f"{out}.lock: locked: another `vsa embed` (pid {proc.pid} on ")
        assert f"is writing {out}" in msg and "\n" not in msg
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
    assert not (tmp_path / "same.npz.lock").exists()  # the holder removed it
    with vio.output_lock(out, "vsa embed") as lock:  # free again
        assert lock.read_text().split()[0] == str(os.getpid())
    assert not lock.exists()


def test_the_lock_is_one_per_thread_and_taken_again_by_its_holder(tmp_path):
    import threading

    out = tmp_path / "o.npz"
    errors = []
    with vio.output_lock(out, "vsa embed"):
        with vio.output_lock(out, "vsa embed"):  # the library under the command that locked first: no conflict
            pass
        assert vio.lock_path(out).exists()  # the inner block does not release the outer one

        def other():
            try:
                with vio.output_lock(out, "vsa embed"):
                    pass
            except VsaError as e:
                errors.append(str(e))

        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert len(errors) == 1 and "locked: another `vsa embed`" in errors[0]


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path):
    import signal

    out = tmp_path / "same.npz"
    proc = _holder(out)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    lock = tmp_path / "same.npz.lock"
    assert lock.read_text().split()[0] == str(proc.pid)  # left behind, naming a dead process
    with vio.output_lock(out, "vsa embed"):
        assert lock.read_text().split()[0] == str(os.getpid())
    assert not lock.exists()


def test_without_advisory_locks_a_dead_pid_is_taken_over_and_a_live_one_refused(tmp_path, monkeypatch):
    import socket

    monkeypatch.setattr(vio, "_try_flock", lambda fd: None)  # Windows, or a file system without flock
    out, lock = tmp_path / "o.npz", tmp_path / "o.npz.lock"
    host = socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=60)
    lock.write_text(f"{dead.pid} {host} vsa embed\n")
    with vio.output_lock(out, "vsa embed"):
        assert lock.read_text().split()[0] == str(os.getpid())
    assert not lock.exists()
    alive = _holder(tmp_path / "unrelated.npz")  # any live process of this host
    try:
        lock.write_text(f"{alive.pid} {host} vsa align\n")
        with pytest.raises(VsaError, match=rf"locked: another `vsa align` \(pid {alive.pid} on "):
            with vio.output_lock(out, "vsa embed"):
                pass
    finally:
        alive.stdin.close()
        alive.wait(timeout=60)
    lock.write_text(f"{dead.pid} another-machine vsa embed\n")  # its pid cannot be checked from here: refused
    with pytest.raises(VsaError, match="on another-machine"):
        with vio.output_lock(out, "vsa embed"):
            pass


# ----------------------------------------------------------------------------- NPZ members checked before reading


def _npy(arr) -> bytes:
    b = io.BytesIO()
    np.lib.format.write_array(b, np.asarray(arr), allow_pickle=False)
    return b.getvalue()


def _zip(path, members, compress=False):
    import warnings
    import zipfile

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about duplicate names, which is the point
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as zf:
            for name, data in members:
                zf.writestr(name, data)
    return path


def _never_read(monkeypatch):
    def read(*a, **k):
        raise AssertionError("array data read before the members were checked")

    monkeypatch.setattr(vio, "read_npz_members", read)


def test_npz_duplicate_member_names_are_refused(tmp_path, monkeypatch):
    p = _zip(tmp_path / "dup.npz", [("feats.npy", _npy(np.ones(3))), ("keys.npy", _npy(["a"])),
                                    ("feats.npy", _npy(np.zeros(3)))])
    _never_read(monkeypatch)
    with pytest.raises(VsaError, match=rf"^{p}: member 'feats.npy' appears twice"):
        vio.load_npz(p)


def test_npz_member_larger_than_its_zip_entry_is_refused_before_reading(tmp_path, monkeypatch):
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": "<f4", "fortran_order": False, "shape": (50000, 10000)})
    p = _zip(tmp_path / "forged.npz", [("feats.npy", head.getvalue() + bytes(64))], compress=True)
    _never_read(monkeypatch)
    with pytest.raises(VsaError, match=rf"^{p}: member 'feats': its zip entry holds \d+ bytes but its \.npy header "
                                       r"declares 2000000\d+ \(<f4 \(50000, 10000\)\)"):
        vio.load_npz(p)
    with pytest.raises(VsaError, match="negative dimension"):
        head = io.BytesIO()
        np.lib.format.write_array_header_1_0(head, {"descr": "<f4", "fortran_order": False, "shape": (-4, 2)})
        vio.load_npz(_zip(tmp_path / "neg.npz", [("feats.npy", head.getvalue())]))
    with pytest.raises(VsaError, match=r"member 'notes.txt' is not a \.npy array"):
        vio.load_npz(_zip(tmp_path / "txt.npz", [("feats.npy", _npy(np.ones(2))), ("notes.txt", b"x" * 10)]))


def test_npz_inflation_and_memory_caps(tmp_path, monkeypatch):
    p = tmp_path / "bomb.npz"
    np.savez_compressed(p, feats=np.zeros((512, 1024), np.float32), keys=np.array(["a"]))  # 2 MiB, deflates ~1000x
    assert vio.load_npz(p)["feats"].shape == (512, 1024)  # under the absolute threshold: a small array is fine
    monkeypatch.setattr(vio, "NPZ_BOMB_BYTES", 1 << 20)
    with pytest.raises(VsaError, match=rf"^{p}: member 'feats': \d+ compressed bytes inflate to 2097152 \(over 100x"):
        vio.load_npz(p)
    q = tmp_path / "plain.npz"
    vio.save_npz(q, {"feats": np.ones((256, 256), np.float32)})
    with pytest.raises(VsaError, match=rf"^{q}: its arrays need 0\.00 GiB in memory, more than the 0\.00 GiB available"):
        vio.load_npz(q, max_bytes=1000)
    assert vio.load_npz(q, max_bytes=1 << 20)["feats"].shape == (256, 256)
    members = vio.npz_members(q, max_bytes=1000, mapped=["feats"])  # memory-mapped: costs no memory
    assert members["feats"].stored and members["feats"].nbytes == 256 * 256 * 4


@pytest.fixture
def held_elsewhere():
    """Hold the lock of an output in another thread (as another run would), for the length of a test."""
    with contextlib.ExitStack() as stack:
        yield lambda out: stack.enter_context(lock_held_elsewhere(out, "vsa embed"))


@pytest.mark.parametrize("args", [
    ["embed", "{imgs}", "-o", "{out}", "--part-every", "1"],
    ["embed", "merge", "{imgs}/a.npz", "-o", "{out}"],
    ["search", "index", "{imgs}", "-o", "{out}"],
])
def test_every_writer_of_an_output_takes_its_lock_first(tmp_path, held_elsewhere, args):
    """Refused before anything is loaded or written: no CNN, no aligner, no part."""
    from PIL import Image
    from typer.testing import CliRunner

    from vsa.cli import app

    imgs, out = tmp_path / "imgs", tmp_path / "out.npz"
    imgs.mkdir()
    Image.new("RGB", (32, 32)).save(imgs / "a.png")
    held_elsewhere(out)
    r = CliRunner().invoke(app, [a.format(imgs=imgs, out=out) for a in args])
    assert r.exit_code == 2, r.output
    assert f"{out}.lock: locked: another `vsa embed` (pid {os.getpid()} on " in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "out.npz.lock"]


def test_training_takes_the_checkpoints_lock_before_its_first_epoch(tmp_path, held_elsewhere):
    from vsa.distributed import DistEnv
    from vsa.trainer import fit

    class Stage:
        kind = "align"

        def train_epoch(self, epoch, progress):
            raise AssertionError("trained while another run writes the checkpoints")

    out = tmp_path / "model.pt"
    held_elsewhere(out)
    with pytest.raises(VsaError, match=r"model\.pt\.lock: locked: another `vsa embed`"):
        fit(Stage(), out, 1, DistEnv(device="cpu"), info=lambda *a: None)
    assert not (tmp_path / "model.last.pt").exists()
