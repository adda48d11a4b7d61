"""Whole-model throughput as training and evaluation really run (SPEC 7's anchors): ``launch/bench.py``.

Training steps go through the trainer's own engine (:func:`dcris.train_setup.build_engine`: the same model,
precision, Adam, ZeRO stage and SyncBatchNorm decision as ``deepspeed launch/train.py --deepspeed
ds_configs/zero2.json``), fed by the real loader (DALI decoding on the GPU when DALI is installed) from packed
shards of full-size JPEGs. Inference runs evaluation's own code path (:func:`dcris.evaluate.evaluate`: loader,
autocast forward, inverse letterbox and metrics) at its batch size. ``--model-only`` feeds synthetic tensors
instead, so the loader's share shows as the difference.

Each step is timed on its own (the device synchronised around it); the record has the median and interquartile
range, images/s from the median, peak memory, and MFU: the FLOPs of one step counted by
``torch.utils.flop_counter`` divided by the step time and by the peak of a large dense matrix product measured
on the same device in the same dtype. Without ``--shards`` a synthetic release of COCO-sized images (427-640 px)
is generated and packed first. On a CPU the same code runs at tiny width in seconds (the tests do).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import importlib.metadata
import itertools
import json
import platform
import resource
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from dcris.attention import xformers_available
from dcris.config import Config, load_config
from dcris.data import loader_kind, shards_context_length
from dcris.provenance import git_commit
from dcris.train_setup import (
    build_engine,
    precision_dtype,
    rank_device,
    read_deepspeed_json,
    store_frozen_as_configured,
    use_fixed_shape_kernels,
)

ZERO2 = Path(__file__).resolve().parents[1] / "ds_configs" / "zero2.json"
# --variants: name -> (config overrides, ZeRO stage or None for zero2.json's): today's path ("eager"), each speed
# switch alone, and all of them together, measured one after another in one process so the rows compare
_SWITCHES = {
    "fused": ["model.adapters.fused_dense=true"],
    "compile": ["model.compile=true"],
    "fused_qkv": ["model.vision.fused_qkv=true"],
    "channels_last": ["model.head.channels_last=true"],
    "single_key_gate": ["model.head.single_key_gate=true"],
    "residual16": ["train.compute_dtype_residual=true"],
}
VARIANTS: dict[str, tuple[list[str], int | None]] = {
    "eager": ([], None),
    "fp32_frozen": (["train.frozen_in_compute_dtype=false"], None),  # the frozen weights cast at every call
    **{name: (overrides, None) for name, overrides in _SWITCHES.items()},
    "cuda_graphs": (["model.compile=true", "model.compile_mode=reduce-overhead"], None),
    "zero0": ([], 0),
    "zero1": ([], 1),
    "all": ([o for overrides in _SWITCHES.values() for o in overrides], None),
}
COCO_SIZES = (427, 640)  # short and long side range of the generated images: COCO train2014's common sizes


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], Any], steps: int, warmup: int, device: torch.device) -> list[float]:
    """Seconds of each of ``steps`` calls of ``step`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


@functools.cache  # measured once per process: training and inference records share it
def matmul_peak(device: torch.device, dtype: torch.dtype, size: int | None = None) -> float:
    """FLOP/s of a large dense square matrix product on ``device`` in ``dtype`` (median of 5), the MFU unit."""
    size = size or (8192 if device.type == "cuda" else 1024)
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    seconds = statistics.median(time_steps(lambda: a @ b, 5, 2, device))
    return 2 * size**3 / seconds


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` (matrix products and convolutions, forward and backward) by torch's counter."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def _summary(times: list[float], batch: int, flops_per_step: int, peak: float) -> dict[str, float]:
    q1, median, q3 = statistics.quantiles(times, n=4) if len(times) > 1 else (times[0],) * 3
    return dict(
        step_ms_median=1e3 * median,
        step_ms_iqr=1e3 * (q3 - q1),
        images_per_s=batch / median,
        gflop_per_sample=flops_per_step / batch / 1e9,
        mfu=flops_per_step / median / peak,
    )


def _peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux: the process's peak RSS


def _synthetic_batch(cfg: Config, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
    size, length = cfg.model.image_size, cfg.model.text.context_length
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 49406, (batch, length), generator=g)
    tokens[:, 0], tokens[:, 10], tokens[:, 11:] = 49406, 49407, 0  # start, 9 words, end, padding
    return dict(
        image=torch.randn(batch, 3, size, size, generator=g).to(device),
        tokens=tokens.to(device),
        mask=(torch.rand(batch, 1, size, size, generator=g) > 0.5).float().to(device),
    )


def _train_batches(cfg: Config, setup: Any, model_only: bool) -> Iterator[dict[str, torch.Tensor]]:
    """Endless training micro-batches: the trainer's loader epoch after epoch, or one synthetic batch again."""
    from dcris.trainer import train_loader

    if model_only:
        yield from itertools.repeat(_synthetic_batch(cfg, cfg.train.micro_batch, setup.device))
    for epoch in itertools.count():
        yield from train_loader(cfg, setup.rank, setup.world_size, setup.device, epoch)


def profile_table(step: Callable[[], Any], device: torch.device, rows: int = 25) -> str:
    """torch.profiler's table of one call of ``step``: the top operators and kernels by device time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        _sync(device)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def deepspeed_base(zero_stage: int | None = None) -> dict[str, Any]:
    """ds_configs/zero2.json (the trainer's ZeRO settings), with ``zero_optimization.stage`` set when given."""
    base = read_deepspeed_json(ZERO2)
    if zero_stage is not None:
        base["zero_optimization"] = dict(base["zero_optimization"], stage=zero_stage)
    return base


def training_step(cfg: Config, model_only: bool, zero_stage: int | None = None) -> tuple[Callable[[], None], Any]:
    """One optimizer step of the trainer's engine (``train.micro_batch`` images, no accumulation) as a function,
    and the engine's set-up."""
    cfg.train.global_batch = cfg.train.micro_batch  # one rank, one micro-batch per optimizer step
    if not model_only:  # as the trainer: the sentence length of the shards
        cfg.model.text.context_length = shards_context_length(cfg.data.shards)
    setup = build_engine(cfg, deepspeed_base(zero_stage), str(ZERO2))
    engine, device = setup.engine, setup.device
    batches = _train_batches(cfg, setup, model_only)

    def step() -> None:
        batch = next(batches)
        logits = engine(batch["image"].to(device), batch["tokens"].to(device))  # the engine autocasts
        engine.backward(engine.module.loss(logits, batch["mask"].to(device)))
        engine.step()

    return step, setup


class OperatorCounter(TorchDispatchMode):
    """Counts the aten operators dispatched while it is active (forward, backward and optimizer alike)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


# the operators that cast (autocast's and .to()'s) and the one a host read of a device value (.item(), bool(),
# .tolist()) dispatches: on a GPU each of the latter waits for the device
CAST_OPERATORS = ("aten._to_copy", "aten.copy_")
HOST_READ_OPERATOR = "aten._local_scalar_dense"


def count_operators(step: Callable[[], Any], warmup: int = 1) -> dict[str, Any]:
    """The aten operators one call of ``step`` dispatches, after ``warmup`` uncounted calls: the total, the
    casts, the host reads and the count of each operator (most frequent first)."""
    for _ in range(warmup):
        step()
    with OperatorCounter() as counter:
        step()
    counts = dict(counter.counts.most_common())
    return dict(
        total=sum(counts.values()),
        casts=sum(counts.get(op, 0) for op in CAST_OPERATORS),
        host_reads=counts.get(HOST_READ_OPERATOR, 0),
        operators=counts,
    )


def operator_table(record: dict[str, Any], rows: int = 15) -> str:
    """A Markdown table of an operator count: the most frequent operators, then the totals."""
    lines = ["| operator | calls |", "|---|---|"]
    lines += [f"| `{op}` | {n} |" for op, n in list(record["operators"].items())[:rows]]
    lines += [f"| casts ({', '.join(CAST_OPERATORS)}) | {record['casts']} |",
              f"| host reads ({HOST_READ_OPERATOR}) | {record['host_reads']} |",
              f"| **all operators** | **{record['total']}** |"]  # fmt: skip
    return "\n".join(lines)


def bench_training(
    cfg: Config, steps: int, warmup: int, model_only: bool, profile: bool = False, zero_stage: int | None = None
) -> dict[str, Any]:
    """Times optimizer steps of the trainer's engine (ZeRO-2 config unless ``zero_stage``, no accumulation)."""
    step, setup = training_step(cfg, model_only, zero_stage)
    device = setup.device
    flops = count_flops(step)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = time_steps(step, steps, warmup, device)
    peak = matmul_peak(device, precision_dtype(cfg.train))
    out = dict(_summary(times, cfg.train.micro_batch, flops, peak), peak_memory_gib=_peak_memory_gib(device))
    if profile:
        out["profile"] = profile_table(step, device)
    return out


def _time_model_only_inference(model: nn.Module, cfg: Config, batch: int, steps: int, warmup: int) -> dict[str, Any]:
    """Times autocast forwards of one synthetic batch: the model alone, no loader and no post-processing."""
    from dcris.evaluate import autocast

    device, dtype = rank_device(0), precision_dtype(cfg.train)
    inputs = _synthetic_batch(cfg, batch, device)

    @torch.no_grad()
    def step() -> None:
        with autocast(device, dtype):
            model(inputs["image"], inputs["tokens"])

    flops = count_flops(step)
    times = time_steps(step, steps, warmup, device)
    return _summary(times, batch, flops, matmul_peak(device, dtype))


def bench_inference(cfg: Config, batch: int, steps: int, warmup: int, model_only: bool) -> dict[str, Any]:
    """Times evaluation's own loop (loader, autocast forward, inverse letterbox, metrics) in one pass over
    ``data.eval_splits[0]``, or autocast forwards of synthetic tensors with ``model_only``.

    The evaluation record also holds the model-only rate measured in the same process (``model_only_images_per_s``)
    and ``evaluate_vs_model_only``, the ratio of the two rates: what the loader and the metrics cost.
    """
    from dcris.data import num_samples
    from dcris.evaluate import evaluate
    from dcris.model import build_model

    device, dtype = rank_device(0), precision_dtype(cfg.train)
    use_fixed_shape_kernels(device)  # as dcris eval
    model = build_model(cfg.model, pretrained=True)
    store_frozen_as_configured(model, cfg.train)  # as the training engine holds them
    model = model.to(device).eval()
    model_only_summary = _time_model_only_inference(model, cfg, batch, steps, warmup)
    if model_only:
        return dict(model_only_summary, peak_memory_gib=_peak_memory_gib(device))
    split = cfg.data.eval_splits[0]

    def step() -> None:
        evaluate(model, cfg.data.shards, [split], image_size=cfg.model.image_size, batch_size=batch,
                 workers=cfg.data.workers, loader=cfg.data.loader, device=device, dtype=dtype)  # fmt: skip

    images = num_samples(cfg.data.shards, split, train=False)
    # one pass over the split, its loader's start included: the model is warm from the model-only timing, and
    # the model's FLOPs per sample are those counted there (the metrics count none)
    flops = round(model_only_summary["gflop_per_sample"] * 1e9 * images)
    times = time_steps(step, 1, 0, device)
    summary = _summary(times, images, flops, matmul_peak(device, dtype))
    return dict(
        summary,
        peak_memory_gib=_peak_memory_gib(device),
        model_only_images_per_s=model_only_summary["images_per_s"],
        evaluate_vs_model_only=summary["images_per_s"] / model_only_summary["images_per_s"],
    )


def _version(package: str) -> str | None:
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        return importlib.metadata.version(package)
    return None


def environment() -> dict[str, Any]:
    """Where the numbers come from: the device, the library versions, the attention kernel and the commit."""
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return dict(
        device=gpu or f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        torch=torch.__version__,
        cuda=torch.version.cuda,
        dali=_version("nvidia-dali-cuda120") or _version("nvidia-dali-cuda130"),
        deepspeed=_version("deepspeed"),
        attention="xformers" if xformers_available() else "sdpa",
        commit=git_commit(),
    )


def markdown_row(record: dict[str, Any]) -> str:
    """The BENCHMARKS.md row of a record."""
    c = record["config"]
    switches = c.get("label") or ", ".join(k for k in ("fused", "compile", "model_only") if c[k]) or "eager"
    if not c["model_only"]:
        switches += f" ({c['loader']} loader)"
    cells = [record["env"]["device"], c["preset"], str(c["batch"]), c["precision"], switches]
    for mode in ("train", "infer"):
        r = record.get(mode)
        if r is None:
            cells += ["-"] * 4
            continue
        step = f"{r['step_ms_median']:.1f} ± {r['step_ms_iqr']:.1f}"
        cells += [f"{r['images_per_s']:.1f}", step, f"{100 * r['mfu']:.1f}%", f"{r['peak_memory_gib']:.1f}"]
    return "| " + " | ".join(cells) + f" | {record['env']['commit'][:8]} |"


def _generated_shards(workdir: Path, images: int) -> str:
    """A synthetic release of COCO-sized images, packed (what ``data.shards`` points at when none is given)."""
    from dcris.data import synth

    release = synth.make_synthetic_release(workdir / "release", images=images, seed=0, sizes=COCO_SIZES)
    return str(synth.pack_synthetic_release(release, workdir / "shards", "--workers", "2"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="launch/bench.py", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="dcris-b", help="preset (tiny-dcris runs in seconds on a CPU)")
    parser.add_argument("--batch", type=int, default=32, help="images per step (training and inference)")
    parser.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default="bf16")
    parser.add_argument("--fused", action="store_true", help="fused Triton dense branch (model.adapters.fused_dense)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the vision blocks and head")
    parser.add_argument("--model-only", action="store_true", help="synthetic tensors instead of the loader")
    parser.add_argument("--mode", choices=("train", "infer", "both"), default="both")
    parser.add_argument("--steps", type=int, default=30, help="timed steps (evaluation: one pass over the split)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--shards", help="packed shards (default: a generated synthetic release of COCO-sized JPEGs)")
    parser.add_argument("--images", type=int, default=400, help="images of the generated release")
    parser.add_argument("--profile", action="store_true", help="add a profiler table of one training step")
    parser.add_argument(
        "--count-ops",
        action="store_true",
        help="count the aten operators of one model-only training step instead of timing",
    )
    parser.add_argument("--zero-stage", type=int, choices=(0, 1, 2), help="ZeRO stage (default: zero2.json's)")
    parser.add_argument("--label", help="the switches cell of the BENCHMARKS.md row (default: from the flags)")
    parser.add_argument(
        "--variants",
        help=f"comma-separated variants measured one after another in this process, a row each ({', '.join(VARIANTS)})",
    )
    parser.add_argument("--out", default="bench.json", help="JSON record to write")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="further config overrides")
    args = parser.parse_intermixed_args(argv)  # overrides may come before and after the options
    if args.batch < 1 or args.steps < 1 or args.warmup < 0:
        parser.error("--batch and --steps must be at least 1, --warmup at least 0")
    unknown = [v for v in (args.variants or "").split(",") if v and v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}: choose from {', '.join(VARIANTS)}")
    if args.variants and (args.count_ops or args.label or args.zero_stage is not None):
        parser.error("--variants sets each row's label and ZeRO stage: no --count-ops, --label or --zero-stage")
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``launch/bench.py``: prints the record and its BENCHMARKS.md row, writes the JSON; with
    ``--variants``, one record per variant, their rows printed together last."""
    args = parse_args(argv)
    if args.count_ops:
        return _count_main(_config(args), args)
    with tempfile.TemporaryDirectory(prefix="dcris-bench-data-") as data:
        # generated once (when the loader is measured and no --shards is given) for every record of the run
        shards = args.shards or (None if args.model_only else _generated_shards(Path(data), args.images))
        if not args.variants:
            record = _record(args, _config(args), args.label, args.zero_stage, shards)
            _write(args.out, record)
            shown = {k: v for k, v in record.items() if k != "markdown"}
            if "train" in shown and "profile" in shown["train"]:
                print(shown["train"].pop("profile"))
            print(json.dumps(shown, indent=2))
            print(record["markdown"])
            return 0
        records = []
        for name in args.variants.split(","):
            overrides, zero_stage = VARIANTS[name]
            records.append(_record(args, _config(args, overrides), name, zero_stage, shards))
            print(records[-1]["markdown"], flush=True)  # as it comes, in case a later variant fails
            _write(args.out, {"variants": records})
            torch.cuda.empty_cache()  # the last engine's memory back before the next is built
            # each variant compiles as a fresh run would: the compiled forward's graphs are cached per code object
            # across models, and the variants together would pass dynamo's cache limit and fall back to eager
            torch.compiler.reset()
    print("\n".join(r["markdown"] for r in records))
    return 0


def _config(args: argparse.Namespace, extra: list[str] = ()) -> Config:
    """The benchmarked config: the preset at the command line's batch and precision, random backbone weights."""
    overrides = [
        f"train.precision={args.precision}", f"train.micro_batch={args.batch}", f"train.global_batch={args.batch}",
        f"model.adapters.fused_dense={args.fused}", f"model.compile={args.compile}",
        "model.vision.weights=", "model.text.weights=",  # random weights, as SPEC 7's anchors were measured
        *args.overrides, *extra,
    ]  # fmt: skip
    return load_config(preset_name=args.preset, overrides=overrides)


def _record(
    args: argparse.Namespace, cfg: Config, label: str | None, zero_stage: int | None, shards: str | None
) -> dict[str, Any]:
    """One measured record (training and/or inference) of ``cfg`` reading ``shards`` (None: model only), with its
    BENCHMARKS.md row."""
    with tempfile.TemporaryDirectory(prefix="dcris-bench-") as tmp:
        if shards is not None:
            cfg.data.shards = shards
        cfg.train.output_dir = str(Path(tmp) / "run")
        m = cfg.model
        record: dict[str, Any] = dict(
            config=dict(preset=args.preset, batch=args.batch, precision=args.precision, fused=m.adapters.fused_dense,
                        compile=m.compile, model_only=args.model_only, image_size=m.image_size,
                        loader=loader_kind(cfg.data.loader), zero_stage=zero_stage, label=label,
                        overrides=args.overrides + VARIANTS.get(label, ([], None))[0],
                        shards=args.shards or "generated COCO-sized synthetic release"),
            env=environment(),
        )  # fmt: skip
        if args.mode in ("train", "both"):
            record["train"] = bench_training(cfg, args.steps, args.warmup, args.model_only, args.profile, zero_stage)
        if args.mode in ("infer", "both"):
            record["infer"] = bench_inference(cfg, args.batch, args.steps, args.warmup, args.model_only)
    record["markdown"] = markdown_row(record)
    return record


def _write(path: str, record: dict[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(record, indent=2))


def _count_main(cfg: Config, args: argparse.Namespace) -> int:
    """``--count-ops``: prints the operator table of one model-only training step and writes its JSON."""
    with tempfile.TemporaryDirectory(prefix="dcris-bench-") as tmp:
        cfg.train.output_dir = str(Path(tmp) / "run")
        step, _ = training_step(cfg, model_only=True, zero_stage=args.zero_stage)
        record = dict(
            config=dict(preset=args.preset, batch=args.batch, precision=args.precision, zero_stage=args.zero_stage,
                        overrides=args.overrides),
            env=environment(),
            train_step_operators=count_operators(step, warmup=max(args.warmup, 1)),
        )  # fmt: skip
    _write(args.out, record)
    print(operator_table(record["train_step_operators"]))
    return 0
