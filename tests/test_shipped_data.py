"""The pair sets pairtune ships (data/raw): the notation's shape, and no text in two places.

``make bench-quality`` keeps a recipe only if it holds on every set, so a text shared by two sets (or
repeated within one) would let one set's pairs leak into another's eval or test split.
"""

from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path

import pytest

from .conftest import ROOT

SETS = sorted((ROOT / "data/raw").glob("*.jsonl"))


def rows_of(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_three_sets_are_shipped():
    assert [p.name for p in SETS] == ["caravan.jsonl", "observatory.jsonl", "pairs.jsonl"]


@pytest.mark.parametrize("path", SETS, ids=lambda p: p.name)
def test_every_note_has_the_notations_shape_and_no_text_repeats(path):
    rows = rows_of(path)
    assert len(rows) >= 300
    assert all(list(row) == ["sentence_0", "sentence_1"] for row in rows)
    for number, row in enumerate(rows, start=1):
        note, sentence = row["sentence_0"], row["sentence_1"]
        tokens = note.split(" ")
        assert 3 <= len(tokens) <= 14 and all(tokens), f"{path.name} row {number}: {note!r}"
        assert note == note.strip() and sentence == sentence.strip() and len(sentence) > len(note), number
    for column in ("sentence_0", "sentence_1"):
        texts = [row[column] for row in rows]
        assert len(set(texts)) == len(texts), f"{path.name}: a repeated {column}"


@pytest.mark.parametrize(("first", "second"), list(combinations(SETS, 2)), ids=lambda p: p.stem)
def test_no_text_is_in_two_sets(first, second):
    def texts(path: Path) -> set[str]:
        return {text for row in rows_of(path) for text in row.values()}

    assert not texts(first) & texts(second)
