"""Robustness: bad text and data files give one clear line (file, line, reason) and exit 2,
or a documented handling (docs/robustness.md)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_cli
from vsa.data import ImageRecord, load_dataset
from vsa.errors import VsaError
from vsa.features.store import FeatureStore
from vsa.io import iter_jsonl, load_npz, read_json, read_jsonl


def assert_one_line_error(proc, *needles: str) -> str:
    """rc 2 and stderr is exactly one line `vsa: error: ...` containing every needle."""
    err = proc.stderr.decode("utf-8")
    assert proc.returncode == 2, (proc.returncode, err)
    lines = err.rstrip("\n").split("\n")
    assert len(lines) == 1, err
    assert lines[0].startswith("vsa: error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert proc.stdout == b""
    return lines[0]


def stats(*args, cwd=None):
    return run_cli("data", "stats", *map(str, args), "--json", cwd=cwd)


def karpathy(tmp_path: Path, images: list, name: str = "dataset_x.json") -> Path:
    p = tmp_path / name
    p.write_text(json.dumps({"dataset": "x", "images": images}, ensure_ascii=False), encoding="utf-8")
    return p


def img(fn: str, split: str | None = "train", sents=("A dog runs .",)) -> dict:
    d = {"filename": fn, "sentences": [{"raw": s} for s in sents]}
    if split is not None:
        d["split"] = split
    return d


# ----------------------------------------------------------------------------- the four acceptance cases


def test_missing_file(tmp_path):
    assert_one_line_error(stats(tmp_path / "nope.json"), "nope.json", "no such file")


def test_json_syntax_error_names_file_and_line(tmp_path):
    p = tmp_path / "dataset_bad.json"
    p.write_text('{"images": [\n  {"filename": "a.jpg",\n   "split": "train" "sentences": []}\n]}\n')
    line = assert_one_line_error(stats(p), "dataset_bad.json:3:", "invalid JSON")
    assert str(p) in line


def test_record_without_sentences(tmp_path):
    p = karpathy(tmp_path, [img("a.jpg"), {"filename": "b.jpg", "split": "train"}])
    assert_one_line_error(stats(p), "dataset_x.json", "image 1 (b.jpg) has no 'sentences' list")


def test_unknown_split_name(tmp_path):
    p = karpathy(tmp_path, [img("a.jpg"), img("b.jpg", split="training")])
    assert_one_line_error(stats(p), "dataset_x.json", "unknown split 'training'", "b.jpg", "train, val, test, restval")


# ----------------------------------------------------------------------------- JSON / JSONL files


def test_malformed_jsonl_line_reports_line_number(tmp_path):
    p = tmp_path / "mine.jsonl"
    p.write_text('{"filename": "a.jpg", "split": "train", "sentences": ["a dog"]}\n\n{"filename": "b.jpg", \n')
    assert_one_line_error(stats(p), "mine.jsonl:3:", "invalid JSON line")


def test_jsonl_line_that_is_not_an_object(tmp_path):
    p = tmp_path / "mine.jsonl"
    p.write_text('{"filename": "a.jpg", "split": "train", "sentences": ["a dog"]}\n["b.jpg"]\n')
    assert_one_line_error(stats(p), "mine.jsonl:2:", "expected a JSON object")


def test_jsonl_record_errors_carry_the_line(tmp_path):
    p = tmp_path / "mine.jsonl"
    p.write_text('{"filename": "a.jpg", "split": "train", "sentences": ["a dog"]}\n'
                 '{"filename": "b.jpg", "split": "train", "sentences": [{"sentid": 3}]}\n')
    assert_one_line_error(stats(p), "mine.jsonl:2:", "sentence 0 has neither 'raw' text nor a 'tokens' list")


def test_iter_jsonl_skip_bad_warns_with_line_numbers(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_bytes(b'{"a": 1}\nnot json\n{"a": 2}\n[1]\n\xff\xfe\n{"a": 3}\n')
    warnings: list[str] = []
    got = list(iter_jsonl(p, skip_bad=True, warn=warnings.append))
    assert got == [{"a": 1}, {"a": 2}, {"a": 3}]
    assert [w.split(": ")[0] for w in warnings] == [f"{p}:2", f"{p}:4", f"{p}:5"]
    with pytest.raises(VsaError, match=r"r\.jsonl:2: invalid JSON line"):
        list(iter_jsonl(p))


def test_empty_json_file(tmp_path):
    p = tmp_path / "dataset_empty.json"
    p.write_text("")
    assert_one_line_error(stats(p), "dataset_empty.json", "invalid JSON")


def test_json_that_is_not_a_karpathy_file(tmp_path):
    p = tmp_path / "dataset_list.json"
    p.write_text('[{"filename": "a.jpg"}]')
    assert_one_line_error(stats(p), "dataset_list.json", "not a Karpathy split file")


def test_utf8_bom_is_accepted(tmp_path):
    p = tmp_path / "dataset_bom.json"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps({"images": [img("a.jpg")]}).encode())
    assert read_json(p)["images"][0]["filename"] == "a.jpg"
    r = stats(p)
    assert r.returncode == 0, r.stderr.decode()


def test_duplicate_image(tmp_path):
    p = karpathy(tmp_path, [img("a.jpg"), img("b.jpg"), img("a.jpg", split="test")])
    assert_one_line_error(stats(p), "dataset_x.json", "image 2 (a.jpg)", "listed twice")


def test_folder_without_a_dataset(tmp_path):
    assert_one_line_error(stats(tmp_path), str(tmp_path), "no dataset found in folder")


def test_missing_split_lists_folder(tmp_path):
    p = karpathy(tmp_path, [img("a.jpg")])
    assert_one_line_error(stats(p, "--splits", tmp_path / "lists"), "lists", "no such folder")


# ----------------------------------------------------------------------------- splits


def test_dataset_json_without_splits_gets_a_seeded_split_with_a_warning(tmp_path):
    p = karpathy(tmp_path, [img(f"{i}.jpg", split=None) for i in range(10)])
    r = stats(p)
    assert r.returncode == 0, r.stderr.decode()
    st = json.loads(r.stdout)
    assert [st["splits"][s]["images"] for s in ("train", "val", "test")] == [6, 2, 2]
    err = r.stderr.decode()
    assert err.startswith("warning: ") and "seeded random split 6/2/2" in err and "--splits" in err


def test_dataset_json_without_splits_takes_split_lists(tmp_path):
    p = karpathy(tmp_path, [img(f"{i}.jpg", split=None) for i in range(4)])
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "my_train.txt").write_text("0.jpg\n1.jpg\n")
    (lists / "my_test.txt").write_text("2.jpg\n")
    ds = load_dataset(p, splits=lists)
    assert [(r.key, r.split) for r in ds.images] == [("0.jpg", "train"), ("1.jpg", "train"), ("2.jpg", "test")]
    assert ds.notes == [f"1 images are in no split list of {lists} and were left out"]


def test_some_images_without_split_is_an_error(tmp_path):
    p = karpathy(tmp_path, [img("a.jpg"), img("b.jpg", split=None)])
    assert_one_line_error(stats(p), "dataset_x.json", "image 1 (b.jpg) has no 'split' while other images have one")


def test_token_file_without_split_lists(tmp_path):
    (tmp_path / "Flickr8k.token.txt").write_text("a.jpg#0\tA dog .\n")
    assert_one_line_error(stats(tmp_path), "Flickr8k.token.txt", "no split lists found", "--splits")


# ----------------------------------------------------------------------------- sentences


def test_empty_sentences_are_dropped_and_reported(tmp_path):
    p = karpathy(tmp_path, [img("a.jpg", sents=("A dog runs .", "", " . ! ", "A cat .")),
                            img("b.jpg", sents=("", "?"))])
    r = stats(p, "--min-count", "1")
    assert r.returncode == 0, r.stderr.decode()
    st = json.loads(r.stdout)
    assert st["splits"]["train"]["sentences"] == 2
    assert st["splits"]["train"]["images"] == 2 and st["splits"]["train"]["images_without_sentences"] == 1
    assert st["splits"]["train"]["length_min"] == 2
    assert "4 of 6 sentences have no words and were dropped" in r.stderr.decode()


def test_empty_captions_in_kaggle_file(tmp_path):
    (tmp_path / "captions.txt").write_text('image,caption\na.jpg,A dog .\na.jpg,""\na.jpg,\n')
    ds = load_dataset(tmp_path)
    assert [s.raw for s in ds.images[0].sentences] == ["A dog ."]
    assert ds.notes[-1] == "2 of 3 sentences have no words and were dropped"


def test_sentence_of_unknown_words_only(tmp_path):
    from vsa.data import build_vocab

    p = karpathy(tmp_path, [img("a.jpg", sents=("a dog runs",) * 5), img("b.jpg", split="test", sents=("zyx qwv",))])
    ds = load_dataset(p)
    v = build_vocab(ds, 5)
    sent = ds.split("test")[0].sentences[0]
    assert sent.tokens == ["zyx", "qwv"]  # kept: it is a real sentence, its words are just not in the vocabulary
    assert v.encode(sent.tokens) == [v.unk, v.unk]


def test_very_long_sentence_is_kept_whole(tmp_path):
    long = " ".join(["dog"] * 5000) + " ."
    p = karpathy(tmp_path, [img("a.jpg", sents=(long, "a cat"))])
    r = stats(p)
    assert r.returncode == 0, r.stderr.decode()
    assert json.loads(r.stdout)["splits"]["train"]["length_max"] == 5000


def test_non_ascii_text(tmp_path):
    p = karpathy(tmp_path, [img("caf\u00e9.jpg", sents=("Ein M\u00e4dchen l\u00e4uft \u00fcber die Stra\u00dfe .",
                                                      "\u72ac\u304c \u8d70\u308b", "Cafe\u0301 cr\u00e8me"))])
    r = stats(p, "--min-count", "1")
    assert r.returncode == 0, r.stderr.decode()
    st = json.loads(r.stdout.decode("utf-8"))
    assert st["vocab_size"] == 10  # ein mädchen läuft über die straße, 犬が 走る, café crème
    ds = load_dataset(p)
    assert ds.images[0].key == "caf\u00e9.jpg"
    assert ds.images[0].sentences[2].tokens == ["caf\u00e9", "cr\u00e8me"]
    # convert keeps the text byte-exact
    out = tmp_path / "out.json"
    assert run_cli("data", "convert", p, "-o", out).returncode == 0
    assert json.loads(out.read_bytes())["images"][0]["sentences"][1]["raw"] == "\u72ac\u304c \u8d70\u308b"


# ----------------------------------------------------------------------------- text layouts


def test_invalid_utf8_in_captions_txt(tmp_path):
    (tmp_path / "captions.txt").write_bytes(b"image,caption\na.jpg,A dog .\nb.jpg,A caf\xe9 .\n")
    assert_one_line_error(stats(tmp_path), "captions.txt:3:", "not valid UTF-8 (byte 0xe9)")


def test_captions_txt_row_without_caption(tmp_path):
    (tmp_path / "captions.txt").write_text("image,caption\na.jpg,A dog .\nb.jpg\n")
    assert_one_line_error(stats(tmp_path), "captions.txt:3:", "expected CSV 'image,caption'")


def test_malformed_token_file_line(tmp_path):
    (tmp_path / "Flickr8k.token.txt").write_text("a.jpg#0\tA dog .\na.jpg A cat without a tab\n")
    assert_one_line_error(stats(tmp_path), "Flickr8k.token.txt:2:", "expected '<image>.jpg#<n><TAB><caption>'")


def test_bad_coco_annotation_file(tmp_path):
    p = tmp_path / "captions_val2014.json"
    p.write_text('{"images": [{"id": 1, "file_name": "x.jpg"}], "annotations": [{"image_id": 1, "id": 1, "bbox": [0, 0, 1, 1]}]}')
    assert_one_line_error(stats(p), "captions_val2014.json", "no caption annotations")
    p.write_text("{not json")
    assert_one_line_error(stats(p), "captions_val2014.json", "not a COCO annotation file")


# ----------------------------------------------------------------------------- NPZ features


def features(n_regions=(3, 2, 4), dim=8) -> dict:
    R = sum(n_regions)
    return {
        "feats": np.arange(R * dim, dtype=np.float32).reshape(R, dim),
        "offsets": np.concatenate([[0], np.cumsum(n_regions)]).astype(np.int64),
        "keys": np.array([f"{i}.jpg" for i in range(len(n_regions))]),
        "boxes": np.zeros((R, 4), np.float32),
        "labels": np.array(["image"] * R),
        "scores": np.ones(R, np.float32),
        "meta": np.array(json.dumps({"extractor": "test", "dim": dim})),
    }


def save(tmp_path, arrays, name="f.npz"):
    p = tmp_path / name
    np.savez(p, **arrays)
    return p


def test_npz_missing_keys(tmp_path):
    a = features()
    del a["offsets"]
    with pytest.raises(VsaError, match=r"f\.npz: missing key\(s\) offsets \(has: .*feats.*\)"):
        FeatureStore(save(tmp_path, a))
    with pytest.raises(VsaError, match="missing key"):
        FeatureStore(save(tmp_path, a), mmap=False)


@pytest.mark.parametrize("mmap", [True, False])
@pytest.mark.parametrize("change,message", [
    (lambda a: a.update(offsets=a["offsets"][:-1]), r"'offsets' has shape \(3,\), expected \(4,\) for 3 keys"),
    (lambda a: a.update(feats=a["feats"][:-1]), "'offsets' ends at 9 but 'feats' has 8 rows"),
    (lambda a: a.update(labels=a["labels"][:-2]), "'labels' has 7 rows but 'feats' has 9"),
    (lambda a: a.update(boxes=a["boxes"][:3]), "'boxes' has 3 rows but 'feats' has 9"),
    (lambda a: a.update(offsets=np.array([0, 3, 3, 9])), "every image needs at least one region"),
    (lambda a: a.update(meta=np.array("{not json")), "'meta' is not valid JSON"),
])
def test_npz_mismatched_lengths(tmp_path, change, message, mmap):
    a = features()
    change(a)
    with pytest.raises(VsaError, match=message) as e:
        FeatureStore(save(tmp_path, a), mmap=mmap)
    assert "\n" not in str(e.value) and str(tmp_path / "f.npz") in str(e.value)


def test_npz_that_is_not_an_npz(tmp_path):
    p = tmp_path / "f.npz"
    p.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(VsaError, match="not a readable NPZ file"):
        FeatureStore(p)
    with pytest.raises(VsaError, match="no such file"):
        FeatureStore(tmp_path / "missing.npz")


def test_npz_with_pickled_objects_is_refused(tmp_path):
    a = features()
    a["keys"] = np.array(["0.jpg", "1.jpg", "2.jpg"], dtype=object)  # would need pickle to load
    p = save(tmp_path, a)
    with pytest.raises(VsaError, match="not a readable NPZ file.*allow_pickle=False"):
        load_npz(p)
    with pytest.raises(VsaError, match="not a readable NPZ file"):
        FeatureStore(p)


def test_image_in_dataset_but_not_in_features(tmp_path):
    fs = FeatureStore(save(tmp_path, features()))
    recs = [ImageRecord("0.jpg", "train", 0), ImageRecord("sub/2.jpg", "train", 1), ImageRecord("9.jpg", "train", 2)]
    with pytest.raises(VsaError, match=r"1 dataset image\(s\) have no features, e.g. '9.jpg' .*--skip-missing"):
        fs.check_dataset(recs)
    warned: list[str] = []
    kept = fs.check_dataset(recs, skip_missing=True, warn=warned.append)
    assert [r.key for r in kept] == ["0.jpg", "sub/2.jpg"]  # joined by file name when the key has a folder
    assert len(warned) == 1 and "'9.jpg'" in warned[0]
    with pytest.raises(VsaError, match="'9.jpg' is not in the features file"):
        fs["9.jpg"]


@pytest.mark.parametrize("mmap", [True, False])
@pytest.mark.parametrize("change,message", [
    (lambda a: a.update(feats=a["feats"][:, 0].copy()), r"'feats' has shape \(9,\)"),  # 1-D
    (lambda a: a.update(feats=a["feats"].reshape(9, 2, 4)), r"'feats' has shape \(9, 2, 4\)"),  # 3-D
    (lambda a: a.update(feats=np.zeros((9, 0), np.float32)), r"'feats' has shape \(9, 0\)"),  # no dimensions
    (lambda a: a.update(meta=np.array(json.dumps([1, 2]))), "'meta' must be a JSON object of settings, got list"),
    (lambda a: a.update(meta=np.array(json.dumps("settings"))), "'meta' must be a JSON object of settings, got str"),
])
def test_npz_feats_of_the_wrong_shape_and_meta_not_an_object(tmp_path, change, message, mmap):
    a = features()
    change(a)
    with pytest.raises(VsaError, match=message) as e:
        FeatureStore(save(tmp_path, a), mmap=mmap)
    assert "\n" not in str(e.value) and str(e.value).startswith(str(tmp_path / "f.npz") + ": ")


# ----------------------------------------------------------------------------- file names that are not UTF-8


def test_non_utf8_file_names_round_trip_through_json_and_jsonl(tmp_path):
    """A file name that is not valid UTF-8 (a Latin-1 'café' on a Linux disk) reaches vsa as os.fsdecode gives it,
    with surrogate escapes: every JSON writer keeps it (as \\udcXX escapes, the file stays valid UTF-8) and every
    reader gives the same string back, so os.fsencode gives the original bytes."""
    import os

    from vsa.io import JsonlWriter, write_json, write_jsonl

    raw = b"photos/caf\xe9 \xff.jpg"
    name = os.fsdecode(raw)
    rec = {"key": Path(name).name, "path": name, "score": np.float32(0.5), "box": np.arange(4), "text": "Café 😀",
           name: 1}
    p = tmp_path / "r.jsonl"
    write_jsonl(p, [rec, {"key": "plain.jpg"}])
    data = p.read_bytes()
    data.decode("utf-8")  # strict: still UTF-8
    assert b"\\udce9" in data and b"\\udcff" in data
    back = read_jsonl(p)
    assert os.fsencode(back[0]["path"]) == raw and back[0]["key"] == "caf\udce9 \udcff.jpg"
    assert back[0]["score"] == 0.5 and back[0]["box"] == [0, 1, 2, 3] and back[0]["text"] == "Café 😀"
    assert back[0][name] == 1 and back[1] == {"key": "plain.jpg"}
    assert json.loads(data.splitlines()[0]) == back[0]  # Python's json reads it the same
    write_json(tmp_path / "r.json", [rec], indent=True)
    assert os.fsencode(read_json(tmp_path / "r.json")[0]["path"]) == raw
    with JsonlWriter(tmp_path / "w.jsonl") as w:
        w.write({"path": name})
    assert os.fsencode(next(iter_jsonl(tmp_path / "w.jsonl"))["path"]) == raw
    # a line that is bad for another reason is still a one-line error with its line number
    (tmp_path / "bad.jsonl").write_bytes(b'{"key": "a\\udce9"}\n{"key": "\\udce9" oops}\n')
    with pytest.raises(VsaError, match=r"bad\.jsonl:2: invalid JSON line"):
        read_jsonl(tmp_path / "bad.jsonl")
    from vsa.io import dumps, loads

    assert loads(dumps(rec))["path"] == name


def test_regions_keeps_a_non_utf8_file_name(tmp_path, yolov5n):
    import os
    import shutil

    from tests.conftest import FLICKR8K

    src = next((FLICKR8K / "images").glob("*.jpg"), None) if (FLICKR8K / "images").exists() else None
    if src is None:
        pytest.skip("Flickr8K images not found")
    folder = tmp_path / "imgs"
    folder.mkdir()
    shutil.copy(src, os.path.join(os.fsencode(folder), b"caf\xe9.jpg"))
    out = tmp_path / "r.jsonl"
    r = run_cli("regions", folder, "--detector", yolov5n, "-o", out)
    assert r.returncode == 0, r.stderr.decode()
    rec = read_jsonl(out)[0]
    assert os.fsencode(rec["key"]) == b"caf\xe9.jpg" and os.path.exists(rec["path"])


def test_show_pages_keep_a_non_utf8_file_name(tmp_path):
    """`vsa show` of captions whose image has a Latin-1 name: the PNG and the page are written (the name shown as
    its \\udcXX escapes), not a crash after every picture was drawn."""
    import os

    from PIL import Image

    from vsa.io import write_jsonl
    from vsa.pictures import show_pictures, write_retrieval_page

    raw = os.path.join(os.fsencode(tmp_path), b"caf\xe9.jpg")
    Image.new("RGB", (40, 30), "red").save(os.fsdecode(raw))
    caps = tmp_path / "captions.jsonl"
    write_jsonl(caps, [{"path": os.fsdecode(raw), "key": "caf\udce9.jpg", "caption": "a red wall"}])
    res = show_pictures(caps, tmp_path / "show")
    html = Path(res["page"]).read_bytes().decode("utf-8")
    assert res["pictures"] == 1 and "caf\\udce9.jpg" in html
    page = write_retrieval_page({"images": [{"key": "caf\udce9.jpg", "thumb": "thumbs/caf.jpg"}], "sentences": [],
                                 "i2t": [], "t2i": []}, tmp_path / "ret")
    assert "caf\\udce9.jpg" in page.read_bytes().decode("utf-8")


# ----------------------------------------------------------------------------- alignment records (`vsa align` output)


def alignment(**change) -> dict:
    rec = {"key": "0.jpg", "sentid": 7, "split": "train", "tokens": ["a", "dog", "runs"], "beta": 0.05,
           "snippets": [{"start": 0, "end": 2, "text": "a dog", "region": 1, "box": [0.0, 0.0, 5.0, 5.0],
                         "label": "dog", "score": 0.5},
                        {"start": 2, "end": 3, "text": "runs", "region": 0, "box": [0, 0, 10, 10], "label": "image",
                         "score": 0.1}]}
    rec.update(change)
    return rec


def bad_snippet(**change) -> dict:
    rec = alignment()
    rec["snippets"][0].update(change)
    return rec


BAD_ALIGNMENTS = [
    ({k: v for k, v in alignment().items() if k != "sentid"}, "not an alignment record: no 'sentid'"),
    (alignment(sentid="7"), "'sentid' must be a whole number, got '7'"),
    (alignment(key=5), "'key' must be a non-empty string"),
    (alignment(tokens="a dog runs"), "'tokens' must be a list of strings"),
    (alignment(snippets={"start": 0}), "'snippets' must be a list"),
    (alignment(beta="high"), "'beta' must be a number"),
    (bad_snippet(region="two"), "snippet 1: 'region' must be a whole number >= 0, got 'two'"),
    (bad_snippet(region=1.5), "snippet 1: 'region' must be a whole number >= 0, got 1.5"),
    (bad_snippet(region=-1), "snippet 1: 'region' must be a whole number >= 0, got -1"),
    (bad_snippet(box=["a", 0, 1, 2]), "snippet 1: 'box' must be 4 numbers"),
    (bad_snippet(box=[0, 1, 2]), "snippet 1: 'box' must be 4 numbers"),
    (bad_snippet(end=9), r"snippet 1: 'start' and 'end' must be whole numbers with 0 <= start < end <= 3"),
    (bad_snippet(start="0"), r"snippet 1: 'start' and 'end' must be whole numbers"),
    (bad_snippet(score="high"), "snippet 1: 'score' must be a number"),
]


@pytest.mark.parametrize("bad,message", BAD_ALIGNMENTS)
def test_malformed_alignment_record_names_file_line_and_field(tmp_path, bad, message):
    """`train-mrnn --alignments` reads `vsa align` output: a malformed line is one error naming file, line and field."""
    from vsa.data import Vocab
    from vsa.splits import snippet_split

    p = tmp_path / "al.jsonl"
    p.write_text(json.dumps(alignment()) + "\n" + json.dumps(bad) + "\n")
    store = FeatureStore(save(tmp_path, features()))
    good = snippet_split(read_jsonl(p)[:1], store, "train", Vocab(["a", "dog", "runs"]), 20, p)
    assert len(good.sents) == 2
    with pytest.raises(VsaError, match=message) as e:
        snippet_split(read_jsonl(p), store, "train", Vocab(["a", "dog", "runs"]), 20, p)
    assert str(e.value).startswith(f"{p}:2: ") and "\n" not in str(e.value)


@pytest.mark.parametrize("bad,message", BAD_ALIGNMENTS[1:8])
def test_align_resume_redoes_malformed_part_records(tmp_path, bad, message):
    """`vsa align`'s resume reads its own part file: a line that is not a whole record is redone, not trusted."""
    from vsa.alignment.snippets import read_part

    part = tmp_path / "al.jsonl.part"
    part.write_text(json.dumps(alignment()) + "\n" + json.dumps(bad) + "\n")
    kept = read_part(part, 0.05)
    assert kept == [alignment()]
    assert part.read_text().count("\n") == 1  # rewritten without the bad line
