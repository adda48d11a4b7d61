"""Evaluation over packed splits (SPEC 5), sharded over ranks and reduced exactly; ``dcris eval``.

python launch/eval.py --weights RUN/export --shards data/shards/refcoco --splits val,testA,testB
python launch/eval.py --weights RUN/checkpoints --shards data/shards/refcoco --splits val --out metrics.json
python launch/eval.py --weights RUN/export --shards data/shards/refcoco --pictures 16   (contact_sheet_val.png)
torchrun --nproc_per_node 8 launch/eval.py ...      (samples sharded over ranks, sums reduced exactly)

Every rank runs the same number of forward passes per split: a rank with fewer batches than the busiest one runs
padding batches whose outputs are dropped. ZeRO-3 gathers parameters inside every forward (a collective), so
ranks that stopped early would wait forever for the others. Every forward has the same shape: a split's last,
partial batch is filled up with padding rows whose outputs are dropped, so a compiled model never recompiles for
it (and cuDNN's choices and CUDA graphs hold for the whole split).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from dcris.checkpoint import load_weights
from dcris.data import build_loader, num_samples
from dcris.data.common import generalized_split
from dcris.errors import UserError
from dcris.export import CONFIG_FILE, is_export_folder, set_no_target_threshold
from dcris.metrics import (
    GresAccumulator,
    IoUAccumulator,
    NoTargetSweep,
    best_threshold,
    format_curve,
    format_table,
    plot_curve,
)
from dcris.model import split_output
from dcris.protocol import PROTOCOLS, RELA_SIDE, StretchedTargets, stretched_targets
from dcris.tokenizer import tokenize
from dcris.train_setup import AUTOCAST_DTYPES, all_reduce_values, init_distributed, use_fixed_shape_kernels


def split_size(shards: str, split: str, train: bool) -> int:
    """Samples of a packed split (see ``dcris.data.num_samples``); a missing folder or split is a user error."""
    if not shards:
        raise UserError("data.shards is not set: point it at a folder written by shards/pack.py")
    return num_samples(shards, split, train)


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``dtype`` on ``device``; float32 runs as is."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


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
    on_batch: Callable[[str, dict[str, Any], list[float]], None] | None = None,
    protocol: str = "original",
    calibrate_no_target: bool = False,
) -> dict[str, dict[str, Any]]:
    """mIoU, oIoU and Pr@ per split (every (object, sentence) once over all ranks); gIoU, cIoU, N-acc, T-acc and
    Pr@ for a gRefCOCO split (``dcris.metrics.GresAccumulator``).

    Every rank must call this (the sums are all-reduced and, with ZeRO-3, every forward is a collective); a tqdm
    bar shows progress on rank 0.

    Args:
        dtype: Autocast dtype of the forward passes (bfloat16 or float16), or float32 for none; the weights
            stay as they are.
        on_batch: Sees every batch of this rank with its per-sample IoUs (``dcris.pictures.IoURecorder`` keeps
            them for pictures); padding batches are never shown.
        protocol: Where a gRefCOCO split's masks are compared (``dcris.protocol``): "original" or "rela".
        calibrate_no_target: Also sweep the no-target threshold on each (gRefCOCO) split
            (``dcris.metrics.NoTargetSweep``: its result gains ``no_target_curve``).

    Returns:
        ``{split: IoUAccumulator.result()}``, or ``GresAccumulator.result()`` for a gRefCOCO split (at the
        model's ``model.head.no_target_threshold``), each with ``protocol``.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    results = {}
    try:
        for split in splits:
            expected = split_size(shards, split, train=False)
            data = build_loader(
                shards, split, train=False, batch_size=batch_size, image_size=image_size, rank=rank,
                world_size=world_size, workers=workers, loader=loader, device=str(device),
                context_length=model.cfg.text.context_length,
            )  # fmt: skip
            progress = f"eval {split}" if rank == 0 else ""
            split_batches = functools.partial(on_batch, split) if on_batch else None
            generalized = generalized_split(shards, split)
            if calibrate_no_target and not generalized:
                raise UserError(f"--calibrate-no-target sweeps gRefCOCO splits; {split!r} of {shards} is not one")
            targets = stretched_targets(shards, split, protocol, generalized)  # None: the original resolution
            acc = (NoTargetSweep() if calibrate_no_target else GresAccumulator()) if generalized else IoUAccumulator()
            _score_rank(model, data, image_size, batch_size, device, dtype, progress, acc, split_batches, targets)
            acc.all_reduce()
            if acc.count != expected:  # the loaders promise every pair exactly once over all ranks
                raise RuntimeError(f"evaluated {acc.count} samples of {split!r}, the manifest lists {expected}")
            results[split] = acc.result() | {"protocol": protocol}
    finally:
        model.train(was_training)
    return results


def _score_rank(
    model: nn.Module,
    data: Any,
    image_size: int,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    progress: str,
    acc: IoUAccumulator | GresAccumulator,
    on_batch: Callable[[dict[str, Any], list[float]], None] | None = None,
    targets: StretchedTargets | None = None,
) -> None:
    """Adds this rank's samples to ``acc``, after as many forward passes as the rank with the most batches runs.

    Args:
        progress: tqdm description ("" for no bar).
        acc: Where the samples go: RefCOCO-style sums, or gRefCOCO's for a generalized split.
        on_batch: Sees every real batch with its per-sample IoUs.
        targets: ReLA's protocol: the split's targets in the stretched frame; None to score at the original size.
    """
    (steps,) = all_reduce_values([len(data)], dist.ReduceOp.MAX)
    padding = _padding_batch(image_size, data.context_length, device, batch_size)
    seen = 0
    with autocast(device, dtype):
        for batch in tqdm(data, total=int(steps), desc=progress, disable=not progress, leave=False, dynamic_ncols=True):
            images, tokens = batch["image"].to(device), batch["tokens"].to(device)
            rows = len(images)
            if rows < batch_size:  # the last batch, filled up to the one shape every forward has
                images, tokens = _filled_up(images, padding[0]), _filled_up(tokens, padding[1])
            logits, no_target_logits = split_output(model(images, tokens))
            logits = logits[:rows]
            no_target_logits = None if no_target_logits is None else no_target_logits[:rows]
            # (B, 1, 4S/14, 4S/14) and (B,) or None; orig_size is on the CPU, the sums stay on the device: no sync
            # unless on_batch wants the IoUs
            masks, sizes = batch["orig_mask"], batch["orig_size"]
            if isinstance(acc, GresAccumulator):
                threshold, stretch = model.cfg.head.no_target_threshold, None if targets is None else targets.side
                masks = masks if targets is None else targets.masks(batch["ref_id"].tolist())
                ious = acc.add_logits(
                    logits, masks, sizes, image_size, batch["num_targets"], no_target_logits, threshold, stretch
                )
            else:
                ious = acc.add_logits(logits, masks, sizes, image_size)
            if on_batch is not None:
                on_batch(batch, ious.tolist())
            seen += 1
        if seen != len(data):  # the other ranks would wait for the missing forward passes
            raise RuntimeError(f"the loader yielded {seen} batches, its len() is {len(data)}")
        if seen:  # in the layout of this rank's batches
            padding = _filled_up(images[:0], padding[0]), _filled_up(tokens[:0], padding[1])
        for _ in range(int(steps) - seen):
            model(*padding)  # output dropped: padding never reaches the metrics


def _filled_up(x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
    """``x`` (n, ...) continued with the rows of ``padding`` (B, ...) after its n-th, in ``x``'s memory layout (a
    compiled model guards on strides as well as on shapes)."""
    full = torch.empty_strided(padding.shape, x.stride(), dtype=x.dtype, device=x.device)
    full[: len(x)] = x
    full[len(x) :] = padding[len(x) :]
    return full


def _padding_batch(
    image_size: int, context_length: int, device: torch.device, rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` blank images and empty sentences (start and end tokens): a well-formed input whose output is
    dropped, (rows, 3, S, S) and (rows, L)."""
    images = torch.zeros(rows, 3, image_size, image_size, device=device)
    return images, tokenize([""], context_length).to(device).repeat(rows, 1)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dcris eval", description="Evaluate DCRIS on packed splits.")
    parser.add_argument("--weights", required=True, help="export folder, Hub id, or RUN/checkpoints")
    parser.add_argument("--shards", required=True, help="folder written by shards/pack.py (holds manifest.json)")
    parser.add_argument("--splits", default="val", help="comma-separated splits (default: val)")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument(
        "--pictures", type=int, default=0, metavar="N",
        help="also draw N pairs of each split, from the best to the worst IoU, as one contact sheet PNG per split",
    )  # fmt: skip
    parser.add_argument("--pictures-dir", help="where the contact sheets go (default: beside --out, else .)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass on each rank (32)")
    parser.add_argument(
        "--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
        help="autocast dtype of the forward passes, TF32 allowed under bf16/fp16; auto: bf16 on a GPU, fp32 on a CPU",
    )  # fmt: skip
    parser.add_argument("--workers", type=int, default=2, help="loader workers per rank")
    parser.add_argument("--loader", default="auto", choices=("auto", "dali", "torch"), help="data loader")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: this rank's GPU, else the CPU)")
    parser.add_argument(
        "--protocol", default="original", choices=PROTOCOLS,
        help="gRefCOCO: where masks are compared; original (default): each image's own size; rela: as the official "
        "ReLA evaluation, every image stretched to 480x480, targets rasterised there from their polygons or RLE",
    )  # fmt: skip
    parser.add_argument(
        "--calibrate-no-target", action="store_true",
        help="gRefCOCO: sweep the no-target threshold on the split (use val), print gIoU, cIoU, N-acc and T-acc per "
        "threshold and plot them (no_target_curve_SPLIT.png beside --out, else in --pictures-dir or .)",
    )  # fmt: skip
    parser.add_argument(
        "--save", action="store_true",
        help="with --calibrate-no-target: write the gIoU-best threshold into the export's config "
        "(model.head.no_target_threshold), which predict, the page, serve and Segmenter then use",
    )  # fmt: skip
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # set by launchers
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value",
        help="changes to the weights' recorded config, e.g. model.vision.weights=DIR or model.allow_download=true",
    )  # fmt: skip
    return parser.parse_args(argv)


PROTOCOL_NAMES = {
    "original": "masks compared at each image's own resolution",
    "rela": f"gRefCOCO scored as ReLA's evaluation, images stretched to {RELA_SIDE}x{RELA_SIDE}",
}


def _report_calibration(args: argparse.Namespace, split: str, result: dict, current: float) -> None:
    """Prints the no-target curve of ``split``, plots it, and with ``--save`` writes its gIoU-best threshold into
    the export."""
    curve = result["no_target_curve"]
    best = best_threshold(curve)
    print(f"\nno-target threshold on {split} ({args.protocol} protocol; the model's is {current:.2f}):")
    print(format_curve(curve))
    if split.startswith("test"):
        print(f"note: {split} is a test split; a threshold chosen on it makes its figures optimistic (use val)")
    folder = Path(args.pictures_dir or (Path(args.out).parent if args.out else "."))
    folder.mkdir(parents=True, exist_ok=True)
    plot = folder / f"no_target_curve_{split}.png"
    plot_curve(curve, plot, f"{Path(args.weights).name}: no-target threshold on {split} ({args.protocol})")
    print(
        f"wrote {plot}\nbest gIoU at threshold {best['threshold']:.2f}: gIoU {100 * best['giou']:.2f}, cIoU "
        f"{100 * best['ciou']:.2f}, N-acc {100 * best['n_acc']:.2f}, T-acc {100 * best['t_acc']:.2f}"
    )
    if args.save:
        set_no_target_threshold(args.weights, best["threshold"])
        print(f"saved model.head.no_target_threshold={best['threshold']:.2f} in {Path(args.weights) / CONFIG_FILE}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``dcris eval`` and ``launch/eval.py``."""
    args = parse_args(argv)
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    splits = [s for s in args.splits.split(",") if s]
    if args.save and not args.calibrate_no_target:
        raise UserError("--save writes a calibrated no-target threshold: give --calibrate-no-target too")
    if args.calibrate_no_target and len(splits) != 1:
        raise UserError(f"--calibrate-no-target sweeps one split (val); got --splits {args.splits}")
    if args.save and not is_export_folder(args.weights):
        raise UserError(f"--save writes into an export folder's {CONFIG_FILE}; {args.weights!r} is not one")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(args.device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"))
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    if precision != "fp32" and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    use_fixed_shape_kernels(device)
    own_group = world > 1 and not dist.is_initialized()  # a group made here is ended here, and no other
    if world > 1:  # launched by torchrun / deepspeed: shard the samples, reduce the sums
        rank, _, world = init_distributed()
    model = load_weights(args.weights, device, args.overrides)
    from dcris.pictures import IoURecorder, contact_sheets

    recorder = IoURecorder() if args.pictures > 0 else None
    results = evaluate(
        model, args.shards, splits, image_size=model.cfg.image_size, batch_size=args.batch_size, rank=rank,
        world_size=world, workers=args.workers, loader=args.loader, device=device, dtype=AUTOCAST_DTYPES[precision],
        on_batch=recorder, protocol=args.protocol, calibrate_no_target=args.calibrate_no_target,
    )  # fmt: skip
    sheets = contact_sheets(model, recorder, args.shards, splits, args.pictures, rank) if recorder else {}
    if rank == 0:
        print(f"protocol: {args.protocol} ({PROTOCOL_NAMES[args.protocol]})\n{format_table(results)}")
        if args.calibrate_no_target:
            _report_calibration(args, splits[0], results[splits[0]], model.cfg.head.no_target_threshold)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results, indent=2))
            print(f"wrote {args.out}")
        folder = Path(args.pictures_dir or (Path(args.out).parent if args.out else "."))
        for split, sheet in sheets.items():
            folder.mkdir(parents=True, exist_ok=True)
            sheet.save(folder / f"contact_sheet_{split}.png")
            print(f"wrote {folder / f'contact_sheet_{split}.png'}")
    if own_group:
        dist.destroy_process_group()
    return 0
