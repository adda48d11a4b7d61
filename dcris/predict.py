"""``dcris predict``: segment the object a phrase names, with exported weights (through ``dcris.Segmenter``).

    dcris predict --weights RUN/export --image cat.jpg --text "the cat on the left" --out cat.png
    dcris predict --weights W --image a.jpg --text "..." --out a.png --image b.jpg --text "..." --out b.png
    dcris predict --weights W --pairs pairs.tsv          (lines: IMAGE <TAB> TEXT <TAB> OUT)

Each OUT gets the overlay (mask over the image) and, beside it, ``OUT_mask.png``: the raw mask, 0 or 255. With a
model that has the no-target output (gRefCOCO), a phrase it finds nothing for is reported as "no object found"
and gets an empty mask.
``--weights`` is an export folder, a Hugging Face Hub model id (from the local cache) or a checkpoint folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dcris.draw import overlay
from dcris.errors import UserError
from dcris.segmenter import Segmenter, read_image


def mask_path(out: str | Path) -> Path:
    """Where the raw mask of an overlay ``OUT`` goes: ``OUT_mask.png`` beside it."""
    out = Path(out)
    return out.with_name(f"{out.stem}_mask.png")


def write_prediction(image: Image.Image, mask: np.ndarray, out: str | Path) -> None:
    """Writes the overlay to ``out`` and the 0/255 mask to :func:`mask_path`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    overlay(image, [mask]).save(out)
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
    parser.add_argument("--weights", required=True, help="export folder, Hub model id, or checkpoint folder")
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

    segmenter = Segmenter(load_weights(args.weights, args.device, args.overrides))
    length = segmenter.model.cfg.text.context_length
    for image_path, text, out in pairs:
        image = read_image(image_path)
        result = segmenter(image, text)  # a phrase longer than the model reads is cut, as in training
        if result.truncation is not None:
            cut = result.truncation
            print(
                f"warning: {text!r} needs {cut.tokens_needed} tokens, the model reads {length}: using {cut.kept!r}",
                file=sys.stderr,
            )
        write_prediction(image, result.mask, out)
        if not result.found:  # the no-target output says the phrase names nothing: the mask is empty
            print(f"{out}: no object found for {text!r} (target probability {result.target_probability:.2f}), "
                  f"empty mask {mask_path(out)}")  # fmt: skip
        else:
            print(f"{out} ({result.area:.1%} of the image, score {result.score:.2f}), mask {mask_path(out)}")
    return 0
