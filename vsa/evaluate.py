"""``vsa eval``: retrieval metrics of aligners (:mod:`vsa.alignment.evaluate`) and caption metrics of generators
(:mod:`vsa.generator.evaluate`) on one split of a dataset, on given features or on features computed from the
dataset's images as each model's training features were made (:func:`vsa.features.embed.features_for_eval`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from vsa.errors import VsaError
from vsa.runtime import Interrupted


def evaluate(models: list, ds, split: str, features: list | None = None, detector=None, beam: int | None = None,
             captions_out=None, ranks_out=None, ensemble: bool = False, weights: list[float] | None = None,
             device: str = "auto", jit: bool = True, max_pixels: int | None = None, progress=None, warn=None, note=None,
             on_section=None, rerank=None, rerank_features=None, rerank_cfg=None, hubness=None, mirror: float | None = None,
             mirror_features=None, workdir=None) -> dict:
    """The eval report ``{"split", "dataset", "retrieval", "generation"}`` (docs/formats.md) of the checkpoints
    ``models`` on ``split`` of ``ds``.

    An aligner gives ``retrieval`` (several aligners only with ``ensemble``: their standardised scores averaged,
    :func:`vsa.alignment.evaluate.evaluate_aligner`), a generator ``generation``
    (:func:`vsa.generator.evaluate.evaluate_generator`; several generators only with ``ensemble``: decoded as one,
    their word probabilities averaged, on the first one's features). ``weights``: one per model, in the order
    of ``models``, each kind's own weighting its members.
    ``features``: a features file or None per model; None: the file the model was trained on, else computed from
    the dataset's images (``detector``, a spec, for region features) into a folder removed at the end, and reported
    as ``computed from <image root>`` (``jit`` False: the CNN runs eager, never traced; ``max_pixels``:
    :func:`vsa.images.open_image`'s limit). That folder is ``workdir`` (:func:`resume_folder` names one per dataset,
    image root and split) when given: the detections and features are kept there as they are made, an interrupt
    (Ctrl-C, SIGTERM) leaves them and raises :class:`vsa.runtime.Interrupted` saying where, and a rerun with the
    same ``workdir`` takes them up; None: a temporary folder, nothing kept.
    ``rerank``: a generator checkpoint re-ranking the aligners' best candidates (:mod:`vsa.rerank`, ``rerank_cfg``),
    on ``rerank_features`` (None: found or computed like a model's). ``hubness``: a
    :class:`vsa.retrieval.HubnessConfig` correcting the aligners' scores with a bank of training items.
    ``mirror``: the generator's mirror weight (None: its ``decoding.mirror``); when above 0 each image is decoded with
    its mirror image, read from ``mirror_features`` (None: found or computed like the features, mirrored).
    ``on_section(name, section)`` is called as each section is
    done (``vsa eval`` prints its table then); ``progress``, ``warn``, ``note``: a rich Progress and message
    callbacks.
    """
    from vsa.checkpoint import load_checkpoint
    from vsa.features.embed import features_for_eval

    models = list(models)
    given = list(features) if features is not None else [None] * len(models)
    if len(given) != len(models):
        raise VsaError(f"{len(given)} features files for {len(models)} models")
    if not ds.split(split):
        raise VsaError(f"split {split!r} has no images in {ds.source}")
    report: dict = {"split": split, "dataset": ds.name}
    heads = [(ck["kind"], ck.get("extractor"), ck.get("decoding") or {}) for ck in map(load_checkpoint, models)]  # no weights kept
    kinds = [h[0] for h in heads]
    for m, kind in zip(models, kinds):
        if kind not in ("align", "mrnn"):
            raise VsaError(f"cannot evaluate a '{kind}' checkpoint", m)
    aligners = [i for i, k in enumerate(kinds) if k == "align"]
    generators = [i for i, k in enumerate(kinds) if k == "mrnn"]
    for name, idx in (("aligners", aligners), ("generators", generators)):
        if len(idx) > 1 and not ensemble:
            raise VsaError(f"{len(idx)} {name} given: evaluate one at a time, or pass --ensemble to combine them")
    if rerank is not None:
        if not aligners:
            raise VsaError("--rerank re-ranks an aligner's retrieval: give an aligner --model too")
        if load_checkpoint(rerank)["kind"] != "mrnn":
            raise VsaError("--rerank takes a generator checkpoint (vsa train-mrnn)", rerank)
    if weights is not None and len(weights) != len(models):
        raise VsaError(f"{len(weights)} weights for {len(models)} models (one per --model)")

    def weights_of(idx):
        return [weights[i] for i in idx] if weights is not None and len(idx) > 1 else None
    resume = workdir is not None
    with _work_folder(workdir) as tmp:
        computed: dict = {}

        def feats(i):  # the given / trained-on features, else computed from the images (once each)
            return features_for_eval(models[i], ds, split, tmp, given[i], detector, device, computed, progress, warn,
                                     note, jit=jit, max_pixels=max_pixels, resume=resume)

        if aligners:
            from vsa.alignment.evaluate import evaluate_aligner

            fs = [feats(i) for i in aligners]
            paths = [models[i] for i in aligners]
            rf = None
            if rerank is not None:
                rf = features_for_eval(rerank, ds, split, tmp, rerank_features, detector, device, computed, progress,
                                       warn, note, jit=jit, max_pixels=max_pixels, resume=resume)
            report["retrieval"] = evaluate_aligner(paths if ensemble else paths[0], ds, split,
                                                   features=fs if ensemble else fs[0], ranks_out=ranks_out,
                                                   device=device, weights=weights_of(aligners), rerank=rerank,
                                                   rerank_features=rf, rerank_cfg=rerank_cfg, progress=progress,
                                                   hubness=hubness)
            _name_computed(report["retrieval"], computed, ds)
            if on_section is not None:
                on_section("retrieval", report["retrieval"])
        if generators:
            from vsa.checkpoint import config_from
            from vsa.generator.decoding import DecodingConfig, mirror_weight
            from vsa.generator.evaluate import evaluate_generator

            from vsa.generator.model import backbone

            g = [models[i] for i in generators]
            per_cnn: dict = {}  # members on one CNN read the features of its first member (found or made once)
            cnns = {i: backbone(heads[i][1]) for i in generators}
            for i in generators:
                if cnns[i] not in per_cnn:
                    per_cnn[cnns[i]] = feats(i)
            fs = [per_cnn[cnns[i]] for i in generators]
            mf = None
            trained = config_from(DecodingConfig, heads[generators[0]][2]).mirror  # the first generator's default
            if mirror_weight(trained, mirror) and len(per_cnn) == 1:  # (across backbones: generate_split refuses)
                mf = features_for_eval(g[0], ds, split, tmp, mirror_features, detector, device, computed, progress,
                                       warn, note, jit=jit, max_pixels=max_pixels, flip=True, resume=resume)
            report["generation"] = evaluate_generator(g if len(g) > 1 else g[0], ds, split,
                                                      features=fs if len(g) > 1 else fs[0], beam=beam,
                                                      captions_out=captions_out, device=device,
                                                      weights=weights_of(generators), mirror=mirror,
                                                      mirror_features=mf, progress=progress)
            _name_computed(report["generation"], computed, ds)
            if on_section is not None:
                on_section("generation", report["generation"])
    return report


def resume_folder(base, ds, split: str) -> Path:
    """The folder under ``base`` where ``vsa eval`` keeps the features it computes from the images of ``split`` of
    ``ds`` (:func:`evaluate`'s ``workdir``): one per dataset file, image root and split, so a rerun of the same
    evaluation finds its own work and no other's."""
    import hashlib

    ident = "\0".join(os.fsdecode(os.path.abspath(os.fsencode(str(x)))) if x is not None else ""
                      for x in (ds.source, ds.image_root)) + f"\0{split}"
    h = hashlib.sha1(ident.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    import re

    label = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{ds.name}-{split}")[:40].strip("._-") or "eval"
    return Path(base) / f"{label}-{h}"


@contextlib.contextmanager
def _work_folder(workdir):
    """``workdir``, made; removed when the block ends, unless it ends by an error after something was computed
    there: then kept for the rerun, and an interrupt (Ctrl-C, SIGTERM) becomes :class:`vsa.runtime.Interrupted`
    saying where. None: a temporary folder, always removed."""
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="vsa-eval-") as tmp:
            yield tmp
        return
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    try:
        yield work
    except BaseException as e:
        if not work.exists() or not any(work.iterdir()):  # nothing computed yet: no empty folder left behind
            shutil.rmtree(work, ignore_errors=True)
        elif isinstance(e, KeyboardInterrupt):
            raise Interrupted(f"interrupted: the features computed so far are kept in {work}; rerun the same command "
                              "to resume") from None
        raise
    shutil.rmtree(work, ignore_errors=True)


def _name_computed(section: dict, computed: dict, ds) -> None:
    """Features computed into a temporary file are reported as made from the images, not by the file's name."""
    for path in computed.values():
        for key in ("features", "mirror_features"):
            if key in section:
                section[key] = str(section[key]).replace(str(path), f"computed from {ds.image_root}")
