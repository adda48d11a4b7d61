"""``dcris app``: a web page (Gradio) to try a model: upload or pick an image, type phrases, press Run.

    dcris app --weights runs/demo/run/export                 # then open http://127.0.0.1:7860
    dcris app --weights user/dcris-b-refcoco model.allow_download=true --port 8000 --host 0.0.0.0

One phrase per line; each phrase's mask is tinted in its own colour over the image, with its score (see
``dcris.Segmentation``), the share of the image it covers and the time the batch took. Bad input (an unreadable
image, no phrase, too many phrases) is reported on the page and the server keeps serving; a phrase longer than
the model reads is cut, with a note. The examples are synthetic images (shapes the demo's model knows).
Gradio is an optional extra: ``pip install -e ".[app]"``.
"""

import argparse
import html
import os
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image

from dcris.draw import colour, overlay
from dcris.errors import UserError
from dcris.segmenter import Segmentation, Segmenter, read_image

MAX_PHRASES = 8  # one colour each
NUM_EXAMPLES = 4  # synthetic example images
INSTALL_HINT = 'the web page needs Gradio: pip install -e ".[app]"'


def phrases_of(text: str | None) -> list[str]:
    """The non-empty lines of the phrase box; none, or more than MAX_PHRASES, is a user error."""
    phrases = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not phrases:
        raise UserError("type a phrase that names an object, e.g. 'the red circle on the left'")
    if len(phrases) > MAX_PHRASES:
        raise UserError(f"{len(phrases)} phrases: at most {MAX_PHRASES} at once (one per line)")
    return phrases


def results_table(results: list[Segmentation], context_length: int) -> str:
    """HTML rows: colour, phrase, score, share of the image, and a note: "no object found" (with the probability
    that the phrase names something) when a model with the no-target output says it names nothing; cut phrases."""
    rows = []
    for k, r in enumerate(results):
        swatch = f'<span style="display:inline-block;width:1em;height:1em;background:rgb{colour(k)}"></span>'
        notes = [] if r.found else [f"no object found (target probability {r.target_probability:.2f})"]
        notes += [f"cut to the first {context_length} tokens: only its start was read"] if r.truncated else []
        note = "; ".join(notes)
        rows.append(
            f"<tr><td>{swatch}</td><td>{html.escape(r.text)}</td><td>{r.score:.2f}</td><td>{r.area:.1%}</td>"
            f"<td>{note}</td></tr>"
        )
    head = "<tr><th></th><th>phrase</th><th>score</th><th>area</th><th>note</th></tr>"
    return f'<table class="dcris-results">{head}{"".join(rows)}</table>'


def read_upload(path: str) -> Image.Image:
    """The uploaded image; the message of an unreadable one names the file, not the server's copy of it."""
    try:
        return read_image(path)
    except UserError:
        raise UserError(f"cannot read {Path(path).name!r}: not an image this page can open") from None


def run_phrases(segmenter: Segmenter, image_path: str | None, text: str | None) -> tuple[Any, str, str]:
    """What the Run button shows: (overlay image or None, results table HTML, status Markdown)."""
    try:
        if not image_path:
            raise UserError("upload an image first (or pick an example below)")
        image = read_upload(image_path)
        results = segmenter(image, phrases_of(text))
    except UserError as exc:
        return None, "", f"**error:** {html.escape(str(exc), quote=False)}"
    picture = overlay(image, [r.mask for r in results])
    table = results_table(results, segmenter.model.cfg.text.context_length)
    cut = sum(r.truncated for r in results)
    status = f"{len(results)} phrase(s) in {results[0].seconds:.2f} s on {segmenter.device.type}"
    if cut:
        status += f"; **note:** {cut} phrase(s) were too long and were cut"
    return picture, table, status


def show_image(image_path: str | None) -> tuple[Image.Image | None, str, str]:
    """The uploaded image as it will be segmented, or why it cannot be read."""
    if not image_path:
        return None, "", ""
    try:
        return read_upload(image_path), "", "image loaded: type phrases and press Run"
    except UserError as exc:
        return None, "", f"**error:** {html.escape(str(exc), quote=False)}"


def example_images(folder: Path, count: int = NUM_EXAMPLES) -> list[list[str]]:
    """Synthetic example images with two of their referring phrases each: ``[[path, phrases], ...]``."""
    from dcris.data import synth
    from dcris.data.refs import load_refs

    synth.make_synthetic_release(folder, images=count, seed=2024)
    refs = load_refs(folder / "synthetic" / "refs(unc).p")
    phrases: dict[int, list[str]] = {}
    for ref in refs:
        phrases.setdefault(ref["image_id"], []).append(ref["sentences"][0]["sent"])
    return [
        [str(folder / "images" / f"synthetic_{image_id:06d}.jpg"), "\n".join(texts[:2])]
        for image_id, texts in sorted(phrases.items())
    ]


def build_page(segmenter: Segmenter, examples: list[list[str]], title: str) -> Any:
    """The Gradio Blocks of the page (not yet launched)."""
    import gradio as gr

    def pick_example(event: gr.SelectData) -> tuple[str, str]:  # a click on an example thumbnail
        return examples[event.index][0], examples[event.index][1]

    def run(path: str | None, phrases: str | None) -> tuple[Any, str, str]:
        return run_phrases(segmenter, path, phrases)

    with gr.Blocks(title="DCRIS") as page:
        gr.Markdown(f"## DCRIS: segment what a phrase names\nweights: `{title}`")
        with gr.Row():
            with gr.Column():
                image = gr.File(label="image", file_types=["image"], type="filepath", elem_id="image")
                text = gr.Textbox(
                    label=f"phrases, one per line (at most {MAX_PHRASES})", lines=3, elem_id="phrases",
                    placeholder="the small red circle on the left",
                )  # fmt: skip
                button = gr.Button("Run", variant="primary", elem_id="run")
                gallery = gr.Gallery(
                    [(path, phrases.replace("\n", " / ")) for path, phrases in examples], columns=NUM_EXAMPLES,
                    label="examples (synthetic): click one", allow_preview=False, height=220, elem_id="examples",
                )  # fmt: skip
            with gr.Column():
                picture = gr.Image(label="masks", type="pil", format="png", interactive=False, elem_id="overlay")
                table = gr.HTML(elem_id="results")
                status = gr.Markdown(elem_id="status")
        gallery.select(pick_example, None, [image, text])
        image.change(show_image, inputs=image, outputs=[picture, table, status])
        button.click(run, [image, text], [picture, table, status])
        text.submit(run, [image, text], [picture, table, status])
    return page


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``dcris app``."""
    parser = argparse.ArgumentParser(prog="dcris app", description=__doc__.split("\n")[0])
    parser.add_argument("--weights", required=True, help="export folder or Hugging Face Hub model id")
    parser.add_argument("--port", type=int, default=7860, help="port to serve on (default 7860)")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    parser.add_argument("--device", help="cpu or cuda[:N] (default: CUDA when available)")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. model.allow_download=true"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home
    try:
        import gradio  # noqa: F401 - fail before the weights load
    except ImportError:
        raise UserError(INSTALL_HINT) from None

    segmenter = Segmenter.from_pretrained(args.weights, device=args.device, overrides=args.overrides)
    folder = Path(tempfile.mkdtemp(prefix="dcris-app-"))
    page = build_page(segmenter, example_images(folder), args.weights)
    print(f"serving {args.weights} on http://{args.host}:{args.port} (Ctrl-C stops)", flush=True)
    page.launch(server_name=args.host, server_port=args.port, allowed_paths=[str(folder)], show_error=True)
    return 0
