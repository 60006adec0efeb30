"""The mine stage: one hard negative per training pair, mined with the base model, beside unchanged eval/test.

sentence-transformers' ``mine_hard_negatives`` ranks the train split's sentences for each note with the base
model (``model.name``) and keeps a sentence that is close to the note but scores a relative margin below the
note's own sentence: a candidate scoring as high as the positive is more likely an unlabelled match (a false
negative) than a hard one. The corpus is the train split's sentences only; eval and test texts never enter
it, so nothing about them leaks into training.

With ``mining.enabled=false`` the stage copies the prepared folder byte for byte and imports no torch, so a
pipeline with the stage in place trains exactly the seed card's run. Either way ``mining.json`` records what
was done, and its ``negative_column`` (or null) tells training which column to use
(:func:`apply_mined_negatives`). Torch is imported only when mining is enabled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from pairtune.config import ConfigError
from pairtune.data.pairs import SPLITS, Columns, PairDataError, check_prepared
from pairtune.files import write_atomic_dir

if TYPE_CHECKING:
    from pairtune.config import MiningConfig, ModelConfig, PairtuneConfig

log = logging.getLogger(__name__)

MINING_FILE = "mining.json"
COPIED_AS_IS = ("stats.json",)  # the prepare stage's record of the splits, still true of eval and test
LISTED_ROWS = 20  # mining.json lists at most this many rows without a negative (the count is always exact)
# (negative, positive score, negative score) per (note, sentence) pair, scored by the base model
Found = dict[tuple[str, str], tuple[str, float, float]]


def run_mine(settings: PairtuneConfig) -> dict[str, Any]:
    """Write ``paths.mined``: the prepared splits, the train split with mined negatives when enabled.

    Returns what ``mining.json`` holds. Disabled, it holds only ``enabled``, ``negative_column`` (null) and
    the row counts, so that changing a mining key while mining is off leaves the output (and training) as is.
    """
    source, target = check_prepared(settings.paths.prepared), Path(settings.paths.mined)
    if target.resolve() == source.resolve():
        raise ConfigError(f"config key 'paths.mined': must differ from paths.prepared ({source})")
    if not settings.mining.enabled:
        report = {"enabled": False, "negative_column": None, "rows": split_rows(source)}
        write_mined(target, source, report)
        log.info("mining disabled: copied %s to %s unchanged", source, target)
        return report
    columns = Columns.of(settings.data)
    train = read_train(source, columns)
    started = time.perf_counter()
    mined, report = mine_train_split(train, columns, settings)
    report["rows"] = {**split_rows(source), "train": len(mined)}
    write_mined(target, source, report, train=mined)
    missing = report["without_negative"]
    log.info(
        "mined %d negatives for %d training pairs in %.1f s (%d without one: %s); wrote %s",
        report["mined"],
        len(train),
        time.perf_counter() - started,
        missing["count"],
        missing["action"],
        target,
    )
    return report


def split_rows(folder: Path) -> dict[str, int]:
    """Rows per split, from the parquet footers (nothing else is read)."""
    import pyarrow.parquet as pq

    return {name: pq.ParquetFile(folder / f"{name}.parquet").metadata.num_rows for name in SPLITS}


def read_train(folder: Path, columns: Columns) -> pd.DataFrame:
    """The prepared train split, refused if it already holds a column beside the note and the sentence.

    Training takes exactly one negative column: a prepared one (``data.negative_column``) and a mined one
    cannot both be used, so the conflict is named here rather than silently resolved.
    """
    train = pd.read_parquet(folder / "train.parquet")
    extra = [c for c in train.columns if c not in (columns.anchor, columns.positive)]
    if extra:
        raise PairDataError(
            f"{folder / 'train.parquet'}: already has column '{extra[0]}' beside the pairs; training uses one "
            "negative column, so mine from pairs without one (data.negative_column=null) or set mining.enabled=false"
        )
    return train


def mine_train_split(
    train: pd.DataFrame, columns: Columns, settings: PairtuneConfig
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The train split with ``mining.negative_column`` filled, and the report of how it was filled."""
    mining = settings.mining
    model = load_base_model(settings.model)
    fingerprint = model_fingerprint(model)
    cache = Path(settings.paths.mining_cache) / fingerprint[:16]
    found = mine_negatives(train, columns, model, mining, cache_folder=cache)
    mined, missing = attach_negatives(train, columns, found, mining)
    if len(mined) < settings.train.batch_size:
        raise PairDataError(
            f"{settings.paths.prepared}: {len(mined)} training pairs left after dropping {len(missing)} without a "
            f"negative, fewer than one batch (train.batch_size={settings.train.batch_size}); use mining.on_missing=random"
        )
    report = {
        "enabled": True,
        "negative_column": mining.negative_column,
        "model": settings.model.name,
        "model_fingerprint": fingerprint,
        "corpus": f"train split, column '{columns.positive}' ({train[columns.positive].nunique()} texts)",
        "settings": {k: v for k, v in asdict(mining).items() if k not in ("enabled", "negative_column")},
        "mined": len(train) - len(missing),
        "without_negative": {
            "count": len(missing),
            "action": "dropped" if mining.on_missing == "drop" else "random train sentence",
            "rows": missing[:LISTED_ROWS],  # 0-based rows of the prepared train.parquet
        },
        "scores": score_summary(found),
    }
    return mined, report


def load_base_model(model: ModelConfig):
    """The base model on the best device there is (mining a large split on a GPU is minutes, not hours)."""
    from pairtune.model.modeling import load_model

    return load_model(
        model.name,
        max_seq_length=model.max_seq_length,
        trust_remote_code=model.trust_remote_code,
        device=None,
    )


def model_fingerprint(model) -> str:
    """sha256 of the model's modules and weights: the embedding cache is keyed by what encodes, not by a name.

    The library keys its cache files by the texts and the model's hub id, which a local folder or the bundled
    copy does not carry; keyed by name alone, a retrained folder would reuse its predecessor's embeddings.
    """
    import torch

    digest = hashlib.sha256(repr(model).encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def mine_negatives(
    train: pd.DataFrame, columns: Columns, model, mining: MiningConfig, *, cache_folder: Path
) -> Found:
    """The negative the library keeps for each pair, with the pair's scores; pairs it finds none for are absent.

    Embeddings are cached in ``cache_folder`` by the library (files named by a hash of the texts), so a rerun
    on the same split and model encodes nothing.
    """
    from datasets import Dataset
    from sentence_transformers.util import mine_hard_negatives

    pairs = Dataset.from_dict(
        {"anchor": train[columns.anchor].tolist(), "positive": train[columns.positive].tolist()}
    )
    with seeded_random(mining.seed):  # the random strategy samples with Python's global random
        triplets = mine_hard_negatives(
            pairs,
            model,
            anchor_column_name="anchor",
            positive_column_name="positive",
            range_min=mining.range_min,
            range_max=mining.range_max,
            relative_margin=mining.relative_margin,
            num_negatives=1,
            sampling_strategy=mining.sampling_strategy,
            batch_size=mining.batch_size,
            output_format="triplet",
            output_scores=True,
            verbose=False,
            cache_folder=str(cache_folder),
        )
    return {
        (anchor, positive): (negative, float(scores[0]), float(scores[1]))
        for anchor, positive, negative, scores in zip(
            triplets["anchor"], triplets["positive"], triplets["negative"], triplets["scores"], strict=True
        )
    }


@contextmanager
def seeded_random(seed: int) -> Iterator[None]:
    """Python's global ``random`` seeded for the block, then restored, so mining is repeatable and leaves no trace."""
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


def attach_negatives(
    train: pd.DataFrame, columns: Columns, found: Found, mining: MiningConfig
) -> tuple[pd.DataFrame, list[int]]:
    """The train split with ``mining.negative_column``, and the rows no mined negative was found for.

    Those rows get a seeded random train sentence (an easy negative, not margin-checked) or are dropped, as
    ``mining.on_missing`` says: a pair without a negative cannot share a batch column with pairs that have one.
    """
    keys = list(zip(train[columns.anchor], train[columns.positive], strict=True))
    missing = [row for row, key in enumerate(keys) if key not in found]
    negatives = [found[key][0] if key in found else None for key in keys]
    if mining.on_missing == "random":
        for row, text in random_negatives(train, columns, missing, seed=mining.seed).items():
            negatives[row] = text
    mined = train.assign(**{mining.negative_column: negatives})
    if mining.on_missing == "drop":
        mined = mined.drop(index=missing).reset_index(drop=True)
    return mined, missing


def random_negatives(train: pd.DataFrame, columns: Columns, rows: list[int], *, seed: int) -> dict[int, str]:
    """A seeded random train sentence for each of ``rows``, never one of that note's own sentences."""
    own = train.groupby(columns.anchor)[columns.positive].agg(set).to_dict()
    pool = list(dict.fromkeys(train[columns.positive]))
    rng, picks = random.Random(seed), {}
    for row in rows:
        note = train.at[row, columns.anchor]
        if len(own[note]) >= len(pool):
            raise PairDataError(
                f"train split: every sentence is a positive of note {note[:60]!r}; no negative to give it"
            )
        pick = rng.choice(pool)
        while pick in own[note]:
            pick = rng.choice(pool)
        picks[row] = pick
    return picks


def score_summary(found: Found) -> dict[str, float | None]:
    """Mean base-model cosine of the mined pairs' positives and negatives: how hard the negatives are."""
    if not found:
        return {"positive_mean": None, "negative_mean": None, "negative_max": None}
    positives = [scores[1] for scores in found.values()]
    negatives = [scores[2] for scores in found.values()]
    return {
        "positive_mean": round(sum(positives) / len(positives), 4),
        "negative_mean": round(sum(negatives) / len(negatives), 4),
        "negative_max": round(max(negatives), 4),
    }


def write_mined(
    target: Path, source: Path, report: dict[str, Any], *, train: pd.DataFrame | None = None
) -> None:
    """The whole output folder, swapped in at once: eval, test and stats.json copied byte for byte."""

    def fill(folder: Path) -> None:
        for name in SPLITS:
            if name == "train" and train is not None:
                train.to_parquet(folder / "train.parquet", index=False)
            else:
                shutil.copyfile(source / f"{name}.parquet", folder / f"{name}.parquet")
        for extra in COPIED_AS_IS:
            if (source / extra).is_file():
                shutil.copyfile(source / extra, folder / extra)
        text = json.dumps(report, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        (folder / MINING_FILE).write_text(text, encoding="utf-8")

    write_atomic_dir(target, fill)


def mined_negative_column(folder: str | Path) -> str | None:
    """The negative column ``mining.json`` in ``folder`` names; None when mining was off or there is no file."""
    path = Path(folder) / MINING_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8")).get("negative_column")


def apply_mined_negatives(settings: PairtuneConfig) -> PairtuneConfig:
    """Point ``data.negative_column`` at the mined column when ``paths.prepared`` is a mine-stage output.

    Training needs no other change: the column becomes one extra candidate per pair in MNRL. With
    ``mining.enabled=true`` and no mined column there, training would quietly run without the negatives the
    config asks for (a command-line run on ``data/prepared``), so that is refused, naming the fix.
    """
    column = mined_negative_column(settings.paths.prepared)
    if column is None and settings.mining.enabled:
        raise PairDataError(
            f"{settings.paths.prepared}: no mined negatives, but mining.enabled=true; run pipelines/mine.py with the "
            f"same overrides, then train with paths.prepared={settings.paths.mined}"
        )
    if column is not None:
        settings.data.negative_column = column
        log.info("training with mined negatives: column '%s' of %s", column, settings.paths.prepared)
    return settings
