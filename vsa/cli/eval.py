from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from vsa.cli import app
from vsa.cli.common import guarded


def _stdout():
    from vsa.cli.common import data_console

    return data_console()  # tables are this command's data: stdout


def _cache_home() -> Path:
    """Where features computed from the images wait for the rerun of an interrupted eval: $XDG_CACHE_HOME, else
    ~/.cache (removed when the eval finishes)."""
    import os

    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")


def _features_for(models: list, features):
    """One ``--features`` file for several models (an aligner and a generator, as without ``--model``): the file
    for the models whose CNN and crop made it, the others' default (the features they were trained on, else
    computed from the images), said on stderr. When it fits none, every model reads it (and says why not)."""
    if not features or len(features) != 1 or len(models) < 2:
        return features
    from vsa.checkpoint import load_checkpoint
    from vsa.cli.common import note
    from vsa.errors import VsaError
    from vsa.features.store import check_extractor, load_features

    path = Path(features[0])
    try:
        meta = load_features(path).meta
    except (VsaError, OSError, ValueError):
        return features  # reported where it is read

    def recipe(m: dict) -> str:
        return f"{m.get('extractor')} {'grid' if m.get('crop') == 'grid' else 'region'} features"

    per_model = []
    for m in models:
        ex = load_checkpoint(m).get("extractor") or {}
        try:
            check_extractor(ex, meta, path)
            fits = (ex.get("crop") == "grid") == (meta.get("crop") == "grid")
        except VsaError:
            fits = False
        per_model.append(path if fits else None)
        if not fits:
            note(f"{path} holds {recipe(meta)}; {Path(str(m)).name} reads {recipe(ex)}: not from this file")
    return features if not any(per_model) else per_model


@app.command("eval")
@guarded
def evaluate(
    split: str = typer.Option("test", "--split", help="Dataset split to evaluate on (paper protocol: test)."),
    model: Optional[List[Path]] = typer.Option(None, "--model", "-m", help="Checkpoint(s) to evaluate; an aligner gives retrieval, a generator caption metrics. Default: [align] model and [mrnn] model in vsa.toml, each the shipped Flickr8k one when not set or not trained yet."),
    dataset: Optional[Path] = typer.Option(None, "--dataset", help="Caption dataset (default: [dataset] path in vsa.toml)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Image root folder (default: [dataset] images in vsa.toml, else found beside the dataset); features missing for a model are computed from these images."),
    features: Optional[List[Path]] = typer.Option(None, "--features", help="Features NPZ: one file for every model, or one per --model in order (default: the one each model was trained on, else [features] in vsa.toml, else computed from the images)."),
    detector: Optional[str] = typer.Option(None, "--detector", help="Detector for region features computed from the images (default: $VSA_DETECTOR, [regions] detector in vsa.toml, else the YOLOv5n COCO detector inside vsa); use the one the model was trained with."),
    beam: Optional[int] = typer.Option(None, "--beam", help="Beam size for generators (default: the checkpoint's val-chosen beam)."),
    mirror: Optional[float] = typer.Option(None, "--mirror", help="Generators: weight of each image's mirror image, decoded with it as one (test-time augmentation; default: the checkpoint's decoding.mirror; 0: off)."),
    mirror_features: Optional[Path] = typer.Option(None, "--mirror-features", help="Features NPZ of the mirrored images for --mirror (`vsa embed ... --flip`; default: the generator's --flip-features, else [features] grid_flip in vsa.toml, else computed from the images)."),
    captions_out: Optional[Path] = typer.Option(None, "--captions-out", help="Write generated captions here as COCO results JSON."),
    ranks_out: Optional[Path] = typer.Option(None, "--ranks-out", help="Write retrieval ranks (for `vsa show`) here as JSON."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the eval report JSON here."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout instead of tables."),
    ensemble: bool = typer.Option(False, "--ensemble", help="Several aligners: average their standardised scores (each on its --features, else the features it was trained on); several generators: decode them as one, averaging their word probabilities."),
    weights: Optional[str] = typer.Option(None, "--weights", help="With --ensemble: comma-separated weights, one per --model in order (default: equal)."),
    rerank: Optional[Path] = typer.Option(None, "--rerank", help="Generator checkpoint that re-ranks the aligner's best candidates of each query by log p(sentence | image) - log p(sentence) (docs/alignment.md)."),
    rerank_features: Optional[Path] = typer.Option(None, "--rerank-features", help="Features NPZ of the --rerank generator (default: the one it was trained on, else computed from the images)."),
    rerank_k: Optional[int] = typer.Option(None, "--rerank-k", help="Candidates re-ranked per query (default: RerankConfig.k, 20)."),
    rerank_weight: Optional[float] = typer.Option(None, "--rerank-weight", help="The generator's weight against the aligner's, both standardised per list (default: RerankConfig.weight, 4)."),
    hubness: bool = typer.Option(False, "--hubness", help="Correct the aligners' scores for hubness with a bank of the dataset's training images and sentences (docs/alignment.md)."),
    hubness_k: Optional[int] = typer.Option(None, "--hubness-k", help="Bank neighbours averaged per item (default: HubnessConfig.k, 50)."),
    hubness_weight: Optional[float] = typer.Option(None, "--hubness-weight", help="Share of that mean subtracted (default: HubnessConfig.weight, 0.75)."),
    hubness_bank: Optional[int] = typer.Option(None, "--hubness-bank", help="Training images in the bank, with their sentences (default: HubnessConfig.bank, 1000)."),
    device: str = typer.Option("auto", "--device", help="auto (cuda when present), cpu, cuda."),
):
    """Retrieval (aligner) and caption metrics (generator) on a split, beside the paper's numbers."""
    from vsa.cli import workspace as W
    from vsa.cli.common import note, progress, warn
    from vsa.cli.common import parse_weights
    from vsa.cli.config import default_model
    from vsa.errors import VsaError
    from vsa.evaluate import evaluate as run_eval, resume_folder
    from vsa.io import write_json

    models = list(model or []) or [default_model(kind, None, note) for kind in ("align", "mrnn")]
    ds = W.open_dataset(dataset, images)
    feats = W.eval_features(models, _features_for(models, features))
    if weights is not None and not ensemble:
        raise VsaError("--weights needs --ensemble")
    w = parse_weights(weights, len(models)) if weights else None
    rcfg = W.rerank_config(rerank, rerank_k, rerank_weight, rerank_features)
    hcfg = W.hubness_config(hubness, hubness_k, hubness_weight, hubness_bank)

    def table(name: str, section: dict) -> None:  # each section's table as soon as it is done
        if as_json:
            return
        if name == "retrieval":
            from vsa.alignment.evaluate import render_retrieval as render
        else:
            from vsa.generator.evaluate import render_generation as render
        render(section, _stdout())

    with progress(transient=True) as prog:
        report = run_eval(models, ds, split, feats, W.detector(detector), beam=beam, captions_out=captions_out,
                          ranks_out=ranks_out, ensemble=ensemble, weights=w, device=device, jit=W.jit(),
                          max_pixels=W.max_pixels(None), progress=prog,
                          warn=warn, note=note, on_section=table, rerank=rerank, rerank_features=rerank_features,
                          rerank_cfg=rcfg, hubness=hcfg, mirror=mirror,
                          mirror_features=W.eval_mirror_features(models, mirror_features, features),
                          workdir=resume_folder(_cache_home() / "vsa" / "eval", ds, split))
    if out is not None:
        write_json(out, report, indent=True)
    if as_json:
        write_json("-", report)
