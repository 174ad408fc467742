"""Regressions for races between a task that was woken, or waits with a message, and a
cancel or clean-up that comes in the same tick, and between stops, restarts and links in
the supervision tree (found by review in the twelfth pass).

Trio wakes a task by rescheduling it; the task runs later in the tick. A memory channel
moves a blocked sender's message into the buffer as it wakes the sender, and a handler
that was woken finishes even if its cancel scope is cancelled before it runs again. Every
test runs on a ``MockClock(autojump_threshold=0)`` and acts at the precise moment from
inside a handler or between two ``wait_all_tasks_blocked``.
"""

from __future__ import annotations

import uuid
from typing import Any

import trio
import trio.testing

from nexus_trio import (
    Agent,
    Backoff,
    Context,
    DeadLetterReason,
    EventKind,
    KernelPhase,
    Message,
    MessageKind,
    Supervisor,
    agent,
    open_kernel,
)
from nexus_trio._message import Address
from nexus_trio.testing import assert_conserved, dead_letters, record_events

from .conftest import make_config, timed_shutdown


def _letters(kernel: Any) -> list[tuple[Any, DeadLetterReason]]:
    return [(d.message.payload, d.reason) for d in dead_letters(kernel)]


# --- a handler's returned message, waiting for room, when its agent is cancelled ---------


async def test_a_returned_message_waiting_for_room_when_its_agent_is_stopped_is_dead_lettered(
    autojump_clock: Any,
) -> None:
    """Regression: a handler returned a ``Message`` for a full ``block`` mailbox, and its
    agent was stopped (past its ``shutdown_timeout``) while the message waited for room.
    The cancelled wait enqueued nothing, and ``Router.route`` let the ``Cancelled`` through
    without a dead letter: the message vanished, uncounted."""
    release = trio.Event()
    got: list[Any] = []

    @agent(name="b", mailbox_capacity=1, handle_timeout=1000.0)
    async def b(ctx: Context, msg: Message) -> None:
        await release.wait()
        got.append(msg.payload)

    @agent(name="a", shutdown_timeout=1.0)
    async def a(ctx: Context, msg: Message) -> Message:
        return Message(ctx.id, "b", "out")

    async with open_kernel(make_config(send_timeout_ms=60_000)) as kernel:
        kernel.spawn(b)
        a_ref = kernel.spawn(a)
        await kernel.send("b", "b0")
        await trio.testing.wait_all_tasks_blocked()
        await kernel.send("b", "b1")  # b's mailbox is full now
        await kernel.send(a_ref, "go")
        await trio.testing.wait_all_tasks_blocked()
        assert kernel.mailbox_statistics("b").producers_waiting == 1  # a's route waits
        await kernel.stop(a_ref)  # a's run is cancelled after 1 s
        release.set()
        await trio.testing.wait_all_tasks_blocked()
        assert got == ["b0", "b1"]
        assert _letters(kernel) == [("out", DeadLetterReason.MAILBOX_FULL)]
        assert "its sender stopped waiting" in dead_letters(kernel)[0].detail
        assert_conserved(kernel)


async def test_a_returned_message_waiting_for_room_at_the_end_of_the_grace_is_dead_lettered(
    autojump_clock: Any,
) -> None:
    """The same wait, ended by the shutdown: the grace period passes while the message
    waits and the tree stop cancels the run; it is dead-lettered ``shutdown``."""

    @agent(name="b", mailbox_capacity=1, handle_timeout=1000.0)
    async def b(ctx: Context, msg: Message) -> None:
        await trio.sleep_forever()

    @agent(name="a")
    async def a(ctx: Context, msg: Message) -> Message:
        return Message(ctx.id, "b", "out")

    config = make_config(send_timeout_ms=60_000, shutdown_grace_ms=1000)
    async with open_kernel(config) as kernel:
        kernel.spawn(b)
        a_ref = kernel.spawn(a)
        await kernel.send("b", "b0")
        await trio.testing.wait_all_tasks_blocked()
        await kernel.send("b", "b1")
        await kernel.send(a_ref, "go")
        await trio.testing.wait_all_tasks_blocked()
        assert kernel.mailbox_statistics("b").producers_waiting == 1
    assert sorted(_letters(kernel), key=str) == [
        ("b0", DeadLetterReason.SHUTDOWN),
        ("b1", DeadLetterReason.SHUTDOWN),
        ("out", DeadLetterReason.SHUTDOWN),
    ]
    assert_conserved(kernel)


async def test_a_returned_message_waiting_for_room_when_its_run_fails_in_the_drain_is_shutdown(
    autojump_clock: Any,
) -> None:
    """The same wait, ended in the drain (the shutdown begun, its grace not over): a
    background task of ``a`` fails, which cancels a's run and the wait; the message is
    dead-lettered ``shutdown`` ("kernel stopping"), as at the end of the grace, not
    ``mailbox_full`` as while the kernel runs. (Checked against the mutant
    ``phase >= _DRAINING`` -> ``phase > _DRAINING`` in ``Router.route``: mailbox_full.)"""
    fail = trio.Event()

    @agent(name="b", mailbox_capacity=1, handle_timeout=1000.0)
    async def b(ctx: Context, msg: Message) -> None:
        await trio.sleep_forever()

    class A(Agent):
        async def on_start(self, ctx: Context) -> None:
            ctx.nursery.start_soon(self.fail_when_told)

        async def fail_when_told(self) -> None:
            if not fail.is_set():  # (the first run only: a restarted one runs on)
                await fail.wait()
                raise OSError("background")

        async def handle(self, ctx: Context, msg: Message) -> Message:
            return Message(ctx.id, "b", "out")

    config = make_config(send_timeout_ms=60_000, shutdown_grace_ms=10_000)
    async with open_kernel(config) as kernel:
        kernel.spawn(b)
        a_ref = kernel.spawn(agent(A, name="a"))
        await kernel.send("b", "b0")
        await trio.testing.wait_all_tasks_blocked()
        await kernel.send("b", "b1")
        await kernel.send(a_ref, "go")
        await trio.testing.wait_all_tasks_blocked()
        assert kernel.mailbox_statistics("b").producers_waiting == 1  # a's route waits
        async with trio.open_nursery() as nursery:
            nursery.start_soon(kernel.shutdown)
            await trio.testing.wait_all_tasks_blocked()
            assert kernel.phase is KernelPhase.DRAINING
            fail.set()
            await trio.testing.wait_all_tasks_blocked()
            assert kernel.phase is KernelPhase.DRAINING
            out = [d for d in dead_letters(kernel) if d.message.payload == "out"]
            assert [(d.reason, d.detail) for d in out] == [
                (DeadLetterReason.SHUTDOWN, "kernel stopping")
            ]
    assert sorted(_letters(kernel), key=str) == [
        ("b0", DeadLetterReason.SHUTDOWN),
        ("b1", DeadLetterReason.SHUTDOWN),
        ("out", DeadLetterReason.SHUTDOWN),
    ]
    assert_conserved(kernel)


# --- a cancel that comes after the handler was woken ---------------------------------------


def _suspending(held: str, release: trio.Event, seen: list[Any], *, handle_timeout: float) -> Any:
    """An agent whose handler suspends on every message: the ``held`` payload until
    ``release``, "stuck" for ever, the rest for one checkpoint; it answers a query
    with "answer"."""

    @agent(name="w", handle_timeout=handle_timeout)
    async def w(ctx: Context, msg: Message) -> str | None:
        if msg.payload == held:
            await release.wait()
        elif msg.payload == "stuck":
            await trio.sleep_forever()
        else:
            await trio.lowlevel.checkpoint()
        seen.append(msg.payload)
        return "answer" if msg.kind is MessageKind.QUERY else None

    return w


async def test_a_deadline_that_passes_after_the_handler_was_woken_spares_the_next_message(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Regression: the handler of "first" is woken and, before it runs, its deadline
    passes. Trio cancels the serve loop's scope, too late to stop the handler: it
    finishes, counted handled. The scope stayed cancelled, so the next handler that
    suspended got that ``Cancelled`` at once and was dead-lettered ``handler_timeout``."""
    release = trio.Event()
    seen: list[Any] = []
    w = _suspending("first", release, seen, handle_timeout=10.0)

    async with open_kernel(make_config()) as kernel:
        ref = kernel.spawn(w)
        await kernel.send(ref, "first")
        await trio.testing.wait_all_tasks_blocked()
        await kernel.send(ref, "second")
        release.set()  # the handler of "first" is rescheduled ...
        autojump_clock.jump(10.0)  # ... and its deadline passes before it runs
        await trio.testing.wait_all_tasks_blocked()
        assert seen == ["first", "second"]
        stats = kernel.stats()
        assert (stats.handled, stats.timed_out, stats.dead_lettered) == (2, 0, 0)
        # and the next deadline still fires, with its own reason
        await kernel.send(ref, "stuck")
        await trio.sleep(11)
        assert _letters(kernel) == [("stuck", DeadLetterReason.HANDLER_TIMEOUT)]
        assert_conserved(kernel)


class _NullTransport:
    """Attached only for the kernel's TransportHandle (a remote requester's cancel)."""

    async def deliver(self, msg: Message) -> None:
        raise AssertionError("not used")

    def deliver_nowait(self, msg: Message) -> None:
        raise AssertionError("not used")

    def cancel_query(self, query_id: uuid.UUID, to: Address) -> None:
        pass

    def query_failed(self, query_id: uuid.UUID, error: BaseException) -> None:
        pass


async def test_a_query_cancel_that_comes_after_its_handler_was_woken_spares_the_next_message(
    autojump_clock: Any,
) -> None:
    """Regression: a (remote) requester stopped waiting just as the handler of its query
    was woken (``TransportHandle.cancel_query``): the handler finished, but the scope
    stayed cancelled with the reason ``request_timeout``, and the next message was
    cancelled and dead-lettered with it."""
    release = trio.Event()
    seen: list[Any] = []
    w = _suspending("query", release, seen, handle_timeout=1000.0)

    async with open_kernel(make_config()) as kernel:
        handle = kernel.attach_transport(_NullTransport())
        ref = kernel.spawn(w)
        query = Message(uuid.uuid4(), ref.id, "query", MessageKind.QUERY)
        await kernel.send(query)
        await trio.testing.wait_all_tasks_blocked()
        await kernel.send(ref, "tell")
        release.set()  # the handler of the query is rescheduled: it will finish
        assert handle.cancel_query(query.id, ref.id)  # in the same tick: too late
        await trio.testing.wait_all_tasks_blocked()
        assert seen == ["query", "tell"]
        # the query's answer is a late reply (its requester stopped waiting); the tell
        # was handled, not cancelled
        assert _letters(kernel) == [("answer", DeadLetterReason.LATE_REPLY)]
        # a later deadline is a deadline, not the too-late cancel's request timeout
        await kernel.send(ref, "stuck")
        await trio.sleep(1001)
        assert _letters(kernel)[1:] == [("stuck", DeadLetterReason.HANDLER_TIMEOUT)]
        assert_conserved(kernel)


# --- the end of the drain that no idle agent reports --------------------------------------


async def test_shutdown_ends_its_drain_when_the_last_work_is_dead_lettered_by_a_stop(
    autojump_clock: Any,
) -> None:
    """Regression: the drain waits for an event that only an agent going idle set. An
    agent that stops for good during the drain (here ``ctx.stop()`` of a temporary agent)
    dead-letters its queue, and nothing was in flight any more, but it never goes idle:
    the shutdown waited out the whole grace period (100 s here)."""
    gate = trio.Event()

    @agent(name="once", restart="temporary")
    async def once(ctx: Context, msg: Message) -> None:
        await gate.wait()
        ctx.stop()

    async with open_kernel(make_config(shutdown_grace_ms=100_000)) as kernel:
        ref = kernel.spawn(once)
        await kernel.send(ref, 1)
        await kernel.send(ref, 2)
        await trio.testing.wait_all_tasks_blocked()

        took = await timed_shutdown(kernel, gate)
    assert _letters(kernel) == [(2, DeadLetterReason.AGENT_STOPPED)]
    assert took == 0.0
    assert_conserved(kernel)


# --- supervision: stops, restarts and links in the middle of one another -------------------


async def test_drain_ends_when_a_lazy_permanent_agent_exits_on_its_last_message(
    autojump_clock: Any,
) -> None:
    """Regression: A lazy (function) permanent agent calls ``ctx.stop()`` while handling the last
    message in flight during the drain. The serve loop returns without reporting idle,
    the supervisor restarts the agent *dormant* (no task), and nobody calls
    ``check_drained``: the shutdown waits out the whole grace period."""
    gate = trio.Event()

    @agent(name="lazy")  # permanent, no on_start: restarted dormant
    async def lazy(ctx: Context, msg: Message) -> None:
        await gate.wait()
        ctx.stop()

    async with open_kernel(make_config(shutdown_grace_ms=100_000)) as kernel:
        ref = kernel.spawn(lazy)
        await kernel.send(ref, 1)
        await trio.testing.wait_all_tasks_blocked()

        took = await timed_shutdown(kernel, gate)
    assert kernel.stats().handled == 1
    assert took == 0.0
    assert_conserved(kernel)


async def test_drain_ends_when_a_lazy_class_agent_fails_on_its_last_message(
    autojump_clock: Any,
) -> None:
    """Regression: The same with a failure: a class agent without ``on_start`` (lazy, directive
    ``restart``) raises on the last message in flight; it is dead-lettered, the agent is
    restarted dormant, and the drain waits out the grace period."""
    gate = trio.Event()

    class Fails(Agent):
        async def handle(self, ctx: Context, msg: Message) -> None:
            await gate.wait()
            raise RuntimeError("boom")

    async with open_kernel(make_config(shutdown_grace_ms=100_000)) as kernel:
        ref = kernel.spawn(agent(Fails, name="fails"))
        await kernel.send(ref, 1)
        await trio.testing.wait_all_tasks_blocked()

        took = await timed_shutdown(kernel, gate)
    assert _letters(kernel) == [(1, DeadLetterReason.HANDLER_ERROR)]
    assert took == 0.0
    assert_conserved(kernel)


async def test_a_stop_asked_during_a_group_restart_does_not_wait_out_the_backoff(
    autojump_clock: Any,
) -> None:
    """Regression: ``x`` fails under ``one_for_all`` (backoff 50 s); while the supervisor stops ``y``
    for the group restart (y's ``on_stop`` in progress), ``kernel.stop(y)`` is queued.
    The restart schedules y's task (a 50 s backoff) and, in the same round, handles the
    TERMINATE: y's task has not run, ``child.scope`` is None, the cancel is skipped and
    ``kernel.stop(y)`` waits out the whole backoff."""
    in_stop = trio.Event()
    finish_stop = trio.Event()
    log: list[str] = []

    class X(Agent):
        async def on_start(self, ctx: Context) -> None:
            log.append("x start")

        async def handle(self, ctx: Context, msg: Message) -> None:
            raise RuntimeError("x fails")

    class Y(Agent):
        async def on_start(self, ctx: Context) -> None:
            log.append("y start")

        async def handle(self, ctx: Context, msg: Message) -> None:
            pass

        async def on_stop(self, ctx: Context) -> None:
            log.append("y stop")
            in_stop.set()
            await finish_stop.wait()

    sup = Supervisor(
        name="sup",
        strategy="one_for_all",
        max_restarts=100,
        backoff=Backoff(initial=50.0, maximum=50.0, jitter=0.0),
        children=[agent(Y, name="y", shutdown_timeout=1000.0), agent(X, name="x")],
    )
    async with open_kernel(make_config()) as kernel:
        kernel.spawn(sup)
        await trio.testing.wait_all_tasks_blocked()
        assert log == ["y start", "x start"]
        await kernel.send("x", "fail")
        await in_stop.wait()  # the group restart is stopping y
        y = kernel.lookup("y")
        took: list[float] = []

        async def stop_y() -> None:
            start = trio.current_time()
            await kernel.stop(y)
            took.append(trio.current_time() - start)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(stop_y)
            await trio.testing.wait_all_tasks_blocked()
            finish_stop.set()
    assert log.count("y start") == 1, log
    assert took == [0.0]
    assert_conserved(kernel)


async def test_stopping_a_just_spawned_agent_does_not_wait_for_its_elder_siblings_on_start(
    autojump_clock: Any,
) -> None:
    """Regression: ``b`` is spawned right after ``a`` (whose ``on_start`` takes long) and stopped at
    once: the supervisor handles ADD(a), ADD(b), TERMINATE(b) in one round; b's task has
    not run yet, so ``child.scope`` is None and ``_stop_child`` has nothing to cancel: it
    waits for b's task, which waits for a's start gate. ``kernel.stop(b)`` is held for
    as long as a's ``on_start`` runs (for ever here)."""
    a_may_start = trio.Event()
    log: list[str] = []

    class A(Agent):
        async def on_start(self, ctx: Context) -> None:
            await a_may_start.wait()
            log.append("a start")

        async def handle(self, ctx: Context, msg: Message) -> None:
            pass

    class B(Agent):
        async def on_start(self, ctx: Context) -> None:
            log.append("b start")

        async def handle(self, ctx: Context, msg: Message) -> None:
            pass

    async with open_kernel(make_config(shutdown_grace_ms=1000)) as kernel:
        kernel.spawn(agent(A, name="a", shutdown_timeout=1.0))
        b = kernel.spawn(agent(B, name="b"))
        with trio.move_on_after(100) as scope:
            await kernel.stop(b)
        stop_hung = scope.cancelled_caught
        a_may_start.set()
        assert not stop_hung, "kernel.stop(b) waited for a's on_start"
        assert "b start" not in log
    assert_conserved(kernel)


async def test_a_child_spawned_in_on_stop_does_not_outlive_its_stopped_parent(
    autojump_clock: Any,
) -> None:
    """Regression: ``kernel.stop(p)``: the supervisor stops p's linked children first, then p; p's
    ``on_stop`` calls ``ctx.spawn`` (allowed: p is not retired yet and the kernel runs).
    Nothing stops that child: it is still alive after p is stopped for good, linked to a
    retired parent."""

    @agent
    async def worker(ctx: Context, msg: Message) -> None:
        pass

    class P(Agent):
        async def on_start(self, ctx: Context) -> None:
            pass

        async def handle(self, ctx: Context, msg: Message) -> None:
            pass

        async def on_stop(self, ctx: Context) -> None:
            ctx.spawn(worker, name="flusher")

    async with open_kernel(make_config()) as kernel:
        p = kernel.spawn(agent(P, name="p"))
        await trio.testing.wait_all_tasks_blocked()
        await kernel.stop(p)
        await trio.testing.wait_all_tasks_blocked()
        alive = [ref.name for ref in kernel.agents()]
        assert alive == [], f"still alive after their parent stopped: {alive}"
    assert_conserved(kernel)


async def test_an_agent_restarted_after_the_grace_period_handles_nothing(
    autojump_clock: Any,
) -> None:
    """Regression: ``w`` (under a nested supervisor) failed and waits out a 1 s backoff with a
    message queued. The grace period ends (0.1 s): only *running* agents are held. The
    root stops its children in reverse order, ``slow`` first (its ``on_stop`` takes 5 s),
    so the nested supervisor is still running when w's backoff ends: w starts a new run,
    not held, and handles its queue after the grace period."""
    handled: list[tuple[Any, KernelPhase]] = []

    class W(Agent):
        async def on_start(self, ctx: Context) -> None:
            pass

        async def handle(self, ctx: Context, msg: Message) -> None:
            if msg.payload == "boom":
                raise RuntimeError("boom")
            handled.append((msg.payload, ctx.kernel.phase))

    class Slow(Agent):
        async def on_start(self, ctx: Context) -> None:
            pass

        async def handle(self, ctx: Context, msg: Message) -> None:
            pass

        async def on_stop(self, ctx: Context) -> None:
            await trio.sleep(5)

    sup = Supervisor(
        name="sup",
        backoff=Backoff(initial=1.0, maximum=1.0, jitter=0.0),
        children=[agent(W, name="w")],
    )
    async with open_kernel(make_config(shutdown_grace_ms=100)) as kernel:
        kernel.spawn(sup)
        kernel.spawn(agent(Slow, name="slow", shutdown_timeout=10.0))
        await trio.testing.wait_all_tasks_blocked()
        await kernel.send("w", "boom")
        await kernel.send("w", "late")
        await trio.testing.wait_all_tasks_blocked()  # w failed, waits out its backoff
    assert [p for p, phase in handled if phase >= KernelPhase.STOPPING] == [], handled
    assert _letters(kernel)[-1] == ("late", DeadLetterReason.SHUTDOWN)
    assert_conserved(kernel)


async def test_a_child_spawned_by_the_message_in_hand_does_not_outlive_its_stopped_parent(
    autojump_clock: Any,
) -> None:
    """Regression: ``kernel.stop(p)`` while p's handler is suspended: the supervisor stops p's
    linked children (none yet), then asks p to stop and lets it finish the message in
    hand; the handler then calls ``ctx.spawn``. That child is never stopped: it outlives
    p, which is stopped for good, and the tree holds a child linked to a retired parent."""
    gate = trio.Event()

    @agent
    async def worker(ctx: Context, msg: Message) -> None:
        pass

    @agent(name="p", shutdown_timeout=1000.0)
    async def p(ctx: Context, msg: Message) -> None:
        await gate.wait()
        ctx.spawn(worker, name="job")

    async with open_kernel(make_config()) as kernel:
        ref = kernel.spawn(p)
        await kernel.send(ref, "work")
        await trio.testing.wait_all_tasks_blocked()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(kernel.stop, ref)
            await trio.testing.wait_all_tasks_blocked()  # p is asked to stop
            gate.set()
        await trio.testing.wait_all_tasks_blocked()
        alive = [r.name for r in kernel.agents()]
        assert alive == [], f"still alive after their parent stopped: {alive}"
    assert_conserved(kernel)


async def test_a_failure_during_a_group_restart_is_reported_to_monitors(
    autojump_clock: Any,
) -> None:
    """Regression: Under ``one_for_all``, ``x`` fails; while the supervisor stops ``y`` (slow
    ``on_stop``), ``z`` (started first, still running) fails too. z's EXIT is queued,
    then ``_stop_child(z)`` finds its run over and the group restart bumps its run
    number: the EXIT is dropped as stale. z's failure is never reported: no ``failed``
    notice to its monitors, no ``failed`` event, no count against the intensity."""
    in_stop = trio.Event()
    finish_stop = trio.Event()
    notices: list[tuple[str, str]] = []

    class Z(Agent):
        async def on_start(self, ctx: Context) -> None:
            pass

        async def handle(self, ctx: Context, msg: Message) -> None:
            raise RuntimeError("z fails")

    class Y(Agent):
        async def on_start(self, ctx: Context) -> None:
            pass

        async def handle(self, ctx: Context, msg: Message) -> None:
            pass

        async def on_stop(self, ctx: Context) -> None:
            in_stop.set()
            await finish_stop.wait()

    class X(Agent):
        async def on_start(self, ctx: Context) -> None:
            pass

        async def handle(self, ctx: Context, msg: Message) -> None:
            raise RuntimeError("x fails")

    @agent(name="watcher")
    async def watcher(ctx: Context, msg: Message) -> None:
        if msg.payload == "watch":
            ctx.monitor(ctx.kernel.lookup("x"))
            ctx.monitor(ctx.kernel.lookup("z"))
        else:
            notices.append((msg.payload["name"], msg.payload["event"]))

    sup = Supervisor(
        name="sup",
        strategy="one_for_all",
        max_restarts=100,
        backoff=Backoff(0, 0),
        children=[
            agent(Z, name="z"),
            agent(Y, name="y", shutdown_timeout=1000.0),
            agent(X, name="x"),
        ],
    )
    async with open_kernel(make_config()) as kernel:
        kernel.spawn(sup)
        kernel.spawn(watcher)
        await kernel.send("watcher", "watch")
        await trio.testing.wait_all_tasks_blocked()
        await kernel.send("x", "fail")
        await in_stop.wait()  # the group restart is stopping y
        await kernel.send("z", "fail")
        await trio.testing.wait_all_tasks_blocked()
        finish_stop.set()
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(notices) == [("x", "failed"), ("z", "failed")], notices
    assert_conserved(kernel)


# --- failures while an agent is being stopped ---------------------------------------------


def _watcher(target: str, notices: list[tuple[str, str, str]]) -> Any:
    """An agent ("watcher") that monitors ``target`` on "watch" and records the notices
    it gets as (name, event, reason)."""

    @agent(name="watcher")
    async def watcher(ctx: Context, msg: Message) -> None:
        if msg.payload == "watch":
            ctx.monitor(ctx.kernel.lookup(target))
        else:
            notices.append((msg.payload["name"], msg.payload["event"], msg.payload["reason"]))

    return watcher


async def test_a_background_task_that_fails_while_its_agent_is_stopped_is_reported(
    autojump_clock: Any,
) -> None:
    """Regression: ``kernel.stop(w)`` while w's handler is suspended on the message in
    hand; a task in w's ``ctx.nursery`` raises meanwhile. The run ends with that failure,
    but the supervisor dropped it (the child was being stopped): a log line only, no
    ``failed`` event and no ``failed`` notice to w's monitors. Now it is reported as a
    failure at any other time is, and w is stopped for good, not restarted."""
    crash = trio.Event()
    notices: list[tuple[str, str, str]] = []

    async def background() -> None:
        await crash.wait()
        raise RuntimeError("background fails")

    class W(Agent):
        async def on_start(self, ctx: Context) -> None:
            ctx.nursery.start_soon(background)

        async def handle(self, ctx: Context, msg: Message) -> None:
            await trio.sleep_forever()

    async with open_kernel(make_config()) as kernel:
        async with record_events(kernel) as recorder:
            ref = kernel.spawn(agent(W, name="w", shutdown_timeout=1000.0))
            kernel.spawn(_watcher("w", notices))
            await kernel.send("watcher", "watch")
            await kernel.send(ref, "work")
            await trio.testing.wait_all_tasks_blocked()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(kernel.stop, ref)
                await trio.testing.wait_all_tasks_blocked()  # w is asked to stop
                crash.set()
            took = trio.current_time()
            await trio.testing.wait_all_tasks_blocked()
        assert took == 0.0  # the failure ended the run, not the stop's timeout
        assert [(e.kind, e.reason, repr(e.error)) for e in recorder.events if e.name == "w"][
            -2:
        ] == [
            (EventKind.FAILED, "RuntimeError", "RuntimeError('background fails')"),
            (EventKind.STOPPED, "stopped", "None"),
        ]
        assert EventKind.RESTARTED not in recorder.kinds("w")
        assert notices == [
            ("w", "failed", "RuntimeError('background fails')"),
            ("w", "stopped", "stopped"),
        ]
        assert kernel.stats().restarts == 0
    assert _letters(kernel) == [("work", DeadLetterReason.AGENT_STOPPED)]
    assert_conserved(kernel)


async def test_an_on_stop_that_raises_while_its_agent_is_stopped_is_reported(
    autojump_clock: Any,
) -> None:
    """Regression: ``kernel.stop(w)``, and w's ``on_stop`` raises: a log line only, no
    ``failed`` event, no notice to w's monitors. As in OTP, where a ``terminate`` that
    crashes makes the crash the exit reason, the run now ends with that failure: it is
    reported, and w is stopped for good, not restarted."""
    notices: list[tuple[str, str, str]] = []

    class W(Agent):
        async def on_start(self, ctx: Context) -> None:
            pass

        async def handle(self, ctx: Context, msg: Message) -> None:
            pass

        async def on_stop(self, ctx: Context) -> None:
            raise OSError("cannot flush")

    async with open_kernel(make_config()) as kernel:
        async with record_events(kernel) as recorder:
            ref = kernel.spawn(agent(W, name="w"))
            kernel.spawn(_watcher("w", notices))
            await kernel.send("watcher", "watch")
            await trio.testing.wait_all_tasks_blocked()
            await kernel.stop(ref)
            await trio.testing.wait_all_tasks_blocked()
        assert [(e.kind, repr(e.error)) for e in recorder.events if e.name == "w"][-2:] == [
            (EventKind.FAILED, "OSError('cannot flush')"),
            (EventKind.STOPPED, "None"),
        ]
        assert EventKind.RESTARTED not in recorder.kinds("w")
        assert notices == [("w", "failed", "OSError('cannot flush')"), ("w", "stopped", "stopped")]
        assert kernel.stats().restarts == 0
    assert_conserved(kernel)


async def test_a_transient_agent_whose_on_stop_raises_after_a_normal_exit_is_restarted(
    autojump_clock: Any,
) -> None:
    """``on_stop`` raising is the run's failure (OTP: a crashing ``terminate`` is the exit
    reason), so a ``transient`` agent that exits normally (``ctx.stop()``) and whose
    ``on_stop`` raises is restarted, with a ``failed`` event."""
    runs: list[int] = []

    class W(Agent):
        async def on_start(self, ctx: Context) -> None:
            runs.append(len(runs) + 1)

        async def handle(self, ctx: Context, msg: Message) -> None:
            ctx.stop()

        async def on_stop(self, ctx: Context) -> None:
            if len(runs) == 1:
                raise OSError("cannot flush")

    async with open_kernel(make_config()) as kernel, record_events(kernel) as recorder:
        ref = kernel.spawn(agent(W, name="w", restart="transient"))
        await kernel.send(ref, "exit")
        await trio.testing.wait_all_tasks_blocked()
        assert runs == [1, 2]
        await kernel.send(ref, "exit")  # on_stop does not raise: a normal exit, not restarted
        await trio.testing.wait_all_tasks_blocked()
        assert runs == [1, 2]
    assert [(e.kind, repr(e.error)) for e in recorder.events if e.name == "w"] == [
        (EventKind.SPAWNED, "None"),
        (EventKind.STARTED, "None"),
        (EventKind.FAILED, "OSError('cannot flush')"),
        (EventKind.RESTARTED, "OSError('cannot flush')"),
        (EventKind.STARTED, "None"),
        (EventKind.STOPPED, "None"),
    ]


async def test_a_failure_while_the_kernel_stops_its_tree_is_reported(
    autojump_clock: Any,
) -> None:
    """Regression: the kernel's shutdown stops w (its supervisor is leaving: no exit is
    handled any more), and w's ``on_stop`` raises: a log line only. Now a ``failed``
    event, then ``stopped`` (reason ``shutdown``)."""

    class W(Agent):
        async def on_start(self, ctx: Context) -> None:
            pass

        async def handle(self, ctx: Context, msg: Message) -> None:
            pass

        async def on_stop(self, ctx: Context) -> None:
            raise OSError("cannot flush")

    async with open_kernel(make_config()) as kernel, record_events(kernel) as recorder:
        kernel.spawn(agent(W, name="w"))
        await trio.testing.wait_all_tasks_blocked()
        await kernel.shutdown()
    assert [(e.kind, e.reason, repr(e.error)) for e in recorder.events if e.name == "w"] == [
        (EventKind.SPAWNED, "", "None"),
        (EventKind.STARTED, "", "None"),
        (EventKind.FAILED, "OSError", "OSError('cannot flush')"),
        (EventKind.STOPPED, "shutdown", "None"),
    ]
    assert kernel.stats().restarts == 0


async def test_a_failure_queued_behind_an_escalation_is_reported(autojump_clock: Any) -> None:
    """Regression: ``a`` and ``b`` fail in the same round under a supervisor that allows no
    restart. Handling the first exit, the supervisor gives up (an escalation) and stops;
    the second exit was still queued and was dropped with the queue: no ``failed`` event
    for that agent, no notice. Now what is left queued is reported."""
    gate = trio.Event()

    class Fails(Agent):
        async def on_start(self, ctx: Context) -> None:
            pass

        async def handle(self, ctx: Context, msg: Message) -> None:
            await gate.wait()
            raise RuntimeError(f"{ctx.name} fails")

    sup = Supervisor(
        name="sup",
        max_restarts=0,
        children=[agent(Fails, name="a"), agent(Fails, name="b")],
    )
    async with open_kernel(make_config()) as kernel:
        async with record_events(kernel) as recorder:
            kernel.spawn(sup)
            await kernel.send("a", 1)
            await kernel.send("b", 1)
            await trio.testing.wait_all_tasks_blocked()
            gate.set()
            await trio.testing.wait_all_tasks_blocked()
        failed = {e.name: repr(e.error) for e in recorder.of(EventKind.FAILED)}
        # (the root restarts sup, whose escalation names the first failure it handled)
        assert failed.keys() == {"a", "b", "sup"}, failed
        assert (failed["a"], failed["b"]) == ("RuntimeError('a fails')", "RuntimeError('b fails')")
    assert_conserved(kernel)


# --- a group restart that a queued stop overtakes ------------------------------------------


async def test_a_group_member_stopped_before_it_runs_again_is_not_reported_restarted(
    autojump_clock: Any,
) -> None:
    """Regression: ``x`` fails under ``one_for_all``; while the supervisor stops ``y`` for
    the group restart, ``kernel.stop(y)`` is queued. The restart counted y and published
    a ``restarted`` event for it, then the queued stop stopped it before it ran again:
    the events said y was restarted, and it never was. Now y's events say it was stopped
    (``stopped``, reason ``stopped``), and only x is counted as restarted."""
    in_stop = trio.Event()
    finish_stop = trio.Event()
    log: list[str] = []

    class X(Agent):
        async def on_start(self, ctx: Context) -> None:
            log.append("x start")

        async def handle(self, ctx: Context, msg: Message) -> None:
            raise RuntimeError("x fails")

    class Y(Agent):
        async def on_start(self, ctx: Context) -> None:
            log.append("y start")

        async def handle(self, ctx: Context, msg: Message) -> None:
            pass

        async def on_stop(self, ctx: Context) -> None:
            in_stop.set()
            await finish_stop.wait()

    sup = Supervisor(
        name="sup",
        strategy="one_for_all",
        max_restarts=100,
        backoff=Backoff(0, 0),
        children=[agent(Y, name="y", shutdown_timeout=1000.0), agent(X, name="x")],
    )
    async with open_kernel(make_config()) as kernel:
        async with record_events(kernel) as recorder:
            kernel.spawn(sup)
            await trio.testing.wait_all_tasks_blocked()
            y = kernel.lookup("y")
            await kernel.send("x", "fail")
            await in_stop.wait()  # the group restart is stopping y
            async with trio.open_nursery() as nursery:
                nursery.start_soon(kernel.stop, y)
                await trio.testing.wait_all_tasks_blocked()
                finish_stop.set()
            await trio.testing.wait_all_tasks_blocked()
        assert log == ["y start", "x start", "x start"]
        assert recorder.kinds("y") == [EventKind.SPAWNED, EventKind.STARTED, EventKind.STOPPED]
        assert recorder.of(EventKind.STOPPED)[0].reason == "stopped"
        assert [e.name for e in recorder.of(EventKind.RESTARTED)] == ["x"]
        assert kernel.stats().restarts == 1
    assert_conserved(kernel)


async def test_a_failed_agent_stopped_before_its_restart_is_not_reported_restarted(
    autojump_clock: Any,
) -> None:
    """Regression: the same for the failed agent itself. While its supervisor is busy
    (stopping ``y``, whose ``on_stop`` is slow), ``x`` fails and then ``kernel.stop(x)``
    is queued behind its exit. The exit was handled first: a ``restarted`` event and a
    restart counted, and the stop, in the same round, stopped x before its new run
    started. Now x is stopped for good at its exit, without a restart."""
    in_stop = trio.Event()
    finish_stop = trio.Event()
    log: list[str] = []

    class X(Agent):
        async def on_start(self, ctx: Context) -> None:
            log.append("x start")

        async def handle(self, ctx: Context, msg: Message) -> None:
            raise RuntimeError("x fails")

    class Y(Agent):
        async def on_start(self, ctx: Context) -> None:
            pass

        async def handle(self, ctx: Context, msg: Message) -> None:
            pass

        async def on_stop(self, ctx: Context) -> None:
            in_stop.set()
            await finish_stop.wait()

    sup = Supervisor(
        name="sup",
        max_restarts=100,
        backoff=Backoff(0, 0),
        children=[agent(Y, name="y", shutdown_timeout=1000.0), agent(X, name="x")],
    )
    async with open_kernel(make_config()) as kernel:
        async with record_events(kernel) as recorder:
            kernel.spawn(sup)
            await trio.testing.wait_all_tasks_blocked()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(kernel.stop, kernel.lookup("y"))
                await in_stop.wait()  # the supervisor is busy stopping y
                await kernel.send("x", "fail")
                await trio.testing.wait_all_tasks_blocked()  # x's exit is queued
                nursery.start_soon(kernel.stop, kernel.lookup("x"))
                await trio.testing.wait_all_tasks_blocked()  # and its stop behind it
                finish_stop.set()
            await trio.testing.wait_all_tasks_blocked()
        assert log == ["x start"]
        assert recorder.kinds("x") == [
            EventKind.SPAWNED,
            EventKind.STARTED,
            EventKind.FAILED,
            EventKind.STOPPED,
        ]
        assert [e.reason for e in recorder.of(EventKind.STOPPED) if e.name == "x"] == ["stopped"]
        assert kernel.stats().restarts == 0
        assert [ref.name for ref in kernel.agents()] == []
    assert_conserved(kernel)
