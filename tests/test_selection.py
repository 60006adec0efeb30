"""train.select_best: the saved model is the best evaluation's, ties keep the earlier, resumes keep it."""

from __future__ import annotations

import pytest
import torch

from pairtune.core import PRIMARY_METRIC
from pairtune.train.selection import BEST_FILE, BestWeights


def linear(value: float) -> torch.nn.Linear:
    layer = torch.nn.Linear(2, 2)
    with torch.no_grad():
        layer.weight.fill_(value)
        layer.bias.fill_(value)
    return layer


def test_only_a_strictly_better_score_replaces_the_kept_weights():
    best, model = BestWeights(), linear(1.0)
    assert best.offer(model, 0, 0.5)
    with torch.no_grad():
        model.weight.fill_(2.0)  # the kept copy must not follow the live model
    assert not best.offer(model, 9, 0.5)  # a tie keeps the earlier, shorter-trained weights
    assert best.step == 0 and best.weights["weight"].eq(1.0).all()
    assert best.offer(model, 18, 0.6) and best.step == 18 and best.weights["weight"].eq(2.0).all()


def test_restore_loads_the_best_weights_and_says_which_step(tmp_path):
    best, model = BestWeights(), linear(1.0)
    best.offer(model, 9, 0.7)
    best.save(tmp_path)  # as a checkpoint carries them
    loaded = BestWeights.load(tmp_path)
    trained_on = linear(3.0)
    assert loaded.restore_into(trained_on, last_step=90) == 9
    assert trained_on.weight.eq(1.0).all() and loaded.score == pytest.approx(0.7)
    assert BestWeights.load(tmp_path / "none").weights is None


def test_no_evaluation_means_no_best_model():
    with pytest.raises(RuntimeError, match="no evaluation was recorded"):
        BestWeights().restore_into(linear(1.0), last_step=3)


@pytest.fixture
def eval_that_training_hurts(prepared_bundled, tmp_path):
    """The bundled splits, but each training note is paired with another training note's sentence.

    Training on wrong pairs pulls the notes away from their own sentences, so the eval MRR@10 falls as
    training goes on and the best evaluation is an early one, never the last: a ``restore_into`` that kept
    the last weights would show.
    """
    import pandas as pd

    folder = tmp_path / "prepared"
    folder.mkdir()
    for split in ("eval", "test"):
        (folder / f"{split}.parquet").write_bytes((prepared_bundled / f"{split}.parquet").read_bytes())
    wrong = pd.read_parquet(prepared_bundled / "train.parquet")
    wrong["sentence_1"] = wrong["sentence_1"].tolist()[1:] + wrong["sentence_1"].tolist()[:1]
    wrong.to_parquet(folder / "train.parquet", index=False)
    return folder


@pytest.mark.slow
def test_a_real_run_saves_the_best_eval_step_and_marks_it_on_the_card(make_settings, eval_that_training_hurts,
                                                                      tmp_path):
    from safetensors.torch import load_file
    from sentence_transformers import SentenceTransformer

    from pairtune.data.pairs import Columns, load_prepared
    from pairtune.outputs.evaluation import build_evaluator, run_evaluator
    from pairtune.train.training import train

    # Given a run whose evaluations get worse as it trains, the step-0 evaluation (the base model) left out
    settings = make_settings(
        f"paths.prepared={eval_that_training_hurts}", "train.select_best=true", "train.epochs=3",
        "train.lr=2e-4", "train.eval_on_start=false",
    )
    result = train(settings)
    scores = [row.metrics[PRIMARY_METRIC] for row in result.rows]
    best_row = result.rows[scores.index(max(scores))]  # the first of the highest
    assert [row.step for row in result.rows] == [9, 18, 27] and best_row.step < 27, scores
    # Then the saved model is that step's, not the last one's: scoring it again gives that row's metrics
    assert result.selected_step == best_row.step and result.final_metrics == best_row.metrics
    evaluator = build_evaluator(load_prepared(eval_that_training_hurts)["eval"], Columns.of(settings.data),
                                name="eval", batch_size=32)
    again = run_evaluator(evaluator, SentenceTransformer(str(tmp_path / "model")))
    assert again[PRIMARY_METRIC] == pytest.approx(best_row.metrics[PRIMARY_METRIC], abs=1e-5)
    assert again[PRIMARY_METRIC] > scores[-1] + 1e-3
    card = (tmp_path / "model/README.md").read_text()
    assert f"| **{best_row.step}** |" in card and "* The bold row denotes the saved checkpoint." in card
    assert "- `load_best_model_at_end`: True" in card
    # and the newest checkpoint carries the best weights so far, for a resume; they are the saved model's
    newest = sorted((tmp_path / "checkpoints").glob("step-*"))[-1]
    kept = BestWeights.load(newest)
    assert kept.step == best_row.step and (newest / BEST_FILE).is_file()
    saved = load_file(tmp_path / "model/model.safetensors")
    assert all(torch.equal(kept.weights[f"0.model.{k}"], v) for k, v in saved.items())
