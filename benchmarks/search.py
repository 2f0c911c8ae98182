"""Speed of `vsa search text` over a large index (prints figures; no pass/fail).

    .venv/bin/python benchmarks/search.py --features work/feats.npz [--photos 10000] [--queries 20] [--threads 2]

Builds a search index of ``--photos`` photos from a features NPZ of `vsa regions | vsa embed` (its images,
repeated under new keys when it has fewer: the cost depends only on the number of photos and regions), with
the shipped aligner or ``--model``, then times:

1. building the index from the features (the aligner's region vectors of every photo, and the hubness terms: each
   photo against the aligner's bank of training sentences), and the same build without the terms;
2. opening the index (what each `vsa search text` process does once);
3. one text query (`vsa.search.search_text`: encode the words, score every photo, keep the top 10), the
   median over ``--queries`` Flickr8K-style sentences, and the first query alone (it also pads the index).

Run it on an otherwise idle machine: other jobs on the same cores distort every figure.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUERIES = [
    "a dog runs through the grass", "two people sit on a bench in the park", "a man rides a bike down the street",
    "a child plays in the water at the beach", "a black dog catches a frisbee", "a girl in a pink dress is jumping",
    "a group of people stand in the snow", "a boy kicks a soccer ball", "a brown horse in a field",
    "a woman with a red umbrella walks in the rain", "climbers on a rocky mountain", "a surfer rides a big wave",
    "two dogs play with a ball in the yard", "a man in a black shirt plays the guitar", "a crowd watches a parade",
    "a little boy in a blue shirt runs on the sand", "a white dog swims in a lake", "a skier jumps off a ramp",
    "people sitting at a table outside a restaurant", "a motorcyclist leans into a turn on a race track",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", type=Path, required=True)
    ap.add_argument("--model", type=Path, default=None, help="aligner (default: the shipped one)")
    ap.add_argument("--photos", type=int, default=10000)
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import os

    import torch

    torch.set_num_threads(args.threads)
    from vsa.alignment.model import load_aligner
    from vsa.features.store import load_features
    from vsa.search import Index, photo_from_store, save_index, search_text

    aligner = load_aligner(args.model)
    store = load_features(args.features)
    print(f"torch {torch.__version__}, {args.threads} threads, load average {os.getloadavg()[0]:.1f}; "
          f"{len(store)} images in {args.features}")
    photos = []
    while len(photos) < args.photos:
        for k in store.keys:
            if len(photos) == args.photos:
                break
            p = photo_from_store(store, k)
            if len(photos) >= len(store):
                p.key = f"copy{len(photos) // len(store)}/{p.key}"
            photos.append(p)
    regions = sum(len(p.feats[: aligner.cfg.max_regions]) for p in photos)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "index.npz"
        t0 = time.perf_counter()
        save_index(path, aligner, photos)
        t_build = time.perf_counter() - t0
        print(f"index of {len(photos)} photos ({regions / len(photos):.1f} regions/photo, "
              f"{path.stat().st_size / 2**20:.0f} MB): built in {t_build:.1f} s ({1000 * t_build / len(photos):.2f} ms/photo)")
        if aligner.bank:  # the same without the hubness terms (each photo against the aligner's bank sentences)
            bank, aligner.bank = aligner.bank, []
            t0 = time.perf_counter()
            save_index(Path(tmp) / "plain.npz", aligner, photos)
            t_plain = time.perf_counter() - t0
            aligner.bank = bank
            print(f"  without the hubness terms ({len(bank)} bank sentences): {t_plain:.1f} s, so the terms cost "
                  f"{t_build - t_plain:.1f} s ({1000 * (t_build - t_plain) / len(photos):.2f} ms/photo, "
                  f"x{t_build / t_plain:.2f} the plain build)")
        t0 = time.perf_counter()
        index = Index(path)
        t_open = time.perf_counter() - t0
        qs = (QUERIES * (1 + args.queries // len(QUERIES)))[: args.queries]
        times = []
        for q in qs:
            t0 = time.perf_counter()
            hits = search_text(aligner, index, q, k=10)
            times.append(time.perf_counter() - t0)
        assert len(hits) == 10
        print(f"open the index: {1000 * t_open:.0f} ms")
        print(f"text query: first {1000 * times[0]:.0f} ms, median of {len(times)} {1000 * statistics.median(times):.0f} ms "
              f"({1e6 * statistics.median(times) / len(photos):.1f} us per photo)")


if __name__ == "__main__":
    main()
