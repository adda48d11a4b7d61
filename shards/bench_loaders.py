"""Throughput of the data loaders (images/s) on packed shards; synthetic shards are made when none are given.

Measures the PyTorch loader and DALI on the CPU, and on a GPU also DALI with "mixed" (GPU) JPEG decoding and
the PyTorch loader feeding the GPU. Each run iterates one full training epoch after one warm-up epoch; the
median of ``--repeats`` runs is reported. The loaders are the trainer's: the training mask at the logits' side
(``--mask-size``, default 4 x image size / 14), DALI's pipeline kept from epoch to epoch. Prints a Markdown row per
loader as soon as it is measured (and updates the JSON), then the profile and tuning tables.

``--profile`` says where DALI's time goes: pipelines that stop after each stage of the loader's graph (read the
encoded bytes; + JPEG decode; + image letterbox; + PNG decode; + mask letterbox, the whole graph) run over the
same batches, and each stage is charged the time it adds (ms per batch; DALI's threads overlap stages, so these
are marginal costs, not exclusive ones). ``--tune`` times DALI over a grid of threads and prefetch depths (and,
on a GPU, ``hw_decoder_load``); what wins depends on the machine, so tune on the one that trains.

Usage: ``python shards/bench_loaders.py [--shards DIR] [--split train] [--batch-size 32] [--profile] [--tune]
[--json OUT.json]``
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from dcris.data import build_loader, dali_available
from dcris.data.synth import make_synthetic_release, pack_synthetic_release
from dcris.provenance import git_commit

STAGES = ("read", "decode JPEG", "letterbox image", "decode PNG", "letterbox mask")


def _loader(shards: Path, split: str, loader: str, device: str, args: argparse.Namespace, epoch: int, **dali: Any):
    """The training loader of one epoch, as the trainer builds it (DALI options: ``args``', or ``dali``)."""
    options = dict(hw_decoder_load=args.hw_decoder_load, prefetch_depth=args.prefetch_depth, workers=args.workers)
    return build_loader(
        shards, split, train=True, batch_size=args.batch_size, image_size=args.image_size, loader=loader,
        device=device, epoch=epoch, mask_size=args.mask_size or None, **(options | dali),
    )  # fmt: skip


def _images_per_second(shards: Path, split: str, loader: str, device: str, args: argparse.Namespace, **dali: Any):
    """Median images/s over ``args.repeats`` training epochs, after one warm-up epoch."""
    rates = []
    for epoch in range(args.repeats + 1):
        batches = _loader(shards, split, loader, device, args, epoch, **dali)
        start, images = time.perf_counter(), 0
        for batch in batches:
            images += len(batch["tokens"])
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if epoch:  # epoch 0 warms up caches, worker start-up and DALI's first allocations
            rates.append(images / (time.perf_counter() - start))
    return statistics.median(rates)


def _encoded_batches(data: Any, plans: Iterator[tuple[Any, int]]) -> Callable[[], tuple[list, list]]:
    """A DALI source (no argument: DALI then passes none) of the planned batches' encoded JPEGs and PNGs (each plan:
    rows of sample position and sentence, and the count of real ones)."""

    def source() -> tuple[list, list]:
        return data.encoded(next(plans)[0][:, 0])

    return source


def _stage_times(shards: Path, split: str, device: str, args: argparse.Namespace) -> list[dict]:
    """Per stage of the DALI graph: ms per batch of the pipeline ending there, and what the stage adds."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    from dcris.data.dali_loader import SplitData, decode_image, decode_mask, letterbox_image, letterbox_mask

    loader = _loader(shards, split, "dali", device, args, epoch=0)
    data, gpu = SplitData(loader), device.startswith("cuda")

    @pipeline_def
    def stages_pipeline(source: Any, stages: int) -> tuple[Any, ...]:
        jpeg, png = fn.external_source(source=source, num_outputs=2, batch=True, dtype=types.UINT8, ndim=1)
        image, mask = jpeg, png
        if stages >= 1:
            image = decode_image(jpeg, gpu, args.hw_decoder_load)
        if stages >= 2:
            image = letterbox_image(image, jpeg, loader.image_size)
        if stages >= 3:
            mask = decode_mask(png)
        if stages >= 4:
            mask = letterbox_mask(mask, jpeg, loader.image_size, loader.mask_size, gpu)
        return image, mask

    rows, before = [], 0.0
    for stages, name in enumerate(STAGES):
        pipe = stages_pipeline(
            _encoded_batches(data, loader.batch_plans(data)), stages, batch_size=loader.batch_size,
            num_threads=args.workers, device_id=torch.cuda.current_device() if gpu else None,
            prefetch_queue_depth=args.prefetch_depth,
        )  # fmt: skip
        pipe.build()
        for _ in range(3):  # warm-up: allocations, first decodes
            pipe.run()
        batches = max(len(loader), 5)
        start = time.perf_counter()
        for _ in range(batches):
            pipe.run()
        ms = 1000 * (time.perf_counter() - start) / batches
        rows.append(dict(stage=name, ms_per_batch=round(ms, 2), adds_ms=round(ms - before, 2)))
        before = ms
        del pipe
    return rows


def _tune(shards: Path, split: str, device: str, args: argparse.Namespace) -> list[dict]:
    """DALI's images/s over threads x prefetch depth (x hw_decoder_load on a GPU), best first."""
    cpus = os.cpu_count() or 1
    threads = sorted({max(1, cpus // 4), max(1, cpus // 2), cpus})
    loads = (0.0, 0.5, 0.65, 0.9) if device.startswith("cuda") else (args.hw_decoder_load,)
    rows = [
        dict(workers=w, prefetch_depth=p, hw_decoder_load=h,
             images_per_s=round(_images_per_second(shards, split, "dali", device, args, workers=w, prefetch_depth=p,
                                                   hw_decoder_load=h), 1))
        for w, p, h in itertools.product(threads, (2, 3, 4), loads)
    ]  # fmt: skip
    return sorted(rows, key=lambda r: -r["images_per_s"])


def _synthetic_shards(root: Path, images: int) -> Path:
    release = make_synthetic_release(root / "release", images=images, seed=0)
    return pack_synthetic_release(release, root / "shards", "--splits", "train", "--shard-size", "100")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Data loader throughput (images/s).")
    parser.add_argument("--shards", help="packed OUT/NAME directory with manifest.json (default: synthetic shards)")
    parser.add_argument("--split", default="train", help="split to read")
    parser.add_argument("--images", type=int, default=200, help="synthetic images when --shards is not given")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size")
    parser.add_argument("--image-size", type=int, default=448, help="letterbox size")
    parser.add_argument("--mask-size", type=int, help="training mask side (default 4 x size / 14; 0: size)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decoding threads / workers")
    parser.add_argument("--hw-decoder-load", type=float, default=0.65, help="DALI on a GPU: hardware decoder's share")
    parser.add_argument("--prefetch-depth", type=int, default=2, help="DALI: batches prepared ahead")
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs")
    parser.add_argument("--profile", action="store_true", help="time each stage of the DALI pipeline")
    parser.add_argument("--tune", action="store_true", help="time DALI over threads, prefetch depth, hw_decoder_load")
    parser.add_argument("--json", default="bench_loaders.json", help="where to write the results")
    args = parser.parse_args(argv)
    if args.mask_size is None:
        args.mask_size = 4 * args.image_size // 14
    if (args.profile or args.tune) and not dali_available():
        parser.error("--profile and --tune time DALI, which is not installed")
    return args


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    args = _parse_args(argv)
    gpu = torch.cuda.is_available()
    cases = [("torch", "cpu")] + ([("dali", "cpu")] if dali_available() else [])
    if gpu:
        cases += [("torch", "cuda")] + ([("dali", "cuda")] if dali_available() else [])
    else:
        print("no GPU: skipping DALI 'mixed' decoding and the GPU-fed PyTorch loader", file=sys.stderr)
    dali_device = "cuda" if gpu else "cpu"
    rows, profile, tuned = [], [], []
    result = dict(
        rows=rows, profile=profile, tune=tuned, batch_size=args.batch_size, image_size=args.image_size,
        mask_size=args.mask_size, workers=args.workers, hw_decoder_load=args.hw_decoder_load,
        prefetch_depth=args.prefetch_depth, cpu=platform.processor() or platform.machine(), cpus=os.cpu_count(),
        gpu=torch.cuda.get_device_name() if gpu else None, commit=git_commit(),
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(args.shards) if args.shards else _synthetic_shards(Path(tmp), args.images)
        print("| loader | delivered to | decoding | images/s |\n|---|---|---|---|", flush=True)
        for loader, device in cases:  # each row printed and written as it is measured: a time limit keeps it
            decode = "mixed" if loader == "dali" and device == "cuda" else "cpu"
            rate = _images_per_second(shards, args.split, loader, device, args)
            rows.append(dict(loader=loader, device=device, decode=decode, images_per_s=round(rate, 1)))
            print(f"| {loader} | {device} | {decode} | {rate:.1f} |", flush=True)
            Path(args.json).write_text(json.dumps(result, indent=1))
        if args.profile:
            profile += _stage_times(shards, args.split, dali_device, args)
        if args.tune:
            tuned += _tune(shards, args.split, dali_device, args)
    Path(args.json).write_text(json.dumps(result, indent=1))
    if profile:
        print(f"\nDALI on {dali_device}, pipeline up to each stage:\n{'stage':<18}{'ms/batch':>10}{'stage adds':>12}")
        for row in profile:
            print(f"{row['stage']:<18}{row['ms_per_batch']:>10.2f}{row['adds_ms']:>12.2f}")
    if tuned:
        print(f"\nDALI on {dali_device}:\n{'threads':>8}{'prefetch':>10}{'hw load':>9}{'images/s':>10}")
        for row in tuned:
            print(f"{row['workers']:>8}{row['prefetch_depth']:>10}{row['hw_decoder_load']:>9}{row['images_per_s']:>10}")
    print(
        f"(batch {args.batch_size}, {args.image_size}px, mask {args.mask_size}px, {args.workers} workers, "
        f"prefetch {args.prefetch_depth}, hw_decoder_load {args.hw_decoder_load}; written to {args.json})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
