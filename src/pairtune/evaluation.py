"""Retrieval evaluation: each note is a query, each sentence of the split a document."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

from pairtune.config import PairtuneConfig
from pairtune.core import CARD_METRICS, PRIMARY_METRIC, metric_key
from pairtune.data import Columns, load_prepared, pairs_digest, read_pairs
from pairtune.files import write_json_atomic


def cap_rows(frame: pd.DataFrame, max_rows: int | None, *, seed: int) -> pd.DataFrame:
    """At most ``max_rows`` rows, a seeded sample in the split's own order (all rows when it is smaller)."""
    if max_rows is None or len(frame) <= max_rows:
        return frame
    return frame.sample(n=max_rows, random_state=seed).sort_index().reset_index(drop=True)


def build_evaluator(frame: pd.DataFrame, columns: Columns, *, name: str, batch_size: int = 32):
    """An InformationRetrievalEvaluator over one split; a note with several sentences has them all relevant."""
    query_ids = {text: f"q{i}" for i, text in enumerate(dict.fromkeys(frame[columns.anchor]))}
    doc_ids = {text: f"d{i}" for i, text in enumerate(dict.fromkeys(frame[columns.positive]))}
    relevant: dict[str, set[str]] = {}
    for note, sentence in zip(frame[columns.anchor], frame[columns.positive], strict=True):
        relevant.setdefault(query_ids[note], set()).add(doc_ids[sentence])
    return InformationRetrievalEvaluator(
        queries={qid: text for text, qid in query_ids.items()},
        corpus={did: text for text, did in doc_ids.items()},
        relevant_docs=relevant,
        name=name,
        batch_size=batch_size,
        write_csv=False,
        score_functions=None,
        main_score_function="cosine",
    )


def run_evaluator(evaluator, model: SentenceTransformer) -> dict[str, float]:
    """Metrics without the evaluator's name prefix: ``{"cosine_mrr@10": 0.61, ...}``."""
    raw = evaluator(model)
    prefix = f"{evaluator.name}_" if evaluator.name else ""
    return {key.removeprefix(prefix): float(value) for key, value in raw.items()}


def evaluate_split(model, frame: pd.DataFrame, columns: Columns, *, batch_size: int) -> dict[str, float]:
    """The card's metrics on one split, under names MLflow and DVC accept, rounded for stable reports."""
    metrics = run_evaluator(build_evaluator(frame, columns, name="test", batch_size=batch_size), model)
    return {metric_key(m): round(metrics[m], 6) for m in CARD_METRICS}


def promotion_set(settings: PairtuneConfig, splits: dict[str, pd.DataFrame]) -> tuple[pd.DataFrame, str]:
    """The pairs promotion is decided on, and their name: ``promotion.source``, else the eval split."""
    columns = Columns.of(settings.data)
    source = settings.promotion.source
    if source is None:
        return splits["eval"], f"the eval split ({len(splits['eval'])} pairs)"
    frame = read_pairs(source, Columns(columns.anchor, columns.positive))
    return frame, f"{source} ({len(frame)} pairs)"


def run_evaluate(settings: PairtuneConfig) -> dict:
    """Test-split metrics of the base and the final model, the promotion figure and the general-retrieval change.

    The test split is the held-out result; champion/challenger is decided on the promotion set (the eval
    split unless ``promotion.source`` names a fixed one), never on test, and only for a final model whose
    general MRR@10 stays within ``guard.max_drop`` of the base's. Written to reports/metrics.json.
    """
    from pairtune.modeling import load_model

    columns = Columns.of(settings.data)
    splits = load_prepared(settings.paths.prepared)
    promotion, described = promotion_set(settings, splits)  # a missing named set fails before any model loads
    report, batch, models = {}, settings.train.eval_batch_size, {}
    for label, name in (("base", settings.model.name), ("final", settings.paths.final)):
        models[label] = load_model(name, max_seq_length=settings.model.max_seq_length,
                                   trust_remote_code=settings.model.trust_remote_code)
        report[label] = evaluate_split(models[label], splits["test"], columns, batch_size=batch)
    report["test_rows"] = len(splits["test"])
    scored = evaluate_split(models["final"], promotion, Columns(columns.anchor, columns.positive), batch_size=batch)
    report["promotion"] = {"data": described, "sha256": pairs_digest(promotion, columns), **scored}
    general = general_change(settings, models)
    if general is not None:
        report["general"] = general
    write_json_atomic(Path(settings.paths.reports) / "metrics.json", report)
    return report


def general_change(settings: PairtuneConfig, models: dict) -> dict | None:
    """The general-retrieval MRR@10 of the base and the final model and the change (cached: the guard scored them)."""
    from pairtune.guard import GeneralScorer, load_general_set

    general = load_general_set(settings) if settings.guard.enabled else None
    if general is None:
        return None
    scorer = GeneralScorer(general, batch_size=settings.general.batch_size, cache=settings.paths.general_cache)
    base, final = (scorer(models[label])[PRIMARY_METRIC] for label in ("base", "final"))
    return {"data": general.label, "base_cosine_mrr_at_10": base, "final_cosine_mrr_at_10": final,
            "change_cosine_mrr_at_10": round(final - base, 6), "max_drop": settings.guard.max_drop}
