"""Fault injection, thirtieth pass: the event and dead-letter streams with hostile
subscribers (slow, raising, leaving from inside their own loop)."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from nexus_trio import Context, EventKind, Message, agent, open_kernel
from nexus_trio.testing import record_events

from .conftest import make_config
from .full_disk import json_log_on_dev_full
from .test_fault_monitors import buffered


@agent
async def idle(ctx: Context, msg: Message) -> None:
    return None


@agent(name="thrower", on_error="resume")
async def thrower(ctx: Context, msg: Message) -> None:
    raise RuntimeError(f"bad {msg.payload}")


async def test_a_slow_event_subscriber_loses_the_newest_counted_and_never_holds_the_kernel(
    autojump_clock: Any,
) -> None:
    """A subscriber that takes 1 s per event, buffer 4, while 50 agents are spawned and
    stopped: the kernel's calls take no time at all, what it received plus what it lost
    is every event, and the loss is counted in ``stats().event_stream_dropped``."""
    received: list[EventKind] = []

    async with open_kernel(make_config()) as kernel, record_events(kernel) as rec:
        slow = kernel.events(buffer=4)

        async def read_slowly() -> None:
            async for event in slow:
                received.append(event.kind)
                await trio.sleep(1)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_slowly)
            await trio.testing.wait_all_tasks_blocked()
            began = trio.current_time()
            refs = [kernel.spawn(idle) for _ in range(50)]
            for ref in refs:
                await kernel.send(ref, "wake")
            await trio.testing.wait_all_tasks_blocked()
            for ref in refs:
                await kernel.stop(ref)
            assert trio.current_time() == began  # nothing waited for the reader
            await trio.sleep(10)  # it reads what its buffer kept
            nursery.cancel_scope.cancel()
        stats = kernel.stats()
        slow.close()
    total = len(rec.events)
    assert total == 150  # spawned, started, stopped: 50 each
    assert rec.dropped == 0
    assert len(received) + slow.dropped == total
    assert len(received) == 5  # the one taken at once, then the four its buffer kept
    assert stats.event_stream_dropped == slow.dropped == 145


@pytest.mark.parametrize("stream", ["events", "dead_letters"])
async def test_a_subscriber_that_leaves_inside_its_own_loop_ends_cleanly_and_loses_nothing_counted(
    autojump_clock: Any, stream: str
) -> None:
    """A subscriber that closes its subscription from inside its ``async for``, at its
    third item, during a burst (100 spawns, or 100 dead letters): its loop ends there,
    without an error; what came after is not counted as lost (it left); the kernel goes
    on, and a second subscriber gets every item."""
    taken: list[Any] = []

    async with open_kernel(make_config()) as kernel:
        kernel.spawn(thrower)
        await kernel.send("thrower", -1)
        await trio.testing.wait_all_tasks_blocked()
        leaving = kernel.events() if stream == "events" else kernel.dead_letters()
        staying = kernel.events() if stream == "events" else kernel.dead_letters()

        async def leave_at_the_third() -> None:
            async for item in leaving:
                taken.append(item)
                if len(taken) == 3:
                    leaving.close()
            taken.append("loop ended")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(leave_at_the_third)
            await trio.testing.wait_all_tasks_blocked()
            for i in range(100):
                if stream == "events":
                    kernel.spawn(idle)
                else:
                    await kernel.send("thrower", i)
                await trio.sleep(0.01)
            await trio.testing.wait_all_tasks_blocked()
        kept = buffered(staying)
        stats = kernel.stats()
    assert len(taken) == 4 and taken[-1] == "loop ended"
    assert taken[:3] == kept[:3]
    assert len(kept) == 100
    assert leaving.dropped == staying.dropped == 0
    assert stats.event_stream_dropped == stats.dead_letter_stream_dropped == 0
    if stream == "dead_letters":
        assert stats.dead_letters_by_reason == {"handler_error": 101}


async def test_a_subscriber_that_raises_ends_its_block_and_the_kernel_shuts_down_in_order(
    autojump_clock: Any,
) -> None:
    """A subscriber task beside the block that raises at the first ``failed`` event (an
    agent restarted after its handler failed): the error comes out of the nursery as it
    was, after the kernel shut down (every agent stopped, the books balanced)."""
    stopped: list[str] = []

    class Boom(Exception):
        pass

    @agent(name="fails", on_error="restart")
    async def fails(ctx: Context, msg: Message) -> None:
        raise RuntimeError("x")

    kernel_seen: list[Any] = []
    with pytest.RaisesGroup(Boom):
        async with trio.open_nursery() as nursery:
            async with open_kernel(make_config()) as kernel:
                kernel_seen.append(kernel)
                events = kernel.events()

                async def raise_at_failed() -> None:
                    async for event in events:
                        if event.kind is EventKind.STOPPED:
                            stopped.append(event.name or "?")
                        if event.kind is EventKind.FAILED:
                            raise Boom(event.name, stopped)

                nursery.start_soon(raise_at_failed)
                for i in range(10):
                    kernel.spawn(idle, name=f"i{i}")
                    await kernel.send(f"i{i}", "wake")
                kernel.spawn(fails)
                await kernel.send("fails", "x")
                await trio.sleep_forever()
    assert stopped == []  # it raised before anything stopped
    kernel = kernel_seen[0]
    stats = kernel.stats()
    assert kernel.stopped
    assert (stats.agents_alive, stats.in_flight) == (0, 0)
    assert stats.accepted == stats.handled + stats.dead_lettered
    assert stats.dead_letters_by_reason == {"handler_error": 1}


@pytest.mark.parametrize("queue", [10_000, 0])
async def test_a_json_log_on_dev_full_during_a_burst_of_dead_letters_counts_every_record_lost(
    restore_logging: None, queue: int
) -> None:
    """The JSON log on a full disk (``/dev/full``: every write fails with ENOSPC), through
    the writer thread's queue or written in place, while 2,000 handler failures make
    2,000 dead letters: the kernel's books balance, and every record (an ERROR with its
    traceback and an INFO dead letter per failure) is counted lost, once; nothing of
    them is written anywhere, nothing raised."""
    with json_log_on_dev_full(queue=queue) as lost:
        # (a line for every dead letter and failure: past [kernel] dead_letter_log_limit
        # and failure_log_limit they are counted unwritten, not lost;
        # tests/test_dead_letter_log.py)
        async with open_kernel(make_config(dead_letter_log_limit=0, failure_log_limit=0)) as kernel:
            kernel.spawn(thrower)
            for i in range(2_000):
                await kernel.send("thrower", i)
            await trio.testing.wait_all_tasks_blocked()
            stats = kernel.stats()
    assert stats.dead_letters_by_reason == {"handler_error": 2_000}
    assert stats.accepted == stats.handled + stats.dead_lettered + stats.in_flight
    assert lost.records == 4_000
