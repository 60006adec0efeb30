"""The rules of the house (docs/architecture.md), checked on the code itself."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import BUNDLED, ROOT

SRC = ROOT / "src" / "pairtune"
HEAVY = ("torch", "transformers", "sentence_transformers", "accelerate", "mlflow")


def imported_modules(stderr: str) -> set[str]:
    """Top-level module names from ``python -X importtime`` output (``import time: ... | name``)."""
    names = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return names


def run_importtime(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-X", "importtime", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_the_prepare_stage_imports_nothing_heavy(tmp_path):
    done = run_importtime("pipelines/prepare.py", f"data.source={BUNDLED}", f"paths.prepared={tmp_path}/prepared",
                          f"hydra.run.dir={tmp_path}/h", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "prepared/train.parquet").is_file()
    assert not imported_modules(done.stderr) & set(HEAVY), sorted(imported_modules(done.stderr) & set(HEAVY))


def test_a_config_error_answers_before_any_heavy_import(tmp_path):
    done = run_importtime("pipelines/train.py", "train.lr=-1", f"hydra.run.dir={tmp_path}/h", tmp_path=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == "pairtune: error: config key 'train.lr': must be > 0, got -1.0"
    assert not imported_modules(done.stderr) & set(HEAVY), sorted(imported_modules(done.stderr) & set(HEAVY))


def test_the_light_core_imports_nothing_heavy(tmp_path):
    light = ["pairtune.core", "pairtune.config", "pairtune.entrypoint", "pairtune.files", "pairtune.numerics",
             "pairtune.cli", "pairtune.data.pairs", "pairtune.data.sources", "pairtune.data.tokens",
             "pairtune.data.preparation", "pairtune.model.model_source", "pairtune.train.memory",
             "pairtune.train.checkpoint", "pairtune.train.signals", "pairtune.train.progress", "pairtune.outputs.card",
             "pairtune.outputs.reports", "pairtune.tracking", "pairtune.tracking.sweep", "pairtune.tracking.runs"]
    done = run_importtime("-c", "import " + ", ".join(light), tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not imported_modules(done.stderr) & set(HEAVY), sorted(imported_modules(done.stderr) & set(HEAVY))


def modules() -> list[tuple[Path, ast.Module]]:
    return [(path, ast.parse(path.read_text(), filename=str(path))) for path in sorted(SRC.rglob("*.py"))]


def test_only_the_tracking_package_imports_mlflow():
    importers = set()
    for path, tree in modules():
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(name.split(".")[0] == "mlflow" for name in names):
                importers.add(path.relative_to(SRC).parts[0])
    assert importers == {"tracking"}


@pytest.mark.parametrize("limit", [50])
def test_no_function_in_src_is_longer_than_the_limit(limit):
    long = [
        f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path, tree in modules()
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno + 1 > limit
    ]
    assert not long, long


SHARED = {"__init__.py", "core.py", "config.py", "entrypoint.py", "numerics.py", "files.py", "cli.py"}
CONCERNS = {"data", "model", "train", "outputs", "tracking"}


def test_the_package_is_grouped_by_concern():
    """Only the modules every layer shares sit at the top; everything else lives in its concern's folder."""
    top = {path.name for path in SRC.glob("*.py")}
    folders = {path.name for path in SRC.iterdir() if path.is_dir() and (path / "__init__.py").is_file()}
    assert top == SHARED, f"move {sorted(top - SHARED)} into one of {sorted(CONCERNS)}"
    assert folders == CONCERNS, sorted(folders ^ CONCERNS)
