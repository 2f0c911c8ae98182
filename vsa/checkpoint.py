"""Checkpoints: plain tensors and primitives only, loaded with ``weights_only=True``.

Every trainable stage saves one file holding::

    {
      "format": "vsa",            # marks a vsa checkpoint
      "version": 1,               # bumped on incompatible changes
      "kind": "align" | "mrnn",   # which stage wrote it
      "config": {...},            # the stage's config dataclass, as a dict of primitives
      "vocab": ["a", "dog", ...], # vocabulary words (special tokens excluded)
      "extractor": {...},         # feature extractor name and settings (from the features NPZ)
      "state_dict": {...},        # model tensors
      "meta": {...},              # epoch, best val metrics, optimiser state for --resume, ...
    }

Nothing in it needs unpickling code: ``torch.load(path, weights_only=True)``
refuses any other object, so a malicious file cannot run code.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from vsa.errors import VsaError

FORMAT = "vsa"
VERSION = 1


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _plain(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def save_checkpoint(path, kind: str, config: Any, vocab: list[str], extractor: dict, state_dict: dict, meta: dict | None = None) -> None:
    """Save atomically (temp file + rename)."""
    import torch

    from vsa.io import atomic_write, deferred_signals

    ckpt = {
        "format": FORMAT,
        "version": VERSION,
        "kind": kind,
        "config": _plain(config),
        "vocab": list(vocab),
        "extractor": _plain(extractor or {}),
        "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
        "meta": _plain(meta or {}),
    }
    with deferred_signals(), atomic_write(path) as fh:  # Ctrl-C / SIGTERM land after the rename
        torch.save(ckpt, fh)


def _unpickling_reason(e: Exception) -> str:
    """The specific line of torch's long weights_only error (e.g. 'unsupported GLOBAL posix.system')."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    detail = [ln for ln in lines[1:] if not ln.startswith(("Check the documentation", "Please file an issue"))]
    return (detail[0] if detail else lines[0] if lines else "unsupported content")[:160]


def load_checkpoint(path, kind: str | None = None) -> dict:
    """Load a vsa checkpoint safely; clear errors for wrong kind, version or format."""
    import pickle

    import torch

    import warnings

    p = Path(path)
    if not p.exists():
        raise VsaError("no such checkpoint", p)
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on stderr: keep errors one line
            warnings.simplefilter("ignore")
            ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise VsaError("refused: not a plain-tensor checkpoint, it would need to unpickle code "
                       f"({_unpickling_reason(e)})", p) from None
    except Exception as e:
        raise VsaError(f"not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})", p) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise VsaError("not a vsa checkpoint (no 'format': 'vsa' marker)", p)
    if ckpt.get("version") != VERSION:
        raise VsaError(
            f"checkpoint version {ckpt.get('version')} is not supported by this vsa (expects {VERSION}); "
            "retrain it or use the vsa release that wrote it", p)
    if kind is not None and ckpt.get("kind") != kind:
        raise VsaError(f"is a '{ckpt.get('kind')}' checkpoint, expected '{kind}'", p)
    return ckpt


def config_from(cls, d: dict):
    """Rebuild a config dataclass from a checkpoint dict, ignoring unknown keys."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


def apply_overrides(cfg: Any, items: list[str], flag: str = "--set") -> Any:
    """Apply ``KEY=VALUE`` strings (``--set``) to the dataclass ``cfg`` in place, converting each value to
    the field's current type; an unknown key or a bad value is a one-line :class:`VsaError`."""
    names = [f.name for f in dataclasses.fields(cfg)]
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in names:
            raise VsaError(f"{flag} {item!r}: expected KEY=VALUE with KEY one of {', '.join(names)}")
        cur = getattr(cfg, key)
        try:
            if isinstance(cur, bool):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                v = value.lower() in ("true", "1", "yes")
            else:
                v = type(cur)(value)
        except ValueError:
            raise VsaError(f"{flag} {item!r}: {value!r} is not a valid {type(cur).__name__}") from None
        setattr(cfg, key, v)
    return cfg
