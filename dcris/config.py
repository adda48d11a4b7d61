"""Typed configuration: nested dataclasses, named presets, strict overrides.

A run is described by one :class:`Config`. Presets (``dcris-b``, ``dcris-l``, ``detris-b``, ``detris-l`` and
the tiny test presets) fill it; a YAML/JSON run file lists only what differs; ``key=value`` overrides come
last. Unknown keys and wrong types are errors that name the key.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dcris.errors import UserError


class ConfigError(UserError, ValueError):
    """A user mistake in a config file, preset name or override."""


@dataclass
class VisionConfig:
    """Frozen DINOv2-with-registers vision transformer (SPEC 2)."""

    weights: str = ""  # Hugging Face model id or local directory; "" = random init (nothing is downloaded)
    width: int = 768  # token width (L: 1024)
    depth: int = 12  # number of blocks (L: 24)
    heads: int = 12  # attention heads (L: 16)
    mlp_ratio: int = 4  # MLP hidden = width * mlp_ratio
    patch_size: int = 14  # ViT/14
    num_registers: int = 4  # register tokens between cls and patches
    pretrained_size: int = 518  # image size the position embedding was trained for (37x37 patches)
    layerscale_init: float = 1.0  # LayerScale init value (weights overwrite it)
    taps: list[int] = field(default_factory=lambda: [4, 8])  # 0-based blocks whose outputs feed the neck


@dataclass
class TextConfig:
    """Frozen CLIP text transformer (SPEC 2)."""

    model_name: str = "ViT-B-16"  # open_clip architecture name whose text tower is used
    weights: str = ""  # open_clip pretrained tag (e.g. "openai") or a local checkpoint file; "" = random init
    width: int = 512  # transformer width
    heads: int = 8  # attention heads
    layers: int = 12  # transformer blocks
    vocab_size: int = 49408  # BPE vocabulary
    embed_dim: int = 512  # text_projection output width
    context_length: int = 17  # tokens per sentence ("word_len"): start, BPE, end, zero padding
    positions: int = 77  # rows of the stored position embedding (CLIP's 77); the first context_length are used
    quick_gelu: bool = True  # OpenAI CLIP weights were trained with QuickGELU


@dataclass
class AdapterConfig:
    """Trainable adapters: DenseCrossAdapter in vision blocks, TextAdapter in text blocks (SPEC 2)."""

    vision_layers: list[int] = field(default_factory=lambda: [1, 3, 5, 7, 9, 11])  # 0-based; [] = no DA
    vision_hidden: int = 128  # DA bottleneck width
    text_layers: list[int] = field(default_factory=lambda: [1, 3, 5, 7, 9, 11])  # 0-based; [] = no TA
    text_hidden: int = 64  # TA bottleneck width
    text_form: str = "paper"  # "paper": Linear-ReLU-Linear; "released": with the 1-D dense branch of DETRIS
    scale: float = 0.2  # adapter output scale
    cross_heads: int = 8  # heads of the DA's cross-attention to the words
    cross_dropout: float = 0.1  # dropout of that attention
    fused_dense: bool = True  # use the fused Triton dense branch on CUDA (False forces the PyTorch path)


@dataclass
class HeadConfig:
    """CRIS-style neck, vision-language decoder and projector (SPEC 2)."""

    width: int = 512  # neck / decoder width
    decoder_layers: int = 3  # pre-norm decoder layers
    decoder_heads: int = 8  # decoder attention heads
    ffn_dim: int = 512  # decoder feed-forward hidden width
    dropout: float = 0.1  # decoder dropout
    projector_dim: int = 256  # channels of the projector's last map (per-sample 3x3 kernel over them)


@dataclass
class ModelConfig:
    """Everything needed to build the model, and nothing else."""

    image_size: int = 448  # square letterbox input; a multiple of the patch size
    allow_download: bool = False  # fetch named weights from the hub when not cached locally
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    adapters: AdapterConfig = field(default_factory=AdapterConfig)
    head: HeadConfig = field(default_factory=HeadConfig)


@dataclass
class DataConfig:
    """Where the packed shards are and how they are read (SPEC 4)."""

    shards: str = ""  # OUT/NAME directory written by shards/pack.py (holds manifest.json)
    train_split: str = "train"  # split trained on
    eval_splits: list[str] = field(default_factory=lambda: ["val"])  # evaluated after the last step (+ train's)
    loader: str = "auto"  # "dali", "torch" or "auto" (DALI when it imports)
    workers: int = 2  # decoding threads / loader workers per rank
    shuffle_buffer: int = 1000  # samples in the shuffle buffer
    seed: int = 0  # data order seed


@dataclass
class TrainConfig:
    """The recipe (SPEC 6) and the bookkeeping of a run."""

    output_dir: str = "runs/dcris"  # checkpoints, logs, exports, metrics
    epochs: int = 50  # passes over the train split
    global_batch: int = 32  # images per optimizer step over all ranks
    micro_batch: int = 16  # images per rank per forward pass
    lr: float = 1e-4  # Adam learning rate
    weight_decay: float = 0.0  # Adam weight decay
    lr_milestones: list[int] = field(default_factory=lambda: [35])  # epochs at which the lr is multiplied
    lr_gamma: float = 0.1  # by this factor
    grad_clip: float = 0.0  # max gradient norm; 0 = no clipping
    precision: str = "bf16"  # autocast dtype of the forward passes: "bf16", "fp16" or "fp32"; weights stay fp32
    eval_splits: list[str] = field(default_factory=lambda: ["val"])  # splits evaluated during training
    eval_every_epochs: int = 1  # evaluate eval_splits every N epochs; 0 = only after the last step
    eval_every_steps: int = 0  # evaluate every N optimizer steps as well; 0 = only at eval_every_epochs
    eval_batch_size: int = 32  # evaluation images per forward pass on each rank
    log_every_steps: int = 10  # console / TensorBoard interval
    save_every_steps: int = 0  # checkpoint every N steps as well; 0 = only at epoch ends
    keep_checkpoints: int = 3  # newest checkpoints kept in output_dir/checkpoints (older ones deleted); 0 = all
    max_steps: int = 0  # stop after this many steps (0 = run all epochs)
    seed: int = 0  # model init and sentence sampling seed


@dataclass
class Config:
    """One run: the preset it started from, the model, the data and the recipe."""

    preset: str = "dcris-b"  # preset this config was built from (recorded in checkpoints and exports)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ----------------------------------------------------------------------------------------------- presets

PRESETS: dict[str, Callable[[], Config]] = {}


def register_preset(fn: Callable[[Config], None]) -> Callable[[Config], None]:
    """Registers ``fn`` (which edits a default Config) under its name with ``_`` read as ``-``."""
    name = fn.__name__.replace("_", "-")

    def build() -> Config:
        cfg = Config(preset=name)
        fn(cfg)
        return cfg

    PRESETS[name] = build
    return fn


def _large(cfg: Config) -> None:
    v = cfg.model.vision
    v.width, v.depth, v.heads, v.taps = 1024, 24, 16, [8, 16]
    cfg.model.adapters.vision_layers = [2, 6, 10, 14, 18, 22]
    cfg.train.lr, cfg.train.global_batch = 2e-4, 64


@register_preset
def dcris_b(cfg: Config) -> None:
    cfg.model.vision.weights = "facebook/dinov2-with-registers-base"
    cfg.model.text.weights = "openai"


@register_preset
def dcris_l(cfg: Config) -> None:
    _large(cfg)
    cfg.model.vision.weights = "facebook/dinov2-with-registers-large"
    cfg.model.text.weights = "openai"


@register_preset
def detris_b(cfg: Config) -> None:
    dcris_b(cfg)
    cfg.model.adapters.text_form = "released"


@register_preset
def detris_l(cfg: Config) -> None:
    dcris_l(cfg)
    cfg.model.adapters.text_form = "released"


def _tiny(cfg: Config) -> None:
    """Two-block, width-64 backbones and a narrow head: random init, seconds on a CPU."""
    v, t, a, h = cfg.model.vision, cfg.model.text, cfg.model.adapters, cfg.model.head
    cfg.model.image_size = 112
    v.width, v.depth, v.heads, v.taps, v.pretrained_size = 64, 4, 4, [1, 2], 126  # 9x9 -> 8x8: interpolated
    t.width, t.heads, t.layers, t.embed_dim, t.positions = 64, 4, 4, 64, 17
    a.vision_layers, a.text_layers, a.vision_hidden, a.text_hidden, a.cross_heads = [1, 3], [1, 3], 32, 16, 4
    h.width, h.decoder_layers, h.decoder_heads, h.ffn_dim, h.projector_dim = 64, 1, 4, 64, 32
    cfg.train.micro_batch, cfg.train.global_batch, cfg.train.lr = 8, 8, 1e-3


@register_preset
def tiny_dcris(cfg: Config) -> None:
    _tiny(cfg)


@register_preset
def tiny_detris(cfg: Config) -> None:
    _tiny(cfg)
    cfg.model.adapters.text_form = "released"


# ----------------------------------------------------------------------------------------------- loading


def preset(name: str) -> Config:
    """Returns a fresh Config of the named preset."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Checks ``value`` against the annotation ``tp``; converts the harmless cases (int -> float, str -> list)."""
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()] if value.strip() not in ("", "[]") else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r} expects a list, got {value!r}")
        return [_coerce(v, item_tp, key) for v in value]
    if tp is bool:
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise ConfigError(f"config key {key!r} expects true/false, got {value!r}")
        return value
    if tp in (int, float):
        kind = "an integer" if tp is int else "a number"
        if isinstance(value, str):
            try:
                value = tp(value) if tp is float else int(value)
            except ValueError:
                raise ConfigError(f"config key {key!r} expects {kind}, got {value!r}") from None
        not_integral = tp is int and not float(value).is_integer()
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not_integral:
            raise ConfigError(f"config key {key!r} expects {kind}, got {value!r}")
        return tp(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key {key!r} expects a string, got {value!r}")
        return value
    raise ConfigError(f"config key {key!r} has an unsupported type {tp}")


def _field_types(obj: Any) -> dict[str, Any]:
    return typing.get_type_hints(type(obj))


def apply_dict(obj: Any, values: dict[str, Any], prefix: str = "") -> None:
    """Recursively sets ``values`` (nested dicts) on dataclass ``obj``; unknown keys are errors."""
    types_ = _field_types(obj)
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in types_:
            raise ConfigError(f"unknown config key {full!r}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {full!r} is a section; expected a mapping, got {value!r}")
            apply_dict(current, value, prefix=f"{full}.")
        else:
            setattr(obj, key, _coerce(value, types_[key], full))


def apply_override(cfg: Config, override: str) -> None:
    """Applies one ``section.key=value`` override (lists as ``a,b,c``; ``[]`` for an empty list)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not of the form key=value")
    key, value = override.split("=", 1)
    parts = key.strip().split(".")
    nested: dict[str, Any] = {parts[-1]: value.strip()}
    for part in reversed(parts[:-1]):
        nested = {part: nested}
    apply_dict(cfg, nested)


def load_config(path: str | None = None, preset_name: str | None = None, overrides: list[str] | None = None) -> Config:
    """Builds a Config: preset (from the file's ``preset`` key, the argument, or dcris-b), file, then overrides."""
    values: dict[str, Any] = {}
    if path:
        values = read_config_file(path)
    name = preset_name or values.pop("preset", None) or "dcris-b"
    values.pop("preset", None)
    cfg = preset(name)
    apply_dict(cfg, values)
    for ov in overrides or []:
        apply_override(cfg, ov)
    validate(cfg)
    return cfg


def read_config_file(path: str) -> dict[str, Any]:
    """Reads a YAML or JSON run file into a dict."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {path!r} does not exist")
    text = p.read_text()
    try:
        if p.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # noqa: BLE001 - any parse error is a user mistake in the file
        raise ConfigError(f"config file {path!r} cannot be parsed: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping at the top level")
    return data


def validate(cfg: Config) -> None:
    """Checks values that types alone cannot."""
    m = cfg.model
    if m.image_size % m.vision.patch_size:
        raise ConfigError(f"model.image_size {m.image_size} is not a multiple of the patch size {m.vision.patch_size}")
    for name, layers, depth in (
        ("model.adapters.vision_layers", m.adapters.vision_layers, m.vision.depth),
        ("model.adapters.text_layers", m.adapters.text_layers, m.text.layers),
        ("model.vision.taps", m.vision.taps, m.vision.depth),
    ):
        bad = [i for i in layers if not 0 <= i < depth]
        if bad or len(set(layers)) != len(layers):
            raise ConfigError(f"{name} {layers} must be distinct block indices in [0, {depth})")
    if len(m.vision.taps) != 2:
        raise ConfigError("model.vision.taps must name exactly two blocks (the third map is the final output)")
    if m.adapters.text_form not in ("paper", "released"):
        raise ConfigError(f"model.adapters.text_form must be 'paper' or 'released', got {m.adapters.text_form!r}")
    if cfg.train.precision not in ("bf16", "fp16", "fp32"):
        raise ConfigError(f"train.precision must be bf16, fp16 or fp32, got {cfg.train.precision!r}")
    if cfg.train.eval_every_epochs < 0 or cfg.train.eval_batch_size < 1:
        raise ConfigError(
            f"train.eval_every_epochs ({cfg.train.eval_every_epochs}) must be >= 0 and "
            f"train.eval_batch_size ({cfg.train.eval_batch_size}) >= 1"
        )
    if cfg.data.loader not in ("auto", "dali", "torch"):
        raise ConfigError(f"data.loader must be auto, dali or torch, got {cfg.data.loader!r}")


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain nested dicts (for JSON, checkpoints and exports)."""
    return dataclasses.asdict(cfg)


def from_dict(values: dict[str, Any]) -> Config:
    """Rebuilds a Config written by :func:`to_dict` (strictly: unknown keys are errors)."""
    values = dict(values)
    cfg = Config(preset=values.pop("preset", "dcris-b"))
    apply_dict(cfg, values)
    validate(cfg)
    return cfg


__all__ = [
    "AdapterConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "HeadConfig",
    "ModelConfig",
    "PRESETS",
    "TextConfig",
    "TrainConfig",
    "VisionConfig",
    "apply_override",
    "from_dict",
    "load_config",
    "preset",
    "to_dict",
    "validate",
]
