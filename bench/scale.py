"""`make bench-scale`: does pairtune hold up at a million pairs? What grows with the rows, timed one by one.

Prints, for synthetic pairs in the notation (bench/synth.py):
  1. prepare on 1,000,000 pairs: wall seconds and peak RSS (targets: <= 60 s, <= 2 GB);
  2. for ~10k and ~1M training pairs (each run a fresh process, sizes alternating, medians): reading the
     prepared splits, tokenising the train split, building an epoch of batches (random, and no_duplicates
     with its text ids), then ``pairtune.train.training.train`` itself: time to the first step (everything a run
     does before it: reading, model load, tokenising, sampler, optimizer) and steps/s after the first step
     (target: 1M within 10 % of 10k);
  3. peak RSS of cached MNRL at global batch 1024 / mini-batch 32 against plain MNRL at batch 32
     (target: <= 1.5x);
  4. seconds to build one epoch's global batches at world sizes 1 and 2, and with one shared sentence.
Each measurement runs in its own process, so peak RSS is that process's alone.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def child_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def run_child(args: list[str]) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (MB) and stdout of one child process (each child measured in a fresh one)."""
    wrapper = [sys.executable, str(Path(__file__)), "--measure", "--", *args]
    started = time.perf_counter()
    done = subprocess.run(wrapper, cwd=ROOT, env=ENV, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return time.perf_counter() - started, report["peak_mb"], report["stdout"]


def measure(args: list[str]) -> None:
    """--measure mode: run the command, report its own peak RSS (RUSAGE_CHILDREN of this fresh process)."""
    done = subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        sys.exit(done.returncode)
    print(json.dumps({"peak_mb": child_peak_mb(), "stdout": done.stdout}))


def prepare(source: Path, folder: Path, train_size: str, eval_size: str) -> tuple[float, float]:
    seconds, peak, _ = run_child(
        [
            sys.executable,
            "pipelines/prepare.py",
            f"data.source={source}",
            f"paths.prepared={folder}",
            f"data.train_size={train_size}",
            f"data.eval_size={eval_size}",
            f"hydra.run.dir={folder}.hydra",
        ]
    )
    return seconds, peak


TRAIN_SNIPPET = """
import json, sys
from hydra import compose, initialize_config_dir
from pairtune.entrypoint import quiet_third_party
from pairtune.config import load_settings
from pairtune.train.training import train
quiet_third_party()
with initialize_config_dir(config_dir=sys.argv[1], version_base="1.3"):
    cfg = compose("config", overrides=sys.argv[2:])
result = train(load_settings(cfg))
steps_per_second = result.global_step / result.train_seconds
print(json.dumps({"steps_per_second": steps_per_second, "pairs_per_second": result.pairs_per_second}))
"""


def short_run_overrides(prepared, work) -> list[str]:
    """One untracked epoch without step-0 evaluation or checkpoints, outputs under ``work``: what both timed runs share."""
    return [
        f"paths.prepared={prepared}",
        f"paths.model={work}/model",
        f"paths.final={work}/final",
        f"paths.checkpoints={work}/ckpt",
        "guard.enabled=false",
        "train.eval_on_start=false",
        "train.save_checkpoints=false",
        "tracking.enabled=false",
        "train.epochs=1",
    ]


def train_rate(prepared: Path, work: Path, *overrides: str) -> tuple[dict, float]:
    args = [
        sys.executable,
        "-c",
        TRAIN_SNIPPET,
        str(ROOT / "conf"),
        *short_run_overrides(prepared, work),
        *overrides,
    ]
    _, peak, stdout = run_child(args)
    return json.loads(stdout.strip().splitlines()[-1]), peak


PHASES = (  # (label, key, format) of the per-size table
    ("reading the prepared splits, s", "read", ".2f"),
    ("tokenising the train split, s", "tokenise", ".2f"),
    ("an epoch of batches, random, s", "sampler_random", ".2f"),
    ("an epoch of batches, no_duplicates (+ text ids), s", "sampler_no_duplicates", ".2f"),
    ("train(): time to the first step done, s", "first_step", ".2f"),
    ("train(): steps/s after the first step", "steps_per_second", ".3f"),
)


def measure_phases(prepared: Path, work: Path, steps: int) -> dict[str, float]:
    """--phases mode: each part that grows with the rows on its own, then a real train() call."""
    return {**grown_parts(prepared), **train_timings(prepared, work, steps)}


def grown_parts(prepared: Path) -> dict[str, float]:
    """Reading, tokenising and an epoch of batches (both samplers), each timed alone."""
    from pairtune.data.batching import tokenize_columns
    from pairtune.data.pairs import load_prepared
    from pairtune.data.sampling import GlobalBatchSampler, text_ids_from_columns
    from pairtune.model.modeling import load_model

    took: dict[str, float] = {}
    frame = timed(took, "read", lambda: load_prepared(prepared))["train"]
    took["rows"] = len(frame)
    texts = [frame["sentence_0"].tolist(), frame["sentence_1"].tolist()]
    tokenizer = load_model("sentence-transformers/all-MiniLM-L6-v2", max_seq_length=256).tokenizer
    timed(took, "tokenise", lambda: tokenize_columns(tokenizer, texts, max_length=256))
    timed(took, "sampler_random", lambda: list(GlobalBatchSampler(len(frame), 32, seed=42)))
    timed(
        took,
        "sampler_no_duplicates",
        lambda: list(
            GlobalBatchSampler(
                len(frame),
                32,
                seed=42,
                text_ids=text_ids_from_columns([frame["sentence_0"], frame["sentence_1"]]),
            )
        ),
    )
    return took


def timed(took: dict[str, float], key: str, work):
    started = time.perf_counter()
    value = work()
    took[key] = time.perf_counter() - started
    return value


def train_timings(prepared: Path, work: Path, steps: int) -> dict[str, float]:
    """A real train() call: seconds from the call to the first step's end, and steps/s after it."""
    sys.path.insert(0, str(ROOT / "bench"))
    import benchkit

    from pairtune.core import NullObserver
    from pairtune.train.training import train

    class StepClock(NullObserver):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step(self, step: int, metrics: dict[str, float]) -> None:
            self.times.append(time.perf_counter())

    settings = benchkit.compose_settings(
        [
            *short_run_overrides(prepared, work),
            f"train.max_steps={steps}",
            "train.eval_max_rows=50",
        ]
    )
    clock, started = StepClock(), time.perf_counter()
    train(settings, observer=clock)
    first, last = clock.times[0], clock.times[-1]
    return {"first_step": first - started, "steps_per_second": (len(clock.times) - 1) / (last - first)}


def grown_phases(prepared: Path, work: Path, steps: int) -> dict[str, float]:
    _, _, stdout = run_child(
        [sys.executable, str(Path(__file__)), "--phases", str(prepared), str(work), str(steps)]
    )
    return json.loads(stdout.strip().splitlines()[-1])


def print_phases(runs: dict[str, list[dict]], steps: int) -> None:
    """Medians per size, and 1M over 10k; steps/s should not care how many rows there are."""
    rows = {label: int(results[0]["rows"]) for label, results in runs.items()}
    print(
        f"\nwhat grows with the rows ({', '.join(f'{k}: {v:,} training pairs' for k, v in rows.items())}; "
        f"median of {len(runs['1M'])} alternating runs; train() runs {steps} steps):"
    )
    print(f"  {'':<52}{'10k':>10}{'1M':>10}{'1M / 10k':>10}")
    for label, key, spec in PHASES:
        small, big = (statistics.median(r[key] for r in runs[size]) for size in ("10k", "1M"))
        print(f"  {label:<52}{small:>10{spec}}{big:>10{spec}}{big / small:>10.2f}")
    ratio = statistics.median(r["steps_per_second"] for r in runs["1M"]) / statistics.median(
        r["steps_per_second"] for r in runs["10k"]
    )
    print(f"  steps/s 1M / 10k = {ratio:.3f}  (target within 10 %: 0.90-1.10)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3, help="alternating training runs per size (median)")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--phases", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("command", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(args.command)
        return 0
    if args.phases:
        prepared, work, steps = args.command
        print(json.dumps(measure_phases(Path(prepared), Path(work), int(steps))))
        return 0
    sys.path.insert(0, str(ROOT / "bench"))
    from synth import generate

    with tempfile.TemporaryDirectory(prefix="pairtune-scale-") as folder:
        report(args, Path(folder), generate)
    return 0


def report(args: argparse.Namespace, work: Path, generate) -> None:
    big, small = work / "big.parquet", work / "small.parquet"
    generate(args.rows).to_parquet(big, index=False)
    generate(10_100, seed=1).to_parquet(small, index=False)

    seconds, peak = prepare(big, work / "prepared-big", "0.98", "1000")
    print(
        f"prepare {args.rows:,} pairs: {seconds:.1f} s wall, peak RSS {peak:,.0f} MB  (targets <= 60 s, <= 2048 MB)"
    )
    prepare(small, work / "prepared-small", "10000", "50")

    # Alternating runs, median of each: a short run on a shared 2-core box varies by 5-10 % on its own.
    runs: dict[str, list[dict]] = {"10k": [], "1M": []}
    for _ in range(args.repeats):
        for label, folder in (("10k", work / "prepared-small"), ("1M", work / "prepared-big")):
            runs[label].append(grown_phases(folder, work / label, args.steps))
    print_phases(runs, args.steps)

    _, plain_peak = train_rate(
        work / "prepared-small", work / "plain", "train.max_steps=2", "train.batch_size=32"
    )
    _, cached_peak = train_rate(
        work / "prepared-small",
        work / "cached",
        "train.max_steps=2",
        "train.batch_size=1024",
        "loss.mini_batch_size=32",
    )
    print(
        f"peak RSS: plain MNRL batch 32 {plain_peak:,.0f} MB, cached MNRL batch 1024 / mini 32 "
        f"{cached_peak:,.0f} MB = {cached_peak / plain_peak:.2f}x  (target <= 1.5x)"
    )

    took = sampler_build_seconds(args.rows)
    print(
        f"sampler build, {args.rows:,} rows, batch 32, world 1 / 2: random {took['random 1']:.2f} / "
        f"{took['random 2']:.2f} s, no_duplicates {took['no_duplicates 1']:.2f} / {took['no_duplicates 2']:.2f} s, "
        f"one sentence in 10 rows {took['shared 1']:.2f} / {took['shared 2']:.2f} s "
        f"(+ {took['text ids']:.2f} s text ids)"
    )


def sampler_build_seconds(rows: int) -> dict[str, float]:
    """Seconds to build one epoch's global batches (batch 32, world sizes 1 and 2) at ``rows`` synthetic rows.

    random, no_duplicates on unique pairs, and no_duplicates where one sentence answers every tenth note (the
    case that made the old sampler quadratic); 'text ids' is the one-off factorisation of the texts.
    """
    if str(ROOT / "bench") not in sys.path:
        sys.path.insert(0, str(ROOT / "bench"))
    from synth import generate

    from pairtune.data.sampling import GlobalBatchSampler, text_ids_from_columns

    frame = generate(rows)
    started = time.perf_counter()
    unique = text_ids_from_columns([frame["sentence_0"], frame["sentence_1"]])
    took = {"text ids": time.perf_counter() - started}
    frame.loc[::10, "sentence_1"] = "One sentence answers every tenth note."
    shared = text_ids_from_columns([frame["sentence_0"], frame["sentence_1"]])
    for label, ids in (("random", None), ("no_duplicates", unique), ("shared", shared)):
        for world in (1, 2):
            sampler = GlobalBatchSampler(rows, 32, seed=42, world_size=world, text_ids=ids)
            started = time.perf_counter()
            sampler.global_batches()
            took[f"{label} {world}"] = time.perf_counter() - started
    return took


if __name__ == "__main__":
    sys.exit(main())
