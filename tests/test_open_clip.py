"""OpenCLIP image towers as backbones (`vsa embed --cnn open_clip:MODEL/TAG`), randomly initialised: no
weights reach the test machines. The smallest open_clip config (ViT-S-32) embeds a few generated photos and
their boxes, and one aligner epoch trains on the features; the backbone is named in both files."""

from __future__ import annotations

import json

import numpy as np
import orjson
import pytest

from tests.conftest import run_cli

open_clip = pytest.importorskip("open_clip", reason="open_clip_torch is not installed (pip install 'vsa[clip]')")

SPEC = "open_clip:ViT-S-32/random"
COLOURS = {"red": (200, 30, 30), "blue": (30, 60, 200), "green": (40, 160, 60), "yellow": (220, 200, 40)}
SHAPES = ["ball", "box"]


def _photos(tmp_path, n=12):
    """``n`` photos of two coloured shapes, their regions JSONL (whole image + the shapes' boxes) and a
    Karpathy-style dataset (8 train, 2 val, 2 test) whose captions name the shapes."""
    from PIL import Image, ImageDraw

    rng = np.random.RandomState(0)
    folder = tmp_path / "img"
    folder.mkdir()
    names = list(COLOURS)
    regions, images = [], []
    for i in range(n):
        W, H = 160, 120
        im = Image.new("RGB", (W, H), (235, 235, 235))
        d = ImageDraw.Draw(im)
        c1, c2 = rng.choice(len(names), 2, replace=False)
        b1, b2 = [8, 10, 70, 90], [85, 25, 150, 110]
        d.ellipse(b1, fill=COLOURS[names[c1]])
        d.rectangle(b2, fill=COLOURS[names[c2]])
        key = f"p{i:02d}.png"
        im.save(folder / key)
        regions.append({"key": key, "path": str(folder / key), "width": W, "height": H, "detector": "hand",
                        "regions": [{"box": [0, 0, W, H], "score": 1.0, "label": "image"},
                                    {"box": b1, "score": 0.9, "label": "ball"},
                                    {"box": b2, "score": 0.8, "label": "box"}]})
        split = "train" if i < 8 else "val" if i < 10 else "test"
        sents = [f"a {names[c1]} ball and a {names[c2]} box", f"a {names[c2]} box near a {names[c1]} ball"]
        images.append({"filename": key, "imgid": i, "split": split,
                       "sentences": [{"raw": s, "tokens": s.split(), "sentid": 2 * i + j} for j, s in enumerate(sents)]})
    (tmp_path / "regions.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in regions))
    (tmp_path / "ds.json").write_text(json.dumps({"dataset": "shapes", "images": images}))
    return folder, tmp_path / "regions.jsonl", tmp_path / "ds.json"


def _meta(npz):
    with np.load(npz, allow_pickle=False) as a:
        return json.loads(str(a["meta"])), a["feats"].astype(np.float32), a["offsets"]


@pytest.mark.slow
def test_open_clip_features_name_the_backbone_and_train_an_aligner(tmp_path):
    from vsa.checkpoint import load_checkpoint

    folder, regions, ds = _photos(tmp_path)
    r = run_cli("embed", regions, "--cnn", SPEC, "--crop", "warp", "--cells", "0", "-o", tmp_path / "feats.npz",
                "--threads", "1", "--workers", "0", env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr.decode()
    meta, feats, offsets = _meta(tmp_path / "feats.npz")
    # the backbone, its input size and normalisation (open_clip's for the model) are in the meta
    assert meta["extractor"] == SPEC and meta["dim"] == 384 and meta["input"] == 224 and meta["crop"] == "warp"
    assert meta["mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073], abs=1e-6)
    assert meta["std"] == pytest.approx([0.26862954, 0.26130258, 0.27577711], abs=1e-6)
    assert feats.shape == (36, 384) and list(offsets) == list(range(0, 37, 3)) and np.isfinite(feats).all()
    assert np.linalg.norm(feats[1] - feats[2]) > 1e-3 and np.linalg.norm(feats[1] - feats[4]) > 1e-3  # the crops differ
    # whole images: the same vectors as the whole-image regions (random weights from a fixed seed, in every process)
    r = run_cli("embed", folder, "--cnn", SPEC, "-o", tmp_path / "whole.npz", "--threads", "1", "--workers", "0",
                env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr.decode()
    wmeta, whole, _ = _meta(tmp_path / "whole.npz")
    assert wmeta["extractor"] == SPEC and whole.shape == (12, 384)
    np.testing.assert_allclose(whole, feats[offsets[:-1]], atol=2e-2 * float(np.abs(whole).max()))
    # one aligner epoch on them: the checkpoint's extractor is the open_clip backbone
    r = run_cli("train-align", "--dataset", ds, "--features", tmp_path / "feats.npz", "-o", tmp_path / "a.pt",
                "--epochs", "1", "--batch-size", "8", "--hidden", "16", "--min-count", "1", "--threads", "1",
                "--set", "embed=8", "--set", "warmup_epochs=0", "--json", env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr.decode()
    assert orjson.loads(r.stdout)["epochs"] == 1
    ck = load_checkpoint(tmp_path / "a.pt", "align")
    assert ck["extractor"]["extractor"] == SPEC and ck["extractor"]["dim"] == 384
    assert ck["extractor"]["mean"] == meta["mean"] and ck["extractor"]["input"] == 224


@pytest.mark.slow
def test_open_clip_errors_are_one_line(tmp_path):
    folder, regions, _ = _photos(tmp_path, n=1)
    env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}  # what an offline machine sees, without the retries

    def err(*args):
        r = run_cli("embed", *args, "-o", tmp_path / "x.npz", "--threads", "1", env=env)
        lines = r.stderr.decode().strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("vsa: error: "), r.stderr.decode()
        assert not (tmp_path / "x.npz").exists()
        return lines[0]

    # a hub load without the hub names the fix
    assert "--cnn-weights PATH" in err(folder, "--cnn", "open_clip:ViT-B-32/laion2b_s34b_b79k")
    assert "--cnn-weights PATH" in err(folder, "--cnn", "open_clip:ViT-S-32")  # no tag: no weights named
    assert "laion2b_s34b_b79k" in err(folder, "--cnn", "open_clip:ViT-B-32/nope")  # unknown tag: the known ones
    assert "unknown open_clip model" in err(folder, "--cnn", "open_clip:ViT-Nope/random")
    # a ViT has no convolutional feature map: roi and grid are refused before any work, warp is the way
    assert "--crop warp" in err(regions, "--cnn", SPEC, "--crop", "roi")
    assert "--crop grid" in err(folder, "--cnn", SPEC, "--crop", "grid")
    assert "no such open_clip weights file" in err(folder, "--cnn", "open_clip:ViT-S-32", "--cnn-weights", tmp_path / "no.pt")


@pytest.mark.slow
def test_open_clip_local_weights_file(tmp_path):
    """--cnn-weights PATH: an image-tower state dict or a whole open_clip model, loaded with weights_only."""
    import torch

    from vsa.features.cnn import load_extractor
    from vsa.errors import VsaError

    torch.set_num_threads(1)
    rand = load_extractor(SPEC, device="cpu")
    rand.jit = False
    x = torch.randn(2, 3, 224, 224)
    want = rand(x)
    # the tower alone, scaled so that the file's weights are not the seeded random ones
    sd = {k: v * 0.5 if k == "proj" else v for k, v in rand.net.state_dict().items()}
    torch.save(sd, tmp_path / "tower.pt")
    ex = load_extractor("open_clip:ViT-S-32", str(tmp_path / "tower.pt"), device="cpu")
    ex.jit = False
    torch.testing.assert_close(ex(x), want * 0.5, rtol=1e-4, atol=1e-5)
    assert ex.meta["extractor"] == "open_clip:ViT-S-32" and ex.weights == str(tmp_path / "tower.pt")
    # the whole model (image and text towers), as open_clip saves it
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        clip = open_clip.create_model("ViT-S-32", pretrained=None)
    torch.save(clip.state_dict(), tmp_path / "clip.pt")
    ex = load_extractor("open_clip:ViT-S-32", str(tmp_path / "clip.pt"), device="cpu")
    ex.jit = False
    torch.testing.assert_close(ex(x), want, rtol=1e-4, atol=1e-5)
    # a file that is not a checkpoint of this model is one error naming the file
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(VsaError, match="cannot load open_clip weights") as e:
        load_extractor("open_clip:ViT-S-32", str(tmp_path / "other.pt"), device="cpu")
    assert "other.pt" in str(e.value) and "\n" not in str(e.value)
