"""The bench's own arithmetic and plumbing, then smoke runs of its scripts on a couple of steps."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import ROOT

BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))

import flops  # noqa: E402

ZEN4 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC 9R14
physical id\t: 0
core id\t\t: 0
cpu MHz\t\t: 2596.000
flags\t\t: fpu sse avx fma avx2 avx512f avx512bw avx512_bf16 avx512_vnni

processor\t: 1
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC 9R14
physical id\t: 0
core id\t\t: 1
cpu MHz\t\t: 2596.000
flags\t\t: fpu sse avx fma avx2 avx512f avx512bw avx512_bf16 avx512_vnni
"""


def cpu(vendor: str, family: int, flags: str, model: int = 1) -> flops.CpuInfo:
    return flops.CpuInfo(vendor, family, model, "test CPU", frozenset(flags.split()), cores=1)


def test_zen4_runs_avx512_on_256_bit_pipes_and_doubles_with_bf16():
    """Given Zen 4's cpuinfo, the fp32 peak is 2 x 256-bit FMA pipes and VDPBF16PS doubles it."""
    info = flops.parse_cpuinfo(ZEN4, allowed={0, 1})
    fma, reason = flops.fma_per_cycle(info)
    factor, _ = flops.bf16_factor(info, fma)
    assert (info.cores, fma, factor) == (2, 16, 2.0)
    assert "Zen 4" in reason and "two 256-bit halves" in reason
    peak = flops.CpuPeak(info, fma, reason, factor, "", 2596.0, "test")
    assert peak.flops("fp32") == pytest.approx(2 * 16 * 2 * 2596e6)
    assert peak.flops("bf16", threads=1) == pytest.approx(16 * 2 * 2596e6 * 2)


@pytest.mark.parametrize(
    ("info", "fma", "factor"),
    [
        (cpu("GenuineIntel", 6, "fma avx2 avx512f amx_bf16 avx512_bf16"), 32, 16.0),  # Sapphire Rapids: AMX
        (cpu("GenuineIntel", 6, "fma avx2"), 16, 1.0),  # AVX2 only: no bf16 arithmetic
        (cpu("AuthenticAMD", 25, "fma avx2"), 16, 1.0),  # Zen 3
        (cpu("AuthenticAMD", 26, "fma avx2 avx512f avx512_bf16"), 32, 2.0),  # Zen 5: full 512-bit pipes
        (cpu("AuthenticAMD", 23, "fma avx2", model=0x01), 8, 1.0),  # Zen 1: 128-bit pipes
        (cpu("GenuineIntel", 6, "sse sse2"), 4, 1.0),  # no FMA at all
    ],
)
def test_the_peak_follows_vendor_family_and_flags(info, fma, factor):
    got, _ = flops.fma_per_cycle(info)
    assert got == fma
    assert flops.bf16_factor(info, got)[0] == factor


def test_amx_counts_512_bf16_multiply_adds_per_cycle_and_says_so():
    """TDPBF16PS: a 16 x 16 x 32 tile product (8192 multiply-adds) every 16 cycles."""
    xeon = cpu("GenuineIntel", 6, "fma avx2 avx512f avx512_bf16 amx_bf16 amx_tile")
    fma, _ = flops.fma_per_cycle(xeon)
    factor, reason = flops.bf16_factor(xeon, fma)
    peak = flops.CpuPeak(xeon, fma, "", factor, reason, 2000.0, "test")
    assert peak.flops("bf16") == pytest.approx(512 * 2 * 2000e6)  # 1024 FLOPs per cycle per core
    assert "512 per cycle per core" in reason and "amx_bf16" in reason


def test_physical_cores_not_threads_are_counted():
    twins = ZEN4.replace("core id\t\t: 1", "core id\t\t: 0")  # two hyperthreads of one core
    assert flops.parse_cpuinfo(twins, allowed={0, 1}).cores == 1
    assert flops.parse_cpuinfo(ZEN4, allowed={1}).cores == 1


def test_padding_ratio_counts_each_column_padded_to_its_batch_longest():
    """Given one batch of two rows per column, the first column pads 1 + 3 to 3 + 3; the second needs none."""
    assert flops.padding_ratio([[1, 3], [2, 2]], batch_size=2, epochs=3) == pytest.approx(10 / 8)
    assert flops.padding_ratio([[1, 3, 2, 2]], batch_size=1, epochs=3) == 1.0


def test_the_trainer_gets_the_evaluator_pairtune_builds(prepared_bundled):
    import pandas as pd
    from run_trainer import build_ir_evaluator

    from pairtune.data.pairs import Columns
    from pairtune.outputs.evaluation import build_evaluator

    frame = pd.read_parquet(prepared_bundled / "eval.parquet")
    ours, theirs = (
        build_ir_evaluator(frame),
        build_evaluator(frame, Columns("sentence_0", "sentence_1"), name="eval"),
    )
    for attribute in (
        "queries_ids",
        "queries",
        "corpus_ids",
        "corpus",
        "relevant_docs",
        "name",
        "batch_size",
        "main_score_function",
        "write_csv",
    ):
        assert getattr(ours, attribute) == getattr(theirs, attribute), attribute


def test_the_step_timer_counts_from_the_batch_fetch_to_the_step_end():
    from run_trainer import StepTimer

    timer = StepTimer()
    timer.on_step_end(None, None, None)  # no fetch marked (e.g. a resumed step): nothing counted
    timer.begin()
    time.sleep(0.05)
    timer.on_step_end(None, None, None)
    assert timer.steps == 1 and 0.05 <= timer.seconds < 0.5


def test_the_listener_forwards_everything_and_times_evaluations():
    from run_pairtune import Listener

    from pairtune.core import NullObserver

    calls = []

    class Recorder(NullObserver):
        run_id = "r1"

        def on_step(self, step, metrics):
            calls.append(("step", step))

        def on_evaluate(self, step, epoch, metrics):
            calls.append(("evaluate", step))

    listener = Listener(Recorder())
    listener.on_train_start({})
    time.sleep(0.02)
    listener.on_evaluate(0, 0.0, {"cosine_ndcg@10": 0.7})
    listener.on_step(1, {})
    listener.on_train_end("result")
    assert calls == [("evaluate", 0), ("step", 1)] and listener.run_id == "r1"
    assert len(listener.eval_seconds) == 1 and listener.eval_seconds[0] >= 0.02
    assert listener.result == "result" and {"train_start", "model_saved"} <= set(listener.marks)


def test_the_phases_of_a_job_add_up_to_its_whole():
    from compare import Job

    marks = {"script_start": 100.5, "train_start": 106.0, "model_saved": 160.0}
    result = {"marks": marks, "eval_seconds": [1.0, 1.5], "step_seconds": 40.0, "save_seconds": 0.5}
    job = Job(
        "pairtune", result, spawned=100.0, exited=161.0, cpu_seconds=60.0, peak_rss_mb=1000.0, n_train=263
    )
    phases = job.phases()
    assert sum(v for k, v in phases.items() if k != "after_save") == pytest.approx(job.value("to_model"))
    assert (phases["interpreter"], phases["rest"], phases["save"]) == pytest.approx((0.5, 11.0, 0.5))


def run_script(*argv: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


@pytest.mark.slow
def test_compare_runs_every_section_end_to_end():
    done = run_script(
        "bench/compare.py",
        "--pairs",
        "1",
        "--epochs",
        "1",
        "--default-epochs",
        "1",
        "--max-steps",
        "1",
        "--skip",
        "fixed",
        "--skip",
        "compile",
    )
    out = done.stdout
    for heading in (
        "fp32 peak",
        "bf16 peak",
        "1. Whole job, trainer vs pairtune",
        "whole job: start -> model on disk, s  [headline]",
        "training steps only, s",
        "where the whole job's time goes",
        "final eval NDCG@10",
        "targets: whole job >= 1.6x",
        "2a. Tracking off vs on",
        "observer in the loop",
        "2b. Precision",
        "% of peak / of matmul rate",
    ):
        assert heading in out, heading
    assert "steps per run [1]" in out
    table = out[out.index("2b. Precision") :]
    assert all(name in table.splitlines()[1] for name in ("fp32", "reproducible", "guard"))  # the columns


@pytest.mark.slow
def test_fixed_costs_print_imports_answers_and_pieces(prepared_bundled):
    out = run_script("bench/fixed_costs.py", "--prepared", str(prepared_bundled), "--repeats", "1").stdout
    for heading in (
        "bare interpreter start",
        "import",
        "sentence_transformers",
        "pairtune --help",
        "config error",
        "model load",
        "model save",
        "pairtune's card",
    ):
        assert heading in out, heading


@pytest.mark.slow
def test_scale_phases_and_the_compile_probe_run_on_the_bundled_split(prepared_bundled, tmp_path):
    phases = json.loads(
        run_script("bench/scale.py", "--phases", str(prepared_bundled), str(tmp_path), "2")
        .stdout.strip()
        .splitlines()[-1]
    )
    assert phases["rows"] == 263 and phases["steps_per_second"] > 0 and phases["first_step"] > 0
    out = run_script(
        "bench/compile_probe.py",
        "--prepared",
        str(prepared_bundled),
        "--steps",
        "1",
        "--variant",
        "eager fp32",
    ).stdout
    assert "eager fp32" in out and "median step" in out


def test_bench_scripts_keep_out_of_machine_specific_paths():
    for path in sorted(Path(BENCH).glob("*.py")):
        text = path.read_text()
        assert "/work/" not in text and "/root/" not in text and "/home/" not in text, path.name


@pytest.mark.slow
def test_the_users_scale_bench_runs_both_tools_in_both_modes_and_says_the_verdict():
    out = run_script(
        "bench/users_scale.py", "--rows", "160", "--eval-size", "40", "--test-size", "40", "--repeats", "1",
        "--batch-sizes", "16", "--max-steps", "2",
    ).stdout
    for mode in ("fp32", "bf16"):
        table = out[out.index(f"{mode}, batch 16, 1 epoch of 160 pairs") :]
        header, *rows = table.splitlines()[1:9]
        assert "trainer" in header and "pairtune" in header and "pairtune / trainer" in header
        assert [row.split("  ")[1].strip() for row in rows[:3]] == [
            "steps/s (steps only)", "pairs/s (steps only)", "tokens/s (steps only, real tokens)"]
        assert f"  {mode} batch 16: steps/s " in out
    assert "target: pairtune >= 2x the trainer's steps/s" in out


@pytest.mark.slow
def test_the_step_profile_accounts_for_the_whole_step_and_every_matmul(tmp_path):
    """The classes add up to the profiled step, and the matmul FLOPs the profiler counted are the model's."""
    png, figures, store = tmp_path / "step.png", tmp_path / "step.json", tmp_path / "bench.db"
    run_script(
        "bench/profile_step.py", "--modes", "fp32", "--rows", "300", "--warmup", "3", "--active", "2",
        "--png", str(png), "--json", str(figures), "--tracking-uri", f"sqlite:///{store}",
    )
    result = json.loads(figures.read_text())["results"][0]
    assert result["steps"] == 2 and result["mode"] == "fp32"
    assert sum(result["ms"].values()) == pytest.approx(result["step_ms"], rel=1e-6)
    assert all(result["ms"][kind] > 0 for kind in ("matmul", "attention", "elementwise", "optimizer", "loss", "data"))
    assert result["bound_ms"]["matmul"] > 0 and result["bound_ms"]["optimizer"] > 0
    # dense layers on real tokens only (the unpadded forward): 6 x non-embedding parameters x real tokens, plus
    # attention, per pair (bench/flops.py's model); the profiler's count of every classified product must match it
    from synth import generate

    from pairtune.model.modeling import load_model

    model = load_model("sentence-transformers/all-MiniLM-L6-v2", max_seq_length=256)
    cost = flops.pair_cost(model, generate(300), ("sentence_0", "sentence_1"), max_length=256)
    counted = sum(result["flops"].get(kind, 0.0) for kind in ("matmul", "attention", "loss"))
    assert counted == pytest.approx(cost.flops_per_pair * 32, rel=0.15)
    assert png.stat().st_size > 10_000
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{store}")
    run = mlflow.search_runs(experiment_names=["pairtune-bench"], output_format="list")[0]
    assert run.data.metrics["fp32_matmul_ms"] == pytest.approx(result["ms"]["matmul"])
    assert {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)} == {"step.png", "step.json"}
