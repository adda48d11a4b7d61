"""Checkpoint files this project writes are read without arbitrary pickle; exports survive kills and full disks
(checkpoints: test_train_faults.py)."""

from __future__ import annotations

import os
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors import SafetensorError
from save_faults import check_disk_full_message, kill_at

import dcris.export
from dcris.checkpoint import LATEST, _rng_state, load_checkpoint, set_rng_state
from dcris.config import preset
from dcris.errors import UserError
from dcris.export import load_exported, read_export_config, save_export
from dcris.model import build_model


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


def _tiny_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return build_model(preset("tiny-dcris").model, pretrained=False).state_dict()


def _assert_loads_as(path: Path, state: dict[str, torch.Tensor]) -> None:
    loaded = load_exported(path).state_dict()
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


def test_an_export_killed_between_its_renames_reads_as_the_earlier_one(tmp_path: Path) -> None:
    cfg, earlier = preset("tiny-dcris"), _tiny_state(0)
    path = save_export(earlier, cfg, tmp_path / "exports" / "export")
    code = (
        "import torch; from dcris.config import preset; from dcris.export import save_export; "
        "from dcris.model import build_model; cfg = preset('tiny-dcris'); torch.manual_seed(1); "
        f"save_export(build_model(cfg.model, pretrained=False).state_dict(), cfg, {str(path)!r})"
    )
    kill_at("export-swap", code, tmp_path)
    assert not path.exists()  # the earlier export had moved aside, the new one not yet in
    assert read_export_config(path).preset == "tiny-dcris"
    _assert_loads_as(path, earlier)
    later = _tiny_state(2)
    save_export(later, cfg, path)  # takes the earlier one back, then replaces it
    assert [p.name for p in path.parent.iterdir()] == ["export"]
    _assert_loads_as(path, later)


def test_a_full_disk_stops_an_export_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, earlier = preset("tiny-dcris"), _tiny_state(0)
    path = save_export(earlier, cfg, tmp_path / "export")

    def save_file(*args, **kwargs) -> None:  # what safetensors raises on a full disk (seen on a 64 KiB tmpfs)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(dcris.export, "save_file", save_file)
    with pytest.raises(UserError) as stop:
        save_export(_tiny_state(1), cfg, path)
    check_disk_full_message(str(stop.value), path)
    _assert_loads_as(path, earlier)
