"""The prepare stage: read, validate, de-duplicate and split the pairs (file or dataset); count tokens. Torch-free."""

from __future__ import annotations

import logging

import pandas as pd

from pairtune.config import PairtuneConfig
from pairtune.data.pairs import (
    Columns,
    PairDataError,
    PairSource,
    check_disjoint,
    drop_duplicate_pairs,
    read_source,
    split_pairs,
    token_stats,
    write_prepared,
)
from pairtune.data.tokens import count_tokens
from pairtune.model.model_source import load_fast_tokenizer

log = logging.getLogger(__name__)


def run_prepare(settings: PairtuneConfig) -> dict:
    """Read, validate, de-duplicate and split the pairs; write parquet splits and stats.json.

    ``stats.json`` keeps the source as read under ``lineage`` (kind, id, revision, subset, split), so the
    tracker can log the data's origin as the matching MLflow dataset type.
    """
    data, columns = settings.data, Columns.of(settings.data)
    if data.sources is not None:
        return prepare_several(settings, columns)
    frame, source = read_source(PairSource.of(data), columns, fmt=data.format, delimiter=data.csv_delimiter)
    frame, dropped = drop_duplicate_pairs(frame)
    log.info("read %d pairs from %s, dropped %d exact duplicate pairs", len(frame) + dropped, source.label, dropped)
    splits = split_pairs(
        frame, columns, train_size=data.train_size, eval_size=data.eval_size, seed=data.split_seed, source=data.source
    )
    check_disjoint(splits, columns)
    if len(splits["train"]) < settings.train.batch_size:
        raise PairDataError(
            f"{data.source}: {len(splits['train'])} training pairs, fewer than one batch (train.batch_size="
            f"{settings.train.batch_size})"
        )
    stats = {
        "source": data.source,
        "lineage": source.as_dict(),
        "rows": {name: len(split) for name, split in splits.items()},
        "dropped_duplicates": dropped,
        **token_report(frame, splits, columns, settings),
    }
    write_prepared(settings.paths.prepared, splits, stats)
    log.info("wrote %s: %s", settings.paths.prepared, stats["rows"])
    return stats


def prepare_several(settings: PairtuneConfig, columns: Columns) -> dict:
    """``data.sources``: each source split on its own, stacked with a ``source`` column; rows per source and split."""
    from pairtune.data.sources import prepare_sources

    splits, stats = prepare_sources(settings.data, columns)
    for name, part in stats["sources"].items():
        if part["rows"]["train"] < 1 or part["rows"]["eval"] < 1:
            raise PairDataError(f"data.sources '{name}': {part['rows']} rows per split; every source needs train and "
                                "eval rows")
    if len(splits["train"]) < settings.train.batch_size:
        raise PairDataError(f"data.sources: {len(splits['train'])} training pairs, fewer than one batch "
                            f"(train.batch_size={settings.train.batch_size})")
    frame = pd.concat(list(splits.values()), ignore_index=True)
    stats = {"rows": {name: len(split) for name, split in splits.items()}, **stats,
             **token_report(frame, splits, columns, settings)}
    write_prepared(settings.paths.prepared, splits, stats)
    log.info("wrote %s: %s", settings.paths.prepared, stats["rows"])
    return stats


def token_report(frame: pd.DataFrame, splits: dict[str, pd.DataFrame], columns: Columns, settings) -> dict:
    """Tokens per split and column, and how many texts ``model.max_seq_length`` will truncate."""
    tokenizer = load_fast_tokenizer(settings.model.name)
    texts = [text for column in columns.prompted(frame) for text in column]  # as the model reads them
    tokens_of = dict(zip(texts, count_tokens(tokenizer, texts), strict=True))  # each text tokenised once
    limit = settings.model.max_seq_length
    too_long = sum(int(tokens_of[text] > limit) for text in texts)
    if too_long:
        log.warning("%d texts are longer than model.max_seq_length=%d tokens and will be truncated", too_long, limit)
    return {
        "texts_over_max_seq_length": too_long,
        "tokens": {
            name: token_stats(split, columns, lambda batch: [tokens_of[t] for t in batch])
            for name, split in splits.items()
        },
    }
