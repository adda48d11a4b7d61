"""Pack a REFER release (RefCOCO, RefCOCO+, G-Ref, gRefCOCO, or a mix) into webdataset shards (SPEC 4).

One sample per ref (a referred object; in gRefCOCO a set of zero, one or several objects), holding the
original data (the letterbox happens in the loader, so one packing serves every image size)::

    KEY.jpg         the COCO JPEG, bytes unchanged (not re-encoded)
    KEY.mask.png    the target's mask at the original resolution, 8-bit gray, 0 or 255: for gRefCOCO the union
                    of the listed objects (crowd annotations left out, as the official loader does), all zero
                    for a phrase that names nothing
    KEY.tokens.npy  int32 (num_sentences, L) in ``np.save`` format: CLIP tokens of every sentence, L the context
                    length (``--context-length``; by default 22 for G-Ref umd, 17 otherwise, as the released configs)
    KEY.json        dataset, ref_id, ann_id, image_id, file_name, height, width, category_id, sentences (stripped
                    text), sent_ids (paired with sentences), sample_index and num_targets; gRefCOCO adds
                    ann_ids (the objects of the union) and segmentations (theirs, as packed: polygons of fewer
                    than 6 coordinates dropped, compressed RLE counts as text; what ``dcris eval --protocol rela``
                    rasterises), and its category_id is their list. gRefCOCO's sentences are its ``raw`` text with
                    the whitespace normalised, as ReLA's loader reads them; the other releases keep ``sent``
    KEY.meta        int64 little-endian (8,): sample_index, ref_id, image_id, ann_id (the first target's, -1 for
                    none), height, width, num_sentences, num_targets -- the same numbers in a form the DALI
                    pipeline reads without parsing JSON. Shards packed before num_targets was added carry the
                    first 7; the loaders read those as one target per sample (every RefCOCO-style ref has one).

Every split is shuffled once with a fixed seed (``--seed``) before it is cut into shards, so any contiguous
range of samples (what a rank reads) mixes images and, with ``--mix``, data sets.

Output layout (shard paths in the manifest are relative to ``OUT/NAME``, e.g. ``train/000000.tar``)::

    OUT/NAME/manifest.json               per split: objects, sentences, shards (tar, idx, tables, samples, sentences,
                                         sha256, sentence_counts), skipped [{ref_id, reason}], blank_sentences
                                         [{ref_id, sent_id}], dropped, truncated_sentences (longer than the
                                         context length: cut); for gRefCOCO also no_target and multi_target
                                         ({objects, sentences}; multi-target by the objects the ref lists),
                                         crowd_parts (listed, left out of the unions), short_polygons (of fewer
                                         than 6 coordinates, dropped as ReLA's loader drops them),
                                         objects_without_polygons (left out: none of theirs was kept),
                                         no_target_contradictions (refs skipped because their no_target flag
                                         contradicts ann_id) and sentences_without_raw (read from ``sent``);
                                         count_check against the published counts;
                                         format: dcris.data.common.SHARD_FORMAT, bumped with every format change
    OUT/NAME/SPLIT/NNNNNN.tar            the shards, --shard-size objects each
    OUT/NAME/SPLIT/NNNNNN.idx            their DALI index files
    OUT/NAME/SPLIT/NNNNNN.tables.npz     per shard, in sample order: ``tokens`` int32 (n, K, L), every object's
                                         tokens.npy zero-padded to the shard's most sentences K, and ``meta``
                                         int64 (n, 8): what the DALI loader reads once instead of per sample
    OUT/NAME/SPLIT/NNNNNN.done.json      one marker per finished shard (with its sha256): what makes a rerun resume

Usage::

    python shards/pack.py --refer ROOT --dataset refcoco --split-by unc --images COCO/train2014 --out OUT
    python shards/pack.py --refer ROOT --mix refcoco,refcoco+,refcocog --images COCO/train2014 --out OUT
    python shards/pack.py --refer ROOT --dataset grefcoco --images COCO/train2014 --out OUT   (grefs(unc).json)
    python shards/pack.py --refer ROOT --mix refcoco,grefcoco --images COCO/train2014 --out OUT
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import multiprocessing
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from dcris.data.common import SHARD_FORMAT
from dcris.data.refs import load_refs
from dcris.data.release_counts import PUBLISHED_TOTALS, count_differences, published_counts, total_differences
from dcris.errors import UserError, disk_full_is_user_error
from dcris.tokenizer import CONTEXT_LENGTH, tokenize, truncations

FORMAT = SHARD_FORMAT
STANDARD_SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd", "grefcoco": "unc"}  # --mix, defaults
META_LENGTH = 8  # int64 fields of KEY.meta (module docstring)
# what each shard's done marker counts besides its samples (the manifest sums them per split)
SHARD_COUNTS = ("no_target_contradictions", "truncated", "crowd_parts", "short_polygons", "objects_without_polygons")
SPLIT_ORDER = {s: k for k, s in enumerate(("train", "val", "test", "testA", "testB", "testC"))}  # manifest order
REF_KEYS = ("ref_id", "ann_id", "image_id", "split", "sentences")
# The released configs' word_len: G-Ref umd 22; RefCOCO, RefCOCO+, G-Ref google and the mix (DETRIS_large_mixed) 17.
CONTEXT_LENGTHS = {("refcocog", "umd"): 22}


class PackError(Exception):
    """Bad input found before any work: the message is shown as one line."""


def default_context_length(dataset: str | None, split_by: str | None) -> int:
    """Tokens per sentence the released configs use for a data set and split-by (SPEC 2); the mix gets 17."""
    return CONTEXT_LENGTHS.get((dataset, split_by), CONTEXT_LENGTH)


def output_name(args: argparse.Namespace) -> str:
    """The folder under ``--out`` the packer writes: the data set's name, or ``mix`` for ``--mix``."""
    return (args.dataset or "mix") if args.mix else args.dataset


def split_key(split: str) -> tuple[int, str]:
    """Sort key putting splits in the usual order (train, val, test, testA, testB, ...)."""
    return SPLIT_ORDER.get(split, len(SPLIT_ORDER)), split


@dataclass
class _Plan:
    """Everything read and checked before packing starts."""

    name: str  # output folder name
    objects: dict[str, list[dict]]  # per split, in packing (shuffled) order
    manifest_fields: dict  # mix, split_by
    dropped: dict[str, int] = field(default_factory=dict)  # per split: objects held out by --mix
    count_differences: list[str] | None = None  # None: no published counts to compare with


def _refs_path(root: Path, dataset: str, split_by: str) -> Path:
    """gRefCOCO's ``grefs(SPLIT_BY).json`` (or the pickled copy some mirrors have) where the release has one, else
    REFER's ``refs(SPLIT_BY).p``; a generalized release's refs list their objects (``ann_id`` a list, ``[-1]``:
    none), which is what :func:`_object_record` goes by."""
    candidates = [root / dataset / f"grefs({split_by}).{ext}" for ext in ("json", "p")]
    found = next((c for c in candidates if c.is_file()), None)
    return found or (candidates[0] if dataset == "grefcoco" else root / dataset / f"refs({split_by}).p")


def _load_refs(root: Path, dataset: str, split_by: str) -> list[dict]:
    path = _refs_path(root, dataset, split_by)
    if not path.is_file():
        raise PackError(f"refs file not found: {path}")
    try:
        refs = json.loads(path.read_text()) if path.suffix == ".json" else load_refs(path)
    except UserError as e:  # a file naming a class: refused unread
        raise PackError(str(e)) from None
    except Exception as e:  # a truncated or foreign pickle can raise almost anything
        raise PackError(f"malformed refs file {path}: {type(e).__name__}") from None
    if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
        raise PackError(f"malformed refs file {path}: expected a list of ref dicts")
    for r in refs:
        missing = [k for k in REF_KEYS if k not in r]
        if missing:
            raise PackError(f"malformed refs file {path}: ref {r.get('ref_id', '?')} lacks {', '.join(missing)}")
    return refs


def _load_instances(root: Path, dataset: str) -> tuple[dict[int, dict], dict[int, dict]]:
    """Images and annotations of ``instances.json``, by id."""
    path = root / dataset / "instances.json"
    if not path.is_file():
        raise PackError(f"annotation file not found: {path}")
    try:
        data = json.loads(path.read_text())
        images = {int(im["id"]): im for im in data["images"]}
        annotations = {int(a["id"]): a for a in data["annotations"]}
        for im in images.values():
            im["file_name"], im["height"], im["width"]  # noqa: B018 -- presence check
    except (ValueError, KeyError, TypeError) as e:
        raise PackError(f"malformed annotation file {path}: {type(e).__name__}: {str(e)[:80]}") from None
    return images, annotations


def _release_counts(refs: list[dict]) -> dict[str, dict[str, int]]:
    """Objects and sentences per split of a refs file, as published counts count them (blank sentences too)."""
    counts: dict[str, dict[str, int]] = {}
    for r in refs:
        split = counts.setdefault(str(r["split"]), dict(objects=0, sentences=0))
        split["objects"] += 1
        split["sentences"] += len(r["sentences"])
    return counts


def _target_parts(ref: dict, annotations: dict) -> list[dict] | None:
    """The annotations a gRefCOCO ref lists, as ``{ann_id, segmentation, iscrowd}`` (segmentation None when the
    annotation is missing); ``[]`` for a phrase that names nothing (``ann_id == [-1]``), None for an empty list."""
    if not ref["ann_id"]:
        return None
    if [int(a) for a in ref["ann_id"]] == [-1]:
        return []
    parts = []
    for ann_id in ref["ann_id"]:
        ann = annotations.get(int(ann_id)) or {}
        parts.append(dict(ann_id=int(ann_id), segmentation=ann.get("segmentation"), iscrowd=int(ann.get("iscrowd", 0))))
    return parts


def _object_record(ref: dict, dataset: str, key: str, images: dict, annotations: dict) -> dict:
    """What a worker needs to pack one object (plain data, cheap to pickle); ``index`` is set once shuffled.

    Sentences are stored stripped (as the released data preparation does; gRefCOCO's are its ``raw`` text with
    the whitespace normalised, as ReLA's loader reads them, ``sent`` where a sentence has no ``raw``, counted in
    ``without_raw``); blank ones are dropped together with their ``sent_id`` and listed in ``blank_sent_ids``. A
    gRefCOCO ref carries ``parts`` (:func:`_target_parts`) and ``no_target_flag`` (its optional boolean
    ``no_target``, checked against ``ann_id`` when packed).
    """
    image = images.get(int(ref["image_id"]))
    if image is None:
        raise PackError(f"ref {ref['ref_id']} names image {ref['image_id']}, absent from instances.json")
    if isinstance(ref["ann_id"], list):  # gRefCOCO: a set of objects, its text as ReLA's loader reads it
        pairs = [(" ".join(str(s.get("raw", s.get("sent")) or "").split()), s.get("sent_id")) for s in ref["sentences"]]
        parts = _target_parts(ref, annotations)
        return dict(
            key=key,
            dataset=dataset,
            ref_id=int(ref["ref_id"]),
            image_id=int(ref["image_id"]),
            ann_id=-1,  # set when packed: the first listed object that is not crowd
            file_name=image["file_name"],
            height=int(image["height"]),
            width=int(image["width"]),
            category_id=[int(c) for c in ref.get("category_id") or [] if c is not None and int(c) >= 0],
            parts=parts,
            no_target_flag=ref.get("no_target"),
            sentences=[text for text, _ in pairs if text],
            sent_ids=[sent_id for text, sent_id in pairs if text],
            blank_sent_ids=[sent_id for text, sent_id in pairs if not text],
            without_raw=sum("raw" not in s for s in ref["sentences"]),
        )
    pairs = [(str(s.get("sent") or "").strip(), s.get("sent_id")) for s in ref["sentences"]]
    ann = annotations.get(int(ref["ann_id"]))
    category_id = ref.get("category_id", None if ann is None else ann.get("category_id"))
    return dict(
        key=key,
        dataset=dataset,
        ref_id=int(ref["ref_id"]),
        image_id=int(ref["image_id"]),
        ann_id=int(ref["ann_id"]),
        file_name=image["file_name"],
        height=int(image["height"]),
        width=int(image["width"]),
        category_id=None if category_id is None else int(category_id),
        segmentation=None if ann is None else ann.get("segmentation"),
        sentences=[text for text, _ in pairs if text],
        sent_ids=[sent_id for text, sent_id in pairs if text],
        blank_sent_ids=[sent_id for text, sent_id in pairs if not text],
    )


def _shuffled(objects: list[dict], seed: int) -> list[dict]:
    """The objects in a fixed random order, numbered by their position (``index``, the sample index)."""
    order = np.random.default_rng(seed).permutation(len(objects))
    return [dict(objects[i], index=position) for position, i in enumerate(order.tolist())]


def _plan_mix(args: argparse.Namespace, root: Path) -> _Plan:
    names = [n.strip() for n in args.mix.split(",") if n.strip()]
    unknown = [n for n in names if n not in STANDARD_SPLIT_BY]
    if unknown:
        raise PackError(f"--mix: unknown dataset {unknown[0]!r} (known: {', '.join(STANDARD_SPLIT_BY)})")
    if args.splits not in (None, ["train"]):
        raise PackError("--mix packs the train split only; drop --splits")
    loaded = [(n, _load_refs(root, n, STANDARD_SPLIT_BY[n]), *_load_instances(root, n)) for n in names]
    # Images of any held-out split must not be trained on (the released code's plain concat allows it).
    held_out = {int(r["image_id"]) for _, refs, _, _ in loaded for r in refs if r["split"] != "train"}
    objects, dropped, differences = [], 0, []
    for d, (name, refs, images, anns) in enumerate(loaded):
        # Each source release is checked whole: a wrong refs file shows in any of its splits.
        found = _release_differences(name, STANDARD_SPLIT_BY[name], _release_counts(refs))
        differences += [f"{name}: {line}" for line in found or []]
        for r in sorted(refs, key=lambda r: int(r["ref_id"])):
            if r["split"] != "train":
                continue
            if int(r["image_id"]) in held_out:
                dropped += 1
                continue
            objects.append(_object_record(r, name, f"d{d}r{r['ref_id']}", images, anns))
    return _Plan(
        name=output_name(args),
        objects={"train": _shuffled(objects, args.seed)},
        manifest_fields=dict(mix=names, split_by={n: STANDARD_SPLIT_BY[n] for n in names}),
        dropped={"train": dropped},
        count_differences=differences,
    )


def _plan(args: argparse.Namespace) -> _Plan:
    """Read and check all inputs; the objects of each split come shuffled with ``args.seed``."""
    root, image_dir = Path(args.refer), Path(args.images)
    if not image_dir.is_dir():
        raise PackError(f"image folder not found: {image_dir}")
    if args.mix:
        return _plan_mix(args, root)
    if not args.dataset or not args.split_by:
        raise PackError("give --dataset and --split-by, or --mix")  # --split-by defaults to unc for grefcoco
    refs = _load_refs(root, args.dataset, args.split_by)
    images, annotations = _load_instances(root, args.dataset)
    available = sorted({str(r["split"]) for r in refs}, key=split_key)
    splits = args.splits or available
    for split in splits:
        if split not in available:
            raise PackError(
                f"unknown split {split!r} for {args.dataset} ({args.split_by}); have {', '.join(available)}"
            )
    by_split: dict[str, list[dict]] = {}
    for split in splits:
        chosen = sorted((r for r in refs if r["split"] == split), key=lambda r: int(r["ref_id"]))
        records = [_object_record(r, args.dataset, f"r{r['ref_id']}", images, annotations) for r in chosen]
        by_split[split] = _shuffled(records, args.seed)
    return _Plan(
        name=output_name(args),
        objects=by_split,
        manifest_fields=dict(mix=None, split_by=args.split_by),
        count_differences=_release_differences(args.dataset, args.split_by, _release_counts(refs)),
    )


def _release_differences(dataset: str, split_by: str, counts: dict[str, dict[str, int]]) -> list[str] | None:
    """A release's counts against the published ones: per split where those are known, else the total."""
    found = count_differences(dataset, split_by, counts, "in the release")
    return found if found is not None else total_differences(dataset, split_by, counts, "in the release")


def _read_image(path: Path, height: int, width: int) -> bytes:
    """The JPEG's bytes after checking that it decodes to the annotated size; ValueError says why not."""
    if not path.is_file():
        raise ValueError("image missing")
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # a full decode: truncated files fail here, not in the loader
            size = im.size
    except Exception as e:  # PIL raises several types for bad files
        raise ValueError(f"image corrupt ({type(e).__name__})") from None
    if size != (width, height):
        raise ValueError(f"image is {size[0]}x{size[1]}, annotation says {width}x{height}")
    return data


def _rle_parts(segmentation: object, height: int, width: int) -> list[dict]:
    """COCO RLEs of a segmentation given as polygons, one RLE, or a list of RLEs (refclef style, as REFER's
    ``getMask`` reads them); counts may be compressed (str/bytes) or uncompressed (list of run lengths)."""
    from pycocotools import mask as mask_utils

    parts = segmentation if isinstance(segmentation, list) else [segmentation]
    if all(isinstance(p, dict) for p in parts):
        return [p if isinstance(p["counts"], (str, bytes)) else mask_utils.frPyObjects(p, height, width) for p in parts]
    if all(isinstance(p, list) for p in parts):  # polygons [x0, y0, x1, y1, ...]
        return mask_utils.frPyObjects(parts, height, width)
    raise TypeError("neither polygons nor RLE")


def _render_mask(segmentation: object, height: int, width: int) -> np.ndarray:
    """uint8 (h, w) mask in {0, 1}, the union of the segmentation's parts; ValueError (a short reason) if none."""
    from pycocotools import mask as mask_utils

    if not segmentation:
        raise ValueError("no mask")
    try:
        mask = mask_utils.decode(_rle_parts(segmentation, height, width))  # (h, w, parts)
    except Exception as e:  # pycocotools rejects malformed input with assorted errors (their text quotes the input)
        raise ValueError(f"no mask (unreadable segmentation: {type(e).__name__})") from None
    if mask.shape[:2] != (height, width):
        raise ValueError(f"mask is {mask.shape[1]}x{mask.shape[0]}, image is {width}x{height}")
    mask = mask.max(axis=2)
    if not mask.any():
        raise ValueError("no mask (empty)")
    return mask.astype(np.uint8)


class NoTargetContradiction(ValueError):
    """A gRefCOCO ref's ``no_target`` flag says the opposite of its ``ann_id``: skipped, and counted apart."""


def _valid_polygons(segmentation: object) -> tuple[object, int]:
    """A segmentation as ReLA's loader keeps it, and how many polygons it dropped: polygons (lists) of fewer than
    6 coordinates or of an odd count go (``frPyObjects`` would fail on them); an RLE (a dict) is kept whole."""
    if not isinstance(segmentation, list) or not all(isinstance(p, list) for p in segmentation):
        return segmentation, 0
    kept = [p for p in segmentation if len(p) % 2 == 0 and len(p) >= 6]
    return kept, len(segmentation) - len(kept)


def _json_segmentation(segmentation: object) -> object:
    """A segmentation JSON can hold: compressed RLE counts as text."""
    if isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), bytes):
        return dict(segmentation, counts=segmentation["counts"].decode("ascii"))
    return segmentation


def _union_mask(obj: dict) -> tuple[np.ndarray, dict]:
    """A gRefCOCO ref's target: uint8 (h, w) union of its non-crowd objects (all zero when it lists none), as
    ReLA's loader builds it (polygons of fewer than 6 coordinates dropped, an object left without any dropped
    too), and what went into it: ``kept`` (the ids of the objects of the union), ``segmentations`` (theirs, as
    used), ``listed`` (the objects the ref lists), ``crowd_parts``, ``short_polygons`` and
    ``objects_without_polygons``. ValueError names the reason to skip the ref."""
    parts, flag = obj["parts"], obj["no_target_flag"]
    if parts is None:
        raise ValueError("ann_id is an empty list ([-1] marks a phrase that names nothing)")
    if flag is not None and bool(flag) != (not parts):
        raise NoTargetContradiction(f"no_target is {flag} but ann_id lists {len(parts)} object(s)")
    height, width = obj["height"], obj["width"]
    mask = np.zeros((height, width), dtype=np.uint8)
    info = dict(kept=[], segmentations=[], listed=len(parts), crowd_parts=0, short_polygons=0)
    info["objects_without_polygons"] = 0
    for part in parts:
        if part["segmentation"] is None:
            raise ValueError(f"annotation {part['ann_id']} missing")
        if part["iscrowd"]:
            info["crowd_parts"] += 1
            continue
        segmentation, dropped = _valid_polygons(part["segmentation"])
        info["short_polygons"] += dropped
        if dropped and not segmentation:
            info["objects_without_polygons"] += 1
            continue
        try:
            mask |= _render_mask(segmentation, height, width)
        except ValueError as e:
            raise ValueError(f"annotation {part['ann_id']}: {e}") from None
        info["kept"].append(part["ann_id"])
        info["segmentations"].append(_json_segmentation(segmentation))
    if parts and not info["kept"]:
        if info["objects_without_polygons"]:
            raise ValueError("no listed object has a polygon of 6 or more coordinates (or is not a crowd)")
        raise ValueError("every listed object is a crowd annotation")
    return mask, info


def _encode_object(obj: dict, image_dir: Path, context_length: int) -> dict:
    """The webdataset sample of one object; ValueError names the reason to skip it."""
    if not obj["sentences"]:
        raise ValueError("no sentences")
    union: dict = {}
    if "parts" in obj:
        mask, union = _union_mask(obj)
        num_targets = len(union["kept"])
        obj = dict(obj, ann_id=union["kept"][0] if union["kept"] else -1)  # the first object of the union, as listed
    elif obj["segmentation"] is None:
        raise ValueError("annotation missing")
    else:
        num_targets = 1
    jpeg = _read_image(image_dir / obj["file_name"], obj["height"], obj["width"])
    if "parts" not in obj:
        mask = _render_mask(obj["segmentation"], obj["height"], obj["width"])
    png = io.BytesIO()
    Image.fromarray(mask * 255).save(png, format="PNG", compress_level=1)
    tokens = tokenize(obj["sentences"], context_length).numpy().astype("<i4")  # (K, L)
    npy = io.BytesIO()
    np.save(npy, tokens, allow_pickle=False)
    num_sentences = len(obj["sentences"])
    meta = [obj["index"], obj["ref_id"], obj["image_id"], obj["ann_id"], obj["height"], obj["width"], num_sentences]
    meta.append(num_targets)  # (META_LENGTH,)
    fields = ("dataset", "ref_id", "ann_id", "image_id", "file_name", "height", "width", "category_id")
    info = {k: obj[k] for k in fields} | {
        "sentences": obj["sentences"],
        "sent_ids": obj["sent_ids"],
        "sample_index": obj["index"],
        "num_targets": num_targets,
    }
    info |= {"ann_ids": union["kept"], "segmentations": union["segmentations"]} if union else {}
    counted = ("listed", "crowd_parts", "short_polygons", "objects_without_polygons")
    return {
        "__key__": obj["key"],
        "jpg": jpeg,
        "mask.png": png.getvalue(),
        "tokens.npy": npy.getvalue(),
        "json": json.dumps(info).encode(),
        "meta": np.asarray(meta, dtype="<i8").tobytes(),
        "truncated": len(truncations(obj["sentences"], context_length)),  # bookkeeping for the manifest, ...
        **{k: union.get(k, num_targets if k == "listed" else 0) for k in counted},  # ... not written
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fingerprint(objects: list[dict], context_length: int) -> str:
    """Identifies a shard's planned content, so a marker from a different plan is not trusted."""
    planned = [(o["key"], o["index"], o["file_name"], o["sentences"], o["sent_ids"]) for o in objects]
    # META_LENGTH: a shard of the older 7-field meta is repacked, so one split never mixes both layouts;
    # SHARD_COUNTS: a marker written before a count was kept lacks it, so its shard is packed again
    fields = [FORMAT, META_LENGTH, SHARD_COUNTS, context_length, planned]
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()


def _done_marker(out_dir: Path, stem: str, fingerprint: str) -> dict | None:
    """The shard's completion record when the shard on disk is complete and current, else None.

    ``stem`` is the shard's path relative to ``out_dir`` without extension (``SPLIT/NNNNNN``), as are the
    marker's ``tar`` and ``idx``.
    """
    marker = out_dir / f"{stem}.done.json"
    if not marker.is_file():
        return None
    try:
        done = json.loads(marker.read_text())
    except ValueError:
        return None
    if done.get("fingerprint") != fingerprint or done.get("stem") != stem:
        return None
    if done["tar"] is None:  # every object was skipped: nothing on disk to check
        return done
    tar, idx, tables = out_dir / done["tar"], out_dir / done["idx"], out_dir / done["tables"]
    if tar.is_file() and idx.is_file() and tables.is_file() and _sha256(tar) == done["sha256"]:
        return done
    return None


def _pack_shard(job: dict) -> dict:
    """Write one shard (temp name, then rename), its DALI index and its done marker; return the marker."""
    from wds2idx import IndexCreator  # ships with nvidia-dali

    out_dir, stem, fingerprint = Path(job["out_dir"]), job["stem"], job["fingerprint"]
    done = _done_marker(out_dir, stem, fingerprint)
    if done is not None:
        return done | {"resumed": True}
    tmp_tar = out_dir / f"{stem}.tar.tmp"
    sentence_counts: list[int] = []  # per written sample, so loaders know exact per-rank batch counts
    tokens, metas = [], []  # per written sample: int32 (K, L) and int64 (META_LENGTH,), for the tables
    listed_counts = []  # per written sample: the objects its ref lists (gRefCOCO's multi-target count)
    counts = dict.fromkeys(SHARD_COUNTS, 0)
    skipped = []
    with wds.TarWriter(str(tmp_tar)) as writer:
        for obj in job["objects"]:
            try:
                sample = _encode_object(obj, Path(job["image_dir"]), job["context_length"])
            except ValueError as e:
                skipped.append(dict(ref_id=obj["ref_id"], image_id=obj["image_id"], reason=str(e)))
                counts["no_target_contradictions"] += isinstance(e, NoTargetContradiction)
                continue
            listed_counts.append(sample.pop("listed"))
            for key in SHARD_COUNTS[1:]:
                counts[key] += sample.pop(key)
            writer.write(sample)
            metas.append(np.frombuffer(sample["meta"], dtype="<i8"))
            tokens.append(np.load(io.BytesIO(sample["tokens.npy"]), allow_pickle=False))
            sentence_counts.append(int(metas[-1][6]))  # num_sentences
    samples = len(sentence_counts)
    done = dict(stem=stem, fingerprint=fingerprint, tar=None, idx=None, tables=None, sha256=None, samples=samples)
    done.update(sentences=sum(sentence_counts), sentence_counts=sentence_counts, skipped=skipped)
    done.update(target_counts=[int(meta[7]) for meta in metas], listed_counts=listed_counts, **counts)
    if samples:
        tar, idx, tmp_idx = out_dir / f"{stem}.tar", out_dir / f"{stem}.idx", out_dir / f"{stem}.idx.tmp"
        os.replace(tmp_tar, tar)
        with IndexCreator(str(tar), str(tmp_idx), verbose=False) as creator:
            creator.create_index()
        os.replace(tmp_idx, idx)
        table = np.zeros((samples, max(sentence_counts), tokens[0].shape[1]), dtype="<i4")  # (n, K, L)
        for row, rows in zip(table, tokens, strict=True):
            row[: len(rows)] = rows
        tmp_tables = out_dir / f"{stem}.tables.npz.tmp"
        with open(tmp_tables, "wb") as f:
            np.savez(f, tokens=table, meta=np.stack(metas))
        os.replace(tmp_tables, out_dir / f"{stem}.tables.npz")
        # paths relative to OUT/NAME
        done.update(tar=f"{stem}.tar", idx=f"{stem}.idx", tables=f"{stem}.tables.npz", sha256=_sha256(tar))
    else:
        tmp_tar.unlink()
    tmp_marker = out_dir / f"{stem}.done.json.tmp"
    tmp_marker.write_text(json.dumps(done))
    os.replace(tmp_marker, out_dir / f"{stem}.done.json")  # the marker goes last: it certifies the shard
    return done | {"resumed": False}


def _target_summary(shard_done: list[dict], objects: list[dict]) -> dict:
    """A gRefCOCO split's no-target refs and multi-target refs (by the objects they list, as gRefCOCO's statistics
    count them), with their sentences, and what the packer counted beside them (module docstring)."""
    no_target = [(t, c) for d in shard_done for t, c in zip(d["target_counts"], d["sentence_counts"], strict=True)]
    listed = [(t, c) for d in shard_done for t, c in zip(d["listed_counts"], d["sentence_counts"], strict=True)]
    return dict(
        no_target=dict(objects=sum(t == 0 for t, _ in no_target), sentences=sum(c for t, c in no_target if t == 0)),
        multi_target=dict(objects=sum(t > 1 for t, _ in listed), sentences=sum(c for t, c in listed if t > 1)),
        **{key: sum(d[key] for d in shard_done) for key in SHARD_COUNTS if key != "truncated"},
        sentences_without_raw=sum(o.get("without_raw", 0) for o in objects),
    )


def published_total(args: argparse.Namespace) -> dict[str, int] | None:
    """``{"sentences": n}`` where a release publishes only its total (gRefCOCO), else None."""
    total = PUBLISHED_TOTALS.get((args.dataset, args.split_by))
    return None if total is None else {"sentences": total}


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Pack a REFER release into webdataset shards (SPEC 4).")
    parser.add_argument("--refer", required=True, help="REFER data root holding DATASET/refs(SPLIT_BY).p")
    parser.add_argument(
        "--dataset", help="refcoco, refcoco+, refcocog, grefcoco, ... (the output folder name with --mix)"
    )
    parser.add_argument("--split-by", help="unc, umd or google: which refs(...).p to read (grefcoco: unc)")
    parser.add_argument("--images", required=True, help="folder with the COCO train2014 JPEGs")
    parser.add_argument("--out", required=True, help="output root; shards go to OUT/NAME")
    parser.add_argument("--splits", nargs="+", help="splits to pack (default: all in the refs file)")
    parser.add_argument("--shard-size", type=int, default=1000, help="objects per shard")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="packing processes")
    parser.add_argument("--mix", help="comma-separated datasets whose train splits are packed together")
    parser.add_argument(
        "--context-length", type=int,
        help="tokens per sentence (default: 22 for refcocog with --split-by umd, else 17, as the released configs)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffle applied to every split")
    args = parser.parse_args(argv)
    if args.shard_size < 1 or args.workers < 1:
        parser.error("--shard-size and --workers must be at least 1")
    if args.dataset == "grefcoco" and not args.mix and args.split_by is None:
        args.split_by = STANDARD_SPLIT_BY[args.dataset]  # the only split-by gRefCOCO is released with
    if args.context_length is not None and not 3 <= args.context_length <= 77:
        parser.error("--context-length must be 3 to 77 (start and end token included; CLIP has 77 positions)")
    return args


def _report_counts(name: str, differences: list[str] | None) -> None:
    """The comparison with the published counts: one line when they match, a warning block when not."""
    if differences is None:
        print(f"{name}: no published counts to compare with")
    elif not differences:
        print(f"{name}: the counts match the published release (SPEC 4)")
    else:
        lines = "\n".join(f"  {line}" for line in differences)
        print(
            f"WARNING: {name} differs from the published release (SPEC 4); results on these shards are not "
            f"comparable with published ones:\n{lines}\n  Check the annotation files (README, Download) and the "
            "skipped objects and blank sentences in manifest.json.",
            file=sys.stderr,
        )


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns 0, or exits with one ``error: ...`` line on bad input."""
    args = _parse_args(argv)
    try:
        plan = _plan(args)
    except PackError as e:
        sys.exit(f"error: {e}")
    context_length = args.context_length or default_context_length(args.dataset, None if args.mix else args.split_by)
    out_dir = Path(args.out) / plan.name
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = []
    for split, objects in plan.objects.items():
        (out_dir / split).mkdir(exist_ok=True)
        for k in range(0, max(len(objects), 1), args.shard_size):
            chunk = objects[k : k + args.shard_size]
            stem = f"{split}/{k // args.shard_size:06d}"  # OUT/NAME/SPLIT/NNNNNN.{tar,idx,done.json}
            jobs.append(
                dict(
                    split=split,
                    stem=stem,
                    objects=chunk,
                    fingerprint=_fingerprint(chunk, context_length),
                    out_dir=str(out_dir),
                    image_dir=args.images,
                    context_length=context_length,
                )
            )
    manifest_path = out_dir / "manifest.json"
    manifest_path.unlink(missing_ok=True)  # written last: a pack that stopped halfway is not taken for a whole one
    total = sum(len(objects) for objects in plan.objects.values())
    results: dict[str, dict] = {}
    jobs_by_stem = {j["stem"]: j for j in jobs}
    with disk_full_is_user_error(out_dir), tqdm(total=total, unit="obj", desc=f"packing {plan.name}") as bar:
        pool = multiprocessing.Pool(args.workers) if args.workers > 1 and len(jobs) > 1 else None
        for done in pool.imap_unordered(_pack_shard, jobs) if pool else map(_pack_shard, jobs):
            results[done["stem"]] = done
            for s in done["skipped"]:
                bar.write(f"skipped ref {s['ref_id']} (image {s['image_id']}): {s['reason']}")
            bar.update(len(jobs_by_stem[done["stem"]]["objects"]))
        if pool:
            pool.close()
            pool.join()
    manifest = dict(
        format=FORMAT, dataset=plan.name, context_length=context_length, shuffle_seed=args.seed,
        **plan.manifest_fields, splits={},
    )  # fmt: skip
    for split, objects in plan.objects.items():
        shard_done = [results[j["stem"]] for j in jobs if j["split"] == split]
        manifest["splits"][split] = dict(
            objects=sum(d["samples"] for d in shard_done),
            sentences=sum(d["sentences"] for d in shard_done),
            shards=[
                {k: d[k] for k in ("tar", "idx", "tables", "samples", "sentences", "sha256", "sentence_counts")}
                for d in shard_done
                if d["tar"]
            ],
            skipped=[dict(ref_id=s["ref_id"], reason=s["reason"]) for d in shard_done for s in d["skipped"]],
            blank_sentences=[dict(ref_id=o["ref_id"], sent_id=i) for o in objects for i in o["blank_sent_ids"]],
            dropped=plan.dropped.get(split, 0),
            truncated_sentences=sum(d["truncated"] for d in shard_done),
        )
        if any("parts" in o for o in objects):
            manifest["splits"][split].update(_target_summary(shard_done, objects))
    differences = plan.count_differences
    if differences == [] and not args.mix:
        # The release matches: what was packed must too (skipped objects and blank sentences would show here).
        packed = {s: dict(objects=i["objects"], sentences=i["sentences"]) for s, i in manifest["splits"].items()}
        differences = count_differences(args.dataset, args.split_by, packed, "packed", splits=list(packed))
        if differences is None and not args.splits:  # a published total: checked when every split was packed
            differences = total_differences(args.dataset, args.split_by, packed, "packed")
    manifest["count_check"] = dict(
        published=None if args.mix else published_counts(args.dataset, args.split_by) or published_total(args),
        match=None if differences is None else not differences,
        differences=differences or [],
    )
    tmp_manifest = out_dir / "manifest.json.tmp"
    with disk_full_is_user_error(out_dir):
        tmp_manifest.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp_manifest, manifest_path)
    for split, info in manifest["splits"].items():
        print(
            f"{split}: {info['objects']} objects, {info['sentences']} sentences, {len(info['shards'])} shards, "
            f"{len(info['skipped'])} skipped, {len(info['blank_sentences'])} blank sentences dropped, "
            f"{info['dropped']} dropped, {info['truncated_sentences']} sentences longer than {context_length} "
            "tokens (cut)"
            + (
                f"; {info['no_target']['objects']} no-target and {info['multi_target']['objects']} multi-target "
                f"refs (by listed objects), {info['crowd_parts']} crowd parts left out, {info['short_polygons']} "
                f"polygons of fewer than 6 coordinates dropped ({info['objects_without_polygons']} objects left "
                f"without one), {info['no_target_contradictions']} refs whose no_target flag contradicts ann_id, "
                f"{info['sentences_without_raw']} sentences without raw text"
                if "no_target" in info
                else ""
            )
        )
    _report_counts(plan.name, differences)
    resumed = sum(d["resumed"] for d in results.values())
    print(
        f"wrote {manifest_path} ({context_length}-token sentences; "
        f"{resumed} of {len(jobs)} shards were already complete)"
    )
    return 0
