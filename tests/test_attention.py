"""The attention entry point against the unfused reference and torch's own nn.MultiheadAttention."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dcris.attention import MultiheadAttention, attention, reference_attention


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_matches_reference_fp32(causal: bool):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 29, 16, generator=g) for _ in range(3))
    torch.testing.assert_close(attention(q, k, v, causal=causal), reference_attention(q, k, v, causal=causal),
                               rtol=1e-5, atol=1e-5)


def test_sdpa_matches_reference_with_mask_and_cross_lengths():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(3, 8, 37, 16, generator=g)
    k, v = torch.randn(3, 8, 17, 16, generator=g), torch.randn(3, 8, 17, 16, generator=g)
    mask = torch.rand(3, 1, 1, 17, generator=g) > 0.3
    mask[..., 0] = True  # every query keeps at least one key
    torch.testing.assert_close(attention(q, k, v, mask=mask), reference_attention(q, k, v, mask=mask),
                               rtol=1e-5, atol=1e-5)


def test_multihead_attention_matches_torch_module():
    torch.manual_seed(2)
    ours = MultiheadAttention(64, 8).eval()
    theirs = nn.MultiheadAttention(64, 8, batch_first=True).eval()
    theirs.load_state_dict(ours.state_dict())  # same parameter layout, loaded as is
    query, memory = torch.randn(2, 11, 64), torch.randn(2, 7, 64)
    padding = torch.tensor([[False] * 5 + [True] * 2, [False] * 7])
    expected, _ = theirs(query, memory, memory, key_padding_mask=padding, need_weights=False)
    torch.testing.assert_close(ours(query, memory, memory, key_padding_mask=padding), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shared", ["query, key, value", "query, key", "key, value"])
def test_shared_inputs_share_a_projection_and_match_torch_module(shared: str):
    """Self-attention (one GEMM for q, k and v), the decoder's q = k and the cross-attentions' k = v (one GEMM
    for the two) give torch's module's outputs and input gradients."""
    torch.manual_seed(3)
    ours = MultiheadAttention(32, 4).eval()
    theirs = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    theirs.load_state_dict(ours.state_dict())
    a, b, c = (torch.randn(2, 9, 32, requires_grad=True) for _ in range(3))
    inputs = {"query, key, value": (a, a, a), "query, key": (a, a, b), "key, value": (a, b, b)}[shared]
    got = ours(*inputs)
    want, _ = theirs(*inputs, need_weights=False)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    weights = torch.randn_like(got)
    grads = torch.autograd.grad((got * weights).sum(), (a, b, c), allow_unused=True)
    want_grads = torch.autograd.grad((want * weights).sum(), (a, b, c), allow_unused=True)
    for g, w in zip(grads, want_grads, strict=True):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_path_matches_reference_bf16(causal: bool):
    q, k, v = (torch.randn(4, 12, 1029, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ref = reference_attention(q.float(), k.float(), v.float(), causal=causal)
    torch.testing.assert_close(attention(q, k, v, causal=causal).float(), ref, rtol=2e-2, atol=2e-2)
