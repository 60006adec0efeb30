"""GPU check: the default run in fp32 and in bf16; pairs/s of each and how far bf16's loss curve strays.

Run by scripts/device_check.sh on a machine with one CUDA GPU. Exit status 1 when the curves diverge.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def run(precision: str, folder: Path) -> dict:
    import torch
    from hydra import compose, initialize_config_dir

    from pairtune.config import load_settings
    from pairtune.train.training import train

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[
            f"train.mixed_precision={precision}", "tracking.enabled=false", "train.save_checkpoints=false",
            f"paths.prepared={folder}/prepared", f"paths.model={folder}/model-{precision}",
        ])
    result = train(load_settings(cfg))
    return {"precision": precision, "pairs_per_second": round(result.pairs_per_second, 1),
            "losses": result.step_losses, "mrr@10": result.objective, "device": torch.cuda.get_device_name(0)}


def main(tolerance: float = 0.05) -> int:
    import torch
    from hydra import compose, initialize_config_dir

    from pairtune.config import load_settings
    from pairtune.data.preparation import run_prepare

    assert torch.cuda.is_available(), "no CUDA device"
    folder = Path(tempfile.mkdtemp(prefix="pairtune-gpu-"))
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        run_prepare(load_settings(compose("config", overrides=[f"paths.prepared={folder}/prepared"])))
    fp32, bf16 = run("no", folder), run("bf16", folder)
    gaps = [abs(a - b) / max(abs(a), 1e-6) for a, b in zip(fp32["losses"], bf16["losses"], strict=True)]
    report = {
        "device": fp32["device"],
        "fp32_pairs_per_second": fp32["pairs_per_second"],
        "bf16_pairs_per_second": bf16["pairs_per_second"],
        "fp32_eval_mrr@10": fp32["mrr@10"],
        "bf16_eval_mrr@10": bf16["mrr@10"],
        "max_relative_loss_gap": max(gaps),
        "mean_relative_loss_gap": sum(gaps) / len(gaps),
        "tolerance": tolerance,
    }
    print(json.dumps(report, indent=2))
    return 0 if report["mean_relative_loss_gap"] <= tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
