"""Pictures a person can read: tinted masks, truth outlines, contact sheets of the best to the worst pairs."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dcris.cli import main as cli_main
from dcris.draw import PALETTE, TRUTH_COLOUR, Tile, colour, contact_sheet, draw_tile, outline, overlay
from dcris.evaluate import evaluate
from dcris.metrics import IoUAccumulator
from dcris.pictures import IoURecorder, contact_sheets, read_samples, spread

REPO = Path(__file__).resolve().parents[1]


def test_overlay_tints_each_mask_in_its_own_colour():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)
    first, second = rng.random((6, 7)) > 0.5, rng.random((6, 7)) > 0.5
    got = np.asarray(overlay(Image.fromarray(pixels), [first, second])).astype(np.float64)
    p = pixels.astype(np.float64)
    once = np.where(first[..., None], 0.5 * p + 0.5 * np.array(PALETTE[0]), p)
    expected = np.where(second[..., None], 0.5 * once + 0.5 * np.array(PALETTE[1]), once)  # later over earlier
    assert np.abs(got - expected).max() <= 0.5  # the picture is the formula, rounded
    assert len(set(PALETTE)) == len(PALETTE) and colour(len(PALETTE)) == colour(0)


def test_outline_is_a_ring_of_the_given_width():
    mask = np.zeros((20, 30), dtype=bool)
    mask[4:15, 6:25] = True  # 11 x 19 rectangle
    ring = outline(mask, width=2)
    inner = np.zeros_like(mask)
    inner[6:13, 8:23] = True
    np.testing.assert_array_equal(ring, mask & ~inner)
    edge = np.zeros((5, 5), dtype=bool)
    edge[:, :3] = True  # touches the image border: the border side is outlined too
    np.testing.assert_array_equal(outline(edge, width=1)[:, 0], np.ones(5, dtype=bool))
    assert not outline(np.zeros((4, 4), dtype=bool)).any()


def test_spread_keeps_the_best_and_the_worst():
    assert spread(10, 4) == [0, 3, 6, 9]
    assert spread(3, 5) == [0, 1, 2]  # fewer pairs than wanted: each once
    assert spread(7, 1) == [0] and spread(0, 4) == []
    positions = spread(1000, 12)
    assert positions[0] == 0 and positions[-1] == 999 and len(positions) == 12


def test_tile_shows_truth_outline_prediction_and_caption():
    image = Image.fromarray(np.full((50, 100, 3), 128, dtype=np.uint8))
    truth = np.zeros((50, 100), dtype=bool)
    truth[10:40, 20:60] = True
    prediction = np.zeros_like(truth)
    prediction[10:40, 50:90] = True
    tile = draw_tile(Tile(image, truth, prediction, "the grey box", "IoU 0.20", "best of 3"))
    pixels = np.asarray(tile)
    assert tile.width == 256 and tile.height > 256  # caption area under the image
    picture = pixels[:128]  # 100 x 50 scaled to 256 x 128, top aligned at (256 - 128) / 2 = 64
    assert (picture == TRUTH_COLOUR).all(axis=-1).any()
    tint = np.round(0.5 * 128 + 0.5 * np.array(PALETTE[0]))
    assert (np.abs(pixels.astype(int) - tint).max(axis=-1) <= 1).sum() > 1000  # the filled prediction
    assert (pixels[256:] < 100).all(axis=-1).any()  # dark caption text below the picture
    with pytest.raises(ValueError, match="at least one"):
        contact_sheet([], "empty")


def test_recorder_ranks_every_pair_and_the_sheet_draws_best_to_worst(tiny_segmenter, shards, tmp_path):
    model = tiny_segmenter.model
    recorder = IoURecorder()
    results = evaluate(model, str(shards), ["val"], image_size=112, batch_size=8, loader="torch", on_batch=recorder)
    ranked = recorder.ranked("val")
    assert len(ranked) == results["val"]["count"] > 3
    assert [r[0] for r in ranked] == sorted((r[0] for r in ranked), reverse=True)
    assert np.mean([r[0] for r in ranked]) == pytest.approx(results["val"]["miou"], abs=1e-9)
    assert len({(r[1], r[2]) for r in ranked}) == len(ranked)  # every (object, sentence) once

    chosen = [ranked[0], ranked[-1]]
    samples = read_samples(shards, "val", {r[1] for r in chosen})
    for iou, ref_id, sent_idx in chosen:
        # the Segmenter path re-predicts the pair at the original size; the loader's letterbox gives the same IoU
        sample = samples[ref_id]
        result = tiny_segmenter(sample["image"], sample["sentences"][sent_idx])
        assert IoUAccumulator().add(result.mask, sample["mask"]) == pytest.approx(iou, abs=0.02)

    sheets = contact_sheets(model, recorder, shards, ["val"], 3)
    assert list(sheets) == ["val"]
    sheet = np.asarray(sheets["val"])
    assert sheet.shape[1] == 3 * (256 + 8) + 8  # three tiles in one row
    assert (sheet == TRUTH_COLOUR).all(axis=-1).sum() > 50  # ground-truth outlines


def test_eval_command_writes_a_contact_sheet(tiny_segmenter, shards, tmp_path, capsys):
    weights = tiny_segmenter.save_pretrained(tmp_path / "export")
    argv = ["eval", "--weights", str(weights), "--shards", str(shards), "--splits", "val,testA", "--loader", "torch",
            "--workers", "1", "--pictures", "4", "--out", str(tmp_path / "out" / "metrics.json")]  # fmt: skip
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    for split in ("val", "testA"):
        path = tmp_path / "out" / f"contact_sheet_{split}.png"
        assert f"wrote {path}" in printed
        with Image.open(path) as sheet:
            assert sheet.width == 4 * (256 + 8) + 8


def test_training_evaluation_logs_a_contact_sheet_to_tensorboard(shards, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dcris.trainer import main as train_main

    argv = ["--preset", "tiny-dcris", f"data.shards={shards}", f"train.output_dir={tmp_path / 'run'}",
            "data.loader=torch", "data.workers=1", "train.micro_batch=4", "train.global_batch=4", "train.max_steps=1",
            "train.eval_pictures=2"]  # fmt: skip
    torch.manual_seed(0)
    assert train_main(argv) == 0
    events = EventAccumulator(str(next((tmp_path / "run" / "tensorboard").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert "eval/val/pictures" in events.Tags()["images"]
    (image,) = events.Images("eval/val/pictures")
    assert image.step == 1 and image.width == 2 * (256 + 8) + 8


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_contact_sheet_of_a_training_bf16_cuda_model(tiny_segmenter, shards):
    """As during training: a bf16 module on the GPU in train mode, evaluated, drawn, and left in train mode."""
    model = copy.deepcopy(tiny_segmenter.model).cuda().to(torch.bfloat16).train()
    recorder = IoURecorder()
    evaluate(model, str(shards), ["val"], image_size=112, batch_size=8, loader="torch", device="cuda",
             dtype=torch.bfloat16, on_batch=recorder)  # fmt: skip
    assert model.training
    sheet = contact_sheets(model, recorder, shards, ["val"], 3)["val"]
    assert model.training and sheet.width == 3 * (256 + 8) + 8


def test_verdicts_say_what_happened_to_each_kind_of_phrase():
    """A no-target phrase is judged by the decision, a target phrase by the drawn IoU (hand-counted masks)."""
    from dcris.pictures import verdict
    from dcris.segmenter import Segmentation

    truth = np.zeros((10, 20), dtype=bool)
    truth[2:6, 3:8] = True  # 20 pixels
    painted = np.zeros_like(truth)
    painted[2:6, 5:10] = True  # 20 pixels, 12 of them inside the truth: IoU 12 / 28

    def result(mask: np.ndarray, found: bool) -> Segmentation:
        return Segmentation("a phrase", mask, mask.astype(np.float32), 1.0, 0.0, None, float(found), found)

    empty = np.zeros_like(truth)
    assert verdict(result(empty, False), empty, 0, True) == "nothing there: right"
    assert verdict(result(painted, True), empty, 0, True) == "painted 10% of the image: wrong"  # 20 of 200 pixels
    assert verdict(result(empty, True), empty, 0, True) == "painted 0% of the image: wrong"  # said "there", drew none
    assert verdict(result(painted, True), truth, 1, True) == "IoU 0.43"
    assert verdict(result(painted, True), truth, 3, True) == "IoU 0.43, names 3 objects"
    assert verdict(result(empty, False), truth, 2, True) == "IoU 0.00, names 2 objects, said nothing there"
    assert verdict(result(painted, True), truth, 1, False) == "IoU 0.43"  # RefCOCO: the IoU alone
