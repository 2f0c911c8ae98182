"""`vsa caption` speed: cold start of one photo vs `python -c "import torch"`, and folder throughput.

Usage: python benchmarks/caption.py [IMAGE_FOLDER] [--n 64] [--threads 2] [--model GEN.pt]
Prints wall times and the ratio (goal <= 1.8) measured in the same run, then images/s in folder mode.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def wall(cmd, env, repeat=3):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, env=env)
        times.append(time.perf_counter() - t)
        if r.returncode != 0:
            sys.exit(f"failed: {' '.join(map(str, cmd))}\n{r.stderr.decode()}")
    return statistics.median(times), r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", nargs="?", default=str(ROOT.parent / "shared/data/flickr8k/images"))
    ap.add_argument("--n", type=int, default=64, help="images for the folder-mode throughput")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--model", default=None, help="a generator checkpoint (default: the shipped one)")
    a = ap.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    files = sorted(p for p in Path(a.folder).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[: a.n]
    if not files:
        sys.exit(f"no images in {a.folder}")
    tmp = Path(tempfile.mkdtemp())
    for f in files:
        shutil.copy(f, tmp / f.name)
    vsa = [sys.executable, "-m", "vsa", "caption", "--threads", str(a.threads)] + (["--model", a.model] if a.model else [])
    t_torch, _ = wall([sys.executable, "-c", "import torch"], env, a.repeat)
    t_one, r = wall(vsa + [str(tmp / files[0].name)], env, a.repeat)
    print(f"python -c 'import torch'   {t_torch:6.2f} s")
    print(f"vsa caption ONE.jpg        {t_one:6.2f} s   ratio {t_one / t_torch:.2f} (goal <= 1.8)")
    print(f"  -> {r.stdout.decode().strip()}")
    t_all, r = wall(vsa + [str(tmp)], env, 1)
    n = len(r.stdout.decode().splitlines())
    t_net = t_all - t_one
    after = f"{(n - 1) / t_net:.1f} images/s after start-up" if t_net > 0 else "start-up dominates (machine busy?)"
    print(f"vsa caption FOLDER ({n} images) {t_all:6.2f} s   {n / t_all:.1f} images/s overall, {after}")
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
