"""vsa regions: YOLOv5 state-dict detector on real Flickr8K images, box mapping, CLI contract."""

from __future__ import annotations

import json
from pathlib import Path

import orjson
import pytest
import torch
from PIL import Image

from tests.conftest import run_cli
from vsa.errors import VsaError
from vsa.regions import DetectOptions, _postprocess, auto_imgsz, load_detector, regions_for_image

# two Flickr8K training images whose five captions all mention a dog
DOG_IMAGES = ["2273038287_3004a72a34.jpg", "2407470303_6fd5e3600d.jpg"]


@pytest.fixture(scope="module")
def detector(yolov5n):
    torch.set_num_threads(2)
    return load_detector(str(yolov5n), device="cpu")


def test_postprocess_maps_letterboxed_boxes_back():
    # a 400x200 image letterboxed into 320: scale 0.8, 80 px of padding above
    boxes = torch.tensor([[80.0, 120.0, 160.0, 200.0], [0.0, 70.0, 330.0, 250.0]])
    scores, labels = torch.tensor([0.9, 0.5]), torch.tensor([0, 1])
    out = _postprocess(boxes, scores, labels, ["person", "dog"], (0.8, 0, 80, 400, 200), DetectOptions(top=5))
    assert out[0]["box"] == [100.0, 50.0, 200.0, 150.0] and out[0]["label"] == "person"
    assert out[1]["box"] == [0.0, 0.0, 400.0, 200.0]  # clamped to the image
    assert _postprocess(boxes, scores, labels, ["person", "dog"], (0.8, 0, 80, 400, 200), DetectOptions(top=1))[0]["score"] == 0.9


def test_dedup_drops_cross_class_duplicates():
    boxes = torch.tensor([[0.0, 0.0, 100.0, 100.0], [1.0, 1.0, 100.0, 100.0], [50.0, 50.0, 150.0, 150.0]])
    scores, labels = torch.tensor([0.9, 0.8, 0.7]), torch.tensor([0, 1, 0])
    meta = (1.0, 0, 0, 200, 200)
    kept = _postprocess(boxes, scores, labels, ["a", "b"], meta, DetectOptions(dedup=0.9))
    assert [d["label"] for d in kept] == ["a", "a"]
    assert len(_postprocess(boxes, scores, labels, ["a", "b"], meta, DetectOptions(dedup=1.0))) == 3


def test_auto_imgsz():
    assert auto_imgsz([Image.new("RGB", (224, 224))]) == 448
    assert auto_imgsz([Image.new("RGB", (4000, 3000))]) == 640
    assert auto_imgsz([Image.new("RGB", (1, 1))]) == 64


@pytest.mark.slow
def test_dog_captions_get_a_dog_box(detector, flickr8k):
    ds = json.loads((flickr8k / "dataset_flickr8k.json").read_bytes())
    caps = {im["filename"]: im["sentences"] for im in ds["images"]}
    for key in DOG_IMAGES:
        assert all("dog" in s["tokens"] for s in caps[key])
        rec = regions_for_image(detector, flickr8k / "images" / key, key)
        assert rec["key"] == key and (rec["width"], rec["height"]) == (224, 224)
        assert rec["regions"][0] == {"box": [0.0, 0.0, 224.0, 224.0], "score": 1.0, "label": "image"}
        dogs = [r for r in rec["regions"][1:] if r["label"] == "dog"]
        assert dogs and max(d["score"] for d in dogs) > 0.5, rec["regions"][:4]


def test_boxes_are_in_original_coordinates(detector, flickr8k):
    """Paste a dog photo into a wide canvas: the dog box must land where the photo was pasted."""
    dog = Image.open(flickr8k / "images" / DOG_IMAGES[0]).convert("RGB")
    ref = max((d for d in detector.detect([dog], top=19)[0] if d["label"] == "dog"), key=lambda d: d["score"])
    canvas = Image.new("RGB", (900, 400), (90, 90, 90))
    canvas.paste(dog.resize((448, 448)).crop((0, 24, 448, 424)), (400, 0))  # scale 2, shifted x+400, y-48
    dets = detector.detect([canvas], top=19)[0]
    best = max((d for d in dets if d["label"] == "dog"), key=lambda d: d["score"])
    x1, y1, x2, y2 = ref["box"]
    expect = [2 * x1 + 400, 2 * y1 - 48, 2 * x2 + 400, 2 * y2 - 48]
    expect = [max(0, min(900, expect[0])), max(0, expect[1]), min(900, expect[2]), min(400, expect[3])]
    assert all(abs(a - b) < 40 for a, b in zip(best["box"], expect)), (best["box"], expect)
    assert all(0 <= d["box"][0] < d["box"][2] <= 900 and 0 <= d["box"][1] < d["box"][3] <= 400 for d in dets)


def test_top_limits_detections(detector, flickr8k):
    im = Image.open(flickr8k / "images" / DOG_IMAGES[1]).convert("RGB")
    for top in (0, 1, 3):
        assert len(detector.detect([im], top=top, conf=0.001)[0]) <= top
    many = detector.detect([im], top=19, conf=0.001)[0]
    assert 3 < len(many) <= 19
    assert [d["score"] for d in many] == sorted((d["score"] for d in many), reverse=True)


@pytest.mark.slow
def test_cli_regions_jsonl(tmp_path, yolov5n, flickr8k):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for k in DOG_IMAGES:
        (folder / k).write_bytes((flickr8k / "images" / k).read_bytes())
    Image.new("RGB", (300, 120), (10, 200, 10)).save(folder / "wide.png")
    r = run_cli("regions", folder, "--detector", yolov5n, "--top", "3", "--threads", "2")
    assert r.returncode == 0, r.stderr.decode()
    recs = [orjson.loads(line) for line in r.stdout.splitlines()]
    assert [x["key"] for x in recs] == sorted(DOG_IMAGES) + ["wide.png"]
    for rec in recs:
        regs = rec["regions"]
        assert regs[0]["label"] == "image" and regs[0]["box"] == [0, 0, rec["width"], rec["height"]]
        assert 1 <= len(regs) <= 4
        assert all(0 <= g["box"][0] < g["box"][2] <= rec["width"] and 0 <= g["box"][1] < g["box"][3] <= rec["height"] for g in regs)
    assert (recs[2]["width"], recs[2]["height"]) == (300, 120)
    assert any(g["label"] == "dog" for g in recs[0]["regions"])
    # --shard K/N: the shards concatenated in order are the single run (at a fixed detector input
    # size: the automatic one is chosen per batch, and sharding changes the batches)
    fixed = ("--detector", yolov5n, "--top", "3", "--threads", "2", "--imgsz", "448")
    r = run_cli("regions", folder, *fixed)
    lines = r.stdout.splitlines()
    parts = []
    for k in (1, 2):
        rs = run_cli("regions", folder, *fixed, "--shard", f"{k}/2")
        assert rs.returncode == 0, rs.stderr.decode()
        parts.append(rs.stdout.splitlines())
    assert all(parts) and parts[0] + parts[1] == lines


@pytest.mark.slow
def test_cli_regions_bad_image_and_stdin(tmp_path, yolov5n, flickr8k):
    good = flickr8k / "images" / DOG_IMAGES[0]
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff not a jpeg")
    paths = f"{good}\n{bad}\n".encode()
    r = run_cli("regions", "--detector", yolov5n, input=paths)
    assert r.returncode == 2 and "broken.jpg" in r.stderr.decode() and "Traceback" not in r.stderr.decode()
    r = run_cli("regions", "--detector", yolov5n, "--skip-bad", input=paths)
    assert r.returncode == 0, r.stderr.decode()
    assert [orjson.loads(x)["key"] for x in r.stdout.splitlines()] == [DOG_IMAGES[0]]
    assert "broken.jpg" in r.stderr.decode()


def test_offline_detector_error_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("VSA_DETECTOR", raising=False)
    with pytest.raises(VsaError, match="--detector"):
        load_detector(str(tmp_path / "missing-weights.pt"), device="cpu")
    with pytest.raises(VsaError, match="meta.json"):
        load_detector(str(tmp_path), device="cpu")  # a folder that is not a YOLOv5 state-dict folder


@pytest.mark.slow
def test_ultralytics_detector_path(tmp_path, monkeypatch):
    """Any ultralytics-loadable model (here: an untrained yolov8n built from its yaml, no download)."""
    monkeypatch.chdir(tmp_path)
    det = load_detector("yolov8n.yaml", device="cpu")
    assert det.name == "yolov8n" and len(det.names) == 80
    im = Image.new("RGB", (300, 200), (120, 50, 50))
    dets = det.detect([im], top=5, conf=0.0)[0]
    assert 0 < len(dets) <= 5
    assert all(0 <= d["box"][0] < d["box"][2] <= 300 and 0 <= d["box"][1] < d["box"][3] <= 200 for d in dets)
    im.save(tmp_path / "x.png")
    rec = regions_for_image(det, tmp_path / "x.png", top=2, conf=0.0)
    assert rec["regions"][0]["label"] == "image" and len(rec["regions"]) <= 3


# ----------------------------------------------------------------------------- who picks the detector


def _bogus_workspace(tmp_path, monkeypatch):
    """A current folder whose vsa.toml, and an environment whose $VSA_DETECTOR, name detectors that do not exist."""
    from vsa.cli import config

    (tmp_path / "vsa.toml").write_text('[regions]\ndetector = "toml-bogus.pt"\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VSA_DETECTOR", str(tmp_path / "env-bogus.pt"))
    config.reset_workspace()


@pytest.mark.slow
def test_the_library_loads_the_detector_it_is_given(tmp_path, monkeypatch, yolov5n, detector, flickr8k):
    """load_detector / write_regions read neither $VSA_DETECTOR nor vsa.toml: the same detector, the same records."""
    import vsa.regions as R

    photo = flickr8k / "images" / DOG_IMAGES[0]
    want = regions_for_image(detector, photo)
    _bogus_workspace(tmp_path, monkeypatch)
    det = load_detector(str(yolov5n), device="cpu")
    assert det.name == detector.name and regions_for_image(det, photo) == want
    st = R.write_regions([photo], tmp_path / "r.jsonl", str(yolov5n), device="cpu")
    assert st["images"] == 1 and st["bad"] == 0
    assert orjson.loads((tmp_path / "r.jsonl").read_bytes()) == want

    # no spec: the detector inside the package, which is the YOLOv5n COCO detector of ../shared, box for box
    packaged = load_detector(None, device="cpu")
    assert Path(R.DEFAULT_DETECTOR).parent == Path(R.__file__).parent / "assets"
    assert packaged.name == "yolov5n-coco" and regions_for_image(packaged, photo) == want


def test_the_cli_resolves_the_detector(tmp_path, monkeypatch):
    """--detector, else $VSA_DETECTOR, else [regions] detector of vsa.toml, else the packaged detector."""
    from vsa.cli import config
    from vsa.cli.workspace import detector as resolve_detector

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("VSA_DETECTOR", raising=False)
    config.reset_workspace()
    from vsa.regions import DEFAULT_DETECTOR

    assert resolve_detector(None) == DEFAULT_DETECTOR and Path(DEFAULT_DETECTOR, "meta.json").is_file()
    _bogus_workspace(tmp_path, monkeypatch)
    assert resolve_detector("flag.pt") == "flag.pt"
    assert resolve_detector(None) == str(tmp_path / "env-bogus.pt")
    monkeypatch.delenv("VSA_DETECTOR")
    assert resolve_detector(None) == str(tmp_path / "toml-bogus.pt")  # a path key: relative to the file


def test_cli_regions_honours_vsa_detector_and_vsa_toml(tmp_path, yolov5n, flickr8k):
    photo = flickr8k / "images" / DOG_IMAGES[0]
    (tmp_path / "vsa.toml").write_text(f'[regions]\ndetector = {json.dumps(str(yolov5n))}\ntop = 2\n')
    r = run_cli("regions", photo, "-o", "-", cwd=tmp_path, env={"VSA_DETECTOR": ""})
    assert r.returncode == 0, r.stderr.decode()
    rec = orjson.loads(r.stdout)
    assert rec["detector"] == "yolov5n-coco" and len(rec["regions"]) <= 3  # [regions] top = 2, + the whole image
    r = run_cli("regions", photo, cwd=tmp_path, env={"VSA_DETECTOR": str(tmp_path / "env-bogus.pt")})
    err = r.stderr.decode()
    assert r.returncode == 2 and err.count("\n") == 1 and "env-bogus.pt" in err, err
