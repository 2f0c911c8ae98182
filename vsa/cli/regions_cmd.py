from __future__ import annotations

import os
from typing import List, Optional

import typer

from vsa.cli import app
from vsa.cli.common import guarded, info, progress, warn


@app.command("regions")
@guarded
def regions(
    inputs: Optional[List[str]] = typer.Argument(None, help="Image files and folders (recursive). Paths on stdin when omitted."),
    detector: Optional[str] = typer.Option(None, "--detector", "-d", help="Ultralytics weights (path or name, e.g. yolo11n.pt) or a YOLOv5 state-dict folder. Default: $VSA_DETECTOR, [regions] detector in vsa.toml, else yolo11n.pt."),
    top: Optional[int] = typer.Option(None, "--top", help="Detections kept per image (plus the whole image). Default 19."),
    conf: float = typer.Option(0.03, "--conf", help="Minimum detection score (low on purpose: the paper keeps weak detections)."),
    iou: float = typer.Option(0.5, "--iou", help="Class-aware NMS IoU threshold."),
    dedup: float = typer.Option(0.9, "--dedup", help="Drop a box overlapping a better box of any class above this IoU (1 = off)."),
    imgsz: int = typer.Option(0, "--imgsz", help="Detector input size; 0 = auto: twice the longest side, multiple of 32, at most 640."),
    batch_size: int = typer.Option(16, "--batch-size", help="Images per detector batch."),
    out: str = typer.Option("-", "--out", "-o", help="Output JSONL (default stdout)."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Warn about unreadable images and go on (default: exit 2)."),
    max_pixels: Optional[int] = typer.Option(None, "--max-pixels", help="Decompression-bomb guard (default 178956970 or $VSA_MAX_PIXELS)."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, or auto."),
    threads: int = typer.Option(0, "--threads", help="torch intra-op threads (0 = torch default)."),
):
    """Detect regions: the whole image + top detections per image, as JSONL (one line per image)."""
    import time

    from vsa.config import resolve
    from vsa.images import ImageError, find_images, open_image
    from vsa.io import JsonlWriter, resolve_input, text_stream_lines
    from vsa.regions import DetectOptions, load_detector, regions_record

    if not inputs:
        src = resolve_input(None, "images", "IMAGES...")
        inputs = list(text_stream_lines(src))
    files = find_images(inputs)
    if threads:
        import torch

        torch.set_num_threads(threads)
    top_n = int(resolve(top, "regions.top", "--top", default=19))
    det = load_detector(detector, device)
    n_img, n_reg, t0 = 0, 0, time.time()

    def sized(images):
        if imgsz:
            return imgsz
        m = max(max(im.size) for im in images)
        return int(min(640, max(64, -(-2 * m // 32) * 32)))

    with JsonlWriter(out) as w, progress() as prog:
        task = prog.add_task("regions", total=len(files))
        for s in range(0, len(files), batch_size):
            chunk = files[s : s + batch_size]
            ims, ok = [], []
            for path, key in chunk:
                try:
                    ims.append(open_image(path, max_pixels))
                    ok.append((path, key))
                except ImageError as e:
                    if not skip_bad:
                        raise
                    warn(f"skipped: {e}")
            if ims:
                opt = DetectOptions(top=top_n, conf=conf, iou=iou, dedup=dedup, imgsz=sized(ims))
                for (path, key), im, dets in zip(ok, ims, det.detect(ims, opt)):
                    rec = regions_record(key, os.fsdecode(path), im, dets, det.name)
                    n_reg += len(rec["regions"])
                    w.write(rec)
                    n_img += 1
            prog.advance(task, len(chunk))
    dt = time.time() - t0
    info(f"regions: {n_img} images, {n_reg / max(n_img, 1):.2f} regions/image, {n_img / max(dt, 1e-9):.1f} images/s")
