"""Microbenchmark of the dense branch (SPEC section 2): eager PyTorch, torch.compile and the fused Triton kernels.

``python kernels/bench.py [--out bench.json]`` times inference (eval mode, no grad) and training (forward +
backward, batch statistics) for batch 16/32/64, bf16, 32x32 and 37x37 maps, with the median of many runs
(triton.testing.do_bench, CUDA events). It prints a table of ms, effective GB/s (bytes of input + output +
weights, plus the output gradient and input gradient for training), speed-up over eager and peak memory, and
writes JSON with the GPU name, torch/triton versions and the git commit. Without CUDA it prints one line saying
it needs a GPU and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dcris.kernels.dense_branch import DenseBranch  # noqa: E402
from dcris.provenance import git_commit  # noqa: E402

_BATCHES = (16, 32, 64)
_SIZES = (32, 37)


def _bytes_moved(h: torch.Tensor, branch: DenseBranch, training: bool) -> int:
    """Input + output (+ output gradient + input gradient when training) + weights, in bytes."""
    act = h.numel() * h.element_size()
    weights = sum(p.numel() * p.element_size() for p in branch.parameters())
    return (4 if training else 2) * act + (2 if training else 1) * weights


def _measure(fn: Callable[[], object]) -> tuple[float, float]:
    """(median ms, peak MB above the state before the call)."""
    import triton.testing

    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    ms = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
    return ms, peak_mb


def _case(
    fwd: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor, gout: torch.Tensor, training: bool, autocast: bool
) -> Callable[[], None]:
    """One timed call: forward (no grad) or forward + backward; the PyTorch variants run under bf16 autocast
    (the module's parameters are fp32, as in the model), the Triton path reads them in place."""
    x = h.clone().requires_grad_(training)

    def fn() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast), torch.set_grad_enabled(training):
            out = fwd(x)
            if training:
                out.backward(gout)

    return fn


def _variants(branch: DenseBranch) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    from dcris.kernels.dense_branch_autograd import fused_dense_branch

    compiled = torch.compile(branch.reference_forward)
    return {
        "eager": branch.reference_forward,
        "compile": compiled,
        "triton": lambda x: fused_dense_branch(x, branch.blocks),
    }


def run(out_path: Path | None) -> int:
    """Run every case, print the table, write the JSON; returns the exit status."""
    if not torch.cuda.is_available():
        print("kernels/bench.py needs a CUDA GPU; none found, nothing measured.")
        return 2
    import triton

    rows = []
    branch = DenseBranch().cuda()
    header = f"{'mode':<9}{'B':>4}{'HxW':>7} {'impl':<8}{'ms':>9}{'GB/s':>9}{'speed-up':>10}{'peak MB':>10}"
    print(header)
    print("-" * len(header))
    for training in (False, True):
        branch.train(training)
        variants = _variants(branch)
        mode = "train" if training else "infer"
        for bsz in _BATCHES:
            for hw in _SIZES:
                h = torch.randn(bsz, 128, hw, hw, device="cuda", dtype=torch.bfloat16).relu()
                gout = torch.randn_like(h)
                case = f"{mode:<9}{bsz:>4}{f'{hw}x{hw}':>7} "
                eager_ms = None
                for name, fwd in variants.items():
                    try:
                        ms, peak = _measure(_case(fwd, h, gout, training, autocast=name != "triton"))
                    except Exception as e:  # noqa: BLE001 - a variant that cannot run here is a row, not the end
                        print(f"{case}{name:<8} failed: {e!r:.90}")
                        rows.append(dict(mode=mode, batch=bsz, hw=hw, impl=name, error=repr(e)))
                        continue
                    if name == "eager":
                        eager_ms = ms
                    speedup = eager_ms / ms if eager_ms else float("nan")  # no baseline when eager failed
                    gbs = _bytes_moved(h, branch, training) / ms / 1e6
                    print(f"{case}{name:<8}{ms:>9.3f}{gbs:>9.0f}{speedup:>9.2f}x{peak:>10.1f}")
                    rows.append(
                        dict(mode=mode, batch=bsz, hw=hw, impl=name, ms=ms, gb_per_s=gbs, speedup=speedup,
                             peak_mb=peak)
                    )  # fmt: skip
    result = dict(
        gpu=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        commit=git_commit(),
        dtype="bfloat16",
        rows=rows,
    )
    if out_path is not None:
        out_path.write_text(json.dumps(result, indent=2))
        print(f"wrote {out_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    return run(args.out)


if __name__ == "__main__":
    sys.exit(main())
