"""The grounding figure of an aligner (prints; no pass/fail).

    .venv/bin/python benchmarks/grounding.py --model vsa/assets/align-flickr8k.pt --features work/feats.npz \\
        [--dataset ../shared/data/flickr8k/dataset_flickr8k.json] [--split test]

`vsa align` on every test sentence (the aligner's own beta), then, of the words naming a COCO class the
detector knows ("dog", "man", "bicycle", ...; `analysis.LABEL_WORDS`) in sentences of images where the
detector found a box of that class, the share whose snippet lies on a box of that class
(`analysis.noun_grounding`, benchmarks/analysis.py), overall and for the most frequent classes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("VSA_SHARED", ROOT.parent / "shared"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--features", type=Path, required=True, help="region features (vsa regions | vsa embed) of the split")
    ap.add_argument("--dataset", type=Path, default=SHARED / "data/flickr8k/dataset_flickr8k.json")
    ap.add_argument("--split", default="test")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()

    from vsa.data import load_dataset
    from vsa.features.store import load_features
    from vsa.io import read_jsonl
    from analysis import label_agreement, noun_grounding
    from vsa.alignment.snippets import align_split

    ds = load_dataset(args.dataset)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "a.jsonl"
        res = align_split(args.model, args.features, ds, args.split, out=out, device="cpu", threads=args.threads)
        recs = read_jsonl(out)
    store = load_features(args.features)
    g = noun_grounding(recs, store.labels)
    la = label_agreement(recs)
    print(f"{args.model}: {len(recs)} {args.split} sentences, beta {res['beta']}")
    print(f"grounding: {g['grounded']} of {g['words']} class-naming words on a box of their class = {100 * g['share']:.1f}%")
    top = sorted(g["per_class"].items(), key=lambda kv: -kv[1][1])[:8]
    print("  " + ", ".join(f"{c} {100 * h / n:.1f}% of {n}" for c, (h, n) in top))
    print(f"object snippets naming their box's class: {100 * la['agree']:.1f}% of {la['object_snippets_with_known_label']}")


if __name__ == "__main__":
    main()
