"""A stop on any step, resumed, ends exactly as the uninterrupted run: rows, selected weights, saved model.

The stop is a real SIGTERM, sent by the process to itself while the loop reports the chosen step, so it
lands on that step every time: the first step, mid-epoch, a ``train.eval_every_steps`` step, the last step
of an epoch and the very last step.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from safetensors.torch import load_file

from pairtune.config import load_settings
from pairtune.core import NullObserver
from pairtune.train.signals import TrainingInterrupted, graceful_stop

from .conftest import BUNDLED, compose_config

STEPS = 18  # 2 epochs of 9 steps on the bundled data


class SigtermAt(NullObserver):
    """Sends this process a SIGTERM while the loop reports step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        if step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def card_logs(model_dir: Path) -> str:
    card = (model_dir / "README.md").read_text()
    return card[card.index("### Training Logs") : card.index("### Framework Versions")]


def run(make_settings, prepared: Path, out: Path, *extra: str, stop_at: int | None = None):
    from pairtune.train.training import train

    settings = make_settings(
        f"paths.prepared={prepared}", f"paths.model={out}/model", f"paths.checkpoints={out}/ckpt",
        f"paths.final={out}/final", "guard.enabled=false",
        "train.epochs=2", "train.eval_every_steps=4", "train.lr=2e-4", *extra,
    )
    with graceful_stop():
        return train(settings, observer=SigtermAt(stop_at) if stop_at else None)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, prepared_bundled):
    """The whole run once per setting, to compare every interrupted one with."""
    done = {}

    def make_settings(*overrides):
        return load_settings(compose_config(["tracking.enabled=false", f"data.source={BUNDLED}", *overrides]))

    def whole(*extra: str):
        if extra not in done:
            out = tmp_path_factory.mktemp("whole")
            done[extra] = (run(make_settings, prepared_bundled, out, *extra), out / "model")
        return done[extra]

    return whole


CASES = [
    (1, ("train.select_best=true",)),  # the first step
    (4, ("train.select_best=true",)),  # an eval_every_steps step
    (6, ("train.select_best=true",)),  # mid-epoch, nothing due
    (9, ("train.select_best=true",)),  # the last step of the first epoch
    (STEPS, ("train.select_best=true",)),  # the very last step
    (STEPS, ("train.select_best=false",)),
    (STEPS, ("train.select_best=true", "train.eval_on_start=false")),
]


@pytest.mark.slow
@pytest.mark.parametrize(("stop_at", "extra"), CASES)
def test_a_stop_on_any_step_resumes_to_the_uninterrupted_result(
    make_settings, prepared_bundled, tmp_path, uninterrupted, stop_at, extra
):
    whole, whole_model = uninterrupted(*extra)
    # Given a run that gets SIGTERM while step `stop_at` is reported
    with pytest.raises(TrainingInterrupted) as stopped:
        run(make_settings, prepared_bundled, tmp_path, *extra, stop_at=stop_at)
    assert stopped.value.step == stop_at and not (tmp_path / "model").exists()
    # When it is resumed
    resumed = run(make_settings, prepared_bundled, tmp_path, *extra, "train.resume=true")
    # Then it ends as the uninterrupted run: the same evaluations, the same choice, the same saved model
    assert [(r.epoch, r.step) for r in resumed.rows] == [(r.epoch, r.step) for r in whole.rows]
    for ours, theirs in zip(resumed.rows, whole.rows, strict=True):
        assert ours.metrics == pytest.approx(theirs.metrics, abs=1e-6), ours.step
    assert resumed.step_losses == pytest.approx(whole.step_losses, abs=1e-6)
    assert resumed.selected_step == whole.selected_step
    assert resumed.objective == pytest.approx(whole.objective, abs=1e-6)
    assert card_logs(tmp_path / "model") == card_logs(whole_model)
    ours, theirs = load_file(tmp_path / "model/model.safetensors"), load_file(whole_model / "model.safetensors")
    assert max((ours[k] - theirs[k]).abs().max().item() for k in theirs) <= 1e-6
