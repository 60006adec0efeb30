"""numerics.mode: reproducible runs give the same bytes whatever CPU the environment emulates; fastest ones differ.

One machine stands in for another by capping what its libraries may choose: ATen's kernels at AVX2, oneDNN's
at AVX2, MKL told it runs on an Intel CPU (the vendor shim preloaded, as on a Xeon) limited to AVX2, and one
thread instead of two.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pairtune import numerics

from .conftest import ROOT


def test_auto_is_reproducible_in_a_dvc_stage_and_fastest_on_the_command_line(monkeypatch):
    monkeypatch.delenv("DVC_STAGE", raising=False)
    assert numerics.resolve("auto") == "fastest" and numerics.resolve("reproducible") == "reproducible"
    monkeypatch.setenv("DVC_STAGE", "train")
    assert numerics.resolve("auto") == "reproducible" and numerics.resolve("fastest") == "fastest"


def test_the_shim_builds_once_and_tells_mkl_it_runs_on_intel():
    shim = numerics.build_shim()
    assert shim == numerics.build_shim() and shim.is_file()
    assert ctypes.CDLL(str(shim)).mkl_serv_intel_cpu_true() == 1
    pinned = numerics.pinned_environment(2, shim)
    assert pinned["LD_PRELOAD"].split(":")[0] == str(shim)
    assert {k: pinned[k] for k in ("MKL_CBWR", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "OMP_NUM_THREADS")} == {
        "MKL_CBWR": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "2"}


def test_processes_that_build_the_shim_at_once_all_get_it_and_leave_no_partial_files(tmp_path):
    """torchrun's children may each find no shim and build it at the same moment."""
    target = tmp_path / "shim" / numerics.SHIM_NAME
    code = ("import pathlib, sys; from pairtune import numerics; "
            f"numerics.shim_path = lambda: pathlib.Path({str(target)!r}); print(numerics.build_shim())")
    builders = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(4)]
    assert [b.communicate(timeout=120)[0].strip() for b in builders] == [str(target)] * 4
    assert all(b.returncode == 0 for b in builders)
    assert ctypes.CDLL(str(target)).mkl_serv_intel_cpu_true() == 1
    assert [p.name for p in target.parent.iterdir()] == [numerics.SHIM_NAME]


def capped_environment() -> dict[str, str]:
    """This machine made to look like an Intel AVX2 CPU running one thread."""
    return {
        "LD_PRELOAD": str(numerics.build_shim()),
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "ATEN_CPU_CAPABILITY": "avx2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "OMP_NUM_THREADS": "1",
    }


def digests(folder: Path) -> dict[str, str]:
    files = ["final/model.safetensors", "reports/plots/train_loss.csv", "reports/plots/eval_metrics.csv"]
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in files}


def train_short(tmp_path: Path, prepared: Path, name: str, mode: str, environment: dict[str, str]) -> dict[str, str]:
    out = tmp_path / name
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **environment}
    for key in ("PAIRTUNE_NUMERICS", "DVC_STAGE"):
        env.pop(key, None)
    command = [
        sys.executable, "pipelines/train.py", f"numerics.mode={mode}", f"paths.prepared={prepared}",
        f"paths.model={out}/model", f"paths.final={out}/final", f"paths.reports={out}/reports",
        f"hydra.run.dir={out}/hydra", "train.max_steps=3", "train.epochs=1", "train.save_checkpoints=false",
        "tracking.enabled=false", "guard.enabled=false",
    ]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    card = (out / "final/README.md").read_text()
    assert f"- `numerics`: {mode}" in card
    return digests(out)


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "same"), [("reproducible", True), ("fastest", False)])
def test_capped_and_uncapped_runs_agree_byte_for_byte_only_in_reproducible_mode(tmp_path, prepared_bundled, mode, same):
    here = train_short(tmp_path, prepared_bundled, "here", mode, {})
    elsewhere = train_short(tmp_path, prepared_bundled, "elsewhere", mode, capped_environment())
    if same:
        assert here == elsewhere
    else:  # the weights follow the kernels the environment allows
        assert here["final/model.safetensors"] != elsewhere["final/model.safetensors"]


def test_reproducible_refuses_a_thread_count_of_its_own(make_settings):
    from pairtune.config import ConfigError

    settings = make_settings("numerics.mode=reproducible", "train.num_threads=1")
    with pytest.raises(ConfigError, match="'train.num_threads': 1 differs from numerics.threads=2"):
        numerics.apply(settings)


def test_a_run_records_its_numerics_and_cpu_but_the_card_only_the_mode():
    description = numerics.cpu_description()
    assert "family" in description and "avx2" in description
    assert numerics.describe().startswith(numerics.current())
