"""What every bench script shares: the script's start time, offline settings, the result file, small sums.

Light on purpose: it imports neither pairtune, Hydra nor torch, so the trainer's job pays only for what a
trainer user imports. Importing it first records when the script began (after the interpreter started) and
forces the hub off (``HF_HUB_OFFLINE=1``) before transformers is imported.
"""

from __future__ import annotations

import time

SCRIPT_START = time.time()  # wall clock: comparable with the parent's spawn time and other processes

import os  # noqa: E402

os.environ["HF_HUB_OFFLINE"] = "1"  # the base model ships in a package; never reach for a hub
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
BUNDLED = ROOT / "data" / "raw" / "pairs.jsonl"
MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
MAX_SEQ_LENGTH = 256  # seed card
BATCH_SIZE = 32  # seed card: per_device_train_batch_size (and the eval batch)
COLUMNS = ("sentence_0", "sentence_1")  # anchor, positive: the prepared splits' columns

log = logging.getLogger("bench")


def setup_logging() -> None:
    """Everything but results goes to stderr; third-party chatter stays at warnings."""
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for name in (
        "transformers",
        "sentence_transformers",
        "accelerate",
        "httpx",
        "urllib3",
        "huggingface_hub",
    ):
        logging.getLogger(name).setLevel(logging.WARNING)


def job_parser(description: str) -> argparse.ArgumentParser:
    """The arguments both whole-job runners take."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--prepared", type=Path, required=True, help="folder with train/eval/test.parquet")
    parser.add_argument(
        "--work", type=Path, required=True, help="folder for the saved model and other outputs"
    )
    parser.add_argument("--epochs", type=int, default=5, help="num_train_epochs (default 5)")
    parser.add_argument("--max-steps", type=int, default=-1, help="> 0 stops early (default -1: off)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16 = autocast")
    parser.add_argument(
        "--batch-size", type=int, default=BATCH_SIZE, help=f"training batch (default {BATCH_SIZE}: the seed card)"
    )
    parser.add_argument("--out", type=Path, required=True, help="write the JSON result here")
    return parser


def pairs_processed(n_rows: int, batch_size: int, steps: int) -> int:
    """Real rows seen in ``steps`` steps when the last short batch of each epoch is kept (263 = 8 x 32 + 7)."""
    steps_per_epoch = -(-n_rows // batch_size)
    full_epochs, rest = divmod(steps, steps_per_epoch)
    return full_epochs * n_rows + min(rest * batch_size, n_rows)


def write_result(result: dict[str, Any], out: Path) -> None:
    """Write the result as one JSON line (atomically: the parent never reads half a file)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.tmp")
    staging.write_text(json.dumps(result, sort_keys=True) + "\n", encoding="utf-8")
    staging.replace(out)


def read_result(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def compose_settings(overrides: list[str]):
    """Compose conf/ as tests/conftest.py does and validate it into pairtune's typed settings."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from pairtune.config import load_settings

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    return load_settings(cfg)
