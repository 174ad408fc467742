"""Per-agent counters (``kernel.stats(agents=True)``) where messages end unusually:
after the shutdown grace period, skipped because their requester stopped waiting, and
sent after waiting for room in a full mailbox."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from nexus_trio import (
    Agent,
    AgentStats,
    Context,
    Kernel,
    MailboxFull,
    Message,
    MessageKind,
    RequestTimeout,
    agent,
    open_kernel,
)
from nexus_trio.testing import assert_conserved

from .conftest import make_config


def agent_stats(kernel: Kernel, name: str) -> AgentStats:
    (found,) = [a for a in kernel.stats(agents=True).agents if a.name == name]
    return found


def counts(stats: AgentStats) -> tuple[int, int, int, int, int]:
    """received, handled, dead-lettered, queued, timed out."""
    return (
        stats.received,
        stats.handled,
        stats.dead_lettered,
        stats.mailbox_depth,
        stats.timed_out,
    )


async def test_a_handler_cancelled_at_the_end_of_the_grace_period_is_counted_for_its_agent(
    autojump_clock: Any,
) -> None:
    # "slow" handles its first message past the grace period: the handler is cancelled
    # (dead letter ``shutdown``), the two queued behind it are never handled. Agents stop
    # in reverse spawn order, so "watcher" (spawned after it) stops first and sees it held.
    seen: dict[str, AgentStats] = {}

    class Slow(Agent):
        async def handle(self, ctx: Context, msg: Message) -> None:
            await trio.sleep_forever()

        async def on_stop(self, ctx: Context) -> None:
            seen["own on_stop"] = agent_stats(ctx.kernel, "slow")

    class Watcher(Agent):
        async def on_start(self, ctx: Context) -> None:
            return None  # runs from the start (an agent without on_start waits for mail)

        async def handle(self, ctx: Context, msg: Message) -> None:
            return None

        async def on_stop(self, ctx: Context) -> None:
            seen["watcher"] = agent_stats(ctx.kernel, "slow")

    async with open_kernel(make_config(shutdown_grace_ms=1000)) as kernel:
        kernel.spawn(agent(Slow, handle_timeout=100.0), name="slow")
        kernel.spawn(Watcher, name="watcher")
        for i in range(3):
            await kernel.send("slow", i)
        await trio.testing.wait_all_tasks_blocked()
    assert counts(seen["watcher"]) == (3, 0, 1, 2, 0)
    assert counts(seen["own on_stop"]) == (3, 0, 1, 2, 0)
    assert kernel.stats().dead_letters_by_reason == {"shutdown": 3}
    assert_conserved(kernel)


async def test_a_handler_stopped_past_its_shutdown_timeout_is_counted_for_its_agent(
    autojump_clock: Any,
) -> None:
    # An agent with a shutdown_timeout of its own keeps its handler past the grace period;
    # past that timeout too, the run is cancelled and the message dead-lettered: its
    # agent's count says so when on_stop runs.
    seen: list[AgentStats] = []

    class Stubborn(Agent):
        async def handle(self, ctx: Context, msg: Message) -> None:
            await trio.sleep_forever()

        async def on_stop(self, ctx: Context) -> None:
            seen.append(agent_stats(ctx.kernel, "stubborn"))

    spec = agent(Stubborn, handle_timeout=100.0, shutdown_timeout=2.0)
    async with open_kernel(make_config(shutdown_grace_ms=1000)) as kernel:
        kernel.spawn(spec, name="stubborn")
        await kernel.send("stubborn", "being handled")
        await kernel.send("stubborn", "queued")
        await trio.testing.wait_all_tasks_blocked()
    (stats,) = seen
    assert counts(stats) == (2, 0, 1, 1, 0)
    assert kernel.stats().dead_letters_by_reason == {"shutdown": 2}
    assert_conserved(kernel)


async def test_a_handler_cut_short_by_a_failing_background_task_is_counted_for_its_agent(
    autojump_clock: Any,
) -> None:
    # A ctx.nursery task that raises fails the run while a handler is suspended: the
    # message is dead-lettered (``agent_stopped``) and the agent restarts, same counters.
    class Doomed(Agent):
        async def handle(self, ctx: Context, msg: Message) -> None:
            if msg.payload == "fail later":

                async def fail() -> None:
                    await trio.sleep(1)
                    raise RuntimeError("background task failed")

                ctx.nursery.start_soon(fail)
                await trio.sleep_forever()

    async with open_kernel(make_config()) as kernel:
        kernel.spawn(agent(Doomed, handle_timeout=100.0), name="doomed")
        await kernel.send("doomed", "fail later")
        await trio.sleep(2)
        await kernel.send("doomed", "after the restart")
        await trio.testing.wait_all_tasks_blocked()
        stats = agent_stats(kernel, "doomed")
        assert stats.restarts == 1
        assert counts(stats) == (2, 1, 1, 0, 0)
        assert kernel.stats().dead_letters_by_reason == {"agent_stopped": 1}
        assert_conserved(kernel)


async def test_queries_skipped_because_their_requester_stopped_waiting_are_counted_for_their_agent(
    autojump_clock: Any,
) -> None:
    # Two queries wait behind a slow message; their requesters give up (a timeout, a
    # cancel): both are skipped when they come out of the mailbox, dead letter
    # ``request_timeout``. A third requester gives up while its query is being handled:
    # the handler is cancelled, the same dead letter.
    release = trio.Event()

    @agent(name="busy", handle_timeout=100.0)
    async def busy(ctx: Context, msg: Message) -> Any:
        if msg.payload == "first":
            await release.wait()
        if msg.payload == "hangs":
            await trio.sleep_forever()
        return "answer" if msg.kind is MessageKind.QUERY else None

    async with open_kernel(make_config()) as kernel:
        kernel.spawn(busy)
        await kernel.send("busy", "first")
        await trio.testing.wait_all_tasks_blocked()
        async with trio.open_nursery() as nursery:

            async def times_out() -> None:
                with pytest.raises(RequestTimeout):
                    await kernel.request("busy", "queued, timed out", timeout=1.0)

            async def cancelled() -> None:
                with trio.move_on_after(1.0):
                    await kernel.request("busy", "queued, cancelled", timeout=30.0)

            nursery.start_soon(times_out)
            nursery.start_soon(cancelled)
        assert counts(agent_stats(kernel, "busy")) == (3, 0, 0, 2, 0)
        release.set()
        await trio.testing.wait_all_tasks_blocked()
        assert counts(agent_stats(kernel, "busy")) == (3, 1, 2, 0, 0)
        with pytest.raises(RequestTimeout):
            await kernel.request("busy", "hangs", timeout=1.0)
        await trio.testing.wait_all_tasks_blocked()
        assert counts(agent_stats(kernel, "busy")) == (4, 1, 3, 0, 0)
        assert kernel.stats().dead_letters_by_reason == {"request_timeout": 3}
        assert_conserved(kernel)


async def test_sends_that_waited_for_room_are_counted_received_once(autojump_clock: Any) -> None:
    # Capacity 1 under ``block``: a send, a request and an agent's send each wait for room
    # and are then accepted; one send waits past the send deadline (refused, not received)
    # and one is cancelled while it waits (not received either).
    release = trio.Event()
    handled: list[Any] = []

    @agent(name="narrow", mailbox_capacity=1, handle_timeout=100.0)
    async def narrow(ctx: Context, msg: Message) -> Any:
        if msg.payload == "hold":
            await release.wait()
        handled.append(msg.payload)
        return "answer" if msg.kind is MessageKind.QUERY else None

    @agent(name="forwarder")
    async def forwarder(ctx: Context, msg: Message) -> None:
        await ctx.send("narrow", "from an agent")

    async with open_kernel(make_config(send_timeout_ms=1000)) as kernel:
        kernel.spawn(narrow)
        kernel.spawn(forwarder)
        await kernel.send("narrow", "hold")
        await trio.testing.wait_all_tasks_blocked()
        await kernel.send("narrow", "queued")
        # refused after the send deadline: never received
        with pytest.raises(MailboxFull):
            await kernel.send("narrow", "too late")
        # cancelled while waiting: never received
        with trio.move_on_after(0.5):
            await kernel.send("narrow", "cancelled")
        answers: list[Any] = []
        async with trio.open_nursery() as nursery:

            async def ask() -> None:
                answers.append(await kernel.request("narrow", "request", timeout=10.0))

            nursery.start_soon(kernel.send, "narrow", "waited")
            nursery.start_soon(ask)
            await kernel.send("forwarder", "go")
            await trio.testing.wait_all_tasks_blocked()
            assert kernel.mailbox_statistics("narrow").producers_waiting == 3
            assert agent_stats(kernel, "narrow").received == 2
            await trio.sleep(0.5)
            release.set()
        await trio.testing.wait_all_tasks_blocked()
        assert answers == ["answer"]
        assert sorted(handled) == sorted(["hold", "queued", "waited", "request", "from an agent"])
        assert counts(agent_stats(kernel, "narrow")) == (5, 5, 0, 0, 0)
        assert kernel.stats().rejected == {"mailbox_full": 1}
        assert_conserved(kernel)


@pytest.mark.parametrize("policy", ["drop_newest", "drop_oldest"])
async def test_what_a_drop_policy_drops_is_counted_for_its_agent(policy: str) -> None:
    # Five messages to a mailbox of two whose agent is busy with the first: two are
    # dropped (the newest or the oldest queued), each dead-lettered and counted for the
    # agent, so that its received = handled + dead-lettered + queued while it runs.
    release = trio.Event()

    @agent(name="busy", mailbox_capacity=2, overflow=policy)
    async def busy(ctx: Context, msg: Message) -> None:
        await release.wait()

    async with open_kernel(make_config()) as kernel:
        ref = kernel.spawn(busy)
        await kernel.send(ref, "m0")
        await trio.testing.wait_all_tasks_blocked()
        for i in range(1, 5):
            await kernel.send(ref, f"m{i}")
        # m0 being handled (not yet counted anywhere), m1-m4 sent to two places
        assert counts(agent_stats(kernel, "busy"))[:4] == (5, 0, 2, 2)
        release.set()
        await trio.testing.wait_all_tasks_blocked()
        assert counts(agent_stats(kernel, "busy"))[:4] == (5, 3, 2, 0)
    assert_conserved(kernel)
