"""DVC stage `mine`: hard negatives for the train split into data/mined/ (a torch-free copy while disabled)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from pairtune import numerics
from pairtune.config import load_settings
from pairtune.data.mining import run_mine
from pairtune.entrypoint import check_inputs, exit_on_user_error, quiet_third_party


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    quiet_third_party()
    settings = load_settings(cfg)
    if settings.mining.enabled:  # disabled, the stage is a torch-free byte copy
        numerics.apply(settings)
    check_inputs(settings, "paths.prepared", *(("model.name",) if settings.mining.enabled else ()))
    run_mine(settings)


if __name__ == "__main__":
    main()
