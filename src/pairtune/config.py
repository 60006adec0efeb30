"""Structured configuration: one home for every key's type, default and allowed range.

Hydra composes ``conf/`` in struct mode, so an unknown key fails at composition. Every entry point then
passes the composed config (or DVC's ``params.yaml``) through :func:`load_settings`, which merges it onto
:class:`PairtuneConfig` and checks types and ranges, naming the key that is wrong. The schema is not in
``conf/config.yaml``'s defaults so that DVC can compose ``conf/`` without importing pairtune.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

BUNDLED_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"config key '{key}': {message}")


@dataclass
class SourceConfig:
    """One entry of ``data.sources``: where its pairs are, their columns, how it is split and weighted."""

    name: str = ""  # how metrics, the card and MLflow name it: letters, digits, _ and -
    source: str = ""  # any form data.source takes
    revision: str | None = None
    subset: str | None = None
    split: str = "train"
    format: str | None = None
    anchor_column: str | None = None  # None: data.anchor_column (likewise the others)
    positive_column: str | None = None
    negative_column: str | None = None
    train_size: Any = 0.71  # of this source's rows (int = rows, float = fraction); the rest after eval is test
    eval_size: Any = 0.12
    weight: float = 1.0  # proportional sampling: this source's batches per epoch, times its own count
    anchor_prompt: str | None = None  # None: data.anchor_prompt; "" for none (the model saves "<name>_query")
    positive_prompt: str | None = None  # None: data.positive_prompt (saved as "<name>_document")

    def __post_init__(self) -> None:
        _require(bool(re.fullmatch(r"[A-Za-z0-9_-]+", self.name or "")), "data.sources.name",
                 f"must be letters, digits, _ or -, got {self.name!r}")
        _require(bool(self.source), f"data.sources.{self.name}.source", "must not be empty")
        _require(self.weight > 0, f"data.sources.{self.name}.weight", "must be > 0")
        for key in ("train_size", "eval_size"):
            value = getattr(self, key)
            ok = (isinstance(value, int) and not isinstance(value, bool) and value > 0) or (
                isinstance(value, float) and 0.0 < value < 1.0
            )
            _require(ok, f"data.sources.{self.name}.{key}", f"must be a positive row count or a fraction, got {value!r}")


@dataclass
class DataConfig:
    source: str = "data/raw/pairs.jsonl"  # a file, a save_to_disk folder, a dataset folder or a hub dataset id
    revision: str | None = None  # hub datasets: a branch, tag or commit; None = the default branch
    subset: str | None = None  # hub datasets: the configuration (load_dataset's name); None = the default one
    split: str = "train"  # datasets sources: the split to read (slices such as "train[:10%]" for hub datasets)
    format: str | None = None  # jsonl | csv | parquet; None = from the file suffix
    anchor_column: str = "sentence_0"
    positive_column: str = "sentence_1"
    negative_column: str | None = None  # optional hard negatives
    # Text put before every anchor (the model's "query" prompt) and every positive and negative ("document"),
    # in training, evaluation, export and serving alike; None = no prompt, as the seed card
    anchor_prompt: str | None = None
    positive_prompt: str | None = None
    csv_delimiter: str = ","
    train_size: Any = 263  # int = rows, float in (0, 1) = fraction
    eval_size: Any = 45
    split_seed: int = 42
    # Several sources in one run (None: data.source alone, as the seed card); each global batch comes from one
    sources: list[SourceConfig] | None = None
    objective: str = "mean"  # several sources: the headline metrics are the mean over sources, "all" (pooled) or one source's

    def __post_init__(self) -> None:
        if self.sources is not None:
            names = [source.name for source in self.sources]
            _require(len(names) > 0, "data.sources", "must list at least one source, or be null")
            _require(len(set(names)) == len(names), "data.sources", f"names must be distinct, got {names}")
            _require(self.objective in ("mean", "all", *names), "data.objective",
                     f"must be mean, all or a source name ({', '.join(names)}), got {self.objective!r}")
        for key in ("train_size", "eval_size"):
            value = getattr(self, key)
            ok = (isinstance(value, int) and not isinstance(value, bool) and value > 0) or (
                isinstance(value, float) and 0.0 < value < 1.0
            )
            _require(ok, f"data.{key}", f"must be a positive row count or a fraction in (0, 1), got {value!r}")
        _require(self.format in (None, "jsonl", "csv", "parquet"), "data.format", "must be jsonl, csv or parquet")
        _require(bool(self.source), "data.source", "must not be empty")
        _require(bool(self.split), "data.split", "must not be empty")
        _require(self.anchor_column != self.positive_column, "data.positive_column", "must differ from anchor")


@dataclass
class ModelConfig:
    name: str = BUNDLED_MODEL_ID  # hub id or local folder; the bundled copy serves offline
    max_seq_length: int = 256
    trust_remote_code: bool = False
    dropout: float | None = None  # None keeps the checkpoint's dropout; 0.0 makes training deterministic per row
    # auto: BERT encoders train on packed real tokens (same outputs, no work on padding), others padded;
    # true: unpadded or an error; false: padded
    unpad: Any = "auto"

    def __post_init__(self) -> None:
        _require(self.unpad in (True, False, "auto"), "model.unpad", f"must be auto, true or false, got {self.unpad!r}")
        _require(bool(self.name), "model.name", "must not be empty")
        _require(self.dropout is None or 0.0 <= self.dropout < 1.0, "model.dropout", "must be in [0, 1) or null")
        _require(self.max_seq_length > 0, "model.max_seq_length", "must be > 0")


@dataclass
class LossConfig:
    scale: float = 20.0  # seed card: inverse temperature
    similarity: str = "cosine"  # cosine | dot
    mini_batch_size: int | None = None  # set = cached MNRL (GradCache) with this mini-batch
    gather_across_devices: bool = False
    symmetric: bool = False  # also each positive picks its anchor among the batch's anchors (MNSRL), averaged
    # Matryoshka: the loss at each leading slice of the embedding, summed with these weights (1 each by default)
    matryoshka_dims: list[int] | None = None  # e.g. [384, 256, 128, 64], largest first; None = off
    matryoshka_weights: list[float] | None = None

    def __post_init__(self) -> None:
        _require(self.scale > 0, "loss.scale", "must be > 0")
        _require(self.similarity in ("cosine", "dot"), "loss.similarity", "must be cosine or dot")
        _require(
            self.mini_batch_size is None or self.mini_batch_size > 0, "loss.mini_batch_size", "must be > 0 or null"
        )
        dims = self.matryoshka_dims
        if dims is not None:
            _require(len(dims) > 0 and all(d > 0 for d in dims), "loss.matryoshka_dims", "must be positive ints or null")
            _require(list(dims) == sorted(set(dims), reverse=True), "loss.matryoshka_dims",
                     f"must be distinct and largest first, got {list(dims)}")
        weights = self.matryoshka_weights
        if weights is not None:
            _require(dims is not None, "loss.matryoshka_weights", "needs loss.matryoshka_dims")
            _require(len(weights) == len(dims or ()), "loss.matryoshka_weights",
                     f"needs one weight per dim ({len(dims or ())}), got {len(weights)}")
            _require(all(w > 0 for w in weights), "loss.matryoshka_weights", "must be > 0")

    def matryoshka(self) -> tuple[tuple[int, ...], tuple[float, ...]] | None:
        """``(dims, weights)`` of the Matryoshka loss, or None when it is off."""
        if self.matryoshka_dims is None:
            return None
        weights = self.matryoshka_weights or [1.0] * len(self.matryoshka_dims)
        return tuple(self.matryoshka_dims), tuple(float(w) for w in weights)


@dataclass
class TrainConfig:
    epochs: int = 10  # seed card: num_train_epochs
    batch_size: int = 32  # per device; seed card: per_device_train_batch_size
    eval_batch_size: int = 32
    lr: float = 5.0e-5  # seed card: learning_rate
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1.0e-8
    scheduler: str = "linear"  # linear | constant | cosine
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    seed: int = 42
    max_steps: int = -1  # > 0 stops early, as in the seed card's max_steps
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"  # no | fp16 | bf16
    batch_sampler: str = "random"  # random | no_duplicates
    # several sources: each global batch from one source; proportional (every batch of every source once per
    # epoch, times its weight, in a seeded order) | round_robin (one batch of each in turn, until one runs out)
    source_sampling: str = "proportional"
    drop_last: bool = False
    eval_on_start: bool = True  # the step-0 row of the card: the base model's scores
    select_best: bool = False  # save the weights of the best eval MRR@10 (step 0 included), not the last step's
    save_checkpoints: bool = True  # one per epoch end
    checkpoint_every_steps: int | None = None  # also every N optimizer steps, mid-epoch
    eval_every_steps: int | None = None  # also evaluate every N optimizer steps, mid-epoch
    eval_max_rows: int | None = 10_000  # the eval split is scored on at most this many seeded rows
    keep_checkpoints: int = 2
    resume: Any = False  # true: continue the newest checkpoint (refused if none) | false | auto: continue if one exists
    shared_filesystem: bool = True  # False: every node keeps its own checkpoint copy
    collective_timeout_minutes: float = 60.0  # how long ranks wait for rank 0's evaluation, or any collective
    num_threads: int | None = None  # torch intra-op threads; None = torch's default
    reuse_freed_memory: bool = True  # CPU on glibc: freed blocks stay in the process (pairtune.train.memory)
    progress: bool = True  # console progress (main process): a bar on a terminal, plain lines in a log
    progress_every_seconds: float = 30.0  # without a terminal (CI, DVC, SLURM): one progress line this often

    def __post_init__(self) -> None:
        _require(self.epochs > 0, "train.epochs", f"must be > 0, got {self.epochs}")
        _require(self.batch_size > 0, "train.batch_size", f"must be > 0, got {self.batch_size}")
        _require(self.eval_batch_size > 0, "train.eval_batch_size", "must be > 0")
        _require(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        _require(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        _require(self.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
        _require(self.max_grad_norm > 0, "train.max_grad_norm", "must be > 0")
        _require(self.max_steps == -1 or self.max_steps > 0, "train.max_steps", "must be -1 (off) or > 0")
        _require(self.gradient_accumulation_steps > 0, "train.gradient_accumulation_steps", "must be > 0")
        _require(self.scheduler in ("linear", "constant", "cosine"), "train.scheduler", "linear|constant|cosine")
        _require(self.mixed_precision in ("no", "fp16", "bf16"), "train.mixed_precision", "no|fp16|bf16")
        _require(self.batch_sampler in ("random", "no_duplicates"), "train.batch_sampler", "random|no_duplicates")
        _require(self.source_sampling in ("proportional", "round_robin"), "train.source_sampling",
                 "proportional|round_robin")
        _require(self.keep_checkpoints > 0, "train.keep_checkpoints", "must be > 0")
        _require(self.resume in (True, False, "auto"), "train.resume", f"must be true, false or auto, got {self.resume!r}")
        for key in ("checkpoint_every_steps", "eval_every_steps", "eval_max_rows"):
            value = getattr(self, key)
            _require(value is None or value > 0, f"train.{key}", f"must be > 0 or null, got {value}")
        _require(self.collective_timeout_minutes > 0, "train.collective_timeout_minutes", "must be > 0")
        _require(self.progress_every_seconds > 0, "train.progress_every_seconds", "must be > 0")


@dataclass
class MiningConfig:
    """The ``mine`` stage (pairtune.data.mining): one hard negative per training pair, off by default."""

    enabled: bool = False
    negative_column: str = "negative"  # the mined column's name; mining.json tells training to use it
    relative_margin: float = 0.05  # keep a candidate only if it scores <= positive - margin x |positive|
    range_min: int = 0  # skip this many of each note's closest candidates
    range_max: int = 50  # look this deep in each note's ranking
    sampling_strategy: str = "top"  # top | random
    on_missing: str = "random"  # a pair no candidate passes for: random (seeded train sentence) | drop
    batch_size: int = 64  # encoding batch
    seed: int = 42

    def __post_init__(self) -> None:
        _require(bool(self.negative_column), "mining.negative_column", "must not be empty")
        _require(0.0 <= self.relative_margin < 1.0, "mining.relative_margin", "must be in [0, 1)")
        _require(self.range_min >= 0, "mining.range_min", "must be >= 0")
        _require(
            self.range_max > self.range_min, "mining.range_max", f"must be > mining.range_min ({self.range_min})"
        )
        _require(self.sampling_strategy in ("top", "random"), "mining.sampling_strategy", "top|random")
        _require(self.on_missing in ("random", "drop"), "mining.on_missing", "random|drop")
        _require(self.batch_size > 0, "mining.batch_size", "must be > 0")


@dataclass
class PathsConfig:
    prepared: str = "data/prepared"
    mined: str = "data/mined"  # the mine stage's output: the prepared splits, train with mined negatives
    mining_cache: str = ".cache/mining"  # base-model embeddings, keyed by the model's weights
    model: str = "models/trained"  # the trained model, with the seed card's card
    final: str = "models/final"  # what evaluate, export, the registry and serving use: the guard's blend
    general_cache: str = ".cache/general"  # general-set scores, keyed by a model's weights and the set
    checkpoints: str = "checkpoints"
    reports: str = "reports"
    onnx: str = "models/onnx"


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str | None = None  # None = $MLFLOW_TRACKING_URI, else sqlite:///<repo>/mlflow.db
    experiment: str | None = None  # None = $MLFLOW_EXPERIMENT_NAME, else "pairtune"
    run_name: str | None = None
    log_model: bool = True
    registered_model: str | None = "pairtune"  # None = do not register
    flush_seconds: float = 5.0  # per-step metrics are written in batches this often (and at each evaluation)

    def __post_init__(self) -> None:
        _require(self.flush_seconds > 0, "tracking.flush_seconds", "must be > 0")


@dataclass
class ExportConfig:
    opset: int = 17
    batch_size: int = 32  # encode throughput is measured at this batch size
    min_cosine_fp32: float = 0.9999  # parity floor, every test sentence
    min_cosine_int8: float = 0.99
    # quint8: the same int8 embeddings on every x86-64 CPU, and above the floor on AVX2-only ones (measured
    # 0.9947 min cosine); qint8: about 1.5x the int8 speed on CPUs with AVX-512 VNNI, but AVX2-only CPUs
    # saturate (vpmaddubsw) and fall under 0.99
    int8_weights: str = "quint8"
    # Keep the first `dim` components and renormalise (a Matryoshka model's smaller index): in the ONNX graph,
    # and as `truncate_dim` in the final model's config (the served and the loaded model truncate alike)
    dim: int | None = None

    def __post_init__(self) -> None:
        _require(self.dim is None or self.dim > 0, "export.dim", "must be > 0 or null")
        _require(self.int8_weights in ("quint8", "qint8"), "export.int8_weights", "quint8|qint8")
        _require(self.opset >= 14, "export.opset", "must be >= 14")
        _require(self.batch_size > 0, "export.batch_size", "must be > 0")


@dataclass
class GeneralConfig:
    """The general-retrieval set the guard scores (pairtune.train.guard): queries and passages outside the task."""

    source: str | None = "data/general/pairs.jsonl"  # any form data.source takes; None = no general set, no guard
    corpus: str | None = "data/general/distractors.jsonl"  # passages relevant to no query (near misses); None = none
    query_column: str = "query"
    passage_column: str = "passage"
    revision: str | None = None  # hub datasets, as data.*
    subset: str | None = None
    split: str = "train"
    batch_size: int = 64  # encoding batch of a general evaluation

    def __post_init__(self) -> None:
        _require(self.query_column != self.passage_column, "general.passage_column", "must differ from query_column")
        _require(self.batch_size > 0, "general.batch_size", "must be > 0")


@dataclass
class GuardConfig:
    """Never worse than the base model: the final model is the best blend that keeps general retrieval."""

    enabled: bool = True  # false: the final model is the trained one, no general set is scored
    max_drop: float = 0.005  # the final model's general MRR@10 may fall at most this much below the base's
    grid: list[float] = field(default_factory=lambda: [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0])
    score_all: bool = False  # score every blend on the general set (for the table), not only until one passes

    def __post_init__(self) -> None:
        _require(self.max_drop >= 0, "guard.max_drop", f"must be >= 0, got {self.max_drop}")
        _require(all(0.0 <= a <= 1.0 for a in self.grid), "guard.grid", "every a must be in [0, 1]")


@dataclass
class NumericsConfig:
    """Which kernels run: the same bytes on any x86-64 CPU with AVX2, or this CPU's fastest (pairtune.numerics)."""

    mode: str = "auto"  # auto: reproducible in a DVC stage, fastest on the command line | reproducible | fastest
    threads: int = 2  # reproducible: every process's thread count (bytes change with it)

    def __post_init__(self) -> None:
        _require(self.mode in ("auto", "reproducible", "fastest"), "numerics.mode", "auto|reproducible|fastest")
        _require(self.threads > 0, "numerics.threads", "must be > 0")


@dataclass
class PromotionConfig:
    """What decides ``champion``/``challenger`` in the registry (pairtune.tracking.registry)."""

    source: str | None = None  # a pairs file (data's columns) fixed across runs; None = the prepared eval split


@dataclass
class PairtuneConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    mining: MiningConfig = field(default_factory=MiningConfig)
    promotion: PromotionConfig = field(default_factory=PromotionConfig)
    general: GeneralConfig = field(default_factory=GeneralConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    numerics: NumericsConfig = field(default_factory=NumericsConfig)

    def __post_init__(self) -> None:
        _require(
            self.mining.negative_column not in (self.data.anchor_column, self.data.positive_column),
            "mining.negative_column",
            "must differ from data.anchor_column and data.positive_column",
        )
        if self.loss.mini_batch_size is not None:
            _require(
                self.loss.mini_batch_size <= self.train.batch_size,
                "loss.mini_batch_size",
                f"must be <= train.batch_size ({self.train.batch_size})",
            )


def load_settings(cfg: DictConfig | dict) -> PairtuneConfig:
    """Validate a composed config against the schema and return it as typed dataclasses.

    Keys Hydra adds for its own use (``hydra``) and presets' bookkeeping keys are ignored.
    """
    skip = ("hydra", "experiment", "hparams_search")
    if isinstance(cfg, dict):
        container = {k: v for k, v in cfg.items() if k not in skip}
    else:  # resolve key by key: Hydra's own node holds interpolations only a running job can resolve
        container = {
            k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
            for k in cfg
            if k not in skip
        }
    try:
        merged = OmegaConf.merge(OmegaConf.structured(PairtuneConfig), container)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise ConfigError(f"config key '{key}': {str(err).splitlines()[0]}") from None


def settle_batch_sampler(settings: PairtuneConfig) -> PairtuneConfig:
    """A run that trains on a negative column samples without duplicates, whatever ``train.batch_sampler`` says.

    A negative (prepared or mined) is a train-split sentence: in a random batch it is often another row's
    positive, and MNRL then pushes that row's right answer away. The no-duplicates sampler keeps every text,
    of any column, once per global batch. The settled value is what the run records (params, card,
    fingerprint); the change is logged once, where it is made.
    """
    train = settings.train
    if settings.data.negative_column and train.batch_sampler != "no_duplicates":
        log.warning(
            "train.batch_sampler: no_duplicates instead of %s, since the run trains on the negative column '%s' "
            "(a random batch would hold a row's negative beside the row it is the positive of)",
            train.batch_sampler, settings.data.negative_column,
        )
        train.batch_sampler = "no_duplicates"
    return settings


def to_plain_dict(settings: PairtuneConfig) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(settings), resolve=True)
