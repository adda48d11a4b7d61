"""Data: letterbox geometry, packed-shard loaders (DALI and PyTorch) and the batch contract (SPEC 4).

Batches are dicts. Training: ``image`` float32 (B, 3, S, S) CLIP-normalised, ``mask`` float32 (B, 1, S, S) in
[0, 1], ``tokens`` int64 (B, 17) -- one random sentence per object -- and ``ref_id`` (B,) int64. Evaluation
(one item per (object, sentence)) adds ``sent_idx`` (B,) and ``orig_size`` (B, 2) = (h, w), both int64, and
``orig_mask``: a list of B uint8 (h, w) numpy arrays in {0, 1}. image, mask and tokens are on ``device``;
the ids and sizes stay on the CPU. How ranks split the data is in :mod:`dcris.data.common`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from dcris.data.common import ShardLoader, num_samples
from dcris.data.letterbox import CLIP_MEAN, CLIP_STD

__all__ = ["CLIP_MEAN", "CLIP_STD", "build_loader", "dali_available", "num_samples"]


def dali_available() -> bool:
    """Whether NVIDIA DALI is installed (it is imported only when a DALI loader is built)."""
    return importlib.util.find_spec("nvidia.dali") is not None


def build_loader(
    shards_dir: str | Path,
    split: str,
    *,
    train: bool,
    batch_size: int,
    image_size: int = 448,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    workers: int = 2,
    loader: str = "auto",
    device: str | torch.device = "cpu",
    epoch: int = 0,
    shuffle_buffer: int = 1000,
) -> ShardLoader:
    """The loader of one split of packed shards; iterating it yields one epoch of batches.

    Args:
        shards_dir: Directory written by ``shards/pack.py`` (holds manifest.json).
        split: Split name, e.g. "train" or "val".
        train: Training batches (shuffled, one random sentence per object) or evaluation batches (all
            sentences, in order, with the original-resolution fields).
        batch_size: Items per batch on this rank.
        image_size: Side of the letterboxed square.
        rank: This process's rank.
        world_size: Number of ranks.
        seed: Data order and sentence choice seed.
        workers: Decoding threads (DALI) or DataLoader workers (torch).
        loader: "dali", "torch" or "auto" (DALI when it is installed).
        device: Device of image, mask and tokens; DALI decodes on it when it is a GPU.
        epoch: Epoch to iterate first (``set_epoch`` changes it).
        shuffle_buffer: Samples in the training shuffle buffer.

    Returns:
        A :class:`~dcris.data.common.ShardLoader`; ``len()`` is its number of batches per epoch.
    """
    if loader not in ("auto", "dali", "torch"):
        raise ValueError(f"unknown loader {loader!r}: use 'dali', 'torch' or 'auto'")
    if loader == "dali" or (loader == "auto" and dali_available()):
        from dcris.data.dali_loader import DaliShardLoader as impl
    else:
        from dcris.data.torch_loader import TorchShardLoader as impl
    return impl(
        shards_dir,
        split,
        train=train,
        batch_size=batch_size,
        image_size=image_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
        workers=workers,
        device=device,
        epoch=epoch,
        shuffle_buffer=shuffle_buffer,
    )
