"""Flags + the workspace (``vsa.toml``, environment) -> explicit arguments for the library.

Only the CLI reads the workspace; library functions take every path and setting as an argument.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from vsa.cli.common import warn


def open_dataset(dataset: Optional[Path], images: Optional[Path] = None, splits: Optional[Path] = None, seed: int = 0,
                 quiet: bool = False):
    """Load the dataset named by the flag or by [dataset] in vsa.toml; loader notes go to stderr."""
    from vsa.config import resolve
    from vsa.data import load_dataset

    path = resolve(dataset, "dataset.path", "DATASET")
    root = resolve(images, "dataset.images", "--images", required=False)
    split_dir = resolve(splits, "dataset.splits", "--splits", required=False)
    ds = load_dataset(path, root, split_dir, seed)
    if not quiet:
        for note in ds.notes:
            warn(f"{ds.source}: {note}")
    return ds


def aligner(model: Optional[Path], device: str):
    from vsa.align import load_aligner
    from vsa.runtime import pick_device

    return load_aligner(model, pick_device(device))


def encoder(aligner, detector, top, device, cnn_weights):
    from vsa.runtime import pick_device
    from vsa.search import PhotoEncoder

    return PhotoEncoder(aligner.extractor_meta, detector, top, pick_device(device), cnn_weights,
                        whole_only=aligner.cfg.model != "brnn")


def say_oov(words: list[str], where: str = "") -> None:
    """Name the query words the aligner does not know (they are scored as its unknown-word token)."""
    if words:
        warn(f"{where}not in the vocabulary: {', '.join(words)}")


MODEL_HELP = "Aligner checkpoint (default: [align] model in vsa.toml if it exists, else the shipped Flickr8k aligner)."
DETECTOR_HELP = ("Detector for new photos: ultralytics weights (path or name) or a YOLOv5 state-dict folder "
                 "(default: $VSA_DETECTOR, [regions] detector in vsa.toml, else yolo11n.pt, which needs internet once).")
CNN_HELP = "Local CNN weights file (default: the pip package's)."


def default_aligner(model: Optional[Path]) -> Path:
    """--model, else [align] model of vsa.toml when trained, else the shipped aligner (said on stderr)."""
    from vsa.cli.common import note
    from vsa.config import default_model

    return default_model("align", model, note)
