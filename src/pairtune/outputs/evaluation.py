"""Retrieval evaluation: each note is a query, each sentence of the split a document."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pandas as pd
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

from pairtune.config import PairtuneConfig
from pairtune.core import CARD_METRICS, DIM_METRICS, PRIMARY_METRIC, dim_metric, metric_key
from pairtune.data.pairs import Columns, load_prepared, pairs_digest, read_pairs
from pairtune.data.sources import SOURCE_COLUMN
from pairtune.files import write_json_atomic


def cap_rows(frame: pd.DataFrame, max_rows: int | None, *, seed: int) -> pd.DataFrame:
    """At most ``max_rows`` rows, a seeded sample in the split's own order (all rows when it is smaller)."""
    if max_rows is None or len(frame) <= max_rows:
        return frame
    return frame.sample(n=max_rows, random_state=seed).sort_index().reset_index(drop=True)


def build_evaluator(frame: pd.DataFrame, columns: Columns, *, name: str, batch_size: int = 32,
                    truncate_dim: int | None = None, prompts: tuple[str, str] | None = None):
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
        truncate_dim=truncate_dim,
        query_prompt=prompts[0] if prompts else None,  # explicit: a source's own, or "" for texts already prompted
        corpus_prompt=prompts[1] if prompts else None,
    )


class DimsEvaluator:
    """The retrieval metrics at full size, and DIM_METRICS at each Matryoshka dim (``cosine_mrr@10_dim128``).

    Each dim scores the first ``dim`` components of every embedding (cosine renormalises them), as an index
    built from truncated vectors would.
    """

    def __init__(self, full, by_dim: dict) -> None:
        self.full, self.by_dim, self.name = full, by_dim, full.name

    def __call__(self, model: SentenceTransformer) -> dict[str, float]:
        once = EncodeOnce(model)  # every dim slices the same full-width embeddings: one forward per text
        metrics = run_evaluator(self.full, once)
        for dim, evaluator in self.by_dim.items():
            scored = run_evaluator(evaluator, once)
            metrics |= {dim_metric(name, dim): scored[name] for name in DIM_METRICS}
        return metrics


class EncodeOnce:
    """A model whose ``encode_query`` / ``encode_document`` run once per text list and slice per ``truncate_dim``.

    Slicing is what sentence-transformers' truncation does after the forward, so the figures are the same as
    encoding again at each dim; everything else is the model's own.
    """

    def __init__(self, model: SentenceTransformer) -> None:
        self._model, self._memo = model, {}

    def __getattr__(self, name: str):
        return getattr(self._model, name)

    def _encode(self, kind: str, inputs, *, truncate_dim: int | None = None, **kwargs):
        key = (kind, tuple(inputs), tuple(sorted((k, str(v)) for k, v in kwargs.items())))
        if key not in self._memo:
            model, saved = self._model, self._model.truncate_dim
            model.truncate_dim = None  # the full width; the model's own truncate_dim applies below, as in encode
            try:
                self._memo[key] = getattr(model, kind)(inputs, truncate_dim=None, **kwargs)
            finally:
                model.truncate_dim = saved
        width = truncate_dim if truncate_dim is not None else self._model.truncate_dim
        return self._memo[key][..., :width] if width else self._memo[key]

    def encode_query(self, inputs, **kwargs):
        return self._encode("encode_query", inputs, **kwargs)

    def encode_document(self, inputs, **kwargs):
        return self._encode("encode_document", inputs, **kwargs)


def build_dims_evaluator(frame: pd.DataFrame, columns: Columns, *, name: str, batch_size: int = 32,
                         dims: tuple[int, ...] | None = None, prompts: tuple[str, str] | None = None):
    """:func:`build_evaluator`, scoring each of ``dims`` as well when Matryoshka dims are set."""
    full = build_evaluator(frame, columns, name=name, batch_size=batch_size, prompts=prompts)
    if not dims:
        return full
    by_dim = {dim: build_evaluator(frame, columns, name=name, batch_size=batch_size, truncate_dim=dim, prompts=prompts)
              for dim in dims}
    return DimsEvaluator(full, by_dim)


class SourcesEvaluator:
    """Several sources: each scored on its own rows (``harbour/cosine_mrr@10``), all rows pooled
    (``all/cosine_mrr@10``), and the headline metrics the ``objective``: the mean over sources, ``all`` or one
    source's (``data.objective``)."""

    def __init__(self, by_source: dict, pooled, objective: str) -> None:
        self.by_source, self.pooled, self.objective, self.name = by_source, pooled, objective, pooled.name

    def __call__(self, model: SentenceTransformer) -> dict[str, float]:
        scored = {name: run_evaluator(evaluator, model) for name, evaluator in self.by_source.items()}
        scored["all"] = run_evaluator(self.pooled, model)
        if self.objective == "mean":
            headline = {k: sum(m[k] for n, m in scored.items() if n != "all") / len(self.by_source)
                        for k in scored["all"]}
        else:
            headline = dict(scored[self.objective])
        return headline | {f"{name}/{k}": v for name, metrics in scored.items() for k, v in metrics.items()}


def build_split_evaluator(frame: pd.DataFrame, columns: Columns, *, name: str, batch_size: int = 32,
                          dims: tuple[int, ...] | None = None, objective: str = "mean"):
    """The evaluator of one split: per source and pooled when the split has several sources, else one."""
    if SOURCE_COLUMN not in frame:
        return build_dims_evaluator(frame, columns, name=name, batch_size=batch_size, dims=dims)
    own = columns.source_prompts is not None  # sources with prompts of their own: each scored with its own
    by_source = {
        source: build_dims_evaluator(part.reset_index(drop=True), columns, name=name, batch_size=batch_size, dims=dims,
                                     prompts=columns.prompts_of(source) if own else None)
        for source, part in frame.groupby(SOURCE_COLUMN, sort=False)
    }
    if own:  # pooled: every text with its own source's prompt in front, none added
        frame = frame.assign(**dict(zip(columns.names, columns.prompted(frame), strict=True)))
    pooled = build_dims_evaluator(frame, columns, name=name, batch_size=batch_size, dims=dims,
                                  prompts=("", "") if own else None)
    return SourcesEvaluator(by_source, pooled, objective)


def run_evaluator(evaluator, model: SentenceTransformer) -> dict[str, float]:
    """Metrics without the evaluator's name prefix: ``{"cosine_mrr@10": 0.61, ...}``."""
    raw = evaluator(model)
    if isinstance(evaluator, DimsEvaluator | SourcesEvaluator):
        return raw
    prefix = f"{evaluator.name}_" if evaluator.name else ""
    return {key.removeprefix(prefix): float(value) for key, value in raw.items()}


def evaluate_split(model, frame: pd.DataFrame, columns: Columns, *, batch_size: int,
                   dims: list[int] | None = None, objective: str = "mean") -> dict[str, float]:
    """The card's metrics on one split (and DIM_METRICS at each of ``dims``), under names MLflow and DVC accept,
    rounded for stable reports. A model saved with ``truncate_dim`` (export.dim) is scored as it serves."""
    evaluator = build_split_evaluator(frame, columns, name="test", batch_size=batch_size, dims=tuple(dims or ()),
                                      objective=objective)
    metrics = run_evaluator(evaluator, model)
    names = [*CARD_METRICS, *(dim_metric(m, d) for d in dims or () for m in DIM_METRICS)]
    names += [f"{scope}/{m}" for scope in sources_of(frame) for m in names]  # several sources: each, and all
    return {metric_key(m): round(metrics[m], 6) for m in names}


def sources_of(frame: pd.DataFrame) -> list[str]:
    """The sources of a split with several (in order of first row), then ``all``; none for one source."""
    return [*dict.fromkeys(frame[SOURCE_COLUMN]), "all"] if SOURCE_COLUMN in frame else []


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
    from pairtune.model.modeling import load_model

    columns = Columns.of(settings.data)
    splits = load_prepared(settings.paths.prepared)
    promotion, described = promotion_set(settings, splits)  # a missing named set fails before any model loads
    report, batch, models = {}, settings.train.eval_batch_size, {}
    dims = settings.loss.matryoshka_dims
    for label, name in (("base", settings.model.name), ("final", settings.paths.final)):
        models[label] = load_model(name, max_seq_length=settings.model.max_seq_length,
                                   trust_remote_code=settings.model.trust_remote_code)
        scored_with = columns if label == "final" else columns.without_prompts()  # the base as shipped
        report[label] = evaluate_split(models[label], splits["test"], scored_with, batch_size=batch, dims=dims,
                                       objective=settings.data.objective)
    report["test_rows"] = len(splits["test"])
    if models["final"].truncate_dim:  # export.dim: the final row is the served, truncated model
        report["final_truncate_dim"] = models["final"].truncate_dim
    pair_columns = replace(columns, negative=None)  # promotion scores anchors against positives only
    scored = evaluate_split(models["final"], promotion, pair_columns, batch_size=batch, objective=settings.data.objective)
    report["promotion"] = {"data": described, "sha256": pairs_digest(promotion, columns), **scored}
    general = general_change(settings, models)
    if general is not None:
        report["general"] = general
    write_json_atomic(Path(settings.paths.reports) / "metrics.json", report)
    return report


def general_change(settings: PairtuneConfig, models: dict) -> dict | None:
    """The general-retrieval MRR@10 of the base and the final model and the change (cached: the guard scored them)."""
    from pairtune.train.guard import GeneralScorer, load_general_set

    general = load_general_set(settings) if settings.guard.enabled else None
    if general is None:
        return None
    scorer = GeneralScorer(general, batch_size=settings.general.batch_size, cache=settings.paths.general_cache)
    base, final = (scorer(models[label])[PRIMARY_METRIC] for label in ("base", "final"))
    return {"data": general.label, "base_cosine_mrr_at_10": base, "final_cosine_mrr_at_10": final,
            "change_cosine_mrr_at_10": round(final - base, 6), "max_drop": settings.guard.max_drop}
