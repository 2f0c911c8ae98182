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


def run_cli(*args, input: bytes | None = None, cwd=None, env=None, timeout=600):
    """Run `python -m vsa ARGS` as a real subprocess; returns CompletedProcess (bytes)."""
    import subprocess
    import sys

    e = dict(os.environ)
    e.setdefault("OMP_NUM_THREADS", "2")
    if env:
        e.update(env)
    return subprocess.run([sys.executable, "-m", "vsa", *map(str, args)], input=input, capture_output=True,
                          cwd=cwd, env=e, timeout=timeout)


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
