"""What both bench runners share: offline settings, config composition, counting, the one-line JSON result.

Importing this module first forces the hub off (``HF_HUB_OFFLINE=1``) before transformers is imported.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # the base model ships in a package; never reach for a hub
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402

from pairtune.config import PairtuneConfig, load_settings  # noqa: E402
from pairtune.data import Columns  # noqa: E402
from pairtune.entrypoint import quiet_third_party  # noqa: E402
from pairtune.evaluation import (  # noqa: E402
    build_evaluator,
    evaluate_split,  # noqa: E402
    run_evaluator,
)

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
BUNDLED = ROOT / "data" / "raw" / "pairs.jsonl"
MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
MAX_SEQ_LENGTH = 256  # seed card
BATCH_SIZE = 32  # seed card: per_device_train_batch_size (and the eval batch)
COLUMNS = Columns("sentence_0", "sentence_1")

log = logging.getLogger("bench")


def setup_logging() -> None:
    """Everything but the result line goes to stderr."""
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    quiet_third_party()


def common_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--prepared", type=Path, required=True, help="folder with train/eval/test.parquet")
    parser.add_argument("--epochs", type=int, default=2, help="num_train_epochs (default 2)")
    parser.add_argument("--max-steps", type=int, default=-1, help="> 0 stops early (default -1: off)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON line to this file")
    return parser


def compose_settings(overrides: list[str]) -> PairtuneConfig:
    """Compose conf/ as tests/conftest.py does, then validate it into typed settings."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    return load_settings(cfg)


def pairs_processed(n_rows: int, batch_size: int, steps: int) -> int:
    """Real rows seen in ``steps`` steps when the last short batch of each epoch is kept (263 = 8 x 32 + 7)."""
    steps_per_epoch = -(-n_rows // batch_size)
    full_epochs, rest = divmod(steps, steps_per_epoch)
    return full_epochs * n_rows + min(rest * batch_size, n_rows)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def eval_metrics(model, frame) -> dict[str, float]:
    """NDCG@10 and MRR@10 on the eval split, with the evaluator pairtune's loop uses."""
    metrics = run_evaluator(build_evaluator(frame, COLUMNS, name="eval", batch_size=BATCH_SIZE), model)
    return {"eval_ndcg_at_10": metrics["cosine_ndcg@10"], "eval_mrr_at_10": metrics["cosine_mrr@10"]}


def test_metrics(model, frame) -> dict[str, float]:
    """MRR@10 and NDCG@10 on the test split, as the evaluate stage computes them."""
    metrics = evaluate_split(model, frame, COLUMNS, batch_size=BATCH_SIZE)
    return {"test_mrr_at_10": metrics["cosine_mrr_at_10"], "test_ndcg_at_10": metrics["cosine_ndcg_at_10"]}


def throughput(pairs: int, **seconds: float) -> dict[str, float]:
    """``pairs_per_second<_suffix>`` for each named duration (``train=...`` gives plain ``pairs_per_second``)."""
    rates = {}
    for name, value in seconds.items():
        key = "pairs_per_second" if name == "train" else f"pairs_per_second_{name}"
        rates[key] = pairs / value if value > 0 else 0.0
    return rates


def emit(result: dict[str, Any], out: Path | None) -> None:
    """Print the result as one JSON line on stdout and, if asked, write it to ``out`` (atomically)."""
    line = json.dumps(result, sort_keys=True)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = out.with_name(f".{out.name}.tmp")
        staging.write_text(line + "\n", encoding="utf-8")
        staging.replace(out)
    print(line, flush=True)
