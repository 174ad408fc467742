"""The kernel: a root nursery over a supervision tree, a router and a ledger.

``async with open_kernel(config) as kernel:`` runs the root supervisor in a nursery;
leaving the block shuts the kernel down gracefully: new sends from outside are refused,
agents drain their mailboxes within ``shutdown_grace``, then nothing more is handled
and the supervision tree is stopped children-before-parents in reverse start order, and
every message that was still undelivered is dead-lettered.

The kernel itself is small: the :class:`~nexus_trio._router.Router` owns addresses,
delivery and requests, the :class:`~nexus_trio._ledger.Ledger` owns counters, dead
letters and events, and supervisors and agents get only the narrow parts they need.
Shutdown is one :class:`~nexus_trio._router.KernelPhase`.

Accounting: every message the kernel *accepts* (enqueued, evicted, or taken from a
handler to be routed) ends as handled, as a delivered reply, as forwarded to a remote
kernel, or as a dead letter; a send refused with an exception is *rejected* (the caller
still holds the message) and counted apart. ``stats()`` shows both, in O(1).

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

import logging
import math
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from heapq import heappush, heapreplace
from threading import get_ident
from typing import Any, Final, final, overload

import trio

from ._agent import (
    ROOT_NAME,
    AgentRef,
    AgentSpec,
    Context,
    ContextCommon,
    Handler,
    address_of,
    as_spec,
    check_agent_name,
    checked_seconds,
    unknown_options,
)
from ._block import async_block
from ._brief import brief
from ._cell import AgentCell, CellDefaults
from ._child import Child, ChildOwner
from ._config import Config
from ._deadletter import DeadLetter
from ._errors import (
    AgentNotFound,
    AgentNotRunning,
    KernelShuttingDown,
    NameTaken,
    RequestFailed,
    SupervisorEscalation,
    only_cancels,
    raise_held,
)
from ._events import EventKind, LifecycleEvent
from ._gc import HeapKeeper
from ._ledger import Ledger
from ._logcall import log_guarded
from ._mailbox import Mailbox, MailboxStatistics
from ._message import (
    SYSTEM_ID,
    Address,
    Message,
    MessageKind,
    kind_error,
    new_id,
    new_message,
    new_query,
)
from ._router import AgentWalk, KernelPhase, Router, TransportHandle, wrong_thread
from ._stats import AgentStats, KernelStats
from ._streams import Subscription
from ._supervisor import Backoff, Escalation, SupervisionHost, Supervisor, SupervisorNode
from ._transport import Transport
from .logs import install_default_logging

log = logging.getLogger("nexus_trio.kernel")

# Enum members as module constants: a class-attribute read costs ~170 ns on Python 3.11.
_RUNNING: Final = KernelPhase.RUNNING
#: the keyword options of ``kernel.spawn``
_SPAWN_OPTIONS: Final = ("name", "supervisor")
_COMMAND: Final = MessageKind.COMMAND


@final
class Kernel:
    """A running kernel. Get one from :func:`open_kernel`; it is not meant to be built directly."""

    def __init__(self, config: Config, *, seed: int | None = None) -> None:
        self.config = config
        kc = config.kernel
        self._ledger = Ledger(
            kc.dead_letter_buffer,
            kc.dead_letter_log_limit,
            kc.failure_log_limit,
            kc.log_kind_limit,
        )
        heap = HeapKeeper(kc.gc_freeze)
        self._router = Router(self._ledger, kc.send_timeout, heap)
        self._thread_limiter = trio.CapacityLimiter(config.runtime.blocking_thread_limit)
        sup = config.supervision
        # (one bound method for every cell, in their shared defaults: not one per cell,
        # 64 bytes each at a million agents)
        self._cell_defaults = CellDefaults(kc, self._router, self._ledger, self._context_for)
        self._context_common = ContextCommon(self, self._spawn_linked, self._thread_limiter)
        self._host = SupervisionHost(
            self._router,
            self._ledger,
            random.Random(seed),
            escalate_to_kernel=sup.escalate_to_kernel,
            heap=heap,
        )
        self._root = SupervisorNode(
            self._host,
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
            ROOT_NAME,
            root=True,
        )
        self._router.nodes[self._root.id.int] = self._root
        self._shutdown_started = trio.Event()
        self._shutdown_finished = trio.Event()
        #: the drain of the shutdown under way (its deadline: the grace period's end)
        self._drain_scope: trio.CancelScope | None = None
        self._body_scope = trio.CancelScope()
        self._root_done = trio.Event()
        self._escalation: SupervisorEscalation | None = None
        #: a Ctrl-C raised in an agent's code while the kernel ran (see _take_interrupt):
        #: raised by open_kernel once the shutdown it started is over
        self._interrupt: KeyboardInterrupt | None = None
        self._router.interrupt = self._take_interrupt
        #: the task that runs the root supervisor: every task of the supervision tree
        #: descends from it (see _in_tree)
        self._root_task: trio.lowlevel.Task | None = None
        #: the ``open_kernel`` nursery, where a shutdown asked from inside the tree runs
        self._nursery: trio.Nursery | None = None
        #: the task that runs the ``open_kernel`` block (see _in_block)
        self._block_task: trio.lowlevel.Task | None = None
        #: code in the block (its own task, a task in a nursery it opened) asked for the
        #: shutdown, or waits for it: the block is not cancelled once the kernel has
        #: stopped, which would cancel that caller too (see _shut_down)
        self._asked_in_block = False

    # --- lifecycle of the kernel -----------------------------------------------------------

    # Trio raises a Ctrl-C's KeyboardInterrupt in the code that runs when it comes, unless
    # that code is protected: then the run's main task gets it at its next checkpoint.
    # The kernel's own code is protected (the tasks of the tree, the request timer, and
    # the calls agents and the block make), so that a Ctrl-C never lands halfway through
    # its bookkeeping; the agents' code (handlers, on_start, on_stop, their background
    # tasks) is not, so that a handler stuck in a loop can still be interrupted, and
    # there the kernel takes it as a Ctrl-C of its own (see _take_interrupt).
    @trio.lowlevel.enable_ki_protection
    async def _run_root(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        self._ledger.now = trio.lowlevel.current_clock().current_time
        root = self._root
        root.run = 1
        root.running = True
        root.started_at = trio.current_time()
        self._root_task = trio.lowlevel.current_task()
        task_status.started()
        try:
            await root.run_once()
        except Escalation as exc:
            self._escalation = exc.to_public("kernel")
            log_guarded(
                log,
                logging.ERROR,
                "supervision escalated to the kernel: %s; shutting down",
                self._escalation,
            )
            self._body_scope.cancel()
        finally:
            root.running = False
            self._root_done.set()
            # Nothing more can be handled: a drain under way must not wait out its grace.
            self._router.end_drain()

    def _take_interrupt(self, exc: KeyboardInterrupt) -> bool:
        """A KeyboardInterrupt raised in an agent's code: while the kernel runs, a Ctrl-C
        for the kernel, as one raised in the ``open_kernel`` block would be (the block is
        cancelled, the kernel shuts down gracefully and ``open_kernel`` raises it). False
        once the kernel is shutting down, or for a second one before it began: it goes on
        up, forcing the exit. True again for the one taken (a run takes it where it is
        raised, and once more where it ends the run: see AgentCell._take_at_once)."""
        if exc is self._interrupt:
            return True
        if self._router.phase is not KernelPhase.RUNNING or self._interrupt is not None:
            return False
        self._interrupt = exc
        self._log_interrupt()
        self._body_scope.cancel()
        return True

    def _log_interrupt(self) -> None:
        log_guarded(
            log,
            logging.WARNING,
            "KeyboardInterrupt: shutting down gracefully (within %gs; interrupt again to force it)",
            self.config.kernel.shutdown_grace,
        )

    @property
    def phase(self) -> KernelPhase:
        """Where the kernel is in its lifecycle (running, draining, stopping, stopped)."""
        return self._router.phase

    @trio.lowlevel.enable_ki_protection
    async def shutdown(self, grace: float | None = None) -> None:
        """Shut down gracefully; idempotent, and safe to call from inside an agent's task.

        A call while a shutdown is under way waits for that one (from inside the tree:
        returns at once); a ``grace`` it gives that ends sooner than the drain under way
        brings the drain's end forward (never later).

        1. refuse new sends and spawns from outside (``KernelShuttingDown``);
        2. let agents drain their mailboxes for up to ``grace`` seconds (default
           ``shutdown_grace``); messages agents send to each other are still accepted;
        3. then nothing more is handled: handlers still running are cancelled (unless
           the agent has a ``shutdown_timeout`` of its own), and the supervision tree is
           stopped children before parents, reverse start order, each within its
           ``shutdown_timeout``; ``on_stop`` runs;
        4. dead-letter every message still undelivered (reason ``shutdown``), fail
           pending requests, end the dead-letter and event streams.

        The shutdown itself is shielded from outside cancellation; it is bounded by the
        grace period and the shutdown timeouts. ``grace`` is a number of seconds >= 0
        (``math.inf``: as long as the drain takes); anything else raises ``TypeError`` or
        ``ValueError`` naming it, and the kernel goes on running.

        Called from inside the supervision tree (a handler, ``on_start``, ``on_stop``, a
        task an agent started), it cannot wait for the stop of the tree it runs in: as
        OTP's ``init:stop()``, it starts the shutdown (sends from outside are refused from
        this call on) and returns at once; the caller's message is then handled as part
        of the drain. A send from outside waiting for room in a full mailbox when the
        shutdown starts is refused then (``KernelShuttingDown``).

        Once the kernel has stopped, the ``open_kernel`` block is cancelled and
        ``open_kernel`` returns as for a block that ended, unless code in the block (its
        own task, or a task in a nursery it opened) called ``shutdown()``, also to wait
        for one under way: that call returns once the kernel has stopped and its caller
        goes on, so the block is not cancelled. A shutdown asked from inside the tree or
        from a task beside the block (in a nursery around ``open_kernel``) ends the
        block; the caller beside is not cancelled (it is not in the block).
        """
        if grace is not None:
            # Checked before anything starts: a shutdown that failed halfway would leave
            # the kernel draining with nobody to finish it.
            grace = checked_seconds(grace, "shutdown grace", zero=True)
        router = self._router
        in_tree = self._in_tree()
        if not in_tree and self._in_block():
            self._asked_in_block = True
        if router.phase is not KernelPhase.RUNNING:
            if grace is not None:
                # A shutdown is under way (another task's, a handler's): the drain ends
                # at the earliest deadline asked for (a block cancelled from outside asks
                # for none: it is left promptly whoever started the shutdown).
                self._end_grace_by(trio.current_time() + grace)
            if in_tree:
                await trio.lowlevel.checkpoint()
            else:
                await self._shutdown_finished.wait()
            return
        router.phase = KernelPhase.DRAINING
        router.refuse_outside_waits()
        self._shutdown_started.set()
        if grace is None:
            grace = self.config.kernel.shutdown_grace
        self._host.end_grace_by(trio.current_time() + grace)
        if in_tree:
            assert self._nursery is not None
            self._nursery.start_soon(self._shut_down)
            await trio.lowlevel.checkpoint()
            return
        await self._shut_down()

    def _end_grace_by(self, deadline: float) -> None:
        """Bring the grace period's deadline forward to ``deadline`` (never later): the
        drain's end, and that of every stop under way that the grace bounds."""
        if deadline < self._host.grace_deadline:
            self._host.end_grace_by(deadline)
            if self._drain_scope is not None:
                self._drain_scope.deadline = deadline

    def _in_tree(self) -> bool:
        """True if the current task runs in the supervision tree (under the root's task).

        A walk up the task tree, only when ``shutdown`` is called: nothing per message.
        """
        root_task = self._root_task
        if root_task is None:
            return False
        task: trio.lowlevel.Task | None = trio.lowlevel.current_task()
        while task is not None:
            if task is root_task:
                return True
            nursery = task.parent_nursery
            task = nursery.parent_task if nursery is not None else None
        return False

    def _in_block(self) -> bool:
        """True if the current task runs in the ``open_kernel`` block: the block's own
        task, or a task in a nursery the block opened (cancelling the block cancels it).
        A task beside the block (in a nursery around ``open_kernel``, or elsewhere) is not.

        Trio's public task tree tells them apart: a nursery the block's task opened after
        the kernel's nursery (``Task.child_nurseries`` lists outer nurseries before inner
        ones) is inside the block. A walk up the task tree when ``shutdown`` is called
        from outside the supervision tree, nothing per message.
        """
        block = self._block_task
        own = self._nursery
        if block is None or own is None:
            return True  # (no block to cancel)
        task: trio.lowlevel.Task = trio.lowlevel.current_task()
        while task is not block:
            nursery = task.parent_nursery
            if nursery is None:
                return False
            if nursery.parent_task is block:
                opened = block.child_nurseries
                if own not in opened:
                    return True  # (``open_kernel`` has returned: no block to cancel)
                # (the kernel's own nursery, where its tasks run, is not the block's)
                return nursery in opened and opened.index(nursery) > opened.index(own)
            task = nursery.parent_task
        return True

    @trio.lowlevel.enable_ki_protection
    async def _shut_down(self) -> None:
        """Steps 2 to 4 of :meth:`shutdown` (the phase is ``DRAINING`` already, the
        grace's deadline set)."""
        router = self._router
        with trio.CancelScope(shield=True):
            with trio.move_on_at(self._host.grace_deadline) as self._drain_scope:
                await router.wait_drained()
            self._drain_scope = None
            router.phase = KernelPhase.STOPPING
            # The grace is over (also when the drain ended sooner): so are the stops
            # under way that it bounds.
            self._host.end_grace_by(trio.current_time())
            for node in list(router.nodes.values()):
                if isinstance(node, AgentCell) and node.running:
                    node.hold()
            self._root.request_stop()
            await self._root_done.wait()
            self._root.retire_all("shutdown")
            router.fail_all_pending(lambda: _closed_on(router))
            self._ledger.finish_streams()
            self._host.heap.close()
            router.phase = KernelPhase.STOPPED
        self._shutdown_finished.set()
        if not self._asked_in_block:
            # Asked by an agent, or by a task beside the block, and by no code in the
            # block: the kernel is over, and so is the block, which nothing may end
            # otherwise (``sleep_forever``). Cancelled only now, so that what it awaits
            # of the kernel ends first (a request gets its answer or its error, a stream
            # its last items: see Subscription). A caller in the block waits for this
            # shutdown and goes on: the block is its to end.
            self._body_scope.cancel()

    @property
    def shutting_down(self) -> bool:
        """True from the moment :meth:`shutdown` starts (sends from outside are refused)."""
        return self._router.phase is not KernelPhase.RUNNING

    @property
    def stopping(self) -> bool:
        """True once the drain is over and the supervision tree is being stopped."""
        return self._router.phase >= KernelPhase.STOPPING

    @property
    def stopped(self) -> bool:
        """True once shutdown has finished: nothing is in flight any more."""
        return self._shutdown_finished.is_set()

    async def wait_shutting_down(self) -> None:
        """Return once a shutdown has started (at once if one has), whoever asked for
        it: an agent, the block, a task beside it, a cancelled block or an escalation.

        The waiter wakes before any agent has stopped for it: ``stats()`` then still
        shows the agents that ran (``nexus run`` takes its summary's ``agents`` there).
        Waiting starts and stops nothing (cancel the wait to give up)."""
        await self._shutdown_started.wait()

    # --- spawning -----------------------------------------------------------------------------

    # (two signatures, one per kind of target, so that a type checker flags an unknown
    # keyword, which the implementation takes to name the option meant)
    @overload
    def spawn(
        self,
        target: Supervisor,
        *,
        name: str | None = None,
        supervisor: AgentRef | Address | None = None,
    ) -> AgentRef: ...
    @overload
    def spawn(
        self,
        target: AgentSpec | Handler | type[Any],
        *,
        name: str | None = None,
        supervisor: AgentRef | Address | None = None,
    ) -> AgentRef: ...
    @trio.lowlevel.enable_ki_protection
    def spawn(
        self,
        target: AgentSpec | Supervisor | Handler | type[Any],
        *,
        name: str | None = None,
        supervisor: AgentRef | Address | None = None,
        **unknown: Any,
    ) -> AgentRef:
        """Start an agent (or a supervisor) and return its address.

        ``name`` overrides the spec's name; names are unique (:class:`NameTaken`; a
        supervisor's tree is spawned whole or not at all). Without ``supervisor`` (the
        address of a spawned supervisor: its ref, id or name) the child goes under the
        kernel's root supervisor; a supervisor on its way out (``stop`` stops it, the
        agent that spawned it stops, it gave up and stops its children), or one under
        it, takes no new child (:class:`AgentNotFound`, saying it is being stopped and
        why; :class:`KernelShuttingDown` as the root gives up to the kernel).
        Messages sent right after spawning are queued and handled after ``on_start``.
        An agent's own options (``mailbox_capacity``, ...) go on its spec:
        ``kernel.spawn(agent(handler, mailbox_capacity=...))``.
        """
        if unknown:
            raise unknown_options("kernel.spawn()", unknown, _SPAWN_OPTIONS)
        if get_ident() != self._router.thread:
            raise wrong_thread("kernel.spawn")
        if self._router.phase is not _RUNNING:
            raise KernelShuttingDown("spawn", self._router.phase.name.lower())
        if self._nursery is None:
            # built directly: nothing would run its agents, nor time its requests out
            raise RuntimeError(
                "this Kernel is not running: get one from 'async with open_kernel() as kernel:'"
            )
        owner = self._root
        if supervisor is not None:
            owner = self._supervisor_at(supervisor)
        elif owner.closing:
            # (supervision escalated to the kernel: its shutdown is to come)
            raise KernelShuttingDown("spawn")
        child = self._build(target, name)
        owner.add(child)
        return AgentRef(child.id, child.name)

    def _supervisor_at(self, supervisor: AgentRef | Address) -> SupervisorNode:
        """The live supervisor that ``spawn(..., supervisor=)`` names, or an error that
        says what the address is instead."""
        address = address_of(supervisor)
        node = self._router.find(address)
        if node is None or node.retired:
            self._router.check_address(address)
            raise AgentNotFound(
                address, self._router.names, detail=self._router.why_no_agent(address)
            )
        if not isinstance(node, SupervisorNode):
            shown = repr(supervisor) if isinstance(supervisor, str) else str(supervisor)
            raise ValueError(
                f"supervisor={shown} is an agent, not a supervisor: spawn(..., supervisor=)"
                " takes the address of a spawned Supervisor"
            )
        # One on its way out (being stopped for good, or stopping its children after it
        # gave up), or one under it, would never start the child: it is refused, as a
        # send to an agent being stopped is (a walk up the tree, on this path only).
        above: ChildOwner | None = node
        while isinstance(above, SupervisorNode):
            if above.closing:
                raise self._refused_under(address, node, above)
            above = above.supervisor
        return node

    def _refused_under(
        self, address: Address, node: SupervisorNode, closing: SupervisorNode
    ) -> Exception:
        """Why a spawn under ``node`` is refused: ``closing`` (it, or one above it) is on
        its way out. The topmost such supervisor is named, the one whose stop, give-up
        or restart stops the others (on the refusing path only)."""
        above = closing.supervisor
        while isinstance(above, SupervisorNode):
            if above.closing:
                closing = above
            above = above.supervisor
        if closing is self._root:
            # (supervision escalated to the kernel: its shutdown is to come)
            return KernelShuttingDown("spawn")
        whose = "" if closing is node else f" with {closing.label!r}, a supervisor above it"
        if closing.between_runs:
            # (OTP's start_child to a supervisor that is down: noproc)
            why = (
                f"it is down{whose} (its run is over: {closing.closing}; it waits for its"
                " supervisor's decision): a supervisor between runs takes no new children"
            )
        else:
            why = (
                f"it is being stopped{whose} ({closing.closing}): a supervisor on its way"
                " out takes no new children"
            )
        return AgentNotFound(address, self._router.names, detail=why)

    def _spawn_linked(self, target: Any, name: str | None, parent: Child) -> AgentRef:
        """``ctx.spawn``: a sibling of ``parent`` that stops before it, and with its run."""
        if self._router.phase >= KernelPhase.STOPPING:
            raise KernelShuttingDown("spawn", self._router.phase.name.lower())
        owner = parent.supervisor
        if parent.retired or not isinstance(owner, SupervisorNode):
            # a context kept past its agent's stop (the kernel runs on): say so
            raise AgentNotRunning(
                parent.id,
                parent.name,
                "has stopped: ctx.spawn refused (a linked child needs a running parent)",
            )
        child = self._build(target, name)
        child.linked_parent = parent
        parent.add_linked(child)
        owner.add(child)
        return AgentRef(child.id, child.name)

    def _build(self, target: Any, name: str | None) -> Child:
        if isinstance(target, Supervisor):
            # A supervisor's tree is registered whole or not at all: a name taken further
            # down (NameTaken) must not leave the nodes before it registered outside the
            # tree, holding their names and taking messages that nothing would handle.
            built: list[Child] = []
            try:
                sup = self._build_tree(target, name, built)
            except BaseException as exc:
                for node in reversed(built):
                    self._router.forget(node)
                if isinstance(exc, NameTaken) and any(n.id == exc.holder for n in built):
                    # its holder was one of this tree's, now forgotten: name no agent
                    # that never existed, say the tree gives the name twice
                    tree = built[0].name or str(built[0].id)
                    raise NameTaken(exc.name, exc.holder, tree=tree) from None
                raise
            for node in built:
                self._ledger.event(EventKind.SPAWNED, node.id, node.name)
                self._host.heap.created()
            return sup
        cell = self._new_cell(target, name)
        self._register(cell, agent=True)
        return cell

    def _build_tree(self, target: Supervisor, name: str | None, built: list[Child]) -> Child:
        """A supervisor and its children, registered (no event yet) and listed in ``built``."""
        if name is not None:
            check_agent_name(name)
        sup = SupervisorNode(self._host, target, name or target.name)
        self._router.register(sup, agent=False)
        built.append(sup)
        for child_target in target.children:
            if isinstance(child_target, Supervisor):
                child = self._build_tree(child_target, None, built)
            else:
                child = self._new_cell(child_target, None)
                self._router.register(child, agent=True)
                built.append(child)
            sup.add(child)
        return sup

    def _new_cell(self, target: Any, name: str | None) -> AgentCell:
        """An agent's cell, not registered yet."""
        spec = as_spec(target)
        if name is not None:
            spec = spec.with_options(name=name)
        return AgentCell(
            spec,
            new_id(),
            spec.name,
            high_water=self._ledger.high_water,
            defaults=self._cell_defaults,
        )

    def _context_for(self, cell: AgentCell) -> Context:
        return Context(self._context_common, cell, self._router)

    def _register(self, node: Child, *, agent: bool) -> None:
        self._router.register(node, agent=agent)
        self._ledger.event(EventKind.SPAWNED, node.id, node.name)
        self._host.heap.created()

    def spawn_process(
        self, cmd: Any, *, supervisor: AgentRef | Address | None = None, **options: Any
    ) -> AgentRef:
        """Deprecated: use ``kernel.spawn(nexus_trio.bridges.process_agent(cmd, ...))``.

        Kept as a thin alias so that programs written against 0.1 keep working; the
        bridge is imported on use, so the core does not depend on it.
        """
        import warnings

        warnings.warn(
            "Kernel.spawn_process is deprecated; use "
            "kernel.spawn(nexus_trio.bridges.process_agent(cmd, ...))",
            DeprecationWarning,
            stacklevel=2,
        )
        from .bridges.process import process_agent

        return self.spawn(process_agent(cmd, **options), supervisor=supervisor)

    def lookup(self, name: str) -> AgentRef:
        """The address of the live agent or supervisor called ``name``."""
        if not isinstance(name, str):
            raise TypeError(
                f"lookup() takes an agent name (str), got {type(name).__name__} {brief(name, 60)}"
            )
        names = self._router.names
        node = names.get(name)
        if node is None:
            raise AgentNotFound(name, names, detail=self._router.why_no_agent(name))
        return AgentRef(node.id, node.name)

    def agents(self) -> list[AgentRef]:
        """Addresses of the live agents, in spawn order."""
        return [AgentRef(n.id, n.name) for n in self._router.nodes.values() if n.is_agent]

    # --- stopping one agent ---------------------------------------------------------------------

    @trio.lowlevel.enable_ki_protection
    async def stop(
        self, target: AgentRef | Address, *, drain: bool = False, reason: str = "stopped"
    ) -> None:
        """Stop an agent (or supervisor) for good, whatever its restart type.

        New sends to it fail with :class:`AgentNotFound` at once. The message being
        handled is finished (within the agent's ``shutdown_timeout``, then cancelled);
        with ``drain=True`` the messages already queued are handled first, otherwise
        they are dead-lettered (``agent_stopped``, their detail naming ``reason``); a
        stop without drain while a draining one is under way cuts it short, and a
        draining stop after one without drain does not bring the queue back.
        ``on_stop`` runs. Agents it spawned stop before it. ``reason`` is also the
        ``stopped`` event's. Returns when it has stopped for good — also when something
        else (a stop of its supervisor, the kernel's shutdown) stopped it meanwhile.
        Called from inside what it stops (a handler of the agent itself, the ``on_stop``
        of an agent it spawned, an agent under the supervisor stopped), whose stop would
        wait for the caller: the stop starts and the call returns at once.
        ``TypeError`` for what is no address, a ``drain`` that is not a bool or a
        ``reason`` that is not a string.
        """
        if drain is not True and drain is not False:
            raise TypeError(f"drain must be True or False, got {brief(drain, 60)}")
        if not isinstance(reason, str):
            raise TypeError(
                f"stop reason must be a string, got {type(reason).__name__} {brief(reason, 60)}"
            )
        address = address_of(target)
        node = self._router.find(address)
        if node is None or node.retired:
            self._router.check_address(address)
            raise AgentNotFound(
                address, self._router.names, detail=self._router.why_no_agent(address)
            )
        if node is self._root:
            raise ValueError("the root supervisor is stopped by shutdown(), not stop()")
        if drain and node.stopped_plainly:
            # A stop without drain came first: it stands (what is queued is not handled),
            # as Akka's PoisonPill behind ``context.stop``, and its letters say so.
            drain = False
        if not drain:
            if node.drain_on_stop:
                # A stop without drain cuts a draining stop under way short, the drain of
                # the agents it spawned (a pool's workers), or of a supervisor's children.
                node.cut_drain()
            node.stopped_plainly = True
        # (a supervisor's draining stop drains its children, all at once: see _stop_all)
        node.drain_on_stop = drain
        self._router.unroute(node)
        if isinstance(node, SupervisorNode):
            node.close_for_good("kernel.stop")
        owner = node.supervisor
        assert owner is not None
        # (a transport that keeps records of this kernel's agents drops the agent's first:
        # see StopsTold)
        stopping = getattr(self._router.transport, "agent_stopping", None)
        if self._stop_waits_for_caller(node):
            # Called from inside what it stops (the handler of its own agent, the
            # on_stop of an agent it spawned, an agent under the supervisor stopped):
            # that stop waits for the caller, which would wait for it until the
            # shutdown timeout cancels the caller. As shutdown() from inside the tree
            # (and Akka's context.stop(self)): the stop starts, the call returns.
            assert self._nursery is not None
            self._nursery.start_soon(self._terminate, owner, node, reason, stopping)
            await trio.lowlevel.checkpoint()
            return
        if stopping is None:
            await owner.terminate(node, reason)
        else:
            await self._terminate(owner, node, reason, stopping)

    @staticmethod
    @trio.lowlevel.enable_ki_protection
    async def _terminate(
        owner: ChildOwner,
        node: Child,
        reason: str,
        stopping: Callable[[uuid.UUID, str | None], Awaitable[None]] | None,
    ) -> None:
        """A stop told to the transport first (see StopsTold), and a stop asked from
        inside what it stops, in the kernel's nursery (protected from Ctrl-C as the
        kernel's own code is). The transport's call is shielded from the caller's cancel
        (the agent is unrouted already: a caller that gives up there, a ``move_on_after``
        around ``kernel.stop`` or a shutdown starting, must not leave the transport's
        work half done), bounded by the agent's ``shutdown_timeout`` (a transport that
        does not return held the caller, and the stop, for as long: then cancelled,
        said), and the stop is carried out whatever it ended with: a transport that
        raised left the agent running out of the routing table, never stopped (its
        error reaches the caller once the stop began)."""
        try:
            if stopping is not None:
                with node.shutdown_scope() as told:
                    await stopping(node.id, node.name)
                if told.cancelled_caught:
                    log_guarded(
                        log,
                        logging.WARNING,
                        "stop of %s: the transport's agent_stopping did not return within"
                        " its shutdown_timeout (%gs): cancelled; the stop goes on",
                        node.label,
                        node.shutdown_timeout,
                    )
        finally:
            # (its first step, before any checkpoint, commits the stop)
            await owner.terminate(node, reason)

    def _stop_waits_for_caller(self, node: Child) -> bool:
        """Whether the stop of ``node`` waits for the current task: it runs in the run of
        ``node`` or of an agent ``node`` spawned (which stops first), at any depth; the
        run of a supervisor is the task its children's runs descend from. A walk up the
        task tree and down what ``node`` spawned, when ``stop`` is called from inside
        the tree: nothing per message or per run, nothing per child of a supervisor."""
        if not self._in_tree():
            return False
        tasks: set[trio.lowlevel.Task] = set()
        task: trio.lowlevel.Task | None = trio.lowlevel.current_task()
        while task is not None:
            tasks.add(task)
            nursery = task.parent_nursery
            task = nursery.parent_task if nursery is not None else None
        stack: list[Child] = [node]
        while stack:
            child = stack.pop()
            if child.run_task is not None and child.run_task in tasks:
                return True
            # (a supervisor spawns none, and what an agent spawned runs under the
            # agent's own supervisor: a supervisor's run covers its whole subtree)
            stack.extend(child.linked_children)
        return False

    async def wait_stopped(self, target: AgentRef | Address) -> None:
        """Return once ``target`` (an agent or supervisor) is stopped for good, whoever
        stops it (``stop``, its supervisor, a restart type that ends it, shutdown), also
        one that never started; at once if there is none (never was, or stopped for good
        already). A restart is not a stop. Waiting stops nothing: cancel the wait to give
        up on it. An id names one agent for good; a name, the agent that holds it now.
        ``TypeError`` for what is no address (``None``, ``5``), which no agent ever had.
        """
        address = address_of(target)
        node = self._router.find(address)
        if node is None:
            self._router.check_address(address)
            await trio.lowlevel.checkpoint()
            return
        await node.wait_retired()

    # --- sending ------------------------------------------------------------------------------------

    @trio.lowlevel.enable_ki_protection
    async def send(
        self,
        to: AgentRef | Address | Message,
        payload: Any = None,
        kind: MessageKind = MessageKind.COMMAND,
        sender: uuid.UUID = SYSTEM_ID,
        trace_id: uuid.UUID | None = None,
    ) -> Message:
        """Send a message (tell) and return it.

        * unknown recipient: :class:`AgentNotFound` at once;
        * room in the mailbox: enqueued without yielding; a caller whose scope is
          cancelled gets ``Cancelled`` at the latest on its sixteenth send (checking on
          every send would cost more than the send itself), and never after a wait;
        * full: per the recipient's overflow policy; under ``block`` wait up to
          ``send_timeout`` for room (in Trio's FIFO of blocked senders), then
          :class:`MailboxFull` (not enqueued);
        * kernel shutting down: :class:`KernelShuttingDown`.

        ``kind``, ``sender`` and ``trace_id`` are taken by keyword or by position (as by
        :meth:`send_nowait`): CPython 3.11 does not specialize a call of a function with
        keyword-only parameters, and that cost every ``send`` 4% of its time.
        """
        address: Address | None
        if kind is not _COMMAND and kind.__class__ is not MessageKind:
            raise kind_error(kind)
        # A ref first: the common case takes one type test, not two.
        if type(to) is AgentRef:
            address = to.id
            # new_message, not Message(...): see new_message.
            msg = new_message(sender, address, payload, kind, trace_id)
        elif type(to) is Message:
            msg = to
            address = msg.to if msg.reply_to is None else None
        else:
            address = to
            msg = new_message(sender, address, payload, kind, trace_id)
        fast = self._router.fast(msg, address, True)
        if fast is not None:
            # (the rest, a transport's asking to yield once included: Router.send)
            await self._router.send(msg, fast, True)
        return msg

    @trio.lowlevel.enable_ki_protection
    def send_nowait(
        self,
        to: AgentRef | Address | Message,
        payload: Any = None,
        kind: MessageKind = MessageKind.COMMAND,
        sender: uuid.UUID = SYSTEM_ID,
        trace_id: uuid.UUID | None = None,
    ) -> Message:
        """Like :meth:`send` but never waits: a full mailbox raises :class:`MailboxFull` at once
        (``drop_newest``/``drop_oldest`` policies still accept and dead-letter)."""
        if kind is not _COMMAND and kind.__class__ is not MessageKind:
            raise kind_error(kind)
        if type(to) is Message:
            msg = to
        else:
            to = to.id if type(to) is AgentRef else to
            msg = new_message(sender, to, payload, kind, trace_id)
        if get_ident() != self._router.thread:
            raise wrong_thread("kernel.send_nowait")
        self._router.send_nowait(msg, external=True)
        return msg

    @trio.lowlevel.enable_ki_protection
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
        or skips the query in the mailbox if it was not started (dead letter
        ``request_timeout``). :class:`RequestFailed` if the query was dead-lettered
        (e.g. its handler raised), :class:`AgentNotFound` / :class:`MailboxFull` /
        :class:`KernelShuttingDown` as for :meth:`send`.
        """
        address = to.id if type(to) is AgentRef else to  # address_of, without the call
        query = new_query(sender, address, payload, trace_id)
        return await self._router.request(query, self._request_timeout(timeout), external=True)

    def _request_timeout(self, timeout: float | None) -> float:
        if timeout is None:  # (the common case, on the request path: no call)
            return self.config.kernel.request_timeout
        return checked_seconds(timeout, "request timeout")

    # --- remote kernels ------------------------------------------------------------------------

    def attach_transport(self, transport: Transport) -> TransportHandle:
        """Route messages for non-local addresses through ``transport`` (one per kernel).

        Returns the transport's handle into the kernel: ``handle.deliver(msg)`` for
        messages from remote kernels, ``handle.fail_request(id, error)``,
        ``handle.detach()``.
        """
        if get_ident() != self._router.thread:
            raise wrong_thread("kernel.attach_transport")
        if self._router.transport is not None:
            raise RuntimeError("a transport is already attached to this kernel")
        self._let_go_of_left()
        self._router.use_transport(transport)
        self._router.left = None
        return TransportHandle(self._router, transport)

    def detach_transport(
        self,
        left: Callable[[Message], str | None] | None = None,
        *,
        at_close: Callable[[], None] | None = None,
    ) -> None:
        """Route nothing through the transport any more: a message to an address not
        local raises ``AgentNotFound`` (a handler's is dead-lettered ``no_such_agent``).

        ``left`` (for a transport that leaves a cluster while the kernel runs on): asked
        about each tell to an address not local, a text if the address was on another
        node of that cluster, None if not. Such a tell is not raised to its sender, as an
        Erlang send to a node no longer connected is not: it is accepted and
        dead-lettered ``transport_unavailable`` with that text as its detail (a tell to
        another node is at most once; ``left`` counts it). Kept until the next
        :meth:`attach_transport`. A request to such an address raises
        ``TransportUnavailable`` with that text (``left`` is asked about it too, the
        message a query).

        ``at_close`` is called once when ``left`` is let go: as the kernel closes (after
        its shutdown: no tell comes after it) or at the next :meth:`attach_transport` or
        ``detach_transport``; for the transport to say what its throttled lines about
        those tells held back. An error it raises is logged, not raised."""
        if get_ident() != self._router.thread:
            raise wrong_thread("kernel.detach_transport")
        self._let_go_of_left()
        self._router.use_transport(None)
        self._router.left = left
        self._router.left_at_close = at_close

    def _let_go_of_left(self) -> None:
        """Call the ``at_close`` of the last :meth:`detach_transport`, once."""
        at_close, self._router.left_at_close = self._router.left_at_close, None
        if at_close is not None:
            try:
                at_close()
            except Exception as exc:
                log_guarded(
                    log, logging.ERROR, "a detached transport's at_close raised", exc_info=exc
                )

    def is_local(self, address: AgentRef | Address) -> bool:
        """True if ``address`` names an agent of this kernel; ``TypeError`` for what is no
        address (``None``, ``5``), as from every other call taking one (checked only
        where no agent is found)."""
        address = address_of(address)
        if self._router.local(address) is not None:
            return True
        self._router.check_address(address)
        return False

    async def deliver_from_remote(self, msg: Message) -> None:
        """Deliver a message that a transport received from a remote kernel.

        Prefer the :class:`TransportHandle` returned by :meth:`attach_transport`.
        """
        await self._router.deliver_from_remote(msg)

    def fail_request(self, request_id: uuid.UUID, error: BaseException) -> bool:
        """Fail a pending :meth:`request` with ``error`` (prefer the transport handle)."""
        if get_ident() != self._router.thread:
            raise wrong_thread("kernel.fail_request")
        return self._router.fail_request(request_id, error)

    def fail_query(self, query_id: uuid.UUID, error: RequestFailed) -> None:
        """Fail the requester of query ``query_id`` with ``error``, wherever it waits: for
        an agent that took a Query over (its handler returned, the answer to come later
        in a message of its own, as a pool's ``$resize`` does) and finds it cannot answer.

        A requester on this kernel gets ``error`` raised by its request; one on another
        kernel gets it through the transport's ``query_failed`` (:class:`QueryFailing`,
        optional for a transport), as when a query is dead-lettered. Nothing is counted
        (the query was handled) and nothing happens if no one waits any more; an answer
        that comes anyway is a late reply."""
        if get_ident() != self._router.thread:
            raise wrong_thread("kernel.fail_query")
        self._router.fail_query(query_id, error)

    def report_event(self, event: LifecycleEvent) -> None:
        """Publish an event that happened outside the supervision tree on ``events()``
        (for transports and bridges: e.g. ``unreachable`` for a remote node)."""
        if get_ident() != self._router.thread:
            raise wrong_thread("kernel.report_event")
        if not isinstance(event, LifecycleEvent):
            # (else every events() reader got it, and failed on it far from here)
            raise TypeError(
                "kernel.report_event() takes a nexus_trio.LifecycleEvent, got"
                f" {type(event).__name__} {brief(event, 60)}"
            )
        self._ledger.publish_event(event)

    # --- observability -----------------------------------------------------------------------------

    def dead_letters(self, buffer: int = 1024) -> Subscription[DeadLetter]:
        """Subscribe to dead letters from now on.

        ``async with kernel.dead_letters() as stream: async for letter in stream: ...``.
        The subscription buffers ``buffer`` letters; past that, newer letters are
        dropped for this subscriber and counted (``stream.dropped`` and
        ``stats().dead_letter_stream_dropped``). The stream ends at shutdown.
        """
        return self._ledger.dead_letters(buffer)

    def recent_dead_letters(self) -> list[DeadLetter]:
        """The last ``dead_letter_buffer`` dead letters, oldest first (kept without subscribers)."""
        return self._ledger.recent_dead_letters()

    def events(self, buffer: int = 1024) -> Subscription[LifecycleEvent]:
        """Subscribe to lifecycle events (spawned, started, failed, restarted, stopped,
        escalated); bounded like :meth:`dead_letters`, what a subscriber misses counted in
        ``stream.dropped`` and ``stats().event_stream_dropped``."""
        return self._ledger.events(buffer)

    def mailbox_statistics(self, target: AgentRef | Address) -> MailboxStatistics:
        """Depth, capacity, high water and waiting producers of one agent's mailbox (O(1))."""
        return self._mailbox_of(target).statistics()

    def mailbox_depth(self, target: AgentRef | Address) -> int:
        """Messages queued for one agent now: ``mailbox_statistics(target).depth`` without
        the snapshot (O(1); for routers that compare many mailboxes per message)."""
        return self._mailbox_of(target).depth

    def _mailbox_of(self, target: AgentRef | Address) -> Mailbox:
        address = address_of(target)
        node = self._router.find(address)
        if not isinstance(node, AgentCell):
            router = self._router
            router.check_address(address)
            raise AgentNotFound(address, router.routes, detail=router.why_no_agent(address))
        return node.mailbox

    def stats(self, *, agents: bool = False) -> KernelStats:
        """A frozen snapshot of the kernel's counters, in O(1).

        ``agents=True`` adds one :class:`AgentStats` per live agent (O(agents), in one go:
        about 2 us per agent, 0.2 s at 100,000 agents during which no agent runs; see
        :meth:`scan_agents` for a walk a slice at a time).
        """
        ledger = self._ledger
        per_agent: tuple[AgentStats, ...] = ()
        if agents:
            per_agent = tuple(
                _agent_stats(c) for c in self._router.nodes.values() if isinstance(c, AgentCell)
            )
        return KernelStats(
            agents_alive=ledger.agents_alive,
            accepted=ledger.accepted,
            handled=ledger.handled,
            replies_delivered=ledger.replies,
            failed=ledger.failed,
            timed_out=ledger.timed_out,
            dead_lettered=ledger.dead,
            dead_letters_by_reason=dict(ledger.dead_by_reason),
            dead_letter_stream_dropped=ledger.dead_letter_stream_dropped,
            rejected=dict(ledger.rejected),
            forwarded=ledger.forwarded,
            in_flight=ledger.in_flight,
            restarts=ledger.restarts,
            max_mailbox_depth=ledger.high_water.value,
            handle_latency=ledger.handle_latency.snapshot(),
            queue_wait=ledger.queue_wait.snapshot(),
            agents=per_agent,
            given_up=ledger.given_up,
            run_failures=ledger.run_failures,
            event_stream_dropped=ledger.event_stream_dropped,
            sends_waiting=ledger.sends_waiting,
            dead_letter_lines_not_logged=ledger.dead_letter_lines.not_logged,
            failure_lines_not_logged=ledger.failure_lines.not_logged,
            tells_after_detach=ledger.tells_after_detach,
            requests_after_detach=ledger.requests_after_detach,
            failed_handle_latency=ledger.failed_latency.snapshot(),
            timestamps_ahead=ledger.timestamps_ahead,
        )

    def scan_agents(
        self, limit: int, *, visits_per_step: int = 4096, copies_per_step: int = 512
    ) -> AgentScan:
        """Start a walk over the live agents that keeps the ``limit`` with the deepest
        mailboxes (ties: the earliest spawned), to be done a bounded step at a time.

        What ``nexus_trio.metrics`` does for a scrape with per-agent series: unlike
        ``stats(agents=True)``, which copies every agent's counters in one go (about 2 us
        per agent), each :meth:`AgentScan.step` reads the mailbox depth of at most
        ``visits_per_step`` agents (about 0.3 us each) or copies into
        :class:`AgentStats` the counters of at most ``copies_per_step`` of the chosen
        ones, so a Trio task that checkpoints between steps lets the agents run
        meanwhile::

            scan = kernel.scan_agents(100)
            while scan.step():
                await trio.lowlevel.checkpoint()
            deepest = scan.chosen  # AgentStats, the deepest mailbox first

        This call copies nothing (it is O(1) whatever the number of agents): the steps
        follow the kernel's own list of the live agents, in spawn order, from where the
        last one stopped. Nothing is added to the message paths (a spawn and a stop link
        and unlink their agent). See :class:`AgentScan` for what a walk across
        checkpoints sees. All three arguments are integers >= 1.
        """
        for name, value in (
            ("limit", limit),
            ("visits_per_step", visits_per_step),
            ("copies_per_step", copies_per_step),
        ):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an integer, got {brief(value, 80)}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {brief(value, 80)}")
        if get_ident() != self._router.thread:
            raise wrong_thread("kernel.scan_agents")
        return AgentScan(
            self._router.walk_agents(),
            limit,
            visits_per_step=visits_per_step,
            copies_per_step=copies_per_step,
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
                entry["mailbox_depth"] = child.mailbox.depth
                entry["senders_waiting"] = child.mailbox.senders_waiting()
                entry["mailbox_capacity"] = child.mailbox.capacity
                entry["handling"] = str(child.current.id) if child.current is not None else None
            return entry

        return node(self._root)


def _agent_stats(c: AgentCell) -> AgentStats:
    """The counters of one agent, copied now."""
    mailbox = c.mailbox
    return AgentStats(
        id=c.id,
        name=c.name,
        state=c.state(),
        received=c.received,
        handled=c.handled,
        failed=c.failed,
        timed_out=c.timed_out,
        dead_lettered=c.dead_lettered,
        restarts=c.restarts,
        mailbox_depth=mailbox.depth,
        mailbox_high_water=mailbox.high_water,
        mailbox_capacity=mailbox.capacity,
        run_failures=c.run_failures,
    )


@final
class AgentScan:
    """A walk over a kernel's live agents that keeps the ``limit`` with the deepest
    mailboxes, a bounded step at a time; from :meth:`Kernel.scan_agents`.

    Each :meth:`step` first visits the next ``visits_per_step`` agents in spawn order (a
    mailbox depth read for each, the deepest kept in a heap of at most ``limit``); once
    all are visited, it copies the counters of the next ``copies_per_step`` chosen agents
    into :class:`AgentStats`, deepest first (the step that ends the visits starts the
    copies). It returns ``True`` while work remains. A kernel with at most
    ``visits_per_step`` agents and ``copies_per_step`` chosen is thus scanned in one
    step, at one moment.
    ``visited`` counts the agents visited so far, ``left_out`` (once all are visited)
    those visited and not chosen.

    Taken across steps between which the agents run, the result is not the state of one
    moment (as with the collectors of the Prometheus client libraries, whose values are
    read one after the other):

    * the agents walked are those live when the scan started (no list of them is made:
      the steps follow the kernel's list of live agents): one spawned later is not in
      it; one that stops before its visit is skipped (not counted in ``visited``); one
      chosen that stops before its copy is left out of :attr:`chosen` (which then holds
      fewer than ``limit`` agents);
    * an agent is chosen for its mailbox depth when it was visited, and its
      :class:`AgentStats` are its counters when they were copied (the depth too).

    When no agent spawns, stops or changes depth while the scan runs, :attr:`chosen` is
    ``heapq.nlargest(limit, stats(agents=True).agents, key=depth)``, in its order.
    """

    __slots__ = (
        "_chosen",
        "_copies",
        "_heap",
        "_limit",
        "_order",
        "_visits",
        "_walk",
        "left_out",
        "visited",
    )

    def __init__(
        self, walk: AgentWalk, limit: int, *, visits_per_step: int, copies_per_step: int
    ) -> None:
        #: the live agents when the scan started, in spawn order; None once all visited
        self._walk: AgentWalk | None = walk
        self._limit = limit
        self._visits = visits_per_step
        self._copies = copies_per_step
        #: (depth, -index, cell) of the deepest mailboxes visited, index the visit's
        #: rank (spawn order): a min-heap, the least deep (of those, the latest spawned)
        #: on top
        self._heap: list[tuple[int, int, AgentCell]] = []
        #: the chosen agents left to copy, the next last; None while visiting
        self._order: list[AgentCell] | None = None
        self._chosen: list[AgentStats] = []
        #: live agents visited so far
        self.visited = 0
        #: agents visited and not chosen, for the limit (set once all are visited)
        self.left_out = 0

    @property
    def done(self) -> bool:
        """True once every agent was visited and every chosen one copied."""
        return self._order is not None and not self._order

    @property
    def chosen(self) -> tuple[AgentStats, ...]:
        """The counters of the chosen agents, deepest mailbox first (ties: the earliest
        spawned), once the scan is done."""
        if not self.done:
            raise RuntimeError("the agent scan is not done: call step() until it returns False")
        return tuple(self._chosen)

    def step(self) -> bool:
        """Do the next bounded piece of the scan; ``False`` once it is done."""
        walk = self._walk
        if walk is not None:
            heap = self._heap
            limit = self._limit
            # Below the top of a full heap, a mailbox cannot be chosen (at the same depth
            # it was spawned later): one comparison per agent.
            floor = heap[0][0] if len(heap) == limit else -1
            index = self.visited  # the visit's rank: ties go to the earliest spawned
            for node in walk.take(self._visits):
                if not isinstance(node, AgentCell) or node.retired:
                    continue
                index += 1
                depth = node.mailbox.depth
                if depth > floor:
                    if len(heap) < limit:
                        heappush(heap, (depth, -index, node))
                        if len(heap) == limit:
                            floor = heap[0][0]
                    else:
                        heapreplace(heap, (depth, -index, node))
                        floor = heap[0][0]
            self.visited = index
            if not walk.done:
                return True
            # All visited: the chosen ones, the deepest last (popped first).
            self._walk = None
            self.left_out = self.visited - len(heap)
            heap.sort()
            self._order = [cell for _, _, cell in heap]
            self._heap = []
        order = self._order
        assert order is not None
        chosen = self._chosen
        for _ in range(min(self._copies, len(order))):
            cell = order.pop()
            if not cell.retired:
                chosen.append(_agent_stats(cell))
        return bool(order)


@trio.lowlevel.enable_ki_protection
async def _end_drain_if_cancelled(kernel: Kernel, closed: trio.Event) -> None:
    """Wait for the close of ``open_kernel``'s block (``closed``); if a cancel from outside
    (a cancel scope around the block) comes first, end the drain now: Trio's rule is a
    prompt exit from a cancelled close (the tree still stops in order)."""
    try:
        await closed.wait()
    except trio.Cancelled:
        kernel._end_grace_by(trio.current_time())
        raise


def _closed_on(router: Router) -> KernelShuttingDown:
    """The error of a request still waiting for its answer when the kernel closes: it
    names the phase it is failed in, as every refusal of the shutdown does (``stopping``
    once the tree has stopped; the phase a shutdown cut short was in). Not counted in
    ``rejected``: the query was accepted."""
    phase = router.phase
    if phase is KernelPhase.RUNNING:  # (the tree ended without a shutdown: closed)
        phase = KernelPhase.STOPPED
    return KernelShuttingDown("request", phase.name.lower())


def _going_out(
    body_error: BaseException | None,
    interrupt: BaseException | None,
    escalation: BaseException | None,
) -> BaseException | None:
    """What :func:`open_kernel` raises after its close when nothing else is in flight:
    the block's error, else a Ctrl-C the kernel took, else the root's give-up (a bare
    cancel of the block is not one: a close step's error goes out in its place)."""
    if body_error is not None and not only_cancels(body_error):
        return body_error
    return interrupt if interrupt is not None else escalation


def _is_interrupt(error: BaseException | None) -> bool:
    """A Ctrl-C, also one that reached the block through a nursery of its own (a group)."""
    if isinstance(error, BaseExceptionGroup):
        return error.subgroup(KeyboardInterrupt) is not None
    return isinstance(error, KeyboardInterrupt)


@async_block("open_kernel()", "kernel")
async def open_kernel(
    config: Config | None = None, *, seed: int | None = None
) -> AsyncIterator[Kernel]:
    """Run a kernel for the duration of the ``async with`` block.

    Leaving the block shuts the kernel down gracefully (see :meth:`Kernel.shutdown`),
    also when the block raises; the exception then propagates unchanged. A block
    cancelled from outside leaves promptly, as ``shutdown(grace=0)`` does: no drain (what
    is in hand or queued is dead-lettered ``shutdown``), but the tree still stops in
    order, each ``on_stop`` within its shutdown timeout (the agents run shielded from
    that cancellation), and ``Cancelled`` goes on out of the block. If supervision
    escalates to the kernel (``[supervision] escalate_to_kernel = true``), the block is
    cancelled, the kernel shuts down and :class:`SupervisorEscalation` is raised. A
    shutdown asked by an agent (``ctx.kernel.shutdown()``) or by a task beside the block,
    none called by code in the block, ends the block: it is cancelled once the kernel
    has stopped, and ``open_kernel`` returns.
    ``seed`` makes backoff jitter reproducible.
    """
    if config is not None and not isinstance(config, Config):
        raise TypeError(
            f"open_kernel(config) takes a nexus_trio.Config, got {type(config).__name__}"
            f" {brief(config, 60)}: for a file use nexus_trio.config.load_config(path).config"
        )
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        raise RuntimeError(
            "open_kernel() must run inside trio.run(): nexus_trio runs on Trio, and no Trio"
            " run is active here (call trio.run(main), not asyncio.run(main))"
        ) from None
    kernel = Kernel(config if config is not None else Config(), seed=seed)
    # A program that configured no logging still sees agents' log lines and tracebacks,
    # with times (nothing is installed if the application or its root logger has handlers).
    install_default_logging(kernel.config.logging)
    body_error: BaseException | None = None
    # The tree and the request timer are shielded from a cancellation of the block from
    # outside: that is the block leaving, and the shutdown it starts stops the tree in
    # order (the timer still ends requests meanwhile). The kernel cancels them itself
    # once the shutdown is over, or cut short (a second Ctrl-C).
    tree = trio.CancelScope(shield=True)
    timer = trio.CancelScope(shield=True)
    # (the line of the records not logged in a second: also those of the shutdown)
    unlogged = trio.CancelScope(shield=True)
    #: what the kernel holds to raise (see below) when a cancel from outside came as its
    #: close waited for the drain: that Cancelled was taken in its place
    held_out: BaseException | None = None
    #: what the kernel's nursery raised that goes on out (not taken for ``held_out``)
    raising: BaseException | None = None

    async def run_tree(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with tree:
            await kernel._run_root(task_status=task_status)

    async def request_timer() -> None:
        with timer:
            await kernel._router.run_request_timer()

    async def say_unlogged() -> None:
        with unlogged:
            await kernel._ledger.say_unlogged_when_due()

    try:
        async with trio.open_nursery() as nursery:
            kernel._nursery = nursery
            kernel._block_task = trio.lowlevel.current_task()
            with trio.CancelScope(shield=True):
                # Shielded: in a block already cancelled (a deadline that has passed),
                # Trio's start would leave the tree, shielded itself, under the start
                # and wait for it forever. It starts without a checkpoint; the body's
                # first one then takes the cancellation, and the tree stops as above.
                await nursery.start(run_tree)
            nursery.start_soon(request_timer)
            if kernel._ledger.dead_letter_lines.limit or kernel._ledger.failure_lines.limit:
                nursery.start_soon(say_unlogged)
            try:
                with kernel._body_scope:
                    yield kernel
            except BaseException as exc:
                body_error = exc
            finally:
                # Cancelled from outside (a cancel scope around the block): Trio's rule
                # is a prompt exit, so there is no drain (as ``shutdown(grace=0)``: what
                # is in hand or queued is dead-lettered ``shutdown``), but the tree still
                # stops in order, each ``on_stop`` within its shutdown timeout.
                grace = 0.0 if trio.current_effective_deadline() == -math.inf else None
                if grace is None and _is_interrupt(body_error):
                    kernel._log_interrupt()  # (a Ctrl-C in an agent's code logs it there)
                closed = trio.Event()
                if grace is None:
                    # A cancel from outside that comes while the close waits for a drain
                    # (its own, or one a handler or a task beside the block asked for,
                    # ``shutdown(grace=math.inf)``) ends the drain then, as it would have
                    # had it come before the block ended.
                    nursery.start_soon(_end_drain_if_cancelled, kernel, closed)
                try:
                    # (shielded: a shutdown asked from inside the tree may be under way)
                    with trio.CancelScope(shield=True):
                        await kernel.shutdown(grace)
                except Exception as exc:
                    # The block's error (or what the kernel holds) goes out, not the
                    # shutdown's, which is said on it (as a close step's, below).
                    going = _going_out(body_error, kernel._interrupt, kernel._escalation)
                    if going is None:
                        raise
                    going.add_note(f"the kernel's shutdown then raised {type(exc).__name__}: {exc}")
                finally:
                    closed.set()
                    if kernel._router.phase < KernelPhase.STOPPING:
                        # The shutdown was cut short in its drain (a second Ctrl-C):
                        # the cancel below stops the tree, as its stop phase would (a
                        # run that ends counts its agent out).
                        kernel._router.phase = KernelPhase.STOPPING
                    timer.cancel()
                    unlogged.cancel()
                    tree.cancel()
    except BaseException as exc:
        # A cancel from outside that came while the close waited for the drain (the
        # block had ended, or the kernel had cancelled it: its Ctrl-C, the root's
        # give-up) ended the drain and goes on out once the tree has stopped (see
        # _end_drain_if_cancelled). What the kernel holds to raise goes out in its
        # place, below, as when the block itself was cancelled: the block's error, a
        # Ctrl-C it took, the root's give-up (Trio loses none to a cancel). Until the
        # fifty-first pass that scope took the Cancelled and they were lost.
        held = body_error if body_error is not None and not only_cancels(body_error) else None
        # (by None, not truth: an exception may be false, one with a __len__ of 0)
        if held is None:
            held = kernel._interrupt
        if held is None:
            held = kernel._escalation
        if held is None or not only_cancels(exc):
            raising = exc
            raise
        held_out = held
    finally:
        # Also when the shutdown itself was interrupted (a second Ctrl-C raises
        # KeyboardInterrupt in it): the streams end and pending requests fail (their
        # timer is gone), or a reader or requester outside the kernel would wait forever
        # for what can no longer come; and what the kernel froze goes back to the
        # collector (the heap is the whole process's, not this kernel's).
        # What goes out: the nursery's error, or what the kernel held in its place, or
        # (with neither) the block's error or what the kernel holds, raised after the
        # close (below): a close step that raises is said on it, not raised in its
        # place. (Not ``sys.exc_info()``: in a generator's frame that is also the
        # caller's exception being handled, the block's own ``Cancelled`` at a Ctrl-C.)
        failing = raising if raising is not None else held_out
        if failing is None:
            failing = _going_out(body_error, kernel._interrupt, kernel._escalation)
        router = kernel._router
        try:
            # Each step even if one before it raised.
            try:
                router.fail_all_pending(lambda: _closed_on(router))
                if kernel._root_done.is_set() and not kernel._shutdown_finished.is_set():
                    # The shutdown was cut short (a second Ctrl-C) and the tree's cancel
                    # has stopped it: what is queued is dead-lettered, as at its end
                    # (after the requests waiting have failed naming the phase).
                    kernel._root.retire_all("shutdown")
            finally:
                try:
                    kernel._let_go_of_left()  # (never raises)
                    kernel._ledger.finish_streams()
                finally:
                    try:
                        kernel._host.heap.close()
                    finally:
                        if not kernel._shutdown_finished.is_set():
                            # Closed all the same: whoever waits for the shutdown (a
                            # task beside the block in shutdown()) returns.
                            router.phase = KernelPhase.STOPPED
                            kernel._shutdown_finished.set()
                        router.closed()  # (never raises)
        except Exception as exc:
            if failing is None:
                raise
            # The block or the shutdown is failing already (maybe with this same step):
            # that error is the one raised, and it says this one too.
            failing.add_note(f"closing the kernel then raised {type(exc).__name__}: {exc}")
    if body_error is not None:
        if only_cancels(body_error):
            # The block was cancelled from outside (a cancel scope around it) as well: a
            # Ctrl-C the kernel took, or the root's give-up, goes out, not the Cancelled,
            # which that scope would take (Trio loses no child's error, nor a Ctrl-C, to
            # a cancel).
            if kernel._interrupt is not None:
                raise_held(kernel._interrupt)
            if kernel._escalation is not None:
                raise_held(kernel._escalation)
        raise body_error
    if kernel._interrupt is not None:
        raise kernel._interrupt
    if kernel._escalation is not None:
        raise kernel._escalation
