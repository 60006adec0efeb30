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


def run(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
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
    for command in (["git", "init", "-q"], ["git", "add", "-A"],
                    ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"]):
        run(copy, *command)
    run(copy, "dvc", "repro")
    return copy


def runs(repo: Path) -> list:
    mlflow.set_tracking_uri(f"sqlite:///{repo}/mlflow.db")
    return mlflow.search_runs(experiment_names=["pairtune"], output_format="list",
                              order_by=["attributes.start_time ASC"])


@pytest.mark.slow
def test_repro_produces_every_output_and_one_run(repo):
    for path in ("data/prepared/train.parquet", "models/trained/README.md", "reports/metrics.json",
                 "models/onnx/onnx/model.onnx", "models/onnx/onnx/model_qint8_avx2.onnx", "reports/export.json",
                 "reports/plots/train_loss.csv", "dvc.lock"):
        assert (repo / path).is_file(), path
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    assert set(metrics) == {"base", "trained", "test_rows"} and metrics["test_rows"] == 62
    export = json.loads((repo / "reports/export.json").read_text())
    assert export["cosine"]["fp32"]["min"] >= 0.9999 and export["cosine"]["int8"]["min"] >= 0.99
    (only,) = runs(repo)
    assert only.info.status == "FINISHED"
    assert "train_loss" in only.data.metrics and "test_trained_cosine_mrr_at_10" in only.data.metrics
    assert "export_cosine_min_int8" in only.data.metrics
    assert json.loads((repo / "models/trained/pairtune_run.json").read_text())["mlflow_run_id"] == only.info.run_id
    shown = run(repo, "dvc", "metrics", "show", "--json").stdout
    assert "trained" in shown and "cosine_mrr_at_10" in shown


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
def test_exp_run_changes_params_and_reruns_only_downstream(repo):
    out = run(repo, "dvc", "exp", "run", "-S", "train.lr=1e-4", "-n", "fast-lr").stdout
    ran = set(re.findall(r"Running stage '(\w+)'", out))
    assert ran == {"train", "evaluate", "export"}, out
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["train"]["lr"] == 1e-4
    last = runs(repo)[-1]
    assert last.data.params["train.lr"] == "0.0001" and last.data.tags.get("dvc.experiment") == "fast-lr"
    table = run(repo, "dvc", "exp", "show", "--json").stdout
    assert "fast-lr" in table
