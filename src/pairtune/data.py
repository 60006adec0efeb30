"""Reading, validating and splitting pair files.

Every problem with a pairs file raises :class:`PairDataError` whose message is one line naming the file,
the 1-based row and the column or problem, so the prepare stage can print it and exit non-zero.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from pairtune.files import write_atomic_dir

if TYPE_CHECKING:
    from pairtune.config import DataConfig

log = logging.getLogger(__name__)

SPLITS = ("train", "eval", "test")
FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


class PairDataError(ValueError):
    """A pairs file cannot be used; the message names the file, row and column."""


@dataclass(frozen=True)
class Columns:
    anchor: str = "sentence_0"
    positive: str = "sentence_1"
    negative: str | None = None

    @property
    def names(self) -> list[str]:
        return [c for c in (self.anchor, self.positive, self.negative) if c]

    @classmethod
    def of(cls, data: DataConfig) -> Columns:
        """The columns a ``data`` config names."""
        return cls(data.anchor_column, data.positive_column, data.negative_column)


def infer_format(path: Path, fmt: str | None) -> str:
    if fmt:
        return fmt
    try:
        return FORMATS[path.suffix.lower()]
    except KeyError:
        raise PairDataError(
            f"{path}: unknown format '{path.suffix}' (use .jsonl, .csv or .parquet, or set data.format)"
        ) from None


def _read_jsonl(path: Path) -> pd.DataFrame:
    rows = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise PairDataError(f"{path}: row {number}: invalid UTF-8 at byte {err.start}") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise PairDataError(f"{path}: row {number}: malformed JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise PairDataError(f"{path}: row {number}: expected a JSON object, got {type(record).__name__}")
            rows.append(record)
    return pd.DataFrame(rows)


def _read_csv(path: Path, delimiter: str) -> pd.DataFrame:
    try:
        return pd.read_csv(path, sep=delimiter, dtype=str, keep_default_na=False, encoding="utf-8")
    except UnicodeDecodeError as err:
        raise PairDataError(f"{path}: invalid UTF-8 at byte {err.start}") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise PairDataError(f"{path}: unreadable CSV ({str(err).strip().splitlines()[0]})") from None


def read_pairs(path: str | Path, columns: Columns, *, fmt: str | None = None, delimiter: str = ",") -> pd.DataFrame:
    """Read a pairs file into a frame with exactly ``columns.names``, validated and whitespace-stripped."""
    path = Path(path)
    if not path.is_file():
        raise PairDataError(f"{path}: file not found")
    kind = infer_format(path, fmt)
    if kind == "jsonl":
        frame = _read_jsonl(path)
    elif kind == "csv":
        frame = _read_csv(path, delimiter)
    else:
        try:
            frame = pd.read_parquet(path)
        except Exception as err:  # pyarrow raises several unrelated types
            raise PairDataError(f"{path}: unreadable parquet ({type(err).__name__})") from None
    return validate_pairs(frame, columns, source=str(path))


def validate_pairs(frame: pd.DataFrame, columns: Columns, *, source: str) -> pd.DataFrame:
    missing = [c for c in columns.names if c not in frame.columns]
    if missing:
        found = ", ".join(map(str, frame.columns)) or "none"
        hint = " (wrong CSV delimiter?)" if len(frame.columns) == 1 else ""
        raise PairDataError(f"{source}: missing column '{missing[0]}' (found: {found}){hint}")
    if frame.empty:
        raise PairDataError(f"{source}: no rows")
    clean = frame[columns.names].copy()
    for column in columns.names:
        for index, value in enumerate(clean[column].tolist(), start=1):
            if not isinstance(value, str):
                problem = "null" if value is None or (isinstance(value, float) and math.isnan(value)) else "non-text"
                raise PairDataError(f"{source}: row {index}: column '{column}' is {problem}")
            if not value.strip():
                raise PairDataError(f"{source}: row {index}: column '{column}' is empty")
        clean[column] = clean[column].str.strip()
    return clean.reset_index(drop=True)


def drop_duplicate_pairs(frame: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    deduped = frame.drop_duplicates(ignore_index=True)
    return deduped, len(frame) - len(deduped)


def _resolve_size(size: int | float, total: int) -> int:
    return int(size) if isinstance(size, int) else int(round(size * total))


def _text_groups(frame: pd.DataFrame, columns: Columns) -> list[list[int]]:
    """Rows linked by a shared anchor or positive text; a group never straddles two splits."""
    parent = list(range(len(frame)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for column in (columns.anchor, columns.positive):
        first_row: dict[str, int] = {}
        for row, text in enumerate(frame[column].tolist()):
            if text in first_row:
                parent[find(row)] = find(first_row[text])
            else:
                first_row[text] = row
    groups: dict[int, list[int]] = {}
    for row in range(len(frame)):
        groups.setdefault(find(row), []).append(row)
    return list(groups.values())


def split_pairs(
    frame: pd.DataFrame, columns: Columns, *, train_size: int | float, eval_size: int | float, seed: int, source: str
) -> dict[str, pd.DataFrame]:
    """Split by seed into train/eval/test so that no anchor or positive text is in two splits.

    Sizes are exact when every text occurs once (the bundled data); linked rows move together, so a split
    may then fall short by the size of the group that did not fit.
    """
    total = len(frame)
    want = {"train": _resolve_size(train_size, total), "eval": _resolve_size(eval_size, total)}
    want["test"] = total - want["train"] - want["eval"]
    for name, count in want.items():
        if count <= 0:
            raise PairDataError(
                f"{source}: split '{name}' would be empty ({total} pairs, train_size={train_size}, eval_size={eval_size})"
            )
    groups = _text_groups(frame, columns)
    random.Random(seed).shuffle(groups)
    assigned: dict[str, list[int]] = {name: [] for name in SPLITS}
    for group in groups:
        for name in ("train", "eval"):
            if len(assigned[name]) + len(group) <= want[name]:
                assigned[name].extend(group)
                break
        else:
            assigned["test"].extend(group)
    for name in SPLITS:
        if not assigned[name]:
            raise PairDataError(f"{source}: split '{name}' is empty after keeping linked rows together")
    return {name: frame.iloc[sorted(rows)].reset_index(drop=True) for name, rows in assigned.items()}


def check_disjoint(splits: dict[str, pd.DataFrame], columns: Columns) -> None:
    """Raise if any anchor or positive text appears in two splits (the splitter makes this impossible)."""
    for column in (columns.anchor, columns.positive):
        seen: dict[str, str] = {}
        for name, frame in splits.items():
            for text in set(frame[column]):
                if text in seen and seen[text] != name:
                    raise PairDataError(f"column '{column}': text in both '{seen[text]}' and '{name}': {text[:60]!r}")
                seen[text] = name


def token_stats(frame: pd.DataFrame, columns: Columns, count_tokens: Callable[[Sequence[str]], list[int]]) -> dict:
    """min/mean/max tokens per column, as in the dataset table of the seed card."""
    stats = {}
    for column in columns.names:
        counts = count_tokens(frame[column].tolist())
        stats[column] = {
            "min": int(min(counts)),
            "mean": round(sum(counts) / len(counts), 2),
            "max": int(max(counts)),
        }
    return stats


def write_prepared(target: str | Path, splits: dict[str, pd.DataFrame], stats: dict) -> None:
    def fill(folder: Path) -> None:
        for name, frame in splits.items():
            frame.to_parquet(folder / f"{name}.parquet", index=False)
        (folder / "stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    write_atomic_dir(target, fill)


def check_prepared(folder: str | Path) -> Path:
    """The prepared folder, or a one-line error naming the first missing split."""
    folder = Path(folder)
    missing = [name for name in SPLITS if not (folder / f"{name}.parquet").is_file()]
    if missing:
        raise PairDataError(f"{folder}: missing {missing[0]}.parquet (run the prepare stage first)")
    return folder


def load_prepared(folder: str | Path) -> dict[str, pd.DataFrame]:
    folder = check_prepared(folder)
    return {name: pd.read_parquet(folder / f"{name}.parquet") for name in SPLITS}
