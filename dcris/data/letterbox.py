"""Letterbox geometry of SPEC 4 and its inverse of SPEC 5: one affine map per image, as the released code.

The released weights were trained and scored with OpenCV's ``warpAffine`` and this map, so the PyTorch loader,
the evaluation and prediction take the geometry from here (the DALI loader computes the same map in its graph):

- ``scale = min(S / h, S / w)``, left unrounded; the image spans ``w * scale`` x ``h * scale`` canvas pixels,
  offset by the fractional ``((S - w * scale) / 2, (S - h * scale) / 2)``;
- the 2x3 matrix maps the original corners (0, 0), (w, 0), (0, h) to those of that span (the corner points are
  float32, as the released code passes them to ``cv2.getAffineTransform``);
- image: bicubic (a = -0.75), no antialiasing, border the CLIP mean colour; mask: bilinear, border 0, rounded
  to multiples of 1/255 as the released code's uint8 warp; evaluation: bicubic back with the inverse matrix,
  border 0.

Coordinates follow OpenCV: pixel (row i, column j) has its centre at (x, y) = (j, i). The warps sample where
OpenCV 4 (the released code's 4.8) samples: each source coordinate is rounded to 1/32 pixel in fixed point
(``INTER_BITS = 5``). They are written in torch, separably (the maps never rotate), and run on any device.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # RGB, in [0, 1]
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# The border colour of the letterboxed uint8 image: the CLIP mean as OpenCV casts it to uint8 (rounded).
CLIP_MEAN_UINT8 = tuple(int(round(255 * m)) for m in CLIP_MEAN)

_CUBIC_A = -0.75  # OpenCV's (and PyTorch's) bicubic coefficient
_AB_SCALE = 1024  # OpenCV 4 warpAffine: fixed-point unit of the matrix terms (AB_BITS = 10) ...
_TAB_SIZE = 32  # ... and of the rounded source coordinate (INTER_BITS = 5)


def normalize_image(canvas: torch.Tensor) -> torch.Tensor:
    """uint8 RGB (..., 3, S, S) on any device -> float32 normalised with the CLIP mean and std."""
    mean, std = _clip_statistics(canvas.device)
    return (canvas.float() / 255 - mean) / std


@functools.cache
def _clip_statistics(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The CLIP mean and std (3, 1, 1) on ``device``, copied there once (a copy per batch would wait for it)."""
    return tuple(torch.tensor(v).view(3, 1, 1).to(device) for v in (CLIP_MEAN, CLIP_STD))


def _corners(heights: torch.Tensor, widths: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The corner points (0, 0), (w, 0), (0, h) of each original and where they land on the canvas.

    Args:
        heights: (B,) int64 original heights, on any device.
        widths: (B,) int64 original widths.
        size: Side S of the canvas.

    Returns:
        src and dst, float32 (B, 3, 2) on the device of ``heights``.
    """
    heights, widths = heights.double(), widths.double()
    canvas = torch.full_like(heights, size)  # a tensor numerator: ``size / t`` would multiply by 1 / t, rounding twice
    scale = torch.minimum(canvas / heights, canvas / widths)
    new_w, new_h = widths * scale, heights * scale
    left, top = (size - new_w) / 2, (size - new_h) / 2
    zero = torch.zeros_like(heights)
    src = torch.stack([zero, zero, widths, zero, zero, heights], dim=-1).view(-1, 3, 2)
    dst = torch.stack([left, top, new_w + left, top, left, new_h + top], dim=-1).view(-1, 3, 2)
    return src.float(), dst.float()


def _axis_aligned_affine(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """The (B, 2, 3) float64 matrices taking three corner points src (origin, +x, +y) to dst, both (B, 3, 2).

    ``cv2.getAffineTransform`` of the same points gives this matrix (to rounding: it solves a 6x6 system).
    """
    src, dst = src.double(), dst.double()
    sx = (dst[:, 1, 0] - dst[:, 0, 0]) / (src[:, 1, 0] - src[:, 0, 0])
    sy = (dst[:, 2, 1] - dst[:, 0, 1]) / (src[:, 2, 1] - src[:, 0, 1])
    zero = torch.zeros_like(sx)
    rows = [sx, zero, dst[:, 0, 0] - sx * src[:, 0, 0], zero, sy, dst[:, 0, 1] - sy * src[:, 0, 1]]
    return torch.stack(rows, dim=-1).view(-1, 2, 3)


def letterbox_affines(sizes: torch.Tensor, size: int = 448, inverse: bool = False) -> torch.Tensor:
    """The letterbox matrices of a batch of originals, computed on their device.

    Args:
        sizes: (B, 2) int64 original ``(height, width)`` of each image.
        size: Side S of the canvas.
        inverse: False for original -> canvas (``mat``), True for canvas -> original (``mat_inv``).

    Returns:
        float64 (B, 2, 3) on the device of ``sizes``.
    """
    src, dst = _corners(sizes[:, 0], sizes[:, 1], size)
    return _axis_aligned_affine(dst, src) if inverse else _axis_aligned_affine(src, dst)


def forward_affine(height: int, width: int, size: int = 448) -> np.ndarray:
    """2x3 float64 matrix mapping original (x, y) to canvas (x, y): the released code's ``mat``."""
    return letterbox_affines(torch.tensor([[height, width]]), size)[0].numpy()


def inverse_affine(height: int, width: int, size: int = 448) -> np.ndarray:
    """2x3 float64 matrix mapping canvas (x, y) back to original (x, y): the released code's ``mat_inv``."""
    return letterbox_affines(torch.tensor([[height, width]]), size, inverse=True)[0].numpy()


def _cubic_weights(t: torch.Tensor) -> torch.Tensor:
    """(n,) fractions in [0, 1) -> (n, 4) weights of the taps at -1, 0, 1, 2 (Keys' cubic, a = -0.75)."""
    a = _CUBIC_A
    w0 = ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a
    w1 = ((a + 2) * t - (a + 3)) * t * t + 1
    w2 = ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1
    return torch.stack([w0, w1, w2, 1 - w0 - w1 - w2], dim=-1)


@functools.cache
def _weight_table(cubic: bool, device: torch.device) -> torch.Tensor:
    """(32, K) float32 tap weights for each 1/32-pixel source fraction, K = 4 (cubic) or 2 (linear)."""
    frac = torch.arange(_TAB_SIZE, dtype=torch.float64) / _TAB_SIZE
    table = _cubic_weights(frac) if cubic else torch.stack([1 - frac, frac], dim=-1)
    return table.float().to(device)


def _axis_taps(
    scale: torch.Tensor,
    offset: torch.Tensor,
    out_lens: torch.Tensor,
    out_len: int,
    in_len: int,
    cubic: bool,
    rows: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Source taps (B, out_len, K) and their weights (B, out_len, K) along one axis (K: see :func:`_weight_table`).

    Output pixel i of sample b samples the source at ``scale[b] * i + offset[b]``, computed as OpenCV 4's
    warpAffine does, in units of 1/1024 rounded half to even, then rounded to 1/32 pixel: down the rows the whole
    coordinate is rounded at once, across the columns the two terms are rounded separately. Taps outside the
    source, and every tap of an output pixel at or past ``out_lens[b]``, get weight 0: the caller subtracts the
    border value first, so they contribute exactly the border.

    Args:
        scale: (B, 1) float64 source step per output pixel.
        offset: (B, 1) float64 source coordinate of output pixel 0.
        out_lens: (B, 1) int64 length of each sample's output along this axis, at most ``out_len``.
    """
    i = torch.arange(out_len, dtype=torch.float64, device=scale.device)  # (n,)
    half_step = _AB_SCALE // _TAB_SIZE // 2  # makes the final shift round to nearest
    if rows:
        fixed = torch.round((i * scale + offset) * _AB_SCALE).long() + half_step  # (B, n)
    else:
        fixed = torch.round(i * scale * _AB_SCALE).long() + (torch.round(offset * _AB_SCALE).long() + half_step)
    fixed = fixed >> 5  # source coordinate in 1/32 pixel
    weights = _weight_table(cubic, scale.device)[fixed & (_TAB_SIZE - 1)]  # (B, n, K)
    taps = (fixed >> 5)[..., None] + torch.arange(weights.shape[-1], device=scale.device) - int(cubic)
    inside = (taps >= 0) & (taps < in_len) & (i < out_lens)[..., None]
    return taps.clamp(0, in_len - 1), torch.where(inside, weights, 0.0)


def _warp_batch(
    src: torch.Tensor,
    matrices: torch.Tensor,
    out_sizes: torch.Tensor,
    out_shape: tuple[int, int],
    cubic: bool,
    border: float | torch.Tensor,
) -> torch.Tensor:
    """OpenCV 4's warpAffine of each map of a batch by its own axis-aligned matrix (see :func:`warp_affine`).

    Args:
        src: (B, ..., H, W) maps; the dimensions between are warped alike.
        matrices: (B, 2, 3) float64 source -> output matrices, on the device of ``src``.
        out_sizes: (B, 2) int64 output ``(h, w)`` of each map, on the device of ``src``.
        out_shape: ``(h_max, w_max)``, at least every ``out_sizes`` row.
        border: Value outside the source: a number, or a tensor broadcasting against (..., h, w).

    Returns:
        float32 (B, ..., h_max, w_max): each map's warp in its top-left ``out_sizes`` corner, the border past it.
    """
    # OpenCV inverts the matrix the same way for every map (this order of operations, in float64).
    det = 1.0 / (matrices[:, 0, 0] * matrices[:, 1, 1])
    sx, sy = matrices[:, 1, 1] * det, matrices[:, 0, 0] * det
    tx, ty = -sx * matrices[:, 0, 2], -sy * matrices[:, 1, 2]
    lens_y, lens_x = out_sizes[:, :1], out_sizes[:, 1:]  # (B, 1) each
    taps_y, wy = _axis_taps(sy[:, None], ty[:, None], lens_y, out_shape[0], src.shape[-2], cubic, True)
    taps_x, wx = _axis_taps(sx[:, None], tx[:, None], lens_x, out_shape[1], src.shape[-1], cubic, False)
    # Spatial dimensions next to the batch, so each pass gathers whole contiguous rows. The source becomes float
    # (less the border) only in the rows the first pass gathers: a large image is never copied whole as float.
    # A float32 map on a 0 border (the probability maps of every evaluation batch) is gathered as it is.
    moved_border = border.movedim((-2, -1), (0, 1)) if isinstance(border, torch.Tensor) else border  # (1, 1, ...)
    as_is = src.dtype == torch.float32 and not isinstance(border, torch.Tensor) and border == 0
    convert = (lambda gathered: gathered) if as_is else (lambda gathered: gathered.float() - moved_border)
    rows = _resample_dim1(src.movedim((-2, -1), (1, 2)), taps_y, wy, convert)
    out = _resample_dim1(rows.transpose(1, 2).contiguous(), taps_x, wx)  # (B, w, h, ...)
    return out.transpose(1, 2).movedim((1, 2), (-2, -1)) + border  # (B, ..., h, w)


def _resample_dim1(
    src: torch.Tensor,
    taps: torch.Tensor,
    weights: torch.Tensor,
    convert: Callable[[torch.Tensor], torch.Tensor] = lambda gathered: gathered,
) -> torch.Tensor:
    """(B, H, ...) -> (B, n, ...): ``out[b, i] = sum_k weights[b, i, k] * convert(src[b, taps[b, i, k]])``."""
    bsz, height, n = src.shape[0], src.shape[1], taps.shape[1]
    rows = src.reshape(bsz * height, -1)  # (B * H, prod(...)): one index_select gathers whole rows
    taps = taps + torch.arange(bsz, device=src.device)[:, None, None] * height  # (B, n, K) rows of ``rows``
    weights = weights.view(*weights.shape, *[1] * (src.ndim - 2))  # (B, n, K, 1, ...)

    def tap(k: int) -> torch.Tensor:
        return convert(rows.index_select(0, taps[..., k].flatten()).view(bsz, n, *src.shape[2:]))

    out = tap(0).mul_(weights[:, :, 0])
    for k in range(1, taps.shape[-1]):
        out += tap(k).mul_(weights[:, :, k])  # in place: a large output is held twice at most (no FMA: exact)
    return out


def warp_affine(
    src: torch.Tensor,
    matrix: np.ndarray,
    out_size: tuple[int, int],
    interpolation: Literal["cubic", "linear"],
    border: float | tuple[float, ...] = 0.0,
) -> torch.Tensor:
    """``cv2.warpAffine(src, matrix, (w, h), flags, borderValue=border)`` of OpenCV 4, for axis-aligned maps.

    Args:
        src: (..., H, W) map on any device; the leading dimensions (e.g. channels) are warped alike.
        matrix: 2x3 matrix from source to output (x, y), without rotation or shear.
        out_size: Output ``(h, w)``.
        interpolation: "cubic" (OpenCV's INTER_CUBIC) or "linear" (INTER_LINEAR).
        border: Value outside the source; one per leading index for (C, H, W) maps.

    Returns:
        float32 (..., h, w) on the device of ``src``, not rounded.
    """
    if interpolation not in ("cubic", "linear"):
        raise ValueError(f"interpolation must be 'cubic' or 'linear', got {interpolation!r}")
    if abs(matrix[0, 1]) > 1e-12 or abs(matrix[1, 0]) > 1e-12:  # cv2.getAffineTransform leaves ~1e-17 there
        raise ValueError(f"only axis-aligned maps are supported, got {matrix.tolist()}")
    if not isinstance(border, float | int):
        border = torch.tensor(border, dtype=torch.float32).view(-1, 1, 1).to(src.device)
    matrices = torch.from_numpy(np.asarray(matrix, dtype=np.float64))[None].to(src.device)  # (1, 2, 3)
    out_sizes = torch.tensor([out_size], device=src.device)  # (1, 2)
    return _warp_batch(src[None], matrices, out_sizes, out_size, interpolation == "cubic", border)[0]


def _round_uint8(values: torch.Tensor) -> torch.Tensor:
    """Round half up and saturate to uint8, as OpenCV's fixed-point warps end."""
    return values.add(0.5).floor_().clamp_(0, 255).to(torch.uint8)


def letterbox_pixels(pixels: torch.Tensor, size: int = 448) -> torch.Tensor:
    """Letterbox of a uint8 RGB image (3, h, w) on any device into a uint8 (3, size, size) canvas."""
    matrix = forward_affine(pixels.shape[-2], pixels.shape[-1], size)
    return _round_uint8(warp_affine(pixels, matrix, (size, size), "cubic", CLIP_MEAN_UINT8))


def letterbox_image(image: Image.Image, size: int = 448) -> np.ndarray:
    """Letterbox of an image: bicubic onto a CLIP-mean canvas (module docstring).

    Args:
        image: A PIL image in any mode (converted to RGB).
        size: Side of the canvas.

    Returns:
        uint8 array (size, size, 3), not yet normalised.
    """
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    pixels = torch.from_numpy(np.array(rgb)).permute(2, 0, 1)  # (3, h, w)
    return letterbox_pixels(pixels, size).permute(1, 2, 0).contiguous().numpy()


def letterbox_mask(mask: np.ndarray, size: int = 448) -> np.ndarray:
    """Letterbox of a binary mask: bilinear, zero border, soft in multiples of 1/255 (module docstring).

    Args:
        mask: array (h, w), nonzero inside the object (uint8 in {0, 1} from the loaders).
        size: Side of the canvas.

    Returns:
        float32 array (size, size) in [0, 1].
    """
    matrix = forward_affine(*mask.shape, size)
    warped = warp_affine(torch.from_numpy(mask != 0).float() * 255, matrix, (size, size), "linear")
    return (_round_uint8(warped).float() / 255).numpy()


def unletterbox(canvas_map: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse letterbox of evaluation (SPEC 5): bicubic back to the original h x w, border 0.

    Args:
        canvas_map: (..., S, S) map on the canvas (probabilities), on any device.
        height: Original image height.
        width: Original image width.

    Returns:
        float32 (..., height, width) on the same device (bicubic may overshoot [0, 1] slightly).
    """
    matrix = inverse_affine(height, width, canvas_map.shape[-1])
    return warp_affine(canvas_map, matrix, (height, width), "cubic")


def unletterbox_batch(canvas_maps: torch.Tensor, sizes: torch.Tensor, out_shape: tuple[int, int]) -> torch.Tensor:
    """:func:`unletterbox` of a batch at once, each map to its own original size, on the maps' device.

    Args:
        canvas_maps: (B, S, S) maps on the canvas (probabilities).
        sizes: (B, 2) int64 original ``(height, width)`` of each map, on the device of ``canvas_maps``.
        out_shape: ``(h_max, w_max)``, at least every row of ``sizes`` (known on the host, so no sync).

    Returns:
        float32 (B, h_max, w_max): map b in ``[:h_b, :w_b]``, exactly 0 past it.
    """
    matrices = letterbox_affines(sizes, canvas_maps.shape[-1], inverse=True)  # (B, 2, 3)
    return _warp_batch(canvas_maps, matrices, sizes, out_shape, cubic=True, border=0.0)


def stretched_affines(sizes: torch.Tensor, size: int, side: int) -> torch.Tensor:
    """(B, 2, 3) float64 matrices from the letterbox canvas to the original stretched to ``side`` x ``side`` (the
    frame ReLA's evaluation scores in): the inverse letterbox, then the stretch of each axis by ``side / length``
    with pixel edges kept on pixel edges (``x_s + 0.5 = (x + 0.5) * side / w``), as a resize of the image maps them.

    Args:
        sizes: (B, 2) int64 original ``(height, width)`` of each map.
        size: Side S of the letterbox canvas.
        side: Side of the stretched frame.
    """
    inverse = letterbox_affines(sizes, size, inverse=True)  # canvas -> original, axis-aligned
    scale = side / sizes.double().flip(-1)  # (B, 2): x by width, y by height
    out = torch.zeros_like(inverse)
    out[:, 0, 0], out[:, 1, 1] = inverse[:, 0, 0] * scale[:, 0], inverse[:, 1, 1] * scale[:, 1]
    out[:, :, 2] = (inverse[:, :, 2] + 0.5) * scale - 0.5
    return out


def stretch_batch(canvas_maps: torch.Tensor, sizes: torch.Tensor, side: int) -> torch.Tensor:
    """Canvas maps (B, S, S) warped (bicubic, border 0) to their originals stretched to (B, side, side):
    :func:`stretched_affines`, on the maps' device; ``sizes`` (B, 2) int64 on that device too."""
    matrices = stretched_affines(sizes, canvas_maps.shape[-1], side)
    out_sizes = torch.full_like(sizes, side)
    return _warp_batch(canvas_maps, matrices, out_sizes, (side, side), cubic=True, border=0.0)
