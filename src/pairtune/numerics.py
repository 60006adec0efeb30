"""``numerics.mode``: the same bytes on any x86-64 CPU with AVX2, or the fastest kernels of this one.

Float results depend on which kernels run, and the libraries under torch choose kernels by CPU, each its own
way. Measured on torch 2.13's CPU build (a 4-step run's weights, AMD Zen 4 against an emulated Intel):

- MKL (torch's BLAS) picks its matmul kernels by CPU *vendor*: on AMD it ignores ``MKL_CBWR=AVX2`` and
  ``MKL_ENABLE_INSTRUCTIONS`` and runs its own "AUTO" branch. With a one-function shim
  (``mkl_serv_intel_cpu_true`` returning 1, preloaded) MKL treats the CPU as Intel, and ``MKL_CBWR=AVX2``
  then pins Intel's AVX2 branch on every x86-64 CPU with AVX2 (``MKL_CBWR=AVX2,STRICT`` alone leaves small
  shapes, any side of 9 or less, CPU-dependent; ``MKL_CBWR=COMPATIBLE`` pins without the shim but runs at
  0.45x).
- ATen's own kernels (softmax, log-softmax, layer norm, reductions) follow ``ATEN_CPU_CAPABILITY``, and
  oneDNN's (GELU) ``ONEDNN_MAX_CPU_ISA``: both pinned to AVX2.
- Thread counts change how reductions split (LayerNorm's backward, MKL's blocking): pinned to
  ``numerics.threads``.

Every one of these is read when a library loads, so :func:`apply` runs first thing in an entry point and, when
the process was not started with them, starts it again (``os.execv``, same pid, same arguments) with them set.
That covers ``dvc repro``'s stages and each ``torchrun`` child alike. Torch-free.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import TYPE_CHECKING

from pairtune.config import ConfigError

if TYPE_CHECKING:
    from pairtune.config import PairtuneConfig

log = logging.getLogger(__name__)

MARKER = "PAIRTUNE_NUMERICS"  # set in the started-again process: the mode it runs under
SHIM_SOURCE = "int mkl_serv_intel_cpu_true(void) { return 1; }\n"
SHIM_NAME = "libpairtune_mkl_vendor.so"


def resolve(mode: str) -> str:
    """``auto``: reproducible inside a DVC stage (``dvc repro``, ``dvc exp run``), fastest everywhere else."""
    if mode != "auto":
        return mode
    return "reproducible" if os.environ.get("DVC_STAGE") else "fastest"


def current() -> str:
    """The mode this process runs under: what :func:`apply` set, else ``fastest`` (nothing pinned)."""
    return os.environ.get(MARKER, "fastest").split(":")[0]


def pinned_environment(threads: int, shim: Path) -> dict[str, str]:
    """The variables that make every kernel choice CPU-independent (the module docstring says why each)."""
    preload = [str(shim), *(p for p in os.environ.get("LD_PRELOAD", "").split(":") if p and p != str(shim))]
    return {
        "LD_PRELOAD": ":".join(preload),
        "MKL_CBWR": "AVX2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "ATEN_CPU_CAPABILITY": "avx2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        MARKER: f"reproducible:{threads}",
    }


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def cpu_description() -> str:
    """``model name (vendor family f model m; the flags that choose kernels)``, for MLflow: never for the card."""
    try:
        blocks = Path("/proc/cpuinfo").read_text(encoding="utf-8").split("\n\n")[0]
    except OSError:
        return "unknown CPU"
    fields = dict(
        (key.strip(), value.strip()) for key, _, value in (line.partition(":") for line in blocks.splitlines())
    )
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
    flags = " ".join(f for f in wanted if f in fields.get("flags", "").split())
    return (f"{fields.get('model name', 'unknown CPU')} ({fields.get('vendor_id', '?')} family "
            f"{fields.get('cpu family', '?')} model {fields.get('model', '?')}; {flags or 'no AVX2'})")


def shim_path() -> Path:
    """Where the MKL vendor shim lives: beside the interpreter's environment, keyed by its source."""
    key = hashlib.sha256(SHIM_SOURCE.encode()).hexdigest()[:12]
    return Path(sys.prefix) / "lib" / "pairtune" / key / SHIM_NAME


def build_shim() -> Path:
    """Compile the shim once (``cc -shared``), written beside its target and renamed into place."""
    target = shim_path()
    if target.is_file():
        return target
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        compiler = shutil.which("cc") or shutil.which("gcc") or ""
    if not compiler:
        raise ConfigError(
            "config key 'numerics.mode': reproducible needs a C compiler once, to build MKL's vendor shim "
            "(apt-get install gcc), or use numerics.mode=fastest"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    # per-process source and output: torchrun's children may build at the same time; the last rename wins
    source, partial = (target.with_name(f".{SHIM_NAME}.{os.getpid()}.{suffix}") for suffix in ("c", "tmp"))
    source.write_text(SHIM_SOURCE)
    try:
        subprocess.run([compiler, "-shared", "-fPIC", "-O2", "-o", str(partial), str(source)], check=True,
                       capture_output=True, text=True)
        os.replace(partial, target)
    finally:
        source.unlink(missing_ok=True)
        partial.unlink(missing_ok=True)
    return target


def apply(settings: PairtuneConfig) -> str:
    """Put this process under ``numerics.mode``; returns the resolved mode.

    ``reproducible`` starts the process again with :func:`pinned_environment` unless it already runs under
    it; ``fastest`` changes nothing. Call before torch is imported: the libraries read these once.
    """
    numerics = settings.numerics
    mode = resolve(numerics.mode)
    if mode == "fastest":
        return mode
    if settings.train.num_threads not in (None, numerics.threads):
        raise ConfigError(f"config key 'train.num_threads': {settings.train.num_threads} differs from "
                          f"numerics.threads={numerics.threads}, which numerics.mode=reproducible pins")
    wanted = f"reproducible:{numerics.threads}"
    if os.environ.get(MARKER) == wanted:
        return mode
    if "avx2" not in cpu_flags():
        raise ConfigError("config key 'numerics.mode': reproducible needs an x86-64 CPU with AVX2; "
                          "use numerics.mode=fastest here")
    if "torch" in sys.modules:
        raise RuntimeError("numerics.apply must run before torch is imported (its libraries read the pins once)")
    environment = {**os.environ, **pinned_environment(numerics.threads, build_shim())}
    log.debug("numerics: starting again under %s", wanted)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environment)  # interpreter flags kept
    return mode  # not reached


def describe() -> str:
    """What this process's numerics are, in one line, for MLflow."""
    if current() != "reproducible":
        return "fastest: each library's own kernels for this CPU and thread count"
    threads = os.environ.get(MARKER, "").partition(":")[2]
    return (f"reproducible: MKL_CBWR=AVX2 (MKL vendor shim), ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2, "
            f"{threads} thread(s)")
