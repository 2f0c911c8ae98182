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
    model: Optional[List[Path]] = typer.Option(None, "--model", "-m", help="Checkpoint(s) to evaluate; an aligner gives retrieval, a generator caption metrics. Default: [align] model and [mrnn] model in vsa.toml (those that exist)."),
    dataset: Optional[Path] = typer.Option(None, "--dataset", help="Caption dataset (default: [dataset] path in vsa.toml)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Image root folder."),
    features: Optional[Path] = typer.Option(None, "--features", help="Features NPZ (default: the one the model was trained on, from vsa.toml)."),
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
    from vsa.checkpoint import load_checkpoint
    from vsa.cli.data_cmd import open_dataset
    from vsa.config import workspace
    from vsa.errors import VsaError
    from vsa.io import write_json

    models = list(model or [])
    if not models:
        ws = workspace()
        for key in ("align.model", "mrnn.model"):
            p = ws.get(key)
            if p is not None and Path(p).exists():
                models.append(Path(p))
        if not models:
            raise VsaError("no model to evaluate: pass --model CKPT or set [align] model / [mrnn] model in vsa.toml "
                           "(and train them with `vsa train-align` / `vsa train-mrnn`)")
    ds = open_dataset(dataset, images)
    if not ds.split(split):
        raise VsaError(f"split {split!r} has no images in {ds.source}")
    report: dict = {"split": split, "dataset": ds.name}
    kinds = {m: load_checkpoint(m)["kind"] for m in models}
    aligners = [m for m in models if kinds[m] == "align"]
    if len(aligners) > 1 and not ensemble:
        raise VsaError(f"{len(aligners)} aligners given: evaluate one at a time, or pass --ensemble to combine them")
    if weights is not None and not ensemble:
        raise VsaError("--weights needs --ensemble")
    try:
        w = [float(x) for x in weights.split(",")] if weights else None
    except ValueError:
        raise VsaError(f"--weights must be comma-separated numbers, got {weights!r}") from None
    if aligners:
        from vsa.eval_align import evaluate_aligner, render_retrieval

        report["retrieval"] = evaluate_aligner(aligners if ensemble else aligners[0], ds, split, features=features,
                                               ranks_out=ranks_out, device=device, weights=w)
        if not as_json:
            render_retrieval(report["retrieval"], _stdout())
    for m in models:
        kind = kinds[m]
        if kind == "align":
            continue
        elif kind == "mrnn":
            from vsa.eval_caption import evaluate_generator, render_generation

            report["generation"] = evaluate_generator(m, ds, split, features=features, beam=beam,
                                                      captions_out=captions_out, device=device)
            if not as_json:
                render_generation(report["generation"], _stdout())
        else:
            raise VsaError(f"cannot evaluate a '{kind}' checkpoint", m)
    if out is not None:
        write_json(out, report, indent=True)
    if as_json:
        write_json("-", report)
