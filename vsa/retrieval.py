"""Image-sentence retrieval metrics: R@K and median rank, both directions (the paper's protocol).

The paper evaluates on the test split (Flickr8k: 1000 images x 5000 sentences):

* image annotation (``i2t``): for each image, the rank of the best-ranked of its ground-truth
  sentences among all sentences;
* image search (``t2i``): for each sentence, the rank of its image among all images.

``R@K`` is the percentage of queries whose rank is at most K; ``medr`` the median rank
(1-based; with an even number of queries the mean of the two middle ranks, so it can end in .5).
A wrong item that ties with the right one ranks ahead of it: a model that scores everything alike (constant
features, a collapsed model) ranks at chance or worse, never first. NaN or infinite scores have no rank: they
are an error.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vsa.errors import VsaError

KS = (1, 5, 10)


@dataclass
class HubnessConfig:
    """Hubness correction with a bank of training items (``vsa eval --hubness``; flags override): every score
    ``S(i, j)`` loses ``weight`` x (the mean of image i's ``k`` best scores against the bank's sentences + the mean of
    sentence j's ``k`` best scores against the bank's images), so an image (or sentence) that scores high with
    everything stops crowding the top of every list (CSLS, Lample et al. 2018; QB-Norm, Bogolin et al. 2022, with
    a bank of training queries). Within one row or column one of the two terms is a constant, so annotation is
    corrected by the sentences' term and search by the images'. Defaults chosen on Flickr8k val
    (docs/alignment.md, "Hubness correction")."""

    k: int = 50  # bank neighbours averaged per item
    weight: float = 0.75  # how much of that mean is subtracted
    bank: int = 1000  # the first this many training images, and their sentences, make the bank


@dataclass
class IndexHubnessConfig:
    """Hubness correction in ``vsa search text``: an aligner carries the sentences of its first ``images`` training
    images (its bank, saved by ``vsa train-align``; 1000 sentences on Flickr8k); ``vsa search index`` stores each
    photo's mean of its ``k`` best scores against them, and a query ranks the photos by ``score - weight x`` that
    mean (the search direction of :class:`HubnessConfig`, with a bank small enough to index 10,000 photos
    quickly; chosen on Flickr8k val, docs/alignment.md)."""

    images: int = 200
    k: int = 10
    weight: float = 0.5


@dataclass
class SentenceHubnessConfig:
    """Hubness correction in ``vsa search sentences`` (image annotation): an aligner carries the region vectors of its
    first ``images`` training images (its image bank, ``image_bank`` in its meta); each sentence of the corpus is
    ranked by ``score - weight x`` the mean of its ``k`` best scores against them (the annotation direction of
    :class:`HubnessConfig`; chosen on Flickr8k val, docs/alignment.md)."""

    images: int = 200
    k: int = 20
    weight: float = 0.5


def bank_sentences(train_records, images: int = IndexHubnessConfig.images) -> list[str]:
    """The bank an aligner keeps for ``vsa search``: the sentences (tokens joined by spaces) of the first ``images``
    training records."""
    return [" ".join(s.tokens) for r in list(train_records)[:images] for s in r.sentences if s.tokens]


def bank_means(bank_scores: np.ndarray, k: int, axis: int) -> np.ndarray:
    """The mean of the ``k`` highest scores along ``axis`` of a score matrix against a bank (``axis`` 1: per image
    against bank sentences; 0: per sentence against bank images)."""
    s = np.asarray(bank_scores, dtype=np.float64)
    k = min(k, s.shape[axis])
    return -np.partition(-s, k - 1, axis=axis).take(range(k), axis=axis).mean(axis=axis)


def debias(scores: np.ndarray, image_hub: np.ndarray, sentence_hub: np.ndarray, weight: float) -> np.ndarray:
    """``scores [N, M] - weight * (image_hub [N] + sentence_hub [M])`` (:class:`HubnessConfig`)."""
    return (np.asarray(scores, np.float64) - weight * (np.asarray(image_hub)[:, None] + np.asarray(sentence_hub)[None, :])
            ).astype(np.float32)


class NonFiniteScores(VsaError):
    """Scores that hold NaN or infinite values (the model's weights, or the features it read)."""


def check_finite_scores(scores: np.ndarray, what: str = "scores", path=None) -> None:
    """A :class:`NonFiniteScores` error naming ``path`` unless every value of ``scores`` is finite: NaN compares
    false with everything, so it would rank first (or last) by accident."""
    s = np.asarray(scores)
    if not np.isfinite(s).all():
        bad = int((~np.isfinite(s)).sum())
        raise NonFiniteScores(f"{what}: {bad} of {s.size} scores are NaN or infinite (the model's weights or the "
                              "features it read hold NaN or infinite values)", path)


def check_finite_features(feats, names, path=None, what: str = "features", chunk: int = 256) -> None:
    """A one-line error naming ``path`` and the first item of ``names`` whose features (``feats``: an array, a tensor
    or a :class:`vsa.features.store.RegionBank`, items along the first axis) hold NaN or infinite values; read ``chunk``
    items at a time."""
    import torch

    for a in range(0, len(feats), chunk):
        x = feats[a : a + chunk]
        ok = torch.isfinite(x).flatten(1).all(1) if isinstance(x, torch.Tensor) else np.isfinite(
            np.asarray(x).reshape(len(x), -1)).all(1)
        bad = np.flatnonzero(~np.asarray(ok))
        if len(bad):
            n = a + int(bad[0])
            raise VsaError(f"the {what} of {names[n]!r} hold NaN or infinite values", path)


def i2t_ranks(scores: np.ndarray, sent_image: np.ndarray) -> np.ndarray:
    """1-based rank of the first true sentence for every image. ``scores [N_img, N_sent]``, ``sent_image [N_sent]``.
    A wrong sentence that ties with the best true one ranks ahead of it; non-finite scores: :class:`NonFiniteScores`."""
    scores = np.asarray(scores)
    sent_image = np.asarray(sent_image)
    check_finite_scores(scores)
    n_img = scores.shape[0]
    ranks = np.empty(n_img, dtype=np.int64)
    for i in range(n_img):
        row = scores[i]
        mine = sent_image == i
        if not mine.any():
            raise ValueError(f"image {i} has no sentence")
        best = row[mine].max()
        ranks[i] = int(((row >= best) & ~mine).sum()) + 1  # a tie goes against the model
    return ranks


def t2i_ranks(scores: np.ndarray, sent_image: np.ndarray) -> np.ndarray:
    """1-based rank of the true image for every sentence; a wrong image that ties with it ranks ahead of it."""
    scores = np.asarray(scores)
    sent_image = np.asarray(sent_image)
    check_finite_scores(scores)
    true = scores[sent_image, np.arange(scores.shape[1])]
    return (scores >= true[None, :]).sum(0).astype(np.int64)  # counts the true image itself: rank 1 when alone


def summarize(ranks: np.ndarray, ks=KS) -> dict:
    """``{"r1": %, "r5": %, "r10": %, "medr": median rank, "meanr": mean rank}`` from 1-based ranks."""
    ranks = np.asarray(ranks)
    out = {f"r{k}": round(float(100.0 * (ranks <= k).mean()), 2) for k in ks}
    med = float(np.median(ranks))
    out["medr"] = int(med) if med.is_integer() else med
    out["meanr"] = round(float(ranks.mean()), 2)
    return out


def retrieval_metrics(scores: np.ndarray, sent_image: np.ndarray, t2i_scores: np.ndarray | None = None) -> dict:
    """Both directions plus ``rsum`` (sum of the six recalls, the model-selection figure); ``t2i_scores``: search
    ranked by another matrix than annotation (re-ranking, :mod:`vsa.rerank`)."""
    i2t = summarize(i2t_ranks(scores, sent_image))
    t2i = summarize(t2i_ranks(scores if t2i_scores is None else t2i_scores, sent_image))
    rsum = round(sum(i2t[f"r{k}"] + t2i[f"r{k}"] for k in KS), 2)
    return {"i2t": i2t, "t2i": t2i, "rsum": rsum}


def top_k(scores: np.ndarray, k: int, axis: int = 1) -> np.ndarray:
    """Indices of the ``k`` best scores along ``axis``, best first."""
    s = np.asarray(scores) if axis == 1 else np.asarray(scores).T
    k = min(k, s.shape[1])
    part = np.argpartition(-s, k - 1, axis=1)[:, :k]
    order = np.take_along_axis(s, part, 1).argsort(1)[:, ::-1]
    return np.take_along_axis(part, order, 1)


def score_matrix(model, feats, rmask, ids, lengths, img_chunk: int = 100, sent_chunk: int = 1000,
                 dtype=None) -> np.ndarray:
    """All image-sentence scores ``[N_img, N_sent]`` of ``model`` (eval mode, no grad), in chunks.

    ``feats [N, R, D]`` + ``rmask [N, R]``: padded region features; ``ids [M, T]`` + ``lengths [M]``.
    """
    import torch

    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    out = np.zeros((len(feats), len(ids)), dtype=np.float32)
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=getattr(dev, "type", str(dev)) == "cuda")
    with torch.inference_mode(), amp:
        Vs = []
        for a in range(0, len(feats), img_chunk):
            V, vm = model.embed_images(feats[a : a + img_chunk].to(dev), rmask[a : a + img_chunk].to(dev))
            Vs.append((V, vm))
        for b in range(0, len(ids), sent_chunk):
            idb, lb = ids[b : b + sent_chunk], lengths[b : b + sent_chunk]
            T = int(lb.max())
            S, sm = model.embed_sentences(idb[:, :T].to(dev), lb.to(dev))
            a = 0
            for V, vm in Vs:
                out[a : a + len(V), b : b + len(S)] = model.score(V, vm, S, sm).float().cpu().numpy()
                a += len(V)
    model.train(was_training)
    return out
