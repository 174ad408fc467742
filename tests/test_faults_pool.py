"""Fault injection on pools, thirty-eighth pass: a grow, a shrink and a drain whose
workers fail, restart or stop at the wrong moment, and senders that wait for room
meanwhile. After each: every message is handled, dead-lettered with a reason or
refused (``kernel.stats()``), every request gets its answer or a documented error
before its deadline, and no task is left.

Everything runs on a ``MockClock(autojump_threshold=0)``.
"""

from __future__ import annotations

from contextlib import suppress
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from nexus_trio import (
    Agent,
    AgentNotFound,
    AgentSpec,
    Config,
    Context,
    EventKind,
    Kernel,
    KernelConfig,
    KernelShuttingDown,
    MailboxFull,
    Message,
    MessageKind,
    RequestFailed,
    RequestTimeout,
    SupervisionConfig,
    Supervisor,
    SupervisorEscalation,
    agent,
    open_kernel,
    pool,
    pool_workers,
    resize_pool,
)
from nexus_trio.testing import assert_conserved, open_test_kernel, record_events, test_config

from .full_disk import json_log_on_dev_full
from .hang_guard import fault_settings, run_on_mock_clock, tasks_living


async def test_a_grow_whose_new_worker_s_first_start_a_sibling_s_restart_cut_short_is_answered(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Regression: a grow's answer waits for each new worker's first start; under a
    ``one_for_all`` pool supervisor a sibling's failure restarted the new worker while
    its first ``on_start`` still ran (cancelled past its ``shutdown_timeout``). The
    grow had taken the worker's first-start record at the cancelled start, so the
    restart's start, which succeeded, answered nothing: the resize request timed out
    (100 s), saying no answer came. The first start is over only once an ``on_start``
    returned or raised: a cancelled one leaves it to the restart, whose success answers
    the grow (OTP's ``start_child`` returns once the child's ``init`` has returned)."""
    starts: list[tuple[str | None, float]] = []

    class Worker(Agent):
        async def on_start(self, ctx: Context) -> None:
            starts.append((ctx.name, trio.current_time()))
            if ctx.name == "workers/2" and len(starts) == 3:
                await trio.sleep(10)  # its first start: past its shutdown_timeout

        async def handle(self, ctx: Context, msg: Message) -> Any:
            if msg.payload == "boom":
                raise RuntimeError("boom")
            return ctx.name

    living = tasks_living()
    async with open_test_kernel() as kernel:
        spec = AgentSpec(factory=Worker, shutdown_timeout=1.0)
        kernel.spawn(pool(spec, size=2, supervision=Supervisor(strategy="one_for_all")))
        await trio.testing.wait_all_tasks_blocked()
        answers: list[Any] = []

        async def grow() -> None:
            answers.append(await kernel.request("workers", {"$resize": 3}, timeout=100))
            answers.append(trio.current_time())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(grow)
            await trio.sleep(1)  # workers/2 is in its first on_start
            await kernel.send("workers/0", "boom")  # restarts all three
        names = [ref.name for ref in await pool_workers(kernel, "workers")]
        assert [await kernel.request("workers", None) for _ in range(3)] == names
        await trio.testing.wait_all_tasks_blocked()
        assert_conserved(kernel)
        stats = kernel.stats()
    assert tasks_living() == living
    # answered as the restart's start of workers/2 returned, 1 s after its cancel began
    assert answers == [{"size": 3}, starts[-1][1]]
    assert names == ["workers/0", "workers/1", "workers/2"]
    assert [name for name, _ in starts[3:]] == names
    assert stats.restarts == 3
    assert dict(stats.dead_letters_by_reason) == {"handler_error": 1}


# --- a fault at a step of a grow, a shrink, a drain or a wait for room -------------------------

#: the errors a request or a send to a pool may end with, besides its answer
REFUSED = (AgentNotFound, MailboxFull, KernelShuttingDown, RequestFailed)
#: a deadline no request of the property reaches unless it was never answered
LONG = 1000.0


class _Worker(Agent):
    """A worker for the property: ``on_start`` takes ``start`` seconds (a grown worker's
    only: those named past ``workers/1``); a message takes ``payload["s"]`` seconds, and
    one whose payload is ``"boom"`` fails. Notes the sequence numbers it handled."""

    start = 1.5
    done: dict[str, list[int]]

    async def on_start(self, ctx: Context) -> None:
        assert ctx.name is not None
        if int(ctx.name.rsplit("/", 1)[1]) >= 2:
            await trio.sleep(self.start)

    async def handle(self, ctx: Context, msg: Message) -> Any:
        if msg.payload == "boom":
            raise RuntimeError("boom")
        assert ctx.name is not None
        await trio.sleep(msg.payload["s"])
        self.done.setdefault(ctx.name, []).append(msg.payload["n"])
        return ctx.name


SCENES = ["grow", "shrink", "drain", "room", "request"]
FAULTS = [
    "sibling_fails",
    "worker_stopped",
    "worker_drained",
    "pool_stopped",
    "supervisor_stopped",
    "shrunk",
    "grown",
    "shutdown",
]


@fault_settings(200)
@given(
    scene=st.sampled_from(SCENES),
    fault=st.sampled_from(FAULTS),
    strategy=st.sampled_from(["one_for_one", "one_for_all"]),
    delay=st.sampled_from([0.0, 0.1, 0.3, 0.5, 0.7, 1.0, 1.5]),
    rounds=st.integers(0, 12),
)
def test_a_fault_at_any_step_of_a_pool_s_grow_shrink_drain_or_wait_for_room_loses_nothing(
    scene: str, fault: str, strategy: str, delay: float, rounds: int
) -> None:
    """A pool of 2 (workers' mailboxes of 2, a 1 s shutdown timeout each) in the middle of
    a scene: a grow to 4 whose new workers take 1.5 s to start (past their shutdown timeout), a shrink to 1 while each
    worker has work queued, a draining stop with work queued at every worker, twelve
    senders waiting for room, or a request held by a slow worker. After ``delay``
    seconds and ``rounds`` scheduling rounds a fault strikes: a worker fails (under
    ``one_for_all``, its siblings restart with it), a worker is stopped (or drained),
    the workers' supervisor or the pool is stopped, the pool is shrunk to 1 or grown to
    3, or the kernel shuts down. Then: no task is left; the books
    balance (accepted = handled + dead-lettered, nothing in flight); every request got
    its answer or a documented error before the block ended (10 s after the fault: none
    was left unanswered to the shutdown or its deadline); each worker handled
    the tells of the one sequential sender in the order they were sent."""
    done: dict[str, list[int]] = {}
    outcomes: list[tuple[Any, Any, float]] = []
    kernels: list[Kernel] = []
    #: when the block began to end: every request is over by then (10 s after the fault)
    quiet: list[float] = []

    class Worker(_Worker):
        pass

    Worker.done = done
    worker = AgentSpec(factory=Worker, mailbox_capacity=2, shutdown_timeout=1.0)
    spec = pool(
        worker,
        size=2,
        max_size=4,
        supervision=Supervisor(strategy=strategy, max_restarts=100, within=5.0),
    ).with_options(mailbox_capacity=4, shutdown_timeout=5.0)

    async def ask(kernel: Kernel, payload: Any) -> None:
        try:
            outcome = await kernel.request("workers", payload, timeout=LONG)
        except REFUSED as exc:
            outcome = exc
        outcomes.append((payload, outcome, trio.current_time()))

    async def tell(kernel: Kernel, payload: Any) -> None:
        with suppress(*REFUSED):
            await kernel.send("workers", payload)

    async def strike(kernel: Kernel, nursery: trio.Nursery) -> None:
        await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(delay)
        for _ in range(rounds):
            await trio.lowlevel.checkpoint()
        with suppress(AgentNotFound, KernelShuttingDown):
            if fault == "sibling_fails":
                await kernel.send("workers/0", "boom")
            elif fault == "worker_stopped":
                nursery.start_soon(_stopped, kernel, "workers/1")
            elif fault == "worker_drained":
                nursery.start_soon(_stopped, kernel, "workers/1", True)
            elif fault == "shrunk":
                nursery.start_soon(ask, kernel, {"$resize": 1})
            elif fault == "grown":
                nursery.start_soon(ask, kernel, {"$resize": 3})
            elif fault == "pool_stopped":
                nursery.start_soon(_stopped, kernel, "workers")
            elif fault == "supervisor_stopped":
                nursery.start_soon(_stopped, kernel, "workers/supervisor")
            else:
                nursery.start_soon(kernel.shutdown)

    async def act(kernel: Kernel, nursery: trio.Nursery) -> None:
        if scene == "grow":
            nursery.start_soon(ask, kernel, {"$resize": 4})
        elif scene == "shrink":
            for n in range(6):
                await tell(kernel, {"s": 0.2, "n": n})
            nursery.start_soon(ask, kernel, {"$resize": 1})
        elif scene == "drain":
            for n in range(6):
                await tell(kernel, {"s": 0.2, "n": n})
            nursery.start_soon(_stopped, kernel, "workers", True)
        elif scene == "room":
            for _ in range(12):  # room for 2 + 2 + 4 + 2 in hand: 2 wait
                nursery.start_soon(tell, kernel, {"s": 0.3, "n": -1})
        else:
            nursery.start_soon(ask, kernel, {"s": 0.8, "n": -1})

    async def scenario() -> None:
        living = tasks_living()
        config = test_config(mailbox_capacity=4, send_timeout_ms=3000)
        async with trio.open_nursery() as outside:
            async with open_kernel(config) as kernel:
                kernels.append(kernel)
                kernel.spawn(spec)
                await trio.testing.wait_all_tasks_blocked()
                await act(kernel, outside)
                await strike(kernel, outside)
                await trio.sleep(10)
                quiet.append(trio.current_time())
        assert tasks_living() == living, "the kernel left tasks behind"

    run_on_mock_clock(scenario, 20)
    [kernel] = kernels
    stats = kernel.stats()
    assert stats.in_flight == 0
    assert_conserved(kernel)
    for payload, outcome, ended in outcomes:
        assert not isinstance(outcome, RequestTimeout), (payload, outcome)
        # (not failed by the block's end: a request never answered)
        assert not quiet or ended < quiet[0], (payload, outcome, ended)
        if isinstance(payload, dict) and "$resize" in payload:
            assert isinstance(outcome, REFUSED) or outcome == {"size": payload["$resize"]}
    for name, numbers in done.items():
        assert numbers == sorted(numbers), (name, numbers)


async def _stopped(kernel: Kernel, target: str, drain: bool = False) -> None:
    with suppress(AgentNotFound):
        await kernel.stop(target, drain=drain)


@pytest.mark.parametrize("queue", [10_000, 0])
async def test_a_pool_whose_workers_fail_and_leave_with_its_log_on_dev_full_loses_no_message(
    restore_logging: None, autojump_clock: trio.testing.MockClock, queue: int
) -> None:
    """The JSON log on a full disk (``/dev/full``: every write fails with ENOSPC) while a
    pool's ``temporary`` workers fail one by one (an ERROR with its traceback each, and
    the router's WARNING as it drops them), then a grow whose new workers fail their
    first start (a WARNING naming them), then a grow that works: routing goes on, every
    message is handled or dead-lettered with its reason, the resize requests get their
    answers, and every record is counted lost, none raised into the kernel."""
    starts: list[str | None] = []
    handled: list[tuple[str | None, Any]] = []

    class Worker(Agent):
        async def on_start(self, ctx: Context) -> None:
            starts.append(ctx.name)
            if ctx.name in ("workers/3", "workers/4"):
                raise RuntimeError("no database")

        async def handle(self, ctx: Context, msg: Message) -> Any:
            if msg.payload == "boom":
                raise RuntimeError("boom")
            handled.append((ctx.name, msg.payload))
            return ctx.name if msg.kind is MessageKind.QUERY else None

    with json_log_on_dev_full(queue=queue) as lost:
        config = test_config(dead_letter_log_limit=0, failure_log_limit=0)
        async with open_test_kernel(config) as kernel:
            spec = AgentSpec(factory=Worker, restart="temporary")
            kernel.spawn(pool(spec, size=3))
            await trio.testing.wait_all_tasks_blocked()
            for payload in ["boom", "boom", 1, 2]:  # workers/0 and /1 fail and leave
                await kernel.send("workers", payload)
                await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(RequestFailed, match="grew by 0 to 1 workers, not 3"):
                await kernel.request("workers", {"$resize": 3})
            assert await kernel.request("workers", {"$resize": 2}) == {"size": 2}
            answers = [await kernel.request("workers", n) for n in (3, 4)]
            await trio.testing.wait_all_tasks_blocked()
            assert_conserved(kernel)
            stats = kernel.stats()
    assert starts == [f"workers/{n}" for n in range(6)]
    # round robin's turn stays where it was across the leaves and the grows (pools.md)
    assert handled == [("workers/2", 1), ("workers/2", 2), ("workers/5", 3), ("workers/2", 4)]
    assert answers == ["workers/5", "workers/2"]
    assert stats.dead_letters_by_reason == {"handler_error": 2}
    assert stats.run_failures == 2  # the two failed first starts
    assert lost.records > 0


async def test_one_key_s_messages_keep_their_order_across_a_worker_restart_not_across_a_shrink(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Order in a consistent-hash pool (pools.md, Routing): one sender's messages with
    one key reach one worker, which handles them in the order sent, also when that
    worker fails on one of them and is restarted (a restart keeps its mailbox: the rest
    wait there, in order; the failed one is dead-lettered). A shrink that removes the
    key's worker moves the key: what is queued there is handled by the removed worker
    as it drains, while what comes after goes to the key's new worker at once, so the
    two run side by side (as in Akka's ConsistentHashingPool; a sender that needs order
    across a resize waits for the resize's answer)."""
    handled: list[tuple[str | None, int, float]] = []

    class Worker(Agent):
        async def handle(self, ctx: Context, msg: Message) -> None:
            if msg.payload["n"] == 2 and msg.payload["fail"]:
                raise RuntimeError("fails on 2")
            await trio.sleep(1)
            handled.append((ctx.name, msg.payload["n"], trio.current_time()))

    def key(msg: Message) -> Any:
        return msg.payload["k"]

    async with open_test_kernel() as kernel:
        spec = AgentSpec(factory=Worker, mailbox_capacity=100)
        kernel.spawn(pool(spec, size=2, routing="consistent_hash", key=key))
        await trio.testing.wait_all_tasks_blocked()
        # the key "k3" belongs to workers/1 (hashes are the same on every run); five
        # messages with it, the second fails
        for n in range(5):
            await kernel.send("workers", {"k": "k3", "n": n, "fail": True})
        await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(10)
        assert [(name, n) for name, n, _ in handled] == [("workers/1", n) for n in (0, 1, 3, 4)]
        handled.clear()

        # a shrink to 1 removes workers/1 while it has four of the key queued: the four
        # sent after the shrink go to workers/0 at once
        for n in range(10, 14):
            await kernel.send("workers", {"k": "k3", "n": n, "fail": False})
        await trio.testing.wait_all_tasks_blocked()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(kernel.request, "workers", {"$resize": 1})
            await trio.testing.wait_all_tasks_blocked()
            for n in range(20, 24):
                await kernel.send("workers", {"k": "k3", "n": n, "fail": False})
        await trio.sleep(10)
        stats = kernel.stats()
    by_worker: dict[str | None, list[int]] = {}
    for worker, n, _ in handled:
        by_worker.setdefault(worker, []).append(n)
    # each worker in order, the two side by side: 10 and 20 both end at 1 s
    assert by_worker == {"workers/1": [10, 11, 12, 13], "workers/0": [20, 21, 22, 23]}
    assert handled[0][2] == handled[1][2]
    assert dict(stats.dead_letters_by_reason) == {"handler_error": 1}


@pytest.mark.parametrize("shrink_at", [0.0, 0.5], ids=["during_its_message", "as_it_fails"])
async def test_an_escalating_worker_failing_in_a_shrink_s_stop_is_reported_not_escalated(
    autojump_clock: Any, shrink_at: float
) -> None:
    """Measured for the fifty-second pass (the pool demo with ``escalate_to_kernel``):
    worker ``p/1`` (directive ``escalate``) takes 0.5 s over ``"fail"``, then raises.
    A shrink to 1 asked at 0 s stops ``p/1`` (newest first) with a drain while that
    message is in hand: its failure comes while it is being stopped, and is reported
    (``failed`` event) but neither restarts nor escalates, as OTP's supervisor that
    terminates a child only logs its abnormal exit (``shutdown_error``); the kernel runs
    on. A shrink asked at 0.5 s, after the failure was handled, finds the escalation
    under way: the root gives up and ``open_kernel`` raises ``SupervisorEscalation``.
    Deterministic on the mock clock (a guard: the same on the code before)."""

    @agent(name="w", on_error="escalate")
    async def worker(ctx: Context, msg: Message) -> None:
        if msg.payload == "fail":
            await trio.sleep(0.5)
            raise RuntimeError("worker fails")

    config = Config(
        kernel=KernelConfig(dead_letter_buffer=100),
        supervision=SupervisionConfig(
            max_restarts=0, backoff_initial_ms=0, backoff_max_ms=0, escalate_to_kernel=True
        ),
    )
    chains: list[list[str]] = []
    try:
        async with open_kernel(config) as kernel:
            async with record_events(kernel) as recorder:
                kernel.spawn(pool(worker, size=2, name="p"))
                await trio.testing.wait_all_tasks_blocked()
                await kernel.send("p", "ok")  # p/0
                await kernel.send("p", "fail")  # p/1
                await trio.sleep(shrink_at)
                assert await resize_pool(kernel, "p", 1) == 1
                await trio.sleep(20)
                assert_conserved(kernel)
    except SupervisorEscalation as exc:
        chains.append(list(exc.chain))
    seen = [
        (e.kind.value, e.name, e.time)
        for e in recorder.events
        if (e.kind is EventKind.FAILED and e.name == "p/1") or e.kind is EventKind.ESCALATED
    ]
    assert ("failed", "p/1", 0.5) in seen
    if shrink_at == 0.0:
        assert chains == []
        assert [k for k, _, _ in seen] == ["failed"]
    else:
        assert [chain[-1] for chain in chains] == ["p/1"]
        assert [k for k, _, _ in seen].count("escalated") == 2  # p/supervisor, the root
