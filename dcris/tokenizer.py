"""CLIP BPE tokenization with DCRIS's short context (SPEC 2: ``word_len`` = 17).

Start token, BPE tokens, end token, truncated so the end token stays last, zero padded -- as the released
code's CLIP tokenizer with ``truncate=True``. open_clip ships the BPE vocabulary, so this works offline.
"""

from __future__ import annotations

import functools

import torch
from open_clip.tokenizer import SimpleTokenizer

CONTEXT_LENGTH = 17


class TextTooLongError(ValueError):
    """A sentence needs more tokens than the context holds (raised only with ``truncate=False``)."""


@functools.cache
def _bpe() -> SimpleTokenizer:
    # Loading the vocabulary takes ~0.3 s; every call shares one tokenizer.
    return SimpleTokenizer()


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
    bpe = _bpe()
    sot, eot = bpe.sot_token_id, bpe.eot_token_id
    out = torch.zeros(len(texts), context_length, dtype=torch.long)
    for row, text in enumerate(texts):
        ids = [sot, *bpe.encode(text), eot]
        if len(ids) > context_length:
            if not truncate:
                raise TextTooLongError(
                    f"text too long: {text!r} needs {len(ids)} tokens, the model reads at most {context_length}"
                )
            ids = ids[: context_length - 1] + [eot]
        out[row, : len(ids)] = torch.tensor(ids)
    return out
