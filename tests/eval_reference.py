"""The per-sample evaluation of SPEC 5 in plain numpy, one image at a time: the reference of the batched path.

Each step is written from its definition, in the float width the library uses for it, so the thresholded
predictions must agree bit for bit: the letterbox corners in float32 and the matrices in float64
(``cv2.getAffineTransform``'s closed form for axis-aligned corners), OpenCV 4's inversion of the matrix,
its sampling positions in fixed point (1/1024, then 1/32 pixel), Keys' cubic weights (a = -0.75) rounded to
float32, and the two separable float32 passes of bicubic interpolation with border 0. Counting follows the
metric's definition: per-sample intersection and union, IoU as a Python division.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

THRESHOLD = 0.35
PREC = (0.5, 0.6, 0.7, 0.8, 0.9)
IOU_UNIT = 2**40


def _inverse_matrix(height: int, width: int, size: int) -> np.ndarray:
    """The released code's ``mat_inv``: canvas (x, y) -> original (x, y), from float32 corner points."""
    scale = min(size / height, size / width)
    new_w, new_h = width * scale, height * scale
    left, top = (size - new_w) / 2, (size - new_h) / 2
    src = np.array([[0, 0], [width, 0], [0, height]], np.float32).astype(np.float64)
    dst = np.array([[left, top], [new_w + left, top], [left, new_h + top]], np.float32).astype(np.float64)
    sx = (src[1, 0] - src[0, 0]) / (dst[1, 0] - dst[0, 0])
    sy = (src[2, 1] - src[0, 1]) / (dst[2, 1] - dst[0, 1])
    return np.array([[sx, 0.0, src[0, 0] - sx * dst[0, 0]], [0.0, sy, src[0, 1] - sy * dst[0, 1]]])


def _taps(scale: float, offset: float, out_len: int, in_len: int, rows: bool) -> tuple[np.ndarray, np.ndarray]:
    """(n, 4) source rows/columns and float32 weights of OpenCV 4's INTER_CUBIC along one axis."""
    i = np.arange(out_len, dtype=np.float64)
    if rows:  # OpenCV rounds the whole row coordinate at once ...
        fixed = np.round((i * scale + offset) * 1024).astype(np.int64) + 16
    else:  # ... and the column terms one by one
        fixed = np.round(i * scale * 1024).astype(np.int64) + (round(offset * 1024) + 16)
    fixed >>= 5
    t = (fixed & 31) / 32.0
    a = -0.75
    w0 = ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a
    w1 = ((a + 2) * t - (a + 3)) * t * t + 1
    w2 = ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1
    weights = np.stack([w0, w1, w2, 1 - w0 - w1 - w2], axis=-1).astype(np.float32)
    taps = (fixed >> 5)[:, None] + np.arange(-1, 3)
    weights[(taps < 0) | (taps >= in_len)] = 0
    return taps.clip(0, in_len - 1), weights


def _resample(src: np.ndarray, taps: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(H, W) -> (n, W): row i is the weighted sum of the rows ``taps[i]``, tap by tap in float32."""
    out = src[taps[:, 0]] * weights[:, 0, None]
    for k in range(1, 4):
        out += src[taps[:, k]] * weights[:, k, None]
    return out


def unletterbox(prob: np.ndarray, height: int, width: int) -> np.ndarray:
    """float32 (S, S) canvas probabilities -> float32 (h, w): ``cv2.warpAffine(prob, mat_inv, INTER_CUBIC)``."""
    m = _inverse_matrix(height, width, prob.shape[-1])
    det = 1.0 / (m[0, 0] * m[1, 1])  # OpenCV inverts the matrix it is given
    sx, sy = m[1, 1] * det, m[0, 0] * det
    tx, ty = -sx * m[0, 2], -sy * m[1, 2]
    taps_y, wy = _taps(sy, ty, height, prob.shape[0], rows=True)
    taps_x, wx = _taps(sx, tx, width, prob.shape[1], rows=False)
    rows = _resample(prob.astype(np.float32), taps_y, wy)  # (h, S)
    return _resample(np.ascontiguousarray(rows.T), taps_x, wx).T  # (h, w)


def predictions(logits: torch.Tensor, sizes: list[tuple[int, int]], image_size: int) -> list[np.ndarray]:
    """bool (h, w) prediction of each sample: sigmoid, bicubic (align_corners) to S, inverse warp, > 0.35."""
    canvas = F.interpolate(torch.sigmoid(logits.float()), size=image_size, mode="bicubic", align_corners=True)
    return [unletterbox(canvas[i, 0].numpy(), h, w) > THRESHOLD for i, (h, w) in enumerate(sizes)]


def sums(preds: list[np.ndarray], masks: list[np.ndarray]) -> dict[str, int]:
    """The accumulator's integer sums, sample by sample (IoU 0 for an empty union)."""
    out = dict(intersection=0, union=0, iou_sum=0, count=0, **{f"prec_hits@{t}": 0 for t in PREC})
    for pred, mask in zip(preds, masks, strict=True):
        inter = int(np.logical_and(pred, mask != 0).sum())
        union = int(np.logical_or(pred, mask != 0).sum())
        iou = inter / union if union else 0.0
        out["intersection"] += inter
        out["union"] += union
        out["iou_sum"] += round(iou * IOU_UNIT)
        out["count"] += 1
        for t in PREC:
            out[f"prec_hits@{t}"] += iou > t
    return out


def metrics(sums_: dict[str, int]) -> dict[str, float]:
    """mIoU, oIoU and Pr@t from the sums."""
    n = sums_["count"]
    out = {"miou": sums_["iou_sum"] / IOU_UNIT / n, "oiou": sums_["intersection"] / sums_["union"]}
    out.update({f"prec@{t}": sums_[f"prec_hits@{t}"] / n for t in PREC})
    return out


def rela_gres(preds: list, truths: list, pred_nt: list[bool], gt_nt: list[bool]) -> dict:
    """ReLA's evaluation loop (``ReferEvaluator.evaluate``) in plain numpy over (pred_mask, gt_mask, pred_nt, gt_nt)
    per sample (its accuracies without the + 1 of older forks)."""
    accum_i = accum_u = accum_iou = 0.0
    tp = tn = fp = fn = 0
    pr = {t: 0 for t in (0.7, 0.8, 0.9)}
    not_empty = 0
    for pred, gt, p_nt, g_nt in zip(preds, truths, pred_nt, gt_nt, strict=True):
        i, u = np.sum(np.logical_and(pred, gt)), np.sum(np.logical_or(pred, gt))
        if g_nt:
            if p_nt:
                tp += 1
                accum_iou += 1
            else:
                fn += 1
                accum_u += u
        else:
            if p_nt:
                fp += 1
                i = 0
            else:
                tn += 1
            this_iou = 0.0 if u == 0 else float(i) / float(u)
            accum_iou += this_iou
            accum_i += i
            accum_u += u
            not_empty += 1
            for t in pr:
                pr[t] += this_iou >= t
    out = dict(giou=accum_iou / len(preds), ciou=accum_i / accum_u, n_acc=tp / (tp + fn), t_acc=tn / (tn + fp))
    out.update({f"prec@{t}": c / not_empty for t, c in pr.items()})
    return out
