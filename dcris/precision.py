"""Frozen backbone tensors held in the compute dtype (bf16 or fp16) instead of being cast at every call.

Autocast caches the 16-bit copy of a weight only for leaf tensors that require grad, so every frozen fp32 weight
of the two backbones is cast again at each Linear, convolution and matrix product, forward and backward. Stored
once in the compute dtype, they are what autocast would have made of them, so the step is bitwise the same
(:func:`store_frozen_in`). Trainable parameters (and so Adam's state) and BatchNorm statistics stay fp32.

The residual stream (``train.compute_dtype_residual``) goes further and is not bitwise: LayerNorm, LayerScale and
the embeddings of the frozen backbones are stored in the compute dtype too and their LayerNorms run in it, so
the residual additions stay 16-bit instead of being promoted to fp32 by the fp32 LayerScale and embeddings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MATMUL_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# parameters outside those modules that autocast casts too: CLIP's fused q/k/v projection and text projection
MATMUL_PARAMETERS = ("in_proj_weight", "in_proj_bias", "text_projection")


class ComputeDtypeLayerNorm(nn.LayerNorm):
    """LayerNorm in the dtype of its weights, outside autocast (whose fp32 op list would return fp32).

    The kernels accumulate the statistics in fp32 whatever the storage dtype (timm's fast-norm idea).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(x.to(self.weight.dtype), self.normalized_shape, self.weight, self.bias, self.eps)


def frozen_matmul_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The frozen parameters that autocast casts at each call: weights and biases of Linear and convolution
    modules, CLIP's ``in_proj_weight``/``in_proj_bias`` and ``text_projection``."""
    found: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad and (isinstance(module, MATMUL_MODULES) or name in MATMUL_PARAMETERS):
                found[id(p)] = p
    return list(found.values())


def store_frozen_in(model: nn.Module, dtype: torch.dtype, residual: bool = False) -> int:
    """Stores the frozen matmul parameters of ``model`` (:func:`frozen_matmul_parameters`) in ``dtype``, in place.

    With ``residual``, every other frozen floating-point parameter too (LayerNorm, LayerScale, embeddings), and
    the frozen LayerNorms become :class:`ComputeDtypeLayerNorm`. Does nothing for float32 or when nothing is
    frozen (full fine-tuning). The model must then run under autocast to ``dtype``.

    Returns:
        The number of parameters now stored in ``dtype``.
    """
    if dtype == torch.float32:
        return 0
    if residual:
        params = [p for p in model.parameters() if not p.requires_grad and p.is_floating_point()]
        for module in model.modules():
            if isinstance(module, nn.LayerNorm) and module.weight is not None and not module.weight.requires_grad:
                module.__class__ = ComputeDtypeLayerNorm  # same parameters and state-dict keys, another forward
    else:
        params = frozen_matmul_parameters(model)
    cast = 0
    for p in params:
        if p.dtype != dtype:
            p.data = p.data.to(dtype)
            cast += 1
    return cast
