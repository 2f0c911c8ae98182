from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from vsa.cli import app
from vsa.cli.common import guarded


def _stdout():
    from vsa.cli.common import data_console

    return data_console()  # tables are this command's data: stdout


@app.command("eval")
@guarded
def evaluate(
    split: str = typer.Option("test", "--split", help="Dataset split to evaluate on (paper protocol: test)."),
    model: Optional[List[Path]] = typer.Option(None, "--model", "-m", help="Checkpoint(s) to evaluate; an aligner gives retrieval, a generator caption metrics. Default: [align] model and [mrnn] model in vsa.toml, each the shipped Flickr8k one when not set or not trained yet."),
    dataset: Optional[Path] = typer.Option(None, "--dataset", help="Caption dataset (default: [dataset] path in vsa.toml)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Image root folder (default: [dataset] images in vsa.toml, else found beside the dataset); features missing for a model are computed from these images."),
    features: Optional[Path] = typer.Option(None, "--features", help="Features NPZ (default: the one the model was trained on, else [features] in vsa.toml, else computed from the images)."),
    detector: Optional[str] = typer.Option(None, "--detector", help="Detector for region features computed from the images (default: $VSA_DETECTOR, [regions] detector in vsa.toml, else yolo11n.pt); use the one the model was trained with."),
    beam: Optional[int] = typer.Option(None, "--beam", help="Beam size for generators (default: the checkpoint's val-chosen beam)."),
    captions_out: Optional[Path] = typer.Option(None, "--captions-out", help="Write generated captions here as COCO results JSON."),
    ranks_out: Optional[Path] = typer.Option(None, "--ranks-out", help="Write retrieval ranks (for `vsa show`) here as JSON."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the eval report JSON here."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout instead of tables."),
    ensemble: bool = typer.Option(False, "--ensemble", help="Several aligners: average their standardised scores (each on the features it was trained on) and evaluate that."),
    weights: Optional[str] = typer.Option(None, "--weights", help="With --ensemble: comma-separated weights, one per aligner (default: equal)."),
    device: str = typer.Option("auto", "--device", help="auto (cuda when present), cpu, cuda."),
):
    """Retrieval (aligner) and caption metrics (generator) on a split, beside the paper's numbers."""
    import tempfile

    from vsa.checkpoint import load_checkpoint
    from vsa.cli.common import note, progress, warn
    from vsa.cli.workspace import open_dataset
    from vsa.config import default_model, resolve
    from vsa.errors import VsaError
    from vsa.featurise import features_for_eval
    from vsa.io import write_json

    models = list(model or []) or [default_model(kind, None, note) for kind in ("align", "mrnn")]
    ds = open_dataset(dataset, images)
    if not ds.split(split):
        raise VsaError(f"split {split!r} has no images in {ds.source}")
    report: dict = {"split": split, "dataset": ds.name}
    kinds = {m: load_checkpoint(m)["kind"] for m in models}
    for m, kind in kinds.items():
        if kind not in ("align", "mrnn"):
            raise VsaError(f"cannot evaluate a '{kind}' checkpoint", m)
    aligners = [m for m in models if kinds[m] == "align"]
    if len(aligners) > 1 and not ensemble:
        raise VsaError(f"{len(aligners)} aligners given: evaluate one at a time, or pass --ensemble to combine them")
    if weights is not None and not ensemble:
        raise VsaError("--weights needs --ensemble")
    try:
        w = [float(x) for x in weights.split(",")] if weights else None
    except ValueError:
        raise VsaError(f"--weights must be comma-separated numbers, got {weights!r}") from None
    det = resolve(detector, "regions.detector", "--detector", required=False)
    with tempfile.TemporaryDirectory(prefix="vsa-eval-") as tmp, progress(transient=True) as prog:
        computed: dict = {}

        def feats(m, given=features):  # the given / trained-on features, else computed from the images (once each)
            return features_for_eval(m, ds, split, tmp, given, det, device, computed, prog, warn, note)

        if aligners:
            from vsa.eval_align import evaluate_aligner, render_retrieval

            # an ensemble's members each read the features they were trained on (--features is for one model)
            fs = [feats(m, None if len(aligners) > 1 else features) for m in aligners]
            report["retrieval"] = evaluate_aligner(aligners if ensemble else aligners[0], ds, split,
                                                   features=fs if ensemble else fs[0], ranks_out=ranks_out,
                                                   device=device, weights=w)
            _name_computed(report["retrieval"], computed, ds)
            if not as_json:
                render_retrieval(report["retrieval"], _stdout())
        for m in models:
            if kinds[m] == "mrnn":
                from vsa.eval_caption import evaluate_generator, render_generation

                report["generation"] = evaluate_generator(m, ds, split, features=feats(m), beam=beam,
                                                          captions_out=captions_out, device=device)
                _name_computed(report["generation"], computed, ds)
                if not as_json:
                    render_generation(report["generation"], _stdout())
    if out is not None:
        write_json(out, report, indent=True)
    if as_json:
        write_json("-", report)


def _name_computed(section: dict, computed: dict, ds) -> None:
    """Features computed into a temporary file are reported as made from the images, not by the file's name."""
    for path in computed.values():
        if "features" in section:
            section["features"] = str(section["features"]).replace(str(path), f"computed from {ds.image_root}")
