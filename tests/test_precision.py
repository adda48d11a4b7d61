"""Frozen backbone tensors in the compute dtype (dcris.precision): a bitwise identical bf16 step without per-step
casts of frozen weights; the 16-bit residual stream within a bound of the fp32-statistics path."""

from __future__ import annotations

import copy

import pytest
import torch
from randomised import randomised_model
from torch.profiler import ProfilerActivity, profile

from dcris.config import preset
from dcris.model import DCRIS, build_model
from dcris.precision import ComputeDtypeLayerNorm, frozen_matmul_parameters, store_frozen_in

BF16 = torch.bfloat16


def _model(name: str = "tiny-dcris") -> DCRIS:
    """A tiny preset with LayerScales and BatchNorm statistics away from their init, so every branch counts."""
    return randomised_model(preset(name).model)


def _inputs(model: DCRIS, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    size, length = model.cfg.image_size, model.cfg.text.context_length
    g = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, size, size, generator=g)
    tokens = torch.zeros(batch, length, dtype=torch.long)
    tokens[:, 0], tokens[:, 1:6], tokens[:, 6] = 49406, torch.randint(1, 49000, (batch, 5), generator=g), 49407
    masks = (torch.rand(batch, 1, size, size, generator=g) > 0.5).float()
    return images, tokens, masks


def _bf16_step(model: DCRIS) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One training forward/backward under bf16 autocast: (loss, gradients by name)."""
    images, tokens, masks = _inputs(model)
    model.train()
    torch.manual_seed(5)  # the same dropout draws on both sides
    with torch.autocast("cpu", dtype=BF16):
        logits = model(images, tokens)
    loss = model.loss(logits, masks)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["tiny-dcris", "tiny-detris"])
def test_frozen_weights_in_bf16_give_a_bitwise_identical_step(name: str):
    fp32_stored = _model(name)
    bf16_stored = copy.deepcopy(fp32_stored)
    assert store_frozen_in(bf16_stored, BF16) == len(frozen_matmul_parameters(bf16_stored)) > 0
    for (n, p), q in zip(bf16_stored.named_parameters(), fp32_stored.parameters(), strict=True):
        in_matmul = any(p is m for m in frozen_matmul_parameters(bf16_stored))
        assert p.dtype == (BF16 if in_matmul else torch.float32), n
        assert p.requires_grad or torch.equal(p, q.to(p.dtype))
    assert all(b.dtype in (torch.float32, torch.long) for b in bf16_stored.buffers())  # BatchNorm statistics
    (want_loss, want), (got_loss, got) = _bf16_step(fp32_stored), _bf16_step(bf16_stored)
    assert torch.equal(got_loss, want_loss)
    assert got.keys() == want.keys() and any(".adapters." in n for n in want)
    for n, grad in want.items():
        assert got[n].dtype == torch.float32 and torch.equal(got[n], grad), n


def test_fp32_and_full_tune_are_left_as_they_are():
    model = _model()
    assert store_frozen_in(model, torch.float32, residual=True) == 0
    full_tune = build_model(preset("tiny-dcris").model, pretrained=False).requires_grad_(True)
    assert store_frozen_in(full_tune, BF16, residual=True) == 0
    assert all(p.dtype == torch.float32 for p in (*model.parameters(), *full_tune.parameters()))
    assert not any(isinstance(m, ComputeDtypeLayerNorm) for m in (*model.modules(), *full_tune.modules()))


def _frozen_weight_casts(model: DCRIS) -> int:
    """Casts (aten::_to_copy, aten::copy_) in one bf16 step whose input has the shape of a frozen weight that no
    trainable parameter shares (the profiler sees shapes, not tensors)."""
    trainable = {tuple(p.shape) for p in model.parameters() if p.requires_grad}
    shapes = {tuple(p.shape) for p in model.parameters() if not p.requires_grad and p.dim() >= 2} - trainable
    assert len(shapes) >= 4  # q/k/v/o, MLP in/out, the patch convolution, CLIP's in_proj
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        _bf16_step(model)
    casts = [e for e in prof.events() if e.name in ("aten::_to_copy", "aten::copy_")]
    return sum(bool(e.input_shapes) and tuple(e.input_shapes[0]) in shapes for e in casts)


def test_no_cast_of_a_frozen_weight_inside_a_step():
    model = _model()
    assert _frozen_weight_casts(model) > 0  # autocast casts the fp32-stored frozen weights at every call
    store_frozen_in(model, BF16)
    assert _frozen_weight_casts(model) == 0


def test_compute_dtype_residual_stays_bf16_within_a_bound_of_the_fp32_statistics_path():
    """The 16-bit residual stream is not bitwise: its logits stay within 3% of their largest magnitude of the
    fp32-statistics path's (random weights; the bound is in BENCHMARKS.md)."""
    fp32_stream = _model()
    store_frozen_in(fp32_stream, BF16)
    bf16_stream = copy.deepcopy(fp32_stream)
    store_frozen_in(bf16_stream, BF16, residual=True)
    assert all(p.dtype == BF16 for p in bf16_stream.parameters() if not p.requires_grad)
    assert all(p.dtype == torch.float32 for p in bf16_stream.parameters() if p.requires_grad)
    norms = [m for m in bf16_stream.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert all(isinstance(m, ComputeDtypeLayerNorm) == (not m.weight.requires_grad) for m in norms)
    images, tokens, _ = _inputs(fp32_stream, batch=4)
    outputs = []
    for model in (fp32_stream, bf16_stream):
        with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
            words, _ = model.text(tokens)
            x, grid = model.vision.embed(images)
            streams = [words.dtype, x.dtype, model.vision.block(1, x, words, grid).dtype]
            outputs.append((streams, model.eval()(images, tokens).float()))
    (fp32_dtypes, want), (bf16_dtypes, got) = outputs
    assert fp32_dtypes == [torch.float32] * 3 and bf16_dtypes == [BF16] * 3
    error, scale = (got - want).abs().max().item(), want.abs().max().item()
    assert 0 < error <= 0.03 * scale, (error, scale)
