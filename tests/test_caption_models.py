"""Every generator architecture round-trips through `vsa caption --model`, fed as its training features were made."""

from __future__ import annotations

import json

import numpy as np
import orjson
import pytest
import torch

from tests.conftest import run_cli
from tests.test_caption_cli import _photo
from vsa.checkpoint import save_checkpoint
from vsa.errors import VsaError
from vsa.generator.model import GeneratorConfig, build_model

WORDS = "a dog runs on the grass man in red shirt water".split()


def _ckpt(tmp_path, rnn: str, extractor: dict, cells: int = 0, sharp: float = 1.0) -> tuple:
    torch.manual_seed(0)
    cfg = GeneratorConfig(arch=rnn, vocab_size=len(WORDS) + 4, feat_dim=1280, embed=16, hidden=24, att_dim=8, cells=cells)
    model = build_model(cfg).eval()
    with torch.no_grad():
        model.out.bias[1] += 2.0  # <end> plausible: short captions
        if sharp != 1.0:  # words that depend on what is attended to
            model.att_embed.weight *= sharp
            model.lang.weight_ih *= sharp
    path = tmp_path / f"{rnn}.pt"
    save_checkpoint(path, "mrnn", cfg, {}, {"beam": 2}, WORDS, extractor, model.state_dict(), {})
    return path, model


LITE0 = {"extractor": "efficientnet-lite0", "dim": 1280, "input": 224, "resize": "squash"}


@pytest.mark.slow
@pytest.mark.parametrize("rnn,crop", [("rnn", None), ("lstm", None), ("updown", "grid")])
def test_each_architecture_captions_a_photo_from_its_checkpoint(tmp_path, rnn, crop):
    from vsa.data import Vocab
    from vsa.generator.decoding import DecodingConfig, constraints, decode

    photo = _photo(tmp_path / "photo.jpg")
    # the features a training run would have used, made by `vsa embed` (whole image, or --crop grid)
    args = ["embed", photo, "-o", tmp_path / "f.npz", "--dtype", "float32", "--threads", "1"]
    r = run_cli(*(args + (["--crop", crop] if crop else [])))
    assert r.returncode == 0, r.stderr.decode()
    f = np.load(tmp_path / "f.npz")
    extractor = json.loads(str(f["meta"]))
    path, model = _ckpt(tmp_path, rnn, extractor)
    r = run_cli("caption", photo, "--model", path, "--json", "--threads", "1")
    assert r.returncode == 0, r.stderr.decode()
    rec = orjson.loads(r.stdout.splitlines()[0])
    feats = torch.from_numpy(f["feats"])
    feats = feats[None] if crop == "grid" else feats[:1]
    assert feats.shape == ((1, 50, 1280) if crop == "grid" else (1, 1280))
    # the checkpoint's decoding config: beam 2, the default constraints
    want = decode(model, feats, None, 2, 20, 0.0, **constraints(DecodingConfig(beam=2), Vocab(WORDS)))[0]
    assert rec["caption"] == " ".join(Vocab(WORDS).decode(want.tokens))
    assert rec["caption"] and rec["logprob"] == pytest.approx(want.logprob, abs=1e-2)


def test_a_region_attention_model_without_its_regions_is_a_clear_error(tmp_path):
    """The library, given no detector, says what the model needs; the CLI gives it the packaged detector."""
    from vsa.generator.captioner import caption_images

    photo = _photo(tmp_path / "photo.jpg")
    path, _ = _ckpt(tmp_path, "updown", dict(LITE0, crop="roi"))
    with pytest.raises(VsaError, match="attends over detector regions"):
        list(caption_images([(photo, "photo.jpg")], path, device="cpu", threads=1))
    r = run_cli("caption", photo, "--model", path, "--threads", "1", "--json")
    assert r.returncode == 0, r.stderr.decode()
    assert orjson.loads(r.stdout.splitlines()[0])["caption"]


def test_a_box_model_with_cells_captions_without_a_detector_on_the_whole_image_and_its_cells(tmp_path):
    from vsa.data import Vocab
    from vsa.generator.decoding import DecodingConfig, constraints, decode

    photo = _photo(tmp_path / "photo.jpg")
    r = run_cli("embed", photo, "--cells", "3", "-o", tmp_path / "f.npz", "--dtype", "float32", "--threads", "1")
    assert r.returncode == 0, r.stderr.decode()
    f = np.load(tmp_path / "f.npz")
    # a model trained on `vsa regions | vsa embed --cells 3` features (with box_dropout): its record names a detector
    extractor = dict(json.loads(str(f["meta"])), detector="yolov5n-coco")
    path, model = _ckpt(tmp_path, "updown", extractor, cells=3)
    # the library given no detector loads none (the CLI gives it the packaged one: the box test below)
    from vsa.generator.captioner import caption_images

    rec, = caption_images([(photo, "photo.jpg")], path, device="cpu", threads=1)
    feats = torch.from_numpy(f["feats"])[None]
    assert feats.shape == (1, 10, 1280)  # the whole image and its 3 x 3 cells
    want = decode(model, feats, None, 2, 20, 0.0, **constraints(DecodingConfig(beam=2), Vocab(WORDS)))[0]
    assert rec["caption"] == " ".join(Vocab(WORDS).decode(want.tokens))


@pytest.mark.slow
def test_a_box_model_reads_the_detectors_boxes(tmp_path, flickr8k, yolov5n):
    from vsa.data import Vocab
    from vsa.generator.decoding import DecodingConfig, constraints, decode

    photo = flickr8k / "images" / "2677656448_6b7e7702af.jpg"  # a dog and a person: boxes
    r = run_cli("regions", photo, "--detector", yolov5n, "--threads", "1", "-o", tmp_path / "r.jsonl")
    assert r.returncode == 0, r.stderr.decode()
    r = run_cli("embed", tmp_path / "r.jsonl", "--cells", "3", "-o", tmp_path / "f.npz", "--dtype", "float32",
                "--threads", "1")
    assert r.returncode == 0, r.stderr.decode()
    f = np.load(tmp_path / "f.npz")
    assert len(f["feats"]) > 10  # boxes between the whole image and the cells
    path, model = _ckpt(tmp_path, "updown", json.loads(str(f["meta"])), cells=3, sharp=8.0)
    r = run_cli("caption", photo, "--model", path, "--json", "--threads", "1", "--detector", yolov5n)
    assert r.returncode == 0, r.stderr.decode()
    cons = constraints(DecodingConfig(beam=2), Vocab(WORDS))
    feats = torch.from_numpy(f["feats"])
    want = decode(model, feats[None], None, 2, 20, 0.0, **cons)[0]
    rec = orjson.loads(r.stdout.splitlines()[0])
    assert rec["caption"] == " ".join(Vocab(WORDS).decode(want.tokens))
    assert rec["logprob"] == pytest.approx(want.logprob, abs=5e-3)
    no_boxes = torch.cat([feats[:1], feats[-9:]])[None]  # what it would read without the detector
    assert abs(decode(model, no_boxes, None, 2, 20, 0.0, **cons)[0].logprob - want.logprob) > 0.1


def test_region_agreement_counts_captions_that_name_their_box():
    from benchmarks.analysis import region_agreement

    recs = [{"regions": [{"label": "person", "caption": "a young boy"}, {"label": "dog", "caption": "two dogs"},
                         {"label": "bicycle", "caption": "a black dog"}, {"label": "traffic light", "caption": "a pole"}]},
            {"regions": [{"label": "person", "caption": "the grass"}]}]
    a = region_agreement(recs)
    assert a["regions"] == 4 and a["agree"] == 0.5  # traffic light has no caption words: not counted
    assert a["by_label"]["person"] == {"regions": 2, "agree": 0.5} and a["by_label"]["bicycle"]["agree"] == 0.0


def test_an_ensemble_of_generators_mixes_their_word_probabilities(tmp_path):
    from vsa.data import Vocab
    from vsa.generator.decoding import DecodingConfig, constraints, decode
    from vsa.generator.model import GeneratorEnsemble

    grid = dict(LITE0, crop="grid", grid=7)
    a_path, a = _ckpt(tmp_path, "updown", grid)
    torch.manual_seed(1)
    b = build_model(a.cfg).eval()
    feats = torch.randn(3, 50, 1280)
    for m in (a, b):
        m.decoding = DecodingConfig(beam=2)
    cons = constraints(DecodingConfig(), Vocab(WORDS))
    with torch.no_grad():
        st = {"a": a.init_state(feats), "b": b.init_state(feats)}
        tok = torch.full((3,), Vocab.start)
        pa, _ = a.step(tok, st["a"])
        pb, _ = b.step(tok, st["b"])
        ens = GeneratorEnsemble([a, b], [3.0, 1.0])
        pe, _ = ens.step(tok, ens.init_state(feats))
    # a weighted mean of the two distributions, itself a distribution
    assert torch.allclose(pe.exp(), 0.75 * pa.exp() + 0.25 * pb.exp(), atol=1e-6)
    assert torch.allclose(pe.exp().sum(-1), torch.ones(3), atol=1e-5)
    for beam in (1, 3):
        one = decode(a, feats, None, beam, 20, 0.0, **cons)
        # an ensemble of a model with itself, or with a zero-weight partner, decodes as the model alone
        for e in (GeneratorEnsemble([a, a]), GeneratorEnsemble([a, b], [1.0, 0.0])):
            got = decode(e, feats, None, beam, 20, 0.0, **cons)
            assert [h.tokens for h in got] == [h.tokens for h in one]
            assert [h.logprob for h in got] == pytest.approx([h.logprob for h in one], abs=1e-4)
        mixed = decode(GeneratorEnsemble([a, b]), feats, None, beam, 20, 0.0, **cons)
        alone_b = decode(b, feats, None, beam, 20, 0.0, **cons)
        assert [h.tokens for h in mixed] != [h.tokens for h in one] or [h.tokens for h in mixed] != [h.tokens for h in alone_b]
    # members on different backbones read their own block of the features side by side (vsa eval only)
    import dataclasses

    torch.manual_seed(2)
    c = build_model(dataclasses.replace(a.cfg, feat_dim=64)).eval()
    fc = torch.randn(3, 50, 64)
    with torch.no_grad():
        pc, _ = c.step(tok, c.init_state(fc))
        ens = GeneratorEnsemble([a, c], [1.0, 1.0], slices=[(0, 1280), (1280, 1344)])
        pe, _ = ens.step(tok, ens.init_state(torch.cat([feats, fc], -1)))
    assert torch.allclose(pe.exp(), 0.5 * pa.exp() + 0.5 * pc.exp(), atol=1e-6)
    # weights that mix nothing are a one-line error (the library's too: --weights is checked before it)
    for w in ([1.0, float("nan")], [0.0, 0.0], [-1.0, 2.0], [1.0]):
        with pytest.raises(VsaError, match="non-negative weights"):
            GeneratorEnsemble([a, b], w)


@pytest.mark.slow
def test_caption_with_two_models_decodes_them_as_one_ensemble(tmp_path):
    from vsa.data import Vocab
    from vsa.generator.decoding import DecodingConfig, constraints, decode
    from vsa.generator.model import GeneratorEnsemble

    photo = _photo(tmp_path / "photo.jpg")
    r = run_cli("embed", photo, "-o", tmp_path / "f.npz", "--dtype", "float32", "--threads", "1", "--crop", "grid")
    assert r.returncode == 0, r.stderr.decode()
    f = np.load(tmp_path / "f.npz")
    extractor = json.loads(str(f["meta"]))
    a_path, a = _ckpt(tmp_path, "updown", extractor)
    torch.manual_seed(1)
    b = build_model(a.cfg).eval()
    with torch.no_grad():
        b.out.bias[1] += 2.0
    b_path = tmp_path / "b.pt"
    save_checkpoint(b_path, "mrnn", a.cfg, {}, {"beam": 2}, WORDS, extractor, b.state_dict(), {})
    r = run_cli("caption", photo, "--model", a_path, "--model", b_path, "--weights", "2,1", "--json", "--threads", "1")
    assert r.returncode == 0, r.stderr.decode()
    rec = orjson.loads(r.stdout.splitlines()[0])
    feats = torch.from_numpy(f["feats"])[None]
    want = decode(GeneratorEnsemble([a, b], [2.0, 1.0]), feats, None, 2, 20, 0.0,
                  **constraints(DecodingConfig(beam=2), Vocab(WORDS)))[0]
    assert rec["caption"] == " ".join(Vocab(WORDS).decode(want.tokens))
    assert rec["logprob"] == pytest.approx(want.logprob, abs=1e-2)
    # members must read the same words and the same features: a one-line error naming the odd one out
    c_path = tmp_path / "c.pt"
    save_checkpoint(c_path, "mrnn", a.cfg, {}, {"beam": 2}, WORDS[::-1], extractor, b.state_dict(), {})
    r = run_cli("caption", photo, "--model", a_path, "--model", c_path, "--threads", "1")
    assert r.returncode == 2 and "different vocabularies" in r.stderr.decode() and "c.pt" in r.stderr.decode()
    d_path = tmp_path / "d.pt"
    save_checkpoint(d_path, "mrnn", a.cfg, {}, {"beam": 2}, WORDS, dict(extractor, crop="roi"), b.state_dict(), {})
    r = run_cli("caption", photo, "--model", a_path, "--model", d_path, "--threads", "1")
    assert r.returncode == 2 and "different features" in r.stderr.decode()
    r = run_cli("caption", photo, "--model", a_path, "--model", b_path, "--weights", "1", "--threads", "1")
    assert r.returncode == 2 and "--weights" in r.stderr.decode()


def _lopsided(path):
    """A photo that is not its own mirror image: a dark block on the left, a bright disc on the right."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (320, 240), (90, 160, 60))
    d = ImageDraw.Draw(im)
    d.rectangle((10, 20, 120, 220), fill=(20, 20, 30))
    d.ellipse((220, 40, 300, 120), fill=(250, 240, 200))
    im.save(path)
    return path


def test_mirror_decoding_mixes_the_photo_and_its_mirror_image(tmp_path):
    """`decoding.mirror`: each step's word distribution is (1 - w) x the photo's + w x its mirror image's; `vsa caption`
    makes the mirror image's features as `vsa embed --flip` does, `--mirror 0` decodes the photo alone."""
    from PIL import Image

    from vsa.generator.captioner import Captioner
    from vsa.data import Vocab
    from vsa.generator.decoding import DecodingConfig, constraints, decode
    from vsa.errors import VsaError
    from vsa.features.featuriser import Featuriser
    from vsa.generator.model import GeneratorEnsemble, with_mirror

    torch.set_num_threads(1)
    grid = dict(LITE0, crop="grid", grid=7)
    path, model = _ckpt(tmp_path, "updown", grid, sharp=8.0)
    model.decoding = DecodingConfig(beam=2, mirror=0.25)
    feats, flipped = torch.randn(3, 50, 1280), torch.randn(3, 50, 1280)
    tok = torch.full((3,), Vocab.start)
    with torch.no_grad():
        m = with_mirror(model, 0.25)
        pm, _ = m.step(tok, m.init_state(torch.cat([feats, flipped], -1)))
        pa, _ = model.step(tok, model.init_state(feats))
        pb, _ = model.step(tok, model.init_state(flipped))
    assert torch.allclose(pm.exp(), 0.75 * pa.exp() + 0.25 * pb.exp(), atol=1e-6)
    assert m.decoding.mirror == 0.25 and with_mirror(model, 0.0) is model
    for bad in (1.0, -0.5):
        with pytest.raises(VsaError, match="mirror weight"):
            with_mirror(model, bad)
    with pytest.raises(VsaError, match="across backbones"):
        with_mirror(GeneratorEnsemble([model, model], slices=[(0, 1280), (1280, 2560)]), 0.5)

    # vsa caption: the checkpoint's mirror weight, the mirror image featurised in the same CNN batch
    save_checkpoint(path, "mrnn", model.cfg, {}, {"beam": 2, "mirror": 0.5}, WORDS, grid, model.state_dict(), {})
    photo = _lopsided(tmp_path / "photo.jpg")
    im = Image.open(photo).convert("RGB")
    fz = Featuriser(grid, jit=False)
    f = torch.from_numpy(fz.features(im))[None]
    g = torch.from_numpy(fz.features(im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)))[None]
    cons = constraints(DecodingConfig(), Vocab(WORDS))
    with torch.no_grad():
        want = decode(with_mirror(model, 0.5), torch.cat([f, g], -1), None, 2, 20, 0.0, **cons)[0]
        alone = decode(model, f, None, 2, 20, 0.0, **cons)[0]
    assert want.logprob != pytest.approx(alone.logprob, abs=1e-3)  # the mirror image changes the decoding
    for w, hyp in ((None, want), (0.0, alone)):
        cap = Captioner.load(path, device="cpu", jit=False, mirror=w)
        rec = next(cap.caption_files([(photo, "photo.jpg")]))
        assert rec["caption"] == " ".join(Vocab(WORDS).decode(hyp.tokens))
        assert rec["logprob"] == pytest.approx(hyp.logprob, abs=1e-3), w
