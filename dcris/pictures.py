"""Contact sheets of an evaluated split: the best pair, the worst, and evenly spaced ranks between.

Evaluation hands every batch's per-sample IoUs to an :class:`IoURecorder`; afterwards the chosen pairs are read
back from the shards and predicted again through :class:`~dcris.segmenter.Segmenter`, and each tile shows the
sentence, the ground truth as an outline, the prediction filled, and how that drawn prediction fares
(:func:`verdict`: its IoU, or for a gRefCOCO phrase that names nothing whether the model said so). Used by
``dcris demo``, ``launch/eval.py --pictures N`` and, through TensorBoard, by evaluations during training.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch.distributed as dist
import webdataset as wds
from PIL import Image

from dcris.data.common import generalized_split, read_manifest, split_info
from dcris.draw import Tile, contact_sheet
from dcris.metrics import IoUAccumulator
from dcris.model import DCRIS
from dcris.segmenter import Segmentation, Segmenter


class IoURecorder:
    """Per split, ``(iou, ref_id, sent_idx)`` of every evaluated pair; pass it as ``evaluate(on_batch=...)``."""

    def __init__(self) -> None:
        self.rows: dict[str, list[tuple[float, int, int]]] = {}

    def __call__(self, split: str, batch: dict[str, Any], ious: list[float]) -> None:
        pairs = zip(ious, batch["ref_id"].tolist(), batch["sent_idx"].tolist(), strict=True)
        self.rows.setdefault(split, []).extend(pairs)

    def ranked(self, split: str) -> list[tuple[float, int, int]]:
        """Every rank's pairs of ``split``, best IoU first (ties by ref_id, sentence); a collective when
        distributed."""
        rows = self.rows.get(split, [])
        if dist.is_available() and dist.is_initialized():
            parts: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(parts, rows)
            rows = [row for part in parts for row in part]
        return sorted(rows, key=lambda r: (-r[0], r[1], r[2]))


def spread(total: int, count: int) -> list[int]:
    """``count`` positions of a ranking of ``total``, evenly spaced from the first (best) to the last (worst)."""
    if total <= 0 or count <= 0:
        return []
    if count == 1:
        return [0]
    return sorted({round(k * (total - 1) / (count - 1)) for k in range(count)})


def read_samples(shards: str | Path, split: str, ref_ids: set[int]) -> dict[int, dict[str, Any]]:
    """The original image, the bool mask and the sentences of the objects ``ref_ids`` of a packed split."""
    info = split_info(read_manifest(shards), split, shards)
    found: dict[int, dict[str, Any]] = {}
    for shard in info["shards"]:
        for sample in wds.tarfile_samples([{"url": str(Path(shards) / shard["tar"])}]):
            meta = np.frombuffer(sample["meta"], dtype="<i8")  # sample_index, ref_id, ...
            if int(meta[1]) not in ref_ids:
                continue
            record = json.loads(sample["json"])
            with Image.open(io.BytesIO(sample["jpg"])) as im:
                image = im.convert("RGB")
            with Image.open(io.BytesIO(sample["mask.png"])) as im:
                mask = np.asarray(im.convert("L")) > 127
            targets = record.get("num_targets", 1)  # shards packed before the count: one object per ref
            found[int(meta[1])] = dict(image=image, mask=mask, sentences=record["sentences"], num_targets=targets)
            if len(found) == len(ref_ids):
                return found
    return found


def verdict(result: Segmentation, truth: np.ndarray, num_targets: int, generalized: bool) -> str:
    """How a drawn prediction fares, in words. A phrase that names nothing (gRefCOCO) is judged by the model's
    decision -- "nothing there: right", or "painted N% of the image: wrong" -- as the metrics judge it (its pixel
    IoU would be 0 however right the model is); any other phrase by the IoU of the drawn mask, a gRefCOCO one
    also saying how many objects it names (and, where the model said nothing is there, that it did)."""
    if generalized and num_targets == 0:
        if not result.found:
            return "nothing there: right"
        return f"painted {100 * result.mask.mean():.0f}% of the image: wrong"
    text = f"IoU {IoUAccumulator().add(result.mask, truth):.2f}"
    if generalized and num_targets > 1:
        text += f", names {num_targets} objects"
    if generalized and not result.found:
        text += ", said nothing there"
    return text


def split_sheet(segmenter: Segmenter, shards: str | Path, split: str, ranked: list, count: int) -> Image.Image:
    """The contact sheet of ``count`` pairs of a ranked split (see :meth:`IoURecorder.ranked`)."""
    positions = spread(len(ranked), count)
    samples = read_samples(shards, split, {ranked[p][1] for p in positions})
    generalized = generalized_split(shards, split)
    tiles = []
    for position in positions:
        _, ref_id, sent_idx = ranked[position]
        sample = samples[ref_id]
        result = segmenter(sample["image"], sample["sentences"][sent_idx])
        said = verdict(result, sample["mask"], sample["num_targets"], generalized)
        rank = "best" if position == 0 else "worst" if position == len(ranked) - 1 else f"rank {position + 1}"
        tiles.append(Tile(sample["image"], sample["mask"], result.mask, result.text, said, f"{rank} of {len(ranked)}"))
    score = "gIoU" if generalized else "IoU"
    title = f"{split}: {len(tiles)} of {len(ranked)} pairs, from the best to the worst evaluated {score}"
    return contact_sheet(tiles, title)


def contact_sheets(
    model: DCRIS, recorder: IoURecorder, shards: str | Path, splits: list[str], count: int, rank: int = 0
) -> dict[str, Image.Image]:
    """One contact sheet per split on rank 0 (empty elsewhere); every rank must call it when distributed.

    Every rank predicts the same pairs: under ZeRO-3 each forward pass gathers the parameters (a collective).
    """
    rankings = {split: recorder.ranked(split) for split in splits}  # a collective
    if count <= 0:
        return {}
    segmenter = Segmenter(model)
    sheets = {
        split: split_sheet(segmenter, shards, split, ranking, count) for split, ranking in rankings.items() if ranking
    }
    return sheets if rank == 0 else {}
