"""Test-session set-up that must happen before any test module imports Triton, the ``gpu`` marker and shared
fixtures (the synthetic release and its shards, a probe image and a tiny Segmenter)."""

import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

# Without a GPU, Triton kernels can only run in Triton's interpreter, which is chosen when a kernel is
# decorated: set it before any module (ours or a library's) imports and decorates one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Before any test module imports transformers: importing dcris puts Hugging Face's kernels package ahead of the
# checkout's kernels/ folder, which `python -m pytest` from the root would otherwise let shadow it.
import dcris  # noqa: E402, F401


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` (all that need CUDA; ``pytest -m gpu`` runs them) skip cleanly without a GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic REFER release (24 images, about 70 objects), written once per session."""
    from dcris.data.synth import make_synthetic_release

    return make_synthetic_release(tmp_path_factory.mktemp("release"), images=24, seed=3)


@pytest.fixture(scope="session")
def release_as(release: Path) -> Callable[..., Path]:
    """Copies the synthetic release's annotations under another data set name, as REFER lays them out.

    ``release_as(root, name, split_by, ref_offset=0, splits=None, edit=None)`` writes ``root/name/instances.json``
    and ``root/name/refs(split_by).p``: the synthetic refs with ``ref_offset`` added to every ref_id, splits
    renamed by the ``splits`` mapping, and ``edit(refs, instances)`` applied last. The JPEGs stay in
    ``release/images``. Returns ``root``.
    """

    def make(
        root: Path,
        name: str,
        split_by: str,
        ref_offset: int = 0,
        splits: dict[str, str] | None = None,
        edit: Callable[[list[dict], dict], None] | None = None,
    ) -> Path:
        import json

        (root / name).mkdir(parents=True, exist_ok=True)
        shutil.copy(release / "synthetic" / "instances.json", root / name / "instances.json")
        refs = pickle.loads((release / "synthetic" / "refs(unc).p").read_bytes())
        refs = [
            dict(r, ref_id=r["ref_id"] + ref_offset, split=(splits or {}).get(r["split"], r["split"])) for r in refs
        ]
        if edit is not None:
            instances = json.loads((root / name / "instances.json").read_text())
            edit(refs, instances)
            (root / name / "instances.json").write_text(json.dumps(instances))
        (root / name / f"refs({split_by}).p").write_bytes(pickle.dumps(refs))
        return root

    return make


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
def seven_object_shards(release: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic release in shards of 7 objects: several shards a split, so every epoch's shard order differs
    and a split has good shards before any other. Tests that change them change a copy."""
    from dcris.data import pack

    out = tmp_path_factory.mktemp("seven_object_shards")
    argv = ["--refer", str(release), "--dataset", "synthetic", "--split-by", "unc", "--images", str(release / "images")]
    assert pack.main([*argv, "--out", str(out), "--shard-size", "7", "--workers", "1"]) == 0
    return out / "synthetic"


@pytest.fixture(scope="session")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic release (24 images) packed into shards: train, val, testA and testB."""
    from dcris.data import pack, synth

    root = tmp_path_factory.mktemp("synthetic")
    synth.make_synthetic_release(root / "release", images=24, seed=0)
    release = root / "release"
    pack.main(["--refer", str(release), "--dataset", "synthetic", "--split-by", "unc",
               "--images", str(release / "images"), "--out", str(root / "shards"), "--workers", "1"])  # fmt: skip
    return root / "shards" / "synthetic"


@pytest.fixture(scope="session")
def three_sets() -> dict:
    """Three adapter sets on one random tiny backbone (``adapter_sets.three_sets``)."""
    from adapter_sets import three_sets

    return three_sets()
