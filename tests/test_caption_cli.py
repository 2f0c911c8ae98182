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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_train_mrnn_then_eval_generation(tmp_path):
    ds, feats = tiny_dataset(tmp_path, n_train=10, n_val=4, n_test=4)
    out = tmp_path / "m.pt"
    r = run_cli("train-mrnn", "--dataset", ds, "--features", feats, "--out", out, "--epochs", "2", "--scst-epochs", "0", "--hidden", "16",
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
    # two generators: refused without --ensemble; with it decoded as one (the same model twice: the same captions)
    r = run_cli("eval", "--model", out, "--model", out, "--dataset", ds, "--split", "test", "--beam", "2", "--json")
    assert r.returncode == 2 and "--ensemble" in r.stderr.decode()
    r = run_cli("eval", "--model", out, "--model", out, "--ensemble", "--dataset", ds, "--split", "test", "--beam", "2",
                "--json", "--captions-out", tmp_path / "caps2.json")
    assert r.returncode == 0, r.stderr.decode()
    ens = orjson.loads(r.stdout)["generation"]
    assert ens["ensemble"]["models"] == [str(out), str(out)] and ens["CIDEr"] == pytest.approx(gen["CIDEr"])
    assert json.loads((tmp_path / "caps2.json").read_text()) == caps
    # generators on different CNNs: each reads its own --features file (the first's weight alone: the first's captions)
    f2 = np.load(feats)
    other = tmp_path / "other.npz"
    np.savez(other, feats=f2["feats"][:, :24], offsets=f2["offsets"], keys=f2["keys"],
             meta=np.array(json.dumps({"extractor": "efficientnet-lite2", "dim": 24, "input": 260})))
    out2 = tmp_path / "m2.pt"
    r = run_cli("train-mrnn", "--dataset", ds, "--features", other, "--out", out2, "--epochs", "1", "--scst-epochs", "0",
                "--hidden", "16", "--embed", "16", "--min-count", "1", "--threads", "1", "--no-beam-search", "--json")
    assert r.returncode == 0, r.stderr.decode()
    r = run_cli("eval", "--model", out2, "--dataset", ds, "--split", "test", "--beam", "2", "--json", "--features", other,
                "--captions-out", tmp_path / "caps-b.json")
    assert r.returncode == 0, r.stderr.decode()
    both = ["eval", "--model", out, "--model", out2, "--ensemble", "--dataset", ds, "--split", "test", "--beam", "2", "--json"]
    for w, want in (("1,0", "caps.json"), ("0,1", "caps-b.json")):
        r = run_cli(*both, "--features", feats, "--features", other, "--weights", w, "--captions-out", tmp_path / "mix.json")
        assert r.returncode == 0, r.stderr.decode()
        assert json.loads((tmp_path / "mix.json").read_text()) == json.loads((tmp_path / want).read_text()), w
    # one file for both: the second's CNN made none of it, so it reads the file it was trained on, and says so
    r = run_cli(*both, "--features", feats, "--weights", "0,1", "--captions-out", tmp_path / "mix.json")
    assert r.returncode == 0, r.stderr.decode()
    assert "m2.pt reads efficientnet-lite2 region features: not from this file" in r.stderr.decode()
    assert json.loads((tmp_path / "mix.json").read_text()) == json.loads((tmp_path / "caps-b.json").read_text())
    # a workspace's features file from another CNN is not read in its place (nothing to compute from here: an error)
    (tmp_path / "vsa.toml").write_text(f'[features]\ngrid = "{feats.name}"\n')  # the key the default generator reads
    other.rename(tmp_path / "elsewhere.npz")
    r = run_cli("eval", "--model", out2, "--dataset", ds, "--split", "test", "--json", cwd=tmp_path)
    err = r.stderr.decode()
    assert r.returncode == 2 and (f"{feats.name} for m2.pt: features come from 'efficientnet-lite0' but the "
                                  "model was trained on 'efficientnet-lite2' features") in err
    assert "--features" in err.splitlines()[-1]
    # --resume with nothing newer to do is a no-op; a missing feature file is a one-line error
    r = run_cli("train-mrnn", "--dataset", ds, "--features", tmp_path / "nope.npz", "--out", out)
    assert r.returncode == 2 and "nope.npz" in r.stderr.decode()


def test_train_mrnn_writes_its_metrics_log_where_log_says(tmp_path):
    """As `vsa train-align --log`: one JSON line per epoch, epochs counted from 1."""
    ds, feats = tiny_dataset(tmp_path, n_train=6, n_val=2, n_test=1)
    log = tmp_path / "logs" / "run.jsonl"
    r = run_cli("train-mrnn", "--dataset", ds, "--features", feats, "--out", tmp_path / "m.pt", "--log", log,
                "--epochs", "2", "--scst-epochs", "0", "--hidden", "8", "--embed", "8", "--min-count", "1",
                "--threads", "1", "--no-beam-search", "--json")
    assert r.returncode == 0, r.stderr.decode()
    recs = [json.loads(ln) for ln in log.read_text().splitlines()]
    assert [x["epoch"] for x in recs] == [1, 2] and all("val" in x and "loss" in x for x in recs)
    assert orjson.loads(r.stdout)["log"] == str(log) and not (tmp_path / "m.log.jsonl").exists()


def test_train_mrnn_reads_the_workspaces_mirrored_grid_when_it_exists(tmp_path):
    from tests.synth_align import mirrored_copy
    from vsa.checkpoint import load_checkpoint

    ds, feats = tiny_dataset(tmp_path, n_train=10, n_val=4, n_test=4)
    (tmp_path / "vsa.toml").write_text(f'[dataset]\npath = "{ds.name}"\nmin_count = 1\n[features]\ngrid = "{feats.name}"\n'
                                       'grid_flip = "flip.npz"\n[mrnn]\nmodel = "m.pt"\n')
    args = ("train-mrnn", "--epochs", "1", "--scst-epochs", "0", "--hidden", "16", "--embed", "16", "--threads", "1",
            "--no-beam-search")
    r = run_cli(*args, cwd=tmp_path)  # not made yet: trains without, says nothing of it
    assert r.returncode == 0, r.stderr.decode()
    assert "mirrored" not in r.stderr.decode() and "flip_features" not in load_checkpoint(tmp_path / "m.pt")["meta"]
    mirrored_copy(feats, tmp_path / "flip.npz")
    r = run_cli(*args, "--set", "flip=0.25", cwd=tmp_path)
    assert r.returncode == 0, r.stderr.decode()
    assert "mirrored features" in r.stderr.decode() and "flip=0.25" in r.stderr.decode()
    ck = load_checkpoint(tmp_path / "m.pt")
    assert ck["meta"]["flip_features"] == str((tmp_path / "flip.npz").resolve()) and ck["train"]["flip"] == 0.25
    r = run_cli(*args, "--features", feats, cwd=tmp_path)  # features named on the command line: mirrored ones too
    assert r.returncode == 0 and "flip_features" not in load_checkpoint(tmp_path / "m.pt")["meta"]


@pytest.mark.slow
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


@pytest.mark.slow
def test_region_captions_with_the_shipped_region_model(tmp_path, flickr8k, yolov5n):
    from vsa.generator.captioner import DEFAULT_REGION_MODEL

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
    # a region model trained on `vsa embed --cells 3` features (the shipped aligner's) describes the same boxes
    # the same way: the cells are no detection's feature
    import torch

    from vsa.checkpoint import load_checkpoint

    ck = load_checkpoint(DEFAULT_REGION_MODEL, "mrnn")
    ck["extractor"] = dict(ck["extractor"], cells=3)
    torch.save(ck, tmp_path / "cells.pt")
    r = run_cli("caption", photo, "--regions", "--region-model", tmp_path / "cells.pt", "--detector", yolov5n,
                "--top", "3", "--json", "--threads", "1")
    assert r.returncode == 0, r.stderr.decode()
    assert orjson.loads(r.stdout.splitlines()[0])["regions"] == regs


@pytest.mark.slow
def test_grounded_caption_cuts_the_caption_into_snippets_on_boxes_and_draws_it(tmp_path, flickr8k, yolov5n):
    from PIL import Image

    photo = tmp_path / "snow.jpg"  # a Flickr8K test image: two dogs in the snow ("a brown dog ..." on the dog box)
    photo.write_bytes((flickr8k / "images" / "3385593926_d3e9c21170.jpg").read_bytes())
    W, H = Image.open(photo).size
    r = run_cli("caption", photo, "--ground", "--detector", yolov5n, "--json", "--threads", "1")
    assert r.returncode == 0, r.stderr.decode()
    assert "using the shipped Flickr8k grounding aligner" in r.stderr.decode()  # the one that grounds best
    assert "align-ground-flickr8k.pt" in r.stderr.decode()
    rec = orjson.loads(r.stdout.splitlines()[0])
    words = rec["caption"].split()
    sn = rec["snippets"]
    assert rec["beta"] == 0.05  # the shipped aligner's own, from its checkpoint
    # the snippets cover the caption's words exactly once, in order, as maximal runs on one region
    assert sn and sn[0]["start"] == 0 and sn[-1]["end"] == len(words)
    assert all(a["end"] == b["start"] and a["region"] != b["region"] for a, b in zip(sn, sn[1:]))
    assert all(s["end"] > s["start"] and s["text"] == " ".join(words[s["start"]:s["end"]]) for s in sn)
    for s in sn:  # each on a valid box of the image: region 0 is the whole image
        x1, y1, x2, y2 = s["box"]
        assert 0 <= x1 < x2 <= W and 0 <= y1 < y2 <= H and s["label"] and isinstance(s["score"], float)
        assert (s["region"] == 0) == (s["label"] == "image")
        if s["region"] == 0:
            assert s["box"] == [0, 0, W, H]
    obj = [s for s in sn if s["region"] != 0]
    assert obj, sn  # at least one snippet on an object box
    # text mode: the caption line, then one line per snippet: PATH, label [box], snippet, score
    r = run_cli("caption", photo, "--ground", "--detector", yolov5n, "--threads", "1")
    assert r.returncode == 0, r.stderr.decode()
    lines = [ln.split("\t") for ln in r.stdout.decode().splitlines()]
    assert lines[0] == [str(photo), rec["caption"]] and len(lines) == 1 + len(sn)
    assert [ln[2] for ln in lines[1:]] == [s["text"] for s in sn]
    assert [ln[1] for ln in lines[1:]] == [f"{s['label']} {[round(v) for v in s['box']]}" for s in sn]
    assert all(ln[0] == str(photo) and float(ln[3]) == pytest.approx(s["score"], abs=5.1e-4) for ln, s in zip(lines[1:], sn))  # 3 decimals
    # the JSON record is a picture: the snippets on their boxes, the caption underlined under the image
    src = tmp_path / "g.jsonl"
    src.write_bytes(orjson.dumps(rec) + b"\n")
    r = run_cli("show", src, "-o", tmp_path / "show")
    assert r.returncode == 0, r.stderr.decode()
    page = (tmp_path / "show" / "index.html").read_text()
    assert 'src="snow.png"' in page and page.count('class="snip"') == len(sn)
    assert f'data-snippets="{len(sn)}"' in page
    from vsa import pictures as P

    pic = P.from_caption(rec, photo)
    im = np.asarray(Image.open(tmp_path / "show" / "snow.png").convert("RGB"))
    scale, top = 512 / max(W, H), 28
    x1, y1, x2, y2 = (round(v * scale) for v in obj[0]["box"])
    col = tuple(int(pic.colour(obj[0]["region"])[i:i + 2], 16) for i in (1, 3, 5))
    assert tuple(im[(y1 + y2) // 2 + top, x1 + 1]) == col  # the object snippet's box, in its colour


@pytest.mark.slow
def test_grounding_embeds_the_photo_as_vsa_score_does(tmp_path, flickr8k, yolov5n):
    """With beta 0 every word sits on its own best region: the same regions `vsa score` names for each word,
    so the grounded caption's regions and features are the aligner's (roi features, top 19 boxes)."""
    import torch

    from vsa.generator.captioner import Captioner
    from vsa.assets import SHIPPED_MODELS
    from vsa.regions import load_detector
    from vsa.search import PhotoEncoder, score_record

    torch.set_num_threads(1)
    photo = flickr8k / "images" / "2677656448_6b7e7702af.jpg"
    cap = Captioner.load(SHIPPED_MODELS["mrnn"], device="cpu", aligner=SHIPPED_MODELS["align-ground"])
    cap.aligner.decoding = {**cap.aligner.decoding, "beta": 0.0}
    det = load_detector(str(yolov5n), "cpu")
    rec = next(cap.caption_files([(photo, photo.name)], detector=det, ground=True))
    assert rec["beta"] == 0.0 and "regions" not in rec
    enc = PhotoEncoder(cap.aligner.extractor_meta, str(yolov5n), 19, "cpu")  # as `vsa score` makes it
    words = score_record(cap.aligner, enc.encode(photo), rec["caption"])["words"]
    per_word = [s["region"] for s in rec["snippets"] for _ in range(s["end"] - s["start"])]
    assert per_word == [w["region"] for w in words]


def test_caption_keeps_a_file_name_that_is_not_utf8(tmp_path, yolov5n):
    """A Latin-1 file name on a UTF-8 system: --json writes it (as \\udcXX escapes, valid UTF-8 that vsa and
    Python's json read back to the same name), text mode writes its bytes, --regions lines too."""
    import os

    folder = tmp_path / "imgs"
    folder.mkdir()
    raw = os.path.join(os.fsencode(folder), b"caf\xe9.jpg")
    _photo(os.fsdecode(raw))
    r = run_cli("caption", folder, "--json", "--threads", "1")
    assert r.returncode == 0, r.stderr.decode()
    from vsa.io import loads

    rec = loads(r.stdout.splitlines()[0])
    assert os.fsencode(rec["path"]) == raw and rec["caption"]
    r.stdout.decode("utf-8")
    r = run_cli("caption", folder, "--regions", "--detector", yolov5n, "--top", "1", "--threads", "1")
    assert r.returncode == 0, r.stderr.decode()
    lines = r.stdout.split(b"\n")
    assert lines[0].startswith(raw + b"\t") and len(lines) >= 3 and lines[1].startswith(raw + b"\t")


def test_the_pixel_limit_message_names_what_raises_it_for_caption(tmp_path):
    p = _photo(tmp_path / "photo.jpg")
    r = run_cli("caption", p, "--threads", "1", env={"VSA_MAX_PIXELS": "1000"})
    err = r.stderr.decode().splitlines()[-1]
    assert r.returncode == 2 and "over the limit of 1000" in err, err
    assert "VSA_MAX_PIXELS=N" in err and "--max-pixels where the command has it" in err, err
    r = run_cli("caption", p, "--threads", "1", env={"VSA_MAX_PIXELS": str(320 * 240)})
    assert r.returncode == 0, r.stderr.decode()


def test_caption_reads_its_inputs_as_regions_does(tmp_path, monkeypatch):
    """No paths: a pipe is read without '-' (`find ... | vsa caption`), an empty one is a one-line error, and a
    terminal gets the one-line error naming both ways in (the command line, or a pipe)."""
    import vsa.cli.common as common

    p = _photo(tmp_path / "photo.jpg")
    r = run_cli("caption", "--threads", "1", "--mirror", "0", input=f"{p}\n".encode())
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.decode().startswith(f"{p}\t")
    r = run_cli("caption", "--threads", "1", input=b"")
    assert (r.returncode, r.stdout) == (2, b"")
    assert r.stderr.decode().endswith("vsa: error: no image paths on stdin (one path per line): nothing to caption\n")
    monkeypatch.setattr(common, "stdin_is_terminal", lambda: True)
    r = run_cli("caption", "--threads", "1", input=b"")
    assert (r.returncode, r.stdout) == (2, b"")
    assert r.stderr.decode() == ("vsa: error: no images given: pass IMAGES... (files or folders), or pipe image paths "
                                 "(one per line) into it\n")


@pytest.mark.slow
def test_eval_says_how_far_the_captioning_of_a_split_is(tmp_path):
    """`vsa eval` of a generator into a log (stderr not a terminal): a progress line every N images captioned
    ($VSA_PROGRESS_EVERY), as `vsa regions` and `vsa embed` give, and a last line when the split is done."""
    import torch

    from vsa.checkpoint import save_checkpoint
    from vsa.generator.model import GeneratorConfig, build_model

    ds, feats = tiny_dataset(tmp_path, n_train=1, n_val=1, n_test=250)
    words = "a dog runs on the grass".split()
    torch.manual_seed(0)
    cfg = GeneratorConfig(arch="lstm", vocab_size=len(words) + 4, feat_dim=32, embed=8, hidden=8)
    model = build_model(cfg)
    with torch.no_grad():
        model.out.bias[1] += 3.0  # <end> likely: short captions
    path = tmp_path / "g.pt"
    save_checkpoint(path, "mrnn", cfg, {}, {"beam": 1, "mirror": 0.0}, words,
                    {"extractor": "efficientnet-lite0", "dim": 32, "input": 224}, model.state_dict(),
                    {"features": str(feats)})
    r = run_cli("eval", "--model", path, "--dataset", ds, "--split", "test", "--json",
                env={"VSA_PROGRESS_EVERY": "100"})
    assert r.returncode == 0, r.stderr.decode()
    assert orjson.loads(r.stdout)["generation"]["images"] == 250
    lines = [ln for ln in r.stderr.decode().splitlines() if ln.startswith("captioning: ")]
    assert [ln.split(",")[0] for ln in lines] == ["captioning: 100/250 (40%)", "captioning: 200/250 (80%)",
                                                 "captioning: 250/250 (100%)"]
    assert "eta " in lines[0] and lines[-1].endswith(", done")
