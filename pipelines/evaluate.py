"""DVC stage `evaluate`: base vs trained model on the test split, to reports/metrics.json and the run."""

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
    settings = isolate_outputs(load_settings(cfg), "reports")
    numerics.apply(settings)  # reproducible: starts this process again with every kernel choice pinned
    check_inputs(settings, "model.name", "paths.final", "paths.prepared", "promotion.source")
    from pairtune.outputs.evaluation import run_evaluate

    with stage_run(settings, stage="evaluate") as reporter:
        report = run_evaluate(settings)
        for label in ("base", "final"):
            reporter.log_metrics({f"test_{label}_{k}": v for k, v in report[label].items()})
        for part in ("promotion", "general"):
            reporter.log_metrics({f"{part}_{k}": v for k, v in report.get(part, {}).items() if isinstance(v, float)})
        reporter.log_json(report, "reports/metrics.json")
        reporter.log_comparison_plots({k: report[k] for k in ("base", "final")}, "plots/test")
        reporter.promote(report)  # decided on the promotion set (eval split), only against the same data
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
