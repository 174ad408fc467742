"""Fault injection on the core kernel, thirty-third pass: what earlier rounds left out.

Handlers that raise what is no ``Exception`` (``GeneratorExit``, ``SystemExit``, a
``trio.Cancelled`` of a scope that is not theirs), a stop of one agent asked by several
tasks at once and by the agent itself, ``ctx.nursery`` tasks that shield themselves from
their run's stop, an agent that waits for room in its own full mailbox, messages sent
while the kernel drains, and a shutdown (or a cancel of the block) at a step of a run
that Hypothesis chooses: a restart's backoff, an ``on_start`` spawning linked children,
an ``on_stop`` asking a sibling that has stopped, a handler waiting on a child it
spawned, an escalation while the parent stops. After each: what was sent is handled,
dead-lettered or refused (``kernel.stats()``), and no task is left.
Everything runs on a ``MockClock(autojump_threshold=0)``.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from nexus_trio import (
    Config,
    Context,
    Kernel,
    Message,
    agent,
    open_kernel,
)
from nexus_trio.testing import assert_conserved

from .hang_guard import tasks_living


def _leaves(error: BaseException) -> list[BaseException]:
    """The exceptions a (nested) group holds, in order."""
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]


async def test_a_handler_raising_generator_exit_leaves_the_other_agents_handlers_alone() -> None:
    """Regression: a handler that raised ``GeneratorExit`` before its first suspension
    ended the kernel's shared stepper (the generator that steps every handler re-raised
    it as its own close): every handler stepped after it, in any agent, failed with
    ``StopIteration`` (counted failed, dead-lettered ``handler_error``, its agent
    restarted) while the kernel went down. It goes on up as any other ``BaseException``
    of a handler (``SystemExit``): the kernel ends with it; an agent it woke in the same
    round handles its message."""
    innocent_got: list[Any] = []

    @agent(name="innocent")
    async def innocent(ctx: Context, msg: Message) -> None:
        innocent_got.append(msg.payload)

    @agent(name="bad")
    async def bad(ctx: Context, msg: Message) -> None:
        # (no await: the shared stepper runs this handler; the tell wakes 'innocent',
        # which steps its handler before the crash's cancel reaches it)
        ctx.send_nowait("innocent", "woken")
        raise GeneratorExit

    kernels: list[Kernel] = []

    async def run() -> None:
        async with open_kernel(Config()) as kernel:
            kernels.append(kernel)
            kernel.spawn(innocent)
            kernel.spawn(bad)
            await kernel.send("innocent", "first")
            await trio.testing.wait_all_tasks_blocked()
            await kernel.send("bad", "crash")
            await trio.sleep(1)

    living = tasks_living()
    with pytest.raises(BaseExceptionGroup) as raised:
        await run()
    [kernel] = kernels
    letters = kernel.recent_dead_letters()
    assert [type(leaf) for leaf in _leaves(raised.value)] == [GeneratorExit]
    assert innocent_got == ["first", "woken"]
    stats = kernel.stats()
    assert (stats.failed, stats.handled) == (0, 2)
    assert [letter.reason.value for letter in letters] == ["agent_stopped"]
    assert all("StopIteration" not in (letter.error or "") for letter in letters)
    assert_conserved(kernel)
    assert tasks_living() == living
