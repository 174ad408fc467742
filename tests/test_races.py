"""Regressions for races between a task that was woken, or waits with a message, and a
cancel or clean-up that comes in the same tick (found by review in the twelfth pass).

Trio wakes a task by rescheduling it; the task runs later in the tick. A memory channel
moves a blocked sender's message into the buffer as it wakes the sender, and a handler
that was woken finishes even if its cancel scope is cancelled before it runs again. Every
test runs on a ``MockClock(autojump_threshold=0)`` and acts at the precise moment from
inside a handler or between two ``wait_all_tasks_blocked``.
"""

from __future__ import annotations

import uuid
from typing import Any

import trio
import trio.testing

from nexus_trio import (
    Context,
    DeadLetterReason,
    Message,
    MessageKind,
    agent,
    open_kernel,
)
from nexus_trio._message import Address
from nexus_trio.testing import assert_conserved, dead_letters

from .conftest import make_config


def _letters(kernel: Any) -> list[tuple[Any, DeadLetterReason]]:
    return [(d.message.payload, d.reason) for d in dead_letters(kernel)]


# --- a handler's returned message, waiting for room, when its agent is cancelled ---------


async def test_a_returned_message_waiting_for_room_when_its_agent_is_stopped_is_dead_lettered(
    autojump_clock: Any,
) -> None:
    """Regression: a handler returned a ``Message`` for a full ``block`` mailbox, and its
    agent was stopped (past its ``shutdown_timeout``) while the message waited for room.
    The cancelled wait enqueued nothing, and ``Router.route`` let the ``Cancelled`` through
    without a dead letter: the message vanished, uncounted."""
    release = trio.Event()
    got: list[Any] = []

    @agent(name="b", mailbox_capacity=1, handle_timeout=1000.0)
    async def b(ctx: Context, msg: Message) -> None:
        await release.wait()
        got.append(msg.payload)

    @agent(name="a", shutdown_timeout=1.0)
    async def a(ctx: Context, msg: Message) -> Message:
        return Message(ctx.id, "b", "out")

    async with open_kernel(make_config(send_timeout_ms=60_000)) as kernel:
        kernel.spawn(b)
        a_ref = kernel.spawn(a)
        await kernel.send("b", "b0")
        await trio.testing.wait_all_tasks_blocked()
        await kernel.send("b", "b1")  # b's mailbox is full now
        await kernel.send(a_ref, "go")
        await trio.testing.wait_all_tasks_blocked()
        assert kernel.mailbox_statistics("b").producers_waiting == 1  # a's route waits
        await kernel.stop(a_ref)  # a's run is cancelled after 1 s
        release.set()
        await trio.testing.wait_all_tasks_blocked()
        assert got == ["b0", "b1"]
        assert _letters(kernel) == [("out", DeadLetterReason.MAILBOX_FULL)]
        assert "its sender stopped waiting" in dead_letters(kernel)[0].detail
        assert_conserved(kernel)


async def test_a_returned_message_waiting_for_room_at_the_end_of_the_grace_is_dead_lettered(
    autojump_clock: Any,
) -> None:
    """The same wait, ended by the shutdown: the grace period passes while the message
    waits and the tree stop cancels the run; it is dead-lettered ``shutdown``."""

    @agent(name="b", mailbox_capacity=1, handle_timeout=1000.0)
    async def b(ctx: Context, msg: Message) -> None:
        await trio.sleep_forever()

    @agent(name="a")
    async def a(ctx: Context, msg: Message) -> Message:
        return Message(ctx.id, "b", "out")

    config = make_config(send_timeout_ms=60_000, shutdown_grace_ms=1000)
    async with open_kernel(config) as kernel:
        kernel.spawn(b)
        a_ref = kernel.spawn(a)
        await kernel.send("b", "b0")
        await trio.testing.wait_all_tasks_blocked()
        await kernel.send("b", "b1")
        await kernel.send(a_ref, "go")
        await trio.testing.wait_all_tasks_blocked()
        assert kernel.mailbox_statistics("b").producers_waiting == 1
    assert sorted(_letters(kernel), key=str) == [
        ("b0", DeadLetterReason.SHUTDOWN),
        ("b1", DeadLetterReason.SHUTDOWN),
        ("out", DeadLetterReason.SHUTDOWN),
    ]
    assert_conserved(kernel)


# --- a cancel that comes after the handler was woken ---------------------------------------


def _suspending(held: str, release: trio.Event, seen: list[Any], *, handle_timeout: float) -> Any:
    """An agent whose handler suspends on every message: the ``held`` payload until
    ``release``, "stuck" for ever, the rest for one checkpoint; it answers a query
    with "answer"."""

    @agent(name="w", handle_timeout=handle_timeout)
    async def w(ctx: Context, msg: Message) -> str | None:
        if msg.payload == held:
            await release.wait()
        elif msg.payload == "stuck":
            await trio.sleep_forever()
        else:
            await trio.lowlevel.checkpoint()
        seen.append(msg.payload)
        return "answer" if msg.kind is MessageKind.QUERY else None

    return w


async def test_a_deadline_that_passes_after_the_handler_was_woken_spares_the_next_message(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Regression: the handler of "first" is woken and, before it runs, its deadline
    passes. Trio cancels the serve loop's scope, too late to stop the handler: it
    finishes, counted handled. The scope stayed cancelled, so the next handler that
    suspended got that ``Cancelled`` at once and was dead-lettered ``handler_timeout``."""
    release = trio.Event()
    seen: list[Any] = []
    w = _suspending("first", release, seen, handle_timeout=10.0)

    async with open_kernel(make_config()) as kernel:
        ref = kernel.spawn(w)
        await kernel.send(ref, "first")
        await trio.testing.wait_all_tasks_blocked()
        await kernel.send(ref, "second")
        release.set()  # the handler of "first" is rescheduled ...
        autojump_clock.jump(10.0)  # ... and its deadline passes before it runs
        await trio.testing.wait_all_tasks_blocked()
        assert seen == ["first", "second"]
        stats = kernel.stats()
        assert (stats.handled, stats.timed_out, stats.dead_lettered) == (2, 0, 0)
        # and the next deadline still fires, with its own reason
        await kernel.send(ref, "stuck")
        await trio.sleep(11)
        assert _letters(kernel) == [("stuck", DeadLetterReason.HANDLER_TIMEOUT)]
        assert_conserved(kernel)


class _NullTransport:
    """Attached only for the kernel's TransportHandle (a remote requester's cancel)."""

    async def deliver(self, msg: Message) -> None:
        raise AssertionError("not used")

    def deliver_nowait(self, msg: Message) -> None:
        raise AssertionError("not used")

    def cancel_query(self, query_id: uuid.UUID, to: Address) -> None:
        pass


async def test_a_query_cancel_that_comes_after_its_handler_was_woken_spares_the_next_message(
    autojump_clock: Any,
) -> None:
    """Regression: a (remote) requester stopped waiting just as the handler of its query
    was woken (``TransportHandle.cancel_query``): the handler finished, but the scope
    stayed cancelled with the reason ``request_timeout``, and the next message was
    cancelled and dead-lettered with it."""
    release = trio.Event()
    seen: list[Any] = []
    w = _suspending("query", release, seen, handle_timeout=1000.0)

    async with open_kernel(make_config()) as kernel:
        handle = kernel.attach_transport(_NullTransport())
        ref = kernel.spawn(w)
        query = Message(uuid.uuid4(), ref.id, "query", MessageKind.QUERY)
        await kernel.send(query)
        await trio.testing.wait_all_tasks_blocked()
        await kernel.send(ref, "tell")
        release.set()  # the handler of the query is rescheduled: it will finish
        assert handle.cancel_query(query.id, ref.id)  # in the same tick: too late
        await trio.testing.wait_all_tasks_blocked()
        assert seen == ["query", "tell"]
        # the query's answer is a late reply (its requester stopped waiting); the tell
        # was handled, not cancelled
        assert _letters(kernel) == [("answer", DeadLetterReason.LATE_REPLY)]
        # a later deadline is a deadline, not the too-late cancel's request timeout
        await kernel.send(ref, "stuck")
        await trio.sleep(1001)
        assert _letters(kernel)[1:] == [("stuck", DeadLetterReason.HANDLER_TIMEOUT)]
        assert_conserved(kernel)


# --- the end of the drain that no idle agent reports --------------------------------------


async def test_shutdown_ends_its_drain_when_the_last_work_is_dead_lettered_by_a_stop(
    autojump_clock: Any,
) -> None:
    """Regression: the drain waits for an event that only an agent going idle set. An
    agent that stops for good during the drain (here ``ctx.stop()`` of a temporary agent)
    dead-letters its queue, and nothing was in flight any more, but it never goes idle:
    the shutdown waited out the whole grace period (100 s here)."""
    gate = trio.Event()

    @agent(name="once", restart="temporary")
    async def once(ctx: Context, msg: Message) -> None:
        await gate.wait()
        ctx.stop()

    took: list[float] = []
    async with open_kernel(make_config(shutdown_grace_ms=100_000)) as kernel:
        ref = kernel.spawn(once)
        await kernel.send(ref, 1)
        await kernel.send(ref, 2)
        await trio.testing.wait_all_tasks_blocked()

        async def shut() -> None:
            start = trio.current_time()
            await kernel.shutdown()
            took.append(trio.current_time() - start)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(shut)
            await trio.testing.wait_all_tasks_blocked()
            gate.set()
    assert _letters(kernel) == [(2, DeadLetterReason.AGENT_STOPPED)]
    assert took == [0.0]
    assert_conserved(kernel)
