"""Pictures (PNG) and pages (HTML) of alignments and captions; `vsa align` streaming and resume."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import orjson
import pytest
from PIL import Image

from tests.conftest import run_cli
from vsa import pictures as P

GREY = (128, 128, 128)


def hexrgb(c: str) -> tuple:
    return tuple(int(c[i:i + 2], 16) for i in (1, 3, 5))


@pytest.fixture
def grey_image(tmp_path) -> Path:
    p = tmp_path / "img" / "grey.jpg"
    p.parent.mkdir()
    Image.new("RGB", (224, 224), GREY).save(p, quality=95)
    return p


def alignment(key="grey.jpg"):
    return {"key": key, "sentid": 3, "split": "test", "tokens": "a dog runs on the grass".split(), "beta": 1.0,
            "snippets": [
                {"start": 0, "end": 2, "text": "a dog", "region": 2, "box": [20, 30, 100, 120], "label": "dog", "score": 2.0},
                {"start": 2, "end": 3, "text": "runs", "region": 0, "box": [0, 0, 224, 224], "label": "image", "score": 0.5},
                {"start": 3, "end": 6, "text": "on the grass", "region": 5, "box": [120, 140, 210, 210], "label": "", "score": 1.0},
            ]}


def test_render_alignment_draws_one_box_per_region_in_its_colour(grey_image):
    rec = alignment()
    pic = P.from_alignment(rec, grey_image)
    im = P.render(pic, side=448).convert("RGB")
    scale, top = 448 / 224, 28
    assert im.width > 448 and im.height > 448 + top  # upscaled, side panel, sentence underneath
    px = im.load()
    for region, box in ((2, [20, 30, 100, 120]), (5, [120, 140, 210, 210])):
        col = hexrgb(pic.colour(region))
        x1, y1, x2, y2 = (round(v * scale) for v in box)
        ymid = (y1 + y2) // 2 + top
        # the left and right edges of the box are drawn in the region's colour
        assert px[x1 + 1, ymid] == col, (region, px[x1 + 1, ymid])
        assert px[x2 - 1, ymid] == col
    # the image area holds exactly the colours of those two boxes (plus grey, black/white outlines, the whole-image frame)
    area = np.asarray(im)[top:top + 448, :448].reshape(-1, 3)
    palette = {hexrgb(c) for c in P.PALETTE}
    found = {tuple(c) for c in np.unique(area, axis=0)} & palette
    assert found == {hexrgb(pic.colour(2)), hexrgb(pic.colour(5))}
    # the whole-image snippet is a frame around the image
    assert px[4, top + 224] == hexrgb(P.WHOLE)
    # each object snippet's label sits in the panel in its colour (a colour chip)
    panel = np.asarray(im)[:, 448:].reshape(-1, 3)
    panel_cols = {tuple(c) for c in np.unique(panel, axis=0)}
    assert {hexrgb(pic.colour(2)), hexrgb(pic.colour(5)), hexrgb(P.WHOLE)} <= panel_cols


def test_render_caption_with_regions(grey_image):
    rec = {"path": str(grey_image), "key": "grey.jpg", "caption": "a dog on the grass",
           "regions": [{"box": [10, 10, 90, 90], "label": "dog", "caption": "a black dog"},
                       {"box": [100, 100, 200, 200], "label": "person", "caption": "a man"}]}
    pic = P.from_caption(rec, grey_image)
    assert [L.text for L in pic.labels] == ["a black dog", "a man"] and len(pic.boxes) == 2
    im = P.render(pic, side=448)
    area = np.asarray(im.convert("RGB"))[28:28 + 448, :448].reshape(-1, 3)
    found = {tuple(c) for c in np.unique(area, axis=0)} & {hexrgb(c) for c in P.PALETTE}
    assert len(found) == 2


def test_show_alignments_cli_writes_pngs_and_page(tmp_path, grey_image):
    recs = [alignment(), {**alignment(), "sentid": 4, "snippets": alignment()["snippets"][:1]}]
    src = tmp_path / "al.jsonl"
    src.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in recs))
    out = tmp_path / "show"
    r = run_cli("show", src, "-o", out, "--images", grey_image.parent)
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout == b""  # nothing but data on stdout, and show writes files
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["grey-3.png", "grey-4.png"]
    page = (out / "index.html").read_text()
    assert page.count('class="card"') == 2
    assert re.findall(r'data-boxes="(\d+)" data-snippets="(\d+)"', page) == [("3", "3"), ("1", "1")]
    assert page.count('class="snip"') == 4
    assert 'src="grey-3.png"' in page and "http" not in page.split("<body>")[1]  # nothing remote


def test_show_errors_name_file_and_line(tmp_path):
    src = tmp_path / "al.jsonl"
    src.write_bytes(orjson.dumps(alignment("missing.jpg")) + b"\n")
    r = run_cli("show", src, "-o", tmp_path / "o", "--images", tmp_path)
    assert r.returncode == 2
    err = r.stderr.decode()
    assert err.startswith("vsa: error: ") and ":1: image not found" in err and len(err.splitlines()) == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"x": 1}\n')
    r = run_cli("show", bad, "-o", tmp_path / "o")
    assert r.returncode == 2 and f"{bad}:1:" in r.stderr.decode()


# ----------------------------------------------------------------------------- vsa align (library)


class FakeAligner:
    """Word-region scores from a fixed rule: word t prefers region (t // 2) % R."""

    extractor_meta = {"extractor": "fake", "dim": 4}

    def __init__(self):
        self.calls = 0

    def word_region_scores(self, feats, tokens):
        self.calls += 1
        T, R = len(tokens), len(feats)
        U = np.zeros((T, R))
        for t in range(T):
            U[t, (t // 2) % R] = 1.0
        return U


def fake_store_and_pairs(n_images=4, n_sent=3):
    from vsa.data import ImageRecord, Sentence
    from vsa.featstore import FeatureStore

    keys = [f"im{i}.jpg" for i in range(n_images)]
    R = 3
    arrays = {"feats": np.random.default_rng(0).normal(size=(n_images * R, 4)).astype(np.float32),
              "offsets": np.arange(0, n_images * R + 1, R), "keys": np.array(keys),
              "boxes": np.tile(np.array([[0, 0, 224, 224], [1, 2, 3, 4], [5, 6, 7, 8]], np.float32), (n_images, 1)),
              "labels": np.array(["image", "dog", "cat"] * n_images)}
    store = FeatureStore(None, arrays=arrays)
    recs = [ImageRecord(k, "train", i, [Sentence("", "a b c d e f".split(), i * 10 + j) for j in range(n_sent)])
            for i, k in enumerate(keys)]
    return store, [(r, s) for r in recs for s in r.sentences]


def test_align_to_file_resumes_and_is_atomic(tmp_path):
    from vsa.snippets import align_to_file, part_path

    store, pairs = fake_store_and_pairs()
    out = tmp_path / "al.jsonl"
    out.write_text("previous\n")

    class Boom(KeyboardInterrupt):
        pass

    class Interrupting(FakeAligner):
        def word_region_scores(self, feats, tokens):
            if self.calls == 5:
                raise Boom()
            return super().word_region_scores(feats, tokens)

    with pytest.raises(Boom):
        align_to_file(Interrupting(), store, pairs, out, beta=0.0)
    assert out.read_text() == "previous\n"  # Ctrl-C leaves the old output intact
    part = part_path(out)
    assert len(part.read_text().splitlines()) == 5  # finished pairs are kept
    with open(part, "ab") as fh:  # a torn last line, as after a kill during a write
        fh.write(b'{"key": "im1.jpg", "sen')
    a = FakeAligner()
    res = align_to_file(a, store, pairs, out, beta=0.0)
    assert res["resumed"] == 5 and res["aligned"] == len(pairs) - 5 and a.calls == len(pairs) - 5
    assert not part.exists()
    lines = [orjson.loads(x) for x in out.read_text().splitlines()]
    assert [(r["key"], r["sentid"]) for r in lines] == [(r.key, s.sentid) for r, s in pairs]  # dataset order
    # the fake scores put words (0,1) on region 0, (2,3) on 1, (4,5) on 2: three 2-word snippets at beta 0
    assert [(s["start"], s["end"], s["region"], s["label"]) for s in lines[0]["snippets"]] == [
        (0, 2, 0, "image"), (2, 4, 1, "dog"), (4, 6, 2, "cat")]
    assert lines[0]["snippets"][1]["box"] == [1.0, 2.0, 3.0, 4.0]
    # a rerun with another beta redoes everything, a rerun with the same beta on a finished file recomputes it
    res = align_to_file(FakeAligner(), store, pairs, out, beta=100.0)
    assert res["resumed"] == 0
    assert all(len(orjson.loads(x)["snippets"]) == 1 for x in out.read_text().splitlines())


def test_extractor_mismatch_is_an_error():
    from vsa.errors import VsaError
    from vsa.featstore import check_extractor

    check_extractor({"extractor": "a", "dim": 4}, {"extractor": "a", "dim": 4}, "f.npz", "aligner")
    with pytest.raises(VsaError, match="aligner was trained on 'a'"):
        check_extractor({"extractor": "a"}, {"extractor": "b"}, "f.npz", "aligner")


# ----------------------------------------------------------------------------- vsa align (CLI, real aligner class)


def _tiny_aligner(tmp_path, dim=8):
    """A real (untrained) aligner checkpoint from vsa.align, on dim-d features."""
    torch = pytest.importorskip("torch")
    from vsa.align import build_model
    from vsa.checkpoint import save_checkpoint
    from vsa.data import SPECIALS
    from vsa.align import AlignModelConfig

    cfg = AlignModelConfig(hidden=16, embed=8)
    words = list(SPECIALS) + ["a", "dog", "runs", "on", "grass", "the", "cat"]
    torch.manual_seed(0)
    model = build_model(cfg, len(words), dim)
    path = tmp_path / "align.pt"
    save_checkpoint(path, "align", cfg, {}, {}, words, {"extractor": "fake", "dim": dim}, model.state_dict())
    return path


def test_align_cli_streams_and_resumes(tmp_path):
    from vsa.io import save_npz

    model = _tiny_aligner(tmp_path)
    keys = ["a.jpg", "b.jpg", "c.jpg"]
    R = 4
    save_npz(tmp_path / "feats.npz", {
        "feats": np.random.default_rng(1).normal(size=(3 * R, 8)).astype(np.float16),
        "offsets": np.arange(0, 3 * R + 1, R), "keys": np.array(keys), "image_index": np.repeat(np.arange(3), R).astype(np.int32),
        "boxes": np.tile(np.array([[0, 0, 224, 224], [1, 1, 50, 50], [60, 60, 120, 120], [100, 10, 200, 90]], np.float32), (3, 1)),
        "labels": np.array(["image", "dog", "dog", "person"] * 3), "scores": np.ones(3 * R, np.float32),
        "meta": np.array('{"extractor": "fake", "dim": 8}')})
    ds = {"dataset": "tiny", "images": [
        {"filename": k, "imgid": i, "split": "train" if i < 2 else "test", "sentids": [2 * i, 2 * i + 1],
         "sentences": [{"raw": "A dog runs on the grass.", "tokens": "a dog runs on the grass".split(), "imgid": i, "sentid": 2 * i},
                       {"raw": "The cat.", "tokens": ["the", "cat"], "imgid": i, "sentid": 2 * i + 1}]}
        for i, k in enumerate(keys)]}
    (tmp_path / "ds.json").write_bytes(orjson.dumps(ds))
    args = ["align", "--model", model, "--dataset", tmp_path / "ds.json", "--features", tmp_path / "feats.npz"]
    r = run_cli(*args, "--beta", "0.5")
    assert r.returncode == 0, r.stderr.decode()
    lines = [orjson.loads(x) for x in r.stdout.splitlines()]
    assert [(x["key"], x["sentid"]) for x in lines] == [("a.jpg", 0), ("a.jpg", 1), ("b.jpg", 2), ("b.jpg", 3)]
    for x in lines:
        sn = x["snippets"]
        assert sn[0]["start"] == 0 and sn[-1]["end"] == len(x["tokens"]) and x["beta"] == 0.5
        assert all(a["end"] == b["start"] for a, b in zip(sn, sn[1:]))  # contiguous cover of the sentence
        assert all(s["text"] == " ".join(x["tokens"][s["start"]:s["end"]]) for s in sn)
        assert all(len(s["box"]) == 4 and s["label"] in ("image", "dog", "person") for s in sn)
    assert "snippets/sentence" in r.stderr.decode()
    # to a file: the same records
    r = run_cli(*args, "--beta", "0.5", "-o", tmp_path / "al.jsonl", "--split", "all")
    assert r.returncode == 0, r.stderr.decode()
    assert [orjson.loads(x) for x in (tmp_path / "al.jsonl").read_bytes().splitlines()][:4] == lines
    # --shard K/N: the shards, concatenated in order, are the whole run
    whole = (tmp_path / "al.jsonl").read_bytes().splitlines()
    got = []
    for k in (1, 2, 3):
        r = run_cli(*args, "--beta", "0.5", "--split", "all", "--shard", f"{k}/3")
        assert r.returncode == 0, r.stderr.decode()
        got.append(r.stdout.splitlines())
    assert [len(g) for g in got] == [2, 2, 2] and sum(got, []) == whole
    # features from another CNN: one-line error
    r = run_cli("align", "--model", model, "--dataset", tmp_path / "ds.json", "--features", tmp_path / "other.npz")
    assert r.returncode == 2 and r.stderr.decode().count("\n") == 1


def test_regions_of_one_picture_get_distinct_colours(grey_image):
    snips = [{"start": i, "end": i + 1, "text": f"w{i}", "region": r, "box": [r, r, r + 20, r + 20], "label": "x"}
             for i, r in enumerate([1, 13, 25, 1, 7])]
    pic = P.from_alignment({"key": "grey.jpg", "sentid": 0, "snippets": snips}, grey_image)
    cols = [pic.colour(r) for r in (1, 13, 25, 7)]
    assert len(set(cols)) == 4 and P.WHOLE not in cols


def test_align_cli_sigint_keeps_old_output_and_part(tmp_path, monkeypatch):
    """Ctrl-C in the middle of `vsa align -o`: the old output stays, the part is kept, a rerun resumes."""
    import signal
    import subprocess
    import sys
    import time

    from vsa.io import save_npz

    model = _tiny_aligner(tmp_path)
    n = 4000  # long enough (about 20000 pairs) that the signal lands mid-run even on a fast machine
    keys = [f"k{i}.jpg" for i in range(n)]
    save_npz(tmp_path / "feats.npz", {
        "feats": np.random.default_rng(1).normal(size=(2 * n, 8)).astype(np.float16), "offsets": np.arange(0, 2 * n + 1, 2),
        "keys": np.array(keys), "boxes": np.tile(np.array([[0, 0, 9, 9], [1, 1, 5, 5]], np.float32), (n, 1)),
        "labels": np.array(["image", "dog"] * n), "meta": np.array('{"extractor": "fake", "dim": 8}')})
    sents = [{"raw": "a dog runs on the grass " * 3, "tokens": ("a dog runs on the grass " * 3).split(), "imgid": i, "sentid": 5 * i + j}
             for i in range(n) for j in range(5)]
    ds = {"dataset": "tiny", "images": [{"filename": k, "imgid": i, "split": "train", "sentids": [],
                                         "sentences": sents[5 * i:5 * i + 5]} for i, k in enumerate(keys)]}
    (tmp_path / "ds.json").write_bytes(orjson.dumps(ds))
    out = tmp_path / "al.jsonl"
    out.write_text("old\n")
    part = tmp_path / "al.jsonl.part"
    cmd = [sys.executable, "-m", "vsa", "align", "--model", str(model), "--dataset", str(tmp_path / "ds.json"),
           "--features", str(tmp_path / "feats.npz"), "-o", str(out), "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and (not part.exists() or part.stat().st_size < 20000):
        time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()
    assert "interrupted" in err.decode() and "resume" in err.decode()
    assert out.read_text() == "old\n"
    kept = len(part.read_bytes().splitlines())
    assert 0 < kept < 5 * n
    r = run_cli(*cmd[3:])
    assert r.returncode == 0, r.stderr.decode()
    assert f"({kept} resumed)" in r.stderr.decode()
    assert len(out.read_bytes().splitlines()) == 5 * n and not part.exists()


def test_plain_caption_has_no_side_panel(grey_image):
    pic = P.from_caption({"path": str(grey_image), "key": "grey.jpg", "caption": "a grey square " * 8}, grey_image)
    im = P.render(pic, side=300)
    assert im.width == 300 and im.height > 300 + 28 + 2 * 30  # the long caption wraps under the image


def test_second_writer_on_the_same_output_is_refused(tmp_path):
    from vsa.errors import VsaError
    from vsa.snippets import _lock, align_to_file

    store, pairs = fake_store_and_pairs(1, 1)
    out = tmp_path / "al.jsonl"
    with _lock(out):  # as if another `vsa align -o al.jsonl` were running
        with pytest.raises(VsaError, match="another `vsa align` is writing"):
            align_to_file(FakeAligner(), store, pairs, out, beta=0.0)
    assert align_to_file(FakeAligner(), store, pairs, out, beta=0.0)["written"] == 1
    assert not (tmp_path / "al.jsonl.lock").exists()
