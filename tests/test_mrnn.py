"""Caption generator: models learn, checkpoints round-trip, seeds reproduce, resume continues exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vsa.checkpoint import load_checkpoint
from vsa.data import Vocab, load_dataset
from vsa.decoding import greedy
from vsa.featstore import FeatureStore
from vsa.mrnn import MRNNConfig, build_model, model_from_checkpoint
from vsa import train_mrnn as T

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
    tr = T.image_split(ds, store, "train", vocab, 20)
    va = T.image_split(ds, store, "val", vocab, 20)
    return ds, store, vocab, tr, va


@pytest.mark.parametrize("rnn,attention", [("rnn", False), ("lstm", False), ("lstm", True)])
def test_tiny_model_overfits_two_captions_exactly(rnn, attention):
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest on a busy machine
    torch.manual_seed(0)
    vocab = Vocab(WORDS)
    caps = [["a", "dog", "runs", "on", "the", "grass"], ["two", "people", "sit", "on", "a", "bench"]]
    cfg = MRNNConfig(rnn=rnn, vocab_size=len(vocab), feat_dim=8, embed=16, hidden=32, dropout=0.0, attention=attention,
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
    cfg = MRNNConfig(rnn="rnn", vocab_size=10, feat_dim=4, embed=6, hidden=5, dropout=0.0)
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


def test_checkpoint_round_trip_and_half_export(tmp_path):
    ds, store, vocab, tr, va = _splits(tmp_path)
    cfg = MRNNConfig(rnn="lstm", embed=16, hidden=16, epochs=1, batch_size=8, seed=3)
    out = tmp_path / "m.pt"
    T.train(cfg, tr, va, vocab, out, store.meta, log=lambda *_: None, choose_decoding=False)
    ck = load_checkpoint(out, "mrnn")
    assert ck["vocab"] == vocab.words and ck["extractor"]["extractor"] == "efficientnet-lite0"
    assert ck["config"]["vocab_size"] == len(vocab) and ck["config"]["feat_dim"] == 32
    model = model_from_checkpoint(ck)
    feats = tr.feats[:3]
    a = [h.tokens for h in greedy(model, feats)]
    # reload from disk again: identical tensors and identical captions
    m2 = model_from_checkpoint(load_checkpoint(out))
    for k, v in model.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k
    assert [h.tokens for h in greedy(m2, feats)] == a
    # float16 export: half the bytes, loads back as float32, same captions on these inputs
    half = tmp_path / "h.pt"
    T.export_half(out, half)
    hk = load_checkpoint(half)
    assert all(v.dtype == torch.float16 for v in hk["state_dict"].values() if v.is_floating_point())
    assert "optimizer" not in hk["meta"]
    m3 = model_from_checkpoint(hk)
    assert next(m3.parameters()).dtype == torch.float32
    # last checkpoint holds the optimiser for --resume
    assert "optimizer" in load_checkpoint(T.last_path(out))["meta"]


def _train(tmp_path, name, epochs, resume=False, seed=7):
    ds, store, vocab, tr, va = _splits(tmp_path)
    cfg = MRNNConfig(rnn="lstm", embed=16, hidden=16, epochs=epochs, batch_size=8, seed=seed, patience=99)
    out = tmp_path / name
    T.train(cfg, tr, va, vocab, out, store.meta, resume=resume, log=lambda *_: None, choose_decoding=False)
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


def test_scst_phase_runs_and_keeps_best(tmp_path):
    ds, store, vocab, tr, va = _splits(tmp_path)
    cfg = MRNNConfig(rnn="lstm", embed=16, hidden=16, epochs=2, scst_epochs=1, batch_size=10, seed=1, patience=99)
    out = tmp_path / "s.pt"
    summary = T.train(cfg, tr, va, vocab, out, store.meta, log=lambda *_: None, choose_decoding=False)
    phases = [h["phase"] for h in summary["history"]]
    assert phases == ["xe", "xe", "scst"]
    best = load_checkpoint(out)["meta"]["best"]
    assert best["val_CIDEr"] == max(h["val_CIDEr"] for h in summary["history"])
