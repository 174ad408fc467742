"""One log line per interval for a warning that a flood would repeat."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import final


@final
class Throttle:
    """:meth:`due` is True the first time, then at most once per ``interval`` seconds of
    ``clock``: a warning that an outage or a hostile peer could repeat thousands of times a
    second is logged at once and then once per interval (with a running count in its
    text, so nothing it stands for goes unsaid)."""

    __slots__ = ("_clock", "_last", "interval")

    def __init__(self, interval: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._last = -math.inf

    def due(self) -> bool:
        now = self._clock()
        if now - self._last >= self.interval:
            self._last = now
            return True
        return False
