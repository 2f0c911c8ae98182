"""The one training skeleton of every stage (``vsa train-align``, ``vsa train-mrnn``).

A stage (:class:`Stage`) provides only its batches, its step and its validation: ``train_epoch``,
``validate``, ``checkpoint`` (what to save) and ``restore`` (``--resume``). :func:`fit` owns the rest:

* the epoch loop, early stopping (``patience`` epochs without a better ``select`` metric, counted over the
  epochs the stage says may stop early), best/last checkpoints: ``out`` is the best-on-val model,
  ``<out stem>.last.pt`` the latest epoch with the optimiser and RNG state;
* one JSON line per epoch in ``<out stem>.log.jsonl`` (loss, learning rate, val metrics, seconds);
* torch.distributed: every rank trains its share (the stage's business), rank 0 alone validates, logs and
  writes, then tells the others whether to stop;
* a loss that is NaN or infinite stops training with a one-line error (:class:`Diverged`) before anything of
  that epoch is written, and a val figure that is NaN or infinite never counts as better: ``out`` only ever
  holds finite weights;
* Ctrl-C and SIGTERM: training stops between atomic checkpoint writes and :class:`vsa.runtime.Interrupted`
  (exit code 130 in the CLI) says which files are intact and how to continue.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Callable, Protocol

from vsa.errors import VsaError, writing


class Diverged(VsaError):
    """Training met a NaN or infinite loss (or weights): the step that made them is not kept."""


def finite(x) -> bool:
    """Is ``x`` a real number that is neither NaN nor infinite (a loss, a val figure)?"""
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def check_loss(loss, where: str, path=None) -> None:
    """A :class:`Diverged` error unless ``loss`` (a number or a one-element tensor) is finite; ``where``: which step."""
    if not finite(loss):
        raise Diverged(f"{where}: the training loss is {float(loss)} (the features hold NaN or infinite values, or "
                       "the model diverged: try a lower learning rate); nothing of this epoch was written", path)


def nonfinite_weights(state_dict: dict) -> str | None:
    """The name of the first floating-point tensor of ``state_dict`` that holds NaN or infinite values, else None."""
    import torch

    for k, v in state_dict.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
            return k
    return None


def last_path(out) -> Path:
    """``<out stem>.last.pt``: the latest epoch with optimiser and RNG state (for ``--resume``)."""
    out = Path(out)
    return out.with_name(out.stem + ".last" + (out.suffix or ".pt"))


def log_path(out) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".log.jsonl")


def load_last(out, kind: str) -> dict:
    """The ``.last.pt`` checkpoint to resume from (a one-line error when there is none)."""
    from vsa.checkpoint import load_checkpoint

    p = last_path(out)
    if not p.exists():
        raise VsaError(f"nothing to resume: {p} does not exist (train without --resume first)", p)
    return load_checkpoint(p, kind)


class Stage(Protocol):
    """What a trainable stage gives :func:`fit`."""

    kind: str  # checkpoint kind: "align" | "mrnn"
    select: str  # the val metric that picks the best epoch (higher is better): "rsum", "CIDEr"

    def train_epoch(self, epoch: int, progress) -> dict: ...  # one epoch (1-based); stats such as loss, lr

    def validate(self, epoch: int) -> dict: ...  # val metrics (rank 0 only), ``select`` among them

    def may_stop(self, epoch: int) -> bool: ...  # does early stopping apply to this epoch?

    def checkpoint(self) -> dict: ...  # save_checkpoint's keyword arguments except path/optimizer/rng ("meta": added keys)

    def optimizer_state(self) -> dict: ...

    def restore(self, ckpt: dict) -> None: ...  # weights + optimiser state of a .last.pt checkpoint


def step_decay(lr: float, decay: float, start: int, every: int, epoch: int) -> float:
    """The learning rate of (1-based) ``epoch`` under the trainers' one schedule (``lr``, ``lr_decay``,
    ``lr_decay_start``, ``lr_decay_every``): ``lr`` for the first ``start`` epochs, then multiplied by ``decay``
    once, and again after every further ``every`` epochs (``every`` 0: only once)."""
    if epoch <= start:
        return lr
    steps = 1 if every <= 0 else (epoch - start - 1) // every + 1
    return lr * decay**steps


def validates(epoch: int, epochs: int, every: int) -> bool:
    """Is ``epoch`` (1-based) one to validate: every ``every``-th epoch and always the last (``every`` <= 1: all)."""
    return every <= 1 or epoch % every == 0 or epoch == epochs


def fit(stage: Stage, out, epochs: int, env, info: Callable = print, progress=None, patience: int = 0,
        resume: dict | None = None, meta: dict | None = None, describe: Callable | None = None, log=None,
        val_every: int = 1) -> dict:
    """Run epochs ``1..epochs`` of ``stage`` (after the ones done in ``resume``, a ``.last.pt`` checkpoint).

    ``val_every``: validate (and so choose the best model) after every ``val_every``-th epoch and the last one only
    (as open_clip's ``--val-frequency``); the other epochs' log records have no ``val`` and their checkpoints go to
    ``.last.pt`` alone.

    Returns ``{"best", "history", "epochs", "seconds", "out", "log", "world", "rank"}`` (``history``: every
    epoch's log record, resumed ones included; ``epochs``: how many ran in this call); ``best`` holds the best epoch's
    val metrics (``best[stage.select]``). ``describe(epoch, stats, val, improved)`` makes the log line;
    ``log`` is the metrics JSONL (default ``<out stem>.log.jsonl``).
    """
    import torch

    from vsa import distributed as D
    from vsa.checkpoint import save_checkpoint
    from vsa.io import append_jsonl
    from vsa.runtime import Interrupted, sigterm_as_interrupt

    out = Path(out)
    last, log = last_path(out), Path(log) if log is not None else log_path(out)
    if not env.is_main:  # only rank 0 talks
        info, progress = (lambda *a, **k: None), None
    start, best, history, seconds, stale = 0, None, [], 0.0, 0
    if resume is not None:
        stage.restore(resume)
        m = resume["meta"]
        start, best, history = int(m["epoch"]), m.get("best"), list(m.get("history", []))
        seconds = float(m.get("seconds", 0.0))
        stale = int(m.get("stale", 0))
        if "rng" in resume:
            torch.set_rng_state(resume["rng"])
        info(f"resuming after epoch {start} (best val {stage.select} "
             f"{best.get(stage.select) if best else '-'} at epoch {best.get('epoch') if best else '-'})")
    base = dict(meta or {})
    done_before = len(history)

    written = []  # epochs whose model went to ``out`` in this call

    def save(epoch: int, improved: bool) -> None:
        parts = stage.checkpoint()
        bad = nonfinite_weights(parts.get("state_dict") or {})
        if bad is not None:
            raise Diverged(f"epoch {epoch}: the weights ({bad}) hold NaN or infinite values, nothing of this epoch was "
                           "written" + (f" (the best model so far is epoch {written[-1]}'s)" if written else ""), out)
        m = {**base, **parts.pop("meta", {}), "epoch": epoch, "best": best, "history": history,
             "seconds": round(seconds, 1), "stale": stale}
        if improved:
            save_checkpoint(out, meta=m, **parts)
            written.append(epoch)
        save_checkpoint(last, meta=m, optimizer=stage.optimizer_state(), rng=torch.get_rng_state(), **parts)

    writer = contextlib.ExitStack()
    if env.is_main:  # one writer per checkpoint: a second run on the same --out is refused before its first epoch
        from vsa.io import output_lock

        writer.enter_context(output_lock(out, f"vsa train-{stage.kind}"))
    finished = False
    try:
        with sigterm_as_interrupt():
            for epoch in range(start + 1, epochs + 1):
                if patience and stage.may_stop(epoch) and stale >= patience:
                    continue
                t = time.time()
                stats = stage.train_epoch(epoch, progress)
                t_train = time.time() - t
                if "loss" in stats:
                    check_loss(stats["loss"], f"epoch {epoch}")
                if not env.is_main:  # rank 0 validates, saves and says whether to stop
                    D.barrier(env)
                    stale = D.broadcast_object(None, env)
                    continue
                val = stage.validate(epoch) if validates(epoch, epochs, val_every) else None
                seconds += time.time() - t
                # NaN compares false either way and inf beats everything: neither may pick the model
                improved = val is not None and finite(val.get(stage.select)) and (
                    best is None or val[stage.select] > best[stage.select])
                if improved:
                    best = {"epoch": epoch, **{k: v for k, v in stats.items() if k == "phase"}, **val}
                    stale = 0
                elif val is not None and stage.may_stop(epoch):
                    stale += 1
                rec = {"epoch": epoch, **stats, **({"val": val} if val is not None else {}), "best": improved,
                       "train_s": round(t_train, 1), "epoch_s": round(time.time() - t, 1), "seconds": round(seconds, 1)}
                history.append(rec)
                save(epoch, improved)
                log.parent.mkdir(parents=True, exist_ok=True)
                with writing(log), open(log, "ab") as fh:
                    append_jsonl(fh, rec)
                if val is None:
                    info(f"epoch {epoch}/{epochs} loss {stats.get('loss', float('nan')):.4f} (not validated: val every "
                         f"{val_every} epochs)")
                else:
                    info(describe(epoch, stats, val, improved) if describe else
                         f"epoch {epoch}/{epochs} {stats} | val {stage.select} {val[stage.select]}"
                         f"{' *' if improved else ''}")
                D.barrier(env)
                D.broadcast_object(stale, env)
        finished = True
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted; {f'the best checkpoint so far is {out}' if best else 'no epoch validated yet'}"
                          f", the last completed epoch is in {last} (continue with --resume)") from None
    finally:
        writer.close()
        D.cleanup(env, sync=finished)
    return {"best": best, "history": history, "epochs": len(history) - done_before, "seconds": round(seconds, 1),
            "out": str(out), "log": str(log),
            "world": env.world, "rank": env.rank}
