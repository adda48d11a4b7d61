"""The PyTorch loader: webdataset tar reading, PIL decoding and the letterbox of :mod:`dcris.data.letterbox`.

It reads the ``jpg``, ``mask.png``, ``tokens.npy`` (``np.load``) and ``meta`` fields of each sample (the shard
format is described in ``shards/pack.py``).

DataLoader workers decode and stack chunks of the rank's range (see :class:`_RankParts`); for training each worker
shuffles through a buffer, on top of the order the packer shuffled once; the main process normalises on the
device.
"""

from __future__ import annotations

import io
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from dcris.data.common import ShardLoader, concat_rows, rank_range, take_rows
from dcris.data.letterbox import letterbox_image, letterbox_mask, normalize_image


def decode_sample(sample: dict[str, Any], image_size: int, context_length: int, keep_orig: bool) -> dict[str, Any]:
    """One shard sample (raw bytes per extension: jpg, mask.png, tokens.npy, meta) to letterboxed arrays.

    Returns:
        image uint8 (S, S, 3), mask float32 (1, S, S), tokens int64 (K, 17), meta int64 (7,) and, with
        ``keep_orig``, orig_mask uint8 (h, w) in {0, 1}.
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
    return out


def _stack(samples: list[dict[str, Any]], max_sentences: int) -> dict[str, Any]:
    """Stack decoded samples (one tensor per field: cheap to hand from a worker to the main process)."""
    tokens_all = torch.zeros(len(samples), max_sentences, samples[0]["tokens"].shape[1], dtype=torch.long)
    for i, s in enumerate(samples):
        tokens_all[i, : len(s["tokens"])] = s["tokens"]  # (K, 17) into (K_max, 17)
    part = dict(
        image=torch.stack([s["image"] for s in samples]),  # (B, S, S, 3) uint8
        mask=torch.stack([s["mask"] for s in samples]),  # (B, 1, S, S)
        tokens_all=tokens_all,  # (B, K_max, 17)
        meta=torch.stack([s["meta"] for s in samples]),  # (B, 7)
    )
    if "orig_mask" in samples[0]:
        part["orig_mask"] = [s["orig_mask"] for s in samples]
    return part


class _RankParts(torch.utils.data.IterableDataset):
    """Stacked parts of up to batch_size decoded samples of one rank's range.

    The range is cut into chunks of batch_size consecutive samples and worker w of n decodes chunks w, w + n,
    ...: in evaluation the DataLoader's round-robin over workers then returns the chunks in order.
    """

    def __init__(self, loader: TorchShardLoader) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[dict[str, Any]]:
        ld = self.loader
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        start, end = rank_range(ld.info["objects"], ld.range_index, ld.world_size)
        # First global sample index of every shard, to read only the shards that overlap the range.
        firsts = np.cumsum([0] + [s["samples"] for s in ld.info["shards"]])
        urls = [
            (url, int(first))
            for (url, _), first, last in zip(ld.shard_paths, firsts[:-1], firsts[1:], strict=True)
            if first < end and last > start
        ]
        rng = random.Random(f"{ld.seed}-{ld.epoch}-{ld.rank}-{worker}")  # str seeds are stable across runs
        if ld.train:
            rng.shuffle(urls)
        samples = self._select(urls, start, end, ld.batch_size, worker, num_workers)
        if ld.train:
            samples = wds.shuffle(ld.shuffle_buffer, min(ld.shuffle_buffer, 100), rng=rng)(samples)
        chunk = []
        for sample in samples:
            chunk.append(decode_sample(sample, ld.image_size, ld.context_length, keep_orig=not ld.train))
            if len(chunk) == ld.batch_size:
                yield _stack(chunk, ld.max_sentences)
                chunk = []
        if chunk:
            yield _stack(chunk, ld.max_sentences)

    @staticmethod
    def _select(
        urls: list[tuple[str, int]], start: int, end: int, chunk: int, worker: int, num_workers: int
    ) -> Iterator[dict[str, Any]]:
        """Raw samples of the chunks of the range assigned to this worker, read shard by shard."""
        for url, first in urls:
            for offset, sample in enumerate(wds.tarfile_samples([{"url": url}])):
                position = first + offset - start
                if 0 <= position < end - start and (position // chunk) % num_workers == worker:
                    yield sample


def _as_is(part: dict[str, Any]) -> dict[str, Any]:
    # Keeps orig_mask a list of numpy arrays (the default collate would turn them into tensors).
    return part


class TorchShardLoader(ShardLoader):
    """webdataset + PIL implementation of :class:`~dcris.data.common.ShardLoader`."""

    def object_batches(self) -> Iterator[dict[str, Any]]:
        loader = torch.utils.data.DataLoader(
            _RankParts(self), batch_size=None, num_workers=self.workers, collate_fn=_as_is
        )
        pending: dict[str, Any] | None = None
        # Workers' parts may be short (ends of their streams); regroup them into full batches.
        for part in loader:
            pending = part if pending is None else concat_rows(pending, part)
            while pending is not None and len(pending["meta"]) >= self.batch_size:
                yield self._to_device(take_rows(pending, torch.arange(self.batch_size)))
                rest = torch.arange(self.batch_size, len(pending["meta"]))
                pending = take_rows(pending, rest) if len(rest) else None
        if pending is not None:
            yield self._to_device(pending)

    def _to_device(self, part: dict[str, Any]) -> dict[str, Any]:
        """Object batch: normalised image, mask and tokens on the device (uint8 crosses the bus, not float)."""
        image = part["image"].to(self.device, non_blocking=True).permute(0, 3, 1, 2)  # (B, 3, S, S) uint8
        part["image"] = normalize_image(image)
        part["mask"] = part["mask"].to(self.device, non_blocking=True)
        part["tokens_all"] = part["tokens_all"].to(self.device, non_blocking=True)
        return part
