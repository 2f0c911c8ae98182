"""Checkpoints: plain tensors only, never unpickle code, clear errors, atomic round trip."""

from __future__ import annotations

import builtins
import json
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli
from vsa.checkpoint import VERSION, config_from, load_checkpoint, save_checkpoint
from vsa.errors import VsaError


@dataclass
class TinyConfig:
    hidden: int = 16
    rnn: str = "brnn"
    lr: float = 1e-3
    out: Path = Path("work/x.pt")
    sizes: tuple = (1, 2)
    extra: dict = field(default_factory=lambda: {"a": [1, 2]})


def state() -> dict:
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(3, 4, generator=g))
    sd = dict(lin.state_dict())
    sd["emb"] = torch.randn(10, 4, generator=g, requires_grad=True)
    sd["half"] = torch.arange(6, dtype=torch.float16)
    return sd


class Evil:
    """Pickles to a call of os.system: loading it with plain pickle would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class EvilOpen:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (str(self.marker), "w"))


def test_round_trip(tmp_path):
    p = tmp_path / "sub" / "align.pt"
    sd = state()
    save_checkpoint(p, "align", TinyConfig(hidden=32), {"lr": 1e-3}, {"beta": 0.1}, ["a", "dog"],
                    {"extractor": "efficientnet-lite0", "dim": 1280}, sd, {"epoch": 3, "best": {"val_rsum": 1.5}, "path": Path("x")})
    ck = load_checkpoint(p, kind="align")
    assert ck["format"] == "vsa" and ck["version"] == VERSION and ck["kind"] == "align"
    assert ck["vocab"] == ["a", "dog"]
    assert ck["extractor"] == {"extractor": "efficientnet-lite0", "dim": 1280}
    assert ck["meta"] == {"epoch": 3, "best": {"val_rsum": 1.5}, "path": "x"}
    assert ck["model"] == {"hidden": 32, "rnn": "brnn", "lr": 1e-3, "out": "work/x.pt", "sizes": [1, 2],
                           "extra": {"a": [1, 2]}}
    assert ck["train"] == {"lr": 1e-3} and ck["decoding"] == {"beta": 0.1}
    assert "optimizer" not in ck and "rng" not in ck  # only a .last.pt carries them
    assert set(ck["state_dict"]) == set(sd)
    for k, v in sd.items():
        assert torch.equal(ck["state_dict"][k], v.detach())
        assert ck["state_dict"][k].dtype == v.dtype and not ck["state_dict"][k].requires_grad
    cfg = config_from(TinyConfig, {**ck["model"], "unknown_future_key": 1})
    assert cfg.hidden == 32 and cfg.rnn == "brnn"
    assert [f.name for f in p.parent.iterdir()] == ["align.pt"]  # no temporary file left behind
    lin = torch.nn.Linear(4, 3)
    lin.load_state_dict({k: ck["state_dict"][k] for k in ("weight", "bias")})


def test_failed_save_keeps_the_previous_file(tmp_path):
    p = tmp_path / "m.pt"
    save_checkpoint(p, "mrnn", TinyConfig(), {}, {}, ["a"], {}, state(), {"epoch": 1})
    before = p.read_bytes()
    with pytest.raises(Exception):
        save_checkpoint(p, "mrnn", TinyConfig(), {}, {}, ["a"], {}, state(), {"epoch": 2, "bad": lambda: 0})  # unpicklable
    assert p.read_bytes() == before
    assert load_checkpoint(p)["meta"] == {"epoch": 1}
    assert [f.name for f in tmp_path.iterdir()] == ["m.pt"]


@pytest.mark.parametrize("evil_cls", [Evil, EvilOpen])
@pytest.mark.parametrize("container", ["torch", "raw-pickle"])
def test_malicious_pickle_is_refused_without_running(tmp_path, evil_cls, container):
    marker = tmp_path / "PWNED"
    p = tmp_path / "evil.pt"
    ckpt = {"format": "vsa", "version": VERSION, "kind": "align", "model": {}, "vocab": [], "extractor": {},
            "state_dict": {"w": torch.zeros(2)}, "meta": {"payload": evil_cls(marker)}}
    if container == "torch":
        torch.save(ckpt, p)
    else:
        p.write_bytes(pickle.dumps(ckpt))
    # the payload is real: plain pickle would run it
    if container == "raw-pickle":
        pickle.loads(p.read_bytes())
        assert marker.exists()
        marker.unlink()
    with pytest.raises(VsaError) as e:
        load_checkpoint(p)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{p}: refused: not a plain-tensor checkpoint")
    assert not marker.exists()


def test_malicious_checkpoint_via_cli(tmp_path):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "vsa", "version": VERSION, "kind": "align", "x": Evil(marker)}, evil)
    ds = tmp_path / "dataset_t.json"
    ds.write_text(json.dumps({"images": [{"filename": "a.jpg", "split": "test", "sentences": [{"raw": "a dog"}]}]}))
    p = run_cli("eval", "--model", evil, "--dataset", ds)
    err = p.stderr.decode()
    assert p.returncode == 2, err
    assert err.count("\n") == 1 and err.startswith(f"vsa: error: {evil}: refused"), err
    assert "posix.system" in err
    assert not marker.exists()


def test_arbitrary_objects_are_refused(tmp_path):
    p = tmp_path / "obj.pt"
    torch.save({"format": "vsa", "version": VERSION, "kind": "align", "model": TinyConfig()}, p)  # a dataclass, not a dict
    with pytest.raises(VsaError, match="refused: not a plain-tensor checkpoint"):
        load_checkpoint(p)


def test_incompatible_version(tmp_path):
    p = tmp_path / "old.pt"
    torch.save({"format": "vsa", "version": VERSION + 1, "kind": "align", "state_dict": {}}, p)
    with pytest.raises(VsaError, match=rf"checkpoint version {VERSION + 1} is not supported by this vsa "
                                       rf"\(expects {VERSION}\); retrain it or use the vsa release that wrote it"):
        load_checkpoint(p)


def test_wrong_kind_and_foreign_files(tmp_path):
    p = tmp_path / "m.pt"
    save_checkpoint(p, "mrnn", TinyConfig(), {}, {}, [], {}, state())
    with pytest.raises(VsaError, match="is a 'mrnn' checkpoint, expected 'align'"):
        load_checkpoint(p, kind="align")
    plain = tmp_path / "plain.pt"
    torch.save(state(), plain)  # a bare state dict (e.g. detector weights)
    with pytest.raises(VsaError, match="not a vsa checkpoint"):
        load_checkpoint(plain)
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(p.read_bytes()[:200])
    with pytest.raises(VsaError, match="not a readable checkpoint"):
        load_checkpoint(trunc)
    with pytest.raises(VsaError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "none.pt")
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(VsaError) as e:
        load_checkpoint(text)
    assert "\n" not in str(e.value)


def test_optimizer_and_rng_state_are_stored_as_they_are(tmp_path):
    lin = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-3)
    lin(torch.randn(2, 4)).sum().backward()
    opt.step()
    p = tmp_path / "m.last.pt"
    save_checkpoint(p, "mrnn", TinyConfig(), {}, {}, ["a"], {}, lin.state_dict(), {"epoch": 1},
                    optimizer=opt.state_dict(), rng=torch.get_rng_state())
    ck = load_checkpoint(p)
    assert sorted(ck["optimizer"]["state"]) == [0, 1]  # int keys, not strings converted back
    fresh = torch.optim.Adam(torch.nn.Linear(4, 3).parameters(), lr=1e-3)
    fresh.load_state_dict(ck["optimizer"])
    assert torch.equal(ck["rng"], torch.get_rng_state()) or ck["rng"].dtype == torch.uint8


def test_version_1_checkpoints_convert_on_load(tmp_path):
    """A version-1 file (one mixed ``config``, optimiser state with string keys and the aligner's beta in
    ``meta``) loads in the version-2 layout."""
    from vsa.alignment.model import AlignModelConfig, build_model
    from vsa.alignment.model import load_aligner

    model = build_model(AlignModelConfig(hidden=16, embed=8), 10, 6)
    opt = torch.optim.Adam(model.parameters())
    sd_opt = opt.state_dict()
    v1 = {"format": "vsa", "version": 1, "kind": "align",
          "config": {"hidden": 16, "embed": 8, "lr": 0.01, "loss": "sum", "model": "brnn"},
          "vocab": ["a", "dog", "runs", "on", "grass", "x"], "extractor": {"extractor": "fake", "dim": 6},
          "state_dict": model.state_dict(),
          "meta": {"epoch": 2, "beta": 0.3, "train_seconds": 5.0,
                   "optimizer": {"state": {}, "param_groups": sd_opt["param_groups"]}, "rng": torch.get_rng_state()}}
    p = tmp_path / "v1.pt"
    torch.save(v1, p)
    ck = load_checkpoint(p, "align")
    assert ck["version"] == VERSION and "config" not in ck
    assert ck["model"] == {"hidden": 16, "embed": 8, "model": "brnn"}
    assert ck["train"] == {"lr": 0.01, "loss": "sum"} and ck["decoding"] == {"beta": 0.3}
    assert ck["meta"] == {"epoch": 2, "seconds": 5.0} and "optimizer" in ck and "rng" in ck
    al = load_aligner(p)
    assert al.cfg.hidden == 16 and al.decoding == {"beta": 0.3}


@pytest.mark.parametrize("name", ["align-flickr8k", "align-ground-flickr8k", "mrnn-flickr8k", "mrnn-regions-flickr8k"])
def test_the_shipped_models_load_in_the_current_layout(name):
    from vsa.assets import ASSETS

    ck = load_checkpoint(ASSETS / f"{name}.pt")
    assert ck["version"] == VERSION and {"model", "train", "decoding", "vocab", "extractor"} <= set(ck)
    if ck["kind"] == "mrnn":
        from vsa.generator.model import model_from_checkpoint

        model = model_from_checkpoint(ck)
        assert model.decoding.beam >= 1 and model.decoding.max_len == 20
        assert ck["train"]["scst_lr"] > 0 and "lr" not in ck["model"]
    else:
        assert ck["decoding"]["beta"] > 0 and ck["model"]["max_regions"] == 20


# ----------------------------------------------------------------------------- caption checkpoints that make no model


def _regions_generator() -> dict:
    from vsa.assets import ASSETS

    return torch.load(ASSETS / "mrnn-regions-flickr8k.pt", weights_only=True)  # the smallest shipped generator


def _set(part: str, key: str, value):
    return lambda ck: ck[part].__setitem__(key, value)


BAD_GENERATORS = [
    (_set("state_dict", "out.weight", torch.zeros(5, 3)), "weights do not fit its model config: out.weight has shape [5, 3]"),
    (lambda ck: ck["state_dict"].pop("out.bias"), "weights do not fit its model config: missing out.bias"),
    (_set("state_dict", "extra.weight", torch.zeros(2)), "unexpected extra.weight"),
    (_set("state_dict", "out.bias", 3), "'state_dict' entry 'out.bias' is not a tensor"),
    (lambda ck: ck.pop("state_dict"), "not a complete vsa checkpoint: no 'state_dict'"),
    (_set("model", "hidden", "big"), "'model' hidden must be a whole number, got 'big'"),
    (_set("model", "hidden", -3), "'model' hidden must be at least 1, got -3"),
    (_set("model", "hidden", 10**6), "weights do not fit its model config"),  # refused before any allocation
    (_set("model", "rnn", "gru"), "'model' arch must be one of lstm, rnn, updown, updown-labels, got 'gru'"),
    (_set("model", "dropout", 2.0), "'model' dropout must be at least 0 and below 1"),
    (_set("model", "attention", "yes"), "'model' attention must be true or false"),
    (_set("model", "feat_dim", 7), "the extractor makes 1280-dim features but the model config reads 7"),
    (_set("decoding", "beam", "x"), "'decoding' beam must be a whole number, got 'x'"),
    (_set("decoding", "beam", 0), "'decoding' beam and max_len must be at least 1"),
    (_set("decoding", "mirror", 1.5), "'decoding' mirror must be at least 0 and below 1"),
    (lambda ck: ck.__setitem__("vocab", ck["vocab"][:-5]), "the vocabulary has 2534 entries"),
    (lambda ck: ck.__setitem__("vocab", 5), "'vocab' must be a list of words, got int"),
    (lambda ck: ck.__setitem__("model", [1]), "'model' must be a dict, got list"),
    (lambda ck: ck.__setitem__("extractor", "lite0"), "'extractor' must be a dict, got str"),
]


@pytest.mark.parametrize("change,message", BAD_GENERATORS)
def test_a_caption_checkpoint_that_makes_no_model_is_one_line_naming_the_file(tmp_path, change, message):
    from vsa.generator.model import load_generators

    ck = _regions_generator()
    change(ck)
    p = tmp_path / "bad.pt"
    torch.save(ck, p)
    with pytest.raises(VsaError) as e:
        load_generators(p)
    assert str(e.value).startswith(f"{p}: ") and message in str(e.value) and "\n" not in str(e.value)


def test_a_bad_region_caption_model_is_named(tmp_path):
    from vsa.generator.captioner import Captioner

    ck = _regions_generator()
    ck["state_dict"].pop("out.bias")
    p = tmp_path / "regions-bad.pt"
    torch.save(ck, p)
    with pytest.raises(VsaError, match=f"^{p}: checkpoint weights do not fit its model config: missing out.bias$"):
        Captioner.load(region_model=p, device="cpu")


def test_a_bad_caption_checkpoint_via_cli(tmp_path):
    ck = _regions_generator()
    ck["model"]["hidden"] = "big"
    p = tmp_path / "bad.pt"
    torch.save(ck, p)
    img = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (32, 32), "red").save(img)
    r = run_cli("caption", img, "-m", p)
    err = r.stderr.decode()
    assert r.returncode == 2, err
    assert err.splitlines()[-1] == f"vsa: error: {p}: 'model' hidden must be a whole number, got 'big'", err
    assert "Traceback" not in err and r.stdout == b""


# ----------------------------------------------------------------------------- --cnn-weights


@pytest.mark.parametrize("cnn", ["efficientnet-lite0", "resnet18"])
def test_cnn_weights_that_would_run_code_are_refused_without_running_it(tmp_path, cnn):
    from vsa.features.cnn import load_extractor

    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as fh:
        pickle.dump({"w": Evil(marker)}, fh)
    with pytest.raises(VsaError, match="refused: not a plain-tensor weights file, it would need to unpickle code") as e:
        load_extractor(cnn, str(evil), "cpu")
    assert str(e.value).startswith(f"{evil}: ") and "\n" not in str(e.value)
    assert not marker.exists()


@pytest.mark.parametrize("content,message", [
    (lambda: {"a": torch.zeros(3)}, "not weights of efficientnet-lite0: missing _conv_stem.weight"),
    (lambda: [torch.zeros(3)], "not a state dict of CNN weights (holds list)"),
    (lambda: {"state_dict": {"a": 3}}, "not a state dict of CNN weights: entry 'a' is not a tensor"),
    (lambda: b"not a checkpoint", "not a"),
])
def test_cnn_weights_that_are_not_the_cnns_are_one_line(tmp_path, content, message):
    from vsa.features.cnn import load_extractor

    w = tmp_path / "w.pt"
    c = content()
    if isinstance(c, bytes):
        w.write_bytes(c)
    else:
        torch.save(c, w)
    with pytest.raises(VsaError) as e:
        load_extractor("efficientnet-lite0", str(w), "cpu")
    assert str(e.value).startswith(f"{w}: ") and message in str(e.value) and "\n" not in str(e.value)
