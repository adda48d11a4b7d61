"""Frozen DINOv2-with-registers vision encoder with DenseCrossAdapters (SPEC 2).

The weights and modules are transformers' ``Dinov2WithRegistersModel`` (loaded with ``from_pretrained`` from a
hub id or a local directory); the block loop is ours, so that the adapters sit parallel to each MLP and every
attention goes through :func:`dcris.attention.attention`.
"""

from __future__ import annotations

import torch
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
                    adapters.cross_heads,
                    adapters.cross_dropout,
                    self.num_prefix,
                    fused=adapters.fused_dense,
                )
                for i in adapters.vision_layers
            }
        )

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Images (B, 3, S, S) to the input of block 0 (B, 1 + R + H*W, C) and the patch grid (H, W)."""
        grid = (images.shape[2] // self.cfg.patch_size, images.shape[3] // self.cfg.patch_size)
        return self.backbone.embeddings(images), grid  # tokens: cls, registers, patches

    def block(self, i: int, x: torch.Tensor, words: torch.Tensor | None, grid: tuple[int, int]) -> torch.Tensor:
        """Block ``i`` (with its DenseCrossAdapter attending to ``words``, if it has one) on x (B, N, C)."""
        layer = self.backbone.encoder.layer[i]
        att = layer.attention
        b, n, c = x.shape
        y = layer.norm1(x)
        q, k, v = (p(y).view(b, n, self.cfg.heads, -1).transpose(1, 2) for p in (att.q_proj, att.k_proj, att.v_proj))
        y = att.o_proj(attention(q, k, v).transpose(1, 2).reshape(b, n, c))  # (B, N, C)
        x = x + layer.layer_scale1(y)
        y = layer.norm2(x)
        branch = layer.mlp(y)
        adapter = self.adapters[str(i)] if str(i) in self.adapters else None
        if adapter is not None:
            branch = branch + self.scale * adapter(y, words, grid)
        return x + layer.layer_scale2(branch)

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
