"""What every entry point does first: logging, quiet third-party chatter, one-line user errors, sweep paths.

Torch-free: a config error or ``--help`` answers before any heavy import.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from pairtune.core import USER_ERRORS

if TYPE_CHECKING:
    from pairtune.config import PairtuneConfig

T = TypeVar("T")


def quiet_third_party() -> None:
    """Keep the console to pairtune's own lines and real problems: silence known-harmless chatter at its source.

    Each filter names one message and the module or logger that emits it, with why it is harmless; nothing
    is silenced wholesale, so an unexpected warning from the same libraries still shows.
    """
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when huggingface_hub is first imported
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when transformers is first imported
    if not sys.stderr.isatty():  # datasets' "Generating train split" bars: carriage returns pile up in a log
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    for name in ("transformers", "sentence_transformers", "accelerate", "httpx", "urllib3", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # "generated new fontManager": matplotlib builds its font cache once per install; an INFO line, not a problem.
    logging.getLogger("matplotlib.font_manager").setLevel(logging.WARNING)
    # "Creating initial MLflow database tables...": a new local store being set up, once.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    # Raised from pairtune.tracking.run.log_datasets (its better home: pass the source explicitly there). MLflow
    # builds a LocalArtifactDatasetSource for both the "" and the "file" scheme, so a local parquet path
    # matches two identical local-file sources; either is right, and MLflow says which one it took.
    warnings.filterwarnings(
        "ignore",
        message="The specified dataset source can be interpreted in multiple ways",
        category=UserWarning,
        module="mlflow.data.dataset_source_registry",
    )
    if _ort_preprocessing_hint not in logging.getLogger().filters:  # once, however often this is called
        logging.getLogger().addFilter(_ort_preprocessing_hint)


def _ort_preprocessing_hint(record: logging.LogRecord) -> bool:
    """False for ONNX Runtime's "Please consider to run pre-processing before quantization" hint.

    ``quantize_dynamic`` logs it on the root logger for any model without ORT's shape-inference and optimizer
    pre-processing. The export stage quantises without it on purpose: it checks int8 parity against
    ``export.min_cosine_int8`` on every test sentence, and ORT's transformer optimizer made the int8 graph
    slower and less exact (README, "Speed"). Better home: around ``quantize_dynamic`` in ``pairtune.outputs.export``.
    """
    return not (record.name == "root" and "pre-processing before quantization" in str(record.msg))


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


def in_dvc_stage() -> bool:
    """True when DVC runs this process as a pipeline stage (it sets ``DVC_STAGE`` for every stage command)."""
    return bool(os.environ.get("DVC_STAGE"))


def isolate_outputs(settings: PairtuneConfig, *keys: str) -> PairtuneConfig:
    """Outside a DVC stage, write the ``paths.<key>`` outputs into this job's own Hydra folder.

    A command-line run (``pipelines/train.py train.lr=...``, ``make train``, a sweep) is an experiment, not
    a pipeline edit: relative output paths move under its Hydra output folder
    (``outputs/<date>/<time>/models/trained``; ``multirun/<date>/<time>/<job>/...`` in a sweep, so parallel
    jobs never share a folder), and the DVC pipeline's ``models/``, ``reports/`` and ``checkpoints/`` stay
    as ``dvc repro`` left them. Absolute paths are kept, with the job number appended in a sweep.
    """
    from hydra.core.hydra_config import HydraConfig

    if in_dvc_stage() or not HydraConfig.initialized():
        return settings
    hydra = HydraConfig.get()
    job_dir = Path(hydra.runtime.output_dir)

    def own(path: str) -> str:
        if Path(path).is_absolute():  # a sweep's jobs still need folders of their own
            return str(Path(path) / str(hydra.job.num)) if in_multirun() else path
        return str(job_dir / path)

    for key in keys:
        setattr(settings.paths, key, own(getattr(settings.paths, key)))
    return settings


def check_inputs(settings: PairtuneConfig, *keys: str) -> None:
    """Every input a stage reads must exist: one line naming the key, before any heavy import or run opens."""
    from pairtune.config import ConfigError
    from pairtune.data.pairs import check_prepared
    from pairtune.model.model_source import check_model_folder, check_model_name

    checks = {
        "model.name": lambda: check_model_name(settings.model.name),
        "paths.final": lambda: check_model_folder(settings.paths.final, "paths.final"),
        "paths.prepared": lambda: check_prepared(settings.paths.prepared),
    }
    for key in keys:
        if key == "promotion.source":
            source = settings.promotion.source
            if source is not None and not Path(source).is_file():
                raise ConfigError(f"config key 'promotion.source': {source}: file not found")
        else:
            checks[key]()


def resume_hint() -> str:
    """The command that continues this run: the same overrides, its own Hydra folder, ``train.resume=true``."""
    from hydra.core.hydra_config import HydraConfig

    command = [Path(sys.argv[0]).as_posix(), *(arg for arg in sys.argv[1:] if not arg.startswith("train.resume="))]
    if HydraConfig.initialized() and not in_dvc_stage():
        command.append(f"hydra.run.dir={HydraConfig.get().runtime.output_dir}")
    return " ".join(["python", *command, "train.resume=true"])
