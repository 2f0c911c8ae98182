"""Training loop of the caption generator (``vsa train-mrnn``).

Cross-entropy with teacher forcing (Adam, dropout, optional label smoothing, per-epoch
LR decay), val perplexity and val BLEU/CIDEr (greedy, simple tokenizer) after every
epoch, best-on-val-CIDEr checkpoint, early stopping; then optionally self-critical
fine-tuning (SCST, CIDEr-D reward, mean-of-samples baseline); finally the decoding
defaults (beam size, length penalty) are chosen on val and stored in the checkpoint.

Two checkpoints: ``out`` (best on val, what users load) and ``<out stem>.last.pt``
(latest epoch with optimiser and RNG state, for ``--resume``).  Both are written
atomically, so Ctrl-C / SIGTERM leaves the last good ones intact.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vsa.data import CaptionDataset, Vocab, build_vocab
from vsa.decoding import decode, sample
from vsa.errors import VsaError
from vsa.mrnn import MRNNConfig, build_model

SEARCH_BEAMS = (1, 3, 5, 7)
SEARCH_PENALTIES = (0.0, 0.7)


@dataclass
class Split:
    """Inputs of one split: features per item, training sentences and references per item."""

    feats: torch.Tensor  # [M, D] or [M, R, D]
    mask: torch.Tensor | None  # [M, R] for regions
    sents: list[tuple[int, list[int]]]  # (item index, word ids) pairs
    refs: list[list[str]]  # reference sentences (raw text) per item
    ref_tokens: list[list[list[str]]]  # tokenised references per item
    items: list  # ImageRecord per item (or (key, region) pairs for region training)


def last_path(out) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".last" + (out.suffix or ".pt"))


# ----------------------------------------------------------------------------- data


def _stack_regions(store, keys: list[str], max_regions: int):
    R = min(max_regions, int(np.diff(store.offsets).max()))
    feats = torch.zeros(len(keys), R, store.dim)
    mask = torch.zeros(len(keys), R, dtype=torch.bool)
    for i, k in enumerate(keys):
        f = store[k][:R]
        feats[i, : len(f)] = torch.from_numpy(f)
        mask[i, : len(f)] = True
    return feats, mask


def image_split(ds: CaptionDataset, store, split: str, vocab: Vocab, max_len: int, regions: bool = False,
                max_regions: int = 64, skip_missing: bool = False, warn=None) -> Split:
    recs = ds.split(split)
    if not recs:
        raise VsaError(f"split {split!r} has no images", ds.source)
    recs = store.check_dataset(recs, skip_missing=skip_missing, warn=warn)
    keys = [r.key for r in recs]
    if regions:
        feats, mask = _stack_regions(store, keys, max_regions)
    else:
        feats = torch.from_numpy(np.stack([store.whole(k) for k in keys]))
        mask = None
    sents = []
    for i, r in enumerate(recs):
        for s in r.sentences:
            if s.tokens:
                sents.append((i, vocab.encode(s.tokens[:max_len])))
    refs = [[s.raw for s in r.sentences] for r in recs]
    ref_tokens = [[s.tokens for s in r.sentences] for r in recs]
    return Split(feats, mask, sents, refs, ref_tokens, recs)


def alignment_split(records: list[dict], store, split: str, vocab: Vocab, max_len: int, source="alignments") -> Split:
    """(region feature, snippet) pairs from alignments JSONL records of ``split``."""
    index: dict[tuple[str, int], int] = {}
    feats, sents, refs, toks, items = [], [], [], [], []
    for ln, rec in enumerate(records, 1):
        if rec.get("split", "train") != split:
            continue
        key = rec.get("key")
        if key is None or "snippets" not in rec or "tokens" not in rec:
            raise VsaError("alignment record needs 'key', 'tokens' and 'snippets'", source, ln)
        if key not in store:
            raise VsaError(f"image {key!r} is not in the features file {store.path}", source, ln)
        regs = store[key]
        for sn in rec["snippets"]:
            words = rec["tokens"][sn["start"] : sn["end"]]
            r = int(sn["region"])
            if not words or not 0 <= r < len(regs):
                continue
            j = index.get((key, r))
            if j is None:
                j = index[(key, r)] = len(feats)
                feats.append(regs[r])
                refs.append([])
                toks.append([])
                items.append((key, r))
            sents.append((j, vocab.encode(words[:max_len])))
            refs[j].append(" ".join(words))
            toks[j].append(list(words))
    if not feats:
        raise VsaError(f"no {split} snippets in the alignments", source)
    return Split(torch.from_numpy(np.stack(feats)), None, sents, refs, toks, items)


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


def _sub(sp: Split, idx: torch.Tensor, dev=None):
    f = sp.feats.index_select(0, idx)
    m = sp.mask.index_select(0, idx) if sp.mask is not None else None
    if dev is not None:
        f, m = f.to(dev), (m.to(dev) if m is not None else None)
    return f, m


def _dev(model) -> torch.device:
    return next(model.parameters()).device


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def perplexity(model, sp: Split, batch_size: int = 256) -> float:
    model.eval()
    dev = _dev(model)
    total, n = 0.0, 0
    for s in range(0, len(sp.sents), batch_size):
        idx, inp, tgt = batch_tensors(sp.sents[s : s + batch_size])
        f, m = _sub(sp, idx, dev)
        inp, tgt = inp.to(dev), tgt.to(dev)
        logits = model(f, inp, m)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=0, reduction="sum")
        total += float(loss)
        n += int((tgt != 0).sum())
    return math.exp(min(total / max(n, 1), 50.0))  # SCST models can have huge val perplexity: cap, no overflow


@torch.no_grad()
def generate(model, sp: Split, vocab: Vocab, beam: int = 1, max_len: int = 20, length_penalty: float = 0.0,
             batch_size: int = 100) -> list[str]:
    from vsa.decoding import bad_ending_ids

    model.eval()
    bad = bad_ending_ids(vocab) if model.cfg.bad_endings else None
    out = []
    for s in range(0, len(sp.feats), batch_size):
        idx = torch.arange(s, min(s + batch_size, len(sp.feats)))
        f, m = _sub(sp, idx, _dev(model))
        for h in decode(model, f, m, beam, max_len, length_penalty, bad, model.cfg.block_repeats):
            out.append(" ".join(vocab.decode(h.tokens)))
    return out


def val_scores(model, sp: Split, vocab: Vocab, beam: int = 1, max_len: int = 20, length_penalty: float = 0.0,
               metrics=("BLEU", "CIDEr"), tokenizer: str = "simple") -> dict:
    from vsa.caption_metrics import score_captions

    caps = generate(model, sp, vocab, beam, max_len, length_penalty)
    gts = {i: r for i, r in enumerate(sp.refs)}
    res = {i: c for i, c in enumerate(caps)}
    return score_captions(gts, res, metrics, tokenizer)


# ----------------------------------------------------------------------------- training


def _set_lr(opt, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


def _save(path, model, cfg, vocab, extractor, meta) -> None:
    from vsa.checkpoint import save_checkpoint

    save_checkpoint(path, "mrnn", cfg, vocab.words, extractor, model.state_dict(), meta)


def train(cfg: MRNNConfig, train_sp: Split, val_sp: Split, vocab: Vocab, out, extractor: dict, resume: bool = False,
          log=print, extra_meta: dict | None = None, choose_decoding: bool = True, device: str = "cpu",
          scst_lr: float | None = None, progress=None) -> dict:
    """Train, keeping the best-on-val checkpoint at ``out``; returns a summary dict.

    Under ``torchrun`` every rank takes a strided share of each global batch (DDP averages the
    gradients; the loss is normalised by the global batch, so the step is the one-process step);
    rank 0 alone evaluates on val, logs and writes checkpoints, and broadcasts the early-stopping
    decision. On CUDA the forward passes run under bfloat16 autocast.
    """
    from vsa import distributed as D

    env = D.setup(device)
    dev = torch.device(env.device)
    if not env.is_main:
        log = lambda *a, **k: None  # noqa: E731
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(out)
    last = last_path(out)
    torch.manual_seed(cfg.seed)
    cfg = dataclasses.replace(cfg, vocab_size=len(vocab), feat_dim=int(train_sp.feats.shape[-1]))
    model = build_model(cfg)
    # feature standardisation from the training features
    flat = train_sp.feats if train_sp.mask is None else train_sp.feats[train_sp.mask]
    flat = flat.reshape(-1, flat.shape[-1]).float()
    model.feat_mean.copy_(flat.mean(0))
    model.feat_std.copy_(flat.std(0).clamp_min(1e-3))
    history: list[dict] = []
    best = {"epoch": 0, "val_CIDEr": -1.0}
    start_epoch, phase = 1, "xe"
    t0 = time.time()
    elapsed0 = 0.0
    meta_common = dict(extra_meta or {})
    if resume:
        from vsa.checkpoint import config_from, load_checkpoint

        if not last.exists():
            raise VsaError(f"nothing to resume: {last} does not exist (train without --resume first)")
        ck = load_checkpoint(last, "mrnn")
        if ck["vocab"] != vocab.words:
            raise VsaError("the checkpoint's vocabulary differs from this dataset's (same dataset and --min-count?)", last)
        cfg = dataclasses.replace(config_from(MRNNConfig, ck["config"]), epochs=cfg.epochs, scst_epochs=cfg.scst_epochs)
        if scst_lr is not None:  # a new self-critical learning rate for the epochs still to run
            cfg = dataclasses.replace(cfg, scst_lr=scst_lr)
        model = build_model(cfg)
        model.load_state_dict(ck["state_dict"])
        m = ck["meta"]
        phase = m.get("phase", "xe")
    model = model.to(dev)
    ddp = D.wrap(model, env)
    if env.enabled:
        torch.manual_seed(cfg.seed + 1000 * env.rank)  # different dropout masks on different ranks
        log(f"distributed: {env.world} processes ({'nccl' if env.device.startswith('cuda') else 'gloo'}), "
            f"global batch {cfg.batch_size} split over them")
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr if phase == "xe" else cfg.scst_lr, weight_decay=cfg.weight_decay)
    if resume:
        osd = dict(m["optimizer"])
        osd["state"] = {int(k): v for k, v in osd["state"].items()}  # checkpoint dict keys are strings
        opt.load_state_dict(osd)
        torch.set_rng_state(m["rng"])
        history, best = m["history"], m["best"]
        start_epoch = int(m["epoch"]) + 1
        elapsed0 = float(m.get("train_seconds", 0.0))
        log(f"resumed from {last} at epoch {start_epoch} ({phase})")

    def snapshot(epoch: int, phase: str, improved: bool) -> None:
        if not env.is_main:
            return
        meta = dict(meta_common, epoch=epoch, phase=phase, history=history, best=best,
                    train_seconds=elapsed0 + time.time() - t0)
        if improved:
            _save(out, model, cfg, vocab, extractor, meta)
        _save(last, model, cfg, vocab, extractor,
              dict(meta, optimizer=opt.state_dict(), rng=torch.get_rng_state()))

    # ------------------------------------------------------------ cross-entropy phase
    stale = 0 if not history else epoch_since_best(history, best)
    total_epochs = cfg.epochs + cfg.scst_epochs
    scorer = None
    for epoch in range(start_epoch, total_epochs + 1):
        phase = "xe" if epoch <= cfg.epochs else "scst"
        if phase == "xe" and stale >= cfg.patience:
            continue
        if phase == "scst" and (epoch == cfg.epochs + 1 or scorer is None):
            if epoch == cfg.epochs + 1 and best["epoch"] and out.exists():
                # fine-tune from the best cross-entropy weights
                from vsa.checkpoint import load_checkpoint

                model.load_state_dict(load_checkpoint(out, "mrnn")["state_dict"])  # shared file system under torchrun
                opt = torch.optim.Adam(model.parameters(), lr=cfg.scst_lr)
            from vsa.caption_metrics import CiderD

            scorer = CiderD([ends(r) for r in train_sp.ref_tokens])
        te = time.time()
        if phase == "xe":
            lr = cfg.lr * (cfg.lr_decay ** max(0, epoch - cfg.lr_decay_start)) if epoch > cfg.lr_decay_start else cfg.lr
            _set_lr(opt, lr)
            tick = _ticker(progress if env.is_main else None, f"epoch {epoch} xe", _n_batches(train_sp, cfg.batch_size))
            train_loss = _xe_epoch(model, opt, train_sp, cfg, epoch, ddp, env, tick)
        else:
            lr = cfg.scst_lr
            n_img = max(1, cfg.batch_size // cfg.scst_samples)
            tick = _ticker(progress if env.is_main else None, f"epoch {epoch} scst", -(-len(train_sp.feats) // n_img))
            train_loss = _scst_epoch(model, opt, train_sp, cfg, epoch, scorer, vocab, ddp, env, tick)
        if not env.is_main:  # rank 0 evaluates, saves and says whether to stop
            D.barrier(env)
            stale = D.broadcast_object(None, env)
            continue
        ppl = perplexity(model, val_sp)
        sc = val_scores(model, val_sp, vocab, 1, cfg.max_len)
        rec = {"epoch": epoch, "phase": phase, "lr": lr, "train_loss": round(train_loss, 4), "val_ppl": round(ppl, 3),
               **{f"val_{k}": v for k, v in sc.items()}, "seconds": round(time.time() - te, 1)}
        history.append(rec)
        improved = sc["CIDEr"] > best["val_CIDEr"]
        if improved:
            best = {"epoch": epoch, "phase": phase, **{f"val_{k}": v for k, v in sc.items()}, "val_ppl": rec["val_ppl"]}
            stale = 0
        else:
            stale += 1
        snapshot(epoch, phase, improved)
        log(f"epoch {epoch:2d} {phase:4s} loss {train_loss:.3f}  val ppl {ppl:6.2f}  BLEU-4 {sc['BLEU-4']:5.2f}  "
            f"CIDEr {sc['CIDEr']:5.2f}{'  *best' if improved else ''}  ({rec['seconds']:.0f}s)")
        D.barrier(env)
        D.broadcast_object(stale, env)
    train_seconds = elapsed0 + time.time() - t0
    summary = {"best": best, "history": history, "train_seconds": round(train_seconds, 1), "out": str(out),
               "world": env.world, "rank": env.rank}
    D.cleanup(env)
    if choose_decoding and env.is_main and out.exists():
        summary["decoding"] = choose_beam(out, val_sp, vocab, log=log)
    return summary


def epoch_since_best(history: list[dict], best: dict) -> int:
    return sum(1 for h in history if h["epoch"] > best.get("epoch", 0) and h.get("phase", "xe") == "xe")


def _images_per_batch(sp: Split, batch_size: int) -> int:
    per = max(1, round(len(sp.sents) / max(1, len(sp.feats))))  # sentences per image (5 for Flickr8K)
    return max(1, batch_size // per)


def _batches(sp: Split, batch_size: int, rng):
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


def _n_batches(sp: Split, batch_size: int) -> int:
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


def _xe_epoch(model, opt, sp: Split, cfg: MRNNConfig, epoch: int, ddp=None, env=None, tick=lambda: None) -> float:
    """One teacher-forced epoch; ``ddp`` is the (DDP-wrapped) model that runs the forward pass."""
    from vsa.distributed import DistEnv, share

    env = env or DistEnv()
    ddp = ddp if ddp is not None else model
    from vsa.mrnn import autocast

    model.train()
    dev = _dev(model)
    rng = np.random.RandomState(cfg.seed * 1000 + epoch)
    total, n = 0.0, 0
    for batch in _batches(sp, cfg.batch_size, rng):
        if len(batch) < env.world:
            continue  # a last batch too small to give every rank a sentence: skipped on every rank
        n_tokens = sum(len(w) + 1 for _, w in batch)  # the global batch's targets (words + <end>)
        mine = batch[share(len(batch), env)]
        idx, inp, tgt = batch_tensors(mine)
        items, rows = torch.unique(idx, return_inverse=True)  # each image featurised once
        f, m = _sub(sp, items, dev)
        tgt = tgt.to(dev)
        sel = tgt != 0
        with autocast(dev, cfg.bf16):
            logits = ddp(f, inp.to(dev), m, select=sel, rows=rows.to(dev))
        loss = torch.nn.functional.cross_entropy(logits.float(), tgt[sel], label_smoothing=cfg.label_smoothing,
                                                 reduction="sum") / n_tokens
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


def sequence_logprob(model, feats, mask, seqs: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Summed log-probability of each sampled sequence (``<end>``-terminated, pad after), with gradients,
    under exactly the distribution :func:`vsa.decoding.sample` draws from (same constraints). Only the
    real positions are computed (the pads after ``<end>`` are not)."""
    from vsa.decoding import constrained_log_softmax

    B, T = seqs.shape
    inp = torch.cat([torch.full((B, 1), Vocab.start, dtype=torch.long, device=seqs.device), seqs[:, :-1]], 1)
    inp = torch.where(inp == Vocab.pad, torch.full_like(inp, Vocab.end), inp)
    valid = seqs != Vocab.pad  # a prefix of each row
    logits = model(feats, inp, mask, select=valid, rows=rows)  # [N, V], row-major over the valid positions
    first = torch.zeros_like(valid)
    first[:, 0] = True
    lp = constrained_log_softmax(logits, first[valid]).gather(1, seqs[valid][:, None]).squeeze(1)
    row = torch.arange(B, device=seqs.device)[:, None].expand(B, T)[valid]
    return torch.zeros(B, device=lp.device, dtype=lp.dtype).index_add(0, row, lp)


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


def _scst_epoch(model, opt, sp: Split, cfg: MRNNConfig, epoch: int, scorer, vocab: Vocab, ddp=None, env=None,
                tick=lambda: None) -> float:
    """Self-critical sequence training: reward CIDEr-D, baseline the mean reward of the other samples.

    Under torchrun every rank samples for its share of each global batch of images."""
    from vsa.distributed import DistEnv, share

    env = env or DistEnv()
    ddp = ddp if ddp is not None else model
    dev = _dev(model)
    from vsa.mrnn import autocast

    model.eval()  # no dropout: the sampled and the re-scored policy are the same
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
        f, m = _sub(sp, idx, dev)
        with autocast(dev, cfg.bf16):
            seqs = sample(model, f, m, n, cfg.max_len)
        words = [sample_words(row, itos) for row in seqs.tolist()]
        refs = [ref_end[int(i)] for i in idx for _ in range(n)]
        r = torch.tensor(scorer.score(words, refs)).view(len(idx), n)
        base = (r.sum(1, keepdim=True) - r) / max(n - 1, 1)
        adv = (r - base).flatten()
        rows = torch.arange(len(idx), device=dev).repeat_interleave(n)  # sample j reads image j // n
        with autocast(dev, cfg.bf16):
            lp = sequence_logprob(ddp, f, m, seqs, rows)
        loss = -(adv.to(dev) * lp).sum() / (len(glob) * n)  # the mean over the global batch's samples
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
    return total / max(count, 1)  # mean sample reward (CIDEr-D)


# ----------------------------------------------------------------------------- decoding defaults


def choose_beam(path, val_sp: Split, vocab: Vocab, beams=SEARCH_BEAMS, penalties=SEARCH_PENALTIES, log=print) -> dict:
    """Pick beam size and length penalty on val (by CIDEr, then BLEU-4); store them in the checkpoint."""
    from vsa.checkpoint import load_checkpoint, save_checkpoint
    from vsa.mrnn import model_from_checkpoint

    ck = load_checkpoint(path, "mrnn")
    model = model_from_checkpoint(ck)
    cfg = ck["config"]
    results = []
    for b in beams:
        for lp in penalties if b > 1 else (0.0,):
            sc = val_scores(model, val_sp, vocab, b, cfg["max_len"], lp)
            results.append({"beam": b, "length_penalty": lp, **sc})
            log(f"val beam {b} lp {lp:.1f}: BLEU-4 {sc['BLEU-4']:5.2f} CIDEr {sc['CIDEr']:5.2f}")
    best = max(results, key=lambda r: (r["CIDEr"], r["BLEU-4"]))
    cfg["beam"], cfg["length_penalty"] = best["beam"], best["length_penalty"]
    meta = dict(ck["meta"], decoding_search=results)
    save_checkpoint(path, "mrnn", cfg, ck["vocab"], ck["extractor"], ck["state_dict"], meta)
    log(f"decoding default: beam {best['beam']}, length penalty {best['length_penalty']}")
    return {"beam": best["beam"], "length_penalty": best["length_penalty"], "search": results}


def export_half(src, dst) -> None:
    """Copy a checkpoint with float16 weights (half the size; loading casts back to float32)."""
    from vsa.checkpoint import load_checkpoint, save_checkpoint

    ck = load_checkpoint(src, "mrnn")
    sd = {k: v.half() if v.is_floating_point() else v for k, v in ck["state_dict"].items()}
    # no optimiser state, and no path to this machine's training features (meaningless where the copy is used)
    meta = {k: v for k, v in ck["meta"].items() if k not in ("optimizer", "rng", "features")}
    save_checkpoint(dst, "mrnn", ck["config"], ck["vocab"], ck["extractor"], sd, meta)
