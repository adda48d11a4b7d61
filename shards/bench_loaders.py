"""Throughput of the data loaders (images/s) on packed shards; synthetic shards are made when none are given.

Measures the PyTorch loader and DALI on the CPU, and on a GPU also DALI with "mixed" (GPU) JPEG decoding and
the PyTorch loader feeding the GPU. Each run iterates one full training epoch after one warm-up epoch; the
median of ``--repeats`` runs is reported. Prints a table and writes JSON.

Usage: ``python shards/bench_loaders.py [--shards DIR] [--split train] [--batch-size 32] [--json OUT.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from dcris.data import build_loader, dali_available, pack
from dcris.data.synth import make_synthetic_release
from dcris.provenance import git_commit


def _images_per_second(shards: Path, split: str, loader: str, device: str, args: argparse.Namespace) -> float:
    """Median images/s over ``args.repeats`` training epochs, after one warm-up epoch."""
    rates = []
    for epoch in range(args.repeats + 1):
        batches = build_loader(
            shards, split, train=True, batch_size=args.batch_size, image_size=args.image_size,
            workers=args.workers, loader=loader, device=device, epoch=epoch,
        )  # fmt: skip
        start, images = time.perf_counter(), 0
        for batch in batches:
            images += len(batch["tokens"])
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if epoch:  # epoch 0 warms up caches, worker start-up and DALI's first allocations
            rates.append(images / (time.perf_counter() - start))
    return statistics.median(rates)


def _synthetic_shards(root: Path, images: int) -> Path:
    release = make_synthetic_release(root / "release", images=images, seed=0)
    argv = ["--refer", str(release), "--dataset", "synthetic", "--split-by", "unc", "--images", str(release / "images")]
    pack.main([*argv, "--out", str(root / "shards"), "--splits", "train", "--shard-size", "100"])
    return root / "shards" / "synthetic"




def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description="Data loader throughput (images/s).")
    parser.add_argument("--shards", help="packed OUT/NAME directory with manifest.json (default: synthetic shards)")
    parser.add_argument("--split", default="train", help="split to read")
    parser.add_argument("--images", type=int, default=200, help="synthetic images when --shards is not given")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size")
    parser.add_argument("--image-size", type=int, default=448, help="letterbox size")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decoding threads / workers")
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs")
    parser.add_argument("--json", default="bench_loaders.json", help="where to write the results")
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available()
    cases = [("torch", "cpu")] + ([("dali", "cpu")] if dali_available() else [])
    if gpu:
        cases += [("torch", "cuda")] + ([("dali", "cuda")] if dali_available() else [])
    else:
        print("no GPU: skipping DALI 'mixed' decoding and the GPU-fed PyTorch loader", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(args.shards) if args.shards else _synthetic_shards(Path(tmp), args.images)
        rows = [
            dict(loader=loader, device=device, decode="mixed" if loader == "dali" and device == "cuda" else "cpu",
                 images_per_s=round(_images_per_second(shards, args.split, loader, device, args), 1))
            for loader, device in cases
        ]  # fmt: skip
    result = dict(
        rows=rows, batch_size=args.batch_size, image_size=args.image_size, workers=args.workers,
        cpu=platform.processor() or platform.machine(), cpus=os.cpu_count(),
        gpu=torch.cuda.get_device_name() if gpu else None, commit=git_commit(),
    )  # fmt: skip
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"\n{'loader':<8}{'device':<8}{'decode':<8}{'images/s':>10}")
    for row in rows:
        print(f"{row['loader']:<8}{row['device']:<8}{row['decode']:<8}{row['images_per_s']:>10.1f}")
    print(f"(batch {args.batch_size}, {args.image_size}px, {args.workers} workers; written to {args.json})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
