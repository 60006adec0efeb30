"""`make bench-scale`: pairtune against sentence-transformers' trainer at users' scale, where only steps count.

The seed card's job is 90 steps, and start-up is a third of it; users train on 10,000 to 1,000,000 pairs. This
bench trains both tools on ``--rows`` synthetic pairs in the notation (bench/synth.py: 20,000 by default, every
text unique, lengths that do not grow with the row count), one epoch, at each ``--batch-sizes`` (32 and 128),
each tool at its own best settings in each mode:

  fp32   the trainer as the seed card ran it; pairtune's default (reproducible numerics)
  bf16   the trainer with ``bf16=True``; pairtune with ``experiment=fast`` (bf16 autocast, fp32 weights)

Every run is a whole, fresh process (bench/run_trainer.py, bench/run_pairtune.py: the same runners as
``make bench``), trainer and pairtune alternating within each setting and the settings alternating within each
repeat, so drifts in machine load fall on every variant alike. Each figure is the median of ``--repeats`` runs:

  steps/s, pairs/s   training steps only: from fetching an update's batch to the end of its optimizer step,
                     summed over the epoch (no start-up, evaluation or saving)
  tokens/s           pairs/s x the real (non-padding) tokens of an average training pair, the same for both
  whole job s        process start to model on disk (start-up, two evaluations of the eval split, the steps, save)
  NDCG@10            each tool's own final evaluation of the eval split, and the test split scored afterwards by
                     the same evaluator for both (outside the timing)

Target (issue "Speed where it matters"): pairtune >= 2x the trainer's steps/s in fp32 and in bf16, at equal test
NDCG@10 (within 0.01).
"""

from __future__ import annotations

import benchkit  # first: it forces the hub off before transformers is imported

# isort: split
import argparse
import itertools
import sys
import tempfile
from pathlib import Path

import compare
import flops
import pandas as pd
from compare import Bench, Job, job_argv, load_note, median, print_table, run_job

MODES = {  # mode -> (the runner's --precision, pairtune's extra arguments)
    "fp32": ("fp32", []),
    "bf16": ("bf16", ["--set", "experiment=fast"]),
}
ROWS = [
    ("steps/s (steps only)", "steps_per_second", ".2f", "rate"),
    ("pairs/s (steps only)", "pairs_per_second", ".1f", "rate"),
    ("tokens/s (steps only, real tokens)", "tokens_per_second", ".0f", "rate"),
    ("steps per run", "step_count", ".0f", ""),
    ("whole job, start to model on disk (s)", "to_model", ".1f", "faster"),
    ("final eval NDCG@10 (each tool's own)", "eval_ndcg_at_10", ".4f", "diff"),
    ("test NDCG@10 (same evaluator for both)", "test_ndcg_at_10", ".4f", "diff"),
    ("peak RSS (MB)", "rss", ".0f", "rate"),
]


def prepare(work: Path, rows: int, eval_size: int, test_size: int) -> Path:
    """``rows`` training pairs plus the eval and test splits, prepared by pairtune's prepare stage."""
    from synth import generate

    from pairtune.data.preparation import run_prepare

    source, prepared = work / "pairs.jsonl", work / "prepared"
    generate(rows + eval_size + test_size).to_json(source, orient="records", lines=True)
    overrides = [f"paths.prepared={prepared}", f"data.source={source}", f"data.train_size={rows}",
                 f"data.eval_size={eval_size}"]
    run_prepare(benchkit.compose_settings(overrides))
    return prepared


def settings(args: argparse.Namespace) -> list[tuple[int, str]]:
    return list(itertools.product(args.batch_sizes, args.modes))


def runners(bench: Bench, batch: int, mode: str) -> list[tuple[str, list[str]]]:
    precision, extra = MODES[mode]
    size = ["--batch-size", str(batch)]
    trainer = job_argv(bench, "run_trainer.py", *size, epochs=1, precision=precision)
    # pairtune's bf16 is the preset a user would pick (experiment=fast sets the autocast itself)
    pairtune = job_argv(bench, "run_pairtune.py", *size, *extra, epochs=1, precision="fp32" if extra else precision)
    return [(f"trainer {mode} b{batch}", trainer), (f"pairtune {mode} b{batch}", pairtune)]


def run_all(bench: Bench) -> dict[tuple[int, str], dict[str, list[Job]]]:
    """repeat 1: (b32 fp32: trainer, pairtune), (b32 bf16: ...), (b128 fp32: ...), ...; repeat 2: the same."""
    jobs: dict[tuple[int, str], dict[str, list[Job]]] = {key: {"trainer": [], "pairtune": []} for key in settings(bench.args)}
    for index in range(bench.args.repeats):
        for batch, mode in settings(bench.args):
            for label, argv in runners(bench, batch, mode):
                job = run_job(bench, label, argv, index)
                job.result["tokens_per_pair"] = bench.cost.tokens_per_pair
                jobs[(batch, mode)][label.split()[0]].append(job)
    return jobs


compare.FIGURES["step_count"] = lambda job: job.result["steps"]  # "steps" is the steps' seconds
compare.FIGURES["tokens_per_second"] = lambda job: (
    compare.FIGURES["pairs_per_second"](job) * job.result["tokens_per_pair"]
)


def report(bench: Bench, jobs: dict[tuple[int, str], dict[str, list[Job]]]) -> list[str]:
    """One table per setting; the verdict lines against the targets."""
    verdicts = []
    for (batch, mode), columns in jobs.items():
        threads = columns["pairtune"][0].result.get("threads")
        print(f"\n{mode}, batch {batch}, 1 epoch of {bench.n_train:,} pairs, threads {threads}, "
              f"medians of {bench.args.repeats} run(s) each")
        print_table(columns, ROWS, "pairtune / trainer")
        ratio = median(columns["pairtune"], "steps_per_second") / median(columns["trainer"], "steps_per_second")
        ndcg = median(columns["pairtune"], "test_ndcg_at_10") - median(columns["trainer"], "test_ndcg_at_10")
        met = ratio >= 2 and abs(ndcg) <= 0.01
        verdicts.append(f"  {mode} batch {batch}: steps/s {ratio:.2f}x, test NDCG@10 {ndcg:+.4f}: "
                        f"{'met' if met else 'not met'}")
    return verdicts


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000, help="synthetic training pairs (default 20,000)")
    parser.add_argument("--eval-size", type=int, default=500, help="eval split rows (default 500)")
    parser.add_argument("--test-size", type=int, default=500, help="test split rows (default 500)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128], help="default: 32 128")
    parser.add_argument("--modes", nargs="+", choices=tuple(MODES), default=list(MODES), help="default: fp32 bf16")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each variant, alternating (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of every job (OMP_NUM_THREADS)")
    parser.add_argument("--max-steps", type=int, default=-1, help="> 0 caps the steps of every run (smoke tests)")
    args = parser.parse_args()
    args.pairs = args.repeats  # compare.alternate's name for it
    return args


def main() -> int:
    args = parse_args()
    benchkit.setup_logging()
    with tempfile.TemporaryDirectory(prefix="bench-users-scale-") as folder:
        work = Path(folder)
        prepared = prepare(work, args.rows, args.eval_size, args.test_size)
        cost, threads = compare.measure_cost(prepared)
        threads = args.threads or threads
        n_train = len(pd.read_parquet(prepared / "train.parquet"))
        bench = Bench(args, work, prepared, n_train, cost, flops.cpu_peak(), flops.gemm_ceiling(threads))
        compare.header(bench, threads)
        before = load_note()
        jobs = run_all(bench)
        print(f"\nmachine before: {before}; after: {load_note()}")
        verdicts = report(bench, jobs)
    print("\ntarget: pairtune >= 2x the trainer's steps/s at equal test NDCG@10 (within 0.01)")
    print("\n".join(verdicts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
