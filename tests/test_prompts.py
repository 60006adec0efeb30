"""Prompts: put before anchors ("query") and positives ("document") in training, evaluation, export and serving."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
import pytest

from pairtune.config import load_settings, to_plain_dict
from pairtune.data.pairs import Columns

from .conftest import BUNDLED, compose_config, tracked_overrides

PROMPTS = ["data.anchor_prompt=query: ", "data.positive_prompt=passage: "]
TEXTS = ["Ada ? whr sh @ nit", "Ada wondered where the ship had gone that night.", "Bo run → riv"]


def test_columns_put_each_prompt_before_its_columns_texts():
    frame = pd.DataFrame({"a": ["n1"], "p": ["s1"], "n": ["x1"]})
    columns = Columns("a", "p", "n", anchor_prompt="query: ", positive_prompt="passage: ")
    assert columns.prompted(frame) == [["query: n1"], ["passage: s1"], ["passage: x1"]]
    assert columns.model_prompts == {"query": "query: ", "document": "passage: "}
    plain = Columns("a", "p")
    assert plain.prompted(frame) == [["n1"], ["s1"]] and plain.model_prompts == {}


def test_the_config_carries_the_prompts_into_the_columns():
    settings = load_settings(compose_config(PROMPTS))
    assert Columns.of(settings.data).model_prompts == {"query": "query: ", "document": "passage: "}
    assert Columns.of(load_settings(compose_config([])).data).model_prompts == {}  # the seed card: none


@pytest.mark.slow
def test_token_counts_include_the_prompt(tmp_path):
    from pairtune.data.preparation import run_prepare

    stats = {}
    for label, extra in (("plain", []), ("prompted", PROMPTS)):
        settings = load_settings(compose_config([f"paths.prepared={tmp_path}/{label}", f"data.source={BUNDLED}",
                                                 *extra]))
        run_prepare(settings)
        stats[label] = json.loads((tmp_path / label / "stats.json").read_text())
    for split, columns in stats["plain"]["tokens"].items():
        for column, counts in columns.items():
            prompted = stats["prompted"]["tokens"][split][column]
            # "query: " and "passage: " are two word pieces each, before every text
            assert prompted["min"] == counts["min"] + 2 and prompted["max"] == counts["max"] + 2
            assert prompted["mean"] == pytest.approx(counts["mean"] + 2, abs=0.011)


@pytest.fixture(scope="module")
def prompted_run(tmp_path_factory, prepared_bundled):
    from pairtune.outputs.export import run_export
    from pairtune.tracking import tracked_run
    from pairtune.train import training

    folder = tmp_path_factory.mktemp("prompts")
    uri = f"sqlite:///{folder}/mlflow.db"
    overrides = [*tracked_overrides(folder, prepared_bundled, "prompts", steps=3), *PROMPTS]
    settings = load_settings(compose_config(overrides))
    trained_on = []
    real = training.tokenize_columns

    def recording(tokenizer, columns, **kwargs):
        trained_on.append(columns)
        return real(tokenizer, columns, **kwargs)

    with pytest.MonkeyPatch.context() as patch, tracked_run(settings, config=to_plain_dict(settings),
                                                            overrides=overrides) as observer:
        patch.setattr(training, "tokenize_columns", recording)
        result = training.train(settings, observer=observer)
    run_export(settings)
    mlflow.set_tracking_uri(uri)
    run = mlflow.search_runs(experiment_names=["prompts"], output_format="list")[0]
    return settings, result, run, trained_on[0]


@pytest.mark.slow
def test_training_reads_every_text_with_its_columns_prompt(prompted_run, prepared_bundled):
    from pairtune.data.pairs import load_prepared

    *_, trained_on = prompted_run
    frame = load_prepared(prepared_bundled)["train"]
    assert trained_on[0] == ["query: " + text for text in frame["sentence_0"]]
    assert trained_on[1] == ["passage: " + text for text in frame["sentence_1"]]


@pytest.mark.slow
def test_evaluation_encodes_with_the_prompts(prompted_run, prepared_bundled, base_model):
    from pairtune.data.pairs import load_prepared
    from pairtune.outputs.evaluation import build_evaluator, run_evaluator

    _, result, *_ = prompted_run
    without = run_evaluator(build_evaluator(load_prepared(prepared_bundled)["eval"], Columns(), name="eval"), base_model)
    base_model.prompts.update({"query": "query: ", "document": "passage: "})
    with_prompts = run_evaluator(build_evaluator(load_prepared(prepared_bundled)["eval"], Columns(), name="eval"),
                                 base_model)
    assert result.rows[0].metrics == with_prompts  # the step-0 row: the base model, read with the prompts
    assert with_prompts["cosine_mrr@10"] != without["cosine_mrr@10"]


@pytest.mark.slow
def test_the_prompts_are_saved_and_apply_alike_in_pytorch_onnx_and_the_served_model(prompted_run):
    from sentence_transformers import SentenceTransformer

    from pairtune.outputs.onnx_encoder import OnnxEncoder

    settings, result, run, _ = prompted_run
    saved = json.loads((result.final_dir / "config_sentence_transformers.json").read_text())
    assert saved["prompts"] == {"query": "query: ", "document": "passage: "}
    model = SentenceTransformer(str(result.final_dir), device="cpu")
    plain = model.encode(TEXTS, normalize_embeddings=True)
    onnx = OnnxEncoder(settings.paths.onnx, variant="fp32")
    served = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    for name in ("query", "document"):
        torch_side = model.encode(TEXTS, prompt_name=name, normalize_embeddings=True)
        assert np.sum(torch_side * plain, axis=1).max() < 0.9999  # a prompt changes every embedding
        onnx_side = onnx.encode(TEXTS, prompt_name=name)
        served_side = np.asarray(served.predict(TEXTS, params={"prompt_name": name}))
        served_side = served_side / np.linalg.norm(served_side, axis=1, keepdims=True)
        assert np.sum(onnx_side * torch_side, axis=1).min() > 0.9999
        assert np.sum(served_side * torch_side, axis=1).min() > 0.9999
    assert np.sum(onnx.encode(TEXTS) * plain, axis=1).min() > 0.9999  # no prompt named: none applied
    with pytest.raises(KeyError, match="no prompt named 'passage'"):
        onnx.encode(TEXTS, prompt_name="passage")
    card = (result.final_dir / "README.md").read_text()
    assert '{"query": "query: ", "document": "passage: "}' in card


@pytest.mark.slow
def test_a_model_that_pools_without_its_prompt_tokens_is_refused_with_the_key(base_model):
    from pairtune.config import ConfigError
    from pairtune.train.training import apply_prompts

    columns = Columns(anchor_prompt="query: ")
    base_model[1].include_prompt = False
    with pytest.raises(ConfigError, match="config key 'data.anchor_prompt': .* include_prompt=false"):
        apply_prompts(base_model, columns, "m")
    base_model[1].include_prompt = True
    apply_prompts(base_model, columns, "m")
    assert base_model.prompts["query"] == "query: " and base_model.prompts["document"] == ""
