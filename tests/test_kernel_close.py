"""How a kernel closes when its shutdown is asked for wrongly or interrupted: nothing
hangs, and the event and dead-letter streams end whatever way the kernel closes."""

from __future__ import annotations

import math
import re
import signal
from typing import Any

import pytest
import trio
import trio.testing

from nexus_trio import (
    Agent,
    Context,
    KernelPhase,
    KernelShuttingDown,
    Message,
    RequestTimeout,
    agent,
    open_kernel,
)

from .conftest import make_config


@pytest.mark.parametrize(
    ("grace", "error", "text"),
    [
        (-1, ValueError, "shutdown grace must be >= 0 seconds, got -1"),
        (math.nan, ValueError, "shutdown grace must be >= 0 seconds, got nan"),
        ("1", TypeError, "shutdown grace must be a number of seconds, got '1'"),
        (True, TypeError, "shutdown grace must be a number of seconds, got True"),
    ],
)
async def test_a_shutdown_grace_that_is_not_a_number_of_seconds_is_named_and_starts_nothing(
    autojump_clock: Any, grace: Any, error: type[Exception], text: str
) -> None:
    # Before: the phase was DRAINING already when the grace failed, so the shutdown
    # that leaving the block starts waited forever for the one that never ran.
    handled: list[Any] = []

    @agent(name="a")
    async def a(ctx: Context, msg: Message) -> None:
        handled.append(msg.payload)

    with trio.fail_after(60):
        async with open_kernel(make_config()) as kernel:
            kernel.spawn(a)
            with pytest.raises(error, match=re.escape(text)):
                await kernel.shutdown(grace=grace)
            assert kernel.phase is KernelPhase.RUNNING
            await kernel.send("a", "still running")
    assert kernel.stopped and handled == ["still running"]


async def test_a_bad_shutdown_grace_from_inside_the_tree_fails_the_handler_only(
    autojump_clock: Any,
) -> None:
    # Before: the in-tree shutdown raised in the kernel's own nursery, which cancelled the
    # whole tree without a graceful stop.
    @agent(name="a")
    async def a(ctx: Context, msg: Message) -> None:
        await ctx.kernel.shutdown(grace=-1)

    with trio.fail_after(60):
        async with open_kernel(make_config()) as kernel:
            kernel.spawn(a)
            await kernel.send("a", "stop with a bad grace")
            await trio.testing.wait_all_tasks_blocked()
            assert kernel.phase is KernelPhase.RUNNING
    (letter,) = kernel.recent_dead_letters()
    assert letter.reason.value == "handler_error" and isinstance(letter.error, ValueError)


async def _stuck(ctx: Context, msg: Message) -> None:
    await trio.sleep_forever()


def test_streams_end_and_requests_fail_when_a_second_ctrl_c_interrupts_the_shutdown() -> None:
    # A second Ctrl-C while the kernel shuts down raises KeyboardInterrupt in the main
    # task, inside kernel.shutdown(): the kernel is closed without the rest of its
    # shutdown. The program catches it around the kernel; its stream readers (outside
    # the kernel, untouched by the interrupt) must still come to the end of their streams.
    ended: list[str] = []
    interrupted: list[BaseException] = []

    class CtrlC(Agent):
        async def on_start(self, ctx: Context) -> None:
            return None  # runs from the start (an agent without on_start waits for mail)

        async def handle(self, ctx: Context, msg: Message) -> None:
            return None

        async def on_stop(self, ctx: Context) -> None:
            # Raised from Trio's own context: delivered to the main task, which is in
            # kernel.shutdown() waiting for the tree to stop.
            trio.lowlevel.current_trio_token().run_sync_soon(signal.raise_signal, signal.SIGINT)
            await trio.sleep(1)

    async def read(stream: Any, label: str) -> None:
        async for _ in stream:
            pass
        ended.append(label)

    async def ask(kernel: Any, ref: Any) -> None:
        # Its query waits in a mailbox behind a handler that never returns: the
        # request is pending when the shutdown is cut short.
        try:
            await kernel.request(ref, "late", timeout=1000)
        except KernelShuttingDown:
            ended.append("request")

    async def main() -> None:
        with trio.move_on_after(600) as hang:
            async with trio.open_nursery() as readers:
                try:
                    async with open_kernel(make_config()) as kernel:
                        readers.start_soon(read, kernel.events(), "events")
                        readers.start_soon(read, kernel.dead_letters(), "dead letters")
                        stuck = kernel.spawn(agent(handle_timeout=1000)(_stuck))
                        kernel.send_nowait(stuck, "first")
                        await trio.testing.wait_all_tasks_blocked()
                        readers.start_soon(ask, kernel, stuck)
                        kernel.spawn(CtrlC)
                        await trio.testing.wait_all_tasks_blocked()
                except BaseException as exc:  # the interrupt, in a group
                    interrupted.append(exc)
        assert not hang.cancelled_caught, f"the streams never ended: {ended}"

    # Trio turns SIGINT into KeyboardInterrupt only where its handler is the default one
    # (a shell starting CI in the background ignores SIGINT): set it for this test.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    finally:
        signal.signal(signal.SIGINT, previous)
    (exc,) = interrupted
    assert isinstance(exc, KeyboardInterrupt) or (
        isinstance(exc, BaseExceptionGroup) and exc.subgroup(KeyboardInterrupt) is not None
    )
    assert sorted(ended) == ["dead letters", "events", "request"]


async def test_a_kernel_cancelled_from_outside_stops_at_once_and_in_order(
    autojump_clock: Any,
) -> None:
    # Before: the agents ran in the kernel's nursery, under the cancelled scope: all were
    # cancelled at once, in no order (a parent's on_stop before its linked child's), and
    # the message in hand was cut off without a dead letter of the kernel's own. Now, as
    # Trio asks of a cancelled close (prompt, but complete): no drain, the message in
    # hand dead-lettered ``shutdown``, the tree stopped in order, on_stop awaited.
    journal: list[str] = []

    class Journaled(Agent):
        async def on_start(self, ctx: Context) -> None:
            if ctx.name == "parent":
                ctx.spawn(agent(Journaled, name="child"))

        async def handle(self, ctx: Context, msg: Message) -> None:
            await trio.sleep(0.5)
            journal.append(f"{ctx.name} handled {msg.payload}")

        async def on_stop(self, ctx: Context) -> None:
            await trio.sleep(0.01)
            journal.append(f"stop {ctx.name}")

    with trio.fail_after(60), trio.CancelScope() as outside:
        async with open_kernel(make_config(shutdown_grace_ms=1000)) as kernel:
            kernel.spawn(agent(Journaled, name="parent"))
            kernel.spawn(agent(Journaled, name="worker"))
            await kernel.send("worker", "job")
            await kernel.send("worker", "queued")
            await trio.testing.wait_all_tasks_blocked()
            outside.cancel()
            await trio.sleep_forever()
    assert outside.cancelled_caught
    # reverse start order (the child, spawned by the parent's on_start, started last)
    assert journal == ["stop child", "stop worker", "stop parent"]
    stats = kernel.stats()
    assert (stats.handled, stats.dead_lettered, stats.in_flight) == (0, 2, 0)
    assert stats.dead_letters_by_reason == {"shutdown": 2}
    # no grace waited: the three on_stop only
    assert trio.current_time() == pytest.approx(0.03)


async def test_a_request_made_while_a_cancelled_kernel_stops_still_times_out(
    autojump_clock: Any,
) -> None:
    # The request timer runs shielded as well: a handler of an agent with a shutdown
    # timeout of its own (so it finishes its message in the stop) that waits on a
    # request to an agent that never answers gets its RequestTimeout in time.
    outcomes: list[str] = []

    @agent(name="asks", shutdown_timeout=5)
    async def asks(ctx: Context, msg: Message) -> None:
        try:
            await ctx.request("sleeper", timeout=0.1)
        except RequestTimeout:
            outcomes.append("timed out")

    with trio.fail_after(60), trio.CancelScope() as outside:
        async with open_kernel(make_config(shutdown_grace_ms=1000)) as kernel:
            kernel.spawn(agent(_stuck, name="sleeper", handle_timeout=1000, shutdown_timeout=0))
            kernel.spawn(asks)
            await kernel.send("asks", "go")
            await trio.testing.wait_all_tasks_blocked()
            outside.cancel()
            await trio.sleep_forever()
    assert outcomes == ["timed out"]
    assert kernel.stats().handled == 1
    assert trio.current_time() == pytest.approx(0.1)
