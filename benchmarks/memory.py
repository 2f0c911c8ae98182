"""Peak memory of hostile inputs: huge-but-small images through `vsa regions`, and an NPZ member that inflates.

Usage: .venv/bin/python benchmarks/memory.py --detector ../shared/weights/yolov5n-coco [--old PATH] [--images 4]
       [--side 13300] [--workers 1] [--npz-gib 2] [--skip-images] [--skip-npz]

* images: N solid bilevel PNGs of SIDE x SIDE pixels (about 21 KB each at 13300: each decodes to 0.5 GB of RGB),
  `vsa regions` and `vsa embed` (whole images) on one of them and on all N, with --max-pixels SIDE^2 so they are
  accepted. The pixel budget (vsa.images.pixel_budget) keeps the decoded pixels in flight to about one such
  image, so N images should peak near one image: the ratio N/1 is printed.
* npz: a features NPZ of a few MB whose compressed 'feats' member inflates to NPZ_GIB GiB (and whose 'offsets'
  do not match it), given to `vsa embed merge`: refused either way, the question is at what peak.

Peak memory is sampled every 20 ms over the command's process tree: "tree" sums the resident sets of the
command and its worker processes (pages shared after fork count once per process: an over-estimate), "largest"
is the biggest single process (what `/usr/bin/time -v` reports as its maximum resident set size).
`--old PATH` runs the same commands on another checkout of vsa (PYTHONPATH=PATH) for comparison; the runs
are from a temporary folder, so neither version is imported from the working directory by accident.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def peak_rss(cmd: list[str], env: dict, cwd: Path) -> tuple[int, int, int, str]:
    """Run ``cmd``; ``(exit code, peak tree bytes, peak largest-process bytes, last stderr line)``."""
    import psutil

    with open(cwd / "stderr.txt", "wb") as err:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=err)
        top = psutil.Process(proc.pid)
        tree_peak = one_peak = 0
        while proc.poll() is None:
            try:
                procs = [top] + top.children(recursive=True)
            except psutil.NoSuchProcess:
                break
            rss = []
            for p in procs:
                try:
                    rss.append(p.memory_info().rss)
                except psutil.NoSuchProcess:
                    pass
            tree_peak, one_peak = max(tree_peak, sum(rss)), max(one_peak, max(rss, default=0))
            time.sleep(0.02)
        rc = proc.wait()
    lines = [ln for ln in (cwd / "stderr.txt").read_text(errors="replace").splitlines() if ln.strip()]
    return rc, tree_peak, one_peak, (lines[-1] if lines else "")


def make_images(folder: Path, n: int, side: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("1", (side, side), i % 2).save(folder / f"big{i}.png", optimize=True)


def make_npz_bomb(path: Path, gib: float) -> None:
    """A features NPZ whose compressed 'feats' inflates to ``gib`` GiB of zeros (written in chunks, never held)."""
    import numpy as np

    dim = 1024
    rows = int(gib * 2**30) // (4 * dim)
    small = {"offsets": np.array([0, 1], dtype=np.int64), "keys": np.array(["a.jpg"]),
             "meta": np.array("{}")}
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        with zf.open("feats.npy", "w", force_zip64=True) as fh:
            np.lib.format.write_array_header_2_0(fh, {"descr": "<f4", "fortran_order": False, "shape": (rows, dim)})
            chunk = bytes(4 * dim * 1024)
            left = rows * 4 * dim
            while left:
                fh.write(chunk[: min(len(chunk), left)])
                left -= min(len(chunk), left)
        for k, v in small.items():
            with zf.open(k + ".npy", "w") as fh:
                np.lib.format.write_array(fh, v, allow_pickle=False)


def run(version: str, code: Path, args: list[str], work: Path) -> tuple[int, int, int, str]:
    env = dict(os.environ, PYTHONPATH=str(code), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    out = work / version
    out.mkdir(exist_ok=True)
    return peak_rss([sys.executable, "-m", "vsa", *args], env, out)


def mb(n: int) -> str:
    return f"{n / 2**20:8.0f} MB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--detector", required=True,
                    help="the detector `vsa regions` runs (e.g. ../shared/weights/yolov5n-coco)")
    ap.add_argument("--old", type=Path, help="another vsa checkout to compare (its folder that holds vsa/)")
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--side", type=int, default=13300)
    ap.add_argument("--workers", type=int, default=1, help="--workers of both commands (1: `vsa regions`' default)")
    ap.add_argument("--npz-gib", type=float, default=2.0)
    ap.add_argument("--skip-images", action="store_true")
    ap.add_argument("--skip-npz", action="store_true")
    a = ap.parse_args()
    versions = [("new", ROOT)] + ([("old", a.old.resolve())] if a.old else [])
    with tempfile.TemporaryDirectory(prefix="vsa-memory-") as tmp:
        work = Path(tmp)
        if not a.skip_images:
            make_images(work / "many", a.images, a.side)
            (work / "one").mkdir()
            os.link(work / "many" / "big0.png", work / "one" / "big0.png")
            size = (work / "one" / "big0.png").stat().st_size
            print(f"{a.images} x {a.side}x{a.side} PNG ({size / 1024:.0f} KB each), --workers {a.workers}")
            print(f"{'command':8s} {'version':8s} {'images':>6s} {'tree peak':>11s} {'largest':>11s}  exit")
            for command in ("regions", "embed"):
                for name, code in versions:
                    peaks = {}
                    for folder, n in (("one", 1), ("many", a.images)):
                        out = str(work / f"{name}-{n}.{'jsonl' if command == 'regions' else 'npz'}")
                        args = [command, str(work / folder), "--max-pixels", str(a.side * a.side), "--workers",
                                str(a.workers), "-o", out]
                        if command == "regions":
                            args += ["--detector", a.detector]
                        rc, tree, one, last = run(name, code, args, work)
                        peaks[n] = tree
                        print(f"{command:8s} {name:8s} {n:6d} {mb(tree)} {mb(one)}  {rc}"
                              + ("" if rc == 0 else f"  {last}"))
                    ratio = peaks[a.images] / max(peaks[1], 1)
                    print(f"{command:8s} {name:8s} ratio {a.images} images / 1 image (tree peak): {ratio:.2f}")
        if not a.skip_npz:
            bomb = work / "bomb.npz"
            make_npz_bomb(bomb, a.npz_gib)
            print(f"npz: {bomb.stat().st_size / 2**20:.1f} MB file, 'feats' inflates to {a.npz_gib:g} GiB; "
                  "`vsa embed merge` on it")
            for name, code in versions:
                rc, tree, one, last = run(name, code, ["embed", "merge", str(bomb), "-o", str(work / f"{name}-m.npz")],
                                          work)
                print(f"{name:8s} peak {mb(tree)}  exit {rc}  {last[:160]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
