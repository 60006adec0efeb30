"""pairtune's own Accelerate loop (``pairtune.training.train``) on the seed card's recipe, for the bench.

conf/'s defaults already are the seed card (batch 32, lr 5e-5 linear, seed 42, MNRL scale 20 cosine); this
runs them with checkpoints off and every output in a temporary folder, then prints one JSON line on stdout.
``train_seconds`` is ``TrainResult.train_seconds`` (optimizer steps only); ``wall_seconds`` is the whole
``train()`` call (model load, tokenisation, the evaluations, saving the model and its card) inside
``pairtune.tracking.tracked_run`` when the checkout has it, as ``pipelines/train.py`` runs it, so that
``--tracking`` costs what a tracked run costs (opening the run, per-step metrics, logging the model).
"""

from __future__ import annotations

import benchkit  # first: it forces the hub off before transformers is imported

# isort: split
import contextlib
import logging
import sys
import tempfile
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from pairtune.config import PairtuneConfig, to_plain_dict
from pairtune.modeling import load_model
from pairtune.training import TrainResult, train

log = logging.getLogger("bench.pairtune")


def build_overrides(
    prepared: Path, work: Path, *, epochs: int, max_steps: int, tracking: bool, store: str | None = None
) -> list[str]:
    """Outputs under ``work``, no checkpoints; tracking off, or on against ``store`` (else a throwaway one)."""
    overrides = [
        f"paths.prepared={prepared.resolve()}",
        f"paths.model={work}/model",
        f"paths.checkpoints={work}/checkpoints",
        f"paths.reports={work}/reports",
        f"paths.onnx={work}/onnx",
        f"data.source={benchkit.BUNDLED}",
        f"train.epochs={epochs}",
        f"train.max_steps={max_steps}",
        "train.save_checkpoints=false",
        f"tracking.enabled={str(tracking).lower()}",
    ]
    if tracking:
        overrides.append(f"tracking.uri={store or f'sqlite:///{work}/mlflow.db'}")
    return overrides


def tracking_seam(settings: PairtuneConfig, overrides: list[str]) -> tuple[str, AbstractContextManager]:
    """pipelines/train.py's seam when the checkout has it: ``tracked_run`` yields the observer (no-op when off)."""
    try:
        from pairtune.tracking import tracked_run
    except ImportError:  # the tracking feature is not in this checkout
        return "none", contextlib.nullcontext(None)
    return "tracked_run", tracked_run(settings, config=to_plain_dict(settings), overrides=overrides)


def timed_train(overrides: list[str]) -> tuple[TrainResult, float, str, str | None]:
    """Train inside the tracking seam; the wall time covers opening and closing the run as well.

    Also returns the tracked run's id (None when nothing was tracked).
    """
    settings = benchkit.compose_settings(overrides)
    seam, context = tracking_seam(settings, overrides)
    started = time.perf_counter()
    with context as observer:
        result = train(settings, observer=observer)
    return result, time.perf_counter() - started, seam, getattr(observer, "run_id", None)


def summarise(result: TrainResult, wall: float, pairs: int) -> dict[str, Any]:
    """Timings and the loop's own metrics: the final row is the eval split after the last step."""
    final = result.final_metrics
    return {
        "steps": result.global_step,
        "pairs": pairs,
        "train_seconds": result.train_seconds,
        "step_seconds": result.train_seconds,
        "wall_seconds": wall,
        **benchkit.throughput(pairs, train=result.train_seconds, steps=result.train_seconds, wall=wall),
        "loop_pairs_per_second": result.pairs_per_second,  # pairtune's own count, for a cross-check
        "eval_ndcg_at_10": final.get("cosine_ndcg@10"),
        "eval_mrr_at_10": final.get("cosine_mrr@10"),
        "first_loss": result.step_losses[0] if result.step_losses else None,
        "last_loss": result.step_losses[-1] if result.step_losses else None,
        "step_losses": result.step_losses,
    }


def run(
    prepared: Path, *, epochs: int, max_steps: int, tracking: bool, store: str | None, extra: list[str]
) -> dict[str, Any]:
    test = pd.read_parquet(prepared / "test.parquet")
    n_train = len(pd.read_parquet(prepared / "train.parquet"))
    with tempfile.TemporaryDirectory(prefix="bench-pairtune-") as folder:
        work = Path(folder)
        overrides = build_overrides(
            prepared, work, epochs=epochs, max_steps=max_steps, tracking=tracking, store=store
        )
        result, wall, seam, run_id = timed_train(overrides + extra)
        store_written = run_id is not None  # a shared store exists beforehand: only a run id proves logging
        summary = summarise(
            result, wall, benchkit.pairs_processed(n_train, result.global_batch_size, result.global_step)
        )
        log.info(
            "trained %d steps, %d pairs in %.1f s (train() %.1f s)",
            result.global_step,
            summary["pairs"],
            result.train_seconds,
            wall,
        )
        model = load_model(str(result.model_dir), max_seq_length=benchkit.MAX_SEQ_LENGTH)
        test_scores = benchkit.test_metrics(model, test)
    return {
        "system": "pairtune",
        "epochs": epochs,
        "max_steps": max_steps,
        "tracking": tracking,
        "tracking_seam": seam,
        "tracking_store_written": store_written,
        "overrides": extra,
        "threads": torch.get_num_threads(),
        **summary,
        **test_scores,
        "peak_rss_mb": benchkit.peak_rss_mb(),
    }


def main() -> int:
    parser = benchkit.common_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--tracking", action="store_true", help="tracking.enabled=true with a temporary store"
    )
    parser.add_argument(
        "--tracking-uri", default=None, help="with --tracking: log to this existing store instead"
    )
    parser.add_argument(
        "--set",
        dest="extra",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an extra Hydra override, e.g. train.num_threads=2 (repeatable)",
    )
    args = parser.parse_args()
    benchkit.setup_logging()
    with contextlib.redirect_stdout(sys.stderr):
        result = run(
            args.prepared,
            epochs=args.epochs,
            max_steps=args.max_steps,
            tracking=args.tracking,
            store=args.tracking_uri,
            extra=args.extra,
        )
    benchkit.emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
