"""The MLflow seam: what a tracked run logs, how it ends, sweeps, and that importing it stays light."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from pairtune.config import to_plain_dict
from pairtune.core import OBJECTIVE, NullObserver
from pairtune.tracking import PARAM_VALUE_LIMIT, flatten, redact, split_params, tracked_run
from pairtune.train.training import train

from .conftest import ROOT


def test_flatten_makes_dotted_keys_and_hides_secrets():
    tree = {
        "train": {"lr": 5e-5, "nested": {"x": 1}},
        "api_token": "abc",
        "uri": "postgresql://u:hunter2@db/x",
    }
    assert flatten(tree) == {
        "train.lr": 5e-5,
        "train.nested.x": 1,
        "api_token": "***",
        "uri": "postgresql://u:***@db/x",
    }
    assert redact("http://alice:s3cret@host:5000") == "http://alice:***@host:5000"


def test_values_over_the_limit_go_to_the_overflow_artifact():
    fits, overflow = split_params({"short": 1, "long": "x" * (PARAM_VALUE_LIMIT + 1), "none": None})
    assert fits["short"] == "1" and fits["none"] == "None"
    assert fits["long"].startswith("<too long") and overflow == {"long": "x" * (PARAM_VALUE_LIMIT + 1)}


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, prepared_bundled):
    """One real 2-step tracked training run in a fresh SQLite store."""
    from pairtune.config import load_settings

    from .conftest import BUNDLED, compose_config

    folder = tmp_path_factory.mktemp("tracked")
    uri = f"sqlite:///{folder}/mlflow.db"
    settings = load_settings(
        compose_config(
            [
                f"paths.prepared={prepared_bundled}",
                f"paths.model={folder}/model",
                f"paths.checkpoints={folder}/ckpt",
                f"paths.reports={folder}/reports",
                f"paths.final={folder}/final",
                f"data.source={BUNDLED}",
                "guard.enabled=false",
                "train.max_steps=2",
                "train.epochs=1",
                f"tracking.uri={uri}",
                "tracking.experiment=tests",
                "train.save_checkpoints=false",
            ]
        )
    )
    with tracked_run(settings, config=to_plain_dict(settings), overrides=["train.max_steps=2"]) as observer:
        result = train(settings, observer=observer)
    mlflow.set_tracking_uri(uri)
    run = mlflow.search_runs(experiment_names=["tests"], output_format="list")[0]
    return uri, run, result, settings


@pytest.mark.slow
def test_run_logs_params_metrics_tags_and_inputs(tracked):
    uri, run, result, _ = tracked
    assert run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == "5e-05" and run.data.params["loss.scale"] == "20.0"
    assert run.data.params["run.world_size"] == "1" and run.data.params["run.steps_per_epoch"] == "9"
    assert run.data.tags["pairtune.overrides"] == "train.max_steps=2"
    assert len(run.data.tags["git.commit"]) in (4, 40) and run.data.tags["git.dirty"] in ("true", "false")
    client = mlflow.MlflowClient()
    losses = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in losses] == [1, 2]
    assert [m.value for m in losses] == pytest.approx(result.step_losses)
    for name in ("learning_rate", "grad_norm", "pairs_per_second"):
        assert len(client.get_metric_history(run.info.run_id, name)) == 2
    mrr = client.get_metric_history(run.info.run_id, "eval_cosine_mrr_at_10")
    assert [m.step for m in mrr] == [0, 2]
    contexts = sorted(i.tags[0].value for i in run.inputs.dataset_inputs)
    assert contexts == ["evaluation", "training"]
    assert all(i.dataset.digest for i in run.inputs.dataset_inputs)


@pytest.mark.slow
def test_run_logs_table_card_config_plots_and_model(tracked, tmp_path):
    uri, run, result, settings = tracked
    table = mlflow.MlflowClient().load_table(
        run.info.experiment_id, "training_logs.json", run_ids=[run.info.run_id]
    )
    assert table["Step"].tolist() == [0, 2]
    assert table["Training Loss"].isna().tolist() == [True, False]
    files = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"README.md", "config.yaml", "training_logs.md", "training_logs.json", "plots"} <= files
    plots = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "plots")}
    assert plots == {"plots/loss_curve.png", "plots/eval_metrics.png"}
    model = mlflow.pyfunc.load_model("models:/pairtune@newest")
    embedding = model.predict(["Ada see sh"])
    assert embedding.shape == (1, 384)
    lineage = json.loads((Path(settings.paths.reports) / "lineage.json").read_text())
    # evaluate and export read the final model (with the guard off, the trained model copied as it is)
    assert lineage["mlflow_run_id"] == run.info.run_id and lineage["model_dir"] == str(result.final_dir)
    assert result.final_dir == Path(settings.paths.final) and (result.final_dir / "model.safetensors").exists()
    for folder in (result.model_dir, result.final_dir):
        assert not (folder / "pairtune_run.json").exists()  # no run id in a model folder


def _status_after(settings, error: BaseException) -> mlflow.entities.Run:
    with pytest.raises(type(error)), tracked_run(settings, config=to_plain_dict(settings)):
        raise error
    return mlflow.search_runs(
        experiment_names=[settings.tracking.experiment],
        output_format="list",
        order_by=["attributes.start_time DESC"],
    )[0]


def test_failed_and_killed_runs_are_marked(make_settings, tmp_path):
    settings = make_settings(
        "tracking.enabled=true", f"tracking.uri=sqlite:///{tmp_path}/s.db", "tracking.experiment=statuses"
    )
    failed = _status_after(settings, RuntimeError("boom"))
    assert failed.info.status == "FAILED" and failed.data.tags["pairtune.error"] == "RuntimeError: boom"
    killed = _status_after(settings, KeyboardInterrupt())
    assert killed.info.status == "KILLED"


def test_tracking_off_touches_no_store(make_settings, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = make_settings("tracking.enabled=false", f"tracking.uri=sqlite:///{tmp_path}/off.db")
    with tracked_run(settings, config={}) as observer:
        observer.on_step(1, {"train_loss": 1.0})
    assert isinstance(observer, NullObserver)
    assert not (tmp_path / "off.db").exists() and not (tmp_path / "mlflow.db").exists()


def run_sweep(folder: Path, uri: str) -> None:
    """``pipelines/train.py -m`` over two learning rates, one step each, on freshly prepared data."""
    prepared = f"paths.prepared={folder}/prepared"
    subprocess.run([sys.executable, "pipelines/prepare.py", prepared], cwd=ROOT, check=True)
    sweep = ["-m", "train.lr=1e-5,3e-5", "experiment=smoke", "train.max_steps=1", "train.eval_on_start=false",
             "guard.enabled=false"]
    outputs = [
        f"paths.model={folder}/model",
        f"paths.reports={folder}/reports",
        f"hydra.sweep.dir={folder}/multirun",
    ]
    tracking = ["tracking.log_model=false", f"tracking.uri={uri}", "tracking.experiment=sweep"]
    command = [sys.executable, "pipelines/train.py", *sweep, prepared, *outputs, *tracking]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_multirun_makes_one_parent_and_a_child_per_job(tmp_path):
    uri = f"sqlite:///{tmp_path}/sweep.db"
    run_sweep(tmp_path, uri)
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["sweep"], output_format="list")
    parents = [r for r in runs if r.data.tags.get("pairtune.stage") == "sweep"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent_id = parents[0].info.run_id
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]
    assert sorted(c.data.params["train.lr"] for c in children) == ["1e-05", "3e-05"]
    assert parents[0].data.tags["pairtune.best_child_run_id"] in {c.info.run_id for c in children}
    assert (
        f"best_{OBJECTIVE}" in parents[0].data.metrics
    )  # the callback's default objective, from pairtune.core
    table = mlflow.MlflowClient().load_table(
        parents[0].info.experiment_id, "sweep_children.json", run_ids=[parent_id]
    )
    assert len(table) == 2
    command = [
        "-m",
        "pairtune.cli",
        "runs",
        "--tracking-uri",
        uri,
        "--experiment",
        "sweep",
        "--parent",
        parent_id,
    ]
    listing = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True)
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert lines[0].split()[:3] == ["run", "status", "train.lr"] and OBJECTIVE in lines[0]
    assert len(lines) == 4 and all("FINISHED" in line for line in lines[2:])


def test_queued_dvc_experiments_track_into_the_repository(tmp_path):
    from pairtune.tracking import project_root

    repo = tmp_path / "repo"
    (repo / "conf").mkdir(parents=True)
    (repo / "dvc.yaml").write_text("stages: {}\n")
    copy = repo / ".dvc/tmp/exps/tmpabc123"
    (copy / "conf").mkdir(parents=True)
    (copy / "dvc.yaml").write_text("stages: {}\n")
    assert project_root(copy) == repo and project_root(repo / "conf") == repo


HEAVY = {"torch", "transformers", "sentence_transformers", "accelerate", "mlflow"}


def imported_packages(*args: str, returncode: int = 0) -> set[str]:
    """Top-level packages a fresh ``python -X importtime <args>`` imports, read from its stderr report."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == returncode, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("import time:")]
    modules = [line.rsplit("|", 1)[1].strip() for line in lines[1:]]  # lines[0] is the column header
    assert "pairtune" in modules and len(modules) > 50, done.stderr[-3000:]
    return {module.split(".")[0] for module in modules}


def test_importing_the_tracking_seam_loads_no_heavy_stack():
    loaded = imported_packages("-c", "import pairtune.tracking, pairtune.tracking.sweep, pairtune.cli")
    assert loaded & HEAVY == set()


def test_cli_help_imports_neither_torch_nor_mlflow():
    assert imported_packages("-m", "pairtune.cli", "--help") & {"torch", "mlflow"} == set()


def test_runs_command_imports_mlflow_but_not_the_training_stack(tmp_path):
    loaded = imported_packages(
        "-m", "pairtune.cli", "runs", "--tracking-uri", f"sqlite:///{tmp_path}/empty.db", returncode=1
    )
    assert "mlflow" in loaded and loaded & HEAVY == {"mlflow"}


def test_sweep_callback_in_the_config_optimises_the_objective():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from pairtune.tracking.sweep import SweepCallback

    callback = instantiate(OmegaConf.load(ROOT / "conf" / "config.yaml").hydra.callbacks.mlflow_sweep)
    assert isinstance(callback, SweepCallback) and callback.objective == OBJECTIVE == "eval_cosine_mrr_at_10"


def test_the_keep_command_reruns_only_the_keys_that_shape_a_run():
    from pairtune.tracking.sweep import keep_command

    overrides = "hparams_search=tune train.lr=0.000123 train.epochs=8 train.num_threads=1 tracking.log_model=false"
    assert keep_command(overrides) == ".venv/bin/dvc exp run -S 'train.lr=0.000123' -S 'train.epochs=8'"


@pytest.mark.slow
def test_make_tune_sweeps_lr_and_epochs_and_prints_the_dvc_command_of_the_best(tmp_path, prepared_bundled):
    # Given the tune search, shrunk to 2 trials of 2 steps
    done = subprocess.run(
        [sys.executable, "pipelines/train.py", "hparams_search=tune", "hydra.sweeper.n_trials=2", "guard.enabled=false",
         "hydra.sweeper.sampler.n_startup_trials=2", "train.max_steps=2", "train.save_checkpoints=false",
         "tracking.log_model=false", f"tracking.uri=sqlite:///{tmp_path}/tune.db", f"paths.prepared={prepared_bundled}",
         f"hydra.sweep.dir={tmp_path}/multirun"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # Then each trial chose a learning rate and a number of epochs, and the best one's keep command is printed
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/tune.db")
    runs = mlflow.search_runs(experiment_names=["pairtune"], output_format="list")
    (parent,) = [r for r in runs if r.data.tags.get("pairtune.stage") == "sweep"]
    best = mlflow.MlflowClient().get_run(parent.data.tags["pairtune.best_child_run_id"])
    lr, epochs = best.data.params["train.lr"], best.data.params["train.epochs"]
    command = parent.data.tags["pairtune.keep_command"]
    assert command.startswith(".venv/bin/dvc exp run -S ") and f"make it the pipeline's with:\n  {command}" in done.stdout
    # the choice, and the command line's own keys that shape a run; nothing of Hydra, tracking or paths
    assert sorted(command.split(" -S ")[1:]) == sorted([f"'train.lr={lr}'", f"'train.epochs={epochs}'", "'train.max_steps=2'"])
    assert 2e-5 <= float(lr) <= 4e-4 and 4 <= int(epochs) <= 20


def test_stage_reporter_logs_one_bar_chart_per_metric_and_closes_them(make_settings, tmp_path):
    import matplotlib.pyplot as plt

    from pairtune.tracking.run import MlflowStageReporter

    settings = make_settings(
        "tracking.enabled=true", f"tracking.uri=sqlite:///{tmp_path}/plots.db", "tracking.experiment=plots"
    )
    report = {"base": {"mrr": 0.5, "ndcg": 0.6}, "trained": {"mrr": 0.7, "ndcg": 0.8}}
    with tracked_run(settings, config={}) as observer:
        MlflowStageReporter(observer.run_id, None).log_comparison_plots(report, "plots/test")
    assert plt.get_fignums() == []
    plots = {a.path for a in mlflow.MlflowClient().list_artifacts(observer.run_id, "plots/test")}
    assert plots == {"plots/test/mrr.png", "plots/test/ndcg.png"}


def test_runs_table_shows_the_dvc_experiment_column_only_when_a_run_has_one():
    from pairtune.core import OBJECTIVE
    from pairtune.tracking.runs import RunRow, format_table

    plain = RunRow("a", "run-a", "FINISHED", {"train.lr": "1e-05"}, {OBJECTIVE: 0.8})
    exp = RunRow("b", "run-b", "FINISHED", {"train.lr": "5e-05"}, {OBJECTIVE: 0.9}, experiment="fast-lr")
    with_exp = format_table([exp, plain], sort_metric=OBJECTIVE).splitlines()
    assert with_exp[0].split()[:4] == ["run", "status", "dvc", "experiment"]
    assert "fast-lr" in with_exp[2] and with_exp[3].split()[2] == "-"
    assert "experiment" not in format_table([plain], sort_metric=OBJECTIVE).splitlines()[0]
    served = RunRow("c", "run-c", "FINISHED", {}, {OBJECTIVE: 0.7}, aliases=["champion", "newest"])
    lines = format_table([served, plain], sort_metric=OBJECTIVE).splitlines()
    assert lines[0].split()[:3] == ["run", "status", "aliases"] and "champion,newest" in lines[2]


@pytest.mark.parametrize(
    ("lineage", "source_type"),
    [
        ({"kind": "file", "id": "data/raw/pairs.jsonl"}, "local"),
        ({"kind": "hub", "id": "org/pairs", "revision": "v1", "subset": "pair", "split": "train"}, "hugging_face"),
        ({"kind": "save_to_disk", "id": "saved", "split": "train"}, "hugging_face"),
    ],
)
def test_datasets_are_logged_as_the_mlflow_type_of_their_source(lineage, source_type, prepared_bundled, tmp_path):
    import shutil

    from pairtune.tracking.run import log_datasets

    # Given prepared splits whose stats.json records where they came from
    folder = tmp_path / "prepared"
    shutil.copytree(prepared_bundled, folder)
    stats = json.loads((folder / "stats.json").read_text())
    (folder / "stats.json").write_text(json.dumps({**stats, "lineage": lineage}))
    settings = type("S", (), {"paths": type("P", (), {"prepared": str(folder)})()})()
    # When they are logged into a run
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = mlflow.create_experiment("datasets")  # this store's own: an earlier test may have set another
    with mlflow.start_run(experiment_id=experiment) as run:
        log_datasets(settings)
    inputs = mlflow.get_run(run.info.run_id).inputs.dataset_inputs
    # Then both splits carry the source's type, and a hub source names its id, subset, split and revision
    assert sorted(i.dataset.name for i in inputs) == ["pairs-eval", "pairs-train"]
    assert {i.dataset.source_type for i in inputs} == {source_type}
    if lineage["kind"] == "hub":
        source = json.loads(inputs[0].dataset.source)
        assert (source["path"], source["config_name"], source["split"], source["revision"]) == (
            "org/pairs", "pair", "train", "v1")


class _RacedStore:
    """``mlflow`` as a sweep job sees it when a parallel job inserts the same dataset row first."""

    exceptions = mlflow.exceptions

    def __init__(self, error: str) -> None:
        self.error, self.calls = error, []

    def log_input(self, dataset, context):
        self.calls.append((dataset, context))
        if len(self.calls) == 1:
            raise mlflow.exceptions.MlflowException(self.error)


def test_a_dataset_a_parallel_job_logged_first_is_linked_on_a_second_try():
    from pairtune.tracking.run import log_input

    dataset = type("Dataset", (), {"name": "pairs-train"})()
    raced = _RacedStore("(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, datasets.name")
    log_input(raced, dataset, "training")
    assert raced.calls == [(dataset, "training")] * 2
    # Any other store error is not retried
    broken = _RacedStore("(sqlite3.OperationalError) database is locked")
    with pytest.raises(mlflow.exceptions.MlflowException, match="database is locked"):
        log_input(broken, dataset, "training")
    assert len(broken.calls) == 1
