"""The PyTorch loader: tar reading through the DALI index + PIL letterbox (the reference the DALI loader is tested
against).

It reads the ``jpg``, ``mask.png``, ``tokens.npy`` (``np.load``) and ``meta`` fields of each sample (the shard
format is described in ``shards/pack.py``) straight from their offsets in the tar, which the shard's ``.idx``
file lists, so each DataLoader worker reads only its own share of the rank's range (see :class:`_RankParts`);
under sentence sampling a sample read once goes on as one item per (sample, sentence) unit of the range.
For training each worker visits its chunks in a seeded random order and shuffles through a buffer, on top of
the order the packer shuffled once; the main process normalises on the device. A broken shard
(:mod:`dcris.data.common`) met in a worker reaches the main process as the same one-line UserError.
"""

from __future__ import annotations

import gc
import io
import itertools
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image, UnidentifiedImageError

from dcris.data.common import (
    TAR_BLOCK,
    ShardLoader,
    broken_shard,
    check_member_header,
    check_tar_covers,
    concat_rows,
    rank_range,
    take_rows,
    to_device,
)
from dcris.data.letterbox import letterbox_image, letterbox_mask, normalize_image
from dcris.errors import UserError

FIELDS = ("jpg", "mask.png", "tokens.npy", "meta")  # what the loader reads of each sample
# What PIL and np.load raise on bytes that are not the image or array they should be.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError)


def decode_reason(error: Exception) -> str:
    """What a decode error says, without the in-memory file object PIL names when it recognises no format."""
    return "not an image" if isinstance(error, UnidentifiedImageError) else str(error)


def decode_sample(sample: dict[str, Any], image_size: int, context_length: int, keep_orig: bool) -> dict[str, Any]:
    """One shard sample (raw bytes per extension: jpg, mask.png, tokens.npy, meta) to letterboxed arrays.

    Returns:
        image uint8 (S, S, 3), mask float32 (1, S, S), tokens int64 (K, 17), meta int64 (8,) (older shards: (7,)),
        with ``keep_orig`` orig_mask uint8 (h, w) in {0, 1}, and for a sentence unit (``__sentence__`` in the
        sample) its sentence: int64 ().
    """
    meta = np.frombuffer(sample["meta"], dtype="<i8")
    tokens = np.load(io.BytesIO(sample["tokens.npy"]), allow_pickle=False)  # int32 (K, 17)
    if tokens.ndim != 2 or tokens.shape[1] != context_length:
        raise ValueError(f"tokens.npy of sample {sample.get('__key__')} has shape {tokens.shape}")
    with Image.open(io.BytesIO(sample["jpg"])) as im:
        image = letterbox_image(im, image_size)
    with Image.open(io.BytesIO(sample["mask.png"])) as im:
        orig_mask = (np.asarray(im.convert("L")) > 127).astype(np.uint8)
    out = dict(
        image=torch.from_numpy(image),
        mask=torch.from_numpy(letterbox_mask(orig_mask, image_size))[None],
        tokens=torch.from_numpy(tokens.astype(np.int64)),
        meta=torch.from_numpy(meta.copy()),
    )
    if keep_orig:
        out["orig_mask"] = orig_mask
    if "__sentence__" in sample:
        out["sentence"] = torch.tensor(sample["__sentence__"])
    return out


def _stack(samples: list[dict[str, Any]], max_sentences: int) -> dict[str, Any]:
    """Stack decoded samples (one tensor per field: cheap to hand from a worker to the main process)."""
    tokens_all = torch.zeros(len(samples), max_sentences, samples[0]["tokens"].shape[1], dtype=torch.long)
    for i, s in enumerate(samples):
        tokens_all[i, : len(s["tokens"])] = s["tokens"]  # (K, L) into (K_max, L)
    part = dict(
        image=torch.stack([s["image"] for s in samples]),  # (B, S, S, 3) uint8
        mask=torch.stack([s["mask"] for s in samples]),  # (B, 1, S, S)
        tokens_all=tokens_all,  # (B, K_max, L)
        meta=torch.stack([s["meta"] for s in samples]),  # (B, 8), or (B, 7) from older shards
    )
    if "orig_mask" in samples[0]:
        part["orig_mask"] = [s["orig_mask"] for s in samples]
    if "sentence" in samples[0]:
        part["sentence"] = torch.stack([s["sentence"] for s in samples])  # (B,)
    return part


def read_index(path: str) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """Where each sample of a shard lies in its tar, from the shard's DALI index file.

    The index (wds2idx, format v1.2) is a header line, then a line per sample listing ``ext offset size name``
    for each of its fields, ``offset`` being where the field's bytes start in the tar.

    Returns:
        Per sample, its key and ``{ext: (offset, size)}``.
    """
    with open(path) as f:
        lines = f.read().splitlines()
    samples = []
    for line in lines[1:]:
        parts = line.split()
        fields = {parts[k]: (int(parts[k + 1]), int(parts[k + 2])) for k in range(0, len(parts), 4)}
        samples.append((parts[3].split(".", 1)[0], fields))
    return samples


def read_shard_index(tar: str, idx: str) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """:func:`read_index` of a shard, checked against its tar: an index that does not parse, or lists bytes past
    the end of the tar (a truncated copy), stops the run naming the shard."""
    try:
        index = read_index(idx)
    except (ValueError, IndexError) as e:
        raise broken_shard(tar, f"its index {idx} does not parse ({e})") from None
    index_end = max((o + n for _, fields in index for o, n in fields.values()), default=0)
    check_tar_covers(tar, os.path.getsize(tar), index_end)
    return index


def read_samples(
    tar: str, index: list[tuple[str, dict[str, tuple[int, int]]]], lo: int, hi: int
) -> Iterator[dict[str, Any]]:
    """Samples ``lo`` to ``hi - 1`` of a shard (raw bytes per field, and ``__tar__``: the shard), read as one
    contiguous piece of the tar; each field's tar header is checked against the index on the way."""
    entries = index[lo:hi]
    spans = [span for _, fields in entries for span in fields.values()]
    begin, end = min(o for o, _ in spans) - TAR_BLOCK, max(o + n for o, n in spans)  # from the first header on
    with open(tar, "rb") as f:
        f.seek(begin)
        data = f.read(end - begin)
    check_tar_covers(tar, begin + len(data), end)  # a shard truncated while the run reads it
    for key, fields in entries:
        sample: dict[str, Any] = {"__key__": key, "__tar__": tar}
        for ext in FIELDS:
            offset, size = fields[ext]
            at = offset - begin
            check_member_header(tar, data[at - TAR_BLOCK : at], f"{key}.{ext}", size)
            sample[ext] = data[at : at + size]
        yield sample


def chunk_segments(sizes: list[int], start: int, end: int, chunk: int) -> list[list[tuple[int, int, int]]]:
    """``[start, end)`` of the concatenated shards cut into chunks of ``chunk`` samples (the last may be short).

    Args:
        sizes: Samples of each shard, in reading order.
        start: First sample (counted over the concatenation).
        end: One past the last sample.
        chunk: Samples per chunk.

    Returns:
        Per chunk, its pieces ``(shard position, first, end)``, sample numbers within that shard.
    """
    firsts = [int(f) for f in np.cumsum([0, *sizes])]  # (S + 1,) first sample of every shard, then the total
    chunks = []
    for lo in range(start, end, chunk):
        hi = min(lo + chunk, end)
        first_shard = int(np.searchsorted(firsts, lo, side="right")) - 1  # the shard holding sample lo
        last_shard = int(np.searchsorted(firsts, hi, side="left"))  # one past the shard holding sample hi - 1
        shards = range(first_shard, last_shard)
        chunks.append([(k, max(lo, firsts[k]) - firsts[k], min(hi, firsts[k + 1]) - firsts[k]) for k in shards])
    return chunks


@dataclass
class _WorkerUserError:
    """A UserError met in a DataLoader worker, handed to the main process as data: raised there, it would arrive
    as another exception carrying the worker's traceback."""

    message: str


class _RankParts(torch.utils.data.IterableDataset):
    """Stacked parts of up to batch_size decoded units (:mod:`dcris.data.common`) of one rank's range.

    The range is cut into chunks of batch_size consecutive units and worker w of n reads and decodes only chunks
    w, w + n, ...: in evaluation (no shuffle, one part per chunk) the DataLoader's round-robin over workers then
    returns the chunks in order; in training each worker takes its chunks in a random order drawn from (seed,
    epoch, rank, worker) and shuffles their units through a buffer. Worker w first passes over
    ``skipped_parts[w]`` parts of its stream undecoded: raw bytes still run through the shuffle buffer, so what
    follows is exactly what it would have been.
    """

    def __init__(self, loader: TorchShardLoader, skipped_parts: list[int]) -> None:
        self.loader, self.skipped_parts = loader, skipped_parts

    @staticmethod
    def worker_chunks(loader: TorchShardLoader, worker: int, num_workers: int) -> list[list[tuple[int, int, int]]]:
        """The chunks of the rank's range that ``worker`` of ``num_workers`` reads, in range order."""
        sizes = [len(loader.units(s)[0]) for s in loader.epoch_shards()]  # units of each shard, in reading order
        start, end = rank_range(loader.num_units(), loader.rank, loader.world_size)
        return chunk_segments(sizes, start, end, loader.batch_size)[worker::num_workers]

    def __iter__(self) -> Iterator[dict[str, Any] | _WorkerUserError]:
        try:
            yield from self._parts()
        except UserError as e:
            if torch.utils.data.get_worker_info() is None:  # in the main process: it needs no carrying
                raise
            yield _WorkerUserError(str(e))

    def _parts(self) -> Iterator[dict[str, Any]]:
        ld = self.loader
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        shards = ld.epoch_shards()
        mine = self.worker_chunks(ld, worker, num_workers)
        rng = random.Random(f"{ld.seed}-{ld.epoch}-{ld.rank}-{worker}")  # str seeds are stable across runs
        if ld.train:
            rng.shuffle(mine)
        samples = self._read(shards, mine)
        if ld.train:
            samples = wds.shuffle(ld.shuffle_buffer, min(ld.shuffle_buffer, 100), rng=rng)(samples)
            samples = itertools.islice(samples, self.skipped_parts[worker] * ld.batch_size, None)
        part = []
        for sample in samples:
            try:
                part.append(decode_sample(sample, ld.image_size, ld.context_length, keep_orig=not ld.train))
            except DECODE_ERRORS as e:
                problem = f"sample {sample['__key__']} does not decode ({decode_reason(e)})"
                raise broken_shard(sample["__tar__"], problem) from None
            if len(part) == ld.batch_size:
                yield _stack(part, ld.max_sentences)
                part = []
        if part:
            yield _stack(part, ld.max_sentences)

    def _read(self, shards: list[dict], chunks: list[list[tuple[int, int, int]]]) -> Iterator[dict[str, Any]]:
        """Raw samples of the units of the given chunks, in order, with ``__sentence__`` (the unit's sentence)
        under sentence sampling; each shard's index is read once, when first needed, and each piece's samples in
        one read."""
        indices: dict[int, list[tuple[str, dict[str, tuple[int, int]]]]] = {}
        for pieces in chunks:
            for k, lo, hi in pieces:
                if k not in indices:
                    indices[k] = read_shard_index(shards[k]["tar"], shards[k]["idx"])
                samples, sentences = (units[lo:hi] for units in self.loader.units(shards[k]))
                first = int(samples[0])
                raw = list(read_samples(shards[k]["tar"], indices[k], first, int(samples[-1]) + 1))
                for sample, sentence in zip(samples.tolist(), sentences.tolist(), strict=True):
                    yield raw[sample - first] if sentence < 0 else dict(raw[sample - first], __sentence__=sentence)


def _as_is(part: dict[str, Any]) -> dict[str, Any]:
    # Keeps orig_mask a list of numpy arrays (the default collate would turn them into tensors).
    return part


class TorchShardLoader(ShardLoader):
    """Tar + PIL implementation of :class:`~dcris.data.common.ShardLoader`."""

    def skipped_parts(self) -> tuple[list[int], int]:
        """How ``start_batch`` is skipped: parts each worker passes over undecoded, and batches still to drop after
        decoding.

        The DataLoader takes one part from each worker in turn, so only whole rounds of full parts can be skipped
        in the workers without changing the order of what follows; the rest (fewer than a round, or the epoch's
        tail, where short parts are regrouped) is decoded and dropped.
        """
        workers = max(1, self.workers)
        full = [
            sum(hi - lo for pieces in _RankParts.worker_chunks(self, w, workers) for _, lo, hi in pieces)
            // self.batch_size
            for w in range(workers)
        ]
        rounds = min(min(full), self.start_batch // workers)
        return [rounds] * workers, self.start_batch - rounds * workers

    def object_batches(self) -> Iterator[dict[str, Any]]:
        skipped, dropped = self.skipped_parts()
        batches = self._regrouped(skipped)
        for _ in range(dropped):
            next(batches, None)
        yield from batches

    def _regrouped(self, skipped_parts: list[int]) -> Iterator[dict[str, Any]]:
        if self.workers:
            # Garbage is collected here, not in the forked workers: a DALI pipeline among it (one of an earlier
            # loader of this process) would shut down in a child that has none of its threads, and hang there.
            gc.collect()
        loader = torch.utils.data.DataLoader(
            _RankParts(self, skipped_parts),
            batch_size=None,
            num_workers=self.workers,
            collate_fn=_as_is,
            pin_memory=self.device.type == "cuda",  # pinned parts cross to the GPU without blocking the host
        )
        pending: dict[str, Any] | None = None
        # Parts are full batches except at the ends of the workers' streams; regroup those into full batches.
        for part in loader:
            if isinstance(part, _WorkerUserError):
                raise UserError(part.message)
            if pending is None and len(part["meta"]) == self.batch_size:
                yield self._to_device(part)  # the usual case: no copy, the pinned tensors go as they are
                continue
            pending = part if pending is None else concat_rows(pending, part)
            while pending is not None and len(pending["meta"]) >= self.batch_size:
                yield self._to_device(take_rows(pending, torch.arange(self.batch_size)))
                rest = torch.arange(self.batch_size, len(pending["meta"]))
                pending = take_rows(pending, rest) if len(rest) else None
        if pending is not None:
            yield self._to_device(pending)

    def _to_device(self, part: dict[str, Any]) -> dict[str, Any]:
        """Object batch: normalised image, mask and tokens on the device (uint8 crosses the bus, not float)."""
        image = to_device(part["image"], self.device).permute(0, 3, 1, 2)  # (B, 3, S, S) uint8
        part["image"] = normalize_image(image)
        mask = to_device(part["mask"], self.device)  # (B, 1, S, S)
        if self.mask_size != self.image_size:  # the loss's own resize, done once here
            mask = F.interpolate(mask, size=self.mask_size, mode="nearest")
        part["mask"] = mask
        part["tokens_all"] = to_device(part["tokens_all"], self.device)
        return part
