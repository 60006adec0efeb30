"""Console progress: a bar on a terminal, plain timed lines in a log, nothing when off or off the main process."""

from __future__ import annotations

import io
import re
from pathlib import Path

from pairtune.config import TrainConfig
from pairtune.core import NullObserver, TrainResult
from pairtune.train.progress import FanOut, ProgressObserver, with_progress


class Terminal(io.StringIO):
    """A stream that says it is a terminal, as stderr does in an interactive shell."""

    def isatty(self) -> bool:
        return True


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Recorder(NullObserver):
    def __init__(self, run_id: str | None) -> None:
        self.run_id = run_id
        self.calls: list[tuple] = []

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self.calls.append(("step", step))

    def on_evaluate(self, step: int, epoch: float, metrics: dict[str, float]) -> None:
        self.calls.append(("evaluate", step))


def result(steps: int) -> TrainResult:
    return TrainResult(
        model_dir=Path("m"),
        global_step=steps,
        epoch_steps=[steps],
        total_steps=steps,
        world_size=1,
        global_batch_size=32,
        step_losses=[1.0] * steps,
        rows=[],
        train_seconds=100.0,
        pairs_per_second=44.1,
    )


def metrics(step: int) -> dict[str, float]:
    return {
        "train_loss": 1.0 / step,
        "pairs_per_second": 40.0 + step,
        "learning_rate": 5e-5,
        "grad_norm": 1.0,
        "epoch": step / 9,
    }


def drive(observer, *, steps: int = 90, per_epoch: int = 9, clock: Clock | None = None, seconds: float = 1.0):
    """Report a run as the loop does: start, evaluate at step 0, steps with an evaluation at each epoch end."""
    observer.on_train_start({"total_steps": steps, "steps_per_epoch": per_epoch})
    observer.on_evaluate(0, 0.0, {"cosine_mrr@10": 0.5})
    for step in range(1, steps + 1):
        if clock is not None:
            clock.now += seconds
        observer.on_step(step, metrics(step))
        if step % per_epoch == 0:
            observer.on_evaluate(step, step / per_epoch, {"cosine_mrr@10": 0.6})
    observer.on_train_end(result(steps))


def test_on_a_terminal_the_bar_is_drawn_and_closed():
    stream = Terminal()
    progress = ProgressObserver(stream=stream, eval_on_start=True)
    progress.on_train_start({"total_steps": 18, "steps_per_epoch": 9})
    assert "evaluating (step 0)" in stream.getvalue()
    progress.on_evaluate(0, 0.0, {})
    for step in range(1, 10):
        progress.on_step(step, metrics(step))
    assert progress.bar.desc == "evaluating (step 9)"  # the epoch's last step: the loop evaluates next
    progress.on_evaluate(9, 1.0, {})
    assert progress.bar.desc == "train"
    for step in range(10, 19):
        progress.on_step(step, metrics(step))
    progress.on_evaluate(18, 2.0, {})
    progress.on_train_end(result(18))
    screen = stream.getvalue()
    assert "\r" in screen  # redrawn in place
    last = screen.rsplit("\r", 1)[-1]
    assert re.search(r"train: 100%.*18/18 .*loss 0\.0556, 58\.0 pairs/s", last), last
    assert progress.bar is None  # closed: nothing draws after training


def test_in_a_log_plain_lines_come_at_most_every_n_seconds_with_step_loss_rate_and_eta():
    stream, clock = io.StringIO(), Clock()
    drive(ProgressObserver(stream=stream, every_seconds=30, clock=clock), clock=clock)
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    steps = [line for line in lines if "step " in line and "evaluating" not in line]
    assert steps[0] == "train: step 1/90 (1%), loss 1.0000, 41.0 pairs/s, 00:01 elapsed, ETA 01:29"
    assert steps[1] == "train: step 31/90 (34%), loss 0.0323, 71.0 pairs/s, 00:31 elapsed, ETA 00:59"
    assert [int(re.search(r"step (\d+)/", line)[1]) for line in steps] == [1, 31, 61]  # one step per second
    assert "train: evaluating (step 9)" in lines and "train: evaluating (step 90)" in lines
    assert "train: evaluating (step 0)" not in lines  # eval_on_start was not asked for
    assert lines[-1] == "train: done, 90 steps in 01:40, 44.1 pairs/s"


def test_a_resumed_run_counts_its_eta_from_the_resume():
    stream, clock = io.StringIO(), Clock()
    progress = ProgressObserver(stream=stream, clock=clock)
    progress.on_train_start({"total_steps": 90, "steps_per_epoch": 9})
    progress.on_resume(45)
    clock.now = 10.0
    progress.on_step(46, metrics(46))
    # 44 steps left at 10 s each: the 45 steps trained before the resume do not count
    assert stream.getvalue().splitlines()[0].endswith("00:10 elapsed, ETA 07:20")


def test_progress_false_and_other_processes_show_nothing():
    for train, main in ((TrainConfig(progress=False), True), (TrainConfig(), False)):
        stream, tracker = Terminal(), Recorder("run-1")
        with with_progress(tracker, train, main=main, stream=stream) as observer:
            drive(observer, steps=18)
        assert observer is tracker
        assert stream.getvalue() == ""


def test_the_fan_out_reaches_every_observer_and_keeps_the_trackers_run_id():
    stream, tracker = io.StringIO(), Recorder("run-1")
    with with_progress(tracker, TrainConfig(eval_on_start=True), main=True, stream=stream) as observer:
        assert isinstance(observer, FanOut)
        assert observer.run_id == "run-1"  # checkpoints save it so a resume reopens the tracked run
        drive(observer, steps=9)
    assert tracker.calls[:2] == [("evaluate", 0), ("step", 1)]
    first, second = stream.getvalue().splitlines()[:2]
    assert first == "train: evaluating (step 0)"
    assert second.startswith("train: step 1/9 (11%), loss 1.0000, 41.0 pairs/s, ")
    assert FanOut(NullObserver(), Recorder(None)).run_id is None


def test_the_progress_module_imports_nothing_heavy(tmp_path):
    from .test_house import HEAVY, imported_modules, run_importtime

    done = run_importtime("-c", "import pairtune.train.progress", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not imported_modules(done.stderr) & set(HEAVY), sorted(imported_modules(done.stderr) & set(HEAVY))


def test_known_harmless_chatter_is_silenced_by_message_and_source_only(monkeypatch, caplog):
    import logging
    import os
    import warnings

    from pairtune.entrypoint import _ort_preprocessing_hint, quiet_third_party

    monkeypatch.setattr(os, "environ", dict(os.environ))  # quiet_third_party sets defaults for HF libraries
    source = "mlflow.data.dataset_source_registry"
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        quiet_third_party()
        for text, module in (
            ("The specified dataset source can be interpreted in multiple ways: A, A.", source),
            ("Failed to determine whether A can resolve source information", source),
            ("The specified dataset source can be interpreted in multiple ways: A, A.", "somebody.else"),
        ):
            warnings.warn_explicit(text, UserWarning, "f.py", 1, module=module)
    try:
        with caplog.at_level(logging.INFO):
            logging.warning(
                "Please consider to run pre-processing before quantization. Refer to example: ..."
            )
            logging.warning("quantization failed")  # a real problem still shows
    finally:
        logging.getLogger().removeFilter(_ort_preprocessing_hint)
    assert [(str(w.message)[:25], w.filename) for w in shown] == [
        ("Failed to determine wheth", "f.py"),
        ("The specified dataset sou", "f.py"),
    ]
    assert [r.getMessage() for r in caplog.records] == ["quantization failed"]


def test_a_terminal_that_reports_no_size_still_gets_a_bar():
    import os

    from pairtune.train.progress import screen_size

    leader, follower = os.openpty()  # a bare pty reports 0 x 0, where tqdm would draw nothing
    try:
        with os.fdopen(follower, "w") as stream:
            assert screen_size(stream) == {"ncols": 100, "nrows": 24}
        assert screen_size(Terminal()) == {"dynamic_ncols": True}
    finally:
        os.close(leader)
