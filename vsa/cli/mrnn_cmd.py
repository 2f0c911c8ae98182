from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from vsa.cli import app
from vsa.cli.common import console, guarded, info, progress, warn


def _sigterm_as_interrupt():
    import signal

    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


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
    from vsa.cli.data_cmd import open_dataset
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
    _sigterm_as_interrupt()
    try:
        with progress(transient=True) as prog:
            summary = T.train(cfg, tr, va, vocab, out, extractor, resume=resume, log=info, extra_meta=meta,
                              choose_decoding=not no_beam_search, device=device, scst_lr=scst_lr, progress=prog)
    except KeyboardInterrupt:
        warn(f"interrupted: the last good checkpoints are intact ({out}, {T.last_path(out)}); continue with --resume")
        raise typer.Exit(130)
    if summary.get("rank", 0) != 0:  # torchrun: rank 0 reports
        return
    info(f"best val CIDEr {summary['best'].get('val_CIDEr')} at epoch {summary['best'].get('epoch')}, "
         f"{summary['train_seconds'] / 60:.1f} min -> {out}")
    if as_json:
        from vsa.io import write_json

        write_json("-", summary)


@app.command("caption")
@guarded
def caption(
    inputs: Optional[List[str]] = typer.Argument(None, help="Image files or folders; '-' reads image paths from stdin (one per line)."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Generator checkpoint (default: [mrnn] model in vsa.toml if it exists, else the Flickr8k model shipped with vsa)."),
    beam: Optional[int] = typer.Option(None, "--beam", help="Beam size (default: the model's, chosen on val)."),
    max_len: Optional[int] = typer.Option(None, "--max-len", help="Maximum words."),
    length_penalty: Optional[float] = typer.Option(None, "--length-penalty", help="Rank beams by logprob/len^alpha (default: the model's)."),
    as_json: bool = typer.Option(False, "--json", help="JSONL records (docs/formats.md) instead of text lines."),
    coco_results: Optional[Path] = typer.Option(None, "--coco-results", help="Also write COCO results JSON (image_id = position, or dataset imgid with --dataset)."),
    bare: bool = typer.Option(False, "--bare", help="Text mode: print only the caption, without the path and TAB."),
    regions: bool = typer.Option(False, "--regions", help="Also describe each detected region (needs a detector and a region model)."),
    region_model: Optional[Path] = typer.Option(None, "--region-model", help="Region caption model for --regions (`vsa train-mrnn --alignments`; default: the shipped Flickr8k one)."),
    ground: bool = typer.Option(False, "--ground", help="Also cut the caption into snippets, each grounded in a box (whole image = region 0), with the aligner's chain MRF as `vsa align` does (needs a detector)."),
    aligner: Optional[Path] = typer.Option(None, "--aligner", help="Aligner for --ground (default: [align] model in vsa.toml if it exists, else the shipped Flickr8k aligner)."),
    detector: Optional[str] = typer.Option(None, "--detector", help="Detector for --regions and --ground (default: [regions] detector in vsa.toml)."),
    top: int = typer.Option(5, "--top", help="Regions described per image with --regions."),
    batch_size: int = typer.Option(16, "--batch-size"),
    device: str = typer.Option("auto", "--device", help="auto (cuda when present), cpu, cuda."),
    cnn_weights: Optional[Path] = typer.Option(None, "--cnn-weights", help="Local CNN weights (default: the packaged EfficientNet-Lite0 weights)."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Warn and go on when an image cannot be read."),
    shard: Optional[str] = typer.Option(None, "--shard", help="K/N: caption a deterministic 1/N of the images (1-based K), for cluster arrays."),
    threads: int = typer.Option(0, "--threads", help="Torch CPU threads (0: all)."),
):
    """Describe images: one line per image, `PATH<TAB>caption` (or --bare, --json, --coco-results)."""
    from vsa.errors import VsaError
    from vsa.images import find_images
    from vsa.io import data_stdout, dumps, text_stream_lines

    paths: list[tuple[Path, str]] = []
    items = list(inputs or [])
    if not items:
        from vsa.io import stdin_is_piped

        if not stdin_is_piped():
            raise VsaError("no images given: pass IMAGE... or a folder, or pipe paths on stdin with '-'")
        items = ["-"]
    for it in items:
        if it == "-":
            paths.extend((Path(p), Path(p).name) for p in text_stream_lines("-"))
        else:
            paths.extend(find_images([it]))
    if shard:
        from vsa.features import shard_of

        paths = shard_of(paths, shard)
    if not paths:
        raise VsaError("no images found in " + ", ".join(items))
    from vsa.captioner import Captioner

    if regions and region_model is None:
        from vsa.captioner import DEFAULT_REGION_MODEL

        if not DEFAULT_REGION_MODEL.exists():
            raise VsaError("--regions needs --region-model CKPT (a generator trained with `vsa train-mrnn --alignments`)")
        region_model = DEFAULT_REGION_MODEL
    from vsa.cli.common import note
    from vsa.config import default_model

    cap = Captioner.load(default_model("mrnn", model, note), device=device, cnn_weights=cnn_weights, threads=threads,
                         region_model=region_model if regions else None,
                         aligner=default_model("align", aligner, note) if ground else None)
    det = None
    if regions or ground:
        from vsa.config import resolve
        from vsa.regions import load_detector

        det = load_detector(resolve(detector, "regions.detector", "--detector", required=False), device=device)
    results = []
    out = data_stdout().buffer  # the real stdout: the command runs with sys.stdout on stderr (cli.common.guarded)
    for rec in cap.caption_files(paths, beam=beam, max_len=max_len, length_penalty=length_penalty,
                                 batch_size=batch_size, skip_bad=skip_bad, warn=warn, detector=det, top=top,
                                 regions=regions, ground=ground):
        if as_json:
            out.write(dumps(rec) + b"\n")
        else:
            line = rec["caption"] if bare else f"{rec['path']}\t{rec['caption']}"
            out.write(line.encode("utf-8", "surrogateescape") + b"\n")
            lead = "" if bare else rec["path"]
            for g in rec.get("snippets", []):  # the caption's snippets, in order: where, what, word-region score
                out.write(f"{lead}\t{g['label']} {[round(x) for x in g['box']]}\t{g['text']}\t{g['score']:.3f}\n"
                          .encode("utf-8", "surrogateescape"))
            for r in rec.get("regions", []):
                out.write(f"{'' if bare else rec['path']}\t{r['label']} {[round(x) for x in r['box']]}\t{r['caption']}\n".encode())
        out.flush()
        results.append(rec)
    if coco_results is not None:
        from vsa.io import write_json

        write_json(coco_results, [{"image_id": i, "caption": r["caption"]} for i, r in enumerate(results)])
