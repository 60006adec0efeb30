"""pairtune's whole job as a user runs it: ``pipelines/train.py <overrides>``, in this process, unchanged.

The script runs through ``runpy`` with the same argv it would get from the shell. The only addition is a
listener between the loop and the run's observer (``pairtune.tracking.tracked_run`` yields it; tracking off
yields a no-op one): it forwards every call and notes the time, which gives the phases of the job without
touching pairtune. ``pairtune.tracking`` is light (no torch, no MLflow) and the script imports it first thing
anyway, so importing it here first changes nothing the job pays for. The timings go to ``--out``; the bench
times the process from outside (interpreter start included).
"""

from __future__ import annotations

import benchkit  # first: the script's start time; forces the hub off before transformers is imported

# isort: split
import contextlib
import runpy
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pairtune.tracking

SCRIPT = benchkit.ROOT / "pipelines" / "train.py"


class Listener:
    """Forwards the loop's reports to the run's observer; notes when they came and how long the observer took."""

    def __init__(self, observer) -> None:
        self.observer = observer
        self.observer_seconds = 0.0  # inside the run's observer: per-step metrics, evaluations, model logging
        self.observer_end_seconds = 0.0  # of which on_train_end (logging the model when tracking is on)
        self.eval_seconds: list[float] = []
        self.eval_metrics: list[dict[str, float]] = []
        self.marks: dict[str, float] = {}
        self.save_seconds = 0.0
        self.threads: int | None = None
        self.result: Any = None
        self._mark = time.perf_counter()

    @property
    def run_id(self) -> str | None:
        return self.observer.run_id

    def _forward(self, name: str, *args) -> None:
        started = time.perf_counter()
        getattr(self.observer, name)(*args)
        took = time.perf_counter() - started
        self.observer_seconds += took
        if name == "on_train_end":
            self.observer_end_seconds = took
        self._mark = time.perf_counter()

    def on_train_start(self, context: dict[str, Any]) -> None:
        self.marks["train_start"] = time.time()
        self.threads = sys.modules["torch"].get_num_threads()  # inside train(): the count the loop uses
        self._forward("on_train_start", context)

    def on_resume(self, step: int) -> None:
        self._forward("on_resume", step)

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self._forward("on_step", step, metrics)

    def on_evaluate(self, step: int, epoch: float, metrics: dict[str, float]) -> None:
        # The evaluation ran since the previous report: the step-0 one after on_train_start, the others after
        # their epoch's last on_step.
        self.eval_seconds.append(time.perf_counter() - self._mark)
        self.eval_metrics.append(dict(metrics))
        self._forward("on_evaluate", step, epoch, metrics)

    def on_train_end(self, result) -> None:
        self.marks["model_saved"] = time.time()  # train() calls this once the model and its card are written
        self.save_seconds = time.perf_counter() - self._mark
        self.result = result
        self._forward("on_train_end", result)


class Seam:
    """Wraps ``pairtune.tracking.tracked_run``: hands the loop a :class:`Listener`, times opening and closing."""

    def __init__(self, tracked_run) -> None:
        self.tracked_run = tracked_run
        self.listener: Listener | None = None
        self.open_seconds = self.close_seconds = 0.0

    @contextlib.contextmanager
    def __call__(self, *args, **kwargs) -> Iterator[Listener]:
        started = time.perf_counter()
        context = self.tracked_run(*args, **kwargs)
        observer = context.__enter__()
        self.open_seconds = time.perf_counter() - started
        self.listener = Listener(observer)
        try:
            yield self.listener
        except BaseException:  # handed to the run's context, as a `with` statement would
            if not context.__exit__(*sys.exc_info()):
                raise
        else:
            started = time.perf_counter()
            context.__exit__(None, None, None)
            self.close_seconds = time.perf_counter() - started


def run_script(overrides: list[str], hydra_dir: Path) -> int:
    """``python pipelines/train.py <overrides>`` in this process; its exit status."""
    sys.argv = [str(SCRIPT), *overrides, f"hydra.run.dir={hydra_dir}"]
    try:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else 1
    return 0


def summary(seam: Seam, args) -> dict[str, Any]:
    """The listener's notes as the bench's result."""
    listener = seam.listener
    result = listener.result
    final = listener.eval_metrics[-1] if listener.eval_metrics else {}
    return {
        "system": "pairtune",
        "epochs": args.epochs,
        "max_steps": args.max_steps,
        "precision": precision(args),
        "overrides": args.extra,
        "tracking": args.tracking_uri is not None,
        "run_id": listener.run_id,
        "threads": listener.threads,
        "steps": result.global_step,
        "timed_steps": len(result.step_losses),
        "step_seconds": result.train_seconds,
        "global_batch_size": result.global_batch_size,
        "loop_pairs_per_second": result.pairs_per_second,
        "eval_seconds": listener.eval_seconds,
        "save_seconds": listener.save_seconds,
        "observer_seconds": listener.observer_seconds,
        "observer_end_seconds": listener.observer_end_seconds,
        "open_seconds": seam.open_seconds,
        "close_seconds": seam.close_seconds,
        "marks": {**listener.marks, "script_start": benchkit.SCRIPT_START},
        "eval_ndcg_at_10": final.get("cosine_ndcg@10"),
        "eval_mrr_at_10": final.get("cosine_mrr@10"),
        "eval_ndcg_at_10_first": listener.eval_metrics[0].get("cosine_ndcg@10")
        if listener.eval_metrics
        else None,
        "first_loss": result.step_losses[0] if result.step_losses else None,
        "last_loss": result.step_losses[-1] if result.step_losses else None,
        "model_dir": str(result.model_dir),
    }


def precision(args) -> str:
    """The precision the job trained in, from the config it composed (a preset may have set it)."""
    from omegaconf import OmegaConf

    composed = OmegaConf.load(args.work.resolve() / "hydra" / ".hydra" / "config.yaml")
    return "bf16" if composed.train.mixed_precision == "bf16" else "fp32"


def overrides_for(args) -> list[str]:
    """Outputs under ``--work``, no checkpoints (the trainer saves none either); tracking off or into a store.

    The guard is off: the trainer does no general-retrieval evaluation or blending, so like for like leaves
    it out. ``--set guard.enabled=true`` (``make bench``'s "guard" line) turns it on with an empty general-score
    cache of the job's own, so each such job scores the base model, the trained model and the blends it tries,
    as a machine's first run does.
    """
    work = args.work.resolve()
    guard = any(extra == "guard.enabled=true" for extra in args.extra)
    overrides = [
        f"paths.prepared={args.prepared.resolve()}",
        f"paths.model={work}/model",
        f"paths.final={work}/final",
        f"paths.checkpoints={work}/checkpoints",
        f"paths.reports={work}/reports",
        f"train.epochs={args.epochs}",
        f"train.max_steps={args.max_steps}",
        f"train.batch_size={args.batch_size}",
        "train.save_checkpoints=false",
        *([f"paths.general_cache={work}/general-cache"] if guard else ["guard.enabled=false"]),
        f"tracking.enabled={str(args.tracking_uri is not None).lower()}",
    ]
    if args.tracking_uri:
        overrides.append(f"tracking.uri={args.tracking_uri}")
    if args.precision == "bf16":
        overrides.append("train.mixed_precision=bf16")
    return overrides + args.extra


def main() -> int:
    parser = benchkit.job_parser(__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", default=None, help="tracking on, into this (existing) store")
    parser.add_argument(
        "--set",
        dest="extra",
        action="append",
        default=[],
        metavar="OVERRIDE",
        help="an extra override for pipelines/train.py, e.g. experiment=fast (repeatable)",
    )
    args = parser.parse_args()
    seam = Seam(pairtune.tracking.tracked_run)
    pairtune.tracking.tracked_run = seam  # pipelines/train.py takes it from here when it is run below
    status = run_script(overrides_for(args), args.work.resolve() / "hydra")
    if status != 0:
        return status
    if seam.listener is None or seam.listener.result is None:
        print(
            "bench: pipelines/train.py did not train through pairtune.tracking.tracked_run", file=sys.stderr
        )
        return 1
    benchkit.write_result(summary(seam, args), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
