"""Supervision: strategies, restart types, intensity, backoff, escalation, order, events.

Every test runs on trio's MockClock (pytest-trio's ``autojump_clock``), so backoff delays and
restart windows are exact kernel times, not sleeps.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from nexus_trio import (
    Agent,
    AgentNotFound,
    AgentNotRunning,
    Backoff,
    Config,
    Context,
    DeadLetterReason,
    EventKind,
    LifecycleEvent,
    Message,
    RequestFailed,
    SupervisionConfig,
    Supervisor,
    SupervisorEscalation,
    agent,
    open_kernel,
)
from nexus_trio.testing import assert_conserved, dead_letters, record_events

from .conftest import make_config

NO_BACKOFF = Backoff(initial=0, maximum=0, jitter=0)


def strict_root() -> Config:
    """OTP at the root: the first failure that reaches it shuts the kernel down."""
    return Config(supervision=SupervisionConfig(max_restarts=0, escalate_to_kernel=True))


class Journal:
    """What every tracked agent did, in order: ("start"|"stop"|"handle", name, detail)."""

    entries: ClassVar[list[tuple[str, str, Any]]] = []

    @classmethod
    def reset(cls) -> None:
        cls.entries = []

    @classmethod
    def of(cls, what: str) -> list[str]:
        return [name for kind, name, _ in cls.entries if kind == what]


@pytest.fixture(autouse=True)
def _fresh_journal() -> None:
    Journal.reset()


class Tracked(Agent):
    """Records start/stop/handle; fails when the payload is "boom"; state is a counter."""

    def __init__(self) -> None:
        self.seen = 0

    async def on_start(self, ctx: Context) -> None:
        Journal.entries.append(("start", ctx.name or "?", None))

    async def handle(self, ctx: Context, msg: Message) -> Any:
        self.seen += 1
        Journal.entries.append(("handle", ctx.name or "?", (msg.payload, self.seen)))
        if msg.payload == "boom":
            raise RuntimeError(f"{ctx.name} exploded")
        if msg.payload == "exit":
            ctx.stop()
        return self.seen

    async def on_stop(self, ctx: Context) -> None:
        Journal.entries.append(("stop", ctx.name or "?", None))


def tracked(name: str, **options: Any) -> Any:
    return agent(Tracked, name=name, **options)


def sup(*children: Any, **options: Any) -> Supervisor:
    options.setdefault("backoff", NO_BACKOFF)
    options.setdefault("max_restarts", 100)
    return Supervisor(children=children, **options)


# --- strategies ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("strategy", "restarted", "stopped_in_order"),
    [
        ("one_for_one", ["b"], ["b"]),
        ("one_for_all", ["a", "b", "c"], ["c", "a", "b"]),
        ("rest_for_one", ["b", "c"], ["c", "b"]),
    ],
)
async def test_strategies_restart_the_right_children_in_order(
    autojump_clock: Any, strategy: str, restarted: list[str], stopped_in_order: list[str]
) -> None:
    async with open_kernel(make_config()) as kernel:
        kernel.spawn(sup(tracked("a"), tracked("b"), tracked("c"), strategy=strategy))
        await trio.testing.wait_all_tasks_blocked()
        assert Journal.of("start") == ["a", "b", "c"]
        Journal.reset()
        await kernel.send("b", "boom")
        await trio.testing.wait_all_tasks_blocked()
        # Siblings are stopped in reverse start order (the failed one has already stopped
        # by failing, its on_stop still runs), then the group starts again in start order.
        assert sorted(Journal.of("stop")) == sorted(stopped_in_order)
        siblings_stopped = [n for n in Journal.of("stop") if n != "b"]
        assert siblings_stopped == [n for n in stopped_in_order if n != "b"]
        assert Journal.of("start") == restarted
        for name in ("a", "b", "c"):
            assert await kernel.request(name, "ping") == 1  # fresh state everywhere
        per_agent = {a.name: a.restarts for a in kernel.stats(agents=True).agents}
        assert per_agent == {n: (1 if n in restarted else 0) for n in ("a", "b", "c")}


async def test_root_strategy_comes_from_the_config(autojump_clock: Any) -> None:
    config = Config(
        supervision=SupervisionConfig(
            strategy="one_for_all",  # type: ignore[arg-type]
            max_restarts=10,
            backoff_initial_ms=0,
            backoff_max_ms=0,
        )
    )
    async with open_kernel(config) as kernel:
        kernel.spawn(tracked("a"))
        kernel.spawn(tracked("b"))
        await trio.testing.wait_all_tasks_blocked()
        Journal.reset()
        await kernel.send("a", "boom")
        await trio.testing.wait_all_tasks_blocked()
        assert Journal.of("start") == ["a", "b"]


# --- restart types -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("restart", "after_failure", "after_normal_exit"),
    [
        ("permanent", True, True),
        ("transient", True, False),
        ("temporary", False, False),
    ],
)
async def test_restart_types(
    autojump_clock: Any, restart: str, after_failure: bool, after_normal_exit: bool
) -> None:
    async with open_kernel(make_config()) as kernel:
        kernel.spawn(sup(tracked("f", restart=restart), tracked("n", restart=restart)))
        await trio.testing.wait_all_tasks_blocked()
        await kernel.send("f", "boom")
        await kernel.send("n", "exit")
        await trio.testing.wait_all_tasks_blocked()
        names = {ref.name for ref in kernel.agents()}
        assert ("f" in names) is after_failure
        assert ("n" in names) is after_normal_exit
        assert Journal.of("start").count("f") == (2 if after_failure else 1)
        assert Journal.of("start").count("n") == (2 if after_normal_exit else 1)


# --- restart keeps the address and the mailbox ---------------------------------------------------


async def test_restart_keeps_id_name_and_queued_messages_in_order(autojump_clock: Any) -> None:
    async with open_kernel(make_config()) as kernel:
        ref = kernel.spawn(sup(tracked("w"), backoff=Backoff(initial=1.0, maximum=1.0, jitter=0)))
        del ref
        before = kernel.lookup("w")
        await trio.testing.wait_all_tasks_blocked()
        await kernel.send("w", "boom")
        # These arrive while the agent waits out its 1 s backoff: they wait in the mailbox.
        for i in range(5):
            await kernel.send("w", i)
        await trio.testing.wait_all_tasks_blocked()
        assert [e for e in Journal.entries if e[0] == "handle"] == [("handle", "w", ("boom", 1))]
        depth = {a.name: a.mailbox_depth for a in kernel.stats(agents=True).agents}["w"]
        assert depth == 5
        await trio.sleep(1.0)
        await trio.testing.wait_all_tasks_blocked()
        after = kernel.lookup("w")
        assert after == before
        handled = [detail for kind, _, detail in Journal.entries if kind == "handle"]
        # Fresh state: the counter starts again at 1 after the restart.
        assert handled == [("boom", 1), (0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]
        assert [
            d.message.payload for d in dead_letters(kernel, DeadLetterReason.HANDLER_ERROR)
        ] == ["boom"]
        assert_conserved(kernel)


async def test_failed_message_is_dead_lettered_with_the_exception_and_logged(
    autojump_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="nexus_trio")
    async with open_kernel(make_config()) as kernel:
        ref = kernel.spawn(tracked("w"))
        with pytest.raises(RequestFailed) as info:
            await kernel.request(ref, "boom")
        assert info.value.reason == "handler_error"
        [letter] = dead_letters(kernel, DeadLetterReason.HANDLER_ERROR)
        assert isinstance(letter.error, RuntimeError)
        assert str(letter.error) == "w exploded"
    records = [r for r in caplog.records if r.exc_info]
    assert records, "the handler failure is logged with its traceback"
    record = records[0]
    assert record.__dict__["agent_id"] == str(ref.id)
    assert record.__dict__["agent_name"] == "w"
    assert "exploded" in caplog.text and "Traceback" in caplog.text


async def test_failures_restarts_and_escalations_are_logged_where_the_docs_say(
    autojump_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """supervision.md names the loggers of failures, restarts and escalations, and the
    agent fields on their records. Before, it named ``nexus_trio.kernel`` and
    ``nexus_trio.agent``: restarts, escalations and give-ups are on ``nexus_trio.supervisor``
    (a filter on the loggers the page named missed them all)."""
    caplog.set_level(logging.INFO, logger="nexus_trio")
    inner = sup(tracked("nb"), name="inner", max_restarts=0)
    config = Config(
        supervision=SupervisionConfig(max_restarts=1, backoff_initial_ms=0, backoff_max_ms=0)
    )
    async with open_kernel(config) as kernel:
        w = kernel.spawn(tracked("w"))
        inner_ref = kernel.spawn(inner)
        nb_id = kernel.lookup("nb").id
        for name in ("w", "nb", "w"):
            await kernel.send(name, "boom")
            await trio.testing.wait_all_tasks_blocked()
        assert kernel.stats().given_up == 1
    ids = {"w": str(w.id), "nb": str(nb_id), "inner": str(inner_ref.id)}
    seen = [
        (r.name, r.levelname, r.__dict__["agent_name"], r.getMessage().split(" ")[0])
        for r in caplog.records
        if r.name != "nexus_trio.dead_letters" and r.levelno >= logging.INFO
    ]
    assert seen == [
        ("nexus_trio.agent", "ERROR", "w", "handler"),  # w fails
        ("nexus_trio.supervisor", "INFO", "w", "restarting"),
        ("nexus_trio.agent", "ERROR", "nb", "handler"),  # nb fails, inner escalates
        ("nexus_trio.supervisor", "ERROR", "inner", "supervisor"),
        ("nexus_trio.supervisor", "INFO", "inner", "restarting"),
        ("nexus_trio.agent", "ERROR", "w", "handler"),  # w fails again: given up on
        ("nexus_trio.supervisor", "ERROR", "w", "w"),
    ]
    for record in caplog.records:
        if record.name != "nexus_trio.dead_letters" and record.levelno >= logging.INFO:
            assert record.__dict__["agent_id"] == ids[record.__dict__["agent_name"]]
    assert all(r.exc_info for r in caplog.records if r.name == "nexus_trio.agent")
    # the count of restarts reads as a count ("1 restart", not "1 restarts")
    gave_up = [
        r.getMessage()
        for r in caplog.records
        if r.name == "nexus_trio.supervisor" and r.levelno == logging.ERROR
    ]
    assert gave_up == [
        "supervisor inner: restart intensity exceeded (0 restarts within 5s) after nb"
        " failed; escalating",
        "w stopped for good: restart intensity exceeded (1 restart within 5s); the kernel goes on",
    ]
    page = (Path(__file__).parent.parent / "docs" / "supervision.md").read_text("utf-8")
    sentence = page.split("Failures, restarts and escalations are also logged", 1)[1]
    named = set(re.findall(r"`(nexus_trio\.\w+)`", sentence.split("\n\n", 1)[0]))
    assert named == {name for name, *_ in seen}


# --- intensity and backoff -----------------------------------------------------------------------


async def test_max_restarts_allows_n_restarts_and_escalates_on_the_next_failure(
    autojump_clock: Any,
) -> None:
    with pytest.raises(SupervisorEscalation) as info:  # noqa: PT012 - the body is the scenario
        async with open_kernel(strict_root()) as kernel:
            kernel.spawn(sup(tracked("w"), name="team", max_restarts=3, within=5.0))
            for _ in range(3):
                await kernel.send("w", "boom")
                await trio.testing.wait_all_tasks_blocked()
            assert Journal.of("start") == ["w"] * 4  # three restarts, still alive
            assert kernel.stats().restarts == 3
            await kernel.send("w", "boom")
            await trio.sleep(10)  # cancelled by the escalation
            pytest.fail("the kernel body should have been cancelled")
    assert info.value.chain == ("kernel", "root", "team", "w")
    assert isinstance(info.value.last_error, RuntimeError)
    assert "team -> w" in str(info.value)


async def test_failures_spread_beyond_the_window_do_not_escalate(autojump_clock: Any) -> None:
    async with open_kernel(make_config()) as kernel:
        kernel.spawn(sup(tracked("w"), max_restarts=2, within=1.0))
        for _ in range(10):
            await kernel.send("w", "boom")
            await trio.testing.wait_all_tasks_blocked()
            await trio.sleep(0.6)  # at most two failures fall in any 1 s window
        assert kernel.stats().restarts == 10
        assert await kernel.request("w", "ping") == 1


async def test_the_root_and_a_supervisor_have_the_defaults_the_docs_state(
    autojump_clock: Any,
) -> None:
    """supervision.md: the root's strategy, intensity and backoff come from
    ``[supervision]`` ("defaults: one_for_one, 3 restarts within 5 s, backoff 10 ms
    doubling to 5 s, 20 % jitter, reset after 30 s"), a ``Supervisor`` has the same, is
    ``permanent`` and waits for its children for as long as they take."""
    config = SupervisionConfig()
    assert (
        config.strategy.value,
        config.max_restarts,
        config.within_ms,
        config.backoff_initial_ms,
        config.backoff_max_ms,
        config.backoff_jitter,
        config.backoff_reset_after_ms,
        config.escalate_to_kernel,
    ) == ("one_for_one", 3, 5000, 10, 5000, 0.2, 30000, False)
    spec = Supervisor()
    assert (spec.strategy.value, spec.max_restarts, spec.within) == ("one_for_one", 3, 5.0)
    assert spec.backoff == Backoff(initial=0.01, maximum=5.0, jitter=0.2, reset_after=30.0)
    assert (spec.restart.value, spec.shutdown_timeout) == ("permanent", float("inf"))
    # the root's delays, as the kernel runs them: 10 ms doubling, stretched by up to 20 %
    async with open_kernel() as kernel, record_events(kernel) as events:
        kernel.spawn(tracked("w"))
        for _ in range(3):
            await kernel.send("w", "boom")
            await trio.testing.wait_all_tasks_blocked()
            await trio.sleep(1)
    delays = [
        float(e.reason.removeprefix("backoff ").removesuffix("s")) for e in events.of("restarted")
    ]
    assert len(delays) == 3
    for n, delay in enumerate(delays):
        assert 0.01 * 2**n <= delay <= 0.01 * 2**n * 1.2


def test_backoff_doubles_is_capped_and_jitter_stays_in_bounds() -> None:
    exact = Backoff(initial=0.1, maximum=1.0, jitter=0)
    rng = random.Random(1)
    assert [exact.delay(n, rng) for n in range(6)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    jittery = Backoff(initial=0.1, maximum=1.0, jitter=0.5)
    for step in range(8):
        base = min(1.0, 0.1 * 2**step)
        for _ in range(200):
            d = jittery.delay(step, rng)
            assert base <= d <= min(1.0, base * 1.5)
    with pytest.raises(ValueError, match="maximum"):
        Backoff(initial=2.0, maximum=1.0)
    with pytest.raises(ValueError, match="jitter"):
        Backoff(jitter=-1)


def test_backoff_draws_from_the_rng_only_when_the_factor_can_change_the_delay() -> None:
    """Nothing is drawn at jitter 0 (OTP's fixed delays) nor for a delay of 0 (``Backoff(0,
    0)``): a seeded kernel's later draws are not shifted by restarts that cannot jitter."""
    rng = random.Random(7)
    state = rng.getstate()
    assert [Backoff(0.1, 1.0, jitter=0).delay(n, rng) for n in range(6)] == pytest.approx(
        [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    )
    assert [Backoff(0, 0, jitter=0.5).delay(n, rng) for n in range(3)] == [0.0, 0.0, 0.0]
    assert rng.getstate() == state
    # a factor that counts: one draw per delay, the same as a twin generator's
    twin = random.Random(7)
    assert Backoff(0.1, 1.0, jitter=0.5).delay(0, rng) == pytest.approx(
        0.1 * (1.0 + twin.random() * 0.5)
    )
    assert rng.getstate() == twin.getstate()


@pytest.mark.parametrize("jitter", [1.5, 2, -0.1, float("nan"), float("inf"), True, "0.2"])
def test_backoff_refuses_the_jitter_the_config_refuses(jitter: Any) -> None:
    with pytest.raises(ValueError, match=r"^jitter must be a number between 0 and 1, got "):
        Backoff(jitter=jitter)
    with pytest.raises(ValueError, match=r"backoff_jitter must be a number between 0 and 1, got "):
        SupervisionConfig(backoff_jitter=jitter)


@pytest.mark.parametrize("jitter", [0, 0.5, 1, 1.0])
def test_backoff_takes_every_jitter_from_0_to_1(jitter: float) -> None:
    assert Backoff(jitter=jitter).jitter == jitter


def timed_failures(starts: list[float]) -> type[Agent]:
    """An agent class whose starts are noted in ``starts`` and whose handler always raises."""

    class Timed(Agent):
        async def on_start(self, ctx: Context) -> None:
            starts.append(trio.current_time())

        async def handle(self, ctx: Context, msg: Message) -> None:
            raise RuntimeError("again")

    return Timed


async def test_backoff_delays_restarts_and_resets_after_a_healthy_run(autojump_clock: Any) -> None:
    starts: list[float] = []
    backoff = Backoff(initial=0.5, maximum=2.0, jitter=0, reset_after=10.0)
    async with open_kernel(make_config()) as kernel:
        kernel.spawn(
            Supervisor(
                children=[agent(timed_failures(starts), name="t")],
                max_restarts=100,
                within=1.0,
                backoff=backoff,
            )
        )
        await trio.testing.wait_all_tasks_blocked()
        for _ in range(4):
            t0 = trio.current_time()
            await kernel.send("t", None)
            await trio.sleep(5)
            assert starts[-1] - t0 == pytest.approx(min(2.0, 0.5 * 2 ** (len(starts) - 2)))
        # Healthy for longer than reset_after: the next restart starts from `initial` again.
        await trio.sleep(20)
        t0 = trio.current_time()
        await kernel.send("t", None)
        await trio.sleep(5)
        assert starts[-1] - t0 == pytest.approx(0.5)


async def test_a_run_with_no_backoff_to_reset_keeps_no_float_of_the_clock(
    autojump_clock: Any,
) -> None:
    """A run's start time is read only at a restart, to reset a backoff that has grown:
    every run took a new float of the clock (32 bytes in every running agent). A run with
    no backoff to reset keeps the shared 0.0; one after a restart with a backoff still
    reads the clock, and a healthy run resets its backoff as before."""
    from nexus_trio._cell import AgentCell

    starts: list[float] = []

    @agent
    async def plain(ctx: Context, msg: Message) -> None:
        return None

    backoff = Backoff(initial=0.5, maximum=2.0, jitter=0, reset_after=10.0)
    async with open_kernel(make_config()) as kernel:
        await trio.sleep(1)  # a clock that is not at 0.0
        for i in range(3):
            kernel.spawn(plain, name=f"unclocked-{i}")
        kernel.spawn(
            Supervisor(
                children=[agent(timed_failures(starts), name="unclocked-flaky")],
                max_restarts=100,
                backoff=backoff,
            )
        )
        await trio.testing.wait_all_tasks_blocked()
        for i in range(3):
            await kernel.send(f"unclocked-{i}", i)
        await trio.testing.wait_all_tasks_blocked()
        gc.collect()  # (cells of earlier kernels of this process, gone)
        cells = {
            obj.name: obj
            for obj in gc.get_objects()
            if isinstance(obj, AgentCell) and obj.name is not None
        }
        plain_cells = [cells[f"unclocked-{i}"] for i in range(3)]
        assert all(cell.running for cell in plain_cells)
        assert [cell.started_at for cell in plain_cells] == [0.0, 0.0, 0.0]
        assert len({id(cell.started_at) for cell in plain_cells}) == 1
        # two failures: the second restart waits twice the first's backoff
        for _ in range(2):
            t0 = trio.current_time()
            await kernel.send("unclocked-flaky", None)
            await trio.sleep(5)
            assert starts[-1] - t0 == pytest.approx(0.5 * 2 ** (len(starts) - 2))
        assert cells["unclocked-flaky"].started_at == starts[-1]
        # healthy for longer than reset_after: the next restart starts from `initial`
        await trio.sleep(20)
        t0 = trio.current_time()
        await kernel.send("unclocked-flaky", None)
        await trio.sleep(5)
        assert starts[-1] - t0 == pytest.approx(0.5)
        assert len(starts) == 4
        assert kernel.stats().handled == 3


async def test_restarted_events_carry_the_backoff(autojump_clock: Any) -> None:
    async with open_kernel(make_config()) as kernel, record_events(kernel) as rec:
        kernel.spawn(sup(tracked("w"), backoff=Backoff(initial=0.25, maximum=1.0, jitter=0)))
        await trio.testing.wait_all_tasks_blocked()
        for _ in range(3):
            await kernel.send("w", "boom")
            await trio.sleep(2)
    # (to the millisecond, without trailing zeros: it read "backoff 0.250000s")
    reasons = [e.reason for e in rec.of("restarted")]
    assert reasons == ["backoff 0.25 s", "backoff 0.5 s", "backoff 1 s"]
    assert [e.restarts for e in rec.of("restarted")] == [1, 2, 3]


# --- escalation ----------------------------------------------------------------------------------


async def test_nested_escalation_is_handled_by_the_parent_strategy(autojump_clock: Any) -> None:
    async with open_kernel(make_config()) as kernel, record_events(kernel) as rec:
        inner = sup(tracked("w"), tracked("x"), name="inner", max_restarts=1)
        kernel.spawn(sup(tracked("sibling"), inner, name="outer", max_restarts=5))
        await trio.testing.wait_all_tasks_blocked()
        await kernel.send("x", "boom")
        await trio.testing.wait_all_tasks_blocked()
        Journal.reset()
        await kernel.send("x", "boom")  # second failure: inner gives up, outer restarts it
        await trio.testing.wait_all_tasks_blocked()
        assert Journal.of("stop") == ["x", "w"]  # inner stops its children in reverse order
        assert Journal.of("start") == ["w", "x"]  # outer restarted inner (one_for_one)
        assert "sibling" not in Journal.of("start")
        assert await kernel.request("x", "ping") == 1
    [escalated] = rec.of("escalated")
    assert escalated.name == "inner"
    assert isinstance(escalated.error, RuntimeError)
    assert [e.name for e in rec.of("restarted")] == ["x", "inner"]


async def test_a_supervisor_that_gave_up_is_reported_with_the_public_escalation(
    autojump_clock: Any,
) -> None:
    # Before: its `failed` and `restarted` events carried the kernel's private
    # `Escalation` (reason 'Escalation', not importable: `isinstance(event.error,
    # SupervisorEscalation)` was False), and a monitor's notice read
    # "Escalation(('inner', 'x'), RuntimeError('boom'))".
    notices: list[Any] = []

    @agent(name="watcher")
    async def watcher(ctx: Context, msg: Message) -> None:
        if msg.payload == "watch":
            ctx.monitor("inner")
        else:
            notices.append(msg.payload)

    async with open_kernel(make_config()) as kernel, record_events(kernel) as rec:
        inner = sup(tracked("w"), tracked("x"), name="inner", max_restarts=0)
        kernel.spawn(sup(inner, name="outer", max_restarts=5))
        kernel.spawn(watcher)
        await kernel.send("watcher", "watch")
        await trio.testing.wait_all_tasks_blocked()
        await kernel.send("x", "boom")  # inner gives up at once, outer restarts it
        await trio.testing.wait_all_tasks_blocked()
    [failed] = [e for e in rec.of("failed") if e.name == "inner"]
    [restarted] = [e for e in rec.of("restarted") if e.name == "inner"]
    for reported in (failed, restarted):
        assert isinstance(reported.error, SupervisorEscalation)
        assert reported.error.chain == ("inner", "x")
        assert isinstance(reported.error.last_error, RuntimeError)
    assert failed.reason == "SupervisorEscalation"
    assert str(failed.error).startswith("restart intensity exceeded along inner -> x;")
    [notice] = notices
    assert notice["event"] == "failed" and notice["name"] == "inner"
    assert "restart intensity exceeded along inner -> x" in notice["reason"]
    assert "Escalation((" not in notice["reason"]


async def test_escalation_to_the_root_shuts_down_gracefully(autojump_clock: Any) -> None:
    body_reached_end = False
    with pytest.raises(SupervisorEscalation) as info:  # noqa: PT012 - the body is the scenario
        async with open_kernel(strict_root()) as kernel:
            inner = sup(tracked("w"), name="inner", max_restarts=0)
            kernel.spawn(sup(tracked("first"), inner, name="outer", max_restarts=0))
            await trio.testing.wait_all_tasks_blocked()
            await kernel.send("first", 1)
            await kernel.send("w", "boom")
            await trio.sleep_forever()
            body_reached_end = True
    assert not body_reached_end
    assert info.value.chain == ("kernel", "root", "outer", "inner", "w")
    assert str(info.value.last_error) == "w exploded"
    # Everyone was stopped once, and nobody was left running.
    assert sorted(Journal.of("stop")) == ["first", "w"]
    assert kernel.agents() == []
    assert_conserved(kernel)


# --- shutdown timeouts and order -----------------------------------------------------------------


class Stubborn(Agent):
    stopped_at: ClassVar[dict[str, float]] = {}
    cancelled: ClassVar[list[str]] = []

    async def handle(self, ctx: Context, msg: Message) -> bool:
        return True

    async def on_stop(self, ctx: Context) -> None:
        try:
            await trio.sleep_forever()
        finally:
            Stubborn.stopped_at[ctx.name or "?"] = trio.current_time()
            Stubborn.cancelled.append(ctx.name or "?")


@pytest.mark.parametrize("timeout", [0.0, 1.5])
async def test_shutdown_timeout_is_a_grace_then_cancel(autojump_clock: Any, timeout: float) -> None:
    Stubborn.stopped_at.clear()
    async with open_kernel(make_config()) as kernel:
        ref = kernel.spawn(agent(Stubborn, name="s", shutdown_timeout=timeout))
        await kernel.request(ref, None)
        t0 = trio.current_time()
        await kernel.stop(ref)
        # 0 means at once (the cell gives on_stop one millisecond to notice).
        assert trio.current_time() - t0 == pytest.approx(timeout, abs=0.002)
        assert Stubborn.stopped_at["s"] - t0 == pytest.approx(timeout, abs=0.002)
        assert kernel.agents() == []


async def test_an_on_stop_cut_short_by_its_shutdown_timeout_in_a_group_restart_is_logged(
    autojump_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: an ``on_stop`` cancelled at its ``shutdown_timeout`` ended without a word
    (its cleanup cut short, nobody told); OTP reports such a child, killed after its
    timeout, as a ``shutdown_error``. Now a WARNING names the agent and the timeout. The
    restart waits for it (the timeout, no more), and it is no failure: not counted, no
    ``failed`` event."""
    caplog.set_level(logging.WARNING, logger="nexus_trio")
    Stubborn.stopped_at.clear()

    class Failing(Agent):
        async def handle(self, ctx: Context, msg: Message) -> None:
            raise RuntimeError("boom")

    tree = Supervisor(
        name="group",
        strategy="one_for_all",
        backoff=Backoff(0, 0),
        children=[
            agent(Stubborn, name="s", shutdown_timeout=1.5),
            agent(Failing, name="f", shutdown_timeout=0),
        ],
    )
    async with open_kernel(make_config()) as kernel, record_events(kernel) as rec:
        kernel.spawn(tree)
        await kernel.request("s", None)
        await kernel.send("f", "fail")
        await trio.testing.wait_all_tasks_blocked()  # s in on_stop, for the restart
        await kernel.request("s", None)  # answered by its next run
        assert trio.current_time() == pytest.approx(1.5, abs=0.002)
        assert Stubborn.stopped_at["s"] == pytest.approx(1.5, abs=0.002)
        stats = kernel.stats()
        assert (stats.failed, stats.run_failures, stats.restarts) == (1, 0, 2)
    cut = [r.getMessage() for r in caplog.records if "on_stop" in r.getMessage()]
    # (twice: the restart's stop and the shutdown's; shutdown_timeout=0 cancels at once
    # by request, as OTP's brutal_kill, and is not reported)
    assert (
        cut
        == ["on_stop of agent s did not return within its shutdown_timeout (1.5s): cancelled"] * 2
    )
    assert [e.name for e in rec.of("failed")] == ["f"]


async def test_shutdown_stops_children_before_parents_in_reverse_start_order(
    autojump_clock: Any,
) -> None:
    async with open_kernel(make_config()) as kernel:
        kernel.spawn(tracked("a"))
        kernel.spawn(sup(tracked("b1"), sup(tracked("c1"), tracked("c2")), tracked("b2")))
        kernel.spawn(tracked("d"))
        await trio.testing.wait_all_tasks_blocked()
    assert Journal.of("stop") == ["d", "b2", "c2", "c1", "b1", "a"]


# --- events and monitors -------------------------------------------------------------------------


async def test_lifecycle_events_in_order(autojump_clock: Any) -> None:
    async with open_kernel(make_config()) as kernel, record_events(kernel) as rec:
        ref = kernel.spawn(tracked("w"))
        await trio.testing.wait_all_tasks_blocked()
        await kernel.send(ref, "boom")
        await trio.testing.wait_all_tasks_blocked()
        await kernel.stop(ref)
    assert rec.kinds("w") == [
        EventKind.SPAWNED,
        EventKind.STARTED,
        EventKind.FAILED,
        EventKind.RESTARTED,
        EventKind.STARTED,
        EventKind.STOPPED,
    ]
    failed = rec.of("failed")[0]
    assert failed.reason == "RuntimeError" and str(failed.error) == "w exploded"
    assert all(e.agent_id == ref.id for e in rec.events if e.name == "w")


async def test_monitor_receives_failed_and_stopped_events(autojump_clock: Any) -> None:
    seen: list[Any] = []

    @agent(name="watcher")
    async def watcher(ctx: Context, msg: Message) -> str | None:
        if msg.payload == "watch":
            ctx.monitor("w")
            return "watching"
        if msg.payload == "watch-ghost":
            ctx.monitor("ghost")
            return "watching"
        seen.append(
            (msg.kind.value, msg.payload["event"], msg.payload["name"], msg.payload["reason"])
        )
        return None

    async with open_kernel(make_config()) as kernel:
        kernel.spawn(watcher)
        w = kernel.spawn(tracked("w"))
        await kernel.request("watcher", "watch")
        await kernel.send(w, "boom")
        await trio.testing.wait_all_tasks_blocked()
        await kernel.stop(w)
        await kernel.request("watcher", "watch-ghost")
        await trio.testing.wait_all_tasks_blocked()
    assert seen == [
        ("Event", "failed", "w", "RuntimeError('w exploded')"),
        ("Event", "stopped", "w", "stopped"),
        ("Event", "stopped", "ghost", "noproc"),
    ]


async def test_run_failures_outside_a_handler_are_counted_once_per_run(
    autojump_clock: Any,
) -> None:
    """``stats().run_failures`` (kernel-wide and per agent) counts the runs that failed
    outside a handler, once each: ``on_start`` raising, a ``ctx.nursery`` task raising, a
    task raising while its agent is stopped, ``on_stop`` raising (also after another such
    failure in the same run). Handler failures are counted in ``failed`` only, also when
    ``on_stop`` raises after one, or a background task fails with one."""
    runs: Counter[str] = Counter()

    async def hang_then_raise() -> None:
        try:
            await trio.sleep_forever()
        finally:
            raise OSError("cannot close while stopping")

    async def raise_soon() -> None:
        await trio.lowlevel.checkpoint()
        raise OSError("background task fails")

    class Failing(Agent):
        """How its run fails depends on its name (``-once``: its first run only)."""

        async def on_start(self, ctx: Context) -> None:
            name = ctx.name or "?"
            runs[name] += 1
            if name.endswith("-once") and runs[name] > 1:
                return
            if name.startswith("on_start"):
                raise RuntimeError("on_start fails")
            if name.startswith("background") or name == "two":
                ctx.nursery.start_soon(raise_soon)
            if name == "stopping":
                ctx.nursery.start_soon(hang_then_raise)

        async def handle(self, ctx: Context, msg: Message) -> None:
            if ctx.name == "handler-and-background":
                # the task fails first, while the handler cannot be cancelled
                ctx.nursery.start_soon(raise_soon)
                with trio.CancelScope(shield=True):
                    await trio.sleep(1)
            raise RuntimeError("handler fails")

        async def on_stop(self, ctx: Context) -> None:
            if ctx.name in ("on_stop", "two", "handler-then-on_stop"):
                raise OSError("on_stop fails")

    def failing(name: str) -> Any:
        return agent(Failing, name=name, restart="permanent" if "once" in name else "temporary")

    async def one_more(kernel: Any, failed: int, run_failures: int) -> None:
        await trio.testing.wait_all_tasks_blocked()
        stats = kernel.stats()
        assert (stats.failed, stats.run_failures) == (failed, run_failures)

    async with open_kernel(make_config()) as kernel, record_events(kernel) as rec:
        kernel.spawn(failing("on_start-once"))
        await one_more(kernel, 0, 1)
        kernel.spawn(failing("background-once"))
        await one_more(kernel, 0, 2)
        for name, count in (("stopping", 3), ("on_stop", 4)):
            ref = kernel.spawn(failing(name))
            await one_more(kernel, 0, count - 1)  # started, not failed yet
            await kernel.stop(ref)
            await one_more(kernel, 0, count)
        kernel.spawn(failing("two"))  # a background task, then on_stop: one failed run
        await one_more(kernel, 0, 5)
        await kernel.send(kernel.spawn(failing("handler")), "x")
        await one_more(kernel, 1, 5)
        await kernel.send(kernel.spawn(failing("handler-then-on_stop")), "x")
        await one_more(kernel, 2, 5)
        # a background task failing in the run its handler ended: that run counts once
        await kernel.send(kernel.spawn(failing("handler-and-background")), "x")
        await trio.sleep(2)
        await one_more(kernel, 3, 5)

        per_agent = {a.name: (a.failed, a.run_failures) for a in kernel.stats(agents=True).agents}
        assert per_agent == {"on_start-once": (0, 1), "background-once": (0, 1)}
        assert runs["on_start-once"] == runs["background-once"] == 2
    failed = Counter(e.name for e in rec.of("failed"))
    every_agent = ("on_start-once", "background-once", "stopping", "on_stop", "two")
    by_handlers = ("handler", "handler-then-on_stop", "handler-and-background")
    assert failed == dict.fromkeys((*every_agent, *by_handlers), 1)
    stats = kernel.stats()
    assert (stats.failed, stats.run_failures) == (3, 5)
    assert sum(failed.values()) == stats.failed + stats.run_failures


async def test_a_watcher_that_stops_for_good_ends_its_monitors(autojump_clock: Any) -> None:
    # A long-lived target watched by many short-lived agents: each monitor ends with its
    # watcher (Erlang, Akka), so the target keeps none of them and, when it stops at last,
    # sends no notice to an address that no longer exists.
    notices: list[Any] = []

    @agent(name="target")
    async def target(ctx: Context, msg: Message) -> None:
        return None

    @agent
    async def short_lived(ctx: Context, msg: Message) -> str | None:
        if msg.payload == "watch":
            ctx.monitor("target")
            return "watching"
        notices.append(msg.payload)
        return None

    @agent(name="keeper")
    async def keeper(ctx: Context, msg: Message) -> str | None:
        if msg.payload == "watch":
            ctx.monitor("target")
            return "watching"
        notices.append(("keeper", msg.payload["event"], msg.payload["reason"]))
        return None

    async with open_kernel(make_config()) as kernel:
        kernel.spawn(target)
        kernel.spawn(keeper)
        assert await kernel.request("keeper", "watch") == "watching"
        for _ in range(50):
            ref = kernel.spawn(short_lived)
            assert await kernel.request(ref, "watch") == "watching"
            await kernel.stop(ref)
        await kernel.stop("target")
        await trio.testing.wait_all_tasks_blocked()
        stats = kernel.stats()
    # The one watcher still alive is told; the 50 stopped ones cost nothing.
    assert notices == [("keeper", "stopped", "stopped")]
    assert stats.dead_letters_by_reason == {}


async def test_a_context_kept_past_its_watcher_s_stop_monitors_nothing(
    autojump_clock: Any,
) -> None:
    """Regression: ``ctx.monitor`` on the context of an agent that had stopped for good
    (kept in a closure) made a monitor that nothing ended: the target kept one entry per
    dead watcher, and its stop sent each a notice, dead-lettered ``no_such_agent`` (100
    kept contexts: 100 entries, 100 dead letters). It raises ``AgentNotRunning`` naming
    the watcher now, as ``ctx.spawn`` does, and the target's stop costs nothing."""
    kept: list[Context] = []

    @agent(name="target")
    async def target(ctx: Context, msg: Message) -> None:
        return None

    @agent
    async def watcher(ctx: Context, msg: Message) -> None:
        kept.append(ctx)

    async with open_kernel(make_config()) as kernel:
        kernel.spawn(target)
        refs = []
        for _ in range(100):
            ref = kernel.spawn(watcher)
            await kernel.send(ref, "keep your context")
            await trio.testing.wait_all_tasks_blocked()
            await kernel.stop(ref)
            refs.append(ref)
        refused = 0
        for ref, ctx in zip(refs, kept, strict=True):
            with pytest.raises(AgentNotRunning) as info:
                ctx.monitor("target")
            assert info.value.agent_id == ref.id
            assert str(info.value) == (
                f"agent {ref.id} has stopped: ctx.monitor refused"
                " (a monitor lives as long as its watcher)"
            )
            refused += 1
        await kernel.stop("target")
        await trio.testing.wait_all_tasks_blocked()
        stats = kernel.stats()
    assert refused == 100
    assert stats.dead_letters_by_reason == {}


# --- property: random trees and failures never hang, lose or leak ---------------------------------


tree_shapes = st.recursive(
    st.just("agent"),
    lambda kids: st.tuples(
        st.sampled_from(["one_for_one", "one_for_all", "rest_for_one"]),
        st.lists(kids, min_size=1, max_size=3),
    ),
    max_leaves=8,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=tree_shapes,
    failures=st.lists(st.integers(min_value=0, max_value=7), max_size=12),
    max_restarts=st.integers(min_value=0, max_value=4),
    escalate=st.booleans(),
)
# The root escalates to the kernel: at once, and through a nested supervisor.
@example(shape="agent", failures=[0], max_restarts=0, escalate=True)
@example(shape=("one_for_all", ["agent", "agent"]), failures=[1, 1], max_restarts=0, escalate=True)
def test_random_trees_and_failures(
    shape: Any, failures: list[int], max_restarts: int, escalate: bool
) -> None:
    names: list[str] = []

    def build(node: Any) -> Any:
        if node == "agent":
            name = f"a{len(names)}"
            names.append(name)
            return tracked(name)
        strategy, kids = node
        return Supervisor(
            strategy=strategy,
            children=[build(k) for k in kids],
            max_restarts=max_restarts,
            within=60.0,
            backoff=Backoff(initial=0.01, maximum=0.1, jitter=0.5),
        )

    # A root that restarts (almost) forever, or one that takes the kernel down once its
    # own intensity (max_restarts) is spent.
    config = make_config()
    if escalate:
        config = Config(
            supervision=SupervisionConfig(
                max_restarts=max_restarts,
                backoff_initial_ms=0,
                backoff_max_ms=0,
                escalate_to_kernel=True,
            )
        )

    async def main() -> str:
        Journal.reset()
        tasks_before = trio.lowlevel.current_statistics().tasks_living
        outcome = "clean"
        restarts = restarted_events = 0
        try:
            async with open_kernel(config, seed=7) as kernel, record_events(kernel) as rec:
                kernel.spawn(build(shape))
                for i in failures:
                    name = names[i % len(names)]
                    with contextlib.suppress(AgentNotFound):  # retired for good by now
                        await kernel.send(name, "boom")
                    await trio.sleep(0.2)
                    await trio.testing.wait_all_tasks_blocked()
                restarts = kernel.stats().restarts
                restarted_events = len(rec.of("restarted"))
        except SupervisorEscalation as exc:
            outcome = "escalated"
            assert escalate, "only a root told to escalate takes the kernel down"
            chain, last_error = exc.chain, exc.last_error
            assert chain[:2] == ("kernel", "root")
            assert chain[-1] in names
            assert repr(last_error) == repr(RuntimeError(f"{chain[-1]} exploded"))
        assert kernel.agents() == []
        assert_conserved(kernel)
        starts = len(Journal.of("start"))
        stops = len(Journal.of("stop"))
        assert starts == stops, "every started agent ran on_stop exactly once per run"
        if outcome == "clean":
            assert restarts == restarted_events
        # Nothing of the kernel is left running.
        assert trio.lowlevel.current_statistics().tasks_living == tasks_before
        return outcome

    outcome = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    event(outcome)


async def test_agents_spawned_at_run_time_start_in_spawn_order(autojump_clock: Any) -> None:
    async with open_kernel(make_config()) as kernel:
        names = [f"n{i}" for i in range(20)]
        for name in names[:10]:
            kernel.spawn(tracked(name))
        await trio.lowlevel.checkpoint()
        for name in names[10:]:
            kernel.spawn(tracked(name))
        await trio.testing.wait_all_tasks_blocked()
        assert Journal.of("start") == names


async def test_a_burst_of_spawns_is_served_in_a_few_scheduling_rounds() -> None:
    @agent
    async def noop(ctx: Context, msg: Message) -> None:
        return None

    async with open_kernel(make_config()) as kernel:
        refs = [kernel.spawn(noop) for _ in range(1000)]
        for ref in refs:
            kernel.send_nowait(ref, 1)
        # Not one round per spawn: the supervisor takes every queued spawn at once.
        for _ in range(5):
            await trio.lowlevel.checkpoint()
        assert kernel.stats().handled == 1000


@agent
async def quiet(ctx: Context, msg: Message) -> None:
    """Stops quietly: no ``on_stop``, nothing spawned (its stop order cannot be observed)."""


async def test_quiet_agents_stop_together_and_the_others_keep_their_order(
    autojump_clock: Any,
) -> None:
    async with open_kernel(make_config()) as kernel:
        kernel.spawn(tracked("first"))
        quiet_refs = [kernel.spawn(quiet) for _ in range(50)]
        kernel.spawn(tracked("middle"))
        quiet_refs += [kernel.spawn(quiet) for _ in range(50)]
        kernel.spawn(tracked("last"))
        for ref in quiet_refs:
            await kernel.send(ref, "wake")  # running, not dormant
        await trio.testing.wait_all_tasks_blocked()
        assert kernel.stats().handled == 100
    assert Journal.of("stop") == ["last", "middle", "first"]
    assert kernel.agents() == []
    assert_conserved(kernel)


async def test_a_run_called_off_in_its_backoff_does_its_end_s_bookkeeping_once(
    autojump_clock: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: the task root of a child run (its ``finally`` gone, 9153661) did the
    bookkeeping of a run called off before it began inside its ``try``: that
    bookkeeping raising (a bug of the kernel's) was taken for the run's failure, and
    the bookkeeping done a second time (``agents_alive`` counted out twice in a
    shutdown). It is done once, and what it raises goes on up, as the ``finally`` did."""
    from nexus_trio._supervisor import SupervisorNode

    ends: list[str | None] = []
    real = SupervisorNode._run_over

    def run_over(self: Any, child: Any, done: Any, plan: Any) -> None:
        ends.append(child.name)
        real(self, child, done, plan)
        if ends == ["w"]:
            raise RuntimeError("the bookkeeping's bug")

    async with open_kernel(make_config()) as kernel:
        kernel.spawn(sup(tracked("w"), backoff=Backoff(initial=1.0, maximum=1.0, jitter=0)))
        await trio.testing.wait_all_tasks_blocked()
        await kernel.send("w", "boom")
        await trio.testing.wait_all_tasks_blocked()  # its restart waits out the backoff
        monkeypatch.setattr(SupervisorNode, "_run_over", run_over)
        with contextlib.suppress(BaseException):
            await kernel.stop("w")  # called off in its backoff
    assert ends.count("w") == 1, ends


async def test_a_shutdown_asks_quiet_agents_to_stop_a_share_at_a_time(
    autojump_clock: Any,
) -> None:
    # Before: every quiet agent was asked at once, and each held its run and its
    # nursery's exit (Trio's coroutines, waiting out the exit's schedule point) in the
    # same round: 2,500 agents runnable at once (a million: 100k fresh pages). Now at most
    # a share of them (_QUIET_SHARE, 1,024) stop at a time, in reverse start order by
    # share; the others around them keep their order.
    share = 1024

    class MostRunnable(trio.abc.Instrument):
        def __init__(self) -> None:
            self.most = 0

        def before_task_step(self, task: trio.lowlevel.Task) -> None:
            runnable = trio.lowlevel.current_statistics().tasks_runnable
            self.most = max(self.most, runnable)

    watch = MostRunnable()
    async with open_kernel(make_config()) as kernel:
        kernel.spawn(tracked("first"))
        quiet_refs = [kernel.spawn(quiet) for _ in range(2500)]
        kernel.spawn(tracked("last"))
        for ref in quiet_refs:
            kernel.send_nowait(ref, "wake")  # running, not dormant
        await trio.testing.wait_all_tasks_blocked()
        assert kernel.stats().handled == 2500
        trio.lowlevel.add_instrument(watch)
    trio.lowlevel.remove_instrument(watch)
    assert share <= watch.most <= share + 10
    assert Journal.of("stop") == ["last", "first"]
    assert kernel.agents() == []
    stats = kernel.stats()
    assert (stats.handled, stats.dead_lettered, stats.in_flight) == (2500, 0, 0)
    assert_conserved(kernel)


async def test_a_shutdown_of_quiet_agents_that_never_ran_takes_no_rounds_between_shares(
    autojump_clock: Any,
) -> None:
    # Before: a share of quiet agents was given 3 scheduling rounds to leave before the
    # next was asked, even when none of its members had a run to leave (dormant agents
    # that never had a message stop without running): 100,000 of them spent ~300 rounds.
    # Now a share that woke nobody is followed at once by the next: the shutdown takes
    # as many rounds for 5 shares of them as for one agent. Order kept around them.
    class Rounds(trio.abc.Instrument):
        def __init__(self) -> None:
            self.rounds = 0

        def after_io_wait(self, timeout: float) -> None:
            self.rounds += 1

    async def shutdown_rounds(dormant: int, woken: int) -> int:
        Journal.reset()
        watch = Rounds()
        async with open_kernel(make_config()) as kernel:
            kernel.spawn(tracked("first"))
            refs = [kernel.spawn(quiet) for _ in range(dormant + woken)]
            kernel.spawn(tracked("last"))
            for ref in refs[:woken]:
                kernel.send_nowait(ref, "wake")
            await trio.testing.wait_all_tasks_blocked()
            assert kernel.stats().handled == woken
            trio.lowlevel.add_instrument(watch)
        trio.lowlevel.remove_instrument(watch)
        assert Journal.of("stop") == ["last", "first"]
        assert kernel.agents() == []
        assert_conserved(kernel)
        return watch.rounds

    one = await shutdown_rounds(1, 0)
    assert await shutdown_rounds(5 * 1024, 0) == one
    # shares with running members still give them their rounds to leave (the share
    # test above holds them to 1,024 runnable at once)
    assert await shutdown_rounds(1024, 2048) > one


async def test_a_subscriber_that_never_reads_loses_events_counted_in_stats(
    autojump_clock: Any,
) -> None:
    # 100,000 events while one subscriber never reads: it keeps its buffer's worth, the
    # rest is counted exactly, per stream and in the kernel's stats, like dead letters.
    async with open_kernel(make_config()) as kernel:
        async with kernel.events(buffer=5) as slow, kernel.events(buffer=200_000) as full:
            ref = kernel.spawn(tracked("w"))
            await trio.testing.wait_all_tasks_blocked()
            for i in range(100_000):
                kernel.report_event(
                    LifecycleEvent(EventKind.UNREACHABLE, ref.id, "w", float(i), reason=str(i))
                )
            await kernel.stop(ref)
            total = 0
            while True:
                try:
                    full.receive_nowait()
                except trio.WouldBlock:
                    break
                total += 1
            kept = []
            while True:
                try:
                    kept.append(slow.receive_nowait())
                except trio.WouldBlock:
                    break
            assert total == 100_003  # spawned, started, the 100,000, stopped
            assert [e.kind for e in kept] == [EventKind.SPAWNED, EventKind.STARTED] + [
                EventKind.UNREACHABLE
            ] * 3
            assert slow.dropped == total - 5 and full.dropped == 0
            assert kernel.stats().event_stream_dropped == total - 5
            from prometheus_client.parser import text_string_to_metric_families

            from nexus_trio.metrics import MetricsRenderer

            scraped = {
                sample.name: sample.value
                for family in text_string_to_metric_families(
                    (await MetricsRenderer.for_kernel(kernel).render()).decode()
                )
                for sample in family.samples
            }
            assert scraped["nexus_event_stream_dropped_total"] == total - 5


@pytest.mark.parametrize(
    ("children", "message"),
    [
        ([42], "Supervisor children[0]: @agent needs an 'async def handler(ctx, msg)'"),
        (42, "Supervisor children must be a sequence of agents"),
        ("ab", "Supervisor children must be a sequence of agents"),
    ],
)
def test_a_supervisor_with_a_child_that_is_no_agent_is_refused_when_built(
    children: Any, message: str
) -> None:
    """`Supervisor(children=[42])` was built, and failed only when spawned, with an
    error that named no supervisor and no index."""
    with pytest.raises(TypeError, match=re.escape(message)):
        Supervisor(children=children)


async def test_a_send_to_an_agent_given_up_on_says_so(autojump_clock: Any) -> None:
    # Before: `no agent is registered as 'crashy'` for an agent its supervisor had just
    # stopped for good, as for a name never spawned: nothing said it had been given up on.
    given_up = "(it was given up on: stopped for good when the restart intensity was exceeded)"
    escalated = "(it was given up on: stopped for good when its failure escalated)"
    failed = "(it stopped for good after a failure and was not restarted)"
    said: list[str] = []

    @agent(name="asker")
    async def asker(ctx: Context, msg: Message) -> None:
        try:
            await ctx.send(msg.payload, "hi")
        except AgentNotFound as exc:
            said.append(str(exc))

    config = Config(supervision=SupervisionConfig(max_restarts=0))
    async with open_kernel(config) as kernel:
        crashy = kernel.spawn(tracked("crashy"))
        once = kernel.spawn(tracked("once", restart="temporary"))
        kernel.spawn(tracked("up", on_error="escalate"))
        kernel.spawn(sup(tracked("inside"), tracked("beside"), name="team", max_restarts=0))
        kernel.spawn(tracked("quits", restart="transient"))
        kernel.spawn(tracked("stopped"))
        kernel.spawn(asker)
        for name in ("crashy", "once", "up", "inside", "quits"):
            await kernel.send(name, "exit" if name == "quits" else "boom")
        await kernel.stop("stopped")
        await trio.testing.wait_all_tasks_blocked()
        assert kernel.stats().given_up == 3  # crashy, up and team
        expected = {
            "crashy": given_up,
            "once": failed,
            "up": escalated,
            "team": given_up,
            "inside": given_up,
            "beside": given_up,
        }
        for name, detail in expected.items():
            text = f"no agent is registered as {name!r} {detail}"
            for attempt in (kernel.send(name, 1), kernel.request(name, 1), kernel.stop(name)):
                with pytest.raises(AgentNotFound) as info:
                    await attempt
                assert str(info.value) == text
            with pytest.raises(AgentNotFound) as info:
                kernel.send_nowait(name, 1)
            assert str(info.value) == text
            with pytest.raises(AgentNotFound) as info:
                kernel.lookup(name)
            assert str(info.value) == text
            await kernel.send("asker", name)
            await trio.testing.wait_all_tasks_blocked()
            assert said.pop() == text
        # by ref and by id too
        for ref, detail in ((crashy, given_up), (once, failed)):
            for address in (ref, ref.id):
                with pytest.raises(AgentNotFound) as info:
                    await kernel.send(address, 1)
                assert str(info.value) == f"no agent is registered as {ref.id!r} {detail}"
        # stopped without a failure: it says so; never spawned: nothing more to say
        stopped = "(it was stopped for good by kernel.stop: a stopped agent takes no messages)"
        for name, detail in (
            (
                "quits",
                "(it has stopped: its run ended without an error, and its restart"
                " type does not restart it)",
            ),
            ("stopped", stopped),
            ("nobody", ""),
        ):
            with pytest.raises(AgentNotFound) as info:
                await kernel.send(name, 1)
            assert str(info.value) == f"no agent is registered as {name!r} {detail}".rstrip()
        # a name taken again is that agent's: its own stop says what became of it, not
        # of the one before
        again = kernel.spawn(tracked("once", restart="temporary"))
        assert await kernel.request("once", 1) == 1
        await kernel.stop(again)
        with pytest.raises(AgentNotFound) as info:
            await kernel.send("once", 1)
        assert str(info.value) == f"no agent is registered as 'once' {stopped}"
        with pytest.raises(AgentNotFound) as info:
            await kernel.send(once, 1)  # the first one's id still says why it stopped
        assert str(info.value) == f"no agent is registered as {once.id!r} {failed}"
        assert kernel.stats().rejected == {"no_such_agent": 6 * 4 + 4 + 3 + 2}


async def test_what_is_kept_of_agents_given_up_on_is_bounded(
    autojump_clock: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The kernel keeps why the last few agents stopped after a failure (_ENDED_MEMORY of
    # them, by id and by name), not every one: the oldest are plain "not registered".
    import nexus_trio._router

    monkeypatch.setattr(nexus_trio._router, "_ENDED_MEMORY", 2)
    async with open_kernel(make_config()) as kernel:
        refs = [kernel.spawn(tracked(f"t{i}", restart="temporary")) for i in range(4)]
        for ref in refs:
            await kernel.send(ref, "boom")
            await trio.testing.wait_all_tasks_blocked()
        said = []
        for ref in refs:
            for address in (ref.name, ref.id):
                with pytest.raises(AgentNotFound) as info:
                    await kernel.send(address, 1)
                said.append(str(info.value).endswith("after a failure and was not restarted)"))
        assert said == [False, False, False, False, True, True, True, True]


class _ReprRaises:
    def __repr__(self) -> str:
        raise RuntimeError("a __repr__ with a bug")


async def _no_op_handler(ctx: Any, msg: Any) -> None:
    return None


_HUGE_SAID = "a negative integer of about 5,000 digits"
_REPR_SAID = "<_ReprRaises, whose repr() raised RuntimeError: a __repr__ with a bug>"


@pytest.mark.parametrize(
    ("make", "field", "said"),
    [
        (lambda: Supervisor(max_restarts=-(10**5000)), "max_restarts", _HUGE_SAID),
        (lambda: Supervisor(max_restarts=_ReprRaises()), "max_restarts", _REPR_SAID),
        (lambda: Supervisor(within=_ReprRaises()), "within", _REPR_SAID),
        (lambda: Backoff(initial=_ReprRaises()), "initial", _REPR_SAID),
        (
            lambda: agent(_no_op_handler, name="x", mailbox_capacity=-(10**5000)),
            "mailbox_capacity",
            _HUGE_SAID,
        ),
        (
            lambda: agent(_no_op_handler, name="x", mailbox_capacity=_ReprRaises()),
            "mailbox_capacity",
            _REPR_SAID,
        ),
        (
            lambda: agent(_no_op_handler, name="x", shutdown_timeout=_ReprRaises()),
            "shutdown_timeout",
            _REPR_SAID,
        ),
        (
            lambda: agent(_no_op_handler, name="x", handle_timeout=_ReprRaises()),
            "handle_timeout",
            _REPR_SAID,
        ),
    ],
)
def test_a_bad_value_whose_repr_fails_is_refused_naming_its_field(
    make: Any, field: str, said: str
) -> None:
    """Fifty-seventh pass: a refusal wrote the value by its ``repr()``: an integer past
    4,300 digits (``max_restarts=-(10**5000)``) raised Python's own ``ValueError``
    (``Exceeds the limit (4300 digits) ...``), naming no field, and a value whose
    ``__repr__`` raises raised that ``RuntimeError`` in place of the refusal. The value
    is shown as the kernel's other errors show it now (``<_ReprRaises, whose repr()
    raised ...>``), the field named; the integer by its size, as a pool's refusals show
    one (fifty-eighth pass: it read ``<int, whose repr() raised ValueError: ...>``)."""
    with pytest.raises(ValueError, match=rf"^{field} must be .*, got {re.escape(said)}$"):
        make()
