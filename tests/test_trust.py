"""No code runs from any file vsa reads: a pickle that would run code is planted at every place a command loads
weights, features, vectors or a checkpoint from, and each command refuses it in one line (exit 2) or never
opens it. The planted pickle touches a marker file when unpickled, so a load that runs it fails the test.

Load paths covered (each a test case below):
  detector      default (a planted yolo11n.pt in the working folder is never looked up), --detector FILE,
                $VSA_DETECTOR, [regions] detector of vsa.toml, a YOLOv5 state-dict folder whose weights are a pickle,
                a .yaml that is not ultralytics' own, and an ultralytics checkpoint made of layers (loads)
  checkpoints   --model of score and caption, --aligner and --region-model of caption, the trainers' --resume
                file (all through vsa.checkpoint.load_checkpoint)
  CNN weights   --cnn-weights for EfficientNet-Lite (the default CNN) and for a torchvision CNN; an OpenCLIP file
  arrays        features / index NPZ with an object array (vsa.io.load_npz, vsa.features.store), GloVe .npy
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from vsa.cli import app
from vsa.errors import VsaError


class _Payload:
    """Unpickling it runs ``touch MARKER``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


@pytest.fixture
def planted(tmp_path, monkeypatch):
    """A working folder holding a photo, ``evil.pt`` (a pickle that would run code) and ``yolo11n.pt`` (the same,
    under the name of ultralytics' default model); returns (folder, marker). The test fails if the marker appears."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("VSA_DETECTOR", raising=False)
    marker = tmp_path / "PWNED"
    for name in ("evil.pt", "yolo11n.pt"):
        torch.save({"state_dict": _Payload(marker)}, tmp_path / name)
    Image.new("RGB", (96, 64), (30, 140, 60)).save(tmp_path / "photo.jpg")
    yield tmp_path, marker
    assert not marker.exists(), "a planted pickle ran code"


def _cli(*args, env=None):
    r = CliRunner().invoke(app, [str(a) for a in args], env=env)
    return r.exit_code, r.output


def _refused(code, out):
    last = out.strip().splitlines()[-1] if out.strip() else ""
    assert code == 2, out[-800:]
    assert last.startswith("vsa: error:") and "Traceback" not in out, out[-800:]
    return last


def test_the_default_detector_is_the_packaged_one_not_a_file_in_the_working_folder(planted):
    folder, _ = planted
    code, out = _cli("regions", "photo.jpg", "-o", "r.jsonl")
    assert code == 0, out[-800:]
    import orjson

    assert orjson.loads((folder / "r.jsonl").read_bytes())["detector"] == "yolov5n-coco"


@pytest.mark.parametrize("how", ["flag", "env", "toml"])
def test_a_pickled_detector_is_refused_however_it_is_named(planted, how):
    folder, _ = planted
    env = None
    args = ["regions", "photo.jpg"]
    if how == "flag":
        args += ["--detector", "evil.pt"]
    elif how == "env":
        env = {"VSA_DETECTOR": "yolo11n.pt"}
    else:
        (folder / "vsa.toml").write_text('[regions]\ndetector = "evil.pt"\n')
        args = ["score", "photo.jpg", "a dog"]
    last = _refused(*_cli(*args, env=env))
    assert "refused" in last and "posix.system" in last


def test_a_state_dict_folder_holding_a_pickle_is_refused(planted):
    from vsa.assets import SHIPPED_DETECTOR

    folder, marker = planted
    det = folder / "det"
    det.mkdir()
    shutil.copy(SHIPPED_DETECTOR / "meta.json", det / "meta.json")
    torch.save({"model.0.conv.weight": _Payload(marker)}, det / "x-state-dict.pt")
    assert "refused" in _refused(*_cli("regions", "photo.jpg", "--detector", det))


def test_a_detector_yaml_is_only_one_of_ultralytics_own(planted):
    folder, _ = planted
    (folder / "m.yaml").write_text("nc: 80\nactivation: __import__('os').system('touch PWNED')\nbackbone: []\nhead: []\n")
    assert "ultralytics' own" in _refused(*_cli("regions", "photo.jpg", "--detector", "m.yaml"))


def test_an_ultralytics_checkpoint_of_layers_loads_and_detects(planted):
    """What an ultralytics release file holds (a DetectionModel pickled with its layers, training arguments, dates)
    passes the allow-list; the same file with one function added is refused."""
    import contextlib
    import io

    from ultralytics.nn.tasks import DetectionModel

    from vsa.regions import load_detector

    folder, marker = planted
    with contextlib.redirect_stdout(io.StringIO()):
        m = DetectionModel("yolov8n.yaml", nc=3, verbose=False)
    m.names = {0: "cat", 1: "dog", 2: "bus"}
    ck = {"date": "x", "version": "8", "model": m.half(), "ema": None, "optimizer": None,
          "train_args": {"imgsz": 640, "model": "yolov8n.yaml"}, "train_metrics": {"mAP": np.float64(0.5)}}
    torch.save(ck, folder / "y8.pt")
    det = load_detector(folder / "y8.pt", device="cpu")
    assert det.names == ["cat", "dog", "bus"] and det.name == "y8"
    dets = det.detect([Image.open(folder / "photo.jpg")], top=4, conf=0.0)[0]
    assert 0 < len(dets) <= 4 and all(d["label"] in det.names for d in dets)
    assert all(0 <= d["box"][0] < d["box"][2] <= 96 and 0 <= d["box"][1] < d["box"][3] <= 64 for d in dets)
    ck["train_args"]["callback"] = _Payload(marker)
    torch.save(ck, folder / "y8-evil.pt")
    with pytest.raises(VsaError, match="refused.*posix.system"):
        load_detector(folder / "y8-evil.pt", device="cpu")


@pytest.mark.parametrize("args", [
    ["score", "photo.jpg", "a dog", "--model", "evil.pt"],
    ["caption", "photo.jpg", "--model", "evil.pt"],
    ["caption", "photo.jpg", "--ground", "--aligner", "evil.pt"],
    ["caption", "photo.jpg", "--regions", "--region-model", "evil.pt"],
], ids=["score-model", "caption-model", "caption-aligner", "caption-region-model"])
def test_a_pickled_checkpoint_is_refused(planted, args):
    last = _refused(*_cli(*args))
    assert "evil.pt" in last and "refused" in last


def test_a_pickled_last_checkpoint_is_refused_on_resume(planted):
    from vsa.trainer import load_last  # the trainers' resume path

    folder, _ = planted
    shutil.copy(folder / "evil.pt", folder / "align.last.pt")
    with pytest.raises(VsaError, match="refused"):
        load_last(folder / "align.pt", "align")


@pytest.mark.parametrize("cnn", ["efficientnet-lite0", "resnet18"])
def test_pickled_cnn_weights_are_refused(planted, cnn):
    from vsa.features.cnn import load_extractor

    folder, _ = planted
    with pytest.raises(VsaError):
        load_extractor(cnn, weights=str(folder / "evil.pt"), device="cpu")


def test_pickled_open_clip_weights_are_refused(planted):
    pytest.importorskip("open_clip")
    from vsa.features.cnn import load_extractor

    folder, _ = planted
    with pytest.raises(VsaError):
        load_extractor("open_clip:RN50", weights=str(folder / "evil.pt"), device="cpu")


def test_object_arrays_in_an_npz_are_refused(planted):
    from vsa.features.store import load_features
    from vsa.io import load_npz

    folder, marker = planted
    np.savez(folder / "evil.npz", feats=np.array([_Payload(marker)], dtype=object))
    with pytest.raises(VsaError):
        load_npz(folder / "evil.npz")
    with pytest.raises(VsaError):
        load_features(folder / "evil.npz")


def test_a_pickled_glove_matrix_is_refused(planted):
    from vsa.alignment.glove import glove_vectors

    folder, marker = planted
    g = folder / "glove"
    g.mkdir()
    np.save(g / "vectors.npy", np.array([_Payload(marker)], dtype=object), allow_pickle=True)
    (g / "vocab.txt").write_text("dog\n")
    with pytest.raises((VsaError, ValueError)):
        glove_vectors(str(g))
