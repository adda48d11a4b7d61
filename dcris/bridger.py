"""Table 2's ETRIS baseline: Bridger modules between the vision and text encoders.

Xu et al., "Bridging Vision and Language Encoders: Parameter-Efficient Tuning for Referring Image Segmentation"
(ICCV 2023), Section 3.2. The structure follows their released ViT bridger (kkakkkka/ETRIS, model/bridger.py,
``Bridger_ViT``, with ``InteractorT``, ``conv_layer`` and ``deconv_layer`` from model/layers.py):

- both encoders run together, block by block; after every fourth block (``(i + 1) % 4 == 0``: blocks 3, 7, 11
  of a 12-block encoder) a bridger stage exchanges information between them;
- a stage takes the patch tokens as a map and the word tokens, "zooms" both to the bridger width d (1x1 conv +
  BatchNorm + ReLU for the map, Linear for the words), from the second stage on adds the previous stage's
  zoomed tokens and applies a LayerNorm (one per stream), then lets each stream attend to the other and gates
  it multiplicatively (``x * attention(x, other)``, dropout 0), and zooms back (1x1 conv + BatchNorm + ReLU,
  Linear); the results are added to the patch tokens and to the words;
- the last stage's zoom-in is a 1x1 transposed conv and its zoom-out a 1x1 conv, the others the other way round
  (equal maps at stride 1, kept as released);
- initialisation: Linear weights N(0, 0.02) with zero biases, convolutions Kaiming-normal (fan-out, ReLU).

On DINOv2 the cls and register tokens stay out of the bridger (ETRIS leaves out CLIP's cls token); the head's
feature taps are read after a stage's residual add, as ETRIS reads its multi-scale outputs. ETRIS also unfreezes
CLIP's position embeddings; here the backbones stay frozen, as in every other row of the table, and the bridger
width is what was tuned to reach the paper's parameter count.
"""

from __future__ import annotations

import torch
from torch import nn

from dcris.attention import MultiheadAttention
from dcris.text import TextEncoder
from dcris.vision import VisionEncoder


def _zoom(conv: nn.Module, channels: int) -> nn.Sequential:
    return nn.Sequential(conv, nn.BatchNorm2d(channels), nn.ReLU(inplace=True))


class GatedCrossAttention(nn.Module):
    """ETRIS's ``InteractorT``: ``x * attention(query=x, key=value=other)``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.attn = MultiheadAttention(dim, heads)

    def forward(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """Maps x (B, N, dim) and other (B, M, dim) to (B, N, dim)."""
        return x * self.attn(x, other, other)


class BridgerStage(nn.Module):
    """One exchange between the patch map (B, C_v, H, W) and the words (B, L, C_t) at width ``hidden``."""

    def __init__(self, vision_dim: int, text_dim: int, hidden: int, heads: int, last: bool) -> None:
        super().__init__()
        conv_in, conv_out = (nn.ConvTranspose2d, nn.Conv2d) if last else (nn.Conv2d, nn.ConvTranspose2d)
        self.zoom_in = _zoom(conv_in(vision_dim, hidden, 1, bias=False), hidden)
        self.zoom_out = _zoom(conv_out(hidden, vision_dim, 1, bias=False), vision_dim)
        self.text_in = nn.Linear(text_dim, hidden)
        self.text_out = nn.Linear(hidden, text_dim)
        self.fuse_vision = GatedCrossAttention(hidden, heads)
        self.fuse_text = GatedCrossAttention(hidden, heads)


class Bridger(nn.Module):
    """Bridger stages after the given blocks; runs both encoders and returns what the head needs.

    Args:
        blocks: blocks (0-based, the same in both encoders) followed by a bridger stage.
        vision_dim: vision width.
        text_dim: text width.
        hidden: bridger width d.
        heads: attention heads of the gated cross-attentions.
    """

    def __init__(self, blocks: list[int], vision_dim: int, text_dim: int, hidden: int, heads: int) -> None:
        super().__init__()
        self.blocks = list(blocks)
        self.stages = nn.ModuleList(
            BridgerStage(vision_dim, text_dim, hidden, heads, last=s == len(blocks) - 1) for s in range(len(blocks))
        )
        # stage s >= 1 normalises its zoomed tokens plus stage s - 1's
        self.norm_vision = nn.ModuleList(nn.LayerNorm(hidden) for _ in blocks[1:])
        self.norm_text = nn.ModuleList(nn.LayerNorm(hidden) for _ in blocks[1:])
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(
        self, text: TextEncoder, vision: VisionEncoder, images: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Runs both encoders with the bridgers between them.

        Args:
            text: the text encoder.
            vision: the vision encoder (without DenseCrossAdapters).
            images: (B, 3, S, S).
            tokens: (B, L).

        Returns:
            The three feature maps (B, C_v, S/14, S/14), f_t (B, L, C_t) and f_s (B, E).
        """
        words = text.embed(tokens)  # (B, L, C_t)
        x, grid = vision.embed(images)  # (B, P + H*W, C_v)
        taps, previous = [], None
        for i in range(vision.cfg.depth):
            words = text.block(i, words)
            x = vision.block(i, x, None, grid)
            if i in self.blocks:
                x, words, previous = self._exchange(self.blocks.index(i), x, words, grid, vision.num_prefix, previous)
            if i in vision.cfg.taps:
                taps.append(x)
        return (vision.feature_maps(taps, x, grid), *text.finish(words, tokens))

    def _exchange(
        self,
        s: int,
        x: torch.Tensor,
        words: torch.Tensor,
        grid: tuple[int, int],
        num_prefix: int,
        previous: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Stage ``s``: returns the updated tokens x (B, P + H*W, C_v), words (B, L, C_t) and its zoomed pair."""
        stage = self.stages[s]
        b, _, c = x.shape
        prefix, patches = x[:, :num_prefix], x[:, num_prefix:]
        v = stage.zoom_in(patches.transpose(1, 2).reshape(b, c, *grid))  # (B, d, H, W)
        v = v.flatten(2).transpose(1, 2)  # (B, H*W, d)
        t = stage.text_in(words)  # (B, L, d)
        if previous is not None:
            v, t = self.norm_vision[s - 1](v + previous[0]), self.norm_text[s - 1](t + previous[1])
        zoomed = (v, t)
        v, t = stage.fuse_vision(v, t), stage.fuse_text(t, v)
        v = stage.zoom_out(v.transpose(1, 2).reshape(b, -1, *grid))  # (B, C_v, H, W)
        patches = patches + v.flatten(2).transpose(1, 2)  # (B, H*W, C_v)
        return torch.cat([prefix, patches], dim=1), words + stage.text_out(t), zoomed
