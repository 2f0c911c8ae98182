"""The label-reading generator (updown-labels): boxes carry their detector class, score and place, and a class word
is written by copying it from a box, so a class the training captions never named is still written."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vsa.data import Vocab
from vsa.errors import VsaError
from vsa.features.featuriser import label_channels, label_width
from vsa.generator.decoding import DecodingConfig, beam_search
from vsa.generator.model import GeneratorConfig, build_model
from vsa.generator.models.labelled import GLOVE_DIM, UpDownLabels
from vsa.generator.train import GeneratorTrainConfig, train
from vsa.labels import copy_words
from vsa.splits import CaptionSplit


CLASSES = ["dog", "cat", "horse", "giraffe"]
SEEN = ["dog", "cat", "horse"]  # giraffe: never in a training caption
CNN = 8


def _glove(tmp_path):
    """A GloVe text file with a vector for every word the classes need (animals close to each other)."""
    rng = np.random.RandomState(0)
    base = rng.randn(GLOVE_DIM)
    lines = []
    for w in ["dog", "cat", "horse", "giraffe", "person", "car"]:
        v = base + 0.3 * rng.randn(GLOVE_DIM)
        lines.append(w + " " + " ".join(f"{x:.4f}" for x in v))
    p = tmp_path / "glove.txt"
    p.write_text("\n".join(lines) + "\n")
    return str(p)


def _image(cls: str, rng, plural: bool = False):
    """Rows: the whole image, one (or two) boxes of ``cls``, four cells; CNN channels are noise (the class is in
    the labels alone)."""
    regs = [{"box": [0, 0, 100, 100], "label": "image", "score": 1.0}]
    regs.append({"box": [10, 10, 60, 60], "label": cls, "score": 0.9})
    if plural:
        regs.append({"box": [50, 40, 95, 90], "label": cls, "score": 0.8})
    regs += [{"box": [0, 0, 50, 50], "label": "cell", "score": 1.0}] * 4
    cnn = rng.randn(len(regs), CNN).astype(np.float32)
    return np.concatenate([cnn, label_channels(regs, (100, 100), CLASSES)], 1)


def _split(classes, vocab, n, rng):
    feats, sents, refs, toks = [], [], [], []
    for i in range(n):
        c = classes[i % len(classes)]
        plural = bool(i // len(classes) % 2)
        feats.append(_image(c, rng, plural))
        word = copy_words(c)[1 if plural else 0]
        words = ["two" if plural else "a", word, "runs", "on", "the", "grass"]
        sents.append((i, vocab.encode(words)))
        refs.append([" ".join(words)])
        toks.append([words])
    R = max(len(f) for f in feats)
    x = np.zeros((n, R, feats[0].shape[1]), np.float32)
    m = np.zeros((n, R), bool)
    for i, f in enumerate(feats):
        x[i, : len(f)], m[i, : len(f)] = f, True
    return CaptionSplit(torch.from_numpy(x), torch.from_numpy(m), sents, refs, toks, list(range(n)))


def test_label_channels_one_hot_score_and_place():
    regs = [{"box": [0, 0, 200, 100], "label": "image", "score": 1.0},
            {"box": [50, 25, 150, 75], "label": "cat", "score": 0.5},
            {"box": [0, 0, 10, 10], "label": "cell", "score": 1.0},
            {"box": [0, 0, 10, 10], "label": "unicorn", "score": 0.9}]
    ch = label_channels(regs, (200, 100), CLASSES)
    assert ch.shape == (4, label_width(CLASSES)) == (4, 4 + 6)
    assert ch[1].tolist() == pytest.approx([0, 1, 0, 0, 0.5, 0.25, 0.25, 0.75, 0.75, 0.25])
    assert not ch[0].any() and not ch[2].any() and not ch[3].any()  # whole image, cell, a class outside the set


def test_a_class_never_in_the_training_captions_is_written_by_copying_its_box(tmp_path):
    rng = np.random.RandomState(0)
    torch.manual_seed(0)
    words = ["a", "two", "runs", "on", "the", "grass"] + [w for c in SEEN for w in copy_words(c)]
    meta = {"labels": CLASSES}
    vocab = UpDownLabels.training_vocab(Vocab(words), meta)
    assert "giraffe" in vocab.stoi and "giraffes" in vocab.stoi  # in the vocabulary though never in training
    tr, va = _split(SEEN, vocab, 60, rng), _split(SEEN, vocab, 6, rng)
    mcfg = GeneratorConfig(arch="updown-labels", labels=len(CLASSES), embed=32, hidden=32, att_dim=16, dropout=0.0)
    tcfg = GeneratorTrainConfig(epochs=40, batch_size=20, lr=1e-2, lr_decay=1.0, scst_epochs=0, patience=40,
                                search_settings=0, flip=0.0, glove=_glove(tmp_path))
    out = tmp_path / "lab.pt"
    train(mcfg, tcfg, DecodingConfig(), tr, va, vocab, out, dict(meta, dim=CNN + label_width(CLASSES)),
          info=lambda *a: None)
    from vsa.checkpoint import load_checkpoint
    from vsa.generator.model import model_from_checkpoint

    model = model_from_checkpoint(load_checkpoint(out, "mrnn"), path=out)
    for plural in (False, True):
        f = torch.from_numpy(_image("giraffe", rng, plural))[None]
        hyp = beam_search(model, f, None, 3, 8)[0][0]
        caption = vocab.decode(hyp.tokens)
        assert caption[:2] == (["two", "giraffes"] if plural else ["a", "giraffe"]), caption


def test_glove_missing_for_a_class_is_one_line_naming_it(tmp_path):
    cfg = GeneratorConfig(arch="updown-labels", labels=2, feat_dim=CNN + 2 + 6, vocab_size=20, embed=8, hidden=8)
    model = build_model(cfg)
    glove = tmp_path / "g.txt"
    glove.write_text("dog " + " ".join(["0.1"] * GLOVE_DIM) + "\n")
    vocab = UpDownLabels.training_vocab(Vocab(["a"]), {"labels": ["dog", "zorblax"]})
    with pytest.raises(VsaError, match="'zorblax' has no GloVe vector"):
        model.setup(vocab, {"labels": ["dog", "zorblax"]}, str(glove))


def test_features_without_labels_are_refused():
    with pytest.raises(VsaError, match="vsa embed REGIONS"):
        UpDownLabels.training_vocab(Vocab(["a"]), {"crop": "roi"})


class _OtherDetector:
    name = "my-detector"
    names = ["apple", "pear"]

    def detect(self, images, opt=None, **kw):
        return [[] for _ in images]


def test_a_detector_of_another_label_set_is_refused_naming_both():
    from vsa.features.featuriser import Featuriser
    from vsa.labels import COCO_CLASSES

    meta = {"extractor": "efficientnet-lite0", "crop": "roi", "labels": list(COCO_CLASSES), "detector": "yolov5n-coco"}
    with pytest.raises(VsaError, match="80 class labels of yolov5n-coco.*my-detector has another label set"):
        Featuriser(meta, _OtherDetector())
    Featuriser({k: v for k, v in meta.items() if k != "labels"}, _OtherDetector())  # unlabelled features: any detector


@pytest.mark.slow
def test_caption_json_counts_the_boxes_read_and_says_when_there_were_none(tmp_path):
    """A label generator on the packaged detector through `vsa caption --json`: a photo of a bus has boxes; a plain
    grey picture has none and is captioned from the whole image and its cells, which the record says."""
    import ultralytics
    from pathlib import Path

    from PIL import Image

    from tests.conftest import run_cli
    from vsa.labels import COCO_CLASSES

    rng = np.random.RandomState(0)
    names = list(COCO_CLASSES)
    width = 1280 + label_width(names)
    vocab = UpDownLabels.training_vocab(Vocab(["a", "on", "the", "street"]), {"labels": names})

    def item(i):
        regs = [{"box": [0, 0, 10, 10], "label": "image", "score": 1.0},
                {"box": [1, 1, 8, 8], "label": "bus", "score": 0.9}]
        return np.concatenate([rng.randn(2, 1280).astype(np.float32), label_channels(regs, (10, 10), names)], 1)

    x = torch.from_numpy(np.stack([item(i) for i in range(8)]))
    sents = [(i, vocab.encode(["a", "bus", "on", "the", "street"])) for i in range(8)]
    refs = [["a bus on the street"]] * 8
    sp = CaptionSplit(x, torch.ones(8, 2, dtype=torch.bool), sents, refs, [[r[0].split()] for r in refs], list(range(8)))
    glove = tmp_path / "g.txt"
    glove.write_text("".join(w + " " + " ".join(["0.1"] * GLOVE_DIM) + "\n" for c in names for w in c.split()))
    meta = {"extractor": "efficientnet-lite0", "dim": width, "input": 224, "resize": "squash",
            "mean": [0.498] * 3, "std": [0.502] * 3, "crop": "roi", "context": 0.0, "cells": 2, "labels": names,
            "detector": "yolov5n-coco"}
    out = tmp_path / "lab.pt"
    train(GeneratorConfig(arch="updown-labels", labels=len(names), embed=16, hidden=16, att_dim=8),
          GeneratorTrainConfig(epochs=1, batch_size=8, scst_epochs=0, search_settings=0, flip=0.0, glove=str(glove)),
          DecodingConfig(max_len=6), sp, sp, vocab, out, meta, info=lambda *a: None)
    bus = Path(ultralytics.__file__).parent / "assets" / "bus.jpg"
    grey = tmp_path / "grey.png"
    Image.new("RGB", (200, 150), (128, 128, 128)).save(grey)
    r = run_cli("caption", bus, grey, "--model", out, "--json", "--threads", "1")
    assert r.returncode == 0, r.stderr.decode()
    recs = [__import__("orjson").loads(line) for line in r.stdout.splitlines()]
    assert recs[0]["boxes"] >= 3 and "note" not in recs[0]
    assert recs[1]["boxes"] == 0 and recs[1]["note"].startswith("no detections")


def test_init_from_copies_fitting_weights_and_vocabulary_rows_by_word(tmp_path):
    """`--set init=CKPT`: a label model starts from a grid model's weights, word rows matched by word."""
    from vsa.checkpoint import save_checkpoint
    from vsa.generator.train import init_from

    torch.manual_seed(0)
    old_vocab = Vocab(["a", "dog", "runs"])
    grid = build_model(GeneratorConfig(arch="updown", vocab_size=len(old_vocab), feat_dim=CNN, embed=8, hidden=8,
                                       att_dim=4))
    path = tmp_path / "grid.pt"
    save_checkpoint(path, "mrnn", grid.cfg, GeneratorTrainConfig(), DecodingConfig(), old_vocab.words, {},
                    grid.state_dict())
    vocab = UpDownLabels.training_vocab(Vocab(["dog", "a", "jumps"]), {"labels": CLASSES})
    lab = build_model(GeneratorConfig(arch="updown-labels", labels=len(CLASSES), vocab_size=len(vocab),
                                      feat_dim=CNN + label_width(CLASSES), embed=8, hidden=8, att_dim=4))
    before = lab.copy_v.weight.clone()
    said = init_from(lab, path, vocab)
    assert "by word" in said
    for w in ("a", "dog", "<end>"):
        assert torch.equal(lab.embed.weight[vocab.stoi[w]], grid.embed.weight[old_vocab.stoi[w]])
        assert torch.equal(lab.out.weight[vocab.stoi[w]], grid.out.weight[old_vocab.stoi[w]])
    assert not torch.equal(lab.embed.weight[vocab.stoi["jumps"]], grid.embed.weight[old_vocab.stoi["runs"]])
    assert torch.equal(lab.lang.weight_hh, grid.lang.weight_hh) and torch.equal(lab.att_embed.weight, grid.att_embed.weight)
    assert torch.equal(lab.copy_v.weight, before)  # the pointer is new


@pytest.mark.slow
def test_region_captions_name_the_class_of_their_box():
    """`vsa caption --regions`: each box's phrase holds a word of its detector class (constrained decoding on the
    box's label, whenever the region model has such a word), here with the shipped region model on a street
    photo whose boxes are people and a bus."""
    import orjson
    import ultralytics
    from pathlib import Path

    from tests.conftest import run_cli
    from vsa.data import tokenize
    from vsa.labels import CLASS_WORDS

    bus = Path(ultralytics.__file__).parent / "assets" / "bus.jpg"
    r = run_cli("caption", bus, "--regions", "--top", "4", "--json", "--threads", "1")
    assert r.returncode == 0, r.stderr.decode()
    regions = orjson.loads(r.stdout.splitlines()[0])["regions"]
    assert {g["label"] for g in regions} >= {"person", "bus"}
    for g in regions:
        assert set(tokenize(g["caption"])) & set(CLASS_WORDS[g["label"]]), g
