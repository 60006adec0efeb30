"""Reading runs back from the store for comparison (the ``pairtune runs`` table and the notebook).

Imports mlflow (through the tracking seam) but nothing of the training stack, so listing runs stays quick.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pairtune.core import OBJECTIVE
from pairtune.tracking import store
from pairtune.tracking.registry import aliases_by_run
from pairtune.tracking.sweep import child_runs

#: Final metrics shown in the table, in this order, when a run has them.
TABLE_METRICS = (OBJECTIVE, "eval_cosine_ndcg_at_10", "eval_cosine_accuracy_at_1", "train_loss")


@dataclass
class RunRow:
    """One run as the table shows it: its params and final metric values."""

    run_id: str
    name: str
    status: str
    params: dict[str, str]
    metrics: dict[str, float]
    experiment: str | None = None  # the DVC experiment the run belongs to (tag ``dvc.experiment``)
    aliases: list[str] = field(default_factory=list)  # of its registered model version: champion, newest...


def collect_runs(
    *,
    experiment: str | None = None,
    tracking_uri: str | None = None,
    parent_run_id: str | None = None,
    limit: int = 50,
    registered_model: str | None = "pairtune",
) -> list[RunRow]:
    """Training runs of an experiment (sweep parents left out), or the children of one sweep."""
    mlflow = store._mlflow()
    mlflow.set_tracking_uri(store.tracking_uri(tracking_uri))
    if parent_run_id == "latest":
        parent_run_id = latest_sweep_id(experiment)
        if parent_run_id is None:
            return []
    if parent_run_id:
        runs = child_runs(parent_run_id)
    else:
        found = mlflow.get_experiment_by_name(store.experiment_name(experiment))
        if found is None:
            return []
        runs = mlflow.search_runs(
            experiment_ids=[found.experiment_id], max_results=limit, output_format="list"
        )
        runs = [run for run in runs if run.data.tags.get("pairtune.stage") != "sweep"]
    aliases = aliases_by_run(registered_model) if registered_model else {}
    return [
        RunRow(
            run.info.run_id,
            run.info.run_name,
            run.info.status,
            dict(run.data.params),
            dict(run.data.metrics),
            run.data.tags.get("dvc.experiment"),
            aliases.get(run.info.run_id, []),
        )
        for run in runs[:limit]
    ]


def differing_params(rows: list[RunRow]) -> list[str]:
    """Param keys whose values are not the same in every run.

    Bookkeeping (``run.*``) and output locations (``paths.*``, per job in a sweep) are left out.
    """
    keys = sorted({key for row in rows for key in row.params if not key.startswith(("run.", "paths."))})
    return [key for key in keys if len({row.params.get(key) for row in rows}) > 1]


def format_table(rows: list[RunRow], *, sort_metric: str) -> str:
    """A plain-text table: run, status, the params that differ, then the metrics (``sort_metric`` first)."""
    params = differing_params(rows)
    metrics = [sort_metric, *(m for m in TABLE_METRICS if m != sort_metric)]
    metrics = [m for m in metrics if any(m in row.metrics for row in rows)]
    experiments = any(row.experiment for row in rows)  # a column only when some run has one
    aliased = any(row.aliases for row in rows)
    header = ["run", "status", *(["aliases"] if aliased else []), *(["dvc experiment"] if experiments else [])]
    header += [*params, *metrics]
    body = [
        [
            row.name,
            row.status,
            *([",".join(row.aliases) or "-"] if aliased else []),
            *([row.experiment or "-"] if experiments else []),
            *(row.params.get(p, "-") for p in params),
            *(f"{row.metrics[m]:.4f}" if m in row.metrics else "-" for m in metrics),
        ]
        for row in rows
    ]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *body, strict=True)]

    def line(cells: list[str]) -> str:
        return "  ".join(str(cell).ljust(width) for cell, width in zip(cells, widths, strict=True)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in body)])


def metric_history(run_id: str, key: str) -> list[tuple[int, float]]:
    """``(step, value)`` pairs of one metric of one run, in step order."""
    history = store._mlflow().MlflowClient().get_metric_history(run_id, key)
    return sorted((m.step, m.value) for m in history)


def latest_sweep_id(experiment: str | None) -> str | None:
    """The newest sweep parent run of the experiment, if it has one."""
    mlflow = store._mlflow()
    found = mlflow.get_experiment_by_name(store.experiment_name(experiment))
    if found is None:
        return None
    sweeps = mlflow.search_runs(
        experiment_ids=[found.experiment_id],
        filter_string="tags.`pairtune.stage` = 'sweep'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
        output_format="list",
    )
    return sweeps[0].info.run_id if sweeps else None
