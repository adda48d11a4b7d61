"""What a training step costs the host: no host reads of device values (each one a GPU sync)."""

from __future__ import annotations

import pytest
import torch

from dcris import benchmark
from dcris.benchmark import HOST_READ_OPERATOR, OperatorCounter, training_step
from dcris.config import load_config


def _tiny_step(tmp_path, *overrides: str):
    cfg = load_config(preset_name="tiny-dcris", overrides=[
        "train.micro_batch=2", "train.global_batch=2", f"train.output_dir={tmp_path}", *overrides])  # fmt: skip
    return training_step(cfg, model_only=True)


def _without_grad_norm(monkeypatch: pytest.MonkeyPatch) -> None:
    """ZeRO without its gradient norm (``compute_grad_norm`` false): the norm's read is the one a step keeps."""
    base = benchmark.deepspeed_base
    monkeypatch.setattr(benchmark, "deepspeed_base", lambda *a: dict(base(*a), zero_optimization=dict(
        base(*a)["zero_optimization"], compute_grad_norm=False)))  # fmt: skip


@pytest.mark.parametrize("grad_norm", [True, False])
def test_training_step_reads_only_the_gradient_norm_on_the_host(tmp_path, monkeypatch, grad_norm):
    """One host read a step, ZeRO's non-finite check (it skips a NaN step on every rank), and none without it."""
    if not grad_norm:
        _without_grad_norm(monkeypatch)
    step, setup = _tiny_step(tmp_path)
    for group in setup.engine.optimizer.optimizer.param_groups:
        group["fused"] = True  # as on a GPU (build_engine's choice there); CPU Adam's default reads its step count
    step()
    with OperatorCounter() as counter:
        step()
    assert sum(counter.counts.values()) > 1000
    assert counter.counts[HOST_READ_OPERATOR] == int(grad_norm)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_training_steps_make_no_device_sync(tmp_path, monkeypatch):
    _without_grad_norm(monkeypatch)  # the non-finite check's read is the one sync a step keeps on purpose
    step, _ = _tiny_step(tmp_path)
    step()  # first calls: cached position embedding, allocator, cuDNN choices
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
