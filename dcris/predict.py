"""``dcris predict``: segment the object a phrase names, with exported weights (the inference path of SPEC 5).

    dcris predict --weights RUN/dcris.safetensors --image cat.jpg --text "the cat on the left" --out cat.png
    dcris predict --weights W --image a.jpg --text "..." --out a.png --image b.jpg --text "..." --out b.png
    dcris predict --weights W --pairs pairs.tsv          (lines: IMAGE <TAB> TEXT <TAB> OUT)

Each OUT gets the overlay (mask over the image) and, beside it, ``OUT_mask.png``: the raw mask, 0 or 255.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from dcris.data.letterbox import letterbox_image, normalize_image
from dcris.errors import UserError
from dcris.metrics import masks_from_logits
from dcris.model import DCRIS
from dcris.tokenizer import tokenize, truncations

OVERLAY_COLOUR = (255, 0, 255)  # mask tint: magenta, unlike any synthetic shape
OVERLAY_ALPHA = 0.5


def read_image(path: str | Path) -> Image.Image:
    """An RGB image; an unreadable file is a user error naming it."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise UserError(f"cannot read image {str(path)!r}: {exc}") from None


@torch.no_grad()
def predict_mask(model: DCRIS, image: Image.Image, text: str) -> np.ndarray:
    """The bool mask (h, w) at the image's own resolution for one phrase (cut to the model's context length, as
    training and evaluation cut theirs; :func:`dcris.tokenizer.truncations` says when that happens)."""
    cfg = model.cfg
    device = next(model.parameters()).device
    tokens = tokenize([text], cfg.text.context_length)  # (1, L)
    canvas = torch.from_numpy(letterbox_image(image, cfg.image_size)).to(device)  # (S, S, 3) uint8
    pixels = normalize_image(canvas.permute(2, 0, 1))[None]  # (1, 3, S, S)
    logits = model(pixels, tokens.to(device))  # (1, 1, 4S/14, 4S/14)
    return masks_from_logits(logits, [(image.height, image.width)], cfg.image_size)[0].cpu().numpy()


def overlay(image: Image.Image, mask: np.ndarray) -> Image.Image:
    """The image with the mask tinted over it."""
    pixels = np.asarray(image, dtype=np.float32)  # (h, w, 3)
    tint = np.array(OVERLAY_COLOUR, dtype=np.float32)
    pixels[mask] = (1 - OVERLAY_ALPHA) * pixels[mask] + OVERLAY_ALPHA * tint
    return Image.fromarray(pixels.round().astype(np.uint8))


def mask_path(out: str | Path) -> Path:
    """Where the raw mask of an overlay ``OUT`` goes: ``OUT_mask.png`` beside it."""
    out = Path(out)
    return out.with_name(f"{out.stem}_mask.png")


def write_prediction(image: Image.Image, mask: np.ndarray, out: str | Path) -> None:
    """Writes the overlay to ``out`` and the 0/255 mask to :func:`mask_path`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    overlay(image, mask).save(out)
    Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path(out))


def _pairs(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    images, texts, outs = args.image or [], args.text or [], args.out or []
    if not (len(images) == len(texts) == len(outs)):
        raise UserError(f"give --image, --text and --out equally often (got {len(images)}, {len(texts)}, {len(outs)})")
    pairs = list(zip(images, texts, outs, strict=True))
    if args.pairs:
        path = Path(args.pairs)
        if not path.is_file():
            raise UserError(f"pairs file {args.pairs!r} does not exist")
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                fields = line.split("\t")
                if len(fields) != 3:
                    raise UserError(f"{args.pairs}:{n}: expected IMAGE<TAB>TEXT<TAB>OUT, got {len(fields)} fields")
                pairs.append((fields[0], fields[1], fields[2]))
    if not pairs:
        raise UserError("nothing to predict: give --image/--text/--out or --pairs")
    return pairs


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``dcris predict``."""
    parser = argparse.ArgumentParser(prog="dcris predict", description=__doc__.split("\n")[0])
    parser.add_argument("--weights", required=True, help="export (.safetensors) or checkpoint folder")
    parser.add_argument("--image", action="append", help="input image (repeatable)")
    parser.add_argument(
        "--text", action="append",
        help="referring phrase for the image at the same position (a longer one than the model reads is cut, "
        "with a warning)",
    )  # fmt: skip
    parser.add_argument("--out", action="append", help="overlay picture to write (also writes OUT_mask.png)")
    parser.add_argument("--pairs", help="file of IMAGE<TAB>TEXT<TAB>OUT lines")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda[:N]")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value",
        help="changes to the weights' recorded config, e.g. model.vision.weights=DIR or model.allow_download=true",
    )  # fmt: skip
    args = parser.parse_args(argv)
    pairs = _pairs(args)
    from dcris.checkpoint import load_weights  # after the arguments are checked: loading takes a while

    model = load_weights(args.weights, args.device, args.overrides)
    length = model.cfg.text.context_length
    for image_path, text, out in pairs:
        for cut in truncations([text], length):
            print(
                f"warning: {text!r} needs {cut.tokens_needed} tokens, the model reads {length}: "
                f"using {cut.kept!r}",
                file=sys.stderr,
            )
        image = read_image(image_path)
        mask = predict_mask(model, image, text)
        write_prediction(image, mask, out)
        print(f"{out} ({mask.mean():.1%} of the image), mask {mask_path(out)}")
    return 0
