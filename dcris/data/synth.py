"""A small synthetic REFER release: coloured shapes and referring expressions that resolve them.

Writes REFER's own layout, so the real packer reads it unchanged::

    DIR/synthetic/instances.json   COCO-style images, annotations (polygons), categories
    DIR/synthetic/refs(unc).p      pickled list of refs with train/val/testA/testB splits
    DIR/images/*.jpg               images of varied, non-square sizes

Each image holds 2-4 circles, squares and triangles. Colours and sizes repeat on purpose, so an expression
needs colour, shape, size and position ("the small red circle on the left") to name one object. Everything
is drawn from one seeded generator: the same seed gives the same files.

With ``--gres`` it writes gRefCOCO's layout instead (the same images), ``DIR/synthetic_gres/grefs(unc).json``
and ``DIR/synthetic_gres/instances.json``: every ref lists its objects (``ann_id`` a list, ``category_id`` too)
and carries ``no_target``. Besides the phrases that name one object, each image gets phrases that name several
("all the red shapes", "all the circles", for every colour or shape seen at least twice) and one that names
nothing: a colour or a shape that is not in the image ("the yellow square", "the triangle"), ``ann_id == [-1]``.

Usage: ``python shards/synth.py --out DIR [--images N] [--seed S] [--gres]``
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dcris.data.refs import load_refs

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 200, 40)}
SHAPES = ("circle", "square", "triangle")  # category ids 1, 2, 3
SIZES = {"small": (0.10, 0.14), "big": (0.20, 0.26)}  # half-extent as a fraction of the shorter side
SPLITS = (("train", 0.7), ("val", 0.1), ("testA", 0.1), ("testB", 0.1))


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[float]:
    """Flat COCO polygon [x0, y0, x1, y1, ...] of a shape centred at (cx, cy) with half-extent r."""
    if shape == "circle":
        angles = [2 * math.pi * k / 24 for k in range(24)]
        points = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in angles]
    elif shape == "square":
        points = [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    else:
        points = [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    return [round(v, 2) for point in points for v in point]


def _place_objects(rng: random.Random, height: int, width: int) -> list[dict]:
    """2-4 non-overlapping objects with random colour, shape and size (repeats allowed)."""
    objects: list[dict] = []
    wanted = rng.randint(2, 4)
    for _ in range(200):  # rejection sampling; small canvases may fit fewer objects
        if len(objects) == wanted:
            break
        size = rng.choice(list(SIZES))
        r = rng.uniform(*SIZES[size]) * min(height, width)
        cx, cy = rng.uniform(r + 2, width - r - 2), rng.uniform(r + 2, height - r - 2)
        if all(math.hypot(cx - o["cx"], cy - o["cy"]) > r + o["r"] + 4 for o in objects):
            objects.append(
                dict(colour=rng.choice(list(COLOURS)), shape=rng.choice(SHAPES), size=size, cx=cx, cy=cy, r=r)
            )
    return objects


def _expressions(target: dict, objects: list[dict]) -> list[str]:
    """Every expression of the target, from short to long, that matches it and no other object."""
    found = []
    for attrs in (("shape",), ("colour", "shape"), ("size", "shape"), ("size", "colour", "shape")):
        same = [o for o in objects if all(o[a] == target[a] for a in attrs)]
        words = " ".join(target[a] for a in attrs)
        if len(same) == 1:
            found.append(f"the {words}")
        elif len(same) == 2:
            # Position resolves a pair: the one further left / right of the two.
            other = same[0] if same[1] is target else same[1]
            side = "left" if target["cx"] < other["cx"] else "right"
            found.append(f"the {words} on the {side}")
    return found


def _group_expressions(objects: list[dict], rng: random.Random) -> list[tuple[list[int], list[str]]]:
    """gRefCOCO-style phrases of an image: (indices of the objects named, phrases), several objects or none.

    Multi-target: every colour and every shape with at least two objects. No-target: one phrase set naming a
    colour or a shape absent from the image (both when both kinds are absent, one of each).
    """
    found: list[tuple[list[int], list[str]]] = []
    for attr, values in (("colour", list(COLOURS)), ("shape", list(SHAPES))):
        for value in values:
            members = [k for k, o in enumerate(objects) if o[attr] == value]
            if len(members) >= 2:
                words = [f"all the {value} shapes", f"the {value} ones"] if attr == "colour" else [f"all the {value}s"]
                found.append((members, words))
    absent_colours = [c for c in COLOURS if all(o["colour"] != c for o in objects)]
    absent_shapes = [s for s in SHAPES if all(o["shape"] != s for o in objects)]
    phrases = []
    if absent_colours:
        colour = rng.choice(absent_colours)
        phrases.append(f"the {colour} {rng.choice(SHAPES)}")
    if absent_shapes:
        shape = rng.choice(absent_shapes)
        phrases.append(f"the {shape}" if rng.random() < 0.5 else f"the {rng.choice(list(COLOURS))} {shape}")
    if phrases:
        found.append(([], phrases))
    return found


def _render(objects: list[dict], height: int, width: int, rng: random.Random) -> Image.Image:
    """Draw the objects on a soft random-gradient background."""
    base = np.array([rng.randint(150, 250) for _ in range(3)], dtype=np.float32)
    ramp = np.linspace(-25, 25, width, dtype=np.float32)[None, :, None]  # (1, W, 1)
    pixels = np.clip(base + ramp + np.zeros((height, 1, 1), dtype=np.float32), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    for o in objects:
        flat = _polygon(o["shape"], o["cx"], o["cy"], o["r"])
        draw.polygon(list(zip(flat[::2], flat[1::2], strict=True)), fill=COLOURS[o["colour"]])
    return image


def _sentences(texts: list[str], first_id: int) -> list[dict]:
    """REFER's sentence records of the phrases, numbered from ``first_id``."""
    return [
        dict(sent=text, raw=text.capitalize() + ".", tokens=text.split(), sent_id=first_id + k)
        for k, text in enumerate(texts)
    ]


def make_synthetic_release(
    out_dir: str | Path, images: int = 200, seed: int = 0, sizes: tuple[int, int] = (160, 320), gres: bool = False
) -> Path:
    """Write the synthetic release (layout in the module docstring).

    Args:
        out_dir: Root directory; ``synthetic/`` (``synthetic_gres/`` with ``gres``) and ``images/`` are created in it.
        images: Number of images.
        seed: Seed of every random choice.
        sizes: Range of each image side in pixels (COCO's photos are 427-640: ``(427, 640)``).
        gres: Write gRefCOCO's format, with multi-target and no-target phrases.

    Returns:
        The release root ``out_dir``.
    """
    from pycocotools import mask as mask_utils  # imported here: only the generator needs it

    root = Path(out_dir)
    name = "synthetic_gres" if gres else "synthetic"
    (root / name).mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    coco_images, annotations, refs = [], [], []
    sent_id = 0
    for image_id in range(1, images + 1):
        height, width = rng.randint(*sizes), rng.randint(*sizes)
        objects = _place_objects(rng, height, width)
        file_name = f"synthetic_{image_id:06d}.jpg"
        _render(objects, height, width, rng).save(root / "images" / file_name, quality=92)
        coco_images.append(dict(id=image_id, file_name=file_name, height=height, width=width))
        # Whole images go to one split, as in REFER's unc split.
        split = rng.choices([s for s, _ in SPLITS], weights=[w for _, w in SPLITS])[0]
        first_ann = len(annotations) + 1
        for o in objects:
            ann_id = len(annotations) + 1
            polygon = _polygon(o["shape"], o["cx"], o["cy"], o["r"])
            rle = mask_utils.merge(mask_utils.frPyObjects([polygon], height, width))
            annotations.append(
                dict(
                    id=ann_id,
                    image_id=image_id,
                    category_id=SHAPES.index(o["shape"]) + 1,
                    segmentation=[polygon],
                    bbox=[round(float(v), 2) for v in mask_utils.toBbox(rle)],
                    area=float(mask_utils.area(rle)),
                    iscrowd=0,
                )
            )
            candidates = _expressions(o, objects)
            if not candidates:
                continue  # no expression names it alone: an annotation without a ref, as in REFER
            chosen = rng.sample(candidates, k=min(len(candidates), rng.randint(1, 3)))
            sentences = _sentences(chosen, sent_id)
            sent_id += len(sentences)
            category_id = SHAPES.index(o["shape"]) + 1
            refs.append(
                dict(
                    ref_id=len(refs),
                    ann_id=[ann_id] if gres else ann_id,
                    image_id=image_id,
                    split=split,
                    category_id=[category_id] if gres else category_id,
                    file_name=f"synthetic_{image_id:06d}_{ann_id}.jpg",
                    sentences=sentences,
                    sent_ids=[s["sent_id"] for s in sentences],
                )
                | (dict(no_target=False) if gres else {})
            )
        for members, texts in _group_expressions(objects, rng) if gres else []:
            sentences = _sentences(rng.sample(texts, k=min(len(texts), rng.randint(1, 2))), sent_id)
            sent_id += len(sentences)
            refs.append(
                dict(
                    ref_id=len(refs),
                    ann_id=[first_ann + k for k in members] or [-1],
                    image_id=image_id,
                    split=split,
                    category_id=sorted({SHAPES.index(objects[k]["shape"]) + 1 for k in members}) or [-1],
                    file_name=f"synthetic_{image_id:06d}.jpg",
                    sentences=sentences,
                    sent_ids=[s["sent_id"] for s in sentences],
                    no_target=not members,
                )
            )
    categories = [dict(id=k + 1, name=name, supercategory="shape") for k, name in enumerate(SHAPES)]
    instances = dict(images=coco_images, annotations=annotations, categories=categories)
    (root / name / "instances.json").write_text(json.dumps(instances))
    if gres:
        (root / name / "grefs(unc).json").write_text(json.dumps(refs))
    else:
        with open(root / name / "refs(unc).p", "wb") as f:
            pickle.dump(refs, f)
    return root


def pack_synthetic_release(release: str | Path, out: str | Path, *options: str, gres: bool = False) -> Path:
    """Packs a release written by :func:`make_synthetic_release` into ``OUT/NAME`` with the packer (``options``:
    more of its arguments, e.g. ``--workers 2``); returns that shards folder."""
    from dcris.data import pack

    name = "synthetic_gres" if gres else "synthetic"
    release = Path(release)
    argv = ["--refer", str(release), "--dataset", name, "--split-by", "unc", "--images", str(release / "images")]
    pack.main([*argv, "--out", str(out), *options])
    return Path(out) / name


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="release root to write")
    parser.add_argument("--images", type=int, default=200, help="number of images")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--sizes", default="160,320", help="MIN,MAX pixels of each image side (COCO-like: 427,640)")
    parser.add_argument("--gres", action="store_true", help="gRefCOCO's format: also no-target and multi-target refs")
    args = parser.parse_args(argv)
    if args.images < 1:
        parser.error("--images must be at least 1")
    try:
        low, high = (int(v) for v in args.sizes.split(","))
    except ValueError:
        parser.error(f"--sizes takes MIN,MAX in pixels, e.g. 427,640; got {args.sizes!r}")
    if not 16 <= low <= high:
        parser.error(f"--sizes needs 16 <= MIN <= MAX; got {args.sizes}")
    root = make_synthetic_release(args.out, args.images, args.seed, sizes=(low, high), gres=args.gres)
    if args.gres:
        refs = json.loads((root / "synthetic_gres" / "grefs(unc).json").read_text())
        no_target = sum(r["no_target"] for r in refs)
        multi = sum(len(r["ann_id"]) > 1 for r in refs)
        counts = f"{no_target} no-target, {multi} multi-target"
        print(f"wrote {args.images} images and {len(refs)} refs ({counts}) to {root}")
    else:
        refs = load_refs(root / "synthetic" / "refs(unc).p")
        print(f"wrote {args.images} images and {len(refs)} refs to {root}")
    return 0
