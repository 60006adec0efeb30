"""The model card: the seed card's document, filled from the run that produced the model.

As sentence-transformers does for its own cards, the document is a Jinja2 template
(``templates/model_card.md.j2``) and this module only gathers what it shows into one :class:`CardContext` of
plain values. The same run gives the same card byte for byte: no timings, dates or machine paths go in.
Torch and sentence-transformers are never imported here, so the tracker can import :func:`logs_table` cheaply.
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any

import jinja2

from pairtune.core import CARD_METRICS, dim_metric
from pairtune.data.pairs import Columns, token_stats
from pairtune.data.tokens import count_tokens
from pairtune.files import write_text_atomic

if TYPE_CHECKING:
    import pandas as pd

    from pairtune.config import PairtuneConfig
    from pairtune.core import EpochRow, TrainResult

TEMPLATE = "model_card.md.j2"

# sentence-transformers' trainer defaults, so "Non-Default Hyperparameters" means the same as in the seed card.
TRAINER_DEFAULTS = {
    "eval_strategy": "no",
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "learning_rate": 5e-05,
    "weight_decay": 0.0,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "adam_epsilon": 1e-08,
    "max_grad_norm": 1,
    "num_train_epochs": 3,
    "max_steps": -1,
    "lr_scheduler_type": "linear",
    "warmup_steps": 0,
    "seed": 42,
    "bf16": False,
    "fp16": False,
    "dataloader_drop_last": False,
    "load_best_model_at_end": False,
    "batch_sampler": "batch_sampler",
}

# The run's similarity -> (the card's name for it, sentence-transformers' name in the loss parameters).
SIMILARITIES = {"cosine": ("Cosine Similarity", "cos_sim"), "dot": ("Dot Product", "dot_score")}

# (label on the card, distribution name); a package that is not installed is left out.
FRAMEWORKS = (
    ("pairtune", "pairtune"),
    ("Sentence Transformers", "sentence-transformers"),
    ("Transformers", "transformers"),
    ("PyTorch", "torch"),
    ("Accelerate", "accelerate"),
    ("Datasets", "datasets"),
    ("Tokenizers", "tokenizers"),
)


@dataclass
class CardContext:
    """Everything the card shows, as plain values; the template decides only how it looks."""

    base_model: str  # hub id, or a local folder's name
    dataset_name: str  # data.source, relative as configured or a file name
    model_path: str  # what the usage snippet loads: paths.model, relative or the folder's name
    dataset_size: int
    max_seq_length: int
    dimensions: int
    similarity_name: str  # "Cosine Similarity" | "Dot Product"
    architecture: str  # str(model)
    widget: list[dict[str, Any]]  # [{"source_sentence": anchor, "sentences": [positive]}], 3 of them
    usage_sentences: list[str]  # one anchor, its positive and another positive
    metrics: dict[str, float]  # the final evaluation, in CARD_METRICS order
    columns: list[str]
    token_stats: dict[str, dict[str, float]]  # column -> {"min", "mean", "max"} tokens
    samples: list[list[str]]  # the first 3 rows, one text per column
    loss_name: str
    loss_params: dict[str, Any]
    non_default_hyperparameters: dict[str, str]
    hyperparameters: dict[str, str]
    training_logs: list[str]  # the markdown table of logs_table, shared with the tracker's training_logs.md
    global_step: int
    epoch_steps: list[int]
    world_size: int
    global_batch_size: int
    guard: list[str] | None  # the final model's card: which blend the guard chose, why, and the tables
    dims: list[dict[str, float]]  # Matryoshka runs: {"dim", "mrr", "ndcg", "bytes"} per dim; empty otherwise
    truncate_dim: int | None  # export.dim on the final model: encode returns that many components
    prompts: dict[str, str]  # data.anchor_prompt / positive_prompt as the model saves them; empty for none
    padded: str | None  # why model.unpad=auto trained padded (an encoder without an unpadded forward)
    sources: list[dict[str, Any]]  # data.sources: name, where, weight, train rows, final eval MRR@10; empty for one
    objective: str  # several sources: what the headline eval metrics are
    python_version: str
    framework_versions: dict[str, str]


def numerics_mode() -> str:
    from pairtune.numerics import current

    return current()


def hyperparameters(settings: PairtuneConfig, result: TrainResult) -> dict[str, object]:
    """The run's hyperparameters under the seed card's names, then pairtune's own."""
    train, loss = settings.train, settings.loss
    return {
        "eval_strategy": "epoch",
        "per_device_train_batch_size": train.batch_size,
        "per_device_eval_batch_size": train.eval_batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "learning_rate": train.lr,
        "weight_decay": train.weight_decay,
        "adam_beta1": train.adam_beta1,
        "adam_beta2": train.adam_beta2,
        "adam_epsilon": train.adam_epsilon,
        "max_grad_norm": train.max_grad_norm,
        "num_train_epochs": train.epochs,
        "max_steps": train.max_steps,
        "lr_scheduler_type": train.scheduler,
        "warmup_steps": train.warmup_steps,
        "seed": train.seed,
        "bf16": train.mixed_precision == "bf16",
        "fp16": train.mixed_precision == "fp16",
        "dataloader_drop_last": train.drop_last,
        "load_best_model_at_end": train.select_best,
        "batch_sampler": "no_duplicates" if train.batch_sampler == "no_duplicates" else "batch_sampler",
        "world_size": result.world_size,
        "global_batch_size": result.global_batch_size,
        "mini_batch_size": loss.mini_batch_size,
        "gather_across_devices": loss.gather_across_devices,
        "numerics": numerics_mode(),  # the mode, never the CPU: the card is the same bytes on every CPU
    }


def logs_table(rows: list[EpochRow], selected_step: int | None = None) -> list[str]:
    """``Epoch | Step | Training Loss | eval metrics`` with the step-0 base row first, '-' where empty.

    One function for the card's Training Logs and the tracker's ``training_logs.md``, so the two agree.
    With ``selected_step`` (train.select_best) that row is bold and a note says so, as the trainer's cards do.
    """
    header = ["Epoch", "Step", "Training Loss", *(f"eval_{m}" for m in CARD_METRICS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(":-----:" for _ in header) + "|"]
    for row in rows:
        loss = "-" if row.training_loss is None else f"{row.training_loss:.4f}"
        cells = [f"{row.epoch:.1f}" if float(row.epoch).is_integer() else f"{row.epoch}", str(row.step), loss]
        cells += [f"{row.metrics[m]:.4f}" if m in row.metrics else "-" for m in CARD_METRICS]
        if row.step == selected_step:
            cells = [f"**{cell}**" for cell in cells]
        lines.append("| " + " | ".join(cells) + " |")
    if selected_step is not None:
        lines += ["", "* The bold row denotes the saved checkpoint."]
    return lines


def guard_lines(report) -> list[str]:
    """The final card's guard section: the choice and why, general retrieval against the base, the blends."""
    from pairtune.train.guard import GENERAL_METRICS

    general = {"base model": report.base_general, "trained model": report.trained_general, "final model": report.final.general}
    lines = [
        f"The final model is the blend (1 - a) x base + a x trained with {report.why}.",
        "",
        f"General retrieval on {report.general_set}, outside the task (`guard.max_drop` = {report.max_drop}):",
        "",
        "| model | " + " | ".join(GENERAL_METRICS) + " | change in MRR@10 |",
        "|:------|" + "|".join(":-----:" for _ in GENERAL_METRICS) + "|:-----:|",
    ]
    for label, scores in general.items():
        change = -report.drop(scores)
        lines.append(f"| {label} | " + " | ".join(f"{scores[m]:.4f}" for m in GENERAL_METRICS) + f" | {change:+.4f} |")
    lines += ["", "| a | eval cosine_mrr@10 | general cosine_mrr@10 |", "|:-:|:-----:|:-----:|"]
    for row in report.rows:
        task, scored = row.task["cosine_mrr@10"], row.general
        cells = [f"{row.a:g}", f"{task:.4f}", f"{scored['cosine_mrr@10']:.4f}" if scored else "not scored"]
        if row.a == report.chosen:
            cells = [f"**{cell}**" for cell in cells]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "* The bold row is the final model; blends are scored on the general set best eval first, "
              "until one passes (`guard.score_all=true` scores all)."]
    return lines


def card_context(
    *, model, settings: PairtuneConfig, result: TrainResult, train_frame: pd.DataFrame, columns: Columns,
    final: bool = False,
) -> CardContext:
    """Gather what the card shows from the model, the config, the run and its training split.

    ``model`` is the trained SentenceTransformer (the final one with ``final``: the guard's choice, whose
    card says which blend it is); only its tokenizer, repr and sizes are read.
    """
    if result.similarity not in SIMILARITIES:
        raise ValueError(f"unknown similarity {result.similarity!r}; expected one of {sorted(SIMILARITIES)}")
    hparams = hyperparameters(settings, result)
    metrics = result.guard.final.task if final and result.guard is not None else result.final_metrics
    return CardContext(
        base_model=_portable(settings.model.name),
        dataset_name=(", ".join(s.name for s in settings.data.sources) if settings.data.sources
                      else _portable(settings.data.source)),
        model_path=_portable(settings.paths.final if final else settings.paths.model),
        dataset_size=len(train_frame),
        max_seq_length=model.max_seq_length,
        dimensions=model.get_embedding_dimension(),
        similarity_name=SIMILARITIES[result.similarity][0],
        architecture=str(model),
        **_dataset_fields(model, train_frame, columns),
        metrics={m: metrics[m] for m in CARD_METRICS if m in metrics},
        **_loss_fields(settings, result),
        non_default_hyperparameters={
            k: str(v) for k, v in hparams.items() if k in TRAINER_DEFAULTS and TRAINER_DEFAULTS[k] != v
        },
        hyperparameters={k: str(v) for k, v in hparams.items()},
        training_logs=logs_table(result.rows, result.selected_step),
        global_step=result.global_step,
        epoch_steps=list(result.epoch_steps),
        world_size=result.world_size,
        global_batch_size=result.global_batch_size,
        guard=guard_lines(result.guard) if final and result.guard is not None else None,
        dims=dims_rows(settings, metrics),
        truncate_dim=model.truncate_dim if final else None,
        prompts=columns.model_prompts,
        padded=result.padded,
        sources=sources_rows(settings, train_frame, metrics),
        objective={"mean": "the mean over the sources", "all": "those of all sources' rows pooled"}.get(
            settings.data.objective, f"those of the source {settings.data.objective}"),
        python_version=platform.python_version(),
        framework_versions=_framework_versions(),
    )


def sources_rows(settings: PairtuneConfig, train_frame: pd.DataFrame, metrics: dict[str, float]) -> list[dict]:
    """The card's sources table: each source with its training rows, weight and final eval MRR@10 and NDCG@10."""
    rows = []
    for source in settings.data.sources or []:
        train_rows = int((train_frame["source"] == source.name).sum()) if "source" in train_frame else 0
        rows.append({"name": source.name, "source": _portable(source.source), "weight": source.weight,
                     "rows": train_rows, "mrr": metrics.get(f"{source.name}/cosine_mrr@10"),
                     "ndcg": metrics.get(f"{source.name}/cosine_ndcg@10")})
    return rows


def dims_rows(settings: PairtuneConfig, metrics: dict[str, float]) -> list[dict[str, float]]:
    """The card's per-dim table: MRR@10 and NDCG@10 of the final evaluation at each Matryoshka dim."""
    rows = []
    for dim in settings.loss.matryoshka_dims or []:
        mrr, ndcg = (metrics.get(dim_metric(name, dim)) for name in ("cosine_mrr@10", "cosine_ndcg@10"))
        if mrr is not None and ndcg is not None:
            rows.append({"dim": dim, "mrr": mrr, "ndcg": ndcg, "bytes": dim * 4})
    return rows


def render_model_card(context: CardContext) -> str:
    """The card's markdown: the package's template filled from ``context`` alone."""
    return _environment().get_template(TEMPLATE).render(asdict(context))


def write_model_card(path: str | Path, **kwargs) -> None:
    """Render the card for a run (``card_context``'s keywords) and write it whole: a reader never sees half."""
    write_text_atomic(path, render_model_card(card_context(**kwargs)))


def _dataset_fields(model, train_frame: pd.DataFrame, columns: Columns) -> dict[str, Any]:
    """The widget, usage example, token statistics and sample rows, all from the first rows of the split."""
    head = train_frame.head(3)
    anchors, positives = train_frame[columns.anchor].tolist(), train_frame[columns.positive].tolist()
    return {
        "widget": [
            {"source_sentence": anchor, "sentences": [positive]}
            for anchor, positive in zip(head[columns.anchor], head[columns.positive], strict=True)
        ],
        "usage_sentences": [anchors[0], *positives[:2]],
        "columns": columns.names,
        "token_stats": token_stats(train_frame, columns, lambda texts: count_tokens(model.tokenizer, texts)),
        "samples": [[str(row[c]) for c in columns.names] for _, row in head.iterrows()],
    }


def _loss_fields(settings: PairtuneConfig, result: TrainResult) -> dict[str, Any]:
    """The loss as sentence-transformers names it, with its parameters; cached MNRL when mini-batches are set."""
    loss = settings.loss
    params: dict[str, Any] = {
        "scale": loss.scale,
        "similarity_fct": SIMILARITIES[result.similarity][1],
        "gather_across_devices": loss.gather_across_devices,
    }
    if loss.mini_batch_size is not None:
        params["mini_batch_size"] = loss.mini_batch_size
    kind = "MultipleNegativesSymmetricRankingLoss" if loss.symmetric else "MultipleNegativesRankingLoss"
    name = f"Cached{kind}" if loss.mini_batch_size else kind
    matryoshka = loss.matryoshka()
    if matryoshka is not None:  # as sentence-transformers' card names a wrapped loss
        dims, weights = matryoshka
        params = {"loss": name, "loss_params": params, "matryoshka_dims": list(dims),
                  "matryoshka_weights": list(weights), "n_dims_per_step": -1}
        name = "MatryoshkaLoss"
    return {"loss_name": name, "loss_params": params}


def _framework_versions() -> dict[str, str]:
    found = {}
    for label, package in FRAMEWORKS:
        try:
            found[label] = version(package)
        except PackageNotFoundError:
            continue
    return found


def _portable(location: str) -> str:
    """A location as the card may print it: relative ones as configured, absolute ones by their last part.

    An absolute path names one machine's disk; printing it would make the same run's card differ per machine.
    """
    path = PurePath(location)
    return path.name if path.is_absolute() or location.startswith("~") else location


def _yaml_quote(text: str) -> str:
    """A YAML scalar for the front matter that reads back as ``text``.

    Single-quoted as in the seed card; double-quoted with escapes when the text holds a line break or another
    unprintable character, which single quotes would fold away or YAML would refuse.
    """
    if text.isprintable():
        return "'" + text.replace("'", "''") + "'"
    return '"' + "".join(_yaml_escape(char) for char in text) + '"'


def _yaml_escape(char: str) -> str:
    if char in '\\"':
        return "\\" + char
    if char.isprintable():
        return char
    return f"\\u{ord(char):04x}" if ord(char) < 0x10000 else f"\\U{ord(char):08x}"


def _markdown_cell(text: str) -> str:
    """A table cell that a '|' inside the text cannot split."""
    return "<code>" + text.replace("|", "\\|") + "</code>"


def _to_json(value: Any, indent: int = 4) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=False)


@cache
def _environment() -> jinja2.Environment:
    """The template environment: markdown, so no autoescape; undefined names fail instead of printing nothing."""
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("pairtune.outputs", "templates"),
        autoescape=False,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )
    environment.filters.update(yaml_quote=_yaml_quote, md_cell=_markdown_cell, to_json=_to_json)
    return environment
