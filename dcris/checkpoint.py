"""Resumable DeepSpeed checkpoints and reading weights back from them or from exports.

Layout of ``RUN/checkpoints/``: one folder per tag (``step00001234``) holding DeepSpeed's files, ``config.json``
(the resolved config) and ``rng_RANK.pt`` (each rank's RNG states); ``latest`` names the newest complete tag.
DeepSpeed rewrites ``latest`` in place (not atomically), so it is told not to and ``latest`` is replaced
atomically here, after every rank has finished writing.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dcris.config import Config, apply_overrides, from_dict, to_dict
from dcris.errors import UserError
from dcris.export import load_exported, save_export
from dcris.model import DCRIS, build_model

LATEST = "latest"


def latest_tag(ckpt_dir: str | Path) -> str | None:
    """The tag ``latest`` names, or None when there is no complete checkpoint."""
    path = Path(ckpt_dir) / LATEST
    if not path.is_file():
        return None
    return path.read_text().strip() or None


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores the Python, NumPy, torch (and CUDA) RNG states saved by :func:`save_checkpoint`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(engine: Any, ckpt_dir: str | Path, step: int, client_state: dict, cfg: Config, rank: int) -> str:
    """Saves a resumable checkpoint on every rank (a collective); returns its tag.

    Then keeps only the newest ``cfg.train.keep_checkpoints`` tags (all when 0).
    """
    tag = f"step{step:08d}"
    folder = Path(ckpt_dir) / tag
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(_rng_state(), folder / f"rng_{rank}.pt")
    if rank == 0:
        (folder / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    dist.barrier()  # every rank's files are on disk before ``latest`` moves
    if rank == 0:
        tmp = Path(ckpt_dir) / f"{LATEST}.tmp"
        tmp.write_text(tag)
        os.replace(tmp, Path(ckpt_dir) / LATEST)
        keep = cfg.train.keep_checkpoints
        tags = sorted(p for p in Path(ckpt_dir).glob("step*") if p.is_dir())  # zero-padded: sorted by step
        for old in tags[:-keep] if keep > 0 else []:
            if old.name != tag:
                shutil.rmtree(old)
    return tag


def load_checkpoint(engine: Any, ckpt_dir: str | Path, rank: int) -> tuple[dict, dict | None] | None:
    """Restores the engine (model, optimizer, LR scheduler) from ``latest``.

    Returns:
        None when there is nothing to resume, else the client state saved with it and this rank's RNG states
        (None when the checkpoint was saved by fewer ranks), for :func:`set_rng_state` once the caller is where
        the saving run was.
    """
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    _, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if client_state is None:
        raise UserError(f"checkpoint {Path(ckpt_dir) / tag} could not be loaded")
    rng = Path(ckpt_dir) / tag / f"rng_{rank}.pt"
    return client_state, torch.load(rng, weights_only=False) if rng.is_file() else None


def export_engine(engine: Any, cfg: Config, path: str | Path, rank: int) -> Path | None:
    """Exports the engine's model (a collective: every rank calls it; rank 0 writes).

    Trainable parameters are taken from DeepSpeed's fp32 master copy, not the bf16/fp16 working copy.
    Works for every ZeRO stage; reading a checkpoint folder back (:func:`load_weights`) needs stage 0-2, whose
    model-states file holds whole tensors.
    """
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    with deepspeed.zero.GatheredParameters(list(module.parameters())):  # ZeRO-3 partitions; a no-op below it
        state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    for name, param in module.named_parameters():
        if param.requires_grad:
            full = safe_get_full_fp32_param(param)  # gathers the ZeRO partitions (a collective)
            state[name] = full if full is not None else param.detach().float()
    return save_export(state, cfg, path) if rank == 0 else None


def _load_checkpoint_model(ckpt_dir: Path, device: str | torch.device, overrides: list[str] | None) -> DCRIS:
    """The model as trained at the ``latest`` tag of a checkpoint folder (or a tag folder itself)."""
    tag = latest_tag(ckpt_dir)
    folder = ckpt_dir / tag if tag else ckpt_dir
    config, states = folder / "config.json", folder / "mp_rank_00_model_states.pt"
    if not (config.is_file() and states.is_file()):
        raise UserError(f"{str(ckpt_dir)!r} is neither a dcris checkpoint folder nor a checkpoint tag")
    cfg = apply_overrides(from_dict(json.loads(config.read_text())), overrides)
    model = build_model(cfg.model, pretrained=True)
    module_state = torch.load(states, map_location="cpu", weights_only=False)["module"]
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in module_state.items()})
    return model.to(device).eval()


def load_weights(path: str | Path, device: str | torch.device = "cpu", overrides: list[str] | None = None) -> DCRIS:
    """A model from an export (``.safetensors``) or a training checkpoint folder (``RUN/checkpoints``).

    ``overrides`` (``section.key=value``) change the recorded config before the model is built.
    """
    path = Path(path)
    if path.is_dir():
        return _load_checkpoint_model(path, device, overrides)
    if not path.is_file():
        raise UserError(f"weights {str(path)!r} do not exist")
    return load_exported(path, device, overrides)
