"""Never worse than the base model: a general-retrieval guard, and the final model as a blend chosen on it.

Fine-tuning makes a model better at its task and often worse at everything else. The guard scores a
(query, passage) set outside the task's domain (``general.*``; pairtune ships an original one of everyday and
technical search queries over a pool with near-miss passages) for the base model and the trained one, then
picks the final model among the weight blends ``(1 - a) * base + a * trained`` (WiSE-FT) for ``a`` in
``guard.grid``: the best task eval MRR@10 among those whose general MRR@10 is within ``guard.max_drop`` of the
base's. That is the trained model itself (``a = 1``) when it passes and scores best; the base (``a = 0``)
passes by definition, so there is always a final model.

A general evaluation encodes every query and passage (about 1,100 texts for the shipped set): it is the
guard's cost. So the scores of a model are cached on disk under ``paths.general_cache``, keyed by the sha256
of its weights and of the set (the base model is scored once per machine), and blends are scored on the
general set lazily, best task score first, until one passes (``guard.score_all`` scores every one).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pairtune.core import PRIMARY_METRIC
from pairtune.data.pairs import Columns, PairSource, read_pairs, read_source
from pairtune.files import write_json_atomic

if TYPE_CHECKING:
    from pairtune.config import PairtuneConfig

log = logging.getLogger(__name__)

#: What the card and MLflow show of a general evaluation (the evaluator's names).
GENERAL_METRICS = ("cosine_mrr@10", "cosine_ndcg@10", "cosine_accuracy@1", "cosine_accuracy@10")

Weights = dict[str, torch.Tensor]


@dataclass
class GeneralSet:
    """The general-retrieval set: each query's relevant passage, plus passages no query is about."""

    queries: list[str]
    passages: list[str]  # each query's own, in query order
    extra: list[str]  # near misses: in the corpus, relevant to no query
    label: str

    @property
    def digest(self) -> str:
        blob = json.dumps([self.queries, self.passages, self.extra], ensure_ascii=False).encode("utf-8")
        return hashlib.sha256(blob).hexdigest()

    def evaluator(self, batch_size: int):
        """sentence-transformers' InformationRetrievalEvaluator over every query and the whole pool."""
        from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

        pool = list(dict.fromkeys(self.passages + self.extra))
        doc_id = {text: f"d{i}" for i, text in enumerate(pool)}
        return InformationRetrievalEvaluator(
            queries={f"q{i}": query for i, query in enumerate(self.queries)},
            corpus={did: text for text, did in doc_id.items()},
            relevant_docs={f"q{i}": {doc_id[p]} for i, p in enumerate(self.passages)},
            name="general", batch_size=batch_size, write_csv=False, score_functions=None,
            main_score_function="cosine",
        )


def load_general_set(settings: PairtuneConfig) -> GeneralSet | None:
    """``general.source`` (any form ``data.source`` takes) plus ``general.corpus``; None when it is off."""
    from pairtune.config import DataConfig

    general = settings.general
    if general.source is None:
        return None
    columns = Columns(general.query_column, general.passage_column)
    data = DataConfig(source=general.source, revision=general.revision, subset=general.subset,
                      split=general.split, anchor_column=general.query_column,
                      positive_column=general.passage_column)
    frame, _ = read_source(PairSource.of(data), columns)
    extra = [] if general.corpus is None else read_pairs(general.corpus, Columns(general.passage_column, ""))[
        general.passage_column].tolist()
    passages = frame[columns.positive].tolist()
    label = f"{general.source} ({len(frame)} queries, {len(set(passages) | set(extra))} passages)"
    return GeneralSet(frame[columns.anchor].tolist(), passages, extra, label)


def weights_digest(weights: Weights) -> str:
    """sha256 over a state dict's names and bytes: equal weights, equal digest."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        tensor = weights[name].detach().to("cpu").contiguous()
        digest.update(name.encode() + str(tensor.dtype).encode() + str(tuple(tensor.shape)).encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


class GeneralScorer:
    """Scores a model on the general set, cached on disk by (weights, set, max length, prompts when set)."""

    def __init__(self, general: GeneralSet, *, batch_size: int, cache: str | Path | None) -> None:
        self.general, self.evaluator = general, general.evaluator(batch_size)
        self.cache = Path(cache) if cache else None

    def __call__(self, model) -> dict[str, float]:
        prompts = {name: text for name, text in model.prompts.items() if text}  # encode_query/document apply them
        identity = f"{weights_digest(model.state_dict())} {self.general.digest} {model.max_seq_length}"
        if prompts:
            identity += " " + json.dumps(prompts, sort_keys=True)
        key = hashlib.sha256(identity.encode()).hexdigest()[:32]
        path = self.cache / f"{key}.json" if self.cache else None
        if path is not None and path.is_file():
            return json.loads(path.read_text())
        was_training = model.training
        model.eval()
        raw = self.evaluator(model)
        model.train(was_training)
        scores = {k.removeprefix("general_"): round(float(v), 6) for k, v in raw.items()
                  if k.removeprefix("general_") in GENERAL_METRICS}
        if path is not None:
            write_json_atomic(path, scores)
        return scores


def blend(base: Weights, trained: Weights, a: float) -> Weights:
    """``(1 - a) * base + a * trained`` for floating tensors; the rest (integer buffers) as trained."""
    return {
        name: torch.lerp(base[name], value, a) if value.is_floating_point() else value
        for name, value in trained.items()
    }


@dataclass
class BlendRow:
    a: float
    task: dict[str, float]  # eval split metrics
    general: dict[str, float] | None = None  # None: not scored (a better-scoring blend passed first)


@dataclass
class GuardReport:
    """What the guard found and chose; written to ``reports/guard.json`` and shown on the final card."""

    general_set: str
    max_drop: float
    base_general: dict[str, float]
    trained_general: dict[str, float]
    rows: list[BlendRow] = field(default_factory=list)
    chosen: float = 1.0
    why: str = ""

    @property
    def final(self) -> BlendRow:
        return next(row for row in self.rows if row.a == self.chosen)

    def drop(self, general: dict[str, float]) -> float:
        return round(self.base_general[PRIMARY_METRIC] - general[PRIMARY_METRIC], 6)

    def as_dict(self) -> dict[str, Any]:
        final = self.final
        return {
            "general_set": self.general_set,
            "max_drop": self.max_drop,
            "chosen_a": self.chosen,
            "why": self.why,
            "general": {"base": self.base_general, "trained": self.trained_general, "final": final.general},
            "eval_final": final.task,
            "blends": [{"a": r.a, "eval": r.task, "general": r.general} for r in self.rows],
        }


def choose_blend(
    model, base: Weights, trained: Weights, *, grid: list[float], max_drop: float, score_all: bool,
    task: Callable[[Any], dict[str, float]], general: GeneralScorer,
) -> GuardReport:
    """Score each blend on the task's eval split, then choose the final one as the module docstring says.

    ``model`` holds ``trained`` on entry and the chosen blend on return.
    """
    base_general = base_scores(model, base, general)
    model.load_state_dict(trained)
    report = GuardReport(general.general.label, max_drop, base_general, general(model))
    for a in sorted(set(grid) | {0.0, 1.0}, reverse=True):
        model.load_state_dict(blend(base, trained, a))
        known = {1.0: report.trained_general, 0.0: base_general}.get(a)  # both already scored
        report.rows.append(BlendRow(a, task(model), known))
    ranked = sorted(report.rows, key=lambda r: (-r.task[PRIMARY_METRIC], -r.a))  # ties: closer to trained
    for row in report.rows if score_all else ranked:
        if row.general is None:
            model.load_state_dict(blend(base, trained, row.a))
            row.general = general(model)
        if not score_all and report.drop(row.general) <= max_drop:
            break  # the best passing blend by task score: the rest need no general score
    passing = [r for r in ranked if r.general is not None and report.drop(r.general) <= max_drop]
    chosen = passing[0]  # a = 0 always passes: the base model is its own reference
    report.chosen, report.why = chosen.a, explain(report, chosen, ranked[0])
    model.load_state_dict(blend(base, trained, chosen.a))
    return report


def base_scores(model, base: Weights, general: GeneralScorer) -> dict[str, float]:
    model.load_state_dict(base)
    return general(model)


def explain(report: GuardReport, chosen: BlendRow, best_task: BlendRow) -> str:
    """One sentence: which blend is the final model, and why."""
    drop, task = report.drop(chosen.general), chosen.task[PRIMARY_METRIC]
    if chosen.a == 1.0:
        return (f"a = 1 (the trained model): the best eval MRR@10 ({task:.4f}) and its general MRR@10 is within "
                f"{report.max_drop} of the base's (change {-drop:+.4f})")
    if chosen is best_task:
        return (f"a = {chosen.a:g}: the best eval MRR@10 of every blend ({task:.4f}), and its general MRR@10 is "
                f"within {report.max_drop} of the base's (change {-drop:+.4f})")
    lost = report.drop(best_task.general) if best_task.general else None
    lost_text = f"general MRR@10 {-lost:+.4f}" if lost is not None else "a larger general drop"
    return (f"a = {chosen.a:g}: the best eval MRR@10 ({task:.4f}) among blends whose general MRR@10 stays within "
            f"{report.max_drop} of the base's (change {-drop:+.4f}); a = {best_task.a:g} scored "
            f"{best_task.task[PRIMARY_METRIC]:.4f} on eval but {lost_text}")
