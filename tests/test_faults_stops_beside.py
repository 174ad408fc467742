"""Stops that do not wait for one another: a ``kernel.stop`` asked while its agent's
supervisor carries out another (a draining one takes as long as that agent's queue)
begins at once, beside it, as Akka's ``context.stop`` of each child is its own; a group
restart, the supervisor's own stop and a second stop of the same child wait for it. The
fifty-sixth pass's hunt; each test failed on the code before its fix.

Everything runs on a ``MockClock(autojump_threshold=0)``.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import pytest
import trio
import trio.testing

from nexus_trio import (
    Agent,
    Backoff,
    Context,
    DeadLetterReason,
    EventKind,
    Kernel,
    Message,
    Supervisor,
    agent,
    open_kernel,
)
from nexus_trio._child import Child
from nexus_trio.testing import assert_conserved, record_events

from .conftest import make_config


class Paced(Agent):
    """Takes a second over each message; fails on ``boom``; ``b``'s ``on_stop`` takes
    three seconds, ``e``'s ``on_start`` ``elder_start``. Journals by the time."""

    log: ClassVar[list[tuple[str, str, Any, float]]] = []
    elder_start: ClassVar[float] = 1.0

    async def on_start(self, ctx: Context) -> None:
        if ctx.name == "e":
            await trio.sleep(Paced.elder_start)
        Paced.log.append(("start", ctx.name or "?", None, trio.current_time()))

    async def handle(self, ctx: Context, msg: Message) -> None:
        if msg.payload == "boom":
            raise RuntimeError("boom")
        await trio.sleep(1.0)
        Paced.log.append(("handle", ctx.name or "?", msg.payload, trio.current_time()))

    async def on_stop(self, ctx: Context) -> None:
        Paced.log.append(("on_stop", ctx.name or "?", None, trio.current_time()))
        if ctx.name == "b":
            await trio.sleep(3.0)


def journal(kind: str, name: str) -> list[tuple[Any, float]]:
    return [(e[2], e[3]) for e in Paced.log if e[:2] == (kind, name)]


@pytest.mark.parametrize(("drain", "same_round"), [(False, False), (True, False), (False, True)])
async def test_a_stop_asked_while_the_supervisor_carries_out_another_begins_at_once(
    autojump_clock: Any, drain: bool, same_round: bool
) -> None:
    """``a`` has 10 messages queued, ``b`` 3 (a second each); ``kernel.stop("a",
    drain=True)`` is under way (ten seconds) as ``kernel.stop("b", drain=drain)`` comes
    (or, without drain, both are asked in the same round, ``b``'s queued behind ``a``'s;
    with drain, that case ended at 3 s before too, and is not here).
    ``b``'s stop begins at once: without drain, the message in hand is finished at 1 s,
    the other two dead-lettered ``agent_stopped``, its ``on_stop`` runs and the call
    returns then; with drain it handles its three by 3 s. Before (fifty-sixth pass) it
    waited for the root's loop to finish ``a``'s drain: ``on_stop`` and the return at
    10 s, and a stop without drain had ``b`` handle its whole queue meanwhile (nothing
    dead-lettered)."""
    Paced.log = []
    returned: dict[str, float] = {}

    async def stop(name: str, drain: bool) -> None:
        await kernel.stop(name, drain=drain)
        returned[name] = trio.current_time()

    async with open_kernel(make_config()) as kernel:
        kernel.spawn(agent(Paced, name="a", shutdown_timeout=100))
        kernel.spawn(agent(Paced, name="b", shutdown_timeout=100))
        await trio.testing.wait_all_tasks_blocked()
        for i in range(10):
            await kernel.send("a", i)
        for i in range(3):
            await kernel.send("b", i)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stop, "a", True)
            if not same_round:
                await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(stop, "b", drain)
        letters = [(d.message.payload, d.reason, d.detail) for d in kernel.recent_dead_letters()]
    assert_conserved(kernel)
    assert journal("handle", "a") == [(i, i + 1.0) for i in range(10)]
    assert journal("on_stop", "a") == [(None, 10.0)]
    if drain:
        assert journal("handle", "b") == [(0, 1.0), (1, 2.0), (2, 3.0)]
        assert journal("on_stop", "b") == [(None, 3.0)]
        assert letters == []
    else:
        assert journal("handle", "b") == [(0, 1.0)]
        assert journal("on_stop", "b") == [(None, 1.0)]
        stopped = "agent stopped (stopped)"
        assert letters == [
            (1, DeadLetterReason.AGENT_STOPPED, stopped),
            (2, DeadLetterReason.AGENT_STOPPED, stopped),
        ]
    # (b's on_stop takes 3 s more)
    assert returned == {"a": 10.0, "b": journal("on_stop", "b")[0][1] + 3.0}


async def test_a_group_restart_waits_for_a_stop_begun_beside_and_restarts_nothing_of_it(
    autojump_clock: Any,
) -> None:
    """``s`` (``one_for_all``) [``a``, ``b``, ``c``]: ``a``'s draining stop (two messages,
    2 s) is under way as ``kernel.stop("b")`` comes (``b``'s ``on_stop`` takes 3 s) and
    ``c`` fails at 0.5 s. ``b``'s stop begins at once; the group restart the failure
    asks, handled once ``a`` has stopped, waits for ``b``'s stop and restarts ``c`` alone
    at 3 s: ``b`` stopped once, never restarted. Before (fifty-sixth pass) ``b``'s
    ``on_stop`` began at 2 s, behind ``a``'s drain, and ``c`` was restarted at 5 s."""
    Paced.log = []
    members = [agent(Paced, name=n, shutdown_timeout=100) for n in ("a", "b", "c")]
    async with open_kernel(make_config()) as kernel:
        async with record_events(kernel) as recorder:
            kernel.spawn(
                Supervisor(
                    name="s", strategy="one_for_all", children=members, backoff=Backoff(0, 0)
                )
            )
            await trio.testing.wait_all_tasks_blocked()
            for i in range(2):
                await kernel.send("a", i)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(functools.partial(kernel.stop, "a", drain=True))
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(kernel.stop, "b")
                await trio.sleep(0.5)
                await kernel.send("c", "boom")
            await trio.testing.wait_all_tasks_blocked()
            assert kernel.lookup("c") is not None
    assert_conserved(kernel)
    assert journal("on_stop", "b") == [(None, 0.0)]
    assert journal("start", "b") == [(None, 0.0)]
    assert journal("start", "c") == [(None, 0.0), (None, 3.0)]
    stops = [(e.name, e.reason) for e in recorder.of(EventKind.STOPPED)]
    assert stops == [("a", "stopped"), ("b", "stopped")]
    assert [e.name for e in recorder.of(EventKind.RESTARTED)] == ["c"]


@pytest.mark.parametrize("a_queue", [5, 1])
async def test_a_second_stop_of_a_child_stopped_beside_the_loop_waits_for_the_first(
    autojump_clock: Any, a_queue: int
) -> None:
    """The root's loop drains ``a`` (``a_queue`` messages, a second each) as two draining
    stops of ``w`` come, ``w`` waiting for its elder sibling ``e``'s start (1 s, or 2 s
    when ``a``'s drain is the shorter) with two messages queued. The first begins at
    once, beside the loop: ``w`` starts after ``e``, handles both, and both calls return
    then, nothing dead-lettered. Before (fifty-sixth pass), with ``a``'s drain the
    longer, both waited for it (``w`` handled them at 2 and 3 s as it served, the calls
    returned at 5 s); with the second stop carried out by the loop once ``a``'s drain
    was over, beside the first (a mutant of the fix, the shorter drain), it cancelled
    the start the first waited for and both messages were dead-lettered ``it ended its
    own run during its draining stop``."""
    Paced.log = []
    Paced.elder_start = 1.0 if a_queue == 5 else 2.0
    start = Paced.elder_start
    returned: list[float] = []

    async def stop_w() -> None:
        await kernel.stop("w", drain=True)
        returned.append(trio.current_time())

    async with open_kernel(make_config()) as kernel:
        kernel.spawn(agent(Paced, name="a", shutdown_timeout=100))
        await trio.testing.wait_all_tasks_blocked()
        kernel.spawn(agent(Paced, name="e", shutdown_timeout=100))
        kernel.spawn(agent(Paced, name="w", shutdown_timeout=100))
        for i in range(a_queue):
            await kernel.send("a", i)
        for i in ("x", "y"):
            await kernel.send("w", i)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(kernel.stop, "a", drain=True))
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(stop_w)
            nursery.start_soon(stop_w)
        letters = [(d.message.payload, d.reason, d.detail) for d in kernel.recent_dead_letters()]
    assert_conserved(kernel)
    assert letters == []
    assert journal("start", "w") == [(None, start)]
    assert journal("handle", "w") == [("x", start + 1), ("y", start + 2)]
    assert returned == [start + 2, start + 2]
    assert journal("on_stop", "a") == [(None, float(a_queue))]


async def test_a_draining_stop_of_a_child_added_behind_the_loop_s_stop_handles_its_queue(
    autojump_clock: Any,
) -> None:
    """The root's loop drains ``a`` (three messages, 3 s) as ``x`` is spawned (its start
    queued behind that stop), sent two messages and stopped with drain. ``x``'s stop waits
    for the loop to start it, then drains: both handled, nothing dead-lettered. With the
    stop begun beside the loop at once (the fix before its review, a named mutant: no
    ``child.run == 0`` in ``_begin_beside``) ``x`` was never started and both were
    dead-lettered ``agent stopped (stopped)`` (gentle2 seed 3651); main's serial loop
    passes it."""
    Paced.log = []
    async with open_kernel(make_config()) as kernel:
        kernel.spawn(agent(Paced, name="a", shutdown_timeout=100))
        await trio.testing.wait_all_tasks_blocked()
        for i in range(3):
            await kernel.send("a", i)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(kernel.stop, "a", drain=True))
            await trio.testing.wait_all_tasks_blocked()
            kernel.spawn(agent(Paced, name="x", shutdown_timeout=100))
            for i in ("p", "q"):
                await kernel.send("x", i)
            nursery.start_soon(functools.partial(kernel.stop, "x", drain=True))
        letters = [(d.message.payload, d.reason, d.detail) for d in kernel.recent_dead_letters()]
    assert_conserved(kernel)
    assert letters == []
    assert journal("start", "x") == [(None, 3.0)]
    assert journal("handle", "x") == [("p", 4.0), ("q", 5.0)]


async def stop_then_drain(kernel: Kernel, first: str, then: str, *, after: float) -> None:
    """``kernel.stop(first)`` (no drain) and, ``after`` seconds into it,
    ``kernel.stop(then, drain=True)``; returns once both have returned."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(kernel.stop, first)
        await trio.sleep(after)
        nursery.start_soon(functools.partial(kernel.stop, then, drain=True))


class Spawner(Paced):
    """A ``Paced`` that spawns a linked child, ``e2``, as it starts."""

    async def on_start(self, ctx: Context) -> None:
        await super().on_start(ctx)
        ctx.spawn(agent(Paced, name="e2"))


async def test_a_child_failing_during_its_draining_stop_begun_beside_is_not_restarted(
    autojump_clock: Any,
) -> None:
    """The root's loop stops ``a`` (no drain: its message in hand, 1 s) as a draining
    stop of ``b`` comes, beside it; ``b`` spawned ``e2``, so its stop hands its queue on
    (``b0``, then ``boom``) before it is marked stopping, and ``boom`` fails its run at
    1 s. The failure is the stop's: reported, ``b`` not restarted, the rest of its queue
    dead-lettered saying its run failed during its draining stop. Before (fifty-sixth
    pass, review) the exit was queued to the loop, free again once ``a`` had stopped,
    which restarted ``b`` (``restarted``, a second ``on_start`` at 1 s and a second
    ``e2``) to handle ``b2`` and ``b3`` within its stop."""
    Paced.log = []
    async with open_kernel(make_config()) as kernel:
        async with record_events(kernel) as recorder:
            kernel.spawn(agent(Paced, name="a", shutdown_timeout=100))
            kernel.spawn(agent(Spawner, name="b", shutdown_timeout=100))
            await trio.testing.wait_all_tasks_blocked()
            for i in range(3):
                await kernel.send("a", i)
            for payload in ("b0", "boom", "b2", "b3"):
                await kernel.send("b", payload)
            await stop_then_drain(kernel, "a", "b", after=0.1)
        letters = [(d.message.payload, d.reason, d.detail) for d in kernel.recent_dead_letters()]
    assert_conserved(kernel)
    assert recorder.kinds("b") == [
        EventKind.SPAWNED,
        EventKind.STARTED,
        EventKind.FAILED,
        EventKind.STOPPED,
    ]
    assert journal("start", "b") == [(None, 0.0)]
    assert journal("handle", "b") == [("b0", 1.0)]
    assert [e.name for e in recorder.of(EventKind.SPAWNED)].count("e2") == 1
    failed = "agent stopped (stopped): its run failed during its draining stop (RuntimeError)"
    assert [(p, r) for p, r, _ in letters if p in ("boom", 1, 2)] == [
        ("boom", DeadLetterReason.HANDLER_ERROR),
        (1, DeadLetterReason.AGENT_STOPPED),
        (2, DeadLetterReason.AGENT_STOPPED),
    ]
    assert [letter for letter in letters if letter[0] in ("b2", "b3")] == [
        ("b2", DeadLetterReason.AGENT_STOPPED, failed),
        ("b3", DeadLetterReason.AGENT_STOPPED, failed),
    ]


class Idle(Agent):
    async def handle(self, ctx: Context, msg: Message) -> None:
        pass


class _CountedReads:
    """``Child.linked_parent``, its reads counted."""

    def __init__(self, field: Any) -> None:
        self.field = field
        self.reads = 0

    def __get__(self, child: Any, owner: Any) -> Any:
        if child is None:
            return self
        self.reads += 1
        return self.field.__get__(child, owner)

    def __set__(self, child: Any, value: Any) -> None:
        self.field.__set__(child, value)


async def test_stops_begun_beside_the_loop_look_up_their_links_not_every_stop(
    autojump_clock: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """2,000 agents, each stopped by its own ``kernel.stop`` in one round: the loop
    carries out the first, the others begin beside it, each asking whether a stop under
    way stops it too (what it spawned, what spawned it) by a look-up up its own links:
    a few reads of ``linked_parent`` each. Before (fifty-sixth pass, review) each walked
    every stop under way: 2,000,999 reads here, and 10,000 such stops took 41 s (6 s
    with the loop's serial stops before the stops beside)."""
    n = 2000
    counted = _CountedReads(Child.__dict__["linked_parent"])
    async with open_kernel(make_config()) as kernel:
        refs = [kernel.spawn(agent(Idle, shutdown_timeout=100)) for _ in range(n)]
        await trio.testing.wait_all_tasks_blocked()
        for ref in refs:
            kernel.send_nowait(ref, "x")
        await trio.testing.wait_all_tasks_blocked()
        monkeypatch.setattr(Child, "linked_parent", counted)
        async with trio.open_nursery() as nursery:
            for ref in refs:
                nursery.start_soon(kernel.stop, ref)
        reads = counted.reads
        stopped = kernel.stats().agents_alive
    assert_conserved(kernel)
    assert stopped == 0
    assert reads <= 4 * n, reads
