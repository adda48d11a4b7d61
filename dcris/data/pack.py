"""Pack a REFER release (RefCOCO, RefCOCO+, G-Ref, or their mix) into webdataset shards (SPEC 4).

One sample per referred object, holding the original data (the letterbox happens in the loader, so one
packing serves every image size)::

    KEY.jpg         the COCO JPEG, bytes unchanged (not re-encoded)
    KEY.mask.png    the object's mask at the original resolution, 8-bit gray, 0 or 255
    KEY.tokens.npy  int32 (num_sentences, 17) in ``np.save`` format: CLIP tokens of every sentence
    KEY.json        ref_id, ann_id, image_id, file_name, height, width, category_id, sentences (text), sent_ids
                    and sample_index
    KEY.meta        int64 little-endian (7,): sample_index, ref_id, image_id, ann_id, height, width,
                    num_sentences -- the same numbers in a form the DALI pipeline reads without parsing JSON

Output layout (shard paths in the manifest are relative to ``OUT/NAME``, e.g. ``train/000000.tar``)::

    OUT/NAME/manifest.json               per split: objects, sentences, shards (tar, idx, samples, sentences,
                                         sha256, sentence_counts), skipped [{ref_id, reason}], dropped
    OUT/NAME/SPLIT/NNNNNN.tar            the shards, --shard-size objects each
    OUT/NAME/SPLIT/NNNNNN.idx            their DALI index files
    OUT/NAME/SPLIT/NNNNNN.done.json      one marker per finished shard (with its sha256): what makes a rerun resume

Usage::

    python shards/pack.py --refer ROOT --dataset refcoco --split-by unc --images COCO/train2014 --out OUT
    python shards/pack.py --refer ROOT --mix refcoco,refcoco+,refcocog --images COCO/train2014 --out OUT
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import multiprocessing
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from dcris.tokenizer import tokenize

FORMAT = "dcris-shards/2"
STANDARD_SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}  # used by --mix
SPLIT_ORDER = {s: k for k, s in enumerate(("train", "val", "test", "testA", "testB", "testC"))}  # manifest order
REF_KEYS = ("ref_id", "ann_id", "image_id", "split", "sentences")


class PackError(Exception):
    """Bad input found before any work: the message is shown as one line."""


def _load_refs(root: Path, dataset: str, split_by: str) -> list[dict]:
    path = root / dataset / f"refs({split_by}).p"
    if not path.is_file():
        raise PackError(f"refs file not found: {path}")
    try:
        with open(path, "rb") as f:
            refs = pickle.load(f)
    except Exception as e:  # a truncated or foreign pickle can raise almost anything
        raise PackError(f"malformed refs file {path}: {type(e).__name__}: {e}") from None
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
        raise PackError(f"malformed annotation file {path}: {type(e).__name__}: {e}") from None
    return images, annotations


def _object_record(ref: dict, key: str, index: int, images: dict, annotations: dict) -> dict:
    """What a worker needs to pack one object (plain data, cheap to pickle)."""
    image = images.get(int(ref["image_id"]))
    if image is None:
        raise PackError(f"ref {ref['ref_id']} names image {ref['image_id']}, absent from instances.json")
    ann = annotations.get(int(ref["ann_id"]))
    category_id = ref.get("category_id", None if ann is None else ann.get("category_id"))
    return dict(
        key=key,
        index=index,
        ref_id=int(ref["ref_id"]),
        image_id=int(ref["image_id"]),
        ann_id=int(ref["ann_id"]),
        file_name=image["file_name"],
        height=int(image["height"]),
        width=int(image["width"]),
        category_id=None if category_id is None else int(category_id),
        segmentation=None if ann is None else ann.get("segmentation"),
        sentences=[s.get("sent", "") for s in ref["sentences"]],
        sent_ids=[s.get("sent_id") for s in ref["sentences"]],
    )


def _plan(args: argparse.Namespace) -> tuple[str, dict[str, list[dict]], dict, dict[str, int]]:
    """Read and check all inputs.

    Returns:
        The output name, the objects of each split, manifest fields, and per split the number of objects
        dropped because their image is held out (``--mix``).
    """
    root, image_dir = Path(args.refer), Path(args.images)
    if not image_dir.is_dir():
        raise PackError(f"image folder not found: {image_dir}")
    if args.mix:
        names = [n.strip() for n in args.mix.split(",") if n.strip()]
        unknown = [n for n in names if n not in STANDARD_SPLIT_BY]
        if unknown:
            raise PackError(f"--mix: unknown dataset {unknown[0]!r} (known: {', '.join(STANDARD_SPLIT_BY)})")
        if args.splits not in (None, ["train"]):
            raise PackError("--mix packs the train split only; drop --splits")
        loaded = [(n, _load_refs(root, n, STANDARD_SPLIT_BY[n]), *_load_instances(root, n)) for n in names]
        # Images of any held-out split must not be trained on (the released code's plain concat allows it).
        held_out = {int(r["image_id"]) for _, refs, _, _ in loaded for r in refs if r["split"] != "train"}
        objects, dropped = [], 0
        for d, (_, refs, images, annotations) in enumerate(loaded):
            for r in refs:
                if r["split"] != "train":
                    continue
                if int(r["image_id"]) in held_out:
                    dropped += 1
                    continue
                objects.append(_object_record(r, f"d{d}r{r['ref_id']}", len(objects), images, annotations))
        extras = dict(mix=names, split_by={n: STANDARD_SPLIT_BY[n] for n in names})
        return args.dataset or "mix", {"train": objects}, extras, {"train": dropped}
    if not args.dataset or not args.split_by:
        raise PackError("give --dataset and --split-by, or --mix")
    refs = _load_refs(root, args.dataset, args.split_by)
    images, annotations = _load_instances(root, args.dataset)
    available = sorted({str(r["split"]) for r in refs}, key=lambda s: (SPLIT_ORDER.get(s, len(SPLIT_ORDER)), s))
    splits = args.splits or available
    for split in splits:
        if split not in available:
            raise PackError(
                f"unknown split {split!r} for {args.dataset} ({args.split_by}); have {', '.join(available)}"
            )
    by_split: dict[str, list[dict]] = {}
    for split in splits:
        chosen = sorted((r for r in refs if r["split"] == split), key=lambda r: int(r["ref_id"]))
        if split == "train":
            # Shuffle once at pack time so a streaming shuffle buffer sees mixed images (fixed seed: reproducible).
            np.random.default_rng(0).shuffle(chosen)
        by_split[split] = [_object_record(r, f"r{r['ref_id']}", i, images, annotations) for i, r in enumerate(chosen)]
    return args.dataset, by_split, dict(mix=None, split_by=args.split_by), {}


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
        raise ValueError(f"image corrupt ({type(e).__name__}: {e})") from None
    if size != (width, height):
        raise ValueError(f"image is {size[0]}x{size[1]}, annotation says {width}x{height}")
    return data


def _render_mask(segmentation: object, height: int, width: int) -> np.ndarray:
    """uint8 (h, w) mask in {0, 1} from COCO polygons or RLE; ValueError when there is no mask."""
    from pycocotools import mask as mask_utils

    if not segmentation:
        raise ValueError("no mask")
    try:
        if isinstance(segmentation, list):  # polygons
            rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
        elif isinstance(segmentation["counts"], list):  # uncompressed RLE
            rle = mask_utils.frPyObjects(segmentation, height, width)
        else:  # compressed RLE
            rle = segmentation
        mask = mask_utils.decode(rle)
    except Exception as e:  # pycocotools rejects malformed input with assorted errors
        raise ValueError(f"no mask (unreadable segmentation: {e})") from None
    if mask.ndim == 3:  # (h, w, n) for a list of RLEs
        mask = mask.max(axis=2)
    if not mask.any():
        raise ValueError("no mask (empty)")
    return mask.astype(np.uint8)


def _encode_object(obj: dict, image_dir: Path, context_length: int) -> dict:
    """The webdataset sample of one object; ValueError names the reason to skip it."""
    sentences = [s for s in obj["sentences"] if s and s.strip()]
    if not sentences:
        raise ValueError("no sentences")
    if obj["segmentation"] is None:
        raise ValueError("annotation missing")
    jpeg = _read_image(image_dir / obj["file_name"], obj["height"], obj["width"])
    mask = _render_mask(obj["segmentation"], obj["height"], obj["width"])
    png = io.BytesIO()
    Image.fromarray(mask * 255).save(png, format="PNG", compress_level=1)
    tokens = tokenize(sentences, context_length).numpy().astype("<i4")  # (K, 17)
    npy = io.BytesIO()
    np.save(npy, tokens, allow_pickle=False)
    meta = [obj["index"], obj["ref_id"], obj["image_id"], obj["ann_id"], obj["height"], obj["width"], len(sentences)]
    fields = ("ref_id", "ann_id", "image_id", "file_name", "height", "width", "category_id", "sent_ids")
    info = {k: obj[k] for k in fields} | {"sentences": sentences, "sample_index": obj["index"]}
    return {
        "__key__": obj["key"],
        "jpg": jpeg,
        "mask.png": png.getvalue(),
        "tokens.npy": npy.getvalue(),
        "json": json.dumps(info).encode(),
        "meta": np.asarray(meta, dtype="<i8").tobytes(),
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fingerprint(objects: list[dict], context_length: int) -> str:
    """Identifies a shard's planned content, so a marker from a different plan is not trusted."""
    text = json.dumps([FORMAT, context_length, [(o["key"], o["file_name"], o["sentences"]) for o in objects]])
    return hashlib.sha256(text.encode()).hexdigest()


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
    tar, idx = out_dir / done["tar"], out_dir / done["idx"]
    if tar.is_file() and idx.is_file() and _sha256(tar) == done["sha256"]:
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
    skipped = []
    with wds.TarWriter(str(tmp_tar)) as writer:
        for obj in job["objects"]:
            try:
                sample = _encode_object(obj, Path(job["image_dir"]), job["context_length"])
            except ValueError as e:
                skipped.append(dict(ref_id=obj["ref_id"], image_id=obj["image_id"], reason=str(e)))
                continue
            writer.write(sample)
            sentence_counts.append(int(np.frombuffer(sample["meta"], dtype="<i8")[6]))  # num_sentences
    samples = len(sentence_counts)
    done = dict(stem=stem, fingerprint=fingerprint, tar=None, idx=None, sha256=None, samples=samples)
    done.update(sentences=sum(sentence_counts), sentence_counts=sentence_counts, skipped=skipped)
    if samples:
        tar, idx, tmp_idx = out_dir / f"{stem}.tar", out_dir / f"{stem}.idx", out_dir / f"{stem}.idx.tmp"
        os.replace(tmp_tar, tar)
        with IndexCreator(str(tar), str(tmp_idx), verbose=False) as creator:
            creator.create_index()
        os.replace(tmp_idx, idx)
        done.update(tar=f"{stem}.tar", idx=f"{stem}.idx", sha256=_sha256(tar))  # relative to OUT/NAME
    else:
        tmp_tar.unlink()
    tmp_marker = out_dir / f"{stem}.done.json.tmp"
    tmp_marker.write_text(json.dumps(done))
    os.replace(tmp_marker, out_dir / f"{stem}.done.json")  # the marker goes last: it certifies the shard
    return done | {"resumed": False}


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Pack a REFER release into webdataset shards (SPEC 4).")
    parser.add_argument("--refer", required=True, help="REFER data root holding DATASET/refs(SPLIT_BY).p")
    parser.add_argument("--dataset", help="refcoco, refcoco+, refcocog, ... (the output folder name with --mix)")
    parser.add_argument("--split-by", help="unc, umd or google: which refs(...).p to read")
    parser.add_argument("--images", required=True, help="folder with the COCO train2014 JPEGs")
    parser.add_argument("--out", required=True, help="output root; shards go to OUT/NAME")
    parser.add_argument("--splits", nargs="+", help="splits to pack (default: all in the refs file)")
    parser.add_argument("--shard-size", type=int, default=1000, help="objects per shard")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="packing processes")
    parser.add_argument("--mix", help="comma-separated datasets whose train splits are packed together")
    parser.add_argument("--context-length", type=int, default=17, help="tokens per sentence")
    args = parser.parse_args(argv)
    if args.shard_size < 1 or args.workers < 1:
        parser.error("--shard-size and --workers must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns 0, or exits with one ``error: ...`` line on bad input."""
    args = _parse_args(argv)
    try:
        name, by_split, extras, dropped = _plan(args)
    except PackError as e:
        sys.exit(f"error: {e}")
    out_dir = Path(args.out) / name
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = []
    for split, objects in by_split.items():
        (out_dir / split).mkdir(exist_ok=True)
        for k in range(0, max(len(objects), 1), args.shard_size):
            chunk = objects[k : k + args.shard_size]
            stem = f"{split}/{k // args.shard_size:06d}"  # OUT/NAME/SPLIT/NNNNNN.{tar,idx,done.json}
            fingerprint = _fingerprint(chunk, args.context_length)
            jobs.append(
                dict(
                    split=split,
                    stem=stem,
                    objects=chunk,
                    fingerprint=fingerprint,
                    out_dir=str(out_dir),
                    image_dir=args.images,
                    context_length=args.context_length,
                )
            )
    total = sum(len(objects) for objects in by_split.values())
    results: dict[str, dict] = {}
    jobs_by_stem = {j["stem"]: j for j in jobs}
    with tqdm(total=total, unit="obj", desc=f"packing {name}") as bar:
        pool = multiprocessing.Pool(args.workers) if args.workers > 1 and len(jobs) > 1 else None
        for done in pool.imap_unordered(_pack_shard, jobs) if pool else map(_pack_shard, jobs):
            results[done["stem"]] = done
            for s in done["skipped"]:
                bar.write(f"skipped ref {s['ref_id']} (image {s['image_id']}): {s['reason']}")
            bar.update(len(jobs_by_stem[done["stem"]]["objects"]))
        if pool:
            pool.close()
            pool.join()
    manifest = dict(format=FORMAT, dataset=name, context_length=args.context_length, **extras, splits={})
    resumed = sum(d["resumed"] for d in results.values())
    for split in by_split:
        shard_done = [results[j["stem"]] for j in jobs if j["split"] == split]
        manifest["splits"][split] = dict(
            objects=sum(d["samples"] for d in shard_done),
            sentences=sum(d["sentences"] for d in shard_done),
            shards=[
                {k: d[k] for k in ("tar", "idx", "samples", "sentences", "sha256", "sentence_counts")}
                for d in shard_done
                if d["tar"]
            ],
            skipped=[dict(ref_id=s["ref_id"], reason=s["reason"]) for d in shard_done for s in d["skipped"]],
            dropped=dropped.get(split, 0),
        )
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    for split, info in manifest["splits"].items():
        print(
            f"{split}: {info['objects']} objects, {info['sentences']} sentences, {len(info['shards'])} shards, "
            f"{len(info['skipped'])} skipped, {info['dropped']} dropped"
        )
    print(f"wrote {out_dir / 'manifest.json'} ({resumed} of {len(jobs)} shards were already complete)")
    return 0

