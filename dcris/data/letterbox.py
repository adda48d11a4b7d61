"""Letterbox geometry of SPEC 4 and its inverse of SPEC 5, in one place.

Every loader (DALI and PyTorch), the evaluation and prediction code take the geometry from here, so the
image, the mask and the inverse warp cannot disagree.

Coordinate convention (shared by DALI's resize, PIL's resize and ``F.interpolate(align_corners=False)``):
continuous coordinates in which pixel (row i, column j) covers ``[j, j+1) x [i, i+1)`` and has its centre at
``(j + 0.5, i + 0.5)``. The affine matrices below act on such ``(x, y)`` coordinates; to map a pixel index,
add 0.5 before and subtract 0.5 after.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # RGB, in [0, 1]
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# The border colour of the letterboxed uint8 image: the CLIP mean, so it normalises to (about) zero.
CLIP_MEAN_UINT8 = tuple(int(round(255 * m)) for m in CLIP_MEAN)


def normalize_image(canvas: torch.Tensor) -> torch.Tensor:
    """uint8 RGB (..., 3, S, S) on any device -> float32 normalised with the CLIP mean and std."""
    mean = torch.tensor(CLIP_MEAN, device=canvas.device).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, device=canvas.device).view(3, 1, 1)
    return (canvas.float() / 255 - mean) / std


def letterbox_geometry(height: int, width: int, size: int = 448) -> tuple[float, int, int, int, int]:
    """Geometry of the letterbox of an image into a ``size`` x ``size`` canvas.

    Args:
        height: Original image height in pixels.
        width: Original image width in pixels.
        size: Side of the square canvas.

    Returns:
        ``(scale, new_h, new_w, pad_top, pad_left)``: scale = min(size/h, size/w); the resized image is
        ``new_h`` x ``new_w`` with ``new = round(dim * scale)`` (half up) and is pasted centred at
        ``(pad_top, pad_left)``.
    """
    longest = max(height, width)
    # scale = size / longest; integer round-half-up so DALI's integer graph computes exactly the same sizes.
    new_h = (2 * height * size + longest) // (2 * longest)
    new_w = (2 * width * size + longest) // (2 * longest)
    return size / longest, new_h, new_w, (size - new_h) // 2, (size - new_w) // 2


def forward_affine(height: int, width: int, size: int = 448) -> np.ndarray:
    """2x3 matrix mapping original (x, y) to canvas (x, y), pixel-edge continuous coordinates (module doc).

    The per-axis factors are ``new_w / width`` and ``new_h / height`` (the resize actually applied), which
    differ from ``scale`` by the rounding of the new size.
    """
    _, new_h, new_w, pad_top, pad_left = letterbox_geometry(height, width, size)
    return np.array([[new_w / width, 0.0, pad_left], [0.0, new_h / height, pad_top]], dtype=np.float64)


def inverse_affine(height: int, width: int, size: int = 448) -> np.ndarray:
    """2x3 matrix mapping canvas (x, y) back to original (x, y); the inverse of :func:`forward_affine`."""
    _, new_h, new_w, pad_top, pad_left = letterbox_geometry(height, width, size)
    sx, sy = width / new_w, height / new_h
    return np.array([[sx, 0.0, -pad_left * sx], [0.0, sy, -pad_top * sy]], dtype=np.float64)


def letterbox_image(image: Image.Image, size: int = 448) -> np.ndarray:
    """Reference letterbox of an image: bicubic resize, centred on a CLIP-mean canvas.

    Args:
        image: A PIL image in any mode (converted to RGB).
        size: Side of the canvas.

    Returns:
        uint8 array (size, size, 3), not yet normalised.
    """
    _, new_h, new_w, pad_top, pad_left = letterbox_geometry(image.height, image.width, size)
    resized = image.convert("RGB").resize((new_w, new_h), Image.BICUBIC)
    canvas = np.empty((size, size, 3), dtype=np.uint8)
    canvas[:] = CLIP_MEAN_UINT8
    canvas[pad_top : pad_top + new_h, pad_left : pad_left + new_w] = np.asarray(resized)
    return canvas


def letterbox_mask(mask: np.ndarray, size: int = 448) -> np.ndarray:
    """Reference letterbox of a binary mask: bilinear resize kept soft, zero border.

    Args:
        mask: uint8 array (h, w) with values in {0, 1}.
        size: Side of the canvas.

    Returns:
        float32 array (size, size) in [0, 1].
    """
    height, width = mask.shape
    _, new_h, new_w, pad_top, pad_left = letterbox_geometry(height, width, size)
    # Mode "F" resizes in float, so the edge stays soft instead of being rounded to {0, 1}.
    resized = Image.fromarray(mask.astype(np.float32), mode="F").resize((new_w, new_h), Image.BILINEAR)
    canvas = np.zeros((size, size), dtype=np.float32)
    canvas[pad_top : pad_top + new_h, pad_left : pad_left + new_w] = np.clip(np.asarray(resized), 0.0, 1.0)
    return canvas


def unletterbox(prob_map: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse letterbox used by evaluation (SPEC 5): crop the valid region, resize bicubic to h x w.

    Args:
        prob_map: (..., size, size) map on the canvas (probabilities or logits).
        height: Original image height.
        width: Original image width.

    Returns:
        (..., height, width) map at the original resolution (bicubic may overshoot [0, 1] slightly).
    """
    size = prob_map.shape[-1]
    _, new_h, new_w, pad_top, pad_left = letterbox_geometry(height, width, size)
    lead = prob_map.shape[:-2]
    valid = prob_map[..., pad_top : pad_top + new_h, pad_left : pad_left + new_w]
    flat = valid.reshape(-1, 1, new_h, new_w).float()  # (N, 1, new_h, new_w)
    out = F.interpolate(flat, size=(height, width), mode="bicubic", align_corners=False)
    return out.reshape(*lead, height, width)  # (..., h, w)
