"""The shared building blocks of the models (vsa.nn) and the feature rows they read (vsa.features.store.image_rows)."""

from __future__ import annotations

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


def test_the_aligner_standardises_with_the_shared_module_and_reads_its_rows_from_the_top():
    from vsa.alignment.model import AlignModelConfig, build_model, region_rows
    from vsa.features.store import image_rows

    m = build_model(AlignModelConfig(hidden=8, embed=4, global_encoder="gru"), 10, 6)
    assert isinstance(m.stats, Standardize)
    assert {"regions.stats.mean", "regions.stats.std"} <= set(m.state_dict())  # the shipped checkpoint's keys
    assert image_rows(20, 3) == 29 and region_rows(AlignModelConfig(max_regions=20, cells=3)) == 29
    assert region_rows(AlignModelConfig(model="whole-image", max_regions=20, cells=3)) == 1
