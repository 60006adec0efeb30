"""DVC stage `export`: ONNX fp32 + int8 encoders with measured parity and speed, logged to the run."""

from __future__ import annotations

import json

import hydra
from omegaconf import DictConfig

from pairtune import numerics
from pairtune.config import load_settings
from pairtune.entrypoint import check_inputs, exit_on_user_error, isolate_outputs, quiet_third_party
from pairtune.tracking import stage_run


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    quiet_third_party()
    settings = isolate_outputs(load_settings(cfg), "onnx", "reports")
    numerics.apply(settings)  # reproducible: starts this process again with every kernel choice pinned
    check_inputs(settings, "paths.final", "paths.prepared")
    from pairtune.outputs.export import flat_export_metrics, run_export

    with stage_run(settings, stage="export") as reporter:
        report = run_export(settings)
        reporter.log_metrics(flat_export_metrics(report))
        reporter.log_json(report, "reports/export.json")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
