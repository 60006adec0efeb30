from __future__ import annotations

from pairtune.sampling import GlobalBatchSampler


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
    # rows 0-9 share the note "same"; the sampler must never put two of them together
    texts = [("same", f"s{i}") for i in range(10)] + [(f"n{i}", f"t{i}") for i in range(30)]
    sampler = GlobalBatchSampler(len(texts), 8, seed=3, texts=texts)
    batches = list(sampler)
    for batch in batches:
        notes = [texts[r][0] for r in batch]
        assert len(notes) == len(set(notes))
    assert sorted(r for b in batches for r in b) == list(range(len(texts)))


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
