"""Hydra multiruns in MLflow: one parent run per sweep, every job its child, the best child tagged at the end.

Hydra instantiates :class:`SweepCallback` from ``conf/config.yaml`` for every command, so this module
stays light: mlflow is imported only when a sweep actually starts.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from pairtune.config import load_settings
from pairtune.core import OBJECTIVE
from pairtune.entrypoint import in_multirun
from pairtune.tracking.store import _mlflow, configure, experiment_name, git_state, project_root, redact

log = logging.getLogger(__name__)

#: Carries the parent run id from the sweep's process to its jobs (the launcher's workers inherit it).
PARENT_ENV = "PAIRTUNE_MLFLOW_PARENT_RUN_ID"


def sweep_parent_run_id() -> str | None:
    """The sweep's parent run, when this job is part of a Hydra multirun that opened one."""
    return os.environ.get(PARENT_ENV) if in_multirun() else None


def hydra_overrides() -> list[str]:
    """The command-line overrides of the running Hydra job (none outside one), for the run's tags."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


class SweepCallback(Callback):
    """Hydra callback: one parent run per multirun, children under it, a summary when the sweep ends.

    The parent id travels to the jobs in an environment variable, which the joblib launcher's worker
    processes inherit because they are started after ``on_multirun_start``.
    """

    def __init__(self, objective: str = OBJECTIVE) -> None:
        self.objective = objective
        self.parent_run_id: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        settings = load_settings(config)
        if not settings.tracking.enabled:
            return
        mlflow = _mlflow()
        configure(settings)
        sweep = " ".join(config.hydra.overrides.task) or "(none)"
        run = mlflow.MlflowClient().create_run(
            mlflow.get_experiment_by_name(experiment_name(settings.tracking.experiment)).experiment_id,
            run_name=settings.tracking.run_name or "sweep",
            tags={"pairtune.stage": "sweep", "pairtune.sweep": redact(sweep), **git_state(project_root())},
        )
        self.parent_run_id = run.info.run_id
        os.environ[PARENT_ENV] = self.parent_run_id
        log.info("sweep parent run %s", self.parent_run_id)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.parent_run_id is None:
            return
        best = summarise_sweep(self.parent_run_id, self.objective)
        os.environ.pop(PARENT_ENV, None)
        if best:
            command = keep_command(best["overrides"])
            _mlflow().MlflowClient().set_tag(self.parent_run_id, "pairtune.keep_command", command)
            print(f"best of the sweep: {self.objective} = {best[self.objective]:.4f} (run {best['run_id']}); "
                  f"make it the pipeline's with:\n  {command}", flush=True)


def keep_command(overrides: str) -> str:
    """The ``dvc exp run`` that reruns a sweep job's choice in the pipeline: its overrides of keys that shape a run."""
    from pairtune.train.checkpoint import SHAPES_THE_RUN

    kept = [o for o in overrides.split() if o.partition("=")[0].lstrip("+~") in SHAPES_THE_RUN]
    return " ".join([".venv/bin/dvc exp run", *(f"-S '{o}'" for o in kept)])


def child_runs(parent_run_id: str) -> list:
    """Every run started under ``parent_run_id``, in any experiment."""
    return _mlflow().search_runs(
        search_all_experiments=True,
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
        output_format="list",
    )


def summarise_sweep(parent_run_id: str, objective: str) -> dict[str, Any] | None:
    """Log the children's overrides -> objective table on the parent, tag the best child, end the parent."""
    import pandas as pd

    client = _mlflow().MlflowClient()
    rows = [
        {
            "run_id": child.info.run_id,
            "run_name": child.info.run_name,
            "status": child.info.status,
            "overrides": child.data.tags.get("pairtune.overrides", ""),
            objective: child.data.metrics.get(objective),
        }
        for child in child_runs(parent_run_id)
    ]
    scored = [row for row in rows if row[objective] is not None]
    best = max(scored, key=lambda row: row[objective]) if scored else None
    if rows:
        client.log_table(parent_run_id, pd.DataFrame(rows), artifact_file="sweep_children.json")
    if best:
        client.set_tag(parent_run_id, "pairtune.best_child_run_id", best["run_id"])
        client.set_tag(best["run_id"], "pairtune.best_in_sweep", "true")
        client.log_metric(parent_run_id, f"best_{objective}", best[objective])
    client.set_tag(parent_run_id, "pairtune.children", str(len(rows)))
    failed = any(row["status"] != "FINISHED" for row in rows)
    client.set_terminated(parent_run_id, status="FAILED" if failed or not rows else "FINISHED")
    return best
