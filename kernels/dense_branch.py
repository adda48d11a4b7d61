"""The DenseCrossAdapter's stepwise dense branch (SPEC section 2, "Inside DA") as a module: :class:`DenseBranch`.

It runs the eager reference (:mod:`dcris.kernels.dense_branch_ref`) or, for the 2-D form, the fused Triton
kernels: forward kernels in :mod:`~dcris.kernels.dense_branch_fwd`, backward kernels in
:mod:`~dcris.kernels.dense_branch_bwd`, the device functions both share in :mod:`~dcris.kernels.dense_branch_jit`,
launchers in :mod:`~dcris.kernels.dense_branch_launch`, the autograd Function and the entry point
:func:`~dcris.kernels.dense_branch_autograd.fused_dense_branch` in :mod:`~dcris.kernels.dense_branch_autograd`.
The imports go one way: this module over the autograd Function, which is over the launchers, which are over the
kernels; each of them sees only the five blocks (:attr:`DenseBranch.blocks`), never this module. This module
imports the fused path only when it is first tried (Triton may be missing).

The vision adapter uses the 2-D form (C = 128, widths (64, 8, 32, 8, 32)); the released text adapter the 1-D
form over token positions (C = 64, widths (32, 4, 16, 4, 16)). The fused path is used for the 2-D form with
``fused = True`` (off by default until a GPU benchmark shows it winning); ``DCRIS_NO_TRITON=1`` forces the
eager path.

The fused path is checked once per process and input kind (device, dtype, train or eval): the first call also
runs the eager forward (on a copy, so BatchNorm statistics move once) and compares. A compile or launch error,
or a result that differs, switches the fused path off for the process with one warning, and the eager result is
used: a broken kernel never ends a training run.

The fused kernels, in this notation (per pixel, with ``bn(z) = a * z + d`` per channel and C = 128, widths
(W1, S2, W2, S3, W3) = (64, 8, 32, 8, 32))::

    z1  = conv1x1(h)               b1 = relu(bn1(z1))
    z2a = conv1x1([h, b1])         s2 = relu(bn2a(z2a))
    z2b = conv3x3(s2)              b2 = relu(bn2b(z2b))
    z3a = conv1x1([h, b1, b2])     s3 = relu(bn3a(z3a))
    z3b = conv5x5(s3)              b3 = relu(bn3b(z3b))
    out = [b1, b2, b3] + h

Inference (``_dense_branch_fwd_kernel``, one launch): BatchNorm uses the running statistics, so every
stage is local. Each program owns a block of BLOCK_P flattened pixels and walks three stages over a
shrinking halo (flattened-index halos of 3W+3, 2W+2, 0 pixels): stage A computes b1 and s2, stage B b2 and
s3, stage C b3 and the output. Intermediates go to a per-program fp32 scratch slab (L2-resident) separated
by ``tl.debug_barrier``; the 3x3 and 5x5 convs read shifted rows of the slab. b1 is computed about 1.8x
per pixel (the halo), everything else once.

Training needs the batch statistics of each conv output before the next stage can run, so it is a chain
of passes over flat pixel blocks, each followed by a one-program finalize kernel (Chan merge of the
per-program moments, running-stat update, scale/shift for the next pass). Only the small pre-BN outputs
z2a, z2b, z3a, z3b (80 of the 128 + 80 channels) are stored; z1 and b1 are recomputed from h on tensor
cores wherever they are needed (cheaper than storing 64 channels and reading them back).

* forward: F1 stats(z1) | F2 z2a | F3 z2b (3x3) | F4 z3a | F5 z3b (5x5) | F6 out.
* backward (``g`` = gradient at a BN output through its ReLU): B1 g3b | B2 conv5x5 backward: ds3, dW3b,
  g3a | B3 squeeze-3 backward: dW3a, g2b | B4 conv3x3 backward: ds2, dW2b, g2a | B5 squeeze-2 backward:
  dW2a, g1 | B6 dW1, dh. Each pass stores one small g (8 to 64 channels); dz of the squeeze convs (8
  channels) is recomputed from its g wherever needed. Weight gradients are per-program partials summed
  by torch (deterministic, no atomics); BN weight/bias gradients come out of the finalize kernels.

All accumulation is fp32; for bf16/fp16 inputs the matrix products take bf16/fp16 operands on tensor cores,
for fp32 inputs they run in IEEE fp32 (no TF32).
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import logging
import os
import warnings

import torch
from torch import nn

from .dense_branch_ref import ConvBNReLU, dense_branch_reference, running_statistics_with_gradients

_DISABLE_ENV = "DCRIS_NO_TRITON"  # set to 1 to force the eager PyTorch path
# the first fused call's tolerance against eager, relative to eager's max |value|: loose enough for bf16 and
# TF32 rounding, tight enough that a wrong kernel cannot pass
_FIRST_CALL_RTOL = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 2e-2}
_checked_kinds: set[tuple[str, torch.dtype, bool]] = set()  # input kinds whose first fused call matched eager
_fused_failure: list[str] = []  # why the fused path was switched off in this process (empty: it was not)

_log = logging.getLogger(__name__)


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

    @property
    def blocks(self) -> tuple[ConvBNReLU, ...]:
        """The five ConvBNReLU blocks in the order of the fused passes: 1, 2a, 2b, 3a, 3b."""
        return (self.branch1, self.branch2[0], self.branch2[1], self.branch3[0], self.branch3[1])

    def reference_forward(self, h: torch.Tensor) -> torch.Tensor:
        """Eager forward: (B, C, *spatial) -> (B, C, *spatial)."""
        return dense_branch_reference(h, self.branch1, self.branch2, self.branch3)

    def use_fused(self, h: torch.Tensor) -> bool:
        """Whether :meth:`forward` tries the Triton path for this input.

        Triton runs on CUDA, or anywhere in its interpreter (``TRITON_INTERPRET=1``, the CPU tests). BatchNorm
        converted to SyncBatchNorm needs statistics over all ranks, which the fused kernels do not compute. In
        eval mode with gradients wanted (rare) autograd runs the eager path: the fused kernels have no backward
        with running statistics.
        """
        return (
            self.fused
            and self.dims == 2
            and (h.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1")
            and os.environ.get(_DISABLE_ENV, "0") != "1"
            and not _fused_failure
            and not any(isinstance(m, nn.SyncBatchNorm) for m in self.modules())
            and not running_statistics_with_gradients(h, self.blocks)
            and triton_available()
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(B, C, *spatial) -> (B, C, *spatial); see the module docstring. A compiled model runs the eager form,
        whose kernels the compiler generates itself (the fused path's first-call check cannot be traced)."""
        if not torch.compiler.is_compiling() and self.use_fused(h):
            out = self._fused_forward(h)
            if out is not None:
                return out
        return self.reference_forward(h)

    def _fused_forward(self, h: torch.Tensor) -> torch.Tensor | None:
        """The fused result; None when the fused path failed its first-call check (it is then off for good)."""
        from . import dense_branch_autograd  # imports Triton: only when the fused path is tried

        kind = (h.device.type, h.dtype, self.training)
        if kind in _checked_kinds:
            return dense_branch_autograd.fused_dense_branch(h, self.blocks)
        # in training the eager check runs on a copy, whose BatchNorm statistics absorb its step
        reference = copy.deepcopy(self) if self.training else self
        buffers = {name: b.clone() for name, b in self.named_buffers()}
        try:
            out = dense_branch_autograd.fused_dense_branch(h, self.blocks)
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
