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

gRefCOCO (GRES) splits, whose phrases may name no object or several, are scored by :class:`GresAccumulator` as
the official ReLA evaluation does, with a predicted no-target flag per sample:

| truth | predicted | counts as | IoU | adds to sum(I) | adds to sum(U) |
|---|---|---|---|---|---|
| no target | no target | TP | 1 | 0 | 0 |
| no target | a target | FN | 0 | 0 | the predicted area |
| a target | no target | FP | 0 | 0 (I is 0) | U as computed |
| a target | a target | TN | I/U (0 when U = 0) | I | U |

gIoU = mean IoU and cIoU = sum(I) / sum(U) over all samples; N-acc = TP / (TP + FN), T-acc = TN / (TN + FP)
(some forks add 1 to those denominators: not here); Pr@0.7/0.8/0.9 count target samples only, IoU >= t.
I and U come from the thresholded mask the model painted, also when it says nothing is there (as ReLA's).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dcris.config import HeadConfig
from dcris.data.common import to_device
from dcris.data.letterbox import stretch_batch, unletterbox_batch

MASK_THRESHOLD = 0.35  # probability above which a pixel is foreground (released code)
PREC_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)  # Pr@t counts IoU > t
IOU_SCALE = 2**40  # fixed-point unit of the IoU sum: int64 holds 8 million samples exactly

Sizes = torch.Tensor | Sequence[tuple[int, int]]  # (B, 2) original (height, width) of each image, on the CPU


def _sizes_tensor(sizes: Sizes) -> torch.Tensor:
    """(B, 2) int64 CPU tensor of ``sizes``."""
    return torch.as_tensor(sizes, dtype=torch.int64).reshape(-1, 2)


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
    return unletterbox_batch(prob[:, 0], to_device(sizes, logits.device), out_shape)


def stretched_probabilities(logits: torch.Tensor, sizes: Sizes, image_size: int, side: int) -> torch.Tensor:
    """float32 (B, side, side) probability maps in each original stretched to ``side`` x ``side`` (ReLA's frame),
    from the logits of letterboxed S x S inputs: upsampled as :func:`padded_probabilities`, then warped by
    ``dcris.data.letterbox.stretch_batch`` in one step."""
    canvas = (image_size, image_size)
    prob = F.interpolate(torch.sigmoid(logits.float()), size=canvas, mode="bicubic", align_corners=True)
    return stretch_batch(prob[:, 0], to_device(_sizes_tensor(sizes), logits.device), side)


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


GRES_PREC_THRESHOLDS = (0.7, 0.8, 0.9)  # gRefCOCO's Pr@t: target samples with IoU >= t
# probability of "no object" above which a model says the phrase names nothing, unless its config says otherwise
NO_TARGET_THRESHOLD = HeadConfig.no_target_threshold


class GresAccumulator(IoUAccumulator):
    """Running sums of the gRefCOCO metrics (module docstring) on the device of the batches, integers as
    :class:`IoUAccumulator`'s, so :meth:`~IoUAccumulator.all_reduce` and :meth:`~IoUAccumulator.totals` serve."""

    FIELDS = (
        "intersection",  # sum(I) (cIoU numerator)
        "union",  # sum(U) (cIoU denominator)
        "iou_sum",  # sum of per-sample IoUs in units of 1 / IOU_SCALE (gIoU numerator)
        "count",  # samples seen
        "tp",  # no target, predicted no target
        "fn",  # no target, predicted a target
        "fp",  # a target, predicted no target
        "tn",  # a target, predicted a target
        *(f"prec_hits@{t}" for t in GRES_PREC_THRESHOLDS),  # target samples with IoU >= t
    )

    @staticmethod
    def gres_statistics(
        counts: torch.Tensor, truth_empty: torch.Tensor, said_empty: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample IoUs and statistics (the table of the module docstring), on the device of ``counts``.

        Args:
            counts: int64 (B, 2) intersection and union of the painted mask with the truth.
            truth_empty: bool (B,) whether each phrase names nothing.
            said_empty: bool (B,) whether the model said so.

        Returns:
            float64 (B,) IoUs and int64 (B, len(FIELDS)) statistics.
        """
        inter = torch.where(said_empty, 0, counts[:, 0])  # "nothing there" paints nothing that counts
        union = torch.where(truth_empty & said_empty, 0, counts[:, 1])  # no target: U is the predicted area
        target_ious = inter.double() / union.clamp(min=1).double()
        ious = torch.where(truth_empty, said_empty.double(), target_ious)
        target = ~truth_empty
        hits = [target & (ious >= t) for t in GRES_PREC_THRESHOLDS]
        outcomes = [truth_empty & said_empty, truth_empty & ~said_empty, target & said_empty, target & ~said_empty]
        iou_units = torch.round(ious * IOU_SCALE).long()
        stats = [torch.where(target, inter, 0), union, iou_units, torch.ones_like(inter), *outcomes, *hits]
        return ious, torch.stack(stats, 1).long()

    def add(
        self,
        counts: torch.Tensor | Sequence[Sequence[int]],
        truth_empty: torch.Tensor | Sequence[bool],
        said_empty: torch.Tensor | Sequence[bool],
    ) -> torch.Tensor:
        """Adds samples given the (I, U) of each painted mask, whether each names nothing and whether the model
        said so (tensors on one device, or lists); returns their float64 (B,) IoUs."""
        counts = torch.as_tensor(counts, dtype=torch.int64).reshape(-1, 2)
        flags = [torch.as_tensor(f, dtype=torch.bool, device=counts.device) for f in (truth_empty, said_empty)]
        ious, stats = self.gres_statistics(counts, *flags)
        sums = stats.sum(dim=0)
        self.sums = sums if self.sums is None else self.sums + sums.to(self.sums.device)
        return ious

    def add_logits(
        self,
        logits: torch.Tensor,
        masks: Sequence[np.ndarray],
        sizes: Sizes,
        image_size: int,
        num_targets: torch.Tensor,
        no_target_logits: torch.Tensor | None,
        no_target_threshold: float = NO_TARGET_THRESHOLD,
        stretch: int | None = None,
    ) -> torch.Tensor:
        """Adds a batch (the arguments of :meth:`IoUAccumulator.add_logits`, plus the no-target fields); nothing
        waits for the device.

        Args:
            num_targets: (B,) objects each phrase names (0: none), on the CPU.
            no_target_logits: (B,) the model's "no object" logits; None for a model without that output, which
                then says "nothing" exactly when its mask is empty.
            no_target_threshold: Probability of "no object" above which the model says the phrase names nothing.
            stretch: None to score at the original resolution; a side (480) to score as ReLA's evaluation does,
                in the original stretched to ``stretch`` x ``stretch`` (:func:`stretched_probabilities`), where
                ``masks`` must then be (the targets rasterised there: ``dcris.protocol``).

        Returns:
            float64 (B,) gRefCOCO IoU of each sample, in batch order, on the logits' device.
        """
        if stretch is None:
            preds = padded_masks_from_logits(logits, sizes, image_size)
            truths = pad_masks(masks, sizes, logits.device)
        else:
            preds = stretched_probabilities(logits, sizes, image_size, stretch) > MASK_THRESHOLD
            truths = pad_masks(masks, [(stretch, stretch)] * len(masks), logits.device)
        truth_empty = to_device(torch.as_tensor(num_targets) == 0, logits.device)
        if no_target_logits is None:
            no_target_probs = (~preds.flatten(1).any(dim=1)).float()
        else:
            no_target_probs = torch.sigmoid(no_target_logits.float())
        counts = overlap_counts(preds, truths)
        return self.add_probabilities(counts, truth_empty, no_target_probs, no_target_threshold)

    def add_probabilities(
        self, counts: torch.Tensor, truth_empty: torch.Tensor, no_target_probs: torch.Tensor, threshold: float
    ) -> torch.Tensor:
        """:meth:`add` with the "no object" decision taken at ``threshold`` from its probabilities."""
        return self.add(counts, truth_empty, no_target_probs > threshold)

    def result(self) -> dict[str, float | int]:
        """``giou``, ``ciou``, ``n_acc``, ``t_acc``, ``prec@0.7`` .. ``prec@0.9`` (fractions in [0, 1]), ``count``
        and ``no_target`` (the samples that name nothing); an empty denominator gives 0."""
        sums = self.totals()
        targets = sums["tn"] + sums["fp"]
        no_target = sums["tp"] + sums["fn"]
        out: dict[str, float | int] = {
            "giou": sums["iou_sum"] / IOU_SCALE / max(sums["count"], 1),
            "ciou": sums["intersection"] / sums["union"] if sums["union"] else 0.0,
            "n_acc": sums["tp"] / no_target if no_target else 0.0,
            "t_acc": sums["tn"] / targets if targets else 0.0,
        }
        out.update({f"prec@{t}": sums[f"prec_hits@{t}"] / max(targets, 1) for t in GRES_PREC_THRESHOLDS})
        out.update(count=sums["count"], no_target=no_target)
        return out


CALIBRATION_THRESHOLDS = tuple(round(0.02 * k, 2) for k in range(1, 50))  # 0.02 .. 0.98: 0.5 among them


class NoTargetSweep(GresAccumulator):
    """:class:`GresAccumulator` at the model's no-target threshold, and beside it one per threshold of a sweep,
    all fed from the same painted masks (the mask does not depend on the threshold): the N-acc/T-acc trade-off."""

    def __init__(self, thresholds: Sequence[float] = CALIBRATION_THRESHOLDS) -> None:
        super().__init__()
        self.curve = {float(t): GresAccumulator() for t in thresholds}

    def add_probabilities(
        self, counts: torch.Tensor, truth_empty: torch.Tensor, no_target_probs: torch.Tensor, threshold: float
    ) -> torch.Tensor:
        """:meth:`GresAccumulator.add_probabilities`, the batch added to every threshold's sums too."""
        for swept, acc in self.curve.items():
            acc.add_probabilities(counts, truth_empty, no_target_probs, swept)
        return super().add_probabilities(counts, truth_empty, no_target_probs, threshold)

    def all_reduce(self) -> None:
        super().all_reduce()
        for acc in self.curve.values():
            acc.all_reduce()

    def result(self) -> dict:
        """:meth:`GresAccumulator.result` plus ``no_target_curve``: one row per threshold, ``threshold`` and that
        threshold's result."""
        rows = [dict(threshold=t, **acc.result()) for t, acc in self.curve.items()]
        return super().result() | {"no_target_curve": rows}


def best_threshold(curve: list[dict]) -> dict:
    """The row of a ``no_target_curve`` with the best gIoU; ties go to the better cIoU, then to the threshold
    nearest 0.5."""
    return max(curve, key=lambda row: (row["giou"], row["ciou"], -abs(row["threshold"] - 0.5)))


def format_curve(curve: list[dict]) -> str:
    """A plain-text table of a ``no_target_curve`` (percentages), the gIoU-best row marked."""
    best = best_threshold(curve)
    lines = [f"{'threshold':>10}" + "".join(f"{c:>10}" for c in ("giou", "ciou", "n_acc", "t_acc"))]
    for row in curve:
        mark = "  <- best gIoU" if row is best else ""
        values = "".join(f"{100 * row[c]:>10.2f}" for c in ("giou", "ciou", "n_acc", "t_acc"))
        lines.append(f"{row['threshold']:>10.2f}{values}{mark}")
    return "\n".join(lines)


def plot_curve(curve: list[dict], path: str | Path, title: str) -> None:
    """A PNG of a ``no_target_curve``: gIoU, cIoU, N-acc and T-acc against the threshold, the best gIoU marked."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    from matplotlib import pyplot as plt

    thresholds = [row["threshold"] for row in curve]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for key, label in (("giou", "gIoU"), ("ciou", "cIoU"), ("n_acc", "N-acc"), ("t_acc", "T-acc")):
        ax.plot(thresholds, [100 * row[key] for row in curve], label=label)
    best = best_threshold(curve)
    ax.axvline(best["threshold"], color="gray", linestyle="--", label=f"best gIoU at {best['threshold']:.2f}")
    ax.set(xlabel='no-target threshold (probability of "no object")', ylabel="%", title=title, xlim=(0, 1))
    ax.legend(loc="lower center", ncol=5, fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def format_table(results: dict[str, dict[str, float | int]]) -> str:
    """A plain-text table of per-split results (percentages, as the papers report them); gRefCOCO splits (those
    with ``giou``) get their own columns, in a block of their own."""
    blocks = []
    refer_cols = ["miou", "oiou", *(f"prec@{t}" for t in PREC_THRESHOLDS)]
    gres_cols = ["giou", "ciou", "n_acc", "t_acc", *(f"prec@{t}" for t in GRES_PREC_THRESHOLDS)]
    for cols in (refer_cols, gres_cols):
        rows = {split: res for split, res in results.items() if ("giou" in res) == (cols is gres_cols)}
        if not rows:
            continue
        lines = [f"{'split':<10}" + "".join(f"{c:>10}" for c in cols) + f"{'count':>10}"]
        for split, res in rows.items():
            lines.append(f"{split:<10}" + "".join(f"{100 * res[c]:>10.2f}" for c in cols) + f"{res['count']:>10}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
