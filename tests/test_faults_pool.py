"""Fault injection on pools, thirty-eighth pass: a grow, a shrink and a drain whose
workers fail, restart or stop at the wrong moment, and senders that wait for room
meanwhile. After each: every message is handled, dead-lettered with a reason or
refused (``kernel.stats()``), every request gets its answer or a documented error
before its deadline, and no task is left.

Everything runs on a ``MockClock(autojump_threshold=0)``.
"""

from __future__ import annotations

from typing import Any

import trio
import trio.testing

from nexus_trio import (
    Agent,
    AgentSpec,
    Context,
    Message,
    Supervisor,
    pool,
    pool_workers,
)
from nexus_trio.testing import assert_conserved, open_test_kernel

from .hang_guard import tasks_living


async def test_a_grow_whose_new_worker_s_first_start_a_sibling_s_restart_cut_short_is_answered(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Regression: a grow's answer waits for each new worker's first start; under a
    ``one_for_all`` pool supervisor a sibling's failure restarted the new worker while
    its first ``on_start`` still ran (cancelled past its ``shutdown_timeout``). The
    grow had taken the worker's first-start record at the cancelled start, so the
    restart's start, which succeeded, answered nothing: the resize request timed out
    (100 s), saying no answer came. The first start is over only once an ``on_start``
    returned or raised: a cancelled one leaves it to the restart, whose success answers
    the grow (OTP's ``start_child`` returns once the child's ``init`` has returned)."""
    starts: list[tuple[str | None, float]] = []

    class Worker(Agent):
        async def on_start(self, ctx: Context) -> None:
            starts.append((ctx.name, trio.current_time()))
            if ctx.name == "workers/2" and len(starts) == 3:
                await trio.sleep(10)  # its first start: past its shutdown_timeout

        async def handle(self, ctx: Context, msg: Message) -> Any:
            if msg.payload == "boom":
                raise RuntimeError("boom")
            return ctx.name

    living = tasks_living()
    async with open_test_kernel() as kernel:
        spec = AgentSpec(factory=Worker, shutdown_timeout=1.0)
        kernel.spawn(pool(spec, size=2, supervision=Supervisor(strategy="one_for_all")))
        await trio.testing.wait_all_tasks_blocked()
        answers: list[Any] = []

        async def grow() -> None:
            answers.append(await kernel.request("workers", {"$resize": 3}, timeout=100))
            answers.append(trio.current_time())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(grow)
            await trio.sleep(1)  # workers/2 is in its first on_start
            await kernel.send("workers/0", "boom")  # restarts all three
        names = [ref.name for ref in await pool_workers(kernel, "workers")]
        assert [await kernel.request("workers", None) for _ in range(3)] == names
        await trio.testing.wait_all_tasks_blocked()
        assert_conserved(kernel)
        stats = kernel.stats()
    assert tasks_living() == living
    # answered as the restart's start of workers/2 returned, 1 s after its cancel began
    assert answers == [{"size": 3}, starts[-1][1]]
    assert names == ["workers/0", "workers/1", "workers/2"]
    assert [name for name, _ in starts[3:]] == names
    assert stats.restarts == 3
    assert dict(stats.dead_letters_by_reason) == {"handler_error": 1}
