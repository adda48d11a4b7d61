"""Launchers of the dense branch's Triton kernels: input checks (which raise on bad input), grids, buffers, the
one-launch inference call and the BatchNorm finalize calls of the training passes.

They read the branch as its five :class:`~dcris.kernels.dense_branch_ref.ConvBNReLU` blocks in pass order (1, 2a,
2b, 3a, 3b; ``DenseBranch.blocks``): the widths come from the convolutions, the parameters and BatchNorm buffers
are used in place."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import triton
from torch import nn

from .dense_branch_bwd import _bn_stats_bwd_kernel
from .dense_branch_fwd import _bn_stats_fwd_kernel, _dense_branch_fwd_kernel
from .dense_branch_ref import ConvBNReLU

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_DOT_MODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_BLOCK_P_TRAIN = 64  # pixels per program in the training passes
_BLOCK_P_INFER = 128  # pixels per program-block in the inference kernel
_SUB_INFER = 64  # pixels per chunk inside the inference stages (one software-pipeline stage: Hopper's default of
# three needs 308 KiB of shared memory for this kernel, over the 227 KiB a program may have)
_BLOCK_R = 64  # partial rows per step in the finalize kernels
_PASS_NAMES = ("1", "2a", "2b", "3a", "3b")  # the blocks in pass order


# ----------------------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------------------
def _pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def _squeeze_pad(s: int) -> int:
    """Padded width of a squeeze conv: tl.dot needs at least 16 along every dimension."""
    return max(16, triton.next_power_of_2(s))


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _dot_mode(dtype: torch.dtype) -> int:
    """The DOT constexpr of :func:`_mm` for an input dtype."""
    if dtype == torch.bfloat16 and _interpreting():
        return 3
    return _DOT_MODE[dtype]


def _grad_dot_mode(dtype: torch.dtype) -> int:
    """The DOT constexpr of the gradient products: about fp32 accuracy whatever the input dtype.

    Weight gradients are sums over pixels of products that cancel heavily (BatchNorm's backward removes the
    mean and the xhat component of dz), so bf16 operands there cost 3-20% relative error; 3xTF32 keeps
    them within 1e-2 of the fp32 reference at a small price (the gradient products are a few MFLOP/pixel).
    """
    if dtype == torch.float32 or _interpreting():
        return 0
    return 4


def _check_inputs(h: torch.Tensor, blocks: Sequence[ConvBNReLU]) -> torch.Tensor:
    """Validate h and the blocks for the fused kernels; returns h with a flattenable pixel stride."""
    if not all(isinstance(cbr.conv, nn.Conv2d) for cbr in blocks):
        raise ValueError(f"the fused dense branch supports dims=2 only, got {type(blocks[0].conv).__name__} blocks")
    m = _meta(blocks)
    c, widths = m["C"], tuple(m[k] for k in ("W1", "S2", "W2", "S3", "W3"))
    if not all(_pow2(m[k]) and m[k] >= 16 for k in ("C", "W1", "W2", "W3")) or max(m["S2"], m["S3"]) > 16:
        raise ValueError(
            f"the fused dense branch needs power-of-two channels/branch widths >= 16 and squeeze widths <= 16, "
            f"got channels={c}, widths={widths}"
        )
    if not isinstance(h, torch.Tensor) or h.dim() != 4:
        raise ValueError(f"h must be a 4-D (B, C, H, W) tensor, got shape {tuple(getattr(h, 'shape', ()))}")
    if h.shape[1] != c:
        raise ValueError(f"h must have {c} channels, got shape {tuple(h.shape)}")
    if h.dtype not in _DTYPES:
        raise TypeError(f"h must be float32, bfloat16 or float16, got {h.dtype}")
    if h.numel() == 0:
        raise ValueError(f"h is empty: shape {tuple(h.shape)}")
    if not (h.is_cuda or _interpreting()):
        raise ValueError(f"h must be a CUDA tensor (or run under TRITON_INTERPRET=1), got device {h.device}")
    for i, cbr in zip(_PASS_NAMES, blocks, strict=True):
        for name, prm in cbr.named_parameters():
            if prm.device != h.device:
                raise ValueError(f"parameter {name} of block {i} is on {prm.device} but h is on {h.device}")
        if not cbr.bn.affine:
            raise ValueError(f"the BatchNorm of block {i} must be affine")
    return _flat_pixels(h)


def _flat_pixels(t: torch.Tensor) -> torch.Tensor:
    """t (B, C, H, W) with H and W flattenable into one pixel index of stride t.stride(3) (a copy if needed)."""
    if t.stride(2) != t.shape[3] * t.stride(3):
        t = t.contiguous()
    return t


def _pixel_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(image, channel, pixel) strides of a (B, C, H, W) tensor from :func:`_flat_pixels`."""
    return t.stride(0), t.stride(1), t.stride(3)


def _f32(*shape: int, device: torch.device) -> torch.Tensor:
    """Uninitialized fp32 buffer."""
    return torch.empty(*shape, device=device, dtype=torch.float32)


def _train_grid(h: torch.Tensor) -> tuple[int, int, int, int, int]:
    """(N = B*H*W, H*W, H, W, number of programs) of the training passes over h (B, C, H, W)."""
    bsz, _, hh, ww = h.shape
    n = bsz * hh * ww
    return n, hh * ww, hh, ww, triton.cdiv(n, _BLOCK_P_TRAIN)


def _meta(blocks: Sequence[ConvBNReLU]) -> dict[str, int]:
    """Channels C, branch widths W1..W3 and squeeze widths S2, S3 (padded: S2P, S3P), read from the convolutions."""
    c = blocks[0].conv.in_channels
    w1, s2, w2, s3, w3 = (cbr.conv.out_channels for cbr in blocks)
    return dict(C=c, W1=w1, S2=s2, S2P=_squeeze_pad(s2), W2=w2, S3=s3, S3P=_squeeze_pad(s3), W3=w3)


def _dense_branch_infer(h: torch.Tensor, blocks: Sequence[ConvBNReLU]) -> torch.Tensor:
    """Eval-mode forward in one launch (BatchNorm with running statistics)."""
    bsz, c, hh, ww = h.shape
    meta = _meta(blocks)
    n, hw = bsz * hh * ww, hh * ww
    out = torch.empty_like(h)
    n_blocks = triton.cdiv(n, _BLOCK_P_INFER)
    nprog = n_blocks
    if h.is_cuda:
        nprog = min(n_blocks, 4 * torch.cuda.get_device_properties(h.device).multi_processor_count)
    region = _BLOCK_P_INFER + 6 * ww + 6
    sc = meta["W1"] + meta["S2P"] + meta["W2"] + meta["S3P"]
    scratch = _f32(nprog, region, sc, device=h.device)  # per-program slabs
    args = []
    for cbr in blocks:
        args += [cbr.conv.weight, cbr.conv.bias, cbr.bn.weight, cbr.bn.bias, cbr.bn.running_mean, cbr.bn.running_var]
    _dense_branch_fwd_kernel[(nprog,)](
        h, out, *args, scratch, *[cbr.bn.eps for cbr in blocks],
        n, hw, hh, ww, n_blocks, region,
        *_pixel_strides(h), *_pixel_strides(out),
        **meta, BLOCK_P=_BLOCK_P_INFER, SUB=_SUB_INFER, DOT=_dot_mode(h.dtype), num_warps=4, num_stages=1,
    )  # fmt: skip
    return out


def _bn_forward_stats(part: torch.Tensor, bn: nn.BatchNorm2d, n: int, cp: int, n_prog: int) -> torch.Tensor:
    """Finalize one BatchNorm's batch statistics (and update its running statistics); returns (4, cp)."""
    st = _f32(4, cp, device=part.device)
    update = bn.track_running_stats and bn.running_mean is not None
    momentum = 0.0 if bn.momentum is None else bn.momentum
    dummy = st  # never dereferenced when UPDATE is False
    _bn_stats_fwd_kernel[(1,)](
        part, bn.weight, bn.bias,
        bn.running_mean if update else dummy, bn.running_var if update else dummy,
        bn.num_batches_tracked if update else dummy,
        st, n_prog, n, bn.eps, momentum,
        C=bn.num_features, CP=cp, BLOCK_P=_BLOCK_P_TRAIN, BLOCK_R=_BLOCK_R,
        UPDATE=update, CUMULATIVE=bn.momentum is None,
    )  # fmt: skip
    return st


def _bn_backward_stats(
    part: torch.Tensor, st: torch.Tensor, bn: nn.BatchNorm2d, n: int, cp: int, n_prog: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Finalize one BatchNorm's backward sums; returns (coef (3, cp), dgamma (C,), dbeta (C,))."""
    coef = _f32(3, cp, device=part.device)
    dgamma = _f32(bn.num_features, device=part.device)
    dbeta = torch.empty_like(dgamma)
    _bn_stats_bwd_kernel[(1,)](
        part, st, bn.weight, dgamma, dbeta, coef, n_prog, n, C=bn.num_features, CP=cp, BLOCK_R=_BLOCK_R
    )
    return coef, dgamma, dbeta
