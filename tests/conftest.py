"""Test-session set-up that must happen before any test module imports Triton, and shared fixtures."""

import os

import numpy as np
import pytest
import torch

# Without a GPU, Triton kernels can only run in Triton's interpreter, which is chosen when a kernel is
# decorated: set it before any module (ours or a library's) imports and decorates one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def probe() -> tuple[np.ndarray, list[str]]:
    """An image and two phrases to segment: random uint8 RGB values below 201 (so a tint of (255, 0, 255)
    changes every pixel it covers), 90 x 130 (not square)."""
    image = np.random.default_rng(0).integers(0, 201, (90, 130, 3), dtype=np.uint8)
    return image, ["the small red circle on the left", "the big blue square"]


@pytest.fixture(scope="session")
def tiny_segmenter(probe):
    """A tiny random-init model whose masks of the probe's phrases cover part of its image only.

    Random init alone gives probabilities near 0.5 everywhere; larger random trainable weights spread them, and
    the first seed whose masks are neither (nearly) empty nor (nearly) full is taken.
    """
    from dcris.config import preset
    from dcris.model import build_model
    from dcris.segmenter import Segmenter

    image, phrases = probe
    for seed in range(20):
        torch.manual_seed(seed)
        cfg = preset("tiny-dcris")
        model = build_model(cfg.model, pretrained=False)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p))
        segmenter = Segmenter(model.eval(), cfg)
        if all(0.05 < r.area < 0.95 for r in segmenter(image, phrases)):
            return segmenter
    raise AssertionError("no seed gave partial masks")


@pytest.fixture(scope="session")
def shards(tmp_path_factory: pytest.TempPathFactory):
    """A small synthetic REFER release packed into shards (about 40 train objects; val and testA)."""
    from dcris.data import pack, synth

    root = tmp_path_factory.mktemp("synthetic")
    synth.make_synthetic_release(root / "release", images=24, seed=0)
    release = root / "release"
    pack.main(["--refer", str(release), "--dataset", "synthetic", "--split-by", "unc",
               "--images", str(release / "images"), "--out", str(root / "shards"), "--workers", "1"])  # fmt: skip
    return root / "shards" / "synthetic"
