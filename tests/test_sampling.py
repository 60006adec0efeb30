from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from pairtune.data.pairs import load_prepared
from pairtune.data.sampling import GlobalBatchSampler, text_ids_from_columns

from .conftest import ROOT


def test_every_row_once_per_epoch_with_a_short_last_batch():
    sampler = GlobalBatchSampler(263, 32, seed=42)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 9
    assert [len(b) for b in batches] == [32] * 8 + [7]
    assert sorted(row for b in batches for row in b) == list(range(263))


def test_order_changes_per_epoch_and_repeats_per_seed():
    sampler = GlobalBatchSampler(100, 10, seed=42)
    sampler.set_epoch(0)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert first != second
    again = GlobalBatchSampler(100, 10, seed=42)
    again.set_epoch(1)
    assert list(again) == second
    assert list(GlobalBatchSampler(100, 10, seed=7)) != first


def test_drop_last_drops_the_short_batch():
    sampler = GlobalBatchSampler(263, 32, seed=1, drop_last=True)
    assert len(sampler) == 8 and all(len(b) == 32 for b in sampler)


def test_no_duplicates_keeps_each_text_once_per_batch():
    # Given rows 0-9 sharing the note "same": five batches of 8 cannot hold all ten without a duplicate
    texts = [("same", f"s{i}") for i in range(10)] + [(f"n{i}", f"t{i}") for i in range(30)]
    # When
    sampler = GlobalBatchSampler(len(texts), 8, seed=3, texts=texts)
    batches = list(sampler)
    # Then no batch repeats a note, no row comes twice, and the rows not placed are counted
    for batch in batches:
        notes = [texts[r][0] for r in batch]
        assert len(notes) == len(set(notes))
    placed = [r for b in batches for r in b]
    assert len(placed) == len(set(placed)) and len(placed) + sampler.rows_left_out == len(texts)
    assert sampler.rows_left_out >= 10 - len(batches)


def test_ranks_split_each_global_batch_into_contiguous_slices():
    single = list(GlobalBatchSampler(70, 32, seed=5))
    rank0 = list(GlobalBatchSampler(70, 16, seed=5, world_size=2, rank=0))
    rank1 = list(GlobalBatchSampler(70, 16, seed=5, world_size=2, rank=1))
    assert [a + b for a, b in zip(rank0, rank1, strict=True)] == single
    assert not set(r for b in rank0 for r in b) & set(r for b in rank1 for r in b)


def test_no_duplicates_holds_across_the_global_batch():
    texts = [("dup", f"s{i}") for i in range(6)] + [(f"n{i}", f"t{i}") for i in range(26)]
    ranks = [list(GlobalBatchSampler(32, 4, seed=0, world_size=2, rank=r, texts=texts)) for r in (0, 1)]
    for left, right in zip(*ranks, strict=True):
        notes = [texts[r][0] for r in left + right]
        assert len(notes) == len(set(notes))


def one_sentence_for_many_notes(shared: int, unique: int) -> list[tuple[str, str]]:
    """``shared`` different notes all answered by one sentence, then ``unique`` pairs of their own."""
    return [(f"note {i}", "the shared sentence") for i in range(shared)] + [
        (f"other note {i}", f"other sentence {i}") for i in range(unique)
    ]


@pytest.mark.parametrize("seed", range(6))
def test_one_sentence_for_14_notes_gives_both_ranks_rows_in_every_batch(seed):
    # Given one sentence answering 14 different notes among 40 pairs, 2 processes of batch 4
    texts = one_sentence_for_many_notes(14, 26)
    samplers = [GlobalBatchSampler(40, 4, seed=seed, world_size=2, rank=r, texts=texts) for r in (0, 1)]
    for epoch in range(3):
        # When each rank iterates an epoch
        for sampler in samplers:
            sampler.set_epoch(epoch)
        batches = samplers[0].global_batches()
        ranks = [list(sampler) for sampler in samplers]
        # Then every global batch has >= 2 rows and each rank a non-empty slice of it
        assert all(len(batch) >= 2 for batch in batches)
        assert all(rows for rank in ranks for rows in rank)
        assert [a + b for a, b in zip(*ranks, strict=True)] == batches
        # and no text twice in a global batch, only the last batch short, len() the batches yielded
        for batch in batches:
            batch_texts = [text for row in batch for text in texts[row]]
            assert len(batch_texts) == len(set(batch_texts))
        assert all(len(batch) == 8 for batch in batches[:-1])
        assert len(samplers[0]) == len(samplers[1]) == len(ranks[0]) == len(ranks[1])


def test_rows_left_out_are_counted_and_clash_with_the_last_batch():
    # Given one sentence answering 14 notes among 40 pairs: at most one of them fits in each batch
    texts = one_sentence_for_many_notes(14, 26)
    sampler = GlobalBatchSampler(40, 4, seed=1, world_size=2, texts=texts)
    # When
    batches = sampler.global_batches()
    # Then each row is placed or counted as left out, and a left-out row could not have joined the last batch
    placed = {row for batch in batches for row in batch}
    left_out = set(range(40)) - placed
    assert sampler.rows_left_out == len(left_out) >= 14 - len(batches)
    last_texts = {text for row in batches[-1] for text in texts[row]}
    assert all(set(texts[row]) & last_texts for row in left_out)


def test_a_sentence_shared_by_every_row_yields_no_batch_rather_than_empty_slices():
    # Given 5 rows that all share one sentence: no batch of 2 rows can avoid a duplicate
    texts = one_sentence_for_many_notes(5, 0)
    sampler = GlobalBatchSampler(5, 4, seed=0, world_size=2, rank=1, texts=texts)
    # When / Then the epoch has no batch at all, and all 5 rows are reported as left out
    assert list(sampler) == [] and len(sampler) == 0 and sampler.rows_left_out == 5


def test_drop_last_drops_the_short_no_duplicates_batch():
    texts = one_sentence_for_many_notes(0, 43)
    sampler = GlobalBatchSampler(43, 8, seed=2, drop_last=True, texts=texts)
    assert [len(b) for b in sampler] == [8] * 5 and sampler.rows_left_out == 3


def test_rows_left_out_in_random_mode_is_the_dropped_short_batch():
    assert GlobalBatchSampler(263, 32, seed=42).rows_left_out == 0
    assert GlobalBatchSampler(263, 32, seed=42, drop_last=True).rows_left_out == 7
    assert GlobalBatchSampler(65, 16, seed=42, world_size=4).rows_left_out == 1  # 1 row cannot feed 4 ranks


def test_text_ids_give_the_same_batches_as_texts():
    # Given texts and the same texts as integer ids factorized over both columns
    texts = one_sentence_for_many_notes(14, 26) + [("the shared sentence", "a note as a positive")]
    ids = text_ids_from_columns([[a for a, _ in texts], [b for _, b in texts]])
    # When / Then a text is one id in any column, and both inputs pack alike
    assert ids[-1, 0] == ids[0, 1]
    by_texts = GlobalBatchSampler(41, 4, seed=9, world_size=2, texts=texts).global_batches()
    assert GlobalBatchSampler(41, 4, seed=9, world_size=2, text_ids=ids).global_batches() == by_texts


def test_missing_texts_never_clash():
    # Given pairs without a negative (None) in a three-column layout
    texts = [(f"a{i}", f"p{i}", None) for i in range(16)]
    # When / Then all 16 rows fit into two full batches
    sampler = GlobalBatchSampler(16, 8, seed=0, texts=texts)
    assert [len(b) for b in sampler] == [8, 8] and sampler.rows_left_out == 0


class CountingTexts(Sequence):
    """Rows of texts that count how often the sampler reads a row."""

    def __init__(self, rows: list[tuple[str, str]]) -> None:
        self.rows, self.reads = rows, 0

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index):
        self.reads += 1
        return self.rows[index]


def heavily_shared(n_rows: int) -> list[tuple[str, str]]:
    """A quarter of the rows answered by one sentence, a tenth sharing one of 20 notes, the rest unique."""
    rows = []
    for i in range(n_rows):
        note = f"common note {i // 10 % 20}" if i % 10 == 1 else f"note {i}"
        rows.append((note, "the shared sentence" if i % 4 == 0 else f"sentence {i}"))
    return rows


def test_no_duplicates_work_is_linear_in_the_rows():
    # Given 20,000 rows where one sentence answers 5,000 notes (a rescan per batch: ~n^2 / 64 = 6e6 reads)
    n_rows = 20_000
    texts = CountingTexts(heavily_shared(n_rows))
    sampler = GlobalBatchSampler(n_rows, 16, seed=0, world_size=2, texts=texts)
    # When one epoch is built
    batches = sampler.global_batches()
    # Then rows read and packing steps stay within a few per row
    assert texts.reads <= 5 * n_rows
    assert sampler.steps <= 5 * n_rows
    # and the packing is still tight and duplicate-free: beyond one shared-sentence row per batch, at most
    # a batch's worth of rows is left out
    assert all(len(b) == 32 for b in batches[:-1])
    assert sampler.rows_left_out <= 5_000 - len(batches) + 32
    for batch in batches:
        batch_texts = [text for row in batch for text in texts.rows[row]]
        assert len(batch_texts) == len(set(batch_texts))


def test_len_and_iteration_build_an_epoch_once(monkeypatch):
    # Given a no-duplicates sampler whose shuffles are counted
    shuffles = []
    original = GlobalBatchSampler._order
    monkeypatch.setattr(
        GlobalBatchSampler, "_order", lambda self: shuffles.append(self.epoch) or original(self)
    )
    sampler = GlobalBatchSampler(40, 4, seed=0, world_size=2, texts=one_sentence_for_many_notes(14, 26))
    # When len() is asked per epoch (as the training schedule does) and then the epoch is used repeatedly
    counts = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        counts.append(len(sampler))
    sampler.set_epoch(0)
    for _ in range(3):
        assert len(sampler) == len(list(sampler)) == len(sampler.global_batches()) == counts[0]
    _ = sampler.rows_left_out
    # Then each epoch was shuffled and packed once, plus once more to iterate epoch 0 again
    assert shuffles == [0, 1, 2, 0] and sampler.builds == 4


def write_pairs_with_one_sentence_for_14_notes(path: Path) -> None:
    """80 pairs: one sentence answers 14 different notes, every other note and sentence is unique."""
    rows = [
        {"sentence_0": f"Note {i}: the tower seen at dusk", "sentence_1": "The tower stood at dusk."}
        for i in range(14)
    ]
    rows += [
        {"sentence_0": f"Note {i}: a ship in port", "sentence_1": f"Ship number {i} lay in port."}
        for i in range(14, 80)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def run_in_repo(*args: str) -> subprocess.CompletedProcess:
    """Run a command from the repository root, offline, one thread per process (as tests/test_distributed.py runs torchrun)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_two_processes_train_to_the_end_with_no_duplicates_on_shared_sentences(tmp_path):
    # Given a pairs file where one sentence answers 14 notes, prepared with all 14 in the training split
    source, prepared = tmp_path / "pairs.jsonl", tmp_path / "prepared"
    write_pairs_with_one_sentence_for_14_notes(source)
    prepare = run_in_repo(
        sys.executable, "pipelines/prepare.py", f"data.source={source}", f"paths.prepared={prepared}",
        "data.train_size=60", "data.eval_size=10", f"hydra.run.dir={tmp_path}/h",
    )  # fmt: skip
    assert prepare.returncode == 0, prepare.stderr[-4000:]
    train = load_prepared(prepared)["train"]
    assert (train["sentence_1"] == "The tower stood at dusk.").sum() == 14
    # When 2 processes train 2 epochs with no-duplicates batches of 4 per process
    done = run_in_repo(
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "pipelines/train.py", f"paths.prepared={prepared}", f"paths.model={tmp_path}/model",
        f"paths.checkpoints={tmp_path}/ckpt", f"paths.reports={tmp_path}/reports", f"hydra.run.dir={tmp_path}/h2",
        "train.batch_sampler=no_duplicates", "train.batch_size=4", "train.epochs=2", "train.eval_on_start=false",
        "tracking.enabled=false", "guard.enabled=false",
    )  # fmt: skip
    # Then training ends normally and writes the model
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "model" / "model.safetensors").exists()
    # and the batches were packed without duplicates: the 14 rows of one sentence need 14 batches, an epoch
    # has 8 (60 rows / 8), so each epoch leaves some of them out, which random batches never do
    left_out = [int(n) for n in re.findall(r"epoch \d: (\d+) rows in no batch", done.stderr)]
    assert len(left_out) == 2 and all(n >= 14 - 8 for n in left_out), done.stderr[-4000:]
    assert "- `batch_sampler`: no_duplicates" in (tmp_path / "model" / "README.md").read_text()
