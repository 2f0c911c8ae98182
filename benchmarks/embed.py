"""Speed of feature extraction (prints figures; no pass/fail).

    .venv/bin/python benchmarks/embed.py [--images 500] [--batch-size 16] [--threads 2]

1. raw CNN forward, images/s, on a fixed in-memory batch (the ceiling);
2. the `vsa embed` pipeline (decode, squash, batch, forward, parts, merge) on N real Flickr8K images,
   whole image only, same batch size, with the CPU default (decoding in threads of the process, taking turns
   with the forward: `--workers 0`): its ratio to 1 (goal >= 0.9). Single runs vary with what else the machine
   does, so `--repeats R` rounds each time the raw forward and then the pipeline, back to back, and the ratio is
   the median of the rounds with its range; then once with one DataLoader worker process overlapping the
   forward (`--workers 1`);
3. seconds per image for regions + embed with 20 regions per image (goal <= 0.05 s for --crop roi on 2
   cores), for --crop warp (paper) and --crop roi, in steady state (each CNN path is traced once before
   the clock starts, as it is once per `vsa embed` run).

Run it on an otherwise idle machine: other jobs on the same cores distort every figure.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("VSA_SHARED", ROOT.parent / "shared"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=5, help="rounds of raw forward + pipeline (part 2)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=0, help="for part 3")
    ap.add_argument("--region-images", type=int, default=100)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from vsa.features.cnn import load_extractor
    from vsa.features.embed import EmbedItem, embed
    from vsa.images import find_images, open_image
    from vsa.regions import load_detector, whole_image_region

    folder = SHARED / "data" / "flickr8k" / "images"
    if not folder.exists():
        sys.exit(f"needs Flickr8K images at {folder} (set VSA_SHARED)")
    files = find_images([folder])
    ex = load_extractor(device="cpu")
    B = args.batch_size
    print(f"torch {torch.__version__}, {args.threads} threads, batch {B}, cpu {torch.backends.cpu.get_cpu_capability()}, "
          f"load average {os.getloadavg()[0]:.1f}")

    # 1. raw forward on a fixed batch of real images
    x = torch.stack([ex.preprocess(open_image(p)) for p, _ in files[:B]])
    ex(x)

    def raw_rate(seconds: float) -> float:
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            ex(x)
            n += B
        return n / (time.perf_counter() - t0)

    def pipe_rate(items, workers: int) -> float:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            embed(items, Path(tmp) / "w.npz", ex, batch_size=B, workers=workers)
            return len(items) / (time.perf_counter() - t0)

    print(f"raw CNN forward:            {raw_rate(10):7.1f} images/s")

    # 2. the embed pipeline, whole image only: rounds of (raw, pipeline) back to back, ratio per round
    items = [EmbedItem(k, str(p), None) for p, k in files[: args.images]]
    ratios = []
    for r in range(args.repeats):
        raw = raw_rate(5)
        pipe = pipe_rate(items, 0)
        ratios.append(pipe / raw)
        print(f"round {r + 1}: raw {raw:6.1f} images/s, vsa embed --workers 0 ({len(items)} images) {pipe:6.1f} "
              f"images/s, ratio {pipe / raw:.2f}")
    ratios.sort()
    med = ratios[len(ratios) // 2] if len(ratios) % 2 else sum(ratios[len(ratios) // 2 - 1:len(ratios) // 2 + 1]) / 2
    print(f"vsa embed / raw forward: median {med:.2f} over {len(ratios)} rounds, range {ratios[0]:.2f}-{ratios[-1]:.2f} "
          f"(goal median >= 0.9; decoding in threads, the CPU default)")
    raw = raw_rate(5)
    pipe = pipe_rate(items, 1)
    print(f"vsa embed --workers 1: {pipe:7.1f} images/s   ratio {pipe / raw:.2f} (one worker process)")

    # 3. regions + embed, 20 regions per image
    det = load_detector(str(SHARED / "weights" / "yolov5n-coco"), device="cpu")
    sub = files[: args.region_images]
    det.detect([open_image(sub[0][0])], top=19)  # warm-up
    x1 = x[:2]
    ex.roi(x1, [torch.tensor([[0.0, 0.0, 224.0, 224.0]])] * 2)  # trace the feature-map path once, as a run does
    for crop in ("warp", "roi"):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            recs = []
            for s in range(0, len(sub), B):
                ims = [open_image(p) for p, _ in sub[s : s + B]]
                for (p, k), im, d in zip(sub[s : s + B], ims, det.detect(ims, top=19, conf=0.0005, dedup=1.0)):
                    recs.append(EmbedItem(k, str(p), [whole_image_region(*im.size)] + d))
            t_det = time.perf_counter() - t0
            st = embed(recs, Path(tmp) / "r.npz", ex, batch_size=B, workers=args.workers, crop=crop)
            dt = time.perf_counter() - t0
        per = st["regions"] / len(sub)
        print(f"regions + embed --crop {crop}: {dt / len(sub):6.3f} s/image ({per:.1f} regions/image; "
              f"detector {t_det / len(sub):.3f} s/image){' (goal <= 0.05)' if crop == 'roi' else ''}")


if __name__ == "__main__":
    main()
