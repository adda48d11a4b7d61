"""Random adapter sets on one shared random tiny backbone, for the tests of MultiSegmenter and the HTTP API."""

from __future__ import annotations

import torch

from dcris.config import Config, preset
from dcris.model import DCRIS, build_model, parameter_group
from dcris.segmenter import Segmenter


def backbone_state(model: DCRIS) -> dict[str, torch.Tensor]:
    """The frozen backbone tensors of a model's state dict."""
    return {k: v for k, v in model.state_dict().items() if parameter_group(k) == "backbone"}


def adapter_set(cfg: Config, backbone: dict[str, torch.Tensor], seed: int) -> Segmenter:
    """A random-init model of ``cfg`` on the given frozen backbone; every adapter and head tensor and every
    BatchNorm statistic random and non-zero."""
    torch.manual_seed(seed)
    model = build_model(cfg.model, pretrained=False)
    model.load_state_dict(backbone, strict=False)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn_like(b) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand_like(b) + 0.5)
    return Segmenter(model.eval(), cfg)


def three_sets() -> dict[str, Segmenter]:
    """Three adapter sets on one random tiny backbone: the paper's TA at 17 tokens, the released TA at 12 tokens,
    and adapters, taps, scale and a no-target output (gRefCOCO) of their own."""
    torch.manual_seed(0)
    backbone = backbone_state(build_model(preset("tiny-dcris").model, pretrained=False))
    released = preset("tiny-detris")
    released.model.text.context_length = 12
    other = preset("tiny-dcris")
    other.model.adapters.vision_layers, other.model.adapters.text_layers = [0, 2], [2]
    other.model.vision.taps = [0, 3]
    other.model.adapters.scale = 0.3
    other.model.head.no_target = True
    return {
        "paper": adapter_set(preset("tiny-dcris"), backbone, 1),
        "released": adapter_set(released, backbone, 2),
        "other": adapter_set(other, backbone, 3),
    }
