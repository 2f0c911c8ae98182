"""Where a process runs: device, threads, seeds, and how an interrupt stops it.

Small and import-light (torch is imported inside the functions), so captioning or scoring can pick a
device without importing the torch.distributed glue of :mod:`vsa.distributed`.
"""

from __future__ import annotations

import contextlib
import signal

from vsa.errors import VsaError

INTERRUPTED = 130  # the exit code of every interrupted command (128 + SIGINT, as shells report Ctrl-C)


class Interrupted(VsaError):
    """Ctrl-C or SIGTERM stopped a command; the message says what was kept and how to continue."""

    exit_code = INTERRUPTED


def pick_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when present, else ``cpu``; an explicit CUDA device on a machine without one is a
    one-line error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise VsaError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
    return device


def set_threads(n: int | None) -> None:
    """torch intra-op threads; 0 or None leaves torch's default."""
    if n:
        import torch

        torch.set_num_threads(int(n))


def seed_all(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (dropout, initialisation)."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


_interrupt_pending = False


def _raise_interrupt(signum, frame):
    global _interrupt_pending
    _interrupt_pending = True
    raise KeyboardInterrupt


def raise_if_interrupted() -> None:
    """Raise again the KeyboardInterrupt of a SIGTERM that Python swallowed: a signal that lands while an at-fork
    callback runs (logging's, at every fork of a worker process) raises inside that callback, where Python prints
    "Exception ignored" and goes on. Long loops call this between items (the CLI's progress does), so the command
    still stops. Only in the main thread, where the signal handler runs."""
    import threading

    if _interrupt_pending and threading.current_thread() is threading.main_thread():
        raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Within the block SIGTERM raises KeyboardInterrupt, like Ctrl-C, so both stop a command the same way
    (between atomic writes). A no-op outside the main thread."""
    global _interrupt_pending
    try:
        old = signal.signal(signal.SIGTERM, _raise_interrupt)
    except ValueError:  # not the main thread
        yield
        return
    _interrupt_pending = False
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
        _interrupt_pending = False


def parse_shard(shard: str) -> tuple[int, int]:
    """``"K/N"`` -> ``(K, N)`` with 1 <= K <= N (a one-line error otherwise)."""
    parts = str(shard).split("/")
    try:
        k, n = (int(x) for x in parts) if len(parts) == 2 else (0, 0)
    except ValueError:
        k, n = 0, 0
    if not 1 <= k <= n:
        raise VsaError(f"--shard must be K/N with 1 <= K <= N, got {shard!r}")
    return k, n


def shard_of(items: list, shard: str | None) -> list:
    """Deterministic K/N share (1-based K) of a process's work: the K-th of N contiguous, near-equal blocks of
    ``items`` (``--shard K/N`` of embed, regions, align, caption). Contiguous blocks make the shards' outputs,
    concatenated or merged in order, one run's."""
    if not shard:
        return items
    k, n = parse_shard(shard)
    return items[(k - 1) * len(items) // n : k * len(items) // n]
