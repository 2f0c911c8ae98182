"""The shared building blocks of the models (vsa.nn) and the feature rows they read (vsa.features.store.image_rows)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vsa.nn import Standardize


def test_standardize_gives_the_training_features_zero_mean_and_unit_std():
    g = torch.Generator().manual_seed(0)
    feats = torch.rand(500, 3, 8, generator=g) * torch.arange(1.0, 9.0) + 5.0  # positive, another scale per dim
    s = Standardize(8)
    assert torch.equal(s(feats), feats)  # the identity until set
    flat = feats.reshape(-1, 8)
    s.set_moments(flat.mean(0), flat.std(0))
    out = s(feats)
    assert out.shape == feats.shape
    torch.testing.assert_close(out.reshape(-1, 8).mean(0), torch.zeros(8), atol=1e-4, rtol=0)
    torch.testing.assert_close(out.reshape(-1, 8).std(0), torch.ones(8), atol=1e-4, rtol=0)
    # saved with the model (buffers), never trained
    assert set(s.state_dict()) == {"mean", "std"} and not list(s.parameters())


def test_standardize_keeps_a_constant_dimension_finite():
    s = Standardize(2)
    s.set_moments([1.0, 2.0], [0.0, 4.0])
    assert s.std.tolist() == pytest.approx([1e-3, 4.0])
    assert torch.isfinite(s(torch.tensor([[1.0, 2.0], [7.0, 6.0]]))).all()


@pytest.mark.parametrize("arch", ["rnn", "updown"])
def test_the_generator_standardises_with_the_shared_module_under_its_checkpoint_keys(arch):
    """The caption models hold the aligner's Standardize; their checkpoints keep `feat_mean` / `feat_std` (the
    shipped generators' keys), in the same place, and read back into it."""
    from vsa.generator.model import GeneratorConfig, build_model, model_from_checkpoint
    import vsa.assets

    m = build_model(GeneratorConfig(arch=arch, vocab_size=12, feat_dim=6, hidden=8, embed=4, cells=0))
    assert isinstance(m.stats, Standardize)
    m.stats.set_moments(torch.arange(6.0), [0.0, 1, 2, 3, 4, 5])
    sd = m.state_dict()
    assert list(sd)[:2] == ["feat_mean", "feat_std"] and not any(k.startswith("stats.") for k in sd)
    assert sd["feat_std"][0] == pytest.approx(1e-3)  # set_moments' floor, as for the aligner
    m2 = build_model(m.cfg)
    m2.load_state_dict(sd)
    assert torch.equal(m2.stats.mean, m.stats.mean) and torch.equal(m2.stats.std, m.stats.std)
    x = torch.rand(2, 6) + 1
    assert torch.equal(m.prepare(x)[0], m.stats(x)[:, None])
    ck = torch.load(Path(vsa.assets.__file__).parent / "mrnn-flickr8k.pt", map_location="cpu", weights_only=True)
    shipped = model_from_checkpoint(ck)
    assert torch.equal(shipped.stats.mean, ck["state_dict"]["feat_mean"].float())
    assert list(shipped.state_dict()) == list(ck["state_dict"])


def test_the_aligner_standardises_with_the_shared_module_and_reads_its_rows_from_the_top():
    from vsa.alignment.model import AlignModelConfig, build_model, region_rows
    from vsa.features.store import image_rows

    m = build_model(AlignModelConfig(hidden=8, embed=4, global_encoder="gru"), 10, 6)
    assert isinstance(m.stats, Standardize)
    assert {"regions.stats.mean", "regions.stats.std"} <= set(m.state_dict())  # the shipped checkpoint's keys
    assert image_rows(20, 3) == 29 and region_rows(AlignModelConfig(max_regions=20, cells=3)) == 29
    assert region_rows(AlignModelConfig(model="whole-image", max_regions=20, cells=3)) == 1
