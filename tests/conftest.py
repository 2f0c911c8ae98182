"""Shared fixtures. Tests that need ../shared (real Flickr8K data, YOLOv5 weights) skip when it is absent."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VSA_SHARED", ROOT.parent / "shared"))
FLICKR8K = SHARED / "data" / "flickr8k"
YOLOV5N = SHARED / "weights" / "yolov5n-coco"


@pytest.fixture(scope="session")
def flickr8k() -> Path:
    if not (FLICKR8K / "dataset_flickr8k.json").exists():
        pytest.skip(f"Flickr8K not found at {FLICKR8K} (set VSA_SHARED to the shared folder)")
    return FLICKR8K


@pytest.fixture(scope="session")
def yolov5n() -> Path:
    if not (YOLOV5N / "yolov5n-coco-state-dict.pt").exists():
        pytest.skip(f"YOLOv5n COCO weights not found at {YOLOV5N} (set VSA_SHARED to the shared folder)")
    return YOLOV5N


@pytest.fixture(scope="session", autouse=True)
def _empty_home(tmp_path_factory):
    """The suite runs as a new user would: an empty HOME and XDG config/cache folders, for this process and the
    `vsa` subprocesses it starts, so ultralytics (settings file and banner), torch and matplotlib meet their
    first run here, not on a developer's machine that has run them before. Nothing the tests need lives in
    HOME (the CNN weights come from a pip package, the detector from ../shared)."""
    home = tmp_path_factory.mktemp("home")
    mp = pytest.MonkeyPatch()
    mp.setenv("HOME", str(home))
    mp.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    mp.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    for var in ("YOLO_CONFIG_DIR", "YOLO_VERBOSE", "MPLCONFIGDIR", "TORCH_HOME"):
        mp.delenv(var, raising=False)
    yield home
    mp.undo()


@pytest.fixture(autouse=True)
def _fresh_workspace(monkeypatch):
    """Each test sees no vsa.toml unless it writes one."""
    from vsa.cli import config

    monkeypatch.delenv("VSA_CONFIG", raising=False)
    config.reset_workspace()
    yield
    config.reset_workspace()


def run_cli(*args, input: bytes | None = None, cwd=None, env=None, timeout=600, process: bool = False):
    """Run ``vsa ARGS`` and return a CompletedProcess (stdout/stderr as bytes).

    In this process by default: the typer app runs with stdin/stdout/stderr, the environment, the working folder
    and ``sys.argv`` of a fresh ``vsa`` process in place, and an exception that would end a process with a
    traceback gives exit code 1 with the traceback on stderr. Starting Python and importing torch again costs
    seconds a call, most of the suite's time. ``process=True`` (or ``VSA_TEST_SUBPROCESS=1`` for the whole
    suite) starts a real ``python -m vsa`` instead: for what is about a process (first run, signals, pipes
    between two processes, import costs)."""
    import subprocess
    import sys

    args = [str(a) for a in args]
    if process or os.environ.get("VSA_TEST_SUBPROCESS") == "1":
        e = dict(os.environ)
        e.setdefault("OMP_NUM_THREADS", "2")
        if env:
            e.update(env)
        return subprocess.run([sys.executable, "-m", "vsa", *args], input=input, capture_output=True,
                              cwd=cwd, env=e, timeout=timeout)
    code, out, err = _run_in_process(args, input, cwd, env)
    return subprocess.CompletedProcess(["vsa", *args], code, out, err)


def _process_threads() -> None:
    """torch's threads as a `vsa` subprocess of :func:`run_cli` starts with (OMP_NUM_THREADS, 2 unless set): a
    command's `--threads N` must not outlive it, and the float sums (so the scores) are then a process's."""
    import sys

    torch = sys.modules.get("torch")
    n = os.environ.get("OMP_NUM_THREADS", "2")
    if torch is not None and n.isdigit() and int(n) > 0:
        torch.set_num_threads(int(n))


def _run_in_process(args, input, cwd, env):
    import io
    import sys
    import traceback

    from vsa.cli import app, config

    class Buffer(io.BytesIO):
        def close(self):  # the text stream closes it when it is dropped; its bytes are read after
            pass

    def stream(buf, errors):
        return io.TextIOWrapper(buf, encoding="utf-8", errors=errors, write_through=True)

    out_b, err_b = Buffer(), Buffer()
    saved = (sys.stdin, sys.stdout, sys.stderr, sys.argv, os.getcwd(), dict(os.environ))
    # a stream that a library bound while the command ran (a logging handler) stays writable after it
    sys.stdin = stream(io.BufferedReader(io.BytesIO(input or b"")), "strict")  # peek() as on a pipe
    sys.stdout, sys.stderr = stream(out_b, "strict"), stream(err_b, "backslashreplace")
    sys.argv = ["vsa", *args]
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    if env:
        os.environ.update({k: str(v) for k, v in env.items()})
    _process_threads()
    code = 0
    try:
        if cwd is not None:
            os.chdir(cwd)
        config.reset_workspace()
        app(args=args, prog_name="vsa", standalone_mode=True)
    except SystemExit as e:
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code
        else:
            sys.stderr.write(f"{e.code}\n")
            code = 1
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # what `vsa.cli.main` and Python's own handler do at the top of a process
        from vsa.errors import VsaError

        if isinstance(e, VsaError):
            sys.stderr.write(f"vsa: error: {e}\n")
            code = e.exit_code
        else:
            traceback.print_exc(file=sys.stderr)
            code = 1
    finally:
        for s in (sys.stdout, sys.stderr):
            if s is not None:
                s.flush()
        sys.stdin, sys.stdout, sys.stderr, sys.argv = saved[:4]
        os.chdir(saved[4])
        os.environ.clear()
        os.environ.update(saved[5])
        config.reset_workspace()
        _process_threads()
    return code, out_b.getvalue(), err_b.getvalue()


@contextlib.contextmanager
def lock_held_elsewhere(out, command: str):
    """``out``'s writer lock held, for the duration of the block, by another thread standing for a second run of
    ``command`` (``vsa.io.output_lock`` is one per thread, so the test's own calls meet it as a second writer)."""
    import threading

    from vsa.io import output_lock

    held, stop = threading.Event(), threading.Event()

    def other_run():
        with output_lock(out, command):
            held.set()
            stop.wait()

    t = threading.Thread(target=other_run)
    t.start()
    held.wait()
    try:
        yield
    finally:
        stop.set()
        t.join()
