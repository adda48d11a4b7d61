"""Run under a launcher: the trainer's start (which resumes from ``latest``), then its steps up to
``train.max_steps``; writes the engine's state after each to ``DUMP.start.pt`` (a resumed run only: a new one
has no Adam moments yet) and ``DUMP.end.pt`` (rank 0).

The state is what resuming must keep: every trainable tensor's fp32 weights and Adam moments whole (gathered from
the ZeRO partitions), rank 0's buffers (the BatchNorm statistics), the step, DeepSpeed's step count and the LR.

    torchrun --nproc_per_node 2 tests/engine_state.py DUMP --deepspeed ds_configs/zero2.json --preset ... key=value
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dcris.config import load_config  # noqa: E402
from dcris.train_setup import read_deepspeed_json  # noqa: E402
from dcris.trainer import Run, parse_args, start_run, train_steps  # noqa: E402


def engine_state(run: Run) -> dict[str, torch.Tensor]:
    """The state of the run's engine (module docstring); a collective under ZeRO-3 (every rank calls it)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    engine = run.setup.engine
    state = {}
    for name, param in engine.module.named_parameters():
        if param.requires_grad:
            state[f"{name}/fp32"] = safe_get_full_fp32_param(param).clone()
            for key in ("exp_avg", "exp_avg_sq"):
                state[f"{name}/{key}"] = safe_get_full_optimizer_state(param, key).clone()
    state |= {f"{name}/buffer": b.detach().clone() for name, b in engine.module.named_buffers()}
    state["step"] = torch.tensor(run.step)
    state["global_steps"] = torch.tensor(engine.global_steps)
    state["lr"] = torch.tensor(run.setup.scheduler.get_last_lr()[0], dtype=torch.float64)
    return state


def main() -> None:
    dump, args = Path(sys.argv[1]), parse_args(sys.argv[2:])
    run = start_run(load_config(args.config, args.preset, args.overrides), read_deepspeed_json(args.deepspeed), "")
    if run.step:  # resumed
        _save(run, f"{dump}.start.pt")
    train_steps(run)
    _save(run, f"{dump}.end.pt")


def _save(run: Run, path: str) -> None:
    state = engine_state(run)  # every rank: a collective under ZeRO-3
    if run.setup.rank == 0:
        torch.save(state, path)


if __name__ == "__main__":
    main()
