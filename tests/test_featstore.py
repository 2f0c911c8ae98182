"""FeatureStore: the features NPZ of docs/formats.md, memory-mapped, joined to datasets by key."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vsa.data import load_dataset
from vsa.featstore import FeatureStore, load_features, memmap_npz_member


def arrays(keys, n_regions, dim=6, dtype=np.float16):
    R = sum(n_regions)
    rng = np.random.default_rng(0)
    return {
        "feats": rng.standard_normal((R, dim)).astype(dtype),
        "image_index": np.repeat(np.arange(len(keys)), n_regions).astype(np.int32),
        "offsets": np.concatenate([[0], np.cumsum(n_regions)]).astype(np.int64),
        "boxes": rng.uniform(0, 224, (R, 4)).astype(np.float32),
        "scores": np.linspace(1, 0.1, R).astype(np.float32),
        "labels": np.array(["image" if i == 0 else "dog" for n in n_regions for i in range(n)]),
        "keys": np.array(keys),
        "sizes": np.full((len(keys), 2), 224, np.int32),
        "meta": np.array(json.dumps({"extractor": "efficientnet-lite0", "dim": dim, "input": 224})),
    }


@pytest.fixture
def npz(tmp_path):
    a = arrays(["a.jpg", "sub/b.jpg", "c.jpg"], [3, 1, 20])
    p = tmp_path / "feats.npz"
    np.savez(p, **a)
    return p, a


def test_memmapped_and_loaded_stores_agree(npz, tmp_path):
    p, a = npz
    mm, full = FeatureStore(p), FeatureStore(p, mmap=False)
    assert isinstance(mm.feats, np.memmap) and not isinstance(full.feats, np.memmap)
    for fs in (mm, full):
        assert len(fs) == 3 and fs.dim == 6 and fs.keys == ["a.jpg", "sub/b.jpg", "c.jpg"]
        assert fs.meta["extractor"] == "efficientnet-lite0"
        x = fs["c.jpg"]
        assert x.dtype == np.float32 and x.shape == (20, 6)
        np.testing.assert_array_equal(x, a["feats"][4:24].astype(np.float32))
        np.testing.assert_array_equal(fs.whole("sub/b.jpg"), a["feats"][3].astype(np.float32))
        np.testing.assert_array_equal(fs.boxes("a.jpg"), a["boxes"][:3])
        assert fs.labels("a.jpg") == ["image", "dog", "dog"]
        np.testing.assert_allclose(fs.scores("sub/b.jpg"), a["scores"][3:4])
        assert fs.sizes.shape == (3, 2)


def test_region_bank_reads_the_same_padded_batches_as_dense_padding(npz):
    import torch

    from vsa.align import pad_regions
    from vsa.featstore import RegionBank

    p, a = npz
    st = FeatureStore(p)
    keys = ["c.jpg", "a.jpg", "sub/b.jpg", "a.jpg"]
    bank = RegionBank(st, keys, max_regions=5)
    dense, mask = pad_regions([st[k][:5] for k in keys], 5)
    assert bank.shape == (4, 5, 6) and len(bank) == 4
    assert torch.equal(bank.mask, mask)
    assert torch.equal(bank[:], dense)
    assert torch.equal(bank[torch.tensor([3, 0])], dense[[3, 0]])
    assert torch.equal(bank[1:3], dense[1:3])
    real = dense[mask].double().numpy()
    mean, std = bank.moments(chunk=3)
    np.testing.assert_allclose(mean, real.mean(0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(std, real.std(0, ddof=1), rtol=1e-6)


def test_compressed_npz_falls_back_to_loading(tmp_path):
    a = arrays(["a.jpg"], [2])
    p = tmp_path / "c.npz"
    np.savez_compressed(p, **a)
    assert memmap_npz_member(p, "feats") is None
    fs = load_features(p)
    assert not isinstance(fs.feats, np.memmap)
    np.testing.assert_array_equal(fs["a.jpg"], a["feats"].astype(np.float32))


def test_lookup_by_key_or_file_name(npz):
    fs = FeatureStore(npz[0])
    assert fs.find("a.jpg") == 0 and fs.find("sub/b.jpg") == 1
    assert fs.find("b.jpg") == 1 and fs.find("other/b.jpg") == 1  # falls back to the file name
    assert "c.jpg" in fs and "d.jpg" not in fs
    assert fs.rows("c.jpg") == slice(4, 24)


def test_optional_arrays_may_be_absent(tmp_path):
    a = arrays(["a.jpg"], [2])
    p = tmp_path / "min.npz"
    np.savez(p, feats=a["feats"], offsets=a["offsets"], keys=a["keys"])
    fs = FeatureStore(p)
    assert fs.boxes("a.jpg") is None and fs.labels("a.jpg") is None and fs.scores("a.jpg") is None
    assert fs.meta == {} and fs["a.jpg"].shape == (2, 6)


def test_joined_with_real_flickr8k_split(flickr8k, tmp_path):
    ds = load_dataset(flickr8k / "dataset_flickr8k.json")
    test = ds.split("test")
    keys = [r.key for r in test[:5]]
    p = tmp_path / "f.npz"
    np.savez(p, **arrays(keys, [1, 2, 3, 4, 5]))
    fs = FeatureStore(p)
    kept = fs.check_dataset(test[:5])
    assert [r.key for r in kept] == keys
    assert [fs[r.key].shape[0] for r in kept] == [1, 2, 3, 4, 5]
    warned = []
    assert len(fs.check_dataset(test, skip_missing=True, warn=warned.append)) == 5
    assert warned and "995 dataset image(s) have no features" in warned[0]
