"""Where runs go and what may be written there: the store and experiment, redaction, flattening, git state.

Also the one lazy ``import mlflow`` of pairtune (:func:`_mlflow`): importing this package costs nothing
until a run is actually tracked.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pairtune.core import TrackingUnavailableError

if TYPE_CHECKING:
    from types import ModuleType

    from pairtune.config import PairtuneConfig

DEFAULT_EXPERIMENT = "pairtune"
PARAM_VALUE_LIMIT = 6000  # MLflow's limit on one param value
SECRET_KEY = re.compile(r"(token|secret|password|passwd|api[_-]?key|credential)", re.I)
URI_PASSWORD = re.compile(r"(//[^:/@\s]+:)[^@/\s]+@")


def _mlflow() -> ModuleType:
    """mlflow, imported on first use: it takes seconds, and most commands never track anything."""
    import mlflow

    return mlflow


def project_root(start: Path | None = None) -> Path:
    """The nearest folder upward holding ``conf/`` and ``pyproject.toml`` or ``dvc.yaml``, else the cwd.

    Queued DVC experiments run in copies under ``<repo>/.dvc/tmp/exps/``; they belong to ``<repo>``, so
    their runs land in the repository's own store rather than in a copy that DVC deletes.
    """
    here = (start or Path.cwd()).resolve()
    if ".dvc" in here.parts:
        here = Path(*here.parts[: here.parts.index(".dvc")])
    for folder in (here, *here.parents):
        if (folder / "conf").is_dir() and (
            (folder / "pyproject.toml").is_file() or (folder / "dvc.yaml").is_file()
        ):
            return folder
    return here


def tracking_uri(configured: str | None) -> str:
    """The configured store, else ``$MLFLOW_TRACKING_URI``, else ``mlflow.db`` at the repository root."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{project_root() / 'mlflow.db'}"


def experiment_name(configured: str | None) -> str:
    """The configured experiment, else ``$MLFLOW_EXPERIMENT_NAME``, else ``pairtune``."""
    return configured or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


def redact(text: str) -> str:
    """Hide the password of a ``scheme://user:password@host`` URI."""
    return URI_PASSWORD.sub(r"\1***@", text)


def redact_tree(tree: dict[str, Any]) -> dict[str, Any]:
    """A copy with secret-looking keys masked and URI passwords hidden, for anything that gets logged."""
    clean: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            clean[key] = redact_tree(value)
        elif SECRET_KEY.search(str(key)):
            clean[key] = "***"
        else:
            clean[key] = redact(value) if isinstance(value, str) else value
    return clean


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 5e-5}}`` -> ``{"train.lr": 5e-5}``; secrets are redacted, never logged."""
    flat: dict[str, Any] = {}
    for key, value in redact_tree(tree).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def split_params(flat: dict[str, Any]) -> tuple[dict[str, str], dict[str, Any]]:
    """Params MLflow accepts, and the ones over its value limit (logged as an artifact instead)."""
    fits, overflow = {}, {}
    for key, value in flat.items():
        text = "None" if value is None else str(value)
        if len(text) > PARAM_VALUE_LIMIT:
            overflow[key] = value
            fits[key] = "<too long: see params_overflow.json>"
        else:
            fits[key] = text
    return fits, overflow


def git_state(root: Path) -> dict[str, str]:
    """``git.commit`` and ``git.dirty`` tags, so a run names the code it ran; empty outside a repository."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git.commit": commit, "git.dirty": str(dirty).lower()} if commit else {}


def check_reachable(uri: str, timeout: float = 4.0) -> None:
    """Fail within seconds, not after MLflow's minutes of retries, when an HTTP tracking server is down."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout).close()
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise TrackingUnavailableError(f"tracking server {redact(uri)} unreachable ({reason})") from None


def configure(settings: PairtuneConfig) -> str:
    """Point MLflow at the store and experiment; create the experiment with artifacts under mlartifacts/."""
    mlflow = _mlflow()
    uri = tracking_uri(settings.tracking.uri)
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    name = experiment_name(settings.tracking.experiment)
    if mlflow.get_experiment_by_name(name) is None:
        location = None
        if uri.startswith("sqlite:///"):
            location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
        try:
            mlflow.create_experiment(name, artifact_location=location)
        except Exception:  # another process created it first
            if mlflow.get_experiment_by_name(name) is None:
                raise
    mlflow.set_experiment(name)
    return uri
