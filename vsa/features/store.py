"""The features NPZ of docs/formats.md (also the search index, a superset): its one writer
(:func:`save_features`), its one reader (:func:`load_features`, a :class:`FeatureStore`, memory-mapped),
the join with a caption dataset by image key, and the one region padding (:func:`pad_regions`,
:class:`RegionBank`).

An *image record* is what the writer takes and :meth:`FeatureStore.image` gives back: a dict with ``key``,
``size`` (width, height), ``feats`` ``[R, D]`` (whole image first) and either ``regions`` (dicts with
``box``, ``score``, ``label``, as ``vsa regions`` writes them) or the arrays ``boxes`` ``[R, 4]``,
``scores`` ``[R]`` and ``labels`` (R strings).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from vsa.errors import VsaError

REQUIRED = ("feats", "offsets", "keys")
INDEX = ("emb", "emb_offsets")  # the search index's extra arrays (with ``paths``)


SETTINGS = ("extractor", "dim", "input", "resize", "mean", "std", "crop", "context", "dtype", "grid", "cells", "flip", "labels")


def feature_settings(meta: dict, **override) -> dict:
    """The part of a features ``meta`` that must agree for two files to be merged or resumed
    (``override`` replaces entries: ``flip=True`` is what the mirrored twin of a file must have)."""
    out = {k: meta.get(k) for k in SETTINGS}
    out.update(override)
    return out


def check_extractor(trained: dict, features_meta: dict, features_path, who: str = "model") -> None:
    """A one-line error unless the features file was made by the CNN the ``who`` (its checkpoint's extractor
    record ``trained``) was trained on, with the same feature size."""
    a, f = (trained or {}).get("extractor"), (features_meta or {}).get("extractor")
    if a and f and a != f:
        raise VsaError(f"features come from {f!r} but the {who} was trained on {a!r} features "
                       f"(run `vsa embed --cnn {a}`)", features_path)
    ad, fd = (trained or {}).get("dim"), (features_meta or {}).get("dim")
    if ad and fd and int(ad) != int(fd):
        raise VsaError(f"features are {fd}-d but the {who} expects {ad}-d", features_path)


def check_mirrored(store, flipped, keys: list[str], path) -> None:
    """A one-line error unless ``flipped`` (a FeatureStore made by ``vsa embed --flip``) holds the same features as
    ``store``, mirrored, for every image of ``keys`` (training reads one or the other per image)."""
    if not flipped.meta.get("flip"):
        raise VsaError("not mirrored features: make them with `vsa embed ... --flip` (same settings as --features)",
                       path)
    ours = feature_settings(store.meta, flip=True, detector=store.meta.get("detector"))
    theirs = feature_settings(flipped.meta, detector=flipped.meta.get("detector"))
    diff = [k for k in ours if ours[k] != theirs[k]]
    if diff:
        raise VsaError(f"mirrored features made differently from --features ({', '.join(diff)} differ)", path)
    missing = [k for k in keys if k not in flipped]
    if missing:
        raise VsaError(f"{len(missing)} training images have no mirrored features (first: {missing[0]})", path)
    a = np.array([store._i(k) for k in keys], dtype=np.int64)
    b = np.array([flipped._i(k) for k in keys], dtype=np.int64)
    if not np.array_equal(np.diff(store.offsets)[a], np.diff(flipped.offsets)[b]):
        raise VsaError("mirrored features have other regions than --features (same regions JSONL?)", path)


# ----------------------------------------------------------------------------- writing


def _region_arrays(rec: dict) -> tuple[np.ndarray, np.ndarray, list[str]]:
    if "regions" in rec:
        regs = rec["regions"]
        return (np.array([r["box"] for r in regs], dtype=np.float32).reshape(-1, 4),
                np.array([float(r.get("score", 1.0)) for r in regs], dtype=np.float32),
                [str(r.get("label", "")) for r in regs])
    return (np.asarray(rec["boxes"], dtype=np.float32).reshape(-1, 4), np.asarray(rec["scores"], dtype=np.float32),
            [str(x) for x in rec["labels"]])


def _strings(xs: list[str]) -> np.ndarray:
    return np.array(xs) if len(xs) else np.zeros(0, dtype="<U1")


def pack_features(images: list[dict], dtype="float16", meta: dict | None = None, emb: list | None = None,
                  paths: list[str] | None = None, hub=None, emb_global=None) -> dict[str, np.ndarray]:
    """The arrays of a features NPZ (docs/formats.md) of image records (module docstring), in order.

    ``emb`` (one ``[E_n, h]`` array per image) and ``paths`` (one per image) make it a search index: they add
    ``emb`` (float16), ``emb_offsets`` and ``paths``, and ``hub`` (one float per image: the index's hubness term)
    adds ``hub``; ``emb_global`` (``[N, g]``: an aligner's global-branch image vector of each image) adds
    ``emb_global`` (float16). ``meta`` is stored as JSON (no ``meta`` when None)."""
    dtype = np.dtype(dtype)
    feats = np.concatenate([r["feats"] for r in images]).astype(dtype) if images else np.zeros((0, 0), dtype)
    counts = [len(r["feats"]) for r in images]
    offsets = np.zeros(len(images) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(counts)
    regs = [_region_arrays(r) for r in images]
    out = {
        "feats": feats,
        "image_index": np.repeat(np.arange(len(images), dtype=np.int32), counts),
        "offsets": offsets,
        "boxes": np.concatenate([b for b, _, _ in regs]) if regs else np.zeros((0, 4), np.float32),
        "scores": np.concatenate([s for _, s, _ in regs]) if regs else np.zeros(0, np.float32),
        "labels": _strings([lb for _, _, labels in regs for lb in labels]),
        "keys": _strings([r["key"] for r in images]),
        "sizes": np.array([r["size"] for r in images], dtype=np.int32).reshape(-1, 2),
    }
    for name, arr in (("boxes", out["boxes"]), ("scores", out["scores"]), ("labels", out["labels"])):
        if len(arr) != len(feats):
            raise ValueError(f"{name}: {len(arr)} rows for {len(feats)} feature rows")
    if emb is not None:
        if len(emb) != len(images) or paths is None or len(paths) != len(images):
            raise ValueError("a search index needs one emb array and one path per image")
        emb_offsets = np.zeros(len(images) + 1, dtype=np.int64)
        emb_offsets[1:] = np.cumsum([len(e) for e in emb])
        out["emb"] = np.concatenate(emb).astype(np.float16)
        out["emb_offsets"] = emb_offsets
        out["paths"] = _strings([str(p) for p in paths])
    if hub is not None:
        if len(hub) != len(images):
            raise ValueError("a search index needs one hubness value per image")
        out["hub"] = np.asarray(hub, dtype=np.float32)
    if emb_global is not None:
        if emb is None or len(emb_global) != len(images):
            raise ValueError("a search index needs one global vector per image")
        out["emb_global"] = np.asarray(emb_global).astype(np.float16)
    if meta is not None:
        out["meta"] = np.array(json.dumps(meta))
    return out


def save_features(path, images: list[dict], dtype="float16", meta: dict | None = None, emb: list | None = None,
                  paths: list[str] | None = None, hub=None, emb_global=None) -> None:
    """Write the features NPZ (or, with ``emb`` and ``paths``, the search index) of image records at ``path``:
    :func:`pack_features`, saved uncompressed (so ``feats`` can be memory-mapped) and atomically."""
    from vsa.io import save_npz

    save_npz(path, pack_features(images, dtype, meta, emb, paths, hub, emb_global))


# ----------------------------------------------------------------------------- reading


def memmap_npz_member(path, name: str, member=None):
    """Memory-map array ``name`` of an uncompressed NPZ (``np.savez``) without reading it.

    ``np.savez`` stores members uncompressed, so the ``.npy`` payload lies contiguous in the
    file; this maps it read-only, so features larger than RAM are paged in on demand.
    Returns None when the member is compressed or absent (callers then load it). ``member``: its
    :class:`vsa.io.NpyMember` when already read (:func:`vsa.io.npz_members` checks every member first).
    """
    from vsa.io import npz_members

    if member is None:
        member = npz_members(path, mapped=[name]).get(name)
    if member is None or not member.stored:
        return None
    return np.memmap(path, dtype=member.dtype, mode="r", offset=member.data_offset, shape=member.shape,
                     order="F" if member.fortran else "C")


def _check_members(members: dict, where) -> None:
    """Arrays whose shapes cannot fit together, refused from their headers before any data is read (a forged
    or inflated member costs nothing): one-line errors as :class:`FeatureStore` gives them on loaded arrays."""
    shape = {k: m.shape for k, m in members.items()}
    feats, keys = shape.get("feats"), shape.get("keys")
    if feats is not None and len(feats) != 2:
        raise VsaError(f"'feats' has shape {feats}, expected (rows, dims)", where)
    if keys is not None and len(keys) != 1:
        raise VsaError(f"'keys' has shape {keys}, expected (images,)", where)
    n = keys[0] if keys is not None else None
    R = feats[0] if feats is not None else None
    if n is not None:
        for name, want in (("offsets", (n + 1,)), ("emb_offsets", (n + 1,))):
            if name in shape and shape[name] != want:
                raise VsaError(f"'{name}' has shape {shape[name]}, expected {want} for {n} keys", where)
        if "offsets" in shape and R is not None:  # small, and read anyway: checked first, as FeatureStore does
            from vsa.io import read_npz_members

            offsets = read_npz_members(where, ["offsets"])["offsets"]
            if offsets[0] != 0:
                raise VsaError(f"'offsets' starts at {int(offsets[0])}, expected 0", where)
            if int(offsets[-1]) != R:
                raise VsaError(f"'offsets' ends at {int(offsets[-1])} but 'feats' has {R} rows", where)
        for name, want in (("sizes", (n, 2)), ("paths", (n,)), ("hub", (n,))):
            if name in shape and shape[name] != want:
                raise VsaError(f"'{name}' has shape {shape[name]}, expected {want} for {n} keys", where)
        g = shape.get("emb_global")
        if g is not None and (len(g) != 2 or g[0] != n or "emb" not in shape):
            raise VsaError("'emb_global' does not match 'emb' and 'keys'", where)
    if R is not None:
        for name, dims in (("boxes", 2), ("scores", 1), ("labels", 1), ("image_index", 1)):
            got = shape.get(name)
            if got is not None and (len(got) != dims or got[0] != R):
                raise VsaError(f"'{name}' has {got[0] if got else 0} rows but 'feats' has {R}", where)
        if "boxes" in shape and shape["boxes"][1:] != (4,):
            raise VsaError(f"'boxes' has shape {shape['boxes']}, expected ({R}, 4)", where)
    if "emb" in shape and len(shape["emb"]) != 2:
        raise VsaError(f"'emb' has shape {shape['emb']}, expected (rows, dims)", where)
    if "meta" in shape and shape["meta"] != ():
        raise VsaError(f"'meta' has shape {shape['meta']}, expected one JSON string", where)


def _load_arrays(path, mmap: bool, required=REQUIRED) -> dict:
    from vsa.io import npz_members, read_npz_members

    required = tuple(dict.fromkeys(REQUIRED + tuple(required)))
    members = npz_members(path, mapped=("feats",) if mmap else ())
    missing = [k for k in required if k not in members]
    if missing:
        raise VsaError(f"missing key(s) {', '.join(missing)} (has: {', '.join(sorted(members)) or 'none'})", path)
    _check_members(members, path)
    feats = memmap_npz_member(path, "feats", members["feats"]) if mmap else None
    if feats is None:
        return read_npz_members(path, members)
    # everything but the big matrix is small: load it normally
    out = read_npz_members(path, [k for k in members if k != "feats"])
    out["feats"] = feats
    return out


class FeatureStore:
    """Region features per image: a features NPZ (or a search index) as written by :func:`save_features`.

    ``store[key]`` gives ``[R_i, D]`` float32 features of one image (whole image first);
    ``store.boxes(key)``, ``store.labels(key)`` the matching boxes and class names; ``store.image(i)`` the
    image record (module docstring). A search index also has :attr:`emb` (float32 ``[E, h]``),
    :attr:`emb_offsets` and :attr:`paths`, and may have :attr:`hub` and :attr:`emb_global`; they are None in a plain
    features file.
    """

    def __init__(self, path, arrays: dict | None = None, mmap: bool = True, required=()):
        """Open ``path``; with ``mmap`` (default) the feature matrix is memory-mapped, not read. ``required``:
        more arrays the file must have (e.g. :data:`INDEX`)."""
        self.path = Path(path) if path is not None else None
        if arrays is None and self.path is not None and not self.path.exists():
            raise VsaError("no such file", self.path)
        a = arrays if arrays is not None else _load_arrays(path, mmap, required)
        self.feats = a["feats"]
        self.offsets = np.asarray(a["offsets"], dtype=np.int64)
        self.keys = [str(k) for k in a["keys"]]
        n = len(self.keys)
        where = self.path or "<features>"
        f = self.feats
        if getattr(f, "ndim", 0) != 2 or f.shape[1] < 1 or f.dtype.kind not in "fiu":
            raise VsaError(f"'feats' has shape {getattr(f, 'shape', '?')} and dtype {getattr(f, 'dtype', '?')}, "
                           "expected numbers of shape (rows, dims) with dims >= 1", where)
        if self.offsets.shape != (n + 1,):
            raise VsaError(f"'offsets' has shape {self.offsets.shape}, expected ({n + 1},) for {n} keys", where)
        if self.offsets[0] != 0:
            raise VsaError(f"'offsets' starts at {int(self.offsets[0])}, expected 0", where)
        if int(self.offsets[-1]) != len(self.feats):
            raise VsaError(f"'offsets' ends at {int(self.offsets[-1])} but 'feats' has {len(self.feats)} rows", where)
        if np.any(np.diff(self.offsets) < 1):
            raise VsaError("every image needs at least one region (offsets must increase)", where)
        R = len(self.feats)
        self._boxes = a.get("boxes")
        self._labels = a.get("labels")
        self._scores = a.get("scores")
        for name, arr in (("boxes", self._boxes), ("labels", self._labels), ("scores", self._scores)):
            if arr is not None and len(arr) != R:
                raise VsaError(f"'{name}' has {len(arr)} rows but 'feats' has {R}", where)
        self.sizes = a.get("sizes")
        meta = a.get("meta")
        try:
            self.meta = json.loads(str(meta)) if meta is not None else {}
        except json.JSONDecodeError:
            raise VsaError("'meta' is not valid JSON", where) from None
        if not isinstance(self.meta, dict):  # every reader takes settings from it by name
            raise VsaError(f"'meta' must be a JSON object of settings, got {type(self.meta).__name__}", where)
        emb, emb_offsets = a.get("emb"), a.get("emb_offsets")
        self.emb = None if emb is None else np.asarray(emb, dtype=np.float32)
        self.emb_offsets = None if emb_offsets is None else np.asarray(emb_offsets, dtype=np.int64)
        if self.emb is not None and (self.emb_offsets is None or self.emb_offsets.shape != (n + 1,)
                                     or int(self.emb_offsets[-1]) != len(self.emb)):
            raise VsaError("'emb_offsets' does not match 'emb' and 'keys'", where)
        if self.emb_offsets is not None and (self.emb_offsets[0] != 0 or np.any(np.diff(self.emb_offsets) < 0)):
            raise VsaError(f"'emb_offsets' must start at 0 and never decrease (starts at {int(self.emb_offsets[0])})",
                           where)
        self.paths = [str(p) for p in a["paths"]] if "paths" in a else None
        self.hub = np.asarray(a["hub"], dtype=np.float32) if "hub" in a else None
        if self.hub is not None and self.hub.shape != (n,):
            raise VsaError("'hub' does not match 'keys'", where)
        self.emb_global = np.asarray(a["emb_global"], dtype=np.float32) if "emb_global" in a else None
        if self.emb_global is not None and (self.emb is None or self.emb_global.ndim != 2 or len(self.emb_global) != n):
            raise VsaError("'emb_global' does not match 'emb' and 'keys'", where)
        self.index = {k: i for i, k in enumerate(self.keys)}
        if len(self.index) != n and self.paths is None:  # a search index may hold two photos of one name
            dup = next(k for i, k in enumerate(self.keys) if self.index[k] != i)
            raise VsaError(f"image key {dup!r} appears twice in 'keys' (which features are its?)", where)
        # fall back to the file name when keys are paths
        self._by_name: dict[str, int] = {}
        for i, k in enumerate(self.keys):
            self._by_name.setdefault(Path(k).name, i)

    @property
    def dim(self) -> int:
        return int(self.feats.shape[1])

    def __len__(self) -> int:
        return len(self.keys)

    def find(self, key: str) -> int | None:
        i = self.index.get(key)
        if i is None:
            i = self._by_name.get(Path(key).name)
        return i

    def __contains__(self, key: str) -> bool:
        return self.find(key) is not None

    def _i(self, key: str) -> int:
        i = self.find(key)
        if i is None:
            raise VsaError(f"image {key!r} is not in the features file", self.path or "<features>")
        return i

    def rows(self, key: str) -> slice:
        i = self._i(key)
        return slice(int(self.offsets[i]), int(self.offsets[i + 1]))

    def __getitem__(self, key: str) -> np.ndarray:
        return np.asarray(self.feats[self.rows(key)], dtype=np.float32)

    def whole(self, key: str) -> np.ndarray:
        """The whole-image feature (first region) of one image, ``[D]``."""
        return np.asarray(self.feats[int(self.offsets[self._i(key)])], dtype=np.float32)

    def boxes(self, key: str) -> np.ndarray | None:
        return None if self._boxes is None else np.asarray(self._boxes[self.rows(key)], dtype=np.float32)

    def labels(self, key: str) -> list[str] | None:
        return None if self._labels is None else [str(x) for x in self._labels[self.rows(key)]]

    def scores(self, key: str) -> np.ndarray | None:
        return None if self._scores is None else np.asarray(self._scores[self.rows(key)], dtype=np.float32)

    def image(self, i: int) -> dict:
        """The image record of image ``i`` (module docstring; ``regions`` form), as :func:`save_features` takes it."""
        s, e = int(self.offsets[i]), int(self.offsets[i + 1])
        if self._boxes is None or self._scores is None or self._labels is None or self.sizes is None:
            raise VsaError("the features file has no boxes, scores, labels or sizes", self.path or "<features>")
        return {"key": self.keys[i], "feats": self.feats[s:e],
                "regions": [{"box": b.tolist(), "score": float(sc), "label": str(lb)}
                            for b, sc, lb in zip(self._boxes[s:e], self._scores[s:e], self._labels[s:e])],
                "size": tuple(int(x) for x in self.sizes[i])}

    def check_dataset(self, records, skip_missing: bool = False, warn=None) -> list:
        """Return the records that have features; a missing image is an error unless ``skip_missing``."""
        out, missing = [], []
        for r in records:
            (out if r.key in self else missing).append(r)
        if missing and not skip_missing:
            raise VsaError(
                f"{len(missing)} dataset image(s) have no features, e.g. {missing[0].key!r} "
                "(run `vsa embed` on them, or pass --skip-missing)", self.path or "<features>")
        if missing and warn:
            warn(f"{len(missing)} dataset image(s) have no features and are skipped, e.g. {missing[0].key!r}")
        return out


def load_features(path, mmap: bool = True, required=()) -> FeatureStore:
    """The one reader of a features NPZ or search index (every file :func:`save_features` or an earlier vsa
    wrote): a :class:`FeatureStore`, its feature matrix memory-mapped unless ``mmap`` is False."""
    return FeatureStore(path, mmap=mmap, required=required)


# ----------------------------------------------------------------------------- padding


def chunked_moments(chunks) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and unbiased std (as ``torch.std``) of the rows of the 2-D ``chunks`` (arrays or
    CPU tensors, any float dtype) taken together, from float64 sums: one chunk in memory at a time."""
    s = s2 = None
    n = 0
    for x in chunks:
        x = np.asarray(x, dtype=np.float64)
        if s is None:
            s, s2 = np.zeros(x.shape[-1]), np.zeros(x.shape[-1])
        s += x.sum(0)
        s2 += np.einsum("ij,ij->j", x, x)
        n += len(x)
    mean = s / max(n, 1)
    var = (s2 - n * mean * mean) / max(n - 1, 1)
    return mean, np.sqrt(np.clip(var, 0, None))


def _gather(feats, starts: np.ndarray, counts: np.ndarray, R: int):
    """Rows ``starts[n] : starts[n] + counts[n]`` of ``feats`` (an array or memmap, ``[rows, D]``) per image,
    zero-padded to ``[N, R, D]`` float32, and the ``[N, R]`` mask; the file is read in row order."""
    import torch

    N, D = len(starts), int(feats.shape[1]) if feats.ndim == 2 else 0
    counts = np.asarray(counts, dtype=np.int64)
    out = np.zeros((N, R, D), dtype=np.float32)
    mask = np.arange(R)[None, :] < counts[:, None]
    total = int(counts.sum())
    if total:
        rows = np.repeat(np.asarray(starts, dtype=np.int64) - np.concatenate(([0], np.cumsum(counts)[:-1])), counts) \
            + np.arange(total)
        sort = np.argsort(rows, kind="stable")  # read the file in order, put the rows back after
        got = np.empty((total, D), dtype=np.float32)
        got[sort] = feats[rows[sort]]
        out[mask] = got
    return torch.from_numpy(out), torch.from_numpy(mask)


def image_rows(max_regions: int, cells: int) -> int:
    """Rows of an image's features a model reads, as one slice from the top: the whole image and up to
    ``max_regions - 1`` boxes (or grid cells), then the ``cells`` x ``cells`` image cells that ``vsa embed --cells``
    writes after them."""
    return max_regions + cells * cells


def pad_regions(regions, keys: list[str] | None = None, max_regions: int | None = None, width: int | None = None):
    """The region features of N images as a padded batch: ``(feats, mask)``, a float32 ``[N, R, D]`` tensor
    and a bool ``[N, R]`` tensor.

    ``regions``: a list of ``[R_i, D]`` arrays (one per image), or a :class:`FeatureStore` with ``keys``
    (its images; default all of them; only their rows are read, in file order). Each image keeps its first
    ``min(R_i, max_regions)`` rows in their order (the whole image, row 0 of a features file, stays row 0),
    converted to float32 and zero-padded; ``mask`` is True on them. ``R`` is ``width`` when given (it must
    hold every image's kept rows), else the largest kept count (1 when there are no images).
    """
    cap = int(max_regions) if max_regions else None
    if isinstance(regions, FeatureStore):
        store = regions
        idx = np.arange(len(store)) if keys is None else np.array([store._i(k) for k in keys], dtype=np.int64)
        starts = store.offsets[idx]
        counts = store.offsets[idx + 1] - starts
        feats = store.feats
    else:
        if keys is not None:
            raise TypeError("keys select images of a FeatureStore, not of a list of arrays")
        arrays = [np.asarray(f[:cap] if cap is not None else f) for f in regions]
        counts = np.array([len(f) for f in arrays], dtype=np.int64)
        starts = np.cumsum(counts) - counts
        D = arrays[0].shape[1] if arrays else 0
        feats = np.concatenate(arrays) if arrays else np.zeros((0, D), np.float32)
    if cap is not None:
        counts = np.minimum(counts, cap)
    R = int(counts.max()) if len(counts) else 1
    if width is not None:
        if int(width) < R:
            raise ValueError(f"width {width} < {R} regions of an image")
        R = int(width)
    return _gather(feats, starts, counts, R)


class RegionBank:
    """The padded region features ``[N, R, D]`` of a list of images, read from a store on demand.

    Training and evaluation index it like a tensor (``bank[idx]`` with a slice, a list or an index
    tensor gives float32 ``[b, R, D]``, as :func:`pad_regions` pads them, ``R`` fixed by the whole list), but
    only the rows of those images are read: with a memory-mapped store (the default for ``np.savez`` files)
    the process holds one batch, not the feature set, so memory stays flat however large the features file
    is. :attr:`mask` (``[N, R]``, real regions) is small and kept in memory.
    """

    def __init__(self, store: FeatureStore, keys: list[str], max_regions: int):
        idx = np.array([store._i(k) for k in keys], dtype=np.int64)
        self.store = store
        self.starts = store.offsets[idx]
        self.counts = np.minimum(store.offsets[idx + 1] - self.starts, max_regions)
        self.R = int(self.counts.max()) if len(keys) else 1  # counts are already capped at max_regions
        self.D = store.dim

    def __len__(self) -> int:
        return len(self.starts)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self), self.R, self.D)

    @property
    def mask(self):
        import torch

        return torch.arange(self.R)[None, :] < torch.from_numpy(self.counts)[:, None]

    def _select(self, idx) -> np.ndarray:
        if isinstance(idx, slice):
            return np.arange(len(self))[idx]
        if hasattr(idx, "numpy"):
            idx = idx.cpu().numpy()
        return np.asarray(idx, dtype=np.int64).reshape(-1)

    def rows(self, which: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Store rows of the images ``which`` (concatenated) and their count per image."""
        counts = self.counts[which]
        starts = self.starts[which]
        rows = np.repeat(starts - np.concatenate(([0], np.cumsum(counts)[:-1])), counts) + np.arange(int(counts.sum()))
        return rows, counts

    def __getitem__(self, idx):
        which = self._select(idx)
        return _gather(self.store.feats, self.starts[which], self.counts[which], self.R)[0]

    def moments(self, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """Per-dimension mean and std over all real regions, read ``chunk`` images at a time (float64
        sums; memory of one chunk, a few MB)."""
        return chunked_moments(self.store.feats[np.sort(self.rows(np.arange(a, min(a + chunk, len(self))))[0])]
                               for a in range(0, len(self), chunk))
