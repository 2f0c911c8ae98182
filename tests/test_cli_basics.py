"""The CLI shell: help for every command, version, light imports, errors and pipes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import run_cli


def all_command_paths() -> list[list[str]]:
    import typer.main

    from vsa.cli import app

    out = []

    def walk(cmd, path):
        out.append(path)
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, path + [name])

    walk(typer.main.get_command(app), [])
    return out


def test_help_lists_every_stage():
    r = run_cli("--help")
    assert r.returncode == 0, r.stderr.decode()
    out = r.stdout.decode()
    top = [p[0] for p in all_command_paths() if len(p) == 1]
    assert {"init", "data", "regions", "embed", "eval"} <= set(top)
    for name in top:
        assert f"  {name} " in out, name
    assert r.stderr == b""


@pytest.mark.slow
def test_every_command_has_help():
    paths = all_command_paths()
    assert ["data", "stats"] in paths and ["data", "convert"] in paths
    # one interpreter for all: click's test runner on the real app
    code = (
        "import sys, json\n"
        "from typer.testing import CliRunner\n"
        "from vsa.cli import app\n"
        "bad = []\n"
        f"for path in json.loads({json.dumps(json.dumps(paths))}):\n"
        "    r = CliRunner().invoke(app, path + ['--help'])\n"
        "    if r.exit_code != 0 or 'Usage:' not in r.output:\n"
        "        bad.append((path, r.exit_code, r.output[-300:]))\n"
        "print(json.dumps(bad))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr.decode()
    assert json.loads(r.stdout) == []


def test_short_help_option_and_version():
    r = run_cli("data", "-h")
    assert r.returncode == 0 and b"stats" in r.stdout and b"convert" in r.stdout
    r = run_cli("--version")
    from vsa import __version__

    assert r.returncode == 0 and r.stdout.decode() == f"vsa {__version__}\n"


def test_importing_the_cli_stays_light():
    """`vsa --help` must not pay for torch: no heavy import at module top of vsa.cli.* (or vsa, io, config, data)."""
    code = ("import sys, vsa, vsa.cli, vsa.io, vsa.cli.config, vsa.data, vsa.errors, vsa.completions\n"
            "print(' '.join(sorted(m for m in ('torch', 'torchvision', 'ultralytics') "
            "if m in sys.modules)))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"heavy modules imported by `import vsa.cli`: {r.stdout.strip()}"


def test_unknown_command_and_option_exit_2():
    r = run_cli("bogus")
    assert r.returncode == 2 and b"No such command 'bogus'" in r.stderr
    r = run_cli("data", "stats", "--bogus")
    assert r.returncode == 2 and b"No such option" in r.stderr
    r = run_cli("data", "stats", "--min-count", "many")
    assert r.returncode == 2 and b"Invalid value for '--min-count'" in r.stderr


@pytest.mark.slow
def test_closed_pipe_is_quiet(flickr8k):
    """`vsa data convert big.json | head -c 100`: exit 0, no traceback."""
    p = subprocess.Popen([sys.executable, "-m", "vsa", "data", "convert", str(flickr8k / "dataset_flickr8k.json")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    head = p.stdout.read(100)
    p.stdout.close()
    err = p.stderr.read()
    rc = p.wait(timeout=120)
    assert head.startswith(b'{"dataset":"flickr8k"')
    assert rc == 0 and err == b"", err.decode()


@pytest.mark.parametrize("argv", [["data", "stats"], ["data", "convert"]])
def test_stdout_carries_data_only(tmp_path, argv):
    ds = tmp_path / "dataset_t.json"
    ds.write_text(json.dumps({"images": [{"filename": "a.jpg", "sentences": ["a dog"]}]}))  # no split: a warning
    r = run_cli(*argv, ds, *(["--json"] if argv[-1] == "stats" else []))
    assert r.returncode == 0, r.stderr.decode()
    json.loads(r.stdout)  # stdout is pure JSON ...
    assert r.stderr.decode().startswith("warning: ")  # ... and the note went to stderr


# ----------------------------------------------------------------------------- a full disk, an interrupt behind an error


def _guarded(fn, capsys) -> tuple[int, str]:
    """Run ``fn`` as a command body (vsa.cli.common.guarded): its exit code and stderr."""
    import typer

    from vsa.cli.common import guarded

    with pytest.raises(typer.Exit) as e:
        guarded(fn)()
    return e.value.exit_code, capsys.readouterr().err


def _disk_fills(monkeypatch, code: int = 28) -> None:
    """Every file opened by vsa.io.atomic_write fails its first write as a full disk does: OSError(ENOSPC) from
    write(), which names no file."""
    import os

    real = os.fdopen

    class Full:
        def __init__(self, fh):
            self._fh = fh

        def write(self, data):
            raise OSError(code, os.strerror(code))

        def __getattr__(self, name):
            return getattr(self._fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._fh.close()
            return False

    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **kw: Full(real(fd, *a, **kw)))


@pytest.mark.parametrize("code", [28, 122])  # ENOSPC, EDQUOT (Linux)
def test_a_full_disk_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys, code):
    from vsa.io import write_json

    out = tmp_path / "report.json"
    _disk_fills(monkeypatch, code)
    rc, err = _guarded(lambda: write_json(out, {"a": 1}), capsys)
    assert rc == 2
    assert err.startswith(f"vsa: error: {out}: disk full (") and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []  # no temporary file left


def test_a_full_disk_under_torch_save_is_one_line_naming_the_checkpoint(tmp_path, monkeypatch, capsys):
    """torch's zip writer reports a failed write as 'unexpected pos': the checkpoint's file is still named."""
    import torch

    from vsa.checkpoint import save_checkpoint

    out = tmp_path / "m.pt"
    _disk_fills(monkeypatch)
    rc, err = _guarded(lambda: save_checkpoint(out, "mrnn", {}, {}, {}, ["a"], {}, {"w": torch.zeros(300)}), capsys)
    assert rc == 2 and err == f"vsa: error: {out}: disk full (No space left on device); free some space and rerun\n"


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_stdout_on_a_full_disk_is_one_line(tmp_path):
    ds = tmp_path / "dataset_t.json"
    ds.write_text(json.dumps({"images": [{"filename": "a.jpg", "split": "train", "sentences": ["a dog"]}]}))
    with open("/dev/full", "wb") as full:
        r = subprocess.run([sys.executable, "-m", "vsa", "data", "convert", str(ds)], stdout=full,
                           stderr=subprocess.PIPE, timeout=120)
    assert r.returncode == 2
    assert r.stderr.decode() == "vsa: error: <stdout>: disk full (No space left on device); free some space and rerun\n"


def test_an_error_raised_while_handling_an_interrupt_is_the_interrupt(capsys):
    """A SIGTERM to the process group stops torch's DataLoader workers too: its own 'worker killed' error arrives
    while vsa handles the KeyboardInterrupt. That is still an interrupt: one line, exit 130."""

    def body():
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("DataLoader worker (pid 123) is killed by signal: Terminated.")

    rc, err = _guarded(body, capsys)
    assert (rc, err) == (130, "vsa: error: interrupted\n")

    def unrelated():
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):  # other errors are not swallowed
        _guarded(unrelated, capsys)


# ----------------------------------------------------------------------------- vsa regions with nothing to read


def test_regions_on_an_empty_folder_is_an_error(tmp_path):
    empty = tmp_path / "photos"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    out = tmp_path / "r.jsonl"
    for argv, inp, needle in ([[empty, "-o", out], None, f"no images found in {empty} (looked for "],
                              [["-o", out], b"", "no image paths on stdin"]):
        r = run_cli("regions", *argv, input=inp)
        err = r.stderr.decode()
        assert r.returncode == 2 and err.count("\n") == 1 and needle in err, err
        assert not out.exists()


# ----------------------------------------------------------------------------- an interrupted `vsa eval --images`


@pytest.mark.slow
def test_eval_features_made_from_images_resume_after_an_interrupt(tmp_path, monkeypatch):
    """What `vsa eval` computes from the images (detections, then CNN features) is kept as it is made: after an
    interrupt a rerun detects and embeds only the rest, and gives the features an uninterrupted run gives."""
    import numpy as np
    from PIL import Image

    import vsa.features.embed as F
    import vsa.regions as R
    from vsa.features.store import FeatureStore

    files = []
    for i in range(5):
        p = tmp_path / "imgs" / f"{i}.png"
        p.parent.mkdir(exist_ok=True)
        Image.new("RGB", (64, 48), (40 * i, 90, 200 - 30 * i)).save(p)
        files.append((p, p.name))
    meta = {"extractor": "efficientnet-lite0", "input": 224, "crop": "warp", "context": 0.0, "dtype": "float16",
            "detector": "fake"}

    class Fake:
        name = "fake"

        def detect(self, *a, **kw):
            raise AssertionError("detect_files is replaced")

    detected, forwards, stop = [], [], {}

    def detect_files(det, todo, *a, **kw):
        for path, key in todo:
            if stop.get("detect") == len(detected):
                raise KeyboardInterrupt
            detected.append(key)
            yield {"key": key, "path": str(path), "width": 64, "height": 48,
                   "regions": [{"box": [0.0, 0.0, 64.0, 48.0], "score": 1.0, "label": "image"},
                               {"box": [8.0, 8.0, 40.0, 30.0], "score": 0.9, "label": "dog"}]}, None

    real_forward = F.forward

    def forward(*a, **kw):
        if stop.get("forward") == len(forwards):
            raise KeyboardInterrupt
        forwards.append(1)
        return real_forward(*a, **kw)

    monkeypatch.setattr(R, "detect_files", detect_files)
    monkeypatch.setattr(F, "forward", forward)
    out = tmp_path / "work" / "features.npz"

    def run(**kw):
        return F.embed_like_training(files, out, meta, detector=Fake(), device="cpu", batch_size=1, workers=0,
                                     jit=False, **kw)

    stop.update(detect=2)
    with pytest.raises(KeyboardInterrupt):
        run(resume=True)
    assert detected == ["0.png", "1.png"]
    stop.update(detect=None, forward=2)
    with pytest.raises(KeyboardInterrupt):
        run(resume=True)
    assert detected == ["0.png", "1.png", "2.png", "3.png", "4.png"]  # only the rest detected
    assert not out.exists() and list((tmp_path / "work" / "features.npz.parts").glob("part-*.npz"))
    stop.update(forward=None)
    forwards.clear()
    run(resume=True)
    assert len(forwards) == 3  # only the rest embedded (one image per forward)
    assert sorted(q.name for q in (tmp_path / "work").iterdir()) == ["features.npz"]  # kept work removed
    got = FeatureStore(out)
    out = tmp_path / "fresh.npz"
    run()
    fresh = FeatureStore(out)
    assert got.keys == fresh.keys == [f"{i}.png" for i in range(5)]
    assert np.array_equal(np.asarray(got.feats), np.asarray(fresh.feats))


@pytest.mark.slow
def test_sigterm_during_eval_keeps_the_computed_features_and_the_rerun_resumes(tmp_path, flickr8k, yolov5n):
    import os
    import signal
    import time

    data = json.loads((flickr8k / "dataset_flickr8k.json").read_text())
    test = [r for r in data["images"] if r["split"] == "test"][:8]
    ds = tmp_path / "dataset_t.json"
    ds.write_text(json.dumps({"dataset": "flickr8k", "images": test}))
    cache = tmp_path / "cache"
    env = dict(os.environ, XDG_CACHE_HOME=str(cache), OMP_NUM_THREADS="2")
    argv = ["eval", "--dataset", str(ds), "--images", str(flickr8k / "images"), "--detector", str(yolov5n),
            "-m", "vsa/assets/align-flickr8k.pt", "--device", "cpu", "--json"]
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-m", "vsa", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, cwd=root)

    def detections():
        return [q for q in cache.glob("vsa/eval/*/*.regions-*.jsonl")] if cache.exists() else []

    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (
            detections() and detections()[0].read_bytes().count(b"\n") >= 2):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    err = err.decode()
    assert proc.returncode == 130, err
    last = err.rstrip("\n").splitlines()[-1]
    assert last.startswith("vsa: error: interrupted: the features computed so far are kept in "), err
    assert "rerun the same command to resume" in last and "Traceback" not in err
    kept = Path(last.split(" kept in ")[1].split(";")[0])
    assert kept.is_dir() and detections()
    r = subprocess.run([sys.executable, "-m", "vsa", *argv], capture_output=True, env=env, cwd=root, timeout=600)
    assert r.returncode == 0, r.stderr.decode()
    assert f"resuming the region features an interrupted run left in {kept}" in r.stderr.decode()
    assert json.loads(r.stdout)["retrieval"]["images"] == 8
    assert not kept.exists()  # removed once the eval is done


def test_a_sigterm_swallowed_during_a_fork_still_stops_the_command():
    """A SIGTERM that lands while an at-fork callback runs (logging's, at each fork of a worker) raises its
    KeyboardInterrupt inside the callback, where Python prints "Exception ignored" and goes on: the next progress
    step raises it again, so the command stops; outside the command nothing is left pending."""
    import os
    import signal
    import time

    from vsa.cli.common import LineProgress
    from vsa.runtime import sigterm_as_interrupt

    with sigterm_as_interrupt():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        except KeyboardInterrupt:
            pass  # what Python does with an exception raised in an at-fork callback
        p = LineProgress(every_items=1000)
        task = p.add_task("work", total=10)
        with pytest.raises(KeyboardInterrupt):
            p.advance(task)
    p.advance(task)  # the command is over: nothing pending
