"""The DenseCrossAdapter's stepwise dense branch (SPEC section 2, "Inside DA"), eager PyTorch reference.

With CBR = conv (bias) + BatchNorm (eps 1e-3) + ReLU::

    b1 = CBR1x1(h)                                  C -> w0
    b2 = CBRkxk(CBR1x1(cat[h, b1]))                 C + w0 -> w1 -> w2, k = 3
    b3 = CBRkxk(CBR1x1(cat[h, b1, b2]))             C + w0 + w2 -> w3 -> w4, k = 5
    out = cat[b1, b2, b3] + h                       w0 + w2 + w4 = C

:func:`dense_branch_reference` is the fallback of :class:`~dcris.kernels.dense_branch.DenseBranch` at run time,
the oracle of the fused kernels in tests and their baseline in benchmarks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

_BN_EPS = 1e-3


class ConvBNReLU(nn.Module):
    """Conv (with bias, 'same' padding) + BatchNorm (eps 1e-3) + ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dims: int = 2) -> None:
        """Builds the block.

        Args:
            in_channels: input channels.
            out_channels: output channels.
            kernel_size: odd kernel size; padding is kernel_size // 2.
            dims: 1 for Conv1d/BatchNorm1d, 2 for Conv2d/BatchNorm2d.
        """
        super().__init__()
        if dims not in (1, 2):
            raise ValueError(f"dims must be 1 or 2, got {dims}")
        conv = nn.Conv1d if dims == 1 else nn.Conv2d
        norm = nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d
        self.conv = conv(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=True)
        self.bn = norm(out_channels, eps=_BN_EPS)
        nn.init.kaiming_normal_(self.conv.weight, nonlinearity="relu")
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """relu(bn(conv(x))) on (B, C_in, *spatial) -> (B, C_out, *spatial)."""
        return F.relu(self.bn(self.conv(x)))


def dense_branch_reference(h: torch.Tensor, branch1: nn.Module, branch2: nn.Module, branch3: nn.Module) -> torch.Tensor:
    """Eager forward of the three branches: (B, C, *spatial) -> (B, C, *spatial)."""
    b1 = branch1(h)
    b2 = branch2(torch.cat([h, b1], dim=1))
    b3 = branch3(torch.cat([h, b1, b2], dim=1))
    return torch.cat([b1, b2, b3], dim=1) + h


def uses_batch_statistics(blocks: Sequence[ConvBNReLU]) -> bool:
    """Whether the blocks' BatchNorms normalise with the batch's statistics (training mode, or none tracked)."""
    return any(cbr.bn.training or cbr.bn.running_mean is None for cbr in blocks)


def running_statistics_with_gradients(h: torch.Tensor, blocks: Sequence[ConvBNReLU]) -> bool:
    """Eval-mode BatchNorm (running statistics) where autograd needs the branch's gradients: the fused kernels
    have no backward for that case, so the branch runs :func:`dense_branch_reference`."""
    if uses_batch_statistics(blocks) or not torch.is_grad_enabled():
        return False
    return h.requires_grad or any(p.requires_grad for cbr in blocks for p in cbr.parameters())
