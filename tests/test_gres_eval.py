"""gRefCOCO evaluation: ``--protocol rela`` against a plain rewrite of ReLA's test mapper and evaluator, and the
calibrated no-target threshold through an export.

The protocol's reference reads the release itself (not the shards), moves every object with the stretch to 480 x 480 as
detectron2's ``ResizeTransform`` does (polygon coordinates times ``480 / w`` and ``480 / h``; an RLE decoded at
the original size and resized with nearest neighbours), rasterises with pycocotools at 480 x 480, merges the
objects (sum, clamp 1), warps the prediction into that frame with OpenCV and runs ReLA's metric loop sample by
sample (``computeIoU``, the TP/FN/FP/TN accumulation, gIoU, cIoU, N-acc, T-acc, Pr@).
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from eval_reference import _inverse_matrix, rela_gres
from PIL import Image
from pycocotools import mask as mask_utils
from torch import nn

from dcris.config import preset
from dcris.data import build_loader, pack
from dcris.data.synth import make_synthetic_release
from dcris.errors import UserError
from dcris.evaluate import evaluate

SIDE = 480


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE of a 0/1 mask: run lengths in column-major order, starting with zeros."""
    flat = mask.flatten(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    return dict(size=list(mask.shape), counts=([0] if flat[0] else []) + runs)


@pytest.fixture(scope="module")
def gres_release(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A gRefCOCO release of 3 synthetic images, every ref in val, two objects as RLE (compressed and not) and one
    with a 4-coordinate polygon beside its own; packed as grefcoco. Returns (release root, shards)."""
    base = make_synthetic_release(tmp_path_factory.mktemp("gres"), images=3, seed=3, gres=True)
    refs = json.loads((base / "synthetic_gres" / "grefs(unc).json").read_text())
    for r in refs:
        r["split"] = "val"
    instances = json.loads((base / "synthetic_gres" / "instances.json").read_text())
    images = {im["id"]: im for im in instances["images"]}
    val_objects = sorted({a for r in refs if r["split"] == "val" for a in r["ann_id"] if a != -1})
    anns = {a["id"]: a for a in instances["annotations"]}
    for k, ann_id in enumerate(val_objects[:3]):
        ann = anns[ann_id]
        h, w = images[ann["image_id"]]["height"], images[ann["image_id"]]["width"]
        mask = mask_utils.decode(mask_utils.frPyObjects(ann["segmentation"], h, w)).max(axis=2)
        if k == 0:
            rle = mask_utils.encode(np.asfortranarray(mask))
            ann["segmentation"] = dict(size=rle["size"], counts=rle["counts"].decode("ascii"))
        elif k == 1:
            ann["segmentation"] = _uncompressed_rle(mask)
        else:
            ann["segmentation"].append([1.0, 2.0, 30.0, 40.0])  # dropped by ReLA's loader
    root = tmp_path_factory.mktemp("refer")
    (root / "grefcoco").mkdir()
    (root / "grefcoco" / "grefs(unc).json").write_text(json.dumps(refs))
    (root / "grefcoco" / "instances.json").write_text(json.dumps(instances))
    out = tmp_path_factory.mktemp("shards")
    argv = ["--refer", str(root), "--images", str(base / "images"), "--out", str(out), "--workers", "1"]
    assert pack.main([*argv, "--dataset", "grefcoco", "--splits", "val", "--shard-size", "8"]) == 0
    return root, out / "grefcoco"


class ImageProbe(nn.Module):
    """A stand-in model whose masks follow the image (a fixed mix of its channels, pooled to the logits' side)
    and whose "no object" logit follows the tokens, so predictions have shapes, edges and both decisions."""

    def __init__(self, image_size: int) -> None:
        super().__init__()
        self.cfg = preset("tiny-dcris").model
        self.cfg.image_size, self.cfg.head.no_target = image_size, True
        self.mix = torch.tensor([2.5, -1.0, -1.6]).view(1, 3, 1, 1)

    def forward(self, image: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        side = 4 * self.cfg.image_size // 14
        logits = F.adaptive_avg_pool2d((image * self.mix).sum(1, keepdim=True) - 0.3, side)
        no_target = torch.sin(tokens.float().sum(1) * 0.37) * 2
        return logits, no_target


def _rela_target(anns: list[dict], height: int, width: int) -> np.ndarray:
    """ReLA's mapper at test time: the objects moved by the resize to 480 x 480, rasterised, merged."""
    masks = []
    for ann in anns:
        if ann["iscrowd"]:
            continue
        segm = ann["segmentation"]
        if isinstance(segm, dict):  # detectron2: decode, then apply_segmentation (PIL nearest)
            if isinstance(segm["counts"], list):
                segm = mask_utils.frPyObjects(segm, *segm["size"])
            else:
                segm = dict(segm, counts=segm["counts"].encode())
            resized = Image.fromarray(mask_utils.decode(segm)).resize((SIDE, SIDE), Image.NEAREST)
            masks.append(np.asarray(resized) > 0)
            continue
        polygons = [p for p in segm if len(p) % 2 == 0 and len(p) >= 6]  # the loader's filter
        moved = []
        for p in polygons:  # ResizeTransform.apply_coords
            coords = np.asarray(p, dtype=np.float64).reshape(-1, 2)
            coords[:, 0] = coords[:, 0] * (SIDE * 1.0 / width)
            coords[:, 1] = coords[:, 1] * (SIDE * 1.0 / height)
            moved.append(coords.reshape(-1).tolist())
        decoded = mask_utils.decode(mask_utils.frPyObjects(moved, SIDE, SIDE))  # convert_coco_poly_to_mask
        masks.append(decoded.any(axis=2))
    merged = np.zeros((SIDE, SIDE), dtype=np.int64)
    for m in masks:
        merged += m
    return np.minimum(merged, 1).astype(np.int8)


def _rela_prediction(logits: torch.Tensor, height: int, width: int, size: int) -> np.ndarray:
    """The probability map on the canvas, warped by OpenCV into the stretched frame (letterbox inverse, then the
    stretch with pixel edges on pixel edges), thresholded at 0.35."""
    canvas = F.interpolate(torch.sigmoid(logits[None].float()), size=(size, size), mode="bicubic", align_corners=True)
    inverse = _inverse_matrix(height, width, size)  # canvas -> original
    sx, sy = SIDE / width, SIDE / height
    matrix = np.array([
        [inverse[0, 0] * sx, 0.0, (inverse[0, 2] + 0.5) * sx - 0.5],
        [0.0, inverse[1, 1] * sy, (inverse[1, 2] + 0.5) * sy - 0.5],
    ])  # fmt: skip
    warped = cv2.warpAffine(canvas[0, 0].numpy(), matrix, (SIDE, SIDE), flags=cv2.INTER_CUBIC,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=0)  # fmt: skip
    return (warped > 0.35).astype(np.int8)


def test_rela_protocol_equals_a_rewrite_of_relas_mapper_and_evaluator(gres_release: tuple[Path, Path]) -> None:
    root, shards = gres_release
    size = 56
    model = ImageProbe(size)
    refs = {r["ref_id"]: r for r in json.loads((root / "grefcoco" / "grefs(unc).json").read_text())}
    instances = json.loads((root / "grefcoco" / "instances.json").read_text())
    anns = {a["id"]: a for a in instances["annotations"]}
    kinds = {type(anns[a]["segmentation"]["counts"]).__name__ if isinstance(anns[a]["segmentation"], dict)
             else "polygons" for r in refs.values() if r["split"] == "val" for a in r["ann_id"] if a != -1}  # fmt: skip
    assert kinds == {"str", "list", "polygons"}  # compressed RLE, uncompressed RLE and polygons are all scored
    samples = []
    for batch in build_loader(shards, "val", train=False, batch_size=8, image_size=size, loader="torch", workers=0):
        logits, no_target = model(batch["image"], batch["tokens"])
        for i, ref_id in enumerate(batch["ref_id"].tolist()):
            ref = refs[ref_id]
            height, width = batch["orig_size"][i].tolist()
            listed = [] if ref["ann_id"] == [-1] else [anns[a] for a in ref["ann_id"]]
            gt = _rela_target(listed, height, width)
            pred_nt = bool(torch.sigmoid(no_target[i]) > 0.5)  # argmax of ReLA's two classes
            samples.append((_rela_prediction(logits[i], height, width, size), gt, pred_nt, ref["ann_id"] == [-1]))
    want = rela_gres(*zip(*samples, strict=True))
    assert 0 < want["n_acc"] < 1 and 0 < want["t_acc"] < 1 and 0.05 < want["ciou"] < 0.95  # not a degenerate case
    read = dict(image_size=size, batch_size=5, loader="torch", workers=0)
    got = evaluate(model, str(shards), ["val"], **read, protocol="rela")["val"]
    assert got["protocol"] == "rela" and got["count"] == len(samples)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    original = evaluate(model, str(shards), ["val"], **read)["val"]
    assert original["protocol"] == "original" and original["ciou"] != got["ciou"]  # pixels weigh differently


def test_rela_protocol_needs_a_grefcoco_split(shards: Path) -> None:
    model = ImageProbe(56)
    with pytest.raises(UserError, match="gRefCOCO"):
        evaluate(model, str(shards), ["val"], image_size=56, batch_size=4, loader="torch", protocol="rela")


def test_a_calibrated_no_target_threshold_round_trips_through_the_export(
    gres_release: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--calibrate-no-target --save`` writes the gIoU-best threshold into the export; evaluating the export again
    gives that row of the curve, and the Segmenter (predict, the page and serve go through it) decides with it."""
    from dcris.cli import main as cli_main
    from dcris.export import CONFIG_FILE, save_export
    from dcris.model import build_model
    from dcris.segmenter import Segmenter

    _, shards = gres_release
    torch.manual_seed(2)
    cfg = preset("tiny-dcris")
    cfg.model.head.no_target = True
    model = build_model(cfg.model, pretrained=False)
    torch.nn.init.normal_(model.head.no_target.fc2.weight, std=0.3)  # "no object" probabilities spread out
    export = save_export(model.state_dict(), cfg, tmp_path / "export")
    assert json.loads((export / CONFIG_FILE).read_text())["config"]["model"]["head"]["no_target_threshold"] == 0.5
    argv = ["eval", "--weights", str(export), "--shards", str(shards), "--loader", "torch", "--workers", "0"]
    assert cli_main([*argv, "--calibrate-no-target", "--save", "--out", str(tmp_path / "calibration.json")]) == 0
    out = capsys.readouterr().out
    curve = json.loads((tmp_path / "calibration.json").read_text())["val"]["no_target_curve"]
    best = max(curve, key=lambda r: (r["giou"], r["ciou"], -abs(r["threshold"] - 0.5)))
    assert len({r["n_acc"] for r in curve}) > 2 and len({r["giou"] for r in curve}) > 2  # a curve, not a point
    assert f"best gIoU at threshold {best['threshold']:.2f}" in out and "<- best gIoU" in out
    assert Image.open(tmp_path / "no_target_curve_val.png").size[0] > 100
    recorded = json.loads((export / CONFIG_FILE).read_text())["config"]["model"]["head"]["no_target_threshold"]
    assert recorded == best["threshold"]
    assert cli_main([*argv, "--out", str(tmp_path / "again.json")]) == 0
    again = json.loads((tmp_path / "again.json").read_text())["val"]
    for key in ("giou", "ciou", "n_acc", "t_acc", "prec@0.7", "prec@0.8", "prec@0.9"):
        assert again[key] == best[key], key  # the saved threshold reproduces the reported point
    segmenter = Segmenter.from_pretrained(export)
    assert segmenter.model.cfg.head.no_target_threshold == best["threshold"]
    image, phrases = Image.new("RGB", (90, 70), (200, 30, 30)), [f"the {w} shape" for w in ("red", "blue", "big")]
    with torch.no_grad():
        tokens = segmenter.tokens(phrases, True)[0]
        pixels = segmenter.prepare(image, phrases)[1]
        _, no_target = segmenter.model(pixels.expand(len(phrases), -1, -1, -1), tokens)
    results = segmenter(image, phrases)
    decided = [bool(p <= best["threshold"]) for p in torch.sigmoid(no_target).tolist()]
    assert [r.found for r in results] == decided
    assert all(not r.mask.any() for r in results if not r.found)
