"""The Accelerate training loop for MNRL, split into small named steps.

Works unchanged on one CPU, one GPU, several GPUs (``accelerate launch``) and several CPU processes
(``torchrun`` with gloo). Only the main process evaluates, reports, writes the card and saves the model;
the other processes wait for its evaluation at a collective (``train.collective_timeout_minutes``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration, broadcast_object_list, set_seed
from sentence_transformers import SentenceTransformer
from transformers import get_scheduler

from pairtune.config import ConfigError, LossConfig, PairtuneConfig, TrainConfig, settle_batch_sampler
from pairtune.core import (
    CARD_METRICS,
    PRIMARY_METRIC,
    EpochRow,
    NonFiniteLossError,
    NullObserver,
    Observer,
    TrainResult,
)
from pairtune.data.batching import TokenizedColumns, tokenize_columns
from pairtune.data.pairs import Columns, load_prepared
from pairtune.data.sampling import GlobalBatchSampler, SourceBatchSampler, text_ids_from_columns
from pairtune.data.sources import SOURCE_COLUMN
from pairtune.files import write_atomic_dir
from pairtune.model.losses import batch_signals, cached_mnrl_step, mnrl_loss, ranking_loss
from pairtune.model.modeling import load_model
from pairtune.model.unpad import UnpaddedEncoder, supports_unpadding
from pairtune.outputs.evaluation import build_split_evaluator, cap_rows, run_evaluator
from pairtune.train.checkpoint import Checkpoint, LoopState
from pairtune.train.memory import reuse_freed_memory
from pairtune.train.selection import BestWeights
from pairtune.train.signals import STOP, TrainingInterrupted

log = logging.getLogger(__name__)


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
    def total_steps(self) -> int:
        full = sum(self.epoch_steps)
        return min(full, self.max_steps) if self.max_steps > 0 else full


def build_accelerator(train: TrainConfig) -> Accelerator:
    """CPU when no GPU is present (gloo under torchrun), else the launcher's devices.

    Accumulation is done by the loop itself (it averages the window's gradients), so Accelerate must not
    also divide the loss by the accumulation steps. On a CPU, bf16 is ``torch.autocast`` (the weights and
    the optimizer stay fp32); fp16 is refused there, because Accelerate would quietly train in fp32.
    """
    cpu = not torch.cuda.is_available()
    if cpu and train.mixed_precision == "fp16":
        raise ConfigError("config key 'train.mixed_precision': fp16 needs a GPU; on a CPU use bf16 or no")
    forget_other_precision(train.mixed_precision)
    timeout = InitProcessGroupKwargs(timeout=timedelta(minutes=train.collective_timeout_minutes))
    project = ProjectConfiguration(save_on_each_node=not train.shared_filesystem)
    return Accelerator(
        cpu=cpu,
        mixed_precision=train.mixed_precision,
        kwargs_handlers=[timeout],
        project_config=project,
    )


def forget_other_precision(mixed_precision: str) -> None:
    """Let this run choose its precision when an earlier run in the process chose another.

    Accelerate keeps one precision per process and refuses a second; a sweep's next job or a test may ask
    for bf16 after an fp32 run. Only the precision's shared state is dropped: the process group stays.
    """
    from accelerate.state import AcceleratorState

    shared = AcceleratorState._shared_state
    if shared and shared.get("_mixed_precision") != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)


def build_sampler(frame, columns: Columns, train: TrainConfig, accelerator: Accelerator,
                  weights: dict[str, float] | None = None) -> GlobalBatchSampler:
    """The seeded global-batch sampler (one source per global batch when the frame has several); the texts it
    compares are only built for ``no_duplicates``."""
    text_ids = None
    if train.batch_sampler == "no_duplicates":
        text_ids = text_ids_from_columns([frame[c] for c in columns.names])
    options = {"seed": train.seed, "world_size": accelerator.num_processes, "rank": accelerator.process_index,
               "drop_last": train.drop_last, "text_ids": text_ids}
    if SOURCE_COLUMN in frame:
        return SourceBatchSampler(frame[SOURCE_COLUMN].tolist(), train.batch_size, weights=weights,
                                  mode=train.source_sampling, **options)
    return GlobalBatchSampler(len(frame), train.batch_size, **options)


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


def on_device(features: dict[str, torch.Tensor], accelerator: Accelerator) -> dict[str, torch.Tensor]:
    return {key: value.to(accelerator.device, non_blocking=True) for key, value in features.items()}


def embed_fn(model: torch.nn.Module, accelerator: Accelerator):
    def embed(features: dict[str, torch.Tensor]) -> torch.Tensor:
        with accelerator.autocast():
            return model(on_device(features, accelerator))["sentence_embedding"]  # (B, D)

    return embed


def embed_columns(model: torch.nn.Module, accelerator: Accelerator, batches) -> list[torch.Tensor]:
    """Every column's embeddings; an unpadded encoder takes all columns in one forward."""
    if not isinstance(accelerator.unwrap_model(model), UnpaddedEncoder):
        return [embed_fn(model, accelerator)(features) for features in batches]
    with accelerator.autocast():
        return [out["sentence_embedding"] for out in model([on_device(f, accelerator) for f in batches])]


def compute_loss_and_backward(
    model, accelerator: Accelerator, batches, loss: LossConfig, *, sync: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward for one micro-batch; one DDP gradient all-reduce, and only when ``sync``.

    Returns the loss and the batch's signals (:func:`pairtune.model.losses.batch_signals`), both detached.
    """
    gather = loss.gather_across_devices and accelerator.num_processes > 1
    signals: list[torch.Tensor] = []

    def observe(embeddings: list[torch.Tensor]) -> None:
        signals.append(batch_signals(embeddings[0], embeddings[1:], similarity=loss.similarity))

    def sync_context(is_last: bool = True):
        return nullcontext() if (sync and is_last) else accelerator.no_sync(model)

    options = {"scale": loss.scale, "similarity": loss.similarity, "gather": gather, "symmetric": loss.symmetric}
    if loss.mini_batch_size is None:
        with sync_context():
            embeddings = embed_columns(model, accelerator, batches)
            observe(embeddings)
            if loss.matryoshka() is None:
                value = mnrl_loss(embeddings[0], embeddings[1:], **options)
            else:
                value = ranking_loss(embeddings[0], embeddings[1:], **options, matryoshka=loss.matryoshka())
            accelerator.backward(value)
        return value.detach(), signals[0]
    value = cached_mnrl_step(
        embed_fn(model, accelerator), batches, mini_batch_size=loss.mini_batch_size, **options,
        matryoshka=loss.matryoshka(), backward=accelerator.backward, sync=sync_context, observe=observe,
    )
    return value, signals[0]


def optimizer_step(model, optimizer, scheduler, accelerator: Accelerator, max_grad_norm: float) -> float:
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    scheduler.step()
    reset_gradients(accelerator.unwrap_model(model), optimizer)
    return float(grad_norm)


def reset_gradients(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Drop every gradient, but zero in place the ones the module keeps (``UnpaddedEncoder.kept_gradients``)."""
    kept = getattr(module, "kept_gradients", list)()
    buffers = [(param, param.grad) for param in kept if param.grad is not None and not param.grad.is_sparse]
    optimizer.zero_grad(set_to_none=True)
    for param, grad in buffers:
        param.grad = grad.zero_()


def encoder_for_training(model: SentenceTransformer, unpad: bool | str) -> tuple[torch.nn.Module, str | None]:
    """The module the loop trains (the model itself, or its unpadded forward), and why it is padded if auto chose so.

    ``model.unpad=auto`` unpads the encoders :mod:`pairtune.model.unpad` supports (BERT: MiniLM, BGE, E5, GTE ...) and
    trains the others padded, saying so once; ``true`` on an unsupported encoder is a config error.
    """
    if unpad is False:
        return model, None
    if supports_unpadding(model):
        return UnpaddedEncoder(model), None
    name = type(getattr(model[0], "auto_model", model[0])).__name__
    if unpad is True:
        raise ConfigError(f"config key 'model.unpad': {name} has no unpadded forward (BERT encoders have); "
                          "use auto or false")
    notice = f"padded batches: {name} has no unpadded forward in pairtune (BERT encoders have), model.unpad=auto"
    log.info("model.unpad: %s", notice)
    return model, notice


def sentence_model(accelerator: Accelerator, model: torch.nn.Module) -> SentenceTransformer:
    """The SentenceTransformer behind the prepared (and possibly unpadded) training module."""
    unwrapped = accelerator.unwrap_model(model)
    return unwrapped.model if isinstance(unwrapped, UnpaddedEncoder) else unwrapped


def evaluate_on_main(accelerator: Accelerator, model, evaluator) -> dict[str, float]:
    """The main process scores the eval split; the others wait at the broadcast and receive the numbers."""
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
class TrainingContext:
    """Everything one training run holds, built once by :func:`setup_training`."""

    train: TrainConfig
    loss: LossConfig
    accelerator: Accelerator
    model: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    sampler: GlobalBatchSampler
    schedule: Schedule
    tokens: TokenizedColumns
    evaluator: Any
    checkpoint: Checkpoint
    report: dict[str, Any]  # what the tracker logs as ``run.*`` params at the start
    best: BestWeights | None = None  # train.select_best, main process only
    base_weights: dict[str, torch.Tensor] | None = None  # the guard's blends start here (main process only)
    warnings: dict[str, str] = field(default_factory=dict)  # "why no gain" signals, each said once
    padded: str | None = None  # why an auto run trains padded (an encoder without an unpadded forward)

    def save_checkpoint(self, state: LoopState, run_id: str | None) -> None:
        extra = self.best.save if self.best is not None else None
        self.checkpoint.save(self.accelerator, state, run_id=run_id, extra=extra)


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


def check_dims(settings: PairtuneConfig, model: SentenceTransformer) -> tuple[int, ...] | None:
    """The Matryoshka dims, each checked against the model's embedding size (as ``export.dim``)."""
    size = model.get_embedding_dimension()
    for key, dims in (("loss.matryoshka_dims", settings.loss.matryoshka_dims or []),
                      ("export.dim", [settings.export.dim] if settings.export.dim else [])):
        if any(dim > size for dim in dims):
            raise ConfigError(f"config key '{key}': {max(dims)} is more than {settings.model.name}'s {size} dims")
    return tuple(settings.loss.matryoshka_dims) if settings.loss.matryoshka_dims else None


def apply_prompts(model: SentenceTransformer, columns: Columns, name: str) -> None:
    """Give the model the run's prompts: evaluation (encode_query / encode_document) and the saved model use them."""
    if not columns.model_prompts:
        return
    if any(getattr(module, "include_prompt", True) is False for module in model):
        raise ConfigError(f"config key 'data.anchor_prompt': {name} pools without its prompt tokens "
                          "(Pooling include_prompt=false), and pairtune trains on the whole prompted text")
    model.prompts.update(columns.model_prompts)


def setup_training(settings: PairtuneConfig, accelerator: Accelerator, splits: dict) -> TrainingContext:
    """Model, tokens, sampler, schedule, optimizer and evaluator, prepared for the accelerator."""
    train_cfg, columns = settings.train, Columns.of(settings.data)
    set_seed(train_cfg.seed)
    model = load_model(settings.model.name, max_seq_length=settings.model.max_seq_length,
                       trust_remote_code=settings.model.trust_remote_code, device=str(accelerator.device),
                       dropout=settings.model.dropout)
    dims = check_dims(settings, model)
    apply_prompts(model, columns, settings.model.name)
    frame = splits["train"]
    with accelerator.main_process_first():
        tokens = tokenize_columns(model.tokenizer, columns.prompted(frame), max_length=settings.model.max_seq_length)
    weights = {source.name: source.weight for source in settings.data.sources or []}
    sampler = build_sampler(frame, columns, train_cfg, accelerator, weights)
    schedule = Schedule.for_sampler(sampler, train_cfg)
    optimizer = build_optimizer(model, train_cfg)
    scheduler = get_scheduler(train_cfg.scheduler, optimizer, num_warmup_steps=train_cfg.warmup_steps,
                              num_training_steps=schedule.total_steps)
    model.train()
    base = None
    if settings.guard.enabled and accelerator.is_main_process:  # a CPU copy of the weights before training
        base = {key: value.detach().to("cpu", copy=True) for key, value in model.state_dict().items()}
    encoder, padded = encoder_for_training(model, settings.model.unpad)
    model, optimizer = accelerator.prepare(encoder, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    eval_frame = cap_rows(splits["eval"], train_cfg.eval_max_rows, seed=train_cfg.seed)
    evaluator = build_split_evaluator(eval_frame, columns, name="eval", batch_size=train_cfg.eval_batch_size,
                                      dims=dims, objective=settings.data.objective)
    checkpoint = Checkpoint.for_run(settings, world_size=accelerator.num_processes)
    report = run_report(schedule, sampler, accelerator, train_rows=len(frame), eval_rows=len(eval_frame))
    best = BestWeights() if train_cfg.select_best and accelerator.is_main_process else None
    return TrainingContext(train_cfg, settings.loss, accelerator, model, optimizer, scheduler, sampler, schedule,
                           tokens, evaluator, checkpoint, report, best, base, padded=padded)


def run_report(schedule: Schedule, sampler, accelerator: Accelerator, **rows: int) -> dict[str, Any]:
    from pairtune import numerics

    steps = schedule.epoch_steps
    return {
        "numerics": numerics.current(),
        "numerics_detail": numerics.describe(),
        "cpu": numerics.cpu_description(),
        "world_size": accelerator.num_processes,
        "global_batch_size": sampler.global_batch_size,
        "steps_per_epoch": steps[0] if len(set(steps)) == 1 else " ".join(map(str, steps)),
        "total_steps": schedule.total_steps,
        "device": str(accelerator.device),
        **rows,
    }


@dataclass
class UpdateWindow:
    """The micro-batches accumulated towards one optimizer step."""

    losses: list[torch.Tensor] = field(default_factory=list)
    signals: list[torch.Tensor] = field(default_factory=list)  # (in-batch accuracy, margin) per micro-batch
    pairs: int = 0
    started: float = field(default_factory=time.perf_counter)


def apply_update(ctx: TrainingContext, window: UpdateWindow, step: int) -> tuple[float, float]:
    """Average the window's gradients, check the loss, then take the optimizer step: (loss, grad norm)."""
    accelerator, group = ctx.accelerator, len(window.losses)
    if group > 1:  # average the accumulated gradients, not sum them
        for param in ctx.model.parameters():
            if param.grad is not None:
                param.grad.div_(group)
    step_loss = float(accelerator.reduce(torch.stack(window.losses).mean(), reduction="mean"))
    if not math.isfinite(step_loss):  # before the update: the model in memory stays the last good one
        raise NonFiniteLossError(f"non-finite loss {step_loss} at step {step}")
    grad_norm = optimizer_step(ctx.model, ctx.optimizer, ctx.scheduler, accelerator, ctx.train.max_grad_norm)
    return step_loss, grad_norm


def record_step(
    ctx: TrainingContext, state: LoopState, window: UpdateWindow, observer: Observer, **values: float
) -> None:
    """Count the step in the loop state and report it (main process)."""
    accelerator = ctx.accelerator
    pairs = int(accelerator.reduce(torch.tensor(window.pairs, device=accelerator.device), reduction="sum"))
    elapsed = time.perf_counter() - window.started
    state.step += 1
    state.step_losses.append(values["train_loss"])
    state.pairs_seen += pairs
    state.seconds += elapsed
    if accelerator.is_main_process:
        rate = pairs / elapsed if elapsed > 0 else 0.0
        learning_rate = ctx.scheduler.get_last_lr()[0]
        observer.on_step(state.step, {**values, "learning_rate": learning_rate, "pairs_per_second": rate})


def end_step(ctx: TrainingContext, state: LoopState, observer: Observer, *, mark: float, epoch_end: bool) -> None:
    """What is due once an optimizer step is counted: the evaluation, then the checkpoint, or a stop.

    A stop saves the checkpoint first and leaves the evaluation due at this step in it
    (``LoopState.evaluation_due``), so the process exits at once and the resume runs that evaluation on the
    same weights before training on: the rows, the selected weights and the saved model come out as if
    nothing had stopped, wherever the stop lands.
    """
    train = ctx.train
    last = state.step >= ctx.schedule.total_steps
    periodic = bool(train.eval_every_steps) and state.step % train.eval_every_steps == 0
    evaluate = epoch_end or last or periodic
    checkpoint = train.save_checkpoints and (
        epoch_end or last or bool(train.checkpoint_every_steps and state.step % train.checkpoint_every_steps == 0)
    )
    if epoch_end or last:  # a resume from here starts at the next epoch (or finds the schedule done)
        state.epoch, state.batches_done = state.epoch + 1, 0
    if stop_requested(ctx.accelerator):
        state.evaluation_due = mark if evaluate else None
        if train.save_checkpoints:
            ctx.save_checkpoint(state, observer.run_id)
        raise TrainingInterrupted(STOP.signum, state.step)
    if evaluate:
        record_evaluation(ctx, state, observer, epoch=mark)
    if checkpoint:
        ctx.save_checkpoint(state, observer.run_id)


def run_epoch(ctx: TrainingContext, epoch: int, state: LoopState, observer: Observer) -> None:
    """Train one epoch (or up to ``max_steps``), from ``state.batches_done`` when resuming mid-epoch."""
    ctx.sampler.set_epoch(epoch)
    local_batches = list(ctx.sampler)
    if ctx.sampler.rows_left_out and ctx.accelerator.is_main_process and state.batches_done == 0:
        log.info("epoch %d: %d rows in no batch (no duplicate-free place, or a dropped short batch)",
                 epoch + 1, ctx.sampler.rows_left_out)
    start = state.batches_done if state.epoch == epoch else 0  # > 0 when resuming mid-epoch
    state.epoch, state.batches_done = epoch, start
    accumulation, window = ctx.train.gradient_accumulation_steps, UpdateWindow()
    for index in range(start, len(local_batches)):
        rows = local_batches[index]
        epoch_end = index + 1 == len(local_batches)
        is_update = (index + 1) % accumulation == 0 or epoch_end
        batch = ctx.tokens.batch(rows)
        value, signals = compute_loss_and_backward(ctx.model, ctx.accelerator, batch, ctx.loss, sync=is_update)
        window.losses.append(value)
        window.signals.append(signals)
        window.pairs += len(rows)
        if not is_update:
            continue
        step_loss, grad_norm = apply_update(ctx, window, state.step + 1)
        progress = round(epoch + (index + 1) / len(local_batches), 4)
        accuracy, margin = torch.stack(window.signals).mean(dim=0).tolist()  # this process's batches
        record_step(ctx, state, window, observer, train_loss=step_loss, grad_norm=grad_norm, epoch=progress,
                    in_batch_accuracy=accuracy, hardest_margin=margin)
        state.batches_done = index + 1
        end_step(ctx, state, observer, mark=float(epoch + 1) if epoch_end else progress, epoch_end=epoch_end)
        if state.step >= ctx.schedule.total_steps:
            return
        window = UpdateWindow()


#: A mean loss below this over the first epoch: the batch's negatives are too easy to teach anything (the
#: seed card's run averages 1.1 there; one short last batch alone can dip lower, so the epoch's mean decides).
NEAR_ZERO_LOSS = 0.05


def warn_if_too_easy(ctx: TrainingContext, state: LoopState) -> None:
    """Once a run, after the first epoch: a near-zero mean loss says the task is too easy for the batch."""
    losses = state.step_losses[: ctx.schedule.epoch_steps[0]]
    mean = sum(losses) / len(losses) if losses else float("inf")
    if mean >= NEAR_ZERO_LOSS:
        return
    warn_once(ctx, "too_easy", (
        f"mean training loss {mean:.4f} over the first epoch: the positives are already far above every "
        "in-batch negative, so the batch is too easy to teach anything; try a larger train.batch_size, mined "
        "negatives (mining.enabled=true) or train.batch_sampler=no_duplicates"
    ))


def warn_if_no_gain(ctx: TrainingContext, state: LoopState) -> None:
    """Once, at the end: the last evaluation did not beat the step-0 (base model) one."""
    if not state.rows or state.rows[0].step != 0 or len(state.rows) < 2:
        return
    base, last = state.rows[0].metrics[PRIMARY_METRIC], state.rows[-1].metrics[PRIMARY_METRIC]
    if last > base:
        return
    warn_once(ctx, "no_gain", (
        f"eval {PRIMARY_METRIC} ended at {last:.4f}, not above the base model's {base:.4f} at step 0: check the "
        "in_batch_accuracy and hardest_margin metrics (a batch that is too easy teaches nothing), the learning "
        "rate, and that the eval split is drawn like the train split"
    ))


def warn_once(ctx: TrainingContext, key: str, message: str) -> None:
    """Keep a run warning (it becomes a ``pairtune.warning.<key>`` tag) and log it on the main process."""
    ctx.warnings[key] = message
    if ctx.accelerator.is_main_process:
        log.warning(message)


def stop_requested(accelerator: Accelerator) -> bool:
    """True on every process when any of them got a signal, so all stop at the same step boundary."""
    if accelerator.num_processes == 1:
        return STOP.requested
    flag = torch.tensor(int(STOP.requested), device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item())


def record_evaluation(ctx: TrainingContext, state: LoopState, observer: Observer, *, epoch: float) -> None:
    """Score the eval split and add a Training Logs row: its loss is the mean since the previous row."""
    metrics = evaluate_on_main(ctx.accelerator, ctx.model, ctx.evaluator)
    since = state.rows[-1].step if state.rows else 0
    losses = state.step_losses[since : state.step]
    loss = sum(losses) / len(losses) if losses else None
    state.rows.append(EpochRow(epoch=epoch, step=state.step, training_loss=loss, metrics=metrics))
    if ctx.best is not None:
        ctx.best.offer(sentence_model(ctx.accelerator, ctx.model), state.step, metrics[PRIMARY_METRIC])
    if ctx.accelerator.is_main_process:
        log.info("epoch %s step %s: %s %.4f", epoch, state.step, PRIMARY_METRIC, metrics[PRIMARY_METRIC])
        observer.on_evaluate(state.step, epoch, metrics)


def start_state(ctx: TrainingContext, observer: Observer) -> LoopState:
    """The state to train from: the newest checkpoint on ``train.resume``, else a fresh one (step-0 row).

    A checkpoint a stop left with an evaluation due runs that evaluation first, on the restored weights.
    """
    train, accelerator = ctx.train, ctx.accelerator
    resume_from = ctx.checkpoint.to_resume(train.resume)
    if resume_from:
        state = ctx.checkpoint.restore(accelerator, resume_from)
        if ctx.best is not None:
            ctx.best = BestWeights.load(resume_from)
        if accelerator.is_main_process:
            observer.on_resume(state.step)  # steps after it were trained before and are replayed now
        if state.evaluation_due is not None:
            mark, state.evaluation_due = state.evaluation_due, None
            record_evaluation(ctx, state, observer, epoch=mark)
        return state
    if train.save_checkpoints:
        ctx.checkpoint.clear(accelerator)
    state = LoopState()
    if train.eval_on_start:
        record_evaluation(ctx, state, observer, epoch=0.0)
    return state


def run_training(ctx: TrainingContext, observer: Observer) -> LoopState:
    """The epoch loop: per epoch train, evaluate and checkpoint, until the schedule's last step."""
    schedule, accelerator = ctx.schedule, ctx.accelerator
    if accelerator.is_main_process:
        observer.on_train_start(ctx.report)
        log.info("training %s steps (%s per epoch), global batch %s", schedule.total_steps,
                 ctx.report["steps_per_epoch"], ctx.sampler.global_batch_size)
    state = start_state(ctx, observer)
    for epoch in range(state.epoch, ctx.train.epochs):
        if state.step >= schedule.total_steps:
            break
        run_epoch(ctx, epoch, state, observer)
        if epoch == 0:
            warn_if_too_easy(ctx, state)
    warn_if_no_gain(ctx, state)
    return state


def train_result(settings: PairtuneConfig, ctx: TrainingContext, state: LoopState) -> TrainResult:
    return TrainResult(
        model_dir=Path(settings.paths.model),
        global_step=state.step,
        epoch_steps=ctx.schedule.epoch_steps,
        total_steps=ctx.schedule.total_steps,
        world_size=ctx.accelerator.num_processes,
        global_batch_size=ctx.sampler.global_batch_size,
        step_losses=state.step_losses,
        rows=state.rows,
        train_seconds=state.seconds,
        pairs_per_second=state.pairs_seen / state.seconds if state.seconds else 0.0,
        similarity=settings.loss.similarity,
        warnings=list(ctx.warnings.values()),
        padded=ctx.padded,
    )


def train(settings: PairtuneConfig, *, observer: Observer | None = None) -> TrainResult:
    """Train on the prepared splits, evaluate each epoch, save the model and its card (main process)."""
    observer = observer or NullObserver()
    settle_batch_sampler(settings)
    splits = load_prepared(settings.paths.prepared)
    with torch_threads(settings.train.num_threads):
        accelerator = build_accelerator(settings.train)
        if settings.train.reuse_freed_memory and accelerator.device.type == "cpu":
            reuse_freed_memory()
        try:
            ctx = setup_training(settings, accelerator, splits)
            result = train_result(settings, ctx, run_training(ctx, observer))
            if accelerator.is_main_process:
                model = sentence_model(accelerator, ctx.model)
                if ctx.best is not None:
                    result.selected_step = ctx.best.restore_into(model, last_step=result.global_step)
                write_atomic_dir(result.model_dir, lambda folder: save_with_card(model, folder, settings, result, splits))
                save_final_model(ctx, model, settings, result, splits)
                observer.on_train_end(result)
            accelerator.wait_for_everyone()
        finally:
            accelerator.end_training()
    return result


def save_with_card(
    model, folder: Path, settings: PairtuneConfig, result: TrainResult, splits: dict, *, final: bool = False
) -> None:
    from pairtune.outputs.card import write_model_card

    previous = model.truncate_dim
    if final and settings.export.dim:  # the served and the loaded final model truncate as the ONNX graph does
        model.truncate_dim = settings.export.dim
    try:
        model.save(str(folder), create_model_card=False, safe_serialization=True)
        write_model_card(folder / "README.md", model=model, settings=settings, result=result,
                         train_frame=splits["train"], columns=Columns.of(settings.data), final=final)
    finally:
        model.truncate_dim = previous


def card_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The card's metrics (and any per-dim or per-source ones), rounded as the reports round them (guard.json)."""
    extra = sorted(name for name in metrics if name not in CARD_METRICS and ("_dim" in name or "/" in name))
    names = [*CARD_METRICS, *extra]
    return {name: round(metrics[name], 6) for name in names if name in metrics}


def save_final_model(ctx: TrainingContext, model, settings: PairtuneConfig, result: TrainResult, splits: dict) -> None:
    """The final model (``paths.final``): the guard's choice among blends with the base, or the trained model.

    ``model`` holds the trained weights on entry and the final ones on return; ``result.guard`` says why.
    """
    from pairtune.train.guard import GeneralScorer, choose_blend, load_general_set

    result.final_dir = Path(settings.paths.final)
    general = load_general_set(settings) if ctx.base_weights is not None else None
    if general is not None:
        guard = settings.guard
        scorer = GeneralScorer(general, batch_size=settings.general.batch_size, cache=settings.paths.general_cache)
        trained = {key: value.detach().to("cpu", copy=True) for key, value in model.state_dict().items()}
        result.guard = choose_blend(
            model, ctx.base_weights, trained, grid=guard.grid, max_drop=guard.max_drop, score_all=guard.score_all,
            task=lambda blended: card_metrics(run_evaluator(ctx.evaluator, blended)), general=scorer,
        )
        log.info("guard: the final model is %s", result.guard.why)
    write_atomic_dir(result.final_dir, lambda folder: save_with_card(model, folder, settings, result, splits, final=True))
