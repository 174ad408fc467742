"""Whether a node's NATS connections are down, and since when: the one answer to "has
the connection been down N seconds" for the leave (``Cluster._leave``) and for the
``--workers`` settle (``nexus_trio.cli._swarm``), and the one race of a step that needs
a connection against a watcher of it.

The times come from nats-py's callbacks (disconnected, reconnected, closed), which the
cluster passes to :meth:`ConnectionWatch.mark`; a wait on a connection that may be gone
is then event-driven, not polled (the client says no more than ``is_connected``).

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable

import trio


class ConnectionWatch:
    """When each connection (a role: ``"data"``, ``"control"``) went down, while it is
    down; ``-inf`` once it closed for good. Times are of Trio's clock."""

    __slots__ = ("_changed", "_down_at")

    def __init__(self) -> None:
        self._down_at: dict[str, float] = {}
        #: set (and replaced) at each disconnect, reconnect and close of a connection
        self._changed = trio.Event()

    def mark(self, role: str, down_at: float | None) -> None:
        """The ``role`` connection went down at ``down_at`` (``-inf``: closed, for good;
        a later disconnect of one down already keeps the first time), or is back
        (None)."""
        if down_at is None:
            self._down_at.pop(role, None)
        elif role not in self._down_at or down_at == -math.inf:
            self._down_at[role] = down_at
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    def down_at(self, role: str) -> float | None:
        """When the ``role`` connection went down (``-inf``: closed), None while it is up
        (or was never opened)."""
        return self._down_at.get(role)

    def down_for(self, role: str) -> float | None:
        """How long the ``role`` connection has been down, in seconds (``inf``: closed),
        None while it is up."""
        down_at = self._down_at.get(role)
        return None if down_at is None else trio.current_time() - down_at

    def gone(self, role: str, wait: float) -> bool:
        """Whether the ``role`` connection has been down ``wait`` seconds (or closed)."""
        down_at = self._down_at.get(role)
        # (as the watch's deadline is computed: the same float, so that it ends the watch)
        return down_at is not None and trio.current_time() >= down_at + wait

    async def wait_up(self, role: str) -> None:
        """Return once the ``role`` connection is up (at once if it is, after a
        checkpoint); never if it closed (bound it, or race it: :meth:`unless_gone`).

        Always a checkpoint, as Trio's own waits (``Event.wait`` on an event set): a loop
        over it is cancellable and lets other tasks run while the connection is up."""
        if role not in self._down_at:
            await trio.lowlevel.checkpoint()
            return
        while role in self._down_at:
            await self._changed.wait()

    async def wait_down(self, role: str) -> None:
        """Return once the ``role`` connection is down (at once if it is, after a
        checkpoint, as :meth:`wait_up`)."""
        if role in self._down_at:
            await trio.lowlevel.checkpoint()
            return
        while role not in self._down_at:
            await self._changed.wait()

    async def unless_gone(
        self,
        role: str,
        wait: float,
        step: Callable[[], Awaitable[None]],
        *,
        bound: trio.CancelScope | None = None,
    ) -> bool:
        """Run ``step`` (one that needs the ``role`` connection), skipped or cut once
        that connection has been down ``wait`` seconds (from when it went down, before
        the step or during it: the server died, say); True if it ran to its end. A
        connection back sooner lets it go on. An error of ``step`` is raised as it came
        (not in an exception group).

        ``bound``: a cancel scope around this call whose deadline is the step's own
        bound; it stands still while the connection is down (the step's time runs only
        while the connection is up), so that a connection back within ``wait`` finds the
        step the time it had left: a failover of 4 s under a ``wait`` of 5 s no longer
        cut a leave's 1 s step."""
        if self.gone(role, wait):
            return False
        failed: list[Exception] = []
        started = trio.current_time()
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:

                async def watch() -> None:
                    held: float | None = None  # the bound's time left, while held
                    while not self.gone(role, wait):
                        changed, down_at = self._changed, self._down_at.get(role)
                        if bound is not None:
                            if down_at is not None and held is None:
                                held = bound.deadline - max(down_at, started)
                                bound.deadline = math.inf
                            elif down_at is None and held is not None:
                                bound.deadline = trio.current_time() + held
                                held = None
                        with trio.move_on_at(math.inf if down_at is None else down_at + wait):
                            await changed.wait()
                    scope.cancel()

                async def run() -> None:
                    try:
                        await step()
                    except Exception as exc:  # (raised below as it came, not in a group)
                        failed.append(exc)
                    nursery.cancel_scope.cancel()

                nursery.start_soon(watch)
                nursery.start_soon(run)
        if failed:
            raise failed[0]
        return not scope.cancelled_caught
