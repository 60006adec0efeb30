"""Interruption and resume, numerical faults, bad config, concurrency and secrets, for real."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from safetensors.torch import load_file

from .conftest import ROOT

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def train_command(tmp_path: Path, prepared: Path, name: str, *extra: str) -> list[str]:
    return [
        sys.executable, "pipelines/train.py", f"paths.prepared={prepared}", f"paths.model={tmp_path}/{name}",
        f"paths.checkpoints={tmp_path}/ckpt-{name}", f"paths.reports={tmp_path}/reports-{name}",
        "train.epochs=1", "train.eval_on_start=false", f"tracking.uri=sqlite:///{tmp_path}/store.db",
        "tracking.log_model=false", f"tracking.run_name={name}", f"hydra.run.dir={tmp_path}/hydra-{name}",
        "guard.enabled=false", *extra,
    ]


def start(command: list[str], log: Path) -> tuple[subprocess.Popen, Path]:
    """Start a training process in the background, its stderr into ``log``."""
    proc = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=log.open("w"), text=True)
    return proc, log


def logged_steps(tmp_path: Path, name: str) -> list[int]:
    """The steps of ``train_loss`` the run named ``name`` has in the store so far (read while it trains)."""
    store = tmp_path / "store.db"
    if not store.exists():
        return []
    try:
        with sqlite3.connect(store, timeout=5) as db:
            rows = db.execute(
                "select m.step from metrics m join runs r on m.run_uuid = r.run_uuid "
                "where m.key = 'train_loss' and r.name = ?", (name,)).fetchall()
    except sqlite3.OperationalError:  # the schema is still being created
        return []
    return sorted(step for (step,) in rows)


def wait_for_logged_steps(tmp_path: Path, name: str, count: int, proc: subprocess.Popen, log: Path) -> list[int]:
    """Block until the run has logged ``count`` training steps: a signal then lands mid-training."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        steps = logged_steps(tmp_path, name)
        if len(steps) >= count:
            return steps
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.05)
    raise AssertionError(f"no {count} logged steps in time:\n{log.read_text()[-3000:]}")


def run_statuses(tmp_path: Path) -> dict[str, tuple[str, str]]:
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/store.db")
    return {r.info.run_name: (r.info.status, r.info.run_id)
            for r in mlflow.search_runs(experiment_names=["pairtune"], output_format="list")}


@pytest.mark.slow
def test_sigterm_checkpoints_marks_killed_and_resume_equals_uninterrupted(tmp_path, prepared_bundled):
    # Given an uninterrupted 9-step run
    subprocess.run(train_command(tmp_path, prepared_bundled, "whole"), cwd=ROOT, env=ENV, check=True,
                   capture_output=True)
    # When the same run gets a real SIGTERM after its first steps
    proc, log = start(train_command(tmp_path, prepared_bundled, "cut", "tracking.flush_seconds=0.2"), tmp_path / "cut.log")
    wait_for_logged_steps(tmp_path, "cut", 1, proc, log)
    proc.send_signal(signal.SIGTERM)
    rest = log.read_text()
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM, rest[-2000:]
    checkpoints = sorted((tmp_path / "ckpt-cut").glob("step-*"))
    assert len(checkpoints) == 1, rest[-2000:]
    stopped_at = json.loads((checkpoints[0] / "pairtune_state.json").read_text())["state"]["step"]
    assert 0 < stopped_at < 9
    status, run_id = run_statuses(tmp_path)["cut"]
    assert status == "KILLED"
    # Then resuming finishes the same MLflow run with the weights of the uninterrupted run
    subprocess.run(train_command(tmp_path, prepared_bundled, "cut", "train.resume=true"), cwd=ROOT, env=ENV,
                   check=True, capture_output=True)
    assert run_statuses(tmp_path)["cut"] == ("FINISHED", run_id)
    whole, cut = load_file(tmp_path / "whole/model.safetensors"), load_file(tmp_path / "cut/model.safetensors")
    gap = max((whole[k] - cut[k]).abs().max().item() for k in whole)
    print(f"resumed at step {stopped_at}; max weight difference to the uninterrupted run: {gap:.1e}")
    assert gap <= 1e-6
    history = mlflow.MlflowClient().get_metric_history(run_id, "train_loss")
    assert sorted(m.step for m in history) == list(range(1, 10))


def test_resume_with_a_differently_shaped_run_is_refused_before_any_run_opens(tmp_path, prepared_bundled):
    # Given a finished 2-step run that left its checkpoint
    subprocess.run(train_command(tmp_path, prepared_bundled, "shape", "train.max_steps=2"), cwd=ROOT, env=ENV,
                   check=True, capture_output=True)
    runs_before = run_statuses(tmp_path)
    # When it is resumed with another batch size and seed
    done = subprocess.run(
        train_command(tmp_path, prepared_bundled, "shape", "train.max_steps=2", "train.resume=true",
                      "train.batch_size=16", "train.seed=7"),
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300,
    )
    # Then one line names both keys, the exit status is 2 and the store is as it was
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("pairtune: error: ") and "checkpoint is from a different run" in last
    assert "train.batch_size: 32 -> 16" in last and "train.seed: 42 -> 7" in last
    assert run_statuses(tmp_path) == runs_before
    # and train.resume=false starts a new run instead
    subprocess.run(train_command(tmp_path, prepared_bundled, "fresh", "train.max_steps=2", "train.batch_size=16",
                                 f"paths.checkpoints={tmp_path}/ckpt-shape"), cwd=ROOT, env=ENV, check=True,
                   capture_output=True)
    assert run_statuses(tmp_path)["fresh"][0] == "FINISHED"


@pytest.mark.slow
def test_resume_after_sigkill_agrees_with_the_card_and_mlflow(tmp_path, prepared_bundled):
    # Given a 9-step run checkpointing every 2 steps, killed hard (SIGKILL: no handler runs) after step 5
    extra = ("train.checkpoint_every_steps=2", "tracking.flush_seconds=0.2", f"paths.reports={tmp_path}/reports-hard")
    proc, log = start(train_command(tmp_path, prepared_bundled, "hard", *extra), tmp_path / "hard.log")
    wait_for_logged_steps(tmp_path, "hard", 5, proc, log)
    proc.kill()
    proc.wait(timeout=60)
    newest = max(int(p.name.split("-")[1]) for p in (tmp_path / "ckpt-hard").glob("step-*"))
    assert newest in (4, 6, 8), newest  # the newest even step before the kill
    status, run_id = run_statuses(tmp_path)["hard"]
    assert status == "RUNNING"  # nothing could end it
    # When the same command resumes
    subprocess.run(train_command(tmp_path, prepared_bundled, "hard", *extra, "train.resume=true"), cwd=ROOT,
                   env=ENV, check=True, capture_output=True)
    # Then the same run finishes, marked as resumed, and every logged loss equals the card's for its step:
    # replayed steps were logged twice, with the same value (training is deterministic on the CPU)
    assert run_statuses(tmp_path)["hard"] == ("FINISHED", run_id)
    run = mlflow.MlflowClient().get_run(run_id)
    assert run.data.tags["pairtune.resumed_from_step"] == str(newest)
    csv = (tmp_path / "reports-hard/plots/train_loss.csv").read_text().splitlines()[1:]
    card_losses = {int(step): float(loss) for step, loss in (line.split(",") for line in csv)}
    assert sorted(card_losses) == list(range(1, 10))
    history = mlflow.MlflowClient().get_metric_history(run_id, "train_loss")
    assert {m.step for m in history} == set(range(1, 10))
    for metric in history:
        assert metric.value == pytest.approx(card_losses[metric.step], abs=1e-6), metric.step


def test_non_finite_loss_stops_with_the_step_and_a_failed_run(make_settings, prepared_bundled, tmp_path, monkeypatch):
    import torch

    from pairtune.config import to_plain_dict
    from pairtune.tracking import tracked_run
    from pairtune.train import training

    settings = make_settings(f"paths.prepared={prepared_bundled}", "train.max_steps=3", "train.eval_on_start=false",
                             "tracking.enabled=true", f"tracking.uri=sqlite:///{tmp_path}/nan.db",
                             "tracking.experiment=nan")
    calls = {"n": 0}
    real = training.mnrl_loss

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        value = real(*args, **kwargs)
        return value * torch.tensor(float("nan")) if calls["n"] == 2 else value

    monkeypatch.setattr(training, "mnrl_loss", poisoned)
    with pytest.raises(training.NonFiniteLossError, match="at step 2"), tracked_run(settings, config=to_plain_dict(settings)) as obs:
        training.train(settings, observer=obs)
    run = mlflow.search_runs(experiment_names=["nan"], output_format="list")[0]
    assert run.info.status == "FAILED" and "at step 2" in run.data.tags["pairtune.error"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lr=-0.1", "config key 'train.lr': must be > 0"),
        ("train.batch_size=0", "config key 'train.batch_size': must be > 0"),
        ("train.epochs=0", "config key 'train.epochs': must be > 0"),
        ("train.epochs=ten", "config key 'train.epochs'"),
        ("train.learning_rate=1", "Key 'learning_rate' is not in struct"),
        ("paths.prepared=/nonexistent", "/nonexistent: missing train.parquet"),
    ],
)
def test_bad_config_fails_before_work_and_before_any_run(tmp_path, override, message):
    store = tmp_path / "store.db"
    done = subprocess.run([sys.executable, "pipelines/train.py", override, f"tracking.uri=sqlite:///{store}",
                           f"hydra.run.dir={tmp_path}/h"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0
    assert message in done.stderr
    assert not store.exists()


@pytest.mark.parametrize(
    ("script", "overrides", "message"),
    [
        ("train", ["model.name=models/traind"],
         "config key 'model.name': models/traind: no such folder, and no such hub id in the offline cache (HF_HUB_OFFLINE=1)"),
        ("train", ["model.name=./models/traind"], "config key 'model.name': ./models/traind: no such folder"),
        ("train", ["train.resume=true", "paths.checkpoints={tmp}/typo"],
         "config key 'train.resume': no checkpoint to resume in {tmp}/typo (check hydra.run.dir or paths.checkpoints; "
         "train.resume=auto starts a new run when there is none)"),
        ("train", ["train.resume=maybe"], "config key 'train.resume': must be true, false or auto, got 'maybe'"),
        ("evaluate", ["paths.final={tmp}/nomodel"],
         "config key 'paths.final': {tmp}/nomodel: no such folder (train a model first, or point paths.final at one)"),
        ("export", ["paths.final={tmp}"], "config key 'paths.final': {tmp}: not a saved model (no modules.json or config.json)"),
        ("evaluate", ["paths.final={model}", "promotion.source={tmp}/fixed.jsonl"],
         "config key 'promotion.source': {tmp}/fixed.jsonl: file not found"),
        ("mine", ["mining.enabled=true", "model.name=nobody/nothing"],
         "config key 'model.name': nobody/nothing: no such folder, and no such hub id in the offline cache (HF_HUB_OFFLINE=1)"),
    ],
)
def test_a_mistyped_input_is_one_line_before_any_work(tmp_path, prepared_bundled, base_model_session, script,
                                                      overrides, message):
    model = tmp_path / "saved"
    if "{model}" in " ".join(overrides):
        base_model_session.save(str(model))
    store = tmp_path / "store.db"
    fill = {"tmp": tmp_path, "model": model}
    done = subprocess.run(
        [sys.executable, f"pipelines/{script}.py", *(o.format(**fill) for o in overrides),
         f"paths.prepared={prepared_bundled}", f"tracking.uri=sqlite:///{store}", f"hydra.run.dir={tmp_path}/h",
         f"paths.mined={tmp_path}/mined"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == f"pairtune: error: {message.format(**fill)}"
    assert "Traceback" not in done.stderr and not store.exists() and not (tmp_path / "mined").exists()


def test_resume_auto_starts_a_new_run_when_there_is_no_checkpoint_and_continues_one_when_there_is(
    tmp_path, prepared_bundled
):
    command = train_command(tmp_path, prepared_bundled, "auto", "train.max_steps=2", "train.resume=auto",
                            "tracking.flush_seconds=0.2")
    first = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "resumed from" not in first.stderr
    (status, run_id), = run_statuses(tmp_path).values()
    again = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed from" in again.stderr and run_statuses(tmp_path) == {"auto": ("FINISHED", run_id)}


@pytest.mark.slow
def test_four_parallel_sweep_jobs_all_finish_in_one_sqlite_store(tmp_path, prepared_bundled):
    uri = f"sqlite:///{tmp_path}/sweep.db"
    done = subprocess.run(
        [sys.executable, "pipelines/train.py", "-m", "hydra/launcher=parallel", "train.lr=1e-5,2e-5,3e-5,4e-5",
         "train.num_threads=1", "train.max_steps=1", "train.epochs=1", "train.eval_on_start=false",
         "train.save_checkpoints=false", "tracking.log_model=false", f"tracking.uri={uri}",
         f"paths.prepared={prepared_bundled}", f"paths.model={tmp_path}/model", f"paths.reports={tmp_path}/r",
         f"hydra.sweep.dir={tmp_path}/multirun"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "database is locked" not in done.stderr
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["pairtune"], output_format="list")
    children = [r for r in runs if r.data.tags.get("pairtune.stage") == "train"]
    assert len(children) == 4 and all(r.info.status == "FINISHED" for r in children)
    assert len({r.data.tags["mlflow.parentRunId"] for r in children}) == 1


def test_secrets_never_reach_the_store(make_settings, tmp_path, monkeypatch):
    from pairtune.config import to_plain_dict
    from pairtune.tracking import tracked_run

    monkeypatch.setenv("HF_TOKEN", "hf_supersecretvalue123")
    store = tmp_path / "secret.db"
    settings = make_settings("tracking.enabled=true", f"tracking.uri=sqlite:///{store}",
                             "tracking.experiment=secrets", "tracking.run_name=pw")
    config = to_plain_dict(settings)
    config["tracking"]["uri"] = "http://alice:hunter2pass@mlflow.internal:5000"
    config["data"]["api_key"] = "sk-live-abcdef"
    with tracked_run(settings, config=config, overrides=["tracking.uri=http://alice:hunter2pass@host"]):
        pass
    blobs = [store.read_bytes()] + [p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p != store]
    for secret in (b"hunter2pass", b"sk-live-abcdef", b"hf_supersecretvalue123"):
        assert not any(secret in blob for blob in blobs), secret
    with sqlite3.connect(store) as db:
        uris = [row[0] for row in db.execute("select value from params where key = 'tracking.uri'")]
    assert uris == ["http://alice:***@mlflow.internal:5000"]


def test_unreachable_tracking_server_is_reported_fast_before_training(tmp_path, prepared_bundled):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "pipelines/train.py", f"tracking.uri=http://127.0.0.1:{port}",
         f"paths.prepared={prepared_bundled}", f"hydra.run.dir={tmp_path}/h", f"paths.model={tmp_path}/model"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120,
    )
    elapsed = time.monotonic() - started
    assert done.returncode == 2
    assert f"pairtune: error: tracking server http://127.0.0.1:{port} unreachable" in done.stderr
    assert "training" not in done.stderr and not (tmp_path / "model").exists()
    assert elapsed < 60  # interpreter start and imports included; the probe itself gives up after 4 s


def test_transient_logging_errors_are_retried_and_never_lost(make_settings, tmp_path, monkeypatch):
    from pairtune import tracking
    from pairtune.config import to_plain_dict

    settings = make_settings("tracking.enabled=true", f"tracking.uri=sqlite:///{tmp_path}/t.db",
                             "tracking.experiment=flaky", f"paths.reports={tmp_path}/reports",
                             "tracking.flush_seconds=3600")  # only the explicit flushes below write
    real = mlflow.MlflowClient.log_batch
    failures = {"left": 4}

    def flaky(self, *args, **kwargs):
        if failures["left"] > 0:
            failures["left"] -= 1
            raise ConnectionError("server hiccup")
        return real(self, *args, **kwargs)

    def down(self, *args, **kwargs):
        raise ConnectionError("down")

    monkeypatch.setattr(tracking.writer.time, "sleep", lambda seconds: None)
    with tracking.tracked_run(settings, config=to_plain_dict(settings)) as observer:
        monkeypatch.setattr(mlflow.MlflowClient, "log_batch", flaky)
        observer.on_step(1, {"train_loss": 1.5})
        observer.writer.flush()  # 3 failed attempts: kept pending
        observer.on_step(2, {"train_loss": 1.25})
        observer.writer.flush()  # 1 more failure, then both go out in one batch
        assert failures["left"] == 0 and not observer.writer.pending
        monkeypatch.setattr(mlflow.MlflowClient, "log_batch", down)
        observer.on_step(3, {"train_loss": 1.0})  # never gets through: closing the run keeps it on disk
    monkeypatch.setattr(mlflow.MlflowClient, "log_batch", real)
    run = mlflow.search_runs(experiment_names=["flaky"], output_format="list")[0]
    assert run.info.status == "FINISHED"
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "train_loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 1.5), (2, 1.25)]
    saved = [json.loads(line) for line in (tmp_path / "reports/unlogged_metrics.jsonl").read_text().splitlines()]
    assert [(row["step"], row["train_loss"]) for row in saved] == [(3, 1.0)]


def test_metrics_reach_the_store_in_the_background_while_the_run_is_open(make_settings, tmp_path):
    from pairtune import tracking
    from pairtune.config import to_plain_dict

    settings = make_settings("tracking.enabled=true", f"tracking.uri=sqlite:///{tmp_path}/t.db",
                             "tracking.experiment=live", "tracking.flush_seconds=0.2")
    with tracking.tracked_run(settings, config=to_plain_dict(settings)) as observer:
        for step in range(1, 4):
            observer.on_step(step, {"train_loss": 1.0 / step})
        deadline = time.monotonic() + 30
        history = []
        while len(history) < 3 and time.monotonic() < deadline:  # no flush called: the writer thread does it
            time.sleep(0.1)
            history = mlflow.MlflowClient().get_metric_history(observer.run_id, "train_loss")
        assert sorted(m.step for m in history) == [1, 2, 3]
        assert observer.writer.thread.is_alive()
    assert not observer.writer.thread.is_alive()  # closed with the run
