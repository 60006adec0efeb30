"""DVC stage `train`: MNRL fine-tuning, tracked in MLflow; returns the eval MRR@10 for Hydra sweepers."""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from pairtune import numerics
from pairtune.config import load_settings, settle_batch_sampler, to_plain_dict
from pairtune.data.mining import apply_mined_negatives
from pairtune.entrypoint import (
    check_inputs,
    exit_on_user_error,
    isolate_outputs,
    launched_world_size,
    quiet_third_party,
    resume_hint,
)
from pairtune.tracking import hydra_overrides, is_main_process, sweep_parent_run_id, tracked_run
from pairtune.train.checkpoint import Checkpoint
from pairtune.train.progress import with_progress
from pairtune.train.signals import TrainingInterrupted, graceful_stop

log = logging.getLogger("pairtune.train")


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
@exit_on_user_error
def main(cfg: DictConfig) -> float:
    quiet_third_party()
    settings = isolate_outputs(load_settings(cfg), "model", "final", "checkpoints", "reports")
    numerics.apply(settings)  # reproducible: starts this process again with every kernel choice pinned
    check_inputs(settings, "model.name", "paths.prepared")  # a typo fails here, before any run is opened
    apply_mined_negatives(settings)  # the mine stage's output names its negative column in mining.json
    settle_batch_sampler(settings)  # a negative column trains with no_duplicates batches
    checkpoint = Checkpoint.for_run(settings, world_size=launched_world_size())
    resume_run = checkpoint.resumable_run_id(settings.train.resume)
    from pairtune.outputs.reports import write_guard_report, write_training_plots
    from pairtune.train.training import train  # torch and friends: only once every quick check has passed

    try:
        with graceful_stop(), tracked_run(
            settings, config=to_plain_dict(settings), overrides=hydra_overrides(),
            parent_run_id=sweep_parent_run_id(), resume_run_id=resume_run,
        ) as tracker, with_progress(tracker, settings.train, main=is_main_process()) as observer:
            result = train(settings, observer=observer)
    except TrainingInterrupted as stop:
        log.warning("%s; checkpoint in %s, continue with: %s", stop, settings.paths.checkpoints, resume_hint())
        sys.exit(stop.exit_code)
    if is_main_process():
        write_training_plots(result, settings.paths.reports)
        write_guard_report(result, settings.paths.reports)
    return result.objective


if __name__ == "__main__":
    main()
