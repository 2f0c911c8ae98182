"""bfloat16 on the CPU: does it make the generator's training step faster on this host? (prints; no pass/fail)

    .venv/bin/python benchmarks/precision.py [--threads 2] [--images 200] [--rounds 3]

Prints the host's bfloat16 capability (torch's CPU capability, the avx512_bf16 / amx_bf16 flags), then, in one
process and interleaved over ``--rounds`` rounds so that load drifts hit every variant alike:

1. a plain matrix product of the generator's largest training shape ([100, 1536] x [1536, 2048]) in float32 and in
   bfloat16: GFLOP/s;
2. one cross-entropy epoch of the shipped generator's architecture (random weights, ``--images`` x 5 sentences of
   Flickr8K's lengths, the trainer's own loop ``vsa.generator.train._xe_epoch``) as variants: ``float32``; ``autocast``
   (torch.autocast("cpu", bfloat16) around the step, float32 weights); ``bf16-weights`` (the model and its inputs
   cast to bfloat16 once, the optimiser on them: the cost of the arithmetic alone, without the float32 master copy a
   real recipe would keep). Median seconds per epoch and the ratio to float32.

Run on an otherwise idle machine and say which host in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("VSA_SHARED", ROOT.parent / "shared"))
ROWS = 50


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from vsa.checkpoint import config_from, load_checkpoint
    from vsa.distributed import setup
    from vsa.generator.model import GeneratorConfig, build_model
    from vsa.splits import CaptionSplit
    from vsa.generator.train import GeneratorTrainConfig, _xe_epoch

    flags = cpu_flags()
    print(f"torch {torch.__version__}, {args.threads} threads, cpu capability {torch.backends.cpu.get_cpu_capability()}, "
          f"avx512_bf16 {'avx512_bf16' in flags}, amx_bf16 {'amx_bf16' in flags}, load {os.getloadavg()[0]:.1f}")

    ck = load_checkpoint(ROOT / "vsa" / "assets" / "mrnn-flickr8k.pt")
    cfg = config_from(GeneratorConfig, ck["model"])
    tcfg = GeneratorTrainConfig(flip=0.0)
    rng = np.random.default_rng(0)
    ds_path = SHARED / "data" / "flickr8k" / "dataset_flickr8k.json"
    lengths = ([min(len(s["tokens"]), tcfg.max_len) for im in json.loads(ds_path.read_text())["images"]
                if im["split"] == "train" for s in im["sentences"]] if ds_path.exists() else [11] * 1000)
    lens = rng.choice(lengths, size=args.images * 5)
    sents = [(i // 5, list(rng.integers(4, cfg.vocab_size, size=int(n)))) for i, n in enumerate(lens)]
    feats = torch.from_numpy(rng.normal(size=(args.images, ROWS, cfg.feat_dim)).astype(np.float32))
    mask = torch.ones(args.images, ROWS, dtype=torch.bool)
    env = setup("cpu")

    def variant(name):
        torch.manual_seed(0)
        model = build_model(cfg)
        f = feats
        if name == "bf16-weights":
            model = model.to(torch.bfloat16)
            # the model computes its inputs in float32 (normalised features, zero states): every layer casts what
            # it receives, as a model written for bf16 storage would hold it already
            def to_bf16(m, args):
                return tuple(x.to(torch.bfloat16) if torch.is_tensor(x) and x.is_floating_point() else
                             tuple(y.to(torch.bfloat16) for y in x) if isinstance(x, tuple) else x for x in args)

            for m in model.modules():
                if isinstance(m, (torch.nn.Linear, torch.nn.LSTMCell, torch.nn.Embedding)):
                    m.register_forward_pre_hook(to_bf16)
        sp = CaptionSplit(f, mask, sents, [], [], list(range(args.images)))
        opt = torch.optim.Adam(model.parameters(), lr=tcfg.lr)
        ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if name == "autocast" else contextlib.nullcontext
        return model, opt, sp, ctx

    names = ["float32", "autocast", "bf16-weights"]
    runs = {n: variant(n) for n in names}
    for n in names:  # warm-up
        model, opt, sp, ctx = runs[n]
        with ctx():
            _xe_epoch(model, opt, sp, tcfg, 0, env=env)
    a32, b32 = torch.randn(100, 3 * cfg.hidden), torch.randn(3 * cfg.hidden, 4 * cfg.hidden)
    a16, b16 = a32.bfloat16(), b32.bfloat16()
    times = {n: [] for n in names}
    gemm = {"float32": [], "bfloat16": []}
    for r in range(args.rounds):
        for label, (a, b) in (("float32", (a32, b32)), ("bfloat16", (a16, b16))):
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < 1.0:
                a @ b
                n += 1
            gemm[label].append(2 * a.shape[0] * a.shape[1] * b.shape[1] * n / (time.perf_counter() - t0) / 1e9)
        for n in names:
            model, opt, sp, ctx = runs[n]
            t0 = time.perf_counter()
            with ctx():
                loss = _xe_epoch(model, opt, sp, tcfg, r + 1, env=env)
            times[n].append(time.perf_counter() - t0)
            print(f"round {r + 1} {n:13s} {times[n][-1]:6.2f} s  {loss}", flush=True)
    g32, g16 = statistics.median(gemm["float32"]), statistics.median(gemm["bfloat16"])
    print(f"GEMM [100, {a32.shape[1]}] x [{b32.shape[0]}, {b32.shape[1]}]: float32 {g32:.1f}, bfloat16 {g16:.1f} "
          f"GFLOP/s (x{g16 / g32:.2f})")
    base = statistics.median(times["float32"])
    for n in names:
        m = statistics.median(times[n])
        print(f"cross-entropy epoch ({len(sents)} sentences) {n:13s} median {m:6.2f} s (spread {min(times[n]):.2f}-"
              f"{max(times[n]):.2f})  x{m / base:.2f} of float32")


if __name__ == "__main__":
    main()
