"""Training progress on the console: a tqdm bar on a terminal, a plain line every few seconds in a log.

:class:`ProgressObserver` hears the loop's reports like the tracker does (the :class:`~pairtune.core.Observer`
protocol) and :class:`FanOut` hands every report to both. On a terminal the bar shows step/total, loss,
pairs/s and the ETA, log lines are written above it, and its label turns to ``evaluating (step N)`` while
the eval split is scored. When stderr is not a terminal (CI, DVC, SLURM) carriage returns would pile up in
the log, so a plain line is written instead, at most every ``train.progress_every_seconds``. Torch-free.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from itertools import accumulate
from typing import TYPE_CHECKING, Any, TextIO

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from pairtune.core import NullObserver, Observer

if TYPE_CHECKING:
    from pairtune.config import TrainConfig
    from pairtune.core import TrainResult

TRAIN_LABEL = "train"


class FanOut:
    """Hands every report to each observer in turn; ``run_id`` is the first one any of them has (the tracker's).

    Checkpoints save ``observer.run_id`` so that a resume reopens the tracking run: a console observer
    beside the tracker must not hide it.
    """

    def __init__(self, *observers: Observer) -> None:
        self.observers = observers

    @property
    def run_id(self) -> str | None:
        return next((observer.run_id for observer in self.observers if observer.run_id), None)

    def on_train_start(self, context: dict[str, Any]) -> None:
        for observer in self.observers:
            observer.on_train_start(context)

    def on_resume(self, step: int) -> None:
        for observer in self.observers:
            observer.on_resume(step)

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        for observer in self.observers:
            observer.on_step(step, metrics)

    def on_evaluate(self, step: int, epoch: float, metrics: dict[str, float]) -> None:
        for observer in self.observers:
            observer.on_evaluate(step, epoch, metrics)

    def on_train_end(self, result: TrainResult) -> None:
        for observer in self.observers:
            observer.on_train_end(result)


def epoch_ends(steps_per_epoch: Any) -> set[int]:
    """The global steps that end an epoch, from the loop's ``steps_per_epoch`` (``9``, or ``"9 9 8"``)."""
    counts = [int(part) for part in str(steps_per_epoch).split()] if steps_per_epoch is not None else []
    return set(accumulate(counts))


def screen_size(stream: TextIO) -> dict[str, Any]:
    """tqdm's size arguments: follow the terminal, unless it reports 0 x 0 as a bare pty does (``script``,
    ``docker exec -t``); tqdm would then draw nothing at all, so give it 100 x 24."""
    try:
        size = os.get_terminal_size(stream.fileno())
    except (AttributeError, OSError, ValueError):  # no file descriptor (a test's fake terminal)
        return {"dynamic_ncols": True}
    return {"dynamic_ncols": True} if size.columns and size.lines else {"ncols": 100, "nrows": 24}


def format_seconds(seconds: float) -> str:
    """``0:42``, ``12:03`` or ``1:02:03``: short enough for a progress line."""
    return tqdm.format_interval(max(seconds, 0.0))


class ProgressObserver(NullObserver):
    """Draws the training progress on ``stream`` (stderr by default): a bar on a terminal, else plain lines.

    The loop evaluates after the last step of every epoch, after the last step of the run, every
    ``eval_every_steps`` steps and, unless resuming, before the first step (``eval_on_start``); the
    observer names that evaluation while it runs, since the loop reports it only once it is done.
    """

    def __init__(
        self,
        *,
        stream: TextIO | None = None,
        every_seconds: float = 30.0,
        eval_every_steps: int | None = None,
        eval_on_start: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every_seconds = every_seconds
        self.eval_every_steps, self.eval_on_start = eval_every_steps, eval_on_start
        self.clock = clock
        self.bar: tqdm | None = None
        self.redirect = ExitStack()
        self.total, self.start_step, self.started, self.last_line = 0, 0, 0.0, None
        self.ends: set[int] = set()

    @classmethod
    def for_training(cls, train: TrainConfig, *, stream: TextIO | None = None) -> ProgressObserver:
        return cls(
            stream=stream,
            every_seconds=train.progress_every_seconds,
            eval_every_steps=train.eval_every_steps,
            eval_on_start=train.eval_on_start and train.resume is not True,  # auto: a new run when no checkpoint
        )

    # -- the loop's reports ---------------------------------------------------------------------------------

    def on_train_start(self, context: dict[str, Any]) -> None:
        self.total, self.ends = int(context["total_steps"]), epoch_ends(context.get("steps_per_epoch"))
        self.restart(0)
        if self.eval_on_start:
            self.evaluating(0)

    def on_resume(self, step: int) -> None:
        self.restart(step)

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        loss, rate = metrics.get("train_loss", float("nan")), metrics.get("pairs_per_second", 0.0)
        if self.bar is not None:
            self.bar.set_description_str(TRAIN_LABEL, refresh=False)
            self.bar.set_postfix_str(f"loss {loss:.4f}, {rate:.1f} pairs/s", refresh=False)
            self.bar.update(step - self.bar.n)
        elif self.last_line is None or self.clock() - self.last_line >= self.every_seconds:
            self.last_line = self.clock()
            self.write(
                f"{TRAIN_LABEL}: step {step}/{self.total} ({step / max(self.total, 1):.0%}), loss {loss:.4f}, "
                f"{rate:.1f} pairs/s, {self.timing(step)}"
            )
        if self.evaluation_follows(step):
            self.evaluating(step)

    def on_evaluate(self, step: int, epoch: float, metrics: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.set_description_str(TRAIN_LABEL)

    def on_train_end(self, result: TrainResult) -> None:
        if self.bar is None:
            self.write(
                f"{TRAIN_LABEL}: done, {result.global_step} steps in {format_seconds(result.train_seconds)}, "
                f"{result.pairs_per_second:.1f} pairs/s"
            )
        self.close()

    def close(self) -> None:
        """Close the bar (it stays on screen as drawn last) and give logging its handlers back."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.redirect.close()

    # -- helpers --------------------------------------------------------------------------------------------

    def restart(self, step: int) -> None:
        """Count the rate and the ETA from ``step``: a resumed run's earlier steps took no time in this one."""
        self.start_step, self.started, self.last_line = step, self.clock(), None
        if not self.interactive:
            return
        self.close()
        self.redirect.enter_context(logging_redirect_tqdm())  # log lines go above the bar, not through it
        self.bar = tqdm(
            total=self.total,
            initial=step,
            desc=TRAIN_LABEL,
            unit="step",
            file=self.stream,
            **screen_size(self.stream),
        )

    def evaluation_follows(self, step: int) -> bool:
        every = self.eval_every_steps
        return step in self.ends or step >= self.total or bool(every and step % every == 0)

    def evaluating(self, step: int) -> None:
        if self.bar is not None:
            self.bar.set_description_str(f"evaluating (step {step})")
        else:
            self.write(f"{TRAIN_LABEL}: evaluating (step {step})")

    def timing(self, step: int) -> str:
        """Elapsed time and the ETA at the mean pace since the (re)start, evaluations included."""
        elapsed, done = self.clock() - self.started, step - self.start_step
        eta = format_seconds((self.total - step) * elapsed / done) if done > 0 else "?"
        return f"{format_seconds(elapsed)} elapsed, ETA {eta}"

    def write(self, line: str) -> None:
        print(line, file=self.stream, flush=True)


@contextmanager
def with_progress(
    observer: Observer, train: TrainConfig, *, main: bool, stream: TextIO | None = None
) -> Iterator[Observer]:
    """``observer`` and a console progress observer together; ``observer`` alone off the main process or
    with ``train.progress=false``. The bar is closed however training ends."""
    if not (main and train.progress):
        yield observer
        return
    progress = ProgressObserver.for_training(train, stream=stream)
    try:
        # progress first: "done" is written before the tracker spends seconds logging the model
        yield FanOut(progress, observer)
    finally:
        progress.close()
