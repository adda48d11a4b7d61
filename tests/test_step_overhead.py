"""What a training step costs the host: no host reads of device values (each one a GPU sync)."""

from __future__ import annotations

import pytest
import torch

from dcris.benchmark import HOST_READ_OPERATOR, OperatorCounter, training_step
from dcris.config import load_config


def _tiny_step(tmp_path, *overrides: str):
    cfg = load_config(preset_name="tiny-dcris", overrides=[
        "train.micro_batch=2", "train.global_batch=2", f"train.output_dir={tmp_path}", *overrides])  # fmt: skip
    return training_step(cfg, model_only=True)


def test_training_step_reads_nothing_on_the_host(tmp_path):
    step, setup = _tiny_step(tmp_path)
    for group in setup.engine.optimizer.optimizer.param_groups:
        group["fused"] = True  # as on a GPU (build_engine's choice there); CPU Adam's default reads its step count
    step()
    with OperatorCounter() as counter:
        step()
    assert sum(counter.counts.values()) > 1000
    assert counter.counts[HOST_READ_OPERATOR] == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_training_steps_make_no_device_sync(tmp_path):
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
