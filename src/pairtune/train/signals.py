"""Turn SIGINT/SIGTERM into a polite request the training loop honours at the next step boundary."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager


class TrainingInterrupted(KeyboardInterrupt):
    """Raised by the loop after it saved a checkpoint in answer to a signal."""

    def __init__(self, signum: int, step: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}")
        self.signum, self.step = signum, step

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopRequest:
    """Set by a signal handler; a second signal stops at once."""

    def __init__(self) -> None:
        self.signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}")
        self.signum = signum


STOP = StopRequest()


@contextmanager
def graceful_stop() -> Iterator[StopRequest]:
    """Install the handlers for the duration of a run (main thread only), then restore the old ones."""
    STOP.signum = None
    previous = {sig: signal.signal(sig, STOP._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield STOP
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
