"""A seeded, epoch-aware batch sampler that cuts one global batch into per-process slices.

Every process builds the same global order from ``seed + epoch``, so no coordination is needed: process
``r`` of ``W`` takes the ``r``-th contiguous slice of each global batch of ``batch_size * W`` rows. Two
processes of 16 therefore see exactly the rows one process of 32 would, in the same order.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd
import torch


def text_ids_from_columns(columns: Sequence[Sequence[str | None]]) -> np.ndarray:
    """``(n_rows, n_columns)`` integer ids of the texts, equal for equal texts in any column.

    One ``pandas.factorize`` over all columns, so a text that is the anchor of one row and the positive of
    another gets one id, and no-duplicates sampling compares integers instead of holding strings. A missing
    text (``None``) gets an id of its own that is negative and unique, so it never clashes with anything.
    """
    if not columns:
        raise ValueError("text ids need at least one column")
    n_rows = len(columns[0])
    if any(len(column) != n_rows for column in columns):
        raise ValueError("text columns differ in length")
    flat = np.concatenate([np.asarray(column, dtype=object) for column in columns])
    codes, _ = pd.factorize(flat)
    return _unique_missing(codes.reshape(len(columns), n_rows).T.copy())


def text_ids_from_rows(texts: Sequence[Sequence[str | None]]) -> np.ndarray:
    """:func:`text_ids_from_columns` for one tuple of texts per row (anchor, positive[, negative])."""
    width = len(texts[0]) if len(texts) else 0
    if any(len(row) != width for row in texts):
        raise ValueError("every row of texts needs the same number of columns")
    return text_ids_from_columns([[row[column] for row in texts] for column in range(width)])


def _unique_missing(ids: np.ndarray) -> np.ndarray:
    """Negative ids mean "no text": give each its own id (-1, -2, ...) so two missing texts never clash."""
    missing = ids < 0
    if missing.any():
        ids = ids.copy()
        ids[missing] = -1 - np.arange(int(missing.sum()))
    return ids


class GlobalBatchSampler:
    """Seeded global batches of ``batch_size * world_size`` rows; each process iterates over its own slice.

    Random mode (no ``texts``): the shuffled order cut into consecutive global batches.

    No-duplicates mode (``texts`` or ``text_ids`` given): no text (anchor, positive or negative, of any row)
    occurs twice in one global batch, since MNRL would otherwise score a row's own positive as a negative.
    Rows are taken in the shuffled order; a row that shares a text with the batch being built waits and gets
    the first places of the following batches (see :class:`_NoDuplicatePacker`, which also says why building
    an epoch takes linear time).

    Every global batch holds at least ``world_size`` rows, so no process ever gets an empty slice, and only
    the last batch of an epoch may be short. At the end of an epoch some rows may not fit anywhere without a
    duplicate, typically rows of one text shared by more rows than the epoch has batches. They are left out
    of this epoch, the way ``drop_last`` leaves out a short batch, and counted in :attr:`rows_left_out`
    (which also counts rows of a dropped short batch). They are not carried over: each epoch is built from
    ``seed + epoch`` alone, so any epoch can be rebuilt (resumed, counted) without replaying the previous
    ones, and the next epoch's reshuffle gives the left-out rows their turn. A left-out row shares a text
    with the last batch unless the safety cap of :class:`_NoDuplicatePacker` ended the epoch.

    The current epoch's batches are built once and cached; ``set_epoch`` to another epoch rebuilds them.
    """

    def __init__(
        self,
        n_rows: int,
        batch_size: int,
        *,
        seed: int,
        world_size: int = 1,
        rank: int = 0,
        drop_last: bool = False,
        texts: Sequence[Sequence[str | None]] | None = None,
        text_ids: np.ndarray | None = None,
    ) -> None:
        """``texts`` (one tuple per row) or ``text_ids`` (``(n_rows, columns)`` ints) turn on no-duplicates."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of {world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.n_rows, self.batch_size = n_rows, batch_size
        self.seed, self.world_size, self.rank = seed, world_size, rank
        self.drop_last = drop_last
        self.text_ids = self._checked_text_ids(texts, text_ids)
        self.epoch = 0
        self.builds = 0  # epochs built so far: len() and iteration reuse the cached epoch
        self.steps = 0  # no-duplicates work of the last build (rows examined + waiting texts visited)
        self._batches: list[list[int]] = []
        self._built_epoch: int | None = None
        self._epoch_counts: dict[int, tuple[int, int]] = {}  # epoch -> (batches, rows left out)

    def _checked_text_ids(
        self, texts: Sequence[Sequence[str | None]] | None, text_ids: np.ndarray | None
    ) -> np.ndarray | None:
        """One ``(n_rows, columns)`` int64 array of text ids (factorized once from ``texts``), or None."""
        if texts is not None and text_ids is not None:
            raise ValueError("give texts or text_ids, not both")
        if texts is not None:
            text_ids = text_ids_from_rows(texts)
        if text_ids is None:
            return None
        text_ids = np.asarray(text_ids)
        if text_ids.ndim != 2 or len(text_ids) != self.n_rows:
            raise ValueError(f"text ids must have shape ({self.n_rows}, columns), got {text_ids.shape}")
        return _unique_missing(text_ids.astype(np.int64, copy=False))

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    @property
    def no_duplicates(self) -> bool:
        return self.text_ids is not None

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to iterate; its batches are built on first use, not here."""
        self.epoch = epoch

    @property
    def rows_left_out(self) -> int:
        """Rows of the current epoch in no batch: no duplicate-free place, or a dropped short last batch."""
        if not self.no_duplicates:
            return self.n_rows - sum(self._random_batch_sizes())
        return self._counts()[1]

    def _order(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.n_rows, generator=generator).tolist()

    def global_batches(self) -> list[list[int]]:
        """The current epoch's global batches (a copy of the cache, so callers may change it)."""
        return [batch.copy() for batch in self._epoch_batches()]

    def _epoch_batches(self) -> list[list[int]]:
        if self._built_epoch != self.epoch:
            self._batches = self._build()
            self._built_epoch = self.epoch
            self.builds += 1
            self._epoch_counts[self.epoch] = (len(self._batches), self.n_rows - self._rows_kept(self._batches))
        return self._batches

    def _rows_kept(self, batches: list[list[int]]) -> int:
        """Rows of the epoch in some batch (each row is in at most one here)."""
        return sum(len(batch) for batch in batches)

    def _build(self) -> list[list[int]]:
        return self._cut(self._order())

    def _cut(self, order: list[int]) -> list[list[int]]:
        """Rows in this order cut into global batches: consecutive, or packed without a text twice."""
        size = self.global_batch_size
        if self.text_ids is None:
            batches = [order[i : i + size] for i in range(0, len(order), size)]
        else:
            packer = _NoDuplicatePacker(self.text_ids, size)
            batches = packer.pack(order)
            self.steps = packer.steps
        # A last batch too small to give every process a row is dropped: an empty slice would stall the others.
        if batches and (len(batches[-1]) < self.world_size or (self.drop_last and len(batches[-1]) < size)):
            batches.pop()
        return batches

    def _counts(self) -> tuple[int, int]:
        if self.epoch not in self._epoch_counts:
            self._epoch_batches()
        return self._epoch_counts[self.epoch]

    def _random_batch_sizes(self) -> list[int]:
        """Batch sizes of random mode, by arithmetic: every epoch has the same ones."""
        full, rest = divmod(self.n_rows, self.global_batch_size)
        keep_rest = rest >= self.world_size and not (self.drop_last and rest > 0)
        return [self.global_batch_size] * full + [rest] * int(keep_rest)

    def local_slice(self, batch: list[int]) -> list[int]:
        """This process's contiguous share; shares differ by at most one row in a short last batch."""
        return np.array_split(np.asarray(batch), self.world_size)[self.rank].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self._epoch_batches():
            yield self.local_slice(batch)

    def __len__(self) -> int:
        """Batches of the current epoch (built and cached on first call in no-duplicates mode)."""
        if not self.no_duplicates:
            return len(self._random_batch_sizes())
        return self._counts()[0]


class _NoDuplicatePacker:
    """Packs one epoch's shuffled rows into full batches with no text twice; only the last may be short.

    Each batch is filled first from rows that waited, then from fresh rows in the shuffled order, stopping as
    soon as it is full. A row that shares a text with the batch waits in a queue of its own for that text,
    so rows of one sentence shared by 100k notes form one queue that costs one visit per batch, not 100k.
    Queues are visited in turn (a row placed from a queue puts its text into the batch, so the rest of that
    queue waits; a row that clashes on another text moves to that text's queue).

    Why linear: count one step per row examined and per queue visited. Each fresh row is examined once
    (<= n steps). A batch visits at most ``size`` queues and examines at most one row per visit (<= 2 * size
    steps), and every batch but the last is full, so there are at most ``n / size + 1`` batches
    (<= 2n + 2 * size steps). Once the fresh rows run out, a batch that the visits could not fill gets one
    sweep over every queue, each scanned until a row fits, so that the rows left out share a text with the
    last batch. Sweeps can repeat, so a cap bounds them: no queue is visited once the epoch has taken
    ``4n + 2 * size`` steps, and the batch being built is then the last. The cap leaves sweeps at least n
    steps (everything else takes <= 3n + 2 * size) and is not reached on any data we know of; it makes the
    bound hold for all data: at most ``4n + 2 * size + 1`` steps an epoch, against about n^2 / (2 * size)
    for the old rescan of every remaining row per batch.
    """

    def __init__(self, text_ids: np.ndarray, size: int) -> None:
        # Python ints per column: the packing loop is pure Python, and numpy scalars would make it slower.
        self.columns = [text_ids[:, column].tolist() for column in range(text_ids.shape[1])]
        self.size = size
        self.waiting: dict[int, deque[int]] = {}  # text -> rows that clashed on it, first come first
        self.turns: deque[int] = deque()  # texts with waiting rows, each once, in visiting order
        self.steps = 0
        self.cap = 4 * len(text_ids) + 2 * size

    def pack(self, order: list[int]) -> list[list[int]]:
        fresh = iter(order)
        batches: list[list[int]] = []
        while True:
            batch: list[int] = []
            seen: set[int] = set()
            self._visit_waiting(batch, seen, visits=min(self.size, len(self.turns)), scan=False)
            fresh_left = self._take_fresh(batch, seen, fresh)
            if not fresh_left and len(batch) < self.size:
                self._visit_waiting(batch, seen, visits=len(self.turns), scan=True)
            if batch:
                batches.append(batch)
            if len(batch) < self.size:
                return batches

    def _visit_waiting(self, batch: list[int], seen: set[int], *, visits: int, scan: bool) -> None:
        """Offer waiting rows, one queue per visit: its first row, or (``scan``) rows until one fits."""
        for _ in range(visits):
            if len(batch) == self.size or self.steps >= self.cap:
                return
            text = self.turns.popleft()
            rows = self.waiting[text]
            self.steps += 1
            while rows and text not in seen and self.steps < self.cap:
                self._offer(rows.popleft(), batch, seen)  # a clash parks the row under another text
                if not scan:
                    break
            if rows:
                self.turns.append(text)
            else:
                del self.waiting[text]

    def _take_fresh(self, batch: list[int], seen: set[int], fresh: Iterator[int]) -> bool:
        """Fill the batch from the shuffled order; False once the order is used up."""
        while len(batch) < self.size:
            row = next(fresh, None)
            if row is None:
                return False
            self._offer(row, batch, seen)
        return True

    def _offer(self, row: int, batch: list[int], seen: set[int]) -> None:
        """Place the row if none of its texts is in the batch, else park it under the first that is."""
        self.steps += 1
        texts = [column[row] for column in self.columns]
        for text in texts:
            if text in seen:
                if text not in self.waiting:
                    self.waiting[text] = deque()
                    self.turns.append(text)
                self.waiting[text].append(row)
                return
        batch.append(row)
        seen.update(texts)


class SourceBatchSampler(GlobalBatchSampler):
    """Global batches drawn from one source at a time, the same source on every process (``data.sources``).

    Negatives from another source are easy to tell apart by their style alone, which teaches a shortcut, so
    no global batch mixes sources. Each source's rows are cut into global batches as
    :class:`GlobalBatchSampler` cuts a whole set (random or no-duplicates, seeded from ``seed + epoch`` and
    the source's place in the list); then ``proportional`` takes each source's batches ``weight`` times (a
    fraction takes the first ones, more than 1 adds reshuffled passes) and orders all of them by one seeded
    shuffle, so every stretch of an epoch holds the sources in about their shares; ``round_robin`` takes one
    batch of each source in turn and ends the epoch when any source runs out. An epoch depends on
    ``seed + epoch`` alone, so a resume rebuilds it exactly and skips the batches already done.
    """

    def __init__(self, sources: Sequence[str], batch_size: int, *, weights: dict[str, float] | None = None,
                 mode: str = "proportional", **kwargs) -> None:
        super().__init__(len(sources), batch_size, **kwargs)
        self.names = list(dict.fromkeys(sources))
        labels = np.asarray(sources, dtype=object)
        self.rows_of = {name: np.flatnonzero(labels == name) for name in self.names}  # in frame order
        self.weights = {name: float((weights or {}).get(name, 1.0)) for name in self.names}
        if mode not in ("proportional", "round_robin"):
            raise ValueError(f"unknown source sampling {mode!r}")
        self.mode = mode
        self.batch_sources: list[str] = []  # the current epoch's source of each global batch

    def _source_pass(self, index: int, name: str, number: int) -> list[list[int]]:
        """One shuffled pass over one source's rows, cut into global batches (random or no-duplicates)."""
        rows = self.rows_of[name]
        seed = self.seed + self.epoch + 1_000_003 * (index + 1) + 7_919 * number
        return self._cut(rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).numpy()].tolist())

    def _build(self) -> list[list[int]]:
        per_source = {}
        for index, name in enumerate(self.names):
            weight = self.weights[name] if self.mode == "proportional" else 1.0
            batches = self._source_pass(index, name, 0)
            wanted = max(1, round(weight * len(batches)))
            for number in range(1, math.ceil(weight)):
                batches += self._source_pass(index, name, number)
            per_source[name] = batches[:wanted]
        if self.mode == "round_robin":
            turns = min(len(batches) for batches in per_source.values())
            labelled = [(name, per_source[name][turn]) for turn in range(turns) for name in self.names]
        else:
            labelled = [(name, batch) for name in self.names for batch in per_source[name]]
            order = torch.randperm(len(labelled), generator=torch.Generator().manual_seed(self.seed + self.epoch))
            labelled = [labelled[i] for i in order.tolist()]
        self.batch_sources = [name for name, _ in labelled]
        return [batch for _, batch in labelled]

    def _rows_kept(self, batches: list[list[int]]) -> int:
        """Distinct rows: a weight over 1 takes a source's rows more than once."""
        return len({row for batch in batches for row in batch})

    @property
    def rows_left_out(self) -> int:
        return self._counts()[1]

    def __len__(self) -> int:
        return self._counts()[0]
