"""SPEC 5 metrics against hand-computed values, the inverse letterbox, and the exact cross-rank reduction."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dcris.data.letterbox import letterbox_geometry, letterbox_mask, unletterbox
from dcris.metrics import IOU_SCALE, IoUAccumulator, masks_from_logits


def _mask(rows: list[str]) -> np.ndarray:
    return np.array([[c == "#" for c in r] for r in rows])


def test_hand_computed_iou_oiou_and_precision() -> None:
    acc = IoUAccumulator()
    # I = 2, U = 4 -> IoU 0.5 (not counted by Pr@0.5: IoU must exceed the threshold)
    assert acc.add(_mask(["##..", "#..."]), _mask(["##..", "...#"])) == 0.5
    # I = 3, U = 4 -> 0.75
    assert acc.add(_mask(["###.", "...."]), _mask(["###.", "#..."])) == 0.75
    # I = 0, U = 2 -> 0
    assert acc.add(_mask(["#...", "...."]), _mask(["....", "...#"])) == 0.0
    # empty prediction vs empty mask: IoU 0 by convention (the released code divides by union + 1e-6)
    assert acc.add(_mask(["....", "...."]), _mask(["....", "...."])) == 0.0
    res = acc.result()
    assert res["count"] == 4
    assert res["miou"] == pytest.approx((0.5 + 0.75) / 4, abs=1e-12)
    assert res["oiou"] == pytest.approx((2 + 3) / (4 + 4 + 2), abs=1e-12)
    assert res["prec@0.5"] == 0.25 and res["prec@0.6"] == 0.25 and res["prec@0.7"] == 0.25
    assert res["prec@0.8"] == 0.0 and res["prec@0.9"] == 0.0


def test_random_masks_match_numpy() -> None:
    rng = np.random.default_rng(0)
    acc = IoUAccumulator()
    ious, inter, union = [], 0, 0
    for _ in range(20):
        h, w = rng.integers(5, 40, size=2)
        pred, mask = rng.random((h, w)) < 0.4, rng.random((h, w)) < 0.4
        i, u = np.logical_and(pred, mask).sum(), np.logical_or(pred, mask).sum()
        ious.append(i / u)
        inter, union = inter + i, union + u
        acc.add(pred, mask)
    res = acc.result()
    assert res["miou"] == pytest.approx(np.mean(ious), abs=1e-9)
    assert res["oiou"] == pytest.approx(inter / union, abs=1e-12)
    for t in (0.5, 0.6, 0.7, 0.8, 0.9):
        assert res[f"prec@{t}"] == np.mean(np.array(ious) > t)


@pytest.mark.parametrize(("height", "width"), [(30, 60), (61, 23), (50, 50)])
def test_inverse_letterbox_maps_canvas_prediction_back(height: int, width: int) -> None:
    size = 112
    # 1 exactly on the letterboxed image, 0 on the border: the inverse must crop exactly the image
    _, new_h, new_w, top, left = letterbox_geometry(height, width, size)
    canvas = torch.zeros(size, size)
    canvas[top : top + new_h, left : left + new_w] = 1.0
    back = unletterbox(canvas, height, width)
    assert back.shape == (height, width)
    torch.testing.assert_close(back, torch.ones(height, width), atol=1e-5, rtol=0)
    # a known object: a rectangle in the original image, letterboxed, predicted at the model's 4 x S/14, mapped back
    orig = np.zeros((height, width), dtype=np.uint8)
    orig[height // 4 : 3 * height // 4, width // 5 : 4 * width // 5] = 1
    soft = torch.from_numpy(letterbox_mask(orig, size))[None, None]  # (1, 1, S, S)
    logits_size = 4 * size // 14  # 32 for a 112 canvas, as the model's 128 for 448
    small = torch.nn.functional.interpolate(soft, size=logits_size, mode="area").clamp(1e-4, 1 - 1e-4)
    (pred,) = masks_from_logits(torch.logit(small), [(height, width)], size)
    pred = pred.numpy()
    # threshold 0.35 on a coarse map grows the object a little, but it stays centred on the original
    assert IoUAccumulator().add(pred, orig) > 0.8
    assert (pred & (orig > 0)).sum() > 0.97 * orig.sum()
    for axis in (0, 1):
        assert abs(np.nonzero(pred)[axis].mean() - np.nonzero(orig)[axis].mean()) < 1.0


def _reduce_worker(rank: int, world: int, port: int, preds: list, masks: list, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    acc = IoUAccumulator()
    for p, m in list(zip(preds, masks, strict=True))[rank::world]:
        acc.add(p, m)
    acc.all_reduce()
    out[rank] = acc.result()
    dist.destroy_process_group()


def test_all_reduce_is_exact() -> None:
    rng = np.random.default_rng(1)
    preds = [rng.random((17, 13)) < 0.5 for _ in range(9)]
    masks = [rng.random((17, 13)) < 0.5 for _ in range(9)]
    single = IoUAccumulator()
    for p, m in zip(preds, masks, strict=True):
        single.add(p, m)
    from dcris.train_setup import _free_port

    out = mp.Manager().dict()
    mp.spawn(_reduce_worker, args=(2, _free_port(), preds, masks, out), nprocs=2)
    assert out[0] == out[1] == single.result()  # bit-identical, whatever the split and order
    assert single.iou_sum % 1 == 0 and single.iou_sum <= single.count * IOU_SCALE
