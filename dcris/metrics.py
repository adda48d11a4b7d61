"""Evaluation metrics of SPEC 5: mIoU, oIoU and Pr@0.5..0.9 at the original image resolution.

Per (object, sentence): sigmoid -> bicubic upsample to the input size -> inverse letterbox to the original
h x w (the exact inverse affine of :mod:`dcris.data.letterbox`) -> threshold 0.35 -> IoU with the original mask.
The pixel work stays on the device of the logits: a batch costs one host sync (its per-sample intersection and
union counts). The accumulator keeps only integer sums (the IoU sum in fixed point, 2^-40 resolution), so
per-rank partial results all-reduce, in any order, to exactly the numbers one process would get.

Convention for an empty prediction against an empty mask (union 0): IoU 0, as in the released CRIS/DETRIS
evaluation (which divides by ``union + 1e-6``). REFER masks are never empty, so this only touches degenerate
inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dcris.data.letterbox import unletterbox

MASK_THRESHOLD = 0.35  # probability above which a pixel is foreground (released code)
PREC_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)  # Pr@t counts IoU > t
IOU_SCALE = 2**40  # fixed-point unit of the IoU sum: int64 holds 8 million samples exactly


def probabilities_from_logits(
    logits: torch.Tensor, sizes: list[tuple[int, int]], image_size: int
) -> list[torch.Tensor]:
    """Probability maps at the original resolution from model logits (SPEC 5 up to the threshold).

    Args:
        logits: (B, 1, 4 * S/14, 4 * S/14) mask logits of letterboxed S x S inputs (128 x 128 for 448).
        sizes: Original ``(height, width)`` of each image.
        image_size: The letterbox canvas S the logits were predicted from.

    Returns:
        B float32 tensors (h, w) on the logits' device (bicubic may overshoot [0, 1] slightly).
    """
    # bicubic with align_corners=True, as the released code upsamples before its inverse warp
    size = (image_size, image_size)
    prob = F.interpolate(torch.sigmoid(logits.float()), size=size, mode="bicubic", align_corners=True)
    return [unletterbox(prob[i, 0], h, w) for i, (h, w) in enumerate(sizes)]


def masks_from_logits(logits: torch.Tensor, sizes: list[tuple[int, int]], image_size: int) -> list[torch.Tensor]:
    """Binary masks at the original resolution from model logits (the inference path of SPEC 5).

    Args:
        logits: (B, 1, 4 * S/14, 4 * S/14) mask logits of letterboxed S x S inputs (128 x 128 for 448).
        sizes: Original ``(height, width)`` of each image.
        image_size: The letterbox canvas S the logits were predicted from.

    Returns:
        B bool tensors (h, w) on the logits' device: :func:`probabilities_from_logits` above ``MASK_THRESHOLD``.
    """
    return [prob > MASK_THRESHOLD for prob in probabilities_from_logits(logits, sizes, image_size)]


def _to_device(masks: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """Masks as bool tensors on ``device``, copied in one transfer."""
    flat = torch.from_numpy(np.concatenate([np.asarray(m).ravel() != 0 for m in masks]))
    if device.type == "cuda":
        flat = flat.pin_memory()  # so that the copy below is asynchronous
    on_device = flat.to(device, non_blocking=True)
    parts = on_device.split([int(np.prod(np.shape(m))) for m in masks])
    return [part.view(np.shape(m)) for part, m in zip(parts, masks, strict=True)]


def _overlap_counts(preds: list[torch.Tensor], masks: list[torch.Tensor]) -> torch.Tensor:
    """int64 (B, 2) intersection and union pixel counts of prediction/mask pairs, on their device."""
    rows = []
    for pred, mask in zip(preds, masks, strict=True):
        if pred.shape != mask.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and mask {tuple(mask.shape)} differ in size")
        pred, mask = pred.bool(), mask.bool()
        rows.append(torch.stack([(pred & mask).sum(), (pred | mask).sum()]))
    return torch.stack(rows)


@dataclass
class IoUAccumulator:
    """Running sums of per-sample IoU statistics; :meth:`all_reduce` makes them global across ranks."""

    intersection: int = 0  # total intersecting pixels (oIoU numerator)
    union: int = 0  # total union pixels (oIoU denominator)
    iou_sum: int = 0  # sum of per-sample IoUs in units of 1 / IOU_SCALE (mIoU numerator)
    count: int = 0  # samples seen
    prec_hits: list[int] = field(default_factory=lambda: [0] * len(PREC_THRESHOLDS))  # samples with IoU > t

    def add(self, pred: torch.Tensor | np.ndarray, mask: torch.Tensor | np.ndarray) -> float:
        """Adds one sample: a predicted and a ground-truth mask of the same (h, w); returns its IoU."""
        pred_t = torch.as_tensor(pred)
        (iou,) = self._add_counts(_overlap_counts([pred_t], [torch.as_tensor(mask, device=pred_t.device)]))
        return iou

    def add_logits(
        self, logits: torch.Tensor, masks: list[np.ndarray], sizes: list[tuple[int, int]], image_size: int
    ) -> list[float]:
        """Adds a batch: logits of S x S inputs (see :func:`masks_from_logits`), original masks and sizes.

        ``masks`` are (h, w) arrays (numpy or CPU tensors), nonzero inside the object; they cross to the device
        of the logits in one copy.

        Returns:
            The IoU of each sample, in batch order.
        """
        preds = masks_from_logits(logits, sizes, image_size)
        return self._add_counts(_overlap_counts(preds, _to_device(masks, logits.device)))

    def _add_counts(self, counts: torch.Tensor) -> list[float]:
        """Adds samples given their (intersection, union) rows (B, 2); returns their IoUs."""
        ious = []
        for inter, union in counts.tolist():  # the one host sync of a batch
            iou = inter / union if union else 0.0  # empty vs empty: 0 (module docstring)
            self.intersection += inter
            self.union += union
            self.iou_sum += round(iou * IOU_SCALE)
            self.count += 1
            for k, t in enumerate(PREC_THRESHOLDS):
                self.prec_hits[k] += iou > t
            ious.append(iou)
        return ious

    def all_reduce(self) -> None:
        """Sums the statistics over all ranks in place (a no-op without an initialised process group)."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        # integer sums reduce exactly in any order; nccl needs the tensor on the rank's GPU
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        sums = [self.intersection, self.union, self.iou_sum, self.count, *self.prec_hits]
        reduced = torch.tensor(sums, dtype=torch.int64, device=device)
        dist.all_reduce(reduced)
        self.intersection, self.union, self.iou_sum, self.count, *self.prec_hits = reduced.tolist()

    def result(self) -> dict[str, float | int]:
        """``miou``, ``oiou``, ``prec@0.5`` .. ``prec@0.9`` (fractions in [0, 1]) and ``count``."""
        n = max(self.count, 1)
        out: dict[str, float | int] = {
            "miou": self.iou_sum / IOU_SCALE / n,
            "oiou": self.intersection / self.union if self.union else 0.0,
        }
        out.update({f"prec@{t}": hits / n for t, hits in zip(PREC_THRESHOLDS, self.prec_hits, strict=True)})
        out["count"] = self.count
        return out


def format_table(results: dict[str, dict[str, float | int]]) -> str:
    """A plain-text table of per-split results (percentages, as the paper reports them)."""
    cols = ["miou", "oiou", *(f"prec@{t}" for t in PREC_THRESHOLDS)]
    lines = [f"{'split':<10}" + "".join(f"{c:>10}" for c in cols) + f"{'count':>10}"]
    for split, res in results.items():
        lines.append(f"{split:<10}" + "".join(f"{100 * res[c]:>10.2f}" for c in cols) + f"{res['count']:>10}")
    return "\n".join(lines)
