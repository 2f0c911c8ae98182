"""Scoring and search with a trained aligner: ``vsa score`` and ``vsa search``.

New photos go through the one featurisation path (:mod:`vsa.features.featuriser`), as the aligner's training features
were made: the whole image + the detector's top boxes (when those features came from boxes), embedded by the
CNN the aligner was trained on with its crop mode (all named in the checkpoint's ``extractor`` meta); the
aligner then maps regions and words into one space.

An *index* (``vsa search index``) is a features NPZ (docs/formats.md) plus ``emb``, the region vectors
``[R, h]`` (float16) of the aligner, and ``paths``; it is built once per photo folder, written and read by
:mod:`vsa.features.store` (:func:`~vsa.features.store.save_features`, :func:`~vsa.features.store.load_features`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from vsa.errors import VsaError


# ----------------------------------------------------------------------------- regions + features of new photos


@dataclass
class Photo:
    key: str
    path: str
    size: tuple[int, int]
    boxes: np.ndarray  # [R, 4] pixel xyxy, whole image first
    labels: list[str]
    scores: np.ndarray  # [R]
    feats: np.ndarray  # [R, D] float32

    def record(self) -> dict:
        """The image record :func:`vsa.features.store.save_features` takes."""
        return {"key": self.key, "size": self.size, "feats": self.feats, "boxes": self.boxes, "scores": self.scores,
                "labels": self.labels}


class PhotoEncoder:
    """Photos -> :class:`Photo` (regions + features) as the aligner's training features were made: the one
    featurisation path, :class:`vsa.features.featuriser.Featuriser` (detector and CNN loaded on first use).

    ``detector`` is a detector spec (:func:`vsa.regions.load_detector`) or an already loaded detector, used
    only when the features ``extractor_meta`` describes came from detector boxes; ``extractor`` an already
    loaded :class:`vsa.features.cnn.Extractor` of the CNN ``extractor_meta`` names."""

    def __init__(self, extractor_meta: dict, detector=None, top: int = 19, device: str = "cpu", cnn_weights=None,
                 whole_only: bool = False, extractor=None, jit: bool = True):
        from vsa.features.featuriser import Featuriser

        self.featuriser = Featuriser(extractor_meta, detector, extractor=extractor, top=top, device=device,
                                     cnn_weights=cnn_weights, whole_only=whole_only, jit=jit)
        self.meta = self.featuriser.meta

    @property
    def extractor(self):
        return self.featuriser.extractor

    def encode(self, path, key: str | None = None, max_pixels: int | None = None) -> Photo:
        from vsa.images import open_image

        return self.encode_image(open_image(path, max_pixels), path, key)

    def encode_image(self, im, path, key: str | None = None) -> Photo:
        """An opened photo (PIL, upright RGB) -> its regions (whole image first) and their features."""
        regs, feats = self.featuriser.encode(im)
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
    if not np.isfinite(feats).all():
        raise VsaError(f"the features of {k!r} hold NaN or infinite values", store.path)
    labels = store.labels(k) or ["image"] + ["region"] * (len(feats) - 1)
    scores = store.scores(k)
    size = tuple(int(x) for x in store.sizes[i]) if store.sizes is not None else (0, 0)
    return Photo(k, k, size, boxes if boxes is not None else np.zeros((len(feats), 4), np.float32), labels,
                 scores if scores is not None else np.ones(len(feats), np.float32), feats)


# ----------------------------------------------------------------------------- score


def oov_words(aligner, tokens: list[str]) -> list[str]:
    """The distinct words of ``tokens`` the aligner's vocabulary lacks, in order: the model reads each as its
    alias (``aligner.read_as``) where it has one, else as its unknown-word token."""
    stoi = aligner.vocab.stoi
    return list(dict.fromkeys(t for t in tokens if t not in stoi))


def score_record(aligner, photo: Photo, sentence: str, tokens: list[str] | None = None) -> dict:
    """``{"image", "sentence", "tokens", "oov", "read_as", "score", "words": [{word, known, region, box, label, dot}]}``.

    ``score`` is the image-sentence score ``S_kl`` of the aligner; each word's best region is the
    argmax of ``v_i . s_t`` over the photo's regions, image cells excepted (brnn models only); ``oov`` lists the words that
    are not in the aligner's vocabulary, ``read_as`` those of them read as a known word (``{word: alias}``).
    A sentence without words (empty, or punctuation only) is an error, as a query is in :func:`search_text`; so is a
    score that is NaN or infinite.
    """
    from vsa.data import tokenize

    from vsa.alignment.model import region_rows
    from vsa.alignment.mrf import grounding_mask

    tokens = tokens if tokens is not None else tokenize(sentence)
    if not tokens:
        raise VsaError("the sentence has no words")
    R = region_rows(aligner.cfg) if aligner.cfg.model == "brnn" else 1
    feats = photo.feats[:R]
    if not np.isfinite(feats).all():
        raise VsaError("the photo's features hold NaN or infinite values", photo.path)
    score = aligner.score(feats, tokens)
    if not np.isfinite(score):
        raise VsaError(f"the score is {score}: the aligner's weights hold NaN or infinite values", aligner.path)
    rec = {"image": photo.path, "key": photo.key, "sentence": sentence, "tokens": tokens,
           "oov": oov_words(aligner, tokens), "read_as": aligner.read_as(tokens), "score": round(score, 4)}
    if aligner.cfg.model == "brnn":
        m = aligner.word_region_scores(feats, tokens)
        cells = grounding_mask(photo.labels[: m.shape[1]])
        words = []
        for t, w in enumerate(tokens):
            i = int(np.where(cells, -np.inf, m[t]).argmax())
            words.append({"word": w, "known": w in aligner.vocab.stoi, "region": i,
                          "box": [round(float(v), 1) for v in photo.boxes[i]], "label": photo.labels[i],
                          "dot": round(float(m[t, i]), 4)})
        rec["words"] = words
    return rec


class PhotoCache:
    """Photos by path (or, with a features NPZ ``store``, by image key) -> :class:`Photo`, remembering the
    last one: consecutive pairs of one photo detect and embed it once. Photos not in a store go through
    ``encoder`` (``max_pixels``: :func:`vsa.images.open_image`'s limit)."""

    def __init__(self, encoder: PhotoEncoder | None = None, store=None, max_pixels: int | None = None):
        self.encoder, self.store, self.max_pixels = encoder, store, max_pixels
        self._last: dict = {}

    def __call__(self, image: str) -> Photo:
        if image not in self._last:
            self._last.clear()
            self._last[image] = (photo_from_store(self.store, image) if self.store is not None
                                 else self.encoder.encode(image, max_pixels=self.max_pixels))
        return self._last[image]


def score_photo(aligner, encoder: PhotoEncoder | None, image: str, sentence: str, store=None,
                max_pixels: int | None = None) -> dict:
    """:func:`score_record` of one photo file (or, with a features NPZ ``store``, image key) and a sentence."""
    return score_record(aligner, PhotoCache(encoder, store, max_pixels)(image), sentence)


def score_pairs(aligner, encoder: PhotoEncoder | None, pairs, store=None, skip_bad: bool = False, warn=None,
                max_pixels: int | None = None, source: str = "<stdin>") -> Iterator[tuple[int, dict]]:
    """Score JSONL pairs: ``pairs`` are ``(line, {"image", "sentence"})`` as :func:`vsa.io.iter_jsonl` yields
    them with ``with_lineno`` (the photo may also be named by ``path`` or ``key``); yields ``(line, record)``
    with :func:`score_record`'s record. Photos come from ``store`` by key when given, else through ``encoder``;
    consecutive pairs of one photo detect and embed it once (:class:`PhotoCache`). A line without string
    fields or an unreadable photo is an error naming ``source`` and the line, unless ``skip_bad`` (then it is
    reported through ``warn`` and skipped)."""
    photo = PhotoCache(encoder, store, max_pixels)
    for line, obj in pairs:
        img, sent = obj.get("image") or obj.get("path") or obj.get("key"), obj.get("sentence")
        try:
            if not isinstance(img, str) or not isinstance(sent, str):
                raise VsaError("each line needs string fields 'image' and 'sentence'", source, line)
            try:
                rec = score_record(aligner, photo(img), sent)
            except VsaError as e:
                if e.path is not None:
                    raise
                raise VsaError(e.reason, source, line) from None  # the line's own fault: say which line
        except VsaError as e:
            if not skip_bad:
                raise
            if warn:
                warn(str(e))
            continue
        yield line, rec


# ----------------------------------------------------------------------------- index


def model_fingerprint(aligner) -> str:
    import hashlib

    h = hashlib.sha1()
    for k, v in sorted(aligner.model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().numpy().tobytes()[:4096])
    return h.hexdigest()[:16]


def region_vectors(aligner, photos: list[Photo]) -> list[np.ndarray]:
    from vsa.alignment.model import region_rows

    return [aligner.image_vectors(p.feats[: region_rows(aligner.cfg)], full=True) for p in photos]


def photo_hubs(aligner, emb: list[np.ndarray], k: int, photos_per_chunk: int = 2000, batch: int = 250) -> np.ndarray:
    """Each photo's hubness term for ``vsa search``: the mean of its ``k`` best scores against the aligner's bank of
    training sentences (``aligner.bank``, :class:`vsa.retrieval.IndexHubnessConfig`), from its region vectors
    ``emb`` (one ``[E_n, h]`` array per photo, rounded to float16 as the index stores them)."""
    import torch

    from vsa.retrieval import bank_means

    if not aligner.bank:
        raise VsaError("the aligner has no bank of training sentences (re-export it with --bank DATASET)", aligner.path)
    sents = []
    with torch.inference_mode():
        for a in range(0, len(aligner.bank), batch):
            sents.append(aligner.model.embed_sentences(*aligner.encode_tokens(aligner.bank[a : a + batch])))
        out = []
        for c in range(0, len(emb), photos_per_chunk):
            part = emb[c : c + photos_per_chunk]
            V = torch.from_numpy(np.concatenate(part).astype(np.float16).astype(np.float32))
            reg_img = torch.from_numpy(np.repeat(np.arange(len(part), dtype=np.int64), [len(e) for e in part]))
            scores = np.concatenate([aligner.model.flat_score(V, reg_img, len(part), S, sm).float().numpy()
                                     for S, sm in sents], axis=1)
            out.append(bank_means(scores, k, 1))
    return np.concatenate(out).astype(np.float32)


def save_index(path, aligner, photos: list[Photo], meta_extra: dict | None = None) -> None:
    """Write the search index of ``photos`` (docs/formats.md, "Search index NPZ": a features NPZ plus the
    aligner's region vectors, and each photo's hubness term when the aligner has a bank of training sentences)
    with :func:`vsa.features.store.save_features`."""
    from vsa.features.store import save_features
    from vsa.retrieval import IndexHubnessConfig

    if not photos:
        raise VsaError("nothing to index: no photos")
    meta = dict(aligner.extractor_meta)
    meta.update({"index": "vsa-search", "model": str(aligner.path), "model_sha": model_fingerprint(aligner)})
    emb, hub = region_vectors(aligner, photos), None
    if aligner.bank:
        cfg = IndexHubnessConfig()
        hub = photo_hubs(aligner, emb, cfg.k)
        meta["hubness"] = {"k": cfg.k, "weight": cfg.weight, "bank": len(aligner.bank)}
    meta.update(meta_extra or {})
    h, glob = aligner.model.region_dim, None
    if emb[0].shape[1] > h:  # a global branch's image vector sits in row 0's extra channels only
        glob = np.stack([e[0, h:] for e in emb])
        emb = [e[:, :h] for e in emb]
    save_features(path, [p.record() for p in photos], "float16", meta, emb=emb, paths=[p.path for p in photos],
                  hub=hub, emb_global=glob)


class Index:
    """A search index: photos, their regions and the aligner's region vectors."""

    def __init__(self, path):
        from vsa.features.store import INDEX, load_features

        self.path = Path(path)
        self.store = load_features(path, required=INDEX)
        self.emb = self.store.emb
        self.emb_offsets = self.store.emb_offsets
        self.paths = self.store.paths or list(self.store.keys)
        self.meta = self.store.meta
        self._flat = None  # flat()'s tensors, made on first use

    def __len__(self) -> int:
        return len(self.store)

    def check_model(self, aligner) -> None:
        sha = self.meta.get("model_sha")
        if sha and sha != model_fingerprint(aligner):
            raise VsaError(f"the index was built with another model ({self.meta.get('model')}); rebuild it with "
                           "`vsa search index` or pass that --model", self.path)

    def flat(self, h: int | None = None):
        """The region vectors of every photo unpadded, as torch tensors, made once per index:
        ``(V [Nr, h] float32, image of each row [Nr], G)`` (what the aligner's ``flat_score`` takes). ``h``: the
        aligner's region channels (``region_dim``) when its vectors have more (a global branch's): V then holds only
        those, and G ``[photos, g]`` the global branch's image vectors (the index's ``emb_global``; in an index without
        it, row 0's extra channels), else G is None."""
        import torch

        if self._flat is None or self._flat[3] != h:
            off = np.asarray(self.emb_offsets, dtype=np.int64)
            emb, G = np.asarray(self.emb), None
            if self.store.emb_global is not None:  # the global branch's image vectors, written apart
                G = torch.from_numpy(self.store.emb_global)
            elif h is not None and h < emb.shape[1]:  # an index without them: the branch's channels on every row
                G = torch.from_numpy(emb[off[:-1], h:].astype(np.float32))
                emb = emb[:, :h]
            V = torch.from_numpy(np.ascontiguousarray(emb, dtype=np.float32))
            reg_img = torch.from_numpy(np.repeat(np.arange(len(self), dtype=np.int64), np.diff(off)))
            self._flat = (V, reg_img, G, h)
        return self._flat[:3]

    def photo(self, i: int) -> Photo:
        p = photo_from_store(self.store, self.store.keys[i])
        p.path = self.paths[i]
        return p

    def find_photo(self, key: str, aligner) -> Photo | None:
        """The indexed photo of this image key (or path), None when the index lacks it; the index must have
        been built with ``aligner`` (:meth:`check_model`)."""
        i = self.store.find(key)
        if i is None:
            return None
        self.check_model(aligner)
        return self.photo(i)


def index_inputs(photos) -> list[tuple[str, str]]:
    """The ``(path, key)`` of every image among ``photos`` (files and/or folders, searched recursively:
    :func:`vsa.images.find_images`); none given or none found is an error."""
    from vsa.images import find_images

    if not photos:
        raise VsaError("no photos given: pass files or folders (or --features NPZ)")
    inputs = find_images(photos)
    if not inputs:
        raise VsaError("no images found in " + ", ".join(map(str, photos)))
    return [(str(p), k) for p, k in inputs]


def index_keys(store, dataset=None, split: str | None = None, skip_missing: bool = False, warn=None) -> list[str] | None:
    """Which images of a features NPZ ``store`` an index holds: None (all of them) without ``dataset``, else
    the images of ``dataset``'s ``split`` (all its images without ``split``) that have features; a dataset
    image without features is an error unless ``skip_missing`` (then ``warn`` says so)."""
    if dataset is None:
        return None
    recs = dataset.split(split) if split else dataset.images
    return [r.key for r in store.check_dataset(recs, skip_missing=skip_missing, warn=warn)]


def build_index(aligner, inputs, encoder: PhotoEncoder | None = None, store=None, keys=None, progress=None,
                skip_bad: bool = False, warn=None, max_pixels: int | None = None, dataset=None,
                split: str | None = None) -> list[Photo]:
    """Photos for an index: from image files (``inputs``: list of (path, key), e.g. :func:`index_inputs`)
    through ``encoder`` (``max_pixels``: :func:`vsa.images.open_image`'s limit), or from a features NPZ
    ``store``: only ``keys`` when given, else those of ``dataset`` / ``split`` (:func:`index_keys`, a missing
    image skipped with ``skip_bad``), else all."""
    photos = []
    if store is not None:
        if keys is None:
            keys = index_keys(store, dataset, split, skip_missing=skip_bad, warn=warn)
        for k in keys or store.keys:
            photos.append(photo_from_store(store, k))
        return photos
    task = progress.add_task("index", total=len(inputs)) if progress is not None else None
    for path, key in inputs:
        try:
            photos.append(encoder.encode(path, key, max_pixels))
        except VsaError as e:
            if not skip_bad:
                raise
            if warn:
                warn(f"skipped: {e}")
        if progress is not None:
            progress.advance(task)
    return photos


def search_text(aligner, index: Index, query: str, k: int = 10, hubness: bool = True) -> list[dict]:
    """The ``k`` best photos of ``index`` for a text query, each with its score and per-word best region. An index
    with hubness terms (:func:`photo_hubs`) ranks by ``aligner score - weight x hub`` (``score``; the aligner's own
    in ``aligner_score``) unless ``hubness`` is False."""
    import torch

    from vsa.data import tokenize

    tokens = tokenize(query)
    if not tokens:
        raise VsaError("the query has no words")
    V, reg_img, G = index.flat(aligner.model.region_dim)
    ids, lengths = aligner.encode_tokens([tokens])
    with torch.inference_mode():
        S, sm = aligner.model.embed_sentences(ids, lengths)
        raw = aligner.model.flat_score(V, reg_img, len(index), S, sm, G)[:, 0].float().numpy()
    if not torch.isfinite(S).all():
        raise VsaError("the query's vectors hold NaN or infinite values: the aligner's weights do", aligner.path)
    hub = index.store.hub if hubness else None
    scores = raw if hub is None else raw - float(index.meta["hubness"]["weight"]) * hub
    bad = np.flatnonzero(~np.isfinite(scores))
    if len(bad):  # NaN would sort as the worst photo, hiding a broken index
        raise VsaError(f"the index's vectors or hubness terms of {index.store.keys[bad[0]]!r} (and {len(bad) - 1} "
                       "other photos) hold NaN or infinite values: rebuild it", index.path)
    order = np.argsort(-scores, kind="stable")[:k]
    oov, read_as = oov_words(aligner, tokens), aligner.read_as(tokens)
    out = []
    for rank, i in enumerate(order, 1):
        rec = {"rank": rank, "key": index.store.keys[i], "path": index.paths[i], "score": round(float(scores[i]), 4),
               "oov": oov, "read_as": read_as}
        if hub is not None:
            rec.update(aligner_score=round(float(raw[i]), 4), hub=round(float(hub[i]), 4))
        if aligner.cfg.model == "brnn":
            a, b = index.emb_offsets[i], index.emb_offsets[i + 1]
            h = aligner.model.region_dim  # word-region dots use the region channels only
            m = S[0][sm[0]][:, :h].float().numpy() @ index.emb[a:b, :h].T  # [T, R]
            boxes, labels = index.store.boxes(index.store.keys[i]), index.store.labels(index.store.keys[i])
            rec["words"] = [{"word": w, "region": int(m[t].argmax()), "label": labels[int(m[t].argmax())] if labels else "",
                             "box": [round(float(v), 1) for v in boxes[int(m[t].argmax())]] if boxes is not None else None}
                            for t, w in enumerate(tokens)]
        out.append(rec)
    return out


def rerank_hits(hits: list[dict], logp, k: int = 10, weight: float | None = None) -> list[dict]:
    """:func:`search_text`'s candidates ``hits`` (best first) re-ordered by the aligner's score and the generator's
    ``logp`` of the query under each photo, both standardised over the list (:func:`vsa.rerank.combine`; in search
    the query is fixed, so its PMI orders the photos as ``log p(query | photo)`` does); the ``k`` best, ranks
    renumbered, each with ``logp``, ``rerank`` (the combined score) and ``aligner_rank``."""
    from vsa.rerank import RerankConfig, combine

    c = combine([h["score"] for h in hits], logp, RerankConfig.weight if weight is None else weight)
    out = []
    for r, i in enumerate(np.argsort(-c, kind="stable")[:k], 1):
        out.append({**hits[i], "rank": r, "aligner_rank": hits[i]["rank"], "logp": round(float(logp[i]), 3),
                    "rerank": round(float(c[i]), 4)})
    return out


def rerank_text(hits: list[dict], query: str, generator, store=None, k: int = 10, weight: float | None = None,
                max_pixels: int | None = None) -> list[dict]:
    """Re-rank :func:`search_text`'s candidates ``hits`` for ``query`` with a caption generator
    (:class:`vsa.generator.captioner.Captioner`): ``log p(query | photo)`` by teacher forcing on the generator's inputs of
    each photo, from ``store`` (a features NPZ made with the generator's CNN, looked up by the photo's key) or
    else made from the photo file (``max_pixels``: :func:`vsa.images.open_image`'s limit); then
    :func:`rerank_hits`."""
    import torch

    from vsa.data import tokenize
    from vsa.generator.model import region_rows, uses_regions
    from vsa.rerank import query_logprobs

    if not hits:
        return []
    cfg = generator.model.cfg
    if store is not None:
        from vsa.rerank import check_generator_features
        from vsa.splits import split_features

        check_generator_features(generator.extractor_meta, cfg.feat_dim, store)
        keys = []
        for h in hits:
            i = store.find(h["key"])
            if i is None:
                raise VsaError(f"photo {h['key']!r} is not in the features file", store.path)
            keys.append(store.keys[i])
        feats, mask = split_features(store, keys, uses_regions(cfg), region_rows(cfg))
    else:
        from vsa.images import open_image

        prepared = []
        for h in hits:
            if not Path(h["path"]).is_file():
                raise VsaError(f"photo {h['path']!r} is not a file: re-ranking reads each candidate photo; pass "
                               "--rerank-features with the generator's features of the indexed images")
            prepared.append(generator.featuriser.prepare(open_image(h["path"], max_pixels)))
        feats, mask = generator.featurise(prepared)
        feats, mask = torch.as_tensor(feats, dtype=torch.float32), None if mask is None else torch.as_tensor(mask)

    def feats_of(images):
        return feats[images], None if mask is None else mask[images]

    logp = query_logprobs(generator.model, generator.vocab, tokenize(query), feats_of, len(hits))
    return rerank_hits(hits, logp, k, weight)


def read_corpus(path) -> list[str]:
    """Sentences, one per line, from a text file (or stdin with "-")."""
    from vsa.io import text_stream_lines

    return [ln.strip() for ln in text_stream_lines(path) if ln.strip()]


def search_sentences(aligner, photo: Photo, sentences: list[str], k: int = 10, batch: int = 1000,
                     hubness: bool = True) -> list[dict]:
    """The ``k`` sentences of a corpus that best describe ``photo``. An aligner with an image bank
    (:class:`vsa.retrieval.SentenceHubnessConfig`) ranks by ``score - weight x hub`` (the aligner's own score in
    ``aligner_score``, each sentence's mean of its ``k`` best scores against the bank in ``hub``) unless ``hubness``
    is False."""
    import torch

    from vsa.data import tokenize
    from vsa.features.store import pad_regions
    from vsa.retrieval import SentenceHubnessConfig, bank_means

    hcfg = SentenceHubnessConfig()
    bank = aligner.image_bank if hubness else None

    if not sentences:
        raise VsaError("the sentence corpus is empty")
    toks = [tokenize(s) for s in sentences]
    from vsa.alignment.model import region_rows

    feats, mask = pad_regions([photo.feats], max_regions=region_rows(aligner.cfg))
    if not torch.isfinite(feats).all():
        raise VsaError("the photo's features hold NaN or infinite values", photo.path)
    raw = np.empty(len(sentences), dtype=np.float32)
    hub = np.zeros(len(sentences), dtype=np.float32) if bank is not None else None
    dev = aligner.device
    if bank is not None:
        Vb, reg_img = bank[0].to(dev), bank[1].to(dev)
        n_bank = int(reg_img[-1]) + 1
    with torch.inference_mode():
        V, vm = aligner.model.embed_images(feats.to(dev), mask.to(dev))
        # batches of sentences of like length: one very long line pads only its own batch
        by_len = np.argsort([len(t) for t in toks], kind="stable")
        for a in range(0, len(toks), batch):
            part = by_len[a : a + batch]
            ids, lengths = aligner.encode_tokens([toks[j] for j in part])
            S, sm = aligner.model.embed_sentences(ids.to(dev), lengths.to(dev))
            raw[part] = aligner.model.score(V, vm, S, sm)[0].float().cpu().numpy()
            if hub is not None:
                hub[part] = bank_means(aligner.model.flat_score(Vb, reg_img, n_bank, S, sm).float().cpu().numpy(),
                                       hcfg.k, 0)
    scores = raw if hub is None else raw - hcfg.weight * hub
    if not np.isfinite(scores).all():  # NaN would sort as the worst sentence, hiding a broken model
        raise VsaError("the scores hold NaN or infinite values: the aligner's weights (or its image bank) do",
                       aligner.path)
    order = np.argsort(-scores, kind="stable")[:k]
    out = []
    for r, j in enumerate(order, 1):
        rec = {"rank": r, "sentence": sentences[j], "line": int(j) + 1, "score": round(float(scores[j]), 4)}
        if hub is not None:
            rec.update(aligner_score=round(float(raw[j]), 4), hub=round(float(hub[j]), 4))
        out.append({**rec, "oov": oov_words(aligner, toks[j]), "read_as": aligner.read_as(toks[j])})
    return out


# ----------------------------------------------------------------------------- how tables name regions

CELL_PLACES = ("top-left", "top", "top-right", "left", "centre", "right", "bottom-left", "bottom", "bottom-right")


def region_names(labels: list[str]) -> list[str]:
    """How a table names each region of a photo (its ``labels``, whole image first): ``whole image``; a detector
    box by class and rank among the boxes, ``dog #2``; an image cell (``vsa embed --cells``, label ``cell``) or a
    grid cell (``--crop grid``, label ``grid``) by its place, ``top-left cell`` in a 3 x 3 grid, else ``cell
    row 2, col 5`` (cells are row-major after the boxes)."""
    import math

    names: list[str] = []
    cells = {kind: [i for i, lab in enumerate(labels) if str(lab) == kind] for kind in ("cell", "grid")}
    for i, lab in enumerate(labels):
        lab = str(lab)
        if lab == "image" or (i == 0 and lab in ("", "region")):
            names.append("whole image")
        elif lab in cells:
            at = cells[lab]
            g = math.isqrt(len(at))
            k = at.index(i)
            if g * g != len(at):
                names.append(f"{lab} {k + 1}")
            elif g == 3:
                names.append(f"{CELL_PLACES[k]} {lab}")
            else:
                names.append(f"{lab} row {k // g + 1}, col {k % g + 1}")
        else:
            names.append(f"{lab or 'region'} #{i}")
    return names


def region_name(label, region) -> str:
    """A region named from its own record alone: ``whole image``, else ``<label> #<region>`` (``dog #2``)."""
    label = str(label or "")
    return "whole image" if label == "image" else f"{label or 'region'} #{region}"


def words_by_region(words: list[dict], names: list[str] | None = None) -> str:
    """A sentence's words and their best regions, runs of words on one region together:
    ``a dog -> dog #1; runs through the grass -> bottom cell``. ``names``: :func:`region_names` of the photo
    (default: each word's own ``label`` and ``region``)."""
    runs: list[tuple[str, list[str]]] = []
    for w in words:
        r = w.get("region")
        if names is not None and isinstance(r, int) and 0 <= r < len(names):
            name = names[r]
        else:
            name = region_name(w.get("label"), r)
        if runs and runs[-1][0] == name:
            runs[-1][1].append(str(w["word"]))
        else:
            runs.append((name, [str(w["word"])]))
    return "; ".join(f"{' '.join(ws)} -> {name}" for name, ws in runs)
