"""``dcris export-onnx``: one self-contained ONNX graph of an export, for runtimes without Python or PyTorch.

    dcris export-onnx --weights runs/refcoco/export --out deploy/refcoco            # model.onnx + deployment.json
    dcris export-onnx --weights runs/refcoco/export --out deploy/refcoco --int8     # also model.int8.onnx

The graph takes the letterboxed, normalised images (B, 3, S, S) float32 and the CLIP token ids (B, L) int64, with a
dynamic batch B, and gives the mask logits (B, 1, 4S/14, 4S/14) and, for a no-target (gRefCOCO) model, the "no
object" logits (B,). The frozen backbones, the adapters and the head are all inside, in fp32. It is written by
``torch.onnx.export``'s dynamo path (``torch.export``, then onnxscript) at opset ``OPSET``. Beside it,
``deployment.json`` says what a runtime does around it (letterbox, mean and std, tokenizer and its vocabulary
file, thresholds); see :mod:`dcris.onnx_runtime` for the folder and docs/use.md for the deployment.

The written graph is run once by ONNX Runtime on random inputs and compared with the PyTorch model; the export
fails when the largest difference exceeds ``TOLERANCE`` of the largest logit. ``--int8`` adds ONNX Runtime's
dynamic int8 quantisation of the graph's matrix products with constant weights (an option: see BENCHMARKS.md for
its speed and its masks' IoU against fp32). An operation that does not convert stops the export with one line
naming it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from dcris.config import Config, to_dict
from dcris.data.letterbox import CLIP_MEAN, CLIP_MEAN_UINT8, CLIP_STD
from dcris.errors import UserError
from dcris.metrics import MASK_THRESHOLD
from dcris.model import DCRIS, split_output
from dcris.onnx_runtime import FACTS_FILE, FORMAT, INSTALL_HINT, INT8_MODEL_FILE, MODEL_FILE, OnnxRuntimeModel

OPSET = 18  # ONNX Runtime, onnxruntime-web and TensorRT 8.6+ read it; attention is decomposed to MatMul/Softmax
TOLERANCE = 1e-4  # the graph's largest difference from PyTorch (fp32), relative to the largest logit
START_TOKEN, END_TOKEN = 49406, 49407  # CLIP's; the end token has the largest id (the sentence feature's position)


def random_tokens(batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """Token ids (batch, length) shaped as the tokenizer's: start, random word ids, end, zero padding, each row
    its own random length."""
    tokens = torch.zeros(batch, length, dtype=torch.long)
    for row in range(batch):
        n = int(torch.randint(3, length + 1, (1,), generator=generator))
        tokens[row, 1 : n - 1] = torch.randint(1, START_TOKEN, (n - 2,), generator=generator)
        tokens[row, 0], tokens[row, n - 1] = START_TOKEN, END_TOKEN
    return tokens


def vocabulary() -> Path:
    """The CLIP BPE vocabulary file the tokenizer reads (open_clip ships it)."""
    from open_clip.tokenizer import default_bpe

    return Path(default_bpe())


def output_names(model: DCRIS) -> list[str]:
    """The graph's outputs: the mask logits, and the "no object" logits of a no-target model."""
    return ["logits", "no_target_logits"] if model.head.no_target is not None else ["logits"]


def _messages(exc: BaseException) -> Iterator[str]:
    """The messages of an exception and of every exception it was raised from, outermost first."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield str(exc)
        exc = exc.__cause__ or exc.__context__


_OPERATION = (
    re.compile(r"operator '(?:::)?([\w.:]+)'"),  # onnxscript: Error calling operator 'Conv'
    re.compile(r"\b(aten[.:]{1,2}[A-Za-z_]\w*(?:\.\w+)?)"),  # torch.export: no decomposition / unsupported aten op
)


def unconvertible_operation(exc: BaseException) -> str:
    """One line naming the operation an export failed on (and the exporter's reason, shortened)."""
    messages = [m for m in _messages(exc) if m.strip()]
    reason = messages[-1].strip().splitlines()[0][:200] if messages else type(exc).__name__
    for pattern in _OPERATION:
        for message in reversed(messages):  # innermost first: it names the node
            found = pattern.search(message)
            if found:
                return f"cannot convert operation {found.group(1)} to ONNX: {reason}"
    return f"cannot convert the model to ONNX: {reason}"


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter's progress lines and the optimizer's notes, kept off the terminal."""
    loggers = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def export_graph(
    module: nn.Module,
    example: tuple[torch.Tensor, ...],
    path: Path,
    inputs: list[str],
    outputs: list[str],
    opset: int = OPSET,
) -> None:
    """Writes ``module`` as one ONNX file (no external data), the first dimension of every input dynamic.

    Raises:
        UserError: an operation does not convert (:func:`unconvertible_operation`), or onnx is missing.
    """
    try:
        import onnxscript  # noqa: F401 - the dynamo exporter's translator
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        with _quiet_exporter():
            torch.onnx.export(
                module, example, str(path), dynamo=True, opset_version=opset, input_names=inputs,
                output_names=outputs, dynamic_shapes=tuple({0: batch} for _ in example), external_data=False,
                optimize=True, verbose=False, report=False,
            )  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - every exporter failure becomes one line naming the operation
        raise UserError(unconvertible_operation(exc)) from None


def relative_error(model: DCRIS, graph: OnnxRuntimeModel, images: torch.Tensor, tokens: torch.Tensor) -> float:
    """max |graph - PyTorch| / max |PyTorch| over every output of one batch (the no-target logits too)."""
    with torch.no_grad():
        want = split_output(model(images, tokens))
    got = split_output(graph(images, tokens))
    errors = [
        float((g - w).abs().max() / w.abs().max().clamp_min(1e-12))
        for g, w in zip(got, want, strict=True)
        if w is not None
    ]
    return max(errors)


def deployment_facts(config: Config, metrics: dict | None, int8: bool, opset: int) -> dict:
    """The content of ``deployment.json``: what a runtime does around the graph (module docstring)."""
    m = config.model
    size, side, length = m.image_size, 4 * (m.image_size // m.vision.patch_size), m.text.context_length
    outputs = {"logits": ["batch", 1, side, side]}
    if m.head.no_target:
        outputs["no_target_logits"] = ["batch"]
    return {
        "format": FORMAT,
        "graph": MODEL_FILE,
        "int8_graph": INT8_MODEL_FILE if int8 else None,
        "opset": opset,
        "inputs": {"images": {"shape": ["batch", 3, size, size], "dtype": "float32"},
                   "tokens": {"shape": ["batch", length], "dtype": "int64"}},  # fmt: skip
        "outputs": outputs,
        "image": {
            "size": size,
            "letterbox": (
                "scale = min(S / h, S / w), unrounded; the image spans (w * scale) x (h * scale) canvas pixels at "
                "offset ((S - w * scale) / 2, (S - h * scale) / 2); affine warp, bicubic (a = -0.75), no "
                "antialiasing, source coordinates rounded to 1/32 pixel (OpenCV 4 warpAffine)"
            ),
            "border_rgb_uint8": list(CLIP_MEAN_UINT8),
            "normalize": "pixels (RGB, channels first) / 255, minus mean, divided by std",
            "mean": list(CLIP_MEAN),
            "std": list(CLIP_STD),
        },
        "tokenizer": {
            "kind": "CLIP byte-pair encoding, lower-cased (open_clip SimpleTokenizer)",
            "vocabulary": vocabulary().name,
            "context_length": length,
            "start_token": START_TOKEN,
            "end_token": END_TOKEN,
            "padding_token": 0,
            "truncate": "past the context length keep the first L - 1 ids and put the end token last",
        },
        "postprocess": {
            "probability": "sigmoid(logits), bicubic (align_corners) to S x S, inverse letterbox to (h, w)",
            "mask_threshold": MASK_THRESHOLD,
            "no_target": (
                "sigmoid(no_target_logits) above no_target_threshold: the phrase names nothing, the mask is empty"
                if m.head.no_target else None
            ),
            "no_target_threshold": m.head.no_target_threshold if m.head.no_target else None,
        },
        "config": to_dict(config),
        "metrics": metrics,
    }  # fmt: skip


def quantize_int8(source: Path, target: Path) -> None:
    """ONNX Runtime's dynamic quantisation: int8 weights of every MatMul and Gemm with a constant weight (the
    backbones' and adapters' linear layers, the head's), activations quantised per call."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet_exporter():
        quantize_dynamic(source, target, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])


def write_onnx_export(
    model: DCRIS,
    config: Config,
    out: str | Path,
    metrics: dict | None = None,
    int8: bool = False,
    opset: int = OPSET,
) -> tuple[Path, float]:
    """Writes the ONNX folder (:mod:`dcris.onnx_runtime`) of a model and checks the graph against it.

    Args:
        model: The model (put on the CPU in fp32 and eval mode).
        config: Its full config (recorded for ``Segmenter.from_pretrained(DIR, backend="onnxruntime")``).
        out: The folder (created; the files it holds of an earlier export are replaced).
        metrics: Per-split results recorded with the weights.
        int8: Also write the int8 graph.
        opset: ONNX opset.

    Returns:
        The folder, and the fp32 graph's relative difference from PyTorch on random inputs (at most ``TOLERANCE``).

    Raises:
        UserError: an operation does not convert, or the graph differs from PyTorch by more than ``TOLERANCE``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = model.float().cpu().eval()
    size, length = model.cfg.image_size, model.cfg.text.context_length
    generator = torch.Generator().manual_seed(0)
    example = (torch.randn(2, 3, size, size, generator=generator), random_tokens(2, length, generator))
    export_graph(model, example, out / MODEL_FILE, ["images", "tokens"], output_names(model), opset)
    shutil.copyfile(vocabulary(), out / vocabulary().name)
    facts = deployment_facts(config, metrics, int8, opset)
    (out / FACTS_FILE).write_text(json.dumps(facts, indent=2))
    check = (torch.randn(3, 3, size, size, generator=generator), random_tokens(3, length, generator))
    error = relative_error(model, OnnxRuntimeModel(out / MODEL_FILE, config), *check)
    if not error <= TOLERANCE:
        raise UserError(f"the ONNX graph differs from the PyTorch model by {error:.2e} of the largest logit")
    if int8:
        quantize_int8(out / MODEL_FILE, out / INT8_MODEL_FILE)
    return out, error


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``dcris export-onnx``."""
    parser = argparse.ArgumentParser(prog="dcris export-onnx", description=__doc__.split("\n")[0])
    parser.add_argument("--weights", required=True, help="export folder or Hub id (as dcris predict takes)")
    parser.add_argument("--out", required=True, help="folder for model.onnx, deployment.json and the vocabulary")
    parser.add_argument("--int8", action="store_true", help="also write model.int8.onnx (dynamic int8 quantisation)")
    parser.add_argument("--opset", type=int, default=OPSET, help=f"ONNX opset (default {OPSET})")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides of the export (model.allow_download=true)"
    )
    args = parser.parse_args(argv)
    try:
        import onnxruntime  # noqa: F401 - fail before the weights load
        import onnxscript  # noqa: F401
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    from dcris.export import ExportedWeights, download_allowed

    # the graph is traced from the eager modules: no compiled blocks, no Triton kernels
    overrides = [*args.overrides, "model.compile=false", "model.adapters.fused_dense=false"]
    weights = ExportedWeights.load(args.weights, download_allowed(overrides))
    weights.configure(overrides)
    model = weights.to_model("cpu")
    out, error = write_onnx_export(model, weights.cfg, args.out, weights.results, args.int8, args.opset)
    written = ", ".join(p.name for p in sorted(out.iterdir()))
    print(f"wrote {out}: {written} (opset {args.opset}; ONNX Runtime vs PyTorch: {error:.1e} of the largest logit)")
    return 0


