"""Supervision: restart strategies, intensity, backoff and ordered shutdown (OTP semantics).

A supervisor owns an ordered list of children (agents or supervisors) and one nursery in
which each child runs as one task per *run*. When a child's run ends, the supervisor
decides, one event at a time, what to do:

* a failure (an exception) restarts ``permanent`` and ``transient`` children, a normal
  exit (``ctx.stop()``) restarts only ``permanent`` ones, ``temporary`` children are
  never restarted;
* ``one_for_one`` restarts the child alone, ``one_for_all`` stops every other child
  (reverse start order) and restarts all of them, ``rest_for_one`` does so for the
  children started after the failed one;
* more than ``max_restarts`` restarts within ``within`` seconds trips the supervisor:
  it stops its children (reverse start order) and fails, so that its parent applies
  its own strategy; at the root the kernel shuts down and raises
  :class:`SupervisorEscalation`;
* restarts wait an exponential backoff with jitter (Akka's ``BackoffSupervisor``),
  which resets once a child has run healthily for ``reset_after`` seconds.

A restarted agent keeps its id, name and mailbox. Children are stopped in reverse start
order, children before parents, each within its ``shutdown_timeout`` and then cancelled.
The child interface (:class:`Child`) is small so that other kinds of children (external
processes, remote agents) are supervised by the same code.

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Final, final

import attrs
import trio

from ._agent import as_spec, refuse_past_float, validate_name
from ._brief import brief, seconds_text
from ._child import (
    SHUTDOWN_ENDED_DRAIN,
    Child,
    ChildOwner,
    Directive,
    RestartType,
    RunDone,
    StoppedForShutdown,
    enum_member,
    log_extra,
    to_restart,
)
from ._config import RestartStrategy
from ._errors import SupervisorEscalation
from ._events import EventKind
from ._gc import HeapKeeper
from ._logcall import log_guarded
from ._message import new_id
from ._plural import count_of
from ._router import KernelPhase

if TYPE_CHECKING:
    from ._ledger import Ledger
    from ._router import Router

log = logging.getLogger("nexus_trio.supervisor")

_RUNNING: Final = KernelPhase.RUNNING
_STOPPING: Final = KernelPhase.STOPPING
#: how many children that stop quietly a shutdown asks to stop at once (see _stop_all)
_QUIET_SHARE: Final = 1024
#: the scheduling rounds a share of them is given to leave before the next is asked
_QUIET_SHARE_ROUNDS: Final = 3
#: what a run called off before it began ends with (see _child_task): no exit reported
_CALLED_OFF: Final = BaseException("called off")
#: a stop of what an agent spawned stops what each of those spawned first, one level
#: deeper on the stack each (two frames); every this many levels the rest goes on in a
#: task of its own, on a fresh stack: a chain of agents each spawned by the last stops
#: however long it is (see _stop_linked)
_LINKED_LEVELS: Final = 64


def _non_negative(inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    refuse_past_float(attribute.name, value)
    # (``not value >= 0``: NaN is refused too)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ValueError(f"{attribute.name} must be a number >= 0, got {brief(value, 80)}")


def _fraction(inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    refuse_past_float(attribute.name, value)
    # The range ``[supervision] backoff_jitter`` takes: one API, one config, one meaning.
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ValueError(
            f"{attribute.name} must be a number between 0 and 1, got {brief(value, 80)}"
        )


def _count(inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{attribute.name} must be an integer >= 0, got {brief(value, 80)}")


@final
@attrs.frozen
class Backoff:
    """Delay before a restart: ``initial * 2**n`` capped at ``maximum``, times a random
    factor in ``[1, 1 + jitter]`` and capped at ``maximum`` again, where ``n`` counts the
    restarts since the child last ran healthily for ``reset_after`` seconds.

    ``Backoff(0, 0)`` restarts at once, as OTP does. Times are in seconds; ``jitter`` is
    between 0 and 1, as ``[supervision] backoff_jitter`` is. The random factor is drawn
    (one ``rng.random()``) only when it can change the delay: not at ``jitter=0`` (OTP's
    fixed delays, Akka's ``randomFactor = 0``) nor for a delay of 0.
    """

    initial: float = attrs.field(default=0.01, validator=_non_negative)
    maximum: float = attrs.field(default=5.0, validator=_non_negative)
    jitter: float = attrs.field(default=0.2, validator=_fraction)
    reset_after: float = attrs.field(default=30.0, validator=_non_negative)

    def __attrs_post_init__(self) -> None:
        if self.maximum < self.initial:
            raise ValueError(
                f"backoff maximum ({self.maximum}) must be >= initial ({self.initial})"
            )

    def delay(self, step: int, rng: random.Random) -> float:
        base = min(self.maximum, self.initial * (2.0 ** min(step, 64)))
        if not self.jitter or not base:
            return base  # no factor can change it: nothing drawn
        return min(self.maximum, base * (1.0 + rng.random() * self.jitter))


def _to_strategy(value: Any) -> RestartStrategy:
    return enum_member(RestartStrategy, value, "strategy")


def _to_children(value: Iterable[Any]) -> tuple[Any, ...]:
    """The children, each checked as ``spawn`` would check it: a mistake is named when
    the spec is built, not when the supervisor starts."""
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise TypeError(
            "Supervisor children must be a sequence of agents (handlers, agent classes,"
            f" specs) and supervisors, got {type(value).__name__} {brief(value, 60)}"
        )
    children = tuple(value)
    for index, child in enumerate(children):
        if not isinstance(child, Supervisor):
            try:
                as_spec(child)
            except TypeError as exc:
                raise TypeError(f"Supervisor children[{index}]: {exc}") from None
    return children


def _positive(inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    refuse_past_float(attribute.name, value)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"{attribute.name} must be a number > 0, got {brief(value, 80)}")


def _backoff(inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    # (a number here was accepted, and the supervisor crashed at the first restart with
    # AttributeError, its children's queues dead-lettered ``agent_stopped``)
    if not isinstance(value, Backoff):
        raise TypeError(
            f"{attribute.name} must be a Backoff (e.g. Backoff(initial=0.5, maximum=10.0)),"
            f" got {type(value).__name__} {brief(value, 60)}"
        )


@final
@attrs.frozen
class Supervisor:
    """A supervisor spec: spawn it like an agent (``kernel.spawn(Supervisor(...))``).

    ``children`` are started in order when the supervisor starts; more can be added
    with ``kernel.spawn(spec, supervisor=ref)``. As a child itself, a supervisor is
    ``permanent`` and has an infinite ``shutdown_timeout`` by default (OTP).
    """

    strategy: RestartStrategy = attrs.field(
        default=RestartStrategy.ONE_FOR_ONE, converter=_to_strategy
    )
    max_restarts: int = attrs.field(default=3, validator=_count)
    within: float = attrs.field(default=5.0, validator=_positive)
    backoff: Backoff = attrs.field(factory=Backoff, validator=_backoff)
    children: Sequence[Any] = attrs.field(default=(), converter=_to_children)
    name: str | None = attrs.field(default=None, validator=validate_name)
    restart: RestartType = attrs.field(default=RestartType.PERMANENT, converter=to_restart)
    shutdown_timeout: float = attrs.field(default=math.inf, validator=_non_negative)


class Escalation(Exception):
    """A supervisor gave up; carries the chain of names from it down to the failing child."""

    def __init__(self, chain: tuple[str, ...], last_error: BaseException | None) -> None:
        super().__init__(chain, last_error)
        self.chain = chain
        self.last_error = last_error

    def to_public(self, root: str) -> SupervisorEscalation:
        return SupervisorEscalation((root, *self.chain), self.last_error)


def _reported(error: BaseException | None) -> BaseException | None:
    """What events and monitors are told of a failure: for a supervisor that gave up, the
    public :class:`SupervisorEscalation` (its chain from that supervisor down), not the
    private exception that carried it here."""
    if isinstance(error, Escalation):
        return SupervisorEscalation(error.chain, error.last_error)
    return error


@final
class _NotRestart:
    """The type of ``_NOT_RESTART``: a start that is no restart."""

    __slots__ = ()


#: the ``restart`` of a first start (see SupervisorNode._start)
_NOT_RESTART: Final = _NotRestart()

_EXIT: Final = "exit"
_ADD: Final = "add"
_TERMINATE: Final = "terminate"
_SHUTDOWN: Final = "shutdown"


@final
class SupervisionHost:
    """What supervisors need of their kernel, and nothing more."""

    __slots__ = (
        "escalate_to_kernel",
        "grace_bound",
        "grace_deadline",
        "heap",
        "ledger",
        "rng",
        "router",
    )

    def __init__(
        self,
        router: Router,
        ledger: Ledger,
        rng: random.Random,
        *,
        escalate_to_kernel: bool,
        heap: HeapKeeper | None = None,
    ) -> None:
        self.router = router
        self.ledger = ledger
        self.rng = rng
        #: freezes the collector's heap after bursts of agent runs (see _gc)
        self.heap = heap if heap is not None else HeapKeeper(False)
        #: at the root: True shuts the kernel down on an escalation (OTP); False stops
        #: the failing child for good and keeps serving the others
        self.escalate_to_kernel = escalate_to_kernel
        #: when the kernel's grace period ends (set when its shutdown starts to drain)
        self.grace_deadline = math.inf
        #: the waits of the stops under way that the grace period's end bounds (of
        #: agents without a shutdown timeout of their own): see :meth:`end_grace_by`
        self.grace_bound: set[trio.CancelScope] = set()

    def end_grace_by(self, deadline: float) -> None:
        """Bring the grace period's end forward to ``deadline`` (never later): the start
        of a shutdown, a later ``shutdown(grace)`` that ends sooner, the end of the drain.
        The stops under way that it bounds end by then too, not at the (later) limit they
        took when they began."""
        if deadline < self.grace_deadline:
            self.grace_deadline = deadline
            for scope in self.grace_bound:
                if deadline < scope.deadline:
                    scope.deadline = deadline

    def stopping(self) -> bool:
        return self.router.phase >= _STOPPING

    def grace_left(self) -> float:
        """Seconds until the kernel's grace period ends: 0 once it has, infinite while
        the kernel is not shutting down."""
        if self.stopping():
            return 0.0
        if self.grace_deadline == math.inf:
            return math.inf
        return max(0.0, self.grace_deadline - trio.current_time())

    def retired(
        self, child: Child, reason: str, *, for_shutdown: bool = False, failure: bool = False
    ) -> None:
        """``child`` stopped for good (``failure``: after a failure, not restarted): forget
        its addresses, publish and notify."""
        if failure:
            self.router.forget(child, reason)
        elif self.router.phase is _RUNNING:
            # kept for a send to it to say it was stopped (not in a shutdown: the kernel
            # goes, and the work per agent there would be a good part of its stop)
            self.router.forget(child, stopped=reason)
        else:
            self.router.forget(child)
        child.on_retired(reason, for_shutdown=for_shutdown)
        if self.router.phase is _RUNNING:
            # (its spawn's count for the heap keeper; not in a kernel's shutdown, whose
            # close thaws all: a call per agent there would be a hundredth of its stop)
            self.heap.removed()
        # Its queue was dead-lettered: that may have been the last work in flight, and an
        # agent that stops for good never goes idle to say so (see Router.check_drained).
        self.router.check_drained()
        self.ledger.event(EventKind.STOPPED, child.id, child.name, reason)
        self.ledger.notify(child.id, child.name, "stopped", reason, final=True)

    def failed(self, child: Child, error: BaseException) -> None:
        if isinstance(error, StoppedForShutdown):
            # A run the kernel's shutdown ended: no failure, unless it had failed before.
            if error.failure is None:
                return
            error = error.failure
        if not isinstance(error, Escalation) and isinstance(child, SupervisorNode):
            log_guarded(
                log, logging.ERROR, "%s failed", child.label, exc_info=error, extra=log_extra(child)
            )
        reported = _reported(error)
        self.ledger.event(
            EventKind.FAILED,
            child.id,
            child.name,
            type(reported).__name__,
            reported,
            child.restarts,
        )
        # (the error's repr is made only if somebody watches it)
        self.ledger.notify(child.id, child.name, "failed", reported, final=False)

    def restarting(self, child: Child, delay: float) -> None:
        """A restart of ``child`` is decided: logged now (it says the backoff to come);
        counted and published only as its run begins (:meth:`restarted`)."""
        if log.isEnabledFor(logging.INFO):
            # (its fields are built only for a record that is made: at the default
            # WARNING level, none is)
            log_guarded(
                log,
                logging.INFO,
                "restarting %s in %s s (restart %d)",
                child.label,
                seconds_text(delay),
                child.restarts + 1,
                extra=log_extra(child),
            )

    def restarted(self, child: Child, delay: float, error: BaseException | None) -> None:
        """The run of a restart of ``child`` begins (or, for an agent started dormant,
        is set up): counted and published now, not when the restart was decided. A run
        called off while it waits out its backoff or an elder sibling's start (the child
        stopped meanwhile: ``kernel.stop``, ``parent_exited``, the grace period's end)
        never started, and is neither counted nor published (Akka's
        ``BackoffSupervisor`` starts no child whose backoff a stop cut short)."""
        child.restarts += 1
        self.ledger.restarts += 1
        self.ledger.event(
            EventKind.RESTARTED,
            child.id,
            child.name,
            f"backoff {seconds_text(delay)} s",
            _reported(error),
            child.restarts,
        )


@final
class SupervisorNode(Child, ChildOwner):
    """The running side of a :class:`Supervisor`: a nursery in which each child runs.

    ``isolating`` (the kernel's root, unless ``escalate_to_kernel``) counts restart
    intensity per child and, when a child exceeds it, stops that child for good instead
    of failing: one crash-looping agent does not take the kernel down.
    """

    __slots__ = (
        "_above_busy",
        "_beside",
        "_between",
        "_failures_queued",
        "_for_good",
        "_inbox_send",
        "_last_spawn_gate",
        "_late_terminations",
        "_leaving",
        "_linked_stops",
        "_nursery",
        "_restart_times",
        "_stopped_for_shutdown",
        "_stopping_one",
        "_stops_queued",
        "_stops_waiting",
        "children",
        "closing",
        "host",
        "isolating",
        "spec",
    )

    def __init__(
        self, host: SupervisionHost, spec: Supervisor, name: str | None, *, root: bool = False
    ) -> None:
        self._init_child(new_id(), name, spec.restart, spec.shutdown_timeout)
        self.host = host
        self.spec = spec
        self.isolating = root and not host.escalate_to_kernel
        #: why it is on its way out, "" while it takes new children: ``spawn(supervisor=)``
        #: refuses it and what is under it (as OTP's ``start_child`` to a supervisor
        #: that terminates or is down, ``noproc``, Akka's ``actorOf`` and a Trio nursery
        #: closed to new arrivals refuse). Set as it is asked to stop (stopped for good,
        #: :meth:`close_for_good`; by its own supervisor, :meth:`request_stop`, a group
        #: restart) or gives up, and kept after its run is over, while it waits for its
        #: supervisor's decision; cleared only as a next run begins (never after a stop
        #: for good, nor at the root, whose give-up ends the kernel). "" before its first
        #: run: a child added then starts with it.
        self.closing = ""
        #: ``closing`` says a stop for good, which no run clears
        self._for_good = False
        #: its run is over, and it waits for its supervisor's decision (see ``closing``)
        self._between = False
        # Insertion-ordered: start order, O(1) membership and removal (a million agents
        # under one supervisor must not make spawn or shutdown quadratic).
        self.children: dict[Child, None] = {}
        self._nursery: trio.Nursery | None = None
        self._inbox_send: trio.MemorySendChannel[tuple[Any, ...]] | None = None
        self._restart_times: deque[float] = deque()
        # The start gate of the last child added at run time that has an on_start: the
        # next one starts after it, so spawn order is start order (as OTP's start_child).
        self._last_spawn_gate: trio.Event | None = None
        #: stopping its children on the way out of a run
        self._leaving = False
        self._late_terminations: list[tuple[Child, str]] = []
        #: children whose stop (``terminate``) is queued, and its reason: an exit handled
        #: before it does not restart them
        self._stops_queued: dict[Child, str] = {}
        #: the child whose ``kernel.stop`` its loop carries out (a draining one may take
        #: long)...
        self._stopping_one: Child | None = None
        #: ...and the stops asked meanwhile, each in a task of its own beside it (see
        #: :meth:`terminate`), their reasons and their ends (set however they end)
        self._beside: dict[Child, tuple[str, trio.Event]] = {}
        #: the agents that spawned, at any depth, one of those children, each with how
        #: many of them it spawned so (see _apart: a look-up, not a walk of every stop)
        self._above_busy: dict[Child, int] = {}
        #: draining stops of children asked while this supervisor does not run (before
        #: its first run, between runs): asked of its next run, which handles their
        #: queues first (see terminate)
        self._stops_waiting: list[tuple[Child, str]] = []
        #: children whose run the kernel's shutdown ended (a Ctrl-C in their code; see
        #: StoppedForShutdown) while this supervisor stopped them for a group restart, or
        #: with their exit still queued behind one: that restart stops them for the
        #: shutdown instead of bringing them back
        self._stopped_for_shutdown: set[Child] = set()
        #: failed exits queued and not handled yet, by child and run: a child stopped for
        #: good before its exit is handled (its own stop, its parent's exit, queued
        #: first) is reported failed then (see _retire), not never
        self._failures_queued: dict[tuple[Child, int], BaseException] = {}
        #: linked children being stopped with what spawned them (see _stop_linked), each
        #: with the reason of the stop that began first: it decides whether they drain
        #: and the reason they retire with, however the stops' ends are ordered
        self._linked_stops: dict[Child, str] = {}

    # --- the child interface -----------------------------------------------------------

    def request_stop(self) -> None:
        if not self.closing and self.supervisor is not None:
            # (from now on a spawn under it is refused: nothing queued behind this stop
            # would start, see _finish_queued)
            self.closing = "stopped by its supervisor"
        if self._inbox_send is not None:
            self._inbox_send.send_nowait((_SHUTDOWN,))

    @property
    def between_runs(self) -> bool:
        """Its run is over, and it waits for its supervisor's decision (a restart, after
        its backoff, or a stop for good)."""
        return self._between

    def close_for_good(self, why: str) -> None:
        """It is being stopped for good (``why``: ``kernel.stop``, the reason of a linked
        stop): it takes no new child from now on."""
        if not self._for_good:
            self._for_good = True
            self.closing = why

    def cut_drain(self) -> None:
        super().cut_drain()
        for child in self.children:
            child.cut_drain()

    def has_queued(self) -> bool:
        """True if messages wait in the mailbox of a child under it, at any depth (it has
        none of its own): its draining stop, asked while its run is over (a group restart
        of its supervisor, its backoff), starts a run to handle them, as an agent's does."""
        return any(not child.retired and child.has_queued() for child in self.children)

    async def run_once(self) -> None:
        send, receive = trio.open_memory_channel[tuple[Any, ...]](math.inf)
        self._restart_times.clear()
        self._between = False
        if not self._for_good:
            # (a new run: it takes children again)
            self.closing = ""
        escalation: Escalation | None = None
        async with trio.open_nursery() as nursery:
            self.scope = nursery.cancel_scope
            self._nursery = nursery
            self._inbox_send = send
            if self.terminating:
                # A run that begins already stopped (a draining stop asked before it began,
                # which found no inbox to ask: see _drains_first) starts to drain its
                # children's queues, then stops as any draining stop does.
                send.send_nowait((_SHUTDOWN,))
            waiting, self._stops_waiting = self._stops_waiting, []
            for child, reason in waiting:
                if not child.retired and child in self.children:
                    self._stops_queued[child] = reason
                    send.send_nowait((_TERMINATE, child, reason))
            try:
                last = self._start_in_order(list(self.children), 0.0)
                if last is not None:
                    nursery.start_soon(self._started_after, last)
                else:
                    self.signal_started()
                async for first in receive:
                    # Take what else is queued in the same round: N spawns in a row
                    # are one scheduling round here, not N.
                    if await self._handle(first) or await self._handle_queued(receive):
                        break
                    # (an exit's error holds the frames of the handler that raised: not
                    # kept while this loop waits for the next event)
                    del first
            except Escalation as exc:
                # Raised outside the nursery below, so that it is not wrapped in a group.
                escalation = exc
            finally:
                self._inbox_send = None
                self._leaving = True
                send.close()
                # Whatever way we leave, children stop first, in reverse start order.
                with trio.CancelScope(shield=True):
                    await self._stop_all()
                    # Stops asked for while we were leaving: those children are stopped
                    # now; make them stopped for good so that their callers return.
                    self._finish_queued(receive)
                    self._stops_queued.clear()
                    self._stopped_for_shutdown.clear()
                    self._failures_queued.clear()
                    for child, reason in self._late_terminations:
                        self._retire_with_linked(child, reason)
                    self._late_terminations.clear()
                    # Stops beside the loop end first (_stop_all waits only for those it
                    # reaches); those its end cancelled left their children stopped, by
                    # _stop_all, and not retired yet.
                    for _, over in list(self._beside.values()):
                        await over.wait()
                    for child, (reason, _) in list(self._beside.items()):
                        self._retire_with_linked(child, reason)
                    self._beside.clear()
                    self._above_busy.clear()
                    self._leaving = False
                    if self.supervisor is not None:
                        # Its supervisor decides now (a restart, a stop for good): until
                        # a next run begins it takes no child (OTP: noproc), which would
                        # otherwise start only if it is restarted.
                        self._between = True
                        if not self.closing:
                            self.closing = "its run ended"
                self._nursery = None
        if escalation is not None:
            raise escalation

    # --- called by the kernel ------------------------------------------------------------

    def add(self, child: Child) -> None:
        """Adopt ``child`` and start it if this supervisor is running."""
        child.supervisor = self
        self.children[child] = None
        if self._inbox_send is not None:
            if child.starts_quietly() and self._park(child):
                # An agent that starts on its first message: nothing to order or to run
                # now, so no event for the supervisor loop (a million spawns stay cheap).
                return
            self._inbox_send.send_nowait((_ADD, child))

    def _park(self, child: Child) -> bool:
        """Start ``child`` dormant (no task until its first message) if it agrees."""
        child.run += 1
        child.terminating = False
        if child.start_dormant(self, child.run):
            child.dormant = True
            self._renew_done(child, None)
            child.start_gate = None
            return True
        child.run -= 1
        return False

    def _renew_done(self, child: Child, done: RunDone | None) -> None:
        """Give ``child`` a new run's ``done`` (None: a dormant run). A previous run that
        ended in the kernel's stop counted the agent out of ``agents_alive``; a run
        started after it (a group restart's, called off at once as the tree stops) counts
        it in again, to be counted out once more as that run ends or as it is forgotten."""
        previous = child.done
        if previous is not None and previous.ended_in_stop:
            self.host.ledger.agents_alive += 1
        child.done = done

    def activate(self, child: Child, run: int) -> None:
        """A dormant child's first message arrived: give it its task now."""
        if child.run != run or not child.dormant or child.retired or child.terminating:
            return
        if self._nursery is None:
            # This supervisor is not running; its next start picks the child up.
            return
        child.dormant = False
        child.done = RunDone()
        # (its run's end undoes both creations: the task's, counted here, and the run's)
        self._nursery.start_soon(self._child_task, child, child.done, None, name=_RUN_TASK)
        # Counted as the first message arrives, not as the run starts (one call fewer): a
        # producer's burst of first messages builds every run's task before any of them
        # starts, and these counts keep the heap frozen and the young threshold raised
        # meanwhile (counted at the start, 100,000 first messages ran 2,061 young
        # collections, a third of their time).
        self.host.heap.created()

    async def terminate(self, child: Child, reason: str) -> None:
        """Stop ``child`` for good (``kernel.stop``); returns once it is stopped for good,
        whoever stopped it (this call, a concurrent stop of this supervisor, shutdown)."""
        if child.retired:
            await trio.lowlevel.checkpoint()
            return
        if self._leaving:
            # This supervisor is stopping its children right now: this one is stopped
            # in its turn, then made stopped for good (see run_once).
            self._late_terminations.append((child, reason))
            await child.wait_retired()
            return
        if self._inbox_send is None:
            # Not running (starting, or waiting to be restarted): none of its children
            # runs either.
            if (
                child.drain_on_stop
                and child.has_queued()
                and (not self._for_good or self.drain_on_stop)
            ):
                # A draining stop: asked of its next run, which starts the child to
                # handle its queue, then stops it for good (as Akka's PoisonPill waits
                # in the mailbox across its supervisor's restart). So also when this
                # supervisor is stopped for good by a draining stop, which starts the
                # run that takes it (_drains_first). A plain stop meanwhile, or this
                # supervisor stopped for good without a drain, retires it at once.
                self._stops_waiting.append((child, reason))
                await child.wait_retired()
                return
            # Retire at once, before any schedule point lets it start one.
            self._retire_with_linked(child, reason)
            await trio.lowlevel.checkpoint()
            return
        if child in self._beside:
            # (a second stop of a child stopped beside the loop: that stop retires it)
            await child.wait_retired()
            return
        self._stops_queued[child] = reason
        if self._stopping_one is None or not self._begin_beside(child, reason):
            self._inbox_send.send_nowait((_TERMINATE, child, reason))
        await child.wait_retired()

    def _begin_beside(self, child: Child, reason: str) -> bool:
        """This loop carries out a ``kernel.stop``, which takes as long as that agent's
        drain or ``on_stop``: a stop of ``child`` asked meanwhile, or queued behind it,
        begins now, beside it, as Akka's ``context.stop`` of each child is its own (until
        the fifty-sixth pass it waited for its turn, its agent serving its queue
        meanwhile, a stop without drain too, and its ``on_stop`` after the whole of that
        other drain). Not beside a group restart or a give-up, whose order of stops is
        the supervisor's: queued behind them, as OTP's ``terminate_child``; nor for a
        child whose exit the loop is still to handle (a draining stop then starts a run
        for its queue: see _drain_instead), nor for one whose start the loop has still to
        make (added while it ran: its turn starts it to drain its queue, see
        _start_added), nor for one a stop under way stops too (what it spawned, what
        spawned it: see _apart). False: left to its turn."""
        done = child.done
        if (
            child.terminating
            or child.retired
            or child.run == 0
            or (done is not None and done.is_set())
            or child not in self.children
            or not self._apart(child)
        ):
            return False
        assert self._nursery is not None
        self._beside[child] = (reason, trio.Event())
        self._hold(child, 1)
        self._nursery.start_soon(self._stop_beside, child)
        return True

    def _apart(self, child: Child) -> bool:
        """Whether ``child`` is none of the children being stopped (by this loop, or
        beside it) and is linked to none of them (spawned by one, at any depth, or one's
        spawner), whose stop would stop it too: two stops of one child at once would
        each drain it (a draining stop hands its queue on before what it spawned drains
        theirs: _drain_before_linked). A look-up up ``child``'s own links (until the
        review of the fifty-sixth pass a walk of every stop under way for each stop
        begun: 10,000 agents each stopped by its own ``kernel.stop`` in one round took
        41 s, against 6 s with the loop's serial stops)."""
        if child is self._stopping_one or child in self._beside or child in self._above_busy:
            return False
        link = child.linked_parent
        while link is not None:
            if link is self._stopping_one or link in self._beside:
                return False
            link = link.linked_parent
        return True

    def _hold(self, child: Child, step: int) -> None:
        """``child``'s stop begins (``step`` 1) or ends (-1), by the loop or beside it:
        count it for each agent that spawned it, at any depth (see _apart)."""
        above = self._above_busy
        link = child.linked_parent
        while link is not None:
            count = above.get(link, 0) + step
            if count:
                above[link] = count
            else:
                del above[link]
            link = link.linked_parent

    @trio.lowlevel.enable_ki_protection
    async def _stop_beside(self, child: Child) -> None:
        """A ``kernel.stop`` of ``child`` asked while this loop carried out another one
        (see :meth:`terminate`); a group restart or this supervisor's own stop that
        reaches it meanwhile waits for it (see :meth:`_after_beside`), and restarts
        nothing. Cancelled (this supervisor's run cancelled), the child is left to the
        end of the run, which stops and retires it."""
        reason, over = self._beside[child]
        try:
            await self._stop_child(child)
        finally:
            over.set()
        if self._beside.pop(child, None) is not None:
            self._hold(child, -1)
            self._stops_queued.pop(child, None)
            self._retire(child, reason)

    async def _after_beside(self, child: Child) -> bool:
        """Wait for a stop of ``child`` under way beside the loop, if there is one: True
        if it has stopped ``child`` for good (a second stop of it at once would undo the
        first's: cancel the start its drain waits for, cut its drain)."""
        beside = self._beside.get(child)
        if beside is not None:
            await beside[1].wait()
        return child.retired

    # --- internals ----------------------------------------------------------------------------

    @trio.lowlevel.enable_ki_protection
    async def _started_after(self, last: trio.Event) -> None:
        await last.wait()
        self.signal_started()

    def _start_in_order(
        self,
        group: list[Child],
        delay: float,
        restart: BaseException | _NotRestart | None = _NOT_RESTART,
    ) -> trio.Event | None:
        """Start ``group`` as OTP does: each child once the previous one has started.
        ``restart``: the failure (None for a normal exit) a restart follows;
        ``_NOT_RESTART`` for a start that is none.

        Returns the gate of the last child that has a start to wait for (dormant agents
        have none: starting them has no observable effect).
        """
        after: trio.Event | None = None
        for child in group:
            if child.retired:
                continue
            gate = self._start(child, delay, after, restart)
            if gate is not None:
                after = gate
        return after

    def _start(
        self,
        child: Child,
        delay: float,
        after: trio.Event | None = None,
        restart: BaseException | _NotRestart | None = _NOT_RESTART,
    ) -> trio.Event | None:
        """Start a run of ``child`` (``restart``: see :meth:`_start_in_order`)."""
        assert self._nursery is not None
        # How a run ended during a draining stop is that run's (see _stop_child): a run
        # that starts for the rest of the drain (_drain_instead), any restart, or the first
        # run of a new run of its supervisor (which a drain restarted: until the fifty-
        # fifth pass an agent under it kept the words of its last run's cut, its letters
        # saying the time ran out where the new run ended by itself) does not carry it
        # into its own letters.
        if child.seldom is not None:
            child.drain_ended = None
        if delay <= 0 and self._park(child):
            # No task until there is work: an idle agent costs no task, nursery or frames.
            if not isinstance(restart, _NotRestart):
                # (its run is set up now: nothing can call it off any more)
                self.host.restarted(child, delay, restart)
            return None
        child.run += 1
        child.terminating = False
        child.dormant = False
        done = RunDone()
        self._renew_done(child, done)
        quiet = child.starts_quietly()
        # No on_start: its start cannot be observed, so it neither waits nor is waited for.
        gate = child.start_gate = None if quiet else trio.Event()
        if quiet:
            after = None
        plan: _StartPlan
        if not isinstance(restart, _NotRestart):
            # Counted and published as its run begins, not now (see _wait_to_start).
            plan = _RestartPlan(delay, after, gate, restart)
        elif quiet:
            plan = _START_NOW if delay <= 0 else _StartPlan(delay, None, None)
        else:
            plan = _StartPlan(delay, after, gate)
        self._nursery.start_soon(self._child_task, child, done, plan, name=_RUN_TASK)
        return gate

    def _called_off(self, child: Child) -> bool:
        """Whether a run about to start has nothing to run: its child was stopped, or the
        grace period is over (a restart whose backoff ran past it; nothing more is
        handled, the tree stop retires it). A draining stop of a child with messages
        queued does not call its run off: it starts to handle them (see _stop_child)."""
        if child.retired or self.host.stopping():
            return True
        return child.terminating and not self._drains_first(child)

    @staticmethod
    def _drains_first(child: Child) -> bool:
        """A child asked to stop with a drain whose run has not started (a lazy agent
        woken by messages sent right before the stop): its run starts, handles what is
        queued, and exits, as a running child's draining stop does."""
        return child.drain_on_stop and child.has_queued()

    @trio.lowlevel.enable_ki_protection
    async def _child_task(self, child: Child, done: RunDone, plan: _StartPlan | None) -> None:
        """One run of ``child``, known by its ``done`` (a new run gets a new one, and a
        dormant agent none: ``child.done is done`` while this run is the child's current
        one, as ``child.run`` has not moved on). ``plan``: how it starts (a backoff, the previous
        sibling's start, the gate it opens); None for a dormant agent woken by its first
        message, whose task was counted by the heap keeper as it arrived.

        The root coroutine of every running agent's task: each of its locals and each
        slot of its value stack costs a running agent 16 bytes (8 in the coroutine, 8 in
        the frame object Trio makes for a task's root coroutine), so what is not needed
        while the run goes on is done in helpers: the wait before the start
        (:meth:`_wait_to_start`), the bookkeeping at the end (:meth:`_run_over`) and the
        report of the exit (:meth:`_report_exit`).
        """
        # (No ``finally``: its exceptional path calls ``_run_over`` above the two slots of
        # the exception being handled, two stack slots more in this frame for the whole
        # run. What escapes is taken here and raised on after the bookkeeping, as the
        # ``finally`` did; what returns early does the bookkeeping itself.)
        error: BaseException | None = None
        try:
            # (before any wait: a stop handled in the same round as the start found no
            # scope to cancel, and must not wait out a backoff or an elder sibling's start)
            if self._called_off(child) or (
                plan is not None and plan.waits and not await self._wait_to_start(child, plan)
            ):
                # called off: the bookkeeping below, once, and no exit to report (not
                # from in here: the bookkeeping raising, a bug, would be taken for the
                # run's failure and done twice)
                error = _CALLED_OFF
            else:
                # The run's own nursery is its one cancel scope (the child sets ``scope``).
                self._run_begins(child)
                await child.run_once()
        except Exception as exc:
            error = exc
        except BaseException as exc:
            error = self._escaped(exc)
        self._run_over(child, done, plan)
        if error is _CALLED_OFF:
            return
        if error is not None and not isinstance(error, Exception):
            # (a cancel, a Ctrl-C the kernel does not take: on up, as the ``finally`` did;
            # not kept by this frame, which its traceback keeps: no cycle for the collector)
            try:
                raise error
            finally:
                error = None
        self._report_exit(child, done, error)
        # (nor a failure: its traceback keeps this frame, and the failed run's, whose
        # locals keep the failed message)
        error = None

    def _escaped(self, exc: BaseException) -> BaseException:
        """What a run that raised ``exc`` (not an ``Exception``) ends with: a Ctrl-C
        raised in a child's run that none of its own handlers took (an agent's run takes
        its own: its lines are protected, its agent's code is not) is the kernel's (the
        run ends as a stop for the shutdown) or raised on (forced); anything else (a
        cancel) is raised on."""
        if isinstance(exc, KeyboardInterrupt) and self.host.router.interrupt(exc):
            return StoppedForShutdown(None)
        return exc

    @trio.lowlevel.enable_ki_protection
    async def _wait_to_start(self, child: Child, plan: _StartPlan) -> bool:
        """Wait out a backoff or the previous sibling's start, cancellable alone; False if
        the run was called off meanwhile. A restart's run is published as it begins."""
        if plan.delay > 0 or plan.after is not None:
            with trio.CancelScope() as child.scope:
                if plan.delay > 0:
                    await trio.sleep(plan.delay)
                if plan.after is not None:
                    await plan.after.wait()
            after = plan.after
            if (
                after is not None
                and plan.delay == 0
                and not after.is_set()
                and not self._called_off(child)
            ):
                # A draining stop cut short the wait of a child added (not restarted:
                # a backoff cut short starts at once) for its turn, and the run starts
                # to handle its queue: still after its elder sibling's start (which that
                # stop, in reverse start order, has not reached yet), so that siblings
                # start in spawn order, as without the stop; its timeout cancels this.
                with trio.CancelScope() as child.scope:
                    await after.wait()
                if child.scope.cancelled_caught:
                    child.scope = None
                    return False
            child.scope = None
            if self._called_off(child):
                return False
        # (else nothing to wait for: _child_task has just checked it is not called off,
        # and no cancel scope to enter, a good part of a restart's cost)
        if type(plan) is _RestartPlan:
            # (the failure is not kept for the rest of the run: its traceback holds the
            # failed run's frames)
            error, plan.error = plan.error, None
            self.host.restarted(child, plan.delay, error)
        return True

    def _run_begins(self, child: Child) -> None:
        child.running = True
        child.run_task = trio.lowlevel.current_task()
        if child.backoff_step:
            # Read only at a restart, to reset a backoff that has grown (see
            # _on_exit): a child with none to reset keeps the shared 0.0, not
            # a float of the clock's (32 bytes in every running agent).
            child.started_at = trio.current_time()
        self.host.heap.created()

    def _run_over(self, child: Child, done: RunDone, plan: _StartPlan | None) -> None:
        """The run has ended, however it ended (called from its task's ``finally``)."""
        if child.running:
            # It had begun (not called off before): its creations are undone, its task's
            # too for a dormant agent woken (counted as its message arrived, see activate).
            self.host.heap.run_ended(2 if plan is None else 1)
        elif plan is None:
            # A dormant agent woken whose run was called off before it began (stopped,
            # or the kernel's shutdown, in the round its first message woke it): its
            # task was counted all the same (see activate), and is undone here.
            self.host.heap.run_ended()
        child.running = False
        child.run_task = None
        if child.drain_on_stop and child.is_agent and child.done is done:
            # The run of its draining stop is over (its queue handled, or its run cut or
            # ended): nothing handles a message to it any more, so none is taken, as
            # for an agent ``kernel.stop`` drains (a supervisor's draining stop, or its
            # parent's, retires it only in its turn: until then a send was taken, then
            # dead-lettered ``agent_stopped``).
            self.host.router.unroute(child)
        gate = None if plan is None else plan.gate
        if gate is not None:
            gate.set()
        if child.done is done:
            child.scope = None
            if child.start_gate is gate:
                child.start_gate = None
        if child.is_agent and self.host.stopping() and child.done is done:
            # The tree is stopping: this run was the agent's last, and it is no
            # longer alive, though forgotten only when the whole tree has stopped
            # (counted out now, not again then; a later run counts it in again,
            # see _renew_done, and a run ending after a later one started does not
            # count it out).
            done.set(in_stop=True)
            self.host.ledger.agents_alive -= 1
        else:
            done.set()
        # The run's last message may have been the last work in flight, and a run
        # that ends (to be restarted dormant, or stopped) does not go idle to say so:
        # a draining kernel must not wait for it.
        self.host.router.check_drained()

    def _report_exit(self, child: Child, done: RunDone, error: BaseException | None) -> None:
        """Tell the supervisor loop how the run ended (or, for a run being stopped, report
        its failure as at any other time)."""
        if (
            child.done is done
            and self._inbox_send is not None
            and not child.terminating
            and child not in self._beside
            and child is not self._stopping_one
        ):
            # (a child stopped beside the loop, or by the loop itself, is not marked
            # terminating until what it spawned has stopped, or its drain handed on: an
            # exit meanwhile is that stop's, as one once it is marked; queued, the loop,
            # free, restarted it beside, and by the loop's own stop its letters said
            # plain ``agent stopped (stopped)``, not that its run failed)
            run = child.run
            if error is not None:
                self._failures_queued[(child, run)] = error
                if isinstance(error, StoppedForShutdown):
                    # (a group restart handled before this exit must not bring it back)
                    self._stopped_for_shutdown.add(child)
            self._inbox_send.send_nowait((_EXIT, child, run, error))
        elif error is not None:
            # It failed while being stopped (or while this supervisor stops): nothing is
            # restarted, but the failure is reported as at any other time (event, monitors).
            self.host.failed(child, error)
            if isinstance(error, StoppedForShutdown):
                if self._inbox_send is not None:
                    # (a group restart that stopped it must not bring it back)
                    self._stopped_for_shutdown.add(child)
            elif child.drain_on_stop and child.has_queued():
                # (what its draining stop leaves queued is dead-lettered saying so)
                child.drain_ended = (
                    f"its run failed during its draining stop ({type(error).__name__})"
                )

    async def _handle_queued(self, receive: trio.MemoryReceiveChannel[tuple[Any, ...]]) -> bool:
        while True:
            try:
                event = receive.receive_nowait()
            except trio.WouldBlock:
                return False
            if await self._handle(event):
                return True

    def _finish_queued(self, receive: trio.MemoryReceiveChannel[tuple[Any, ...]]) -> None:
        """What was still queued when this supervisor stopped: stops are done (the
        children were stopped), failures are reported (nothing is restarted)."""
        while True:
            try:
                event = receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                return
            if event[0] == _TERMINATE:
                _, child, reason = event
                self._stops_queued.pop(child, None)
                self._retire_with_linked(child, reason)
            elif event[0] == _EXIT and self._unreported(event):
                self.host.failed(event[1], event[3])

    async def _handle(self, event: tuple[Any, ...]) -> bool:
        """Process one event; True means this supervisor must stop."""
        kind = event[0]
        if kind == _ADD:
            self._start_added(event[1])
        elif kind == _TERMINATE:
            _, child, reason = event
            self._stops_queued.pop(child, None)
            if not await self._after_beside(child) and child in self.children:
                self._stopping_one = child
                self._hold(child, 1)
                for other, why in list(self._stops_queued.items()):
                    # (stops queued behind this one, asked in the same round)
                    if other not in self._beside:
                        self._begin_beside(other, why)
                try:
                    await self._stop_child(child)
                finally:
                    self._stopping_one = None
                    self._hold(child, -1)
                self._retire(child, reason)
        elif kind == _SHUTDOWN:
            return True
        elif kind == _EXIT:
            _, child, run, error = event
            if error is not None and not self._unreported(event):
                # Reported already: the child was stopped for good before this exit.
                return False
            if child.run == run and child in self.children and not child.retired:
                await self._on_exit(child, error)
            elif error is not None:
                # A run that failed while a group restart was already under way, which
                # has restarted the child since: nothing more to do, but the failure is
                # still reported (event, log, monitors).
                self.host.failed(child, error)
        return False

    def _start_added(self, child: Child) -> None:
        """Start ``child``, added to this running supervisor, unless it has started since."""
        # (run 0: not started since it was added; a group restart handled before this
        # event may have taken it along already, and a second run would race it)
        if child.run == 0 and child in self.children and not child.retired:
            after = self._last_spawn_gate
            if after is not None and after.is_set():
                after = None
            gate = self._start(child, 0.0, after)
            if gate is not None:
                self._last_spawn_gate = gate

    def _unreported(self, exit_event: tuple[Any, ...]) -> bool:
        """Whether the failure of this exit is still to be reported (and now taken)."""
        _, child, run, error = exit_event
        return error is not None and self._failures_queued.pop((child, run), None) is not None

    @trio.lowlevel.enable_ki_protection
    async def stop_linked(self, child: Child, reason: str) -> None:
        # Called by the child's run, not by this supervisor's loop: a loop busy stopping
        # the child (or a sibling) would wait for a run that waits for it. A linked child
        # stopped by both at once (the loop handling its own stop, a group restart, this
        # supervisor leaving) is waited for by both and retired once.
        with trio.CancelScope(shield=True):
            await self._stop_linked(child, reason)

    async def _stop_linked(self, child: Child, reason: str, level: int = 0) -> None:
        """Stop, for good, the agents ``child`` spawned (they die with its run), ``level``
        deep in a chain of such stops in this task: every :data:`_LINKED_LEVELS` levels
        the next goes on in a task of its own (until the fifty-eighth pass a chain of
        about 500 agents each spawned by the last, stopped by ``kernel.stop`` of the
        first, raised ``RecursionError`` in the supervisor's loop and crashed the
        kernel)."""
        if child.drain_on_stop and reason == "parent_stopped":
            self._drain_linked(child)
        order = [linked for linked in reversed(list(child.linked_children)) if not linked.retired]
        # A linked child stopped by two at once (its parent's run that failed or ended,
        # the loop's draining stop of that parent) is stopped as the first asked, and
        # retired with its reason, as OTP's first exit signal to reach a linked process
        # is the one it dies of (until the fifty-seventh pass Trio's pick of which wait
        # woke first decided: ``parent_exited``, or ``parent_stopped: it ended its own
        # run during its draining stop``, which it had not)
        reasons = {
            linked: self._linked_stops.setdefault(linked, reason)
            for linked in order
            if linked.supervisor is self
        }
        for linked in order:
            if linked.retired:
                continue
            if isinstance(linked, SupervisorNode):
                linked.close_for_good(reason)
            owner = linked.supervisor
            if owner is self:
                if level + 1 < _LINKED_LEVELS or not linked.linked_children:
                    await self._stop_child(linked, level + 1)
                else:
                    async with trio.open_nursery() as fresh:
                        fresh.start_soon(self._stop_child, linked)
                self._retire(linked, reasons[linked])
            elif owner is not None:
                await owner.terminate(linked, reason)

    async def _on_exit(self, child: Child, error: BaseException | None) -> None:
        host = self.host
        directive = child.exit_directive
        # Whatever happens to it next, what it spawned dies with this run (OTP links):
        # a restart must not find last run's children still there (or their names taken).
        if child.linked_children:
            await self._stop_linked(child, "parent_exited")
        if error is not None:
            host.failed(child, error)
            if isinstance(error, StoppedForShutdown):
                self._stopped_for_shutdown.discard(child)
                # Its run was ended by the kernel's shutdown (a Ctrl-C in its code): as
                # OTP's supervisor that is terminating, restart nothing; stopped for the
                # shutdown now, what it had queued dead-lettered ``shutdown`` at once (the
                # drain must not wait for a queue nobody will serve).
                self._retire(child, "shutdown", for_shutdown=True)
                return
            wanted = child.restart is not RestartType.TEMPORARY
        else:
            wanted = child.restart is RestartType.PERMANENT
        if directive is Directive.STOP:
            wanted = False
        if directive is Directive.ESCALATE:
            # Raises, unless this is an isolating root: then only the child goes.
            self._give_up(child, error, 0, "escalated by its directive")
            self._retire(child, "escalated", failure=True)
            return
        if not wanted:
            self._retire(
                child, "failed" if error is not None else "normal", failure=error is not None
            )
            return
        stop = self._stops_queued.get(child)
        if stop is not None:
            # Stopped (``kernel.stop``) after this exit, in the same round: it is stopped
            # for good now, not restarted (its restart would never run); with a drain,
            # once a run has handled its queue.
            if not self._drain_instead(child, error):
                del self._stops_queued[child]
                self._retire(child, stop)
            return
        if host.stopping():
            # The grace period is over: nothing more is handled, so nothing is restarted
            # (a restart would serve its mailbox while the tree stops); what it had
            # queued is dead-lettered ``shutdown``.
            self._retire(child, "shutdown")
            return
        now = trio.current_time()
        if self.isolating:
            times = child.restart_times
            if times is None:
                times = child.restart_times = deque()
        else:
            times = self._restart_times
        while times and now - times[0] > self.spec.within:
            times.popleft()
        if len(times) >= self.spec.max_restarts:
            self._give_up(child, error, len(times), "restart intensity exceeded")
            # An isolating supervisor gave up on the child alone.
            await self._stop_child(child)
            self._retire(child, "restart_intensity", failure=True)
            return
        times.append(now)
        backoff = self.spec.backoff
        if now - child.started_at >= backoff.reset_after:
            child.backoff_step = 0
        delay = backoff.delay(child.backoff_step, host.rng)
        child.backoff_step += 1
        strategy = self.spec.strategy
        if strategy is RestartStrategy.ONE_FOR_ONE:
            group = [child]
        elif strategy is RestartStrategy.ONE_FOR_ALL:
            group = [c for c in self.children if not c.retired]
        else:
            order = list(self.children)
            group = [c for c in order[order.index(child) :] if not c.retired]
        for other in reversed(group):
            if other is not child and not other.retired:
                if isinstance(other, SupervisorNode) and not other.closing:
                    # (a spawn under it is refused until its restart's run begins)
                    ended = "exited" if error is None else "failed"
                    other.closing = f"{strategy.value} restart after {child.label!r} {ended}"
                if not await self._after_beside(other):
                    await self._stop_child(other)
        # Stopping a member stops (for good) what it spawned, which may be in the group;
        # a member whose stop was asked meanwhile is stopped for good, not restarted (with
        # a drain, once a run has handled its queue), and so is one whose run the
        # kernel's Ctrl-C ended (for the shutdown).
        draining: set[Child] = set()
        for member in group:
            stop = self._stops_queued.get(member)
            if stop is not None and not member.retired:
                if self._drain_instead(member, error):
                    draining.add(member)
                else:
                    del self._stops_queued[member]
                    self._retire(member, stop)
            elif self._stopped_for_shutdown and member in self._stopped_for_shutdown:
                self._stopped_for_shutdown.discard(member)
                self._retire(member, "shutdown", for_shutdown=True)
        group = [c for c in group if not c.retired and c in self.children and c not in draining]
        for member in group:
            host.restarting(member, delay)
        self._start_in_order(group, delay, error)

    def _drain_instead(self, child: Child, error: BaseException | None) -> bool:
        """``child``, whose exit (or a group restart that stopped it) is being handled,
        has a ``kernel.stop(drain=True)`` queued and messages queued: instead of waiting
        out a restart, a run starts at once (no backoff and no intensity: the stop cuts
        them short, as it cuts short a backoff under way) to handle them, and the stop
        still queued ends it once they are handled (see :meth:`_stop_child`). As Akka's
        ``PoisonPill`` behind messages of an actor its supervisor restarts: the mailbox
        survives the restart, the new incarnation handles them, then stops. False (the
        caller retires it now): no drain asked, nothing queued, the grace period over,
        or a run the kernel's Ctrl-C ended."""
        if (
            not self._drains_first(child)
            or self.host.stopping()
            or child in self._stopped_for_shutdown
        ):
            return False
        self.host.restarting(child, 0.0)
        self._start(child, 0.0, None, error)
        return True

    def _give_up(self, child: Child, error: BaseException | None, restarts: int, why: str) -> None:
        """Escalate (raise), or at an isolating root, report giving up on ``child``."""
        if isinstance(error, Escalation):
            chain = (self.label, *error.chain)
            last = error.last_error
        else:
            chain = (self.label, child.label)
            last = error
        if self.isolating:
            self.host.ledger.given_up += 1
            log_guarded(
                log,
                logging.ERROR,
                "%s stopped for good: %s (%s within %gs); the kernel goes on",
                child.label,
                why,
                count_of(restarts, "restart"),
                self.spec.within,
                extra=log_extra(child),
            )
            self.host.ledger.event(EventKind.ESCALATED, child.id, child.name, why, last)
            return
        log_guarded(
            log,
            logging.ERROR,
            "supervisor %s: %s (%s within %gs) after %s failed; escalating",
            self.label,
            why,
            count_of(restarts, "restart"),
            self.spec.within,
            child.label,
            extra=log_extra(self),
        )
        self.host.ledger.event(
            EventKind.ESCALATED, self.id, self.name, f"child {child.label}", last
        )
        if not self.closing:
            self.closing = f"gave up: {why} after {child.label!r} failed"
        raise Escalation(chain, last)

    def _stop_timeout(self, child: Child) -> float:
        """How long ``child`` may take to stop once asked (then it is cancelled)."""
        timeout = child.shutdown_timeout
        if getattr(child, "cancel_after_grace", False):
            # Without a timeout of its own, a child is cancelled once the kernel's
            # grace period is over, also when this stop began during the drain (an
            # escalation, a group restart, ``kernel.stop``): no second grace.
            timeout = min(timeout, self.host.grace_left())
        # (a draining stop of the agent that spawned it bounds its whole subtree)
        return min(timeout, child.stop_deadline - trio.current_time())

    async def _drain_before_linked(self, child: Child) -> None:
        """A draining stop of an agent that spawned others (a pool's router): its own
        queue is handled first, while they still run (what it hands on reaches them);
        then they drain theirs, all at once (see :meth:`_stop_all`), and stop. The
        whole of it within the agent's stop timeout: past it, they are cancelled and
        what is left is dead-lettered ``agent_stopped``."""
        with self._stop_wait(child, trio.current_time() + self._stop_timeout(child)) as wait:
            await child.wait_idle()
            # Its queue is handed on and what it spawned is to stop: nothing more reaches
            # it (a send fails with ``AgentNotFound``, "being stopped"), as Akka's router
            # stops before its routees; what came in before that is handed on too.
            self._unroute_tree(child)
            await child.wait_idle()
        deadline = wait.deadline
        for linked in child.linked_children:
            if linked in self._linked_stops:
                # (its stop began meanwhile, its run's exit stopping it: that stands)
                continue
            # (a second stop without drain may have cut the drain short meanwhile; one
            # asked of the linked child itself stands too)
            linked.drain_on_stop = child.drain_on_stop and not linked.stopped_plainly
            linked.stop_deadline = min(linked.stop_deadline, deadline)

    def _drain_linked(self, child: Child) -> None:
        """A draining stop of ``child`` stops what it spawned: they drain their queues,
        all at once, within its stop's deadline, before they stop. Also those the
        messages its drain handled spawned, which this supervisor's loop, busy with the
        stop, has not started yet (their add waits behind it): they start now, as a
        child spawned by any message does (until the fifty-second pass they never
        started, and what their parent sent them was dead-lettered ``agent_stopped``)."""
        # (not once its run is over: one spawned in its ``on_stop`` would start after the
        # code that released what it depends on; it is stopped unstarted, as in any stop)
        done = child.done
        start = self._nursery is not None and done is not None and not done.is_set()
        for linked in child.linked_children:
            if linked.retired or linked.stopped_plainly or linked in self._linked_stops:
                # (a stop without drain asked of it stands: see Kernel.stop; so does one
                # its run's exit began first: see _stop_linked)
                continue
            linked.drain_on_stop = True
            linked.stop_deadline = min(linked.stop_deadline, child.stop_deadline)
            if start and linked.supervisor is self:
                self._start_added(linked)

    @contextlib.contextmanager
    def _stop_wait(self, child: Child, deadline: float) -> Iterator[trio.CancelScope]:
        """The wait of ``child``'s stop, until ``deadline``; for a child the end of the
        kernel's grace period bounds (see :meth:`_stop_timeout`), brought forward with
        that end (:meth:`SupervisionHost.end_grace_by`) while it waits."""
        with trio.move_on_at(deadline) as scope:
            if not getattr(child, "cancel_after_grace", False):
                yield scope
                return
            bound = self.host.grace_bound
            bound.add(scope)
            try:
                yield scope
            finally:
                bound.discard(scope)

    @staticmethod
    def _mark_stopping(child: Child) -> RunDone | None:
        """``child`` is being stopped: nothing starts it any more. Returns the end of its
        run to wait for, None if no run is going on."""
        child.terminating = True
        child.dormant = False
        done = child.done
        return done if done is not None and not done.is_set() else None

    async def _stop_child(self, child: Child, level: int = 0) -> None:
        """Stop one running child: its linked children first, then it, within its timeout
        (``level``: see :meth:`_stop_linked`)."""
        if child.drain_on_stop and not child.running and self._stop_timeout(child) <= 0:
            # (no time to drain: a run not started yet is not started for it)
            child.drain_on_stop = False
            if child.has_queued() and child.drain_ended is None:
                # (what it holds is dead-lettered saying so, as when its time runs out
                # while its run waits for its turn to begin, below)
                self._drain_cut(
                    child,
                    SHUTDOWN_ENDED_DRAIN
                    if self._grace_ended(child)
                    else "its draining stop's time ran out before its run began",
                    began=False,
                )
        if child.linked_children:
            if child.drain_on_stop and child.running:
                await self._drain_before_linked(child)
            await self._stop_linked(child, "parent_stopped", level)
        done = self._mark_stopping(child)
        if done is None and child.drain_on_stop and not child.has_queued():
            # No run to drain, none to start (its supervisor's run began, its own has
            # not): nothing will handle what is sent to it from now on, retired only in
            # its supervisor's turn (a send meanwhile was taken, then dead-lettered).
            self._unroute_tree(child)
        if done is not None:
            if not child.running and child.scope is not None:
                # Still waiting out a backoff or its turn to start: cut short.
                child.scope.cancel()
            if not child.running and not self._drains_first(child):
                # Nothing to be graceful about: its run is called off.
                if child.drain_on_stop:
                    # (in a draining stop nothing will handle what is sent to it from
                    # now on, as once its drain's run is over: see _run_over; the run's
                    # end, which says so there, may come a round after a send; nor to
                    # an agent under a supervisor called off, retired only once its
                    # run is over)
                    self._unroute_tree(child)
                await done.wait()
            else:
                # (also a draining stop of a child whose run has not started: the run
                # starts now, asked to exit once its queue is handled, within the same
                # timeout)
                child.request_stop()
                # (a draining stop asked once this one began without drain, a stop of
                # what spawned it, does not bring the queue back: see Kernel.stop)
                drains = child.drain_on_stop
                timeout = self._stop_timeout(child)
                if child.drain_on_stop:
                    # (it bounds the drain of what it spawns meanwhile: _drain_linked)
                    child.stop_deadline = min(child.stop_deadline, trio.current_time() + timeout)
                if timeout > 0:
                    with self._stop_wait(child, trio.current_time() + timeout):
                        await done.wait()
                if not done.is_set():
                    cut = None
                    began = child.running
                    # Its run asked to end by itself (``ctx.stop()``) before the cut, its
                    # end a round away (a timeout already spent: no wait saw it): it is
                    # that run's end, as when the wait sees it (below).
                    ended_itself = child.drain_on_stop and child.ends_itself()
                    if child.drain_on_stop:
                        cut = "its run began" if not child.running else "its queue was handled"
                    if not child.running:
                        # Its time is up before its run began (waiting for its elder
                        # sibling's start: see _wait_to_start): the run is called off,
                        # not left to wait on for a start that may never come.
                        child.drain_on_stop = False
                    if child.scope is not None:
                        child.scope.cancel()
                    await done.wait()
                    if cut is not None and child.has_queued() and child.drain_ended is None:
                        # What its draining stop's timeout left queued is dead-lettered
                        # saying so, as OTP's report of a child killed at its shutdown
                        # timeout (``killed``) tells it from one that stopped in time.
                        self._drain_cut(
                            child,
                            SHUTDOWN_ENDED_DRAIN
                            if self._grace_ended(child)
                            else "it ended its own run during its draining stop"
                            if ended_itself
                            else f"its draining stop's time ran out before {cut}",
                            began=began,
                        )
                elif (
                    drains
                    and child.drain_on_stop
                    and child.has_queued()
                    and child.drain_ended is None
                    and not self.host.stopping()
                ):
                    # Its run ended by itself (``ctx.stop()``, an ``on_start`` that gave
                    # up) before its queue was handled, the drain not cut short by a plain
                    # stop nor by its timeout: as Akka's actor that stops itself with a
                    # ``PoisonPill`` still queued, what is left is dead-lettered, saying so.
                    child.drain_ended = "it ended its own run during its draining stop"
        if child.linked_children:
            # What it spawned while it stopped (finishing its message, in ``on_stop``), or
            # while the stop above waited for its linked children (its run may have ended
            # meanwhile), dies with the run too, as an OTP link takes it down with the exit.
            await self._stop_linked(child, "parent_stopped")

    def _grace_ended(self, child: Child) -> bool:
        """Whether the kernel's shutdown ended ``child``'s draining stop, cut now: the
        tree stops (nothing more is handled), or the grace period is over and bounded
        the stop (``grace=0``: the tree stop begins a round later) while its own
        ``shutdown_timeout`` had time left. Its letters are the shutdown's then, as the
        other agents' queues (until the fifty-sixth pass those of a stop the grace cut
        before the tree stop said ``agent_stopped``, its time ran out)."""
        if self.host.stopping():
            return True
        if not getattr(child, "cancel_after_grace", False) or self.host.grace_left() > 0:
            return False
        return min(child.shutdown_timeout, child.stop_deadline - trio.current_time()) > 0

    @staticmethod
    def _drain_cut(child: Child, why: str, *, began: bool) -> None:
        """``child``'s draining stop was cut (``why``): said in the letters of what it
        left queued. A supervisor has no queue of its own: when its time ran out before
        its run began (waiting for an elder sibling's start), none of the agents under
        it ran, and those at any depth that hold messages say it. (One whose run began
        stopped its agents in it, each saying how its own stop ended; and it may run
        again for the rest of the drain, see _drain_instead, whose agents' letters must
        not carry this.)"""
        child.drain_ended = why
        if not began and isinstance(child, SupervisorNode):
            for under in child.children:
                if not under.retired and under.has_queued() and under.drain_ended is None:
                    SupervisorNode._drain_cut(under, why, began=False)

    async def _stop_all(self) -> None:
        """Stop every child in reverse start order.

        Consecutive children that stop quietly (no ``on_stop``, no linked children) are
        asked to stop together, a share of ``_QUIET_SHARE`` at a time, and then awaited:
        the order within a share cannot be observed, a hundred thousand one-by-one stops
        would take a scheduling round each, and a million at once would each hold their
        nursery's exit in the same round (memory touched for it alone).
        """
        children = [c for c in reversed(list(self.children)) if not c.retired]
        # (in a draining stop, those a sibling spawned: stopped in its turn, not asked now)
        later: set[Child] = set()
        if self.drain_on_stop:
            # A draining stop (of the agent that spawned this supervisor: a pool's
            # router): every child handles its queue at once, not one after another,
            # within the same deadline; then they are awaited in reverse start order.
            # Each one's own stop timeout counts from now, when its drain begins. One
            # whose stop without drain is queued behind this one keeps it (see
            # Kernel.stop): its queue is not handled.
            later = {c for c in children if self._stops_with_parent(c)}
            now = trio.current_time()
            for child in children:
                if child.stopped_plainly:
                    continue
                child.drain_on_stop = True
                if child in later:
                    # One a sibling spawned is not asked to stop yet: it takes what that
                    # one's drain hands on, its own timeout counted from then, as in a
                    # draining stop of that one (_drain_before_linked).
                    child.stop_deadline = min(child.stop_deadline, self.stop_deadline)
                    continue
                child.stop_deadline = min(
                    child.stop_deadline, self.stop_deadline, now + self._stop_timeout(child)
                )
                if child.running and child.is_agent and not child.linked_children:
                    child.request_stop()
        quiet = [c.stops_quietly() for c in children]
        if later:
            # (not asked with a share of quiet siblings either)
            for i, child in enumerate(children):
                if child in later:
                    quiet[i] = False
        # children[:asked] that stop quietly have been asked to stop
        asked = 0
        for i, child in enumerate(children):
            if child.retired or (self.drain_on_stop and self._stops_with_parent(child)):
                continue
            if quiet[i] and i >= asked:
                # The first of a run of quiet children, or of its next share: asked at
                # once, at most _QUIET_SHARE of them. All at once, each would hold its
                # whole run and the exit of its nursery (Trio's coroutines, waiting out
                # the exit's schedule point) in the same round: a million agents stopping
                # at once touched 100k fresh pages.
                end = min(len(children), i + _QUIET_SHARE)
                asked = i
                woken = False
                while asked < end and quiet[asked]:
                    other = children[asked]
                    if other.running and not other.linked_children:
                        other.request_stop()
                        woken = True
                    asked += 1
                if woken and asked == end < len(children) and quiet[asked]:
                    # More of the run wait their turn: this share leaves first (woken,
                    # its nursery's exit, its end: a round each), so that its members
                    # are found stopped below as the whole run was. (A share none of
                    # whose members runs, dormant agents that never had a message, has
                    # nothing to leave: the next is asked at once.)
                    for _ in range(_QUIET_SHARE_ROUNDS):
                        await trio.lowlevel.checkpoint()
            if (
                not (child.linked_children or child.drain_on_stop)
                and self._mark_stopping(child) is None
            ):
                # Its stop without a coroutine: nothing it spawned, nothing to drain and
                # no run to wait for (over, or never started: most of a quiet batch by
                # now, a hundred thousand at a shutdown).
                continue
            if self._beside and await self._after_beside(child):
                # (stopped for good beside the loop meanwhile)
                continue
            await self._stop_child(child)

    def _stops_with_parent(self, child: Child) -> bool:
        """``child`` was spawned by another child of this supervisor still to be stopped
        (a pool's workers' supervisor, by its router): in a draining stop it is stopped
        in that one's turn (:meth:`_drain_before_linked`), after that one's queue, not
        before it in reverse start order (the router would take messages with no
        workers left, and fail them)."""
        seldom = child.seldom
        parent = None if seldom is None else seldom.linked_parent
        return parent is not None and not parent.retired and parent.supervisor is self

    def _retire_with_linked(self, child: Child, reason: str) -> None:
        """Retire a child that is not running, and what it spawned, at once."""
        for linked in reversed(list(child.linked_children)):
            owner = linked.supervisor
            if linked.retired:
                continue
            if owner is self:
                self._retire_with_linked(linked, reason)
            elif isinstance(owner, SupervisorNode):
                owner._retire_with_linked(linked, reason)
        self._retire(child, reason)

    def _retire(
        self, child: Child, reason: str, *, for_shutdown: bool = False, failure: bool = False
    ) -> None:
        if child.retired:
            return
        if self._failures_queued:
            # Its failed exit is still queued (behind its stop, or its parent's exit that
            # stops it now): report the failure before the stop, as it happened.
            for key in [key for key in self._failures_queued if key[0] is child]:
                self.host.failed(child, self._failures_queued.pop(key))
        if isinstance(child, SupervisorNode):
            # A supervisor stopped for good takes its (already stopped) subtree with it.
            child.retire_all(reason, failure=failure)
        child.mark_retired()
        self.children.pop(child, None)
        if self._linked_stops:
            self._linked_stops.pop(child, None)
        seldom = child.seldom
        parent = None if seldom is None else seldom.linked_parent
        if parent is not None:
            parent.remove_linked(child)
        self.host.retired(child, reason, for_shutdown=for_shutdown, failure=failure)

    def _unroute_tree(self, child: Child) -> None:
        """New messages to ``child``, or to any agent under it, fail with
        ``AgentNotFound`` from now on (its run is called off: nothing will handle them)."""
        if isinstance(child, SupervisorNode):
            for under in child.children:
                if not under.retired:
                    self._unroute_tree(under)
        elif child.is_agent:
            self.host.router.unroute(child)

    def retire_all(self, reason: str, *, failure: bool = False) -> None:
        """Retire every child, depth first (used once the tree has stopped; ``failure``:
        it stopped after a failure)."""
        for child in reversed(list(self.children)):
            if isinstance(child, SupervisorNode):
                child.retire_all(reason, failure=failure)
            self._retire(child, reason, failure=failure)


class _StartPlan:
    """How a run starts: after ``delay`` seconds (a restart's backoff), once ``after``
    is set (the previous sibling's start), opening ``gate`` when it ends (the next
    sibling's). One object for the three, not three arguments: see ``_child_task``."""

    __slots__ = ("after", "delay", "gate", "waits")

    def __init__(self, delay: float, after: trio.Event | None, gate: trio.Event | None) -> None:
        self.delay = delay
        self.after = after
        self.gate = gate
        #: the run waits before it starts (a backoff or an elder sibling)
        self.waits = delay > 0 or after is not None


@final
class _RestartPlan(_StartPlan):
    """The start of a restart's run, which is counted and published (``restarted``) only
    as the run begins: a child stopped while it waits out the backoff, or its elder
    sibling's start, was never restarted. ``error``: the failure it follows (None: a
    normal exit), until it is published."""

    __slots__ = ("error",)

    def __init__(
        self,
        delay: float,
        after: trio.Event | None,
        gate: trio.Event | None,
        error: BaseException | None,
    ) -> None:
        super().__init__(delay, after, gate)
        self.error = error
        # (always through _wait_to_start, which publishes the restart)
        self.waits = True


#: a run that starts at once and opens no gate (an agent without ``on_start``)
_START_NOW: Final = _StartPlan(0.0, None, None)


#: The name of every run's task: the one Trio would give it (its function's module and
#: qualified name), made once. Trio formats that name into a new string for each task it
#: starts without one, and each running agent kept its own copy (~100 bytes an agent).
_RUN_TASK: Final = (
    f"{SupervisorNode._child_task.__module__}.{SupervisorNode._child_task.__qualname__}"
)
