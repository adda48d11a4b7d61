"""The training entry point on synthetic shards: loss falls, resume is exact, exports reload, bad input is one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dcris.cli import main as cli_main
from dcris.config import ConfigError, load_config, preset
from dcris.data import build_loader
from dcris.export import load_exported, save_export
from dcris.model import build_model
from dcris.train_setup import batch_layout, deepspeed_config
from dcris.trainer import main as train_main

REPO = Path(__file__).resolve().parents[1]
ZERO2 = str(REPO / "ds_configs" / "zero2.json")


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic release packed into shards (about 40 train objects)."""
    from dcris.data import pack, synth

    root = tmp_path_factory.mktemp("synthetic")
    synth.make_synthetic_release(root / "release", images=24, seed=0)
    release = root / "release"
    pack.main(["--refer", str(release), "--dataset", "synthetic", "--split-by", "unc",
               "--images", str(release / "images"), "--out", str(root / "shards"), "--workers", "1"])  # fmt: skip
    return root / "shards" / "synthetic"


def _train(shards: Path, out: Path, *overrides: str) -> list[dict]:
    argv = ["--deepspeed", ZERO2, "--preset", "tiny-dcris", f"data.shards={shards}", f"train.output_dir={out}",
            "data.loader=torch", "data.workers=1", "train.micro_batch=4", "train.global_batch=4",
            *overrides]  # fmt: skip
    assert train_main(argv) == 0
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_batch_layout_and_deepspeed_config() -> None:
    cfg = preset("dcris-b")
    cfg.train.global_batch, cfg.train.micro_batch = 64, 8
    assert batch_layout(cfg.train, 4) == (8, 2)
    ds = deepspeed_config(cfg, 4, json.loads(Path(ZERO2).read_text()))
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 4
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"] and ds["zero_optimization"]["stage"] == 2
    with pytest.raises(ConfigError, match="train_batch_size"):
        deepspeed_config(cfg, 4, {"train_batch_size": 32})
    with pytest.raises(ConfigError, match="optimizer"):
        deepspeed_config(cfg, 4, {"optimizer": {"type": "AdamW"}})
    with pytest.raises(ConfigError, match="global_batch"):
        batch_layout(cfg.train, 3)


@torch.no_grad()
def _split_loss(model: torch.nn.Module, shards: Path) -> float:
    """Mean loss over the train split, BatchNorm on batch statistics as in training, dropout seeded."""
    model.train()
    torch.manual_seed(1)
    losses = [
        (model.loss(model(b["image"], b["tokens"]), b["mask"]).item(), len(b["image"]))
        for b in build_loader(shards, "train", train=True, batch_size=8, image_size=112, loader="torch", workers=0)
    ]
    return sum(loss * n for loss, n in losses) / sum(n for _, n in losses)


def test_training_loss_falls(shards: Path, tmp_path: Path) -> None:
    log = _train(
        shards, tmp_path / "run", "train.max_steps=16", "train.log_every_steps=4", "train.lr=0.003",
        "train.keep_checkpoints=1",
    )  # fmt: skip
    assert [r["step"] for r in log] == [4, 8, 12, 16]
    # The loss over the whole train split, before (the trainer's seeded init) and after: the logged window means
    # of 4-image batches swing with a few hard batches (single steps range from 0.2 to 3), so they cannot show it.
    torch.manual_seed(0)  # train.seed, as the trainer seeds the model's init
    initial = build_model(preset("tiny-dcris").model, pretrained=True)
    trained = load_exported(tmp_path / "run" / "dcris.safetensors")
    assert _split_loss(trained, shards) < 0.7 * _split_loss(initial, shards)
    assert (tmp_path / "run" / "config.json").is_file() and (tmp_path / "run" / "dcris.safetensors").is_file()
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step00000016"
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))  # DeepSpeed's monitor
    assert [p.name for p in (tmp_path / "run" / "checkpoints").glob("step*")] == ["step00000016"]  # older pruned


def test_resume_matches_uninterrupted_run(shards: Path, tmp_path: Path) -> None:
    # LR drops at epoch 1 (inside the run); fp32 so both runs are bit-comparable
    common = ("train.precision=fp32", "train.epochs=3", "train.lr_milestones=1", "train.log_every_steps=1")
    full = _train(shards, tmp_path / "full", "train.max_steps=13", *common)
    # "killed" right after the checkpoint at step 5, then started again with the same command
    _train(shards, tmp_path / "cut", "train.max_steps=5", *common)
    resumed = _train(shards, tmp_path / "cut", "train.max_steps=13", *common)
    assert resumed[-1]["step"] == full[-1]["step"] == 13
    assert resumed[-1]["lr"] == full[-1]["lr"] == pytest.approx(1e-4)
    by_step = {r["step"]: r for r in full}
    for r in resumed[5:]:  # the steps after the restart
        assert r["lr"] == by_step[r["step"]]["lr"]
        assert r["loss"] == pytest.approx(by_step[r["step"]]["loss"], rel=1e-5)
    a, b = (
        load_file(str(tmp_path / "full" / "dcris.safetensors")),
        load_file(str(tmp_path / "cut" / "dcris.safetensors")),
    )
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_overfit_one_batch_to_high_iou(shards: Path) -> None:
    from dcris.data import build_loader

    torch.manual_seed(0)
    cfg = preset("tiny-dcris")
    batch = next(iter(build_loader(shards, "train", train=True, batch_size=2, image_size=112, loader="torch")))
    model = build_model(cfg.model, pretrained=False).train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(120):
        loss = model.loss(model(batch["image"], batch["tokens"]), batch["mask"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        logits = model(batch["image"], batch["tokens"])
    target = torch.nn.functional.interpolate(batch["mask"], size=logits.shape[-2:], mode="nearest") > 0.5
    pred = logits > 0
    iou = ((pred & target).sum() / (pred | target).sum()).item()
    assert iou > 0.9, f"IoU {iou:.3f} after overfitting one batch"


@pytest.mark.parametrize("name", ["tiny-dcris", "tiny-detris"])
def test_export_reloads_to_identical_predictions(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = preset(name)
    model = build_model(cfg.model, pretrained=False)
    with torch.no_grad():  # make the trainable weights something other than their init
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    path = save_export(model.state_dict(), cfg, tmp_path / "m.safetensors")
    images, tokens = torch.randn(2, 3, 112, 112), torch.randint(1, 400, (2, 17))
    with torch.no_grad():
        expected = model.eval()(images, tokens)
        got = load_exported(path).eval()(images, tokens)
    assert torch.equal(expected, got)
    # trainable + randomly initialised backbone tensors only; a named backbone would not be stored
    assert set(load_file(str(path))) <= set(model.state_dict())


# ------------------------------------------------------------------------------------------------ bad input


def _one_error_line(capsys: pytest.CaptureFixture[str], argv: list[str], needle: str) -> None:
    assert cli_main(argv) != 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err


def test_bad_config_inputs(capsys: pytest.CaptureFixture[str], tmp_path: Path, shards: Path) -> None:
    run = f"train.output_dir={tmp_path / 'run'}"
    _one_error_line(capsys, ["train", "--config", str(tmp_path / "missing.yaml")], "does not exist")
    _one_error_line(capsys, ["train", "--preset", "tiny-dcris", "train.no_such_key=1", run], "train.no_such_key")
    _one_error_line(capsys, ["train", "--preset", "no-such-preset", run], "unknown preset")
    (tmp_path / "empty").mkdir()
    _one_error_line(capsys, ["train", "--preset", "tiny-dcris", f"data.shards={tmp_path / 'empty'}", run], "manifest")
    bad_ds = tmp_path / "ds.json"
    bad_ds.write_text(json.dumps({"train_batch_size": 64}))
    argv = ["train", "--deepspeed", str(bad_ds), "--preset", "tiny-dcris", f"data.shards={shards}", run]
    _one_error_line(capsys, argv, "train_batch_size")
    _one_error_line(
        capsys, ["eval", "--weights", str(tmp_path / "none.safetensors"), "--shards", str(shards)], "weights"
    )


def test_bad_predict_inputs(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cfg = preset("tiny-dcris")
    weights = save_export(build_model(cfg.model, pretrained=False).state_dict(), cfg, tmp_path / "m.safetensors")
    (tmp_path / "not_an_image.jpg").write_text("hello")
    image = tmp_path / "image.png"
    from PIL import Image

    Image.fromarray(np.zeros((20, 30, 3), dtype=np.uint8)).save(image)
    base = ["predict", "--weights", str(weights), "--out", str(tmp_path / "o.png")]
    _one_error_line(capsys, [*base, "--image", str(tmp_path / "not_an_image.jpg"), "--text", "a cat"], "cannot read")
    assert cli_main([*base, "--image", str(image), "--text", "the red circle"]) == 0
    assert (tmp_path / "o.png").is_file() and (tmp_path / "o_mask.png").is_file()


def test_script_form_reports_one_line(tmp_path: Path) -> None:
    """``python launch/train.py`` (what deepspeed / torchrun run) reports user errors as one line too."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "train.py"), "--preset", "tiny-dcris", "model.nope=1"],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2
    assert (
        proc.stderr.strip().splitlines()[-1] == "error: unknown config key 'model.nope'"
        and "Traceback" not in proc.stderr
    )


def test_recipes_load() -> None:
    for path in sorted((REPO / "configs").glob("*.yaml")):
        load_config(str(path))
