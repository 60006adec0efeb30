"""DVC stage `prepare`: validate and split the pairs file into data/prepared/ (no torch on this path)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from pairtune.config import load_settings
from pairtune.data.preparation import run_prepare
from pairtune.entrypoint import exit_on_user_error, quiet_third_party


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    quiet_third_party()
    run_prepare(load_settings(cfg))


if __name__ == "__main__":
    main()
