"""The Checkpoint type: rotation, half-written folders, the run fingerprint and the resume invariants."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pairtune.config import PairtuneConfig
from pairtune.core import ResumeMismatchError
from pairtune.train.checkpoint import (
    DOES_NOT_SHAPE_THE_RUN,
    SHAPES_THE_RUN,
    STATE_FILE,
    Checkpoint,
    LoopState,
    fingerprint_diff,
    run_fingerprint,
)


class FakeAccelerator:
    """What Checkpoint needs of Accelerate on one process: save_state writes one file per call."""

    is_main_process = is_local_main_process = True

    def __init__(self) -> None:
        self.saved: list[Path] = []

    def wait_for_everyone(self) -> None: ...

    def save_state(self, folder: str, safe_serialization: bool = True) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "model.safetensors").write_bytes(b"weights")
        self.saved.append(Path(folder))

    def load_state(self, folder: str) -> None:
        assert (Path(folder) / "model.safetensors").is_file()


def state_at(step: int) -> LoopState:
    return LoopState(step=step, epoch=0, batches_done=step, step_losses=[1.0] * step)


def test_rotation_keeps_the_newest_n_of_many(tmp_path):
    # Given a run that checkpoints at steps 1..5 with keep=2
    checkpoint = Checkpoint(tmp_path, keep=2, fingerprint={"a": 1})
    accelerator = FakeAccelerator()
    # When
    for step in range(1, 6):
        checkpoint.save(accelerator, state_at(step), run_id="r1")
    # Then only the two newest complete folders are left, and the newest is found
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000004", "step-000005"]
    assert checkpoint.latest().name == "step-000005"
    assert checkpoint.meta()["state"]["step"] == 5 and checkpoint.resumable_run_id() == "r1"


def test_an_interrupted_write_is_never_resumed_nor_counted_in_rotation(tmp_path):
    # Given three complete checkpoints and a write that died half-way (no state file, still .tmp)
    checkpoint = Checkpoint(tmp_path, keep=3, fingerprint={"a": 1})
    accelerator = FakeAccelerator()
    for step in (2, 4, 6):
        checkpoint.save(accelerator, state_at(step), run_id="r1")
    (tmp_path / ".step-000008.tmp").mkdir()
    (tmp_path / ".step-000008.tmp" / "model.safetensors").write_bytes(b"half")
    # and a step folder whose state file never got written (a crash between save_state and the rename)
    (tmp_path / "step-000007").mkdir()
    # Then the newest complete one is resumed; rotation keeps the three complete ones and drops the debris
    assert checkpoint.latest().name == "step-000006"
    checkpoint.rotate()
    assert {p.name for p in tmp_path.iterdir()} == {"step-000002", "step-000004", "step-000006", ".step-000008.tmp"}
    # When the next save for step 8 comes, the stale half-written folder is replaced by a complete one
    checkpoint.save(accelerator, state_at(8), run_id="r1")
    assert json.loads((tmp_path / "step-000008" / STATE_FILE).read_text())["state"]["step"] == 8
    assert not (tmp_path / ".step-000008.tmp").exists()


def test_clear_removes_an_earlier_runs_checkpoints(tmp_path):
    checkpoint = Checkpoint(tmp_path, keep=2, fingerprint={})
    accelerator = FakeAccelerator()
    checkpoint.save(accelerator, state_at(99), run_id="old")
    (tmp_path / ".step-000100.tmp").mkdir()
    checkpoint.clear(accelerator)
    assert list(tmp_path.iterdir()) == [] and checkpoint.latest() is None


def test_a_different_fingerprint_is_refused_naming_every_differing_key(tmp_path):
    saved = {"train.batch_size": 32, "world_size": 1, "train.seed": 42}
    Checkpoint(tmp_path, keep=2, fingerprint=saved).save(FakeAccelerator(), state_at(3), run_id="r")
    wanted = {"train.batch_size": 16, "world_size": 2, "train.seed": 42}
    with pytest.raises(ResumeMismatchError) as caught:
        Checkpoint(tmp_path, keep=2, fingerprint=wanted).resumable_run_id()
    message = str(caught.value)
    assert "train.batch_size: 32 -> 16" in message and "world_size: 1 -> 2" in message
    assert "train.seed" not in message and "train.resume=false" in message and "\n" not in message
    assert fingerprint_diff(saved, saved) == []


def test_the_fingerprint_covers_data_batch_world_accumulation_epochs_sampler_seed_and_loss(
    make_settings, prepared_bundled, tmp_path
):
    base = make_settings(f"paths.prepared={prepared_bundled}")
    reference = run_fingerprint(base, world_size=1)
    assert reference["data.train_sha256"] and len(reference["data.train_sha256"]) == 64
    changes = {
        "train.batch_size=16": "train.batch_size", "train.gradient_accumulation_steps=2":
        "train.gradient_accumulation_steps", "train.epochs=3": "train.epochs",
        "train.batch_sampler=no_duplicates": "train.batch_sampler", "train.seed=7": "train.seed",
        "loss.scale=10": "loss.scale", "loss.mini_batch_size=8": "loss.mini_batch_size",
    }
    for override, key in changes.items():
        changed = run_fingerprint(make_settings(f"paths.prepared={prepared_bundled}", override), world_size=1)
        assert [line.split(":")[0] for line in fingerprint_diff(reference, changed)] == [key], override
    assert [d.split(":")[0] for d in fingerprint_diff(reference, run_fingerprint(base, world_size=2))] == ["world_size"]
    # Paths and tracking do not shape what is learned: a resume may move them
    moved = make_settings(f"paths.prepared={prepared_bundled}", "paths.reports=elsewhere", "tracking.run_name=x")
    assert fingerprint_diff(reference, run_fingerprint(moved, world_size=1)) == []


def schema_keys(node=PairtuneConfig, prefix: str = "") -> list[str]:
    """Every dotted key of the schema, found by walking its dataclasses."""
    import dataclasses

    keys = []
    for field in dataclasses.fields(node):
        default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        if dataclasses.is_dataclass(default):
            keys += schema_keys(type(default), f"{prefix}{field.name}.")
        else:
            keys.append(f"{prefix}{field.name}")
    return keys


def test_every_schema_key_is_classified_once_as_shaping_the_run_or_not():
    keys = schema_keys()
    assert len(keys) > 60
    unclassified = [k for k in keys if k not in SHAPES_THE_RUN and k not in DOES_NOT_SHAPE_THE_RUN]
    assert unclassified == [], "add each new key to SHAPES_THE_RUN or DOES_NOT_SHAPE_THE_RUN in pairtune.train.checkpoint"
    assert set(SHAPES_THE_RUN) & set(DOES_NOT_SHAPE_THE_RUN) == set()
    assert sorted(set(SHAPES_THE_RUN) | set(DOES_NOT_SHAPE_THE_RUN)) == sorted(keys)  # no stale names
    assert len(SHAPES_THE_RUN) == len(set(SHAPES_THE_RUN)) and len(DOES_NOT_SHAPE_THE_RUN) == len(set(DOES_NOT_SHAPE_THE_RUN))


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("model.max_seq_length=32", "model.max_seq_length"),
        ("model.unpad=false", "model.unpad"),
        ("train.eval_every_steps=3", "train.eval_every_steps"),
        ("mining.relative_margin=0.1", "mining.relative_margin"),
        ("data.negative_column=negative", "data.negative_column"),
    ],
)
def test_a_resume_that_changes_how_the_run_learns_is_refused(make_settings, prepared_bundled, tmp_path, override, key):
    saved = run_fingerprint(make_settings(f"paths.prepared={prepared_bundled}"), world_size=1)
    Checkpoint(tmp_path, keep=2, fingerprint=saved).save(FakeAccelerator(), state_at(3), run_id="r")
    wanted = run_fingerprint(make_settings(f"paths.prepared={prepared_bundled}", override), world_size=1)
    with pytest.raises(ResumeMismatchError, match=f"\\({key}: "):
        Checkpoint(tmp_path, keep=2, fingerprint=wanted).resumable_run_id()


@pytest.mark.slow
def test_every_checkpoint_of_a_real_run_holds_the_resume_invariants(make_settings, prepared_bundled, tmp_path):
    """Checkpoints at update boundaries only, batches_done counts local batches, one loss per step."""
    import pairtune.train.checkpoint as checkpoint_module
    from pairtune.train.training import train

    # Given 263 rows in batches of 64 (5 batches an epoch) and 2 batches per update: 3 steps an epoch,
    # the last of a single batch; a checkpoint after every step, and every one kept
    settings = make_settings(
        f"paths.prepared={prepared_bundled}", "train.batch_size=64", "train.gradient_accumulation_steps=2",
        "train.epochs=2", "train.checkpoint_every_steps=1", "train.keep_checkpoints=100", "train.eval_on_start=false",
    )
    saved: list[dict] = []
    real_save = checkpoint_module.Checkpoint.save

    def spy(self, accelerator, state, *, run_id, extra=None):
        saved.append(json.loads(json.dumps(state.to_json())))
        return real_save(self, accelerator, state, run_id=run_id, extra=extra)

    checkpoint_module.Checkpoint.save = spy
    try:
        result = train(settings)
    finally:
        checkpoint_module.Checkpoint.save = real_save
    assert result.global_step == 6 and result.epoch_steps == [3, 3]
    for state in saved:
        assert len(state["step_losses"]) == state["step"]  # invariant 3
    # invariants 1 and 2: after local batches 2 and 4 of 5 (update boundaries), and at each epoch's end
    positions = [(s["step"], s["epoch"], s["batches_done"]) for s in saved]
    assert positions == [(1, 0, 2), (2, 0, 4), (3, 1, 0), (4, 1, 2), (5, 1, 4), (6, 2, 0)]
