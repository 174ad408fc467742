"""The conservation law read from one scrape alone, as an operator's alert would: what
``/metrics`` says was accepted is what it says was handled, replied, forwarded,
dead-lettered or is in flight, also while sends wait for room in a full mailbox."""

from __future__ import annotations

import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from nexus_trio import Context, Kernel, KernelConfig, MailboxFull, Message, agent
from nexus_trio.metrics import render_snapshot, take_snapshot
from nexus_trio.testing import open_test_kernel, step_until_idle
from nexus_trio.testing import test_config as base_config


def scraped(kernel: Kernel) -> dict[str, float]:
    """The kernel-wide samples of one scrape (each reason's dead letters summed)."""
    out: dict[str, float] = {}
    text = render_snapshot(take_snapshot(kernel), process=False).decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if "agent_id" not in sample.labels and "quantile" not in sample.labels:
                out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out


def balance(values: dict[str, float]) -> tuple[float, float]:
    """Accepted, and handled + replies + forwarded + dead-lettered + in flight."""
    done = (
        values["nexus_messages_handled_total"]
        + values["nexus_replies_delivered_total"]
        + values["nexus_messages_forwarded_total"]
        + values["nexus_dead_letters_total"]
        + values["nexus_messages_in_flight"]
    )
    return values["nexus_messages_accepted_total"], done


async def test_one_scrape_balances_while_sends_wait_for_room_and_after_they_give_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A full mailbox with three sends waiting for room: ``nexus_messages_in_flight``
    counted them while ``nexus_messages_accepted_total`` did not (since the thirty-first
    pass, so that the counter never falls), and a scrape read 3 more in flight than was
    accepted. In flight is what is in mailboxes and handlers now, the waiting sends are a
    gauge of their own (``nexus_sends_waiting``), and every scrape balances: while they
    wait, after one gives up (cancelled) and after the others get in."""
    import attrs

    config = attrs.evolve(base_config(), kernel=KernelConfig(send_timeout_ms=100))
    release = trio.Event()

    @agent(name="held", mailbox_capacity=1)
    async def held(ctx: Context, msg: Message) -> None:
        if msg.payload == "hold":
            await release.wait()

    @agent(name="failing", on_error="resume")
    async def failing(ctx: Context, msg: Message) -> None:
        raise ValueError("dead-lettered")

    gave_up: list[str] = []

    async def wait_for_room(kernel: Kernel, i: int, cancel_after: float) -> None:
        try:
            with trio.move_on_after(cancel_after) as scope:
                await kernel.send("held", i)
        except MailboxFull:
            gave_up.append(f"{i}: MailboxFull")
        if scope.cancelled_caught:
            gave_up.append(f"{i}: cancelled")

    async with open_test_kernel(config) as kernel:
        kernel.spawn(held)
        kernel.spawn(failing)
        for i in range(4):
            await kernel.send("failing", i)
        await kernel.send("held", "hold")
        await trio.testing.wait_all_tasks_blocked()
        await kernel.send("held", "queued")  # full now
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait_for_room, kernel, 1, 0.03)  # cancelled
            nursery.start_soon(wait_for_room, kernel, 2, 1.0)
            nursery.start_soon(wait_for_room, kernel, 3, 1.0)
            await trio.testing.wait_all_tasks_blocked()
            values = scraped(kernel)
            assert values["nexus_sends_waiting"] == 3
            assert values["nexus_messages_in_flight"] == 2  # in hand and queued
            assert balance(values) == (6.0, 6.0)
            assert kernel.stats().sends_waiting == 3

            await trio.sleep(0.05)  # the first gives up
            values = scraped(kernel)
            assert gave_up == ["1: cancelled"]
            assert values["nexus_sends_waiting"] == 2
            assert balance(values) == (6.0, 6.0)

            release.set()  # room: the other two get in
        await trio.testing.wait_all_tasks_blocked()
        assert gave_up == ["1: cancelled"]
        values = scraped(kernel)
        assert values["nexus_sends_waiting"] == 0
        assert values["nexus_messages_in_flight"] == 0
        assert values["nexus_messages_handled_total"] == 4
        assert balance(values) == (8.0, 8.0)
        assert values["nexus_dead_letters_total"] == 4
        stats = kernel.stats()
        assert stats.accepted == values["nexus_messages_accepted_total"]
        assert stats.in_flight == 0


def agrees(kernel: Kernel) -> dict[str, float]:
    """One scrape, checked against ``kernel.stats()`` read at the same moment (no
    checkpoint between them): every kernel-wide counter the same, and the law balanced."""
    stats = kernel.stats()
    values = scraped(kernel)
    assert values["nexus_messages_accepted_total"] == stats.accepted - stats.sends_waiting
    assert values["nexus_messages_handled_total"] == stats.handled
    assert values["nexus_replies_delivered_total"] == stats.replies_delivered
    assert values["nexus_messages_forwarded_total"] == stats.forwarded
    assert values["nexus_dead_letters_total"] == stats.dead_lettered
    assert values["nexus_dead_letters_total"] == sum(stats.dead_letters_by_reason.values())
    assert values["nexus_messages_in_flight"] == stats.in_flight - stats.sends_waiting
    assert values["nexus_handler_failures_total"] == stats.failed
    assert values["nexus_handler_timeouts_total"] == stats.timed_out
    assert values["nexus_sends_rejected_total"] == sum(stats.rejected.values())
    assert values["nexus_failed_handle_latency_seconds_count"] == (
        stats.failed_handle_latency.count
    )
    accepted, done = balance(values)
    assert accepted == done, (values, stats)
    return values


async def test_a_scrape_agrees_with_stats_at_any_moment_of_a_mixed_run(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Fifty-sixth pass, the counters against each other: a seeded mix of tells and
    requests to agents that handle, fail, time out, drop on a full mailbox, or do not
    exist (rejected), and requests given up; at random moments in the middle of it
    (messages queued and in hand), after it settles and after the shutdown, one scrape
    has what ``stats()`` has, and accepted = handled + replies + forwarded + dead
    letters + in flight."""
    import contextlib
    import random

    import attrs

    from nexus_trio import AgentNotFound, RequestFailed, RequestTimeout

    @agent(name="ok")
    async def ok(ctx: Context, msg: Message) -> object:
        if msg.payload % 3 == 0:
            await trio.sleep(0.01)
        return msg.payload

    @agent(name="bad")
    async def bad(ctx: Context, msg: Message) -> None:
        await trio.sleep(0.005 * (msg.payload % 2))
        raise ValueError("no")

    @agent(name="slow", handle_timeout=0.05)
    async def slow(ctx: Context, msg: Message) -> None:
        await trio.sleep(0.1 if msg.payload % 2 else 0.01)

    @agent(name="small", mailbox_capacity=2, overflow="drop_newest")
    async def small(ctx: Context, msg: Message) -> None:
        await trio.sleep(0.02)

    config = attrs.evolve(base_config(), kernel=KernelConfig(send_timeout_ms=50))
    for seed in range(5):
        rng = random.Random(seed)
        scrapes = 0
        async with open_test_kernel(config) as kernel:
            for spec in (ok, bad, slow, small):
                kernel.spawn(spec)

            async def ask(kernel: Kernel, name: str, n: int, timeout: float) -> None:
                with contextlib.suppress(RequestFailed, RequestTimeout, MailboxFull, AgentNotFound):
                    await kernel.request(name, n, timeout=timeout)

            async with trio.open_nursery() as nursery:
                for n in range(200):
                    name = rng.choice(["ok", "bad", "slow", "small", "nobody"])
                    try:
                        if rng.random() < 0.3:
                            timeout = rng.choice([0.001, 0.2])
                            nursery.start_soon(ask, kernel, name, n, timeout)
                        else:
                            kernel.send_nowait(name, n)
                    except Exception:
                        pass  # (rejected: counted by the kernel)
                    if rng.random() < 0.2:
                        await trio.sleep(rng.choice([0, 0.001, 0.01]))
                    if rng.random() < 0.1:
                        agrees(kernel)
                        scrapes += 1
            await step_until_idle(kernel)
            values = agrees(kernel)
            assert values["nexus_messages_in_flight"] == 0
            assert values["nexus_handler_failures_total"] > 0, seed
            assert values["nexus_handler_timeouts_total"] > 0, seed
            assert values["nexus_sends_rejected_total"] > 0, seed
        assert scrapes > 5, seed
        values = agrees(kernel)  # after the shutdown
        assert values["nexus_messages_in_flight"] == 0
        assert values["nexus_messages_accepted_total"] > 100
