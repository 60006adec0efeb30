"""Resumable checkpoints: one type owns saving, finding, restoring, clearing and rotating them.

A checkpoint is a folder ``step-NNNNNN`` holding ``accelerator.save_state`` (model, optimizer, scheduler,
RNG states of every process) plus ``pairtune_state.json``: the loop's counters, the tracking run id and the
run's fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pairtune.config import ConfigError
from pairtune.core import EpochRow, ResumeMismatchError

if TYPE_CHECKING:
    from pairtune.config import PairtuneConfig

log = logging.getLogger(__name__)

STATE_FILE = "pairtune_state.json"


@dataclass
class LoopState:
    """The loop's counters; with the Accelerate state they make a checkpoint resumable exactly."""

    step: int = 0  # optimizer steps done, over all epochs
    epoch: int = 0  # the epoch in progress
    batches_done: int = 0  # local batches of that epoch already trained (this process's count)
    step_losses: list[float] = field(default_factory=list)  # one per optimizer step, step 1 first
    rows: list[EpochRow] = field(default_factory=list)  # evaluations so far
    pairs_seen: int = 0
    seconds: float = 0.0
    evaluation_due: float | None = None  # a stop deferred the evaluation due at ``step`` (its epoch mark) to the resume

    def to_json(self) -> dict[str, Any]:
        return {**{k: v for k, v in self.__dict__.items() if k != "rows"}, "rows": [r.__dict__ for r in self.rows]}

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> LoopState:
        payload = dict(payload)
        rows = [EpochRow(**row) for row in payload.pop("rows")]
        return cls(**payload, rows=rows)


def file_digest(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes, read in chunks (a million pairs' parquet is tens of MB)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


#: Every schema key, classified once: it shapes the run (what is learned, or which weights are kept and which
#: evaluations are recorded), so a resume must not change it; or it does not (where files go, tracking, how often
#: a checkpoint is written, speed), so a resume may. ``tests/test_checkpoint.py`` fails on a schema key that is
#: in neither, or in both. The training data itself is in the fingerprint as the digests of its splits.
SHAPES_THE_RUN = (
    "data.anchor_column", "data.positive_column", "data.negative_column", "data.anchor_prompt", "data.positive_prompt",
    "data.sources", "data.objective", "train.source_sampling",  # which batches come from which source, and when
    "model.name", "model.max_seq_length", "model.dropout", "model.unpad",
    "loss.scale", "loss.similarity", "loss.mini_batch_size", "loss.gather_across_devices", "loss.symmetric",
    "loss.matryoshka_dims", "loss.matryoshka_weights",
    "train.epochs", "train.batch_size", "train.lr", "train.weight_decay", "train.adam_beta1", "train.adam_beta2",
    "train.adam_epsilon", "train.scheduler", "train.warmup_steps", "train.max_grad_norm", "train.seed",
    "train.max_steps", "train.gradient_accumulation_steps", "train.mixed_precision", "train.batch_sampler",
    "train.drop_last", "train.eval_on_start", "train.select_best", "train.eval_every_steps", "train.eval_max_rows",
    "mining.enabled", "mining.negative_column", "mining.relative_margin", "mining.range_min", "mining.range_max",
    "mining.sampling_strategy", "mining.on_missing", "mining.batch_size", "mining.seed",
)
DOES_NOT_SHAPE_THE_RUN = (
    # the prepared splits' digests stand for where they came from and how they were split
    "data.source", "data.revision", "data.subset", "data.split", "data.format", "data.csv_delimiter",
    "data.train_size", "data.eval_size", "data.split_seed",
    "model.trust_remote_code",  # permission to run a model's code, not a different model
    "train.eval_batch_size", "train.save_checkpoints", "train.checkpoint_every_steps", "train.keep_checkpoints",
    "train.resume", "train.shared_filesystem", "train.collective_timeout_minutes", "train.num_threads",
    "train.reuse_freed_memory", "train.progress", "train.progress_every_seconds",
    "paths.prepared", "paths.mined", "paths.mining_cache", "paths.model", "paths.checkpoints", "paths.reports",
    "paths.onnx",
    "tracking.enabled", "tracking.uri", "tracking.experiment", "tracking.run_name", "tracking.log_model",
    "tracking.registered_model", "tracking.flush_seconds",
    "export.opset", "export.batch_size", "export.min_cosine_fp32", "export.min_cosine_int8", "export.int8_weights",
    "export.dim",  # written into the final model's config after training
    "promotion.source",
    # the guard chooses the final model after training: a resume trains the same run
    "paths.final", "paths.general_cache",
    "general.source", "general.corpus", "general.query_column", "general.passage_column", "general.revision",
    "general.subset", "general.split", "general.batch_size",
    "guard.enabled", "guard.max_drop", "guard.grid", "guard.score_all",
    # which kernels run: the last float digits, not the run (as train.num_threads)
    "numerics.mode", "numerics.threads",
)


def setting(settings: PairtuneConfig, key: str) -> Any:
    """The value of a dotted schema key, e.g. ``train.lr``."""
    value: Any = settings
    for part in key.split("."):
        value = getattr(value, part)
    if isinstance(value, list) and value and is_dataclass(value[0]):  # data.sources: plain, JSON-ready dicts
        return [asdict(item) for item in value]
    return value


def run_fingerprint(settings: PairtuneConfig, *, world_size: int) -> dict[str, Any]:
    """Everything that shapes a run: the train and eval splits' digests, the world size and every shaping key."""
    prepared = Path(settings.paths.prepared)
    digests = {
        f"data.{split}_sha256": file_digest(path) if (path := prepared / f"{split}.parquet").is_file() else None
        for split in ("train", "eval")
    }
    return {**digests, "world_size": world_size, **{key: setting(settings, key) for key in SHAPES_THE_RUN}}


def fingerprint_diff(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """The keys whose values differ between two fingerprints, as ``key: saved -> wanted``."""
    keys = sorted(set(saved) | set(wanted))
    return [f"{k}: {saved.get(k)!r} -> {wanted.get(k)!r}" for k in keys if saved.get(k) != wanted.get(k)]


class Checkpoint:
    """The checkpoints of one run in ``folder``, newest ``keep`` kept.

    Invariants a resume relies on (``tests/test_checkpoint.py`` asserts each):

    1. A checkpoint is only written at an optimizer-update boundary: no gradient is half-accumulated in it.
    2. ``LoopState.batches_done`` counts this process's local batches of ``LoopState.epoch``; every process
       has the same count, because every process iterates the same number of local batches per epoch.
    3. ``LoopState.step_losses`` has exactly ``LoopState.step`` entries: one per optimizer step taken.
    4. A ``step-*`` folder is complete or absent: it is written as ``.step-*.tmp`` and renamed into place,
       and rotation only ever removes complete folders older than the newest ``keep``.
    5. A checkpoint resumes only a run of the same fingerprint (data, batch, world size, accumulation,
       epochs, sampler, seed, loss, ...); anything else stops with :class:`ResumeMismatchError`.

    ``on_each_node``: without a shared file system every node's local main process writes (and later
    reads) its own copy, so each process can restore what it saved.
    """

    def __init__(self, folder: str | Path, *, keep: int, fingerprint: dict[str, Any], on_each_node: bool = False):
        self.folder = Path(folder)
        self.keep = keep
        self.fingerprint = fingerprint
        self.on_each_node = on_each_node

    @classmethod
    def for_run(cls, settings: PairtuneConfig, *, world_size: int) -> Checkpoint:
        train = settings.train
        return cls(settings.paths.checkpoints, keep=train.keep_checkpoints,
                   fingerprint=run_fingerprint(settings, world_size=world_size),
                   on_each_node=not train.shared_filesystem)

    def _writes(self, accelerator) -> bool:
        """Whether this process renames, rotates and clears: the main process, or each node's first."""
        return accelerator.is_local_main_process if self.on_each_node else accelerator.is_main_process

    def meta(self, path: Path | None = None) -> dict[str, Any]:
        path = path or self.latest()
        return json.loads((path / STATE_FILE).read_text()) if path else {}

    def to_resume(self, resume: bool | str) -> Path | None:
        """The checkpoint ``train.resume`` continues: the newest one; with ``true`` there must be one.

        ``true`` with none is refused (a mistyped ``hydra.run.dir`` would otherwise train from scratch
        into a new run); ``auto`` starts a new run then, for schedulers that restart a job blindly.
        """
        if not resume:
            return None
        latest = self.latest()
        if latest is None and resume is True:
            raise ConfigError(
                f"config key 'train.resume': no checkpoint to resume in {self.folder} (check hydra.run.dir or "
                "paths.checkpoints; train.resume=auto starts a new run when there is none)"
            )
        return latest

    def resumable_run_id(self, resume: bool | str = True) -> str | None:
        """Before any run is opened: the tracking run of the checkpoint to resume, once its fingerprint matches."""
        latest = self.to_resume(resume)
        if latest is None:
            return None
        self.check(latest)
        return self.meta(latest).get("mlflow_run_id")

    def check(self, path: Path) -> None:
        """Refuse to resume a run shaped differently, naming every key that differs."""
        saved = self.meta(path).get("fingerprint", {})
        differing = fingerprint_diff(saved, self.fingerprint)
        if differing:
            raise ResumeMismatchError(
                f"{path}: checkpoint is from a different run ({'; '.join(differing)}); "
                "train.resume=false starts a new run"
            )

    def save(
        self, accelerator, state: LoopState, *, run_id: str | None, extra: Callable[[Path], None] | None = None
    ) -> Path:
        """Write ``step-<state.step>`` beside and rename it into place, then rotate (all processes call).

        ``extra`` writes the main process's own files into the folder before it is renamed into place.
        """
        target = self.folder / f"step-{state.step:06d}"
        staging = self.folder / f".step-{state.step:06d}.tmp"
        if self._writes(accelerator):
            shutil.rmtree(staging, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(staging), safe_serialization=True)
        accelerator.wait_for_everyone()
        if self._writes(accelerator):
            meta = {"state": state.to_json(), "mlflow_run_id": run_id, "fingerprint": self.fingerprint}
            if extra is not None and accelerator.is_main_process:
                extra(staging)
            (staging / STATE_FILE).write_text(json.dumps(meta) + "\n")
            shutil.rmtree(target, ignore_errors=True)
            os.replace(staging, target)
            self.rotate()
        accelerator.wait_for_everyone()
        return target

    def complete(self) -> list[Path]:
        """Checkpoint folders that were renamed into place with their state file, oldest first."""
        return sorted(p for p in self.folder.glob("step-*") if (p / STATE_FILE).is_file())

    def latest(self) -> Path | None:
        found = self.complete()
        return found[-1] if found else None

    def rotate(self) -> None:
        """Keep the newest ``keep`` complete checkpoints; folders without a state file are debris of a crash."""
        complete = self.complete()
        debris = [p for p in self.folder.glob("step-*") if p not in complete]
        for old in complete[: -self.keep] + debris:
            shutil.rmtree(old, ignore_errors=True)

    def restore(self, accelerator, path: Path) -> LoopState:
        self.check(path)
        accelerator.load_state(str(path))
        state = LoopState.from_json(self.meta(path)["state"])
        log.info("resumed from %s (step %s)", path, state.step)
        return state

    def clear(self, accelerator) -> None:
        """A fresh run starts with no checkpoints of an earlier one, so a later resume cannot pick those up."""
        if self._writes(accelerator):
            stale = sorted(self.folder.glob("step-*")) + sorted(self.folder.glob(".step-*.tmp"))
            if stale:
                log.info("removing %d checkpoints of an earlier run from %s", len(stale), self.folder)
            for path in stale:
                shutil.rmtree(path, ignore_errors=True)
        accelerator.wait_for_everyone()
