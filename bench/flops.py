"""Rough arithmetic for "what fraction of the CPU's peak did training reach", the peak found at run time.

Per pair, each text of L real (unpadded) tokens costs about 3 (forward + backward) x 2 x N_nonembedding x L
FLOPs in its dense layers, plus 3 x 4 x layers x hidden x L^2 in attention (QK^T and AV). Padding, the
embedding lookup, the pooler, the loss and the optimizer are left out, so this is the *useful* rate.

The peak is cores x fp32 multiply-adds per cycle per core x 2 FLOPs x clock. Multiply-adds per cycle come
from /proc/cpuinfo: the vector width from the flags (avx512f: 512 bits = 16 fp32 lanes, avx2: 256, else 128)
and the FMA pipes and their width from the vendor and family, because the flags do not say how wide the
pipes are: Zen 4 (AMD family 25 with avx512f) decodes AVX-512 but runs each 512-bit FMA as two 256-bit
halves on its two 256-bit pipes, so its fp32 peak equals two 256-bit FMA units. The bf16 peak follows the
flags: avx512_bf16's VDPBF16PS does two bf16 multiply-adds per fp32 lane in one instruction (2x fp32);
amx_bf16's TDPBF16PS does 16 x 16 x 32 bf16 multiply-adds in 16 cycles, 512 per cycle per core (1024 FLOPs);
without either, bf16 math runs at fp32 speed.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

FLOPS_PER_FMA = 2
AMX_BF16_FMA_PER_CYCLE = 16 * 16 * 32 // 16  # one TDPBF16PS tile product: 8192 multiply-adds in 16 cycles
PASSES = 3  # forward + backward (about twice the forward)


@dataclass
class PairCost:
    nonembedding_params: int
    tokens_per_pair: float
    dense_flops: float  # per pair
    attention_flops: float  # per pair
    padded_ratio: float = 1.0  # tokens a padded batch feeds the dense layers / real tokens (padding_ratio)

    @property
    def flops_per_pair(self) -> float:
        return self.dense_flops + self.attention_flops


@dataclass
class CpuInfo:
    """What /proc/cpuinfo says about the first CPU this process may run on."""

    vendor: str
    family: int
    model: int
    name: str
    flags: frozenset[str]
    cores: int  # physical cores among the CPUs this process may use


@dataclass
class CpuPeak:
    cpu: CpuInfo
    fma_per_cycle: int  # fp32 multiply-adds per cycle per core
    fma_reason: str
    bf16_factor: float  # bf16 peak / fp32 peak
    bf16_reason: str
    mhz: float
    clock_source: str

    def flops(self, precision: str = "fp32", threads: int | None = None) -> float:
        """Peak FLOP/s of the cores a run with ``threads`` torch threads can use."""
        cores = min(self.cpu.cores, threads) if threads else self.cpu.cores
        fp32 = cores * self.fma_per_cycle * FLOPS_PER_FMA * self.mhz * 1e6
        return fp32 * (self.bf16_factor if precision == "bf16" else 1.0)

    def describe(self, threads: int | None = None) -> list[str]:
        """How each peak was derived, for the bench's header."""
        cores = min(self.cpu.cores, threads) if threads else self.cpu.cores
        return [
            f"CPU                  {self.cpu.name} ({self.cpu.vendor} family {self.cpu.family} model "
            f"{self.cpu.model}), {self.cpu.cores} core(s) usable, {threads or '?'} torch thread(s)",
            f"fp32 peak            {self.flops('fp32', threads) / 1e9:.1f} GFLOP/s = {cores} core(s) x "
            f"{self.fma_per_cycle} fp32 FMA/cycle x 2 FLOPs x {self.mhz:.0f} MHz",
            f"  FMA/cycle          {self.fma_reason}",
            f"  clock              {self.clock_source}",
            f"bf16 peak            {self.flops('bf16', threads) / 1e9:.1f} GFLOP/s = {self.bf16_factor:g} x fp32 peak: "
            f"{self.bf16_reason}",
        ]


def nonembedding_params(transformer) -> int:
    """Parameters a token's forward pass multiplies through: all but the embedding tables and the pooler."""
    return sum(
        p.numel()
        for name, p in transformer.named_parameters()
        if not name.startswith(("embeddings.", "pooler."))
    )


def pair_cost(model, train: pd.DataFrame, columns, *, max_length: int) -> PairCost:
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
    ratio = padding_ratio(lengths, batch_size=32)
    per_pair = list(zip(*lengths, strict=True))
    tokens = sum(sum(row) for row in per_pair) / len(per_pair)
    squares = sum(sum(n * n for n in row) for row in per_pair) / len(per_pair)
    return PairCost(
        nonembedding_params=params,
        tokens_per_pair=tokens,
        dense_flops=PASSES * 2 * params * tokens,
        attention_flops=PASSES * 4 * layers * hidden * squares,
        padded_ratio=ratio,
    )


def padding_ratio(lengths: list[list[int]], *, batch_size: int, epochs: int = 200, seed: int = 0) -> float:
    """Tokens the dense layers see when each column is padded to its batch's longest text, over real tokens.

    Random batches of ``batch_size`` rows, averaged over ``epochs`` shuffles: the trainer's padded forward
    does this much more dense work per pair than an unpadded one, which bounds how much faster the unpadded
    steps can be at equal efficiency.
    """
    import numpy as np

    columns = [np.asarray(column) for column in lengths]
    rng, real, padded = np.random.default_rng(seed), 0, 0
    for _ in range(epochs):
        order = rng.permutation(len(columns[0]))
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            for column in columns:
                real += int(column[rows].sum())
                padded += int(column[rows].max()) * len(rows)
    return padded / real


def parse_cpuinfo(text: str, allowed: set[int] | None = None) -> CpuInfo:
    """Vendor, family, model, flags of the first allowed CPU; physical cores among the allowed ones."""
    blocks = [b for b in text.strip().split("\n\n") if b.strip()]
    fields = [dict(_pairs(b)) for b in blocks]
    usable = (
        [f for f in fields if allowed is None or int(f.get("processor", -1)) in allowed] or fields or [{}]
    )
    first = usable[0]
    cores = {(f.get("physical id", "0"), f.get("core id", f.get("processor"))) for f in usable}
    return CpuInfo(
        vendor=first.get("vendor_id", "unknown"),
        family=int(first.get("cpu family", "0") or 0),
        model=int(first.get("model", "0") or 0),
        name=first.get("model name", "unknown CPU"),
        flags=frozenset(first.get("flags", "").split()),
        cores=max(1, len(cores)) if fields else max(1, len(allowed or ()) or 1),
    )


def _pairs(block: str):
    for line in block.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            yield key.strip(), value.strip()


def fma_per_cycle(cpu: CpuInfo) -> tuple[int, str]:
    """fp32 multiply-adds per cycle per core, and how that was decided."""
    flags = cpu.flags
    width = 512 if "avx512f" in flags else 256 if "avx2" in flags or "avx" in flags else 128
    if cpu.vendor == "AuthenticAMD" and cpu.family == 25:
        if "avx512f" in flags:
            return 16, (
                "AMD family 25 with avx512f = Zen 4: 2 FMA pipes x 256 bits; each 512-bit FMA runs as "
                "two 256-bit halves, so 2 x 8 fp32 lanes"
            )
        return 16, "AMD family 25 = Zen 3: 2 FMA pipes x 256 bits = 2 x 8 fp32 lanes"
    if cpu.vendor == "AuthenticAMD" and cpu.family == 26:
        return 32, "AMD family 26 = Zen 5: 2 FMA pipes x 512 bits = 2 x 16 fp32 lanes (server/desktop parts)"
    if cpu.vendor == "AuthenticAMD" and cpu.family == 23:
        if cpu.model >= 0x30:
            return 16, "AMD family 23 model >= 0x30 = Zen 2: 2 FMA pipes x 256 bits = 2 x 8 fp32 lanes"
        return 8, "AMD family 23 model < 0x30 = Zen/Zen+: 2 FMA pipes x 128 bits = 2 x 4 fp32 lanes"
    lanes = width // 32
    if "fma" not in flags:
        return lanes, f"no FMA: one {width}-bit multiply and one add per cycle, counted as {lanes} FMA"
    note = " (Xeon Gold/Platinum and later; some parts have one)" if width == 512 else ""
    return (
        2 * lanes,
        f"{cpu.vendor}, {width}-bit vectors (flags): 2 FMA units x {lanes} fp32 lanes assumed{note}",
    )


def bf16_factor(cpu: CpuInfo, fma: int) -> tuple[float, str]:
    """bf16 peak over fp32 peak, from the bf16 instructions the flags announce."""
    if "amx_bf16" in cpu.flags:
        return AMX_BF16_FMA_PER_CYCLE / fma, (
            f"amx_bf16: TDPBF16PS does 16 x 16 x 32 bf16 multiply-adds in 16 cycles = {AMX_BF16_FMA_PER_CYCLE} "
            f"per cycle per core, over {fma} fp32 FMA/cycle"
        )
    if "avx512_bf16" in cpu.flags:
        return 2.0, (
            "avx512_bf16: VDPBF16PS does 2 bf16 multiply-adds per fp32 lane per instruction, at the "
            "rate of an fp32 FMA"
        )
    return 1.0, "no avx512_bf16 or amx_bf16: bf16 math is converted to fp32 and runs at fp32 speed at best"


def lscpu_max_mhz() -> float | None:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    match = re.search(r"^CPU max MHz:\s*([\d.]+)", text, flags=re.MULTILINE)
    return float(match.group(1)) if match else None


def clock_mhz(cpuinfo_text: str) -> tuple[float, str]:
    """The highest clock the system admits to, and where it came from."""
    mhz = lscpu_max_mhz()
    if mhz:
        return mhz, "lscpu 'CPU max MHz'"
    sysfs = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    if sysfs.is_file():
        return int(sysfs.read_text().strip()) / 1000, str(sysfs)
    match = re.search(r"^cpu MHz\s*:\s*([\d.]+)", cpuinfo_text, flags=re.MULTILINE)
    if match:
        return float(match.group(1)), (
            "/proc/cpuinfo 'cpu MHz' (no max clock from lscpu or cpufreq, as in most "
            "VMs: a boost clock above it makes these % read high)"
        )
    return float("nan"), "unknown (no clock found)"


def cpu_peak() -> CpuPeak:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        text = ""
    cpu = parse_cpuinfo(text, set(os.sched_getaffinity(0)))
    fma, fma_reason = fma_per_cycle(cpu)
    factor, bf16_reason = bf16_factor(cpu, fma)
    mhz, source = clock_mhz(text)
    return CpuPeak(cpu, fma, fma_reason, factor, bf16_reason, mhz, source)


def gemm_ceiling(threads: int | None = None, size: int = 2048, repeats: int = 5) -> dict[str, float]:
    """FLOP/s of a large square matmul, fp32 and bf16, best of ``repeats``: what the cores deliver right now.

    A check on the nominal peak: a rate above it means the cores run faster than the reported clock (boost),
    and training's share of this rate is its share of what the machine can do on dense math today.
    """
    import torch

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        rates = {}
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
            a @ b  # warm-up: oneDNN/MKL pick their kernels on the first call
            best = min(_timed_matmul(a, b) for _ in range(repeats))
            rates[name] = 2 * size**3 / best
        return rates
    finally:
        torch.set_num_threads(previous)


def _timed_matmul(a, b) -> float:
    import time

    started = time.perf_counter()
    a @ b
    return time.perf_counter() - started
