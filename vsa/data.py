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

Tokenization follows the paper's data (Karpathy's ``tokens`` field): Unicode NFKC,
lowercase, split on white space, hyphens and slashes (``t-shirt`` -> ``t shirt``),
strip every other non-alphanumeric character from each token (``statefarm.com`` ->
``statefarmcom``), drop empty tokens.  Sentences with no words are dropped at load
time and counted in ``CaptionDataset.notes``.  See docs/datasets.md.
"""

from __future__ import annotations

import csv
import io
import random
import re
import statistics
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from vsa.errors import VsaError

SPLITS = ("train", "val", "test", "restval")
PAD, UNK, START, END = "<pad>", "<unk>", "<start>", "<end>"
SPECIALS = (PAD, UNK, START, END)

_SPLIT = re.compile(r"[\s\-\u2010-\u2015\u2212/]+")  # white space, hyphens and dashes, slash
_STRIP = re.compile(r"[^\w]|_", re.UNICODE)


def tokenize(text: str) -> list[str]:
    """Paper tokenization: lowercase, split on spaces/hyphens/slashes, strip other punctuation.

    ``"A boy's red T-shirt (statefarm.com)!"`` -> ``["a", "boys", "red", "t", "shirt", "statefarmcom"]``.
    Letters of any script are kept (``"Café"`` -> ``["café"]``, composed or not).
    """
    text = unicodedata.normalize("NFKC", str(text)).lower()
    out = []
    for tok in _SPLIT.split(text):
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
    notes: list[str] = field(default_factory=list)  # what the loader decided (dropped sentences, seeded split)

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

    def size_text(self) -> str:
        """The size as the trainers report it, with the words `vsa data stats` counts: ``1004 (1000 words + 4
        special tokens)``."""
        return f"{len(self)} ({len(self.words)} words + {len(SPECIALS)} special tokens)"

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

HOLDOUT = 1000  # val and test images of a seeded split (scaled down for small datasets)


def _check_split(split, path, where: str, line: int | None = None) -> str:
    if split not in SPLITS:
        raise VsaError(f"unknown split {split!r} for {where} (expected one of {', '.join(SPLITS)})", path, line)
    return split


def _read_text(path: Path) -> str:
    """A UTF-8 text file (a leading BOM is skipped); bad bytes are an error naming the line."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise VsaError(f"cannot read ({e.strerror})", path) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise VsaError(f"not valid UTF-8 (byte 0x{data[e.start]:02x}); re-save the file as UTF-8", path, line) from None


def _make_sentence(raw, sentid: int) -> Sentence | None:
    """A Sentence, or None when the text has no words (empty sentences are dropped)."""
    tokens = tokenize(raw)
    return Sentence(raw, tokens, sentid) if tokens else None


def seeded_split(keys: Iterable[str], seed: int = 0, holdout: int = HOLDOUT) -> dict[str, str]:
    """Assign ``holdout`` random images each to val and test, the rest to train.

    With fewer than ``5 * holdout`` images, val and test get a fifth of the images each
    (rounded down), so a 10-image set splits 6/2/2. Deterministic for a given seed:
    the keys are sorted before shuffling, so the input order does not matter.
    """
    shuffled = sorted(set(keys))
    random.Random(seed).shuffle(shuffled)
    n = holdout if len(shuffled) >= 5 * holdout else len(shuffled) // 5
    return {k: ("val" if i < n else "test" if i < 2 * n else "train") for i, k in enumerate(shuffled)}


def _split_counts(split_of: dict[str, str]) -> str:
    c = Counter(split_of.values())
    return "/".join(str(c.get(s, 0)) for s in ("train", "val", "test"))


def _karpathy_items(path: Path) -> tuple[str | None, list[tuple[int | None, object]]]:
    """(dataset name, [(line or None, image record)]) from a Karpathy JSON or JSONL file."""
    from vsa.io import iter_jsonl, read_json

    if path.suffix.lower() == ".jsonl":
        return None, list(iter_jsonl(path, with_lineno=True))
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise VsaError("not a Karpathy split file: expected an object with an 'images' list", path)
    name = data.get("dataset") if isinstance(data.get("dataset"), str) else None
    return name, [(None, im) for im in data["images"]]


def load_karpathy(path: Path, image_root: Path | None = None, splits: Path | None = None, seed: int = 0) -> CaptionDataset:
    """Karpathy split JSON (``{"images": [...]}``), or JSONL with one such image record per line.

    Every image needs ``filename`` and a ``sentences`` list (objects with ``raw`` or ``tokens``,
    or plain strings). ``split`` is taken from the file; ``splits`` (a folder of split lists)
    overrides it; a file with no split at all gets :func:`seeded_split`.
    """
    path = Path(path)
    name, items = _karpathy_items(path)
    images: list[ImageRecord] = []
    lines: list[int | None] = []
    seen: dict[str, int] = {}
    sentid, dropped, n_sents = 0, 0, 0
    for i, (line, im) in enumerate(items):
        if not isinstance(im, dict):
            raise VsaError(f"image record {i} is not an object", path, line)
        fn = im.get("filename")
        if not isinstance(fn, str) or not fn:
            raise VsaError(f"image record {i} has no 'filename'", path, line)
        where = f"image {i} ({fn})"
        if not isinstance(im.get("sentences"), list):
            raise VsaError(f"{where} has no 'sentences' list", path, line)
        split = im.get("split")
        if split is not None:
            split = _check_split(split, path, where, line)
        key = f"{im['filepath']}/{fn}" if im.get("filepath") else fn
        if key in seen:
            raise VsaError(f"{where}: image {key!r} is listed twice (also image {seen[key]})", path, line)
        seen[key] = i
        sents = []
        for j, s in enumerate(im["sentences"]):
            if isinstance(s, str):
                raw, sid = s, sentid
            elif isinstance(s, dict) and isinstance(s.get("raw"), str):
                raw, sid = s["raw"], s.get("sentid", sentid)
            elif isinstance(s, dict) and isinstance(s.get("tokens"), list):
                raw, sid = " ".join(str(t) for t in s["tokens"]), s.get("sentid", sentid)
            else:
                raise VsaError(f"{where}: sentence {j} has neither 'raw' text nor a 'tokens' list", path, line)
            try:
                sid = int(sid)
            except (TypeError, ValueError):
                raise VsaError(f"{where}: sentence {j} has a non-integer 'sentid' {sid!r}", path, line) from None
            sentid = max(sentid, sid) + 1
            n_sents += 1
            sent = _make_sentence(raw, sid)
            if sent is None:
                dropped += 1
            else:
                sents.append(sent)
        imgid = im.get("imgid", i)
        images.append(ImageRecord(key, split, int(imgid) if isinstance(imgid, int) else i, sents, im.get("cocoid")))
        lines.append(line)
    notes: list[str] = []
    if dropped:
        notes.append(f"{dropped} of {n_sents} sentences have no words and were dropped")
    if splits is not None:
        split_of = _split_lists(Path(splits))
        if split_of is None:
            raise VsaError("no split list files (*train*.txt, *val*.txt, *test*.txt) in folder", splits)
        kept = []
        for r in images:
            sp = split_of.get(r.key) or split_of.get(Path(r.key).name)
            if sp is None and r.cocoid is not None:
                sp = split_of.get(str(r.cocoid))
            if sp is not None:
                r.split = sp
                kept.append(r)
        if len(kept) < len(images):
            notes.append(f"{len(images) - len(kept)} images are in no split list of {splits} and were left out")
        images = kept
    else:
        missing = [i for i, r in enumerate(images) if r.split is None]
        if missing and len(missing) < len(images):
            i = missing[0]
            raise VsaError(f"image {i} ({images[i].key}) has no 'split' while other images have one "
                           "(give every image a split, or pass --splits DIR)", path, lines[i])
        if missing:
            split_of = seeded_split((r.key for r in images), seed)
            for r in images:
                r.split = split_of[r.key]
            notes.append(f"no splits in the file: seeded random split {_split_counts(split_of)} train/val/test "
                         f"(--seed {seed}; pass --splits DIR to use split lists)")
    name = name or path.stem.replace("dataset_", "")
    return CaptionDataset(name, images, image_root, path, "karpathy", notes)


def _read_list(path: Path) -> list[str]:
    return [ln.strip() for ln in _read_text(path).splitlines() if ln.strip()]


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
    if not folder.is_dir():
        raise VsaError("split lists: expected a folder of *train*.txt / *val*.txt / *test*.txt files", folder)
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
    captions: dict[str, list[str]], split_of: dict[str, str] | None, seed: int, path: Path, notes: list[str] | None = None
) -> list[ImageRecord]:
    """Image records from ``{file: [captions]}``; ``split_of`` None means a seeded split."""
    notes = notes if notes is not None else []
    if split_of is None:
        split_of = seeded_split(captions, seed)
        order = list(captions)
        notes.append(f"no split lists: seeded random split {_split_counts(split_of)} train/val/test "
                     f"(--seed {seed}; pass --splits DIR to use split lists)")
    else:
        order = [fn for fn in split_of if fn in captions]  # the split files' order
        unlisted = len(captions) - len(order)
        if unlisted:
            notes.append(f"{unlisted} images with captions are in no split list and were left out")
        missing = sum(1 for fn in split_of if fn not in captions)
        if missing:
            notes.append(f"{missing} images in the split lists have no captions and were left out")
    recs, sentid, dropped = [], 0, 0
    for fn in order:
        split = _check_split(split_of[fn], path, fn)
        sents = []
        for raw in captions[fn]:
            sent = _make_sentence(raw, sentid)
            sentid += 1
            if sent is None:
                dropped += 1
            else:
                sents.append(sent)
        recs.append(ImageRecord(fn, split, len(recs), sents))
    if dropped:
        notes.append(f"{dropped} of {sentid} sentences have no words and were dropped")
    return recs


def _captions_file(path, name: str) -> Path:
    """A layout's captions file: ``path``, or the file ``name`` in it when ``path`` is a folder; it must exist."""
    path = Path(path)
    found = path / name if path.is_dir() else path
    if not found.exists():
        raise VsaError("no such file", found)
    return found


def load_flickr_tokens(path: Path, image_root: Path | None = None, splits: Path | None = None, seed: int = 0) -> CaptionDataset:
    """The official ``Flickr8k.token.txt`` (``<image>.jpg#<n><TAB><caption>``) plus split lists."""
    token_file = _captions_file(path, "Flickr8k.token.txt")
    folder = token_file.parent
    captions: dict[str, list[str]] = {}
    for lineno, line in enumerate(_read_text(token_file).splitlines(), 1):
        if not line.strip():
            continue
        if "\t" not in line or "#" not in line.split("\t", 1)[0]:
            raise VsaError("expected '<image>.jpg#<n><TAB><caption>'", token_file, lineno)
        ref, raw = line.split("\t", 1)
        fn = ref.rsplit("#", 1)[0].strip()
        captions.setdefault(fn, []).append(raw)
    split_of = _split_lists(Path(splits)) if splits is not None else _split_lists(folder)
    if split_of is None:
        raise VsaError("no split lists found beside it (Flickr_8k.{train,dev,test}Images.txt); pass --splits DIR",
                       token_file)
    if image_root is None:
        names = ["Flicker8k_Dataset", "Flickr8k_Dataset", "images", "Images"]
        image_root = _guess_image_root(folder, names) or _guess_image_root(folder.parent, names)
    notes: list[str] = []
    recs = _records_from_captions(captions, split_of, seed, token_file, notes)
    return CaptionDataset("flickr8k", recs, image_root, token_file, "flickr-token", notes)


def load_kaggle(path: Path, image_root: Path | None = None, splits: Path | None = None, seed: int = 0) -> CaptionDataset:
    """Kaggle ``captions.txt``: CSV ``image,caption`` with a header line; split lists or a seeded split."""
    cap = _captions_file(path, "captions.txt")
    folder = cap.parent
    captions: dict[str, list[str]] = {}
    reader = csv.reader(io.StringIO(_read_text(cap), newline=""))
    try:
        for row in reader:
            lineno = reader.line_num
            if not row or not any(c.strip() for c in row):
                continue
            if not captions and [c.strip().lower() for c in row[:2]] == ["image", "caption"]:
                continue
            if len(row) < 2 or not row[0].strip():
                raise VsaError("expected CSV 'image,caption'", cap, lineno)
            fn, raw = row[0].strip(), ",".join(row[1:]).strip()
            captions.setdefault(fn, []).append(raw)
    except csv.Error as e:
        raise VsaError(f"malformed CSV ({e})", cap, reader.line_num) from None
    if not captions:
        raise VsaError("no captions in file (expected CSV 'image,caption')", cap)
    split_of = _split_lists(Path(splits)) if splits is not None else _flickr_lists(folder)
    if image_root is None:
        image_root = _guess_image_root(folder, ["Images", "images"])
    notes: list[str] = []
    recs = _records_from_captions(captions, split_of, seed, cap, notes)
    name = "flickr8k" if len(captions) in (8091, 8092, 8000) else folder.name
    return CaptionDataset(name, recs, image_root, cap, "kaggle", notes)


def load_coco_annotations(paths: list[Path], image_root: Path | None = None, splits: Path | None = None) -> CaptionDataset:
    """COCO caption annotation files (read with pycocotools), split by Karpathy split lists if given.

    Without split lists, images of ``*train2014*`` files go to train and of ``*val2014*`` to val.
    Keys are ``val2014/<file_name>``, relative to the COCO image root.
    """
    import contextlib
    import os

    from pycocotools.coco import COCO

    split_of = _split_lists(Path(splits)) if splits is not None else None
    recs: list[ImageRecord] = []
    notes: list[str] = []
    sentid, dropped, unlisted = 0, 0, 0
    for p in paths:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            try:
                coco = COCO(str(p))
            except Exception as e:  # pycocotools asserts on bad files
                msg = str(e).splitlines()[0] if str(e) else "unexpected content"
                raise VsaError(f"not a COCO annotation file ({type(e).__name__}: {msg})", p) from None
        anns = coco.dataset.get("annotations")
        if not anns or not isinstance(anns[0], dict) or "caption" not in anns[0]:
            raise VsaError("COCO file has no caption annotations", p)
        if not coco.dataset.get("images"):
            raise VsaError("COCO file has no 'images' list", p)
        folder = re.search(r"(train|val|test)(\d{4})", p.name)
        default_split = folder.group(1) if folder else "train"
        subdir = f"{folder.group(1)}{folder.group(2)}" if folder else ""
        for img_id in sorted(coco.getImgIds()):
            info = coco.imgs[img_id]
            fn = info.get("file_name")
            if not isinstance(fn, str):
                raise VsaError(f"image id {img_id} has no 'file_name'", p)
            key = f"{subdir}/{fn}" if subdir else fn
            split = default_split
            if split_of is not None:
                split = split_of.get(fn) or split_of.get(key) or split_of.get(str(img_id))
                if split is None:
                    unlisted += 1
                    continue
            sents = []
            for ann in coco.imgToAnns.get(img_id, []):
                sent = _make_sentence(str(ann.get("caption", "")).strip(), sentid)
                sentid += 1
                if sent is None:
                    dropped += 1
                else:
                    sents.append(sent)
            recs.append(ImageRecord(key, _check_split(split, p, fn), len(recs), sents, img_id))
        if image_root is None and subdir:  # annotations/ beside train2014/ val2014/, or inside the root
            for root in (p.parent, p.parent.parent):
                if (root / subdir).is_dir():
                    image_root = root
                    break
    if unlisted:
        notes.append(f"{unlisted} images are in no split list of {splits} and were left out")
    if dropped:
        notes.append(f"{dropped} of {sentid} sentences have no words and were dropped")
    return CaptionDataset("coco", recs, image_root, paths[0], "coco", notes)


def detect_layout(path: Path) -> str:
    path = Path(path)
    if path.is_dir():
        karpathy = sorted(path.glob("dataset_*.json"))
        if len(karpathy) > 1:
            raise VsaError(f"several Karpathy split files in folder ({', '.join(p.name for p in karpathy)}): "
                           "pass one of them", path)
        if karpathy:
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
    name = path.name.lower()
    if name.endswith(".json"):
        return "coco" if name.startswith("captions_") else "karpathy"
    if name.endswith(".jsonl"):
        return "karpathy"
    if name == "captions.txt" or name.endswith(".csv"):
        return "kaggle"
    if name.endswith(".txt"):
        return "flickr-token"
    raise VsaError("unknown dataset layout (expected .json, .jsonl, Flickr8k.token.txt or captions.txt)", path)


def load_dataset(path, image_root=None, splits=None, seed: int = 0) -> CaptionDataset:
    """Load a caption dataset from any supported layout (see module docstring).

    ``splits`` is a folder of split list files (overrides the file's own split); ``seed``
    seeds the random val/test split of a layout that has none.  ``ds.notes`` lists what
    the loader had to decide (dropped empty sentences, a seeded split, unlisted images).
    """
    path = Path(path)
    if not path.exists():
        raise VsaError("no such file or folder", path)
    image_root = Path(image_root) if image_root is not None else None
    splits = Path(splits) if splits is not None else None
    if splits is not None and not splits.exists():
        raise VsaError("no such folder (split lists)", splits)
    layout = detect_layout(path)
    if layout == "karpathy":
        if path.is_dir():
            path = sorted(path.glob("dataset_*.json"))[0]
        if image_root is None:
            image_root = _guess_image_root(path.parent, ["images", "Images", "Flicker8k_Dataset", "flickr30k-images"])
        return load_karpathy(path, image_root, splits, seed)
    if layout == "flickr-token":
        return load_flickr_tokens(path, image_root, splits, seed)
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
            "images_without_sentences": sum(1 for r in recs if not r.sentences),
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
        "notes": list(ds.notes),
    }
