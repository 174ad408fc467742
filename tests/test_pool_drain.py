"""A draining stop of a pool (``kernel.stop(pool, drain=True)``): the router hands on
what it has queued, then every worker handles what is queued at it, all at once, and
only then does the pool stop; nothing queued is lost, within the router's
``shutdown_timeout``.

Every test runs on trio's MockClock (the ``autojump_clock`` fixture).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import pytest
import trio
import trio.testing

from nexus_trio import (
    AgentNotFound,
    Context,
    DeadLetterReason,
    Message,
    Supervisor,
    agent,
    pool,
    resize_pool,
)
from nexus_trio.testing import dead_letters, open_test_kernel, test_config

Done = list[tuple[str, Any, float]]


def slow_worker(done: Done, seconds: float = 1.0) -> Any:
    """A worker that takes ``seconds`` per message and notes (name, payload, end time)."""

    @agent
    async def worker(ctx: Context, msg: Message) -> None:
        await trio.sleep(seconds)
        assert ctx.name is not None
        done.append((ctx.name, msg.payload, trio.current_time()))

    return worker


@pytest.mark.parametrize("routing", ["round_robin", "least_loaded", "broadcast"])
async def test_a_draining_stop_of_a_pool_handles_what_is_queued_at_its_workers(
    autojump_clock: Any, routing: str
) -> None:
    done: Done = []
    async with open_test_kernel() as kernel:
        mode = "round_robin" if routing == "broadcast" else routing
        ref = kernel.spawn(pool(slow_worker(done), size=2, routing=mode))
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
        if routing == "broadcast":
            for i in range(3):  # 3 at each worker: 6 messages
                await kernel.send(ref, {"$broadcast": i})
        else:
            for i in range(6):
                await kernel.send(ref, i)
        await trio.testing.wait_all_tasks_blocked()  # all at the workers: 3 each
        # and two more still queued at the router when the stop comes
        extra = [{"$broadcast": "x"}] if routing == "broadcast" else ["x", "y"]
        for payload in extra:
            await kernel.send(ref, payload)
        await kernel.stop(ref, drain=True)
        took = trio.current_time() - start
        assert kernel.agents() == []
        stats = kernel.stats()
    assert sorted(name for name, _, _ in done) == ["workers/0"] * 4 + ["workers/1"] * 4
    # all at once: as long as one worker's queue (4 s), not the sum of both (8 s)
    assert took == pytest.approx(4.0)
    assert stats.dead_lettered == 0
    assert dict(stats.dead_letters_by_reason) == {}
    # every message twice (router, then worker); a broadcast is one router handling
    # and a message per worker
    routed = 4 if routing == "broadcast" else 8
    assert stats.handled == routed + 8
    assert stats.accepted == stats.handled


async def started_and_told(kernel: Any, spec: Any, count: int) -> Any:
    """``spec`` spawned in ``kernel`` and started, then sent ``count`` messages (0, 1, ...,
    none of them waits: sends take no time): its ref."""
    ref = kernel.spawn(spec)
    await trio.testing.wait_all_tasks_blocked()
    for i in range(count):
        await kernel.send(ref, i)
    return ref


async def stopped_draining_then_shut_down(kernel: Any, ref: Any) -> None:
    """``kernel.stop(ref, drain=True)``, and half a second into it the kernel's
    shutdown; returns when both are over."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(kernel.stop, ref, drain=True))
        await trio.sleep(0.5)
        nursery.start_soon(kernel.shutdown)


async def stopped_draining(spec: Any, count: int) -> tuple[float, Any, list[Any]]:
    """In a kernel of its own: ``spec`` spawned, sent ``count`` messages (0, 1, ...) and
    stopped with a drain: how long the stop took, the kernel's stats after it, and the
    dead letters ``agent_stopped``."""
    async with open_test_kernel() as kernel:
        ref = await started_and_told(kernel, spec, count)
        start = trio.current_time()  # (the sends took no time)
        await kernel.stop(ref, drain=True)
        took = trio.current_time() - start
        return took, kernel.stats(), dead_letters(kernel, DeadLetterReason.AGENT_STOPPED)


async def test_a_draining_stop_of_a_pool_is_bounded_by_the_routers_shutdown_timeout(
    autojump_clock: Any,
) -> None:
    done: Done = []
    spec = pool(slow_worker(done), size=2).with_options(shutdown_timeout=2.5)
    took, stats, stopped = await stopped_draining(spec, 6)
    # the bound is the pool's as a whole: 2 messages each in 2.5 s, the third one
    # cancelled in hand and dead-lettered, counted
    assert took == pytest.approx(2.5)
    assert sorted(payload for _, payload, _ in done) == [0, 1, 2, 3]
    assert sorted(letter.message.payload for letter in stopped) == [4, 5]
    assert {letter.detail for letter in stopped} == {"cancelled while being handled"}
    assert stats.dead_lettered == 2
    assert stats.handled == 6 + 4


async def test_a_worker_that_fails_during_the_drain_is_not_restarted(autojump_clock: Any) -> None:
    done: Done = []

    # (restart: its failures are the subject; a function agent resumes by default)
    @agent(on_error="restart")
    async def worker(ctx: Context, msg: Message) -> None:
        await trio.sleep(1)
        if msg.payload == 2:
            raise RuntimeError("boom")
        assert ctx.name is not None
        done.append((ctx.name, msg.payload, trio.current_time()))

    async with open_test_kernel() as kernel:
        # 0, 2, 4, 6 to workers/0; 1, 3, 5, 7 to workers/1
        ref = await started_and_told(kernel, pool(worker, size=2), 8)
        await kernel.stop(ref, drain=True)
        stats = kernel.stats()
        failed = dead_letters(kernel, DeadLetterReason.HANDLER_ERROR)
        stopped = dead_letters(kernel, DeadLetterReason.AGENT_STOPPED)
    # as a single agent's draining stop: the failed run ends the worker's stop (no
    # restart into a stopping pool), what it had left is dead-lettered agent_stopped;
    # the other worker drains its whole queue
    assert stats.restarts == 0
    assert sorted(p for _, p, _ in done) == [0, 1, 3, 5, 7]
    assert [letter.message.payload for letter in failed] == [2]
    assert sorted(letter.message.payload for letter in stopped) == [4, 6]
    assert stats.dead_lettered == 3
    assert stats.handled + stats.dead_lettered == stats.accepted


async def test_a_worker_that_tells_its_pool_during_the_drain_is_refused_not_deadlocked(
    autojump_clock: Any,
) -> None:
    refused: list[str] = []
    handled: list[Any] = []

    @agent
    async def worker(ctx: Context, msg: Message) -> None:
        await trio.sleep(1)
        handled.append(msg.payload)
        try:
            await ctx.send("workers", "again")
        except AgentNotFound as exc:
            refused.append(str(exc.address))

    async with open_test_kernel() as kernel:
        ref = kernel.spawn(pool(worker, size=2))
        await trio.testing.wait_all_tasks_blocked()
        for i in range(4):
            await kernel.send(ref, i)
        start = trio.current_time()
        await kernel.stop(ref, drain=True)
        took = trio.current_time() - start
        stats = kernel.stats()
    # as an agent's message to itself while it drains: the pool takes no new messages
    assert sorted(handled) == [0, 1, 2, 3]
    assert refused == ["workers"] * 4
    assert took == pytest.approx(2.0)
    assert stats.dead_lettered == 0
    assert stats.handled == 8


@pytest.mark.parametrize("target", ["pool", "agent"])
async def test_a_stop_without_drain_during_a_draining_stop_cuts_it_short(
    autojump_clock: Any, target: str
) -> None:
    done: Done = []
    async with open_test_kernel() as kernel:
        worker = slow_worker(done)
        size = 2 if target == "pool" else 1
        ref = kernel.spawn(
            pool(worker, size=2) if target == "pool" else worker.with_options(name="a")
        )
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
        for i in range(6):
            await kernel.send(ref, i)
        ended: list[float] = []

        async def stop(drain: bool) -> None:
            await kernel.stop(ref, drain=drain)
            ended.append(trio.current_time() - start)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(stop, True)
            await trio.sleep(1.5)
            await stop(False)
        stats = kernel.stats()
        stopped = dead_letters(kernel, DeadLetterReason.AGENT_STOPPED)
    # as Akka's stop after a PoisonPill: the messages in hand at 1.5 s are finished
    # (at 2 s), what is still queued is dead-lettered; both stops return then
    assert ended == [pytest.approx(2.0)] * 2
    assert len(done) == 2 * size
    assert len(stopped) == 6 - 2 * size
    assert stats.dead_lettered == 6 - 2 * size
    assert kernel.agents() == []


async def test_kernel_shutdown_with_a_grace_handles_the_work_queued_at_a_pools_workers(
    autojump_clock: Any,
) -> None:
    done: Done = []
    async with open_test_kernel(test_config(shutdown_grace_ms=10_000)) as kernel:
        await started_and_told(kernel, pool(slow_worker(done), size=2), 6)
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
    assert trio.current_time() - start == pytest.approx(3.0)
    stats = kernel.stats()
    assert sorted(p for _, p, _ in done) == [0, 1, 2, 3, 4, 5]
    assert stats.dead_lettered == 0
    assert stats.handled == 12


async def test_a_draining_stop_of_a_plain_agent_that_spawned_one_drains_both(
    autojump_clock: Any,
) -> None:
    done: Done = []
    child = slow_worker(done).with_options(name="child")

    @agent
    async def parent(ctx: Context, msg: Message) -> None:
        if msg.payload == "spawn":
            ctx.spawn(child)
        else:
            await ctx.send("child", msg.payload)

    async with open_test_kernel() as kernel:
        ref = kernel.spawn(parent.with_options(name="parent"))
        await kernel.send(ref, "spawn")
        await trio.testing.wait_all_tasks_blocked()
        for i in range(3):
            await kernel.send(ref, i)
        # (settled: the child, which starts on its first message, runs; see
        # docs/kernel.md on stopping an agent whose run has not started)
        await trio.testing.wait_all_tasks_blocked()
        await kernel.send(ref, 3)  # and one still queued at the parent
        await kernel.stop(ref, drain=True)
        stats = kernel.stats()
    # the parent hands on what it has queued, then the child drains its queue
    assert [p for _, p, _ in done] == [0, 1, 2, 3]
    assert stats.dead_lettered == 0
    assert stats.handled == 1 + 4 + 4


async def test_a_resize_during_a_pools_drain_is_refused_and_the_drain_goes_on(
    autojump_clock: Any,
) -> None:
    done: Done = []
    async with open_test_kernel() as kernel:
        ref = await started_and_told(kernel, pool(slow_worker(done), size=2), 4)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(kernel.stop, ref, drain=True))
            await trio.sleep(0.5)
            with pytest.raises(AgentNotFound, match="workers"):
                await resize_pool(kernel, "workers", 4)
        stats = kernel.stats()
    assert sorted(p for _, p, _ in done) == [0, 1, 2, 3]
    assert stats.dead_lettered == 0
    assert stats.handled == 8


async def test_each_worker_s_own_shutdown_timeout_counts_from_the_start_of_the_drain(
    autojump_clock: Any,
) -> None:
    done: Done = []
    worker = slow_worker(done).with_options(shutdown_timeout=2.5)
    took, stats, stopped = await stopped_draining(
        pool(worker, size=2).with_options(shutdown_timeout=30), 8
    )
    # both workers drain at once, so both get their 2.5 s from the same moment (not the
    # second one after the first one's stop): 2 handled each, the rest dead-lettered
    assert took == pytest.approx(2.5)
    assert sorted(name for name, _, _ in done) == ["workers/0"] * 2 + ["workers/1"] * 2
    assert sorted(letter.message.payload for letter in stopped) == [4, 5, 6, 7]
    assert stats.dead_lettered == 4


async def test_a_kernel_shutdown_during_a_pools_drain_lets_it_finish_within_the_grace(
    autojump_clock: Any,
) -> None:
    done: Done = []
    async with open_test_kernel(test_config(shutdown_grace_ms=10_000)) as kernel:
        ref = await started_and_told(kernel, pool(slow_worker(done), size=2), 6)
        start = trio.current_time()  # (the sends took no time)
        await stopped_draining_then_shut_down(kernel, ref)
    assert trio.current_time() - start == pytest.approx(3.0)
    stats = kernel.stats()
    assert sorted(p for _, p, _ in done) == [0, 1, 2, 3, 4, 5]
    assert stats.dead_lettered == 0
    assert stats.handled == 12


async def test_a_kernel_shutdown_during_a_pools_drain_keeps_the_drain_s_bound(
    autojump_clock: Any,
) -> None:
    done: Done = []
    async with open_test_kernel(test_config(shutdown_grace_ms=1_000)) as kernel:
        # the workers' shutdown_timeout is the kernel's shutdown_grace, 1 s, from the
        # start of the drain (0 s); the shutdown comes at 0.5 s, its grace ends at 1.5 s
        spec = pool(slow_worker(done, 0.8), size=2).with_options(shutdown_timeout=30)
        ref = await started_and_told(kernel, spec, 6)
        start = trio.current_time()  # (the sends took no time)
        await stopped_draining_then_shut_down(kernel, ref)
        took = trio.current_time() - start
    # one message handled per worker, the one in hand cancelled at 1 s and the rest
    # dead-lettered (open_test_kernel checked that every message is accounted for)
    assert took == pytest.approx(1.0)
    stats = kernel.stats()
    assert sorted(p for _, p, _ in done) == [0, 1]
    assert dict(stats.dead_letters_by_reason) == {"agent_stopped": 4}
    assert stats.handled == 6 + 2


@pytest.mark.parametrize("drain", [False, True])
async def test_a_draining_stop_of_a_supervisor_drains_its_children_at_once(
    autojump_clock: Any, drain: bool
) -> None:
    """Regression: ``kernel.stop(supervisor, drain=True)`` ignored ``drain``: its children
    were stopped one by one, newest first, each finishing its message in hand, and what
    was queued at them was dead-lettered ``agent_stopped``. A supervisor's draining stop
    drains its children as a pool's does: all at once, each within its own stop
    timeout; without drain, as before."""
    done: Done = []
    children = [slow_worker(done).with_options(name=name) for name in ("a", "b")]
    async with open_test_kernel() as kernel:
        ref = kernel.spawn(Supervisor(children=children, name="sup"))
        await trio.testing.wait_all_tasks_blocked()
        for i in range(3):
            for name in ("a", "b"):
                await kernel.send(name, i)
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
        await kernel.stop(ref, drain=drain)
        took = trio.current_time() - start
        stats = kernel.stats()
        stopped = dead_letters(kernel, DeadLetterReason.AGENT_STOPPED)
    assert kernel.agents() == []
    if drain:
        assert sorted((name, p) for name, p, _ in done) == [
            (name, i) for name in ("a", "b") for i in range(3)
        ]
        assert took == pytest.approx(3.0)  # at once: one child's queue, not both
        assert stopped == [] and stats.dead_lettered == 0
    else:
        # each finishes the message in hand; newest first, one after another
        assert sorted((name, p) for name, p, _ in done) == [("a", 0), ("b", 0)]
        assert took == pytest.approx(1.0)
        assert sorted(letter.message.payload for letter in stopped) == [1, 1, 2, 2]


async def test_a_pool_in_a_supervisor_s_draining_stop_stops_its_workers_after_its_router(
    autojump_clock: Any,
) -> None:
    """Regression (gentle fuzz seed 424 of the fifty-fourth pass): a pool under a
    supervisor stopped with ``drain=True``, its sibling ``z`` busy for 3 s. The workers'
    supervisor, spawned by the router, came first in reverse start order: its idle workers
    stopped at once while the router stayed routed, took the messages sent to the pool
    during ``z``'s drain and failed each ``handler_error`` (no workers left). As Akka's
    router stops before its routees, the router's queue is handed on first, then its
    workers drain: every message sent meanwhile is handled, none dead-lettered; once the
    workers drain, a send to the pool fails with ``AgentNotFound`` at once."""
    done: Done = []
    async with open_test_kernel() as kernel:
        children = [
            pool(slow_worker(done), size=2, name="p"),
            slow_worker(done).with_options(name="z"),
        ]
        kernel.spawn(Supervisor(children=children, name="sup"))
        await trio.testing.wait_all_tasks_blocked()
        for i in range(3):
            await kernel.send("z", i)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(kernel.stop, "sup", drain=True))
            for i in range(5):
                await trio.sleep(0.5)
                await kernel.send("p", f"late{i}")
            # 3.25 s: ``z`` is done, the router's queue handed on, ``p/0`` has ``late4``
            # in hand: the pool takes no new message while its workers drain
            await trio.sleep(0.75)
            with pytest.raises(AgentNotFound, match="it is being stopped"):
                await kernel.send("p", "during")
        stats = kernel.stats()
    assert sorted(p for name, p, _ in done if name.startswith("p/")) == [
        f"late{i}" for i in range(5)
    ]
    assert [p for name, p, _ in done if name == "z"] == [0, 1, 2]
    assert stats.dead_lettered == 0
