"""What a node's throttled warnings held back since their last line, said at its leave.

A warning that a flood would repeat (a peer's malformed batches, a full mailbox refusing
a stream, an outage failing every publish) is logged at once, then at most once a second,
each line with the count so far. What came after the last line of a kind is in the
counters only: no later line of that kind says it. :class:`HeldLines` keeps that tail by
kind and says it when the node leaves, as a process agent says its held lines at its stop.

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

import logging
from typing import Final, final

from .._logcall import log_guarded
from .._throttle import Throttle

__all__ = ["HeldLines"]

log: Final = logging.getLogger("nexus_trio.nats")


@final
class HeldLines:
    """The lines of each kind a throttle held back since the last one logged."""

    __slots__ = ("_held",)

    def __init__(self) -> None:
        # what -> [held, the logger and level of its lines, the counter counting them]
        self._held: dict[str, tuple[list[int], logging.Logger, int, str]] = {}

    def due(
        self,
        throttle: Throttle,
        what: str,
        n: int = 1,
        *,
        counted: str = "",
        level: int = logging.WARNING,
        logger: logging.Logger = log,
    ) -> bool:
        """``throttle.due()``: True if a line of ``what`` is to be logged now (it says the
        count so far, so nothing of its kind is held any more); else ``n`` more of
        ``what`` are held back until :meth:`say` (``counted``: the counter they are in)."""
        if throttle.due():
            self._held.pop(what, None)
            return True
        entry = self._held.get(what)
        if entry is None:
            self._held[what] = ([n], logger, level, counted)
        else:
            entry[0][0] += n
        return False

    def held(self, what: str) -> int:
        """How many of ``what`` are held back now."""
        entry = self._held.get(what)
        return 0 if entry is None else entry[0][0]

    def say(self, node: str) -> None:
        """Say each kind's held count, at the level of its lines (the node leaves: no later
        line of the kind will), and hold nothing any more."""
        held, self._held = self._held, {}
        for what, (n, logger, level, counted) in held.items():
            where = f"; counted in {counted}" if counted else ""
            log_guarded(
                logger,
                level,
                "node %s: %s more %s after the last line logged about them, not logged"
                " (at most a line a second%s)",
                node,
                f"{n[0]:,}",
                what,
                where,
            )
