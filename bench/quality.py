"""`make bench-quality`: training recipes on three data sets in the notation, several seeds each, chosen on eval.

Each recipe is a list of pairtune overrides; each (data set, recipe, seed) trains in a fresh process
(``pipelines/train.py``, tracking and checkpoints off) and the saved model is then scored on that set's eval
split (the only split a choice may look at) and its test split (reported, never used to choose). Mined
recipes train on a copy of the prepared splits with hard negatives from the mine stage (mined once per set,
timed apart). Time is the training process's wall clock, start to model on disk, relative to the seed
recipe's median on the same set.

A preset holds only where it holds on every set: for each recipe the bench prints, per set, its mean gain
over the seed recipe on eval MRR@10 and the seed recipe's own seed-to-seed spread (max - min over seeds),
and keeps the recipe only if every gain exceeds its set's spread.

    .venv/bin/python bench/quality.py                         # seed, lr 1e-4, lr 2e-4 on 3 sets x seeds 42 1 2
    .venv/bin/python bench/quality.py --sets harbour --recipes seed mined symmetric select_best
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

# name -> (pairs file, train size, eval size): the bundled harbour set and two more original sets in the
# notation, each in a setting of its own; the others split about 71% / 12% / 17%, as the bundled one does.
DATA_SETS: dict[str, tuple[Path, str, str]] = {
    "harbour": (ROOT / "data/raw/pairs.jsonl", "263", "45"),
    "caravan": (ROOT / "data/raw/caravan.jsonl", "0.71", "0.12"),
    "observatory": (ROOT / "data/raw/observatory.jsonl", "0.71", "0.12"),
}
DEFAULT_RECIPES = ["seed", "lr_1e-4", "lr_2e-4"]

# name -> (overrides, needs mined negatives). lr 2e-4 was the bundled data's best and its preset
# (experiment=quality) until this bench ran it on three sets: it gained on two and lost on caravan's eval
# split, so no preset is kept and `make tune` finds the learning rate on the user's own eval split.
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
}


def run_job(data_set: str, name: str, seed: int, work: Path, threads: int) -> dict:
    """Train one (set, recipe, seed) with the guard on; score the trained and the final model."""
    overrides, needs_mined = RECIPES[name]
    prepared, mined = work / data_set / "prepared", work / data_set / "mined"
    out = work / data_set / f"{name}-{seed}"
    command = [
        sys.executable, str(ROOT / "pipelines/train.py"), *overrides, f"train.seed={seed}",
        f"paths.prepared={mined if needs_mined else prepared}", f"paths.mined={mined}",
        f"paths.model={out}/model", f"paths.final={out}/final", f"paths.checkpoints={out}/checkpoints",
        f"paths.reports={out}/reports", f"paths.general_cache={work}/general-cache",
        "tracking.enabled=false", "train.save_checkpoints=false", "train.progress=false",
        f"train.num_threads={threads}", f"hydra.run.dir={out}/hydra",
    ]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{name} seed {seed} failed:\n{done.stderr[-3000:]}")
    guard = json.loads((out / "reports/guard.json").read_text())
    general = {f"general_{k}": v[PRIMARY] for k, v in guard["general"].items()}
    return {"set": data_set, "recipe": name, "seed": seed, "seconds": seconds, "chosen_a": guard["chosen_a"],
            **score(out / "model", prepared), **score(out / "final", prepared, prefix="final_"), **general}


def score(model_dir: Path, prepared: Path, prefix: str = "") -> dict:
    """MRR@10 and NDCG@10 of a saved model on eval and on test, as the pipeline's evaluator computes them."""
    from sentence_transformers import SentenceTransformer

    from pairtune.data.pairs import Columns, load_prepared
    from pairtune.outputs.evaluation import build_evaluator, run_evaluator

    model, splits = SentenceTransformer(str(model_dir), device="cpu"), load_prepared(prepared)
    scores: dict = {"rows": "/".join(str(len(splits[s])) for s in ("train", "eval", "test"))}
    for split in ("eval", "test"):
        metrics = run_evaluator(build_evaluator(splits[split], Columns(), name=split, batch_size=32), model)
        scores[f"{prefix}{split}_mrr"] = metrics[PRIMARY]
        scores[f"{prefix}{split}_ndcg"] = metrics["cosine_ndcg@10"]
    return scores


def base_scores(work: Path, data_set: str) -> dict:
    """The base model's test and eval MRR@10 on one set: where every task gain is measured from."""
    from pairtune.model.model_source import resolve_model_source

    return score(Path(resolve_model_source(benchkit.MODEL_ID)[0]), work / data_set / "prepared")


def guard_table(results: list[dict], bases: dict[str, dict], sets: list[str], names: list[str]) -> None:
    """Task (test) and general MRR@10 of the base, trained and final (blended) models, per set and recipe."""
    print("\n## The guard: task and general retrieval of base, trained and final (blended) models\n")
    print("test MRR@10 of the task and general MRR@10, means over seeds; kept = (final - base) / (trained - base) "
          "of the task gain; a = the chosen blends\n")
    print("| set | recipe | task base / trained / final | kept | general base / trained / final | a |")
    print("| --- | --- | --- | --- | --- | --- |")
    for data_set in sets:
        for name in names:
            rows = [r for r in results if r["set"] == data_set and r["recipe"] == name]
            if not rows:
                continue
            base, trained, final = (bases[data_set]["test_mrr"], statistics.mean(r["test_mrr"] for r in rows),
                                    statistics.mean(r["final_test_mrr"] for r in rows))
            kept = (final - base) / (trained - base) if trained != base else float("nan")
            general = [statistics.mean(r[f"general_{k}"] for r in rows) for k in ("base", "trained", "final")]
            chosen = " ".join(f"{r['chosen_a']:g}" for r in rows)
            print(f"| {data_set} | {name} | {base:.4f} / {trained:.4f} / {final:.4f} | {kept:.0%} | "
                  + " / ".join(f"{g:.4f}" for g in general) + f" | {chosen} |")


def prepare_and_mine(work: Path, data_set: str) -> float:
    """Split one data set into ``work/<set>/prepared`` and mine it into ``work/<set>/mined``: the mining seconds."""
    source, train_size, eval_size = DATA_SETS[data_set]
    folder = work / data_set
    prepared, mined = folder / "prepared", folder / "mined"
    subprocess.run([sys.executable, str(ROOT / "pipelines/prepare.py"), f"data.source={source}",
                    f"data.train_size={train_size}", f"data.eval_size={eval_size}", f"paths.prepared={prepared}",
                    f"hydra.run.dir={folder}/hydra-prepare"], cwd=ROOT, check=True, capture_output=True)
    started = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "pipelines/mine.py"), "mining.enabled=true",
                    f"paths.prepared={prepared}", f"paths.mined={mined}", f"paths.mining_cache={folder}/cache",
                    f"hydra.run.dir={folder}/hydra-mine"], cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - started


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ({sd:.4f})"


def summarise_set(results: list[dict], data_set: str, names: list[str], mine_seconds: float) -> None:
    """The recipe table of one data set: eval and test MRR@10 mean (sd), test NDCG@10, time."""
    rows_of = {name: [r for r in results if r["set"] == data_set and r["recipe"] == name] for name in names}
    seed_rows = rows_of.get("seed") or []
    base_seconds = statistics.median(r["seconds"] for r in seed_rows) if seed_rows else None
    rows = rows_of[names[0]]
    split = f"{data_set}: train/eval/test {rows[0]['rows']}" if rows else data_set
    print(f"\n### {split} (mine stage: {mine_seconds:.1f} s, embeddings not cached)")
    print("\n| recipe | seeds | eval MRR@10 mean (sd) | test MRR@10 mean (sd) | test NDCG@10 mean | time vs seed |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in names:
        rows = rows_of[name]
        if not rows:
            continue
        ratio = statistics.median(r["seconds"] for r in rows) / base_seconds if base_seconds else float("nan")
        test_ndcg = statistics.mean(r["test_ndcg"] for r in rows)
        print(f"| {name} | {len(rows)} | {mean_sd([r['eval_mrr'] for r in rows])} | "
              f"{mean_sd([r['test_mrr'] for r in rows])} | {test_ndcg:.4f} | {ratio:.2f}x |")


def verdicts(results: list[dict], sets: list[str], names: list[str]) -> dict[str, bool]:
    """Per recipe: does its mean eval MRR@10 gain over the seed recipe exceed the seed spread on every set?"""

    def of(data_set: str, name: str, key: str) -> list[float]:
        return [r[key] for r in results if r["set"] == data_set and r["recipe"] == name]

    print("\n## Does a recipe beat the seed recipe by more than the seed-to-seed spread on every set?")
    print("\ngain = mean eval MRR@10 - the seed recipe's; spread = the seed recipe's max - min over seeds "
          "(eval MRR@10); test gains reported beside, never used to choose\n")
    print("| recipe | " + " | ".join(f"{s} gain (spread) / test gain" for s in sets) + " | holds on every set |")
    print("| --- | " + " | ".join("---" for _ in sets) + " | --- |")
    held = {}
    for name in (n for n in names if n != "seed"):
        cells, holds = [], True
        for data_set in sets:
            seed_eval = of(data_set, "seed", "eval_mrr")
            gain = statistics.mean(of(data_set, name, "eval_mrr")) - statistics.mean(seed_eval)
            spread = max(seed_eval) - min(seed_eval)
            test_gain = statistics.mean(of(data_set, name, "test_mrr")) - statistics.mean(of(data_set, "seed", "test_mrr"))
            holds &= gain > spread
            cells.append(f"{gain:+.4f} ({spread:.4f}) / {test_gain:+.4f}")
        held[name] = holds
        print(f"| {name} | " + " | ".join(cells) + f" | {'yes' if holds else 'no'} |")
    return held


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=list(DATA_SETS), choices=list(DATA_SETS))
    parser.add_argument("--recipes", nargs="+", default=DEFAULT_RECIPES, choices=list(RECIPES))
    parser.add_argument("--seeds", nargs="+", type=int, default=ALL_SEEDS)
    parser.add_argument("--jobs", type=int, default=2, help="training processes at a time (one thread each)")
    parser.add_argument("--json", type=Path, help="also write every (set, recipe, seed) result here")
    args = parser.parse_args()
    names = ["seed", *(n for n in args.recipes if n != "seed")]  # every gain is measured against the seed recipe
    with tempfile.TemporaryDirectory(prefix="pairtune-quality-") as tmp:
        work = Path(tmp)
        mine_seconds = {data_set: prepare_and_mine(work, data_set) for data_set in args.sets}
        bases = {data_set: base_scores(work, data_set) for data_set in args.sets}
        jobs = [(data_set, name, seed) for data_set in args.sets for seed in args.seeds for name in names]
        threads = max(1, 2 // args.jobs)
        with ThreadPoolExecutor(args.jobs) as pool:
            futures = [pool.submit(run_job, d, n, s, work, threads) for d, n, s in jobs]
            results = []
            for future in futures:
                results.append(future.result())
                last = results[-1]
                print(f"{last['set']} {last['recipe']} seed {last['seed']}: eval {last['eval_mrr']:.4f} "
                      f"test {last['test_mrr']:.4f} {last['seconds']:.0f} s", file=sys.stderr, flush=True)
    if args.json:
        args.json.write_text(json.dumps({"bases": bases, "results": results}, indent=2) + "\n")
    for data_set in args.sets:
        summarise_set(results, data_set, names, mine_seconds[data_set])
    if len(args.seeds) > 1:
        verdicts(results, args.sets, names)
    guard_table(results, bases, args.sets, names)


if __name__ == "__main__":
    main()
