"""Retrieval evaluation: each note is a query, each sentence of the split a document."""

from __future__ import annotations

import pandas as pd
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

from pairtune.data import Columns

#: The card's and the tracker's headline metric.
PRIMARY_METRIC = "cosine_mrr@10"
CARD_METRICS = (
    "cosine_accuracy@1",
    "cosine_accuracy@3",
    "cosine_accuracy@5",
    "cosine_accuracy@10",
    "cosine_mrr@10",
    "cosine_ndcg@10",
    "cosine_map@100",
)


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


def metric_key(name: str) -> str:
    """A metric name MLflow and DVC accept: ``cosine_ndcg@10`` -> ``cosine_ndcg_at_10``."""
    return name.replace("@", "_at_")
