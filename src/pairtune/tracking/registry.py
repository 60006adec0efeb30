"""The model registry: log and register the trained model, then promote the best one to ``champion``.

Aliases of the registered model (``pairtune`` by default):

- ``newest``: the version the latest training run registered (MLflow reserves ``latest``);
- ``champion``: the version to serve (``make serve``): the evaluate stage moves it to a new version only when
  that version's MRR@10 on the promotion set (the eval split, or ``promotion.source``) beats the current
  champion's on the same set (equal digests); a tie keeps the old champion;
- ``challenger``: the latest version that was evaluated, compared and did not beat the champion.

The test split is the held-out result: reported beside the decision, never used to make it, so the figure a
champion reports was not chosen as a maximum over runs. A version scored on other promotion data than the
champion's is not compared at all; it gets no alias and its description and the run's
``pairtune.promotion`` tag say why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from pairtune.tracking.store import _mlflow

log = logging.getLogger(__name__)

NEWEST, CHAMPION, CHALLENGER = "newest", "champion", "challenger"
#: What decides the champion: the final model's MRR@10 on the promotion set, as the evaluate stage logs it.
PROMOTION_METRIC = "promotion_cosine_mrr_at_10"
#: The digest of the promotion set's pairs: only versions scored on the same pairs are compared.
PROMOTION_DATA_TAG = "pairtune.promotion_sha256"
PROMOTION_TAG = "pairtune.promotion"  # what promotion decided for this run, and why


@dataclass
class Candidate:
    """A version's case for promotion: the deciding figure and its data, and the held-out one it reports."""

    score: float  # MRR@10 on the promotion set
    data_sha256: str  # the promotion set's pairs digest
    data: str  # which set, in words: "the eval split (45 pairs)" or the file
    reported: float | None = None  # test-split MRR@10: reported, never decides
    task_gain: float | None = None  # test MRR@10 over the base model's, for the description
    general_change: float | None = None  # general-retrieval MRR@10 against the base (the guard's set)
    max_drop: float | None = None  # guard.max_drop: a larger general loss is never champion

    @property
    def loses_general(self) -> bool:
        return self.general_change is not None and self.max_drop is not None and -self.general_change > self.max_drop + 1e-9


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
    from mlflow.types.schema import ParamSchema, ParamSpec

    signature = mlflow.models.infer_signature(example, np.asarray(model.encode(example)))
    # params={"prompt_name": "query"} applies the model's saved prompt, as encode(..., prompt_name=...) does
    signature.params = ParamSchema([ParamSpec("prompt_name", "string", None)])
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


def champion_of(client, name: str) -> tuple[str | None, float | None, str | None]:
    """The current champion's version, its promotion score and its promotion data digest (Nones when none)."""
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except Exception:  # MLflow raises when the alias is not set
        return None, None, None
    run = client.get_run(champion.run_id).data
    return champion.version, run.metrics.get(PROMOTION_METRIC), run.tags.get(PROMOTION_DATA_TAG)


def decide(version: str, candidate: Candidate, champion: tuple[str | None, float | None, str | None]) -> tuple[str | None, str]:
    """The alias this version earns against the champion (None: not comparable), and why, in one line."""
    current, best, digest = champion
    figure = f"MRR@10 {candidate.score:.4f} on {candidate.data}"
    if candidate.loses_general:
        return None, (f"refused: general-retrieval MRR@10 changes {candidate.general_change:+.4f} against the base "
                      f"model, beyond guard.max_drop={candidate.max_drop}; keep the guard on (guard.enabled=true)")
    if current is None or current == version:
        return CHAMPION, f"champion: {figure}" + ("" if current is None else " (re-evaluated)")
    if digest != candidate.data_sha256 or best is None:
        return None, (f"not compared with champion version {current}: it was scored on other promotion data "
                      f"(sha256 {str(digest)[:12]} vs {candidate.data_sha256[:12]}); name one fixed set with "
                      "promotion.source to compare runs trained on other data")
    if candidate.score > best:
        return CHAMPION, f"champion: {figure} beats version {current}'s {best:.4f}"
    return CHALLENGER, f"challenger: {figure} does not beat version {current}'s {best:.4f}"


def describe(candidate: Candidate, why: str) -> str:
    """The version's description: the deciding figure and the decision, then what is only reported."""
    parts = [f"Decided on MRR@10 on {candidate.data}: {why}."]
    if candidate.reported is not None:
        parts.append(f"Held-out test MRR@10 {candidate.reported:.4f} (reported, not used to decide).")
    if candidate.task_gain is not None:
        parts.append(f"Task gain over the base model: test MRR@10 {candidate.task_gain:+.4f}.")
    if candidate.general_change is not None:
        parts.append(f"General retrieval: MRR@10 {candidate.general_change:+.4f} against the base model.")
    return " ".join(parts)


def promote(name: str | None, run_id: str, candidate: Candidate) -> str | None:
    """Point ``champion`` at this run's version when it beats the champion on the same promotion data.

    Else ``challenger``, or no alias when the two were scored on different data. The run gets the deciding
    figure's digest and the decision as tags, and the version a description naming the deciding figure and
    the held-out test figure. Returns the alias set, or None (no alias, or the run registered no version).
    """
    mlflow = _mlflow()
    client = mlflow.MlflowClient()
    client.set_tag(run_id, PROMOTION_DATA_TAG, candidate.data_sha256)
    version = run_version(client, name, run_id) if name else None
    if version is None:
        return None
    alias, why = decide(version.version, candidate, champion_of(client, name))
    if alias is not None:
        client.set_registered_model_alias(name, alias, version.version)
    client.set_tag(run_id, PROMOTION_TAG, why)
    client.update_model_version(name, version.version, description=describe(candidate, why))
    log.info("%s version %s: %s", name, version.version, why)
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
