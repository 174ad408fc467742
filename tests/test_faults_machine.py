"""Fault injection in the core on a clock the test moves (forty-seventh pass, issue 11).

``test_fault_machine`` draws a whole program first (Trio breaks some scheduling ties at
random, and what Hypothesis draws may not depend on them: a step picks its target by an
index into what exists when it runs) and runs it against one kernel on a ``MockClock``
that never jumps by itself: every step starts as a task, the test waits until every task
is blocked, and time passes only in an ``advance`` step, timer by timer
(``seconds_to_next_deadline``), so a stop, a failure, a deadline or the shutdown lands at
a mock time the program chose, between two of the kernel's timers. It draws what
``test_kernel_model`` and ``tests/test_tree_properties.py`` do not:

* the same agent or supervisor stopped one to three times at once, by ref and by name,
  draining or not; an agent stopped together with its supervisor; a stop whose caller
  gives up (cancelled at once, or after a few mock hundredths of a second); a draining
  stop of busy agents, each with a sleep, then ``ok``, ``ctx.stop()``, a failure or a
  failing background task, then ``ok`` queued (``busy_drain``, fifty-third pass: runs
  that end by themselves during their drain);
* supervisors nested up to three deep, with intensities of 0 to 2 restarts (an
  exhaustion escalates) and shutdown timeouts, children added to one
  (``spawn(supervisor=)``) while it runs, restarts or stops, and linked children and
  linked supervisor trees spawned from handlers, ``on_start``, ``on_stop`` and
  ``ctx.nursery`` tasks (also from a task's ``finally`` as its run is torn down);
* one shutdown at a random step, the steps after it running while the kernel drains
  and stops: ``kernel.shutdown(grace)`` once or twice at once, one cancelled from
  outside at a random mock time (in the block, or beside it), or one a handler asks for;
  handler, ``on_start`` and background failures, and restarts, during the drain;
* monitors and ``demonitor`` from agents, and a watcher that lives until the shutdown;
* requests from outside whose caller gives up (cancelled at once, or after up to half a
  mock second; fifty-first pass), each request journaled (how and when it ended) and
  checked at the end against its query's fate (:func:`check_requests`);
* lazy agents (a class without ``on_start``, with or without ``on_stop``: no task until
  a message comes, see ``AgentSpec.starts_lazily``) among the others, and one program in
  three with ``escalate_to_kernel`` (the root's give-up shuts the kernel down and
  ``open_kernel`` raises ``SupervisorEscalation``, which the test journals);
* children added under a supervisor (three in four of the adds pick one still in the
  tree, some of those one not running or one restarted): the answer is asserted exactly,
  refused while it or one above it is on its way out or between runs, taken otherwise,
  by the test's own record (:func:`add_refusal_due`); one add step in three first makes
  a supervisor that runs restart (its agents fail three times each), lets a mock fifth
  of a second pass, then adds under it (a restarted supervisor that stayed closed
  refuses it: drawn among the other steps, too seldom for 200 examples).

After every step (every task blocked): conservation (``assert_conserved``), ``stats()``
against what the test counted (``handled`` handler calls that returned,
``dead_lettered`` the letters read, ``restarts`` the ``restarted`` events, ``failed``
the ``handler_error`` letters), ``agents_alive``, no run stopped twice or handling a
message after its ``on_stop`` began, no agent left unrouted (being stopped) for 30
mock seconds, no lazy agent idle (no task) with messages queued for it, and no step
after the root gave up to the kernel (its block is cancelled). At the end: no task
left, nothing in flight, every ``on_start`` that returned matched by exactly one
``on_stop``; a linked child's runs started before
their parent's ``on_stop`` began and stopped before it (unless spawned in it); no run
started once the tree stops; every message by its own number: each accepted one
handled or dead-lettered exactly once, never both, none whose send raised handled or
dead-lettered, the letters by reason equal to ``stats()``'s; every agent and supervisor
spawned has one ``stopped`` event, its last; ``SupervisorEscalation`` raised exactly
when the root gave up; a ``kernel.stop`` that returned was
followed by its ``stopped`` event; a draining stop that returned while the kernel ran,
within every shutdown timeout under it, with no other stop under way and no give-up
meanwhile, left no ``agent_stopped`` letter of a stop under it (:func:`check_drained_stops`,
fifty-second pass), and a letter saying a run ended by itself during its draining stop
came under a draining stop, after a ``failed`` event where it says the run failed
(fifty-third pass); a request ended by its deadline; each monitor's
notice of a stop for good at most once, and exactly once where the watcher asked while
the target ran, never took it back and lived on until the shutdown.

CI runs 200 derandomized examples; ``NEXUS_MACHINE_EXAMPLES=5000`` runs more, drawn
afresh each time. A run that hangs fails after 30 s of real time with ``Hung`` naming
the step it hung at and where its tasks wait (``run_guarded``: the run is in a thread of
its own, so that Hypothesis's replay starts afresh).
"""

from __future__ import annotations

import itertools
import math
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import asynccontextmanager, suppress
from typing import Any, ClassVar

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from nexus_trio import (
    Agent,
    AgentNotFound,
    AgentNotRunning,
    AgentRef,
    AgentSpec,
    Backoff,
    Config,
    Context,
    DeadLetter,
    DeadLetterReason,
    EventKind,
    KernelConfig,
    KernelPhase,
    KernelShuttingDown,
    LifecycleEvent,
    MailboxFull,
    Message,
    MessageKind,
    RequestFailed,
    RequestTimeout,
    SupervisionConfig,
    Supervisor,
    SupervisorEscalation,
    agent,
    open_kernel,
)
from nexus_trio.testing import assert_conserved

from .hang_guard import DOCUMENTED, fault_settings_from, run_guarded, tasks_living

MACHINE_SETTINGS = fault_settings_from("NEXUS_MACHINE_EXAMPLES", 200)

#: what a message asks its handler to do
actions = st.one_of(
    st.sampled_from([("ok",), ("raise",), ("hang",), ("exit",), ("spawn",), ("bg_fail",)]),
    st.sampled_from([("ok",), ("raise",), ("bg_tell",), ("ok",), ("raise",), ("ok",)]),
    st.sampled_from(
        [("ok",), ("bg_spawn_late",), ("bg_tell_late",), ("bg_spawn",), ("spawn_tree",)]
    ),
    st.tuples(st.just("sleep"), st.sampled_from([0.001, 0.05, 0.3, 2.0])),
    st.tuples(st.sampled_from(["stop", "monitor", "demonitor"]), st.integers(0, 31)),
    st.tuples(st.just("ask"), st.integers(0, 31), st.sampled_from([0.01, 0.5, 3.0])),
)
quirks = st.sampled_from(
    [
        "none",
        "none",
        "none",
        "start_fails",
        "stop_fails",
        "slow_stop",
        "slow_start",
        "start_spawns",
        "lazy",
        "lazy_quiet",
    ]
)
agent_specs = st.fixed_dictionaries(
    {
        "restart": st.sampled_from(["permanent", "transient", "temporary"]),
        "on_error": st.sampled_from(["resume", "restart", "restart", "stop", "escalate"]),
        "capacity": st.sampled_from([None, 1, 2]),
        "overflow": st.sampled_from(["block", "drop_newest", "drop_oldest", "reject"]),
        "quirk": quirks,
        "shutdown_timeout": st.sampled_from([None, None, 0.0, 0.5]),
    }
)
trees: st.SearchStrategy[Any] = st.recursive(
    agent_specs,
    lambda kids: st.fixed_dictionaries(
        {
            "strategy": st.sampled_from(["one_for_one", "one_for_all", "rest_for_one"]),
            "max_restarts": st.integers(0, 2),
            "restart": st.sampled_from(["permanent", "transient", "temporary"]),
            "shutdown_timeout": st.sampled_from([math.inf, math.inf, 0.1]),
            "children": st.lists(kids, min_size=1, max_size=3),
        }
    ),
    max_leaves=5,
)
targets = st.integers(0, 31)
steps = st.one_of(
    st.tuples(st.just("spawn"), trees),
    st.tuples(st.just("add"), targets, agent_specs),
    st.tuples(st.just("add"), targets, agent_specs),
    st.tuples(st.just("restart_add"), targets, agent_specs),
    st.tuples(st.just("tell"), targets, actions, st.integers(1, 3)),
    st.tuples(st.just("tell"), targets, actions, st.integers(1, 3)),
    st.tuples(st.just("tell"), targets, actions, st.integers(1, 3)),
    st.tuples(st.just("nowait"), targets, actions, st.integers(1, 3)),
    st.tuples(st.just("nowait"), targets, actions, st.integers(1, 3)),
    st.tuples(st.just("request"), targets, actions, st.sampled_from([0.01, 0.2, 1.0])),
    st.tuples(st.just("cancelled_request"), targets, actions, st.sampled_from([0, 0.01, 0.1, 0.5])),
    st.tuples(
        st.just("cancelled_request"),
        targets,
        st.sampled_from([("hang",), ("sleep", 0.3), ("sleep", 0.05), ("ok",)]),
        st.sampled_from([0.01, 0.1]),
    ),
    st.tuples(st.just("stop"), targets, st.lists(st.booleans(), min_size=1, max_size=3)),
    st.tuples(
        st.just("busy_drain"),
        targets,
        st.sampled_from([0.01, 0.05, 0.2]),
        st.sampled_from([("ok",), ("exit",), ("raise",), ("bg_fail",)]),
    ),
    st.tuples(st.just("stop_with_parent"), targets, st.booleans()),
    st.tuples(st.just("cancelled_stop"), targets, st.booleans(), st.sampled_from([0, 0.01, 0.1])),
    st.tuples(st.just("advance"), st.sampled_from([0.0005, 0.01, 0.05, 0.3, 1.0, 4.0])),
    st.tuples(st.just("advance"), st.sampled_from([0.0005, 0.002, 0.01, 0.05])),
    st.tuples(st.just("watch"), targets, st.sampled_from(["monitor", "monitor", "demonitor"])),
)
#: the shutdown a program asks for before its end (at most one; the steps after it run
#: while the kernel drains and stops): called once or twice at once, cancelled from
#: outside after a few mock hundredths of a second, or asked by a handler
shutdowns = st.one_of(
    st.tuples(st.just("shutdown"), st.sampled_from([0, 0.05, 1.0]), st.integers(1, 2)),
    st.tuples(st.just("cancelled_shutdown"), st.sampled_from([0, 0.5, 5.0]), st.integers(0, 3)),
    st.tuples(st.just("handler_shutdown"), st.sampled_from([0, 0.1, 1.0]), targets),
    st.tuples(st.just("beside_shutdown"), st.sampled_from([0, 0.1, 1.0]), st.integers(0, 3)),
)


class Journal:
    """What the test saw: runs, messages, monitors, stops."""

    def __init__(self) -> None:
        self.positions = itertools.count()  # the journal's own order of what it saw
        self.tokens = itertools.count()
        self.seqs = itertools.count(1)
        self.names = itertools.count()
        # runs, by token (one Probe instance per run)
        self.entered: dict[int, int] = {}  # token -> journal position of on_start
        self.returned: set[int] = set()
        self.stopping: dict[int, int] = {}  # token -> journal position of on_stop's start
        self.stops: Counter[int] = Counter()
        self.phase_at_start: dict[int, KernelPhase] = {}
        self.parent_of: dict[int, tuple[int, bool]] = {}  # child token -> (parent, in on_stop)
        # messages, by their number
        self.accepted: set[int] = set()
        self.raised: set[int] = set()  # sends that raised to their caller
        self.asked: set[int] = set()  # queries of requests (acceptance not seen)
        self.entered_msg: Counter[int] = Counter()
        self.returned_msg: Counter[int] = Counter()
        self.returned_at: dict[int, float] = {}  # the mock time its handler returned
        self.entered_at: dict[int, float] = {}
        self.handled_calls = 0  # handler calls that returned (every agent of the test)
        self.handled_late: list[int] = []
        self.letters: list[DeadLetter] = []
        self.letter_times: list[float] = []  # the mock time each letter was read (published)
        self.letter_positions: list[int] = []  # and its journal position then
        self.event_positions: list[int] = []  # each event's journal position as read
        #: requests by their query's number: start, end (mock times), timeout, the time
        #: its caller gave up (a cancelled request), outcome ("answer", "failed" with the
        #: RequestFailed's reason, "timeout", "refused", "closed", "cancelled")
        self.requests: dict[int, dict[str, Any]] = {}
        self.events: list[LifecycleEvent] = []
        # addressable things: {"name", "ref", "agent", "parent" (a supervisor entry)}
        self.known: list[dict[str, Any]] = []
        self.gone: list[AgentRef] = []  # refs whose kernel.stop returned
        # monitors, by (watcher, target): the notices its handlers got, and the calls
        # ("monitor" of a live target, "late" of one stopped already, "demonitor")
        self.notices: dict[tuple[uuid.UUID, uuid.UUID], list[tuple[str, str]]] = {}
        self.monitor_calls: dict[tuple[uuid.UUID, uuid.UUID], list[str]] = {}
        self.problems: list[str] = []
        self.beside: trio.Nursery | None = None
        #: what the block raised when the root gave up to the kernel (escalate_to_kernel)
        self.escalation: SupervisorEscalation | None = None
        #: agents seen unrouted (being stopped), and when first
        self.unrouted_since: dict[uuid.UUID, float] = {}
        #: the targets of every kernel.stop the test called (refs' ids as text, names): a
        #: supervisor among them is on its way out for good
        self.stop_asked: set[str] = set()
        #: every kernel.stop called (the test's and the handlers'), in order: its target,
        #: drain, mock start and end (None until it returned), and, for the test's draining
        #: stops, the ids under the target when asked and the phase when it returned (see
        #: check_drained_stops)
        self.stop_calls: list[dict[str, Any]] = []
        #: draining stops check_drained_stops checked
        self.drained_checked = 0
        #: letters of runs that ended by themselves during their draining stop (ditto)
        self.self_ended_checked = 0
        #: the journal position where the program's shutdown step began (None: none did)
        self.shutdown_at: int | None = None
        #: linked children (ctx.spawn): the child's id -> its parent agent's id
        self.linked_parent: dict[str, str] = {}
        #: the shutdown timeouts of the agents and supervisors named by the test (None: the
        #: agent's default, the kernel's grace)
        self.timeouts: dict[str, float | None] = {}
        #: what the program is at (a hang's report names it), and what it raised there
        self.where = "before its first step"

    def at(self, index: int) -> dict[str, Any] | None:
        return self.known[index % len(self.known)] if self.known else None

    def agent_at(self, index: int) -> dict[str, Any] | None:
        """An agent to send to (a supervisor, which takes no messages, one time in 32)."""
        if index == 0:
            return self.at(index)
        agents = [e for e in self.known if e["agent"]]
        return agents[index % len(agents)] if agents else None


def problem(journal: Journal, text: str) -> None:
    journal.problems.append(text)


def asked_to_stop(journal: Journal, target: Any) -> None:
    """The test calls ``kernel.stop(target)``: a supervisor there is on its way out."""
    journal.stop_asked.add(str(target.id) if isinstance(target, AgentRef) else str(target))


def tree_node(kernel: Any, entry: dict[str, Any]) -> dict[str, Any] | None:
    """The ``describe()`` node of the supervisor ``entry``; None once it has left the
    tree (stopped for good)."""
    wanted = str(entry["ref"].id) if entry["ref"] is not None else None
    found: dict[str, Any] | None = None

    def walk(node: dict[str, Any]) -> None:
        nonlocal found
        if node["id"] == wanted or (entry["name"] is not None and node["name"] == entry["name"]):
            found = None if node["state"] == "stopped" else node
        for child in node.get("children", ()):
            walk(child)

    walk(kernel.describe())
    return found


def agent_nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The agents of a ``describe()`` tree."""
    if node.get("kind") == "agent":
        yield node
    for child in node.get("children", ()):
        yield from agent_nodes(child)


def add_refusal_due(journal: Journal, kernel: Any, entry: dict[str, Any]) -> tuple[str, str]:
    """What a ``spawn(x, supervisor=entry)`` must end with, by the test's own record
    (every task blocked): "shutting_down" once the shutdown began, "not_found" if the
    supervisor, or one above it below the root, is gone or on its way out, "taken" if
    not. On its way out: stopped or being stopped (its ``describe()`` state ``stopped``,
    ``stopping``), a ``kernel.stop`` of it asked (by the test or a handler), it gave up
    in its current run (an ``escalated`` event of its own, ``child ...``, after its last
    ``restarted`` or one of a supervisor above it), or its run is over and it waits for its supervisor's decision
    (``restarting``, or ``starting`` after such a give-up). A supervisor not started yet
    (``starting``, no give-up) takes children."""
    if kernel.phase is not KernelPhase.RUNNING:
        return "shutting_down", f"phase {kernel.phase.name}"
    wanted = str(entry["ref"].id) if entry["ref"] is not None else None

    def path_to(node: dict[str, Any]) -> list[dict[str, Any]] | None:
        if node["id"] == wanted or (entry["name"] is not None and node["name"] == entry["name"]):
            return [node]
        for child in node.get("children", ()):
            found = path_to(child)
            if found is not None:
                return [node, *found]
        return None

    path = path_to(kernel.describe())
    if path is None:
        return "not_found", "not in the tree"
    root = path[0]["id"]
    if any(e.kind is EventKind.ESCALATED and str(e.agent_id) == root for e in journal.events):
        # (the root gave up to the kernel, escalate_to_kernel: its shutdown is to come)
        return "shutting_down", "the root escalated to the kernel"
    for depth, node in enumerate(path[1:], 1):
        if node["state"] in ("stopped", "stopping", "restarting"):
            return "not_found", f"{node['name'] or node['id']} {node['state']}"
        if node["id"] in journal.stop_asked or node["name"] in journal.stop_asked:
            return "not_found", f"{node['name'] or node['id']} asked to stop"
        # (a run begins with its own restarted event, or with one of a supervisor above
        # it, whose new run starts its children afresh)
        lineage = {n["id"] for n in path[1 : depth + 1]}
        gave_up = False
        for event in journal.events:
            if event.kind is EventKind.RESTARTED and str(event.agent_id) in lineage:
                gave_up = False
            elif (
                event.kind is EventKind.ESCALATED
                and str(event.agent_id) == node["id"]
                and event.reason.startswith("child ")
            ):
                gave_up = True
        if gave_up:
            return "not_found", f"{node['name'] or node['id']} gave up, {node['state']}"
    return "taken", " > ".join(f"{n['name']} {n['state']}" for n in path)


@MACHINE_SETTINGS
@given(data=st.data())
def test_fault_machine(data: st.DataObject) -> None:
    journal = Journal()
    clock = trio.testing.MockClock(autojump_threshold=math.inf)

    class Probe(Agent):
        """One run of a journaling agent; does what each message says."""

        def __init__(self, facts: dict[str, Any], parent: tuple[int, bool] | None) -> None:
            self.token = next(journal.tokens)
            self.facts = facts
            if parent is not None:
                journal.parent_of[self.token] = parent

        async def on_start(self, ctx: Context) -> None:
            journal.entered[self.token] = next(journal.positions)
            journal.phase_at_start[self.token] = ctx.kernel.phase
            quirk = self.facts["quirk"]
            if quirk == "start_spawns":
                spawn_linked(ctx, self.token, in_stop=False)
            if quirk == "slow_start":
                await trio.sleep(0.05)
            if quirk == "start_fails":
                raise RuntimeError("on_start fails")
            journal.returned.add(self.token)

        async def handle(self, ctx: Context, msg: Message) -> Any:
            if self.token in journal.stopping:
                journal.handled_late.append(self.token)
            return await act(ctx, msg, self.token)

        async def on_stop(self, ctx: Context) -> None:
            journal.stopping[self.token] = next(journal.positions)
            journal.stops[self.token] += 1
            quirk = self.facts["quirk"]
            if quirk == "stop_fails":
                raise OSError("on_stop fails")
            if quirk == "slow_stop":
                await trio.sleep(0.2)
                spawn_linked(ctx, self.token, in_stop=True)

    class LazyProbe(Agent):
        """One run of a lazy agent (no ``on_start``: its run starts with its first
        message), journaled as its run begins (the factory is called then)."""

        facts: ClassVar[dict[str, Any]]
        parent: ClassVar[tuple[int, bool] | None] = None

        def __init__(self) -> None:
            self.token = next(journal.tokens)
            if self.parent is not None:
                journal.parent_of[self.token] = self.parent
            journal.entered[self.token] = next(journal.positions)
            journal.phase_at_start[self.token] = kernel_of[0].phase
            if self.facts["quirk"] == "lazy":  # (its on_stop is due)
                journal.returned.add(self.token)

        async def handle(self, ctx: Context, msg: Message) -> Any:
            if self.token in journal.stopping:
                journal.handled_late.append(self.token)
            return await act(ctx, msg, self.token)

    class LazyStopProbe(LazyProbe):
        async def on_stop(self, ctx: Context) -> None:
            journal.stopping[self.token] = next(journal.positions)
            journal.stops[self.token] += 1

    kernel_of: list[Any] = [None]

    def spec_of(facts: dict[str, Any], parent: tuple[int, bool] | None = None) -> AgentSpec:
        timeout = facts.get("shutdown_timeout")
        factory: Any = lambda: Probe(facts, parent)  # noqa: E731
        if facts["quirk"] in ("lazy", "lazy_quiet"):
            # a class of its own (the spec reads its on_start and on_stop to know it lazy)
            base = LazyStopProbe if facts["quirk"] == "lazy" else LazyProbe
            factory = type(base.__name__, (base,), {"facts": facts, "parent": parent})
            assert AgentSpec(factory=factory).starts_lazily
        return AgentSpec(
            factory=factory,
            restart=facts["restart"],
            on_error=facts["on_error"],
            mailbox_capacity=facts["capacity"],
            overflow=facts["overflow"],
            **({} if timeout is None else {"shutdown_timeout": timeout}),
        )

    child_facts = {
        "restart": "transient",
        "on_error": "restart",
        "capacity": None,
        "overflow": "block",
        "quirk": "none",
    }

    def spawn_linked(ctx: Context, token: int, *, in_stop: bool, tree: bool = False) -> None:
        with suppress(KernelShuttingDown, AgentNotRunning):
            if not tree:
                ref = ctx.spawn(spec_of(child_facts, (token, in_stop)))
                journal.linked_parent[str(ref.id)] = str(ctx.id)
                journal.known.append({"name": None, "ref": ref, "agent": True, "parent": None})
                return
            # a linked supervisor: its whole tree stops before the parent's on_stop
            facts = {**child_facts, "quirk": "slow_stop", "on_error": "escalate"}
            ref = ctx.spawn(
                Supervisor(
                    strategy="one_for_all",
                    max_restarts=1,
                    backoff=Backoff(0.001, 0.01, jitter=0),
                    children=[spec_of(facts, (token, in_stop)), spec_of(facts, (token, in_stop))],
                )
            )
            journal.linked_parent[str(ref.id)] = str(ctx.id)
            entry = {"name": None, "ref": ref, "agent": False, "parent": None}
            journal.known.append(entry)

    def address(entry: dict[str, Any]) -> Any:
        return entry["ref"] if entry["ref"] is not None else entry["name"]

    async def act(ctx: Context, msg: Message, token: int | None) -> Any:
        if msg.kind is MessageKind.EVENT:
            notice = msg.payload
            if notice["agent"] is not None:
                key = (ctx.id, uuid.UUID(notice["agent"]))
                journal.notices.setdefault(key, []).append((notice["event"], notice["reason"]))
            journal.handled_calls += 1
            return None
        action, seq = msg.payload
        journal.entered_msg[seq] += 1
        journal.entered_at[seq] = trio.current_time()
        what = action[0]
        if what == "raise":
            raise RuntimeError(f"message {seq} fails")
        if what == "hang":
            await trio.sleep_forever()
        elif what == "sleep":
            await trio.sleep(action[1])
        elif what == "exit":
            ctx.stop()
        elif what in ("spawn", "spawn_tree") and token is not None:
            spawn_linked(ctx, token, in_stop=False, tree=what == "spawn_tree")
        elif what == "bg_fail":

            async def fail_later() -> None:
                await trio.sleep(0.01)
                raise RuntimeError("a background task fails")

            ctx.nursery.start_soon(fail_later)
        elif what == "bg_tell" and journal.known:
            entry = journal.agent_at(seq)
            ctx.nursery.start_soon(tell, ctx, address(entry))
        elif what == "bg_spawn" and token is not None:

            async def spawn_later(token: int) -> None:
                await trio.sleep(0.02)
                spawn_linked(ctx, token, in_stop=False)

            ctx.nursery.start_soon(spawn_later, token)
        elif what in ("bg_spawn_late", "bg_tell_late") and token is not None:
            # a task of the run that spawns or sends as its run is torn down (shielded)
            entry = journal.agent_at(seq)

            async def at_its_end(token: int) -> None:
                try:
                    await trio.sleep_forever()
                finally:
                    with trio.CancelScope(shield=True):
                        if what == "bg_spawn_late":
                            spawn_linked(ctx, token, in_stop=False)
                        elif entry is not None:
                            await tell(ctx, address(entry))

            ctx.nursery.start_soon(at_its_end, token)
        elif what == "shutdown":
            await ctx.kernel.shutdown(action[1])
        elif what == "stop" and journal.known:
            entry = journal.known[action[1] % len(journal.known)]
            call = {"target": str(address(entry)), "drain": False, "at": next(journal.positions)}
            journal.stop_calls.append(call)
            try:
                with suppress(AgentNotFound, ValueError):
                    asked_to_stop(journal, address(entry))
                    await ctx.kernel.stop(address(entry))
            finally:
                call["done"] = next(journal.positions)
        elif what == "ask" and journal.known:
            entry = journal.agent_at(action[1])
            asked = next(journal.seqs)
            journal.asked.add(asked)
            start = trio.current_time()
            with suppress(*DOCUMENTED):
                answer = await journaled(
                    asked, ctx.request(address(entry), (("ok",), asked), timeout=action[2])
                )
                if answer != {"seq": asked}:
                    problem(journal, f"request {asked} answered {answer!r}")
            if trio.current_time() > start + action[2] + 1e-9:
                problem(journal, f"request {asked} outlived its deadline")
        elif what in ("monitor", "demonitor") and journal.known:
            entry = journal.known[action[1] % len(journal.known)]
            with suppress(AgentNotFound):
                ref = entry["ref"] or ctx.kernel.lookup(entry["name"])
                live = ref in ctx.kernel.agents() or not entry["agent"]
                call = ("monitor" if live else "late") if what == "monitor" else what
                journal.monitor_calls.setdefault((ctx.id, ref.id), []).append(call)
                if what == "monitor":
                    ctx.monitor(ref)
                else:
                    ctx.demonitor(ref)
        journal.returned_msg[seq] += 1
        journal.returned_at[seq] = trio.current_time()
        journal.handled_calls += 1
        return {"seq": seq} if msg.kind is MessageKind.QUERY else None

    async def journaled(seq: int, call: Awaitable[Any], gives_up: float = math.inf) -> Any:
        """Await request ``seq`` (``call``), journaling how and when it ended."""
        request: dict[str, Any] = {"start": trio.current_time(), "outcome": "other"}
        request["gives_up"] = request["start"] + gives_up
        journal.requests[seq] = request
        try:
            answer = await call
        except RequestFailed as exc:
            request.update(outcome="failed", reason=exc.reason)
            raise
        except RequestTimeout as exc:
            request.update(outcome="timeout", timeout=exc.timeout)
            raise
        except (AgentNotFound, MailboxFull):
            request["outcome"] = "refused"
            raise
        except KernelShuttingDown:
            request["outcome"] = "closed"
            raise
        except trio.Cancelled:
            request["outcome"] = "cancelled"
            raise
        else:
            request["outcome"] = "answer"
            return answer
        finally:
            request["end"] = trio.current_time()

    async def watcher(ctx: Context, msg: Message) -> None:
        await act(ctx, msg, None)

    async def tell(ctx: Context, to: Any) -> None:
        seq = next(journal.seqs)
        try:
            await ctx.send(to, (("ok",), seq))
        except DOCUMENTED:
            journal.raised.add(seq)
            return
        except BaseException:
            journal.raised.add(seq)
            raise
        journal.accepted.add(seq)

    def build(tree: dict[str, Any], parent: dict[str, Any] | None) -> Any:
        name = f"n{next(journal.names)}"
        journal.timeouts[name] = tree.get("shutdown_timeout")
        if "children" not in tree:
            journal.known.append({"name": name, "ref": None, "agent": True, "parent": parent})
            return spec_of(tree).with_options(name=name)
        entry = {"name": name, "ref": None, "agent": False, "parent": parent}
        journal.known.append(entry)
        return Supervisor(
            name=name,
            strategy=tree["strategy"],
            max_restarts=tree["max_restarts"],
            within=1.0,
            backoff=Backoff(0.001, 0.01, jitter=0),
            restart=tree["restart"],
            shutdown_timeout=tree["shutdown_timeout"],
            children=[build(c, entry) for c in tree["children"]],
        )

    # (drawn first: the config is built before the program runs)
    escalate = data.draw(st.sampled_from([False, False, True]), label="escalate_to_kernel")
    config = Config(
        kernel=KernelConfig(
            dead_letter_buffer=100_000,
            shutdown_grace_ms=500,
            handle_timeout_ms=1000,
            send_timeout_ms=100,
            request_timeout_ms=5000,
        ),
        supervision=SupervisionConfig(
            max_restarts=3, backoff_initial_ms=1, backoff_max_ms=10, escalate_to_kernel=escalate
        ),
    )

    async def advance(seconds: float) -> None:
        """Let ``seconds`` of mock time pass, timer by timer."""
        end = trio.current_time() + seconds
        while True:
            await trio.testing.wait_all_tasks_blocked()
            now = trio.current_time()
            wait = trio.lowlevel.current_statistics().seconds_to_next_deadline
            if now + wait > end:
                clock.jump(max(0.0, end - now))
                await trio.testing.wait_all_tasks_blocked()
                return
            clock.jump(max(0.0, wait))

    async def send_step(
        kernel: Any, step: tuple[Any, ...], to: dict[str, Any] | None = None
    ) -> None:
        """A tell (one to three in a row, each its own message) or a request, to the
        agent ``to`` or, without it, to the one the step's index picks."""
        if step[0] != "request":
            for _ in range(step[3] - 1):
                await send_one(kernel, step, to)
        await send_one(kernel, step, to)

    async def send_one(kernel: Any, step: tuple[Any, ...], to: dict[str, Any] | None) -> None:
        what, index, action = step[0], step[1], step[2]
        entry = journal.agent_at(index) if to is None else to
        if entry is None:
            return
        seq = next(journal.seqs)
        payload = (action, seq)
        start = trio.current_time()
        try:
            if what == "tell":
                await kernel.send(address(entry), payload)
            elif what == "nowait":
                kernel.send_nowait(address(entry), payload)
            else:
                journal.asked.add(seq)
                answer = await journaled(
                    seq, kernel.request(address(entry), payload, timeout=step[3])
                )
                if answer != {"seq": seq}:
                    problem(journal, f"request {seq} answered {answer!r}")
        except DOCUMENTED:
            if what != "request":
                journal.raised.add(seq)
        except BaseException:
            if what != "request":
                journal.raised.add(seq)
            raise
        else:
            if what != "request":
                journal.accepted.add(seq)
        if what == "request" and trio.current_time() > start + step[3] + 1e-9:
            problem(journal, f"request {seq} ended {trio.current_time() - start} s after it began")

    async def cancelled_request(kernel: Any, step: tuple[Any, ...]) -> None:
        """A request (a deadline of 5 s) whose caller gives up after ``step[3]`` mock
        seconds (at once for 0): its query is skipped in the queue or its handler
        cancelled, dead-lettered ``request_timeout``, or it was answered in time."""
        entry = journal.agent_at(step[1])
        if entry is None:
            return
        seq = next(journal.seqs)
        journal.asked.add(seq)
        with trio.move_on_after(step[3]), suppress(*DOCUMENTED):
            call = kernel.request(address(entry), (step[2], seq), timeout=5.0)
            answer = await journaled(seq, call, gives_up=step[3])
            if answer != {"seq": seq}:
                problem(journal, f"request {seq} answered {answer!r}")

    async def stop_one(kernel: Any, target: Any, drain: bool) -> None:
        key = str(target.id) if isinstance(target, AgentRef) else str(target)
        call: dict[str, Any] = {"target": key, "drain": drain, "start": trio.current_time()}
        call["at"] = next(journal.positions)
        call["under"] = subtree_ids(kernel.describe(), key)
        journal.stop_calls.append(call)
        try:
            asked_to_stop(journal, target)
            await kernel.stop(target, drain=drain)
        except AgentNotFound:
            return
        except KernelShuttingDown:
            return
        finally:
            call["end"] = trio.current_time()
            call["done"] = next(journal.positions)
        call["returned"] = True
        call["phase"] = kernel.phase
        ref = target if isinstance(target, AgentRef) else None
        if ref is not None:
            journal.gone.append(ref)
            if ref in kernel.agents():
                problem(journal, f"{ref} still an agent after its stop returned")

    def ref_of(kernel: Any, entry: dict[str, Any]) -> AgentRef | None:
        if entry["ref"] is None:
            with suppress(AgentNotFound):
                entry["ref"] = kernel.lookup(entry["name"])
        return entry["ref"]  # type: ignore[no-any-return]

    async def shut(kernel: Any, grace: float) -> None:
        await kernel.shutdown(grace)
        if not kernel.stopped:
            problem(journal, "shutdown returned before the kernel stopped")

    async def cancelled_shut(kernel: Any, grace: float, after: int) -> None:
        with trio.move_on_after(after * 0.01):
            await kernel.shutdown(grace)

    def add_under(kernel: Any, sup: dict[str, Any], facts: dict[str, Any]) -> None:
        """Spawn an agent of ``facts`` under the supervisor ``sup``; the answer exactly as
        the model says: refused while the supervisor, or one above it, is on its way out
        or between runs, taken otherwise."""
        name = f"n{next(journal.names)}"
        journal.timeouts[name] = facts.get("shutdown_timeout")
        due, why = add_refusal_due(journal, kernel, sup)
        try:
            ref = kernel.spawn(spec_of(facts).with_options(name=name), supervisor=address(sup))
        except KernelShuttingDown:
            got = "shutting_down"
        except AgentNotFound:
            got = "not_found"
        else:
            got = "taken"
            journal.known.append({"name": name, "ref": ref, "agent": True, "parent": sup})
        if got != due:
            problem(journal, f"add under {address(sup)}: {got}, the model says {due} ({why})")

    async def restart_then_add(kernel: Any, nursery: trio.Nursery, step: tuple[Any, ...]) -> None:
        """A supervisor that runs is made to restart, then a child is added under it: each
        agent right under it is told to fail three times (a ``ctx.nursery`` task that
        raises: its run fails whatever its ``on_error``), which exceeds its intensity (0
        to 2) unless the agents are temporary, and its supervisor restarts it (or one
        above it, whose new run starts it afresh) unless it is temporary; a mock fifth of
        a second later (backoffs of 1 to 10 ms) the add, answered as the model says. A
        supervisor whose new run kept it closed refuses it: drawn among the other steps,
        that sequence came too seldom for 200 examples to see it."""
        running = [e for e in journal.known if not e["agent"]]
        running = [e for e in running if (tree_node(kernel, e) or {}).get("state") == "running"]
        if not running:
            return
        sup = running[step[1] % len(running)]
        for kid in [e for e in journal.known if e["agent"] and e["parent"] is sup]:
            nursery.start_soon(send_step, kernel, ("tell", 0, ("bg_fail",), 3), kid)
        await advance(0.2)
        add_under(kernel, sup, step[2])

    async def busy_drain(kernel: Any, nursery: trio.Nursery, step: tuple[Any, ...]) -> None:
        """Each agent under the target (it, or its supervisor subtree; named ones) is told
        to sleep ``step[2]`` mock seconds, then ``step[3]`` (``exit``: ``ctx.stop()``,
        ``raise``, ``bg_fail``: a run that may end by itself during the drain), then
        ``ok``; once they are queued, the target is stopped with a drain, and a mock tenth
        of a second more than the sleep passes, for the stop to return before the next
        step (fifty-third pass: see check_drained_stops)."""
        entry = journal.at(step[1])
        if entry is None:
            return
        target = ref_of(kernel, entry) or entry["name"]
        key = str(target.id) if isinstance(target, AgentRef) else str(target)
        named = [n for n in subtree_ids(kernel.describe(), key).values() if n is not None]
        for kid in [e for e in journal.known if e["agent"] and e["name"] in named]:
            for action in (("sleep", step[2]), step[3], ("ok",)):
                await send_one(kernel, ("nowait", 0, action), kid)
        nursery.start_soon(stop_one, kernel, target, True)
        await advance(step[2] + 0.1)

    def start_step(kernel: Any, nursery: trio.Nursery, step: tuple[Any, ...]) -> None:
        what = step[0]
        if what == "spawn":
            first = len(journal.known)
            try:
                ref = kernel.spawn(build(step[1], None))
            except KernelShuttingDown:
                del journal.known[first:]  # (nothing of the tree was spawned)
            else:
                journal.known[first]["ref"] = ref
        elif what == "add":
            sups = [e for e in journal.known if not e["agent"]]
            if step[1] % 4:
                # (three in four among those still in the tree: gone ones are refused
                # alike, and those on their way out are what the model must tell; one
                # in four among those not running, if any: stopping, between runs, not
                # started yet; one in four among those restarted, if any)
                live = [(e, tree_node(kernel, e)) for e in sups]
                sups = [e for e, node in live if node]
                idle = [e for e, node in live if node and node["state"] != "running"]
                again = [e for e, node in live if node and node["restarts"]]
                if step[1] % 4 == 1 and idle:
                    sups = idle
                elif step[1] % 4 == 2 and again:
                    sups = again
            if sups:
                add_under(kernel, sups[step[1] % len(sups)], step[2])
        elif what in ("tell", "nowait", "request"):
            nursery.start_soon(send_step, kernel, step)
        elif what == "cancelled_request":
            nursery.start_soon(cancelled_request, kernel, step)
        elif what == "stop":
            entry = journal.at(step[1])
            if entry is None:
                return
            ref = ref_of(kernel, entry)
            # (concurrent stops of one agent, draining or not, by ref and by name)
            for i, drain in enumerate(step[2]):
                target = ref if (ref is not None and i % 2 == 0) else entry["name"]
                if target is not None:
                    nursery.start_soon(stop_one, kernel, target, drain)
        elif what == "stop_with_parent":
            entry = journal.at(step[1])
            if entry is None or entry["parent"] is None:
                return
            for e in (entry, entry["parent"]):
                ref = ref_of(kernel, e)
                nursery.start_soon(stop_one, kernel, ref or e["name"], step[2])
        elif what == "shutdown":
            for _ in range(step[2]):
                nursery.start_soon(shut, kernel, step[1])
        elif what == "cancelled_shutdown":
            nursery.start_soon(cancelled_shut, kernel, step[1], step[2])
        elif what == "beside_shutdown":
            # beside the block (in the nursery around open_kernel), cancelled from there:
            # the kernel's stop ends the block
            assert journal.beside is not None
            journal.beside.start_soon(cancelled_shut, kernel, step[1], step[2])
        elif what == "cancelled_stop":
            # a stop whose caller gives up: the stop goes on (the agent is unrouted)
            entry = journal.at(step[1])
            if entry is not None:
                target = ref_of(kernel, entry) or entry["name"]

                async def cancelled_stop(target: Any, drain: bool, after: float) -> None:
                    with trio.move_on_after(after):
                        await stop_one(kernel, target, drain)

                nursery.start_soon(cancelled_stop, target, step[2], step[3])
        elif what == "handler_shutdown":
            nursery.start_soon(send_step, kernel, ("tell", step[2], ("shutdown", step[1]), 1))
        elif what == "watch":
            # the watcher, which lives until the shutdown, monitors (or not) a target
            with suppress(KernelShuttingDown):
                kernel.send_nowait("watcher", ((step[2], step[1]), 0))

    def check_midway(kernel: Any) -> None:
        assert_conserved(kernel)
        # the root gave up to the kernel (escalate_to_kernel): once its run is over (its
        # children stopped) the block is cancelled at its next checkpoint (the wait
        # before this check), so it checks no more
        root = kernel.describe()
        gave_up = [e for e in journal.events if e.kind is EventKind.ESCALATED]
        if [e for e in gave_up if str(e.agent_id) == root["id"]]:
            assert root["state"] == "running", f"the block ran on, the root {root['state']}"
        stats = kernel.stats()
        assert all(n <= 1 for n in journal.stops.values()), "a run stopped twice"
        assert all(t in journal.entered for t in journal.stops), "on_stop without on_start"
        assert not journal.handled_late, f"runs {journal.handled_late} handled after on_stop"
        assert stats.agents_alive >= 0
        # (every task blocked: the readers of the streams have what was published)
        assert stats.handled == journal.handled_calls, (stats.handled, journal.handled_calls)
        assert stats.dead_lettered == len(journal.letters), (stats, len(journal.letters))
        assert stats.restarts == sum(e.kind is EventKind.RESTARTED for e in journal.events)
        assert stats.failed == stats.dead_letters_by_reason.get("handler_error", 0), stats
        if kernel.phase is KernelPhase.RUNNING:
            assert stats.agents_alive == len(kernel.agents())
            # an agent being stopped (unrouted) is stopped for good within its bounds
            # (handlers of 2 s at most, on_stop of 0.2 s, shutdown timeouts): none lives
            # on unrouted, as a stop whose caller gave up could leave it
            # a lazy agent left idle (no task) with messages queued for it would hold
            # them until another one woke it: every task is blocked, so its wake is lost
            tree = kernel.describe()
            for node in agent_nodes(tree):
                if node["state"] == "idle":
                    queued = node["mailbox_depth"] + node["senders_waiting"]
                    assert not queued, f"agent {node['name']} idle with {queued} queued"
            now = trio.current_time()
            for ref in kernel.agents():
                if kernel.is_local(ref):
                    continue
                since = journal.unrouted_since.setdefault(ref.id, now)
                assert now - since < 30, f"{ref} unrouted for {now - since} s, not stopped"
        assert not journal.problems, journal.problems

    @asynccontextmanager
    async def open_kernel_guarded() -> AsyncIterator[Any]:
        """``open_kernel``, whose escalation to the kernel (``escalate_to_kernel``: the
        root gave up) is journaled, not raised."""
        try:
            async with open_kernel(config, seed=0) as kernel:
                yield kernel
        except SupervisorEscalation as exc:
            if not escalate:
                raise
            journal.escalation = exc

    async def scenario() -> Any:
        baseline = tasks_living()
        kernel: Any = None
        with trio.fail_after(3600), trio.CancelScope() as everything:
            async with trio.open_nursery() as outside:
                async with open_kernel_guarded() as kernel:
                    kernel_of[0] = kernel
                    letters = kernel.dead_letters(100_000)
                    events = kernel.events(100_000)

                    async def collect(
                        stream: Any,
                        into: list[Any],
                        positions: list[int],
                        times: list[float] | None = None,
                    ) -> None:
                        with trio.CancelScope(shield=True):  # the stream ends at shutdown
                            async for item in stream:
                                into.append(item)
                                positions.append(next(journal.positions))
                                if times is not None:
                                    times.append(trio.current_time())

                    journal.beside = outside
                    kernel.spawn(agent(watcher, name="watcher", mailbox_capacity=10_000))
                    outside.start_soon(
                        collect,
                        letters,
                        journal.letters,
                        journal.letter_positions,
                        journal.letter_times,
                    )
                    outside.start_soon(collect, events, journal.events, journal.event_positions)
                    async with trio.open_nursery() as block:
                        try:
                            for tree in initial:
                                start_step(kernel, block, ("spawn", tree))
                            for at, step in enumerate(program):
                                journal.where = (
                                    f"at step {at} of {len(program)}, {step!r}"
                                    f" (mock time {trio.current_time():g} s)"
                                )
                                if at == shutdown_at:
                                    journal.shutdown_at = next(journal.positions)
                                    start_step(kernel, block, shutdown)
                                if step[0] == "advance":
                                    await advance(step[1])
                                elif step[0] == "restart_add" and not kernel.stopped:
                                    await restart_then_add(kernel, block, step)
                                elif step[0] == "busy_drain" and not kernel.stopped:
                                    await busy_drain(kernel, block, step)
                                elif not kernel.stopped:
                                    start_step(kernel, block, step)
                                await trio.testing.wait_all_tasks_blocked()
                                check_midway(kernel)
                            if journal.shutdown_at is None:
                                journal.shutdown_at = next(journal.positions)
                            journal.where = (
                                f"in the program's end, {ending!r} (grace {end_grace}),"
                                f" after its {len(program)} steps"
                            )
                            clock.autojump_threshold = 0
                            if ending == "shutdown":
                                await kernel.shutdown(end_grace)
                            elif ending == "cancel":
                                everything.cancel()
                            else:
                                block.cancel_scope.cancel()
                        except BaseException as exc:
                            # (a hang while this unwinds is reported with it; the clock
                            # moves by itself, as at the program's end, for the stop)
                            journal.where += f", which raised {type(exc).__name__}: {exc}"
                            clock.autojump_threshold = 0
                            raise
        assert tasks_living() == baseline, "the kernel left tasks behind"
        return kernel

    # (the whole program is drawn before it runs: Trio breaks some ties at random, and
    # what Hypothesis draws may not depend on them)
    initial = data.draw(st.lists(trees, min_size=1, max_size=3), label="initial")
    program = data.draw(st.lists(steps, min_size=5, max_size=50), label="program")
    shutdown_at = data.draw(st.integers(0, 60), label="shutdown_at")
    shutdown = data.draw(shutdowns, label="shutdown")
    ending = data.draw(st.sampled_from(["leave", "shutdown", "cancel"]), label="ending")
    end_grace = data.draw(st.sampled_from([0, 0.05, 2.0]), label="end_grace")
    kernel = run_guarded(scenario, clock, 30, lambda: journal.where)
    check_end(journal, kernel, ending)


def subtree_ids(tree: dict[str, Any], target: str) -> dict[str, str | None]:
    """The nodes of the ``describe()`` subtree of ``target`` (an id or a name), by id
    (their names as values): empty if it is not in the tree."""
    found: dict[str, str | None] = {}

    def walk(node: dict[str, Any], inside: bool) -> None:
        inside = inside or target in (node["id"], node["name"])
        if inside:
            found[node["id"]] = node["name"]
        for child in node.get("children", ()):
            walk(child, inside)

    walk(tree, False)
    return found


#: the machine's kernel grace (``shutdown_grace_ms``): an agent's shutdown timeout by default
GRACE = 0.5


def check_drained_stops(journal: Journal, kernel: Any) -> None:
    """A draining stop loses nothing by itself (fifty-second pass): one the test asked
    that returned while the kernel ran and within every shutdown timeout under it (none
    could cut its drain short), with no other stop under way meanwhile (the test's or a
    handler's, plain or draining, of anything), leaves no ``agent_stopped`` letter for a
    stop (detail ``agent stopped (stopped)`` or ``(parent_stopped)``) at its target or at
    anything under it (its supervisor subtree, and the agents those spawned with
    ``ctx.spawn``, at any depth): its queue, and theirs, were handled. The letters
    counted are those read from the stop's start until the next stop call, the
    program's shutdown or a give-up (``escalated`` event), whichever comes first (the
    dead-letter stream is read by a task of its own, after the stop may have returned).
    Conservation alone lets such a letter pass: it has a reason."""
    calls = journal.stop_calls
    for call in calls:
        if not call["drain"] or not call.get("returned") or not call["under"]:
            continue
        if call["phase"] is not KernelPhase.RUNNING:
            continue
        begun, done = call["at"], call["done"]
        if any(c is not call and c["at"] < done and c.get("done", math.inf) > begun for c in calls):
            continue  # another stop under way meanwhile
        until = min(
            [c["at"] for c in calls if c["at"] > done]
            + [
                p
                for e, p in zip(journal.events, journal.event_positions, strict=True)
                if e.kind is EventKind.ESCALATED and p > begun
            ]
            + ([journal.shutdown_at] if journal.shutdown_at is not None else [])
            + [math.inf]
        )
        if until < done:
            continue  # (a give-up, or the shutdown, while it ran)
        bound = min(
            (
                GRACE if (t := journal.timeouts.get(name or "")) is None else t
                for name in call["under"].values()
            ),
            default=GRACE,
        )
        under = set(call["under"])
        grown = True
        while grown:
            grown = False
            for child, parent in journal.linked_parent.items():
                if parent in under and child not in under:
                    under.add(child)
                    bound = min(bound, GRACE)  # (a linked child's: the default)
                    grown = True
        if call["end"] - call["start"] >= bound:
            continue
        journal.drained_checked += 1
        lost = [
            (letter.message.payload, letter.detail)
            for letter, at in zip(journal.letters, journal.letter_positions, strict=True)
            if letter.reason is DeadLetterReason.AGENT_STOPPED
            and (
                letter.detail in ("agent stopped (stopped)", "agent stopped (parent_stopped)")
                or "its draining stop's time ran out" in letter.detail
            )
            and str(letter.recipient) in under
            and begun <= at < until
        ]
        assert not lost, (
            f"the draining stop of {call['target']} ({call['start']:g} s to {call['end']:g} s)"
            f" left agent_stopped letters under it: {lost}"
        )
    # A run that ended by itself during its draining stop (``ctx.stop()``, a failure) has
    # what it left dead-lettered saying so (fifty-third pass): only under a draining stop
    # begun before, and a failure said there was reported as one too (a ``failed`` event
    # of that agent: read by a task of its own, in no order with the letters), not folded
    # into the stop.
    drains = [c["at"] for c in calls if c["drain"]]
    failed = {str(e.agent_id) for e in journal.events if e.kind is EventKind.FAILED}
    for letter, at in zip(journal.letters, journal.letter_positions, strict=True):
        if "during its draining stop" not in letter.detail:
            continue
        journal.self_ended_checked += 1
        said = f"{letter.message.payload} to {letter.recipient}: {letter.detail!r}"
        assert letter.reason is DeadLetterReason.AGENT_STOPPED, said
        assert any(begun < at for begun in drains), f"{said}, with no draining stop asked"
        if "its run failed" in letter.detail:
            assert str(letter.recipient) in failed, f"{said}, its failure not reported"


def check_requests(journal: Journal) -> None:
    """Each request ended as its query did, and when: its requester told at once when
    the query was dead-lettered (``RequestFailed`` with that reason, at that mock time,
    never waiting out its deadline), an answer only for a query handled, a timeout at its
    deadline, a caller that gave up at its time; and a query dead-lettered
    ``request_timeout`` only once its requester had stopped waiting."""
    lettered: dict[int, tuple[str, float]] = {}
    for letter, when in zip(journal.letters, journal.letter_times, strict=True):
        payload = letter.message.payload
        if letter.message.kind is MessageKind.QUERY and isinstance(payload, tuple):
            lettered[payload[1]] = (letter.reason.value, when)
    for seq, request in journal.requests.items():
        start, end, outcome = request["start"], request["end"], request["outcome"]
        said = f"request {seq} ({outcome}, {start:g} s to {end:g} s)"
        if seq in lettered:
            reason, when = lettered[seq]
            said += f": its query dead-lettered {reason} at {when:g} s"
            if reason == "request_timeout":
                assert end <= when, f"{said}, before its requester stopped waiting"
            else:
                assert end <= when, f"{said}: its requester was not told then"
                if end == when and outcome != "cancelled":
                    assert (outcome, request.get("reason")) in (
                        ("failed", reason),
                        ("timeout", None),  # (its deadline came at the same time)
                    ), said
        if outcome == "failed":
            assert lettered.get(seq, ("", -1.0)) == (request["reason"], end), said
        elif outcome == "answer":
            assert journal.returned_msg[seq] == 1 and seq not in lettered, said
        elif outcome == "timeout":
            assert end - start == pytest.approx(request["timeout"], abs=1e-6), said
        elif outcome == "cancelled":
            # (at its time, or before: with its handler, or with the block at the end)
            assert end <= request["gives_up"] + 1e-9, said
        if outcome in ("timeout", "cancelled"):
            # its requester stopped waiting: the query is skipped in the queue, or its
            # handler cancelled (a handler that returned then answered in time)
            assert journal.entered_at.get(seq, end) <= end, f"{said}: handled after it"
            assert journal.returned_at.get(seq, end) <= end, f"{said}: handled on after it"
            if seq in journal.entered_at and seq not in journal.returned_at and seq in lettered:
                # (a handler under way then is cancelled then, not left to its timeout;
                # one that failed by then is dead-lettered for its failure)
                assert lettered[seq][1] <= end, f"{said}: its handler ran on"
    # an answer goes to its requester, or is dead-lettered late_reply once nobody waits
    # for it: never unroutable (the test's handlers answer queries only)
    unroutable = [d for d in journal.letters if d.reason is DeadLetterReason.UNROUTABLE_REPLY]
    assert not unroutable, unroutable


def check_end(journal: Journal, kernel: Any, ending: str) -> None:
    stats = kernel.stats()
    assert stats.in_flight == stats.sends_waiting == 0, stats
    assert stats.agents_alive == 0, stats
    assert_conserved(kernel)
    assert not journal.problems, journal.problems
    # the root gave up to the kernel (escalate_to_kernel) exactly when the block raised
    # SupervisorEscalation
    root = kernel.describe()["id"]
    gave_up = [e for e in journal.events if e.kind is EventKind.ESCALATED]
    gave_up = [e for e in gave_up if str(e.agent_id) == root]
    assert bool(gave_up) == (journal.escalation is not None), (gave_up, journal.escalation)
    # runs: every on_start that returned has exactly one on_stop, none handled after it
    assert all(journal.stops[t] == 1 for t in journal.returned), "an on_start without on_stop"
    assert all(n == 1 for n in journal.stops.values()), "a run stopped twice"
    assert not journal.handled_late, journal.handled_late
    for token, phase in journal.phase_at_start.items():
        assert phase < KernelPhase.STOPPING, f"run {token} started as the tree stopped"
    # linked children: stopped before the parent's on_stop (unless spawned in it), and none
    # started after it began
    for child, (parent, in_stop) in journal.parent_of.items():
        if in_stop or parent not in journal.stopping or child not in journal.entered:
            continue
        assert journal.entered[child] < journal.stopping[parent], (
            f"linked child run {child} started after its parent {parent}'s on_stop began"
        )
        if child in journal.stopping:
            assert journal.stopping[child] < journal.stopping[parent], (
                f"linked child run {child} stopped after its parent {parent}"
            )
    # messages: each accepted one handled or dead-lettered, exactly once, never both
    dead: Counter[int] = Counter()
    reasons: dict[int, DeadLetterReason] = {}
    for letter in journal.letters:
        payload = letter.message.payload
        if isinstance(payload, tuple) and len(payload) == 2 and isinstance(payload[1], int):
            dead[payload[1]] += 1
            reasons[payload[1]] = letter.reason
    for seq in journal.accepted | journal.asked:
        handled, lettered = journal.returned_msg[seq], dead[seq]
        assert journal.entered_msg[seq] <= 1, f"message {seq} handled twice"
        assert handled + lettered <= 1, f"message {seq}: handled {handled}, dead {lettered}"
        if seq in journal.accepted:
            assert handled + lettered == 1, f"message {seq} accepted, then lost"
    for seq in journal.raised:
        assert not journal.entered_msg[seq] and not dead[seq], (
            f"message {seq}: its send raised, yet it was handled or dead-lettered"
            f" ({reasons.get(seq)})"
        )
    check_requests(journal)
    check_drained_stops(journal, kernel)
    # the counters agree with what the test counted
    assert len(journal.letters) == stats.dead_lettered, (len(journal.letters), stats)
    by_reason = Counter(letter.reason.value for letter in journal.letters)
    assert by_reason == Counter(stats.dead_letters_by_reason), (by_reason, stats)
    assert stats.handled == journal.handled_calls, (stats.handled, journal.handled_calls)
    assert stats.failed == by_reason["handler_error"], stats
    assert stats.restarts == sum(e.kind is EventKind.RESTARTED for e in journal.events)
    # events: one stopped event per agent and supervisor, its last
    kinds: dict[Any, list[EventKind]] = {}
    for e in journal.events:
        kinds.setdefault(e.agent_id, []).append(e.kind)
    # (the root's only event is its give-up to the kernel: the kernel's, never spawned)
    kinds.pop(uuid.UUID(root), None)
    for agent_id, seen in kinds.items():
        assert seen[-1] is EventKind.STOPPED, (agent_id, seen)
        assert seen.count(EventKind.STOPPED) == 1, (agent_id, seen)
    stopped = {e.agent_id for e in journal.events if e.kind is EventKind.STOPPED}
    stopped_names = {e.name for e in journal.events if e.kind is EventKind.STOPPED}
    for entry in journal.known:
        # everything spawned stopped for good, once (also what never started: a child
        # added to a supervisor as it stopped, a linked child of a run as it ended)
        if entry["ref"] is not None:
            assert entry["ref"].id in stopped, f"{entry['ref']} spawned, never stopped"
        else:
            assert entry["name"] in stopped_names, f"{entry['name']} spawned, never stopped"
    for ref in journal.gone:
        assert ref.id in stopped, f"{ref}: its stop returned, no stopped event"
    # monitors: a notice of a stop for good (not of one before the monitor: "noproc")
    # at most once for each watcher and target, handled or dead-lettered; exactly once if
    # the watcher asked while the target ran, never took it back, and lived on until
    # the shutdown after the target stopped for good
    stop_event: dict[Any, LifecycleEvent] = {
        e.agent_id: e for e in journal.events if e.kind is EventKind.STOPPED
    }
    order = {e.agent_id: i for i, e in enumerate(journal.events) if e.kind is EventKind.STOPPED}
    told: Counter[tuple[Any, Any]] = Counter()
    for pair, notices in journal.notices.items():
        told[pair] += sum(n == "stopped" and r != "noproc" for n, r in notices)
    for letter in journal.letters:
        msg = letter.message
        if msg.kind is MessageKind.EVENT and isinstance(msg.payload, dict):
            notice = msg.payload
            if notice["event"] == "stopped" and notice["reason"] != "noproc":
                told[(msg.to, uuid.UUID(notice["agent"]))] += 1
    for pair, n in told.items():
        assert n <= 1, f"monitor {pair}: {n} notices of its stop"
    # a notice of a stop for good says the reason its stopped event says
    for (watcher, target), notices in journal.notices.items():
        for event, reason in notices:
            if event == "stopped" and reason != "noproc":
                said = stop_event[target].reason if target in stop_event else None
                assert reason == said, f"monitor ({watcher}, {target}): told {reason!r}, {said!r}"
    for (watcher, target), calls in journal.monitor_calls.items():
        noproc = any(r == "noproc" for _, r in journal.notices.get((watcher, target), []))
        if "demonitor" in calls or "monitor" not in calls or noproc:
            continue
        if target not in stop_event or watcher not in stop_event:
            continue
        if stop_event[target].reason == "shutdown" or stop_event[watcher].reason != "shutdown":
            continue
        if order[target] < order[watcher]:
            assert told[(watcher, target)] == 1, (
                f"monitor ({watcher}, {target}): {told[(watcher, target)]} notices of its stop"
                f" ({stop_event[target].reason})"
            )
