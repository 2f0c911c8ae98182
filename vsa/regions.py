"""Region proposals: the whole image plus the top detections of an object detector.

Two detector families, chosen by :func:`load_detector`:

* ``YoloV5StateDict`` - the YOLOv5 COCO checkpoint stored as a plain state dict plus
  ``meta.json`` (``../shared/weights/yolov5n-coco``). Layers 0-23 are built by
  ultralytics from its own ``yolov5n.yaml``; the anchor head (``model.24``) is three
  1x1 convolutions decoded here as YOLOv5 does, followed by torchvision NMS.
* ``UltralyticsDetector`` - anything ``ultralytics.YOLO`` loads: a weights path, or
  a name such as ``yolo11n.pt`` that ultralytics downloads when online.

Images are letterboxed (aspect ratio kept, grey padding) to ``imgsz`` and boxes are
mapped back to pixel ``xyxy`` in the original image (after EXIF orientation).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from vsa.errors import VsaError

DEFAULT_DETECTOR = "yolo11n.pt"  # ultralytics downloads it on first use (needs internet once)


@dataclass
class DetectOptions:
    top: int = 19  # detections kept per image (the whole image is added on top)
    conf: float = 0.03  # low: the paper keeps the top detections even when weak
    iou: float = 0.5  # class-aware NMS threshold
    dedup: float = 0.9  # then drop a box overlapping a higher-scoring box of any class above this IoU (1 = off)
    imgsz: int = 0  # detector input side; 0 = auto (see auto_imgsz)


def _options(opt: DetectOptions | None, kw: dict) -> DetectOptions:
    """``detect(images, top=19, conf=..., iou=...)`` or ``detect(images, DetectOptions(...))``."""
    from dataclasses import replace

    opt = opt or DetectOptions()
    unknown = set(kw) - set(DetectOptions.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown detect option(s): {', '.join(sorted(unknown))}")
    return replace(opt, **{k: v for k, v in kw.items() if v is not None})


def _sized(opt: DetectOptions, images) -> DetectOptions:
    from dataclasses import replace

    return opt if opt.imgsz > 0 else replace(opt, imgsz=auto_imgsz(images))


def auto_imgsz(images, cap: int = 640) -> int:
    """Detector input side: twice the longest image side (small images gain from upsampling), multiple of 32, <= cap."""
    m = max(max(im.size) for im in images)
    return int(min(cap, max(64, -(-2 * m // 32) * 32)))


def _letterbox(images, size: int):
    """Resize each PIL image into a size x size canvas keeping aspect; return batch, scales, pads."""
    import numpy as np
    import torch
    from PIL import Image

    batch = np.full((len(images), size, size, 3), 114, dtype=np.uint8)
    metas = []
    for i, im in enumerate(images):
        w, h = im.size
        r = min(size / w, size / h)
        nw, nh = max(1, round(w * r)), max(1, round(h * r))
        px, py = (size - nw) // 2, (size - nh) // 2
        batch[i, py : py + nh, px : px + nw] = np.asarray(im.resize((nw, nh), Image.BILINEAR))
        metas.append((r, px, py, w, h))
    t = torch.from_numpy(batch).permute(0, 3, 1, 2).float().div_(255.0)
    return t, metas


def _postprocess(boxes, scores, labels, names, meta, opt: DetectOptions):
    """NMS + dedup + top-K on one image's candidates; map boxes back to the original image."""
    import torch
    from torchvision.ops import batched_nms, box_iou

    if boxes.numel() == 0:
        return []
    keep = batched_nms(boxes, scores, labels, opt.iou)
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    if opt.dedup < 1.0 and len(boxes) > 1:
        iou = box_iou(boxes, boxes)
        alive = torch.ones(len(boxes), dtype=torch.bool)
        for i in range(len(boxes)):  # sorted by score already
            if alive[i]:
                dup = (iou[i] > opt.dedup) & (torch.arange(len(boxes)) > i)
                alive &= ~dup
        boxes, scores, labels = boxes[alive], scores[alive], labels[alive]
    boxes, scores, labels = boxes[: opt.top], scores[: opt.top], labels[: opt.top]
    r, px, py, w, h = meta
    b = boxes.clone()
    b[:, [0, 2]] = ((b[:, [0, 2]] - px) / r).clamp(0, w)
    b[:, [1, 3]] = ((b[:, [1, 3]] - py) / r).clamp(0, h)
    out = []
    for bb, s, c in zip(b.tolist(), scores.tolist(), labels.tolist()):
        if bb[2] - bb[0] < 1 or bb[3] - bb[1] < 1:
            continue
        out.append({"box": [round(v, 1) for v in bb], "score": round(float(s), 4), "label": names[int(c)], "class_id": int(c)})
    return out


class YoloV5StateDict:
    """YOLOv5 (anchor head) from a plain state dict + meta.json, backbone/neck built by ultralytics."""

    def __init__(self, folder: Path, device: str = "cpu"):
        import json

        import torch

        folder = Path(folder)
        if folder.is_file():
            weights, folder = folder, folder.parent
        else:
            cands = sorted(folder.glob("*state-dict*.pt")) or sorted(folder.glob("*.pt"))
            if not cands:
                raise VsaError("no *.pt state dict in the detector folder", folder)
            weights = cands[0]
        meta_path = folder / "meta.json"
        if not meta_path.exists():
            raise VsaError("YOLOv5 state-dict detector needs meta.json beside the weights", folder)
        meta = json.loads(meta_path.read_text())
        self.names = list(meta["names"].values()) if isinstance(meta["names"], dict) else list(meta["names"])
        self.strides = [int(s) for s in meta["strides"]]
        self.anchors = torch.tensor(meta["anchors_pixels"], dtype=torch.float32)  # [3 levels, 3, 2]
        self._geo: dict = {}
        self.name = folder.name
        self.device = device
        try:
            sd = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as e:
            raise VsaError(f"cannot load state dict ({type(e).__name__}: {e})", weights) from None
        import contextlib
        import io

        from ultralytics.nn.tasks import DetectionModel

        cfg = meta.get("ultralytics_cfg", "yolov5n.yaml")
        with contextlib.redirect_stdout(io.StringIO()):
            model = DetectionModel(cfg, nc=len(self.names), verbose=False)
        body = {k: v.float() for k, v in sd.items() if not k.startswith("model.24.")}
        missing, unexpected = model.load_state_dict(body, strict=False)
        missing = [k for k in missing if not k.startswith("model.24.")]
        if missing or unexpected:
            raise VsaError(f"state dict does not match {cfg}: missing {missing[:3]}, unexpected {unexpected[:3]}", weights)
        self.layers = model.model[:24].eval().to(device)
        no = 5 + len(self.names)
        heads = []
        for i in range(3):
            w = sd[f"model.24.m.{i}.weight"].float()
            conv = torch.nn.Conv2d(w.shape[1], w.shape[0], 1)
            conv.weight.data.copy_(w)
            conv.bias.data.copy_(sd[f"model.24.m.{i}.bias"].float())
            assert w.shape[0] == 3 * no, "head output size does not match the class count"
            heads.append(conv)
        self.heads = torch.nn.ModuleList(heads).eval().to(device)
        self.no = no
        # fuse conv+bn for speed (inference only)
        for m in self.layers.modules():
            if hasattr(m, "bn") and hasattr(m, "conv") and hasattr(m, "forward_fuse"):
                from ultralytics.utils.torch_utils import fuse_conv_and_bn

                m.conv = fuse_conv_and_bn(m.conv, m.bn)
                delattr(m, "bn")
                m.forward = m.forward_fuse

    def _forward(self, x):
        y = []
        for m in self.layers:
            if m.f != -1:
                x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
            x = m(x)
            y.append(x)
        return [y[17], y[20], y[23]]

    def _geometry(self, lvl: int, ny: int, nx: int, device):
        """``[3 * ny * nx, 5]`` per anchor of level ``lvl`` in the head's order (anchor, row, column): its cell's x, y,
        the anchor's width, height (pixels) and the level's stride (cached per map size)."""
        import torch

        key = (lvl, ny, nx, str(device))
        if key not in self._geo:
            gy, gx = torch.meshgrid(torch.arange(ny, dtype=torch.float32), torch.arange(nx, dtype=torch.float32),
                                    indexing="ij")
            cell = torch.stack((gx, gy), -1).view(1, ny * nx, 2).expand(3, -1, -1)
            anchor = self.anchors[lvl].view(3, 1, 2).expand(-1, ny * nx, -1)
            stride = torch.full((3, ny * nx, 1), float(self.strides[lvl]))
            self._geo[key] = torch.cat((cell, anchor, stride), -1).reshape(-1, 5).to(device)
        return self._geo[key]

    def detect(self, images, opt: DetectOptions | None = None, **kw):
        import torch

        opt = _sized(_options(opt, kw), images)
        x, metas = _letterbox(images, opt.imgsz)
        x = x.to(self.device)
        with torch.inference_mode():
            feats = self._forward(x)
            raw, geo = [], []
            for lvl, (f, head) in enumerate(zip(feats, self.heads)):
                p = head(f)
                b, _, ny, nx = p.shape
                raw.append(p.view(b, 3, self.no, ny, nx).permute(0, 1, 3, 4, 2).reshape(b, -1, self.no))
                geo.append(self._geometry(lvl, ny, nx, p.device))
            raw, geo = torch.cat(raw, 1), torch.cat(geo)  # logits [B, anchors, 5 + classes]; anchors' geometry
            out = []
            for i in range(len(images)):
                # a class score is objectness x class probability <= objectness: only anchors whose objectness
                # passes the threshold can give a candidate, so the rest (~90% at conf 0.0005) are never decoded
                a = (raw[i, :, 4].sigmoid() > opt.conf).nonzero().squeeze(1)
                p, g = raw[i, a].sigmoid(), geo[a]
                xy = (p[:, :2] * 2 - 0.5 + g[:, :2]) * g[:, 4:]
                wh = (p[:, 2:4] * 2) ** 2 * g[:, 2:4]
                box = torch.cat((xy - wh / 2, xy + wh / 2), -1)
                score = p[:, 4:5] * p[:, 5:]
                idx, cls = (score > opt.conf).nonzero(as_tuple=True)
                s = score[idx, cls]
                order = s.argsort(descending=True)[: 30 * max(opt.top, 1)]
                out.append(_postprocess(box[idx[order]].cpu(), s[order].cpu(), cls[order].cpu(), self.names, metas[i], opt))
        return out


class UltralyticsDetector:
    """Any model ``ultralytics.YOLO`` can load (path or downloadable name)."""

    def __init__(self, spec: str, device: str = "cpu"):
        import contextlib
        import sys

        from ultralytics import YOLO

        try:
            with contextlib.redirect_stdout(sys.stderr):  # stdout carries our JSONL
                self.model = YOLO(spec)
        except Exception as e:
            offline_hint = ""
            if not Path(spec).exists():
                offline_hint = (f"; '{spec}' is not a local file and could not be downloaded (offline?): "
                                "point --detector (or VSA_DETECTOR, or [regions] detector in vsa.toml) at a local "
                                "weights file, or at a YOLOv5 state-dict folder such as ../shared/weights/yolov5n-coco")
            raise VsaError(f"cannot load detector {spec!r} ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}){offline_hint}") from None
        self.name = Path(spec).stem
        self.device = device
        names = self.model.names
        self.names = [names[i] for i in sorted(names)] if isinstance(names, dict) else list(names)

    def detect(self, images, opt: DetectOptions | None = None, **kw):
        import contextlib
        import sys

        opt = _sized(_options(opt, kw), images)
        with contextlib.redirect_stdout(sys.stderr):
            res = self.model.predict(images, imgsz=opt.imgsz, conf=opt.conf, iou=opt.iou, max_det=max(opt.top * 5, 50),
                                     device=self.device, verbose=False)
        out = []
        for im, r in zip(images, res):
            b = r.boxes
            boxes = b.xyxy.float().cpu()
            scores = b.conf.float().cpu()
            cls = b.cls.long().cpu()
            order = scores.argsort(descending=True)
            w, h = im.size
            dets = _postprocess(boxes[order], scores[order], cls[order], self.names, (1.0, 0, 0, w, h),
                                DetectOptions(opt.top, opt.conf, 1.0, opt.dedup, opt.imgsz))
            out.append(dets)
        return out


def is_yolov5_state_dict(spec: str) -> bool:
    p = Path(spec)
    if p.is_dir():
        return (p / "meta.json").exists()
    return p.is_file() and p.suffix == ".pt" and (p.parent / "meta.json").exists() and "state-dict" in p.name


def load_detector(spec: str | os.PathLike | None = None, device: str = "auto"):
    """The detector ``spec`` names: a YOLOv5 state-dict folder (or its ``*state-dict*.pt``), else anything
    ``ultralytics.YOLO`` loads (a weights path, or a name such as :data:`DEFAULT_DETECTOR`, used when ``spec``
    is None). The spec is taken as given: the library reads no environment and no vsa.toml (the CLI resolves
    ``--detector``, ``$VSA_DETECTOR`` and ``[regions] detector``: :func:`vsa.cli.workspace.detector`)."""
    from vsa.runtime import pick_device

    spec = str(spec) if spec is not None else DEFAULT_DETECTOR
    dev = pick_device(device)
    if is_yolov5_state_dict(spec):
        return YoloV5StateDict(Path(spec), dev)
    if Path(spec).is_dir():
        raise VsaError("detector folder has no meta.json (expected a YOLOv5 state-dict folder)", spec)
    return UltralyticsDetector(spec, dev)


def whole_image_region(width: int, height: int) -> dict:
    return {"box": [0.0, 0.0, float(width), float(height)], "score": 1.0, "label": "image"}


def regions_for_image(detector, path, key: str | None = None, opt: DetectOptions | None = None,
                      max_pixels: int | None = None, **kw) -> dict:
    """Open one image, detect, and return its full regions record (whole image first)."""
    from vsa.images import open_image

    im = open_image(path, max_pixels)
    dets = detector.detect([im], _options(opt, kw))[0]
    return regions_record(key or Path(path).name, path, im, dets, detector.name)


def regions_record(key: str, path, image, detections: list[dict], detector_name: str) -> dict:
    w, h = image.size
    return {
        "key": key,
        "path": os.fsdecode(path) if not isinstance(path, str) else path,
        "width": w,
        "height": h,
        "detector": detector_name,
        "regions": [whole_image_region(w, h)] + detections,
    }


def detect_files(detector, files, opt: DetectOptions | None = None, batch_size: int = 16, workers: int = 1,
                 max_pixels: int | None = None):
    """Regions records of image files ``[(path, key)]`` (``vsa regions``), detecting ``batch_size`` images at a time.

    Yields, as the images are read, ``(None, message)`` for an unreadable one (the one-line error naming
    it) and, batch by batch, ``(record, None)`` for the others, in input order.
    """
    from vsa.images import iter_images

    opt = opt or DetectOptions()
    batch: list = []

    def flush():
        for (path, key, im), dets in zip(batch, detector.detect([im for _, _, im in batch], opt)):
            yield regions_record(key, os.fsdecode(path), im, dets, detector.name), None
        batch.clear()

    for path, key, im, err in iter_images(files, workers, max_pixels):
        if err is not None:
            yield None, err
            continue
        batch.append((path, key, im))
        if len(batch) >= batch_size:
            yield from flush()
    if batch:
        yield from flush()


def write_regions(inputs, out, detector=None, opt: DetectOptions | None = None, batch_size: int = 16, workers: int = 1,
                  max_pixels: int | None = None, skip_bad: bool = False, shard: str | None = None,
                  device: str = "auto", threads: int = 0, warn=None, progress=None) -> dict:
    """``vsa regions``: the regions record of every image of ``inputs`` (files and folders, found as
    :func:`vsa.images.find_images` finds them; ``shard`` ``K/N`` keeps a deterministic 1/N of them) as JSONL
    at ``out`` (``"-"``: stdout), in input order.

    ``detector``: a detector spec (:func:`load_detector`) or an already loaded detector. An unreadable image is
    an error, unless ``skip_bad`` (then ``warn("skipped: ...")`` and on). ``progress``: a rich Progress to
    advance. Returns ``{"images", "bad", "regions", "seconds"}`` (regions of the images written; seconds
    from the detector's loading on).
    """
    import time

    from vsa.images import find_images
    from vsa.io import JsonlWriter
    from vsa.runtime import set_threads

    files = find_images(inputs, missing_ok=skip_bad)
    if shard:
        from vsa.runtime import shard_of

        files = shard_of(files, shard)
    set_threads(threads)
    det = detector if hasattr(detector, "detect") else load_detector(detector, device)
    n_img, n_reg, n_bad, t0 = 0, 0, 0, time.time()
    with JsonlWriter(out) as w:
        task = progress.add_task("regions", total=len(files)) if progress is not None else None
        for rec, err in detect_files(det, files, opt or DetectOptions(), batch_size, workers, max_pixels):
            if err is not None:
                if not skip_bad:
                    raise VsaError(err)
                if warn is not None:
                    warn(f"skipped: {err}")
                n_bad += 1
            else:
                w.write(rec)
                n_reg += len(rec["regions"])
                n_img += 1
            if task is not None:
                progress.advance(task)
    return {"images": n_img, "bad": n_bad, "regions": n_reg, "seconds": time.time() - t0}
