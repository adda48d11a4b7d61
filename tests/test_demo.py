"""``dcris demo`` is reproducible on a CPU: two runs on one machine give identical weights and metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
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
    _check_baselines_and_sheet(tmp_path / "a")


def _check_baselines_and_sheet(out: Path) -> None:
    """What the README promises of a demo's output: the three text-blind baselines per split, the whole-image one
    equal to its value by hand (each object's area over its image's, per sentence), and a val contact sheet of
    12 tiles, or every val pair when there are fewer (4 columns of 256 x 352 tiles with 8-pixel gaps under a
    48-pixel head: dcris/draw.py's layout)."""
    import pickle

    import numpy as np
    from PIL import Image
    from pycocotools import mask as mask_utils

    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["baselines"]) == {"val", "testA", "testB"}
    release = out / "release" / "synthetic"
    refs = pickle.loads((release / "refs(unc).p").read_bytes())
    coco = json.loads((release / "instances.json").read_text())
    images = {im["id"]: (im["height"], im["width"]) for im in coco["images"]}
    anns = {a["id"]: a for a in coco["annotations"]}
    manifest = json.loads((out / "shards" / "synthetic" / "manifest.json").read_text())
    for split in ("val", "testA", "testB"):
        scores = metrics["baselines"][split]
        assert set(scores) == {"whole_image", "centre_disc", "all_objects"}
        skipped = {s["ref_id"] for s in manifest["splits"][split]["skipped"]}
        ious, areas, pixels = [], 0, 0
        for ref in refs:
            if ref["split"] != split or ref["ref_id"] in skipped:
                continue
            h, w = images[ref["image_id"]]
            rle = mask_utils.merge(mask_utils.frPyObjects(anns[ref["ann_id"]]["segmentation"], h, w))
            area = int(mask_utils.decode(rle).sum())
            n = len(ref["sentences"])
            ious += [area / (h * w)] * n
            areas, pixels = areas + n * area, pixels + n * h * w
        whole = scores["whole_image"]
        assert whole["count"] == len(ious) == metrics[split]["count"]
        assert whole["miou"] == pytest.approx(float(np.mean(ious)), abs=1e-6)
        assert whole["oiou"] == pytest.approx(areas / pixels, rel=1e-9)
        assert 0 < scores["all_objects"]["miou"] <= 1 and 0 < scores["centre_disc"]["miou"] <= 1
    sheet = np.asarray(Image.open(out / "contact_sheet_val.png").convert("L"))
    tile_w, tile_h, gap, head = 256, 352, 8, 48
    columns, rows = (sheet.shape[1] - gap) / (tile_w + gap), (sheet.shape[0] - head) / (tile_h + gap)
    tiles = min(12, metrics["val"]["count"])
    assert (columns, rows) == (min(4, tiles), -(-tiles // 4)), sheet.shape
    drawn = sum(
        (sheet[head + r * (tile_h + gap) : head + r * (tile_h + gap) + tile_w,
               gap + c * (tile_w + gap) : gap + (c + 1) * (tile_w + gap) - gap] < 250).any()
        for r in range(int(rows)) for c in range(int(columns))
    )  # fmt: skip
    assert drawn == tiles
