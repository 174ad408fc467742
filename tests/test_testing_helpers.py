"""Our testing helpers, used the way a user would use them."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from nexus_trio import Agent, Context, EventKind, Kernel, Message, agent
from nexus_trio.testing import (
    assert_conserved,
    assert_dead_lettered,
    dead_letters,
    record_events,
    settle,
)


@agent(name="echo")
async def echo(ctx: Context, msg: Message) -> Any:
    return {"echo": msg.payload}


async def test_an_agent_in_five_lines(nexus_kernel: Kernel, autojump_clock: Any) -> None:
    ref = nexus_kernel.spawn(echo)
    assert await nexus_kernel.request(ref, "hi") == {"echo": "hi"}


async def test_the_fixture_runs_on_a_mock_clock(nexus_kernel: Kernel, autojump_clock: Any) -> None:
    @agent(handle_timeout=3600)
    async def sleepy(ctx: Context, msg: Message) -> str:
        await trio.sleep(3000)
        return "rested"

    ref = nexus_kernel.spawn(sleepy)
    assert await nexus_kernel.request(ref, None, timeout=4000) == "rested"
    assert trio.current_time() >= 3000


async def test_dead_letter_and_event_assertions(nexus_kernel: Kernel, autojump_clock: Any) -> None:
    class Flaky(Agent):
        async def handle(self, ctx: Context, msg: Message) -> None:
            if msg.payload == "bad":
                raise ValueError("bad input")

    async with record_events(nexus_kernel) as events:
        ref = nexus_kernel.spawn(Flaky, name="flaky")
        await nexus_kernel.send(ref, "bad")
        await nexus_kernel.send(ref, "good")
        await settle()
    letter = assert_dead_lettered(
        nexus_kernel, payload="bad", reason="handler_error", error=ValueError
    )
    assert letter.recipient == ref.id
    assert len(dead_letters(nexus_kernel)) == 1
    assert events.kinds("flaky") == [
        EventKind.SPAWNED,
        EventKind.STARTED,
        EventKind.FAILED,
        EventKind.RESTARTED,
        EventKind.STARTED,
    ]
    with pytest.raises(AssertionError, match="no dead letter with payload='good'"):
        assert_dead_lettered(nexus_kernel, payload="good")
    assert_conserved(nexus_kernel)
