"""One split of a caption dataset as the models read it: features + encoded sentences.

Shared by training and evaluation (``vsa train-align`` / ``vsa eval`` for the aligner, ``vsa train-mrnn`` /
``vsa eval`` for the generator), so neither imports the other's internals.

* :class:`RetrievalSplit` (:func:`retrieval_split`): every image's padded regions (read on demand from a
  memory-mapped store) and every sentence's word ids, with the image each sentence belongs to.
* :class:`CaptionSplit` (:func:`caption_split`, :func:`snippet_split`): the generator's items (images, or
  (image, region) pairs for region captions), their features, the training sentences and the references.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vsa.errors import VsaError


@dataclass
class RetrievalSplit:
    keys: list[str]
    feats: "RegionBank"  # [N, R, D] float32 on indexing, read from the (memory-mapped) store
    rmask: torch.Tensor  # [N, R] bool
    ids: torch.Tensor  # [M, T] int64
    lengths: torch.Tensor  # [M]
    sent_image: torch.Tensor  # [M] index of each sentence's image
    sentids: list[int]
    flipped: "RegionBank | None" = None  # the images' mirrored features (`vsa embed --flip`), feats' layout; training only


def retrieval_split(ds, split: str, store, vocab, max_regions: int, max_len: int, limit: int = 0, warn=None,
                    skip_missing: bool = False) -> RetrievalSplit:
    """Region features (at most ``max_regions`` per image, read on demand) and encoded sentences (cut at
    ``max_len`` words) of one split; images without features: error, or skipped with a warning when
    ``skip_missing``."""
    from vsa.alignment.model import pad_ids
    from vsa.features.store import RegionBank

    recs = [r for r in ds.split(split) if r.sentences]
    recs = store.check_dataset(recs, skip_missing=skip_missing, warn=warn)
    if limit:
        recs = recs[:limit]
    if not recs:
        raise VsaError(f"split {split!r} has no images with sentences", ds.source)
    feats = RegionBank(store, [r.key for r in recs], max_regions)
    seqs, owner, sentids = [], [], []
    for i, r in enumerate(recs):
        for s in r.sentences:
            seqs.append(vocab.encode(s.tokens))
            owner.append(i)
            sentids.append(s.sentid)
    ids, lengths = pad_ids(seqs, max_len)
    return RetrievalSplit([r.key for r in recs], feats, feats.mask, ids, lengths, torch.tensor(owner), sentids)


@dataclass
class CaptionSplit:
    """Inputs of one split for the generator: features per item, training sentences and references per item."""

    feats: torch.Tensor  # [M, D] or [M, R, D]
    mask: torch.Tensor | None  # [M, R] for regions
    sents: list[tuple[int, list[int]]]  # (item index, word ids) pairs
    refs: list[list[str]]  # reference sentences (raw text) per item
    ref_tokens: list[list[list[str]]]  # tokenised references per item
    items: list  # ImageRecord per item (or (key, region) pairs for region training)
    flipped: torch.Tensor | None = None  # the items' mirrored features (`vsa embed --flip`), feats' shape; training only


def stack_regions(store, keys: list[str], max_regions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded float32 ``[N, R, D]`` regions (whole image first) and mask ``[N, R]`` of ``keys``, R = the most
    regions any of them has, at most ``max_regions`` (:func:`vsa.features.store.pad_regions`)."""
    from vsa.features.store import pad_regions

    return pad_regions(store, keys, max_regions)


def split_features(store, keys: list[str], regions: bool, max_regions: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The generator's inputs of ``keys``: padded regions and mask with ``regions``, else whole-image ``[N, D]``
    features and no mask."""
    if regions:
        return stack_regions(store, keys, max_regions)
    return torch.from_numpy(np.stack([store.whole(k) for k in keys])), None


def caption_split(ds, store, split: str, vocab, max_len: int, regions: bool = False, max_regions: int = 64,
                  skip_missing: bool = False, warn=None) -> CaptionSplit:
    """The images of ``split``: whole-image features (or padded regions with ``regions``), sentences cut at
    ``max_len`` words, references."""
    recs = ds.split(split)
    if not recs:
        raise VsaError(f"split {split!r} has no images", ds.source)
    recs = store.check_dataset(recs, skip_missing=skip_missing, warn=warn)
    feats, mask = split_features(store, [r.key for r in recs], regions, max_regions)
    sents = []
    for i, r in enumerate(recs):
        for s in r.sentences:
            if s.tokens:
                sents.append((i, vocab.encode(s.tokens[:max_len])))
    refs = [[s.raw for s in r.sentences] for r in recs]
    ref_tokens = [[s.tokens for s in r.sentences] for r in recs]
    return CaptionSplit(feats, mask, sents, refs, ref_tokens, recs)


def snippet_split(records: list[dict], store, split: str, vocab, max_len: int, source="alignments") -> CaptionSplit:
    """(region feature, snippet) pairs from alignments JSONL records of ``split`` (``vsa align``); a malformed
    record is a one-line error naming ``source`` and its line (:func:`vsa.alignment.snippets.check_alignment_record`)."""
    from vsa.alignment.snippets import check_alignment_record

    index: dict[tuple[str, int], int] = {}
    feats, sents, refs, toks, items = [], [], [], [], []
    for ln, rec in enumerate(records, 1):
        key = check_alignment_record(rec, source, ln)["key"]
        if rec.get("split", "train") != split:
            continue
        if key not in store:
            raise VsaError(f"image {key!r} is not in the features file {store.path}", source, ln)
        regs = store[key]
        for sn in rec["snippets"]:
            words = rec["tokens"][sn["start"] : sn["end"]]
            r = int(sn["region"])
            if not words or not 0 <= r < len(regs):
                continue
            j = index.get((key, r))
            if j is None:
                j = index[(key, r)] = len(feats)
                feats.append(regs[r])
                refs.append([])
                toks.append([])
                items.append((key, r))
            sents.append((j, vocab.encode(words[:max_len])))
            refs[j].append(" ".join(words))
            toks[j].append(list(words))
    if not feats:
        raise VsaError(f"no {split} snippets in the alignments", source)
    return CaptionSplit(torch.from_numpy(np.stack(feats)), None, sents, refs, toks, items)
