"""The training-mode autograd Function of the fused dense branch and :func:`fused_dense_branch`, the entry point
that :class:`~dcris.kernels.dense_branch.DenseBranch` calls with its five blocks (notation and passes in
:mod:`dcris.kernels.dense_branch`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .dense_branch_bwd import (
    _dense_branch_conv_bwd_kernel,
    _dense_branch_g3b_bwd_kernel,
    _dense_branch_input_bwd_kernel,
    _dense_branch_squeeze2_bwd_kernel,
    _dense_branch_squeeze3_bwd_kernel,
)
from .dense_branch_fwd import (
    _dense_branch_conv_fwd_kernel,
    _dense_branch_out_fwd_kernel,
    _dense_branch_squeeze_fwd_kernel,
    _dense_branch_z1_fwd_kernel,
)
from .dense_branch_launch import (
    _BLOCK_P_TRAIN,
    _bn_backward_stats,
    _bn_forward_stats,
    _check_inputs,
    _dense_branch_infer,
    _dot_mode,
    _f32,
    _flat_pixels,
    _grad_dot_mode,
    _meta,
    _pixel_strides,
    _train_grid,
)
from .dense_branch_ref import ConvBNReLU, running_statistics_with_gradients, uses_batch_statistics


class DenseBranchFunction(torch.autograd.Function):
    """Training-mode fused dense branch: BatchNorm with batch statistics, running statistics updated.

    ``apply(h, blocks, *params)`` with blocks the five ConvBNReLU in pass order and params the 20 tensors of
    :func:`_train_params` (conv weight, conv bias,
    BN weight, BN bias of each ConvBNReLU in the order 1, 2a, 2b, 3a, 3b); returns (B, C, H, W) like h.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, blocks: Sequence[ConvBNReLU], *params: torch.Tensor) -> torch.Tensor:
        m = _meta(blocks)
        c = h.shape[1]
        n, hw, hh, ww, n_prog = _train_grid(h)
        dev = h.device
        bns = [cbr.bn for cbr in blocks]
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
        ctx.blocks = blocks
        ctx.save_for_backward(h, z2a, z2b, z3a, z3b, st1, st2a, st2b, st3a, st3b, *params)
        return out

    @staticmethod
    def backward(ctx, gout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        h, z2a, z2b, z3a, z3b, st1, st2a, st2b, st3a, st3b, *params = ctx.saved_tensors
        blocks = ctx.blocks
        bns = [cbr.bn for cbr in blocks]
        m = _meta(blocks)
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

        g3a, wp3b, coef3a = conv_bwd(g3b, z3b, st3b, coef3b, z3a, st3a, w3b, blocks[4].conv, "S3", "W3", 5, 3)

        g2b, p, wp3a = outputs("W2", blocks[3].conv)
        _dense_branch_squeeze3_bwd_kernel[grid](
            h, gout, w1, c1, st1, z2b, st2b, g3a, z3a, st3a, coef3a, w3a, g2b, p, wp3a, n, hw, ww, *hs, *gs,
            C=c, W1=m["W1"], W2=m["W2"], S3=m["S3"], S3P=m["S3P"], **common,
        )  # fmt: skip
        coef2b = finish(2, p, st2b, m["W2"])

        g2a, wp2b, coef2a = conv_bwd(g2b, z2b, st2b, coef2b, z2a, st2a, w2b, blocks[2].conv, "S2", "W2", 3, 1)

        g1, p, wp2a = outputs("W1", blocks[1].conv)
        _dense_branch_squeeze2_bwd_kernel[grid](
            h, gout, w1, c1, st1, g2a, z2a, st2a, coef2a, g3a, z3a, st3a, coef3a, w2a, w3a, g1, p, wp2a,
            n, hw, ww, *hs, *gs, **squeezes, **common,
        )  # fmt: skip
        coef1 = finish(0, p, st1, m["W1"])

        dh = torch.empty_like(h)
        wp1 = wpart(blocks[0].conv)
        _dense_branch_input_bwd_kernel[grid](
            h, gout, dh, w1, c1, st1, coef1, g1, g2a, z2a, st2a, coef2a, g3a, z3a, st3a, coef3a, w2a, w3a, wp1,
            n, hw, ww, *hs, *gs, *_pixel_strides(dh), **squeezes, **common,
        )  # fmt: skip

        grads: list[torch.Tensor] = []
        for cbr, wp, (dgamma, dbeta) in zip(blocks, (wp1, wp2a, wp2b, wp3a, wp3b), bn_grads, strict=True):
            w, bias = cbr.conv.weight, cbr.conv.bias
            flat = wp.sum(0)  # (weight numel + bias numel,)
            grads += [
                flat[: w.numel()].view(w.shape).to(w.dtype),
                flat[w.numel() :].to(bias.dtype),
                dgamma.to(cbr.bn.weight.dtype),
                dbeta.to(cbr.bn.bias.dtype),
            ]
        return (dh, None, *grads)


def _train_params(blocks: Sequence[ConvBNReLU]) -> list[torch.Tensor]:
    """Conv weight, conv bias, BN weight, BN bias of each ConvBNReLU, in the order 1, 2a, 2b, 3a, 3b."""
    return [t for cbr in blocks for t in (cbr.conv.weight, cbr.conv.bias, cbr.bn.weight, cbr.bn.bias)]


def fused_dense_branch(h: torch.Tensor, blocks: Sequence[ConvBNReLU]) -> torch.Tensor:
    """The dense branch with the fused Triton kernels.

    With BatchNorm in eval mode (running statistics) it is one kernel launch, which has no backward; in training
    mode it runs :class:`DenseBranchFunction`, which uses per-rank batch statistics and updates the running
    statistics exactly as nn.BatchNorm2d does.

    Args:
        h: (B, C, H, W) float32/bfloat16/float16 on CUDA (or on CPU under TRITON_INTERPRET=1), contiguous
            or channels-last.
        blocks: the branch's five 2-D ConvBNReLU blocks in pass order (1, 2a, 2b, 3a, 3b), whose parameters and
            BatchNorm buffers are used in place.

    Returns:
        (B, C, H, W) in h's dtype and memory format.

    Raises:
        ValueError: bad input (see :func:`_check_inputs`), or eval-mode BatchNorm with gradients needed.
    """
    h = _check_inputs(h, blocks)
    if running_statistics_with_gradients(h, blocks):
        raise ValueError("the fused dense branch has no backward with running statistics (eval mode)")
    if not uses_batch_statistics(blocks):
        return _dense_branch_infer(h, blocks)
    bsz, _, hh, ww = h.shape
    if bsz * hh * ww < 2:
        raise ValueError(f"expected more than 1 value per channel when training, got input of shape {tuple(h.shape)}")
    return DenseBranchFunction.apply(h, blocks, *_train_params(blocks))
