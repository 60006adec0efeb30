"""The light core: plain types, user errors, the headline metric and the observer protocol.

Nothing here imports torch, sentence-transformers or MLflow, so the CLI, the prepare stage, the tracking
seam and the sweep callback can use these without paying for the heavy stack.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pairtune.config import ConfigError

#: The headline retrieval metric of the card, the tracker and every sweep, as the evaluator names it.
PRIMARY_METRIC = "cosine_mrr@10"
CARD_METRICS = (
    "cosine_accuracy@1",
    "cosine_accuracy@3",
    "cosine_accuracy@5",
    "cosine_accuracy@10",
    "cosine_mrr@10",
    "cosine_ndcg@10",
    "cosine_map@100",
)


#: A Hugging Face repository id: "name" or "owner/name" (letters, digits, "-", "_", ".").
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


#: What a Matryoshka run also reports at each of ``loss.matryoshka_dims`` (MLflow, the card's per-dim table).
DIM_METRICS = ("cosine_accuracy@1", "cosine_mrr@10", "cosine_ndcg@10")


def dim_metric(name: str, dim: int) -> str:
    """A metric at the first ``dim`` components of the embeddings: ``cosine_mrr@10_dim128``."""
    return f"{name}_dim{dim}"


def metric_key(name: str) -> str:
    """A metric name MLflow and DVC accept: ``cosine_ndcg@10`` -> ``cosine_ndcg_at_10``."""
    return name.replace("@", "_at_")


#: The objective sweeps optimise and ``pairtune runs`` sorts by: the eval split's MRR@10 as MLflow logs it.
OBJECTIVE = f"eval_{metric_key(PRIMARY_METRIC)}"


class PairDataError(ValueError):
    """A pairs file cannot be used; the message names the file, row and column."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stops rather than corrupt the model."""


class TrackingUnavailableError(RuntimeError):
    """The tracking server cannot be reached; raised before any training starts."""


class ExportParityError(RuntimeError):
    """An exported variant drifted from the PyTorch embeddings beyond the configured floor."""


class ResumeMismatchError(RuntimeError):
    """A checkpoint belongs to a run shaped differently from the one asked for."""


#: Errors a user can fix; an entry point ends with one line on stderr and exit status 2.
USER_ERRORS = (
    ConfigError,
    PairDataError,
    ExportParityError,
    NonFiniteLossError,
    TrackingUnavailableError,
    ResumeMismatchError,
)


@dataclass
class EpochRow:
    """One row of the card's Training Logs table: an evaluation, with the mean loss since the previous one."""

    epoch: float
    step: int
    training_loss: float | None
    metrics: dict[str, float]


@dataclass
class TrainResult:
    """What a finished training run hands to the card, the tracker and the sweeper."""

    model_dir: Path
    global_step: int
    epoch_steps: list[int]  # optimizer steps of each epoch (they may differ under no-duplicates sampling)
    total_steps: int
    world_size: int
    global_batch_size: int
    step_losses: list[float]
    rows: list[EpochRow]
    train_seconds: float
    pairs_per_second: float
    similarity: str = "cosine"
    selected_step: int | None = None  # train.select_best: the step whose weights were saved
    final_dir: Path | None = None  # the final model (paths.final): the guard's blend, or the trained model
    guard: Any = None  # pairtune.train.guard.GuardReport when the guard ran
    warnings: list[str] = field(default_factory=list)  # "why no gain" signals the run raised
    padded: str | None = None  # model.unpad=auto on an encoder without an unpadded forward: said on the card

    @property
    def final_metrics(self) -> dict[str, float]:
        """The eval metrics of the saved model: the selected step's row, else the last row."""
        for row in self.rows:
            if self.selected_step is not None and row.step == self.selected_step:
                return row.metrics
        return self.rows[-1].metrics if self.rows else {}

    @property
    def objective(self) -> float:
        return self.final_metrics.get(PRIMARY_METRIC, float("nan"))


class Observer(Protocol):
    """What the training loop reports, on the main process only; the tracker implements it."""

    run_id: str | None  # the tracking run, saved in checkpoints so a resume reopens it

    def on_train_start(self, context: dict[str, Any]) -> None: ...
    def on_resume(self, step: int) -> None: ...
    def on_step(self, step: int, metrics: dict[str, float]) -> None: ...
    def on_evaluate(self, step: int, epoch: float, metrics: dict[str, float]) -> None: ...
    def on_train_end(self, result: TrainResult) -> None: ...


class NullObserver:
    """The observer of an untracked run and of every process but the main one: hears everything, keeps nothing."""

    run_id: str | None = None

    def on_train_start(self, context: dict[str, Any]) -> None: ...
    def on_resume(self, step: int) -> None: ...
    def on_step(self, step: int, metrics: dict[str, float]) -> None: ...
    def on_evaluate(self, step: int, epoch: float, metrics: dict[str, float]) -> None: ...
    def on_train_end(self, result: TrainResult) -> None: ...
