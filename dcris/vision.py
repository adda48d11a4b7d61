"""Frozen DINOv2-with-registers vision encoder with DenseCrossAdapters (SPEC 2).

The weights and modules are transformers' ``Dinov2WithRegistersModel`` (loaded with ``from_pretrained`` from a
hub id or a local directory); the token embedding and the block loop are ours: the adapters sit parallel to each
MLP, every attention goes through :func:`dcris.attention.attention`, and the position embedding is resized the
way DINOv2's own code does it (:func:`dinov2_position_embeddings`), as the released model was trained.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

from dcris.adapters import DenseCrossAdapter
from dcris.attention import attention
from dcris.config import AdapterConfig, ConfigError, VisionConfig


def hf_vision_config(cfg: VisionConfig) -> Dinov2WithRegistersConfig:
    """The transformers config of a randomly initialised backbone of ``cfg``'s shape."""
    return Dinov2WithRegistersConfig(
        hidden_size=cfg.width,
        num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.heads,
        mlp_ratio=cfg.mlp_ratio,
        patch_size=cfg.patch_size,
        image_size=cfg.pretrained_size,
        num_register_tokens=cfg.num_registers,
        layerscale_value=cfg.layerscale_init,
    )


def load_vision_backbone(cfg: VisionConfig, pretrained: bool, allow_download: bool) -> Dinov2WithRegistersModel:
    """Builds the backbone: ``from_pretrained(cfg.weights)`` when ``pretrained`` and weights are named, else random.

    Raises:
        ConfigError: the weights cannot be found, or their shape differs from ``cfg``.
    """
    if not (pretrained and cfg.weights):
        return Dinov2WithRegistersModel(hf_vision_config(cfg))
    try:
        model = Dinov2WithRegistersModel.from_pretrained(cfg.weights, local_files_only=not allow_download)
    except OSError as exc:
        hint = "" if allow_download else " (pass model.allow_download=true to fetch it from the hub)"
        raise ConfigError(f"cannot load vision weights {cfg.weights!r}: {exc}{hint}") from None
    got = model.config
    want = (cfg.width, cfg.depth, cfg.heads, cfg.patch_size, cfg.num_registers)
    have = (got.hidden_size, got.num_hidden_layers, got.num_attention_heads, got.patch_size, got.num_register_tokens)
    if want != have:
        raise ConfigError(
            f"vision weights {cfg.weights!r} have (width, depth, heads, patch, registers) = {have}, config says {want}"
        )
    return model


# DINOv2's interpolate_offset: the grid is resized by the factor (n + 0.1) / M, not to n exactly
INTERPOLATE_OFFSET = 0.1


def dinov2_position_embeddings(position_embeddings: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The position embedding of a ``grid`` of patches, resized as DINOv2's ``interpolate_pos_encoding`` does.

    The stored M x M grid (37 x 37 for 518 px) is resized bicubic, antialiasing off, with the scale factors
    ``(n + 0.1) / M`` per axis; the output has n rows (the floor of M times the factor), but the sampling positions
    follow the factor, not n / M. transformers' DINOv2-with-registers resizes to exactly n x n with antialiasing
    on instead, which differs by 1-9% on smooth embeddings (SPEC 2). The cls embedding is kept; the stored grid
    is returned as it is when it already has the asked size. Computed in fp32, returned in the stored dtype.

    Args:
        position_embeddings: (1, 1 + M*M, C): the cls embedding, then the M x M grid row by row.
        grid: (rows, columns) of patches of the input.

    Returns:
        (1, 1 + rows*columns, C).
    """
    cls_embedding, patches = position_embeddings[:, :1], position_embeddings[:, 1:]
    side = round(patches.shape[1] ** 0.5)
    if tuple(grid) == (side, side):
        return position_embeddings
    dim = patches.shape[-1]
    square = patches.float().reshape(1, side, side, dim).permute(0, 3, 1, 2)  # (1, C, M, M)
    factors = tuple((n + INTERPOLATE_OFFSET) / side for n in grid)
    resized = F.interpolate(square, scale_factor=factors, mode="bicubic", antialias=False)  # (1, C, rows, cols)
    if tuple(resized.shape[-2:]) != tuple(grid):
        raise ValueError(f"position embedding of {side}x{side} resized to {tuple(resized.shape[-2:])}, not {grid}")
    resized = resized.permute(0, 2, 3, 1).reshape(1, -1, dim).to(position_embeddings.dtype)  # (1, rows*cols, C)
    return torch.cat([cls_embedding, resized], dim=1)


def vision_block(
    layer: nn.Module,
    adapter: DenseCrossAdapter | None,
    x: torch.Tensor,
    words: torch.Tensor,
    grid: tuple[int, int],
    heads: int,
    scale: float,
) -> torch.Tensor:
    """One DINOv2 block with its DenseCrossAdapter parallel to the MLP (SPEC 2); x (B, N, C) -> (B, N, C).

    ``x + ls1(attn(norm1(x)))``, then ``x + ls2(mlp(norm2(x)) + scale * DA(norm2(x), f_t))``.
    """
    att = layer.attention
    b, n, c = x.shape
    y = layer.norm1(x)
    if hasattr(att, "qkv"):  # fused: one (3C x C) GEMM
        q, k, v = att.qkv(y).view(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)  # 3 x (B, H, N, C/H)
    else:
        q, k, v = (p(y).view(b, n, heads, -1).transpose(1, 2) for p in (att.q_proj, att.k_proj, att.v_proj))
    y = att.o_proj(attention(q, k, v).transpose(1, 2).reshape(b, n, c))  # (B, N, C)
    x = x + layer.layer_scale1(y)
    y = layer.norm2(x)
    branch = layer.mlp(y)
    if adapter is not None:
        branch = branch + scale * adapter(y, words, grid)
    return x + layer.layer_scale2(branch)


_QKV_NAMES = ("q_proj", "k_proj", "v_proj")


def _split_qkv(module: nn.Module, state: dict, prefix: str, _metadata: dict) -> None:
    """State-dict post-hook of a fused attention: its ``qkv`` tensors saved as transformers' q/k/v keys."""
    for kind in ("weight", "bias"):
        fused = state.pop(f"{prefix}qkv.{kind}")
        for name, part in zip(_QKV_NAMES, fused.chunk(3), strict=True):
            state[f"{prefix}{name}.{kind}"] = part


def _join_qkv(module: nn.Module, state: dict, prefix: str, *_args: object) -> None:
    """Load pre-hook of a fused attention: transformers' q/k/v keys read into its ``qkv``."""
    for kind in ("weight", "bias"):
        keys = [f"{prefix}{name}.{kind}" for name in _QKV_NAMES]
        if all(k in state for k in keys):
            state[f"{prefix}qkv.{kind}"] = torch.cat([state.pop(k) for k in keys])


def fuse_qkv(attention_module: nn.Module) -> None:
    """Replaces a DINOv2 attention's q, k and v projections by one Linear holding the three, stacked.

    One GEMM instead of three. The state dict keeps transformers' ``q_proj``/``k_proj``/``v_proj`` keys (split
    on save, joined on load), so checkpoints, exports and the converter see the same layout either way.
    """
    parts = [getattr(attention_module, name) for name in _QKV_NAMES]
    first = parts[0].weight
    qkv = nn.Linear(first.shape[1], 3 * first.shape[0], device=first.device, dtype=first.dtype)
    with torch.no_grad():
        qkv.weight.copy_(torch.cat([p.weight for p in parts]))  # (3C, C)
        qkv.bias.copy_(torch.cat([p.bias for p in parts]))  # (3C,)
    qkv.requires_grad_(first.requires_grad)
    for name in _QKV_NAMES:
        delattr(attention_module, name)
    attention_module.qkv = qkv
    attention_module.register_state_dict_post_hook(_split_qkv)
    attention_module.register_load_state_dict_pre_hook(_join_qkv)


class VisionEncoder(nn.Module):
    """DINOv2 blocks with DenseCrossAdapters; returns the two tapped maps and the final normed map.

    Args:
        cfg: the backbone's shape and weights.
        adapters: which blocks get a DA and how wide it is.
        text_dim: width of the word features the adapters attend to.
        backbone: a built ``Dinov2WithRegistersModel`` (see :func:`load_vision_backbone`).
    """

    def __init__(
        self, cfg: VisionConfig, adapters: AdapterConfig, text_dim: int, backbone: Dinov2WithRegistersModel
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone.requires_grad_(False)
        self.num_prefix = 1 + cfg.num_registers
        self.scale = adapters.scale
        self.adapters = nn.ModuleDict(
            {
                str(i): DenseCrossAdapter(
                    cfg.width,
                    adapters.vision_hidden,
                    text_dim,
                    adapters.cross_width,
                    adapters.cross_heads,
                    adapters.cross_dropout,
                    self.num_prefix,
                    fused=adapters.fused_dense,
                )
                for i in adapters.vision_layers
            }
        )
        if cfg.fused_qkv:
            for layer in self.backbone.encoder.layer:
                fuse_qkv(layer.attention)
        self._position_cache: tuple[tuple, torch.Tensor] | None = None  # (key, resized embedding)

    def block(self, i: int, x: torch.Tensor, words: torch.Tensor | None, grid: tuple[int, int]) -> torch.Tensor:
        """Block ``i`` (with its DenseCrossAdapter attending to ``words``, if it has one) on x (B, N, C)."""
        adapter = self.adapters[str(i)] if str(i) in self.adapters else None
        return vision_block(self.backbone.encoder.layer[i], adapter, x, words, grid, self.cfg.heads, self.scale)

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Images (B, 3, S, S) to the input of block 0 and the patch grid (H, W).

        The tokens (B, 1 + R + H*W, C) are cls, registers, patches (DINOv2's order), with DINOv2's own resize of the
        position embedding.
        """
        emb = self.backbone.embeddings
        grid = (images.shape[-2] // self.cfg.patch_size, images.shape[-1] // self.cfg.patch_size)
        patches = emb.patch_embeddings(images)  # (B, H*W, C)
        x = torch.cat([emb.cls_token.expand(images.shape[0], -1, -1), patches], dim=1)  # (B, 1 + H*W, C)
        x = x + self.position_embedding(grid).to(x.dtype)
        return torch.cat([x[:, :1], emb.register_tokens.expand(images.shape[0], -1, -1), x[:, 1:]], dim=1), grid

    def position_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """The stored position embedding resized to ``grid`` (:func:`dinov2_position_embeddings`), (1, N, C).

        A frozen embedding resizes to the same tensor every step, and the resize is slow on a GPU (one 37x37 to
        32x32 bicubic resize of 768 channels took 7 ms of a 162 ms training step on an H200): it is computed
        once per grid and kept until the stored tensor changes (another device, dtype, storage or in-place write).
        A compiled forward computes it inside its graph (where the resize is one small generated kernel).
        """
        stored = self.backbone.embeddings.position_embeddings
        trained = stored.requires_grad and torch.is_grad_enabled()  # full-tune: the gradient must flow
        if trained or torch.compiler.is_compiling():  # traced (ONNX export): no host-side cache, it has no pointer
            return dinov2_position_embeddings(stored, grid)
        key = (tuple(grid), stored.device, stored.dtype, stored.data_ptr(), stored._version)
        if self._position_cache is None or self._position_cache[0] != key:
            with torch.no_grad():
                self._position_cache = (key, dinov2_position_embeddings(stored, grid))
        return self._position_cache[1]

    def feature_maps(self, taps: list[torch.Tensor], x: torch.Tensor, grid: tuple[int, int]) -> list[torch.Tensor]:
        """The tapped block outputs and the normed last output x, each (B, N, C), as three (B, C, H, W) maps."""
        maps = [*taps, self.backbone.layernorm(x)]
        return [t[:, self.num_prefix :].transpose(1, 2).reshape(x.shape[0], -1, *grid) for t in maps]

    def forward(self, images: torch.Tensor, words: torch.Tensor) -> list[torch.Tensor]:
        """Maps images (B, 3, S, S) and words (B, L, text_dim) to three (B, C, S/14, S/14) maps."""
        x, grid = self.embed(images)  # (B, 1 + R + H*W, C)
        taps = []
        for i in range(self.cfg.depth):
            x = self.block(i, x, words, grid)
            if i in self.cfg.taps:
                taps.append(x)
        return self.feature_maps(taps, x, grid)
