"""Scoring and search with a trained aligner: ``vsa score`` and ``vsa search``.

New photos go through the same pipeline as the training data: the detector (``vsa.regions``)
gives the whole image + top boxes, the CNN the aligner was trained on (named in its checkpoint)
embeds them the same way (warped crops or RoI pooling, as recorded in the features' ``meta``),
and the aligner maps regions and words into one space.

An *index* (``vsa search index``) is a features NPZ (docs/formats.md) plus ``emb``, the region
vectors ``[R, h]`` (float16) of the aligner, and ``paths``; it is built once per photo folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vsa.errors import VsaError


# ----------------------------------------------------------------------------- regions + features of new photos


def region_features(ex, meta: dict, im, regions: list[dict]) -> np.ndarray:
    """CNN features ``[R, D]`` of ``regions`` (dicts with ``box``, pixel xyxy) of one PIL image, made the
    way the training features were (``meta`` of the features / checkpoint: ``crop`` warp or roi, ``context``)."""
    import torch

    w, h = im.size
    context = float(meta.get("context") or 0.0)
    if meta.get("crop") == "roi":
        S = ex.input_size
        b = torch.tensor([[float(v) for v in r["box"]] for r in regions], dtype=torch.float32).reshape(-1, 4)
        if context:
            pad = (b[:, 2:] - b[:, :2]) * context
            b = torch.cat([b[:, :2] - pad, b[:, 2:] + pad], 1)
        b = (b * torch.tensor([S / w, S / h, S / w, S / h])).clamp(0, S)
        return ex.roi(ex.preprocess(im)[None], [b]).cpu().numpy().astype(np.float32)
    crops = []
    for r in regions:
        if r.get("label") == "image":
            crops.append(ex.preprocess(im))
        else:
            crops.append(ex.crop(im, r["box"], context))
    return ex(torch.stack(crops)).cpu().numpy().astype(np.float32)


@dataclass
class Photo:
    key: str
    path: str
    size: tuple[int, int]
    boxes: np.ndarray  # [R, 4] pixel xyxy, whole image first
    labels: list[str]
    scores: np.ndarray  # [R]
    feats: np.ndarray  # [R, D] float32


class PhotoEncoder:
    """Detector + CNN as the aligner's training features were made (lazy: loaded on first use).

    ``detector`` is a detector spec (:func:`vsa.regions.load_detector`) or an already loaded detector;
    ``extractor`` an already loaded :class:`vsa.features.Extractor` of the CNN ``extractor_meta`` names."""

    def __init__(self, extractor_meta: dict, detector=None, top: int = 19, device: str = "cpu", cnn_weights=None,
                 whole_only: bool = False, extractor=None):
        self.meta = dict(extractor_meta or {})
        loaded = hasattr(detector, "detect")
        self.detector_spec = None if loaded else detector
        self.top = top
        self.device = device
        self.cnn_weights = cnn_weights
        self.whole_only = whole_only
        self._det = detector if loaded else None
        self._ex = extractor

    @property
    def detector(self):
        if self._det is None:
            from vsa.regions import load_detector

            self._det = load_detector(self.detector_spec, self.device)
        return self._det

    @property
    def extractor(self):
        if self._ex is None:
            from vsa.features import load_extractor

            name = self.meta.get("extractor") or "efficientnet-lite0"
            self._ex = load_extractor(name, self.cnn_weights, self.device)
        return self._ex

    def detections(self, im) -> list[dict]:
        from vsa.regions import DetectOptions, whole_image_region

        w, h = im.size
        dets = [] if self.whole_only else self.detector.detect([im], DetectOptions(top=self.top))[0]
        return [whole_image_region(w, h)] + dets

    def features(self, im, regions: list[dict]) -> np.ndarray:
        return region_features(self.extractor, self.meta, im, regions)

    def encode(self, path, key: str | None = None) -> Photo:
        from vsa.images import open_image

        return self.encode_image(open_image(path), path, key)

    def encode_image(self, im, path, key: str | None = None) -> Photo:
        """An opened photo (PIL, upright RGB) -> its regions (whole image first) and their features."""
        regs = self.detections(im)
        feats = self.features(im, regs)
        return Photo(key or Path(path).name, str(path), im.size,
                     np.asarray([r["box"] for r in regs], dtype=np.float32).reshape(-1, 4),
                     [str(r.get("label", "")) for r in regs],
                     np.asarray([float(r.get("score", 1.0)) for r in regs], dtype=np.float32), feats)


def photo_from_store(store, key: str) -> Photo:
    """A photo whose regions and features are already in a features NPZ (e.g. Flickr8k test images)."""
    i = store.find(key)
    if i is None:
        raise VsaError(f"image {key!r} is not in the features file", store.path)
    k = store.keys[i]
    boxes = store.boxes(k)
    feats = store[k]
    labels = store.labels(k) or ["image"] + ["region"] * (len(feats) - 1)
    scores = store.scores(k)
    size = tuple(int(x) for x in store.sizes[i]) if store.sizes is not None else (0, 0)
    return Photo(k, k, size, boxes if boxes is not None else np.zeros((len(feats), 4), np.float32), labels,
                 scores if scores is not None else np.ones(len(feats), np.float32), feats)


# ----------------------------------------------------------------------------- score


def oov_words(aligner, tokens: list[str]) -> list[str]:
    """The distinct words of ``tokens`` the aligner's vocabulary lacks, in order: they carry no meaning of
    their own in a score (the model sees its unknown-word token)."""
    stoi = aligner.vocab.stoi
    return list(dict.fromkeys(t for t in tokens if t not in stoi))


def score_record(aligner, photo: Photo, sentence: str, tokens: list[str] | None = None) -> dict:
    """``{"image", "sentence", "tokens", "oov", "score", "words": [{word, known, region, box, label, dot}]}``.

    ``score`` is the image-sentence score ``S_kl`` of the aligner; each word's best region is the
    argmax of ``v_i . s_t`` over the photo's regions (brnn models only); ``oov`` lists the words that
    are not in the aligner's vocabulary.
    """
    from vsa.data import tokenize

    tokens = tokens if tokens is not None else tokenize(sentence)
    R = aligner.cfg.max_regions if aligner.cfg.model == "brnn" else 1
    feats = photo.feats[:R]
    rec = {"image": photo.path, "key": photo.key, "sentence": sentence, "tokens": tokens,
           "oov": oov_words(aligner, tokens), "score": round(aligner.score(feats, tokens), 4) if tokens else 0.0}
    if aligner.cfg.model == "brnn" and tokens:
        m = aligner.word_region_scores(feats, tokens)
        words = []
        for t, w in enumerate(tokens):
            i = int(m[t].argmax())
            words.append({"word": w, "known": w in aligner.vocab.stoi, "region": i,
                          "box": [round(float(v), 1) for v in photo.boxes[i]], "label": photo.labels[i],
                          "dot": round(float(m[t, i]), 4)})
        rec["words"] = words
    return rec


# ----------------------------------------------------------------------------- index


def model_fingerprint(aligner) -> str:
    import hashlib

    h = hashlib.sha1()
    for k, v in sorted(aligner.model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().numpy().tobytes()[:4096])
    return h.hexdigest()[:16]


def region_vectors(aligner, photos: list[Photo]) -> list[np.ndarray]:
    return [aligner.image_vectors(p.feats[: aligner.cfg.max_regions], full=True) for p in photos]


def save_index(path, aligner, photos: list[Photo], meta_extra: dict | None = None) -> None:
    from vsa.io import save_npz

    if not photos:
        raise VsaError("nothing to index: no photos")
    embs = region_vectors(aligner, photos)
    counts = [len(e) for e in embs]
    offsets = np.zeros(len(photos) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(p.feats) for p in photos])
    emb_offsets = np.zeros(len(photos) + 1, dtype=np.int64)
    emb_offsets[1:] = np.cumsum(counts)
    meta = dict(aligner.extractor_meta)
    meta.update({"index": "vsa-search", "model": str(aligner.path), "model_sha": model_fingerprint(aligner)})
    meta.update(meta_extra or {})
    save_npz(path, {
        "feats": np.concatenate([p.feats for p in photos]).astype(np.float16),
        "image_index": np.repeat(np.arange(len(photos), dtype=np.int32), [len(p.feats) for p in photos]),
        "offsets": offsets,
        "boxes": np.concatenate([p.boxes for p in photos]).astype(np.float32),
        "scores": np.concatenate([p.scores for p in photos]).astype(np.float32),
        "labels": np.asarray([lb for p in photos for lb in p.labels]),
        "keys": np.asarray([p.key for p in photos]),
        "paths": np.asarray([p.path for p in photos]),
        "sizes": np.asarray([p.size for p in photos], dtype=np.int32).reshape(-1, 2),
        "emb": np.concatenate(embs).astype(np.float16),
        "emb_offsets": emb_offsets,
        "meta": np.asarray(json.dumps(meta)),
    })


class Index:
    """A search index: photos, their regions and the aligner's region vectors."""

    def __init__(self, path):
        from vsa.featstore import FeatureStore
        from vsa.io import load_npz

        self.path = Path(path)
        a = load_npz(path, required=("feats", "offsets", "keys", "emb", "emb_offsets"))
        self.store = FeatureStore(path, arrays=a)
        self.emb = a["emb"].astype(np.float32)
        self.emb_offsets = a["emb_offsets"].astype(np.int64)
        self.paths = [str(p) for p in a["paths"]] if "paths" in a else list(self.store.keys)
        self.meta = self.store.meta

    def __len__(self) -> int:
        return len(self.store)

    def check_model(self, aligner) -> None:
        sha = self.meta.get("model_sha")
        if sha and sha != model_fingerprint(aligner):
            raise VsaError(f"the index was built with another model ({self.meta.get('model')}); rebuild it with "
                           "`vsa search index` or pass that --model", self.path)

    def padded(self):
        import torch

        n = len(self)
        counts = np.diff(self.emb_offsets)
        R = int(counts.max())
        V = torch.zeros(n, R, self.emb.shape[1])
        vm = torch.zeros(n, R, dtype=torch.bool)
        for i in range(n):
            a, b = self.emb_offsets[i], self.emb_offsets[i + 1]
            V[i, : b - a] = torch.from_numpy(self.emb[a:b])
            vm[i, : b - a] = True
        return V, vm

    def photo(self, i: int) -> Photo:
        p = photo_from_store(self.store, self.store.keys[i])
        p.path = self.paths[i]
        return p


def build_index(aligner, inputs, encoder: PhotoEncoder | None = None, store=None, keys=None, progress=None,
                skip_bad: bool = False, warn=None) -> list[Photo]:
    """Photos for an index: from image files (``inputs``: list of (path, key)) through ``encoder``,
    or from a features NPZ ``store`` (optionally only ``keys``)."""
    photos = []
    if store is not None:
        for k in keys or store.keys:
            photos.append(photo_from_store(store, k))
        return photos
    task = progress.add_task("index", total=len(inputs)) if progress is not None else None
    for path, key in inputs:
        try:
            photos.append(encoder.encode(path, key))
        except VsaError as e:
            if not skip_bad:
                raise
            if warn:
                warn(f"skipped: {e}")
        if progress is not None:
            progress.advance(task)
    return photos


def search_text(aligner, index: Index, query: str, k: int = 10) -> list[dict]:
    """The ``k`` best photos of ``index`` for a text query, each with its score and per-word best region."""
    import torch

    from vsa.data import tokenize

    tokens = tokenize(query)
    if not tokens:
        raise VsaError("the query has no words")
    V, vm = index.padded()
    ids, lengths = aligner.encode_tokens([tokens])
    with torch.inference_mode():
        S, sm = aligner.model.embed_sentences(ids, lengths)
        scores = aligner.model.score(V, vm, S, sm)[:, 0].float().numpy()
    order = np.argsort(-scores, kind="stable")[:k]
    oov = oov_words(aligner, tokens)
    out = []
    for rank, i in enumerate(order, 1):
        rec = {"rank": rank, "key": index.store.keys[i], "path": index.paths[i], "score": round(float(scores[i]), 4),
               "oov": oov}
        if aligner.cfg.model == "brnn":
            a, b = index.emb_offsets[i], index.emb_offsets[i + 1]
            h = getattr(aligner.model, "region_dim", S.shape[-1])  # word-region dots use the region channels only
            m = S[0][sm[0]][:, :h].float().numpy() @ index.emb[a:b, :h].T  # [T, R]
            boxes, labels = index.store.boxes(index.store.keys[i]), index.store.labels(index.store.keys[i])
            rec["words"] = [{"word": w, "region": int(m[t].argmax()), "label": labels[int(m[t].argmax())] if labels else "",
                             "box": [round(float(v), 1) for v in boxes[int(m[t].argmax())]] if boxes is not None else None}
                            for t, w in enumerate(tokens)]
        out.append(rec)
    return out


def read_corpus(path) -> list[str]:
    """Sentences, one per line, from a text file (or stdin with "-")."""
    from vsa.io import text_stream_lines

    return [ln.strip() for ln in text_stream_lines(path) if ln.strip()]


def search_sentences(aligner, photo: Photo, sentences: list[str], k: int = 10, batch: int = 1000) -> list[dict]:
    """The ``k`` sentences of a corpus that best describe ``photo``."""
    import torch

    from vsa.align import pad_regions
    from vsa.data import tokenize

    if not sentences:
        raise VsaError("the sentence corpus is empty")
    toks = [tokenize(s) for s in sentences]
    feats, mask = pad_regions([photo.feats[: aligner.cfg.max_regions]])
    scores = np.empty(len(sentences), dtype=np.float32)
    with torch.inference_mode():
        V, vm = aligner.model.embed_images(feats, mask)
        for a in range(0, len(toks), batch):
            ids, lengths = aligner.encode_tokens(toks[a : a + batch])
            S, sm = aligner.model.embed_sentences(ids, lengths)
            scores[a : a + len(ids)] = aligner.model.score(V, vm, S, sm)[0].float().numpy()
    order = np.argsort(-scores, kind="stable")[:k]
    return [{"rank": r, "sentence": sentences[j], "line": int(j) + 1, "score": round(float(scores[j]), 4),
             "oov": oov_words(aligner, toks[j])} for r, j in enumerate(order, 1)]
