"""DCRIS: parameter-efficient referring image segmentation with DenseCrossAdapters on frozen DINOv2 and CLIP.

``dcris.Segmenter`` segments what a phrase names in an image (``Segmenter.from_pretrained(path_or_hub_id)``);
build a model from a config with ``dcris.config.preset`` and ``dcris.model.build_model``; the ``dcris`` command
line (``dcris.cli``) counts parameters, converts released checkpoints, trains, evaluates, predicts, serves a web
page or an HTTP API, sweeps the paper's tables and runs the demo; ``dcris.MultiSegmenter`` holds several adapter sets
on shared frozen backbones. Importing ``dcris`` loads nothing else: ``Segmenter`` is
imported when first used.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dcris.multi import MultiSegmenter
    from dcris.segmenter import Segmentation, Segmenter

__version__ = "0.1.0"


def _import_hub_kernels_unshadowed() -> None:
    """Imports Hugging Face's ``kernels`` package, which transformers imports where it is installed, past this
    checkout's own top-level ``kernels/`` folder (``dcris.kernels``): with the checkout's root on ``sys.path``
    (``python -m ...`` run from it) that folder would be found first and transformers' import of it would fail."""
    own = Path(__file__).resolve().parent.parent / "kernels"
    spec = importlib.util.find_spec("kernels") if "kernels" not in sys.modules else None
    if spec is None or spec.origin is None or Path(spec.origin).resolve().parent != own:
        return
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:  # not installed: transformers does not import it
        return
    kept = sys.path[:]
    sys.path[:] = [p for p in kept if Path(p or ".").resolve() != own.parent]
    try:
        importlib.import_module("kernels")
    finally:
        sys.path[:] = kept


_import_hub_kernels_unshadowed()
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
