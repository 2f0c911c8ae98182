"""The caption-model interface (:class:`CaptionModel`), the registry of architectures, and the common base class.

Everything that trains, decodes, mixes or scores generators talks to a caption model through :class:`CaptionModel`
alone:

* training (:mod:`vsa.generator.train`): the teacher-forced ``forward`` (cross-entropy; self-critical re-scoring through
  :func:`vsa.generator.decoding.sequence_logprob`), the standardisation ``stats`` (:class:`vsa.nn.Standardize`) it sets
  to the training features' moments before the first epoch, ``cfg.cells`` (box dropout);
* decoding (:mod:`vsa.generator.decoding`: greedy, beam search, constrained beam search, sampling): ``init_state`` and
  ``step``; a state is a dict of tensors whose first axis is the batch, so hypotheses are kept, repeated and dropped
  with ``index_select(0, rows)`` whatever the state holds;
* ensembles and mirror decoding (:class:`vsa.generator.model.GeneratorEnsemble`, :func:`vsa.generator.model.with_mirror`): ``init_state``,
  ``step`` and ``cfg.feat_dim``;
* re-ranking (:mod:`vsa.rerank`): ``forward`` through :func:`vsa.generator.decoding.sequence_logprob`;
* inputs: ``reads_regions(cfg)`` and ``features_key(cfg)``, asked of the class before any model is built (by
  training, ``vsa caption``, ``vsa eval`` and the workspace's defaults).
* optional, for an architecture that writes its features' labels (:mod:`vsa.generator.models.labelled`): the
  classmethod ``training_vocab(vocab, features_meta)`` (the training vocabulary it needs) and ``setup(vocab,
  features_meta, glove)`` (its tables, before the first training step); training calls them when present.

An architecture is a class registered under a name with ``@register_caption_model("name")``; ``GeneratorConfig.arch``
names it and a checkpoint stores that name, never code, and the weights (``state_dict``). The built-in
architectures are the other modules of this package, each registering itself when :mod:`vsa.generator.models`
imports it: a new architecture is one module here (or, for a model of one's own, any module imported before its
checkpoint is loaded). :class:`CaptionModelBase` gives the common parts.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from vsa.errors import VsaError
from vsa.generator.decoding import DecodingConfig
from vsa.nn import Standardize


class CaptionModel(Protocol):
    """What a caption model provides (an ``nn.Module``); ``cfg`` is its :class:`vsa.generator.model.GeneratorConfig`."""

    cfg: Any  # vsa.generator.model.GeneratorConfig (not imported here: vsa.generator.model imports this package)
    stats: Standardize  # the training features' per-dimension mean and std, which init_state standardises with;
    # saved in the checkpoint as `feat_mean` / `feat_std`
    decoding: DecodingConfig  # the checkpoint's decoding defaults, set by whoever loads or trains it (or DecodingConfig())

    @classmethod
    def reads_regions(cls, cfg) -> bool:
        """Does a model of ``cfg`` read rows ``[B, R, D]`` (the whole image first, then regions or grid cells)
        rather than one vector ``[B, D]`` per image?"""

    @classmethod
    def features_key(cls, cfg) -> str:
        """The vsa.toml key of the features a model of ``cfg`` reads by default: ``features.whole``,
        ``features.regions`` (detector boxes) or ``features.grid`` (grid cells)."""

    def init_state(self, feats: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The state before ``<start>`` of images ``feats`` (``[B, D]``, or ``[B, R, D]`` with ``mask`` ``[B, R]``,
        True = a real row): a dict of tensors, batch first."""

    def step(self, tokens: torch.Tensor, state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One word for every row: ``tokens`` ``[B]`` -> float32 log-probabilities ``[B, V]`` of the next word and the
        next state."""

    def forward(self, feats: torch.Tensor, inputs: torch.Tensor, mask: torch.Tensor | None = None,
                select: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher forcing: ``inputs`` ``[B, T]`` (``<start>`` then the words) -> logits ``[B, T, V]`` whose
        log-softmax at ``t`` is what ``step`` gives after ``inputs[:, :t + 1]``, or ``[N, V]``: the positions where
        the boolean ``select`` ``[B, T]`` is True, row-major (each row's True positions are a prefix). ``rows`` ``[B]``:
        sentence ``b`` reads image ``rows[b]`` of ``feats`` (each image's features given once)."""


_ARCHS: dict[str, type] = {}


def register_caption_model(name: str):
    """Class decorator: register a caption model class under ``name`` (``GeneratorConfig.arch``, ``vsa train-mrnn
    --arch``); it is built as ``cls(cfg)``. A name is registered once."""

    def add(cls: type) -> type:
        if _ARCHS.get(name, cls) is not cls:
            raise ValueError(f"caption model {name!r} is already registered ({_ARCHS[name].__qualname__})")
        _ARCHS[name] = cls
        return cls

    return add


def caption_model_names() -> list[str]:
    """The registered architectures' names, sorted."""
    return sorted(_ARCHS)


def caption_model_class(name: str) -> type:
    """The class registered as ``name``; an unknown name is a one-line :class:`VsaError` listing the known ones."""
    cls = _ARCHS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise VsaError(f"unknown caption model architecture {name!r:.60} (registered: {', '.join(caption_model_names())})")
    return cls


def reorder_state(st: dict, index: torch.Tensor) -> dict:
    """Select / repeat batch rows of a state."""
    return {k: v.index_select(0, index) for k, v in st.items()}


def _stats_keys_out(module, state_dict, prefix, local_metadata):
    """State-dict hook: ``stats.mean`` / ``stats.std`` under their checkpoint names, in place and in order."""
    names = {prefix + k: prefix + v for k, v in module._STATS_KEYS.items()}
    items = [(names.get(k, k), v) for k, v in state_dict.items()]
    state_dict.clear()
    state_dict.update(items)


def _stats_keys_in(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """Load pre-hook: a checkpoint's ``feat_mean`` / ``feat_std`` into ``stats``."""
    for k, v in module._STATS_KEYS.items():
        if prefix + v in state_dict:
            state_dict[prefix + k] = state_dict.pop(prefix + v)


class CaptionModelBase(nn.Module):
    """The common part of a caption model: the features' standardisation (``stats``, :meth:`prepare`),
    ``step`` from one step's logits (:meth:`logits`), a teacher-forced ``forward`` running :meth:`logits` over the
    sentence, and the inputs of a whole-image model. A subclass builds its layers after calling this ``__init__``
    and gives :meth:`init_state` and :meth:`logits`; it may replace ``forward`` by a faster one giving the same
    logits, and ``reads_regions`` when it reads regions."""

    summary = ""  # a few words for `vsa train-mrnn --help`

    # the state-dict keys of ``stats``'s buffers: a generator's checkpoints name them so (docs/formats.md)
    _STATS_KEYS = {"stats.mean": "feat_mean", "stats.std": "feat_std"}

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.decoding = DecodingConfig()  # the defaults until a checkpoint's or the trainer's replace them
        self.stats = Standardize(cfg.feat_dim)
        # the private registrations: present in every torch vsa supports (>= 2.1)
        self._register_state_dict_hook(_stats_keys_out)
        self._register_load_state_dict_pre_hook(_stats_keys_in, with_module=True)

    @classmethod
    def reads_regions(cls, cfg) -> bool:
        return False

    @classmethod
    def features_key(cls, cfg) -> str:
        return "features.regions" if cls.reads_regions(cfg) else "features.whole"

    def prepare(self, feats: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``feats`` ``[B, D]`` or ``[B, R, D]`` as standardised float32 rows ``[B, R, D]`` (a vector is one row,
        the whole image) and their mask ``[B, R]`` (all rows real when ``mask`` is None)."""
        if feats.dim() == 2:
            feats = feats[:, None]
        if mask is None:
            mask = torch.ones(feats.shape[:2], dtype=torch.bool, device=feats.device)
        return self.stats(feats.float()), mask

    def init_state(self, feats: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def sentence_states(self, feats: torch.Tensor, mask: torch.Tensor | None = None,
                        rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The teacher-forced ``forward``'s first state: :meth:`init_state` of the images, row ``rows[b]`` for
        sentence ``b`` (each image's features given once; None: one sentence per image)."""
        st = self.init_state(feats, mask)
        return st if rows is None else reorder_state(st, rows)

    def logits(self, tokens: torch.Tensor, st: dict) -> tuple[torch.Tensor, dict]:
        """One word for every row: ``tokens`` ``[B]`` -> the next word's logits ``[B, V]`` and the next state."""
        raise NotImplementedError

    def step(self, tokens: torch.Tensor, st: dict) -> tuple[torch.Tensor, dict]:
        logits, st = self.logits(tokens, st)
        return torch.log_softmax(logits.float(), dim=-1), st

    def forward(self, feats: torch.Tensor, inputs: torch.Tensor, mask: torch.Tensor | None = None,
                select: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
        st = self.sentence_states(feats, mask, rows)
        out = []
        for t in range(inputs.shape[1]):
            logits, st = self.logits(inputs[:, t], st)
            out.append(logits)
        logits = torch.stack(out, 1)
        return logits if select is None else logits[select]
