"""Greedy and beam-search decoding, batched over images.

Greedy, beam and constrained beam search take a caption model (:class:`vsa.generator.models.CaptionModel`:
``init_state(feats, mask)`` / ``step(tokens, state)``) or an ensemble of them (:class:`vsa.generator.model.GeneratorEnsemble`)
and return, per image, hypotheses as :class:`Hyp` (word ids without
``<start>``/``<end>``, summed log-probability, ranking score).  ``max_len`` bounds the
number of words; a sentence cut there has no ``<end>``.  With ``length_penalty`` alpha > 0
hypotheses are ranked by ``logprob / len**alpha`` (len counts ``<end>``) instead of the raw
sum, which favours longer sentences.  ``<unk>`` is never generated, and ``<end>`` is not
allowed as the first word.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vsa.data import Vocab
from vsa.errors import VsaError

NEG = -1e9


@dataclass
class DecodingConfig:
    """Decoding defaults of a generator, stored in its checkpoint (``decoding``); beam and length penalty are
    chosen on val at the end of ``vsa train-mrnn``, flags of ``vsa caption`` / ``vsa eval`` override."""

    beam: int = 3
    length_penalty: float = 0.0
    max_len: int = 20  # words per generated sentence
    bad_endings: bool = True  # never end a sentence on "a", "the", "on", ... (decoding constraint)
    block_repeats: bool = True  # never repeat a word twice in a row or a trigram (decoding constraint)
    block_content_repeats: bool = True  # never use a word twice but function words (a, on, two, ...) (constraint)
    # test-time augmentation: the photo and its left-right mirror decoded as one, each step's word probabilities
    # mixed (1 - mirror) : mirror (:func:`vsa.generator.model.with_mirror`); 0: the photo alone (half the decoding work)
    mirror: float = 0.0
    # constrained decoding (vsa.labels, constrained_beam_search): the caption must name the detector's classes
    # found with at least this score, the most confident first, at most constrain_sets of them, none of the
    # comma-separated constrain_skip. The values are the ones val chose (docs/generator.md): one class, and not
    # person, which the generator names by itself and whose forced words ("person") read worse than its own
    constrain: bool = False
    constrain_score: float = 0.5
    constrain_sets: int = 1
    constrain_skip: str = "person"


def constrain_settings(dec: DecodingConfig, on: bool | None = None) -> dict | None:
    """The ``constrain`` argument of decoding (the keyword arguments of :func:`vsa.labels.constraint_sets`) that
    ``dec`` asks for, or None when constrained decoding is off; ``on`` (``--constrain`` / ``--no-constrain``)
    overrides ``dec.constrain``."""
    if not (dec.constrain if on is None else on):
        return None
    return {"min_score": float(dec.constrain_score), "max_sets": int(dec.constrain_sets),
            "skip": tuple(x.strip() for x in dec.constrain_skip.split(",") if x.strip())}


def mirror_weight(default: float, given: float | None = None) -> float:
    """The mirror weight a decoding uses: ``given`` (``--mirror``) if not None, else ``default`` (the checkpoint's
    ``DecodingConfig.mirror``); a weight outside [0, 1) is a one-line error."""
    from vsa.errors import VsaError

    w = float(default if given is None else given)
    if not 0 <= w < 1:
        raise VsaError(f"the mirror weight must be at least 0 and below 1, not {w:g}")
    return w


@dataclass
class Hyp:
    tokens: list[int]
    logprob: float
    score: float


def _score(logprob: float, n: int, alpha: float) -> float:
    return logprob / (max(n, 1) ** alpha) if alpha else logprob


def _length(tokens: list[int], ended: bool) -> int:
    return len(tokens) + (1 if ended else 0)


BAD_ENDINGS = ("a", "an", "the", "of", "in", "on", "at", "with", "and", "to", "is", "are", "its", "his", "her", "their")


def bad_ending_ids(vocab) -> torch.Tensor:
    """Ids of words a sentence must not end on (an SCST-trained model likes ``... sitting on a``)."""
    return torch.tensor([vocab.stoi[w] for w in BAD_ENDINGS if w in vocab.stoi], dtype=torch.long)


# words a caption may use more than once ("a dog on a ..."); any other word at most once ("a man and a man" no)
FUNCTION_WORDS = BAD_ENDINGS + (
    "or", "for", "from", "by", "into", "onto", "over", "under", "up", "down", "out", "off", "through", "near",
    "next", "front", "behind", "around", "while", "as", "it", "he", "she", "they", "them", "him", "who", "that",
    "this", "there", "has", "have", "be", "being", "one", "two", "three", "some", "other", "another", "each", "very")


def function_word_ids(vocab) -> frozenset[int]:
    return frozenset(vocab.stoi[w] for w in FUNCTION_WORDS if w in vocab.stoi)


def constraints(dec: DecodingConfig, vocab) -> dict:
    """The constraint arguments of :func:`decode` that the decoding config ``dec`` asks for, with ``vocab``."""
    return {"bad_endings": bad_ending_ids(vocab) if dec.bad_endings else None,
            "block_repeats": dec.block_repeats,
            "reusable": function_word_ids(vocab) if dec.block_content_repeats else None}


def _forbid(logp: torch.Tensor, t: int, prev: torch.Tensor | None = None, bad: torch.Tensor | None = None) -> torch.Tensor:
    if bad is not None and len(bad) and prev is not None:
        logp[torch.isin(prev, bad.to(prev.device)), Vocab.end] = NEG
    logp[:, Vocab.unk] = NEG
    logp[:, Vocab.pad] = NEG
    logp[:, Vocab.start] = NEG
    if t == 0:
        logp[:, Vocab.end] = NEG
    return logp


def constrained_log_softmax(logits: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """Teacher-forced logits ``[N, V]`` -> log-probabilities of the distribution :func:`sample` draws
    from: ``<unk>``/``<pad>``/``<start>`` never, ``<end>`` not first (``first`` ``[N]`` marks the rows
    that are a sentence's first position), renormalised over the rest.

    Self-critical training re-scores its samples with this; scoring them under the unconstrained
    softmax instead lets probability drift onto the tokens that are never sampled."""
    logits = logits.float().clone()
    logits[:, [Vocab.unk, Vocab.pad, Vocab.start]] = NEG
    logits[first, Vocab.end] = NEG
    return torch.log_softmax(logits, -1)


def _block_repeats(logp: torch.Tensor, seqs: list[list[int]], reusable: frozenset[int] | None = None) -> torch.Tensor:
    """Forbid, per row, the previous word again and any word that would repeat a trigram of the row; with
    ``reusable`` (ids) also every word of the row already used that is not in it."""
    for i, s in enumerate(seqs):
        if not s:
            continue
        logp[i, s[-1]] = NEG
        if reusable is not None:
            used = [w for w in set(s) if w not in reusable]
            if used:
                logp[i, used] = NEG
        if len(s) >= 2:
            a, b = s[-2], s[-1]
            for j in range(len(s) - 2):
                if s[j] == a and s[j + 1] == b:
                    logp[i, s[j + 2]] = NEG
    return logp


@torch.no_grad()
def greedy(model, feats: torch.Tensor, mask: torch.Tensor | None = None, max_len: int = 20,
           length_penalty: float = 0.0, bad_endings: torch.Tensor | None = None, block_repeats: bool = False,
           reusable: frozenset[int] | None = None) -> list[Hyp]:
    """Most likely word at each step; one hypothesis per image (``block_repeats``, ``reusable``: see
    :func:`_block_repeats`)."""
    B = feats.shape[0]
    st = model.init_state(feats, mask)
    tok = torch.full((B,), Vocab.start, dtype=torch.long, device=feats.device)
    done = torch.zeros(B, dtype=torch.bool, device=feats.device)
    total = torch.zeros(B, dtype=torch.float64, device=feats.device)
    words: list[list[int]] = [[] for _ in range(B)]
    ended = [False] * B
    for t in range(max_len):
        logp, st = model.step(tok, st)
        logp = _forbid(logp, t, tok, bad_endings)
        if block_repeats:
            logp = _block_repeats(logp, words, reusable)
        lp, tok = logp.max(-1)
        total += torch.where(done, torch.zeros_like(lp), lp).double()
        for i in (~done).nonzero().flatten().tolist():
            w = int(tok[i])
            if w == Vocab.end:
                ended[i] = True
            else:
                words[i].append(w)
        done |= tok == Vocab.end
        if bool(done.all()):
            break
    return [Hyp(w, float(lp), _score(float(lp), _length(w, e), length_penalty)) for w, lp, e in zip(words, total.tolist(), ended)]


@torch.no_grad()
def beam_search(model, feats: torch.Tensor, mask: torch.Tensor | None = None, beam: int = 3, max_len: int = 20,
                length_penalty: float = 0.0, bad_endings: torch.Tensor | None = None,
                block_repeats: bool = False, reusable: frozenset[int] | None = None) -> list[list[Hyp]]:
    """Beam search for every image of the batch at once.

    Returns ``beam`` hypotheses per image, best first (by score). A finished beam is
    kept alive with zero cost so the beam always holds ``beam`` candidates; the final
    ranking applies the length penalty.  ``beam=1`` equals :func:`greedy`.
    """
    if beam < 1:
        raise VsaError(f"the beam size must be at least 1, got {beam}")
    B, K = feats.shape[0], beam
    dev = feats.device
    st = model.init_state(feats, mask)
    st = {k: v.repeat_interleave(K, 0) for k, v in st.items()}
    tok = torch.full((B * K,), Vocab.start, dtype=torch.long, device=dev)
    scores = torch.full((B, K), NEG, dtype=torch.float64, device=dev)
    scores[:, 0] = 0.0  # all beams start identical: expand only the first
    finished = torch.zeros(B * K, dtype=torch.bool, device=dev)
    seqs = torch.zeros(B * K, 0, dtype=torch.long, device=dev)
    base = (torch.arange(B, device=dev) * K)[:, None]
    for t in range(max_len):
        logp, st = model.step(tok, st)
        logp = _forbid(logp, t, tok, bad_endings)
        if block_repeats and t:
            logp = _block_repeats(logp, seqs.tolist(), reusable)
        logp = logp.double()
        V = logp.shape[1]
        # a finished beam can only be extended by <pad> at no cost
        fin = finished.nonzero().flatten()
        if len(fin):
            logp[fin] = NEG
            logp[fin, Vocab.pad] = 0.0
        cand = (scores.view(B * K, 1) + logp).view(B, K * V)
        top, idx = cand.topk(K, dim=1)
        src = (idx // V + base).flatten()
        words = (idx % V).flatten()
        scores = top
        st = {k: v.index_select(0, src) for k, v in st.items()}
        seqs = torch.cat([seqs.index_select(0, src), words[:, None]], 1)
        finished = finished.index_select(0, src) | (words == Vocab.end)
        tok = words.clone()
        tok[tok == Vocab.pad] = Vocab.end  # fed but never read: keeps the embedding lookup valid
        if bool(finished.all()):
            break
    out: list[list[Hyp]] = []
    seqs_l = seqs.tolist()
    sc = scores.flatten().tolist()
    for b in range(B):
        hyps = []
        for k in range(K):
            s = seqs_l[b * K + k]
            ended = Vocab.end in s
            w = [x for x in (s[: s.index(Vocab.end)] if ended else s) if x != Vocab.pad]
            lp = sc[b * K + k]
            if lp <= NEG / 2:
                continue
            hyps.append(Hyp(w, lp, _score(lp, _length(w, ended), length_penalty)))
        hyps.sort(key=lambda h: -h.score)
        out.append(hyps)
    return out


def decode(model, feats: torch.Tensor, mask: torch.Tensor | None = None, beam: int = 1, max_len: int = 20,
           length_penalty: float = 0.0, bad_endings: torch.Tensor | None = None, block_repeats: bool = False,
           reusable: frozenset[int] | None = None) -> list[Hyp]:
    """Best hypothesis per image (greedy for ``beam=1``); the constraints as :func:`constraints` gives them."""
    if beam <= 1:
        return greedy(model, feats, mask, max_len, length_penalty, bad_endings, block_repeats, reusable)
    return [h[0] for h in beam_search(model, feats, mask, beam, max_len, length_penalty, bad_endings, block_repeats,
                                      reusable)]


def draw(probs: torch.Tensor) -> torch.Tensor:
    """One token per row of ``probs`` ``[B, V]`` (non-negative, unnormalised), by inverse CDF: the same
    distribution as ``torch.multinomial(probs, 1)`` at a fraction of its CPU cost (docs/experiments.md). A
    zero-probability token is never drawn."""
    c = probs.cumsum(-1)
    u = torch.rand(c.shape[0], 1, device=c.device, dtype=c.dtype) * c[:, -1:]
    idx = torch.searchsorted(c, u, right=True).squeeze(1)  # first token whose cumulative mass exceeds u
    return torch.where(idx >= c.shape[1], probs.argmax(-1), idx)  # u rounded up to the total: the likeliest


@torch.no_grad()
def sample(model, feats: torch.Tensor, mask: torch.Tensor | None = None, n: int = 5, max_len: int = 20,
           temperature: float = 1.0):
    """``n`` sampled sentences per image, for self-critical training (no gradients).

    Returns ``seqs [B*n, T]`` (``<end>``-terminated, pad after); the caller re-scores the samples with
    gradients through :func:`sequence_logprob` (or draws them with :func:`sample_scored`). Each step runs only for
    the sentences that have not ended.
    """
    return _sample(model, feats, mask, n, max_len, temperature, False)[0]


def sample_scored(model, feats: torch.Tensor, mask: torch.Tensor | None = None, n: int = 5, max_len: int = 20):
    """:func:`sample` with gradients: ``(seqs, logprob)``, ``logprob [B*n]`` each sentence's summed log-probability
    under the distribution it was drawn from, the value (and gradient) :func:`sequence_logprob` gives it, without
    running the model a second time over the samples."""
    return _sample(model, feats, mask, n, max_len, 1.0, True)


def _sample(model, feats, mask, n: int, max_len: int, temperature: float, scored: bool):
    B = feats.shape[0]
    st = model.init_state(feats, mask)
    st = {k: v.repeat_interleave(n, 0) for k, v in st.items()}
    dev = feats.device
    seqs = torch.full((B * n, max_len), Vocab.pad, dtype=torch.long, device=dev)
    alive = torch.arange(B * n, device=dev)  # the rows of ``seqs`` still going, in the state's order
    tok = torch.full((B * n,), Vocab.start, dtype=torch.long, device=dev)
    parts, where = [], []  # scored: each step's log-probabilities of the drawn words, and their rows
    T = 0
    for t in range(max_len):
        logp, st = model.step(tok, st)
        if scored:  # the constrained distribution of constrained_log_softmax, renormalised, with gradients
            logp = torch.log_softmax(_forbid(logp.float().clone(), t), -1)
            tok = draw(logp.detach().exp())
            parts.append(logp.gather(1, tok[:, None]).squeeze(1))
            where.append(alive)
        else:
            tok = draw(torch.softmax(_forbid(logp, t) / temperature, -1))
        seqs[alive, t] = tok
        T = t + 1
        going = tok != Vocab.end
        if not bool(going.all()):
            if not bool(going.any()):
                break
            keep = going.nonzero().squeeze(1)
            alive, tok = alive[keep], tok[keep]
            st = {k: v.index_select(0, keep) for k, v in st.items()}
    lp = None
    if scored:
        lp = torch.zeros(B * n, device=dev).index_add(0, torch.cat(where), torch.cat(parts))
    return seqs[:, :T], lp


@torch.no_grad()
def constrained_beam_search(model, feats: torch.Tensor, mask: torch.Tensor | None, sets: list[list[frozenset[int]]],
                            beam: int = 3, max_len: int = 20, length_penalty: float = 0.0,
                            bad_endings: torch.Tensor | None = None, block_repeats: bool = False,
                            reusable: frozenset[int] | None = None) -> list[Hyp]:
    """Constrained beam search (Anderson et al. 2017, "Guided open vocabulary image captioning with constrained
    beam search"): the best sentence per image that contains one word of each of its constraint sets.

    ``sets[b]`` lists image ``b``'s constraints, each a set of word ids of which one must appear (a disjunction:
    ``{horse, horses}``). The search keeps ``beam`` hypotheses for every subset of constraints met so far (a finite
    state machine of 2^m states; an image with fewer than m constraints starts with the missing ones met), moves a
    hypothesis to the state its new word reaches, and answers from the state where all are met. Where no
    hypothesis reaches it within ``max_len`` words (a constraint that the other rules, such as no repeated
    trigram, keep out), the answer comes from the state that meets the most. The other arguments are those of
    :func:`beam_search`; with no constraints it searches as :func:`beam_search` does.
    """
    if beam < 1:
        raise VsaError(f"the beam size must be at least 1, got {beam}")
    B, K = feats.shape[0], beam
    m = max((len(s) for s in sets), default=0)
    S, dev = 1 << m, feats.device
    full = S - 1
    st = model.init_state(feats, mask)
    st = {k: v.repeat_interleave(S * K, 0) for k, v in st.items()}
    V = None
    start_state = [full & ~((1 << len(s)) - 1) for s in sets]  # constraints an image does not have count as met
    scores = torch.full((B, S, K), NEG, dtype=torch.float64, device=dev)
    scores[torch.arange(B, device=dev), torch.tensor(start_state, device=dev), 0] = 0.0
    state_of_row = torch.arange(S, device=dev).view(1, S, 1).expand(B, S, K).reshape(B, S * K)
    tok = torch.full((B * S * K,), Vocab.start, dtype=torch.long, device=dev)
    finished = torch.zeros(B * S * K, dtype=torch.bool, device=dev)
    seqs = torch.zeros(B * S * K, 0, dtype=torch.long, device=dev)
    base = (torch.arange(B, device=dev) * S * K)[:, None]
    wbits = None
    for t in range(max_len):
        logp, st = model.step(tok, st)
        if wbits is None:
            V = logp.shape[1]
            wbits = torch.zeros(B, V, dtype=torch.long, device=dev)  # which constraints each word meets, per image
            for b, cs in enumerate(sets):
                for j, words in enumerate(cs):
                    ids = [w for w in words if 0 <= w < V]
                    if ids:
                        wbits[b, ids] |= 1 << j
        logp = _forbid(logp, t, tok, bad_endings)
        if block_repeats and t:
            logp = _block_repeats(logp, seqs.tolist(), reusable)
        logp = logp.double()
        fin = finished.nonzero().flatten()
        if len(fin):  # a finished hypothesis is only extended by <pad>, at no cost, and stays in its state
            logp[fin] = NEG
            logp[fin, Vocab.pad] = 0.0
        cand = (scores.view(B * S * K, 1) + logp).view(B, S * K, V)
        reach = state_of_row.unsqueeze(-1) | wbits.unsqueeze(1)  # [B, S*K, V]: the state each extension lands in
        new_scores = torch.empty(B, S, K, dtype=torch.float64, device=dev)
        src = torch.empty(B, S, K, dtype=torch.long, device=dev)
        words = torch.empty(B, S, K, dtype=torch.long, device=dev)
        for s in range(S):
            top, idx = torch.where(reach == s, cand, torch.full_like(cand, 2 * NEG)).view(B, -1).topk(K, dim=1)
            new_scores[:, s], src[:, s], words[:, s] = top, idx // V, idx % V
        scores = new_scores
        rows = (src + base.view(B, 1, 1)).flatten()
        words = words.flatten()
        st = {k: v.index_select(0, rows) for k, v in st.items()}
        seqs = torch.cat([seqs.index_select(0, rows), words[:, None]], 1)
        finished = finished.index_select(0, rows) | (words == Vocab.end)
        tok = words.clone()
        tok[tok == Vocab.pad] = Vocab.end  # fed but never read: keeps the embedding lookup valid
        if bool((finished | (scores.flatten() <= NEG / 2)).all()):
            break
    out: list[Hyp] = []
    seqs_l = seqs.tolist()
    sc = scores.view(B, S * K).tolist()
    met = [bin(s).count("1") for s in range(S)]
    for b in range(B):
        best = None
        for s in sorted(range(S), key=lambda s: -met[s]):
            for k in range(K):
                lp = sc[b][s * K + k]
                if lp <= NEG / 2:
                    continue
                seq = seqs_l[(b * S + s) * K + k]
                ended = Vocab.end in seq
                w = [x for x in (seq[: seq.index(Vocab.end)] if ended else seq) if x != Vocab.pad]
                h = Hyp(w, lp, _score(lp, _length(w, ended), length_penalty))
                if best is None or h.score > best.score:
                    best = h
            if best is not None:
                break
        out.append(best if best is not None else Hyp([], NEG, NEG))
    return out


def sequence_logprob(model, feats, mask, seqs: torch.Tensor, rows: torch.Tensor | None = None,
                     constrained: bool = True) -> torch.Tensor:
    """Summed log-probability of each sampled sequence (``<end>``-terminated, pad after), with gradients,
    under exactly the distribution :func:`vsa.generator.decoding.sample` draws from (same constraints; ``constrained``
    False: the plain softmax, for sentences the model did not draw). Only the real positions are computed
    (the pads after ``<end>`` are not)."""
    B, T = seqs.shape
    inp = torch.cat([torch.full((B, 1), Vocab.start, dtype=torch.long, device=seqs.device), seqs[:, :-1]], 1)
    inp = torch.where(inp == Vocab.pad, torch.full_like(inp, Vocab.end), inp)
    valid = seqs != Vocab.pad  # a prefix of each row
    logits = model(feats, inp, mask, select=valid, rows=rows)  # [N, V], row-major over the valid positions
    first = torch.zeros_like(valid)
    first[:, 0] = True
    logp = constrained_log_softmax(logits, first[valid]) if constrained else torch.log_softmax(logits.float(), -1)
    lp = logp.gather(1, seqs[valid][:, None]).squeeze(1)
    row = torch.arange(B, device=seqs.device)[:, None].expand(B, T)[valid]
    return torch.zeros(B, device=lp.device, dtype=lp.dtype).index_add(0, row, lp)
