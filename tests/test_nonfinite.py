"""NaN and infinite values: features are refused naming their file, training stops at a non-finite loss or
val figure without writing that epoch's model, and ties rank against the model (a collapsed model or constant
features never look like perfect retrieval)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.conftest import run_cli
from tests.synth_align import make_synthetic
from vsa.errors import VsaError

torch.set_num_threads(1)

SMALL = dict(hidden=32, embed=16, batch_size=32, lr=3e-3, min_count=1, lr_decay=1.0, threads=1, global_encoder="mean",
             branch_loss=0.0, val_every=1)


def _with_feats(src, dst, fill=None, image: int | None = None):
    """A copy of a features NPZ with every value (or image ``image``'s first value) set to ``fill``."""
    a = dict(np.load(src))
    f = a["feats"].copy()
    if image is None:
        f[:] = fill
    else:
        f[int(a["offsets"][image])] = fill
    a["feats"] = f
    np.savez(dst, **a)
    return dst


# ----------------------------------------------------------------------------- the training skeleton


class _Stage:
    """A stand-in stage for vsa.trainer.fit: one weight, the losses, val figures and weights the test asks for."""

    kind, select = "test", "CIDEr"

    def __init__(self, losses, vals, weights=None):
        self.lin = torch.nn.Linear(1, 1)
        self.losses, self.vals, self.weights = losses, vals, weights or {}

    def train_epoch(self, epoch, progress):
        if epoch in self.weights:
            with torch.no_grad():
                self.lin.weight.fill_(self.weights[epoch])
        return {"loss": self.losses[epoch - 1]}

    def validate(self, epoch):
        return {"CIDEr": self.vals[epoch - 1]}

    def may_stop(self, epoch):
        return True

    def checkpoint(self):
        return {"kind": "test", "model": {}, "train": {}, "decoding": {}, "vocab": [], "extractor": {},
                "state_dict": self.lin.state_dict()}

    def optimizer_state(self):
        return {}

    def restore(self, ckpt):
        pass


def _fit(tmp_path, stage, epochs):
    from vsa.distributed import DistEnv
    from vsa.trainer import fit

    return fit(stage, tmp_path / "m.pt", epochs, DistEnv(), info=lambda *a: None)


def _saved(path):
    return torch.load(path, weights_only=False)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_val_figure_never_picks_the_model(tmp_path, bad):
    res = _fit(tmp_path, _Stage([1.0, 1.0, 1.0], [bad, 5.0, bad]), 3)
    assert res["best"]["epoch"] == 2 and [h["best"] for h in res["history"]] == [False, True, False]
    assert _saved(tmp_path / "m.pt")["meta"]["epoch"] == 2


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_epoch(tmp_path, bad):
    from vsa.trainer import Diverged

    with pytest.raises(Diverged, match="epoch 2: the training loss is"):
        _fit(tmp_path, _Stage([1.0, bad, 1.0], [5.0, 6.0, 7.0]), 3)
    assert _saved(tmp_path / "m.pt")["meta"]["epoch"] == 1
    assert _saved(tmp_path / "m.last.pt")["meta"]["epoch"] == 1  # the diverged epoch is not written anywhere
    assert len((tmp_path / "m.log.jsonl").read_text().splitlines()) == 1


def test_non_finite_weights_are_never_written_even_with_a_finite_loss_and_val(tmp_path):
    from vsa.trainer import Diverged

    with pytest.raises(Diverged, match=r"epoch 2: the weights \(weight\) hold NaN"):
        _fit(tmp_path, _Stage([1.0, 1.0], [5.0, 6.0], weights={2: math.nan}), 2)
    ck = _saved(tmp_path / "m.pt")
    assert ck["meta"]["epoch"] == 1 and torch.isfinite(ck["state_dict"]["weight"]).all()


# ----------------------------------------------------------------------------- vsa eval


@pytest.fixture(scope="module")
def aligner(tmp_path_factory):
    from vsa.io import write_json
    from vsa.alignment.train import configs, train

    tmp = tmp_path_factory.mktemp("nonfinite")
    ds, feats, _ = make_synthetic(tmp, n_train=40, n_val=10, n_test=10)
    write_json(tmp / "synthetic.json", ds.to_karpathy())
    train(*configs(**SMALL, epochs=2), ds, feats, tmp / "a.pt", info=lambda *a: None)
    return tmp, ds, feats


def test_eval_refuses_nan_features_naming_the_file_and_the_image(aligner):
    tmp, _, feats = aligner
    bad = _with_feats(feats, tmp / "nan.npz", math.nan)
    r = run_cli("eval", "--dataset", tmp / "synthetic.json", "--model", tmp / "a.pt", "--features", bad, "--json")
    err = r.stderr.decode().strip()
    assert r.returncode == 2 and "\n" not in err and "Traceback" not in err and not r.stdout
    assert "nan.npz" in err and "img0050.jpg" in err and "NaN or infinite" in err  # the first test image


def test_eval_one_infinite_value_or_a_hubness_bank_image_is_refused(aligner):
    from vsa.alignment.evaluate import evaluate_aligner
    from vsa.retrieval import HubnessConfig

    tmp, ds, feats = aligner
    bad = _with_feats(feats, tmp / "inf.npz", -math.inf, image=57)
    with pytest.raises(VsaError, match="inf.npz: the features of 'img0057.jpg' hold NaN or infinite values"):
        evaluate_aligner(tmp / "a.pt", ds, "test", features=bad)
    bank = _with_feats(feats, tmp / "bank.npz", math.nan, image=3)  # a training image: the hubness bank's
    assert evaluate_aligner(tmp / "a.pt", ds, "test", features=bank)["rsum"] > 0
    with pytest.raises(VsaError, match="bank.npz: the features of 'img0003.jpg'"):
        evaluate_aligner(tmp / "a.pt", ds, "test", features=bank, hubness=HubnessConfig(k=5, bank=10))


def test_eval_of_constant_features_is_not_perfect_search(aligner):
    from vsa.alignment.evaluate import evaluate_aligner

    tmp, ds, feats = aligner
    zero = _with_feats(feats, tmp / "zero.npz", 0.0)
    rep = evaluate_aligner(tmp / "a.pt", ds, "test", features=zero)
    # every image reads alike, so every sentence scores its 10 images alike: its image ranks behind all 9 others
    assert rep["t2i"]["r1"] == 0 and rep["t2i"]["r5"] == 0 and rep["t2i"]["medr"] == 10
    # and every image ranks the sentences in one order: at most the owner of the top sentence finds its own first
    assert rep["i2t"]["r1"] <= 10


def test_eval_refuses_an_aligner_with_nan_weights_naming_it(aligner):
    from vsa.checkpoint import load_checkpoint
    from vsa.alignment.evaluate import evaluate_aligner

    tmp, ds, feats = aligner
    ck = load_checkpoint(tmp / "a.pt")
    w = next(k for k, v in ck["state_dict"].items() if v.is_floating_point() and v.dim() == 2)
    ck["state_dict"][w] = torch.full_like(ck["state_dict"][w], math.nan)
    torch.save(ck, tmp / "nan-model.pt")
    with pytest.raises(VsaError, match="nan-model.pt: the aligner's scores: .* NaN or infinite"):
        evaluate_aligner(tmp / "nan-model.pt", ds, "test", features=feats)


# ----------------------------------------------------------------------------- vsa train-align


def test_train_align_refuses_nan_features_naming_the_file_and_the_image(tmp_path):
    from vsa.io import write_json

    ds, feats, _ = make_synthetic(tmp_path, n_train=20, n_val=6, n_test=6)
    write_json(tmp_path / "synthetic.json", ds.to_karpathy())
    bad = _with_feats(feats, tmp_path / "nan.npz", math.nan)
    r = run_cli("train-align", "--dataset", tmp_path / "synthetic.json", "--features", bad, "-o", tmp_path / "a.pt",
                "--epochs", "1", "--hidden", "32", "--min-count", "1", "--threads", "1", "--set", "embed=16")
    err = r.stderr.decode().strip()
    assert r.returncode == 2 and "\n" not in err and "Traceback" not in err
    assert "nan.npz" in err and "img0000.jpg" in err and "NaN or infinite" in err
    assert not list(tmp_path.glob("a*"))  # no model, no .last.pt, no log


def test_train_align_a_single_infinite_value_is_refused_in_the_library_too(tmp_path):
    from vsa.alignment.train import configs, train

    ds, feats, _ = make_synthetic(tmp_path, n_train=20, n_val=6, n_test=6)
    bad = _with_feats(feats, tmp_path / "inf.npz", math.inf, image=23)  # a val image
    with pytest.raises(VsaError, match="inf.npz: the features of 'img0023.jpg' hold NaN or infinite values"):
        train(*configs(**SMALL, epochs=1), ds, bad, tmp_path / "a.pt", info=lambda *a: None)
    assert not (tmp_path / "a.pt").exists()


def test_train_align_stops_at_a_nan_loss_and_keeps_the_best_finite_model(tmp_path, monkeypatch):
    import vsa.alignment.model as A
    from vsa.checkpoint import load_checkpoint
    from vsa.alignment.train import configs, train
    from vsa.trainer import Diverged

    ds, feats, _ = make_synthetic(tmp_path, n_train=40, n_val=10, n_test=10)
    real, calls = A.ranking_loss, []

    def loss(*a, **k):  # NaN from the first batch of the second epoch (40 images x 5 sentences / 32: 7 batches)
        calls.append(1)
        out = real(*a, **k)
        return out * math.nan if len(calls) > 7 else out

    monkeypatch.setattr(A, "ranking_loss", loss)
    with pytest.raises(Diverged, match="epoch 2, batch 1: the training loss is nan"):
        train(*configs(**SMALL, epochs=3), ds, feats, tmp_path / "a.pt", info=lambda *a: None)
    best, last = load_checkpoint(tmp_path / "a.pt"), load_checkpoint(tmp_path / "a.last.pt")
    assert best["meta"]["epoch"] == 1 and last["meta"]["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


# ----------------------------------------------------------------------------- vsa train-mrnn


def _mrnn_splits(tmp_path, bad=None):
    from tests.test_mrnn import tiny_dataset

    ds_path, feat_path = tiny_dataset(tmp_path)
    if bad is not None:
        feat_path = _with_feats(feat_path, tmp_path / "bad.npz", bad, image=3)
    return ds_path, feat_path


def test_train_mrnn_refuses_nan_features_naming_the_file_and_the_image(tmp_path):
    from vsa.generator import train as T
    from vsa.data import load_dataset

    ds_path, feats = _mrnn_splits(tmp_path, math.nan)
    cfg = T.configs(rnn="lstm", embed=16, hidden=16, epochs=1, scst_epochs=0, batch_size=8, min_count=1)
    with pytest.raises(VsaError, match="bad.npz: the features of 'img003.jpg' hold NaN or infinite values"):
        T.train_on(*cfg, load_dataset(ds_path), feats, tmp_path / "m.pt", info=lambda *_: None,
                   choose_decoding=False)
    assert not list(tmp_path.glob("m*"))


def test_train_mrnn_stops_at_a_nan_loss_and_keeps_the_best_finite_model(tmp_path, monkeypatch):
    from vsa.generator import train as T
    from vsa.checkpoint import load_checkpoint
    from vsa.data import load_dataset
    from vsa.trainer import Diverged

    ds_path, feats = _mrnn_splits(tmp_path)
    real_xent, real_epoch, now = torch.nn.functional.cross_entropy, T._xe_epoch, {"epoch": None, "batch": 0}

    def xent(*a, **k):  # NaN at the second training batch of epoch 2 (validation's calls are not counted)
        out = real_xent(*a, **k)
        if now["epoch"] == 2:
            now["batch"] += 1
            return out * math.nan if now["batch"] == 2 else out
        return out

    def epoch(model, opt, sp, cfg, epoch, *a, **k):
        now["epoch"] = epoch
        try:
            return real_epoch(model, opt, sp, cfg, epoch, *a, **k)
        finally:
            now["epoch"] = None

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", xent)
    monkeypatch.setattr(T, "_xe_epoch", epoch)
    cfg = T.configs(rnn="lstm", embed=16, hidden=16, epochs=3, scst_epochs=0, batch_size=8, min_count=1, patience=99)
    with pytest.raises(Diverged, match="epoch 2, batch 2: the training loss is nan"):
        T.train_on(*cfg, load_dataset(ds_path), feats, tmp_path / "m.pt", info=lambda *_: None, choose_decoding=False)
    best = load_checkpoint(tmp_path / "m.pt")
    assert best["meta"]["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in best["state_dict"].values() if v.is_floating_point())
    assert load_checkpoint(T.last_path(tmp_path / "m.pt"))["meta"]["epoch"] == 1


def test_generator_eval_refuses_nan_features_naming_the_file_and_the_image(tmp_path):
    """Caption metrics over NaN features would score a model's confident nonsense: refused like the aligner's."""
    from vsa.generator import train as T
    from vsa.data import load_dataset
    from vsa.generator.evaluate import generate_split

    ds_path, feats = _mrnn_splits(tmp_path)
    cfg = T.configs(rnn="lstm", embed=16, hidden=16, epochs=1, scst_epochs=0, batch_size=8, min_count=1)
    T.train_on(*cfg, load_dataset(ds_path), feats, tmp_path / "m.pt", info=lambda *_: None, choose_decoding=False)
    ds = load_dataset(ds_path)
    split = next(s for s in ("test", "val", "train") if ds.split(s))
    bad = _with_feats(feats, tmp_path / "bad.npz", math.nan,
                      image=[r.key for r in load_features_keys(feats)].index(ds.split(split)[0].key))
    with pytest.raises(VsaError, match=f"bad.npz: the features of '{ds.split(split)[0].key}' hold NaN"):
        generate_split(tmp_path / "m.pt", ds, split, bad, device="cpu")
    recs, caps, *_ = generate_split(tmp_path / "m.pt", ds, split, feats, device="cpu")
    assert len(caps) == len(recs) > 0


def load_features_keys(path):
    from types import SimpleNamespace

    return [SimpleNamespace(key=str(k)) for k in np.load(path)["keys"]]
