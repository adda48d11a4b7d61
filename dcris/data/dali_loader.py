"""The NVIDIA DALI loader: webdataset reader, JPEG decode ("mixed" on a GPU, "cpu" without), the letterbox warp.

The letterbox is the affine map of :mod:`dcris.data.letterbox`, computed per sample inside the graph from the
JPEG header and applied with ``fn.experimental.warp_perspective`` (OpenCV's conventions: pixel centres at
integer coordinates, Keys' cubic with a = -0.75, a constant border): bicubic for the image onto the CLIP-mean
colour, bilinear for the mask onto 0. ``fn.warp_affine`` has no cubic mode, and ``fn.resize``'s cubic is
Catmull-Rom (a = -0.5) with a clamped border, further from the released code. Unlike OpenCV 4, DALI samples at
exact rather than 1/32-pixel positions; ``tests/test_data.py`` bounds the difference.

The reader takes the ``jpg``, ``mask.png``, ``tokens.npy`` and ``meta`` fields of each sample. ``tokens.npy`` is
in ``np.save`` format, so the pipeline passes its bytes through untouched (uint8, zero-padded to the batch's
longest) and :func:`tokens_from_npy` parses them with ``np.load`` outside the graph.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import nvidia.dali.fn as fn
import nvidia.dali.math as dmath
import nvidia.dali.types as types
import torch
from nvidia.dali import pipeline_def
from nvidia.dali.plugin.base_iterator import LastBatchPolicy
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from dcris.data.common import ShardLoader, to_device
from dcris.data.letterbox import CLIP_MEAN, CLIP_MEAN_UINT8, CLIP_STD

_READER = "shards"


def tokens_from_npy(padded: np.ndarray, max_sentences: int, context_length: int) -> torch.Tensor:
    """int64 (B, K_max, L) tokens from the ``tokens.npy`` bytes of a batch, (B, N) uint8 zero-padded.

    ``np.load`` reads exactly the array its header describes, so the zero padding after it is ignored.
    """
    out = torch.zeros(len(padded), max_sentences, context_length, dtype=torch.long)
    for i, row in enumerate(padded):
        tokens = np.load(io.BytesIO(row.tobytes()), allow_pickle=False)  # int32 (K, L)
        out[i, : len(tokens)] = torch.from_numpy(tokens.astype(np.int64))
    return out


def _letterbox_matrix(encoded_jpeg: Any, size: int) -> Any:
    """Per-sample 3x3 letterbox map (original -> canvas, :func:`dcris.data.letterbox.forward_affine`).

    Computed from the JPEG header, without decoding.
    """
    shape = fn.peek_image_shape(encoded_jpeg, dtype=types.FLOAT)  # (h, w, c)
    height, width = shape[0], shape[1]
    scale = dmath.min(size / height, size / width)
    left, top = (size - width * scale) / 2, (size - height * scale) / 2
    zero = scale * 0.0
    entries = (scale, zero, left, zero, scale, top, zero, zero, zero + 1.0)
    return fn.reshape(fn.stack(*entries), shape=[3, 3])


def letterbox_nodes(encoded_jpeg: Any, encoded_png: Any, size: int, gpu: bool) -> tuple[Any, Any, Any]:
    """The letterbox part of the graph: encoded JPEG image and PNG mask in, per sample (sizes may differ).

    Returns:
        image float32 (3, S, S) CLIP-normalised, mask float32 (1, S, S) in [0, 1] (multiples of 1/255), and
        the decoded original mask uint8 (h, w, 1), 0 or 255.
    """
    matrix = _letterbox_matrix(encoded_jpeg, size)
    warp = dict(matrix=matrix, size=[size, size], inverse_map=False, pixel_origin="center", border_mode="constant")
    image = fn.decoders.image(encoded_jpeg, device="mixed" if gpu else "cpu", output_type=types.RGB)
    image = fn.experimental.warp_perspective(image, interp_type=types.INTERP_CUBIC, fill_value=CLIP_MEAN_UINT8, **warp)
    image = fn.crop_mirror_normalize(
        image,
        mean=[255 * m for m in CLIP_MEAN],
        std=[255 * s for s in CLIP_STD],
        dtype=types.FLOAT,
        output_layout="CHW",
    )  # (3, S, S)
    orig_mask = fn.decoders.image(encoded_png, device="cpu", output_type=types.GRAY)  # (h, w, 1), 0 or 255
    mask = fn.experimental.warp_perspective(
        orig_mask.gpu() if gpu else orig_mask, interp_type=types.INTERP_LINEAR, fill_value=[0], **warp
    )  # (S, S, 1) uint8, rounded as the released code's uint8 warp
    mask = fn.cast(fn.transpose(mask, perm=[2, 0, 1]), dtype=types.FLOAT) / 255.0  # (1, S, S)
    return image, mask, orig_mask


@pipeline_def
def _letterbox_pipeline(
    tars: list[str],
    indices: list[str],
    size: int,
    train: bool,
    gpu: bool,
    shard_id: int,
    num_shards: int,
    shuffle_buffer: int,
) -> tuple[Any, ...]:
    jpeg, png, tokens, meta = fn.readers.webdataset(
        paths=tars,
        index_paths=indices,
        ext=["jpg", "mask.png", "tokens.npy", "meta"],
        dtypes=[types.UINT8, types.UINT8, types.UINT8, types.INT64],
        random_shuffle=train,
        initial_fill=shuffle_buffer,
        shard_id=shard_id,
        num_shards=num_shards,
        stick_to_shard=True,  # a fresh pipeline per epoch; the shard order (given by the loader) varies by epoch
        pad_last_batch=not train,
        name=_READER,
    )
    image, mask, orig_mask = letterbox_nodes(jpeg, png, size, gpu)
    tokens = fn.pad(tokens, axes=[0])  # (L_max,) uint8: the .npy bytes, zero past each sample's end
    if train:
        return image, mask, tokens, meta
    return image, mask, tokens, meta, fn.pad(orig_mask, axes=[0, 1])  # (H_max, W_max, 1) per batch


class DaliShardLoader(ShardLoader):
    """DALI implementation of :class:`~dcris.data.common.ShardLoader` (a fresh pipeline per epoch)."""

    def _pipeline(self) -> Any:
        gpu = self.device.type == "cuda"
        device_id = (
            (self.device.index if self.device.index is not None else torch.cuda.current_device()) if gpu else None
        )
        shards = self.epoch_shards()  # in this epoch's order: the reader cuts the ranks' ranges over it
        # A stable 31-bit seed per (seed, epoch, rank) for the shuffle buffer: DALI wants a non-negative int.
        seed = zlib.crc32(f"{self.seed}-{self.epoch}-{self.rank}".encode()) & 0x7FFFFFFF
        return _letterbox_pipeline(
            [s["tar"] for s in shards],
            [s["idx"] for s in shards],
            self.image_size,
            self.train,
            gpu,
            self.rank,
            self.world_size,
            self.shuffle_buffer,
            batch_size=self.batch_size,
            num_threads=max(1, self.workers),
            device_id=device_id,
            seed=seed,
        )

    def object_batches(self) -> Iterator[dict[str, Any]]:
        names = ["image", "mask", "tokens", "meta"] + ([] if self.train else ["orig_mask"])
        iterator = DALIGenericIterator(
            self._pipeline(),
            names,
            reader_name=_READER,
            last_batch_policy=LastBatchPolicy.DROP if self.train else LastBatchPolicy.PARTIAL,
            auto_reset=False,
        )
        for (out,) in iterator:
            meta = out["meta"].cpu()  # (B, 7)
            tokens_all = tokens_from_npy(out["tokens"].cpu().numpy(), self.max_sentences, self.context_length)
            batch = dict(
                image=to_device(out["image"], self.device),  # already there when DALI decoded on the GPU
                mask=to_device(out["mask"], self.device),
                tokens_all=to_device(tokens_all, self.device),
                meta=meta,
            )
            if not self.train:
                padded = out["orig_mask"].numpy()  # (B, H_max, W_max, 1)
                batch["orig_mask"] = [
                    (padded[i, :h, :w, 0] > 127).astype("uint8") for i, (h, w) in enumerate(meta[:, 4:6].tolist())
                ]
            yield batch
