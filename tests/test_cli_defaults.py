"""One source of defaults: the trainers' --help shows the config dataclasses' defaults, the flags override
them, and --set reaches every field."""

from __future__ import annotations

import dataclasses
import re

import pytest

from tests.conftest import run_cli


def _help_defaults(command: str) -> dict[str, str]:
    p = run_cli(command, "--help")
    assert p.returncode == 0, p.stderr.decode()
    text = re.sub(r"\s+", " ", p.stdout.decode())
    # "--batch-size <int> Sentences per batch ... [default: 100]"
    out = {}
    for m in re.finditer(r"(--[a-z][a-z0-9-]*)(?:/--no-[a-z0-9-]+)?(?: <[^>]+>)? (.*?)(?= --[a-z]|$)", text):
        d = re.search(r"\[default: ([^\]]*)\]", m.group(2))
        if d:
            out[m.group(1)[2:].replace("-", "_")] = d.group(1)
    return out


def _shown(value) -> str:
    return str(value)


@pytest.mark.parametrize("command,classes", [
    ("train-mrnn", ("vsa.generator.model:GeneratorConfig", "vsa.generator.train:GeneratorTrainConfig", "vsa.generator.decoding:DecodingConfig")),
    ("train-align", ("vsa.alignment.model:AlignModelConfig", "vsa.alignment.train:AlignTrainConfig")),
])
def test_trainer_help_defaults_are_the_dataclass_defaults(command, classes):
    import importlib

    fields = {}
    for spec in classes:
        mod, cls = spec.split(":")
        for f in dataclasses.fields(getattr(importlib.import_module(mod), cls)):
            fields.setdefault(f.name, f.default)
    shown = _help_defaults(command)
    compared = {k: v for k, v in shown.items() if k in fields}
    assert len(compared) >= 8, shown  # most flags are config fields
    for name, text in compared.items():
        want = fields[name]
        if isinstance(want, bool):
            assert text in (name, f"no-{name}", str(want)), (name, text, want)
            assert (text == name or text == "True") == want, (name, text, want)
        elif isinstance(want, float):
            assert float(text) == want, (name, text, want)
        else:
            assert text == str(want), (name, text, want)
    # what the help shows is what a run uses: the documented figures of the shipped recipe
    if command == "train-mrnn":
        assert compared["hidden"] == "512" and compared["epochs"] == "10" and compared["arch"] == "updown"


@pytest.mark.parametrize("command", ["train-mrnn", "train-align"])
def test_set_names_every_field_and_refuses_unknown_keys(command, tmp_path):
    p = run_cli(command, "--dataset", tmp_path / "none.json", "--features", tmp_path / "f.npz", "-o",
                tmp_path / "m.pt", "--set", "no_such_field=1")
    err = p.stderr.decode()
    assert p.returncode == 2 and err.count("\n") == 1, err
    assert "--set 'no_such_field=1': expected KEY=VALUE with KEY one of" in err
    keys = err.split("KEY one of ", 1)[1]
    for must in (("scst_lr", "lr_decay_start", "grad_clip", "att_dim", "beam", "block_repeats")
                 if command == "train-mrnn" else ("margin", "warmup_epochs", "dropout_regions", "global_weight")):
        assert must in keys, (must, keys)
    bad = run_cli(command, "--dataset", tmp_path / "none.json", "--set", "hidden=big")
    assert bad.returncode == 2 and "'big' is not a valid int" in bad.stderr.decode()
