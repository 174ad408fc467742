"""One log line per interval for a warning that a flood would repeat, and at most so many
lines a second of records alike; the lines either held back are counted by kind,
process-wide (:func:`lines_dropped`), so that an operator sees what the log did not say.

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

import heapq
import math
import time
from collections import Counter
from collections.abc import Callable
from typing import Final, final

#: log lines held back by a :class:`Throttle` or a :class:`LineBudget` of a kind, in this
#: process (each also said by its count in a later line, or counted in its own stats)
_DROPPED: Final[Counter[str]] = Counter()


def count_dropped(kind: str, n: int = 1) -> None:
    """Count ``n`` log lines of ``kind`` held back by a bound of their own (not a
    :class:`Throttle` nor a :class:`LineBudget`: e.g. a child's stderr lines)."""
    _DROPPED[kind] += n


def lines_dropped() -> dict[str, int]:
    """The log lines held back by a throttle of each kind in this process so far (a kind
    with none is not there)."""
    return dict(_DROPPED)


@final
class Throttle:
    """:meth:`due` is True the first time, then at most once per ``interval`` seconds of
    ``clock``: a warning that an outage or a hostile peer could repeat thousands of times a
    second is logged at once and then once per interval (with a running count in its
    text, so nothing it stands for goes unsaid)."""

    __slots__ = ("_clock", "_last", "interval", "kind")

    def __init__(
        self,
        interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        *,
        kind: str = "",
    ) -> None:
        self.interval = interval
        self._clock = clock
        self._last = -math.inf
        #: the kind its lines held back are counted under in :func:`lines_dropped` ("":
        #: not counted there, e.g. a throttle of something else than a log line)
        self.kind = kind

    def due(self) -> bool:
        now = self._clock()
        if now - self._last >= self.interval:
            self._last = now
            return True
        if self.kind:
            _DROPPED[self.kind] += 1
        return False


#: the keys a line of records not logged names (those with the most), the rest counted
SAID_KEYS: Final = 10


@final
class LineBudget:
    """At most ``limit`` log lines a second of each key (0: no limit), and at most
    ``total`` a second of all keys together (0: no limit; the bound of the kind, as a
    thousand failing agents would otherwise write a thousand times ``limit``: ``limit``
    keeps one key from taking the whole ``total``); the rest are counted
    (``not_logged``; under ``kind`` in :func:`lines_dropped` once said) and said in one line by
    ``say`` (the count, and the counts of
    the :data:`SAID_KEYS` keys with the most, the others' in one item) when their second
    ends: at the next :meth:`allowed` after it, by the kernel's task
    (``Ledger.say_unlogged_when_due``, which ``wake`` rouses), or at :meth:`say_unlogged`
    when the kernel closes. A storm of a million alike records is
    then a few lines a second, not a million."""

    __slots__ = (
        "_lines",
        "_logged",
        "_unsaid",
        "_window_end",
        "clock",
        "kind",
        "limit",
        "not_logged",
        "say",
        "total",
        "wake",
    )

    def __init__(
        self,
        limit: int,
        say: Callable[[int, str], None],
        wake: Callable[[], None],
        clock: Callable[[], float],
        *,
        total: int = 0,
        kind: str = "",
    ) -> None:
        self.limit = limit
        self.total = total
        self.kind = kind
        #: lines logged this second, of all keys
        self._lines = 0
        self.say = say
        self.wake = wake
        self.clock = clock
        self.not_logged = 0
        self._logged: Counter[str] = Counter()
        self._unsaid: Counter[str] = Counter()
        self._window_end = -math.inf

    def allowed(self, key: str) -> bool:
        """Whether this record of ``key`` gets its own line (counted if not)."""
        limit = self.limit
        total = self.total
        if not limit and not total:
            return True
        now = self.clock()
        if now >= self._window_end:
            self.say_unlogged()
            self._window_end = now + 1.0
        logged = self._logged
        if (not limit or logged[key] < limit) and (not total or self._lines < total):
            logged[key] += 1
            self._lines += 1
            return True
        unsaid = self._unsaid
        if not unsaid:
            self.wake()
        unsaid[key] += 1
        self.not_logged += 1
        return False

    @property
    def window_end(self) -> float | None:
        """The end of the second whose lines not logged are still to be said (None: none)."""
        return self._window_end if self._unsaid else None

    def say_unlogged(self) -> None:
        """Say the lines not logged this second (if any); the next second counts afresh."""
        self._logged.clear()
        self._lines = 0
        unsaid = self._unsaid
        if unsaid:
            total = unsaid.total()
            # The keys with the most (ties by key), the others in one item: a storm spread
            # over 100,000 agents is one line of a few hundred bytes, not of megabytes.
            shown = heapq.nsmallest(SAID_KEYS, unsaid.items(), key=_most_first)
            by_key = ", ".join(f"{key} {count:,}" for key, count in shown)
            others = len(unsaid) - len(shown)
            if others:
                rest = total - sum(count for _, count in shown)
                by_key = f"{by_key}, {others:,} others {rest:,}"
            unsaid.clear()
            if self.kind:
                # (here, once a second, not at each record held back: a Counter's
                # update there cost a held-back failure ~0.4 us, a tenth of its path)
                _DROPPED[self.kind] += total
            self.say(total, by_key)


def _most_first(item: tuple[str, int]) -> tuple[int, str]:
    return -item[1], item[0]
