"""Features of dataset images made the way a checkpoint's training features were (``vsa eval --images``).

The same two stages as ``vsa regions IMAGES | vsa embed``: the detector's boxes (:func:`vsa.regions.detect_files`),
then the CNN the checkpoint names with its crop, context and dtype (:func:`vsa.features.embed`), into a features
NPZ. Region features are made when the training features were (the checkpoint's extractor meta names a
detector), whole-image features otherwise.
"""

from __future__ import annotations

from pathlib import Path

from vsa.errors import VsaError


def needs_regions(extractor_meta: dict) -> bool:
    """Were the training features made from detector boxes (``vsa regions | vsa embed``)?"""
    return bool(extractor_meta.get("detector")) and extractor_meta.get("crop") != "grid"


def embed_like_training(files: list, out, extractor_meta: dict, detector=None, top: int = 19, device: str = "auto",
                        cnn_weights=None, workers: int = 1, batch_size: int = 8, progress=None, warn=None) -> Path:
    """Write the features NPZ of image files ``[(path, key)]`` at ``out`` as the training features described by
    ``extractor_meta`` (a checkpoint's ``extractor``) were made; ``detector`` (a ``--detector`` value) for region
    features."""
    from vsa.features import EmbedItem, embed, load_extractor

    meta = dict(extractor_meta or {})
    extra = {}
    if needs_regions(meta):
        from vsa.regions import DetectOptions, detect_files, load_detector

        det = load_detector(detector, device)
        want = meta.get("detector")
        if warn is not None and want and det.name != want:
            warn(f"the model was trained on {want} regions; these come from {det.name}")
        task = progress.add_task("regions", total=len(files)) if progress is not None else None
        items = []
        for rec, err in detect_files(det, files, DetectOptions(top=top), workers=workers):
            if err is not None:
                raise VsaError(err)
            items.append(EmbedItem(rec["key"], rec["path"], rec["regions"]))
            if task is not None:
                progress.advance(task)
        extra["detector"] = det.name
    else:
        items = [EmbedItem(key, str(path), None) for path, key in files]
    crop = meta.get("crop") or "warp"
    if crop == "grid":
        extra_args = {"grid": int(meta.get("grid") or 7)}
    else:
        extra_args = {}
    ex = load_extractor(meta.get("extractor") or "efficientnet-lite0", str(cnn_weights) if cnn_weights else None, device)
    want = meta.get("input")
    if want and int(want) != int(ex.input_size):
        raise VsaError(f"the model was trained on {want}px inputs but {ex.name} uses {ex.input_size}px")
    embed(items, out, ex, batch_size=batch_size, workers=workers, context=float(meta.get("context") or 0.0), crop=crop,
          dtype=meta.get("dtype") or "float16", resume=False, progress=progress, warn=warn, extra_meta=extra,
          **extra_args)
    return Path(out)


def trained_features(ckpt: dict, features=None) -> Path | None:
    """The features file an evaluation of ``ckpt`` reads without computing any: ``features`` (--features), else
    the file it was trained on, else [features] of vsa.toml; None when there is none."""
    if ckpt["kind"] == "align":
        from vsa.eval_align import _features_for as lookup
    else:
        from vsa.eval_caption import _features_path as lookup
    try:
        return Path(lookup(ckpt, features))
    except VsaError:
        return None


def features_for_eval(model_path, ds, split: str, workdir, features=None, detector=None, device: str = "auto",
                      cache: dict | None = None, progress=None, warn=None, note=None) -> Path:
    """The features NPZ to evaluate the checkpoint at ``model_path`` on ``split`` of ``ds``: an existing one
    (:func:`trained_features`), else computed from the dataset's images into ``workdir`` (``cache`` shares one
    computation between models whose training features were made alike)."""
    import json

    from vsa.checkpoint import load_checkpoint

    ck = load_checkpoint(model_path)
    found = trained_features(ck, features)
    if found is not None:
        return found
    meta = ck.get("extractor") or {}
    what = "region" if needs_regions(meta) else "grid" if meta.get("crop") == "grid" else "whole-image"
    if ds.image_root is None:
        raise VsaError(f"no {what} features to evaluate {model_path} on: pass --features NPZ (from `vsa embed`) "
                       "or --images DIR to compute them from the images")
    recs = ds.split(split)
    settings = {k: meta.get(k) for k in ("extractor", "input", "resize", "mean", "std", "crop", "context", "dtype", "grid")}
    key = json.dumps([settings, needs_regions(meta), str(detector)], sort_keys=True)
    if cache is not None and key in cache:
        return cache[key]
    if note is not None:
        note(f"computing {what} features of the {len(recs)} {split} images in {ds.image_root} for {Path(model_path).name} "
             "(pass --features NPZ to reuse a `vsa embed` output)")
    out = Path(workdir) / f"features-{len(cache or {})}.npz"
    embed_like_training([(ds.image_path(r), r.key) for r in recs], out, meta, detector=detector, device=device,
                        progress=progress, warn=warn)
    if cache is not None:
        cache[key] = out
    return out
