"""Fault injection, thirtieth pass: monitors and links at unlucky moments."""

from __future__ import annotations

import time
from typing import Any, ClassVar

import trio
import trio.testing

from nexus_trio import (
    Agent,
    Backoff,
    Context,
    EventKind,
    Message,
    Subscription,
    Supervisor,
    agent,
    open_kernel,
)
from nexus_trio.testing import assert_conserved, record_events

from .conftest import make_config


def buffered(stream: Subscription[Any]) -> list[Any]:
    """What ``stream`` has buffered now, taken without waiting."""
    items = []
    while True:
        try:
            items.append(stream.receive_nowait())
        except trio.WouldBlock:
            return items


def notice(msg: Message) -> tuple[str, str, str]:
    p = msg.payload
    return (p["event"], p["name"], p["reason"])


class SlowStop(Agent):
    """Its on_stop takes 1 s (of the mock clock), noted in ``journal``."""

    journal: ClassVar[list[str]] = []

    async def handle(self, ctx: Context, msg: Message) -> None:
        if msg.payload == "boom":
            raise RuntimeError("boom")

    async def on_stop(self, ctx: Context) -> None:
        SlowStop.journal.append("on_stop begins")
        await trio.sleep(1)
        SlowStop.journal.append("on_stop ends")


def make_watcher(seen: list[Any]) -> Any:
    @agent(name="watcher")
    async def watcher(ctx: Context, msg: Message) -> str | None:
        if msg.kind.value == "Event":
            seen.append(notice(msg))
            SlowStop.journal.append(f"notice {msg.payload['event']}")
            return None
        ctx.monitor(msg.payload)
        return "watching"

    return watcher


async def test_a_monitor_set_on_an_agent_that_is_stopping_tells_its_stop(
    autojump_clock: Any,
) -> None:
    SlowStop.journal = []
    seen: list[Any] = []
    async with open_kernel(make_config()) as kernel:
        kernel.spawn(make_watcher(seen))
        ref = kernel.spawn(agent(SlowStop, name="t"))
        await kernel.send(ref, "wake")  # agents start on their first message
        await trio.testing.wait_all_tasks_blocked()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(kernel.stop, ref)
            await trio.sleep(0.5)  # inside its on_stop
            assert SlowStop.journal == ["on_stop begins"]
            assert await kernel.request("watcher", ref.id) == "watching"
            assert await kernel.request("watcher", "t") == "watching"
        await trio.testing.wait_all_tasks_blocked()
        stats = kernel.stats()
    # one monitor per watcher and target (by id or by name): one notice, once it stopped
    assert seen == [("stopped", "t", "stopped")]
    assert SlowStop.journal == ["on_stop begins", "on_stop ends", "notice stopped"]
    assert stats.dead_letters_by_reason == {}


async def test_a_monitor_set_on_an_agent_that_stopped_tells_noproc_once(
    autojump_clock: Any,
) -> None:
    seen: list[Any] = []
    async with open_kernel(make_config()) as kernel:
        kernel.spawn(make_watcher(seen))
        ref = kernel.spawn(agent(SlowStop, name="t"))
        await kernel.stop(ref)
        assert await kernel.request("watcher", ref.id) == "watching"
        assert await kernel.request("watcher", "t") == "watching"
        await trio.testing.wait_all_tasks_blocked()
        # a new holder of the name is not the one watched by id
        kernel.spawn(agent(SlowStop, name="t"))
        await trio.testing.wait_all_tasks_blocked()
        await kernel.stop("t")
        await trio.testing.wait_all_tasks_blocked()
    assert seen == [("stopped", None, "noproc"), ("stopped", "t", "noproc")]


async def test_a_monitor_set_while_its_target_restarts_sees_the_next_failure_and_stop(
    autojump_clock: Any,
) -> None:
    SlowStop.journal = []
    seen: list[Any] = []
    slow = Supervisor(
        children=[agent(SlowStop, name="t")],
        backoff=Backoff(initial=2, maximum=2, jitter=0),
        max_restarts=10,
        name="sup",
    )
    async with open_kernel(make_config()) as kernel, record_events(kernel) as rec:
        kernel.spawn(make_watcher(seen))
        kernel.spawn(slow)
        await trio.testing.wait_all_tasks_blocked()
        await kernel.send("t", "boom")
        await trio.sleep(0.5)  # its on_stop runs: the run is ending
        assert await kernel.request("watcher", "t") == "watching"
        await trio.sleep(1)  # waiting out its backoff now
        assert await kernel.request("watcher", "t") == "watching"
        await trio.sleep(2)  # restarted
        await kernel.send("t", "boom")
        await trio.sleep(5)
        await kernel.stop("t")
        await trio.testing.wait_all_tasks_blocked()
        assert_conserved(kernel)
    # the first failure is reported once its run has ended (after its on_stop, at 1 s):
    # the monitor set at 0.5 s sees it
    assert seen == [
        ("failed", "t", "RuntimeError('boom')"),
        ("failed", "t", "RuntimeError('boom')"),
        ("stopped", "t", "stopped"),
    ]
    assert rec.kinds("t").count(EventKind.RESTARTED) == 2


class Parent(Agent):
    """Spawns a linked child ``kid`` (a SlowStop) on start."""

    async def on_start(self, ctx: Context) -> None:
        ctx.spawn(agent(SlowStop, name="kid"))

    async def handle(self, ctx: Context, msg: Message) -> None:
        return None

    async def on_stop(self, ctx: Context) -> None:
        SlowStop.journal.append("parent on_stop")


async def test_a_linked_pair_stopped_from_both_sides_at_once_stops_each_once_child_first(
    autojump_clock: Any,
) -> None:
    for first in ("parent", "kid"):
        SlowStop.journal = []
        seen: list[Any] = []
        async with open_kernel(make_config()) as kernel, record_events(kernel) as rec:
            kernel.spawn(make_watcher(seen))
            kernel.spawn(agent(Parent, name="parent"))
            await kernel.send("parent", "wake")
            await trio.testing.wait_all_tasks_blocked()
            await kernel.send("kid", "wake")
            await trio.testing.wait_all_tasks_blocked()
            assert await kernel.request("watcher", "parent") == "watching"
            assert await kernel.request("watcher", "kid") == "watching"
            order = [first, "kid" if first == "parent" else "parent"]
            async with trio.open_nursery() as nursery:
                for name in order:
                    nursery.start_soon(kernel.stop, name)
            assert kernel.stats().agents_alive == 1
            await trio.testing.wait_all_tasks_blocked()
            assert_conserved(kernel)
        stopped = [e.name for e in rec.of("stopped") if e.name != "watcher"]
        assert stopped == ["kid", "parent"], first
        # whichever stop reaches the kid first names its reason (Trio runs the two
        # callers in either order): one notice each, the kid's first
        kid_reason = {e.reason for e in rec.of("stopped") if e.name == "kid"}
        assert kid_reason <= {"stopped", "parent_stopped"}, first
        assert seen == [
            ("stopped", "kid", kid_reason.pop()),
            ("stopped", "parent", "stopped"),
        ], first
        assert SlowStop.journal == [
            "on_stop begins",
            "on_stop ends",
            "notice stopped",
            "parent on_stop",
            "notice stopped",
        ], first
        assert rec.of("failed") == [], first


class Worker(Agent):
    """Spawns a linked ``kid`` (instant stop); its handler fails after 1 s."""

    async def on_start(self, ctx: Context) -> None:
        SlowStop.journal.append("worker start")
        ctx.spawn(agent(Quick, name="kid"))

    async def handle(self, ctx: Context, msg: Message) -> None:
        if msg.payload == "fail soon":
            await trio.sleep(1)
            raise RuntimeError("worker fails in the drain")

    async def on_stop(self, ctx: Context) -> None:
        SlowStop.journal.append(f"{ctx.name} on_stop")


class Quick(Agent):
    """Stops at once; ``busy`` keeps it (and the drain) 3 s."""

    async def handle(self, ctx: Context, msg: Message) -> None:
        if msg.payload == "busy":
            await trio.sleep(3)

    async def on_stop(self, ctx: Context) -> None:
        SlowStop.journal.append(f"{ctx.name} on_stop")


async def test_a_supervisor_that_gives_up_during_the_shutdown_takes_its_linked_agents_once(
    autojump_clock: Any,
) -> None:
    SlowStop.journal = []
    seen: list[Any] = []
    config = make_config()
    async with open_kernel(config) as kernel, record_events(kernel) as rec:
        kernel.spawn(make_watcher(seen))
        kernel.spawn(agent(Quick, name="busy"))
        kernel.spawn(
            Supervisor(children=[agent(Worker, name="worker")], max_restarts=0, name="sup")
        )
        await kernel.send("worker", "wake")
        await trio.testing.wait_all_tasks_blocked()
        await kernel.send("kid", "wake")
        for name in ("worker", "kid", "sup"):
            assert await kernel.request("watcher", name) == "watching"
        await kernel.send("worker", "fail soon")
        await kernel.send("busy", "busy")
        await trio.sleep(0.5)
        await kernel.shutdown(grace=5)
        stats = kernel.stats()
    # the first kid dies with its parent's failed run; the failure goes up, the
    # supervisor gives up on it (intensity 0) and the root restarts the supervisor, all
    # in the drain; the watcher handles what came then. What came once the grace was over
    # (the stops of worker and sup) is dead-lettered ``shutdown``: each notice is
    # delivered or counted, none twice.
    assert seen == [
        ("stopped", "kid", "parent_exited"),
        ("failed", "worker", "RuntimeError('worker fails in the drain')"),
        (
            "failed",
            "sup",
            'SupervisorEscalation("restart intensity exceeded along sup -> worker;'
            " last error: RuntimeError('worker fails in the drain')\")",
        ),
    ]
    assert stats.dead_letters_by_reason == {"handler_error": 1, "shutdown": 2}
    assert (stats.failed, stats.restarts, stats.given_up, stats.in_flight) == (1, 1, 0, 0)
    assert stats.accepted == stats.handled + stats.replies_delivered + stats.dead_lettered
    assert [(e.kind.value, e.reason) for e in rec.events if e.name == "sup"][1:] == [
        ("escalated", "child worker"),
        ("failed", "SupervisorEscalation"),
        ("restarted", "backoff 0 s"),
        ("stopped", "shutdown"),
    ]
    kids = [(e.kind.value, e.reason) for e in rec.events if e.name == "kid"]
    assert kids == [
        ("spawned", ""),
        ("started", ""),
        ("stopped", "parent_exited"),
        ("spawned", ""),  # the restarted worker's own kid, never woken
        ("stopped", "parent_stopped"),
    ]


def hub_of(count: int, seen: list[Any], **options: Any) -> Any:
    """An agent named ``hub`` that monitors ``t0`` .. ``t<count-1>`` when asked, and
    notes each notice it gets."""

    @agent(name="hub", **options)
    async def hub(ctx: Context, msg: Message) -> str | None:
        if msg.kind.value == "Event":
            seen.append(notice(msg))
            return None
        for i in range(count):
            ctx.monitor(f"t{i}")
        return "watching"

    return hub


@agent
async def idle(ctx: Context, msg: Message) -> None:
    return None


async def test_a_notice_to_a_full_mailbox_is_dead_lettered_saying_it_did_not_wait(
    autojump_clock: Any,
) -> None:
    """Regression: ten targets stopped at once (their supervisor stopped) sent their
    watcher, whose mailbox holds four, ten notices: those that found it full were
    dead-lettered ``mailbox_full`` saying ``still full after 0.5s``, the send timeout of
    sends that wait, where a notice waits for nothing and was refused at once."""
    seen: list[Any] = []
    async with (
        open_kernel(make_config()) as kernel,
        kernel.dead_letters() as letters,
    ):
        kernel.spawn(hub_of(10, seen, mailbox_capacity=4))
        kernel.spawn(Supervisor(children=[agent(idle, name=f"t{i}") for i in range(10)], name="s"))
        assert await kernel.request("hub", "watch") == "watching"
        await kernel.stop("s")
        await trio.testing.wait_all_tasks_blocked()
        stats = kernel.stats()
        dead = buffered(letters)
    # the targets stop in reverse start order; what found the mailbox full is counted
    assert [name for _, name, _ in seen] == ["t9", "t8", "t7", "t6", "t5"]
    assert [d.message.payload["name"] for d in dead] == ["t4", "t3", "t2", "t1", "t0"]
    assert {(d.reason.value, d.detail) for d in dead} == {
        ("mailbox_full", "full: a monitor notice does not wait for room")
    }
    assert stats.dead_letters_by_reason == {"mailbox_full": 5}
    assert stats.accepted == stats.handled + stats.replies_delivered + stats.dead_lettered


async def _shut_down_watched(n: int) -> tuple[float, Any]:
    """A kernel where ``hub`` watches n targets and n watchers watch ``last`` (spawned
    last, so stopped first), shut down: the CPU time of the shutdown, and the stats."""

    @agent
    async def watcher(ctx: Context, msg: Message) -> None:
        ctx.monitor("last")

    seen: list[Any] = []
    async with open_kernel(make_config()) as kernel:
        kernel.spawn(hub_of(n, seen))
        for i in range(n):
            kernel.spawn(idle, name=f"t{i}")
        watchers = [kernel.spawn(watcher) for _ in range(n)]
        kernel.spawn(idle, name="last")
        assert await kernel.request("hub", "watch") == "watching"
        for ref in watchers:
            await kernel.send(ref, "watch")
        await trio.testing.wait_all_tasks_blocked()
        began = time.process_time()
    took = time.process_time() - began
    assert seen == []  # every notice came once nothing was handled any more
    return took, kernel.stats()


async def test_monitors_of_ten_thousand_agents_at_shutdown_are_each_counted_in_linear_time(
    autojump_clock: Any,
) -> None:
    """10,000 targets watched by one agent, and 10,000 watchers of one target stopped
    before them: each notice of the shutdown is dead-lettered ``shutdown`` and counted,
    once (none to a watcher stopped already), and the shutdown's cost grows with the
    agents, not with their square (five times the agents: well under 25 times the CPU
    time)."""
    small, small_stats = await _shut_down_watched(2_000)
    large, large_stats = await _shut_down_watched(10_000)
    for n, stats in ((2_000, small_stats), (10_000, large_stats)):
        assert stats.dead_letters_by_reason == {"shutdown": 2 * n}
        assert stats.accepted == stats.handled + stats.replies_delivered + stats.dead_lettered
        assert (stats.agents_alive, stats.in_flight) == (0, 0)
    assert large < 12 * small, (small, large)
