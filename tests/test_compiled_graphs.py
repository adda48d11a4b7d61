"""model.compile=true: the whole forward and backward of dcris-b's structure without a graph break, one graph per
mode over a run's batch shapes, and the CUDA-only attention branch traced on the CPU.

Compiled with the eager and aot_eager backends: dynamo's graphs and AOTAutograd's backward, eager kernels (the
inductor tests are in tests/test_speed_switches.py)."""

from __future__ import annotations

import functools
import json
import types

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from dcris import attention as attention_module
from dcris.config import ModelConfig, load_config, preset
from dcris.model import build_model
from dcris.op_count import at_tiny_width


def dcris_b_structure() -> ModelConfig:
    """dcris-b at tiny widths: its 12 vision and 12 text blocks, adapters in blocks 1, 3, ..., 11, taps 4 and 8,
    the 3-layer decoder."""
    cfg = at_tiny_width(load_config(preset_name="dcris-b")).model
    assert (cfg.vision.depth, cfg.text.layers, cfg.head.decoder_layers, cfg.vision.taps) == (12, 12, 3, [4, 8])
    assert cfg.adapters.vision_layers == cfg.adapters.text_layers == [1, 3, 5, 7, 9, 11]
    return cfg


def _inputs(cfg: ModelConfig, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=g)
    tokens = torch.zeros(batch, cfg.text.context_length, dtype=torch.long)
    tokens[:, 0], tokens[:, 1:5], tokens[:, 5] = 49406, torch.randint(1, 49000, (batch, 4), generator=g), 49407
    side = 4 * cfg.image_size // cfg.vision.patch_size
    masks = (torch.rand(batch, 1, side, side, generator=g) > 0.5).float()
    return images, tokens, masks


def test_dcris_b_forward_and_backward_compile_whole_without_a_graph_break():
    """fullgraph=True fails on any graph break: the training forward in one graph, its backward through
    AOTAutograd, the same loss and gradients as eager (the same dropout draws)."""
    cfg = dcris_b_structure()
    torch.manual_seed(0)
    model = build_model(cfg, pretrained=False).train()
    images, tokens, masks = _inputs(cfg)
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads(forward) -> tuple[torch.Tensor, list[torch.Tensor]]:
        torch.manual_seed(5)
        loss = model.loss(forward(images, tokens), masks)
        grads = torch.autograd.grad(loss, params)
        return loss.detach(), grads

    torch._dynamo.reset()
    counters.clear()
    got = loss_and_grads(torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=False))
    assert not counters["graph_break"] and counters["stats"]["unique_graphs"] == 1
    want = loss_and_grads(model)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    for g, w in zip(got[1], want[1], strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_compiled_tiny_run_builds_one_graph_per_mode(shards, tmp_path, monkeypatch: pytest.MonkeyPatch):
    """Two training steps and an evaluation of a full and a partial batch (filled up, not recompiled): two graphs,
    training and evaluation, where the per-block compilation built 14 (and 5 more for a partial batch)."""
    from dcris.benchmark import training_step
    from dcris.evaluate import evaluate

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    cfg = load_config(preset_name="tiny-dcris", overrides=[
        "train.micro_batch=2", "train.global_batch=2", "train.precision=fp32", "model.compile=true",
        f"train.output_dir={tmp_path}"])  # fmt: skip
    sentences = json.loads((shards / "manifest.json").read_text())["splits"]["val"]["sentences"]
    batch = sentences // 2 + 1  # two batches, the second partial
    assert sentences % batch
    torch._dynamo.reset()
    counters.clear()
    step, setup = training_step(cfg, model_only=True)
    step()
    step()
    model = setup.engine.module
    result = evaluate(model, str(shards), ["val"], image_size=cfg.model.image_size, batch_size=batch, loader="torch",
                      workers=0)["val"]  # fmt: skip
    assert result["count"] == sentences
    assert not counters["graph_break"] and counters["stats"]["unique_graphs"] == 2


class _StandInXformers(types.ModuleType):
    """xformers.ops' interface over SDPA: what the CUDA branch of attention() calls, on the CPU."""

    class LowerTriangularMask:
        pass

    def __init__(self) -> None:
        super().__init__("xformers.ops")
        self.traced = 0

    def memory_efficient_attention(self, q, k, v, attn_bias=None, p=0.0):
        """(B, L, H, D) in and out, as xformers lays them out."""
        self.traced += 1
        causal = isinstance(attn_bias, self.LowerTriangularMask)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)
        return out.transpose(1, 2)


@pytest.fixture
def xformers_decided_on_cpu(monkeypatch: pytest.MonkeyPatch) -> _StandInXformers:
    """The attention kernel decided as xformers for the CPU (a stand-in), and a probe that must not run."""
    stand_in = _StandInXformers()
    monkeypatch.setattr(attention_module, "_xformers_kernels", {"cpu": stand_in})
    monkeypatch.setattr(attention_module, "_probe_xformers", lambda: pytest.fail("the probe ran"))
    return stand_in


@pytest.mark.parametrize("causal", [False, True])
def test_xformers_branch_traces_whole(xformers_decided_on_cpu: _StandInXformers, causal: bool):
    """The branch a GPU takes (xformers decided, 16-bit, no mask) compiles without a break and equals the
    unfused oracle; the compiled code reads the kept decision and never probes."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, 9, 16, generator=g).to(torch.bfloat16) for _ in range(3))
    torch._dynamo.reset()
    compiled = torch.compile(attention_module.attention, fullgraph=True, backend="eager", dynamic=False)
    got = compiled(q, k, v, causal=causal)
    assert xformers_decided_on_cpu.traced == 1
    want = attention_module.reference_attention(q.float(), k.float(), v.float(), causal=causal)
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


def test_xformers_branch_inside_the_compiled_model(xformers_decided_on_cpu: _StandInXformers):
    """bf16 autocast over the whole compiled model with the xformers decision: no graph break, every unmasked
    attention through the stand-in."""
    cfg = preset("tiny-dcris").model
    torch.manual_seed(0)
    model = build_model(cfg, pretrained=False).eval()
    images, tokens, _ = _inputs(cfg)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager", dynamic=False)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        compiled(images, tokens)
    # the text and vision blocks, the adapters' cross-attention, the neck's three gates, the decoder's self-
    # attention (its cross-attention has a key padding mask: SDPA)
    unmasked = cfg.text.layers + cfg.vision.depth + len(cfg.adapters.vision_layers) + 3 + cfg.head.decoder_layers
    assert xformers_decided_on_cpu.traced == unmasked


def test_fused_dense_switch_compiles_without_a_graph_break(monkeypatch: pytest.MonkeyPatch):
    """``model.adapters.fused_dense=true`` (the fused path is live on the CPU in Triton's interpreter, as on a GPU):
    the compiled model runs the dense branch's eager form in its graph and never tries the fused path."""
    from dcris.kernels import dense_branch

    cfg = preset("tiny-dcris").model
    cfg.adapters.fused_dense = True
    torch.manual_seed(0)
    model = build_model(cfg, pretrained=False).eval()
    images, tokens, _ = _inputs(cfg)
    with torch.no_grad():  # as the compiled forward below runs
        live = model.vision.adapters["1"].dense.use_fused(images.new_zeros(1, 32, 2, 2))
    if not live:
        pytest.skip("the fused path is off here (no Triton, or DCRIS_NO_TRITON=1)")
    tried = []
    monkeypatch.setattr(dense_branch.DenseBranch, "_fused_forward", lambda self, h: tried.append(h))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager", dynamic=False)
    with torch.no_grad():
        got = compiled(images, tokens)
        assert not tried
        monkeypatch.setenv("DCRIS_NO_TRITON", "1")  # eager and unfused: the reference
        want = model(images, tokens)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_build_model_decides_the_kernel_before_compiling(monkeypatch: pytest.MonkeyPatch):
    probes = []
    monkeypatch.setattr(attention_module, "_xformers_kernels", {})
    monkeypatch.setattr(attention_module, "_probe_xformers", lambda: probes.append(1))
    cfg = preset("tiny-dcris").model
    build_model(cfg, pretrained=False)
    assert not probes  # eager models decide on their first CUDA attention
    cfg.compile = True
    build_model(cfg, pretrained=False)
    assert probes == [1] and "cuda" in attention_module._xformers_kernels
