"""Pools under faults: stopped workers, shrinks racing stops, a pool stopping mid-resize.

Regressions found by fault injection on pools, made deterministic; each runs on trio's
MockClock (the ``autojump_clock`` fixture).
"""

from __future__ import annotations

from typing import Any

import trio
import trio.testing

from nexus_trio import (
    Agent,
    Context,
    Message,
    RequestFailed,
    RequestTimeout,
    agent,
    pool,
    pool_workers,
    resize_pool,
)
from nexus_trio.testing import open_test_kernel, step_until_idle


@agent
async def worker_named(ctx: Context, msg: Message) -> Any:
    return ctx.name


# --- regressions found by fault injection, made deterministic -------------------------------


async def test_a_pool_lists_and_resizes_only_the_workers_still_running(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Regression: a worker that stopped for good (here by ``kernel.stop``; also a
    transient or temporary one that exited) stayed in the router's list until a message
    was routed to it: ``pool_workers`` listed it, and a ``$resize`` counted it, so a
    resize to the pool's old size answered ``{"size": 2}`` with one worker running. The
    control messages now drop the stopped workers first."""
    async with open_test_kernel() as kernel:
        kernel.spawn(pool(worker_named, size=2))
        await step_until_idle(kernel)
        _, second = await pool_workers(kernel, "workers")
        await kernel.stop(second)
        assert [ref.name for ref in await pool_workers(kernel, "workers")] == ["workers/0"]
        assert await resize_pool(kernel, "workers", 2) == 2
        workers = await pool_workers(kernel, "workers")
        assert [ref.name for ref in workers] == ["workers/0", "workers/2"]
        assert all(kernel.is_local(ref) for ref in workers)
        assert await kernel.request("workers", {"$broadcast": "x"}) == {"sent": 2}


async def test_a_shrink_skips_a_removed_worker_stopped_before_it_started(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Regression: a shrink stops each removed worker once it has started. A removed
    worker stopped from outside before it started never starts, and the shrink waited
    for it forever: the workers removed after it were never stopped (they ran on,
    outside the pool) and the ``$resize`` request was never answered. Such a worker is
    skipped now."""
    gate = trio.Event()

    class Worker(Agent):
        async def on_start(self, ctx: Context) -> None:
            if ctx.name == "workers/0":
                await gate.wait()  # the ordered start: /1 and /2 wait behind /0

        async def handle(self, ctx: Context, msg: Message) -> Any:
            return ctx.name

    async with open_test_kernel() as kernel:
        kernel.spawn(pool(Worker, size=3))
        await trio.testing.wait_all_tasks_blocked()
        answers: list[int] = []
        async with trio.open_nursery() as nursery:

            async def shrink() -> None:
                answers.append(await resize_pool(kernel, "workers", 1, timeout=60))

            nursery.start_soon(shrink)
            await trio.testing.wait_all_tasks_blocked()
            await kernel.stop(kernel.lookup("workers/2"))  # not started yet
            gate.set()
        assert answers == [1]
        assert {ref.name for ref in kernel.agents()} == {"workers", "workers/0"}
        assert [ref.name for ref in await pool_workers(kernel, "workers")] == ["workers/0"]


async def test_a_shrink_s_requester_hears_at_once_when_the_pool_stops_before_it_answers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Regression: a ``$resize`` request that shrinks the pool is answered once the
    removed workers have stopped. When the pool stopped (or its supervisor restarted
    it) before that, the answer was never sent and the requester waited out its whole
    timeout for a pool that was gone. The request fails at once now (``RequestFailed``,
    ``agent_stopped``)."""

    @agent
    async def slow(ctx: Context, msg: Message) -> Any:
        await trio.sleep(1)
        return ctx.name

    async with open_test_kernel() as kernel:
        kernel.spawn(pool(slow, size=3))
        await step_until_idle(kernel)
        for i in range(6):
            await kernel.send("workers", i)  # two each: the shrink drains /2, then /1
        errors: list[Exception] = []
        async with trio.open_nursery() as nursery:

            async def shrink() -> None:
                try:
                    await resize_pool(kernel, "workers", 1, timeout=100)
                except (RequestFailed, RequestTimeout) as exc:
                    errors.append(exc)

            nursery.start_soon(shrink)
            await trio.sleep(0.5)  # while /2 drains
            started = trio.current_time()
            await kernel.stop("workers")
        (error,) = errors
        assert isinstance(error, RequestFailed), error
        assert error.reason == "agent_stopped"
        assert trio.current_time() - started < 2
