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


# Run from a checkout, the subpackage dcris.kernels is the top-level kernels/ folder beside dcris/ (pyproject's
# package-dir); installed from a wheel, it is the folder dcris/kernels/ and no sibling of dcris/ is ours (the
# folder kernels/ beside it in site-packages is Hugging Face's package).
_ROOT = Path(__file__).resolve().parent.parent
_CHECKOUT_KERNELS = (
    _ROOT / "kernels"
    if not (Path(__file__).resolve().parent / "kernels").is_dir()
    and (_ROOT / "pyproject.toml").is_file()
    and (_ROOT / "kernels" / "__init__.py").is_file()
    else None
)


def _bind_checkout_kernels() -> None:
    """Binds ``dcris.kernels`` to this checkout's ``kernels/`` folder before anything imports it: an editable
    install of another checkout maps ``dcris.kernels`` to that checkout's folder (setuptools' editable finder),
    which ``PYTHONPATH=$PWD`` puts ``dcris`` ahead of but not its kernels."""
    if _CHECKOUT_KERNELS is None or "dcris.kernels" in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(
        "dcris.kernels", _CHECKOUT_KERNELS / "__init__.py", submodule_search_locations=[str(_CHECKOUT_KERNELS)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["dcris.kernels"] = module
    spec.loader.exec_module(module)
    globals()["kernels"] = module  # what the import system does for a submodule it loads


def _import_hub_kernels_unshadowed() -> None:
    """Imports Hugging Face's ``kernels`` package, which transformers imports where it is installed, past this
    checkout's own top-level ``kernels/`` folder (``dcris.kernels``): with the checkout's root on ``sys.path``
    (``python -m ...`` run from it) that folder would be found first and transformers' import of it would fail."""
    if _CHECKOUT_KERNELS is None or "kernels" in sys.modules:
        return
    spec = importlib.util.find_spec("kernels")
    if spec is None or spec.origin is None or Path(spec.origin).resolve().parent != _CHECKOUT_KERNELS:
        return
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:  # not installed: transformers does not import it
        return
    kept = sys.path[:]
    sys.path[:] = [p for p in kept if Path(p or ".").resolve() != _ROOT]
    try:
        importlib.import_module("kernels")
    finally:
        sys.path[:] = kept


_bind_checkout_kernels()
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
