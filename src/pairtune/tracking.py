"""The one seam to MLflow: nothing else in pairtune imports mlflow.

:func:`tracked_run` opens (or reopens) a run on the main process and yields an :class:`Observer` the
training loop reports to; on every other process, and with ``tracking.enabled=false``, it yields a no-op.
The run ends FINISHED on success, FAILED on an exception (the error as a tag) and KILLED on a signal.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pairtune.config import load_settings
from pairtune.training import Observer

if TYPE_CHECKING:
    from pairtune.config import PairtuneConfig
    from pairtune.training import TrainResult

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "pairtune"
PARAM_VALUE_LIMIT = 6000  # MLflow's limit on one param value
PARAM_BATCH = 100  # MLflow's limit on params per call
RUN_ID_FILE = "pairtune_run.json"
MODEL_ALIAS = "newest"  # MLflow reserves "latest"
SECRET_KEY = re.compile(r"(token|secret|password|passwd|api[_-]?key|credential)", re.I)
URI_PASSWORD = re.compile(r"(//[^:/@\s]+:)[^@/\s]+@")


def is_main_process() -> bool:
    """True on rank 0 (or when not launched by torchrun / accelerate), decided before any process group exists."""
    return int(os.environ.get("RANK", "0")) == 0


def project_root(start: Path | None = None) -> Path:
    """The nearest folder upward holding ``conf/`` and ``pyproject.toml`` or ``dvc.yaml``, else the cwd.

    Queued DVC experiments run in copies under ``<repo>/.dvc/tmp/exps/``; they belong to ``<repo>``, so
    their runs land in the repository's own store rather than in a copy that DVC deletes.
    """
    here = (start or Path.cwd()).resolve()
    if ".dvc" in here.parts:
        here = Path(*here.parts[: here.parts.index(".dvc")])
    for folder in (here, *here.parents):
        if (folder / "conf").is_dir() and ((folder / "pyproject.toml").is_file() or (folder / "dvc.yaml").is_file()):
            return folder
    return here


def tracking_uri(configured: str | None) -> str:
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{project_root() / 'mlflow.db'}"


def experiment_name(configured: str | None) -> str:
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
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git.commit": commit or "none", "git.dirty": str(dirty).lower()} if commit else {}


def _mlflow():
    import mlflow

    return mlflow


class TrackingUnavailableError(RuntimeError):
    """The tracking server cannot be reached; raised before any training starts."""


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


class MetricWriter:
    """Per-step metrics leave the loop as a list append; a background thread writes them in batches.

    Every ``interval`` seconds (and on :meth:`flush`) the buffered rows go to the store in one
    ``log_batch`` call per 1,000 values, with retries. Rows the store refuses stay pending and go out
    with the next batch; whatever never gets through is returned by :meth:`close` so that the caller can
    keep it on disk. One SQLite write every few seconds instead of one per step keeps tracking off the
    two cores the training uses.
    """

    retries: int = 3
    batch_limit: int = 1000  # MLflow's limit on metrics per log_batch

    def __init__(self, run_id: str, interval: float) -> None:
        import threading

        self.run_id = run_id
        self.interval = interval
        self.client = _mlflow().MlflowClient()
        self.buffer: list[tuple[int, int, dict[str, float]]] = []  # (step, timestamp ms, metrics)
        self.pending: list[tuple[int, int, dict[str, float]]] = []  # refused so far, oldest first
        self.lock = threading.Lock()  # guards buffer
        self.writing = threading.Lock()  # one flush at a time
        self.wake = threading.Event()
        self.stopped = False
        self.thread = threading.Thread(target=self._run, name="pairtune-metrics", daemon=True)
        self.thread.start()

    def put(self, step: int, metrics: dict[str, float], *, urgent: bool = False) -> None:
        with self.lock:
            self.buffer.append((step, int(time.time() * 1000), metrics))
        if urgent:
            self.wake.set()

    def _run(self) -> None:
        while not self.stopped:
            self.wake.wait(self.interval)
            self.wake.clear()
            if not self.stopped:
                self.flush()

    def flush(self) -> None:
        """Write everything buffered and pending now; what the store refuses stays pending."""
        from mlflow.entities import Metric

        with self.writing:
            with self.lock:
                self.pending.extend(self.buffer)
                self.buffer = []
            while self.pending:
                rows = self._take_batch()
                metrics = [Metric(key, float(value), stamp, step) for step, stamp, row in rows
                           for key, value in row.items()]
                if not self._send(metrics):
                    return
                del self.pending[: len(rows)]

    def _take_batch(self) -> list[tuple[int, int, dict[str, float]]]:
        rows, size = [], 0
        for row in self.pending:
            if rows and size + len(row[2]) > self.batch_limit:
                break
            rows.append(row)
            size += len(row[2])
        return rows

    def _send(self, metrics: list) -> bool:
        for attempt in range(self.retries):
            try:
                self.client.log_batch(self.run_id, metrics=metrics, synchronous=True)
                return True
            except Exception as err:  # network, database locked, server 5xx: all transient here
                log.warning("metric logging failed (attempt %d/%d): %s", attempt + 1, self.retries, err)
                time.sleep(0.2 * 2**attempt)
        return False

    def close(self) -> list[tuple[int, dict[str, float]]]:
        """Stop the thread, make a last attempt, and return the rows that never got through."""
        self.stopped = True
        self.wake.set()
        self.thread.join()
        self.flush()
        return [(step, metrics) for step, _, metrics in self.pending]


class MlflowObserver(Observer):
    """Reports the loop's steps, evaluations and final artifacts to the active run."""

    def __init__(self, settings: PairtuneConfig) -> None:
        self.settings = settings
        self.mlflow = _mlflow()
        self.run_id = active_run_id()
        self.writer = MetricWriter(self.run_id, settings.tracking.flush_seconds)

    def on_train_start(self, context: dict[str, Any]) -> None:
        self.mlflow.log_params({f"run.{k}": v for k, v in context.items()})

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self.writer.put(step, metrics)

    def on_evaluate(self, step: int, epoch: float, metrics: dict[str, float]) -> None:
        from pairtune.evaluation import metric_key

        # Epoch ends are when users look: write now, with the steps before them.
        self.writer.put(step, {f"eval_{metric_key(k)}": v for k, v in metrics.items()}, urgent=True)

    def close(self) -> None:
        """Write what is left; rows the store never took go to ``<paths.reports>/unlogged_metrics.jsonl``."""
        unlogged = self.writer.close()
        if unlogged:
            path = Path(self.settings.paths.reports) / "unlogged_metrics.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a", encoding="utf-8") as handle:
                for step, metrics in unlogged:
                    handle.write(json.dumps({"run_id": self.run_id, "step": step, **metrics}) + "\n")
            log.error("%d metric rows could not be logged; written to %s", len(unlogged), path)

    def on_train_end(self, result: TrainResult) -> None:
        self.writer.flush()
        log_training_logs(result)
        log_plots(result)
        model_dir = result.model_dir
        write_run_id(model_dir, active_run_id())
        self.mlflow.log_artifact(str(model_dir / "README.md"))
        if self.settings.tracking.log_model:
            log_model(model_dir, self.settings.tracking.registered_model)


def log_training_logs(result: TrainResult) -> None:
    """The card's Training Logs table, as an MLflow table (``mlflow.load_table``) and as markdown."""
    import pandas as pd

    from pairtune.card import logs_table
    from pairtune.evaluation import CARD_METRICS

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
    mlflow.log_text("\n".join(logs_table(result.rows)) + "\n", "training_logs.md")


def log_plots(result: TrainResult) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mlflow = _mlflow()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(result.step_losses) + 1), result.step_losses)
    ax.set(xlabel="step", ylabel="MNRL loss", title="training loss")
    mlflow.log_figure(fig, "plots/loss_curve.png")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for metric in ("cosine_mrr@10", "cosine_ndcg@10", "cosine_accuracy@1"):
        ax.plot([r.step for r in result.rows], [r.metrics[metric] for r in result.rows], marker="o", label=metric)
    ax.set(xlabel="step", ylabel="eval score", title="eval retrieval metrics")
    ax.legend()
    mlflow.log_figure(fig, "plots/eval_metrics.png")
    plt.close(fig)


def pip_requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("sentence-transformers", "transformers", "torch", "tokenizers")]


def log_model(model_dir: Path, registered_name: str | None) -> None:
    """Log the saved model with a signature and an input example; register it and move the ``newest`` alias (MLflow reserves ``latest``)."""
    import numpy as np
    from mlflow.models import infer_signature
    from sentence_transformers import SentenceTransformer

    mlflow = _mlflow()
    model = SentenceTransformer(str(model_dir), device="cpu")
    example = ["Ada ? whr sh @ nit", "Ada wondered where the ship had gone that night."]
    signature = infer_signature(example, np.asarray(model.encode(example)))
    info = mlflow.sentence_transformers.log_model(
        model,
        name="model",
        signature=signature,
        input_example=example,
        pip_requirements=pip_requirements(),
        registered_model_name=registered_name,
    )
    if registered_name and info.registered_model_version is not None:
        mlflow.MlflowClient().set_registered_model_alias(registered_name, MODEL_ALIAS, str(info.registered_model_version))


def log_datasets(settings: PairtuneConfig) -> None:
    """The prepared train and eval splits as MLflow dataset inputs (name, digest, source, schema)."""
    import pandas as pd

    mlflow = _mlflow()
    folder = Path(settings.paths.prepared)
    for split, context in (("train", "training"), ("eval", "evaluation")):
        path = folder / f"{split}.parquet"
        if path.is_file():
            dataset = mlflow.data.from_pandas(pd.read_parquet(path), source=str(path), name=f"pairs-{split}")
            mlflow.log_input(dataset, context=context)


def log_run_config(settings: PairtuneConfig, config: dict[str, Any]) -> None:
    from omegaconf import OmegaConf

    mlflow = _mlflow()
    fits, overflow = split_params(flatten(config))
    items = list(fits.items())
    for start in range(0, len(items), PARAM_BATCH):
        mlflow.log_params(dict(items[start : start + PARAM_BATCH]))
    if overflow:
        mlflow.log_dict(overflow, "params_overflow.json")
    mlflow.log_text(OmegaConf.to_yaml(OmegaConf.create(redact_tree(config))), "config.yaml")


def run_tags(overrides: list[str], stage: str) -> dict[str, str]:
    tags = {
        "pairtune.stage": stage,
        "pairtune.command": redact(" ".join([Path(sys.argv[0]).name, *sys.argv[1:]])),
        "pairtune.overrides": redact(" ".join(overrides)) or "(none)",
        **git_state(project_root()),
    }
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.experiment"] = os.environ["DVC_EXP_NAME"]
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
        yield Observer()
        return
    mlflow = _mlflow()
    configure(settings)
    run = mlflow.start_run(
        run_id=resume_run_id,
        run_name=None if resume_run_id else settings.tracking.run_name,
        parent_run_id=parent_run_id,
        tags=None if resume_run_id else run_tags(overrides or [], stage),
    )
    status = "FAILED"
    try:
        if resume_run_id is None:
            log_run_config(settings, config)
            log_datasets(settings)
        observer = MlflowObserver(settings)
        try:
            yield observer
        finally:
            observer.close()
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
        log.info("MLflow run %s ended %s", run.info.run_id, status)


def active_run_id() -> str | None:
    run = _mlflow().active_run()
    return run.info.run_id if run else None


def write_run_id(folder: Path, run_id: str | None) -> None:
    if run_id:
        Path(folder, RUN_ID_FILE).write_text(json.dumps({"mlflow_run_id": run_id}) + "\n")


def read_run_id(folder: Path) -> str | None:
    path = Path(folder, RUN_ID_FILE)
    return json.loads(path.read_text()).get("mlflow_run_id") if path.is_file() else None


PARENT_ENV = "PAIRTUNE_MLFLOW_PARENT_RUN_ID"


def sweep_parent_run_id() -> str | None:
    """The sweep's parent run, when this job is part of a Hydra multirun that opened one."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return os.environ.get(PARENT_ENV)


def hydra_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover
    _HydraCallback = object


class SweepCallback(_HydraCallback):
    """Hydra callback: one parent run per multirun, children under it, a summary when the sweep ends.

    The parent id travels to the jobs in an environment variable, which the joblib launcher's worker
    processes inherit because they are started after ``on_multirun_start``.
    """

    def __init__(self, objective: str = "eval_cosine_mrr_at_10") -> None:
        self.objective = objective
        self.parent_run_id: str | None = None

    def on_multirun_start(self, config, **kwargs) -> None:
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

    def on_multirun_end(self, config, **kwargs) -> None:
        if self.parent_run_id is None:
            return
        summarise_sweep(self.parent_run_id, self.objective)
        os.environ.pop(PARENT_ENV, None)


def child_runs(parent_run_id: str):
    mlflow = _mlflow()
    return mlflow.search_runs(
        search_all_experiments=True,
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
        output_format="list",
    )


def summarise_sweep(parent_run_id: str, objective: str) -> dict[str, Any] | None:
    """Log the children's overrides -> objective table on the parent, tag the best child, end the parent."""
    import pandas as pd

    client = _mlflow().MlflowClient()
    children = child_runs(parent_run_id)
    rows = [
        {
            "run_id": child.info.run_id,
            "run_name": child.info.run_name,
            "status": child.info.status,
            "overrides": child.data.tags.get("pairtune.overrides", ""),
            objective: child.data.metrics.get(objective),
        }
        for child in children
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


class StageReporter:
    """What the evaluate and export stages log; this base class is the no-op used without tracking."""

    def log_metrics(self, metrics: dict[str, float]) -> None: ...
    def log_json(self, payload: dict, artifact_file: str) -> None: ...
    def log_comparison_plots(self, report: dict[str, dict[str, float]], folder: str) -> None: ...


class MlflowStageReporter(StageReporter):
    def log_metrics(self, metrics: dict[str, float]) -> None:
        _mlflow().log_metrics(metrics)

    def log_json(self, payload: dict, artifact_file: str) -> None:
        _mlflow().log_dict(payload, artifact_file)

    def log_comparison_plots(self, report: dict[str, dict[str, float]], folder: str) -> None:
        """One bar chart per metric: each entry of ``report`` (e.g. base, trained) side by side."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        labels = list(report)
        for metric in report[labels[0]]:
            fig, ax = plt.subplots(figsize=(4, 3))
            values = [report[label][metric] for label in labels]
            ax.bar(labels, values, color=["#9aa5b1", "#2a6fdb"][: len(labels)])
            for x, value in enumerate(values):
                ax.text(x, value, f"{value:.3f}", ha="center", va="bottom")
            ax.set(title=metric, ylim=(0, 1.05))
            _mlflow().log_figure(fig, f"{folder}/{metric}.png")
            plt.close(fig)


@contextmanager
def stage_run(settings: PairtuneConfig, *, stage: str) -> Iterator[StageReporter]:
    """Reopen the pipeline's run (its id is in the trained model folder) for a later stage."""
    run_id = read_run_id(Path(settings.paths.model))
    if run_id is None or not (settings.tracking.enabled and is_main_process()):
        if settings.tracking.enabled and run_id is None:
            log.warning("%s: no MLflow run id in %s; not tracked", stage, settings.paths.model)
        yield StageReporter()
        return
    with tracked_run(settings, config={}, stage=stage, resume_run_id=run_id):
        _mlflow().set_tag(f"pairtune.stage.{stage}", "done")
        yield MlflowStageReporter()
