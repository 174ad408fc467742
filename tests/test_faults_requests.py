"""Fault hunt, fifty-first pass: a requester that gives up while its agent is stopped."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import trio
import trio.testing

from nexus_trio import (
    AgentSpec,
    Config,
    Context,
    DeadLetterReason,
    KernelConfig,
    Message,
    RequestTimeout,
    agent,
    open_kernel,
)
from nexus_trio.testing import assert_conserved

from .hang_guard import real_time_limit


@pytest.fixture(autouse=True)
def guard_real_time() -> Iterator[None]:
    with real_time_limit(30):
        yield


def slow_agent(journal: list[tuple[str, float]]) -> AgentSpec:
    """``slow``: 10 s of work a message, journaled (when it begins, is cancelled, ends)."""

    @agent(name="slow", handle_timeout=60)
    async def slow(ctx: Context, msg: Message) -> str:
        journal.append(("handles", trio.current_time()))
        try:
            await trio.sleep(10)
        except trio.Cancelled:
            journal.append(("cancelled", trio.current_time()))
            raise
        journal.append(("answers", trio.current_time()))
        return "done"

    return slow


@pytest.mark.parametrize("gives_up", ["timeout", "cancel"])
async def test_a_requester_that_gives_up_stops_the_handler_of_an_agent_being_stopped(
    autojump_clock: trio.testing.MockClock, gives_up: str
) -> None:
    """Found by the fault machine's new request checks: ``slow`` handles a request
    (10 s of work); at 0.5 s ``kernel.stop(slow)`` begins, which lets the message in
    hand finish within the shutdown timeout (5 s); at 1 s the requester gives up (its
    deadline, or a cancel). Without the stop its handler is cancelled then (dead letter
    ``request_timeout``); with it, the handler ran on to the shutdown timeout, for an
    answer nobody takes: the stop took 5 s, not 0.5, and the answer was a late reply.
    ``expire_query`` looked the agent up among the routed ones only, and one being
    stopped is unrouted. (Fails with main's _router.py: the handler is cancelled at
    5.5 s, by the stop's shutdown timeout, not at 1 s.)"""
    journal: list[tuple[str, float]] = []
    slow = slow_agent(journal)
    config = Config(kernel=KernelConfig(dead_letter_buffer=100))
    outcome: list[tuple[str, float]] = []
    async with open_kernel(config) as kernel:
        ref = kernel.spawn(slow)

        async def ask() -> None:
            try:
                if gives_up == "timeout":
                    await kernel.request(ref, "work", timeout=1)
                else:
                    with trio.move_on_after(1):
                        await kernel.request(ref, "work", timeout=60)
                    outcome.append(("cancelled", trio.current_time()))
            except RequestTimeout:
                outcome.append(("timeout", trio.current_time()))

        async def stop() -> None:
            await trio.sleep(0.5)
            await kernel.stop(ref)
            outcome.append(("stopped", trio.current_time()))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask)
            nursery.start_soon(stop)
        letters = [(d.message.payload, d.reason) for d in kernel.recent_dead_letters()]
        stats = kernel.stats()
    assert journal == [("handles", 0.0), ("cancelled", 1.0)]
    gave_up = "timeout" if gives_up == "timeout" else "cancelled"
    assert sorted(outcome) == sorted([(gave_up, 1.0), ("stopped", 1.0)])
    assert letters == [("work", DeadLetterReason.REQUEST_TIMEOUT)]
    assert stats.dead_letters_by_reason == {"request_timeout": 1}
    assert_conserved(kernel)


async def test_a_requester_that_gives_up_still_stops_a_routed_agent_s_handler(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The same without the stop, as before: the handler is cancelled at the deadline."""
    journal: list[tuple[str, float]] = []
    slow = slow_agent(journal)
    async with open_kernel(Config(kernel=KernelConfig(dead_letter_buffer=100))) as kernel:
        ref = kernel.spawn(slow)
        with pytest.raises(RequestTimeout):
            await kernel.request(ref, "work", timeout=1)
        await trio.testing.wait_all_tasks_blocked()
        assert journal == [("handles", 0.0), ("cancelled", 1.0)]
        assert kernel.stats().dead_letters_by_reason == {"request_timeout": 1}
        assert kernel.is_local(ref)
    assert_conserved(kernel)


@pytest.mark.parametrize("queued", [True, False], ids=["queued", "in_hand"])
async def test_a_query_whose_requester_the_shutdown_cancels_is_dead_lettered_shutdown(
    autojump_clock: trio.testing.MockClock, queued: bool
) -> None:
    """Left by the fifty-second pass's core hunt: ``asker``'s handler requests ``slow``
    (timeout 60 s) and the shutdown's grace (1 s) ends while it waits; the shutdown
    cancels that handler, and with it the request. No timeout ran out, yet the query was
    dead-lettered ``request_timeout`` ("the requester stopped waiting"): queued behind
    ``slow``'s first message, or cancelled in hand (with a longer grace the same query
    was ``shutdown``). A requester the shutdown cancels gave up for the shutdown: its
    query is dead-lettered ``shutdown``, in the queue or in hand, and nothing is
    ``request_timeout``. (Fails with main's _router.py: its letter says
    ``request_timeout``.)"""
    journal: list[tuple[str, float]] = []
    slow = slow_agent(journal)

    @agent(name="asker", handle_timeout=600)
    async def asker(ctx: Context, msg: Message) -> None:
        await ctx.request("slow", "query", timeout=60)

    config = Config(kernel=KernelConfig(dead_letter_buffer=100, shutdown_grace_ms=1000))
    async with open_kernel(config) as kernel:
        kernel.spawn(slow)
        ask = kernel.spawn(asker)
        if queued:
            await kernel.send("slow", "first")  # in hand: the query waits behind it
        await trio.testing.wait_all_tasks_blocked()
        await kernel.send(ask, "go")
        await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(0.5)
        await kernel.shutdown()  # its grace ends at 1.5 s, the handlers are cancelled
        letters = [(dl.message.payload, dl.reason) for dl in kernel.recent_dead_letters()]
        assert_conserved(kernel)
    expected = [("query", DeadLetterReason.SHUTDOWN), ("go", DeadLetterReason.SHUTDOWN)]
    if queued:
        expected.insert(0, ("first", DeadLetterReason.SHUTDOWN))
    assert sorted(letters, key=repr) == sorted(expected, key=repr), letters


@pytest.mark.parametrize("queued", [True, False], ids=["queued", "in_hand"])
async def test_a_requester_whose_own_deadline_runs_out_while_the_kernel_stops_is_a_timeout(
    autojump_clock: trio.testing.MockClock, queued: bool
) -> None:
    """Found reviewing the fifty-second pass: a task beside the block requests ``slow``
    (whose ``shutdown_timeout`` of 10 s lets its handler run on once the grace is over)
    under its own ``move_on_after(2.5)``; the grace ends at 1.5 s and the requester's own
    deadline runs out at 2.5 s, the kernel stopping. The shutdown cancelled nothing of the
    requester's, yet its query was dead-lettered ``shutdown`` (any cancel once the kernel
    stops was taken for the shutdown's): it stopped waiting on its own, so its query,
    queued or in hand, is ``request_timeout``, as before the grace ended. (Fails with
    main's _router.py: its letter says ``shutdown``.)"""

    @agent(name="slow", handle_timeout=60, shutdown_timeout=10.0)
    async def slow(ctx: Context, msg: Message) -> None:
        await trio.sleep(10)

    gave_up: list[float] = []
    config = Config(kernel=KernelConfig(dead_letter_buffer=100, shutdown_grace_ms=1000))
    async with trio.open_nursery() as beside:
        async with open_kernel(config) as kernel:
            kernel.spawn(slow)
            if queued:
                await kernel.send("slow", "first")  # the query waits behind it
                await trio.testing.wait_all_tasks_blocked()

            async def requester() -> None:
                with trio.move_on_after(2.5):
                    await kernel.request("slow", "query", timeout=60)
                gave_up.append(trio.current_time())

            beside.start_soon(requester)
            await trio.testing.wait_all_tasks_blocked()
            await trio.sleep(0.5)
            await kernel.shutdown()  # its grace ends at 1.5 s; slow's stop runs on
            letters = [(dl.message.payload, dl.reason) for dl in kernel.recent_dead_letters()]
            assert_conserved(kernel)
    assert gave_up == [2.5]
    # (queued: ``first``, in hand, is handled by 10 s, within slow's shutdown timeout)
    assert letters == [("query", DeadLetterReason.REQUEST_TIMEOUT)], letters
