"""Resumable DeepSpeed checkpoints and reading weights back from them or from exports.

Layout of ``RUN/checkpoints/``: one folder per tag (``step00001234``) holding DeepSpeed's files, ``config.json``
(the resolved config) and ``rng_RANK.pt`` (each rank's RNG states); ``latest`` names the newest complete tag.
DeepSpeed rewrites ``latest`` in place (not atomically), so it is told not to and ``latest`` is replaced
atomically here, after every rank has finished writing.

A run resumed on another number of ranks loads DeepSpeed's universal checkpoint of ``latest`` instead, which
DeepSpeed's own converter (``deepspeed.checkpoint.ds_to_universal``) writes once into ``universal/TAG``: the
fp32 weights and the Adam moments of every trainable tensor whole, re-partitioned for the new ranks at load.

The frozen backbones are left out (DeepSpeed's ``exclude_frozen_parameters``): a checkpoint holds the trainable
tensors, their fp32 Adam state and every buffer (the BatchNorm statistics). Loading rebuilds the frozen parts
from the config as the run built them (:func:`dcris.train_setup.build_training_model`) and checks them against
the digest the checkpoint recorded.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dcris.config import Config, apply_overrides, from_dict, to_dict
from dcris.errors import UserError, disk_full_is_user_error, pause_at
from dcris.export import WEIGHTS_FILE, exported_keys, load_exported, save_export
from dcris.model import DCRIS
from dcris.train_setup import build_training_model, frozen_digest

LATEST = "latest"
UNIVERSAL = "universal"  # RUN/checkpoints/universal/TAG: DeepSpeed's universal copy of TAG, for another world size
DIGEST_KEY = "frozen_digest"  # client-state key of the frozen parameters' digest


def latest_tag(ckpt_dir: str | Path) -> str | None:
    """The tag ``latest`` names, or None when there is no complete checkpoint."""
    path = Path(ckpt_dir) / LATEST
    if not path.is_file():
        return None
    return path.read_text().strip() or None


def saved_world_size(ckpt_dir: str | Path) -> int | None:
    """Ranks that wrote the ``latest`` checkpoint, counted from its ZeRO optimizer partitions (one file a rank);
    None without a checkpoint, or without ZeRO, whose one optimizer state loads on any number of ranks."""
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    return len(list((Path(ckpt_dir) / tag).glob("zero_pp_rank_*_mp_rank_00_optim_states.pt"))) or None


def write_universal_checkpoint(ckpt_dir: str | Path, rank: int) -> None:
    """Rank 0 converts ``latest`` into ``universal/TAG`` with DeepSpeed's converter (once; a folder already
    there is complete, being renamed into place when done); a collective: every rank returns when it is there.

    Raises:
        UserError: the converter failed (on every rank, with its last line).
    """
    tag = latest_tag(ckpt_dir)
    out = Path(ckpt_dir) / UNIVERSAL / str(tag)
    failure = None
    if rank == 0 and not out.is_dir():
        tmp = out.with_name(f"{tag}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        # its own process: the converter's worker pools and prints stay out of the run
        converter = [
            sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
            str(Path(ckpt_dir) / str(tag)), "--output_folder", str(tmp), "--num_extract_workers", "1",
            "--num_merge_workers", "1", "--inject_missing_state",
        ]  # fmt: skip
        done = subprocess.run(converter, capture_output=True, text=True)
        if done.returncode == 0:
            tmp.rename(out)
        else:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            failure = f"DeepSpeed could not convert {Path(ckpt_dir) / str(tag)} for another number of ranks: {last}"
    message = [failure]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(message, src=0)
    if message[0] is not None:
        raise UserError(message[0])


def _rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors, lists and numbers only, so that ``torch.load(weights_only=True)``
    reads them back (no pickled classes)."""
    version, mt_state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, torch.tensor(mt_state, dtype=torch.int64), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores the Python, NumPy, torch (and CUDA) RNG states saved by :func:`save_checkpoint`."""
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state.tolist()), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def read_rng_state(path: Path) -> dict[str, Any] | None:
    """The RNG states in ``path`` (None when there is none), read without arbitrary pickle.

    A file that is not in the tensor form :func:`_rng_state` writes is not read: the run continues with the
    RNG as it is and says so.
    """
    if not path.is_file():
        return None
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as exc:
        print(f"{path} is not read ({str(exc).splitlines()[0]}); the run goes on with fresh RNG states", flush=True)
        return None


def save_checkpoint(engine: Any, ckpt_dir: str | Path, step: int, client_state: dict, cfg: Config, rank: int) -> str:
    """Saves a resumable checkpoint without the frozen parameters on every rank (a collective); returns its tag.

    ``client_state`` should hold the ``frozen_digest`` of the model (see :func:`load_weights`). Then keeps only
    the newest ``cfg.train.keep_checkpoints`` tags up to this one (all when 0). A full disk is a :class:`UserError`
    naming the folder, with ``latest`` and the tags it kept as they were.
    """
    tag = f"step{step:08d}"
    folder = Path(ckpt_dir) / tag
    if rank == 0 and folder.is_dir() and tag != latest_tag(ckpt_dir):
        shutil.rmtree(folder)  # left by a save that was killed: none of its files are trusted
    dist.barrier()  # cleared before any rank writes into it
    with disk_full_is_user_error(ckpt_dir):
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(_rng_state(), folder / f"rng_{rank}.pt")
        if rank == 0:
            (folder / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
        engine.save_checkpoint(
            str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False, exclude_frozen_parameters=True
        )
        dist.barrier()  # every rank's files are on disk before ``latest`` moves
        pause_at("checkpoint-latest")
        if rank == 0:
            tmp = Path(ckpt_dir) / f"{LATEST}.tmp"
            tmp.write_text(tag)
            os.replace(tmp, Path(ckpt_dir) / LATEST)
    keep = cfg.train.keep_checkpoints
    if rank == 0 and keep > 0:
        # Only tags up to this one count: a later one was left by a killed save of an earlier run (``latest``
        # never named it) and is not one of the checkpoints kept; it is cleared when a save reaches its step.
        tags = sorted(p for p in Path(ckpt_dir).glob("step*") if p.is_dir() and p.name <= tag)  # zero-padded
        for old in tags[:-keep]:
            shutil.rmtree(old)
    return tag


def _rank0_model_states(folder: Path) -> dict[str, Any]:
    """Rank 0's DeepSpeed model states of a tag folder (``mp_rank_00_...``, or ``zero_pp_rank_0_...`` under
    ZeRO-3): module buffers and client state, read as DeepSpeed reads its own files (full pickle)."""
    return torch.load(sorted(folder.glob("*model_states.pt"))[0], map_location="cpu", weights_only=False)


def _check_digest(saved: str | None, current: str | None, where: Path) -> None:
    if None not in (saved, current) and saved != current:
        raise UserError(
            f"the frozen weights rebuilt from the config differ from those {where} was trained with (other "
            "backbone weights, or model code that initialises differently); evaluate the run's export instead"
        )


def _load_strict_but_frozen(state: dict[str, torch.Tensor], model: torch.nn.Module, where: Path) -> None:
    """``model.load_state_dict(state)`` that allows exactly the frozen parameters to be missing."""
    result = model.load_state_dict(state, strict=False)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    missing = sorted(set(result.missing_keys) - frozen)
    if missing or result.unexpected_keys:
        raise UserError(
            f"checkpoint {where} does not match its config: {len(missing)} missing (e.g. {missing[:1]}), "
            f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:1]})"
        )


def load_checkpoint(
    engine: Any, ckpt_dir: str | Path, rank: int, digest: str | None = None, universal: bool = False
) -> tuple[dict, dict | None] | None:
    """Restores the engine (model, optimizer, LR scheduler) from ``latest``.

    Args:
        engine: The DeepSpeed engine of the run.
        ckpt_dir: ``RUN/checkpoints``.
        rank: This process's rank.
        digest: ``frozen_digest`` of the engine's model as built, which must match the checkpoint's (None: not
            checked).
        universal: Load ``universal/TAG`` (:func:`write_universal_checkpoint`, for an engine built with
            ``checkpoint.load_universal``): the checkpoint was written by another number of ranks.

    Returns:
        None when there is nothing to resume, else the client state saved with it and this rank's RNG states
        (None when the checkpoint was saved by other ranks), for :func:`set_rng_state` once the caller is where
        the saving run was.
    """
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    where = Path(ckpt_dir) / tag
    if universal:
        # DeepSpeed restores the trainable tensors and their Adam moments from universal/TAG/zero, but not the
        # module's state dict: the buffers (BatchNorm statistics) come from the saving run's rank 0 here
        _, client_state = engine.load_checkpoint(str(Path(ckpt_dir) / UNIVERSAL), tag=tag)
        states = _rank0_model_states(where)
        buffers = {name for name, _ in engine.module.named_buffers()}
        engine.module.load_state_dict({k: v for k, v in states["module"].items() if k in buffers}, strict=False)
    else:
        _, client_state = engine.load_checkpoint(
            str(ckpt_dir), tag=tag, custom_load_fn=lambda src, dst: _load_strict_but_frozen(src, dst, where)
        )
    if client_state is None:
        raise UserError(f"checkpoint {where} could not be loaded")
    _check_digest(client_state.get(DIGEST_KEY), digest, where)
    return client_state, None if universal else read_rng_state(where / f"rng_{rank}.pt")


def export_engine(engine: Any, cfg: Config, path: str | Path, rank: int, metrics: dict | None = None) -> Path | None:
    """Exports the engine's model to the folder ``path`` (a collective: every rank calls it; rank 0 writes), with
    the last evaluation's ``metrics`` for the model card.

    The model's weights are the fp32 master weights (DeepSpeed's 16-bit modes are never on, see
    :mod:`dcris.train_setup`); ZeRO-3 partitions are gathered on every rank. Frozen tensors the run held in 16
    bits (:mod:`dcris.precision`) are exported as the config builds them, in fp32, as an fp32 run exports them.
    """
    import deepspeed

    module = engine.module
    with deepspeed.zero.GatheredParameters(list(module.parameters())):  # ZeRO-3 partitions; a no-op below it
        state = {k: v.detach().clone() for k, v in module.state_dict().items()} if rank == 0 else {}
    if rank != 0:
        return None
    reduced = [k for k in exported_keys(cfg, list(state)) if state[k].dtype in (torch.bfloat16, torch.float16)]
    if reduced:  # only unnamed (random-init) backbones are exported: rebuilding them is cheap and exact
        with torch.random.fork_rng(devices=[]):
            built = build_training_model(cfg).state_dict()
        state.update({k: built[k] for k in reduced})
    return save_export(state, cfg, path, metrics)


def _tag_folder(ckpt_dir: Path) -> Path:
    tag = latest_tag(ckpt_dir)
    folder = ckpt_dir / tag if tag else ckpt_dir
    if not ((folder / "config.json").is_file() and list(folder.glob("*model_states.pt"))):
        raise UserError(f"{str(ckpt_dir)!r} is neither a dcris checkpoint folder nor a checkpoint tag")
    return folder


def _load_checkpoint_model(ckpt_dir: Path, device: str | torch.device, overrides: list[str] | None) -> DCRIS:
    """The model as trained at the ``latest`` tag of a checkpoint folder (or a tag folder itself).

    Trainable tensors come from the fp32 master weights of the ZeRO optimizer partitions (the model states when
    there is no ZeRO), buffers from the model states, the frozen parameters from the config.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    folder = _tag_folder(ckpt_dir)
    cfg = apply_overrides(from_dict(json.loads((folder / "config.json").read_text())), overrides)
    model = build_training_model(cfg)
    model_states = _rank0_model_states(folder)
    _check_digest(model_states.get(DIGEST_KEY), frozen_digest(model), folder)
    if list(folder.glob("*zero_pp_rank_*optim_states.pt")):
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # progress
            state = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    else:
        state = model_states["module"]
    _load_strict_but_frozen(state, model, folder)
    return model.to(device).eval()


def load_weights(path: str | Path, device: str | torch.device = "cpu", overrides: list[str] | None = None) -> DCRIS:
    """A model from a training checkpoint folder (``RUN/checkpoints``) or an export (a folder, a Hugging Face Hub
    model id in the local cache, or an earlier single ``.safetensors`` file; see ``dcris.export``).

    ``overrides`` (``section.key=value``) change the recorded config before the model is built.
    """
    if Path(path).is_dir() and not (Path(path) / WEIGHTS_FILE).is_file():
        return _load_checkpoint_model(Path(path), device, overrides)
    return load_exported(path, device, overrides)
