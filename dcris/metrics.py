"""Evaluation metrics of SPEC 5: mIoU, oIoU and Pr@0.5..0.9 at the original image resolution.

Per (object, sentence): sigmoid -> bicubic upsample to the input size -> inverse letterbox to the original
h x w (the exact inverse affine of :mod:`dcris.data.letterbox`) -> threshold 0.35 -> IoU with the original mask.

A batch is scored at once on the device of the logits: its original masks cross in one copy, zero-padded to the
batch's largest height and width (:func:`pad_masks`); the predictions are warped into the same padded shape
(:func:`padded_masks_from_logits`), exactly 0 outside each image; :func:`overlap_counts` gives every sample's
intersection and union. :class:`IoUAccumulator` turns those into per-sample statistics
(:meth:`~IoUAccumulator.sample_statistics`: one int64 column per name of ``IoUAccumulator.FIELDS``) and keeps
their sums on the device, so a batch costs no host sync; the sums are read when :meth:`~IoUAccumulator.totals`
or :meth:`~IoUAccumulator.result` is called. The sums are integers (the IoU sum in fixed point, 2^-40
resolution), so per-rank partial results all-reduce, in any order, to exactly the numbers one process would get.
Further metrics (e.g. those of generalised RES) add their own columns from the same overlap counts.

Convention for an empty prediction against an empty mask (union 0): IoU 0, as in the released CRIS/DETRIS
evaluation (which divides by ``union + 1e-6``). REFER masks are never empty, so this only touches degenerate
inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dcris.data.letterbox import unletterbox_batch

MASK_THRESHOLD = 0.35  # probability above which a pixel is foreground (released code)
PREC_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)  # Pr@t counts IoU > t
IOU_SCALE = 2**40  # fixed-point unit of the IoU sum: int64 holds 8 million samples exactly

Sizes = torch.Tensor | Sequence[tuple[int, int]]  # (B, 2) original (height, width) of each image, on the CPU


def _sizes_tensor(sizes: Sizes) -> torch.Tensor:
    """(B, 2) int64 CPU tensor of ``sizes``."""
    return torch.as_tensor(sizes, dtype=torch.int64).reshape(-1, 2)


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on ``device``, copied asynchronously from pinned memory when that is a GPU."""
    if device.type == "cuda" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def padded_probabilities(logits: torch.Tensor, sizes: Sizes, image_size: int) -> torch.Tensor:
    """Probability maps at the original resolutions from model logits (SPEC 5 up to the threshold), batched.

    Args:
        logits: (B, 1, 4 * S/14, 4 * S/14) mask logits of letterboxed S x S inputs (128 x 128 for 448).
        sizes: Original ``(height, width)`` of each image, on the CPU.
        image_size: The letterbox canvas S the logits were predicted from.

    Returns:
        float32 (B, h_max, w_max) on the logits' device: image b's map in ``[:h_b, :w_b]``, exactly 0 past it
        (bicubic may overshoot [0, 1] slightly).
    """
    sizes = _sizes_tensor(sizes)
    # bicubic with align_corners=True, as the released code upsamples before its inverse warp
    canvas = (image_size, image_size)
    prob = F.interpolate(torch.sigmoid(logits.float()), size=canvas, mode="bicubic", align_corners=True)
    out_shape = tuple(sizes.max(dim=0).values.tolist())  # on the CPU: no sync
    return unletterbox_batch(prob[:, 0], _to_device(sizes, logits.device), out_shape)


def padded_masks_from_logits(logits: torch.Tensor, sizes: Sizes, image_size: int) -> torch.Tensor:
    """bool (B, h_max, w_max): :func:`padded_probabilities` above ``MASK_THRESHOLD`` (False past each image)."""
    return padded_probabilities(logits, sizes, image_size) > MASK_THRESHOLD


def probabilities_from_logits(logits: torch.Tensor, sizes: Sizes, image_size: int) -> list[torch.Tensor]:
    """B float32 (h, w) probability maps on the logits' device: views of :func:`padded_probabilities`."""
    padded = padded_probabilities(logits, sizes, image_size)
    return [padded[i, :h, :w] for i, (h, w) in enumerate(_sizes_tensor(sizes).tolist())]


def masks_from_logits(logits: torch.Tensor, sizes: Sizes, image_size: int) -> list[torch.Tensor]:
    """Binary masks at the original resolution from model logits (the inference path of SPEC 5).

    Args:
        logits: (B, 1, 4 * S/14, 4 * S/14) mask logits of letterboxed S x S inputs (128 x 128 for 448).
        sizes: Original ``(height, width)`` of each image.
        image_size: The letterbox canvas S the logits were predicted from.

    Returns:
        B bool tensors (h, w) on the logits' device: views of :func:`padded_masks_from_logits`.
    """
    padded = padded_masks_from_logits(logits, sizes, image_size)
    return [padded[i, :h, :w] for i, (h, w) in enumerate(_sizes_tensor(sizes).tolist())]


def pad_masks(masks: Sequence[np.ndarray], sizes: Sizes, device: torch.device) -> torch.Tensor:
    """The original masks of a batch as one bool (B, h_max, w_max) tensor on ``device``, zero-padded, in one copy.

    Args:
        masks: B (h, w) arrays (numpy or CPU tensors), nonzero inside the object.
        sizes: Their ``(height, width)``, as the loader reports them; a mask of another shape is an error.
        device: Where the batch goes.
    """
    sizes = _sizes_tensor(sizes)
    height, width = sizes.max(dim=0).values.tolist()
    padded = torch.zeros((len(masks), height, width), dtype=torch.uint8, pin_memory=device.type == "cuda")
    for i, (row, mask, size) in enumerate(zip(padded.numpy(), masks, sizes.tolist(), strict=True)):
        if np.shape(mask) != tuple(size):  # a copy per mask, no computation: the pixels are counted on the device
            raise ValueError(f"mask {i} is {np.shape(mask)}, its image is {tuple(size)}")
        row[: size[0], : size[1]] = np.asarray(mask) != 0
    return padded.to(device, non_blocking=True).bool()


def overlap_counts(preds: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """int64 (B, 2) intersection and union pixel counts of (B, H, W) prediction/mask pairs, on their device."""
    if preds.shape != masks.shape:
        raise ValueError(f"predictions {tuple(preds.shape)} and masks {tuple(masks.shape)} differ in size")
    preds, masks = preds.bool(), masks.bool()
    return torch.stack([(preds & masks).sum(dim=(1, 2)), (preds | masks).sum(dim=(1, 2))], dim=1)


class IoUAccumulator:
    """Running sums of per-sample IoU statistics on the device of the batches; :meth:`all_reduce` makes them
    global across ranks."""

    # the sums, in the order of the columns of sample_statistics
    FIELDS = (
        "intersection",  # total intersecting pixels (oIoU numerator)
        "union",  # total union pixels (oIoU denominator)
        "iou_sum",  # sum of per-sample IoUs in units of 1 / IOU_SCALE (mIoU numerator)
        "count",  # samples seen
        *(f"prec_hits@{t}" for t in PREC_THRESHOLDS),  # samples with IoU > t
    )

    def __init__(self) -> None:
        self.sums: torch.Tensor | None = None  # int64 (len(FIELDS),) on the device of the batches, or none yet

    @staticmethod
    def sample_statistics(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample IoUs and statistics from (B, 2) intersection and union counts, on their device.

        Returns:
            float64 (B,) IoUs (0 for an empty union: module docstring) and int64 (B, len(FIELDS)) statistics.
        """
        inter, union = counts[:, 0], counts[:, 1]
        ious = inter.double() / union.clamp(min=1).double()  # union 0 has intersection 0: IoU 0
        hits = [ious > t for t in PREC_THRESHOLDS]
        stats = torch.stack([inter, union, torch.round(ious * IOU_SCALE).long(), torch.ones_like(inter), *hits], 1)
        return ious, stats.long()

    def add_counts(self, counts: torch.Tensor) -> torch.Tensor:
        """Adds samples given their (B, 2) intersection and union counts; returns their float64 (B,) IoUs."""
        ious, stats = self.sample_statistics(counts)
        sums = stats.sum(dim=0)
        self.sums = sums if self.sums is None else self.sums + sums.to(self.sums.device)
        return ious

    def add(self, pred: torch.Tensor | np.ndarray, mask: torch.Tensor | np.ndarray) -> float:
        """Adds one sample: a predicted and a ground-truth mask of the same (h, w); returns its IoU."""
        pred_t = torch.as_tensor(pred)
        counts = overlap_counts(pred_t[None], torch.as_tensor(mask, device=pred_t.device)[None])
        return float(self.add_counts(counts)[0])

    def add_logits(
        self, logits: torch.Tensor, masks: Sequence[np.ndarray], sizes: Sizes, image_size: int
    ) -> torch.Tensor:
        """Adds a batch: logits of S x S inputs (see :func:`masks_from_logits`), original masks and sizes.

        ``masks`` are (h, w) arrays (numpy or CPU tensors), nonzero inside the object; they cross to the device
        of the logits in one copy (:func:`pad_masks`). Nothing waits for the device.

        Returns:
            float64 (B,) IoU of each sample, in batch order, on the logits' device.
        """
        preds = padded_masks_from_logits(logits, sizes, image_size)
        return self.add_counts(overlap_counts(preds, pad_masks(masks, sizes, logits.device)))

    def all_reduce(self) -> None:
        """Sums the statistics over all ranks in place (a no-op without an initialised process group)."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        # integer sums reduce exactly in any order; nccl needs the tensor on the rank's GPU
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        sums = torch.zeros(len(self.FIELDS), dtype=torch.int64) if self.sums is None else self.sums
        reduced = sums.to(device)
        dist.all_reduce(reduced)
        self.sums = reduced

    def totals(self) -> dict[str, int]:
        """The sums by name (``FIELDS``), read from the device (a host sync)."""
        values = [0] * len(self.FIELDS) if self.sums is None else self.sums.tolist()
        return dict(zip(self.FIELDS, values, strict=True))

    @property
    def count(self) -> int:
        """Samples seen (a host sync)."""
        return self.totals()["count"]

    def result(self) -> dict[str, float | int]:
        """``miou``, ``oiou``, ``prec@0.5`` .. ``prec@0.9`` (fractions in [0, 1]) and ``count``."""
        sums = self.totals()
        n = max(sums["count"], 1)
        out: dict[str, float | int] = {
            "miou": sums["iou_sum"] / IOU_SCALE / n,
            "oiou": sums["intersection"] / sums["union"] if sums["union"] else 0.0,
        }
        out.update({f"prec@{t}": sums[f"prec_hits@{t}"] / n for t in PREC_THRESHOLDS})
        out["count"] = sums["count"]
        return out


def format_table(results: dict[str, dict[str, float | int]]) -> str:
    """A plain-text table of per-split results (percentages, as the paper reports them)."""
    cols = ["miou", "oiou", *(f"prec@{t}" for t in PREC_THRESHOLDS)]
    lines = [f"{'split':<10}" + "".join(f"{c:>10}" for c in cols) + f"{'count':>10}"]
    for split, res in results.items():
        lines.append(f"{split:<10}" + "".join(f"{100 * res[c]:>10.2f}" for c in cols) + f"{res['count']:>10}")
    return "\n".join(lines)
