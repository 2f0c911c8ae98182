"""Where the generator's training time goes: the cross-entropy step of the shipped recipe against this machine's
matrix-multiply rate (prints figures; no pass/fail).

    .venv/bin/python benchmarks/train_step.py [--threads 2] [--images 200]

1. the shipped generator's architecture (read from vsa/assets/mrnn-flickr8k.pt; fresh random weights) trained for one
   cross-entropy epoch by the trainer's own loop (`vsa.generator.train._xe_epoch`) on ``--images`` images x 5 sentences
   with Flickr8K's train sentence lengths (random words, random 50 x 1280 features): seconds per batch, tokens/s;
2. the floating-point work of that epoch counted from the architecture (matrix products only: forward 2 x MACs,
   backward twice the forward) and the rate it implies, against the rate of one plain matrix product of the step's
   largest shape ([100, 1536] x [1536, 2048]) in the same process: the share of the machine's GEMM rate the step
   reaches;
3. the top operators of one epoch by self CPU time (torch profiler);
4. the floor this gives for the shipped recipe (`GeneratorTrainConfig`'s XE + SCST epochs over 30,000 sentences; an SCST
   epoch costs about what an XE epoch does: 5 samples per image, re-scored with gradients): minutes at the measured
   rate and at the plain-GEMM rate.

Run on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("VSA_SHARED", ROOT.parent / "shared"))


ROWS = 50  # attended rows per image of the shipped grid features: the whole image + 7 x 7 cells


def step_flops(cfg, tokens: int, images: int) -> float:
    """Training FLOPs (matrix products; backward = 2 x forward) of ``tokens`` target tokens over ``images`` images."""
    E, H, A, D, V, R = cfg.embed, cfg.hidden, cfg.att_dim, cfg.feat_dim, cfg.vocab_size, ROWS
    per_token = E * 4 * H + 2 * H * 4 * H + H * A + R * A + R * H + 3 * H * 4 * H + H * V  # MACs
    per_image = R * D * H + R * H * A + D * H + H * 4 * H
    return 3 * 2 * (per_token * tokens + per_image * images)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--images", type=int, default=200)
    args = ap.parse_args()
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from vsa.checkpoint import config_from, load_checkpoint
    from vsa.generator.model import GeneratorConfig, build_model
    from vsa.splits import CaptionSplit
    from vsa.generator.train import GeneratorTrainConfig, _xe_epoch
    from vsa.distributed import setup

    ck = load_checkpoint(ROOT / "vsa" / "assets" / "mrnn-flickr8k.pt")
    cfg = config_from(GeneratorConfig, ck["model"])
    tcfg = GeneratorTrainConfig(flip=0.0)
    rng = np.random.default_rng(0)
    ds_path = SHARED / "data" / "flickr8k" / "dataset_flickr8k.json"
    if ds_path.exists():
        lengths = [min(len(s["tokens"]), tcfg.max_len) for im in json.loads(ds_path.read_text())["images"]
                   if im["split"] == "train" for s in im["sentences"]]
    else:
        lengths = [11] * 1000
    lens = rng.choice(lengths, size=args.images * 5)
    sents = [(i // 5, list(rng.integers(4, cfg.vocab_size, size=int(n)))) for i, n in enumerate(lens)]
    feats = torch.from_numpy(rng.normal(size=(args.images, ROWS, cfg.feat_dim)).astype(np.float32))
    sp = CaptionSplit(feats, torch.ones(args.images, ROWS, dtype=torch.bool), sents, [], [], list(range(args.images)))
    model = build_model(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=tcfg.lr)
    env = setup("cpu")
    tokens = int(sum(int(n) + 1 for n in lens))
    print(f"torch {torch.__version__}, {args.threads} threads, cpu {torch.backends.cpu.get_cpu_capability()}, "
          f"load average {os.getloadavg()[0]:.1f}; model {cfg.arch} hidden {cfg.hidden} vocab {cfg.vocab_size}; "
          f"{len(sents)} sentences, {tokens} tokens")

    _xe_epoch(model, opt, sp, tcfg, 0, env=env)  # warm-up
    t0 = time.perf_counter()
    _xe_epoch(model, opt, sp, tcfg, 1, env=env)
    dt = time.perf_counter() - t0
    batches = -(-len(sents) // tcfg.batch_size)
    flops = step_flops(cfg, tokens, args.images)
    rate = flops / dt / 1e9

    a, b = torch.randn(100, 3 * cfg.hidden), torch.randn(3 * cfg.hidden, 4 * cfg.hidden)
    for _ in range(5):
        a @ b
    n, t1 = 0, time.perf_counter()
    while time.perf_counter() - t1 < 3:
        a @ b
        n += 1
    gemm = 2 * a.shape[0] * a.shape[1] * b.shape[1] * n / (time.perf_counter() - t1) / 1e9
    print(f"cross-entropy epoch: {dt / batches * 1000:7.1f} ms per batch of {tcfg.batch_size} sentences, "
          f"{tokens / dt:7.0f} tokens/s")
    print(f"matrix work {flops / tokens / 1e6:.1f} MFLOP per token -> {rate:6.1f} GFLOP/s achieved; plain GEMM "
          f"[100, {a.shape[1]}] x [{b.shape[0]}, {b.shape[1]}]: {gemm:6.1f} GFLOP/s: the step reaches "
          f"{rate / gemm:.2f} of it")

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _xe_epoch(model, opt, sp, tcfg, 2, env=env)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))

    flickr_tokens = 30000 * (float(np.mean(lengths)) + 1)
    per_epoch = step_flops(cfg, int(flickr_tokens), 6000)
    epochs = tcfg.epochs + tcfg.scst_epochs
    print(f"shipped recipe, {tcfg.epochs} + {tcfg.scst_epochs} epochs over 30,000 sentences ({flickr_tokens / 1e3:.0f}k tokens "
          f"per epoch, {per_epoch / 1e12:.1f} TFLOP): {epochs * per_epoch / rate / 1e9 / 60:.0f} min at the achieved rate, "
          f"{epochs * per_epoch / gemm / 1e9 / 60:.0f} min at the plain-GEMM rate (goal: 20 min)")


if __name__ == "__main__":
    main()
