"""Generative re-ranking: an aligner's best candidates re-scored by a caption generator.

The aligner scores every image-sentence pair; for each query (an image in annotation, a sentence in search)
its ``k`` best candidates are re-scored with the generator's pointwise mutual information

    PMI(S, I) = log p(S | I) - log p(S),   p(S) ~ mean of p(S | I') over the sentence's k candidate images I'

(``log p(S | I)``: teacher forcing, ``<end>`` included). In search the sentence is fixed, so PMI orders the
images as the likelihood does; in annotation the prior keeps a common sentence ("a dog runs through the
grass") from winning every image. Within each query's list the aligner's score and the PMI are standardised
(mean 0, std 1 over the ``k`` candidates) and summed, the PMI weighted ``weight``; the candidates stay ahead of the
other items, which keep the aligner's order. See docs/alignment.md ("Re-ranking with the generator").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class RerankConfig:
    """Re-ranking defaults (``vsa eval --rerank``; flags override)."""

    k: int = 20  # candidates per query re-scored: the generator costs a forward per candidate (k chosen on val)
    weight: float = 4.0  # PMI against the aligner's score, both standardised per list (chosen on val)


def candidates(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(per image [N, k] sentence indices, per sentence [M, k] image indices)``, best first, of an
    ``[N images, M sentences]`` score matrix."""
    k_i, k_t = min(k, scores.shape[1]), min(k, scores.shape[0])
    per_image = np.argsort(-scores, axis=1, kind="stable")[:, :k_i]
    per_sentence = np.argsort(-scores, axis=0, kind="stable")[:k_t].T
    return per_image, per_sentence


def _standardise(x: np.ndarray) -> np.ndarray:
    sd = x.std(axis=-1, keepdims=True)
    return (x - x.mean(axis=-1, keepdims=True)) / np.where(sd > 0, sd, 1.0)


def combine(aligner_scores, logp, weight: float = RerankConfig.weight) -> np.ndarray:
    """One query's candidates re-scored: the aligner's scores and the generator's log-probabilities (or PMI),
    each standardised over the list (mean 0, std 1), summed with the generator's ``weight``."""
    return _standardise(np.asarray(aligner_scores, np.float64)) + weight * _standardise(np.asarray(logp, np.float64))


def pmi_rerank(scores: np.ndarray, logp, k: int = RerankConfig.k, weight: float = RerankConfig.weight):
    """Re-ranked ``(annotation scores, search scores)``, two ``[N, M]`` matrices (one per direction).

    ``scores``: the aligner's ``[N images, M sentences]``; ``logp(pairs)``: ``log p(sentence | image)`` for an
    ``[P, 2]`` array of (image, sentence) rows. Each direction's candidates get ``offset + z(aligner) + weight x
    z(PMI)`` (``offset`` above every aligner score), the rest keep their aligner score."""
    s = np.asarray(scores, dtype=np.float64)
    per_image, per_sentence = candidates(s, k)
    n, m = s.shape
    pairs = np.unique(np.concatenate([
        np.stack([np.repeat(np.arange(n), per_image.shape[1]), per_image.ravel()], 1),
        np.stack([per_sentence.ravel(), np.repeat(np.arange(m), per_sentence.shape[1])], 1)]), axis=0)
    ll = np.asarray(logp(pairs), dtype=np.float64)
    lookup = {(int(i), int(j)): v for (i, j), v in zip(pairs, ll)}

    def table(rows, cols):
        return np.array([[lookup[(int(i), int(j))] for i, j in zip(r, c)] for r, c in zip(rows, cols)])

    # search: sentence j against its candidate images
    g_t = table(per_sentence, np.repeat(np.arange(m)[:, None], per_sentence.shape[1], 1))
    prior = np.logaddexp.reduce(g_t, axis=1) - np.log(per_sentence.shape[1])  # log mean_I' p(S | I')
    offset = float(np.abs(s).max()) * 2 + 1e3
    t2i = s.copy()
    a_t = np.take_along_axis(s.T, per_sentence, 1)
    new_t = offset + combine(a_t, g_t - prior[:, None], weight)
    t2i[per_sentence, np.arange(m)[:, None]] = new_t
    # annotation: image i against its candidate sentences, PMI = log p(S | I) - log p(S)
    g_i = table(np.repeat(np.arange(n)[:, None], per_image.shape[1], 1), per_image) - prior[per_image]
    i2t = s.copy()
    a_i = np.take_along_axis(s, per_image, 1)
    i2t[np.arange(n)[:, None], per_image] = offset + combine(a_i, g_i, weight)
    return i2t, t2i  # float64: the candidates sit above an offset, float32 would tie close ones


def caption_logprobs(model, feats_of, sentences: list[list[int]], pairs: np.ndarray, batch: int = 400,
                     tick=lambda n: None) -> np.ndarray:
    """``log p(sentence | image)`` under the generator ``model`` for each (image, sentence) row of ``pairs``:
    teacher forcing, the sentence's ids then ``<end>``, the plain softmax (no decoding constraint).

    ``sentences``: id lists (the generator's vocabulary, no ``<end>``); ``feats_of(image indices)``: the
    model's ``(feats, mask)`` for those images. Pairs are processed in image order, ``batch`` at a time."""
    import torch

    from vsa.data import Vocab
    from vsa.generator.decoding import sequence_logprob

    order = np.lexsort((pairs[:, 1], pairs[:, 0]))
    out = np.zeros(len(pairs), dtype=np.float64)
    dev = next(model.parameters()).device
    with torch.no_grad():
        for s in range(0, len(order), batch):
            idx = order[s : s + batch]
            uniq, rows = np.unique(pairs[idx, 0], return_inverse=True)
            f, msk = feats_of(uniq.tolist())
            seqs = [sentences[int(j)] + [Vocab.end] for j in pairs[idx, 1]]
            tgt = torch.full((len(idx), max(map(len, seqs))), Vocab.pad, dtype=torch.long)
            for r, x in enumerate(seqs):
                tgt[r, : len(x)] = torch.tensor(x)
            lp = sequence_logprob(model, f.to(dev), None if msk is None else msk.to(dev), tgt.to(dev),
                                  torch.from_numpy(rows).to(dev), constrained=False)
            out[idx] = lp.double().cpu().numpy()
            tick(len(idx))
    return out


def check_generator_features(extractor: dict | None, feat_dim: int, store) -> None:
    """A one-line error unless the features ``store`` were made by the generator's CNN (its checkpoint's
    ``extractor`` record) with its feature size ``feat_dim``."""
    from vsa.errors import VsaError
    from vsa.features.store import check_extractor

    check_extractor(extractor, store.meta, store.path, "generator")
    if store.dim != feat_dim:
        raise VsaError(f"features are {store.dim}-d but the generator expects {feat_dim}-d", store.path)


def generator_logp(gen_path, store, keys: list[str], sentences: list[list[str]], device: str = "cpu", progress=None):
    """``logp(pairs)`` for :func:`pmi_rerank` from the generator checkpoint ``gen_path`` on the features ``store``
    (its ``keys[i]`` is image i; ``sentences[j]`` the tokens of sentence j)."""
    from vsa.data import Vocab
    from vsa.generator.model import load_generators, region_rows, uses_regions
    from vsa.runtime import pick_device
    from vsa.splits import split_features

    model, ck = load_generators(gen_path, pick_device(device))
    model.eval()
    check_generator_features(ck.get("extractor"), model.cfg.feat_dim, store)
    vocab = Vocab(ck["vocab"])
    ids = [vocab.encode(t) for t in sentences]
    regions, rows = uses_regions(model.cfg), region_rows(model.cfg)

    def feats_of(images):
        return split_features(store, [keys[i] for i in images], regions, rows)

    def logp(pairs):
        tick = lambda n: None  # noqa: E731
        if progress is not None:
            task = progress.add_task("re-ranking", total=len(pairs))
            tick = lambda n: progress.advance(task, n)  # noqa: E731
        return caption_logprobs(model, feats_of, ids, pairs, tick=tick)

    return logp


def query_logprobs(model, vocab, tokens: list[str], feats_of, n: int) -> np.ndarray:
    """``log p(tokens | image i)`` for images ``0 .. n-1`` under the generator ``model`` (its ``vocab``; words it
    lacks read as its unknown-word token): one sentence against a few photos, as ``vsa search text --rerank``
    re-scores its candidates. ``feats_of(image indices)``: the generator's ``(feats, mask)`` of those images."""
    pairs = np.stack([np.arange(n), np.zeros(n, dtype=np.int64)], 1)
    return caption_logprobs(model, feats_of, [vocab.encode(tokens)], pairs)
