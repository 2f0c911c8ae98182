"""Retrieval evaluation of an aligner (``vsa eval`` with an ``align`` checkpoint): the paper's protocol.

All images of the split against all their sentences (Flickr8k test: 1000 x 5000), R@1/5/10 and
median rank for image annotation (image -> sentences) and image search (sentence -> images),
beside the paper's numbers (Table 1, "Our model: BRNN").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vsa.errors import VsaError

# Karpathy & Fei-Fei 2015, Table 1, "Our model: BRNN" (Flickr8k, Flickr30k, COCO 1K test images)
PAPER = {
    "flickr8k": {"i2t": {"r1": 16.5, "r5": 40.6, "r10": 54.2, "medr": 7.6}, "t2i": {"r1": 11.8, "r5": 32.1, "r10": 44.7, "medr": 12.4}},
    "flickr30k": {"i2t": {"r1": 22.2, "r5": 48.2, "r10": 61.4, "medr": 4.8}, "t2i": {"r1": 15.2, "r5": 37.7, "r10": 50.5, "medr": 9.2}},
    "coco": {"i2t": {"r1": 38.4, "r5": 69.9, "r10": 80.5, "medr": 1.0}, "t2i": {"r1": 27.4, "r5": 60.2, "r10": 74.8, "medr": 3.0}},
}
TOP = 10  # ranked items kept per query in --ranks-out


def _features_for(ckpt: dict, features) -> Path:
    """``features`` if given, else the features file the aligner was trained on (its checkpoint names it)."""
    from vsa.checkpoint import trained_features

    found = trained_features(ckpt, features)
    if found is not None:
        return found
    trained = (ckpt.get("meta") or {}).get("features")
    raise VsaError("no features for the evaluation: pass --features NPZ"
                   + (f" (the model was trained on {trained}, which is missing)" if trained else ""))


def _model_scores(model_path, ds, split: str, features=None, device: str = "auto", hubness=None):
    """``(scores [images, sentences], split data, features path, checkpoint, raw scores)`` of one aligner; with
    ``hubness`` (a :class:`vsa.retrieval.HubnessConfig`) the scores are corrected with a bank of the dataset's
    training images and sentences (:func:`hub_correct`) and ``raw`` holds the uncorrected ones, else it is None."""
    from vsa.alignment.model import aligner_from_checkpoint
    from vsa.checkpoint import load_checkpoint
    from vsa.runtime import pick_device
    from vsa.features.store import load_features
    from vsa.retrieval import check_finite_features, check_finite_scores, score_matrix
    from vsa.features.store import check_extractor
    from vsa.splits import retrieval_split

    ckpt = load_checkpoint(model_path, kind="align")
    aligner = aligner_from_checkpoint(ckpt, model_path, pick_device(device))
    feats_path = _features_for(ckpt, features)
    store = load_features(feats_path)
    check_extractor(aligner.extractor_meta, store.meta, feats_path)
    from vsa.alignment.model import check_rows, region_rows

    check_rows(aligner.cfg, store)
    R = region_rows(aligner.cfg)
    data = retrieval_split(ds, split, store, aligner.vocab, R, aligner.cfg.max_len)
    check_finite_features(data.feats, data.keys, feats_path)
    S = score_matrix(aligner.model, data.feats, data.rmask, data.ids, data.lengths)
    check_finite_scores(S, "the aligner's scores", model_path)
    if hubness is None:
        return S, data, feats_path, ckpt, None
    return hub_correct(aligner, S, data, ds, split, store, hubness), data, feats_path, ckpt, S


def hub_correct(aligner, scores, data, ds, split: str, store, cfg) -> np.ndarray:
    """``scores`` of ``data`` corrected for hubness (:class:`vsa.retrieval.HubnessConfig` ``cfg``) with a bank of the
    first ``cfg.bank`` training images of ``ds`` and their sentences, read from the same features ``store``."""
    from vsa.alignment.model import region_rows
    from vsa.retrieval import bank_means, check_finite_features, check_finite_scores, debias, score_matrix
    from vsa.splits import retrieval_split

    if split == "train":
        raise VsaError("hubness correction takes its bank from the train split: evaluate val or test")
    train = [r for r in ds.split("train") if r.sentences][: cfg.bank]  # the bank's images, as retrieval_split takes them
    missing = [r.key for r in train if store.find(r.key) is None]
    if missing or not train:
        raise VsaError("hubness correction needs the dataset's training images in the features file (its bank: the "
                       f"first {cfg.bank} train images){'; missing: ' + missing[0] if missing else ''}", store.path)
    bank = retrieval_split(ds, "train", store, aligner.vocab, region_rows(aligner.cfg), aligner.cfg.max_len,
                           limit=cfg.bank)
    check_finite_features(bank.feats, bank.keys, store.path)
    m = aligner.model
    img_hub = bank_means(score_matrix(m, data.feats, data.rmask, bank.ids, bank.lengths), cfg.k, 1)
    sent_hub = bank_means(score_matrix(m, bank.feats, bank.rmask, data.ids, data.lengths), cfg.k, 0)
    out = debias(scores, img_hub, sent_hub, cfg.weight)
    check_finite_scores(out, "the hubness-corrected scores", aligner.path)  # float32 may overflow where float64 did not
    return out


def combine_scores(mats: list[np.ndarray], weights: list[float] | None = None) -> np.ndarray:
    """Ensemble of aligners: each score matrix standardised (its own mean and std over all pairs, so
    models with different score ranges count alike), then the weighted mean (equal by default)."""
    w = np.ones(len(mats)) if not weights else np.asarray(weights, dtype=np.float64)
    if len(w) != len(mats):
        raise VsaError(f"{len(w)} weights for {len(mats)} models")
    out = np.zeros_like(mats[0], dtype=np.float64)
    for m, wi in zip(mats, w):
        out += wi * (m - m.mean()) / max(float(m.std()), 1e-12)
    return (out / w.sum()).astype(np.float32)


def evaluate_aligner(model_path, ds, split: str, features=None, ranks_out=None, device: str = "auto",
                     weights: list[float] | None = None, rerank=None, rerank_features=None, rerank_cfg=None,
                     progress=None, hubness=None) -> dict:
    """Retrieval metrics of the aligner at ``model_path`` on ``split`` of ``ds`` (see docs/formats.md).

    ``model_path`` may be a list of aligners: their standardised scores are averaged (an ensemble;
    each model reads the features it was trained on unless ``features`` is given: then a list, one
    features file (or None) per model).
    ``rerank``: a generator checkpoint that re-ranks the aligners' best candidates of every query
    (:func:`vsa.rerank.pmi_rerank`, ``rerank_cfg`` a :class:`vsa.rerank.RerankConfig`) on the features file
    ``rerank_features``; the report's figures are then the re-ranked ones, ``rerank`` holds the aligners' own.
    ``hubness``: a :class:`vsa.retrieval.HubnessConfig`: each aligner's scores are corrected for hubness with a bank
    of the dataset's training items (before the ensemble and the re-ranking); ``hubness`` in the report holds its
    settings and the uncorrected figures."""
    from vsa.retrieval import check_finite_scores, retrieval_metrics

    paths = list(model_path) if isinstance(model_path, (list, tuple)) else [model_path]
    if isinstance(features, (list, tuple)):
        if len(features) != len(paths):
            raise VsaError(f"{len(features)} features files for {len(paths)} models")
        per_model = list(features)
    else:
        per_model = [features if len(paths) == 1 else None] * len(paths)
    runs = [_model_scores(p, ds, split, f, device, hubness) for p, f in zip(paths, per_model)]
    data = runs[0][1]
    for p, (_, d, _, _, _) in zip(paths[1:], runs[1:]):
        if d.keys != data.keys or d.sentids != data.sentids:
            raise VsaError("the ensemble's models see different images or sentences of the split "
                           "(features files with different images?)", p)
    scores = runs[0][0] if len(runs) == 1 else combine_scores([r[0] for r in runs], weights)
    owner = data.sent_image.numpy()
    m = retrieval_metrics(scores, owner)
    hub = None
    if hubness is not None:
        raw = runs[0][4] if len(runs) == 1 else combine_scores([r[4] for r in runs], weights)
        bank = [r for r in ds.split("train") if r.sentences][: hubness.bank]
        hub = {"k": hubness.k, "weight": hubness.weight, "bank": len(bank), "bank_sentences": sum(len(r.sentences) for r in bank),
               "aligner": retrieval_metrics(raw, owner)}
    search = None
    if rerank is not None:
        first = m
        (scores, search), rr = _rerank(scores, data, ds, split, rerank, rerank_features, rerank_cfg, device, progress)
        check_finite_scores(scores, "the re-ranked scores (the generator's log-probabilities?)", rerank)
        check_finite_scores(search, "the re-ranked scores (the generator's log-probabilities?)", rerank)
        m = retrieval_metrics(scores, owner, search)
        rr["aligner"] = {k: first[k] for k in ("i2t", "t2i", "rsum")}
    name = " + ".join(str(p) for p in paths)
    cfgs = [{k: {**r[3]["model"], **r[3]["train"]}.get(k) for k in ("model", "rnn", "score", "hidden", "loss")} for r in runs]
    report = {"model": name, "features": " + ".join(str(r[2]) for r in runs), "images": len(data.keys),
              "sentences": len(data.ids), "i2t": m["i2t"], "t2i": m["t2i"], "rsum": m["rsum"],
              "config": cfgs[0] if len(cfgs) == 1 else cfgs}
    if len(runs) > 1:
        report["ensemble"] = {"models": [str(p) for p in paths], "weights": list(weights or [1.0] * len(paths)),
                              "members": [retrieval_metrics(r[0], owner)["rsum"] for r in runs]}
    if rerank is not None:
        report["rerank"] = rr
    if hub is not None:
        report["hubness"] = hub
    paper = PAPER.get(_paper_key(ds.name))
    if paper:
        report["paper"] = paper
    if ranks_out is not None:
        write_ranks(ranks_out, ds, split, data, scores, name, search)
    return report


def _rerank(scores, data, ds, split: str, gen_path, features, cfg, device, progress):
    """``((annotation scores, search scores), report section)`` of the generator ``gen_path`` re-ranking ``scores``."""
    import time

    from vsa.features.store import load_features
    from vsa.rerank import RerankConfig, generator_logp, pmi_rerank

    cfg = cfg or RerankConfig()
    if features is None:
        raise VsaError("re-ranking needs the generator's features (--rerank-features NPZ)")
    t0 = time.time()
    store = load_features(features)
    tokens = {s.sentid: s.tokens for r in ds.split(split) for s in r.sentences}
    logp = generator_logp(gen_path, store, data.keys, [tokens[j] for j in data.sentids], device, progress)
    mats = pmi_rerank(scores, logp, cfg.k, cfg.weight)
    return mats, {"model": str(gen_path), "features": str(features), "k": cfg.k, "weight": cfg.weight,
                  "seconds": round(time.time() - t0, 1)}


def _paper_key(name: str) -> str:
    n = (name or "").lower()
    return "coco" if n.startswith("coco") else n


def ranks_record(ds, split: str, data, scores: np.ndarray, model: str, k: int = TOP,
                 search: np.ndarray | None = None) -> dict:
    """The ``--ranks-out`` JSON (docs/formats.md "Retrieval ranks JSON"); ``search``: the sentences' own score
    matrix when it is not ``scores`` (re-ranking)."""
    from vsa.retrieval import i2t_ranks, t2i_ranks, top_k

    owner = data.sent_image.numpy()
    tscores = scores if search is None else search
    ri, rt = i2t_ranks(scores, owner), t2i_ranks(tscores, owner)
    top_s, top_i = top_k(scores, k, axis=1), top_k(tscores, k, axis=0)
    text = {s.sentid: s.raw for r in ds.split(split) for s in r.sentences}
    images = []
    for i, key in enumerate(data.keys):
        images.append({"key": key, "gt": [data.sentids[j] for j in np.flatnonzero(owner == i)], "rank": int(ri[i]),
                       "top": [data.sentids[j] for j in top_s[i]],
                       "top_scores": [round(float(scores[i, j]), 4) for j in top_s[i]]})
    sentences = []
    for j, sid in enumerate(data.sentids):
        sentences.append({"sentid": sid, "text": text.get(sid, ""), "gt": data.keys[owner[j]], "rank": int(rt[j]),
                          "top": [data.keys[i] for i in top_i[j]],
                          "top_scores": [round(float(tscores[i, j]), 4) for i in top_i[j]]})
    return {"split": split, "dataset": ds.name, "model": model, "k": k, "images": images, "sentences": sentences}


def write_ranks(path, ds, split: str, data, scores: np.ndarray, model: str, search: np.ndarray | None = None) -> None:
    from vsa.io import write_json

    write_json(path, ranks_record(ds, split, data, scores, model, search=search))


def _fmt(x) -> str:
    if isinstance(x, float) and not x.is_integer():
        return f"{x:.1f}"
    return f"{int(x)}" if isinstance(x, (int, float)) else str(x)


def render_retrieval(report: dict, console) -> None:
    """A rich table: our R@1/5/10 and median rank in both directions, the paper's beside them."""
    from rich.table import Table

    cfg = report.get("config", {})
    name = "vsa ensemble" if isinstance(cfg, list) else f"vsa {cfg.get('model', '')}".strip()
    rr, hub = report.get("rerank"), report.get("hubness")
    caption = f"{report['model']}" + (f", hubness-corrected (bank {hub['bank']}, k {hub['k']})" if hub else "") + (
        f", re-ranked by {rr['model']}" if rr else "")
    t = Table(title=f"Retrieval, {report['images']} images x {report['sentences']} sentences", title_justify="left",
              caption=caption, caption_justify="left")
    t.add_column("direction")
    t.add_column("metric")
    paper = report.get("paper")
    if paper:
        t.add_column("paper BRNN", justify="right", style="dim")
    stages = []  # (column, figures) before each correction, in order
    if hub:
        stages.append((name, hub["aligner"]))
        name = "+ hubness"
    if rr:
        stages.append((name, rr["aligner"]))
        name = f"+ re-ranked (top {rr['k']})"
    for col, _ in stages:
        t.add_column(col, justify="right")
    t.add_column(name, justify="right", style="bold")
    better = 0
    for d, label in (("i2t", "annotation (image->text)"), ("t2i", "search (text->image)")):
        for m, mlabel in (("r1", "R@1"), ("r5", "R@5"), ("r10", "R@10"), ("medr", "Med r")):
            row = [label if m == "r1" else "", mlabel]
            if paper:
                row.append(_fmt(paper[d][m]))
                better += (report[d][m] < paper[d][m]) if m == "medr" else (report[d][m] > paper[d][m])
            row += [_fmt(fig[d][m]) for _, fig in stages]
            row.append(_fmt(report[d][m]))
            t.add_row(*row, end_section=m == "medr")
    console.print(t)
    tail = f"rsum {report['rsum']:.1f}" + (f" (the aligner alone {stages[0][1]['rsum']:.1f})" if stages else "")
    if paper:
        tail = f"better than the paper on {better} of 8 figures; " + tail
    console.print(tail)
