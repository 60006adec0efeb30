"""Tokenising once per run: the Rust backend's ids are the ones the transformers call gives."""

from __future__ import annotations

import numpy as np
import pandas as pd

from pairtune.data.batching import TokenColumn, tokenize_columns


def test_the_rust_path_gives_the_transformers_call_s_ids_in_chunks_and_truncated(base_model, prepared_bundled):
    tokenizer = base_model.tokenizer
    frame = pd.read_parquet(prepared_bundled / "train.parquet")
    long_text = " ".join(frame["sentence_1"].head(20))  # far past 16 tokens: truncated
    columns = [frame["sentence_0"].tolist() + [long_text, ""], frame["sentence_1"].tolist() + ["x", long_text]]
    before = tokenizer.backend_tokenizer.truncation
    # chunks of 7 rows: every column is encoded in many pieces and stitched back
    tokens = tokenize_columns(tokenizer, columns, max_length=16, chunk=7)
    assert tokenizer.backend_tokenizer.truncation == before  # it works on a copy of the backend
    for texts, column in zip(columns, tokens.columns, strict=True):
        expected = tokenizer(texts, truncation=True, max_length=16, add_special_tokens=True)["input_ids"]
        assert len(column) == len(texts)
        assert [column.row(i).tolist() for i in range(len(texts))] == expected
        assert max(column.length(i) for i in range(len(texts))) == 16  # the long text stopped at 16


def test_columns_stitched_from_parts_keep_every_row():
    parts = [TokenColumn.from_lists([[1, 2], [3]]), TokenColumn.from_lists([]), TokenColumn.from_lists([[4, 5, 6]])]
    column = TokenColumn.concat(parts)
    assert [column.row(i).tolist() for i in range(len(column))] == [[1, 2], [3], [4, 5, 6]]
    assert column.ids.dtype == np.int32 and column.offsets.tolist() == [0, 2, 3, 6]
