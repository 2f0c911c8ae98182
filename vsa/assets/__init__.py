"""The models shipped inside the package (float16 copies of trained checkpoints; no code).

``SHIPPED_MODELS[kind]`` is the default model of each stage when neither a flag nor the workspace names one.
"""

from pathlib import Path

ASSETS = Path(__file__).resolve().parent
SHIPPED_MODELS = {
    "align": ASSETS / "align-flickr8k.pt",  # region aligner, Flickr8K, EfficientNet-Lite0 features of YOLOv5n boxes
    "mrnn": ASSETS / "mrnn-flickr8k.pt",  # Up-Down caption generator over the 7x7 grid + whole image (EfficientNet-Lite2)
    "mrnn-regions": ASSETS / "mrnn-regions-flickr8k.pt",  # region captions, trained on (region, snippet) pairs
}
MODEL_NAMES = {"align": "aligner", "mrnn": "generator"}
