"""`make bench-quality`: recipes for the bundled data's 263 training pairs, several seeds each, chosen on eval.

Each recipe is a list of pairtune overrides; each (recipe, seed) trains in a fresh process
(``pipelines/train.py``, tracking and checkpoints off) and the saved model is then scored on the eval split
(the only split a choice may look at) and on the test split (reported, never used to choose). Mined recipes
train on a copy of the prepared splits with hard negatives from the mine stage (mined once, timed apart).
Time is the training process's wall clock, start to model on disk, relative to the seed recipe's median.

    .venv/bin/python bench/quality.py                      # every recipe, seeds 42 1 2, two jobs at a time
    .venv/bin/python bench/quality.py --recipes seed quality --seeds 42 1 2 3 4
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = benchkit.ROOT
PRIMARY = "cosine_mrr@10"
ALL_SEEDS = [42, 1, 2]

# name -> (overrides, needs mined negatives). "quality" must equal conf/experiment/quality.yaml's recipe.
RECIPES: dict[str, tuple[list[str], bool]] = {
    "seed": ([], False),
    "no_duplicates": (["train.batch_sampler=no_duplicates"], False),
    "mined": (["mining.enabled=true", "train.batch_sampler=no_duplicates"], True),
    "symmetric": (["loss.symmetric=true"], False),
    "select_best": (["train.select_best=true"], False),
    "lr_1e-4": (["train.lr=1e-4"], False),
    "lr_2e-4": (["train.lr=2e-4"], False),
    "epochs_20": (["train.epochs=20"], False),
    "batch_16": (["train.batch_size=16"], False),
    "lr_3e-4": (["train.lr=3e-4"], False),
    "lr_2e-4+symmetric": (["train.lr=2e-4", "loss.symmetric=true"], False),
    "lr_2e-4+select_best": (["train.lr=2e-4", "train.select_best=true"], False),
    "lr_2e-4+mined": (["train.lr=2e-4", "mining.enabled=true", "train.batch_sampler=no_duplicates"], True),
    "lr_2e-4+symmetric+select_best": (["train.lr=2e-4", "loss.symmetric=true", "train.select_best=true"], False),
    "quality": (["experiment=quality"], False),
}


def run_job(name: str, seed: int, work: Path, prepared: Path, mined: Path, threads: int) -> dict:
    overrides, needs_mined = RECIPES[name]
    out = work / f"{name}-{seed}"
    command = [
        sys.executable, str(ROOT / "pipelines/train.py"), *overrides, f"train.seed={seed}",
        f"paths.prepared={mined if needs_mined else prepared}", f"paths.mined={mined}",
        f"paths.model={out}/model", f"paths.checkpoints={out}/checkpoints", f"paths.reports={out}/reports",
        "tracking.enabled=false", "train.save_checkpoints=false", "train.progress=false",
        f"train.num_threads={threads}", f"hydra.run.dir={out}/hydra",
    ]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{name} seed {seed} failed:\n{done.stderr[-3000:]}")
    return {"recipe": name, "seed": seed, "seconds": seconds, **score(out / "model", prepared)}


def score(model_dir: Path, prepared: Path) -> dict[str, float]:
    """MRR@10 and NDCG@10 of the saved model on eval and on test, as the pipeline's evaluator computes them."""
    from sentence_transformers import SentenceTransformer

    from pairtune.data import Columns, load_prepared
    from pairtune.evaluation import build_evaluator, run_evaluator

    model, splits, scores = SentenceTransformer(str(model_dir), device="cpu"), load_prepared(prepared), {}
    for split in ("eval", "test"):
        metrics = run_evaluator(build_evaluator(splits[split], Columns(), name=split, batch_size=32), model)
        scores[f"{split}_mrr"] = metrics[PRIMARY]
        scores[f"{split}_ndcg"] = metrics["cosine_ndcg@10"]
    return scores


def prepare_and_mine(work: Path) -> tuple[Path, Path, float]:
    prepared, mined = work / "prepared", work / "mined"
    subprocess.run([sys.executable, str(ROOT / "pipelines/prepare.py"), f"paths.prepared={prepared}",
                    f"hydra.run.dir={work}/hydra-prepare"], cwd=ROOT, check=True, capture_output=True)
    started = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "pipelines/mine.py"), "mining.enabled=true",
                    f"paths.prepared={prepared}", f"paths.mined={mined}", f"paths.mining_cache={work}/cache",
                    f"hydra.run.dir={work}/hydra-mine"], cwd=ROOT, check=True, capture_output=True)
    return prepared, mined, time.perf_counter() - started


def summarise(results: list[dict], names: list[str], mine_seconds: float) -> None:
    base_seconds = statistics.median(r["seconds"] for r in results if r["recipe"] == "seed") if any(
        r["recipe"] == "seed" for r in results) else None
    print(f"\nmine stage (base model, embeddings not cached): {mine_seconds:.1f} s, once per data set")
    print("\n| recipe | seeds | eval MRR@10 mean (sd) | test MRR@10 mean (sd) | test NDCG@10 mean | time vs seed |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in names:
        rows = [r for r in results if r["recipe"] == name]
        if not rows:
            continue

        def mean_sd(key: str, rows: list[dict] = rows) -> str:
            values = [r[key] for r in rows]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            return f"{statistics.mean(values):.4f} ({sd:.4f})"

        ratio = statistics.median(r["seconds"] for r in rows) / base_seconds if base_seconds else float("nan")
        test_ndcg = statistics.mean(r["test_ndcg"] for r in rows)
        print(f"| {name} | {len(rows)} | {mean_sd('eval_mrr')} | {mean_sd('test_mrr')} | {test_ndcg:.4f} | "
              f"{ratio:.2f}x |")
    ranked = sorted(names, key=lambda n: -statistics.mean(
        [r["eval_mrr"] for r in results if r["recipe"] == n] or [float("-inf")]))
    print(f"\nbest on eval (the only split used to choose): {ranked[0]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--seeds", nargs="+", type=int, default=ALL_SEEDS)
    parser.add_argument("--jobs", type=int, default=2, help="training processes at a time (one thread each)")
    parser.add_argument("--json", type=Path, help="also write every (recipe, seed) result here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pairtune-quality-") as tmp:
        work = Path(tmp)
        prepared, mined, mine_seconds = prepare_and_mine(work)
        jobs = [(name, seed) for seed in args.seeds for name in args.recipes]
        threads = max(1, 2 // args.jobs)
        with ThreadPoolExecutor(args.jobs) as pool:
            futures = [pool.submit(run_job, n, s, work, prepared, mined, threads) for n, s in jobs]
            results = []
            for future in futures:
                results.append(future.result())
                last = results[-1]
                print(f"{last['recipe']} seed {last['seed']}: eval {last['eval_mrr']:.4f} test {last['test_mrr']:.4f} "
                      f"{last['seconds']:.0f} s", file=sys.stderr, flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    summarise(results, args.recipes, mine_seconds)


if __name__ == "__main__":
    main()
