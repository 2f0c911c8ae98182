"""``vsa show``: pictures and HTML pages (the library: vsa.pictures)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from vsa.cli import app
from vsa.cli.common import guarded, info, progress, warn


@app.command("show")
@guarded
def show(
    inputs: List[Path] = typer.Argument(..., help="Alignments JSONL (`vsa align`), captions JSONL (`vsa caption --json`) or retrieval ranks JSON (`vsa eval --ranks-out`)."),
    out: Path = typer.Option(Path("vsa-show"), "--out", "-o", help="Output folder: index.html / retrieval.html and the PNGs."),
    images: Optional[Path] = typer.Option(None, "--images", help="Image root for keys (default: [dataset] images in vsa.toml)."),
    dataset: Optional[Path] = typer.Option(None, "--dataset", help="Caption dataset, for retrieval pages (default: [dataset] path)."),
    keys: Optional[List[str]] = typer.Option(None, "--key", "-k", help="Only these image keys (repeatable)."),
    split: Optional[str] = typer.Option(None, "--split", help="Only alignments of this split."),
    limit: int = typer.Option(50, "--limit", help="At most this many images (0 = all)."),
    sentences: int = typer.Option(5, "--sentences", help="At most this many sentences per image."),
    side: int = typer.Option(512, "--side", help="Draw the image this many pixels on its long side (small images are upscaled)."),
    top: int = typer.Option(5, "--top", help="Retrieval pages: top-ranked sentences/images shown per query."),
    no_png: bool = typer.Option(False, "--no-png", help="Write the HTML page only (retrieval pages have no PNGs)."),
):
    """Pictures of grounded snippets and captions (PNG + a static HTML page), or a retrieval browser page.

    Every page opens from disk (no server, no network): images are files in the output folder.
    """
    from vsa import pictures as P
    from vsa.cli import workspace as W
    from vsa.cli.config import resolve
    from vsa.errors import VsaError

    # a picture is (side + panel) x (side + text) pixels: an unbounded --side runs out of memory
    if not P.MIN_SIDE <= side <= P.MAX_SIDE:
        raise VsaError(f"--side must be from {P.MIN_SIDE} to {P.MAX_SIDE} pixels, got {side}")
    for flag, v, lo in (("--top", top, 1), ("--sentences", sentences, 1), ("--limit", limit, 0)):
        if v < lo:
            raise VsaError(f"{flag} must be >= {lo}, got {v}")

    root = resolve(images, "dataset.images", "--images", required=False)
    limit_px = W.max_pixels(None)
    for inp in inputs:
        kind = P.file_kind(inp)
        if kind == "retrieval":
            ds = W.open_dataset(dataset, images)
            res = P.show_retrieval(inp, ds, out, top=top, max_pixels=limit_px, progress_factory=progress)
            info(f"show: {res['images']} images, {res['sentences']} sentences -> {res['page']}")
            continue
        with progress() as prog:
            res = P.show_pictures(inp, out, kind, root, keys, split, limit, sentences, side, no_png, limit_px, prog)
        info(f"show: {res['pictures']} picture(s) of {res['images']} image(s) -> {res['page']}")
