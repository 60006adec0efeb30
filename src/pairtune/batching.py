"""Tokenise every text once per run; cut padded per-column batches from the cached token ids."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

Features = dict[str, Tensor]


@dataclass
class TokenizedColumns:
    """Token ids per column (anchor, positive, negatives...), one unpadded list per row."""

    columns: list[list[list[int]]]
    pad_id: int
    with_token_types: bool

    def __len__(self) -> int:
        return len(self.columns[0])

    def real_tokens(self, rows: Sequence[int]) -> int:
        return sum(len(column[row]) for column in self.columns for row in rows)

    def batch(self, rows: Sequence[int]) -> list[Features]:
        """One padded feature dict per column; each column is padded only to its own longest row."""
        return [self._pad([column[row] for row in rows]) for column in self.columns]

    def _pad(self, sequences: list[list[int]]) -> Features:
        width = max(len(ids) for ids in sequences)
        input_ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for i, ids in enumerate(sequences):
            input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[i, : len(ids)] = 1
        features = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.with_token_types:
            features["token_type_ids"] = torch.zeros_like(input_ids)
        return features


def tokenize_columns(tokenizer, columns: Sequence[Sequence[str]], *, max_length: int) -> TokenizedColumns:
    encoded = [
        tokenizer(list(texts), truncation=True, max_length=max_length, add_special_tokens=True)["input_ids"]
        for texts in columns
    ]
    with_token_types = "token_type_ids" in getattr(tokenizer, "model_input_names", [])
    return TokenizedColumns(encoded, tokenizer.pad_token_id or 0, with_token_types)


def count_tokens(tokenizer, texts: Sequence[str]) -> list[int]:
    """Tokens per text including special tokens, untruncated (as the seed card's dataset table counts)."""
    return [len(ids) for ids in tokenizer(list(texts), add_special_tokens=True)["input_ids"]]
