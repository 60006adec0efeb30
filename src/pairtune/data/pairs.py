"""Reading, validating and splitting pairs: from a file, a ``save_to_disk`` folder or a Hugging Face dataset.

Every problem with the pairs raises :class:`PairDataError` whose message is one line naming the source (file,
folder or dataset id), the 1-based row and the column or problem, so the prepare stage can print it and exit
non-zero. ``datasets`` is imported only when a datasets source is read: a file source never pays for it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from pairtune.core import HUB_ID, PairDataError
from pairtune.files import write_atomic_dir

if TYPE_CHECKING:
    from pairtune.config import DataConfig

log = logging.getLogger(__name__)

SPLITS = ("train", "eval", "test")
FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
SAVED_DATASET_FILES = (("dataset_info.json", "state.json"), ("dataset_dict.json",))  # Dataset, DatasetDict


@dataclass(frozen=True)
class Columns:
    anchor: str = "sentence_0"
    positive: str = "sentence_1"
    negative: str | None = None
    anchor_prompt: str | None = None  # the model's "query" prompt, put before every anchor
    positive_prompt: str | None = None  # its "document" prompt, before every positive and negative
    # several sources with prompts of their own: source -> (anchor prompt, positive prompt), applied per row
    source_prompts: tuple[tuple[str, str, str], ...] | None = None

    @property
    def names(self) -> list[str]:
        return [c for c in (self.anchor, self.positive, self.negative) if c]

    @property
    def prompts(self) -> list[str]:
        """The text put before each column's texts, in :attr:`names` order ("" for none)."""
        return [self.anchor_prompt or ""] + [self.positive_prompt or ""] * (len(self.names) - 1)

    @property
    def model_prompts(self) -> dict[str, str]:
        """What the saved model's ``prompts`` gain: ``{"query": ..., "document": ...}``, the ones that are set,
        and with per-source prompts ``<source>_query`` / ``<source>_document``."""
        named = {"query": self.anchor_prompt, "document": self.positive_prompt}
        for source, anchor, positive in self.source_prompts or ():
            named |= {f"{source}_query": anchor, f"{source}_document": positive}
        return {name: text for name, text in named.items() if text}

    def prompts_of(self, source: str) -> tuple[str, str]:
        """One source's (anchor, positive) prompts."""
        return next((a, p) for name, a, p in self.source_prompts or () if name == source)

    def prompted(self, frame) -> list[list[str]]:
        """Each column's texts with its prompt in front (per row by source, when sources have their own)."""
        if self.source_prompts and "source" in frame:
            by_source = {name: (a, p) for name, a, p in self.source_prompts}
            return [[by_source[source][min(index, 1)] + text for source, text in zip(frame["source"], frame[name],
                                                                                     strict=True)]
                    for index, name in enumerate(self.names)]
        return [[prompt + text for text in frame[name].tolist()] for name, prompt in zip(self.names, self.prompts,
                                                                                        strict=True)]

    def without_prompts(self) -> Columns:
        return Columns(self.anchor, self.positive, self.negative)

    @classmethod
    def of(cls, data: DataConfig) -> Columns:
        """The columns a ``data`` config names, with its prompts (per source when any source has its own)."""
        own = [s for s in data.sources or [] if s.anchor_prompt is not None or s.positive_prompt is not None]
        by_source = None
        if own:
            by_source = tuple((s.name, s.anchor_prompt if s.anchor_prompt is not None else data.anchor_prompt or "",
                               s.positive_prompt if s.positive_prompt is not None else data.positive_prompt or "")
                              for s in data.sources)
        return cls(data.anchor_column, data.positive_column, data.negative_column, data.anchor_prompt,
                   data.positive_prompt, by_source)


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
    return validate_pairs(frame, columns, source=str(path), csv=kind == "csv")


def validate_pairs(frame: pd.DataFrame, columns: Columns, *, source: str, csv: bool = False) -> pd.DataFrame:
    """Exactly ``columns.names``, every value a non-empty text, whitespace-stripped; else a one-line error."""
    missing = [c for c in columns.names if c not in frame.columns]
    if missing:
        found = ", ".join(map(str, frame.columns)) or "none"
        hint = " (wrong CSV delimiter?)" if csv and len(frame.columns) == 1 else ""
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


# -- sources: a file, a save_to_disk folder or a dataset repository --------------------------------------


@dataclass(frozen=True)
class PairSource:
    """Where the pairs come from; the prepare stage records it in ``stats.json`` as the data's lineage.

    ``kind`` is ``file`` (jsonl, csv or parquet), ``save_to_disk`` (a folder written by ``save_to_disk``) or
    ``hub`` (a dataset repository read by ``datasets.load_dataset``: a hub id, or a local folder laid out as
    one, whose ``id`` is then its path). ``split`` is None for a file and a saved single Dataset, used whole.
    """

    kind: str
    id: str
    revision: str | None = None
    subset: str | None = None
    split: str | None = None

    @classmethod
    def of(cls, data: DataConfig) -> PairSource:
        """What ``data.source`` names: an existing file or folder first, then a file by its suffix, then a hub id."""
        path = Path(data.source)
        if path.is_dir() and is_saved_dataset(path):
            return cls("save_to_disk", data.source, split=data.split)
        if path.is_file() or (not path.is_dir() and (data.format or path.suffix.lower() in FORMATS)):
            return cls("file", data.source)  # a missing file is reported by read_pairs
        if path.is_dir() or HUB_ID.fullmatch(data.source):
            return cls("hub", data.source, data.revision, data.subset, data.split)
        raise PairDataError(f"{data.source}: no such file or folder, and not a dataset id")

    @property
    def label(self) -> str:
        """How errors name the source: the file, folder or id, and the split when there is one."""
        return self.id if self.split is None else f"{self.id} split {self.split}"

    def as_dict(self) -> dict[str, str | None]:
        return asdict(self)


def is_saved_dataset(folder: Path) -> bool:
    """True for a folder ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk`` wrote."""
    return any(all((folder / name).is_file() for name in names) for names in SAVED_DATASET_FILES)


def read_source(
    source: PairSource, columns: Columns, *, fmt: str | None = None, delimiter: str = ","
) -> tuple[pd.DataFrame, PairSource]:
    """The validated pairs of any source, and the source as read (a saved single Dataset has no split)."""
    if source.kind == "file":
        return read_pairs(source.id, columns, fmt=fmt, delimiter=delimiter), source
    if source.kind == "save_to_disk":
        dataset, source = load_saved(source)
    else:
        dataset = load_repository(source)
    return validate_pairs(dataset_frame(dataset, columns), columns, source=source.label), source


def load_saved(source: PairSource) -> tuple[Any, PairSource]:
    """A ``save_to_disk`` folder: a DatasetDict gives its ``data.split``, a single Dataset is used whole."""
    import datasets  # only a datasets source pays for the import

    saved = datasets.load_from_disk(source.id)
    if isinstance(saved, datasets.DatasetDict):
        if source.split not in saved:
            found = ", ".join(saved) or "none"
            raise PairDataError(f"{source.id}: no split '{source.split}' (found: {found}); set data.split")
        return saved[source.split], source
    if source.split not in (None, "train"):  # "train" is the default: a single Dataset is read whole
        raise PairDataError(f"{source.id}: one saved Dataset without splits, so data.split={source.split} cannot apply")
    return saved, replace(source, split=None)


def load_repository(source: PairSource) -> Any:
    """One split of a hub dataset or a local dataset repository, through the ``datasets`` cache."""
    import datasets

    try:
        return datasets.load_dataset(source.id, name=source.subset, revision=source.revision, split=source.split)
    except ConnectionError:  # offline or unreachable, and not cached
        raise PairDataError(unreachable_message(source.id, offline=datasets.config.HF_HUB_OFFLINE)) from None
    except datasets.exceptions.DataFilesNotFoundError:
        if Path(source.id).is_dir():
            raise PairDataError(
                f"{source.id}: neither a save_to_disk folder (no dataset_info.json or dataset_dict.json) nor a "
                "dataset repository (no data files datasets can read)"
            ) from None
        raise PairDataError(f"{source.id}: the dataset has no data files datasets can read") from None
    except datasets.exceptions.DatasetNotFoundError:
        raise PairDataError(
            f"{source.id}: no such file or folder, and no dataset with this id on the Hugging Face Hub "
            "(a private one needs `hf auth login`)"
        ) from None
    except (ValueError, datasets.exceptions.DatasetsError) as err:  # e.g. an unknown split or subset, named
        hint = f"data.subset={source.subset}, data.split={source.split}"
        raise PairDataError(f"{source.id}: {str(err).strip().splitlines()[0]} ({hint})") from None


def unreachable_message(dataset_id: str, *, offline: bool) -> str:
    """The one line for a dataset that is not cached and cannot be downloaded now, naming why."""
    if not offline:
        return f"{dataset_id}: not in the local datasets cache and the Hugging Face Hub cannot be reached"
    flags = [
        f"{name}={os.environ[name]}"
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
        if os.environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE")
    ]
    return (
        f"{dataset_id}: not in the local datasets cache and the hub is offline ({flags[0] if flags else 'offline mode'}); "
        "download it once online or point data.source at a file"
    )


def dataset_frame(dataset: Any, columns: Columns) -> pd.DataFrame:
    """The named columns of a Dataset as a frame, leaving the others unread.

    With a column missing, an empty frame of the columns there are: :func:`validate_pairs` then names the
    missing one exactly as it does for a file.
    """
    if any(name not in dataset.column_names for name in columns.names):
        return pd.DataFrame(columns=dataset.column_names)
    return dataset.select_columns(columns.names).to_pandas()


def drop_duplicate_pairs(frame: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    deduped = frame.drop_duplicates(ignore_index=True)
    return deduped, len(frame) - len(deduped)


def _resolve_size(size: int | float, total: int) -> int:
    return int(size) if isinstance(size, int) else int(round(size * total))


def _text_groups(frame: pd.DataFrame, columns: Columns) -> list[list[int]]:
    """Rows linked by a shared text, in whichever columns (one row's sentence may be another's note).

    One union over every column, as the no-duplicates sampler treats equal texts; a group never straddles
    two splits.
    """
    parent = list(range(len(frame)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_row: dict[str, int] = {}
    for column in columns.names:
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
    """Split by seed into train/eval/test so that no text, in whichever column, is in two splits.

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
    """Raise if any text, in whichever column, appears in two splits (the splitter makes this impossible)."""
    seen: dict[str, tuple[str, str]] = {}
    for name, frame in splits.items():
        for column in columns.names:
            for text in set(frame[column]):
                home, where = seen.setdefault(text, (name, column))
                if home != name:
                    raise PairDataError(
                        f"text in both '{home}' (column '{where}') and '{name}' (column '{column}'): {text[:60]!r}"
                    )


def token_stats(frame: pd.DataFrame, columns: Columns, count_tokens: Callable[[Sequence[str]], list[int]]) -> dict:
    """min/mean/max tokens per column, as in the dataset table of the seed card (the column's prompt included)."""
    stats = {}
    for column, texts in zip(columns.names, columns.prompted(frame), strict=True):
        counts = count_tokens(texts)
        stats[column] = {
            "min": int(min(counts)),
            "mean": round(sum(counts) / len(counts), 2),
            "max": int(max(counts)),
        }
    return stats


def pairs_digest(frame: pd.DataFrame, columns: Columns) -> str:
    """sha256 of a split's pairs as text, whatever file format holds them: equal pairs, equal digest."""
    digest = hashlib.sha256()
    for row in frame[columns.names].itertuples(index=False):
        digest.update(json.dumps(list(row), ensure_ascii=False).encode("utf-8") + b"\n")
    return digest.hexdigest()


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
