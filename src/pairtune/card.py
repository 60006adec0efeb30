"""The model card: the seed card's document, filled from the run that produced the model."""

from __future__ import annotations

import json
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from pairtune.batching import count_tokens
from pairtune.data import Columns, token_stats
from pairtune.evaluation import CARD_METRICS

if TYPE_CHECKING:
    from pairtune.config import PairtuneConfig
    from pairtune.training import EpochRow, TrainResult

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
    "batch_sampler": "batch_sampler",
}


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
        "batch_sampler": "no_duplicates" if train.batch_sampler == "no_duplicates" else "batch_sampler",
        "world_size": result.world_size,
        "global_batch_size": result.global_batch_size,
        "mini_batch_size": loss.mini_batch_size,
        "gather_across_devices": loss.gather_across_devices,
    }


def _framework_versions() -> list[str]:
    lines = [f"- Python: {platform.python_version()}"]
    for label, package in [
        ("pairtune", "pairtune"),
        ("Sentence Transformers", "sentence-transformers"),
        ("Transformers", "transformers"),
        ("PyTorch", "torch"),
        ("Accelerate", "accelerate"),
        ("Datasets", "datasets"),
        ("Tokenizers", "tokenizers"),
    ]:
        try:
            lines.append(f"- {label}: {version(package)}")
        except PackageNotFoundError:
            continue
    return lines


def _cell(text: str) -> str:
    return "<code>" + text.replace("|", "\\|") + "</code>"


def _yaml_quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def logs_table(rows: list[EpochRow]) -> list[str]:
    """``Epoch | Step | Training Loss | eval metrics`` with the step-0 base row first, '-' where empty."""
    header = ["Epoch", "Step", "Training Loss", *(f"eval_{m}" for m in CARD_METRICS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(":-----:" for _ in header) + "|"]
    for row in rows:
        loss = "-" if row.training_loss is None else f"{row.training_loss:.4f}"
        cells = [f"{row.epoch:.1f}" if float(row.epoch).is_integer() else f"{row.epoch}", str(row.step), loss]
        cells += [f"{row.metrics[m]:.4f}" if m in row.metrics else "-" for m in CARD_METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _front_matter(settings: PairtuneConfig, n_train: int, samples: pd.DataFrame, columns: Columns) -> list[str]:
    lines = [
        "---",
        "tags:",
        "- sentence-transformers",
        "- sentence-similarity",
        "- feature-extraction",
        "- dense",
        "- generated_by_pairtune",
        f"- dataset_size:{n_train}",
        "- loss:MultipleNegativesRankingLoss",
        f"base_model: {settings.model.name}",
        "widget:",
    ]
    for note, sentence in zip(samples[columns.anchor], samples[columns.positive], strict=True):
        lines += [f"- source_sentence: {_yaml_quote(note)}", "  sentences:", f"  - {_yaml_quote(sentence)}"]
    lines += ["pipeline_tag: sentence-similarity", "library_name: sentence-transformers", "---", ""]
    return lines


def render_model_card(
    *, model, settings: PairtuneConfig, result: TrainResult, train_frame: pd.DataFrame, columns: Columns
) -> str:
    base = settings.model.name
    dim = model.get_embedding_dimension()
    samples = train_frame.head(3)
    stats = token_stats(train_frame, columns, lambda texts: count_tokens(model.tokenizer, texts))
    loss_params = {
        "scale": settings.loss.scale,
        "similarity_fct": "cos_sim" if settings.loss.similarity == "cosine" else "dot_score",
        "gather_across_devices": settings.loss.gather_across_devices,
    }
    if settings.loss.mini_batch_size is not None:
        loss_params["mini_batch_size"] = settings.loss.mini_batch_size
    loss_name = "CachedMultipleNegativesRankingLoss" if settings.loss.mini_batch_size else "MultipleNegativesRankingLoss"
    hparams = hyperparameters(settings, result)
    non_default = {k: v for k, v in hparams.items() if k in TRAINER_DEFAULTS and TRAINER_DEFAULTS[k] != v}
    final = result.final_metrics
    example = [train_frame[columns.anchor].iloc[0], train_frame[columns.positive].iloc[0], train_frame[columns.positive].iloc[1]]

    lines = _front_matter(settings, len(train_frame), samples, columns)
    lines += [
        f"# SentenceTransformer based on {base}",
        "",
        f"This is a [sentence-transformers](https://www.SBERT.net) model finetuned from {base} with pairtune. "
        f"It maps sentences & paragraphs to a {dim}-dimensional dense vector space and can be used for semantic "
        "textual similarity, semantic search, paraphrase mining, text classification, clustering, and more.",
        "",
        "## Model Details",
        "",
        "### Model Description",
        "- **Model Type:** Sentence Transformer",
        f"- **Base model:** {base}",
        f"- **Maximum Sequence Length:** {model.max_seq_length} tokens",
        f"- **Output Dimensionality:** {dim} dimensions",
        "- **Similarity Function:** Cosine Similarity",
        f"- **Training Dataset:** {settings.data.source}",
        "",
        "### Full Model Architecture",
        "",
        "```",
        str(model),
        "```",
        "",
        "## Usage",
        "",
        "### Direct Usage (Sentence Transformers)",
        "",
        "```python",
        "from sentence_transformers import SentenceTransformer",
        "",
        f'model = SentenceTransformer("{settings.paths.model}")',
        f"sentences = {json.dumps(example, indent=4, ensure_ascii=False)}",
        "embeddings = model.encode(sentences)",
        "print(embeddings.shape)",
        f"# [3, {dim}]",
        "similarities = model.similarity(embeddings, embeddings)",
        "```",
        "",
        "## Evaluation",
        "",
        "### Metrics",
        "",
        "#### Information Retrieval",
        "",
        "* Dataset: `eval` (each note a query, each sentence of the split a document)",
        "",
        "| Metric | Value |",
        "|:-------|:------|",
    ]
    lines += [f"| {m} | {final[m]:.4f} |" for m in CARD_METRICS if m in final]
    lines += [
        "",
        "## Training Details",
        "",
        "### Training Dataset",
        "",
        f"* Size: {len(train_frame)} training samples",
        "* Columns: " + " and ".join(f"<code>{c}</code>" for c in columns.names),
        f"* Approximate statistics based on the first {len(train_frame)} samples:",
        "  |         | " + " | ".join(columns.names) + " |",
        "  |:--------|" + "|".join(":---" for _ in columns.names) + "|",
        "  | type    | " + " | ".join("string" for _ in columns.names) + " |",
        "  | details | "
        + " | ".join(
            f"<ul><li>min: {stats[c]['min']} tokens</li><li>mean: {stats[c]['mean']:.2f} tokens</li>"
            f"<li>max: {stats[c]['max']} tokens</li></ul>"
            for c in columns.names
        )
        + " |",
        "* Samples:",
        "  | " + " | ".join(columns.names) + " |",
        "  |" + "|".join(":---" for _ in columns.names) + "|",
    ]
    for _, sample in samples.iterrows():
        lines.append("  | " + " | ".join(_cell(sample[c]) for c in columns.names) + " |")
    lines += [
        f"* Loss: [<code>{loss_name}</code>](https://sbert.net/docs/package_reference/sentence_transformer/losses.html)"
        " with these parameters:",
        "  ```json",
        *("  " + line for line in json.dumps(loss_params, indent=4).splitlines()),
        "  ```",
        "",
        "### Training Hyperparameters",
        "#### Non-Default Hyperparameters",
        "",
        *(f"- `{k}`: {v}" for k, v in non_default.items()),
        "",
        "#### All Hyperparameters",
        "<details><summary>Click to expand</summary>",
        "",
        *(f"- `{k}`: {v}" for k, v in hparams.items()),
        "",
        "</details>",
        "",
        "### Training Logs",
        *logs_table(result.rows),
        "",
        f"Training: {result.global_step} steps, {result.steps_per_epoch} per epoch, world size {result.world_size}, "
        f"global batch {result.global_batch_size}, {result.pairs_per_second:.1f} pairs/s.",
        "",
        "### Framework Versions",
        *_framework_versions(),
        "",
        "## Citation",
        "",
        "### BibTeX",
        "",
        "#### Sentence Transformers",
        "```bibtex",
        "@inproceedings{reimers-2019-sentence-bert,",
        '    title = "Sentence-BERT: Sentence Embeddings using Siamese BERT-Networks",',
        '    author = "Reimers, Nils and Gurevych, Iryna",',
        '    booktitle = "Proceedings of the 2019 Conference on Empirical Methods in Natural Language Processing",',
        '    year = "2019",',
        '    url = "https://arxiv.org/abs/1908.10084",',
        "}",
        "```",
        "",
        "#### MultipleNegativesRankingLoss",
        "```bibtex",
        "@misc{henderson2017efficient,",
        "    title={Efficient Natural Language Response Suggestion for Smart Reply},",
        "    author={Matthew Henderson and Rami Al-Rfou and Brian Strope and Yun-hsuan Sung and Laszlo Lukacs and "
        "Ruiqi Guo and Sanjiv Kumar and Balint Miklos and Ray Kurzweil},",
        "    year={2017},",
        "    eprint={1705.00652},",
        "    archivePrefix={arXiv},",
        "    primaryClass={cs.CL}",
        "}",
        "```",
        "",
    ]
    return "\n".join(lines)


def write_model_card(path: Path, **kwargs) -> None:
    Path(path).write_text(render_model_card(**kwargs), encoding="utf-8")
