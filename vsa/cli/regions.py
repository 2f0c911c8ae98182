from __future__ import annotations

from typing import List, Optional

import typer

from vsa.cli import app
from vsa.cli.common import command_inputs, guarded, info, progress, warn


@app.command("regions")
@guarded
def regions(
    inputs: Optional[List[str]] = typer.Argument(None, help="Image files and folders (recursive); - reads image paths from stdin. Default: [dataset] images of vsa.toml, else the paths piped in."),
    detector: Optional[str] = typer.Option(None, "--detector", "-d", help="An ultralytics .pt (a path, or a release name such as yolo11n.pt, downloaded when online) or a YOLOv5 state-dict folder. Default: $VSA_DETECTOR, [regions] detector in vsa.toml, else the YOLOv5n COCO detector inside vsa (offline)."),
    top: Optional[int] = typer.Option(None, "--top", help="Detections kept per image (plus the whole image). Default 19."),
    conf: Optional[float] = typer.Option(None, "--conf", help="Minimum detection score. Default 0.03: low on purpose, the paper keeps weak detections."),
    iou: Optional[float] = typer.Option(None, "--iou", help="Class-aware NMS IoU threshold. Default 0.5."),
    dedup: Optional[float] = typer.Option(None, "--dedup", help="Then drop a box overlapping a better box of any class above this IoU; 1 = off. Default 0.9."),
    imgsz: Optional[int] = typer.Option(None, "--imgsz", help="Detector input side. Default 0 = auto: twice the longest image side, multiple of 32, at most 640."),
    batch_size: int = typer.Option(16, "--batch-size", help="Images per detector batch."),
    workers: int = typer.Option(1, "--workers", help="Processes decoding images (0 = in the main process)."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Output JSONL. Default: stdout; in a terminal with a vsa.toml, [regions] out."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Warn about unreadable images and go on (default: exit 2)."),
    max_pixels: Optional[int] = typer.Option(None, "--max-pixels", help="Decompression-bomb guard (default 178956970 or $VSA_MAX_PIXELS)."),
    shard: Optional[str] = typer.Option(None, "--shard", help="K/N: detect on a deterministic 1/N of the images (1-based K); the shards' outputs, concatenated in order, are one run's."),
    device: str = typer.Option("auto", "--device", help="auto (cuda when present), cpu, cuda."),
    threads: int = typer.Option(0, "--threads", help="torch intra-op threads (0 = torch default)."),
):
    """Detect regions: the whole image + top detections per image, as JSONL (one line per image)."""
    from vsa.cli import workspace as W
    from vsa.cli.config import resolve
    from vsa.errors import VsaError
    from vsa.images import IMAGE_EXTS, find_images
    from vsa.io import stdout_is_piped, text_stream_lines
    from vsa.regions import DetectOptions, write_regions

    inputs = command_inputs(inputs, "images", "IMAGES... (files or folders)", "image paths (one per line)",
                            "dataset.images")
    if "-" in inputs:  # stdin: one image path (file or folder) per line
        stdin_paths = list(text_stream_lines("-"))
        if not stdin_paths:
            raise VsaError("no image paths on stdin (one path per line): nothing to detect")
        inputs = [p for x in inputs for p in (stdin_paths if x == "-" else [x])]
    if not find_images(inputs, missing_ok=skip_bad):  # an empty folder is a mistake, not an empty result
        raise VsaError(f"no images found in {', '.join(inputs)} (looked for {', '.join(sorted(IMAGE_EXTS))})")
    if out is None:
        out = "-" if stdout_is_piped() else str(resolve(None, "regions.out", "--out", required=False, default="-"))
    given = dict(top=int(resolve(top, "regions.top", "--top", default=19)), conf=conf, iou=iou, dedup=dedup, imgsz=imgsz)
    opt = DetectOptions(**{k: v for k, v in given.items() if v is not None})
    with progress() as prog:
        st = write_regions(inputs, out, W.detector(detector), opt, batch_size, workers, W.max_pixels(max_pixels),
                           skip_bad, shard, device, threads, warn, prog)
    n_img = st["images"]
    info(f"regions: {n_img} images ({st['bad']} bad), {st['regions'] / max(n_img, 1):.2f} regions/image, "
         f"{n_img / max(st['seconds'], 1e-9):.1f} images/s")
