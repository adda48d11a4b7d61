"""The DenseCrossAdapter's stepwise dense branch (SPEC section 2, "Inside DA"), eager PyTorch reference.

With CBR = conv (bias) + BatchNorm (eps 1e-3) + ReLU::

    b1 = CBR1x1(h)                                  C -> w0
    b2 = CBRkxk(CBR1x1(cat[h, b1]))                 C + w0 -> w1 -> w2, k = 3
    b3 = CBRkxk(CBR1x1(cat[h, b1, b2]))             C + w0 + w2 -> w3 -> w4, k = 5
    out = cat[b1, b2, b3] + h                       w0 + w2 + w4 = C

The vision adapter uses the 2-D form (C = 128, widths (64, 8, 32, 8, 32)); the released text adapter the 1-D
form over token positions (C = 64, widths (32, 4, 16, 4, 16)). :class:`DenseBranch` can run the fused Triton
kernels of :mod:`dcris.kernels.dense_branch` for the 2-D form (``fused = True``; off by default until a GPU
benchmark shows them winning) and runs this eager code everywhere else; the eager forward is also the oracle in
tests and the baseline in benchmarks. ``DCRIS_NO_TRITON=1`` forces the eager path.

The fused path is checked once per process and input kind (device, dtype, train or eval): the first call also
runs the eager forward (on a copy, so BatchNorm statistics move once) and compares. A compile or launch error,
or a result that differs, switches the fused path off for the process with one warning, and the eager result is
used: a broken kernel never ends a training run.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import logging
import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn

_DISABLE_ENV = "DCRIS_NO_TRITON"  # set to 1 to force the eager PyTorch path
_BN_EPS = 1e-3
# the first fused call's tolerance against eager, relative to eager's max |value|: loose enough for bf16 and
# TF32 rounding, tight enough that a wrong kernel cannot pass
_FIRST_CALL_RTOL = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 2e-2}
_checked_kinds: set[tuple[str, torch.dtype, bool]] = set()  # input kinds whose first fused call matched eager
_fused_failure: list[str] = []  # why the fused path was switched off in this process (empty: it was not)

_log = logging.getLogger(__name__)


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


@functools.cache
def triton_available() -> bool:
    """Whether Triton can be imported (checked once; the import itself is left to the fused path)."""
    ok = importlib.util.find_spec("triton") is not None
    if not ok:
        _log.info("triton is not installed: DenseBranch uses the PyTorch path")
    return ok


class DenseBranch(nn.Module):
    """The stepwise dense branch; fused Triton kernels on CUDA for ``dims == 2``, eager PyTorch otherwise.

    Attributes:
        fused: use the Triton path when possible (CUDA input, ``dims == 2``, Triton importable and
            ``DCRIS_NO_TRITON`` unset); False always runs :meth:`reference_forward`.
    """

    def __init__(
        self, channels: int = 128, widths: tuple[int, int, int, int, int] = (64, 8, 32, 8, 32), dims: int = 2
    ) -> None:
        """Builds the three branches.

        Args:
            channels: input (and output) channels C.
            widths: (branch1 out, branch2 squeeze, branch2 out, branch3 squeeze, branch3 out); branch1 out +
                branch2 out + branch3 out must equal ``channels`` for the residual.
            dims: 2 for the vision adapter's (B, C, H, W) maps, 1 for the text adapter's (B, C, L) sequences.
        """
        super().__init__()
        w1, s2, w2, s3, w3 = widths
        if w1 + w2 + w3 != channels:
            raise ValueError(f"branch widths {w1}+{w2}+{w3} must sum to channels={channels}")
        self.channels = channels
        self.widths = tuple(widths)
        self.dims = dims
        self.fused = False
        self.branch1 = ConvBNReLU(channels, w1, 1, dims)
        self.branch2 = nn.Sequential(ConvBNReLU(channels + w1, s2, 1, dims), ConvBNReLU(s2, w2, 3, dims))
        self.branch3 = nn.Sequential(ConvBNReLU(channels + w1 + w2, s3, 1, dims), ConvBNReLU(s3, w3, 5, dims))

    def reference_forward(self, h: torch.Tensor) -> torch.Tensor:
        """Eager forward: (B, C, *spatial) -> (B, C, *spatial)."""
        b1 = self.branch1(h)
        b2 = self.branch2(torch.cat([h, b1], dim=1))
        b3 = self.branch3(torch.cat([h, b1, b2], dim=1))
        return torch.cat([b1, b2, b3], dim=1) + h

    def use_fused(self, h: torch.Tensor) -> bool:
        """Whether :meth:`forward` tries the Triton path for this input.

        Triton runs on CUDA, or anywhere in its interpreter (``TRITON_INTERPRET=1``, the CPU tests). BatchNorm
        converted to SyncBatchNorm needs statistics over all ranks, which the fused kernels do not compute.
        """
        return (
            self.fused
            and self.dims == 2
            and (h.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1")
            and os.environ.get(_DISABLE_ENV, "0") != "1"
            and not _fused_failure
            and not any(isinstance(m, nn.SyncBatchNorm) for m in self.modules())
            and triton_available()
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(B, C, *spatial) -> (B, C, *spatial); see the module docstring."""
        if self.use_fused(h):
            out = self._fused_forward(h)
            if out is not None:
                return out
        return self.reference_forward(h)

    def _fused_forward(self, h: torch.Tensor) -> torch.Tensor | None:
        """The fused result; None when the fused path failed its first-call check (it is then off for good)."""
        from . import dense_branch

        kind = (h.device.type, h.dtype, self.training)
        if kind in _checked_kinds:
            return dense_branch.fused_dense_branch(h, self)
        # in training the eager check runs on a copy, whose BatchNorm statistics absorb its step
        reference = copy.deepcopy(self) if self.training else self
        buffers = {name: b.clone() for name, b in self.named_buffers()}
        try:
            out = dense_branch.fused_dense_branch(h, self)
            with torch.no_grad():
                want = reference.reference_forward(h)
                error = (out.detach().float() - want.float()).abs().max().item()
            bound = _FIRST_CALL_RTOL.get(h.dtype, 1e-3) * max(want.abs().max().item(), 1e-6)
            if not error <= bound:
                raise ValueError(f"result differs from eager by {error:.3g} (allowed {bound:.3g})")
        except Exception as exc:  # noqa: BLE001 - any failure of the kernel means "use eager"
            _fused_failure.append(f"{type(exc).__name__}: {exc}".splitlines()[0])
            warnings.warn(
                f"fused Triton dense branch failed its first call on {kind[0]} {kind[1]} "
                f"({'training' if kind[2] else 'eval'}): {_fused_failure[0]}; using the PyTorch path",
                RuntimeWarning,
                stacklevel=3,
            )
            with torch.no_grad():  # undo whatever the fused attempt did to the statistics: eager steps once
                for name, b in self.named_buffers():
                    b.copy_(buffers[name])
            return None
        _checked_kinds.add(kind)
        return out
