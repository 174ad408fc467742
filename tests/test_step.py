"""How the serve loop steps handlers (nexus_trio._step): a return, a raise and a suspension,
and agents that suspend while others share the kernel's stepper."""

from __future__ import annotations

import functools
import itertools
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing

from nexus_trio import Context, Message, MessageFailed, agent, open_kernel
from nexus_trio._mailbox import Mailbox
from nexus_trio._step import DONE, FAILED, Stepper, resume, unprotect

from .conftest import make_config


async def returns(value: Any) -> Any:
    return value


async def raises(exc: BaseException) -> None:
    raise exc


def test_a_handler_that_returns_gives_done_and_its_result() -> None:
    stepper = Stepper()
    for value in (None, 7, {"a": 1}):
        assert stepper.send(returns(value)) is DONE
        assert stepper.box[0] == value


def test_a_handler_that_raises_gives_failed_and_the_stepper_goes_on() -> None:
    stepper = Stepper()
    error = ValueError("boom")
    assert stepper.send(raises(error)) is FAILED
    assert stepper.failure() is error
    assert stepper.box[1] is None  # forgotten: not kept alive until the next failure
    assert stepper.send(returns(3)) is DONE and stepper.box[0] == 3
    # a BaseException too (the loop re-raises it where it stepped the handler)
    assert stepper.send(raises(KeyboardInterrupt())) is FAILED
    assert isinstance(stepper.failure(), KeyboardInterrupt)
    assert stepper.send(returns(4)) is DONE and stepper.box[0] == 4


def test_an_exception_that_arrives_while_the_stepper_waits_is_reported_and_it_lives_on() -> None:
    """A KeyboardInterrupt raised by Trio's signal handler as the shared stepper resumes
    (simulated with throw()) is that step's failure; the stepper must not die with it, or
    every later handler of the kernel would fail."""
    stepper = Stepper()
    assert stepper.throw(KeyboardInterrupt()) is FAILED
    assert isinstance(stepper.failure(), KeyboardInterrupt)
    assert stepper.send(returns(2)) is DONE and stepper.box[0] == 2


async def test_a_suspended_handler_is_driven_to_its_result_or_its_error() -> None:
    async def sleeps_then(value: Any) -> Any:
        await trio.lowlevel.checkpoint()
        await trio.lowlevel.checkpoint()
        if isinstance(value, BaseException):
            raise value
        return value

    stepper = Stepper()
    trap = stepper.send(sleeps_then(5))
    assert trap is not DONE and trap is not FAILED
    assert await resume(stepper, trap) == 5
    # the stepper is idle again after its handler ended
    assert stepper.send(returns(6)) is DONE and stepper.box[0] == 6
    trap = stepper.send(sleeps_then(LookupError("late")))
    with pytest.raises(LookupError, match="late"):
        await resume(stepper, trap)
    assert stepper.box[1] is None


async def test_a_cancellation_thrown_into_a_suspended_handler_comes_out_of_resume() -> None:
    seen: list[str] = []

    async def waits_forever() -> None:
        try:
            await trio.sleep_forever()
        finally:
            seen.append("unwound")

    stepper = Stepper()
    with trio.CancelScope() as scope:
        trap = stepper.send(waits_forever())
        scope.cancel()
        await resume(stepper, trap)
    assert scope.cancelled_caught and seen == ["unwound"]
    assert stepper.send(returns(1)) is DONE


async def test_agents_that_suspend_and_agents_that_do_not_share_one_kernel_correctly() -> None:
    """Handlers that suspend take the kernel's stepper with them; handlers that return at
    once, in other agents meanwhile, get the new one: every result reaches its requester."""
    release = trio.Event()

    @agent(name="slow", handle_timeout=1000.0)
    async def slow(ctx: Context, msg: Message) -> Any:
        await release.wait()
        return ("slow", msg.payload)

    @agent(name="fast")
    async def fast(ctx: Context, msg: Message) -> Any:
        if msg.payload == "fail":
            raise RuntimeError("on purpose")
        return ("fast", msg.payload)

    results: dict[tuple[str, int], Any] = {}
    async with open_kernel(make_config()) as kernel:
        kernel.spawn(slow)
        kernel.spawn(fast)

        async def ask(name: str, i: int) -> None:
            results[(name, i)] = await kernel.request(name, i, timeout=1000.0)

        async with trio.open_nursery() as nursery:
            for i in range(3):
                nursery.start_soon(ask, "slow", i)
            await trio.testing.wait_all_tasks_blocked()
            for i in range(50):
                nursery.start_soon(ask, "fast", i)
                kernel.send_nowait("fast", "fail")
            await trio.testing.wait_all_tasks_blocked()
            assert len(results) == 50  # the fast ones, while the slow one waits
            release.set()
        stats = kernel.stats()
    assert results == {
        **{("slow", i): ("slow", i) for i in range(3)},
        **{("fast", i): ("fast", i) for i in range(50)},
    }
    assert stats.handled == 53
    assert stats.dead_lettered == 50  # the fifty that raised


async def test_a_reply_racing_its_requests_deadline_is_returned_or_counted(
    autojump_clock: Any,
) -> None:
    """Handlers that answer at the very instant their request's deadline passes: whichever
    of the two the scheduler runs first, no reply is lost between the requester's wake-up
    and its resumption, and every message is accounted for."""
    from nexus_trio import DeadLetterReason, RequestTimeout

    @agent(handle_timeout=1000.0)
    async def exactly_late(ctx: Context, msg: Message) -> Any:
        await trio.sleep(msg.payload)
        return msg.payload

    answered = timed_out = 0
    async with open_kernel(make_config()) as kernel:
        refs = [kernel.spawn(exactly_late) for _ in range(40)]

        async def ask(ref: Any) -> None:
            nonlocal answered, timed_out
            try:
                assert await kernel.request(ref, 5.0, timeout=5.0) == 5.0
                answered += 1
            except RequestTimeout:
                timed_out += 1

        async with trio.open_nursery() as nursery:
            for ref in refs:
                nursery.start_soon(ask, ref)
        await trio.testing.wait_all_tasks_blocked()
        stats = kernel.stats()
        late = [d for d in kernel.recent_dead_letters() if d.reason is DeadLetterReason.LATE_REPLY]
        expired = [
            d for d in kernel.recent_dead_letters() if d.reason is DeadLetterReason.REQUEST_TIMEOUT
        ]
    assert answered + timed_out == 40
    # The timer and the handlers wake in the same batch (both at t=5): a reply that comes
    # after the deadline woke its requester but before it resumed is the answer it gets
    # (it was counted as delivered). Most requests here see the timer first.
    assert answered == 40
    assert stats.replies_delivered == answered
    # a timed-out request's handler was cancelled (its query dead-lettered) or its reply came
    # late (dead-lettered): one or the other, never nothing
    assert len(late) + len(expired) == timed_out
    assert (
        stats.accepted
        == stats.handled + stats.replies_delivered + stats.dead_lettered + stats.in_flight
    )
    assert stats.in_flight == 0


async def test_unprotect_marks_the_code_a_handler_runs_whatever_wraps_it() -> None:
    """The serve loop is protected from KeyboardInterrupt; a handler it calls (a function,
    a method, either behind functools.partial) must not be, nor what the handler calls."""

    @trio.lowlevel.enable_ki_protection
    def kernel_side(call: Any) -> bool:
        result: bool = call()
        return result

    def helper() -> bool:
        return trio.lowlevel.currently_ki_protected()

    def function() -> bool:
        return helper()

    class Behaviour:
        def method(self) -> bool:
            return trio.lowlevel.currently_ki_protected()

    def partial_target(flag: bool) -> bool:
        return trio.lowlevel.currently_ki_protected()

    handlers = [function, Behaviour().method, functools.partial(partial_target, True)]
    assert [kernel_side(h) for h in handlers] == [True, True, True]
    for handler in handlers:
        unprotect(handler)
    assert [kernel_side(h) for h in handlers] == [False, False, False]
    unprotect(len)  # no code of its own to mark: nothing happens


async def test_a_batch_is_batch_size_messages_whatever_its_handlers_do() -> None:
    """The kernel's stepper runs a serve loop's batch itself and comes back to it for a
    handler that returned something, raised or suspended: the batch goes on where it
    was, and the agent yields after exactly ``batch_size`` messages, however they ended
    (steps of the agent's task are counted: a handler that suspends adds its own)."""
    from .task_steps import TaskSteps

    steps: TaskSteps | None = None
    spans: list[tuple[int, int]] = []
    kinds = ["none", "value", "raise", "suspend", "none", "fail", "none", "value", "suspend"]
    kinds += ["none"] * 5 + ["raise", "value", "none"]

    @agent(name="mixed", on_error="resume", handle_timeout=1000.0)
    async def mixed(ctx: Context, msg: Message) -> Any:
        nonlocal steps
        if steps is None:
            steps = TaskSteps(trio.lowlevel.current_task())
            trio.lowlevel.add_instrument(steps)
        entered = steps.count
        kind = "none" if msg.payload == "first" else kinds[msg.payload]
        try:
            if kind == "suspend":
                await trio.lowlevel.checkpoint()
            elif kind == "raise":
                raise LookupError(msg.payload)
            elif kind == "fail":
                raise MessageFailed("on purpose")
            elif kind == "value":
                return msg.payload
            return None
        finally:
            spans.append((entered, steps.count))

    async with open_kernel(make_config(batch_size=4)) as kernel:
        kernel.spawn(mixed)
        kernel.send_nowait("mixed", "first")  # started and parked with its instrument on
        await trio.testing.wait_all_tasks_blocked()
        spans.clear()
        for i in range(len(kinds)):
            kernel.send_nowait("mixed", i)
        await trio.testing.wait_all_tasks_blocked()
        stats = kernel.stats()
        assert steps is not None
        trio.lowlevel.remove_instrument(steps)
    # a new batch where a message starts in a later step than the last one ended
    sizes = [1]
    for (_, ended), (entered, _) in itertools.pairwise(spans):
        if entered > ended:
            sizes.append(1)
        else:
            sizes[-1] += 1
    assert sizes == [4, 4, 4, 4, 1]
    assert stats.handled == 1 + len(kinds) - 3  # the first, and all but the three that failed
    assert stats.failed == 3


async def test_an_error_of_the_kernel_s_stepper_itself_ends_that_run_not_the_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The kernel's stepper runs the bookkeeping of a batch too (takes, counts, samples):
    an error there is no handler's, and it ends the generator. The run it served fails
    with it (and is restarted); the kernel gets a new stepper, or every handler after it,
    in any agent, would fail (``StopIteration`` from the spent generator)."""
    from nexus_trio._ledger import Ledger

    record = Ledger.record_latency
    broken = [True]

    def record_once_broken(
        self: Ledger, start: float, msg: Message, begun: int | None = None
    ) -> None:
        if broken[0]:
            broken[0] = False
            raise RuntimeError("the latency record broke")
        record(self, start, msg, begun)

    monkeypatch.setattr(Ledger, "record_latency", record_once_broken)
    got: list[tuple[str, Any]] = []

    async def handle(ctx: Context, msg: Message) -> Any:
        got.append((ctx.name or "", msg.payload))
        return msg.payload

    async with open_kernel(make_config()) as kernel:
        first = kernel.spawn(agent(handle, name="first"))
        others = [kernel.spawn(agent(handle, name=f"other{i}")) for i in range(3)]
        kernel.send_nowait(first, "sampled")  # the kernel's first message: sampled
        await trio.testing.wait_all_tasks_blocked()
        assert not broken[0]
        for i, ref in enumerate(others):
            assert await kernel.request(ref, i, timeout=1000.0) == i
        assert await kernel.request(first, "again", timeout=1000.0) == "again"
        stats = kernel.stats()
    assert got == [
        ("first", "sampled"),
        ("other0", 0),
        ("other1", 1),
        ("other2", 2),
        ("first", "again"),
    ]
    assert stats.run_failures == 1 and stats.restarts == 1
    assert stats.failed == 0  # no handler failed


async def test_an_agent_woken_for_one_query_takes_one_step_of_the_kernel_s_stepper(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A query handled and answered with nothing else queued parks its agent at once: the
    serve loop does not step the kernel's stepper again only to find the mailbox empty
    (two steps a request cost the request/reply row about 9% of its p50)."""
    steps = _count_steps(monkeypatch)

    async def echo(ctx: Context, msg: Message) -> Any:
        return msg.payload if msg.payload >= 0 else None  # (tells: negative, no answer)

    async with open_kernel(make_config()) as kernel:
        # (the kernel's stepper is made with the kernel: counted from the start)
        ref = kernel.spawn(agent(echo, name="echo"))
        answers = [await kernel.request(ref, i, timeout=1000.0) for i in range(10)]
        for i in range(3):  # queued together: one step takes all three
            kernel.send_nowait(ref, -1 - i)
        await trio.testing.wait_all_tasks_blocked()
        stats = kernel.stats()
        taken = steps.count("echo")  # (the shutdown wakes it for one more)
    assert answers == list(range(10))
    assert stats.handled == 13 and stats.dead_lettered == 0
    assert taken == 10 + 1


async def test_queries_queued_together_are_answered_in_one_step_of_the_kernel_s_stepper(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The kernel's stepper gives a handler's answer itself (a local request's answer
    resolves it without waiting) and its batch goes on: five requests queued together
    are one step (five when each answer handed the step back to the serve loop), and
    each requester gets its own answer."""
    steps = _count_steps(monkeypatch)
    handled: list[int] = []

    async def tens(ctx: Context, msg: Message) -> Any:
        handled.append(msg.payload)
        return msg.payload * 10

    answers: dict[int, int] = {}
    async with open_kernel(make_config()) as kernel:
        ref = kernel.spawn(agent(tens, name="tens"))
        await trio.testing.wait_all_tasks_blocked()

        async def ask(i: int) -> None:
            answers[i] = await kernel.request(ref, i, timeout=1000.0)

        # (the requesters all run before the agent: the first query wakes it, the
        # others are queued behind it)
        async with trio.open_nursery() as nursery:
            for i in range(5):
                nursery.start_soon(ask, i)
        stats = kernel.stats()
        taken = steps.count("tens")  # (the shutdown wakes it for one more)
    assert answers == {i: 10 * i for i in range(5)}
    assert sorted(handled) == list(range(5))
    assert stats.handled == 5 and stats.dead_lettered == 0 and stats.in_flight == 0
    assert taken == 1


def _count_steps(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the agents the kernel's stepper takes a step for, in order (a
    stepper made after this call counts)."""
    import nexus_trio._cell as cell_module

    original = cell_module._serve_batches
    steps: list[str] = []

    def counting(*bound: Any) -> Any:  # (the kernel's router, ledger, batch size; the box)
        inner = original(*bound)
        outcome = inner.send(None)
        while True:
            try:
                args = yield outcome
            except GeneratorExit:
                inner.close()
                raise
            except BaseException as exc:
                outcome = inner.throw(exc)
                continue
            if type(args) is tuple and len(args) == 6:
                steps.append(args[0].name)
            outcome = inner.send(args)

    monkeypatch.setattr(cell_module, "_serve_batches", counting)
    return steps


async def test_a_returned_tell_is_routed_inside_the_step_and_the_batch_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A handler that returns a tell (a ring's next hop) has it routed by the kernel's
    stepper when it needs no wait, and the batch goes on: a ring agent woken for one hop
    takes one step, and a batch of tells that each return one is one step (handing each
    returned tell back to the serve loop to route cost the ring a sixth of its hops)."""
    steps = _count_steps(monkeypatch)
    got: list[int] = []

    async def sink(ctx: Context, msg: Message) -> None:
        got.append(msg.payload)

    async def relay(ctx: Context, msg: Message) -> Any:
        return Message(sender=ctx.id, to="sink", payload=msg.payload)

    async def ring(ctx: Context, msg: Message) -> Any:
        if msg.payload <= 1:
            return None
        nxt = "ring1" if ctx.name == "ring0" else "ring0"
        return Message(sender=ctx.id, to=nxt, payload=msg.payload - 1)

    async with open_kernel(make_config(batch_size=8)) as kernel:
        kernel.spawn(agent(sink, name="sink"))
        kernel.spawn(agent(relay, name="relay"))
        for i in range(2):
            kernel.spawn(agent(ring, name=f"ring{i}"))
        for i in range(5):  # queued together: one step routes all five
            kernel.send_nowait("relay", i)
        await trio.testing.wait_all_tasks_blocked()
        kernel.send_nowait("ring0", 10)  # ten hops, one a wake-up
        await trio.testing.wait_all_tasks_blocked()
        stats = kernel.stats()
        taken = {name: steps.count(name) for name in ("relay", "sink", "ring0", "ring1")}
    assert got == [0, 1, 2, 3, 4]
    assert stats.handled == 5 + 5 + 10 and stats.dead_lettered == 0
    assert stats.accepted == 5 + 5 + 1 + 9  # (sent, and returned: counted as routed)
    assert taken == {"relay": 1, "sink": 1, "ring0": 5, "ring1": 5}


@pytest.mark.parametrize("policy", ["block", "reject", "drop_newest", "drop_oldest"])
async def test_a_returned_tell_to_a_full_mailbox_keeps_its_overflow_policy(
    policy: str,
) -> None:
    """A returned tell the stepper cannot deliver at once (the recipient's mailbox is
    full) is routed by the serve loop as before: ``block`` waits for room (the tells
    arrive in order), the others apply their policy, each dead letter counted."""
    from nexus_trio import OverflowPolicy

    release = trio.Event()
    got: list[int] = []

    async def slow(ctx: Context, msg: Message) -> None:
        await release.wait()
        got.append(msg.payload)

    async def relay(ctx: Context, msg: Message) -> Any:
        return Message(sender=ctx.id, to="slow", payload=msg.payload)

    clock = trio.testing.MockClock(autojump_threshold=0)
    async with open_kernel(make_config(send_timeout_ms=1e6, handle_timeout_ms=5e6)) as kernel:
        kernel.spawn(agent(slow, name="slow", mailbox_capacity=2, overflow=OverflowPolicy(policy)))
        kernel.spawn(agent(relay, name="relay"))
        for i in range(5):
            kernel.send_nowait("relay", i)
        await trio.testing.wait_all_tasks_blocked()
        release.set()
        await trio.testing.wait_all_tasks_blocked()
        stats = kernel.stats()
    del clock
    # the relay's one step routes all five before the slow agent runs: two fill its mailbox
    expected = {
        "block": ([0, 1, 2, 3, 4], 0),
        "reject": ([0, 1], 3),
        "drop_newest": ([0, 1], 3),
        "drop_oldest": ([3, 4], 3),
    }[policy]
    assert (got, stats.dead_lettered) == expected
    assert stats.handled == 5 + len(got)


async def test_a_batch_taken_after_a_waiting_producer_was_admitted_counts_the_buffer_once(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel's stepper takes a batch from a full mailbox while a producer waits in
    Trio's FIFO (as a transport's tell parked behind a full mailbox does): the first take
    admits it and counts the buffer; the takes after it, until the producer resumes
    (after the batch), need no count: ``recount`` is called once, not once a message
    (eight times before), and the depths, the order and the handled count are kept."""
    calls = 0
    original = Mailbox.recount

    def counting(self: Mailbox) -> None:
        nonlocal calls
        calls += 1
        original(self)

    monkeypatch.setattr(Mailbox, "recount", counting)
    gate = trio.Event()
    seen: list[int] = []
    depths: list[int] = []

    async with open_kernel(make_config(mailbox_capacity=8)) as kernel:

        @agent(name="slow")
        async def slow(ctx: Context, msg: Message) -> None:
            if msg.payload == 0:
                await gate.wait()
            seen.append(msg.payload)
            depths.append(kernel.mailbox_depth("slow"))

        ref = kernel.spawn(slow)
        await kernel.send(ref, 0)
        await trio.testing.wait_all_tasks_blocked()  # handling 0, its mailbox empty
        for i in range(1, 9):
            kernel.send_nowait(ref, i)
        assert kernel.mailbox_depth(ref) == 8
        async with trio.open_nursery() as nursery:
            nursery.start_soon(kernel.send, ref, 9)  # no room: waits in Trio's FIFO
            await trio.testing.wait_all_tasks_blocked()
            assert (seen, calls) == ([], 0)
            gate.set()
        await trio.testing.wait_all_tasks_blocked()
        assert seen == list(range(10))
        # 1 taken admits 9 (still eight queued), then one fewer each
        assert depths == [8, 8, 7, 6, 5, 4, 3, 2, 1, 0]
        assert calls == 1
        assert kernel.mailbox_depth(ref) == 0
        assert kernel.stats().handled == 10
