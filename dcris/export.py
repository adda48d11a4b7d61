"""Deployable weights: what trains (the adapters and the head, a Table 2 method's own parameters, and the backbones
too under full fine-tuning, ``model.train_backbones``) as safetensors, with the config that rebuilds the model.

Rule for the frozen backbones: a backbone whose weights are named in the config (``model.vision.weights``,
``model.text.weights``) is reloaded from that name and is not in the file; a backbone without a name was
randomly initialised (tiny presets, tests, the demo), so its frozen weights are stored in the file too and the
export reloads to identical predictions either way.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from dcris.config import Config, apply_overrides, from_dict, to_dict
from dcris.errors import UserError
from dcris.model import DCRIS, build_model, is_trainable_key

FORMAT = "dcris-export/1"


def exported_keys(cfg: Config, state_keys: list[str]) -> list[str]:
    """The state-dict keys an export of ``cfg`` holds (module docstring): trainable + unnamed backbones."""
    random_text, random_vision = not cfg.model.text.weights, not cfg.model.vision.weights
    return [
        k
        for k in state_keys
        if is_trainable_key(k, cfg.model)
        or (random_text and k.startswith("text."))
        or (random_vision and k.startswith("vision.backbone."))
    ]


def save_export(state: dict[str, torch.Tensor], cfg: Config, path: str | Path) -> Path:
    """Writes the exported tensors of a full model state dict (float tensors as float32) and the metadata.

    Args:
        state: The model's full state dict (the trainable tensors at full precision).
        cfg: The run's resolved config.
        path: Output ``.safetensors`` file.

    Returns:
        The written path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        k: (state[k].float() if state[k].is_floating_point() else state[k]).detach().cpu().contiguous()
        for k in exported_keys(cfg, list(state))
    }
    metadata = {
        "format": FORMAT,
        "preset": cfg.preset,
        "config": json.dumps(to_dict(cfg)),
        "vision_weights": cfg.model.vision.weights,
        "text_weights": cfg.model.text.weights,
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)  # a reader never sees a half-written export
    return path


def read_export_config(path: str | Path) -> Config:
    """The resolved Config recorded in an export."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (OSError, SafetensorError) as exc:
        raise UserError(f"cannot read exported weights {str(path)!r}: {exc}") from None
    if metadata.get("format") != FORMAT:
        raise UserError(f"{str(path)!r} is not a dcris export (no {FORMAT!r} metadata)")
    return from_dict(json.loads(metadata["config"]))


def load_exported(path: str | Path, device: str | torch.device = "cpu", overrides: list[str] | None = None) -> DCRIS:
    """Rebuilds the model of an export: config from the metadata, named backbones from their weights, the
    rest from the file (strictly: every expected tensor present, nothing else).

    Args:
        path: The export.
        device: Where the model goes.
        overrides: ``section.key=value`` changes to the recorded config before the model is built (backbone
            weight paths, ``model.allow_download=true``, ...).

    Returns:
        The model in eval mode on ``device``.
    """
    cfg = apply_overrides(read_export_config(path), overrides)
    model = build_model(cfg.model, pretrained=True)
    state = load_file(str(path))
    expected = set(exported_keys(cfg, list(model.state_dict())))
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise UserError(
            f"exported weights {str(path)!r} do not match their config: "
            f"{len(missing)} missing (e.g. {missing[:1]}), {len(unexpected)} unexpected (e.g. {unexpected[:1]})"
        )
    model.load_state_dict(state, strict=False)  # strict over ``expected``, checked above
    return model.to(device).eval()
