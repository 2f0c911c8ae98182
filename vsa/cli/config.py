"""Workspace configuration: ``vsa.toml`` in the working directory.

A workspace names the dataset, the image root, the files each stage writes and
the models, so that bare commands (``vsa train-align``, ``vsa eval --split test``)
work.  Flags always override the file.  Relative paths in the file are relative
to the folder holding ``vsa.toml``.

Layout (every key optional; see ``vsa init``)::

    [dataset]
    path = "data/captions.txt"     # any supported layout (here: Kaggle's captions.txt)
    images = "data/Images"
    min_count = 5

    [regions]
    detector = "yolo11n.pt"        # default: the YOLOv5n COCO detector inside vsa
    top = 19
    out = "work/regions.jsonl"

    [features]
    cnn = "efficientnet-lite0"
    grid_cnn = "efficientnet-lite2"  # the CNN of --crop grid (the caption generator's; default: cnn)
    regions = "work/feats.npz"       # whole image + top-19 boxes per image
    whole = "work/whole.npz"         # whole image only
    grid = "work/grid.npz"           # whole image + 7x7 feature-map cells (vsa embed --crop grid; captioning)
    grid_flip = "work/grid-flip.npz" # the same of the mirrored images (vsa embed --crop grid --flip; training)

    [align]
    model = "work/align.pt"

    [mrnn]
    model = "work/mrnn.pt"

    [output]
    dir = "work"

Each stage writes its output where the next stage looks for it: ``regions.out``
is what ``embed`` reads, ``features.regions`` is what ``embed`` writes and
``train-align`` reads, ``align.model`` is what ``train-align`` writes and
``eval``/``align``/``score`` read, and so on.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vsa.errors import VsaError

CONFIG_NAME = "vsa.toml"
ENV_CONFIG = "VSA_CONFIG"

# keys whose values are paths (resolved relative to the config file)
PATH_KEYS = {
    "dataset.path",
    "dataset.images",
    "dataset.splits",
    "regions.detector",
    "regions.out",
    "features.regions",
    "features.whole",
    "features.grid",
    "features.grid_flip",
    "features.cnn_weights",
    "align.model",
    "align.alignments",
    "mrnn.model",
    "output.dir",
}

# where each stage writes by default inside output.dir, when the key is not set
DEFAULT_OUTPUTS = {
    "regions.out": "regions.jsonl",
    "features.regions": "feats.npz",
    "features.whole": "whole.npz",
    "features.grid": "grid.npz",
    "features.grid_flip": "grid-flip.npz",
    "align.model": "align.pt",
    "align.alignments": "alignments.jsonl",
    "mrnn.model": "mrnn.pt",
}

# the models shipped in the package (trained on Flickr8k): what a command uses when neither --model nor
# vsa.toml names an existing one
from vsa.assets import ASSETS, MODEL_NAMES, SHIPPED_MODELS  # noqa: E402,F401  (re-exported)

TEMPLATE = """\
# vsa workspace: every command takes its defaults from here; flags override.
# Relative paths are relative to this file.

[dataset]
path = {dataset}          # Karpathy JSON, Flickr8k token file folder, Kaggle captions.txt, or COCO annotations
images = {images}
# splits = "path/to/split-lists"   # folder of *train*.txt / *val*.txt / *test*.txt (layouts without splits)
min_count = 5               # vocabulary: words seen at least this often in train

[regions]
{detector_line}
top = 19
out = {regions_out}

[features]
cnn = "efficientnet-lite0"
grid_cnn = "efficientnet-lite2"   # vsa embed --crop grid: the shipped caption generator's CNN (default: cnn)
regions = {feats}
whole = {whole}
grid = {grid}               # vsa embed IMAGES --crop grid: what the caption generator attends over
grid_flip = {grid_flip}     # vsa embed IMAGES --crop grid --flip: mirrored copies train-mrnn also learns from

[align]
model = {align}
alignments = {alignments}

[mrnn]
model = {mrnn}

[output]
dir = {out}
"""


@dataclass
class Workspace:
    """The parsed ``vsa.toml`` (or an empty workspace when there is none)."""

    path: Path | None = None
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def root(self) -> Path:
        return self.path.parent if self.path else Path.cwd()

    def raw(self, key: str, default: Any = None) -> Any:
        section, _, name = key.partition(".")
        sec = self.data.get(section)
        if not isinstance(sec, dict):
            return default
        return sec.get(name, default)

    def get(self, key: str, default: Any = None) -> Any:
        """Value of ``section.key``; path keys come back as absolute-ish Paths."""
        value = self.raw(key)
        if value is None:
            if key in DEFAULT_OUTPUTS and self.raw("output.dir") is not None:
                return self.get("output.dir") / DEFAULT_OUTPUTS[key]
            return default
        if key in PATH_KEYS and isinstance(value, str):
            p = Path(os.path.expanduser(value))
            return p if p.is_absolute() else self.root / p
        return value

    def describe(self, key: str) -> str:
        section, _, name = key.partition(".")
        where = self.path if self.path else CONFIG_NAME
        return f"[{section}] {name} in {where}"


def find_config(start: Path | None = None) -> Path | None:
    env = os.environ.get(ENV_CONFIG)
    if env:
        p = Path(env)
        if not p.exists():
            raise VsaError(f"{ENV_CONFIG} points to a missing file", p)
        return p
    p = (start or Path.cwd()) / CONFIG_NAME
    return p if p.exists() else None


def load_workspace(path: Path | None = None) -> Workspace:
    """Load ``vsa.toml`` from ``path``, $VSA_CONFIG, or the working directory."""
    path = path or find_config()
    if path is None:
        return Workspace()
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as e:
        raise VsaError(f"invalid TOML ({e})", path) from None
    except OSError as e:
        raise VsaError(f"cannot read ({e.strerror})", path) from None
    return Workspace(Path(path), data)


_workspace: Workspace | None = None


def workspace() -> Workspace:
    """The current workspace, loaded once per process."""
    global _workspace
    if _workspace is None:
        _workspace = load_workspace()
    return _workspace


def reset_workspace() -> None:
    global _workspace
    _workspace = None


def resolve(value: Any, key: str, flag: str, required: bool = True, default: Any = None) -> Any:
    """Flag value if given, else the workspace value, else ``default``.

    With ``required`` and nothing found, raise a one-line error naming both the
    flag and the config key, e.g. ``no model given: pass --model or set [align]
    model in vsa.toml``.
    """
    if value is not None:
        return value
    ws = workspace()
    v = ws.get(key)
    if v is not None:
        return v
    if default is not None:
        return default
    if required:
        section, _, name = key.partition(".")
        where = ws.path if ws.path else f"{CONFIG_NAME} (none found in {Path.cwd()}; `vsa init` writes one)"
        raise VsaError(f"no {section} {name} given: pass {flag} or set [{section}] {name} in {where}")
    return None


def toml_string(value: str) -> str:
    """``value`` as a TOML basic string (quotes, backslashes and control characters escaped)."""
    import json

    return json.dumps(str(value), ensure_ascii=False)


def write_template(path: Path, dataset: str, images: str, detector: str | None, out: str) -> None:
    from vsa.io import atomic_write

    out = str(out).rstrip("/") or "."
    q = toml_string
    what = "# ultralytics weights (a .pt path, or a release name such as yolo11n.pt) or a YOLOv5 state-dict folder"
    detector_line = (f"detector = {q(detector)}     {what}" if detector else
                     f'# detector = "yolo11n.pt"   {what}; default: the YOLOv5n COCO detector inside vsa')
    text = TEMPLATE.format(dataset=q(dataset), images=q(images), detector_line=detector_line, out=q(out),
                           regions_out=q(f"{out}/regions.jsonl"), feats=q(f"{out}/feats.npz"),
                           whole=q(f"{out}/whole.npz"), grid=q(f"{out}/grid.npz"),
                           grid_flip=q(f"{out}/grid-flip.npz"), align=q(f"{out}/align.pt"),
                           alignments=q(f"{out}/alignments.jsonl"), mrnn=q(f"{out}/mrnn.pt"))
    with atomic_write(path, "w") as fh:
        fh.write(text)


def default_model(kind: str, model=None, note=None, shipped_kind: str | None = None) -> Path:
    """The ``kind`` (``align`` or ``mrnn``) model a command uses, one policy for every command: ``model``
    (the --model flag) if given; else ``[align] model`` / ``[mrnn] model`` of vsa.toml when that file
    exists; else the Flickr8k model shipped in ``vsa/assets`` (``SHIPPED_MODELS[shipped_kind or kind]``: grounding
    falls back on ``align-ground``), announced through ``note(message)``."""
    if model is not None:
        return Path(model)
    configured = workspace().get(f"{kind}.model")
    if configured is not None and Path(configured).exists():
        return Path(configured)
    shipped = SHIPPED_MODELS[shipped_kind or kind]
    name = MODEL_NAMES[shipped_kind or kind]
    if not shipped.exists():
        raise VsaError(f"the shipped {name} is missing from this install; pass --model CKPT", shipped)
    if note is not None:
        why = (f"[{kind}] model {configured} is not trained yet" if configured is not None
               else f"no --model and no [{kind}] model in vsa.toml")
        note(f"using the shipped Flickr8k {name} {shipped} ({why})")
    return shipped
