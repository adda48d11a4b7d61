"""Pictures of predictions: tinted masks, ground-truth outlines, captioned tiles and contact sheets."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Mask tints, one per phrase in order: magenta first (unlike any synthetic shape), then far-apart hues.
PALETTE = [(255, 0, 255), (0, 200, 255), (255, 140, 0), (120, 255, 0), (255, 255, 0), (150, 80, 255),
           (255, 0, 80), (0, 255, 170)]  # fmt: skip
TINT_ALPHA = 0.5
TRUTH_COLOUR = (0, 230, 0)  # ground-truth outline
TILE = 256  # longest side of an image in a contact sheet
CAPTION_LINES = 4
FONT_SIZE = 14


def colour(index: int) -> tuple[int, int, int]:
    """The tint of the ``index``-th phrase (the palette repeats after eight)."""
    return PALETTE[index % len(PALETTE)]


def overlay(image: Image.Image, masks: list[np.ndarray], alpha: float = TINT_ALPHA) -> Image.Image:
    """The image with mask ``k`` tinted in :func:`colour` ``(k)`` (later masks over earlier ones).

    Args:
        image: RGB image (h, w).
        masks: bool (h, w) masks.
        alpha: Weight of the tint.
    """
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32).copy()  # (h, w, 3)
    for k, mask in enumerate(masks):
        pixels[mask] = (1 - alpha) * pixels[mask] + alpha * np.array(colour(k), dtype=np.float32)
    return Image.fromarray(pixels.round().astype(np.uint8))


def outline(mask: np.ndarray, width: int = 2) -> np.ndarray:
    """The pixels of ``mask`` at most ``width`` pixels in from its edge: a ring ``width`` pixels thick (bool, same
    shape; outside the image counts as outside the mask)."""
    k = 2 * width + 1
    padded = np.pad(mask, width, constant_values=False)
    eroded = np.lib.stride_tricks.sliding_window_view(padded, (k, k)).all(axis=(-1, -2))  # (h, w)
    return mask & ~eroded


@dataclass
class Tile:
    """One sample of a contact sheet."""

    image: Image.Image  # the original RGB image
    truth: np.ndarray  # bool (h, w) ground truth, drawn as an outline
    prediction: np.ndarray  # bool (h, w) predicted mask, drawn filled
    caption: str  # the sentence
    verdict: str  # how the prediction fares: "IoU 0.73", "nothing there: right" (``dcris.pictures.verdict``)
    label: str = ""  # e.g. where the sample ranks in its split


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=FONT_SIZE)


def draw_tile(tile: Tile) -> Image.Image:
    """A TILE-wide picture: the image with the prediction filled and the truth outlined, the caption below."""
    scale = TILE / max(tile.image.width, tile.image.height)
    size = (max(1, round(tile.image.width * scale)), max(1, round(tile.image.height * scale)))
    image = tile.image.convert("RGB").resize(size, Image.BICUBIC)

    def fit(mask: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 127

    pixels = np.asarray(overlay(image, [fit(tile.prediction)])).copy()
    pixels[outline(fit(tile.truth))] = TRUTH_COLOUR
    line_height = FONT_SIZE + 4
    canvas = Image.new("RGB", (TILE, TILE + line_height * (CAPTION_LINES + 1) + 6), "white")
    canvas.paste(Image.fromarray(pixels), ((TILE - size[0]) // 2, (TILE - size[1]) // 2))
    draw = ImageDraw.Draw(canvas)
    font = _font()
    lines = textwrap.wrap(f'"{tile.caption}"', width=34, max_lines=CAPTION_LINES, placeholder=' ..."')
    for k, line in enumerate(lines):
        draw.text((4, TILE + 4 + k * line_height), line, fill="black", font=font)
    footer = tile.verdict + (f"  {tile.label}" if tile.label else "")
    draw.text((4, TILE + 4 + CAPTION_LINES * line_height), footer, fill=(160, 0, 160), font=font)
    return canvas


def contact_sheet(tiles: list[Tile], title: str, columns: int = 4) -> Image.Image:
    """The tiles in a grid under a title and a legend, on one white sheet.

    Raises:
        ValueError: no tiles.
    """
    if not tiles:
        raise ValueError("a contact sheet needs at least one tile")
    pictures = [draw_tile(t) for t in tiles]
    columns = min(columns, len(pictures))
    rows = -(-len(pictures) // columns)
    gap, head = 8, 2 * (FONT_SIZE + 6) + 8
    width, height = pictures[0].size
    sheet = Image.new("RGB", (columns * (width + gap) + gap, head + rows * (height + gap)), "white")
    draw = ImageDraw.Draw(sheet)
    font = _font()
    draw.text((gap, 6), title, fill="black", font=font)
    legend_y = 6 + FONT_SIZE + 6
    draw.rectangle((gap, legend_y + 2, gap + 12, legend_y + 12), fill=PALETTE[0])
    draw.text((gap + 18, legend_y), "prediction", fill="black", font=font)
    draw.rectangle((gap + 110, legend_y + 2, gap + 122, legend_y + 12), outline=TRUTH_COLOUR, width=2)
    draw.text((gap + 128, legend_y), "ground truth", fill="black", font=font)
    for k, picture in enumerate(pictures):
        row, col = divmod(k, columns)
        sheet.paste(picture, (gap + col * (width + gap), head + row * (height + gap)))
    return sheet
