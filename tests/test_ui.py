"""The MLflow UI over pairtune runs, in headless Chromium (Debian's chromium, Python Playwright)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import nbformat
import pytest
from nbclient import NotebookClient

from .conftest import ROOT

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def make_store(folder: Path) -> tuple[str, str, list[str]]:
    """A SQLite store with two finished runs that differ in their learning rate."""
    uri = f"sqlite:///{folder}/ui.db"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("ui-check", artifact_location=(folder / "artifacts").as_uri())
    names = []
    for name, lr, mrr in (("lr-small", 1e-5, 0.71), ("lr-large", 5e-5, 0.86)):
        with mlflow.start_run(experiment_id=experiment, run_name=name):
            mlflow.log_params({"train.lr": lr, "train.batch_size": 32})
            for step, loss in enumerate((1.3, 0.9, 0.5), start=1):
                mlflow.log_metric("train_loss", loss * lr * 2e4, step=step)
            mlflow.log_metric("eval_cosine_mrr_at_10", mrr, step=3)
        names.append(name)
    return uri, experiment, names


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    uri, experiment, names = make_store(tmp_path)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", uri, "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=(tmp_path / "server.log").open("w"), start_new_session=True,
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
    yield url, experiment, names
    server.terminate()
    server.wait(timeout=20)


@pytest.mark.browser
def test_experiment_page_and_compare_view_render(mlflow_server, tmp_path):
    from playwright.sync_api import sync_playwright

    url, experiment, names = mlflow_server
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is required (make test installs it)"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 3200, "height": 1000})
        page.goto(f"{url}/#/experiments/{experiment}/runs")
        for name in names:
            page.get_by_text(name, exact=True).first.wait_for(timeout=60_000)
        # MLflow 3.17 hides metric columns until chosen in "Columns": choose one, as a user would
        page.get_by_role("button", name="Columns").click()
        page.get_by_text("eval_cosine_mrr_at_10", exact=True).first.click()
        page.keyboard.press("Escape")
        for value in ("0.86", "0.71"):
            page.get_by_text(value, exact=True).first.wait_for(timeout=30_000)
        page.screenshot(path=str(tmp_path / "runs.png"), full_page=True)
        run_ids = [r.info.run_id for r in mlflow.search_runs([experiment], output_format="list")]
        ids = "%5B" + "%2C".join(f"%22{rid}%22" for rid in run_ids) + "%5D"
        page.goto(f"{url}/#/compare-runs?runs={ids}&experiments=%5B%22{experiment}%22%5D")
        page.get_by_text("train.lr").first.wait_for(timeout=60_000)
        for value in ("1e-05", "5e-05"):
            page.get_by_text(value, exact=True).first.wait_for(timeout=30_000)
        page.screenshot(path=str(tmp_path / "compare.png"), full_page=True)
        browser.close()
    assert (tmp_path / "runs.png").stat().st_size > 10_000 and (tmp_path / "compare.png").stat().st_size > 10_000


def test_compare_notebook_executes_against_a_store(tmp_path, monkeypatch):
    uri, _, names = make_store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "ui-check")
    notebook = nbformat.read(ROOT / "notebooks" / "compare_runs.ipynb", as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), "strip outputs"
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    printed = "".join(o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", []))
    assert all(name in printed for name in names) and "2 runs plotted" in printed
    assert os.environ["MLFLOW_TRACKING_URI"] == uri
