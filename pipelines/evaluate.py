"""DVC stage `evaluate`: base vs trained model on the test split, to reports/metrics.json."""

from __future__ import annotations

import json

import hydra
from omegaconf import DictConfig

from pairtune.app import exit_on_user_error, quiet_third_party
from pairtune.config import load_settings
from pairtune.stages import run_evaluate


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    quiet_third_party()
    report = run_evaluate(load_settings(cfg))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
