"""Snippet alignment: a chain MRF over the words of a sentence (Karpathy & Fei-Fei 2015, Sec. 3.1.4).

Each word ``j`` of a sentence picks a region ``a_j``.  The energy (to maximise) is

    E(a) = sum_j U[j, a_j]  +  beta * sum_j [a_j == a_{j+1}]

with unary ``U[j, r] = v_r . s_j`` (the aligner's word-region score) and a pairwise term that rewards
neighbouring words sharing a region.  ``beta = 0`` gives every word its best region on its own;
a large ``beta`` gives one region for the whole sentence.  The chain is solved exactly by dynamic
programming (Viterbi), ``O(N * M)`` for N words and M regions.  Runs of words sharing a region are the
*snippets* (see :func:`snippets` and docs/alignment-snippets.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_BETA = 0.05  # for the cosine scores of vsa.alignment.model; chosen on val for the shipped aligner, see docs/alignment-snippets.md
CELL_LABEL = "cell"  # image cells (`vsa embed --cells`): context for the score, never a grounded region


def grounding_mask(labels) -> np.ndarray:
    """``[R]`` bool, True for the regions words are never grounded to: the image cells (label ``cell``),
    unless nothing else is left."""
    m = np.array([str(lab) == CELL_LABEL for lab in labels], dtype=bool)
    return m if not m.all() else np.zeros_like(m)


def viterbi(unary: np.ndarray, beta: float) -> tuple[np.ndarray, float]:
    """Exact MAP assignment of the chain MRF.

    ``unary``: ``[N, M]`` word-region scores.  Returns ``(assignment [N] int64, energy)``.
    Ties go to the lowest region index and, between staying and switching, to staying.
    """
    U = np.asarray(unary, dtype=np.float64)
    if U.ndim != 2:
        raise ValueError(f"unary must be [words, regions], got shape {U.shape}")
    N, M = U.shape
    if N == 0:
        return np.zeros(0, dtype=np.int64), 0.0
    if M == 0:
        raise ValueError("no regions to align to")
    beta = float(beta)
    back = np.zeros((N, M), dtype=np.int64)
    score = U[0].copy()
    for j in range(1, N):
        best_prev = int(np.argmax(score))
        switch = score[best_prev]
        stay = score + beta
        take_stay = stay >= switch
        back[j] = np.where(take_stay, np.arange(M), best_prev)
        score = np.where(take_stay, stay, switch) + U[j]
    a = np.zeros(N, dtype=np.int64)
    a[-1] = int(np.argmax(score))
    energy = float(score[a[-1]])
    for j in range(N - 1, 0, -1):
        a[j - 1] = back[j, a[j]]
    return a, energy


def energy(unary: np.ndarray, assignment, beta: float) -> float:
    """The MRF energy of an assignment (what :func:`viterbi` maximises)."""
    U = np.asarray(unary, dtype=np.float64)
    a = np.asarray(assignment, dtype=np.int64)
    if len(a) == 0:
        return 0.0
    return float(U[np.arange(len(a)), a].sum() + beta * np.count_nonzero(a[1:] == a[:-1]))


@dataclass
class Snippet:
    start: int  # first word (inclusive)
    end: int  # last word + 1
    region: int
    score: float  # mean word-region score over the snippet's words


def snippets(unary: np.ndarray, assignment) -> list[Snippet]:
    """Maximal runs of consecutive words assigned to the same region."""
    U = np.asarray(unary, dtype=np.float64)
    a = [int(x) for x in assignment]
    out: list[Snippet] = []
    s = 0
    for j in range(1, len(a) + 1):
        if j == len(a) or a[j] != a[s]:
            out.append(Snippet(s, j, a[s], float(U[np.arange(s, j), a[s]].mean())))
            s = j
    return out


def align_sentence(unary: np.ndarray, beta: float = DEFAULT_BETA) -> list[Snippet]:
    """Decode one sentence: Viterbi, then cut into snippets."""
    a, _ = viterbi(unary, beta)
    return snippets(unary, a)


def _num(x, nd: int = 4):
    return round(float(x), nd)


def alignment_record(key: str, sentid: int, split: str, tokens: list[str], unary: np.ndarray, beta: float,
                     boxes=None, labels=None) -> dict:
    """One line of the alignments JSONL (docs/formats.md, "Alignments JSONL")."""
    rec = {"key": key, "sentid": int(sentid), "split": split, "tokens": list(tokens), "beta": float(beta),
           "snippets": []}
    if labels is not None and len(unary):
        cells = grounding_mask(list(labels)[: np.shape(unary)[1]])
        if cells.any():
            unary = np.where(cells[None, :], -np.inf, unary)
    for sn in align_sentence(unary, beta):
        d = {"start": sn.start, "end": sn.end, "text": " ".join(tokens[sn.start:sn.end]), "region": sn.region}
        if boxes is not None:
            d["box"] = [_num(v, 1) for v in boxes[sn.region]]
        if labels is not None:
            d["label"] = str(labels[sn.region])
        d["score"] = _num(sn.score)
        rec["snippets"].append(d)
    return rec


def snippet_stats(records) -> dict:
    """Mean snippet length and the share of snippets on the whole-image box (region 0) vs object boxes."""
    n_snip = n_words = n_whole = n_sent = 0
    whole_words = 0
    for r in records:
        n_sent += 1
        for s in r["snippets"]:
            n_snip += 1
            L = s["end"] - s["start"]
            n_words += L
            if s["region"] == 0:
                n_whole += 1
                whole_words += L
    return {
        "sentences": n_sent,
        "snippets": n_snip,
        "snippets_per_sentence": n_snip / max(n_sent, 1),
        "mean_length": n_words / max(n_snip, 1),
        "whole_image_share": n_whole / max(n_snip, 1),
        "object_share": 1 - n_whole / max(n_snip, 1) if n_snip else 0.0,
        "whole_image_word_share": whole_words / max(n_words, 1),
    }
