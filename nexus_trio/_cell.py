"""The running side of one agent: its address, mailbox, counters and serve loop.

A cell outlives the runs of its agent: a restart starts a new run (fresh behaviour,
``on_start`` again) on the same cell, so the id, the name, the mailbox and the counters
are kept. Each run is one task in the supervisor's nursery that opens the agent's own
nursery (``ctx.nursery``): background work lives and dies with the run, and a background
task that raises fails the agent, through Trio. The serve loop drains the mailbox in
batches of ``batch_size`` messages, with a schedule point between batches, and calls the
handler for one message at a time; the kernel's stepper (``_serve_batches``) runs each
batch, and the serve loop does what needs an await.

Handle timeouts cost nothing for handlers that never suspend: the serve loop runs in one
cancel scope without a deadline, the stepper runs the handler's coroutine without Trio,
and only if it suspends does the scope get the message's deadline (a Trio timer costs more
than the rest of the per-message work together). The scope must exist before the first
step, since a handler may enter scopes of its own there. A timeout cancels that scope;
the loop dead-letters the message and goes on in a new scope. A run has two cancel scopes
in all: its nursery's and this one. (A scope entered only when a handler suspends would
save one per run, but the handler may have entered scopes of its own before it
suspended, and Trio requires scopes to nest.)

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
import types
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import TYPE_CHECKING, Any, Final

import trio

from ._child import (
    SHUTDOWN_ENDED_DRAIN,
    Child,
    ChildOwner,
    Directive,
    RestartType,
    SeldomField,
    StoppedForShutdown,
    log_extra,
)
from ._deadletter import DeadLetterReason
from ._errors import MessageFailed, error_repr, failed_repr
from ._events import EventKind
from ._logcall import log_guarded
from ._mailbox import HighWater, Mailbox
from ._message import SYSTEM_ID, Message, MessageKind, id_value
from ._plural import count_of
from ._router import KernelPhase, Router
from ._step import DONE as _DONE
from ._step import FAILED as _FAILED
from ._step import Stepper, resume, unprotect

_DRAINING: Final = KernelPhase.DRAINING
_STARTED: Final = EventKind.STARTED
#: what a handler that forgot an ``await`` returns (see _unawaited)
_Coroutine: Final = types.CoroutineType
_QUERY: Final = MessageKind.QUERY
#: what a parked serve loop holds instead of the last message it handled
_NOTHING: Final = Message(SYSTEM_ID, SYSTEM_ID)
#: what ``_handler_scope`` holds while a run whose nursery is closed waits for its linked
#: children to stop, before its ``on_stop`` (never entered, never cancelled: no handler
#: is suspended then). Not a slot of its own: memory per agent.
_STOPPING_LINKED: Final = trio.CancelScope()

if TYPE_CHECKING:
    from ._agent import AgentSpec, Behaviour, Context
    from ._config import KernelConfig, OverflowPolicy
    from ._ledger import Ledger

log: Final = logging.getLogger("nexus_trio.agent")


#: what the kernel's stepper gives the serve loop for a full batch (see _serve_batches)
_FULL: Final = object()
#: ... and for an empty mailbox, or a run asked to exit
_EMPTY: Final = object()


@types.coroutine
def _serve_batches(
    router: Router, ledger: Ledger, size: int, box: list[Any]
) -> Generator[Any, Any, None]:
    """The kernel's stepper's loop (a :class:`Stepper`'s ``drive``, bound to its kernel's
    router, ledger and batch size when it is made: see ``CellDefaults.new_stepper``): a
    serve loop's batch, its handlers awaited here with ``yield from``, not stepped one by
    one from the serve loop (each such step, a resumption of a generator from C and its
    ``yield`` back, cost about 700 instructions a message:
    ``benchmarks/stepper_instructions.py``).

    A step takes ``(cell, receive, handler, ctx, got, left)``: the cell of the running
    agent, its channel, its handler and context, the message handed to it while it was
    parked (or None) and what is left of its batch. It takes and handles messages as the
    serve loop did (the counts, the sampling, the late queries), answers what a handler
    returned (a local request's answer resolves it without waiting) and routes a
    returned tell that needs no wait, and gives back :data:`_FULL` (``left`` taken),
    :data:`_EMPTY` (nothing queued, or the run asked to exit), :data:`DONE` for a handler
    that suspended or whose result needs an await (a returned tell or an answer to
    route: its result in ``box[0]``), :data:`FAILED` for one that raised or returned a
    coroutine (the error in ``box[1]``); with the last two, the message in ``box[2]`` and
    what is left of the batch in ``box[3]``. A handler that suspends passes its traps out
    to the serve loop, which arms the deadline and drives this generator with
    :func:`resume` until the handler ends (``cell._suspended`` is set meanwhile, so that
    it comes back then): the generator is then the suspended handler's, and the kernel
    has a new one. Only a handler's failure is caught here: an error of this loop's own
    ends the generator, and the serve loop makes the kernel a new one.

    A request, a ring's hop and the first message to an idle agent make a batch of one:
    what a step costs beyond its message is paid per message there, so what is the same
    for the whole kernel is bound once (the router, the ledger, the late queries, the
    countdown of a whole batch: a ``range`` built at each step), and a handler's answer
    is given here, not handed back to the serve loop for it.
    """
    # ids of queries whose requesters stopped waiting: such a query is skipped (dead
    # letter ``request_timeout``) instead of handled; other messages pay one ``is``. (The
    # set is never replaced.)
    late = router.late_queries
    # counting down a whole batch (the rest of one, after a step handed back in its
    # middle, is counted down by a range of its own)
    full = range(size, 0, -1)
    outcome: Any = _DONE
    while True:
        cell, receive, handler, ctx, got, left = yield outcome
        outcome = _EMPTY
        mailbox = cell.mailbox
        # which handled messages are sampled for latency (see Ledger; it changes)
        mask = ledger.sample_mask
        # counting down what is left of the batch (``for ... else``: the else is a full
        # one). (A ``while left`` counting down by hand cost the fan-out 91 instructions
        # a message more than a range's iterator.) ``got`` is the message handed to the
        # agent while it was parked, taken at the first turn: the turns after it need not
        # clear ``msg`` for the next (each takes its own).
        for left in full if left is size else range(left, 0, -1):  # noqa: B020
            if got is not None:
                # handed to the agent while it was parked: it is its, handled first
                msg = got
                got = None
                if cell._held:
                    cell._dead_after_grace(msg)
                    continue
            else:
                if cell.interrupted and (
                    cell._held
                    or (cell.exit_requested and not (cell.drain_before_exit and mailbox.depth))
                ):
                    # the run's exit, in the serve loop (held: after the release)
                    break
                if not mailbox.depth:
                    # Empty (the depth is kept exact): no take raising WouldBlock, which
                    # costs more than a no-op handler for an agent woken by each message.
                    break
                try:
                    msg = receive.receive_nowait()
                except trio.WouldBlock:  # a guard: free unless it raises
                    break
                # Mailbox.take written out (a call per message costs more than a no-op
                # handler): this, then ``depth -= 1`` or ``recount()`` while producers wait
                # and one may still be in Trio's FIFO (recount's own test, written out: a
                # transport's tell parked behind a full mailbox keeps ``waiting`` set over
                # most of a batch; docs/distributed.md, thirty-eighth pass)
                if mailbox.waiting and mailbox.admitting:
                    mailbox.recount()
                else:
                    mailbox.depth -= 1
            if late and msg.kind is _QUERY and id_value(msg) in late:
                cell.dead_lettered += 1
                router.discard_queued([msg], DeadLetterReason.REQUEST_TIMEOUT, cell, "")
                continue
            cell.current = msg
            # The clock is read only for a sampled message or a handler that suspends: a
            # read costs about as much as a no-op handler. Sampled by the count before
            # this message (``+ 1`` would build an int per message). (``ledger.now``: the
            # kernel sets its clock there once it runs, after this generator is made.)
            # Not sampled: None, no time (0.0, which it was, is a MockClock's until it
            # moves; -1.0, which it was next, a custom clock's may be below: Trio's
            # Clock.current_time is any float. No message was sampled then).
            if ledger.handled & mask:
                start = None
            else:
                start = ledger.now()
                # (the wall clock, as the message's timestamp: its wait ends here, at
                # the start, not after the handler, whose time it counted too)
                begun = time.time_ns()
                if not mask:
                    # a sample forced for a failure (see Ledger.record_failure): the
                    # rest of the batch is sampled by the count again
                    mask = ledger.end_forced_sample()
            try:
                result = yield from handler(ctx, msg)
            except GeneratorExit as exc:
                # This generator closed (thrown in at a ``yield``: its traceback is this
                # frame alone): it ends. A handler that raised GeneratorExit itself failed
                # as with any other exception (see _step._drive).
                traceback = exc.__traceback__
                if traceback is None or traceback.tb_next is None:
                    raise
                traceback = None  # (its frames: not kept by the kernel's generator)
                ledger.record_failure(start)  # (counted failed: see _ends_kernel)
                box[1] = exc
                box[2] = msg
                box[3] = left - 1  # (``left`` counted this message: the rest is one less)
                outcome = _FAILED
                break
            except BaseException as exc:
                if (
                    isinstance(exc, Exception)
                    or _ends_kernel(exc)
                    or _foreign_cancel(exc) is not None
                    or _failures_beside_interrupt(exc) is not None
                ):
                    # (a failure, counted in ``failed``: its time too, when sampled;
                    # not a cancel nor a Ctrl-C; a Cancelled of no scope around it is
                    # one, see _foreign_cancel)
                    ledger.record_failure(start)
                box[1] = exc
                box[2] = msg
                box[3] = left - 1
                outcome = _FAILED
                break
            if result is None and not cell._suspended:
                # The common end (nothing returned, no suspension): one test of each, not
                # two; the same counting as below.
                cell.current = None
                cell.handled += 1
                ledger.handled += 1
                if start is not None and not (ledger.handled - 1) & mask:
                    # Sampled by the kernel-wide count (agents that handle few messages
                    # are seen too): recording costs more than a no-op handler.
                    ledger.record_latency(start, msg, begun)
                continue
            if type(result) is _Coroutine:
                box[1] = cell._unawaited(result)
                box[2] = msg
                box[3] = left - 1
                outcome = _FAILED
                break
            cell.current = None
            cell.handled += 1
            ledger.handled += 1
            if start is not None and not (ledger.handled - 1) & mask:
                ledger.record_latency(start, msg, begun)
            # something returned, or the handler suspended
            if cell._suspended:
                # done with: the serve loop disarms its deadline, then answers or
                # routes what it returned
                pass
            elif type(result) is not Message:
                # An answer (a local request's resolves it here, without waiting): the
                # batch goes on (queries queued together are one step), and the serve
                # loop reads no box for it. What is left to route (a reply to a
                # remote requester, or the kernel stops) goes to the serve loop,
                # which awaits its route (``Router.answer`` gives a Message back as
                # it is).
                result = router.answer(cell.id, msg, result)
                if result is None:
                    if mailbox.depth:
                        continue
                    # Nothing queued (an agent woken for one request): the step ends
                    # here, not at the next turn's look at the mailbox.
                    break
            elif result.kind is not _QUERY:
                # A tell returned (a ring's next hop): routed here when that needs no
                # wait (room in a local mailbox, or the transport takes it), and the
                # batch goes on; handing the step back to the serve loop to route it
                # cost a sixth of a ring's hop.
                taken = router.route_now(result)
                if taken == 1:
                    if mailbox.depth:
                        continue
                    break  # (nothing queued: an agent woken for one hop)
                if taken:
                    # taken, and the transport asks its sender to yield once: the
                    # serve loop's checkpoint between batches (the message is counted)
                    outcome = _FULL
                    break
            # answered or routed by the serve loop (which awaits); a handler that
            # suspended is done with: the serve loop disarms its deadline
            box[0] = result
            box[2] = msg
            box[3] = left - 1
            outcome = _DONE
            break
        else:
            outcome = _FULL
        # (The message and the rest of the batch are reported, in ``box[2]`` and
        # ``box[3]``, only with DONE and FAILED, the outcomes the serve loop reads them
        # for.) The generator is the kernel's: it keeps no agent's message, result or
        # cell. (``del``: one instruction a name; ``result`` is unbound in a step that
        # handled nothing.)
        del cell, receive, handler, ctx, mailbox
        got = msg = result = None


#: the reasons of a retirement that is the shutdown's once the kernel is stopping: its
#: own, and an agent's stopped with the agent that spawned it (see Cell.on_retired)
_SHUTDOWN_REASONS: Final = frozenset({"shutdown", "parent_stopped"})


class _Carrier(Exception):
    """Carries a user's exception out of a nursery: Trio formats the repr of what leaves
    a nursery or one of its tasks (its cancel reason), and a user's exception whose
    ``__repr__`` raises would make Trio's own code raise (``TrioInternalError``, or
    "Nursery stack corrupted": the whole kernel ended for one agent's fault)."""

    def __init__(self, error: Exception) -> None:
        super().__init__(error)
        self.error = error

    def __repr__(self) -> str:
        return f"{type(self).__name__}({error_repr(self.error)})"


class _HandlerFailed(_Carrier):
    """Carries a handler's exception (already logged and dead-lettered) out of the loop."""


class _StartFailed(_Carrier):
    """Carries an exception ``on_start`` raised out of the run's nursery block."""


class _TaskFailed(_Carrier):
    """Carries an exception whose ``repr()`` raises out of a task in ``ctx.nursery``."""


async def _carry_failure(
    coro: Coroutine[Any, Any, object], take: Callable[[BaseException], object]
) -> object:
    """Runs a task of ``ctx.nursery``: an exception whose ``repr()`` raises leaves it in a
    carrier (others as they are, for Trio to show in its cancel reasons); a Ctrl-C is
    given to ``take`` as it goes out, also in the group of a nursery the task opened
    (see AgentCell._take_at_once)."""
    try:
        return await coro
    except KeyboardInterrupt as exc:
        take(exc)
        raise
    except Exception as exc:
        if failed_repr(exc) is None:
            raise
        raise _TaskFailed(exc) from None
    except BaseExceptionGroup as group:  # (not an ExceptionGroup: taken above)
        take(group)
        raise
    except trio.Cancelled as exc:
        foreign = _foreign_cancel(exc)
        if foreign is None:
            raise
        raise _TaskFailed(foreign) from None


def _carrying(
    async_fn: Callable[..., Any], take: Callable[[BaseException], object]
) -> Callable[..., Any]:
    """``async_fn`` as Trio's nurseries call it, its coroutine run by _carry_failure;
    what is no coroutine goes to Trio as it is, for Trio's own error naming it."""

    @functools.wraps(async_fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        coro = async_fn(*args, **kwargs)
        if isinstance(coro, Coroutine):
            return _carry_failure(coro, take)
        return coro

    return call


def _guard(nursery: trio.Nursery, take: Callable[[BaseException], object]) -> trio.Nursery:
    """The run's nursery as ``ctx.nursery`` hands it out: its ``start_soon`` and ``start``
    run each task through :func:`_carry_failure` (set on the nursery itself, so that it
    stays a ``trio.Nursery`` for whatever the agent passes it to); ``start`` raises a
    carried exception of a task that failed before it started as itself."""
    start_soon = nursery.start_soon
    start = nursery.start

    def guarded_start_soon(
        async_fn: Callable[..., Awaitable[object]], *args: object, name: object = None
    ) -> None:
        if not callable(async_fn):  # a coroutine object, say: Trio's error names it
            start_soon(async_fn, *args, name=name)
            return
        start_soon(_carrying(async_fn, take), *args, name=async_fn if name is None else name)

    async def guarded_start(
        async_fn: Callable[..., Awaitable[object]], *args: object, name: object = None
    ) -> Any:
        if not callable(async_fn):
            return await start(async_fn, *args, name=name)
        try:
            return await start(
                _carrying(async_fn, take), *args, name=async_fn if name is None else name
            )
        except _TaskFailed as carried:
            error = carried.error
        # raised outside the except clause: the caller's error keeps its own context
        raise error

    vars(nursery).update(start_soon=guarded_start_soon, start=guarded_start)
    return nursery


@trio.lowlevel.enable_ki_protection
async def _leave_nursery(
    manager: contextlib.AbstractAsyncContextManager[trio.Nursery], exc: BaseException
) -> bool | None:
    """The run's nursery left by ``exc``, as ``async with`` leaves it (``__aexit__`` with
    the exception's type, the exception and its traceback): true if the nursery took it.
    Protected from KeyboardInterrupt, as the statement's own call is (it is made by the
    interpreter, between no two instructions of the run's code): a Ctrl-C landing
    between the ``except`` and the call would leave the nursery open for good."""
    return await manager.__aexit__(type(exc), exc, exc.__traceback__)


def _first_failure(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The first exception of a nursery's group that is not a cancellation."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            found = _first_failure(exc)
            if found is not None:
                return found
        elif not isinstance(exc, trio.Cancelled):
            return exc
    return None


def _interrupt_in(raised: BaseException) -> KeyboardInterrupt | None:
    """``raised`` if it is a KeyboardInterrupt, else the first one in it if it is a group
    (depth first, as _first_failure looks)."""
    if isinstance(raised, KeyboardInterrupt):
        return raised
    if isinstance(raised, BaseExceptionGroup):
        for exc in raised.exceptions:
            found = _interrupt_in(exc)
            if found is not None:
                return found
    return None


def _ends_kernel(exc: BaseException) -> bool:
    """Whether a handler's ``exc`` is what is no Exception, nor a cancel nor a Ctrl-C
    (``sys.exit()``, a ``BaseException`` of the app's own), alone or in a group with
    cancels (one the handler's own nursery raised): a failure that goes on up and ends
    the kernel, its message dead-lettered ``handler_error`` and counted failed."""
    if isinstance(exc, BaseExceptionGroup):
        rest = exc.split(trio.Cancelled)[1]
        return not (rest is None or isinstance(rest, Exception) or _interrupt_in(rest))
    return not isinstance(exc, (Exception, trio.Cancelled, KeyboardInterrupt))


def _failures_beside_interrupt(exc: BaseException) -> ExceptionGroup[Exception] | None:
    """The ``Exception``s of a handler's group that also holds a Ctrl-C (its own
    nursery's: ``BaseExceptionGroup([KeyboardInterrupt(), ValueError()])``), as an
    ``ExceptionGroup`` (``split`` keeps the group's message and traceback); None for any
    other exception. The Ctrl-C wins, as Trio's does; these are its message's failure."""
    if not isinstance(exc, BaseExceptionGroup) or _interrupt_in(exc) is None:
        return None
    failures = exc.split(Exception)[0]
    # (a group of Exceptions only is made an ExceptionGroup)
    return failures if isinstance(failures, ExceptionGroup) else None


def _foreign_cancel(exc: BaseException) -> RuntimeError | None:
    """What an agent's code raised, if it is a ``trio.Cancelled`` that no cancel scope
    around the current task raised (one caught elsewhere and raised again): the code's
    error, as a RuntimeError saying so (the Cancelled its cause). Trio would take it for
    a cancel of the run's nursery, once its failure had cancelled that, and the run
    would end as if it had returned. None for any other exception (a real cancel: some
    scope around is cancelled)."""
    if not isinstance(exc, trio.Cancelled) or trio.current_effective_deadline() == -math.inf:
        return None
    error = RuntimeError(
        "trio.Cancelled raised where no cancel scope around it was cancelled"
        " (one caught elsewhere and raised again?)"
    )
    error.__cause__ = exc
    return error


def _start_failure(exc: Exception | trio.Cancelled) -> BaseException:
    """What leaves a run's ``on_start`` that raised ``exc``: its error in a carrier (also
    a foreign cancel's, see _foreign_cancel), or a real cancel as it is."""
    if isinstance(exc, Exception):
        return _StartFailed(exc)
    foreign = _foreign_cancel(exc)
    return exc if foreign is None else _StartFailed(foreign)


class CellDefaults:
    """What a kernel's cells share: what they take from its ``[kernel]`` config when
    their spec does not say, read once per kernel (the config's ``handle_timeout`` and
    ``shutdown_grace`` are properties that build a new float at each read, which a cell
    kept: 64 bytes in every agent), and the kernel's parts they call (one slot of a cell
    for all of them: each slot is 8 bytes in every agent, idle or running)."""

    __slots__ = (
        "batch_size",
        "handle_timeout",
        "ledger",
        "mailbox_capacity",
        "make_context",
        "overflow",
        "router",
        "shutdown_grace",
        "stepper",
    )

    def __init__(
        self,
        config: KernelConfig,
        router: Router,
        ledger: Ledger,
        make_context: Callable[[AgentCell], Context],
    ) -> None:
        self.router = router
        self.ledger = ledger
        self.make_context = make_context
        self.mailbox_capacity: int = config.mailbox_capacity
        self.overflow: OverflowPolicy = config.overflow
        self.handle_timeout: float = config.handle_timeout
        self.shutdown_grace: float = config.shutdown_grace
        self.batch_size: int = config.batch_size
        #: steps the handlers of the kernel's agents, a batch a step (see _serve_batches);
        #: a handler that suspends keeps the one it ran in, and leaves a new one here
        self.stepper = self.new_stepper()

    def new_stepper(self) -> Stepper:
        """A stepper for the kernel's agents, its loop bound to the kernel's router,
        ledger and batch size (read once, not at each step: see _serve_batches)."""
        return Stepper(functools.partial(_serve_batches, self.router, self.ledger, self.batch_size))


class AgentCell(Child):
    """One agent address and everything that survives its restarts."""

    is_agent = True

    __slots__ = (
        "_dormant_run",
        "_handler_scope",
        "_held",
        "_suspended",
        "ctx",
        "current",
        "dead_lettered",
        "defaults",
        "drain_before_exit",
        "exit_requested",
        "handle_timeout",
        "handled",
        "interrupted",
        "lazy",
        "mailbox",
        "nursery",
        "overflow",
        "parked",
        "received",
        "spec",
    )

    def __init__(
        self,
        spec: AgentSpec,
        agent_id: Any,
        name: str | None,
        *,
        high_water: HighWater,
        defaults: CellDefaults,
    ) -> None:
        self._init_child(
            agent_id,
            name,
            spec.restart,
            spec.shutdown_timeout if spec.shutdown_timeout is not None else defaults.shutdown_grace,
        )
        self.defaults = defaults
        self.spec = spec
        self.lazy = spec.starts_lazily
        self.mailbox = Mailbox(spec.mailbox_capacity or defaults.mailbox_capacity, high_water)
        self.overflow = spec.overflow or defaults.overflow
        self.handle_timeout: float = spec.handle_timeout or defaults.handle_timeout
        self.current: Message | None = None
        self.nursery: trio.Nursery | None = None
        self.received = 0
        self.handled = 0
        self.dead_lettered = 0
        #: one flag checked per message; the reasons are below
        self.interrupted = False
        self.exit_requested = False
        self.drain_before_exit = False
        self._held = False
        #: parked in ``mailbox.park()`` (a wake is a ``None`` sent to it)
        self.parked = False
        #: the serve loop's cancel scope; it has a deadline while a handler is suspended
        self._handler_scope: trio.CancelScope | None = None
        self._suspended = False
        self._dormant_run = 0
        #: built on the first run: an agent that never runs needs none
        self.ctx: Context | None = None

    @property
    def router(self) -> Router:
        return self.defaults.router

    @property
    def ledger(self) -> Ledger:
        return self.defaults.ledger

    # What few agents set, in the child's record of it (a slot is 8 bytes in every
    # agent: see SeldomField), each read and set where something rare happens (a wait,
    # a stop, a timeout, a failed run), not per message.
    #: set once nothing is queued or in hand (see wait_idle)
    _idle = SeldomField[trio.Event | None]("idle", None)
    #: the release of a stop or a hold (see _release_event)
    _release = SeldomField[trio.Event | None]("release", None)
    #: handlers of this agent that failed (raised, or returned a coroutine)
    failed = SeldomField[int]("failed", 0)
    #: handlers of this agent cancelled by their deadline
    timed_out = SeldomField[int]("timed_out", 0)
    #: runs that failed outside a handler (see run_once)
    run_failures = SeldomField[int]("run_failures", 0)
    #: why the serve loop's scope was cancelled (None: a handler deadline)
    _cancel_reason = SeldomField[DeadLetterReason | None]("cancel_reason", None)

    @property
    def cancel_after_grace(self) -> bool:
        """Without a shutdown_timeout of its own, a kernel shutdown that has already spent
        its grace period cancels the agent at once instead of granting a second grace."""
        return self.spec.shutdown_timeout is None

    # --- the child interface ----------------------------------------------------------

    def request_stop(self) -> None:
        self.request_exit(drain=self.drain_on_stop)

    def cut_drain(self) -> None:
        super().cut_drain()
        if self.exit_requested and self.drain_before_exit:
            # asked to stop with a drain: stop after the message in hand instead
            self.request_exit(drain=False)
        self._wake_idle()  # a draining stop waiting for this queue goes on

    def request_exit(self, *, drain: bool = False) -> None:
        if drain and self.running and self.exit_requested and not self.drain_before_exit:
            # This run already asked to end without handling its queue (``ctx.stop()``,
            # or a stop without drain that cut a drain short): a draining stop asked
            # after it does not bring the queue back, as Akka's actor that stopped itself
            # leaves its mailbox to the dead letters whatever comes next.
            return
        self.exit_requested = True
        self.drain_before_exit = drain
        self.interrupted = True
        seldom = self.seldom
        if seldom is not None and seldom.release is not None:
            seldom.release.set()
        if self.parked:
            self.parked = False
            self.mailbox.wake_receiver()

    async def wait_stop_requested(self) -> None:
        """Return once this run is asked to stop (see :meth:`Context.wait_stop_requested`)."""
        if self.exit_requested:
            await trio.lowlevel.checkpoint()
            return
        await self._release_event().wait()

    async def wait_idle(self) -> None:
        """Return once nothing is queued or in hand, or the run has ended: a draining
        stop of an agent that spawned others (a pool's router) waits for it before they
        drain in their turn. Costs the serve loop nothing unless someone waits: the
        ``interrupted`` flag takes it to :meth:`_went_idle` once the mailbox is empty.
        A run whose serve loop is over (its nursery gone: it failed, or ended itself,
        and is still in its ``on_stop`` or stopping what it spawned) handles nothing
        more: no wait then (until the fifty-seventh pass a second wait there, with
        messages left queued, waited for an idle that never came, until the stop's
        timeout: forever for an infinite one, the kernel's shutdown too). Nor does a run
        held after the kernel's grace period from its queue (its stop in the tree's
        order deals with that): only what it has in hand is waited for, until it is
        held idle (see :meth:`_wait_for_release`)."""
        await trio.lowlevel.checkpoint()
        if not (
            self.running
            and self.nursery is not None
            and (self.current is not None or (self.mailbox.depth and not self._held))
        ):
            return
        idle = self._idle
        if idle is None:
            idle = self._idle = trio.Event()
        self.interrupted = True
        await idle.wait()

    def _went_idle(self) -> None:
        """The mailbox is empty and nothing is in hand: wake :meth:`wait_idle`."""
        self._wake_idle()
        # (the caller checked that the run is neither held nor asked to exit)
        self.interrupted = False

    def _wake_idle(self) -> None:
        """Let :meth:`wait_idle` return, if something waits in it."""
        idle = self._idle
        if idle is not None:
            self._idle = None
            idle.set()

    def _release_event(self) -> trio.Event:
        """The event the stop sets (one made before is kept: every waiter returns)."""
        release = self._release
        if release is None or release.is_set():
            release = self._release = trio.Event()
        return release

    @property
    def on_start_running(self) -> bool:
        """The run's ``on_start`` has not returned yet: the run is entered and its serve
        loop (which sets the handler scope first) has not begun. Read when a request
        times out, not per message; no slot of its own (memory per agent)."""
        return self.nursery is not None and self._handler_scope is None

    @property
    def on_stop_running(self) -> bool:
        """The run's ``on_stop`` runs (its nursery is closed, the run not over yet): read
        when a request times out, as :attr:`on_start_running`. Not while the run still
        waits for its linked children to stop (see :meth:`linked_left`)."""
        return self.running and self.nursery is None and self._handler_scope is not _STOPPING_LINKED

    def linked_left(self) -> list[Child]:
        """The linked children not stopped yet of a run whose nursery is closed, while
        it waits for them before its ``on_stop`` (empty while the run serves, and once its
        ``on_stop`` runs, which may spawn more). Read when a request times out, as
        :attr:`on_stop_running`."""
        if self._handler_scope is not _STOPPING_LINKED:
            return []
        return [linked for linked in self.linked_children if not linked.retired]

    def hold(self) -> None:
        """The grace period is over: handle nothing more, wait to be stopped in order.

        A handler still suspended is cancelled now if the agent has no shutdown timeout
        of its own (its message is dead-lettered ``shutdown``).
        """
        self._held = True
        self.interrupted = True
        if self.parked and self.mailbox.depth:
            self.parked = False
            self.mailbox.wake_receiver()
        # A parked agent with an empty mailbox is left asleep: nothing can reach it any
        # more (sends are refused once the kernel is stopping), and the stop that comes
        # in its turn wakes it once (one wake per agent, not two, at a million agents).
        if self.cancel_after_grace and self._suspended:
            self.cancel_current(DeadLetterReason.SHUTDOWN)

    def cancel_current(self, reason: DeadLetterReason) -> bool:
        """Cancel the handler that is working on the current message, if it is suspended."""
        scope = self._handler_scope
        if scope is None or not self._suspended:
            return False
        self._cancel_reason = reason
        scope.cancel()
        return True

    def _stopped_plainly_above(self) -> bool:
        """A stop without drain (``kernel.stop``) was asked of the agent that spawned
        this one, or of one above it, or of a supervisor over them."""
        node: Child | ChildOwner | None = self.linked_parent or self.supervisor
        while isinstance(node, Child):
            if node.stopped_plainly:
                return True
            node = node.linked_parent or node.supervisor
        return False

    def _drained_above(self) -> bool:
        """A draining stop (``kernel.stop(drain=True)``) was asked of the agent that
        spawned this one, or of one above it, or of a supervisor over them, and no stop
        without drain on the way up to it."""
        node: Child | ChildOwner | None = self.linked_parent or self.supervisor
        while isinstance(node, Child):
            if node.stopped_plainly:
                return False
            if node.drain_on_stop:
                return True
            node = node.linked_parent or node.supervisor
        return False

    def on_retired(self, reason: str, *, for_shutdown: bool = False) -> None:
        self.dormant = False
        queued = self.mailbox.close()
        if not queued:
            # (most agents, at a shutdown: no reason or detail to make for nothing)
            return
        # The kernel's own "shutdown" retirements come once it is stopping, or earlier for
        # a run its shutdown ended (``for_shutdown``); a user's stop may give any reason,
        # "shutdown" included, and is a stop. An agent another one spawned (a pool's
        # worker) is retired with its parent's stop, ``parent_stopped``: once the kernel
        # is stopping, that is the shutdown's too (its grace is over: nothing more is
        # handled), and what it held says so, as every other agent's queue. Not when a
        # user's stop without drain above it (of that parent, of a supervisor over them)
        # dropped it: that stop drops its queue whatever the shutdown does, its letters
        # ``agent_stopped`` as those of an agent that stop stops itself.
        shutting_down = for_shutdown or (
            reason in _SHUTDOWN_REASONS
            and self.router.phase >= KernelPhase.STOPPING
            and (reason == "shutdown" or not self._stopped_plainly_above())
        )
        detail = f"agent stopped ({reason})"
        ended = self.drain_ended
        if not shutting_down and (
            ended == SHUTDOWN_ENDED_DRAIN
            or (
                ended is None
                and self.router.phase >= KernelPhase.STOPPING
                and (self.drain_on_stop or self._drained_above())
            )
        ):
            # A draining stop whose queue the kernel's shutdown left unhandled (its grace
            # ran out: nothing more is handled): the shutdown's letters, not the stop's
            # (which would have handled them), as the other agents' queued messages.
            # Also one the grace cut before the tree stop began (``grace=0``: the drain
            # ends a round later), which its supervisor marked so (see _stop_child), and
            # the draining stop of a supervisor over it whose run the shutdown called
            # off before that drain reached it.
            shutting_down = True
            detail = f"{detail}: {SHUTDOWN_ENDED_DRAIN}"
        dl_reason = DeadLetterReason.SHUTDOWN if shutting_down else DeadLetterReason.AGENT_STOPPED
        if ended is not None and not shutting_down:
            # Its run ended by itself while its draining stop waited for the queue (see
            # SupervisorNode._stop_child): said in each letter, and logged once.
            detail = f"{detail}: {ended}"
            log.warning(
                "agent %s stopped: %s; %s dead-lettered",
                self.label,
                ended,
                count_of(len(queued), "queued message"),
                extra=log_extra(self),
            )
        self.router.discard_queued(queued, dl_reason, self, detail)

    def stops_quietly(self) -> bool:
        return self.spec.stops_quietly

    def has_queued(self) -> bool:
        return self.mailbox.depth > 0

    def ends_itself(self) -> bool:
        # (a drain's request does not undo it: see request_exit)
        return self.running and self.exit_requested and not self.drain_before_exit

    def starts_quietly(self) -> bool:
        return self.lazy

    def start_dormant(self, owner: ChildOwner, run: int) -> bool:
        if not self.lazy or self.mailbox.depth:
            return False
        self._dormant_run = run
        return True

    def before_first_start(self) -> bool:
        # (a lazy agent has no on_start; the context is made as the first run begins)
        return self.ctx is None and not self.lazy

    def wake(self) -> None:
        """The first message arrived for a dormant agent: start its run now."""
        owner = self.supervisor
        if owner is not None and self.dormant:
            owner.activate(self, self._dormant_run)

    # --- a run --------------------------------------------------------------------------

    # One frame for the whole run, serve loop included: every running agent keeps it (a
    # frame that only passed a call on to the serve loop cost 272 bytes an agent).
    # Protected from KeyboardInterrupt, as its caller (the supervisor's task) is: a Ctrl-C
    # in its own lines goes to the run's main task at its next checkpoint, and the kernel
    # shuts down gracefully. The agent's own code is not protected, so that a Ctrl-C can
    # interrupt it: its class's __init__ and its on_start are called by the unprotected
    # helpers below (whose frames are gone once they return), its handlers are
    # unprotected by code (``unprotect``) and its on_stop runs in ``_call_on_stop``. A
    # Ctrl-C the kernel shuts down for ends the run as a stop for the shutdown, not as an
    # exit to restart: it raises StoppedForShutdown (with what the run failed with before,
    # if anything).
    @trio.lowlevel.enable_ki_protection
    async def run_once(self) -> None:
        """One run: fresh behaviour, ``on_start``, serve until asked to exit, ``on_stop``.

        Serving the mailbox is this function's own loop, not a helper's: a handler
        deadline or a request timeout cancels ``scope``; the message is dead-lettered and
        serving goes on in a new scope, until the agent is asked to exit (or held after
        the grace period).
        """
        self._begin_run()
        behaviour = self._new_behaviour()
        failure: BaseException | None = None
        # Set once on_start has returned: a run whose on_start its stop cancelled (the
        # nursery's scope, past the grace or the shutdown timeout) has not started, and
        # its on_stop is not called (as OTP calls no ``terminate`` when ``init`` did not
        # return); the run ends as a stop, not a failure.
        started = False
        try:
            try:
                # ``async with trio.open_nursery() as self.nursery:`` written out: the
                # statement keeps the manager's bound ``__aexit__`` on this frame's stack
                # for as long as the run goes on (64 bytes in every running agent); this
                # frame keeps the manager, which the bound method kept anyway. (Each slot
                # of this frame is 8 bytes in every running agent: the nursery and the
                # context are read from the cell, which keeps them.)
                manager = trio.open_nursery()
                self.nursery = await manager.__aenter__()
                try:
                    if self.lazy:
                        # No on_start of the user's (see ``starts_quietly``): the no-op
                        # one is not called (a coroutine made, awaited and dropped at
                        # every activation).
                        self._enter_run()
                    else:
                        await self._call_on_start(behaviour)
                    started = self._run_started()
                    # (the defaults' fields, not the cell's properties: two calls fewer a run)
                    defaults = self.defaults
                    router = defaults.router
                    mailbox = self.mailbox
                    # Mailbox.take written out in the kernel's stepper (a call per message costs
                    # more than a no-op handler): this, then ``depth -= 1`` or ``recount()``.
                    # (the channel, not its bound receive_nowait: a bound method kept in every
                    # running agent's frame would be 64 bytes more, and one more object to touch
                    # when a cold agent wakes)
                    receive = mailbox.receiver()
                    handler = behaviour.handle
                    unprotect(handler)
                    ctx = self.ctx
                    assert ctx is not None
                    # A message handed to us while we were parked: it is ours, handled first.
                    got: Message | None = None
                    stepper: Any = None
                    # (also what it is answered with: one local less in the frame every parked
                    # agent keeps)
                    result: Any = None
                    # What a step of the kernel's stepper gave back (see _serve_batches) and,
                    # once a suspended handler has ended, whether the scope is spent: True for a
                    # cancel of ``scope`` that came after the handler was woken, too late to stop
                    # it (Trio keeps the scope cancelled), and serving goes on in a new one once
                    # this message is done with, or the next message would get it. (One local
                    # for both, 8 bytes less in every running agent's frame: the step's outcome
                    # is not read again once the handler has ended, and a spent scope is always
                    # left by a checkpoint that raises before the next step.)
                    trap: Any = False
                    # (None once an exception left it: see the ``finally`` below)
                    scope: Any = None
                    while True:
                        # A ``with`` written out: the statement keeps the scope's bound ``__exit__``
                        # on the frame's stack for as long as the loop runs (64 bytes in every
                        # running agent); this frame keeps the scope only, which it needs anyway.
                        scope = trio.CancelScope()
                        scope.__enter__()
                        self._handler_scope = scope
                        try:
                            while True:
                                # A batch: the kernel's stepper takes this run's messages
                                # and runs their handlers itself (see _serve_batches), and
                                # comes back here only for what needs an await or the run:
                                # a full batch, an empty mailbox (or the run's exit), a
                                # handler that failed, returned something or suspended.
                                left = defaults.batch_size
                                while True:
                                    # Read at each step: a handler that suspends takes the
                                    # kernel's stepper with it (see _step).
                                    stepper = defaults.stepper
                                    try:
                                        # (its bound ``send`` read first: a call of
                                        # ``stepper.send(...)`` looks an instance's
                                        # attribute up as a method, unspecialized, at
                                        # every step)
                                        trap = stepper.send
                                        trap = trap((self, receive, handler, ctx, got, left))
                                    except BaseException:
                                        # Its own bookkeeping raised (no handler's failure:
                                        # those it reports): it is done; a new one for the
                                        # other agents, and this run ends with the error.
                                        defaults.stepper = defaults.new_stepper()
                                        raise
                                    got = None
                                    if trap is _EMPTY or trap is _FULL:
                                        break
                                    try:
                                        if trap is _DONE:
                                            msg = stepper.box[2]
                                            left = stepper.box[3]
                                            result = stepper.box[0]
                                            # The kernel's stepper keeps neither: the
                                            # last step of a quiet kernel would keep them
                                            # alive after this agent stopped.
                                            stepper.box[0] = stepper.box[2] = None
                                        elif trap is _FAILED:
                                            msg = stepper.box[2]
                                            left = stepper.box[3]
                                            # (nor a failed one: a failure that ends
                                            # the run would leave it there for good)
                                            stepper.box[2] = None
                                            raise stepper.failure()
                                        else:
                                            # The handler of ``current`` suspended: only now
                                            # does it get a deadline (a timer costs more than
                                            # a whole message when nothing awaits).
                                            msg = self.current  # (set by the stepper)
                                            defaults.stepper = defaults.new_stepper()
                                            # (the clock read from the ledger: read only
                                            # here, it needs no local of its own, 8 bytes
                                            # in every running agent's frame)
                                            scope.deadline = (
                                                defaults.ledger.now() + self.handle_timeout
                                            )
                                            self._suspended = True
                                            try:
                                                result = await resume(stepper, trap)
                                            finally:
                                                self._suspended = False
                                                scope.deadline = math.inf
                                                # (a Cancelled of its own leaves the scope anyway)
                                                trap = scope.cancel_called  # (spent?)
                                                # the rest of the batch (the stepper
                                                # reports it however the handler ended)
                                                left = stepper.box[3]
                                    except MessageFailed as exc:
                                        # This message failed, the agent did not: go on with the next one.
                                        self._message_failed(msg, exc)
                                        if trap is True:
                                            # leaves the spent scope
                                            await trio.lowlevel.checkpoint()
                                        continue
                                    except Exception as exc:
                                        self._handler_raised(msg, exc)
                                        if trap is True:
                                            # leaves the spent scope
                                            await trio.lowlevel.checkpoint()
                                        continue
                                    except KeyboardInterrupt as exc:
                                        # Ctrl-C, raised by Trio in the handler's code: the kernel
                                        # shuts down gracefully and this agent drains with the others
                                        # (once the kernel is shutting down, it goes on up: forced).
                                        if not router.interrupt(exc):
                                            raise
                                        self._interrupted(msg)
                                        if trap is True:
                                            # leaves the spent scope
                                            await trio.lowlevel.checkpoint()
                                        continue
                                    except BaseExceptionGroup as exc:
                                        # A Ctrl-C in a group with failures (the handler's
                                        # own nursery's): the Ctrl-C is the kernel's, as
                                        # above; the failures are this message's, not lost.
                                        if not self._failed_at_interrupt(msg, exc):
                                            raise
                                        if trap is True:
                                            # leaves the spent scope
                                            await trio.lowlevel.checkpoint()
                                        continue
                                    # Handled and counted (by the stepper): what it returned
                                    # is answered or routed.
                                    if trap is True:
                                        # Done with: what it returned is answered or routed, out of
                                        # reach of the spent scope (a route waits at most the send
                                        # deadline), then the scope is left.
                                        if result is not None:
                                            result = router.answer(self.id, msg, result)
                                            if result is not None:
                                                with trio.CancelScope(shield=True):
                                                    await router.route(result)
                                            result = None
                                        await trio.lowlevel.checkpoint()  # leaves the spent scope
                                    if result is not None:
                                        # A local request's answer is delivered without a coroutine.
                                        result = router.answer(self.id, msg, result)
                                        if result is not None:
                                            await router.route(result)
                                        if not (mailbox.depth or self.interrupted):
                                            # Nothing queued: the step the stepper would take
                                            # now only finds the mailbox empty (an agent woken
                                            # for one query would take two steps a query).
                                            trap = _EMPTY
                                            break
                                if trap is _FULL:
                                    # A full batch: let the others run before the next one.
                                    await trio.lowlevel.checkpoint()
                                    continue
                                # The mailbox is empty.
                                if self.interrupted:
                                    if self._held:
                                        if not self.exit_requested:
                                            await self._wait_for_release()
                                        break
                                    if self.exit_requested:
                                        break
                                    self._went_idle()
                                if router.phase is _DRAINING:
                                    router.check_drained()
                                # Parked agents keep this frame: let go of the last message, its
                                # result and the finished handler coroutine (at a million agents
                                # with one message each, that is a million messages kept alive).
                                # (``result`` holds the mailbox's count of waiting producers
                                # over the park, for ``unparked``: a small int, not a local of
                                # its own; every message's ``result`` is set before it is read)
                                msg = _NOTHING
                                stepper = None
                                self.parked = True
                                # Mailbox.receive written out: a parked agent keeps no frame of it.
                                result = mailbox.waiting
                                got = None
                                try:
                                    got = await mailbox.park()
                                finally:
                                    self.parked = False
                                    got = mailbox.unparked(got, result)
                        except BaseException as exc:
                            # What the ``with`` statement does: the scope takes the exception (its
                            # own cancel) or it goes on; either way the ``finally`` leaves it alone.
                            scope = None
                            if not self._leave_handler_scope(exc):
                                raise
                        else:
                            # The run's exit (a ``break`` of the loop above): the ``finally`` leaves
                            # the scope.
                            break
                        finally:
                            if scope is not None:
                                # left by the run's exit
                                scope.__exit__(None, None, None)

                        # Only a handler deadline or a request timeout cancels this scope.
                        self._handler_scope = None
                        if self.current is not None:
                            self._handler_cancelled(self.current)
                        elif trap is True:
                            # the reason of a cancel that came too late is no message's
                            self._cancel_reason = None
                            # (the next step sets ``trap`` before it is read again)
                    self._end_background()
                except BaseException as exc:
                    # What the statement does: the nursery takes the exception (a cancel
                    # of its own) or it goes on as it was, unless the nursery raises what
                    # it gathered instead (a group of its children's failures and this).
                    if not await _leave_nursery(manager, exc):
                        raise
                else:
                    await manager.__aexit__(None, None, None)
            except BaseExceptionGroup as exc:
                failure = self._run_failure(exc)
        finally:
            self._end_run(failure)
            if self.drain_on_stop:
                # Its draining stop's run is over: nothing handles a message to it any
                # more, so none is taken while its on_stop runs (a supervisor's draining
                # stop retires it only in its turn; see SupervisorNode._run_over).
                self.router.unroute(self)
            if self.name is not None and self._ends_for_good(failure, False):
                # (its end is decided whatever its on_stop does: told before it, as
                # kernel.stop tells, see StopsTold)
                await self._tell_stopping()
            if self.linked_children:
                # What this run spawned stops before its on_stop, however the run ended
                # (a stop by its supervisor has stopped them already, but for those
                # spawned meanwhile).
                await self._stop_linked()
            if not self.spec.stops_quietly and (started or failure is not None):
                # Only an on_stop of the user's gets its shielded scope (a scope costs
                # more than the rest of a quiet agent's exit). None for a run whose
                # on_start was cancelled by its stop (see ``started``); one that raised
                # or was interrupted (Ctrl-C) still gets it.
                failure = await self._call_on_stop(behaviour, failure)
            if self.name is not None and self._ends_for_good(failure, True):
                # (a normal exit of a transient agent: decided once its on_stop returned)
                await self._tell_stopping()
        if failure is not None:
            self._count_run_failure(failure)
            # Raised, not kept by this frame, which its traceback keeps (with the failed
            # message, a local here): no cycle for the collector, or the message lived
            # on until a collection, for good once the keeper froze it.
            try:
                raise failure
            finally:
                failure = None

    # Not protected from KeyboardInterrupt: it runs the agent class's __init__.
    @trio.lowlevel.disable_ki_protection
    def _new_behaviour(self) -> Behaviour:
        """The run's fresh behaviour, from the spec's factory."""
        try:
            return self.spec.factory()
        except KeyboardInterrupt as exc:
            # A Ctrl-C in the agent class's __init__: nothing started, nothing to stop
            # (no behaviour, no on_stop).
            raise self._stopped_by(exc, None) from None

    # Not protected from KeyboardInterrupt: it runs the agent's on_start. A coroutine of
    # its own, gone once on_start has returned (run_once's frame stays for the run).
    @trio.lowlevel.disable_ki_protection
    async def _call_on_start(self, behaviour: Behaviour) -> None:
        """The run's ``on_start``, in its open nursery."""
        try:
            await behaviour.on_start(self._enter_run())
        except (Exception, trio.Cancelled) as exc:
            raise _start_failure(exc) from None
        except (KeyboardInterrupt, BaseExceptionGroup) as exc:
            # (a group: of a nursery on_start opened, a Ctrl-C in one of its tasks)
            self._take_at_once(exc)
            raise

    # Not protected from KeyboardInterrupt: it runs the agent's on_stop. A
    # method of its own: what it needs (its scope, the stack of a ``with`` around a
    # ``try`` in a ``finally``) would be slots of run_once's frame, which every running
    # agent keeps.
    @trio.lowlevel.disable_ki_protection
    async def _call_on_stop(
        self, behaviour: Behaviour, failure: BaseException | None
    ) -> BaseException | None:
        """The run's ``on_stop`` in its shielded scope; what the run ends with after it."""
        ctx = self.ctx
        assert ctx is not None  # built by the run's start
        with self.shutdown_scope() as stop_scope:
            try:
                await behaviour.on_stop(ctx)
            except Exception as exc:
                failure = self._on_stop_raised(exc, failure)
            except trio.Cancelled as exc:
                foreign = _foreign_cancel(exc)
                if foreign is None:
                    raise
                failure = self._on_stop_raised(foreign, failure)
            except KeyboardInterrupt as exc:
                failure = self._stopped_by(exc, failure)
        if stop_scope.cancel_called:
            self._on_stop_cut()
        return failure

    def _ends_for_good(self, failure: BaseException | None, stopped: bool) -> bool:
        """Whether this run, ending by itself with ``failure`` (None: a normal exit), ends
        the agent for good, decided now: before its ``on_stop`` (``stopped`` False), a
        ``temporary`` agent's run or one whose handler's directive is ``stop`` (no
        ``on_stop`` changes that); once its ``on_stop`` returned (``stopped`` True), a
        normal exit of a ``transient`` one (an ``on_stop`` that raised makes it a
        failure, restarted: as OTP's ``terminate`` that crashes). Not a run its
        supervisor or ``kernel.stop`` ends (told there, or not for good), nor one of a
        kernel that is shutting down (its records are the leave's: no call per agent)."""
        if (
            self.terminating
            or self.router.phase is not KernelPhase.RUNNING
            or isinstance(failure, StoppedForShutdown)
        ):
            return False
        if stopped:
            return failure is None and self.restart is RestartType.TRANSIENT
        return self.restart is RestartType.TEMPORARY or self.exit_directive is Directive.STOP

    async def _tell_stopping(self) -> None:
        """Tell the transport that this agent ends for good, before its stop goes on (see
        ``StopsTold``: the NATS cluster drops a placed agent's record there, so that a
        node SIGKILLed meanwhile does not have an agent that ended re-placed). Shielded
        (the run ends whatever cancels it meanwhile) and bounded, as its ``on_stop`` is,
        by its ``shutdown_timeout`` (a transport that does not return would hold the
        run's end, and a shutdown's stop of it, for as long); an error or the timeout is
        logged, and the run ends all the same."""
        stopping = getattr(self.router.transport, "agent_stopping", None)
        if stopping is None:
            return
        with self.shutdown_scope() as scope:
            try:
                await stopping(self.id, self.name)
            except Exception as exc:
                log_guarded(
                    log,
                    logging.ERROR,
                    "agent %s: the transport's agent_stopping raised; it stops all the same",
                    self.label,
                    exc_info=exc,
                    extra=log_extra(self),
                )
        if scope.cancelled_caught:
            log_guarded(
                log,
                logging.WARNING,
                "agent %s: the transport's agent_stopping did not return within its"
                " shutdown_timeout (%gs): cancelled; it stops all the same",
                self.label,
                self.shutdown_timeout,
                extra=log_extra(self),
            )

    # --- a run's bookkeeping: each group protected from KeyboardInterrupt as a whole ----

    @trio.lowlevel.enable_ki_protection
    def _begin_run(self) -> None:
        """A run starts: its flags, and the context (built on the first run)."""
        self.exit_requested = self.terminating
        self.interrupted = self.terminating or self._held
        seldom = self.seldom
        if seldom is not None:
            seldom.exit_directive = None
        if self.ctx is None:
            self.ctx = self.defaults.make_context(self)

    def background_nursery(self) -> trio.Nursery | None:
        """The run's nursery for ``ctx.nursery`` (None between runs), its tasks guarded
        on first use in the run (see _guard; most runs never use it)."""
        nursery = self.nursery
        # (a Trio whose Nursery had no instance dict would get its nursery unguarded:
        # the guard is a fault's isolation, never a reason for ctx.nursery to fail)
        if nursery is not None:
            own = getattr(nursery, "__dict__", None)
            if own is not None and "start_soon" not in own:
                _guard(nursery, self._take_at_once)
        return nursery

    @trio.lowlevel.enable_ki_protection
    def _enter_run(self) -> Context:
        """The run's nursery is open (``nursery``): its scope is the run's; the context
        for ``on_start``."""
        nursery = self.nursery
        assert nursery is not None and self.ctx is not None
        self.scope = nursery.cancel_scope
        return self.ctx

    @trio.lowlevel.enable_ki_protection
    def _end_background(self) -> None:
        """The run is over: its background work ends with it. (Most runs have none, and
        Trio's cancel() formats the task's repr for its reason: about a tenth of
        stopping an agent.)
        Under a draining stop its serving is over: nothing handles a message to it any
        more, so none is taken from now on (the run's end, which says so too, comes
        only once its nursery is done, a round or more later)."""
        if self.drain_on_stop:
            self.router.unroute(self)
        nursery = self.nursery
        assert nursery is not None
        if nursery.child_tasks:
            nursery.cancel_scope.cancel()

    @trio.lowlevel.enable_ki_protection
    def _run_started(self) -> bool:
        """on_start returned: release the next sibling, publish ``started``."""
        if self.start_gate is not None:
            self.signal_started()
        self.defaults.ledger.event(_STARTED, self.id, self.name)
        return True

    @trio.lowlevel.enable_ki_protection
    def _take_at_once(self, raised: BaseException) -> None:
        """A Ctrl-C raised in ``on_start`` or a ``ctx.nursery`` task, as it goes out (or
        the first one in the group of a nursery they opened, a Ctrl-C in one of its
        tasks: the one _run_failure finds first): the kernel takes it now (cancels the
        block, shuts down gracefully), not once the run's nursery is done (a sibling
        task's shielded ``finally`` can hold it open), or a shutdown begun meanwhile made
        it a second Ctrl-C and the exit was forced. Where it ends the run (see
        _run_failure) the kernel takes it again: the same."""
        interrupt = _interrupt_in(raised)
        if interrupt is not None:
            self.router.interrupt(interrupt)

    @trio.lowlevel.enable_ki_protection
    def _stopped_by(
        self, interrupt: KeyboardInterrupt, failure: BaseException | None
    ) -> StoppedForShutdown:
        """A Ctrl-C in the agent's code: the kernel's (the run ends as a stop for the
        shutdown, with ``failure`` if it had failed before), or raised on (forced)."""
        if not self.router.interrupt(interrupt):
            raise interrupt
        if isinstance(failure, StoppedForShutdown):
            return failure
        return StoppedForShutdown(failure)

    @trio.lowlevel.enable_ki_protection
    def _run_failure(self, group: BaseExceptionGroup[BaseException]) -> BaseException:
        """What the run's nursery raised ends the run with: a failure (logged here unless
        a handler's, logged already), a stop for a Ctrl-C, or raised on."""
        failure = _first_failure(group)
        if failure is None:
            raise group
        if isinstance(failure, KeyboardInterrupt) and self.router.interrupt(failure):
            # A Ctrl-C in on_start or a background task: the kernel shuts down for it;
            # this run ends as a stop for the shutdown, after on_stop.
            return StoppedForShutdown(None)
        if not isinstance(failure, Exception):
            raise group
        if isinstance(failure, _HandlerFailed):
            return failure.error
        if isinstance(failure, _Carrier):
            failure = failure.error
        if not (log.isEnabledFor(logging.ERROR) and self.ledger.failure_lines.allowed(self.label)):
            return failure  # (counted; nothing formatted for a line not written)
        # A traceback shows no repr, and one whose __str__ raises shows "<exception str()
        # failed>": the line says what repr() raised, as the notices and dead letters do.
        said = failed_repr(failure)
        log_guarded(
            log,
            logging.ERROR,
            "agent %s failed outside a handler%s",
            self.label,
            "" if said is None else f" ({said})",
            exc_info=failure,
            extra=log_extra(self),
        )
        return failure

    @trio.lowlevel.enable_ki_protection
    def _end_run(self, failure: BaseException | None) -> None:
        """The run's nursery is gone; a message still in hand is dead-lettered."""
        self.nursery = None
        self._handler_scope = None
        seldom = self.seldom
        if seldom is not None and seldom.idle is not None:
            self._wake_idle()  # nothing more is handled in this run
        current = self.current
        if current is not None:
            # Cancelled from outside (stop past its timeout, shutdown) or by a failing
            # background task, mid-handler.
            self.current = None
            self.dead_lettered += 1
            self.ledger.dead_letter(
                current,
                DeadLetterReason.SHUTDOWN
                if self.router.phase >= KernelPhase.STOPPING
                or isinstance(failure, StoppedForShutdown)
                else DeadLetterReason.AGENT_STOPPED,
                self.id,
                self.name,
                detail="cancelled while being handled",
            )

    @trio.lowlevel.enable_ki_protection
    async def _stop_linked(self) -> None:
        """Stop, for good, the agents this run spawned (shielded: a run that failed, or
        whose stop ran past its timeout, still stops them before its ``on_stop``)."""
        owner = self.supervisor
        if owner is not None:
            self._handler_scope = _STOPPING_LINKED  # (see linked_left)
            try:
                await owner.stop_linked(
                    self, "parent_stopped" if self.terminating else "parent_exited"
                )
            finally:
                self._handler_scope = None

    @trio.lowlevel.enable_ki_protection
    def _on_stop_cut(self) -> None:
        """``on_stop`` ran past the shutdown timeout and was cancelled: said, as OTP
        reports a child killed after its timeout (``shutdown_error``). Not a failure. A
        timeout of 0 cancels at once by request (OTP's ``brutal_kill``): not said."""
        if self.shutdown_timeout > 0:
            log_guarded(
                log,
                logging.WARNING,
                "on_stop of agent %s did not return within its shutdown_timeout (%gs): cancelled",
                self.label,
                self.shutdown_timeout,
                extra=log_extra(self),
            )

    @trio.lowlevel.enable_ki_protection
    def _on_stop_raised(self, exc: Exception, failure: BaseException | None) -> BaseException:
        if log.isEnabledFor(logging.ERROR) and self.ledger.failure_lines.allowed(self.label):
            log_guarded(
                log,
                logging.ERROR,
                "on_stop of agent %s raised",
                self.label,
                exc_info=exc,
                extra=log_extra(self),
            )
        # As a ``terminate`` that crashes in OTP: the run ends with this failure (the
        # first one, if it had failed already).
        if failure is None:
            return exc
        if isinstance(failure, StoppedForShutdown) and failure.failure is None:
            return StoppedForShutdown(exc)
        return failure

    @trio.lowlevel.enable_ki_protection
    def _count_run_failure(self, failure: BaseException) -> None:
        failed = failure.failure if isinstance(failure, StoppedForShutdown) else failure
        if failed is not None and self.exit_directive is None:
            # A run that failed outside a handler (on_start, a background task, its
            # stop, on_stop): once per run, whatever else failed in it after. A run
            # that a handler's directive ended (its failure counted in ``failed``) is
            # not counted again, also if a background task failed with it. A stop for
            # the shutdown is no failure (what failed before it is one).
            self.run_failures += 1
            self.ledger.run_failures += 1

    def _handler_cancelled(self, msg: Message) -> None:
        """A handler deadline or a request timeout cancelled the handler of ``msg``."""
        self.current = None
        reason = self._cancel_reason or DeadLetterReason.HANDLER_TIMEOUT
        self._cancel_reason = None
        if reason is DeadLetterReason.HANDLER_TIMEOUT:
            self.timed_out += 1
            self.ledger.timed_out += 1
            if log.isEnabledFor(logging.WARNING) and self.ledger.failure_lines.allowed(self.label):
                log_guarded(
                    log,
                    logging.WARNING,
                    "handler of agent %s timed out after %gs on message %s",
                    self.label,
                    self.handle_timeout,
                    msg.id,
                    extra=log_extra(self, msg),
                )
        self.dead_lettered += 1
        self.ledger.dead_letter(msg, reason, self.id, self.name)

    async def _wait_for_release(self) -> None:
        """Held after the grace period: nothing more is handled until the stop comes (the
        caller has looked whether it came already: at a shutdown, most have). Idle then
        (nothing in hand, nothing queued): a draining stop waiting for its queue to be
        handed on (:meth:`wait_idle`) goes on, not waits out its timeout for an idle the
        serve loop no longer says (until the fifty-seventh pass's review: a spawner's
        draining stop whose message in hand the grace period's end outlasted returned at
        its ``shutdown_timeout``, the kernel's shutdown with it)."""
        self._wake_idle()
        await self._release_event().wait()

    def _leave_handler_scope(self, exc: BaseException) -> bool:
        """The serve loop's scope left by ``exc``, as a ``with`` statement leaves it: True
        if the scope took it (its own cancel), False to raise it on; what the scope's
        ``__exit__`` raises instead goes on up. But for one case: a handler whose own
        nursery's child failed in the tick its deadline (or a request timeout) cancelled
        it raises a group of the child's error and that cancel; the scope takes the
        cancel and raises the rest, which is the handler's error: dead-lettered
        ``handler_error``, counted and logged, then its directive, as when the child
        fails a tick sooner (not the run's failure 'outside a handler', its message
        dead-lettered as cancelled). Likewise when the cancel in such a group is not
        the scope's (a stop past its timeout, the shutdown): the rest is the handler's
        error, as a handler's that raises while such a cancel is pending, and the cancel
        goes on up (raised here). A ``trio.Cancelled`` of no scope that is cancelled
        (see _foreign_cancel) is the handler's error too. A method of its own: the serve
        loop's frame, which every running agent keeps, gets no local for it."""
        scope = self._handler_scope
        assert scope is not None
        try:
            if scope.__exit__(type(exc), exc, exc.__traceback__):
                return True
        except Exception as left:
            msg = self.current
            if msg is None or not isinstance(exc, BaseExceptionGroup) or not scope.cancelled_caught:
                raise
            # (a timeout's reason, if any, was this message's: spent)
            self._cancel_reason = None
            self._handler_raised(msg, left)
            return True
        msg = self.current
        if msg is None:
            return False
        foreign = _foreign_cancel(exc)
        if foreign is not None:
            # the handler's own error (the scope, not cancelled, is left all the same)
            self._handler_raised(msg, foreign)
            return True
        if _ends_kernel(exc):
            # What the handler raised that is no Exception (``sys.exit()``), alone or in
            # a group (a BaseExceptionGroup of its own nursery's tasks): it goes on up and
            # ends the kernel; its message was not cut short by a stop.
            self._handler_ended_kernel(msg, exc)
            return False
        if not isinstance(exc, BaseExceptionGroup):
            return False
        cancels, rest = exc.split(trio.Cancelled)
        if cancels is None or not isinstance(rest, Exception):
            return False
        self._cancel_reason = None
        # (a directive that ends the run raises here, as it does for a handler that
        # raises while the cancel is pending: the scope stays cancelled)
        self._handler_raised(msg, rest)
        raise cancels

    def _handler_ended_kernel(self, msg: Message, exc: BaseException) -> None:
        """The handler of ``msg`` raised ``exc``, no Exception (nor a group, nor a cancel
        or Ctrl-C, each seen to elsewhere): dead-lettered with it, counted failed. Not logged:
        it goes on up, to whoever ran the kernel (``sys.exit(0)`` is no error)."""
        self.current = None
        self.failed += 1
        self.ledger.failed += 1
        self.dead_lettered += 1
        self.ledger.dead_letter(msg, DeadLetterReason.HANDLER_ERROR, self.id, self.name, error=exc)

    def _dead_after_grace(self, msg: Message) -> None:
        self.dead_lettered += 1
        self.ledger.dead_letter(
            msg, DeadLetterReason.SHUTDOWN, self.id, self.name, detail="after the grace period"
        )

    def _interrupted(self, msg: Message) -> None:
        """The handler of ``msg`` was interrupted by a Ctrl-C the kernel shuts down for."""
        self.current = None
        self.dead_lettered += 1
        self.ledger.dead_letter(
            msg,
            DeadLetterReason.SHUTDOWN,
            self.id,
            self.name,
            detail="interrupted by KeyboardInterrupt while being handled",
        )

    def _handler_failed(self, msg: Message, exc: Exception) -> None:
        """The handler of ``msg`` raised ``exc``: counted failed, dead-lettered."""
        self.current = None
        self.failed += 1
        self.ledger.failed += 1
        self.dead_lettered += 1
        self.ledger.dead_letter(msg, DeadLetterReason.HANDLER_ERROR, self.id, self.name, error=exc)

    def _log_handler_failure(self, msg: Message, exc: Exception, then: str) -> None:
        if log.isEnabledFor(logging.ERROR) and self.ledger.failure_lines.allowed(self.label):
            log_guarded(
                log,
                logging.ERROR,
                "handler of agent %s failed on message %s (%s)",
                self.label,
                msg.id,
                then,
                exc_info=exc,
                extra=log_extra(self, msg),
            )

    def _failed_at_interrupt(self, msg: Message, group: BaseExceptionGroup[Any]) -> bool:
        """Whether the handler of ``msg`` raised a Ctrl-C in ``group`` with failures
        that the kernel shuts down for (Trio's rule: the interrupt wins; the siblings go
        out with it): then they are its message's failure, counted, dead-lettered
        ``handler_error`` and logged, as a handler's error is; no directive (the agent
        drains for the shutdown, as after a Ctrl-C alone). False for any other group
        (or a Ctrl-C once the kernel shuts down: the exit is forced, the group raised)."""
        failures = _failures_beside_interrupt(group)
        interrupt = _interrupt_in(group)
        if failures is None or interrupt is None or not self.router.interrupt(interrupt):
            return False
        self._handler_failed(msg, failures)
        self._log_handler_failure(msg, failures, "interrupted by KeyboardInterrupt: shutting down")
        return True

    def _message_failed(self, msg: Message, exc: MessageFailed) -> None:
        self.current = None
        self.failed += 1
        self.ledger.failed += 1
        self.dead_lettered += 1
        reason = exc.reason if isinstance(exc.reason, DeadLetterReason) else None
        self.ledger.dead_letter(
            msg, reason or DeadLetterReason.HANDLER_ERROR, self.id, self.name, error=exc
        )
        if log.isEnabledFor(logging.WARNING) and self.ledger.failure_lines.allowed(self.label):
            log_guarded(
                log,
                logging.WARNING,
                "agent %s failed message %s: %s",
                self.label,
                msg.id,
                exc.detail,
                extra=log_extra(self, msg),
            )

    def _unawaited(self, result: types.CoroutineType[Any, Any, Any]) -> TypeError:
        """The error of a handler that returned a coroutine (``return ctx.request(...)``
        without ``await``): closed here, so that Python does not warn about it later."""
        result.close()
        return TypeError(
            f"the handler of agent {self.label} returned the coroutine {result.__qualname__}"
            " instead of its result: a missing 'await'? (write 'return await ...')"
        )

    def _handler_raised(self, msg: Message, exc: Exception) -> None:
        """Dead-letter, count and log; then resume, or end the run per the directive."""
        self._handler_failed(msg, exc)
        directive = self.spec.directive_for(exc)
        self._log_handler_failure(msg, exc, directive.value)
        if directive is Directive.RESUME:
            return
        self.exit_directive = directive
        raise _HandlerFailed(exc) from exc
