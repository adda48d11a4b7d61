"""``dcris demo`` is reproducible on a CPU: two runs on one machine give identical weights and metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]


def test_two_demo_runs_are_identical(tmp_path: Path) -> None:
    # a small demo, run twice at once in separate processes with different string-hash seeds
    argv = ["--images", "40", "train.max_steps=12", "train.lr=0.005", "train.log_every_steps=1"]
    runs = []
    for name, hash_seed in (("a", "1"), ("b", "2")):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed, PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")  # CPU
        cmd = [sys.executable, "-m", "dcris", "demo", "--out", str(tmp_path / name), *argv]
        runs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for proc in runs:
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-3000:]
    metrics = [json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("a", "b")]
    for m in metrics:
        m.pop("seconds")
    assert metrics[0] == metrics[1]
    logs = [(tmp_path / name / "run" / "train_log.jsonl").read_text().splitlines() for name in ("a", "b")]
    losses = [[json.loads(row)["loss"] for row in log] for log in logs]
    assert len(losses[0]) == 12 and losses[0] == losses[1]
    assert sum(losses[0][-4:]) / 4 < losses[0][0]  # it learned something
    weights = [load_file(str(tmp_path / name / "run" / "export" / "model.safetensors")) for name in ("a", "b")]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
