"""Pictures (PNG) and pages (HTML) of alignments and captions; `vsa align` streaming and resume."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import orjson
import pytest
from PIL import Image

from tests.conftest import lock_held_elsewhere, run_cli
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


def grounded_caption_with_regions(path) -> dict:
    """What `vsa caption --ground --regions --json` writes: the caption's snippets on boxes, and each of the top
    boxes described on its own (``regions``), one of them a box that also holds a snippet."""
    return {"path": str(path), "key": "grey.jpg", "caption": "a dog runs on the grass", "beta": 1.0,
            "snippets": alignment()["snippets"],
            "regions": [{"box": [20.0, 30.0, 100.0, 120.0], "label": "dog", "score": 0.9, "caption": "a black dog"},
                        {"box": [150.0, 10.0, 220.0, 60.0], "label": "frisbee", "score": 0.4,
                         "caption": "a red frisbee"}]}


def test_grounded_caption_draws_the_region_phrases_too(grey_image):
    rec = grounded_caption_with_regions(grey_image)
    pic = P.from_caption(rec, grey_image)
    phrases = [L for L in pic.labels if L.phrase]
    assert [(L.text, pic.boxes[L.region][1]) for L in phrases] == [("a black dog", "dog"), ("a red frisbee", "frisbee")]
    assert phrases[0].region == 2  # the dog box of the snippet "a dog": one box, not two
    assert phrases[1].region not in {s["region"] for s in rec["snippets"]}
    assert [L.text for L in pic.labels if not L.phrase] == ["a dog", "runs", "on the grass"]
    im = P.render(pic, side=448)
    x1, y1, x2, y2 = (round(v * 2) for v in rec["regions"][1]["box"])  # the frisbee box, drawn in its colour
    assert np.asarray(im.convert("RGB"))[28 + y2, (x1 + x2) // 2].tolist() == list(hexrgb(pic.colour(phrases[1].region)))
    panel = np.asarray(im)[:, 448:].reshape(-1, 3)
    assert hexrgb(pic.colour(phrases[1].region)) in {tuple(c) for c in np.unique(panel, axis=0)}


def test_show_page_lists_the_region_phrases(tmp_path, grey_image):
    src = tmp_path / "c.jsonl"
    src.write_bytes(orjson.dumps(grounded_caption_with_regions(grey_image)) + b"\n")
    for extra in ((), ("--no-png",)):
        r = run_cli("show", src, "-o", tmp_path / "o", *extra)
        assert r.returncode == 0, r.stderr.decode()
        page = (tmp_path / "o" / "index.html").read_text()
        assert 'data-snippets="3" data-phrases="2"' in page
        assert re.findall(r'class="phrases">(.*?)</ul>', page)[0].count("<li>") == 2
        assert ">a black dog</span> <span class=\"meta\">dog</span>" in page and "a red frisbee" in page


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
    from vsa.features.store import FeatureStore

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
    from vsa.alignment.snippets import align_to_file, part_path

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
    from vsa.features.store import check_extractor

    check_extractor({"extractor": "a", "dim": 4}, {"extractor": "a", "dim": 4}, "f.npz", "aligner")
    with pytest.raises(VsaError, match="aligner was trained on 'a'"):
        check_extractor({"extractor": "a"}, {"extractor": "b"}, "f.npz", "aligner")


# ----------------------------------------------------------------------------- vsa align (CLI, real aligner class)


def _tiny_aligner(tmp_path, dim=8):
    """A real (untrained) aligner checkpoint from vsa.alignment.model, on dim-d features."""
    torch = pytest.importorskip("torch")
    from vsa.alignment.model import build_model
    from vsa.checkpoint import save_checkpoint
    from vsa.data import SPECIALS
    from vsa.alignment.model import AlignModelConfig

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


@pytest.mark.slow
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
    from vsa.alignment.snippets import align_to_file

    store, pairs = fake_store_and_pairs(1, 1)
    out = tmp_path / "al.jsonl"
    with lock_held_elsewhere(out, "vsa align"):  # as if another `vsa align -o al.jsonl` were running
        with pytest.raises(VsaError, match=r"al\.jsonl\.lock: locked: another `vsa align` \(pid \d+ on .*\) is writing"):
            align_to_file(FakeAligner(), store, pairs, out, beta=0.0)
    assert align_to_file(FakeAligner(), store, pairs, out, beta=0.0)["written"] == 1
    assert not (tmp_path / "al.jsonl.lock").exists()


# ----------------------------------------------------------------------------- hostile input: file names, pages

HOSTILE_PARTS = ["x/../../../escape", "../up", "/tmp/abs", "..", ".", "a\\..\\..\\b", "<!--<script>", "x#1?%", "", " ",
                 "\u0000nul", "CON", "a" * 300, "ünï/cødé", "-rf", ".hidden"]


def _files(root: Path) -> set:
    return {p for p in root.rglob("*")}


def test_show_pictures_never_writes_outside_out(tmp_path, grey_image):
    """Every file name vsa show derives from a record (key, path stem, sentid) stays one plain file in -o."""
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    recs = []
    for i, part in enumerate(HOSTILE_PARTS):
        recs.append({**alignment(), "key": part + ".jpg", "path": str(grey_image), "sentid": part})
        recs.append({**alignment(), "key": f"k{i}.jpg", "path": str(grey_image), "sentid": part})
    recs.append({**alignment(), "key": "GREY.jpg", "path": str(grey_image), "sentid": 3})  # grey-3 in another case
    src = tmp_path / "al.jsonl"
    src.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in recs))
    caps = tmp_path / "caps.jsonl"
    caps.write_bytes(b"".join(orjson.dumps({"key": p + ".jpg", "path": str(grey_image), "caption": p}) + b"\n"
                              for p in HOSTILE_PARTS))
    out = tmp_path / "a" / "b" / "c" / "out"
    before = _files(tmp_path)
    res = P.show_pictures(src, out, root=grey_image.parent, limit=0, side=64)
    assert res["pictures"] == len(recs)
    res = P.show_pictures(caps, out / "caps", root=grey_image.parent, limit=0, side=64)
    assert res["pictures"] == len(HOSTILE_PARTS)
    new = _files(tmp_path) - before
    assert new and all(p == out or out in p.parents for p in new), sorted(new)
    assert {p.parent for p in new} == {out.parent, out, out / "caps"}  # no folder other than out/caps made
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == len(recs)  # one file per picture, none overwritten (also not by case)
    assert len({p.name.lower() for p in pngs}) == len(recs)
    assert all(re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]*\.png", p.name) and len(p.name) < 200 for p in pngs)
    assert len(list((out / "caps").glob("*.png"))) == len(HOSTILE_PARTS)
    page = (out / "index.html").read_text()
    assert sorted(re.findall(r'<img src="([^"]+)"', page)) == sorted(p.name for p in pngs)


def test_show_cli_hostile_sentid_stays_in_out(tmp_path, grey_image):
    """The issue's example: `"sentid": "x/../../../escape"` wrote escape.png three folders above -o."""
    deep = tmp_path / "d1" / "d2" / "d3"
    deep.mkdir(parents=True)
    src = tmp_path / "al.jsonl"
    src.write_bytes(orjson.dumps({**alignment(), "sentid": "x/../../../escape"}) + b"\n")
    r = run_cli("show", src, "-o", deep / "out", "--images", grey_image.parent)
    assert r.returncode == 0, r.stderr.decode()
    assert not list(tmp_path.rglob("escape.png"))
    assert [p.name for p in (deep / "out").iterdir() if p.suffix == ".png"] == ["grey-x_.._.._.._escape.png"]


def test_malformed_records_are_one_line_errors(tmp_path, grey_image):
    from vsa.errors import VsaError

    good = alignment()
    bad = [({**good, "snippets": [{**good["snippets"][0], "region": "2"}]}, "snippet 1: 'region'"),
           ({**good, "snippets": [{**good["snippets"][0], "box": "abcd"}]}, "snippet 1: 'box'"),
           ({**good, "snippets": [{**good["snippets"][0], "box": [1, 2, 3, float("nan")]}]}, "snippet 1: 'box'"),
           ({**good, "snippets": "a dog"}, "'snippets' must be a list"),
           ({**good, "path": 5}, "'path' must be a string")]
    for rec, msg in bad:
        src = tmp_path / "al.jsonl"
        src.write_bytes(orjson.dumps(good) + b"\n" + orjson.dumps(rec) + b"\n")
        with pytest.raises(VsaError) as e:
            P.show_pictures(src, tmp_path / "o", "alignments", grey_image.parent)
        assert str(e.value).startswith(f"{src}:2: ") and msg in str(e.value), str(e.value)


def test_safe_part_and_script_json():
    import json

    for part in HOSTILE_PARTS:
        s = P.safe_part(part)
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", s) and len(s) <= 60 and "/" not in s, (part, s)
    hostile = {"t": "</script><!--<script>&amp;\u2028\u2029'\"", "k": ["<img src=x onerror=alert(1)>"]}
    blob = P.script_json(hostile)
    assert not set("<>&\u2028\u2029") & set(blob)
    assert json.loads(blob) == hostile
    assert P.url("thumbs/x#1?%.jpg") == "thumbs/x%231%3F%25.jpg" and P.url("javascript:alert(1)").startswith("javascript%3A")


def _hostile_dataset(tmp_path) -> Path:
    """Images a/x.jpg and b/x.jpg (one file name, two folders) and keys that climb out of the image root."""
    from PIL import Image

    root = tmp_path / "imgs" / "r"
    for sub, col in (("a", "red"), ("b", "blue"), ("up", "green")):
        (tmp_path / "imgs" / sub if sub == "up" else root / sub).mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64), "red").save(root / "a" / "x.jpg")
    Image.new("RGB", (64, 64), "blue").save(root / "b" / "x.jpg")
    Image.new("RGB", (64, 64), "green").save(tmp_path / "imgs" / "up" / "x.jpg")
    ims = [{"filepath": fp, "filename": "x.jpg", "imgid": i, "split": "test", "sentids": [i],
            "sentences": [{"raw": f"picture {i}", "tokens": ["picture", str(i)], "imgid": i, "sentid": i}]}
           for i, fp in enumerate(["a", "b", "../up"])]
    (tmp_path / "ds.json").write_bytes(orjson.dumps({"dataset": "hostile", "images": ims}))
    return root


def _ranks(keys, rank=1) -> dict:
    return {"split": "test", "images": [{"key": k, "top": [i], "gt": [i], "rank": rank} for i, k in enumerate(keys)],
            "sentences": [{"sentid": i, "top": [k], "gt": k, "rank": 1} for i, k in enumerate(keys)]}


def test_retrieval_thumbs_are_distinct_and_inside_out(tmp_path):
    from vsa.data import load_dataset

    root = _hostile_dataset(tmp_path)
    ds = load_dataset(tmp_path / "ds.json", root)
    keys = [r.key for r in ds.images]
    assert keys == ["a/x.jpg", "b/x.jpg", "../up/x.jpg"]
    (tmp_path / "ranks.json").write_bytes(orjson.dumps(_ranks(keys)))
    out = tmp_path / "o" / "p"
    before = _files(tmp_path)
    P.show_retrieval(tmp_path / "ranks.json", ds, out)
    new = _files(tmp_path) - before
    assert all(p in (tmp_path / "o", out) or out in p.parents for p in new), sorted(new)
    assert {p.parent for p in new} == {tmp_path, tmp_path / "o", out, out / "thumbs"}
    thumbs = sorted((out / "thumbs").glob("*.jpg"))
    assert len(thumbs) == 3  # one per image, not one per file name
    colours = {Image.open(t).convert("RGB").getpixel((30, 30)) for t in thumbs}
    assert len(colours) == 3
    page = (out / "retrieval.html").read_text()
    for t in thumbs:
        assert f'"thumbs/{t.name}"' in page


@pytest.mark.parametrize("rank", ["<img src=x onerror=alert(1)>", "3", 0, -1, 1.5, True, [1], {"r": 1}])
def test_retrieval_rank_must_be_a_whole_number(tmp_path, rank):
    from vsa.data import load_dataset
    from vsa.errors import VsaError

    root = _hostile_dataset(tmp_path)
    ds = load_dataset(tmp_path / "ds.json", root)
    ranks = _ranks([r.key for r in ds.images])
    ranks["images"][1]["rank"] = rank
    (tmp_path / "ranks.json").write_bytes(orjson.dumps(ranks))
    with pytest.raises(VsaError) as e:
        P.show_retrieval(tmp_path / "ranks.json", ds, tmp_path / "o")
    assert str(e.value).startswith(f"{tmp_path / 'ranks.json'}: images[1]: 'rank' must be a whole number"), str(e.value)
    assert not (tmp_path / "o" / "retrieval.html").exists()


def test_retrieval_hostile_rank_cli_exit_2(tmp_path):
    root = _hostile_dataset(tmp_path)
    ranks = _ranks(["a/x.jpg", "b/x.jpg", "../up/x.jpg"])
    ranks["sentences"][2]["rank"] = "<img src=x onerror=alert(1)>"
    (tmp_path / "ranks.json").write_bytes(orjson.dumps(ranks))
    r = run_cli("show", tmp_path / "ranks.json", "-o", tmp_path / "o", "--dataset", tmp_path / "ds.json", "--images", root)
    err = r.stderr.decode()
    assert r.returncode == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"vsa: error: {tmp_path / 'ranks.json'}: sentences[2]: 'rank' must be a whole number"), err


def test_render_takes_line_breaks_in_any_text(grey_image):
    """PIL's text layout fails on line breaks (\\n, \\r, U+0085, U+2029...) in the title, tags and notes."""
    breaks = "a\nb\rc\x85d\u2028e\u2029f\x1cg"
    rec = {**alignment(), "key": breaks, "sentid": breaks,
           "snippets": [{**s, "text": breaks, "label": breaks} for s in alignment()["snippets"]]}
    assert P.render(P.from_alignment(rec, grey_image), side=128).width > 128
    cap = {"key": breaks, "caption": breaks, "regions": [{"box": [1, 2, 50, 60], "label": breaks, "caption": breaks}]}
    assert P.render(P.from_caption(cap, grey_image), side=128).width > 128


def test_page_links_are_url_encoded(tmp_path, grey_image):
    pic = P.from_alignment(alignment(), grey_image)
    page = P.write_pictures_page([(pic, 'x#1?%"<.png')], tmp_path).read_text()
    assert '<img src="x%231%3F%25%22%3C.png"' in page
    data = {"images": [{"key": "k", "thumb": "thumbs/x#1?%.jpg"}], "sentences": [], "i2t": [], "t2i": []}
    page = P.write_retrieval_page(data, tmp_path).read_text()
    assert '"thumb":"thumbs/x%231%3F%25.jpg"' in page


@pytest.mark.parametrize("args,msg", [(["--side", "0"], "--side must be from 32 to 4096"),
                                      (["--side", "5000"], "--side must be from 32 to 4096"),
                                      (["--top", "0"], "--top must be >= 1"), (["--sentences", "-1"], "--sentences must be >= 1"),
                                      (["--limit", "-1"], "--limit must be >= 0")])
def test_show_option_bounds(tmp_path, grey_image, args, msg):
    from typer.testing import CliRunner

    from vsa.cli import app

    src = tmp_path / "al.jsonl"
    src.write_bytes(orjson.dumps(alignment()) + b"\n")
    r = CliRunner().invoke(app, ["show", str(src), "-o", str(tmp_path / "o"), "--images", str(grey_image.parent), *args])
    assert r.exit_code == 2 and msg in r.output, r.output
    assert not (tmp_path / "o").exists()
