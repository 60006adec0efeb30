"""What every entry point does first: logging, quiet third-party chatter, settings, one-line errors."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import TypeVar

from pairtune.config import ConfigError
from pairtune.data import PairDataError
from pairtune.stages import ExportParityError
from pairtune.tracking import TrackingUnavailableError
from pairtune.training import NonFiniteLossError

T = TypeVar("T")

#: Errors a user can fix; they end the process with one line on stderr and exit status 2.
USER_ERRORS = (ConfigError, PairDataError, ExportParityError, NonFiniteLossError, TrackingUnavailableError)


def quiet_third_party() -> None:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in ("transformers", "sentence_transformers", "accelerate", "httpx", "urllib3", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


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


def isolate_sweep_job(settings):
    """In a Hydra multirun, give each job its own model, checkpoint and report folders.

    Jobs of one sweep (possibly running in parallel) would otherwise write over each other's outputs.
    Relative paths go under the job's Hydra folder (``multirun/<date>/<time>/<job>/models/trained``),
    absolute ones get the job number as a subfolder (``/data/models/3``).
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return settings
    hydra = HydraConfig.get()
    job_dir, job = Path(hydra.runtime.output_dir), str(hydra.job.num)

    def own(path: str) -> str:
        return str(Path(path) / job if Path(path).is_absolute() else job_dir / path)

    paths = settings.paths
    paths.model, paths.checkpoints, paths.reports = own(paths.model), own(paths.checkpoints), own(paths.reports)
    return settings
