"""The pipeline's stages as plain functions over typed settings; ``pipelines/*.py`` only wrap them."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pairtune.batching import count_tokens
from pairtune.config import PairtuneConfig
from pairtune.data import (
    Columns,
    PairDataError,
    check_disjoint,
    drop_duplicate_pairs,
    load_prepared,
    read_pairs,
    split_pairs,
    token_stats,
    write_prepared,
)
from pairtune.evaluation import CARD_METRICS, build_evaluator, metric_key, run_evaluator

log = logging.getLogger(__name__)


def columns_of(settings: PairtuneConfig) -> Columns:
    data = settings.data
    return Columns(data.anchor_column, data.positive_column, data.negative_column)


def load_tokenizer(settings: PairtuneConfig):
    from transformers import AutoTokenizer

    from pairtune.modeling import resolve_model_source

    source, _ = resolve_model_source(settings.model.name)
    return AutoTokenizer.from_pretrained(source, trust_remote_code=settings.model.trust_remote_code)


def run_prepare(settings: PairtuneConfig) -> dict:
    """Read, validate, de-duplicate and split the pairs file; write parquet splits and stats.json."""
    data, columns = settings.data, columns_of(settings)
    frame = read_pairs(data.source, columns, fmt=data.format, delimiter=data.csv_delimiter)
    frame, dropped = drop_duplicate_pairs(frame)
    log.info("read %d pairs from %s, dropped %d exact duplicate pairs", len(frame) + dropped, data.source, dropped)
    splits = split_pairs(
        frame, columns, train_size=data.train_size, eval_size=data.eval_size, seed=data.split_seed, source=data.source
    )
    check_disjoint(splits, columns)
    if len(splits["train"]) < settings.train.batch_size:
        raise PairDataError(
            f"{data.source}: {len(splits['train'])} training pairs, fewer than one batch (train.batch_size="
            f"{settings.train.batch_size})"
        )
    tokenizer = load_tokenizer(settings)
    texts = [text for c in columns.names for text in frame[c].tolist()]
    tokens_of = dict(zip(texts, count_tokens(tokenizer, texts), strict=True))  # each text tokenised once
    limit = settings.model.max_seq_length
    too_long = sum(int(tokens_of[text] > limit) for text in texts)
    if too_long:
        log.warning("%d texts are longer than model.max_seq_length=%d tokens and will be truncated", too_long, limit)
    stats = {
        "source": data.source,
        "rows": {name: len(split) for name, split in splits.items()},
        "dropped_duplicates": dropped,
        "texts_over_max_seq_length": too_long,
        "tokens": {
            name: token_stats(split, columns, lambda batch: [tokens_of[t] for t in batch])
            for name, split in splits.items()
        },
    }
    write_prepared(settings.paths.prepared, splits, stats)
    log.info("wrote %s: %s", settings.paths.prepared, stats["rows"])
    return stats


def evaluate_split(model, frame, columns: Columns, *, batch_size: int) -> dict[str, float]:
    evaluator = build_evaluator(frame, columns, name="test", batch_size=batch_size)
    metrics = run_evaluator(evaluator, model)
    return {metric_key(m): round(metrics[m], 6) for m in CARD_METRICS}


def run_evaluate(settings: PairtuneConfig) -> dict:
    """Test-split metrics of the base model and the trained model, side by side, to reports/metrics.json."""
    from pairtune.modeling import load_model

    columns = columns_of(settings)
    test = load_prepared(settings.paths.prepared)["test"]
    report = {}
    for label, name in (("base", settings.model.name), ("trained", settings.paths.model)):
        model = load_model(name, max_seq_length=settings.model.max_seq_length,
                           trust_remote_code=settings.model.trust_remote_code)
        report[label] = evaluate_split(model, test, columns, batch_size=settings.train.eval_batch_size)
    report["test_rows"] = len(test)
    write_json_atomic(Path(settings.paths.reports) / "metrics.json", report)
    return report


def run_export(settings: PairtuneConfig) -> dict:
    """ONNX fp32 + int8 export of the trained model, parity and speed on the test split, to reports/export.json.

    Fails (after writing the report) when any test sentence falls under the configured cosine floors.
    """
    from pairtune.export import export_onnx, measure_parity

    columns = columns_of(settings)
    splits = load_prepared(settings.paths.prepared)
    calibration = splits["train"][columns.anchor].tolist() + splits["train"][columns.positive].tolist()
    files = export_onnx(settings.paths.model, settings.paths.onnx, opset=settings.export.opset,
                        calibration_sentences=calibration)
    test = splits["test"]
    sentences = test[columns.anchor].tolist() + test[columns.positive].tolist()
    parity = measure_parity(settings.paths.model, settings.paths.onnx, sentences, batch_size=settings.export.batch_size)
    floors = {"fp32": settings.export.min_cosine_fp32, "int8": settings.export.min_cosine_int8}
    parity["passed"] = {v: parity["cosine"][v]["min"] >= floor for v, floor in floors.items()}
    report = {"size_mb": files["size_mb"], **parity}
    write_json_atomic(Path(settings.paths.reports) / "export.json", report)
    failed = [v for v, ok in parity["passed"].items() if not ok]
    if failed:
        raise ExportParityError(f"{settings.paths.onnx}: {failed[0]} cosine {parity['cosine'][failed[0]]['min']:.5f} "
                                f"below export.min_cosine_{failed[0]}={floors[failed[0]]}")
    return report


class ExportParityError(RuntimeError):
    """An exported variant drifted from the PyTorch embeddings beyond the configured floor."""


def flat_export_metrics(report: dict) -> dict[str, float]:
    metrics = {f"export_cosine_min_{v}": c["min"] for v, c in report["cosine"].items()}
    metrics |= {f"export_speedup_{k}": v for k, v in report["speedup_vs_torch"].items()}
    metrics |= {f"export_throughput_{k}": v for k, v in report["throughput"].items()}
    return metrics


def write_training_plots(result, reports: Path) -> None:
    """CSV series for ``dvc plots``: the loss per step and the eval metrics per evaluation."""
    folder = reports / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    loss_rows = ["step,train_loss", *(f"{i},{v:.6f}" for i, v in enumerate(result.step_losses, start=1))]
    write_text_atomic(folder / "train_loss.csv", "\n".join(loss_rows) + "\n")
    keys = [metric_key(m) for m in CARD_METRICS]
    eval_rows = ["step,epoch," + ",".join(f"eval_{k}" for k in keys)]
    for row in result.rows:
        eval_rows.append(f"{row.step},{row.epoch}," + ",".join(f"{row.metrics[m]:.6f}" for m in CARD_METRICS))
    write_text_atomic(folder / "eval_metrics.csv", "\n".join(eval_rows) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(text, encoding="utf-8")
    staging.replace(path)


def write_json_atomic(path: Path, payload: dict) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")
