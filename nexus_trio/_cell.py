"""The running side of one agent: its address, mailbox, counters and serve loop.

A cell outlives the runs of its agent: a restart starts a new run (fresh behaviour,
``on_start`` again) on the same cell, so the id, the name, the mailbox and the counters
are kept. The serve loop drains the mailbox in batches of ``batch_size`` messages,
with a schedule point between batches, and calls the handler for one message at a
time.

Handle timeouts cost nothing for handlers that never suspend: the serve loop runs in
one cancel scope without a deadline, the handler's coroutine is first stepped by hand,
and only if it suspends does the scope get the message's deadline (a Trio timer costs
about 2-5 us here, more than the rest of the per-message work together). A timeout
cancels that scope; the loop dead-letters the message and goes on in a new scope.
"""

from __future__ import annotations

import logging
import math
import types
from collections.abc import Callable, Coroutine, Generator
from time import time_ns
from typing import TYPE_CHECKING, Any

import trio

from ._agent import AgentSpec, Behaviour, Context
from ._background import BackgroundTasks
from ._deadletter import DeadLetterReason
from ._errors import MessageFailed
from ._mailbox import Mailbox
from ._message import Message
from ._supervisor import Child, log_extra

if TYPE_CHECKING:
    from ._kernel import Kernel

log = logging.getLogger("nexus_trio.agent")


@types.coroutine
def _resume(coro: Coroutine[Any, Any, Any], trap: Any) -> Generator[Any, Any, Any]:
    """Drive a coroutine that was already stepped once, passing its traps to Trio."""
    while True:
        try:
            value = yield trap
        except BaseException as exc:
            try:
                trap = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                trap = coro.send(value)
            except StopIteration as stop:
                return stop.value


class _HandlerFailed(Exception):
    """Carries a handler's exception (already logged and dead-lettered) out of the loop."""

    def __init__(self, error: Exception) -> None:
        super().__init__(error)
        self.error = error


class AgentCell(Child):
    """One agent address and everything that survives its restarts."""

    __slots__ = (
        "_background_failure",
        "_drain_before_exit",
        "_exit_requested",
        "_handler_cancel_reason",
        "_loop_scope",
        "_suspended",
        "background",
        "cancel_after_grace",
        "ctx",
        "current",
        "dead_lettered",
        "drain_on_stop",
        "failed",
        "handle_timeout",
        "handled",
        "kernel",
        "lazy",
        "mailbox",
        "overflow",
        "received",
        "spec",
        "timed_out",
    )

    def __init__(self, kernel: Kernel, spec: AgentSpec, agent_id: Any, name: str | None) -> None:
        config = kernel.config.kernel
        self._init_child(
            agent_id,
            name,
            spec.restart,
            spec.shutdown_timeout if spec.shutdown_timeout is not None else config.shutdown_grace,
        )
        # Without an explicit shutdown_timeout, a kernel shutdown that has already spent
        # its grace period cancels the agent at once instead of granting a second grace.
        self.cancel_after_grace = spec.shutdown_timeout is None
        self.kernel = kernel
        self.spec = spec
        self.lazy = spec.starts_lazily
        self.mailbox = Mailbox(spec.mailbox_capacity or config.mailbox_capacity)
        self.overflow = spec.overflow or config.overflow
        self.handle_timeout: float = spec.handle_timeout or config.handle_timeout
        self.ctx = Context(kernel, self, agent_id, name)
        self.current: Message | None = None
        self.background: BackgroundTasks | None = None
        self._background_failure: BaseException | None = None
        self.received = 0
        self.handled = 0
        self.failed = 0
        self.timed_out = 0
        self.dead_lettered = 0
        self._exit_requested = False
        self._drain_before_exit = False
        #: set by ``kernel.stop(..., drain=True)``: handle what is queued before stopping
        self.drain_on_stop = False
        self._loop_scope: trio.CancelScope | None = None
        self._suspended = False
        self._handler_cancel_reason: DeadLetterReason | None = None

    # --- the child interface ----------------------------------------------------------------

    def request_stop(self) -> None:
        self.request_exit(drain=self.drain_on_stop)

    def request_exit(self, *, drain: bool = False) -> None:
        self._exit_requested = True
        self._drain_before_exit = drain
        self.mailbox.wake_consumer()

    def cancel_current(self, reason: DeadLetterReason) -> bool:
        """Cancel the handler that is working on the current message, if it is suspended."""
        scope = self._loop_scope
        if scope is None or not self._suspended:
            return False
        self._handler_cancel_reason = reason
        scope.cancel()
        return True

    def on_retired(self, reason: str) -> None:
        self.mailbox.cancel_activation()
        self.mailbox.close()

    def background_tasks(self) -> BackgroundTasks:
        """The task group of the current run (``ctx.nursery``), created on first use."""
        if self.background is None:
            supervisor = self.supervisor
            if supervisor is None or supervisor._nursery is None or not self.running:
                raise RuntimeError(f"agent {self.label} is not running: no background tasks")
            self.background = BackgroundTasks(supervisor._nursery, self._background_failed)
        return self.background

    def _background_failed(self, error: BaseException) -> None:
        log.error(
            "background task of agent %s failed",
            self.label,
            exc_info=error,
            extra=log_extra(self),
        )
        # End the run; the supervisor sees the failure (see take_failure).
        self._background_failure = error
        if self.scope is not None:
            self.scope.cancel()

    def take_failure(self) -> BaseException | None:
        failure, self._background_failure = self._background_failure, None
        return failure

    def stops_quietly(self) -> bool:
        return self.spec.stops_quietly

    def start_dormant(self, activate: Callable[[], None]) -> bool:
        if not self.lazy or self.mailbox.queue:
            return False
        self.mailbox.activate_on_put(activate)
        return True

    async def run_once(self) -> None:
        """One run: fresh behaviour, ``on_start``, serve until asked to exit, ``on_stop``."""
        self._exit_requested = self.terminating
        behaviour: Behaviour = self.spec.factory()
        ctx = self.ctx
        failure: BaseException | None = None
        self.background = None
        self._background_failure = None
        if True:  # one block for the run, like the nursery it replaces
            try:
                await behaviour.on_start(ctx)
                self.signal_started()
                self.kernel._lifecycle_started(self)
                await self._serve(behaviour)
            except _HandlerFailed as exc:
                failure = exc.error
            except Exception as exc:
                failure = exc
                log.error(
                    "agent %s failed outside a handler",
                    self.label,
                    exc_info=exc,
                    extra=log_extra(self),
                )
            finally:
                current = self.current
                if current is not None:
                    # Cancelled from outside (stop past its timeout, shutdown) mid-handler.
                    self.current = None
                    self.kernel._dead_letter(
                        current,
                        DeadLetterReason.SHUTDOWN
                        if self.kernel._stopping
                        else DeadLetterReason.AGENT_STOPPED,
                        self.id,
                        detail="cancelled while being handled",
                    )
                with trio.CancelScope(shield=True) as scope:
                    if math.isfinite(self.shutdown_timeout):
                        scope.deadline = trio.current_time() + max(self.shutdown_timeout, 0.001)
                    try:
                        await behaviour.on_stop(ctx)
                    except Exception:
                        log.exception(
                            "on_stop of agent %s raised",
                            self.label,
                            extra=log_extra(self),
                        )
                background = self.background
                if background is not None:
                    self.background = None
                    await background.aclose(1.0)
        if failure is not None:
            raise failure

    async def _serve(self, behaviour: Behaviour) -> None:
        """Serve until asked to exit; a handler timeout ends one scope and we go on."""
        while True:
            with trio.CancelScope() as scope:
                self._loop_scope = scope
                await self._serve_in(scope, behaviour)
                return
            # Only a handler deadline or a request timeout cancels this scope.
            msg = self.current
            self.current = None
            self._suspended = False
            reason = self._handler_cancel_reason or DeadLetterReason.HANDLER_TIMEOUT
            self._handler_cancel_reason = None
            if msg is None:
                continue
            if reason is DeadLetterReason.HANDLER_TIMEOUT:
                self.timed_out += 1
                self.kernel._timed_out += 1
                log.warning(
                    "handler of agent %s timed out after %gs on message %s",
                    self.label,
                    self.handle_timeout,
                    msg.id,
                    extra=log_extra(self, msg),
                )
            self.kernel._dead_letter(msg, reason, self.id)

    async def _serve_in(self, scope: trio.CancelScope, behaviour: Behaviour) -> None:
        kernel = self.kernel
        mailbox = self.mailbox
        queue = mailbox.queue
        popleft = queue.popleft
        handler = behaviour.handle
        ctx = self.ctx
        now = kernel._now
        batch = kernel._batch_size
        timeout = self.handle_timeout
        latency = kernel._handle_latency
        while True:
            if not queue:
                if self._exit_requested:
                    return
                if kernel._draining:
                    kernel._check_drained()
                await mailbox.wait_nonempty()
                continue
            if self._exit_requested and not self._drain_before_exit:
                return
            n = batch
            while queue and n:
                n -= 1
                msg = popleft()
                if mailbox._waiting:
                    mailbox.room_freed()
                self.current = msg
                start = now()
                try:
                    coro = handler(ctx, msg)
                    try:
                        trap = coro.send(None)
                    except StopIteration as stop:
                        result = stop.value
                    else:
                        # The handler suspended: only now does it get a deadline (a
                        # timer costs more than a whole message when nothing awaits).
                        scope.deadline = start + timeout
                        self._suspended = True
                        try:
                            result = await _resume(coro, trap)
                        finally:
                            self._suspended = False
                            scope.deadline = math.inf
                except MessageFailed as exc:
                    # This message failed, the agent did not: go on with the next one.
                    self.current = None
                    self.failed += 1
                    kernel._failed += 1
                    kernel._dead_letter(
                        msg, exc.reason or DeadLetterReason.HANDLER_ERROR, self.id, error=exc
                    )
                    log.warning(
                        "agent %s failed message %s: %s",
                        self.label,
                        msg.id,
                        exc.detail,
                        extra=log_extra(self, msg),
                    )
                    continue
                except Exception as exc:
                    self.current = None
                    self.failed += 1
                    kernel._failed += 1
                    kernel._dead_letter(msg, DeadLetterReason.HANDLER_ERROR, self.id, error=exc)
                    log.error(
                        "handler of agent %s failed on message %s",
                        self.label,
                        msg.id,
                        exc_info=exc,
                        extra=log_extra(self, msg),
                    )
                    raise _HandlerFailed(exc) from exc
                self.current = None
                self.handled += 1
                kernel._handled += 1
                if not kernel._handled & 7:
                    # Sampled one message in eight kernel-wide (agents that handle few
                    # messages are seen too): recording costs more than a no-op handler.
                    latency.record(now() - start)
                    kernel._queue_wait.record((time_ns() // 1000 - msg.timestamp) / 1e6)
                if result is not None:
                    await kernel._route_result(self, msg, result)
                if self._exit_requested and not self._drain_before_exit:
                    return
            if queue:
                await trio.lowlevel.checkpoint()
