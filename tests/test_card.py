"""The model card from its template: real base model, real prepared data, a hand-made run (no training)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pairtune.core import CARD_METRICS, EpochRow, TrainResult
from pairtune.data.pairs import Columns
from pairtune.outputs.card import card_context, render_model_card, write_model_card

from .conftest import ROOT


def metrics(base: float) -> dict[str, float]:
    return {name: base + index / 100 for index, name in enumerate(CARD_METRICS)}


def make_result(*, epoch_steps: list[int] | None = None, similarity: str = "cosine") -> TrainResult:
    """A finished run as the loop would report it: a step-0 base row without loss, then one row per epoch."""
    epoch_steps = epoch_steps or [9, 9]
    rows = [EpochRow(epoch=0.0, step=0, training_loss=None, metrics=metrics(0.3))]
    step = 0
    for epoch, steps in enumerate(epoch_steps, start=1):
        step += steps
        rows.append(EpochRow(epoch=float(epoch), step=step, training_loss=1.5 / epoch, metrics=metrics(0.5)))
    return TrainResult(
        model_dir=Path("unused"),
        global_step=step,
        epoch_steps=epoch_steps,
        total_steps=step,
        world_size=1,
        global_batch_size=32,
        step_losses=[1.0] * step,
        rows=rows,
        train_seconds=4321.5,
        pairs_per_second=98765.25,
        similarity=similarity,
    )


@pytest.fixture
def train_frame(prepared_bundled) -> pd.DataFrame:
    return pd.read_parquet(prepared_bundled / "train.parquet")


@pytest.fixture
def render(base_model, make_settings, train_frame):
    """Render the card for the given run and config overrides (and, optionally, another training frame)."""

    def make(result: TrainResult | None = None, *overrides: str, frame: pd.DataFrame | None = None) -> str:
        context = card_context(
            model=base_model,
            settings=make_settings(*overrides),
            result=result or make_result(),
            train_frame=train_frame if frame is None else frame,
            columns=Columns(),
        )
        return render_model_card(context)

    return make


def section(card: str, title: str) -> str:
    return card.split(f"### {title}\n")[1].split("\n### ")[0]


def front_matter(card: str) -> dict:
    lines = card.splitlines()
    assert lines[0] == "---"
    end = lines.index("---", 1)
    return yaml.safe_load("\n".join(lines[1:end]))


def test_training_logs_start_with_the_step_0_row_without_loss(render):
    # Given a run of two 9-step epochs, When the card is rendered
    logs = section(render(make_result(epoch_steps=[9, 9])), "Training Logs").splitlines()
    # Then the table's rows are the base row, then one per epoch with its mean loss and metrics
    assert logs[0].startswith("| Epoch | Step | Training Loss | eval_cosine_accuracy@1 |")
    assert logs[2] == "| 0.0 | 0 | - | 0.3000 | 0.3100 | 0.3200 | 0.3300 | 0.3400 | 0.3500 | 0.3600 |"
    assert logs[3] == "| 1.0 | 9 | 1.5000 | 0.5000 | 0.5100 | 0.5200 | 0.5300 | 0.5400 | 0.5500 | 0.5600 |"
    assert logs[4] == "| 2.0 | 18 | 0.7500 | 0.5000 | 0.5100 | 0.5200 | 0.5300 | 0.5400 | 0.5500 | 0.5600 |"
    assert logs[5] == ""


def test_dot_product_run_says_dot_product_everywhere(render):
    card = render(make_result(similarity="dot"), "loss.similarity=dot")
    assert "- **Similarity Function:** Dot Product\n" in card
    assert '"similarity_fct": "dot_score"' in card
    assert "Cosine Similarity" not in card and "cos_sim" not in card


def test_cosine_run_and_cached_loss(render):
    card = render(make_result(), "loss.mini_batch_size=8")
    assert "- **Similarity Function:** Cosine Similarity\n" in card and '"similarity_fct": "cos_sim"' in card
    assert "[<code>CachedMultipleNegativesRankingLoss</code>]" in card and '"mini_batch_size": 8' in card


@pytest.mark.parametrize(
    ("epoch_steps", "line"),
    [
        ([9, 9, 9], "Training: 27 steps, 9 per epoch, world size 1, global batch 32.\n"),
        ([9, 8, 9], "Training: 26 steps, [9, 8, 9] per epoch, world size 1, global batch 32.\n"),
    ],
)
def test_steps_per_epoch_come_from_every_epoch(render, epoch_steps, line):
    assert line in render(make_result(epoch_steps=epoch_steps))


def test_same_run_gives_the_same_card_without_timings_or_machine_paths(render, tmp_path):
    first, second = render(make_result()), render(make_result())
    assert first == second
    assert "pairs/s" not in first and "98765" not in first and "4321" not in first
    # paths.model and data.source are absolute in these settings; the card names only their last part
    assert str(tmp_path) not in first and str(ROOT) not in first
    assert "- **Training Dataset:** pairs.jsonl\n" in first and 'SentenceTransformer("model")' in first


def test_front_matter_is_yaml_with_three_widget_samples(render, train_frame):
    card = render()
    meta = front_matter(card)
    assert "dataset_size:263" in meta["tags"]
    assert meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert meta["widget"] == [
        {"source_sentence": anchor, "sentences": [positive]}
        for anchor, positive in zip(train_frame["sentence_0"][:3], train_frame["sentence_1"][:3], strict=True)
    ]
    # the hyperparameters test_training's end-to-end run checks for
    for line in ("`per_device_train_batch_size`: 32", "`learning_rate`: 5e-05", "`seed`: 42"):
        assert f"- {line}\n" in card


def test_widget_texts_read_back_unchanged_whatever_they_hold(render, train_frame):
    # Given first rows with quotes, a line break, a tab, a backslash and an unprintable separator
    tricky = ['It\'s "quoted": yes', "two\nlines\tand \\ back", "line\u2028sep # not a comment"]
    frame = train_frame.copy()
    frame.loc[frame.index[:3], "sentence_0"] = tricky
    # When the card is rendered, Then YAML reads every widget text back as it was
    widget = front_matter(render(None, frame=frame))["widget"]
    assert [sample["source_sentence"] for sample in widget] == tricky


def test_write_model_card_replaces_the_card_whole(base_model, make_settings, train_frame, tmp_path):
    folder = tmp_path / "card"
    folder.mkdir()
    (folder / "README.md").write_text("an older card")
    kwargs = dict(model=base_model, settings=make_settings(), result=make_result(), train_frame=train_frame)
    write_model_card(folder / "README.md", columns=Columns(), **kwargs)
    assert [path.name for path in folder.iterdir()] == ["README.md"]  # no temporary file left beside it
    expected = render_model_card(card_context(columns=Columns(), **kwargs))
    assert (folder / "README.md").read_text(encoding="utf-8") == expected


def test_card_module_stays_off_the_heavy_stack():
    code = "import sys, pairtune.outputs.card; print(sorted({'torch', 'sentence_transformers'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
