"""Pools: N copies of one agent behind one address, with a router that picks a worker.

:func:`pool` returns an :class:`AgentSpec` for a *router* agent (Akka's pool routers:
``RoundRobinPool``, ``SmallestMailboxPool``, ``ConsistentHashingPool``). Spawned, the
router takes the pool's name, starts its workers under a supervisor of their own
(``<name>/supervisor``, a linked child of the router, so the pool stops as one) and
forwards every message it gets to one worker. The forwarded copy keeps the original's
sender, id, kind, timestamp, conversation, reply_to and trace id, so a worker's reply
goes straight to the original sender and ``kernel.request("workers", x)`` gets the
worker's answer. The router hands the copy back to the kernel as its handler's result,
so delivery follows the kernel's rules (backpressure up to ``send_timeout``, then a
``mailbox_full`` dead letter) and nothing accepted is lost silently. A few one-key
payloads are control messages for the router itself (``{"$resize": n}``,
``{"$workers": None}``, ``{"$broadcast": payload}``); see ``docs/pools.md``.

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

import bisect
import contextlib
import enum
import hashlib
import inspect
import json
import logging
import math
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Any, Final, Protocol, final

import attrs
import trio

from ._agent import (
    Agent,
    AgentRef,
    AgentSpec,
    Behaviour,
    Context,
    Handler,
    as_spec,
    stop_for_good,
)
from ._brief import brief
from ._child import Directive, enum_member
from ._config import OverflowPolicy
from ._deadletter import DeadLetterReason
from ._errors import AgentNotFound, MessageFailed, NexusError, RequestFailed
from ._message import Message, MessageKind
from ._plural import FEW, fmt_count
from ._router import KernelPhase
from ._supervisor import Supervisor

if TYPE_CHECKING:
    from ._kernel import Kernel

__all__ = ["PoolRouting", "pool", "pool_workers", "resize_pool"]

log = logging.getLogger("nexus_trio.pool")

#: control payloads the router answers itself instead of forwarding
RESIZE: Final = "$resize"
#: how much of a user's exception (a key function's, a worker's ``on_start``) a pool's
#: error shows (:func:`~nexus_trio._brief.brief`: the repr, cut; as a process agent's)
ERROR_TEXT: Final = 200
#: how much of a value from outside (a ``$resize``'s size, an argument of :func:`pool`)
#: an error shows (see :func:`_shown`)
VALUE_TEXT: Final = 60

#: the most workers a pool grows to by default (see :func:`pool`'s ``max_size``)
DEFAULT_MAX_SIZE: Final = 1024
WORKERS: Final = "$workers"
BROADCAST: Final = "$broadcast"
#: the most ring points per worker a consistent_hash pool takes (see pool())
VIRTUAL_NODES_MAX: Final = 10_000
#: the most ring points a consistent_hash pool holds, ``max_size * virtual_nodes`` (1,024
#: workers of 256): each is hashed, in the router's run, as its worker joins, and a
#: ``$resize`` to ``max_size`` can come from any sender (see pool())
RING_POINTS_MAX: Final = 1 << 18
_CONTROL: Final = frozenset({RESIZE, WORKERS, BROADCAST})
#: the ``stopped`` event's reason for a grown worker whose first ``on_start`` failed


class PoolRouting(enum.Enum):
    """How a pool's router picks the worker for a message."""

    #: workers in turn, in the order they were started
    ROUND_ROBIN = "round_robin"
    #: the worker with the fewest messages queued or in hand (first such worker on ties)
    LEAST_LOADED = "least_loaded"
    #: the worker that owns ``key(msg)`` on a hash ring: equal keys, same worker
    CONSISTENT_HASH = "consistent_hash"


def _to_routing(value: Any) -> PoolRouting:
    return enum_member(PoolRouting, value, "pool routing")


def _shown(value: Any) -> str:
    """A value from outside as an error shows it (:func:`~nexus_trio._brief.brief`): its
    repr, cut; an integer too long for that by its size (``an integer of about 5,000
    digits``)."""
    return brief(value, VALUE_TEXT)


def _check_size(size: Any, what: str = "pool size") -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"{what} must be an integer >= 1, got {_shown(size)}")
    return size


# --- the hash ring ---------------------------------------------------------------------
# Hand-written over hashlib and bisect (about twenty lines) rather than a ring library:
# the one on PyPI (uhashring) hashes ``str(key)``, which would make dict keys depend on
# insertion order, and adds ketama compatibility a pool has no use for.


def _hash(data: bytes) -> int:
    # A keyed-free, process-independent hash (Python's hash() of str is salted per run).
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def key_bytes(key: Any) -> bytes:
    """The bytes a consistent-hash key is hashed as: text as UTF-8, else canonical JSON."""
    if isinstance(key, str):
        return key.encode()
    if isinstance(key, bytes):
        return key
    if isinstance(key, uuid.UUID):
        return str(key).encode()
    try:
        return json.dumps(key, sort_keys=True, separators=(",", ":")).encode()
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"a consistent-hash key must be text, bytes, a UUID or JSON-compatible, "
            f"got {type(key).__name__}: {exc}"
        ) from None


@final
class HashRing:
    """Each worker owns ``virtual_nodes`` points on a 64-bit ring; a key belongs to the
    first point at or after its hash. Adding a worker moves only the keys its new points
    take over (about 1/N of them), all to the new worker.

    A worker's points are hashed once, as it joins, and kept: a resize puts the points
    of the workers that joined into the ring, and takes those of the workers that left
    out of it, by bisection and slices, so it costs about the points it adds or removes
    and a copy of the ring's lists, not a hash of every point (until the fifty-eighth
    pass every resize hashed and sorted all of them again, in the router's run: 0.6 s
    for 1,024 workers of 100 points, on a loaded 2-core machine, to add one worker)."""

    __slots__ = ("_owners", "_points", "_points_of", "virtual_nodes")

    def __init__(self, virtual_nodes: int) -> None:
        self.virtual_nodes = virtual_nodes
        #: the ring: its points, sorted, and each point's worker
        self._points: list[int] = []
        self._owners: list[AgentRef] = []
        #: per worker in the ring, its points (hashed as it joined), sorted
        self._points_of: dict[uuid.UUID, list[int]] = {}

    def rebuild(self, workers: list[AgentRef]) -> None:
        """Make the ring hold the points of ``workers`` (oldest first), no others."""
        points_of = self._points_of
        ids = {worker.id for worker in workers}
        gone = [worker_id for worker_id in points_of if worker_id not in ids]
        if gone:
            self._take_out(gone)
        joined = [(i, worker) for i, worker in enumerate(workers) if worker.id not in points_of]
        if joined:
            self._put_in(joined)

    def _take_out(self, gone: list[uuid.UUID]) -> None:
        points, owners = self._points, self._owners
        cut: list[int] = []
        for worker_id in gone:
            i = -1
            # (its points are sorted, so each is found after the one before: two equal
            # points of its own are two places)
            for point in self._points_of.pop(worker_id):
                i = bisect.bisect_left(points, point, i + 1)
                while owners[i].id != worker_id:  # (another worker's point, equal)
                    i += 1
                cut.append(i)
        cut.sort()
        kept_points: list[int] = []
        kept_owners: list[AgentRef] = []
        start = 0
        for i in cut:
            kept_points += points[start:i]
            kept_owners += owners[start:i]
            start = i + 1
        kept_points += points[start:]
        kept_owners += owners[start:]
        self._points, self._owners = kept_points, kept_owners

    def _put_in(self, joined: list[tuple[int, AgentRef]]) -> None:
        # In the order a whole sort of (point, worker's place) gave: a new point after an
        # equal one of an older worker (the ring's are all older), then by place.
        added: list[tuple[int, int, AgentRef]] = []
        for place, worker in joined:
            mine = sorted(
                _hash(f"{worker.name or worker.id}#{v}".encode()) for v in range(self.virtual_nodes)
            )
            self._points_of[worker.id] = mine
            added.extend((point, place, worker) for point in mine)
        added.sort(key=_point_and_place)
        points, owners = self._points, self._owners
        if not points:  # (the router's start)
            self._points = [point for point, _, _ in added]
            self._owners = [worker for _, _, worker in added]
            return
        new_points: list[int] = []
        new_owners: list[AgentRef] = []
        start = 0
        for point, _, worker in added:
            i = bisect.bisect_right(points, point, start)
            new_points += points[start:i]
            new_owners += owners[start:i]
            new_points.append(point)
            new_owners.append(worker)
            start = i
        new_points += points[start:]
        new_owners += owners[start:]
        self._points, self._owners = new_points, new_owners

    def owner(self, key: bytes) -> AgentRef:
        i = bisect.bisect_left(self._points, _hash(key))
        return self._owners[i % len(self._owners)]


def _point_and_place(entry: tuple[int, int, AgentRef]) -> tuple[int, int]:
    return entry[0], entry[1]


# --- what a least-loaded router counts ------------------------------------------------------


@final
class _FirstStart:
    """How the first start of a worker added by a grow went: ``done`` is set once its
    ``on_start`` returned or raised (``error``)."""

    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.error: Exception | None = None


@final
class _WorkerBehaviour:
    """A worker's behaviour, wrapped to tell the router what it needs to know.

    * ``started[worker id]`` is set when the worker starts (see
      :meth:`_PoolRouter._retire` for why the router waits for it). Having an
      ``on_start`` makes the workers start with their supervisor rather than on their
      first message.
    * ``in_hand[worker id]`` (least-loaded pools) is 1 while the worker's handler works
      on a message, 0 otherwise, however the handler ends (returns, raises, times out,
      is cancelled); with the worker's mailbox depth it is the worker's load.
    * ``running`` (least-loaded pools) holds the workers whose ``on_start`` has returned
      and whose ``on_stop`` has not begun: a worker out of it is starting, or waits out
      a restart's backoff, and is picked after the running ones (Akka's
      ``SmallestMailboxPool`` puts a suspended routee last).
    * ``first_starts[worker id]`` (workers added by a grow, until their first start;
      one whose start failed, until it stopped: ``$workers`` leaves them out)
      tells the grow how that start went: the first ``on_start`` that returns or raises
      (one cancelled, by a restart of its siblings, say, leaves it to the next). One
      that fails is stopped for good (``start_failed``) instead of being restarted, as
      OTP's ``start_child`` does not restart a child whose ``init`` failed: it never
      ran, and its restarts would spend the intensity that protects the running
      workers.
    """

    __slots__ = ("_first_starts", "_in_hand", "_inner", "_running", "_started")

    def __init__(
        self,
        inner: Behaviour,
        started: dict[uuid.UUID, trio.Event],
        in_hand: dict[uuid.UUID, int] | None,
        first_starts: dict[uuid.UUID, _FirstStart],
        running: set[uuid.UUID],
    ) -> None:
        self._inner = inner
        self._started = started
        self._in_hand = in_hand
        self._first_starts = first_starts
        self._running = running

    async def on_start(self, ctx: Context) -> None:
        started = self._started.get(ctx.id)
        if started is not None:
            started.set()
        first_starts = self._first_starts
        first = first_starts.get(ctx.id)
        if first is None:
            await self._inner.on_start(ctx)
            self._now_running(ctx)
            return
        # Taken only once this on_start returned or raised: one cancelled (a restart of
        # its siblings cut it short) leaves the first start to the next run's on_start.
        try:
            await self._inner.on_start(ctx)
        except Exception as exc:
            # (left in first_starts: the grow takes it out once this worker has stopped,
            # so the pool never lists it as one of its workers)
            first.error = exc
            first.done.set()
            await stop_for_good(ctx)
            raise  # the run fails with it: a ``failed`` event, then ``stopped``
        first_starts.pop(ctx.id, None)
        first.done.set()
        self._now_running(ctx)

    def _now_running(self, ctx: Context) -> None:
        in_hand = self._in_hand
        # (only while the pool counts it: not a worker it let go of)
        if in_hand is not None and ctx.id in in_hand:
            self._running.add(ctx.id)

    async def on_stop(self, ctx: Context) -> None:
        # Its run ends: until its next on_start returns (a restart's backoff, say), the
        # least-loaded router picks it after the running workers.
        self._running.discard(ctx.id)
        await self._inner.on_stop(ctx)

    async def handle(self, ctx: Context, msg: Message) -> Any:
        in_hand = self._in_hand
        # A worker the pool has let go of (removed, draining) is no longer counted.
        if in_hand is None or ctx.id not in in_hand:
            return await self._inner.handle(ctx, msg)
        in_hand[ctx.id] = 1
        try:
            return await self._inner.handle(ctx, msg)
        finally:
            if ctx.id in in_hand:
                in_hand[ctx.id] = 0


# --- the pool spec ------------------------------------------------------------------------------


@final
@attrs.frozen
class _PoolPlan:
    """Everything a router needs, fixed when :func:`pool` is called."""

    worker: AgentSpec
    size: int
    routing: PoolRouting
    key: Callable[[Message], Any] | None
    virtual_nodes: int
    supervision: Supervisor
    #: the most workers a ``$resize`` may grow the pool to
    max_size: int
    #: per router id, the workers' supervisor its last run spawned (one small entry per
    #: router ever spawned from this spec): a restarted router stops only its own
    supervisors: dict[uuid.UUID, AgentRef] = attrs.field(factory=dict, eq=False)


def pool(
    worker: AgentSpec | Handler | type[Any],
    *,
    size: int = 4,
    routing: PoolRouting | str = PoolRouting.ROUND_ROBIN,
    key: Callable[[Message], Any] | None = None,
    name: str = "workers",
    virtual_nodes: int = 100,
    supervision: Supervisor | None = None,
    max_size: int | None = None,
) -> AgentSpec:
    """A spec for a pool of ``size`` copies of ``worker`` behind the address ``name``.

    ``kernel.spawn(pool(...))`` (or ``ctx.spawn``) returns the router's
    :class:`AgentRef`; send to it or to ``name`` like to any agent. Workers are named
    ``<name>/0``, ``<name>/1``, ... (numbers are never reused) and run under
    ``<name>/supervisor``, whose strategy, intensity and backoff are taken from
    ``supervision`` (a :class:`Supervisor` without children; default: ``one_for_one``,
    3 restarts within 5 s). ``routing`` is ``"round_robin"``, ``"least_loaded"`` or
    ``"consistent_hash"``; the last needs ``key``, a function of the message whose
    result (text, bytes, UUID or JSON-compatible) picks the worker. ``virtual_nodes`` is
    the number of ring points per worker for consistent hashing (at most 10,000). ``max_size`` bounds
    what a ``$resize`` may grow the pool to (default: the larger of 1,024 and ``size``):
    a resize can come from any sender, and each worker costs memory. A consistent-hash
    ring holds at most 262,144 points (``max_size * virtual_nodes``); its default
    ``max_size`` is cut to fit.

    The router's own limits (mailbox capacity, handle timeout) are the kernel's
    defaults; change them with ``pool(...).with_options(...)``.
    """
    if isinstance(worker, Supervisor):
        raise TypeError(
            "a pool's worker must be an agent (spec, class or handler), not a Supervisor"
        )
    worker_spec = as_spec(worker)
    size = _check_size(size)
    mode = _to_routing(routing)
    if mode is PoolRouting.CONSISTENT_HASH:
        if key is None or not callable(key):
            raise ValueError("consistent_hash routing needs key=, a function of the message")
        # (an object whose __call__ is async, too)
        if inspect.iscoroutinefunction(key) or inspect.iscoroutinefunction(type(key).__call__):
            # (the router calls it and hashes what it returns: a coroutine, never awaited)
            raise TypeError(
                f"key= must be a plain function of the message ('def'), not an async one:"
                f" {getattr(key, '__qualname__', None) or repr(key)} is 'async def'"
            )
    elif key is not None:
        raise ValueError(f"key= is only used by consistent_hash routing, not {mode.value!r}")
    if isinstance(virtual_nodes, bool) or not isinstance(virtual_nodes, int) or virtual_nodes < 1:
        raise ValueError(f"virtual_nodes must be an integer >= 1, got {_shown(virtual_nodes)}")
    if virtual_nodes > VIRTUAL_NODES_MAX:
        # The ring hashes virtual_nodes points per worker as it joins, in the router's
        # run: 10**9 was accepted, and the router's start ran for hours.
        raise ValueError(
            f"virtual_nodes must be at most {fmt_count(VIRTUAL_NODES_MAX)} (ring points per"
            f" worker, each hashed as its worker joins), got {_shown(virtual_nodes)}"
        )
    if supervision is None:
        supervision = Supervisor()
    elif not isinstance(supervision, Supervisor):
        raise TypeError(f"supervision must be a Supervisor, got {type(supervision).__name__}")
    elif supervision.children:
        raise ValueError("the pool starts its own workers: supervision= must have no children")
    elif supervision.shutdown_timeout != math.inf or supervision.name is not None:
        # (were ignored: only strategy, intensity, backoff and restart are the pool's)
        field = "name" if supervision.name is not None else "shutdown_timeout"
        raise ValueError(
            f"supervision= takes strategy, max_restarts, within, backoff and restart only,"
            f" not {field}: a worker's stop is bounded by its own shutdown_timeout"
            " (agent(..., shutdown_timeout=)), the pool's by"
            " pool(...).with_options(shutdown_timeout=); the pool names its supervisor"
        )
    if max_size is None:
        # (a consistent_hash pool's, no more than its ring's bound takes)
        ring_room = RING_POINTS_MAX // virtual_nodes if key is not None else DEFAULT_MAX_SIZE
        max_size = max(size, min(DEFAULT_MAX_SIZE, ring_room))
    elif isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < size:
        raise ValueError(
            f"max_size must be an integer >= size, {_shown(size)}, got {_shown(max_size)}"
        )
    if key is not None and max_size * virtual_nodes > RING_POINTS_MAX:
        # A $resize to max_size can come from any sender: at 1,024 workers of 10,000 points
        # it hashed 10 million points in the router's run (minutes, and about 2 GB).
        raise ValueError(
            f"a consistent_hash pool's ring holds at most {fmt_count(RING_POINTS_MAX)} points"
            " (max_size * virtual_nodes, each hashed in the router's run as its worker joins),"
            f" got {_shown(max_size)} * {_shown(virtual_nodes)}: with virtual_nodes"
            f" {_shown(virtual_nodes)}, max_size (and size) may be at most"
            f" {fmt_count(RING_POINTS_MAX // virtual_nodes)}"
        )
    plan = _PoolPlan(worker_spec, size, mode, key, virtual_nodes, supervision, max_size)

    def router() -> _PoolRouter:
        return _PoolRouter(plan)

    return AgentSpec(factory=router, name=name)


@final
class _PoolRouter(Agent):
    """The pool's address: starts the workers, forwards messages, resizes on request."""

    def __init__(self, plan: _PoolPlan) -> None:
        self.plan = plan
        self.workers: list[AgentRef] = []
        self.supervisor: AgentRef | None = None
        self.next_serial = 0
        #: round robin: the index in ``workers`` of the next worker's turn
        self.cursor = 0
        self.ring = HashRing(plan.virtual_nodes) if plan.key is not None else None
        self.name = ""
        #: least-loaded routing: per worker id, 1 while its handler works on a message
        #: (the workers of this run set it, see _WorkerBehaviour)
        self.in_hand: dict[uuid.UUID, int] = {}
        #: least-loaded routing: the workers that run (started, not between runs)
        self.running: set[uuid.UUID] = set()
        #: least-loaded routing: the kernel's mailbox_depth (set on start)
        self.depth: Callable[[AgentRef], int] | None = None
        #: least-loaded routing: the workers' mailbox capacity (set on start)
        self.capacity = 0
        #: per worker id, set once that worker has started
        self.started: dict[uuid.UUID, trio.Event] = {}
        #: per worker added by a grow, until its first start: how it went
        self.first_starts: dict[uuid.UUID, _FirstStart] = {}
        #: grows whose answer waits for their workers' first starts; ``settled`` is set
        #: when none does
        self.grows = 0
        self.settled = trio.Event()
        self.settled.set()
        #: resizes that came while a grow's workers were starting, waiting their turn in
        #: arrival order, done by one task (``resizing``) at a time; ``resizes_waiting``
        #: counts them with the one in hand
        self.resizes_queued: deque[tuple[Message, int]] = deque()
        self.resizes_waiting = 0
        self.resizing = False
        self.on_error = _worker_on_error(plan.worker)

    # --- lifecycle ---------------------------------------------------------------------

    async def on_start(self, ctx: Context) -> None:
        self.name = ctx.name or str(ctx.id)
        kernel = ctx.kernel
        self.depth = kernel.mailbox_depth
        self.capacity = self.plan.worker.mailbox_capacity or kernel.config.kernel.mailbox_capacity
        sup_name = f"{self.name}/supervisor"
        previous = self.plan.supervisors.get(ctx.id)
        if previous is not None:
            try:
                alive = kernel.lookup(sup_name) == previous
            except AgentNotFound:
                alive = False
            if alive:
                # Left over from a failed run of this router (the core does not stop a
                # failed parent's linked children, reported): the pool restarts as a
                # whole; queued work is dead-lettered ``agent_stopped``, as for any stop.
                await kernel.stop(previous)
        names = [self._next_name() for _ in range(self.plan.size)]
        spec = self.plan.supervision
        workers: Any = [self._worker_spec(n) for n in names]
        self.supervisor = ctx.spawn(
            Supervisor(
                strategy=spec.strategy,
                max_restarts=spec.max_restarts,
                within=spec.within,
                backoff=spec.backoff,
                restart=spec.restart,
                children=workers,
                name=sup_name,
            )
        )
        self.plan.supervisors[ctx.id] = self.supervisor
        for worker_name in names:
            self._add(kernel.lookup(worker_name))
        self._rebuild()
        ctx.nursery.start_soon(self._watch_supervisor, ctx, self.supervisor)
        ctx.log.info(
            "pool %s started: %d workers, %s routing",
            self.name,
            len(self.workers),
            self.plan.routing.value,
        )

    async def _watch_supervisor(self, ctx: Context, supervisor: AgentRef) -> None:
        """Fail the router when its workers' supervisor stops for good while the router
        runs on: its supervisor (the root, say) gave up on it after its escalations, or
        someone stopped it. A pool without it can neither route nor grow, so it fails as
        a whole and its own supervisor decides (a restart makes it fresh), as OTP's
        linked pool and Akka's escalating router do. Not when the router (or the kernel)
        is stopping or restarted: that stops the supervisor first, as a linked child."""
        kernel = ctx.kernel
        await kernel.wait_stopped(supervisor)
        if (
            kernel.phase is not KernelPhase.RUNNING
            or not kernel.is_local(ctx.id)
            or ctx.stop_requested
        ):
            # (its own stop or restart: a supervisor stops what an agent spawned first,
            # then asks the agent to stop, before this task runs again)
            return
        raise NexusError(
            f"pool {self.name!r}: its workers' supervisor {supervisor.name!r} stopped for good"
            " (given up on after its escalations, or stopped): the pool fails as a whole"
        )

    def _next_name(self) -> str:
        serial = self.next_serial
        self.next_serial += 1
        return f"{self.name}/{serial}"

    def _worker_spec(self, worker_name: str) -> AgentSpec:
        spec = self.plan.worker
        inner = spec.factory
        started = self.started
        in_hand = self.in_hand if self.plan.routing is PoolRouting.LEAST_LOADED else None
        first_starts = self.first_starts
        running = self.running

        def wrapped() -> Behaviour:
            return _WorkerBehaviour(inner(), started, in_hand, first_starts, running)

        return spec.with_options(
            factory=wrapped, handler=None, name=worker_name, on_error=self.on_error
        )

    def _add(self, ref: AgentRef) -> None:
        self.workers.append(ref)
        # (a grown worker's is made at its spawn, and may be set already)
        self.started.setdefault(ref.id, trio.Event())
        if self.plan.routing is PoolRouting.LEAST_LOADED:
            self.in_hand[ref.id] = 0

    def _remove(self, gone: list[AgentRef]) -> None:
        ids = {ref.id for ref in gone}
        # Round robin's turn stays on the worker it was on: one fewer for each worker
        # removed before it (a turn past the end wraps to the first when next used).
        before = sum(1 for w in self.workers[: self.cursor] if w.id in ids)
        self.cursor -= before
        self.workers = [w for w in self.workers if w.id not in ids]
        self._rebuild()

    def _let_go(self, ref: AgentRef) -> None:
        """Forget what the pool kept on a worker that has left it."""
        self.in_hand.pop(ref.id, None)
        self.running.discard(ref.id)
        self.started.pop(ref.id, None)

    def _rebuild(self) -> None:
        if self.ring is not None:
            self.ring.rebuild(self.workers)

    # --- routing --------------------------------------------------------------------------

    async def handle(self, ctx: Context, msg: Message) -> Any:
        payload = msg.payload
        if payload.__class__ is dict and len(payload) == 1:
            (control,) = payload
            if control in _CONTROL:
                answer = await self._control(ctx, msg, control, payload[control])
                # Only a request is answered: a told resize has no one waiting for it.
                return answer if msg.kind is MessageKind.QUERY else None
        if not self.workers:
            raise MessageFailed(self._no_workers())
        target = self._choose(msg)
        if not ctx.kernel.is_local(target.id):
            # Stopped for good, not by a resize (a temporary or transient worker that
            # ended, or a kernel.stop): out of the pool, as in Akka; choose again.
            target = self._drop_stopped(ctx, msg)
        # Handed back to the kernel as the result: it is delivered under the kernel's
        # rules (backpressure, then a dead letter), never dropped by the router.
        return Message(
            sender=msg.sender,
            to=target.id,
            payload=payload,
            kind=msg.kind,
            id=msg.id,
            timestamp=msg.timestamp,
            conversation_id=msg.conversation_id,
            reply_to=msg.reply_to,
            trace_id=msg.trace_id,
        )

    def _drop_stopped(self, ctx: Context, msg: Message) -> AgentRef:
        self._forget_stopped(ctx)
        if not self.workers:
            raise MessageFailed(self._no_workers())
        return self._choose(msg)

    def _forget_stopped(self, ctx: Context) -> None:
        """Take the workers that stopped for good out of the pool."""
        is_local = ctx.kernel.is_local
        gone = [w for w in self.workers if not is_local(w.id)]
        if not gone:
            return
        self._remove(gone)
        for ref in gone:
            self._let_go(ref)
        ctx.log.warning(
            "pool %s: workers %s stopped; %d left",
            self.name,
            ", ".join(str(w.name) for w in gone),
            len(self.workers),
        )

    def _no_workers(self) -> str:
        return (
            f"pool {self.name!r} has no workers left (they stopped); grow it with {{{RESIZE!r}: n}}"
        )

    def _choose(self, msg: Message) -> AgentRef:
        workers = self.workers
        routing = self.plan.routing
        if routing is PoolRouting.ROUND_ROBIN:
            # The index of the next worker, not a count of messages: a resize keeps the
            # turn where it is (a count taken modulo the new size would jump).
            turn = self.cursor
            if turn >= len(workers):
                turn = 0
            self.cursor = turn + 1
            return workers[turn]
        if routing is PoolRouting.LEAST_LOADED:
            return self._least_loaded()
        assert self.ring is not None and self.plan.key is not None
        try:
            data = key_bytes(_plain_key(self.plan.key(msg)))
        except Exception as exc:
            # The message fails, the pool does not (Akka sends unhashable messages to
            # dead letters too): dead letter ``handler_error``, a requester gets
            # RequestFailed naming the problem.
            # (the key function's error is user code: its repr may raise, or be long)
            raise MessageFailed(
                f"pool {self.name!r}: no consistent-hash key: {brief(exc, ERROR_TEXT)}"
            ) from exc
        return self.ring.owner(data)

    def _least_loaded(self) -> AgentRef:
        """The worker with the fewest messages queued or in hand, the oldest on a tie
        (Akka's SmallestMailboxPool): first the running workers with room, then those
        with room that are starting or wait out a restart's backoff, then the full ones.
        Read from the mailboxes themselves, so a message dropped by an overflow policy,
        expired in a mailbox or sent to a worker by its name counts exactly as long as
        it is there."""
        depth = self.depth
        assert depth is not None
        in_hand = self.in_hand
        running = self.running
        capacity = self.capacity
        # more than any load of a worker with room (queued < capacity, 1 in hand)
        tier = capacity + 2
        best = self.workers[0]
        best_load = -1
        for worker in self.workers:
            try:
                queued = depth(worker)
            except AgentNotFound:
                return worker  # stopped: the caller drops it and chooses again
            load = queued + in_hand.get(worker.id, 0)
            if queued >= capacity:
                # Full, last: the router must not wait for room there (and dead-letter
                # the message ``mailbox_full`` past send_timeout) while another worker,
                # even one that is not running yet, could take it.
                load += 2 * tier
            elif worker.id not in running:
                # Starting, or waiting out a restart's backoff: what is sent there waits
                # for its on_start, while a running worker may be idle (Akka's
                # SmallestMailboxPool puts a suspended routee last too).
                load += tier
            if best_load < 0 or load < best_load:
                best, best_load = worker, load
                if not load:
                    break
        return best

    # --- control messages -----------------------------------------------------------------

    async def _control(self, ctx: Context, msg: Message, control: str, value: Any) -> Any:
        # Stopped workers leave the pool when a message is routed to them; a control
        # message counts and lists the workers, so it drops them first: a resize to n
        # leaves n running workers, and the list names only running ones.
        self._forget_stopped(ctx)
        if control == WORKERS:
            # Not a grown worker whose first on_start has not returned: it is not running
            # yet, and may never (one that fails to start leaves the pool), as OTP's
            # which_children shows a child only once start_child (waiting for its init)
            # returned. It gets messages meanwhile (they wait for its start).
            starting = self.first_starts
            return [{"id": str(w.id), "name": w.name} for w in self.workers if w.id not in starting]
        if control == BROADCAST:
            return await self._broadcast(ctx, msg, value)
        try:
            size = _check_size(value, f"pool {self.name!r}: {RESIZE}")
        except ValueError as exc:
            raise MessageFailed(str(exc)) from None
        if size > self.plan.max_size:
            raise MessageFailed(
                f"pool {self.name!r}: {RESIZE} to {_shown(size)} is past its max_size,"
                f" {_shown(self.plan.max_size)}"
            )
        if self.grows or self.resizes_waiting:
            # A grow's workers are starting: how many of them the pool keeps is not known
            # until their first on_start returned (one that fails leaves it), so this
            # resize waits for that, as a call to an OTP supervisor waits while its
            # start_child runs a child's init. Counting them made a resize to n answer n
            # and leave fewer (test_a_resize_while_grown_workers_start_waits_for_their_starts).
            # The router took it out of its mailbox (routing goes on): it waits as if it
            # were still there, so no more wait than the mailbox holds (unbounded, each a
            # task: a flood of resizes from any sender grew the router without end). The
            # router's own mailbox: pool(...).with_options(mailbox_capacity=...) sets it.
            room = ctx.kernel.mailbox_statistics(ctx.id).capacity
            if self.resizes_waiting >= room:
                raise MessageFailed(
                    f"pool {self.name!r}: {RESIZE} to {_shown(size)} refused: {room} resizes already"
                    " wait for a grow's workers to start (as many as the pool's mailbox holds)"
                )
            self.resizes_waiting += 1
            self.resizes_queued.append((msg, size))
            if not self.resizing:
                # One task does them all, in the order they came: a task each, taking a
                # fair lock, took it in the order Trio first ran them, which reverses a
                # batch at random (a 3, 3, 2, 3 ended at 2 workers in 4 runs of 15).
                self.resizing = True
                ctx.nursery.start_soon(self._resizes_when_settled, ctx)
            return None
        return self._resize(ctx, msg, size)

    async def _resizes_when_settled(self, ctx: Context) -> None:
        """Do the waiting resizes in the order they came, each once no grow's workers are
        starting (one of them may start a grow the next waits for); each answered as
        :meth:`_resize` answers. Those still waiting when the pool stops are told so."""
        try:
            while self.resizes_queued:
                while self.grows:
                    await self.settled.wait()
                request, size = self.resizes_queued.popleft()
                reply: Any = None
                answered = False
                try:
                    self._forget_stopped(ctx)  # those whose first start failed
                    try:
                        reply = self._resize(ctx, request, size)
                    except MessageFailed as exc:
                        self._fail_resize(ctx, request, str(exc))
                    answered = True
                finally:
                    self.resizes_waiting -= 1
                    if not answered:
                        self._fail_unanswered(ctx, request)
                if reply is not None:
                    # (not awaited here: the next resize does not wait for this answer)
                    ctx.nursery.start_soon(self._answer_resize, ctx, request, reply)
        finally:
            self.resizing = False
            while self.resizes_queued:
                request, _ = self.resizes_queued.popleft()
                self.resizes_waiting -= 1
                self._fail_unanswered(ctx, request)

    async def _answer_resize(self, ctx: Context, request: Message, answer: Any) -> None:
        """Answer a resize done after its message was handled (a told one: no answer)."""
        if request.kind is MessageKind.QUERY:
            try:
                await ctx.send(request.reply(ctx.id, answer))
            except NexusError as exc:
                log.info("pool %s: resize answer not delivered: %s", self.name, exc)

    def _resize(self, ctx: Context, msg: Message, size: int) -> Any:
        """Grow or shrink to ``size``: the answer, or None when it comes later (once the
        new workers started, or the removed ones stopped)."""
        if size > len(self.workers):
            self._grow(ctx, msg, size)
            return None  # answered once the new workers have started (or failed to)
        if size < len(self.workers):
            removed = self.workers[size:]
            self._remove(removed)
            ctx.log.info("pool %s: shrinking to %d workers", self.name, size)
            # Stopping drains the removed workers' queues, which may take a while: done
            # in the background so that routing goes on; the answer comes when they stop.
            ctx.nursery.start_soon(self._retire, ctx, msg, removed, size)
            return None
        return {"size": size}

    def _grow(self, ctx: Context, request: Message, size: int) -> None:
        """Spawn workers up to ``size``; they get messages at once. The answer waits
        for their first start (as OTP's ``start_child`` waits for ``init``), in the
        background so that routing goes on: one whose first ``on_start`` fails is
        stopped for good (see :class:`_WorkerBehaviour`), leaves the pool, and the grow
        fails naming it; the workers that started stay."""
        assert self.supervisor is not None
        spawned: list[tuple[AgentRef, _FirstStart]] = []
        refused = ""  # why the spawning stopped short, if it did
        try:
            while len(self.workers) < size:
                ref = ctx.kernel.spawn(
                    self._worker_spec(self._next_name()), supervisor=self.supervisor
                )
                spawned.append((ref, self.first_starts.setdefault(ref.id, _FirstStart())))
                self._add(ref)
        except NexusError as exc:
            refused = str(exc)
        if spawned:
            self._rebuild()
            ctx.log.info("pool %s: grew to %d workers", self.name, len(self.workers))
            if not self.grows:
                self.settled = trio.Event()
            self.grows += 1
            ctx.nursery.start_soon(self._answer_grow, ctx, request, spawned, size, refused)
        elif refused:
            raise MessageFailed(self._grew(0, size, [], refused))

    def _grew(self, added: int, size: int, problems: list[str], refused: str = "") -> str:
        # (the first few workers' problems, the rest counted: a grow by a thousand workers
        # that all fail is one line; then why the spawning stopped short, if it did)
        more = len(problems) - FEW
        said = problems[:FEW] + ([f"and {fmt_count(more)} more"] if more > 0 else [])
        if refused:
            said.append(refused)
        return (
            f"pool {self.name!r}: grew by {added} to {len(self.workers)} workers, "
            f"not {size}: {'; '.join(said)}"
        )

    async def _answer_grow(
        self,
        ctx: Context,
        request: Message,
        spawned: list[tuple[AgentRef, _FirstStart]],
        size: int,
        refused: str,
    ) -> None:
        kernel = ctx.kernel
        problems: list[str] = []
        answered = False
        try:
            # In spawn order: they start in that order (each after the one before).
            for ref, first in spawned:
                await _started_or_stopped(kernel, ref, first.done)
                if first.error is not None:
                    # (stopped for good, see _WorkerBehaviour: out of the pool as it stops)
                    await kernel.wait_stopped(ref)
                self.first_starts.pop(ref.id, None)
                if first.error is not None:
                    # (its on_start's error is user code: its repr may raise, or be long)
                    problems.append(f"{ref.name} failed to start: {brief(first.error, ERROR_TEXT)}")
                elif not first.done.is_set():
                    problems.append(f"{ref.name} stopped before it started")
            answered = True
        finally:
            if not answered:
                for ref, _ in spawned:
                    self.first_starts.pop(ref.id, None)
                self._fail_unanswered(ctx, request)
            self.grows -= 1
            if not self.grows:
                self.settled.set()
        self._forget_stopped(ctx)  # those that failed to start
        if problems or refused:
            added = len(spawned) - sum(1 for _, first in spawned if not _ran(first))
            self._fail_resize(ctx, request, self._grew(added, size, problems, refused))
            return
        # (as a shrink's: the size it made, whatever happened to the workers since they
        # started)
        await self._answer_resize(ctx, request, {"size": size})

    def _fail_resize(self, ctx: Context, request: Message, text: str) -> None:
        """A resize answered after its message was handled failed (``text``): logged (a
        warning: a told one has no other answer), and a requester gets it as the
        handler's error."""
        ctx.log.warning("%s", text)
        if request.kind is MessageKind.QUERY:
            ctx.kernel.fail_query(
                request.id,
                RequestFailed(
                    request.id,
                    request.to,
                    DeadLetterReason.HANDLER_ERROR.value,
                    MessageFailed(text),
                    name=ctx.name,
                ),
            )

    def _fail_unanswered(self, ctx: Context, request: Message) -> None:
        """The pool stops (or its supervisor restarts it) before a resize is done: no
        answer will come, so the requester hears it now, not at the end of its timeout,
        on this node or another. As for a query still queued at an agent that stops:
        the reason, and no error (a RequestFailed's error is a handler's exception; none
        was raised)."""
        if request.kind is not MessageKind.QUERY:
            return
        kernel = ctx.kernel
        reason = DeadLetterReason.SHUTDOWN if kernel.stopping else DeadLetterReason.AGENT_STOPPED
        kernel.fail_query(
            request.id, RequestFailed(request.id, request.to, reason.value, None, name=ctx.name)
        )

    async def _retire(
        self, ctx: Context, request: Message, removed: list[AgentRef], size: int
    ) -> None:
        stopped = False
        try:
            stopped = await self._stop_removed(ctx, removed)
        finally:
            if not stopped:
                self._fail_unanswered(ctx, request)
        if stopped:
            await self._answer_resize(ctx, request, {"size": size})

    async def _stop_removed(self, ctx: Context, removed: list[AgentRef]) -> bool:
        """Stop the removed workers, newest first, after their queues; False if the pool
        stops first."""
        kernel = ctx.kernel
        for ref in reversed(removed):  # newest first
            # Only a worker that has started: the core stops one that has not (its
            # supervisor not running yet, or its turn in the ordered start not come)
            # without draining it, and may even orphan its task (reported). Right after
            # the pool starts this waits a few scheduling rounds.
            started = self.started.get(ref.id)
            if started is not None and not started.is_set():
                await _started_or_stopped(kernel, ref, started)
            if kernel.stopping or not kernel.is_local(ctx.id):
                # The kernel (or this pool) is stopping its tree, workers included, under
                # the kernel's stop rules; a kernel.stop now would race the supervisor's
                # own stop, so leave the workers to it.
                return False
            # drain=True: what was queued for it is handled before it stops; it may be
            # gone already (stopped by someone else).
            with contextlib.suppress(AgentNotFound):
                await kernel.stop(ref, drain=True)
            self._let_go(ref)
        return True

    async def _broadcast(self, ctx: Context, msg: Message, value: Any) -> Any:
        """Tell ``value`` to every worker; answer how many copies were enqueued, dropped
        by a full ``drop_newest`` mailbox (dead-lettered ``mailbox_overflow``) and
        refused. Full ``block`` workers are waited for together (one ``send_timeout``
        in all, not one per worker in turn): each gets one copy, so what each sees keeps
        its order. Akka's Broadcast is fire-and-forget; the answer is only honest."""
        kind = MessageKind.COMMAND if msg.kind is MessageKind.QUERY else msg.kind
        policy = self.plan.worker.overflow or ctx.kernel.config.kernel.overflow
        counts = {"sent": 0, "dropped": 0, "refused": 0}
        full: list[Message] = []
        for worker in list(self.workers):
            copy = Message(
                sender=msg.sender,
                to=worker.id,
                payload=value,
                kind=kind,
                conversation_id=msg.conversation_id,
                trace_id=msg.trace_id,
            )
            outcome = "sent"
            if policy in _WAITS_OR_DROPS and self._is_full(ctx, worker):
                if policy is OverflowPolicy.BLOCK:
                    full.append(copy)
                    continue
                outcome = "dropped"  # the send dead-letters it (counted there)
            await self._broadcast_one(ctx, copy, counts, outcome)
        if full:
            async with trio.open_nursery() as nursery:
                for copy in full:
                    nursery.start_soon(self._broadcast_one, ctx, copy, counts)
        return counts

    @staticmethod
    def _is_full(ctx: Context, worker: AgentRef) -> bool:
        try:
            stats = ctx.kernel.mailbox_statistics(worker)
        except AgentNotFound:
            return False  # gone: the send refuses it
        return stats.depth >= stats.capacity

    async def _broadcast_one(
        self, ctx: Context, copy: Message, counts: dict[str, int], outcome: str = "sent"
    ) -> None:
        try:
            await ctx.send(copy)
            counts[outcome] += 1
        except NexusError as exc:
            # Refused (not accepted), so not a dead letter: counted in rejected.
            counts["refused"] += 1
            ctx.log.warning("pool %s: broadcast to %s refused: %s", self.name, copy.to, exc)


_WAITS_OR_DROPS: Final = frozenset((OverflowPolicy.BLOCK, OverflowPolicy.DROP_NEWEST))


def _worker_on_error(
    spec: AgentSpec,
) -> Directive | tuple[tuple[type[BaseException], Directive], ...] | None:
    """The workers' ``on_error``: the worker's own. A worker's spec loses its handler
    (its behaviour is wrapped, and it must start with its supervisor, not lazily), and
    a spec without one defaults to ``restart``: a function worker keeps the default of
    a function agent, ``resume``, as the last of its rules."""
    on_error = spec.on_error
    if spec.handler is None or isinstance(on_error, Directive):
        return on_error
    return (*(on_error or ()), (BaseException, Directive.RESUME))


def _plain_key(key: Any) -> Any:
    """The key a key function returned; one that returned an awaitable (a plain function
    that calls an async one) fails its message naming that, the coroutine closed (not
    left to warn that it was never awaited)."""
    if inspect.isawaitable(key):
        if inspect.iscoroutine(key):
            key.close()
        raise TypeError(
            f"the key function returned {type(key).__name__}, an awaitable: it must return"
            " the key itself (the router does not await it)"
        )
    return key


def _ran(first: _FirstStart) -> bool:
    """Whether a grown worker's first start went through."""
    return first.done.is_set() and first.error is None


async def _started_or_stopped(kernel: Kernel, ref: AgentRef, started: trio.Event) -> None:
    """Wait until ``ref`` has started, or stopped for good without starting (a
    ``kernel.stop`` from outside before its turn came): such a worker never starts, and
    the workers removed after it must not wait for it."""
    async with trio.open_nursery() as nursery:

        async def first(wait: Callable[[], Awaitable[None]]) -> None:
            await wait()
            nursery.cancel_scope.cancel()

        nursery.start_soon(first, started.wait)
        nursery.start_soon(first, partial(kernel.wait_stopped, ref))


# --- helpers for callers -------------------------------------------------------------------


class _Requester(Protocol):
    async def request(
        self, to: AgentRef | str | uuid.UUID, payload: Any = None, *, timeout: float | None = None
    ) -> Any: ...


async def resize_pool(
    requester: _Requester,
    pool: AgentRef | str,
    size: int,
    *,
    timeout: float | None = None,
) -> int:
    """Set the number of workers of ``pool``; returns the new size.

    ``requester`` is a :class:`Kernel` or a handler's :class:`Context`. Growing spawns
    workers; shrinking stops the newest ones gracefully, after they have handled what
    was queued for them (no new messages are routed to them meanwhile), and returns
    once they have stopped.
    """
    _check_size(size)
    reply = await requester.request(pool, {RESIZE: size}, timeout=timeout)
    return int(reply["size"])


async def pool_workers(
    requester: _Requester, pool: AgentRef | str, *, timeout: float | None = None
) -> list[AgentRef]:
    """The current workers of ``pool``, oldest first."""
    reply = await requester.request(pool, {WORKERS: None}, timeout=timeout)
    return [AgentRef(uuid.UUID(w["id"]), w["name"]) for w in reply]
