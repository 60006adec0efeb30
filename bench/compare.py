"""`make bench`: sentence-transformers' Trainer against pairtune's loop on the bundled data, then tracking's cost.

Prepares the bundled pairs once into a temporary folder, runs the two systems alternately (A B A B ...), each
run in its own process, and prints medians, the pairtune/trainer ratios and the fraction of the CPU's fp32
peak each reached. Then pairtune with tracking off and on, alternately, and the overhead in % of wall time.
"""

from __future__ import annotations

import benchkit  # first: it forces the hub off before transformers is imported

# isort: split
import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flops
import pandas as pd

from pairtune.modeling import load_model
from pairtune.preparation import run_prepare

HERE = Path(__file__).resolve().parent
log = logging.getLogger("bench.compare")

Result = dict[str, Any]
Runner = tuple[str, list[str]]  # (label, argv)


def prepare_bundled(folder: Path) -> Path:
    settings = benchkit.compose_settings([f"paths.prepared={folder}", f"data.source={benchkit.BUNDLED}"])
    run_prepare(settings)
    return folder


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1"
    )
    return env


def run_one(label: str, argv: list[str], work: Path, index: int) -> Result:
    """One run in a fresh process; its stderr goes to a log file, its stdout must be the one JSON line."""
    slug = label.replace(" ", "-")
    out, log_path = work / f"{slug}-{index}.json", work / f"{slug}-{index}.log"
    log.info("run %d: %s", index + 1, label)
    with log_path.open("w", encoding="utf-8") as stderr:
        done = subprocess.run(
            [*argv, "--out", str(out)],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=child_env(),
            check=False,
        )
    if done.returncode != 0:
        tail = log_path.read_text(encoding="utf-8").splitlines()[-30:]
        sys.exit(
            f"{label} run {index + 1} failed (exit {done.returncode}); last lines of its log:\n"
            + "\n".join(tail)
        )
    result = json.loads(out.read_text(encoding="utf-8"))
    lines = done.stdout.splitlines()
    if len(lines) != 1 or json.loads(lines[0]) != result:
        log.warning("%s: stdout was not exactly the result line (%d lines)", label, len(lines))
    return result


def alternate(runners: list[Runner], pairs: int, work: Path) -> dict[str, list[Result]]:
    """A B A B ...: drifts in machine load fall on both systems alike."""
    results: dict[str, list[Result]] = {label: [] for label, _ in runners}
    for index in range(pairs):
        for label, argv in runners:
            results[label].append(run_one(label, argv, work, index))
    return results


def runner_argv(
    script: str, prepared: Path, args: argparse.Namespace, *extra: str, epochs: int | None = None
) -> list[str]:
    return [
        sys.executable,
        str(HERE / script),
        "--prepared",
        str(prepared),
        "--epochs",
        str(epochs or args.epochs),
        "--max-steps",
        str(args.max_steps),
        *extra,
    ]


def median(results: list[Result], key: str) -> float | None:
    values = [r[key] for r in results if r.get(key) is not None]
    return statistics.median(values) if values else None


def fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def print_row(name: str, cells: list[str]) -> None:
    print(f"  {name:<30}" + "".join(f"{cell:>14}" for cell in cells))


def print_system_table(results: dict[str, list[Result]], cost: flops.PairCost, peak: flops.CpuPeak) -> None:
    trainer, pairtune = results["trainer"], results["pairtune"]
    rows: list[tuple[str, Callable[[list[Result]], float | None], str, str]] = [
        ("pairs/s (median)", lambda rs: median(rs, "pairs_per_second"), ".2f", "ratio"),
        ("pairs/s, steps only (median)", lambda rs: median(rs, "pairs_per_second_steps"), ".2f", "ratio"),
        ("train seconds (median)", lambda rs: median(rs, "train_seconds"), ".1f", "ratio"),
        ("train wall seconds (median)", lambda rs: median(rs, "wall_seconds"), ".1f", "ratio"),
        ("peak RSS MB (max)", lambda rs: max(r["peak_rss_mb"] for r in rs), ".0f", "ratio"),
        ("final eval NDCG@10 (median)", lambda rs: median(rs, "eval_ndcg_at_10"), ".4f", "diff"),
        ("final eval MRR@10 (median)", lambda rs: median(rs, "eval_mrr_at_10"), ".4f", "diff"),
        ("test MRR@10 (median)", lambda rs: median(rs, "test_mrr_at_10"), ".4f", "diff"),
        ("test NDCG@10 (median)", lambda rs: median(rs, "test_ndcg_at_10"), ".4f", "diff"),
    ]
    steps = sorted({r["steps"] for r in trainer + pairtune})
    print(f"\nTrainer vs pairtune: {len(trainer)} run(s) each, alternating; steps per run {steps}")
    print_row("", ["trainer", "pairtune", "pt/trainer"])
    for name, pick, spec, kind in rows:
        a, b = pick(trainer), pick(pairtune)
        relation = (
            fmt(ratio(b, a), ".3f")
            if kind == "ratio"
            else fmt(None if a is None or b is None else b - a, "+.4f")
        )
        print_row(name, [fmt(a, spec), fmt(b, spec), relation + ("x" if kind == "ratio" else "")])
    for key, label in (("pairs_per_second", ""), ("pairs_per_second_steps", ", steps only")):
        shares = [ratio(median(rs, key) * cost.flops_per_pair, peak.flops) for rs in (trainer, pairtune)]
        print_row(f"% of fp32 peak{label}", [fmt(100 * s, ".2f") for s in shares] + [""])
    print(
        "  (train seconds: trainer = trainer.train() wall time; pairtune = TrainResult.train_seconds, steps only."
        "\n   train wall seconds: pairtune = the whole train() call incl. model load, evals and saving.)"
    )


def print_flops(cost: flops.PairCost, peak: flops.CpuPeak) -> None:
    print("\nFLOP model (train split, real tokens with special tokens, no padding):")
    print(f"  non-embedding parameters   {cost.nonembedding_params:,}")
    print(f"  tokens per pair (mean)     {cost.tokens_per_pair:.1f}")
    print(
        f"  FLOPs per pair             {cost.flops_per_pair / 1e9:.3f} G "
        f"(dense {cost.dense_flops / 1e9:.3f} G + attention {cost.attention_flops / 1e9:.3f} G)"
    )
    print(
        f"  CPU fp32 peak              {peak.flops / 1e9:.1f} GFLOP/s = {peak.cores} cores x 2 FMA x 8 lanes x 2 "
        f"x {peak.mhz:.0f} MHz (clock from {peak.clock_source})"
    )
    if peak.avx512:
        print(
            "  note: the CPU has AVX-512; the peak above is the AVX2 figure asked for (2 x 256-bit FMA per core)."
        )


def create_store(folder: Path) -> tuple[str, float]:
    """A new SQLite store, as a user's first run creates it; later runs log into the existing one."""
    import time

    import mlflow

    uri = f"sqlite:///{folder / 'mlflow.db'}"
    started = time.perf_counter()
    mlflow.MlflowClient(uri).search_experiments()  # creates the file and runs MLflow's schema migrations
    return uri, time.perf_counter() - started


def print_tracking(results: dict[str, list[Result]], store_seconds: float) -> None:
    off, on = results["tracking off"], results["tracking on"]
    steps = sorted({r["steps"] for r in off + on})
    print(f"\npairtune tracking off vs on: {len(off)} run(s) each, alternating; steps per run {steps}")
    print_row("", ["off", "on", "overhead"])
    for name, key in (
        ("train() wall seconds (median)", "wall_seconds"),
        ("step seconds (median)", "step_seconds"),
    ):
        a, b = median(off, key), median(on, key)
        overhead = None if a is None or b is None or not a else 100 * (b - a) / a
        print_row(name, [fmt(a, ".1f"), fmt(b, ".1f"), fmt(overhead, "+.1f") + "%"])
    print(f"  (all 'on' runs log into one store, as a user's runs do; creating it took {store_seconds:.1f} s, once)")
    print_row("peak RSS MB (max)", [fmt(max(r["peak_rss_mb"] for r in rs), ".0f") for rs in (off, on)] + [""])
    if not any(r.get("tracking_store_written") for r in on):
        seams = sorted({r.get("tracking_seam", "?") for r in on})
        print(f"  note: no MLflow store was written with tracking.enabled=true (seam: {', '.join(seams)}):")
        print("        nothing was tracked, so this overhead is noise.")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3, help="A/B pairs of runs per comparison (default 3)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per run (default 2: 18 steps)")
    parser.add_argument(
        "--max-steps", type=int, default=-1, help="> 0 caps the steps per run (for smoke tests)"
    )
    parser.add_argument(
        "--tracking-epochs", type=int, default=10,
        help="epochs per run of the tracking comparison (default 10: the seed card's whole 90-step run)",
    )
    parser.add_argument("--skip-tracking", action="store_true", help="skip the tracking off/on comparison")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    benchkit.setup_logging()
    with tempfile.TemporaryDirectory(prefix="bench-compare-") as folder:
        work = Path(folder)
        prepared = prepare_bundled(work / "prepared")
        model = load_model(benchkit.MODEL_ID, max_seq_length=benchkit.MAX_SEQ_LENGTH)
        train = pd.read_parquet(prepared / "train.parquet")
        cost = flops.pair_cost(model, train, benchkit.COLUMNS.names, max_length=benchkit.MAX_SEQ_LENGTH)
        del model
        peak = flops.cpu_peak()
        systems = [
            ("trainer", runner_argv("run_trainer.py", prepared, args)),
            ("pairtune", runner_argv("run_pairtune.py", prepared, args)),
        ]
        print_flops(cost, peak)
        sys.stdout.flush()
        print_system_table(alternate(systems, args.pairs, work), cost, peak)
        if not args.skip_tracking:
            store, store_seconds = create_store(work)
            epochs = args.tracking_epochs
            variants = [
                ("tracking off", runner_argv("run_pairtune.py", prepared, args, epochs=epochs)),
                ("tracking on", runner_argv("run_pairtune.py", prepared, args, "--tracking", "--tracking-uri", store,
                                            epochs=epochs)),
            ]
            print_tracking(alternate(variants, args.pairs, work), store_seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
