"""The order of a parent's stop against its linked children, for every way its run ends.

docs/supervision.md: whenever a parent's run ends (it is stopped, fails, exits normally,
is stopped because a sibling failed, the kernel shuts down, its supervisor gives up on it)
its linked children are stopped first: their ``on_stop`` is done and their ``stopped``
event published before the parent's ``on_stop`` begins, and the parent's own
``stopped`` / ``failed`` event comes after. Each scenario journals ``on_stop`` calls and
the lifecycle events in one sequence: the events published so far are taken from the
subscription (synchronously) before each ``on_stop`` entry is journaled, so the sequence
is the order in which things happened.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.testing

from nexus_trio import (
    Agent,
    Config,
    Context,
    KernelConfig,
    Message,
    SupervisionConfig,
    Supervisor,
    agent,
    open_kernel,
)
from nexus_trio.testing import assert_conserved, step_until_idle

from .hang_guard import real_time_limit

#: mock seconds a scenario may take
MOCK_LIMIT = 600


class Sequence:
    """``on_stop`` calls and lifecycle events, in the order they happened."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, str | None]] = []
        self.stream: Any = None

    def take_events(self) -> None:
        if self.stream is None:
            return
        while True:
            try:
                event = self.stream.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return
            self.entries.append((f"event {event.kind.value}", event.name))

    def note(self, what: str, name: str | None) -> None:
        self.take_events()
        self.entries.append((what, name))

    def first(self, entry: tuple[str, str | None]) -> int:
        assert entry in self.entries, f"{entry} never happened: {self.entries}"
        return self.entries.index(entry)


def make_agent(
    seq: Sequence,
    *,
    on_start: Callable[[Context], Awaitable[None]] | None = None,
    handle: Callable[[Context, Message], Awaitable[Any]] | None = None,
) -> type[Agent]:
    class Journaled(Agent):
        async def on_start(self, ctx: Context) -> None:
            if on_start is not None:
                await on_start(ctx)

        async def handle(self, ctx: Context, msg: Message) -> Any:
            if handle is not None:
                return await handle(ctx, msg)
            return None

        async def on_stop(self, ctx: Context) -> None:
            seq.note("on_stop begins", ctx.name)
            # takes time: a child still stopping while its parent's on_stop runs shows
            await trio.sleep(0.5)
            seq.note("on_stop ends", ctx.name)

    return Journaled


def config(max_restarts: int = 1000) -> Config:
    return Config(
        kernel=KernelConfig(dead_letter_buffer=10_000),
        supervision=SupervisionConfig(
            max_restarts=max_restarts, backoff_initial_ms=0, backoff_max_ms=0
        ),
    )


async def fail(ctx: Context, msg: Message) -> None:
    raise RuntimeError("handler fails")


async def fail_in_background(ctx: Context, msg: Message) -> None:
    async def task() -> None:
        raise RuntimeError("background task fails")

    ctx.nursery.start_soon(task)


async def exit_normally(ctx: Context, msg: Message) -> None:
    ctx.stop()


#: scenario -> (parent options, how the run is ended, the parent's end event)
SCENARIOS: dict[str, tuple[dict[str, Any], str, str]] = {
    "stop": ({}, "stop", "stopped"),
    "drain_stop": ({}, "drain_stop", "stopped"),
    "handler_restart": ({"handle": fail, "on_error": "restart"}, "send", "failed"),
    "handler_stop": ({"handle": fail, "on_error": "stop"}, "send", "failed"),
    "nursery_task": ({"handle": fail_in_background}, "send", "failed"),
    "on_start_fails": ({"on_start_fails": True}, "nothing", "failed"),
    "normal_exit": ({"handle": exit_normally, "restart": "transient"}, "send", "stopped"),
    "one_for_all_sibling": ({}, "sibling", "restarted"),
    "rest_for_one_sibling": ({}, "sibling", "restarted"),
    "shutdown": ({}, "shutdown", "stopped"),
    "restart_intensity": ({"handle": fail, "on_error": "restart"}, "send", "failed"),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
async def test_linked_children_stop_before_their_parents_on_stop(
    autojump_clock: trio.testing.MockClock, scenario: str
) -> None:
    seq = Sequence()
    options, how, end_event = SCENARIOS[scenario]
    restart = options.get("restart", "permanent")

    async def spawn_child(ctx: Context) -> None:
        ctx.spawn(agent(make_agent(seq), name="child"))
        if "on_start_fails" in options:
            # (the child's start waits for the parent's, as spawn order is start order:
            # it never starts, and is stopped, no on_stop to run, before the parent's)
            await trio.sleep(0.1)
            raise RuntimeError("on_start fails")

    parent = agent(
        make_agent(seq, on_start=spawn_child, handle=options.get("handle")),
        name="parent",
        restart=restart,
        on_error=options.get("on_error"),
    )
    target: Any = parent
    if how == "sibling":
        strategy = scenario.removesuffix("_sibling")
        sibling = agent(make_agent(seq, handle=fail), name="sibling", on_error="restart")
        # rest_for_one: the parent comes after the sibling that fails
        target = Supervisor(strategy=strategy, children=[sibling, parent], name="sup")
    max_restarts = 0 if scenario == "restart_intensity" else 1000
    with real_time_limit(30), trio.fail_after(MOCK_LIMIT):
        async with open_kernel(config(max_restarts), seed=1) as kernel:
            async with kernel.events(10_000) as stream:
                seq.stream = stream
                kernel.spawn(target)
                await step_until_idle(kernel)
                if how == "stop":
                    await kernel.stop("parent")
                elif how == "drain_stop":
                    await kernel.stop("parent", drain=True)
                elif how == "send":
                    await kernel.send("parent", "go")
                elif how == "sibling":
                    await kernel.send("sibling", "go")
                elif how == "shutdown":
                    await kernel.shutdown()
                # (mock time: every on_stop of the scenario is over, the exits handled)
                await trio.sleep(10)
                await step_until_idle(kernel)
                seq.take_events()
                # (what the kernel's shutdown does after this is not looked at)
                seq.stream = None
    entries = seq.entries
    if scenario == "on_start_fails":
        parent_stop = seq.first(("on_stop begins", "parent"))
        # (its restart spawns another child, which does run)
        assert ("on_stop ends", "child") not in entries[:parent_stop], entries
        assert seq.first(("event stopped", "child")) < parent_stop, entries
        assert seq.first(("event failed", "parent")) > seq.first(("on_stop ends", "parent"))
        assert_conserved(kernel)
        return
    child_stop = seq.first(("on_stop ends", "child"))
    child_event = seq.first(("event stopped", "child"))
    parent_stop = seq.first(("on_stop begins", "parent"))
    parent_event = seq.first((f"event {end_event}", "parent"))
    assert child_stop < child_event < parent_stop < parent_event, entries
    # the child's first run was its only one before the parent's stop
    assert entries[:parent_stop].count(("on_stop ends", "child")) == 1, entries
    if scenario == "restart_intensity":
        assert ("event stopped", "parent") in entries[parent_event:], entries
    assert_conserved(kernel)
