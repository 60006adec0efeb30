"""Counting tokens at any scale with the Rust tokenizer alone (no transformers, no torch)."""

from __future__ import annotations

import copy
from collections.abc import Sequence


def count_tokens(tokenizer, texts: Sequence[str], *, chunk: int = 100_000) -> list[int]:
    """Tokens per text including special tokens, untruncated (as the seed card's dataset table counts).

    ``tokenizer`` is a ``tokenizers.Tokenizer`` or a transformers fast tokenizer (its ``backend_tokenizer``).
    Works in chunks so a million texts cost lengths, not token lists, in memory.
    """
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    backend = copy.deepcopy(backend)  # without the padding/truncation a saved tokenizer.json may carry
    backend.no_padding()
    backend.no_truncation()
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # fast: no offsets
    counts: list[int] = []
    for start in range(0, len(texts), chunk):
        part = list(texts[start : start + chunk])
        counts.extend(len(encoding.ids) for encoding in encode(part, add_special_tokens=True))
    return counts
