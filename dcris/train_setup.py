"""Everything a run derives from its Config: process group, batch layout, DeepSpeed JSON, LR schedule (SPEC 6).

The batch numbers come from :func:`batch_layout` alone and :func:`deepspeed_config` writes them into the
DeepSpeed JSON, so the JSON and the config cannot disagree: ``micro_batch x grad_accum x world = global_batch``.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import torch

from dcris.config import Config, ConfigError, TrainConfig

AUTO = "auto"  # placeholder in ds_configs/*.json for a value filled from the Config
# the one-process DeepSpeed config of the checkout (the default of a plain ``python`` run)
DEFAULT_DEEPSPEED = Path(__file__).resolve().parents[1] / "ds_configs" / "single.json"


def init_distributed() -> tuple[int, int, int]:
    """Joins (or, for a plain ``python`` run, creates) the process group.

    The deepspeed launcher and torchrun set RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT; a plain
    single-process run gets them here. NCCL with a GPU, gloo without one (DeepSpeed's CPU accelerator).

    Returns:
        ``(rank, local_rank, world_size)``.
    """
    import deepspeed  # deferred: importing deepspeed probes the accelerator

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return int(os.environ["RANK"]), local_rank, int(os.environ["WORLD_SIZE"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def batch_layout(train: TrainConfig, world_size: int) -> tuple[int, int]:
    """The one source of the batch numbers.

    Returns:
        ``(micro_batch, grad_accum)`` with ``micro_batch * grad_accum * world_size == train.global_batch``.

    Raises:
        ConfigError: the global batch does not split into whole micro-batches over the ranks.
    """
    per_step = train.micro_batch * world_size
    if train.micro_batch < 1 or train.global_batch < 1 or train.global_batch % per_step:
        raise ConfigError(
            f"train.global_batch {train.global_batch} is not a multiple of train.micro_batch {train.micro_batch} "
            f"x {world_size} ranks; change either so that global = micro x grad_accum x ranks"
        )
    return train.micro_batch, train.global_batch // per_step


def deepspeed_config(cfg: Config, world_size: int, base: dict[str, Any], source: str = "DeepSpeed config") -> dict:
    """The DeepSpeed config of a run: ``base`` (ds_configs/*.json) with the Config-derived fields filled.

    Derived fields (batch sizes, accumulation, clipping, precision, buffer dtype) may be absent or ``"auto"`` in
    ``base``; a concrete value that differs from the Config is refused, and so is an ``optimizer`` or
    ``scheduler`` section (the optimizer and the LR schedule come from the Config).

    Raises:
        ConfigError: ``base`` contradicts the Config; the message names the key.
    """
    micro, accum = batch_layout(cfg.train, world_size)
    derived: dict[tuple[str, ...], Any] = {
        ("train_batch_size",): cfg.train.global_batch,
        ("train_micro_batch_size_per_gpu",): micro,
        ("gradient_accumulation_steps",): accum,
        ("gradient_clipping",): float(cfg.train.grad_clip),
        ("bf16", "enabled"): cfg.train.precision == "bf16",
        ("fp16", "enabled"): cfg.train.precision == "fp16",
        # buffers (BatchNorm statistics) in the parameters' dtype: DeepSpeed keeps them fp32 otherwise, and a
        # BatchNorm with bf16 weights and fp32 statistics does not run
        ("data_types", "buffer_dtype"): {"bf16": "bf16", "fp16": "fp16", "fp32": None}[cfg.train.precision],
    }
    if "tensorboard" not in base:  # DeepSpeed's monitor writes RUN/tensorboard (rank 0)
        base = dict(base, tensorboard=dict(enabled=True, output_path=cfg.train.output_dir, job_name="tensorboard"))
    for section in ("optimizer", "scheduler"):
        if section in base:
            raise ConfigError(f"{source}: remove the {section!r} section; train.lr / lr_milestones set it")
    out = json.loads(json.dumps(base))  # deep copy
    for path, value in derived.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        given = node.get(path[-1], AUTO)
        if given != AUTO and given != value:
            raise ConfigError(
                f"{source}: {'.'.join(path)} is {given!r} but the config gives {value!r}; "
                f'set it to "auto" or remove it (it follows from the train section)'
            )
        node[path[-1]] = value
    return out


def read_deepspeed_json(path: str | Path) -> dict[str, Any]:
    """Reads a DeepSpeed JSON file; a missing or malformed file is a user error."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"DeepSpeed config {str(path)!r} does not exist")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"DeepSpeed config {str(path)!r} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"DeepSpeed config {str(path)!r} must hold a JSON object")
    return data


def lr_factor(step: int, steps_per_epoch: int, train: TrainConfig) -> float:
    """LR multiplier at an optimizer step: ``lr_gamma`` per milestone epoch reached (x0.1 at epoch 35)."""
    epoch = step // steps_per_epoch
    return train.lr_gamma ** sum(epoch >= m for m in train.lr_milestones)


def precision_dtype(train: TrainConfig) -> torch.dtype:
    """The dtype DeepSpeed keeps the model in (inputs are cast to it)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[train.precision]
