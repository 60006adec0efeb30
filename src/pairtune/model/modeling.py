"""Finding and loading the base model: a local folder, the hub, or the bundled MiniLM copy."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from sentence_transformers import SentenceTransformer

from pairtune.model.model_source import resolve_model_source

log = logging.getLogger(__name__)


def load_model(
    name: str,
    *,
    max_seq_length: int,
    trust_remote_code: bool = False,
    device: str | None = "cpu",
    dropout: float | None = None,
) -> SentenceTransformer:
    source, origin = resolve_model_source(name)
    log.info("model %s from the %s", name, origin)
    model = SentenceTransformer(source, device=device, trust_remote_code=trust_remote_code)
    if not has_modules_file(source):
        log.warning("model %s: no sentence-transformers modules.json, so %s pooling over its tokens", name,
                    getattr(model[-1], "pooling_mode", "mean"))
    model.max_seq_length = max_seq_length
    if dropout is not None:
        set_dropout(model, dropout)
    freeze_unused_pooler(model)
    return model


def has_modules_file(source: str) -> bool:
    """Whether ``source`` (a folder or a hub id in the local cache) says how it pools; unknown counts as yes."""
    if Path(source).is_dir():
        return (Path(source) / "modules.json").is_file()
    from huggingface_hub import _CACHED_NO_EXIST, try_to_load_from_cache

    return try_to_load_from_cache(source, "modules.json") is not _CACHED_NO_EXIST


def freeze_unused_pooler(model: torch.nn.Module) -> None:
    """A BERT checkpoint's ``pooler`` never takes part in sentence embeddings (the Pooling module does).

    Left trainable it gets no gradient, which DistributedDataParallel reports as an error on step 2.
    """
    for name, module in model.named_modules():
        if name.endswith("model.pooler"):
            module.requires_grad_(False)


def set_dropout(model: torch.nn.Module, probability: float) -> None:
    """Every dropout layer at ``probability`` (0.0 turns dropout off while training)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = probability
