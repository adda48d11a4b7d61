"""Tests for dcris.head: released key layout, parameter count, shapes, loss, gradients, padding mask."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dcris.config import HeadConfig
from dcris.head import SegmentationHead, build_head, segmentation_loss, sine_position_1d, sine_position_2d

REFERENCE_TSV = Path(__file__).resolve().parent / "data" / "detris_b_state_dict.tsv"
TINY = HeadConfig(width=64, decoder_layers=1, decoder_heads=4, ffn_dim=64, dropout=0.1, projector_dim=32)


def _inputs(batch: int, vision_width: int, width: int, text_width: int, h: int, w: int, length: int = 17):
    maps = [torch.randn(batch, vision_width, h, w) for _ in range(3)]
    words = torch.randn(batch, length, width)
    sentence = torch.randn(batch, text_width)
    tokens = torch.randint(1, 1000, (batch, length))
    tokens[:, length // 2 :] = 0  # second half is padding
    return maps, words, sentence, tokens


def _reference_keys() -> dict[str, tuple[int, ...]]:
    keys = {}
    for line in REFERENCE_TSV.read_text().splitlines()[1:]:
        key, shape, _ = line.split("\t")
        if key.split(".")[0] in ("neck", "decoder", "proj"):
            keys[key] = () if shape == "scalar" else tuple(int(s) for s in shape.split("x"))
    return keys


def test_keys_and_shapes_match_released_checkpoint() -> None:
    head = SegmentationHead(HeadConfig(), vision_width=768, text_width=512)
    ours = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert ours == _reference_keys()


def test_trainable_parameter_count() -> None:
    head = SegmentationHead(HeadConfig(), vision_width=768, text_width=512)
    assert sum(p.numel() for p in head.parameters() if p.requires_grad) == 22_802_433


def test_build_head_gives_top_level_modules() -> None:
    neck, decoder, proj = build_head(TINY, vision_width=48, text_width=40)
    model = nn.Module()
    model.neck, model.decoder, model.proj = neck, decoder, proj
    assert {k.split(".")[0] for k in model.state_dict()} == {"neck", "decoder", "proj"}


@pytest.mark.parametrize(
    ("cfg", "vision_width", "h", "w"),
    [(HeadConfig(), 768, 32, 32), (TINY, 48, 8, 6)],
    ids=["base-32x32", "tiny-8x6"],
)
def test_output_shape(cfg: HeadConfig, vision_width: int, h: int, w: int) -> None:
    torch.manual_seed(0)
    head = SegmentationHead(cfg, vision_width=vision_width, text_width=40).eval()
    maps, words, sentence, tokens = _inputs(2, vision_width, cfg.width, 40, h, w)
    with torch.no_grad():
        out = head(maps, words, sentence, tokens)
    assert out.shape == (2, 1, 4 * h, 4 * w)
    assert torch.isfinite(out).all()


def test_bf16_autocast() -> None:
    torch.manual_seed(0)
    head = SegmentationHead(TINY, vision_width=48, text_width=40)
    maps, words, sentence, tokens = _inputs(2, 48, 64, 40, 8, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(maps, words, sentence, tokens)
        loss = segmentation_loss(out, torch.rand(2, 1, 64, 48))
    loss.backward()
    assert out.shape == (2, 1, 32, 24) and loss.dtype == torch.float32 and torch.isfinite(loss)


def test_loss_matches_hand_computation() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 1, 8, 6)
    mask = torch.rand(3, 1, 32, 24)
    small = mask[:, :, ::4, ::4]  # nearest resize by an integer factor picks the top-left pixel of each block
    expected = F.binary_cross_entropy(torch.sigmoid(logits), small)
    torch.testing.assert_close(segmentation_loss(logits, mask), expected)
    torch.testing.assert_close(segmentation_loss(logits, small), expected)


def test_gradients_reach_every_parameter() -> None:
    torch.manual_seed(0)
    head = SegmentationHead(TINY, vision_width=48, text_width=40)
    maps, words, sentence, tokens = _inputs(2, 48, 64, 40, 8, 6)
    segmentation_loss(head(maps, words, sentence, tokens), torch.rand(2, 1, 32, 24)).backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_padding_mask() -> None:
    torch.manual_seed(0)
    head = SegmentationHead(TINY, vision_width=48, text_width=40).eval()
    maps, words, sentence, tokens = _inputs(2, 48, 64, 40, 8, 6)
    with torch.no_grad():
        base = head(maps, words, sentence, tokens)
        padded, real = words.clone(), words.clone()
        padded[:, -1] += 5.0  # the last position is padding
        real[:, 1] += 5.0  # position 1 is a real token
        torch.testing.assert_close(head(maps, padded, sentence, tokens), base)
        assert not torch.allclose(head(maps, real, sentence, tokens), base)


def test_sine_positions_match_cris_formula() -> None:
    dim, h, w = 16, 3, 5
    pe2 = sine_position_2d(dim, h, w, torch.device("cpu"), torch.float32).reshape(h, w, dim)
    half = dim // 2
    for c in range(half):
        freq = math.exp(-(c - c % 2) * math.log(10000.0) / half)
        fn = math.sin if c % 2 == 0 else math.cos
        for y in range(h):
            for x in range(w):
                assert pe2[y, x, c].item() == pytest.approx(fn(x * freq), abs=1e-6)
                assert pe2[y, x, half + c].item() == pytest.approx(fn(y * freq), abs=1e-6)
    pe1 = sine_position_1d(dim, 17, torch.device("cpu"), torch.float32)
    for c in range(dim):
        freq = math.exp(-(c - c % 2) * math.log(10000.0) / dim)
        fn = math.sin if c % 2 == 0 else math.cos
        for pos in range(17):
            assert pe1[pos, c].item() == pytest.approx(fn(pos * freq), abs=1e-6)


def test_decoder_layer_matches_torch_multihead_attention() -> None:
    """The layer equals the released code's sequence-first nn.MultiheadAttention version (eval mode)."""
    torch.manual_seed(0)
    _, decoder, _ = build_head(TINY, vision_width=48, text_width=40)
    decoder.eval()
    layer = decoder.layers[0]
    self_attn, cross_attn = nn.MultiheadAttention(64, 4), nn.MultiheadAttention(64, 4)
    self_attn.load_state_dict(layer.self_attn.state_dict())
    cross_attn.load_state_dict(layer.multihead_attn.state_dict())
    x, words = torch.randn(2, 64, 8, 6), torch.randn(2, 17, 64)
    pad_mask = torch.zeros(2, 17, dtype=torch.bool)
    pad_mask[:, 9:] = True
    vis_pos = sine_position_2d(64, 8, 6, x.device, torch.float32)[:, None]  # (hw, 1, C)
    word_pos = sine_position_1d(64, 17, x.device, torch.float32)[:, None]  # (L, 1, C)
    with torch.no_grad():
        vis, txt = x.flatten(2).permute(2, 0, 1), words.transpose(0, 1)  # (hw, B, C), (L, B, C)
        v2 = layer.norm1(vis)
        vis = vis + layer.self_attn_norm(self_attn(v2 + vis_pos, v2 + vis_pos, v2)[0])
        v2 = layer.norm2(vis)
        v2 = cross_attn(v2 + vis_pos, txt + word_pos, txt, key_padding_mask=pad_mask)[0]
        vis = vis + layer.cross_attn_norm(v2)
        vis = vis + layer.ffn(layer.norm3(vis))
        expected = decoder.norm(vis).permute(1, 2, 0).reshape(2, 64, 8, 6)
        torch.testing.assert_close(decoder(x, words, pad_mask), expected, atol=1e-5, rtol=1e-5)
