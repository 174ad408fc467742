"""The helpers a user tests their agents with: send_and_wait, step_until_idle, assert_events."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from nexus_trio import Agent, Backoff, Context, Kernel, Message, Supervisor, agent
from nexus_trio.testing import (
    assert_events,
    assert_no_dead_letters,
    record_events,
    send_and_wait,
    step_until_idle,
)


async def test_send_and_wait_returns_once_effects_and_restart_backoffs_have_played_out(
    nexus_kernel: Kernel, autojump_clock: Any
) -> None:
    seen: list[Any] = []

    class Crashy(Agent):
        async def handle(self, ctx: Context, msg: Message) -> None:
            if msg.payload == "crash":
                raise RuntimeError("crash")
            seen.append(msg.payload)

    nexus_kernel.spawn(
        Supervisor(
            backoff=Backoff(initial=30.0, maximum=30.0, jitter=0.0),
            children=[agent(name="c")(Crashy)],
        )
    )
    await nexus_kernel.send("c", "crash")
    sent = await send_and_wait(nexus_kernel, "c", "after")
    assert sent.payload == "after"
    # The message queued behind the crash waited out the 30 s backoff, on the mock clock.
    assert seen == ["after"]
    assert trio.current_time() >= 30.0
    assert nexus_kernel.stats().in_flight == 0


async def test_step_until_idle_fails_naming_what_is_still_in_flight(
    nexus_kernel: Kernel, autojump_clock: Any
) -> None:
    @agent(name="stuck", handle_timeout=10_000)
    async def stuck(ctx: Context, msg: Message) -> None:
        await trio.sleep_forever()

    await nexus_kernel.send(nexus_kernel.spawn(stuck), "x")
    with pytest.raises(AssertionError, match=r"not idle after 5 s: 1 message\(s\) still in flight"):
        await step_until_idle(nexus_kernel, timeout=5)
    await nexus_kernel.stop(nexus_kernel.lookup("stuck"))


async def test_assert_events_and_assert_no_dead_letters_say_what_differed(
    nexus_kernel: Kernel, autojump_clock: Any
) -> None:
    @agent(name="boom", on_error="restart")
    async def boom(ctx: Context, msg: Message) -> None:
        raise ValueError("boom")

    async with record_events(nexus_kernel) as events:
        await send_and_wait(nexus_kernel, nexus_kernel.spawn(boom), "x")
    # A function agent starts lazily: after the restart it waits for its next message.
    assert_events(events, "boom", ["spawned", "started", "failed", "restarted"])
    with pytest.raises(AssertionError, match=r"expected \['spawned'\], got \['spawned', 'started'"):
        assert_events(events, "boom", ["spawned"])
    with pytest.raises(
        AssertionError,
        match=r"expected no dead letters, got 1: \[\('handler_error', 'x'",
    ):
        assert_no_dead_letters(nexus_kernel)
