"""Fault injection, forty-second pass (issue 11): the supervision tree with monitors
across branches, requests in flight with deadlines, hanging code and stops at random
points.

``test_trees_with_monitors_requests_and_hangs_keep_their_promises``: random nested
trees (all three strategies) of agents that monitor agents of other branches, ask each
other (``ctx.request``) and are asked from outside (``kernel.request``) with random
deadlines, hang in a handler, in a ``ctx.nursery`` task or in ``on_stop``, fail there or
in ``on_start`` (or never return from it), stop other agents and supervisors (from a
handler or ``on_stop``), request themselves or others from a handler or ``on_stop``,
spawn linked children from ``on_start``, handlers and ``on_stop`` (also
from a handler that finishes while its agent stops, and from a background task as it is
cancelled); ``kernel.stop`` of any of them and the shutdown (with a random grace, from
outside or from a handler) land at random points; a cancel around the block at 1800 mock
s ends a drain that has no end. Properties: the kernel closes in bounded mock time and
leaves no task (this found the close that never saw that cancel: see test_kernel_close.py's
``test_a_cancel_that_comes_while_the_close_waits_for_an_endless_drain_ends_it``); every
accepted message is handled or dead-lettered with a reason (``assert_conserved``, and
no reason empty); every
``on_start`` that returned has exactly one ``on_stop``, and no run stops twice; linked
children stop before their parent's ``on_stop``; no request outlives its deadline, and
each ends with an answer or one of the documented errors; a watcher handles at most one
final ``stopped`` notice of a target (``noproc`` aside), never a ``failed`` after it,
and no more ``failed`` notices than the target has ``failed`` events; a watcher still
there when its target stopped for good was told (the notice handled or dead-lettered);
a supervisor's ``stopped`` event comes after those of everything under it.

Derandomized, no example database (``fault_settings``): CI runs the examples a developer
runs. Each example runs on a ``MockClock(autojump_threshold=0)`` inside
``trio.fail_after``, with a real-time guard for a hang in a shielded shutdown.
"""

from __future__ import annotations

import itertools
import math
import random
import uuid
from collections import Counter
from contextlib import suppress
from typing import Any

import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from nexus_trio import (
    Agent,
    AgentNotFound,
    AgentNotRunning,
    Backoff,
    Config,
    Context,
    EventKind,
    KernelConfig,
    KernelShuttingDown,
    MailboxFull,
    Message,
    RequestFailed,
    RequestTimeout,
    SupervisionConfig,
    Supervisor,
    SupervisorEscalation,
    agent,
    open_kernel,
)
from nexus_trio.testing import assert_conserved

from .hang_guard import fault_settings, tasks_living
from .test_tree_properties import (
    MOCK_LIMIT,
    RESTART_TYPES,
    STRATEGIES,
    Tree,
    build,
    check_linked_stop_first,
    check_runs_stopped_once,
    forests,
    random_supervisor,
    run_example,
    subtree_members,
)

DIRECTIVES = ("restart", "restart", "resume", "stop", "escalate")
OVERFLOWS = ("block", "block", "drop_newest", "drop_oldest", "reject")

#: what a request may end with, besides an answer
REQUEST_ERRORS = (
    RequestTimeout,
    RequestFailed,
    AgentNotFound,
    MailboxFull,
    KernelShuttingDown,
    AgentNotRunning,
)


@fault_settings(300)
@given(forest=forests, seed=st.integers(0, 2**32 - 1))
def test_trees_with_monitors_requests_and_hangs_keep_their_promises(
    forest: list[Tree], seed: int
) -> None:
    rng = random.Random(seed)
    tokens = itertools.count()
    entered: Counter[int] = Counter()
    returned: Counter[int] = Counter()
    stopped: Counter[int] = Counter()
    stop_order: dict[int, int] = {}
    #: linked children spawned by each run (token) before its stop began, by id
    spawned_by: dict[int, list[uuid.UUID]] = {}
    runs_of: dict[uuid.UUID, list[int]] = {}
    #: (how it ended, mock seconds it took, its timeout) of every request
    requests: list[tuple[str, float, float]] = []
    #: (watcher, target, event, reason) of every notice handled, in order
    notices: list[tuple[uuid.UUID, uuid.UUID, str, str]] = []
    failed_events: Counter[uuid.UUID] = Counter()
    #: (watcher, target) of every monitor set, and of every stopped notice dead-lettered
    monitored: set[tuple[uuid.UUID, uuid.UUID]] = set()
    notices_dead: set[tuple[uuid.UUID, uuid.UUID]] = set()
    #: every agent stopped for good, by id, in the order of its stopped event
    retired_order: dict[uuid.UUID, int] = {}
    #: the names of the tree's agents and supervisors, in the order of their stopped events
    stopped_names: list[str] = []
    stopping: set[int] = set()
    kernels: list[Any] = []
    agent_names: list[str] = []
    all_names: list[str] = []
    linked_ids: list[uuid.UUID] = []

    async def timed_request(ask: Any, to: Any, payload: Any, timeout: float) -> None:
        start = trio.current_time()
        try:
            answer = await ask(to, payload, timeout=timeout)
        except REQUEST_ERRORS as exc:
            outcome = type(exc).__name__
        else:
            assert answer == "ok", answer
            outcome = "answered"
        requests.append((outcome, trio.current_time() - start, timeout))

    def make_node(depth: int, kind: str = "full") -> type[Agent]:
        class Node(Agent):
            def __init__(self) -> None:
                self.token = next(tokens)
                self.rng = random.Random(rng.random())

            def spawn(self, ctx: Context, *, in_stop: bool = False) -> None:
                if depth >= 2:
                    return
                restart = self.rng.choice(RESTART_TYPES)
                target: Any
                if self.rng.random() < 0.8:
                    target = agent(
                        make_node(depth + 1, self.rng.choice(["full", "full", "lazy"])),
                        restart=restart,
                        shutdown_timeout=self.rng.choice([None, 0.2]),
                    )
                else:
                    target = Supervisor(
                        strategy=self.rng.choice(STRATEGIES),
                        max_restarts=self.rng.randint(0, 3),
                        backoff=Backoff(0.001, 0.01),
                        restart=restart,
                        children=[agent(make_node(depth + 1)) for _ in range(2)],
                    )
                with suppress(KernelShuttingDown, AgentNotRunning):
                    ref = ctx.spawn(target)
                    linked_ids.append(ref.id)
                    if not in_stop and self.token not in stopping:
                        spawned_by.setdefault(self.token, []).append(ref.id)

            async def background(self, ctx: Context, how: str, delay: float) -> None:
                if how == "hang":
                    await trio.sleep_forever()
                if how == "spawn_when_cancelled":
                    try:
                        await trio.sleep_forever()
                    finally:
                        self.spawn(ctx, in_stop=True)
                await trio.sleep(delay)
                if how == "fail":
                    raise RuntimeError("background fails")

            def start_background(self, ctx: Context) -> None:
                ctx.nursery.start_soon(
                    self.background,
                    ctx,
                    self.rng.choice(["hang", "fail", "return", "spawn_when_cancelled"]),
                    self.rng.choice([0.0, 0.01, 0.3, 3.0]),
                )

            def monitor_someone(self, ctx: Context) -> None:
                if agent_names:
                    with suppress(AgentNotFound):
                        target = ctx.kernel.lookup(self.rng.choice(agent_names))
                        ctx.monitor(target)
                        monitored.add((ctx.id, target.id))

            async def on_start(self, ctx: Context) -> None:
                entered[self.token] += 1
                runs_of.setdefault(ctx.id, []).append(self.token)
                if self.rng.random() < 0.5:
                    self.monitor_someone(ctx)
                for _ in range(self.rng.choice([0, 0, 1])):
                    self.spawn(ctx)
                if self.rng.random() < 0.3:
                    self.start_background(ctx)
                if self.rng.random() < 0.1:
                    await trio.sleep(self.rng.choice([0.001, 0.05]))
                if self.rng.random() < 0.08:
                    raise RuntimeError("on_start fails")
                if self.rng.random() < 0.04:
                    await trio.sleep_forever()
                returned[self.token] += 1

            async def handle(self, ctx: Context, msg: Message) -> Any:
                payload = msg.payload
                if isinstance(payload, dict):
                    # a monitor's notice
                    notices.append(
                        (ctx.id, uuid.UUID(payload["agent"]), payload["event"], payload["reason"])
                    )
                    return None
                action, argument = payload
                if action == "sleep":
                    await trio.sleep(argument)
                elif action == "hang":
                    await trio.sleep_forever()
                elif action == "fail":
                    raise RuntimeError("handler fails")
                elif action == "spawn":
                    self.spawn(ctx)
                elif action == "spawn_late":
                    # (finishes while its agent stops, if it has a shutdown_timeout)
                    await trio.sleep(argument)
                    self.spawn(ctx)
                elif action == "background":
                    self.start_background(ctx)
                elif action == "monitor":
                    self.monitor_someone(ctx)
                elif action == "request":
                    name, timeout = argument
                    await timed_request(ctx.request, name, ("ok", None), timeout)
                elif action == "exit":
                    ctx.stop()
                elif action == "stop_other":
                    with suppress(AgentNotFound):
                        await ctx.kernel.stop(ctx.kernel.lookup(argument))
                elif action == "request_self":
                    await timed_request(ctx.request, ctx.id, ("ok", None), argument)
                elif action == "shutdown":
                    await ctx.kernel.shutdown(grace=argument)
                return "ok"

            async def on_stop(self, ctx: Context) -> None:
                stopping.add(self.token)
                stopped[self.token] += 1
                stop_order[self.token] = len(stop_order)
                r = self.rng.random()
                if r < 0.1:
                    self.spawn(ctx, in_stop=True)
                elif r < 0.2:
                    await trio.sleep(self.rng.choice([0.01, 0.5]))
                elif r < 0.25:
                    await trio.sleep_forever()
                elif r < 0.35:
                    raise OSError("on_stop fails")
                elif r < 0.4 and all_names:
                    with suppress(AgentNotFound):
                        await ctx.kernel.stop(ctx.kernel.lookup(self.rng.choice(all_names)))
                elif r < 0.45 and all_names:
                    await timed_request(
                        ctx.request, self.rng.choice(agent_names), ("ok", None), 0.3
                    )

        if kind == "lazy":
            del Node.on_start
        return Node

    sup_names: list[str] = []
    counter = itertools.count()
    # A supervisor past its shutdown_timeout is cancelled with its whole subtree at once
    # (as OTP's brutal_kill): the stop order below it is not kept then.
    sup_timeouts = rng.random() < 0.2
    specs = [
        build(
            tree,
            lambda name: agent(
                make_node(0, rng.choice(["full", "full", "lazy"])),
                name=name,
                restart=rng.choice(RESTART_TYPES),
                shutdown_timeout=rng.choice([None, None, 0.2, 1.0]),
                on_error=rng.choice(DIRECTIVES),
                overflow=rng.choice(OVERFLOWS),
            ),
            random_supervisor(rng, 0.05, 0.3 if sup_timeouts else None),
            counter,
            agent_names,
            sup_names,
        )
        for tree in forest
    ]
    all_names.extend(agent_names + sup_names)
    config = Config(
        kernel=KernelConfig(
            dead_letter_buffer=100_000,
            shutdown_grace_ms=rng.choice([0, 100, 1000]),
            handle_timeout_ms=rng.choice([200, 1000]),
            send_timeout_ms=100,
            mailbox_capacity=rng.choice([4, 1024]),
        ),
        supervision=SupervisionConfig(
            max_restarts=rng.randint(1, 5),
            backoff_initial_ms=1,
            backoff_max_ms=50,
            escalate_to_kernel=rng.random() < 0.15,
        ),
    )
    actions = (
        "ok",
        "sleep",
        "hang",
        "fail",
        "spawn",
        "spawn_late",
        "background",
        "monitor",
        "request",
        "request",
        "exit",
        "stop_other",
        "request_self",
    )
    plan: list[tuple[Any, ...]] = []
    for _ in range(rng.randint(0, 30) if agent_names else 0):
        r = rng.random()
        if r < 0.1:
            plan.append(("stop", rng.choice([*agent_names, *sup_names, "linked", "linked"])))
        elif r < 0.2:
            plan.append(("pause", rng.choice([0.001, 0.01, 0.1, 0.5])))
        elif r < 0.35:
            timeout = rng.choice([0.001, 0.05, 0.3, 2.0])
            plan.append(("request", rng.choice(agent_names + sup_names[:1]), timeout))
        elif r < 0.37:
            plan.append(("shutdown", rng.choice([None, 0.0, 0.05, math.inf])))
        else:
            action = rng.choice(actions)
            argument: Any = None
            if action in ("sleep", "spawn_late"):
                argument = rng.choice([0.01, 0.2, 2.0])
            elif action == "request":
                argument = (rng.choice(agent_names), rng.choice([0.001, 0.05, 0.3, 2.0]))
            elif action == "stop_other":
                argument = rng.choice(agent_names + sup_names)
            elif action == "request_self":
                argument = rng.choice([0.001, 0.3])
            if rng.random() < 0.02:
                action, argument = "shutdown", rng.choice([None, 0.0, 0.05])
            plan.append(("send", rng.choice(agent_names), (action, argument)))
    stop_after = rng.choice([0.0, 0.001, 0.05, 0.5, 5.0])
    stats: Any = None
    dead_reasons: Counter[str] = Counter()

    async def scenario() -> None:
        nonlocal stats
        baseline = tasks_living()
        # A drain may have no end (``shutdown(grace=math.inf)``, an ``on_start`` that
        # never returns holding a message): the cancel at half the limit ends it.
        with trio.fail_after(MOCK_LIMIT):
            # (the streams' readers outside that cancel: they read to the streams' end)
            async with trio.open_nursery() as readers:
                with trio.move_on_after(MOCK_LIMIT / 2):
                    async with trio.open_nursery() as outside:
                        # (with escalate_to_kernel, the kernel shuts itself down and says so)
                        with suppress(SupervisorEscalation):
                            async with open_kernel(config, seed=seed) as kernel:
                                kernels.append(kernel)
                                events = kernel.events(100_000)
                                dead = kernel.dead_letters(100_000)

                                async def collect_events() -> None:
                                    async for event in events:
                                        if event.kind is EventKind.FAILED:
                                            failed_events[event.agent_id] += 1
                                        elif event.kind is EventKind.STOPPED:
                                            retired_order[event.agent_id] = len(retired_order)
                                            if event.name:
                                                stopped_names.append(event.name)

                                async def collect_dead() -> None:
                                    async for letter in dead:
                                        dead_reasons[letter.reason.value] += 1
                                        payload = letter.message.payload
                                        if (
                                            isinstance(payload, dict)
                                            and payload["event"] == "stopped"
                                        ):
                                            target = uuid.UUID(payload["agent"])
                                            watcher = uuid.UUID(str(letter.recipient))
                                            notices_dead.add((watcher, target))

                                readers.start_soon(collect_events)
                                readers.start_soon(collect_dead)
                                for spec in specs:
                                    kernel.spawn(spec)

                                async def stop(name: str) -> None:
                                    with suppress(AgentNotFound):
                                        if name == "linked":
                                            if linked_ids:
                                                await kernel.stop(rng.choice(linked_ids))
                                        else:
                                            await kernel.stop(kernel.lookup(name))

                                for step in plan:
                                    with suppress(AgentNotFound, MailboxFull, KernelShuttingDown):
                                        if step[0] == "stop":
                                            outside.start_soon(stop, step[1])
                                        elif step[0] == "pause":
                                            await trio.sleep(step[1])
                                        elif step[0] == "request":
                                            outside.start_soon(
                                                timed_request,
                                                kernel.request,
                                                step[1],
                                                ("ok", None),
                                                step[2],
                                            )
                                        elif step[0] == "shutdown":
                                            outside.start_soon(kernel.shutdown, step[1])
                                        else:
                                            await kernel.send(step[1], step[2])
                                await trio.sleep(stop_after)
        assert tasks_living() == baseline, "the kernel left tasks behind"
        stats = kernels[0].stats()
        assert stats.in_flight == 0
        assert_conserved(kernels[0])

    run_example(scenario)

    # Every message accepted was handled or dead-lettered with a reason.
    assert sum(dead_reasons.values()) == stats.dead_lettered
    assert all(dead_reasons), f"a dead letter without a reason: {dead_reasons}"
    assert dict(stats.dead_letters_by_reason) == {
        reason: n for reason, n in dead_reasons.items() if n
    }
    # Runs: one on_stop for each on_start that returned; linked children stop first.
    check_runs_stopped_once(entered, returned, stopped)
    if not sup_timeouts:
        check_linked_stop_first(spawned_by, runs_of, returned, stop_order)
    # A supervisor stops for good after everything under it.
    where = {name: i for i, name in enumerate(stopped_names)}
    assert len(where) == len(stopped_names), f"stopped twice: {stopped_names}"
    for sup, under in subtree_members(forest).items():
        for name in under:
            if sup in where and name in where:
                assert where[name] < where[sup], f"{name} stopped after {sup}, above it"
    # Requests: none outlives its deadline.
    late = [(outcome, took, limit) for outcome, took, limit in requests if took > limit + 1e-9]
    assert not late, f"requests that outlived their deadline (outcome, took, timeout): {late}"
    # Monitors: one final stopped at most, no failed after it, no failed made up.
    final: Counter[tuple[uuid.UUID, uuid.UUID]] = Counter()
    failed_seen: Counter[tuple[uuid.UUID, uuid.UUID]] = Counter()
    for watcher, target, event, reason in notices:
        pair = (watcher, target)
        if event == "stopped" and reason != "noproc":
            final[pair] += 1
        elif event == "failed":
            assert not final[pair], f"a failed notice after the final stopped: {pair}"
            failed_seen[pair] += 1
            assert failed_seen[pair] <= failed_events[target], "a failed notice made up"
    assert all(n <= 1 for n in final.values()), f"a target stopped twice for a watcher: {final}"
    # ... and a watcher still there when its target stopped for good was told, the notice
    # handled or dead-lettered (none is sent to a watcher that stopped first).
    told = {(w, t) for w, t, event, _ in notices if event == "stopped"} | notices_dead
    untold = [
        (w, t)
        for w, t in monitored
        if retired_order.get(w, math.inf) > retired_order[t] and (w, t) not in told
    ]
    assert not untold, f"watchers never told their target stopped: {untold}"
