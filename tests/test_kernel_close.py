"""How a kernel closes when its shutdown is asked for wrongly or interrupted: nothing
hangs, and the event and dead-letter streams end whatever way the kernel closes."""

from __future__ import annotations

import logging
import math
import re
import signal
import sys
import types
from typing import Any

import pytest
import trio
import trio.testing

from nexus_trio import (
    Agent,
    Backoff,
    Context,
    Kernel,
    KernelPhase,
    KernelShuttingDown,
    Message,
    RequestTimeout,
    Supervisor,
    agent,
    open_kernel,
)
from nexus_trio import _cell as cell_module
from nexus_trio import _child as child_module
from nexus_trio.testing import assert_conserved

from .conftest import make_config
from .hang_guard import run_on_mock_clock, tasks_living


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


async def _stuck(ctx: Context, msg: Message) -> None:
    await trio.sleep_forever()


def test_streams_end_and_requests_fail_when_a_second_ctrl_c_interrupts_the_shutdown() -> None:
    # A second Ctrl-C while the kernel shuts down raises KeyboardInterrupt in the main
    # task, inside kernel.shutdown(): the kernel is closed without the rest of its
    # shutdown. The program catches it around the kernel; its stream readers (outside
    # the kernel, untouched by the interrupt) must still come to the end of their streams.
    ended: list[str] = []
    interrupted: list[BaseException] = []

    class CtrlC(Agent):
        async def on_start(self, ctx: Context) -> None:
            return None  # runs from the start (an agent without on_start waits for mail)

        async def handle(self, ctx: Context, msg: Message) -> None:
            return None

        async def on_stop(self, ctx: Context) -> None:
            # Raised from Trio's own context: delivered to the main task, which is in
            # kernel.shutdown() waiting for the tree to stop.
            trio.lowlevel.current_trio_token().run_sync_soon(signal.raise_signal, signal.SIGINT)
            await trio.sleep(1)

    async def read(stream: Any, label: str) -> None:
        async for _ in stream:
            pass
        ended.append(label)

    async def ask(kernel: Any, ref: Any) -> None:
        # Its query waits in a mailbox behind a handler that never returns: the
        # request is pending when the shutdown is cut short.
        try:
            await kernel.request(ref, "late", timeout=1000)
        except KernelShuttingDown as exc:
            ended.append(f"request ({exc.phase})")

    async def main() -> None:
        with trio.move_on_after(600) as hang:
            async with trio.open_nursery() as readers:
                try:
                    async with open_kernel(make_config()) as kernel:
                        readers.start_soon(read, kernel.events(), "events")
                        readers.start_soon(read, kernel.dead_letters(), "dead letters")
                        stuck = kernel.spawn(agent(handle_timeout=1000)(_stuck))
                        kernel.send_nowait(stuck, "first")
                        await trio.testing.wait_all_tasks_blocked()
                        readers.start_soon(ask, kernel, stuck)
                        kernel.spawn(CtrlC)
                        await trio.testing.wait_all_tasks_blocked()
                except BaseException as exc:  # the interrupt, in a group
                    interrupted.append(exc)
        assert not hang.cancelled_caught, f"the streams never ended: {ended}"

    # Trio turns SIGINT into KeyboardInterrupt only where its handler is the default one
    # (a shell starting CI in the background ignores SIGINT): set it for this test.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    finally:
        signal.signal(signal.SIGINT, previous)
    (exc,) = interrupted
    assert isinstance(exc, KeyboardInterrupt) or (
        isinstance(exc, BaseExceptionGroup) and exc.subgroup(KeyboardInterrupt) is not None
    )
    # (cut short while the tree stopped: the phase it was failed in)
    assert sorted(ended) == ["dead letters", "events", "request (stopping)"]


async def test_a_request_still_waiting_when_the_kernel_closes_fails_naming_the_phase(
    autojump_clock: Any,
) -> None:
    # Before: `kernel is shutting down: request refused`, `.phase == ""`, where every
    # other refusal of the shutdown names the phase it came in.
    failed: list[tuple[str, str]] = []

    @agent(name="sink")
    async def sink(ctx: Context, msg: Message) -> None:
        return None  # takes the query and never answers it

    async def ask(kernel: Kernel) -> None:
        try:
            await kernel.request("sink", "q", timeout=1000)
        except KernelShuttingDown as exc:
            failed.append((exc.phase, str(exc)))

    async with trio.open_nursery() as nursery:
        async with open_kernel(make_config()) as kernel:
            kernel.spawn(sink)
            nursery.start_soon(ask, kernel)
            await trio.testing.wait_all_tasks_blocked()
            assert kernel.stats().handled == 1
    assert kernel.stats().rejected == {}  # (accepted: failed, not refused)
    assert failed == [
        (
            "stopping",
            "kernel is shutting down (stopping: the grace period is over, nothing more is"
            " handled): request refused",
        )
    ]


async def test_a_kernel_cancelled_from_outside_stops_at_once_and_in_order(
    autojump_clock: Any,
) -> None:
    # Before: the agents ran in the kernel's nursery, under the cancelled scope: all were
    # cancelled at once, in no order (a parent's on_stop before its linked child's), and
    # the message in hand was cut off without a dead letter of the kernel's own. Now, as
    # Trio asks of a cancelled close (prompt, but complete): no drain, the message in
    # hand dead-lettered ``shutdown``, the tree stopped in order, on_stop awaited.
    journal: list[str] = []

    class Journaled(Agent):
        async def on_start(self, ctx: Context) -> None:
            if ctx.name == "parent":
                ctx.spawn(agent(Journaled, name="child"))

        async def handle(self, ctx: Context, msg: Message) -> None:
            await trio.sleep(0.5)
            journal.append(f"{ctx.name} handled {msg.payload}")

        async def on_stop(self, ctx: Context) -> None:
            await trio.sleep(0.01)
            journal.append(f"stop {ctx.name}")

    with trio.fail_after(60), trio.CancelScope() as outside:
        async with open_kernel(make_config(shutdown_grace_ms=1000)) as kernel:
            kernel.spawn(agent(Journaled, name="parent"))
            kernel.spawn(agent(Journaled, name="worker"))
            await kernel.send("worker", "job")
            await kernel.send("worker", "queued")
            await trio.testing.wait_all_tasks_blocked()
            outside.cancel()
            await trio.sleep_forever()
    assert outside.cancelled_caught
    # reverse start order (the child, spawned by the parent's on_start, started last)
    assert journal == ["stop child", "stop worker", "stop parent"]
    stats = kernel.stats()
    assert (stats.handled, stats.dead_lettered, stats.in_flight) == (0, 2, 0)
    assert stats.dead_letters_by_reason == {"shutdown": 2}
    # no grace waited: the three on_stop only
    assert trio.current_time() == pytest.approx(0.03)


async def test_a_kernel_cancelled_from_outside_while_a_handler_s_shutdown_drains_stops_at_once(
    autojump_clock: Any,
) -> None:
    """A handler's ``ctx.kernel.shutdown()`` started a drain of the default grace (100 s
    here); the block, cancelled from outside 5 s later, then waited out the whole grace
    (left at 100 s, 9 more messages handled): its ``shutdown(0)`` found a shutdown under
    way and only waited for it. A cancelled block is left promptly, without a drain,
    whoever started the shutdown: at 5 s (the message in hand dead-lettered)."""

    @agent(name="slow")
    async def slow(ctx: Context, msg: Message) -> None:
        await trio.sleep(10)

    @agent(name="quitter")
    async def quitter(ctx: Context, msg: Message) -> None:
        await ctx.kernel.shutdown()

    with trio.fail_after(600), trio.move_on_after(5) as outside:
        async with open_kernel(make_config(shutdown_grace_ms=100_000)) as kernel:
            for i in range(20):
                await kernel.send(kernel.spawn(slow) if i == 0 else "slow", i)
            await kernel.send(kernel.spawn(quitter), "quit")
            await trio.sleep_forever()
    assert outside.cancelled_caught
    assert trio.current_time() == 5
    stats = kernel.stats()
    # "quit", and the first of the slow ones while the 5 s ran (the second is in hand)
    assert (stats.handled, stats.dead_lettered, stats.in_flight) == (1, 20, 0)
    assert stats.dead_letters_by_reason == {"shutdown": 20}


@pytest.mark.parametrize("shorter", [True, False])
async def test_a_second_shutdown_with_a_shorter_grace_ends_the_drain_under_way_sooner(
    autojump_clock: Any, shorter: bool
) -> None:
    """``shutdown()`` drains for its grace (100 s); a ``shutdown(grace=0)`` from another
    task 1 s later returned only when that grace was over (100 s): its grace was taken
    and ignored. The drain ends at the earliest deadline a call asked for; a longer
    grace does not make it later."""

    @agent(name="slow")
    async def slow(ctx: Context, msg: Message) -> None:
        await trio.sleep(7)

    ended: dict[str, float] = {}
    async with open_kernel(make_config(shutdown_grace_ms=100_000)) as kernel:
        ref = kernel.spawn(slow)
        for i in range(50):
            await kernel.send(ref, i)

        async def first() -> None:
            await kernel.shutdown()
            ended["first"] = trio.current_time()

        async def second() -> None:
            await trio.sleep(1)
            await kernel.shutdown(grace=0 if shorter else 1000)
            ended["second"] = trio.current_time()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(first)
            nursery.start_soon(second)
    stats = kernel.stats()
    if shorter:
        assert ended == {"first": 1, "second": 1}
        assert (stats.handled, stats.dead_lettered) == (0, 50)
    else:
        assert ended == {"first": 100, "second": 100}
        assert (stats.handled, stats.dead_lettered) == (14, 36)  # (one each 7 s)
    assert stats.in_flight == 0


@pytest.mark.parametrize("how", ["cancelled", "deadline passed"])
def test_a_kernel_opened_in_a_cancelled_scope_closes_at_once(how: str) -> None:
    """Regression: ``async with open_kernel()`` in a scope cancelled already (or whose
    deadline had passed) never returned: Trio's ``nursery.start`` left the tree's task,
    shielded, under the cancelled start and waited for it forever (found by cancelling
    a kernel at every scheduling step). Now the block is entered, its first checkpoint
    takes the cancellation, and the kernel closes as for any cancelled block: its agent
    stopped, what was sent handled or dead-lettered ``shutdown``, no task left."""
    journal: list[str] = []

    class Journaled(Agent):
        async def on_start(self, ctx: Context) -> None:
            journal.append("start")

        async def handle(self, ctx: Context, msg: Message) -> None:
            journal.append("handle")

        async def on_stop(self, ctx: Context) -> None:
            journal.append("stop")

    async def scenario() -> None:
        before = tasks_living()
        reached: list[str] = []
        with trio.CancelScope() as outside:
            if how == "cancelled":
                outside.cancel()
            else:
                outside.deadline = trio.current_time() - 1
            async with open_kernel(make_config()) as kernel:
                kernel.spawn(agent(Journaled, name="late"))
                reached.append("body")
                await kernel.send("late", "job")
                reached.append("sent")
                await trio.sleep_forever()
        assert outside.cancelled_caught
        assert reached == ["body", "sent"]  # (a send with room takes no checkpoint)
        assert kernel.stopped
        assert kernel.agents() == []
        stats = kernel.stats()
        assert (stats.agents_alive, stats.accepted, stats.in_flight) == (0, 1, 0)
        # The block's cancellation lands at its sleep, in a scheduling round of Trio's
        # in which the agent may have started and handled the message first (Trio's
        # order in a round varies): handled then, else dead-lettered ``shutdown`` with
        # its start called off (no drain, as ``shutdown(grace=0)``).
        if stats.handled:
            assert (stats.handled, stats.dead_lettered) == (1, 0)
            assert journal == ["start", "handle", "stop"]
        else:
            assert stats.dead_letters_by_reason == {"shutdown": 1}
            assert journal == []
        assert tasks_living() == before

    run_on_mock_clock(scenario, real_seconds=30)


async def test_a_request_made_while_a_cancelled_kernel_stops_still_times_out(
    autojump_clock: Any,
) -> None:
    # The request timer runs shielded as well: a handler of an agent with a shutdown
    # timeout of its own (so it finishes its message in the stop) that waits on a
    # request to an agent that never answers gets its RequestTimeout in time.
    outcomes: list[str] = []

    @agent(name="asks", shutdown_timeout=5)
    async def asks(ctx: Context, msg: Message) -> None:
        try:
            await ctx.request("sleeper", timeout=0.1)
        except RequestTimeout:
            outcomes.append("timed out")

    with trio.fail_after(60), trio.CancelScope() as outside:
        async with open_kernel(make_config(shutdown_grace_ms=1000)) as kernel:
            kernel.spawn(agent(_stuck, name="sleeper", handle_timeout=1000, shutdown_timeout=0))
            kernel.spawn(asks)
            await kernel.send("asks", "go")
            await trio.testing.wait_all_tasks_blocked()
            outside.cancel()
            await trio.sleep_forever()
    assert outcomes == ["timed out"]
    assert kernel.stats().handled == 1
    assert trio.current_time() == pytest.approx(0.1)


# --- Ctrl-C under plain trio.run ---------------------------------------------------------------


def _run_with_ctrl_c(main: Any, clock: Any = "mock") -> None:
    """``trio.run(main)`` (on a mock clock unless ``clock`` says otherwise), with Trio's
    own Ctrl-C handling: Trio turns SIGINT into KeyboardInterrupt only where the handler
    is the default one (a shell starting CI in the background ignores SIGINT)."""
    if clock == "mock":
        clock = trio.testing.MockClock(autojump_threshold=0)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        trio.run(main, clock=clock)
    finally:
        signal.signal(signal.SIGINT, previous)


def _ctrl_c() -> None:
    """A Ctrl-C now: Trio's handler raises KeyboardInterrupt in the code that calls this,
    unless that code is protected (then the run's main task gets it)."""
    signal.raise_signal(signal.SIGINT)


@pytest.mark.parametrize("where", ["handler", "suspended handler", "on_start", "background"])
def test_a_ctrl_c_in_an_agent_s_code_shuts_the_kernel_down_gracefully_then_raises(
    where: str,
) -> None:
    # Before: the KeyboardInterrupt went up through the agent's, its supervisor's and the
    # kernel's nurseries: open_kernel raised a BaseExceptionGroup three deep (so `except
    # KeyboardInterrupt` around trio.run missed it), with no drain: the messages queued
    # behind it were dead-lettered `shutdown`. Now it is the kernel's Ctrl-C, as one
    # raised in the block: the block is cancelled, the kernel drains and stops in
    # order, and open_kernel raises the KeyboardInterrupt itself.
    handled: list[Any] = []
    stopped: list[str] = []
    outcome: list[BaseException] = []
    pressed: list[str] = []

    def ctrl_c_once() -> None:
        # (a restarted run does it again: that one would be a second Ctrl-C)
        if not pressed:
            pressed.append(where)
            _ctrl_c()

    class Worker(Agent):
        async def on_start(self, ctx: Context) -> None:
            if where == "on_start" and ctx.name == "interrupted":
                ctrl_c_once()
            if where == "background" and ctx.name == "interrupted":
                ctx.nursery.start_soon(self.background)

        async def background(self) -> None:
            await trio.sleep(1)
            ctrl_c_once()

        async def handle(self, ctx: Context, msg: Message) -> None:
            if msg.payload == "ctrl-c":
                if where == "suspended handler":
                    await trio.sleep(0.5)
                ctrl_c_once()
            await trio.sleep(0.1)
            handled.append((ctx.name, msg.payload))

        async def on_stop(self, ctx: Context) -> None:
            stopped.append(str(ctx.name))

    async def main() -> None:
        try:
            with trio.fail_after(60):
                async with open_kernel(make_config(shutdown_grace_ms=5000)) as kernel:
                    kernel.spawn(agent(Worker, name="other"))
                    kernel.spawn(agent(Worker, name="interrupted"))
                    for n in (1, 2, 3):
                        await kernel.send("other", n)
                    if where.endswith("handler"):
                        await kernel.send("interrupted", "ctrl-c")
                        await kernel.send("interrupted", "after")
                    await trio.sleep_forever()
        except BaseException as exc:
            outcome.append(exc)
        stats = kernel.stats()
        total = stats.handled + stats.replies_delivered + stats.dead_lettered
        assert stats.in_flight == 0 and stats.accepted == total
        if where.endswith("handler"):
            (letter,) = kernel.recent_dead_letters()
            assert letter.message.payload == "ctrl-c"
            assert letter.reason.value == "shutdown"
            assert letter.detail == "interrupted by KeyboardInterrupt while being handled"
        else:
            assert kernel.recent_dead_letters() == []

    _run_with_ctrl_c(main)
    assert pressed == [where]
    (exc,) = outcome
    assert type(exc) is KeyboardInterrupt, repr(exc)
    # drained: what was queued is handled, also behind the interrupted message
    expected = [("other", 1), ("other", 2), ("other", 3)]
    if where.endswith("handler"):
        expected.append(("interrupted", "after"))
    assert sorted(handled) == sorted(expected)
    # each run stopped once (a run the Ctrl-C ended is not restarted for the drain), the
    # tree in reverse start order
    assert stopped == ["interrupted", "other"]


@pytest.mark.parametrize("suspends", [False, True], ids=["at-once", "suspended"])
@pytest.mark.parametrize("order", ["interrupt-first", "failure-first", "nested"])
def test_a_failure_beside_a_ctrl_c_in_a_handler_s_group_is_counted_and_logged(
    order: str, suspends: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Fifty-eighth pass: a handler raising ``BaseExceptionGroup([KeyboardInterrupt(),
    ValueError()])`` (its own nursery's: a Ctrl-C in one task, a failure in another) was
    taken for a Ctrl-C alone: its message dead-lettered ``shutdown``, the ``ValueError``
    neither counted nor logged; with the ``ValueError`` first the run failed outside a
    handler and was restarted, and the Ctrl-C was lost. The Ctrl-C wins, as Trio's does
    (the kernel shuts down gracefully, ``open_kernel`` raises it), and its siblings are
    the message's failure: counted in ``failed`` (and timed), dead-lettered ``handler_error`` with
    them (an ``ExceptionGroup``), logged."""
    sibling = ValueError("sibling")
    groups = {
        "interrupt-first": lambda: BaseExceptionGroup("g", [KeyboardInterrupt(), sibling]),
        "failure-first": lambda: BaseExceptionGroup("g", [sibling, KeyboardInterrupt()]),
        "nested": lambda: BaseExceptionGroup(
            "g", [BaseExceptionGroup("h", [KeyboardInterrupt()]), ExceptionGroup("e", [sibling])]
        ),
    }
    outcome: list[BaseException] = []

    async def handler(ctx: Context, msg: Message) -> None:
        if suspends:
            await trio.sleep(1)
        raise groups[order]()

    async def main() -> None:
        try:
            with trio.fail_after(60):  # (on main the Ctrl-C after a failure was lost)
                async with open_kernel() as kernel:
                    kernel.spawn(agent(handler, name="a"))
                    await kernel.send("a", "boom")
                    await trio.sleep_forever()
        except BaseException as exc:
            outcome.append(exc)
        stats = kernel.stats()
        assert (stats.failed, stats.restarts) == (1, 0)
        assert stats.failed_handle_latency.count == 1  # (timed as a failure)
        assert stats.dead_letters_by_reason == {"handler_error": 1}
        (letter,) = kernel.recent_dead_letters()
        assert isinstance(letter.error, ExceptionGroup)
        assert _leaves(letter.error) == ["ValueError('sibling')"]

    with caplog.at_level(logging.ERROR, logger="nexus_trio.agent"):
        _run_with_ctrl_c(main)
    assert [type(exc) for exc in outcome] == [KeyboardInterrupt]
    (line,) = [r for r in caplog.records if r.name == "nexus_trio.agent"]
    assert line.getMessage().startswith("handler of agent a failed on message ")
    assert line.getMessage().endswith("(interrupted by KeyboardInterrupt: shutting down)")
    assert line.exc_info is not None and _leaves(line.exc_info[1]) == ["ValueError('sibling')"]


def _leaves(group: Any) -> list[str]:
    """The reprs of the exceptions of a group, its groups' too, depth first."""
    if not isinstance(group, BaseExceptionGroup):
        return [repr(group)]
    return [leaf for exc in group.exceptions for leaf in _leaves(exc)]


def test_a_ctrl_c_the_kernel_took_goes_out_of_a_block_cancelled_from_outside() -> None:
    """Regression: an agent's code cancelled a scope around the block and raised
    KeyboardInterrupt in the same step (a Ctrl-C landing as a deadline around the kernel
    expires). The kernel took the Ctrl-C (it shuts down gracefully, then raises it), but
    the block's ``Cancelled`` belonged to that outer scope: ``open_kernel`` raised it,
    the scope took it, and the Ctrl-C was lost (the run returned normally). The Ctrl-C
    goes out now, past the scope, as Trio never loses one to a cancel, with its own
    context (the fiftieth pass's fix chained it to that ``Cancelled``: the error it was
    raised while handling was lost, and the traceback showed a cancel above it)."""
    outcome: list[BaseException] = []
    kernels: list[Any] = []

    async def main() -> None:
        with trio.CancelScope() as outside:

            @agent(name="pressed")
            async def pressed(ctx: Context, msg: Message) -> None:
                outside.cancel()
                try:
                    raise LookupError("handled as Ctrl-C came")
                except LookupError:
                    raise KeyboardInterrupt  # noqa: B904 (its context: the LookupError)

            try:
                async with open_kernel(make_config()) as kernel:
                    kernels.append(kernel)
                    await kernel.send(kernel.spawn(pressed), "x")
                    await trio.sleep_forever()
            except BaseException as exc:
                outcome.append(exc)
                raise

    with pytest.raises(KeyboardInterrupt):
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    (kernel,) = kernels
    assert [type(exc) for exc in outcome] == [KeyboardInterrupt]
    (interrupt,) = outcome
    assert isinstance(interrupt.__context__, LookupError), repr(interrupt.__context__)
    assert interrupt.__cause__ is None
    assert kernel.stopped
    (letter,) = kernel.recent_dead_letters()
    assert (letter.message.payload, letter.reason.value) == ("x", "shutdown")
    assert_conserved(kernel)


def test_a_ctrl_c_that_lands_in_the_kernel_s_own_code_is_given_to_the_block(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The kernel's own code is protected from KeyboardInterrupt, as Trio's is: a Ctrl-C
    # that comes while it runs (here: in a log handler the serve loop calls for a dead
    # letter) goes to the run's main task, in the block. Before: it was raised there, in
    # the middle of the dead letter's bookkeeping (counted, never published), and the
    # kernel ended with a BaseExceptionGroup. Agents' code is not protected.
    protected: dict[str, bool] = {}
    outcome: list[BaseException] = []
    handled: list[Any] = []

    class CtrlCOnce(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "kernel" not in protected:
                protected["kernel"] = trio.lowlevel.currently_ki_protected()
                _ctrl_c()

    class Probe(Agent):
        async def on_start(self, ctx: Context) -> None:
            protected["on_start"] = trio.lowlevel.currently_ki_protected()
            ctx.nursery.start_soon(self.background)

        async def background(self) -> None:
            protected["background"] = trio.lowlevel.currently_ki_protected()

        async def handle(self, ctx: Context, msg: Message) -> None:
            protected["handler"] = trio.lowlevel.currently_ki_protected()
            if msg.payload == "bad":
                raise ValueError("bad")
            handled.append(msg.payload)

        async def on_stop(self, ctx: Context) -> None:
            protected["on_stop"] = trio.lowlevel.currently_ki_protected()

    async def main() -> None:
        try:
            with trio.fail_after(60):
                async with open_kernel(make_config()) as kernel:
                    kernel.spawn(agent(Probe, name="probe", on_error="resume"))
                    await kernel.send("probe", "bad")
                    await kernel.send("probe", "after")
                    await trio.sleep_forever()
        except BaseException as exc:
            outcome.append(exc)
        stats = kernel.stats()
        assert (stats.handled, stats.dead_lettered, stats.in_flight) == (1, 1, 0)
        (letter,) = kernel.recent_dead_letters()
        assert letter.reason.value == "handler_error"

    logger = logging.getLogger("nexus_trio.dead_letters")
    handler = CtrlCOnce()
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)  # (dead letters are logged at INFO)
    try:
        # On Trio's real clock: the main task gets the interrupt through Trio's queue of
        # callbacks, which a mock clock's jump to the next deadline could pass.
        _run_with_ctrl_c(main, clock=None)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    (exc,) = outcome
    assert type(exc) is KeyboardInterrupt, repr(exc)
    assert handled == ["after"]
    assert [r.getMessage() for r in caplog.records if r.name == "nexus_trio.kernel"] == [
        "KeyboardInterrupt: shutting down gracefully (within 5s; interrupt again to force it)"
    ]
    assert protected == {
        "kernel": True,
        "on_start": False,
        "background": False,
        "handler": False,
        "on_stop": False,
    }


def test_a_second_ctrl_c_in_an_agent_s_code_while_the_kernel_drains_forces_the_exit() -> None:
    # The first Ctrl-C starts the graceful shutdown; one in an agent's code during the
    # drain goes on up, as Trio's would: the kernel closes at once, its streams end.
    outcome: list[BaseException] = []

    @agent(name="looper", handle_timeout=1000)
    async def looper(ctx: Context, msg: Message) -> None:
        await trio.sleep(1)
        if msg.payload == 2:
            _ctrl_c()  # the second: the kernel is draining by now
        await ctx.send("looper", msg.payload + 1)

    async def main() -> None:
        try:
            with trio.fail_after(60):
                async with open_kernel(make_config(shutdown_grace_ms=600_000)) as kernel:
                    kernel.spawn(looper)
                    await kernel.send("looper", 0)
                    await trio.sleep(0.5)
                    _ctrl_c()  # the first, in the block: graceful
        except BaseException as exc:
            outcome.append(exc)
        assert kernel.stopped
        assert trio.current_time() < 10  # not the 600 s grace

    _run_with_ctrl_c(main)
    (exc,) = outcome
    assert isinstance(exc, BaseExceptionGroup) and exc.subgroup(KeyboardInterrupt) is not None


@pytest.mark.parametrize("nested", [False, True], ids=["bare", "in-a-nursery-of-its-own"])
@pytest.mark.parametrize("where", ["on_start", "background"])
def test_a_ctrl_c_whose_run_ends_after_the_shutdown_began_still_goes_out_alone(
    where: str, nested: bool
) -> None:
    # A Ctrl-C in on_start or in a ctx.nursery task ends the run only once the run's
    # nursery is done, here 1 s later (a sibling task's shielded finally). Before: the
    # kernel took it only then; a shutdown() the block began meanwhile (at 0.7 s) made
    # it a second Ctrl-C, the exit was forced and open_kernel raised a BaseExceptionGroup
    # three deep. Now the kernel takes it where it is raised: the block is cancelled at
    # once (it never reaches its shutdown()), the kernel shuts down gracefully and
    # open_kernel raises the KeyboardInterrupt itself. ``nested``: it lands in a task of
    # a nursery that on_start or the ctx.nursery task opened, and leaves them in that
    # nursery's group (until the review of the fifty-fourth pass only a bare
    # KeyboardInterrupt was taken there: open_kernel raised a group four deep).
    outcome: list[BaseException] = []
    said: list[tuple[str, float]] = []

    class Interrupted(Agent):
        async def on_start(self, ctx: Context) -> None:
            ctx.nursery.start_soon(self.slow_to_end)
            if where == "background":
                ctx.nursery.start_soon(self.background)
            else:
                await self.background()

        async def background(self) -> None:
            if nested:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self.pressed)
            else:
                await self.pressed()

        async def pressed(self) -> None:
            await trio.sleep(0.5)
            _ctrl_c()

        async def slow_to_end(self) -> None:
            try:
                await trio.sleep_forever()
            finally:
                with trio.CancelScope(shield=True):
                    await trio.sleep(1)
                said.append(("finally done", trio.current_time()))

        async def handle(self, ctx: Context, msg: Message) -> None:
            pass

        async def on_stop(self, ctx: Context) -> None:
            said.append(("on_stop", trio.current_time()))

    async def main() -> None:
        try:
            with trio.fail_after(60):
                async with open_kernel(make_config(shutdown_grace_ms=5000)) as kernel:
                    kernel.spawn(agent(Interrupted, name="interrupted"))
                    await trio.sleep(0.7)
                    said.append(("shutdown asked", trio.current_time()))
                    await kernel.shutdown()
                    await trio.sleep_forever()
        except BaseException as exc:
            outcome.append(exc)
        assert kernel.stopped and kernel.stats().agents_alive == 0

    _run_with_ctrl_c(main)
    (exc,) = outcome
    assert type(exc) is KeyboardInterrupt, repr(exc)
    # the block was cancelled at 0.5 s; the run ended once its sibling's finally was done
    assert said == [("finally done", pytest.approx(1.5)), ("on_stop", pytest.approx(1.5))]


async def _what_the_kernel_said(kernel: Kernel, events: Any) -> dict[str, Any]:
    """After a Ctrl-C's shutdown: when it ended (mock time), its events (kind, name,
    reason), its statistics and its dead letters (reason, payload, detail)."""
    return {
        "took": trio.current_time(),
        "events": [(e.kind.value, e.name, e.reason) async for e in events],
        "stats": kernel.stats(),
        "dead": [
            (d.reason.value, d.message.payload, d.detail) for d in kernel.recent_dead_letters()
        ],
    }


def _a_run_ended_by_a_ctrl_c(where: str) -> dict[str, Any]:
    """A kernel whose agent ``interrupted`` (permanent) gets a Ctrl-C in its ``where``
    (``__init__``, ``on_start``, a ``background`` task, ``on_stop``; or ``on_start``
    with an ``on_stop`` that raises) with a message
    queued, beside ``other`` (three messages to drain) and ``watcher`` (monitoring it);
    what the kernel said about it."""
    pressed: list[str] = []
    handled: list[Any] = []
    stopped: list[str] = []
    notices: list[tuple[str, str, str]] = []
    outcome: list[BaseException] = []
    found: dict[str, Any] = {}

    def ctrl_c_once() -> None:
        # (a restarted run would do it again: that one would be a second Ctrl-C)
        if not pressed:
            pressed.append(where)
            _ctrl_c()

    class Watcher(Agent):
        async def on_start(self, ctx: Context) -> None:
            ctx.monitor("interrupted")

        async def handle(self, ctx: Context, msg: Message) -> None:
            notices.append((msg.payload["event"], msg.payload["name"], msg.payload["reason"]))

        async def on_stop(self, ctx: Context) -> None:
            stopped.append("watcher")

    class Other(Agent):
        async def handle(self, ctx: Context, msg: Message) -> None:
            await trio.sleep(0.1)
            handled.append(("other", msg.payload))

        async def on_stop(self, ctx: Context) -> None:
            stopped.append("other")

    class Interrupted(Agent):
        def __init__(self) -> None:
            if where == "__init__":
                ctrl_c_once()

        async def on_start(self, ctx: Context) -> None:
            if where in ("on_start", "on_start, on_stop raising"):
                ctrl_c_once()
            if where == "background":
                ctx.nursery.start_soon(self.background)

        async def background(self) -> None:
            await trio.sleep(1)
            ctrl_c_once()

        async def handle(self, ctx: Context, msg: Message) -> None:
            if msg.payload == "slow":
                await trio.sleep(10)  # the background task's Ctrl-C comes first
            if msg.payload == "stop":
                ctx.stop()
            handled.append(("interrupted", msg.payload))

        async def on_stop(self, ctx: Context) -> None:
            stopped.append("interrupted")
            if where == "on_stop":
                ctrl_c_once()
            if where == "on_start, on_stop raising":
                raise OSError("cannot close")

    first = {"background": ["slow"], "on_stop": ["stop"]}.get(where, [])

    async def main() -> None:
        try:
            with trio.fail_after(60):
                async with open_kernel(make_config(shutdown_grace_ms=600_000)) as kernel:
                    events = kernel.events(100)
                    kernel.spawn(agent(Watcher, name="watcher"))
                    kernel.spawn(agent(Other, name="other"))
                    kernel.spawn(agent(Interrupted, name="interrupted"))
                    for n in (1, 2, 3):
                        kernel.send_nowait("other", n)
                    for payload in [*first, "queued"]:
                        kernel.send_nowait("interrupted", payload)
                    await trio.sleep_forever()
        except BaseException as exc:
            outcome.append(exc)
        found.update(await _what_the_kernel_said(kernel, events))

    _run_with_ctrl_c(main)
    assert pressed == [where]
    (exc,) = outcome
    assert type(exc) is KeyboardInterrupt, repr(exc)
    return found | {"handled": handled, "stopped": stopped, "notices": notices}


def _assert_stopped_for_the_shutdown(found: dict[str, Any], where: str) -> None:
    """``interrupted`` ended as stopped for the shutdown: no failure, no restart; its
    queue dead-lettered ``shutdown`` at once (the drain does not wait out its grace); the
    others drained, then stopped in order."""
    stats = found["stats"]
    assert (stats.restarts, stats.failed, stats.run_failures) == (0, 0, 0)
    assert stats.in_flight == 0
    assert stats.accepted == stats.handled + stats.replies_delivered + stats.dead_lettered
    # each agent's events in order (agents that start at once start in any order)
    started = [] if where in ("__init__", "on_start") else [("started", "")]
    by_agent = {
        name: [(kind, reason) for kind, of, reason in found["events"] if of == name]
        for name in ("watcher", "other", "interrupted")
    }
    assert by_agent == {
        "watcher": [("spawned", ""), ("started", ""), ("stopped", "shutdown")],
        "other": [("spawned", ""), ("started", ""), ("stopped", "shutdown")],
        "interrupted": [("spawned", ""), *started, ("stopped", "shutdown")],
    }
    assert len(found["events"]) == sum(map(len, by_agent.values()))
    assert [of for kind, of, _ in found["events"] if kind == "stopped"] == [
        "interrupted",
        "other",
        "watcher",
    ]
    assert found["notices"] == [("stopped", "interrupted", "shutdown")]
    dead = [("shutdown", "queued", "agent stopped (shutdown)")]
    if where == "background":
        dead.insert(0, ("shutdown", "slow", "cancelled while being handled"))
    assert found["dead"] == dead
    assert stats.dead_letters_by_reason == {"shutdown": len(dead)}
    handled = [("other", 1), ("other", 2), ("other", 3)]
    if where == "on_stop":
        handled.insert(0, ("interrupted", "stop"))
    assert sorted(found["handled"]) == sorted(handled)
    # other's three messages and watcher's notice
    assert stats.handled == len(handled) + 1
    interrupted_stops = [] if where == "__init__" else ["interrupted"]
    assert found["stopped"] == [*interrupted_stops, "other", "watcher"]
    assert found["took"] < 10  # not the 600 s grace


def test_a_ctrl_c_in_an_agent_class_s_init_shuts_the_kernel_down_gracefully_then_raises() -> None:
    # The behaviour is built at the start of each run (the class's __init__), before the
    # run's nursery. Before: a Ctrl-C there went up through the supervisor's and the
    # kernel's nurseries: open_kernel raised a BaseExceptionGroup two deep, with no
    # drain (nothing handled: other's message in hand dead-lettered `agent_stopped`, the
    # rest `shutdown`, and so was watcher's notice). Now it is the
    # kernel's Ctrl-C, as one in on_start: the agent, never started, is stopped for
    # the shutdown.
    _assert_stopped_for_the_shutdown(_a_run_ended_by_a_ctrl_c("__init__"), "__init__")


@pytest.mark.parametrize("where", ["on_start", "background", "on_stop"])
def test_a_run_a_ctrl_c_ended_is_stopped_for_the_shutdown_not_restarted(where: str) -> None:
    # Before: the run a Ctrl-C ended (in on_start, a background task, on_stop) counted
    # as a normal exit, so this permanent agent was restarted while the kernel drained
    # (`restarts` 1, a `restarted` event, a second on_start and on_stop), its monitor
    # told nothing until the tree stop (too late: the watcher was stopped), and a
    # handler the background task's Ctrl-C cancelled was dead-lettered `agent_stopped`.
    # Now, as OTP's supervisor restarts nothing once it is terminating, the run ends as a
    # stop for the shutdown: stopped for good (`stopped` event and notice, reason
    # `shutdown`), no failure, no restart, its queue dead-lettered `shutdown`.
    _assert_stopped_for_the_shutdown(_a_run_ended_by_a_ctrl_c(where), where)


def test_a_run_a_ctrl_c_ended_whose_on_stop_raises_fails_and_is_not_restarted() -> None:
    # on_stop raising fails a run (as OTP's terminate crashing), also one the Ctrl-C
    # ended: that failure is reported and counted as any; the run is still stopped for
    # the shutdown. Before: the Ctrl-C was forgotten, the failure restarted the agent.
    where = "on_start, on_stop raising"
    found = _a_run_ended_by_a_ctrl_c(where)
    stats = found["stats"]
    assert (stats.restarts, stats.failed, stats.run_failures) == (0, 0, 1)
    interrupted = [(k, r) for k, of, r in found["events"] if of == "interrupted"]
    assert interrupted == [("spawned", ""), ("failed", "OSError"), ("stopped", "shutdown")]
    assert found["notices"] == [
        ("failed", "interrupted", "OSError('cannot close')"),
        ("stopped", "interrupted", "shutdown"),
    ]
    assert found["dead"] == [("shutdown", "queued", "agent stopped (shutdown)")]
    assert found["stopped"] == ["interrupted", "other", "watcher"]


def test_a_ctrl_c_in_on_stop_during_a_group_restart_does_not_restart_that_agent() -> None:
    # A one_for_all supervisor stops its other children to restart them with the one
    # that failed. Before: a Ctrl-C in the on_stop of that stop ended the run as any
    # stop, so the group restart brought the agent back while the kernel drained (a
    # `restarted` event, `restarts` 2; it handled its queue, and its monitor heard
    # nothing until too late). Now that run is stopped for the shutdown, as one
    # the Ctrl-C ended at any other time; the agent that failed is restarted as before.
    pressed: list[str] = []
    handled: list[str] = []
    notices: list[tuple[str, str, str]] = []
    outcome: list[BaseException] = []
    found: dict[str, Any] = {}

    class Failing(Agent):
        async def handle(self, ctx: Context, msg: Message) -> None:
            raise RuntimeError("boom")

    class Interrupted(Agent):
        async def on_start(self, ctx: Context) -> None:
            pass  # (it starts with the group, not on its first message)

        async def handle(self, ctx: Context, msg: Message) -> None:
            await trio.sleep(2)  # the group restart's stop lets it finish
            handled.append(msg.payload)

        async def on_stop(self, ctx: Context) -> None:
            if not pressed:
                pressed.append(str(ctx.kernel.phase.name))
                _ctrl_c()

    class Watcher(Agent):
        async def on_start(self, ctx: Context) -> None:
            ctx.monitor("interrupted")

        async def handle(self, ctx: Context, msg: Message) -> None:
            notices.append((msg.payload["event"], msg.payload["name"], msg.payload["reason"]))

    async def main() -> None:
        try:
            with trio.fail_after(60):
                async with open_kernel(make_config(shutdown_grace_ms=600_000)) as kernel:
                    events = kernel.events(100)
                    kernel.spawn(
                        Supervisor(
                            strategy="one_for_all",
                            backoff=Backoff(0, 0),
                            name="group",
                            children=[
                                agent(Failing, name="failing"),
                                agent(Interrupted, name="interrupted"),
                            ],
                        )
                    )
                    kernel.spawn(agent(Watcher, name="watcher"))
                    await kernel.send("interrupted", "in hand")
                    await kernel.send("interrupted", "queued")
                    await trio.sleep(1)
                    await kernel.send("failing", "boom")
                    await trio.sleep_forever()
        except BaseException as exc:
            outcome.append(exc)
        found.update(await _what_the_kernel_said(kernel, events))

    _run_with_ctrl_c(main)
    assert pressed == ["RUNNING"]  # (the group restart's stop, not the shutdown's)
    (exc,) = outcome
    assert type(exc) is KeyboardInterrupt, repr(exc)
    stats = found["stats"]
    assert (stats.restarts, stats.failed, stats.run_failures) == (1, 1, 0)
    assert handled == ["in hand"]
    assert found["dead"] == [
        ("handler_error", "boom", ""),
        ("shutdown", "queued", "agent stopped (shutdown)"),
    ]
    assert stats.dead_letters_by_reason == {"handler_error": 1, "shutdown": 1}
    assert (stats.handled, stats.in_flight) == (2, 0)  # "in hand" and watcher's notice
    by_agent = {
        name: [(kind, reason) for kind, of, reason in found["events"] if of == name]
        for name in ("failing", "interrupted")
    }
    assert by_agent == {
        "failing": [
            ("spawned", ""),
            ("started", ""),
            ("failed", "RuntimeError"),
            ("restarted", "backoff 0 s"),  # (dormant again: no on_start)
            ("stopped", "shutdown"),
        ],
        "interrupted": [("spawned", ""), ("started", ""), ("stopped", "shutdown")],
    }
    assert notices == [("stopped", "interrupted", "shutdown")]
    assert found["took"] < 10  # not the 600 s grace


def test_a_ctrl_c_that_ended_a_run_whose_exit_waits_behind_a_group_restart_stops_it() -> None:
    # The supervisor handles its children's exits one at a time. Here it is busy stopping
    # `slow` (kernel.stop, a long on_stop) while `failing` fails and then a Ctrl-C ends
    # `interrupted`'s run (in its background task): both exits wait, failing's first.
    # Before: failing's one_for_all restart found interrupted's run over and restarted
    # it, and its own exit, handled next, was an old run's (`restarts` 2, a `restarted`
    # event, its queue handled). Now it is stopped for the shutdown.
    pressed: list[str] = []
    failed: list[str] = []
    handled: list[str] = []
    outcome: list[BaseException] = []
    found: dict[str, Any] = {}

    class Slow(Agent):
        async def on_start(self, ctx: Context) -> None:
            pass  # (it starts with the group, not on its first message)

        async def handle(self, ctx: Context, msg: Message) -> None:
            pass

        async def on_stop(self, ctx: Context) -> None:
            await trio.sleep(3)

    class Failing(Agent):
        async def on_start(self, ctx: Context) -> None:
            ctx.nursery.start_soon(self.fail)

        async def fail(self) -> None:
            await trio.sleep(1)
            if not failed:  # (once: its restart runs this again)
                failed.append("failing")
                raise RuntimeError("boom")

        async def handle(self, ctx: Context, msg: Message) -> None:
            pass

    class Interrupted(Agent):
        async def on_start(self, ctx: Context) -> None:
            ctx.nursery.start_soon(self.background)

        async def background(self) -> None:
            await trio.sleep(2)
            if not pressed:
                pressed.append("background")
                _ctrl_c()

        async def handle(self, ctx: Context, msg: Message) -> None:
            await trio.sleep(10)  # the Ctrl-C's end of the run cancels it
            handled.append(msg.payload)

    async def stop_slow(kernel: Any) -> None:
        await kernel.stop("slow")

    async def main() -> None:
        try:
            with trio.fail_after(60):
                async with open_kernel(make_config(shutdown_grace_ms=600_000)) as kernel:
                    events = kernel.events(100)
                    kernel.spawn(
                        Supervisor(
                            strategy="one_for_all",
                            backoff=Backoff(0, 0),
                            name="group",
                            children=[
                                agent(Slow, name="slow", shutdown_timeout=10),
                                agent(Failing, name="failing"),
                                agent(Interrupted, name="interrupted"),
                            ],
                        )
                    )
                    await kernel.send("interrupted", "in hand")
                    await kernel.send("interrupted", "queued")
                    await trio.sleep(0.5)
                    await kernel.stop("slow")  # busy until t=3.5, past the Ctrl-C
        except BaseException as exc:
            outcome.append(exc)
        found.update(await _what_the_kernel_said(kernel, events))

    _run_with_ctrl_c(main)
    assert pressed == ["background"]
    (exc,) = outcome
    assert type(exc) is KeyboardInterrupt, repr(exc)
    stats = found["stats"]
    # (failing's restart may start before the drain ends, or be called off: since the
    # forty-first pass a restart is counted and published only if its run began)
    started = [of for kind, of, _ in found["events"] if kind == "started"]
    restarts = started.count("failing") - 1
    assert restarts in (0, 1)
    assert (stats.restarts, stats.failed, stats.run_failures) == (restarts, 0, 1)
    assert handled == []
    assert found["dead"] == [
        ("shutdown", "in hand", "cancelled while being handled"),
        ("shutdown", "queued", "agent stopped (shutdown)"),
    ]
    by_agent = {
        name: [
            (kind, reason)
            for kind, of, reason in found["events"]
            if of == name and (kind, reason) != ("started", "")
        ]
        for name in ("slow", "failing", "interrupted")
    }
    assert by_agent == {
        "slow": [("spawned", ""), ("stopped", "stopped")],
        "failing": [
            ("spawned", ""),
            ("failed", "RuntimeError"),
            *[("restarted", "backoff 0 s")] * restarts,
            ("stopped", "shutdown"),
        ],
        "interrupted": [("spawned", ""), ("stopped", "shutdown")],
    }
    assert started.count("interrupted") == 1
    assert found["took"] < 10  # not the 600 s grace


def test_a_second_ctrl_c_before_the_shutdown_started_forces_the_exit() -> None:
    # Regression: a Ctrl-C in an agent's code while the kernel still ran (the first one's
    # cancel of the block had not reached the shutdown yet) was taken as graceful again:
    # a user pressing twice could not force the exit until the drain began. The second
    # goes on up, as once the kernel drains.
    outcome: list[BaseException] = []
    pressed: list[str] = []

    @agent(name="first")
    async def first(ctx: Context, msg: Message) -> None:
        pressed.append("first")
        _ctrl_c()

    @agent(name="second")
    async def second(ctx: Context, msg: Message) -> None:
        pressed.append("second")
        _ctrl_c()

    async def main() -> None:
        try:
            with trio.fail_after(60):
                async with open_kernel(make_config(shutdown_grace_ms=600_000)) as kernel:
                    kernel.spawn(first)
                    kernel.spawn(second)
                    # both handlers run in the round after this, before the block resumes
                    kernel.send_nowait("first", 0)
                    kernel.send_nowait("second", 0)
                    await trio.sleep(10)
        except BaseException as exc:
            outcome.append(exc)
        assert kernel.stopped
        assert trio.current_time() < 10  # neither the block's sleep nor the grace

    _run_with_ctrl_c(main)
    assert sorted(pressed) == ["first", "second"]
    (exc,) = outcome
    assert isinstance(exc, BaseExceptionGroup) and exc.subgroup(KeyboardInterrupt) is not None


# --- an on_start still running when its agent is stopped ------------------------------


class _HangingStart(Agent):
    """An agent whose on_start never returns (a connection that never comes)."""

    journal: list[str]

    async def on_start(self, ctx: Context) -> None:
        self.journal.append("start")
        try:
            await trio.sleep_forever()
        finally:
            self.journal.append(f"start cancelled at {trio.current_time():g}")

    async def handle(self, ctx: Context, msg: Message) -> None:
        self.journal.append(f"handled {msg.payload}")

    async def on_stop(self, ctx: Context) -> None:
        self.journal.append("stop")


def _hanging(journal: list[str], **options: Any) -> Any:
    cls = type("Hanging", (_HangingStart,), {"journal": journal})
    return agent(cls, name="hanging", **options)


async def _events_of(stream: Any) -> list[tuple[str, str]]:
    """The (kind, reason) of each event of "hanging" the finished stream holds."""
    return [(e.kind.value, e.reason) async for e in stream if e.name == "hanging"]


@pytest.mark.parametrize(
    ("shutdown_timeout", "cancelled_at"),
    [(None, 3.0), (5, 8.0)],
    ids=["grace-deadline", "own-shutdown-timeout"],
)
async def test_a_hanging_on_start_is_cancelled_at_the_grace_deadline_and_stopped_not_failed(
    autojump_clock: Any, shutdown_timeout: float | None, cancelled_at: float
) -> None:
    # Before: the cancelled on_start ended the run as if it had started: on_stop was
    # called for a run whose on_start never returned. Now it is treated as a handler
    # still running at the end of the grace: cancelled at the grace's deadline (1 s +
    # 2 s of grace; the agent's own shutdown_timeout after it), the run stopped for the
    # shutdown (no failure, no restart, no on_stop), its queue dead-lettered and counted.
    journal: list[str] = []
    options = {} if shutdown_timeout is None else {"shutdown_timeout": shutdown_timeout}
    with trio.fail_after(60):
        async with open_kernel(make_config(shutdown_grace_ms=2000)) as kernel:
            async with kernel.events() as stream:
                kernel.spawn(_hanging(journal, **options))
                await kernel.send("hanging", "one")
                await kernel.send("hanging", "two")
                await trio.sleep(1)
            stream = kernel.events()
    assert journal == ["start", f"start cancelled at {cancelled_at:g}"]
    assert trio.current_time() == pytest.approx(cancelled_at)
    stats = kernel.stats()
    assert (stats.failed, stats.run_failures, stats.restarts) == (0, 0, 0)
    assert (stats.handled, stats.dead_lettered, stats.in_flight) == (0, 2, 0)
    assert stats.dead_letters_by_reason == {"shutdown": 2}
    assert await _events_of(stream) == [("stopped", "shutdown")]


async def test_a_drain_waits_for_an_on_start_under_way_that_has_messages_queued(
    autojump_clock: Any,
) -> None:
    # The decision of the twenty-eighth pass (kernel.md, shutdown): messages queued for an
    # agent whose on_start is under way are in flight, so they hold the drain as any
    # queue does; the on_start that returns within the grace has them handled, then
    # on_stop runs (as an OTP supervisor's shutdown waits for init to return). One with
    # nothing queued does not hold the drain (it is cancelled at its end, as above).
    journal: list[str] = []

    class SlowStart(Agent):
        async def on_start(self, ctx: Context) -> None:
            await trio.sleep(1.5)
            journal.append(f"started at {trio.current_time():g}")

        async def handle(self, ctx: Context, msg: Message) -> None:
            journal.append(f"handled {msg.payload}")

        async def on_stop(self, ctx: Context) -> None:
            journal.append(f"stopped at {trio.current_time():g}")

    async with open_kernel(make_config(shutdown_grace_ms=2000)) as kernel:
        kernel.spawn(agent(SlowStart, name="slow"))
        await kernel.send("slow", "one")
        await kernel.send("slow", "two")
        await trio.sleep(0.5)
    assert journal == ["started at 1.5", "handled one", "handled two", "stopped at 1.5"]
    stats = kernel.stats()
    assert (stats.handled, stats.dead_lettered, stats.in_flight) == (2, 0, 0)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("on-start-returns", ["start", "started at 80000", "handled one", "stopped at 80000"]),
        ("shorter-grace", ["start", "start ended at 80000"]),
        ("nothing-queued", ["start", "start ended at 0"]),
        ("own-timeout-inf", ["start", "started at 160000", "stopped at 160000"]),
    ],
)
async def test_a_shutdown_with_an_infinite_grace_waits_for_an_on_start_as_documented(
    autojump_clock: Any, case: str, expected: list[str]
) -> None:
    # shutdown(grace=math.inf) drains "as long as the drain takes", and the shutdown is
    # shielded from outside cancellation (kernel.md, shutdown). A message queued for an
    # agent whose on_start is under way is in flight, so the drain waits for that on_start
    # however long it takes, as an OTP supervisor's shutdown of a child in init waits
    # (the supervisor is blocked in start_child) and as a shutdown of infinity does: a
    # million mock seconds later it still drains. Only the on_start's return or a second
    # shutdown with a shorter grace ends it. With nothing queued the drain does not wait
    # for the on_start, which is cancelled at once; an agent whose own shutdown_timeout
    # is math.inf (OTP's infinity) is waited for in the stop, also after a shutdown(0).
    journal: list[str] = []
    release = trio.Event()

    class Waits(Agent):
        async def on_start(self, ctx: Context) -> None:
            journal.append("start")
            try:
                await release.wait()
            finally:
                if not release.is_set():
                    journal.append(f"start ended at {trio.current_time():g}")
            journal.append(f"started at {trio.current_time():g}")

        async def handle(self, ctx: Context, msg: Message) -> None:
            journal.append(f"handled {msg.payload}")

        async def on_stop(self, ctx: Context) -> None:
            journal.append(f"stopped at {trio.current_time():g}")

    own = {"shutdown_timeout": math.inf} if case == "own-timeout-inf" else {}
    phases: list[KernelPhase] = []
    async with open_kernel(make_config(shutdown_grace_ms=2000)) as kernel:
        kernel.spawn(agent(Waits, name="waits", **own))
        await trio.testing.wait_all_tasks_blocked()
        if case not in ("nothing-queued", "own-timeout-inf"):
            await kernel.send("waits", "one")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(kernel.shutdown, math.inf)
            await trio.sleep(80_000)  # (a day's less: ASYNC116)
            phases.append(kernel.phase)
            if case == "shorter-grace":
                await kernel.shutdown(0)
            elif case == "own-timeout-inf":
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(kernel.shutdown, 0)  # (no end to the agent's own infinity)
                await trio.sleep(80_000)
                phases.append(kernel.phase)
                release.set()
            else:
                release.set()
    assert journal == expected
    assert (
        phases
        == {
            "on-start-returns": [KernelPhase.DRAINING],
            "shorter-grace": [KernelPhase.DRAINING],
            "nothing-queued": [KernelPhase.STOPPED],
            "own-timeout-inf": [KernelPhase.STOPPING, KernelPhase.STOPPING],
        }[case]
    )
    assert kernel.stopped
    stats = kernel.stats()
    assert (stats.failed, stats.run_failures, stats.restarts) == (0, 0, 0)
    lettered = {"shutdown": 1} if case == "shorter-grace" else {}
    assert (stats.handled, stats.dead_letters_by_reason) == (
        (1, {}) if case == "on-start-returns" else (0, lettered)
    )


@pytest.mark.parametrize("how", ["cancelled-block", "grace-0"])
async def test_a_hanging_on_start_is_cancelled_at_once_when_there_is_no_grace(
    autojump_clock: Any, how: str
) -> None:
    # Before: on_stop ran for the run whose on_start was cancelled. No grace (a block
    # cancelled from outside, shutdown(grace=0)): cancelled at once, stopped, no on_stop.
    journal: list[str] = []
    with trio.fail_after(60), trio.CancelScope() as outside:
        async with open_kernel(make_config(shutdown_grace_ms=2000)) as kernel:
            stream = kernel.events()
            kernel.spawn(_hanging(journal))
            await kernel.send("hanging", "one")
            await trio.sleep(1)
            if how == "grace-0":
                await kernel.shutdown(grace=0)
            else:
                outside.cancel()
                await trio.sleep_forever()
    assert outside.cancelled_caught is (how == "cancelled-block")
    assert journal == ["start", "start cancelled at 1"]
    assert trio.current_time() == pytest.approx(1.0)
    stats = kernel.stats()
    assert (stats.failed, stats.run_failures, stats.restarts) == (0, 0, 0)
    assert stats.dead_letters_by_reason == {"shutdown": 1}
    assert await _events_of(stream) == [("spawned", ""), ("stopped", "shutdown")]


async def test_stopping_an_agent_whose_on_start_hangs_cancels_it_after_its_shutdown_timeout(
    autojump_clock: Any,
) -> None:
    # As a running handler: kernel.stop waits the agent's shutdown timeout (3 s here),
    # then cancels. Before: on_stop ran after the cancelled on_start. Now the run is
    # stopped (reason "stopped"), not restarted (permanent), without on_stop; what it had
    # queued is dead-lettered agent_stopped.
    journal: list[str] = []
    with trio.fail_after(60):
        async with open_kernel(make_config(shutdown_grace_ms=2000)) as kernel:
            stream = kernel.events()
            ref = kernel.spawn(_hanging(journal, shutdown_timeout=3))
            await kernel.send("hanging", "one")
            await kernel.send("hanging", "two")
            await trio.sleep(1)
            await kernel.stop(ref)
            assert trio.current_time() == pytest.approx(4.0)
            assert journal == ["start", "start cancelled at 4"]
            stats = kernel.stats()
            assert (stats.failed, stats.run_failures, stats.restarts) == (0, 0, 0)
            assert stats.dead_letters_by_reason == {"agent_stopped": 2}
    assert journal == ["start", "start cancelled at 4"]
    assert await _events_of(stream) == [("spawned", ""), ("stopped", "stopped")]


async def test_an_on_start_that_raises_during_the_shutdown_still_fails(
    autojump_clock: Any,
) -> None:
    # Only a cancellation by the stop is a stop: an on_start that fails on its own while
    # the kernel drains is a failure, as before (counted, a failed event, on_stop called).
    journal: list[str] = []

    class FailsLate(Agent):
        async def on_start(self, ctx: Context) -> None:
            await trio.sleep(1.5)
            raise RuntimeError("no connection")

        async def handle(self, ctx: Context, msg: Message) -> None:
            journal.append("handled")

        async def on_stop(self, ctx: Context) -> None:
            journal.append("stop")

    with trio.fail_after(60):
        async with open_kernel(make_config(shutdown_grace_ms=2000)) as kernel:
            stream = kernel.events()
            kernel.spawn(agent(FailsLate, name="hanging", restart="temporary"))
            await kernel.send("hanging", "one")
            await trio.sleep(1)
    stats = kernel.stats()
    assert (stats.failed, stats.run_failures, stats.restarts) == (0, 1, 0)
    assert stats.dead_letters_by_reason == {"agent_stopped": 1}  # stopped for good, failed
    assert journal == ["stop"]
    assert await _events_of(stream) == [
        ("spawned", ""),
        ("failed", "RuntimeError"),
        ("stopped", "failed"),
    ]


async def test_wait_stop_requested_returns_at_the_stop_of_an_agent_held_after_the_grace(
    autojump_clock: Any,
) -> None:
    # ctx.wait_stop_requested() in a background task of an agent that the grace left
    # holding (its handler outlived the drain, its stop comes later in the ordered stop):
    # the wait returns when the stop comes (t = 6, after the later sibling's on_stop), not
    # cancelled with the run. Before: the hold replaced the event the task waited on.
    journal: list[str] = []

    class Watched(Agent):
        async def on_start(self, ctx: Context) -> None:
            ctx.nursery.start_soon(self.watch, ctx)

        async def watch(self, ctx: Context) -> None:
            try:
                await ctx.wait_stop_requested()
                journal.append(f"stop requested at {trio.current_time():g}")
            except trio.Cancelled:
                journal.append(f"watch cancelled at {trio.current_time():g}")
                raise

        async def handle(self, ctx: Context, msg: Message) -> None:
            await trio.sleep(3)
            journal.append(f"handled {msg.payload} at {trio.current_time():g}")

    class SlowStop(Agent):
        async def handle(self, ctx: Context, msg: Message) -> None:
            pass

        async def on_stop(self, ctx: Context) -> None:
            await trio.sleep(5)

    with trio.fail_after(60):
        async with open_kernel(make_config(shutdown_grace_ms=1000)) as kernel:
            kernel.spawn(agent(Watched, name="watched", shutdown_timeout=10))
            kernel.spawn(agent(SlowStop, name="slow", shutdown_timeout=10))
            await kernel.send("watched", "one")
            await kernel.send("watched", "two")
            await kernel.send("slow", "go")
            await trio.testing.wait_all_tasks_blocked()
    assert journal == ["handled one at 3", "stop requested at 6"]
    assert kernel.stats().dead_letters_by_reason == {"shutdown": 1}


# --- Ctrl-C in the bookkeeping of a run's start and end ------------------------------------


def _lines_starting(text: str) -> set[tuple[str, int]]:
    """The lines (path, number) of ``nexus_trio/_cell.py`` and ``_child.py`` that start
    with ``text`` (stripped). None: ``LookupError`` naming ``text``, so that a line since
    rewritten fails the test where its tracer is made, not inside the block whose outcome
    the test checks (where it was caught as that outcome: ``assert fired`` failed)."""
    lines: set[tuple[str, int]] = set()
    for module in (cell_module, child_module):  # (and the Child methods the cell's runs call)
        path = module.__file__
        assert path is not None
        with open(path, encoding="utf-8") as source:
            lines |= {
                (path, n) for n, line in enumerate(source, 1) if line.strip().startswith(text)
            }
    if not lines:
        raise LookupError(f"no line of nexus_trio/_cell.py or _child.py starts with {text!r}")
    return lines


def _ctrl_c_at(text: str, fired: list[str]) -> Any:
    """A ``sys.settrace`` function that gives a Ctrl-C to the line of ``nexus_trio/_cell.py``
    (or ``_child.py``: the scope of ``on_stop`` is ``Child.shutdown_scope``) that starts with
    ``text``, the first time it runs in ``run_once`` (or ``_call_on_start``
    or ``_call_on_stop``, its on_start and on_stop parts) or in a function that one of
    them calls, as the signal machinery
    would: Trio's SIGINT handler is called with the frame that runs it, raises
    KeyboardInterrupt there if that frame is not protected, and gives it to the run's main
    task otherwise (``fired`` gets the function's name)."""
    lines = _lines_starting(text)
    paths = {path for path, _ in lines}
    runs = ("run_once", "_call_on_start", "_call_on_stop")

    def at_line(frame: types.FrameType, event: str, arg: Any) -> Any:
        if fired or event != "line" or (frame.f_code.co_filename, frame.f_lineno) not in lines:
            return at_line
        caller = frame.f_back
        if frame.f_code.co_name not in runs and (
            caller is None or caller.f_code.co_name not in runs
        ):
            return at_line
        fired.append(frame.f_code.co_name)
        sys.settrace(None)
        frame.f_trace = None
        handler = signal.getsignal(signal.SIGINT)
        assert callable(handler) and handler is not signal.default_int_handler
        handler(signal.SIGINT, frame)
        return None

    def on_call(frame: types.FrameType, event: str, arg: Any) -> Any:
        return at_line if frame.f_code.co_filename in paths else None

    return on_call


#: lines of a run's start that run the agent's code, not protected: a Ctrl-C there lands
#: in that code, before on_start is called
_BEFORE_THE_RUN_STARTS = (
    # as the agent's class is made (its __init__, called by the factory)
    "return self.spec.factory()",
)


#: (line, whether a background task fails the run): the lines of a run's start and end
#: that a Ctrl-C is given at
_RUN_LINES = [
    *((line, False) for line in _BEFORE_THE_RUN_STARTS),
    # at a run's very start, before its bookkeeping (run_once's own lines are
    # protected: one frame for the run and its serve loop)
    ("self._begin_run()", False),
    # as a run opens its nursery (the ``async with`` written out)
    ("manager = trio.open_nursery()", False),
    ("self.nursery = await manager.__aenter__()", False),
    # between a run's ``exit_requested`` and ``interrupted``
    ("self.interrupted = self.terminating", False),
    # between a run's nursery and its cancel scope set
    ("self.scope = nursery.cancel_scope", False),
    # as a run's nursery is left by what its failing background task raised (the
    # ``async with``'s exit written out: made, as the statement's, where no Ctrl-C
    # lands before the nursery has its exception)
    ("return await manager.__aexit__(type(exc), exc, exc.__traceback__)", True),
    # between a run's start signalled and its `started` event
    ("self.defaults.ledger.event(_STARTED", False),
    # (a run that a background task fails while a handler is held:)
    # between the failure taken from the nursery's group and logged
    ("log_guarded(", True),
    # between the message in hand taken off and its dead letter counted and published
    ("self.dead_lettered += 1", True),
    # between on_stop's shielded scope entered and its deadline set
    ("if math.isfinite(self.shutdown_timeout)", True),
    # between the run's failure counted for the agent and for the kernel
    ("self.ledger.run_failures += 1", True),
]


def test_each_line_a_ctrl_c_is_given_at_is_found_and_a_line_not_there_is_named() -> None:
    """The finder of ``_ctrl_c_at`` finds each line of ``_RUN_LINES`` in the sources; a
    line that is not there (rewritten since) is a ``LookupError`` naming it."""
    for line, _ in _RUN_LINES:
        assert _lines_starting(line), line
    with pytest.raises(LookupError, match=r"starts with 'self\.no_such_line = 1'$"):
        _lines_starting("self.no_such_line = 1")


@pytest.mark.parametrize(("line", "failing"), _RUN_LINES)
def test_a_ctrl_c_in_the_bookkeeping_of_a_run_s_start_or_end_goes_to_the_block(
    line: str, failing: bool
) -> None:
    # The agent's code in a run (__init__, on_start, on_stop) is not protected from
    # KeyboardInterrupt, and run_once's own lines were not either. Before: a Ctrl-C that came
    # between two of their bookkeeping lines was raised there: a dead letter lost (the
    # books off by one, the kernel ending with a group), the agent's and the kernel's
    # run_failures apart, a run whose on_start returned without its `started` event. Now
    # each group of bookkeeping lines is protected: the Ctrl-C goes to the block, the
    # kernel shuts down gracefully, and the books add up.
    fired: list[str] = []
    outcome: list[BaseException] = []
    found: dict[str, Any] = {}
    journal: list[str] = []
    counts: list[tuple[int, int]] = []  # (the agent's run_failures, the kernel's) at each start
    box: list[Kernel] = []
    held = trio.Event()

    class Worker(Agent):
        async def on_start(self, ctx: Context) -> None:
            journal.append("on_start")
            (worker,) = box[0].stats(agents=True).agents
            counts.append((worker.run_failures, box[0].stats().run_failures))
            if len(counts) == 1:
                ctx.nursery.start_soon(self.fail_when_held)

        async def fail_when_held(self) -> None:
            await held.wait()
            raise OSError("background")

        async def handle(self, ctx: Context, msg: Message) -> None:
            if msg.payload == "hold":
                held.set()
                await trio.sleep_forever()
            journal.append(f"handled {msg.payload}")

        async def on_stop(self, ctx: Context) -> None:
            journal.append("on_stop")

    tracer = _ctrl_c_at(line, fired)  # (made before the block: a line not found fails here)

    async def main() -> None:
        previous = sys.gettrace()
        sys.settrace(tracer)
        try:
            with trio.fail_after(60):
                async with open_kernel(make_config(shutdown_grace_ms=600_000)) as kernel:
                    box.append(kernel)
                    events = kernel.events(100)
                    kernel.spawn(agent(Worker, name="worker"))
                    if failing:
                        # a handler held when a background task fails the run; a
                        # message behind it for the restarted run (the drain waits
                        # for it: that run starts whenever the Ctrl-C comes)
                        kernel.send_nowait("worker", "hold")
                        kernel.send_nowait("worker", "after")
                    await trio.sleep_forever()
        except BaseException as exc:
            outcome.append(exc)
        finally:
            sys.settrace(previous)
        found.update(await _what_the_kernel_said(kernel, events))

    # On Trio's real clock: a protected Ctrl-C reaches the main task through Trio's queue
    # of callbacks, which a mock clock's jump to the next deadline could pass.
    _run_with_ctrl_c(main, clock=None)
    assert len(fired) == 1, fired
    stats = found["stats"]
    assert stats.in_flight == 0
    assert stats.accepted == stats.handled + stats.replies_delivered + stats.dead_lettered
    worker = [(kind, reason) for kind, name, reason in found["events"] if name == "worker"]
    if failing:
        # the failed run: its message in hand dead-lettered, counted once by both
        assert (stats.handled, stats.run_failures, stats.restarts) == (1, 1, 1)
        assert found["dead"] == [("agent_stopped", "hold", "cancelled while being handled")]
        assert stats.dead_letters_by_reason == {"agent_stopped": 1}
        assert counts == [(0, 0), (1, 1)]
        assert journal == ["on_start", "on_stop", "on_start", "handled after", "on_stop"]
        assert [kind for kind, _ in worker] == [
            "spawned",
            "started",
            "failed",
            "restarted",
            "started",
            "stopped",
        ]
        assert (worker[2][1], worker[-1][1]) == ("OSError", "shutdown")
    elif line in _BEFORE_THE_RUN_STARTS:
        # no on_start yet: the run ends as a stop before it started (no on_stop)
        assert found["dead"] == []
        assert (stats.run_failures, stats.restarts) == (0, 0)
        assert journal == []
        assert worker == [("spawned", ""), ("stopped", "shutdown")]
    else:
        assert found["dead"] == []
        assert (stats.run_failures, stats.restarts) == (0, 0)
        assert journal == ["on_start", "on_stop"]
        assert worker == [("spawned", ""), ("started", ""), ("stopped", "shutdown")]
    (exc,) = outcome
    assert type(exc) is KeyboardInterrupt, repr(exc)


@pytest.mark.parametrize(
    ("drain", "ended_by"),
    [(False, "shorter grace"), (True, "shorter grace"), (False, "nothing in flight")],
)
async def test_a_stop_begun_during_the_drain_ends_when_the_grace_ends_sooner(
    autojump_clock: Any, drain: bool, ended_by: str
) -> None:
    """A ``kernel.stop`` begun during the drain (at 1 s, grace 100 s) of an agent without
    a ``shutdown_timeout`` of its own (an ``on_start`` that hangs) took its time limit
    then, once: when the drain ended at 3 s (a ``shutdown(grace=1)`` at 2 s, or nothing
    in flight any more), the stop went on until 100 s, and the shutdown with it (its
    supervisor was busy with that stop). The sooner end wins for the stop too."""
    cancelled: dict[str, float] = {}

    @agent(name="busy")
    async def busy(ctx: Context, msg: Message) -> None:
        try:
            await trio.sleep(3 if ended_by == "nothing in flight" else 1000)
        finally:
            cancelled["busy"] = trio.current_time()

    class Hanging(Agent):
        async def on_start(self, ctx: Context) -> None:
            try:
                await trio.sleep(1000)
            finally:
                cancelled["on_start"] = trio.current_time()

    ended: dict[str, float] = {}
    async with open_kernel(make_config(shutdown_grace_ms=100_000)) as kernel:
        kernel.spawn(busy)
        kernel.spawn(Hanging, name="hanging")
        await kernel.send("busy", 0)

        async def first() -> None:
            await kernel.shutdown()
            ended["shutdown"] = trio.current_time()

        async def stop() -> None:
            await trio.sleep(1)
            await kernel.stop("hanging", drain=drain)
            ended["stop"] = trio.current_time()

        async def second() -> None:
            await trio.sleep(2)
            await kernel.shutdown(grace=1)
            ended["second"] = trio.current_time()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(first)
            nursery.start_soon(stop)
            if ended_by == "shorter grace":
                nursery.start_soon(second)
    assert cancelled == {"busy": 3, "on_start": 3}
    assert ended == {"stop": 3, "shutdown": 3} | (
        {"second": 3} if ended_by == "shorter grace" else {}
    )
    stats = kernel.stats()
    handled = 1 if ended_by == "nothing in flight" else 0
    assert (stats.handled, stats.dead_lettered, stats.in_flight) == (handled, 1 - handled, 0)


class _StartsForever(Agent):
    """Its ``on_start`` never returns: what is sent to it waits, so a drain with no end
    (``shutdown(grace=math.inf)``) never ends by itself."""

    async def on_start(self, ctx: Context) -> None:
        await trio.sleep_forever()

    async def handle(self, ctx: Context, msg: Message) -> Any:
        return msg.payload


class _AsksForever(Agent):
    async def handle(self, ctx: Context, msg: Message) -> None:
        await ctx.kernel.shutdown(grace=math.inf)


@pytest.mark.parametrize("asked_by", ["handler", "beside"])
def test_a_cancel_that_comes_while_the_close_waits_for_an_endless_drain_ends_it(
    asked_by: str,
) -> None:
    """Regression (forty-second pass, found by tests/test_faults_tree_round.py with an
    ``on_start`` that never returns): a shutdown with ``grace=math.inf`` asked by a
    handler or by a task beside the block drains; the block ends (its close waits for
    that drain), and a cancel scope around it is cancelled at 10 s. The close left
    promptly only for a cancel that came before the block ended: this one was never
    seen (the close waits shielded), and the kernel hung in the drain for ever. Now the
    drain ends at the cancel, the tree stops in order (the ``on_start`` cancelled, its
    queue dead-lettered ``shutdown``) and the block is left at 10 s."""
    left: list[float] = []

    async def main() -> None:
        baseline = tasks_living()
        with trio.move_on_after(10) as around:
            async with trio.open_nursery() as beside:
                async with open_kernel(make_config(shutdown_grace_ms=100)) as kernel:
                    kernel.spawn(agent(_StartsForever, name="h"))
                    kernel.spawn(agent(_AsksForever, name="a"))
                    await trio.testing.wait_all_tasks_blocked()
                    await kernel.send("h", "queued")
                    if asked_by == "handler":
                        await kernel.send("a", "shut down")
                    else:
                        beside.start_soon(kernel.shutdown, math.inf)
                    await trio.sleep(0.1)
        left.append(trio.current_time())
        assert around.cancelled_caught
        assert kernel.stopped
        assert tasks_living() == baseline
        assert kernel.stats().dead_letters_by_reason == {"shutdown": 1}
        assert_conserved(kernel)

    run_on_mock_clock(main, real_seconds=30)
    assert left == [pytest.approx(10.0)]


class _CtrlC(Agent):
    """A Ctrl-C landing in its code on any message (the kernel takes it)."""

    async def handle(self, ctx: Context, msg: Message) -> None:
        raise KeyboardInterrupt


@pytest.mark.parametrize("going_out", ["the block's error", "a Ctrl-C the kernel took"])
async def test_a_close_step_that_raises_is_said_on_what_goes_out_not_raised_in_its_place(
    autojump_clock: Any, monkeypatch: pytest.MonkeyPatch, going_out: str
) -> None:
    """The close's last steps (the streams' end: a log on a full disk) raising while the
    block failed, or while the kernel held a Ctrl-C an agent's code took: the block's
    error (or the Ctrl-C) goes out with notes naming the shutdown's and the close's
    errors, as a close step's error was said on a shutdown that was failing. Until the
    fifty-first pass the shutdown's error went out in its place and the block's error, or
    the Ctrl-C, was lost. (Fails with the fifty-first
    pass's main before the fix: RuntimeError('log disk full') raised.)"""
    from nexus_trio._ledger import Ledger

    def broken(self: Ledger) -> None:
        raise RuntimeError("log disk full")

    monkeypatch.setattr(Ledger, "finish_streams", broken)
    expected: type[BaseException] = (
        ValueError if going_out == "the block's error" else KeyboardInterrupt
    )
    kernels: list[Kernel] = []

    async def run() -> None:
        async with open_kernel() as kernel:
            kernels.append(kernel)
            if expected is ValueError:
                raise ValueError("the block's own")
            await kernel.send(kernel.spawn(agent(_CtrlC, name="c")), "now")
            await trio.sleep_forever()  # cancelled by the kernel, for its Ctrl-C

    with pytest.raises(expected) as raised:
        await run()
    (kernel,) = kernels
    assert type(raised.value) is expected, repr(raised.value)
    # (the streams end in the shutdown, and again in the close: both raise here)
    assert getattr(raised.value, "__notes__", []) == [
        "the kernel's shutdown then raised RuntimeError: log disk full",
        "closing the kernel then raised RuntimeError: log disk full",
    ]
    assert kernel.stopped
