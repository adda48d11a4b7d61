"""launch/bench.py at tiny width on the CPU: the trainer's engine and loader, evaluation's loop, the record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dcris import benchmark


def test_matmul_peak_and_flop_counter_are_consistent():
    """The FLOP counter counts 2 n^3 for an n x n product; the measured peak is a positive rate."""
    import torch

    a = torch.randn(64, 64)
    assert benchmark.count_flops(lambda: a @ a) == 2 * 64**3
    assert benchmark.matmul_peak(torch.device("cpu"), torch.float32, size=128) > 0


@pytest.mark.parametrize("model_only", [False, True])
def test_bench_records_training_and_inference_at_tiny_width(tmp_path: Path, model_only: bool, monkeypatch):
    import dcris.evaluate

    passes = []  # evaluation is timed in one pass over the split
    real_evaluate = dcris.evaluate.evaluate
    monkeypatch.setattr(dcris.evaluate, "evaluate", lambda *a, **k: passes.append(1) or real_evaluate(*a, **k))
    out = tmp_path / "bench.json"
    argv = ["--preset", "tiny-dcris", "--batch", "4", "--steps", "3", "--warmup", "1", "--images", "12",
            "--precision", "fp32", "--out", str(out), "data.loader=torch", "data.workers=0"]  # fmt: skip
    # the model-only run also takes every speed switch that needs no GPU through the trainer's engine
    switches = ["model.vision.fused_qkv=true", "model.head.channels_last=true", "model.head.single_key_gate=true"]
    assert benchmark.main(argv + (["--model-only", *switches] if model_only else [])) == 0
    record = json.loads(out.read_text())
    for mode in ("train", "infer"):
        r = record[mode]
        assert r["images_per_s"] > 0 and r["step_ms_median"] > 0 and r["step_ms_iqr"] >= 0
        assert 0 < r["mfu"] < 1 and r["gflop_per_sample"] > 0 and r["peak_memory_gib"] > 0
    # the training step counts forward and backward: more work per sample than inference's forward
    assert record["train"]["gflop_per_sample"] > record["infer"]["gflop_per_sample"]
    assert record["env"]["torch"] and record["env"]["commit"]
    assert record["markdown"].startswith("| CPU") and record["markdown"].count("|") == 15
    assert record["config"]["model_only"] is model_only
    if not model_only:  # evaluation beside the model alone, in the same process
        infer = record["infer"]
        assert infer["model_only_images_per_s"] > 0
        ratio = infer["images_per_s"] / infer["model_only_images_per_s"]
        assert infer["evaluate_vs_model_only"] == pytest.approx(ratio)
    assert len(passes) == (0 if model_only else 1)


def test_variants_are_measured_in_one_process_a_row_each(tmp_path: Path):
    """--variants: one record per variant, each with its own overrides and ZeRO stage, the rows printed last."""
    out = tmp_path / "variants.json"
    argv = ["--preset", "tiny-dcris", "--batch", "2", "--steps", "1", "--warmup", "0", "--model-only", "--mode",
            "train", "--precision", "fp32", "--out", str(out), "--variants", "eager,single_key_gate,zero1"]  # fmt: skip
    assert benchmark.main(argv) == 0
    records = json.loads(out.read_text())["variants"]
    assert [r["config"]["label"] for r in records] == ["eager", "single_key_gate", "zero1"]
    assert [r["config"]["zero_stage"] for r in records] == [None, None, 1]
    assert records[1]["config"]["overrides"] == ["model.head.single_key_gate=true"]
    # the switch reached the model: the gate's softmax over one key is gone, so the step counts fewer FLOPs
    assert records[1]["train"]["gflop_per_sample"] < records[0]["train"]["gflop_per_sample"]
    assert all(r["markdown"].split(" | ")[4] == r["config"]["label"] for r in records)
    assert benchmark.VARIANTS["all"][0] == [o for name in ("fused", "compile", "fused_qkv", "channels_last",
                                                          "single_key_gate", "residual16")
                                            for o in benchmark.VARIANTS[name][0]]  # fmt: skip


def test_unknown_variants_are_one_line(capsys):
    with pytest.raises(SystemExit) as stop:
        benchmark.parse_args(["--variants", "eager,turbo"])
    assert stop.value.code == 2 and "unknown variant(s) turbo" in capsys.readouterr().err


def test_count_ops_records_one_training_step(tmp_path: Path):
    """--count-ops: the operators of one model-only training step, their sum and the casts among them."""
    out = tmp_path / "ops.json"
    argv = ["--preset", "tiny-dcris", "--batch", "2", "--count-ops", "--out", str(out), "--zero-stage", "1"]
    assert benchmark.main(argv) == 0
    record = json.loads(out.read_text())["train_step_operators"]
    counts = record["operators"]
    assert record["total"] == sum(counts.values()) and counts["aten.mm"] > 0 and counts["aten.convolution"] > 0
    assert record["casts"] == counts.get("aten._to_copy", 0) + counts.get("aten.copy_", 0) > 0
    assert list(counts.values()) == sorted(counts.values(), reverse=True)


def test_deepspeed_base_sets_only_the_zero_stage():
    base, stage1 = benchmark.deepspeed_base(), benchmark.deepspeed_base(1)
    assert base["zero_optimization"]["stage"] == 2 and stage1["zero_optimization"]["stage"] == 1
    assert {k: v for k, v in stage1["zero_optimization"].items() if k != "stage"} == {
        k: v for k, v in base["zero_optimization"].items() if k != "stage"
    }
