"""`dcris export-onnx`: ONNX Runtime gives PyTorch's logits, and Segmenter the same masks with either backend."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from randomised import randomised_model  # noqa: E402

from dcris.cli import main as cli  # noqa: E402
from dcris.config import preset  # noqa: E402
from dcris.data.letterbox import CLIP_MEAN, CLIP_STD  # noqa: E402
from dcris.errors import UserError  # noqa: E402
from dcris.head import per_sample_conv_unrolled  # noqa: E402
from dcris.metrics import MASK_THRESHOLD  # noqa: E402
from dcris.model import split_output  # noqa: E402
from dcris.onnx_export import TOLERANCE, export_graph, random_tokens  # noqa: E402
from dcris.segmenter import Segmenter  # noqa: E402

KINDS = ("tiny-dcris", "gres")
REPO = Path(__file__).resolve().parents[1]


def random_segmenter(kind: str, probe: tuple[np.ndarray, list[str]]) -> Segmenter:
    """A tiny model of ``kind`` with random BatchNorm statistics and LayerScales, and every adapter and head tensor
    random and non-zero (init plus noise): the first noise seed whose probability maps of the probe's phrases
    cover part of the image only."""
    image, phrases = probe
    for seed in range(20):
        cfg = preset("tiny-dcris")
        cfg.model.head.no_target = kind == "gres"
        model = randomised_model(cfg.model)
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn_like(p))
        segmenter = Segmenter(model.eval(), cfg)
        if all(0.05 < (r.probability > MASK_THRESHOLD).mean() < 0.95 for r in segmenter(image, phrases)):
            return segmenter
    raise AssertionError("no seed gave partial masks")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, probe) -> dict[str, tuple[Segmenter, object]]:
    """Per kind, a :func:`random_segmenter` and the folder ``dcris export-onnx`` wrote from its export (with the
    int8 graph for tiny-dcris)."""
    found = {}
    for kind in KINDS:
        segmenter = random_segmenter(kind, probe)
        root = tmp_path_factory.mktemp(kind)
        segmenter.save_pretrained(root / "export")
        int8 = ["--int8"] if kind == "tiny-dcris" else []
        assert cli(["export-onnx", "--weights", str(root / "export"), "--out", str(root / "onnx"), *int8]) == 0
        found[kind] = (segmenter, root / "onnx")
    return found


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch", [1, 3])
def test_onnx_runtime_gives_the_pytorch_logits(exported, kind, batch):
    import onnxruntime as ort

    segmenter, folder = exported[kind]
    model = segmenter.model
    for adapter in [*model.vision.adapters.values(), *model.text.adapters.values()]:
        assert all(p.abs().min() > 0 for p in adapter.parameters())  # every adapter weight counts
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.shape[0] for i in session.get_inputs()] == ["batch", "batch"]  # a dynamic batch
    generator = torch.Generator().manual_seed(batch)
    size, length = model.cfg.image_size, model.cfg.text.context_length
    images, tokens = torch.randn(batch, 3, size, size, generator=generator), random_tokens(batch, length, generator)
    got = session.run(None, {"images": images.numpy(), "tokens": tokens.numpy()})
    with torch.no_grad():
        want = [w for w in split_output(model(images, tokens)) if w is not None]
    assert len(got) == len(want) == (2 if kind == "gres" else 1)
    assert want[0].shape == (batch, 1, 4 * size // 14, 4 * size // 14)
    for g, w in zip(got, want, strict=True):
        assert g.shape == tuple(w.shape) and w.abs().max() > 0
        assert np.abs(g - w.numpy()).max() <= TOLERANCE * w.abs().max().item()


def test_the_folder_is_self_contained_and_states_the_deployment_facts(exported, tmp_path):
    import onnx

    segmenter, folder = exported["gres"]
    assert sorted(p.name for p in folder.iterdir()) == ["bpe_simple_vocab_16e6.txt.gz", "deployment.json", "model.onnx"]
    graph = onnx.load(str(folder / "model.onnx"))
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.graph.initializer)  # weights inside
    facts = json.loads((folder / "deployment.json").read_text())
    assert facts["opset"] == 18 and {o.domain or "ai.onnx": o.version for o in graph.opset_import}["ai.onnx"] == 18
    assert facts["image"]["size"] == 112 and facts["image"]["mean"] == list(CLIP_MEAN)
    assert facts["image"]["std"] == list(CLIP_STD)
    assert facts["tokenizer"]["context_length"] == 17 and facts["postprocess"]["mask_threshold"] == MASK_THRESHOLD
    assert facts["postprocess"]["no_target_threshold"] == 0.5
    assert list(facts["outputs"]) == ["logits", "no_target_logits"]
    moved = shutil.copytree(folder, tmp_path / "moved")  # nothing outside the folder is read
    assert Segmenter.from_pretrained(moved, backend="onnxruntime").model.outputs == ["logits", "no_target_logits"]


@pytest.mark.parametrize("kind", KINDS)
def test_segmenter_gives_the_same_masks_with_either_backend(exported, probe, kind):
    image, phrases = probe
    segmenter, folder = exported[kind]
    onnx_segmenter = Segmenter.from_pretrained(folder, backend="onnxruntime")
    assert onnx_segmenter.backend == "onnxruntime" and onnx_segmenter.config.model == segmenter.config.model
    for a, b in zip(segmenter(image, phrases), onnx_segmenter(image, phrases), strict=True):
        np.testing.assert_allclose(a.probability, b.probability, atol=1e-4)  # logits within 1e-4 of 100
        decided = np.abs(a.probability - MASK_THRESHOLD) > 1e-4
        np.testing.assert_array_equal(a.mask[decided], b.mask[decided])
        assert a.found == b.found and a.target_probability == pytest.approx(b.target_probability, abs=1e-4)
    with pytest.raises(UserError, match="no trainable weights"):
        onnx_segmenter.save_pretrained(folder.parent / "again")
    with pytest.raises(UserError, match="on the CPU"):
        Segmenter.from_pretrained(folder, backend="onnxruntime", overrides=["model.image_size=224"])
    with pytest.raises(UserError, match="unknown backend"):
        Segmenter.from_pretrained(folder, backend="tensorrt")
    with pytest.raises(UserError, match="not a dcris ONNX export"):
        Segmenter.from_pretrained(folder.parent / "export", backend="onnxruntime")


def test_the_unrolled_per_sample_conv_is_the_grouped_conv():
    generator = torch.Generator().manual_seed(0)
    x, weight, bias = (torch.randn(*s, generator=generator) for s in ((3, 8, 10, 12), (3, 8, 3, 3), (3,)))
    grouped = torch.nn.functional.conv2d(x.reshape(1, 24, 10, 12), weight, bias, padding=1, groups=3).transpose(0, 1)
    torch.testing.assert_close(per_sample_conv_unrolled(x, weight, bias), grouped, rtol=1e-5, atol=1e-5)


class GroupedPerSampleConv(nn.Module):
    """The per-sample convolution as PyTorch runs it eagerly: one group per sample, which ONNX cannot hold."""

    def forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        return torch.nn.functional.conv2d(x.reshape(1, b * c, h, w), weight, padding=1, groups=b)


def test_an_operation_that_does_not_convert_is_named_in_one_line(tmp_path):
    example = (torch.randn(2, 4, 6, 6), torch.randn(2, 4, 3, 3))
    with pytest.raises(UserError) as failed:
        export_graph(GroupedPerSampleConv(), example, tmp_path / "conv.onnx", ["x", "weight"], ["out"])
    message = str(failed.value)
    assert "\n" not in message and message.startswith("cannot convert operation Conv to ONNX")


def test_dcris_serve_runs_the_graph_with_onnx_runtime(exported, probe, capsys):
    import httpx
    from ports import free_port
    from pycocotools import mask as coco_mask

    image, phrases = probe
    segmenter, folder = exported["gres"]
    port = free_port()
    command = [sys.executable, "-m", "dcris", "serve", "--weights", str(folder), "--backend", "onnxruntime"]
    server = subprocess.Popen([*command, "--port", str(port)], cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            deadline = time.monotonic() + 120
            while True:
                assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
                with contextlib.suppress(httpx.TransportError):
                    if client.get("/healthz").status_code == 200:
                        break
                time.sleep(0.2)
            upload = io.BytesIO()
            Image.fromarray(image).save(upload, format="PNG")
            files = {"image": ("probe.png", upload.getvalue(), "image/png")}
            answer = client.post("/v1/segment", files=files, data={"phrases": phrases})
            bad = client.post("/v1/segment", files=files, data={"phrases": ["  "]})
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert answer.status_code == 200 and bad.status_code == 422 and "empty" in bad.json()["error"]
    expected = segmenter(image, phrases)  # the PyTorch model
    for got, want in zip(answer.json()["results"], expected, strict=True):
        mask = coco_mask.decode({"size": got["mask"]["size"], "counts": got["mask"]["counts"].encode()}).astype(bool)
        decided = np.abs(want.probability - MASK_THRESHOLD) > 1e-4
        np.testing.assert_array_equal(mask[decided], want.mask[decided])
        assert got["found"] == want.found and got["score"] == pytest.approx(want.score, abs=1e-4)

    assert cli(["serve", "--weights", f"a={folder}", f"b={folder}", "--backend", "onnxruntime"]) == 2
    assert "batching across adapter sets is a PyTorch feature" in capsys.readouterr().err


def test_the_int8_graph_is_quantised_and_near_the_fp32_one(exported, probe):
    import onnx

    segmenter, folder = exported["tiny-dcris"]
    ops = {node.op_type for node in onnx.load(str(folder / "model.int8.onnx")).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops and "MatMulInteger" not in {
        node.op_type for node in onnx.load(str(folder / "model.onnx")).graph.node
    }
    int8 = Segmenter.from_pretrained(folder / "model.int8.onnx", backend="onnxruntime")
    assert int8.model.path.name == "model.int8.onnx"
    generator = torch.Generator().manual_seed(7)
    images, tokens = torch.randn(2, 3, 112, 112, generator=generator), random_tokens(2, 17, generator)
    want, got = segmenter.forward(images, tokens), int8.forward(images, tokens)
    error = float((got - want).abs().max() / want.abs().max())
    assert 0 < error < 0.2  # quantised: not the fp32 logits, but near them
