"""`make bench`: pairtune against sentence-transformers' Trainer, like for like, then tracking, precision, fixed costs.

1. The whole job, both tools alike (process start to model on disk: imports, data, model load, an IR evaluation
   of the eval split before training and after every epoch, the steps, saving the model), each run a fresh
   process, trainer and pairtune alternating (A B A B); and the training steps alone, timed the same way.
2. pairtune on the default run (the seed card's 10 epochs): fp32 with tracking off and on (into a store that
   exists beforehand, as a user's runs do), bf16 and ``experiment=fast`` when conf/ has it, alternating.
3. The fixed costs of a job (bench/fixed_costs.py): imports, model load, store opening, saving, the card.
4. torch.compile on the unpadded training module (bench/compile_probe.py): step time and compile time apart.
Every figure is a median over the runs; the tables say what each includes.
"""

from __future__ import annotations

import benchkit  # first: it forces the hub off before transformers is imported

# isort: split
import argparse
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import flops
import pandas as pd

HERE = Path(__file__).resolve().parent
log = logging.getLogger("bench.compare")


@dataclass
class Job:
    """One whole-job run: what the child wrote, what the parent measured from outside, the test scores."""

    label: str
    result: dict[str, Any]
    spawned: float  # wall clock just before the process was started
    exited: float  # wall clock once it had exited
    cpu_seconds: float  # user + system of the process
    peak_rss_mb: float
    n_train: int
    test: dict[str, float] = field(default_factory=dict)

    def mark(self, name: str) -> float:
        return self.result["marks"][name]

    @property
    def train_end(self) -> float:
        """When the training loop ended (the trainer: train() returned; pairtune: saving began)."""
        if "train_end" in self.result["marks"]:
            return self.mark("train_end")
        return self.mark("model_saved") - self.result["save_seconds"]

    def phases(self) -> dict[str, float]:
        """Where the whole job's time went; the parts add up to start -> model on disk."""
        evals, steps = sum(self.result["eval_seconds"]), self.result["step_seconds"]
        return {
            "interpreter": self.mark("script_start") - self.spawned,
            "setup": self.mark("train_start") - self.mark("script_start"),
            "evals": evals,
            "steps": steps,
            "rest": self.train_end - self.mark("train_start") - evals - steps,
            "save": self.mark("model_saved") - self.train_end,
            "after_save": self.exited - self.mark("model_saved"),
        }

    def value(self, key: str) -> float | None:
        """A figure of this run by name (see ``FIGURES``)."""
        if key in FIGURES:
            return FIGURES[key](self)
        return self.phases().get(key, self.result.get(key, self.test.get(key)))


def _pairs(job: Job) -> int:
    return benchkit.pairs_processed(job.n_train, job.result["global_batch_size"], job.result["steps"])


FIGURES: dict[str, Callable[[Job], float | None]] = {
    "to_model": lambda j: j.mark("model_saved") - j.spawned,
    "to_exit": lambda j: j.exited - j.spawned,
    "cpu": lambda j: j.cpu_seconds,
    "rss": lambda j: j.peak_rss_mb,
    "steps_per_second": lambda j: j.result["steps"] / j.result["step_seconds"],
    "pairs_per_second": lambda j: _pairs(j) / j.result["step_seconds"],
    "observer": lambda j: j.result.get("observer_seconds", 0.0) - j.result.get("observer_end_seconds", 0.0),
    "observer_end": lambda j: j.result.get("observer_end_seconds", 0.0),
    "open": lambda j: j.result.get("open_seconds", 0.0),
    "close": lambda j: j.result.get("close_seconds", 0.0),
}


# -- running ------------------------------------------------------------------------------------------------


def child_env(threads: int | None = None) -> dict[str, str]:
    """Offline, quiet, unbuffered; ``threads`` sets torch's thread count (OMP_NUM_THREADS) when given."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1"
    )
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_process(
    argv: list[str], log_path: Path, env: dict[str, str]
) -> tuple[float, float, float, float, int]:
    """Start, wait, and measure one process from outside: (spawned, exited, cpu s, peak RSS MB, exit status)."""
    with log_path.open("w", encoding="utf-8") as sink:
        spawned = time.time()
        process = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=benchkit.ROOT)
        _, status, usage = os.wait4(process.pid, 0)
        exited = time.time()
    process.returncode = os.waitstatus_to_exitcode(status)
    return spawned, exited, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, process.returncode


@dataclass
class Bench:
    """What every section shares: the arguments, the work folder, the prepared splits, the FLOP model."""

    args: argparse.Namespace
    work: Path
    prepared: Path
    n_train: int
    cost: flops.PairCost
    peak: flops.CpuPeak
    gemm: dict[str, float]  # the measured large-matmul rate per precision (flops.gemm_ceiling)


def run_job(bench: Bench, label: str, argv: list[str], index: int) -> Job:
    """One whole job in a fresh process; its test-split scores come afterwards, outside the timing."""
    folder = bench.work / f"{label.replace(' ', '-')}-{index}"
    folder.mkdir(parents=True)
    out, log_path = folder / "result.json", folder / "job.log"
    log.info("run %d: %s", index + 1, label)
    argv = [*argv, "--work", str(folder), "--out", str(out)]
    spawned, exited, cpu, rss, status = run_process(argv, log_path, child_env(bench.args.threads))
    if status != 0 or not out.is_file():
        tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-30:]
        sys.exit(
            f"{label} run {index + 1} failed (exit {status}); last lines of {log_path}:\n" + "\n".join(tail)
        )
    job = Job(label, benchkit.read_result(out), spawned, exited, cpu, rss, bench.n_train)
    job.test = test_scores(Path(job.result["model_dir"]), bench.prepared)
    shutil.rmtree(folder / "model", ignore_errors=True)
    shutil.rmtree(folder / "trainer", ignore_errors=True)
    return job


def test_scores(model_dir: Path, prepared: Path) -> dict[str, float]:
    """The test split's NDCG@10 and MRR@10 of a saved model, as the evaluate stage computes them."""
    from pairtune.data.pairs import Columns
    from pairtune.model.modeling import load_model
    from pairtune.outputs.evaluation import evaluate_split

    model = load_model(str(model_dir), max_seq_length=benchkit.MAX_SEQ_LENGTH)
    frame = pd.read_parquet(prepared / "test.parquet")
    metrics = evaluate_split(model, frame, Columns(*benchkit.COLUMNS), batch_size=benchkit.BATCH_SIZE)
    return {"test_ndcg_at_10": metrics["cosine_ndcg_at_10"], "test_mrr_at_10": metrics["cosine_mrr_at_10"]}


def alternate(bench: Bench, runners: list[tuple[str, list[str]]]) -> dict[str, list[Job]]:
    """A B A B ...: drifts in machine load fall on every variant alike."""
    jobs: dict[str, list[Job]] = {label: [] for label, _ in runners}
    for index in range(bench.args.pairs):
        for label, argv in runners:
            jobs[label].append(run_job(bench, label, argv, index))
    return jobs


def job_argv(bench: Bench, script: str, *extra: str, epochs: int, precision: str) -> list[str]:
    argv = [
        sys.executable,
        str(HERE / script),
        "--prepared",
        str(bench.prepared),
        "--epochs",
        str(epochs),
        "--max-steps",
        str(bench.args.max_steps),
        "--precision",
        precision,
        *extra,
    ]
    if script == "run_trainer.py":
        from pairtune.model.model_source import resolve_model_source

        argv += ["--model", resolve_model_source(benchkit.MODEL_ID)[0]]
    return argv


# -- printing -----------------------------------------------------------------------------------------------


def median(jobs: list[Job], key: str) -> float | None:
    values = [v for v in (job.value(key) for job in jobs) if v is not None]
    return statistics.median(values) if values else None


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def relation(kind: str, base: float | None, other: float | None) -> str:
    """'faster' = base / other (seconds), 'rate' = other / base, 'diff' = other - base, 'pct' = overhead."""
    if base is None or other is None or kind == "":
        return ""
    if kind == "diff":
        return f"{other - base:+.4f}"
    if kind == "pct":
        return f"{other - base:+.1f} s ({100 * (other - base) / base:+.1f}%)" if base else ""
    if kind == "faster":
        return f"{base / other:.2f}x" if other else ""
    return f"{other / base:.2f}x" if base else ""


Row = tuple[str, str, str, str]  # (label, figure key, format, relation kind)


def print_table(columns: dict[str, list[Job]], rows: list[Row | str], relation_header: str) -> None:
    """One row per figure, one column per variant (medians), then each variant against the first."""
    names = list(columns)
    print(
        f"  {'':<46}"
        + "".join(f"{n:>12}" for n in names)
        + "".join(f"  {relation_header + (' ' + n if len(names) > 2 else ''):>20}" for n in names[1:])
    )
    for row in rows:
        if isinstance(row, str):
            print(f"  {row}")
            continue
        label, key, spec, kind = row
        values = [median(columns[n], key) for n in names]
        cells = "".join(f"{fmt(v, spec):>12}" for v in values)
        print(f"  {label:<46}{cells}" + "".join(f"  {relation(kind, values[0], v):>20}" for v in values[1:]))


def share_of_peak(bench: Bench, jobs: list[Job], precision: str) -> str:
    """Useful FLOP/s of the steps as % of the nominal peak / % of the measured large-matmul rate."""
    rate, threads = median(jobs, "pairs_per_second"), jobs[0].result.get("threads")
    if rate is None:
        return "-"
    useful = rate * bench.cost.flops_per_pair
    return f"{100 * useful / bench.peak.flops(precision, threads):.0f}% / {100 * useful / bench.gemm[precision]:.0f}%"


def load_note() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} CPUs"


# -- sections -----------------------------------------------------------------------------------------------

AB_ROWS: list[Row | str] = [
    ("whole job: start -> model on disk, s  [headline]", "to_model", ".1f", "faster"),
    ("whole job: start -> process exit, s", "to_exit", ".1f", "faster"),
    ("CPU seconds of the process (user + sys)", "cpu", ".1f", "faster"),
    ("training steps only, s", "steps", ".1f", "faster"),
    ("training steps only, pairs/s", "pairs_per_second", ".2f", "rate"),
    "where the whole job's time goes (s):",
    ("  interpreter start", "interpreter", ".2f", "faster"),
    ("  imports, config, data, model load, set-up", "setup", ".2f", "faster"),
    ("  evaluations (eval split, before + each epoch)", "evals", ".2f", "faster"),
    ("  training steps", "steps", ".2f", "faster"),
    ("  rest of the training loop", "rest", ".2f", "faster"),
    ("  saving the model (+ card)", "save", ".2f", "faster"),
    ("  after saving, to process exit", "after_save", ".2f", "faster"),
    "quality (same eval split, same evaluator):",
    ("  eval NDCG@10 before training", "eval_ndcg_at_10_first", ".4f", "diff"),
    ("  final eval NDCG@10", "eval_ndcg_at_10", ".4f", "diff"),
    ("  final eval MRR@10", "eval_mrr_at_10", ".4f", "diff"),
    ("  test NDCG@10 (scored afterwards, untimed)", "test_ndcg_at_10", ".4f", "diff"),
    ("  test MRR@10", "test_mrr_at_10", ".4f", "diff"),
    ("peak RSS, MB", "rss", ".0f", ""),
]

AB_NOTES = """\
  start = just before the process is started (interpreter start included), timed from outside;
  model on disk = trainer: model.save() returned; pairtune: the model and its card renamed into place.
  steps only = the same span in both: fetching/collating an update's batches (the trainer's DataLoader also
  tokenises), forward, backward, clipping, the optimizer and scheduler step; logging, evaluation and saving
  excluded (trainer: a callback whose start mark is set as get_batch_samples begins; pairtune: TrainResult.
  train_seconds, the sum of its UpdateWindows). x = trainer / pairtune for seconds, pairtune / trainer for rates."""


def section_ab(bench: Bench) -> None:
    args = bench.args
    runners = [
        ("trainer", job_argv(bench, "run_trainer.py", epochs=args.epochs, precision=args.precision)),
        ("pairtune", job_argv(bench, "run_pairtune.py", epochs=args.epochs, precision=args.precision)),
    ]
    before = load_note()
    jobs = alternate(bench, runners)
    steps = sorted({j.result["steps"] for js in jobs.values() for j in js})
    print(
        f"\n1. Whole job, trainer vs pairtune: {args.pairs} run(s) each, alternating; {args.epochs} epoch(s), "
        f"steps per run {steps}, {args.precision}, threads {jobs['pairtune'][0].result['threads']}"
    )
    print(f"   machine before: {before}; after: {load_note()}")
    print_table(jobs, AB_ROWS, "x / diff")
    shares = [share_of_peak(bench, jobs[n], args.precision) for n in jobs]
    print(
        f"  {'% of ' + args.precision + ' peak / of matmul rate, steps':<46}"
        + "".join(f"{s:>12}" for s in shares)
    )
    print(AB_NOTES)
    print_targets(jobs)


def print_targets(jobs: dict[str, list[Job]]) -> None:
    trainer, pairtune = jobs["trainer"], jobs["pairtune"]
    whole = median(trainer, "to_model") / median(pairtune, "to_model")
    steps = median(trainer, "steps") / median(pairtune, "steps")
    ndcg = median(pairtune, "eval_ndcg_at_10") - median(trainer, "eval_ndcg_at_10")
    print(
        f"  targets: whole job >= 1.6x: {whole:.2f}x ({'met' if whole >= 1.6 else 'not met'}); steps only >= 2x: "
        f"{steps:.2f}x ({'met' if steps >= 2 else 'not met'}); final eval NDCG@10 within 0.01: {ndcg:+.4f} "
        f"({'yes' if abs(ndcg) <= 0.01 else 'no'})"
    )


TRACKING_ROWS: list[Row | str] = [
    ("whole job: start -> process exit, s", "to_exit", ".1f", "pct"),
    ("whole job: start -> model on disk, s", "to_model", ".1f", "pct"),
    ("CPU seconds of the process", "cpu", ".1f", "pct"),
    ("training steps only (loop timer), s", "steps", ".1f", "pct"),
    "tracking's own parts (s):",
    ("  opening the run (tracked_run: mlflow, params)", "open", ".2f", ""),
    ("  observer in the loop (steps, evaluations)", "observer", ".2f", ""),
    ("  observer at the end (card, plots, model)", "observer_end", ".2f", ""),
    ("  closing the run", "close", ".2f", ""),
    ("peak RSS, MB", "rss", ".0f", ""),
]

PRECISION_ROWS: list[Row | str] = [
    ("training steps only, steps/s", "steps_per_second", ".3f", "rate"),
    ("training steps only, s", "steps", ".1f", "faster"),
    ("whole job: start -> model on disk, s", "to_model", ".1f", "faster"),
    ("CPU seconds of the process", "cpu", ".1f", "faster"),
    ("evaluations (fp32 in every variant), s", "evals", ".1f", "faster"),
    ("training loss, first step", "first_loss", ".4f", "diff"),
    ("training loss, last step", "last_loss", ".4f", "diff"),
    ("final eval NDCG@10", "eval_ndcg_at_10", ".4f", "diff"),
    ("final eval MRR@10", "eval_mrr_at_10", ".4f", "diff"),
    ("test NDCG@10 (scored afterwards, untimed)", "test_ndcg_at_10", ".4f", "diff"),
    ("test MRR@10", "test_mrr_at_10", ".4f", "diff"),
    ("peak RSS, MB", "rss", ".0f", ""),
]


def create_store(folder: Path) -> tuple[str, float]:
    """A new SQLite store, as a user's first run creates it; the tracked runs then log into it."""
    import mlflow

    uri = f"sqlite:///{folder / 'mlflow.db'}"
    started = time.perf_counter()
    mlflow.MlflowClient(uri).search_experiments()  # creates the file and runs MLflow's schema migrations
    return uri, time.perf_counter() - started


def default_run_variants(bench: Bench, store: str) -> list[tuple[str, list[str]]]:
    def argv(*extra: str, precision: str = "fp32") -> list[str]:
        return job_argv(
            bench, "run_pairtune.py", *extra, epochs=bench.args.default_epochs, precision=precision
        )

    variants = [
        ("fp32", argv()),
        ("tracking on", argv("--tracking-uri", store)),
        ("bf16", argv(precision="bf16")),
        # the DVC pipeline's numerics: the same bytes on any AVX2 CPU (whole process, its restart included)
        ("reproducible", argv("--set", "numerics.mode=reproducible")),
        # the guard's whole cost: general evaluations of base, trained and blends, the blends' task evaluations
        ("guard", argv("--set", "guard.enabled=true")),
    ]
    if (benchkit.CONF / "experiment" / "fast.yaml").is_file():
        variants.append(("fast", argv("--set", "experiment=fast")))
    return [v for v in variants if v[0] not in bench.args.skip]


def section_default_run(bench: Bench) -> str:
    args = bench.args
    store, store_seconds = create_store(bench.work)
    before = load_note()
    jobs = alternate(bench, default_run_variants(bench, store))
    print(
        f"\n2. pairtune on the default run ({args.default_epochs} epochs), {args.pairs} run(s) each, alternating "
        f"({', '.join(jobs)}); machine before: {before}; after: {load_note()}"
    )
    if "tracking on" in jobs:
        print(
            f"\n2a. Tracking off vs on (whole job; every 'on' run logs into one store created beforehand in "
            f"{store_seconds:.1f} s, as a user's runs do)"
        )
        print_table({"off": jobs["fp32"], "on": jobs["tracking on"]}, TRACKING_ROWS, "overhead")
        print(
            "  The loop timer leaves the observer out; 'observer in the loop' is the time inside it, and the "
            "background metric writer's share shows in the steps' difference."
        )
    precision = {k: v for k, v in jobs.items() if k != "tracking on"}
    if len(precision) > 1:
        print(
            "\n2b. Precision and numerics: fp32 (numerics.mode=fastest) against bf16 autocast "
            "(train.mixed_precision=bf16), the presets, numerics.mode=reproducible (fp32) and the guard on "
            "(fp32, general scores cached in no run), tracking off"
        )
        print_table(precision, PRECISION_ROWS, "vs fp32")
        shares = [share_of_peak(bench, js, js[0].result["precision"]) for js in precision.values()]
        print(f"  {'% of peak / of matmul rate, steps only':<46}" + "".join(f"{s:>12}" for s in shares))
        print(
            "  bf16 runs are measured against the bf16 peak and matmul rate, the others against fp32's (header)."
        )
    return store


def section_compile(bench: Bench) -> None:
    print(
        "\n4. torch.compile on the unpadded training module (bench/compile_probe.py; cold compile, each variant "
        "a fresh process, same batches)",
        flush=True,
    )
    steps = "2" if bench.args.max_steps > 0 else "8"
    argv = [
        sys.executable,
        str(HERE / "compile_probe.py"),
        "--prepared",
        str(bench.prepared),
        "--steps",
        steps,
    ]
    subprocess.run(argv, env=child_env(bench.args.threads), cwd=benchkit.ROOT, check=True)


def section_fixed(bench: Bench, store: str | None) -> None:
    print("\n3. Fixed costs of a job (bench/fixed_costs.py; each in fresh processes, medians)", flush=True)
    argv = [sys.executable, str(HERE / "fixed_costs.py"), "--prepared", str(bench.prepared)]
    if store:
        argv += ["--store", store]
    subprocess.run(argv, env=child_env(bench.args.threads), cwd=benchkit.ROOT, check=True)


# -- main ---------------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3, help="runs of each variant, alternating (default 3)")
    parser.add_argument(
        "--epochs", type=int, default=5, help="epochs of the trainer/pairtune jobs (default 5)"
    )
    parser.add_argument(
        "--default-epochs", type=int, default=10, help="epochs of section 2 (default 10: the seed card)"
    )
    parser.add_argument(
        "--max-steps", type=int, default=-1, help="> 0 caps the steps of every run (smoke tests)"
    )
    parser.add_argument(
        "--precision", choices=("fp32", "bf16"), default="fp32", help="of section 1 (both tools)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads of every job (OMP_NUM_THREADS); default: torch's own choice",
    )
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        metavar="PART",
        help="leave out: ab, default-run, 'tracking on', bf16, reproducible, guard, fast, fixed, compile (repeatable)",
    )
    return parser.parse_args()


def header(bench: Bench, threads: int) -> None:
    import sentence_transformers
    import torch
    import transformers

    print(
        f"pairtune bench: torch {torch.__version__}, transformers {transformers.__version__}, "
        f"sentence-transformers {sentence_transformers.__version__}; {load_note()}"
    )
    cost = bench.cost
    print("\n".join("  " + line for line in bench.peak.describe(threads)))
    print(
        f"  measured matmul rate fp32 {bench.gemm['fp32'] / 1e9:.1f}, bf16 {bench.gemm['bf16'] / 1e9:.1f} GFLOP/s "
        f"(2048^3, best of 5, now, {threads} thread(s)); above the nominal peak = the cores run above its clock"
    )
    print(
        f"  FLOP model           {cost.flops_per_pair / 1e9:.3f} GFLOP per training pair (useful work: real "
        f"tokens only, {cost.tokens_per_pair:.1f} per pair, {cost.nonembedding_params:,} non-embedding "
        "parameters x 6 + attention; padding and the optimizer not counted)"
    )
    print(
        f"  padding              the trainer pads each column to its batch's longest text: its dense layers see "
        f"{cost.padded_ratio:.2f}x the real tokens pairtune's unpadded ones see (random batches of 32): the "
        "steps-only ratio from the matmuls alone; above it only by spending less outside them",
        flush=True,
    )


def measure_cost(prepared: Path) -> tuple[flops.PairCost, int]:
    import torch

    from pairtune.model.modeling import load_model

    model = load_model(benchkit.MODEL_ID, max_seq_length=benchkit.MAX_SEQ_LENGTH)
    train = pd.read_parquet(prepared / "train.parquet")
    return flops.pair_cost(
        model, train, benchkit.COLUMNS, max_length=benchkit.MAX_SEQ_LENGTH
    ), torch.get_num_threads()


def main() -> int:
    args = parse_args()
    benchkit.setup_logging()
    with tempfile.TemporaryDirectory(prefix="bench-compare-") as folder:
        from pairtune.data.preparation import run_prepare

        work = Path(folder)
        prepared = work / "prepared"
        run_prepare(
            benchkit.compose_settings([f"paths.prepared={prepared}", f"data.source={benchkit.BUNDLED}"])
        )
        cost, threads = measure_cost(prepared)
        threads = args.threads or threads
        bench = Bench(
            args,
            work,
            prepared,
            len(pd.read_parquet(prepared / "train.parquet")),
            cost,
            flops.cpu_peak(),
            flops.gemm_ceiling(threads),
        )
        header(bench, threads)
        if "ab" not in args.skip:
            section_ab(bench)
        store = None if "default-run" in args.skip else section_default_run(bench)
        if "fixed" not in args.skip:
            section_fixed(bench, store)
        if "compile" not in args.skip:
            section_compile(bench)
    return 0


if __name__ == "__main__":
    sys.exit(main())
