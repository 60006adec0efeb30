"""The fixed costs of a training job: what it pays whatever the number of steps, each measured on its own.

Imports and start-up answers are timed from outside, each in a fresh process (median of ``--repeats``), with
the bare interpreter's start subtracted from the imports. The pieces inside a job (model load, store
opening, saving, the card) are timed in one process that has imported everything beforehand, so no piece
pays for an import. The imports overlap: sentence-transformers brings torch and transformers along.

    .venv/bin/python bench/fixed_costs.py --prepared DIR [--store sqlite:///.../mlflow.db]
"""

from __future__ import annotations

import benchkit  # first: it forces the hub off before transformers is imported

# isort: split
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

IMPORTS = [
    ("torch", "import torch"),
    ("transformers", "import transformers"),
    ("accelerate (with torch)", "import accelerate"),
    ("sentence_transformers (with torch, transformers)", "import sentence_transformers"),
    ("datasets (the trainer's data)", "import datasets"),
    ("mlflow (tracking on only)", "import mlflow"),
    ("hydra + omegaconf (pairtune's config)", "import hydra, omegaconf"),
    ("pairtune.train.training (the whole train stack)", "import pairtune.train.training"),
]


def wall(argv: list[str], repeats: int) -> float:
    """Median wall seconds of ``argv`` run ``repeats`` times, each a fresh process."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(argv, cwd=benchkit.ROOT, capture_output=True, check=False)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def startup_answers(store: str | None, repeats: int, folder: Path) -> list[tuple[str, float]]:
    """What a user waits for before anything trains: help, the runs table, a config error."""
    script = Path(sys.executable).with_name("pairtune")
    cli = [str(script)] if script.is_file() else [sys.executable, "-m", "pairtune.cli"]
    answers = [("pairtune --help", wall([*cli, "--help"], repeats))]
    if store:
        answers.append(
            ("pairtune runs (the bench's store)", wall([*cli, "runs", "--tracking-uri", store], repeats))
        )
    error = [sys.executable, "pipelines/train.py", "train.lr=-1", f"hydra.run.dir={folder}/h"]
    answers.append(("pipelines/train.py train.lr=-1 (config error)", wall(error, repeats)))
    return answers


def first_and_again(fn, repeats: int) -> list[float]:
    """Seconds of the first call in this process (it pays lazy imports and cold files), then the median of
    ``repeats`` more."""
    times = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return [times[0], statistics.median(times[1:])]


def card_kwargs(model, train) -> dict:
    """What pairtune.outputs.card.write_model_card needs, for a made-up 90-step run with 11 evaluations."""
    from pairtune.core import CARD_METRICS, EpochRow, TrainResult
    from pairtune.data.pairs import Columns

    settings = benchkit.compose_settings([])
    rows = [
        EpochRow(float(e), 9 * e, 0.5 if e else None, dict.fromkeys(CARD_METRICS, 0.8)) for e in range(11)
    ]
    result = TrainResult(Path("model"), 90, [9] * 10, 90, 1, 32, [0.5] * 90, rows, 60.0, 40.0)
    return {
        "model": model,
        "settings": settings,
        "result": result,
        "train_frame": train,
        "columns": Columns(*benchkit.COLUMNS),
    }


def measure_pieces(prepared: Path, store: str | None, repeats: int) -> dict[str, list[float]]:
    """--pieces mode: import the packages first, then time each piece's first call and its repeats."""
    import mlflow
    import pandas as pd
    from sentence_transformers import SentenceTransformer

    from pairtune.model.model_source import resolve_model_source
    from pairtune.outputs.card import write_model_card

    source = resolve_model_source(benchkit.MODEL_ID)[0]
    out = {
        "model load: SentenceTransformer(folder)": first_and_again(
            lambda: SentenceTransformer(source, device="cpu"), repeats
        )
    }
    if store:
        out["store opening: client + one query (existing store)"] = first_and_again(
            lambda: mlflow.MlflowClient(store).search_experiments(), repeats
        )
    model = SentenceTransformer(source, device="cpu")
    kwargs = card_kwargs(model, pd.read_parquet(prepared / "train.parquet"))
    with tempfile.TemporaryDirectory(prefix="bench-save-") as folder:
        out["model save, no card (pairtune writes its own)"] = first_and_again(
            lambda: model.save(f"{folder}/a", create_model_card=False, safe_serialization=True), repeats
        )
        out["pairtune's card: render + write"] = first_and_again(
            lambda: write_model_card(Path(folder) / "README.md", **kwargs), repeats
        )
        out["model save with sentence-transformers' card (trainer)"] = first_and_again(
            lambda: model.save(f"{folder}/b"), repeats
        )
    return out


def pieces(prepared: Path, store: str | None, repeats: int) -> dict[str, list[float]]:
    """Run --pieces mode in a fresh process and return its timings."""
    argv = [
        sys.executable,
        str(Path(__file__)),
        "--pieces",
        "--prepared",
        str(prepared),
        "--repeats",
        str(repeats),
    ]
    done = subprocess.run(
        [*argv, *(["--store", store] if store else [])],
        cwd=benchkit.ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        sys.exit(f"fixed costs: the pieces failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepared", type=Path, required=True)
    parser.add_argument(
        "--store", default=None, help="an existing MLflow store, for the store and runs figures"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pieces", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pieces:
        benchkit.setup_logging()
        print(json.dumps(measure_pieces(args.prepared, args.store, args.repeats)))
        return 0
    bare = wall([sys.executable, "-c", "pass"], args.repeats)
    print(f"  {'bare interpreter start (python -c pass)':<58}{bare:>8.2f} s")
    print("  imports, fresh process, minus the bare start:")
    for label, statement in IMPORTS:
        print(f"    {label:<56}{wall([sys.executable, '-c', statement], args.repeats) - bare:>8.2f} s")
    with tempfile.TemporaryDirectory(prefix="bench-fixed-") as folder:
        print("  start-up answers, whole process:")
        for label, seconds in startup_answers(args.store, args.repeats, Path(folder)):
            print(f"    {label:<56}{seconds:>8.2f} s")
    print(f"  pieces of a job, after the imports: {'first in the process':>22} {'again':>8}")
    for label, (first, again) in pieces(args.prepared, args.store, args.repeats).items():
        print(f"    {label:<56}{first:>8.2f} s {again:>8.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
