"""evaluate and export run by hand (outside ``dvc repro``) log into the run that trained the model they score."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from .conftest import ROOT
from .test_reliability import ENV


def stage(script: str, tmp_path: Path, name: str, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, f"pipelines/{script}.py", f"tracking.uri=sqlite:///{tmp_path}/store.db",
               f"hydra.run.dir={tmp_path}/{name}", "guard.enabled=false", *extra]
    done = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def pipeline_outputs() -> dict[str, bytes | None]:
    """The pipeline's own reports and ONNX folder, as a by-hand stage must leave them."""
    files = [ROOT / "reports/metrics.json", ROOT / "reports/export.json", ROOT / "models/onnx/onnx/model.onnx"]
    return {str(f): f.read_bytes() if f.is_file() else None for f in files}


@pytest.mark.slow
def test_by_hand_evaluate_and_export_log_into_the_run_that_trained_the_model(tmp_path, prepared_bundled):
    # Given two command-line training runs (other learning rates: other weights), each in its own folder
    runs = {}
    for name, lr in (("first", "5e-5"), ("second", "1e-4")):
        stage("train", tmp_path, name, f"paths.prepared={prepared_bundled}", "train.max_steps=2",
              "train.eval_on_start=false", f"train.lr={lr}", "tracking.log_model=false", f"tracking.run_name={name}")
        mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/store.db")
        runs[name] = mlflow.search_runs(experiment_names=["pairtune"], filter_string=f"attributes.run_name = '{name}'",
                                        output_format="list")[0].info.run_id
    before = pipeline_outputs()
    model = tmp_path / "first/models/final"
    # When the first run's model is evaluated and exported by hand
    evaluated = stage("evaluate", tmp_path, "eval", f"paths.final={model}", f"paths.prepared={prepared_bundled}")
    exported = stage("export", tmp_path, "export", f"paths.final={model}", f"paths.prepared={prepared_bundled}")
    # Then both say which model and which run, and log into that run, not the other one
    for done in (evaluated, exported):
        assert f"{model}: logging into MLflow run {runs['first']}, which trained it" in done.stderr
    client = mlflow.MlflowClient()
    first, second = client.get_run(runs["first"]).data, client.get_run(runs["second"]).data
    assert "test_final_cosine_mrr_at_10" in first.metrics and "export_cosine_min_fp32" in first.metrics
    assert not any(key.startswith(("test_", "export_")) for key in second.metrics)
    assert first.tags["pairtune.stage.evaluate"] == "done" and first.tags["pairtune.stage.export"] == "done"
    # and their outputs land in their own folders, never in the pipeline's
    assert (tmp_path / "eval/reports/metrics.json").is_file()
    assert (tmp_path / "export/models/onnx/onnx/model.onnx").is_file()
    assert pipeline_outputs() == before


@pytest.mark.slow
def test_a_model_no_run_trained_is_evaluated_into_a_new_run_that_names_it(tmp_path, prepared_bundled):
    # Given a model trained with tracking off
    stage("train", tmp_path, "untracked", f"paths.prepared={prepared_bundled}", "train.max_steps=1",
          "train.eval_on_start=false", "tracking.enabled=false")
    model = tmp_path / "untracked/models/final"
    # When it is evaluated by hand
    done = stage("evaluate", tmp_path, "eval", f"paths.final={model}", f"paths.prepared={prepared_bundled}")
    # Then a new run holds the scores and names the model
    assert f"{model}: no MLflow run trained these weights; logging into a new run" in done.stderr
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/store.db")
    (run,) = mlflow.search_runs(experiment_names=["pairtune"], output_format="list")
    assert run.data.tags["pairtune.evaluate.model"] == str(model) and "test_final_cosine_mrr_at_10" in run.data.metrics
