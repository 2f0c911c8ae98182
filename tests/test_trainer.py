"""The trainers' shared pieces: the learning-rate schedule (vsa.trainer.step_decay) and the typed configs of
vsa.checkpoint (former setting names read from checkpoints, --set and configs())."""

from __future__ import annotations

import pytest

from vsa.trainer import step_decay


def test_step_decay_keeps_lr_for_start_epochs_then_decays_every_n_epochs():
    lrs = [step_decay(1.0, 0.5, 2, 3, e) for e in range(1, 10)]
    assert lrs == [1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.125]
    # every 0: once
    assert [step_decay(1.0, 0.1, 3, 0, e) for e in range(1, 7)] == [1.0, 1.0, 1.0, 0.1, 0.1, 0.1]
    # every 1, start 0: from the first epoch on (the generator's per-epoch decay)
    assert [step_decay(1.0, 0.5, 0, 1, e) for e in (1, 2, 3)] == [0.5, 0.25, 0.125]


def test_the_shipped_aligner_recipe_reads_under_the_new_setting_names():
    from vsa.assets import SHIPPED_MODELS
    from vsa.checkpoint import config_from, load_checkpoint
    from vsa.alignment.train import AlignTrainConfig, lr_at

    ck = load_checkpoint(SHIPPED_MODELS["align"], kind="align")
    assert {"clip", "amp", "lr_decay_epoch"} <= set(ck["train"])  # the file as it was written
    t = config_from(AlignTrainConfig, ck["train"])
    assert (t.grad_clip, t.bf16, t.lr_decay_start, t.lr_decay_every, t.lr_decay) == (2.0, True, 13, 0, 0.1)
    # "decay after 13 epochs": epochs 1-13 at lr, 14 and 15 at lr x 0.1
    assert [lr_at(t, e) for e in (1, 13, 14, 15)] == pytest.approx([5e-4, 5e-4, 5e-5, 5e-5])


def test_former_names_in_set_and_configs_set_the_new_fields_and_say_so():
    from vsa.alignment.train import configs, parse_overrides

    m, t = configs(clip=1.5, amp=False, lr_decay_epoch=4)
    assert (t.grad_clip, t.bf16, t.lr_decay_start, t.lr_decay_every) == (1.5, False, 4, 0)
    notes = []
    parse_overrides((m, t), ["clip=3", "lr_decay_epoch=0"], note=notes.append)
    # lr_decay_epoch 0 meant "never decay": the learning rate stays constant
    assert t.grad_clip == 3.0 and t.lr_decay == 1.0
    assert notes == ["--set clip=3: read as grad_clip=3.0 (clip is now named grad_clip)",
                     "--set lr_decay_epoch=0: read as lr_decay=1.0 (lr_decay_epoch is now named lr_decay_start)"]



def test_the_aligner_defaults_are_the_shipped_aligners_recipe():
    """Bare `vsa train-align` trains the shipped recipe: its configs' defaults are what the shipped checkpoint was
    trained with, but for what comes from the features (cells), GloVe (an optional package: `--glove kumo`) and the
    machine's threads."""
    import dataclasses

    from vsa.alignment.model import AlignModelConfig
    from vsa.assets import SHIPPED_MODELS
    from vsa.checkpoint import config_from, load_checkpoint
    from vsa.alignment.train import AlignTrainConfig

    ck = load_checkpoint(SHIPPED_MODELS["align"], kind="align")
    diff = {}
    for cls, part in ((AlignModelConfig, "model"), (AlignTrainConfig, "train")):
        shipped, default = dataclasses.asdict(config_from(cls, ck[part])), dataclasses.asdict(cls())
        diff.update({k: (default[k], shipped[k]) for k in default if default[k] != shipped[k]})
    assert diff == {"cells": (0, 3), "glove": ("", "kumo"), "threads": (0, 1)}
