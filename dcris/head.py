"""The trainable CRIS-style segmentation head: neck, vision-language decoder, projector and loss (SPEC 2, "Head").

Parameter and buffer names follow the released DETRIS code: :class:`SegmentationHead` holds :class:`Neck`,
:class:`Decoder` and :class:`Projector` as ``neck``, ``decoder`` and ``proj``, so a released checkpoint's
``neck.*``, ``decoder.*`` and ``proj.*`` keys are the model's ``head.neck.*``, ... keys. Init is PyTorch's
default for every layer, as in CRIS/DETRIS (the attention's in-projection is Xavier-uniform with zero biases, as
in torch's ``nn.MultiheadAttention``). Every attention goes through :class:`dcris.attention.MultiheadAttention`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dcris.attention import MultiheadAttention
from dcris.config import HeadConfig


def conv_bn_relu(in_dim: int, out_dim: int, kernel_size: int = 1, transposed: bool = False) -> nn.Sequential:
    """Conv (no bias, "same" padding, stride 1) + BatchNorm2d + ReLU, as Sequential indices 0, 1, 2.

    Args:
        in_dim: input channels.
        out_dim: output channels.
        kernel_size: odd square kernel size.
        transposed: use a ConvTranspose2d (weight laid out (in, out, k, k)) instead of a Conv2d.
    """
    conv = nn.ConvTranspose2d if transposed else nn.Conv2d
    return nn.Sequential(
        conv(in_dim, out_dim, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_dim),
        nn.ReLU(inplace=True),
    )


# ----------------------------------------------------------------------------------------------- neck


class SentenceGate(nn.Module):
    """Gates a map by the sentence: map tokens attend to the one sentence vector; map * attention output.

    With a single key the softmax is 1 for every query, so the attention output is ``out_proj(v_proj(f_s))`` for
    every token: ``single_key`` computes it that way, once per sample, skipping the queries and keys.
    """

    def __init__(self, width: int, heads: int, single_key: bool = False) -> None:
        super().__init__()
        self.multihead_attn = MultiheadAttention(width, heads)
        self.single_key = single_key

    def forward(self, x: torch.Tensor, sentence: torch.Tensor) -> torch.Tensor:
        """Gates ``x`` (B, HW, C) by ``sentence`` (B, 1, C); returns (B, HW, C)."""
        if self.single_key:
            attn = self.multihead_attn
            _, _, w_v = attn.in_proj_weight.chunk(3)
            _, _, b_v = attn.in_proj_bias.chunk(3)
            return x * attn.out_proj(F.linear(sentence, w_v, b_v))  # (B, 1, C) broadcast over HW
        return x * self.multihead_attn(x, sentence, sentence)


class CoordConv(nn.Module):
    """Appends x then y coordinates in [-1, 1] as two channels, then a CBR (``conv1``)."""

    def __init__(self, in_dim: int, out_dim: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.conv1 = conv_bn_relu(in_dim + 2, out_dim, kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, out_dim, h, w)."""
        b, _, h, w = x.shape
        xs = torch.linspace(-1, 1, w, device=x.device).to(x.dtype)  # (w,)
        ys = torch.linspace(-1, 1, h, device=x.device).to(x.dtype)  # (h,)
        coords = torch.stack([xs.expand(h, w), ys[:, None].expand(h, w)])  # (2, h, w)
        return self.conv1(torch.cat([x, coords.expand(b, 2, h, w)], dim=1))  # (B, C + 2, h, w) -> conv


class Neck(nn.Module):
    """Projects the three vision maps to the head width, gates each by the sentence, and fuses them.

    Args:
        vision_width: channels of the vision maps (768 for B, 1024 for L).
        text_width: width of the sentence feature f_s (the text embed dim, 512).
        width: head width (512).
        heads: heads of the sentence-gating attention (8).
        single_key_gate: compute the gates as what they equal (see :class:`SentenceGate`).
        channels_last: run the convolutions on channels-last maps.
    """

    def __init__(
        self,
        vision_width: int,
        text_width: int,
        width: int = 512,
        heads: int = 8,
        single_key_gate: bool = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.channels_last = channels_last
        self.fusion3 = SentenceGate(width, heads, single_key_gate)
        self.fusion4 = SentenceGate(width, heads, single_key_gate)
        self.fusion5 = SentenceGate(width, heads, single_key_gate)
        self.txt_proj = nn.Linear(text_width, width)
        self.f3_proj = conv_bn_relu(vision_width, width)
        self.f4_proj = conv_bn_relu(vision_width, width)
        self.f5_proj = conv_bn_relu(vision_width, width, transposed=True)
        self.aggr = conv_bn_relu(3 * width, width)
        self.coordconv = nn.Sequential(CoordConv(width, width, 3), conv_bn_relu(width, width, 3))

    def forward(self, maps: Sequence[torch.Tensor], sentence: torch.Tensor) -> torch.Tensor:
        """Fuses the maps with the sentence.

        Args:
            maps: the three vision maps, each (B, vision_width, h, w).
            sentence: f_s, (B, text_width).

        Returns:
            (B, width, h, w).
        """
        txt = self.txt_proj(sentence)[:, None, :]  # (B, 1, C)
        if self.channels_last:
            maps = [v.contiguous(memory_format=torch.channels_last) for v in maps]
        gated = []
        projs, fusions = (self.f3_proj, self.f4_proj, self.f5_proj), (self.fusion3, self.fusion4, self.fusion5)
        for proj, fusion, v in zip(projs, fusions, maps, strict=True):
            v = proj(v)  # (B, C, h, w)
            b, c, h, w = v.shape
            tokens = v.flatten(2).transpose(1, 2)  # (B, hw, C)
            gated.append(fusion(tokens, txt).transpose(1, 2).reshape(b, c, h, w))  # (B, C, h, w)
        fq = self.aggr(torch.cat(gated, dim=1))  # (B, 3C, h, w) -> (B, C, h, w)
        return self.coordconv(fq) + fq


# ----------------------------------------------------------------------------------------------- decoder


@functools.lru_cache(maxsize=32)
def sine_position_2d(dim: int, height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """CRIS's 2-D sine position encoding, cached per size, device and dtype.

    Channels [0, dim/2) encode the column (x), [dim/2, dim) the row (y); within each half sin at even and cos
    at odd channels, frequencies 10000^(-2i / (dim/2)).

    Returns:
        (height * width, dim), positions in row-major (y, x) order.
    """
    if dim % 4:
        raise ValueError(f"2-D sine position encoding needs a width divisible by 4, got {dim}")
    half = dim // 2
    with torch.inference_mode(False):  # a plain tensor, usable with autograd even if first built under inference
        freq = torch.exp(torch.arange(0, half, 2, device=device) * (-math.log(10000.0) / half))  # (dim/4,)
        x = torch.arange(width, device=device)[:, None] * freq  # (w, dim/4)
        y = torch.arange(height, device=device)[:, None] * freq  # (h, dim/4)
        pe_x = torch.stack([x.sin(), x.cos()], dim=-1).flatten(1)  # (w, dim/2): sin, cos interleaved
        pe_y = torch.stack([y.sin(), y.cos()], dim=-1).flatten(1)  # (h, dim/2)
        pe = torch.cat([pe_x[None].expand(height, -1, -1), pe_y[:, None].expand(-1, width, -1)], dim=-1)
        return pe.reshape(height * width, dim).to(dtype)  # (hw, dim)


@functools.lru_cache(maxsize=32)
def sine_position_1d(dim: int, length: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The standard 1-D sine position encoding (sin at even, cos at odd channels), cached.

    Returns:
        (length, dim).
    """
    if dim % 2:
        raise ValueError(f"1-D sine position encoding needs an even width, got {dim}")
    with torch.inference_mode(False):
        freq = torch.exp(torch.arange(0, dim, 2, device=device) * (-math.log(10000.0) / dim))  # (dim/2,)
        pos = torch.arange(length, device=device)[:, None] * freq  # (L, dim/2)
        return torch.stack([pos.sin(), pos.cos()], dim=-1).flatten(1).to(dtype)  # (L, dim)


class DecoderLayer(nn.Module):
    """Pre-norm layer: self-attention over the map, cross-attention to the words, FFN; each normed, residual.

    Args:
        width: token width.
        heads: attention heads.
        ffn_dim: FFN hidden width.
        dropout: attention and residual dropout.
    """

    def __init__(self, width: int, heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.self_attn_norm = nn.LayerNorm(width)
        self.cross_attn_norm = nn.LayerNorm(width)
        self.self_attn = MultiheadAttention(width, heads, dropout=dropout)
        self.multihead_attn = MultiheadAttention(width, heads, dropout=dropout)
        self.ffn = nn.Sequential(
            nn.Linear(width, ffn_dim),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.LayerNorm(ffn_dim),
            nn.Linear(ffn_dim, width),
        )
        self.norm1 = nn.LayerNorm(width)
        self.norm2 = nn.LayerNorm(width)
        self.norm3 = nn.LayerNorm(width)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        vis: torch.Tensor,
        words: torch.Tensor,
        vis_pos: torch.Tensor,
        word_pos: torch.Tensor,
        pad_mask: torch.Tensor,
    ) -> torch.Tensor:
        """One layer.

        Args:
            vis: map tokens, (B, hw, C).
            words: word features, (B, L, C).
            vis_pos: 2-D position encoding, (hw, C).
            word_pos: 1-D position encoding, (L, C).
            pad_mask: (B, L), True where the word is padding.

        Returns:
            (B, hw, C).
        """
        v2 = self.norm1(vis)
        q = v2 + vis_pos  # (B, hw, C)
        vis = vis + self.dropout(self.self_attn_norm(self.self_attn(q, q, v2)))
        v2 = self.norm2(vis)
        v2 = self.multihead_attn(v2 + vis_pos, words + word_pos, words, key_padding_mask=pad_mask)  # (B, hw, C)
        vis = vis + self.dropout(self.cross_attn_norm(v2))
        return vis + self.dropout(self.ffn(self.norm3(vis)))


class Decoder(nn.Module):
    """Vision-language decoder: the map attends to itself and to the words; final LayerNorm.

    Args:
        width: head width; the word features must have this width too.
        layers: number of decoder layers (3).
        heads: attention heads (8).
        ffn_dim: FFN hidden width (512).
        dropout: dropout (0.1).
    """

    def __init__(self, width: int = 512, layers: int = 3, heads: int = 8, ffn_dim: int = 512,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(width, heads, ffn_dim, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor, words: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        """Decodes the fused map.

        Args:
            x: neck output, (B, C, h, w).
            words: word features f_t, (B, L, C).
            pad_mask: (B, L), True where the token id is 0 (padding).

        Returns:
            (B, C, h, w).
        """
        b, c, h, w = x.shape
        vis = x.flatten(2).transpose(1, 2)  # (B, hw, C)
        # under autocast the LayerNorms give float32, so the positions are float32; otherwise the input's dtype
        autocast = torch.amp.is_autocast_available(x.device.type) and torch.is_autocast_enabled(x.device.type)
        pos_dtype = torch.float32 if autocast else x.dtype
        # compiled, the encodings become constants of the graph: the host-side cache is for eager runs
        pos_2d, pos_1d = (
            (sine_position_2d.__wrapped__, sine_position_1d.__wrapped__)
            if torch.compiler.is_compiling()
            else (sine_position_2d, sine_position_1d)
        )
        vis_pos = pos_2d(c, h, w, x.device, pos_dtype)  # (hw, C)
        word_pos = pos_1d(words.shape[-1], words.shape[1], words.device, pos_dtype)  # (L, C)
        for layer in self.layers:
            vis = layer(vis, words, vis_pos, word_pos, pad_mask)
        return self.norm(vis).transpose(1, 2).reshape(b, c, h, w)  # (B, C, h, w)


# ----------------------------------------------------------------------------------------------- projector


class Projector(nn.Module):
    """Upsamples the decoded map x4 and applies a per-sample 3x3 conv whose kernel comes from the sentence.

    Args:
        width: channels of the decoded map (512).
        text_width: width of the sentence feature f_s (512).
        dim: channels the per-sample kernel convolves (256).
        kernel_size: per-sample kernel size (3).
    """

    def __init__(self, width: int = 512, text_width: int = 512, dim: int = 256, kernel_size: int = 3) -> None:
        super().__init__()
        self.dim, self.kernel_size = dim, kernel_size
        self.vis = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            conv_bn_relu(width, width, 3),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            conv_bn_relu(width, dim, 3),
            nn.Conv2d(dim, dim, 1),
        )
        self.txt = nn.Linear(text_width, dim * kernel_size * kernel_size + 1)

    def forward(self, x: torch.Tensor, sentence: torch.Tensor) -> torch.Tensor:
        """Segmentation logits.

        Args:
            x: decoded map, (B, width, h, w).
            sentence: f_s, (B, text_width).

        Returns:
            (B, 1, 4h, 4w) logits.
        """
        x = self.vis(x)  # (B, dim, 4h, 4w)
        b, c, h, w = x.shape
        kernel = self.txt(sentence)  # (B, dim * k * k + 1)
        weight = kernel[:, :-1].reshape(b, c, self.kernel_size, self.kernel_size)  # (B, dim, k, k)
        bias = kernel[:, -1]  # (B,)
        if torch.onnx.is_in_onnx_export():  # eager and compiled runs keep the grouped convolution: one kernel
            return per_sample_conv_unrolled(x, weight, bias)
        x = x.reshape(1, b * c, h, w)  # (1, B * dim, 4h, 4w): one group per sample
        out = F.conv2d(x, weight, bias, padding=self.kernel_size // 2, groups=b)  # (1, B, 4h, 4w)
        return out.transpose(0, 1)  # (B, 1, 4h, 4w)


def per_sample_conv_unrolled(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """:class:`Projector`'s per-sample convolution ('same' padding) as a sum over the kernel's k * k offsets of
    the shifted map contracted with each sample's weights: the form an ONNX graph with a dynamic batch can hold
    (ONNX's Conv needs a fixed group count, and the grouped convolution has one group per sample).

    Args:
        x: maps (B, C, h, w).
        weight: per-sample kernels (B, C, k, k), k odd.
        bias: per-sample biases (B,).

    Returns:
        (B, 1, h, w), what ``F.conv2d`` with ``groups=B`` over the samples stacked as channels gives.
    """
    _, _, h, w = x.shape
    k = weight.shape[-1]
    padded = F.pad(x, (k // 2,) * 4)  # (B, C, h + k - 1, w + k - 1)
    out = bias[:, None, None]  # (B, 1, 1)
    for i in range(k):
        for j in range(k):
            out = out + torch.einsum("bcyx,bc->byx", padded[:, :, i : i + h, j : j + w], weight[:, :, i, j])
    return out[:, None]  # (B, 1, h, w)


# ----------------------------------------------------------------------------------------------- no-target output


class NoTargetHead(nn.Module):
    """The "no object" logit of a phrase (gRefCOCO), read from the decoder state, as ReLA's no-target classifier
    reads its region-language state: the decoder output pooled over positions -- the mean (what the map says as a
    whole) and the max (whether any position matches the phrase) -- then Linear(2C -> C) -> ReLU -> Linear(C -> 1).
    Positive: the phrase names nothing in the image.
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(2 * width, width)
        self.fc2 = nn.Linear(width, 1)

    def forward(self, fq: torch.Tensor) -> torch.Tensor:
        """(B,) logits from the decoder output ``fq`` (B, C, h, w)."""
        flat = fq.flatten(2)  # (B, C, hw)
        pooled = torch.cat([flat.mean(dim=2), flat.amax(dim=2)], dim=1)  # (B, 2C)
        return self.fc2(F.relu(self.fc1(pooled))).squeeze(1)


# ----------------------------------------------------------------------------------------------- assembly and loss


def build_head(cfg: HeadConfig, vision_width: int, text_width: int) -> tuple[Neck, Decoder, Projector]:
    """Builds the three head modules from the head config (held by :class:`SegmentationHead`).

    Args:
        cfg: head config.
        vision_width: channels of the vision maps.
        text_width: width of f_s (the text embed dim); f_t must have width ``cfg.width``.
    """
    neck = Neck(vision_width, text_width, cfg.width, cfg.decoder_heads, cfg.single_key_gate, cfg.channels_last)
    decoder = Decoder(cfg.width, cfg.decoder_layers, cfg.decoder_heads, cfg.ffn_dim, cfg.dropout)
    proj = Projector(cfg.width, text_width, cfg.projector_dim)
    return neck, decoder, proj


class SegmentationHead(nn.Module):
    """Neck -> decoder -> projector, holding them as ``neck``, ``decoder`` and ``proj`` (and, with
    ``cfg.no_target``, :class:`NoTargetHead` as ``no_target``, reading the decoder output).

    Args:
        cfg: head config.
        vision_width: channels of the vision maps.
        text_width: width of f_s (the text embed dim).
    """

    def __init__(self, cfg: HeadConfig, vision_width: int, text_width: int) -> None:
        super().__init__()
        # with channels_last only the maps are converted (in the neck): a convolution follows its input's layout,
        # and DeepSpeed flattens weights into contiguous buffers anyway (it also needs stride(-1) == 1 to broadcast)
        self.neck, self.decoder, self.proj = build_head(cfg, vision_width, text_width)
        self.no_target = NoTargetHead(cfg.width) if cfg.no_target else None

    def forward(
        self, maps: Sequence[torch.Tensor], words: torch.Tensor, sentence: torch.Tensor, tokens: torch.Tensor
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Segmentation logits (and, with the no-target output, the "no object" logits).

        Args:
            maps: the three vision maps, each (B, vision_width, h, w).
            words: word features f_t, (B, L, width).
            sentence: sentence feature f_s, (B, text_width).
            tokens: token ids, (B, L); id 0 is padding.

        Returns:
            (B, 1, 4h, 4w) logits; with ``cfg.no_target`` the pair (those, (B,) "no object" logits).
        """
        fq = self.neck(maps, sentence)  # (B, C, h, w)
        fq = self.decoder(fq, words, tokens == 0)  # (B, C, h, w)
        masks = self.proj(fq, sentence)
        return masks if self.no_target is None else (masks, self.no_target(fq))


def segmentation_loss(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sigmoid binary cross-entropy against the mask resized (nearest) to the logits, mean over pixels.

    Args:
        logits: (B, 1, h, w).
        mask: (B, 1, H, W), values in [0, 1] (soft masks allowed).

    Returns:
        Scalar loss (float32).
    """
    if mask.shape[-2:] != logits.shape[-2:]:
        mask = F.interpolate(mask.float(), size=logits.shape[-2:], mode="nearest")  # (B, 1, h, w)
    return F.binary_cross_entropy_with_logits(logits.float(), mask.float())


def no_target_loss(
    no_target_logits: torch.Tensor, num_targets: torch.Tensor, class_weights: Sequence[float] = (1.0, 1.0)
) -> torch.Tensor:
    """Class-weighted binary cross-entropy of the "no object" logits (B,) against whether each phrase names nothing
    (``num_targets`` (B,) == 0), float32.

    ``class_weights`` are (a target, no target): each sample's loss is weighted by its class's weight and the sum
    divided by the sum of those weights, as ``F.cross_entropy(weight=...)`` averages ReLA's two-class logits (a
    sigmoid of one logit is a softmax of two whose difference it is).
    """
    truth = (num_targets == 0).float()
    per_sample = F.binary_cross_entropy_with_logits(no_target_logits.float(), truth, reduction="none")
    weights = torch.where(truth.bool(), float(class_weights[1]), float(class_weights[0]))
    return (weights * per_sample).sum() / weights.sum()


__all__ = [
    "CoordConv",
    "Decoder",
    "DecoderLayer",
    "Neck",
    "NoTargetHead",
    "Projector",
    "SegmentationHead",
    "SentenceGate",
    "build_head",
    "conv_bn_relu",
    "no_target_loss",
    "per_sample_conv_unrolled",
    "segmentation_loss",
    "sine_position_1d",
    "sine_position_2d",
]
