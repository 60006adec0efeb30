"""The baseline's whole job: the seed card's recipe with sentence-transformers' SentenceTransformerTrainer.

Written as a trainer user writes it, and importing nothing of pairtune or Hydra (they are not the trainer's
costs): read the prepared splits, load the base model, train with an InformationRetrievalEvaluator on the
eval split (built as ``pairtune.outputs.evaluation.build_evaluator`` builds it) run before training and after every
epoch, then ``model.save``. It writes its timings to ``--out``; the bench times the process from outside.

``step_seconds`` sums what pairtune's loop timer sums (``UpdateWindow`` in src/pairtune/train/training.py): from
fetching the first micro-batch of an update (for the trainer: its DataLoader, which also tokenises) to the
end of the optimizer step, logging, evaluation and saving left out. ``on_step_begin`` fires only after the
trainer has fetched the batches, so the callback's start mark is set by a one-line ``get_batch_samples``
override that does nothing else.
"""

from __future__ import annotations

import benchkit  # first: the script's start time; forces the hub off before transformers is imported

# isort: split
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from datasets import Dataset
from sentence_transformers import (
    SentenceTransformer,
    SentenceTransformerTrainer,
    SentenceTransformerTrainingArguments,
)
from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
from transformers import TrainerCallback

IMPORTS_DONE = time.time()
NDCG, MRR = "eval_cosine_ndcg@10", "eval_cosine_mrr@10"


class StepTimer(TrainerCallback):
    """Sums each update's span: batch fetch (set by :meth:`begin`) to ``on_step_end`` (after the optimizer step)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.steps = 0
        self._started: float | None = None

    def begin(self) -> None:
        self._started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs) -> None:
        if self._started is not None:
            self.seconds += time.perf_counter() - self._started
            self.steps += 1
        self._started = None


class EvalTimer(TrainerCallback):
    """Times each evaluation (it follows ``on_train_begin`` or ``on_epoch_end``) and keeps its metrics."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.metrics: list[dict[str, float]] = []
        self.train_begin: float | None = None
        self._mark = time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        self.train_begin = time.time()
        self._mark = time.perf_counter()

    def on_epoch_end(self, args, state, control, **kwargs) -> None:
        self._mark = time.perf_counter()

    def on_evaluate(self, args, state, control, metrics=None, **kwargs) -> None:
        self.seconds.append(time.perf_counter() - self._mark)
        self.metrics.append(dict(metrics or {}))


class TimedTrainer(SentenceTransformerTrainer):
    """The stock trainer; fetching an update's batches also starts the step timer's span."""

    step_timer: StepTimer

    def get_batch_samples(self, *args, **kwargs):
        self.step_timer.begin()
        return super().get_batch_samples(*args, **kwargs)


def build_ir_evaluator(frame: pd.DataFrame, *, name: str = "eval", batch_size: int = benchkit.BATCH_SIZE):
    """The evaluator ``pairtune.outputs.evaluation.build_evaluator`` builds (tests/test_bench.py checks they agree)."""
    anchor, positive = benchkit.COLUMNS
    query_ids = {text: f"q{i}" for i, text in enumerate(dict.fromkeys(frame[anchor]))}
    doc_ids = {text: f"d{i}" for i, text in enumerate(dict.fromkeys(frame[positive]))}
    relevant: dict[str, set[str]] = {}
    for note, sentence in zip(frame[anchor], frame[positive], strict=True):
        relevant.setdefault(query_ids[note], set()).add(doc_ids[sentence])
    return InformationRetrievalEvaluator(
        queries={qid: text for text, qid in query_ids.items()},
        corpus={did: text for text, did in doc_ids.items()},
        relevant_docs=relevant,
        name=name,
        batch_size=batch_size,
        write_csv=False,
        score_functions=None,
        main_score_function="cosine",
    )


def build_arguments(
    output_dir: str, *, epochs: int, max_steps: int, bf16: bool, batch_size: int = benchkit.BATCH_SIZE
) -> SentenceTransformerTrainingArguments:
    """The seed card's hyperparameters; evaluation before training and at every epoch end; no checkpoints."""
    return SentenceTransformerTrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=benchkit.BATCH_SIZE,
        num_train_epochs=epochs,
        max_steps=max_steps,
        learning_rate=5e-5,
        lr_scheduler_type="linear",
        warmup_steps=0,
        seed=42,
        bf16=bf16,
        use_cpu=True,
        eval_strategy="epoch",
        eval_on_start=True,
        save_strategy="no",
        report_to="none",
        dataloader_drop_last=False,
    )


def train_and_save(args, frames: dict[str, pd.DataFrame], model: SentenceTransformer) -> dict[str, Any]:
    """Train with evaluations, save the model; the timings of each part."""
    steps, evals = StepTimer(), EvalTimer()
    trainer = TimedTrainer(
        model=model,
        args=build_arguments(
            str(args.work / "trainer"),
            epochs=args.epochs,
            max_steps=args.max_steps,
            bf16=args.precision == "bf16",
            batch_size=args.batch_size,
        ),
        train_dataset=Dataset.from_pandas(frames["train"], preserve_index=False),
        loss=MultipleNegativesRankingLoss(model, scale=20.0),  # cos_sim by default
        evaluator=build_ir_evaluator(frames["eval"]),
        callbacks=[steps, evals],
    )
    trainer.step_timer = steps
    started = time.perf_counter()
    trainer.train()
    train_call = time.perf_counter() - started
    trained_at = time.time()
    model.save(str(args.work / "model"))
    final = evals.metrics[-1] if evals.metrics else {}
    summary = next((e for e in reversed(trainer.state.log_history) if "train_loss" in e), {})
    return {
        "mixed_precision": trainer.accelerator.mixed_precision,
        "mean_train_loss": summary.get("train_loss"),
        "steps": trainer.state.global_step,
        "timed_steps": steps.steps,
        "step_seconds": steps.seconds,
        "eval_seconds": evals.seconds,
        "train_call_seconds": train_call,
        "marks": {"train_start": evals.train_begin, "train_end": trained_at, "model_saved": time.time()},
        "eval_ndcg_at_10": final.get(NDCG),
        "eval_mrr_at_10": final.get(MRR),
        "eval_ndcg_at_10_first": evals.metrics[0].get(NDCG) if evals.metrics else None,
    }


def main() -> int:
    parser = benchkit.job_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--model", type=Path, required=True, help="the base model's folder (the bundled copy)"
    )
    args = parser.parse_args()
    benchkit.setup_logging()
    frames = {name: pd.read_parquet(args.prepared / f"{name}.parquet") for name in ("train", "eval")}
    model = SentenceTransformer(str(args.model), device="cpu")
    model.max_seq_length = benchkit.MAX_SEQ_LENGTH
    loaded = time.time()
    timings = train_and_save(args, frames, model)
    result = {
        "system": "trainer",
        "epochs": args.epochs,
        "max_steps": args.max_steps,
        "precision": args.precision,
        "threads": torch.get_num_threads(),
        "global_batch_size": args.batch_size,
        **timings,
    }
    result["marks"] |= {
        "script_start": benchkit.SCRIPT_START,
        "imports_done": IMPORTS_DONE,
        "model_loaded": loaded,
    }
    result["model_dir"] = str(args.work / "model")
    benchkit.write_result(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
