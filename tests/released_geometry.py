"""Independent references for the letterbox tests: the released code's OpenCV preprocessing, natural-looking images.

The OpenCV calls are those of the released code (SPEC 4, 5), written here from the documented facts; our library
never imports OpenCV. OpenCV 4 is required: it samples at 1/32 pixel as the released code's OpenCV 4.8 did
(OpenCV 5 samples at exact positions).
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _warp_affine(*args, **kwargs) -> np.ndarray:
    """cv2.warpAffine of OpenCV 4; a test that needs it skips under another OpenCV (the test extra pins 4)."""
    if not cv2.__version__.startswith("4."):
        pytest.skip(f"the reference needs OpenCV 4 (the released code's), found {cv2.__version__}")
    return cv2.warpAffine(*args, **kwargs)


def released_matrices(height: int, width: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The released code's ``mat`` and ``mat_inv`` (cv2.getAffineTransform of float32 corner points)."""
    scale = min(size / height, size / width)
    new_h, new_w = height * scale, width * scale
    bias_x, bias_y = (size - new_w) / 2.0, (size - new_h) / 2.0
    src = np.array([[0, 0], [width, 0], [0, height]], np.float32)
    dst = np.array([[bias_x, bias_y], [new_w + bias_x, bias_y], [bias_x, new_h + bias_y]], np.float32)
    return cv2.getAffineTransform(src, dst), cv2.getAffineTransform(dst, src)


def released_image(rgb: np.ndarray, size: int) -> np.ndarray:
    """uint8 (h, w, 3) RGB -> the released code's normalised float32 (3, S, S) input."""
    mat, _ = released_matrices(*rgb.shape[:2], size)
    border = [m * 255 for m in CLIP_MEAN]
    warped = _warp_affine(rgb, mat, (size, size), flags=cv2.INTER_CUBIC, borderValue=border)
    return ((warped / 255.0 - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1).astype(np.float32)


def released_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """uint8 (h, w) in {0, 1} -> the released code's soft float (S, S) training mask."""
    mat, _ = released_matrices(*mask.shape, size)
    return _warp_affine(mask * 255, mat, (size, size), flags=cv2.INTER_LINEAR, borderValue=0.0) / 255.0


def released_prediction(prob: np.ndarray, height: int, width: int) -> np.ndarray:
    """float32 (S, S) probabilities on the canvas -> the released code's bool (h, w) prediction (threshold 0.35)."""
    _, mat_inv = released_matrices(height, width, prob.shape[-1])
    back = _warp_affine(prob, mat_inv, (width, height), flags=cv2.INTER_CUBIC, borderValue=0.0)
    return back > 0.35


def natural_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A natural-looking uint8 (h, w, 3) RGB image: 1/f noise with correlated colour, sharp-edged shapes, grain.

    Natural images have an amplitude spectrum falling as about 1/f; the shapes add the hard object edges where
    resampling differences are largest.
    """
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    freq = np.hypot(fx, fy)
    freq[0, 0] = 1.0
    spectrum = (rng.normal(size=(3, *freq.shape)) + 1j * rng.normal(size=(3, *freq.shape))) / freq
    field = np.fft.irfft2(spectrum, s=(height, width))  # (3, h, w)
    field = np.einsum("cd,dhw->hwc", rng.normal(0.6, 0.3, size=(3, 3)), field)  # correlated channels
    low, high = np.percentile(field, [1, 99])
    image = (field - low) / max(high - low, 1e-9) * 200 + 25
    ys, xs = np.mgrid[:height, :width]
    for _ in range(rng.integers(3, 7)):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        ry, rx = rng.uniform(0.05, 0.3) * height + 1, rng.uniform(0.05, 0.3) * width + 1
        if rng.random() < 0.5:
            inside = ((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2 < 1
        else:
            inside = (abs(ys - cy) < ry) & (abs(xs - cx) < rx)
        image[inside] = 0.7 * rng.uniform(0, 255, size=3) + 0.3 * image[inside]
    image += rng.normal(0, 3, size=image.shape)
    return np.ascontiguousarray(np.clip(np.rint(image), 0, 255), dtype=np.uint8)


def object_mask(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A uint8 (h, w) mask in {0, 1}: a random ellipse, not touching the borders, as an object's."""
    ys, xs = np.mgrid[:height, :width]
    cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width
    ry, rx = rng.uniform(0.1, 0.3) * height + 1, rng.uniform(0.1, 0.3) * width + 1
    return ((((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2) < 1).astype(np.uint8)
