"""DVC stage `train`: MNRL fine-tuning, tracked in MLflow; returns the eval MRR@10 for Hydra sweepers."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from pairtune.app import exit_on_user_error, quiet_third_party
from pairtune.config import load_settings, to_plain_dict
from pairtune.signals import graceful_stop
from pairtune.stages import write_training_plots
from pairtune.tracking import hydra_overrides, is_main_process, sweep_parent_run_id, tracked_run
from pairtune.training import train


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
@exit_on_user_error
def main(cfg: DictConfig) -> float:
    quiet_third_party()
    settings = load_settings(cfg)
    with graceful_stop(), tracked_run(
        settings, config=to_plain_dict(settings), overrides=hydra_overrides(), parent_run_id=sweep_parent_run_id()
    ) as observer:
        result = train(settings, observer=observer)
    if is_main_process():
        write_training_plots(result, Path(settings.paths.reports))
    return result.objective


if __name__ == "__main__":
    main()
