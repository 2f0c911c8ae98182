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
    from vsa.align import AlignModelConfig, build_model
    from vsa.align import load_aligner

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
        from vsa.mrnn import model_from_checkpoint

        model = model_from_checkpoint(ck)
        assert model.decoding.beam >= 1 and model.decoding.max_len == 20
        assert ck["train"]["scst_lr"] > 0 and "lr" not in ck["model"]
    else:
        assert ck["decoding"]["beta"] > 0 and ck["model"]["max_regions"] == 20
