"""The ``vsa embed`` pipeline: region features of many image files into one features NPZ, resumable and shardable.

Inputs are :class:`EmbedItem` (an image file and its regions, or None for the whole image), from a regions
JSONL (:func:`items_from_regions`) or image files (:func:`collect_items` reads ``vsa embed``'s inputs). Images
are decoded and prepared (on CPU in a pool of threads, between CNN forwards; with ``workers`` > 0 in worker
processes, which overlap the forward on an accelerator), never more than a budget of pixels at once, and
batched through the CNN by the one featurisation path (:mod:`vsa.features.featuriser`); finished work is saved in parts
(resume; one run per output: a lock), ``--shard K/N`` takes a deterministic block (:func:`shard_of`) and
:func:`merge_npz` joins shards. Files are read and written by :mod:`vsa.features.store` only.
:func:`embed_like_training` and :func:`features_for_eval` run the pipeline on dataset images as a checkpoint's
training features were made (``vsa eval --images``). The CNNs themselves are :mod:`vsa.features.cnn`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from vsa.features.cnn import Extractor, load_extractor  # noqa: F401  (re-exported: `from vsa.features.embed import load_extractor`)
from vsa.errors import VsaError
from vsa.runtime import parse_shard, shard_of  # noqa: F401  (shard_of re-exported)
from vsa.features.store import feature_settings
from vsa.features.featuriser import CropSpec, check_fmap, forward, mirror, prepare, region_list, uses_detector

# ----------------------------------------------------------------------------- embed pipeline


@dataclass
class EmbedItem:
    key: str
    path: str
    regions: list[dict] | None  # None: whole image only


def items_from_regions(records: Iterable[dict], source: str = "<stdin>") -> Iterator[EmbedItem]:
    for i, r in enumerate(records, 1):
        if "path" not in r or "regions" not in r:
            raise VsaError("regions record needs 'path' and 'regions'", source, i)
        yield EmbedItem(r.get("key") or Path(r["path"]).name, r["path"], r["regions"])


def is_regions_jsonl(path: str) -> bool:
    """Does ``vsa embed`` read this input as regions JSONL (by its name)?"""
    return path.endswith(".jsonl") or path.endswith(".json")


def stdin_is_jsonl() -> bool:
    """Regions JSONL or a list of image paths on stdin? Look at the first non-blank byte."""
    import sys

    head = sys.stdin.buffer.peek(256)[:256].lstrip(b"\xef\xbb\xbf \t\r\n")
    return head[:1] in (b"{", b"")


def collect_items(inputs: list[str], shard: str | None = None, skip_bad: bool = False,
                  warn=None) -> tuple[list[EmbedItem], dict]:
    """The images ``vsa embed`` embeds, and the extra features meta they give: each input is a regions JSONL
    (``.jsonl``/``.json``, or ``"-"`` when stdin holds JSON: :func:`items_from_regions`), a list of image paths
    (``.txt`` or other ``"-"``: :func:`vsa.images.listed_images`) or an image file or folder (whole image only:
    :func:`vsa.images.find_images`). ``shard`` ``K/N`` keeps a deterministic block (:func:`shard_of`); with
    ``skip_bad`` bad lines are reported through ``warn`` and missing images kept (opening them reports them).
    The meta names the regions' detectors (``detector``, None when unnamed) and the ``shard``.
    No images at all is an error."""
    from vsa.images import find_images, listed_images
    from vsa.io import iter_jsonl

    items: list[EmbedItem] = []
    detectors: set = set()

    def note_detector(records):
        for r in records:
            detectors.add(str(r.get("detector", "")))
            yield r

    for inp in inputs:
        if is_regions_jsonl(inp) or (inp == "-" and stdin_is_jsonl()):
            items.extend(items_from_regions(note_detector(iter_jsonl(inp, skip_bad=skip_bad, warn=warn)), inp))
        elif inp == "-" or inp.endswith(".txt"):  # a list of image paths, one per line
            items.extend(EmbedItem(key, str(p), None)
                         for p, key in listed_images(inp, skip_bad, "not a regions record and not an image path"))
        else:
            items.extend(EmbedItem(key, str(p), None) for p, key in find_images([inp], missing_ok=skip_bad))
    if not items:
        raise VsaError(f"no images to embed in {', '.join(inputs)}")
    meta = {"detector": ",".join(sorted(d for d in detectors if d)) or None, **({"shard": shard} if shard else {})}
    return shard_of(items, shard), meta


def output_key(items: list[EmbedItem], crop: str, flip: bool = False) -> str | None:
    """The vsa.toml key naming where ``vsa embed`` writes these items' features by default: the grid cells
    with ``crop="grid"`` (mirrored: ``features.grid_flip``), else the whole images when no item has regions, else
    the detector regions; None for other mirrored features (no default place: ``--out`` names it)."""
    if crop == "grid":
        return "features.grid_flip" if flip else "features.grid"
    if flip:
        return None
    return "features.whole" if all(it.regions is None for it in items) else "features.regions"


class _CropDataset:
    """Decodes an image and prepares its CNN inputs (:func:`vsa.features.featuriser.prepare`; runs in worker processes)."""

    def __init__(self, items, prep, spec: CropSpec, max_pixels: int | None, flip: bool = False):
        self.items = items
        self.prep = prep
        self.spec = spec
        self.max_pixels = max_pixels
        self.flip = flip

    def __len__(self):
        return len(self.items)

    def cost(self, i) -> int:
        """The most pixels item ``i`` holds while it is prepared: the decoded image (twice with ``flip``: the mirror
        is a copy) and its crops, each an S x S image (warp: one per region; roi and grid: the image once)."""
        from vsa.images import image_pixels

        it = self.items[i]
        px = image_pixels(it.path, self.max_pixels)
        if not px:
            return 0  # refused before decoding
        crops = 1 if self.spec.crop in ("roi", "grid") else max(1, len(it.regions or ()))
        S = int(self.prep.input_size)
        return px * (2 if self.flip else 1) + crops * S * S

    @staticmethod
    def held(item) -> int:
        """The pixels a prepared item still holds (its crops; the decoded image is gone)."""
        return 0 if "error" in item else int(item["crops"].numel()) // 3

    @staticmethod
    def weight(item) -> int:
        """What an item adds to a CNN batch (its crops)."""
        return 1 if "error" in item else max(1, len(item["crops"]))

    def __getitem__(self, i):
        from vsa.images import ImageError, open_image

        it = self.items[i]
        try:
            im = open_image(it.path, self.max_pixels)
            given = it.regions
            if self.flip:
                im, given = mirror(im, given)
            regs = region_list(im.size, given, self.spec)
            return {"index": i, **prepare(self.prep, im, regs, self.spec), "regions": regs, "size": im.size}
        except ImageError as e:
            return {"index": i, "error": str(e)}
        except Exception as e:  # never a worker traceback: the same one-line message as in-process
            return {"index": i, "error": str(ImageError(f"cannot process image ({type(e).__name__}: {e})", it.path))}


def merge_npz(inputs: list, out, meta: dict | None = None) -> int:
    """Join feature NPZs into one: ``--shard K/N`` outputs in K order, other files in the order given.

    Duplicate keys keep the first; all inputs must share the extractor settings. A `vsa embed` writing ``out``
    meanwhile refuses this, and this refuses it (:func:`vsa.io.output_lock`).
    """
    from vsa.io import output_lock

    with output_lock(out, "vsa embed merge"):
        return _merge_npz(inputs, out, meta)


def _merge_npz(inputs: list, out, meta: dict | None) -> int:
    from vsa.features.store import load_features, save_features

    loaded = [(p, load_features(p, mmap=False, required=("boxes", "scores", "labels", "sizes"))) for p in inputs]
    if loaded and all(st.meta.get("shard") for _, st in loaded):  # shards: in K order, whatever order given
        loaded.sort(key=lambda t: parse_shard(t[1].meta["shard"]))
    inputs = [p for p, _ in loaded]
    metas = [st.meta for _, st in loaded]
    rows, seen, dtype = [], set(), None
    for p, st in loaded:
        dtype = dtype or st.feats.dtype
        for i, k in enumerate(st.keys):
            if k not in seen:
                seen.add(k)
                rows.append(st.image(i))
    if meta is None:
        meta = dict(metas[0]) if metas else {}
        for m, p in zip(metas[1:], inputs[1:]):
            if feature_settings(m) != feature_settings(meta):
                raise VsaError(f"made with other extractor settings than {inputs[0]} "
                               f"({feature_settings(m)} vs {feature_settings(meta)}); cannot merge", p)
        meta.pop("shard", None)
        dets = sorted({str(m.get("detector")) for m in metas if m.get("detector")})
        if dets:
            meta["detector"] = ",".join(dets)
    save_features(out, rows, dtype or np.float16, meta)
    return len(rows)


def _load_done(parts_dir: Path, out: Path, settings: dict, warn=None) -> tuple[list[Path], set[str]]:
    """Finished parts of an earlier run (and a finished output) with the same settings."""
    from vsa.features.store import load_features

    sources, done = [], set()
    cands = sorted(parts_dir.glob("part-*.npz")) if parts_dir.exists() else []
    if out.exists():
        cands.append(out)
    for p in cands:
        try:
            st = load_features(p, mmap=False, required=("meta",))
        except (VsaError, ValueError):
            if warn:
                warn(f"ignoring unreadable earlier output {p}")
            continue
        m = st.meta
        if feature_settings(m) != settings:
            if p == out:
                continue  # a different extractor/crop: recompute everything
            raise VsaError(f"parts of an earlier run were made with other settings ({feature_settings(m)}); "
                           "rerun with --no-resume or delete the folder", parts_dir)
        sources.append(p)
        done.update(st.keys)
    return sources, done


def embed(items: list[EmbedItem], out, extractor: Extractor, batch_size: int = 16, workers: int = 1,
          context: float = 0.0, crop: str = "warp", dtype: str = "float16", resume: bool = True, part_every: int = 500,
          skip_bad: bool = False, max_pixels: int | None = None, warn=None, progress=None, extra_meta: dict | None = None,
          grid: int = 7, cells: int = 0, flip: bool = False, budget=None, labels=()) -> dict:
    """Compute features of every item and write one NPZ at ``out`` (atomically).

    ``labels``: class names (e.g. :data:`vsa.labels.COCO_CLASSES`): each row also carries its box's class one-hot,
    score and geometry (:func:`vsa.features.featuriser.label_channels`), the input of a label-reading generator.

    ``flip``: the features of each image mirrored left to right (its boxes mirrored with it; the keys stay the
    image's): the training-time augmentation of a generator (``vsa train-mrnn --flip-features``).

    ``workers`` > 0 decodes in that many worker processes (overlapping the forward: the choice for
    an accelerator); ``workers`` = 0 decodes in this process, in ``torch.get_num_threads()`` threads taking
    turns with the forward (the choice on a CPU, where the forward already uses every core). However many,
    the pixels in flight (images being decoded, their crops waiting for the CNN) stay within ``budget``
    (:func:`vsa.images.pixel_budget`; an image over it is prepared alone).
    Work is saved every ``part_every`` images into ``<out>.parts/`` (each part atomic). Rerunning
    with the same ``out`` and settings skips images found in a part or in a finished ``out``
    (resume; also after Ctrl-C or SIGTERM); at the end everything is merged into ``out`` in input
    order and the parts are removed. ``out`` then holds exactly the images of ``items``.
    One run writes ``out`` at a time: ``<out>.lock`` is held throughout (:func:`vsa.io.output_lock`), and a
    second run on the same ``out`` is refused at once.
    """
    from vsa.io import output_lock

    out = Path(out)
    seen: dict[str, str] = {}
    for it in items:
        if it.key in seen:
            raise VsaError(f"two inputs have the same image key {it.key!r} ({seen[it.key]} and {it.path}); "
                           "give their common folder instead of the files", it.path)
        seen[it.key] = it.path
    np_dtype = np.dtype(dtype)
    meta = dict(extractor.meta)
    spec = CropSpec(crop, float(context), int(grid), int(cells), tuple(labels or ()))
    meta.update({"crop": crop, "context": float(context), "dtype": np_dtype.name})
    if spec.labels:
        from vsa.features.featuriser import label_width

        meta["labels"] = list(spec.labels)
        meta["dim"] = int(meta["dim"]) + label_width(spec.labels)
    if spec.cells:
        meta["cells"] = spec.cells
    if flip:
        meta["flip"] = True
    check_fmap(extractor, spec)
    if crop == "grid":
        if any(it.regions for it in items):
            raise VsaError("--crop grid takes images (the grid replaces detector boxes), not a regions JSONL")
        meta["grid"] = int(grid)
    if extra_meta:
        meta.update({k: v for k, v in extra_meta.items()})
    from vsa import __version__

    meta["vsa"] = __version__
    with output_lock(out, "vsa embed"):  # its parts and resume are one writer's: a second run is refused
        return _embed(items, out, extractor, meta, spec, np_dtype, batch_size, workers, resume, part_every, skip_bad,
                      max_pixels, warn, progress, budget)


def _embed(items, out: Path, extractor, meta: dict, spec: CropSpec, np_dtype, batch_size, workers, resume, part_every,
           skip_bad, max_pixels, warn, progress, budget) -> dict:
    import torch

    from vsa.features.store import load_features, save_features
    from vsa.images import PixelBudget, budgeted_batches, close_pool, pixel_budget, worker_pool

    parts_dir = out.with_name(out.name + ".parts")
    settings = feature_settings(meta)
    if resume:
        sources, done = _load_done(parts_dir, out, settings, warn)
    else:
        for p in parts_dir.glob("part-*.npz") if parts_dir.exists() else []:
            p.unlink()
        sources, done = [], set()
    part_files = [p for p in sources if p != out]
    next_part = 1 + max([int(p.stem.split("-")[1]) for p in part_files], default=-1)
    todo = [it for it in items if it.key not in done]
    stats = {"images": len(items), "skipped_done": len(items) - len(todo), "bad": 0, "regions": 0}

    ds = _CropDataset(todo, extractor.prep, spec, max_pixels, meta.get("flip", False))
    threads = torch.get_num_threads()
    if workers > 0 and len(todo) > 1:  # worker processes decode ahead while the CNN runs
        (pool, load), window, turns = worker_pool(ds.__getitem__, workers), 4 * workers, False
    elif threads > 1:  # threads decode a window, then the CNN runs on it: they take turns for the cores
        (pool, load), turns = worker_pool(ds.__getitem__, threads, threads=True), True
        window = max(batch_size, 2 * threads)
    else:
        pool, load, window, turns = None, ds.__getitem__, 1, False
    budget = pixel_budget(budget, max_pixels)
    total = budget.total if isinstance(budget, PixelBudget) else budget
    batches = budgeted_batches(len(todo), ds.cost, load, budget, batch_size, weight=ds.weight, held=ds.held,
                               pool=pool, window=window, turns=turns,
                               here=(total // 4, ds.__getitem__) if workers > 0 else None)
    rows: list[dict] = []
    pending: list[dict] = []
    pending_n = 0
    task = progress.add_task("embed", total=len(todo)) if progress is not None else None

    def flush_forward():
        nonlocal pending, pending_n
        if not pending:
            return
        feats = forward(extractor, pending, spec)
        s = 0
        for p in pending:
            n = p["n"]
            rows.append({"key": todo[p["index"]].key, "feats": feats[s : s + n].astype(np_dtype),
                         "regions": p["regions"], "size": p["size"]})
            s += n
        pending, pending_n = [], 0

    def flush_part():
        nonlocal rows, next_part
        if rows:
            p = parts_dir / f"part-{next_part:05d}.npz"
            parts_dir.mkdir(parents=True, exist_ok=True)
            save_features(p, rows, np_dtype, meta)
            part_files.append(p)
            next_part += 1
            rows = []

    since_part = 0
    finished = False
    try:
        for batch in batches:
            for item in batch:
                if "error" in item:
                    if not skip_bad:
                        raise VsaError(item["error"])
                    stats["bad"] += 1
                    if warn:
                        warn(f"skipped: {item['error']}")
                else:
                    pending.append(item)
                    pending_n += len(item["crops"])
                    stats["regions"] += item["n"]
                    if pending_n >= batch_size:
                        flush_forward()
                since_part += 1
                if progress is not None:
                    progress.advance(task)
                if since_part >= part_every:
                    flush_forward()
                    flush_part()
                    since_part = 0
            item = None  # noqa: F841  the batch's pixels are released when the next is asked for: hold none of it
            flush_forward()
        finished = True
    except BaseException:
        flush_part()  # keep what is finished (Ctrl-C, SIGTERM, a bad image): a rerun resumes from it
        raise
    finally:
        batches.close()
        close_pool(pool, abort=not finished)
    flush_part()
    # merge: parts and the earlier output, in input order, only the images asked for
    order = {it.key: i for i, it in enumerate(items)}
    by_key: dict[str, dict] = {}
    for p in ([out] if out in sources else []) + part_files:
        st = load_features(p, mmap=False)
        for i, k in enumerate(st.keys):
            if k in order:
                by_key[k] = st.image(i)
    all_rows = sorted(by_key.values(), key=lambda r: order[r["key"]])
    save_features(out, all_rows, np_dtype, meta)
    for p in part_files:
        p.unlink(missing_ok=True)
    if parts_dir.exists():
        try:
            parts_dir.rmdir()
        except OSError:
            pass
    stats["written"] = len(all_rows)
    return stats


# ----------------------------------------------------------------------------- dataset images as a checkpoint's training features


def _detections_part(out: Path, detector: str, top: int) -> Path:
    return out.with_name(f"{out.name}.regions-{detector}-top{top}.jsonl")


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(-1, 2)
        return fh.read(1)


def _read_detections(part: Path) -> dict:
    """``{key: regions record}`` of a detections part; a torn last line is left out (its image is detected again)."""
    from vsa.io import loads

    found: dict = {}
    if part.exists():
        with open(part, "rb") as fh:
            for line in fh:
                try:
                    rec = loads(line)
                except ValueError:
                    continue
                if isinstance(rec, dict) and isinstance(rec.get("key"), str) and isinstance(rec.get("regions"), list):
                    found[rec["key"]] = rec
    return found


def embed_like_training(files: list, out, extractor_meta: dict, detector=None, top: int = 19, device: str = "auto",
                        cnn_weights=None, workers: int = 1, batch_size: int = 8, progress=None, warn=None,
                        jit: bool = True, max_pixels: int | None = None, flip: bool = False,
                        resume: bool = False) -> Path:
    """Write the features NPZ of image files ``[(path, key)]`` at ``out`` as ``vsa regions FILES | vsa embed``
    made the training features described by ``extractor_meta`` (a checkpoint's ``extractor``): the CNN it
    names with its crop, context, grid and dtype, on the boxes of ``detector`` (a detector spec or a loaded
    detector; region features only, :func:`vsa.features.featuriser.uses_detector`); ``flip``: of the mirrored images, as
    ``vsa embed --flip`` makes them. ``resume``: keep finished work beside ``out`` as it is made (the detections in
    ``<out>.regions-<detector>-top<top>.jsonl``, the features in ``<out>.parts/``, :func:`embed`) and take up
    what an interrupted run with the same ``out`` left; removed when ``out`` is written. ``<out>.lock`` is held
    throughout (:func:`vsa.io.output_lock`): a second run on the same ``out`` is refused before it detects anything."""
    import contextlib

    from vsa.errors import writing
    from vsa.io import output_lock

    out = Path(out)
    with output_lock(out, "vsa eval"):  # its detections part and embed's parts are one run's: a second is refused
        meta = dict(extractor_meta or {})
        extra = {}
        det_part = None
        if uses_detector(meta):
            from vsa.io import dumps
            from vsa.regions import DetectOptions, detect_files, load_detector

            det = detector if hasattr(detector, "detect") else load_detector(detector, device)
            want = meta.get("detector")
            if warn is not None and want and det.name != want:
                warn(f"the model was trained on {want} regions; these come from {det.name}")
            task = progress.add_task("regions", total=len(files)) if progress is not None else None
            det_part = _detections_part(out, det.name, top) if resume else None
            found = _read_detections(det_part) if det_part is not None else {}
            todo = [(path, key) for path, key in files if key not in found]
            if task is not None:
                progress.advance(task, len(files) - len(todo))
            if det_part is not None:
                det_part.parent.mkdir(parents=True, exist_ok=True)
            keep = open(det_part, "ab") if det_part is not None else contextlib.nullcontext()
            with writing(det_part or out), keep as fh:
                if fh is not None and fh.tell() and _last_byte(det_part) != b"\n":
                    fh.write(b"\n")  # after a torn last line: the next record starts a line of its own
                for rec, err in detect_files(det, todo, DetectOptions(top=top), workers=workers, max_pixels=max_pixels):
                    if err is not None:
                        raise VsaError(err)
                    found[rec["key"]] = rec
                    if fh is not None:  # kept as it is made: an interrupted run detects only the rest
                        fh.write(dumps(rec) + b"\n")
                        fh.flush()
                    if task is not None:
                        progress.advance(task)
            items = [EmbedItem(key, found[key]["path"], found[key]["regions"]) for _, key in files]
            extra["detector"] = det.name
        else:
            items = [EmbedItem(key, str(path), None) for path, key in files]
        spec = CropSpec.from_meta(meta)
        ex = load_extractor(meta.get("extractor") or "efficientnet-lite0", str(cnn_weights) if cnn_weights else None,
                            device, jit)
        want = meta.get("input")
        if want and int(want) != int(ex.input_size):
            raise VsaError(f"the model was trained on {want}px inputs but {ex.name} uses {ex.input_size}px")
        embed(items, out, ex, batch_size=batch_size, workers=workers, context=spec.context, crop=spec.crop,
              dtype=meta.get("dtype") or "float16", resume=resume, max_pixels=max_pixels, progress=progress, warn=warn,
              extra_meta=extra, grid=spec.grid, cells=spec.cells, flip=flip, labels=spec.labels)
        if det_part is not None:
            det_part.unlink(missing_ok=True)
        return out


def features_for_eval(model_path, ds, split: str, workdir, features=None, detector=None, device: str = "auto",
                      cache: dict | None = None, progress=None, warn=None, note=None, jit: bool = True,
                      max_pixels: int | None = None, flip: bool = False, resume: bool = False) -> Path:
    """The features NPZ to evaluate the checkpoint at ``model_path`` on ``split`` of ``ds``: an existing one
    (:func:`vsa.checkpoint.trained_features`), else computed from the dataset's images into ``workdir``
    (:func:`embed_like_training`; ``cache`` shares one computation between models whose training features were
    made alike; ``resume``: finished work is kept in ``workdir`` as it is made and an interrupted run's taken up).
    ``flip``: the features of the mirrored images (the model's ``flip_features``, else computed)."""
    from vsa.checkpoint import load_checkpoint, trained_features

    ck = load_checkpoint(model_path)
    found = trained_features(ck, features, "flip_features" if flip else "features")
    if found is not None:
        return found
    meta = ck.get("extractor") or {}
    what = "region" if uses_detector(meta) else "grid" if meta.get("crop") == "grid" else "whole-image"
    if ds.image_root is None:
        if flip:
            raise VsaError(f"no features of the mirrored images to evaluate {model_path} on (its decoding.mirror): pass "
                           "--mirror-features NPZ (from `vsa embed ... --flip`), --images DIR to compute them, or --mirror 0")
        raise VsaError(f"no {what} features to evaluate {model_path} on: pass --features NPZ (from `vsa embed`) "
                       "or --images DIR to compute them from the images")
    recs = ds.split(split)
    key = json.dumps([feature_settings(meta), uses_detector(meta), str(detector), flip], sort_keys=True)
    if cache is not None and key in cache:
        return cache[key]
    if note is not None:
        what, flag = ("mirrored " + what, "--mirror-features") if flip else (what, "--features")
        note(f"computing {what} features of the {len(recs)} {split} images in {ds.image_root} for {Path(model_path).name} "
             f"(pass {flag} NPZ to reuse a `vsa embed` output)")
    import hashlib

    # named by what it holds, so a rerun in the same ``workdir`` resumes this file (``resume``) and no other
    out = Path(workdir) / f"features-{hashlib.sha1(key.encode()).hexdigest()[:12]}.npz"
    if resume and note is not None and (out.with_name(out.name + ".parts").exists()
                                        or any(out.parent.glob(out.name + ".regions-*.jsonl"))):
        note(f"resuming the {what} features an interrupted run left in {out.parent}")
    embed_like_training([(ds.image_path(r), r.key) for r in recs], out, meta, detector=detector, device=device,
                        progress=progress, warn=warn, jit=jit, max_pixels=max_pixels, flip=flip, resume=resume)
    if cache is not None:
        cache[key] = out
    return out
