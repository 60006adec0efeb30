"""torch.compile on pairtune's unpadded training module: is it faster, and does it learn the same?

Each variant runs in a fresh process with its own empty Inductor cache (a cold compile, as a user's first
run has it): pairtune's own setup (``pairtune.train.training.setup_training``, the unpadded encoder of
``encoder_for_training``), then ``--steps`` optimizer steps through the loop's own functions on the same
batches. The compiled variants wrap that module in ``torch.compile(dynamic=True)``: the packed token count
and the padded length change with every batch. Printed: the first step (compiling included), the median
of the other steps, and the losses; with ``model.dropout=0.0`` the compiled losses must match eager ones.

    .venv/bin/python bench/compile_probe.py --prepared DIR [--steps 6] [--threads 1]
"""

from __future__ import annotations

import benchkit  # first: it forces the hub off before transformers is imported

# isort: split
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {  # name: (compile?, overrides)
    "eager fp32": (False, []),
    "compiled fp32": (True, []),
    "eager bf16": (False, ["train.mixed_precision=bf16"]),
    "compiled bf16": (True, ["train.mixed_precision=bf16"]),
    "eager fp32, dropout 0": (False, ["model.dropout=0.0"]),
    "compiled fp32, dropout 0": (True, ["model.dropout=0.0"]),
}


def child(prepared: Path, steps: int, compiled: bool, overrides: list[str]) -> dict:
    """Set up as the loop does, optionally compile, then time each optimizer step."""
    import torch

    from pairtune.data.pairs import load_prepared
    from pairtune.train import training

    settings = benchkit.compose_settings([f"paths.prepared={prepared}", "tracking.enabled=false", "guard.enabled=false",
                                          *overrides])
    accelerator = training.build_accelerator(settings.train)
    ctx = training.setup_training(settings, accelerator, load_prepared(prepared))
    if compiled:
        ctx.model = torch.compile(ctx.model, dynamic=True)
    ctx.sampler.set_epoch(0)
    seconds, cpu, losses = [], [], []
    for rows in list(ctx.sampler)[: steps + 1]:
        started, cpu_started = time.perf_counter(), time.process_time()
        window = training.UpdateWindow()
        value, _signals = training.compute_loss_and_backward(
            ctx.model, accelerator, ctx.tokens.batch(rows), ctx.loss, sync=True
        )
        window.losses.append(value)
        losses.append(training.apply_update(ctx, window, len(losses) + 1)[0])
        seconds.append(time.perf_counter() - started)
        cpu.append(time.process_time() - cpu_started)
    return {
        "first": seconds[0],
        "steps": seconds[1:],
        "cpu": cpu[1:],
        "losses": losses,
        "threads": torch.get_num_threads(),
    }


def run_variant(name: str, args: argparse.Namespace) -> dict:
    compiled, overrides = VARIANTS[name]
    with tempfile.TemporaryDirectory(prefix="bench-inductor-") as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        argv = [
            sys.executable,
            str(Path(__file__)),
            "--child",
            "--prepared",
            str(args.prepared),
            "--steps",
            str(args.steps),
            *(["--compiled"] if compiled else []),
            *overrides,
        ]
        done = subprocess.run(argv, env=env, cwd=benchkit.ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(results: dict[str, dict]) -> None:
    print(
        f"  {'variant':<28}{'first step, s':>14}{'median step, s':>16}{'steps/s':>9}{'CPU s/step':>12}"
        f"{'other steps, s':>16}  losses"
    )
    for name, r in results.items():
        step = statistics.median(r["steps"]) if r["steps"] else float("nan")
        cpu = statistics.median(r["cpu"]) if r["cpu"] else float("nan")
        losses = " ".join(f"{v:.5f}" for v in r["losses"][:4])
        print(
            f"  {name:<28}{r['first']:>14.2f}{step:>16.3f}{1 / step:>9.3f}{cpu:>12.3f}{sum(r['steps']):>16.2f}"
            f"  {losses}"
        )
    print(
        f"  (threads {next(iter(results.values()))['threads']}; CPU s/step is the process's CPU time, steadier "
        "than wall time on a shared machine; 'other steps' sums every step after the first, recompiles included)"
    )
    for precision in ("fp32", "bf16"):
        eager, compiled = results.get(f"eager {precision}"), results.get(f"compiled {precision}")
        if eager and compiled:
            ratio = statistics.median(eager["steps"]) / statistics.median(compiled["steps"])
            print(
                f"  {precision}: compiled steps run {ratio:.2f}x as fast as eager; compiling costs "
                f"{compiled['first'] - eager['first']:.0f} s more on the first step"
            )
    eager, compiled = results.get("eager fp32, dropout 0"), results.get("compiled fp32, dropout 0")
    if eager and compiled:
        worst = max(abs(a - b) for a, b in zip(eager["losses"], compiled["losses"], strict=False))
        print(f"  dropout 0: largest |loss difference| eager vs compiled {worst:.2e} (must be <= 1e-5)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepared", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=6, help="timed steps after the first (default 6)")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of every variant")
    parser.add_argument("--variant", action="append", choices=list(VARIANTS), help="default: all")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args()
    benchkit.setup_logging()
    if args.child:
        print(json.dumps(child(args.prepared.resolve(), args.steps, args.compiled, overrides)))
        return 0
    results = {name: run_variant(name, args) for name in args.variant or VARIANTS}
    report(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
