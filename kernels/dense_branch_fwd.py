"""Forward Triton kernels of the dense branch (notation and pass order in :mod:`dcris.kernels.dense_branch`):
the one-launch inference kernel and the training forward passes F1-F6 with their BatchNorm finalize kernel."""

from __future__ import annotations

import triton
import triton.language as tl

from .dense_branch_jit import (
    _b1,
    _bn_relu,
    _eval_affine,
    _in_image,
    _load_map,
    _load_partial,
    _load_rows,
    _load_vec,
    _load_w1x1,
    _load_wtap,
    _mm,
    _pixel_block,
    _slab_conv,
    _squeeze_hb1,
    _store_moments,
    _store_out,
    _store_rows,
    _store_z,
    _tap,
    _train_affine,
    _train_b1,
    _z1,
)


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


# fmt: on
