"""A shard that no longer matches its index (truncated, or bytes overwritten after packing), met mid-epoch in
training or evaluation: both loaders stop with the same one-line UserError naming the shard and the fix."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from dcris.cli import main as cli_main
from dcris.data import build_loader, dali_available
from dcris.data.torch_loader import read_index
from dcris.errors import UserError

LOADERS = ["torch", pytest.param("dali", marks=pytest.mark.skipif(not dali_available(), reason="no DALI"))]
SIZE = 28  # a tiny canvas: the faults are in the reading, not the pictures


@pytest.fixture(scope="module")
def shards(seven_object_shards: Path) -> Path:
    return seven_object_shards


def truncate_half(tar: Path) -> None:
    os.truncate(tar, tar.stat().st_size // 2)


def zero_last_jpeg(tar: Path) -> None:
    """The JPEG bytes of the shard's last sample overwritten with zeros (sizes and offsets unchanged)."""
    offset, size = read_index(str(tar.with_suffix(".idx")))[-1][1]["jpg"]
    with open(tar, "r+b") as f:
        f.seek(offset)
        f.write(bytes(size))


def rename_last_mask_header(tar: Path) -> None:
    """The tar header of the last sample's mask.png given another member name (its bytes unchanged)."""
    offset, _ = read_index(str(tar.with_suffix(".idx")))[-1][1]["mask.png"]
    with open(tar, "r+b") as f:
        f.seek(offset - 512)
        f.write(b"other")


def _broken_copy(shards: Path, tmp_path: Path, split: str, damage: Callable[[Path], None]) -> Path:
    """A copy of the shards with the split's second shard damaged; returns that shard's tar."""
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    tar = copy / split / "000001.tar"
    damage(tar)
    return tar


def _iterate(shards: Path, split: str, train: bool, loader: str) -> int:
    """Batches of one epoch (training) or one evaluation pass; the PyTorch loader reads in two worker processes."""
    data = build_loader(
        shards, split, loader=loader, train=train, batch_size=2, image_size=SIZE, workers=2 if loader == "torch" else 1
    )
    return sum(1 for _ in data)


def _assert_names_shard_and_fix(error: UserError, tar: Path) -> None:
    message = str(error)
    assert "\n" not in message and f"shard {tar} is broken" in message, message
    assert "re-copy the shard" in message and "python shards/pack.py" in message, message


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_truncated_shard_stops_naming_it(shards: Path, tmp_path: Path, loader: str, train: bool) -> None:
    split = "train" if train else "val"
    assert _iterate(shards, split, train, loader) > 0  # the intact shards read
    tar = _broken_copy(shards, tmp_path, split, truncate_half)
    with pytest.raises(UserError) as caught:
        _iterate(tar.parents[1], split, train, loader)
    _assert_names_shard_and_fix(caught.value, tar)
    assert f"it has {tar.stat().st_size} bytes but its index lists fields up to byte" in str(caught.value)


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_overwritten_jpeg_stops_naming_its_shard(shards: Path, tmp_path: Path, loader: str, train: bool) -> None:
    split = "train" if train else "val"
    tar = _broken_copy(shards, tmp_path, split, zero_last_jpeg)
    key = read_index(str(tar.with_suffix(".idx")))[-1][0]
    with pytest.raises(UserError) as caught:
        _iterate(tar.parents[1], split, train, loader)
    _assert_names_shard_and_fix(caught.value, tar)
    assert key in str(caught.value) and "does not decode" in str(caught.value)


@pytest.mark.parametrize("loader", LOADERS)
def test_overwritten_tar_header_stops_naming_its_shard(shards: Path, tmp_path: Path, loader: str) -> None:
    tar = _broken_copy(shards, tmp_path, "val", rename_last_mask_header)
    key = read_index(str(tar.with_suffix(".idx")))[-1][0]
    with pytest.raises(UserError) as caught:
        _iterate(tar.parents[1], "val", False, loader)
    _assert_names_shard_and_fix(caught.value, tar)
    assert "records 'other" in str(caught.value) and f"'{key}.mask.png'" in str(caught.value)


def test_training_on_a_truncated_shard_ends_in_one_error_line(
    shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tar = _broken_copy(shards, tmp_path, "train", truncate_half)
    run = [
        "--preset", "tiny-dcris", f"data.shards={tar.parents[1]}", "data.loader=torch", "data.workers=2",
        f"train.output_dir={tmp_path / 'run'}",
    ]  # fmt: skip
    assert cli_main(["train", *run]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"shard {tar} is broken" in errors[0], err
    assert "Traceback" not in err
