"""Test-session set-up that must happen before any test module imports Triton."""

import os
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels can only run in Triton's interpreter, which is chosen when a kernel is
# decorated: set it before any module (ours or a library's) imports and decorates one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic release packed into shards (about 120 train objects; val, testA, testB)."""
    from dcris.data import pack, synth

    root = tmp_path_factory.mktemp("synthetic")
    synth.make_synthetic_release(root / "release", images=24, seed=0)
    release = root / "release"
    pack.main(["--refer", str(release), "--dataset", "synthetic", "--split-by", "unc",
               "--images", str(release / "images"), "--out", str(root / "shards"), "--workers", "1"])  # fmt: skip
    return root / "shards" / "synthetic"
