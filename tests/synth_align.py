"""A tiny synthetic image-sentence set with a known answer, for the alignment tests.

Every image holds 3 of ``n_obj`` objects; each object has a fixed random CNN "feature", and the
regions of an image are its objects' features plus noise (region 0, the whole image, is their
mean).  Each sentence names the image's objects, so a working aligner learns word w_k <-> object k.
"""

from __future__ import annotations

import numpy as np

from vsa.data import CaptionDataset, ImageRecord, Sentence

WORDS = ["dog", "cat", "ball", "tree", "car", "bike", "boat", "kite", "horse", "child"]


def make_synthetic(tmp_path, n_train=120, n_val=40, n_test=40, dim=32, seed=0, noise=0.3):
    from vsa.io import save_npz

    rng = np.random.default_rng(seed)
    protos = rng.normal(size=(len(WORDS), dim)).astype(np.float32)
    images, feats, boxes, labels, keys, offsets, objs = [], [], [], [], [], [0], []
    sid = 0
    for i, split in enumerate(["train"] * n_train + ["val"] * n_val + ["test"] * n_test):
        o = rng.choice(len(WORDS), 3, replace=False)
        key = f"img{i:04d}.jpg"
        f = protos[o] + noise * rng.normal(size=(3, dim)).astype(np.float32)
        f = np.concatenate([f.mean(0, keepdims=True), f])
        feats.append(f)
        boxes += [[0, 0, 224, 224], [0, 0, 100, 100], [100, 0, 224, 100], [0, 100, 224, 224]]
        labels += ["image"] + [WORDS[k] for k in o]
        keys.append(key)
        offsets.append(offsets[-1] + len(f))
        objs.append(o)
        sents = []
        for _ in range(5):
            p = rng.permutation(o)
            toks = ["a", WORDS[p[0]], "and", "a", WORDS[p[1]], "near", "the", WORDS[p[2]]]
            sents.append(Sentence(" ".join(toks), toks, sid))
            sid += 1
        images.append(ImageRecord(key, split, i, sents))
    ds = CaptionDataset("synthetic", images, None, tmp_path / "synthetic.json", "karpathy")
    F = np.concatenate(feats).astype(np.float16)
    arrays = {
        "feats": F,
        "image_index": np.repeat(np.arange(len(keys), dtype=np.int32), [len(f) for f in feats]),
        "offsets": np.asarray(offsets, dtype=np.int64),
        "boxes": np.asarray(boxes, dtype=np.float32),
        "scores": np.ones(len(F), dtype=np.float32),
        "labels": np.asarray(labels),
        "keys": np.asarray(keys),
        "sizes": np.full((len(keys), 2), 224, dtype=np.int32),
        "meta": np.asarray('{"extractor": "synthetic", "dim": %d}' % dim),
    }
    path = tmp_path / "feats.npz"
    save_npz(path, arrays)
    return ds, path, objs


def mirrored_copy(feat_path, out, meta=None, drop=0):
    """A copy of a features file that calls itself mirrored (``vsa embed --flip``; ``meta`` replaces that), its vectors
    negated; ``drop``: without its first ``drop`` images."""
    import json

    a = dict(np.load(feat_path))
    m = json.loads(str(a["meta"]))
    m.update(meta if meta is not None else {"flip": True})
    a["meta"] = np.array(json.dumps(m))
    a["feats"] = -a["feats"]
    if drop:
        n_img, n_rows, first = len(a["keys"]), len(a["feats"]), int(a["offsets"][drop])
        for k, v in a.items():
            if k == "offsets":
                a[k] = v[drop:] - first
            elif v.ndim and len(v) == n_rows:
                a[k] = v[first:]
            elif v.ndim and len(v) == n_img:
                a[k] = v[drop:]
    np.savez(out, **a)
    return out
