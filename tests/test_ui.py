"""The MLflow UI and the comparison notebook over runs that pairtune's own training logged.

The browser test drives headless Chromium (Debian's chromium, Python Playwright; ``make browser``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import mlflow
import nbformat
import pytest
from nbclient import NotebookClient

from pairtune.core import OBJECTIVE

from .conftest import BUNDLED, ROOT, compose_config, free_port

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
EXPERIMENT = "ui-check"
LEARNING_RATES = {"lr-small": "1e-5", "lr-large": "5e-5"}  # run name -> train.lr


@dataclass
class Store:
    """A SQLite store holding the two training runs, and what they logged."""

    uri: str
    experiment_id: str
    runs: dict[str, mlflow.entities.Run]  # by run name


def train_tracked(folder: Path, prepared: Path, uri: str, name: str, lr: str) -> None:
    """One real one-step training run, tracked as ``pipelines/train.py`` tracks it."""
    from pairtune.config import load_settings, to_plain_dict
    from pairtune.tracking import tracked_run
    from pairtune.train.training import train

    overrides = [f"train.lr={lr}", f"tracking.run_name={name}", f"tracking.experiment={EXPERIMENT}"]
    tiny = ["train.max_steps=1", "train.epochs=1", "train.eval_on_start=true", "train.save_checkpoints=false",
            "guard.enabled=false"]
    paths = [f"paths.{key}={folder}/{name}/{key}" for key in ("model", "final", "checkpoints", "reports")]
    inputs = [f"paths.prepared={prepared}", f"data.source={BUNDLED}"]
    store = [f"tracking.uri={uri}", "tracking.log_model=false"]
    settings = load_settings(compose_config([*inputs, *paths, *tiny, *store, *overrides]))
    with tracked_run(settings, config=to_plain_dict(settings), overrides=overrides) as observer:
        train(settings, observer=observer)


@pytest.fixture(scope="module")
def trained_store(tmp_path_factory, prepared_bundled) -> Store:
    """Two tiny training runs that differ only in their learning rate, logged by pairtune's tracker."""
    folder = tmp_path_factory.mktemp("ui")
    uri = f"sqlite:///{folder}/ui.db"
    for name, lr in LEARNING_RATES.items():
        train_tracked(folder, prepared_bundled, uri, name, lr)
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=[EXPERIMENT], output_format="list")
    assert sorted(run.info.run_name for run in runs) == sorted(LEARNING_RATES)
    assert all(run.info.status == "FINISHED" and OBJECTIVE in run.data.metrics for run in runs)
    return Store(uri, runs[0].info.experiment_id, {run.info.run_name: run for run in runs})


@pytest.fixture
def mlflow_server(trained_store, tmp_path):
    """``mlflow server`` over the trained store on a free local port; its URL."""
    port = free_port()
    serve = ["mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    server = subprocess.Popen(
        [sys.executable, "-m", *serve, "--backend-store-uri", trained_store.uri],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "server.log").open("w"),
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    else:
        server.terminate()
        pytest.fail("mlflow server did not start: " + (tmp_path / "server.log").read_text()[-2000:])
    yield url
    server.terminate()
    server.wait(timeout=20)


def ui_metric(value: float) -> str:
    """A metric value as the runs table prints it: JavaScript's ``String(number)``, the shortest round trip.

    That is Python's ``repr`` for the magnitudes both write in fixed notation, without ``.0`` on whole numbers.
    """
    assert value == 0 or 1e-4 <= abs(value) < 1e16, value  # exponent notation differs between the two
    return repr(float(value)).removesuffix(".0")


def test_ui_metric_matches_how_javascript_prints_numbers():
    assert [ui_metric(v) for v in (0.86, 0.7330158730158729, 1e-4, 1.0, 0.0)] == [
        "0.86",
        "0.7330158730158729",
        "0.0001",
        "1",
        "0",
    ]


@pytest.mark.browser
@pytest.mark.slow
def test_experiment_page_and_compare_view_show_the_trained_runs(trained_store, mlflow_server, tmp_path):
    from playwright.sync_api import sync_playwright

    url, experiment = mlflow_server, trained_store.experiment_id
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is required (make browser installs it)"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 3200, "height": 1000})
        page.goto(f"{url}/#/experiments/{experiment}/runs")
        for name in LEARNING_RATES:
            page.get_by_text(name, exact=True).first.wait_for(timeout=60_000)
        # MLflow 3 hides metric columns until chosen in "Columns": choose the objective, as a user would
        page.get_by_role("button", name="Columns").click()
        page.get_by_text(OBJECTIVE, exact=True).first.click()
        page.keyboard.press("Escape")
        for run in trained_store.runs.values():
            shown = ui_metric(
                run.data.metrics[OBJECTIVE]
            )  # the value this run logged, as the table prints it
            page.get_by_text(shown, exact=True).first.wait_for(timeout=30_000)
        page.screenshot(path=str(tmp_path / "runs.png"), full_page=True)
        ids = "%5B" + "%2C".join(f"%22{run.info.run_id}%22" for run in trained_store.runs.values()) + "%5D"
        page.goto(f"{url}/#/compare-runs?runs={ids}&experiments=%5B%22{experiment}%22%5D")
        page.get_by_text("train.lr").first.wait_for(timeout=60_000)
        for run in trained_store.runs.values():
            page.get_by_text(run.data.params["train.lr"], exact=True).first.wait_for(timeout=30_000)
        page.screenshot(path=str(tmp_path / "compare.png"), full_page=True)
        browser.close()
    assert sorted(run.data.params["train.lr"] for run in trained_store.runs.values()) == ["1e-05", "5e-05"]
    assert all((tmp_path / shot).stat().st_size > 10_000 for shot in ("runs.png", "compare.png"))


@pytest.mark.slow
def test_compare_notebook_executes_against_the_trained_store(trained_store, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained_store.uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
    notebook = nbformat.read(ROOT / "notebooks" / "compare_runs.ipynb", as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not cell.get("outputs") for cell in code), "strip outputs"
    where = {"metadata": {"path": str(tmp_path)}}
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources=where).execute()
    printed = "".join(o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", []))
    assert all(name in printed for name in LEARNING_RATES) and "2 runs plotted" in printed
    assert os.environ["MLFLOW_TRACKING_URI"] == trained_store.uri
