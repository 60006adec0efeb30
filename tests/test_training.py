from __future__ import annotations

import re

import pytest

from pairtune.config import TrainConfig
from pairtune.sampling import GlobalBatchSampler
from pairtune.training import Schedule, train


def test_default_schedule_is_9_steps_per_epoch_and_90_in_all(make_settings, prepared_bundled):
    """The seed card's schedule, from the real sampler over the real prepared train split."""
    import pandas as pd

    settings = make_settings()
    rows = len(pd.read_parquet(prepared_bundled / "train.parquet"))
    sampler = GlobalBatchSampler(rows, settings.train.batch_size, seed=settings.train.seed)
    schedule = Schedule.for_sampler(sampler, settings.train)
    assert rows == 263
    assert (schedule.epoch_steps, schedule.total_steps) == ([9] * 10, 90)


@pytest.mark.parametrize(
    ("accumulation", "max_steps", "per_epoch", "total"), [(2, -1, 5, 50), (1, 20, 9, 20), (3, -1, 3, 30)]
)
def test_schedule_follows_accumulation_and_max_steps(accumulation, max_steps, per_epoch, total):
    schedule = Schedule([9] * TrainConfig().epochs, accumulation, max_steps)
    assert (schedule.epoch_steps[0], schedule.total_steps) == (per_epoch, total)


@pytest.mark.slow
def test_short_run_writes_model_and_card(make_settings, prepared_bundled):
    settings = make_settings(f"paths.prepared={prepared_bundled}", "train.max_steps=2", "train.epochs=1")
    result = train(settings)
    assert result.global_step == 2 and len(result.step_losses) == 2
    card = (result.model_dir / "README.md").read_text()
    assert "dataset_size:263" in card and "`per_device_train_batch_size`: 32" in card
    assert "`learning_rate`: 5e-05" in card and "`seed`: 42" in card
    logs = card.split("### Training Logs")[1].split("###")[0]
    assert re.search(r"^\| 0\.0 \| 0 \| - \| [0-9.]+ ", logs, re.M), logs
    assert re.search(r"^\| 0\.2222 \| 2 \| [0-9.]+ \|", logs, re.M), logs
    assert (result.model_dir / "model.safetensors").is_file()
    assert not list(result.model_dir.rglob("*.bin")) and not list(result.model_dir.rglob("*.pt"))  # safetensors only
    from sentence_transformers import SentenceTransformer

    reloaded = SentenceTransformer(str(result.model_dir), device="cpu")
    assert reloaded.encode(["Ada see sh"]).shape == (1, 384)


@pytest.mark.slow
def test_same_seed_gives_identical_losses(make_settings, prepared_bundled, tmp_path):
    runs = []
    for name in ("a", "b"):
        settings = make_settings(
            f"paths.prepared={prepared_bundled}", f"paths.model={tmp_path}/{name}", "train.max_steps=3",
            "train.epochs=1", "train.eval_on_start=false", "train.save_checkpoints=false",
        )
        runs.append(train(settings).step_losses)
    assert runs[0] == runs[1] and len(runs[0]) == 3
