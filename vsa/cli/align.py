"""``vsa align``: sentences -> snippets grounded in boxes (the library: vsa.snippets)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from vsa.cli import app
from vsa.cli.common import guarded, info, progress, warn


@app.command("align")
@guarded
def align(
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Aligner checkpoint (default: [align] model in vsa.toml, else the shipped one)."),
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
    from vsa.cli.workspace import open_dataset
    from vsa.config import resolve, workspace
    from vsa.errors import VsaError
    from vsa.featstore import load_features
    from vsa.io import JsonlWriter, is_stdio
    from vsa.mrf import snippet_stats
    from vsa.snippets import align_to_file, aligner_beta, check_extractor, iter_alignments, pairs_of

    if beta is not None and beta < 0:
        raise VsaError(f"--beta must be >= 0, got {beta}")
    if out is None:
        out = workspace().get("align.alignments")
    to_stdout = out is None or is_stdio(out)
    if threads:
        import torch

        torch.set_num_threads(threads)
    from vsa.align import load_aligner

    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    from vsa.cli.common import note
    from vsa.config import default_model

    aligner = load_aligner(default_model("align", model, note), device=device)
    beta = aligner_beta(aligner, beta)  # --beta, else the aligner's own (a val sweep, saved in it), else the default
    feats_path = resolve(features, "features.regions", "--features")
    store = load_features(feats_path)
    check_extractor(aligner.extractor_meta, store.meta, feats_path)
    ds = open_dataset(dataset, images)
    if split not in ("all", "train+restval") and not ds.split(split):
        raise VsaError(f"split {split!r} has no images in {ds.source}")
    recs = ds.images if split == "all" else ds.split(split)
    keep = {r.key for r in store.check_dataset(recs, skip_missing=skip_missing, warn=warn)}
    pairs = [(r, s) for r, s in pairs_of(ds, split) if r.key in keep]
    if limit is not None:
        pairs = pairs[:limit]
    if shard:
        from vsa.features import shard_of

        pairs = shard_of(pairs, shard)
    if to_stdout:
        with progress() as prog, JsonlWriter("-") as w:
            task = prog.add_task("align", total=len(pairs))
            recs_out = []
            for r in iter_alignments(aligner, store, pairs, beta, on_pair=lambda: prog.advance(task)):
                w.write(r)
                recs_out.append({"snippets": r["snippets"]})
        st = snippet_stats(recs_out)
        where = "stdout"
    else:
        from vsa.runtime import Interrupted
        from vsa.snippets import part_path

        try:
            with progress() as prog:
                res = align_to_file(aligner, store, pairs, Path(out), beta, resume=not no_resume, warn=warn, progress=prog)
        except KeyboardInterrupt:
            part = part_path(Path(out))
            n = sum(1 for _ in open(part, "rb")) if part.exists() else 0
            raise Interrupted(f"interrupted; {n} finished pair(s) kept in {part} ({out} untouched); "
                              "rerun the same command to resume") from None
        st = snippet_stats(res["records"])
        where = f"{out} ({res['resumed']} resumed)"
    info(f"align: {st['sentences']} pairs -> {where}; beta {beta:g}: {st['snippets_per_sentence']:.2f} snippets/sentence, "
         f"mean length {st['mean_length']:.2f} words, {100 * st['whole_image_share']:.1f}% on the whole image, "
         f"{100 * st['object_share']:.1f}% on object boxes")
