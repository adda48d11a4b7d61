"""The one attention entry point of the model.

Every attention in DCRIS (DINOv2 blocks, CLIP text blocks, the adapters' cross-attention, the neck and the
decoder) calls :func:`attention`. On CUDA it runs xformers' ``memory_efficient_attention`` when xformers'
kernels load for the installed torch, and torch's ``scaled_dot_product_attention`` otherwise; on the CPU it
runs SDPA. The unfused softmax(QK^T)V path is kept only as :func:`reference_attention`, the oracle in tests:
at 1,029 tokens it costs 3.6x the time and 4.7x the memory.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

_DISABLE_ENV = "DCRIS_NO_XFORMERS"  # set to 1 to force SDPA on CUDA


# device type -> xformers.ops, or None for SDPA: decided once and kept as plain data, so that a compiled forward
# reads the decision and never traces the probe (its import and stderr redirection cannot be traced)
_xformers_kernels: dict[str, ModuleType | None] = {}


def _probe_xformers() -> ModuleType | None:
    """xformers.ops when its CUDA kernels work with this torch, else None (silently)."""
    if os.environ.get(_DISABLE_ENV, "0") == "1" or not torch.cuda.is_available():
        return None
    try:
        # xformers prints import-time warnings when its kernels were built for another torch: keep them quiet.
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            logging.getLogger("xformers").setLevel(logging.ERROR)
            import xformers.ops as xops

            q = torch.randn(1, 8, 1, 16, device="cuda", dtype=torch.float16)
            xops.memory_efficient_attention(q, q, q)
        return xops
    except Exception:  # noqa: BLE001 - any failure to load or run the kernel means "not available"
        return None


def xformers_ops(device_type: str = "cuda") -> ModuleType | None:
    """xformers.ops when :func:`attention` uses its kernel on ``device_type`` (CUDA only), else None.

    Decided by the first call for CUDA and kept. ``build_model`` decides before it compiles a model, so a compiled
    forward only reads the decision (and other device types never change it).
    """
    if device_type not in _xformers_kernels:
        if device_type != "cuda":
            return None
        _xformers_kernels[device_type] = _probe_xformers()
    return _xformers_kernels[device_type]


def xformers_available() -> bool:
    """Whether :func:`attention` uses xformers on CUDA in this process."""
    return xformers_ops("cuda") is not None


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Scaled dot-product attention.

    Args:
        q: queries, (B, H, Lq, D).
        k: keys, (B, H, Lk, D).
        v: values, (B, H, Lk, D).
        mask: optional boolean mask broadcastable to (B, H, Lq, Lk); True = attend.
        causal: apply a causal mask (no explicit mask is then allowed).
        dropout: attention dropout probability (pass 0.0 in eval mode).

    Returns:
        (B, H, Lq, D).
    """
    xops = xformers_ops(q.device.type)
    if xops is not None and mask is None and q.dtype in (torch.float16, torch.bfloat16):
        # xformers takes (B, L, H, D)
        bias = xops.LowerTriangularMask() if causal else None
        out = xops.memory_efficient_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias, p=dropout
        )
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False
) -> torch.Tensor:
    """Unfused softmax(QK^T / sqrt(d)) V: the test oracle for :func:`attention` (no dropout)."""
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5  # (B, H, Lq, Lk)
    if causal:
        lq, lk = scores.shape[-2:]
        mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v


class MultiheadAttention(nn.Module):
    """Batch-first multi-head attention with nn.MultiheadAttention's parameter layout.

    The layout (``in_proj_weight``, ``in_proj_bias``, ``out_proj``) matches torch's module, so CLIP's and the
    released DETRIS checkpoints load as they are, while the computation goes through :func:`attention`.
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.dim, self.heads, self.dropout = dim, heads, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def _project(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The in-projections (B, L, C) of query, key and value, one GEMM for each distinct input."""
        w, b, d = self.in_proj_weight, self.in_proj_bias, self.dim
        if query is key and key is value:
            return F.linear(query, w, b).chunk(3, dim=-1)
        if query is key:
            (w_qk, w_v), (b_qk, b_v) = w.split([2 * d, d]), b.split([2 * d, d])
            return (*F.linear(query, w_qk, b_qk).chunk(2, dim=-1), F.linear(value, w_v, b_v))
        if key is value:
            (w_q, w_kv), (b_q, b_kv) = w.split([d, 2 * d]), b.split([d, 2 * d])
            return (F.linear(query, w_q, b_q), *F.linear(key, w_kv, b_kv).chunk(2, dim=-1))
        return tuple(F.linear(x, wi, bi) for x, wi, bi in zip((query, key, value), w.chunk(3), b.chunk(3), strict=True))

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, self.dim // self.heads).transpose(1, 2)  # (B, H, N, D/H)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        causal: bool = False,
    ) -> torch.Tensor:
        """Attends ``query`` (B, Lq, C) to ``key``/``value`` (B, Lk, C).

        ``key_padding_mask`` (B, Lk) is True where a key is padding (torch's convention). Projections of the
        same tensor share one GEMM (self-attention: one for q, k and v; a shared key and value: one for k and v).
        """
        q, k, v = (self._split(t) for t in self._project(query, key, value))
        mask = None
        if key_padding_mask is not None:
            mask = ~key_padding_mask[:, None, None, :]  # (B, 1, 1, Lk), True = attend
        out = attention(q, k, v, mask=mask, causal=causal, dropout=self.dropout if self.training else 0.0)
        b, _, n, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, self.dim))
