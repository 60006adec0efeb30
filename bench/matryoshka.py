"""`make bench-matryoshka`: retrieval at each embedding size, trained with and without the Matryoshka loss.

For each data set and seed, the seed card's run trains twice in fresh processes (``pipelines/train.py``,
tracking, checkpoints and the guard off): plain MNRL, and MNRL under ``loss.matryoshka_dims`` (each weight
1). Each trained model and the base model are then scored on the set's test split at every dim: the first
``dim`` components of each embedding, cosine (so renormalised), as ``SentenceTransformer(truncate_dim=dim)``
and an ``export.dim`` ONNX graph score them. Index size: fp32 bytes per text, and for a million texts.

    .venv/bin/python bench/matryoshka.py                                   # 3 sets x seeds 42 1
    .venv/bin/python bench/matryoshka.py --sets harbour --seeds 42 --dims 384 192 96 48
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

from quality import DATA_SETS

ROOT = benchkit.ROOT
DIMS = [384, 256, 128, 64, 32]


def prepare(work: Path, data_set: str) -> Path:
    source, train_size, eval_size = DATA_SETS[data_set]
    prepared = work / data_set / "prepared"
    subprocess.run([sys.executable, str(ROOT / "pipelines/prepare.py"), f"data.source={source}",
                    f"data.train_size={train_size}", f"data.eval_size={eval_size}", f"paths.prepared={prepared}",
                    f"hydra.run.dir={work}/{data_set}/hydra-prepare"], cwd=ROOT, check=True, capture_output=True)
    return prepared


def train(work: Path, data_set: str, loss: str, seed: int, dims: list[int]) -> dict:
    """One training process; the seconds are its wall clock, start to model on disk."""
    out = work / data_set / f"{loss}-{seed}"
    extra = [f"loss.matryoshka_dims=[{','.join(map(str, dims))}]"] if loss == "matryoshka" else []
    command = [
        sys.executable, str(ROOT / "pipelines/train.py"), *extra, f"train.seed={seed}",
        f"paths.prepared={work / data_set / 'prepared'}", f"paths.model={out}/model", f"paths.final={out}/final",
        f"paths.checkpoints={out}/checkpoints", f"paths.reports={out}/reports", "guard.enabled=false",
        "tracking.enabled=false", "train.save_checkpoints=false", "train.progress=false", "train.num_threads=1",
        f"hydra.run.dir={out}/hydra",
    ]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{data_set} {loss} seed {seed} failed:\n{done.stderr[-3000:]}")
    return {"set": data_set, "loss": loss, "seed": seed, "seconds": time.perf_counter() - started,
            "model": str(out / "model")}


def score(model_dir: str, prepared: Path, dims: list[int]) -> dict[int, dict[str, float]]:
    """Test-split MRR@10 and NDCG@10 at each dim, as the evaluate stage scores them."""
    from sentence_transformers import SentenceTransformer

    from pairtune.data.pairs import Columns, load_prepared
    from pairtune.outputs.evaluation import evaluate_split

    model = SentenceTransformer(model_dir, device="cpu")
    metrics = evaluate_split(model, load_prepared(prepared)["test"], Columns(), batch_size=32, dims=dims)
    return {d: {"mrr": metrics[f"cosine_mrr_at_10_dim{d}"], "ndcg": metrics[f"cosine_ndcg_at_10_dim{d}"]}
            for d in dims}


def table(data_set: str, rows: list[dict], base: dict, dims: list[int], test_rows: int) -> None:
    by_loss = {loss: [r for r in rows if r["set"] == data_set and r["loss"] == loss] for loss in ("plain", "matryoshka")}
    seeds = len(by_loss["plain"])
    print(f"\n### {data_set}: test split, {test_rows} pairs; means over {seeds} seed(s)\n")
    print("| dim | fp32 bytes / text | 1M texts | base MRR@10 | plain MRR@10 | Matryoshka MRR@10 | change "
          "| plain NDCG@10 | Matryoshka NDCG@10 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for dim in dims:
        mean = {loss: {m: statistics.mean(r["scores"][dim][m] for r in got) for m in ("mrr", "ndcg")}
                for loss, got in by_loss.items()}
        change = mean["matryoshka"]["mrr"] - mean["plain"]["mrr"]
        print(f"| {dim} | {dim * 4} | {dim * 4 * 10**6 / 2**20:.0f} MiB | {base[dim]['mrr']:.4f} | "
              f"{mean['plain']['mrr']:.4f} | {mean['matryoshka']['mrr']:.4f} | {change:+.4f} | "
              f"{mean['plain']['ndcg']:.4f} | {mean['matryoshka']['ndcg']:.4f} |")
    seconds = {loss: statistics.median(r["seconds"] for r in got) for loss, got in by_loss.items()}
    print(f"\ntraining process, median: plain {seconds['plain']:.1f} s, Matryoshka {seconds['matryoshka']:.1f} s "
          f"(evaluations at {len(dims)} dims included)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=list(DATA_SETS), choices=list(DATA_SETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 1])
    parser.add_argument("--dims", nargs="+", type=int, default=DIMS, help="largest first")
    parser.add_argument("--jobs", type=int, default=2, help="training processes at a time (one thread each)")
    parser.add_argument("--json", type=Path, help="also write every result here")
    args = parser.parse_args()
    from pairtune.data.pairs import load_prepared
    from pairtune.model.model_source import resolve_model_source

    with tempfile.TemporaryDirectory(prefix="pairtune-matryoshka-") as scratch:
        work = Path(scratch)
        prepared = {data_set: prepare(work, data_set) for data_set in args.sets}
        jobs = [(s, loss, seed) for s in args.sets for seed in args.seeds for loss in ("plain", "matryoshka")]
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            rows = list(pool.map(lambda job: train(work, *job, args.dims), jobs))
        base_dir = str(resolve_model_source(benchkit.MODEL_ID)[0])
        bases = {s: score(base_dir, prepared[s], args.dims) for s in args.sets}
        for row in rows:
            row["scores"] = score(row.pop("model"), prepared[row["set"]], args.dims)
        print(f"# Matryoshka: dims {args.dims}, the seed card's run (90 steps), seeds {args.seeds}")
        for data_set in args.sets:
            table(data_set, rows, bases[data_set], args.dims, len(load_prepared(prepared[data_set])["test"]))
    if args.json:
        args.json.write_text(json.dumps({"bases": bases, "results": rows}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
