"""``dcris convert-detris``: import the authors' released DETRIS checkpoints onto the detris-b / detris-l presets.

The released state dict (``shared/reference/detris_b_state_dict.tsv`` lists DETRIS-B's keys) uses DINOv2's
original layout (``dinov2.blocks.N.attn.qkv``), open_clip's text layout (``txt_backbone.*``) and the head's
names (``neck.*``, ``decoder.*``, ``proj.*``). Every key is renamed by the rules below; the fused ``qkv`` is
split into transformers' q/k/v projections. An unknown, missing or mis-shaped key is an error naming it.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

from dcris.config import Config, preset
from dcris.errors import UserError
from dcris.model import build_model

# (pattern, replacement) applied in order, first match wins; adapters first, since they nest inside blocks
_RULES: list[tuple[str, str]] = [
    (r"^dinov2\.blocks\.(\d+)\.adapter\.", r"vision.adapters.\1."),
    (r"^txt_backbone\.transformer\.resblocks\.(\d+)\.adapter\.", r"text.adapters.\1."),
    (r"^dinov2\.blocks\.(\d+)\.attn\.proj\.", r"vision.backbone.encoder.layer.\1.attention.o_proj."),
    (r"^dinov2\.blocks\.(\d+)\.ls([12])\.gamma$", r"vision.backbone.encoder.layer.\1.layer_scale\2.lambda1"),
    (r"^dinov2\.blocks\.(\d+)\.", r"vision.backbone.encoder.layer.\1."),
    (r"^dinov2\.cls_token$", "vision.backbone.embeddings.cls_token"),
    (r"^dinov2\.pos_embed$", "vision.backbone.embeddings.position_embeddings"),
    (r"^dinov2\.register_tokens$", "vision.backbone.embeddings.register_tokens"),
    (r"^dinov2\.mask_token$", "vision.backbone.embeddings.mask_token"),
    (r"^dinov2\.patch_embed\.proj\.", "vision.backbone.embeddings.patch_embeddings.projection."),
    (r"^dinov2\.norm\.", "vision.backbone.layernorm."),
    (r"^txt_backbone\.", "text."),
    (r"^(neck|decoder|proj)\.", r"head.\1."),
]
# inside an adapter: the released names of its parts
_ADAPTER_RULES: list[tuple[str, str]] = [
    (r"\.adapters\.(\d+)\.D_fc1\.", r".adapters.\1.down."),
    (r"\.adapters\.(\d+)\.D_fc2\.", r".adapters.\1.up."),
    (r"\.adapters\.(\d+)\.dense_branch(\d)\.", r".adapters.\1.dense.branch\2."),
]
_QKV = re.compile(r"^dinov2\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)$")


def rename_key(key: str) -> str | None:
    """Our name of a released key (None when no rule knows it)."""
    for pattern, repl in _RULES:
        new, n = re.subn(pattern, repl, key)
        if n:
            for a_pattern, a_repl in _ADAPTER_RULES:
                new = re.sub(a_pattern, a_repl, new)
            return new
    return None


def read_released_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """The state dict of a released ``.pth`` (bare, under ``state_dict``/``model``, with or without ``module.``)."""
    if not Path(path).is_file():
        raise UserError(f"checkpoint {path!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad input file
        raise UserError(f"cannot read checkpoint {path!r}: {exc}") from None
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"checkpoint {path!r} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def convert_detris_state_dict(released: dict[str, torch.Tensor], cfg: Config) -> dict[str, torch.Tensor]:
    """Maps a released DETRIS state dict onto the model ``cfg`` describes, checking every key and shape."""
    with torch.device("meta"):
        expected = build_model(cfg.model, pretrained=False).state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, value in released.items():
        qkv = _QKV.match(key)
        if qkv:
            block, kind = qkv.groups()
            for part, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3), strict=True):
                out[f"vision.backbone.encoder.layer.{block}.attention.{part}.{kind}"] = chunk.clone()
            continue
        new = rename_key(key)
        if new is None or new not in expected:
            raise UserError(f"unknown key {key!r} in the released checkpoint (not part of {cfg.preset})")
        out[new] = value
    if "text.positional_embedding" in out:
        out["text.positional_embedding"] = out["text.positional_embedding"][: cfg.model.text.positions]
    missing = sorted(set(expected) - set(out))
    if missing:
        raise UserError(f"the released checkpoint lacks {len(missing)} keys of {cfg.preset}, e.g. {missing[0]!r}")
    for key, value in out.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise UserError(
                f"key {key!r} has shape {tuple(value.shape)}, {cfg.preset} needs {tuple(expected[key].shape)}"
            )
    return out


def detect_preset(released: dict[str, torch.Tensor]) -> str:
    """detris-l when the checkpoint has 24 vision blocks, else detris-b."""
    blocks = {int(m.group(1)) for k in released if (m := re.match(r"dinov2\.blocks\.(\d+)\.", k))}
    return "detris-l" if len(blocks) == 24 else "detris-b"


def main(argv: list[str] | None = None) -> int:
    from dcris.export import save_export

    parser = argparse.ArgumentParser(prog="dcris convert-detris", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="released DETRIS .pth")
    parser.add_argument("out", help="output .safetensors (loadable by dcris predict / launch/eval.py)")
    parser.add_argument("--preset", choices=["detris-b", "detris-l"], help="default: detected from the checkpoint")
    args = parser.parse_args(argv)
    released = read_released_checkpoint(args.checkpoint)
    cfg = preset(args.preset or detect_preset(released))
    state = convert_detris_state_dict(released, cfg)
    save_export(state, cfg, args.out)
    print(f"converted {len(released)} released tensors -> {args.out} ({cfg.preset})")
    return 0
