"""DCRIS: parameter-efficient referring image segmentation with DenseCrossAdapters on frozen DINOv2 and CLIP.

``dcris.Segmenter`` segments what a phrase names in an image (``Segmenter.from_pretrained(path_or_hub_id)``);
build a model from a config with ``dcris.config.preset`` and ``dcris.model.build_model``; the ``dcris`` command
line (``dcris.cli``) counts parameters, converts released checkpoints, trains, evaluates, predicts, serves a web
page or an HTTP API, sweeps the paper's tables and runs the demo; ``dcris.MultiSegmenter`` holds several adapter sets
on shared frozen backbones. Importing ``dcris`` loads nothing else: ``Segmenter`` is
imported when first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dcris.multi import MultiSegmenter
    from dcris.segmenter import Segmentation, Segmenter

__version__ = "0.1.0"
__all__ = ["MultiSegmenter", "Segmentation", "Segmenter", "__version__"]


def __getattr__(name: str) -> Any:
    # PEP 562: torch and the model code load on first use of the API, not on ``import dcris``
    if name in ("Segmenter", "Segmentation"):
        from dcris import segmenter

        return getattr(segmenter, name)
    if name == "MultiSegmenter":
        from dcris.multi import MultiSegmenter

        return MultiSegmenter
    raise AttributeError(f"module 'dcris' has no attribute {name!r}")
