"""Checkpoint files this project writes are read without arbitrary pickle; saves survive kills and full disks."""

from __future__ import annotations

import os
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from dcris.checkpoint import LATEST, _rng_state, load_checkpoint, set_rng_state


class _RunsCode:
    """Pickles as a call of ``os.system``: unpickling it with plain ``pickle`` would run the shell command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple:
        return os.system, (self.command,)


def _fake_engine() -> SimpleNamespace:
    """Stands in for a DeepSpeed engine whose own files loaded fine (DeepSpeed reads those as it reads them)."""
    return SimpleNamespace(load_checkpoint=lambda *args, **kwargs: (None, {"step": 3}))


def _tag(tmp_path: Path) -> Path:
    folder = tmp_path / "checkpoints" / "step00000003"
    folder.mkdir(parents=True)
    (tmp_path / "checkpoints" / LATEST).write_text(folder.name)
    return folder


def _draws() -> tuple:
    return random.random(), random.gauss(0, 1), float(np.random.rand()), np.random.randn(), float(torch.rand(()))


def test_rng_states_come_back_through_a_tensor_only_file(tmp_path: Path) -> None:
    folder = _tag(tmp_path)
    random.seed(11), np.random.seed(12), torch.manual_seed(13)
    random.gauss(0, 1), np.random.randn()  # a cached Gaussian in both states
    torch.save(_rng_state(), folder / "rng_0.pt")
    expected = _draws()
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    client_state, rng = load_checkpoint(_fake_engine(), tmp_path / "checkpoints", rank=0)
    assert client_state == {"step": 3}
    set_rng_state(rng)
    assert _draws() == expected


def test_an_rng_file_that_would_run_code_is_not_unpickled(tmp_path: Path) -> None:
    folder = _tag(tmp_path)
    marker = tmp_path / "ran"
    torch.save({"python": _RunsCode(f"touch {marker}")}, folder / "rng_0.pt")
    client_state, rng = load_checkpoint(_fake_engine(), tmp_path / "checkpoints", rank=0)
    assert client_state == {"step": 3} and rng is None  # the run goes on without those states
    assert not marker.exists()
