"""Tokenise every text once per run; cut padded per-column batches from the cached token ids."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch
from torch import Tensor

from pairtune.data.tokens import encode_in_chunks

Features = dict[str, Tensor]


@dataclass
class TokenColumn:
    """One column's token ids, flat in one int32 array with row offsets: ~4 bytes a token at any scale."""

    ids: np.ndarray  # (total tokens,)
    offsets: np.ndarray  # (rows + 1,)

    @classmethod
    def from_lists(cls, rows: list[list[int]]) -> TokenColumn:
        lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        ids = np.fromiter(chain.from_iterable(rows), dtype=np.int32, count=int(offsets[-1]))
        return cls(ids, offsets)

    @classmethod
    def concat(cls, parts: Sequence[TokenColumn]) -> TokenColumn:
        if len(parts) <= 1:
            return parts[0] if parts else cls.from_lists([])
        starts = np.cumsum([0] + [int(part.offsets[-1]) for part in parts[:-1]])
        offsets = np.concatenate([parts[0].offsets[:1]] + [p.offsets[1:] + s for p, s in zip(parts, starts, strict=True)])
        return cls(np.concatenate([part.ids for part in parts]), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def row(self, index: int) -> np.ndarray:
        return self.ids[self.offsets[index] : self.offsets[index + 1]]

    def length(self, index: int) -> int:
        return int(self.offsets[index + 1] - self.offsets[index])


@dataclass
class TokenizedColumns:
    """Token ids per column (anchor, positive, negatives...), tokenised once per run."""

    columns: list[TokenColumn]
    pad_id: int
    with_token_types: bool

    def __len__(self) -> int:
        return len(self.columns[0])

    def batch(self, rows: Sequence[int]) -> list[Features]:
        """One padded feature dict per column; each column is padded only to its own longest row."""
        return [self._pad(column, rows) for column in self.columns]

    def _pad(self, column: TokenColumn, rows: Sequence[int]) -> Features:
        width = max(column.length(row) for row in rows)
        input_ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        attention_mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            ids = column.row(row)
            input_ids[i, : len(ids)] = ids
            attention_mask[i, : len(ids)] = 1
        features = {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(attention_mask),
        }
        if self.with_token_types:
            features["token_type_ids"] = torch.zeros_like(features["input_ids"])
        return features


def tokenize_columns(
    tokenizer, columns: Sequence[Sequence[str]], *, max_length: int, chunk: int = 100_000
) -> TokenizedColumns:
    """Token ids of every column, as ``tokenizer(texts, truncation=True, max_length=...)`` gives them.

    A transformers fast tokenizer is driven through its Rust backend directly (``tokens.encode_in_chunks``,
    truncating as that call would): only the ids cross into Python, where the call builds several Python
    lists per text. Any other tokenizer takes the call itself.
    """
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        encoded = [TokenColumn.from_lists(_call(tokenizer, texts, max_length)) for texts in columns]
    else:
        side = getattr(tokenizer, "truncation_side", "right")
        encoded = [
            TokenColumn.concat([
                TokenColumn.from_lists([encoding.ids for encoding in part])
                for part in encode_in_chunks(tokenizer, texts, max_length=max_length, side=side, chunk=chunk)
            ])
            for texts in columns
        ]
    with_token_types = "token_type_ids" in getattr(tokenizer, "model_input_names", [])
    return TokenizedColumns(encoded, tokenizer.pad_token_id or 0, with_token_types)


def _call(tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    return tokenizer(list(texts), truncation=True, max_length=max_length, add_special_tokens=True)["input_ids"]
