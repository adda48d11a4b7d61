"""Evaluate exported weights or a training checkpoint on packed splits (SPEC 5: mIoU, oIoU, Pr@0.5..0.9).

python launch/eval.py --weights RUN/dcris.safetensors --shards shards/refcoco --splits val,testA,testB
python launch/eval.py --weights RUN/checkpoints --shards shards/refcoco --splits val --out metrics.json
torchrun --nproc_per_node 8 launch/eval.py ...      (samples sharded over ranks, sums reduced exactly)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


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
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``dcris eval`` and of this script."""
    import torch
    import torch.distributed as dist

    from dcris.checkpoint import load_weights
    from dcris.evaluate import evaluate
    from dcris.metrics import format_table

    args = parse_args(argv)
    splits = [s for s in args.splits.split(",") if s]
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(args.device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"))
    if world > 1:  # launched by torchrun / deepspeed: shard the samples, reduce the sums
        from dcris.train_setup import init_distributed

        rank, _, world = init_distributed()
    model = load_weights(args.weights, device)
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


if __name__ == "__main__":
    from dcris.cli import run

    sys.exit(run("launch.eval", sys.argv[1:]))
