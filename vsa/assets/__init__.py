"""The models shipped inside the package (float16 copies of trained checkpoints; no code).

``SHIPPED_MODELS[kind]`` is the default model of each stage when neither a flag nor the workspace names one.
"""

from pathlib import Path

ASSETS = Path(__file__).resolve().parent
SHIPPED_MODELS = {
    "align": ASSETS / "align-flickr8k.pt",  # region aligner, Flickr8K, EfficientNet-Lite0 features of YOLOv5n boxes + cells
    # the aligner `vsa align` and `vsa caption --ground` fall back on: it grounds words in boxes better (val 58.3% of
    # class-naming words on a box of their class, against 49.5% for the retrieval default above; docs/alignment.md)
    "align-ground": ASSETS / "align-ground-flickr8k.pt",
    "mrnn": ASSETS / "mrnn-flickr8k.pt",  # Up-Down caption generator over the 7x7 grid + whole image (EfficientNet-Lite2)
    "mrnn-regions": ASSETS / "mrnn-regions-flickr8k.pt",  # region captions, trained on (region, snippet) pairs
}
MODEL_NAMES = {"align": "aligner", "align-ground": "grounding aligner", "mrnn": "generator"}
# the default object detector: YOLOv5n trained on COCO (Ultralytics, AGPL-3.0; NOTICE.md beside it), a plain state
# dict + meta.json, so boxes work offline and loading it runs no pickled code
SHIPPED_DETECTOR = ASSETS / "yolov5n-coco"
