"""Several sources in one run: split apart, one source per global batch on every process, evaluated apart."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import mlflow
import pandas as pd
import pytest

from pairtune.config import ConfigError, load_settings
from pairtune.data.pairs import PairDataError
from pairtune.data.sampling import SourceBatchSampler
from pairtune.train.signals import TrainingInterrupted

from .conftest import ROOT, compose_config

# Three bundled sets at very different sizes: 128, 64 and 32 training pairs (4, 2 and 1 batches of 32).
SOURCES = ("data.sources=[{name: harbour, source: data/raw/pairs.jsonl, train_size: 128, eval_size: 20},"
           "{name: caravan, source: data/raw/caravan.jsonl, train_size: 64, eval_size: 20},"
           "{name: observatory, source: data/raw/observatory.jsonl, train_size: 32, eval_size: 20}]")
LABELS = ["big"] * 1000 + ["mid"] * 200 + ["small"] * 40


def samplers(mode: str, world: int = 2, **kwargs) -> list[SourceBatchSampler]:
    return [SourceBatchSampler(LABELS, 8, seed=42, world_size=world, rank=rank, mode=mode, **kwargs)
            for rank in range(world)]


@pytest.mark.parametrize("mode", ["proportional", "round_robin"])
def test_every_global_batch_comes_from_one_source_on_every_process(mode):
    for epoch in range(3):
        ranks = samplers(mode)
        for sampler in ranks:
            sampler.set_epoch(epoch)
        batches = ranks[0].global_batches()
        assert all(len({LABELS[row] for row in batch}) == 1 for batch in batches)
        for step, slices in enumerate(zip(*(list(sampler) for sampler in ranks), strict=True)):
            assert {LABELS[row] for part in slices for row in part} == {ranks[0].batch_sources[step]}
            assert sorted(row for part in slices for row in part) == sorted(batches[step])


def test_proportional_takes_every_batch_of_each_source_times_its_weight_spread_over_the_epoch():
    sampler = samplers("proportional", weights={"small": 2.0, "mid": 0.5})[0]
    counts = Counter(sampler.batch_sources if sampler.global_batches() else [])
    assert counts == {"big": 63, "mid": 6, "small": 6}  # 1000/16 -> 63, 200/16 = 13 -> 6 (0.5), 40/16 -> 3 -> 6 (x2)
    first_half = Counter(sampler.batch_sources[: len(sampler.batch_sources) // 2])
    assert 25 <= first_half["big"] <= 38  # the seeded order spreads each source over the epoch
    big_rows = [row for batch, source in zip(sampler.global_batches(), sampler.batch_sources, strict=True)
                for row in batch if source == "big"]
    assert sorted(big_rows) == list(range(1000))  # weight 1: every row once


def test_round_robin_takes_one_batch_of_each_source_in_turn_until_one_runs_out():
    sampler = samplers("round_robin", weights={"small": 5.0})[0]  # weights are for proportional only
    sampler.global_batches()
    assert sampler.batch_sources == ["big", "mid", "small"] * 3  # small has 3 batches of 16
    assert len(sampler) == 9


def test_an_epoch_is_rebuilt_exactly_by_a_new_process_and_differs_from_the_next():
    first, again = samplers("proportional")[0], samplers("proportional")[0]
    first.set_epoch(1), again.set_epoch(1)
    assert first.global_batches() == again.global_batches() and first.batch_sources == again.batch_sources
    again.set_epoch(2)
    assert again.global_batches() != first.global_batches()


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("data.sources=[{name: a, source: x.jsonl}, {name: a, source: y.jsonl}]", "data.sources"),
        ("data.sources=[{name: 'a b', source: x.jsonl}]", "data.sources.name"),
        ("data.sources=[{name: a, source: x.jsonl, weight: 0}]", "data.sources.a.weight"),
        ("data.sources=[{name: a, source: x.jsonl}]", None),
    ],
)
def test_bad_sources_name_their_key(override, key):
    if key is None:
        with pytest.raises(ConfigError, match="config key 'data.objective': must be mean, all or a source name"):
            load_settings(compose_config([override, "data.objective=b"]))
        return
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        load_settings(compose_config([override]))


def test_prepare_splits_each_source_and_counts_rows_per_source_and_split(tmp_path):
    from pairtune.data.preparation import run_prepare

    stats = run_prepare(load_settings(compose_config([SOURCES, f"paths.prepared={tmp_path}/p"])))
    assert {name: part["rows"] for name, part in stats["sources"].items()} == {
        "harbour": {"train": 128, "eval": 20, "test": 222},
        "caravan": {"train": 64, "eval": 20, "test": 266},
        "observatory": {"train": 32, "eval": 20, "test": 300},
    }
    train = pd.read_parquet(tmp_path / "p/train.parquet")
    assert train["source"].value_counts().to_dict() == {"harbour": 128, "caravan": 64, "observatory": 32}
    assert stats["rows"] == {"train": 224, "eval": 60, "test": 788}


def test_a_text_in_two_sources_different_splits_is_refused_naming_both(tmp_path):
    from pairtune.data.preparation import run_prepare

    rows = [json.loads(line) for line in (ROOT / "data/raw/caravan.jsonl").read_text().splitlines()][:120]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows[::-1]) + "\n")
    settings = load_settings(compose_config([
        f"data.sources=[{{name: a, source: {tmp_path}/a.jsonl, train_size: 80, eval_size: 10}},"
        f"{{name: b, source: {tmp_path}/b.jsonl, train_size: 40, eval_size: 10}}]", f"paths.prepared={tmp_path}/p"]))
    with pytest.raises(PairDataError, match=r"data.sources: text in '\w+' of 'a' and in '\w+' of 'b'"):
        run_prepare(settings)
    assert not (tmp_path / "p").exists()  # nothing half-written


@pytest.fixture(scope="module")
def prepared_sources(tmp_path_factory):
    from pairtune.data.preparation import run_prepare

    folder = tmp_path_factory.mktemp("sources") / "prepared"
    run_prepare(load_settings(compose_config([SOURCES, f"paths.prepared={folder}"])))
    return folder


@pytest.mark.slow
def test_a_stop_mid_epoch_resumes_the_same_batch_sequence(make_settings, prepared_sources, tmp_path):
    from .test_resume_edges import card_logs, run

    whole = run(make_settings, prepared_sources, tmp_path / "whole", SOURCES)
    with pytest.raises(TrainingInterrupted):
        run(make_settings, prepared_sources, tmp_path / "cut", SOURCES, stop_at=3)
    resumed = run(make_settings, prepared_sources, tmp_path / "cut", SOURCES, "train.resume=true")
    assert resumed.step_losses == pytest.approx(whole.step_losses, abs=1e-6) and len(whole.step_losses) == 14
    assert card_logs(resumed.model_dir) == card_logs(whole.model_dir)
    assert (resumed.model_dir / "model.safetensors").read_bytes() == (whole.model_dir / "model.safetensors").read_bytes()
    for name in ("harbour", "caravan", "observatory"):  # each source scored apart, and the headline their mean
        assert f"{name}/cosine_mrr@10" in whole.rows[-1].metrics
    mean = sum(whole.rows[-1].metrics[f"{n}/cosine_mrr@10"] for n in ("harbour", "caravan", "observatory")) / 3
    assert whole.rows[-1].metrics["cosine_mrr@10"] == pytest.approx(mean)
    card = (whole.model_dir / "README.md").read_text()
    assert "| harbour | <code>data/raw/pairs.jsonl</code> | 1.0 | 128 |" in card


@pytest.mark.slow
def test_two_processes_draw_the_one_process_batches_and_track_each_source(prepared_sources, tmp_path):
    """2 x 16 gathered equals 1 x 32 step for step, so both worlds drew the same one-source global batches."""
    from .test_distributed import step_history, torchrun

    uri = f"sqlite:///{tmp_path}/store.db"
    common = [SOURCES, f"paths.prepared={prepared_sources}", "model.dropout=0.0", "train.max_steps=4", "train.epochs=1",
              "train.eval_on_start=false", "train.save_checkpoints=false", f"tracking.uri={uri}",
              "tracking.log_model=false", f"paths.reports={tmp_path}/reports", f"hydra.run.dir={tmp_path}/hydra",
              "guard.enabled=false"]
    torchrun("pipelines/train.py", *common, "train.batch_size=16", "loss.gather_across_devices=true",
             f"paths.model={tmp_path}/ddp", "tracking.run_name=ddp")
    subprocess.run([sys.executable, "pipelines/train.py", *common, "train.batch_size=32", f"paths.model={tmp_path}/one",
                    "tracking.run_name=one"], cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=True,
                   capture_output=True)
    ddp, one = step_history(uri, "ddp", "train_loss"), step_history(uri, "one", "train_loss")
    assert len(ddp) == 4 and ddp == pytest.approx(one, rel=1e-5)
    mlflow.set_tracking_uri(uri)
    run = mlflow.search_runs(experiment_names=["pairtune"], filter_string="attributes.run_name = 'ddp'",
                             output_format="list")[0]
    inputs = sorted(d.dataset.name for d in run.inputs.dataset_inputs)
    assert inputs == sorted(f"{s}-{split}" for s in ("harbour", "caravan", "observatory") for split in ("train", "eval"))
    assert {f"eval_{s}/cosine_mrr_at_10" for s in ("harbour", "caravan", "observatory", "all")} <= set(run.data.metrics)


OWN_PROMPTS = ("data.sources=[{name: harbour, source: data/raw/pairs.jsonl, train_size: 128, eval_size: 20},"
               "{name: caravan, source: data/raw/caravan.jsonl, train_size: 64, eval_size: 20, "
               "anchor_prompt: 'note: ', positive_prompt: 'text: '},"
               "{name: observatory, source: data/raw/observatory.jsonl, train_size: 32, eval_size: 20, anchor_prompt: ''}]")
RUN_PROMPTS = ["data.anchor_prompt=query: ", "data.positive_prompt=passage: "]


def test_sources_with_prompts_of_their_own_put_them_before_their_rows_only():
    from pairtune.data.pairs import Columns

    columns = Columns.of(load_settings(compose_config([OWN_PROMPTS, *RUN_PROMPTS])).data)
    frame = pd.DataFrame({"sentence_0": ["h", "c", "o"], "sentence_1": ["H", "C", "O"],
                          "source": ["harbour", "caravan", "observatory"]})
    assert columns.prompted(frame) == [["query: h", "note: c", "o"], ["passage: H", "text: C", "passage: O"]]
    assert columns.model_prompts == {
        "query": "query: ", "document": "passage: ", "harbour_query": "query: ", "harbour_document": "passage: ",
        "caravan_query": "note: ", "caravan_document": "text: ", "observatory_document": "passage: ",
    }
    plain = Columns.of(load_settings(compose_config([SOURCES, *RUN_PROMPTS])).data)
    assert plain.source_prompts is None and plain.model_prompts == {"query": "query: ", "document": "passage: "}


def test_each_source_is_evaluated_with_its_own_prompts_and_the_pool_with_each_rows(prepared_sources):
    from pairtune.data.pairs import Columns, load_prepared
    from pairtune.outputs.evaluation import build_split_evaluator

    columns = Columns.of(load_settings(compose_config([OWN_PROMPTS, *RUN_PROMPTS])).data)
    evaluator = build_split_evaluator(load_prepared(prepared_sources)["eval"], columns, name="eval")
    caravan, observatory = evaluator.by_source["caravan"], evaluator.by_source["observatory"]
    assert (caravan.query_prompt, caravan.corpus_prompt) == ("note: ", "text: ")
    assert (observatory.query_prompt, observatory.corpus_prompt) == ("", "passage: ")
    assert (evaluator.pooled.query_prompt, evaluator.pooled.corpus_prompt) == ("", "")
    queries = set(evaluator.pooled.queries)
    assert any(q.startswith("note: ") for q in queries) and any(q.startswith("query: ") for q in queries)


@pytest.mark.slow
def test_the_model_saves_each_sources_prompts_under_its_name(make_settings, prepared_sources, tmp_path):
    from pairtune.train.training import train

    settings = make_settings(OWN_PROMPTS, *RUN_PROMPTS, f"paths.prepared={prepared_sources}", "train.max_steps=2",
                             "train.epochs=1", "train.save_checkpoints=false")
    result = train(settings)
    saved = json.loads((result.model_dir / "config_sentence_transformers.json").read_text())["prompts"]
    assert saved["caravan_query"] == "note: " and saved["query"] == "query: " and "observatory_query" not in saved
