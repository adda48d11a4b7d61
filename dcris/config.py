"""Typed configuration: nested dataclasses, named presets, strict overrides.

A run is described by one :class:`Config`. Presets (``dcris-b``, ``dcris-l``, ``detris-b``, ``detris-l``, the
paper's Table 2 rows and the tiny test presets) fill it; a YAML/JSON run file lists only what differs;
``key=value`` overrides come last. Unknown keys and wrong types are errors that name the key.
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
    fused_qkv: bool = False  # q, k and v of the frozen attention as one GEMM (weights stacked once at load)


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
    cross_width: int = 128  # width of the DA's cross-attention to the words (128 at every DA width, as released)
    cross_heads: int = 8  # heads of the DA's cross-attention to the words
    cross_dropout: float = 0.1  # dropout of that attention
    fused_dense: bool = False  # fused Triton dense branch (off until a GPU benchmark shows it winning)


@dataclass
class BaselineConfig:
    """A comparison method of the paper's Table 2 in the frozen backbones (dcris/baselines.py); "none" = DCRIS only."""

    method: str = "none"  # "none", "houlsby", "compacter", "lora" or "etris"
    every: int = 1  # the method sits in blocks i with (i + 1) % every == 0 (1: every block; 4: ETRIS's 3, 7, 11)
    hidden: int = 32  # bottleneck width (houlsby, compacter) or bridger width (etris)
    rank: int = 8  # LoRA rank; the rank of Compacter's factorised PHM weights
    phm_dim: int = 4  # Compacter's n: Kronecker factors per PHM layer (the shared rule is n x n x n)
    lora_alpha: float = 8.0  # LoRA scale numerator (scale = lora_alpha / rank)
    heads: int = 8  # attention heads of the ETRIS bridgers


@dataclass
class HeadConfig:
    """CRIS-style neck, vision-language decoder and projector (SPEC 2)."""

    width: int = 512  # neck / decoder width
    decoder_layers: int = 3  # pre-norm decoder layers
    decoder_heads: int = 8  # decoder attention heads
    ffn_dim: int = 512  # decoder feed-forward hidden width
    dropout: float = 0.1  # decoder dropout
    projector_dim: int = 256  # channels of the projector's last map (per-sample 3x3 kernel over them)
    channels_last: bool = False  # run the head's convolutions on channels-last maps
    single_key_gate: bool = False  # sentence gate as out_proj(v_proj(f_s)): its softmax over one key is always 1
    no_target: bool = False  # also a "no object" logit from the decoder state (gRefCOCO: phrases naming nothing)
    # weight of its cross-entropy beside the mask loss, and the class weights (a target, no target) of that
    # cross-entropy: ReLA's criterion weighs its no-target loss 0.1 with class weights (0.9, 1.1)
    no_target_loss_weight: float = 0.1
    no_target_class_weights: list[float] = field(default_factory=lambda: [0.9, 1.1])
    # probability of "no object" above which the model says a phrase names nothing; `dcris eval
    # --calibrate-no-target --save` writes the threshold best on a split here (an export without one keeps 0.5)
    no_target_threshold: float = 0.5


@dataclass
class ModelConfig:
    """Everything needed to build the model, and nothing else."""

    image_size: int = 448  # square letterbox input; a multiple of the patch size
    allow_download: bool = False  # fetch named weights from the hub when not cached locally
    compile: bool = False  # torch.compile the whole forward: one graph (and one backward graph) per step
    compile_mode: str = "default"  # torch.compile mode; "reduce-overhead": CUDA graphs (where BatchNorm allows)
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    adapters: AdapterConfig = field(default_factory=AdapterConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    train_backbones: bool = False  # train every backbone weight too (Table 2's full-tune row; ZeRO-3 at full size)
    head: HeadConfig = field(default_factory=HeadConfig)


@dataclass
class DataConfig:
    """Where the packed shards are and how they are read (SPEC 4)."""

    shards: str = ""  # OUT/NAME directory written by shards/pack.py (holds manifest.json)
    train_split: str = "train"  # split trained on
    eval_splits: list[str] = field(default_factory=lambda: ["val"])  # evaluated after the last step (+ train's)
    loader: str = "auto"  # "dali", "torch" or "auto" (DALI when it imports)
    workers: int = 2  # decoding threads / loader workers per rank
    hw_decoder_load: float = 0.65  # DALI on a GPU: share of the JPEGs for the hardware decoder (DALI's default)
    prefetch_depth: int = 2  # DALI: batches prepared ahead of the one trained on (DALI's default)
    shuffle_buffer: int = 1000  # units shuffled together (torch: the buffer; DALI: each permuted window)
    # What a training epoch visits once: "object" (one sentence drawn per object, as the released DETRIS trains
    # RefCOCO) or "sentence" (every (object, sentence) pair, as ReLA trains gRefCOCO: an epoch of sentences)
    sample: str = "object"
    seed: int = 0  # data order seed


@dataclass
class TrainConfig:
    """The recipe (SPEC 6) and the bookkeeping of a run."""

    output_dir: str = "runs/dcris"  # checkpoints, logs, exports, metrics
    epochs: int = 50  # passes over the train split
    global_batch: int = 32  # images per optimizer step over all ranks
    micro_batch: int = 32  # most images per rank per forward pass; fewer where the ranks' share is (docs/training.md)
    lr: float = 1e-4  # Adam learning rate
    weight_decay: float = 0.0  # Adam weight decay
    lr_milestones: list[int] = field(default_factory=lambda: [35])  # epochs at which the lr is multiplied
    lr_gamma: float = 0.1  # by this factor
    grad_clip: float = 0.0  # max gradient norm; 0 = no clipping
    precision: str = "bf16"  # autocast dtype of the forward passes: "bf16", "fp16" or "fp32"; weights stay fp32
    frozen_in_compute_dtype: bool = True  # bf16/fp16: frozen Linear/conv weights stored in it (same step, no casts)
    compute_dtype_residual: bool = False  # bf16/fp16: frozen LayerNorm/LayerScale/embeddings too, LayerNorm in it
    eval_splits: list[str] = field(default_factory=lambda: ["val"])  # splits evaluated during training
    eval_every_epochs: int = 1  # evaluate eval_splits every N epochs; 0 = only after the last step
    eval_every_steps: int = 0  # evaluate every N optimizer steps as well; 0 = only at eval_every_epochs
    eval_batch_size: int = 32  # evaluation images per forward pass on each rank
    eval_pictures: int = 8  # pairs of the first split of each evaluation drawn to TensorBoard; 0 = none
    log_every_steps: int = 10  # console / TensorBoard interval
    save_every_steps: int = 0  # checkpoint every N steps as well; 0 = only at epoch ends
    keep_checkpoints: int = 3  # newest checkpoints kept in output_dir/checkpoints (older ones deleted); 0 = all
    max_steps: int = 0  # stop after this many steps (0 = run all epochs)
    max_bad_steps: int = 10  # stop after this many steps in a row with a non-finite loss or gradients; 0 = never
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


@register_preset
def detris_l_mixed(cfg: Config) -> None:
    """The released DETRIS-L* (mixed-data training): adapters in every block from 1 on, 384 wide (SPEC 2)."""
    detris_l(cfg)
    a = cfg.model.adapters
    a.vision_layers, a.vision_hidden = list(range(1, cfg.model.vision.depth)), 384
    a.text_layers, a.text_hidden = list(range(1, cfg.model.text.layers)), 384


def _no_dcris_adapters(cfg: Config) -> None:
    """The DCRIS-B backbones, head and recipe without DenseCrossAdapters and TextAdapters (Table 2's other rows)."""
    dcris_b(cfg)
    cfg.model.adapters.vision_layers, cfg.model.adapters.text_layers = [], []


# Table 2 of the paper: DCRIS against other ways of tuning the same frozen DINOv2-B and CLIP text backbones, with the
# same head and recipe. Each method keeps its own design; its width or rank is chosen so that its count of added
# trainable parameters (the head excluded) lands within 3% of the paper's. Exact counts: `dcris params --preset NAME`.


@register_preset
def full_tune(cfg: Config) -> None:
    """Every backbone weight trains: 150,010,880 (paper 149.97M, +0.03%); run it with ds_configs/zero3.json."""
    _no_dcris_adapters(cfg)
    cfg.model.train_backbones = True


@register_preset
def fix_backbone(cfg: Config) -> None:
    """No adapters: the head alone trains (paper 0.00M)."""
    _no_dcris_adapters(cfg)


@register_preset
def houlsby(cfg: Config) -> None:
    """Houlsby adapters after attention and MLP of all 24 blocks, bottleneck 32: 1,998,336 (paper 1.98M, +0.93%)."""
    _no_dcris_adapters(cfg)
    b = cfg.model.baseline
    b.method, b.hidden = "houlsby", 32


@register_preset
def compacter(cfg: Config) -> None:
    """Compacter (n = 4, shared rule) in Houlsby's places, bottleneck 192, rank 20: 1,637,440 (paper 1.62M, +1.08%).

    Rank 1 (Compacter's own) cannot reach the paper's count at any sensible width (it would need a bottleneck of
    10,610), so the rank is the knob that was turned, as the paper describes.
    """
    _no_dcris_adapters(cfg)
    b = cfg.model.baseline
    b.method, b.hidden, b.rank, b.phm_dim = "compacter", 192, 20, 4


@register_preset
def lora(cfg: Config) -> None:
    """LoRA (peft) on the query, key and value projections of all 24 blocks, rank 20: 1,597,440 (1.57M, +1.75%)."""
    _no_dcris_adapters(cfg)
    b = cfg.model.baseline
    b.method, b.rank, b.lora_alpha = "lora", 20, 20.0


@register_preset
def etris(cfg: Config) -> None:
    """ETRIS bridgers after blocks 3, 7 and 11 of both encoders, width 128: 1,387,648 (paper 1.38M, +0.55%)."""
    _no_dcris_adapters(cfg)
    b = cfg.model.baseline
    b.method, b.every, b.hidden, b.heads = "etris", 4, 128, 8


@register_preset
def dcris_b_gres(cfg: Config) -> None:
    """DCRIS-B with the no-target output, for gRefCOCO (configs/dcris-b_grefcoco.yaml)."""
    dcris_b(cfg)
    cfg.model.head.no_target = True


@register_preset
def dcris_b_3da(cfg: Config) -> None:
    """DCRIS-B with DenseCrossAdapters and TextAdapters at blocks 4, 8 and 11: 1,347,024 (paper 1.34M, +0.52%)."""
    dcris_b(cfg)
    cfg.model.adapters.vision_layers, cfg.model.adapters.text_layers = [4, 8, 11], [4, 8, 11]


def _tiny(cfg: Config) -> None:
    """Four-block, width-64 backbones and a narrow head: random init, seconds on a CPU."""
    v, t, a, h = cfg.model.vision, cfg.model.text, cfg.model.adapters, cfg.model.head
    cfg.model.image_size = 112
    v.width, v.depth, v.heads, v.taps, v.pretrained_size = 64, 4, 4, [1, 2], 126  # 9x9 -> 8x8: interpolated
    t.width, t.heads, t.layers, t.embed_dim, t.positions = 64, 4, 4, 64, 17
    a.vision_layers, a.text_layers, a.vision_hidden, a.text_hidden = [1, 3], [1, 3], 32, 16
    a.cross_width, a.cross_heads = 32, 4
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


def apply_overrides(cfg: Config, overrides: list[str] | None) -> Config:
    """Applies ``section.key=value`` overrides to a built config (e.g. one read from an export) and validates it."""
    for ov in overrides or []:
        apply_override(cfg, ov)
    validate(cfg)
    return cfg


def load_config(path: str | None = None, preset_name: str | None = None, overrides: list[str] | None = None) -> Config:
    """Builds a Config: preset (from the file's ``preset`` key, the argument, or dcris-b), file, then overrides."""
    values: dict[str, Any] = {}
    if path:
        values = read_config_file(path)
    name = preset_name or values.pop("preset", None) or "dcris-b"
    values.pop("preset", None)
    cfg = preset(name)
    apply_dict(cfg, values)
    return apply_overrides(cfg, overrides)


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


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
SAMPLING = ("object", "sentence")  # data.sample: what a training epoch visits once (dcris.data.common)


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
    _validate_adapters(m)
    _validate_baseline(m)
    if cfg.train.precision not in ("bf16", "fp16", "fp32"):
        raise ConfigError(f"train.precision must be bf16, fp16 or fp32, got {cfg.train.precision!r}")
    if cfg.train.eval_every_epochs < 0 or cfg.train.eval_batch_size < 1:
        raise ConfigError(
            f"train.eval_every_epochs ({cfg.train.eval_every_epochs}) must be >= 0 and "
            f"train.eval_batch_size ({cfg.train.eval_batch_size}) >= 1"
        )
    if m.compile_mode not in COMPILE_MODES:
        raise ConfigError(f"model.compile_mode must be one of {', '.join(COMPILE_MODES)}, got {m.compile_mode!r}")
    if cfg.data.loader not in ("auto", "dali", "torch"):
        raise ConfigError(f"data.loader must be auto, dali or torch, got {cfg.data.loader!r}")
    if cfg.data.sample not in SAMPLING:
        raise ConfigError(f"data.sample must be {' or '.join(SAMPLING)}, got {cfg.data.sample!r}")
    if not 0 < m.head.no_target_threshold < 1:
        raise ConfigError(f"model.head.no_target_threshold must lie in (0, 1), got {m.head.no_target_threshold}")
    weights = m.head.no_target_class_weights
    if len(weights) != 2 or min(weights) <= 0 or m.head.no_target_loss_weight < 0:
        raise ConfigError(
            f"model.head.no_target_class_weights must be two positive numbers (a target, no target), got {weights}, "
            f"and model.head.no_target_loss_weight >= 0, got {m.head.no_target_loss_weight}"
        )


def _validate_adapters(m: ModelConfig) -> None:
    """Widths the DenseCrossAdapter and TextAdapter can be built with (Table 4's switches)."""
    a = m.adapters
    if a.vision_layers and (a.vision_hidden < 16 or a.vision_hidden % 16 or a.vision_hidden % a.cross_heads):
        raise ConfigError(
            f"model.adapters.vision_hidden {a.vision_hidden} must be a positive multiple of 16 (the dense branch "
            f"splits it in 2, 4 and 16) and of model.adapters.cross_heads {a.cross_heads}"
        )
    if a.text_layers and a.text_hidden < 1:
        raise ConfigError(f"model.adapters.text_hidden must be positive, got {a.text_hidden}")
    if a.text_layers and a.text_form == "released" and a.text_hidden % 16:
        raise ConfigError(f"model.adapters.text_hidden {a.text_hidden} must be a multiple of 16 for the released form")


BASELINE_METHODS = ("none", "houlsby", "compacter", "lora", "etris")


def _validate_baseline(m: ModelConfig) -> None:
    """Settings each Table 2 method can be built with."""
    b = m.baseline
    if b.method not in BASELINE_METHODS:
        raise ConfigError(f"model.baseline.method must be one of {', '.join(BASELINE_METHODS)}, got {b.method!r}")
    if b.method == "none":
        return
    for key in ("every", "hidden", "rank", "phm_dim", "heads"):
        if getattr(b, key) < 1:
            raise ConfigError(f"model.baseline.{key} must be positive, got {getattr(b, key)}")
    if b.every > min(m.vision.depth, m.text.layers):
        raise ConfigError(f"model.baseline.every {b.every} leaves no block: the encoders have fewer blocks")
    if b.method == "lora" and m.vision.fused_qkv:
        raise ConfigError("lora adapts the separate q/k/v projections: set model.vision.fused_qkv=false")
    if b.method == "compacter":
        widths = (m.vision.width, m.text.width, b.hidden)
        if any(w % b.phm_dim for w in widths):
            raise ConfigError(
                f"compacter: the widths {widths} (vision, text, model.baseline.hidden) must all be multiples of "
                f"model.baseline.phm_dim {b.phm_dim}"
            )
    if b.method == "etris":
        if m.vision.depth != m.text.layers:
            raise ConfigError(
                f"etris bridges the encoders block by block: model.vision.depth {m.vision.depth} must equal "
                f"model.text.layers {m.text.layers}"
            )
        if m.adapters.vision_layers:
            raise ConfigError(
                "etris runs both encoders together, so no DenseCrossAdapter can attend to the final words: "
                "set model.adapters.vision_layers=[]"
            )
        if b.hidden % b.heads:
            raise ConfigError(f"model.baseline.hidden {b.hidden} must be a multiple of model.baseline.heads {b.heads}")


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
    "BaselineConfig",
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
    "apply_overrides",
    "from_dict",
    "load_config",
    "preset",
    "to_dict",
    "validate",
]
