"""``vsa train-mrnn``: resolve flags + vsa.toml, one call to :func:`vsa.train_mrnn.train`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from vsa.cli import app
from vsa.cli.common import guarded, info, progress, warn


@app.command("train-mrnn")
@guarded
def train_mrnn(
    dataset: Optional[Path] = typer.Option(None, "--dataset", help="Caption dataset (default: [dataset] path in vsa.toml)."),
    features: Optional[Path] = typer.Option(None, "--features", "-f", help="Features NPZ (default: [features] whole, or [features] regions with --attention/--alignments)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Best-on-val checkpoint (default: [mrnn] model). The latest epoch goes to <stem>.last.pt."),
    alignments: Optional[Path] = typer.Option(None, "--alignments", help="Snippet alignments JSONL (`vsa align`): train on (region feature, snippet) pairs for region descriptions."),
    rnn: Optional[str] = typer.Option(None, "--rnn", help="updown (top-down attention over regions/grid, the default), lstm, or rnn (the paper's multimodal RNN)."),
    attention: Optional[bool] = typer.Option(None, "--attention/--no-attention", help="lstm/rnn: also attend over the region features of a regions features file."),
    hidden: Optional[int] = typer.Option(None, "--hidden", help="RNN hidden size."),
    embed: Optional[int] = typer.Option(None, "--embed", help="Word embedding size."),
    dropout: Optional[float] = typer.Option(None, "--dropout"),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Cross-entropy epochs (early stopping on val CIDEr)."),
    scst_epochs: Optional[int] = typer.Option(None, "--scst-epochs", help="Self-critical (CIDEr-D reward) epochs after cross-entropy."),
    scst_lr: Optional[float] = typer.Option(None, "--scst-lr", help="Learning rate of the self-critical epochs (with --resume: changes the checkpoint's)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Sentences per batch (all sentences of an image together)."),
    lr: Optional[float] = typer.Option(None, "--lr"),
    lr_decay: Optional[float] = typer.Option(None, "--lr-decay", help="LR factor per epoch after epoch lr_decay_start (--set lr_decay_start=N)."),
    label_smoothing: Optional[float] = typer.Option(None, "--label-smoothing"),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Any MRNNConfig field, KEY=VALUE (repeatable), e.g. --set grad_clip=1."),
    max_len: Optional[int] = typer.Option(None, "--max-len", help="Maximum words per sentence."),
    min_count: Optional[int] = typer.Option(None, "--min-count", help="Vocabulary threshold (default [dataset] min_count or 5)."),
    patience: Optional[int] = typer.Option(None, "--patience", help="Stop after this many epochs without val CIDEr gain."),
    seed: Optional[int] = typer.Option(None, "--seed"),
    threads: Optional[int] = typer.Option(None, "--threads", help="Torch CPU threads (0: all)."),
    device: str = typer.Option("auto", "--device", help="auto (cuda when present), cpu, cuda; under torchrun each rank its own GPU."),
    resume: bool = typer.Option(False, "--resume", help="Continue from <stem>.last.pt."),
    no_beam_search: bool = typer.Option(False, "--no-beam-search", help="Skip choosing beam size / length penalty on val."),
    skip_missing: bool = typer.Option(False, "--skip-missing", help="Skip dataset images that have no features."),
    as_json: bool = typer.Option(False, "--json", help="Print the training summary as JSON on stdout."),
):
    """Train the multimodal RNN caption generator (best-on-val checkpoint, --resume, Ctrl-C safe)."""
    from vsa.cli.workspace import open_dataset
    from vsa.config import resolve
    from vsa.data import build_vocab
    from vsa.errors import VsaError

    from vsa.checkpoint import apply_overrides
    from vsa.mrnn import RNNS, MRNNConfig, features_key, uses_regions

    # the dataclass holds every default; flags and --set only override
    flags = {"rnn": rnn, "attention": attention, "hidden": hidden, "embed": embed, "dropout": dropout, "epochs": epochs,
             "scst_epochs": scst_epochs, "scst_lr": scst_lr, "batch_size": batch_size, "lr": lr, "lr_decay": lr_decay,
             "label_smoothing": label_smoothing, "max_len": max_len, "patience": patience, "seed": seed,
             "threads": threads}
    cfg = MRNNConfig(**{k: v for k, v in flags.items() if v is not None})
    apply_overrides(cfg, set_ or [])
    if cfg.rnn not in RNNS:
        raise VsaError(f"--rnn must be one of {', '.join(RNNS)}, got {cfg.rnn!r}")
    regions = uses_regions(cfg) and alignments is None
    key = "features.regions" if alignments is not None else features_key(cfg)
    feats_path = resolve(features, key, "--features")
    out = Path(resolve(out, "mrnn.model", "--out"))
    cfg.min_count = int(resolve(min_count, "dataset.min_count", "--min-count", default=cfg.min_count))
    ds = open_dataset(dataset, None)

    import torch

    from vsa.featstore import FeatureStore
    from vsa import train_mrnn as T

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    store = FeatureStore(feats_path)
    vocab = build_vocab(ds, cfg.min_count)
    max_len = cfg.max_len
    if alignments is not None:
        from vsa.io import read_jsonl

        recs = read_jsonl(alignments)
        tr = T.alignment_split(recs, store, "train", vocab, max_len, alignments)
        va = T.alignment_split(recs, store, "val", vocab, max_len, alignments)
    else:
        tr = T.image_split(ds, store, "train", vocab, max_len, regions=regions, max_regions=cfg.max_regions,
                           skip_missing=skip_missing, warn=warn)
        va = T.image_split(ds, store, "val", vocab, max_len, regions=regions, max_regions=cfg.max_regions,
                           skip_missing=skip_missing, warn=warn)
    info(f"train-mrnn: {len(tr.sents)} train sentences ({len(tr.feats)} items), {len(va.feats)} val items, "
         f"vocabulary {len(vocab)}, {cfg.rnn}{' + attention' if cfg.attention else ''} -> {out}")
    extractor = dict(store.meta)
    meta = {"features": str(Path(feats_path).resolve()), "dataset": ds.name,
            "mode": "regions" if alignments is not None else "image"}
    with progress(transient=True) as prog:
        summary = T.train(cfg, tr, va, vocab, out, extractor, resume=resume, log=info, extra_meta=meta,
                          choose_decoding=not no_beam_search, device=device, scst_lr=scst_lr, progress=prog)
    if summary.get("rank", 0) != 0:  # torchrun: rank 0 reports
        return
    info(f"best val CIDEr {summary['best'].get('val_CIDEr')} at epoch {summary['best'].get('epoch')}, "
         f"{summary['train_seconds'] / 60:.1f} min -> {out}")
    if as_json:
        from vsa.io import write_json

        write_json("-", summary)
