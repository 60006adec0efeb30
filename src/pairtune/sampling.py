"""A seeded, epoch-aware batch sampler that cuts one global batch into per-process slices.

Every process builds the same global order from ``seed + epoch``, so no coordination is needed: process
``r`` of ``W`` takes the ``r``-th contiguous slice of each global batch of ``batch_size * W`` rows. Two
processes of 16 therefore see exactly the rows one process of 32 would, in the same order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch


class GlobalBatchSampler:
    def __init__(
        self,
        n_rows: int,
        batch_size: int,
        *,
        seed: int,
        world_size: int = 1,
        rank: int = 0,
        drop_last: bool = False,
        texts: Sequence[Sequence[str]] | None = None,
    ) -> None:
        """``texts`` (one sequence of strings per row) turns on no-duplicates: no text twice in a global batch."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of {world_size}")
        self.n_rows, self.batch_size = n_rows, batch_size
        self.seed, self.world_size, self.rank = seed, world_size, rank
        self.drop_last, self.texts = drop_last, texts
        self.epoch = 0

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.n_rows, generator=generator).tolist()

    def global_batches(self) -> list[list[int]]:
        order = self._order()
        size = self.global_batch_size
        if self.texts is None:
            batches = [order[i : i + size] for i in range(0, len(order), size)]
        else:
            batches = self._no_duplicate_batches(order, size)
        # A last batch too small to give every process a row is dropped: an empty slice would stall the others.
        if batches and (len(batches[-1]) < self.world_size or (self.drop_last and len(batches[-1]) < size)):
            batches.pop()
        return batches

    def _no_duplicate_batches(self, order: list[int], size: int) -> list[list[int]]:
        remaining, batches = order, []
        while remaining:
            batch, seen, deferred = [], set(), []
            for row in remaining:
                row_texts = set(self.texts[row])
                if len(batch) < size and not row_texts & seen:
                    batch.append(row)
                    seen |= row_texts
                else:
                    deferred.append(row)
            batches.append(batch)
            remaining = deferred
        return batches

    def local_slice(self, batch: list[int]) -> list[int]:
        """This process's contiguous share; shares differ by at most one row in a short last batch."""
        return np.array_split(np.asarray(batch), self.world_size)[self.rank].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches():
            yield self.local_slice(batch)

    def __len__(self) -> int:
        if self.texts is not None:
            return len(self.global_batches())
        full, rest = divmod(self.n_rows, self.global_batch_size)
        keep_rest = rest >= self.world_size and not (self.drop_last and rest > 0)
        return full + int(keep_rest)
