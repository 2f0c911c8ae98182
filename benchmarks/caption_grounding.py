"""Grounded captions vs the detector: of the words of generated captions that name a class the detector found in
the photo, the share whose grounded snippet lands on a box of that class (prints; no pass/fail).

Usage:
    vsa caption IMAGES... --ground --regions --json [--model GEN] > caps.jsonl
    python benchmarks/caption_grounding.py caps.jsonl
"""

from __future__ import annotations

import sys

from analysis import caption_grounding
from vsa.io import read_jsonl


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    a = caption_grounding(read_jsonl(sys.argv[1]))
    print(f"{a['words']} caption words naming a detected class, on a box of that class {100 * a['on_class']:.1f}%")
    for k, v in a["by_label"].items():
        print(f"  {k:14s} {v['words']:5d} words  {100 * v['on_class']:5.1f}%")


if __name__ == "__main__":
    main()
