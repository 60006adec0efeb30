"""The model registry: log and register the trained model, then promote the best one to ``champion``.

Aliases of the registered model (``pairtune`` by default):

- ``newest``: the version the latest training run registered (MLflow reserves ``latest``);
- ``champion``: the version to serve (``make serve``): the evaluate stage moves it to a new version only when
  that version's test MRR@10 beats the current champion's; a tie keeps the old champion;
- ``challenger``: the latest version that was evaluated and did not beat the champion.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pairtune.tracking.store import _mlflow

log = logging.getLogger(__name__)

NEWEST, CHAMPION, CHALLENGER = "newest", "champion", "challenger"
#: What decides the champion: the trained model's test-split MRR@10, as the evaluate stage logs it.
PROMOTION_METRIC = "test_trained_cosine_mrr_at_10"


def pip_requirements() -> list[str]:
    """The exact versions the logged model needs, so ``mlflow models serve`` rebuilds the same stack."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("sentence-transformers", "transformers", "torch", "tokenizers")]


def log_model(model_dir: Path, registered_name: str | None) -> None:
    """Log the saved model with a signature and an input example; register it and move ``newest``."""
    import numpy as np
    from sentence_transformers import SentenceTransformer

    mlflow = _mlflow()
    model = SentenceTransformer(str(model_dir), device="cpu")
    example = ["Ada ? whr sh @ nit", "Ada wondered where the ship had gone that night."]
    signature = mlflow.models.infer_signature(example, np.asarray(model.encode(example)))
    info = mlflow.sentence_transformers.log_model(
        model,
        name="model",
        signature=signature,
        input_example=example,
        pip_requirements=pip_requirements(),
        registered_model_name=registered_name,
    )
    if registered_name and info.registered_model_version is not None:
        mlflow.MlflowClient().set_registered_model_alias(registered_name, NEWEST, str(info.registered_model_version))


def run_version(client, name: str, run_id: str):
    """The registered version that ``run_id`` logged, or None (model logging off, or not registered)."""
    versions = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    return max(versions, key=lambda v: int(v.version)) if versions else None


def champion_score(client, name: str) -> tuple[str | None, float | None]:
    """The current champion's version and its test MRR@10 (None, None when there is none yet)."""
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except Exception:  # MLflow raises when the alias is not set
        return None, None
    return champion.version, client.get_run(champion.run_id).data.metrics.get(PROMOTION_METRIC)


def promote(name: str | None, run_id: str, score: float) -> str | None:
    """Point ``champion`` at this run's version when ``score`` beats the champion's, else ``challenger``.

    Returns the alias set, or None when the run registered no version.
    """
    client = _mlflow().MlflowClient()
    version = run_version(client, name, run_id) if name else None
    if version is None:
        return None
    current, best = champion_score(client, name)
    alias = CHAMPION if current is None or best is None or score > best else CHALLENGER
    if current == version.version:
        alias = CHAMPION  # re-evaluating the champion itself keeps it
    client.set_registered_model_alias(name, alias, version.version)
    log.info("%s version %s is the %s (test MRR@10 %.4f; champion before: %s at %s)",
             name, version.version, alias, score, current, best)
    return alias


def aliases_by_run(name: str) -> dict[str, list[str]]:
    """``{run_id: [aliases]}`` of the registered model, for ``pairtune runs``."""
    client = _mlflow().MlflowClient()
    try:
        aliases = client.get_registered_model(name).aliases  # {alias: version}
    except Exception:  # no registered model yet
        return {}
    found: dict[str, list[str]] = {}
    for alias, version in sorted(aliases.items()):
        found.setdefault(client.get_model_version(name, version).run_id, []).append(alias)
    return found
