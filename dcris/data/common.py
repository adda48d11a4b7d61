"""What both loaders share: the manifest, per-rank ranges, sentence choice and the batch contract.

Shards live in ``SHARDS/SPLIT/NNNNNN.tar`` (with ``NNNNNN.idx`` beside them) and ``SHARDS/manifest.json`` lists
them per split, paths relative to ``SHARDS``; the sample format (``jpg``, ``mask.png``, ``tokens.npy``,
``json``, ``meta``) is described in ``shards/pack.py``.

Each loader (DALI, PyTorch) only turns shard samples into *object batches* -- one item per referred object:

    image        float32 (B, 3, S, S), letterboxed and CLIP-normalised, on the loader's device
    mask         float32 (B, 1, S, S) in [0, 1], on the device
    tokens_all   int64 (B, K, L): every sentence of the object, zero rows past its count, on the device
    meta         int64 (B, 8) on the CPU: sample_index, ref_id, image_id, ann_id, height, width, num_sentences,
                 num_targets ((B, 7) from shards packed before num_targets: see :func:`target_counts`)
    orig_mask    evaluation only: list of B uint8 (h, w) arrays in {0, 1}
    sentence     training with ``sample="sentence"`` only: int64 (B,) on the CPU, the sentence of each item

:class:`ShardLoader` turns those into the batches trainers see (the contract in ``dcris.data``): training
takes one sentence per item, evaluation emits one item per (object, sentence) and re-batches.

What a training epoch visits (``sample``, :func:`shard_units`): ``"object"`` visits every object once, with one
of its sentences drawn from (seed, epoch, sample), as the released DETRIS trains RefCOCO; ``"sentence"`` visits
every (object, sentence) pair once, as ReLA trains gRefCOCO, so an object of K sentences is read K times an
epoch and the epoch holds the split's sentences, not its objects. Both loaders read these *units* in place of
samples: every count and range below is of units (of objects for evaluation, which visits every pair anyway).

Sharding across ranks (exact, the same in both loaders): the split's shards are put in the epoch's order -- the
manifest's order for evaluation, for training a permutation drawn from (seed, epoch), the same on every rank,
so every epoch cuts the data differently and a resumed epoch reads exactly what it read before -- and their
units are cut into ``world_size`` contiguous ranges, rank r reading ``[r * N // W, (r + 1) * N // W)``: the
split NVIDIA DALI's readers make for ``shard_id``/``num_shards``. For evaluation every sample is read once over
all ranks, in order. Training yields ``(N // W) // batch_size`` full batches on every rank, so ranks never
disagree on the number of steps. (The packer shuffled every split once, so any range mixes images and, for a
mixed split, data sets.)

A shard whose tar no longer matches its index (truncated, or bytes overwritten after packing) stops either loader
with the same :func:`broken_shard` error, naming the file and the fix: a tar shorter than its index reaches, a
field's tar header that does not record the index's name and size, or a field that does not decode.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dcris.config import SAMPLING
from dcris.errors import UserError

META_FIELDS = ("sample_index", "ref_id", "image_id", "ann_id", "height", "width", "num_sentences", "num_targets")
SHARD_FORMAT = "dcris-shards/4"  # the manifest's ``format``: what shards/pack.py writes and the loaders read


def read_manifest(shards_dir: str | Path) -> dict:
    """The ``manifest.json`` written by ``shards/pack.py``; a folder without one, or of another format, is a user
    error."""
    path = Path(shards_dir) / "manifest.json"
    if not path.is_file():
        raise UserError(f"no manifest.json in {shards_dir}: pack the data with shards/pack.py first")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != SHARD_FORMAT:
        raise UserError(
            f"the shards in {shards_dir} are of format {manifest.get('format')!r}, this version reads "
            f"{SHARD_FORMAT!r}: repack them with shards/pack.py"
        )
    return manifest


def shards_context_length(shards_dir: str | Path) -> int:
    """Tokens per sentence in a shards folder (``context_length`` of its manifest): what a model must read."""
    return int(read_manifest(shards_dir)["context_length"])


def check_context_length(model_length: int, shards_length: int, shards_dir: str | Path) -> None:
    """Stops, in one line naming both lengths and the folder, when a model reads another length than the shards."""
    if model_length != shards_length:
        raise UserError(
            f"the model reads {model_length}-token sentences but the shards in {shards_dir} hold {shards_length}-token "
            f"rows: repack with --context-length {model_length}, or use a model of context length {shards_length}"
        )


TAR_BLOCK = 512  # a tar member's header block, just before its bytes


def broken_shard(tar: str | Path, problem: str) -> UserError:
    """The one error for a shard whose tar no longer matches its index (truncated, overwritten or copied in part
    after packing), whichever loader meets it: names the file, what is wrong and the fix."""
    return UserError(
        f"shard {tar} is broken: {problem}. It changed after packing (truncated or overwritten): re-copy the shard, "
        "or rerun the python shards/pack.py command that wrote it (it repacks every shard whose sha256 no longer "
        "matches)"
    )


def check_tar_covers(tar: str | Path, tar_size: int, index_end: int) -> None:
    """Stops when a tar of ``tar_size`` bytes ends before ``index_end``, where its index says its last field ends."""
    if tar_size < index_end:
        raise broken_shard(tar, f"it has {tar_size} bytes but its index lists fields up to byte {index_end}")


def check_member_header(tar: str | Path, header: bytes, name: str, size: int) -> None:
    """Stops when the tar header block before a field's bytes does not record that field (``name``, ``size``: the
    index's), i.e. the tar's bytes have moved or been overwritten since the index was made."""
    member = header[:100].split(b"\0", 1)[0].decode(errors="replace")
    try:
        recorded = int(header[124:136].split(b"\0", 1)[0].strip() or b"-1", 8)  # octal, NUL or space terminated
    except ValueError:
        recorded = -1
    if member != name[:100] or recorded != size:  # long names are cut to the header's 100 bytes
        raise broken_shard(
            tar,
            f"the tar header before the bytes of {name} records {member!r} ({recorded} bytes) where its index "
            f"has {name!r} ({size} bytes)",
        )


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``; a host-to-GPU copy goes from pinned memory without blocking the host."""
    if device.type == "cuda" and tensor.device.type == "cpu" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def split_info(manifest: dict, split: str, shards_dir: str | Path) -> dict:
    """The manifest entry of one split; an unknown split is a user error naming the splits there are."""
    splits = manifest["splits"]
    if split not in splits:
        raise UserError(f"split {split!r} not in {shards_dir} (have {', '.join(splits)})")
    return splits[split]


def generalized_split(shards_dir: str | Path, split: str) -> bool:
    """Whether a packed split is gRefCOCO-style (the packer counted its no-target refs): scored with GRES metrics."""
    return "no_target" in split_info(read_manifest(shards_dir), split, shards_dir)


def num_samples(shards_dir: str | Path, split: str, train: bool) -> int:
    """Samples of a split over all ranks: objects for training, (object, sentence) pairs for evaluation."""
    info = split_info(read_manifest(shards_dir), split, shards_dir)
    return info["objects"] if train else info["sentences"]


def rank_range(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous ``[start, end)`` sample range of one rank (DALI's shard formula)."""
    return rank * total // world_size, (rank + 1) * total // world_size


def sentence_index(seed: int, epoch: int, sample_index: int, num_sentences: int) -> int:
    """The sentence trained on for an object in an epoch: random, but fixed by (seed, epoch, sample)."""
    return int(np.random.default_rng((seed, epoch, sample_index)).integers(num_sentences))


def shard_units(sentence_counts: list[int], sample: str) -> tuple[np.ndarray, np.ndarray]:
    """What an epoch visits of one shard, in the shard's order (module docstring).

    Args:
        sentence_counts: Sentences of each sample of the shard (its manifest entry's ``sentence_counts``).
        sample: ``"object"`` or ``"sentence"``.

    Returns:
        int64 (U,) the sample (position in the shard) of each unit, and int64 (U,) its sentence: every sample
        once with sentence -1 (drawn per epoch by :func:`sentence_index`) for ``"object"``; every (sample,
        sentence) pair, a sample's sentences in order, for ``"sentence"``.
    """
    counts = np.asarray(sentence_counts, dtype=np.int64)
    if sample == "object":
        return np.arange(len(counts)), np.full(len(counts), -1)
    starts = np.cumsum(counts) - counts  # (n,) the first unit of every sample
    samples = np.repeat(np.arange(len(counts)), counts)
    return samples, np.arange(int(counts.sum())) - starts[samples]


def target_counts(meta: torch.Tensor) -> torch.Tensor:
    """int64 (B,) objects in each sample's target (0: its phrases name nothing) from meta (B, 8); meta of the older
    7 fields (shards packed before the count was recorded, all REFER releases of one object per ref) gives 1."""
    if meta.shape[1] > META_FIELDS.index("num_targets"):
        return meta[:, META_FIELDS.index("num_targets")]
    return torch.ones(len(meta), dtype=torch.long)


def take_rows(batch: dict[str, Any], index: torch.Tensor) -> dict[str, Any]:
    """Rows ``index`` (a host tensor) of every field of a batch (tensors on their own device, lists by
    position); the index crosses to each other device once, without waiting."""
    out = {}
    moved = {index.device: index}
    for key, value in batch.items():
        if isinstance(value, list):
            out[key] = [value[i] for i in index.tolist()]
            continue
        if value.device not in moved:
            moved[value.device] = to_device(index, value.device)
        out[key] = value[moved[value.device]]
    return out


def concat_rows(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Rows of ``a`` followed by the rows of ``b``, field by field."""
    return {k: a[k] + b[k] if isinstance(a[k], list) else torch.cat([a[k], b[k]]) for k in a}


class ShardLoader:
    """Iterable over the batches of one epoch; subclasses provide :meth:`object_batches`.

    Args:
        shards_dir: Directory with ``manifest.json`` and the shards.
        split: Split to read.
        train: Training (shuffled, one sentence per unit, full batches only) or evaluation
            (in order, every sentence, last batch partial).
        batch_size: Items per batch on this rank.
        image_size: Side of the letterboxed square.
        rank: This process's rank.
        world_size: Number of ranks.
        seed: Seed of the shuffle and of the sentence choice.
        workers: Decoding threads / processes.
        device: Where image, mask and tokens are put.
        epoch: Epoch to iterate (when training, it changes the shard order, hence the rank's range, the order
            within it and the sentence choice).
        shuffle_buffer: Units in the training shuffle buffer.
        context_length: Tokens per sentence the model reads; when given, shards of another length are a user
            error (one line naming both lengths).
        mask_size: Side of the training ``mask`` (default: ``image_size``): the canvas mask resized (nearest) to
            it, what the loss compares the logits with, so the logits' side gives the same loss from fewer pixels.
            Evaluation's mask stays at ``image_size``.
        start_batch: Training only: batches of the epoch already consumed (a resumed run's position). Iteration
            begins after them, and neither loader decodes the samples they hold.
        sample: Training only: what an epoch visits once, ``"object"`` or ``"sentence"`` (module docstring);
            evaluation visits every (object, sentence) pair whatever it is.
    """

    def __init__(
        self,
        shards_dir: str | Path,
        split: str,
        *,
        train: bool,
        batch_size: int,
        image_size: int = 448,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        workers: int = 2,
        device: str | torch.device = "cpu",
        epoch: int = 0,
        shuffle_buffer: int = 1000,
        context_length: int | None = None,
        mask_size: int | None = None,
        start_batch: int = 0,
        sample: str = "object",
    ) -> None:
        if sample not in SAMPLING:
            raise ValueError(f"sample must be one of {', '.join(SAMPLING)}, got {sample!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if start_batch and not train:
            raise ValueError("start_batch is for training loaders only")
        self.shards_dir = Path(shards_dir)
        self.split = split
        manifest = read_manifest(shards_dir)  # read once: the split's entry and the context length
        self.info = split_info(manifest, split, shards_dir)
        self.train = train
        self.batch_size = batch_size
        self.image_size = image_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.workers = workers
        self.device = torch.device(device)
        self.epoch = epoch
        self.shuffle_buffer = shuffle_buffer
        self.mask_size = mask_size if train and mask_size is not None else image_size
        self.start_batch = start_batch
        self.sample = sample if train else "object"  # evaluation reads objects and emits all their sentences
        self.context_length = int(manifest["context_length"])
        if context_length is not None:
            check_context_length(context_length, self.context_length, shards_dir)
        # The most sentences any object of the split has: the K of tokens_all.
        self.max_sentences = max((c for s in self.info["shards"] for c in s["sentence_counts"]), default=1)

    def epoch_shards(self) -> list[dict]:
        """The split's shard entries (manifest ``shards``) in this epoch's order (module docstring), each with
        ``tar`` and ``idx`` made full paths (the manifest records them relative to the shards folder)."""
        root = self.shards_dir
        shards = [dict(s, tar=str(root / s["tar"]), idx=str(root / s["idx"])) for s in self.info["shards"]]
        return [shards[i] for i in self.shard_order(self.epoch)]

    def shard_order(self, epoch: int) -> list[int]:
        """Manifest positions of the split's shards in the order of ``epoch`` (module docstring)."""
        count = len(self.info["shards"])
        if not self.train:
            return list(range(count))
        return np.random.default_rng((self.seed, epoch)).permutation(count).tolist()

    def units(self, shard: dict) -> tuple[np.ndarray, np.ndarray]:
        """:func:`shard_units` of one shard entry under this loader's ``sample``."""
        return shard_units(shard["sentence_counts"], self.sample)

    def num_units(self) -> int:
        """Units of the split over all ranks: its objects, or its (object, sentence) pairs under sentence sampling."""
        return sum(len(self.units(s)[0]) for s in self.info["shards"])

    def __len__(self) -> int:
        """Batches this rank yields in one epoch (after ``start_batch``)."""
        if self.train:
            return max(0, self.epoch_batches() - self.start_batch)
        start, end = rank_range(self.info["objects"], self.rank, self.world_size)
        counts = [c for s in self.info["shards"] for c in s["sentence_counts"]][start:end]
        return -(-sum(counts) // self.batch_size)

    def epoch_batches(self) -> int:
        """Training batches of a whole epoch on this rank: the same on every rank, and ``N // global batch`` steps
        for any number of ranks at one global batch (``(N // W) // B == N // (W * B)``), N counting units."""
        return (self.num_units() // self.world_size) // self.batch_size

    def object_batches(self) -> Iterator[dict[str, Any]]:
        """Object batches (module docstring) of this rank's range for the current epoch, after ``start_batch``."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.train:
            yield from self._train_batches()
        else:
            yield from self._eval_batches()

    def _train_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        steps = len(self)
        if steps == 0:
            return
        for step, batch in enumerate(self.object_batches()):
            meta = batch["meta"]
            choice = self.chosen_sentences(batch)  # one per item
            device = batch["tokens_all"].device
            rows = torch.arange(len(choice), device=device)
            tokens = batch["tokens_all"][rows, to_device(torch.tensor(choice), device)]  # (B, L)
            yield dict(
                image=batch["image"], mask=batch["mask"], tokens=tokens, ref_id=meta[:, 1],
                num_targets=target_counts(meta),
            )  # fmt: skip
            if step + 1 == steps:
                return

    def chosen_sentences(self, batch: dict[str, Any]) -> list[int]:
        """The sentence each item of an object batch trains on: its unit's under sentence sampling, else the one
        drawn for its object from (seed, epoch, sample)."""
        if self.sample == "sentence":
            return batch["sentence"].tolist()
        return [sentence_index(self.seed, self.epoch, int(m[0]), int(m[6])) for m in batch["meta"]]

    def _eval_batches(self) -> Iterator[dict[str, Any]]:
        pending: dict[str, Any] | None = None
        for batch in self.object_batches():
            meta = batch["meta"]  # (B, 8), or (B, 7) from older shards
            counts = meta[:, 6]
            obj = torch.repeat_interleave(torch.arange(len(counts)), counts)  # (P,) object of each pair
            sent = torch.cat([torch.arange(int(c)) for c in counts])  # (P,) sentence index within its object
            tokens_all = batch["tokens_all"]
            on_device = to_device(obj, tokens_all.device)  # image, mask and tokens share the loader's device
            items = dict(
                image=batch["image"][on_device],
                mask=batch["mask"][on_device],
                tokens=tokens_all[on_device, to_device(sent, tokens_all.device)],  # (P, L)
                ref_id=meta[obj, 1],
                num_targets=target_counts(meta)[obj],
                sent_idx=sent,
                orig_size=meta[obj][:, 4:6],  # (P, 2): h, w
                orig_mask=[batch["orig_mask"][i] for i in obj.tolist()],
            )
            pending = items if pending is None else concat_rows(pending, items)
            while len(pending["ref_id"]) >= self.batch_size:
                head = torch.arange(self.batch_size)
                yield take_rows(pending, head)
                pending = take_rows(pending, torch.arange(self.batch_size, len(pending["ref_id"])))
        if pending is not None and len(pending["ref_id"]):
            yield pending
