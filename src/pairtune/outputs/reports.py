"""Series for ``dvc plots``: the training loss per step and the eval metrics per evaluation, as CSV."""

from __future__ import annotations

from pathlib import Path

from pairtune.core import CARD_METRICS, TrainResult, metric_key
from pairtune.files import write_json_atomic, write_text_atomic


def write_training_plots(result: TrainResult, reports: str | Path) -> None:
    folder = Path(reports) / "plots"
    loss_rows = ["step,train_loss", *(f"{i},{v:.6f}" for i, v in enumerate(result.step_losses, start=1))]
    write_text_atomic(folder / "train_loss.csv", "\n".join(loss_rows) + "\n")
    keys = [metric_key(m) for m in CARD_METRICS]
    eval_rows = ["step,epoch," + ",".join(f"eval_{k}" for k in keys)]
    for row in result.rows:
        eval_rows.append(f"{row.step},{row.epoch}," + ",".join(f"{row.metrics[m]:.6f}" for m in CARD_METRICS))
    write_text_atomic(folder / "eval_metrics.csv", "\n".join(eval_rows) + "\n")


def write_guard_report(result: TrainResult, reports: str | Path) -> None:
    """``reports/guard.json``: the final model's blend, why, general retrieval of base, trained and final."""
    if result.guard is not None:
        write_json_atomic(Path(reports) / "guard.json", result.guard.as_dict())
