"""Training throughput and peak memory of `vsa train-align` (prints figures; no pass/fail).

    .venv/bin/python benchmarks/train.py --features work/feats.npz [--steps 60] [--skip-10x]

1. throughput, sentences/s, of the same global batch (128 sentences) in one process with 2 threads
   and under `torchrun --nproc_per_node 2` (gloo, 1 thread each): the ratio 2-proc / 1-proc;
2. peak resident memory (max RSS of the training process) on the Flickr8k features, and on a
   features file 10x as large (every image replicated under 9 more keys, written next to the
   input as <stem>-x10.npz) read memory-mapped: (a) same dataset, (b) a 10x dataset (60,000 train
   images, 300,000 sentences) over those features. Features are never loaded whole, so (a) should
   equal the Flickr8k figure and (b) grow only by the sentences, not by the 2 GB of features.

The dataset defaults to ../shared/data/flickr8k/dataset_flickr8k.json. Run on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("VSA_SHARED", ROOT.parent / "shared"))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: list[str], nproc: int = 1, threads: int = 2) -> tuple[float, float, dict, float]:
    """Run train-align; returns (max RSS in MiB of the largest process, peak anonymous memory in MiB of
    the process tree, last log line, wall s)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "b.pt"
        base = ["train-align", *args, "-o", str(out), "--threads", str(threads), "--device", "cpu"]
        if nproc == 1:
            cmd = [sys.executable, "-m", "vsa", *base]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                   "--master_addr", "127.0.0.1", "--master_port", str(_port()), "-m", "vsa", *base]
        t = time.perf_counter()
        errf = Path(tmp) / "err.txt"
        with open(errf, "wb") as fh:
            p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=fh, env=env)
            anon = 0
            while True:  # sample the anonymous (not file-backed) resident memory of the process tree
                try:
                    procs = [psutil.Process(p.pid)]
                    procs += procs[0].children(recursive=True)
                    anon = max(anon, sum(_rss_anon(q.pid) for q in procs))
                except psutil.Error:
                    pass
                try:
                    pid, status, ru = os.wait4(p.pid, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid:
                    break
                time.sleep(0.05)
        wall = time.perf_counter() - t
        if os.waitstatus_to_exitcode(status) != 0:
            sys.exit(f"failed: {' '.join(cmd)}\n{errf.read_text()[-2000:]}")
        log = [json.loads(x) for x in (Path(tmp) / "b.log.jsonl").read_text().splitlines()]
        return ru.ru_maxrss / 1024, anon / 2**20, log[-1], wall


def _rss_anon(pid: int) -> int:
    """RssAnon of a process in bytes (Linux): its private memory, without file pages such as the
    memory-mapped features, which the kernel can drop and re-read at will."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def replicate(src: Path, dst: Path, times: int) -> None:
    import numpy as np

    from vsa.features.store import load_features
    from vsa.io import save_npz

    if dst.exists():
        return
    st = load_features(src)
    n = len(st.keys)
    feats = np.asarray(st.feats)
    lens = np.diff(st.offsets)
    keys = [k if r == 0 else f"x{r}/{k}" for r in range(times) for k in st.keys]
    arrays = {"feats": np.concatenate([feats] * times), "keys": np.array(keys),
              "offsets": np.concatenate([[0], np.cumsum(np.tile(lens, times))]).astype(np.int64),
              "image_index": np.repeat(np.arange(n * times, dtype=np.int32), np.tile(lens, times)),
              "meta": np.array(json.dumps(st.meta))}
    for name, a in (("boxes", st._boxes), ("labels", st._labels), ("scores", st._scores)):
        if a is not None:
            arrays[name] = np.concatenate([np.asarray(a)] * times)
    save_npz(dst, arrays)


def replicate_dataset(src: Path, dst: Path, times: int) -> None:
    from vsa.data import load_dataset
    from vsa.io import write_json

    if dst.exists():
        return
    d = load_dataset(src).to_karpathy()
    imgs = []
    for r in range(times):
        for im in d["images"]:
            im = dict(im)
            if r:
                if im["split"] != "train":
                    continue
                im["filepath"] = f"x{r}"  # the key becomes x{r}/<file name>, as in the replicated features
                im["imgid"] = im["imgid"] + r * 1_000_000
                im["sentences"] = [{**s, "sentid": s["sentid"] + r * 10_000_000, "imgid": im["imgid"]}
                                   for s in im["sentences"]]
                im["sentids"] = [s["sentid"] for s in im["sentences"]]
            imgs.append(im)
    write_json(dst, {**d, "images": imgs})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", type=Path, default=ROOT / "work" / "feats.npz")
    ap.add_argument("--dataset", type=Path, default=SHARED / "data" / "flickr8k" / "dataset_flickr8k.json")
    ap.add_argument("--steps", type=int, default=60, help="batches of 128 sentences per measurement")
    ap.add_argument("--skip-10x", action="store_true")
    a = ap.parse_args()
    common = ["--dataset", str(a.dataset), "--features", str(a.features), "--epochs", "1",
              "--set", f"steps_per_epoch={a.steps}", "--set", "val_images=100", "--set", "warmup_epochs=0"]
    print(f"machine: {os.cpu_count()} CPUs; global batch 128 sentences, {a.steps} steps per run", flush=True)

    rss1, anon1, rec1, wall1 = run(common, 1, 2)
    sps1 = rec1["sentences"] / rec1["train_s"]
    print(f"1 process x 2 threads : {sps1:7.1f} sentences/s   (train {rec1['train_s']:.1f}s, wall {wall1:.0f}s)", flush=True)
    _, _, rec2, wall2 = run(common, 2, 1)
    sps2 = rec2["sentences"] / rec2["train_s"]
    print(f"2 processes x 1 thread: {sps2:7.1f} sentences/s   (train {rec2['train_s']:.1f}s, wall {wall2:.0f}s); "
          f"ratio {sps2 / sps1:.2f}", flush=True)
    print("peak memory of train-align: max RSS (incl. memory-mapped feature pages) / anonymous (private) memory", flush=True)
    print(f"  Flickr8k features ({a.features.stat().st_size / 2**30:.2f} GiB file): {rss1:.0f} / {anon1:.0f} MiB", flush=True)
    if a.skip_10x:
        return
    big = a.features.with_name(a.features.stem + "-x10.npz")
    replicate(a.features, big, 10)
    common10 = [x if x != str(a.features) else str(big) for x in common]
    rss10, anon10, _, _ = run(common10, 1, 2)
    print(f"  10x features ({big.stat().st_size / 2**30:.2f} GiB file, memory-mapped), same dataset: "
          f"{rss10:.0f} / {anon10:.0f} MiB ({rss10 / rss1:.2f}x / {anon10 / anon1:.2f}x)", flush=True)
    ds10 = big.with_name("dataset-x10.json")
    replicate_dataset(a.dataset, ds10, 10)
    common10d = [x if x != str(a.dataset) else str(ds10) for x in common10]
    rss10d, anon10d, _, _ = run(common10d, 1, 2)
    print(f"  10x features and 10x train set (60,000 images, 300,000 sentences): {rss10d:.0f} / {anon10d:.0f} MiB "
          f"({rss10d / rss1:.2f}x / {anon10d / anon1:.2f}x)", flush=True)


if __name__ == "__main__":
    main()
