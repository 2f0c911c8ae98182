"""Photo -> caption: the pipeline behind ``vsa caption``.

A photo is featurised exactly as the training features were made (the checkpoint names
the extractor and its settings: for the shipped model EfficientNet-Lite2, whole image squashed to 260x260),
then decoded with the generator.  Without ``model`` the Flickr8k model shipped in
``vsa/assets`` is used, so captioning works offline right after install.  No detector
code is imported unless region captions or grounded captions are asked for.  A grounded caption
(``ground``) is cut into snippets on the photo's boxes by an aligner, as ``vsa align`` cuts dataset
sentences (:func:`vsa.alignment.snippets.ground_sentence`), on region features made as the aligner's were.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator

from vsa.errors import VsaError

from vsa.assets import SHIPPED_MODELS

DEFAULT_MODEL = SHIPPED_MODELS["mrnn"]
DEFAULT_REGION_MODEL = SHIPPED_MODELS["mrnn-regions"]  # trained on (region, snippet) pairs of `vsa align`


def default_model() -> Path:
    if not DEFAULT_MODEL.exists():
        raise VsaError(f"the shipped caption model is missing ({DEFAULT_MODEL}); reinstall vsa or pass --model CKPT")
    return DEFAULT_MODEL


class Captioner:
    def __init__(self, ckpt: dict, model_path: Path, device: str = "cpu", cnn_weights=None, region_ckpt: dict | None = None,
                 aligner=None, jit: bool = True, model=None, region_path: Path | None = None):
        """``model``: the generator already built (e.g. a :class:`vsa.generator.model.GeneratorEnsemble` whose first
        member is ``ckpt``), else built from ``ckpt``; ``region_path``: the file of ``region_ckpt`` (for errors)."""
        from vsa.data import Vocab
        from vsa.generator.model import model_from_checkpoint

        self.path = model_path
        self.ckpt = ckpt
        self.device = device
        self.model = model if model is not None else model_from_checkpoint(ckpt, device, model_path)
        self.vocab = Vocab(ckpt["vocab"])
        self.cfg = self.model.cfg  # GeneratorConfig (an ensemble's first member's); decoding defaults: self.model.decoding
        self.extractor_meta = ckpt.get("extractor") or {}
        self.cnn_weights = cnn_weights
        self._ex = None
        self.region_model = model_from_checkpoint(region_ckpt, device, region_path) if region_ckpt else None
        self.region_vocab = Vocab(region_ckpt["vocab"]) if region_ckpt else None
        # how the region model's training features were made (warp or roi crops); a box's row does not depend on the
        # image cells of `--cells` features, which describe no detection, so they are left out
        self.region_meta = {k: v for k, v in ((region_ckpt.get("extractor") or {}) if region_ckpt else {}).items()
                            if k != "cells"}
        self.aligner = aligner  # vsa.alignment.model.Aligner for grounded captions
        self.jit = jit  # False: never trace the CNN (vsa.features.embed.Extractor.jit)
        self._encoder = None
        self._featuriser = None
        self._region_featuriser = None
        self.detector = None  # a loaded detector: the boxes of a generator that reads them (caption_files sets it)
        self.mirror = float(self.model.decoding.mirror)  # weight of the mirror image (decoding.mirror; 0: off)
        self._mirrored = None

    @classmethod
    def load(cls, model=None, device: str = "auto", cnn_weights=None, threads: int = 0, region_model=None,
             aligner=None, jit: bool = True, weights: list[float] | None = None,
             mirror: float | None = None) -> "Captioner":
        """``model``: a generator checkpoint, or a list of them decoded as an ensemble (``weights`` per member,
        :func:`vsa.generator.model.load_generators`); ``aligner``: an aligner checkpoint for grounded captions (a region
        model, ``train-align --model brnn``); ``jit`` False: the CNN runs eager, never traced; ``mirror``: the
        weight of each photo's mirror image in decoding (default: the generator's ``decoding.mirror``; 0: off)."""
        import torch

        from vsa.checkpoint import load_checkpoint
        from vsa.generator.model import load_generators
        from vsa.runtime import pick_device

        if threads:
            torch.set_num_threads(threads)
        paths = [Path(m) for m in model] if isinstance(model, (list, tuple)) else [Path(model) if model is not None
                                                                                  else default_model()]
        path = paths[0]
        rck = load_checkpoint(region_model, "mrnn") if region_model is not None else None
        dev = pick_device(device)
        gen, ck = load_generators(paths if len(paths) > 1 else paths[0], dev, weights)
        al = None
        if aligner is not None:
            from vsa.alignment.model import load_aligner

            al = load_aligner(aligner, dev)
            if al.cfg.model != "brnn":
                raise VsaError(f"grounding needs a region aligner (train-align --model brnn), not a '{al.cfg.model}' one",
                               aligner)
        from vsa.generator.decoding import mirror_weight

        cap = cls(ck, path, dev, cnn_weights, rck, al, jit, model=gen, region_path=region_model)
        cap.mirror = mirror_weight(cap.mirror, mirror)
        return cap

    @property
    def extractor(self):
        if self._ex is None:
            from vsa.features.cnn import load_extractor

            name = self.extractor_meta.get("extractor", "efficientnet-lite0")
            self._ex = load_extractor(name, str(self.cnn_weights) if self.cnn_weights else None, self.device)
            want, got = self.extractor_meta.get("input"), self._ex.input_size
            if want and int(want) != int(got):
                raise VsaError(f"the model was trained on {want}px inputs but the extractor uses {got}px", self.path)
        return self._ex

    # ------------------------------------------------------------------ decoding

    def caption_features(self, feats, beam: int | None = None, max_len: int | None = None,
                         length_penalty: float | None = None, model=None, vocab=None,
                         mirrored: bool = False, sets: list | None = None, mask=None) -> list[tuple[str, float]]:
        """``feats`` ``[B, D]`` CNN features -> ``(caption, logprob)`` per row; ``mirrored``: ``feats`` hold each
        photo's and its mirror image's side by side (:meth:`featurise` with ``mirror``), decoded as one with weight
        :attr:`mirror`; ``sets``: per row, the constraint sets its caption must meet
        (:func:`vsa.generator.decoding.constrained_beam_search`); ``mask`` ``[B, R]``: the real rows of padded region
        features (as :meth:`featurise` gives it)."""
        import torch

        from vsa.generator.decoding import constraints, decode

        if mirrored:  # the photo and its mirror image side by side, decoded as one
            from vsa.generator.model import with_mirror

            if self._mirrored is None:
                self._mirrored = with_mirror(self.model, self.mirror)
            model = self._mirrored
        model = model or self.model
        vocab = vocab or self.vocab
        dec = model.decoding
        b = int(beam if beam is not None else dec.beam)
        L = int(max_len if max_len is not None else dec.max_len)
        lp = float(length_penalty if length_penalty is not None else dec.length_penalty)
        feats = torch.as_tensor(feats, dtype=torch.float32, device=self.device)
        if mask is not None:
            mask = torch.as_tensor(mask, dtype=torch.bool, device=self.device)
        with torch.inference_mode():
            if sets is not None:
                from vsa.generator.decoding import constrained_beam_search

                hyps = constrained_beam_search(model, feats, mask, sets, b, L, lp, **constraints(dec, vocab))
            else:
                hyps = decode(model, feats, mask, b, L, lp, **constraints(dec, vocab))
        return [(" ".join(vocab.decode(h.tokens)), round(h.logprob, 3)) for h in hyps]

    @property
    def reads_boxes(self) -> bool:
        """Does the generator attend over detector boxes (a model trained on ``vsa regions | vsa embed`` features)?"""
        from vsa.generator.model import uses_regions

        return uses_regions(self.cfg) and self.extractor_meta.get("crop") != "grid"

    @property
    def featuriser(self):
        """The generator's inputs made as its training features were (the one path, :mod:`vsa.features.featuriser`): the
        whole image, or the whole image + grid cells for a model trained on ``vsa embed --crop grid`` features, or
        for a model trained on detector boxes (+ ``--cells`` image cells) the whole image, the boxes of
        :attr:`detector` and the cells; without a detector the whole image and the cells alone (a model trained
        with ``box_dropout`` has seen such inputs)."""
        if self._featuriser is None:
            from vsa.features.featuriser import Featuriser
            from vsa.generator.model import uses_regions

            crop = self.extractor_meta.get("crop")
            if self.reads_boxes and self.detector is None and not self.cfg.cells:
                raise VsaError(f"this model attends over detector regions ({crop} features): pass --detector, or "
                               "caption photos with a grid-attention or whole-image model", self.path)
            self._featuriser = Featuriser(self.extractor_meta, self.detector if self.reads_boxes else None,
                                          extractor=self.extractor, whole_only=not uses_regions(self.cfg),
                                          boxes=self.reads_boxes and self.detector is not None)
        return self._featuriser

    def featurise(self, prepared: list[dict], mirror: bool = False):
        """Prepared photos (:meth:`vsa.features.featuriser.Featuriser.prepare`) -> ``(feats, mask)``, the generator's
        inputs: one pooled vector ``[B, D]`` (mask None), or region rows ``[B, R, D]`` (the whole image + grid cells,
        or + boxes) padded to the photo with the most, with their ``[B, R]`` mask (True = a real row); ``mirror``: the
        mirror images' (each prepared photo's ``"mirror"``, made by :meth:`_load`; one CNN batch) beside them on the
        last axis, the input of :func:`vsa.generator.model.with_mirror` (:meth:`caption_features` decodes it)."""
        import numpy as np

        from vsa.generator.model import uses_regions

        n = len(prepared)
        if mirror:
            prepared = prepared + [p["mirror"] for p in prepared]
        feats = self.featuriser.forward(prepared)
        if not uses_regions(self.cfg):
            x, mask = np.stack([f[0] for f in feats]), None
        else:  # photos with different numbers of boxes: zero rows after each photo's own, masked
            from vsa.features.store import pad_regions

            x, mask = pad_regions(feats)
            x, mask = x.numpy(), mask[:n].numpy()  # a mirror image has its photo's boxes, mirrored
        return (np.concatenate([x[:n], x[n:]], -1) if mirror else x), mask

    # ------------------------------------------------------------------ files

    def _load(self, item, max_pixels: int | None = None):
        from vsa.images import ImageError, open_image

        path, key = item
        try:
            im = open_image(path, max_pixels)
        except ImageError as e:
            return path, key, None, str(e)
        p = self.featuriser.prepare(im)
        if self.mirror:  # the mirror image on the mirrored boxes (as `vsa embed --flip` makes them)
            from vsa.features.featuriser import mirror

            grid = self.featuriser.spec.crop == "grid"
            mim, regs = mirror(im, None if grid else p["regions"])
            p["mirror"] = self.featuriser.prepare(mim, regs)
        return path, key, im, p

    def caption_files(self, items: Iterable[tuple[Path, str]], beam=None, max_len=None, length_penalty=None,
                      batch_size: int = 16, skip_bad: bool = False, warn=None, detector=None, top: int = 5,
                      workers: int = 2, regions: bool | None = None, ground: bool = False,
                      max_pixels: int | None = None, constrain: bool | dict | None = None) -> Iterator[dict]:
        """Caption ``(path, key)`` pairs; yields caption JSONL records (docs/formats.md) in input order.

        ``detector``: a detector spec (:func:`vsa.regions.load_detector`) or an already loaded detector (None: the
        packaged one, where something reads boxes);
        ``regions`` (default: when a ``detector`` is given): describe its top boxes with the region model;
        ``ground``: cut each caption into snippets grounded in the detector's boxes (needs the aligner);
        ``constrain``: each caption names the photo's confidently detected classes (constrained beam search; needs
        the detector; the record's ``constraints`` lists them): True / False, None for the generator's own
        default (``decoding.constrain``), or the keyword arguments of :func:`vsa.labels.constraint_sets`."""
        import functools

        import torch

        items = list(items)
        if not isinstance(constrain, dict):
            from vsa.generator.decoding import constrain_settings

            constrain = constrain_settings(self.model.decoding, constrain)
        if regions is None:
            regions = detector is not None and not ground
        if (regions or ground or constrain is not None or (self.reads_boxes and self.cfg.labels)) and detector is None:
            from vsa.regions import DEFAULT_DETECTOR

            detector = DEFAULT_DETECTOR  # the detector inside the package, as the shipped models are the default
        if not (regions or ground or self.reads_boxes or constrain is not None):
            detector = None  # nothing here reads boxes: never load it
        if detector is not None and not hasattr(detector, "detect"):
            from vsa.regions import load_detector

            detector = load_detector(detector, self.device)
        if self.reads_boxes and detector is not self.detector:
            self.detector, self._featuriser = detector, None  # the generator's own inputs use its boxes
        ex = self.extractor
        # one batch and no regions: tracing the CNN would cost more than it saves (cold start of one photo)
        ex.jit = self.jit and (len(items) > batch_size or detector is not None)
        load = functools.partial(self._load, max_pixels=max_pixels)
        pool = ThreadPoolExecutor(max(1, workers))
        try:
            for s in range(0, len(items), batch_size):
                loaded = list(pool.map(load, items[s : s + batch_size]))
                good = []
                for path, key, im, x in loaded:
                    if im is None:
                        if not skip_bad:
                            raise VsaError(x)
                        if warn:
                            warn(f"skipped: {x}")
                        continue
                    good.append((path, key, im, x))
                if not good:
                    continue
                feats, mask = self.featurise([g[3] for g in good], mirror=bool(self.mirror))
                sets = labels = None
                if constrain is not None:
                    from vsa.labels import constraint_sets

                    found = [constraint_sets(d, self.vocab.stoi, **constrain)
                             for d in detector.detect([g[2] for g in good])]
                    sets, labels = [f[0] for f in found], [f[1] for f in found]
                caps = self.caption_features(feats, beam, max_len, length_penalty, mirrored=bool(self.mirror), sets=sets,
                                             mask=mask)
                for i, ((path, key, im, _), (c, lp)) in enumerate(zip(good, caps)):
                    rec = {"path": str(path), "key": key, "caption": c, "logprob": lp}
                    if self.reads_boxes:  # the detector's boxes the generator read (none: the image and its cells)
                        rec["boxes"] = sum(r.get("label") not in ("image", "cell") for r in good[i][3]["regions"])
                        if not rec["boxes"]:
                            rec["note"] = "no detections: captioned from the whole image and its cells"
                    if labels is not None:
                        rec["constraints"] = labels[i]
                    if ground:
                        rec["beta"], rec["snippets"] = self.ground(im, path, key, c, detector)
                    if regions:
                        rec["regions"] = self.caption_regions(im, detector, top, beam, max_len, length_penalty)
                    yield rec
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def caption_regions(self, im, detector, top: int = 5, beam=None, max_len=None, length_penalty=None) -> list[dict]:
        """Describe the top detections of one image with the region model."""
        import torch

        if self.region_model is None:
            raise VsaError("--regions needs a region caption model trained with `vsa train-mrnn --alignments` "
                           "(pass it with --region-model)")
        dets = detector.detect([im], top=top)[0][:top]
        if not dets:
            return []
        from vsa.features.featuriser import Featuriser

        # the region features exactly as the region model's training features were made (``region_meta``)
        if self._region_featuriser is None:
            same = self.region_meta.get("extractor", "efficientnet-lite0") == self.extractor_meta.get(
                "extractor", "efficientnet-lite0")
            self._region_featuriser = Featuriser(self.region_meta, extractor=self.extractor if same else None,
                                                 device=self.device, cnn_weights=self.cnn_weights if same else None)
        feats = self._region_featuriser.features(im, dets)
        # each box's phrase names the box's class (a word of vsa.labels.CLASS_WORDS the region model can write:
        # constrained decoding), so a region caption never contradicts the detector
        from vsa.labels import constraint_sets

        sets = [constraint_sets([d], self.region_vocab.stoi, min_score=float("-inf"), max_sets=1)[0] for d in dets]
        caps = self.caption_features(feats, beam, max_len, length_penalty, self.region_model, self.region_vocab,
                                     sets=sets)
        return [{"box": d["box"], "label": d["label"], "score": d.get("score"), "caption": c} for d, (c, _) in zip(dets, caps)]

    def ground(self, im, path, key: str, caption: str, detector) -> tuple[float, list[dict]]:
        """``(beta, snippets)`` of ``caption`` on one photo: the whole image and the detector's top
        ``max_regions - 1`` boxes, embedded as the aligner's training features were (``vsa.search``), then
        the aligner's word-region scores and chain MRF with its own beta (:func:`vsa.alignment.snippets.ground_sentence`)."""
        if self.aligner is None:
            raise VsaError("grounded captions need an aligner (Captioner.load(aligner=CKPT))")
        from vsa.alignment.snippets import aligner_beta, ground_sentence

        if self._encoder is None:
            from vsa.search import PhotoEncoder

            meta = self.aligner.extractor_meta
            # one CNN in memory when the generator and the aligner use the same one (the shipped ones do not:
            # Lite2 for the generator's grid, Lite0 for the aligner's boxes)
            same = (meta.get("extractor") or "efficientnet-lite0") == (self.extractor_meta.get("extractor") or "efficientnet-lite0")
            self._encoder = PhotoEncoder(meta, detector, self.aligner.cfg.max_regions - 1, self.device,
                                         self.cnn_weights if same else None, extractor=self.extractor if same else None,
                                         jit=self.jit)
        photo = self._encoder.encode_image(im, path, key)
        beta = aligner_beta(self.aligner)
        return beta, ground_sentence(self.aligner, photo, caption.split(), beta)



def caption_inputs(inputs, shard: str | None = None) -> list[tuple[Path, str]]:
    """The ``(path, key)`` images ``vsa caption`` describes: image files and folders of ``inputs`` (found as
    :func:`vsa.images.find_images` finds them), ``"-"`` for image paths on stdin, one per line; ``shard``
    ``K/N`` keeps a deterministic 1/N of them. No image at all is an error."""
    from vsa.images import find_images
    from vsa.io import text_stream_lines

    items = list(inputs)
    paths: list[tuple[Path, str]] = []
    for it in items:
        if it == "-":
            piped = [(Path(p), Path(p).name) for p in text_stream_lines("-")]
            if not piped:
                raise VsaError("no image paths on stdin (one path per line): nothing to caption")
            paths.extend(piped)
        else:
            paths.extend(find_images([it]))
    if shard:
        from vsa.runtime import shard_of

        paths = shard_of(paths, shard)
    if not paths:
        raise VsaError("no images found in " + ", ".join(map(str, items)))
    return paths


def caption_images(images: list[tuple[Path, str]], model=None, beam=None, max_len=None, length_penalty=None,
                   regions: bool = False, region_model=None, ground: bool = False, aligner=None, detector=None,
                   top: int = 5, batch_size: int = 16, device: str = "auto", cnn_weights=None, skip_bad: bool = False,
                   threads: int = 0, max_pixels: int | None = None, jit: bool = True, warn=None,
                   weights: list[float] | None = None, mirror: float | None = None,
                   constrain: bool | dict | None = None) -> Iterator[dict]:
    """``vsa caption``: caption records (docs/formats.md) of ``images`` (``(path, key)``, e.g. from
    :func:`caption_inputs`), in order.

    ``model``: the generator checkpoint (default: the shipped one), or a list of them decoded as an ensemble
    (``weights`` per member); ``regions`` describes the detector's top
    boxes with ``region_model`` (default: the shipped region model); ``ground`` cuts each caption into
    snippets on the boxes with the aligner checkpoint ``aligner``; both need ``detector`` (a spec or a loaded
    detector), which also gives its boxes to a generator trained on detector boxes (else such a model, trained
    with ``box_dropout`` on ``--cells`` features, reads the whole image and its cells). The detector is loaded
    only when something reads its boxes. ``mirror``: :meth:`Captioner.load`. ``constrain``:
    :meth:`Captioner.caption_files`.
    """
    if regions and region_model is None:
        if not DEFAULT_REGION_MODEL.exists():
            raise VsaError("--regions needs --region-model CKPT (a generator trained with `vsa train-mrnn --alignments`)")
        region_model = DEFAULT_REGION_MODEL
    cap = Captioner.load(model, device=device, cnn_weights=cnn_weights, threads=threads,
                         region_model=region_model if regions else None, aligner=aligner if ground else None, jit=jit,
                         weights=weights, mirror=mirror)
    yield from cap.caption_files(images, beam=beam, max_len=max_len, length_penalty=length_penalty,
                                 batch_size=batch_size, skip_bad=skip_bad, warn=warn,
                                 detector=detector, top=top, regions=regions,
                                 ground=ground, max_pixels=max_pixels, constrain=constrain)
