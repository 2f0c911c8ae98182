from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from vsa.cli import app
from vsa.cli.common import command_inputs, guarded, info, progress, warn



@app.command("embed")
@guarded
def embed(
    inputs: Optional[List[str]] = typer.Argument(None, help="Regions JSONL (a file, or - for stdin), or image files/folders (whole image only). Default: stdin (e.g. `vsa regions imgs/ | vsa embed -o f.npz`)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output NPZ (default: [features] regions in vsa.toml)."),
    cnn: Optional[str] = typer.Option(None, "--cnn", help="efficientnet-lite0 (default; with --crop grid: [features] grid_cnn, efficientnet-lite2 in a `vsa init` workspace), efficientnet-lite2, a torchvision model name, or open_clip:MODEL/TAG (an OpenCLIP image tower, e.g. open_clip:ViT-B-32/laion2b_s34b_b79k; pip install 'vsa[clip]')."),
    cnn_weights: Optional[str] = typer.Option(None, "--cnn-weights", help="Local weights file for --cnn (torchvision and open_clip models need one offline)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Crops per CNN forward (small batches are fastest on CPU)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Decoding/cropping: 0 = threads of this process taking turns with the CNN (the default on CPU, where the CNN uses every core); N = N worker processes overlapping the CNN (default 2 on CUDA)."),
    crop: str = typer.Option("warp", "--crop", help="warp: each box cropped and warped to 224 (paper, R-CNN style, one CNN pass per region); roi: RoIAlign on the whole image's feature map (one pass per image, ~Nx faster, coarser); grid: the whole image then the cells of its last feature map (--grid; for attention captioning, no detector)."),
    grid: int = typer.Option(7, "--grid", help="Cells per side with --crop grid (7 = the native 7x7 map at 224 px)."),
    cells: Optional[int] = typer.Option(None, "--cells", help="With --crop warp/roi: add the G x G cells of the image after the boxes (label 'cell': context the aligner scores, never a grounded box; warp pools them from the whole image's feature map); 0 = none. Default: for detector regions, the shipped aligner's recipe (3: the features it reads); for whole images and --crop grid, 0."),
    labels: bool = typer.Option(False, "--labels", help="Also write each box's detector class (one-hot over the COCO classes), score and place after its CNN features: the inputs of a label-reading generator (`vsa train-mrnn --arch updown-labels`)."),
    flip: bool = typer.Option(False, "--flip", help="Features of the images mirrored left to right (boxes mirrored with them; keys unchanged): training-time augmentation for `vsa train-mrnn --flip-features`."),
    context: float = typer.Option(0.0, "--context", help="Pad each box by this fraction of its size per side before warping."),
    dtype: str = typer.Option("float16", "--dtype", help="float16 or float32 features."),
    shard: Optional[str] = typer.Option(None, "--shard", help="K/N: process a deterministic 1/N of the inputs (1-based K)."),
    part_every: int = typer.Option(500, "--part-every", help="Save finished work every N images (resume granularity)."),
    no_resume: bool = typer.Option(False, "--no-resume", help="Ignore finished parts of an earlier run."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Warn about unreadable images and go on (default: exit 2)."),
    max_pixels: Optional[int] = typer.Option(None, "--max-pixels", help="Decompression-bomb guard (default 178956970 or $VSA_MAX_PIXELS)."),
    device: str = typer.Option("auto", "--device", help="auto (cuda when present), cpu, cuda."),
    threads: int = typer.Option(0, "--threads", help="torch intra-op threads (0 = torch default)."),
):
    """CNN features of every region (whole image first) into one NPZ, resumable and shardable.

    `vsa embed merge A.npz B.npz ... -o ALL.npz` joins the outputs of `--shard K/N` runs.
    """
    import time

    if inputs and inputs[0] == "merge":
        return merge(inputs[1:], out)

    from vsa.cli.config import resolve, workspace
    from vsa.errors import VsaError
    from vsa.features.embed import collect_items, output_key
    from vsa.io import output_lock

    # no workspace default here: the regions file vsa.toml names would take the place of a pipe into the command
    named = workspace().get("regions.out")
    inputs = command_inputs(inputs, "input", f"REGIONS.jsonl{f' (e.g. {named})' if named else ''} or IMAGES...",
                            "`vsa regions` (or image paths, one per line)")
    if inputs == ["-"] and _stdin_is_empty():
        raise VsaError("nothing on stdin: pipe `vsa regions IMAGES` into it, or pass REGIONS.jsonl or IMAGES...")

    items, meta = collect_items(inputs, shard, skip_bad=skip_bad, warn=warn)
    if cells is None:
        cells = _default_cells(items, crop)
    key = output_key(items, crop, flip)
    if key is None and out is None:
        raise VsaError("--flip without --crop grid has no default output: pass --out/-o")
    out_path = resolve(out, key, "--out/-o")
    with output_lock(out_path, "vsa embed"):  # before the CNN loads: a second run on this output is refused at once
        st, t0 = _run(items, meta, out_path, cnn, cnn_weights, batch_size, workers, crop, grid, cells, flip, context,
                      dtype, part_every, no_resume, skip_bad, max_pixels, device, threads, labels)
    dt = time.time() - t0
    done = st["images"] - st["skipped_done"] - st["bad"]
    info(f"embed: {st['written']} images in {out_path} ({st['skipped_done']} resumed, {st['bad']} bad), "
         f"{st['regions'] / max(done, 1):.2f} regions/image, {done / max(dt, 1e-9):.1f} images/s")


def _default_cells(items, crop: str) -> int:
    """``--cells`` when not given: for detector regions (warp or roi crops), the image cells of the shipped aligner's
    features, so that `vsa regions IMAGES | vsa embed` makes features it reads; none for whole images and grids."""
    if crop == "grid" or not any(it.regions for it in items):
        return 0
    from vsa.assets import SHIPPED_MODELS
    from vsa.checkpoint import load_checkpoint

    return int((load_checkpoint(SHIPPED_MODELS["align"]).get("extractor") or {}).get("cells") or 0)


def _stdin_is_empty() -> bool:
    """Does stdin end before its first byte (waits for the first byte of a pipe)?"""
    import sys

    buf = getattr(sys.stdin, "buffer", None)
    peek = getattr(buf, "peek", None)
    if peek is not None:
        return peek(1) == b""
    if buf is not None and buf.seekable():
        pos = buf.tell()
        empty = buf.read(1) == b""
        buf.seek(pos)
        return empty
    return False


def _run(items, meta, out_path, cnn, cnn_weights, batch_size, workers, crop, grid, cells, flip, context, dtype,
         part_every, no_resume, skip_bad, max_pixels, device, threads, labels=False):
    import time

    from vsa.cli import workspace as W
    from vsa.cli.config import resolve
    from vsa.errors import VsaError
    from vsa.features.embed import embed as run_embed, load_extractor
    from vsa.labels import COCO_CLASSES

    if labels and crop == "grid":
        raise VsaError("--labels writes detector boxes' classes: it goes with regions (--crop warp or roi)")

    cnn_weights = resolve(cnn_weights, "features.cnn_weights", "--cnn-weights", required=False)
    if dtype not in ("float16", "float32"):
        raise VsaError(f"--dtype must be float16 or float32, got {dtype!r}")
    if threads:
        import torch

        torch.set_num_threads(threads)
    if cnn is None and crop == "grid":  # the caption generator's CNN may differ from the aligner's
        cnn = resolve(None, "features.grid_cnn", "--cnn", required=False)
    ex = load_extractor(resolve(cnn, "features.cnn", "--cnn", default="efficientnet-lite0"),
                        str(cnn_weights) if cnn_weights else None, device, W.jit())
    if workers is None:
        workers = 0 if str(ex.device) == "cpu" else 2
    t0 = time.time()
    from vsa.runtime import Interrupted

    try:
        with progress() as prog:
            st = run_embed(items, out_path, ex, batch_size=batch_size, workers=workers, context=context, crop=crop, dtype=dtype,
                           resume=not no_resume, part_every=part_every, skip_bad=skip_bad, max_pixels=W.max_pixels(max_pixels), warn=warn, progress=prog, grid=grid, cells=cells, flip=flip,
                           extra_meta=meta, labels=COCO_CLASSES if labels else ())
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (vsa.cli.common.guarded): exit 130
        raise Interrupted(f"interrupted: finished work is kept in {out_path}.parts; rerun the same command to resume") from None
    return st, t0


def merge(inputs, out):
    """Join `vsa embed --shard K/N` outputs into one NPZ (same format as a single run)."""
    from vsa.errors import VsaError
    from vsa.features.embed import merge_npz

    if not inputs or out is None:
        raise VsaError("usage: vsa embed merge SHARD.npz... -o OUT.npz")

    n = merge_npz(list(inputs), out)
    info(f"merged {len(inputs)} files: {n} images -> {out}")
