"""The trainable adapters of DCRIS (SPEC 2): DenseCrossAdapter (vision) and TextAdapter (text).

Both sit parallel to their block's MLP and are added to its output with a fixed scale (0.2):
vision ``x + ls2(mlp(norm2(x)) + 0.2 * DA(norm2(x), f_t))``, text ``x + mlp(ln_2(x)) + 0.2 * TA(x)``.
"""

from __future__ import annotations

import torch
from torch import nn

from dcris.attention import MultiheadAttention
from dcris.kernels.dense_branch import DenseBranch


def init_kaiming(module: nn.Module) -> None:
    """Kaiming-normal (ReLU gain) weights and zero biases for every conv and linear layer below ``module``."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def dense_widths(hidden: int) -> tuple[int, int, int, int, int]:
    """Branch widths of the stepwise dense branch for a bottleneck of ``hidden`` channels.

    (64, 8, 32, 8, 32) at the vision adapter's 128 and (32, 4, 16, 4, 16) at the text adapter's 64: half the
    channels from the 1x1 branch, a quarter from each of the 3 and 5 branches, squeezed to a sixteenth first.
    """
    if hidden % 16:
        raise ValueError(f"adapter hidden width {hidden} must be a multiple of 16")
    return hidden // 2, hidden // 16, hidden // 4, hidden // 16, hidden // 4


class CrossModalAttention(nn.Module):
    """Visual tokens attend to the word features f_t (no key padding mask, as the released code).

    Both sides are projected to ``width`` (128 in the released code whatever the adapter's width), attend, and
    the result is projected back to the adapter's width.
    """

    def __init__(self, dim: int, text_dim: int, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.image_proj = nn.Linear(dim, width)
        self.text_proj = nn.Linear(text_dim, width)
        self.multihead_attn = MultiheadAttention(width, heads, dropout=dropout)
        self.back_proj = nn.Linear(width, dim)

    def forward(self, tokens: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        """Maps tokens (B, N, dim) and words (B, L, text_dim) to (B, N, dim)."""
        q = self.image_proj(tokens)  # (B, N, width)
        kv = self.text_proj(words)  # (B, L, width)
        return self.back_proj(self.multihead_attn(q, kv, kv))


class DenseCrossAdapter(nn.Module):
    """DA: down-projection, stepwise dense conv branch over the patch map, cross-attention to the words, up.

    Args:
        dim: vision width (768 / 1024).
        hidden: bottleneck width (128).
        text_dim: word feature width (512).
        cross_width: width the cross-attention runs at (128).
        heads: heads of the cross-attention.
        dropout: attention dropout of the cross-attention.
        num_prefix: leading non-patch tokens (cls + registers = 5) that skip the conv branch.
        fused: let the dense branch try the fused Triton kernels (it falls back to eager by itself).
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        text_dim: int,
        cross_width: int,
        heads: int,
        dropout: float,
        num_prefix: int,
        fused: bool = False,
    ) -> None:
        super().__init__()
        self.num_prefix = num_prefix
        self.down = nn.Linear(dim, hidden)
        self.dense = DenseBranch(hidden, widths=dense_widths(hidden))
        self.dense.fused = fused
        self.cross = CrossModalAttention(hidden, text_dim, cross_width, heads, dropout)
        self.up = nn.Linear(hidden, dim)
        init_kaiming(self)

    def forward(self, x: torch.Tensor, words: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Maps x (B, P + H*W, dim) and words (B, L, text_dim) to (B, P + H*W, dim); ``grid`` = (H, W)."""
        b, n, _ = x.shape
        h = torch.relu(self.down(x))  # (B, N, hidden)
        prefix, patches = h[:, : self.num_prefix], h[:, self.num_prefix :]
        fmap = patches.transpose(1, 2).reshape(b, -1, *grid)  # (B, hidden, H, W), channels-last in memory
        dense = self.dense(fmap).flatten(2).transpose(1, 2)  # (B, H*W, hidden)
        crossed = self.cross(dense, words)  # (B, H*W, hidden)
        out = torch.cat([prefix, crossed], dim=1) + h  # (B, N, hidden)
        return self.up(out)


class TextAdapter(nn.Module):
    """TA: Linear-ReLU-Linear (paper form), or with the released code's 1-D dense branch over positions 1..L-1.

    Args:
        dim: text width (512).
        hidden: bottleneck width (64).
        released: use the released (DETRIS) form with the 1-D dense branch.
    """

    def __init__(self, dim: int, hidden: int, released: bool = False) -> None:
        super().__init__()
        self.down = nn.Linear(dim, hidden)
        self.dense = DenseBranch(hidden, widths=dense_widths(hidden), dims=1) if released else None
        self.up = nn.Linear(hidden, dim)
        init_kaiming(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Maps x (B, L, dim) to (B, L, dim)."""
        h = torch.relu(self.down(x))  # (B, L, hidden)
        if self.dense is not None:
            # The branch convolves over positions 1..L-1 (its output includes + h). As in the released code,
            # position 0's h is put back in front and h is then added at every position: the start token
            # carries 2 * h[0] (SPEC 2; passing it through once changes f_t by 7%).
            seq = h[:, 1:].transpose(1, 2)  # (B, hidden, L-1)
            h = torch.cat([2 * h[:, :1], self.dense(seq).transpose(1, 2)], dim=1)  # (B, L, hidden)
        return self.up(h)
