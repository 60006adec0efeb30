"""The mine stage: a torch-free pass-through when off; when on, one margin-checked negative per training pair."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from pairtune.config import ConfigError, MiningConfig, load_settings
from pairtune.data.mining import (
    MINING_FILE,
    apply_mined_negatives,
    attach_negatives,
    model_fingerprint,
    run_mine,
)
from pairtune.data.pairs import SPLITS, Columns, PairDataError

from .conftest import compose_config
from .test_house import HEAVY, imported_modules, run_importtime

COLUMNS = Columns()
MARGIN = 0.05


def same_bytes(left: Path, right: Path) -> bool:
    return left.read_bytes() == right.read_bytes()


def test_disabled_mining_copies_the_splits_byte_for_byte_and_imports_nothing_heavy(
    prepared_bundled, tmp_path
):
    # Given mining off (the default), When the stage script runs
    done = run_importtime(
        "pipelines/mine.py",
        f"paths.prepared={prepared_bundled}",
        f"paths.mined={tmp_path}/mined",
        f"hydra.run.dir={tmp_path}/h",
        tmp_path=tmp_path,
    )
    # Then every split and stats.json are the prepared bytes, mining.json names no column, and no torch was loaded
    assert done.returncode == 0, done.stderr[-3000:]
    for name in [f"{split}.parquet" for split in SPLITS] + ["stats.json"]:
        assert same_bytes(prepared_bundled / name, tmp_path / "mined" / name), name
    record = json.loads((tmp_path / "mined" / MINING_FILE).read_text())
    assert record == {
        "enabled": False,
        "negative_column": None,
        "rows": {"train": 263, "eval": 45, "test": 62},
    }
    assert not imported_modules(done.stderr) & set(HEAVY), sorted(imported_modules(done.stderr) & set(HEAVY))


def test_the_mined_folder_must_not_be_the_prepared_one(prepared_bundled):
    settings = load_settings(
        compose_config([f"paths.prepared={prepared_bundled}", f"paths.mined={prepared_bundled}"])
    )
    with pytest.raises(ConfigError, match="'paths.mined': must differ from paths.prepared"):
        run_mine(settings)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("mining.relative_margin=1.5", "config key 'mining.relative_margin': must be in [0, 1)"),
        ("mining.range_max=0", "config key 'mining.range_max': must be > mining.range_min (0)"),
        ("mining.on_missing=keep", "config key 'mining.on_missing': random|drop"),
        ("mining.negative_column=sentence_1", "config key 'mining.negative_column': must differ from"),
    ],
)
def test_bad_mining_keys_are_named(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_settings(compose_config([override]))


def test_mining_is_off_by_default_so_the_seed_run_is_unchanged():
    settings = load_settings(compose_config())
    assert settings.mining.enabled is False
    assert settings.paths.mined == "data/mined"


def pairs(*rows: tuple[str, str]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=[COLUMNS.anchor, COLUMNS.positive])


FOUR = pairs(("n1", "s1"), ("n1", "s2"), ("n2", "s3"), ("n3", "s4"))


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_rows_without_a_mined_negative_get_a_random_train_sentence_not_their_own(seed):
    # Given negatives found for two of four rows; note n1 has two sentences
    found = {("n2", "s3"): ("s1", 0.5, 0.3), ("n3", "s4"): ("s3", 0.6, 0.4)}
    # When the rest is filled at random
    mined, missing = attach_negatives(FOUR, COLUMNS, found, MiningConfig(on_missing="random", seed=seed))
    # Then every row keeps its place and has a train sentence that is not one of its note's own
    assert missing == [0, 1]
    assert mined[COLUMNS.positive].tolist() == ["s1", "s2", "s3", "s4"]
    assert mined["negative"].tolist()[2:] == ["s1", "s3"]
    assert set(mined["negative"][:2]) <= {"s3", "s4"}
    again, _ = attach_negatives(FOUR, COLUMNS, found, MiningConfig(on_missing="random", seed=seed))
    assert again.equals(mined)  # seeded: the same picks every time


def test_rows_without_a_mined_negative_can_be_dropped():
    found = {("n2", "s3"): ("s1", 0.5, 0.3)}
    mined, missing = attach_negatives(
        FOUR, COLUMNS, found, MiningConfig(on_missing="drop", negative_column="hard")
    )
    assert missing == [0, 1, 3]
    assert mined.to_dict("records") == [{COLUMNS.anchor: "n2", COLUMNS.positive: "s3", "hard": "s1"}]


def test_a_prepared_negative_column_and_a_mined_one_cannot_both_be_used(prepared_bundled, tmp_path):
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    for name in SPLITS:
        (prepared / f"{name}.parquet").write_bytes((prepared_bundled / f"{name}.parquet").read_bytes())
    train = pd.read_parquet(prepared / "train.parquet")
    train.assign(other=train[COLUMNS.positive]).to_parquet(prepared / "train.parquet", index=False)
    settings = load_settings(
        compose_config([f"paths.prepared={prepared}", f"paths.mined={tmp_path}/mined", "mining.enabled=true"])
    )
    with pytest.raises(PairDataError, match="already has column 'other' beside the pairs"):
        run_mine(settings)
    assert not (tmp_path / "mined").exists()


def test_training_takes_the_negative_column_mining_json_names(tmp_path):
    settings = load_settings(compose_config([f"paths.prepared={tmp_path}"]))
    assert apply_mined_negatives(settings).data.negative_column is None  # no mining.json: nothing changes
    (tmp_path / MINING_FILE).write_text(json.dumps({"enabled": False, "negative_column": None}))
    assert apply_mined_negatives(settings).data.negative_column is None
    (tmp_path / MINING_FILE).write_text(json.dumps({"enabled": True, "negative_column": "negative"}))
    assert apply_mined_negatives(settings).data.negative_column == "negative"


def test_training_with_mining_on_refuses_splits_without_mined_negatives(tmp_path):
    settings = load_settings(compose_config([f"paths.prepared={tmp_path}", "mining.enabled=true"]))
    with pytest.raises(
        PairDataError, match="no mined negatives, but mining.enabled=true; run pipelines/mine.py"
    ):
        apply_mined_negatives(settings)


# -- a real mining run on the bundled data, with the base model -------------------------------------------


@pytest.fixture(scope="module")
def mined_bundled(prepared_bundled, tmp_path_factory):
    """The bundled train split mined once, looking deep enough (range_max) for every note to find a negative."""
    root = tmp_path_factory.mktemp("mined")
    settings = load_settings(
        compose_config(
            [
                f"paths.prepared={prepared_bundled}",
                f"paths.mined={root}/mined",
                f"paths.mining_cache={root}/cache",
                "mining.enabled=true",
                f"mining.relative_margin={MARGIN}",
                "mining.range_max=300",
            ]
        )
    )
    report = run_mine(settings)
    return settings, report, root / "mined"


@pytest.mark.slow
def test_every_training_pair_gets_a_train_sentence_that_is_none_of_its_notes_positives(
    mined_bundled, prepared_bundled
):
    _, report, folder = mined_bundled
    prepared, mined = (
        pd.read_parquet(prepared_bundled / "train.parquet"),
        pd.read_parquet(folder / "train.parquet"),
    )
    assert mined[[COLUMNS.anchor, COLUMNS.positive]].equals(prepared)  # same rows, same order
    own = mined.groupby(COLUMNS.anchor)[COLUMNS.positive].agg(set)
    for note, negative in zip(mined[COLUMNS.anchor], mined["negative"], strict=True):
        assert negative not in own[note]
    assert set(mined["negative"]) <= set(prepared[COLUMNS.positive])  # never an eval or test text
    assert report["mined"] == 263 and report["without_negative"]["count"] == 0
    assert report["negative_column"] == "negative" and report["settings"]["relative_margin"] == MARGIN
    assert json.loads((folder / MINING_FILE).read_text()) == report


@pytest.mark.slow
def test_each_negative_scores_a_relative_margin_below_its_positive(mined_bundled, base_model):
    mined = pd.read_parquet(mined_bundled[2] / "train.parquet")
    anchors, positives, negatives = (
        base_model.encode(mined[column].tolist(), normalize_embeddings=True)
        for column in (COLUMNS.anchor, COLUMNS.positive, "negative")
    )
    positive_scores = (anchors * positives).sum(axis=1)
    negative_scores = (anchors * negatives).sum(axis=1)
    # (1 - margin) x pos for a positive score; a note the base model scores below zero against its own sentence
    # (a few shorthand notes) needs its negative further below still: pos - |pos| x margin
    assert (positive_scores <= 0).any()
    threshold = positive_scores - abs(positive_scores) * MARGIN
    assert (negative_scores <= threshold + 1e-4).all()
    assert negative_scores.mean() > 0.1  # hard: closer than a random train sentence, not just any text


@pytest.mark.slow
def test_eval_and_test_are_copied_unchanged(mined_bundled, prepared_bundled):
    for name in ("eval.parquet", "test.parquet", "stats.json"):
        assert same_bytes(prepared_bundled / name, mined_bundled[2] / name), name


@pytest.mark.slow
def test_a_second_run_reuses_the_cached_embeddings(mined_bundled, monkeypatch):
    # Given the first run's cache, When the stage runs again with encoding made impossible
    from sentence_transformers import SentenceTransformer

    settings, report, folder = mined_bundled
    first = pd.read_parquet(folder / "train.parquet")

    def no_encoding(*args, **kwargs):
        raise AssertionError("encoded again despite the cache")

    monkeypatch.setattr(SentenceTransformer, "encode", no_encoding)
    # Then it succeeds from the two cached files and writes the same negatives
    assert run_mine(settings) == report
    assert pd.read_parquet(folder / "train.parquet").equals(first)
    assert len(list(Path(settings.paths.mining_cache).rglob("*.npy"))) == 2


@pytest.mark.slow
def test_the_cache_is_keyed_by_the_weights_not_the_name(base_model):
    import torch

    before = model_fingerprint(base_model)
    with torch.no_grad():
        next(base_model.parameters()).add_(1e-3)
    assert model_fingerprint(base_model) != before


def texts_twice(frame: pd.DataFrame, rows: list[int], columns: list[str]) -> int:
    """How many texts of one batch occur more than once in it, over every row and column."""
    texts = [text for column in columns for text in frame[column].iloc[rows]]
    return len(texts) - len(set(texts))


@pytest.mark.slow
def test_a_run_with_mined_negatives_never_puts_a_text_in_a_batch_twice(mined_bundled, tmp_path, monkeypatch, caplog):
    from pairtune.data.batching import TokenizedColumns
    from pairtune.train.training import train

    # Given the mined folder and the default sampler (train.batch_sampler=random), as the README's
    # command-line recipe trains it
    _, _, folder = mined_bundled
    settings = load_settings(compose_config([
        f"paths.prepared={folder}", f"paths.model={tmp_path}/model", f"paths.checkpoints={tmp_path}/ckpt",
        "mining.enabled=true", "train.epochs=3", "train.eval_on_start=false", "tracking.enabled=false",
    ]))
    apply_mined_negatives(settings)
    batches: list[list[int]] = []
    real = TokenizedColumns.batch
    monkeypatch.setattr(TokenizedColumns, "batch", lambda self, rows: batches.append(list(rows)) or real(self, rows))
    # When it trains
    with caplog.at_level("WARNING", logger="pairtune.config"):
        train(settings)
    # Then no batch holds a text twice in any column, and the switch was said once and recorded
    frame = pd.read_parquet(folder / "train.parquet")
    columns = ["sentence_0", "sentence_1", "negative"]
    assert len(batches) >= 24 and all(len(b) > 1 for b in batches)  # 3 epochs of about 9 batches
    assert [texts_twice(frame, rows, columns) for rows in batches] == [0] * len(batches)
    assert settings.train.batch_sampler == "no_duplicates"
    assert sum("train.batch_sampler: no_duplicates instead of random" in r.message for r in caplog.records) == 1
    card = (tmp_path / "model/README.md").read_text()
    assert "- `batch_sampler`: no_duplicates" in card
