"""The caption-model interface: an architecture is one class registered by name, and training, decoding, ensembles,
checkpoints and `vsa caption` take it as they take the built-in ones."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
import torch
from torch import nn

from tests.conftest import run_cli
from tests.test_caption_cli import _photo
from tests.test_mrnn import tiny_dataset
from vsa.generator.models import CaptionModelBase, base, register_caption_model


class ToyGRU(CaptionModelBase):
    """A one-layer GRU whose first state is the projected whole image: all a new architecture writes. The rest
    (step, teacher forcing with ``select`` / ``rows``, the feature buffers) comes from :class:`CaptionModelBase`.
    A module of one's own would put ``@register_caption_model("toy-gru")`` on it; here the fixture registers it
    for one test at a time."""

    summary = "a one-layer GRU of the tests"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embed, padding_idx=0)
        self.img = nn.Linear(cfg.feat_dim, cfg.hidden)
        self.gru = nn.GRUCell(cfg.embed, cfg.hidden)
        self.out = nn.Linear(cfg.hidden, cfg.vocab_size)

    def init_state(self, feats, mask=None):
        feats, _ = self.prepare(feats, mask)
        return {"h": torch.tanh(self.img(feats[:, 0]))}

    def logits(self, tokens, st):
        h = self.gru(self.embed(tokens), st["h"])
        return self.out(h), {"h": h}


class ToyRegions(ToyGRU):
    """Reads region rows: it says so, and the features it reads by default follow."""

    @classmethod
    def reads_regions(cls, cfg) -> bool:
        return True


@pytest.fixture
def registry(monkeypatch):
    """The built-in architectures and, for this test only, the toy ones."""
    monkeypatch.setattr(base, "_ARCHS", dict(base._ARCHS))
    register_caption_model("toy-gru")(ToyGRU)
    register_caption_model("toy-regions")(ToyRegions)
    return base._ARCHS


def _features_as_embed_makes_them(tmp_path, photo):
    """The tiny dataset's features under the extractor record `vsa embed` writes for ``photo`` (so `vsa caption`
    featurises a photo as these features were made), and that photo's own features."""
    r = run_cli("embed", photo, "-o", tmp_path / "photo.npz", "--dtype", "float32", "--threads", "1")
    assert r.returncode == 0, r.stderr.decode()
    f = np.load(tmp_path / "photo.npz")
    ds_path, feat_path = tiny_dataset(tmp_path, n_train=15, n_val=5, n_test=2, dim=1280)
    arrays = dict(np.load(feat_path))
    arrays["meta"] = f["meta"]
    np.savez(feat_path, **arrays)
    return ds_path, feat_path, torch.from_numpy(f["feats"][:1])


@pytest.mark.slow
def test_a_new_architecture_is_one_class_that_trains_decodes_and_captions(tmp_path, registry, monkeypatch):
    from vsa.generator import train as T
    from vsa.data import Vocab, load_dataset
    from vsa.generator.decoding import beam_search, constraints, decode, greedy, sequence_logprob
    from vsa.generator.model import GeneratorEnsemble, load_generators

    torch.set_num_threads(1)
    photo = _photo(tmp_path / "photo.jpg")
    ds_path, feat_path, photo_feats = _features_as_embed_makes_them(tmp_path, photo)
    out = tmp_path / "toy.pt"
    cfg = T.configs(arch="toy-gru", embed=16, hidden=32, dropout=0.0, epochs=8, scst_epochs=1, batch_size=9,
                    lr=2e-2, min_count=1, patience=99, search_settings=3, seed=0)
    summary = T.train_on(*cfg, load_dataset(ds_path), feat_path, out, info=lambda *_: None)
    assert [h["phase"] for h in summary["history"]] == ["xe"] * 8 + ["scst"]  # teacher forcing, then sampling
    assert [r["beam"] for r in summary["decoding"]["search"]] == [1, 3, 3]  # the beam search ran on val

    # the checkpoint stores the architecture's name and plain tensors, never code
    ck = torch.load(out, weights_only=True)
    assert ck["model"]["arch"] == "toy-gru" and set(ck["state_dict"]) >= {"feat_mean", "gru.weight_ih", "out.bias"}
    model, ck = load_generators(out)
    assert isinstance(model, ToyGRU) and model.decoding.beam == summary["decoding"]["beam"]
    vocab = Vocab(ck["vocab"])
    val = [r for r in load_dataset(ds_path).split("val")]
    store = np.load(feat_path)
    keys = list(store["keys"])
    feats = torch.from_numpy(np.stack([store["feats"][keys.index(r.key)] for r in val]).astype(np.float32))
    cons = constraints(model.decoding, vocab)
    hyps = beam_search(model, feats, None, 3, 12, 0.0, **cons)
    assert all(len(h) == 3 and h[0].score >= h[-1].score for h in hyps)
    # five fixed sentences, one per kind of image: learnt
    assert [" ".join(vocab.decode(h[0].tokens)) for h in hyps] == [r.sentences[0].raw for r in val]
    # teacher forcing (``rows``, ``select``) scores a sentence as the step-by-step decoding did
    g = greedy(model, feats, max_len=12)
    seqs = torch.full((len(g), 13), Vocab.pad)
    for i, h in enumerate(g):
        seqs[i, : len(h.tokens) + 1] = torch.tensor(h.tokens + [Vocab.end])
    flip = torch.arange(len(g)).flip(0)  # sentence i reads row flip[i] of feats[flip]: image i
    with torch.no_grad():
        lp = sequence_logprob(model, feats[flip], None, seqs, flip, constrained=False)
    assert lp.tolist() == pytest.approx([h.logprob for h in g], abs=1e-4)
    # an ensemble of the model with itself decodes as the model
    alone = decode(model, feats, None, 3, 12, 0.0, **cons)
    assert [h.tokens for h in decode(GeneratorEnsemble([model, model]), feats, None, 3, 12, 0.0, **cons)] == \
        [h.tokens for h in alone]

    # `vsa caption --model` (in this process, where the class is registered) featurises and decodes with it
    monkeypatch.delenv("VSA_TEST_SUBPROCESS", raising=False)
    r = run_cli("caption", photo, "--model", out, "--json", "--threads", "1")
    assert r.returncode == 0, r.stderr.decode()
    rec = orjson.loads(r.stdout.splitlines()[0])
    want = decode(model, photo_feats, None, model.decoding.beam, model.decoding.max_len,
                  model.decoding.length_penalty, **cons)[0]
    assert rec["caption"] == " ".join(vocab.decode(want.tokens)) and rec["logprob"] == pytest.approx(want.logprob, abs=1e-3)

    # where the class is not registered (another process), the file names the architecture it needs
    registry.pop("toy-gru")
    r = run_cli("caption", photo, "--model", out, "--threads", "1")
    err = r.stderr.decode().strip().splitlines()
    assert r.returncode == 2 and len(err) == 1, err
    assert err[0] == f"vsa: error: {out}: 'model' arch must be one of lstm, rnn, toy-regions, updown, updown-labels, got 'toy-gru'"


def test_reading_regions_and_the_default_features_are_the_architectures_own(registry):
    from vsa.generator.model import GeneratorConfig, build_model, features_key, region_rows, uses_regions

    for arch, regions, key in (("toy-gru", False, "features.whole"), ("toy-regions", True, "features.regions"),
                               ("updown", True, "features.grid"), ("lstm", False, "features.whole"),
                               ("rnn", False, "features.whole")):
        cfg = GeneratorConfig(arch=arch, vocab_size=9, feat_dim=4, embed=4, hidden=4, att_dim=4, max_regions=3)
        assert (uses_regions(cfg), features_key(cfg)) == (regions, key), arch
        assert (uses_regions({"arch": arch}), features_key({"arch": arch})) == (regions, key), arch  # a checkpoint's dict
        assert region_rows(cfg) == 3
    lstm = GeneratorConfig(arch="lstm", attention=True)
    assert uses_regions(lstm) and features_key(lstm) == "features.regions"
    assert type(build_model(GeneratorConfig(arch="toy-regions", vocab_size=9, feat_dim=4))) is ToyRegions
    with pytest.raises(ValueError, match="already registered"):
        register_caption_model("lstm")(ToyGRU)


def test_an_unknown_architecture_is_one_line_naming_the_registered_ones(tmp_path):
    from vsa.checkpoint import save_checkpoint
    from vsa.errors import VsaError
    from vsa.generator.model import GeneratorConfig, build_model

    with pytest.raises(VsaError, match=r"^unknown caption model architecture 'transformer' \(registered: lstm, rnn, "
                                       r"updown, updown-labels\)$"):
        build_model(GeneratorConfig(arch="transformer", vocab_size=9, feat_dim=4))
    ds, feats = tiny_dataset(tmp_path, n_train=4, n_val=2, n_test=1)
    r = run_cli("train-mrnn", "--dataset", ds, "--features", feats, "--out", tmp_path / "m.pt", "--arch", "transformer")
    assert r.returncode == 2 and r.stderr.decode().splitlines()[-1] == (
        "vsa: error: --arch must be one of lstm, rnn, updown, updown-labels, got 'transformer'")
    model = build_model(GeneratorConfig(arch="lstm", vocab_size=9, feat_dim=4, embed=4, hidden=4))
    bad = tmp_path / "bad.pt"
    save_checkpoint(bad, "mrnn", {**vars(model.cfg), "arch": "transformer"}, {}, {}, list("abcde"), {},
                    model.state_dict())
    r = run_cli("caption", _photo(tmp_path / "p.jpg"), "--model", bad)
    assert r.returncode == 2 and r.stderr.decode().splitlines()[-1] == (
        f"vsa: error: {bad}: 'model' arch must be one of lstm, rnn, updown, updown-labels, got 'transformer'")


def test_train_mrnn_help_lists_the_registered_architectures(registry):
    r = run_cli("train-mrnn", "--help")
    text = " ".join(r.stdout.decode().split())
    assert r.returncode == 0
    for line in ("lstm (neuraltalk2's LSTM", "rnn (the paper's multimodal RNN)", "toy-gru (a one-layer GRU of the tests)",
                 "updown (top-down attention"):
        assert line in text
    assert "--rnn" not in text  # the former name still works, unlisted


def test_the_former_name_rnn_still_reads_as_arch(tmp_path):
    """Checkpoints written before the rename (the shipped ones), `--rnn`, `--set rnn=` and configs(rnn=)."""
    from vsa.generator import train as T
    from vsa.assets import SHIPPED_MODELS
    from vsa.checkpoint import load_checkpoint

    for name, arch in (("mrnn", "updown"), ("mrnn-regions", "lstm")):
        ck = load_checkpoint(SHIPPED_MODELS[name])
        assert ck["model"]["rnn"] == arch and "arch" not in ck["model"]  # as shipped
        from vsa.generator.model import model_from_checkpoint

        assert model_from_checkpoint(ck).cfg.arch == arch
    assert T.configs(rnn="lstm")[0].arch == "lstm"
    ds, feats = tiny_dataset(tmp_path, n_train=6, n_val=2, n_test=1)
    common = ["train-mrnn", "--dataset", ds, "--features", feats, "--epochs", "1", "--scst-epochs", "0", "--hidden", "8",
              "--embed", "8", "--min-count", "1", "--threads", "1", "--no-beam-search"]
    r = run_cli(*common, "--out", tmp_path / "a.pt", "--rnn", "lstm")
    assert r.returncode == 0, r.stderr.decode()
    assert "--rnn is now named --arch" in r.stderr.decode() and load_checkpoint(tmp_path / "a.pt")["model"]["arch"] == "lstm"
    r = run_cli(*common, "--out", tmp_path / "b.pt", "--set", "rnn=rnn")
    assert r.returncode == 0, r.stderr.decode()
    assert "read as arch=rnn" in r.stderr.decode() and load_checkpoint(tmp_path / "b.pt")["model"]["arch"] == "rnn"
    r = run_cli(*common, "--out", tmp_path / "c.pt", "--rnn", "lstm", "--arch", "rnn")
    assert r.returncode == 2 and "--rnn is the former name of --arch" in r.stderr.decode()
