"""How a kernel closes when its shutdown is asked for wrongly or interrupted: nothing
hangs, and the event and dead-letter streams end whatever way the kernel closes."""

from __future__ import annotations

import math
import re
from typing import Any

import pytest
import trio
import trio.testing

from nexus_trio import Context, KernelPhase, Message, agent, open_kernel

from .conftest import make_config


@pytest.mark.parametrize(
    ("grace", "error", "text"),
    [
        (-1, ValueError, "shutdown grace must be >= 0 seconds, got -1"),
        (math.nan, ValueError, "shutdown grace must be >= 0 seconds, got nan"),
        ("1", TypeError, "shutdown grace must be a number of seconds, got '1'"),
        (True, TypeError, "shutdown grace must be a number of seconds, got True"),
    ],
)
async def test_a_shutdown_grace_that_is_not_a_number_of_seconds_is_named_and_starts_nothing(
    autojump_clock: Any, grace: Any, error: type[Exception], text: str
) -> None:
    # Before: the phase was DRAINING already when the grace failed, so the shutdown
    # that leaving the block starts waited forever for the one that never ran.
    handled: list[Any] = []

    @agent(name="a")
    async def a(ctx: Context, msg: Message) -> None:
        handled.append(msg.payload)

    with trio.fail_after(60):
        async with open_kernel(make_config()) as kernel:
            kernel.spawn(a)
            with pytest.raises(error, match=re.escape(text)):
                await kernel.shutdown(grace=grace)
            assert kernel.phase is KernelPhase.RUNNING
            await kernel.send("a", "still running")
    assert kernel.stopped and handled == ["still running"]


async def test_a_bad_shutdown_grace_from_inside_the_tree_fails_the_handler_only(
    autojump_clock: Any,
) -> None:
    # Before: the in-tree shutdown raised in the kernel's own nursery, which cancelled the
    # whole tree without a graceful stop.
    @agent(name="a")
    async def a(ctx: Context, msg: Message) -> None:
        await ctx.kernel.shutdown(grace=-1)

    with trio.fail_after(60):
        async with open_kernel(make_config()) as kernel:
            kernel.spawn(a)
            await kernel.send("a", "stop with a bad grace")
            await trio.testing.wait_all_tasks_blocked()
            assert kernel.phase is KernelPhase.RUNNING
    (letter,) = kernel.recent_dead_letters()
    assert letter.reason.value == "handler_error" and isinstance(letter.error, ValueError)
