"""Fault injection on the kernel's streams (``kernel.events()``, ``kernel.dead_letters()``)
and on the budgets of log lines a second (``[kernel] dead_letter_log_limit``,
``failure_log_limit``).

A stream (:class:`nexus_trio._streams.Broadcast`) promises every subscriber each item
published while it is subscribed, in order, or a count of it in ``dropped`` (its buffer was
full), never blocking the publisher; its end at shutdown gives a reader what was buffered,
then the end. A line budget (:class:`nexus_trio._throttle.LineBudget`) promises that every
record past the limit is counted and said in one line when its second ends (or when the
kernel closes). The properties below strike both at random points: readers cancelled
mid-``async for`` and resumed, subscriptions closed or dropped unreferenced while items
flow, the stream ending with items buffered and readers waiting, the kernel shut down
with messages queued; records of two budgets interleaved at random times and the kernel
closed mid-second.
"""

from __future__ import annotations

import gc
import logging
import random
import uuid
from collections.abc import Callable
from contextlib import suppress
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from nexus_trio import (
    AgentNotFound,
    Context,
    MailboxFull,
    Message,
    agent,
    open_kernel,
)
from nexus_trio._deadletter import DeadLetterReason
from nexus_trio._ledger import Ledger
from nexus_trio._streams import Broadcast, Subscription
from nexus_trio.testing import open_test_kernel, test_config

from .conftest import make_config
from .full_disk import json_log_on_dev_full
from .hang_guard import fault_settings

#: the ring of recent items the broadcast under test keeps
RECENT = 4


class _Sub:
    """One subscription of the property and what it was offered and got."""

    def __init__(self, sub: Subscription[int]) -> None:
        self.sub: Subscription[int] | None = sub
        #: items published while it was subscribed (the model)
        self.offered: list[int] = []
        self.got: list[int] = []
        self.closed = False
        #: its ``dropped`` when the property let go of it (forgotten subscriptions)
        self.dropped_at_forget = 0
        self.reader: trio.CancelScope | None = None


@fault_settings(300)
@given(seed=st.integers(0, 2**32 - 1), steps=st.integers(1, 40))
def test_a_stream_gives_each_subscriber_every_item_in_order_or_counts_it(
    seed: int, steps: int
) -> None:
    """Publishes, subscribes, readers that take a few items and stop or are cancelled
    mid-wait and resumed, ``receive_nowait``, ``close``, subscriptions dropped without a
    close (collected), and the stream's end at a random point: each subscriber got an
    increasing run of what was published while it was subscribed, and what it did not get
    is its ``dropped`` (open to the end) or at most that plus what it left buffered
    (closed); the broadcast's ``dropped`` is its subscribers' sum; a reader of an ended
    stream gets what was buffered, then the end; no task is left waiting."""
    rng = random.Random(seed)

    async def main() -> None:
        broadcast: Broadcast[int] = Broadcast(RECENT, "events()")
        subs: list[_Sub] = []
        published: list[int] = []
        finished = False

        async def read(entry: _Sub, take: int, scope: trio.CancelScope) -> None:
            with scope:
                sub = entry.sub
                assert sub is not None
                async for item in sub:
                    entry.got.append(item)
                    if len(entry.got) >= take:
                        break
            entry.reader = None

        async with trio.open_nursery() as nursery:
            for _ in range(steps):
                op = rng.choice(
                    ["publish"] * 4
                    + ["subscribe", "reader", "nowait", "cancel", "close", "forget", "finish"]
                )
                live = [e for e in subs if e.sub is not None and not e.closed]
                if op == "publish":
                    for _ in range(rng.randint(1, 4)):
                        item = len(published)
                        published.append(item)
                        broadcast.publish(item)
                        if not finished:
                            for entry in live:
                                entry.offered.append(item)
                elif op == "subscribe" or not live:
                    subs.append(_Sub(broadcast.subscribe(rng.randint(1, 3))))
                elif op == "reader":
                    entry = rng.choice(live)
                    if entry.reader is None:
                        entry.reader = trio.CancelScope()
                        take = len(entry.got) + rng.randint(1, 3)
                        nursery.start_soon(read, entry, take, entry.reader)
                elif op == "nowait":
                    entry = rng.choice(live)
                    if entry.reader is None:
                        assert entry.sub is not None
                        with suppress(trio.WouldBlock, trio.EndOfChannel):
                            entry.got.append(entry.sub.receive_nowait())
                elif op == "cancel":
                    for entry in live:
                        if entry.reader is not None and rng.random() < 0.5:
                            entry.reader.cancel()
                elif op == "close":
                    entry = rng.choice(live)
                    if entry.reader is not None:
                        entry.reader.cancel()
                        await trio.testing.wait_all_tasks_blocked()
                    assert entry.sub is not None
                    entry.sub.close()
                    entry.closed = True
                elif op == "forget":
                    entry = rng.choice(live)
                    if entry.reader is not None:
                        entry.reader.cancel()
                        await trio.testing.wait_all_tasks_blocked()
                    assert entry.sub is not None
                    entry.dropped_at_forget = entry.sub.dropped
                    key = id(entry.sub)
                    entry.sub = None  # the only reference: collected, so unsubscribed
                    if key in broadcast._subscribers:
                        gc.collect()  # (only if a cycle held it: a full collection is slow)
                    assert key not in broadcast._subscribers
                elif op == "finish" and not finished:
                    broadcast.finish()
                    finished = True
                await trio.testing.wait_all_tasks_blocked()
            if not finished:
                broadcast.finish()
            await trio.testing.wait_all_tasks_blocked()
            # Readers still waiting took the end; each open subscription is read out.
            for entry in subs:
                assert entry.reader is None, "a reader still waits on an ended stream"
                if entry.sub is not None and not entry.closed:
                    async for item in entry.sub:
                        entry.got.append(item)
        assert broadcast.published == len(published)
        assert list(broadcast.recent) == published[-RECENT:]
        assert not broadcast._subscribers
        total_dropped = 0
        for entry in subs:
            assert entry.got == sorted(set(entry.got)), entry.got
            assert set(entry.got) <= set(entry.offered)
            if entry.sub is None:
                dropped = entry.dropped_at_forget
                assert len(entry.got) + dropped <= len(entry.offered)
            elif entry.closed:
                dropped = entry.sub.dropped
                assert len(entry.got) + dropped <= len(entry.offered)
            else:
                dropped = entry.sub.dropped
                assert len(entry.got) + dropped == len(entry.offered), (
                    entry.got,
                    dropped,
                    entry.offered,
                )
            total_dropped += dropped
        assert broadcast.dropped == total_dropped

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


@agent(mailbox_capacity=3)
async def sink(ctx: Context, msg: Message) -> None:
    if msg.payload == "hang":
        await trio.sleep_forever()
    if msg.payload == "boom":
        raise RuntimeError("boom")


@fault_settings(200)
@given(seed=st.integers(0, 2**32 - 1))
def test_a_kernel_s_streams_give_a_reader_cancelled_and_resumed_every_item_or_count_it(
    seed: int,
) -> None:
    """Readers of ``dead_letters()`` and ``events()`` outside the kernel's block, each
    cancelled at random points and resumed, while agents hang, fail and are stopped and
    the kernel shuts down with messages queued (block exit, ``shutdown(grace=0)``, a
    drain): each reader got, in order, every dead letter and event published after it
    subscribed or a count of it in ``dropped`` (also in ``stats()``), then the end; the
    dead letters it got are those ``stats()`` counted; no task is left."""
    rng = random.Random(seed)
    letters: list[Any] = []
    events: list[Any] = []
    outcome: dict[str, Any] = {}

    async def read(stream: Subscription[Any], into: list[Any]) -> None:
        # cancelled at random points and resumed, until the stream ends
        while True:
            with trio.move_on_after(rng.choice([0, 0.001, 0.01, 1])):
                async for item in stream:
                    into.append(item)
                    if rng.random() < 0.3:
                        await trio.sleep(rng.choice([0, 0.01]))  # a slow reader
                return

    async def main() -> None:
        async with trio.open_nursery() as outside:
            async with open_kernel(make_config(dead_letter_buffer=4)) as kernel:
                dl = kernel.dead_letters(rng.randint(1, 6))
                ev = kernel.events(rng.randint(1, 6))
                outside.start_soon(read, dl, letters)
                outside.start_soon(read, ev, events)
                refs = [kernel.spawn(sink, name=f"s{i}") for i in range(rng.randint(1, 3))]
                for _ in range(rng.randint(0, 20)):
                    ref = rng.choice(refs)
                    step = rng.choice(["ok", "hang", "boom", "stop", "sleep"])
                    if step == "stop":
                        with suppress(AgentNotFound):
                            await kernel.stop(ref)
                    elif step == "sleep":
                        await trio.sleep(rng.choice([0, 0.001, 0.5]))
                    else:
                        with suppress(MailboxFull, AgentNotFound):
                            kernel.send_nowait(ref, step)
                    if rng.random() < 0.3:
                        await trio.testing.wait_all_tasks_blocked()
                end = rng.choice(["exit", "grace0", "drain"])
                if end == "grace0":
                    await kernel.shutdown(grace=0)
                elif end == "drain":
                    await kernel.shutdown(grace=0.01)
            outcome["stats"] = kernel.stats()
            outcome["dl"], outcome["ev"] = dl, ev
            outcome["events"] = kernel._ledger._events.published

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    stats = outcome["stats"]
    dl, ev = outcome["dl"], outcome["ev"]
    assert len(letters) + dl.dropped == stats.dead_lettered
    assert dl.dropped == stats.dead_letter_stream_dropped
    assert ev.dropped == stats.event_stream_dropped
    assert len(events) + ev.dropped == outcome["events"]
    ids = [letter.message_id for letter in letters]
    assert len(set(ids)) == len(ids)
    times = [event.time for event in events]
    assert times == sorted(times)


@fault_settings(300)
@given(seed=st.integers(0, 2**32 - 1))
def test_every_record_past_a_line_budget_is_said_once_by_the_end_of_its_second(
    seed: int,
) -> None:
    """Dead letters and handler failures of a few keys, at random times, past their
    budgets of lines a second, the kernel's task that says them running, and the kernel
    closed at a random point: every record not logged is said once (the lines' counts sum
    to ``not_logged``), each line no later than the end of its second (by the kernel's
    task, or by the next record after it), in order."""
    rng = random.Random(seed)
    said: dict[str, list[tuple[float, int]]] = {"dead": [], "fail": []}
    #: the end of the second of each record not logged, by budget
    due: dict[str, list[float]] = {"dead": [], "fail": []}

    async def main() -> None:
        ledger = Ledger(4, rng.randint(1, 3), rng.randint(1, 3))
        budgets = {"dead": ledger.dead_letter_lines, "fail": ledger.failure_lines}

        def saying(name: str) -> Callable[[int, str], None]:
            return lambda total, by_key: said[name].append((trio.current_time(), total))

        for name, budget in budgets.items():
            budget.say = saying(name)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ledger.say_unlogged_when_due)
            for _ in range(rng.randint(1, 30)):
                name = rng.choice(["dead", "fail"])
                budget = budgets[name]
                if not budget.allowed(rng.choice("ab")):
                    end = budget.window_end
                    assert end is not None
                    due[name].append(end)
                await trio.sleep(rng.choice([0, 0, 0.1, 0.3, 0.7, 1.0, 2.5]))
            nursery.cancel_scope.cancel()
        ledger.say_unlogged()  # the kernel's close
        for name, budget in budgets.items():
            assert sum(total for _, total in said[name]) == budget.not_logged == len(due[name])

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    for name in ("dead", "fail"):
        # each line says the records of one second, said when it ended (or at the close)
        ends = sorted(set(due[name]))
        lines = said[name]
        assert len(lines) == len(ends)
        for (at, total), end in zip(lines, ends, strict=True):
            assert total == due[name].count(end)
            assert at <= end, f"{name}: the line of the second ending at {end} said at {at}"


async def test_a_failure_line_is_not_held_behind_a_dead_letter_second_ending_later(
    autojump_clock: Any,
) -> None:
    """A second of handler failures (0 to 1 s) and one of dead letters (0.5 to 1.5 s), both
    past their budget when the kernel's task wakes: each line at the end of its own
    second. (Waiting for the dead letters' end first said the failures at 1.5 s.)"""
    said: list[tuple[str, float, int]] = []
    ledger = Ledger(4, 1, 1)
    ledger.dead_letter_lines.say = lambda total, by: said.append(
        ("dead letters", trio.current_time(), total)
    )
    ledger.failure_lines.say = lambda total, by: said.append(
        ("failures", trio.current_time(), total)
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ledger.say_unlogged_when_due)
        assert ledger.failure_lines.allowed("agent a")  # its second: 0 to 1 s
        await trio.sleep(0.5)
        assert ledger.dead_letter_lines.allowed("shutdown")  # 0.5 to 1.5 s
        assert not ledger.dead_letter_lines.allowed("shutdown")  # wakes the task
        assert not ledger.failure_lines.allowed("agent a")
        assert not ledger.failure_lines.allowed("agent a")
        await trio.sleep(5)
        nursery.cancel_scope.cancel()
    assert said == [("failures", 1.0, 2), ("dead letters", 1.5, 1)]


async def test_the_ledger_s_close_says_the_records_its_second_held_back(
    autojump_clock: Any,
) -> None:
    """``finish_streams`` (the kernel's close) says the line of the records not logged
    in the second it closes in: one dead letter past a limit of 1 a second, said at
    once, not lost with the kernel."""
    said: list[tuple[float, int]] = []
    ledger = Ledger(4, 1)
    ledger.dead_letter_lines.say = lambda total, by: said.append((trio.current_time(), total))
    assert ledger.dead_letter_lines.allowed("shutdown")
    assert not ledger.dead_letter_lines.allowed("shutdown")
    await trio.sleep(0.25)
    ledger.finish_streams()
    assert said == [(0.25, 1)]


async def test_a_per_key_line_limit_of_0_lifts_the_kind_s_limit_too(autojump_clock: Any) -> None:
    """A per-key limit of 0 asks for a line each: ``log_kind_limit`` (2 here) does not
    apply to that kind then, for failures as for dead letters; with a per-key limit the
    kind's limit holds."""
    for per_key in (0, 5):
        ledger = Ledger(4, per_key, per_key, 2)
        for budget in (ledger.dead_letter_lines, ledger.failure_lines):
            said = [budget.allowed(key) for key in "abcde"]
            assert said == ([True] * 5 if per_key == 0 else [True, True, False, False, False])


async def test_a_dead_letter_s_line_says_its_detail(
    autojump_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    ledger = Ledger(4)
    to = uuid.uuid4()
    msg = Message(to, to, "x")
    with caplog.at_level(logging.INFO, logger="nexus_trio.dead_letters"):
        ledger.dead_letter(msg, DeadLetterReason.MAILBOX_FULL, to, "a", detail="it did not wait")
        ledger.dead_letter(msg, DeadLetterReason.MAILBOX_FULL, to, "a")
    assert [r.getMessage() for r in caplog.records if r.name == "nexus_trio.dead_letters"] == [
        f"dead letter {msg.id} to {to}: mailbox_full (it did not wait)",
        f"dead letter {msg.id} to {to}: mailbox_full",
    ]


@agent(name="failing")
async def failing(ctx: Context, msg: Message) -> None:
    raise RuntimeError(f"boom {msg.payload}")


async def test_a_storm_past_the_line_budgets_with_the_log_on_dev_full_is_counted_whole(
    restore_logging: None, autojump_clock: trio.testing.MockClock
) -> None:
    """Thirty handler failures in a second past budgets of two lines a second, the log on
    a full disk (``/dev/full``: every write fails with ENOSPC), the kernel closed within
    the second: the failures are dead-lettered and counted, the records past the budgets
    counted not logged (28 of each), every record written is counted lost (the 2 + 2
    lines and the two lines saying the rest, at the close), none raised into the kernel."""
    with json_log_on_dev_full() as lost:
        config = test_config(dead_letter_log_limit=2, failure_log_limit=2)
        async with open_test_kernel(config) as kernel:
            kernel.spawn(failing)
            for n in range(30):
                await kernel.send("failing", n)
            await trio.testing.wait_all_tasks_blocked()
            assert trio.current_time() < 1.0  # (the records' second has not ended)
        stats = kernel.stats()
    assert stats.dead_letters_by_reason == {"handler_error": 30}
    assert stats.dead_letter_lines_not_logged == 28
    assert stats.failure_lines_not_logged == 28
    assert lost.records == 2 + 2 + 2, lost
    assert lost.calls_failed == 0


async def test_a_report_event_that_is_not_an_event_is_refused_naming_what_it_got() -> None:
    """``kernel.report_event`` (for transports and bridges) published whatever it was
    given: every ``events()`` reader then got a dict, and failed on it far from the call."""
    async with open_kernel(make_config()) as kernel, kernel.events(buffer=4) as events:
        with pytest.raises(
            TypeError,
            match=r"^kernel\.report_event\(\) takes a nexus_trio\.LifecycleEvent, got dict"
            r" \{'kind': 'unreachable'\}$",
        ):
            kernel.report_event({"kind": "unreachable"})  # type: ignore[arg-type]
        with pytest.raises(trio.WouldBlock):
            events.receive_nowait()  # nothing was published
