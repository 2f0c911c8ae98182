"""`vsa train-align`, `vsa eval` (retrieval), `vsa score` and `vsa search` end to end.

The synthetic set (tests/synth_align.py) has a known answer; the real-photo tests run the shipped
aligner with the YOLOv5n detector and EfficientNet-Lite0 on Flickr8K images.
"""

from __future__ import annotations

import orjson
import pytest

from tests.conftest import run_cli
from tests.synth_align import make_synthetic

SMALL = ["--hidden", "32", "--epochs", "4", "--batch-size", "32", "--lr", "3e-3", "--min-count", "1",
         "--threads", "1", "--set", "embed=16", "--set", "lr_decay_epoch=0"]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from vsa.io import write_json

    tmp = tmp_path_factory.mktemp("cli")
    ds, feats, objs = make_synthetic(tmp, n_train=80, n_val=30, n_test=30)
    write_json(tmp / "synthetic.json", ds.to_karpathy())
    r = run_cli("train-align", "--dataset", tmp / "synthetic.json", "--features", feats, "-o", tmp / "a.pt", *SMALL,
                "--json")
    assert r.returncode == 0, r.stderr.decode()
    summary = orjson.loads(r.stdout)
    return tmp, ds, feats, objs, summary


def test_train_align_cli_writes_checkpoints_and_log(synth):
    tmp, _, _, _, summary = synth
    assert (tmp / "a.pt").exists() and (tmp / "a.last.pt").exists()
    lines = (tmp / "a.log.jsonl").read_bytes().splitlines()
    assert len(lines) == 4 and summary["epochs"] == 4
    assert summary["best"]["i2t"]["r1"] > 30  # chance is ~3%


def test_combine_scores_standardises_each_model_by_hand():
    import numpy as np

    from vsa.alignment.evaluate import combine_scores

    a = np.array([[1.0, 3.0], [5.0, 7.0]])  # mean 4, std sqrt(5)
    b = np.array([[10.0, 0.0], [0.0, 10.0]])  # mean 5, std 5
    za, zb = (a - 4) / np.sqrt(5), (b - 5) / 5
    np.testing.assert_allclose(combine_scores([a, b]), (za + zb) / 2, rtol=1e-6)
    np.testing.assert_allclose(combine_scores([a, b], [3, 1]), (3 * za + zb) / 4, rtol=1e-6)
    np.testing.assert_allclose(combine_scores([a, 100 * a + 7]), za, rtol=1e-5)  # scale-free


def test_eval_ensemble_of_two_aligners(synth):
    tmp, ds, feats, _, _ = synth
    r = run_cli("train-align", "--model", "whole-image", "--dataset", tmp / "synthetic.json", "--features", feats,
                "-o", tmp / "w.pt", *SMALL)
    assert r.returncode == 0, r.stderr.decode()
    base = ["eval", "--dataset", tmp / "synthetic.json", "--json"]
    one = orjson.loads(run_cli(*base, "--model", tmp / "a.pt").stdout)["retrieval"]
    r = run_cli(*base, "--model", tmp / "a.pt", "--model", tmp / "w.pt", "--ensemble", "--weights", "1,0")
    assert r.returncode == 0, r.stderr.decode()
    zero = orjson.loads(r.stdout)["retrieval"]
    assert zero["i2t"] == one["i2t"] and zero["t2i"] == one["t2i"]  # weight 0: the first model alone
    r = run_cli(*base, "--model", tmp / "a.pt", "--model", tmp / "w.pt", "--ensemble")
    rep = orjson.loads(r.stdout)["retrieval"]
    assert len(rep["ensemble"]["members"]) == 2 and rep["ensemble"]["members"][0] == pytest.approx(one["rsum"])
    assert rep["images"] == 30 and rep["i2t"]["r1"] > 30
    r = run_cli(*base, "--model", tmp / "a.pt", "--model", tmp / "w.pt")
    assert r.returncode == 2 and b"--ensemble" in r.stderr
    # one --features is read by every member: here by a copy of a.pt that no longer knows its training features
    # (an exported file), which without it would compute features from the images with the default detector
    import torch

    from vsa.checkpoint import load_checkpoint

    ck = load_checkpoint(tmp / "a.pt")
    ck["meta"].pop("features", None)
    torch.save(ck, tmp / "a-exported.pt")
    r = run_cli(*base, "--model", tmp / "a-exported.pt", "--model", tmp / "w.pt", "--ensemble", "--features", feats)
    assert r.returncode == 0, r.stderr.decode()
    assert orjson.loads(r.stdout)["retrieval"]["rsum"] == pytest.approx(rep["rsum"])
    r = run_cli(*base, "--model", tmp / "a-exported.pt", "--model", tmp / "w.pt", "--ensemble",
                "--features", feats, "--features", feats)  # one per --model
    assert r.returncode == 0 and orjson.loads(r.stdout)["retrieval"]["rsum"] == pytest.approx(rep["rsum"])
    r = run_cli(*base, "--model", tmp / "a.pt", "--model", tmp / "w.pt", "--ensemble", *["--features", feats] * 3)
    assert r.returncode == 2 and b"3 --features for 2 --model" in r.stderr


def test_train_align_cli_errors_are_one_line(tmp_path):
    r = run_cli("train-align", "--features", tmp_path / "missing.npz", "--dataset", tmp_path / "nope.json",
                "-o", tmp_path / "a.pt")
    assert r.returncode == 2 and r.stderr.decode().startswith("vsa: error:") and r.stderr.count(b"\n") == 1
    r = run_cli("train-align", "--set", "score=best", "-o", tmp_path / "a.pt")
    assert r.returncode == 2 and b"unknown score" in r.stderr


def test_eval_retrieval_report_and_ranks(synth):
    tmp, ds, feats, _, _ = synth
    r = run_cli("eval", "--model", tmp / "a.pt", "--dataset", tmp / "synthetic.json", "--features", feats,
                "--json", "--ranks-out", tmp / "ranks.json")
    assert r.returncode == 0, r.stderr.decode()
    rep = orjson.loads(r.stdout)["retrieval"]
    assert rep["images"] == 30 and rep["sentences"] == 150
    assert rep["i2t"]["r1"] > 30 and set(rep["t2i"]) >= {"r1", "r5", "r10", "medr"}
    ranks = orjson.loads((tmp / "ranks.json").read_bytes())
    assert len(ranks["images"]) == 30 and len(ranks["sentences"]) == 150
    # the ranks file agrees with the report
    r1 = sum(im["rank"] == 1 for im in ranks["images"]) / 30 * 100
    assert r1 == pytest.approx(rep["i2t"]["r1"], abs=0.01)
    im = ranks["images"][0]
    assert len(im["gt"]) == 5 and len(im["top"]) == 10 and im["top_scores"] == sorted(im["top_scores"], reverse=True)
    s = ranks["sentences"][0]
    assert s["gt"] == im["key"] and s["text"]
    # the human table shows the figures
    from rich.console import Console

    from vsa.alignment.evaluate import PAPER, _fmt, render_retrieval

    con = Console(record=True, width=100)
    render_retrieval({**rep, "paper": PAPER["flickr8k"]}, con)
    text = con.export_text()
    assert "Med r" in text and "paper BRNN" in text and _fmt(rep['i2t']['r10']) in text and "of 8 figures" in text


def test_eval_library_reads_no_vsa_toml_and_the_cli_does(synth, tmp_path, monkeypatch):
    """The library evaluates the features it is given, whatever vsa.toml or $VSA_DETECTOR say; the CLI falls back to
    [features] of vsa.toml when the model's training features are gone."""
    import json
    from pathlib import Path

    import torch

    from vsa.checkpoint import load_checkpoint
    from vsa.cli import config
    from vsa.cli.workspace import eval_features
    from vsa.data import load_dataset
    from vsa.errors import VsaError
    from vsa.alignment.evaluate import _features_for, evaluate_aligner
    from vsa.generator.evaluate import _features_path

    tmp, _, feats, _, _ = synth
    ds = load_dataset(tmp / "synthetic.json")
    want = evaluate_aligner(tmp / "a.pt", ds, "test", features=feats, device="cpu")
    (tmp_path / "vsa.toml").write_text('[features]\nregions = "bogus.npz"\nwhole = "bogus.npz"\ngrid = "bogus.npz"\n'
                                       '[regions]\ndetector = "bogus.pt"\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VSA_DETECTOR", str(tmp_path / "bogus.pt"))
    config.reset_workspace()
    assert evaluate_aligner(tmp / "a.pt", ds, "test", features=feats, device="cpu") == want
    assert evaluate_aligner(tmp / "a.pt", ds, "test", device="cpu") == want  # the features it was trained on
    with pytest.raises(VsaError, match="no features for the evaluation: pass --features NPZ$"):
        _features_for({"meta": {}}, None)
    with pytest.raises(VsaError, match="no features for the generator"):
        _features_path({"meta": {}, "extractor": {}}, None)
    # the CLI: a model whose training features are gone reads [features] regions of vsa.toml, when it exists
    ck = load_checkpoint(tmp / "a.pt")
    ck["meta"]["features"] = str(tmp_path / "gone.npz")
    torch.save(ck, tmp_path / "moved.pt")
    assert eval_features([tmp_path / "moved.pt"]) == [None]  # bogus.npz does not exist
    (tmp_path / "vsa.toml").write_text(f"[features]\nregions = {json.dumps(str(feats))}\n")
    config.reset_workspace()
    assert eval_features([tmp_path / "moved.pt"]) == [Path(feats)]
    assert eval_features([tmp_path / "moved.pt"], tmp_path / "flag.npz") == [tmp_path / "flag.npz"]
    r = run_cli("eval", "--model", tmp_path / "moved.pt", "--dataset", tmp / "synthetic.json", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr.decode()
    rep = orjson.loads(r.stdout)["retrieval"]
    assert rep["features"] == str(feats) and rep["i2t"] == want["i2t"] and rep["t2i"] == want["t2i"]


def test_score_matching_beats_non_matching_and_points_at_objects(synth):
    from tests.synth_align import WORDS

    tmp, ds, feats, objs, _ = synth
    rec, o = ds.images[-1], objs[-1]
    missing = [w for i, w in enumerate(WORDS) if i not in o]
    good = f"a {WORDS[o[0]]} and a {WORDS[o[1]]}"
    bad = f"a {missing[0]} and a {missing[1]}"
    pairs = b"".join(orjson.dumps({"image": rec.key, "sentence": s}) + b"\n" for s in (good, bad))
    r = run_cli("score", "-m", tmp / "a.pt", "-f", feats, input=pairs)
    assert r.returncode == 0, r.stderr.decode()
    out = [orjson.loads(x) for x in r.stdout.splitlines()]
    assert out[0]["score"] > out[1]["score"]
    words = {w["word"]: w for w in out[0]["words"]}
    assert words[WORDS[o[0]]]["label"] == WORDS[o[0]] and words[WORDS[o[1]]]["label"] == WORDS[o[1]]
    assert len(words[WORDS[o[0]]]["box"]) == 4


def test_score_stdin_skip_bad_and_errors(synth):
    tmp, ds, feats, _, _ = synth
    lines = b'{"image": "img0000.jpg", "sentence": "a dog"}\nnot json\n{"image": "nope.jpg", "sentence": "a"}\n'
    r = run_cli("score", "-m", tmp / "a.pt", "-f", feats, "--skip-bad", input=lines)
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 1 and r.stderr.count(b"warning") == 2
    r = run_cli("score", "-m", tmp / "a.pt", "-f", feats, input=lines)
    assert r.returncode == 2 and b"<stdin>:2" in r.stderr
    r = run_cli("score", "img0000.jpg", "-m", tmp / "a.pt", "-f", feats)
    assert r.returncode == 2 and b"give a sentence" in r.stderr


def test_score_pairs_library_caches_consecutive_photos_and_skips_bad_lines(synth):
    """vsa.search.score_pairs (the loop behind `vsa score` on stdin) takes explicit arguments: each run of
    pairs of one photo encodes it once; bad lines are errors naming the line, or warnings with skip_bad."""
    from vsa.alignment.model import load_aligner
    from vsa.errors import VsaError
    from vsa.features.store import load_features
    from vsa.search import photo_from_store, score_pairs, score_photo, score_record

    tmp, ds, feats, _, _ = synth
    aligner, store = load_aligner(tmp / "a.pt", "cpu"), load_features(feats)
    encoded = []

    class Encoder:  # photos from the features file, counting encodes
        def encode(self, path, key=None, max_pixels=None):
            encoded.append(path)
            return photo_from_store(store, path)

    a, b = ds.images[0].key, ds.images[1].key
    pairs = [(1, {"image": a, "sentence": "a dog"}), (2, {"path": a, "sentence": "a cat"}), (3, {"image": 7}),
             (5, {"key": b, "sentence": "a kite"}), (6, {"image": a, "sentence": "a dog"})]
    warned = []
    out = list(score_pairs(aligner, Encoder(), pairs, skip_bad=True, warn=warned.append))
    assert [line for line, _ in out] == [1, 2, 5, 6] and encoded == [a, b, a]
    assert warned == ["<stdin>:3: each line needs string fields 'image' and 'sentence'"]
    want = score_record(aligner, photo_from_store(store, a), "a dog")
    assert out[0][1] == want and out[3][1] == want
    assert score_photo(aligner, None, a, "a dog", store=store) == want
    assert [r for _, r in score_pairs(aligner, None, pairs[:2], store=store)] == [out[0][1], out[1][1]]
    with pytest.raises(VsaError, match="<stdin>:3:"):
        list(score_pairs(aligner, Encoder(), pairs))


def test_score_search_and_grounding_read_every_word_of_a_long_query(synth, tmp_path):
    """Training cuts sentences at max_len (40) words; a query, a scored sentence or a grounded caption is read
    whole: every word has its own best region and snippet."""
    from vsa.alignment.model import load_aligner
    from vsa.features.store import load_features
    from vsa.search import Index, build_index, photo_from_store, save_index, score_record, search_text
    from vsa.alignment.snippets import ground_sentence
    from tests.synth_align import WORDS

    tmp, ds, feats, objs, _ = synth
    aligner, store = load_aligner(tmp / "a.pt", "cpu"), load_features(feats)
    assert aligner.cfg.max_len == 40
    o = objs[0]
    tokens = ["a", WORDS[o[0]], "and", "a", WORDS[o[1]], "near", "the", WORDS[o[2]]] * 8  # 64 words
    photo = photo_from_store(store, ds.images[0].key)
    rec = score_record(aligner, photo, " ".join(tokens))
    assert [w["word"] for w in rec["words"]] == tokens
    assert rec["words"][-1]["label"] == WORDS[o[2]]  # the 64th word still points at its object
    assert rec["score"] != score_record(aligner, photo, " ".join(tokens[:40]))["score"]  # words 41-64 count
    save_index(tmp_path / "idx.npz", aligner, build_index(aligner, None, store=store, keys=store.keys[:10]))
    hits = search_text(aligner, Index(tmp_path / "idx.npz"), " ".join(tokens), 3, hubness=False)
    assert len(hits) == 3 and all(len(h["words"]) == 64 for h in hits)
    snippets = ground_sentence(aligner, photo, tokens)
    assert sum(s["end"] - s["start"] for s in snippets) == 64 and snippets[-1]["end"] == 64


@pytest.mark.parametrize("sentence", ["", "...", " ?! "])
def test_score_a_sentence_without_words_is_refused_like_a_search_query(synth, sentence):
    from vsa.alignment.model import load_aligner
    from vsa.errors import VsaError
    from vsa.features.store import load_features
    from vsa.search import photo_from_store, score_pairs, score_record

    tmp, ds, feats, _, _ = synth
    aligner, store = load_aligner(tmp / "a.pt", "cpu"), load_features(feats)
    with pytest.raises(VsaError, match="^the sentence has no words$"):
        score_record(aligner, photo_from_store(store, ds.images[0].key), sentence)
    key = ds.images[0].key
    pairs = [(1, {"image": key, "sentence": "a dog"}), (4, {"image": key, "sentence": sentence})]
    with pytest.raises(VsaError, match="^<stdin>:4: the sentence has no words$"):
        list(score_pairs(aligner, None, pairs, store=store))
    warned = []
    kept = score_pairs(aligner, None, pairs, store=store, skip_bad=True, warn=warned.append)
    assert [line for line, _ in kept] == [1]
    assert warned == ["<stdin>:4: the sentence has no words"]


def test_score_cli_refuses_a_punctuation_only_sentence(synth):
    tmp, ds, feats, _, _ = synth
    r = run_cli("score", ds.images[0].key, "...", "-m", tmp / "a.pt", "-f", feats)
    assert r.returncode == 2 and r.stderr.decode() == "vsa: error: the sentence has no words\n" and not r.stdout


def test_score_and_search_refuse_non_finite_features_and_scores(synth, tmp_path):
    import numpy as np

    from vsa.alignment.model import load_aligner
    from vsa.errors import VsaError
    from vsa.features.store import load_features
    from vsa.search import Index, build_index, photo_from_store, save_index, search_sentences, search_text

    tmp, ds, feats, _, _ = synth
    a = dict(np.load(feats))
    a["feats"] = a["feats"].copy()
    a["feats"][int(a["offsets"][2]) + 1] = np.nan  # image 2's second region
    np.savez(tmp_path / "nan.npz", **a)
    aligner, store = load_aligner(tmp / "a.pt", "cpu"), load_features(tmp_path / "nan.npz")
    with pytest.raises(VsaError, match="nan.npz: the features of 'img0002.jpg' hold NaN or infinite values"):
        photo_from_store(store, "img0002.jpg")
    r = run_cli("score", "img0002.jpg", "a dog", "-m", tmp / "a.pt", "-f", tmp_path / "nan.npz")
    assert r.returncode == 2 and b"nan.npz: the features of 'img0002.jpg'" in r.stderr and not r.stdout
    with pytest.raises(VsaError, match="img0002.jpg"):
        build_index(aligner, None, store=store, keys=store.keys[:5])
    # an index whose vectors went bad after it was built
    good = load_features(feats)
    save_index(tmp_path / "idx.npz", aligner, build_index(aligner, None, store=good, keys=store.keys[:5]))
    idx = Index(tmp_path / "idx.npz")
    idx.emb = np.array(idx.emb, dtype=np.float32)
    idx.emb[int(idx.emb_offsets[3])] = np.inf
    with pytest.raises(VsaError, match="idx.npz: the index's vectors or hubness terms of 'img0003.jpg'"):
        search_text(aligner, idx, "a dog", 5, hubness=False)
    photo = photo_from_store(good, "img0000.jpg")
    photo.feats = photo.feats.copy()
    photo.feats[0, 0] = np.nan
    with pytest.raises(VsaError, match="the photo's features hold NaN or infinite values"):
        search_sentences(aligner, photo, ["a dog"], hubness=False)


def test_index_keys_and_inputs_library(synth, tmp_path):
    from vsa.errors import VsaError
    from vsa.features.store import load_features
    from vsa.search import index_inputs, index_keys

    tmp, ds, feats, _, _ = synth
    store = load_features(feats)
    assert index_keys(store) is None
    assert index_keys(store, ds, "test") == [r.key for r in ds.split("test")]
    assert index_keys(store, ds) == [r.key for r in ds.images]
    with pytest.raises(VsaError, match="no photos given"):
        index_inputs([])
    with pytest.raises(VsaError, match="no images found"):
        index_inputs([tmp_path])
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.jpg").write_bytes(b"")
    assert index_inputs([tmp_path]) == [(str(tmp_path / "sub" / "x.jpg"), "sub/x.jpg")]


def test_search_index_text_and_sentences(synth):
    from tests.synth_align import WORDS

    tmp, ds, feats, objs, _ = synth
    idx = tmp / "idx.npz"
    r = run_cli("search", "index", "-f", feats, "--dataset", tmp / "synthetic.json", "--split", "test",
                "-m", tmp / "a.pt", "-o", idx)
    assert r.returncode == 0, r.stderr.decode()
    o = objs[-1]
    q = f"a {WORDS[o[0]]} and a {WORDS[o[1]]} near the {WORDS[o[2]]}"
    r = run_cli("search", "text", q, "-i", idx, "-k", "5", "--json")
    assert r.returncode == 0, r.stderr.decode()
    hits = [orjson.loads(x) for x in r.stdout.splitlines()]
    assert len(hits) == 5 and [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
    # every image with the same three objects ranks above the rest; ours is among the top 5
    assert ds.images[-1].key in [h["key"] for h in hits]
    assert all(h["oov"] == [] for h in hits) and b"vocabulary" not in r.stderr
    r = run_cli("search", "text", q + " and a giraffe", "-i", idx, "-k", "2", "--json")
    assert r.returncode == 0 and [orjson.loads(x)["oov"] for x in r.stdout.splitlines()] == [["giraffe"]] * 2
    assert b"warning: not in the vocabulary: giraffe\n" in r.stderr
    corpus = tmp / "corpus.txt"
    corpus.write_text("a dog and a cat\n" + q + "\n" + "a boat near a kite\n")
    r = run_cli("search", "sentences", ds.images[-1].key, "-i", idx, "-c", corpus, "--json")
    assert r.returncode == 0, r.stderr.decode()
    assert orjson.loads(r.stdout.splitlines()[0])["sentence"] == q
    corpus.write_text("a dog and a zebra\n")
    r = run_cli("search", "sentences", ds.images[-1].key, "-i", idx, "-c", corpus, "--json")
    assert orjson.loads(r.stdout)["oov"] == ["zebra"] and b"(line 1): not in the vocabulary: zebra" in r.stderr
    # an index is tied to its model
    from vsa.alignment.train import configs, train

    other = tmp / "b.pt"
    train(*configs(hidden=32, embed=16, epochs=1, min_count=1, seed=3), ds, feats, other, info=lambda *a: None)
    r = run_cli("search", "text", q, "-i", idx, "-m", other)
    assert r.returncode == 2 and b"another model" in r.stderr


# ----------------------------------------------------------------------------- real photos


@pytest.fixture(scope="module")
def shipped():
    from vsa.alignment.model import ASSET

    if not ASSET.exists():
        pytest.skip("the shipped aligner vsa/assets/align-flickr8k.pt is not built yet")
    return ASSET


# a Flickr8K test image of two dogs in the snow, and a caption of another test image
PHOTO = "3385593926_d3e9c21170.jpg"
GOOD = "two dogs play in the snow in front of a fence"
BAD = "a man and a woman in festive costumes dancing"


@pytest.mark.slow
def test_score_real_photo(flickr8k, yolov5n, shipped):
    img = str(flickr8k / "images" / PHOTO)
    pairs = b"".join(orjson.dumps({"image": img, "sentence": s}) + b"\n" for s in (GOOD, BAD))
    r = run_cli("score", "--detector", yolov5n, input=pairs)
    assert r.returncode == 0, r.stderr.decode()
    good, bad = (orjson.loads(x) for x in r.stdout.splitlines())
    assert good["score"] > bad["score"]
    words = {w["word"]: w for w in good["words"]}
    # a box of an animal (or the whole photo): YOLOv5n boxes these two dogs twice, "horse" 0.67 and "dog" 0.44,
    # over the same pixels (IoU 0.84), and either is the right place for "dogs"
    assert words["dogs"]["label"] in ("dog", "horse", "image", "cat", "sheep", "bear")
    assert all(len(w["box"]) == 4 for w in good["words"])


@pytest.mark.slow
def test_search_real_photos(flickr8k, yolov5n, shipped, tmp_path):
    import json

    data = json.loads((flickr8k / "dataset_flickr8k.json").read_text())
    test = [im for im in data["images"] if im["split"] == "test"][:4]
    photos = [flickr8k / "images" / im["filename"] for im in test]
    idx = tmp_path / "idx.npz"
    r = run_cli("search", "index", *photos, "--detector", yolov5n, "-o", idx)
    assert r.returncode == 0, r.stderr.decode()
    hits_all = []
    for im in test:
        q = im["sentences"][0]["raw"]
        r = run_cli("search", "text", q, "-i", idx, "--json")
        assert r.returncode == 0, r.stderr.decode()
        hits = [orjson.loads(x) for x in r.stdout.splitlines()]
        assert len(hits) == 4
        hits_all.append(hits[0]["key"] == im["filename"])
    assert sum(hits_all) >= 3  # 4 photos: its own photo comes first for (nearly) every caption
    # re-ranked by the shipped generator, which reads each candidate photo file (its own CNN, no detector)
    from vsa.alignment.model import load_aligner
    from vsa.generator.captioner import DEFAULT_MODEL, Captioner
    from vsa.search import Index, rerank_text, search_text

    r = run_cli("search", "text", test[0]["sentences"][0]["raw"], "-i", idx, "--json", "--rerank", DEFAULT_MODEL)
    assert r.returncode == 0, r.stderr.decode()
    assert sorted(orjson.loads(x)["aligner_rank"] for x in r.stdout.splitlines()) == [1, 2, 3, 4]
    index, al, gen = Index(idx), load_aligner(None), Captioner.load(DEFAULT_MODEL, "cpu")
    own = 0
    for im in test:
        q = im["sentences"][0]["raw"]
        hits = rerank_text(search_text(al, index, q, 4), q, gen, None, k=4)
        assert sorted(h["aligner_rank"] for h in hits) == [1, 2, 3, 4] and all(h["logp"] < 0 for h in hits)
        own += hits[0]["key"] == im["filename"]
    assert own >= 3


def test_eval_hubness_bank_from_train_and_its_errors(synth, tmp_path):
    """`vsa eval --hubness`: the report's figures are the scores corrected with a bank of the first training images
    and their sentences (recomputed here from the model), `hubness.aligner` holds the plain figures."""
    from vsa.alignment.model import load_aligner, region_rows
    from vsa.features.store import load_features
    from vsa.retrieval import bank_means, debias, retrieval_metrics, score_matrix
    from vsa.splits import retrieval_split

    tmp, ds, feats, _, _ = synth
    base = ["eval", "--split", "test", "--dataset", tmp / "synthetic.json", "--model", tmp / "a.pt", "--features", feats]
    plain = orjson.loads(run_cli(*base, "--json").stdout)["retrieval"]
    r = run_cli(*base, "--json", "--hubness", "--hubness-k", "3", "--hubness-weight", "1", "--hubness-bank", "20")
    assert r.returncode == 0, r.stderr.decode()
    rep = orjson.loads(r.stdout)["retrieval"]
    assert rep["hubness"]["aligner"]["rsum"] == plain["rsum"]
    assert [rep["hubness"][k] for k in ("k", "weight", "bank", "bank_sentences")] == [3, 1.0, 20, 100]
    al, store = load_aligner(tmp / "a.pt"), load_features(feats)
    R = region_rows(al.cfg)
    ev = retrieval_split(ds, "test", store, al.vocab, R, al.cfg.max_len)
    bank = retrieval_split(ds, "train", store, al.vocab, R, al.cfg.max_len, limit=20)
    assert bank.keys == [r.key for r in ds.split("train")[:20]] and len(bank.ids) == 100
    m = al.model
    S = score_matrix(m, ev.feats, ev.rmask, ev.ids, ev.lengths)
    fixed = debias(S, bank_means(score_matrix(m, ev.feats, ev.rmask, bank.ids, bank.lengths), 3, 1),
                   bank_means(score_matrix(m, bank.feats, bank.rmask, ev.ids, ev.lengths), 3, 0), 1.0)
    want = retrieval_metrics(fixed, ev.sent_image.numpy())
    assert rep["rsum"] == want["rsum"] and rep["i2t"] == want["i2t"] and rep["t2i"] == want["t2i"]
    assert rep["rsum"] != plain["rsum"]
    table = run_cli(*base, "--hubness")
    text = " ".join(table.stdout.decode().split())
    assert table.returncode == 0 and "+ hubness" in text and "hubness-corrected (bank 80, k 50)" in text
    # one-line errors: a knob without --hubness; the train split as the evaluated one; features without the bank
    r = run_cli(*base, "--hubness-k", "5")
    assert r.returncode == 2 and b"need --hubness" in r.stderr
    r = run_cli(*base[:2], "train", *base[3:], "--hubness")
    assert r.returncode == 2 and b"evaluate val or test" in r.stderr
    from tests.synth_align import mirrored_copy

    f2 = mirrored_copy(feats, tmp_path / "no-train.npz", meta={}, drop=110)  # the test images only (no train, no val)
    assert run_cli(*base[:-1], f2, "--json").returncode == 0
    r = run_cli(*base[:-1], f2, "--hubness")
    assert r.returncode == 2 and b"training images in the features file" in r.stderr and len(r.stderr.splitlines()) == 1


def test_search_index_hubness_terms_rank_as_eval_search_does(synth, tmp_path):
    """`vsa train-align` keeps its first training images' sentences as a bank; `vsa search index` stores each photo's
    mean of its k best scores against them and `vsa search text` ranks by score - weight x that (the search direction
    of `vsa eval --hubness` with the same bank, k and weight); --no-hubness ranks by the aligner's score."""
    from vsa.alignment.model import load_aligner
    from vsa.retrieval import IndexHubnessConfig
    from vsa.search import Index, search_text

    tmp, ds, feats, _, _ = synth
    al = load_aligner(tmp / "a.pt")
    train = ds.split("train")[: IndexHubnessConfig.images]
    assert al.bank == [s.tokens for r in train for s in r.sentences] and len(al.bank) == 400
    idx_path = tmp_path / "idx.npz"
    r = run_cli("search", "index", "--features", feats, "--dataset", tmp / "synthetic.json", "--split", "test",
                "--model", tmp / "a.pt", "-o", idx_path)
    assert r.returncode == 0, r.stderr.decode()
    idx = Index(idx_path)
    cfg = IndexHubnessConfig()
    assert idx.store.hub.shape == (30,) and idx.meta["hubness"] == {"k": cfg.k, "weight": cfg.weight, "bank": 400}
    test = ds.split("test")
    top = {True: 0, False: 0}
    for rec in test:
        for s in rec.sentences:
            for hub in (True, False):
                top[hub] += search_text(al, idx, s.raw, 1, hubness=hub)[0]["key"] == rec.key
    base = ["eval", "--split", "test", "--dataset", tmp / "synthetic.json", "--model", tmp / "a.pt", "--features", feats,
            "--json"]
    ev = orjson.loads(run_cli(*base, "--hubness", "--hubness-bank", "200", "--hubness-k", str(cfg.k),
                              "--hubness-weight", str(cfg.weight)).stdout)["retrieval"]
    n = 5 * len(test)
    assert 100 * top[True] / n == pytest.approx(ev["t2i"]["r1"], abs=1.5)  # the index keeps float16 vectors
    assert 100 * top[False] / n == pytest.approx(ev["hubness"]["aligner"]["t2i"]["r1"], abs=1.5)
    q = test[0].sentences[0].raw
    hits = [orjson.loads(x) for x in run_cli("search", "text", q, "-i", idx_path, "--json", "-k", "30").stdout.splitlines()]
    assert all(h["score"] == pytest.approx(h["aligner_score"] - cfg.weight * h["hub"], abs=2e-4) for h in hits)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    plain = [orjson.loads(x) for x in run_cli("search", "text", q, "-i", idx_path, "--json", "-k", "30",
                                              "--no-hubness").stdout.splitlines()]
    assert "hub" not in plain[0] and [h["score"] for h in plain] == sorted((h["score"] for h in plain), reverse=True)
    assert sorted(h["score"] for h in plain) == sorted(h["aligner_score"] for h in hits)
    # an aligner without a bank (trained before banks, not re-exported): an index without terms, plain ranking
    from vsa.features.store import load_features
    from vsa.search import build_index, save_index

    al.bank = []
    save_index(tmp_path / "idx0.npz", al, build_index(al, None, store=load_features(feats), dataset=ds, split="test"))
    idx0 = Index(tmp_path / "idx0.npz")
    assert idx0.store.hub is None and "hubness" not in idx0.meta
    assert [h["key"] for h in search_text(al, idx0, q, 30)] == [h["key"] for h in plain]


def test_align_falls_back_on_the_shipped_grounding_aligner(synth, tmp_path, monkeypatch):
    """Without --model and vsa.toml, `vsa align` uses the aligner shipped for grounding (align-ground-flickr8k.pt),
    `vsa score` the retrieval default (align-flickr8k.pt)."""
    from vsa.assets import SHIPPED_MODELS

    tmp, _, feats, _, _ = synth
    monkeypatch.chdir(tmp_path)
    r = run_cli("align", "--dataset", tmp / "synthetic.json", "--features", feats, "-o", tmp_path / "a.jsonl")
    err = r.stderr.decode()
    assert f"using the shipped Flickr8k grounding aligner {SHIPPED_MODELS['align-ground']}" in err
    assert r.returncode == 2  # the synthetic features are not the aligner's (32-d): a one-line error
    r = run_cli("score", "img0110.jpg", "a dog", "--features", feats)
    assert f"using the shipped Flickr8k aligner {SHIPPED_MODELS['align']}" in r.stderr.decode()


def test_search_sentences_hubness_with_the_aligners_image_bank_ranks_as_eval_annotation_does(synth, tmp_path):
    """`vsa train-align` keeps the region vectors of its first training images (its image bank); `vsa search
    sentences` ranks a corpus by score - weight x each sentence's mean of its k best scores against them: the
    annotation direction of `vsa eval --hubness` with the same images, k and weight (each image's row of that matrix
    differs from it by the image's own term, a constant); --no-hubness: the score alone."""
    import numpy as np
    import torch

    from vsa.alignment.model import export_aligner, load_aligner, region_rows
    from vsa.alignment.evaluate import hub_correct
    from vsa.features.store import load_features
    from vsa.retrieval import HubnessConfig, SentenceHubnessConfig, score_matrix
    from vsa.search import photo_from_store, search_sentences
    from vsa.splits import retrieval_split

    tmp, ds, feats, _, _ = synth
    al = load_aligner(tmp / "a.pt")
    store = load_features(feats)
    train = ds.split("train")
    V, reg_img = al.image_bank
    assert len(train) < SentenceHubnessConfig.images and int(reg_img[-1]) + 1 == len(train)
    first = al.image_vectors(photo_from_store(store, train[0].key).feats, full=True)
    assert np.allclose(V[reg_img == 0].numpy(), first, atol=2e-3)  # float16 in the checkpoint
    cfg = SentenceHubnessConfig()
    data = retrieval_split(ds, "test", store, al.vocab, region_rows(al.cfg), al.cfg.max_len)
    raw = score_matrix(al.model, data.feats, data.rmask, data.ids, data.lengths)
    fixed = hub_correct(al, raw, data, ds, "test", store, HubnessConfig(k=cfg.k, weight=cfg.weight, bank=cfg.images))
    corpus = [s.raw for r in ds.split("test") for s in r.sentences]
    for i, key in enumerate(data.keys[:5]):
        photo = photo_from_store(store, key)
        hits = sorted(search_sentences(al, photo, corpus, len(corpus)), key=lambda h: h["line"])
        ours = np.array([h["score"] for h in hits])
        assert np.ptp(ours - fixed[i]) < 2e-3 and np.ptp(fixed[i]) > 0.1
        assert all(h["score"] == pytest.approx(h["aligner_score"] - cfg.weight * h["hub"], abs=2e-4) for h in hits)
        plain = sorted(search_sentences(al, photo, corpus, len(corpus), hubness=False), key=lambda h: h["line"])
        assert "hub" not in plain[0] and np.allclose([h["score"] for h in plain], raw[i], atol=2e-4)
    ranked = search_sentences(al, photo, corpus, 10)
    assert [h["score"] for h in ranked] == sorted((h["score"] for h in ranked), reverse=True)
    # the export keeps the bank; one trained before banks gets it from --bank DATASET --image-bank FEATURES
    ckpt = torch.load(tmp / "a.pt", weights_only=True)
    del ckpt["meta"]["image_bank"]
    torch.save(ckpt, tmp_path / "old.pt")
    assert load_aligner(tmp_path / "old.pt").image_bank is None
    export_aligner(tmp_path / "old.pt", tmp_path / "new.pt", bank=tmp / "synthetic.json", image_bank_features=feats)
    Vn, regn = load_aligner(tmp_path / "new.pt").image_bank
    assert torch.equal(regn, reg_img) and torch.allclose(Vn, V, atol=2e-3)


# ----------------------------------------------------------------------------- the tables people read


def test_region_names_say_which_box_or_which_cell():
    from vsa.search import region_name, region_names, words_by_region

    labels = ["image", "dog", "person", "dog"] + ["cell"] * 9
    names = region_names(labels)
    assert names[:4] == ["whole image", "dog #1", "person #2", "dog #3"]
    assert names[4:] == [f"{p} cell" for p in ("top-left", "top", "top-right", "left", "centre", "right",
                                               "bottom-left", "bottom", "bottom-right")]
    grid = region_names(["image"] + ["grid"] * 49)
    assert grid[1] == "grid row 1, col 1" and grid[12] == "grid row 2, col 5" and grid[49] == "grid row 7, col 7"
    assert region_names(["image", "cell", "cell"])[1:] == ["cell 1", "cell 2"]  # not a square: counted
    words = [{"word": "a", "region": 1}, {"word": "dog", "region": 1}, {"word": "runs", "region": 0},
             {"word": "on", "region": 12}, {"word": "grass", "region": 12}]
    assert words_by_region(words, names) == "a dog -> dog #1; runs -> whole image; on grass -> bottom-right cell"
    assert region_name("image", 0) == "whole image" and region_name("kite", 4) == "kite #4"


def test_score_table_names_each_words_region(synth):
    from tests.synth_align import WORDS

    tmp, ds, feats, objs, _ = synth
    rec, o = ds.images[-1], objs[-1]
    r = run_cli("score", rec.key, f"a {WORDS[o[0]]} and a {WORDS[o[1]]}", "-m", tmp / "a.pt", "-f", feats)
    assert r.returncode == 0, r.stderr.decode()
    out = r.stdout.decode()
    assert out.splitlines()[0].startswith(f"{rec.key}: score ")
    # the object words on their boxes, by class and rank among the photo's boxes (region 0 is the whole image)
    for k in (0, 1):
        assert f"{WORDS[o[k]]} #" in out


@pytest.mark.slow
def test_search_table_shows_whole_file_names_and_named_regions(flickr8k, yolov5n, shipped, tmp_path):
    """`vsa search text` for people: every photo's file name whole (long folders too), each run of words with
    its region by name (a box by class and rank, the whole image, a cell by its place), never a bare `cell`;
    --json as it was."""
    import json
    import re
    import shutil

    data = json.loads((flickr8k / "dataset_flickr8k.json").read_text())
    test = [im for im in data["images"] if im["split"] == "test"][:3]
    folder = tmp_path / "holiday photos from the summer of two thousand and twenty four"
    folder.mkdir()
    for im in test:
        shutil.copy(flickr8k / "images" / im["filename"], folder / im["filename"])
    idx = tmp_path / "idx.npz"
    r = run_cli("search", "index", folder, "--detector", yolov5n, "-o", idx)
    assert r.returncode == 0, r.stderr.decode()
    q = "a dog runs through the grass"
    r = run_cli("search", "text", q, "-i", idx)
    assert r.returncode == 0, r.stderr.decode()
    out = r.stdout.decode()
    rows = [ln for ln in out.splitlines() if str(folder) in ln]
    assert len(rows) == 3 and "\u2026" not in out  # one line per photo, nothing cut short
    for im in test:
        assert str(folder / im["filename"]) in out
    runs = [part for ln in rows for part in ln.split("\u2502")[-2].strip().split("; ")]
    assert runs and all(" -> " in part for part in runs)
    named = re.compile(r"^(whole image|\S.* #\d+|(top-left|top|top-right|left|centre|right|bottom-left|bottom|"
                       r"bottom-right) cell)$")
    assert all(named.match(part.split(" -> ")[1]) for part in runs), runs
    hits = [orjson.loads(x) for x in run_cli("search", "text", q, "-i", idx, "--json").stdout.splitlines()]
    assert set(hits[0]) == {"rank", "key", "path", "score", "oov", "read_as", "aligner_score", "hub", "words"}
    assert set(hits[0]["words"][0]) == {"word", "region", "label", "box"}


def test_score_without_a_photo_on_a_terminal_names_both_ways_in(monkeypatch):
    """No IMAGE SENTENCE and stdin a terminal (the rule of cli.common, as regions and caption read it): a one-line
    error, not a wait for typing."""
    import vsa.cli.common as common

    monkeypatch.setattr(common, "stdin_is_terminal", lambda: True)
    r = run_cli("score")
    assert (r.returncode, r.stdout) == (2, b"")
    assert r.stderr.decode().splitlines()[-1] == ('vsa: error: no photo given: pass IMAGE SENTENCE, or pipe JSONL '
                                                  '{"image": ..., "sentence": ...} on stdin')
