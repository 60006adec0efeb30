"""Never worse than the base model: the general-retrieval guard, the blend chosen on it, the promotion gate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pairtune.train.guard import (
    GeneralScorer,
    GeneralSet,
    blend,
    choose_blend,
    load_general_set,
    weights_digest,
)

from .conftest import ROOT


class Toy(torch.nn.Module):
    """A one-weight "model": its task and general scores are functions of that weight."""

    max_seq_length = 8

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))


def scorer(table: dict[float, float], calls: list[float]):
    def score(model) -> dict[str, float]:
        a = round(float(model.w.detach()), 4)
        calls.append(a)
        return {"cosine_mrr@10": table[a]}

    return score


class FakeGeneral(GeneralScorer):
    def __init__(self, table: dict[float, float]) -> None:
        self.calls: list[float] = []
        self.score = scorer(table, self.calls)
        self.general = GeneralSet(["q"], ["p"], [], "toy set")

    def __call__(self, model) -> dict[str, float]:
        return self.score(model)


GRID = [1.0, 0.75, 0.5, 0.25, 0.0]


def choose(task: dict[float, float], general: dict[float, float], *, score_all: bool = False, max_drop=0.005):
    model, tasks, fake = Toy(), [], FakeGeneral(general)
    report = choose_blend(model, {"w": torch.zeros(1)}, {"w": torch.ones(1)}, grid=GRID, max_drop=max_drop,
                          score_all=score_all, task=scorer(task, tasks), general=fake)
    return report, fake.calls, round(float(model.w.detach()), 4)


def test_the_trained_model_is_final_when_it_scores_best_and_keeps_general_retrieval():
    report, calls, weight = choose({1.0: 0.9, 0.75: 0.85, 0.5: 0.8, 0.25: 0.75, 0.0: 0.7},
                                   {1.0: 0.898, 0.0: 0.9})
    assert (report.chosen, weight) == (1.0, 1.0)
    assert calls == [0.0, 1.0]  # the base and the trained model only: nothing else needed a general score
    assert report.why.startswith("a = 1 (the trained model)")


def test_the_best_task_blend_that_keeps_general_retrieval_wins_and_the_rest_are_not_scored():
    task = {1.0: 0.90, 0.75: 0.88, 0.5: 0.86, 0.25: 0.80, 0.0: 0.70}
    general = {1.0: 0.80, 0.75: 0.85, 0.5: 0.897, 0.25: 0.9, 0.0: 0.9}
    report, calls, weight = choose(task, general)
    assert (report.chosen, weight) == (0.5, 0.5)
    assert calls == [0.0, 1.0, 0.75, 0.5]  # best task first, until one passes
    assert [r.general is None for r in report.rows] == [False, False, False, True, False]
    assert "a = 0.5" in report.why and "a = 1 scored 0.9000 on eval but general MRR@10 -0.1000" in report.why
    # scoring every blend fills the table and chooses the same
    full, calls, _ = choose(task, general, score_all=True)
    assert full.chosen == 0.5 and all(r.general is not None for r in full.rows)


def test_the_base_model_is_final_when_every_blend_loses_general_retrieval():
    report, _, weight = choose({a: 0.5 + a / 4 for a in GRID}, {1.0: 0.5, 0.75: 0.6, 0.5: 0.7, 0.25: 0.8, 0.0: 0.9})
    assert (report.chosen, weight) == (0.0, 0.0) and report.drop(report.final.general) == 0


def test_a_blend_is_the_interpolation_of_floating_weights_only():
    base = {"w": torch.zeros(3), "ids": torch.arange(3)}
    trained = {"w": torch.full((3,), 2.0), "ids": torch.arange(3) + 5}
    mixed = blend(base, trained, 0.25)
    assert torch.equal(mixed["w"], torch.full((3,), 0.5)) and torch.equal(mixed["ids"], trained["ids"])
    assert weights_digest(base) == weights_digest({k: v.clone() for k, v in base.items()})
    assert weights_digest(base) != weights_digest(mixed)


def test_the_shipped_general_set_is_original_several_hundred_queries_over_a_larger_pool(make_settings):
    general = load_general_set(make_settings())
    assert general is not None and len(general.queries) >= 300
    pool = set(general.passages) | set(general.extra)
    assert len(pool) > 2 * len(general.queries) and len(set(general.queries)) == len(general.queries)
    assert "pairs.jsonl (342 queries, 782 passages)" in general.label
    assert load_general_set(make_settings("general.source=null")) is None


@pytest.mark.slow
def test_general_scores_are_cached_by_weights_and_the_base_model_is_far_from_perfect(base_model, tmp_path, make_settings):
    general = load_general_set(make_settings())
    scorer = GeneralScorer(general, batch_size=64, cache=tmp_path)
    first = scorer(base_model)
    assert 0.7 < first["cosine_mrr@10"] < 0.95 and 0.6 < first["cosine_accuracy@1"] < 0.9
    (cached,) = list(tmp_path.glob("*.json"))
    assert json.loads(cached.read_text()) == first
    cached.write_text(json.dumps({**first, "cosine_mrr@10": 0.123}))  # a second call reads the cache
    assert scorer(base_model)["cosine_mrr@10"] == 0.123


@pytest.mark.slow
def test_a_run_that_loses_general_retrieval_ships_a_blend_within_the_margin_and_the_unblended_is_refused(
    make_settings, prepared_bundled, tmp_path
):
    import mlflow
    from sentence_transformers import SentenceTransformer

    from pairtune.tracking.registry import CHAMPION, Candidate, log_model, promote
    from pairtune.train.training import train

    # Given a learning rate far above the card's, which trades general retrieval for the task
    settings = make_settings(f"paths.prepared={prepared_bundled}", "train.epochs=2", "train.lr=1e-3", "guard.enabled=true",
                             f"paths.final={tmp_path}/final", f"paths.general_cache={tmp_path}/cache",
                             "train.eval_on_start=false", "train.save_checkpoints=false")
    result = train(settings)
    report = result.guard
    # Then the trained model lost more than the margin, and the final model is a blend that keeps it
    assert report.drop(report.trained_general) > settings.guard.max_drop, report.trained_general
    assert report.chosen < 1.0 and report.drop(report.final.general) <= settings.guard.max_drop
    general = load_general_set(settings)
    again = GeneralScorer(general, batch_size=64, cache=None)(SentenceTransformer(str(tmp_path / "final")))
    assert again["cosine_mrr@10"] == pytest.approx(report.final.general["cosine_mrr@10"], abs=1e-5)
    card = (tmp_path / "final/README.md").read_text()
    assert "### Never worse than the base model" in card and f"The final model is the blend (1 - a) x base + a x trained with {report.why}" in card
    assert "### Never worse" not in (tmp_path / "model/README.md").read_text()  # the trained model keeps the seed card's
    # and the registry refuses the unblended model as champion, whatever its task score
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/store.db")
    experiment = mlflow.create_experiment("guard", artifact_location=(tmp_path / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment) as run:
        log_model(tmp_path / "model", "guarded")
    unblended = Candidate(score=0.99, data_sha256="e" * 64, data="the eval split", reported=0.99, task_gain=0.2,
                          general_change=-report.drop(report.trained_general), max_drop=settings.guard.max_drop)
    assert promote("guarded", run.info.run_id, unblended) is None
    version = mlflow.MlflowClient().search_model_versions("name = 'guarded'")[0]
    assert "refused: general-retrieval MRR@10 changes" in version.description and CHAMPION not in version.aliases


def toy_pairs(path: Path, rows: int) -> Path:
    """Pairs whose sentence is the note itself, each of unrelated made-up words: with dropout off every
    positive scores 1.0 and outscores every negative by far."""
    import random

    rng = random.Random(0)
    letters = "bcdfghjklmnpqrstvwxz"

    def text() -> str:
        return " ".join("".join(rng.choice(letters) + rng.choice("aeiou") for _ in range(3)) for _ in range(6))

    lines = [json.dumps({"sentence_0": (t := text()), "sentence_1": t}) for _ in range(rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.slow
def test_a_too_easy_task_and_a_run_without_gain_are_said_once_with_the_in_batch_signals(make_settings, tmp_path):
    from pairtune.core import NullObserver
    from pairtune.data.preparation import run_prepare
    from pairtune.train.training import train

    class Steps(NullObserver):
        def __init__(self) -> None:
            self.metrics: list[dict[str, float]] = []

        def on_step(self, step: int, metrics: dict[str, float]) -> None:
            self.metrics.append(metrics)

    source = toy_pairs(tmp_path / "easy.jsonl", 120)
    settings = make_settings(f"data.source={source}", "data.train_size=80", "data.eval_size=20",
                             "train.batch_size=16", "train.epochs=1", "train.lr=1e-9", "model.dropout=0.0",
                             "train.save_checkpoints=false")
    run_prepare(settings)
    steps = Steps()
    result = train(settings, observer=steps)
    assert all(m["in_batch_accuracy"] == 1.0 and m["hardest_margin"] > 0.1 for m in steps.metrics)
    assert len(result.warnings) == 2
    too_easy, no_gain = result.warnings
    assert too_easy.startswith("mean training loss 0.0") and "over the first epoch" in too_easy
    assert no_gain.startswith("eval cosine_mrr@10 ended at 1.0000, not above the base model's 1.0000 at step 0")


def test_the_guard_files_are_in_the_repository():
    assert (ROOT / "data/general/pairs.jsonl").is_file() and (ROOT / "data/general/distractors.jsonl").is_file()
