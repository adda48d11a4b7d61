"""Evaluation protocols of gRefCOCO: where the masks are compared.

- ``original`` (the default): at each image's original resolution (SPEC 5), the prediction warped back from the
  letterbox.
- ``rela``: as the official ReLA evaluation (``gres_model/data/dataset_mappers/refcoco_mapper.py`` with
  ``configs/referring_R50.yaml``'s ``INPUT.IMAGE_SIZE: 480``): every image stretched to 480 x 480, no letterbox.
  The target is rasterised there from its objects' segmentations moved with the image -- polygon coordinates
  scaled by ``480 / w`` and ``480 / h`` (detectron2's ``ResizeTransform.apply_coords``), then ``frPyObjects`` /
  ``decode`` at 480 x 480; an RLE object decoded at the original size and resized with nearest neighbours
  (``apply_segmentation``) -- and the union taken. The prediction is scored in the same frame: the model's
  letterbox output warped straight to it (``dcris.metrics.stretched_probabilities``).

cIoU weighs pixels, so the two protocols give different numbers for one model; a figure is comparable only with
rows scored the same way (docs/training.md lists which published rows use which).
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from dcris.data.common import read_manifest, split_info
from dcris.errors import UserError

PROTOCOLS = ("original", "rela")
RELA_SIDE = 480  # ReLA's INPUT.IMAGE_SIZE: the stretched square it evaluates in


def stretched_target(segmentations: list, height: int, width: int, side: int = RELA_SIDE) -> np.ndarray:
    """uint8 (side, side) in {0, 1}: the union of the objects' segmentations in the image stretched to a square.

    Args:
        segmentations: One per object: a list of polygons ``[x0, y0, x1, y1, ...]`` in original pixels, or a COCO
            RLE (compressed counts as text or bytes, or uncompressed) of the original size.
        height: Original height.
        width: Original width.
        side: Side of the stretched frame.
    """
    from pycocotools import mask as mask_utils

    union = np.zeros((side, side), dtype=np.uint8)
    for segmentation in segmentations:
        if isinstance(segmentation, dict):
            rle = segmentation
            if isinstance(rle["counts"], list):
                rle = mask_utils.frPyObjects(rle, height, width)
            elif isinstance(rle["counts"], str):
                rle = dict(rle, counts=rle["counts"].encode("ascii"))
            original = mask_utils.decode(rle)
            union |= np.asarray(Image.fromarray(original).resize((side, side), Image.NEAREST))
        else:
            scale = np.array([side / width, side / height])
            polygons = [(np.asarray(p, dtype=np.float64).reshape(-1, 2) * scale).reshape(-1).tolist()
                        for p in segmentation]  # fmt: skip
            union |= mask_utils.decode(mask_utils.frPyObjects(polygons, side, side)).max(axis=2)
    return union


class StretchedTargets:
    """The targets of a packed gRefCOCO split in ReLA's frame, by ref_id, rasterised when asked for.

    Reads every sample's JSON (its segmentations and size) from the split's tars once; shards packed before the
    segmentations were kept are a user error naming the fix.
    """

    def __init__(self, shards_dir: str | Path, split: str, side: int = RELA_SIDE) -> None:
        self.side = side
        self._objects: dict[int, tuple[list, int, int]] = {}
        for shard in split_info(read_manifest(shards_dir), split, shards_dir)["shards"]:
            with tarfile.open(Path(shards_dir) / shard["tar"]) as tar:
                for member in tar:
                    if not member.name.endswith(".json"):
                        continue
                    info = json.loads(tar.extractfile(member).read())
                    if "segmentations" not in info:
                        raise UserError(
                            f"{shards_dir} ({split}) was packed without the objects' segmentations, which "
                            "--protocol rela rasterises: repack it with shards/pack.py"
                        )
                    if info["ref_id"] in self._objects:
                        raise UserError(f"ref_id {info['ref_id']} appears twice in {split!r}: not one data set")
                    self._objects[info["ref_id"]] = (info["segmentations"], info["height"], info["width"])

    def masks(self, ref_ids: list[int] | np.ndarray) -> list[np.ndarray]:
        """uint8 (side, side) targets of the given refs, in order."""
        return [stretched_target(*self._objects[int(r)], side=self.side) for r in ref_ids]


def stretched_targets(shards_dir: str | Path, split: str, protocol: str, generalized: bool) -> StretchedTargets | None:
    """What ``protocol`` scores a split against: None for ``original`` (the loader's masks), else the split's
    :class:`StretchedTargets`; a protocol unknown, or ``rela`` on a split that is not gRefCOCO's, is a user error."""
    if protocol not in PROTOCOLS:
        raise UserError(f"unknown protocol {protocol!r}: use {' or '.join(PROTOCOLS)}")
    if protocol == "original":
        return None
    if not generalized:
        raise UserError(f"--protocol {protocol} scores gRefCOCO splits; {split!r} of {shards_dir} is not one")
    return StretchedTargets(shards_dir, split)
