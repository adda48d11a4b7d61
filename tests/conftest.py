"""Test-session set-up that must happen before any test module imports Triton, and the ``gpu`` marker."""

import os

import pytest
import torch

# Without a GPU, Triton kernels can only run in Triton's interpreter, which is chosen when a kernel is
# decorated: set it before any module (ours or a library's) imports and decorates one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` (all that need CUDA; ``pytest -m gpu`` runs them) skip cleanly without a GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
