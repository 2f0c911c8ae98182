"""`vsa caption` with the shipped model, `vsa train-mrnn` + `vsa eval` end to end on a tiny dataset."""

from __future__ import annotations

import json

import numpy as np
import orjson
import pytest

from tests.conftest import run_cli
from tests.test_mrnn import tiny_dataset


def _photo(path):
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (320, 240), (90, 160, 60))
    d = ImageDraw.Draw(im)
    d.ellipse((100, 80, 220, 180), fill=(120, 80, 40))
    im.save(path)
    return path


def test_caption_prints_one_line_per_image_with_the_shipped_model(tmp_path):
    p = _photo(tmp_path / "photo.jpg")
    r = run_cli("caption", p, "--threads", "1")
    assert r.returncode == 0, r.stderr.decode()
    lines = r.stdout.decode().splitlines()
    assert len(lines) == 1
    path, cap = lines[0].split("\t")
    assert path == str(p) and len(cap.split()) >= 3 and "<unk>" not in cap
    # folder mode, JSONL, bare text and COCO results
    _photo(tmp_path / "b.png")
    r = run_cli("caption", tmp_path, "--json", "--coco-results", tmp_path / "res.json", "--threads", "1")
    assert r.returncode == 0, r.stderr.decode()
    recs = [orjson.loads(x) for x in r.stdout.splitlines()]
    assert [x["key"] for x in recs] == ["b.png", "photo.jpg"]
    assert all(x["caption"] and x["logprob"] < 0 for x in recs)
    res = json.loads((tmp_path / "res.json").read_text())
    assert [x["caption"] for x in res] == [x["caption"] for x in recs]
    r = run_cli("caption", p, "--bare", "--beam", "1", "--threads", "1")
    assert r.returncode == 0 and "\t" not in r.stdout.decode() and len(r.stdout.decode().splitlines()) == 1
    # --shard K/N: the shards together are the whole folder, in order, each image once
    _photo(tmp_path / "c.jpg")
    parts = []
    for k in (1, 2):
        r = run_cli("caption", tmp_path, "--json", "--shard", f"{k}/2", "--threads", "1")
        assert r.returncode == 0, r.stderr.decode()
        parts.append([orjson.loads(x)["key"] for x in r.stdout.splitlines()])
    assert parts == [["b.png"], ["c.jpg", "photo.jpg"]]


def test_caption_does_not_import_the_detector(tmp_path):
    import subprocess
    import sys

    p = _photo(tmp_path / "photo.jpg")
    code = ("import sys; from vsa.cli import app\n"
            f"try:\n    app(['caption', {str(p)!r}, '--threads', '1'])\nexcept SystemExit: pass\n"
            "assert 'ultralytics' not in sys.modules, 'ultralytics imported'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr.decode()


def test_caption_bad_image_is_one_line_error_and_skip_bad_goes_on(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    r = run_cli("caption", bad, "--threads", "1")
    err = r.stderr.decode().splitlines()  # the note naming the shipped model, then the one-line error
    assert r.returncode == 2 and len(err) == 2 and "Traceback" not in r.stderr.decode(), err
    assert "using the shipped Flickr8k generator" in err[0] and "mrnn-flickr8k.pt" in err[0]
    assert err[1].startswith("vsa: error: ") and "bad.jpg" in err[1]
    _photo(tmp_path / "ok.jpg")
    r = run_cli("caption", tmp_path, "--skip-bad", "--threads", "1")
    assert r.returncode == 0 and len(r.stdout.decode().splitlines()) == 1


def test_train_mrnn_then_eval_generation(tmp_path):
    ds, feats = tiny_dataset(tmp_path, n_train=10, n_val=4, n_test=4)
    out = tmp_path / "m.pt"
    r = run_cli("train-mrnn", "--dataset", ds, "--features", feats, "--out", out, "--epochs", "2", "--hidden", "16",
                "--embed", "16", "--min-count", "1", "--threads", "1", "--no-beam-search", "--json")
    assert r.returncode == 0, r.stderr.decode()
    summary = orjson.loads(r.stdout)
    assert len(summary["history"]) == 2 and out.exists() and out.with_name("m.last.pt").exists()
    r = run_cli("eval", "--model", out, "--dataset", ds, "--split", "test", "--beam", "2", "--json",
                "--captions-out", tmp_path / "caps.json")
    assert r.returncode == 0, r.stderr.decode()
    gen = orjson.loads(r.stdout)["generation"]
    for k in ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"):
        assert 0 <= gen[k] <= 100 or k == "CIDEr"
    assert gen["beam"] == 2 and gen["images"] == 4
    caps = json.loads((tmp_path / "caps.json").read_text())
    assert sorted(c["image_id"] for c in caps) == [14, 15, 16, 17]
    # --resume with nothing newer to do is a no-op; a missing feature file is a one-line error
    r = run_cli("train-mrnn", "--dataset", ds, "--features", tmp_path / "nope.npz", "--out", out)
    assert r.returncode == 2 and "nope.npz" in r.stderr.decode()


def test_sigterm_keeps_the_last_good_checkpoints(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from vsa.checkpoint import load_checkpoint

    ds, feats = tiny_dataset(tmp_path, n_train=20, n_val=4, n_test=2)
    out = tmp_path / "m.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "-m", "vsa", "train-mrnn", "--dataset", str(ds), "--features", str(feats),
                          "--out", str(out), "--epochs", "500", "--patience", "500", "--hidden", "16", "--embed", "16",
                          "--min-count", "1", "--threads", "1", "--no-beam-search"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    last = tmp_path / "m.last.pt"
    deadline = time.monotonic() + 240
    while not last.exists() and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.2)
    assert last.exists(), p.stderr.read().decode() if p.poll() is not None else "no checkpoint"
    time.sleep(0.5)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err.decode()
    assert "interrupted" in err.decode()
    ck = load_checkpoint(last)  # complete and loadable, not a half-written file
    assert ck["meta"]["epoch"] >= 1 and load_checkpoint(out)["kind"] == "mrnn"
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_region_captions_with_the_shipped_region_model(tmp_path, flickr8k, yolov5n):
    from vsa.captioner import DEFAULT_REGION_MODEL

    if not DEFAULT_REGION_MODEL.exists():
        pytest.skip("the shipped region caption model is not built")
    photo = tmp_path / "pool.jpg"  # a Flickr8K test image: a brown and white dog swimming in a pool
    photo.write_bytes((flickr8k / "images" / "2677656448_6b7e7702af.jpg").read_bytes())
    r = run_cli("caption", photo, "--regions", "--detector", yolov5n, "--top", "3", "--json", "--threads", "1")
    assert r.returncode == 0, r.stderr.decode()
    rec = orjson.loads(r.stdout.splitlines()[0])
    regs = rec["regions"]
    assert 1 <= len(regs) <= 3
    for g in regs:
        assert len(g["box"]) == 4 and g["label"] and g["caption"] and "<unk>" not in g["caption"]
    dog = [g for g in regs if g["label"] == "dog"]
    assert dog and any(w in dog[0]["caption"].split() for w in ("dog", "dogs", "puppy"))
