"""Faults a long run meets, on one CPU rank: non-finite steps, a kill while saving a checkpoint, a full disk."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from save_faults import check_disk_full_message, kill_at

import dcris.trainer
from dcris.errors import UserError
from dcris.trainer import main as train_main

REPO = Path(__file__).resolve().parents[1]
ZERO2 = str(REPO / "ds_configs" / "zero2.json")
SINGLE = str(REPO / "ds_configs" / "single.json")  # no ZeRO: the step is skipped on the device


class _Poisoned:
    """A training loader whose micro-batches number ``bad`` (counted from the run's first) carry a NaN pixel."""

    def __init__(self, inner: Any, first: int, bad: set[int]) -> None:
        self.inner, self.first, self.bad = inner, first, bad

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Iterator[dict]:
        for i, batch in enumerate(self.inner, start=self.first):
            if i in self.bad:
                batch = dict(batch, image=batch["image"].clone())
                batch["image"][0, 1, 5, 7] = float("nan")
            yield batch


def _poison(monkeypatch: pytest.MonkeyPatch, bad: set[int]) -> None:
    real = dcris.trainer.train_loader

    def loader(cfg: Any, rank: int, world: int, device: torch.device, epoch: int, start_batch: int = 0) -> _Poisoned:
        inner = real(cfg, rank, world, device, epoch, start_batch)
        return _Poisoned(inner, epoch * inner.epoch_batches() + start_batch, bad)

    monkeypatch.setattr(dcris.trainer, "train_loader", loader)


def _tensors(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor inside nested dicts / lists, by path."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list | tuple) else []
    return {k: v for key, value in items for k, v in _tensors(value, f"{prefix}/{key}").items()}


def _state(tag: Path) -> dict[str, torch.Tensor]:
    """The trainable weights, buffers and optimizer state (Adam moments and step counts; ZeRO's fp32 partition) a
    checkpoint holds."""
    states = torch.load(tag / "mp_rank_00_model_states.pt", weights_only=False)
    zero = tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    optim = torch.load(zero, weights_only=False)["optimizer_state_dict"] if zero.is_file() else states["optimizer"]
    return _tensors(states["module"], "module") | _tensors(optim, "optim")


def _argv(shards: Path, out: Path, *overrides: str, deepspeed: str = ZERO2) -> list[str]:
    return ["--deepspeed", deepspeed, "--preset", "tiny-dcris", f"data.shards={shards}", f"train.output_dir={out}",
            "data.loader=torch", "data.workers=0", "train.micro_batch=2", "train.global_batch=4",
            "train.precision=fp32", "train.save_every_steps=1", "train.keep_checkpoints=0", "train.log_every_steps=1",
            "data.eval_splits=val", "train.eval_every_epochs=0", "train.eval_pictures=0", *overrides]  # fmt: skip


def _run(shards: Path, out: Path, *overrides: str, deepspeed: str = ZERO2) -> None:
    assert train_main(_argv(shards, out, *overrides, deepspeed=deepspeed)) == 0


@pytest.mark.parametrize("deepspeed", [ZERO2, SINGLE], ids=["zero2", "no-zero"])
def test_a_non_finite_step_is_skipped_and_counted(shards: Path, tmp_path: Path, monkeypatch, deepspeed) -> None:
    _poison(monkeypatch, {5})  # the second micro-batch of step 3: the first one's gradients go as well
    run = tmp_path / "run"
    _run(shards, run, "train.max_steps=5", deepspeed=deepspeed)
    ckpt = run / "checkpoints"
    before, skipped, after = (_state(ckpt / f"step{s:08d}") for s in (2, 3, 4))
    assert before.keys() == skipped.keys() and any("running_mean" in k for k in before)
    assert any("exp_avg_sq" in k for k in before)
    unchanged = [k for k in before if torch.equal(before[k], skipped[k])]
    assert unchanged == list(before)  # weights, Adam moments and step count, BatchNorm statistics
    assert not torch.equal(skipped["module/head.proj.txt.weight"], after["module/head.proj.txt.weight"])
    assert all(torch.isfinite(v.float()).all() for v in after.values())
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r for r in log if r.get("skipped")] == [dict(step=3, skipped=True, skipped_steps=1)]
    assert [r["skipped_steps"] for r in log if "loss" in r] == [0, 0, 1, 1, 1]
    assert all(r["loss"] == r["loss"] for r in log if "loss" in r and r["step"] != 3)  # no NaN went into the mean
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((run / "tensorboard").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/skipped_steps")][-3:] == [(3, 1), (4, 1), (5, 1)]


def test_non_finite_steps_in_a_row_stop_the_run(shards: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    _poison(monkeypatch, set(range(4, 10)))  # steps 3, 4 and 5
    run = tmp_path / "run"
    with pytest.raises(UserError) as stop:
        _run(shards, run, "train.max_steps=8", "train.max_bad_steps=3")
    message = str(stop.value)
    assert "\n" not in message and "3 steps in a row, up to step 5" in message and "train.max_bad_steps" in message
    ckpt = run / "checkpoints"
    assert (ckpt / "latest").read_text() == "step00000004"  # saved during the streak: the step-2 state
    good, latest = _state(ckpt / "step00000002"), _state(ckpt / "step00000004")
    assert all(torch.equal(good[k], latest[k]) for k in good)
    assert not (ckpt / "step00000005").exists() and not (run / "export").exists()


def test_a_kill_before_latest_moves_resumes_from_the_previous_checkpoint(
    shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, keep = tmp_path / "run", "train.keep_checkpoints=2"
    ckpt = run / "checkpoints"
    _run(shards, run, "train.max_steps=2", keep)
    argv = _argv(shards, run, "train.max_steps=4", "train.save_every_steps=0", keep)  # saves step 4 only
    kill_at("checkpoint-latest", f"import sys; from dcris.trainer import main; sys.exit(main({argv!r}))", tmp_path)
    assert (ckpt / "latest").read_text() == "step00000002" and (ckpt / "step00000004").is_dir()
    optim = ckpt / "step00000004" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    optim.write_bytes(optim.read_bytes()[:1000])  # as a kill inside DeepSpeed's writes leaves it
    capsys.readouterr()
    _run(shards, run, "train.max_steps=3", keep)
    assert f"resumed from {ckpt} at step 2" in capsys.readouterr().out
    assert (ckpt / "latest").read_text() == "step00000003"
    # the two newest complete checkpoints: the killed save's folder is neither counted nor deleted
    assert sorted(p.name for p in ckpt.glob("step*")) == ["step00000002", "step00000003", "step00000004"]
    good, resumed = _state(ckpt / "step00000002"), _state(ckpt / "step00000003")
    assert not torch.equal(good["module/head.proj.txt.weight"], resumed["module/head.proj.txt.weight"])
    _run(shards, run, "train.max_steps=4", keep)  # the save at step 4 replaces what the kill left
    assert (ckpt / "latest").read_text() == "step00000004"
    assert sorted(p.name for p in ckpt.glob("step*")) == ["step00000003", "step00000004"]
    assert all(torch.isfinite(v.float()).all() for v in _state(ckpt / "step00000004").values())


def test_a_full_disk_stops_a_checkpoint_save_in_one_line(shards: Path, tmp_path: Path, monkeypatch) -> None:
    run = tmp_path / "run"
    ckpt = run / "checkpoints"
    _run(shards, run, "train.max_steps=2")
    real_save = torch.save

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        if str(f).endswith("optim_states.pt"):
            # what torch.save to a path raises on a full disk (seen on a 64 KiB tmpfs): no errno, no OSError
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(UserError) as stop:
        _run(shards, run, "train.max_steps=3")
    check_disk_full_message(str(stop.value), ckpt)
    assert (ckpt / "latest").read_text() == "step00000002"
    assert all(torch.isfinite(v.float()).all() for v in _state(ckpt / "step00000002").values())


def test_skipping_adam_is_fused_adam_until_a_gradient_is_not_finite() -> None:
    """Finite gradients: bitwise torch's fused Adam. A NaN anywhere: weights, moments and step counts unchanged,
    and ``skipped`` says so on the device."""
    from dcris.train_setup import SkippingAdam

    torch.manual_seed(0)
    weights = [torch.randn(5, 3), torch.randn(7)]
    ours = [w.clone().requires_grad_() for w in weights]
    theirs = [w.clone().requires_grad_() for w in weights]
    opt, reference = SkippingAdam(ours, lr=1e-2), torch.optim.Adam(theirs, lr=1e-2, fused=True)
    for _ in range(3):
        grads = [torch.randn_like(w) for w in weights]
        for p, q, g in zip(ours, theirs, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        reference.step()
        assert not opt.skipped and all(torch.equal(p, q) for p, q in zip(ours, theirs, strict=True))
    before = [p.detach().clone() for p in ours], {k: dict(v) for k, v in opt.state_dict()["state"].items()}
    for p in ours:
        p.grad = torch.randn_like(p)
    ours[1].grad[3] = float("nan")
    opt.step()
    assert opt.skipped.dtype == torch.bool and bool(opt.skipped)
    assert all(torch.equal(p, b) for p, b in zip(ours, before[0], strict=True))
    state = opt.state_dict()["state"]
    assert all(torch.equal(state[k][n], before[1][k][n]) for k in state for n in state[k])
    assert not hasattr(opt, "found_inf")  # nothing left for the next step
