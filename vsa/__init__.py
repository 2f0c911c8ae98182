"""vsa: deep visual-semantic alignments for image descriptions (Karpathy & Fei-Fei, CVPR 2015).

The package is a library first; ``vsa.cli`` is a thin command-line layer over it.
Heavy dependencies (torch, torchvision, ultralytics) are imported lazily by the
modules that need them, so ``import vsa`` is cheap.
"""

__version__ = "0.1.0"
