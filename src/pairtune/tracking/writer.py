"""Per-step metrics written to the store in the background, in batches, with retries, never lost.

One SQLite write every few seconds instead of one per step keeps tracking off the cores the training uses.
"""

from __future__ import annotations

import logging
import threading
import time

from pairtune.tracking.store import _mlflow

log = logging.getLogger(__name__)

Row = tuple[int, int, dict[str, float]]  # (step, timestamp ms, metrics)


class MetricWriter:
    """Per-step metrics leave the loop as a list append; a background thread writes them in batches.

    Every ``interval`` seconds (and on :meth:`flush`) the buffered rows go to the store in one
    ``log_batch`` call per 1,000 values, with retries. Rows the store refuses stay pending and go out
    with the next batch; whatever never gets through is returned by :meth:`close` so that the caller can
    keep it on disk.
    """

    retries: int = 3
    batch_limit: int = 1000  # MLflow's limit on metrics per log_batch

    def __init__(self, run_id: str, interval: float) -> None:
        self.run_id = run_id
        self.interval = interval
        self.client = _mlflow().MlflowClient()
        self.buffer: list[Row] = []
        self.pending: list[Row] = []  # refused so far, oldest first
        self.lock = threading.Lock()  # guards buffer
        self.writing = threading.Lock()  # one flush at a time
        self.wake = threading.Event()
        self.stopped = False
        self.thread = threading.Thread(target=self._run, name="pairtune-metrics", daemon=True)
        self.thread.start()

    def put(self, step: int, metrics: dict[str, float], *, urgent: bool = False) -> None:
        """Queue one step's metrics; ``urgent`` wakes the writer now instead of at the next interval."""
        with self.lock:
            self.buffer.append((step, int(time.time() * 1000), metrics))
        if urgent:
            self.wake.set()

    def _run(self) -> None:
        while not self.stopped:
            self.wake.wait(self.interval)
            self.wake.clear()
            if not self.stopped:
                self.flush()

    def flush(self) -> None:
        """Write everything buffered and pending now; what the store refuses stays pending."""
        metric = _mlflow().entities.Metric
        with self.writing:
            with self.lock:
                self.pending.extend(self.buffer)
                self.buffer = []
            while self.pending:
                rows = self._take_batch()
                metrics = [
                    metric(key, float(value), stamp, step)
                    for step, stamp, row in rows
                    for key, value in row.items()
                ]
                if not self._send(metrics):
                    return
                del self.pending[: len(rows)]

    def _take_batch(self) -> list[Row]:
        """The oldest pending rows that fit in one ``log_batch`` call (at least one row)."""
        rows, size = [], 0
        for row in self.pending:
            if rows and size + len(row[2]) > self.batch_limit:
                break
            rows.append(row)
            size += len(row[2])
        return rows

    def _send(self, metrics: list) -> bool:
        """One batch, retried with backoff; False when every attempt failed."""
        for attempt in range(self.retries):
            try:
                self.client.log_batch(self.run_id, metrics=metrics, synchronous=True)
                return True
            except Exception as err:  # network, database locked, server 5xx: all transient here
                log.warning("metric logging failed (attempt %d/%d): %s", attempt + 1, self.retries, err)
                time.sleep(0.2 * 2**attempt)
        return False

    def close(self) -> list[tuple[int, dict[str, float]]]:
        """Stop the thread, make a last attempt, and return the rows that never got through."""
        self.stopped = True
        self.wake.set()
        self.thread.join()
        self.flush()
        return [(step, metrics) for step, _, metrics in self.pending]
