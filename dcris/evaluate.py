"""Evaluation over packed splits (SPEC 5), sharded over ranks and reduced exactly."""

from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

from dcris.data import build_loader, num_samples
from dcris.errors import UserError
from dcris.metrics import IoUAccumulator


def split_size(shards: str, split: str, train: bool) -> int:
    """Samples of a packed split (see ``dcris.data.num_samples``); a missing folder or split is a user error."""
    if not shards:
        raise UserError("data.shards is not set: point it at a folder written by shards/pack.py")
    return num_samples(shards, split, train)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    shards: str,
    splits: list[str],
    *,
    image_size: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 2,
    loader: str = "auto",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict[str, dict[str, float | int]]:
    """mIoU, oIoU and Pr@ per split (every (object, sentence) once over all ranks).

    Every rank must call this (the sums are all-reduced); a tqdm bar shows progress on rank 0.

    Returns:
        ``{split: IoUAccumulator.result()}``.
    """
    was_training = model.training
    model.eval()
    results = {}
    for split in splits:
        expected = split_size(shards, split, train=False)
        data = build_loader(
            shards, split, train=False, batch_size=batch_size, image_size=image_size, rank=rank,
            world_size=world_size, workers=workers, loader=loader, device=str(device),
        )  # fmt: skip
        acc = IoUAccumulator()
        for batch in tqdm(data, desc=f"eval {split}", disable=rank != 0, leave=False, dynamic_ncols=True):
            logits = model(batch["image"].to(device, dtype), batch["tokens"].to(device))  # (B, 1, 4S/14, 4S/14)
            sizes = [tuple(s) for s in batch["orig_size"].tolist()]
            acc.add_logits(logits, batch["orig_mask"], sizes, image_size)
        acc.all_reduce()
        if acc.count != expected:  # the loaders promise every pair exactly once over all ranks
            raise RuntimeError(f"evaluated {acc.count} samples of {split!r}, the manifest lists {expected}")
        results[split] = acc.result()
    model.train(was_training)
    return results
