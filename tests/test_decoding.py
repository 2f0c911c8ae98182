"""Greedy and beam search on small random models."""

from __future__ import annotations

import pytest
import torch

from vsa.data import Vocab
from vsa.generator.decoding import beam_search, decode, greedy
from vsa.generator.model import GeneratorConfig, build_model


def _model(rnn="lstm", seed=0, V=30, D=8, attention=False):
    """A small random generator (``rnn="updown"`` reads ``[B, R, D]`` regions)."""
    torch.manual_seed(seed)
    cfg = GeneratorConfig(arch=rnn, vocab_size=V, feat_dim=D, embed=12, hidden=16, dropout=0.0, attention=attention, att_dim=8)
    m = build_model(cfg).eval()
    with torch.no_grad():  # make <end> plausible so sentences finish
        m.out.bias[Vocab.end] += 1.5
    return m


@torch.no_grad()
def _seq_logprob(model, feats, tokens, ended):
    """Log-probability of one sentence re-scored step by step."""
    st = model.init_state(feats[None])
    tok, total = torch.tensor([Vocab.start]), 0.0
    for w in tokens + ([Vocab.end] if ended else []):
        lp, st = model.step(tok, st)
        total += float(lp[0, w])
        tok = torch.tensor([w])
    return total


@pytest.mark.parametrize("rnn", ["rnn", "lstm"])
def test_beam_one_equals_greedy(rnn):
    m = _model(rnn)
    feats = torch.randn(6, 8)
    g = greedy(m, feats, max_len=12)
    b = beam_search(m, feats, beam=1, max_len=12)
    assert [h.tokens for h in g] == [hs[0].tokens for hs in b]
    assert [round(h.logprob, 4) for h in g] == [round(hs[0].logprob, 4) for hs in b]


@pytest.mark.parametrize("alpha", [0.0, 0.7])
def test_beam_hypotheses_sorted_scored_and_bounded(alpha):
    m = _model("lstm", seed=1)
    feats = torch.randn(4, 8)
    out = beam_search(m, feats, beam=5, max_len=6, length_penalty=alpha)
    assert len(out) == 4
    for i, hyps in enumerate(out):
        assert len(hyps) == 5
        scores = [h.score for h in hyps]
        assert scores == sorted(scores, reverse=True)
        assert len({tuple(h.tokens) for h in hyps}) == 5  # distinct hypotheses
        for h in hyps:
            assert 1 <= len(h.tokens) <= 6
            assert Vocab.unk not in h.tokens and Vocab.end not in h.tokens and Vocab.pad not in h.tokens
            ended = len(h.tokens) < 6 or abs(_seq_logprob(m, feats[i], h.tokens, True) - h.logprob) < 1e-3
            assert abs(_seq_logprob(m, feats[i], h.tokens, ended) - h.logprob) < 1e-3


def test_max_length_cuts_sentences_that_never_end():
    m = _model("rnn", seed=2)
    with torch.no_grad():
        m.out.bias[Vocab.end] = -1e4
    feats = torch.randn(3, 8)
    for h in greedy(m, feats, max_len=7):
        assert len(h.tokens) == 7
    for hyps in beam_search(m, feats, beam=3, max_len=7):
        assert all(len(h.tokens) == 7 for h in hyps)


def test_beam_batched_equals_one_image_at_a_time():
    m = _model("lstm", seed=3, attention=True)
    feats = torch.randn(3, 4, 8)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    batched = [h.tokens for h in decode(m, feats, mask, beam=3, max_len=10)]
    single = [decode(m, feats[i : i + 1], mask[i : i + 1], beam=3, max_len=10)[0].tokens for i in range(3)]
    assert batched == single


def test_beam_finds_at_least_greedy_likelihood_on_average():
    m = _model("lstm", seed=4)
    feats = torch.randn(20, 8)
    g = sum(h.logprob for h in greedy(m, feats, max_len=10))
    b = sum(hs[0].logprob for hs in beam_search(m, feats, beam=5, max_len=10))
    assert b >= g - 1e-6


def test_bad_endings_are_never_generated():
    from vsa.generator.decoding import bad_ending_ids

    vocab = Vocab(["a", "dog", "on", "the", "grass", "runs"] + [f"w{i}" for i in range(20)])
    m = _model("lstm", seed=5, V=len(vocab))
    with torch.no_grad():
        m.out.bias[Vocab.end] += 2.0  # end often
        for w in ("a", "on", "the"):
            m.out.bias[vocab.stoi[w]] += 3.0  # and say these a lot
    feats = torch.randn(30, 8)
    bad = bad_ending_ids(vocab)
    plain = [h.tokens for h in greedy(m, feats, max_len=8)]
    assert any(t and t[-1] in bad.tolist() for t in plain)  # the constraint has something to fix
    for hyps in beam_search(m, feats, beam=3, max_len=8, bad_endings=bad):
        for h in hyps:
            assert len(h.tokens) == 8 or h.tokens[-1] not in bad.tolist()
    for h in greedy(m, feats, max_len=8, bad_endings=bad):
        assert len(h.tokens) == 8 or h.tokens[-1] not in bad.tolist()


def _repeats(tokens: list[int]) -> bool:
    trigrams = [tuple(tokens[i : i + 3]) for i in range(len(tokens) - 2)]
    return any(a == b for a, b in zip(tokens, tokens[1:])) or len(trigrams) != len(set(trigrams))


@pytest.mark.parametrize("rnn", ["lstm", "updown"])
def test_block_repeats_never_emits_a_repeated_word_or_trigram(rnn):
    V = 12
    m = _model(rnn, seed=3, V=V, attention=rnn == "updown")
    with torch.no_grad():
        m.out.bias[Vocab.end] -= 6.0  # long sentences over a small vocabulary: repeats are likely
        m.out.bias[5] += 2.0
    feats = torch.randn(20, 3, 8)
    plain = [h.tokens for h in greedy(m, feats, max_len=15)]
    assert any(_repeats(t) for t in plain)  # the constraint has something to fix
    for h in greedy(m, feats, max_len=15, block_repeats=True):
        assert not _repeats(h.tokens), h.tokens
    for hyps in beam_search(m, feats, beam=4, max_len=15, block_repeats=True):
        for h in hyps:
            assert not _repeats(h.tokens), h.tokens


@pytest.mark.parametrize("rnn", ["lstm", "updown"])
def test_block_content_repeats_uses_each_word_once_but_the_reusable_ones(rnn):
    """With ``reusable`` ids (the function words of :func:`vsa.generator.decoding.function_word_ids`) no other word
    appears twice in a caption ("a man and a man" cannot happen), while the reusable ones still may."""
    V = 12
    m = _model(rnn, seed=3, V=V, attention=rnn == "updown")
    with torch.no_grad():
        m.out.bias[Vocab.end] -= 6.0
        m.out.bias[5] += 2.0  # a reusable word
        m.out.bias[7] += 2.0  # and a content word, both likely
    feats = torch.randn(20, 3, 8)
    reusable = frozenset({5, 6})

    def content(t):
        return [w for w in t if w not in reusable]

    plain = [h.tokens for h in greedy(m, feats, max_len=15, block_repeats=True)]
    assert any(len(set(content(t))) < len(content(t)) for t in plain)  # the constraint has something to fix
    outs = [h.tokens for h in greedy(m, feats, max_len=15, block_repeats=True, reusable=reusable)]
    outs += [h.tokens for hyps in beam_search(m, feats, beam=4, max_len=15, block_repeats=True, reusable=reusable)
             for h in hyps]
    for t in outs:
        assert len(set(content(t))) == len(content(t)), t
        assert not _repeats(t), t
    assert any(t.count(5) + t.count(6) > 2 for t in outs)  # the reusable words do come back


def test_function_words_come_from_the_vocabulary():
    from vsa.data import Vocab as V
    from vsa.generator.decoding import DecodingConfig, constraints, function_word_ids

    vocab = V(["a", "man", "on", "two", "dog"])
    assert function_word_ids(vocab) == frozenset({vocab.stoi["a"], vocab.stoi["on"], vocab.stoi["two"]})
    assert constraints(DecodingConfig(block_content_repeats=False), vocab)["reusable"] is None
    assert constraints(DecodingConfig(), vocab)["reusable"] == function_word_ids(vocab)


# ----------------------------------------------------------------------------- constrained beam search


def test_constrained_search_without_constraints_is_beam_search():
    from vsa.generator.decoding import constrained_beam_search

    m = _model("lstm", seed=4)
    feats = torch.randn(5, 8)
    plain = [hs[0] for hs in beam_search(m, feats, beam=3, max_len=10, length_penalty=0.5)]
    cons = constrained_beam_search(m, feats, None, [[] for _ in range(5)], beam=3, max_len=10, length_penalty=0.5)
    assert [h.tokens for h in cons] == [h.tokens for h in plain]
    assert [round(h.logprob, 6) for h in cons] == [round(h.logprob, 6) for h in plain]


@pytest.mark.parametrize("rnn", ["lstm", "updown"])
def test_constrained_search_contains_a_word_of_every_set_and_never_repeats_a_trigram(rnn):
    """Each image gets 0-3 disjunctive sets of words that plain search rarely writes; every caption holds one
    word of each of its sets (the state machine answers from the all-met state), with the repeat rules on, and
    is as likely as the model makes it (its log-probability re-scored step by step)."""
    from vsa.generator.decoding import constrained_beam_search

    V = 24
    m = _model(rnn, seed=5, V=V, attention=rnn == "updown")
    with torch.no_grad():
        m.out.bias[Vocab.end] -= 1.0
        m.out.bias[5] += 2.0  # a favourite word, so repeats would be likely
    feats = torch.randn(12, 3, 8)
    plain = [hs[0].tokens for hs in beam_search(m, feats, beam=3, max_len=14)]
    g = torch.Generator().manual_seed(0)
    sets = []
    for i in range(12):
        n = i % 4
        words = (torch.randperm(V - 4, generator=g)[: 2 * n] + 4).tolist()
        sets.append([frozenset(words[2 * j : 2 * j + 2]) for j in range(n)])
    missing = sum(not (s & set(p)) for ss, p in zip(sets, plain) for s in ss)
    assert missing >= 3  # plain search leaves many out: the constraint has something to do
    out = constrained_beam_search(m, feats, None, sets, beam=3, max_len=14, block_repeats=True)
    for h, ss, f in zip(out, sets, feats):
        assert all(s & set(h.tokens) for s in ss), (h.tokens, ss)
        assert not _repeats(h.tokens), h.tokens
        assert Vocab.unk not in h.tokens and Vocab.pad not in h.tokens and Vocab.end not in h.tokens
        ended = abs(_seq_logprob(m, f, h.tokens, True) - h.logprob) < 1e-3
        assert abs(_seq_logprob(m, f, h.tokens, ended) - h.logprob) < 1e-3


def test_constraint_sets_from_detections():
    from vsa.labels import constraint_sets

    stoi = {w: i for i, w in enumerate(["<pad>", "<start>", "<end>", "<unk>", "a", "horse", "horses", "dog", "man",
                                        "people", "cup"])}
    dets = [{"label": "horse", "score": 0.9}, {"label": "horse", "score": 0.8}, {"label": "person", "score": 0.7},
            {"label": "dog", "score": 0.3}, {"label": "giraffe", "score": 0.95}, {"label": "cup", "score": 0.6}]
    sets, labels = constraint_sets(dets, stoi, min_score=0.5, max_sets=2)
    # giraffe has no word in this vocabulary; the dog is not confident enough; one set per class, best first
    assert labels == ["horse", "person"] and sets == [frozenset({5, 6}), frozenset({8, 9})]
    sets, labels = constraint_sets(dets, stoi, min_score=0.5, max_sets=3, skip=("person",))
    assert labels == ["horse", "cup"]


@pytest.mark.parametrize("arch", ["updown", "lstm"])
def test_scored_samples_have_the_rescored_log_probabilities_and_gradients(arch):
    """Self-critical training draws its samples with gradients (one pass) where it re-scored them (two): the
    log-probabilities and their gradients must be the re-scoring's."""
    from vsa.generator.decoding import sample_scored, sequence_logprob

    torch.manual_seed(0)
    cfg = GeneratorConfig(arch=arch, vocab_size=30, feat_dim=8, embed=16, hidden=16, att_dim=8, dropout=0.0)
    model = build_model(cfg).eval()
    feats = torch.randn(3, 5, 8) if arch == "updown" else torch.randn(3, 8)
    mask = torch.ones(3, 5, dtype=torch.bool) if arch == "updown" else None
    seqs, lp = sample_scored(model, feats, mask, n=4, max_len=7)
    assert seqs.shape[0] == 12 and lp.shape == (12,) and lp.requires_grad
    w = torch.randn(12)
    g1 = torch.autograd.grad((w * lp).sum(), list(model.parameters()), allow_unused=True)
    rows = torch.arange(3).repeat_interleave(4)
    ref = sequence_logprob(model, feats, mask, seqs, rows)
    g2 = torch.autograd.grad((w * ref).sum(), list(model.parameters()), allow_unused=True)
    assert torch.allclose(lp, ref, atol=1e-4)
    for a, b in zip(g1, g2):
        if a is not None or b is not None:
            assert torch.allclose(a, b, atol=1e-4, rtol=1e-3)
