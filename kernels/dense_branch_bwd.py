"""Backward Triton kernels of the dense branch (notation and pass order in :mod:`dcris.kernels.dense_branch`):
the training backward passes B1-B6 and the BatchNorm backward finalize kernel."""

from __future__ import annotations

import triton
import triton.language as tl

from .dense_branch_jit import (
    _bn_dz,
    _bn_relu,
    _in_image,
    _load_dz,
    _load_map,
    _load_partial,
    _load_rows,
    _load_vec,
    _load_w1x1_t,
    _load_wtap_t,
    _mm,
    _pixel_block,
    _store_bias_grad,
    _store_g,
    _store_map,
    _store_w1x1_grad,
    _tap,
    _train_affine,
    _train_b1,
    _z1,
)


# fmt: off  (kernel arguments stay grouped per tensor, each group with its shape comment)
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
