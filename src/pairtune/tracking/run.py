"""One MLflow run per pipeline: opened by training, reopened by the later stages, and what goes into it.

:func:`tracked_run` opens (or reopens) a run on the main process and yields an observer the training loop
reports to; on every other process, and with ``tracking.enabled=false``, it yields a
:class:`~pairtune.core.NullObserver`. The run ends FINISHED on success, FAILED on an exception (the error
as a tag) and KILLED on a signal. :func:`stage_run` reopens the same run for evaluate and export.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pairtune.core import CARD_METRICS, NullObserver, Observer, metric_key
from pairtune.files import write_json_atomic
from pairtune.tracking.registry import log_model
from pairtune.tracking.store import (
    _mlflow,
    configure,
    experiment_name,
    flatten,
    git_state,
    project_root,
    redact,
    redact_tree,
    split_params,
)
from pairtune.tracking.sweep import hydra_overrides
from pairtune.tracking.writer import MetricWriter

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from pairtune.config import PairtuneConfig
    from pairtune.core import TrainResult

log = logging.getLogger(__name__)

PARAM_BATCH = 100  # MLflow's limit on params per call
LINEAGE_FILE = "lineage.json"  # in paths.reports: untracked by git, no DVC output (see dvc.yaml's metrics)
PLOTTED_METRICS = ("cosine_mrr@10", "cosine_ndcg@10", "cosine_accuracy@1")
#: The sha256 of the trained model's weights (``model.safetensors``), so a later stage run outside DVC finds
#: the run that trained any model folder, moved or copied: run ids never go into the model folder itself.
MODEL_DIGEST_TAG = "pairtune.model_sha256"


def is_main_process() -> bool:
    """True on rank 0 (or when not launched by torchrun / accelerate), decided before any process group exists."""
    return int(os.environ.get("RANK", "0")) == 0


# -- the observer -----------------------------------------------------------------------------------------


class MlflowObserver(NullObserver):
    """Reports the loop's steps, evaluations and final artifacts to the active run."""

    def __init__(self, settings: PairtuneConfig) -> None:
        self.settings = settings
        self.mlflow = _mlflow()
        self.run_id = active_run_id()
        self.writer = MetricWriter(self.run_id, settings.tracking.flush_seconds)

    def on_train_start(self, context: dict[str, Any]) -> None:
        """``run.*`` params; a resumed run keeps its first values and tags any that changed."""
        logged = self.mlflow.get_run(self.run_id).data.params
        params = {f"run.{k}": str(v) for k, v in context.items()}
        self.mlflow.log_params({k: v for k, v in params.items() if k not in logged})
        for key, value in params.items():
            if key in logged and logged[key] != value:
                self.mlflow.set_tag(f"pairtune.resumed.{key}", value)

    def on_resume(self, step: int) -> None:
        """Mark the replay: steps after ``step`` were logged before the crash and are logged again."""
        earlier = self.mlflow.get_run(self.run_id).data.tags.get("pairtune.resumed_from_step")
        self.mlflow.set_tag("pairtune.resumed_from_step", f"{earlier},{step}" if earlier else str(step))

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self.writer.put(step, metrics)

    def on_evaluate(self, step: int, epoch: float, metrics: dict[str, float]) -> None:
        # Epoch ends are when users look: write now, with the steps before them.
        self.writer.put(step, {f"eval_{metric_key(k)}": v for k, v in metrics.items()}, urgent=True)

    def on_train_end(self, result: TrainResult) -> None:
        """The card's tables and plots, the guard's choice, and the final model (logged and registered)."""
        self.writer.flush()
        log_training_logs(result)
        log_plots(result)
        final = result.final_dir or result.model_dir
        write_lineage(self.settings, active_run_id())
        if result.guard is not None:
            log_guard(result)
        for index, warning in enumerate(result.warnings):
            self.mlflow.set_tag(f"pairtune.warning.{index}", warning[:5000])
        digest = model_digest(final)
        if digest:
            self.mlflow.set_tag(MODEL_DIGEST_TAG, digest)
        self.mlflow.log_artifact(str(final / "README.md"))
        self.mlflow.log_artifact(str(result.model_dir / "README.md"), "trained")
        if self.settings.tracking.log_model:
            log_model(final, self.settings.tracking.registered_model)

    def close(self) -> None:
        """Write what is left; rows the store never took go to ``<paths.reports>/unlogged_metrics.jsonl``."""
        unlogged = self.writer.close()
        if not unlogged:
            return
        path = Path(self.settings.paths.reports) / "unlogged_metrics.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as handle:
            for step, metrics in unlogged:
                handle.write(json.dumps({"run_id": self.run_id, "step": step, **metrics}) + "\n")
        log.error("%d metric rows could not be logged; written to %s", len(unlogged), path)


# -- artifacts --------------------------------------------------------------------------------------------


def log_figure(
    artifact_file: str, draw: Callable[[Axes], None], *, figsize: tuple[float, float] = (6, 3.5)
) -> None:
    """Draw one figure off-screen (Agg: no display needed), log it to the active run and close it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize)
    try:
        draw(ax)
        _mlflow().log_figure(fig, artifact_file)
    finally:
        plt.close(fig)  # pyplot keeps every open figure alive otherwise


def log_training_logs(result: TrainResult) -> None:
    """The card's Training Logs table, as an MLflow table (``mlflow.load_table``) and as markdown."""
    import pandas as pd

    from pairtune.outputs.card import logs_table  # the card pulls in templating; only a finished run needs it

    mlflow = _mlflow()
    rows = [
        {
            "Epoch": row.epoch,
            "Step": row.step,
            "Training Loss": row.training_loss,
            **{f"eval_{m}": row.metrics.get(m) for m in CARD_METRICS},
        }
        for row in result.rows
    ]
    mlflow.log_table(pd.DataFrame(rows), artifact_file="training_logs.json")
    mlflow.log_text("\n".join(logs_table(result.rows, result.selected_step)) + "\n", "training_logs.md")
    if result.selected_step is not None:  # train.select_best: which evaluation's weights were saved
        mlflow.set_tag("pairtune.selected_step", str(result.selected_step))


def log_guard(result: TrainResult) -> None:
    """``general_*`` at step 0 (the base) and at the last step (trained), ``final_*``, the blend table and plot."""
    import pandas as pd

    mlflow, report = _mlflow(), result.guard
    client, run_id = mlflow.MlflowClient(), active_run_id()
    for step, scores in ((0, report.base_general), (result.global_step, report.trained_general)):
        for name, value in scores.items():
            client.log_metric(run_id, f"general_{metric_key(name)}", value, step=step)
    final = report.final
    mlflow.log_metrics({
        **{f"final_general_{metric_key(k)}": v for k, v in final.general.items()},
        **{f"final_eval_{metric_key(k)}": v for k, v in final.task.items()},
        "final_general_change_mrr_at_10": -report.drop(final.general),
        "guard_chosen_a": report.chosen,
    })
    mlflow.set_tag("pairtune.guard", report.why)
    rows = [{"a": r.a, "eval_cosine_mrr_at_10": r.task["cosine_mrr@10"],
             "general_cosine_mrr_at_10": r.general["cosine_mrr@10"] if r.general else None} for r in report.rows]
    mlflow.log_table(pd.DataFrame(rows), artifact_file="guard_blends.json")

    def curves(ax: Axes) -> None:
        ax.plot([r["a"] for r in rows], [r["eval_cosine_mrr_at_10"] for r in rows], marker="o", label="eval (task)")
        scored = [r for r in rows if r["general_cosine_mrr_at_10"] is not None]
        ax.plot([r["a"] for r in scored], [r["general_cosine_mrr_at_10"] for r in scored], marker="s", label="general")
        ax.axvline(report.chosen, color="grey", linestyle="--", label=f"chosen a = {report.chosen:g}")
        ax.set(xlabel="a in (1 - a) x base + a x trained", ylabel="MRR@10", title="the guard's blends")
        ax.legend()

    log_figure("plots/guard_blends.png", curves)


def log_plots(result: TrainResult) -> None:
    """The loss per step and the headline eval metrics per evaluation, under ``plots/``."""

    def loss_curve(ax: Axes) -> None:
        ax.plot(range(1, len(result.step_losses) + 1), result.step_losses)
        ax.set(xlabel="step", ylabel="MNRL loss", title="training loss")

    def eval_metrics(ax: Axes) -> None:
        steps = [r.step for r in result.rows]
        for metric in PLOTTED_METRICS:
            ax.plot(steps, [r.metrics[metric] for r in result.rows], marker="o", label=metric)
        ax.set(xlabel="step", ylabel="eval score", title="eval retrieval metrics")
        ax.legend()

    log_figure("plots/loss_curve.png", loss_curve)
    log_figure("plots/eval_metrics.png", eval_metrics)


def log_datasets(settings: PairtuneConfig) -> None:
    """The prepared train and eval splits as MLflow dataset inputs (name, digest, source, schema).

    The dataset type matches where the pairs came from (``stats.json``'s lineage): a ``datasets`` source (hub
    id, dataset folder or ``save_to_disk`` folder) is logged as an ``mlflow.data`` Hugging Face dataset whose
    source names the id, subset, split and revision; a file as a pandas dataset whose source is the split's file.
    """
    import pandas as pd

    mlflow = _mlflow()
    folder = Path(settings.paths.prepared)
    lineage = read_lineage(folder)
    sources = read_sources(folder)
    for split, context in (("train", "training"), ("eval", "evaluation")):
        path = folder / f"{split}.parquet"
        if not path.is_file():
            continue
        frame = pd.read_parquet(path)
        parts = [(f"pairs-{split}", frame, lineage)] if not sources else [
            (f"{name}-{split}", frame[frame["source"] == name].drop(columns="source"), part.get("lineage", {}))
            for name, part in sources.items()
        ]
        for name, part, origin in parts:  # several sources: one input per source, named after it
            if origin.get("kind") in ("hub", "save_to_disk"):
                dataset = huggingface_dataset(part, origin, name=name)
            else:
                dataset = mlflow.data.from_pandas(part, source=str(path), name=name)
            log_input(mlflow, dataset, context)


def read_sources(folder: Path) -> dict[str, Any]:
    """``stats.json``'s sources (several sources only; empty otherwise)."""
    stats = folder / "stats.json"
    return json.loads(stats.read_text(encoding="utf-8")).get("sources", {}) if stats.is_file() else {}


def log_input(mlflow, dataset, context: str) -> None:
    """``mlflow.log_input``, tried once more when a parallel job inserted the same dataset first.

    MLflow's SQL store inserts a dataset's row, keyed by (experiment, name, digest), before linking it to the
    run. Parallel jobs of a sweep log the same splits: two inserting at once both pass the look-up, and the
    second fails on that key. Its transaction is rolled back and the row now exists, so a second try links it.
    """
    try:
        mlflow.log_input(dataset, context=context)
    except mlflow.exceptions.MlflowException as err:
        message = str(err).lower()
        if "unique constraint" not in message and "duplicate entry" not in message:
            raise
        log.info("dataset %s: logged by a parallel job first; linking it to this run", dataset.name)
        mlflow.log_input(dataset, context=context)


def read_lineage(prepared: Path) -> dict[str, Any]:
    """Where the prepared pairs came from, as the prepare stage recorded it; empty for older folders."""
    stats = prepared / "stats.json"
    if not stats.is_file():
        return {}
    return json.loads(stats.read_text(encoding="utf-8")).get("lineage") or {}


def huggingface_dataset(frame, lineage: dict[str, Any], *, name: str):
    """An ``mlflow.data`` Hugging Face dataset of one prepared split, its source the ``datasets`` source it came from."""
    import datasets
    from mlflow.data.huggingface_dataset import from_huggingface
    from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource

    source = HuggingFaceDatasetSource(
        path=lineage["id"], config_name=lineage.get("subset"), split=lineage.get("split"),
        revision=lineage.get("revision"),
    )
    return from_huggingface(datasets.Dataset.from_pandas(frame, preserve_index=False), source=source, name=name)


def log_run_config(config: dict[str, Any]) -> None:
    """Every config key as a param (overlong values as ``params_overflow.json``), and the whole as YAML."""
    from omegaconf import OmegaConf

    mlflow = _mlflow()
    fits, overflow = split_params(flatten(config))
    items = list(fits.items())
    for start in range(0, len(items), PARAM_BATCH):
        mlflow.log_params(dict(items[start : start + PARAM_BATCH]))
    if overflow:
        mlflow.log_dict(overflow, "params_overflow.json")
    mlflow.log_text(OmegaConf.to_yaml(OmegaConf.create(redact_tree(config))), "config.yaml")


# -- the run's lifecycle ----------------------------------------------------------------------------------


def run_tags(overrides: list[str], stage: str) -> dict[str, str]:
    """Tags that say how a run was started: stage, command line, overrides, git state, DVC experiment."""
    tags = {
        "pairtune.stage": stage,
        "pairtune.command": redact(" ".join([Path(sys.argv[0]).name, *sys.argv[1:]])),
        "pairtune.overrides": redact(" ".join(overrides)) or "(none)",
        **git_state(project_root()),
    }
    if os.environ.get("DVC_EXP_NAME"):  # set by `dvc exp run` (a generated name when -n is not given)
        tags["dvc.experiment"] = os.environ["DVC_EXP_NAME"]
    if os.environ.get("DVC_EXP_BASELINE_REV"):
        tags["dvc.baseline_rev"] = os.environ["DVC_EXP_BASELINE_REV"]
    return tags


@contextmanager
def tracked_run(
    settings: PairtuneConfig,
    *,
    config: dict[str, Any],
    overrides: list[str] | None = None,
    stage: str = "train",
    parent_run_id: str | None = None,
    resume_run_id: str | None = None,
) -> Iterator[Observer]:
    """Open the run for a training job; on other ranks or with tracking off, yield a no-op observer."""
    if not (settings.tracking.enabled and is_main_process()):
        yield NullObserver()
        return
    configure(settings)
    run = _mlflow().start_run(
        run_id=resume_run_id,
        run_name=None if resume_run_id else settings.tracking.run_name,
        parent_run_id=parent_run_id,
        tags=None if resume_run_id else run_tags(overrides or [], stage),
    )
    with ending_run(run.info.run_id):
        if resume_run_id is None:
            log_run_config(config)
            log_datasets(settings)
        else:  # params stay those of the first start; what this start changed is kept beside them
            _mlflow().set_tag("pairtune.resume_overrides", redact(" ".join(overrides or [])) or "(none)")
        observer = MlflowObserver(settings)
        try:
            yield observer
        finally:
            observer.close()


@contextmanager
def ending_run(run_id: str) -> Iterator[None]:
    """End the active run FINISHED, KILLED on an interrupt or FAILED on any other error (kept as a tag)."""
    mlflow = _mlflow()
    status = "FAILED"
    try:
        yield
        status = "FINISHED"
    except KeyboardInterrupt as err:
        status = "KILLED"
        mlflow.set_tag("pairtune.stopped", str(err) or "interrupted")
        raise
    except BaseException as err:
        mlflow.set_tag("pairtune.error", redact(f"{type(err).__name__}: {err}")[:5000])
        raise
    finally:
        mlflow.end_run(status=status)
        log.info("MLflow run %s ended %s", run_id, status)


def active_run_id() -> str | None:
    """The id of the run this process has open, if any."""
    run = _mlflow().active_run()
    return run.info.run_id if run else None


def lineage(settings: PairtuneConfig, run_id: str | None) -> dict[str, str | None]:
    """Which MLflow run trained which model, in which DVC experiment (if any) from which revision."""
    return {
        "mlflow_run_id": run_id,
        "model_dir": str(settings.paths.final),
        "dvc_experiment": os.environ.get("DVC_EXP_NAME"),
        "dvc_baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV"),
    }


def write_lineage(settings: PairtuneConfig, run_id: str | None) -> None:
    """Leave the run id beside the reports, so the later stages reopen the same run.

    Run ids never go into the model folder or any DVC output: those must be byte-identical when a
    run is reproduced. ``dvc exp show`` still lists the file (a top-level metric in dvc.yaml).
    """
    if run_id:
        write_json_atomic(Path(settings.paths.reports) / LINEAGE_FILE, lineage(settings, run_id))


def read_run_id(settings: PairtuneConfig) -> str | None:
    """The run that trained ``paths.final``, from :func:`write_lineage`'s file, if it is about that model."""
    path = Path(settings.paths.reports) / LINEAGE_FILE
    if not path.is_file():
        return None
    found = json.loads(path.read_text())
    return found.get("mlflow_run_id") if found.get("model_dir") == str(settings.paths.final) else None


# -- the later stages -------------------------------------------------------------------------------------


class StageReporter:
    """What the evaluate and export stages log; this base class is the no-op used without tracking."""

    def log_metrics(self, metrics: dict[str, float]) -> None: ...
    def log_json(self, payload: dict, artifact_file: str) -> None: ...
    def log_comparison_plots(self, report: dict[str, dict[str, float]], folder: str) -> None: ...
    def promote(self, report: dict[str, Any]) -> str | None: ...


class MlflowStageReporter(StageReporter):
    """Logs a stage's metrics, reports and plots into the reopened pipeline run."""

    def __init__(self, run_id: str, registered_model: str | None) -> None:
        self.run_id, self.registered_model = run_id, registered_model

    def promote(self, report: dict[str, Any]) -> str | None:
        """Move ``champion`` (or ``challenger``) to this run's version, decided on the promotion set.

        ``report`` is the evaluate stage's: its ``promotion`` entry decides, its test MRR@10 is only reported.
        """
        from pairtune.tracking.registry import Candidate, promote

        promotion, general = report["promotion"], report.get("general")
        candidate = Candidate(
            score=promotion["cosine_mrr_at_10"], data_sha256=promotion["sha256"], data=promotion["data"],
            reported=report["final"]["cosine_mrr_at_10"],
            task_gain=report["final"]["cosine_mrr_at_10"] - report["base"]["cosine_mrr_at_10"],
            general_change=general["change_cosine_mrr_at_10"] if general else None,
            max_drop=general["max_drop"] if general else None,
        )
        return promote(self.registered_model, self.run_id, candidate)

    def log_metrics(self, metrics: dict[str, float]) -> None:
        _mlflow().log_metrics(metrics)

    def log_json(self, payload: dict, artifact_file: str) -> None:
        _mlflow().log_dict(payload, artifact_file)

    def log_comparison_plots(self, report: dict[str, dict[str, float]], folder: str) -> None:
        """One bar chart per metric: each entry of ``report`` (e.g. base, trained) side by side."""
        labels = list(report)
        for metric in report[labels[0]]:
            chart = bar_chart(labels, [report[label][metric] for label in labels], title=metric)
            log_figure(f"{folder}/{metric}.png", chart, figsize=(4, 3))


def bar_chart(labels: list[str], values: list[float], *, title: str) -> Callable[[Axes], None]:
    """A drawing for :func:`log_figure`: one labelled bar per value on a 0-1 scale (scores, not losses)."""

    def draw(ax: Axes) -> None:
        ax.bar(labels, values, color=["#9aa5b1", "#2a6fdb"][: len(labels)])
        for x, value in enumerate(values):
            ax.text(x, value, f"{value:.3f}", ha="center", va="bottom")
        ax.set(title=title, ylim=(0, 1.05))

    return draw


def model_digest(model_dir: str | Path) -> str | None:
    """sha256 of a model folder's weights; None when it holds no ``model.safetensors``."""
    from pairtune.train.checkpoint import file_digest

    weights = Path(model_dir) / "model.safetensors"
    return file_digest(weights) if weights.is_file() else None


def training_run_of(settings: PairtuneConfig) -> str | None:
    """The run that made ``paths.final``: the one ``lineage.json`` names, else the newest with its weights.

    Identical weights from two runs (a deterministic rerun) match both; the newest is taken and named.
    """
    found = read_run_id(settings)
    if found:
        return found
    digest = model_digest(settings.paths.final)
    if digest is None:
        return None
    runs = _mlflow().search_runs(
        experiment_names=[experiment_name(settings.tracking.experiment)],
        filter_string=f"tags.`{MODEL_DIGEST_TAG}` = '{digest}'",
        order_by=["attributes.start_time DESC"], max_results=1, output_format="list",
    )
    return runs[0].info.run_id if runs else None


@contextmanager
def stage_run(settings: PairtuneConfig, *, stage: str) -> Iterator[StageReporter]:
    """Log a later stage into the run that made ``paths.final``, or into a new run that names the model.

    In the pipeline the train stage's ``lineage.json`` names the run; run by hand (``make evaluate``, a
    command-line run's folder in ``paths.final``), the run is found by the model's weights.
    """
    if not (settings.tracking.enabled and is_main_process()):
        yield StageReporter()
        return
    configure(settings)
    model, run_id = settings.paths.final, training_run_of(settings)
    if run_id is None:
        log.info("%s: %s: no MLflow run trained these weights; logging into a new run", stage, model)
        config = {"paths": {"model": str(model)}, "stage": stage}
        context = tracked_run(settings, config=config, overrides=hydra_overrides(), stage=stage)
    else:
        log.info("%s: %s: logging into MLflow run %s, which trained it", stage, model, run_id)
        context = tracked_run(settings, config={}, stage=stage, resume_run_id=run_id)
    with context:
        from pairtune import numerics

        run_id = active_run_id()
        mlflow = _mlflow()
        mlflow.set_tag(f"pairtune.stage.{stage}", "done")
        mlflow.set_tag(f"pairtune.{stage}.numerics", numerics.describe())
        mlflow.set_tag(f"pairtune.{stage}.cpu", numerics.cpu_description())
        mlflow.set_tag(f"pairtune.{stage}.model", redact(str(model)))
        digest = model_digest(model)
        if digest and mlflow.get_run(run_id).data.tags.get(MODEL_DIGEST_TAG) is None:
            mlflow.set_tag(MODEL_DIGEST_TAG, digest)
        yield MlflowStageReporter(run_id, settings.tracking.registered_model)
