"""Caption model architectures (the generators of ``vsa train-mrnn`` / ``vsa caption``) and their registry.

:mod:`vsa.generator.models.base` states the interface (:class:`CaptionModel`) and holds the registry; every other
module of this package is an architecture that registers itself, and importing this package imports them all, so
an architecture added here is one file. ``GeneratorConfig.arch`` names one; :func:`vsa.generator.model.build_model` builds it.
"""

from __future__ import annotations

import importlib
import pkgutil

from vsa.generator.models.base import (  # noqa: F401  (the package's interface)
    CaptionModel,
    CaptionModelBase,
    caption_model_class,
    caption_model_names,
    register_caption_model,
    reorder_state,
)

for _m in pkgutil.iter_modules(__path__):
    if _m.name != "base":
        importlib.import_module(f"{__name__}.{_m.name}")


def describe() -> str:
    """The registered architectures as ``name (summary)``, comma-separated (``vsa train-mrnn --help``)."""
    parts = []
    for name in caption_model_names():
        summary = getattr(caption_model_class(name), "summary", "")
        parts.append(f"{name} ({summary})" if summary else name)
    return ", ".join(parts)
