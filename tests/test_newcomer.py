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


# ----------------------------------------------------------------------------- 1. one input rule


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, flickr8k):
    """A `vsa init` workspace whose [dataset] images holds 2 photos."""
    ws = tmp_path_factory.mktemp("ws")
    _photos(flickr8k, ws / "Images", 2)
    r = _vsa(["init", "--dataset", "captions.txt", "--images", "Images"], ws, subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr.decode()
    return ws


@pytest.mark.slow
def test_bare_regions_in_a_workspace_reads_its_images_whatever_stdin_is(workspace):
    """A terminal, /dev/null (make, CI), an empty pipe: `vsa regions` reads [dataset] images every time. Piped
    paths do not change that (a warning says how to read them: `-`)."""
    outs = {}
    outs["terminal"] = _with_terminal_stdin(["regions"], workspace)
    outs["/dev/null"] = _vsa(["regions"], workspace, subprocess.DEVNULL)
    r, w = os.pipe()
    os.close(w)  # an empty pipe
    try:
        outs["empty pipe"] = _vsa(["regions"], workspace, r)
    finally:
        os.close(r)
    for how, p in outs.items():
        assert p.returncode == 0, (how, p.stderr.decode())
        keys = sorted(json.loads(ln)["key"] for ln in p.stdout.splitlines())
        assert keys == sorted(x.name for x in (workspace / "Images").iterdir()), how
    some = next((workspace / "Images").iterdir())
    piped = subprocess.run([*VSA, "regions"], input=f"{some}\n".encode(), capture_output=True, cwd=workspace,
                           env=_env(), timeout=600)
    assert piped.returncode == 0 and len(piped.stdout.splitlines()) == 2, piped.stderr.decode()
    assert "reading [dataset] images of vsa.toml" in piped.stderr.decode()
    assert "pass - to read image paths (one per line) from stdin" in piped.stderr.decode()
    dash = subprocess.run([*VSA, "regions", "-"], input=f"{some}\n".encode(), capture_output=True, cwd=workspace,
                          env=_env(), timeout=600)
    assert dash.returncode == 0, dash.stderr.decode()
    assert [json.loads(ln)["key"] for ln in dash.stdout.splitlines()] == [some.name]


def test_bare_regions_without_a_workspace_reads_a_pipe_and_names_the_fix_otherwise(tmp_path, flickr8k):
    photo = _photos(flickr8k, tmp_path / "p", 1)[0]["filename"]
    p = _with_terminal_stdin(["regions"], tmp_path)
    assert p.returncode == 2 and p.stdout == b""
    assert p.stderr.decode() == ("vsa: error: no images given: pass IMAGES... (files or folders), or pipe image "
                                 "paths (one per line) into it, or set [dataset] images in vsa.toml (`vsa init`)\n")
    p = _vsa(["regions"], tmp_path, subprocess.DEVNULL)
    assert p.returncode == 2 and p.stderr.decode() == ("vsa: error: no image paths on stdin (one path per line): "
                                                       "nothing to detect\n")
    r = run_cli("regions", input=f"p/{photo}\n".encode(), cwd=tmp_path)  # `find ... | vsa regions`
    assert r.returncode == 0, r.stderr.decode()
    assert [json.loads(ln)["key"] for ln in r.stdout.splitlines()] == [photo]


@pytest.mark.slow
def test_bare_embed_reads_a_pipe_never_a_workspace_file(workspace, tmp_path):
    """`vsa embed` without inputs reads stdin, in a workspace too (the regions file vsa.toml names would take the
    place of the headline pipe); a terminal or an empty stdin is a one-line error naming the fix."""
    regions = workspace / "work" / "regions.jsonl"  # [regions] out of the workspace, there already
    regions.parent.mkdir(exist_ok=True)
    p = _vsa(["regions", "Images", "-o", regions], workspace, subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr.decode()
    p = _with_terminal_stdin(["embed", "-o", tmp_path / "t.npz"], workspace)
    assert p.returncode == 2 and p.stderr.decode() == (
        f"vsa: error: no input given: pass REGIONS.jsonl (e.g. {regions}) or IMAGES..., or pipe `vsa regions` "
        "(or image paths, one per line) into it\n")
    p = _vsa(["embed", "-o", tmp_path / "n.npz"], workspace, subprocess.DEVNULL)
    assert p.returncode == 2 and p.stderr.decode() == ("vsa: error: nothing on stdin: pipe `vsa regions IMAGES` into "
                                                       "it, or pass REGIONS.jsonl or IMAGES...\n")
    assert not (tmp_path / "t.npz").exists() and not (tmp_path / "n.npz").exists()
    one = regions.read_bytes().splitlines()[0] + b"\n"
    r = run_cli("embed", "-o", tmp_path / "one.npz", "--threads", "2", input=one, cwd=workspace)
    assert r.returncode == 0, r.stderr.decode()
    with np.load(tmp_path / "one.npz", allow_pickle=False) as z:
        assert z["keys"].tolist() == [json.loads(one)["key"]]  # the pipe, not the workspace's two images


# ----------------------------------------------------------------------------- 2. progress in a log


def test_progress_lines_on_a_stderr_that_is_not_a_terminal(tmp_path, flickr8k):
    """`vsa regions` into a log (stderr not a terminal): a plain progress line every N images
    ($VSA_PROGRESS_EVERY), with count, share, rate, elapsed time and ETA, and a last line when done."""
    _photos(flickr8k, tmp_path / "p", 7)
    r = run_cli("regions", tmp_path / "p", "-o", tmp_path / "r.jsonl", env={"VSA_PROGRESS_EVERY": "3"})
    assert r.returncode == 0, r.stderr.decode()
    lines = r.stderr.decode().splitlines()
    prog = [ln for ln in lines if ln.startswith("regions: ") and "/7 (" in ln]
    assert [ln.split(",")[0] for ln in prog] == ["regions: 3/7 (43%)", "regions: 6/7 (86%)", "regions: 7/7 (100%)"]
    assert all("/s" in ln or "s each" in ln for ln in prog) and all("elapsed " in ln for ln in prog)
    assert "eta " in prog[0] and prog[-1].endswith(", done")
    assert not any("\x1b" in ln or "\u2501" in ln for ln in lines)  # no terminal codes, no bar
    bad = run_cli("regions", tmp_path / "p", "-o", tmp_path / "x.jsonl", env={"VSA_PROGRESS_EVERY": "often"})
    assert bad.returncode == 2 and bad.stderr.decode() == (
        "vsa: error: VSA_PROGRESS_EVERY must be a number of items (e.g. 100) or of seconds (e.g. 30s), got 'often'\n")


def test_line_progress_every_n_seconds_and_quiet_for_short_tasks(capsys):
    """The default off a terminal: a line every 20 s of a task (a fake clock here); a task done sooner prints
    nothing; the rate is the recent one, the last line the mean."""
    from vsa.cli.common import LineProgress

    now = [0.0]
    prog = LineProgress(every_s=20.0, clock=lambda: now[0])
    with prog:
        short = prog.add_task("short", total=3)
        for _ in range(3):
            now[0] += 1.0
            prog.advance(short)
        long = prog.add_task("embed", total=10)
        for _ in range(10):
            now[0] += 7.0
            prog.advance(long)
    err = capsys.readouterr().err.splitlines()
    assert err == ["embed: 3/10 (30%), 7.0 s each, elapsed 0:21, eta 0:49",
                   "embed: 6/10 (60%), 7.0 s each, elapsed 0:42, eta 0:28",
                   "embed: 9/10 (90%), 7.0 s each, elapsed 1:03, eta 0:07",
                   "embed: 10/10 (100%), 7.0 s each, elapsed 1:10, done"]


def test_progress_is_rich_on_a_terminal_and_lines_elsewhere(monkeypatch):
    from rich.console import Console
    from rich.progress import Progress

    from vsa.cli import common

    monkeypatch.setattr(common, "_console", Console(stderr=True, force_terminal=False))
    assert isinstance(common.progress(), common.LineProgress)
    monkeypatch.setattr(common, "_console", Console(stderr=True, force_terminal=True))
    assert isinstance(common.progress(), Progress)


# ----------------------------------------------------------------------------- 6. the README's pipe and eval


@pytest.mark.slow
def test_readme_headline_pipe_makes_features_the_shipped_models_evaluate_on(tmp_path, flickr8k):
    """`vsa regions IMGS | vsa embed -o f.npz` (two real processes), then `vsa eval --split test --dataset D
    --features f.npz` with the shipped aligner and generator: the aligner reads f.npz (the 3x3 cells of its
    recipe are in it), the generator, on another CNN, its own features computed from the images."""
    from vsa.assets import SHIPPED_MODELS
    from vsa.checkpoint import load_checkpoint

    ds = tmp_path / "ds"
    recs = _photos(flickr8k, ds / "images", 8)
    (ds / "dataset_tiny.json").write_text(json.dumps({"dataset": "tiny", "images": recs}))
    out = tmp_path / "f.npz"
    regions = subprocess.Popen([*VSA, "regions", str(ds / "images")], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, cwd=tmp_path, env=_env())
    embed = subprocess.Popen([*VSA, "embed", "-o", str(out)], stdin=regions.stdout, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, cwd=tmp_path, env=_env())
    regions.stdout.close()
    e_out, e_err = embed.communicate(timeout=600)
    assert regions.wait(timeout=600) == 0, regions.stderr.read().decode()
    assert embed.returncode == 0 and e_out == b"", e_err.decode()
    with np.load(out, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        labels = z["labels"].tolist()
    recipe = load_checkpoint(SHIPPED_MODELS["align"])["extractor"]
    assert meta["cells"] == recipe["cells"] == 3 and labels.count("cell") == 9 * len(recs)
    assert (meta["extractor"], meta["crop"]) == (recipe["extractor"], recipe["crop"])

    r = run_cli("eval", "--split", "test", "--dataset", ds / "dataset_tiny.json", "--features", out, "--json",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr.decode()
    rep = json.loads(r.stdout)
    assert rep["retrieval"]["images"] == len(recs) and rep["retrieval"]["features"] == str(out)
    assert rep["generation"]["images"] == len(recs)
    assert (f"{out} holds efficientnet-lite0 region features; mrnn-flickr8k.pt reads efficientnet-lite2 grid "
            "features: not from this file") in r.stderr.decode()


def test_embed_cells_default_follows_the_input():
    """Detector regions get the shipped aligner's cells; whole images and grids none (their models read none)."""
    from vsa.cli.embed import _default_cells
    from vsa.features.embed import EmbedItem

    boxes = [EmbedItem("a.jpg", "a.jpg", [{"box": [0, 0, 10, 10], "label": "image"}])]
    whole = [EmbedItem("a.jpg", "a.jpg", None)]
    assert _default_cells(boxes, "warp") == _default_cells(boxes, "roi") == 3
    assert _default_cells(whole, "warp") == 0 and _default_cells(whole, "grid") == 0


# ----------------------------------------------------------------------------- 7. vocabulary sizes


def test_data_stats_says_the_vocabulary_size_the_trainers_report(tmp_path):
    """`vsa data stats` counts words; the trainers count the model's vocabulary, 4 special tokens more: stats
    gives both, and names the trainers' figure."""
    import re

    from tests.synth_align import make_synthetic
    from vsa.io import write_json

    ds, feats, _ = make_synthetic(tmp_path, n_train=30, n_val=10, n_test=10)
    write_json(tmp_path / "s.json", ds.to_karpathy())
    r = run_cli("train-align", "--dataset", tmp_path / "s.json", "--features", feats, "-o", tmp_path / "a.pt",
                "--hidden", "16", "--epochs", "1", "--batch-size", "32", "--min-count", "1", "--threads", "1",
                "--set", "embed=8")
    assert r.returncode == 0, r.stderr.decode()
    trainer = int(re.search(r"vocabulary (\d+)", r.stderr.decode()).group(1))
    s = run_cli("data", "stats", tmp_path / "s.json", "--min-count", "1")
    assert s.returncode == 0, s.stderr.decode()
    line = s.stdout.decode().splitlines()[-1]
    words = int(re.match(r"vocabulary: (\d+) words seen >= 1 times in train", line).group(1))
    assert words + 4 == trainer
    assert line.endswith(f"with the 4 special tokens every model adds (<pad> <unk> <start> <end>), {trainer}: the "
                         "size the trainers report")
    js = json.loads(run_cli("data", "stats", tmp_path / "s.json", "--min-count", "1", "--json").stdout)
    assert js["vocab_size"] == words and js["vocab_size_with_specials"] == trainer
    assert f"vocabulary {trainer} ({words} words + 4 special tokens);" in r.stderr.decode()


def test_train_mrnn_says_its_vocabulary_as_train_align_and_data_stats_do(tmp_path):
    from tests.test_mrnn import tiny_dataset

    ds, feats = tiny_dataset(tmp_path, n_train=6, n_val=2, n_test=1)
    r = run_cli("train-mrnn", "--dataset", ds, "--features", feats, "--out", tmp_path / "m.pt", "--epochs", "1",
                "--scst-epochs", "0", "--hidden", "8", "--embed", "8", "--min-count", "1", "--threads", "1",
                "--no-beam-search", "--json")
    assert r.returncode == 0, r.stderr.decode()
    js = json.loads(run_cli("data", "stats", ds, "--min-count", "1", "--json").stdout)
    words = js["vocab_size"]
    assert f"vocabulary {words + 4} ({words} words + 4 special tokens)," in r.stderr.decode()


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
