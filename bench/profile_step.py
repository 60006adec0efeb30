"""`make bench-step`: where each millisecond of one pairtune training step goes, fp32 and bf16, against its bound.

Each mode trains in a fresh process through ``pairtune.train.training.train`` itself (the seed card's recipe,
batch 32 by default, on synthetic pairs in the notation so that no evaluation or epoch end falls inside the window),
with torch's profiler on for ``--active`` steps after ``--warmup`` steps. The bench wraps pairtune's own functions
in named ranges (it changes nothing they do): fetching the batch ("data"), the loss on the embeddings, the
attention of each layer, the optimizer update (gradient clipping, AdamW, the schedule, clearing gradients).
Every operator's own time (``self_cpu_time``) is then put in one class:

  matmul       dense products of the encoder and their gradients (aten mm / addmm / bmm / linear ...)
  attention    each layer's scores, softmax, dropout and context, forward and backward
  elementwise  everything else on activations: layer norm, GELU, dropout, adds, copies, gathers and scatters
  embedding    the token embedding lookup and its gradient
  loss         MNRL on the embeddings (similarities, cross-entropy), forward and backward
  optimizer    clipping, the fused AdamW, the schedule and zeroing gradients
  data         taking the batch's cached token ids and building its tensors
  python       the step's wall time not inside any operator: Python, the dispatcher, autograd's bookkeeping

Each class gets its bound, what this machine could do at best: FLOPs counted by the profiler / the CPU's nominal
peak for the dtype (matmul, attention, loss), bytes moved / a copy bandwidth measured here: the optimizer at
the memory's (a 512 MB copy; 7 fp32 streams per parameter, plus one read for the gradient norm), elementwise,
attention, embedding and loss at the cache's (a 4 MB copy: one layer's activations stay in cache; each
operator's input and output sizes from its recorded shapes, at 4 bytes an element in fp32 and 2 in bf16, an
estimate), and 0 for data and python. The chart (``--png``, committed as docs/step_profile.png) stacks both, per mode; the figures go
to ``--json`` and, unless ``--no-tracking``, to an MLflow run (the chart as an artifact).
"""

from __future__ import annotations

import benchkit  # first: it forces the hub off before transformers is imported

# isort: split
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

CLASSES = ("matmul", "attention", "elementwise", "embedding", "loss", "optimizer", "data", "python")
COLOURS = ("#4c72b0", "#8172b2", "#dd8452", "#937860", "#c44e52", "#55a868", "#da8bc3", "#8c8c8c")
MATMUL = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
          "aten::_mkldnn_matmul", "aten::mkldnn_linear"}
EMBEDDING = {"aten::embedding", "aten::embedding_dense_backward", "aten::embedding_backward"}
MARK = "pairtune:"  # the ranges this bench adds, each named after its class: "pairtune: loss"
TABLE = 5_000_000  # elements: at least a word-embedding table (MiniLM's is 30,522 x 384 = 11.7M)


# -- the child: one mode, profiled -------------------------------------------------------------------------


def wrap(module, name: str, label: str) -> None:
    """Run ``module.name`` inside a profiler range called ``pairtune: label`` (nothing else changes)."""
    import functools

    from torch.profiler import record_function

    inner = getattr(module, name)

    @functools.wraps(inner)
    def ranged(*args, **kwargs):
        with record_function(f"{MARK} {label}"):
            return inner(*args, **kwargs)

    setattr(module, name, ranged)


def add_ranges() -> None:
    from pairtune.data import batching
    from pairtune.model import unpad
    from pairtune.train import training

    wrap(batching.TokenizedColumns, "batch", "data")
    wrap(training, "mnrl_loss", "loss")
    wrap(training, "ranking_loss", "loss")
    wrap(unpad, "_attention", "attention")
    wrap(training, "optimizer_step", "optimizer")


def ancestors(event) -> list:
    """The ranges and operators an event ran inside, innermost first."""
    chain, parent = [], event.cpu_parent
    while parent is not None:
        chain.append(parent)
        parent = parent.cpu_parent
    return chain


def marked_class(chain: list) -> str | None:
    """The class of the innermost range this bench added around the event, if any."""
    return next((e.name[len(MARK):].strip() for e in chain if e.name.startswith(MARK)), None)


def forward_class(event, chain: list) -> str | None:
    """The class a forward operator's range gives it (its backward inherits it through the sequence number)."""
    return marked_class(chain) or ("embedding" if event.name in EMBEDDING else None)


def by_name(name: str) -> str:
    if name in MATMUL:
        return "matmul"
    return "embedding" if name in EMBEDDING else "elementwise"


def classify(events) -> dict:
    """Per step: ms, FLOPs and estimated bytes of each class, from the operators' own times."""
    steps = [e for e in events if e.name.startswith("ProfilerStep")]
    ops = [e for e in events if e.name.startswith("aten::")]
    chains = {id(e): ancestors(e) for e in ops}
    by_sequence = {}
    for event in ops:  # forward operators that recorded an autograd node
        chain = chains[id(event)]
        if event.sequence_nr >= 0 and not any(e.name.startswith("autograd::engine") for e in chain):
            by_sequence.setdefault(event.sequence_nr, forward_class(event, chain))
    totals = {key: defaultdict(float) for key in ("us", "flops", "elements")}
    for event in ops:
        chain = chains[id(event)]
        kind = marked_class(chain)
        node = next((e for e in chain if e.name.startswith("autograd::engine::evaluate_function")), None)
        if kind is None and node is not None:  # a backward operator: the class of the forward it undoes
            kind = by_sequence.get(node.sequence_nr)
        kind = kind or by_name(event.name)
        totals["us"][kind] += event.self_cpu_time_total
        totals["flops"][kind] += event.flops or 0
        totals["elements"][kind] += 0 if event.flops else moved(event, kind)
    wall = sum(step.cpu_time_total for step in steps)
    totals["us"]["python"] = wall - sum(e.self_cpu_time_total for e in ops)
    count = len(steps)
    return {key: {k: v / count for k, v in values.items()} for key, values in totals.items()} | {
        "steps": count, "step_ms": wall / count / 1000}


def moved(event, kind: str) -> int:
    """Elements an operator reads and writes, from its recorded input shapes (the output taken as its largest
    input). The embedding table is left out: a lookup and its gradient touch only the batch's rows."""
    sizes = [math.prod(shape) for shape in event.input_shapes or [] if shape]
    if kind == "embedding":
        sizes = [size for size in sizes if size < TABLE]
    return sum(sizes) + max(sizes, default=0)


def settings_for(args: argparse.Namespace, prepared: Path, work: Path):
    overrides = [f"paths.prepared={prepared}", f"paths.model={work}/model", f"paths.final={work}/final",
                 f"paths.checkpoints={work}/checkpoints", f"paths.reports={work}/reports",
                 f"train.batch_size={args.batch_size}", f"train.max_steps={args.warmup + 2 + args.active + 1}",
                 "train.save_checkpoints=false", "guard.enabled=false", "tracking.enabled=false",
                 "train.progress=false", f"numerics.mode={args.numerics}"]
    if args.mode == "bf16":
        overrides.append("experiment=fast")
    return benchkit.compose_settings(overrides)


def profile_mode(args: argparse.Namespace) -> dict:
    from pairtune import numerics

    work = Path(args.work)
    settings = settings_for(args, work / "prepared", work / args.mode)
    numerics.apply(settings)  # reproducible: starts this process again, pinned, before torch is imported
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    from pairtune.core import NullObserver
    from pairtune.train.training import train

    add_ranges()
    when = schedule(wait=args.warmup, warmup=2, active=args.active, repeat=1)
    traces = []  # the active window's events, handed over once it closes
    profiler = profile(activities=[ProfilerActivity.CPU], schedule=when, record_shapes=True, with_flops=True,
                       on_trace_ready=lambda done: traces.append(classify(done.events())))

    class Stepper(NullObserver):
        def __init__(self) -> None:
            self.rates: list[float] = []

        def on_step(self, step: int, metrics: dict[str, float]) -> None:
            self.rates.append(metrics["pairs_per_second"])
            profiler.step()

    observer = Stepper()
    profiler.start()
    train(settings, observer=observer)
    profiler.stop()
    if not traces:
        raise SystemExit(f"bench: the profiler's window ({args.active} steps after {args.warmup + 2}) never closed")
    result = traces[0]
    unprofiled = observer.rates[2:args.warmup]  # after two warm-up steps, before the profiler records
    result |= {"mode": args.mode, "numerics": numerics.current(), "threads": torch.get_num_threads(),
               "batch_size": args.batch_size, "pairs_per_second_unprofiled": statistics.median(unprofiled),
               "parameters": sum(p.numel() for p in _model_parameters(settings))}
    return result


def _model_parameters(settings):
    from pairtune.model.modeling import load_model

    return load_model(settings.model.name, max_seq_length=settings.model.max_seq_length).parameters()


# -- the parent: prepare, run each mode, bound, draw, log ------------------------------------------------------


def prepare(work: Path, rows: int) -> None:
    from synth import generate

    from pairtune.data.preparation import run_prepare

    source = work / "pairs.jsonl"
    generate(rows + 200).to_json(source, orient="records", lines=True)
    run_prepare(benchkit.compose_settings([f"paths.prepared={work / 'prepared'}", f"data.source={source}",
                                           f"data.train_size={rows}", "data.eval_size=100"]))


def bandwidth(threads: int, megabytes: float, repeats: int) -> float:
    """Bytes/s of an fp32 copy of ``megabytes`` (read + write), best of ``repeats``, at the jobs' thread count."""
    import torch

    torch.set_num_threads(threads)
    source = torch.ones(int(megabytes * 2**20) // 4)
    target = torch.empty_like(source)
    target.copy_(source)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        target.copy_(source)
        best = min(best, time.perf_counter() - started)
    return 2 * source.numel() * 4 / best


def bandwidths(threads: int) -> dict[str, float]:
    """Memory (512 MB, what AdamW's 22.7M-parameter streams see) and cache (4 MB: one layer's activations)."""
    return {"memory": bandwidth(threads, 512, 5), "cache": bandwidth(threads, 4, 200)}


def bounds(result: dict, peak_flops: float, rates: dict[str, float]) -> dict[str, float]:
    """The least ms per step each class could take on this machine (see the module docstring)."""
    element = 2 if result["mode"] == "bf16" else 4
    flops, elements = result["flops"], result["elements"]
    optimizer_bytes = result["parameters"] * 4 * (7 + 1)
    ms = {kind: 1000 * flops.get(kind, 0.0) / peak_flops for kind in ("matmul", "attention", "loss")}
    for kind in ("attention", "loss", "elementwise", "embedding"):  # their products by FLOPs, the rest by bytes
        ms[kind] = ms.get(kind, 0.0) + 1000 * elements.get(kind, 0.0) * element / rates["cache"]
    ms["optimizer"] = 1000 * optimizer_bytes / rates["memory"]
    return ms | {"data": 0.0, "python": 0.0}


def run_child(args: argparse.Namespace, mode: str, work: Path) -> dict:
    out = work / f"{mode}.json"
    argv = [sys.executable, __file__, "--child", mode, "--work", str(work), "--json", str(out),
            "--warmup", str(args.warmup), "--active", str(args.active), "--batch-size", str(args.batch_size),
            "--numerics", args.numerics]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run(argv, check=True, env=env, cwd=benchkit.ROOT)
    return json.loads(out.read_text())


def draw(results: list[dict], png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, rows = [], []
    for result in results:
        labels += [f"{result['mode']} measured", f"{result['mode']} bound"]
        rows += [[result["ms"][k] for k in CLASSES], [result["bound_ms"][k] for k in CLASSES]]
    figure, axis = plt.subplots(figsize=(11, 1.6 + 0.7 * len(labels)))
    widest = max(sum(row) for row in rows)
    for position, row in enumerate(rows):
        left = 0.0
        for kind, value, colour in zip(CLASSES, row, COLOURS, strict=True):
            axis.barh(position, value, left=left, color=colour, label=kind if position == 0 else None)
            if value >= 0.045 * widest:
                axis.text(left + value / 2, position, f"{value:.0f}", ha="center", va="center", fontsize=8, color="white")
            left += value
        axis.text(left + 0.005 * widest, position, f"{left:.0f} ms", va="center", fontsize=9)
    axis.set_yticks(range(len(labels)), labels)
    axis.invert_yaxis()
    axis.set_xlabel("ms per training step")
    axis.set_title(title, fontsize=10)
    axis.legend(ncol=len(CLASSES), loc="upper center", bbox_to_anchor=(0.5, -0.35 if len(labels) < 4 else -0.18),
                fontsize=8, frameon=False)
    figure.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    staging = png.with_name(f".{png.name}.tmp.png")
    figure.savefig(staging, dpi=110)
    staging.replace(png)


def log_to_mlflow(uri: str | None, results: list[dict], png: Path, figures: Path) -> str:
    """Into pairtune's store (as a run would: the experiment's artifacts beside the store), experiment pairtune-bench."""
    import mlflow

    from pairtune.tracking.store import configure

    configure(benchkit.compose_settings([*([f"tracking.uri={uri}"] if uri else []), "tracking.experiment=pairtune-bench"]))
    with mlflow.start_run(run_name="step-profile") as run:
        for result in results:
            mode = result["mode"]
            mlflow.log_metrics({f"{mode}_step_ms": result["step_ms"],
                                **{f"{mode}_{k}_ms": result["ms"][k] for k in CLASSES},
                                **{f"{mode}_{k}_bound_ms": result["bound_ms"][k] for k in CLASSES}})
        mlflow.log_artifact(str(png))
        mlflow.log_artifact(str(figures))
        return run.info.run_id


def print_table(results: list[dict], peak, rates: dict[str, float]) -> None:
    for result in results:
        ms, bound = result["ms"], result["bound_ms"]
        print(f"\n{result['mode']} ({result['numerics']} numerics, {result['threads']} threads, batch "
              f"{result['batch_size']}): {result['step_ms']:.1f} ms per profiled step over {result['steps']} steps; "
              f"{result['pairs_per_second_unprofiled']:.1f} pairs/s unprofiled")
        print(f"  {'class':<12}{'ms/step':>9}{'share':>8}{'bound ms':>10}{'x bound':>9}{'GFLOP':>8}")
        for kind in CLASSES:
            ratio = f"{ms[kind] / bound[kind]:.1f}" if bound[kind] > 0 else "-"
            print(f"  {kind:<12}{ms[kind]:>9.1f}{100 * ms[kind] / result['step_ms']:>7.0f}%{bound[kind]:>10.1f}"
                  f"{ratio:>9}{result['flops'].get(kind, 0) / 1e9:>8.2f}")
    print(f"\nbounds: nominal peak fp32 {peak.flops('fp32', results[0]['threads']) / 1e9:.0f}, bf16 "
          f"{peak.flops('bf16', results[0]['threads']) / 1e9:.0f} GFLOP/s; copy bandwidth, measured now: memory "
          f"{rates['memory'] / 1e9:.1f} GB/s (512 MB: the optimizer), cache {rates['cache'] / 1e9:.1f} GB/s (4 MB: "
          "activations)")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    parser.add_argument("--rows", type=int, default=2000, help="synthetic training pairs (default 2,000)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=6, help="unprofiled steps first (default 6)")
    parser.add_argument("--active", type=int, default=10, help="profiled steps (default 10)")
    parser.add_argument("--numerics", choices=("fastest", "reproducible"), default="fastest",
                        help="fastest: what a command-line run uses (default)")
    parser.add_argument("--png", type=Path, default=benchkit.ROOT / "docs" / "step_profile.png")
    parser.add_argument("--json", type=Path, default=benchkit.ROOT / "docs" / "step_profile.json")
    parser.add_argument("--tracking-uri", default=None,
                        help="default: pairtune's store ($MLFLOW_TRACKING_URI, else mlflow.db at the repository root)")
    parser.add_argument("--no-tracking", action="store_true", help="do not log the figures and chart to MLflow")
    parser.add_argument("--child", choices=("fp32", "bf16"), help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    benchkit.setup_logging()
    if args.child:
        args.mode = args.child
        result = profile_mode(args)
        args.json.write_text(json.dumps(result, sort_keys=True))
        return 0
    import flops

    from pairtune.numerics import cpu_description

    with tempfile.TemporaryDirectory(prefix="bench-step-") as folder:
        work = Path(folder)
        prepare(work, args.rows)
        results = [run_child(args, mode, work) for mode in args.modes]
    peak, threads = flops.cpu_peak(), results[0]["threads"]
    rates = bandwidths(threads)
    for result in results:
        result["bound_ms"] = bounds(result, peak.flops(result["mode"], threads), rates)
        result["ms"] = {k: result["us"].get(k, 0.0) / 1000 for k in CLASSES}
    title = (f"pairtune, one training step, measured vs bound: batch {args.batch_size}, {args.numerics} numerics, "
             f"{threads} threads, {time.strftime('%Y-%m-%d')}\n{cpu_description()}")
    print_table(results, peak, rates)
    draw(results, args.png, title)
    figures = {"title": title, "bandwidth_gb_per_s": {k: v / 1e9 for k, v in rates.items()}, "results": results}
    args.json.write_text(json.dumps(figures, indent=1, sort_keys=True) + "\n")
    print(f"\nchart: {args.png.relative_to(benchkit.ROOT) if args.png.is_relative_to(benchkit.ROOT) else args.png}")
    if not args.no_tracking:
        print(f"MLflow run {log_to_mlflow(args.tracking_uri, results, args.png, args.json)} (experiment pairtune-bench)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
