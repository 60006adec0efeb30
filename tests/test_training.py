from __future__ import annotations

import re

import pytest

from pairtune.config import TrainConfig
from pairtune.data.sampling import GlobalBatchSampler
from pairtune.train.training import Schedule, train


def test_default_schedule_is_9_steps_per_epoch_and_90_in_all(make_settings, prepared_bundled):
    """The seed card's schedule, from the real sampler over the real prepared train split."""
    import pandas as pd

    settings = make_settings()
    rows = len(pd.read_parquet(prepared_bundled / "train.parquet"))
    sampler = GlobalBatchSampler(rows, settings.train.batch_size, seed=settings.train.seed)
    schedule = Schedule.for_sampler(sampler, settings.train)
    assert rows == 263
    assert (schedule.epoch_steps, schedule.total_steps) == ([9] * 10, 90)


@pytest.mark.parametrize(
    ("accumulation", "max_steps", "per_epoch", "total"), [(2, -1, 5, 50), (1, 20, 9, 20), (3, -1, 3, 30)]
)
def test_schedule_follows_accumulation_and_max_steps(accumulation, max_steps, per_epoch, total):
    schedule = Schedule([9] * TrainConfig().epochs, accumulation, max_steps)
    assert (schedule.epoch_steps[0], schedule.total_steps) == (per_epoch, total)


@pytest.mark.slow
def test_short_run_writes_model_and_card(make_settings, prepared_bundled):
    settings = make_settings(f"paths.prepared={prepared_bundled}", "train.max_steps=2", "train.epochs=1")
    result = train(settings)
    assert result.global_step == 2 and len(result.step_losses) == 2
    card = (result.model_dir / "README.md").read_text()
    assert "dataset_size:263" in card and "`per_device_train_batch_size`: 32" in card
    assert "`learning_rate`: 5e-05" in card and "`seed`: 42" in card
    logs = card.split("### Training Logs")[1].split("###")[0]
    assert re.search(r"^\| 0\.0 \| 0 \| - \| [0-9.]+ ", logs, re.M), logs
    assert re.search(r"^\| 0\.2222 \| 2 \| [0-9.]+ \|", logs, re.M), logs
    assert (result.model_dir / "model.safetensors").is_file()
    assert not list(result.model_dir.rglob("*.bin")) and not list(result.model_dir.rglob("*.pt"))  # safetensors only
    from sentence_transformers import SentenceTransformer

    reloaded = SentenceTransformer(str(result.model_dir), device="cpu")
    assert reloaded.encode(["Ada see sh"]).shape == (1, 384)


@pytest.mark.slow
def test_same_seed_gives_identical_losses(make_settings, prepared_bundled, tmp_path):
    runs = []
    for name in ("a", "b"):
        settings = make_settings(
            f"paths.prepared={prepared_bundled}", f"paths.model={tmp_path}/{name}", "train.max_steps=3",
            "train.epochs=1", "train.eval_on_start=false", "train.save_checkpoints=false",
        )
        runs.append(train(settings).step_losses)
    assert runs[0] == runs[1] and len(runs[0]) == 3


def test_mixed_precision_takes_only_known_values():
    from pairtune.config import ConfigError

    with pytest.raises(ConfigError, match="config key 'train.mixed_precision': no\\|fp16\\|bf16"):
        TrainConfig(mixed_precision="fp8")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the refusal is for CPUs only")
def test_fp16_on_a_cpu_is_refused_rather_than_quietly_trained_in_fp32():
    from pairtune.config import ConfigError
    from pairtune.train.training import build_accelerator

    with pytest.raises(ConfigError, match="fp16 needs a GPU; on a CPU use bf16 or no"):
        build_accelerator(TrainConfig(mixed_precision="fp16"))


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks CPU autocast")
def test_bf16_on_a_cpu_autocasts_after_an_fp32_accelerator_in_the_same_process():
    """A sweep's next job (or a later test) may ask for bf16 once an fp32 run has set Accelerate's state."""
    import torch

    from pairtune.train.training import build_accelerator

    build_accelerator(TrainConfig(mixed_precision="no")).end_training()
    accelerator = build_accelerator(TrainConfig(mixed_precision="bf16"))
    try:
        with accelerator.autocast():
            out = torch.nn.functional.linear(torch.randn(2, 8), torch.randn(4, 8))
        assert (accelerator.mixed_precision, out.dtype) == ("bf16", torch.bfloat16)
    finally:
        accelerator.end_training()
    fp32 = build_accelerator(TrainConfig(mixed_precision="no"))
    assert fp32.mixed_precision == "no" and not fp32.native_amp


@pytest.mark.slow
def test_bf16_on_a_cpu_trains_two_steps_and_the_card_says_bf16(make_settings, prepared_bundled):
    settings = make_settings(f"paths.prepared={prepared_bundled}", "train.max_steps=2", "train.epochs=1",
                             "train.mixed_precision=bf16", "train.save_checkpoints=false", "train.eval_on_start=false")
    result = train(settings)
    assert result.global_step == 2 and all(0 < loss < 10 for loss in result.step_losses)
    assert 0 < result.final_metrics["cosine_ndcg@10"] <= 1
    card = (result.model_dir / "README.md").read_text()
    assert "- `bf16`: True" in card and "- `fp16`: False" in card
    # and the steps really ran in bf16: the same two steps in fp32 (deterministic on a CPU) give other losses
    settings.train.mixed_precision = "no"
    fp32 = train(settings)
    gaps = [abs(a - b) for a, b in zip(result.step_losses, fp32.step_losses, strict=True)]
    assert all(1e-5 < gap < 0.05 for gap in gaps), gaps


@pytest.mark.slow
def test_two_accumulated_batches_of_16_are_one_update_on_32_rows(make_settings, prepared_bundled, tmp_path, monkeypatch):
    """gradient_accumulation_steps=2 averages two micro-batches' gradients into one optimizer step.

    With MNRL each micro-batch is its own set of in-batch negatives, so the one big batch it equals is a single
    forward, backward and step over the 32 rows whose loss is the mean of the two halves' MNRL: the same
    losses, gradient norms and weights, step by step (dropout off: one forward of 32 and two of 16 draw
    different masks).
    """
    from safetensors.torch import load_file

    from pairtune.core import NullObserver
    from pairtune.train import training

    class GradNorms(NullObserver):
        def __init__(self) -> None:
            self.norms: list[float] = []

        def on_step(self, step: int, metrics: dict[str, float]) -> None:
            self.norms.append(metrics["grad_norm"])

    common = (f"paths.prepared={prepared_bundled}", "model.dropout=0.0", "train.max_steps=4",
              "train.eval_on_start=false", "train.save_checkpoints=false")
    accumulated, big = GradNorms(), GradNorms()
    two = train(make_settings(*common, "train.batch_size=16", "train.gradient_accumulation_steps=2",
                              f"paths.model={tmp_path}/accumulated"), observer=accumulated)
    real = training.mnrl_loss

    def mean_of_halves(anchors, candidates, **kwargs):
        half = len(anchors) // 2
        first = real(anchors[:half], [c[:half] for c in candidates], **kwargs)
        return (first + real(anchors[half:], [c[half:] for c in candidates], **kwargs)) / 2

    monkeypatch.setattr(training, "mnrl_loss", mean_of_halves)
    one = train(make_settings(*common, "train.batch_size=32", f"paths.model={tmp_path}/big"), observer=big)
    assert two.global_step == one.global_step == 4
    assert two.step_losses == pytest.approx(one.step_losses, abs=1e-5)
    assert accumulated.norms == pytest.approx(big.norms, rel=1e-4)
    ours, theirs = load_file(tmp_path / "accumulated/model.safetensors"), load_file(tmp_path / "big/model.safetensors")
    assert max((ours[k] - theirs[k]).abs().max().item() for k in theirs) < 1e-5


def test_the_fast_preset_switches_training_to_bf16_and_nothing_else(make_settings):
    """experiment=fast is bf16 autocast at the seed card's recipe; the default stays the card's fp32."""
    from dataclasses import asdict

    default, fast = make_settings(), make_settings("experiment=fast")
    assert (default.train.mixed_precision, fast.train.mixed_precision) == ("no", "bf16")
    fast.train.mixed_precision = "no"
    assert asdict(fast) == asdict(default)


def test_every_bench_quality_recipe_changes_exactly_the_keys_it_names(make_settings):
    """bench/quality.py's recipes compose, and each moves its named keys off the default and nothing else."""
    import sys
    from dataclasses import asdict

    from .conftest import ROOT

    def flat(tree: dict, prefix: str = "") -> dict:
        out = {}
        for key, value in tree.items():
            out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
        return out

    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import quality as bench_quality
    finally:
        sys.path.remove(str(ROOT / "bench"))
    default = flat(asdict(make_settings()))
    assert set(bench_quality.DEFAULT_RECIPES) <= set(bench_quality.RECIPES)
    for name, (overrides, _mined) in bench_quality.RECIPES.items():
        named = {override.split("=")[0] for override in overrides}
        recipe = flat(asdict(make_settings(*overrides)))
        changed = {key for key in default if recipe[key] != default[key]}
        assert changed == named, name