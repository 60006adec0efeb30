"""The one seam to MLflow: nothing else in pairtune imports mlflow, and this package only lazily.

``store`` says where runs go and what may be logged, ``writer`` writes per-step metrics in the background,
``run`` opens a pipeline's run and logs into it, ``sweep`` groups a Hydra multirun under a parent run.
Importing the package loads neither mlflow nor torch, so entry points and Hydra callbacks stay fast.
"""

from __future__ import annotations

from pairtune.tracking.run import (
    StageReporter,
    is_main_process,
    read_run_id,
    stage_run,
    tracked_run,
    write_lineage,
)
from pairtune.tracking.store import (
    PARAM_VALUE_LIMIT,
    experiment_name,
    flatten,
    project_root,
    redact,
    split_params,
    tracking_uri,
)
from pairtune.tracking.sweep import SweepCallback, hydra_overrides, sweep_parent_run_id
from pairtune.tracking.writer import MetricWriter

__all__ = [
    "PARAM_VALUE_LIMIT",
    "MetricWriter",
    "StageReporter",
    "SweepCallback",
    "experiment_name",
    "flatten",
    "hydra_overrides",
    "is_main_process",
    "project_root",
    "read_run_id",
    "redact",
    "split_params",
    "stage_run",
    "sweep_parent_run_id",
    "tracked_run",
    "tracking_uri",
    "write_lineage",
]
