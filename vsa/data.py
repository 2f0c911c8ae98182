"""Caption datasets: one in-memory representation, four on-disk layouts.

Layouts read by :func:`load_dataset` (detected from the path):

(a) Karpathy split JSON (``dataset_flickr8k.json``, ``dataset_flickr30k.json``,
    ``dataset_coco.json``; COCO adds ``filepath`` and the ``restval`` split).
(b) The official Flickr8k text files: ``Flickr8k.token.txt`` plus
    ``Flickr_8k.{train,dev,test}Images.txt`` (images listed in no split file are dropped,
    as in every published split; images in ``Flicker8k_Dataset/``).
(c) The Kaggle layout: ``captions.txt`` (CSV ``image,caption``) plus ``Images/``; split
    by the official list files when present (or ``splits=``), else a seeded
    1000/1000 val/test split with the rest in train.
(d) COCO caption annotations (``captions_train2014.json`` style, read with pycocotools)
    plus Karpathy split lists (text files ``*train*.txt``, ``*val*.txt``, ``*test*.txt``,
    ``*restval*.txt`` holding file names or image ids, one per line).

Tokenization follows the paper: lowercase, split on white space, strip every
non-alphanumeric character from each token, drop empty tokens.
"""

from __future__ import annotations

import csv
import io
import random
import re
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from vsa.errors import VsaError

SPLITS = ("train", "val", "test", "restval")
PAD, UNK, START, END = "<pad>", "<unk>", "<start>", "<end>"
SPECIALS = (PAD, UNK, START, END)

_STRIP = re.compile(r"[^\w]|_", re.UNICODE)


def tokenize(text: str) -> list[str]:
    """Paper tokenization: lowercase, split on spaces, strip punctuation inside tokens."""
    out = []
    for tok in text.lower().split():
        tok = _STRIP.sub("", tok)
        if tok:
            out.append(tok)
    return out


@dataclass
class Sentence:
    raw: str
    tokens: list[str]
    sentid: int


@dataclass
class ImageRecord:
    key: str  # path relative to the image root (file name, or filepath/filename for COCO)
    split: str
    imgid: int
    sentences: list[Sentence] = field(default_factory=list)
    cocoid: int | None = None


@dataclass
class CaptionDataset:
    name: str
    images: list[ImageRecord]
    image_root: Path | None = None
    source: Path | None = None
    layout: str = ""

    def split(self, name: str) -> list[ImageRecord]:
        if name == "train+restval":
            return [r for r in self.images if r.split in ("train", "restval")]
        return [r for r in self.images if r.split == name]

    def image_path(self, rec: ImageRecord) -> Path:
        root = self.image_root if self.image_root is not None else Path(".")
        return root / rec.key

    def sentences(self, split: str | None = None) -> Iterable[tuple[ImageRecord, Sentence]]:
        for rec in self.images if split is None else self.split(split):
            for s in rec.sentences:
                yield rec, s

    def to_karpathy(self) -> dict:
        images = []
        for rec in self.images:
            d: dict = {}
            fp, _, fn = rec.key.rpartition("/")
            if fp:
                d["filepath"] = fp
            d["filename"] = fn
            d["imgid"] = rec.imgid
            d["split"] = rec.split
            if rec.cocoid is not None:
                d["cocoid"] = rec.cocoid
            d["sentids"] = [s.sentid for s in rec.sentences]
            d["sentences"] = [
                {"tokens": s.tokens, "raw": s.raw, "imgid": rec.imgid, "sentid": s.sentid} for s in rec.sentences
            ]
            images.append(d)
        return {"dataset": self.name, "images": images}


# ----------------------------------------------------------------------------- vocabulary


class Vocab:
    """Word <-> index map. Index 0..3 are ``<pad> <unk> <start> <end>``; then words by frequency."""

    def __init__(self, words: Iterable[str]):
        words = [w for w in words if w not in SPECIALS]
        self.itos: list[str] = list(SPECIALS) + words
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(self.itos)}

    pad, unk, start, end = 0, 1, 2, 3

    @property
    def words(self) -> list[str]:
        """The vocabulary proper (no special tokens); this is what checkpoints store."""
        return self.itos[len(SPECIALS):]

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, tokens: Iterable[str]) -> list[int]:
        return [self.stoi.get(t, self.unk) for t in tokens]

    def decode(self, ids: Iterable[int], stop_at_end: bool = True) -> list[str]:
        out = []
        for i in ids:
            i = int(i)
            if i == self.end and stop_at_end:
                break
            if i in (self.pad, self.start, self.end):
                continue
            out.append(self.itos[i] if 0 <= i < len(self.itos) else UNK)
        return out


def word_counts(ds: CaptionDataset, split: str = "train") -> Counter:
    c: Counter = Counter()
    for _, s in ds.sentences(split):
        c.update(s.tokens)
    return c


def build_vocab(ds: CaptionDataset, min_count: int = 5, split: str = "train") -> Vocab:
    """Words seen at least ``min_count`` times in ``split``, most frequent first (ties by word)."""
    counts = word_counts(ds, split)
    words = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
    return Vocab(words)


# ----------------------------------------------------------------------------- loaders


def _check_split(split, path, where: str) -> str:
    if split not in SPLITS:
        raise VsaError(f"unknown split {split!r} for {where} (expected one of {', '.join(SPLITS)})", path)
    return split


def load_karpathy(path: Path, image_root: Path | None = None) -> CaptionDataset:
    from vsa.io import read_json

    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise VsaError("not a Karpathy split file: expected an object with an 'images' list", path)
    images = []
    sentid = 0
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict):
            raise VsaError(f"image record {i} is not an object", path)
        if "filename" not in im:
            raise VsaError(f"image record {i} has no 'filename'", path)
        where = f"image {i} ({im['filename']})"
        if "sentences" not in im or not isinstance(im["sentences"], list):
            raise VsaError(f"{where} has no 'sentences' list", path)
        if "split" not in im:
            raise VsaError(f"{where} has no 'split' (a dataset without splits needs --splits or `vsa data convert`)", path)
        split = _check_split(im["split"], path, where)
        key = f"{im['filepath']}/{im['filename']}" if im.get("filepath") else im["filename"]
        sents = []
        for s in im["sentences"]:
            raw = s.get("raw") if isinstance(s, dict) else None
            if raw is None:
                raw = " ".join(s.get("tokens", [])) if isinstance(s, dict) else str(s)
            sid = s.get("sentid", sentid) if isinstance(s, dict) else sentid
            sents.append(Sentence(raw, tokenize(raw), int(sid)))
            sentid = max(sentid, int(sid)) + 1
        images.append(ImageRecord(key, split, int(im.get("imgid", i)), sents, im.get("cocoid")))
    name = data.get("dataset") or path.stem.replace("dataset_", "")
    return CaptionDataset(name, images, image_root, path, "karpathy")


def _read_list(path: Path) -> list[str]:
    return [ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]


def _flickr_lists(folder: Path) -> dict[str, str] | None:
    names = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt", "test": "Flickr_8k.testImages.txt"}
    if not all((folder / n).exists() for n in names.values()):
        return None
    order: dict[str, str] = {}
    for split, n in names.items():
        for fn in _read_list(folder / n):
            order[fn] = split
    return order


def _split_lists(folder: Path) -> dict[str, str] | None:
    """Split list files in ``folder``: official Flickr8k names or ``*train*/*val*/*test*/*restval*.txt``."""
    lists = _flickr_lists(folder)
    if lists is not None:
        return lists
    found: dict[str, str] = {}
    for p in sorted(folder.glob("*.txt")):
        n = p.name.lower()
        split = None
        if "restval" in n:
            split = "restval"
        elif "train" in n:
            split = "train"
        elif "val" in n or "dev" in n:
            split = "val"
        elif "test" in n:
            split = "test"
        if split:
            for fn in _read_list(p):
                found[fn] = split
    return found or None


def _guess_image_root(folder: Path, names: Iterable[str]) -> Path | None:
    for n in names:
        if (folder / n).is_dir():
            return folder / n
    return None


def _records_from_captions(
    captions: dict[str, list[str]], split_of: dict[str, str] | None, seed: int, path: Path, holdout: int = 1000
) -> list[ImageRecord]:
    files = list(captions)
    if split_of is None:
        rng = random.Random(seed)
        shuffled = sorted(files)
        rng.shuffle(shuffled)
        n = min(holdout, len(shuffled) // 5) if len(shuffled) < 5 * holdout else holdout
        split_of = {}
        for i, fn in enumerate(shuffled):
            split_of[fn] = "val" if i < n else "test" if i < 2 * n else "train"
        order = files
    else:
        order = [fn for fn in split_of if fn in captions]  # the split files' order
    recs, sentid = [], 0
    for imgid, fn in enumerate(order):
        split = split_of.get(fn)
        if split is None:
            continue
        _check_split(split, path, fn)
        sents = []
        for raw in captions[fn]:
            sents.append(Sentence(raw, tokenize(raw), sentid))
            sentid += 1
        recs.append(ImageRecord(fn, split, len(recs), sents))
    return recs


def load_flickr_tokens(path: Path, image_root: Path | None = None, splits: Path | None = None) -> CaptionDataset:
    token_file = path / "Flickr8k.token.txt" if path.is_dir() else path
    folder = token_file.parent
    if not token_file.exists():
        raise VsaError("no such file", token_file)
    captions: dict[str, list[str]] = {}
    with open(token_file, encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            if "\t" not in line or "#" not in line.split("\t", 1)[0]:
                raise VsaError("expected '<image>.jpg#<n><TAB><caption>'", token_file, lineno)
            ref, raw = line.split("\t", 1)
            fn = ref.rsplit("#", 1)[0]
            captions.setdefault(fn, []).append(raw)
    split_of = _split_lists(splits or folder)
    if split_of is None:
        raise VsaError("no split lists found beside it (Flickr_8k.{train,dev,test}Images.txt); pass --splits DIR", token_file)
    if image_root is None:
        image_root = _guess_image_root(folder, ["Flicker8k_Dataset", "Flickr8k_Dataset", "images", "Images"])
        if image_root is None:
            image_root = _guess_image_root(folder.parent, ["Flicker8k_Dataset", "Flickr8k_Dataset", "images", "Images"])
    recs = _records_from_captions(captions, split_of, 0, token_file)
    return CaptionDataset("flickr8k", recs, image_root, token_file, "flickr-token")


def load_kaggle(path: Path, image_root: Path | None = None, splits: Path | None = None, seed: int = 0) -> CaptionDataset:
    cap = path / "captions.txt" if path.is_dir() else path
    folder = cap.parent
    if not cap.exists():
        raise VsaError("no such file", cap)
    captions: dict[str, list[str]] = {}
    text = cap.read_text(encoding="utf-8", errors="replace")
    reader = csv.reader(io.StringIO(text))
    for lineno, row in enumerate(reader, 1):
        if not row:
            continue
        if lineno == 1 and [c.strip().lower() for c in row[:2]] == ["image", "caption"]:
            continue
        if len(row) < 2:
            raise VsaError("expected CSV 'image,caption'", cap, lineno)
        fn, raw = row[0].strip(), ",".join(row[1:]).strip()
        captions.setdefault(fn, []).append(raw)
    split_of = _split_lists(splits) if splits else _flickr_lists(folder)
    if image_root is None:
        image_root = _guess_image_root(folder, ["Images", "images"])
    recs = _records_from_captions(captions, split_of, seed, cap)
    name = "flickr8k" if len(captions) in (8091, 8092, 8000) else folder.name
    return CaptionDataset(name, recs, image_root, cap, "kaggle")


def load_coco_annotations(paths: list[Path], image_root: Path | None = None, splits: Path | None = None) -> CaptionDataset:
    import contextlib
    import os

    from pycocotools.coco import COCO

    split_of = _split_lists(splits) if splits else None
    recs: list[ImageRecord] = []
    sentid = 0
    for p in paths:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            try:
                coco = COCO(str(p))
            except Exception as e:  # pycocotools asserts on bad files
                raise VsaError(f"not a COCO annotation file ({type(e).__name__}: {e})", p) from None
        if not coco.dataset.get("annotations") or "caption" not in coco.dataset["annotations"][0]:
            raise VsaError("COCO file has no caption annotations", p)
        folder = re.search(r"(train|val|test)(\d{4})", p.name)
        default_split = folder.group(1) if folder else "train"
        subdir = f"{folder.group(1)}{folder.group(2)}" if folder else ""
        for img_id in sorted(coco.getImgIds()):
            info = coco.imgs[img_id]
            fn = info["file_name"]
            key = f"{subdir}/{fn}" if subdir else fn
            split = default_split
            if split_of is not None:
                split = split_of.get(fn) or split_of.get(key) or split_of.get(str(img_id))
                if split is None:
                    continue
            sents = []
            for ann in coco.imgToAnns.get(img_id, []):
                raw = ann["caption"].strip()
                sents.append(Sentence(raw, tokenize(raw), sentid))
                sentid += 1
            recs.append(ImageRecord(key, _check_split(split, p, fn), len(recs), sents, img_id))
    return CaptionDataset("coco", recs, image_root, paths[0], "coco")


def detect_layout(path: Path) -> str:
    if path.is_dir():
        if list(path.glob("dataset_*.json")):
            return "karpathy"
        if (path / "Flickr8k.token.txt").exists():
            return "flickr-token"
        if (path / "captions.txt").exists():
            return "kaggle"
        if list(path.glob("captions_*.json")):
            return "coco"
        raise VsaError(
            "no dataset found in folder (expected dataset_*.json, Flickr8k.token.txt, captions.txt or captions_*.json)",
            path,
        )
    name = path.name
    if name.endswith(".json"):
        return "coco" if name.startswith("captions_") else "karpathy"
    if name == "captions.txt" or name.endswith(".csv"):
        return "kaggle"
    if name.endswith(".token.txt") or name.endswith(".txt"):
        return "flickr-token"
    raise VsaError("unknown dataset layout (expected .json, Flickr8k.token.txt or captions.txt)", path)


def load_dataset(path, image_root=None, splits=None, seed: int = 0) -> CaptionDataset:
    """Load a caption dataset from any supported layout (see module docstring)."""
    path = Path(path)
    if not path.exists():
        raise VsaError("no such file or folder", path)
    image_root = Path(image_root) if image_root is not None else None
    splits = Path(splits) if splits is not None else None
    layout = detect_layout(path)
    if layout == "karpathy":
        if path.is_dir():
            path = sorted(path.glob("dataset_*.json"))[0]
        if image_root is None:
            image_root = _guess_image_root(path.parent, ["images", "Images", "Flicker8k_Dataset", "flickr30k-images"])
        return load_karpathy(path, image_root)
    if layout == "flickr-token":
        return load_flickr_tokens(path, image_root, splits)
    if layout == "kaggle":
        return load_kaggle(path, image_root, splits, seed)
    paths = sorted(path.glob("captions_*.json")) if path.is_dir() else [path]
    return load_coco_annotations(paths, image_root, splits)


# ----------------------------------------------------------------------------- stats


def stats(ds: CaptionDataset, min_count: int = 5) -> dict:
    splits = {}
    for sp in SPLITS:
        recs = ds.split(sp)
        if not recs and sp == "restval":
            continue
        lens = [len(s.tokens) for r in recs for s in r.sentences]
        splits[sp] = {
            "images": len(recs),
            "sentences": len(lens),
            "sentences_per_image": round(len(lens) / len(recs), 3) if recs else 0,
            "length_mean": round(statistics.fmean(lens), 2) if lens else 0,
            "length_median": statistics.median(lens) if lens else 0,
            "length_min": min(lens) if lens else 0,
            "length_max": max(lens) if lens else 0,
        }
    counts = word_counts(ds, "train")
    vocab = build_vocab(ds, min_count)
    return {
        "dataset": ds.name,
        "layout": ds.layout,
        "source": str(ds.source) if ds.source else None,
        "image_root": str(ds.image_root) if ds.image_root else None,
        "splits": splits,
        "train_words_distinct": len(counts),
        "min_count": min_count,
        "vocab_size": len(vocab.words),
    }
