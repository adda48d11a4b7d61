"""Tiny models whose frozen statistics sit away from their init, so every branch counts in a comparison."""

from __future__ import annotations

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from dcris.config import ModelConfig
from dcris.model import DCRIS, build_model


def randomised_model(cfg: ModelConfig) -> DCRIS:
    """A random-init model of ``cfg`` (seed 0) with random BatchNorm statistics and LayerScales."""
    torch.manual_seed(0)
    model = build_model(cfg, pretrained=False)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
        for layer in model.vision.backbone.encoder.layer:
            layer.layer_scale1.lambda1.uniform_(0.5, 1.5)
            layer.layer_scale2.lambda1.uniform_(0.5, 1.5)
    return model
