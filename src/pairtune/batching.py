"""Tokenise every text once per run; cut padded per-column batches from the cached token ids."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

Features = dict[str, Tensor]


@dataclass
class TokenColumn:
    """One column's token ids, flat in one int32 array with row offsets: ~4 bytes a token at any scale."""

    ids: np.ndarray  # (total tokens,)
    offsets: np.ndarray  # (rows + 1,)

    @classmethod
    def from_lists(cls, rows: list[list[int]]) -> TokenColumn:
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        ids = np.fromiter((t for r in rows for t in r), dtype=np.int32, count=int(offsets[-1]))
        return cls(ids, offsets)

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
        features = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention_mask)}
        if self.with_token_types:
            features["token_type_ids"] = torch.zeros_like(features["input_ids"])
        return features


def tokenize_columns(tokenizer, columns: Sequence[Sequence[str]], *, max_length: int) -> TokenizedColumns:
    encoded = [
        TokenColumn.from_lists(
            tokenizer(list(texts), truncation=True, max_length=max_length, add_special_tokens=True)["input_ids"]
        )
        for texts in columns
    ]
    with_token_types = "token_type_ids" in getattr(tokenizer, "model_input_names", [])
    return TokenizedColumns(encoded, tokenizer.pad_token_id or 0, with_token_types)
