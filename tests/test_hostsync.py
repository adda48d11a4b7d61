"""Host synchronisations: the counter itself on snippets that do and do not sync, then the trainer's steps between
log lines and evaluation's batches, which must make none."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dcris.config import load_config
from dcris.hostsync import HostSyncCounter, count_evaluation_syncs, count_training_syncs
from dcris.train_setup import DEFAULT_DEEPSPEED, precision_dtype, read_deepspeed_json

CPU = torch.device("cpu")

# each syncs once, with its kind; ``w`` is a device tensor (made before the counter started)
SYNCING = {
    "item": ("read", lambda w: w.sum().item()),
    "bool": ("read", lambda w: bool(w.sum() > 0)),
    "float": ("read", lambda w: float(w[0, 0])),
    "tolist": ("read", lambda w: w.tolist()),
    "numpy": ("read", lambda w: w.numpy()),
    "cpu": ("to_host", lambda w: w.cpu()),
    "nonzero": ("data_shape", lambda w: w.nonzero()),
    "boolean index": ("data_shape", lambda w: w[w > 0]),
    "boolean assignment": ("data_shape", lambda w: w.clone().__setitem__(w > 0, 0.0)),
    "unique": ("data_shape", lambda w: torch.unique(w)),
    "masked_select": ("data_shape", lambda w: torch.masked_select(w, w > 0)),
    "repeat_interleave": ("data_shape", lambda w: torch.repeat_interleave(w[0].long().abs() + 1)),
    "tensor of a list on the device": ("host_copy", lambda w: torch.tensor([1, 2], device=CPU) + w[0, :2]),
    "tensor of numpy on the device": ("host_copy", lambda w: torch.as_tensor(np.ones(4, np.float32), device=CPU)),
    "blocking copy": ("host_copy", lambda w: torch.arange(4.0).to(CPU) + w[0]),
    "blocking copy_": ("host_copy", lambda w: w.clone().copy_(torch.ones(4, 4))),
    "DeepSpeed's synchronize": ("sync", lambda w: _deepspeed_accelerator().synchronize()),
}
# none syncs, and every one computes on the device or moves data there
NOT_SYNCING = {
    "arithmetic": lambda w: (w @ w).relu().sum(dim=0),
    "where": lambda w: torch.where(w > 0, w, 0.0),
    "factory on the device": lambda w: torch.zeros(4, device=CPU) + torch.full((), 2.0, device=CPU) * w[0],
    "asynchronous copy": lambda w: torch.arange(4.0).to(CPU, non_blocking=True) + w[0],
    "host work beside": lambda w: (torch.arange(4).tolist(), torch.tensor([1.5]).item(), w.mean(0)),
    "host boolean index": lambda w: (torch.arange(4)[torch.arange(4) > 1], w + 1),
    "sum of a host read": lambda w: w * float(torch.tensor(2.0)),
}


def _deepspeed_accelerator():
    from deepspeed.accelerator import get_accelerator

    return get_accelerator()


@pytest.mark.parametrize("name", SYNCING)
def test_the_counter_counts_each_kind_of_host_sync_once(name: str) -> None:
    kind, snippet = SYNCING[name]
    _deepspeed_accelerator()  # imported before the counter starts, as the trainer's code has it
    w = torch.randn(4, 4)
    with HostSyncCounter(CPU) as counter:
        snippet(w)
    assert [e.kind for e in counter.events] == [kind], counter.where()
    assert Path(__file__).name in counter.events[0].where  # the line that synced


@pytest.mark.parametrize("name", NOT_SYNCING)
def test_the_counter_counts_nothing_where_nothing_syncs(name: str) -> None:
    w = torch.randn(4, 4)
    with HostSyncCounter(CPU) as counter:
        NOT_SYNCING[name](w)
    assert counter.events == [] and counter.device_ops > 0  # it watched device work


def test_the_counter_counts_explicit_cuda_syncs_and_restores_what_it_patched() -> None:
    original = torch.cuda.synchronize
    with HostSyncCounter(CPU) as counter:
        try:
            torch.cuda.synchronize()  # without a GPU it raises after being counted
        except (RuntimeError, AssertionError):
            pass
    assert counter.by_kind()["sync"] == 1 and torch.cuda.synchronize is original


def test_the_simulated_device_keeps_host_tensors_on_the_host() -> None:
    """On the CPU ``.to(device)`` and ``.cpu()`` copy, as on a GPU: the host original stays a host tensor."""
    with HostSyncCounter(CPU) as counter:
        index = torch.arange(3)
        moved = index.to(CPU, non_blocking=True)
        index.tolist()  # the host original: free
        moved.tolist()  # its device copy: a read
        back = (moved * 2).cpu()
        back.tolist()  # on the host again: free
    assert [(e.kind, e.what) for e in counter.events] == [("read", "tolist"), ("to_host", "cpu")]
    assert moved.data_ptr() != index.data_ptr() and back.tolist() == [0, 2, 4]


def test_sections_split_the_counts() -> None:
    w = torch.randn(3)
    with HostSyncCounter(CPU) as counter:
        with counter.in_section("a"):
            w.sum().item()
        with counter.pause():
            w.sum().item()
        w.max().item()
    assert counter.count("a") == 1 and counter.count(None) == 1 and counter.count() == 2


def test_no_host_sync_between_log_lines_nor_per_evaluation_batch(shards: Path, tmp_path: Path) -> None:
    """The trainer's own steps (the default one-process DeepSpeed config, bf16, accumulation 2) between log lines
    and evaluation's batches until the results are read: not one synchronisation, while each step and each
    batch ran hundreds of operators on the device."""
    cfg = load_config(preset_name="tiny-dcris", overrides=[
        f"data.shards={shards}", f"train.output_dir={tmp_path / 'run'}", "data.loader=torch", "data.workers=1",
        "train.micro_batch=2", "train.global_batch=4", "train.max_steps=4", "train.log_every_steps=1000",
        "train.eval_every_epochs=0", "train.save_every_steps=0", "train.eval_pictures=0", "data.eval_splits=",
    ])  # fmt: skip
    train, run = count_training_syncs(cfg, read_deepspeed_json(DEFAULT_DEEPSPEED), str(DEFAULT_DEEPSPEED))
    assert train["steps"] == 2 and train["syncs_by_step"] == [0, 0], train["where"]
    assert train["device_ops_per_step"] > 1000
    evaluation = count_evaluation_syncs(
        run.setup.engine.module, str(shards), "val", image_size=cfg.model.image_size, batch_size=2,
        device=run.setup.device, dtype=precision_dtype(cfg.train),
    )  # fmt: skip
    assert evaluation["batches"] >= 2 and evaluation["syncs_per_batch"] == 0, evaluation["where"]
    assert evaluation["device_ops_per_batch"] > 100
    assert evaluation["results"]["count"] == 10 and 0 <= evaluation["results"]["miou"] <= 1  # every val pair
