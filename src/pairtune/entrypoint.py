"""What every entry point does first: logging, quiet third-party chatter, one-line user errors, sweep paths.

Torch-free: a config error or ``--help`` answers before any heavy import.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from pairtune.core import USER_ERRORS

if TYPE_CHECKING:
    from pairtune.config import PairtuneConfig

T = TypeVar("T")


def quiet_third_party() -> None:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when transformers is first imported
    for name in ("transformers", "sentence_transformers", "accelerate", "httpx", "urllib3", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.WARNING)


def exit_on_user_error(func: Callable[..., T]) -> Callable[..., T]:
    """Turn a configuration or data error into ``pairtune: error: <message>`` and exit status 2."""

    @wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except USER_ERRORS as err:
            print(f"pairtune: error: {err}", file=sys.stderr)
            sys.exit(2)

    return wrapper


def launched_world_size() -> int:
    """Processes in the job, as torchrun and accelerate launch announce it before any process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def in_multirun() -> bool:
    """True inside a job of a Hydra multirun (``-m``), where jobs may run side by side."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def isolate_sweep_job(settings: PairtuneConfig) -> PairtuneConfig:
    """In a Hydra multirun, give each job its own model, checkpoint and report folders.

    Jobs of one sweep (possibly running in parallel) would otherwise write over each other's outputs.
    Relative paths go under the job's Hydra folder (``multirun/<date>/<time>/<job>/models/trained``),
    absolute ones get the job number as a subfolder (``/data/models/3``).
    """
    if not in_multirun():
        return settings
    from hydra.core.hydra_config import HydraConfig

    hydra = HydraConfig.get()
    job_dir, job = Path(hydra.runtime.output_dir), str(hydra.job.num)

    def own(path: str) -> str:
        return str(Path(path) / job if Path(path).is_absolute() else job_dir / path)

    paths = settings.paths
    paths.model, paths.checkpoints, paths.reports = own(paths.model), own(paths.checkpoints), own(paths.reports)
    return settings
