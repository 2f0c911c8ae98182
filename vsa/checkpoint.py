"""Checkpoints: plain tensors and primitives only, loaded with ``weights_only=True``.

Every trainable stage saves one file holding, under fixed keys::

    {
      "format": "vsa",            # marks a vsa checkpoint
      "version": 2,               # bumped on incompatible changes (version 1 files are converted on load)
      "kind": "align" | "mrnn",   # which stage wrote it
      "model": {...},             # the model config (AlignModelConfig / GeneratorConfig): enough to rebuild it
      "train": {...},             # the training config (AlignTrainConfig / GeneratorTrainConfig)
      "decoding": {...},          # inference defaults chosen on val (generator: beam, ...; aligner: beta)
      "vocab": ["a", "dog", ...], # vocabulary words (special tokens excluded)
      "extractor": {...},         # feature extractor name and settings (from the features NPZ)
      "state_dict": {...},        # model tensors
      "meta": {...},              # epoch, best val metrics, history, features/dataset names, seconds
      "optimizer": {...},         # only in <stem>.last.pt: the optimiser's own state_dict, unchanged
      "rng": tensor,              # only in <stem>.last.pt: torch's RNG state
    }

Nothing in it needs unpickling code: ``torch.load(path, weights_only=True)``
refuses any other object, so a malicious file cannot run code.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Any

from vsa.errors import VsaError

FORMAT = "vsa"
VERSION = 2
KINDS = ("align", "mrnn")


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


def save_checkpoint(path, kind: str, model: Any, train: Any, decoding: Any, vocab: list[str], extractor: dict,
                    state_dict: dict, meta: dict | None = None, optimizer: dict | None = None, rng=None) -> None:
    """Save atomically (temp file + rename). ``optimizer`` (an optimiser's ``state_dict()``) and ``rng``
    are stored as they are, under their own keys (for ``--resume``)."""
    import torch

    from vsa.io import atomic_write, deferred_signals

    ckpt = {
        "format": FORMAT,
        "version": VERSION,
        "kind": kind,
        "model": _plain(model),
        "train": _plain(train or {}),
        "decoding": _plain(decoding or {}),
        "vocab": list(vocab),
        "extractor": _plain(extractor or {}),
        "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
        "meta": _plain(meta or {}),
    }
    if optimizer is not None:
        ckpt["optimizer"] = optimizer
    if rng is not None:
        ckpt["rng"] = rng
    buf = io.BytesIO()  # torch's zip writer turns a failed write (a full disk) into "unexpected pos": write it here
    torch.save(ckpt, buf)
    with deferred_signals(), atomic_write(path) as fh:  # Ctrl-C / SIGTERM land after the rename
        fh.write(buf.getbuffer())


# Version 1 kept one mixed ``config``. Its model and decoding fields are a closed, historical set, so the
# conversion needs no import of the model modules (which import this one).
_V1_MODEL = {
    "align": {"model", "rnn", "score", "global_weight", "global_encoder", "hidden", "embed", "norm", "standardize",
              "out_relu", "max_regions", "max_len", "dropout", "dropout_regions"},
    "mrnn": {"rnn", "vocab_size", "feat_dim", "embed", "hidden", "dropout", "attention", "att_dim", "max_regions"},
}
_V1_DECODING = {"align": {"beta"}, "mrnn": {"beam", "length_penalty", "max_len", "bad_endings", "block_repeats"}}


def _from_v1(ckpt: dict) -> dict:
    """A version-1 checkpoint (one mixed ``config``; optimiser/RNG state inside ``meta`` with string keys)
    in the version-2 layout."""
    kind = ckpt.get("kind")
    config = dict(ckpt.get("config") or {})
    meta = dict(ckpt.get("meta") or {})
    model_keys, decoding_keys = _V1_MODEL[kind], _V1_DECODING[kind]
    out = {k: v for k, v in ckpt.items() if k not in ("config", "meta")}
    out["version"] = VERSION
    out["model"] = {k: v for k, v in config.items() if k in model_keys}
    out["decoding"] = {k: v for k, v in config.items() if k in decoding_keys}
    if kind == "align" and "beta" in meta:  # the aligner's snippet-MRF beta lived in meta
        out["decoding"]["beta"] = meta.pop("beta")
    out["train"] = {k: v for k, v in config.items() if k not in model_keys and k not in decoding_keys}
    if kind == "mrnn" and "max_len" in config:  # one max_len served training and decoding
        out["train"]["max_len"] = config["max_len"]
    opt = meta.pop("optimizer", None)
    if opt is not None:
        out["optimizer"] = {"state": {int(k): v for k, v in opt["state"].items()},
                            "param_groups": opt["param_groups"]}
    if "rng" in meta:
        out["rng"] = meta.pop("rng")
    if "train_seconds" in meta and "seconds" not in meta:
        meta["seconds"] = meta.pop("train_seconds")
    if kind == "mrnn":  # version 1 kept val metrics as flat "val_CIDEr" keys; version 2 as best[...], history[i]["val"]
        meta = _mrnn_records_from_v1(meta)
    out["meta"] = meta
    return out


def _mrnn_records_from_v1(meta: dict) -> dict:
    def unflat(r: dict) -> tuple[dict, dict]:
        val = {k[4:]: v for k, v in r.items() if k.startswith("val_")}
        rest = {k: v for k, v in r.items() if not k.startswith("val_")}
        return rest, val

    meta = dict(meta)
    if isinstance(meta.get("best"), dict):
        rest, val = unflat(meta["best"])
        meta["best"] = {**rest, **val}
    hist = []
    for r in meta.get("history") or []:
        rest, val = unflat(r)
        if "train_loss" in rest:
            rest["loss"] = rest.pop("train_loss")
        hist.append({**rest, "val": val})
    if hist:
        meta["history"] = hist
    return meta


def _unpickling_reason(e: Exception) -> str:
    """The specific line of torch's long weights_only error (e.g. 'unsupported GLOBAL posix.system')."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    detail = [ln for ln in lines[1:] if not ln.startswith(("Check the documentation", "Please file an issue"))]
    return (detail[0] if detail else lines[0] if lines else "unsupported content")[:160]


def load_tensors(path, what: str = "checkpoint", allowed=()):
    """``torch.load(path, weights_only=True)``: whatever a weights file holds, never code. A pickle that would run
    code, a missing or unreadable file are one-line VsaErrors naming it (``what``: "checkpoint", "weights file").
    ``allowed``: ``(class, "module.Name")`` pairs the unpickler may also build (torch's ``safe_globals``), for files
    such as ultralytics checkpoints whose layers are pickled objects (:func:`vsa.regions.load_ultralytics_checkpoint`
    decides which)."""
    import pickle
    import warnings

    import torch

    p = Path(path)
    if not p.is_file():
        raise VsaError(f"no such {what}", p)
    try:
        # torch warns about pickle protocols on stderr: keep errors one line
        with warnings.catch_warnings(), torch.serialization.safe_globals(list(allowed)):
            warnings.simplefilter("ignore")
            return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise VsaError(f"refused: not a plain-tensor {what}, it would need to unpickle code "
                       f"({_unpickling_reason(e)})", p) from None
    except Exception as e:
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        raise VsaError(f"not a readable {what} ({type(e).__name__}: {first})", p) from None


def weight_problems(own: dict, sd: dict, whose: str) -> str | None:
    """How the tensors ``sd`` fail to fit a model whose state dict is ``own`` (missing, unexpected, misshapen:
    the first three), or None when they fit; ``whose`` names the model in the shape message."""
    problems = [f"missing {k}" for k in own if k not in sd]
    problems += [f"unexpected {k}" for k in sd if k not in own]
    problems += [f"{k} has shape {list(sd[k].shape)}, {whose} is {list(v.shape)}"
                 for k, v in own.items() if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    if not problems:
        return None
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    return "; ".join(problems[:3]) + more


def load_checkpoint(path, kind: str | None = None) -> dict:
    """Load a vsa checkpoint safely; clear errors for wrong kind, version or format."""
    import torch

    p = Path(path)
    if not p.exists():
        raise VsaError("no such checkpoint", p)
    ckpt = load_tensors(p, "checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise VsaError("not a vsa checkpoint (no 'format': 'vsa' marker)", p)
    if ckpt.get("version") == 1 and ckpt.get("kind") in KINDS:
        ckpt = _from_v1(ckpt)
    if ckpt.get("version") != VERSION:
        raise VsaError(
            f"checkpoint version {ckpt.get('version')} is not supported by this vsa (expects {VERSION}); "
            "retrain it or use the vsa release that wrote it", p)
    if kind is not None and ckpt.get("kind") != kind:
        raise VsaError(f"is a '{ckpt.get('kind')}' checkpoint, expected '{kind}'", p)
    _check_layout(ckpt, p, torch.Tensor)
    return ckpt


def _check_layout(ckpt: dict, p: Path, tensor: type) -> None:
    """The parts every stage reads, of the types it reads them as: a damaged or hand-made file is a one-line
    error naming the part, not a traceback from the model code."""
    for part in ("model", "vocab", "state_dict"):
        if part not in ckpt:
            raise VsaError(f"not a complete vsa checkpoint: no '{part}'", p)
    for part in ("model", "train", "decoding", "extractor", "meta", "state_dict"):
        v = ckpt.get(part)
        if v is not None and not isinstance(v, dict):
            raise VsaError(f"'{part}' must be a dict, got {type(v).__name__}", p)
    vocab = ckpt["vocab"]
    if not isinstance(vocab, (list, tuple)) or not all(isinstance(w, str) for w in vocab):
        raise VsaError(f"'vocab' must be a list of words, got {type(vocab).__name__}", p)
    bad = next((k for k, v in (ckpt["state_dict"] or {}).items() if not isinstance(k, str) or not isinstance(v, tensor)),
               None)
    if bad is not None:
        raise VsaError(f"'state_dict' entry {bad!r:.80} is not a tensor", p)


# ----------------------------------------------------------------------------- typed configs
# A config dataclass may list the former names of its fields in a class attribute ``RENAMED``: old name -> new name,
# or -> ``(new name, f)`` with ``f(value)`` giving ``{field: value}`` where the old setting meant something the new
# one says otherwise. Checkpoints, ``--set`` and :func:`configs_from` read a former name as its new one.


def renamed(cls) -> dict:
    """``cls``'s former field names (its ``RENAMED``; none when it has no such attribute)."""
    return dict(getattr(cls, "RENAMED", {}))


def _translate(cls, key: str, value) -> dict:
    """``{field: value}`` of one setting given under a former name ``key`` of ``cls``."""
    new = renamed(cls)[key]
    return new[1](value) if isinstance(new, tuple) else {new: value}


def _new_name(cls, key: str) -> str:
    new = renamed(cls)[key]
    return new[0] if isinstance(new, tuple) else new


def config_from(cls, d: dict):
    """The config dataclass ``cls`` from its dict form (a checkpoint's ``model`` / ``train`` / ``decoding``): the
    one reader of stored configs. A field the dict lacks gets the dataclass default, a former name is read as its
    new one (``RENAMED``), other unknown keys are ignored (a newer vsa's fields)."""
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in d.items() if k in names}
    for k, v in d.items():
        if k not in names and k in renamed(cls):
            kw.update(_translate(cls, k, v))
    return cls(**kw)


def configs_from(classes, fields: dict, what: str) -> tuple:
    """One instance of each config class of ``classes`` from one set of ``fields`` (each class takes the fields it
    has; former names as in :func:`config_from`); a name no class has is a one-line :class:`VsaError` naming
    ``what`` ("aligner", "generator")."""
    known = set().union(*({f.name for f in dataclasses.fields(c)} | set(renamed(c)) for c in classes))
    unknown = set(fields) - known
    if unknown:
        raise VsaError(f"unknown {what} config field(s): {', '.join(sorted(unknown))}")
    return tuple(config_from(c, fields) for c in classes)


def _typed(cur, value: str):
    """``value`` (a string) as the type of a field whose current value is ``cur``; ValueError if it is not one."""
    if isinstance(cur, bool):
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(value)
        return value.lower() in ("true", "1", "yes")
    return type(cur)(value)


def apply_overrides(cfgs: Any, items: list[str], flag: str = "--set", note=None) -> Any:
    """Apply ``KEY=VALUE`` strings (``--set``) in place to the dataclass ``cfgs`` (or to a tuple of
    dataclasses with disjoint fields, e.g. a model config and its training config), converting each value to
    the field's type; an unknown key or a bad value is a one-line :class:`VsaError`. A former name (``RENAMED``)
    sets its new field, and ``note(message)`` (if given) says so."""
    group = cfgs if isinstance(cfgs, (tuple, list)) else (cfgs,)
    owner = {f.name: c for c in group for f in dataclasses.fields(c)}
    former = {old: c for c in group for old in renamed(type(c))}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or (key not in owner and key not in former):
            raise VsaError(f"{flag} {item!r}: expected KEY=VALUE with KEY one of {', '.join(owner)}")
        cfg = owner.get(key) or former[key]
        field = key if key in owner else _new_name(type(cfg), key)
        cur = getattr(cfg, field)
        try:
            v = _typed(cur, value)
        except ValueError:
            raise VsaError(f"{flag} {item!r}: {value!r} is not a valid {type(cur).__name__}") from None
        if key in owner:
            setattr(cfg, key, v)
            continue
        now = _translate(type(cfg), key, v)
        if note is not None:
            note(f"{flag} {item}: read as {', '.join(f'{k}={x}' for k, x in now.items())} ({key} is now named {field})")
        for k, x in now.items():
            setattr(cfg, k, x)
    return cfgs


def trained_features(ckpt: dict, features=None, key: str = "features") -> Path | None:
    """The features file to evaluate ``ckpt`` on without computing any: ``features`` if given, else the file it
    was trained on (its ``meta``; ``key`` "flip_features": the mirrored images' file) when that still exists;
    None when there is none."""
    if features is not None:
        return Path(features)
    trained = (ckpt.get("meta") or {}).get(key)
    return Path(trained) if trained and Path(trained).exists() else None


def export_checkpoint(src, dst, kind: str, keep: tuple, half: bool = True, decoding: dict | None = None,
                      meta: dict | None = None) -> dict:
    """A compact inference copy of a trained checkpoint for shipping: float16 weights, no optimiser or RNG
    state, of its ``meta`` only the ``keep`` keys (no paths of this machine), ``exported_from`` the trained
    file's name (kept when ``src`` is itself an export); ``decoding`` / ``meta`` update those parts.
    Returns the written ``meta`` with the ``decoding`` defaults."""
    from pathlib import Path

    ck = load_checkpoint(src, kind=kind)
    sd = {k: (v.half() if half and v.is_floating_point() else v) for k, v in ck["state_dict"].items()}
    out_meta = {k: v for k, v in ck.get("meta", {}).items() if k in (*keep, "exported_from")}
    out_meta.setdefault("exported_from", Path(src).name)
    out_meta.update(meta or {})
    dec = {**dict(ck.get("decoding") or {}), **(decoding or {})}
    save_checkpoint(dst, kind, ck["model"], ck["train"], dec, ck["vocab"], ck["extractor"], sd, out_meta)
    return {**out_meta, "decoding": dec}

