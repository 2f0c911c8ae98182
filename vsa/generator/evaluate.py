"""Caption-generation evaluation for ``vsa eval`` (a generator checkpoint).

Generates one sentence per image of a split, scores it against the dataset's references
with pycocoevalcap (PTB tokenizer, BLEU-1..4, METEOR, ROUGE-L, CIDEr) and puts the paper's
numbers beside ours.
"""

from __future__ import annotations

import time
from pathlib import Path

from vsa.generator.metrics import KEYS
from vsa.errors import VsaError

# Karpathy & Fei-Fei, CVPR 2015, Table 2 (generation, full images); METEOR/CIDEr only for COCO
PAPER = {
    "flickr8k": {"BLEU-1": 57.9, "BLEU-2": 38.3, "BLEU-3": 24.5, "BLEU-4": 16.0},
    "flickr30k": {"BLEU-1": 57.3, "BLEU-2": 36.9, "BLEU-3": 24.0, "BLEU-4": 15.7},
    "coco": {"BLEU-1": 62.5, "BLEU-2": 45.0, "BLEU-3": 32.1, "BLEU-4": 23.0, "METEOR": 19.5, "CIDEr": 66.0},
}


def _features_path(ck: dict, features):
    """``features`` if given, else the features file the generator was trained on (its checkpoint names it)."""
    from vsa.checkpoint import trained_features

    found = trained_features(ck, features)
    if found is not None:
        return found
    raise VsaError("no features for the generator: pass --features NPZ (made with `vsa embed` by the same CNN "
                   f"the model was trained on: {ck.get('extractor', {}).get('extractor', '?')})")


def generate_split(model_path, ds, split: str, features=None, beam: int | None = None, length_penalty: float | None = None,
                   device: str = "auto", batch_size: int = 100, weights: list[float] | None = None,
                   mirror: float | None = None, mirror_features=None, detections: dict | None = None,
                   constrain: dict | None = None, progress=None):
    """Generated caption per image of ``split``: returns (records, captions, beam, length_penalty, mirror).
    ``model_path``: a generator checkpoint, or a list of them decoded as an ensemble
    (:class:`vsa.generator.model.GeneratorEnsemble`, ``weights`` per member; the decoding defaults are the first's).
    ``features``: a file (or None: the one the model was trained on), or for an ensemble one per member; members
    on different CNNs each read their own file (the first given for their CNN). ``mirror``: the weight of each
    image's mirror image (default: the model's ``decoding.mirror``); when above 0, ``mirror_features`` is the
    file of the mirrored images (`vsa embed ... --flip`, same settings; one backbone only). ``constrain``: the
    keyword arguments of :func:`vsa.labels.constraint_sets` (min_score, max_sets, skip): each caption must name
    the image's confidently detected classes (constrained beam search), read from ``detections`` (image key ->
    its detections, as ``vsa regions`` writes them). ``progress``: told of each batch of images captioned (an object
    with rich's ``add_task`` / ``advance``, as :func:`vsa.cli.common.progress` gives; None: silent)."""
    import torch

    from vsa.checkpoint import load_checkpoint
    from vsa.data import Vocab
    from vsa.generator.decoding import constraints, decode, mirror_weight
    from vsa.features.store import FeatureStore, check_extractor
    from vsa.generator.model import load_generators, region_rows, uses_regions, with_mirror
    from vsa.retrieval import check_finite_features
    from vsa.runtime import pick_device
    from vsa.splits import split_features

    dev = pick_device(device)
    paths = list(model_path) if isinstance(model_path, (list, tuple)) else [model_path]
    given = list(features) if isinstance(features, (list, tuple)) else [features] * len(paths)
    if len(given) != len(paths):
        raise VsaError(f"{len(given)} features files for {len(paths)} generators")
    model, ck = load_generators(paths if len(paths) > 1 else paths[0], dev, weights, mixed_backbones=True)
    vocab = Vocab(ck["vocab"])
    stores = []
    for members in model.blocks if len(paths) > 1 else [[0]]:  # one features file per backbone, checked against its first member
        i = members[0]
        mck = ck if i == 0 else load_checkpoint(paths[i], "mrnn")
        fpath = _features_path(mck, given[i])
        store = FeatureStore(fpath)
        check_extractor(mck.get("extractor"), store.meta, fpath)
        dim = (model.members[i] if len(paths) > 1 else model).cfg.feat_dim
        if store.dim != dim:
            raise VsaError(f"features are {store.dim}-d but the model expects {dim}-d", fpath)
        stores.append(store)
    recs = stores[0].check_dataset(ds.split(split))
    for store in stores[1:]:
        store.check_dataset(recs)
    w = mirror_weight(model.decoding.mirror, mirror)
    if w:
        if len(stores) > 1:
            raise VsaError("mirror decoding of an ensemble across backbones is not supported: pass --mirror 0")
        if mirror_features is None:
            raise VsaError(f"this generator decodes each image with its mirror image (decoding.mirror {w:g}): pass "
                           "--mirror-features NPZ (`vsa embed IMAGES ... --flip`, the settings of --features) or --mirror 0")
        flipped = FeatureStore(mirror_features)
        check_extractor(ck.get("extractor"), flipped.meta, mirror_features)
        if not flipped.meta.get("flip"):
            raise VsaError("the mirror features are not of mirrored images (made without `vsa embed --flip`)",
                           mirror_features)
        if flipped.dim != stores[0].dim:
            raise VsaError(f"mirror features are {flipped.dim}-d but the model expects {stores[0].dim}-d", mirror_features)
        flipped.check_dataset(recs)
        stores.append(flipped)
        model = with_mirror(model, w)
    b = int(beam if beam is not None else model.decoding.beam)
    lp = float(length_penalty if length_penalty is not None else model.decoding.length_penalty)
    caps: list[str] = []
    cons = constraints(model.decoding, vocab)
    regions, rows = uses_regions(model.cfg), region_rows(model.cfg)
    task = progress.add_task("captioning", total=len(recs)) if progress is not None else None
    for s in range(0, len(recs), batch_size):
        keys = [r.key for r in recs[s : s + batch_size]]
        parts = [split_features(store, keys, regions, rows) for store in stores]
        for store, (pf, _) in zip(stores, parts):  # a NaN feature would decode as a confident caption
            check_finite_features(pf, keys, store.path)
        f, m = parts[0]
        if len(parts) > 1:
            if any(p[0].shape[:-1] != f.shape[:-1] or (m is not None and not torch.equal(p[1], m)) for p in parts[1:]):
                raise VsaError("the ensemble's features files have other regions for the same images (same regions JSONL?)")
            f = torch.cat([p[0] for p in parts], -1)
        f = f.to(dev)
        m = m.to(dev) if m is not None else None
        if constrain is not None:
            from vsa.generator.decoding import constrained_beam_search
            from vsa.labels import constraint_sets

            sets = [constraint_sets((detections or {}).get(k, []), vocab.stoi, **constrain)[0] for k in keys]
            hyps = constrained_beam_search(model, f, m, sets, b, model.decoding.max_len, lp, **cons)
        else:
            hyps = decode(model, f, m, b, model.decoding.max_len, lp, **cons)
        for h in hyps:
            caps.append(" ".join(vocab.decode(h.tokens)))
        if progress is not None:
            progress.advance(task, len(keys))
    return recs, caps, b, lp, w


def evaluate_generator(model_path, ds, split, features=None, beam=None, captions_out=None, device="auto",
                       weights: list[float] | None = None, mirror: float | None = None, mirror_features=None,
                       progress=None) -> dict:
    """Caption metrics of a generator (or of a list of them as an ensemble, ``weights`` per member) on ``split``
    (``mirror``, ``mirror_features``, ``progress``: :func:`generate_split`)."""
    from vsa.generator.metrics import score_captions

    t0 = time.time()
    recs, caps, b, lp, w = generate_split(model_path, ds, split, features, beam, None, device, weights=weights,
                                          mirror=mirror, mirror_features=mirror_features, progress=progress)
    ids = [r.cocoid if r.cocoid is not None else r.imgid for r in recs]
    gts = {i: [s.raw for s in r.sentences] for i, r in zip(ids, recs)}
    res = dict(zip(ids, caps))
    scores = score_captions(gts, res, tokenizer="ptb")
    if captions_out is not None:
        from vsa.io import write_json

        write_json(captions_out, [{"image_id": i, "caption": c} for i, c in zip(ids, caps)])
    many = isinstance(model_path, (list, tuple))
    out = {"model": " + ".join(map(str, model_path)) if many else str(model_path), "beam": b, "length_penalty": lp,
           "mirror": w, **({"mirror_features": str(mirror_features)} if w else {}), "images": len(recs), **scores, "paper": PAPER.get(ds.name, {}), "seconds": round(time.time() - t0, 1)}
    if many:
        out["ensemble"] = {"models": [str(p) for p in model_path], "weights": list(weights or [1.0] * len(model_path))}
    return out


def render_generation(report: dict, console) -> None:
    from rich.table import Table

    paper = report.get("paper") or {}
    t = Table(title=f"caption generation: {report['model']} (beam {report['beam']}, {report['images']} images)")
    t.add_column("metric")
    t.add_column("paper", justify="right")
    t.add_column("ours", justify="right")
    for k in KEYS:
        if k in report:
            p = paper.get(k)
            t.add_row(k, "-" if p is None else f"{p:.1f}", f"{report[k]:.1f}")
    console.print(t)
