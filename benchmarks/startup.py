"""Startup cost of the CLI: wall time of `vsa --help` against `python -c pass`, and heavy imports.

Usage: .venv/bin/python benchmarks/startup.py [--runs 10]

Goal: `vsa --help` answers in < 1.5 s wall, and importing vsa.cli pulls in none of torch,
torchvision, ultralytics or numpy (those belong inside the command functions).
Exits 1, loudly, when a heavy module is imported or the goal is missed.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HEAVY = ("torch", "torchvision", "ultralytics", "numpy")
GOAL_S = 1.5


def wall(cmd: list[str], runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True)
        out.append(time.perf_counter() - t0)
        if r.returncode != 0:
            sys.exit(f"FAILED: {' '.join(cmd)} exited {r.returncode}: {r.stderr.decode()[-500:]}")
    return out


def heavy_imports() -> list[str]:
    code = f"import sys, vsa.cli; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return r.stdout.split()


def slowest_imports(top: int = 8) -> list[tuple[int, str]]:
    r = subprocess.run([sys.executable, "-X", "importtime", "-c", "import vsa.cli"], capture_output=True, text=True)
    rows = []
    for line in r.stderr.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            rows.append((int(parts[1]), parts[2].rstrip()))
    return sorted(rows, reverse=True)[:top]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=10)
    a = ap.parse_args()
    exe = Path(sys.executable).parent / "vsa"
    vsa = [str(exe)] if exe.exists() else [shutil.which("vsa") or "vsa"]
    wall([sys.executable, "-c", "pass"], 2)  # warm the file cache
    base = wall([sys.executable, "-c", "pass"], a.runs)
    helps = wall(vsa + ["--help"], a.runs)
    sub = wall(vsa + ["data", "stats", "--help"], a.runs)
    med = statistics.median
    print(f"python -c pass       median {med(base) * 1000:7.1f} ms  (min {min(base) * 1000:.1f})")
    print(f"vsa --help           median {med(helps) * 1000:7.1f} ms  (min {min(helps) * 1000:.1f})  "
          f"= {med(helps) / med(base):.1f}x python startup")
    print(f"vsa data stats --help median {med(sub) * 1000:6.1f} ms")
    print("slowest imports of vsa.cli (cumulative us):")
    for us, name in slowest_imports():
        print(f"  {us:9d}  {name.strip()}")
    heavy = heavy_imports()
    ok = True
    if heavy:
        print(f"FAIL: importing vsa.cli imports {', '.join(heavy)} -- move those imports inside the command functions")
        ok = False
    if max(helps) >= GOAL_S:
        print(f"FAIL: vsa --help took up to {max(helps):.2f} s (goal < {GOAL_S} s)")
        ok = False
    if ok:
        print(f"OK: no heavy imports; vsa --help < {GOAL_S} s in all {a.runs} runs")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
