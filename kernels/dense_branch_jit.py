"""Triton device functions that the dense branch's forward and backward kernels share (see
:mod:`dcris.kernels.dense_branch` for the notation): loads and stores of maps, rows and weights, BatchNorm
affines, the 1x1 stages that are recomputed where needed, and the slab convolution of the inference kernel."""

from __future__ import annotations

import triton
import triton.language as tl


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
