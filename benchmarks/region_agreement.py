"""Region captions vs the detector: the share of boxes of COCO classes with Flickr8K words whose caption
names that class or a synonym (person: man/woman/boy/girl/child/people/...).

Usage:
    vsa caption IMAGES... --regions --detector ../shared/weights/yolov5n-coco --json > caps.jsonl
    python benchmarks/region_agreement.py caps.jsonl
"""

from __future__ import annotations

import sys

from analysis import region_agreement
from vsa.io import read_jsonl


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    a = region_agreement(read_jsonl(sys.argv[1]))
    print(f"{a['regions']} regions of classes with caption words, agreement {100 * a['agree']:.1f}%")
    for k, v in a["by_label"].items():
        print(f"  {k:12s} {v['regions']:5d} regions  {100 * v['agree']:5.1f}%")


if __name__ == "__main__":
    main()
