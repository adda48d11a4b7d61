"""The training entry point on synthetic shards: loss falls, resume is exact, exports reload, bad input is one line."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import eval_reference
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.nn.modules.batchnorm import _BatchNorm

from dcris.checkpoint import DIGEST_KEY, load_weights
from dcris.cli import main as cli_main
from dcris.config import ConfigError, load_config, preset
from dcris.data import build_loader, dali_available, num_samples
from dcris.errors import UserError
from dcris.evaluate import evaluate
from dcris.export import load_exported, save_export
from dcris.model import build_model
from dcris.precision import frozen_matmul_parameters
from dcris.train_setup import (
    AUTOCAST_DTYPES,
    batch_layout,
    build_engine,
    build_training_model,
    convert_sync_batchnorm,
    deepspeed_config,
    frozen_digest,
    use_sync_batchnorm,
)
from dcris.trainer import main as train_main
from dcris.trainer import train_loader

REPO = Path(__file__).resolve().parents[1]
ZERO2 = str(REPO / "ds_configs" / "zero2.json")


def _train(shards: Path, out: Path, *overrides: str, loader: str = "torch") -> list[dict]:
    argv = ["--deepspeed", ZERO2, "--preset", "tiny-dcris", f"data.shards={shards}", f"train.output_dir={out}",
            f"data.loader={loader}", "data.workers=1", "train.micro_batch=4", "train.global_batch=4",
            *overrides]  # fmt: skip
    assert train_main(argv) == 0
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_batch_layout_and_deepspeed_config() -> None:
    cfg = preset("dcris-b")
    cfg.train.global_batch, cfg.train.micro_batch = 64, 8
    assert batch_layout(cfg.train, 4) == (8, 2)
    ds = deepspeed_config(cfg, 4, json.loads(Path(ZERO2).read_text()))
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 4
    # mixed precision is autocast over fp32 weights: DeepSpeed's 16-bit weight modes stay off
    assert not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"] and ds["zero_optimization"]["stage"] == 2
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bf16", "lower_precision_safe_modules": []}
    assert "data_types" not in ds
    cfg.train.precision = "fp32"
    assert not deepspeed_config(cfg, 4, {})["torch_autocast"]["enabled"]
    cfg.train.precision, cfg.train.grad_clip = "fp16", 1.0
    with pytest.raises(ConfigError, match="grad_clip"):
        deepspeed_config(cfg, 4, json.loads(Path(ZERO2).read_text()))
    with pytest.raises(ConfigError, match="bf16.enabled"):
        deepspeed_config(cfg, 4, {"bf16": {"enabled": True}})
    with pytest.raises(ConfigError, match="train_batch_size"):
        deepspeed_config(cfg, 4, {"train_batch_size": 32})
    with pytest.raises(ConfigError, match="optimizer"):
        deepspeed_config(cfg, 4, {"optimizer": {"type": "AdamW"}})
    with pytest.raises(ConfigError, match="global_batch"):
        batch_layout(cfg.train, 3)


@torch.no_grad()
def _split_loss(model: torch.nn.Module, shards: Path, loss: Callable | None = None) -> float:
    """Mean loss over the train split, BatchNorm on batch statistics as in training, dropout seeded; ``loss(output,
    batch)`` instead of the model's own."""
    model.train()
    torch.manual_seed(1)
    loss = loss or (lambda output, b: model.loss(output, b["mask"], b["num_targets"]))
    losses = [
        (loss(model(b["image"], b["tokens"]), b).item(), len(b["image"]))
        for b in build_loader(shards, "train", train=True, batch_size=8, image_size=112, loader="torch", workers=0)
    ]
    return sum(loss * n for loss, n in losses) / sum(n for _, n in losses)


def _record_loader_kinds(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """(module, loader class) of every loader the trainer and evaluation build from now on."""
    from dcris import evaluate as evaluate_module
    from dcris import trainer

    built: list[tuple[str, str]] = []
    for module in (trainer, evaluate_module):

        def recording(*args, _name=module.__name__, **kwargs):
            loader = build_loader(*args, **kwargs)
            built.append((_name, type(loader).__name__))
            return loader

        monkeypatch.setattr(module, "build_loader", recording)
    return built


def test_training_loss_falls(shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default loader (data.loader=auto: DALI where it is installed, as in CI) for training and evaluation."""
    built = _record_loader_kinds(monkeypatch)
    log = _train(
        shards, tmp_path / "run", "train.max_steps=16", "train.log_every_steps=4", "train.lr=0.003",
        "train.keep_checkpoints=1", "data.eval_splits=val,testA", loader="auto",
    )  # fmt: skip
    default = "DaliShardLoader" if dali_available() else "TorchShardLoader"
    assert {kind for _, kind in built} == {default}
    assert {name for name, _ in built} == {"dcris.trainer", "dcris.evaluate"}
    assert [r["step"] for r in log] == [4, 8, 12, 16]
    # The loss over the whole train split, before (the trainer's seeded init) and after: the logged window means
    # of 4-image batches swing with a few hard batches (single steps range from 0.2 to 3), so they cannot show it.
    torch.manual_seed(0)  # train.seed, as the trainer seeds the model's init
    initial = build_model(preset("tiny-dcris").model, pretrained=True)
    trained = load_exported(tmp_path / "run" / "export")
    assert _split_loss(trained, shards) < 0.7 * _split_loss(initial, shards)
    assert (tmp_path / "run" / "config.json").is_file()
    assert (tmp_path / "run" / "export" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step00000016"
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))  # DeepSpeed's monitor
    assert [p.name for p in (tmp_path / "run" / "checkpoints").glob("step*")] == ["step00000016"]  # older pruned
    # val at the epoch end (11 steps an epoch), then after the last step the data.eval_splits as well
    evaluations = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(e["step"], list(e["results"])) for e in evaluations] == [(11, ["val"]), (16, ["val", "testA"])]


@pytest.mark.skipif(not dali_available(), reason="no DALI")
def test_dali_and_torch_loaders_give_the_same_training_samples(shards: Path) -> None:
    """Through the trainer's own loader (trainer.train_loader), on one rank and on two: the loaders read the same
    objects, with the same sentence (tokens exactly) and the same letterboxed image and mask up to the
    resamplers' rounding; full-size batches have the same layout (keys, shapes, dtypes, devices, count).

    Batches of one. A rank yields (N // W) // batch samples of its range, so where that drops samples, which ones
    it drops depends on each loader's own shuffle buffer: only those may differ."""
    from dcris.data.common import rank_range

    cfg = preset("tiny-dcris")
    cfg.data.shards, cfg.data.workers, cfg.data.seed, cfg.data.shuffle_buffer = str(shards), 1, 3, 8
    size, total = cfg.model.image_size, num_samples(shards, "train", train=True)
    for world, rank in ((1, 0), (2, 1)):
        samples = {}
        for kind in ("dali", "torch"):
            cfg.data.loader, cfg.train.micro_batch = kind, 1
            batches = list(train_loader(cfg, rank, world, torch.device("cpu"), epoch=1))
            samples[kind] = {int(b["ref_id"][0]): b for b in batches}
            assert len(samples[kind]) == len(batches) == total // world  # every object once
        dali, torch_ = samples["dali"], samples["torch"]
        start, end = rank_range(total, rank, world)
        dropped = end - start - total // world
        assert len(dali.keys() ^ torch_.keys()) <= 2 * dropped, (world, rank)
        for ref_id in dali.keys() & torch_.keys():
            a, b = dali[ref_id], torch_[ref_id]
            assert torch.equal(a["tokens"], b["tokens"]), ref_id
            assert (a["image"] - b["image"]).abs().max() < 0.06 and (a["mask"] - b["mask"]).abs().max() < 0.03
            assert (a["image"] - b["image"]).abs().mean() < 1e-3, ref_id  # rounding at a few pixels, no shift
        layouts = []
        for kind in ("dali", "torch"):
            cfg.data.loader, cfg.train.micro_batch = kind, 4
            batches = list(train_loader(cfg, rank, world, torch.device("cpu"), epoch=1))
            layouts.append([{k: (tuple(v.shape), v.dtype, v.device.type) for k, v in b.items()} for b in batches])
        assert layouts[0] == layouts[1] and layouts[0][0]["image"] == ((4, 3, size, size), torch.float32, "cpu")


def test_the_trainers_epoch_follows_data_sample(shards: Path) -> None:
    """steps an epoch = objects // batch under object sampling, the shards' sentences // batch under sentence."""
    manifest = json.loads((shards / "manifest.json").read_text())["splits"]["train"]
    sentences = sum(sum(shard["sentence_counts"]) for shard in manifest["shards"])
    assert sentences > manifest["objects"]
    cfg = preset("tiny-dcris")
    cfg.data.shards, cfg.data.loader, cfg.train.micro_batch = str(shards), "torch", 4
    for sample, units in (("object", manifest["objects"]), ("sentence", sentences)):
        cfg.data.sample = sample
        assert len(train_loader(cfg, 0, 1, torch.device("cpu"), epoch=0)) == units // 4


@pytest.fixture(scope="module")
def gres_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic gRefCOCO release (shards/synth.py --gres, 24 images) packed: train, val, testA, testB."""
    from dcris.data import pack, synth

    root = tmp_path_factory.mktemp("gres")
    synth.make_synthetic_release(root / "release", images=24, seed=0, gres=True)
    pack.main(["--refer", str(root / "release"), "--dataset", "synthetic_gres", "--split-by", "unc", "--images",
               str(root / "release" / "images"), "--out", str(root / "shards"), "--workers", "1"])  # fmt: skip
    return root / "shards" / "synthetic_gres"


def test_the_tiny_preset_trains_on_the_synthetic_gres_release(gres_shards: Path, tmp_path: Path) -> None:
    """The real entry point with the no-target output: both losses fall, evaluation reports the GRES metrics."""
    from dcris.head import no_target_loss
    from dcris.model import split_output

    _train(
        gres_shards, tmp_path / "run", "model.head.no_target=true", "train.max_steps=16", "train.lr=0.003",
        "train.log_every_steps=8", "train.keep_checkpoints=1",
    )  # fmt: skip
    cfg = preset("tiny-dcris")
    cfg.model.head.no_target = True
    torch.manual_seed(0)  # train.seed, as the trainer seeds the model's init
    initial = build_model(cfg.model, pretrained=True)
    trained = load_exported(tmp_path / "run" / "export")
    assert trained.head.no_target is not None

    def nt_loss(output: tuple, batch: dict) -> torch.Tensor:
        return no_target_loss(split_output(output)[1], batch["num_targets"])

    assert _split_loss(trained, gres_shards) < 0.8 * _split_loss(initial, gres_shards)
    assert _split_loss(trained, gres_shards, nt_loss) < 0.9 * _split_loss(initial, gres_shards, nt_loss)
    evaluations = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = evaluations[-1]["results"]["val"]
    assert {"giou", "ciou", "n_acc", "t_acc", "prec@0.7", "prec@0.8", "prec@0.9"} <= set(val)
    manifest = json.loads((gres_shards / "manifest.json").read_text())["splits"]["val"]
    assert val["count"] == manifest["sentences"] and val["no_target"] == manifest["no_target"]["sentences"] > 0


def test_checkpoint_holds_no_frozen_weights_and_loads_like_the_export(shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    _train(shards, run, "train.max_steps=3", "train.precision=fp32")
    tag = run / "checkpoints" / "step00000003"
    saved = torch.load(tag / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    model = build_model(preset("tiny-dcris").model, pretrained=False)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    buffers = set(model.state_dict()) - frozen - trainable  # the BatchNorm statistics
    assert frozen and buffers and not frozen & set(saved)
    assert set(saved) == trainable | buffers
    # fp32 weights + fp32 master copy, Adam's two moments, and some bytes of pickling: no room for the backbones
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen_bytes = 4 * sum(p.numel() for p in model.parameters() if not p.requires_grad)
    size = sum(f.stat().st_size for f in tag.iterdir())
    assert size < 16 * n_trainable + 2**18 < frozen_bytes
    # the folder rebuilds the frozen parts from the config and takes the fp32 master weights: as the export
    from_folder, from_export = load_weights(run / "checkpoints"), load_exported(run / "export")
    exported = from_export.state_dict()
    assert all(torch.equal(v, exported[k]) for k, v in from_folder.state_dict().items())
    options = dict(image_size=112, batch_size=8, loader="torch", workers=0)
    folder_metrics = evaluate(from_folder, str(shards), ["val"], **options)
    assert folder_metrics == evaluate(from_export, str(shards), ["val"], **options)
    # a config that builds other frozen weights (here: another seed for the random backbones) is refused
    config = json.loads((tag / "config.json").read_text())
    config["train"]["seed"] += 1
    (tag / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="frozen weights"):
        load_weights(run / "checkpoints")


def test_bf16_run_with_16_bit_frozen_weights_keeps_its_digest_and_exports_fp32_backbones(
    shards: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    _train(shards, run, "train.max_steps=2", "train.precision=bf16", "train.eval_pictures=2")  # pictures: autocast
    cfg = load_config(str(run / "config.json"))
    built = build_training_model(cfg)  # fp32, as every run builds it
    model_states = torch.load(run / "checkpoints" / "step00000002" / "mp_rank_00_model_states.pt", weights_only=False)
    assert model_states[DIGEST_KEY] == frozen_digest(built)
    exported = load_file(str(run / "export" / "model.safetensors"))
    frozen = [n for n, p in built.named_parameters() if not p.requires_grad]
    assert frozen and all(exported[n].dtype == torch.float32 and torch.equal(exported[n], built.state_dict()[n])
                          for n in frozen)  # fmt: skip
    load_weights(run / "checkpoints")  # the digest check passes


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_keeps_weights_state_and_statistics_fp32(
    precision: str, shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from deepspeed.runtime import torch_autocast
    from deepspeed.utils import safe_get_full_fp32_param

    # DeepSpeed keeps the autocast dtype of the newest engine in module globals: put them back afterwards
    for name in ("TORCH_AUTOCAST_INITIALIZED", "TORCH_AUTOCAST_DTYPE"):
        monkeypatch.setattr(torch_autocast, name, getattr(torch_autocast, name))
    cfg = preset("tiny-dcris")
    cfg.train.precision, cfg.train.lr, cfg.train.output_dir = precision, 3e-3, str(tmp_path)
    cfg.train.micro_batch = cfg.train.global_batch = 4
    setup = build_engine(cfg, json.loads(Path(ZERO2).read_text()), ZERO2)
    engine = setup.engine
    batch = next(iter(build_loader(shards, "train", train=True, batch_size=4, image_size=112, loader="torch")))
    image, tokens, mask = (batch[k].to(setup.device) for k in ("image", "tokens", "mask"))
    norms = [m for m in engine.module.modules() if isinstance(m, _BatchNorm)]
    initial = [(m.running_mean.clone(), m.running_var.clone()) for m in norms]
    engine.train()
    losses = []
    for _ in range(6):
        logits = engine(image, tokens)
        assert logits.dtype == AUTOCAST_DTYPES[precision]  # the forward ran under autocast
        loss = engine.module.loss(logits, mask)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    for m, (mean, var) in zip(norms, initial, strict=True):
        assert m.running_mean.dtype == m.running_var.dtype == torch.float32
        assert not torch.equal(m.running_mean, mean) and not torch.equal(m.running_var, var)
        assert m.num_batches_tracked == 6
    # frozen matmul weights are stored in the compute dtype, everything else stays fp32
    in_matmul = {id(p) for p in frozen_matmul_parameters(engine.module)}
    assert in_matmul and all(not p.requires_grad for p in engine.module.parameters() if id(p) in in_matmul)
    for p in engine.module.parameters():
        assert p.dtype == (AUTOCAST_DTYPES[precision] if id(p) in in_matmul else torch.float32)
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in engine.module.modules())  # one rank: plain BN
    # the working weights are the fp32 master weights (the export writes the former)
    assert all(torch.equal(p, safe_get_full_fp32_param(p)) for p in engine.module.parameters() if p.requires_grad)
    moments = [v for state in engine.optimizer.optimizer.state.values() for k, v in state.items() if k != "step"]
    assert moments and all(v.dtype == torch.float32 for v in moments)
    scaler = engine.optimizer.torch_autocast_gradscaler  # fp16 scales the loss, as the released code's GradScaler
    assert (scaler is not None and scaler.get_scale() <= 2**16) if precision == "fp16" else scaler is None


def test_sync_batchnorm_conversion_keeps_eval_outputs() -> None:
    torch.manual_seed(0)
    model = build_model(preset("tiny-detris").model, pretrained=False)  # 2-D (vision, head) and 1-D (text) norms
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    with torch.no_grad():  # statistics and affine parameters other than their init
        for m in norms:
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.normal_()
            m.bias.normal_()
    model.eval()
    images, tokens = torch.randn(2, 3, 112, 112), torch.randint(1, 400, (2, 17))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = model(images, tokens)
    assert convert_sync_batchnorm(model) == len(norms) > 0
    assert all(type(m) is torch.nn.SyncBatchNorm for m in model.modules() if isinstance(m, _BatchNorm))
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(images, tokens), expected)
    assert use_sync_batchnorm(2, torch.device("cuda", 0)) and not use_sync_batchnorm(1, torch.device("cuda", 0))
    assert not use_sync_batchnorm(2, torch.device("cpu"))  # torch's SyncBatchNorm has no CPU kernels


def test_evaluate_equals_the_per_sample_numpy_path(shards: Path) -> None:
    torch.manual_seed(0)
    model = build_model(preset("tiny-dcris").model, pretrained=False).eval()
    with torch.no_grad():  # a logit scale that puts the 0.35 threshold inside the predictions
        model.head.proj.txt.weight.mul_(30)
    batch_size = 3  # partial last batches
    got = evaluate(model, str(shards), ["val"], image_size=112, batch_size=batch_size, loader="torch", workers=0)["val"]
    preds, masks = [], []
    with torch.no_grad():  # the same forward passes, scored one sample at a time in numpy
        for batch in build_loader(shards, "val", train=False, batch_size=batch_size, image_size=112, loader="torch"):
            logits = model(batch["image"], batch["tokens"])
            preds += eval_reference.predictions(logits, [tuple(s) for s in batch["orig_size"].tolist()], 112)
            masks += batch["orig_mask"]
    sums = eval_reference.sums(preds, masks)
    sentences = json.loads((shards / "manifest.json").read_text())["splits"]["val"]["sentences"]
    assert got["count"] == sums["count"] == sentences
    ious = [np.logical_and(p, m).sum() / np.logical_or(p, m).sum() for p, m in zip(preds, masks, strict=True)]
    assert 0.0 < min(ious) < max(ious) < 1.0  # the predictions are neither empty nor everything
    for name, value in eval_reference.metrics(sums).items():
        assert abs(got[name] - value) <= 1e-8, name


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
        load_file(str(tmp_path / "full" / "export" / "model.safetensors")),
        load_file(str(tmp_path / "cut" / "export" / "model.safetensors")),
    )
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_overfit_one_batch_to_high_iou(shards: Path) -> None:

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
    path = save_export(model.state_dict(), cfg, tmp_path / "m")
    images, tokens = torch.randn(2, 3, 112, 112), torch.randint(1, 400, (2, 17))
    with torch.no_grad():
        expected = model.eval()(images, tokens)
        got = load_exported(path).eval()(images, tokens)
    assert torch.equal(expected, got)
    # trainable + randomly initialised backbone tensors only; a named backbone would not be stored
    assert set(load_file(str(path / "model.safetensors"))) <= set(model.state_dict())


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
    zero3 = ["train", "--deepspeed", str(REPO / "ds_configs" / "zero3.json"), "--preset", "tiny-dcris", run]
    _one_error_line(capsys, [*zero3, f"data.shards={shards}", "train.precision=fp16"], "fp16 needs ZeRO stage 0-2")
    _one_error_line(capsys, ["train", "--preset", "tiny-dcris", "train.eval_batch_size=0", run], "eval_batch_size")
    _one_error_line(capsys, ["train", "--preset", "tiny-dcris", f"data.shards={shards}", "train.eval_splits=nope", run],
                    "split 'nope'")  # fmt: skip
    _one_error_line(
        capsys, ["eval", "--weights", str(tmp_path / "none.safetensors"), "--shards", str(shards)], "weights"
    )
    _one_error_line(capsys, ["eval", "--weights", "w", "--shards", str(shards), "--batch-size", "0"], "--batch-size")


def test_bad_predict_inputs(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cfg = preset("tiny-dcris")
    weights = save_export(build_model(cfg.model, pretrained=False).state_dict(), cfg, tmp_path / "m")
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


def test_recipes_resolve_to_their_preset_with_their_own_entries() -> None:
    """Each recipe is its named preset with exactly the entries the file lists (read here with plain YAML and
    set field by field), writing to runs/<recipe name>; the DCRIS ones read the shards of their data set."""
    import dataclasses

    import yaml

    def set_entries(node, values: dict) -> None:
        for key, value in values.items():
            assert hasattr(node, key), key
            if isinstance(value, dict):
                set_entries(getattr(node, key), value)
            else:
                setattr(node, key, value)

    recipes = sorted((REPO / "configs").glob("*.yaml"))
    assert len(recipes) >= 10
    for path in recipes:
        entries = yaml.safe_load(path.read_text())
        want = preset(entries.pop("preset"))
        set_entries(want, entries)
        got = load_config(str(path))
        for section in ("model", "data", "train"):
            assert dataclasses.asdict(getattr(got, section)) == dataclasses.asdict(getattr(want, section)), (
                path.name, section)
        assert got.train.output_dir == f"runs/{path.stem}", path.name
        if path.stem.startswith("dcris-"):
            dataset = path.stem.split("_", 1)[1].split("_")[0]
            assert Path(got.data.shards).name == {"mixed": "mix"}.get(dataset, dataset), path.name


def test_installed_console_script_answers_help_and_unknown_commands() -> None:
    """The ``dcris`` script pip installed beside this Python: --help lists the commands; an unknown command is
    one line on stderr and exit status 2."""
    script = Path(sys.executable).parent / "dcris"
    assert script.is_file(), f"no console script at {script}: pip install -e ."
    shown = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and all(f"  {name} " in shown.stdout for name in ("train", "eval", "predict", "serve"))
    wrong = subprocess.run([str(script), "trian"], capture_output=True, text=True, timeout=120)
    assert wrong.returncode == 2 and wrong.stdout == ""
    assert wrong.stderr.count("\n") == 1 and "unknown command 'trian'" in wrong.stderr, wrong.stderr
