"""Held-out objects (the DCC protocol of Hendricks et al. 2016 on Flickr8K): can a generator name a class that its
training captions never named? (prints; no pass/fail)

    python benchmarks/heldout.py split --dataset D -o dataset_heldout.json [--classes bicycle,boat,...]
    python benchmarks/heldout.py score --dataset D --captions A.jsonl [--captions B.jsonl ...] [--classes ...]

``split`` writes the training set of the held-out model: the dataset with every train image removed whose
references name a held-out class (any word of `vsa.labels.CLASS_WORDS`; val and test untouched), and checks that
no remaining train sentence holds one of those words. It prints, per class, the train images removed and the test
images that are positives (>= 2 of 5 references name the class, as `benchmarks/mentions.py`).

``score`` reads captions of the test split (JSONL records with ``key`` / ``caption``, as `vsa caption --json` or
the caption files of `benchmarks/mentions.py` write; or `vsa eval --captions-out` JSON in the split's order) and
prints precision / recall / F1 per held-out class and their micro F1, one column per captions file: the model
trained on everything beside the held-out model. The goal of the protocol: micro F1 >= 0.5 on the held-out
classes and >= 0.7 x the micro F1 of the model that saw them.

The classes are fixed before any training: COCO classes with >= 10 positive test images that the shipped
captions name poorly or not at all.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

CLASSES = ("bicycle", "boat", "car", "motorcycle", "skateboard", "frisbee")


def names_any(tokens, classes) -> bool:
    from vsa.labels import names_class

    return any(names_class(tokens, c) for c in classes)


def make_split(dataset: Path, out: Path, classes) -> None:
    from vsa.data import tokenize
    from vsa.labels import CLASS_WORDS, names_class

    d = json.loads(dataset.read_text())
    removed = {c: 0 for c in classes}
    kept = []
    for im in d["images"]:
        if im["split"] in ("train", "restval"):
            toks = [set(tokenize(s["raw"])) for s in im["sentences"]]
            hit = [c for c in classes if any(names_class(t, c) for t in toks)]
            for c in hit:
                removed[c] += 1
            if hit:
                continue
        kept.append(im)
    words = {w for c in classes for w in CLASS_WORDS[c]}
    left = sum(1 for im in kept if im["split"] in ("train", "restval") for s in im["sentences"]
               if words & set(tokenize(s["raw"])))
    test = [im for im in d["images"] if im["split"] == "test"]
    print(f"{'class':12s} {'train images removed':>21s} {'test positives':>15s}")
    for c in classes:
        pos = sum(1 for im in test if sum(names_class(set(tokenize(s["raw"])), c) for s in im["sentences"]) >= 2)
        print(f"{c:12s} {removed[c]:21d} {pos:15d}")
    n_train = sum(1 for im in d["images"] if im["split"] in ("train", "restval"))
    n_kept = sum(1 for im in kept if im["split"] in ("train", "restval"))
    print(f"train images: {n_train} -> {n_kept}; train sentences still naming a held-out class: {left}")
    if left:
        sys.exit("a held-out word is left in the training captions")
    d["images"] = kept
    out.write_text(json.dumps(d))
    print(f"wrote {out}")


def read_captions(path: Path, records) -> list[str]:
    text = path.read_text()
    if path.suffix == ".json":  # vsa eval --captions-out: the split's images in order
        return [r["caption"] for r in json.loads(text)]
    by_key = {}
    for line in text.splitlines():
        if line.strip():
            r = json.loads(line)
            by_key[r["key"]] = r["caption"]
    missing = [r.key for r in records if r.key not in by_key]
    if missing:
        sys.exit(f"{path}: no caption for {len(missing)} test images (e.g. {missing[0]})")
    return [by_key[r.key] for r in records]


def score(dataset: Path, files: list[Path], classes) -> None:
    from mentions import mention_table

    from vsa.data import load_dataset

    records = load_dataset(dataset).split("test")
    tables = [mention_table(records, read_captions(f, records), min_positives=1) for f in files]
    print(f"{'class':12s} {'positives':>9s} " + " ".join(f"{f.stem[:22]:>22s}" for f in files))
    for c in classes:
        row = [t["classes"].get(c) for t in tables]
        pos = next((r["positives"] for r in row if r), 0)
        print(f"{c:12s} {pos:9d} " + " ".join(
            f"{'P %.2f R %.2f F1 %.2f' % (r['P'], r['R'], r['F1']) if r else '-':>22s}" for r in row))
    micro = []
    for t in tables:
        tp, fp, fn = (sum(t["classes"][c][x] for c in classes if c in t["classes"]) for x in ("tp", "fp", "fn"))
        p = tp / (tp + fp) if tp + fp else 0.0
        r = tp / (tp + fn) if tp + fn else 0.0
        micro.append(2 * p * r / (p + r) if p + r else 0.0)
    print(f"{'micro F1':12s} {'':9s} " + " ".join(f"{m:22.3f}" for m in micro))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("split")
    a.add_argument("--dataset", type=Path, required=True)
    a.add_argument("-o", "--out", type=Path, required=True)
    b = sub.add_parser("score")
    b.add_argument("--dataset", type=Path, required=True)
    b.add_argument("--captions", type=Path, action="append", required=True)
    for p in (a, b):
        p.add_argument("--classes", default=",".join(CLASSES))
    args = ap.parse_args()
    classes = tuple(c.strip() for c in args.classes.split(",") if c.strip())
    from vsa.labels import CLASS_WORDS

    unknown = [c for c in classes if c not in CLASS_WORDS]
    if unknown:
        sys.exit(f"--classes: not COCO classes with caption words: {', '.join(unknown)}")
    if args.cmd == "split":
        make_split(args.dataset, args.out, classes)
    else:
        score(args.dataset, args.captions, classes)


if __name__ == "__main__":
    main()
