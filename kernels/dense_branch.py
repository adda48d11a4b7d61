"""Fused Triton kernels for the DenseCrossAdapter's dense branch (SPEC section 2, "Inside DA").

The eager reference and the module live in :mod:`kernels.dense_branch_ref`. Notation, per pixel, with
``bn(z) = a * z + d`` per channel and C = 128, widths (W1, S2, W2, S3, W3) = (64, 8, 32, 8, 32)::

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

import os

import torch
import triton
import triton.language as tl
from torch import nn

from .dense_branch_ref import DenseBranch

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_DOT_MODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_BLOCK_P_TRAIN = 64  # pixels per program in the training passes
_BLOCK_P_INFER = 128  # pixels per program-block in the inference kernel
_SUB_INFER = 64  # pixels per chunk inside the inference stages (one software-pipeline stage: Hopper's default of
# three needs 308 KiB of shared memory for this kernel, over the 227 KiB a program may have)
_BLOCK_R = 64  # partial rows per step in the finalize kernels


# ----------------------------------------------------------------------------------------------------------------
# jit helpers
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _mm(a, b, DOT: tl.constexpr):
    """(M, K) @ (K, N) with fp32 accumulation.

    DOT 0 = IEEE fp32, 1 = bf16 operands, 2 = fp16 operands, 3 = operands rounded to bf16 and multiplied in
    fp32 (the same numbers as 1; used under TRITON_INTERPRET, whose bf16 tl.dot returns garbage), 4 = 3xTF32
    (about fp32 accuracy on tensor cores).
    """
    if DOT == 0:
        return tl.dot(a, b, input_precision="ieee")
    elif DOT == 1:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    elif DOT == 2:
        return tl.dot(a.to(tl.float16), b.to(tl.float16))
    elif DOT == 3:
        return tl.dot(a.to(tl.bfloat16).to(tl.float32), b.to(tl.bfloat16).to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision="tf32x3")


@triton.jit
def _load_map(ptr, b, p, mask, s_b, s_c, s_p, C0: tl.constexpr, CW: tl.constexpr):
    """Channels [C0, C0 + CW) of a (B, C, H, W) map at (image b, pixel p) as (P, CW) fp32."""
    c = C0 + tl.arange(0, CW)
    offs = b[:, None] * s_b + p[:, None] * s_p + c[None, :] * s_c
    return tl.load(ptr + offs, mask=mask[:, None], other=0.0).to(tl.float32)


@triton.jit
def _store_map(ptr, val, b, p, mask, s_b, s_c, s_p, C0: tl.constexpr, CW: tl.constexpr):
    """Store (P, CW) into channels [C0, C0 + CW) of a (B, C, H, W) map."""
    c = C0 + tl.arange(0, CW)
    offs = b[:, None] * s_b + p[:, None] * s_p + c[None, :] * s_c
    tl.store(ptr + offs, val.to(ptr.dtype.element_ty), mask=mask[:, None])


@triton.jit
def _load_rows(ptr, n, mask, ld, C: tl.constexpr, CP: tl.constexpr):
    """Rows n of a row-major (rows, ld) buffer, first C columns padded to CP with zeros: (P, CP) fp32."""
    c = tl.arange(0, CP)
    offs = n[:, None] * ld + c[None, :]
    return tl.load(ptr + offs, mask=mask[:, None] & (c[None, :] < C), other=0.0).to(tl.float32)


@triton.jit
def _store_rows(ptr, val, n, mask, ld, C: tl.constexpr, CP: tl.constexpr):
    """Store the first C of CP columns of (P, CP) into rows n of a row-major (rows, ld) buffer."""
    c = tl.arange(0, CP)
    offs = n[:, None] * ld + c[None, :]
    tl.store(ptr + offs, val.to(ptr.dtype.element_ty), mask=mask[:, None] & (c[None, :] < C))


@triton.jit
def _load_vec(ptr, C: tl.constexpr, CP: tl.constexpr):
    """(C,) vector padded to (CP,) with zeros, fp32."""
    c = tl.arange(0, CP)
    return tl.load(ptr + c, mask=c < C, other=0.0).to(tl.float32)


@triton.jit
def _load_w1x1(w_ptr, K0: tl.constexpr, K: tl.constexpr, CIN: tl.constexpr, CO: tl.constexpr, COP: tl.constexpr):
    """Input channels [K0, K0 + K) of a 1x1 conv weight (CO, CIN) as the (K, COP) matrix w[o, K0 + k]."""
    k = tl.arange(0, K)
    o = tl.arange(0, COP)
    offs = o[None, :] * CIN + (K0 + k)[:, None]
    return tl.load(w_ptr + offs, mask=o[None, :] < CO, other=0.0).to(tl.float32)


@triton.jit
def _load_w1x1_t(w_ptr, K0: tl.constexpr, K: tl.constexpr, CIN: tl.constexpr, CO: tl.constexpr, COP: tl.constexpr):
    """Transpose of :func:`_load_w1x1`: (COP, K)."""
    k = tl.arange(0, K)
    o = tl.arange(0, COP)
    offs = o[:, None] * CIN + (K0 + k)[None, :]
    return tl.load(w_ptr + offs, mask=o[:, None] < CO, other=0.0).to(tl.float32)


@triton.jit
def _load_wtap(w_ptr, t, S: tl.constexpr, SP: tl.constexpr, CO: tl.constexpr, KK: tl.constexpr):
    """Tap t of a kxk conv weight (CO, S, k, k) as the (SP, CO) matrix w[o, s, t], rows >= S zero."""
    s = tl.arange(0, SP)
    o = tl.arange(0, CO)
    offs = o[None, :] * (S * KK) + s[:, None] * KK + t
    return tl.load(w_ptr + offs, mask=s[:, None] < S, other=0.0).to(tl.float32)


@triton.jit
def _load_wtap_t(w_ptr, t, S: tl.constexpr, SP: tl.constexpr, CO: tl.constexpr, KK: tl.constexpr):
    """Transpose of :func:`_load_wtap`: (CO, SP)."""
    s = tl.arange(0, SP)
    o = tl.arange(0, CO)
    offs = o[:, None] * (S * KK) + s[None, :] * KK + t
    return tl.load(w_ptr + offs, mask=s[None, :] < S, other=0.0).to(tl.float32)


@triton.jit
def _eval_affine(g_ptr, b_ptr, rm_ptr, rv_ptr, eps, C: tl.constexpr, CP: tl.constexpr):
    """Eval-mode BatchNorm as (scale, shift), each (CP,), zero in padded channels."""
    a = _load_vec(g_ptr, C, CP) / tl.sqrt(_load_vec(rv_ptr, C, CP) + eps)
    return a, _load_vec(b_ptr, C, CP) - _load_vec(rm_ptr, C, CP) * a


@triton.jit
def _train_affine(st_ptr, CP: tl.constexpr):
    """(scale, shift) rows of a finalized stats buffer (4, CP): mean, rstd, scale, shift."""
    c = tl.arange(0, CP)
    return tl.load(st_ptr + 2 * CP + c), tl.load(st_ptr + 3 * CP + c)


@triton.jit
def _xhat(z, st_ptr, CP: tl.constexpr):
    """(z - mean) * rstd from a finalized stats buffer (4, CP)."""
    c = tl.arange(0, CP)
    return (z - tl.load(st_ptr + c)[None, :]) * tl.load(st_ptr + CP + c)[None, :]


@triton.jit
def _bn_relu(z, a, d):
    """relu(a * z + d) with per-channel a, d."""
    return tl.maximum(z * a[None, :] + d[None, :], 0.0)


@triton.jit
def _bn_dz(g, z, mask, st_ptr, coef_ptr, CP: tl.constexpr):
    """Training BatchNorm input gradient k1 * (g - k2 - xhat * k3), zero on masked rows: (P, CP)."""
    c = tl.arange(0, CP)
    k1 = tl.load(coef_ptr + c)
    k2 = tl.load(coef_ptr + CP + c)
    k3 = tl.load(coef_ptr + 2 * CP + c)
    dz = k1[None, :] * (g - k2[None, :] - _xhat(z, st_ptr, CP) * k3[None, :])
    return tl.where(mask[:, None], dz, 0.0)


@triton.jit
def _pixel_block(pid, N, HW, W, BLOCK_P: tl.constexpr):
    """Flattened pixel indices n of block pid with validity, image b, in-image index p, row y, column x."""
    n = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    mask = n < N
    b = n // HW
    p = n % HW
    return n, mask, b, p, p // W, p % W


@triton.jit
def _store_moments(part_ptr, z, mask, CP: tl.constexpr):
    """Per-program [sum, sum of squares about the block mean] of z (P, CP) into part_ptr (2, CP)."""
    c = tl.arange(0, CP)
    zm = tl.where(mask[:, None], z, 0.0)
    s = tl.sum(zm, axis=0)
    mean = s / tl.sum(mask.to(tl.float32), axis=0)
    dev = tl.where(mask[:, None], z - mean[None, :], 0.0)
    tl.store(part_ptr + c, s)
    tl.store(part_ptr + CP + c, tl.sum(dev * dev, axis=0))


@triton.jit
def _store_grad_sums(part_ptr, g, z, mask, st_ptr, CP: tl.constexpr):
    """Per-program [sum g, sum g * xhat] of g, z (P, CP) into part_ptr (2, CP)."""
    c = tl.arange(0, CP)
    gm = tl.where(mask[:, None], g, 0.0)
    tl.store(part_ptr + c, tl.sum(gm, axis=0))
    tl.store(part_ptr + CP + c, tl.sum(gm * _xhat(z, st_ptr, CP), axis=0))


@triton.jit
def _store_w1x1_grad(
    part_ptr, dw, K0: tl.constexpr, K: tl.constexpr, CIN: tl.constexpr, CO: tl.constexpr, COP: tl.constexpr
):
    """Store a (K, COP) gradient block into input channels [K0, K0 + K) of a (CO, CIN) weight partial."""
    k = tl.arange(0, K)
    o = tl.arange(0, COP)
    tl.store(part_ptr + o[None, :] * CIN + (K0 + k)[:, None], dw, mask=o[None, :] < CO)


@triton.jit
def _z1(hx, w1_ptr, c1_ptr, C: tl.constexpr, W1: tl.constexpr, DOT: tl.constexpr):
    """z1 = conv1x1(h) from h (P, C): (P, W1)."""
    return _mm(hx, _load_w1x1(w1_ptr, 0, C, C, W1, W1), DOT) + _load_vec(c1_ptr, W1, W1)[None, :]


@triton.jit
def _b1(hx, w1_ptr, c1_ptr, a1, d1, C: tl.constexpr, W1: tl.constexpr, DOT: tl.constexpr):
    """(z1, b1) from h (P, C): z1 = conv1x1(h), b1 = relu(a1 * z1 + d1); each (P, W1)."""
    z1 = _z1(hx, w1_ptr, c1_ptr, C, W1, DOT)
    return z1, _bn_relu(z1, a1, d1)


@triton.jit
def _train_b1(
    h_ptr, b, p, mask, s_hb, s_hc, s_hp, w1_ptr, c1_ptr, st1_ptr, C: tl.constexpr, W1: tl.constexpr, DOT: tl.constexpr
):
    """(h, z1, b1) at (image b, pixel p), b1 with the batch statistics st1 (4, W1): (P, C), (P, W1), (P, W1)."""
    hx = _load_map(h_ptr, b, p, mask, s_hb, s_hc, s_hp, 0, C)
    a1, d1 = _train_affine(st1_ptr, W1)
    z1, b1 = _b1(hx, w1_ptr, c1_ptr, a1, d1, C, W1, DOT)
    return hx, z1, b1


@triton.jit
def _squeeze_hb1(
    hx, b1, w_ptr, C: tl.constexpr, W1: tl.constexpr, CIN: tl.constexpr, S: tl.constexpr, SP: tl.constexpr,
    DOT: tl.constexpr,
):  # fmt: skip
    """The [h, b1] input channels of a squeeze conv1x1 with weight (S, CIN), no bias: (P, SP)."""
    return _mm(hx, _load_w1x1(w_ptr, 0, C, CIN, S, SP), DOT) + _mm(b1, _load_w1x1(w_ptr, C, W1, CIN, S, SP), DOT)


@triton.jit
def _tap(t, K: tl.constexpr):
    """Offset (dy, dx) of tap t of a KxK 'same' conv."""
    return t // K - K // 2, t % K - K // 2


@triton.jit
def _in_image(mask, y, x, dy, dx, H, W):
    """mask where pixel (y + dy, x + dx) lies inside the H x W image."""
    return mask & (y + dy >= 0) & (y + dy < H) & (x + dx >= 0) & (x + dx < W)


@triton.jit
def _store_out(
    h_ptr, out_ptr, b1, b2, b3, b, p, mask, s_hb, s_hc, s_hp, s_ob, s_oc, s_op,
    W1: tl.constexpr, W2: tl.constexpr, W3: tl.constexpr,
):  # fmt: skip
    """out = [b1, b2, b3] + h at (image b, pixel p)."""
    b1 += _load_map(h_ptr, b, p, mask, s_hb, s_hc, s_hp, 0, W1)
    b2 += _load_map(h_ptr, b, p, mask, s_hb, s_hc, s_hp, W1, W2)
    b3 += _load_map(h_ptr, b, p, mask, s_hb, s_hc, s_hp, W1 + W2, W3)
    _store_map(out_ptr, b1, b, p, mask, s_ob, s_oc, s_op, 0, W1)
    _store_map(out_ptr, b2, b, p, mask, s_ob, s_oc, s_op, W1, W2)
    _store_map(out_ptr, b3, b, p, mask, s_ob, s_oc, s_op, W1 + W2, W3)


@triton.jit
def _store_z(z_ptr, part_ptr, pid, z, n, mask, C: tl.constexpr, CP: tl.constexpr):
    """Store a pre-BN output z (P, CP) into rows n of (N, C) and its moments into program pid's (2, CP) partial."""
    _store_rows(z_ptr, z, n, mask, C, C, CP)
    _store_moments(part_ptr + pid * 2 * CP, z, mask, CP)


@triton.jit
def _store_g(g_ptr, part_ptr, pid, g, z, n, mask, st_ptr, C: tl.constexpr, CP: tl.constexpr):
    """Store a BN-output gradient g (P, CP) into rows n of (N, C) and its sums into program pid's (2, CP) partial."""
    _store_rows(g_ptr, g, n, mask, C, C, CP)
    _store_grad_sums(part_ptr + pid * 2 * CP, g, z, mask, st_ptr, CP)


@triton.jit
def _load_dz(g_ptr, z_ptr, st_ptr, coef_ptr, n, mask, C: tl.constexpr, CP: tl.constexpr):
    """BatchNorm input gradient from the stored g and pre-BN z, rows n of (N, C) each: (P, CP)."""
    g = _load_rows(g_ptr, n, mask, C, C, CP)
    return _bn_dz(g, _load_rows(z_ptr, n, mask, C, C, CP), mask, st_ptr, coef_ptr, CP)


@triton.jit
def _store_bias_grad(ptr, dz, C: tl.constexpr, CP: tl.constexpr):
    """Store the bias gradient (C,) = column sums of dz (P, CP)."""
    c = tl.arange(0, CP)
    tl.store(ptr + c, tl.sum(dz, axis=0), mask=c < C)


@triton.jit
def _load_partial(part_ptr, r, n_prog, ROW: tl.constexpr, CP: tl.constexpr):
    """Row ROW of the (2, CP) partials of programs r, zero past n_prog: (BLOCK_R, CP)."""
    c = tl.arange(0, CP)
    return tl.load(part_ptr + r[:, None] * 2 * CP + ROW * CP + c[None, :], mask=r[:, None] < n_prog, other=0.0)


@triton.jit
def _slab_conv(
    slab_ptr, r, mask, y, x, H, W, w_ptr, SC: tl.constexpr, S: tl.constexpr, SP: tl.constexpr, CO: tl.constexpr,
    K: tl.constexpr, SUB: tl.constexpr, DOT: tl.constexpr,
):  # fmt: skip
    """convKxK (zero padding, no bias) of the (SP-wide) scratch columns at slab_ptr, rows r: (SUB, CO)."""
    acc = tl.zeros((SUB, CO), tl.float32)
    for t in tl.static_range(K * K):
        dy, dx = _tap(t, K)
        v = _in_image(mask, y, x, dy, dx, H, W)
        s = _load_rows(slab_ptr, r + dy * W + dx, v, SC, SP, SP)  # (SUB, SP)
        acc += _mm(s, _load_wtap(w_ptr, t, S, SP, CO, K * K), DOT)
    return acc


# ----------------------------------------------------------------------------------------------------------------
# inference: one launch
# ----------------------------------------------------------------------------------------------------------------
# fmt: off  (kernel arguments stay grouped per tensor, each group with its shape comment)
@triton.jit
def _dense_branch_fwd_kernel(
    h_ptr,  # (B, C, H, W), pixel stride s_hp (contiguous or channels-last)
    out_ptr,  # (B, C, H, W), pixel stride s_op
    w1_ptr,
    c1_ptr,
    g1_ptr,
    be1_ptr,
    rm1_ptr,
    rv1_ptr,  # (W1, C, 1, 1), then (W1,) x5
    w2a_ptr,
    c2a_ptr,
    g2a_ptr,
    be2a_ptr,
    rm2a_ptr,
    rv2a_ptr,  # (S2, C + W1, 1, 1), then (S2,) x5
    w2b_ptr,
    c2b_ptr,
    g2b_ptr,
    be2b_ptr,
    rm2b_ptr,
    rv2b_ptr,  # (W2, S2, 3, 3), then (W2,) x5
    w3a_ptr,
    c3a_ptr,
    g3a_ptr,
    be3a_ptr,
    rm3a_ptr,
    rv3a_ptr,  # (S3, C + W1 + W2, 1, 1), then (S3,) x5
    w3b_ptr,
    c3b_ptr,
    g3b_ptr,
    be3b_ptr,
    rm3b_ptr,
    rv3b_ptr,  # (W3, S3, 5, 5), then (W3,) x5
    scratch_ptr,  # (n_programs, REGION, W1 + S2P + W2 + S3P) fp32, per-program slab
    eps1,
    eps2a,
    eps2b,
    eps3a,
    eps3b,
    N,
    HW,
    H,
    W,
    n_blocks,
    region,
    s_hb,
    s_hc,
    s_hp,
    s_ob,
    s_oc,
    s_op,
    C: tl.constexpr,
    W1: tl.constexpr,
    S2: tl.constexpr,
    S2P: tl.constexpr,
    W2: tl.constexpr,
    S3: tl.constexpr,
    S3P: tl.constexpr,
    W3: tl.constexpr,
    BLOCK_P: tl.constexpr,
    SUB: tl.constexpr,
    DOT: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    SC: tl.constexpr = W1 + S2P + W2 + S3P  # scratch row: [b1 | s2 | b2 | s3]
    OFF_S2: tl.constexpr = W1
    OFF_B2: tl.constexpr = W1 + S2P
    OFF_S3: tl.constexpr = W1 + S2P + W2
    CIN2: tl.constexpr = C + W1
    CIN3: tl.constexpr = C + W1 + W2
    slab = scratch_ptr + pid * region * SC
    a1, d1 = _eval_affine(g1_ptr, be1_ptr, rm1_ptr, rv1_ptr, eps1, W1, W1)
    a2a, d2a = _eval_affine(g2a_ptr, be2a_ptr, rm2a_ptr, rv2a_ptr, eps2a, S2, S2P)
    a2b, d2b = _eval_affine(g2b_ptr, be2b_ptr, rm2b_ptr, rv2b_ptr, eps2b, W2, W2)
    a3a, d3a = _eval_affine(g3a_ptr, be3a_ptr, rm3a_ptr, rv3a_ptr, eps3a, S3, S3P)
    a3b, d3b = _eval_affine(g3b_ptr, be3b_ptr, rm3b_ptr, rv3b_ptr, eps3b, W3, W3)
    c2a = _load_vec(c2a_ptr, S2, S2P)
    c2b = _load_vec(c2b_ptr, W2, W2)
    c3a = _load_vec(c3a_ptr, S3, S3P)
    c3b = _load_vec(c3b_ptr, W3, W3)
    halo = 3 * W + 3
    for blk in range(pid, n_blocks, nprog):
        r_start = blk * BLOCK_P - halo  # flattened index of slab row 0
        # stage A: b1, s2 on the whole slab
        for r0 in range(0, region, SUB):
            r = r0 + tl.arange(0, SUB)
            n = r_start + r
            m = (r < region) & (n >= 0) & (n < N)
            hx = _load_map(h_ptr, n // HW, n % HW, m, s_hb, s_hc, s_hp, 0, C)  # (SUB, C)
            z1, b1 = _b1(hx, w1_ptr, c1_ptr, a1, d1, C, W1, DOT)
            z2a = _squeeze_hb1(hx, b1, w2a_ptr, C, W1, CIN2, S2, S2P, DOT) + c2a[None, :]
            _store_rows(slab, b1, r, m, SC, W1, W1)
            _store_rows(slab + OFF_S2, _bn_relu(z2a, a2a, d2a), r, m, SC, S2P, S2P)
        tl.debug_barrier()
        # stage B: b2 (3x3 over s2), s3 on the slab minus W + 1 rows at each end
        for r0 in range(0, region - 2 * (W + 1), SUB):
            r = W + 1 + r0 + tl.arange(0, SUB)
            n = r_start + r
            m = (r < region - (W + 1)) & (n >= 0) & (n < N)
            p = n % HW
            y = p // W
            x = p % W
            acc = _slab_conv(slab + OFF_S2, r, m, y, x, H, W, w2b_ptr, SC, S2, S2P, W2, 3, SUB, DOT)
            b2 = _bn_relu(acc + c2b[None, :], a2b, d2b)
            hx = _load_map(h_ptr, n // HW, p, m, s_hb, s_hc, s_hp, 0, C)
            b1 = _load_rows(slab, r, m, SC, W1, W1)
            z3a = (
                _squeeze_hb1(hx, b1, w3a_ptr, C, W1, CIN3, S3, S3P, DOT)
                + _mm(b2, _load_w1x1(w3a_ptr, C + W1, W2, CIN3, S3, S3P), DOT)
                + c3a[None, :]
            )
            _store_rows(slab + OFF_B2, b2, r, m, SC, W2, W2)
            _store_rows(slab + OFF_S3, _bn_relu(z3a, a3a, d3a), r, m, SC, S3P, S3P)
        tl.debug_barrier()
        # stage C: b3 (5x5 over s3) and the output on the block itself
        for r0 in range(0, BLOCK_P, SUB):
            r = halo + r0 + tl.arange(0, SUB)
            n = r_start + r
            m = n < N
            b = n // HW
            p = n % HW
            y = p // W
            x = p % W
            acc = _slab_conv(slab + OFF_S3, r, m, y, x, H, W, w3b_ptr, SC, S3, S3P, W3, 5, SUB, DOT)
            b3 = _bn_relu(acc + c3b[None, :], a3b, d3b)
            b1 = _load_rows(slab, r, m, SC, W1, W1)
            b2 = _load_rows(slab + OFF_B2, r, m, SC, W2, W2)
            _store_out(h_ptr, out_ptr, b1, b2, b3, b, p, m, s_hb, s_hc, s_hp, s_ob, s_oc, s_op, W1, W2, W3)
        tl.debug_barrier()


# ----------------------------------------------------------------------------------------------------------------
# training forward passes
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _dense_branch_z1_fwd_kernel(
    h_ptr,  # (B, C, H, W), pixel stride s_hp
    w1_ptr,
    c1_ptr,  # (W1, C, 1, 1), (W1,)
    part_ptr,  # (n_programs, 2, W1) moments of z1
    N,
    HW,
    W,
    s_hb,
    s_hc,
    s_hp,
    C: tl.constexpr,
    W1: tl.constexpr,
    BLOCK_P: tl.constexpr,
    DOT: tl.constexpr,
):
    """F1: moments of z1 = conv1x1(h)."""
    pid = tl.program_id(0)
    n, mask, b, p, y, x = _pixel_block(pid, N, HW, W, BLOCK_P)
    hx = _load_map(h_ptr, b, p, mask, s_hb, s_hc, s_hp, 0, C)
    _store_moments(part_ptr + pid * 2 * W1, _z1(hx, w1_ptr, c1_ptr, C, W1, DOT), mask, W1)


@triton.jit
def _dense_branch_squeeze_fwd_kernel(
    h_ptr,  # (B, C, H, W), pixel stride s_hp
    w1_ptr,
    c1_ptr,
    st1_ptr,  # (W1, C, 1, 1), (W1,), (4, W1)
    z2b_ptr,
    st2b_ptr,  # (N, W2), (4, W2); read only when HAS_B2
    w_ptr,
    c_ptr,  # (S, CIN, 1, 1), (S,) with CIN = C + W1 (+ W2 when HAS_B2)
    z_ptr,  # (N, S) out: pre-BN squeeze output
    part_ptr,  # (n_programs, 2, SP) moments of z
    N,
    HW,
    W,
    s_hb,
    s_hc,
    s_hp,
    C: tl.constexpr,
    W1: tl.constexpr,
    W2: tl.constexpr,
    S: tl.constexpr,
    SP: tl.constexpr,
    HAS_B2: tl.constexpr,
    BLOCK_P: tl.constexpr,
    DOT: tl.constexpr,
):
    """F2 / F4: z2a = conv1x1([h, b1]) or z3a = conv1x1([h, b1, b2]), stored, with their moments."""
    pid = tl.program_id(0)
    n, mask, b, p, y, x = _pixel_block(pid, N, HW, W, BLOCK_P)
    CIN: tl.constexpr = C + W1 + W2 * HAS_B2
    hx, z1, b1 = _train_b1(h_ptr, b, p, mask, s_hb, s_hc, s_hp, w1_ptr, c1_ptr, st1_ptr, C, W1, DOT)
    z = _squeeze_hb1(hx, b1, w_ptr, C, W1, CIN, S, SP, DOT) + _load_vec(c_ptr, S, SP)[None, :]
    if HAS_B2:
        a2b, d2b = _train_affine(st2b_ptr, W2)
        b2 = _bn_relu(_load_rows(z2b_ptr, n, mask, W2, W2, W2), a2b, d2b)
        z += _mm(b2, _load_w1x1(w_ptr, C + W1, W2, CIN, S, SP), DOT)
    _store_z(z_ptr, part_ptr, pid, z, n, mask, S, SP)


@triton.jit
def _dense_branch_conv_fwd_kernel(
    zin_ptr,
    stin_ptr,  # (N, S) pre-BN squeeze output, (4, SP) its stats
    w_ptr,
    c_ptr,  # (CO, S, K, K), (CO,)
    z_ptr,  # (N, CO) out: pre-BN conv output
    part_ptr,  # (n_programs, 2, CO) moments of z
    N,
    HW,
    H,
    W,
    S: tl.constexpr,
    SP: tl.constexpr,
    CO: tl.constexpr,
    K: tl.constexpr,
    BLOCK_P: tl.constexpr,
    DOT: tl.constexpr,
):
    """F3 / F5: z = convKxK(relu(bn(zin))) (zero padding), stored, with its moments."""
    pid = tl.program_id(0)
    n, mask, b, p, y, x = _pixel_block(pid, N, HW, W, BLOCK_P)
    a, d = _train_affine(stin_ptr, SP)
    acc = tl.zeros((BLOCK_P, CO), tl.float32)
    for t in tl.static_range(K * K):
        dy, dx = _tap(t, K)
        v = _in_image(mask, y, x, dy, dx, H, W)
        s = tl.where(v[:, None], _bn_relu(_load_rows(zin_ptr, n + dy * W + dx, v, S, S, SP), a, d), 0.0)
        acc += _mm(s, _load_wtap(w_ptr, t, S, SP, CO, K * K), DOT)
    _store_z(z_ptr, part_ptr, pid, acc + _load_vec(c_ptr, CO, CO)[None, :], n, mask, CO, CO)


@triton.jit
def _dense_branch_out_fwd_kernel(
    h_ptr,  # (B, C, H, W), pixel stride s_hp
    out_ptr,  # (B, C, H, W), pixel stride s_op
    w1_ptr,
    c1_ptr,
    st1_ptr,  # (W1, C, 1, 1), (W1,), (4, W1)
    z2b_ptr,
    st2b_ptr,  # (N, W2), (4, W2)
    z3b_ptr,
    st3b_ptr,  # (N, W3), (4, W3)
    N,
    HW,
    W,
    s_hb,
    s_hc,
    s_hp,
    s_ob,
    s_oc,
    s_op,
    C: tl.constexpr,
    W1: tl.constexpr,
    W2: tl.constexpr,
    W3: tl.constexpr,
    BLOCK_P: tl.constexpr,
    DOT: tl.constexpr,
):
    """F6: out = [b1, b2, b3] + h."""
    pid = tl.program_id(0)
    n, mask, b, p, y, x = _pixel_block(pid, N, HW, W, BLOCK_P)
    hx, z1, b1 = _train_b1(h_ptr, b, p, mask, s_hb, s_hc, s_hp, w1_ptr, c1_ptr, st1_ptr, C, W1, DOT)
    a2b, d2b = _train_affine(st2b_ptr, W2)
    a3b, d3b = _train_affine(st3b_ptr, W3)
    b2 = _bn_relu(_load_rows(z2b_ptr, n, mask, W2, W2, W2), a2b, d2b)
    b3 = _bn_relu(_load_rows(z3b_ptr, n, mask, W3, W3, W3), a3b, d3b)
    _store_out(h_ptr, out_ptr, b1, b2, b3, b, p, mask, s_hb, s_hc, s_hp, s_ob, s_oc, s_op, W1, W2, W3)


@triton.jit
def _bn_stats_fwd_kernel(
    part_ptr,  # (n_programs, 2, CP) per-program [sum, sum of squares about the program mean]
    gamma_ptr,
    beta_ptr,  # (C,)
    rmean_ptr,
    rvar_ptr,
    nbt_ptr,  # (C,), (C,), () running statistics, updated when UPDATE
    st_ptr,  # (4, CP) out: mean, rstd, scale, shift
    n_prog,
    N,
    eps,
    momentum,
    C: tl.constexpr,
    CP: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_R: tl.constexpr,
    UPDATE: tl.constexpr,
    CUMULATIVE: tl.constexpr,
):
    """Batch statistics from the partial moments (Chan's merge), as nn.BatchNorm computes them in training."""
    c = tl.arange(0, CP)
    cm = c < C
    total = tl.zeros((CP,), tl.float32)
    for r0 in range(0, n_prog, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        total += tl.sum(_load_partial(part_ptr, r, n_prog, 0, CP), 0)
    mean = total / N
    m2 = tl.zeros((CP,), tl.float32)
    for r0 in range(0, n_prog, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        rm = r[:, None] < n_prog
        s = _load_partial(part_ptr, r, n_prog, 0, CP)
        q = _load_partial(part_ptr, r, n_prog, 1, CP)
        cnt = tl.maximum(tl.minimum(N - r * BLOCK_P, BLOCK_P), 1).to(tl.float32)[:, None]
        dev = s / cnt - mean[None, :]
        m2 += tl.sum(tl.where(rm, q + cnt * dev * dev, 0.0), 0)
    var = m2 / N
    rstd = 1.0 / tl.sqrt(var + eps)
    scale = _load_vec(gamma_ptr, C, CP) * rstd
    tl.store(st_ptr + c, mean)
    tl.store(st_ptr + CP + c, rstd)
    tl.store(st_ptr + 2 * CP + c, scale)
    tl.store(st_ptr + 3 * CP + c, _load_vec(beta_ptr, C, CP) - mean * scale)
    if UPDATE:
        nbt = tl.load(nbt_ptr) + 1
        tl.store(nbt_ptr, nbt)
        if CUMULATIVE:
            factor = 1.0 / nbt.to(tl.float32)
        else:
            factor = momentum
        rmean = tl.load(rmean_ptr + c, mask=cm, other=0.0).to(tl.float32)
        rvar = tl.load(rvar_ptr + c, mask=cm, other=0.0).to(tl.float32)
        unbiased = m2 / (N - 1)
        tl.store(rmean_ptr + c, (1.0 - factor) * rmean + factor * mean, mask=cm)
        tl.store(rvar_ptr + c, (1.0 - factor) * rvar + factor * unbiased, mask=cm)


# ----------------------------------------------------------------------------------------------------------------
# training backward passes
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _dense_branch_g3b_bwd_kernel(
    gout_ptr,  # (B, C, H, W) gradient of the output, pixel stride s_gp
    z_ptr,
    st_ptr,  # (N, W3) pre-BN z3b, (4, W3)
    g_ptr,  # (N, W3) out: gradient at bn3b's output
    part_ptr,  # (n_programs, 2, W3) out: [sum g, sum g * xhat]
    N,
    HW,
    W,
    s_gb,
    s_gc,
    s_gp,
    C0: tl.constexpr,
    W3: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """B1: g3b = dout[:, C0:] * (b3 > 0) and its sums."""
    pid = tl.program_id(0)
    n, mask, b, p, y, x = _pixel_block(pid, N, HW, W, BLOCK_P)
    z = _load_rows(z_ptr, n, mask, W3, W3, W3)
    a, d = _train_affine(st_ptr, W3)
    g = tl.where(z * a[None, :] + d[None, :] > 0.0, _load_map(gout_ptr, b, p, mask, s_gb, s_gc, s_gp, C0, W3), 0.0)
    _store_g(g_ptr, part_ptr, pid, g, z, n, mask, st_ptr, W3, W3)


@triton.jit
def _dense_branch_conv_bwd_kernel(
    g_ptr,
    z_ptr,
    st_ptr,
    coef_ptr,  # (N, CO) gradient at the conv's BN output, (N, CO) pre-BN z, (4, CO), (3, CO)
    zin_ptr,
    stin_ptr,  # (N, S) pre-BN squeeze output feeding the conv, (4, SP)
    w_ptr,  # (CO, S, K, K)
    gin_ptr,  # (N, S) out: gradient at the squeeze's BN output
    part_ptr,  # (n_programs, 2, SP) out: [sum gin, sum gin * xhat_in]
    wpart_ptr,  # (n_programs, CO * S * K * K + CO) out: weight and bias gradient partials
    N,
    HW,
    H,
    W,
    S: tl.constexpr,
    SP: tl.constexpr,
    CO: tl.constexpr,
    K: tl.constexpr,
    BLOCK_P: tl.constexpr,
    GDOT: tl.constexpr,
):
    """B2 / B4: backward of z = convKxK(s): ds, dW, dbias from dz, then gin = ds * (s > 0) and its sums."""
    pid = tl.program_id(0)
    n, mask, b, p, y, x = _pixel_block(pid, N, HW, W, BLOCK_P)
    KK: tl.constexpr = K * K
    a_in, d_in = _train_affine(stin_ptr, SP)
    zin = _load_rows(zin_ptr, n, mask, S, S, SP)
    s = tl.where(mask[:, None], _bn_relu(zin, a_in, d_in), 0.0)  # (P, SP)
    wpart = wpart_ptr + pid * (CO * S * KK + CO)
    o = tl.arange(0, CO)
    sp = tl.arange(0, SP)
    ds = tl.zeros((BLOCK_P, SP), tl.float32)
    for t in tl.static_range(KK):
        dy, dx = _tap(t, K)
        # z(q) reads s(q + delta_t): s(n) feeds z(n - delta_t)
        v = _in_image(mask, y, x, -dy, -dx, H, W)
        dz = _load_dz(g_ptr, z_ptr, st_ptr, coef_ptr, n - dy * W - dx, v, CO, CO)
        ds += _mm(dz, _load_wtap_t(w_ptr, t, S, SP, CO, KK), GDOT)
        dw = _mm(tl.trans(s), dz, GDOT)  # (SP, CO)
        tl.store(wpart + o[None, :] * (S * KK) + sp[:, None] * KK + t, dw, mask=sp[:, None] < S)
        if t == KK // 2:
            _store_bias_grad(wpart + CO * S * KK, dz, CO, CO)
    gin = tl.where(mask[:, None] & (zin * a_in[None, :] + d_in[None, :] > 0.0), ds, 0.0)
    _store_g(gin_ptr, part_ptr, pid, gin, zin, n, mask, stin_ptr, S, SP)


@triton.jit
def _dense_branch_squeeze3_bwd_kernel(
    h_ptr,  # (B, C, H, W), pixel stride s_hp
    gout_ptr,  # (B, C, H, W) gradient of the output, pixel stride s_gp
    w1_ptr,
    c1_ptr,
    st1_ptr,  # (W1, C, 1, 1), (W1,), (4, W1)
    z2b_ptr,
    st2b_ptr,  # (N, W2), (4, W2)
    g3a_ptr,
    z3a_ptr,
    st3a_ptr,
    coef3a_ptr,  # (N, S3), (N, S3), (4, S3P), (3, S3P)
    w3a_ptr,  # (S3, C + W1 + W2, 1, 1)
    g2b_ptr,  # (N, W2) out: gradient at bn2b's output
    part_ptr,  # (n_programs, 2, W2) out: [sum g2b, sum g2b * xhat]
    wpart_ptr,  # (n_programs, S3 * (C + W1 + W2) + S3) out: weight and bias gradient partials
    N,
    HW,
    W,
    s_hb,
    s_hc,
    s_hp,
    s_gb,
    s_gc,
    s_gp,
    C: tl.constexpr,
    W1: tl.constexpr,
    W2: tl.constexpr,
    S3: tl.constexpr,
    S3P: tl.constexpr,
    BLOCK_P: tl.constexpr,
    DOT: tl.constexpr,
    GDOT: tl.constexpr,
):
    """B3: backward of z3a = conv1x1([h, b1, b2]): dW3a, dbias, and g2b = (dout_b2 + db2) * (b2 > 0)."""
    pid = tl.program_id(0)
    n, mask, b, p, y, x = _pixel_block(pid, N, HW, W, BLOCK_P)
    CIN: tl.constexpr = C + W1 + W2
    dz3a = _load_dz(g3a_ptr, z3a_ptr, st3a_ptr, coef3a_ptr, n, mask, S3, S3P)  # (P, S3P)
    hx, z1, b1 = _train_b1(h_ptr, b, p, mask, s_hb, s_hc, s_hp, w1_ptr, c1_ptr, st1_ptr, C, W1, DOT)
    a2b, d2b = _train_affine(st2b_ptr, W2)
    z2b = _load_rows(z2b_ptr, n, mask, W2, W2, W2)
    b2 = _bn_relu(z2b, a2b, d2b)
    wpart = wpart_ptr + pid * (S3 * CIN + S3)
    _store_w1x1_grad(wpart, _mm(tl.trans(hx), dz3a, GDOT), 0, C, CIN, S3, S3P)
    _store_w1x1_grad(wpart, _mm(tl.trans(b1), dz3a, GDOT), C, W1, CIN, S3, S3P)
    _store_w1x1_grad(wpart, _mm(tl.trans(b2), dz3a, GDOT), C + W1, W2, CIN, S3, S3P)
    _store_bias_grad(wpart + S3 * CIN, dz3a, S3, S3P)
    up = _load_map(gout_ptr, b, p, mask, s_gb, s_gc, s_gp, W1, W2) + _mm(
        dz3a, _load_w1x1_t(w3a_ptr, C + W1, W2, CIN, S3, S3P), GDOT
    )
    g2b = tl.where(mask[:, None] & (b2 > 0.0), up, 0.0)
    _store_g(g2b_ptr, part_ptr, pid, g2b, z2b, n, mask, st2b_ptr, W2, W2)


@triton.jit
def _dense_branch_squeeze2_bwd_kernel(
    h_ptr,  # (B, C, H, W), pixel stride s_hp
    gout_ptr,  # (B, C, H, W) gradient of the output, pixel stride s_gp
    w1_ptr,
    c1_ptr,
    st1_ptr,  # (W1, C, 1, 1), (W1,), (4, W1)
    g2a_ptr,
    z2a_ptr,
    st2a_ptr,
    coef2a_ptr,  # (N, S2), (N, S2), (4, S2P), (3, S2P)
    g3a_ptr,
    z3a_ptr,
    st3a_ptr,
    coef3a_ptr,  # (N, S3), (N, S3), (4, S3P), (3, S3P)
    w2a_ptr,
    w3a_ptr,  # (S2, C + W1, 1, 1), (S3, C + W1 + W2, 1, 1)
    g1_ptr,  # (N, W1) out: gradient at bn1's output
    part_ptr,  # (n_programs, 2, W1) out: [sum g1, sum g1 * xhat]
    wpart_ptr,  # (n_programs, S2 * (C + W1) + S2) out: weight and bias gradient partials
    N,
    HW,
    W,
    s_hb,
    s_hc,
    s_hp,
    s_gb,
    s_gc,
    s_gp,
    C: tl.constexpr,
    W1: tl.constexpr,
    W2: tl.constexpr,
    S2: tl.constexpr,
    S2P: tl.constexpr,
    S3: tl.constexpr,
    S3P: tl.constexpr,
    BLOCK_P: tl.constexpr,
    DOT: tl.constexpr,
    GDOT: tl.constexpr,
):
    """B5: backward of z2a = conv1x1([h, b1]): dW2a, dbias, and g1 = (dout_b1 + db1) * (b1 > 0)."""
    pid = tl.program_id(0)
    n, mask, b, p, y, x = _pixel_block(pid, N, HW, W, BLOCK_P)
    CIN2: tl.constexpr = C + W1
    CIN3: tl.constexpr = C + W1 + W2
    dz2a = _load_dz(g2a_ptr, z2a_ptr, st2a_ptr, coef2a_ptr, n, mask, S2, S2P)  # (P, S2P)
    dz3a = _load_dz(g3a_ptr, z3a_ptr, st3a_ptr, coef3a_ptr, n, mask, S3, S3P)  # (P, S3P)
    hx, z1, b1 = _train_b1(h_ptr, b, p, mask, s_hb, s_hc, s_hp, w1_ptr, c1_ptr, st1_ptr, C, W1, DOT)
    wpart = wpart_ptr + pid * (S2 * CIN2 + S2)
    _store_w1x1_grad(wpart, _mm(tl.trans(hx), dz2a, GDOT), 0, C, CIN2, S2, S2P)
    _store_w1x1_grad(wpart, _mm(tl.trans(b1), dz2a, GDOT), C, W1, CIN2, S2, S2P)
    _store_bias_grad(wpart + S2 * CIN2, dz2a, S2, S2P)
    up = (
        _load_map(gout_ptr, b, p, mask, s_gb, s_gc, s_gp, 0, W1)
        + _mm(dz2a, _load_w1x1_t(w2a_ptr, C, W1, CIN2, S2, S2P), GDOT)
        + _mm(dz3a, _load_w1x1_t(w3a_ptr, C, W1, CIN3, S3, S3P), GDOT)
    )
    g1 = tl.where(mask[:, None] & (b1 > 0.0), up, 0.0)
    _store_g(g1_ptr, part_ptr, pid, g1, z1, n, mask, st1_ptr, W1, W1)


@triton.jit
def _dense_branch_input_bwd_kernel(
    h_ptr,  # (B, C, H, W), pixel stride s_hp
    gout_ptr,  # (B, C, H, W) gradient of the output, pixel stride s_gp
    dh_ptr,  # (B, C, H, W) out: gradient of h, pixel stride s_dp
    w1_ptr,
    c1_ptr,
    st1_ptr,
    coef1_ptr,
    g1_ptr,  # (W1, C, 1, 1), (W1,), (4, W1), (3, W1), (N, W1)
    g2a_ptr,
    z2a_ptr,
    st2a_ptr,
    coef2a_ptr,  # (N, S2), (N, S2), (4, S2P), (3, S2P)
    g3a_ptr,
    z3a_ptr,
    st3a_ptr,
    coef3a_ptr,  # (N, S3), (N, S3), (4, S3P), (3, S3P)
    w2a_ptr,
    w3a_ptr,  # (S2, C + W1, 1, 1), (S3, C + W1 + W2, 1, 1)
    wpart_ptr,  # (n_programs, W1 * C + W1) out: weight and bias gradient partials of conv1
    N,
    HW,
    W,
    s_hb,
    s_hc,
    s_hp,
    s_gb,
    s_gc,
    s_gp,
    s_db,
    s_dc,
    s_dp,
    C: tl.constexpr,
    W1: tl.constexpr,
    W2: tl.constexpr,
    S2: tl.constexpr,
    S2P: tl.constexpr,
    S3: tl.constexpr,
    S3P: tl.constexpr,
    BLOCK_P: tl.constexpr,
    DOT: tl.constexpr,
    GDOT: tl.constexpr,
):
    """B6: dW1, dbias1 and dh = dout + conv1x1^T(dz1) + (h rows of) conv1x1^T(dz2a) + conv1x1^T(dz3a)."""
    pid = tl.program_id(0)
    n, mask, b, p, y, x = _pixel_block(pid, N, HW, W, BLOCK_P)
    hx = _load_map(h_ptr, b, p, mask, s_hb, s_hc, s_hp, 0, C)
    z1 = _z1(hx, w1_ptr, c1_ptr, C, W1, DOT)
    dz1 = _bn_dz(_load_rows(g1_ptr, n, mask, W1, W1, W1), z1, mask, st1_ptr, coef1_ptr, W1)  # (P, W1)
    dz2a = _load_dz(g2a_ptr, z2a_ptr, st2a_ptr, coef2a_ptr, n, mask, S2, S2P)  # (P, S2P)
    dz3a = _load_dz(g3a_ptr, z3a_ptr, st3a_ptr, coef3a_ptr, n, mask, S3, S3P)  # (P, S3P)
    wpart = wpart_ptr + pid * (W1 * C + W1)
    _store_w1x1_grad(wpart, _mm(tl.trans(hx), dz1, GDOT), 0, C, C, W1, W1)
    _store_bias_grad(wpart + W1 * C, dz1, W1, W1)
    dh = (
        _load_map(gout_ptr, b, p, mask, s_gb, s_gc, s_gp, 0, C)
        + _mm(dz1, _load_w1x1_t(w1_ptr, 0, C, C, W1, W1), GDOT)
        + _mm(dz2a, _load_w1x1_t(w2a_ptr, 0, C, C + W1, S2, S2P), GDOT)
        + _mm(dz3a, _load_w1x1_t(w3a_ptr, 0, C, C + W1 + W2, S3, S3P), GDOT)
    )
    _store_map(dh_ptr, dh, b, p, mask, s_db, s_dc, s_dp, 0, C)


@triton.jit
def _bn_stats_bwd_kernel(
    part_ptr,  # (n_prog, 2, CP) per-program [sum g, sum g * xhat]
    st_ptr,  # (4, CP) forward stats: mean, rstd, scale, shift
    gamma_ptr,  # (C,)
    dgamma_ptr,
    dbeta_ptr,  # (C,) out, fp32
    coef_ptr,  # (3, CP) out: k1, k2, k3 of dz = k1 * (g - k2 - xhat * k3)
    n_prog,
    N,
    C: tl.constexpr,
    CP: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """BatchNorm weight/bias gradients and the input-gradient coefficients from the partial sums."""
    c = tl.arange(0, CP)
    sg = tl.zeros((CP,), tl.float32)
    sgx = tl.zeros((CP,), tl.float32)
    for r0 in range(0, n_prog, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        sg += tl.sum(_load_partial(part_ptr, r, n_prog, 0, CP), 0)
        sgx += tl.sum(_load_partial(part_ptr, r, n_prog, 1, CP), 0)
    tl.store(dgamma_ptr + c, sgx, mask=c < C)
    tl.store(dbeta_ptr + c, sg, mask=c < C)
    tl.store(coef_ptr + c, _load_vec(gamma_ptr, C, CP) * tl.load(st_ptr + CP + c))
    tl.store(coef_ptr + CP + c, sg / N)
    tl.store(coef_ptr + 2 * CP + c, sgx / N)


# fmt: on


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


def _check_inputs(h: torch.Tensor, branch: DenseBranch) -> torch.Tensor:
    """Validate h and the branch for the fused kernels; returns h with a flattenable pixel stride."""
    if branch.dims != 2:
        raise ValueError(f"the fused dense branch supports dims=2 only, got dims={branch.dims}")
    c = branch.channels
    w1, s2, w2, s3, w3 = branch.widths
    if not all(_pow2(v) and v >= 16 for v in (c, w1, w2, w3)) or max(s2, s3) > 16:
        raise ValueError(
            f"the fused dense branch needs power-of-two channels/branch widths >= 16 and squeeze widths <= 16, "
            f"got channels={c}, widths={branch.widths}"
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
    for name, prm in branch.named_parameters():
        if prm.device != h.device:
            raise ValueError(f"parameter {name} is on {prm.device} but h is on {h.device}")
    for name, mod in branch.named_modules():
        if isinstance(mod, nn.BatchNorm2d) and not mod.affine:
            raise ValueError(f"{name} must be affine")
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


def _cbrs(branch: DenseBranch) -> list[nn.Module]:
    """The five ConvBNReLU blocks in pass order: 1, 2a, 2b, 3a, 3b."""
    return [branch.branch1, branch.branch2[0], branch.branch2[1], branch.branch3[0], branch.branch3[1]]


def _meta(branch: DenseBranch) -> dict[str, int]:
    w1, s2, w2, s3, w3 = branch.widths
    return dict(C=branch.channels, W1=w1, S2=s2, S2P=_squeeze_pad(s2), W2=w2, S3=s3, S3P=_squeeze_pad(s3), W3=w3)


def _dense_branch_infer(h: torch.Tensor, branch: DenseBranch) -> torch.Tensor:
    """Eval-mode forward in one launch (BatchNorm with running statistics)."""
    bsz, c, hh, ww = h.shape
    meta = _meta(branch)
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
    for cbr in _cbrs(branch):
        args += [cbr.conv.weight, cbr.conv.bias, cbr.bn.weight, cbr.bn.bias, cbr.bn.running_mean, cbr.bn.running_var]
    _dense_branch_fwd_kernel[(nprog,)](
        h, out, *args, scratch, *[cbr.bn.eps for cbr in _cbrs(branch)],
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


class DenseBranchFunction(torch.autograd.Function):
    """Training-mode fused dense branch: BatchNorm with batch statistics, running statistics updated.

    ``apply(h, branch, *params)`` with params the 20 tensors of :func:`_train_params` (conv weight, conv bias,
    BN weight, BN bias of each ConvBNReLU in the order 1, 2a, 2b, 3a, 3b); returns (B, C, H, W) like h.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, branch: DenseBranch, *params: torch.Tensor) -> torch.Tensor:
        m = _meta(branch)
        c = h.shape[1]
        n, hw, hh, ww, n_prog = _train_grid(h)
        dev = h.device
        bns = [cbr.bn for cbr in _cbrs(branch)]
        w1, c1, w2a, c2a, w2b, c2b, w3a, c3a, w3b, c3b = [params[i] for i in (0, 1, 4, 5, 8, 9, 12, 13, 16, 17)]
        grid = (n_prog,)
        hs = _pixel_strides(h)
        common = dict(BLOCK_P=_BLOCK_P_TRAIN, DOT=_dot_mode(h.dtype))

        def part(cp: int) -> torch.Tensor:
            return _f32(n_prog, 2, cp, device=dev)  # per-program moments

        def squeeze(w, bias, z, s, z2b, st2b, has_b2, i):  # F2 / F4; returns the finalized stats of z
            p = part(m[s + "P"])
            _dense_branch_squeeze_fwd_kernel[grid](
                h, w1, c1, st1, z2b, st2b, w, bias, z, p, n, hw, ww, *hs,
                C=c, W1=m["W1"], W2=m["W2"], S=m[s], SP=m[s + "P"], HAS_B2=has_b2, **common,
            )  # fmt: skip
            return _bn_forward_stats(p, bns[i], n, m[s + "P"], n_prog)

        def conv(zin, stin, w, bias, z, s, co, k, i):  # F3 / F5; returns the finalized stats of z
            p = part(m[co])
            _dense_branch_conv_fwd_kernel[grid](
                zin, stin, w, bias, z, p, n, hw, hh, ww, S=m[s], SP=m[s + "P"], CO=m[co], K=k, **common
            )
            return _bn_forward_stats(p, bns[i], n, m[co], n_prog)

        z2a = _f32(n, m["S2"], device=dev)  # (B*H*W, S2)
        z2b = _f32(n, m["W2"], device=dev)  # (B*H*W, W2)
        z3a = _f32(n, m["S3"], device=dev)  # (B*H*W, S3)
        z3b = _f32(n, m["W3"], device=dev)  # (B*H*W, W3)

        p1 = part(m["W1"])
        _dense_branch_z1_fwd_kernel[grid](h, w1, c1, p1, n, hw, ww, *hs, C=c, W1=m["W1"], **common)
        st1 = _bn_forward_stats(p1, bns[0], n, m["W1"], n_prog)
        st2a = squeeze(w2a, c2a, z2a, "S2", z2b, st1, False, 1)  # z2b, st1: placeholders, not read
        st2b = conv(z2a, st2a, w2b, c2b, z2b, "S2", "W2", 3, 2)
        st3a = squeeze(w3a, c3a, z3a, "S3", z2b, st2b, True, 3)
        st3b = conv(z3a, st3a, w3b, c3b, z3b, "S3", "W3", 5, 4)

        out = torch.empty_like(h)
        _dense_branch_out_fwd_kernel[grid](
            h, out, w1, c1, st1, z2b, st2b, z3b, st3b, n, hw, ww, *hs, *_pixel_strides(out),
            C=c, W1=m["W1"], W2=m["W2"], W3=m["W3"], **common,
        )  # fmt: skip
        ctx.branch = branch
        ctx.save_for_backward(h, z2a, z2b, z3a, z3b, st1, st2a, st2b, st3a, st3b, *params)
        return out

    @staticmethod
    def backward(ctx, gout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        h, z2a, z2b, z3a, z3b, st1, st2a, st2b, st3a, st3b, *params = ctx.saved_tensors
        branch = ctx.branch
        bns = [cbr.bn for cbr in _cbrs(branch)]
        m = _meta(branch)
        c = h.shape[1]
        n, hw, hh, ww, n_prog = _train_grid(h)
        dev = h.device
        w1, c1, w2a, w2b, w3a, w3b = [params[i] for i in (0, 1, 4, 8, 12, 16)]
        gout = _flat_pixels(gout)
        grid = (n_prog,)
        hs = _pixel_strides(h)
        gs = _pixel_strides(gout)
        common = dict(BLOCK_P=_BLOCK_P_TRAIN, DOT=_dot_mode(h.dtype), GDOT=_grad_dot_mode(h.dtype))
        squeezes = {k: m[k] for k in ("C", "W1", "W2", "S2", "S2P", "S3", "S3P")}
        bn_grads: list[tuple[torch.Tensor, torch.Tensor]] = [None] * 5  # type: ignore[list-item]

        def part(cp: int) -> torch.Tensor:
            return _f32(n_prog, 2, cp, device=dev)  # per-program sums

        def wpart(conv: nn.Conv2d) -> torch.Tensor:
            # (n_prog, weight numel + bias numel)
            return _f32(n_prog, conv.weight.numel() + conv.bias.numel(), device=dev)

        def outputs(s: str, conv: nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            # g (B*H*W, m[s]) at a BN output, its per-program sums, the weight partials of the conv it feeds
            cp = m.get(s + "P", m[s])  # squeeze widths are padded
            return _f32(n, m[s], device=dev), part(cp), wpart(conv)

        def finish(i: int, p: torch.Tensor, st: torch.Tensor, cp: int) -> torch.Tensor:
            coef, dgamma, dbeta = _bn_backward_stats(p, st, bns[i], n, cp, n_prog)
            bn_grads[i] = (dgamma, dbeta)
            return coef

        def conv_bwd(g, z, st, coef, zin, stin, w, conv, s, co, k, i):  # B2 / B4; returns (gin, wpart, coef_in)
            gin, p, wp = outputs(s, conv)
            _dense_branch_conv_bwd_kernel[grid](
                g, z, st, coef, zin, stin, w, gin, p, wp, n, hw, hh, ww,
                S=m[s], SP=m[s + "P"], CO=m[co], K=k, BLOCK_P=_BLOCK_P_TRAIN, GDOT=common["GDOT"],
            )  # fmt: skip
            return gin, wp, finish(i, p, stin, m[s + "P"])

        g3b = _f32(n, m["W3"], device=dev)  # (B*H*W, W3)
        p = part(m["W3"])
        _dense_branch_g3b_bwd_kernel[grid](
            gout, z3b, st3b, g3b, p, n, hw, ww, *gs, C0=m["W1"] + m["W2"], W3=m["W3"], BLOCK_P=_BLOCK_P_TRAIN
        )
        coef3b = finish(4, p, st3b, m["W3"])

        g3a, wp3b, coef3a = conv_bwd(g3b, z3b, st3b, coef3b, z3a, st3a, w3b, branch.branch3[1].conv, "S3", "W3", 5, 3)

        g2b, p, wp3a = outputs("W2", branch.branch3[0].conv)
        _dense_branch_squeeze3_bwd_kernel[grid](
            h, gout, w1, c1, st1, z2b, st2b, g3a, z3a, st3a, coef3a, w3a, g2b, p, wp3a, n, hw, ww, *hs, *gs,
            C=c, W1=m["W1"], W2=m["W2"], S3=m["S3"], S3P=m["S3P"], **common,
        )  # fmt: skip
        coef2b = finish(2, p, st2b, m["W2"])

        g2a, wp2b, coef2a = conv_bwd(g2b, z2b, st2b, coef2b, z2a, st2a, w2b, branch.branch2[1].conv, "S2", "W2", 3, 1)

        g1, p, wp2a = outputs("W1", branch.branch2[0].conv)
        _dense_branch_squeeze2_bwd_kernel[grid](
            h, gout, w1, c1, st1, g2a, z2a, st2a, coef2a, g3a, z3a, st3a, coef3a, w2a, w3a, g1, p, wp2a,
            n, hw, ww, *hs, *gs, **squeezes, **common,
        )  # fmt: skip
        coef1 = finish(0, p, st1, m["W1"])

        dh = torch.empty_like(h)
        wp1 = wpart(branch.branch1.conv)
        _dense_branch_input_bwd_kernel[grid](
            h, gout, dh, w1, c1, st1, coef1, g1, g2a, z2a, st2a, coef2a, g3a, z3a, st3a, coef3a, w2a, w3a, wp1,
            n, hw, ww, *hs, *gs, *_pixel_strides(dh), **squeezes, **common,
        )  # fmt: skip

        grads: list[torch.Tensor] = []
        for cbr, wp, (dgamma, dbeta) in zip(_cbrs(branch), (wp1, wp2a, wp2b, wp3a, wp3b), bn_grads, strict=True):
            w, bias = cbr.conv.weight, cbr.conv.bias
            flat = wp.sum(0)  # (weight numel + bias numel,)
            grads += [
                flat[: w.numel()].view(w.shape).to(w.dtype),
                flat[w.numel() :].to(bias.dtype),
                dgamma.to(cbr.bn.weight.dtype),
                dbeta.to(cbr.bn.bias.dtype),
            ]
        return (dh, None, *grads)


def _train_params(branch: DenseBranch) -> list[torch.Tensor]:
    """Conv weight, conv bias, BN weight, BN bias of each ConvBNReLU, in the order 1, 2a, 2b, 3a, 3b."""
    return [t for cbr in _cbrs(branch) for t in (cbr.conv.weight, cbr.conv.bias, cbr.bn.weight, cbr.bn.bias)]


def fused_dense_branch(h: torch.Tensor, branch: DenseBranch) -> torch.Tensor:
    """The dense branch with the fused Triton kernels.

    In eval mode (BatchNorm with running statistics) it is one kernel launch (when gradients are needed in
    eval mode it runs the eager reference instead); in training mode it runs :class:`DenseBranchFunction`,
    which uses per-rank batch statistics and updates the running statistics exactly as nn.BatchNorm2d does.

    Args:
        h: (B, C, H, W) float32/bfloat16/float16 on CUDA (or on CPU under TRITON_INTERPRET=1), contiguous
            or channels-last.
        branch: the module whose parameters and BatchNorm buffers are used (``dims == 2``).

    Returns:
        (B, C, H, W) in h's dtype and memory format.
    """
    h = _check_inputs(h, branch)
    bns = [cbr.bn for cbr in _cbrs(branch)]
    use_batch_stats = branch.training or any(bn.running_mean is None for bn in bns)
    if not use_batch_stats:
        if torch.is_grad_enabled() and (h.requires_grad or any(p.requires_grad for p in branch.parameters())):
            return branch.reference_forward(h)  # eval mode with gradients: rare, left to autograd
        return _dense_branch_infer(h, branch)
    bsz, _, hh, ww = h.shape
    if bsz * hh * ww < 2:
        raise ValueError(f"expected more than 1 value per channel when training, got input of shape {tuple(h.shape)}")
    return DenseBranchFunction.apply(h, branch, *_train_params(branch))
