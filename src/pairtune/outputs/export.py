"""Export a SentenceTransformer to ONNX (fp32 and dynamic int8) and measure both against PyTorch.

The exported graph is the whole encoder (transformer, mean pooling over the attention mask, L2
normalisation), so serving needs only tokenizers + onnxruntime (see :mod:`pairtune.outputs.onnx_encoder`).
The folder follows sentence-transformers' ONNX layout: ``onnx/model.onnx``, ``onnx/model_qint8_avx2.onnx``.

Plain dynamic int8 quantisation of MiniLM loses too much (worst cosine to PyTorch ~0.985 on the bundled
pairs) because a few hidden channels carry activations 10-15x larger than the rest, and onnxruntime
quantises activations with one scale per tensor. Before quantising we therefore apply SmoothQuant
(Xiao et al., 2023): each Linear's input is divided per channel by ``s`` and its weight columns multiplied
by ``s``, which leaves the fp32 function unchanged but moves the outliers into the per-channel-quantised
weights. That lifts the worst cosine above 0.99 for ~10% of the int8 throughput (one Mul per Linear input;
the one before the attention output projection is folded into the value projection instead).
"""

from __future__ import annotations

import json
import logging
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import onnx
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic
from sentence_transformers import SentenceTransformer

from pairtune.config import ConfigError, PairtuneConfig
from pairtune.core import ExportParityError
from pairtune.data.pairs import Columns, load_prepared
from pairtune.files import write_atomic_dir, write_json_atomic
from pairtune.outputs.onnx_encoder import META_FILE, ONNX_SUBDIR, OUTPUT_NAME, VARIANT_FILES, OnnxEncoder

log = logging.getLogger(__name__)

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")  # those the model's tokenizer makes, in this order
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
SMOOTH_ALPHA = 0.7  # swept 0.3-1.0 on MiniLM-L6 + bundled pairs: 0.7 gave the best worst-case int8 cosine
# Generic text, unrelated to any test set, to estimate per-channel activation ranges; pass in-domain
# sentences (e.g. training anchors) through ``calibration_sentences`` for a slightly better int8 model.
DEFAULT_CALIBRATION = (
    "The quick brown fox jumps over the lazy dog.",
    "Meeting moved to 3pm, bring the Q3 numbers!",
    "I can't believe it's already December; where did the year go?",
    "pls call me back asap re: invoice #4471",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "lol ok c u l8r",
    "The committee will review all applications submitted before the deadline.",
    "Error 404: page not found",
    "She walked along the harbour at dawn, watching the fishing boats return.",
    "2 eggs, 1 cup flour, pinch of salt",
    "What time does the last train leave for the city?",
    "Prices rose 3.2% year on year, driven by energy costs.",
    "He fixed the roof before the storm arrived.",
    "Dr. Smith @ clinic Tue 9am -> follow-up",
    "Thanks!",
    "A",
)


class SentenceEncoderGraph(torch.nn.Module):
    """Transformer -> mean pooling over real tokens -> (the first ``dim`` components) -> L2 normalisation."""

    def __init__(self, transformer: torch.nn.Module, dim: int | None = None,
                 input_names: tuple[str, ...] = INPUT_NAMES) -> None:
        super().__init__()
        self.transformer = transformer
        self.dim = dim
        self.input_names = input_names  # MPNet and XLM-RoBERTa take no token_type_ids

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        named = dict(zip(self.input_names, inputs, strict=True))  # each (B, T)
        attention_mask = named["attention_mask"]
        tokens = self.transformer(**named).last_hidden_state  # (B, T, H)
        mask = attention_mask.unsqueeze(-1).to(tokens.dtype)  # (B, T, 1)
        pooled = (tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)  # (B, H)
        if self.dim is not None:
            pooled = pooled[:, : self.dim]  # (B, dim): a Matryoshka model's leading components
        return torch.nn.functional.normalize(pooled, p=2, dim=1)  # (B, H or dim)


class SmoothedLinear(torch.nn.Module):
    """``linear(x / s)`` where ``linear``'s input columns were already multiplied by ``s``: same output."""

    def __init__(self, linear: torch.nn.Linear, inverse_scale: torch.Tensor) -> None:
        super().__init__()
        self.linear = linear
        self.register_buffer("inverse_scale", inverse_scale)  # (in_features,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x * self.inverse_scale)


def load_exportable(model_dir: str | Path) -> SentenceTransformer:
    """Load on CPU and check the pipeline is the one the graph reproduces: Transformer + mean Pooling."""
    model = SentenceTransformer(str(model_dir), device="cpu").eval()
    modules = list(model)
    if len(modules) < 2 or not hasattr(modules[0], "auto_model") or type(modules[1]).__name__ != "Pooling":
        raise ValueError(
            f"{model_dir}: expected Transformer + Pooling modules, got {[type(m).__name__ for m in modules]}"
        )
    pooling = modules[1].get_config_dict().get("pooling_mode")
    if pooling != "mean":
        raise ValueError(f"{model_dir}: only mean pooling is exported, the model uses {pooling!r}")
    # Eager attention traces to the plain MatMul/Softmax pattern onnxruntime's transformer optimizer knows
    # (it does not fuse the sdpa trace); both run at the same speed under ORT_ENABLE_ALL on the 2-core CPU.
    model[0].auto_model.set_attn_implementation("eager")
    return model


def input_names(model: SentenceTransformer) -> tuple[str, ...]:
    """The graph's inputs: those of INPUT_NAMES the model's tokenizer makes (BERT all three, MPNet two)."""
    made = set(model.tokenizer.model_input_names)
    return tuple(name for name in INPUT_NAMES if name in made)


def trace_inputs(model: SentenceTransformer) -> tuple[torch.Tensor, ...]:
    """A padded batch of two, so the traced graph carries the masking path rather than a constant."""
    batch = model.tokenizer(["an example sentence to trace", "short"], padding=True, return_tensors="pt")
    return tuple(batch[name] for name in input_names(model))


def export_graph(model: SentenceTransformer, path: Path, *, opset: int) -> None:
    """Trace the whole encoder into ``path`` with dynamic batch and sequence axes, then check it."""
    names = input_names(model)
    axes = {name: {0: "batch", 1: "sequence"} for name in names} | {OUTPUT_NAME: {0: "batch"}}
    graph = SentenceEncoderGraph(model[0].auto_model, dim=model.truncate_dim, input_names=names).eval()
    with torch.no_grad(), warnings.catch_warnings():
        # The exporter warns about shape-dependent Python branches; for an encoder without a KV cache they
        # are constant (no causal mask, no padding of the key length), so the trace generalises.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # The one advanced index is the padding mask indexed by torch.arange (never negative), so the
        # exporter's negative-index caveat does not apply.
        warnings.filterwarnings("ignore", message="Exporting aten::index operator")
        torch.onnx.export(
            graph,
            trace_inputs(model),
            str(path),
            input_names=list(names),
            output_names=[OUTPUT_NAME],
            dynamic_axes=axes,
            opset_version=opset,
            dynamo=False,
            external_data=False,
            do_constant_folding=True,
        )
    onnx.checker.check_model(str(path))


def encoder_linears(model: SentenceTransformer) -> dict[str, torch.nn.Linear]:
    """Every Linear inside the transformer's layers (the pooler head is not part of the graph)."""
    bert = model[0].auto_model
    return {
        name: module
        for name, module in bert.named_modules()
        if isinstance(module, torch.nn.Linear) and name.startswith("encoder.")
    }


def input_absmax(
    model: SentenceTransformer, linears: dict[str, torch.nn.Linear], sentences: list[str]
) -> dict:
    """Per-channel max |input| of each Linear over the calibration texts, padding included as at runtime."""
    stats: dict[str, torch.Tensor] = {}

    def recorder(name: str) -> Callable:
        def record(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            absmax = inputs[0].detach().flatten(0, -2).abs().amax(dim=0)  # (in_features,)
            stats[name] = torch.maximum(stats[name], absmax) if name in stats else absmax

        return record

    hooks = [linear.register_forward_hook(recorder(name)) for name, linear in linears.items()]
    try:
        model.encode(sentences, batch_size=32, convert_to_numpy=True)
    finally:
        for hook in hooks:
            hook.remove()
    return stats


def smooth_scale(activation_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's s_j = max|X_j|^alpha / max|W_j|^(1-alpha), one per input channel."""
    weight_absmax = weight.abs().amax(dim=0).clamp(min=1e-5)  # (in_features,)
    return (activation_absmax.clamp(min=1e-5) ** alpha / weight_absmax ** (1 - alpha)).clamp(min=1e-5)


def fold_into_value(linears: dict[str, torch.nn.Linear], name: str, scale: torch.Tensor) -> bool:
    """Smooth the attention output projection by dividing the value projection's output channels by ``scale``.

    The attention context is softmax weights times values: it mixes tokens, never channels, so scaling value
    channel j scales context channel j. Exact, and it spares one elementwise Mul per layer at runtime.
    """
    value = linears.get(name.removesuffix("output.dense") + "self.value")
    if not name.endswith("attention.output.dense") or value is None:
        return False
    with torch.no_grad():
        value.weight.div_(scale[:, None])  # (out, in): one row per value channel
        if value.bias is not None:
            value.bias.div_(scale)
    return True


def apply_smoothing(model: SentenceTransformer, sentences: list[str], *, alpha: float) -> None:
    """Rewrite every encoder Linear in place into an equivalent one whose input is flatter across channels."""
    bert = model[0].auto_model
    linears = encoder_linears(model)
    stats = input_absmax(model, linears, sentences)
    # All scales first: folding rescales value weights, which must not feed the value projection's own scale.
    scales = {
        name: smooth_scale(stats[name], linear.weight.detach(), alpha) for name, linear in linears.items()
    }
    for name, linear in linears.items():
        with torch.no_grad():
            linear.weight.mul_(scales[name])  # (out, in) * (in,): scales input columns
        if not fold_into_value(linears, name, scales[name]):
            parent_name, _, child = name.rpartition(".")
            setattr(bert.get_submodule(parent_name), child, SmoothedLinear(linear, 1.0 / scales[name]))


WEIGHT_TYPES = {"quint8": QuantType.QUInt8, "qint8": QuantType.QInt8}


def quantize_int8(
    model: SentenceTransformer, path: Path, *, opset: int, calibration: list[str], weights: str = "quint8"
) -> None:
    """Smooth, export to a scratch fp32 graph, then quantise its weights to 8 bits per output channel.

    ``weights`` (``export.int8_weights``): ``quint8`` (unsigned) runs the same kernels' arithmetic on every x86
    CPU, so its embeddings are the same bytes everywhere; ``qint8`` (signed) is faster with AVX-512 VNNI but
    saturates on AVX2-only CPUs. Mutates ``model``; call after the plain fp32 export.
    """
    apply_smoothing(model, calibration, alpha=SMOOTH_ALPHA)
    with tempfile.TemporaryDirectory() as scratch:
        smoothed = Path(scratch) / "smoothed.onnx"
        export_graph(model, smoothed, opset=opset)
        # per_channel: worst-case cosine 0.985 vs 0.917 per-tensor (both unsmoothed), at no speed cost.
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.WARNING)  # the quantiser logs one INFO line per tensor on the root logger
        try:
            quantize_dynamic(smoothed, path, weight_type=WEIGHT_TYPES[weights], per_channel=True)
        finally:
            root.setLevel(level)


def tokenizer_folder(model_dir: Path) -> Path:
    """Where the Transformer module saved its tokenizer: the root in current sentence-transformers layouts."""
    modules_file = model_dir / "modules.json"
    if not modules_file.is_file():
        return model_dir
    return model_dir / json.loads(modules_file.read_text(encoding="utf-8"))[0].get("path", "")


def copy_tokenizer(model_dir: Path, folder: Path) -> None:
    source = tokenizer_folder(model_dir)
    if not (source / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{source}: no tokenizer.json, which the torch-free encoder needs")
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, folder / name)


def export_meta(model: SentenceTransformer, *, opset: int, calibration_size: int, weights: str = "quint8") -> dict:
    return {
        "max_seq_length": int(model.max_seq_length),
        "pooling": "mean",
        "normalize": True,
        "embedding_dimension": int(model.get_embedding_dimension()),  # truncate_dim when the model has one
        "input_names": list(input_names(model)),
        "output_name": OUTPUT_NAME,
        "opset": opset,
        "variants": {variant: f"{ONNX_SUBDIR}/{name}" for variant, name in VARIANT_FILES.items()},
        "int8": {
            "method": "dynamic",
            "weights": f"{WEIGHT_TYPES[weights].name} per channel",
            "smooth_alpha": SMOOTH_ALPHA,
            "calibration_sentences": calibration_size,
        },
    } | ({"truncate_dim": int(model.truncate_dim)} if model.truncate_dim else {}) | prompts_meta(model)


def prompts_meta(model: SentenceTransformer) -> dict:
    """The model's non-empty prompts, which :class:`OnnxEncoder` applies by name (none: no key, as before)."""
    prompts = {name: text for name, text in model.prompts.items() if text}
    return {"prompts": prompts} if prompts else {}


def size_mb(path: Path) -> float:
    return round(path.stat().st_size / 2**20, 2)


def export_onnx(
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    opset: int = 17,
    calibration_sentences: Iterable[str] | None = None,
    int8_weights: str = "quint8",
) -> dict:
    """Write ``out_dir`` whole (tokenizer, metadata, fp32 and int8 graphs) and return its paths and sizes.

    The folder is filled beside ``out_dir`` and renamed into place, so a failed export leaves the old one.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    calibration = list(calibration_sentences or DEFAULT_CALIBRATION)

    def fill(folder: Path) -> None:
        model = load_exportable(model_dir)
        (folder / ONNX_SUBDIR).mkdir()
        copy_tokenizer(model_dir, folder)
        meta = export_meta(model, opset=opset, calibration_size=len(calibration), weights=int8_weights)
        (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        log.info("export: fp32 ONNX graph of %s", model_dir)
        export_graph(model, folder / ONNX_SUBDIR / VARIANT_FILES["fp32"], opset=opset)
        log.info("export: int8 quantisation (SmoothQuant on %d calibration sentences)", len(calibration))
        quantize_int8(
            model, folder / ONNX_SUBDIR / VARIANT_FILES["int8"], opset=opset, calibration=calibration,
            weights=int8_weights,
        )

    write_atomic_dir(out_dir, fill)
    files = {variant: out_dir / ONNX_SUBDIR / name for variant, name in VARIANT_FILES.items()}
    return {
        "out_dir": str(out_dir),
        "meta": str(out_dir / META_FILE),
        "files": {variant: str(path) for variant, path in files.items()},
        "size_mb": {variant: size_mb(path) for variant, path in files.items()},
    }


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two (N, D) arrays."""
    dots = np.sum(a * b, axis=1)  # (N,)
    return dots / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)).clip(min=1e-12)


def timed_throughputs(encoders: dict[str, Callable[[], object]], count: int, *, passes: int = 7) -> dict:
    """Sentences/s per encoder: one warm-up each, then the median of ``passes`` timed passes.

    Passes are interleaved across encoders so background load on a shared CPU hits them all alike.
    """
    for encode in encoders.values():
        encode()
    seconds: dict[str, list[float]] = {name: [] for name in encoders}
    for _ in range(passes):
        for name, encode in encoders.items():
            start = time.perf_counter()
            encode()
            seconds[name].append(time.perf_counter() - start)
    return {name: round(count / statistics.median(times), 2) for name, times in seconds.items()}


def measure_parity(
    model_dir: str | Path, onnx_dir: str | Path, sentences: list[str], *, batch_size: int = 32
) -> dict:
    """Cosine of each ONNX variant to PyTorch per sentence (min, mean) and encode throughput vs PyTorch."""
    model = SentenceTransformer(str(model_dir), device="cpu").eval()

    def encode_torch() -> np.ndarray:
        return model.encode(
            sentences, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True
        )

    reference = encode_torch()  # (N, D)
    onnx_encoders = {variant: OnnxEncoder(onnx_dir, variant=variant) for variant in VARIANT_FILES}
    cosine = {}
    for variant, encoder in onnx_encoders.items():
        similarity = cosine_rows(encoder.encode(sentences, batch_size=batch_size), reference)  # (N,)
        cosine[variant] = {"min": float(similarity.min()), "mean": float(similarity.mean())}
    runners = {"torch": encode_torch} | {
        f"onnx_{variant}": (lambda e=encoder: e.encode(sentences, batch_size=batch_size))
        for variant, encoder in onnx_encoders.items()
    }
    throughput = timed_throughputs(runners, len(sentences))
    speedup = {
        name: round(value / throughput["torch"], 2) for name, value in throughput.items() if name != "torch"
    }
    return {
        "sentences": len(sentences),
        "batch_size": batch_size,
        "cosine": cosine,
        "throughput": throughput,
        "speedup_vs_torch": speedup,
    }


def run_export(settings: PairtuneConfig) -> dict:
    """ONNX fp32 + int8 export of the trained model, parity and speed on the test split, to reports/export.json.

    Fails (after writing the report) when any test sentence falls under the configured cosine floors.
    """
    columns, cfg = Columns.of(settings.data), settings.export
    check_truncate_dim(settings)
    splits = load_prepared(settings.paths.prepared)
    anchors, positives = columns.prompted(splits["train"])[:2]  # as the model reads them, prompts included
    calibration = anchors + positives
    files = export_onnx(settings.paths.final, settings.paths.onnx, opset=cfg.opset, calibration_sentences=calibration,
                        int8_weights=cfg.int8_weights)
    anchors, positives = columns.prompted(splits["test"])[:2]
    sentences = anchors + positives
    log.info("export: parity and speed against PyTorch on %d test sentences", len(sentences))
    parity = measure_parity(settings.paths.final, settings.paths.onnx, sentences, batch_size=cfg.batch_size)
    floors = {"fp32": cfg.min_cosine_fp32, "int8": cfg.min_cosine_int8}
    parity["passed"] = {v: parity["cosine"][v]["min"] >= floor for v, floor in floors.items()}
    report = {"size_mb": files["size_mb"], **parity}
    write_reports(report, Path(settings.paths.reports))
    failed = [v for v, ok in parity["passed"].items() if not ok]
    if failed:
        worst = parity["cosine"][failed[0]]["min"]
        raise ExportParityError(
            f"{settings.paths.onnx}: {failed[0]} cosine {worst:.5f} below export.min_cosine_{failed[0]}={floors[failed[0]]}"
        )
    return report


def _yaml(value: int | None) -> str:
    return "null" if value is None else str(value)


def check_truncate_dim(settings: PairtuneConfig) -> None:
    """``export.dim`` and the final model's saved ``truncate_dim`` must agree: the train stage writes the latter."""
    config = Path(settings.paths.final) / "config_sentence_transformers.json"
    saved = json.loads(config.read_text(encoding="utf-8")).get("truncate_dim") if config.is_file() else None
    if saved != settings.export.dim:
        raise ConfigError(
            f"config key 'export.dim': {_yaml(settings.export.dim)} but {config} has truncate_dim {_yaml(saved)}; "
            "rerun the train stage (it writes export.dim into the final model)"
        )


SPEED_KEYS = ("throughput", "speedup_vs_torch")


def write_reports(report: dict, folder: Path) -> None:
    """``export.json`` (a DVC metric, in git) holds what a rerun reproduces byte for byte: sizes and parity.

    Speed differs on every run, so it goes to ``export_speed.json`` beside it (neither in git nor a DVC
    output) and to MLflow.
    """
    stable = {k: v for k, v in report.items() if k not in SPEED_KEYS}
    stable["cosine"] = {v: {k: round(x, 6) for k, x in c.items()} for v, c in report["cosine"].items()}
    write_json_atomic(folder / "export.json", stable)
    write_json_atomic(folder / "export_speed.json", {k: report[k] for k in SPEED_KEYS} | {"sentences": report["sentences"]})


def flat_export_metrics(report: dict) -> dict[str, float]:
    """The export report as flat metric names for the tracker."""
    metrics = {f"export_cosine_min_{v}": c["min"] for v, c in report["cosine"].items()}
    metrics |= {f"export_speedup_{k}": v for k, v in report["speedup_vs_torch"].items()}
    metrics |= {f"export_throughput_{k}": v for k, v in report["throughput"].items()}
    return metrics
