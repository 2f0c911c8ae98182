"""``vsa align``: sentences -> snippets grounded in boxes (the library: vsa.alignment.snippets)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from vsa.cli import app
from vsa.cli.common import guarded, info, progress, warn


@app.command("align")
@guarded
def align(
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Aligner checkpoint (default: [align] model in vsa.toml, else the shipped Flickr8k grounding aligner, vsa/assets/align-ground-flickr8k.pt)."),
    dataset: Optional[Path] = typer.Option(None, "--dataset", help="Caption dataset (default: [dataset] path in vsa.toml)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Image root folder (only for the dataset loader)."),
    features: Optional[Path] = typer.Option(None, "--features", help="Region features NPZ (default: [features] regions in vsa.toml)."),
    split: str = typer.Option("train", "--split", help="train, val, test, restval, train+restval or all."),
    beta: Optional[float] = typer.Option(None, "--beta", help="Reward for neighbouring words on the same region; larger gives longer snippets (default: the aligner's own, chosen on val and saved in it, else 0.05; see docs/alignment-snippets.md)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output JSONL (default: [align] alignments in vsa.toml, else stdout; '-' for stdout)."),
    no_resume: bool = typer.Option(False, "--no-resume", help="Ignore the finished part of an earlier run."),
    skip_missing: bool = typer.Option(False, "--skip-missing", help="Skip dataset images that have no features (default: error)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N image-sentence pairs."),
    shard: Optional[str] = typer.Option(None, "--shard", help="K/N: align a deterministic 1/N of the pairs (1-based K); concatenating shards 1..N in order gives one run's output."),
    device: str = typer.Option("auto", "--device", help="auto (cuda when present), cpu, cuda."),
    threads: int = typer.Option(0, "--threads", help="torch intra-op threads (0 = torch default)."),
):
    """Snippet alignment (chain MRF, exact Viterbi) of every sentence to its image's regions, as JSONL.

    One line per image-sentence pair: the sentence cut into snippets, each with its word span, text,
    region index, box, label and mean word-region score. Resumable: rerun with the same -o.
    """
    from vsa.cli.common import note
    from vsa.cli.config import default_model, resolve, workspace
    from vsa.cli.workspace import open_dataset
    from vsa.errors import VsaError
    from vsa.alignment.snippets import align_split

    if beta is not None and beta < 0:
        raise VsaError(f"--beta must be >= 0, got {beta}")
    if out is None:
        out = workspace().get("align.alignments")
    ckpt = default_model("align", model, note, "align-ground")
    feats_path = resolve(features, "features.regions", "--features")
    ds = open_dataset(dataset, images)
    with progress() as prog:
        res = align_split(ckpt, feats_path, ds, split, out, beta, resume=not no_resume, skip_missing=skip_missing,
                          limit=limit, shard=shard, device=device, threads=threads, warn=warn, progress=prog)
    st = res["stats"]
    where = "stdout" if res["resumed"] is None else f"{out} ({res['resumed']} resumed)"
    info(f"align: {st['sentences']} pairs -> {where}; beta {res['beta']:g}: {st['snippets_per_sentence']:.2f} snippets/sentence, "
         f"mean length {st['mean_length']:.2f} words, {100 * st['whole_image_share']:.1f}% on the whole image, "
         f"{100 * st['object_share']:.1f}% on object boxes")
