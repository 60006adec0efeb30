"""Baseline: the seed card's recipe with sentence-transformers' own SentenceTransformerTrainer.

Trains on ``<prepared>/train.parquet``, scores eval and test with pairtune's evaluators and prints one JSON
line on stdout (everything else goes to stderr). ``train_seconds`` is the wall time of ``trainer.train()``;
``step_seconds`` sums the optimizer steps only (epoch starts to step ends), the span pairtune's loop times.
"""

from __future__ import annotations

import benchkit  # first: it forces the hub off before transformers is imported

# isort: split
import contextlib
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from datasets import Dataset
from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
from transformers import TrainerCallback

from pairtune.modeling import load_model

log = logging.getLogger("bench.trainer")


class StepTimer(TrainerCallback):
    """Sums the time from each epoch start or step end to the next step end: data, forward, backward, update."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._mark = time.perf_counter()

    def on_epoch_begin(self, args, state, control, **kwargs) -> None:
        self._mark = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs) -> None:
        now = time.perf_counter()
        self.seconds += now - self._mark
        self._mark = now


def build_arguments(output_dir: str, *, epochs: int, max_steps: int) -> SentenceTransformerTrainingArguments:
    """The seed card's hyperparameters; no saving, no evaluation, no reporting inside the timed call."""
    return SentenceTransformerTrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=benchkit.BATCH_SIZE,
        num_train_epochs=epochs,
        learning_rate=5e-5,
        lr_scheduler_type="linear",
        warmup_steps=0,
        seed=42,
        max_steps=max_steps,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        logging_steps=1,
        dataloader_drop_last=False,
    )


def train_with_trainer(model, train_frame: pd.DataFrame, *, epochs: int, max_steps: int) -> dict[str, Any]:
    """Run ``trainer.train()`` once and return its timings, step count and per-step losses."""
    timer = StepTimer()
    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as output_dir:
        trainer = SentenceTransformerTrainer(
            model=model,
            args=build_arguments(output_dir, epochs=epochs, max_steps=max_steps),
            train_dataset=Dataset.from_pandas(train_frame, preserve_index=False),
            loss=MultipleNegativesRankingLoss(model, scale=20.0),  # cos_sim by default
            callbacks=[timer],
        )
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {
        "steps": trainer.state.global_step,
        "train_seconds": seconds,
        "step_seconds": timer.seconds,
        "step_losses": losses,
    }


def run(prepared: Path, *, epochs: int, max_steps: int) -> dict[str, Any]:
    frames = {name: pd.read_parquet(prepared / f"{name}.parquet") for name in ("train", "eval", "test")}
    model = load_model(benchkit.MODEL_ID, max_seq_length=benchkit.MAX_SEQ_LENGTH)
    trained = train_with_trainer(model, frames["train"], epochs=epochs, max_steps=max_steps)
    pairs = benchkit.pairs_processed(len(frames["train"]), benchkit.BATCH_SIZE, trained["steps"])
    losses = trained.pop("step_losses")
    log.info("trained %d steps, %d pairs in %.1f s", trained["steps"], pairs, trained["train_seconds"])
    return {
        "system": "trainer",
        "epochs": epochs,
        "max_steps": max_steps,
        "pairs": pairs,
        "threads": torch.get_num_threads(),
        **trained,
        "wall_seconds": trained["train_seconds"],
        **benchkit.throughput(pairs, train=trained["train_seconds"], steps=trained["step_seconds"]),
        **benchkit.eval_metrics(model, frames["eval"]),
        **benchkit.test_metrics(model, frames["test"]),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "step_losses": losses,
        "peak_rss_mb": benchkit.peak_rss_mb(),
    }


def main() -> int:
    args = benchkit.common_parser(__doc__.splitlines()[0]).parse_args()
    benchkit.setup_logging()
    with contextlib.redirect_stdout(sys.stderr):  # the Trainer prints its log dicts to stdout
        result = run(args.prepared, epochs=args.epochs, max_steps=args.max_steps)
    benchkit.emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
