"""What a newcomer meets following the README: where a command's input comes from whatever stdin is, progress in a
log file, the headline pipe's features read by the shipped aligner, the vocabulary sizes, input checks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import run_cli

VSA = [sys.executable, "-m", "vsa"]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "VSA_CONFIG"}
    env.update(OMP_NUM_THREADS="2", **extra)
    return env


def _photos(flickr8k, folder, n: int, split: str = "test") -> list[dict]:
    """``n`` Flickr8K images of ``split`` copied into ``folder``; their Karpathy records."""
    data = json.loads((flickr8k / "dataset_flickr8k.json").read_text())
    recs = [im for im in data["images"] if im["split"] == split][:n]
    folder.mkdir(parents=True, exist_ok=True)
    for im in recs:
        shutil.copy(flickr8k / "images" / im["filename"], folder / im["filename"])
    return recs


def _vsa(args, cwd, stdin, env=None):
    """``vsa ARGS`` as a real process with the given stdin (a file object, a file descriptor, or DEVNULL)."""
    return subprocess.run([*VSA, *map(str, args)], stdin=stdin, capture_output=True, cwd=cwd, env=env or _env(),
                          timeout=600)


def _with_terminal_stdin(args, cwd):
    """``vsa ARGS`` with a pseudo-terminal as stdin (what an interactive shell gives it)."""
    import pty

    leader, follower = pty.openpty()
    try:
        return _vsa(args, cwd, follower)
    finally:
        os.close(follower)
        os.close(leader)


# ----------------------------------------------------------------------------- 8. input checks


@pytest.mark.parametrize("shard", ["0/2", "3/2", "1/0", "a/b", "1/2/3", "2"])
def test_a_bad_shard_is_refused_also_without_asserts(shard):
    """`--shard` is checked by code, not by an assert that `python -O` would strip."""
    code = ("from vsa.errors import VsaError\nfrom vsa.runtime import parse_shard\n"
            f"try:\n    print(parse_shard({shard!r}))\nexcept VsaError as e:\n    print('refused:', e)\n")
    r = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, timeout=60)
    assert r.stdout.decode() == f"refused: --shard must be K/N with 1 <= K <= N, got {shard!r}\n", r.stderr.decode()


def test_no_dead_error_classes():
    import vsa.errors

    assert not hasattr(vsa.errors, "NotImplementedStage")
