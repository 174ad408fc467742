"""Background work of one agent run: ``ctx.nursery``.

Opening a real nursery for every agent run costs a nursery and a cancel scope per
agent (about 1.4 KB and a fifth of the start-up time here), although most agents never
start a background task. So ``ctx.nursery`` is a small task group created on first use:
its tasks run in the supervisor's nursery, each in its own cancel scope, and the group
gives them the lifetime of a nursery inside the agent — they are cancelled and awaited
when the run ends (stop, restart, shutdown), and an exception in one of them fails the
agent, which its supervisor then handles like a handler failure.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Any, final

import trio


@final
class BackgroundTasks:
    """The nursery-like task group behind ``ctx.nursery``.

    ``start_soon(fn, *args, name=None)`` and ``await start(fn, *args, name=None)`` behave
    as on a ``trio.Nursery``; ``cancel()`` cancels every task of the group.
    """

    __slots__ = ("_closed", "_host", "_idle", "_on_failure", "_running", "_scopes", "error")

    def __init__(self, host: trio.Nursery, on_failure: Callable[[BaseException], None]) -> None:
        self._host = host
        self._on_failure = on_failure
        self._scopes: set[trio.CancelScope] = set()
        self._running = 0
        self._idle: trio.Event | None = None
        self._closed = False
        #: the first exception raised by a background task, if any
        self.error: BaseException | None = None

    def start_soon(
        self, fn: Callable[..., Awaitable[Any]], *args: Any, name: object = None
    ) -> None:
        if self._closed:
            raise RuntimeError("this agent run has ended; its background tasks are closed")
        self._running += 1
        self._host.start_soon(self._run, fn, args, None, name=name or fn)

    async def start(
        self, fn: Callable[..., Awaitable[Any]], *args: Any, name: object = None
    ) -> Any:
        """Start ``fn(*args, task_status=...)`` and return what it passes to ``started()``."""
        if self._closed:
            raise RuntimeError("this agent run has ended; its background tasks are closed")
        self._running += 1
        return await self._host.start(self._run_with_status, fn, args, name=name or fn)

    async def _run_with_status(
        self,
        fn: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
        *,
        task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        await self._run(fn, args, task_status)

    async def _run(
        self, fn: Callable[..., Awaitable[Any]], args: tuple[Any, ...], task_status: Any
    ) -> None:
        try:
            with trio.CancelScope() as scope:
                self._scopes.add(scope)
                if self._closed:
                    scope.cancel()
                try:
                    if task_status is None:
                        await fn(*args)
                    else:
                        await fn(*args, task_status=task_status)
                except Exception as exc:
                    if self.error is None:
                        self.error = exc
                        self._on_failure(exc)
                finally:
                    self._scopes.discard(scope)
        finally:
            self._running -= 1
            if self._running == 0 and self._idle is not None:
                self._idle.set()

    def cancel(self) -> None:
        for scope in list(self._scopes):
            scope.cancel()

    async def aclose(self, timeout: float = math.inf) -> None:
        """Refuse new tasks, cancel the running ones and wait for them (shielded, bounded)."""
        self._closed = True
        self.cancel()
        if self._running == 0:
            return
        self._idle = trio.Event()
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + timeout
            await self._idle.wait()
