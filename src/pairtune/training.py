"""The Accelerate training loop for MNRL, split into small named steps.

Works unchanged on one CPU, one GPU, several GPUs (``accelerate launch``) and several CPU processes
(``torchrun`` with gloo). Only the main process evaluates, reports, writes the card and saves the model.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from sentence_transformers import SentenceTransformer
from transformers import get_scheduler

from pairtune.batching import TokenizedColumns, tokenize_columns
from pairtune.config import LossConfig, PairtuneConfig, TrainConfig
from pairtune.data import Columns, load_prepared, write_atomic_dir
from pairtune.evaluation import PRIMARY_METRIC, build_evaluator, run_evaluator
from pairtune.losses import cached_mnrl_step, mnrl_loss
from pairtune.modeling import load_model
from pairtune.sampling import GlobalBatchSampler
from pairtune.signals import STOP, TrainingInterrupted
from pairtune.unpad import UnpaddedEncoder, supports_unpadding

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stops rather than corrupt the model."""


class Observer:
    """Hooks the loop calls on the main process only; the tracker implements them. All default to no-ops."""

    run_id: str | None = None  # the tracking run, saved in checkpoints so a resume reopens it

    def on_train_start(self, context: dict[str, Any]) -> None: ...
    def on_step(self, step: int, metrics: dict[str, float]) -> None: ...
    def on_evaluate(self, step: int, epoch: float, metrics: dict[str, float]) -> None: ...
    def on_train_end(self, result: TrainResult) -> None: ...


@dataclass
class EpochRow:
    """One row of the card's Training Logs table."""

    epoch: float
    step: int
    training_loss: float | None
    metrics: dict[str, float]


@dataclass
class TrainResult:
    model_dir: Path
    global_step: int
    steps_per_epoch: int
    total_steps: int
    world_size: int
    global_batch_size: int
    step_losses: list[float]
    rows: list[EpochRow]
    train_seconds: float
    pairs_per_second: float
    context: dict[str, Any] = field(default_factory=dict)

    @property
    def final_metrics(self) -> dict[str, float]:
        return self.rows[-1].metrics if self.rows else {}

    @property
    def objective(self) -> float:
        return self.final_metrics.get(PRIMARY_METRIC, float("nan"))


@dataclass
class Schedule:
    """Optimizer steps per epoch and in all; epochs may differ in batches under no-duplicates sampling."""

    epoch_batches: list[int]
    accumulation: int
    max_steps: int

    @classmethod
    def for_sampler(cls, sampler: GlobalBatchSampler, train: TrainConfig) -> Schedule:
        counts = []
        for epoch in range(train.epochs):
            sampler.set_epoch(epoch)
            counts.append(len(sampler))
        sampler.set_epoch(0)
        return cls(counts, train.gradient_accumulation_steps, train.max_steps)

    @property
    def epoch_steps(self) -> list[int]:
        return [math.ceil(batches / self.accumulation) for batches in self.epoch_batches]

    @property
    def steps_per_epoch(self) -> int:
        return self.epoch_steps[0]

    @property
    def total_steps(self) -> int:
        full = sum(self.epoch_steps)
        return min(full, self.max_steps) if self.max_steps > 0 else full


def build_accelerator(train: TrainConfig) -> Accelerator:
    """CPU when no GPU is present (gloo under torchrun), else the launcher's devices."""
    # Accumulation is done by the loop itself (it averages the window's gradients), so Accelerate must not
    # also divide the loss by the accumulation steps.
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=train.mixed_precision)


def build_sampler(n_rows: int, train: TrainConfig, accelerator: Accelerator, texts=None) -> GlobalBatchSampler:
    return GlobalBatchSampler(
        n_rows,
        train.batch_size,
        seed=train.seed,
        world_size=accelerator.num_processes,
        rank=accelerator.process_index,
        drop_last=train.drop_last,
        texts=texts if train.batch_sampler == "no_duplicates" else None,
    )


def build_optimizer(model: torch.nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    """AdamW as the seed card's trainer builds it: no weight decay on biases and LayerNorm weights."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if name.endswith("bias") or "LayerNorm" in name else decay).append(param)
    groups = [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        groups, lr=train.lr, betas=(train.adam_beta1, train.adam_beta2), eps=train.adam_epsilon, fused=True
    )


def embed_fn(model: torch.nn.Module, accelerator: Accelerator):
    def embed(features: dict[str, torch.Tensor]) -> torch.Tensor:
        features = {key: value.to(accelerator.device, non_blocking=True) for key, value in features.items()}
        with accelerator.autocast():
            return model(features)["sentence_embedding"]  # (B, D)

    return embed


def compute_loss_and_backward(
    model, accelerator: Accelerator, batches, loss: LossConfig, *, sync: bool
) -> torch.Tensor:
    """Forward and backward for one micro-batch; DDP gradient sync only when ``sync``."""
    embed = embed_fn(model, accelerator)
    gather = loss.gather_across_devices and accelerator.num_processes > 1
    if loss.mini_batch_size is None:
        with nullcontext() if sync else accelerator.no_sync(model):
            embeddings = [embed(features) for features in batches]
            value = mnrl_loss(embeddings[0], embeddings[1:], scale=loss.scale, similarity=loss.similarity, gather=gather)
            accelerator.backward(value)
        return value.detach()

    def backward(surrogate: torch.Tensor, is_last: bool) -> None:
        with nullcontext() if (sync and is_last) else accelerator.no_sync(model):
            accelerator.backward(surrogate)

    return cached_mnrl_step(
        embed,
        batches,
        mini_batch_size=loss.mini_batch_size,
        scale=loss.scale,
        similarity=loss.similarity,
        gather=gather,
        backward=backward,
    )


def optimizer_step(model, optimizer, scheduler, accelerator: Accelerator, max_grad_norm: float) -> float:
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(grad_norm)


def encoder_for_training(model: SentenceTransformer, unpad: bool) -> torch.nn.Module:
    """The module the loop trains: the model itself, or its unpadded forward when asked and supported."""
    if not unpad:
        return model
    if not supports_unpadding(model):
        encoder = getattr(model[0], "auto_model", model[0])
        log.info("model.unpad: %s is not a BERT encoder, training with padded batches", type(encoder).__name__)
        return model
    return UnpaddedEncoder(model)


def sentence_model(accelerator: Accelerator, model: torch.nn.Module) -> SentenceTransformer:
    """The SentenceTransformer behind the prepared (and possibly unpadded) training module."""
    unwrapped = accelerator.unwrap_model(model)
    return unwrapped.model if isinstance(unwrapped, UnpaddedEncoder) else unwrapped


def evaluate_on_main(accelerator: Accelerator, model, evaluator) -> dict[str, float]:
    """The main process scores the eval split; the others wait and receive the same numbers."""
    payload = [None]
    if accelerator.is_main_process:
        unwrapped = sentence_model(accelerator, model)
        was_training = unwrapped.training
        unwrapped.eval()
        payload = [run_evaluator(evaluator, unwrapped)]
        unwrapped.train(was_training)
    if accelerator.num_processes > 1:
        broadcast_object_list(payload, from_process=0)
    return payload[0]


@dataclass
class LoopState:
    """The loop's counters; with the Accelerate state they make a checkpoint resumable exactly."""

    step: int = 0
    epoch: int = 0  # the epoch in progress
    batches_done: int = 0  # batches of that epoch already trained
    step_losses: list[float] = field(default_factory=list)
    rows: list[EpochRow] = field(default_factory=list)
    pairs_seen: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {**{k: v for k, v in self.__dict__.items() if k != "rows"}, "rows": [r.__dict__ for r in self.rows]}

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> LoopState:
        rows = [EpochRow(**row) for row in payload.pop("rows")]
        return cls(**payload, rows=rows)


def run_epoch(
    epoch: int,
    *,
    model,
    optimizer,
    scheduler,
    accelerator: Accelerator,
    sampler: GlobalBatchSampler,
    tokens: TokenizedColumns,
    settings: PairtuneConfig,
    schedule: Schedule,
    state: LoopState,
    observer: Observer,
) -> None:
    """Train one epoch (or up to ``max_steps``), from ``state.batches_done`` when resuming mid-epoch."""
    train_cfg = settings.train
    sampler.set_epoch(epoch)
    local_batches = list(sampler)
    skip = state.batches_done if state.epoch == epoch else 0  # > 0 when resuming mid-epoch
    state.epoch, state.batches_done = epoch, skip
    window: list[torch.Tensor] = []
    window_pairs = 0
    started = time.perf_counter()
    for index, rows in enumerate(local_batches):
        if index < skip:
            continue
        is_update = (index + 1) % train_cfg.gradient_accumulation_steps == 0 or index + 1 == len(local_batches)
        window_pairs += len(rows)
        window.append(
            compute_loss_and_backward(
                model, accelerator, tokens.batch(rows), settings.loss, sync=is_update
            )
        )
        if not is_update:
            continue
        group = len(window)
        if group > 1:  # average the accumulated gradients, not sum them
            for param in model.parameters():
                if param.grad is not None:
                    param.grad.div_(group)
        step_loss = float(accelerator.reduce(torch.stack(window).mean(), reduction="mean"))
        if not math.isfinite(step_loss):  # before the update: the model in memory stays the last good one
            raise NonFiniteLossError(f"non-finite loss {step_loss} at step {state.step + 1}")
        grad_norm = optimizer_step(model, optimizer, scheduler, accelerator, train_cfg.max_grad_norm)
        window.clear()
        state.step += 1
        state.batches_done = index + 1
        state.step_losses.append(step_loss)
        pairs = int(accelerator.reduce(torch.tensor(window_pairs, device=accelerator.device), reduction="sum"))
        window_pairs = 0
        state.pairs_seen += pairs
        elapsed = time.perf_counter() - started
        state.seconds += elapsed
        if accelerator.is_main_process:
            observer.on_step(
                state.step,
                {
                    "train_loss": step_loss,
                    "learning_rate": scheduler.get_last_lr()[0],
                    "grad_norm": grad_norm,
                    "pairs_per_second": pairs / elapsed if elapsed > 0 else 0.0,
                    "epoch": epoch + (index + 1) / len(local_batches),
                },
            )
        started = time.perf_counter()  # reporting is not step time
        if stop_requested(accelerator):
            if train_cfg.save_checkpoints:
                save_checkpoint(accelerator, Path(settings.paths.checkpoints), state, train_cfg.keep_checkpoints,
                                run_id=observer.run_id)
            raise TrainingInterrupted(STOP.signum, state.step)
        if state.step >= schedule.total_steps:
            break


def stop_requested(accelerator: Accelerator) -> bool:
    """True on every process when any of them got a signal, so all stop at the same step boundary."""
    if accelerator.num_processes == 1:
        return STOP.requested
    flag = torch.tensor(int(STOP.requested), device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item())


def save_checkpoint(
    accelerator: Accelerator, folder: Path, state: LoopState, keep: int, *, run_id: str | None = None
) -> Path:
    """``accelerator.save_state`` plus the loop's counters, written beside and renamed into place.

    Only the newest ``keep`` checkpoints survive; a crash mid-write leaves a ``.tmp`` folder, never a
    half-written ``step-*`` one.
    """
    target = folder / f"step-{state.step:06d}"
    staging = folder / f".step-{state.step:06d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        meta = {"state": state.to_json(), "mlflow_run_id": run_id}
        (staging / CHECKPOINT_STATE).write_text(json.dumps(meta) + "\n")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
        for old in sorted(folder.glob("step-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return target


CHECKPOINT_STATE = "pairtune_state.json"


def latest_checkpoint(folder: str | Path) -> Path | None:
    found = sorted(p for p in Path(folder).glob("step-*") if (p / CHECKPOINT_STATE).is_file())
    return found[-1] if found else None


def checkpoint_run_id(folder: str | Path) -> str | None:
    """The tracking run a checkpoint belongs to, so a resumed run logs into it."""
    latest = latest_checkpoint(folder)
    return json.loads((latest / CHECKPOINT_STATE).read_text()).get("mlflow_run_id") if latest else None


def clear_checkpoints(folder: Path) -> None:
    """A fresh run starts with no checkpoints of an earlier one, so a later resume cannot pick those up."""
    stale = sorted(folder.glob("step-*")) + sorted(folder.glob(".step-*.tmp"))
    if stale:
        log.info("removing %d checkpoints of an earlier run from %s", len(stale), folder)
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)


def restore_checkpoint(accelerator: Accelerator, folder: Path) -> LoopState:
    accelerator.load_state(str(folder))
    meta = json.loads((folder / CHECKPOINT_STATE).read_text())
    log.info("resumed from %s (step %s)", folder, meta["state"]["step"])
    return LoopState.from_json(meta["state"])


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Set torch's intra-op threads for one run and restore the process-wide value afterwards."""
    previous = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass
class Run:
    """Everything one training run holds, built once by :func:`setup_run`."""

    accelerator: Accelerator
    model: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    sampler: GlobalBatchSampler
    schedule: Schedule
    tokens: TokenizedColumns
    evaluator: Any
    splits: dict[str, Any]
    columns: Columns
    context: dict[str, Any]


def setup_run(settings: PairtuneConfig, accelerator: Accelerator) -> Run:
    train_cfg = settings.train
    set_seed(train_cfg.seed)
    columns = Columns(settings.data.anchor_column, settings.data.positive_column, settings.data.negative_column)
    splits = load_prepared(settings.paths.prepared)
    model = load_model(
        settings.model.name,
        max_seq_length=settings.model.max_seq_length,
        trust_remote_code=settings.model.trust_remote_code,
        device=str(accelerator.device),
        dropout=settings.model.dropout,
    )
    frame = splits["train"]
    with accelerator.main_process_first():
        tokens = tokenize_columns(
            model.tokenizer, [frame[c].tolist() for c in columns.names], max_length=settings.model.max_seq_length
        )
    texts = list(zip(*(frame[c].tolist() for c in columns.names), strict=True))
    sampler = build_sampler(len(frame), train_cfg, accelerator, texts=texts)
    schedule = Schedule.for_sampler(sampler, train_cfg)
    optimizer = build_optimizer(model, train_cfg)
    scheduler = get_scheduler(
        train_cfg.scheduler, optimizer, num_warmup_steps=train_cfg.warmup_steps, num_training_steps=schedule.total_steps
    )
    model.train()
    model, optimizer = accelerator.prepare(encoder_for_training(model, settings.model.unpad), optimizer)
    accelerator.register_for_checkpointing(scheduler)
    evaluator = build_evaluator(splits["eval"], columns, name="eval", batch_size=train_cfg.eval_batch_size)
    context = {
        "world_size": accelerator.num_processes,
        "global_batch_size": sampler.global_batch_size,
        "steps_per_epoch": schedule.steps_per_epoch,
        "total_steps": schedule.total_steps,
        "device": str(accelerator.device),
        "train_rows": len(frame),
        "eval_rows": len(splits["eval"]),
    }
    return Run(accelerator, model, optimizer, scheduler, sampler, schedule, tokens, evaluator, splits, columns, context)


def train(settings: PairtuneConfig, *, observer: Observer | None = None) -> TrainResult:
    """Train on the prepared splits, evaluate each epoch, save the model and its card (main process)."""
    observer = observer or Observer()
    with torch_threads(settings.train.num_threads):
        accelerator = build_accelerator(settings.train)
        try:
            run = setup_run(settings, accelerator)
            result = run_training(settings, run, observer)
            if accelerator.is_main_process:
                unwrapped = sentence_model(accelerator, run.model)
                write_atomic_dir(
                    result.model_dir,
                    lambda folder: save_with_card(unwrapped, folder, settings, result, run.splits["train"], run.columns),
                )
                observer.on_train_end(result)
            accelerator.wait_for_everyone()
        finally:
            accelerator.end_training()
    return result


def run_training(settings: PairtuneConfig, run: Run, observer: Observer) -> TrainResult:
    """The epoch loop: step-0 evaluation, then per epoch train, evaluate and checkpoint."""
    train_cfg, accelerator, schedule = settings.train, run.accelerator, run.schedule
    if accelerator.is_main_process:
        observer.on_train_start(run.context)
        log.info("training %s steps (%s per epoch), global batch %s", schedule.total_steps,
                 schedule.steps_per_epoch, run.sampler.global_batch_size)
    checkpoints = Path(settings.paths.checkpoints)
    resume_from = latest_checkpoint(checkpoints) if train_cfg.resume else None
    if train_cfg.resume and resume_from is None:
        log.warning("train.resume=true but no checkpoint in %s: starting from scratch", checkpoints)
    if not resume_from and train_cfg.save_checkpoints and accelerator.is_main_process:
        clear_checkpoints(checkpoints)
    accelerator.wait_for_everyone()
    state = restore_checkpoint(accelerator, resume_from) if resume_from else LoopState()
    if train_cfg.eval_on_start and not resume_from:
        record_evaluation(accelerator, run.model, run.evaluator, state, observer, epoch=0.0, loss=None)
    for epoch in range(state.epoch, train_cfg.epochs):
        if state.step >= schedule.total_steps:
            break
        run_epoch(
            epoch, model=run.model, optimizer=run.optimizer, scheduler=run.scheduler, accelerator=accelerator,
            sampler=run.sampler, tokens=run.tokens, settings=settings, schedule=schedule, state=state,
            observer=observer,
        )
        losses = state.step_losses[sum(schedule.epoch_steps[:epoch]) :]  # this epoch's, across a resume
        finished_epoch = len(losses) == schedule.epoch_steps[epoch]
        epoch_mark = float(epoch + 1) if finished_epoch else round(epoch + len(losses) / schedule.epoch_steps[epoch], 4)
        mean_loss = sum(losses) / len(losses) if losses else None
        record_evaluation(accelerator, run.model, run.evaluator, state, observer, epoch=epoch_mark, loss=mean_loss)
        state.epoch, state.batches_done = epoch + 1, 0
        if train_cfg.save_checkpoints:
            save_checkpoint(accelerator, checkpoints, state, train_cfg.keep_checkpoints, run_id=observer.run_id)
        if state.step >= schedule.total_steps:
            break
    return TrainResult(
        model_dir=Path(settings.paths.model),
        global_step=state.step,
        steps_per_epoch=schedule.steps_per_epoch,
        total_steps=schedule.total_steps,
        world_size=accelerator.num_processes,
        global_batch_size=run.sampler.global_batch_size,
        step_losses=state.step_losses,
        rows=state.rows,
        train_seconds=state.seconds,
        pairs_per_second=state.pairs_seen / state.seconds if state.seconds else 0.0,
        context=run.context,
    )


def record_evaluation(accelerator, model, evaluator, state: LoopState, observer: Observer, *, epoch, loss) -> None:
    metrics = evaluate_on_main(accelerator, model, evaluator)
    state.rows.append(EpochRow(epoch=epoch, step=state.step, training_loss=loss, metrics=metrics))
    if accelerator.is_main_process:
        log.info("epoch %s step %s: %s %.4f", epoch, state.step, PRIMARY_METRIC, metrics[PRIMARY_METRIC])
        observer.on_evaluate(state.step, epoch, metrics)


def save_with_card(model, folder: Path, settings: PairtuneConfig, result: TrainResult, train_frame, columns) -> None:
    from pairtune.card import write_model_card

    model.save(str(folder), create_model_card=False, safe_serialization=True)
    write_model_card(folder / "README.md", model=model, settings=settings, result=result, train_frame=train_frame,
                     columns=columns)
