"""A real-time guard for tests that run on Trio's mock clock.

A task that waits forever inside a *shielded* scope (a hung shutdown) is not stopped by
``trio.fail_after`` on a mock clock; SIGALRM in real time turns such a hang into a test
failure instead of a stuck test run.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType


class Hung(Exception):
    """The test made no progress within its real-time limit: something waits forever."""


@contextmanager
def real_time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`Hung` in the main thread if the block runs ``seconds`` of real time."""

    def on_alarm(signum: int, frame: FrameType | None) -> None:
        raise Hung(f"no result after {seconds} s of real time: the kernel hangs")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
