"""The adapters and their placement against SPEC 2 written out by hand in plain torch.nn.functional.

The references below use the modules' tensors only (read by name from their state dicts, used as they are so
gradients can be compared) and no code of dcris: the down-projection, the stepwise dense branch with its
BatchNorm (batch statistics and the running-statistics update in training), the cross-attention to the words,
the up-projection, the 0.2 residual scale, and the block each adapter sits in. Every tensor is random and
non-zero (BatchNorm statistics, LayerNorm and LayerScale weights, biases), the patch grid is not square, and
fp32 results must agree to 1e-5.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dcris.adapters import DenseCrossAdapter, TextAdapter
from dcris.config import preset
from dcris.model import build_model

SCALE = 0.2  # SPEC 2: x + mlp(...) + 0.2 * adapter(...)
BN_EPS = 1e-3  # SPEC 2: every BatchNorm of the dense branches
BN_MOMENTUM = 0.1  # torch's default, which the released code keeps
PREFIX = 5  # cls + 4 registers skip the vision dense branch
VISION_LN_EPS, TEXT_LN_EPS = 1e-6, 1e-5  # DINOv2's and CLIP's LayerNorms
TOL = dict(rtol=1e-5, atol=1e-5)

Tensors = dict[str, torch.Tensor]


# ------------------------------------------------------------------------------------------------ set-up


def randomise(module: nn.Module, seed: int) -> nn.Module:
    """Every parameter and floating buffer random and non-zero, at scales that keep activations O(1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() > 1:  # weights: fan-in scaled normal
                p.copy_(torch.randn(p.shape, generator=gen) * p[0].numel() ** -0.5)
            elif name.endswith("weight") or name.endswith("lambda1"):  # norm gains, LayerScale: around 1
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            else:  # biases
                p.copy_(torch.rand(p.shape, generator=gen) * 0.4 - 0.2)
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) * 1.5 + 0.5)
    tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    zero = [n for n, t in tensors.items() if t.is_floating_point() and not (t != 0).all()]
    assert not zero, f"tensors with zeros: {zero}"
    return module


def sub(state: Tensors, prefix: str) -> Tensors:
    """The entries of ``state`` under ``prefix.``, with the prefix removed."""
    return {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}


def tensors_of(module: nn.Module) -> Tensors:
    """The module's parameters and buffers themselves (not copies: gradients flow, statistics are compared)."""
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


# ------------------------------------------------------------------------------------------------ references


def linear(x: torch.Tensor, p: Tensors) -> torch.Tensor:
    return F.linear(x, p["weight"], p["bias"])


def batch_norm(x: torch.Tensor, p: Tensors, training: bool, stats: dict[str, torch.Tensor]) -> torch.Tensor:
    """BatchNorm over every axis but the channel one, written out; in training the updated running statistics
    (biased variance normalises, the unbiased one enters the running average) are put in ``stats``."""
    axes = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    if training:
        n = x.numel() // x.shape[1]
        mean, var = x.mean(axes), ((x - x.mean(axes, keepdim=True)) ** 2).sum(axes) / n
        stats["running_mean"] = (1 - BN_MOMENTUM) * p["running_mean"] + BN_MOMENTUM * mean.detach()
        stats["running_var"] = (1 - BN_MOMENTUM) * p["running_var"] + BN_MOMENTUM * var.detach() * n / (n - 1)
    else:
        mean, var = p["running_mean"], p["running_var"]
    normed = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + BN_EPS)
    return normed * p["weight"].view(shape) + p["bias"].view(shape)


def conv_bn_relu(x: torch.Tensor, p: Tensors, kernel: int, out: int, training: bool, stats: dict) -> torch.Tensor:
    """Conv (bias, 'same' padding) + BatchNorm + ReLU; checks the conv has SPEC's kernel size and width."""
    weight = p["conv.weight"]
    assert tuple(weight.shape) == (out, x.shape[1], *[kernel] * (x.dim() - 2)), tuple(weight.shape)
    conv = F.conv2d if x.dim() == 4 else F.conv1d
    y = conv(x, weight, p["conv.bias"], padding=kernel // 2)
    return F.relu(batch_norm(y, sub(p, "bn"), training, stats))


def dense_branches(h: torch.Tensor, p: Tensors, training: bool, stats: dict) -> torch.Tensor:
    """SPEC 2's stepwise branches on (B, C, *spatial): b1 = CBR1x1 to C/2; b2 = CBR3x3(CBR1x1(cat[h, b1]) to
    C/16) to C/4; b3 = CBR5x5(CBR1x1(cat[h, b1, b2]) to C/16) to C/4; returns cat[b1, b2, b3] (C channels)."""
    c = h.shape[1]

    def cbr(name: str, x: torch.Tensor, kernel: int, out: int) -> torch.Tensor:
        stats[name] = {}
        return conv_bn_relu(x, sub(p, name), kernel, out, training, stats[name])

    b1 = cbr("branch1", h, 1, c // 2)
    b2 = cbr("branch2.1", cbr("branch2.0", torch.cat([h, b1], 1), 1, c // 16), 3, c // 4)
    b3 = cbr("branch3.1", cbr("branch3.0", torch.cat([h, b1, b2], 1), 1, c // 16), 5, c // 4)
    return torch.cat([b1, b2, b3], 1)


def multihead_attention(q_in: torch.Tensor, kv_in: torch.Tensor, p: Tensors, heads: int, causal: bool = False):
    """softmax(q k^T / sqrt(d)) v per head with nn.MultiheadAttention's stacked in-projection, then out_proj."""
    wq, wk, wv = p["in_proj_weight"].chunk(3)
    bq, bk, bv = p["in_proj_bias"].chunk(3)
    b, lq, width = q_in.shape

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(b, t.shape[1], heads, width // heads).transpose(1, 2)  # (B, heads, L, d)

    q, k, v = split(F.linear(q_in, wq, bq)), split(F.linear(kv_in, wk, bk)), split(F.linear(kv_in, wv, bv))
    scores = q @ k.transpose(-1, -2) / math.sqrt(width // heads)
    if causal:
        scores = scores.masked_fill(torch.ones(lq, lq, dtype=torch.bool).triu(1), float("-inf"))
    out = (F.softmax(scores, -1) @ v).transpose(1, 2).reshape(b, lq, width)
    return linear(out, sub(p, "out_proj"))


def dense_cross_adapter(
    x: torch.Tensor, words: torch.Tensor, p: Tensors, grid: tuple[int, int], heads: int, training: bool, stats: dict
) -> torch.Tensor:
    """DA(x, f_t) of SPEC 2 on x (B, 5 + H*W, dim) and words (B, L, text_dim)."""
    b, _, _ = x.shape
    rows, cols = grid
    h = F.relu(linear(x, sub(p, "down")))  # (B, N, hidden)
    patch_map = h[:, PREFIX:].reshape(b, rows, cols, -1).permute(0, 3, 1, 2)  # row-major patches -> (B, C, H, W)
    dense = dense_branches(patch_map, sub(p, "dense"), training, stats) + patch_map
    dense_tokens = dense.permute(0, 2, 3, 1).reshape(b, rows * cols, -1)  # (B, H*W, hidden)
    q = linear(dense_tokens, sub(p, "cross.image_proj"))
    kv = linear(words, sub(p, "cross.text_proj"))
    crossed = linear(multihead_attention(q, kv, sub(p, "cross.multihead_attn"), heads), sub(p, "cross.back_proj"))
    out = torch.cat([h[:, :PREFIX], crossed], 1) + h
    return linear(out, sub(p, "up"))


def text_adapter(x: torch.Tensor, p: Tensors, released: bool, training: bool, stats: dict) -> torch.Tensor:
    """TA(x) of SPEC 2: paper form up(relu(down(x))); released form with the 1-D branches over positions 1..L-1,
    h[0] put back in front, then h added everywhere (position 0 enters the up-projection as 2 * h[0])."""
    h = F.relu(linear(x, sub(p, "down")))  # (B, L, hidden)
    if released:
        branches = dense_branches(h[:, 1:].transpose(1, 2), sub(p, "dense"), training, stats).transpose(1, 2)
        h = torch.cat([h[:, :1], branches], 1) + h
    return linear(h, sub(p, "up"))


def layer_norm(x: torch.Tensor, p: Tensors, eps: float) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * p["weight"] + p["bias"]


def vision_block(
    x: torch.Tensor, words: torch.Tensor, p: Tensors, da: Tensors | None, grid: tuple[int, int], heads: int,
    da_heads: int,
) -> torch.Tensor:  # fmt: skip
    """x + ls1(attn(norm1(x))); x + ls2(mlp(norm2(x)) + 0.2 * DA(norm2(x), f_t)) with DINOv2's exact-GELU MLP."""
    b, n, c = x.shape
    y = layer_norm(x, sub(p, "norm1"), VISION_LN_EPS)
    q, k, v = (linear(y, sub(p, f"attention.{t}_proj")).view(b, n, heads, -1).transpose(1, 2) for t in "qkv")
    attended = F.softmax(q @ k.transpose(-1, -2) / math.sqrt(c // heads), -1) @ v
    x = x + p["layer_scale1.lambda1"] * linear(attended.transpose(1, 2).reshape(b, n, c), sub(p, "attention.o_proj"))
    y = layer_norm(x, sub(p, "norm2"), VISION_LN_EPS)
    branch = linear(F.gelu(linear(y, sub(p, "mlp.fc1"))), sub(p, "mlp.fc2"))
    if da is not None:
        branch = branch + SCALE * dense_cross_adapter(y, words, da, grid, da_heads, False, {})
    return x + p["layer_scale2.lambda1"] * branch


def text_block(x: torch.Tensor, p: Tensors, ta: Tensors | None, heads: int, released: bool) -> torch.Tensor:
    """x + attn(ln_1(x)) (causal); x + mlp(ln_2(x)) + 0.2 * TA(x), TA reading the stream after attention;
    CLIP's MLP with QuickGELU."""
    y = layer_norm(x, sub(p, "ln_1"), TEXT_LN_EPS)
    x = x + multihead_attention(y, y, sub(p, "attn"), heads, causal=True)
    hidden = linear(layer_norm(x, sub(p, "ln_2"), TEXT_LN_EPS), sub(p, "mlp.c_fc"))
    out = x + linear(hidden * torch.sigmoid(1.702 * hidden), sub(p, "mlp.c_proj"))
    if ta is not None:
        out = out + SCALE * text_adapter(x, ta, released, False, {})
    return out


# ------------------------------------------------------------------------------------------------ adapters


def _check_statistics(module: nn.Module, stats: dict, prefix: str = "dense") -> None:
    """After one training forward, every BatchNorm's running statistics equal the hand-updated ones."""
    norms = {n: m for n, m in module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    assert len(norms) == len(stats) == 5
    for name, want in stats.items():
        bn = norms[f"{prefix}.{name}.bn"]
        torch.testing.assert_close(bn.running_mean, want["running_mean"], **TOL, msg=f"{name} running_mean")
        torch.testing.assert_close(bn.running_var, want["running_var"], **TOL, msg=f"{name} running_var")
        assert bn.num_batches_tracked == 1


def _check_gradients(module: nn.Module, got: torch.Tensor, want: torch.Tensor) -> None:
    """The module's gradients of a random projection of its output equal those through the reference."""
    weights = torch.randn(got.shape, generator=torch.Generator().manual_seed(9))
    params = [p for p in module.parameters()]
    got_grads = torch.autograd.grad((got * weights).sum(), params)
    want_grads = torch.autograd.grad((want * weights).sum(), params)
    for (name, _), g, w in zip(module.named_parameters(), got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("training", [False, True])
def test_dense_cross_adapter_matches_spec(training: bool):
    """DA on a 3 x 5 patch grid: output, BatchNorm statistics (training) and gradients."""
    heads, grid = 4, (3, 5)
    adapter = randomise(DenseCrossAdapter(48, 32, 24, 16, heads, 0.1, PREFIX), seed=1).train(training)
    adapter.cross.multihead_attn.dropout = 0.0  # the reference has no dropout (checked separately below)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, PREFIX + grid[0] * grid[1], 48, generator=g)
    words = torch.randn(2, 7, 24, generator=g)
    p = {k: (v.clone() if "running" in k else v) for k, v in tensors_of(adapter).items()}  # statistics before
    stats: dict = {}
    want = dense_cross_adapter(x, words, p, grid, heads, training, stats)
    got = adapter(x, words, grid)
    torch.testing.assert_close(got, want, **TOL)
    if training:
        _check_statistics(adapter, stats)
        _check_gradients(adapter, got, want)


def test_dense_cross_adapter_attention_dropout_acts_in_training_only():
    adapter = randomise(DenseCrossAdapter(48, 32, 24, 16, 4, 0.5, PREFIX), seed=1)
    x, words = torch.randn(2, PREFIX + 6, 48), torch.randn(2, 7, 24)
    with torch.no_grad():
        adapter.eval()
        assert torch.equal(adapter(x, words, (2, 3)), adapter(x, words, (2, 3)))
        adapter.train()
        assert not torch.equal(adapter(x, words, (2, 3)), adapter(x, words, (2, 3)))


@pytest.mark.parametrize("released", [False, True], ids=["paper", "released"])
@pytest.mark.parametrize("training", [False, True])
def test_text_adapter_matches_spec(released: bool, training: bool):
    adapter = randomise(TextAdapter(40, 32, released=released), seed=3).train(training)
    x = torch.randn(3, 9, 40, generator=torch.Generator().manual_seed(4))
    p = {k: (v.clone() if "running" in k else v) for k, v in tensors_of(adapter).items()}
    stats: dict = {}
    want = text_adapter(x, p, released, training, stats)
    got = adapter(x)
    torch.testing.assert_close(got, want, **TOL)
    if training and released:
        _check_statistics(adapter, stats)
    if training:
        _check_gradients(adapter, got, want)


# ------------------------------------------------------------------------------------------------ placement


@pytest.fixture(scope="module", params=["tiny-dcris", "tiny-detris"])
def tiny_model(request):
    cfg = preset(request.param).model
    torch.manual_seed(0)
    return cfg, randomise(build_model(cfg, pretrained=False), seed=5).eval()


def test_vision_blocks_by_hand(tiny_model):
    """Every block, with and without a DA, on random tokens of a non-square grid; then the whole encoder from
    its token embedding to the three maps (taps after blocks 1 and 2, the final LayerNorm)."""
    cfg, model = tiny_model
    encoder, state = model.vision, tensors_of(model.vision)
    heads, da_heads = cfg.vision.heads, cfg.adapters.cross_heads
    g = torch.Generator().manual_seed(6)
    grid = (3, 4)
    x = torch.randn(2, PREFIX + 12, cfg.vision.width, generator=g)
    words = torch.randn(2, cfg.text.context_length, cfg.text.width, generator=g)

    def hand_block(i: int, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        da = sub(state, f"adapters.{i}") if i in cfg.adapters.vision_layers else None
        return vision_block(x, words, sub(state, f"backbone.encoder.layer.{i}"), da, grid, heads, da_heads)

    assert sorted(int(i) for i in encoder.adapters) == cfg.adapters.vision_layers == [1, 3]
    with torch.no_grad():
        for i in range(cfg.vision.depth):
            torch.testing.assert_close(encoder.block(i, x, words, grid), hand_block(i, x, grid), **TOL, msg=str(i))
        images = torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=g)
        maps = encoder(images, words)
        tokens, grid = encoder.embed(images)
        taps = []
        for i in range(cfg.vision.depth):
            tokens = hand_block(i, tokens, grid)
            taps.append(tokens)
        final = layer_norm(tokens, sub(state, "backbone.layernorm"), VISION_LN_EPS)
        assert cfg.vision.taps == [1, 2]
        for got, want in zip(maps, [taps[1], taps[2], final], strict=True):
            want = want[:, PREFIX:].reshape(2, *grid, -1).permute(0, 3, 1, 2)
            torch.testing.assert_close(got, want, **TOL)


def test_text_encoder_by_hand(tiny_model):
    """Every block, with and without a TA, then the whole encoder: f_t = ln_final of every position, f_s = the
    end token's (largest id) word feature times text_projection."""
    cfg, model = tiny_model
    encoder, state = model.text, tensors_of(model.text)
    released = cfg.adapters.text_form == "released"
    g = torch.Generator().manual_seed(7)
    length = cfg.text.context_length
    tokens = torch.zeros(2, length, dtype=torch.long)  # start, BPE ids, end (the largest id), zero padding
    for row, end in enumerate((6, 9)):
        tokens[row, 0], tokens[row, end] = 49406, 49407
        tokens[row, 1:end] = torch.randint(1, 49000, (end - 1,), generator=g)

    def hand_block(i: int, x: torch.Tensor) -> torch.Tensor:
        ta = sub(state, f"adapters.{i}") if i in cfg.adapters.text_layers else None
        return text_block(x, sub(state, f"transformer.resblocks.{i}"), ta, cfg.text.heads, released)

    assert sorted(int(i) for i in encoder.adapters) == cfg.adapters.text_layers == [1, 3]
    with torch.no_grad():
        x = torch.randn(2, length, cfg.text.width, generator=g)
        for i in range(cfg.text.layers):
            torch.testing.assert_close(encoder.block(i, x), hand_block(i, x), **TOL, msg=str(i))
        words, sentence = encoder(tokens)
        x = state["token_embedding.weight"][tokens] + state["positional_embedding"][:length]
        for i in range(cfg.text.layers):
            x = hand_block(i, x)
        want_words = layer_norm(x, sub(state, "ln_final"), TEXT_LN_EPS)
        torch.testing.assert_close(words, want_words, **TOL)
        ends = want_words[torch.arange(2), torch.tensor([6, 9])]
        torch.testing.assert_close(sentence, ends @ state["text_projection"], **TOL)
