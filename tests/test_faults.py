"""Regressions for the hard failures of issue 12 (items 1-6): shutdown hangs, linked
children that leak, handling after the grace period, and one agent taking the kernel down.

Every test runs on a ``MockClock(autojump_threshold=0)`` (pytest-trio's ``autojump_clock``)
inside ``trio.fail_after``, so a ``stop()`` that never returns fails in mock time. The
kernel's shutdown is shielded from cancellation, so a hang *inside* it cannot be cut by
``fail_after``: the ``guard_real_time`` fixture turns such a hang into a failure after a
few seconds of real time (SIGALRM) instead of a stuck test run.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from nexus_trio import (
    Agent,
    AgentNotFound,
    Backoff,
    Config,
    Context,
    DeadLetterReason,
    EventKind,
    KernelConfig,
    KernelPhase,
    KernelShuttingDown,
    Message,
    MessageFailed,
    RequestFailed,
    SupervisionConfig,
    Supervisor,
    SupervisorEscalation,
    agent,
    open_kernel,
)
from nexus_trio.testing import assert_conserved, dead_letters, record_events, step_until_idle

from .conftest import timed_shutdown
from .hang_guard import real_time_limit, tasks_living

#: mock seconds a scenario may take before it counts as hung
MOCK_LIMIT = 600
#: real seconds before a hang the mock clock cannot cut (a shielded shutdown) fails the test
REAL_LIMIT = 30


@pytest.fixture(autouse=True)
def guard_real_time() -> Iterator[None]:
    with real_time_limit(REAL_LIMIT):
        yield


def config(
    *, max_restarts: int = 1000, grace_ms: float = 1000, escalate_to_kernel: bool = False
) -> Config:
    return Config(
        kernel=KernelConfig(dead_letter_buffer=100_000, shutdown_grace_ms=grace_ms),
        supervision=SupervisionConfig(
            max_restarts=max_restarts,
            backoff_initial_ms=0,
            backoff_max_ms=0,
            escalate_to_kernel=escalate_to_kernel,
        ),
    )


def names(kernel: Any) -> list[str | None]:
    return [ref.name for ref in kernel.agents()]


class Journal:
    """Lifecycle calls of every agent, in order: ("start" | "stop", name)."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, str | None]] = []

    def starts(self, name: str) -> int:
        return self.entries.count(("start", name))

    def stops(self, name: str) -> int:
        return self.entries.count(("stop", name))

    def assert_matched(self) -> None:
        started = Counter(n for what, n in self.entries if what == "start")
        stopped = Counter(n for what, n in self.entries if what == "stop")
        assert started == stopped, f"on_start/on_stop unmatched: {self.entries}"


def journaled(journal: Journal, **handlers: Any) -> type[Agent]:
    """An agent class that journals on_start/on_stop; ``handlers`` override its methods."""

    class Journaled(Agent):
        async def on_start(self, ctx: Context) -> None:
            journal.entries.append(("start", ctx.name))
            if "on_start" in handlers:
                await handlers["on_start"](self, ctx)

        async def handle(self, ctx: Context, msg: Message) -> Any:
            if "handle" in handlers:
                return await handlers["handle"](self, ctx, msg)
            return None

        async def on_stop(self, ctx: Context) -> None:
            if "on_stop" in handlers:
                await handlers["on_stop"](self, ctx)
            journal.entries.append(("stop", ctx.name))

    return Journaled


async def slow_stop(self: Agent, ctx: Context) -> None:
    """An ``on_stop`` that takes a second (journaled when it is done)."""
    await trio.sleep(1.0)


class CrashLoop(Agent):
    """Fails on every message (a crash-looping child)."""

    async def handle(self, ctx: Context, msg: Message) -> None:
        raise RuntimeError(f"crash {msg.payload}")


async def fail(self: Agent, ctx: Context, msg: Message) -> None:
    raise RuntimeError(f"scripted failure of {ctx.name}")


# --- item 1: shutdown with one_for_all / rest_for_one and linked children ------------------


@pytest.mark.parametrize("strategy", ["one_for_all", "rest_for_one"])
async def test_group_restart_that_stops_a_linked_child_does_not_hang_shutdown(
    strategy: str, autojump_clock: trio.testing.MockClock
) -> None:
    journal = Journal()
    leaf = journaled(journal)

    async def spawn_leaf(self: Agent, ctx: Context) -> None:
        ctx.spawn(leaf, name=None)

    failer = journaled(journal, handle=fail)
    parent = journaled(journal, on_start=spawn_leaf)
    baseline = tasks_living()
    with trio.fail_after(MOCK_LIMIT):
        async with open_kernel(config(), seed=1) as kernel:
            kernel.spawn(
                Supervisor(
                    strategy=strategy,
                    max_restarts=100,
                    backoff=Backoff(0, 0),
                    children=[agent(failer, name="failer"), agent(parent, name="parent")],
                )
            )
            await step_until_idle(kernel)
            assert len(kernel.agents()) == 3
            for round_ in range(3):
                await kernel.send("failer", round_)
                await step_until_idle(kernel)
                # The group (failer, parent, the parent's linked leaf) restarted: the
                # old leaf is gone for good, the new run spawned one new leaf.
                assert len(kernel.agents()) == 3, kernel.describe()
            assert journal.starts("failer") == 4
            assert journal.starts("parent") == 4
            assert journal.starts(None) == 4
            assert journal.stops(None) == 3
    assert journal.starts(None) == journal.stops(None) == 4
    journal.assert_matched()
    assert_conserved(kernel)
    assert kernel.stats().in_flight == 0
    assert tasks_living() == baseline


# --- item 2: stop(child) right after spawning its supervisor, or while it restarts ----------


#: the races below depend on Trio's (randomised) scheduling order: try each one many times
TRIES = 20


@pytest.mark.parametrize("checkpoints", [0, 1, 2, 3, 4, 5])
async def test_stop_child_right_after_spawning_its_supervisor(
    checkpoints: int, autojump_clock: trio.testing.MockClock
) -> None:
    journal = Journal()
    worker = journaled(journal)
    baseline = tasks_living()
    with trio.fail_after(MOCK_LIMIT):
        async with open_kernel(config(), seed=1) as kernel:
            for i in range(TRIES):
                kernel.spawn(
                    Supervisor(
                        children=[agent(worker, name=f"w{i}"), agent(worker, name=f"keep{i}")]
                    )
                )
                for _ in range(checkpoints):
                    await trio.lowlevel.checkpoint()
                await kernel.stop(kernel.lookup(f"w{i}"))
                assert f"w{i}" not in names(kernel)
                with pytest.raises(AgentNotFound):
                    kernel.lookup(f"w{i}")
            await step_until_idle(kernel)
            assert names(kernel) == [f"keep{i}" for i in range(TRIES)]
    journal.assert_matched()
    assert [journal.starts(f"keep{i}") for i in range(TRIES)] == [1] * TRIES
    assert_conserved(kernel)
    assert tasks_living() == baseline


@pytest.mark.parametrize(
    ("into_backoff", "checkpoints"), [(0.5, 0), (1.0, 0), (1.0, 1), (1.0, 2), (1.0, 3)]
)
async def test_stop_child_while_its_supervisor_waits_to_restart(
    into_backoff: float, checkpoints: int, autojump_clock: trio.testing.MockClock
) -> None:
    journal = Journal()
    cfg = Config(
        kernel=KernelConfig(dead_letter_buffer=10_000),
        supervision=SupervisionConfig(
            max_restarts=1000, backoff_initial_ms=1000, backoff_max_ms=1000, backoff_jitter=0
        ),
    )
    baseline = tasks_living()
    with trio.fail_after(MOCK_LIMIT):
        async with open_kernel(cfg, seed=1) as kernel, record_events(kernel) as events:
            for i in range(TRIES):
                kernel.spawn(
                    Supervisor(
                        name=f"sup{i}",
                        max_restarts=0,
                        children=[
                            agent(journaled(journal, handle=fail), name=f"crasher{i}"),
                            agent(journaled(journal), name=f"sibling{i}"),
                        ],
                    )
                )
                await step_until_idle(kernel)
                await kernel.send(f"crasher{i}", "boom")
                # The supervisor gives up at once (max_restarts=0) and fails; the root
                # restarts it after a 1 s backoff. Stop its child inside that window.
                await trio.testing.wait_all_tasks_blocked()
                (failure,) = events.of(EventKind.FAILED)[-1:]
                assert failure.name == f"sup{i}"
                assert kernel.describe()["children"][i]["state"] == "restarting"
                # Mid-backoff, or right when the backoff ends and the supervisor starts.
                await trio.sleep_until(failure.time + into_backoff)
                for _ in range(checkpoints):
                    await trio.lowlevel.checkpoint()
                await kernel.stop(kernel.lookup(f"crasher{i}"))
                assert f"crasher{i}" not in names(kernel)
                await trio.sleep(1)
                await step_until_idle(kernel)
                # The supervisor came back with its other child only.
                assert names(kernel) == [f"sibling{j}" for j in range(i + 1)]
                assert journal.starts(f"sibling{i}") == 2
                # Stopped before the supervisor's restart, or just after it started again.
                assert journal.starts(f"crasher{i}") == journal.stops(f"crasher{i}") in (1, 2)
                assert EventKind.RESTARTED in events.kinds(f"sup{i}")
    journal.assert_matched()
    assert_conserved(kernel)
    assert tasks_living() == baseline


# --- item 3: stop(worker) racing stop(its supervisor) ----------------------------------------


@pytest.mark.parametrize(
    ("first", "gap"),
    [
        ("worker", 0.0),
        ("sup", 0.0),
        ("worker", 0.5),
    ],
)
async def test_stop_worker_racing_stop_of_its_supervisor_both_return(
    first: str, gap: float, autojump_clock: trio.testing.MockClock
) -> None:
    journal = Journal()

    SlowStop = journaled(journal, on_stop=slow_stop)

    baseline = tasks_living()
    with trio.fail_after(MOCK_LIMIT):
        async with open_kernel(config(), seed=1) as kernel:
            for i in range(TRIES):
                returned: list[tuple[str, float]] = []
                sup = kernel.spawn(
                    Supervisor(
                        name=f"sup{i}",
                        children=[
                            agent(SlowStop, name=f"w1-{i}", shutdown_timeout=5),
                            agent(SlowStop, name=f"w2-{i}", shutdown_timeout=5),
                        ],
                    )
                )
                await step_until_idle(kernel)
                targets = {"worker": kernel.lookup(f"w1-{i}"), "sup": sup}
                second = "sup" if first == "worker" else "worker"
                start = trio.current_time()

                async def stop(label: str, target: Any, since: float, into: list[Any]) -> None:
                    await kernel.stop(target)
                    into.append((label, trio.current_time() - since))

                with trio.fail_after(60):
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(stop, first, targets[first], start, returned)
                        await trio.sleep(gap)
                        nursery.start_soon(stop, second, targets[second], start, returned)
                assert sorted(label for label, _ in returned) == ["sup", "worker"]
                assert kernel.agents() == []
                assert journal.stops(f"w1-{i}") == journal.stops(f"w2-{i}") == 1
                # Two on_stops of 1 s each, one after the other: both stops are done by 2 s.
                assert max(took for _, took in returned) == pytest.approx(2.0)
    journal.assert_matched()
    assert not dead_letters(kernel), "nothing was queued, nothing may be dead-lettered"
    assert_conserved(kernel)
    assert tasks_living() == baseline


# --- item 4: linked children stop with their parent's run --------------------------------------


async def test_linked_children_do_not_leak_across_restarts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    journal = Journal()
    leaf = journaled(journal)

    async def spawn_leaf(self: Agent, ctx: Context) -> None:
        ctx.spawn(leaf)

    parent = agent(journaled(journal, on_start=spawn_leaf, handle=fail), name="parent")
    baseline = tasks_living()
    with trio.fail_after(MOCK_LIMIT):
        async with open_kernel(config(), seed=1) as kernel:
            kernel.spawn(parent)
            await step_until_idle(kernel)
            assert len(kernel.agents()) == 2
            for i in range(5):
                await kernel.send("parent", i)
                await step_until_idle(kernel)
                assert len(kernel.agents()) == 2, (i, kernel.describe())
            assert journal.starts("parent") == 6
            assert journal.starts(None) == 6
            assert journal.stops(None) == 5
            assert kernel.stats().restarts == 5
    journal.assert_matched()
    assert_conserved(kernel)
    assert tasks_living() == baseline


async def test_transient_parent_exiting_normally_stops_its_linked_child(
    autojump_clock: trio.testing.MockClock,
) -> None:
    journal = Journal()
    leaf = journaled(journal)

    async def spawn_leaf(self: Agent, ctx: Context) -> None:
        ctx.spawn(leaf, name="leaf")

    async def exit_normally(self: Agent, ctx: Context, msg: Message) -> None:
        ctx.stop()

    parent = agent(
        journaled(journal, on_start=spawn_leaf, handle=exit_normally),
        name="parent",
        restart="transient",
    )
    with trio.fail_after(MOCK_LIMIT):
        async with open_kernel(config(), seed=1) as kernel:
            kernel.spawn(parent)
            await step_until_idle(kernel)
            assert names(kernel) == ["parent", "leaf"]
            await kernel.send("parent", "done")
            await step_until_idle(kernel)
            assert kernel.agents() == []
            assert journal.entries[:2] == [("start", "parent"), ("start", "leaf")]
            assert journal.stops("parent") == journal.stops("leaf") == 1
    assert kernel.stats().restarts == 0
    assert_conserved(kernel)


async def test_named_linked_child_does_not_make_restarts_fail(
    autojump_clock: trio.testing.MockClock,
) -> None:
    journal = Journal()
    leaf = journaled(journal)

    async def spawn_named_leaf(self: Agent, ctx: Context) -> None:
        ctx.spawn(leaf, name="leaf")

    parent = agent(journaled(journal, on_start=spawn_named_leaf, handle=fail), name="parent")
    leaf_ids = []
    with trio.fail_after(MOCK_LIMIT):
        async with open_kernel(config(max_restarts=3), seed=1) as kernel:
            kernel.spawn(parent)
            await step_until_idle(kernel)
            leaf_ids.append(kernel.lookup("leaf").id)
            # Three failures: within the default intensity (max_restarts=3), so each one
            # must restart the parent, which spawns "leaf" again under the same name.
            for i in range(3):
                await kernel.send("parent", i)
                await step_until_idle(kernel)
                assert names(kernel) == ["parent", "leaf"], kernel.describe()
                leaf_ids.append(kernel.lookup("leaf").id)
            assert journal.starts("parent") == journal.starts("leaf") == 4
            assert kernel.stats().given_up == 0
            assert kernel.stats().restarts == 3
    # Each run had its own leaf; none was left behind, nothing escalated.
    assert len(set(leaf_ids)) == 4
    journal.assert_matched()
    assert_conserved(kernel)


# --- item 5: nothing is handled after the grace period ---------------------------------------


async def test_nothing_is_handled_after_the_grace_period(
    autojump_clock: trio.testing.MockClock,
) -> None:
    journal = Journal()
    handled_at: list[tuple[float, Any]] = []
    stop_order: list[str | None] = []

    async def slow_or_fail(self: Agent, ctx: Context, msg: Message) -> None:
        handled_at.append((trio.current_time(), msg.payload))
        if msg.payload.startswith("fail"):
            raise RuntimeError("queued failure")
        await trio.sleep(0.3)

    class Later(Agent):
        async def on_start(self, ctx: Context) -> None:
            journal.entries.append(("start", ctx.name))

        async def handle(self, ctx: Context, msg: Message) -> None:
            pass

        async def on_stop(self, ctx: Context) -> None:
            stop_order.append(ctx.name)
            # While this agent stops, the earlier one must not go on handling.
            await trio.sleep(1)
            journal.entries.append(("stop", ctx.name))

    class Earlier(Agent):
        async def on_start(self, ctx: Context) -> None:
            journal.entries.append(("start", ctx.name))

        handle = slow_or_fail

        async def on_stop(self, ctx: Context) -> None:
            stop_order.append(ctx.name)
            journal.entries.append(("stop", ctx.name))

    payloads = ["slow1", "slow2", "slow3", "fail", "slow4", "slow5"]
    with trio.fail_after(MOCK_LIMIT):
        async with open_kernel(config(grace_ms=500), seed=1) as kernel:
            kernel.spawn(agent(Earlier, name="earlier"))
            kernel.spawn(agent(Later, name="later", shutdown_timeout=5))
            await step_until_idle(kernel)
            for payload in payloads:
                await kernel.send("earlier", payload)
            shutdown_at = trio.current_time()
    grace_end = shutdown_at + 0.5
    assert handled_at, "the grace period should let some messages be handled"
    late = [(t - shutdown_at, p) for t, p in handled_at if t > grace_end]
    assert late == [], f"handled after the grace period: {late}"
    # Spawned after "earlier", "later" stops first: the queued failure never ran.
    assert stop_order == ["later", "earlier"]
    assert journal.entries[-2:] == [("stop", "later"), ("stop", "earlier")]
    assert not dead_letters(kernel, DeadLetterReason.HANDLER_ERROR)
    shutdown_dead = {d.message.payload for d in dead_letters(kernel, DeadLetterReason.SHUTDOWN)}
    handled = {p for _, p in handled_at}
    # Every message is either handled in the grace period or dead-lettered "shutdown"
    # (the one being handled when the grace ended is cancelled: it is both started and dead).
    assert shutdown_dead | handled == set(payloads)
    assert "fail" in shutdown_dead
    assert kernel.stats().restarts == 0
    assert_conserved(kernel)


# --- item 6: directives and the isolating root -------------------------------------------------


@pytest.mark.parametrize(
    "on_error",
    ["resume", "restart", "stop", "escalate", {Exception: "stop"}, {MessageFailed: "escalate"}],
    ids=["resume", "restart", "stop", "escalate", "Exception-stop", "MessageFailed-escalate"],
)
async def test_message_failed_fails_only_its_message_whatever_the_directive(
    autojump_clock: trio.testing.MockClock, on_error: Any
) -> None:
    """supervision.md: "``MessageFailed`` (raised by a handler) always fails just that
    message, as ``resume`` does", also under a directive that would restart, stop or
    escalate on any other exception, one given for ``MessageFailed`` itself included."""
    starts: list[str] = []

    class Picky(Agent):
        async def on_start(self, ctx: Context) -> None:
            starts.append("p")

        async def handle(self, ctx: Context, msg: Message) -> Any:
            if msg.payload == "bad":
                raise MessageFailed("bad input")
            return msg.payload

    tree = Supervisor(
        name="team", max_restarts=0, children=[agent(Picky, name="p", on_error=on_error)]
    )
    async with open_kernel(config()) as kernel, record_events(kernel) as events:
        kernel.spawn(tree)
        with pytest.raises(RequestFailed, match="bad input"):
            await kernel.request("p", "bad")
        assert await kernel.request("p", "good") == "good"
        stats = kernel.stats()
        assert (stats.failed, stats.restarts, stats.given_up) == (1, 0, 0)
        assert [d.message.payload for d in dead_letters(kernel)] == ["bad"]
    assert starts == ["p"]
    assert [e.kind.value for e in events.events if e.name == "p"][:2] == ["spawned", "started"]
    assert not [e for e in events.events if e.kind.value in ("failed", "restarted", "escalated")]


async def test_function_agent_resumes_by_default(autojump_clock: trio.testing.MockClock) -> None:
    seen: list[Any] = []

    @agent(name="fn")
    async def fn(ctx: Context, msg: Message) -> Any:
        if msg.payload == "bad":
            raise ValueError("bad payload")
        seen.append(msg.payload)
        return msg.payload

    with trio.fail_after(MOCK_LIMIT):
        async with (
            open_kernel(config(max_restarts=3), seed=1) as kernel,
            record_events(kernel) as events,
        ):
            kernel.spawn(fn)
            # Far more failures than the restart intensity allows: resume never restarts.
            for i in range(10):
                await kernel.send("fn", "bad")
                await kernel.send("fn", i)
            await step_until_idle(kernel)
            assert await kernel.request("fn", "still here") == "still here"
            stats = kernel.stats()
            assert (stats.failed, stats.restarts, stats.given_up) == (10, 0, 0)
            assert names(kernel) == ["fn"]
    assert seen == [*range(10), "still here"]
    assert len(dead_letters(kernel, DeadLetterReason.HANDLER_ERROR)) == 10
    assert all(
        isinstance(d.error, ValueError)
        for d in dead_letters(kernel, DeadLetterReason.HANDLER_ERROR)
    )
    assert EventKind.RESTARTED not in events.kinds("fn")
    assert EventKind.FAILED not in events.kinds("fn")
    assert_conserved(kernel)


class Counting(Agent):
    """Counts its messages (state a restart resets); raises what the payload names."""

    runs = 0

    def __init__(self) -> None:
        self.count = 0
        type(self).runs += 1

    async def handle(self, ctx: Context, msg: Message) -> Any:
        if msg.payload == "key":
            raise KeyError("k")
        if msg.payload == "value":
            raise ValueError("v")
        self.count += 1
        return self.count


async def test_class_agent_restarts_by_default(autojump_clock: trio.testing.MockClock) -> None:
    class Stateful(Counting):
        runs = 0

    with trio.fail_after(MOCK_LIMIT):
        async with open_kernel(config(), seed=1) as kernel:
            kernel.spawn(agent(Stateful, name="c"))
            assert await kernel.request("c", "+") == 1
            assert await kernel.request("c", "+") == 2
            await kernel.send("c", "value")
            await step_until_idle(kernel)
            # A fresh instance: the count starts again.
            assert await kernel.request("c", "+") == 1
            assert kernel.stats().restarts == 1
    assert Stateful.runs == 2
    assert_conserved(kernel)


async def test_on_error_per_exception_type(autojump_clock: trio.testing.MockClock) -> None:
    class PerType(Counting):
        runs = 0

    class FirstMatchWins(Counting):
        runs = 0

    with trio.fail_after(MOCK_LIMIT):
        async with open_kernel(config(), seed=1) as kernel:
            kernel.spawn(
                agent(
                    PerType, name="per-type", on_error={KeyError: "resume", ValueError: "restart"}
                )
            )
            kernel.spawn(
                agent(
                    FirstMatchWins,
                    name="first",
                    on_error={LookupError: "stop", KeyError: "resume"},
                )
            )
            assert await kernel.request("per-type", "+") == 1
            await kernel.send("per-type", "key")
            # Resumed: same instance, the count goes on.
            assert await kernel.request("per-type", "+") == 2
            await kernel.send("per-type", "value")
            await step_until_idle(kernel)
            # Restarted: a fresh instance.
            assert await kernel.request("per-type", "+") == 1
            assert PerType.runs == 2

            await kernel.send("first", "key")
            await kernel.send("first", "queued behind the failure")
            await step_until_idle(kernel)
            # KeyError is a LookupError: the first rule (stop) applies.
            assert names(kernel) == ["per-type"]
            assert FirstMatchWins.runs == 1
            assert kernel.stats().restarts == 1
    assert_conserved(kernel)
    stopped = dead_letters(kernel, DeadLetterReason.AGENT_STOPPED)
    assert [d.message.payload for d in stopped] == ["queued behind the failure"]


async def test_a_spec_with_rules_per_exception_type_is_spawned_under_a_name_of_the_spawn(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """``kernel.spawn(spec, name=...)`` (and ``agent(spec, name=)``, ``with_options``)
    failed for such a spec: the copy gave its rules, as the spec holds them, back to the
    check of the mapping users give (``on_error must be a directive or a mapping ...``)."""

    class PerType(Counting):
        runs = 0

    spec = agent(PerType, on_error={KeyError: "resume", ValueError: "stop"})
    assert agent(spec, name="b").on_error == spec.on_error
    assert spec.with_options(name="c").on_error == spec.on_error
    with pytest.raises(ValueError, match="on_error keys must be exception types, got 'key'"):
        spec.with_options(on_error=(("key", "stop"),))
    with trio.fail_after(MOCK_LIMIT):
        async with open_kernel(config(), seed=1) as kernel:
            kernel.spawn(spec, name="a")
            assert await kernel.request("a", "+") == 1
            await kernel.send("a", "key")
            assert await kernel.request("a", "+") == 2
            await kernel.send("a", "value")
            await step_until_idle(kernel)
            assert names(kernel) == []
            assert PerType.runs == 1
    assert_conserved(kernel)


async def test_stop_directive_stops_a_permanent_agent_for_good(
    autojump_clock: trio.testing.MockClock,
) -> None:
    journal = Journal()
    stopper = agent(journaled(journal, handle=fail), name="stopper", on_error="stop")
    with trio.fail_after(MOCK_LIMIT):
        async with open_kernel(config(), seed=1) as kernel, record_events(kernel) as events:
            kernel.spawn(stopper)
            await step_until_idle(kernel)
            for i in range(3):
                await kernel.send("stopper", i)
            await step_until_idle(kernel)
            assert kernel.agents() == []
            with pytest.raises(AgentNotFound):
                await kernel.send("stopper", "too late")
            assert kernel.stats().restarts == 0
    assert journal.entries == [("start", "stopper"), ("stop", "stopper")]
    assert [d.message.payload for d in dead_letters(kernel, DeadLetterReason.HANDLER_ERROR)] == [0]
    assert [d.message.payload for d in dead_letters(kernel, DeadLetterReason.AGENT_STOPPED)] == [
        1,
        2,
    ]
    assert events.kinds("stopper")[-2:] == [EventKind.FAILED, EventKind.STOPPED]
    assert EventKind.RESTARTED not in events.kinds("stopper")
    assert_conserved(kernel)


async def test_escalate_directive_fails_the_nested_supervisor(
    autojump_clock: trio.testing.MockClock,
) -> None:
    journal = Journal()
    with trio.fail_after(MOCK_LIMIT):
        async with open_kernel(config(), seed=1) as kernel, record_events(kernel) as events:
            kernel.spawn(
                Supervisor(
                    name="sup",
                    max_restarts=100,
                    backoff=Backoff(0, 0),
                    children=[
                        agent(journaled(journal), name="sibling"),
                        agent(
                            journaled(journal, handle=fail), name="escalator", on_error="escalate"
                        ),
                    ],
                )
            )
            await step_until_idle(kernel)
            await kernel.send("escalator", "boom")
            await step_until_idle(kernel)
            # The supervisor failed (despite its generous intensity) and the root
            # restarted it with both children: the sibling ran again too.
            assert journal.starts("sibling") == 2
            assert journal.starts("escalator") == 2
            assert names(kernel) == ["sibling", "escalator"]
            assert EventKind.ESCALATED in events.kinds("sup")
            assert EventKind.RESTARTED in events.kinds("sup")
            assert kernel.stats().given_up == 0
    journal.assert_matched()
    assert_conserved(kernel)


async def test_escalate_directive_at_the_isolating_root_stops_only_that_agent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(MOCK_LIMIT):
        async with open_kernel(config(), seed=1) as kernel, record_events(kernel) as events:
            kernel.spawn(agent(Counting, name="escalator", on_error="escalate"))
            kernel.spawn(agent(Counting, name="other"))
            await kernel.send("escalator", "value")
            await step_until_idle(kernel)
            assert names(kernel) == ["other"]
            assert await kernel.request("other", "+") == 1
            assert kernel.stats().given_up == 1
    assert EventKind.ESCALATED in events.kinds("escalator")
    assert_conserved(kernel)


async def test_isolating_root_gives_up_on_a_crash_loop_and_keeps_serving(
    autojump_clock: trio.testing.MockClock,
) -> None:
    @agent
    async def healthy(ctx: Context, msg: Message) -> Any:
        return {"echo": msg.payload, "from": ctx.name}

    cfg = Config(
        kernel=KernelConfig(dead_letter_buffer=100_000),
        supervision=SupervisionConfig(max_restarts=3, within_ms=5000),
    )
    baseline = tasks_living()
    with trio.fail_after(MOCK_LIMIT):
        async with open_kernel(cfg, seed=1) as kernel, record_events(kernel) as events:
            refs = [kernel.spawn(healthy, name=f"h{i}") for i in range(100)]
            kernel.spawn(agent(CrashLoop, name="crasher"))
            for i in range(10):
                await kernel.send("crasher", i)
            await step_until_idle(kernel)
            # Three restarts within 5 s are allowed; the fourth failure stops it for good.
            assert "crasher" not in names(kernel)
            assert len(kernel.agents()) == 100
            stats = kernel.stats()
            assert (stats.given_up, stats.restarts, stats.failed) == (1, 3, 4)
            assert not kernel.shutting_down
            for i, ref in enumerate(refs):
                assert await kernel.request(ref, i) == {"echo": i, "from": f"h{i}"}
    assert [d.message.payload for d in dead_letters(kernel, DeadLetterReason.HANDLER_ERROR)] == [
        0,
        1,
        2,
        3,
    ]
    assert [d.message.payload for d in dead_letters(kernel, DeadLetterReason.AGENT_STOPPED)] == [
        4,
        5,
        6,
        7,
        8,
        9,
    ]
    escalated = events.of(EventKind.ESCALATED)
    assert [e.name for e in escalated] == ["crasher"]
    assert isinstance(escalated[0].error, RuntimeError)
    assert events.kinds("crasher")[-1] is EventKind.STOPPED
    assert_conserved(kernel)
    assert tasks_living() == baseline


async def test_escalate_to_kernel_restores_whole_kernel_escalation(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cfg = Config(
        kernel=KernelConfig(dead_letter_buffer=100_000),
        supervision=SupervisionConfig(max_restarts=3, within_ms=5000, escalate_to_kernel=True),
    )
    body_cancelled = False
    kernels: list[Any] = []

    async def crash_loop_next_to_a_waiting_body() -> None:
        nonlocal body_cancelled
        async with open_kernel(cfg, seed=1) as kernel:
            kernels.append(kernel)
            kernel.spawn(agent(CrashLoop, name="crasher"))
            for i in range(10):
                await kernel.send("crasher", i)
            try:
                await trio.sleep_forever()
            except trio.Cancelled:
                body_cancelled = True
                raise

    with trio.fail_after(MOCK_LIMIT), pytest.raises(SupervisorEscalation) as raised:
        await crash_loop_next_to_a_waiting_body()
    (kernel,) = kernels
    assert body_cancelled
    assert raised.value.chain[-1] == "crasher"
    assert isinstance(raised.value.last_error, RuntimeError)
    stats = kernel.stats()
    assert (stats.given_up, stats.failed) == (0, 4)
    assert kernel.stopped
    assert_conserved(kernel)


async def test_an_escalation_to_the_kernel_during_the_drain_ends_the_drain(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Regression: with ``escalate_to_kernel``, an agent that failed during the drain made
    the root give up: it stopped every child (``busy`` after the message in hand, 10 s)
    but not for good, so their queues stayed in flight until the tree was retired, and
    nothing woke the drain: it waited out the whole grace period (100 s). The drain ends
    when the root's run ends; what is left is dead-lettered ``shutdown`` and
    ``open_kernel`` raises ``SupervisorEscalation``."""
    gate = trio.Event()

    class Fails(Agent):
        async def on_start(self, ctx: Context) -> None:
            pass

        async def handle(self, ctx: Context, msg: Message) -> None:
            await gate.wait()
            raise RuntimeError("boom")

    class Busy(Agent):
        async def on_start(self, ctx: Context) -> None:
            pass

        async def handle(self, ctx: Context, msg: Message) -> None:
            await trio.sleep(10)

    took: list[float] = []
    kernels: list[Any] = []

    async def fail_during_the_drain() -> None:
        cfg = config(max_restarts=0, grace_ms=100_000, escalate_to_kernel=True)
        async with open_kernel(cfg) as kernel:
            kernels.append(kernel)
            busy = kernel.spawn(agent(Busy, name="busy"))
            fails = kernel.spawn(agent(Fails, name="fails"))
            await kernel.send(busy, "b1")
            await kernel.send(busy, "b2")  # queued: still in flight when busy has stopped
            await kernel.send(fails, "f")
            await trio.testing.wait_all_tasks_blocked()
            # (fails raises once the gate opens: the root escalates during the drain)
            took.append(await timed_shutdown(kernel, gate))

    with trio.fail_after(MOCK_LIMIT), pytest.raises(SupervisorEscalation) as raised:
        await fail_during_the_drain()
    (kernel,) = kernels
    assert raised.value.chain[-1] == "fails"
    assert took == [10.0]  # busy's message in hand, not the grace period
    assert kernel.stopped
    letters = sorted((d.message.payload, d.reason) for d in dead_letters(kernel))
    assert letters == [("b2", DeadLetterReason.SHUTDOWN), ("f", DeadLetterReason.HANDLER_ERROR)]
    assert kernel.stats().handled == 1  # b1
    assert_conserved(kernel)


async def test_an_escalation_during_the_drain_does_not_stop_the_tree_past_the_grace(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Regression: the kernel drains (grace 10 s, ``busy`` holds a message); at 5 s
    ``fails`` makes the root give up, and the root stops its children. ``starting`` (no
    ``shutdown_timeout`` of its own, still in ``on_start``) was given its whole default
    timeout (10 s, from 5 s on) although the kernel's grace ended at 10 s, past which an
    agent without a timeout of its own is cancelled at once: the shutdown took 15 s. The
    escalation's stop now ends at the kernel's deadline."""
    log: list[str] = []

    class Fails(Agent):
        async def on_start(self, ctx: Context) -> None:
            pass

        async def handle(self, ctx: Context, msg: Message) -> None:
            await trio.sleep(5)
            raise RuntimeError("boom")

    class Busy(Agent):
        async def on_start(self, ctx: Context) -> None:
            pass

        async def handle(self, ctx: Context, msg: Message) -> None:
            await trio.sleep_forever()

    class Starting(Agent):
        async def on_start(self, ctx: Context) -> None:
            try:
                await trio.sleep_forever()
            finally:
                log.append(f"starting cancelled at {trio.current_time():g}")

        async def handle(self, ctx: Context, msg: Message) -> None:
            pass

    took: list[float] = []
    kernels: list[Any] = []

    async def fail_during_the_drain() -> None:
        cfg = config(max_restarts=0, grace_ms=10_000, escalate_to_kernel=True)
        async with open_kernel(cfg) as kernel:
            kernels.append(kernel)
            fails = kernel.spawn(agent(Fails, name="fails", handle_timeout=1000.0))
            busy = kernel.spawn(agent(Busy, name="busy", handle_timeout=1000.0))
            kernel.spawn(agent(Starting, name="starting"))
            await kernel.send(fails, "f")
            await kernel.send(busy, "b")
            await trio.testing.wait_all_tasks_blocked()
            took.append(await timed_shutdown(kernel, trio.Event()))

    with trio.fail_after(MOCK_LIMIT), pytest.raises(SupervisorEscalation) as raised:
        await fail_during_the_drain()
    (kernel,) = kernels
    assert raised.value.chain[-1] == "fails"
    assert log == ["starting cancelled at 10"]
    assert took == [10.0]  # the grace, not 5 s + starting's own 10 s
    letters = sorted((d.message.payload, d.reason) for d in dead_letters(kernel))
    assert letters == [("b", DeadLetterReason.SHUTDOWN), ("f", DeadLetterReason.HANDLER_ERROR)]
    assert_conserved(kernel)


class BoomOrBusy(Agent):
    """Raises on ``"boom"``; any other message keeps it busy for 10 s."""

    async def on_start(self, ctx: Context) -> None:
        pass

    async def handle(self, ctx: Context, msg: Message) -> None:
        if msg.payload == "boom":
            raise RuntimeError("boom")
        await trio.sleep(10)


async def test_the_shutdown_after_an_escalation_to_the_kernel_does_not_wait_out_the_grace(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Regression: the same before the shutdown: the root gave up while the kernel ran and
    stopped ``busy`` after its message in hand (10 s), leaving one queued; the shutdown
    that leaving the cancelled block starts then waited out the whole grace (100 s) for
    it."""

    kernels: list[Any] = []

    async def fail_while_running() -> None:
        cfg = config(max_restarts=0, grace_ms=100_000, escalate_to_kernel=True)
        async with open_kernel(cfg) as kernel:
            kernels.append(kernel)
            busy = kernel.spawn(agent(BoomOrBusy, name="busy"))
            await kernel.send(busy, "b1")
            await kernel.send(busy, "b2")
            await trio.testing.wait_all_tasks_blocked()
            await kernel.send(kernel.spawn(agent(BoomOrBusy, name="fails")), "boom")
            await trio.sleep_forever()

    start = trio.current_time()
    with trio.fail_after(MOCK_LIMIT), pytest.raises(SupervisorEscalation):
        await fail_while_running()
    (kernel,) = kernels
    assert trio.current_time() - start == 10.0
    assert [(d.message.payload, d.reason) for d in dead_letters(kernel)] == [
        ("boom", DeadLetterReason.HANDLER_ERROR),
        ("b2", DeadLetterReason.SHUTDOWN),
    ]
    assert_conserved(kernel)


async def test_an_escalation_to_the_kernel_goes_out_of_a_block_cancelled_from_outside(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Regression (found by the fault machine with ``escalate_to_kernel``): the root gave
    up (``fails`` raised) and stopped ``busy``, whose message in hand takes 10 s; at 1 s
    a cancel scope around the block was cancelled. ``open_kernel`` raised the block's
    ``Cancelled``, which that scope took: the escalation, the tree's failure, was lost
    (logged only), where Trio loses no child's error to a cancel. It goes out now, past
    the cancelled scope, once the kernel has stopped (promptly: no drain)."""

    kernels: list[Any] = []
    scopes: list[trio.CancelScope] = []

    async def cancelled_while_the_root_gives_up() -> None:
        cfg = config(max_restarts=0, grace_ms=100_000, escalate_to_kernel=True)
        with trio.move_on_after(1) as outside:
            scopes.append(outside)
            async with open_kernel(cfg) as kernel:
                kernels.append(kernel)
                busy = kernel.spawn(agent(BoomOrBusy, name="busy"))
                await kernel.send(busy, "b1")
                await trio.testing.wait_all_tasks_blocked()
                await kernel.send(kernel.spawn(agent(BoomOrBusy, name="fails")), "boom")
                await trio.sleep_forever()

    start = trio.current_time()
    with trio.fail_after(MOCK_LIMIT), pytest.raises(SupervisorEscalation) as raised:
        await cancelled_while_the_root_gives_up()
    (kernel,) = kernels
    assert raised.value.chain[-1] == "fails"
    assert isinstance(raised.value.last_error, RuntimeError)
    # raised in place of the block's Cancelled, not chained to it (as the escalation of
    # a block that was not cancelled: it was raised nowhere before)
    assert raised.value.__context__ is None
    assert raised.value.__cause__ is None
    assert scopes[0].cancel_called
    assert trio.current_time() - start == 1.0  # the cancel's prompt stop, not busy's 10 s
    assert kernel.stopped
    assert [(d.message.payload, d.reason) for d in dead_letters(kernel)] == [
        ("boom", DeadLetterReason.HANDLER_ERROR),
        ("b1", DeadLetterReason.SHUTDOWN),
    ]
    assert_conserved(kernel)


async def test_stop_worker_while_its_supervisor_is_stopping_waits_for_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """``kernel.stop(w1)`` while ``kernel.stop(sup)`` is stopping sup's children.

    The supervisor is busy stopping w2 (a 1 s ``on_stop``); w1 is still running. Its stop
    must return once w1 has stopped (its ``on_stop`` done), w1 must stop after w2 (reverse
    start order) and must not fail.
    """
    journal = Journal()

    SlowStop = journaled(journal, on_stop=slow_stop)

    baseline = tasks_living()
    with trio.fail_after(MOCK_LIMIT):
        async with open_kernel(config(), seed=1) as kernel, record_events(kernel) as events:
            sup = kernel.spawn(
                Supervisor(
                    name="sup",
                    children=[
                        agent(SlowStop, name="w1", shutdown_timeout=5),
                        agent(SlowStop, name="w2", shutdown_timeout=5),
                    ],
                )
            )
            await step_until_idle(kernel)
            w1 = kernel.lookup("w1")
            stopped_when_worker_stop_returned: list[list[tuple[str, str | None]]] = []

            async def stop_worker() -> None:
                await kernel.stop(w1)
                stopped_when_worker_stop_returned.append(list(journal.entries))

            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(kernel.stop, sup)
                    await trio.sleep(0.5)
                    assert journal.entries[-1] == ("start", "w2"), "w2 is still stopping"
                    nursery.start_soon(stop_worker)
            assert kernel.agents() == []
    (seen,) = stopped_when_worker_stop_returned
    assert ("stop", "w1") in seen, f"stop(w1) returned before w1 stopped: {seen}"
    assert [n for what, n in journal.entries if what == "stop"] == ["w2", "w1"]
    assert EventKind.FAILED not in events.kinds("w1"), "w1 failed while being stopped"
    journal.assert_matched()
    assert_conserved(kernel)
    assert tasks_living() == baseline


# --- shutdown asked from inside the supervision tree -----------------------------------------


async def test_shutdown_called_from_a_handler_returns_and_the_kernel_shuts_down(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Regression: ``kernel.shutdown()`` awaited in a handler deadlocked. The drain waited
    for that very handler (its message in flight) for the whole grace period, then the
    caller waited, shielded, for the root to be done while the root waited for the
    caller's run to end (a hang the mock clock cannot cut: ``guard_real_time``).

    From inside the tree the call starts the shutdown and returns (OTP's ``init:stop()``):
    sends from outside are refused from then on, the caller's message and the one queued
    behind it (which asks again: that returns at once too) are handled in the drain, and
    the kernel stops without waiting out the grace period.
    """
    returned: list[tuple[Any, Any]] = []

    @agent(name="quitter")
    async def quitter(ctx: Context, msg: Message) -> None:
        await ctx.kernel.shutdown()
        returned.append((msg.payload, ctx.kernel.phase))

    with trio.fail_after(MOCK_LIMIT):
        async with open_kernel(config(grace_ms=100_000), seed=1) as kernel:
            ref = kernel.spawn(quitter)
            start = trio.current_time()
            async with kernel.events() as stream:  # it ends when the shutdown is done
                await kernel.send(ref, "quit")
                await kernel.send(ref, "again")
                async for _ in stream:
                    pass
            took = trio.current_time() - start
            assert kernel.stopped
            with pytest.raises(KernelShuttingDown):
                await kernel.send(ref, "late")
    assert took == 0.0
    assert returned == [("quit", KernelPhase.DRAINING), ("again", KernelPhase.DRAINING)]
    stats = kernel.stats()
    assert (stats.handled, stats.dead_lettered, stats.in_flight) == (2, 0, 0)
    assert_conserved(kernel)


async def test_a_shutdown_an_agent_asks_for_ends_the_block_once_the_kernel_has_stopped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A handler's ``shutdown()`` while the block waits on nothing of the kernel's
    (``sleep_forever``): the kernel stopped, and the block slept on (``open_kernel``
    never returned: the test's ``fail_after`` cut it). The shutdown now drains, stops
    every agent (``on_stop`` in order), and only then cancels the block, which leaves
    as a block that ended; a reader of the events stream in the block gets every item
    up to the stream's end, though the block is cancelled right after it ends."""
    order: list[str] = []

    class Worker(Agent):
        async def on_stop(self, ctx: Context) -> None:
            order.append(f"on_stop {ctx.name}")

        async def handle(self, ctx: Context, msg: Message) -> None:
            await trio.sleep(1)
            order.append(f"handled {ctx.name} {msg.payload}")

    @agent(name="quitter")
    async def quitter(ctx: Context, msg: Message) -> None:
        await ctx.kernel.shutdown()
        order.append(f"shutdown asked ({ctx.kernel.phase.name.lower()})")

    seen: list[tuple[EventKind, str | None]] = []

    async def read(stream: Any) -> None:
        async for event in stream:
            seen.append((event.kind, event.name))
        order.append("stream ended")

    with trio.fail_after(MOCK_LIMIT):
        async with open_kernel(config(grace_ms=10_000), seed=1) as kernel:
            async with kernel.events() as stream, trio.open_nursery() as block:
                block.start_soon(read, stream)
                w1 = kernel.spawn(Worker, name="w1")
                w2 = kernel.spawn(Worker, name="w2")
                ref = kernel.spawn(quitter)
                for i in range(3):
                    await kernel.send(w1, i)
                    await kernel.send(w2, i)
                await kernel.send(ref, "quit")
                try:
                    await trio.sleep_forever()
                finally:
                    order.append(f"block cancelled ({kernel.phase.name.lower()})")
        order.append(f"open_kernel returned at {trio.current_time():g}")
    # (w1 and w2 handle at the same moments: in either order between them)
    assert sorted(order[1:7]) == sorted(f"handled {n} {i}" for i in range(3) for n in ("w1", "w2"))
    assert [entry for entry in order[1:7] if "w1" in entry] == [f"handled w1 {i}" for i in range(3)]
    assert order[:1] + order[7:] == [
        "shutdown asked (draining)",
        "on_stop w2",
        "on_stop w1",
        # (the reader and the rest of the block, each in its turn)
        *order[9:11],
        "open_kernel returned at 3",
    ]
    assert sorted(order[9:11]) == ["block cancelled (stopped)", "stream ended"]
    stopped = [name for kind, name in seen if kind is EventKind.STOPPED]
    assert sorted(stopped) == ["quitter", "w1", "w2"]
    stats = kernel.stats()
    assert (stats.handled, stats.dead_lettered, stats.in_flight) == (7, 0, 0)
    assert_conserved(kernel)


async def test_a_block_that_waits_for_a_shutdown_an_agent_asked_for_is_not_cancelled(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A block that calls ``shutdown()`` itself, also to wait for one a handler started,
    goes on once it returns (``nexus run`` leaves its cluster then): only a block that
    did not ask is cancelled when the kernel stops."""
    after: list[str] = []

    @agent(name="quitter")
    async def quitter(ctx: Context, msg: Message) -> None:
        await ctx.kernel.shutdown()

    with trio.fail_after(MOCK_LIMIT):
        async with open_kernel(config(), seed=1) as kernel:
            await kernel.send(kernel.spawn(quitter), "quit")
            await kernel.shutdown()
            await trio.sleep(5)
            after.append(kernel.phase.name.lower())
    assert after == ["stopped"]
    assert_conserved(kernel)


async def test_a_shutdown_called_beside_the_block_ends_the_block_not_its_caller(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """``kernel.shutdown()`` from a task beside the block (in a nursery around
    ``open_kernel``): the block, parked in a sleep, slept on with the kernel stopped
    until its own deadline (for ever in ``sleep_forever``). It is now cancelled once the
    kernel has stopped, as for an agent's shutdown; the caller beside, not in the block,
    is not cancelled: its call returns and it goes on."""
    order: list[str] = []

    @agent(name="worker")
    async def worker(ctx: Context, msg: Message) -> None:
        await trio.sleep(1)
        order.append(f"handled {msg.payload}")

    async def stopper(kernel: Any) -> None:
        await trio.sleep(0.5)
        await kernel.shutdown()
        order.append(f"shutdown returned at {trio.current_time():g}")
        await trio.sleep(1)
        order.append(f"caller went on to {trio.current_time():g}")

    with trio.fail_after(MOCK_LIMIT):
        async with trio.open_nursery() as outside:
            async with open_kernel(config(grace_ms=10_000), seed=1) as kernel:
                ref = kernel.spawn(worker)
                await kernel.send(ref, 1)
                await kernel.send(ref, 2)
                outside.start_soon(stopper, kernel)
                try:
                    await trio.sleep(10)
                finally:
                    order.append(f"block left at {trio.current_time():g}")
            order.append(f"open_kernel returned ({kernel.phase.name.lower()})")
    assert order == [
        "handled 1",
        "handled 2",
        # (the block and the caller, each in its turn)
        *order[2:4],
        "open_kernel returned (stopped)",
        "caller went on to 3",
    ]
    assert sorted(order[2:4]) == ["block left at 2", "shutdown returned at 2"]
    assert_conserved(kernel)


async def test_a_shutdown_called_beside_after_open_kernel_returned_returns(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """``kernel.shutdown()`` again from a task beside, after ``open_kernel`` returned
    (its nursery closed): the check of who asked looked for the kernel's nursery among
    the block task's open nurseries and raised ``ValueError``; the kernel is stopped, the
    call returns at once."""
    order: list[str] = []

    @agent(name="idle")
    async def idle(ctx: Context, msg: Message) -> None:
        pass

    async def beside(kernel: Any) -> None:
        await kernel.shutdown()
        order.append(f"beside returned ({kernel.phase.name.lower()})")

    with trio.fail_after(MOCK_LIMIT):
        async with trio.open_nursery() as outside:
            async with open_kernel(config(), seed=1) as kernel:
                kernel.spawn(idle)
            await kernel.shutdown()
            order.append("block's task returned")
            outside.start_soon(beside, kernel)
    assert order == ["block's task returned", "beside returned (stopped)"]


async def test_wait_shutting_down_wakes_before_any_agent_has_stopped_for_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """``wait_shutting_down()`` beside the block: it returns once an agent's
    ``on_start`` asked for the shutdown, with nothing in flight to drain, and before any
    agent has stopped for it (``nexus run`` notes what ran there); at once for a waiter
    that comes after."""
    seen: list[tuple[bool, bool, int]] = []

    @agent(name="idle")
    async def idle(ctx: Context, msg: Message) -> None:
        return None

    class Quitter(Agent):
        async def on_start(self, ctx: Context) -> None:
            await trio.sleep(1)
            await ctx.kernel.shutdown()

        async def handle(self, ctx: Context, msg: Message) -> None:
            return None

    async def watch(kernel: Any) -> None:
        await kernel.wait_shutting_down()
        # (draining, or stopping already: nothing was in flight to drain)
        seen.append((kernel.shutting_down, kernel.stopped, kernel.stats().agents_alive))

    with trio.fail_after(MOCK_LIMIT):
        async with trio.open_nursery() as outside:
            async with open_kernel(config(), seed=1) as kernel:
                outside.start_soon(watch, kernel)
                kernel.spawn(idle)
                kernel.spawn(Quitter, name="quitter")
                await trio.sleep_forever()
        await kernel.wait_shutting_down()
    assert seen == [(True, False, 2)]
    assert kernel.stats().agents_alive == 0


async def test_a_shutdown_called_by_a_task_the_block_started_leaves_the_block_to_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A task in a nursery the block opened calls ``shutdown()`` and goes on once it
    returns: cancelling the block would cancel that caller too, so the block is not
    cancelled; the caller owns the block's end (here: it cancels the block's nursery)."""
    order: list[str] = []

    async def stopper(kernel: Any, block: trio.Nursery) -> None:
        await trio.sleep(0.5)
        await kernel.shutdown()
        order.append(f"shutdown returned ({kernel.phase.name.lower()})")
        await trio.sleep(1)
        order.append(f"caller went on to {trio.current_time():g}")
        block.cancel_scope.cancel()

    with trio.fail_after(MOCK_LIMIT):
        async with open_kernel(config(), seed=1) as kernel:
            async with trio.open_nursery() as block:
                block.start_soon(stopper, kernel, block)
                await trio.sleep_forever()
            order.append(f"block went on to {trio.current_time():g}")
    assert order == ["shutdown returned (stopped)", "caller went on to 1.5", "block went on to 1.5"]
    assert_conserved(kernel)


async def test_an_outside_send_waiting_for_room_is_refused_when_an_agent_shuts_down(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A send from the block waiting for room in a full mailbox when a handler asks for
    the shutdown: it waited on, and took the room the agent's stop made in the stopping
    phase (accepted after the drain, where every send is refused, then dead-lettered).
    It now ends with ``KernelShuttingDown`` (``draining``) when the shutdown starts, as
    any send from outside then; nothing of it is accepted, the rest is dead-lettered."""
    handled: list[Any] = []

    @agent(name="slow", mailbox_capacity=1)
    async def slow(ctx: Context, msg: Message) -> None:
        await trio.sleep(10)
        handled.append(msg.payload)

    @agent(name="quitter")
    async def quitter(ctx: Context, msg: Message) -> None:
        await ctx.kernel.shutdown()

    outcome: list[Any] = []
    with trio.fail_after(MOCK_LIMIT):
        cfg = config(grace_ms=100)
        cfg = attrs.evolve(cfg, kernel=attrs.evolve(cfg.kernel, send_timeout_ms=60_000))
        async with open_kernel(cfg, seed=1) as kernel:
            s, q = kernel.spawn(slow), kernel.spawn(quitter)
            await kernel.send(s, 1)
            await trio.testing.wait_all_tasks_blocked()
            await kernel.send(s, 2)  # the mailbox is full

            async def quit_soon() -> None:
                await trio.sleep(1)
                await kernel.send(q, "quit")

            async with trio.open_nursery() as block:
                block.start_soon(quit_soon)
                try:
                    await kernel.send(s, 3)
                except KernelShuttingDown as exc:
                    outcome.append((exc.phase, trio.current_time()))
    assert outcome == [("draining", 1.0)]
    assert handled == []  # the grace (0.1 s) was shorter than the handler
    stats = kernel.stats()
    assert stats.rejected == {"shutting_down": 1}
    assert (stats.accepted, stats.handled, stats.in_flight) == (3, 1, 0)
    assert stats.dead_letters_by_reason == {"shutdown": 2}
    assert_conserved(kernel)
