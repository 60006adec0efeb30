"""The model registry: champion/challenger promotion on the promotion set, and serving the champion over HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest

from pairtune.tracking.registry import (
    CHALLENGER,
    CHAMPION,
    PROMOTION_METRIC,
    PROMOTION_TAG,
    Candidate,
    aliases_by_run,
    log_model,
    promote,
)

from .conftest import free_port


@pytest.fixture(scope="module")
def store(tmp_path_factory, base_model_session):
    """A store where one saved model was logged and registered as ``pairtune`` by four runs."""
    folder = tmp_path_factory.mktemp("registry")
    model_dir = folder / "model"
    base_model_session.save(str(model_dir))
    uri = f"sqlite:///{folder}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("registry", artifact_location=(folder / "artifacts").as_uri())
    run_ids = []
    for name in ("first", "worse", "tie", "better", "test-only", "other-data"):
        with mlflow.start_run(experiment_id=experiment, run_name=name) as run:
            log_model(model_dir, "pairtune")
            run_ids.append(run.info.run_id)
    return uri, folder, run_ids


def version_of(alias: str) -> str:
    return mlflow.MlflowClient().get_model_version_by_alias("pairtune", alias).run_id


EVAL_SPLIT = "a" * 64  # the digest of the eval split every run below was scored on, but one


def evaluate(run_id: str, score: float, *, test: float = 0.5, data: str = EVAL_SPLIT) -> str | None:
    """What the evaluate stage does: log the promotion figure into the run, then promote."""
    mlflow.MlflowClient().log_metric(run_id, PROMOTION_METRIC, score)
    candidate = Candidate(score=score, data_sha256=data, data="the eval split (45 pairs)", reported=test)
    return promote("pairtune", run_id, candidate)


def description_of(run_id: str) -> str:
    (version,) = mlflow.MlflowClient().search_model_versions(f"name = 'pairtune' and run_id = '{run_id}'")
    return version.description


@pytest.mark.slow
def test_champion_moves_only_when_beaten_and_ties_keep_the_old_one(store):
    uri, _, (first, worse, tie, better, test_only, other_data) = store
    mlflow.set_tracking_uri(uri)
    # Given no champion yet, the first evaluated version becomes it
    assert evaluate(first, 0.80) == CHAMPION and version_of(CHAMPION) == first
    # When a worse one and an equal one are evaluated, each becomes the challenger; the champion stays
    assert evaluate(worse, 0.70) == CHALLENGER and version_of(CHALLENGER) == worse
    assert evaluate(tie, 0.80) == CHALLENGER and version_of(CHALLENGER) == tie
    assert version_of(CHAMPION) == first
    # Then a better one takes over
    assert evaluate(better, 0.85) == CHAMPION and version_of(CHAMPION) == better
    aliases = aliases_by_run("pairtune")
    assert CHAMPION in aliases[better] and CHALLENGER in aliases[tie]
    # A run that registered nothing promotes nothing
    with mlflow.start_run(experiment_id=mlflow.get_experiment_by_name("registry").experiment_id) as bare:
        pass
    assert promote("pairtune", bare.info.run_id, Candidate(0.99, EVAL_SPLIT, "x")) is None
    assert version_of(CHAMPION) == better
    # A far better test score does not decide: the eval-split figure does, and the description says so
    assert evaluate(test_only, 0.84, test=0.99) == CHALLENGER and version_of(CHAMPION) == better
    described = description_of(test_only)
    assert described.startswith("Decided on MRR@10 on the eval split (45 pairs): challenger: MRR@10 0.8400")
    assert "Held-out test MRR@10 0.9900 (reported, not used to decide)" in described
    # A version scored on other promotion data is not compared at all, and says why
    assert evaluate(other_data, 0.99, data="b" * 64) is None and version_of(CHAMPION) == better
    why = mlflow.MlflowClient().get_run(other_data).data.tags[PROMOTION_TAG]
    assert why.startswith(f"not compared with champion version {mlflow.MlflowClient().get_model_version_by_alias('pairtune', CHAMPION).version}")
    assert "other promotion data (sha256 aaaaaaaaaaaa vs bbbbbbbbbbbb)" in why and "promotion.source" in why
    assert aliases_by_run("pairtune")[other_data] == ["newest"]  # logged last; neither champion nor challenger


def wait_until_up(url: str, server: subprocess.Popen, log: Path, seconds: float = 240) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert server.poll() is None, log.read_text()[-3000:]
        try:
            urllib.request.urlopen(f"{url}/ping", timeout=2)
            return
        except OSError:
            time.sleep(1)
    raise AssertionError("model server did not start:\n" + log.read_text()[-3000:])


@pytest.mark.slow
def test_make_serve_answers_one_vector_per_sentence(store):
    """`make serve`'s command: MLflow's model server for models:/pairtune@champion on 127.0.0.1."""
    uri, folder, _ = store
    mlflow.set_tracking_uri(uri)
    if not mlflow.MlflowClient().get_registered_model("pairtune").aliases.get(CHAMPION):
        evaluate(store[2][0], 0.8)
    port, log = free_port(), folder / "serve.log"
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/pairtune@champion",
               "--host", "127.0.0.1", "--port", str(port), "--env-manager", "local"]
    venv = str(Path(sys.executable).parent)  # the server runs uvicorn from PATH, as `make serve` does
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "HF_HUB_OFFLINE": "1", "PATH": f"{venv}:{os.environ['PATH']}"}
    server = subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_up(url, server, log)
        body = json.dumps({"inputs": ["Ada ? whr sh", "Ada wondered where the ship had gone.", "rain ¬ stop"]})
        request = urllib.request.Request(f"{url}/invocations", data=body.encode(),
                                         headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(request, timeout=60).read())
    finally:
        server.terminate()
        server.wait(timeout=30)
    vectors = answer["predictions"]
    assert len(vectors) == 3 and all(len(vector) == 384 for vector in vectors)
