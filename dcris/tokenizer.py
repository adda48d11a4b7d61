"""CLIP BPE tokenization with DCRIS's short context (SPEC 2: ``word_len`` = 17; 22 for G-Ref umd).

Start token, BPE tokens, end token, truncated so the end token stays last, zero padded -- as the released
code's CLIP tokenizer with ``truncate=True``. open_clip ships the BPE vocabulary, so this works offline.
:func:`truncations` says which texts lose words to the context and what the model reads of them.
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
from open_clip.tokenizer import SimpleTokenizer

CONTEXT_LENGTH = 17
# Words whose BPE split is remembered. open_clip's own cache keeps every word ever seen, so a server's memory grows
# with its traffic. Without any cache a phrase of 8 words takes ~180 us instead of ~60 us (on 2 CPU cores), so
# a bounded one (~2 MB) keeps the speed.
BPE_CACHE_WORDS = 10_000


class TextTooLongError(ValueError):
    """A sentence needs more tokens than the context holds (raised only with ``truncate=False``)."""


class BoundedCache(OrderedDict):
    """A dict that keeps its ``pinned`` entries and at most ``size`` others, forgetting the least recently used."""

    def __init__(self, pinned: dict[str, str], size: int) -> None:
        super().__init__()
        self.pinned, self.size = dict(pinned), size

    def __contains__(self, key: object) -> bool:
        return key in self.pinned or super().__contains__(key)

    def __getitem__(self, key: str) -> str:
        if key in self.pinned:
            return self.pinned[key]
        self.move_to_end(key)
        return super().__getitem__(key)

    def __setitem__(self, key: str, value: str) -> None:
        super().__setitem__(key, value)
        if len(self) > self.size:
            self.popitem(last=False)


_BPE_LOCK = threading.Lock()  # the cache is shared by the threads that tokenize


@functools.cache
def _bpe() -> SimpleTokenizer:
    # Loading the vocabulary takes ~0.3 s; every call shares one tokenizer.
    tokenizer = SimpleTokenizer()
    tokenizer.cache = BoundedCache(tokenizer.cache, BPE_CACHE_WORDS)  # its special tokens stay
    return tokenizer


@dataclass(frozen=True)
class Truncation:
    """A text longer than the context, and what the model reads of it."""

    index: int  # position of the text in the list given
    text: str  # the text as given
    tokens_needed: int  # tokens the whole text takes, start and end token included
    kept: str  # the words the model reads (the BPE tokens that fit, decoded)


def _token_ids(text: str) -> list[int]:
    """Start token, BPE ids of the text, end token: the untruncated row."""
    bpe = _bpe()
    with _BPE_LOCK:
        ids = bpe.encode(text)
    return [bpe.sot_token_id, *ids, bpe.eot_token_id]


def truncations(texts: list[str], context_length: int = CONTEXT_LENGTH) -> list[Truncation]:
    """The texts that :func:`tokenize` (with ``truncate=True``) cuts short, in order; empty when all fit.

    Args:
        texts: Sentences.
        context_length: Tokens per sentence, start and end token included.
    """
    found = []
    for index, text in enumerate(texts):
        ids = _token_ids(text)
        if len(ids) > context_length:
            kept = _bpe().decode(ids[1 : context_length - 1]).strip()  # without the start and end tokens
            found.append(Truncation(index=index, text=text, tokens_needed=len(ids), kept=kept))
    return found


def tokenize(texts: list[str], context_length: int = CONTEXT_LENGTH, truncate: bool = True) -> torch.Tensor:
    """Tokenize sentences into fixed-length CLIP token ids.

    Args:
        texts: Sentences.
        context_length: Tokens per sentence, start and end token included.
        truncate: Cut sentences that do not fit (keeping the end token last); when False a sentence that
            does not fit raises instead.

    Returns:
        int64 tensor (N, context_length).

    Raises:
        TextTooLongError: ``truncate`` is False and a sentence needs more than ``context_length`` tokens; the
            message names the sentence.
    """
    out = torch.zeros(len(texts), context_length, dtype=torch.long)
    for row, text in enumerate(texts):
        ids = _token_ids(text)
        if len(ids) > context_length:
            if not truncate:
                raise TextTooLongError(
                    f"text too long: {text!r} needs {len(ids)} tokens, the model reads at most {context_length}"
                )
            ids = ids[: context_length - 1] + ids[-1:]  # the end token stays last
        out[row, : len(ids)] = torch.tensor(ids)
    return out
