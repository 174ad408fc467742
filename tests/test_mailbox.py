"""Unit tests of ``Mailbox`` over its memory channel: FIFO, cancellation, eviction, draining, waking.

These drive the mailbox directly, without a kernel, so that each semantic the kernel relies
on (Trio's FIFO of blocked senders, nothing enqueued by a cancelled put, the depth counter)
is checked on its own. Producers are started one at a time with
``wait_all_tasks_blocked`` in between, so the order in which they block is known.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing

from nexus_trio import Message
from nexus_trio._mailbox import HighWater, Mailbox

RECIPIENT = uuid.uuid4()


def message(payload: Any) -> Message:
    return Message(sender=uuid.uuid4(), to=RECIPIENT, payload=payload)


def payloads(messages: list[Message]) -> list[Any]:
    return [m.payload for m in messages]


async def start_blocked_producers(
    nursery: trio.Nursery, mailbox: Mailbox, labels: list[str], outcome: dict[str, str]
) -> None:
    """Start one producer per label, each blocked in ``put_waiting`` before the next starts."""

    async def produce(label: str) -> None:
        try:
            await mailbox.put_waiting(message(label))
        except trio.Cancelled:
            outcome[label] = "cancelled"
            raise
        except Exception as exc:
            outcome[label] = type(exc).__name__
        else:
            outcome[label] = "entered"

    for label in labels:
        nursery.start_soon(produce, label)
        await trio.testing.wait_all_tasks_blocked()


async def receive_one(mailbox: Mailbox, *actions: Callable[[], object]) -> list[Message | None]:
    """What one ``receive()`` gets when ``actions`` run, in order, while it is parked."""
    got: list[Message | None] = []

    async def consumer() -> None:
        got.append(await mailbox.receive())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(consumer)
        await trio.testing.wait_all_tasks_blocked()
        for action in actions:
            action()
    return got


def test_capacity_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="capacity must be >= 1, got 0"):
        Mailbox(0)


async def test_try_put_with_room_does_not_yield_and_counts_depth_and_high_water() -> None:
    mailbox = Mailbox(3)
    with trio.CancelScope() as scope:  # noqa: ASYNC100  # the point: no checkpoint inside
        scope.cancel()
        # A put with room never checkpoints: it succeeds even in a cancelled scope.
        assert mailbox.try_put(message(1))
        assert mailbox.try_put(message(2))
    assert (mailbox.depth, mailbox.high_water, len(mailbox)) == (2, 2, 2)
    assert mailbox.try_put(message(3))
    assert not mailbox.try_put(message(4)), "a full mailbox must refuse"
    assert (mailbox.depth, mailbox.high_water) == (3, 3)
    assert payloads([mailbox.take(), mailbox.take()]) == [1, 2]
    assert (mailbox.depth, mailbox.high_water) == (1, 3)
    assert mailbox.try_put(message(5))
    assert (mailbox.depth, mailbox.high_water) == (2, 3)
    stats = mailbox.statistics()
    assert (stats.depth, stats.capacity, stats.high_water, stats.producers_waiting) == (2, 3, 3, 0)
    assert payloads([mailbox.take(), mailbox.take()]) == [3, 5]
    with pytest.raises(trio.WouldBlock):
        mailbox.take()
    assert mailbox.depth == 0


async def test_kernel_high_water_is_the_largest_depth_of_any_mailbox() -> None:
    shared = HighWater()
    small, large = Mailbox(8, shared), Mailbox(8, shared)
    for i in range(2):
        small.try_put(message(i))
    for i in range(5):
        large.try_put(message(i))
    for _ in range(5):
        large.take()
    for i in range(3):
        small.try_put(message(i))
    assert (small.high_water, large.high_water, shared.value) == (5, 5, 5)
    small.try_put(message("sixth"))
    assert (small.high_water, large.high_water, shared.value) == (6, 5, 6)


async def test_blocked_senders_are_admitted_in_the_order_they_blocked(
    autojump_clock: trio.testing.MockClock,
) -> None:
    mailbox = Mailbox(1)
    assert mailbox.try_put(message("queued"))
    outcome: dict[str, str] = {}
    async with trio.open_nursery() as nursery:
        await start_blocked_producers(nursery, mailbox, ["p1", "p2", "p3"], outcome)
        assert mailbox.waiting == 3
        assert mailbox.statistics().producers_waiting == 3
        # A newcomer with try_put must not overtake the producers already waiting.
        assert not mailbox.try_put(message("overtaker"))
        taken = []
        for expected_waiting in (3, 2, 1):
            taken.append(mailbox.take())
            # Each take admits the first blocked sender into the freed slot.
            assert mailbox.depth == 1
            await trio.testing.wait_all_tasks_blocked()
            assert mailbox.waiting == expected_waiting - 1
        taken.append(mailbox.take())
        assert mailbox.depth == 0
    assert payloads(taken) == ["queued", "p1", "p2", "p3"]
    assert outcome == {"p1": "entered", "p2": "entered", "p3": "entered"}
    assert mailbox.high_water == 1
    with pytest.raises(trio.WouldBlock):
        mailbox.take()


async def test_cancel_while_blocked_leaves_nothing_enqueued(
    autojump_clock: trio.testing.MockClock,
) -> None:
    mailbox = Mailbox(1)
    assert mailbox.try_put(message("queued"))
    outcome: dict[str, str] = {}
    async with trio.open_nursery() as nursery:
        await start_blocked_producers(nursery, mailbox, ["first"], outcome)
        cancelled_scope = trio.CancelScope()

        async def cancellable() -> None:
            with cancelled_scope:
                await mailbox.put_waiting(message("cancelled"))
            outcome["cancelled"] = "cancelled" if cancelled_scope.cancelled_caught else "entered"

        nursery.start_soon(cancellable)
        await trio.testing.wait_all_tasks_blocked()
        await start_blocked_producers(nursery, mailbox, ["last"], outcome)
        assert mailbox.waiting == 3
        cancelled_scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert outcome == {"cancelled": "cancelled"}
        assert (mailbox.depth, mailbox.waiting) == (1, 2)
        taken = [mailbox.take()]
        await trio.testing.wait_all_tasks_blocked()
        taken.append(mailbox.take())
        await trio.testing.wait_all_tasks_blocked()
        taken.append(mailbox.take())
        with pytest.raises(trio.WouldBlock):
            mailbox.take()
    assert payloads(taken) == ["queued", "first", "last"]
    assert outcome == {"cancelled": "cancelled", "first": "entered", "last": "entered"}
    assert (mailbox.depth, mailbox.waiting) == (0, 0)


async def test_send_deadline_cancels_the_wait_and_enqueues_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    mailbox = Mailbox(2)
    mailbox.try_put(message(0))
    mailbox.try_put(message(1))
    start = trio.current_time()
    with trio.move_on_after(0.5) as scope:
        await mailbox.put_waiting(message("late"))
    assert scope.cancelled_caught
    assert trio.current_time() - start == pytest.approx(0.5)
    assert (mailbox.depth, mailbox.waiting) == (2, 0)
    assert payloads(mailbox.take_all()) == [0, 1]
    # An already-cancelled put gets Cancelled before it enqueues, even with room.
    with trio.CancelScope() as cancelled:
        cancelled.cancel()
        await mailbox.put_waiting(message("cancelled first"))
    assert cancelled.cancelled_caught
    assert (mailbox.depth, mailbox.take_all()) == (0, [])
    await mailbox.put_waiting(message("fits"))
    assert payloads(mailbox.take_all()) == ["fits"]


async def test_evict_oldest_makes_room_for_a_newer_message() -> None:
    mailbox = Mailbox(3)
    for i in range(3):
        mailbox.try_put(message(i))
    evicted = mailbox.evict_oldest()
    assert evicted.payload == 0
    assert mailbox.depth == 2
    assert mailbox.try_put(message(3))
    assert mailbox.evict_oldest().payload == 1
    assert mailbox.try_put(message(4))
    assert (mailbox.depth, mailbox.high_water) == (3, 3)
    assert payloads(mailbox.take_all()) == [2, 3, 4]
    with pytest.raises(trio.WouldBlock):
        mailbox.evict_oldest()


async def test_take_all_returns_queued_then_blocked_senders_in_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    mailbox = Mailbox(2)
    mailbox.try_put(message("q1"))
    mailbox.try_put(message("q2"))
    outcome: dict[str, str] = {}
    async with trio.open_nursery() as nursery:
        await start_blocked_producers(nursery, mailbox, ["b1", "b2", "b3"], outcome)
        everything = mailbox.take_all()
        assert mailbox.depth == 0
    assert payloads(everything) == ["q1", "q2", "b1", "b2", "b3"]
    # The blocked producers were admitted, not failed: their messages are in the list.
    assert outcome == {"b1": "entered", "b2": "entered", "b3": "entered"}
    assert mailbox.waiting == 0
    assert mailbox.take_all() == []
    # The mailbox is still usable after take_all (a restart keeps it).
    assert mailbox.try_put(message("after"))
    assert (mailbox.depth, payloads(mailbox.take_all())) == (1, ["after"])


async def test_close_hands_back_everything_and_refuses_later_puts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    mailbox = Mailbox(1)
    mailbox.try_put(message("queued"))
    outcome: dict[str, str] = {}
    async with trio.open_nursery() as nursery:
        await start_blocked_producers(nursery, mailbox, ["w1", "w2"], outcome)
        left = mailbox.close()
    # Nothing accepted is lost: the producers that were waiting are admitted, their
    # messages handed back with the queue (for the caller to dead-letter).
    assert payloads(left) == ["queued", "w1", "w2"]
    assert outcome == {"w1": "entered", "w2": "entered"}
    assert (mailbox.depth, mailbox.waiting) == (0, 0)
    # A closed mailbox refuses further puts: with room or waiting for it.
    with pytest.raises(trio.BrokenResourceError):
        mailbox.try_put(message("after close"))
    with pytest.raises(trio.BrokenResourceError):
        await mailbox.put_waiting(message("after close"))
    assert mailbox.waiting == 0
    assert mailbox.take_all() == []


async def test_receive_waits_for_a_message_and_counts_it_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    mailbox = Mailbox(2)
    got = await receive_one(mailbox, lambda: mailbox.try_put(message("hello")))
    assert payloads([m for m in got if m is not None]) == ["hello"]
    assert got[0] is not None
    assert mailbox.depth == 0


async def test_wake_receiver_wakes_a_parked_receive_with_none(
    autojump_clock: trio.testing.MockClock,
) -> None:
    mailbox = Mailbox(1)
    assert await receive_one(mailbox, mailbox.wake_receiver) == [None]
    # The wake-up was handed over, never buffered: the mailbox is empty and has room.
    assert mailbox.depth == 0
    with pytest.raises(trio.WouldBlock):
        mailbox.take()
    assert mailbox.try_put(message("room for one"))


async def test_wake_receiver_without_a_parked_receiver_sends_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    mailbox = Mailbox(1)
    mailbox.wake_receiver()
    mailbox.wake_receiver()
    assert mailbox.depth == 0
    with pytest.raises(trio.WouldBlock):
        mailbox.take()
    # The single slot is still free, so no None took it.
    assert mailbox.try_put(message("real"))
    got: list[Message | None] = []

    async def consumer() -> None:
        got.append(await mailbox.receive())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(consumer)
    assert [m.payload if m is not None else None for m in got] == ["real"]
    # With a message queued the receiver is not parked: a wake sends nothing either.
    mailbox.try_put(message("queued"))
    mailbox.wake_receiver()
    assert payloads(mailbox.take_all()) == ["queued"]


async def test_wake_receiver_after_a_message_was_handed_to_the_receiver_sends_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A put to a parked receiver hands the message straight to it; a wake-up before the
    receiver runs must neither replace that message nor leave a None in the buffer."""
    mailbox = Mailbox(1)
    got = await receive_one(
        mailbox, lambda: mailbox.try_put(message("handed")), mailbox.wake_receiver
    )
    assert [m.payload if m is not None else None for m in got] == ["handed"]
    assert mailbox.depth == 0
    with pytest.raises(trio.WouldBlock):
        mailbox.take()
    # The single slot is free: no None took it.
    assert mailbox.try_put(message("room for one"))
    assert payloads(mailbox.take_all()) == ["room for one"]


async def test_receive_that_admits_a_blocked_sender_keeps_the_depth_right(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """``receive()`` on a full mailbox with a producer waiting: the depth must stay equal to
    what the buffer holds. Trio's ``receive`` admits the producer and then yields; whether
    the producer's ``waiting -= 1`` runs before the depth is counted depends on Trio's
    (randomised) scheduling order, so the scenario is tried many times."""
    depths: list[tuple[int, int]] = []
    for _ in range(32):
        mailbox = Mailbox(1)
        mailbox.try_put(message("queued"))
        outcome: dict[str, str] = {}
        async with trio.open_nursery() as nursery:
            await start_blocked_producers(nursery, mailbox, ["blocked"], outcome)
            first = await mailbox.receive()
            after_first = mailbox.depth
            second = await mailbox.receive()
            depths.append((after_first, mailbox.depth))
        assert first is not None
        assert second is not None
        assert (first.payload, second.payload) == ("queued", "blocked")
        assert outcome == {"blocked": "entered"}
    # One message left in the buffer after the first receive, none after the second.
    assert set(depths) == {(1, 0)}, f"depth after each receive, per try: {Counter(depths)}"


async def test_takes_after_the_one_waiting_producer_was_admitted_count_the_buffer_once(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A consumer that takes a batch while a producer waits: the first take admits it (the
    buffer is counted, ``statistics()``), the others admit nothing and need no count until
    a producer goes to wait again, even one that does so as the first one resumes (the
    number waiting is the same then, the producer in Trio's FIFO is not)."""
    counted = 0
    original = trio.MemorySendChannel.statistics

    def counting(self: trio.MemorySendChannel[Any]) -> Any:
        nonlocal counted
        counted += 1
        return original(self)

    monkeypatch.setattr(trio.MemorySendChannel, "statistics", counting)
    mailbox = Mailbox(4)
    for i in range(4):
        assert mailbox.try_put(message(i))
    outcome: dict[str, str] = {}
    taken: list[Message] = []
    async with trio.open_nursery() as nursery:
        await start_blocked_producers(nursery, mailbox, ["a"], outcome)
        depths = []
        for _ in range(4):  # one batch: no yield between the takes
            taken.append(mailbox.take())
            depths.append(mailbox.depth)
        assert depths == [4, 3, 2, 1]
        assert counted == 1
        assert mailbox.waiting == 1  # "a" was admitted but has not resumed yet
        # "a" resumes and "b" goes to wait before the next take: one waiting, as before.
        for i in range(3):
            assert mailbox.try_put(message(f"refill {i}"))
        await start_blocked_producers(nursery, mailbox, ["b"], outcome)
        assert (mailbox.waiting, mailbox.depth) == (1, 4)
        taken.append(mailbox.take())  # admits "b": still four in the buffer
        assert (mailbox.depth, counted) == (4, 2)
        taken.extend(mailbox.take_all())
    assert payloads(taken) == [0, 1, 2, 3, "a", "refill 0", "refill 1", "refill 2", "b"]
    assert outcome == {"a": "entered", "b": "entered"}
    assert (mailbox.depth, mailbox.waiting) == (0, 0)


async def test_a_wake_after_the_parked_receiver_was_cancelled_leaves_no_none_behind(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Regression: the receiver's run is cancelled (its wait aborted, the task not yet
    resumed) and, in the same tick, the agent is asked to exit (a group restart, a stop):
    the wake-up found no receiver and was buffered. The next run took that ``None`` as a
    message (the depth one short of the buffer), and the agent's last message was left
    in a channel its close believed empty: lost, uncounted (found by
    test_fault_injection_trees_stop_cleanly_and_count_every_failure)."""
    mailbox = Mailbox(4)
    scope = trio.CancelScope()

    async def consumer() -> None:
        with scope:
            await mailbox.receive()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(consumer)
        await trio.testing.wait_all_tasks_blocked()
        scope.cancel()  # its wait is aborted now; it runs later
        mailbox.wake_receiver()
        assert mailbox.try_put(message("last"))
    # The next run finds exactly the message, and the close hands it back.
    assert mailbox.depth == 1
    assert payloads([mailbox.take()]) == ["last"]
    assert mailbox.depth == 0
    mailbox.try_put(message("at close"))
    assert payloads(mailbox.close()) == ["at close"]
