"""SPEC 5 metrics against hand-computed values and the released code's OpenCV inverse warp, exact reduction."""

from __future__ import annotations

import os
import warnings

import cv2
import eval_reference
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image
from released_geometry import (
    natural_image,
    object_mask,
    released_image,
    released_mask,
    released_matrices,
    released_prediction,
)

from dcris.config import preset
from dcris.data.letterbox import letterbox_mask, unletterbox
from dcris.metrics import (
    IOU_SCALE,
    GresAccumulator,
    IoUAccumulator,
    format_table,
    masks_from_logits,
    padded_probabilities,
)


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
    # a known object: a rectangle in the original image, letterboxed, predicted at the model's 4 x S/14, mapped back
    orig = np.zeros((height, width), dtype=np.uint8)
    orig[height // 4 : 3 * height // 4, width // 5 : 4 * width // 5] = 1
    soft = torch.from_numpy(letterbox_mask(orig, size))[None, None]  # (1, 1, S, S)
    logits_size = 4 * size // 14  # 32 for a 112 canvas, as the model's 128 for 448
    small = F.interpolate(soft, size=logits_size, mode="area").clamp(1e-4, 1 - 1e-4)
    (pred,) = masks_from_logits(torch.logit(small), [(height, width)], size)
    assert pred.shape == (height, width) and pred.dtype == torch.bool
    pred = pred.numpy()
    # threshold 0.35 on a coarse map grows the object a little, but it stays centred on the original
    assert IoUAccumulator().add(pred, orig) > 0.8
    assert (pred & (orig > 0)).sum() > 0.97 * orig.sum()
    for axis in (0, 1):
        assert abs(np.nonzero(pred)[axis].mean() - np.nonzero(orig)[axis].mean()) < 1.0


def _object_logits(rng: np.random.Generator, masks: list[np.ndarray], size: int) -> torch.Tensor:
    """(B, 1, 4S/14, 4S/14) logits of a plausible prediction of each mask: letterboxed, pooled, noisy."""
    rows = []
    for mask in masks:
        soft = torch.from_numpy(released_mask(mask, size)).float()[None, None]  # (1, 1, S, S)
        prob = F.interpolate(soft, size=4 * size // 14, mode="area")
        rows.append(8 * (prob - 0.5) + torch.from_numpy(rng.normal(0, 0.3, prob.shape)).float())
    return torch.cat(rows)  # (B, 1, 4S/14, 4S/14)


SIZES = [(480, 640), (640, 427), (333, 501), (150, 97), (97, 1000), (7, 5)]


def test_inverse_warp_matches_the_released_code() -> None:
    rng = np.random.default_rng(0)
    size = 448
    logits = _object_logits(rng, [object_mask(rng, h, w) for h, w in SIZES], size)
    # the released evaluation: sigmoid, bicubic (align_corners) to S, cv2.warpAffine(mat_inv), > 0.35
    prob = F.interpolate(torch.sigmoid(logits), size=(size, size), mode="bicubic", align_corners=True)[:, 0].numpy()
    ours = masks_from_logits(logits, SIZES, size)
    differing = total = 0
    for i, (h, w) in enumerate(SIZES):
        _, mat_inv = released_matrices(h, w, size)
        warped = cv2.warpAffine(prob[i], mat_inv, (w, h), flags=cv2.INTER_CUBIC, borderValue=0.0)
        # the unthresholded maps agree to float rounding (OpenCV 4 samples at 1/32 pixel, and so do we)
        np.testing.assert_allclose(unletterbox(torch.from_numpy(prob[i]), h, w).numpy(), warped, rtol=0, atol=2e-6)
        released = released_prediction(prob[i], h, w)
        assert ours[i].shape == released.shape and released.any() and not released.all()
        differing += int((ours[i].numpy() != released).sum())
        total += released.size
    print(f"inverse warp vs OpenCV: {differing} of {total} thresholded pixels differ")
    assert differing <= 1e-5 * total


def _varied_batch(rng: np.random.Generator, sizes: list[tuple[int, int]], size: int) -> tuple[torch.Tensor, list]:
    """Logits and masks of a batch: predictions of these objects, but of other objects for the first two (IoUs
    spread over [0, 1]), plus noise everywhere (every logit non-zero)."""
    masks = [object_mask(rng, h, w) for h, w in sizes]
    logits = _object_logits(rng, [object_mask(rng, h, w) for h, w in sizes[:2]] + masks[2:], size)
    return logits, masks


def test_batched_path_equals_the_per_sample_numpy_path() -> None:
    rng = np.random.default_rng(3)
    size = 112
    acc = IoUAccumulator()
    preds, masks, ious = [], [], []
    # tall, wide, tiny and COCO-sized images in one batch, and batches of other shapes
    batches = [[(480, 640), (640, 427), (1, 1), (3, 200), (333, 17), (112, 112)]]
    batches += [[(int(h), int(w)) for h, w in rng.integers(20, 160, size=(5, 2))] for _ in range(2)]
    for sizes in batches:
        logits, batch_masks = _varied_batch(rng, sizes, size)
        expected = eval_reference.predictions(logits, sizes, size)
        # the unthresholded maps too: bit for bit inside each image, exactly 0 past it
        padded = padded_probabilities(logits, torch.tensor(sizes), size)
        assert padded.shape == (len(sizes), *np.max(sizes, axis=0))
        for i, (h, w) in enumerate(sizes):
            prob = padded[i, :h, :w].numpy()
            canvas = F.interpolate(torch.sigmoid(logits[i : i + 1]), size=size, mode="bicubic", align_corners=True)
            np.testing.assert_array_equal(prob, eval_reference.unletterbox(canvas[0, 0].numpy(), h, w))
            assert not padded[i, h:].any() and not padded[i, :, w:].any()
        ious.append(acc.add_logits(logits, batch_masks, torch.tensor(sizes), size))
        preds += expected
        masks += batch_masks
    sums = eval_reference.sums(preds, masks)
    assert acc.totals() == sums
    got, want = acc.result(), eval_reference.metrics(sums)
    assert got["count"] == sums["count"] == 16
    for name, value in want.items():
        assert abs(got[name] - value) <= 1e-8, name
    per_sample = [np.logical_and(p, m).sum() / np.logical_or(p, m).sum() for p, m in zip(preds, masks, strict=True)]
    assert torch.cat(ious).tolist() == per_sample
    assert 0 < sums["prec_hits@0.9"] < sums["prec_hits@0.5"] < sums["count"]  # the data tests the thresholds


def test_a_mask_of_another_size_than_its_image_is_named() -> None:
    rng = np.random.default_rng(4)
    logits, masks = _varied_batch(rng, [(30, 40), (50, 20)], 112)
    with pytest.raises(ValueError, match=r"mask 1 is \(20, 50\), its image is \(50, 20\)"):
        IoUAccumulator().add_logits(logits, [masks[0], masks[1].T], [(30, 40), (50, 20)], 112)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_add_logits_on_the_gpu_never_syncs() -> None:
    rng = np.random.default_rng(5)
    size = 448
    masks = [object_mask(rng, h, w) for h, w in SIZES]
    logits = _object_logits(rng, masks, size).cuda()
    IoUAccumulator().add_logits(logits, masks, SIZES, size)  # warm-up: the weight tables reach the device once
    acc = IoUAccumulator()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            acc.add_logits(logits, masks, SIZES, size)
            acc.add_logits(logits, masks, SIZES, size)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert not syncs, [str(w.message) for w in syncs]
    preds = [pred.cpu().numpy() for pred in masks_from_logits(logits, SIZES, size)]
    assert acc.totals() == eval_reference.sums(preds + preds, masks + masks)
    # the GPU's bicubic upsampling rounds a little differently from the CPU's: at most a few pixels flip
    on_cpu = eval_reference.predictions(logits.cpu(), SIZES, size)
    differing = sum(int((pred != cpu).sum()) for pred, cpu in zip(preds, on_cpu, strict=True))
    assert differing <= 1e-5 * sum(h * w for h, w in SIZES)


class _ImageLogits(torch.nn.Module):
    """A stand-in model whose logits follow the image (pooled red channel), to follow predict's geometry."""

    def __init__(self) -> None:
        super().__init__()
        self.cfg = preset("tiny-dcris").model
        self.gain = torch.nn.Parameter(torch.tensor(3.0))

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        size = 4 * images.shape[-1] // 14
        return self.gain * F.interpolate(images[:, :1], size=(size, size), mode="area")  # (B, 1, 4S/14, 4S/14)


def test_segmenter_mask_matches_the_released_pipeline() -> None:
    from dcris.segmenter import Segmenter  # here: the spawned workers above import this module, and it is slow

    rng = np.random.default_rng(6)
    model = _ImageLogits()
    size = model.cfg.image_size
    differing = total = 0
    for h, w in [(240, 320), (301, 97), (40, 60)]:
        rgb = natural_image(rng, h, w)
        ours = Segmenter(model)(Image.fromarray(rgb), "the thing on the left").mask
        with torch.no_grad():
            logits = model(torch.from_numpy(released_image(rgb, size))[None], torch.zeros(1, 17, dtype=torch.long))
        prob = F.interpolate(torch.sigmoid(logits), size=(size, size), mode="bicubic", align_corners=True)
        released = released_prediction(prob[0, 0].numpy(), h, w)
        assert ours.shape == (h, w) and released.any() and not released.all()
        differing += int((ours != released).sum())
        total += released.size
    print(f"predict vs the released pipeline: {differing} of {total} pixels differ")
    assert differing <= 1e-3 * total  # the input canvases differ only by OpenCV's fixed-point rounding


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
    from ports import free_port

    out = mp.Manager().dict()
    mp.spawn(_reduce_worker, args=(2, free_port(), preds, masks, out), nprocs=2)
    assert out[0] == out[1] == single.result()  # bit-identical, whatever the split and order
    ious = [np.logical_and(p, m).sum() / np.logical_or(p, m).sum() for p, m in zip(preds, masks, strict=True)]
    assert single.totals()["iou_sum"] == sum(round(iou * IOU_SCALE) for iou in ious)


# ----------------------------------------------------------------------------------------------- gRefCOCO


def _counts(pred: np.ndarray, mask: np.ndarray) -> list[int]:
    return [int(np.logical_and(pred, mask).sum()), int(np.logical_or(pred, mask).sum())]


def test_gres_four_cases_by_hand() -> None:
    painted = _mask(["####", "##.."])  # 6 pixels
    truth = _mask(["..##", "..##"])  # 4 pixels: I = 2, U = 8 with ``painted``
    empty = np.zeros_like(truth)
    cases = {  # (truth, said nothing) -> (IoU, I added, U added)
        "TP": (empty, True, 1.0, 0, 0),  # the painted pixels do not count: the model said nothing is there
        "FN": (empty, False, 0.0, 0, 6),  # the predicted area
        "FP": (truth, True, 0.0, 0, 8),  # I forced to 0, U as computed from the painted mask
        "TN": (truth, False, 2 / 8, 2, 8),
    }
    for name, (target, said_empty, iou, inter, union) in cases.items():
        acc = GresAccumulator()
        assert acc.add([_counts(painted, target)], [not target.any()], [said_empty]).tolist() == [iou], name
        sums = acc.totals()
        assert (sums["intersection"], sums["union"], sums["count"]) == (inter, union, 1), name
        outcomes = ("tp", "fn", "fp", "tn")
        assert tuple(sums[k] for k in outcomes) == tuple(int(name == k.upper()) for k in outcomes), name
    acc = GresAccumulator()
    for target, said_empty, *_ in cases.values():
        acc.add([_counts(painted, target)], [not target.any()], [said_empty])
    res = acc.result()
    assert res["giou"] == (1 + 0 + 0 + 0.25) / 4 and res["ciou"] == 2 / (6 + 8 + 8)
    assert res["n_acc"] == 1 / 2 and res["t_acc"] == 1 / 2  # TP / (TP + FN), TN / (TN + FP): no + 1
    assert res["prec@0.7"] == 0 and res["count"] == 4 and res["no_target"] == 2
    # Pr@ counts target samples only, IoU >= t: one exact 0.7 hit out of two target samples
    acc.add([[7, 10]], [False], [False])
    assert acc.result()["prec@0.7"] == 1 / 3 and acc.result()["prec@0.8"] == 0


@pytest.mark.parametrize("with_head", [True, False])
def test_gres_mixed_set_matches_the_official_formulas(with_head: bool) -> None:
    rng = np.random.default_rng(11 + with_head)
    size = 56
    acc = GresAccumulator()
    preds, truths, pred_nt, gt_nt = [], [], [], []
    for _ in range(3):
        sizes = [(int(h), int(w)) for h, w in rng.integers(20, 90, size=(6, 2))]
        truth = [object_mask(rng, h, w) for h, w in sizes]
        num_targets = torch.tensor(rng.integers(0, 3, size=6))
        num_targets[:3] = torch.tensor([0, 2, 0])  # both kinds in every batch
        num_targets[4] = 1
        truth = [t * bool(n) for t, n in zip(truth, num_targets.tolist(), strict=True)]
        inner = truth[4] & np.roll(truth[4], 4, 0) & np.roll(truth[4], -4, 0) & np.roll(truth[4], 4, 1)
        inner &= np.roll(truth[4], -4, 1)  # painted strictly inside the truth: I = painted area, U = truth area
        painted = [object_mask(rng, h, w) for h, w in sizes[:3]] + [truth[3], inner, truth[5]]
        logits = _object_logits(rng, painted, size)
        logits[5] = -8.0 - torch.rand_like(logits[5])  # an empty painted mask
        signs = torch.tensor([1.0, 1.0, -1.0, rng.choice([-1, 1]), -1.0, rng.choice([-1, 1])])  # TP, FP, FN, TN
        nt_logits = signs * torch.from_numpy(rng.uniform(0.1, 3, size=6)).float() if with_head else None
        acc.add_logits(logits, truth, sizes, size, num_targets, nt_logits)
        painted = [m.numpy() for m in masks_from_logits(logits, sizes, size)]
        preds += painted
        truths += truth
        gt_nt += (num_targets == 0).tolist()
        pred_nt += (torch.sigmoid(nt_logits) > 0.5).tolist() if with_head else [not p.any() for p in painted]
    expected = eval_reference.rela_gres(preds, truths, pred_nt, gt_nt)
    got = acc.result()
    assert {k: got[k] for k in expected} == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert got["count"] == len(preds) and got["no_target"] == sum(gt_nt)
    sums = acc.totals()
    assert min(sums["tp"], sums["fn"], sums["tn"]) > 0 and (sums["fp"] > 0 or not with_head)  # every case is there
    table = format_table({"val": acc.result(), "refcoco-val": IoUAccumulator().result()})
    assert "giou" in table and "n_acc" in table and "miou" in table
