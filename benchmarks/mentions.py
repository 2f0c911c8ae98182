"""Object mentions: do generated captions name the objects that the references name?

For each COCO class with caption words (vsa.labels.CLASS_WORDS), an image of the split is positive when at least
2 of its references name the class, negative when none does (1 of 5: left out for that class). A caption
predicts the class when it names it. Prints per-class precision / recall / F1 and micro / macro F1 over the
classes with at least --min-positives positives, beside BLEU-4, METEOR and CIDEr, for plain beam search and for
each constrained-decoding setting given (the caption must name the photo's confidently detected classes:
vsa.generator.decoding.constrained_beam_search).

Usage:
    vsa regions IMAGES --detector vsa/assets/yolov5n-coco -o regions.jsonl       # the photos' detections
    python benchmarks/mentions.py --dataset D --features grid.npz --mirror-features grid-flip.npz \
        --regions regions.jsonl --split val --constrain 0.5:2 --constrain 0.5:2:person [--json out.json]

A --constrain setting is MIN_SCORE:MAX_SETS[:SKIPPED,CLASSES]. --captions-out FOLDER writes each run's captions.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def mention_table(ds_records, captions: list[str], min_positives: int = 10) -> dict:
    """Per-class and micro / macro object-mention figures of ``captions`` (one per record, in order)."""
    from vsa.data import tokenize
    from vsa.labels import CLASS_WORDS, names_class

    per: dict = {}
    refs = [[set(tokenize(s.raw)) for s in r.sentences] for r in ds_records]
    hyp = [set(tokenize(c)) for c in captions]
    for label in CLASS_WORDS:
        tp = fp = fn = pos = 0
        for rs, h in zip(refs, hyp):
            n = sum(names_class(r, label) for r in rs)
            said = names_class(h, label)
            if n >= 2:
                pos += 1
                tp += said
                fn += not said
            elif n == 0:
                fp += said
        if pos:
            p = tp / (tp + fp) if tp + fp else 0.0
            rcl = tp / pos
            f1 = 2 * p * rcl / (p + rcl) if p + rcl else 0.0
            per[label] = {"positives": pos, "tp": tp, "fp": fp, "fn": fn, "P": p, "R": rcl, "F1": f1}
    kept = {k: v for k, v in per.items() if v["positives"] >= min_positives}
    TP, FP, FN = (sum(v[x] for v in kept.values()) for x in ("tp", "fp", "fn"))
    mp = TP / (TP + FP) if TP + FP else 0.0
    mr = TP / (TP + FN) if TP + FN else 0.0
    return {"classes": per, "kept": sorted(kept, key=lambda k: -kept[k]["positives"]),
            "micro": {"P": mp, "R": mr, "F1": 2 * mp * mr / (mp + mr) if mp + mr else 0.0},
            "macro_F1": sum(v["F1"] for v in kept.values()) / max(len(kept), 1)}


def parse_setting(text: str) -> dict:
    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise SystemExit(f"--constrain {text!r}: expected MIN_SCORE:MAX_SETS[:SKIPPED,CLASSES]")
    skip = tuple(x for x in parts[2].split(",") if x) if len(parts) == 3 else ()
    return {"min_score": float(parts[0]), "max_sets": int(parts[1]), "skip": skip}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="generator (default: the shipped one)")
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--features", required=True)
    ap.add_argument("--mirror-features", default=None)
    ap.add_argument("--regions", required=True, help="vsa regions JSONL of the split's images")
    ap.add_argument("--split", default="val")
    ap.add_argument("--constrain", action="append", default=[], help="MIN_SCORE:MAX_SETS[:SKIP] (repeatable)")
    ap.add_argument("--no-plain", action="store_true", help="skip the unconstrained run")
    ap.add_argument("--min-positives", type=int, default=10)
    ap.add_argument("--limit", type=int, default=0, help="first N images of the split only")
    ap.add_argument("--captions-out", default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    import torch

    from vsa.assets import SHIPPED_MODELS
    from vsa.generator.metrics import score_captions
    from vsa.data import load_dataset
    from vsa.generator.evaluate import generate_split
    from vsa.io import read_jsonl

    torch.set_num_threads(max(1, torch.get_num_threads()))
    ds = load_dataset(a.dataset)
    if a.limit:
        recs = ds.split(a.split)[: a.limit]
        keep = {r.key for r in recs}
        ds.images = [r for r in ds.images if r.split != a.split or r.key in keep]
    dets = {Path(r["key"]).name: [d for d in r["regions"] if d.get("label") != "image"] for r in read_jsonl(a.regions)}
    model = a.model or str(SHIPPED_MODELS["mrnn"])
    runs = ([("plain", None)] if not a.no_plain else []) + [(s, parse_setting(s)) for s in a.constrain]
    out = {}
    for name, setting in runs:
        t0 = time.time()
        recs, caps, *_ = generate_split(model, ds, a.split, a.features, mirror_features=a.mirror_features,
                                        detections=dets, constrain=setting)
        secs = time.time() - t0
        gts = {r.key: [s.raw for s in r.sentences] for r in recs}
        m = score_captions(gts, {r.key: c for r, c in zip(recs, caps)}, metrics=("BLEU", "METEOR", "CIDEr"))
        t = mention_table(recs, caps, a.min_positives)
        out[name] = {"BLEU-4": m["BLEU-4"], "METEOR": m["METEOR"], "CIDEr": m["CIDEr"], "micro": t["micro"],
                     "macro_F1": t["macro_F1"], "classes": t["classes"], "kept": t["kept"], "seconds": round(secs, 1)}
        if a.captions_out:
            Path(a.captions_out).mkdir(parents=True, exist_ok=True)
            (Path(a.captions_out) / f"{a.split}-{name.replace(':', '_').replace(',', '+')}.jsonl").write_text(
                "".join(json.dumps({"key": r.key, "caption": c}) + "\n" for r, c in zip(recs, caps)))
        print(f"{name:18s} BLEU-4 {m['BLEU-4']:.2f}  METEOR {m['METEOR']:.2f}  CIDEr {m['CIDEr']:.2f}  "
              f"mention micro F1 {t['micro']['F1']:.3f} (P {t['micro']['P']:.3f} R {t['micro']['R']:.3f})  "
              f"macro F1 {t['macro_F1']:.3f} over {len(t['kept'])} classes  [{secs:.0f} s]", flush=True)
    base = out.get("plain")
    print(f"\nper class ({a.split}; positives: >= 2 of 5 references name it): F1 " + " / ".join(n for n, _ in runs))
    for label in (base or next(iter(out.values())))["kept"]:
        cells = " ".join(f"{o['classes'].get(label, {}).get('F1', 0):.3f} "
                         f"({o['classes'].get(label, {}).get('tp', 0)}/{o['classes'].get(label, {}).get('positives', 0)})"
                         for o in out.values())
        print(f"  {label:14s} {cells}")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    sys.exit(main())
