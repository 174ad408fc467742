"""What a supervisor knows of a child: identity, one run at a time, a graceful stop.

Agents (:class:`~nexus_trio._cell.AgentCell`) and supervisors
(:class:`~nexus_trio._supervisor.SupervisorNode`) are both children; process agents and
remote agents could be too. The supervisor drives the run counters, the start gates and
the stop; the child implements :meth:`Child.run_once` and :meth:`Child.request_stop`.

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

import enum
import math
import uuid
from collections import deque
from typing import TYPE_CHECKING, Any, ClassVar, Final, Generic, TypeVar, final, overload

import trio

from ._logfields import log_fields

#: what a draining stop's letters say when the kernel's shutdown ended it (its grace ran
#: out, not the agent's own ``shutdown_timeout``): ``drain_ended`` of such a stop, its
#: letters dead-lettered ``shutdown`` as every other agent's queue then
SHUTDOWN_ENDED_DRAIN: Final = "the kernel's shutdown ended its draining stop"

if TYPE_CHECKING:
    from ._deadletter import DeadLetterReason
    from ._message import Message


class RunDone:
    """Set when a child's run has ended; waited for by whoever stops it.

    ``trio.Event``'s semantics, with the Event (and its set of waiters, 270 bytes in
    all) made only when someone waits before the run ends: every running agent holds
    one of these, and most are never waited for until shutdown.
    """

    __slots__ = ("_event", "_set")

    def __init__(self) -> None:
        self._event: trio.Event | None = None
        #: 0 while the run goes on, 1 once it ended, 2 once it ended in the kernel's stop
        self._set = 0

    def set(self, *, in_stop: bool = False) -> None:
        """The run has ended; ``in_stop``: in the kernel's stop (its last run: the agent
        is counted out of ``agents_alive`` then, not again when it is forgotten)."""
        self._set = 2 if in_stop else 1
        if self._event is not None:
            self._event.set()

    def is_set(self) -> bool:
        return self._set != 0

    @property
    def ended_in_stop(self) -> bool:
        """True if the run ended in the kernel's stop (``set(in_stop=True)``)."""
        return self._set == 2

    async def wait(self) -> None:
        if self._set:
            await trio.lowlevel.checkpoint()
            return
        if self._event is None:
            self._event = trio.Event()
        await self._event.wait()


class StoppedForShutdown(Exception):
    """How a child's run ends when the kernel's own shutdown ended it: a Ctrl-C in the
    agent's code (its class's ``__init__``, ``on_start``, ``on_stop``, a background task)
    that the kernel took as the signal to shut down.

    Not a failure and not an exit to restart: the supervisor stops the child for good
    (``shutdown``), as an OTP supervisor that is terminating restarts nothing.
    ``failure`` is what the run had failed with before the interrupt (``on_stop`` raising
    after a failed run), if anything: that one is reported as any failure is.
    """

    def __init__(self, failure: BaseException | None) -> None:
        super().__init__(failure)
        self.failure = failure


class RestartType(enum.Enum):
    """When a supervisor restarts a child that exited (OTP child restart types)."""

    #: always restarted, whether it failed or exited normally
    PERMANENT = "permanent"
    #: restarted only if it failed
    TRANSIENT = "transient"
    #: never restarted
    TEMPORARY = "temporary"


class Directive(enum.Enum):
    """What happens to an agent whose handler raised (Akka's supervisor directives).

    The message is dead-lettered (``handler_error``) with the error in every case.
    """

    #: keep the agent and its state, go on with the next message (default for function agents)
    RESUME = "resume"
    #: end this run; the supervisor restarts it per its strategy and restart type
    #: (default for class agents)
    RESTART = "restart"
    #: stop the agent for good (its queue is dead-lettered), whatever its restart type
    STOP = "stop"
    #: fail the supervisor: it stops its children and its own parent decides
    ESCALATE = "escalate"


_E = TypeVar("_E", bound=enum.Enum)


def enum_member(kind: type[_E], value: Any, option: str) -> _E:
    """``value`` as a member of ``kind`` (a member or its value), or a ValueError that
    names ``option`` and the values it accepts, and the one meant when the value is one
    in another case or spelling (``'Block'``, ``'drop-newest'``, ``'BLOCK'``, ``'blok'``).

    The value is taken as written: in Python a choice is an enum's value, exact, as
    ``OverflowPolicy("Block")`` refuses it (a config file's key takes any case)."""
    if isinstance(value, kind):
        return value
    try:
        return kind(value)
    except ValueError:
        known = ", ".join(repr(member.value) for member in kind)
        raise ValueError(
            f"{option} must be one of {known}, got {value!r}{_meant(kind, value)}"
        ) from None


def _meant(kind: type[enum.Enum], value: Any) -> str:
    """`` (did you mean 'block', or OverflowPolicy.BLOCK?)`` for a text near a member's
    value (saying that the case matters when only the case or a ``-`` is off), else ''."""
    from ._errors import meant_choice

    by_value = {str(member.value): member for member in kind}
    meant = meant_choice(value, by_value)
    if meant is None:
        return ""
    near, respelled = meant
    member = by_value[near]
    exact = " In Python a choice is its exact value." if respelled else ""
    return f" (did you mean {near!r}, or {kind.__name__}.{member.name}?{exact})"


def to_restart(value: Any) -> RestartType:
    """The ``restart`` option of agents and supervisors, checked."""
    return enum_member(RestartType, value, "restart")


@final
class Seldom:
    """What few children ever set, out of the child itself: a slot of the child is 8
    bytes in every agent, idle or running (a million agents: 8 MB a slot), and most
    agents never set any of these. Made at the first set (:meth:`Child.seldom_record`)."""

    __slots__ = (
        "cancel_reason",
        "drain_ended",
        "exit_directive",
        "failed",
        "idle",
        "linked_parent",
        "release",
        "restart_times",
        "restarts",
        "retired_event",
        "run_failures",
        "started_at",
        "stop_deadline",
        "stopped_plainly",
        "timed_out",
    )

    def __init__(self) -> None:
        self.linked_parent: Child | None = None
        self.started_at = 0.0
        self.stop_deadline = math.inf
        self.exit_directive: Directive | None = None
        self.restart_times: deque[float] | None = None
        self.restarts = 0
        self.retired_event: trio.Event | None = None
        #: why the serve loop's scope was cancelled (agents; None: a handler deadline)
        self.cancel_reason: DeadLetterReason | None = None
        # an agent's: the events of a wait for its idleness and of its release (stop or
        # hold), and its counts of handlers failed, timed out and of runs failed outside one
        self.idle: trio.Event | None = None
        self.release: trio.Event | None = None
        self.failed = 0
        self.timed_out = 0
        self.run_failures = 0
        #: how a run being stopped with a drain ended before its queue was handled
        self.drain_ended: str | None = None
        #: a stop without drain was asked (``kernel.stop``): no later drain undoes it
        self.stopped_plainly = False


_V = TypeVar("_V")


@final
class SeldomField(Generic[_V]):
    """A field of the :class:`Seldom` record read and set as an attribute of the child:
    ``default`` while the child has no record; a set makes the record only for a value
    other than the default (a default set on a child without one changes nothing that
    a read can see). Read and set where something rare happens (a ``ctx.spawn``, a
    restart, a draining stop, a wait, a timeout), never per message nor per run."""

    __slots__ = ("default", "field")

    def __init__(self, field: str, default: _V) -> None:
        self.field = field
        self.default = default

    @overload
    def __get__(self, child: None, owner: type[Child]) -> SeldomField[_V]: ...
    @overload
    def __get__(self, child: Child, owner: type[Child]) -> _V: ...
    def __get__(self, child: Child | None, owner: type[Child]) -> _V | SeldomField[_V]:
        if child is None:
            return self
        seldom = child.seldom
        return self.default if seldom is None else getattr(seldom, self.field)

    def __set__(self, child: Child, value: _V) -> None:
        if child.seldom is not None or value != self.default:
            setattr(child.seldom_record(), self.field, value)


class Child:
    """What a supervisor needs of a child: run once, stop gracefully, identity.

    ``run_once`` returns on a normal exit, raises :class:`StoppedForShutdown` when the
    kernel's shutdown ended the run, and raises on failure. ``request_stop`` asks
    the current run to finish soon; the supervisor cancels the run if it has not
    finished within ``shutdown_timeout``.
    """

    __slots__ = (
        "backoff_step",
        "done",
        "dormant",
        "drain_on_stop",
        "id",
        "linked_children",
        "name",
        "restart",
        "retired",
        "run",
        "run_task",
        "running",
        "scope",
        "seldom",
        "shutdown_timeout",
        "spawn_next",
        "spawn_prev",
        "start_gate",
        "supervisor",
        "terminating",
    )

    #: agents have a mailbox and are routed to; supervisors are not
    is_agent: ClassVar[bool] = False

    id: uuid.UUID
    name: str | None
    restart: RestartType
    shutdown_timeout: float
    supervisor: ChildOwner | None
    #: the agents ``ctx.spawn`` started from this one (an empty tuple until the first:
    #: most agents spawn none, and a list per agent would cost memory and GC work)
    linked_children: list[Child] | tuple[()]
    #: bumped at every start; exits of older runs are ignored
    run: int
    backoff_step: int
    scope: trio.CancelScope | None
    done: RunDone | None
    #: set when this run has started (``on_start`` returned); the next sibling of an
    #: ordered start waits for it
    start_gate: trio.Event | None
    running: bool
    #: the task of the run going on (its supervisor's), None between runs: a stop asked
    #: from inside the run it waits for is told by it (see ``Kernel.stop``)
    run_task: trio.lowlevel.Task | None
    dormant: bool
    terminating: bool
    retired: bool
    #: a draining stop (``kernel.stop(..., drain=True)``, or the draining stop of the
    #: agent that spawned it): what is queued is handled before it stops
    drain_on_stop: bool
    #: what few children ever set (see :class:`Seldom`), made at the first such set
    seldom: Seldom | None
    #: the live agents spawned just before and after this one (the router's list of
    #: them, in spawn order: see ``Router.walk_agents``); None for supervisors
    spawn_prev: Child | None
    spawn_next: Child | None

    def _init_child(
        self,
        child_id: uuid.UUID,
        name: str | None,
        restart: RestartType,
        shutdown_timeout: float,
    ) -> None:
        self.id = child_id
        self.name = name
        self.restart = restart
        self.shutdown_timeout = shutdown_timeout
        self.supervisor = None
        self.linked_children = ()
        self.run = 0
        self.backoff_step = 0
        self.scope = None
        self.done = None
        self.start_gate = None
        self.running = False
        self.run_task = None
        self.dormant = False
        self.terminating = False
        self.retired = False
        self.drain_on_stop = False
        self.seldom = None
        self.spawn_prev = None
        self.spawn_next = None

    def seldom_record(self) -> Seldom:
        """The record of what few children set, made now if this is the first set."""
        seldom = self.seldom
        if seldom is None:
            seldom = self.seldom = Seldom()
        return seldom

    # The fields of the record, read and set as attributes of the child (see SeldomField)
    #: how many times this child was restarted
    restarts = SeldomField[int]("restarts", 0)
    #: the agent whose ``ctx.spawn`` started this one (it dies with that one's run)
    linked_parent = SeldomField["Child | None"]("linked_parent", None)
    #: when the current run began, for a child with a backoff to reset (else 0.0)
    started_at = SeldomField[float]("started_at", 0.0)
    #: when a draining stop of the agent that spawned it must be over (that agent's
    #: bound, for its whole subtree); ``inf`` otherwise
    stop_deadline = SeldomField[float]("stop_deadline", math.inf)
    #: how the last run ended, when a handler's directive decided it
    exit_directive = SeldomField[Directive | None]("exit_directive", None)
    #: restart times of this child alone (the root supervisor isolates its children)
    restart_times = SeldomField[deque[float] | None]("restart_times", None)
    #: how its run ended by itself, before its queue was handled, while a draining stop
    #: waited for it (``ctx.stop()``, a failure): what is left is dead-lettered saying so
    drain_ended = SeldomField[str | None]("drain_ended", None)
    #: ``kernel.stop`` without drain was asked of it: a draining stop asked after it (a
    #: second ``kernel.stop``, its supervisor's, that of the agent that spawned it) does
    #: not bring its queue back, as Akka's PoisonPill queued behind ``context.stop``
    stopped_plainly = SeldomField[bool]("stopped_plainly", False)

    def add_linked(self, child: Child) -> None:
        """``child`` was spawned from this one (it dies with this one's run)."""
        if isinstance(self.linked_children, tuple):
            self.linked_children = [child]
        else:
            self.linked_children.append(child)

    def remove_linked(self, child: Child) -> None:
        if child in self.linked_children:
            assert isinstance(self.linked_children, list)
            self.linked_children.remove(child)

    def before_first_start(self) -> bool:
        """Whether this is an agent with an ``on_start`` that has not run yet (what it
        spawns as it starts is not there yet): for an ``AgentNotFound`` to tell."""
        return False

    @property
    def label(self) -> str:
        return self.name or str(self.id)

    @trio.lowlevel.enable_ki_protection
    def shutdown_scope(self) -> trio.CancelScope:
        """A shielded scope whose deadline is this child's ``shutdown_timeout`` from now
        (none for an infinite one; a timeout of 0 cancels at the first checkpoint):
        ``on_stop``'s, and the transport's ``agent_stopping`` of its stop."""
        scope = trio.CancelScope(shield=True)
        if math.isfinite(self.shutdown_timeout):
            scope.deadline = trio.current_time() + max(self.shutdown_timeout, 0.001)
        return scope

    def signal_started(self) -> None:
        """This run has started: release the sibling waiting to start after it."""
        gate = self.start_gate
        if gate is not None:
            self.start_gate = None
            gate.set()

    def mark_retired(self) -> None:
        """Stopped for good: wake everybody waiting in :meth:`wait_retired`."""
        self.retired = True
        self.terminating = True
        seldom = self.seldom
        if seldom is not None and seldom.retired_event is not None:
            seldom.retired_event.set()

    async def wait_retired(self) -> None:
        """Return once this child is stopped for good, whoever stopped it."""
        if self.retired:
            await trio.lowlevel.checkpoint()
            return
        seldom = self.seldom_record()
        if seldom.retired_event is None:
            seldom.retired_event = trio.Event()
        await seldom.retired_event.wait()

    async def run_once(self) -> None:
        raise NotImplementedError

    async def wait_idle(self) -> None:
        """Return once nothing is queued for this child or in hand (a supervisor has no
        queue: at once)."""
        await trio.lowlevel.checkpoint()

    def request_stop(self) -> None:
        raise NotImplementedError

    def cut_drain(self) -> None:
        """A stop without drain came while a draining stop of this child (or of the agent
        that spawned it) is under way: what is still queued is not handled."""
        self.drain_on_stop = False
        for linked in self.linked_children:
            linked.cut_drain()

    def on_retired(self, reason: str, *, for_shutdown: bool = False) -> None:
        """Called once the child is stopped for good (not restarted); ``for_shutdown``:
        by the kernel's shutdown before the tree stop (see :class:`StoppedForShutdown`)."""

    def stops_quietly(self) -> bool:
        """True if stopping runs no user code, so the stop order cannot be observed."""
        return False

    def has_queued(self) -> bool:
        """True if messages wait in this child's mailbox (a supervisor has none)."""
        return False

    def ends_itself(self) -> bool:
        """True if its run asked to end without handling its queue (an agent's
        ``ctx.stop()``), which a draining stop asked after it does not undo."""
        return False

    def starts_quietly(self) -> bool:
        """True if starting runs no user code: nobody waits for its start."""
        return False

    def start_dormant(self, owner: ChildOwner, run: int) -> bool:
        """Offer to start later: on its first message, the child calls
        ``owner.activate(self, run)``. Returns False (the default) to be started at once.
        """
        return False

    def state(self) -> str:
        if self.retired:
            return "stopped"
        if self.terminating:
            return "stopping"
        if self.running:
            return "running"
        if self.dormant:
            return "idle"
        return "restarting" if self.run > 1 else "starting"


class ChildOwner:
    """What a child may ask of its supervisor (implemented by ``SupervisorNode``)."""

    __slots__ = ()

    async def terminate(self, child: Child, reason: str) -> None:
        raise NotImplementedError

    async def stop_linked(self, child: Child, reason: str) -> None:
        """Stop, for good, the children ``child`` spawned, from ``child``'s own run task:
        its run has ended (the run's nursery is gone) and its ``on_stop`` waits for them."""
        raise NotImplementedError

    def activate(self, child: Child, run: int) -> None:
        raise NotImplementedError


def log_extra(child: Child, msg: Message | None = None) -> dict[str, str]:
    """:func:`log_fields` of ``child``."""
    return log_fields(child.id, child.name, msg)
