"""An exported ONNX graph (``dcris export-onnx``) run by ONNX Runtime on the CPU, as a model of
:class:`~dcris.segmenter.Segmenter` (``Segmenter.from_pretrained(DIR, backend="onnxruntime")``).

The folder ``dcris export-onnx`` writes:

    model.onnx                one self-contained graph: (images (B, 3, S, S) float32, tokens (B, L) int64) ->
                              logits (B, 1, 4S/14, 4S/14) and, for a no-target (gRefCOCO) model, no_target_logits (B,)
    model.int8.onnx           with ``--int8``: the same graph with dynamically quantised int8 matrix products
    deployment.json           what a runtime does around the graph: letterbox, normalisation, tokenizer, thresholds;
                              and the model's config and metrics (``FORMAT``)
    bpe_simple_vocab_16e6.txt.gz   the CLIP BPE vocabulary the tokenizer reads

The pre- and postprocessing stay :class:`~dcris.segmenter.Segmenter`'s, the same for both backends. ONNX Runtime
and onnx are the ``onnx`` extra: ``pip install -e ".[onnx]"``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from dcris.config import Config, from_dict
from dcris.errors import UserError

FORMAT = "dcris-onnx/1"
MODEL_FILE, INT8_MODEL_FILE, FACTS_FILE = "model.onnx", "model.int8.onnx", "deployment.json"
INSTALL_HINT = 'ONNX export and ONNX Runtime need onnx, onnxruntime and onnxscript: pip install -e ".[onnx]"'


def read_facts(folder: Path) -> dict:
    """The ``deployment.json`` of an ``export-onnx`` folder.

    Raises:
        UserError: the folder has none, or one of another format.
    """
    path = folder / FACTS_FILE
    if not path.is_file():
        raise UserError(f"{str(folder)!r} is not a dcris ONNX export: it has no {FACTS_FILE} (dcris export-onnx)")
    facts = json.loads(path.read_text())
    if facts.get("format") != FORMAT:
        raise UserError(f"{str(path)!r} is not of format {FORMAT!r}")
    return facts


def session_options(threads: int | None = None, optimize: bool = True):  # -> onnxruntime.SessionOptions
    """ONNX Runtime session options: every graph optimisation (or none), ``threads`` intra-op threads (default:
    ONNX Runtime's, one per physical core)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    level = ort.GraphOptimizationLevel
    options.graph_optimization_level = level.ORT_ENABLE_ALL if optimize else level.ORT_DISABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    return options


class OnnxRuntimeModel:
    """The graph of an ``export-onnx`` folder in an ONNX Runtime CPU session, called as a DCRIS model is:
    ``model(images, tokens)`` gives the logits, or the pair (logits, "no object" logits).

    Attributes:
        config: The full config the graph was exported from; ``cfg`` its model part (input size, context length).
        path: The ``.onnx`` file run.
        outputs: The graph's output names: ``logits``, and ``no_target_logits`` for a no-target model.
    """

    device = torch.device("cpu")
    dtype = torch.float32

    def __init__(self, path: Path, cfg: Config, threads: int | None = None, optimize: bool = True) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError(INSTALL_HINT) from None
        self.path, self.config, self.cfg = path, cfg, cfg.model
        options = session_options(threads, optimize)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.outputs = [o.name for o in self.session.get_outputs()]

    @classmethod
    def load(cls, path: str | Path, threads: int | None = None) -> tuple[OnnxRuntimeModel, dict]:
        """The model of an ``export-onnx`` folder (its ``model.onnx``) or of one ``.onnx`` file in such a folder
        (``model.int8.onnx``), and the folder's facts.

        Raises:
            UserError: ``path`` is not such a folder or file.
        """
        path = Path(path)
        folder, graph = (path.parent, path) if path.suffix == ".onnx" else (path, path / MODEL_FILE)
        facts = read_facts(folder)
        if not graph.is_file():
            raise UserError(f"ONNX graph {str(graph)!r} does not exist")
        return cls(graph, from_dict(facts["config"]), threads), facts

    def __call__(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Images (B, 3, S, S) and tokens (B, L) to what :meth:`dcris.model.DCRIS.forward` returns."""
        feed = {
            "images": np.ascontiguousarray(images.detach().cpu().float().numpy()),
            "tokens": np.ascontiguousarray(tokens.detach().cpu().long().numpy()),
        }
        out = [torch.from_numpy(o) for o in self.session.run(self.outputs, feed)]
        return out[0] if len(out) == 1 else (out[0], out[1])
