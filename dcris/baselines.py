"""The comparison methods of the paper's Table 2, built into the frozen encoders from ``model.baseline``.

- ``houlsby``, ``compacter``: bottleneck adapters after every attention and MLP (dcris/bottleneck_adapters.py);
- ``etris``: ETRIS's bridgers between the two encoders (dcris/bridger.py);
- ``lora``: LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", Section 4.1) built with
  the ``peft`` library: ``W + (alpha / r) B A`` with A Kaiming-uniform and B zero (so the model starts as the
  pretrained one), no dropout, on the attention's input projections. In DINOv2 those are the separate
  ``q_proj``, ``k_proj`` and ``v_proj`` Linear layers, each with its own A and B. CLIP's text attention
  (:class:`dcris.attention.MultiheadAttention`) keeps the three in one packed ``in_proj_weight`` (3C x C) so that
  CLIP checkpoints load unchanged; peft adapts that parameter directly (``target_parameters``): one LoRA over
  the packed matrix, its A shared by query, key and value -- what peft does for any fused qkv layer (timm's ViT
  ``qkv``), and the only way to adapt them without re-laying out the pretrained weights.
- full fine-tuning (``model.train_backbones``): every backbone weight trains (:func:`train_backbones`).

Where each method goes: the blocks i with ``(i + 1) % model.baseline.every == 0`` of both encoders.
"""

from __future__ import annotations

from torch import nn

from dcris.bottleneck_adapters import compacter_adapters, houlsby_adapters
from dcris.bridger import Bridger
from dcris.config import ModelConfig
from dcris.text import TextEncoder
from dcris.vision import VisionEncoder

# backbone parameters the forward pass never reads: they stay frozen even when the backbones train
UNUSED_BACKBONE_PARAMETERS = ("logit_scale", "embeddings.mask_token")


def method_blocks(depth: int, every: int) -> list[int]:
    """The blocks of a ``depth``-block encoder that get the method: ``(i + 1) % every == 0``."""
    return [i for i in range(depth) if (i + 1) % every == 0]


def build_baseline(cfg: ModelConfig, text: TextEncoder, vision: VisionEncoder) -> nn.Module | None:
    """Builds ``cfg.baseline`` into the encoders (LoRA) or beside them (adapters, bridgers; returned).

    Then makes the backbones trainable when ``cfg.train_backbones`` (after LoRA, which freezes what it wraps).

    Returns:
        The module holding the method's own parameters (to be registered on the model), or None.
    """
    b = cfg.baseline
    text_blocks, vision_blocks = method_blocks(cfg.text.layers, b.every), method_blocks(cfg.vision.depth, b.every)
    module = None
    if b.method == "houlsby":
        module = houlsby_adapters(text, vision, text_blocks, vision_blocks, b.hidden)
    elif b.method == "compacter":
        module = compacter_adapters(text, vision, text_blocks, vision_blocks, b.hidden, b.phm_dim, b.rank)
    elif b.method == "etris":
        module = Bridger(vision_blocks, cfg.vision.width, cfg.text.width, b.hidden, b.heads)
    elif b.method == "lora":
        add_lora(text, vision, text_blocks, vision_blocks, b.rank, b.lora_alpha)
    if cfg.train_backbones:
        train_backbones(text, vision)
    return module


def add_lora(
    text: TextEncoder, vision: VisionEncoder, text_blocks: list[int], vision_blocks: list[int], rank: int, alpha: float
) -> None:
    """Injects peft LoRA layers into the attention input projections of the given blocks (module docstring)."""
    from peft import LoraConfig, inject_adapter_in_model  # deferred: peft imports much of transformers

    blocks = "|".join(map(str, vision_blocks))
    vision_targets = rf"encoder\.layer\.({blocks})\.attention\.(q_proj|k_proj|v_proj)"
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=vision_targets), vision.backbone)
    text_targets = [f"resblocks.{i}.attn.in_proj_weight" for i in text_blocks]
    inject_adapter_in_model(
        LoraConfig(r=rank, lora_alpha=alpha, target_modules=[], target_parameters=text_targets), text.transformer
    )


def train_backbones(text: TextEncoder, vision: VisionEncoder) -> None:
    """Full fine-tuning: every backbone weight the forward pass uses becomes trainable."""
    for name, p in (*text.named_parameters(), *vision.named_parameters()):
        p.requires_grad_(not name.endswith(UNUSED_BACKBONE_PARAMETERS))
