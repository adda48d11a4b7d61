"""Fused Triton dense branch (kernels/dense_branch_*.py) against the eager reference (kernels/dense_branch_ref.py).

Without CUDA the kernels run in Triton's interpreter on CPU tensors at small, odd sizes (tests/conftest.py sets
TRITON_INTERPRET before anything decorates a kernel). The tests at the real
size (B=32, 32x32, bf16) need a GPU and skip without one.

Tolerances are relative to the reference's max abs: 1e-5 in fp32. In bf16 the reference is the fp32 module on
the same bf16-rounded input and parameters; forward outputs and running statistics must be within 1e-2. bf16
gradients cannot be: ReLU masks that flip under bf16 rounding of the intermediates, and BatchNorm's backward
(which cancels the mean and the xhat component of dz), make PyTorch's own bf16 path miss the fp32 gradients by
up to tens of percent at these sizes. So every bf16 gradient must be within 1e-2, or no further from fp32
than twice PyTorch's eager bf16 gradient is.
"""

from __future__ import annotations

import copy
import importlib
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from dcris.kernels.dense_branch import DenseBranch

triton = pytest.importorskip("triton")
dense_branch = importlib.import_module("dcris.kernels.dense_branch_autograd")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _randomize(branch: DenseBranch, seed: int) -> DenseBranch:
    """Random conv biases and BatchNorm affine parameters / running statistics (never the zero defaults)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in branch.modules():
            if isinstance(mod, nn.Conv2d):
                fan_in = mod.weight[0].numel()  # Kaiming scale, independent of the global RNG state
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
                mod.bias.copy_(torch.rand(mod.bias.shape, generator=gen) * 0.4 - 0.2)
            elif isinstance(mod, nn.BatchNorm2d):
                mod.weight.copy_(torch.rand(mod.weight.shape, generator=gen) + 0.5)
                mod.bias.copy_(torch.rand(mod.bias.shape, generator=gen) - 0.5)
                mod.running_mean.copy_(torch.rand(mod.running_mean.shape, generator=gen) - 0.5)
                mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=gen) * 1.5 + 0.5)
                mod.num_batches_tracked.fill_(int(torch.randint(0, 100, (1,), generator=gen)))
    return branch


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30)).item()


def _assert_close(got: torch.Tensor, ref: torch.Tensor, tol: float, name: str, scale: float | None = None) -> None:
    """max |got - ref| <= tol * (scale or max |ref|), reporting where they differ most."""
    diff = (got.float() - ref.float()).abs()
    bound = tol * (ref.float().abs().max().item() if scale is None else scale)
    if diff.max().item() > bound:
        idx = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        raise AssertionError(
            f"{name}: max abs diff {diff.max().item():.3e} > {bound:.3e} (rel {_rel_err(got, ref):.3e}) at {idx}: "
            f"got {got.flatten()[diff.argmax()].item():.6g}, ref {ref.flatten()[diff.argmax()].item():.6g}"
        )


def _make_input(shape: tuple[int, int, int, int], dtype: torch.dtype, channels_last: bool, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(shape, generator=gen).relu().to(DEVICE, dtype)  # the DA's map is a ReLU output
    return h.to(memory_format=torch.channels_last) if channels_last else h


def _train_step(branch: DenseBranch, h: torch.Tensor, gout: torch.Tensor, fused: bool) -> torch.Tensor:
    branch.train()
    branch.zero_grad(set_to_none=True)
    x = h.detach().clone().requires_grad_()
    out = dense_branch.fused_dense_branch(x, branch.blocks) if fused else branch.reference_forward(x)
    out.backward(gout)
    return out.detach(), x.grad


def _compare_training(
    fused: DenseBranch, ref: DenseBranch, out: torch.Tensor, out_ref: torch.Tensor, dh: torch.Tensor,
    dh_ref: torch.Tensor, tol: float, grad_bounds: dict[str, float] | None = None,
) -> None:  # fmt: skip
    """Compare outputs, gradients and BatchNorm buffers; grad_bounds overrides the tolerance per gradient."""
    bounds = grad_bounds or {}
    _assert_close(out, out_ref, tol, "output")
    _assert_close(dh, dh_ref, bounds.get("h", tol), "grad h")
    ref_params = dict(ref.named_parameters())
    for name, prm in fused.named_parameters():
        rp = ref_params[name]
        if name.endswith("conv.bias"):
            # A conv bias before training-mode BatchNorm has an exactly zero gradient; both sides hold rounding
            # noise, so measure it against the scale of the matching weight gradient.
            wname = name.replace("bias", "weight")
            _assert_close(prm.grad, rp.grad, tol, f"grad {name}", scale=ref_params[wname].grad.abs().max().item())
        else:
            _assert_close(prm.grad, rp.grad, bounds.get(name, tol), f"grad {name}")
    ref_bufs = dict(ref.named_buffers())
    for name, buf in fused.named_buffers():
        if name.endswith("num_batches_tracked"):
            assert buf.item() == ref_bufs[name].item(), name
        else:
            _assert_close(buf, ref_bufs[name], max(tol, 1e-5), name)


def test_param_counts() -> None:
    assert sum(p.numel() for p in DenseBranch().parameters() if p.requires_grad) == 20_656
    assert sum(p.numel() for p in DenseBranch(64, (32, 4, 16, 4, 16), dims=1).parameters()) == 3_608


def test_eager_paths() -> None:
    """The fused path is off by default; the 1-D form, DCRIS_NO_TRITON and SyncBatchNorm force eager."""
    branch = _randomize(DenseBranch(), 0).eval()
    h = torch.randn(2, 128, 5, 3)
    assert not branch.fused and not branch.use_fused(h)
    torch.testing.assert_close(branch(h), branch.reference_forward(h))
    text = DenseBranch(64, (32, 4, 16, 4, 16), dims=1)
    text.fused = True
    assert text(torch.randn(2, 64, 16)).shape == (2, 64, 16)
    assert not text.use_fused(torch.randn(2, 64, 16))
    branch.fused = True
    with torch.no_grad():
        assert branch.use_fused(h.to(DEVICE))  # CUDA, or Triton's interpreter on a CPU
        os.environ["DCRIS_NO_TRITON"] = "1"
        try:
            assert not branch.use_fused(h.to(DEVICE))
        finally:
            del os.environ["DCRIS_NO_TRITON"]
        synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(branch))
        assert not synced.use_fused(h.to(DEVICE))  # statistics over all ranks: the kernels compute local ones
    # eval mode with gradients wanted: the kernels have no backward with running statistics, so autograd's path
    assert not branch.use_fused(h.to(DEVICE)) and branch.train().use_fused(h.to(DEVICE))


@pytest.fixture
def fresh_first_call(monkeypatch: pytest.MonkeyPatch):
    """Forgets which input kinds were checked and any earlier failure, for this test only."""
    ref = importlib.import_module("dcris.kernels.dense_branch")
    monkeypatch.setattr(ref, "_checked_kinds", set())
    monkeypatch.setattr(ref, "_fused_failure", [])
    return ref


@pytest.mark.parametrize("failure", ["raises", "wrong"])
def test_a_failing_first_fused_call_falls_back_to_eager(fresh_first_call, monkeypatch, failure: str) -> None:
    """A kernel that raises or computes something else: one warning, the eager result, statistics stepped once."""

    def broken(h: torch.Tensor, blocks: tuple[nn.Module, ...]) -> torch.Tensor:
        for block in blocks:  # a half-run kernel may already have touched the statistics
            block.bn.running_mean.add_(1.0)
        if failure == "raises":
            raise RuntimeError("PTX compile failed\nsecond line")
        return torch.zeros_like(h)

    monkeypatch.setattr(dense_branch, "fused_dense_branch", broken)
    branch = _randomize(DenseBranch(), 1).train()
    branch.fused = True
    eager = copy.deepcopy(branch)
    h = _make_input((2, 128, 5, 4), torch.float32, False, 2)
    with pytest.warns(RuntimeWarning, match="failed its first call") as caught:
        out = branch(h)
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    torch.testing.assert_close(out, eager.reference_forward(h))
    for (name, got), want in zip(branch.named_buffers(), eager.buffers(), strict=True):
        torch.testing.assert_close(got, want, msg=name)
    assert fresh_first_call._fused_failure and not branch.use_fused(h)  # off for the rest of the process


def test_a_passing_first_fused_call_keeps_the_fused_path(fresh_first_call, monkeypatch, recwarn) -> None:
    """The real kernel passes its check (interpreter on a CPU) and is used from then on, checked once."""
    calls = []
    real = dense_branch.fused_dense_branch
    monkeypatch.setattr(dense_branch, "fused_dense_branch", lambda h, b: calls.append(1) or real(h, b))
    branch = _randomize(DenseBranch(), 3).eval()
    branch.fused = True
    h = _make_input((2, 128, 5, 4), torch.float32, False, 4)
    with torch.no_grad():
        _assert_close(branch(h), branch.reference_forward(h), 1e-5, "first call")
        _assert_close(branch(h), branch.reference_forward(h), 1e-5, "second call")
    assert len(calls) == 2 and (h.device.type, torch.float32, False) in fresh_first_call._checked_kinds
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_input_checks() -> None:
    branch = DenseBranch().to(DEVICE).eval()
    text_widths = (32, 4, 16, 4, 16)
    with pytest.raises(ValueError, match="128 channels"):
        dense_branch.fused_dense_branch(torch.randn(1, 64, 4, 4, device=DEVICE), branch.blocks)
    with pytest.raises(ValueError, match="4-D"):
        dense_branch.fused_dense_branch(torch.randn(1, 128, 4, device=DEVICE), branch.blocks)
    with pytest.raises(TypeError, match="float32"):
        dense_branch.fused_dense_branch(torch.ones(1, 128, 4, 4, device=DEVICE, dtype=torch.int32), branch.blocks)
    with pytest.raises(ValueError, match="dims=2"):
        dense_branch.fused_dense_branch(torch.randn(1, 64, 4, device=DEVICE), DenseBranch(64, text_widths, 1).blocks)
    with pytest.raises(ValueError, match="no backward with running statistics"):
        dense_branch.fused_dense_branch(torch.randn(1, 128, 4, 4, device=DEVICE, requires_grad=True), branch.blocks)
    with pytest.raises(ValueError, match="more than 1 value"):
        dense_branch.fused_dense_branch(torch.randn(1, 128, 1, 1, device=DEVICE), branch.train().blocks)


@pytest.mark.parametrize(
    ("shape", "channels_last"),
    [((2, 128, 7, 5), False), ((1, 128, 37, 37), False), ((3, 128, 4, 9), True)],
)
def test_inference_fp32(shape: tuple[int, int, int, int], channels_last: bool) -> None:
    branch = _randomize(DenseBranch(), 1).to(DEVICE).eval()
    h = _make_input(shape, torch.float32, channels_last, 2)
    with torch.no_grad():
        out = dense_branch.fused_dense_branch(h, branch.blocks)
        ref = branch.reference_forward(h)
    assert out.shape == ref.shape and out.dtype == h.dtype
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    _assert_close(out, ref, 1e-5, "output")


@pytest.mark.parametrize(
    ("shape", "channels_last", "momentum"),
    [((2, 128, 7, 5), False, 0.1), ((1, 128, 9, 11), True, 0.3), ((3, 128, 5, 3), False, None)],
)
def test_training_fp32(shape: tuple[int, int, int, int], channels_last: bool, momentum: float | None) -> None:
    ref = _randomize(DenseBranch(), 3).to(DEVICE)
    for mod in ref.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.momentum = momentum
    fused = copy.deepcopy(ref)
    h = _make_input(shape, torch.float32, channels_last, 4)
    gout = torch.randn(shape, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    out, dh = _train_step(fused, h, gout, fused=True)
    out_ref, dh_ref = _train_step(ref, h, gout, fused=False)
    assert dh.is_contiguous(memory_format=torch.channels_last) == channels_last
    _compare_training(fused, ref, out, out_ref, dh, dh_ref, 1e-5)


def _bf16_check(shape: tuple[int, int, int, int], seed: int, check_grads: bool = True) -> None:
    """bf16 inference and one training step against the fp32 module on the same bf16-rounded values."""
    base = _randomize(DenseBranch(), seed).to(DEVICE, torch.bfloat16)
    h = _make_input(shape, torch.bfloat16, False, seed + 1)
    with torch.no_grad():
        out = dense_branch.fused_dense_branch(h, base.eval().blocks)
        ref = copy.deepcopy(base).float().reference_forward(h.float())
    assert out.dtype == torch.bfloat16
    _assert_close(out, ref, 1e-2, "bf16 inference output")

    ref32 = copy.deepcopy(base).float()
    eager16 = copy.deepcopy(base)
    fused = copy.deepcopy(base)
    gout = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 2)).to(DEVICE)
    out_ref, dh_ref = _train_step(ref32, h.float(), gout, fused=False)
    out16, dh16 = _train_step(eager16, h, gout.bfloat16(), fused=False)
    out, dh = _train_step(fused, h, gout.bfloat16(), fused=True)
    if not check_grads:
        _assert_close(out, out_ref, 1e-2, "bf16 training output")
        ref_bufs = dict(ref32.named_buffers())
        for name, buf in fused.named_buffers():
            _assert_close(buf, ref_bufs[name], 1e-2, name)
        return
    bounds = {"h": max(1e-2, 2 * _rel_err(dh16, dh_ref))}
    eager_grads = dict(eager16.named_parameters())
    for name, prm in ref32.named_parameters():
        bounds[name] = max(1e-2, 2 * _rel_err(eager_grads[name].grad, prm.grad))
    _compare_training(fused, ref32, out, out_ref, dh, dh_ref, 1e-2, bounds)


def test_bf16_small() -> None:
    # The interpreter has no bf16 tensor-core products: it emulates them by rounding operands, which for the
    # backward products is not what the GPU does (near-fp32 there), so gradients are checked on the GPU only.
    _bf16_check((2, 128, 7, 5), 6, check_grads=torch.cuda.is_available())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dispatch_cuda(dtype: torch.dtype) -> None:
    """DenseBranch.forward takes the fused path on CUDA and matches the reference."""
    branch = _randomize(DenseBranch(), 7).cuda().eval()
    branch.fused = True
    h = _make_input((4, 128, 32, 32), dtype, False, 8)
    with torch.no_grad():
        assert branch.use_fused(h)
        _assert_close(branch(h), branch.reference_forward(h), 1e-5 if dtype == torch.float32 else 1e-2, "output")


@pytest.mark.gpu
@pytest.mark.parametrize("hw", [32, 37])
def test_real_size_fp32(hw: int) -> None:
    ref = _randomize(DenseBranch(), 9).cuda()
    fused = copy.deepcopy(ref)
    shape = (32, 128, hw, hw)
    h = _make_input(shape, torch.float32, hw == 37, 10)
    gout = torch.randn(shape, device="cuda")
    with torch.no_grad():
        out = dense_branch.fused_dense_branch(h, fused.eval().blocks)
        _assert_close(out, ref.eval().reference_forward(h), 1e-5, "eval")
    out, dh = _train_step(fused, h, gout, fused=True)
    out_ref, dh_ref = _train_step(ref, h, gout, fused=False)
    _compare_training(fused, ref, out, out_ref, dh, dh_ref, 1e-5)


@pytest.mark.gpu
def test_real_size_bf16() -> None:
    _bf16_check((32, 128, 32, 32), 11)


_KERNEL_MODULES = ["dense_branch", "dense_branch_ref", "dense_branch_jit", "dense_branch_fwd", "dense_branch_bwd",
                   "dense_branch_launch", "dense_branch_autograd"]  # fmt: skip


@pytest.mark.parametrize("name", _KERNEL_MODULES)
def test_each_kernel_module_imports_alone(name: str) -> None:
    """A fresh interpreter imports the module first (an import circle fails there); the module and its reference
    never import Triton, so the model builds without it."""
    code = (
        "import importlib, sys; "
        f"importlib.import_module('dcris.kernels.{name}'); "
        "print(','.join(sorted(m for m in sys.modules if m.startswith(('dcris', 'triton')))))"
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    loaded = set(out.stdout.strip().split(","))
    assert f"dcris.kernels.{name}" in loaded
    if name in ("dense_branch", "dense_branch_ref"):
        assert not {m for m in loaded if m == "triton" or m.startswith("triton.")}, loaded
        assert "dcris.kernels.dense_branch_autograd" not in loaded
