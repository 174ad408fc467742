"""The router: addresses, delivery with overflow policies, and request correlation.

Routing is one dict lookup by id or by name. There is one delivery path,
:meth:`Router.deliver`, with a fast branch (a known local recipient with room: a
``send_nowait`` on its memory channel, no yield) and a slow branch for everything else
(replies to pending requests, remote addresses through the transport, full mailboxes
under each overflow policy). The entry points differ only in who is asking (a caller
outside the kernel is refused once shutdown starts, an agent only once the drain is
over) and in what happens to a message that cannot be delivered (raised to the caller,
or dead-lettered when the kernel already took responsibility for it).

Requests keep one timer for all of them: a heap of deadlines watched by one task.

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

import contextlib
import enum
import heapq
import itertools
import math
import threading
import uuid
import weakref
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from threading import get_ident
from typing import Any, Final, Protocol, TypeVar, final
from uuid import UUID as _UUID

import trio

from ._brief import brief
from ._child import Child
from ._config import OverflowPolicy
from ._deadletter import DeadLetterReason
from ._errors import (
    AgentNotFound,
    KernelShuttingDown,
    MailboxFull,
    MessageFailed,
    NameTaken,
    RequestFailed,
    RequestTimeout,
    TransportUnavailable,
    unsendable,
)
from ._gc import HeapKeeper
from ._ledger import Ledger
from ._mailbox import Mailbox
from ._message import SYSTEM_ID, Address, Message, MessageKind, drawn_before, id_mark, id_value
from ._transport import Transport

current_task = trio.lowlevel.current_task


@final
class _OutsideSenders:
    """``with senders:`` around a transport's ``deliver`` of a send from outside the
    agents: its task is in ``tasks`` meanwhile (see Router.transport_wait). One object
    for every send, nothing allocated per send (a task sends one message at a time)."""

    __slots__ = ("tasks",)

    def __init__(self) -> None:
        self.tasks: set[trio.lowlevel.Task] = set()

    def __enter__(self) -> None:
        self.tasks.add(current_task())

    def __exit__(self, *exc: object) -> None:
        self.tasks.discard(current_task())


_LATE_MEMORY: Final = 4096
#: how many queries the transport handed over whose answers go back to it, whoever their
#: sender is (see Router.answer_through_transport), the last ones
_TRANSPORT_ANSWERS_MEMORY: Final = 65536
#: how many agents (and supervisors) stopped for good while the kernel ran (after a
#: failure, or stopped) an AgentNotFound for their id or name can tell of, the last ones:
#: the record holds up to twice as many entries (an id and a name each), each a key and
#: a shared text (some 200 bytes an agent)
_ENDED_MEMORY: Final = 1000
#: what an AgentNotFound adds for an address that stopped for good after a failure, by its
#: ``stopped`` event's reason (the subtree of a supervisor given up on has its reason)
_ENDED_AFTER_FAILURE: Final = {
    "restart_intensity": "it was given up on: stopped for good when the restart intensity"
    " was exceeded",
    "escalated": "it was given up on: stopped for good when its failure escalated",
    "failed": "it stopped for good after a failure and was not restarted",
}
#: what an AgentNotFound adds for an address that was stopped for good without a
#: failure, by its ``stopped`` event's reason (another reason: _STOPPED_WITH)
_ENDED_STOPPED: Final = {
    "stopped": "it was stopped for good by kernel.stop: a stopped agent takes no messages",
    "normal": "it has stopped: its run ended without an error, and its restart type does"
    " not restart it",
    "parent_exited": "it stopped with the run of the agent that spawned it (ctx.spawn)",
    "parent_stopped": "it stopped with the agent that spawned it (ctx.spawn)",
}
_FAILURE_TEXTS: Final = frozenset(_ENDED_AFTER_FAILURE.values())
_STOPPED_WITH: Final = "it was stopped for good, reason {!r}: a stopped agent takes no messages"
#: what an AgentNotFound adds for an id drawn in this process before the kernel started
_OTHER_KERNEL: Final = (
    "it is the id of an agent of another kernel, drawn before this kernel started: an"
    " AgentRef addresses only an agent of the kernel that spawned it"
)
#: ... for an id of an agent that another kernel of this process has (or had, among
#: the stops it remembers), one started after this kernel or spawned after it started
_BESIDE_KERNEL: Final = (
    "it is the id of an agent of another kernel of this process, {state}: an AgentRef"
    " addresses only an agent of the kernel that spawned it"
)
#: ... for an id of an agent of a kernel of this process closed since (see _CLOSED)
_CLOSED_KERNEL: Final = (
    "it is the id of an agent of another kernel of this process, closed since: an AgentRef"
    " addresses only an agent of the kernel that spawned it"
)
#: ... for an id whose high half is not that of this process's ids
_OTHER_PROCESS: Final = (
    "it is no id drawn in this process: the id of an agent of another process (an"
    " AgentRef pickled or sent from there) or one made by hand; an AgentRef addresses"
    " only an agent of the kernel that spawned it"
)
_QUERY: Final = MessageKind.QUERY
#: the detail of a monitor notice dead-lettered because its watcher's mailbox was full
_NOTICE_REFUSED: Final = "full: a monitor notice does not wait for room"
#: the detail of a routed message dead-lettered because a full ``reject`` mailbox refused it
_REJECTED: Final = "full: its overflow policy is reject (no wait)"
#: the detail of a message an agent's run routed to its own full ``block`` mailbox (a
#: handler's result): refused at once, as no room could come (see _full_for_itself)
_OWN_FULL: Final = "its own mailbox, full: only the run that routed it takes from it (no wait)"
#: the deadline heap is swept of finished requests only past this many (see _finish)
_SWEEP_AT: Final = 64


class KernelPhase(enum.IntEnum):
    """The one lifecycle of a kernel, in order."""

    #: everything is accepted
    RUNNING = 0
    #: shutdown started: callers outside the kernel are refused, agents drain their mailboxes
    DRAINING = 1
    #: the grace period is over: nothing more is handled, the tree is being stopped
    STOPPING = 2
    #: every agent stopped and every undelivered message dead-lettered
    STOPPED = 3


# Module constants: reading an enum member as a class attribute costs ~170 ns on
# Python 3.11 (a descriptor call), more than the rest of a send's checks together.
_RUNNING: Final = KernelPhase.RUNNING
#: what :meth:`Router.fast` returns for a tell the transport took that asks its sender to
#: yield once (it sealed a full batch: see ``TakesTells``)
TAKEN_YIELD: Final = 2
#: what :meth:`Router.fast` returns when no local agent has the address (for
#: :meth:`Router.send`: the message goes straight to the transport, if any)
NO_LOCAL: Final = 3
_DRAINING: Final = KernelPhase.DRAINING
_STOPPING: Final = KernelPhase.STOPPING
_STOPPED: Final = KernelPhase.STOPPED


class Recipient(Protocol):
    """What the router needs of a local agent (an ``AgentCell``)."""

    id: uuid.UUID
    name: str | None
    mailbox: Mailbox
    overflow: OverflowPolicy
    received: int
    dormant: bool
    current: Message | None

    def wake(self) -> None: ...

    def cancel_current(self, reason: DeadLetterReason) -> bool: ...


#: what a pending request's ``reply`` is until its reply comes (a payload may be None)
_NO_REPLY: Final = object()


@final
class _Pending:
    """A request waiting for its reply.

    The requester parks itself with Trio's ``wait_task_rescheduled`` and is rescheduled
    once, by the reply, a failure or its deadline: a ``trio.Event`` per request (its
    parking lot and its waiters' set) cost a tenth of a local request/reply.
    """

    __slots__ = ("abandoned", "at", "done", "error", "reply", "task", "woken")

    def __init__(self) -> None:
        #: the reply's payload (_NO_REPLY until one came)
        self.reply: Any = _NO_REPLY
        self.error: BaseException | None = None
        #: its entry in the deadline heap is no longer needed: the request is over
        #: (answered, failed or cancelled), or the timer took the entry out to expire it
        self.done = False
        #: the reply, a failure or the deadline came (later ones change nothing)
        self.woken = False
        #: the requester while it waits
        self.task: trio.lowlevel.Task | None = None
        #: the requester was cancelled while it waited: an answer that comes before it
        #: resumes is a late reply, not one for it (it gets its Cancelled)
        self.abandoned = False
        #: where a handler passed the query on to (a pool's router returning it for a
        #: worker, same id), if it did: a timeout or cancel stops the handler there
        self.at: Address | None = None

    def resolve(self, payload: Any) -> None:
        # Kept even after the deadline woke the requester: if it has not resumed yet,
        # the answer it gets is the reply (it was counted as delivered).
        self.reply = payload
        self._wake()

    def fail(self, error: BaseException) -> None:
        if not self.woken:
            self.error = error
            self._wake()

    def expire(self) -> None:
        """The deadline passed: wake the requester with neither reply nor error."""
        self._wake()

    def _wake(self) -> None:
        if self.woken:
            return
        self.woken = True
        task = self.task
        if task is not None:
            self.task = None
            trio.lowlevel.reschedule(task)

    def abort(self, raise_cancel: Any) -> trio.lowlevel.Abort:
        """The requester, parked until woken (a checkpoint, as ``trio.Event.wait``; see
        ``Router.request``), was cancelled."""
        self.task = None
        self.abandoned = True
        return trio.lowlevel.Abort.SUCCEEDED


def detached_phase(phase: KernelPhase) -> str:
    """What a KernelShuttingDown for a message to or from another kernel says of the
    kernel's ``phase`` once its transport is detached: ``detached`` while it runs on."""
    return "detached" if phase is _RUNNING else phase.name.lower()


_V = TypeVar("_V")


def _keep_newest(table: dict[int, _V], key: int, value: _V, limit: int) -> None:
    """Put ``key`` in ``table`` as its newest entry (moved there if it was in already),
    dropping the oldest past ``limit`` entries (a dict keeps insertion order)."""
    table.pop(key, None)
    table[key] = value
    if len(table) > limit:
        del table[next(iter(table))]


@final
class DeliveryRunFailed(Exception):
    """A fault (a bug: nothing raises there by design) stopped
    :meth:`TransportHandle.deliver_run_nowait` partway; raised from that fault. ``taken``
    is the index of the first message it did not take: those before it are delivered and
    counted, and are not the transport's to count as failed."""

    def __init__(self, taken: int) -> None:
        super().__init__(taken)  # (its one argument: pickled and copied whole)
        self.taken = taken

    def __str__(self) -> str:
        return f"delivering a run of messages failed at message {self.taken}"


@final
class TransportHandle:
    """What :meth:`Kernel.attach_transport` returns: the transport's way into the kernel.

    A transport feeds messages from remote kernels in with :meth:`deliver`, reports
    queries that will never be answered with :meth:`fail_request`, and lets go with
    :meth:`detach`. These hooks are not on the user-facing ``Kernel``.
    """

    __slots__ = ("_router", "_thread", "_token", "transport")

    def __init__(self, router: Router, transport: Transport) -> None:
        self._router = router
        #: the thread of the kernel's Trio run (the router's: read once here, for the
        #: deliveries' check)
        self._thread = router.thread
        #: the kernel's Trio run (made in it: ``attach_transport`` is thread-checked), for
        #: :meth:`deliver_threadsafe`
        self._token = trio.lowlevel.current_trio_token()
        self.transport = transport

    async def deliver(self, msg: Message) -> None:
        """Deliver a message that arrived from a remote kernel (local rules apply:
        ``AgentNotFound``, ``MailboxFull`` after the send deadline, ``KernelShuttingDown``;
        a reply to a pending local request resolves it; never forwarded again)."""
        await self._router.deliver_from_remote(msg)

    def deliver_nowait(self, msg: Message) -> bool:
        """:meth:`deliver` without waiting, while the kernel runs: True if the message
        was taken (enqueued, per a ``drop_*`` overflow policy, or a reply consumed),
        False if the recipient's mailbox is full under ``block`` or ``reject`` (the
        transport then waits with :meth:`deliver`). ``AgentNotFound`` for an address not
        of this kernel, ``KernelShuttingDown`` once the kernel drains. Never forwarded
        again; a refusal is the transport's to count. Not thread-checked (the check
        costs ~490 machine instructions a call, every request and reply a node takes in:
        docs/distributed.md, Limits): call it in the kernel's thread only, or, from
        another thread, :meth:`deliver_threadsafe`."""
        return self._router.deliver_from_remote_nowait(msg)

    def deliver_threadsafe(self, msg: Message) -> bool:
        """:meth:`deliver_nowait` from a thread other than the kernel's Trio run's (a
        transport whose I/O runs in a thread of its own, not started by Trio): the call
        runs in the kernel's thread (``trio.from_thread.run_sync`` with the run's token)
        while the calling thread waits, and its answer or its error comes back.
        ``RuntimeError`` naming the call in the kernel's own thread (it would wait for
        itself: call :meth:`deliver_nowait` there); ``KernelShuttingDown`` once the
        kernel's run has ended. The way across threads costs what Trio's does (a wake-up
        of the run and a wait), not the hot path's: :meth:`deliver_nowait` stays
        unchecked."""
        if get_ident() == self._thread:
            raise RuntimeError(
                "handle.deliver_threadsafe was called in the thread of the kernel's Trio run,"
                " where it would wait for itself: call handle.deliver_nowait there"
            )
        try:
            return trio.from_thread.run_sync(
                self._router.deliver_from_remote_nowait, msg, trio_token=self._token
            )
        except trio.RunFinishedError:
            raise KernelShuttingDown("deliver", "stopped") from None

    def deliver_run_nowait(self, msgs: Sequence[Message], start: int) -> int:
        """:meth:`deliver_nowait` for ``msgs[start:]`` in order (the tells of a batch), as
        long as each is a plain enqueue: a tell to a local agent whose mailbox has room.
        Returns the index of the first message not taken (``len(msgs)`` if all were),
        which the transport then takes with :meth:`deliver_nowait`, and the rest after it.
        One lookup per run of messages to the same address, not one per message; the
        counts are those :meth:`deliver_nowait` keeps. A fault partway raises
        :class:`DeliveryRunFailed` saying how far it got; a ``RuntimeError`` naming the
        call, in a thread other than the kernel's Trio run's (nothing taken)."""
        if get_ident() != self._thread:
            raise wrong_thread("handle.deliver_run_nowait")
        return self._router.deliver_from_remote_run(msgs, start)

    def fail_request(self, request_id: uuid.UUID, error: BaseException) -> bool:
        """Fail a pending request with ``error``; False if none is pending."""
        if threading.get_ident() != self._router.thread:
            raise wrong_thread("handle.fail_request")
        return self._router.fail_request(request_id, error)

    def relay_nowait(self, msg: Message) -> None:
        """Pass on, through the transport, an answer that came from a remote kernel for a
        requester on another one (a query a handler here sent on, as a router agent
        does): counted in ``accepted`` and ``forwarded``, as a handler's message sent on
        is, in every phase (also while the kernel drains or after it stopped: the
        answer is no work for this kernel, and its requester waits for it). Raises what
        the transport raises (``TypeError`` / ``ValueError`` for an answer its wire form
        cannot carry); ``KernelShuttingDown`` once the transport is detached."""
        if threading.get_ident() != self._router.thread:
            raise wrong_thread("handle.relay_nowait")
        self._router.relay_nowait(msg)

    def answer_through_transport(self, query_id: uuid.UUID) -> None:
        """Every answer to query ``query_id``, which the transport hands over next, goes
        back to the transport (``deliver_nowait``), whatever its sender is: also an agent
        here, which would otherwise take it as a message (a durable message keeps its
        real sender, and its answer acks it). The last 65,536 such queries are kept."""
        if threading.get_ident() != self._router.thread:
            raise wrong_thread("handle.answer_through_transport")
        self._router.answer_through_transport(query_id)

    def gave_up(self, request_id: uuid.UUID) -> bool:
        """True if a request of this kernel with id ``request_id`` stopped waiting (timed
        out, cancelled, failed) not long ago (the last few thousand): what answers it now
        is late, as a reply dead-lettered ``late_reply`` is."""
        return request_id.int in self._router.late_queries

    def waiting_for_room(
        self, outside: bool | None = None
    ) -> contextlib.AbstractContextManager[None]:
        """Wrap a wait of the transport for room to take a message (credit from its
        destination, room in an outgoing buffer), in the task that sends it.
        ``outside``: what an :class:`OutsideTold` transport was told of the send (None:
        the kernel looks up the task it marked).

        For a send from outside the agents (``Kernel.send``, ``Kernel.request``), as for
        one waiting for room in a full local mailbox, a shutdown that starts during the
        wait (or had started when it began) ends it: :class:`KernelShuttingDown` is
        raised here, counted in ``rejected`` (``shutting_down``); the transport must then
        not take the message. A send of an agent waits on (sends between agents go on
        during the drain). Cheap when the transport does not wait: it is not called."""
        return self._router.transport_wait(outside)

    def cancel_query(self, query_id: uuid.UUID, to: Address) -> bool:
        """The remote requester of query ``query_id`` stopped waiting (timeout or cancel).

        As for a local request: a handler working on it is cancelled (dead letter
        ``request_timeout``), a copy still queued is skipped when it comes out, and a reply
        produced anyway is dead-lettered ``late_reply``. True if a running handler was
        cancelled.
        """
        if threading.get_ident() != self._router.thread:
            raise wrong_thread("handle.cancel_query")
        return self._router.expire_query(query_id, to)

    def detach(
        self,
        left: Callable[[Message], str | None] | None = None,
        *,
        at_close: Callable[[], None] | None = None,
    ) -> None:
        """Let go (see :meth:`Kernel.detach_transport` for ``left`` and ``at_close``)."""
        if threading.get_ident() != self._router.thread:
            raise wrong_thread("handle.detach")
        if self._router.transport is self.transport:
            self._router.use_transport(None)
            self._router.left = left
            self._router.left_at_close = at_close


@final
class AgentWalk:
    """The agents live when the walk started, in spawn order, a slice at a time
    (:meth:`Router.walk_agents`), with no copy of them: :meth:`take` follows the router's
    list of live agents from where the last one stopped.

    Between two slices the agents may spawn and stop: one spawned after the walk started
    is not in it (it comes after the last agent of the start), one that stops before the
    walk reaches it is not in it either (the router steps the walk past it), and no
    agent is taken twice.
    """

    __slots__ = ("__weakref__", "_last", "_next")

    def __init__(self, first: Child | None, last: Child | None) -> None:
        #: the next agent to take; None once done
        self._next = first
        #: the last agent to take: the latest spawned of those live when the walk began
        #: that has not stopped since
        self._last = last

    @property
    def done(self) -> bool:
        """True once every agent of the walk was taken."""
        return self._next is None

    def take(self, most: int) -> list[Child]:
        """The next ``most`` agents of the walk (fewer at its end), in spawn order."""
        taken: list[Child] = []
        node, last = self._next, self._last
        for _ in range(most):
            if node is None:
                break
            taken.append(node)
            node = None if node is last else node.spawn_next
        self._next = node
        return taken

    def _leave(self, node: Child) -> None:
        """``node`` (linked still) stops: step past it (the router's call)."""
        if node is self._last:
            if self._next is node:  # the last one left
                self._next = None
                return
            self._last = node.spawn_prev  # (at or after _next: the walk is not past it)
        if self._next is node:
            self._next = node.spawn_next


def _not_taken(exc: KeyboardInterrupt) -> bool:
    return False


def _walking(ref: weakref.ref[AgentWalk]) -> bool:
    walk = ref()
    return walk is not None and not walk.done


def _id_in_text(address: str) -> _UUID | None:
    """The UUID ``address`` spells, if it is one (for an error's hint only)."""
    try:
        return _UUID(address)
    except ValueError:
        return None


def wrong_thread(what: str) -> RuntimeError:
    """The error of a synchronous call of the kernel's (``send_nowait``, ``spawn``,
    ``ctx.stop``, ``ctx.monitor``, ``ctx.demonitor``, ``fail_request``, ``fail_query``,
    ``report_event``, ``attach_transport``, ``detach_transport``, ``scan_agents``; a
    transport handle's ``detach``, ``fail_request``, ``cancel_query``, ``relay_nowait``,
    ``answer_through_transport``, ``deliver_run_nowait``) made in a thread other than its
    Trio run's: it would change the kernel's state under its run and wake tasks from
    outside it (an agent's first message starts its task there), failing half-way with
    one of Trio's errors that names neither the call nor the thread, the message counted
    as accepted and left unhandled."""
    return RuntimeError(
        f"{what} was called in the thread {threading.current_thread().name!r}, not the"
        " thread of the kernel's Trio run: the kernel is not thread-safe. From a worker"
        " thread (ctx.run_sync, trio.to_thread.run_sync) call it through"
        f" trio.from_thread.run_sync({what}, ...)"
    )


#: what an AgentNotFound for SYSTEM_ID adds (``written``: " written as text", or "")
_SYSTEM_ID_HINT = (
    "it is SYSTEM_ID{written}, the sender of what is sent from outside any agent"
    " (kernel.send, kernel.request): no agent has it{either}, so an answer to such a"
    " message has no one to go to (return a value from the handler to reply to a request)"
)


#: the routers of this process's kernels, held weakly (by ``id()``; each entry goes with
#: its router): read only by a send that found no agent, to tell an id of another
#: kernel's agent (see Router._whose_id). Not a WeakSet: its iteration guard is Python
#: code, some 16,000 instructions a failing send.
_ROUTERS: Final[dict[int, weakref.ref[Router]]] = {}
#: the id ranges of the last _CLOSED_MEMORY kernels of this process that closed: (an id
#: drawn as each started, one drawn as it closed). Every id of its agents lies between
#: the two, among those of the other kernels open meanwhile: read only by a send that
#: found no agent, to tell an id of a closed kernel's agent (see Router._whose_id)
_CLOSED: Final[deque[tuple[int, int]]] = deque(maxlen=64)


@final
class Router:
    """Routes, names, delivery and request correlation of one kernel."""

    # Slots, not a __dict__: an instance of more than 30 attributes has a dict of its
    # own (CPython 3.11 shares the keys of at most 30), whose reads and writes
    # specialize only "with hint"; the fast branch makes six per send and the serve
    # loop three per message. Slots cut a fan-out's send phase by about 5% (see
    # docs/benchmarks-history.md, thirty-second pass). A new attribute must be named here.
    __slots__ = (
        "__weakref__",
        "_answered",
        "_answered_before",
        "_check_due",
        "_deadlines",
        "_deliver_outside",
        "_drain_over",
        "_drained",
        "_ended",
        "_finished_deadlines",
        "_first_agent",
        "_first_id",
        "_kernel_high",
        "_last_agent",
        "_late",
        "_late_reasons",
        "_now",
        "_outside_senders",
        "_outside_waits",
        "_passed_on",
        "_pending",
        "_query_waits",
        "_request_seq",
        "_send_turns",
        "_take_tell",
        "_timer_deadline",
        "_timer_scope",
        "_transport_answers",
        "_unremembered",
        "_walks",
        "heap",
        "interrupt",
        "late_queries",
        "ledger",
        "left",
        "left_at_close",
        "names",
        "nodes",
        "phase",
        "routes",
        "send_timeout",
        "thread",
        "transport",
    )

    def __init__(self, ledger: Ledger, send_timeout: float, heap: HeapKeeper) -> None:
        self.ledger = ledger
        #: the kernel's mailbox high-water mark (the ledger's), which the fast branch
        #: checks at every put of a burst: read from here, one attribute, not two
        self._kernel_high = ledger.high_water
        #: told the backlog on the slow path of sends (see _gc: queued messages)
        self.heap = heap
        self.send_timeout = send_timeout
        self.phase = KernelPhase.RUNNING
        #: the thread of the Trio run the kernel was made in (see check_thread)
        self.thread = threading.get_ident()
        #: the waits for room of sends from outside the kernel's agents (the block, any
        #: other task): a shutdown refuses them when it starts (see refuse_outside_waits)
        self._outside_waits: set[trio.CancelScope] = set()
        #: the tasks whose send from outside the agents the transport has in hand: its
        #: waits for room are refused as theirs are (see transport_wait)
        self._outside_senders = _OutsideSenders()
        #: local agents by address: an id's 128-bit value (an int hashes in C, a UUID
        #: through a Python __hash__, a twentieth of a send) or a name; see local()
        self.routes: dict[int | str, Any] = {}
        #: every live agent and supervisor, by its id's 128-bit value (see routes), in
        #: spawn order
        self.nodes: dict[int, Child] = {}
        #: names of live agents and supervisors
        self.names: dict[str, Child] = {}
        #: the first and the last of the live agents, linked in spawn order through their
        #: spawn_prev / spawn_next: what walk_agents follows, a slice at a time
        self._first_agent: Child | None = None
        self._last_agent: Child | None = None
        #: the walks that may not be done (weak: a walk left half-way costs nothing)
        self._walks: list[weakref.ref[AgentWalk]] = []
        self.transport: Transport | None = None
        #: the transport's deliver if it is told of sends from outside the agents
        #: (OutsideTold): such a send then marks nothing (see use_transport)
        self._deliver_outside: Callable[[Message, bool], Awaitable[None]] | None = None
        self._take_tell: Callable[[Message], int] | None = None
        #: what a transport left behind when it was detached (see
        #: :meth:`Kernel.detach_transport`): asked about a tell to an address not local,
        #: a text if the address was on the cluster the node left, None if not
        self.left: Callable[[Message], str | None] | None = None
        #: called once when ``left`` is let go (see :meth:`Kernel.detach_transport`)
        self.left_at_close: Callable[[], None] | None = None
        #: pending requests by their query id's 128-bit value (an int hashes in C, a
        #: UUID through a Python __hash__)
        self._pending: dict[int, _Pending] = {}
        self._deadlines: list[tuple[float, int, _Pending]] = []
        #: entries of _deadlines that are done (swept when they are half of it)
        self._finished_deadlines = 0
        self._request_seq = 0
        self._timer_scope: trio.CancelScope | None = None
        #: the timer scope's deadline as last set (its property is a Python call); -inf
        #: while there is no scope, so that no request tries to move it
        self._timer_deadline = -math.inf
        #: the run's clock (see run_request_timer)
        self._now: Callable[[], float] = trio.current_time
        #: ids (128-bit values) of queries whose requesters stopped waiting, the last
        #: _LATE_MEMORY of them
        self._late: deque[int] = deque()
        #: the same ids as a set, for the serving agents' test of each query they take
        #: (``id_value(msg) in late_queries``); the set is never replaced, so a serve
        #: loop keeps it in a local. Only the router changes it.
        self.late_queries: set[int] = set()
        #: of those, the ones whose requesters the shutdown cancelled (a handler it
        #: stopped waiting for its request): the query is dead-lettered ``shutdown``, not
        #: ``request_timeout`` (no timeout ran out); the rest are ``request_timeout``
        self._late_reasons: dict[int, DeadLetterReason] = {}
        #: where a handler here passed on a query with no requester pending here (a
        #: pool's router returning a remote requester's query for a worker, same id), by
        #: the query id's 128-bit value, the last _LATE_MEMORY of them (oldest first): the
        #: remote requester's cancel names the address it asked, and stops the handler
        #: where the query went (see expire_query)
        self._passed_on: dict[int, Address] = {}
        #: queries a handler passed on (returned, as a pool's router does) that wait for
        #: room at a full ``block`` mailbox, by the query id's 128-bit value: the scope of
        #: the wait, which the requester's timeout or cancel ends (see expire_query)
        self._query_waits: dict[int, trio.CancelScope] = {}
        #: queries the transport handed over whose answers go back to it, also when their
        #: sender is an agent here (a durable message from a local agent: its answer acks
        #: it), by the query id's 128-bit value, the last _TRANSPORT_ANSWERS_MEMORY
        #: of them (oldest first)
        self._transport_answers: dict[int, None] = {}
        #: ids (128-bit values) of requests answered here, the last _LATE_MEMORY to 2 *
        #: _LATE_MEMORY of them in two generations: a second answer to one (a handler
        #: that sent ``msg.reply(...)`` and returned a value too) is a late reply, as in
        #: OTP (the call's alias is gone) and Akka (the ask's actor is), not a Response
        #: in the requester's mailbox (see _answered_now)
        self._answered: set[int] = set()
        self._answered_before: set[int] = set()
        #: how the last _ENDED_MEMORY nodes that stopped for good while the kernel ran
        #: stopped (what a failure says, or a stop's reason), by their id's 128-bit value
        #: and by name (a name's entry goes when the name is forgotten again): read only
        #: by a send that found no agent (see why_no_agent)
        self._ended: OrderedDict[int | str, str] = OrderedDict()
        #: an id drawn as the kernel starts: every id of its agents is drawn after it, so
        #: an id drawn before it in this process is another kernel's (see why_no_agent)
        self._first_id = id_mark()
        #: the newest id of this kernel's nodes forgotten while it ran and not remembered
        #: in ``_ended`` (pushed out of it): an id above it that this kernel does not know
        #: is none of its own (see _whose_id). Kept as a stop pushes one out, not per send
        self._unremembered = 0
        key = id(self)
        _ROUTERS[key] = weakref.ref(self, lambda _: _ROUTERS.pop(key, None))
        self._drained: trio.Event | None = None
        #: the supervision tree has stopped: nothing can be handled any more
        self._drain_over = False
        #: which sends go to the cancellation check: ``next()`` of it is False for one
        #: send in sixteen, True for the other fifteen (a C iterator: counting in an int,
        #: ``(n + 1) & 15`` stored back, cost 6 more opcodes and an unspecialized ``&``
        #: on every send)
        self._send_turns: Iterator[bool] = itertools.cycle((True,) * 15 + (False,))
        #: the send that left the fast branch was that one: :meth:`send` checks
        self._check_due = False
        ledger.on_dead_query = self._dead_query
        ledger.send_notice = self.route_nowait
        #: a KeyboardInterrupt raised in an agent's code (Trio's Ctrl-C handler raises it
        #: in the code that runs): True if the kernel takes it as a Ctrl-C of its own (a
        #: graceful shutdown, the interrupt raised by ``open_kernel`` after it), False if
        #: it must go on up (the kernel is shutting down already: a second Ctrl-C forces)
        self.interrupt: Callable[[KeyboardInterrupt], bool] = _not_taken

    # --- addresses --------------------------------------------------------------------

    def find(self, address: Address) -> Child | None:
        """The live agent or supervisor at ``address`` (an id or a name)."""
        if isinstance(address, str):
            return self.names.get(address)
        return self.nodes.get(address.int) if isinstance(address, _UUID) else None

    def local(self, address: Address) -> Any:
        """The local agent at ``address`` (an id or a name), or None (also for what is
        neither: the integer value of an id is not the id)."""
        if isinstance(address, _UUID):
            return self.routes.get(address.int)
        return self.routes.get(address) if isinstance(address, str) else None

    @staticmethod
    def check_address(address: object) -> None:
        """What a send finds no local agent at: a ``TypeError`` if it is no address at
        all (checked only on that branch, so that a send by ref, id or name pays nothing
        for it), not an ``AgentNotFound`` for ``None`` or ``5``."""
        if not isinstance(address, (_UUID, str)):
            raise TypeError(
                "an agent address is an AgentRef, an agent id (uuid.UUID) or a name (str),"
                f" got {type(address).__name__} {brief(address, 60)}"
            )

    def _whose_id(self, value: int) -> str:
        """What an ``AgentNotFound`` can add for an id of value ``value`` that this
        kernel does not know and that was not drawn before it started: that it is no id
        of this process (its high half differs from the kernel's first id's), or that
        another kernel of this process has that agent, or had it (one of the stops it
        remembers); "" otherwise (one of this kernel's own agents, stopped past what it
        remembers; an agent of a kernel since gone). The failing path only."""
        if value >> 64 != self._first_id >> 64:
            return _OTHER_PROCESS
        # Whether it may be an id an open kernel (this one too) forgot without a word: a
        # stop pushed out of what it remembers, or any while it shuts down.
        forgotten = self.phase is not _RUNNING or value <= self._unremembered
        # (copied in one C call: a kernel starting in another thread cannot break it)
        for ref in list(_ROUTERS.values()):
            other = ref()
            if other is None or other is self:
                continue
            if value in other.nodes:
                return _BESIDE_KERNEL.format(state="where it is registered")
            if value in other._ended:
                return _BESIDE_KERNEL.format(state="where it has stopped for good")
            if other.phase is _RUNNING:
                forgotten = forgotten or value <= other._unremembered
            elif other.phase is not _STOPPED:
                # (shutting down: what it forgets, it forgets silently)
                forgotten = forgotten or value > other._first_id
        if not forgotten:
            # A closed kernel's ids are between its two marks, interleaved with those of
            # the kernels open meanwhile: none of theirs (not known to them, none they
            # forgot), so it is a closed kernel's.
            for first, last in list(_CLOSED):
                if first < value < last:
                    return _CLOSED_KERNEL
        return ""

    def closed(self) -> None:
        """The kernel has closed: its id range is kept (see _CLOSED)."""
        _CLOSED.append((self._first_id, id_mark()))

    def why_no_agent(self, address: Address) -> str:
        """What an ``AgentNotFound`` for ``address`` can add (the failing path only): that
        it is a supervisor, that it is being stopped (unrouted by ``stop()``, not yet
        forgotten), that it stopped for good, after a failure or stopped (if it is one
        of the last _ENDED_MEMORY that did while the kernel ran), that it is an id of
        another kernel's agent (drawn before this one started, or known to another
        kernel of this process) or of another process, that the agent whose
        name it is under (``workers`` of
        ``workers/0``) has not started yet, or that it is the kernel's own sender id."""
        if address == SYSTEM_ID:
            return _SYSTEM_ID_HINT.format(written="", either="")
        node = self.find(address)
        if node is not None:
            if not node.is_agent:
                return "it is a supervisor, which takes no messages: send to one of its agents"
            return "it is being stopped: it takes no new messages"
        if node is None and self._ended:
            key = address.int if isinstance(address, _UUID) else address
            ended = self._ended.get(key, "") if isinstance(key, (int, str)) else ""
            if ended:
                if ended in _FAILURE_TEXTS:
                    return ended
                return _ENDED_STOPPED.get(ended) or _STOPPED_WITH.format(ended)
        if isinstance(address, _UUID):
            if drawn_before(address.int, self._first_id):
                return _OTHER_KERNEL
            return self._whose_id(address.int)
        if isinstance(address, str):
            written = _id_in_text(address)
            if written is not None:
                # No name parses as a UUID (spawn refuses one): this is an id as text,
                # e.g. one a payload carried (a payload takes no UUID).
                if written == SYSTEM_ID:
                    # (no uuid.UUID(...) to suggest: that is refused too)
                    return _SYSTEM_ID_HINT.format(
                        written=" written as text", either=", as text or as a UUID"
                    )
                holder = self.nodes.get(written.int)
                if holder is None:
                    whose = ""
                elif holder.name is None:
                    whose = " (the id of a running agent)"
                else:
                    whose = f" (agent {holder.name!r}'s id)"
                return (
                    f"it is an agent id written as text{whose}: an address is a name, a"
                    f" UUID or an AgentRef; pass uuid.UUID({address!r})"
                )
            from ._agent import check_agent_name  # (_agent imports this module)

            try:
                check_agent_name(address)
            except ValueError as exc:
                # what no spawn takes, so no agent has: the rule it breaks (an empty
                # name, one too long, one holding a control character)
                return f"no agent can have it: {exc}"
            # Looked up (or sent to) right after its parent's spawn: a pool's router
            # spawns its workers in its on_start, which runs after kernel.spawn returned.
            parent, _, _ = address.rpartition("/")
            while parent:
                owner = self.names.get(parent)
                if owner is not None:
                    if owner.before_first_start():
                        return (
                            f"{parent!r} has not started yet: the agents it spawns as it"
                            " starts, such as a pool's workers, are there once its on_start"
                            " has run; a request to it is handled after that, e.g."
                            f" pool_workers(kernel, {parent!r})"
                        )
                    break
                parent, _, _ = parent.rpartition("/")
        return ""

    def register(self, node: Child, *, agent: bool) -> None:
        """Make ``node`` reachable by id and name (``NameTaken`` if the name is in use)."""
        if node.name is not None:
            holder = self.names.get(node.name)
            if holder is not None:
                raise NameTaken(node.name, holder.id)
            self.names[node.name] = node
        self.nodes[node.id.int] = node
        if agent:
            self.routes[node.id.int] = node
            if node.name is not None:
                self.routes[node.name] = node
            self.ledger.agents_alive += 1
            last = self._last_agent
            node.spawn_prev = last
            if last is None:
                self._first_agent = node
            else:
                last.spawn_next = node
            self._last_agent = node

    def forget(self, node: Child, failure: str = "", stopped: str = "") -> None:
        """``node`` stopped for good: its id and name are free. ``failure``: the reason
        of its ``stopped`` event if it stopped for good after a failure (see
        _ENDED_AFTER_FAILURE), else ``stopped``: its reason if it was stopped while the
        kernel runs (not by its shutdown); kept for an ``AgentNotFound`` to tell
        (why_no_agent)."""
        self.unroute(node)
        if self.nodes.pop(node.id.int, None) is not None and node.is_agent:
            done = node.done
            if done is None or not done.ended_in_stop:
                # (one whose last run ended in the kernel's stop was counted out then)
                self.ledger.agents_alive -= 1
            if self._walks:
                self._step_walks_past(node)
            prev, after = node.spawn_prev, node.spawn_next
            if prev is None:
                self._first_agent = after
            else:
                prev.spawn_next = after
            if after is None:
                self._last_agent = prev
            else:
                after.spawn_prev = prev
            # A stopped agent holds no neighbour (nor they it, through it).
            node.spawn_prev = node.spawn_next = None
        name = node.name
        if name is not None and self.names.get(name) is node:
            del self.names[name]
            if self._ended:
                self._ended.pop(name, None)  # what it said of an earlier holder of the name
        else:
            name = None  # never registered (a tree that could not be), or taken since
        # (what a failure said, or a stop's reason: its text is written only if shown)
        why = _ENDED_AFTER_FAILURE.get(failure) if failure else stopped
        if why:
            ended = self._ended
            ended[node.id.int] = why
            if name is not None:
                ended[name] = why
            while len(ended) > 2 * _ENDED_MEMORY:
                key, _ = ended.popitem(last=False)
                if isinstance(key, int) and key > self._unremembered:
                    self._unremembered = key
        elif self.phase is _RUNNING:
            # Forgotten without a word while the kernel runs (a stop's reason "", a tree
            # that could not be registered): as if pushed out (not in its shutdown,
            # whose ids _whose_id takes for forgotten all the same)
            value = node.id.int
            if value > self._unremembered:
                self._unremembered = value

    def walk_agents(self) -> AgentWalk:
        """A walk over the agents live now, in spawn order, a slice at a time (O(1) now,
        whatever their number): see :class:`AgentWalk`."""
        walk = AgentWalk(self._first_agent, self._last_agent)
        if not walk.done:
            self._walks = [ref for ref in self._walks if _walking(ref)]
            self._walks.append(weakref.ref(walk))
        return walk

    def _step_walks_past(self, node: Child) -> None:
        """``node``, still linked, is about to be forgotten: no walk may stay on it."""
        walking = []
        for ref in self._walks:
            walk = ref()
            if walk is not None:
                walk._leave(node)
                if not walk.done:
                    walking.append(ref)
        self._walks = walking

    def unroute(self, node: Any) -> None:
        """New messages to ``node`` fail with ``AgentNotFound`` from now on."""
        routes = self.routes
        agent_id, name = node.id.int, node.name
        if routes.get(agent_id) is node:
            del routes[agent_id]
        if name is not None and routes.get(name) is node:
            del routes[name]

    # --- accounting helpers -------------------------------------------------------------

    def check_drained(self) -> None:
        """Called by idle agents while draining: wake the shutdown once nothing is in
        flight and no request waits for its answer (see :meth:`wait_drained`)."""
        drained = self._drained
        if drained is not None and self.ledger.in_flight <= 0 and not self._pending:
            drained.set()

    async def wait_drained(self) -> None:
        """Return once nothing is in flight and no request here waits for its answer, or
        once the tree has stopped (``end_drain``). A request whose query was handled
        without an answer (the handler returned None, to answer later from ``ctx.nursery``
        with ``ctx.send(msg.reply(...))``: a pool's resize) is work still owed: the drain
        lets its answer through, within the grace and the request's own timeout, as it
        lets a query queued or in hand be handled; its requester's end (answered, failed,
        timed out or cancelled) wakes the drain (see :meth:`request`)."""
        while (self.ledger.in_flight > 0 or self._pending) and not self._drain_over:
            self._drained = trio.Event()
            await self._drained.wait()
        self._drained = None

    def end_drain(self) -> None:
        """The root supervisor's run ended (an escalation to the kernel): its children are
        stopped, so nothing still in flight can be handled any more, and waiting for the
        drain would wait out the grace period. Wake the drain, now and from now on."""
        self._drain_over = True
        if self._drained is not None:
            self._drained.set()

    def discard_queued(
        self, messages: list[Message], reason: DeadLetterReason, recipient: Any, detail: str
    ) -> None:
        """Dead-letter what was left in a stopped agent's mailbox."""
        dead_letter = self.ledger.dead_letter
        for msg in messages:
            if msg.kind is MessageKind.QUERY and id_value(msg) in self.late_queries:
                if self._late_reasons.get(id_value(msg)) is DeadLetterReason.SHUTDOWN:
                    why = DeadLetterReason.SHUTDOWN
                    detail = "the shutdown cancelled the requester before it was handled"
                else:
                    why = DeadLetterReason.REQUEST_TIMEOUT
                    detail = "the requester stopped waiting before it was handled"
                dead_letter(msg, why, recipient.id, recipient.name, detail=detail)
            else:
                dead_letter(msg, reason, recipient.id, recipient.name, detail=detail)

    # --- entry points -------------------------------------------------------------------

    def refuse_outside_waits(self) -> None:
        """The shutdown started: sends from outside the agents that wait for room are
        refused (``KernelShuttingDown``), as any send from outside is from now on; never
        enqueued, so not in flight for the drain to wait for."""
        for scope in self._outside_waits:
            scope.cancel()

    def use_transport(self, transport: Transport | None) -> None:
        """Route what is not local through ``transport`` (None: nothing)."""
        self.transport = transport
        told = getattr(transport, "tells_outside", False) is True  # (OutsideTold)
        self._deliver_outside = getattr(transport, "deliver", None) if told else None
        self._take_tell = getattr(transport, "take_tell", None)  # (TakesTells)

    @contextlib.contextmanager
    def transport_wait(self, outside: bool | None = None) -> Iterator[None]:
        """See :meth:`TransportHandle.waiting_for_room`: the transport's wait for room
        for a send from outside, refused as a wait for room in a local mailbox is.
        ``outside``: what the transport was told (None: the marked tasks say)."""
        if outside is None:
            senders = self._outside_senders.tasks
            outside = bool(senders) and current_task() in senders
        if not outside:
            yield  # an agent's send (or none the kernel handed over): it waits on
            return
        if self.phase is not _RUNNING:
            raise self.refuse("send")
        scope = trio.CancelScope()
        self._outside_waits.add(scope)
        try:
            with scope:
                yield
        finally:
            self._outside_waits.discard(scope)
        if scope.cancelled_caught:
            # refused when the drain started (the phase may have moved on since)
            self.ledger.rejected["shutting_down"] += 1
            raise KernelShuttingDown("send", KernelPhase.DRAINING.name.lower())

    def refuse(self, what: str) -> KernelShuttingDown:
        self.ledger.rejected["shutting_down"] += 1
        return KernelShuttingDown(what, self.phase.name.lower())

    def fast(
        self, msg: Message, to: Address | None, external: bool, parks: bool = False
    ) -> int | None:
        """The fast branch, without yielding: None if ``msg`` was enqueued (or taken by
        the transport: see ``TakesTells``), else what :meth:`send` is to be awaited with
        for the rest: :data:`TAKEN_YIELD` if the transport took it and asks the sender to
        yield once (cancel-shielded: the message is taken), :data:`NO_LOCAL` if no local
        agent has ``to`` (it goes to the transport, if any). (None for done: a caller's
        ``is not None`` is one test where ``is not True`` was two opcodes more a send.)

        ``to`` is ``msg.to`` as the caller knows it, or None for a reply (``reply_to``
        set), which takes the slow branch (a property read costs a tenth of a send).
        A local recipient with room takes it with one ``send_nowait`` on its channel.
        False sends the caller to :meth:`send` (which may wait): for everything else,
        and for one send in sixteen, so that a producer loop whose scope was cancelled
        is stopped there (a cancellation check costs more than the rest of a send).
        ``parks``: the caller waits next whatever happens (a request, which waits for its
        reply): no send of its is sent to the check, nor offered to the transport's
        ``take_tell`` (a query is no tell).
        """
        if self.phase is not _RUNNING and (external or self.phase >= _STOPPING):
            raise self.refuse("send")
        if next(self._send_turns) or parks:
            # local() written out; a name of a str subclass takes the slow branch, and so
            # does a reply (``to`` None)
            if isinstance(to, _UUID):
                cell = self.routes.get(to.int)
            elif to.__class__ is str:
                cell = self.routes.get(to)
            else:
                return False
            if cell is None:
                take = self._take_tell
                if take is not None and not parks:
                    # the transport takes a tell it has a route and room for at once
                    # (TakesTells): without Router.send's coroutine and the transport's
                    # deliver (a twelfth of such a tell). Not a request's query (``parks``):
                    # it is no tell, and its reply's route is set up by deliver.
                    try:
                        taken = take(msg)
                    except MessageFailed as exc:
                        raise unsendable(exc) from exc.__cause__
                    if taken:
                        self.ledger.accepted += 1
                        self.ledger.forwarded += 1
                        return None if taken == 1 else TAKEN_YIELD
                return NO_LOCAL
            # _enqueue and Mailbox.try_put, written out: each call would cost a tenth of
            # the whole send.
            mailbox = cell.mailbox
            sender = mailbox.sender
            if sender is None:
                # The address's first message: try_put opens its channel.
                if not mailbox.try_put(msg):
                    return False
            else:
                try:
                    sender.send_nowait(msg)
                except trio.WouldBlock:
                    return False
                depth = mailbox.depth = mailbox.depth + 1
                if depth > mailbox.high_water:
                    # while a burst fills a mailbox, every put raises its mark
                    mailbox.high_water = depth
                    if depth > self._kernel_high.value:
                        self._kernel_high.value = depth
            cell.received += 1
            self.ledger.accepted += 1
            if cell.dormant:
                cell.wake()
            return None
        # the sixteenth: Router.send checks for cancellation
        self._check_due = True
        return False

    async def send(self, msg: Message, fast: int = False, external: bool = False) -> None:
        """The rest of a send after :meth:`fast` said no (``fast``: what it said;
        :data:`TAKEN_YIELD`: the transport took it, and the sender yields once here;
        :data:`NO_LOCAL` when it found no local agent, and the message goes straight to
        the transport): may wait for room (``block``), raises ``AgentNotFound`` /
        ``MailboxFull`` / ``TransportUnavailable``.

        As on the fast branch, one send in sixteen checks for cancellation (a wait for
        room checks too): a send to another kernel comes here each time, and the check
        cost about a thirtieth of it."""
        if fast == TAKEN_YIELD:
            # taken (counted): cancel-shielded, nothing here may refuse it
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        if self._check_due:
            self._check_due = False
            await trio.lowlevel.checkpoint_if_cancelled()
            # One send in sixteen tells the heap keeper the backlog (growth shows there;
            # sends to other kernels, replies and waits need not pay for it each time).
            self.heap.backlog(self.ledger.in_flight)
            # ... and comes here only for the cancellation check: most find room, and
            # the delivery coroutine below would cost more than all the other fifteen.
            if msg.reply_to is None:
                cell = self.local(msg.to)
                if cell is None:
                    self.check_address(msg.to)
                    fast = NO_LOCAL  # looked up: no local agent, and an address
                elif self._enqueue(cell, msg):
                    return
        try:
            transport = self.transport
            if transport is not None and (
                # NO_LOCAL: no local agent was found just now (nothing ran since) for a
                # tell's address (fast() finds none for a reply: it is given no ``to``),
                # so the property ``reply_to`` (a tenth of the rest) is not read again
                fast == NO_LOCAL or (msg.reply_to is None and self.local(msg.to) is None)
            ):
                # deliver's branch for another kernel, without its coroutine (every tell
                # to another kernel comes this way); fast() found an address (NO_LOCAL)
                if fast != NO_LOCAL:
                    self.check_address(msg.to)
                if not external:
                    await transport.deliver(msg)
                elif self._deliver_outside is not None:
                    # told so (OutsideTold): nothing to mark
                    await self._deliver_outside(msg, True)
                else:
                    # (``with self._outside_senders``, written out: a third less)
                    task = current_task()
                    senders = self._outside_senders.tasks
                    senders.add(task)
                    try:
                        await transport.deliver(msg)
                    finally:
                        senders.discard(task)
                self.ledger.accepted += 1
                self.ledger.forwarded += 1
                return
            await self.deliver(msg, wait=True, external=external)
        except (AgentNotFound, MailboxFull) as exc:
            self.ledger.reject(exc)
            raise
        except MessageFailed as exc:
            raise unsendable(exc) from exc.__cause__

    def send_nowait(self, msg: Message, *, external: bool) -> None:
        """Like :meth:`send` but a full ``block`` mailbox raises ``MailboxFull`` at once."""
        if self.phase is not _RUNNING and (external or self.phase >= _STOPPING):
            raise self.refuse("send")
        if msg.reply_to is None:
            cell = self.local(msg.to)
            if cell is not None and self._enqueue(cell, msg):
                return
        try:
            blocked = self._deliver_nowait(msg)
            if blocked is not None:
                raise self._full(blocked, msg)
        except (AgentNotFound, MailboxFull) as exc:
            self.ledger.reject(exc)
            raise
        except MessageFailed as exc:
            raise unsendable(exc) from exc.__cause__

    async def route(self, msg: Message) -> None:
        """Deliver a message the kernel took responsibility for (a handler's result):
        never raises, dead-letters what it cannot deliver."""
        if self.phase >= _STOPPING:
            self._accept_dead(msg, DeadLetterReason.SHUTDOWN, "kernel stopping")
            return
        taken = 0
        try:
            # What needs no wait (room in a local mailbox; a tell for another kernel the
            # transport takes at once, TakesTells) without deliver's coroutine and the
            # transport's; anything else, 0: deliver.
            taken = self.route_now(msg)
            if not taken:
                if msg.kind is _QUERY:
                    await self._route_query(msg)
                else:
                    await self.deliver(msg, wait=True)
        except MailboxFull as exc:
            cell = self.local(msg.to)
            if cell is not None and cell.overflow is OverflowPolicy.REJECT:
                # (refused at once: not "still full after" the send timeout, which only
                # a ``block`` mailbox is waited for)
                self._accept_dead(msg, DeadLetterReason.MAILBOX_FULL, _REJECTED)
            elif cell is not None and cell.run_task is trio.lowlevel.current_task():
                # (refused at once: see _full_for_itself; not "still full after")
                self._accept_dead(msg, DeadLetterReason.MAILBOX_FULL, _OWN_FULL)
            else:
                self._dead_undeliverable(msg, exc)
        except Exception as exc:
            self._dead_undeliverable(msg, exc)
        except BaseException:
            # The routing agent was cancelled (stopped past its timeout, the tree stopped
            # after the grace period, a failing background task) while the message waited
            # for room: a cancelled wait enqueued nothing (``deliver`` uncounted it), so
            # it is dead-lettered here, or it would vanish.
            if self.phase >= _DRAINING:
                self._accept_dead(msg, DeadLetterReason.SHUTDOWN, "kernel stopping")
            else:
                self._accept_dead(
                    msg,
                    DeadLetterReason.MAILBOX_FULL,
                    "still full when its sender stopped waiting (the sender was stopped)",
                )
            raise
        if taken == TAKEN_YIELD:
            # the transport took it and sealed a full batch: the sender yields once, out
            # of the try above (the message is taken: nothing here may dead-letter it)
            await trio.lowlevel.cancel_shielded_checkpoint()

    def route_now(self, msg: Message) -> int:
        """:meth:`route`'s work for a tell that needs no wait (a ring's next hop, returned
        by its handler), done here without its coroutine: 0 if there is none to do now
        (a reply, a stopping kernel, a full mailbox, a transport without room: ``route``
        it), else as :meth:`fast` says (1: delivered or taken; :data:`TAKEN_YIELD`: taken,
        and the sender yields once). Counted as ``route`` counts; what fails is
        dead-lettered as ``route`` does, never raised."""
        if self.phase >= _STOPPING or msg.reply_to is not None:
            return 0
        cell = self.local(msg.to)
        if cell is not None:
            return 1 if self._enqueue(cell, msg) else 0
        take = self._take_tell
        if take is None:
            return 0
        try:
            taken = take(msg)
        except Exception as exc:
            self._dead_undeliverable(msg, exc)
            return 1
        if taken:
            self.ledger.accepted += 1
            self.ledger.forwarded += 1
        return taken

    def route_nowait(self, msg: Message) -> None:
        """Like :meth:`route` without waiting (monitor notices)."""
        if self.phase >= _STOPPING:
            self._accept_dead(msg, DeadLetterReason.SHUTDOWN, "kernel stopping")
            return
        try:
            blocked = self._deliver_nowait(msg)
            if blocked is not None:
                raise self._full(blocked, msg)
        except MailboxFull:
            # (refused at once: not "still full after" the send timeout, which a notice
            # never waits)
            self._accept_dead(msg, DeadLetterReason.MAILBOX_FULL, _NOTICE_REFUSED)
        except Exception as exc:
            self._dead_undeliverable(msg, exc)

    def _unroutable_reply(self, msg: Message) -> str:
        """What an ``unroutable_reply`` letter says (the failing path only): whose answer
        it is, and to what. Its recipient alone (SYSTEM_ID for a tell from outside any
        agent, the README's first sample) named no agent of the user's."""
        node = self.find(msg.sender)
        who = repr(node.name) if node is not None and node.name else f"agent {msg.sender}"
        if msg.to == SYSTEM_ID:
            return (
                f"the answer of {who} to a message sent from outside any agent"
                " (kernel.send): nothing waits for it"
            )
        return f"the answer of {who}: its recipient is no agent here"

    async def _route_query(self, msg: Message) -> None:
        """Route a query a handler passed on (a pool's router) that needs the slow path:
        a wait for room there ends when its requester stops waiting, and the query is
        dead-lettered as one still queued would be when it comes out (``request_timeout``,
        or ``shutdown``), not held up to ``send_timeout`` and then dead-lettered
        ``mailbox_full``, the routing agent (the whole pool) waiting for nobody meanwhile.
        As a request to a full agent itself stops waiting for room at its timeout."""
        key = id_value(msg)
        if key in self.late_queries:
            # (its requester gave up while the handler that passed it on still ran)
            self._accept_dead(msg, *self._gave_up(key))
            return
        scope = trio.CancelScope()
        waits = self._query_waits
        waits[key] = scope
        try:
            with scope:
                await self.deliver(msg, wait=True)
        finally:
            if waits.get(key) is scope:
                del waits[key]
        if scope.cancelled_caught:
            # (a cancelled wait enqueued nothing: deliver uncounted it)
            self._accept_dead(msg, *self._gave_up(key))

    def _gave_up(self, key: int) -> tuple[DeadLetterReason, str]:
        """The dead letter of query ``key``, not yet in a mailbox, whose requester stopped
        waiting (see discard_queued)."""
        if self._late_reasons.get(key) is DeadLetterReason.SHUTDOWN:
            return (
                DeadLetterReason.SHUTDOWN,
                "the shutdown cancelled the requester before it was delivered",
            )
        return (
            DeadLetterReason.REQUEST_TIMEOUT,
            "the requester stopped waiting before it was delivered",
        )

    def _accept_dead(
        self,
        msg: Message,
        reason: DeadLetterReason,
        detail: str = "",
        error: BaseException | None = None,
    ) -> None:
        self.ledger.accepted += 1
        self.ledger.dead_letter(msg, reason, msg.to, error=error, detail=detail)

    def _dead_undeliverable(self, msg: Message, exc: Exception) -> None:
        if isinstance(exc, AgentNotFound):
            if msg.kind is MessageKind.RESPONSE:
                self._accept_dead(
                    msg, DeadLetterReason.UNROUTABLE_REPLY, self._unroutable_reply(msg)
                )
            else:
                self._accept_dead(msg, DeadLetterReason.NO_SUCH_AGENT)
        elif isinstance(exc, MailboxFull):
            self._accept_dead(
                msg, DeadLetterReason.MAILBOX_FULL, f"still full after {self.send_timeout:g}s"
            )
        elif isinstance(exc, TransportUnavailable):
            self._accept_dead(msg, DeadLetterReason.TRANSPORT_UNAVAILABLE, exc.detail)
        elif isinstance(exc, KernelShuttingDown):
            self._accept_dead(msg, DeadLetterReason.SHUTDOWN, "kernel stopping")
        elif isinstance(exc, MessageFailed) and isinstance(exc.reason, DeadLetterReason):
            # the transport could not take this one message (e.g. unserialisable): a
            # requester here gets why (RequestFailed.error)
            self._accept_dead(msg, exc.reason, exc.detail, exc)
        else:
            raise exc

    def relay_nowait(self, msg: Message) -> None:
        """See :meth:`TransportHandle.relay_nowait`."""
        transport = self.transport
        if transport is None:
            raise KernelShuttingDown("relay", detached_phase(self.phase))
        try:
            transport.deliver_nowait(msg)
        except (AgentNotFound, MailboxFull) as exc:
            self.ledger.reject(exc)
            raise
        except MessageFailed as exc:
            raise unsendable(exc) from exc.__cause__
        self.ledger.accepted += 1
        self.ledger.forwarded += 1

    def deliver_from_remote_nowait(self, msg: Message) -> bool:
        if self.phase is not _RUNNING:
            # (not counted, as no refusal of a remote delivery is: the transport's to
            # count; while the kernel drains, deliver_from_remote takes it yet)
            raise KernelShuttingDown("remote delivery", self.phase.name.lower())
        if msg.reply_to is not None and self._deliver_reply(msg):
            return True
        cell = self.local(msg.to)
        if cell is None:
            raise AgentNotFound(msg.to)
        if self._enqueue(cell, msg):
            return True
        policy = cell.overflow
        if policy is OverflowPolicy.BLOCK or policy is OverflowPolicy.REJECT:
            return False
        self._deliver_nowait(msg)  # drop_newest / drop_oldest: taken, per the policy
        return True

    def deliver_from_remote_run(self, msgs: Sequence[Message], start: int) -> int:
        """See ``TransportHandle.deliver_run_nowait``: deliver_from_remote_nowait's common
        case (no reply, a local recipient, room) for a run of messages, the recipient
        looked up when the address changes, and _enqueue and Mailbox.try_put written out
        as on the fast branch of a send. Stops, without touching it, at the first message
        that needs more (a reply, an unknown address, a mailbox not opened yet or full)."""
        if self.phase is not _RUNNING:
            return start
        routes = self.routes
        end = len(msgs)
        index = start
        last: Address | None = None
        cell: Any = None
        # (typed: the fast branch's names, which a rename of Mailbox's must reach)
        mailbox: Mailbox
        sender: trio.MemorySendChannel[Message | None]
        failed: Exception | None = None
        try:
            while index < end:
                msg = msgs[index]
                if msg.reply_to is not None:
                    break
                to = msg.to
                if to is not last:
                    # local() written out; a name of a str subclass takes the other way
                    if isinstance(to, _UUID):
                        cell = routes.get(to.int)
                    elif to.__class__ is str:
                        cell = routes.get(to)
                    else:
                        break
                    if cell is None:
                        break
                    mailbox = cell.mailbox
                    channel = mailbox.sender
                    if channel is None:
                        break  # its first message: try_put opens the channel
                    sender = channel
                    last = to
                try:
                    sender.send_nowait(msg)
                except trio.WouldBlock:
                    break
                # taken: it is in the mailbox, whatever the bookkeeping below raises
                index += 1
                depth = mailbox.depth = mailbox.depth + 1
                if depth > mailbox.high_water:
                    mailbox.raise_high_water(depth)
                cell.received += 1
                if cell.dormant:
                    cell.wake()
                    last = None  # looked up again after its run started
        except Exception as exc:
            # (no cost per message: the caller counts only the messages not taken)
            failed = exc
        if index > start:
            # The messages taken are counted, also after a fault, and a fault here is
            # the run's too (DeliveryRunFailed): they are delivered, whatever raises.
            try:
                ledger = self.ledger
                ledger.accepted += index - start
                # as a producer's slow path does (one send in sixteen): a batch's tells
                # queue up like a burst's, and the keeper freezes a growing backlog
                self.heap.backlog(ledger.in_flight)
            except Exception as exc:
                if failed is None:
                    failed = exc
        if failed is not None:
            raise DeliveryRunFailed(index) from failed
        return index

    async def deliver_from_remote(self, msg: Message) -> None:
        if self.phase >= _STOPPING:
            raise KernelShuttingDown("remote delivery", self.phase.name.lower())
        if msg.reply_to is not None and self._deliver_reply(msg):
            # taken: a Cancelled now would tell the transport it was not
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        if self.local(msg.to) is None:
            raise AgentNotFound(msg.to)
        await self.deliver(msg, wait=True)

    # --- the one delivery path ------------------------------------------------------------

    def _deliver_reply(self, msg: Message) -> bool:
        """Replies to pending requests and late replies; True if ``msg`` was consumed."""
        reply_to = msg.reply_to
        assert reply_to is not None
        pending = self._pending.pop(reply_to.int, None)
        if pending is not None and pending.abandoned:
            # its requester was cancelled, and has not resumed to say so yet
            self._mark_late(reply_to)
        elif pending is not None:
            self.ledger.accepted += 1
            self.ledger.replies += 1
            pending.resolve(msg.payload)
            self._answered_now(reply_to.int)
            return True
        key = reply_to.int
        if self._transport_answers and key in self._transport_answers:
            # the transport's to take (a durable message's answer acks it), not a message
            # for its sender, here or elsewhere
            transport = self.transport
            if transport is not None:
                transport.deliver_nowait(msg)
                self.ledger.accepted += 1
                self.ledger.forwarded += 1
                return True
        if key in self.late_queries:
            self._accept_dead(msg, DeadLetterReason.LATE_REPLY, "the request had timed out")
            return True
        if key in self._answered or key in self._answered_before:
            self._accept_dead(
                msg, DeadLetterReason.LATE_REPLY, "the request had been answered already"
            )
            return True
        return False

    def _answered_now(self, key: int) -> None:
        """Request ``key`` (its id's 128-bit value) got its answer (see ``_answered``)."""
        answered = self._answered
        answered.add(key)
        if len(answered) >= _LATE_MEMORY:
            self._answered_before = answered
            self._answered = set()

    def _deliver_nowait(self, msg: Message) -> Any | None:
        """Enqueue, forward, or apply the overflow policy without waiting.

        Returns None when done, or the recipient whose full ``block`` mailbox needs a
        wait; raises ``MailboxFull`` for ``reject``.
        """
        if msg.reply_to is not None and self._deliver_reply(msg):
            return None
        cell = self.local(msg.to)
        ledger = self.ledger
        if cell is None:
            self.check_address(msg.to)
            if self.transport is None:
                left = self.left
                if left is not None and msg.reply_to is None:
                    # a tell to the cluster this node left: at most once, as any tell to
                    # another node; dead-lettered, not raised (see detach_transport); a
                    # query fails its requester, saying so
                    detail = left(msg)
                    if detail is not None:
                        if msg.kind is _QUERY:
                            ledger.requests_after_detach += 1
                            raise TransportUnavailable(detail)
                        ledger.tells_after_detach += 1
                        self._accept_dead(msg, DeadLetterReason.TRANSPORT_UNAVAILABLE, detail)
                        return None
                # the table, for a hint looked for only if the error is shown
                raise AgentNotFound(msg.to, self.routes, detail=self.why_no_agent(msg.to))
            self.transport.deliver_nowait(msg)
            ledger.accepted += 1
            ledger.forwarded += 1
            return None
        if self._enqueue(cell, msg):
            return None
        mailbox = cell.mailbox
        policy = cell.overflow
        if policy is OverflowPolicy.DROP_NEWEST:
            cell.received += 1
            cell.dead_lettered += 1
            ledger.accepted += 1
            ledger.dead_letter(
                msg,
                DeadLetterReason.MAILBOX_OVERFLOW,
                cell.id,
                cell.name,
                detail="drop_newest: mailbox full",
            )
            return None
        if policy is OverflowPolicy.DROP_OLDEST:
            while not self._enqueue(cell, msg):
                cell.dead_lettered += 1
                self.discard_queued(
                    [mailbox.evict_oldest()],
                    DeadLetterReason.MAILBOX_OVERFLOW,
                    cell,
                    "drop_oldest: evicted for a newer message",
                )
            return None
        if policy is OverflowPolicy.REJECT:
            raise MailboxFull(cell.id, cell.name, mailbox.capacity, msg.id)
        return cell

    def _enqueue(self, cell: Any, msg: Message) -> bool:
        """Enqueue on a local agent's mailbox if it has room (counted); False if full."""
        if not cell.mailbox.try_put(msg):
            return False
        cell.received += 1
        self.ledger.accepted += 1
        if cell.dormant:
            cell.wake()
        return True

    def _full(self, cell: Any, msg: Message) -> MailboxFull:
        return MailboxFull(cell.id, cell.name, cell.mailbox.capacity, msg.id)

    def _full_for_itself(self, cell: Any, msg: Message) -> MailboxFull:
        """A send of ``cell``'s own run (its handler, ``on_start``, ``on_stop``) to its
        own full mailbox: only that run takes from the mailbox, and it would be waiting
        in the send, so no room can come before the send deadline. Refused at once,
        saying so (as a request to itself times out saying so)."""
        return MailboxFull(
            cell.id,
            cell.name,
            cell.mailbox.capacity,
            msg.id,
            detail=(
                f"agent {cell.label} sent to its own mailbox, full (capacity"
                f" {cell.mailbox.capacity}), from its own run: only that run takes from"
                " it, so no room could come while it waited (refused at once, not after"
                " the send deadline)"
            ),
        )

    async def deliver(self, msg: Message, *, wait: bool, external: bool = False) -> None:
        """The slow branch: everything but a local recipient with room. ``external``: a
        send from outside the agents, whose wait for room the shutdown ends (refused)."""
        if msg.reply_to is not None and self._deliver_reply(msg):
            return
        cell = self.local(msg.to)
        if cell is None and self.transport is not None:
            self.check_address(msg.to)
            # The transport bounds its own wait by the send deadline (see Transport).
            if not external:
                await self.transport.deliver(msg)
            elif self._deliver_outside is not None:
                await self._deliver_outside(msg, True)  # told so (OutsideTold)
            else:
                with self._outside_senders:  # marked (see transport_wait)
                    await self.transport.deliver(msg)
            self.ledger.accepted += 1
            self.ledger.forwarded += 1
            return
        blocked = self._deliver_nowait(msg)
        if blocked is None:
            return
        if not wait:
            raise self._full(blocked, msg)
        if blocked.run_task is trio.lowlevel.current_task():
            raise self._full_for_itself(blocked, msg)
        # Full under ``block``: Trio's FIFO of blocked senders, bounded by the deadline.
        # Counted as accepted while waiting (the consumer may admit and even handle it
        # before this task resumes); uncounted if it never got in.
        ledger = self.ledger
        ledger.accepted += 1
        ledger.sends_waiting += 1
        entered = False
        # One scope for the wait: the send deadline's, which a shutdown's start cancels
        # for a send from outside (see refuse_outside_waits).
        deadline = trio.move_on_after(self.send_timeout)
        if external:
            self._outside_waits.add(deadline)
        try:
            with deadline:
                await blocked.mailbox.put_waiting(msg)
                entered = True
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            ledger.accepted -= 1
            raise AgentNotFound(msg.to) from None
        except BaseException:
            ledger.accepted -= 1
            raise
        finally:
            ledger.sends_waiting -= 1
            if external:
                self._outside_waits.discard(deadline)
        if not entered:
            ledger.accepted -= 1
            if external and self.phase is not _RUNNING:
                # (no checkpoint since the wait ended: the shutdown started during it)
                raise self.refuse("send")
            raise self._full(blocked, msg)
        blocked.received += 1
        if blocked.dormant:
            blocked.wake()

    def answer(self, sender: uuid.UUID, msg: Message, result: Any) -> Message | None:
        """A handler returned something: a Message is to be routed, anything else
        answers ``msg``. The answer to a pending local request resolves it here, without
        waiting (and, as :meth:`route`, what fails is dead-lettered, never raised into
        the agent); what is left to route is returned, for :meth:`route`."""
        if isinstance(result, Message):
            # (a query returned is the one passed on: a tell is not, and its id, drawn
            # lazily, is not read)
            if (
                msg.kind is _QUERY
                and (self._pending or self.transport is not None)
                and result.kind is _QUERY
                and result.id == msg.id
            ):
                # The query passed on (a pool's router): a timeout or cancel of its
                # requester, here or on another kernel, stops the handler where it is now.
                key = id_value(msg)
                pending = self._pending.get(key) if self._pending else None
                if pending is not None:
                    pending.at = result.to
                elif self.transport is not None:
                    self._passed_on_for_remote(key, result.to)
            return result
        if msg.kind is _QUERY and self.phase < _STOPPING:
            key = id_value(msg)
            pending = self._pending.pop(key, None)
            if pending is not None and pending.abandoned:
                # Its requester was cancelled, and has not resumed to say so yet: the
                # answer is late (below), as once it has.
                self._mark_late(msg.id)
            elif pending is not None:
                # A local requester gets the payload: the reply message it would never
                # see is not built (nor the query's UUID).
                ledger = self.ledger
                ledger.accepted += 1
                ledger.replies += 1
                pending.resolve(result)
                self._answered_now(key)
                return None
        out = msg.reply(sender, result)
        if self.phase < _STOPPING:
            try:
                if self._deliver_reply(out):
                    return None
            except Exception as exc:
                self._dead_undeliverable(out, exc)
                return None
        return out

    def answer_through_transport(self, query_id: uuid.UUID) -> None:
        """See :meth:`TransportHandle.answer_through_transport`."""
        # (a redelivery: the entry moves to the newest end)
        _keep_newest(self._transport_answers, query_id.int, None, _TRANSPORT_ANSWERS_MEMORY)

    def _passed_on_for_remote(self, key: int, to: Address) -> None:
        """A handler here passed query ``key``, which no requester here waits for (one on
        another kernel does), on to ``to``: kept for that requester's cancel, which
        comes through the transport naming the address it asked (see expire_query)."""
        # (a second hop: the entry moves to the newest end)
        _keep_newest(self._passed_on, key, to, _LATE_MEMORY)

    # --- request/reply ---------------------------------------------------------------------

    async def request(self, query: Message, timeout: float, *, external: bool) -> Any:
        """Send ``query`` and return the payload of the correlated reply (see
        ``Kernel.request``)."""
        if self.phase >= (_DRAINING if external else _STOPPING):
            raise self.refuse("request")
        pending = _Pending()
        # its value: the UUID is built only if something asks for it (a timeout)
        key = id_value(query)
        self._pending[key] = pending
        deadline = self._now() + timeout
        self._request_seq += 1
        heapq.heappush(self._deadlines, (deadline, self._request_seq, pending))
        if deadline < self._timer_deadline:
            timer = self._timer_scope
            if timer is not None:
                timer.deadline = self._timer_deadline = deadline
        enqueued = False
        try:
            try:
                if self.fast(query, query.to, external, True) is None:
                    enqueued = True
                else:
                    # It may wait for room: not past the request's own deadline.
                    with trio.move_on_after(timeout):
                        await self.deliver(query, wait=True, external=external)
                        enqueued = True
            except (AgentNotFound, MailboxFull) as exc:
                self.ledger.reject(exc)
                raise
            except MessageFailed as exc:
                raise unsendable(exc) from exc.__cause__
            if enqueued:
                try:
                    # _Pending.wait, without its coroutine
                    if pending.woken:
                        # Answered (or failed, or expired) while the query waited for
                        # room: that is its outcome (an answer was counted delivered), not
                        # a cancel that came after it.
                        await trio.lowlevel.cancel_shielded_checkpoint()
                    else:
                        pending.task = trio.lowlevel.current_task()
                        await trio.lowlevel.wait_task_rescheduled(pending.abort)
                except trio.Cancelled as cancelled:
                    # The requester itself was cancelled: its handler stops too, as on
                    # a timeout (a reply that comes anyway is a late reply). Cancelled
                    # once the kernel stops (a handler the shutdown's end cancelled, a
                    # task beside the block cancelled with it), it gave up for the
                    # shutdown: the query's letter says ``shutdown``, as it would had
                    # the requester waited on, no timeout having run out. A deadline
                    # that ran out then (the requester's own ``move_on_after``, its
                    # handler's ``handle_timeout``: the shutdown's cancels are explicit)
                    # is a timeout still (Trio 0.31+ says which: ``Cancelled.source``).
                    if pending.reply is _NO_REPLY and pending.error is None:
                        why = (
                            DeadLetterReason.SHUTDOWN
                            if self.phase >= _STOPPING
                            and getattr(cancelled, "source", None) != "deadline"
                            else DeadLetterReason.REQUEST_TIMEOUT
                        )
                        self.expire_query(query.id, pending.at or query.to, why)
                    raise
        finally:
            self._pending.pop(key, None)
            if self._drained is not None:
                # (a drain waits for the requests still waiting: see wait_drained)
                self.check_drained()
            # The request is over: its deadline entry is dead weight (it holds the
            # reply). Entries leave the heap when the timer reaches them, which is
            # ``timeout`` later (5 s by default, ``request_timeout_ms``): at thousands
            # of requests a second (or with a long timeout) that would keep hundreds
            # of megabytes of answered requests. So once finished
            # entries are more than half of the heap, it is rebuilt without them
            # (amortised O(1) per request; asyncio sweeps its cancelled timers the same
            # way). An entry the timer took out (a timeout) is done already.
            if not pending.done:
                pending.done = True
                done = self._finished_deadlines = self._finished_deadlines + 1
                heap = self._deadlines
                if done > _SWEEP_AT and done * 2 > len(heap):
                    heap[:] = [entry for entry in heap if not entry[2].done]
                    heapq.heapify(heap)
                    self._finished_deadlines = 0
        if pending.reply is not _NO_REPLY:
            return pending.reply
        if pending.error is not None:
            error = pending.error
            if isinstance(error, RequestFailed) and error.at is not None:
                # Dead-lettered where a handler passed the query on (a pool's worker):
                # ``to`` is what this requester asked, as for a timeout.
                error = RequestFailed(
                    error.request_id,
                    query.to,
                    error.reason,
                    error.error,
                    at=error.at,
                    node=error.node,
                    name=self.id_name(query.to),
                )
            elif isinstance(error, KernelShuttingDown) and enqueued and self.phase >= _STOPPING:
                # Failed as the kernel closes (fail_all_pending): the requester stops
                # waiting for the shutdown, and its query is cancelled where it went, as
                # a cancelled requester's is (a handler on another node is stopped, not
                # left to run out its deadline for an answer nobody takes).
                self.expire_query(query.id, pending.at or query.to, DeadLetterReason.SHUTDOWN)
            raise error
        detail = ""
        if enqueued:
            at = pending.at or query.to
            self.expire_query(query.id, at)
            detail = self._unanswered(query, at)
        raise RequestTimeout(query.id, query.to, timeout, detail, name=self.id_name(query.to))

    def _unanswered(self, query: Message, at: Address) -> str:
        """Why a local query timed out, when the recipient says it: parked, with nothing
        queued, it has taken the query and is done with it (a handler that forgot its
        ``return`` looks like this); busy with another message while the query, its own,
        waits in its mailbox, it requested itself (from its handler, which waits for
        itself); so it did from its ``on_start``, if that has not returned, or from its
        ``on_stop``; its run over, it waits for the agents it spawned to stop before its
        ``on_stop`` (whoever asked: a linked child's ``on_stop`` asking it waits for
        itself); still handling the query, its handler outlasted the request's timeout
        (the agent's own ``handle_timeout`` said: a request by ref names the agent no other
        way). Read at the timeout, not at every message: the serve and request paths pay
        nothing for it."""
        cell = self.local(at)
        if cell is None:
            return ""
        if cell.mailbox.depth and (left := cell.linked_left()):
            # (whoever asked: also a linked child's on_stop, which the parent waits for)
            shown = ", ".join(linked.label for linked in left[:3])
            more = ", ..." if len(left) > 3 else ""
            return (
                f"agent {cell.label}'s run has ended and it waits for the agents it spawned"
                f" to stop ({len(left)} left: {shown}{more}) before its on_stop: the query"
                " waits in its mailbox, which this run serves no more"
            )
        if query.sender == cell.id and cell.mailbox.depth:
            if cell.on_start_running:
                return (
                    f"agent {cell.label} requested itself before its on_start returned:"
                    " the query waits in its mailbox until on_start has returned, and"
                    " on_start waits for the answer"
                )
            if cell.on_stop_running:
                return (
                    f"agent {cell.label} requested itself from its on_stop: the query"
                    " waits in its mailbox, which this run serves no more"
                )
        current = cell.current
        if (
            current is not None
            and not cell.parked  # (a parked one holds a placeholder)
            and current is not query
            and query.sender == cell.id
            and cell.mailbox.depth
        ):
            return (
                f"agent {cell.label} requested itself while it handled another message:"
                " the query waits in its mailbox behind that message, whose handler waits"
                " for the answer"
            )
        if current is query and not cell.parked:
            return (
                f"agent {cell.label} is still handling it: its handle_timeout is"
                f" {cell.handle_timeout:g}s"
            )
        if not cell.parked or cell.mailbox.depth:
            return ""
        return (
            f"agent {cell.label} is idle with nothing queued: it handled the query and no"
            " answer came (a handler answers a request by returning a value)"
        )

    @trio.lowlevel.enable_ki_protection
    async def run_request_timer(self) -> None:
        """Expire pending requests at their deadlines (runs for the kernel's lifetime)."""
        heap = self._deadlines
        pending: _Pending | None = None
        # Trio's clock, read without trio.current_time()'s two frames (a request reads it);
        # this run's only: another run's clock has another offset
        self._now = trio.lowlevel.current_clock().current_time
        try:
            while True:
                now = trio.current_time()
                while heap and (heap[0][2].done or heap[0][0] <= now):
                    pending = heapq.heappop(heap)[2]
                    if pending.done:
                        self._finished_deadlines -= 1
                    else:
                        pending.done = True
                        pending.expire()
                # (the last entry taken out holds its answer: not kept over the sleep)
                pending = None
                with trio.CancelScope() as scope:
                    scope.deadline = self._timer_deadline = heap[0][0] if heap else math.inf
                    self._timer_scope = scope
                    await trio.sleep_forever()
        finally:
            self._timer_scope = None
            self._timer_deadline = -math.inf
            self._now = trio.current_time

    def expire_query(
        self,
        query_id: uuid.UUID,
        to: Address,
        reason: DeadLetterReason = DeadLetterReason.REQUEST_TIMEOUT,
    ) -> bool:
        """The requester of a query stopped waiting: cancel the handler working on it,
        or skip it in the queue; a query that went to a remote kernel is cancelled there
        through the transport. True if a local handler was cancelled. ``reason``: the
        query's dead letter here (``shutdown`` for a requester the shutdown cancelled)."""
        self._mark_late(query_id, reason)
        if self._query_waits:
            # passed on by a handler here, waiting for room where it went: it waits no more
            wait = self._query_waits.pop(query_id.int, None)
            if wait is not None:
                # (it may have got in already, its wait not yet resumed, and even be in
                # hand there: looked for where it went, as any query is, below)
                wait.cancel()
        cell = self.local(to)
        routed = cell is not None
        if cell is None:
            # An agent being stopped is unrouted (it takes no new message) but finishes
            # the one in hand: a handler whose requester gave up is stopped then too, not
            # left to run out its shutdown timeout for an answer nobody takes (until the
            # fifty-first pass it was, its answer a late reply and the stop that long).
            node = self.find(to)
            if node is not None and node.is_agent:
                cell = node
        if cell is None:
            if self.transport is not None:
                self.transport.cancel_query(query_id, to)
            return False
        current = cell.current
        if current is not None and current.id == query_id:
            return bool(cell.cancel_current(reason))
        if self._passed_on:
            # A remote requester's cancel names the address it asked: a handler there
            # passed the query on (a pool's router to its worker), so the handler to
            # stop is where it went.
            at = self._passed_on.pop(query_id.int, None)
            if at is not None:
                return self.expire_query(query_id, at, reason)
        if not routed and self.transport is not None:
            # An agent being stopped, not working on it: the query may have gone through
            # the transport, to another node's agent of that name (names are unique per
            # kernel only), while this one is unrouted; it is cancelled there (a query
            # the transport did not carry is no query of its).
            self.transport.cancel_query(query_id, to)
        # A query still queued is skipped when it comes out (see AgentCell.run_once).
        return False

    def _dead_query(
        self,
        msg: Message,
        reason: DeadLetterReason,
        error: BaseException | None,
        recipient_name: str | None,
    ) -> None:
        """Query ``msg`` was dead-lettered here: its requester gets RequestFailed, pending
        in this kernel or, through the transport, on another (e.g. a query a handler here
        forwarded to an agent that does not exist, is full or stopped). Not one that
        stopped waiting (``request_timeout``): nobody waits, and a reply its handler
        produces anyway stays a late reply. ``recipient_name``: the name of the agent it
        was dead-lettered at, if known: one stopped for good is forgotten before its
        queue (and the sends waiting for room there) is dead-lettered, and the error
        names it all the same."""
        if self._pending:
            pending = self._pending.pop(id_value(msg), None)
            if pending is not None:
                # (passed on by a handler, a pool's router: request() names the address
                # its requester asked as ``to``, and this agent as ``at``)
                at = self._name_of(msg.to, recipient_name) if pending.at is not None else None
                name = self.id_name(msg.to, recipient_name)
                pending.fail(RequestFailed(msg.id, msg.to, reason.value, error, at=at, name=name))
                return
        if self.transport is not None and reason is not DeadLetterReason.REQUEST_TIMEOUT:
            # (the requester's node names the address it asked as ``to``)
            passed = self._passed_on.pop(msg.id.int, None) if self._passed_on else None
            at = self._name_of(msg.to, recipient_name) if passed is not None else None
            name = self.id_name(msg.to, recipient_name) if passed is None else None
            self._fail_remote_requester(
                msg.id, RequestFailed(msg.id, msg.to, reason.value, error, at=at, name=name)
            )

    def id_name(self, address: Address, gone_name: str | None = None) -> str | None:
        """The name of the local agent at ``address`` when that is an id and the agent has
        a name, for a request's error (None for a name: the error shows it as it is).
        ``gone_name``: the name to give if no agent has that id any more (the agent's
        own, as it stopped for good)."""
        if not isinstance(address, _UUID):
            return None
        node = self.nodes.get(address.int)
        return gone_name if node is None else node.name

    def _name_of(self, address: Address, gone_name: str | None = None) -> Address:
        """A local agent's name (its address if it has none), for errors; ``gone_name``
        if it is gone (see :meth:`id_name`), else its address."""
        node = self.find(address)
        name = node.name if node is not None else gone_name
        return name if name is not None else address

    def _mark_late(
        self, query_id: uuid.UUID, reason: DeadLetterReason = DeadLetterReason.REQUEST_TIMEOUT
    ) -> None:
        """Nobody waits for query ``query_id`` any more: a reply that comes anyway is
        dead-lettered ``late_reply`` (see _deliver_reply), the last _LATE_MEMORY of them;
        the query itself, still queued, ``reason`` (see discard_queued)."""
        key = query_id.int
        if key not in self.late_queries:
            self._late.append(key)
            self.late_queries.add(key)
            if reason is not DeadLetterReason.REQUEST_TIMEOUT:
                self._late_reasons[key] = reason
            if len(self._late) > _LATE_MEMORY:
                old = self._late.popleft()
                self.late_queries.discard(old)
                if self._late_reasons:
                    self._late_reasons.pop(old, None)

    def fail_request(self, request_id: uuid.UUID, error: BaseException) -> bool:
        pending = self._pending.pop(request_id.int, None)
        if pending is None:
            return False
        pending.fail(error)
        # The transport failed it (e.g. its node was lost): the remote handler may
        # still answer, and that reply is late, as after a timeout, not a message of
        # its own for the requester.
        self._mark_late(request_id)
        return True

    def fail_query(self, query_id: uuid.UUID, error: BaseException) -> None:
        """Fail the requester of a handled query that will get no answer: a pending
        request here, else (a requester on another kernel) through the transport."""
        if not self.fail_request(query_id, error):
            self._fail_remote_requester(query_id, error)
            # a query the transport delivered on terms of its own (a durable message:
            # its delivery fails now, not at the end of its ack wait); see QueryGivingUp
            transport = self.transport
            given_up = getattr(transport, "query_given_up", None) if transport else None
            if given_up is not None:
                given_up(query_id, error)

    def _fail_remote_requester(self, query_id: uuid.UUID, error: BaseException) -> None:
        """Tell the transport that query ``query_id``, if it brought it from a requester on
        another kernel, will get no answer but ``error`` (see QueryFailing)."""
        transport = self.transport
        if transport is not None:
            # optional for a transport (QueryFailing): one without it leaves the remote
            # requester to its deadline, as before the method existed
            query_failed = getattr(transport, "query_failed", None)
            if query_failed is not None:
                query_failed(query_id, error)

    def fail_all_pending(self, make_error: Callable[[], BaseException]) -> None:
        for pending in list(self._pending.values()):
            pending.fail(make_error())
