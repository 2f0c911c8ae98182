"""FeatureStore: the features NPZ of docs/formats.md, memory-mapped, joined to datasets by key."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vsa.data import load_dataset
from vsa.errors import VsaError
from vsa.features.store import FeatureStore, load_features, memmap_npz_member


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

    from vsa.features.store import RegionBank, pad_regions

    p, a = npz
    st = FeatureStore(p)
    keys = ["c.jpg", "a.jpg", "sub/b.jpg", "a.jpg"]
    bank = RegionBank(st, keys, max_regions=5)
    dense, mask = pad_regions([st[k] for k in keys], max_regions=5)
    assert bank.shape == (4, 5, 6) and len(bank) == 4
    assert torch.equal(bank.mask, mask)
    assert torch.equal(bank[:], dense)
    assert torch.equal(bank[torch.tensor([3, 0])], dense[[3, 0]])
    assert torch.equal(bank[1:3], dense[1:3])
    real = dense[mask].double().numpy()
    mean, std = bank.moments(chunk=3)
    np.testing.assert_allclose(mean, real.mean(0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(std, real.std(0, ddof=1), rtol=1e-6)


def test_pad_regions_of_arrays_and_of_a_store():
    """One padding: first min(R_i, max_regions) rows (whole image stays row 0), float32, zero-padded, R the largest
    kept count unless a width is given."""
    import torch

    from vsa.features.store import pad_regions

    st = FeatureStore(None, arrays(["a.jpg", "b.jpg", "c.jpg"], [3, 1, 20]))
    feats, mask = pad_regions(st, ["b.jpg", "a.jpg"])
    assert feats.dtype == torch.float32 and mask.dtype == torch.bool and feats.shape == (2, 3, 6)
    assert mask.tolist() == [[True, False, False], [True, True, True]]
    assert torch.equal(feats[1], torch.from_numpy(st["a.jpg"])) and not feats[0, 1:].any()
    same, same_mask = pad_regions([st["b.jpg"], st["a.jpg"]])
    assert torch.equal(same, feats) and torch.equal(same_mask, mask)
    capped, cmask = pad_regions(st, max_regions=5)  # every image, capped
    assert capped.shape == (3, 5, 6) and cmask.sum(1).tolist() == [3, 1, 5]
    assert torch.equal(capped[2], torch.from_numpy(st["c.jpg"][:5]))
    wide, wmask = pad_regions([st["b.jpg"]], width=4)
    assert wide.shape == (1, 4, 6) and wmask.tolist() == [[True, False, False, False]]
    with pytest.raises(ValueError):
        pad_regions([st["a.jpg"]], width=2)
    assert pad_regions([])[0].shape == (0, 1, 0)


def test_writer_and_reader_round_trip_and_the_index_superset(npz, tmp_path):
    """save_features writes what load_features reads (a file of the documented layout, here one np.savez made by
    hand, goes through unchanged); with emb and paths it is a search index, which is also a features file."""
    from vsa.features.store import INDEX, load_features, save_features

    p, a = npz
    st = load_features(p)
    out = tmp_path / "again.npz"
    save_features(out, [st.image(i) for i in range(len(st))], "float16", st.meta)
    b = np.load(out, allow_pickle=False)
    assert sorted(b.files) == sorted(a)
    for k in a:
        assert b[k].dtype == a[k].dtype, k
        np.testing.assert_array_equal(b[k], a[k], err_msg=k)
    emb = [np.full((n, 2), i, np.float32) for i, n in enumerate([3, 1, 1])]
    save_features(tmp_path / "idx.npz", [st.image(i) for i in range(3)], "float16", {**st.meta, "index": "vsa-search"},
                  emb=emb, paths=["/p/a.jpg", "/p/sub/b.jpg", "/p/c.jpg"])
    idx = load_features(tmp_path / "idx.npz", required=INDEX)
    assert idx.emb_offsets.tolist() == [0, 3, 4, 5] and idx.emb.dtype == np.float32 and idx.emb[3].tolist() == [1, 1]
    assert idx.paths[1] == "/p/sub/b.jpg" and idx.meta["index"] == "vsa-search"
    np.testing.assert_array_equal(idx["c.jpg"], st["c.jpg"])
    assert st.emb is None and st.paths is None  # a plain features file
    with pytest.raises(VsaError, match="emb"):
        load_features(p, required=INDEX)
    # an aligner's global-branch vectors, one per photo; a file whose count does not match is refused in one line
    glob = np.arange(6, dtype=np.float32).reshape(3, 2)
    save_features(tmp_path / "g.npz", [st.image(i) for i in range(3)], "float16", st.meta, emb=emb,
                  paths=["a", "b", "c"], emb_global=glob)
    np.testing.assert_array_equal(load_features(tmp_path / "g.npz", required=INDEX).emb_global, glob)
    assert idx.emb_global is None
    bad = dict(np.load(tmp_path / "g.npz", allow_pickle=False))
    bad["emb_global"] = bad["emb_global"][:2]
    np.savez(tmp_path / "bad.npz", **bad)
    with pytest.raises(VsaError, match="emb_global"):
        load_features(tmp_path / "bad.npz", required=INDEX)


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


@pytest.mark.parametrize("mmap", [True, False])
def test_negative_offsets_and_duplicate_keys_are_refused(tmp_path, mmap):
    a = arrays(["a.jpg", "b.jpg", "c.jpg"], [3, 1, 2])
    neg = dict(a, offsets=np.array([-2, 3, 4, 6], np.int64))  # image 0 would read feats[-2:3]: nothing
    np.savez(tmp_path / "neg.npz", **neg)
    with pytest.raises(VsaError, match=rf"^{tmp_path / 'neg.npz'}: 'offsets' starts at -2, expected 0$"):
        load_features(tmp_path / "neg.npz", mmap=mmap)
    dup = dict(a, keys=np.array(["a.jpg", "b.jpg", "a.jpg"]))  # which features are a.jpg's?
    np.savez(tmp_path / "dup.npz", **dup)
    with pytest.raises(VsaError, match=rf"^{tmp_path / 'dup.npz'}: image key 'a.jpg' appears twice in 'keys'"):
        load_features(tmp_path / "dup.npz", mmap=mmap)
    st = load_features(_save(tmp_path / "ok.npz", a), mmap=mmap)
    assert st.keys == ["a.jpg", "b.jpg", "c.jpg"]


def test_search_index_emb_offsets_must_start_at_zero_and_never_decrease(tmp_path):
    a = arrays(["a.jpg", "b.jpg"], [1, 2])
    idx = dict(a, emb=np.ones((4, 3), np.float16), emb_offsets=np.array([1, 0, 4], np.int64),
               paths=np.array(["x/a.jpg", "y/a.jpg"]))
    np.savez(tmp_path / "i.npz", **idx)
    with pytest.raises(VsaError, match="'emb_offsets' must start at 0 and never decrease"):
        load_features(tmp_path / "i.npz")
    np.savez(tmp_path / "j.npz", **dict(idx, keys=np.array(["a.jpg", "a.jpg"]), emb_offsets=np.array([0, 1, 4])))
    assert load_features(tmp_path / "j.npz").paths == ["x/a.jpg", "y/a.jpg"]  # an index may hold two photos of a name


@pytest.mark.parametrize("mmap", [True, False])
def test_inconsistent_members_are_refused_from_their_headers_before_any_data_is_read(tmp_path, monkeypatch, mmap):
    from vsa import io as vio

    a = arrays(["a.jpg", "b.jpg"], [1, 2])
    np.savez(tmp_path / "f.npz", **dict(a, labels=np.array(["image"] * 50000)))  # 50000 labels for 3 rows
    read = []
    real = vio.read_npz_members
    monkeypatch.setattr(vio, "read_npz_members", lambda p, names: read.append(list(names)) or real(p, names))
    with pytest.raises(VsaError, match=rf"^{tmp_path / 'f.npz'}: 'labels' has 50000 rows but 'feats' has 3$"):
        load_features(tmp_path / "f.npz", mmap=mmap)
    assert read == [["offsets"]]  # only the offsets (checked first, as the store does), never the labels


def _save(p, a):
    np.savez(p, **a)
    return p
