"""Operations a training step and an inference batch dispatch at full width on the meta device, compiled graphs.

``launch/count_ops.py`` counts them for a preset (dcris-b by default).

On a GPU every operation that is not a view costs the host a kernel launch (5-10 us each), whatever the batch, so
these counts are the host's share of a step. The meta device runs no arithmetic: dcris-b at its real width and
448 px is counted in seconds on any CPU. What the meta device would run otherwise than CUDA is made to dispatch
as on CUDA: torch's ``scaled_dot_product_attention`` (the meta device's math form) is counted as the one fused
kernel CUDA runs, ``_scaled_dot_product_efficient_attention`` (a boolean mask turned into an additive bias
first, as CUDA's SDPA does), and dropout as CUDA's one fused kernel.

Counted in fp32: autocast adds its casts on a GPU (``launch/bench.py --count-ops`` counts them on the CPU). The
optimizer is not counted (fused Adam, the trainer's on a GPU, is one multi-tensor operator a step and has no
meta kernel), nor is DeepSpeed's ZeRO bookkeeping.

With ``--compile``, the model is compiled as ``model.compile=true`` compiles it, and the count is of the
compiled graphs entered per step (forward and backward graphs, through AOTAutograd with eager kernels).

``--host-steps N`` times N eager training steps (forward, loss, backward, Adam) on the CPU instead, at tiny widths
with the preset's depth and structure (:func:`at_tiny_width`), where the arithmetic is small and the step time
is mostly the cost of each operation. Run it in the trees to compare, in turn (``farm-bench`` pairs the runs).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import json
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from dcris.config import Config, load_config
from dcris.provenance import git_commit

# operators that launch no kernel although they are not views: a view by another name, an allocation
NO_KERNEL = frozenset({"aten._unsafe_view", "aten.empty", "aten.empty_strided", "aten.empty_like", "aten.lift_fresh"})


def launches_kernel(func: torch._ops.OpOverload) -> bool:
    """Whether an aten operator does device work: not a view (an alias of its input), not an allocation alone."""
    return not func.is_view and str(func.overloadpacket) not in NO_KERNEL


class DispatchCounter(TorchDispatchMode):
    """Counts every aten operator dispatched while active, and separately those that launch a kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.all: collections.Counter[str] = collections.Counter()
        self.kernels: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = str(func.overloadpacket)
        self.all[name] += 1
        if launches_kernel(func):
            self.kernels[name] += 1
        return func(*args, **(kwargs or {}))

    def record(self, rows: int = 20) -> dict[str, Any]:
        """Totals (all operators, views and the rest, kernel launches) and the most frequent kernel operators."""
        total, kernels = sum(self.all.values()), sum(self.kernels.values())
        return dict(operators=total, views_and_allocations=total - kernels, kernel_launches=kernels,
                    top_kernels=dict(self.kernels.most_common(rows)))  # fmt: skip


def _efficient_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """What CUDA's scaled_dot_product_attention dispatches: the fused memory-efficient kernel."""
    bias = None
    if attn_mask is not None:  # a boolean mask becomes an additive bias first (CUDA's convert_boolean_attn_mask)
        bias = torch.zeros_like(attn_mask, dtype=q.dtype).masked_fill_(attn_mask.logical_not(), float("-inf"))
        bias = bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    return torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, bias, q.requires_grad or k.requires_grad or v.requires_grad, dropout_p, is_causal, scale=scale
    )[0]


def _fused_dropout(x, p=0.5, training=True, inplace=False):
    """What CUDA's dropout dispatches: one fused kernel (elsewhere it is a random mask, a division and a product)."""
    if not training or p == 0:
        return x
    return torch.ops.aten.native_dropout(x, p, True)[0]


class _FusedAsOnCuda(TorchFunctionMode):
    """Attention and dropout dispatch their fused CUDA operators."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func is F.scaled_dot_product_attention:
            return _efficient_attention(*args, **(kwargs or {}))
        if func is F.dropout:
            return _fused_dropout(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


def meta_model(cfg: Config) -> torch.nn.Module:
    """The preset's model with random weights on the meta device (no memory, no arithmetic)."""
    from dcris.model import build_model

    cfg.model.vision.weights = cfg.model.text.weights = ""
    with torch.device("meta"):
        return build_model(cfg.model, pretrained=False)


def at_tiny_width(cfg: Config) -> Config:
    """``cfg`` with the widths of ``tiny-dcris`` and everything else kept: its blocks, adapter places, taps and
    head layers; random weights, 112 px (an 8x8 patch grid whose position embedding is resized)."""
    from dcris.config import preset

    tiny = preset("tiny-dcris").model
    cfg.model.image_size = tiny.image_size
    cfg.model.vision.weights = cfg.model.text.weights = ""
    widths = dict(vision=("width", "heads", "pretrained_size"), text=("width", "heads", "embed_dim", "positions"),
                  adapters=("vision_hidden", "text_hidden", "cross_width", "cross_heads"),
                  head=("width", "decoder_heads", "ffn_dim", "projector_dim"))  # fmt: skip
    for section, keys in widths.items():
        for key in keys:
            setattr(getattr(cfg.model, section), key, getattr(getattr(tiny, section), key))
    return cfg


def host_step_ms(cfg: Config, batch: int, steps: int, warmup: int = 3) -> dict[str, float]:
    """Milliseconds of eager training steps on the CPU, one thread: median and interquartile range."""
    import statistics
    import time

    from dcris.model import build_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model(cfg.model, pretrained=False).train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    size, side = cfg.model.image_size, 4 * cfg.model.image_size // cfg.model.vision.patch_size
    images, masks = torch.randn(batch, 3, size, size), (torch.rand(batch, 1, side, side) > 0.5).float()
    tokens = torch.zeros(batch, cfg.model.text.context_length, dtype=torch.long)
    tokens[:, 0], tokens[:, 1:5], tokens[:, 5] = 49406, torch.randint(1, 49000, (batch, 4)), 49407
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        model.loss(model(images, tokens), masks).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    q1, median, q3 = statistics.quantiles(times, n=4)
    return dict(step_ms_median=1e3 * median, step_ms_iqr=1e3 * (q3 - q1), steps=steps, batch=batch)


def _inputs(cfg: Config, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    size, length = cfg.model.image_size, cfg.model.text.context_length
    images = torch.empty(batch, 3, size, size, device="meta")
    tokens = torch.zeros(batch, length, dtype=torch.long, device="meta")
    side = 4 * size // cfg.model.vision.patch_size  # the training loader's masks come at the logits' side
    masks = torch.empty(batch, 1, side, side, device="meta")
    return images, tokens, masks


def model_steps(cfg: Config, batch: int) -> dict[str, Callable[[], None]]:
    """``train``: forward, loss and backward of one micro-batch; ``infer``: one eval forward, no grad."""
    model = meta_model(cfg)
    images, tokens, masks = _inputs(cfg, batch)

    def train() -> None:
        model.train()
        model.loss(model(images, tokens), masks).backward()
        model.zero_grad(set_to_none=True)

    @torch.no_grad()
    def infer() -> None:
        model.eval()
        model(images, tokens)

    return dict(train=train, infer=infer)


def count_dispatch(step: Callable[[], None]) -> dict[str, Any]:
    """The operators of one call of ``step`` after one uncounted call (first-call caches)."""
    with _FusedAsOnCuda():
        step()
        with DispatchCounter() as counter:
            step()
    return counter.record()


def _counting_backend(entered: collections.Counter[str]) -> Any:
    """A torch.compile backend (AOTAutograd, eager kernels) that counts every entry of its forward and backward
    graphs into ``entered``."""
    from torch._dynamo.backends.common import aot_autograd

    def compiler(kind: str) -> Callable:
        def compile_graph(gm: torch.fx.GraphModule, _example_inputs: list) -> Callable:
            def run(args: list) -> Any:
                entered[kind] += 1
                return gm(*args)

            run._boxed_call = True  # AOTAutograd's calling convention: one list of arguments
            return run

        return compile_graph

    return aot_autograd(fw_compiler=compiler("forward"), bw_compiler=compiler("backward"))


def count_compiled_graphs(cfg: Config, batch: int) -> dict[str, Any]:
    """Compiled graphs entered by one training step and one inference batch of ``model.compile=true``, and the
    graphs built and graph breaks of the whole run (two training steps and two inference batches)."""
    from torch._dynamo.utils import counters

    entered: collections.Counter[str] = collections.Counter()
    backend = _counting_backend(entered)
    cfg.model.compile = True
    torch._dynamo.reset()
    counters.clear()
    with contextlib.ExitStack() as stack:
        stack.enter_context(_FusedAsOnCuda())
        real_compile = torch.compile
        stack.callback(setattr, torch, "compile", real_compile)
        torch.compile = functools.partial(real_compile, backend=backend)
        steps = model_steps(cfg, batch)
        out: dict[str, Any] = {}
        for name, step in steps.items():
            step()  # compiles
            entered.clear()
            step()
            out[f"{name}_graphs_entered"] = dict(entered)
    out.update(graphs_built=counters["stats"]["unique_graphs"], graph_breaks=sum(counters["graph_break"].values()))
    torch._dynamo.reset()
    return out


def table(record: dict[str, Any]) -> str:
    """A Markdown table of the counts."""
    lines = ["| pass | operators | views and allocations | kernel launches |", "|---|---|---|---|"]
    for name in ("train", "infer"):
        r = record[name]
        lines.append(f"| {name} | {r['operators']} | {r['views_and_allocations']} | {r['kernel_launches']} |")
    compiled = record.get("compiled")
    if compiled:
        lines += ["", "| compiled pass | forward graphs entered | backward graphs entered |", "|---|---|---|"]
        for name in ("train", "infer"):
            e = compiled[f"{name}_graphs_entered"]
            lines.append(f"| {name} | {e.get('forward', 0)} | {e.get('backward', 0)} |")
        lines.append(f"\ngraphs built {compiled['graphs_built']}, graph breaks {compiled['graph_breaks']}")
    lines += ["", "most frequent kernel operators (train): " + ", ".join(
        f"{op} {n}" for op, n in list(record["train"]["top_kernels"].items())[:10])]  # fmt: skip
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="launch/count_ops.py", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="dcris-b", help="preset counted at its full width (default dcris-b)")
    parser.add_argument("--batch", type=int, default=32, help="images per step (the counts hardly depend on it)")
    parser.add_argument("--compile", action="store_true", help="also count the compiled graphs entered per step")
    parser.add_argument("--host-steps", type=int, default=0, metavar="N",
                        help="instead: time N eager training steps at tiny widths on the CPU (the host's time)")
    parser.add_argument("--out", default="count_ops.json", help="JSON record to write")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = parser.parse_intermixed_args(argv)
    if args.batch < 1:
        parser.error("--batch must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``launch/count_ops.py``: prints the table, writes the JSON record."""
    args = parse_args(argv)

    def config() -> Config:
        return load_config(preset_name=args.preset, overrides=args.overrides)

    if args.host_steps:
        record = dict(config=dict(preset=args.preset, widths="tiny", overrides=args.overrides),
                      env=dict(torch=torch.__version__, machine=platform.machine(), commit=git_commit()),
                      host=host_step_ms(at_tiny_width(config()), args.batch, args.host_steps))  # fmt: skip
        Path(args.out).write_text(json.dumps(record, indent=2))
        print(json.dumps(record["host"]))
        return 0

    steps = model_steps(config(), args.batch)
    record: dict[str, Any] = dict(
        config=dict(preset=args.preset, batch=args.batch, image_size=config().model.image_size,
                    overrides=args.overrides, device="meta", precision="fp32"),
        env=dict(torch=torch.__version__, machine=platform.machine(), commit=git_commit()),
        **{name: count_dispatch(step) for name, step in steps.items()},
    )  # fmt: skip
    if args.compile:
        record["compiled"] = count_compiled_graphs(config(), args.batch)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(table(record))
    return 0
