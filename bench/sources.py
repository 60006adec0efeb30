"""`make bench-sources`: one model on three sources against one model per source, scored per source on test.

The three bundled sets at the sizes of ``experiment=multi_source`` (harbour 263 training pairs, caravan 120,
observatory 40; every source split on its own, so each source's test split is the same in every run):

- ``alone``: one run per source, on that source's prepared splits (the seed card's run for harbour);
- ``together``: ``experiment=multi_source`` without its prompts and Matryoshka dims (one source per batch);
- ``experiment``: ``experiment=multi_source`` as shipped (prompts and dims too).

Each run is the seed card's recipe (10 epochs, lr 5e-5), guard off, in a fresh process; every trained model
is scored on each source's test split as the evaluate stage scores it (MRR@10 and NDCG@10).

    .venv/bin/python bench/sources.py
"""

from __future__ import annotations

import benchkit  # first: it forces the hub off before transformers is imported

# isort: split
import argparse
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pairtune.model.model_source import resolve_model_source

ROOT = benchkit.ROOT
SIZES = {"harbour": ("data/raw/pairs.jsonl", 263, 45), "caravan": ("data/raw/caravan.jsonl", 120, 42),
         "observatory": ("data/raw/observatory.jsonl", 40, 42)}
PLAIN = ["data.anchor_prompt=null", "data.positive_prompt=null", "loss.matryoshka_dims=null"]


def pipeline(script: str, *overrides: str) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "pipelines" / script), *overrides], cwd=ROOT,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{script} {overrides} failed:\n{done.stderr[-3000:]}")


def job(work: Path, label: str, overrides: list[str]) -> tuple[str, float]:
    """Prepare and train one run in its own folders; the training process's seconds."""
    out = work / label
    paths = [f"paths.prepared={out}/prepared", f"hydra.run.dir={out}/hydra"]
    pipeline("prepare.py", *overrides, *paths)
    started = time.perf_counter()
    pipeline("train.py", *overrides, *paths, f"paths.model={out}/model", f"paths.final={out}/final",
             f"paths.checkpoints={out}/checkpoints", f"paths.reports={out}/reports", "guard.enabled=false",
             "tracking.enabled=false", "train.save_checkpoints=false", "train.progress=false", "train.num_threads=1")
    return label, time.perf_counter() - started


def test_scores(model_dir: Path, prepared: Path) -> dict[str, dict[str, float]]:
    """Each source's test MRR@10 and NDCG@10 (one source's prepared folder has no source column)."""
    import pandas as pd
    from sentence_transformers import SentenceTransformer

    from pairtune.data.pairs import Columns
    from pairtune.outputs.evaluation import evaluate_split

    model = SentenceTransformer(str(model_dir), device="cpu")
    test = pd.read_parquet(prepared / "test.parquet")
    parts = {name: part.drop(columns="source") for name, part in test.groupby("source", sort=False)}
    return {name: {k: v for k, v in evaluate_split(model, part, Columns(), batch_size=32).items()
                   if k in ("cosine_mrr_at_10", "cosine_ndcg_at_10")} for name, part in parts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    jobs = {f"alone-{name}": [f"data.source={path}", f"data.train_size={train}", f"data.eval_size={eval_}"]
            for name, (path, train, eval_) in SIZES.items()}
    jobs |= {"together": ["experiment=multi_source", *PLAIN], "experiment": ["experiment=multi_source"]}
    with tempfile.TemporaryDirectory(prefix="pairtune-sources-") as scratch:
        work = Path(scratch)
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            seconds = dict(pool.map(lambda item: job(work, *item), jobs.items()))
        pipeline("prepare.py", "experiment=multi_source", f"paths.prepared={work}/split", f"hydra.run.dir={work}/h")
        scores = {label: test_scores(work / label / "model", work / "split") for label in jobs}
        scores["base"] = test_scores(Path(resolve_model_source(benchkit.MODEL_ID)[0]), work / "split")
        rows = json.loads((work / "split/stats.json").read_text())["sources"]
    print("# One model on three sources vs one model per source: test split of each source\n")
    print("| source | train / test pairs | base | alone | together | experiment |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in SIZES:
        cells = [scores["base"][name], scores[f"alone-{name}"][name], scores["together"][name],
                 scores["experiment"][name]]
        print(f"| {name} | {rows[name]['rows']['train']} / {rows[name]['rows']['test']} | "
              + " | ".join(f"{c['cosine_mrr_at_10']:.4f} / {c['cosine_ndcg_at_10']:.4f}" for c in cells) + " |")
    print("\ncells: test MRR@10 / NDCG@10. training process seconds: "
          + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    if args.json:
        args.json.write_text(json.dumps({"scores": scores, "seconds": seconds}, indent=2) + "\n")


if __name__ == "__main__":
    main()
