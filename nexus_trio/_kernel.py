"""The kernel: root nursery, registry, routing, send/request/spawn/stop and shutdown.

``async with open_kernel(config) as kernel:`` runs a root supervisor in a nursery;
leaving the block shuts the kernel down gracefully: new sends from outside are refused,
agents drain their mailboxes within ``shutdown_grace``, then the supervision tree is
stopped children-before-parents in reverse start order, and every message that was
still undelivered is dead-lettered. Routing is one dict lookup by id or by name.

Accounting: every message the kernel *accepts* (enqueued, evicted, or taken from a
handler to be routed) ends as handled, as a delivered reply, or as a dead letter; a
send refused with an exception is *rejected* (the caller still holds the message) and
counted apart. ``stats()`` shows both.
"""

from __future__ import annotations

import heapq
import logging
import math
import random
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final, final

import trio

from ._agent import AgentRef, AgentSpec, Handler, address_of, as_spec, log_fields
from ._cell import AgentCell
from ._config import Config, OverflowPolicy
from ._deadletter import DeadLetter, DeadLetterReason
from ._errors import (
    AgentNotFound,
    KernelShuttingDown,
    MailboxFull,
    NameTaken,
    RequestFailed,
    RequestTimeout,
    SupervisorEscalation,
    TransportUnavailable,
)
from ._events import EventKind, LifecycleEvent
from ._message import SYSTEM_ID, Address, Message, MessageKind, new_id
from ._stats import AgentStats, Histogram, KernelStats
from ._streams import Broadcast, Subscription
from ._supervisor import (
    Child,
    Supervisor,
    SupervisorNode,
    _Escalation,
    log_extra,
)
from ._transport import Transport

log = logging.getLogger("nexus_trio.kernel")
dead_letter_log = logging.getLogger("nexus_trio.dead_letters")

_LATE_MEMORY: Final = 4096


@final
class _Pending:
    """A request waiting for its reply."""

    __slots__ = ("error", "event", "reply")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.reply: Message | None = None
        self.error: BaseException | None = None

    def resolve(self, reply: Message) -> None:
        self.reply = reply
        self.event.set()

    def fail(self, error: BaseException) -> None:
        if not self.event.is_set():
            self.error = error
            self.event.set()

    def expire(self) -> None:
        """The deadline passed: wake the requester with neither reply nor error."""
        self.event.set()


@final
class Kernel:
    """A running kernel. Get one from :func:`open_kernel`; it is not meant to be built directly."""

    def __init__(self, config: Config, *, seed: int | None = None) -> None:
        self.config = config
        kc = config.kernel
        self._rng = random.Random(seed)
        self._batch_size = kc.batch_size
        self._send_timeout = kc.send_timeout
        self._routes: dict[Address, AgentCell] = {}
        self._nodes: dict[uuid.UUID, Child] = {}
        self._names: dict[str, Child] = {}
        self._pending: dict[uuid.UUID, _Pending] = {}
        # One timer for every pending request instead of a cancel scope per request:
        # a heap of (deadline, sequence, pending) watched by _request_timer.
        self._request_deadlines: list[tuple[float, int, _Pending]] = []
        self._request_seq = 0
        self._timer_scope: trio.CancelScope | None = None
        self._late: deque[uuid.UUID] = deque()
        self._late_set: set[uuid.UUID] = set()
        self._monitors: dict[uuid.UUID, set[uuid.UUID]] = {}
        self._accepted = 0
        self._handled = 0
        self._replies = 0
        self._forwarded = 0
        self._transport: Transport | None = None
        self._failed = 0
        self._timed_out = 0
        self._dead = 0
        self._restarts = 0
        self._dead_by_reason: Counter[str] = Counter()
        self._rejected: Counter[str] = Counter()
        self._handle_latency = Histogram()
        self._queue_wait = Histogram()
        self._dead_letters: Broadcast[DeadLetter] = Broadcast(kc.dead_letter_buffer)
        self._events: Broadcast[LifecycleEvent] = Broadcast(256)
        self._thread_limiter = trio.CapacityLimiter(config.runtime.blocking_thread_limit)
        self._now: Callable[[], float] = time.perf_counter
        self._accepting = True
        self._accepting_internal = True
        self._draining = False
        self._stopping = False
        self._drained = trio.Event()
        self._shutdown_started = False
        self._shutdown_finished = trio.Event()
        self._body_scope = trio.CancelScope()
        self._root_done = trio.Event()
        self._escalation: SupervisorEscalation | None = None
        sup = config.supervision
        from ._supervisor import Backoff

        self._root = SupervisorNode(
            self,
            Supervisor(
                strategy=sup.strategy,
                max_restarts=sup.max_restarts,
                within=sup.within_ms / 1000,
                backoff=Backoff(
                    initial=sup.backoff_initial_ms / 1000,
                    maximum=max(sup.backoff_max_ms, sup.backoff_initial_ms) / 1000,
                    jitter=sup.backoff_jitter,
                    reset_after=sup.backoff_reset_after_ms / 1000,
                ),
            ),
            "root",
        )
        self._nodes[self._root.id] = self._root

    # --- lifecycle of the kernel -----------------------------------------------------------

    async def _run_root(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        self._now = trio.lowlevel.current_clock().current_time
        root = self._root
        root.run = 1
        root.running = True
        root.started_at = trio.current_time()
        task_status.started()
        try:
            await root.run_once()
        except _Escalation as exc:
            self._escalation = exc.to_public("kernel")
            log.error("supervision escalated to the kernel: %s; shutting down", self._escalation)
            self._body_scope.cancel()
        finally:
            root.running = False
            self._root_done.set()

    async def shutdown(self, grace: float | None = None) -> None:
        """Shut down gracefully; idempotent, and safe to call from inside an agent's task.

        1. refuse new sends and spawns from outside (``KernelShuttingDown``);
        2. let agents drain their mailboxes for up to ``grace`` seconds (default
           ``shutdown_grace``); messages agents send to each other are still accepted;
        3. stop the supervision tree: children before parents, reverse start order,
           each within its ``shutdown_timeout``, then cancelled; ``on_stop`` runs;
        4. dead-letter every message still undelivered (reason ``shutdown``), fail
           pending requests, end the dead-letter and event streams.

        The shutdown itself is shielded from outside cancellation; it is bounded by the
        grace period and the shutdown timeouts.
        """
        if self._shutdown_started:
            await self._shutdown_finished.wait()
            return
        self._shutdown_started = True
        self._accepting = False
        if grace is None:
            grace = self.config.kernel.shutdown_grace
        with trio.CancelScope(shield=True):
            self._draining = True
            with trio.move_on_after(grace):
                while not self._is_drained():
                    self._drained = trio.Event()
                    await self._drained.wait()
            self._draining = False
            self._stopping = True
            self._accepting_internal = False
            self._root.request_stop()
            await self._root_done.wait()
            self._root.retire_all("shutdown")
            for pending in list(self._pending.values()):
                pending.fail(KernelShuttingDown("request"))
            self._dead_letters.finish()
            self._events.finish()
        self._shutdown_finished.set()

    def _is_drained(self) -> bool:
        return self._accepted == self._handled + self._replies + self._dead + self._forwarded

    def _check_drained(self) -> None:
        if self._is_drained():
            self._drained.set()

    @property
    def shutting_down(self) -> bool:
        """True from the moment :meth:`shutdown` starts (sends from outside are refused)."""
        return self._shutdown_started

    @property
    def stopping(self) -> bool:
        """True once the drain is over and the supervision tree is being stopped."""
        return self._stopping

    # --- spawning -----------------------------------------------------------------------------

    def spawn(
        self,
        target: AgentSpec | Supervisor | Handler | type[Any],
        *,
        name: str | None = None,
        supervisor: AgentRef | None = None,
    ) -> AgentRef:
        """Start an agent (or a supervisor) and return its address.

        ``name`` overrides the spec's name; names are unique (:class:`NameTaken`).
        Without ``supervisor`` the child goes under the kernel's root supervisor.
        Messages sent right after spawning are queued and handled after ``on_start``.
        """
        parent_sup: SupervisorNode | None = None
        if supervisor is not None:
            node = self._nodes.get(supervisor.id)
            if not isinstance(node, SupervisorNode):
                raise AgentNotFound(supervisor.id)
            parent_sup = node
        return self._spawn(target, name=name, parent=None, supervisor=parent_sup)

    def _spawn(
        self,
        target: Any,
        *,
        name: str | None,
        parent: Child | None,
        supervisor: SupervisorNode | None = None,
    ) -> AgentRef:
        if not self._accepting_internal or (parent is None and not self._accepting):
            raise KernelShuttingDown("spawn")
        node = self._build(target, name)
        if parent is not None:
            node.linked_parent = parent
            parent.linked_children.append(node)
            supervisor = supervisor or parent.supervisor
        (supervisor or self._root).add(node)
        return AgentRef(node.id, node.name)

    def _build(self, target: Any, name: str | None) -> Child:
        if isinstance(target, Supervisor):
            sup = SupervisorNode(self, target, name or target.name)
            self._register(sup)
            for child_target in target.children:
                sup.add(self._build(child_target, None))
            return sup
        spec = as_spec(target)
        if name is not None:
            spec = spec.with_options(name=name)
        cell = AgentCell(self, spec, new_id(), spec.name)
        self._register(cell)
        return cell

    def _register(self, node: Child) -> None:
        if node.name is not None:
            holder = self._names.get(node.name)
            if holder is not None:
                raise NameTaken(node.name, holder.id)
            self._names[node.name] = node
        self._nodes[node.id] = node
        if isinstance(node, AgentCell):
            self._routes[node.id] = node
            if node.name is not None:
                self._routes[node.name] = node
        if self._events._subscribers:
            self._publish_event(EventKind.SPAWNED, node)

    def _unroute(self, node: Child) -> None:
        if isinstance(node, AgentCell):
            self._routes.pop(node.id, None)
            if node.name is not None and self._routes.get(node.name) is node:
                del self._routes[node.name]

    def spawn_process(
        self,
        cmd: Sequence[str] | str,
        *,
        supervisor: AgentRef | None = None,
        **options: Any,
    ) -> AgentRef:
        """Start an agent written in any language as a child process (stdio bridge).

        ``options`` are those of :func:`nexus_trio.bridges.process_agent` (``name``,
        ``env``, ``cwd``, ``restart``, ``register_timeout``, ``line_limit``,
        ``shutdown_grace``, ``handle_timeout``, ``mailbox_capacity``, ...). The bridge is
        imported here, on use, so the core does not depend on it.
        """
        from .bridges.process import process_agent

        return self.spawn(process_agent(cmd, **options), supervisor=supervisor)

    def lookup(self, name: str) -> AgentRef:
        """The address of the live agent or supervisor called ``name``."""
        node = self._names.get(name)
        if node is None:
            raise AgentNotFound(name)
        return AgentRef(node.id, node.name)

    def agents(self) -> list[AgentRef]:
        """Addresses of the live agents, in spawn order."""
        return [AgentRef(n.id, n.name) for n in self._nodes.values() if isinstance(n, AgentCell)]

    # --- stopping one agent ---------------------------------------------------------------------

    async def stop(self, target: AgentRef | Address, *, drain: bool = False) -> None:
        """Stop an agent (or supervisor) for good, whatever its restart type.

        New sends to it fail with :class:`AgentNotFound` at once. The message being
        handled is finished (within the agent's ``shutdown_timeout``, then cancelled);
        with ``drain=True`` the messages already queued are handled first, otherwise
        they are dead-lettered (``agent_stopped``). ``on_stop`` runs. Agents it spawned
        stop before it. Returns when it has stopped.
        """
        address = address_of(target)
        node = self._names.get(address) if isinstance(address, str) else self._nodes.get(address)
        if node is None or node.retired:
            raise AgentNotFound(address)
        if node is self._root:
            raise ValueError("the root supervisor is stopped by shutdown(), not stop()")
        if isinstance(node, AgentCell):
            node.drain_on_stop = drain
        self._unroute(node)
        sup = node.supervisor
        assert sup is not None
        await sup.terminate(node, "stopped")

    # --- sending ------------------------------------------------------------------------------------

    @staticmethod
    def _make(
        to: AgentRef | Address | Message,
        payload: Any,
        kind: MessageKind,
        sender: uuid.UUID,
        trace_id: uuid.UUID | None,
    ) -> Message:
        if isinstance(to, Message):
            return to
        return Message(
            sender=sender, to=address_of(to), payload=payload, kind=kind, trace_id=trace_id
        )

    async def send(
        self,
        to: AgentRef | Address | Message,
        payload: Any = None,
        *,
        kind: MessageKind = MessageKind.COMMAND,
        sender: uuid.UUID = SYSTEM_ID,
        trace_id: uuid.UUID | None = None,
    ) -> Message:
        """Send a message (tell) and return it.

        * unknown recipient: :class:`AgentNotFound` at once;
        * room in the mailbox: enqueued without yielding (a cancelled caller gets
          ``Cancelled`` before anything is enqueued);
        * full: per the recipient's overflow policy; under ``block`` wait up to
          ``send_timeout`` for room, then :class:`MailboxFull` (not enqueued);
        * kernel shutting down: :class:`KernelShuttingDown`.
        """
        msg = self._make(to, payload, kind, sender, trace_id)
        if not self._accepting:
            self._rejected["shutting_down"] += 1
            raise KernelShuttingDown("send")
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            await self._deliver(msg, wait=True)
        except (AgentNotFound, MailboxFull) as exc:
            self._count_rejection(exc)
            raise
        return msg

    def send_nowait(
        self,
        to: AgentRef | Address | Message,
        payload: Any = None,
        *,
        kind: MessageKind = MessageKind.COMMAND,
        sender: uuid.UUID = SYSTEM_ID,
        trace_id: uuid.UUID | None = None,
    ) -> Message:
        """Like :meth:`send` but never waits: a full mailbox raises :class:`MailboxFull` at once
        (``drop_newest``/``drop_oldest`` policies still accept and dead-letter)."""
        msg = to if to.__class__ is Message else self._make(to, payload, kind, sender, trace_id)
        if not self._accepting:
            self._rejected["shutting_down"] += 1
            raise KernelShuttingDown("send")
        # The common case inline: a known recipient with room, not a reply.
        if msg.reply_to is None:
            cell = self._routes.get(msg.to)
            if cell is not None and cell.mailbox.try_put(msg):
                cell.received += 1
                self._accepted += 1
                return msg
        try:
            self._deliver_nowait(msg)
        except (AgentNotFound, MailboxFull) as exc:
            self._count_rejection(exc)
            raise
        return msg

    def _count_rejection(self, exc: Exception) -> None:
        self._rejected["no_such_agent" if isinstance(exc, AgentNotFound) else "mailbox_full"] += 1

    async def _send_from_agent(self, msg: Message) -> None:
        if not self._accepting_internal:
            self._rejected["shutting_down"] += 1
            raise KernelShuttingDown("send")
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            await self._deliver(msg, wait=True)
        except (AgentNotFound, MailboxFull) as exc:
            self._count_rejection(exc)
            raise

    def _send_nowait_from_agent(self, msg: Message) -> None:
        if not self._accepting_internal:
            self._rejected["shutting_down"] += 1
            raise KernelShuttingDown("send")
        try:
            self._deliver_nowait(msg)
        except (AgentNotFound, MailboxFull) as exc:
            self._count_rejection(exc)
            raise

    def _deliver_special(self, msg: Message) -> bool:
        """Replies to pending requests and late replies; True if ``msg`` was consumed."""
        reply_to = msg.reply_to
        if reply_to is None:
            return False
        pending = self._pending.pop(reply_to, None)
        if pending is not None:
            self._accepted += 1
            self._replies += 1
            pending.resolve(msg)
            return True
        if reply_to in self._late_set:
            self._accepted += 1
            self._dead_letter(
                msg, DeadLetterReason.LATE_REPLY, msg.to, detail="the request had timed out"
            )
            return True
        return False

    def _deliver_nowait(self, msg: Message) -> AgentCell | None:
        """Enqueue or apply the overflow policy without waiting.

        Returns None when done, or the cell whose full mailbox needs a blocking wait
        (raises :class:`MailboxFull` for ``reject``).
        """
        if msg.reply_to is not None and self._deliver_special(msg):
            return None
        cell = self._routes.get(msg.to)
        if cell is None:
            if self._transport is None:
                raise AgentNotFound(msg.to)
            self._transport.deliver_nowait(msg)
            self._accepted += 1
            self._forwarded += 1
            return None
        if cell.mailbox.try_put(msg):
            cell.received += 1
            self._accepted += 1
            return None
        policy = cell.overflow
        if policy is OverflowPolicy.DROP_NEWEST:
            cell.received += 1
            self._accepted += 1
            self._dead_letter(
                msg, DeadLetterReason.MAILBOX_OVERFLOW, cell.id, detail="drop_newest: mailbox full"
            )
            return None
        if policy is OverflowPolicy.DROP_OLDEST:
            oldest = cell.mailbox.evict_oldest()
            self._dead_letter(
                oldest,
                DeadLetterReason.MAILBOX_OVERFLOW,
                cell.id,
                detail="drop_oldest: evicted for a newer message",
            )
            cell.mailbox.force_put(msg)
            cell.received += 1
            self._accepted += 1
            return None
        raise MailboxFull(cell.id, cell.name, cell.mailbox.capacity, msg.id)

    async def _deliver(self, msg: Message, *, wait: bool) -> None:
        if msg.reply_to is not None and self._deliver_special(msg):
            return
        cell = self._routes.get(msg.to)
        if cell is None:
            if self._transport is None:
                raise AgentNotFound(msg.to)
            # The transport bounds its own wait by the send deadline (see Transport):
            # a cancel scope per message here would cost more than the publish.
            await self._transport.deliver(msg)
            self._accepted += 1
            self._forwarded += 1
            return
        if cell.mailbox.try_put(msg):
            cell.received += 1
            self._accepted += 1
            return
        if not wait or cell.overflow is not OverflowPolicy.BLOCK:
            self._deliver_nowait(msg)
            return
        with trio.move_on_after(self._send_timeout):
            try:
                await cell.mailbox.put_waiting(msg)
            except trio.ClosedResourceError:
                raise AgentNotFound(msg.to) from None
            cell.received += 1
            self._accepted += 1
            return
        raise MailboxFull(cell.id, cell.name, cell.mailbox.capacity, msg.id)

    async def _route(self, msg: Message) -> None:
        """Deliver a message the kernel took responsibility for: never raises, dead-letters."""
        if not self._accepting_internal:
            self._accepted += 1
            self._dead_letter(msg, DeadLetterReason.SHUTDOWN, msg.to, detail="kernel stopping")
            return
        try:
            await self._deliver(msg, wait=True)
        except AgentNotFound:
            self._accepted += 1
            reason = (
                DeadLetterReason.UNROUTABLE_REPLY
                if msg.kind is MessageKind.RESPONSE
                else DeadLetterReason.NO_SUCH_AGENT
            )
            self._dead_letter(msg, reason, msg.to)
        except MailboxFull:
            self._accepted += 1
            self._dead_letter(
                msg,
                DeadLetterReason.MAILBOX_FULL,
                msg.to,
                detail=f"still full after {self._send_timeout:g}s",
            )
        except TransportUnavailable as exc:
            self._accepted += 1
            self._dead_letter(
                msg, DeadLetterReason.TRANSPORT_UNAVAILABLE, msg.to, detail=exc.detail
            )

    def _route_nowait(self, msg: Message) -> None:
        if not self._accepting_internal:
            self._accepted += 1
            self._dead_letter(msg, DeadLetterReason.SHUTDOWN, msg.to, detail="kernel stopping")
            return
        try:
            self._deliver_nowait(msg)
        except AgentNotFound:
            self._accepted += 1
            self._dead_letter(msg, DeadLetterReason.NO_SUCH_AGENT, msg.to)
        except MailboxFull:
            self._accepted += 1
            self._dead_letter(msg, DeadLetterReason.MAILBOX_FULL, msg.to)
        except TransportUnavailable as exc:
            self._accepted += 1
            self._dead_letter(
                msg, DeadLetterReason.TRANSPORT_UNAVAILABLE, msg.to, detail=exc.detail
            )

    async def _route_result(self, cell: AgentCell, msg: Message, result: Any) -> None:
        """A handler returned something: a Message is routed, anything else answers the sender."""
        out = result if isinstance(result, Message) else msg.reply(cell.id, result)
        await self._route(out)

    # --- remote kernels ------------------------------------------------------------------------

    def attach_transport(self, transport: Transport) -> None:
        """Route messages for non-local addresses through ``transport`` (one per kernel)."""
        if self._transport is not None:
            raise RuntimeError("a transport is already attached to this kernel")
        self._transport = transport

    def detach_transport(self) -> None:
        self._transport = None

    def is_local(self, address: AgentRef | Address) -> bool:
        """True if ``address`` names an agent of this kernel."""
        return address_of(address) in self._routes

    async def deliver_from_remote(self, msg: Message) -> None:
        """Deliver a message that a transport received from a remote kernel.

        Local delivery rules apply (``AgentNotFound``, ``MailboxFull`` after the send
        deadline, ``KernelShuttingDown``); a reply to a pending local request resolves
        it. Messages for addresses that are not local are *not* forwarded again.
        """
        if not self._accepting_internal:
            raise KernelShuttingDown("remote delivery")
        if msg.reply_to is not None and self._deliver_special(msg):
            await trio.lowlevel.checkpoint()
            return
        if msg.to not in self._routes:
            raise AgentNotFound(msg.to)
        await self._deliver(msg, wait=True)

    # --- request/reply -------------------------------------------------------------------------

    async def request(
        self,
        to: AgentRef | Address,
        payload: Any = None,
        *,
        timeout: float | None = None,
        sender: uuid.UUID = SYSTEM_ID,
        trace_id: uuid.UUID | None = None,
    ) -> Any:
        """Send a Query and return the payload of the correlated reply.

        Raises :class:`RequestTimeout` after ``timeout`` seconds (default
        ``request_timeout``) — and then cancels the handler still working on the query,
        or takes the query out of the mailbox if it was not started (dead letter
        ``request_timeout``). :class:`RequestFailed` if the query was dead-lettered
        (e.g. its handler raised), :class:`AgentNotFound` / :class:`MailboxFull` /
        :class:`KernelShuttingDown` as for :meth:`send`.
        """
        if not self._accepting:
            self._rejected["shutting_down"] += 1
            raise KernelShuttingDown("request")
        reply = await self._request(
            address_of(to), payload, timeout=timeout, sender=sender, trace_id=trace_id
        )
        return reply.payload

    async def _request(
        self,
        to: Address,
        payload: Any,
        *,
        timeout: float | None,
        sender: uuid.UUID,
        trace_id: uuid.UUID | None,
    ) -> Message:
        if timeout is None:
            timeout = self.config.kernel.request_timeout
        if not timeout > 0:
            raise ValueError(f"request timeout must be > 0 seconds, got {timeout!r}")
        if not self._accepting_internal:
            raise KernelShuttingDown("request")
        query = Message(
            sender=sender, to=to, payload=payload, kind=MessageKind.QUERY, trace_id=trace_id
        )
        pending = _Pending()
        self._pending[query.id] = pending
        deadline = trio.current_time() + timeout
        self._request_seq += 1
        heapq.heappush(self._request_deadlines, (deadline, self._request_seq, pending))
        timer = self._timer_scope
        if timer is not None and deadline < timer.deadline:
            timer.deadline = deadline
        enqueued = False
        try:
            cell = self._routes.get(query.to)
            try:
                if cell is not None and cell.mailbox.has_room():
                    await self._deliver(query, wait=True)  # enqueued without waiting
                    enqueued = True
                else:
                    # It may wait for room: not past the request's own deadline.
                    with trio.move_on_after(timeout):
                        await self._deliver(query, wait=True)
                        enqueued = True
            except (AgentNotFound, MailboxFull) as exc:
                self._count_rejection(exc)
                raise
            if enqueued:
                await pending.event.wait()
        finally:
            self._pending.pop(query.id, None)
        if pending.reply is not None:
            return pending.reply
        if pending.error is not None:
            raise pending.error
        if enqueued:
            self._expire(query)
        raise RequestTimeout(query.id, to, timeout)

    async def _request_timer(self) -> None:
        """Expire pending requests at their deadlines (runs for the kernel's lifetime)."""
        heap = self._request_deadlines
        while True:
            now = trio.current_time()
            while heap and (heap[0][2].event.is_set() or heap[0][0] <= now):
                heapq.heappop(heap)[2].expire()
            with trio.CancelScope() as scope:
                scope.deadline = heap[0][0] if heap else math.inf
                self._timer_scope = scope
                await trio.sleep_forever()
            self._timer_scope = None

    def _expire(self, query: Message) -> None:
        """A request timed out: cancel the handler working on it, or unqueue it."""
        self._late.append(query.id)
        self._late_set.add(query.id)
        if len(self._late) > _LATE_MEMORY:
            self._late_set.discard(self._late.popleft())
        cell = self._routes.get(query.to)
        if cell is None:
            return
        if cell.current is query:
            cell.cancel_current(DeadLetterReason.REQUEST_TIMEOUT)
        elif cell.mailbox.remove(query):
            self._dead_letter(
                query,
                DeadLetterReason.REQUEST_TIMEOUT,
                cell.id,
                detail="the requester stopped waiting before it was handled",
            )

    # --- dead letters ----------------------------------------------------------------------------

    def _dead_letter(
        self,
        msg: Message,
        reason: DeadLetterReason,
        recipient: Address,
        *,
        error: BaseException | None = None,
        detail: str = "",
    ) -> None:
        self._dead += 1
        self._dead_by_reason[reason.value] += 1
        cell = self._routes.get(recipient) or self._nodes.get(recipient)  # type: ignore[arg-type]
        if isinstance(cell, AgentCell):
            cell.dead_lettered += 1
        if msg.kind is MessageKind.QUERY and self._pending:
            pending = self._pending.pop(msg.id, None)
            if pending is not None:
                pending.fail(RequestFailed(msg.id, msg.to, reason.value, error))
        if dead_letter_log.isEnabledFor(logging.INFO):
            dead_letter_log.info(
                "dead letter %s to %s: %s%s",
                msg.id,
                recipient,
                reason.value,
                f" ({detail})" if detail else "",
                extra={
                    **(
                        log_extra(cell, msg)
                        if cell is not None
                        else log_fields(recipient, None, msg)
                    ),
                    "reason": reason.value,
                },
            )
        self._dead_letters.publish(DeadLetter(msg, reason, recipient, error, detail))

    def dead_letters(self, buffer: int = 1024) -> Subscription[DeadLetter]:
        """Subscribe to dead letters from now on.

        ``async with kernel.dead_letters() as stream: async for letter in stream: ...``.
        The subscription buffers ``buffer`` letters; past that, newer letters are
        dropped for this subscriber and counted (``stream.dropped`` and
        ``stats().dead_letter_stream_dropped``). The stream ends at shutdown.
        """
        return self._dead_letters.subscribe(buffer)

    def recent_dead_letters(self) -> list[DeadLetter]:
        """The last ``dead_letter_buffer`` dead letters, oldest first (kept without subscribers)."""
        return list(self._dead_letters.recent)

    # --- lifecycle events and monitors ----------------------------------------------------------

    def events(self, buffer: int = 1024) -> Subscription[LifecycleEvent]:
        """Subscribe to lifecycle events (spawned, started, failed, restarted, stopped,
        escalated); bounded like :meth:`dead_letters`."""
        return self._events.subscribe(buffer)

    def report_event(self, event: LifecycleEvent) -> None:
        """Publish an event that happened outside the supervision tree on ``events()``.

        For transports and bridges: e.g. ``unreachable`` for a remote node that stopped
        answering.
        """
        self._events.publish(event)

    def fail_request(self, request_id: uuid.UUID, error: BaseException) -> bool:
        """Fail a pending :meth:`request` with ``error`` (raised in the requester).

        For transports that learn a remote query will never be answered (its node is
        gone). Returns False if no such request is pending (answered or timed out).
        """
        pending = self._pending.pop(request_id, None)
        if pending is None:
            return False
        pending.fail(error)
        return True

    def _publish_event(
        self, kind: EventKind, node: Child, reason: str = "", error: BaseException | None = None
    ) -> None:
        self._events.publish(
            LifecycleEvent(
                kind, node.id, node.name, trio.current_time(), reason, error, node.restarts
            )
        )

    def _lifecycle_started(self, cell: AgentCell) -> None:
        if self._events._subscribers:
            self._publish_event(EventKind.STARTED, cell)

    def _lifecycle_failed(self, child: Child, error: BaseException) -> None:
        if not isinstance(error, _Escalation) and not isinstance(child, AgentCell):
            log.error("%s failed", child.label, exc_info=error, extra=log_extra(child))
        if self._events._subscribers:
            self._publish_event(EventKind.FAILED, child, type(error).__name__, error)
        self._notify_monitors(child, "failed", repr(error))

    def _lifecycle_restarted(self, child: Child, delay: float, error: BaseException | None) -> None:
        self._restarts += 1
        log.info(
            "restarting %s in %.3fs (restart %d)",
            child.label,
            delay,
            child.restarts,
            extra=log_extra(child),
        )
        if self._events._subscribers:
            self._publish_event(EventKind.RESTARTED, child, f"backoff {delay:.6f}s", error)

    def _lifecycle_escalated(
        self, sup: SupervisorNode, child: Child, error: BaseException | None, restarts: int
    ) -> None:
        log.error(
            "supervisor %s: restart intensity exceeded (%d restarts within %gs) after %s failed; escalating",
            sup.label,
            restarts,
            sup.spec.within,
            child.label,
            extra=log_extra(sup),
        )
        if self._events._subscribers:
            self._publish_event(EventKind.ESCALATED, sup, f"child {child.label}", error)

    def _lifecycle_retired(self, child: Child, reason: str) -> None:
        self._unroute(child)
        self._nodes.pop(child.id, None)
        if child.name is not None and self._names.get(child.name) is child:
            del self._names[child.name]
        if isinstance(child, AgentCell):
            dl_reason = (
                DeadLetterReason.SHUTDOWN
                if reason == "shutdown"
                else DeadLetterReason.AGENT_STOPPED
            )
            for msg in child.mailbox.take_all():
                self._dead_letter(msg, dl_reason, child.id, detail=f"agent stopped ({reason})")
        child.on_retired(reason)
        if self._events._subscribers:
            self._publish_event(EventKind.STOPPED, child, reason)
        self._notify_monitors(child, "stopped", reason)
        self._monitors.pop(child.id, None)

    def _monitor(self, watcher: uuid.UUID, target: Address) -> None:
        node = self._names.get(target) if isinstance(target, str) else self._nodes.get(target)
        if node is None or node.retired:
            self._route_nowait(
                Message(
                    sender=target if isinstance(target, uuid.UUID) else SYSTEM_ID,
                    to=watcher,
                    kind=MessageKind.EVENT,
                    payload={
                        "event": "stopped",
                        "agent": None if isinstance(target, str) else str(target),
                        "name": target if isinstance(target, str) else None,
                        "reason": "noproc",
                    },
                )
            )
            return
        self._monitors.setdefault(node.id, set()).add(watcher)

    def _notify_monitors(self, child: Child, event: str, reason: str) -> None:
        watchers = self._monitors.get(child.id)
        if not watchers:
            return
        for watcher in list(watchers):
            self._route_nowait(
                Message(
                    sender=child.id,
                    to=watcher,
                    kind=MessageKind.EVENT,
                    payload={
                        "event": event,
                        "agent": str(child.id),
                        "name": child.name,
                        "reason": reason,
                    },
                )
            )

    # --- introspection ------------------------------------------------------------------------------

    def stats(self, *, agents: bool = False) -> KernelStats:
        """A frozen snapshot of the counters; ``agents=True`` adds one entry per live agent."""
        cells = [n for n in self._nodes.values() if isinstance(n, AgentCell)]
        per_agent: tuple[AgentStats, ...] = ()
        if agents:
            per_agent = tuple(
                AgentStats(
                    id=c.id,
                    name=c.name,
                    state=c.state(),
                    received=c.received,
                    handled=c.handled,
                    failed=c.failed,
                    timed_out=c.timed_out,
                    dead_lettered=c.dead_lettered,
                    restarts=c.restarts,
                    mailbox_depth=len(c.mailbox),
                    mailbox_high_water=c.mailbox.high_water,
                    mailbox_capacity=c.mailbox.capacity,
                )
                for c in cells
            )
        return KernelStats(
            agents_alive=len(cells),
            accepted=self._accepted,
            handled=self._handled,
            replies_delivered=self._replies,
            failed=self._failed,
            timed_out=self._timed_out,
            dead_lettered=self._dead,
            dead_letters_by_reason=dict(self._dead_by_reason),
            dead_letter_stream_dropped=self._dead_letters.dropped,
            rejected=dict(self._rejected),
            forwarded=self._forwarded,
            in_flight=self._accepted - self._handled - self._replies - self._dead - self._forwarded,
            restarts=self._restarts,
            max_mailbox_depth=max((len(c.mailbox) for c in cells), default=0),
            handle_latency=self._handle_latency.snapshot(),
            queue_wait=self._queue_wait.snapshot(),
            agents=per_agent,
        )

    def describe(self) -> dict[str, Any]:
        """The supervision tree with states and mailbox depths (for diagnostics dumps)."""

        def node(child: Child) -> dict[str, Any]:
            entry: dict[str, Any] = {
                "id": str(child.id),
                "name": child.name,
                "state": child.state(),
                "restarts": child.restarts,
            }
            if isinstance(child, SupervisorNode):
                entry["kind"] = "supervisor"
                entry["strategy"] = child.spec.strategy.value
                entry["children"] = [node(c) for c in child.children]
            elif isinstance(child, AgentCell):
                entry["kind"] = "agent"
                entry["mailbox_depth"] = len(child.mailbox)
                entry["mailbox_capacity"] = child.mailbox.capacity
                entry["handling"] = str(child.current.id) if child.current is not None else None
            return entry

        return node(self._root)


@asynccontextmanager
async def open_kernel(
    config: Config | None = None, *, seed: int | None = None
) -> AsyncIterator[Kernel]:
    """Run a kernel for the duration of the ``async with`` block.

    Leaving the block shuts the kernel down gracefully (see :meth:`Kernel.shutdown`),
    also when the block raises; the exception then propagates unchanged. If supervision
    escalates to the kernel, the block is cancelled, the kernel shuts down and
    :class:`SupervisorEscalation` is raised. ``seed`` makes backoff jitter reproducible.
    """
    kernel = Kernel(config if config is not None else Config(), seed=seed)
    body_error: BaseException | None = None
    timer = trio.CancelScope()

    async def request_timer() -> None:
        with timer:
            await kernel._request_timer()

    async with trio.open_nursery() as nursery:
        await nursery.start(kernel._run_root)
        nursery.start_soon(request_timer)
        try:
            with kernel._body_scope:
                yield kernel
        except BaseException as exc:
            body_error = exc
        finally:
            try:
                await kernel.shutdown()
            finally:
                timer.cancel()
    if body_error is not None:
        raise body_error
    if kernel._escalation is not None:
        raise kernel._escalation
