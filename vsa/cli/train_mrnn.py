"""``vsa train-mrnn``: resolve flags + vsa.toml, one call to :func:`vsa.generator.train.train`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from vsa.cli import app
from vsa.cli.common import config_command, guarded, info, progress, warn


MRNN_CONFIGS = ("vsa.generator.model:GeneratorConfig", "vsa.generator.train:GeneratorTrainConfig", "vsa.generator.decoding:DecodingConfig")
ARCH_HELP = "Caption model architecture, a name registered in vsa.generator.models."


class TrainMRNNCommand(config_command(*MRNN_CONFIGS)):
    """Its ``--help`` lists the registered architectures (imported, as the config defaults are, only then)."""

    def format_help(self, ctx, formatter):
        from vsa.generator.models import describe

        for p in self.params:
            if p.name == "arch":
                p.help = f"{ARCH_HELP[:-1]}: {describe()}."
        return super().format_help(ctx, formatter)


@app.command("train-mrnn", cls=TrainMRNNCommand)
@guarded
def train_mrnn(
    dataset: Optional[Path] = typer.Option(None, "--dataset", help="Caption dataset (default: [dataset] path in vsa.toml)."),
    features: Optional[Path] = typer.Option(None, "--features", "-f", help="Features NPZ (default: the features the architecture reads: [features] grid, regions or whole; regions with --alignments)."),
    flip_features: Optional[Path] = typer.Option(None, "--flip-features", help="The same features of the mirrored images (`vsa embed ... --flip`): each training image reads them with probability flip (--set flip=P). Default (when --features is not given either): [features] grid_flip of vsa.toml for a grid generator, when that file exists."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Best-on-val checkpoint (default: [mrnn] model). The latest epoch goes to <stem>.last.pt."),
    log: Optional[Path] = typer.Option(None, "--log", help="Metrics log, one JSON line per epoch (default: <out stem>.log.jsonl)."),
    alignments: Optional[Path] = typer.Option(None, "--alignments", help="Snippet alignments JSONL (`vsa align`): train on (region feature, snippet) pairs for region descriptions."),
    arch: Optional[str] = typer.Option(None, "--arch", help=ARCH_HELP),
    rnn: Optional[str] = typer.Option(None, "--rnn", hidden=True, help="Former name of --arch."),
    attention: Optional[bool] = typer.Option(None, "--attention/--no-attention", help="lstm/rnn: also attend over the region features of a regions features file."),
    hidden: Optional[int] = typer.Option(None, "--hidden", help="RNN hidden size."),
    embed: Optional[int] = typer.Option(None, "--embed", help="Word embedding size."),
    dropout: Optional[float] = typer.Option(None, "--dropout"),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Cross-entropy epochs (early stopping on val CIDEr)."),
    scst_epochs: Optional[int] = typer.Option(None, "--scst-epochs", help="Self-critical (CIDEr-D reward) epochs after cross-entropy."),
    scst_lr: Optional[float] = typer.Option(None, "--scst-lr", help="Learning rate of the self-critical epochs (with --resume: changes the checkpoint's)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Sentences per batch (all sentences of an image together)."),
    lr: Optional[float] = typer.Option(None, "--lr"),
    lr_decay: Optional[float] = typer.Option(None, "--lr-decay", help="Cross-entropy learning rate factor at each decay: after lr_decay_start epochs, then every lr_decay_every epochs (--set lr_decay_start=N, lr_decay_every=N; 0: once)."),
    label_smoothing: Optional[float] = typer.Option(None, "--label-smoothing"),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Any GeneratorConfig / GeneratorTrainConfig / DecodingConfig field, KEY=VALUE (repeatable), e.g. --set grad_clip=1."),
    max_len: Optional[int] = typer.Option(None, "--max-len", help="Maximum words per sentence (trained and generated)."),
    min_count: Optional[int] = typer.Option(None, "--min-count", help="Vocabulary threshold (default [dataset] min_count or 5)."),
    patience: Optional[int] = typer.Option(None, "--patience", help="Stop after this many epochs without val CIDEr gain."),
    seed: Optional[int] = typer.Option(None, "--seed"),
    threads: Optional[int] = typer.Option(None, "--threads", help="Torch CPU threads (0: all)."),
    device: str = typer.Option("auto", "--device", help="auto (cuda when present), cpu, cuda; under torchrun each rank its own GPU."),
    resume: bool = typer.Option(False, "--resume", help="Continue from <stem>.last.pt with its configs (the flags given and --set change them)."),
    search_settings: Optional[int] = typer.Option(None, "--search-settings", help="After the epochs, beam size and length penalty are chosen on val among this many (beam, length penalty) settings, cheapest first (greedy, then growing beams); 0: no search."),
    search_images: Optional[int] = typer.Option(None, "--search-images", help="Val images each setting of that search decodes (the first ones; 0: all)."),
    no_beam_search: bool = typer.Option(False, "--no-beam-search", help="Skip that search: the checkpoint keeps the decoding defaults it was trained with."),
    skip_missing: bool = typer.Option(False, "--skip-missing", help="Skip dataset images that have no features."),
    as_json: bool = typer.Option(False, "--json", help="Print the training summary as JSON on stdout."),
):
    """Train the caption generator (best-on-val checkpoint, --resume, Ctrl-C safe)."""
    from vsa.cli.config import resolve
    from vsa.cli.workspace import open_dataset
    from vsa.errors import VsaError
    from vsa.generator.model import features_key
    from vsa.generator.train import configs, parse_overrides, train_on

    if rnn is not None:
        if arch is not None and arch != rnn:
            raise VsaError(f"--rnn is the former name of --arch: give one of them, not --arch {arch} and --rnn {rnn}")
        warn("--rnn is now named --arch")
        arch = rnn
    # the dataclasses hold every default; flags and --set only override
    flags = {"arch": arch, "attention": attention, "hidden": hidden, "embed": embed, "dropout": dropout,
             "epochs": epochs, "scst_epochs": scst_epochs, "scst_lr": scst_lr, "batch_size": batch_size, "lr": lr,
             "lr_decay": lr_decay, "label_smoothing": label_smoothing, "max_len": max_len, "patience": patience,
             "seed": seed, "threads": threads, "search_settings": search_settings, "search_images": search_images}
    given = {k: v for k, v in flags.items() if v is not None}
    mcfg, tcfg, dcfg = configs(**given)
    tcfg.min_count = int(resolve(min_count, "dataset.min_count", "--min-count", default=tcfg.min_count))
    parse_overrides((mcfg, tcfg, dcfg), set_ or [], note=warn)  # type-checked; an unknown key is a one-line error
    key = "features.regions" if alignments is not None else features_key(mcfg)
    feats_path = resolve(features, key, "--features")
    if flip_features is None and features is None and key == "features.grid" and alignments is None:
        # the mirrored grid the workspace names ([features] grid_flip), when it has been made: the shipped recipe
        found = resolve(None, "features.grid_flip", "--flip-features", required=False)
        if found is not None and Path(found).exists():
            flip_features = Path(found)
            info(f"train-mrnn: mirrored features {found} ([features] grid_flip; flip={tcfg.flip})")
    out = Path(resolve(out, "mrnn.model", "--out"))
    ds = open_dataset(dataset, None)
    with progress(transient=True) as prog:
        summary = train_on(mcfg, tcfg, dcfg, ds, feats_path, out, alignments=alignments, resume=resume,
                           overrides=[f"{k}={v}" for k, v in given.items()] + list(set_ or []) if resume else None,
                           info=info, log=log, warn=warn, choose_decoding=not no_beam_search, device=device,
                           skip_missing=skip_missing, progress=prog, flip_features=flip_features)
    if summary.get("rank", 0) != 0:  # torchrun: rank 0 reports
        return
    info(f"best val CIDEr {summary['best'].get('CIDEr')} at epoch {summary['best'].get('epoch')}, "
         f"{summary['seconds'] / 60:.1f} min -> {out}")
    if as_json:
        from vsa.io import write_json

        write_json("-", summary)
