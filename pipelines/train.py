"""DVC stage `train`: MNRL fine-tuning; returns the eval MRR@10 for Hydra sweepers."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from pairtune.app import exit_on_user_error, quiet_third_party
from pairtune.config import load_settings
from pairtune.training import train


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
@exit_on_user_error
def main(cfg: DictConfig) -> float:
    quiet_third_party()
    result = train(load_settings(cfg))
    return result.objective


if __name__ == "__main__":
    main()
