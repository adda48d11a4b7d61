"""Table 2's bottleneck-adapter baselines: Houlsby adapters and Compacter, in both frozen encoders.

Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP", Section 2.1 and Figure 2: two adapters per
Transformer block, one on the output of the attention's output projection and one on the output of the
feed-forward's last projection, each before the residual add; an adapter is ``x + up(act(down(x)))`` with its own
skip. Their released code (google-research/adapter-bert, modeling.py, ``feedforward_adapter``) fixes the details
followed here: GELU (tanh form), weights from a normal with standard deviation 1e-3 truncated at two standard
deviations, zero biases, so that every adapter starts as a near-identity.

Karimi Mahabadi et al. 2021, "Compacter: Efficient Low-Rank Hypercomplex Adapter Layers", Section 3: the same
adapters with each projection a parameterised hypercomplex multiplication (PHM) layer ``W = sum_i A_i (x) B_i``
over n Kronecker factors, the "slow" rule A (n x n x n) shared by every Compacter layer and each layer's B_i
factorised as ``s_i t_i^T`` of rank r. Their released configuration (rabeehk/compacter,
seq2seq/configs/compacter.json) fixes n = 4 (``hypercomplex_division``), one rule shared by all layers
(``shared_phm_rule``) initialised from a normal with standard deviation 1e-4 (``phm_c_init``, ``phm_init_range``),
factorised B (``factorized_phm``) with Glorot-uniform factors, zero biases, GELU (``gelu_new``) and adapters after
both attention and feed-forward. Here one rule is shared by both encoders' adapters.

In DINOv2's pre-norm blocks the adapters wrap ``attention.o_proj`` and ``mlp`` (before LayerScale and the residual
add); in CLIP's text blocks ``attn`` and ``mlp``. They are attached with forward hooks, so the backbones' modules,
weights and state-dict keys stay exactly as loaded.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dcris.text import TextEncoder
from dcris.vision import VisionEncoder

HOULSBY_INIT_STD = 1e-3  # adapter-bert's init_scale
PHM_RULE_INIT_STD = 1e-4  # Compacter's phm_init_range


class HoulsbyAdapter(nn.Module):
    """``x + up(gelu(down(x)))`` with a near-identity initialisation.

    Args:
        dim: width of the stream it adapts.
        hidden: bottleneck width.
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, hidden)
        self.up = nn.Linear(hidden, dim)
        for layer in (self.down, self.up):
            std = HOULSBY_INIT_STD
            nn.init.trunc_normal_(layer.weight, std=std, a=-2 * std, b=2 * std)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Maps x (..., dim) to (..., dim)."""
        return x + self.up(F.gelu(self.down(x), approximate="tanh"))


class PHMLinear(nn.Module):
    """A PHM layer: ``y = x H + b`` with ``H = sum_i kron(A_i, s_i t_i)``; A (the rule) is passed in, shared.

    Args:
        in_features: input width (a multiple of n).
        out_features: output width (a multiple of n).
        n: number of Kronecker factors.
        rank: rank of each factorised B_i = s_i t_i.
    """

    def __init__(self, in_features: int, out_features: int, n: int, rank: int) -> None:
        super().__init__()
        self.n = n
        self.left = nn.Parameter(torch.empty(n, in_features // n, rank))  # s_i
        self.right = nn.Parameter(torch.empty(n, rank, out_features // n))  # t_i
        self.bias = nn.Parameter(torch.zeros(out_features))
        for factor in (self.left, self.right):
            for i in range(n):
                nn.init.xavier_uniform_(factor.data[i])

    def weight(self, rule: torch.Tensor) -> torch.Tensor:
        """H (in_features, out_features) from the rule A (n, n, n)."""
        b = self.left @ self.right  # (n, in/n, out/n)
        n, p, q = b.shape
        # sum_i kron(A_i, B_i): entry (a*p + c, d*q + e) = sum_i A_i[a, d] * B_i[c, e]
        return torch.einsum("iad,ice->acde", rule, b).reshape(n * p, n * q)

    def forward(self, x: torch.Tensor, rule: torch.Tensor) -> torch.Tensor:
        """Maps x (..., in_features) to (..., out_features)."""
        return x @ self.weight(rule).to(x.dtype) + self.bias


class CompacterAdapter(nn.Module):
    """``x + up(gelu(down(x)))`` with PHM projections that share one rule.

    Args:
        dim: width of the stream it adapts.
        hidden: bottleneck width.
        n: PHM factors.
        rank: rank of the factorised PHM weights.
    """

    def __init__(self, dim: int, hidden: int, n: int, rank: int) -> None:
        super().__init__()
        self.down = PHMLinear(dim, hidden, n, rank)
        self.up = PHMLinear(hidden, dim, n, rank)

    def forward(self, x: torch.Tensor, rule: torch.Tensor) -> torch.Tensor:
        """Maps x (..., dim) to (..., dim) with the shared rule (n, n, n)."""
        return x + self.up(F.gelu(self.down(x, rule), approximate="tanh"), rule)


class BlockAdapters(nn.Module):
    """One adapter on the attention output and one on the MLP output of chosen blocks of both encoders.

    Args:
        text: the text encoder (adapted in place through forward hooks).
        vision: the vision encoder (likewise).
        text_blocks: text blocks that get adapters.
        vision_blocks: vision blocks that get adapters.
        make: builds one adapter for a stream of the given width.
        phm_rule: Compacter's rule (n, n, n), shared by every adapter and passed to each call; None for Houlsby.
    """

    def __init__(
        self,
        text: TextEncoder,
        vision: VisionEncoder,
        text_blocks: list[int],
        vision_blocks: list[int],
        make: Callable[[int], nn.Module],
        phm_rule: nn.Parameter | None = None,
    ) -> None:
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.register_parameter("phm_rule", phm_rule)
        for i in vision_blocks:
            layer = vision.backbone.encoder.layer[i]
            self._attach(f"vision_{i}_attn", layer.attention.o_proj, make(vision.cfg.width))
            self._attach(f"vision_{i}_mlp", layer.mlp, make(vision.cfg.width))
        for i in text_blocks:
            block = text.transformer.resblocks[i]
            self._attach(f"text_{i}_attn", block.attn, make(text.cfg.width))
            self._attach(f"text_{i}_mlp", block.mlp, make(text.cfg.width))

    def _attach(self, key: str, sublayer: nn.Module, adapter: nn.Module) -> None:
        self.adapters[key] = adapter
        sublayer.register_forward_hook(functools.partial(self._adapt, key))

    def _adapt(self, key: str, sublayer: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """Forward hook: the sublayer's output, adapted."""
        if self.phm_rule is None:
            return self.adapters[key](output)
        return self.adapters[key](output, self.phm_rule)


def houlsby_adapters(
    text: TextEncoder, vision: VisionEncoder, text_blocks: list[int], vision_blocks: list[int], hidden: int
) -> BlockAdapters:
    """Houlsby adapters (module docstring) of bottleneck ``hidden``."""
    return BlockAdapters(text, vision, text_blocks, vision_blocks, lambda dim: HoulsbyAdapter(dim, hidden))


def compacter_adapters(
    text: TextEncoder, vision: VisionEncoder, text_blocks: list[int], vision_blocks: list[int], hidden: int, n: int,
    rank: int,
) -> BlockAdapters:  # fmt: skip
    """Compacter adapters (module docstring): bottleneck ``hidden``, ``n`` factors, rank ``rank``, one shared rule."""
    rule = nn.Parameter(torch.empty(n, n, n))
    nn.init.normal_(rule, std=PHM_RULE_INIT_STD)
    make = lambda dim: CompacterAdapter(dim, hidden, n, rank)  # noqa: E731
    return BlockAdapters(text, vision, text_blocks, vision_blocks, make, phm_rule=rule)


__all__ = [
    "BlockAdapters",
    "CompacterAdapter",
    "HoulsbyAdapter",
    "PHMLinear",
    "compacter_adapters",
    "houlsby_adapters",
]
