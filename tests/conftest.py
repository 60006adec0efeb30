"""Shared fixtures: the real composed config (shrunk), the real base model loaded once per session."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pairtune.config import PairtuneConfig, load_settings  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
BUNDLED = ROOT / "data" / "raw" / "pairs.jsonl"


def free_port() -> int:
    """A loopback port nothing listens on right now (for test servers and rendezvous endpoints)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def compose_config(overrides: list[str] | None = None):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides or [])


def tracked_overrides(folder: Path, prepared: Path, experiment: str, *, steps: int) -> list[str]:
    """A short tracked run whose every output (model, final, checkpoints, reports, ONNX, store) is under ``folder``."""
    return [
        f"paths.prepared={prepared}", f"paths.model={folder}/model", f"paths.final={folder}/final",
        f"paths.checkpoints={folder}/ckpt", f"paths.reports={folder}/reports", f"paths.onnx={folder}/onnx",
        f"data.source={BUNDLED}", "guard.enabled=false", f"train.max_steps={steps}", "train.epochs=1",
        "train.save_checkpoints=false", f"tracking.uri=sqlite:///{folder}/mlflow.db", f"tracking.experiment={experiment}",
    ]


@pytest.fixture
def make_settings(tmp_path: Path):
    """Compose conf/ with outputs under tmp_path and tracking off, plus any overrides."""

    def make(*overrides: str) -> PairtuneConfig:
        base = [
            f"paths.prepared={tmp_path}/prepared",
            f"paths.model={tmp_path}/model",
            f"paths.final={tmp_path}/final",
            f"paths.general_cache={ROOT}/.cache/general",
            f"paths.checkpoints={tmp_path}/checkpoints",
            f"paths.reports={tmp_path}/reports",
            f"paths.onnx={tmp_path}/onnx",
            f"data.source={BUNDLED}",
            "tracking.enabled=false",
            "guard.enabled=false",  # the guard's tests turn it on: a general evaluation takes seconds
        ]
        return load_settings(compose_config(base + list(overrides)))

    return make


@pytest.fixture(scope="session")
def base_model_session():
    from pairtune.model.modeling import load_model

    return load_model("sentence-transformers/all-MiniLM-L6-v2", max_seq_length=256)


@pytest.fixture
def base_model(base_model_session):
    return copy.deepcopy(base_model_session)


@pytest.fixture(scope="session")
def prepared_bundled(tmp_path_factory) -> Path:
    """The bundled data prepared once per session with the default split."""
    from pairtune.data.preparation import run_prepare

    folder = tmp_path_factory.mktemp("bundled") / "prepared"
    settings = load_settings(compose_config([f"paths.prepared={folder}", f"data.source={BUNDLED}"]))
    run_prepare(settings)
    return folder
