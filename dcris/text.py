"""Frozen CLIP text encoder with TextAdapters (SPEC 2).

The modules are open_clip's (its ``Transformer`` of ``ResidualAttentionBlock`` s, QuickGELU for OpenAI
weights) under the attribute names of open_clip's ``CLIP`` text tower, so open_clip checkpoints load by name.
Each block's ``attn`` is :class:`dcris.attention.MultiheadAttention`, which has nn.MultiheadAttention's
parameter layout but runs through the model's one attention entry point.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import open_clip
import torch
from open_clip.factory import load_state_dict
from open_clip.transformer import QuickGELU, Transformer
from torch import nn

from dcris.adapters import TextAdapter
from dcris.attention import MultiheadAttention
from dcris.config import AdapterConfig, ConfigError, TextConfig


def text_block(
    block: nn.Module, adapter: Callable[[torch.Tensor], torch.Tensor] | None, x: torch.Tensor, scale: float
) -> torch.Tensor:
    """One CLIP block with its TextAdapter parallel to the MLP (SPEC 2); x (B, L, width) -> (B, L, width).

    ``x + ls1(attn(ln_1(x)))``, then ``x + ls2(mlp(ln_2(x)) + scale * TA(x))``: the TA reads the residual stream
    after attention. ``adapter`` is any callable of that shape (a TextAdapter, or one routing rows to several).
    """
    x = x + block.ls_1(block.attn(*(block.ln_1(x),) * 3, causal=True))
    branch = block.mlp(block.ln_2(x))
    if adapter is not None:
        branch = branch + scale * adapter(x)
    return x + block.ls_2(branch)


class TextEncoder(nn.Module):
    """CLIP text tower; returns word features f_t (B, L, width) and the sentence feature f_s (B, embed_dim)."""

    def __init__(self, cfg: TextConfig, adapters: AdapterConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.scale = adapters.scale
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.positions, cfg.width))
        act = QuickGELU if cfg.quick_gelu else nn.GELU
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, act_layer=act)
        for block in self.transformer.resblocks:
            block.attn = MultiheadAttention(cfg.width, cfg.heads)
        self.ln_final = nn.LayerNorm(cfg.width)
        self.text_projection = nn.Parameter(torch.empty(cfg.width, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(0.0))  # unused here; kept so CLIP checkpoints load whole
        self._init_like_clip()
        self.requires_grad_(False)
        released = adapters.text_form == "released"
        self.adapters = nn.ModuleDict(
            {str(i): TextAdapter(cfg.width, adapters.text_hidden, released=released) for i in adapters.text_layers}
        )

    def _init_like_clip(self) -> None:
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=self.cfg.width**-0.5)

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """The frozen CLIP weights (no adapters), under open_clip's key names."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("adapters.")}

    def load_backbone(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Loads CLIP text weights from an open_clip/CLIP state dict (vision keys are ignored)."""
        wanted = self.backbone_state_dict()
        text = {k: v for k, v in state.items() if k in wanted}
        missing = sorted(set(wanted) - set(text))
        if missing:
            raise ConfigError(f"text weights {source!r} lack {len(missing)} keys, e.g. {missing[0]!r}")
        for k, v in text.items():
            if k == "positional_embedding" and v.shape[0] >= self.cfg.positions:
                text[k] = v[: self.cfg.positions]
            if text[k].shape != wanted[k].shape:
                need = tuple(wanted[k].shape)
                raise ConfigError(f"text weights {source!r}: {k} has shape {tuple(v.shape)}, the config needs {need}")
        self.load_state_dict(text, strict=False)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token plus position embeddings of tokens (B, L): the input (B, L, width) of block 0."""
        return self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]

    def block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Block ``i`` (with its TextAdapter, if any) on the residual stream x (B, L, width)."""
        adapter = self.adapters[str(i)] if str(i) in self.adapters else None
        return text_block(self.transformer.resblocks[i], adapter, x, self.scale)

    def finish(self, x: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The last block's output x (B, L, width) to f_t (B, L, width) and f_s (B, embed_dim)."""
        words = self.ln_final(x)  # (B, L, width)
        # the end token has the largest id: its feature, projected, is the sentence feature
        sentence = words[torch.arange(words.shape[0], device=words.device), tokens.argmax(dim=-1)]
        return words, sentence @ self.text_projection

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Maps tokens (B, L) to f_t (B, L, width) and f_s (B, embed_dim)."""
        x = self.embed(tokens)  # (B, L, width)
        for i in range(self.cfg.layers):
            x = self.block(i, x)
        return self.finish(x, tokens)


def cached_clip_file(pretrained: dict) -> str | None:
    """The local copy of an open_clip pretrained entry, if one is cached; never touches the network.

    open_clip fetches a tag from the Hugging Face hub when the entry names a hub repository (the hub cache, which
    ``HF_HUB_CACHE`` / ``HF_HOME`` move) and otherwise from its URL into ``~/.cache/clip``.
    """
    from huggingface_hub import try_to_load_from_cache
    from open_clip.pretrained import HF_WEIGHTS_NAME, _get_safe_alternatives

    if pretrained.get("hf_hub"):
        repo_id, filename = os.path.split(pretrained["hf_hub"])
        filename = filename or HF_WEIGHTS_NAME
        for name in (*_get_safe_alternatives(filename), filename):  # open_clip prefers the safetensors file too
            found = try_to_load_from_cache(repo_id, name)
            if isinstance(found, str):
                return found
    if pretrained.get("url"):
        path = Path("~/.cache/clip").expanduser() / os.path.basename(pretrained["url"])
        if path.is_file():
            return str(path)
    return None


def read_clip_state_dict(cfg: TextConfig, allow_download: bool) -> tuple[dict[str, torch.Tensor], str]:
    """Reads CLIP weights: ``cfg.weights`` is a local checkpoint file or an open_clip pretrained tag.

    A tag is read from the local caches when it is there; it is downloaded only with ``allow_download``.
    """
    source = cfg.weights
    if Path(source).is_file():
        path = source
    else:
        pcfg = open_clip.get_pretrained_cfg(cfg.model_name, source)
        if not pcfg:
            raise ConfigError(
                f"text weights {source!r} are neither a file nor an open_clip pretrained tag of {cfg.model_name!r}"
            )
        path = cached_clip_file(pcfg)
        if path is None:
            if not allow_download:
                raise ConfigError(
                    f"text weights {cfg.model_name}/{source} are not in the local cache: pass "
                    "model.allow_download=true to fetch them, or give a local checkpoint file in model.text.weights"
                )
            path = open_clip.download_pretrained(pcfg)
    try:
        state = load_state_dict(path)
    except RuntimeError:
        state = torch.jit.load(path, map_location="cpu").state_dict()  # OpenAI's original TorchScript archives
    return state, source


def build_text_encoder(cfg: TextConfig, adapters: AdapterConfig, pretrained: bool, allow_download: bool) -> TextEncoder:
    """Builds the text encoder and, when ``pretrained`` and weights are named, loads them."""
    encoder = TextEncoder(cfg, adapters)
    if pretrained and cfg.weights:
        encoder.load_backbone(*read_clip_state_dict(cfg, allow_download))
    return encoder
