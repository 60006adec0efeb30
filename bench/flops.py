"""Rough arithmetic for "what fraction of the CPU's fp32 peak did training reach".

Per pair, each text of L real (unpadded) tokens costs about 3 (forward + backward) x 2 x N_nonembedding x L
FLOPs in its dense layers, plus 3 x 4 x layers x hidden x L^2 in attention (QK^T and AV). Padding, the
embedding lookup, the pooler and the loss are left out, so this is the *useful* rate. The peak is
cores x 2 FMA units x 8 fp32 lanes (AVX2) x 2 FLOPs x clock.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass

import pandas as pd

FMA_UNITS = 2
FP32_LANES = 8  # one 256-bit AVX2 register
FLOPS_PER_FMA = 2
PASSES = 3  # forward + backward (about twice the forward)


@dataclass
class PairCost:
    nonembedding_params: int
    tokens_per_pair: float
    dense_flops: float  # per pair
    attention_flops: float  # per pair

    @property
    def flops_per_pair(self) -> float:
        return self.dense_flops + self.attention_flops


@dataclass
class CpuPeak:
    cores: int
    mhz: float
    clock_source: str
    avx512: bool

    @property
    def flops(self) -> float:
        return self.cores * FMA_UNITS * FP32_LANES * FLOPS_PER_FMA * self.mhz * 1e6


def nonembedding_params(transformer) -> int:
    """Parameters a token's forward pass multiplies through: all but the embedding tables and the pooler."""
    return sum(
        p.numel()
        for name, p in transformer.named_parameters()
        if not name.startswith(("embeddings.", "pooler."))
    )


def pair_cost(model, train: pd.DataFrame, columns: list[str], *, max_length: int) -> PairCost:
    """Mean FLOPs of one training pair over ``train``, counting each text's real tokens (special ones included)."""
    transformer = model[0].auto_model
    layers, hidden = transformer.config.num_hidden_layers, transformer.config.hidden_size
    params = nonembedding_params(transformer)
    lengths = [
        [
            len(ids)
            for ids in model.tokenizer(train[c].tolist(), truncation=True, max_length=max_length)["input_ids"]
        ]
        for c in columns
    ]
    per_pair = list(zip(*lengths, strict=True))
    tokens = sum(sum(row) for row in per_pair) / len(per_pair)
    squares = sum(sum(n * n for n in row) for row in per_pair) / len(per_pair)
    return PairCost(
        nonembedding_params=params,
        tokens_per_pair=tokens,
        dense_flops=PASSES * 2 * params * tokens,
        attention_flops=PASSES * 4 * layers * hidden * squares,
    )


def lscpu_max_mhz() -> float | None:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    match = re.search(r"^CPU max MHz:\s*([\d.]+)", text, flags=re.MULTILINE)
    return float(match.group(1)) if match else None


def cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            return handle.read()
    except OSError:
        return ""


def cpu_peak() -> CpuPeak:
    """The clock is lscpu's "CPU max MHz" when it has one, else the first "cpu MHz" of /proc/cpuinfo."""
    text = cpuinfo()
    cores = len(os.sched_getaffinity(0))
    avx512 = bool(re.search(r"\bavx512f\b", text))
    mhz = lscpu_max_mhz()
    if mhz:
        return CpuPeak(cores, mhz, "lscpu 'CPU max MHz'", avx512)
    match = re.search(r"^cpu MHz\s*:\s*([\d.]+)", text, flags=re.MULTILINE)
    if match:
        return CpuPeak(cores, float(match.group(1)), "/proc/cpuinfo 'cpu MHz'", avx512)
    return CpuPeak(cores, float("nan"), "unknown (no clock found)", avx512)
