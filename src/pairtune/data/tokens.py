"""Encoding texts at any scale with the Rust tokenizer alone (no transformers, no torch)."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence


def encode_in_chunks(
    tokenizer, texts: Sequence[str], *, max_length: int | None = None, side: str = "right", chunk: int = 100_000
) -> Iterator[list]:
    """The ``tokenizers.Encoding`` of every text, a chunk at a time, special tokens included.

    ``tokenizer`` is a ``tokenizers.Tokenizer`` or a transformers fast tokenizer (its ``backend_tokenizer``).
    A copy of the backend is used, without padding and truncated to ``max_length`` from ``side`` (or not at
    all), so the tokenizer's own settings and any a saved tokenizer.json carries stay out of it. Each chunk
    is encoded on every core and only its Encodings come back: a million texts never sit in memory at once.
    """
    backend = copy.deepcopy(getattr(tokenizer, "backend_tokenizer", tokenizer))
    backend.no_padding()
    if max_length is None:
        backend.no_truncation()
    else:
        backend.enable_truncation(max_length, direction=side)
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # fast: no offsets
    for start in range(0, len(texts), chunk):
        yield encode(list(texts[start : start + chunk]), add_special_tokens=True)


def count_tokens(tokenizer, texts: Sequence[str], *, chunk: int = 100_000) -> list[int]:
    """Tokens per text including special tokens, untruncated (as the seed card's dataset table counts)."""
    return [len(encoding.ids) for part in encode_in_chunks(tokenizer, texts, chunk=chunk) for encoding in part]
