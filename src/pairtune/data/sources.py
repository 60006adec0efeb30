"""Several pair sources in one run (``data.sources``): read, split and checked one by one. Torch-free.

Each source is read with its own columns, renamed to the run's (``data.anchor_column`` ...), de-duplicated
and split on its own (``train_size`` / ``eval_size`` of the source), then the splits are stacked with a
``source`` column. No text may sit in two splits, within a source or across sources: a sentence in one
source's train split and another's test split would leak. The training sampler draws each global batch
from one source (:class:`pairtune.data.sampling.SourceBatchSampler`); evaluation scores each source apart.
"""

from __future__ import annotations

import logging

import pandas as pd

from pairtune.config import DataConfig, SourceConfig
from pairtune.data.pairs import (
    SPLITS,
    Columns,
    PairDataError,
    PairSource,
    check_disjoint,
    drop_duplicate_pairs,
    read_source,
    split_pairs,
)

log = logging.getLogger(__name__)

SOURCE_COLUMN = "source"  # the prepared splits' column naming each row's source (several sources only)


def own_columns(source: SourceConfig, data: DataConfig) -> Columns:
    """The source's column names, each defaulting to the run's."""
    return Columns(source.anchor_column or data.anchor_column, source.positive_column or data.positive_column,
                   source.negative_column if source.negative_column is not None else data.negative_column)


def read_one(source: SourceConfig, data: DataConfig, columns: Columns) -> tuple[pd.DataFrame, dict, int]:
    """One source's pairs under the run's column names, its lineage, and the exact duplicates dropped."""
    own = own_columns(source, data)
    if len(own.names) != len(columns.names):
        raise PairDataError(f"data.sources '{source.name}': columns {own.names}, but the run trains on "
                            f"{len(columns.names)} ({columns.names})")
    frame, lineage = read_source(PairSource.of(source), own, fmt=source.format, delimiter=data.csv_delimiter)
    frame = frame.rename(columns=dict(zip(own.names, columns.names, strict=True)))[columns.names]
    frame, dropped = drop_duplicate_pairs(frame)
    return frame, lineage.as_dict(), dropped


def check_disjoint_across(parts: dict[str, dict[str, pd.DataFrame]], columns: Columns) -> None:
    """Raise if any text is in two splits of any sources: ``parts`` is source -> split -> frame."""
    seen: dict[str, tuple[str, str]] = {}
    for name, splits in parts.items():
        for split, frame in splits.items():
            for text in {text for column in columns.names for text in frame[column]}:
                home = seen.setdefault(text, (name, split))
                if home[1] != split:
                    raise PairDataError(
                        f"data.sources: text in '{home[1]}' of '{home[0]}' and in '{split}' of '{name}': {text[:60]!r}"
                    )


def prepare_sources(data: DataConfig, columns: Columns) -> tuple[dict[str, pd.DataFrame], dict]:
    """Every source read and split on its own, stacked with a ``source`` column; and what stats.json records."""
    parts: dict[str, dict[str, pd.DataFrame]] = {}
    lineage, dropped = {}, {}
    for source in data.sources or []:
        frame, lineage[source.name], dropped[source.name] = read_one(source, data, columns)
        splits = split_pairs(frame, columns, train_size=source.train_size, eval_size=source.eval_size,
                             seed=data.split_seed, source=source.source)
        check_disjoint(splits, columns)
        parts[source.name] = splits
        log.info("source %s: %d pairs from %s (%d exact duplicates dropped), %s", source.name, len(frame),
                 source.source, dropped[source.name], {split: len(f) for split, f in splits.items()})
    check_disjoint_across(parts, columns)
    stacked = {
        split: pd.concat([frames[split].assign(**{SOURCE_COLUMN: name}) for name, frames in parts.items()],
                         ignore_index=True)
        for split in SPLITS
    }
    stats = {
        "sources": {
            name: {"source": source.source, "weight": source.weight, "lineage": lineage[name],
                   "dropped_duplicates": dropped[name], "rows": {split: len(f) for split, f in parts[name].items()}}
            for name, source in zip(parts, data.sources or [], strict=True)
        },
        "dropped_duplicates": sum(dropped.values()),
    }
    return stacked, stats
