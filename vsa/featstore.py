"""Read a features NPZ (see docs/formats.md) and join it with a caption dataset by image key."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from vsa.errors import VsaError

REQUIRED = ("feats", "offsets", "keys")


def memmap_npz_member(path, name: str):
    """Memory-map array ``name`` of an uncompressed NPZ (``np.savez``) without reading it.

    ``np.savez`` stores members uncompressed, so the ``.npy`` payload lies contiguous in the
    file; this maps it read-only, so features larger than RAM are paged in on demand.
    Returns None when the member is compressed or not a plain array (callers then load it).
    """
    import struct
    import zipfile

    member = name if name.endswith(".npy") else name + ".npy"
    with zipfile.ZipFile(path) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            return None
        if info.compress_type != zipfile.ZIP_STORED:
            return None
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        local = fh.read(30)
        if local[:4] != b"PK\x03\x04":
            return None
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        start = info.header_offset + 30 + name_len + extra_len
        fh.seek(start)
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
        else:
            return None
        if dtype.hasobject:
            return None
        offset = fh.tell()
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


def _load_arrays(path, mmap: bool) -> dict:
    from vsa.io import load_npz

    if not mmap:
        return load_npz(path, required=REQUIRED)
    import zipfile

    try:
        feats = memmap_npz_member(path, "feats")
    except (OSError, zipfile.BadZipFile, ValueError):
        feats = None
    if feats is None:
        return load_npz(path, required=REQUIRED)
    # everything but the big matrix is small: load it normally
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in z.files if k != "feats"}
    except Exception as e:
        raise VsaError(f"not a readable NPZ file ({type(e).__name__}: {e})", path) from None
    out["feats"] = feats
    missing = [k for k in REQUIRED if k not in out]
    if missing:
        raise VsaError(f"missing key(s) {', '.join(missing)} (has: {', '.join(sorted(out))})", path)
    return out


class FeatureStore:
    """Region features per image.

    ``store[key]`` gives ``[R_i, D]`` float32 features of one image (whole image first);
    ``store.boxes(key)``, ``store.labels(key)`` the matching boxes and class names.
    """

    def __init__(self, path, arrays: dict | None = None, mmap: bool = True):
        """Open ``path``; with ``mmap`` (default) the feature matrix is memory-mapped, not read."""
        self.path = Path(path) if path is not None else None
        if arrays is None and self.path is not None and not self.path.exists():
            raise VsaError("no such file", self.path)
        a = arrays if arrays is not None else _load_arrays(path, mmap)
        self.feats = a["feats"]
        self.offsets = np.asarray(a["offsets"], dtype=np.int64)
        self.keys = [str(k) for k in a["keys"]]
        n = len(self.keys)
        where = self.path or "<features>"
        if self.offsets.shape != (n + 1,):
            raise VsaError(f"'offsets' has shape {self.offsets.shape}, expected ({n + 1},) for {n} keys", where)
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
        self.index = {k: i for i, k in enumerate(self.keys)}
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


def load_features(path, mmap: bool = True) -> FeatureStore:
    return FeatureStore(path, mmap=mmap)


class RegionBank:
    """The padded region features ``[N, R, D]`` of a list of images, read from a store on demand.

    Training and evaluation index it like a tensor (``bank[idx]`` with a slice, a list or an index
    tensor gives float32 ``[b, R, D]``), but only the rows of those images are read: with a
    memory-mapped store (the default for ``np.savez`` files) the process holds one batch, not the
    feature set, so memory stays flat however large the features file is. :attr:`mask` (``[N, R]``,
    real regions) is small and kept in memory.
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
        import torch

        which = self._select(idx)
        rows, counts = self.rows(which)
        out = np.zeros((len(which), self.R, self.D), dtype=np.float32)
        mask = np.arange(self.R)[None, :] < counts[:, None]
        if len(rows):
            sort = np.argsort(rows, kind="stable")  # read the file in order, put the rows back after
            got = np.empty((len(rows), self.D), dtype=np.float32)
            got[sort] = self.store.feats[rows[sort]]
            out[mask] = got
        return torch.from_numpy(out)

    def moments(self, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """Per-dimension mean and std over all real regions, read ``chunk`` images at a time (float64
        sums; memory of one chunk, a few MB)."""
        s = np.zeros(self.D)
        s2 = np.zeros(self.D)
        n = 0
        for a in range(0, len(self), chunk):
            rows, _ = self.rows(np.arange(a, min(a + chunk, len(self))))
            x = np.asarray(self.store.feats[np.sort(rows)], dtype=np.float64)
            s += x.sum(0)
            s2 += np.einsum("ij,ij->j", x, x)
            n += len(x)
        mean = s / max(n, 1)
        var = (s2 - n * mean * mean) / max(n - 1, 1)  # unbiased, as torch.std
        return mean, np.sqrt(np.clip(var, 0, None))
