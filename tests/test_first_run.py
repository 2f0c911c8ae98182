"""A new user's first run: an empty HOME (no ~/.config/Ultralytics yet), the headline pipe as two real processes."""

from __future__ import annotations

import pytest
import json
import os
import subprocess
import sys

import numpy as np

PHOTO = "2273038287_3004a72a34.jpg"  # a Flickr8K image with a dog


def empty_home_env(home) -> dict:
    """The environment of a user who never ran ultralytics, torch or matplotlib: HOME and XDG folders empty."""
    home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items()
           if k not in ("YOLO_CONFIG_DIR", "YOLO_VERBOSE", "MPLCONFIGDIR", "TORCH_HOME", "VSA_CONFIG")}
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"), XDG_CACHE_HOME=str(home / ".cache"),
               OMP_NUM_THREADS="2")
    return env


@pytest.mark.slow
def test_regions_pipe_embed_on_a_first_run(tmp_path, flickr8k, yolov5n):
    """`vsa regions PHOTO --detector D | vsa embed -o f.npz` under an empty HOME: stdout of regions is JSONL only
    (ultralytics creates its settings file on first use and announces it), and embed makes the NPZ."""
    home = tmp_path / "home"
    env = empty_home_env(home)
    out = tmp_path / "f.npz"
    vsa = [sys.executable, "-m", "vsa"]
    regions = subprocess.Popen([*vsa, "regions", str(flickr8k / "images" / PHOTO), "--detector", str(yolov5n)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=tmp_path)
    # tee keeps a copy of what regions wrote; the pipes are real OS pipes between real processes
    tee = subprocess.Popen(["tee", str(tmp_path / "regions.jsonl")], stdin=regions.stdout, stdout=subprocess.PIPE,
                           env=env, cwd=tmp_path)
    regions.stdout.close()
    embed = subprocess.Popen([*vsa, "embed", "-o", str(out)], stdin=tee.stdout, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=env, cwd=tmp_path)
    tee.stdout.close()
    e_out, e_err = embed.communicate(timeout=600)
    r_err = regions.stderr.read()
    assert regions.wait(timeout=600) == 0, r_err.decode()
    assert tee.wait(timeout=60) == 0
    assert embed.returncode == 0, e_err.decode()
    assert (home / ".config" / "Ultralytics" / "settings.json").exists(), "not a first run: no settings file made"

    lines = (tmp_path / "regions.jsonl").read_bytes().splitlines()
    assert len(lines) == 1, lines[:3]
    recs = [json.loads(ln) for ln in lines]  # every stdout line is a regions record
    assert recs[0]["key"] == PHOTO and recs[0]["regions"][0]["label"] == "image" and len(recs[0]["regions"]) > 1
    assert e_out == b""
    with np.load(out, allow_pickle=False) as z:
        assert list(z["keys"]) == [PHOTO]
        assert z["feats"].shape == (len(recs[0]["regions"]) + 9, 1280)  # + the 3x3 image cells the shipped aligner reads


def test_library_prints_go_to_stderr(tmp_path):
    """Whatever a library prints while a guarded command runs lands on stderr, and vsa's writer still reaches the
    real stdout; also with ultralytics made verbose (its logger is created while the command runs)."""
    code = ("import sys\n"
            "from vsa.cli import common\n"
            "@common.guarded\n"
            "def cmd():\n"
            "    print('library chatter')\n"
            "    import ultralytics.utils  # noqa: F401  (its settings banner on a first run)\n"
            "    sys.stdout.write('more chatter\\n')\n"
            "    from vsa.io import write_json\n"
            "    write_json('-', {'data': 1})\n"
            "cmd()\n")
    env = empty_home_env(tmp_path / "home")
    env["YOLO_VERBOSE"] = "True"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout == b'{"data":1}\n'
    err = r.stderr.decode()
    assert "library chatter" in err and "more chatter" in err and "Creating new Ultralytics Settings" in err


def test_embed_names_a_line_that_is_neither_a_record_nor_a_path(tmp_path):
    """What a polluted pipe gives `vsa embed`: the file and line, not '<line text>: no such file or folder'."""
    from tests.conftest import run_cli

    banner = "Creating new Ultralytics Settings v0.0.8 file ✅ \n".encode()
    r = run_cli("embed", "-o", tmp_path / "f.npz", input=banner)
    assert r.returncode == 2
    assert r.stderr.decode() == ("vsa: error: <stdin>:1: not a regions record and not an image path: "
                                 "'Creating new Ultralytics Settings v0.0.8 file ✅ '\n")
    good = tmp_path / "a.jpg"
    from PIL import Image

    Image.new("RGB", (32, 32)).save(good)
    lst = tmp_path / "list.txt"
    lst.write_text(f"{good}\n\nnope/b.jpg\n")
    r = run_cli("embed", lst, "-o", tmp_path / "f.npz")
    assert r.returncode == 2 and r.stderr.decode().startswith(f"vsa: error: {lst}:3: not a regions record"), r.stderr
    assert not (tmp_path / "f.npz").exists()


def _tiny_test_split(flickr8k, path, n=4):
    data = json.loads((flickr8k / "dataset_flickr8k.json").read_text())
    test = [im for im in data["images"] if im["split"] == "test"][:n]
    path.write_text(json.dumps({"dataset": "flickr8k", "images": test}))
    return [flickr8k / "images" / im["filename"] for im in test]


@pytest.mark.slow
def test_eval_without_model_or_toml_uses_the_shipped_models_on_features_it_computes(tmp_path, flickr8k, yolov5n):
    """In an empty folder, `vsa eval --images --detector` evaluates the shipped aligner and generator, says so on
    stderr, and computes the features exactly as `vsa regions | vsa embed --cells 3` (and `vsa embed IMAGES --crop grid --cnn efficientnet-lite2`) make them."""
    from tests.conftest import run_cli
    from vsa.assets import SHIPPED_MODELS

    ds = tmp_path / "tiny.json"
    photos = _tiny_test_split(flickr8k, ds)
    work = tmp_path / "empty"
    work.mkdir()
    r = run_cli("eval", "--split", "test", "--dataset", ds, "--images", flickr8k / "images", "--detector", yolov5n,
                "--json", "--ranks-out", tmp_path / "ranks.json", "--captions-out", tmp_path / "caps.json", cwd=work)
    assert r.returncode == 0, r.stderr.decode()
    rep = json.loads(r.stdout)
    err = r.stderr.decode()
    assert f"using the shipped Flickr8k aligner {SHIPPED_MODELS['align']}" in err
    assert f"using the shipped Flickr8k generator {SHIPPED_MODELS['mrnn']}" in err
    assert "computing region features of the 4 test images" in err and "computing grid features" in err
    assert "computing mirrored grid features" in err  # the shipped generator decodes each photo with its mirror image
    assert rep["generation"]["mirror"] == 0.5 and rep["generation"]["mirror_features"] == f"computed from {flickr8k / 'images'}"
    assert rep["retrieval"]["images"] == 4 and rep["retrieval"]["sentences"] == 20
    assert rep["retrieval"]["features"] == f"computed from {flickr8k / 'images'}"
    assert rep["generation"]["images"] == 4 and rep["generation"]["model"] == str(SHIPPED_MODELS["mrnn"])
    assert list(work.iterdir()) == []  # nothing left behind

    # the same evaluation on features made by the documented pipeline
    p = subprocess.run(f"{sys.executable} -m vsa regions {' '.join(map(str, photos))} --detector {yolov5n} | "
                       f"{sys.executable} -m vsa embed --cells 3 -o {tmp_path / 'feats.npz'} && "
                       f"{sys.executable} -m vsa embed {' '.join(map(str, photos))} --crop grid --cnn efficientnet-lite2 "
                       f"-o {tmp_path / 'grid.npz'} && {sys.executable} -m vsa embed {' '.join(map(str, photos))} --crop grid "
                       f"--cnn efficientnet-lite2 --flip -o {tmp_path / 'grid-flip.npz'}",
                       shell=True, capture_output=True, cwd=work, timeout=600)
    assert p.returncode == 0, p.stderr.decode()
    for model, feats, out, more in ((SHIPPED_MODELS["align"], "feats.npz", "--ranks-out", ()),
                                    (SHIPPED_MODELS["mrnn"], "grid.npz", "--captions-out",
                                     ("--mirror-features", tmp_path / "grid-flip.npz"))):
        r = run_cli("eval", "--split", "test", "--dataset", ds, "--model", model, "--features", tmp_path / feats,
                    "--json", out, tmp_path / f"{feats}.out.json", *more, cwd=work)
        assert r.returncode == 0, r.stderr.decode()
        assert "computing" not in r.stderr.decode() and "shipped" not in r.stderr.decode()
    mine, theirs = (json.loads((tmp_path / f).read_text()) for f in ("ranks.json", "feats.npz.out.json"))
    assert mine["images"] == theirs["images"] and mine["sentences"] == theirs["sentences"]
    mine, theirs = (json.loads((tmp_path / f).read_text()) for f in ("caps.json", "grid.npz.out.json"))
    assert mine == theirs


@pytest.mark.slow
def test_score_names_words_out_of_the_vocabulary(flickr8k, yolov5n):
    from tests.conftest import run_cli

    photo = flickr8k / "images" / PHOTO
    r = run_cli("score", photo, "a tall giraffe", "--detector", yolov5n, "--json")
    assert r.returncode == 0, r.stderr.decode()
    rec = json.loads(r.stdout)
    assert rec["oov"] == ["giraffe"] and [w["known"] for w in rec["words"]] == [True, True, False]
    # the shipped aligner reads it as its nearest known word by GloVe, and says so
    assert rec["read_as"] == {"giraffe": "elephant"}
    err = r.stderr.decode()
    assert ("warning: not in the vocabulary: giraffe (read as 'elephant', its nearest word by GloVe)\n" in err
            and "using the shipped Flickr8k aligner" in err)
    r = run_cli("score", photo, "a tall elephant", "--detector", yolov5n, "--json")
    assert json.loads(r.stdout)["score"] == rec["score"]
    r = run_cli("score", photo, "a dog runs", "--detector", yolov5n, "--json")
    assert json.loads(r.stdout)["oov"] == [] and "vocabulary" not in r.stderr.decode()
