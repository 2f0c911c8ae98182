"""Caption generator: models learn, checkpoints round-trip, seeds reproduce, resume continues exactly."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from tests.synth_align import mirrored_copy
from vsa.checkpoint import load_checkpoint
from vsa.data import Vocab, load_dataset
from vsa.generator.decoding import greedy
from vsa.features.store import FeatureStore
from vsa.generator.model import GeneratorConfig, build_model, model_from_checkpoint
from vsa.generator import train as T
from vsa.splits import caption_split

WORDS = "a dog runs on the grass two people sit bench man rides bike red car street child plays in water".split()


def tiny_dataset(tmp_path, n_train=12, n_val=4, n_test=4, dim=32, seed=0):
    """A Karpathy-style JSON whose captions depend on a (synthetic) image feature, plus its features NPZ."""
    rng = np.random.RandomState(seed)
    templates = ["a dog runs on the grass", "two people sit on a bench", "a man rides a bike on the street",
                 "a red car on the street", "a child plays in the water"]
    protos = rng.randn(len(templates), dim).astype(np.float32) * 3
    images, feats, keys = [], [], []
    i = 0
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        for _ in range(n):
            c = i % len(templates)
            key = f"img{i:03d}.jpg"
            sents = [{"raw": templates[c] + ("" if j == 0 else " ."), "tokens": [], "sentid": 5 * i + j} for j in range(3)]
            images.append({"filename": key, "imgid": i, "split": split, "sentences": sents})
            feats.append(protos[c] + 0.1 * rng.randn(dim).astype(np.float32))
            keys.append(key)
            i += 1
    ds_path = tmp_path / "dataset_tiny.json"
    ds_path.write_text(json.dumps({"dataset": "tiny", "images": images}))
    arrays = {"feats": np.stack(feats).astype(np.float16), "offsets": np.arange(len(keys) + 1, dtype=np.int64),
              "keys": np.array(keys), "meta": np.array(json.dumps({"extractor": "efficientnet-lite0", "dim": dim, "input": 224}))}
    feat_path = tmp_path / "whole.npz"
    np.savez(feat_path, **arrays)
    return ds_path, feat_path


def _splits(tmp_path, **kw):
    ds_path, feat_path = tiny_dataset(tmp_path, **kw)
    ds = load_dataset(ds_path)
    store = FeatureStore(feat_path)
    from vsa.data import build_vocab

    vocab = build_vocab(ds, 1)
    tr = caption_split(ds, store, "train", vocab, 20)
    va = caption_split(ds, store, "val", vocab, 20)
    return ds, store, vocab, tr, va


@pytest.mark.slow
@pytest.mark.parametrize("rnn,attention", [("rnn", False), ("lstm", False), ("lstm", True), ("updown", True)])
def test_tiny_model_overfits_two_captions_exactly(rnn, attention):
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest on a busy machine
    torch.manual_seed(0)
    vocab = Vocab(WORDS)
    caps = [["a", "dog", "runs", "on", "the", "grass"], ["two", "people", "sit", "on", "a", "bench"]]
    cfg = GeneratorConfig(arch=rnn, vocab_size=len(vocab), feat_dim=8, embed=16, hidden=32, dropout=0.0, attention=attention,
                     att_dim=8)
    model = build_model(cfg)
    feats = torch.randn(2, 8)
    if attention:
        feats = torch.randn(2, 3, 8)
    idx, inp, tgt = T.batch_tensors([(i, vocab.encode(c)) for i, c in enumerate(caps)])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(200):
        loss = torch.nn.functional.cross_entropy(model(feats, inp).flatten(0, 1), tgt.flatten(), ignore_index=0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    hyps = greedy(model, feats, max_len=10)
    assert [vocab.decode(h.tokens) for h in hyps] == caps


def test_paper_rnn_sees_the_image_only_at_the_first_step():
    torch.manual_seed(0)
    cfg = GeneratorConfig(arch="rnn", vocab_size=10, feat_dim=4, embed=6, hidden=5, dropout=0.0)
    model = build_model(cfg).eval()
    st = model.init_state(torch.randn(2, 4))
    tok = torch.tensor([Vocab.start, Vocab.start])
    _, st1 = model.step(tok, st)
    assert torch.count_nonzero(st["bv"]) > 0 and torch.count_nonzero(st1["bv"]) == 0
    # teacher forcing and step-by-step decoding give the same logits
    inp = torch.tensor([[2, 5, 6, 7], [2, 8, 9, 4]])
    logits = model(torch.randn(2, 4).fill_(0.3), inp)
    st = model.init_state(torch.randn(2, 4).fill_(0.3))
    for t in range(4):
        lp, st = model.step(inp[:, t], st)
        assert torch.allclose(lp, torch.log_softmax(logits[:, t], -1), atol=1e-5)


def test_checkpoint_round_trip(tmp_path):
    ds, store, vocab, tr, va = _splits(tmp_path)
    cfg = T.configs(arch="lstm", embed=16, hidden=16, epochs=1, scst_epochs=0, batch_size=8, seed=3)
    out = tmp_path / "m.pt"
    T.train(*cfg, tr, va, vocab, out, store.meta, info=lambda *_: None, choose_decoding=False)
    ck = load_checkpoint(out, "mrnn")
    assert ck["vocab"] == vocab.words and ck["extractor"]["extractor"] == "efficientnet-lite0"
    assert ck["model"]["vocab_size"] == len(vocab) and ck["model"]["feat_dim"] == 32 and ck["train"]["seed"] == 3
    model = model_from_checkpoint(ck)
    feats = tr.feats[:3]
    a = [h.tokens for h in greedy(model, feats)]
    # reload from disk again: identical tensors and identical captions
    m2 = model_from_checkpoint(load_checkpoint(out))
    for k, v in model.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k
    assert [h.tokens for h in greedy(m2, feats)] == a
    assert "optimizer" not in ck and "optimizer" not in ck["meta"]
    # last checkpoint holds the optimiser for --resume
    assert "optimizer" in load_checkpoint(T.last_path(out))


def _train(tmp_path, name, epochs, resume=False, seed=7):
    ds, store, vocab, tr, va = _splits(tmp_path)
    cfg = T.configs(arch="lstm", embed=16, hidden=16, epochs=epochs, scst_epochs=0, batch_size=8, seed=seed,
                    patience=99)
    out = tmp_path / name
    T.train(*cfg, tr, va, vocab, out, store.meta, resume=resume, info=lambda *_: None, choose_decoding=False)
    return load_checkpoint(T.last_path(out))["state_dict"]


def test_same_seed_same_tensors_and_resume_continues_exactly(tmp_path):
    torch.set_num_threads(1)
    a = _train(tmp_path, "a.pt", 2)
    b = _train(tmp_path, "b.pt", 2)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    c = _train(tmp_path, "c.pt", 2, seed=8)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    # 1 epoch, then --resume to 2 epochs == 2 epochs straight
    _train(tmp_path, "r.pt", 1)
    r = _train(tmp_path, "r.pt", 2, resume=True)
    for k in a:
        assert torch.equal(a[k], r[k]), k


def test_resume_without_last_checkpoint_is_a_clear_error(tmp_path):
    from vsa.errors import VsaError

    with pytest.raises(VsaError, match="nothing to resume"):
        _train(tmp_path, "none.pt", 1, resume=True)


def test_the_learning_rate_decays_after_lr_decay_start_then_every_lr_decay_every_epochs():
    """The aligner's schedule and names (vsa.trainer.step_decay); the default every=1 is the per-epoch decay."""
    lrs = lambda **kw: [T.xe_lr(T.configs(lr=1.0, lr_decay=0.5, **kw)[1], e) for e in range(1, 8)]  # noqa: E731
    assert lrs(lr_decay_start=2) == [1.0, 1.0, 0.5, 0.25, 0.125, 0.0625, 0.03125]  # every=1: each epoch after 2
    assert lrs(lr_decay_start=2) == [1.0 * 0.5 ** max(0, e - 2) for e in range(1, 8)]
    assert lrs(lr_decay_start=2, lr_decay_every=2) == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25, 0.125]
    assert lrs(lr_decay_start=3, lr_decay_every=0) == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5]  # 0: decay once
    from vsa.errors import VsaError

    with pytest.raises(VsaError, match="lr_decay_every must be >= 0"):
        T.check(*T.configs(lr_decay_every=-1))


def test_the_decoding_search_after_the_epochs_is_announced_and_bounded(tmp_path):
    ds, store, vocab, tr, va = _splits(tmp_path)
    lines = []
    cfg = T.configs(arch="lstm", embed=16, hidden=16, epochs=1, scst_epochs=0, batch_size=8, search_settings=2,
                    search_images=3)
    summary = T.train(*cfg, tr, va, vocab, tmp_path / "m.pt", store.meta, info=lines.append)
    said = [ln for ln in lines if "choosing the decoding defaults" in ln]
    assert len(said) == 1 and lines.index(said[0]) == [ln.startswith("val beam") for ln in lines].index(True) - 1
    assert "2 (beam, length penalty) settings from (1, 0.0) to (3, 0.0)" in said[0]
    assert "3 of the 4 val images" in said[0]
    search = load_checkpoint(tmp_path / "m.pt")["meta"]["decoding_search"]
    assert [(r["beam"], r["length_penalty"], r["images"]) for r in search] == [(1, 0.0, 3), (3, 0.0, 3)]
    assert summary["decoding"]["search"] == search
    assert T.search_grid() == [(1, 0.0), (3, 0.0), (3, 0.7), (5, 0.0), (5, 0.7), (7, 0.0), (7, 0.7)]
    # none at all: the checkpoint keeps the decoding defaults it was trained with
    cfg = T.configs(arch="lstm", embed=16, hidden=16, epochs=1, scst_epochs=0, batch_size=8, search_settings=0)
    lines.clear()
    summary = T.train(*cfg, tr, va, vocab, tmp_path / "n.pt", store.meta, info=lines.append)
    assert "decoding" not in summary and not any("decoding" in ln for ln in lines)
    assert "decoding_search" not in load_checkpoint(tmp_path / "n.pt")["meta"]


def test_beam_search_refuses_a_beam_below_one():
    from vsa.generator.decoding import beam_search, constrained_beam_search
    from vsa.errors import VsaError

    model = build_model(GeneratorConfig(arch="lstm", vocab_size=12, feat_dim=4, embed=4, hidden=4)).eval()
    for search in (lambda: beam_search(model, torch.randn(1, 4), beam=0),
                   lambda: constrained_beam_search(model, torch.randn(1, 4), None, [[]], beam=0)):
        with pytest.raises(VsaError, match="^the beam size must be at least 1, got 0$"):
            search()


def test_scst_phase_runs_and_keeps_best(tmp_path):
    ds, store, vocab, tr, va = _splits(tmp_path)
    cfg = T.configs(arch="lstm", embed=16, hidden=16, epochs=2, scst_epochs=2, batch_size=10, seed=1, patience=99,
                    scst_lr=4e-4, scst_lr_decay=0.5)
    out = tmp_path / "s.pt"
    summary = T.train(*cfg, tr, va, vocab, out, store.meta, info=lambda *_: None, choose_decoding=False)
    phases = [h["phase"] for h in summary["history"]]
    assert phases == ["xe", "xe", "scst", "scst"]
    assert [h["lr"] for h in summary["history"][2:]] == [4e-4, 2e-4]  # scst_lr, then x scst_lr_decay per epoch
    best = load_checkpoint(out)["meta"]["best"]
    assert best["CIDEr"] == max(h["val"]["CIDEr"] for h in summary["history"])
    log = [json.loads(ln) for ln in (tmp_path / "s.log.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in log] == phases  # one JSON line per epoch


def test_updown_packed_teacher_forcing_equals_full_and_step_by_step():
    torch.manual_seed(0)
    cfg = GeneratorConfig(arch="updown", vocab_size=12, feat_dim=6, embed=8, hidden=10, att_dim=5, dropout=0.0)
    model = build_model(cfg).eval()
    feats = torch.randn(2, 4, 6)  # two images, 4 regions each
    mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    sents = [(0, [4, 5, 6]), (1, [7]), (0, [8, 9, 10, 11, 4]), (1, [5, 6])]
    idx, inp, tgt = T.batch_tensors(sents)
    sel = tgt != 0
    full = model(feats, inp, mask, rows=idx)
    packed = model(feats, inp, mask, select=sel, rows=idx)  # rows shorter than the batch stop early
    assert torch.allclose(full[sel], packed, atol=1e-5)
    st = model.init_state(feats.index_select(0, idx), mask.index_select(0, idx))
    for t in range(inp.shape[1]):
        lp, st = model.step(inp[:, t], st)
        assert torch.allclose(lp, torch.log_softmax(full[:, t], -1), atol=1e-5)


def test_scst_rescores_samples_under_the_distribution_they_were_drawn_from():
    """The samples' log-probabilities with gradients must be those of the sampling distribution
    (``<unk>``/``<pad>``/``<start>`` never, ``<end>`` not first): with the plain softmax instead,
    the probability of never-sampled tokens drifts up while the reward rises."""
    from vsa.generator.decoding import NEG, _forbid, sample

    torch.manual_seed(0)
    for rnn in ("lstm", "updown"):
        cfg = GeneratorConfig(arch=rnn, vocab_size=15, feat_dim=6, embed=8, hidden=10, att_dim=5, dropout=0.0)
        model = build_model(cfg).eval()
        with torch.no_grad():
            model.out.bias[Vocab.unk] += 3.0  # much mass on a token that is never sampled
        feats = torch.randn(3, 4, 6)
        seqs = sample(model, feats, None, 4, 8)
        rows = torch.arange(3).repeat_interleave(4)
        got = T.sequence_logprob(model, feats, None, seqs, rows)
        # the sampler's own step-by-step log-probabilities
        st = model.init_state(feats.index_select(0, rows))
        tok = torch.full((len(rows),), Vocab.start)
        want = torch.zeros(len(rows))
        with torch.no_grad():
            for t in range(seqs.shape[1]):
                logp, st = model.step(tok, st)
                logp = torch.log_softmax(_forbid(logp, t), -1)
                w = seqs[:, t]
                want += torch.where(w == Vocab.pad, torch.zeros(()), logp.gather(1, w[:, None]).squeeze(1))
                tok = torch.where(w == Vocab.pad, torch.full_like(w, Vocab.end), w)
        assert (seqs != Vocab.pad).any() and NEG < 0
        assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


def test_draw_follows_the_probabilities_and_never_draws_a_forbidden_token():
    """The inverse-CDF sampler behind SCST: frequencies match the distribution (200,000 draws, within
    0.5 points per token), zero-probability tokens (the sampler's forbidden ones) never come out."""
    from vsa.generator.decoding import draw

    torch.manual_seed(0)
    p = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.3, 0.0]) * 7.0  # unnormalised, zeros inside and at both ends
    got = draw(p.expand(200_000, -1).contiguous())
    freq = torch.bincount(got, minlength=6).double() / len(got)
    assert freq[[0, 2, 5]].sum() == 0
    assert torch.allclose(freq, (p / p.sum()).double(), atol=5e-3), freq
    # one-hot rows always give their token, whatever u is
    eye = torch.eye(6)
    assert draw(eye).tolist() == list(range(6))


def test_sample_stops_each_sentence_at_its_end():
    """Finished sentences leave the batch: every row is a prefix ending in ``<end>`` (or max_len words), pads
    after, the width is the longest row, and the words are never <unk>/<pad>/<start>."""
    from vsa.generator.decoding import sample

    torch.manual_seed(1)
    cfg = GeneratorConfig(arch="updown", vocab_size=12, feat_dim=6, embed=8, hidden=10, att_dim=5, dropout=0.0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        model.out.bias[Vocab.end] += 1.5  # sentences of varied lengths
    seqs = sample(model, torch.randn(6, 3, 6), None, 5, 9)
    assert seqs.shape[0] == 30 and seqs.shape[1] <= 9
    lengths = []
    for row in seqs.tolist():
        words = [w for w in row if w != Vocab.pad]
        assert row[: len(words)] == words  # a prefix, pads after
        assert Vocab.end not in words[:-1] and (words[-1] == Vocab.end or len(words) == 9)
        assert not {Vocab.unk, Vocab.pad, Vocab.start} & set(words) and words[0] != Vocab.end
        lengths.append(len(words))
    assert max(lengths) == seqs.shape[1] and min(lengths) < max(lengths)


def test_feature_moments_are_those_of_the_real_regions():
    """Chunked float64 standardisation moments equal torch's mean/std over the masked rows (padding excluded)."""
    from vsa.generator.train import feature_moments

    torch.manual_seed(0)
    x = torch.randn(300, 4, 7) * 3 + 2
    m = torch.rand(300, 4) > 0.4
    x[~m] = 1e4  # padding must not count
    mu, sd = feature_moments(x, m, chunk=32)
    assert torch.allclose(mu, x[m].mean(0), atol=1e-5) and torch.allclose(sd, x[m].std(0), atol=1e-5)
    mu, sd = feature_moments(x[:, 0], None, chunk=7)
    assert torch.allclose(mu, x[:, 0].mean(0), atol=1e-4) and torch.allclose(sd, x[:, 0].std(0), atol=1e-4)


def test_cider_reward_counts_the_sentence_end():
    """``... on the`` cut short must not earn the n-grams of ``... on the grass``: the reward sees ``</s>``."""
    from vsa.generator.metrics import CiderD

    vocab = Vocab(WORDS)
    refs = [["a", "dog", "runs", "on", "the", "grass"], ["a", "dog", "runs", "on", "the", "green", "grass"]]
    others = [[["two", "people", "sit"]], [["a", "man", "rides"]]]
    full = vocab.encode(refs[0]) + [Vocab.end, Vocab.pad]
    cut = vocab.encode(refs[0][:5]) + [Vocab.end]
    long_cut = vocab.encode(refs[0][:5])  # cut by max_len: no </s>
    w_full, w_cut, w_long = (T.sample_words(r, vocab.itos) for r in (full, cut, long_cut))
    assert w_full[-1] == T.END_WORD and w_cut[-1] == T.END_WORD and T.END_WORD not in w_long
    scorer = CiderD([T.ends(refs)] + [T.ends(o) for o in others])
    s_full, s_cut = scorer.score([w_full, w_cut], [T.ends(refs)] * 2)
    # the same sentences scored without the end token (as before): the cut one loses much less
    plain = CiderD([refs] + others)
    p_full, p_cut = plain.score([w_full[:-1], w_cut[:-1]], [refs] * 2)
    assert s_cut / s_full < p_cut / p_full - 0.1


def test_scst_on_a_small_task_raises_the_reward_and_the_greedy_score(tmp_path):
    torch.set_num_threads(1)
    ds, store, vocab, tr, va = _splits(tmp_path, n_train=40, n_val=10)
    cfg = T.configs(arch="lstm", embed=16, hidden=32, epochs=2, scst_epochs=8, batch_size=20, seed=1, patience=99,
                    lr=3e-3, scst_lr=3e-3, dropout=0.0)
    hist = T.train(*cfg, tr, va, vocab, tmp_path / "m.pt", store.meta, info=lambda *_: None,
                   choose_decoding=False)["history"]
    xe = [h for h in hist if h["phase"] == "xe"]
    sc = [h for h in hist if h["phase"] == "scst"]
    assert len(sc) == 8
    rewards = [h["loss"] for h in sc]  # the SCST epoch's mean sampled reward
    assert np.mean(rewards[-3:]) > np.mean(rewards[:2]) + 0.05
    assert max(h["val"]["CIDEr"] for h in sc[-4:]) > xe[-1]["val"]["CIDEr"] + 10


def test_scst_dropout_switches_dropout_on_for_sampling_and_rescoring(tmp_path, monkeypatch):
    """``scst_dropout`` (the reference's way) samples in training mode, the default in eval mode; on one process
    the samples' log-probabilities come from the sampling pass itself (no re-scoring forward)."""
    ds, store, vocab, tr, va = _splits(tmp_path)
    seen = []
    real_sample, real_lp, real_scored = T.sample, T.sequence_logprob, T.sample_scored

    def spy_sample(model, *a, **k):
        seen.append(("sample", model.training))
        return real_sample(model, *a, **k)

    def spy_scored(model, *a, **k):
        seen.append(("scored sample", model.training))
        return real_scored(model, *a, **k)

    def spy_lp(model, *a, **k):
        seen.append(("rescore", model.training))
        return real_lp(model, *a, **k)

    monkeypatch.setattr(T, "sample", spy_sample)
    monkeypatch.setattr(T, "sample_scored", spy_scored)
    monkeypatch.setattr(T, "sequence_logprob", spy_lp)
    for flag in (False, True):
        seen.clear()
        cfg = T.configs(arch="lstm", embed=16, hidden=16, epochs=1, scst_epochs=1, batch_size=10, seed=1,
                        scst_dropout=flag)
        T.train(*cfg, tr, va, vocab, tmp_path / f"d{flag}.pt", store.meta, info=lambda *_: None,
                choose_decoding=False)
        assert seen and set(seen) == {("scored sample", flag)}


def test_export_generator_ships_float16_weights_that_caption_alike(tmp_path):
    """`python -m vsa.generator.model SRC DST`: float16 weights, no optimiser state, no path of this machine; greedy
    captions of the export equal the trained model's."""
    from vsa.checkpoint import load_checkpoint as load
    from vsa.generator.model import export_generator

    _train(tmp_path, "g.pt", 3)
    src = tmp_path / "g.pt"
    info = export_generator(src, tmp_path / "ship.pt")
    ck = load(tmp_path / "ship.pt")
    assert "optimizer" not in ck and "features" not in ck["meta"] and info["exported_from"] == "g.pt"
    assert all(v.dtype == torch.float16 for v in ck["state_dict"].values() if v.is_floating_point())
    assert ck["vocab"] == load(src)["vocab"] and ck["decoding"] == load(src)["decoding"]
    a, b = (model_from_checkpoint(load(p)) for p in (src, tmp_path / "ship.pt"))
    feats = torch.from_numpy(np.asarray(np.load(tmp_path / "whole.npz")["feats"][:6], dtype=np.float32))
    with torch.inference_mode():
        ga, gb = greedy(a, feats, max_len=8), greedy(b.float(), feats, max_len=8)
    assert [h.tokens for h in ga] == [h.tokens for h in gb] and any(h.tokens for h in ga)
    # decoding defaults chosen on val go into the export (`python -m vsa.generator.model SRC DST beam=5 mirror=0.5`)
    from vsa.errors import VsaError

    export_generator(src, tmp_path / "ship2.pt", decoding=["beam=5", "mirror=0.5"])
    assert load(tmp_path / "ship2.pt")["decoding"] == {**load(src)["decoding"], "beam": 5, "mirror": 0.5}
    for bad in ("beams=5", "mirror=wide"):
        with pytest.raises(VsaError):
            export_generator(src, tmp_path / "ship3.pt", decoding=[bad])


def test_box_dropout_drops_an_images_boxes_and_keeps_the_whole_image_and_its_cells():
    # rows as `vsa embed --cells 2` writes them: whole image, boxes, 2 x 2 cells; then padding
    mask = torch.zeros(3, 9, dtype=torch.bool)
    mask[0, :7] = True  # 2 boxes
    mask[1, :5] = True  # no box
    mask[2, :9] = True  # 4 boxes
    rng = np.random.RandomState(0)
    assert T.drop_boxes(mask, 2, 0.0, rng) is mask and T.drop_boxes(mask, 0, 1.0, rng) is mask
    m = T.drop_boxes(mask, 2, 1.0, rng)
    assert m[0].tolist() == [True, False, False, True, True, True, True, False, False]
    assert m[1].tolist() == mask[1].tolist()
    assert m[2].tolist() == [True] + [False] * 4 + [True] * 4
    big = torch.zeros(2000, 9, dtype=torch.bool)
    big[:, :7] = True
    kept = T.drop_boxes(big, 2, 0.3, rng)[:, 1].float().mean().item()
    assert 0.65 < kept < 0.75


def test_a_box_generator_reads_its_cells_beyond_max_regions_and_trains_with_box_dropout(tmp_path):
    from vsa.features.store import save_features
    from vsa.features.featuriser import grid_boxes
    from vsa.generator.model import region_rows

    ds_path, feat_path = tiny_dataset(tmp_path, dim=16)
    whole = FeatureStore(feat_path)
    rng = np.random.RandomState(0)
    recs = []
    for i, k in enumerate(whole.keys):
        nb = i % 4  # 0..3 boxes
        f = np.concatenate([whole[k], rng.randn(nb + 4, 16).astype(np.float32)])
        regs = ([{"box": [0, 0, 64, 64], "score": 1.0, "label": "image"}]
                + [{"box": [1, 1, 20, 20], "score": 0.9, "label": "dog"}] * nb + grid_boxes(64, 64, 2, "cell"))
        recs.append({"key": k, "size": (64, 64), "feats": f, "regions": regs})
    path = tmp_path / "boxes.npz"
    save_features(path, recs, meta={"extractor": "efficientnet-lite0", "dim": 16, "input": 224, "crop": "warp",
                                    "cells": 2, "detector": "yolov5n"})
    cfg = T.configs(arch="updown", embed=8, hidden=8, att_dim=4, max_regions=2, epochs=1, scst_epochs=1,
                    batch_size=10, box_dropout=0.5, seed=0)
    out = tmp_path / "b.pt"
    T.train_on(*cfg, load_dataset(ds_path), path, out, info=lambda *_: None, choose_decoding=False)
    ck = load_checkpoint(out)
    assert ck["model"]["cells"] == 2 and ck["train"]["box_dropout"] == 0.5
    assert region_rows(ck["model"]) == 2 + 4  # the whole image and one box, then the four cells
    with pytest.raises(Exception, match="box_dropout"):
        T.check(*T.configs(box_dropout=1.5))
    with pytest.raises(Exception, match="box_dropout .* needs a region generator"):  # no cells: nothing to do
        T.train_on(*cfg, load_dataset(ds_path), feat_path, tmp_path / "w.pt", info=lambda *_: None)


def test_flip_features_are_read_by_training_images_with_probability_flip(tmp_path):
    ds, store, vocab, tr, va = _splits(tmp_path)
    tr.flipped = -tr.feats
    rng = np.random.RandomState(0)
    idx = torch.arange(len(tr.feats))
    assert T.flips(va, 5, 0.5, rng) is None and T.flips(tr, 5, 0.0, rng) is None  # no draw: old runs unchanged
    flip = T.flips(tr, len(idx), 1.0, rng)
    assert bool(flip.all()) and torch.equal(T._sub(tr, idx, flip=flip)[0], -tr.feats)
    flip = torch.tensor([i % 2 == 0 for i in range(len(idx))])
    f = T._sub(tr, idx, flip=flip)[0]
    assert torch.equal(f[0], -tr.feats[0]) and torch.equal(f[1], tr.feats[1])
    share = T.flips(tr, 4000, 0.3, rng).float().mean().item()
    assert 0.27 < share < 0.33
    # train_on reads --flip-features into the training split only, and records it
    ds_path, feat_path = tmp_path / "dataset_tiny.json", tmp_path / "whole.npz"
    flipped = mirrored_copy(feat_path, tmp_path / "flip.npz")
    cfg = T.configs(arch="lstm", embed=8, hidden=8, epochs=1, scst_epochs=1, batch_size=10, seed=0, flip=0.5)
    seen = {}
    real = T.train

    def spy(mcfg, tcfg, dcfg, train_sp, val_sp, *a, **k):
        seen.update(train=train_sp, val=val_sp)
        return real(mcfg, tcfg, dcfg, train_sp, val_sp, *a, **k)

    read = []
    real_sub = T._sub

    def sub(sp, idx, dev=None, flip=None):  # which mirrored rows the epochs read
        read.append(0 if flip is None else int(flip.sum()))
        return real_sub(sp, idx, dev, flip)

    T.train, T._sub, out = spy, sub, tmp_path / "g.pt"
    try:
        T.train_on(*cfg, load_dataset(ds_path), feat_path, out, info=lambda *_: None, choose_decoding=False,
                   flip_features=flipped)
    finally:
        T.train, T._sub = real, real_sub
    assert torch.equal(seen["train"].flipped, -seen["train"].feats) and seen["val"].flipped is None
    assert 0 < sum(read) < len(tr.feats) * 2  # the XE and the SCST epoch each read about half of 12 mirrored
    ck = load_checkpoint(out)
    assert ck["train"]["flip"] == 0.5 and ck["meta"]["flip_features"].endswith("flip.npz")
    # refused: not mirrored, made differently, or missing images
    for bad, msg in ((mirrored_copy(feat_path, tmp_path / "b1.npz", meta={}), "not mirrored"),
                     (mirrored_copy(feat_path, tmp_path / "b2.npz", meta={"flip": True, "input": 260}),
                      "made differently .*input"),
                     (mirrored_copy(feat_path, tmp_path / "b3.npz", drop=1), "have no mirrored features")):
        with pytest.raises(Exception, match=msg):
            T.train_on(*cfg, load_dataset(ds_path), feat_path, tmp_path / "x.pt", info=lambda *_: None, flip_features=bad)
    with pytest.raises(Exception, match="flip must be"):
        T.check(*T.configs(flip=2.0))


def test_scst_reward_mixes_meteor_only_when_asked(tmp_path):
    from vsa.generator.metrics import CiderD, MixedReward

    ds, store, vocab, tr, va = _splits(tmp_path)
    assert isinstance(T.scst_reward(tr, T.configs()[1]), CiderD)
    if shutil.which("java") is None:
        pytest.skip("METEOR needs Java")
    mixed = T.scst_reward(tr, T.configs(scst_meteor=0.5)[1])
    assert isinstance(mixed, MixedReward) and mixed.weight == 0.5 and mixed.end == T.END_WORD


def test_scst_meteor_is_checked_before_training(monkeypatch):
    from vsa.errors import VsaError

    with pytest.raises(VsaError, match="scst_meteor must be >= 0"):
        T.check(*T.configs(scst_meteor=-1.0))
    monkeypatch.setattr(shutil, "which", lambda name: None)  # no java on PATH
    with pytest.raises(VsaError, match="needs Java"):
        T.check(*T.configs(scst_meteor=1.0))
    T.check(*T.configs(scst_meteor=1.0, scst_epochs=0))  # no SCST epoch: METEOR never runs
    T.check(*T.configs())


@pytest.mark.slow
def test_eval_decodes_each_image_with_its_mirror_image_when_the_generator_asks(tmp_path):
    """`decoding.mirror` in `vsa eval`: the mirrored images' features (`vsa embed --flip`) side by side with the images'
    (the same captions as :func:`vsa.generator.model.with_mirror` on them); errors name the fix."""
    from tests.conftest import run_cli
    from vsa.checkpoint import save_checkpoint
    from vsa.generator.decoding import DecodingConfig, constraints, decode
    from vsa.errors import VsaError
    from vsa.generator.evaluate import generate_split
    from vsa.generator.model import with_mirror

    torch.set_num_threads(1)
    ds_path, feat_path = tiny_dataset(tmp_path)
    ds = load_dataset(ds_path)
    z = dict(np.load(feat_path))
    flip_path, plain_path = tmp_path / "flip.npz", tmp_path / "plain.npz"
    rng = np.random.RandomState(1)
    np.savez(flip_path, **dict(z, feats=(z["feats"] + rng.randn(*z["feats"].shape) * 3).astype(np.float16),
                                meta=np.array(json.dumps({**json.loads(str(z["meta"])), "flip": True}))))
    np.savez(plain_path, **z)
    torch.manual_seed(0)
    cfg = GeneratorConfig(arch="lstm", vocab_size=len(WORDS) + 4, feat_dim=32, embed=16, hidden=24)
    model = build_model(cfg).eval()
    path = tmp_path / "g.pt"
    meta = {"features": str(feat_path), "flip_features": str(flip_path)}
    save_checkpoint(path, "mrnn", cfg, {}, {"beam": 2, "mirror": 0.5}, WORDS, json.loads(str(z["meta"])),
                    model.state_dict(), meta)
    test = [r.key for r in ds.split("test")]
    f = torch.from_numpy(z["feats"][[int(k[3:6]) for k in test]].astype(np.float32))
    g = torch.from_numpy(np.load(flip_path)["feats"][[int(k[3:6]) for k in test]].astype(np.float32))
    cons = constraints(DecodingConfig(), Vocab(WORDS))
    with torch.no_grad():
        want = [" ".join(Vocab(WORDS).decode(h.tokens)) for h in decode(with_mirror(model, 0.5), torch.cat([f, g], -1), None, 2, 20, 0.0, **cons)]
        alone = [" ".join(Vocab(WORDS).decode(h.tokens)) for h in decode(model, f, None, 2, 20, 0.0, **cons)]
    assert want != alone
    _, caps, _, _, w = generate_split(path, ds, "test", feat_path, device="cpu", mirror_features=flip_path)
    assert caps == want and w == 0.5
    _, caps, _, _, w = generate_split(path, ds, "test", feat_path, device="cpu", mirror=0.0)
    assert caps == alone and w == 0.0
    with pytest.raises(VsaError, match="--mirror-features"):
        generate_split(path, ds, "test", feat_path, device="cpu")
    with pytest.raises(VsaError, match="not of mirrored images"):
        generate_split(path, ds, "test", feat_path, device="cpu", mirror_features=plain_path)
    with pytest.raises(VsaError, match="mirror weight"):
        generate_split(path, ds, "test", feat_path, device="cpu", mirror=1.0, mirror_features=flip_path)
    # the CLI finds the file the generator was trained with as --flip-features, and reports the weight
    r = run_cli("eval", "--model", path, "--dataset", ds_path, "--split", "test", "--json", "--captions-out",
                tmp_path / "caps.json")
    assert r.returncode == 0, r.stderr.decode()
    gen = json.loads(r.stdout)["generation"]
    assert gen["mirror"] == 0.5 and gen["mirror_features"] == str(flip_path)
    assert [c["caption"] for c in json.loads((tmp_path / "caps.json").read_text())] == want


def test_a_built_generator_and_an_ensemble_of_built_ones_carry_the_default_decoding():
    """`decoding` is part of every caption model (the checkpoint's replaces the defaults): nothing reads it through a
    fallback."""
    from vsa.generator.decoding import DecodingConfig
    from vsa.generator.model import GeneratorEnsemble

    a = build_model(GeneratorConfig(arch="lstm", vocab_size=12, feat_dim=4, embed=4, hidden=4))
    assert a.decoding == DecodingConfig()
    a.decoding = DecodingConfig(beam=2)
    b = build_model(a.cfg)
    assert GeneratorEnsemble([a, b]).decoding == DecodingConfig(beam=2)
