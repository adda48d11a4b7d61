"""The NVIDIA DALI loader: one pipeline per run, fed the encoded bytes of the samples each batch needs.

Reading: the loader plans every batch itself -- the rank's range of the units (:mod:`dcris.data.common`: objects,
or (object, sentence) pairs) in the epoch's shard order, for training shuffled within consecutive windows of
``shuffle_buffer`` units by a permutation drawn from (seed, epoch, rank) -- and an external source hands the
pipeline the ``jpg`` and ``mask.png`` bytes of those units' samples, sliced from the memory-mapped tars at the
offsets their ``.idx`` lists. The plan is a function of (seed, epoch, rank) alone, so the pipeline runs on from one
epoch into the next (its prefetch crosses the boundary) and a resumed epoch reads exactly what it read before.
Pipelines are kept per loader configuration for the process: the loader of the next epoch continues its
predecessor's pipeline; one that starts anywhere else (another epoch, after an epoch left unfinished) gets a fresh
one.

Tokens and meta never enter the graph: each shard's ``tables.npz`` (``shards/pack.py``) is loaded once, and a
batch takes its rows of the int32 token table and the int64 meta table by position, on the host, with no
per-sample parsing; meta stays on the host, so the training loop never copies anything back from the device.

The letterbox is the affine map of :mod:`dcris.data.letterbox`, computed per sample inside the graph from the
JPEG header and applied with ``fn.experimental.warp_perspective`` (OpenCV's conventions: pixel centres at
integer coordinates, Keys' cubic with a = -0.75, a constant border): bicubic for the image onto the CLIP-mean
colour, bilinear for the mask onto 0. ``fn.warp_affine`` has no cubic mode, and ``fn.resize``'s cubic is
Catmull-Rom (a = -0.5) with a clamped border, further from the released code. Unlike OpenCV 4, DALI samples at
exact rather than 1/32-pixel positions; ``tests/test_data.py`` bounds the difference.

JPEGs are decoded "mixed" (nvJPEG, ``hw_decoder_load`` of them on the hardware decoder) on a GPU, on the CPU
without. PNG masks are decoded on the CPU. A training mask is warped straight to ``mask_size`` (128 for a 448
canvas: 1/12 of the pixels), at exactly the canvas points the loss's nearest resize of a canvas mask would pick
(:func:`mask_nodes`); evaluation warps it to the canvas and also returns the original.

A broken shard (:mod:`dcris.data.common`) is found when the stream starts (every tar against its index's size),
as the source slices a sample (its tar headers), or when DALI fails to decode: the samples fed and not yet taken
are then decoded with PIL to name the shard, and the failed pipeline is shut down.
"""

from __future__ import annotations

import io
import mmap
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from fractions import Fraction
from typing import Any

import numpy as np
import nvidia.dali.fn as fn
import nvidia.dali.math as dmath
import nvidia.dali.types as types
import torch
from nvidia.dali import pipeline_def
from nvidia.dali.plugin.pytorch import feed_ndarray
from PIL import Image

from dcris.data.common import TAR_BLOCK, ShardLoader, broken_shard, check_member_header, rank_range, to_device
from dcris.data.letterbox import CLIP_MEAN, CLIP_MEAN_UINT8, CLIP_STD
from dcris.data.torch_loader import DECODE_ERRORS, decode_reason, read_shard_index
from dcris.errors import UserError

_KEPT_STREAMS = 4  # pipelines kept for the process (the training split's and a few evaluation splits')
_STREAMS: OrderedDict[tuple, _Stream] = OrderedDict()  # by loader configuration, least recently used first


def _letterbox_matrix(encoded_jpeg: Any, size: int, stride: int = 1, offset: tuple[int, int] = (0, 0)) -> Any:
    """Per-sample 3x3 letterbox map (original -> canvas, :func:`dcris.data.letterbox.forward_affine`), computed
    from the JPEG header without decoding.

    With ``stride`` and ``offset`` it maps onto the canvas points ``stride * (j, i) + offset`` instead (output
    pixel (row i, column j)): a subgrid of the canvas.
    """
    shape = fn.peek_image_shape(encoded_jpeg, dtype=types.FLOAT)  # (h, w, c)
    height, width = shape[0], shape[1]
    scale = dmath.min(size / height, size / width)
    left, top = (size - width * scale) / 2, (size - height * scale) / 2
    if stride != 1 or offset != (0, 0):
        scale, left, top = scale / stride, (left - offset[0]) / stride, (top - offset[1]) / stride
    zero = scale * 0.0
    entries = (scale, zero, left, zero, scale, top, zero, zero, zero + 1.0)
    return fn.reshape(fn.stack(*entries), shape=[3, 3])


def _warp(image: Any, matrix: Any, size: int, interp: Any, fill: list[int]) -> Any:
    return fn.experimental.warp_perspective(
        image, matrix=matrix, size=[size, size], inverse_map=False, pixel_origin="center", border_mode="constant",
        interp_type=interp, fill_value=fill,
    )  # fmt: skip


def mask_nodes(encoded_jpeg: Any, mask: Any, size: int, mask_size: int) -> Any:
    """A decoded mask (h, w, 1) uint8 letterboxed (bilinear, border 0) to what nearest resizing of the ``size``
    canvas mask to ``mask_size`` gives, computed at ``mask_size`` only.

    Nearest resizing (PyTorch's) takes canvas row ``floor(k * size / mask_size)`` for output row k. With
    ``size / mask_size = p / q`` in lowest terms, the rows ``k = q * m + r`` form q grids of stride p, offset
    ``floor(r * p / q)``; so do the columns. Each of the q x q subgrids is one warp, and interleaving them gives
    the resized mask: 4 warps of 64 x 64 for 448 -> 128 (q = 2).

    Returns:
        uint8 (mask_size, mask_size, 1).
    """
    ratio = Fraction(size, mask_size)
    stride, period = ratio.numerator, ratio.denominator
    if mask_size % period:
        raise ValueError(f"mask_size {mask_size} does not split into grids of {size} / {mask_size} = {ratio}")
    if period == 1 and stride == 1:
        return _warp(mask, _letterbox_matrix(encoded_jpeg, size), size, types.INTERP_LINEAR, [0])
    side = mask_size // period
    offsets = [r * stride // period for r in range(period)]
    rows = [
        fn.stack(
            *(
                _warp(mask, _letterbox_matrix(encoded_jpeg, size, stride, (ox, oy)), side, types.INTERP_LINEAR, [0])
                for ox in offsets
            )
        )  # (q, side, side, 1): column offset, m, n
        for oy in offsets
    ]
    grid = fn.stack(*rows)  # (q, q, side, side, 1): row offset, column offset, m, n
    return fn.reshape(fn.transpose(grid, perm=[2, 0, 3, 1, 4]), shape=[mask_size, mask_size, 1])  # rows q*m + r


def decode_image(encoded_jpeg: Any, gpu: bool, hw_decoder_load: float = 0.65) -> Any:
    """RGB uint8 (h, w, 3): nvJPEG ("mixed", ``hw_decoder_load`` of the JPEGs on the hardware decoder) on a GPU."""
    decoder = dict(device="mixed", hw_decoder_load=hw_decoder_load) if gpu else dict(device="cpu")
    return fn.decoders.image(encoded_jpeg, output_type=types.RGB, **decoder)


def letterbox_image(image: Any, encoded_jpeg: Any, size: int) -> Any:
    """A decoded image letterboxed (bicubic onto the CLIP mean) and CLIP-normalised: float32 (3, S, S)."""
    image = _warp(image, _letterbox_matrix(encoded_jpeg, size), size, types.INTERP_CUBIC, list(CLIP_MEAN_UINT8))
    return fn.crop_mirror_normalize(
        image, mean=[255 * m for m in CLIP_MEAN], std=[255 * s for s in CLIP_STD], dtype=types.FLOAT,
        output_layout="CHW",
    )  # fmt: skip


def decode_mask(encoded_png: Any) -> Any:
    """The original mask, uint8 (h, w, 1), 0 or 255 (PNG: on the CPU)."""
    return fn.decoders.image(encoded_png, device="cpu", output_type=types.GRAY)


def letterbox_mask(orig_mask: Any, encoded_jpeg: Any, size: int, mask_size: int, gpu: bool) -> Any:
    """A decoded mask letterboxed at ``mask_size`` (:func:`mask_nodes`): float32 (1, M, M) in [0, 1] (multiples of
    1/255), on the GPU when ``gpu``.

    A canvas-sized mask is warped on the GPU with the image; a smaller one costs less on the CPU than its copy.
    """
    on_gpu = gpu and mask_size == size
    mask = mask_nodes(encoded_jpeg, orig_mask.gpu() if on_gpu else orig_mask, size, mask_size)  # (M, M, 1) uint8
    if gpu and not on_gpu:
        mask = mask.gpu()  # uint8 crosses the bus, not float
    return fn.cast(fn.transpose(mask, perm=[2, 0, 1]), dtype=types.FLOAT) / 255.0  # (1, M, M)


def letterbox_nodes(
    encoded_jpeg: Any,
    encoded_png: Any,
    size: int,
    gpu: bool,
    mask_size: int | None = None,
    hw_decoder_load: float = 0.65,
) -> tuple[Any, Any, Any]:
    """The letterbox part of the graph: encoded JPEG image and PNG mask in, per sample (sizes may differ).

    Args:
        encoded_jpeg: The images' bytes.
        encoded_png: The masks' bytes.
        size: Side of the canvas.
        gpu: Decode the JPEGs with nvJPEG and warp on the GPU.
        mask_size: Side of the returned mask (:func:`mask_nodes`); default ``size``.
        hw_decoder_load: Share of the JPEGs for the GPU's hardware decoder (nvJPEG's hybrid decoders take
            the rest).

    Returns:
        image float32 (3, S, S) CLIP-normalised, mask float32 (1, M, M) in [0, 1] (multiples of 1/255), and
        the decoded original mask uint8 (h, w, 1), 0 or 255.
    """
    image = letterbox_image(decode_image(encoded_jpeg, gpu, hw_decoder_load), encoded_jpeg, size)
    orig_mask = decode_mask(encoded_png)
    return image, letterbox_mask(orig_mask, encoded_jpeg, size, mask_size or size, gpu), orig_mask


@pipeline_def
def _letterbox_pipeline(
    source: Callable[[], tuple[list[np.ndarray], list[np.ndarray]]],
    size: int,
    mask_size: int,
    train: bool,
    gpu: bool,
    hw_decoder_load: float,
) -> tuple[Any, ...]:
    jpeg, png = fn.external_source(source=source, num_outputs=2, batch=True, dtype=types.UINT8, ndim=1)
    image, mask, orig_mask = letterbox_nodes(jpeg, png, size, gpu, mask_size, hw_decoder_load)
    return (image, mask) if train else (image, mask, orig_mask)


class SplitData:
    """What the source and the batches read of a split, by position (the manifest's sample order): encoded
    fields of the memory-mapped tars, and the token and meta tables of every shard."""

    def __init__(self, loader: ShardLoader) -> None:
        shards = [dict(s, tar=str(loader.shards_dir / s["tar"])) for s in loader.info["shards"]]
        self.paths = [s["tar"] for s in shards]
        self.tars, shard_of, spans, self.keys = [], [], [], []
        tokens = []
        metas = []
        for k, shard in enumerate(shards):
            index = read_shard_index(shard["tar"], str(loader.shards_dir / shard["idx"]))  # covers the tar's size
            with open(shard["tar"], "rb") as f:
                self.tars.append(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
            spans += [(*fields["jpg"], *fields["mask.png"]) for _, fields in index]
            self.keys += [key for key, _ in index]
            shard_of += [k] * len(index)
            with np.load(loader.shards_dir / shard["tables"]) as tables:
                tokens.append(tables["tokens"])  # int32 (n, K_shard, L)
                metas.append(tables["meta"])  # int64 (n, 8), or (n, 7) from older shards
        self.shard_of = np.asarray(shard_of)  # (N,)
        self.spans = np.asarray(spans, dtype=np.int64).reshape(-1, 4)  # (N, 4): jpg offset, size, png offset, size
        self.meta = np.concatenate(metas)  # (N, 8) (one layout per split: shards/pack.py)
        self.tokens = np.zeros((len(self.meta), loader.max_sentences, loader.context_length), dtype=np.int32)
        first = 0
        for table in tokens:  # (n, K_shard, L) into (N, K_max, L)
            self.tokens[first : first + len(table), : table.shape[1]] = table
            first += len(table)
        self.first = np.cumsum([0] + [s["samples"] for s in shards])  # (S + 1,) first position of every shard

    def encoded(self, positions: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """The JPEG and PNG bytes of the samples at ``positions`` (views of the tars), each field's tar header
        checked against the index on the way (the page is read anyway)."""
        jpegs, pngs = [], []
        for position in positions.tolist():
            shard = self.shard_of[position]
            tar, path, key = self.tars[shard], self.paths[shard], self.keys[position]
            jpg_at, jpg_size, png_at, png_size = self.spans[position].tolist()
            check_member_header(path, tar[jpg_at - TAR_BLOCK : jpg_at], f"{key}.jpg", jpg_size)
            check_member_header(path, tar[png_at - TAR_BLOCK : png_at], f"{key}.mask.png", png_size)
            jpegs.append(np.frombuffer(tar, np.uint8, jpg_size, jpg_at))
            pngs.append(np.frombuffer(tar, np.uint8, png_size, png_at))
        return jpegs, pngs

    def undecodable(self, positions: np.ndarray, dali_error: str) -> UserError | None:
        """The error naming the shard of the first sample at ``positions`` whose JPEG or PNG PIL cannot decode
        either (what DALI's error does not say), or None when all decode."""
        for position in dict.fromkeys(positions.tolist()):  # in order, each once (batches are padded by repeats)
            for name, encoded in zip(("jpg", "mask.png"), self.encoded(np.asarray([position])), strict=True):
                try:
                    with Image.open(io.BytesIO(encoded[0].tobytes())) as image:
                        image.load()
                except DECODE_ERRORS as e:
                    sample = f"{self.keys[position]}.{name}"
                    problem = f"{sample} does not decode (DALI: {dali_error}; PIL: {decode_reason(e)})"
                    return broken_shard(self.paths[self.shard_of[position]], problem)
        return None


class _Stream:
    """A DALI pipeline running through a loader's batch plans, epoch after epoch, and where its consumer is.

    The source (called by DALI ahead of the consumer, up to the prefetch depth) records each batch's units (rows
    of sample position and sentence: :meth:`DaliShardLoader.epoch_units`) in ``pending``; the consumer takes
    them back in the same order, with the pipeline's outputs.
    """

    def __init__(self, loader: DaliShardLoader) -> None:
        self.data = SplitData(loader)
        self.plans = loader.batch_plans(self.data)
        self.pending: deque[tuple[np.ndarray, int]] = deque()
        self.at = (loader.epoch, loader.start_batch)  # (epoch, batch) the consumer takes next
        self.epoch_step = int(loader.train)  # evaluation reads its one pass again and again
        gpu = loader.device.type == "cuda"
        device_id = (
            (loader.device.index if loader.device.index is not None else torch.cuda.current_device()) if gpu else None
        )
        self.pipeline = _letterbox_pipeline(
            self._feed, loader.image_size, loader.mask_size, loader.train, gpu, loader.hw_decoder_load,
            batch_size=loader.batch_size, num_threads=max(1, loader.workers), device_id=device_id,
            prefetch_queue_depth=loader.prefetch_depth,
        )  # fmt: skip
        self.pipeline.build()

    def _feed(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        units, count = next(self.plans)
        self.pending.append((units, count))
        return self.data.encoded(units[:, 0])

    def _decode_error(self, dali_error: str, where: str) -> UserError:
        """The error for a batch DALI failed on: naming the shard of the sample PIL cannot decode either, among
        those fed and not yet taken, else naming ``where`` (split and folder)."""
        lines = dali_error.strip().splitlines()
        reason = next((line.strip() for line in lines if "failure" in line.lower()), lines[0] if lines else "")
        fed = np.concatenate([units[:, 0] for units, _ in self.pending]) if self.pending else np.zeros(0, int)
        return self.data.undecodable(fed, reason) or UserError(
            f"DALI could not read a batch of {where} ({reason}): a shard changed after packing; compare the "
            "shards' sha256 with manifest.json, re-copy the changed ones or rerun the python shards/pack.py "
            "command that wrote them"
        )

    def next_batch(self, batches_per_epoch: int, where: str) -> tuple[Any, np.ndarray, int]:
        """The next batch's pipeline outputs, units (padded to the batch size) and number of real units.

        A broken shard stops the run with a UserError (:meth:`_decode_error` when DALI cannot decode a sample).
        """
        try:
            outputs = self.pipeline.run()
        except UserError as e:  # from the source (SplitData.encoded)
            error = UserError(str(e))
        except RuntimeError as e:
            error = self._decode_error(str(e), where)
        else:
            error = None
        if error is not None:  # raised anew, outside the handler: no traceback through DALI keeps the pipeline alive
            raise error
        units, count = self.pending.popleft()
        epoch, batch = self.at
        self.at = (epoch + self.epoch_step, 0) if batch + 1 == batches_per_epoch else (epoch, batch + 1)
        return outputs, units, count


def _as_torch(outputs: Any, device: torch.device) -> torch.Tensor:
    """A dense DALI batch copied into a new tensor on ``device`` (on its current stream for a GPU)."""
    dense = outputs.as_tensor()
    dtype = {types.FLOAT: torch.float32, types.UINT8: torch.uint8}[dense.dtype]
    out = torch.empty(dense.shape(), dtype=dtype, device=device)
    feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(device) if device.type == "cuda" else None)
    return out


class DaliShardLoader(ShardLoader):
    """DALI implementation of :class:`~dcris.data.common.ShardLoader` (one pipeline per run; module docstring).

    Args:
        *args: Those of :class:`~dcris.data.common.ShardLoader` (``workers`` is DALI's thread count).
        hw_decoder_load: Share of the JPEGs nvJPEG sends to the GPU's hardware decoder (GPU only).
        prefetch_depth: Batches DALI prepares ahead of the one consumed.
        **kwargs: Those of :class:`~dcris.data.common.ShardLoader`.
    """

    def __init__(self, *args: Any, hw_decoder_load: float = 0.65, prefetch_depth: int = 2, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hw_decoder_load = hw_decoder_load
        self.prefetch_depth = prefetch_depth

    def _stream_key(self) -> tuple:
        """What fixes a stream's batches apart from the epoch it stands at."""
        shards = tuple(s["sha256"] for s in self.info["shards"])
        return (
            str(self.shards_dir.resolve()), self.split, shards, self.train, self.batch_size, self.image_size,
            self.mask_size, self.rank, self.world_size, self.seed, self.workers, str(self.device), self.shuffle_buffer,
            self.hw_decoder_load, self.prefetch_depth, self.sample,
        )  # fmt: skip

    def _stream(self) -> _Stream:
        """The kept stream standing at the start of this epoch, else a new one (replacing the kept one)."""
        key = self._stream_key()
        stream = _STREAMS.pop(key, None)
        if stream is None or stream.at != (self.epoch, self.start_batch):
            del stream  # its pipeline goes before the new one is built
            stream = _Stream(self)
        _STREAMS[key] = stream
        while len(_STREAMS) > _KEPT_STREAMS:
            _STREAMS.popitem(last=False)
        return stream

    def epoch_units(self, data: SplitData, epoch: int) -> np.ndarray:
        """This rank's units in ``epoch``, in reading order (module docstring): int64 (U, 2), the position of
        each unit's sample in ``data`` and its sentence (-1 under object sampling)."""
        shards = self.info["shards"]
        units = np.concatenate(
            [np.stack(self.units(shards[k]), axis=1) + [data.first[k], 0] for k in self.shard_order(epoch)]
        )
        start, end = rank_range(len(units), self.rank, self.world_size)
        units = units[start:end]
        if self.train:
            rng = np.random.default_rng((self.seed, epoch, self.rank))
            window = max(1, self.shuffle_buffer)
            units = np.concatenate([rng.permutation(units[k : k + window]) for k in range(0, len(units), window)])
        return units

    def object_batches_per_epoch(self) -> int:
        """Object batches this rank reads a whole epoch: :meth:`epoch_batches` for training (the same on every
        rank), every object of the range once for evaluation (the last batch partial)."""
        if self.train:
            return self.epoch_batches()
        start, end = rank_range(self.info["objects"], self.rank, self.world_size)
        return -(-(end - start) // self.batch_size)

    def batch_plans(self, data: SplitData) -> Iterator[tuple[np.ndarray, int]]:
        """Every batch's units (rows of :meth:`epoch_units`, padded to the batch size by repeating the last)
        and number of real units, from ``start_batch`` of this loader's epoch on: training runs through the epochs,
        evaluation repeats its one pass. Skipped batches are never fed, so never decoded."""
        epoch, first = self.epoch, self.start_batch * self.batch_size
        while True:
            units = self.epoch_units(data, epoch)[: self.object_batches_per_epoch() * self.batch_size]
            for k in range(first, len(units), self.batch_size):
                batch = units[k : k + self.batch_size]
                yield np.pad(batch, ((0, self.batch_size - len(batch)), (0, 0)), mode="edge"), len(batch)
            epoch, first = epoch + self.train, 0

    def object_batches(self) -> Iterator[dict[str, Any]]:
        batches = self.object_batches_per_epoch()
        if batches <= self.start_batch:
            return
        stream = self._stream()
        for _ in range(batches - self.start_batch):
            try:
                outputs, units, count = stream.next_batch(batches, f"split {self.split} in {self.shards_dir}")
            except Exception:
                _STREAMS.pop(self._stream_key(), None)  # a pipeline that failed cannot run on
                # Shut it down now, in this process: left to the garbage collector (the traceback holds the
                # stream), it could be collected in a forked process, whose DALI shutdown never returns.
                stream.pipeline = None
                raise
            rows = units[:count, 0]
            tokens_all = torch.from_numpy(stream.data.tokens[rows]).long()  # (B, K_max, L)
            batch = dict(
                image=_as_torch(outputs[0], self.device)[:count],  # (B, 3, S, S)
                mask=_as_torch(outputs[1], self.device)[:count],  # (B, 1, M, M)
                tokens_all=to_device(tokens_all, self.device),
                meta=torch.from_numpy(stream.data.meta[rows]),  # (B, 8), on the host
            )
            if self.sample == "sentence":
                batch["sentence"] = torch.from_numpy(units[:count, 1])  # (B,), on the host
            if not self.train:
                originals = (np.asarray(outputs[2][i]) for i in range(count))  # (h, w, 1) each
                batch["orig_mask"] = [(mask[:, :, 0] > 127).astype(np.uint8) for mask in originals]
            yield batch
