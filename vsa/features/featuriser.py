"""The one featurisation path: photos -> the region inputs of a model, exactly as ``vsa regions | vsa embed``
made its training features.

A model's checkpoint records the features ``meta`` of its training features (docs/formats.md, "Features
NPZ"): the CNN (``extractor``, ``input`` size), the ``crop`` mode, its ``context`` and ``grid``, and the
``detector`` the boxes came from (null for whole-image and grid features). From it:

* the regions of a photo (:meth:`Featuriser.regions`): the whole image first, then the detector's top boxes
  (region features), or the ``grid`` x ``grid`` cells of the image (``crop`` grid), or nothing more
  (whole-image features);
* their CNN inputs (:func:`prepare`, network-free, so the embed pipeline runs it in DataLoader workers):
  ``warp`` warps each box to S x S (the whole image squashed, never centre-cropped), ``roi`` and ``grid``
  take the squashed whole image once (``roi`` with the boxes in its S x S coordinates, ``context`` padded);
* the features (:func:`forward`, batched over images): ``warp`` the pooled CNN output of every crop,
  ``roi`` RoIAlign on the last feature map (the whole-image box: the global average), ``grid`` the global
  average then the cells;
* with ``cells`` g > 0 (``warp`` and ``roi``), the g x g cells of the image after the boxes, as extra regions
  labelled ``cell``: context for retrieval that grounding never picks (:data:`CELL_LABEL`). ``warp`` pools them
  from the CNN map of the whole-image crop (adaptive average pooling, no extra forward), ``roi`` RoIAligns them
  like the boxes.

``vsa embed`` (:func:`vsa.features.embed.embed`) runs :func:`region_list`, :func:`prepare` and :func:`forward`
over files; ``vsa score``, ``vsa search``, ``vsa caption`` run them on one photo at a time through a
:class:`Featuriser`; ``vsa eval --images`` runs ``vsa embed`` on the dataset's images
(:func:`vsa.features.embed.embed_like_training`). Features come out float32; a features NPZ stores them in its
``dtype`` (float16 by default), which is the only difference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vsa.errors import VsaError

CROPS = ("warp", "roi", "grid")
from vsa.alignment.mrf import CELL_LABEL  # the label of ``cells`` regions: scored by the aligner, never grounded


@dataclass(frozen=True)
class CropSpec:
    """How regions become CNN inputs: ``crop`` (warp, roi or grid), ``context`` (fraction of a box's size added
    per side), ``grid`` (cells per side with ``crop`` grid) and ``cells`` (g x g image cells added after the
    boxes with ``crop`` warp or roi; 0: none)."""

    crop: str = "warp"
    context: float = 0.0
    grid: int = 7
    cells: int = 0
    labels: tuple = ()  # class names: each row also carries its box's class (one-hot), score and geometry

    def __post_init__(self):
        if self.crop not in CROPS:
            raise VsaError(f"--crop must be warp, roi or grid, got {self.crop!r}")
        if self.cells < 0 or (self.cells and self.crop == "grid"):
            raise VsaError(f"--cells must be >= 0 and goes with --crop warp or roi (grid features are all cells), "
                           f"got {self.cells} with --crop {self.crop}")

    @classmethod
    def from_meta(cls, meta: dict) -> "CropSpec":
        """The spec a features ``meta`` (or a checkpoint's ``extractor``) records."""
        meta = meta or {}
        return cls(meta.get("crop") or "warp", float(meta.get("context") or 0.0), int(meta.get("grid") or 7),
                   int(meta.get("cells") or 0), tuple(meta.get("labels") or ()))


def uses_detector(meta: dict) -> bool:
    """Were the features ``meta`` describes made from detector boxes (``vsa regions | vsa embed``)? Not for
    whole-image features (no ``detector``) nor for grid features (the grid replaces the boxes)."""
    meta = meta or {}
    return bool(meta.get("detector")) and meta.get("crop") != "grid"


def grid_boxes(w: float, h: float, g: int, label: str = "grid") -> list[dict]:
    """The ``g`` x ``g`` cells of a ``w`` x ``h`` image, row-major, as region records (label ``label``)."""
    return [{"box": [w * c / g, h * r / g, w * (c + 1) / g, h * (r + 1) / g], "score": 1.0, "label": label}
            for r in range(g) for c in range(g)]


def mirror(im, regions: list[dict] | None = None):
    """``im`` (PIL) mirrored left to right, and ``regions`` with it (each box's x1, x2 -> w - x2, w - x1; the
    other fields kept): the inputs of ``vsa embed --flip``."""
    from PIL import Image

    w = im.size[0]
    if regions is not None:
        regions = [{**r, "box": [w - r["box"][2], r["box"][1], w - r["box"][0], r["box"][3]]} if "box" in r else r
                   for r in regions]
    return im.transpose(Image.Transpose.FLIP_LEFT_RIGHT), regions


def region_list(size: tuple[int, int], regions: list[dict] | None, spec: CropSpec) -> list[dict]:
    """The regions an image of ``size`` (w, h) is featurised on: with ``crop`` grid the whole image then its grid
    cells; otherwise ``regions`` as given (whole image first, as ``vsa regions`` writes them), or the whole
    image alone when there are none, then the ``cells`` x ``cells`` cells of the image (label ``cell``).
    Cells already among ``regions`` (a features file's own regions) are replaced, never doubled."""
    from vsa.regions import whole_image_region

    w, h = size
    if spec.crop == "grid":
        return [whole_image_region(w, h)] + grid_boxes(w, h, spec.grid)
    regs = [r for r in regions or () if r.get("label") != CELL_LABEL] or [whole_image_region(w, h)]
    if spec.cells:
        if regs[0].get("label") != "image":
            raise VsaError("--cells needs the whole image as the first region (as `vsa regions` writes it)")
        regs += grid_boxes(w, h, spec.cells, CELL_LABEL)
    return regs


def prepare(prep, im, regions: list[dict], spec: CropSpec) -> dict:
    """The network-free half: ``{"crops": [C, 3, S, S] uint8, "rois": [R, 4] or None, "n": R}`` for one PIL image
    (the extractor normalises the pixels batch-wise on its device).

    ``prep``: a :class:`vsa.features.cnn.Preprocess` (or an Extractor). ``warp``: one crop per region (the whole-image
    region squashed, each box cropped with ``context`` and warped); ``roi``/``grid``: the squashed image once
    (``roi`` adds the boxes, padded by ``context``, in its S x S coordinates)."""
    import torch

    w, h = im.size
    if spec.crop == "grid":
        return {"crops": prep.preprocess(im, raw=True)[None], "rois": None, "n": len(regions)}
    if spec.crop == "roi":
        S = prep.input_size
        b = torch.tensor([[float(v) for v in r["box"]] for r in regions], dtype=torch.float32).reshape(-1, 4)
        if spec.context:
            pad = (b[:, 2:] - b[:, :2]) * spec.context
            b = torch.cat([b[:, :2] - pad, b[:, 2:] + pad], 1)
        b = b * torch.tensor([S / w, S / h, S / w, S / h])
        b = b.clamp(0, S)
        return {"crops": prep.preprocess(im, raw=True)[None], "rois": b, "n": len(regions)}
    crops = []
    for r in regions:
        if spec.cells and r.get("label") == CELL_LABEL:
            continue  # pooled from the whole-image crop's feature map (forward)
        if r.get("label") == "image" and list(map(float, r["box"])) == [0.0, 0.0, float(w), float(h)]:
            crops.append(prep.preprocess(im, raw=True))
        else:
            crops.append(prep.crop(im, r["box"], spec.context, raw=True))
    return {"crops": torch.stack(crops), "rois": None, "n": len(regions)}


def forward(extractor, prepared: list[dict], spec: CropSpec) -> np.ndarray:
    """Features of prepared images (:func:`prepare`) in one CNN batch: float32 ``[sum n, D]``, image by image."""
    import torch

    batch = torch.cat([p["crops"] for p in prepared])
    if spec.crop == "roi":
        feats = extractor.roi(batch, [p["rois"] for p in prepared])
    elif spec.crop == "grid":
        feats = extractor.grid(batch, spec.grid)
    elif spec.cells:
        # warp + cells: the whole-image crops (each image's first) give their pooled feature and their cells
        # from one feature-map pass; the box crops go through the CNN as usual
        firsts = np.cumsum([0] + [len(p["crops"]) for p in prepared])[:-1]
        rest = np.setdiff1d(np.arange(len(batch)), firsts)
        g2 = spec.cells * spec.cells
        whole = extractor.grid(batch[torch.from_numpy(firsts)], spec.cells).reshape(len(prepared), 1 + g2, -1)
        boxes = extractor(batch[torch.from_numpy(rest)]) if len(rest) else whole.new_zeros((0, whole.shape[-1]))
        out, s = [], 0
        for i, p in enumerate(prepared):
            k = len(p["crops"]) - 1
            out += [whole[i, :1], boxes[s : s + k], whole[i, 1:]]
            s += k
        feats = torch.cat(out)
    else:
        feats = extractor(batch)
    return with_labels(feats.cpu().numpy(), prepared, spec)


LABEL_EXTRAS = ("score", "x1", "y1", "x2", "y2", "area")  # the channels after a labelled row's class one-hot


def label_width(labels) -> int:
    """Channels :func:`label_channels` appends to each row for a label set of ``len(labels)`` classes."""
    return len(labels) + len(LABEL_EXTRAS) if labels else 0


def label_channels(regions: list[dict], size: tuple[int, int], labels) -> np.ndarray:
    """Float32 ``[R, C + 6]``: per region the one-hot of its class among ``labels`` (zero for the whole image, the
    cells and a class outside the set), then its detector score and its box in ``[0, 1]`` image coordinates (x1,
    y1, x2, y2) and area, all zero for a row that is not a detected box. A generator that reads labels
    (:mod:`vsa.generator.models.labelled`) embeds the class and copies its name into the caption."""
    index = {n: i for i, n in enumerate(labels)}
    w, h = (float(v) or 1.0 for v in size)
    out = np.zeros((len(regions), label_width(labels)), dtype=np.float32)
    C = len(labels)
    for j, r in enumerate(regions):
        c = index.get(r.get("label"))
        if c is None or r.get("label") in ("image", CELL_LABEL):
            continue
        x1, y1, x2, y2 = (float(v) for v in r["box"])
        x1, x2 = min(max(x1 / w, 0.0), 1.0), min(max(x2 / w, 0.0), 1.0)
        y1, y2 = min(max(y1 / h, 0.0), 1.0), min(max(y2 / h, 0.0), 1.0)
        out[j, c] = 1.0
        out[j, C:] = (float(r.get("score", 1.0)), x1, y1, x2, y2, max(x2 - x1, 0.0) * max(y2 - y1, 0.0))
    return out


def with_labels(feats: np.ndarray, prepared: list[dict], spec: CropSpec) -> np.ndarray:
    """``feats`` (``[sum n, D]`` of ``prepared``, image by image) with :func:`label_channels` after the CNN's
    channels when ``spec.labels`` names a label set."""
    if not spec.labels:
        return feats
    extra = [label_channels(p["regions"], p["size"], spec.labels) for p in prepared]
    return np.concatenate([feats, np.concatenate(extra).astype(feats.dtype)], 1)


def check_fmap(extractor, spec: CropSpec) -> None:
    """``roi``, ``grid`` and ``cells`` pool the CNN's last feature map: refuse a CNN without one before any work."""
    if (spec.crop in ("roi", "grid") or spec.cells) and not extractor.has_fmap:
        raise extractor.no_fmap(spec.crop if spec.crop != "warp" else "warp --cells")


class Featuriser:
    """Photos -> region features as the training features described by ``meta`` were made.

    ``meta``: a features ``meta`` or a checkpoint's ``extractor``. ``detector``: a loaded detector or a
    detector spec (:func:`vsa.regions.load_detector`; loaded on first use, and only when ``meta`` names a
    detector); None for whole-image and grid models. ``extractor``: an already loaded
    :class:`vsa.features.cnn.Extractor` of the CNN ``meta`` names (else loaded on first use from ``cnn_weights``).
    ``top``: detections kept per photo (the whole image comes on top). ``whole_only``: the whole image alone
    whatever ``meta`` says (a model that reads only the whole-image row, e.g. the whole-image aligner).
    ``boxes`` False: no detector is run even if ``meta`` names one: the whole image and, with ``cells``, its
    cells (a generator trained with ``box_dropout`` captions a photo so without a detector).
    """

    def __init__(self, meta: dict, detector=None, *, extractor=None, top: int = 19, device: str = "cpu",
                 cnn_weights=None, whole_only: bool = False, jit: bool = True, warn=None, boxes: bool = True):
        self.meta = dict(meta or {})
        self.spec = CropSpec.from_meta(self.meta)
        loaded = hasattr(detector, "detect")
        self.detector_spec = None if loaded else detector
        self._det = self._check_labels(detector) if loaded else None
        self._ex = extractor
        self.top = top
        self.device = device
        self.cnn_weights = cnn_weights
        self.whole_only = whole_only
        self.boxes = boxes
        self.jit = jit
        self.warn = warn

    def _check_labels(self, det):
        """``det``, unless the features carry class labels (``spec.labels``) of another label set than its own: a
        one-line error naming both."""
        names = list(getattr(det, "names", None) or [])
        if self.spec.labels and names != list(self.spec.labels):
            want = self.meta.get("detector") or "its training detector"
            got = getattr(det, "name", None) or self.detector_spec or "the given detector"
            raise VsaError(f"the model reads the {len(self.spec.labels)} class labels of {want}, and the detector "
                           f"{got} has another label set ({len(names)} classes: {', '.join(names[:3])}, ...): "
                           f"caption with {want}")
        return det

    @property
    def uses_detector(self) -> bool:
        return self.boxes and not self.whole_only and uses_detector(self.meta)

    @property
    def detector(self):
        if self._det is None:
            from vsa.regions import load_detector

            self._det = self._check_labels(load_detector(self.detector_spec, self.device))
            want = self.meta.get("detector")
            if self.warn is not None and want and self._det.name != want:
                self.warn(f"the model was trained on {want} regions; these come from {self._det.name}")
        return self._det

    @property
    def extractor(self):
        if self._ex is None:
            from vsa.features.cnn import load_extractor

            name = self.meta.get("extractor") or "efficientnet-lite0"
            self._ex = load_extractor(name, str(self.cnn_weights) if self.cnn_weights else None, self.device, self.jit)
            want = self.meta.get("input")
            if want and int(want) != int(self._ex.input_size):
                raise VsaError(f"the model was trained on {want}px inputs but {self._ex.name} uses "
                               f"{self._ex.input_size}px")
            check_fmap(self._ex, self.spec)
        return self._ex

    def regions(self, im) -> list[dict]:
        """The regions of one photo (PIL, upright RGB), whole image first (see :func:`region_list`)."""
        dets = None
        if self.uses_detector:
            from vsa.regions import DetectOptions, whole_image_region

            dets = [whole_image_region(*im.size)] + self.detector.detect([im], DetectOptions(top=self.top))[0]
        return region_list(im.size, dets, self.spec)

    def prepare(self, im, regions: list[dict] | None = None) -> dict:
        """:func:`prepare` of one photo, on ``regions`` (default :meth:`regions`); the dict adds ``regions``."""
        if regions is not None and self.spec.crop == "grid":
            raise VsaError("grid features are made of the image's cells, not of given boxes")
        regs = self.regions(im) if regions is None else region_list(im.size, regions, self.spec)
        return {**prepare(self.extractor.prep, im, regs, self.spec), "regions": regs, "size": im.size}

    def forward(self, prepared: list[dict]) -> list[np.ndarray]:
        """Features of prepared photos in one CNN batch: float32 ``[R_i, D]`` per photo."""
        if not prepared:
            return []
        feats = forward(self.extractor, prepared, self.spec)
        cuts = np.cumsum([p["n"] for p in prepared])[:-1]
        return np.split(feats, cuts)

    def features(self, im, regions: list[dict] | None = None) -> np.ndarray:
        """Float32 ``[R, D]`` features of ``regions`` (default :meth:`regions`) of one photo."""
        return self.forward([self.prepare(im, regions)])[0]

    def encode(self, im) -> tuple[list[dict], np.ndarray]:
        """``(regions, feats)`` of one photo: its regions (whole image first) and their ``[R, D]`` features."""
        p = self.prepare(im)
        return p["regions"], self.forward([p])[0]
