"""Where the aligner's training time goes: one training step of the shipped recipe with torch's CPU dropout against
vsa's (`vsa.align.Dropout`), and the per-epoch val retrieval (prints figures; no pass/fail).

    .venv/bin/python benchmarks/align_step.py [--threads 2] [--steps 20]

1. the shipped aligner's architecture (`AlignModelConfig` defaults, 3 x 3 cells: the whole image, up to 19 boxes and 9
   cells, Lite0's 1280-d features, random values; boxes per image drawn as Flickr8K's YOLOv5n detections: 1-19,
   9.7 on average) trained on batches of 128 sentences (2 per image, Flickr8K's lengths): milliseconds per step with
   `torch.nn.Dropout` and with `vsa.align.Dropout`, interleaved in one process, and their ratio;
2. the val retrieval every epoch runs (1000 images x 5000 sentences, `vsa.retrieval.score_matrix`): seconds;
3. what this gives for the shipped recipe (13 epochs of 235 steps): minutes of training, of validation every epoch,
   and with ``--set val_every=13`` (validated once, at the end).

Run on an idle machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per dropout kind and round (3 rounds)")
    args = ap.parse_args()
    import torch

    import vsa.align as A
    from vsa.align import ranking_loss
    from vsa.retrieval import score_matrix
    from vsa.train_align import AlignTrainConfig

    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    cfg = A.AlignModelConfig(cells=3)
    tcfg = AlignTrainConfig()
    rows = cfg.max_regions + 9

    def images(n):
        boxes = torch.randint(1, 20, (n,), generator=g)
        mask = torch.zeros(n, rows, dtype=torch.bool)
        for i in range(n):
            mask[i, : 1 + int(boxes[i])] = True
            mask[i, cfg.max_regions:] = True
        return torch.randn(n, rows, 1280, generator=g), mask

    def sentences(n):
        lengths = torch.randint(6, 18, (n,), generator=g)
        T = int(lengths.max())
        ids = torch.randint(1, 2540, (n, T), generator=g) * (torch.arange(T)[None] < lengths[:, None])
        return ids, lengths

    feats, rmask = images(tcfg.batch_size // tcfg.group)
    ids, lengths = sentences(tcfg.batch_size)
    img_of = torch.arange(tcfg.batch_size) // tcfg.group

    def model_with(dropout_cls):
        A.Dropout, keep = dropout_cls, A.Dropout
        try:
            torch.manual_seed(0)
            m = A.BRNNAligner(cfg, 2540, 1280)
        finally:
            A.Dropout = keep
        return m, torch.optim.Adam(m.parameters(), tcfg.lr)

    def step(m, opt):
        V, vm = m.embed_images(feats, rmask)
        S, sm = m.embed_sentences(ids, lengths)
        loss = ranking_loss(m.score(V, vm, S, sm), img_of, tcfg.margin, True)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), tcfg.clip)
        opt.step()

    kinds = {"torch.nn.Dropout": model_with(torch.nn.Dropout), "vsa.align.Dropout": model_with(A.Dropout)}
    times = {k: [] for k in kinds}
    for m, opt in kinds.values():
        for _ in range(3):
            step(m, opt)
    for _ in range(3):
        for k, (m, opt) in kinds.items():
            t = time.perf_counter()
            for _ in range(args.steps):
                step(m, opt)
            times[k].append((time.perf_counter() - t) / args.steps * 1000)
    print(f"torch {torch.__version__}, {args.threads} threads, load average {os.getloadavg()[0]:.1f}")
    ms = {k: statistics.median(v) for k, v in times.items()}
    for k, v in ms.items():
        print(f"training step, {k:18s}: {v:6.1f} ms (rounds {', '.join(f'{x:.1f}' for x in times[k])})")
    print(f"ratio vsa / torch dropout: {ms['vsa.align.Dropout'] / ms['torch.nn.Dropout']:.3f}")

    vfeats, vmask = images(1000)
    vids, vlen = sentences(5000)
    m = kinds["vsa.align.Dropout"][0]
    t = time.perf_counter()
    score_matrix(m, vfeats, vmask, vids, vlen)
    val_s = time.perf_counter() - t
    print(f"val retrieval, 1000 x 5000: {val_s:.1f} s")
    steps = -(-30000 // tcfg.batch_size)
    train_min = tcfg.epochs * steps * ms["vsa.align.Dropout"] / 1000 / 60
    print(f"shipped recipe, {tcfg.epochs} epochs of {steps} steps: {train_min:.1f} min of steps + "
          f"{tcfg.epochs * val_s / 60:.1f} min of val every epoch = {train_min + tcfg.epochs * val_s / 60:.1f} min; "
          f"with val_every={tcfg.epochs} {train_min + val_s / 60:.1f} min (goal: 20; batches are read from the features "
          f"file besides)")


if __name__ == "__main__":
    main()
