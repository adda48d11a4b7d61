"""Data pipeline: synthetic release -> pack -> both loaders, letterbox geometry, tokenizer, bad input."""

from __future__ import annotations

import io
import json
import pickle
import random
import shutil
import tarfile
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from released_geometry import natural_image, object_mask, released_image, released_mask, released_matrices

from dcris.data import build_loader, dali_available, num_samples, pack
from dcris.data.letterbox import (
    CLIP_STD,
    forward_affine,
    inverse_affine,
    letterbox_mask,
    normalize_image,
    unletterbox,
    warp_affine,
)
from dcris.data.synth import make_synthetic_release
from dcris.data.torch_loader import decode_sample
from dcris.tokenizer import BPE_CACHE_WORDS, BoundedCache, TextTooLongError, _bpe, tokenize, truncations

LOADERS = ["torch", pytest.param("dali", marks=pytest.mark.skipif(not dali_available(), reason="no DALI"))]
SIZE = 112  # a small canvas keeps the tests fast; the geometry does not depend on it
STEP = 1 / (255 * min(CLIP_STD))  # one uint8 level of the image, in normalised units
# Landscape and portrait downscaling, odd sizes, upscaling, an extreme aspect ratio, a tiny image.
NATURAL_SIZES = [(480, 640), (640, 427), (333, 501), (150, 97), (97, 1000), (7, 5)]


def _pack(release: Path, out: Path, *extra: str) -> int:
    images = str(release / "images")
    argv = ["--refer", str(release), "--dataset", "synthetic", "--split-by", "unc", "--images", images]
    return pack.main([*argv, "--out", str(out), "--shard-size", "7", "--workers", "2", *extra])


@pytest.fixture(scope="session")
def refs(release: Path) -> dict[int, dict]:
    return {r["ref_id"]: r for r in pickle.loads((release / "synthetic" / "refs(unc).p").read_bytes())}


@pytest.fixture(scope="session")
def shards(release: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    assert _pack(release, out) == 0
    return out / "synthetic"


def _eval_items(shards: Path, loader: str, rank: int = 0, world_size: int = 1, split: str = "val") -> list[dict]:
    batches = build_loader(
        shards,
        split,
        train=False,
        batch_size=5,
        image_size=SIZE,
        rank=rank,
        world_size=world_size,
        loader=loader,
        workers=2,
    )
    return list(batches)


def _original_mask(release: Path, ref: dict) -> np.ndarray:
    instances = json.loads((release / "synthetic" / "instances.json").read_text())
    ann = next(a for a in instances["annotations"] if a["id"] == ref["ann_id"])
    image = next(i for i in instances["images"] if i["id"] == ref["image_id"])
    rle = mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], image["height"], image["width"]))
    return mask_utils.decode(rle)


def test_synthetic_release_is_deterministic_and_resolvable(release: Path, tmp_path: Path, refs: dict) -> None:
    again = make_synthetic_release(tmp_path, images=24, seed=3)
    assert (again / "synthetic" / "refs(unc).p").read_bytes() == (release / "synthetic" / "refs(unc).p").read_bytes()
    instances = json.loads((release / "synthetic" / "instances.json").read_text())
    sizes = {(i["height"], i["width"]) for i in instances["images"]}
    assert any(h > w for h, w in sizes) and any(w > h for h, w in sizes)
    assert {r["split"] for r in refs.values()} == {"train", "val", "testA", "testB"}
    # Within an image, no two refs share a sentence: each expression names one object.
    by_image: dict[int, list[str]] = {}
    for r in refs.values():
        by_image.setdefault(r["image_id"], []).extend(s["sent"] for s in r["sentences"])
    assert all(len(v) == len(set(v)) for v in by_image.values())


def test_manifest_counts_match_the_release(shards: Path, refs: dict) -> None:
    manifest = json.loads((shards / "manifest.json").read_text())
    for split, info in manifest["splits"].items():
        expected = [r for r in refs.values() if r["split"] == split]
        assert info["objects"] == len(expected) == sum(s["samples"] for s in info["shards"])
        assert info["sentences"] == sum(len(r["sentences"]) for r in expected)
        assert info["skipped"] == []
        for s in info["shards"]:
            assert (shards / s["tar"]).is_file() and (shards / s["idx"]).read_text().startswith("v1.2")
    assert num_samples(shards, "train", train=True) == manifest["splits"]["train"]["objects"]
    assert num_samples(shards, "val", train=False) == manifest["splits"]["val"]["sentences"]


def test_shard_layout_and_sample_format(shards: Path, release: Path, refs: dict) -> None:
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["splits"].keys() == {"train", "val", "testA", "testB"}
    instances = json.loads((release / "synthetic" / "instances.json").read_text())
    images = {i["id"]: i for i in instances["images"]}
    for split, info in manifest["splits"].items():
        assert {"objects", "sentences", "shards", "skipped"} <= info.keys()
        assert (shards / split / "000000.tar").is_file() and (shards / split / "000000.idx").is_file()
        for k, s in enumerate(info["shards"]):
            assert s["tar"] == f"{split}/{k:06d}.tar" and s["idx"] == f"{split}/{k:06d}.idx"  # relative to OUT/NAME
            assert len(s["sha256"]) == 64
    with tarfile.open(shards / "val" / "000000.tar") as tar:
        members = {}
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            members.setdefault(key, {})[ext] = tar.extractfile(member).read()
    assert len(members) == manifest["splits"]["val"]["shards"][0]["samples"]
    for sample in members.values():
        assert {"jpg", "mask.png", "tokens.npy", "json"} <= sample.keys()
        info = json.loads(sample["json"])
        ref = refs[info["ref_id"]]
        image = images[info["image_id"]]
        assert all(info[k] == ref[k] for k in ("ann_id", "image_id", "category_id"))
        assert all(info[k] == image[k] for k in ("file_name", "height", "width"))
        assert info["sentences"] == [s["sent"] for s in ref["sentences"]]
        assert sample["jpg"] == (release / "images" / info["file_name"]).read_bytes()  # not re-encoded
        with Image.open(io.BytesIO(sample["mask.png"])) as mask:
            assert mask.mode == "L" and mask.size == (info["width"], info["height"])
            assert set(np.unique(np.asarray(mask)).tolist()) <= {0, 255}
        tokens = np.load(io.BytesIO(sample["tokens.npy"]), allow_pickle=False)
        assert tokens.dtype == np.int32 and tokens.shape == (len(info["sentences"]), 17)
        assert np.array_equal(tokens, tokenize(info["sentences"]).numpy())


def test_tokenize_matches_open_clip_and_truncates() -> None:
    rng = random.Random(0)
    words = ["the", "small", "red", "circle", "on", "left", "man", "in", "shirt", "zebra", "(far)", "Giraffe's"]
    texts = [" ".join(rng.choices(words, k=rng.randint(1, 25))) for _ in range(20)]
    ours = tokenize(texts)
    assert ours.shape == (20, 17) and ours.dtype == torch.long
    assert torch.equal(ours, open_clip.get_tokenizer("ViT-B-16")(texts, context_length=17))
    eot = ours.argmax(dim=1)  # the end token has the largest id
    assert (ours[torch.arange(20), eot] == 49407).all() and (ours[:, 0] == 49406).all()
    long_text = next(t for t in texts if len(t.split()) > 15)
    with pytest.raises(TextTooLongError) as error:
        tokenize([texts[0], long_text], truncate=False)
    assert str(error.value).startswith("text too long: ") and long_text in str(error.value)


def test_the_bpe_cache_is_a_bounded_lru_that_changes_no_token() -> None:
    """Past its size the cache forgets the least recently used words and keeps the special tokens; the ids of
    texts that pass through a full cache are open_clip's own (its cache unbounded)."""
    cache = BoundedCache({"<start_of_text>": "<start_of_text>"}, 3)
    for word in "abc":
        cache[word] = word.upper()
    assert cache["a"] == "A"  # now the most recently used
    cache["d"] = "D"
    assert list(cache) == ["c", "a", "d"] and "b" not in cache and "<start_of_text>" in cache
    rng = random.Random(2)
    letters = "abcdefghijklmnopqrstuvwxyz"
    texts = [" ".join("".join(rng.choices(letters, k=rng.randint(3, 8))) for _ in range(6)) for _ in range(2000)]
    texts += ["the <start_of_text> man on the left", "a <end_of_text> dog"]
    ours = tokenize(texts)
    assert len(_bpe().cache) <= BPE_CACHE_WORDS
    assert torch.equal(ours, open_clip.get_tokenizer("ViT-B-16")(texts, context_length=17))


def test_truncations_report_what_tokenize_cuts() -> None:
    rng = random.Random(4)
    words = ["the", "small", "red", "circle", "on", "left", "man", "in", "shirt", "zebra", "next", "to", "giraffe"]
    texts = [" ".join(rng.choices(words, k=rng.randint(1, 25))) for _ in range(30)]
    needed = (open_clip.get_tokenizer("ViT-B-16")(texts, context_length=77) != 0).sum(dim=1).tolist()
    cuts = truncations(texts, 17)
    assert [c.index for c in cuts] == [i for i, n in enumerate(needed) if n > 17] and cuts
    for cut in cuts:
        assert cut.text == texts[cut.index] and cut.tokens_needed == needed[cut.index]
        assert torch.equal(tokenize([cut.kept])[0], tokenize([cut.text])[0])  # the kept words are what is read
    assert truncations(texts, 77) == []


def test_predict_cuts_a_long_phrase_with_one_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dcris.cli import main as cli_main
    from dcris.config import preset
    from dcris.export import save_export
    from dcris.model import build_model

    cfg = preset("tiny-dcris")
    weights = save_export(build_model(cfg.model, pretrained=False).state_dict(), cfg, tmp_path / "m")
    image = tmp_path / "image.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(image)
    long_text = "the small red circle on the left next to the big blue square below the green triangle"
    argv = ["predict", "--weights", str(weights), "--image", str(image), "--text", long_text]
    argv += ["--out", str(tmp_path / "a.png"), "--image", str(image), "--text", "the red circle"]
    capsys.readouterr()
    assert cli_main([*argv, "--out", str(tmp_path / "b.png")]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, warnings
    assert repr(long_text) in warnings[0] and "needs 19 tokens, the model reads 17" in warnings[0]
    assert all((tmp_path / name).is_file() for name in ("a.png", "a_mask.png", "b.png", "b_mask.png"))


def test_letterbox_matrices_are_the_released_ones() -> None:
    rng = np.random.default_rng(1)
    for _ in range(300):
        h, w, size = (int(v) for v in rng.integers([1, 1, 8], [2000, 2000, 1000]))
        forward, inverse = forward_affine(h, w, size), inverse_affine(h, w, size)
        mat, mat_inv = released_matrices(h, w, size)  # cv2.getAffineTransform, solved as a 6x6 system
        assert np.array_equal(forward, mat)
        np.testing.assert_allclose(inverse, mat_inv, rtol=1e-13, atol=1e-11)
        # From the formula: unrounded scale, the image centred, the longer side filling the canvas.
        scale = min(size / h, size / w)  # the corners are float32: exact to about 1e-4 pixel on the canvas
        np.testing.assert_allclose([forward[0, 0] * w, forward[1, 1] * h], [w * scale, h * scale], atol=2e-4)
        np.testing.assert_allclose(forward @ [w / 2, h / 2, 1.0], [size / 2, size / 2], atol=1e-4)
        span = forward @ [w, h, 1.0] - forward @ [0, 0, 1.0]
        assert max(span) == pytest.approx(size, abs=1e-4)
        point = np.array([rng.uniform(0, w), rng.uniform(0, h), 1.0])
        np.testing.assert_allclose(inverse @ np.append(forward @ point, 1.0), point[:2], atol=1e-9)


@pytest.mark.parametrize(("height", "width", "size"), [(97, 130, 448), (640, 427, 448), (33, 1000, 112), (5, 7, 64)])
def test_warp_affine_is_opencv_4(height: int, width: int, size: int) -> None:
    rng = np.random.default_rng(height)
    forward, inverse = released_matrices(height, width, size)  # cv2's own matrices
    border = (0.25, -0.5, 1.5)
    directions = ((forward, (height, width), (size, size)), (inverse, (size, size), (height, width)))
    for matrix, (in_h, in_w), (out_h, out_w) in directions:
        src = rng.uniform(-1, 2, size=(in_h, in_w, 3)).astype(np.float32)  # noise: every sampling slip shows
        for interpolation, flag in (("cubic", cv2.INTER_CUBIC), ("linear", cv2.INTER_LINEAR)):
            expected = cv2.warpAffine(src, matrix, (out_w, out_h), flags=flag, borderValue=border)
            ours = warp_affine(torch.from_numpy(src).permute(2, 0, 1), matrix, (out_h, out_w), interpolation, border)
            np.testing.assert_allclose(ours.permute(1, 2, 0).numpy(), expected, rtol=0, atol=2e-6)


def _encode(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def natural_samples() -> list[tuple[bytes, bytes]]:
    """JPEG images and PNG masks of natural-looking pictures, one per size of NATURAL_SIZES."""
    rng = np.random.default_rng(4)
    return [
        (_encode(natural_image(rng, h, w), "JPEG"), _encode(object_mask(rng, h, w) * 255, "PNG"))
        for h, w in NATURAL_SIZES
    ]


def _torch_letterbox(samples: list[tuple[bytes, bytes]], size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    tokens = io.BytesIO()
    np.save(tokens, np.ones((1, 17), dtype=np.int32))
    out = []
    for jpeg, png in samples:
        raw = {"jpg": jpeg, "mask.png": png, "tokens.npy": tokens.getvalue(), "meta": bytes(56)}
        item = decode_sample(raw, size, 17, keep_orig=False)
        out.append((normalize_image(item["image"].permute(2, 0, 1)).numpy(), item["mask"][0].numpy()))
    return out


def _dali_letterbox(
    samples: list[tuple[bytes, bytes]], size: int, gpu: bool = False
) -> list[tuple[np.ndarray, np.ndarray]]:
    import nvidia.dali.fn as fn
    from nvidia.dali import pipeline_def

    from dcris.data.dali_loader import letterbox_nodes

    @pipeline_def(batch_size=len(samples), num_threads=1, device_id=0 if gpu else None)
    def pipeline():  # one batch holding every size: the graph is per sample
        jpeg = fn.external_source(source=lambda: [np.frombuffer(j, np.uint8) for j, _ in samples], batch=True)
        png = fn.external_source(source=lambda: [np.frombuffer(p, np.uint8) for _, p in samples], batch=True)
        image, mask, _ = letterbox_nodes(jpeg, png, size, gpu=gpu)
        return image, mask

    pipe = pipeline()
    pipe.build()
    images, masks = (out.as_cpu() if gpu else out for out in pipe.run())
    return [(np.asarray(images[i]), np.asarray(masks[i])[0]) for i in range(len(samples))]


# mean and max |ours - OpenCV| over each image (normalised units) and mask; DALI samples at exact positions,
# OpenCV 4 at 1/32 pixel; the torch warps sample as OpenCV and differ only in OpenCV's fixed-point rounding.
LETTERBOX_BOUNDS = {
    "torch": dict(image_mean=1e-4, image_max=1.001 * STEP, mask_mean=1e-7, mask_max=1e-6),
    "dali": dict(image_mean=0.007, image_max=4.001 * STEP, mask_mean=0.003, mask_max=8.001 / 255),
}


DALI_GPU = pytest.param(
    "dali-gpu",
    marks=[pytest.mark.gpu, pytest.mark.skipif(not (dali_available() and torch.cuda.is_available()), reason="GPU")],
)


@pytest.mark.parametrize("loader", [*LOADERS, DALI_GPU])
def test_letterbox_matches_the_released_preprocessing(natural_samples: list, loader: str) -> None:
    size = 448
    if loader == "torch":
        ours = _torch_letterbox(natural_samples, size)
    else:  # nvJPEG decodes on the GPU, the warp runs there too
        ours = _dali_letterbox(natural_samples, size, gpu=loader == "dali-gpu")
    bounds = LETTERBOX_BOUNDS[loader.removesuffix("-gpu")]
    for (jpeg, png), (image, mask) in zip(natural_samples, ours, strict=True):
        # The released code's own reading: cv2.imdecode, BGR -> RGB; masks 0/255 -> {0, 1}.
        rgb = cv2.cvtColor(cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        truth = (cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_GRAYSCALE) > 127).astype(np.uint8)
        image_diff = np.abs(image - released_image(rgb, size))
        mask_diff = np.abs(mask - released_mask(truth, size))
        figures = (rgb.shape[:2], image_diff.mean(), image_diff.max(), mask_diff.mean(), mask_diff.max())
        print(f"{loader} letterbox vs OpenCV, {figures[0]}: image mean {figures[1]:.2e} max {figures[2]:.4f}, "
              f"mask mean {figures[3]:.2e} max {figures[4]:.4f}")  # fmt: skip
        assert image.shape == (3, size, size) and mask.shape == (size, size)
        assert image_diff.mean() <= bounds["image_mean"] and image_diff.max() <= bounds["image_max"], figures
        assert mask_diff.mean() <= bounds["mask_mean"] and mask_diff.max() <= bounds["mask_max"], figures


@pytest.mark.parametrize("loader", LOADERS)
def test_eval_batches_match_the_release(shards: Path, release: Path, refs: dict, loader: str) -> None:
    batches = _eval_items(shards, loader)
    pairs = [(int(r), int(s)) for b in batches for r, s in zip(b["ref_id"], b["sent_idx"], strict=True)]
    val = [r for r in refs.values() if r["split"] == "val"]
    assert sorted(pairs) == sorted((r["ref_id"], k) for r in val for k in range(len(r["sentences"])))
    assert len(batches) == len(build_loader(shards, "val", train=False, batch_size=5, loader=loader))
    b = batches[0]
    assert b["image"].shape == (5, 3, SIZE, SIZE) and b["image"].dtype == torch.float32
    assert b["mask"].shape == (5, 1, SIZE, SIZE) and 0 <= b["mask"].min() and b["mask"].max() <= 1
    rng = np.random.default_rng(2)
    for batch in batches:
        for i, (ref_id, k) in enumerate(zip(batch["ref_id"].tolist(), batch["sent_idx"].tolist(), strict=True)):
            ref = refs[ref_id]
            assert torch.equal(batch["tokens"][i], tokenize([ref["sentences"][k]["sent"]])[0])
            original = _original_mask(release, ref)
            assert np.array_equal(batch["orig_mask"][i], original)
            assert tuple(batch["orig_size"][i].tolist()) == original.shape
            _check_mask_geometry(batch["mask"][i, 0].numpy(), original, rng)


def _check_mask_geometry(canvas_mask: np.ndarray, original: np.ndarray, rng: np.random.Generator) -> None:
    """Canvas pixels that are clearly in / out of the mask map back (inverse affine) to in / out originals."""
    h, w = original.shape
    inverse = inverse_affine(h, w, canvas_mask.shape[0])
    for wanted, where in ((1, canvas_mask > 0.99), (0, canvas_mask < 0.01)):
        ys, xs = np.nonzero(where)
        pick = rng.choice(len(ys), size=min(40, len(ys)), replace=False)
        centres = np.stack([xs[pick], ys[pick], np.ones(len(pick))])  # (3, n): pixel centres at integers
        ox, oy = inverse @ centres  # original coordinates, pixel centres at integers
        col, row = np.floor(ox + 0.5).astype(int), np.floor(oy + 0.5).astype(int)  # the nearest original pixel
        inside = (col >= 0) & (col < w) & (row >= 0) & (row < h)
        assert wanted == 0 or inside.all()  # the mask never shows on the border
        assert (original[row[inside], col[inside]] == wanted).all()
    # The inverse warp of evaluation recovers the original mask.
    back = unletterbox(torch.from_numpy(canvas_mask), h, w).numpy() > 0.5
    iou = (back & (original > 0)).sum() / (back | (original > 0)).sum()
    assert iou > 0.85


@pytest.mark.skipif(not dali_available(), reason="no DALI")
def test_dali_and_torch_give_the_same_batches(shards: Path) -> None:
    for ours, ref in zip(
        _eval_items(shards, "dali", split="testA"), _eval_items(shards, "torch", split="testA"), strict=True
    ):
        for key in ("ref_id", "sent_idx", "tokens", "orig_size"):
            assert torch.equal(ours[key], ref[key]), key
        assert all(np.array_equal(a, b) for a, b in zip(ours["orig_mask"], ref["orig_mask"], strict=True))
        # DALI samples at exact positions, the torch loader at OpenCV's 1/32 pixel
        image_diff, mask_diff = (ours["image"] - ref["image"]).abs(), (ours["mask"] - ref["mask"]).abs()
        print(f"DALI vs torch: image mean {image_diff.mean():.2e} max {image_diff.max():.4f}, "
              f"mask mean {mask_diff.mean():.2e} max {mask_diff.max():.4f}")  # fmt: skip
        assert image_diff.mean() < 1e-3 and image_diff.max() <= 4.001 * STEP, (image_diff.mean(), image_diff.max())
        assert mask_diff.mean() < 1e-4 and mask_diff.max() <= 6.001 / 255, (mask_diff.mean(), mask_diff.max())
    for rank in range(2):  # both loaders give each rank the same samples
        ranks = [
            {int(r) for b in _eval_items(shards, kind, rank, 2) for r in b["ref_id"]} for kind in ("dali", "torch")
        ]
        assert ranks[0] == ranks[1]


@pytest.mark.parametrize("loader", LOADERS)
def test_ranks_split_evaluation_exactly(shards: Path, loader: str) -> None:
    seen = [
        {
            (int(r), int(s))
            for b in _eval_items(shards, loader, rank, 3)
            for r, s in zip(b["ref_id"], b["sent_idx"], strict=True)
        }
        for rank in range(3)
    ]
    whole = {
        (int(r), int(s)) for b in _eval_items(shards, loader) for r, s in zip(b["ref_id"], b["sent_idx"], strict=True)
    }
    assert sum(len(s) for s in seen) == len(whole) == num_samples(shards, "val", train=False)
    assert set.union(*seen) == whole


@pytest.mark.parametrize("loader", LOADERS)
def test_training_batches(shards: Path, release: Path, refs: dict, loader: str) -> None:
    def epoch(rank: int, number: int) -> dict[int, torch.Tensor]:
        batches = build_loader(
            shards,
            "train",
            train=True,
            batch_size=4,
            image_size=SIZE,
            rank=rank,
            world_size=2,
            loader=loader,
            seed=5,
            epoch=number,
            workers=2,
            shuffle_buffer=16,
        )
        out = list(batches)
        assert len(out) == len(batches) == (num_samples(shards, "train", train=True) // 2) // 4
        assert all(b["image"].shape == (4, 3, SIZE, SIZE) and b["tokens"].shape == (4, 17) for b in out)
        for b in out:  # each mask is its own object's (after the shuffles), letterboxed
            for ref_id, mask in zip(b["ref_id"].tolist(), b["mask"][:, 0].numpy(), strict=True):
                # resamplers may differ by a few grey levels; another object's mask would differ by 1 somewhere
                assert np.abs(mask - letterbox_mask(_original_mask(release, refs[ref_id]), SIZE)).max() < 0.05
        return {int(r): t for b in out for r, t in zip(b["ref_id"], b["tokens"], strict=True)}

    first, second = epoch(0, 0), epoch(1, 0)
    assert not first.keys() & second.keys()  # ranks read disjoint objects
    again = epoch(0, 0)
    assert again.keys() == first.keys()  # the same epoch reads the same objects again (what resuming needs)
    assert all(torch.equal(again[r], first[r]) for r in first.keys())  # seeded sentence choice
    for ref_id, tokens in first.items():
        assert any(torch.equal(tokens, t) for t in tokenize([s["sent"] for s in refs[ref_id]["sentences"]]))
    later = epoch(0, 1), epoch(1, 1)  # the next epoch cuts the shuffled shards differently, still disjoint
    assert not later[0].keys() & later[1].keys() and later[0].keys() != first.keys()


def _shard_sentences(shards: Path, split: str) -> Counter:
    """(ref_id, token row) of every sentence of every sample of a split, read from the tars with tarfile."""
    pairs: Counter = Counter()
    for shard in json.loads((shards / "manifest.json").read_text())["splits"][split]["shards"]:
        samples: dict[str, dict[str, bytes]] = {}
        with tarfile.open(shards / shard["tar"]) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
        for fields in samples.values():
            ref_id = json.loads(fields["json"])["ref_id"]
            pairs.update((ref_id, tuple(row)) for row in np.load(io.BytesIO(fields["tokens.npy"])).tolist())
    return pairs


@pytest.mark.parametrize("loader", LOADERS)
def test_sentence_sampling_visits_every_pair_once_an_epoch(shards: Path, loader: str) -> None:
    expected = _shard_sentences(shards, "train")
    assert sum(expected.values()) > len(_shard_of_each_object(shards, "train"))  # objects of several sentences

    def visited(world_size: int, batch_size: int, epoch: int) -> tuple[Counter, list[int]]:
        pairs: Counter = Counter()
        lengths = []
        for rank in range(world_size):
            ld = build_loader(
                shards, "train", train=True, batch_size=batch_size, image_size=16, rank=rank, world_size=world_size,
                seed=2, epoch=epoch, workers=2 if loader == "torch" else 1, shuffle_buffer=16, loader=loader,
                sample="sentence",
            )  # fmt: skip
            out = list(ld)
            assert len(out) == len(ld) and all(len(b["ref_id"]) == batch_size for b in out)
            lengths.append(len(out))
            pairs.update(
                (int(r), tuple(t)) for b in out for r, t in zip(b["ref_id"], b["tokens"].tolist(), strict=True)
            )
        return pairs, lengths

    pairs, lengths = visited(2, 1, epoch=0)  # batches of one: no tail is dropped
    assert pairs == expected  # every (object, sentence) pair of the shards once, over both ranks
    total = sum(expected.values())
    assert lengths == [total // 2, total - total // 2]
    pairs, lengths = visited(2, 3, epoch=1)  # the epoch is the sentences', cut into full batches on every rank
    assert lengths == [(total // 2) // 3] * 2
    assert not pairs - expected and total - pairs.total() < 2 * 3 + 1  # none twice; only the ranks' tails left


@pytest.mark.parametrize("sample", ["object", "sentence"])
@pytest.mark.parametrize("loader", LOADERS)
def test_a_resumed_epoch_starts_mid_way_without_decoding_what_it_skips(
    shards: Path, loader: str, sample: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dcris.data import dali_loader, torch_loader

    def batches(start: int, workers: int) -> list[dict]:
        ld = build_loader(
            shards, "train", train=True, batch_size=2, image_size=16, seed=3, epoch=1, workers=workers,
            shuffle_buffer=8, loader=loader, start_batch=start, sample=sample,
        )  # fmt: skip
        out = list(ld)
        assert len(out) == len(ld) == ld.epoch_batches() - start
        return out

    workers = 2 if loader == "torch" else 1  # torch: skipping whole rounds of the two workers, then the rest
    whole = batches(0, workers)
    for start in (1, 3, len(whole) // 2 + 1, len(whole) - 1):
        rest = batches(start, workers)
        for fresh, resumed in zip(whole[start:], rest, strict=True):
            assert all(torch.equal(fresh[k], resumed[k]) for k in ("image", "tokens", "mask", "ref_id"))
    decoded = []  # samples decoded (torch, in this process) or handed to the pipeline (DALI)
    if loader == "torch":
        decode = torch_loader.decode_sample
        monkeypatch.setattr(
            torch_loader, "decode_sample", lambda sample, *a, **k: decoded.append(1) or decode(sample, *a, **k)
        )
    else:
        encoded = dali_loader.SplitData.encoded
        monkeypatch.setattr(
            dali_loader.SplitData, "encoded", lambda self, p: decoded.append(len(p)) or encoded(self, p)
        )
    assert len(batches(len(whole) - 2, 0 if loader == "torch" else 1)) == 2
    # torch: exactly the two batches' samples; DALI also reads ahead up to prefetch_depth=2 batches (of the next epoch)
    assert sum(decoded) == 4 if loader == "torch" else 4 <= sum(decoded) <= 8


def _shard_of_each_object(shards: Path, split: str) -> dict[int, int]:
    """ref_id -> position of its shard in the manifest, read with tarfile."""
    where = {}
    for k, shard in enumerate(json.loads((shards / "manifest.json").read_text())["splits"][split]["shards"]):
        with tarfile.open(shards / shard["tar"]) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    where[json.loads(tar.extractfile(member).read())["ref_id"]] = k
    return where


@pytest.mark.skipif(not dali_available(), reason="no DALI")
def test_dali_shard_order_follows_seed_and_epoch(shards: Path) -> None:
    shard_of = _shard_of_each_object(shards, "train")
    num_shards = len(set(shard_of.values()))

    def read(seed: int, epoch: int, buffer: int, rank: int = 0, world: int = 1, loader: str = "dali") -> list[int]:
        batches = build_loader(
            shards, "train", train=True, batch_size=1, image_size=16, rank=rank, world_size=world, seed=seed,
            epoch=epoch, shuffle_buffer=buffer, loader=loader, workers=1 if loader == "dali" else 0,
        )  # fmt: skip
        return [int(b["ref_id"][0]) for b in batches]

    orders = {}
    for seed, epoch in ((0, 0), (0, 1), (1, 0)):
        # a one-sample buffer keeps the file order: whole shards, in the permutation drawn from (seed, epoch)
        order = read(seed, epoch, 1)
        assert sorted(order) == sorted(shard_of)  # one rank, batches of one: every object once
        shard_sequence = [shard_of[r] for k, r in enumerate(order) if k == 0 or shard_of[order[k - 1]] != shard_of[r]]
        assert shard_sequence == np.random.default_rng((seed, epoch)).permutation(num_shards).tolist()
        orders[seed, epoch] = shard_sequence
    assert len({tuple(o) for o in orders.values()}) == 3  # another epoch or seed: another shard order
    assert read(5, 3, 16) == read(5, 3, 16)  # the same epoch again (a resumed run): the same order, buffer and all
    for rank in range(2):  # both loaders cut the shuffled shards into the same rank ranges
        assert set(read(2, 1, 16, rank, 2)) == set(read(2, 1, 16, rank, 2, "torch"))


def test_torch_workers_read_only_their_share(shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dcris.data import torch_loader

    manifest = json.loads((shards / "manifest.json").read_text())["splits"]["train"]
    total = manifest["objects"]
    reads: list[tuple[int, str, int]] = []  # (worker, tar, sample number in the tar)
    worker = [0]
    read_samples = torch_loader.read_samples

    def recording(tar: str, index: list, lo: int, hi: int):  # noqa: ANN202
        reads.extend((worker[0], tar, k) for k in range(lo, hi))
        yield from read_samples(tar, index, lo, hi)

    monkeypatch.setattr(torch_loader, "read_samples", recording)
    for train in (False, True):
        reads.clear()
        ld = build_loader(
            shards, "train", train=train, batch_size=3, image_size=16, rank=1, world_size=2, seed=4, loader="torch"
        )
        yielded = []
        for worker[0] in range(3):  # the three DataLoader workers, run one after the other in this process
            info = SimpleNamespace(id=worker[0], num_workers=3)
            monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda info=info: info)
            yielded += [int(r) for part in torch_loader._RankParts(ld, [0, 0, 0]) for r in part["meta"][:, 1]]
        read_once = {(tar, k) for _, tar, k in reads}
        assert len(reads) == len(read_once) == total - total // 2  # every sample of rank 1's range read once
        assert sorted(yielded) == sorted(set(yielded)) and len(yielded) == total - total // 2
    # evaluation with real worker processes: rank 1's range, every sentence, in the packed order
    objects = []
    for shard in manifest["shards"]:
        with tarfile.open(shards / shard["tar"]) as tar:
            infos = [json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")]
        objects += [(info["ref_id"], len(info["sentences"])) for info in infos]
    expected = [(r, k) for r, n in objects[total // 2 :] for k in range(n)]
    monkeypatch.undo()
    batches = build_loader(
        shards, "train", train=False, batch_size=3, image_size=16, rank=1, world_size=2, loader="torch", workers=2
    )
    got = [(int(r), int(k)) for b in batches for r, k in zip(b["ref_id"], b["sent_idx"], strict=True)]
    assert got == expected


def _corrupt_release(release: Path, tmp_path: Path) -> tuple[Path, dict[int, str]]:
    """A copy with a truncated JPEG, a missing JPEG, an empty sentence list and a mask-less annotation."""
    bad = tmp_path / "bad"
    shutil.copytree(release, bad)
    refs_path = bad / "synthetic" / "refs(unc).p"
    refs = pickle.loads(refs_path.read_bytes())
    instances = json.loads((bad / "synthetic" / "instances.json").read_text())
    files = {i["id"]: i["file_name"] for i in instances["images"]}
    rng = random.Random(7)
    by_image: dict[int, list[dict]] = {}
    for r in refs:
        by_image.setdefault(r["image_id"], []).append(r)
    corrupt_image, missing_image = rng.sample(sorted(by_image), 2)
    jpeg = bad / "images" / files[corrupt_image]
    jpeg.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])
    (bad / "images" / files[missing_image]).unlink()
    others = [r for r in refs if r["image_id"] not in (corrupt_image, missing_image)]
    no_sentences, no_mask = rng.sample(others, 2)
    no_sentences["sentences"] = []
    next(a for a in instances["annotations"] if a["id"] == no_mask["ann_id"])["segmentation"] = []
    refs_path.write_bytes(pickle.dumps(refs))
    (bad / "synthetic" / "instances.json").write_text(json.dumps(instances))
    reasons = {r["ref_id"]: "image corrupt" for r in by_image[corrupt_image]}
    reasons |= {r["ref_id"]: "image missing" for r in by_image[missing_image]}
    reasons |= {no_sentences["ref_id"]: "no sentences", no_mask["ref_id"]: "no mask"}
    return bad, reasons


def test_bad_samples_are_counted_and_skipped(release: Path, refs: dict, tmp_path: Path, capsys) -> None:
    bad, reasons = _corrupt_release(release, tmp_path)
    assert _pack(bad, tmp_path / "out") == 0
    manifest = json.loads((tmp_path / "out" / "synthetic" / "manifest.json").read_text())
    skipped = {s["ref_id"]: s["reason"] for info in manifest["splits"].values() for s in info["skipped"]}
    assert skipped.keys() == reasons.keys()
    assert all(skipped[r].startswith(reason) for r, reason in reasons.items())
    for split, info in manifest["splits"].items():
        total = sum(r["split"] == split for r in refs.values())
        assert info["objects"] == total - len(info["skipped"])
    err = capsys.readouterr()
    for ref_id, reason in reasons.items():
        assert f"skipped ref {ref_id} " in err.out + err.err and reason in err.out + err.err


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("truncate_instances", "error: malformed annotation file"),
        ("truncate_refs", "error: malformed refs file"),
        ("no_images", "error: image folder not found"),
        ("unknown_split", "error: unknown split 'testC'"),
    ],
)
def test_bad_input_stops_before_work(release: Path, tmp_path: Path, capsys, breakage: str, message: str) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(release, bad)
    extra: list[str] = []
    if breakage == "truncate_instances":
        path = bad / "synthetic" / "instances.json"
        path.write_text(path.read_text()[:-100])
    elif breakage == "truncate_refs":
        path = bad / "synthetic" / "refs(unc).p"
        path.write_bytes(path.read_bytes()[:300])
    elif breakage == "no_images":
        shutil.rmtree(bad / "images")
    else:
        extra = ["--splits", "val", "testC"]
    with pytest.raises(SystemExit) as exit_info:
        _pack(bad, tmp_path / "out", *extra)
    assert str(exit_info.value.code).startswith(message)
    assert not (tmp_path / "out").exists()


def test_rerun_resumes_and_repairs(release: Path, shards: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    shutil.copytree(shards, out / "synthetic")
    manifest = json.loads((out / "synthetic" / "manifest.json").read_text())
    shard_count = sum(1 for _ in (out / "synthetic").glob("*/*.done.json"))
    damaged = out / "synthetic" / manifest["splits"]["train"]["shards"][1]["tar"]
    damaged.write_bytes(damaged.read_bytes()[:-1024])  # an interrupted copy: checksum no longer matches
    capsys.readouterr()
    assert _pack(release, out) == 0
    assert f"; {shard_count - 1} of {shard_count} shards were already complete)" in capsys.readouterr().out
    assert json.loads((out / "synthetic" / "manifest.json").read_text())["splits"].keys() == manifest["splits"].keys()
    items = [b for b in build_loader(out / "synthetic", "train", train=True, batch_size=4, loader="torch", workers=0)]
    assert len(items) == (manifest["splits"]["train"]["objects"] // 4)


def test_mix_drops_held_out_images(release: Path, tmp_path: Path) -> None:
    root = tmp_path / "refer"
    refs = pickle.loads((release / "synthetic" / "refs(unc).p").read_bytes())
    rng = random.Random(11)
    held_out: set[int] = set()
    train_refs = 0
    for name, split_by, splits in (
        ("refcoco", "unc", ("train", "val", "testA", "testB")),
        ("refcocog", "umd", ("train", "val", "test")),
    ):
        (root / name).mkdir(parents=True)
        shutil.copy(release / "synthetic" / "instances.json", root / name / "instances.json")
        # Each dataset splits the same images its own way, as RefCOCO and G-Ref do.
        by_image = {
            i: rng.choices(splits, weights=[6] + [1] * (len(splits) - 1))[0] for i in {r["image_id"] for r in refs}
        }
        mine = [dict(r, split=by_image[r["image_id"]]) for r in refs]
        (root / name / f"refs({split_by}).p").write_bytes(pickle.dumps(mine))
        held_out |= {r["image_id"] for r in mine if r["split"] != "train"}
        train_refs += sum(r["split"] == "train" for r in mine)
    kept = 2 * sum(1 for r in refs if r["image_id"] not in held_out)
    argv = ["--refer", str(root), "--mix", "refcoco,refcocog", "--images", str(release / "images")]
    assert pack.main([*argv, "--out", str(tmp_path / "out"), "--workers", "1"]) == 0
    manifest = json.loads((tmp_path / "out" / "mix" / "manifest.json").read_text())
    assert manifest["splits"].keys() == {"train"}
    assert manifest["splits"]["train"]["objects"] == kept
    assert manifest["splits"]["train"]["dropped"] == train_refs - kept > 0
