"""Photos and captions to trained models: the whole Flickr8K pipeline as a user runs it, timed (prints a table).

    .venv/bin/python benchmarks/pipeline.py            # all 8000 images, the shipped recipes
    .venv/bin/python benchmarks/pipeline.py --quick    # a 500-image subset (375 train / 62 val / 63 test)

Runs the README's commands with a `vsa.toml` made by `vsa init` in a temporary folder (`--workdir` keeps
it): regions, embed (warp crops and 3x3 cells, of the photos and their mirror images), train-align, align (the
train split's snippets), embed (the Lite2 grid, of the photos and their mirror images), train-mrnn, eval of both
on test: README.md's "Train on your own captions", whose trainer defaults are the shipped recipes. Each stage
is a real `vsa` process; the table gives its wall time, items per second, peak memory (resident set of the
process and its children, sampled every 0.2 s) and, at the end, the test figures. A benchmark prints, it
does not assert. Run it on an otherwise idle machine and say which machine in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VSA_SHARED", ROOT.parent / "shared"))


def subset(dataset: Path, out: Path, n: int) -> dict:
    """A Karpathy JSON with the first images of each split in the 6000/1000/1000 proportions."""
    d = json.loads(dataset.read_text())
    want = {"train": round(n * 0.75), "val": round(n * 0.125)}
    want["test"] = n - want["train"] - want["val"]
    kept, seen = [], {k: 0 for k in want}
    for im in d["images"]:
        s = im["split"] if im["split"] in want else "train"
        if seen[s] < want[s]:
            kept.append(im)
            seen[s] += 1
    d["images"] = kept
    out.write_text(json.dumps(d))
    return seen


def run_stage(cmd: list[str], cwd: Path, env: dict, stdin=None, stdout=None) -> tuple[float, float, int]:
    """Run one `vsa` command; returns (seconds, peak MB of the process tree, return code)."""
    import psutil

    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=stdin, stdout=stdout or subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    peak = [0]

    def watch():
        try:
            p = psutil.Process(proc.pid)
            while proc.poll() is None:
                try:
                    rss = p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True))
                    peak[0] = max(peak[0], rss)
                except psutil.Error:
                    pass
                time.sleep(0.2)
        except psutil.Error:
            pass

    w = threading.Thread(target=watch, daemon=True)
    w.start()
    _, err = proc.communicate()
    w.join(timeout=1)
    dt = time.perf_counter() - t
    if proc.returncode != 0:
        sys.stderr.write(err.decode()[-3000:])
    return dt, peak[0] / 2**20, proc.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a 500-image subset (CI-sized check of the whole pipeline)")
    ap.add_argument("--images", type=int, default=0, help="subset size (default: all, or 500 with --quick)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per stage (0: torch's default)")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the workspace here (default: a temporary folder)")
    ap.add_argument("--json", type=Path, default=None, help="also write the table as JSON")
    ap.add_argument("--only", default="", help="comma-separated stage ids to run (in a kept --workdir whose earlier "
                    "stages ran): regions, embed-regions, embed-regions-flip, train-align, align, embed-grid, "
                    "embed-grid-flip, train-mrnn, eval")
    args = ap.parse_args()

    data = SHARED / "data" / "flickr8k"
    detector = SHARED / "weights" / "yolov5n-coco"
    if not (data / "dataset_flickr8k.json").exists() or not detector.exists():
        sys.exit(f"needs the Flickr8K data and the YOLOv5n weights under {SHARED} (set VSA_SHARED)")
    n = args.images or (500 if args.quick else 0)
    tmp = None
    work = args.workdir or Path(tmp := tempfile.mkdtemp(prefix="vsa-pipeline-"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)  # the user's environment: no OpenMP tuning (OMP_WAIT_POLICY=PASSIVE makes the training
    # steps slower at 2 threads: the threads sleep between the many small ops)
    vsa = [sys.executable, "-m", "vsa"]
    threads = ["--threads", str(args.threads)] if args.threads else []
    dataset = data / "dataset_flickr8k.json"
    counts = None
    if n:
        counts = subset(dataset, work / "dataset.json", n)
        dataset = work / "dataset.json"
    ds = json.loads(dataset.read_text())["images"]
    n_img = len(ds)
    n_train_sent = sum(len(im["sentences"]) for im in ds if im["split"] == "train")
    n_test = sum(1 for im in ds if im["split"] == "test")
    (work / "images.txt").write_text("".join(f"{data / 'images' / im['filename']}\n" for im in ds))
    if not (work / "vsa.toml").exists():
        subprocess.run(vsa + ["init", "--dataset", str(dataset), "--images", str(data / "images"), "--detector",
                              str(detector), "--out", "work", "--force"], cwd=work, env=env, check=True,
                       capture_output=True)

    # (id, what, command, stdin, items, unit): the commands of README.md's "Train on your own captions", whose
    # trainer defaults are the shipped recipes (docs/alignment.md, docs/generator.md)
    stages = [
        ("regions", "regions (YOLOv5n, whole image + top 19)", ["regions", "-", "-o", "work/regions.jsonl", *threads],
         "images.txt", n_img, "images"),
        ("embed-regions", "embed regions (warp crops + 3x3 cells)", ["embed", "work/regions.jsonl", "-o",
                                                                     "work/feats.npz", *threads], None, n_img, "images"),
        ("embed-regions-flip", "embed regions, mirrored images", ["embed", "work/regions.jsonl", "--flip", "-o",
                                                                  "work/feats-flip.npz", *threads], None, n_img, "images"),
        ("train-align", "train-align (shipped recipe, GloVe)", ["train-align", "--features", "work/feats.npz",
                                                                "--flip-features", "work/feats-flip.npz", "--glove",
                                                                "kumo", *threads], None, n_train_sent, "sentences"),
        ("align", "align (train snippets)", ["align", "--split", "train", *threads], None, n_train_sent, "sentences"),
        ("embed-grid", "embed grid (Lite2, 7x7 + whole)", ["embed", "-", "--crop", "grid", "-o", "work/grid.npz",
                                                            *threads], "images.txt", n_img, "images"),
        ("embed-grid-flip", "embed grid, mirrored images", ["embed", "-", "--crop", "grid", "--flip", "-o",
                                                            "work/grid-flip.npz", *threads], "images.txt", n_img, "images"),
        ("train-mrnn", "train-mrnn (shipped recipe)", ["train-mrnn", "--features", "work/grid.npz", "--flip-features",
                                                       "work/grid-flip.npz", *threads], None, n_train_sent, "sentences"),
        ("eval", "eval aligner and generator (test)", ["eval", "--split", "test", "--json"], None, n_test, "images"),
    ]
    if args.only:
        want = set(args.only.split(","))
        unknown = want - {s[0] for s in stages}
        if unknown:
            sys.exit(f"--only: unknown stage {', '.join(sorted(unknown))} (stages: {', '.join(s[0] for s in stages)})")
        stages = [s for s in stages if s[0] in want]
    rows, reports = [], {}
    total = 0.0
    for _, name, cmd, stdin_file, items, unit in stages:
        fin = open(work / stdin_file, "rb") if stdin_file else subprocess.DEVNULL
        out_path = work / f"stage-{len(rows)}.out"
        with open(out_path, "wb") as fout:
            dt, mb, rc = run_stage(vsa + cmd, work, env, stdin=fin, stdout=fout)
        if stdin_file:
            fin.close()
        total += dt
        rows.append({"stage": name, "seconds": round(dt, 1), "rate": round(items / dt, 1) if dt else None,
                     "unit": f"{unit}/s", "peak_mb": round(mb), "rc": rc})
        print(f"{name:42s} {dt:8.1f} s  {items / dt:9.1f} {unit}/s  peak {mb:6.0f} MB"
              + ("" if rc == 0 else f"  FAILED (exit {rc})"), flush=True)
        if rc != 0:
            break
        if cmd[0] == "eval":
            reports[name] = json.loads(out_path.read_text())
    print(f"{'total':42s} {total:8.1f} s ({total / 60:.1f} min)")
    ret = reports.get("eval aligner and generator (test)", {}).get("retrieval")
    gen = reports.get("eval aligner and generator (test)", {}).get("generation")
    if ret:
        i, t = ret["i2t"], ret["t2i"]
        print(f"test retrieval: i2t R@1/5/10 {i['r1']}/{i['r5']}/{i['r10']} t2i {t['r1']}/{t['r5']}/{t['r10']} rsum {ret['rsum']}")
    if gen:
        print("test captions: " + ", ".join(f"{k} {gen[k]}" for k in ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")))
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    print(f"machine: {machine}; images {n_img} ({counts or 'all'}); threads {args.threads or 'default'}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "images": n_img, "stages": rows, "total_s": round(total, 1),
                                         "retrieval": ret, "generation": gen}, indent=1))
    if tmp and not args.workdir:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
