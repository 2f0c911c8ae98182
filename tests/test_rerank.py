"""Generative re-ranking (vsa.rerank): the PMI arithmetic, the generator's sentence log-probabilities, and
`vsa eval --rerank` end to end on the synthetic alignment set."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
import torch

from tests.conftest import run_cli
from vsa.rerank import caption_logprobs, candidates, pmi_rerank
from vsa.retrieval import i2t_ranks, retrieval_metrics, t2i_ranks

# 4 images, 2 sentences each (sentence j belongs to image j // 2); sentence 0 is a common one that the generator
# finds likely under every image (a little more under its own), the others likely under their own image only
OWNER = np.repeat(np.arange(4), 2)


def _logp(pairs):
    i, j = pairs[:, 0], pairs[:, 1]
    return np.where(j == 0, -5.0 + 0.5 * (i == 0), -10.0 + 3.0 * (OWNER[j] == i))


def test_pmi_prior_keeps_a_common_sentence_from_winning_every_image():
    rng = np.random.default_rng(0)
    s = rng.normal(size=(4, 8)) * 0.01  # an aligner that knows nothing
    i2t, t2i = pmi_rerank(s, _logp, k=8, weight=100.0)
    assert (i2t_ranks(i2t, OWNER) == 1).all() and (t2i_ranks(t2i, OWNER) == 1).all()
    # by likelihood alone sentence 0 (log p -5) beats every image's own sentences (-7): the prior removes that
    assert all(np.argmax(i2t[i]) != 0 for i in (1, 2, 3))
    raw = np.zeros_like(s)
    for i in range(4):
        raw[i] = _logp(np.stack([np.full(8, i), np.arange(8)], 1))
    assert (np.argmax(raw, 1) == 0).all()


def test_only_the_top_k_move_and_the_rest_keep_the_aligner_order():
    rng = np.random.default_rng(1)
    s = rng.normal(size=(6, 12))
    seen = []

    def logp(pairs):
        seen.append(pairs)
        return rng.normal(size=len(pairs))

    i2t, t2i = pmi_rerank(s, logp, k=3, weight=2.0)
    per_image, per_sentence = candidates(s, 3)
    asked = {tuple(p) for p in seen[0]}
    assert len(seen) == 1 and len(asked) == len(seen[0])  # each pair scored once
    assert asked == {(i, int(j)) for i in range(6) for j in per_image[i]} | {(int(i), j) for j in range(12) for i in per_sentence[j]}
    for i in range(6):
        order = np.argsort(-i2t[i])
        assert set(order[:3]) == set(per_image[i])
        rest = order[3:]
        assert list(rest) == sorted(rest, key=lambda j: -s[i, j])
    for j in range(12):
        order = np.argsort(-t2i[:, j])
        assert set(order[:3]) == set(per_sentence[j])
        assert list(order[3:]) == sorted(order[3:], key=lambda i: -s[i, j])
    # weight 0: the aligner's order everywhere
    a, b = pmi_rerank(s, lambda p: np.zeros(len(p)), k=3, weight=0.0)
    assert (np.argsort(-a, 1) == np.argsort(-s, 1)).all() and (np.argsort(-b, 0) == np.argsort(-s, 0)).all()
    m = retrieval_metrics(a, np.arange(12) // 2, b)
    assert m == retrieval_metrics(s, np.arange(12) // 2)


def test_caption_logprobs_equal_the_step_by_step_sum_in_any_pair_order():
    from vsa.data import Vocab
    from vsa.generator.model import GeneratorConfig, build_model

    torch.manual_seed(0)
    model = build_model(GeneratorConfig(arch="lstm", embed=8, hidden=12, vocab_size=20, feat_dim=6, dropout=0.0)).eval()
    feats = torch.randn(5, 6)
    sents = [[5, 6, 7], [8], [9, 10, 11, 12, 13], [14, 15]]
    pairs = np.array([[4, 2], [0, 0], [3, 1], [0, 3], [2, 2], [1, 0], [4, 3]])
    got = caption_logprobs(model, lambda imgs: (feats[imgs], None), sents, pairs, batch=3)
    for (i, j), v in zip(pairs, got):
        seq = sents[j] + [Vocab.end]
        inp = torch.tensor([[Vocab.start] + seq[:-1]])
        with torch.no_grad():
            logits = model(feats[[i]], inp, None)  # [1, T, V]
        want = torch.log_softmax(logits[0], -1)[torch.arange(len(seq)), torch.tensor(seq)].sum().item()
        assert v == pytest.approx(want, abs=1e-4)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from tests.synth_align import make_synthetic
    from vsa.io import write_json

    tmp = tmp_path_factory.mktemp("rerank")
    ds, feats, _ = make_synthetic(tmp, n_train=80, n_val=20, n_test=20)
    write_json(tmp / "synthetic.json", ds.to_karpathy())
    small = ["--min-count", "1", "--threads", "1", "--dataset", tmp / "synthetic.json", "--features", feats]
    r = run_cli("train-align", *small, "-o", tmp / "a.pt", "--hidden", "16", "--epochs", "1", "--batch-size", "32",
                "--set", "embed=16")
    assert r.returncode == 0, r.stderr.decode()
    r = run_cli("train-mrnn", *small, "-o", tmp / "g.pt", "--epochs", "6", "--scst-epochs", "0", "--hidden", "32",
                "--embed", "16", "--no-beam-search", "--set", "lr=5e-3")
    assert r.returncode == 0, r.stderr.decode()
    return tmp, feats


def test_eval_rerank_reports_both_and_the_generator_lifts_a_weak_aligner(trained):
    tmp, feats = trained
    base = ["eval", "--dataset", tmp / "synthetic.json", "--model", tmp / "a.pt", "--features", feats, "--json"]
    r = run_cli(*base, "--rerank", tmp / "g.pt", "--rerank-features", feats, "--rerank-k", "10",
                "--ranks-out", tmp / "ranks.json")
    assert r.returncode == 0, r.stderr.decode()
    rep = orjson.loads(r.stdout)["retrieval"]
    rr = rep["rerank"]
    assert rr["k"] == 10 and rr["weight"] == 4.0 and rr["model"].endswith("g.pt")
    alone = orjson.loads(run_cli(*base).stdout)["retrieval"]
    assert rr["aligner"]["rsum"] == alone["rsum"]
    assert rep["rsum"] > alone["rsum"] + 10, (rep["rsum"], alone["rsum"])
    ranks = orjson.loads((tmp / "ranks.json").read_bytes())
    assert [x["rank"] for x in ranks["sentences"][:3]] and len(ranks["images"]) == 20
    # one-line errors: a knob without --rerank, an aligner as the re-ranker
    r = run_cli(*base, "--rerank-k", "5")
    assert r.returncode == 2 and b"need --rerank" in r.stderr
    r = run_cli(*base, "--rerank", tmp / "a.pt", "--rerank-features", feats)
    assert r.returncode == 2 and b"generator checkpoint" in r.stderr


def test_retrieval_table_of_an_ensemble_with_and_without_rerank():
    """`vsa eval` without --json prints this table; an ensemble's config is a list (this used to raise)."""
    from rich.console import Console

    from vsa.alignment.evaluate import render_retrieval

    fig = {"r1": 30.0, "r5": 60.0, "r10": 70.0, "medr": 3}
    report = {"model": "a.pt + w.pt", "images": 10, "sentences": 50, "i2t": fig, "t2i": fig, "rsum": 320.0,
              "config": [{"model": "brnn"}, {"model": "whole-image"}]}
    con = Console(record=True, width=150)
    render_retrieval(report, con)
    text = con.export_text()
    assert "vsa ensemble" in text and "rsum 320.0" in text and "re-ranked" not in text
    low = {"r1": 20.0, "r5": 50.0, "r10": 60.0, "medr": 5}
    report["rerank"] = {"model": "g.pt", "k": 30, "aligner": {"i2t": low, "t2i": low, "rsum": 260.0}}
    con = Console(record=True, width=150)
    render_retrieval(report, con)
    text = con.export_text()
    assert "+ re-ranked (top 30)" in text and "re-ranked by g.pt" in text and "the aligner alone 260.0" in text
    row = next(x for x in text.splitlines() if "R@1" in x and "annotation" in x)
    assert [c.strip() for c in row.split("│") if c.strip()][-2:] == ["20", "30"]  # the aligner's, then the re-ranked


def test_search_text_rerank_orders_as_eval_search_and_lifts_a_weak_aligner(trained):
    """`vsa search text --rerank`: per query, the aligner's top k re-ordered by log p(query | photo) (the search
    direction of `vsa eval --rerank`, where the prior is a constant), photos read from --rerank-features."""
    from vsa.alignment.model import load_aligner
    from vsa.generator.captioner import Captioner
    from vsa.data import load_dataset
    from vsa.features.store import load_features
    from vsa.search import Index, rerank_hits, rerank_text, search_text

    tmp, feats = trained
    ds = load_dataset(tmp / "synthetic.json")
    idx_path = tmp / "idx.npz"
    r = run_cli("search", "index", "--features", feats, "--dataset", tmp / "synthetic.json", "--split", "test",
                "--model", tmp / "a.pt", "-o", idx_path)
    assert r.returncode == 0, r.stderr.decode()
    idx, al = Index(idx_path), load_aligner(tmp / "a.pt")
    gen, store = Captioner.load(tmp / "g.pt", "cpu"), load_features(feats)
    before = after = 0
    for rec in ds.split("test"):
        for s in rec.sentences:
            hits = search_text(al, idx, s.raw, 10, hubness=False)  # as `vsa eval` without --hubness
            new = rerank_text(hits, s.raw, gen, store, k=10)
            assert sorted(h["key"] for h in new) == sorted(h["key"] for h in hits)  # only the candidates move
            assert [h["rank"] for h in new] == list(range(1, 11))
            assert all(a["rerank"] >= b["rerank"] for a, b in zip(new, new[1:]))
            before += hits[0]["key"] == rec.key
            after += new[0]["key"] == rec.key
    ev = orjson.loads(run_cli("eval", "--dataset", tmp / "synthetic.json", "--model", tmp / "a.pt", "--features", feats,
                              "--json", "--rerank", tmp / "g.pt", "--rerank-features", feats, "--rerank-k", "10").stdout)
    n = sum(len(rec.sentences) for rec in ds.split("test"))
    assert 100 * before / n == pytest.approx(ev["retrieval"]["rerank"]["aligner"]["t2i"]["r1"], abs=0.01)
    assert 100 * after / n == pytest.approx(ev["retrieval"]["t2i"]["r1"], abs=1.01)  # scores rounded in the hits
    assert after > before + 5, (before, after)
    # weight 0 keeps the aligner's order; a large weight follows log p alone
    hits = search_text(al, idx, ds.split("test")[0].sentences[0].raw, 10)
    lp = np.linspace(-1.0, -10.0, 10)[::-1]  # the aligner's last is the generator's first
    assert [h["aligner_rank"] for h in rerank_hits(hits, lp, 10, 0.0)] == list(range(1, 11))
    assert [h["aligner_rank"] for h in rerank_hits(hits, lp, 3, 1e6)] == [10, 9, 8]
    # the CLI: the same through --json; a photo the index names but that is no file needs --rerank-features
    q = ds.split("test")[0].sentences[0].raw
    r = run_cli("search", "text", q, "-i", idx_path, "--json", "-k", "3", "--rerank", tmp / "g.pt",
                "--rerank-features", feats, "--rerank-k", "10")
    assert r.returncode == 0, r.stderr.decode()
    got = [orjson.loads(x) for x in r.stdout.splitlines()]
    assert [h["key"] for h in got] == [h["key"] for h in rerank_text(search_text(al, idx, q, 10), q, gen, store, 3)]
    assert {"logp", "rerank", "aligner_rank", "score"} <= set(got[0])
    r = run_cli("search", "text", q, "-i", idx_path, "--rerank", tmp / "g.pt")
    assert r.returncode == 2 and b"--rerank-features" in r.stderr and len(r.stderr.splitlines()) == 1
    r = run_cli("search", "text", q, "-i", idx_path, "--rerank-k", "5")
    assert r.returncode == 2 and b"need --rerank" in r.stderr
