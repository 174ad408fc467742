"""A draining stop of an agent that spawned others (a pool's router, a ``ctx.spawn``
parent) whose run fails during the drain: the fifty-seventh pass's hunt (a fuzz driver of
random trees, stops, failures and shutdowns under a ``MockClock``). Each test failed on
the code before its fix.

Everything runs on a ``MockClock(autojump_threshold=0)``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
import trio
import trio.testing

from nexus_trio import Agent, Context, DeadLetterReason, Message, agent, open_kernel
from nexus_trio.testing import assert_conserved

from .conftest import make_config
from .test_faults_stops_beside import stop_then_drain


class Parent(Agent):
    """``b`` spawns ``e2`` as it starts; a message takes a second, ``boom`` fails the run.
    Journals ``on_stop`` by the time."""

    log: ClassVar[list[tuple[str, str, float]]] = []

    async def on_start(self, ctx: Context) -> None:
        if ctx.name == "b":
            ctx.spawn(agent(Parent, name="e2"))

    async def handle(self, ctx: Context, msg: Message) -> None:
        if msg.payload == "boom":
            raise RuntimeError("boom")
        await trio.sleep(1.0)

    async def on_stop(self, ctx: Context) -> None:
        Parent.log.append(("on_stop", ctx.name or "?", trio.current_time()))


def stop_b_failing(to_e2: tuple[str, ...]) -> list[tuple[Any, DeadLetterReason, str]]:
    """A kernel of its own (``trio.run``, a ``MockClock``): ``b`` spawns ``e2``, which is
    sent ``to_e2``; ``b0``, ``boom`` and ``b2`` are queued as the root's loop carries out
    ``kernel.stop("b", drain=True)``. Returns the kernel's letters (Trio picks the order
    of a round's tasks anew in each)."""

    async def one() -> list[tuple[Any, DeadLetterReason, str]]:
        async with open_kernel(make_config()) as kernel:
            kernel.spawn(agent(Parent, name="b", shutdown_timeout=100))
            await trio.testing.wait_all_tasks_blocked()
            for payload in to_e2:
                await kernel.send("e2", payload)
            for payload in ("b0", "boom", "b2"):
                await kernel.send("b", payload)
            await kernel.stop("b", drain=True)
            letters = [
                (d.message.payload, d.reason, d.detail) for d in kernel.recent_dead_letters()
            ]
        assert_conserved(kernel)
        return letters

    return trio.run(one, clock=trio.testing.MockClock(autojump_threshold=0))


@pytest.mark.parametrize("beside", [False, True])
async def test_a_spawner_failing_during_its_draining_stop_stops_at_once(
    autojump_clock: Any, beside: bool
) -> None:
    """``b`` (``shutdown_timeout`` 100 s) spawned ``e2``; ``b0``, ``boom`` and ``b2`` are
    queued as ``kernel.stop("b", drain=True)`` comes (by the root's loop, or beside it
    while the loop stops ``a``). ``b0`` is handled by 1 s, ``boom`` fails the run: the
    stop is over then, ``e2``'s ``on_stop`` before ``b``'s, ``b2`` dead-lettered
    ``agent_stopped``, and the call returns at 1 s. Before (fifty-seventh pass) the stop's
    wait for ``b``'s queue (handed on before ``e2`` drains) waited a second time once the
    run was over, for an idle that never came: the call returned at 100 s, ``b``'s
    timeout (never, and the kernel's shutdown neither, for an infinite one)."""
    Parent.log = []
    returned: list[float] = []
    async with open_kernel(make_config()) as kernel:
        kernel.spawn(agent(Parent, name="a", shutdown_timeout=100))
        kernel.spawn(agent(Parent, name="b", shutdown_timeout=100))
        await trio.testing.wait_all_tasks_blocked()
        await kernel.send("a", "a0")
        for payload in ("b0", "boom", "b2"):
            await kernel.send("b", payload)
        async with trio.open_nursery() as nursery:
            if beside:
                nursery.start_soon(kernel.stop, "a")
                await trio.testing.wait_all_tasks_blocked()

            async def stop_b() -> None:
                await kernel.stop("b", drain=True)
                returned.append(trio.current_time())

            nursery.start_soon(stop_b)
        letters = [(d.message.payload, d.reason) for d in kernel.recent_dead_letters()]
    assert_conserved(kernel)
    assert returned == [1.0]
    assert [e for e in Parent.log if e[1] != "a"] == [("on_stop", "e2", 1.0), ("on_stop", "b", 1.0)]
    assert [letter for letter in letters if letter[0] != "a0"] == [
        ("boom", DeadLetterReason.HANDLER_ERROR),
        ("b2", DeadLetterReason.AGENT_STOPPED),
    ]


def test_a_spawner_failing_during_the_loop_s_draining_stop_says_its_run_failed() -> None:
    """``b`` spawned ``e2``; ``b0``, ``boom`` and ``b2`` are queued as the root's loop
    carries out ``kernel.stop("b", drain=True)``; ``boom`` fails the run. ``b2`` is
    dead-lettered ``agent_stopped`` saying the run failed during its draining stop, as
    beside the loop and for an agent that spawned nothing. Before (fifty-seventh pass)
    the exit of a run the loop's own stop had not marked yet (it waits for the queue to
    be handed on first) went to the loop's queue, and the letter said plain ``agent
    stopped (stopped)``: in 67 of 200 kernels (Trio picks the order of a round's tasks,
    so 30 kernels here: each a chance of about 1 in 3 on that code)."""
    failed = "agent stopped (stopped): its run failed during its draining stop (RuntimeError)"
    for _ in range(30):
        letters = stop_b_failing(())
        assert letters[1:] == [("b2", DeadLetterReason.AGENT_STOPPED, failed)]


async def test_a_draining_stop_of_a_linked_child_its_parent_s_plain_stop_stops_says_so(
    autojump_clock: Any,
) -> None:
    """``b`` spawned ``e2``, which holds ``c0`` (in hand), ``c1`` and ``c2``;
    ``kernel.stop("b")`` (no drain) stops ``e2`` first, and half a second later
    ``kernel.stop("e2", drain=True)`` comes. The plain stop under way stands, as for a
    draining stop after a plain one of the agent itself (Akka's ``PoisonPill`` queued
    behind ``context.stop``): ``c0`` finished, ``c1`` and ``c2`` dead-lettered
    ``agent_stopped``, ``agent stopped (parent_stopped)``. Before (fifty-seventh pass)
    their detail said ``...: it ended its own run during its draining stop``, which it
    did not."""
    async with open_kernel(make_config()) as kernel:
        kernel.spawn(agent(Parent, name="b", shutdown_timeout=100))
        await trio.testing.wait_all_tasks_blocked()
        for i in range(3):
            await kernel.send("e2", f"c{i}")
        await stop_then_drain(kernel, "b", "e2", after=0.5)
        letters = [(d.message.payload, d.reason, d.detail) for d in kernel.recent_dead_letters()]
    assert_conserved(kernel)
    stopped = "agent stopped (parent_stopped)"
    assert letters == [
        ("c1", DeadLetterReason.AGENT_STOPPED, stopped),
        ("c2", DeadLetterReason.AGENT_STOPPED, stopped),
    ]


def test_a_linked_child_of_a_spawner_failing_during_its_draining_stop_says_one_reason() -> None:
    """``b`` spawned ``e2``, which holds ``e0`` (in hand), ``e1`` and ``e2x``; ``b0``,
    ``boom`` and ``b2`` are queued as the root's loop carries out ``kernel.stop("b",
    drain=True)``; ``boom`` fails ``b``'s run at 1 s. Its exit stops ``e2`` first, without
    drain (``parent_exited``); the loop's drain of what ``b`` spawned comes after and does
    not change that stop: ``e1`` finished, ``e2x`` dead-lettered ``agent stopped
    (parent_exited)``, in every kernel. Before (fifty-seventh pass, review) both stops
    waited for ``e2``'s end and the first to wake retired it: Trio's pick, and in about
    a third of kernels the letter said ``agent stopped (parent_stopped): it ended its own
    run during its draining stop``, which it had not (30 kernels here)."""
    for _ in range(30):
        letters = stop_b_failing(("e0", "e1", "e2x"))
        assert [letter for letter in letters if letter[0] == "e2x"] == [
            ("e2x", DeadLetterReason.AGENT_STOPPED, "agent stopped (parent_exited)")
        ]


@pytest.mark.parametrize("queued", [1, 3])
async def test_a_spawner_s_draining_stop_the_grace_period_s_end_holds_returns_with_its_message(
    autojump_clock: Any, queued: int
) -> None:
    """``b`` (``shutdown_timeout`` 100 s) spawned ``e2``; ``b0`` (and ``b1``, ``b2``) are
    queued as ``kernel.stop("b", drain=True)`` comes; at 0.5 s ``kernel.shutdown(grace=
    0.2)``: the grace period ends at 0.7 s with ``b0`` in hand, which ``b``'s own timeout
    lets it finish at 1 s; held then, it handles nothing more. The stop and the shutdown
    return at 1 s, ``e2``'s ``on_stop`` before ``b``'s, what ``b`` left queued
    dead-lettered ``shutdown`` (the shutdown ended its draining stop). Before
    (fifty-seventh pass, review) the stop's wait for ``b``'s queue to be handed on
    waited for an idle a held run never says: both returned at 100 s, ``b``'s timeout
    (found by the s57a fuzz driver given a bound on a stop's duration, seeds 905, 5085)."""
    Parent.log = []
    returned: list[tuple[str, float]] = []
    async with open_kernel(make_config()) as kernel:
        kernel.spawn(agent(Parent, name="b", shutdown_timeout=100))
        await trio.testing.wait_all_tasks_blocked()
        for i in range(queued):
            await kernel.send("b", f"b{i}")

        async def stop_b() -> None:
            await kernel.stop("b", drain=True)
            returned.append(("stop", trio.current_time()))

        async def shut_down() -> None:
            await trio.sleep(0.5)
            await kernel.shutdown(grace=0.2)
            returned.append(("shutdown", trio.current_time()))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(stop_b)
            nursery.start_soon(shut_down)
        letters = [(d.message.payload, d.reason, d.detail) for d in kernel.recent_dead_letters()]
    assert_conserved(kernel)
    assert sorted(returned) == [("shutdown", 1.0), ("stop", 1.0)]
    assert Parent.log == [("on_stop", "e2", 1.0), ("on_stop", "b", 1.0)]
    ended = "agent stopped (stopped): the kernel's shutdown ended its draining stop"
    assert letters == [(f"b{i}", DeadLetterReason.SHUTDOWN, ended) for i in range(1, queued)]
