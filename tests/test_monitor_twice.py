"""``ctx.monitor`` twice on one target, and ``ctx.demonitor``: idempotent, as Akka's
``watch`` and ``unwatch`` (docs/supervision.md, "Lifecycle events and monitors")."""

from __future__ import annotations

import uuid
from typing import Any

import trio
import trio.testing

from nexus_trio import Context, Message, agent, open_kernel
from nexus_trio._ledger import Ledger

from .conftest import make_config


@agent(name="target", on_error="restart")
async def target(ctx: Context, msg: Message) -> None:
    if msg.payload == "boom":
        raise RuntimeError("boom")


def make_watcher(seen: list[tuple[str, str]], answers: list[Any]) -> Any:
    @agent(name="watcher")
    async def watcher(ctx: Context, msg: Message) -> None:
        if msg.kind.value == "Event":
            seen.append((msg.payload["event"], msg.payload["reason"]))
            return
        verb, name = msg.payload
        if verb == "monitor":
            ctx.monitor(name)
        else:
            answers.append(ctx.demonitor(name))

    return watcher


async def test_a_double_monitor_gives_one_notice_and_one_demonitor_ends_it(
    autojump_clock: Any,
) -> None:
    seen: list[tuple[str, str]] = []
    answers: list[Any] = []
    async with open_kernel(make_config()) as kernel:
        kernel.spawn(make_watcher(seen, answers))
        kernel.spawn(target)
        await kernel.send("target", "wake")
        await kernel.send("watcher", ("monitor", "target"))
        await kernel.send("watcher", ("monitor", "target"))
        await trio.testing.wait_all_tasks_blocked()
        await kernel.send("target", "boom")  # fails, is restarted
        await trio.sleep(5)
        assert seen == [("failed", "RuntimeError('boom')")]  # one notice, not two
        await kernel.send("watcher", ("demonitor", "target"))
        await kernel.send("watcher", ("demonitor", "target"))  # nothing left to end
        await kernel.send("watcher", ("demonitor", "nobody"))  # no such agent
        await trio.testing.wait_all_tasks_blocked()
        assert answers == [True, False, False]
        await kernel.send("target", "boom")
        await trio.sleep(5)
        await kernel.stop("target")
        await trio.testing.wait_all_tasks_blocked()
        assert seen == [("failed", "RuntimeError('boom')")]  # nothing after the demonitor
        # Monitoring it once it has stopped for good: noproc at once, as ever.
        await kernel.send("watcher", ("monitor", "target"))
        await trio.testing.wait_all_tasks_blocked()
        assert seen[-1] == ("stopped", "noproc")


def test_a_final_notice_ends_the_monitors_on_the_target_and_its_own() -> None:
    """The ledger's monitors alone: a target that stopped for good keeps no monitor on
    it (a later notice of it reaches nobody, an unwatch of it is False), and its own
    monitors of others end with it (their stop tells it nothing), as in Erlang and Akka."""
    ledger = Ledger(4)
    sent: list[tuple[uuid.UUID, uuid.UUID, str]] = []
    ledger.send_notice = lambda msg: sent.append((msg.sender, msg.to, msg.payload["event"]))
    watcher, target, other = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    ledger.watch(watcher, target)
    ledger.watch(target, other)  # the target watches another agent
    ledger.notify(target, "target", "failed", "once", final=False)
    ledger.notify(target, "target", "stopped", "stopped", final=True)
    assert sent == [(target, watcher, "failed"), (target, watcher, "stopped")]
    ledger.notify(target, "target", "failed", "late", final=False)  # its monitors ended
    ledger.notify(other, "other", "stopped", "stopped", final=True)  # so did its own
    assert sent == [(target, watcher, "failed"), (target, watcher, "stopped")]
    assert ledger.unwatch(watcher, target) is False
    assert ledger.unwatch(target, other) is False


def test_an_unwatch_of_a_target_not_watched_is_false_and_ends_nothing() -> None:
    """``unwatch`` of a target the watcher does not watch (it watches another) is False,
    and the monitor it has stays: that target's stop still tells it."""
    ledger = Ledger(4)
    sent: list[tuple[uuid.UUID, uuid.UUID, str]] = []
    ledger.send_notice = lambda msg: sent.append((msg.sender, msg.to, msg.payload["event"]))
    watcher, watched, other = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    ledger.watch(watcher, watched)
    assert ledger.unwatch(watcher, other) is False
    ledger.notify(watched, "watched", "stopped", "stopped", final=True)
    assert sent == [(watched, watcher, "stopped")]
    assert ledger.unwatch(watcher, watched) is False
