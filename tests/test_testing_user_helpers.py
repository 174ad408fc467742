"""The helpers a user tests their agents with: send_and_wait, step_until_idle, assert_events."""

from __future__ import annotations

import math
import re
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from nexus_trio import (
    Agent,
    Backoff,
    Context,
    EventKind,
    Kernel,
    Message,
    RequestFailed,
    RequestTimeout,
    RestartStrategy,
    Supervisor,
    agent,
)
from nexus_trio.bridges import process_agent
from nexus_trio.testing import (
    EventRecorder,
    assert_conserved,
    assert_dead_lettered,
    assert_events,
    assert_no_dead_letters,
    dead_letters,
    open_test_kernel,
    record_events,
    send_and_wait,
    settle,
    spawn_probe,
    step_until_idle,
    test_config,
)

from .hang_guard import real_time_limit
from .task_steps import counting_steps


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


async def test_step_until_idle_says_its_timeout_counted_mock_seconds_and_who_is_handling(
    nexus_kernel: Kernel, autojump_clock: Any
) -> None:
    """The docs said an hour's sleep in a handler takes no real time, but the default
    ``timeout=60`` counts seconds of the mock clock: ``send_and_wait`` to an agent that
    sleeps an hour failed at once with "kernel not idle after 60 s", which read as real
    seconds that never passed. The failure now says whose handler is still running and
    that the timeout counted mock seconds, with what to pass."""

    @agent(name="napper", handle_timeout=7200)
    async def napper(ctx: Context, msg: Message) -> None:
        await trio.sleep(3600)

    ref = nexus_kernel.spawn(napper)
    with pytest.raises(AssertionError) as failure:
        await send_and_wait(nexus_kernel, ref, "nap")
    assert str(failure.value).startswith(
        "kernel not idle after 60 s: 1 message(s) still in flight, being handled by 'napper'"
        " (60 s of the mock clock, which took no real time: a handler, sleep or backoff meant"
        " to take longer needs a larger timeout=, e.g. timeout=3600); agents: "
    )
    assert trio.current_time() == 60.0
    await step_until_idle(nexus_kernel, timeout=3600)
    assert trio.current_time() == 3600.0
    assert nexus_kernel.stats().handled == 1


async def test_a_test_may_shut_the_fixtures_kernel_down_and_look_at_what_the_shutdown_did(
    nexus_kernel: Kernel, autojump_clock: Any
) -> None:
    """A test of what a shutdown does (``on_stop`` ran, the queue dead-lettered) calls
    ``await nexus_kernel.shutdown()``: the kernel then cancelled the fixture's block, the
    test's task being beside it, and pytest-trio failed the test with "<fixture
    'nexus_kernel'> cancelled the test but didn't raise an error". The fixture's kernel
    now runs in a task of the fixture's own, whose block may end that way."""
    stopped: list[str] = []

    class Saver(Agent):
        async def handle(self, ctx: Context, msg: Message) -> None:
            await trio.sleep(10)

        async def on_stop(self, ctx: Context) -> None:
            stopped.append(ctx.name or "?")

    ref = nexus_kernel.spawn(Saver, name="saver")
    await nexus_kernel.send(ref, 1)
    await nexus_kernel.send(ref, 2)
    await settle()
    await nexus_kernel.shutdown(grace=0)
    assert nexus_kernel.stopped
    assert stopped == ["saver"]
    assert [(d.message.payload, d.reason.value) for d in dead_letters(nexus_kernel)] == [
        (1, "shutdown"),
        (2, "shutdown"),
    ]
    assert_conserved(nexus_kernel)
    await trio.sleep(1)  # the test goes on, on the same clock: nothing cancelled it
    assert trio.current_time() == 1.0


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


class _ReprRaises(Exception):
    def __repr__(self) -> str:
        raise RuntimeError("repr of the error failed")


async def test_the_dead_letter_assertions_show_an_error_whose_repr_raises(
    nexus_kernel: Kernel, autojump_clock: Any
) -> None:
    """Regression: ``assert_no_dead_letters`` and ``assert_dead_lettered`` listed what was
    dead-lettered with ``repr`` of each error: a handler's error whose ``__repr__`` raises
    made them raise that RuntimeError instead of the assertion saying what was there."""
    from nexus_trio.testing import assert_dead_lettered

    @agent(name="bad")
    async def bad(ctx: Context, msg: Message) -> None:
        raise _ReprRaises("bad")

    await send_and_wait(nexus_kernel, nexus_kernel.spawn(bad), "x")
    shown = "<_ReprRaises, whose repr() raised RuntimeError: repr of the error failed>"
    with pytest.raises(AssertionError) as info:
        assert_no_dead_letters(nexus_kernel)
    assert (
        str(info.value) == f"expected no dead letters, got 1: [('handler_error', 'x', {shown!r})]"
    )
    with pytest.raises(AssertionError) as info:
        assert_dead_lettered(nexus_kernel, payload="y")
    assert str(info.value) == (
        f"no dead letter with payload='y'; dead letters: [('handler_error', 'x', {shown!r})]"
    )


async def test_send_and_wait_returns_once_the_restart_its_message_caused_has_happened(
    nexus_kernel: Kernel, autojump_clock: Any
) -> None:
    """The failure dead-letters the message at once, so nothing was in flight during the
    restart's backoff and ``send_and_wait`` returned with the agent not started again,
    though it says the restarts have happened (and ``step_until_idle`` that it plays
    backoffs out): ``assert_events`` then saw no second ``started``."""
    starts: list[float] = []

    class Crashy(Agent):
        async def on_start(self, ctx: Context) -> None:
            starts.append(trio.current_time())

        async def handle(self, ctx: Context, msg: Message) -> None:
            raise RuntimeError("crash")

    async with record_events(nexus_kernel) as events:
        nexus_kernel.spawn(
            Supervisor(
                backoff=Backoff(initial=30.0, maximum=30.0, jitter=0.0),
                children=[agent(name="c")(Crashy)],
            )
        )
        await send_and_wait(nexus_kernel, "c", "crash")
        assert starts == [0.0, 30.0]
    assert_events(events, "c", ["spawned", "started", "failed", "restarted", "started"])


async def test_step_until_idle_fails_naming_an_agent_whose_restart_has_not_come(
    nexus_kernel: Kernel, autojump_clock: Any
) -> None:
    class Crashy(Agent):
        async def handle(self, ctx: Context, msg: Message) -> None:
            raise RuntimeError("crash")

    nexus_kernel.spawn(
        Supervisor(
            backoff=Backoff(initial=100.0, maximum=100.0, jitter=0.0),
            children=[agent(name="c")(Crashy)],
        )
    )
    await nexus_kernel.send("c", "crash")
    with pytest.raises(
        AssertionError,
        match=r"^kernel not idle after 5 s: 0 message\(s\) still in flight, agents restarting: \['c'\] \(5 s of the mock clock",
    ):
        await step_until_idle(nexus_kernel, timeout=5)
    await step_until_idle(nexus_kernel, timeout=200)
    assert 100.0 <= trio.current_time() < 100.1


async def test_step_until_idle_on_a_mock_clock_that_does_not_jump_fails_instead_of_hanging(
    mock_clock: Any,
) -> None:
    """pytest-trio's ``mock_clock`` never moves by itself: the short sleep that lets
    timers fire waited forever, and the test hung."""

    @agent(name="sleepy", handle_timeout=3600)
    async def sleepy(ctx: Context, msg: Message) -> None:
        await trio.sleep(10)

    hung = False
    async with open_test_kernel() as kernel:
        await kernel.send(kernel.spawn(sleepy), "x")
        try:
            async with trio.open_nursery() as nursery:

                async def watch() -> None:
                    nonlocal hung
                    # Woken with step_until_idle (the same cushion); it is still there
                    # once all are blocked again only if it waits forever.
                    await trio.testing.wait_all_tasks_blocked()
                    await trio.testing.wait_all_tasks_blocked()
                    hung = True  # every task blocked, step_until_idle among them
                    nursery.cancel_scope.cancel()

                nursery.start_soon(watch)
                with pytest.raises(
                    RuntimeError,
                    match=r"^step_until_idle needs time to pass, but the clock is a MockClock"
                    r" that does not jump \(autojump_threshold=inf, rate=0\)",
                ):
                    await step_until_idle(kernel)
                nursery.cancel_scope.cancel()
        finally:
            mock_clock.jump(10)  # the handler's sleep ends, and the kernel can close
        assert not hung
        await step_until_idle(kernel)
        assert kernel.stats().handled == 1


async def test_step_until_idle_jumps_to_the_next_timer_instead_of_in_steps_of_ten_ms(
    nexus_kernel: Kernel, autojump_clock: Any
) -> None:
    """On the autojump clock ``step_until_idle`` slept 0.01 s at a time while a handler
    slept: a 600 s sleep took 60,000 turns of its loop (8 s of real time; an hour's, 47 s),
    though time on the mock clock is said to take none. It now sleeps until the next
    timer of the run, so it is woken a few times, whatever the length of the sleep."""

    @agent(name="sleepy", handle_timeout=3600)
    async def sleepy(ctx: Context, msg: Message) -> None:
        await trio.sleep(600)

    ref = nexus_kernel.spawn(sleepy)
    await nexus_kernel.send(ref, "x")
    with counting_steps() as turns:
        await step_until_idle(nexus_kernel, timeout=1000)
    assert trio.current_time() == 600.0
    assert nexus_kernel.stats().handled == 1
    assert turns.count < 20, turns.count


async def test_step_until_idle_and_settle_fail_when_tasks_never_all_block(
    nexus_kernel: Kernel, autojump_clock: Any
) -> None:
    """An agent that sends to itself on every message never lets every task block: the
    mock clock never moved, so the ``timeout`` never came, and ``step_until_idle`` (and
    ``settle``) waited forever for a moment where all are blocked; the test hung, also
    inside ``trio.fail_after``. ``timeout`` now bounds that wait in real time too."""

    @agent(name="looper")
    async def looper(ctx: Context, msg: Message) -> None:
        await ctx.send("looper", msg.payload + 1)

    ref = nexus_kernel.spawn(looper)
    await nexus_kernel.send(ref, 0)
    with real_time_limit(30):
        with pytest.raises(
            AssertionError,
            match=r"^kernel not idle after 0\.5 s: its tasks never all blocked \(did an agent"
            r" keep itself busy, sending to itself on every message\?\); [1-9]\d* message\(s\)"
            r" handled meanwhile, [12] message\(s\) in flight; agents: ",
        ):
            await step_until_idle(nexus_kernel, timeout=0.5)
        with pytest.raises(
            AssertionError,
            match=r"^tasks not all blocked after 0\.5 s of real time \(did an agent keep"
            r" itself busy, sending to itself on every message\?\)$",
        ):
            await settle(timeout=0.5)
    await nexus_kernel.stop(ref)
    assert trio.current_time() == 0.0
    assert nexus_kernel.stats().in_flight == 0


@pytest.mark.parametrize(
    ("options", "start", "listed"),
    [
        (
            {"send_timeout": 7},
            "'send_timeout' is no [kernel] option; did you mean 'send_timeout_ms'?",
            "mailbox_capacity",
        ),
        (
            {"supervision": {"max_restart": 1}},
            "'max_restart' is no [supervision] option; did you mean 'max_restarts'?",
            "backoff_initial_ms",
        ),
        # a misspelt section: before, "'supervison' is no [kernel] option" and the
        # [kernel] options, as if the test had meant one of them
        (
            {"supervison": {"max_restarts": 1}},
            "'supervison' is no [kernel] option; did you mean the section supervision=?",
            "supervision, runtime",
        ),
    ],
)
def test_test_config_names_an_option_it_does_not_know_and_the_nearest(
    options: dict[str, Any], start: str, listed: str
) -> None:
    """Before: ``test_config(send_timeout=7)`` raised Python's ``KernelConfig.__init__()
    got an unexpected keyword argument``, naming no option it takes (and no section but
    ``[kernel]`` could be given: ``supervision`` was "no [kernel] option")."""
    with pytest.raises(TypeError) as info:
        test_config(**options)
    text = str(info.value)
    assert text.startswith(f"test_config: {start}"), text
    assert listed in text
    with pytest.raises(
        TypeError, match=r"^test_config: 'zzz' is no \[kernel\] option \(they are: "
    ):
        test_config(zzz=1)
    assert test_config(send_timeout_ms=7).kernel.send_timeout_ms == 7


def test_test_config_sets_every_section_as_a_mapping_of_its_options() -> None:
    """Before: only ``[kernel]`` options could be given; ``test_config(supervision=...)``
    was "'supervision' is no [kernel] option", so a test of restart intensity or strategy
    had to build a whole ``Config`` and lost the test defaults."""
    config = test_config(
        mailbox_capacity=8,
        kernel={"send_timeout_ms": 7},
        supervision={"max_restarts": 1, "strategy": "one_for_all", "escalate_to_kernel": True},
        runtime={"worker_threads": 2},
        logging={"level": "DEBUG"},
        metrics={"port": 9999},
        app={"agents": 3},
        nats={"url": "nats://127.0.0.1:4222"},
    )
    assert (config.kernel.mailbox_capacity, config.kernel.send_timeout_ms) == (8, 7)
    assert config.supervision.max_restarts == 1
    assert config.supervision.strategy is RestartStrategy.ONE_FOR_ALL
    assert config.supervision.escalate_to_kernel is True
    assert config.runtime.worker_threads == 2
    assert config.logging.level == "DEBUG"
    assert config.metrics.port == 9999
    assert config.app.agents == 3
    assert config.nats.url == "nats://127.0.0.1:4222"
    # the test defaults stay under what is given
    assert config.kernel.dead_letter_buffer == 100_000
    assert (config.supervision.backoff_initial_ms, config.supervision.backoff_max_ms) == (0, 0)
    assert test_config(supervision={"backoff_max_ms": 50}).supervision.backoff_max_ms == 50


def test_test_config_says_where_an_option_of_another_section_goes() -> None:
    with pytest.raises(
        TypeError,
        match=r"^test_config: 'max_restarts' is no \[kernel\] option; it is a \[supervision\]"
        r" one: test_config\(supervision=\{'max_restarts': \.\.\.\}\)$",
    ):
        test_config(max_restarts=1)
    with pytest.raises(
        TypeError,
        match=r"^test_config: supervision= takes a mapping of \[supervision\] options"
        r" to values, got 3$",
    ):
        test_config(supervision=3)
    with pytest.raises(
        TypeError,
        match=r"^test_config: \[kernel\] 'mailbox_capacity' is given twice \(as"
        r" mailbox_capacity= and in kernel=\)$",
    ):
        test_config(mailbox_capacity=2, kernel={"mailbox_capacity": 1})
    with pytest.raises(ValueError, match="max_restarts"):
        test_config(supervision={"max_restarts": -1})


@agent(name="looper")
async def _looper(ctx: Context, msg: Message) -> None:
    await ctx.send("looper", msg.payload + 1)


_BUSY_AT_THE_END = (
    r"open_test_kernel: the kernel's tasks never all blocked within 0\.5 s of real time when"
    r" its block ended \(did an agent keep itself busy, sending to itself on every"
    r" message\?\): on a mock clock its graceful shutdown could never end, so it was shut"
    r" down at once \(grace 0\); agents with messages queued or in hand: looper \(1 queued"
)


def test_a_kernel_left_with_an_agent_that_keeps_itself_busy_shuts_down_and_says_so() -> None:
    """Before: the graceful shutdown at the end of the block (and of the ``nexus_kernel``
    fixture) waited for its grace period on a mock clock that never moved while the agent
    kept sending to itself: the test hung for good, its own failure never reported."""

    async def main() -> None:
        with real_time_limit(30), pytest.raises(AssertionError, match=_BUSY_AT_THE_END):
            async with open_test_kernel(timeout=0.5) as kernel:
                await kernel.send(kernel.spawn(_looper), 0)
        assert kernel.stopped
        assert [d.reason.value for d in kernel.recent_dead_letters()] == ["shutdown"]

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_block_that_failed_because_an_agent_kept_busy_reports_its_own_failure() -> None:
    """Before: ``settle`` said the tasks never all blocked, and the shutdown that followed
    hung for good, so pytest never showed that ``AssertionError``; now it goes on out of
    the block, with a note on the shutdown done at once."""

    kernels: list[Kernel] = []

    async def test_body() -> None:
        async with open_test_kernel(timeout=0.5) as kernel:
            kernels.append(kernel)
            await kernel.send(kernel.spawn(_looper), 0)
            await settle(timeout=0.5)

    async def main() -> None:
        with real_time_limit(30), pytest.raises(AssertionError) as info:
            await test_body()
        assert str(info.value).startswith("tasks not all blocked after 0.5 s of real time")
        notes = getattr(info.value, "__notes__", [])
        assert len(notes) == 1 and re.match(_BUSY_AT_THE_END, notes[0]), notes
        assert kernels[0].stopped

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_kernel_whose_tasks_all_block_at_the_end_still_shuts_down_gracefully() -> None:
    """The check at the end costs a graceful shutdown nothing: a message in hand finishes
    (a 3 s handler, on the mock clock) instead of being dead-lettered."""
    done: list[int] = []

    @agent(name="slow")
    async def slow(ctx: Context, msg: Message) -> None:
        await trio.sleep(3)
        done.append(msg.payload)

    async def main() -> None:
        async with open_test_kernel(timeout=0.5) as kernel:
            await kernel.send(kernel.spawn(slow), 1)
        assert done == [1]
        assert kernel.recent_dead_letters() == []

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


async def test_assert_events_of_a_name_no_event_has_says_so_and_names_those_there_are(
    nexus_kernel: Kernel, autojump_clock: Any
) -> None:
    """Before: ``events of gretter: expected ['spawned', 'started'], got []``, the same text
    as for an agent that had no event: a misspelt name looked like a missing spawn."""

    @agent(name="greeter")
    async def greeter(ctx: Context, msg: Message) -> str:
        return f"hello, {msg.payload}"

    async with record_events(nexus_kernel) as events:
        await send_and_wait(nexus_kernel, nexus_kernel.spawn(greeter), "ada")
        await send_and_wait(nexus_kernel, nexus_kernel.spawn(greeter, name="welcomer"), "bob")
    with pytest.raises(AssertionError) as info:
        assert_events(events, "gretter", ["spawned", "started"])
    assert str(info.value) == (
        "events of gretter: expected ['spawned', 'started'], got [] (no event names an agent"
        " 'gretter'; did you mean 'greeter'? the events are of: 'greeter', 'welcomer')"
    )
    with pytest.raises(AssertionError) as info:
        assert_events(events, "zzz", ["spawned"])
    assert str(info.value).endswith(
        "got [] (no event names an agent 'zzz'; the events are of: 'greeter', 'welcomer')"
    )
    # A name that has events is compared as before.
    with pytest.raises(AssertionError, match=r"^events of greeter: expected \['spawned'\], got"):
        assert_events(events, "greeter", ["spawned"])


async def test_assert_dead_lettered_given_an_exception_instance_says_it_takes_a_type(
    nexus_kernel: Kernel, autojump_clock: Any
) -> None:
    """Before: ``error=ValueError("bad")`` raised Python's ``isinstance() arg 2 must be a
    type, a tuple of types, or a union``, from inside the helper, naming no argument."""

    @agent(name="boom")
    async def boom(ctx: Context, msg: Message) -> None:
        raise ValueError("bad")

    await send_and_wait(nexus_kernel, nexus_kernel.spawn(boom), 1)
    with pytest.raises(TypeError) as info:
        assert_dead_lettered(nexus_kernel, error=ValueError("bad"))  # type: ignore[arg-type]
    assert str(info.value) == (
        "assert_dead_lettered: error must be an exception type (ValueError), not the"
        " exception ValueError('bad'); to check its text, look at the returned letter's"
        " .error"
    )
    with pytest.raises(TypeError) as info:
        assert_dead_lettered(nexus_kernel, error="ValueError")  # type: ignore[arg-type]
    assert str(info.value) == (
        "assert_dead_lettered: error must be an exception type, such as ValueError, not str"
        " 'ValueError'"
    )
    found = assert_dead_lettered(nexus_kernel, error=ValueError).error
    assert isinstance(found, ValueError) and found.args == ("bad",)


class _Pricing(Agent):
    """Asks the catalog for a price, tells the ledger the total and answers it."""

    async def handle(self, ctx: Context, msg: Message) -> int:
        price = await ctx.request("catalog", msg.payload["sku"], timeout=2.0)
        total: int = price * msg.payload["qty"]
        await ctx.send("ledger", {"sku": msg.payload["sku"], "total": total})
        return total


async def test_probes_stand_in_for_the_agents_one_agent_talks_to(
    nexus_kernel: Kernel, autojump_clock: Any
) -> None:
    """Testing one agent alone took a recording agent of one's own for each agent it talks
    to (Akka's TestKit has its TestProbe): a probe records what it receives, in order,
    answers a request with what ``answer`` makes of it, and ``expect`` waits for the
    next message, on the mock clock."""
    catalog = spawn_probe(nexus_kernel, "catalog", answer=lambda msg: {"bolt": 2}[msg.payload])
    ledger = spawn_probe(nexus_kernel, "ledger")
    pricing = nexus_kernel.spawn(_Pricing, name="pricing")

    assert await nexus_kernel.request(pricing, {"sku": "bolt", "qty": 3}) == 6
    told = await ledger.expect()
    assert told.payload == {"sku": "bolt", "total": 6}
    assert told.sender == pricing.id
    assert catalog.payloads == ["bolt"]
    assert [m.sender for m in catalog.messages] == [pricing.id]

    # The fake fails as the real one would: its error is the handler's, dead-lettered.
    with pytest.raises(RequestFailed):
        await nexus_kernel.request(pricing, {"sku": "nut", "qty": 1})
    assert catalog.payloads == ["bolt", "nut"]
    assert ledger.payloads == [{"sku": "bolt", "total": 6}]

    # Nothing more comes: expect fails after its timeout (mock clock), naming the probe
    # and what it has received.
    start = trio.current_time()
    with pytest.raises(AssertionError) as info:
        await ledger.expect(timeout=5)
    assert trio.current_time() - start == 5
    assert str(info.value) == (
        "probe 'ledger' received no message within 5 s (1 received so far, all taken by"
        " expect: [{'sku': 'bolt', 'total': 6}])"
    )
    # Probes without a name are anonymous: as many as a test needs.
    first, second = spawn_probe(nexus_kernel), spawn_probe(nexus_kernel)
    await nexus_kernel.send(first.ref, "one")
    assert (await first.expect()).payload == "one"
    assert second.messages == []
    assert first.ref.name is None


async def test_a_request_by_ref_to_an_agent_still_handling_it_names_the_agent(
    nexus_kernel: Kernel, autojump_clock: Any
) -> None:
    """Before: a test that asked by the ref ``spawn`` returned, as docs/testing.md does,
    failed with ``request ... to UUID('5b0c...') got no reply within 5s``: nothing in
    pytest's output said which agent, nor that it was still working on the query."""

    @agent(name="pondering", handle_timeout=30)
    async def pondering(ctx: Context, msg: Message) -> str:
        await trio.sleep(20)
        return "done"

    ref = nexus_kernel.spawn(pondering)
    with pytest.raises(RequestTimeout) as info:
        await nexus_kernel.request(ref, "q")
    assert str(info.value).endswith(
        f"to 'pondering' ({ref.id}) got no reply within 5s (agent pondering is still handling it:"
        " its handle_timeout is 30s)"
    )


def test_on_a_real_clock_a_kernel_with_a_busy_agent_still_shuts_down_gracefully() -> None:
    """The check of the block's end is for the mock clock, whose grace period never ends
    while a task runs: on a real clock the grace period ends by itself, and the agent
    that kept itself busy is stopped then, as in production, with no error."""

    async def main() -> None:
        with real_time_limit(30):
            async with open_test_kernel(test_config(shutdown_grace_ms=300), timeout=0.05) as k:
                await k.send(k.spawn(_looper), 0)
                await trio.sleep(0.1)
        assert k.stopped
        assert [d.reason.value for d in k.recent_dead_letters()] == ["shutdown"]

    trio.run(main)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda k: settle(timeout=-5), "settle's timeout must be > 0 seconds, got -5"),
        (lambda k: settle(timeout="5"), "settle's timeout must be a number of seconds, got '5'"),
        (
            lambda k: step_until_idle(k, timeout=float("nan")),
            "step_until_idle's timeout must be > 0 seconds, got nan",
        ),
        (
            lambda k: send_and_wait(k, "greeter", "x", timeout=0),
            "send_and_wait's timeout must be > 0 seconds, got 0",
        ),
        (
            lambda k: spawn_probe(k, "p").expect(timeout=-1),
            "expect's timeout must be >= 0 seconds, got -1",
        ),
    ],
)
async def test_a_helper_given_a_bad_timeout_says_which_helper_and_sends_nothing(
    nexus_kernel: Kernel, autojump_clock: Any, call: Any, message: str
) -> None:
    """Before: ``settle(timeout=-5)`` failed with 'tasks not all blocked after -5 s ...
    (did an agent keep itself busy ...?)', blaming the agents for a bad argument;
    ``step_until_idle(timeout=nan)`` likewise; ``probe.expect(timeout=-1)`` raised
    Trio's '`seconds` must be non-negative', naming no helper; ``send_and_wait``
    sent its message before its timeout failed."""

    @agent(name="greeter")
    async def greeter(ctx: Context, msg: Message) -> str:
        return f"hello, {msg.payload}"

    nexus_kernel.spawn(greeter)
    with pytest.raises((TypeError, ValueError)) as info:
        await call(nexus_kernel)
    assert str(info.value) == message
    assert nexus_kernel.stats().accepted == 0


async def test_open_test_kernel_refuses_a_bad_timeout_before_opening() -> None:
    """Before: ``open_test_kernel(timeout=-1)`` was accepted; the negative timeout only
    showed (as 'never all blocked within -1 s') when an agent was busy at the end."""
    with pytest.raises(
        ValueError, match=r"^open_test_kernel's timeout must be > 0 seconds, got -1$"
    ):
        async with open_test_kernel(timeout=-1):
            raise AssertionError("not opened")


async def test_settle_with_an_infinite_timeout_waits_without_a_timer(
    nexus_kernel: Kernel, autojump_clock: Any
) -> None:
    """Before: ``settle(timeout=math.inf)`` started a ``threading.Timer(inf)``, whose
    thread died with 'OverflowError: timestamp out of range for platform time_t'
    (pytest's unhandled-thread-exception warning); no timer is needed for no limit."""
    died: list[BaseException] = []
    previous = threading.excepthook
    threading.excepthook = lambda args: died.append(args.exc_value)  # type: ignore[assignment]
    try:
        await settle(timeout=math.inf)
        await step_until_idle(nexus_kernel, timeout=math.inf)
        await trio.to_thread.run_sync(lambda: None)  # (a timer thread has had its chance)
    finally:
        threading.excepthook = previous
    assert died == []


async def test_assert_events_given_one_string_names_it(
    nexus_kernel: Kernel, autojump_clock: Any
) -> None:
    """Before: ``assert_events(events, "greeter", "spawned")`` went through the string's
    letters: 'event kind must be one of ..., got 's''."""
    async with record_events(nexus_kernel) as events:
        nexus_kernel.spawn(_looper, name="idle")
    with pytest.raises(TypeError) as info:
        assert_events(events, "idle", "spawned")  # type: ignore[arg-type]
    assert str(info.value) == (
        "assert_events: the expected kinds must be a list of event kinds, got the str"
        " 'spawned' (write ['spawned'])"
    )


async def test_spawn_probe_refuses_an_answer_it_could_not_call(
    nexus_kernel: Kernel, autojump_clock: Any
) -> None:
    """Before: ``spawn_probe(kernel, "p", answer=5)`` was accepted, and every message to
    the probe then failed ("TypeError: 'int' object is not callable", dead-lettered);
    an ``async def`` answer answered a coroutine object, which is no JSON."""

    async def later(msg: Message) -> int:
        return 1

    with pytest.raises(TypeError) as info:
        spawn_probe(nexus_kernel, "p", answer=5)  # type: ignore[arg-type]
    assert str(info.value) == (
        "spawn_probe: answer must be a function of the message (answer=lambda msg: ...), got 5"
    )
    with pytest.raises(TypeError) as info:
        spawn_probe(nexus_kernel, "q", answer=later)
    assert str(info.value) == (
        "spawn_probe: answer is called, not awaited: make later a plain 'def', not an 'async def'"
    )
    assert nexus_kernel.stats().agents_alive == 0


async def test_a_probe_whose_answer_returns_a_coroutine_says_answer_is_not_awaited(
    nexus_kernel: Kernel, autojump_clock: Any
) -> None:
    """``answer=lambda msg: lookup(msg)`` around an ``async def lookup`` passes the check
    made at spawn (a lambda is a plain function); the request then failed with the
    kernel's "a missing 'await'? (write 'return await ...')", which a lambda cannot
    follow. The failure now says what ``answer`` must be."""

    async def lookup(msg: Message) -> int:
        return 1

    probe = spawn_probe(nexus_kernel, "p", answer=lambda msg: lookup(msg))
    with pytest.raises(RequestFailed):
        await nexus_kernel.request(probe.ref, "x")
    letter = assert_dead_lettered(nexus_kernel, payload="x", reason="handler_error")
    assert isinstance(letter.error, TypeError)
    assert re.fullmatch(
        r"spawn_probe: answer returned <coroutine object .*lookup at 0x[0-9a-f]+>, to be"
        r" awaited: answer is called, not awaited; give a plain function that returns the"
        r" answer itself",
        str(letter.error),
    ), letter.error
    assert probe.payloads == ["x"]


@pytest.mark.parametrize("buffer", [0, -1, 1.5])
async def test_record_events_with_a_bad_buffer_raises_the_error_itself(
    nexus_kernel: Kernel, autojump_clock: Any, buffer: Any
) -> None:
    """Before: the error came wrapped in an ExceptionGroup ('Exceptions from Trio nursery
    (1 sub-exception)'): ``pytest.raises(ValueError)`` did not catch it."""
    with pytest.raises(ValueError, match=rf"buffer must be an integer >= 1, got {buffer}$"):
        async with record_events(nexus_kernel, buffer=buffer):
            raise AssertionError("not entered")


async def test_open_test_kernel_given_a_mapping_points_to_test_config() -> None:
    """Before: ``open_test_kernel({"mailbox_capacity": 8})`` said ``open_kernel(config)
    takes a nexus_trio.Config, ...: for a file use ...load_config(path).config``, naming
    a function the test did not call and not the helper that builds a test's config."""
    with pytest.raises(TypeError) as info:
        async with open_test_kernel({"mailbox_capacity": 8}):  # type: ignore[arg-type]
            raise AssertionError("not opened")
    assert str(info.value) == (
        "open_test_kernel(config) takes a nexus_trio.Config, got dict"
        " {'mailbox_capacity': 8}: test_config(mailbox_capacity=8) builds one"
        " (test_config(supervision={...}) for another section's options)"
    )


_NO_KERNEL = " (open_test_kernel(), open_kernel() or the nexus_kernel fixture gives one)"


@pytest.mark.parametrize(
    ("helper", "call", "given"),
    [
        ("dead_letters", lambda k: dead_letters(k), "NoneType None"),
        ("assert_dead_lettered", lambda k: assert_dead_lettered(k), "NoneType None"),
        ("assert_no_dead_letters", lambda k: assert_no_dead_letters(k), "NoneType None"),
        ("assert_conserved", lambda k: assert_conserved(k), "NoneType None"),
        ("spawn_probe", lambda k: spawn_probe(k, "p"), "NoneType None"),
        ("step_until_idle", lambda k: step_until_idle(k), "NoneType None"),
        ("send_and_wait", lambda k: send_and_wait(k, "p", 1), "NoneType None"),
        ("settle", lambda k: settle("kernel"), "str 'kernel'"),
        ("record_events", lambda k: record_events(k).__aenter__(), "NoneType None"),
    ],
)
async def test_a_helper_given_no_kernel_says_which_helper_and_what_it_got(
    autojump_clock: Any, helper: str, call: Any, given: str
) -> None:
    """Regression (fifty-second pass): a helper given no kernel (``None``, a name)
    failed inside with an ``AttributeError`` naming no helper (``'NoneType' object has
    no attribute 'recent_dead_letters'``), and ``settle("kernel")`` was taken without a
    word (its kernel is optional, and was never looked at). Each says which helper and
    what it got. (Fails with main's testing.py: those AttributeErrors, and settle
    returns.)"""

    async def called() -> None:
        result = call(None)
        if hasattr(result, "__await__"):
            await result

    with pytest.raises(TypeError) as info:
        await called()
    assert (
        str(info.value) == f"{helper}: kernel must be a nexus_trio.Kernel, got {given}{_NO_KERNEL}"
    )


async def test_a_helper_given_the_kernel_block_itself_says_to_enter_it(
    autojump_clock: Any,
) -> None:
    """``assert_conserved(open_test_kernel())`` (the block, not entered) is named so, and
    ``assert_events`` given no recorder names what it takes."""
    block = open_test_kernel()
    with pytest.raises(TypeError) as info:
        assert_conserved(block)  # type: ignore[arg-type]
    assert str(info.value).startswith("assert_conserved: kernel must be a nexus_trio.Kernel, got")
    assert str(info.value).endswith(
        ": that is the block itself; use 'async with open_test_kernel() as kernel:' and pass kernel"
    )
    with pytest.raises(TypeError) as info:
        assert_events(None, None, [])  # type: ignore[arg-type]
    assert str(info.value) == (
        "assert_events: recorder must be the EventRecorder of 'async with"
        " record_events(kernel) as recorder:', got NoneType None"
    )


async def test_a_probe_waited_on_by_two_tasks_gives_each_a_message(
    nexus_kernel: Kernel, autojump_clock: Any
) -> None:
    """Regression: each ``expect`` made an event of its own to wait on, replacing the one
    another waiter was waiting on: of two tasks waiting, the message went to the second,
    and the first waited on an event no message set any more, past the second message,
    then failed saying ``(2 received so far, all taken by expect: [1, 2])``."""
    probe = spawn_probe(nexus_kernel, "probe")
    got: dict[str, Any] = {}

    async def take(task: str) -> None:
        got[task] = (await probe.expect(timeout=10)).payload

    async with trio.open_nursery() as nursery:
        nursery.start_soon(take, "first")
        await settle()
        nursery.start_soon(take, "second")
        await settle()
        await nexus_kernel.send(probe.ref, 1)
        await settle()
        await nexus_kernel.send(probe.ref, 2)
    assert sorted(got.values()) == [1, 2]
    assert trio.current_time() == 0  # neither waited out its timeout


async def test_tasks_waiting_on_a_probe_get_its_messages_in_the_order_they_began_to_wait(
    nexus_kernel: Kernel, autojump_clock: Any
) -> None:
    """Regression: every waiter was woken by a message and the first that Trio ran took
    it (Trio runs a batch of woken tasks in either order), so of three tasks waiting the
    first message went to the first or the last, at random: ``{'t0': 3, 't1': 2, 't2':
    1}`` in some rounds. Served first come, first served now, as Trio's ``Lock`` and
    memory channels serve theirs: 20 rounds, each in order."""
    probe = spawn_probe(nexus_kernel, "probe")
    got: dict[str, Any] = {}

    async def take(task: str) -> None:
        got[task] = (await probe.expect(timeout=10)).payload

    for round_ in range(20):
        got.clear()
        async with trio.open_nursery() as nursery:
            for task in ("t0", "t1", "t2"):
                nursery.start_soon(take, task)
                await settle()  # (each waits before the next begins to)
            for n in (1, 2, 3):
                nexus_kernel.send_nowait(probe.ref, n)
        assert got == {"t0": 1, "t1": 2, "t2": 3}, round_
    assert trio.current_time() == 0  # none waited out its timeout


async def test_a_probe_waiter_that_gave_up_takes_no_message(
    nexus_kernel: Kernel, autojump_clock: Any
) -> None:
    """A waiter that timed out, or was cancelled, leaves the queue of waiters: the next
    message goes to one still waiting, or to the next ``expect``, not to the one gone."""
    probe = spawn_probe(nexus_kernel, "probe")
    got: dict[str, Any] = {}

    async def take(task: str, timeout: float) -> None:
        try:
            got[task] = (await probe.expect(timeout=timeout)).payload
        except AssertionError as exc:
            got[task] = str(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(take, "short", 1)
        await settle()
        nursery.start_soon(take, "long", 10)
        await settle()
        with trio.move_on_after(0.5):
            await probe.expect(timeout=10)  # cancelled from outside, at 0.5 s
        await trio.sleep(2)  # "short" times out at 1 s
        nexus_kernel.send_nowait(probe.ref, 1)
    assert got == {
        "short": "probe 'probe' received no message within 1 s (0 received so far, all"
        " taken by expect: [])",
        "long": 1,
    }
    nexus_kernel.send_nowait(probe.ref, 2)
    assert (await probe.expect()).payload == 2


async def test_a_probe_waiter_cancelled_as_a_message_is_handed_to_it_loses_no_message(
    nexus_kernel: Kernel, autojump_clock: Any
) -> None:
    """Regression: a waiter whose cancel came (from a scope around its ``expect``) before
    its task ran again stayed first in the queue of waiters, and the next message was
    handed to it: its task then left with the cancel, the message counted as taken by
    nobody, and the next ``expect`` waited out its timeout (``probe 'probe' received no
    message within 3 s (2 received so far, all taken by expect: [1, 2])``). A waiter
    leaves the queue as its cancel comes, as a task waiting on a Trio memory channel
    does: the message goes to the next waiter or the next ``expect``."""
    scopes: dict[str, trio.CancelScope] = {}
    got: dict[str, Any] = {}

    def cancel_t1(msg: Message) -> None:
        if msg.payload == 1:
            # (the probe's handler: the next message, 2, comes in the same batch, before
            # t1's task runs again)
            scopes["t1"].cancel()

    probe = spawn_probe(nexus_kernel, "probe", answer=cancel_t1)

    async def take(task: str) -> None:
        with trio.CancelScope() as scopes[task]:
            got[task] = (await probe.expect(timeout=10)).payload
            return
        got[task] = "cancelled"

    async with trio.open_nursery() as nursery:
        for task in ("t0", "t1"):
            nursery.start_soon(take, task)
            await settle()  # (each waits before the next begins to)
        nexus_kernel.send_nowait(probe.ref, 1)
        nexus_kernel.send_nowait(probe.ref, 2)
    assert got == {"t0": 1, "t1": "cancelled"}
    assert probe.payloads == [1, 2]
    assert (await probe.expect(timeout=3)).payload == 2
    assert trio.current_time() == 0  # none waited out its timeout


async def test_record_events_on_a_stopped_kernel_says_so(autojump_clock: Any) -> None:
    """Regression: ``record_events`` on a kernel whose shutdown was over gave an empty
    recorder without a word, and ``assert_events(events, "x", [])`` passed for anything.
    Now a ``RuntimeError`` says the kernel stopped; during the shutdown it still records
    (the stops are events)."""

    @agent(name="quiet")
    async def quiet(ctx: Context, msg: Message) -> None:
        return None

    async with open_test_kernel() as kernel:
        kernel.spawn(quiet)
    assert kernel.stopped
    with pytest.raises(RuntimeError) as caught:
        async with record_events(kernel):
            pass
    assert str(caught.value) == (
        "record_events: the kernel has stopped (its shutdown is over): no event can come"
        " any more, and the events of its run were not kept; open 'async with"
        " record_events(kernel) as events:' inside the kernel's block, before what it"
        " should record"
    )
    async with open_test_kernel() as kernel:
        kernel.spawn(quiet)
        async with record_events(kernel) as events:
            await kernel.shutdown()
    assert events.kinds("quiet") == [EventKind.STOPPED]


async def test_the_dead_letter_assertions_say_when_the_kernel_let_older_letters_go(
    autojump_clock: Any,
) -> None:
    """Regression: the helpers look at the ring of recent dead letters, which keeps the
    last ``[kernel] dead_letter_buffer``: with more, ``assert_dead_lettered`` said ``no dead
    letter with payload=0`` of a message that was dead-lettered, and
    ``assert_no_dead_letters`` ``got 2`` of 4, as if the others had never been."""

    @agent(name="bad")
    async def bad(ctx: Context, msg: Message) -> None:
        raise ValueError(msg.payload)

    async with open_test_kernel(test_config(dead_letter_buffer=2)) as kernel:
        ref = kernel.spawn(bad)
        for n in range(4):
            await send_and_wait(kernel, ref, n)
        assert [d.message.payload for d in dead_letters(kernel)] == [2, 3]
        assert kernel.stats().dead_lettered == 4
        kept = "[('handler_error', 2, 'ValueError(2)'), ('handler_error', 3, 'ValueError(3)')]"
        with pytest.raises(AssertionError) as info:
            assert_dead_lettered(kernel, payload=0)
        assert str(info.value) == (
            "no dead letter with payload=0 among the last 2 of 4 (the kernel keeps the last"
            " [kernel] dead_letter_buffer: the 2 before them were let go, not looked at);"
            f" dead letters: {kept}"
        )
        with pytest.raises(AssertionError) as info:
            assert_no_dead_letters(kernel)
        assert str(info.value) == (
            "expected no dead letters, got 4 (the last 2 shown: the kernel keeps the last"
            f" [kernel] dead_letter_buffer): {kept}"
        )
        # What the ring holds is found as before.
        assert assert_dead_lettered(kernel, payload=3).message.payload == 3


async def test_a_record_events_block_cancelled_from_outside_keeps_what_came_within_it(
    nexus_kernel: Kernel, autojump_clock: Any
) -> None:
    """Regression: the block's end awaited all tasks blocked before taking what the stream
    held; in a block cancelled from outside (a ``move_on_after`` around it, a cancelled
    scope) that ``await`` raised at once, and the events not collected yet were lost,
    not counted in ``dropped``: here all three, ``[]`` with ``dropped == 0``."""

    @agent
    async def idle(ctx: Context, msg: Message) -> None:
        return None

    with trio.CancelScope() as scope:
        async with record_events(nexus_kernel) as events:
            for name in ("a", "b", "c"):
                nexus_kernel.spawn(idle, name=name)
            scope.cancel()
            await trio.sleep_forever()
    assert [(e.name, e.kind.value) for e in events.events] == [
        ("a", "spawned"),
        ("b", "spawned"),
        ("c", "spawned"),
    ]
    assert events.dropped == 0
    assert_events(events, None, ["spawned", "spawned", "spawned"])


async def test_assert_events_inside_the_block_fails_once_the_recorder_missed_events(
    nexus_kernel: Kernel, autojump_clock: Any
) -> None:
    """Regression: ``dropped`` was set only when the ``record_events`` block ended, so an
    ``assert_events`` inside it (as docs/testing.md's lazy-agent example does) compared
    what the recorder kept, and passed: ten spawns into a buffer of 2 passed as
    ``["spawned", "spawned"]``, ``dropped == 0`` until the block ended with 8."""

    @agent
    async def idle(ctx: Context, msg: Message) -> None:
        return None

    async with record_events(nexus_kernel, buffer=2) as events:
        for n in range(10):
            nexus_kernel.spawn(idle, name=f"a{n}")
        await settle()
        assert len(events.events) == 2
        assert events.dropped == 8
        with pytest.raises(AssertionError, match="the recorder missed 8 events"):
            assert_events(events, None, ["spawned", "spawned"])
    assert events.dropped == 8


def test_step_until_idle_on_the_mock_clock_says_process_agents_run_in_real_time() -> None:
    """A process agent on the ``autojump_clock``: the clock jumps while the child process
    works, and ``step_until_idle`` failed saying its timeout counted mock seconds, so a
    larger ``timeout=`` was needed, e.g. 3600, which does not help (the clock jumps past
    any). It now names the process agents and says to test them on a real clock."""
    example = str(Path(__file__).resolve().parent.parent / "examples" / "python_agent_example.py")

    async def main() -> None:
        with real_time_limit(60):
            async with open_test_kernel() as kernel:
                kernel.spawn(process_agent([sys.executable, example], name="calc"))
                await kernel.send("calc", {"operation": "add", "a": 1, "b": 2})
                with pytest.raises(AssertionError) as info:
                    await step_until_idle(kernel, timeout=5)
        message = str(info.value)
        assert "1 message(s) still in flight" in message
        assert (
            "(process agents 'calc' work in real time, which a mock clock that jumps does not"
            " wait for" in message
        )
        assert "e.g. timeout=3600" not in message

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_step_until_idle_names_process_agents_only_when_they_hold_the_messages() -> None:
    """Regression: with any live process agent, ``step_until_idle`` on the mock clock said
    that no ``timeout=`` helps, also when the message in flight was another agent's, a
    handler sleeping an hour, for which ``timeout=3600`` is the answer: the process agent,
    idle, is now named only when it holds a message (queued or in hand)."""
    example = str(Path(__file__).resolve().parent.parent / "examples" / "python_agent_example.py")

    @agent(name="sleepy")
    async def sleepy(ctx: Context, msg: Message) -> None:
        await trio.sleep(3600)

    async def main() -> None:
        with real_time_limit(60):
            async with open_test_kernel() as kernel:
                kernel.spawn(process_agent([sys.executable, example], name="calc"))
                kernel.spawn(sleepy)
                await kernel.send("sleepy", 1)
                with pytest.raises(AssertionError) as info:
                    await step_until_idle(kernel, timeout=5)
                await kernel.shutdown(0)
        message = str(info.value)
        assert "1 message(s) still in flight, being handled by 'sleepy'" in message
        assert "e.g. timeout=3600" in message
        assert "process agents" not in message

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


async def test_an_error_in_a_record_events_block_goes_out_as_it_is(
    nexus_kernel: Kernel, autojump_clock: Any
) -> None:
    """Regression: the block runs in the nursery of the task that collects the events, and
    its error went out in that nursery's group, ``ExceptionGroup('Exceptions from Trio
    nursery', [AssertionError('boom')])``: a ``pytest.raises(AssertionError)`` or an
    ``except AssertionError`` around the block did not take it (``open_kernel``'s block
    raises its error as it is). The events of the block are kept."""

    @agent
    async def idle(ctx: Context, msg: Message) -> None:
        return None

    recorders: list[EventRecorder] = []

    async def block() -> None:
        async with record_events(nexus_kernel) as events:
            recorders.append(events)
            nexus_kernel.spawn(idle, name="a")
            raise AssertionError("boom")

    with pytest.raises(AssertionError) as info:
        await block()
    assert type(info.value) is AssertionError
    assert str(info.value) == "boom"
    assert info.value.__context__ is None
    assert [(e.name, e.kind.value) for e in recorders[0].events] == [("a", "spawned")]
