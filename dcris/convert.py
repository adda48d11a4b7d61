"""``dcris convert-detris``: import the authors' released DETRIS checkpoints onto the detris-b / detris-l presets.

The released state dict (``shared/reference/detris_b_state_dict.tsv`` lists DETRIS-B's keys) uses DINOv2's
original layout (``dinov2.blocks.N.attn.qkv``), open_clip's text layout (``txt_backbone.*``) and the head's
names (``neck.*``, ``decoder.*``, ``proj.*``). Every key is renamed by the rules below; the fused ``qkv`` is
split into transformers' q/k/v projections. An unknown, missing or mis-shaped key is an error naming it. The
layout (DETRIS-B, DETRIS-L, or DETRIS-L* trained on mixed data) is recognised from the keys and shapes.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import Dinov2WithRegistersModel

from dcris.config import Config, preset, validate
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


# the released layouts, tried in this order when the checkpoint's own layout is to be recognised
RELEASED_PRESETS = ("detris-b", "detris-l", "detris-l-mixed")


def _expected_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """Every state-dict key of the model ``cfg`` describes, with its shape (built on the meta device)."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in build_model(cfg.model, pretrained=False).state_dict().items()}


def _renamed(released: dict[str, torch.Tensor], cfg: Config) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Our tensors of a released state dict (fused qkv split) and, per our key, the released key it came from.

    A released key no rule knows maps to itself, so that the fit check reports it as unknown.
    """
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for key, value in released.items():
        qkv = _QKV.match(key)
        if qkv:
            block, kind = qkv.groups()
            for part, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3), strict=True):
                new = f"vision.backbone.encoder.layer.{block}.attention.{part}.{kind}"
                out[new], origin[new] = chunk.clone(), key
            continue
        new = rename_key(key) or key
        out[new], origin[new] = value, key
    if "text.positional_embedding" in out:
        out["text.positional_embedding"] = out["text.positional_embedding"][: cfg.model.text.positions]
    return out, origin


def _first_misfit(released: dict[str, torch.Tensor], cfg: Config) -> str | None:
    """Why ``released`` does not fit ``cfg``, naming the first key that does not fit; None when it fits."""
    expected = _expected_shapes(cfg)
    out, origin = _renamed(released, cfg)
    unknown = [k for k in out if k not in expected]
    if unknown:
        return f"unknown key {origin[unknown[0]]!r} in the released checkpoint (not part of {cfg.preset})"
    missing = sorted(set(expected) - set(out))
    if missing:
        return f"the released checkpoint lacks {len(missing)} keys of {cfg.preset}, e.g. {missing[0]!r}"
    for key, value in out.items():
        if tuple(value.shape) != expected[key]:
            return f"key {origin[key]!r} has shape {tuple(value.shape)}, {cfg.preset} needs {expected[key]} (for {key})"
    return None


def convert_detris_state_dict(released: dict[str, torch.Tensor], cfg: Config) -> dict[str, torch.Tensor]:
    """Maps a released DETRIS state dict onto the model ``cfg`` describes, checking every key and shape.

    Raises:
        UserError: a key is unknown, missing or mis-shaped for ``cfg``; the message names the first.
    """
    misfit = _first_misfit(released, cfg)
    if misfit:
        raise UserError(misfit)
    return _renamed(released, cfg)[0]


def detect_preset(released: dict[str, torch.Tensor]) -> str:
    """The released layout (detris-b, detris-l or detris-l-mixed) whose every key and shape the checkpoint fits.

    Raises:
        UserError: it fits none; the message names the first key that does not fit the closest layout (the one
            with the same number of vision blocks, else DETRIS-B).
    """
    misfits = {}
    for name in RELEASED_PRESETS:
        misfits[name] = _first_misfit(released, preset(name))
        if misfits[name] is None:
            return name
    blocks = {int(m.group(1)) for k in released if (m := re.match(r"dinov2\.blocks\.(\d+)\.", k))}
    closest = next((n for n in RELEASED_PRESETS if preset(n).model.vision.depth == len(blocks)), RELEASED_PRESETS[0])
    raise UserError(f"the checkpoint fits no released layout ({', '.join(RELEASED_PRESETS)}): {misfits[closest]}")


def backbone_paths(folder: Path) -> tuple[Path, Path]:
    """Where :func:`write_backbones` puts the vision folder and the text file under ``folder``."""
    return folder / "dinov2", folder / "clip_text.safetensors"


def write_backbones(state: dict[str, torch.Tensor], cfg: Config, folder: Path) -> tuple[Path, Path]:
    """Writes the checkpoint's own frozen backbones in the formats the loaders read.

    The vision backbone becomes a transformers DINOv2-with-registers folder (``save_pretrained``), the text
    backbone an open_clip-format state dict (``clip_text.safetensors``, open_clip's key names).

    Returns:
        The vision folder and the text file.
    """
    from safetensors.torch import save_file

    from dcris.vision import hf_vision_config

    vision_dir, text_file = backbone_paths(folder)
    backbone = Dinov2WithRegistersModel(hf_vision_config(cfg.model.vision))
    prefix = "vision.backbone."
    backbone.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
    backbone.save_pretrained(vision_dir)
    text = {k[len("text.") :]: v.contiguous() for k, v in state.items() if k.startswith("text.")}
    save_file({k: v for k, v in text.items() if not k.startswith("adapters.")}, str(text_file))
    return vision_dir, text_file


def main(argv: list[str] | None = None) -> int:
    from dcris.export import save_export

    parser = argparse.ArgumentParser(prog="dcris convert-detris", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="released DETRIS .pth")
    parser.add_argument("out", help="output export folder (loadable by dcris predict / dcris eval / dcris app)")
    parser.add_argument(
        "--preset", help=f"target preset (default: recognised from the checkpoint's keys and shapes: "
        f"{', '.join(RELEASED_PRESETS)})",
    )  # fmt: skip
    parser.add_argument(
        "--context-length", type=int, default=17,
        help="tokens per sentence the checkpoint was trained with: 22 for the released G-Ref umd models, else 17",
    )  # fmt: skip
    parser.add_argument(
        "--backbones", metavar="DIR",
        help="also write the checkpoint's own frozen backbones to DIR (DIR/dinov2, DIR/clip_text.safetensors) and "
        "record them in the export, so that it loads with no hub at all; a DIR inside the export folder is recorded "
        "relative to it",
    )  # fmt: skip
    args = parser.parse_args(argv)
    released = read_released_checkpoint(args.checkpoint)
    cfg = preset(args.preset or detect_preset(released))
    if cfg.model.adapters.text_form != "released":
        raise UserError(f"preset {cfg.preset!r} has paper-form text adapters; released checkpoints need a detris-* one")
    cfg.model.text.context_length = args.context_length
    validate(cfg)
    state = convert_detris_state_dict(released, cfg)
    into_export: Callable[[Path], None] | None = None
    if args.backbones:
        folder, out = Path(args.backbones).resolve(), Path(args.out).resolve()
        if folder.is_relative_to(out):  # written into the new export folder, before it replaces an earlier one

            def into_export(new_folder: Path) -> None:
                write_backbones(state, cfg, new_folder / folder.relative_to(out))

        else:
            write_backbones(state, cfg, folder)
        vision_dir, text_file = backbone_paths(folder)
        cfg.model.vision.weights, cfg.model.text.weights = str(vision_dir), str(text_file)
    save_export(state, cfg, args.out, extra=into_export)
    if args.backbones:
        print(f"wrote the frozen backbones: {vision_dir} and {text_file}")
    print(f"converted {len(released)} released tensors -> {args.out} ({cfg.preset})")
    return 0
