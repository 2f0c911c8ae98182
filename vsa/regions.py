"""Region proposals: the whole image plus the top detections of an object detector.

Two detector families, chosen by :func:`load_detector`:

* ``YoloV5StateDict`` - a YOLOv5 checkpoint stored as a plain state dict plus ``meta.json``; the
  YOLOv5n COCO detector that ships inside the package (:data:`DEFAULT_DETECTOR`) is one. Layers 0-23
  are built by ultralytics from its own ``yolov5n.yaml``; the anchor head (``model.24``) is three
  1x1 convolutions decoded here as YOLOv5 does, followed by torchvision NMS.
* ``UltralyticsDetector`` - an ultralytics ``.pt`` checkpoint (YOLOv8, YOLO11, ...): a path, or a
  release name such as ``yolo11n.pt`` that ultralytics downloads when online. Such files are pickles;
  they are read with torch's ``weights_only`` unpickler and an allow-list of network layers
  (:func:`load_ultralytics_checkpoint`), so a file that would run code is refused, not loaded.

Images are letterboxed (aspect ratio kept, grey padding) to ``imgsz`` and boxes are
mapped back to pixel ``xyxy`` in the original image (after EXIF orientation).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from vsa.errors import VsaError

from vsa.assets import SHIPPED_DETECTOR

# the packaged YOLOv5n COCO state dict: works offline, and never a name looked up in the working folder
DEFAULT_DETECTOR = str(SHIPPED_DETECTOR)


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


def _read_meta(meta_path: Path) -> dict:
    """``meta.json`` of a state-dict detector, checked: class names, three strides, anchors [3, 3, 2] in pixels."""
    import json

    try:
        meta = json.loads(meta_path.read_bytes())
    except (OSError, ValueError) as e:
        raise VsaError(f"cannot read the detector's meta.json ({type(e).__name__}: {e})", meta_path) from None
    if not isinstance(meta, dict):
        raise VsaError("the detector's meta.json is not a JSON object", meta_path)
    names = meta.get("names")
    if isinstance(names, dict):
        try:
            names = [names[k] for k in sorted(names, key=int)]
        except (TypeError, ValueError):
            raise VsaError("'names' of the detector's meta.json has keys that are not class numbers",
                           meta_path) from None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise VsaError("the detector's meta.json needs 'names': a non-empty list of class names", meta_path)
    strides, anchors = meta.get("strides"), meta.get("anchors_pixels")
    ok = (isinstance(strides, list) and len(strides) == 3 and all(isinstance(v, int) and v > 0 for v in strides)
          and isinstance(anchors, list) and len(anchors) == 3
          and all(isinstance(lvl, list) and len(lvl) == 3 and all(
              isinstance(a, list) and len(a) == 2 and all(isinstance(v, (int, float)) and v > 0 for v in a)
              for a in lvl) for lvl in anchors))
    if not ok:
        raise VsaError("the detector's meta.json needs 'strides' (three positive integers) and 'anchors_pixels' "
                       "(3 levels x 3 anchors x [width, height] in pixels)", meta_path)
    cfg = meta.get("ultralytics_cfg", "yolov5n.yaml")
    if not _packaged_cfg(cfg):
        # a model yaml can carry an activation that ultralytics evaluates as Python: only its own configs are built
        raise VsaError(f"'ultralytics_cfg' must name a model config that ships with ultralytics "
                       f"(such as yolov5n.yaml), not {cfg!r}", meta_path)
    return {"names": names, "strides": strides, "anchors": anchors, "cfg": cfg}


def _packaged_cfg(cfg) -> bool:
    """Whether ``cfg`` is the bare file name of a model config inside the installed ultralytics package."""
    import importlib.util

    if not isinstance(cfg, str) or not cfg.endswith((".yaml", ".yml")) or Path(cfg).name != cfg:
        return False
    spec = importlib.util.find_spec("ultralytics")
    if spec is None or not spec.submodule_search_locations:
        return False
    import re

    unified = re.sub(r"(\d+)([nslmx])(.+)?$", r"\1\3", cfg)  # yolov5n.yaml -> yolov5.yaml, as ultralytics reads it
    root = Path(next(iter(spec.submodule_search_locations))) / "cfg" / "models"
    return any(root.rglob(cfg)) or any(root.rglob(unified))


def _one_line(e: Exception) -> str:
    """``Type: first line of the message`` of a library's exception."""
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _head_inputs(model) -> list[int]:
    """Channels of the three feature maps (layers 17, 20, 23) that YOLOv5's anchor head reads."""
    head = model.model[-1]  # ultralytics' own (anchor-free) head over the same three maps: its input sizes
    return [int(branch[0].conv.in_channels) for branch in head.cv2]


class YoloV5StateDict:
    """YOLOv5 (anchor head) from a plain state dict + meta.json, backbone/neck built by ultralytics."""

    def __init__(self, folder: Path, device: str = "cpu"):
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
        meta = _read_meta(meta_path)
        self.names = meta["names"]
        self.strides = meta["strides"]
        self.anchors = torch.tensor(meta["anchors"], dtype=torch.float32)  # [3 levels, 3, 2]
        self._geo: dict = {}
        self.name = folder.name
        self.device = device
        from vsa.checkpoint import load_tensors

        sd = load_tensors(weights, "detector state dict")
        if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                               for k, v in sd.items()):
            raise VsaError("the detector's weights are not a plain {name: tensor} state dict", weights)
        import contextlib
        import io

        from ultralytics.nn.tasks import DetectionModel

        cfg = meta["cfg"]
        with contextlib.redirect_stdout(io.StringIO()):
            model = DetectionModel(cfg, nc=len(self.names), verbose=False)
        body = {k: v.float() for k, v in sd.items() if not k.startswith("model.24.")}
        try:
            missing, unexpected = model.load_state_dict(body, strict=False)
        except RuntimeError as e:  # a tensor of the wrong shape
            first = str(e).strip().splitlines()[-1].strip()[:200]
            raise VsaError(f"state dict does not match {cfg} ({first})", weights) from None
        missing = [k for k in missing if not k.startswith("model.24.")]
        if missing or unexpected:
            raise VsaError(f"state dict does not match {cfg}: missing {missing[:3]}, unexpected {unexpected[:3]}", weights)
        self.layers = model.model[:24].eval().to(device)
        no = 5 + len(self.names)
        heads = []
        for i, c_in in enumerate(_head_inputs(model)):
            w, bias = sd.get(f"model.24.m.{i}.weight"), sd.get(f"model.24.m.{i}.bias")
            if w is None or bias is None or tuple(w.shape) != (3 * no, c_in, 1, 1) or tuple(bias.shape) != (3 * no,):
                raise VsaError(f"head model.24.m.{i} must be a 1x1 convolution from {c_in} channels to 3 x (5 + "
                               f"{len(self.names)} classes) = {3 * no} outputs, as meta.json's names ask", weights)
            conv = torch.nn.Conv2d(c_in, 3 * no, 1)
            conv.weight.data.copy_(w.float())
            conv.bias.data.copy_(bias.float())
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


# globals a weights file may name beyond tensors and containers: plain data that ultralytics and numpy put in
# checkpoints (training arguments, metric scalars). Network layers are allowed by kind (_allowed_global).
_PLAIN_DATA = {
    "builtins.set", "builtins.frozenset", "builtins.slice", "types.SimpleNamespace",
    "ultralytics.utils.IterableSimpleNamespace", "pathlib.Path", "pathlib.PosixPath", "pathlib.WindowsPath",
    "numpy.dtype", "numpy._core.multiarray.scalar", "numpy.core.multiarray.scalar",
}
_LAYER_PACKAGES = ("torch.nn.modules.", "ultralytics.nn.")


def _allowed_global(name: str):
    """The object a checkpoint's GLOBAL ``name`` may resolve to, or None: a network layer class (a subclass of
    ``torch.nn.Module`` defined in torch.nn or ultralytics.nn, whose unpickling only sets attributes), a numpy
    dtype class, or an entry of :data:`_PLAIN_DATA`. Never a function: a function is what runs code."""
    import importlib

    import torch

    module, _, attr = name.rpartition(".")
    if not module or not attr.isidentifier():
        return None
    if name in _PLAIN_DATA or module == "numpy.dtypes" or module.startswith(_LAYER_PACKAGES):
        try:
            obj = getattr(importlib.import_module(module), attr, None)
        except Exception:  # no such module in this install: not a layer it knows
            return None
        if name in _PLAIN_DATA:
            return obj
        if module == "numpy.dtypes":
            import numpy as np

            return obj if isinstance(obj, type) and issubclass(obj, np.dtype) else None
        if isinstance(obj, type) and issubclass(obj, torch.nn.Module):
            return obj
    return None


def load_ultralytics_checkpoint(path):
    """The detection model of an ultralytics ``.pt`` checkpoint, read without running code from it: torch's
    ``weights_only`` unpickler with an allow-list of the network layers and plain data it names
    (:func:`_allowed_global`), through :func:`vsa.checkpoint.load_tensors`. A file that names anything else
    (``os.system``, ``builtins.eval``, a class of another package) is refused, in one line."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise VsaError("no such detector weights file", p)
    try:
        needed = torch.serialization.get_unsafe_globals_in_checkpoint(p)
    except Exception as e:
        raise VsaError(f"not a PyTorch checkpoint ({_one_line(e)})", p) from None
    allowed, refused = [], []
    for name in needed:
        obj = _allowed_global(name)
        if obj is None:
            refused.append(name)
        else:
            allowed.append((obj, name))
    if "numpy.dtype" in needed:  # numpy.dtype(...) returns an instance of its concrete class, which is then built
        import numpy as np

        allowed += [(c, f"numpy.dtypes.{c.__name__}") for c in vars(np.dtypes).values()
                    if isinstance(c, type) and issubclass(c, np.dtype)]
    if refused:
        raise VsaError(f"refused: loading it would call {', '.join(sorted(refused)[:3])}, and vsa loads only network "
                       "layers, tensors and plain data from a weights file (nothing that can run code); if you trust "
                       "the file, re-save the model alone with ultralytics (YOLO(path).save('clean.pt'))", p)
    from vsa.checkpoint import load_tensors

    ckpt = load_tensors(p, "detector weights file", allowed)
    model = None
    if isinstance(ckpt, dict):  # the EMA weights where training kept them, as ultralytics loads them
        model = ckpt.get("ema") if ckpt.get("ema") is not None else ckpt.get("model")
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "names"):
        raise VsaError("not an ultralytics detector checkpoint (no 'model' with class names)", p)
    return model


_WHERE = ("leave --detector out to use the detector inside vsa, or point --detector (or VSA_DETECTOR, or "
          "[regions] detector in vsa.toml) at a local weights file or a YOLOv5 state-dict folder")


def _fetch(name: str) -> Path:
    """A release name (``yolo11n.pt``) as a local file: where ultralytics keeps or downloads it."""
    hint = _WHERE
    try:
        from ultralytics.utils.downloads import GITHUB_ASSETS_NAMES
    except ImportError:
        GITHUB_ASSETS_NAMES = ()
    if name not in GITHUB_ASSETS_NAMES:
        raise VsaError(f"no such detector file, and not a model name ultralytics can download; {hint}", name)
    try:
        import contextlib
        import sys

        from ultralytics.utils.downloads import attempt_download_asset

        with contextlib.redirect_stdout(sys.stderr):  # stdout carries our JSONL
            got = Path(attempt_download_asset(name))
    except Exception as e:
        got = None
        why = _one_line(e)
    else:
        why = "nothing was downloaded"
    if got is None or not got.is_file():
        raise VsaError(f"cannot load detector {name!r}: it is not a local file and could not be downloaded "
                       f"(offline? {why}); {hint}")
    return got


class UltralyticsDetector:
    """An ultralytics detector: a ``.pt`` checkpoint read without unpickling code (:func:`load_ultralytics_checkpoint`),
    a release name that ultralytics downloads when online, or a model config ``*.yaml`` of ultralytics' own
    (untrained: for tests). Decoded with ultralytics' NMS, so its one-to-one (end-to-end) heads work too."""

    def __init__(self, spec: str, device: str = "cpu"):
        import contextlib
        import io

        p = Path(spec)
        if p.suffix in (".yaml", ".yml") and not p.exists():
            if not _packaged_cfg(spec):
                raise VsaError(f"unknown detector config {spec!r}: a .yaml detector must name a model config that "
                               "ships with ultralytics (such as yolov8n.yaml)")
            from ultralytics.nn.tasks import DetectionModel

            with contextlib.redirect_stdout(io.StringIO()):
                model = DetectionModel(spec, verbose=False)
            # the class names its trained weights would have: ultralytics' configs are COCO's 80 classes
            model.names = {i: f"class{i}" for i in range(int(model.model[-1].nc))}
        elif p.suffix in (".yaml", ".yml"):
            raise VsaError("a detector .yaml must be one of ultralytics' own model configs, given by name "
                           "(a model file can make ultralytics evaluate Python)", p)
        elif p.suffix != ".pt":
            raise VsaError("unsupported detector: give an ultralytics .pt checkpoint, a release name such as "
                           "yolo11n.pt, or a YOLOv5 state-dict folder (with meta.json)", p)
        elif not p.exists() and len(p.parts) > 1:
            raise VsaError(f"no such detector weights file; {_WHERE}", p)
        else:
            model = load_ultralytics_checkpoint(p if p.exists() else _fetch(spec))
        model = model.float().eval()
        with contextlib.suppress(Exception), contextlib.redirect_stdout(io.StringIO()):
            model = model.fuse(verbose=False)
        names = model.names
        self.names = [names[i] for i in sorted(names)] if isinstance(names, dict) else list(names)
        self.model = model.to(device)
        self.name = p.stem
        self.device = device
        self.end2end = bool(getattr(model, "end2end", False))

    def detect(self, images, opt: DetectOptions | None = None, **kw):
        import torch

        try:
            from ultralytics.utils.nms import non_max_suppression
        except ImportError:  # ultralytics before 8.3.1x kept it in ops
            from ultralytics.utils.ops import non_max_suppression

        opt = _sized(_options(opt, kw), images)
        x, metas = _letterbox(images, opt.imgsz)
        extra = {"end2end": True} if self.end2end else {}
        with torch.inference_mode():
            preds = self.model(x.to(self.device))
            kept = non_max_suppression(preds, opt.conf, opt.iou, max_det=max(opt.top * 5, 50), nc=len(self.names),
                                       **extra)
        out = []
        for det, meta in zip(kept, metas):
            det = det.float().cpu()
            order = det[:, 4].argsort(descending=True)
            det = det[order]
            out.append(_postprocess(det[:, :4], det[:, 4], det[:, 5].long(), self.names, meta,
                                    DetectOptions(opt.top, opt.conf, 1.0, opt.dedup, opt.imgsz)))
        return out


def is_yolov5_state_dict(spec: str) -> bool:
    p = Path(spec)
    if p.is_dir():
        return (p / "meta.json").exists()
    return p.is_file() and p.suffix == ".pt" and (p.parent / "meta.json").exists() and "state-dict" in p.name


def load_detector(spec: str | os.PathLike | None = None, device: str = "auto"):
    """The detector ``spec`` names: a YOLOv5 state-dict folder (or its ``*state-dict*.pt``) such as the packaged
    :data:`DEFAULT_DETECTOR` (used when ``spec`` is None), else an ultralytics detector (:class:`UltralyticsDetector`:
    a ``.pt`` path, or a release name such as ``yolo11n.pt`` downloaded when online). The spec is taken as given:
    the library reads no environment and no vsa.toml (the CLI resolves
    ``--detector``, ``$VSA_DETECTOR`` and ``[regions] detector``: :func:`vsa.cli.workspace.detector`)."""
    from vsa.runtime import pick_device

    spec = str(spec) if spec is not None else DEFAULT_DETECTOR
    dev = pick_device(device)
    # the detectors' NMS, imported now: imported first inside detect(), the import leaves the frames under it in a
    # reference cycle, and the images of that batch with them until the cycle collector runs (0.5 GB a 13300 px photo)
    import torchvision.ops  # noqa: F401
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
                 max_pixels: int | None = None, budget: int | None = None):
    """Regions records of image files ``[(path, key)]`` (``vsa regions``), detecting up to ``batch_size`` images at
    a time, with at most ``budget`` decoded pixels held at once (:func:`vsa.images.image_batches`: the batch being
    detected and the images decoded ahead; default :func:`vsa.images.pixel_budget`).

    Yields, batch by batch, ``(None, message)`` for an unreadable image (the one-line error naming it), then
    ``(record, None)`` for the others, in input order.
    """
    from vsa.images import image_batches

    opt = opt or DetectOptions()
    for batch in image_batches(files, batch_size, workers, max_pixels, budget):
        errors = [err for _, _, _, err in batch if err is not None]
        good = [(path, key, im) for path, key, im, err in batch if err is None]
        batch.clear()
        records = _detect_batch(detector, good, opt)  # no image stays referenced here while the next batch decodes
        for err in errors:
            yield None, err
        for rec in records:
            yield rec, None


def _detect_batch(detector, good: list, opt: DetectOptions) -> list[dict]:
    """The regions records of ``good`` (``(path, key, image)``, emptied)."""
    if not good:
        return []
    dets = detector.detect([im for _, _, im in good], opt)
    recs = [regions_record(key, os.fsdecode(path), im, d, detector.name) for (path, key, im), d in zip(good, dets)]
    good.clear()
    return recs


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
