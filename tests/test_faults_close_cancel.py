"""Fault hunt, fifty-first pass: what the kernel holds when its close is cancelled.

A block that ended (or that the kernel cancelled: its Ctrl-C, the root's give-up) waits
in its close for the drain; a cancel from outside that comes then ends the drain (Trio's
prompt exit) and goes on out once the tree has stopped. What the kernel held to raise
then, the block's own error, a Ctrl-C it took or the root's give-up, goes out in place
of that ``Cancelled``, as Trio loses no error and no KeyboardInterrupt to a cancel; so
does a Ctrl-C ``run_async`` (``nexus run``'s run) took, called in a scope cancelled so.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import pytest
import trio
import trio.testing
from rich.console import Console

from nexus_trio import (
    Agent,
    AgentSpec,
    Config,
    Context,
    DeadLetterReason,
    KernelConfig,
    Message,
    SupervisionConfig,
    SupervisorEscalation,
    agent,
    open_kernel,
)
from nexus_trio.cli._run import RunOptions, load_app, run_async
from nexus_trio.cli._workloads import Demo
from nexus_trio.testing import assert_conserved

from .hang_guard import real_time_limit

#: mock seconds before a test that waits for ever fails
MOCK_LIMIT = 600


@pytest.fixture(autouse=True)
def guard_real_time() -> Iterator[None]:
    with real_time_limit(30):
        yield


def config(*, escalate_to_kernel: bool = False) -> Config:
    """A grace of 100 s: a drain holds the close until the cancel from outside ends it."""
    return Config(
        kernel=KernelConfig(dead_letter_buffer=1000, shutdown_grace_ms=100_000),
        supervision=SupervisionConfig(
            max_restarts=0 if escalate_to_kernel else 1000,
            backoff_initial_ms=0,
            backoff_max_ms=0,
            escalate_to_kernel=escalate_to_kernel,
        ),
    )


class Busy(Agent):
    """A Ctrl-C on ``"ctrl-c"``; a run failure (a ``ctx.nursery`` task raising) a second
    after ``"fail"``; any other message keeps it busy for 10 s."""

    async def handle(self, ctx: Context, msg: Message) -> None:
        if msg.payload == "ctrl-c":
            raise KeyboardInterrupt  # a Ctrl-C landing in an agent's code
        if msg.payload == "fail":

            async def fail_later() -> None:
                await trio.sleep(1)
                raise RuntimeError("its task fails")

            ctx.nursery.start_soon(fail_later)
            return
        await trio.sleep(10)


def letters(kernel: Any) -> list[tuple[Any, DeadLetterReason]]:
    return [(d.message.payload, d.reason) for d in kernel.recent_dead_letters()]


async def test_a_ctrl_c_the_kernel_took_goes_out_when_its_close_is_cancelled_in_the_drain(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A Ctrl-C in a handler at 1 s: the kernel took it, cancelled the block and drained
    (``b2``'s message in hand for 10 s, a grace of 100 s); at 3 s a cancel scope around
    the block was cancelled. The drain ended then, but ``open_kernel`` raised that
    scope's ``Cancelled`` (from its task that ends the drain at such a cancel) and the
    scope took it: the Ctrl-C was lost and the program went on after the scope. It goes
    out now, once the kernel has stopped, promptly. (Fails with main's _kernel.py: the
    scope caught the cancel, nothing raised.)"""
    kernels: list[Any] = []
    scopes: list[trio.CancelScope] = []

    async def cancelled_while_it_drains() -> None:
        with trio.move_on_after(3) as outside:
            scopes.append(outside)
            async with open_kernel(config()) as kernel:
                kernels.append(kernel)
                kernel.spawn(agent(Busy, name="b1"))
                await kernel.send(kernel.spawn(agent(Busy, name="b2")), "work")
                await trio.sleep(1)
                await kernel.send("b1", "ctrl-c")
                await trio.sleep_forever()  # cancelled by the kernel, for its Ctrl-C

    start = trio.current_time()
    with trio.fail_after(MOCK_LIMIT), pytest.raises(KeyboardInterrupt) as raised:
        await cancelled_while_it_drains()
    (kernel,) = kernels
    assert type(raised.value) is KeyboardInterrupt, repr(raised.value)
    assert scopes[0].cancel_called
    assert trio.current_time() - start == 3.0  # the cancel's prompt stop, not b2's 10 s
    assert kernel.stopped
    assert sorted(letters(kernel)) == [
        ("ctrl-c", DeadLetterReason.SHUTDOWN),
        ("work", DeadLetterReason.SHUTDOWN),
    ]
    assert_conserved(kernel)


async def test_a_block_s_error_goes_out_unchanged_when_the_close_is_cancelled_in_the_drain(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The block raised at 1 s with ``b2``'s message in hand; the close drained, and at
    3 s a cancel scope around the block was cancelled: the scope took its ``Cancelled``
    and the block's error was lost, where the rule is that an exception in the block
    propagates unchanged after the shutdown (and Trio loses no error to a cancel). It
    goes out now, as it was raised (no context added). (Fails with main's _kernel.py:
    nothing raised.)"""
    kernels: list[Any] = []
    error = ValueError("the block fails")

    async def cancelled_while_it_drains() -> None:
        with trio.move_on_after(3):
            async with open_kernel(config()) as kernel:
                kernels.append(kernel)
                await kernel.send(kernel.spawn(agent(Busy, name="b2")), "work")
                await trio.sleep(1)
                raise error

    start = trio.current_time()
    with trio.fail_after(MOCK_LIMIT), pytest.raises(ValueError, match="the block fails") as raised:
        await cancelled_while_it_drains()
    assert raised.value is error
    assert raised.value.__context__ is None
    assert trio.current_time() - start == 3.0
    (kernel,) = kernels
    assert kernel.stopped
    assert letters(kernel) == [("work", DeadLetterReason.SHUTDOWN)]
    assert_conserved(kernel)


class NoErrors(Exception):
    """An error that holds a list of problems and is as long as it (``__len__``): one
    with none is false, as an empty list is."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(problems)
        self.problems = problems

    def __len__(self) -> int:
        return len(self.problems)


async def test_a_block_s_error_that_is_false_goes_out_when_the_close_is_cancelled_in_the_drain(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Review of the fifty-first pass: ``open_kernel`` chose what it holds with ``or``
    (``held or kernel._interrupt or kernel._escalation``), so a block's error that is
    false (an exception with a ``__len__`` of 0) counted as nothing held: the scope
    took the ``Cancelled`` and the error was lost, as before that pass. It goes out
    unchanged, as a true one does. (Fails with main's _kernel.py: nothing raised.)"""
    error = NoErrors([])
    assert not error

    async def cancelled_while_it_drains() -> None:
        with trio.move_on_after(3):
            async with open_kernel(config()) as kernel:
                await kernel.send(kernel.spawn(agent(Busy, name="b2")), "work")
                await trio.sleep(1)
                raise error

    start = trio.current_time()
    with trio.fail_after(MOCK_LIMIT), pytest.raises(NoErrors) as raised:
        await cancelled_while_it_drains()
    assert raised.value is error
    assert raised.value.__context__ is None
    assert trio.current_time() - start == 3.0


async def test_an_escalation_in_the_drain_goes_out_when_the_close_is_cancelled(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The block ended at once and the close drained (``busy``'s message in hand for
    10 s); at 1 s a run of ``fails`` failed and the root gave up to the kernel
    (``escalate_to_kernel``), stopping ``busy`` within its own ``shutdown_timeout`` (5 s,
    honoured past any grace); at 2 s a cancel scope around the block was cancelled. The
    scope took its ``Cancelled`` once the tree had stopped, and the escalation was lost
    (logged only). It goes out now, at 6 s. (Fails with main's _kernel.py: nothing
    raised.)"""
    kernels: list[Any] = []

    async def cancelled_while_it_drains() -> None:
        with trio.move_on_after(2):
            async with open_kernel(config(escalate_to_kernel=True)) as kernel:
                kernels.append(kernel)
                busy = kernel.spawn(agent(Busy, name="busy", shutdown_timeout=5))
                await kernel.send(busy, "work")
                await kernel.send(kernel.spawn(agent(Busy, name="fails")), "fail")

    start = trio.current_time()
    with trio.fail_after(MOCK_LIMIT), pytest.raises(SupervisorEscalation) as raised:
        await cancelled_while_it_drains()
    assert raised.value.chain[-1] == "fails"
    assert raised.value.__context__ is None
    assert trio.current_time() - start == 6.0  # busy's own shutdown timeout, from 1 s
    (kernel,) = kernels
    assert kernel.stopped
    assert letters(kernel) == [("work", DeadLetterReason.SHUTDOWN)]
    assert_conserved(kernel)


# --- the same through ``run_async`` (``nexus run``'s run, called in a caller's scope) ---


def pressed_once() -> AgentSpec:
    """The pool demo's worker: its first message after one mock second raises a Ctrl-C
    (at 2 s: the worker handles one message for 2 s at a time); every other message
    takes 2 s, so that the drain of the shutdown the Ctrl-C starts lasts its whole grace
    (5 s: until 7 s), the mailbox holding what the demo sent meanwhile."""
    pressed: list[float] = []

    @agent(name="pressed")
    async def worker(ctx: Context, msg: Message) -> None:
        if trio.current_time() > 1.0 and not pressed:
            pressed.append(trio.current_time())
            raise KeyboardInterrupt  # a Ctrl-C landing in an agent's code
        await trio.sleep(2)

    return worker


def test_a_ctrl_c_run_async_took_goes_out_of_a_scope_cancelled_as_the_run_ends(
    isolated: Any, restore_logging: Any, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    """Noticed in the fiftieth pass: ``run_async`` called in a scope that was cancelled
    after an agent's Ctrl-C (here at 3 s, in the drain the Ctrl-C began at 2 s) lost it:
    no ``(summary, 130)`` and no KeyboardInterrupt, the scope took a ``Cancelled`` and
    its caller went on as if nothing had been pressed. ``open_kernel`` lost it first
    (the tests above); and ``run_async``, which takes the Ctrl-C to return its summary
    and status 130, then raised the scope's ``Cancelled`` on its way out (its own
    nursery's exit), in place of what it took. The KeyboardInterrupt goes out now, not a
    group, and the run still logs that it was interrupted. (Fails with main's
    _kernel.py, and with main's _run.py: the scope caught the cancel.)"""
    monkeypatch.setattr(Demo, "spec", lambda self: pressed_once())
    options = RunOptions(
        config=Config(), agents=1, duration=60.0, rate=10, workload="pool", json=True
    )
    returned: list[tuple[dict[str, Any], int]] = []

    async def main() -> bool:
        with trio.move_on_after(3.0) as scope:  # cancelled during the drain
            returned.append(await run_async(options, Console(file=io.StringIO())))
        return scope.cancelled_caught

    with caplog.at_level("INFO", logger="nexus_trio.cli"):
        with pytest.raises(KeyboardInterrupt) as raised:
            trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert type(raised.value) is KeyboardInterrupt, repr(raised.value)
    assert returned == []
    said = [r.getMessage() for r in caplog.records if r.name == "nexus_trio.cli"]
    assert [m for m in said if "the run was interrupted" in m], said


def test_a_ctrl_c_run_async_took_is_its_status_when_no_scope_is_cancelled(
    isolated: Any, restore_logging: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same run with no cancel: ``run_async`` returns the summary and status 130,
    after the whole drain, as before (the Ctrl-C goes out only in place of a cancel)."""
    monkeypatch.setattr(Demo, "spec", lambda self: pressed_once())
    options = RunOptions(
        config=Config(), agents=1, duration=60.0, rate=10, workload="pool", json=True
    )

    async def main() -> tuple[dict[str, Any], int]:
        with trio.fail_after(MOCK_LIMIT):
            return await run_async(options, Console(file=io.StringIO()))

    summary, status = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert status == 130
    assert (summary["stopped_by"], summary["error"]) == ("interrupted", "KeyboardInterrupt")
    assert summary["elapsed_s"]["shutdown"] == pytest.approx(5.0)  # the grace, all of it


#: an app whose ``main`` ends the run at 1 s while ``busy`` holds the drain (its message
#: takes 10 s): ``sys.exit(3)`` in its code, or a failure of ``fails``, whose directive
#: escalates it to the kernel (``escalate_to_kernel``)
ENDING_APP = """
import sys

import trio

from nexus_trio import agent


@agent(name="busy", shutdown_timeout=5)
async def busy(ctx, msg):
    await trio.sleep(10)


@agent(name="fails", on_error="escalate")
async def fails(ctx, msg):
    raise RuntimeError("upstream reset")


async def main_exits(kernel):
    await kernel.send(kernel.spawn(busy), "work")
    await trio.sleep(1)
    sys.exit(3)


async def main_escalates(kernel):
    await kernel.send(kernel.spawn(busy), "work")
    await trio.sleep(1)
    await kernel.send(kernel.spawn(fails), "fail")
    await trio.sleep_forever()


async def main_fails(kernel):
    await kernel.send(kernel.spawn(busy), "work")
    await trio.sleep(1)
    raise LookupError("the app's own bug")
"""


def ending_run(isolated: Any, how: str) -> RunOptions:
    (isolated / "ending_app.py").write_text(ENDING_APP)
    app = f"ending_app:main_{how}"
    return RunOptions(
        config=config(escalate_to_kernel=how == "escalates"),
        app=app,
        target=load_app(app),
        demo=False,
        duration=60.0,
        json=True,
    )


@pytest.mark.parametrize("how", ["exits", "escalates"])
def test_a_sys_exit_or_escalation_run_async_took_goes_out_of_a_scope_cancelled_as_it_ends(
    isolated: Any, restore_logging: Any, how: str
) -> None:
    """Left by the fifty-first pass: ``run_async`` takes an app's ``sys.exit(3)`` (status
    3) and an escalation to the kernel (status 1) to return its summary; called in a
    scope cancelled at 3 s, while the close drains or stops ``busy`` (its message takes
    10 s, its ``shutdown_timeout`` is 5 s), it raised the scope's ``Cancelled`` on its way
    out instead, the scope took it, and its caller went on as if the app had neither
    exited nor failed. As for a Ctrl-C it took (Trio loses no error, and no
    ``SystemExit``, to a cancel), what it took goes out now, itself, not a group; the
    return value is lost, as any is to a cancel. (Fails with main's _run.py: nothing
    raised, the scope caught the cancel.)"""
    options = ending_run(isolated, how)
    returned: list[tuple[dict[str, Any], int]] = []

    async def main() -> None:
        with trio.move_on_after(3.0):  # cancelled as the run ends
            returned.append(await run_async(options, Console(file=io.StringIO())))

    expected = SystemExit if how == "exits" else SupervisorEscalation
    with pytest.raises(expected) as raised:
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert type(raised.value) is expected, repr(raised.value)
    if isinstance(raised.value, SystemExit):
        assert raised.value.code == 3
    else:
        assert raised.value.chain[-1] == "fails"
    assert returned == []


def test_an_app_error_run_async_took_goes_out_of_a_scope_cancelled_as_it_ends(
    isolated: Any, restore_logging: Any
) -> None:
    """Left by the fifty-second pass's core hunt: the app's ``main`` raising an ordinary
    error (``LookupError``) at 1 s, which ``run_async`` takes to return its summary and
    status 1, was lost as its exit and escalation were: called in a scope cancelled at
    3 s, while the close drains ``busy`` (its message takes 10 s), it raised the scope's
    ``Cancelled``, the scope took it and its caller went on as if the app had not failed.
    By Trio's rule (no error is lost to a cancel) the error goes out itself, not a group.
    (Fails with main's _run.py: DID NOT RAISE.)"""
    options = ending_run(isolated, "fails")
    returned: list[tuple[dict[str, Any], int]] = []

    async def main() -> None:
        with trio.move_on_after(3.0):  # cancelled as the run ends
            returned.append(await run_async(options, Console(file=io.StringIO())))

    with pytest.raises(LookupError) as raised:
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert type(raised.value) is LookupError, repr(raised.value)
    assert str(raised.value) == "the app's own bug"
    assert returned == []


@pytest.mark.parametrize("how", ["exits", "escalates", "fails"])
def test_a_sys_exit_or_escalation_run_async_took_is_its_status_with_no_cancel(
    isolated: Any, restore_logging: Any, how: str
) -> None:
    """The same runs with no cancel return the summary and the status as before: 3 for
    ``sys.exit(3)``, 1 for the escalation (they go out only in place of a cancel)."""
    options = ending_run(isolated, how)

    async def main() -> tuple[dict[str, Any], int]:
        with trio.fail_after(MOCK_LIMIT):
            return await run_async(options, Console(file=io.StringIO()))

    summary, status = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert status == (3 if how == "exits" else 1)
    first = {"exits": "SystemExit", "escalates": "SupervisorEscalation", "fails": "LookupError"}
    assert summary["error"].startswith(first[how]), summary["error"]
