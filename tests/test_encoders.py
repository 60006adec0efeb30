"""Other encoders than MiniLM: MPNet and XLM-RoBERTa, built offline, train, evaluate, resume, export and serve."""

from __future__ import annotations

import json
import logging

import mlflow
import numpy as np
import pytest

from pairtune.config import load_settings, to_plain_dict
from pairtune.train.signals import TrainingInterrupted, graceful_stop

from .conftest import BUNDLED, compose_config
from .test_resume_edges import SigtermAt
from .tiny_encoders import ARCHITECTURES, build

TEXTS = ["Ada ? whr sh @ nit", "Ada wondered where the ship had gone that night.", "Bo run → riv"]
STEPS = 6


def settings_for(model_dir, prepared, out, *extra):
    return load_settings(compose_config([
        f"model.name={model_dir}", f"paths.prepared={prepared}", f"paths.model={out}/model",
        f"paths.final={out}/final", f"paths.checkpoints={out}/ckpt", f"paths.reports={out}/reports",
        f"paths.onnx={out}/onnx", f"data.source={BUNDLED}", "guard.enabled=false", "train.epochs=1",
        f"train.max_steps={STEPS}", "train.eval_every_steps=3", "train.lr=1e-3", "tracking.enabled=false", *extra,
    ]))


@pytest.fixture(scope="module", params=ARCHITECTURES)
def encoder_run(request, tmp_path_factory, prepared_bundled):
    """One tracked, evaluated and exported run of a tiny ``architecture``, and the same run stopped and resumed."""
    from pairtune.outputs.evaluation import run_evaluate
    from pairtune.outputs.export import run_export
    from pairtune.tracking import tracked_run
    from pairtune.train.training import train

    folder = tmp_path_factory.mktemp(request.param)
    model_dir = build(request.param, folder / "base")
    uri = f"sqlite:///{folder}/mlflow.db"
    settings = settings_for(model_dir, prepared_bundled, folder / "whole", "tracking.enabled=true",
                            f"tracking.uri={uri}", "tracking.experiment=encoders")
    with tracked_run(settings, config=to_plain_dict(settings), overrides=[]) as observer:
        whole = train(settings, observer=observer)
    evaluated, exported = run_evaluate(settings), run_export(settings)
    stopped = settings_for(model_dir, prepared_bundled, folder / "stopped")
    with graceful_stop(), pytest.raises(TrainingInterrupted):
        train(stopped, observer=SigtermAt(2))
    with graceful_stop():
        resumed = train(settings_for(model_dir, prepared_bundled, folder / "stopped", "train.resume=true"))
    mlflow.set_tracking_uri(uri)
    run = mlflow.search_runs(experiment_names=["encoders"], output_format="list")[0]
    return {"architecture": request.param, "settings": settings, "whole": whole, "resumed": resumed,
            "evaluated": evaluated, "exported": exported, "run": run, "base": model_dir}


@pytest.mark.slow
def test_it_trains_padded_and_says_so_once_on_the_card(encoder_run):
    whole = encoder_run["whole"]
    name = {"mpnet": "MPNetModel", "xlm-roberta": "XLMRobertaModel"}[encoder_run["architecture"]]
    assert whole.global_step == STEPS and len(whole.step_losses) == STEPS
    assert whole.padded.startswith(f"padded batches: {name} has no unpadded forward")
    card = (whole.model_dir / "README.md").read_text()
    assert card.count(f"* Trained on padded batches: {name}") == 1
    assert [row.step for row in whole.rows] == [0, 3, 6]


@pytest.mark.slow
def test_it_evaluates_and_the_evaluate_stage_scores_base_and_final(encoder_run):
    evaluated, whole = encoder_run["evaluated"], encoder_run["whole"]
    assert 0.0 < evaluated["base"]["cosine_mrr_at_10"] < evaluated["final"]["cosine_mrr_at_10"] <= 1.0
    assert whole.rows[-1].metrics["cosine_mrr@10"] > whole.rows[0].metrics["cosine_mrr@10"]


@pytest.mark.slow
def test_a_stopped_run_resumes_to_the_same_model(encoder_run):
    whole, resumed = encoder_run["whole"], encoder_run["resumed"]
    assert resumed.step_losses == pytest.approx(whole.step_losses, abs=1e-6)
    assert [r.metrics for r in resumed.rows] == [r.metrics for r in whole.rows]
    assert (resumed.model_dir / "model.safetensors").read_bytes() == (whole.model_dir / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_it_exports_to_onnx_with_parity_and_serves_the_same_vectors(encoder_run):
    from sentence_transformers import SentenceTransformer

    from pairtune.outputs.onnx_encoder import OnnxEncoder

    settings, exported, run = encoder_run["settings"], encoder_run["exported"], encoder_run["run"]
    assert exported["cosine"]["fp32"]["min"] >= 0.9999 and all(exported["passed"].values())
    meta = json.loads((encoder_run["whole"].final_dir.parent / "onnx" / "pairtune_onnx.json").read_text())
    assert meta["input_names"] == ["input_ids", "attention_mask"]  # neither takes token_type_ids
    saved = SentenceTransformer(str(settings.paths.final), device="cpu").encode(TEXTS, normalize_embeddings=True)
    onnx = OnnxEncoder(settings.paths.onnx).encode(TEXTS)
    served = np.asarray(mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model").predict(TEXTS))
    served = served / np.linalg.norm(served, axis=1, keepdims=True)
    assert saved.shape == (3, 64)
    assert np.sum(onnx * saved, axis=1).min() > 0.9999 and np.sum(served * saved, axis=1).min() > 0.9999


@pytest.mark.slow
def test_a_model_without_a_pooling_config_gets_mean_pooling_and_one_notice(encoder_run, caplog):
    from pairtune.model.modeling import load_model

    with caplog.at_level(logging.WARNING, logger="pairtune.model.modeling"):
        model = load_model(str(encoder_run["base"]), max_seq_length=128)
    notices = [r.getMessage() for r in caplog.records if "modules.json" in r.getMessage()]
    assert notices == [f"model {encoder_run['base']}: no sentence-transformers modules.json, so mean pooling over "
                       "its tokens"]
    assert model[1].get_config_dict()["pooling_mode"] == "mean"
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pairtune.model.modeling"):
        load_model(str(encoder_run["settings"].paths.final), max_seq_length=128)  # saved by pairtune: it has one
    assert not [r for r in caplog.records if "modules.json" in r.getMessage()]


@pytest.mark.slow
def test_unpad_true_on_an_encoder_without_an_unpadded_forward_names_the_key(encoder_run, prepared_bundled, tmp_path):
    from pairtune.config import ConfigError
    from pairtune.train.training import train

    settings = settings_for(encoder_run["base"], prepared_bundled, tmp_path, "model.unpad=true")
    with pytest.raises(ConfigError, match="config key 'model.unpad': .* has no unpadded forward"):
        train(settings)
