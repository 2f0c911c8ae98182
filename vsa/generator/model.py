"""The caption generator: its config (:class:`GeneratorConfig`), building a model of it, loading one from a checkpoint,
ensembles and mirror decoding.

The architectures live in :mod:`vsa.generator.models`, registered by name (``GeneratorConfig.arch``): the paper's
multimodal RNN (``rnn``, Sec. 3.2), neuraltalk2's LSTM (``lstm``), and top-down attention over grid cells or
regions (``updown``, the default). :class:`vsa.generator.models.CaptionModel` states what every one of them provides:
one step interface for decoding (``init_state``, ``step``) and a teacher-forced ``forward``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from vsa.generator.models import caption_model_class, caption_model_names


@dataclass
class GeneratorConfig:
    """The generator's architecture: everything needed to rebuild it (training settings are
    :class:`vsa.generator.train.GeneratorTrainConfig`, decoding defaults :class:`vsa.generator.decoding.DecodingConfig`)."""

    arch: str = "updown"  # a registered architecture (vsa.generator.models): updown, lstm, rnn, ...
    vocab_size: int = 0  # including the 4 special tokens (set from the vocabulary)
    feat_dim: int = 1280  # set from the features
    embed: int = 512
    hidden: int = 512
    dropout: float = 0.3  # on embeddings, attention features and outputs
    attention: bool = False  # lstm/rnn: attend over the region features (needs a regions features file)
    att_dim: int = 256
    max_regions: int = 64  # regions per image read from a regions/grid features file (whole image first)
    cells: int = 0  # g: the features' g x g image cells after the boxes (`vsa embed --cells`; set from the features)
    labels: int = 0  # classes whose one-hot, score and box follow each row's CNN channels (`vsa embed --labels`)

    # former names, read from older checkpoints and --set (vsa.checkpoint.config_from, apply_overrides)
    RENAMED: ClassVar[dict] = {"rnn": "arch"}


def _config(cfg) -> GeneratorConfig:
    """``cfg``, or its dict form (as a checkpoint stores it) as an :class:`GeneratorConfig`."""
    if isinstance(cfg, dict):
        from vsa.checkpoint import config_from

        return config_from(GeneratorConfig, cfg)
    return cfg


def region_rows(cfg) -> int:
    """Rows of an image's features a region/grid generator reads: the whole image and up to ``max_regions - 1``
    boxes (or grid cells), then the ``cells`` x ``cells`` image cells of ``vsa embed --cells`` features."""
    cfg = _config(cfg)
    return int(cfg.max_regions) + int(cfg.cells or 0) ** 2


def features_key(cfg) -> str:
    """The vsa.toml key naming the features a generator of this config (or its dict form) reads by default, as its
    architecture declares it: ``features.grid``, ``features.regions`` or ``features.whole``."""
    cfg = _config(cfg)
    return caption_model_class(cfg.arch).features_key(cfg)


def uses_regions(cfg) -> bool:
    """Does a generator of this config (or its dict form) read region rows ``[B, R, D]`` rather than one vector, as
    its architecture declares it?"""
    cfg = _config(cfg)
    return bool(caption_model_class(cfg.arch).reads_regions(cfg))


def build_model(cfg: GeneratorConfig) -> nn.Module:
    """A new model of ``cfg``: the architecture registered as ``cfg.arch`` (:mod:`vsa.generator.models`); an unknown
    name is a one-line error."""
    return caption_model_class(cfg.arch)(cfg)


def autocast(device: torch.device, enabled: bool = True):
    """bfloat16 autocast for training on ``device`` when ``enabled`` and it is a CUDA device; a no-op context
    on CPUs: at batches of about a hundred rows the casts there cost more than the faster matrix products gain
    (docs/benchmarks.md)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


def _field_ok(v, default) -> bool:
    """Is ``v`` a value of the type of the config field whose default is ``default``? (A field without a plain
    default, or defaulting to None, takes any value.)"""
    import dataclasses

    from vsa.io import is_number

    if default is None or default is dataclasses.MISSING:
        return True
    if isinstance(default, bool):
        return isinstance(v, bool)
    if isinstance(default, int):
        return isinstance(v, int) and not isinstance(v, bool)
    if isinstance(default, float):
        return is_number(v)
    return isinstance(v, type(default))


def _typed_config(cls, d: dict, path, part: str):
    """``cls`` from a checkpoint's ``part`` dict (unknown keys ignored); a value of the wrong type is a VsaError."""
    import dataclasses

    from vsa.checkpoint import config_from
    from vsa.errors import VsaError

    cfg = config_from(cls, d)
    for f in dataclasses.fields(cls):
        v = getattr(cfg, f.name)
        if not _field_ok(v, f.default):
            want = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}.get(
                type(f.default), type(f.default).__name__)
            raise VsaError(f"'{part}' {f.name} must be {want}, got {v!r:.60}", path)
    return cfg


def check_generator_config(cfg: GeneratorConfig, path=None) -> None:
    """A one-line VsaError (naming ``path``) for a generator config no model can be built from."""
    from vsa.errors import VsaError

    if cfg.arch not in caption_model_names():
        raise VsaError(f"'model' arch must be one of {', '.join(caption_model_names())}, got {cfg.arch!r:.60}", path)
    for name in ("feat_dim", "embed", "hidden", "att_dim", "max_regions"):
        if getattr(cfg, name) < 1:
            raise VsaError(f"'model' {name} must be at least 1, got {getattr(cfg, name)}", path)
    if cfg.vocab_size < 5:
        raise VsaError(f"'model' vocab_size must be at least 5 (4 special tokens and a word), got {cfg.vocab_size}", path)
    if cfg.cells < 0 or cfg.labels < 0:
        raise VsaError(f"'model' cells and labels must be at least 0, got {cfg.cells} and {cfg.labels}", path)
    if not 0 <= cfg.dropout < 1:
        raise VsaError(f"'model' dropout must be at least 0 and below 1, got {cfg.dropout}", path)


def _fit_weights(model: nn.Module, sd: dict, path) -> None:
    """Check that ``sd`` holds exactly ``model``'s tensors, shape for shape; a one-line VsaError naming the first
    missing, unexpected or misshapen ones otherwise."""
    from vsa.errors import VsaError

    from vsa.checkpoint import weight_problems

    problems = weight_problems(model.state_dict(), sd, "the model's")
    if problems:
        raise VsaError(f"checkpoint weights do not fit its model config: {problems}", path)


def model_from_checkpoint(ckpt: dict, device: str = "cpu", path=None) -> nn.Module:
    """Rebuild a model from a loaded ``mrnn`` checkpoint (weights cast to float32); its decoding defaults
    are ``model.decoding`` (:class:`vsa.generator.decoding.DecodingConfig`). A checkpoint whose config, decoding defaults,
    vocabulary or weights do not make a model is a one-line VsaError naming ``path`` (its file) and what is wrong."""
    from vsa.data import Vocab
    from vsa.generator.decoding import DecodingConfig
    from vsa.errors import VsaError

    cfg = _typed_config(GeneratorConfig, ckpt["model"], path, "model")
    check_generator_config(cfg, path)
    dec = _typed_config(DecodingConfig, ckpt.get("decoding") or {}, path, "decoding")
    if dec.beam < 1 or dec.max_len < 1:
        raise VsaError(f"'decoding' beam and max_len must be at least 1, got {dec.beam} and {dec.max_len}", path)
    if not 0 <= dec.mirror < 1:
        raise VsaError(f"'decoding' mirror must be at least 0 and below 1, got {dec.mirror}", path)
    n_words = len(Vocab(ckpt["vocab"]))
    if n_words != cfg.vocab_size:
        raise VsaError(f"the vocabulary has {n_words} entries (with the special tokens) but the model config "
                       f"{cfg.vocab_size}", path)
    dim = (ckpt.get("extractor") or {}).get("dim")
    if isinstance(dim, int) and not isinstance(dim, bool) and dim != cfg.feat_dim:
        raise VsaError(f"the extractor makes {dim}-dim features but the model config reads {cfg.feat_dim}", path)
    sd = {k: v.float() if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
    try:
        with torch.device("meta"):  # the shapes alone: a config of absurd sizes allocates nothing before it is refused
            _fit_weights(build_model(cfg), sd, path)
    except ValueError as e:  # an architecture's own refusal of its config
        raise VsaError(f"the model config makes no {cfg.arch} model ({e})", path) from None
    model = build_model(cfg)
    model.load_state_dict(sd)
    model.decoding = dec
    return model.to(device).eval()


class GeneratorEnsemble(nn.Module):
    """Several generators decoded as one (as ImageCaptioning.pytorch's ``eval_ensemble``): each step's
    distribution is the ``weights``-weighted mean of the members' word probabilities. It has a model's
    decoding interface (``init_state`` / ``step``, ``cfg``, ``decoding``: the first member's), so greedy and
    beam search take it as they take one model. The members must share the vocabulary and read the same
    features (one extractor record, all whole-image or all region/grid models): :func:`load_generators`
    checks that. ``slices``: members on different backbones (``vsa eval`` only): the input is their features side by
    side along the last axis and member i reads ``feats[..., a:b]`` of its ``(a, b)``."""

    def __init__(self, members: list, weights: list[float] | None = None, slices: list[tuple[int, int]] | None = None):
        super().__init__()
        from vsa.errors import VsaError

        if len(members) < 2:
            raise VsaError("an ensemble needs at least two generators")
        w = torch.tensor(weights if weights is not None else [1.0] * len(members), dtype=torch.float32)
        if len(w) != len(members) or not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or not bool((w > 0).any()):
            raise VsaError(f"need {len(members)} non-negative weights, not all zero, got {list(w.tolist())}")
        self.members = nn.ModuleList(members)
        if slices is not None and len(slices) != len(members):
            raise VsaError(f"{len(slices)} feature slices for {len(members)} generators")
        self.slices = slices
        # the members reading each block of the input, in order (one block: all read the same features)
        keys = slices or [None] * len(members)
        self.blocks = [[i for i, k in enumerate(keys) if k == b] for b in dict.fromkeys(keys)]
        self.register_buffer("log_w", torch.log(w / w.sum()))
        self.cfg = members[0].cfg
        self.decoding = members[0].decoding

    def init_state(self, feats: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
        def own(i):
            return feats if self.slices is None else feats[..., self.slices[i][0] : self.slices[i][1]]

        return {f"{i}.{k}": v for i, m in enumerate(self.members) for k, v in m.init_state(own(i), mask).items()}

    def step(self, tokens: torch.Tensor, st: dict) -> tuple[torch.Tensor, dict]:
        logps, new = [], {}
        for i, m in enumerate(self.members):
            pre = f"{i}."
            lp, s = m.step(tokens, {k[len(pre):]: v for k, v in st.items() if k.startswith(pre)})
            logps.append(lp)
            new.update({pre + k: v for k, v in s.items()})
        mixed = torch.logsumexp(torch.stack(logps) + self.log_w.to(logps[0].dtype)[:, None, None], 0)
        return mixed, new


def with_mirror(model, weight: float):
    """``model`` decoding a photo and its left-right mirror as one (test-time augmentation, ``decoding.mirror``):
    a :class:`GeneratorEnsemble` of the model with itself, weights ``1 - weight`` : ``weight``, whose input is the
    photo's features and the mirror image's side by side along the last axis (``torch.cat([f, f_mirror], -1)``);
    ``model`` itself when ``weight`` is 0. ``model`` may be an ensemble (members on one backbone)."""
    from vsa.generator.decoding import mirror_weight
    from vsa.errors import VsaError

    weight = mirror_weight(weight)
    if not weight:
        return model
    if isinstance(model, GeneratorEnsemble) and model.slices is not None:
        raise VsaError("mirror decoding of an ensemble across backbones is not supported: pass --mirror 0")
    d = model.cfg.feat_dim
    return GeneratorEnsemble([model, model], [1 - weight, weight], [(0, d), (d, 2 * d)]).eval()


def backbone(extractor: dict | None) -> tuple:
    """What makes two generators' features the same file: the extractor record's CNN, input and normalisation."""
    return tuple(str((extractor or {}).get(k)) for k in ("extractor", "input", "resize", "mean", "std"))


def load_generators(paths, device: str = "cpu", weights: list[float] | None = None, mixed_backbones: bool = False):
    """``(model, checkpoint)`` of one generator checkpoint, or of several as a :class:`GeneratorEnsemble` (the
    checkpoint: the first member's, which gives the vocabulary and the features to make). Members that differ in
    vocabulary, extractor or kind of input are refused with the member's path. ``mixed_backbones``: members may
    come from different CNNs (same crop and layout); the ensemble then reads their features side by side, one
    block per backbone in order of first appearance (``model.blocks``: the member indices of each block), as
    :func:`vsa.generator.evaluate.generate_split` builds them."""
    from itertools import accumulate

    from vsa.checkpoint import load_checkpoint
    from vsa.errors import VsaError

    paths = [paths] if not isinstance(paths, (list, tuple)) else list(paths)
    cks = [load_checkpoint(p, "mrnn") for p in paths]
    if weights is not None and len(weights) != len(paths):
        raise VsaError(f"{len(weights)} weights for {len(paths)} generators")
    models = [model_from_checkpoint(ck, device, p) for p, ck in zip(paths, cks)]
    if len(models) == 1:
        return models[0], cks[0]
    first = cks[0]
    dims: dict = {}  # backbone -> its feature size: members on one backbone read the same features
    ex0 = first.get("extractor") or {}
    for p, ck, m in zip(paths, cks, models):
        if list(ck["vocab"]) != list(first["vocab"]):
            raise VsaError("the ensemble's generators have different vocabularies", p)
        ex = ck.get("extractor") or {}
        for key in ("crop", "grid"):
            if ex0.get(key) != ex.get(key):
                raise VsaError(f"the ensemble's generators read different features ({key}: {ex.get(key)!r} vs "
                               f"{ex0.get(key)!r})", p)
        if not mixed_backbones and backbone(ex) != backbone(ex0):
            raise VsaError(f"the ensemble's generators read different features (CNN: {backbone(ex)} vs "
                           f"{backbone(ex0)})", p)
        c0 = models[0].cfg
        d = dims.setdefault(backbone(ex), m.cfg.feat_dim)
        if (uses_regions(m.cfg), region_rows(m.cfg), m.cfg.feat_dim) != (uses_regions(c0), region_rows(c0), d):
            raise VsaError("the ensemble's generators read different inputs (whole image vs regions, feature size or "
                           "regions per image)", p)
    starts = dict(zip(dims, accumulate([0, *dims.values()])))
    slices = [(starts[b], starts[b] + dims[b]) for b in (backbone(ck.get("extractor")) for ck in cks)]
    return GeneratorEnsemble(models, weights, slices if len(dims) > 1 else None).to(device).eval(), first


def export_generator(src, dst, half: bool = True, decoding: list[str] | None = None) -> dict:
    """Write a compact inference copy of a trained generator (float16 weights, no optimiser state): how
    ``vsa/assets/mrnn-flickr8k.pt`` and ``mrnn-regions-flickr8k.pt`` are made (``python -m vsa.generator.model SRC DST
    [FIELD=VALUE ...]``; ``decoding``: ``FIELD=VALUE`` strings of :class:`vsa.generator.decoding.DecodingConfig` chosen on
    val, replacing the trained file's)."""
    from vsa.checkpoint import apply_overrides, export_checkpoint
    from vsa.generator.decoding import DecodingConfig

    items = list(decoding or [])
    dec = apply_overrides(DecodingConfig(), items, "decoding")
    given = {item.partition("=")[0].strip().replace("-", "_") for item in items}
    keep = ("dataset", "mode", "epoch", "phase", "history", "best", "decoding_search", "seconds")
    return export_checkpoint(src, dst, "mrnn", keep, half, decoding={k: getattr(dec, k) for k in given})


if __name__ == "__main__":  # python -m vsa.generator.model SRC DST [FIELD=VALUE ...]
    import sys

    if len(sys.argv) < 3:
        sys.exit("usage: python -m vsa.generator.model TRAINED.pt OUT.pt [DECODING_FIELD=VALUE ...]  (e.g. beam=5 mirror=0.5)")
    info = export_generator(sys.argv[1], sys.argv[2], decoding=sys.argv[3:])
    print({k: v for k, v in info.items() if k not in ("history", "decoding_search")})
