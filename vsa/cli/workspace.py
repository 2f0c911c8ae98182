"""Flags + the workspace (``vsa.toml``, environment) -> explicit arguments for the library.

Only the CLI reads the workspace; library functions take every path and setting as an argument.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from vsa.cli.common import warn

ENV_DETECTOR = "VSA_DETECTOR"
ENV_MAX_PIXELS = "VSA_MAX_PIXELS"
ENV_NO_JIT = "VSA_NO_JIT"


def detector(flag: Optional[str] = None) -> str:
    """The detector spec a command uses: ``--detector``, else $VSA_DETECTOR, else ``[regions] detector`` of
    vsa.toml, else :data:`vsa.regions.DEFAULT_DETECTOR` (the YOLOv5n COCO detector inside the package)."""
    import os

    from vsa.cli.config import workspace

    if flag is not None:
        return str(flag)
    spec = os.environ.get(ENV_DETECTOR) or workspace().get("regions.detector")
    if spec:
        return str(spec)
    from vsa.regions import DEFAULT_DETECTOR  # light: vsa.regions imports torch inside its functions

    return DEFAULT_DETECTOR


def max_pixels(flag: Optional[int] = None) -> int:
    """The decompression-bomb limit: ``--max-pixels``, else $VSA_MAX_PIXELS, else PIL's default."""
    import os

    from vsa.errors import VsaError
    from vsa.images import DEFAULT_MAX_PIXELS

    if flag is not None:
        return int(flag)
    env = os.environ.get(ENV_MAX_PIXELS)
    if not env:
        return DEFAULT_MAX_PIXELS
    try:
        return int(float(env))
    except ValueError:
        raise VsaError(f"{ENV_MAX_PIXELS} must be a number of pixels, got {env!r}") from None


def jit() -> bool:
    """Whether CPU forwards of the CNN may use a traced TorchScript copy (``VSA_NO_JIT=1`` turns it off)."""
    import os

    return not os.environ.get(ENV_NO_JIT)


def eval_features(models: list, features=None) -> list:
    """The features file ``vsa eval`` reads for each checkpoint of ``models``. ``features`` (``--features``, repeatable):
    one file is read by every model (an ensemble's members included), several are one per model in order; without
    it, the file the model was trained on when it exists, else ``[features] regions`` / ``whole`` / ``grid`` of
    vsa.toml as the model needs, when that file exists; None where there is none (the library then computes them
    from the images)."""
    from vsa.checkpoint import load_checkpoint
    from vsa.cli.config import workspace
    from vsa.checkpoint import trained_features
    from vsa.errors import VsaError

    given = [] if features is None else [features] if isinstance(features, (str, Path)) else list(features)
    if len(given) > 1 and len(given) != len(models):
        raise VsaError(f"{len(given)} --features for {len(models)} --model: give one file (read by every model) "
                       f"or one per --model, in order")
    if len(given) == 1:
        given = given * len(models)
    out: list = []
    for i, m in enumerate(models):
        if given and given[i] is not None:  # None: this model's default, as without --features
            out.append(Path(given[i]))
            continue
        ck = load_checkpoint(m)
        found = None
        if ck.get("kind") in ("align", "mrnn"):
            found = trained_features(ck)
            if found is None:
                p = workspace().get(_features_key(ck))
                found = Path(p) if p is not None and Path(p).exists() and _same_cnn(ck, Path(p), m) else None
        out.append(found)
    return out


def eval_mirror_features(models: list, mirror_features=None, features=None) -> Optional[Path]:
    """The mirrored images' features ``vsa eval`` reads for a generator that decodes with them (``decoding.mirror``):
    ``--mirror-features``, else (``--features`` not given) the file the generator was trained with as
    ``--flip-features`` when it exists, else ``[features] grid_flip`` of vsa.toml for a grid generator when that
    file exists and comes from its CNN; None: the library computes them from the images."""
    from vsa.checkpoint import load_checkpoint, trained_features
    from vsa.cli.config import workspace

    if mirror_features is not None:
        return Path(mirror_features)
    if features:
        return None
    gens = [ck for ck in map(load_checkpoint, models) if ck.get("kind") == "mrnn"]
    if not gens:
        return None
    ck = gens[0]
    found = trained_features(ck, None, "flip_features")
    if found is None and _features_key(ck) == "features.grid":
        p = workspace().get("features.grid_flip")
        found = Path(p) if p is not None and Path(p).exists() and _same_cnn(ck, Path(p), "the generator") else None
    return found


def _same_cnn(ck: dict, path: Path, model) -> bool:
    """Whether the workspace's features file ``path`` was made by the CNN ``ck`` was trained on; says so when not."""
    from vsa.errors import VsaError
    from vsa.features.store import check_extractor, load_features

    try:
        meta = load_features(path).meta  # memory-mapped: only the small arrays are read
    except (VsaError, OSError, ValueError):
        return True  # an unreadable file is reported where it is read
    try:
        check_extractor(ck.get("extractor"), meta, path)
    except VsaError as e:
        warn(f"not using {path} for {Path(str(model)).name}: {e.reason}")
        return False
    return True


def _features_key(ck: dict) -> str:
    """The vsa.toml key naming the features a checkpoint reads by default."""
    cfg = ck.get("model") or {}  # the model config (load_checkpoint converts version-1 files)
    if ck["kind"] == "align":
        from vsa.alignment.model import AlignModelConfig, features_key as align_features_key
        from vsa.checkpoint import config_from

        return align_features_key(config_from(AlignModelConfig, cfg))
    from vsa.generator.model import features_key

    return features_key(cfg)


def open_dataset(dataset: Optional[Path], images: Optional[Path] = None, splits: Optional[Path] = None, seed: int = 0,
                 quiet: bool = False):
    """Load the dataset named by the flag or by [dataset] in vsa.toml; loader notes go to stderr."""
    from vsa.cli.config import resolve
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
    from vsa.alignment.model import load_aligner
    from vsa.runtime import pick_device

    return load_aligner(model, pick_device(device))


def encoder(aligner, detector_flag, top, device, cnn_weights):
    """The photo encoder of ``vsa score`` / ``vsa search``: the detector :func:`detector` names (loaded when
    first needed) and the CNN the aligner was trained on."""
    from vsa.runtime import pick_device
    from vsa.search import PhotoEncoder

    return PhotoEncoder(aligner.extractor_meta, detector(detector_flag), top, pick_device(device), cnn_weights,
                        whole_only=aligner.cfg.model != "brnn", jit=jit())


def say_oov(words: list[str], where: str = "", read_as: dict | None = None) -> None:
    """Name the query words the aligner does not know: read as their nearest known word by GloVe where the
    aligner has one (``read_as``), else as its unknown-word token."""
    if words:
        read_as = read_as or {}
        shown = [f"{w} (read as '{read_as[w]}', its nearest word by GloVe)" if w in read_as else w for w in words]
        warn(f"{where}not in the vocabulary: {', '.join(shown)}")


def rerank_config(rerank, k: Optional[int], weight: Optional[float], features) -> Optional["RerankConfig"]:
    """``--rerank GEN`` and its flags as a :class:`vsa.rerank.RerankConfig` (None without ``--rerank``)."""
    from vsa.errors import VsaError

    if rerank is None:
        if k is not None or weight is not None or features is not None:
            raise VsaError("--rerank-k, --rerank-weight and --rerank-features need --rerank GENERATOR")
        return None
    import dataclasses

    from vsa.rerank import RerankConfig

    cfg = dataclasses.replace(RerankConfig(), **{n: v for n, v in (("k", k), ("weight", weight)) if v is not None})
    if cfg.k < 1 or cfg.weight < 0:
        raise VsaError("--rerank-k must be >= 1 and --rerank-weight >= 0")
    return cfg


def hubness_config(on: bool, k: Optional[int], weight: Optional[float], bank: Optional[int]):
    """``--hubness`` and its flags as a :class:`vsa.retrieval.HubnessConfig` (None without ``--hubness``)."""
    from vsa.errors import VsaError

    given = {n: v for n, v in (("k", k), ("weight", weight), ("bank", bank)) if v is not None}
    if not on:
        if given:
            raise VsaError("--hubness-k, --hubness-weight and --hubness-bank need --hubness")
        return None
    import dataclasses

    from vsa.retrieval import HubnessConfig

    cfg = dataclasses.replace(HubnessConfig(), **given)
    if cfg.k < 1 or cfg.bank < 1 or cfg.weight < 0:
        raise VsaError("--hubness-k and --hubness-bank must be >= 1 and --hubness-weight >= 0")
    return cfg


MODEL_HELP = "Aligner checkpoint (default: [align] model in vsa.toml if it exists, else the shipped Flickr8k aligner)."
DETECTOR_HELP = ("Detector for new photos: ultralytics weights (path or name) or a YOLOv5 state-dict folder "
                 "(default: $VSA_DETECTOR, [regions] detector in vsa.toml, else the YOLOv5n COCO detector inside vsa).")
CNN_HELP = "Local CNN weights file (default: the pip package's)."


def default_aligner(model: Optional[Path]) -> Path:
    """--model, else [align] model of vsa.toml when trained, else the shipped aligner (said on stderr)."""
    from vsa.cli.common import note
    from vsa.cli.config import default_model

    return default_model("align", model, note)
