"""The DCRIS model (SPEC 2): frozen text and vision encoders with adapters, and the CRIS-style head.

Order of computation: the whole text encoder (with its adapters) runs first; the vision encoder then runs
and every DenseCrossAdapter attends to the final word features; the head segments at 1/4 of the input.
The comparison methods of the paper's Table 2 (``model.baseline``, ``model.train_backbones``) are built in by
dcris/baselines.py; ETRIS's bridgers run both encoders together instead.
"""

from __future__ import annotations

import torch
from torch import nn

from dcris.attention import xformers_available
from dcris.baselines import build_baseline
from dcris.bridger import Bridger
from dcris.config import ModelConfig
from dcris.head import SegmentationHead, no_target_loss, segmentation_loss
from dcris.text import TextEncoder, build_text_encoder
from dcris.vision import VisionEncoder, load_vision_backbone


class DCRIS(nn.Module):
    """Referring image segmentation: (images, tokens) -> mask logits at 4x the patch grid (128 x 128 for 448).

    Trainable: the adapters (``vision.adapters``, ``text.adapters``), the ``head`` and a Table 2 method's own
    parameters (``baseline``, or LoRA layers inside the backbones). Frozen: everything else, unless
    ``cfg.train_backbones``; frozen backbones stay in eval mode under ``train()``.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        text: TextEncoder,
        vision: VisionEncoder,
        head: SegmentationHead,
        baseline: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.text = text
        self.vision = vision
        self.head = head
        self.baseline = baseline

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Maps images (B, 3, S, S) and tokens (B, L) to logits (B, 1, 4 * S/14, 4 * S/14); with
        ``cfg.head.no_target`` to the pair (those, (B,) "no object" logits): see :func:`split_output`."""
        if isinstance(self.baseline, Bridger):
            maps, words, sentence = self.baseline(self.text, self.vision, images, tokens)
        else:
            words, sentence = self.text(tokens)  # (B, L, Ct), (B, E)
            maps = self.vision(images, words)  # 3 x (B, Cv, S/14, S/14)
        return self.head(maps, words, sentence, tokens)  # (B, 1, 4 * S/14, 4 * S/14)

    def loss(
        self,
        output: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        masks: torch.Tensor,
        num_targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Sigmoid BCE against masks (B, 1, S, S) resized to the logits (SPEC 2); with the no-target output, plus
        ``cfg.head.no_target_loss_weight`` times the BCE of the "no object" logits against ``num_targets`` == 0,
        class-weighted by ``cfg.head.no_target_class_weights`` (:func:`dcris.head.no_target_loss`)
        (the mask of a phrase naming nothing is empty, so the mask loss teaches it to paint nothing too).

        Args:
            output: What :meth:`forward` returned.
            masks: (B, 1, S, S) targets in [0, 1].
            num_targets: (B,) objects each phrase names; needed with the no-target output.
        """
        logits, no_target_logits = split_output(output)
        loss = segmentation_loss(logits, masks)
        if no_target_logits is None:
            return loss
        if num_targets is None:
            raise ValueError("a model with the no-target output needs num_targets (the batches' target counts)")
        head = self.cfg.head
        num_targets = num_targets.to(no_target_logits.device)
        nt_loss = no_target_loss(no_target_logits, num_targets, head.no_target_class_weights)
        return loss + head.no_target_loss_weight * nt_loss

    def train(self, mode: bool = True) -> DCRIS:
        super().train(mode)
        if not self.cfg.train_backbones:
            # frozen backbones never train: dropout off, statistics fixed
            self.text.transformer.eval()
            self.vision.backbone.eval()
        return self


ModelOutput = torch.Tensor | tuple[torch.Tensor, torch.Tensor]  # logits, or (logits, "no object" logits)


def split_output(output: ModelOutput) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(mask logits, "no object" logits or None) of what :meth:`DCRIS.forward` returned, with or without the
    no-target output."""
    if isinstance(output, tuple):
        return output
    return output, None


def parameter_group(key: str) -> str:
    """The part of :class:`DCRIS` a parameter or state-dict key belongs to.

    Returns:
        ``"head"``, ``"adapters"`` (DenseCrossAdapters and TextAdapters), ``"baseline"`` (a Table 2 method's own
        parameters: ``baseline.*`` and peft's LoRA layers inside the backbones) or ``"backbone"``.
    """
    if key.startswith("head."):
        return "head"
    if key.startswith(("text.adapters.", "vision.adapters.")):
        return "adapters"
    if key.startswith("baseline.") or ".lora_" in key:
        return "baseline"
    return "backbone"


def is_trainable_key(key: str, cfg: ModelConfig | None = None) -> bool:
    """Whether a state-dict key of :class:`DCRIS` belongs to what trains: adapters, head, a Table 2 method, and
    the backbones too when ``cfg.train_backbones`` (without ``cfg``: frozen backbones)."""
    return parameter_group(key) != "backbone" or (cfg is not None and cfg.train_backbones)


def build_model(cfg: ModelConfig, pretrained: bool = True) -> DCRIS:
    """Builds DCRIS from its config alone; loads the named backbone weights when ``pretrained``."""
    text = build_text_encoder(cfg.text, cfg.adapters, pretrained, cfg.allow_download)
    backbone = load_vision_backbone(cfg.vision, pretrained, cfg.allow_download)
    vision = VisionEncoder(cfg.vision, cfg.adapters, cfg.text.width, backbone)
    head = SegmentationHead(cfg.head, cfg.vision.width, cfg.text.embed_dim)
    baseline = build_baseline(cfg, text, vision)  # after loading (LoRA re-wraps backbone layers), after the head
    model = DCRIS(cfg, text, vision, head, baseline)
    if cfg.compile:
        # the whole forward as one graph (and its backward as one): one graph entered per step, not one per block
        # and the head; fixed shapes (evaluation pads its last batch). The attention kernel is chosen first: its
        # probe cannot be traced
        xformers_available()
        model.compile(dynamic=False, mode=cfg.compile_mode)
    return model
