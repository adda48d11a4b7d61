"""Evaluation over packed splits (SPEC 5), sharded over ranks and reduced exactly; ``dcris eval``.

python launch/eval.py --weights RUN/dcris.safetensors --shards data/shards/refcoco --splits val,testA,testB
python launch/eval.py --weights RUN/checkpoints --shards data/shards/refcoco --splits val --out metrics.json
torchrun --nproc_per_node 8 launch/eval.py ...      (samples sharded over ranks, sums reduced exactly)
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from dcris.checkpoint import load_weights
from dcris.data import build_loader, num_samples
from dcris.errors import UserError
from dcris.metrics import IoUAccumulator, format_table


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
            context_length=model.cfg.text.context_length,
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dcris eval", description="Evaluate DCRIS on packed splits.")
    parser.add_argument("--weights", required=True, help="export (.safetensors) or checkpoint folder (RUN/checkpoints)")
    parser.add_argument("--shards", required=True, help="folder written by shards/pack.py (holds manifest.json)")
    parser.add_argument("--splits", default="val", help="comma-separated splits (default: val)")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass on each rank")
    parser.add_argument("--workers", type=int, default=2, help="loader workers per rank")
    parser.add_argument("--loader", default="auto", choices=("auto", "dali", "torch"), help="data loader")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: this rank's GPU, else the CPU)")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # set by launchers
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value",
        help="changes to the weights' recorded config, e.g. model.vision.weights=DIR or model.allow_download=true",
    )  # fmt: skip
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``dcris eval`` and ``launch/eval.py``."""
    args = parse_args(argv)
    splits = [s for s in args.splits.split(",") if s]
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(args.device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"))
    if world > 1:  # launched by torchrun / deepspeed: shard the samples, reduce the sums
        from dcris.train_setup import init_distributed

        rank, _, world = init_distributed()
    model = load_weights(args.weights, device, args.overrides)
    results = evaluate(
        model, args.shards, splits, image_size=model.cfg.image_size, batch_size=args.batch_size, rank=rank,
        world_size=world, workers=args.workers, loader=args.loader, device=device,
    )  # fmt: skip
    if rank == 0:
        print(format_table(results))
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results, indent=2))
            print(f"wrote {args.out}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0
