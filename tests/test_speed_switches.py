"""Speed switches give today's outputs (fp32): fused q/k/v GEMM, channels-last head, single-key sentence gate,
torch.compile of the whole forward (also under the DeepSpeed engine)."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import types
from collections.abc import Iterator

import pytest
import torch
from randomised import randomised_model
from torch._dynamo.utils import counters

from dcris.config import ModelConfig, preset
from dcris.model import DCRIS, build_model
from dcris.text import text_block
from dcris.vision import vision_block


def _inputs(cfg: ModelConfig, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=g)
    tokens = torch.zeros(batch, cfg.text.context_length, dtype=torch.long)
    tokens[:, 0], tokens[:, 1:6], tokens[:, 6] = 49406, torch.randint(1, 49000, (batch, 5), generator=g), 49407
    masks = (torch.rand(batch, 1, cfg.image_size, cfg.image_size, generator=g) > 0.5).float()
    return images, tokens, masks


def _assert_close(got: torch.Tensor, want: torch.Tensor, rtol: float, name: str = "") -> None:
    """max |got - want| <= rtol * max |want| + 1e-6: relative to the tensor's scale, as the kernel tests measure
    (the floor is for gradients that are zero up to rounding, e.g. conv biases right before a BatchNorm)."""
    error, scale = (got - want).abs().max().item(), want.abs().max().item()
    assert error <= rtol * scale + 1e-6, f"{name}: max |diff| {error:.3g} > {rtol:g} x max |value| {scale:.3g}"


def _step(model: DCRIS, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Eval logits, then one training forward/backward: (eval logits, train logits, gradients by name)."""
    images, tokens, masks = _inputs(cfg)
    model.eval()
    with torch.no_grad():
        eval_logits = model(images, tokens)
    torch.manual_seed(5)  # the same dropout draws on both sides
    model.train()
    logits = model(images, tokens)
    model.loss(logits, masks).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return eval_logits, logits.detach(), grads


@pytest.mark.parametrize("switch", ["vision.fused_qkv", "head.channels_last", "head.single_key_gate"])
def test_switch_gives_the_same_outputs_and_gradients(switch: str):
    base_cfg = preset("tiny-detris").model
    base = randomised_model(base_cfg)
    cfg = preset("tiny-detris").model
    section, key = switch.split(".")
    setattr(getattr(cfg, section), key, True)
    switched = build_model(cfg, pretrained=False)
    result = switched.load_state_dict(base.state_dict(), strict=True)  # same keys with the switch on
    assert not result.missing_keys and not result.unexpected_keys
    assert set(switched.state_dict()) == set(base.state_dict())
    want, got = _step(base, base_cfg), _step(switched, cfg)
    _assert_close(got[0], want[0], 1e-5, "eval logits")
    _assert_close(got[1], want[1], 1e-5, "train logits")
    assert got[2].keys() == want[2].keys()
    for name, grad in want[2].items():
        _assert_close(got[2][name], grad, 1e-4, name)


def test_fused_qkv_state_dict_round_trips_through_the_separate_layout():
    cfg = preset("tiny-dcris").model
    cfg.vision.fused_qkv = True
    model = build_model(cfg, pretrained=False)
    attn = model.vision.backbone.encoder.layer[2].attention
    assert not hasattr(attn, "q_proj") and attn.qkv.weight.shape == (3 * 64, 64)
    state = model.state_dict()
    k_proj = state["vision.backbone.encoder.layer.2.attention.k_proj.weight"]
    torch.testing.assert_close(k_proj, attn.qkv.weight[64:128])
    assert "vision.backbone.encoder.layer.2.attention.qkv.weight" not in state
    unfused = build_model(preset("tiny-dcris").model, pretrained=False)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in unfused.parameters())


def test_compile_switch_compiles_the_whole_forward():
    cfg = preset("tiny-dcris").model
    cfg.compile = True
    model = build_model(cfg, pretrained=False)
    assert model._compiled_call_impl is not None
    assert all(m._compiled_call_impl is None for m in model.modules() if m is not model)


def test_compiled_model_gives_the_same_outputs_in_one_graph_per_mode():
    """The whole forward is one graph in eval and one in training (its backward one more), with no graph break.

    Compiled with the aot_eager backend: the graphs and their autograd are torch.compile's, the kernels eager
    (inductor's CPU code generation takes minutes on a small CPU; the GPU check runs the default backend).
    """
    cfg = preset("tiny-detris").model
    base = randomised_model(cfg)
    compiled = randomised_model(cfg)
    compiled.load_state_dict(base.state_dict())
    compiled.compile(backend="aot_eager", dynamic=False)
    torch._dynamo.reset()
    counters.clear()
    want, got = _step(base, cfg), _step(compiled, cfg)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 2  # eval, training
    _assert_close(got[0], want[0], 1e-5, "eval logits")
    _assert_close(got[1], want[1], 1e-5, "train logits")
    for name, grad in want[2].items():
        _assert_close(got[2][name], grad, 1e-4, name)


def test_compile_switch_runs_inductor_and_matches_eager(monkeypatch: pytest.MonkeyPatch, tmp_path):
    """``model.compile=true`` through build_model, with torch.compile's default backend (inductor's C++ code on
    the CPU): the forward equals eager. The smallest layout that still has every part (two vision blocks with a
    DA, one text block, the head with one decoder layer): inductor compiles with the system C++ compiler, which
    takes minutes for a large graph on two cores."""
    import torch._inductor.config as inductor_config

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # a cold cache: the compilation really runs
    cfg = preset("tiny-dcris").model
    cfg.image_size = 56
    cfg.vision.depth, cfg.vision.taps, cfg.adapters.vision_layers = 2, [0, 1], [0, 1]
    cfg.text.layers, cfg.adapters.text_layers, cfg.head.decoder_layers = 1, [0], 1
    eager = randomised_model(cfg).eval()
    cfg.compile = True
    compiled = build_model(cfg, pretrained=False).eval()
    compiled.load_state_dict(eager.state_dict())
    images, tokens, _ = _inputs(cfg)
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad(), inductor_config.patch(compile_threads=1):  # no compile-worker pool to start
        got, want = compiled(images, tokens), eager(images, tokens)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]  # the whole forward
    assert counters["inductor"]["fxgraph_cache_miss"] == 1  # it went through inductor
    _assert_close(got, want, 1e-5, "compiled logits")


@pytest.fixture
def fresh_fused_state(monkeypatch: pytest.MonkeyPatch):
    """The dense branch's once-per-process first-call check and failure record, fresh for this test."""
    from dcris.kernels import dense_branch

    monkeypatch.setattr(dense_branch, "_checked_kinds", set())
    monkeypatch.setattr(dense_branch, "_fused_failure", [])
    return dense_branch


def test_fused_dense_switch_reaches_every_dense_branch(fresh_fused_state, monkeypatch: pytest.MonkeyPatch, recwarn):
    """``model.adapters.fused_dense=true``: every DA's dense branch runs the Triton kernel (its interpreter on a
    CPU) in the model's forward, and the logits equal the eager model's; the text adapters' 1-D branches stay
    eager. The fused kernels need power-of-two branch widths >= 16: a DA 64 wide."""
    pytest.importorskip("triton")
    from dcris.kernels import dense_branch_autograd

    if not torch.cuda.is_available():
        assert os.environ.get("TRITON_INTERPRET") == "1"  # tests/conftest.py
    cfg = preset("tiny-detris").model
    cfg.image_size, cfg.adapters.vision_hidden = 56, 64
    eager = randomised_model(cfg).eval()
    cfg.adapters.fused_dense = True
    fused = build_model(cfg, pretrained=False).eval()
    fused.load_state_dict(eager.state_dict())
    ran = []
    real = dense_branch_autograd.fused_dense_branch
    monkeypatch.setattr(
        dense_branch_autograd, "fused_dense_branch", lambda h, blocks: ran.append(blocks) or real(h, blocks)
    )
    images, tokens, _ = _inputs(cfg)
    with torch.no_grad():
        got, want = fused(images, tokens), eager(images, tokens)
    vision_branches = [a.dense for a in fused.vision.adapters.values()]
    assert len(vision_branches) == len(cfg.adapters.vision_layers) == 2
    assert len(ran) == len(vision_branches) and all(any(b.blocks == r for r in ran) for b in vision_branches)
    assert not fresh_fused_state._fused_failure and not [w for w in recwarn if w.category is RuntimeWarning]
    assert all(not a.dense.use_fused(torch.zeros(1, 16, 5)) for a in fused.text.adapters.values())
    _assert_close(got, want, 1e-5, "fused-dense logits")


@contextlib.contextmanager
def _xformers_switch(monkeypatch: pytest.MonkeyPatch, disabled: bool) -> Iterator[types.ModuleType]:
    """DCRIS_NO_XFORMERS set (``disabled``) or unset, with the attention module's kept xformers decision cleared
    before and after (the real probe again for later tests); yields ``dcris.attention``."""
    from dcris import attention as attention_module

    if disabled:
        monkeypatch.setenv("DCRIS_NO_XFORMERS", "1")
    else:
        monkeypatch.delenv("DCRIS_NO_XFORMERS", raising=False)
    attention_module._xformers_kernels.clear()
    try:
        yield attention_module
    finally:
        attention_module._xformers_kernels.clear()


@pytest.mark.parametrize("disabled", [False, True])
def test_no_xformers_variable_forces_sdpa(monkeypatch: pytest.MonkeyPatch, disabled: bool):
    """With CUDA and a working xformers (faked here), the attention entry point takes xformers unless
    DCRIS_NO_XFORMERS=1, which leaves torch's scaled_dot_product_attention."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    fake = types.ModuleType("xformers.ops")
    fake.memory_efficient_attention = lambda q, k, v, **_: q
    monkeypatch.setitem(sys.modules, "xformers", types.ModuleType("xformers"))
    monkeypatch.setitem(sys.modules, "xformers.ops", fake)
    sys.modules["xformers"].ops = fake
    real_randn = torch.randn
    monkeypatch.setattr(torch, "randn", lambda *a, device=None, **k: real_randn(*a, **k))  # the probe's, on the CPU
    with _xformers_switch(monkeypatch, disabled) as attention_module:
        found = attention_module.xformers_ops()
        assert (found is None) if disabled else (found is fake)
        assert attention_module.xformers_available() is not disabled


@pytest.mark.gpu
@pytest.mark.parametrize("disabled", [False, True])
def test_which_attention_kernel_runs_on_cuda(monkeypatch: pytest.MonkeyPatch, disabled: bool):
    """bf16 on CUDA: xformers' memory-efficient kernel when it loads, torch's SDPA under DCRIS_NO_XFORMERS=1,
    seen in the profiler's op names (not inferred from the switch)."""
    from torch.profiler import ProfilerActivity, profile

    with _xformers_switch(monkeypatch, disabled) as attention_module:
        if not disabled and not attention_module.xformers_available():
            pytest.skip("xformers' kernels do not load for this torch")
        q, k, v = (torch.randn(2, 8, 1029, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            attention_module.attention(q, k, v)
            torch.cuda.synchronize()
    names = {e.name for e in prof.events()}
    sdpa = any("scaled_dot_product" in n for n in names)
    xformers = any("xformers" in n or "efficient_attention_forward" in n for n in names)
    assert (sdpa and not xformers) if disabled else (xformers and not sdpa), sorted(names)


def _block_outputs_and_grads(fn, module: torch.nn.Module, adapter: torch.nn.Module, x: torch.Tensor, *args):
    x = x.clone().requires_grad_(True)
    out = fn(module, adapter, x, *args)
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in adapter.named_parameters()}
    adapter.zero_grad(set_to_none=True)
    return out.detach(), x.grad, grads


def test_one_vision_and_one_text_block_compile_whole_with_inductor():
    """fullgraph=True: no graph break in a block with its adapter; inductor's kernels equal eager in training."""
    model = randomised_model(preset("tiny-detris").model).train()
    g = torch.Generator().manual_seed(2)
    words = torch.randn(2, 17, 64, generator=g)
    vision = (model.vision.backbone.encoder.layer[1], model.vision.adapters["1"])
    text = (model.text.transformer.resblocks[1], model.text.adapters["1"])
    cases = [
        (vision_block, vision, torch.randn(2, 5 + 64, 64, generator=g), (words, (8, 8), 4, 0.2)),
        (text_block, text, torch.randn(2, 17, 64, generator=g), (0.2,)),
    ]
    torch._dynamo.reset()
    for fn, (module, adapter), x, args in cases:
        adapter.eval()  # no dropout: eager and compiled draw differently
        want = _block_outputs_and_grads(fn, module, adapter, x, *args)
        compiled = torch.compile(fn, backend="inductor", fullgraph=True, dynamic=False)
        got = _block_outputs_and_grads(compiled, module, adapter, x, *args)
        _assert_close(got[0], want[0], 1e-5, f"{fn.__name__} output")
        _assert_close(got[1], want[1], 1e-4, f"{fn.__name__} input gradient")
        for name, grad in want[2].items():
            _assert_close(got[2][name], grad, 1e-4, f"{fn.__name__} {name}")


def test_compiled_model_trains_under_the_deepspeed_engine(tmp_path, monkeypatch: pytest.MonkeyPatch):
    """model.compile=true through the trainer's engine: the same fp32 losses as eager over two steps."""
    from dcris.benchmark import training_step
    from dcris.config import load_config

    losses = {}
    for compile_ in (False, True):
        # aot_eager: torch.compile's graphs and autograd with eager kernels (inductor is the test above)
        monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
        cfg = load_config(preset_name="tiny-dcris", overrides=[
            "train.micro_batch=2", "train.global_batch=2", "train.precision=fp32", f"model.compile={compile_}",
            f"train.output_dir={tmp_path / str(compile_)}"])  # fmt: skip
        torch._dynamo.reset()
        step, setup = training_step(cfg, model_only=True)
        engine = setup.engine
        assert (engine.module._compiled_call_impl is not None) == compile_
        recorded: list[torch.Tensor] = []
        loss = engine.module.loss

        def recording_loss(logits, masks, loss=loss, recorded=recorded):
            recorded.append(loss(logits, masks))
            return recorded[-1]

        engine.module.loss = recording_loss
        for _ in range(2):
            step()
        losses[compile_] = torch.stack(recorded).detach()
    _assert_close(losses[True], losses[False], 1e-5, "losses")
