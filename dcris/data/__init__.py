"""Data: letterbox geometry, packed-shard loaders (DALI and PyTorch) and the batch contract (SPEC 4).

Batches are dicts. Training: ``image`` float32 (B, 3, S, S) CLIP-normalised, ``mask`` float32 (B, 1, S, S) in
[0, 1], ``tokens`` int64 (B, L) -- one random sentence per object (under ``sample="sentence"``: each (object,
sentence) pair once an epoch), L the shards' context length (17, or 22 for G-Ref umd) -- ``ref_id`` (B,) int64
and ``num_targets`` (B,) int64, the objects the phrase names (0 for a gRefCOCO phrase that names nothing; 1
throughout RefCOCO, RefCOCO+ and G-Ref). Evaluation (one item per (object, sentence)) adds ``sent_idx`` (B,) and
``orig_size`` (B, 2) = (h, w), both int64, and ``orig_mask``: a list of B uint8 (h, w) numpy arrays in {0, 1}.
image, mask and tokens are on ``device``; the ids and sizes stay on the
CPU. How ranks split the data is in :mod:`dcris.data.common`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from dcris.data.common import ShardLoader, num_samples, shards_context_length
from dcris.data.letterbox import CLIP_MEAN, CLIP_STD

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "build_loader",
    "dali_available",
    "loader_kind",
    "num_samples",
    "shards_context_length",
]


def dali_available() -> bool:
    """Whether NVIDIA DALI is installed (it is imported only when a DALI loader is built)."""
    return importlib.util.find_spec("nvidia.dali") is not None


def loader_kind(loader: str) -> str:
    """The loader that ``loader`` ("dali", "torch" or "auto": DALI when it is installed) names: dali or torch."""
    if loader not in ("auto", "dali", "torch"):
        raise ValueError(f"unknown loader {loader!r}: use 'dali', 'torch' or 'auto'")
    return "dali" if loader == "dali" or (loader == "auto" and dali_available()) else "torch"


def build_loader(shards_dir: str | Path, split: str, *, loader: str = "auto", **options: Any) -> ShardLoader:
    """The loader of one split of packed shards; iterating it yields one epoch of batches.

    Args:
        shards_dir: Directory written by ``shards/pack.py`` (holds manifest.json).
        split: Split name, e.g. "train" or "val".
        loader: "dali", "torch" or "auto" (DALI when it is installed).
        **options: The keyword arguments of :class:`~dcris.data.common.ShardLoader` (``train``, ``batch_size``,
            ``image_size``, ``rank``, ``world_size``, ``seed``, ``workers``, ``device``, ``epoch``,
            ``shuffle_buffer``, ``sample``, ``context_length``, ``mask_size``, ``start_batch``); with DALI, a GPU
            ``device`` is also where the JPEGs are decoded. Give ``context_length`` (the model's) so shards of
            another length stop with one line. DALI's own ``hw_decoder_load`` and ``prefetch_depth`` are dropped
            for the PyTorch loader.

    Returns:
        A :class:`~dcris.data.common.ShardLoader`; ``len()`` is its number of batches per epoch.
    """
    if loader_kind(loader) == "dali":
        from dcris.data.dali_loader import DaliShardLoader

        return DaliShardLoader(shards_dir, split, **options)
    from dcris.data.torch_loader import TorchShardLoader

    torch_options = {k: v for k, v in options.items() if k not in ("hw_decoder_load", "prefetch_depth")}
    return TorchShardLoader(shards_dir, split, **torch_options)
