"""DVC for real, in a temporary git copy of the repository with a shrunk config."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from .conftest import ROOT

BIN = Path(sys.executable).parent
SHRINK = {"epochs: 10 ": "epochs: 1 ", "max_steps: -1 ": "max_steps: 2 "}


def compose_params(config_dir: Path) -> str:
    """params.yaml exactly as `dvc exp run` writes it from conf/ with no overrides."""
    from dvc.utils.hydra import compose_and_dump

    out = config_dir.parent / ".params.check.yaml"
    compose_and_dump(out, str(config_dir), None, "config", str(config_dir.parent / ".dvc"), [])
    text = out.read_text()
    out.unlink()
    return text


def test_committed_params_yaml_is_conf_composed():
    assert (ROOT / "params.yaml").read_text() == compose_params(ROOT / "conf"), "run `make params`"


def run(repo: Path, *args: str, check: bool = True, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """A command in ``repo`` as a user runs it: the venv first on PATH, HOME beside the repositories
    (so the default DVC remote, ``~/.cache/pairtune/dvc-remote``, is this test's own) and the copy's
    ``src`` first on the import path, so its stages run the code its dvc.lock records."""
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1", "HOME": str(repo.parent / "home"),
           "PYTHONPATH": str(repo / "src")}  # the copy's own code, not the editable install's
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(extra_env or {})
    done = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A git copy of the project with 2 training steps; `dvc repro` already run once."""
    copy = tmp_path_factory.mktemp("dvc") / "pairtune"
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.split()
    for name in [*listed, ".dvc/config", ".dvcignore"]:
        if (ROOT / name).is_file() and not name.startswith(("dvc.lock", "mlflow.db")):
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, copy / name)
    train_conf = copy / "conf/train/default.yaml"
    text = train_conf.read_text()
    for old, new in SHRINK.items():
        text = text.replace(old, new)
    train_conf.write_text(text)
    (copy / "conf/tracking/mlflow.yaml").write_text(
        (copy / "conf/tracking/mlflow.yaml").read_text().replace("log_model: true", "log_model: false")
    )
    (copy / "params.yaml").write_text(compose_params(copy / "conf"))
    for command in (["git", "init", "-q"], ["git", "config", "user.name", "t"], ["git", "config", "user.email", "t@t"],
                    ["git", "add", "-A"],
                    ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"]):
        run(copy, *command)
    run(copy, "dvc", "repro")
    commit_all(copy, "repro")
    return copy


def commit_all(repo: Path, message: str) -> None:
    run(repo, "git", "add", "-A")
    run(repo, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message)


def stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '(\w+)'", output))


def runs(repo: Path) -> list:
    mlflow.set_tracking_uri(f"sqlite:///{repo}/mlflow.db")
    return mlflow.search_runs(experiment_names=["pairtune"], output_format="list",
                              order_by=["attributes.start_time ASC"])


@pytest.mark.slow
def test_repro_produces_every_output_and_one_run(repo):
    for path in ("data/prepared/train.parquet", "models/trained/README.md", "models/final/README.md",
                 "reports/guard.json", "reports/metrics.json",
                 "models/onnx/onnx/model.onnx", "models/onnx/onnx/model_qint8_avx2.onnx", "reports/export.json",
                 "reports/plots/train_loss.csv", "dvc.lock"):
        assert (repo / path).is_file(), path
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    assert set(metrics) == {"base", "final", "test_rows", "promotion", "general"} and metrics["test_rows"] == 62
    guard = json.loads((repo / "reports/guard.json").read_text())
    assert metrics["general"]["change_cosine_mrr_at_10"] >= -guard["max_drop"]
    export = json.loads((repo / "reports/export.json").read_text())
    assert export["cosine"]["fp32"]["min"] >= 0.9999 and export["cosine"]["int8"]["min"] >= 0.99
    (only,) = runs(repo)
    assert only.info.status == "FINISHED"
    assert "train_loss" in only.data.metrics and "test_final_cosine_mrr_at_10" in only.data.metrics
    assert {"general_cosine_mrr_at_10", "final_general_cosine_mrr_at_10", "guard_chosen_a"} <= set(only.data.metrics)
    assert "export_cosine_min_int8" in only.data.metrics
    lineage = json.loads((repo / "reports/lineage.json").read_text())
    assert lineage["mlflow_run_id"] == only.info.run_id and lineage["dvc_experiment"] is None
    assert not (repo / "models/trained/pairtune_run.json").exists()
    assert "throughput" not in export and "throughput" in json.loads((repo / "reports/export_speed.json").read_text())
    shown = run(repo, "dvc", "metrics", "show", "--json").stdout
    assert "final" in shown and "cosine_mrr_at_10" in shown


@pytest.mark.slow
def test_second_repro_reruns_nothing_and_starts_no_run(repo):
    before = len(runs(repo))
    out = run(repo, "dvc", "repro").stdout
    assert "Running stage" not in out, out
    assert "up to date" in run(repo, "dvc", "status").stdout
    assert len(runs(repo)) == before


@pytest.mark.slow
def test_forced_repro_gives_byte_identical_metrics(repo):
    first = (repo / "reports/metrics.json").read_bytes()
    run(repo, "dvc", "repro", "-f", "evaluate")
    assert (repo / "reports/metrics.json").read_bytes() == first


@pytest.mark.slow
def test_a_fresh_clone_on_another_cpu_reproduces_everything_and_leaves_git_clean(repo):
    """What a user sees after `git clone` and `make run` on another CPU: every stage reruns, nothing in git
    changes. "Another CPU" is this one made to look like an Intel AVX2 machine running one thread
    (tests/test_numerics.py): the stages' reproducible numerics must not care."""
    from .test_numerics import capped_environment

    clone = repo.parent / "fresh"
    run(repo.parent, "git", "clone", "-q", str(repo), str(clone))
    out = run(clone, "dvc", "repro", extra_env=capped_environment()).stdout
    # every stage whose outputs a clone lacks reruns; evaluate's only output is a metrics file in git, and
    # its deps (the retrained model included) come out identical, so DVC rightly finds it up to date
    assert {"prepare", "train", "export"} <= stages_run(out), out
    changed = run(clone, "git", "status", "--porcelain").stdout
    assert changed == "", changed + run(clone, "git", "diff").stdout[-4000:]  # dvc.lock, metrics, plots: identical
    assert "up to date" in run(clone, "dvc", "status").stdout


@pytest.mark.slow
def test_a_pushed_pipeline_is_pulled_by_a_fresh_clone_without_training(repo):
    run(repo, "dvc", "push")
    assert (repo.parent / "home/.cache/pairtune/dvc-remote").is_dir()  # the default remote of .dvc/config
    clone = repo.parent / "pulled"
    run(repo.parent, "git", "clone", "-q", str(repo), str(clone))
    run(clone, "dvc", "pull")
    for path in ("data/prepared/train.parquet", "models/trained/model.safetensors", "models/onnx/onnx/model.onnx",
                 "models/onnx/onnx/model_qint8_avx2.onnx"):
        assert (clone / path).is_file(), path
    assert "up to date" in run(clone, "dvc", "status").stdout
    out = run(clone, "dvc", "repro").stdout
    assert stages_run(out) == set(), out
    assert not (clone / "mlflow.db").exists()  # no stage ran, so no run was opened


@pytest.mark.slow
def test_touching_code_only_train_runs_reruns_train_not_prepare(repo):
    unpad = repo / "src/pairtune/model/unpad.py"
    original = unpad.read_text()
    unpad.write_text(original + "\n# a comment: the code changed, what it computes did not\n")
    try:
        status = run(repo, "dvc", "status").stdout
        assert "train:" in status and "prepare:" not in status, status
        out = run(repo, "dvc", "repro").stdout
        # train reruns; its model is byte-identical, so evaluate and export are rightly up to date
        assert "train" in stages_run(out) and "prepare" not in stages_run(out), out
        assert "up to date" in run(repo, "dvc", "status").stdout
    finally:
        unpad.write_text(original)
        run(repo, "git", "checkout", "HEAD", "--", "dvc.lock")  # dvc repro staged it (core.autostage)
    assert run(repo, "git", "status", "--porcelain").stdout == ""


@pytest.mark.slow
def test_a_command_line_run_is_an_experiment_not_a_pipeline_edit(repo):
    before = {p: (repo / p).read_bytes() for p in ("models/trained/model.safetensors", "reports/plots/train_loss.csv")}
    run(repo, "python", "pipelines/train.py", "experiment=smoke", "tracking.enabled=false")
    (model,) = (repo / "outputs").glob("*/*/models/trained/model.safetensors")  # outputs/<date>/<time>/...
    assert (model.parents[2] / "reports/plots/train_loss.csv").is_file()
    assert {p: (repo / p).read_bytes() for p in before} == before
    assert "up to date" in run(repo, "dvc", "status").stdout
    assert run(repo, "git", "status", "--porcelain").stdout == ""


@pytest.mark.slow
def test_exp_run_changes_params_and_reruns_only_downstream(repo):
    out = run(repo, "dvc", "exp", "run", "-S", "train.lr=1e-4", "-n", "fast-lr").stdout
    assert stages_run(out) == {"train", "evaluate", "export"}, out
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["train"]["lr"] == 1e-4
    last = runs(repo)[-1]
    assert last.data.params["train.lr"] == "0.0001" and last.data.tags.get("dvc.experiment") == "fast-lr"
    assert last.data.tags.get("dvc.baseline_rev") == run(repo, "git", "rev-parse", "HEAD").stdout.strip()
    table = run(repo, "dvc", "exp", "show", "--json").stdout
    assert "fast-lr" in table and last.info.run_id in table  # the experiment lists its MLflow run


@pytest.mark.slow
def test_mining_on_is_one_exp_run_that_reruns_mine_and_downstream_only(repo):
    # Given the pipeline with mining off (the mine stage a plain copy), When a user turns it on for one experiment
    out = run(repo, "dvc", "exp", "run", "-S", "mining.enabled=true", "-n", "mined").stdout
    # Then prepare is untouched, and train learns from the mined column the mine stage wrote
    assert stages_run(out) == {"mine", "train", "evaluate", "export"}, out
    record = json.loads((repo / "data/mined/mining.json").read_text())
    assert record["enabled"] is True and record["negative_column"] == "negative" and record["mined"] > 0
    last = runs(repo)[-1]
    assert last.data.params["data.negative_column"] == "negative" and last.data.params["mining.enabled"] == "True"
    assert last.data.params["paths.prepared"] == "data/mined" and last.data.tags.get("dvc.experiment") == "mined"
