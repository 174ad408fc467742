"""Log floods are bounded by kind, not only by agent or reason: a thousand failing agents
write at most ``[kernel] log_kind_limit`` failure lines a second, not a thousand times
``failure_log_limit``; the lines held back are counted (in stats, and by kind in
``log_lines_dropped()`` and ``nexus_log_lines_dropped_total``) and said in one line a
second; the failures and dead letters themselves stay exact, also on a full disk."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import trio
import trio.testing
from prometheus_client import generate_latest

from nexus_trio import Context, Message, agent, open_kernel
from nexus_trio._throttle import LineBudget, Throttle
from nexus_trio.logs import log_lines_dropped
from nexus_trio.metrics import build_registry

from .conftest import make_config
from .full_disk import json_log_on_dev_full
from .test_dead_letter_log import ListHandler

AGENTS = 1000
KIND = 200  # the default [kernel] log_kind_limit
PER_KEY = 100  # the default failure_log_limit and dead_letter_log_limit


@pytest.fixture
def seen() -> Iterator[dict[str, ListHandler]]:
    """The records of the agent and dead-letter loggers, kept from the root's handlers
    (a flood of tracebacks in pytest's capture would only slow the test)."""
    handlers: dict[str, ListHandler] = {}
    kept = []
    for name in ("nexus_trio.agent", "nexus_trio.dead_letters"):
        logger = logging.getLogger(name)
        handler = handlers[name.rsplit(".", 1)[1]] = ListHandler()
        kept.append((logger, logger.level, logger.propagate))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    yield handlers
    for (logger, level, propagate), handler in zip(kept, handlers.values(), strict=True):
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


@agent(on_error="resume")
async def failing(ctx: Context, msg: Message) -> None:
    raise ValueError(msg.payload)


@agent(handle_timeout=0.5, on_error="resume")
async def slow(ctx: Context, msg: Message) -> None:
    await trio.sleep_forever()


def _own(handler: ListHandler) -> list[logging.LogRecord]:
    """The records of their own (not the lines saying those not logged)."""
    return [r for r in handler.records if not hasattr(r, "not_logged")]


def _delta(before: dict[str, int], kind: str) -> int:
    return log_lines_dropped().get(kind, 0) - before.get(kind, 0)


async def test_a_thousand_agents_failing_in_a_burst_write_the_bound_of_the_kind_and_count_the_rest(
    seen: dict[str, ListHandler], autojump_clock: trio.testing.MockClock
) -> None:
    """1,000 agents each failing once in a moment, twice a second apart: each second 200
    failure lines of their own (the kind's bound; before it, 1,000: 100 a second of each
    agent), 100 dead-letter lines (the reason's), and one line each saying the rest, whose
    counts add up to the failures; every failure counted and dead-lettered."""
    before = log_lines_dropped()
    async with open_kernel(make_config()) as kernel:
        names = [f"w{n:04}" for n in range(AGENTS)]
        for name in names:
            kernel.spawn(failing, name=name)
        for second in range(2):
            start = len(seen["agent"].records), len(seen["dead_letters"].records)
            for name in names:
                kernel.send_nowait(name, second)
            await trio.testing.wait_all_tasks_blocked()
            await trio.sleep(1.5)  # the second ends: its line of the rest is said
            agent_lines = seen["agent"].records[start[0] :]
            dead_lines = seen["dead_letters"].records[start[1] :]
            own = [r for r in agent_lines if not hasattr(r, "not_logged")]
            assert len(own) == KIND
            assert all(r.exc_info is not None for r in own)
            (said,) = [r for r in agent_lines if hasattr(r, "not_logged")]
            assert said.not_logged == AGENTS - KIND  # type: ignore[attr-defined]
            assert f"past {PER_KEY} lines a second of an agent or {KIND} of all" in (
                said.getMessage()
            )
            assert len(said.getMessage()) < 600  # (ten agents named, the others in one item)
            own_dead = [r for r in dead_lines if not hasattr(r, "not_logged")]
            assert len(own_dead) == PER_KEY
            (said_dead,) = [r for r in dead_lines if hasattr(r, "not_logged")]
            assert said_dead.not_logged == AGENTS - PER_KEY  # type: ignore[attr-defined]
        stats = kernel.stats()
        assert stats.failed == 2 * AGENTS
        assert stats.dead_letters_by_reason == {"handler_error": 2 * AGENTS}
        assert stats.failure_lines_not_logged == 2 * (AGENTS - KIND)
        assert stats.dead_letter_lines_not_logged == 2 * (AGENTS - PER_KEY)
        assert _delta(before, "agent_failure") == 2 * (AGENTS - KIND)
        assert _delta(before, "dead_letter") == 2 * (AGENTS - PER_KEY)
        text = generate_latest(build_registry(kernel, process=False)).decode()
        dropped = log_lines_dropped()["agent_failure"]
        assert f'nexus_log_lines_dropped_total{{kind="agent_failure"}} {dropped}.0' in text


async def test_one_agent_failing_without_end_leaves_the_others_lines_of_the_kind(
    seen: dict[str, ListHandler], autojump_clock: trio.testing.MockClock
) -> None:
    """The agent's bound stays within the kind's: one agent failing 500 times in a second
    takes its 100 lines, not the kind's 200; 150 other agents failing once then have the
    100 left, the rest of them counted."""
    async with open_kernel(make_config()) as kernel:
        kernel.spawn(failing, name="hog")
        others = [f"o{n:03}" for n in range(150)]
        for name in others:
            kernel.spawn(failing, name=name)
        for n in range(500):
            kernel.send_nowait("hog", n)
        await trio.testing.wait_all_tasks_blocked()
        for name in others:
            kernel.send_nowait(name, 0)
        await trio.testing.wait_all_tasks_blocked()
        own = _own(seen["agent"])
        assert sum("agent hog " in r.getMessage() for r in own) == PER_KEY
        assert len(own) == KIND
        assert kernel.stats().failure_lines_not_logged == 500 - PER_KEY + 150 - (KIND - PER_KEY)
        assert kernel.stats().failed == 650


async def test_handler_timeouts_are_lines_of_the_failure_bounds(
    seen: dict[str, ListHandler], autojump_clock: trio.testing.MockClock
) -> None:
    """Handler timeouts wrote a line each, with no bound at all: 300 agents timing out in
    the same moment now write the kind's 200 lines, the other 100 counted and said in one
    line; each is still counted in ``timed_out`` and dead-lettered."""
    async with open_kernel(make_config()) as kernel:
        names = [f"s{n:03}" for n in range(300)]
        for name in names:
            kernel.spawn(slow, name=name)
        for name in names:
            kernel.send_nowait(name, 0)
        await trio.sleep(0.75)  # all time out at 0.5 s
        lines = [r for r in _own(seen["agent"]) if "timed out" in r.getMessage()]
        stats = kernel.stats()
        assert stats.timed_out == 300
        assert stats.dead_letters_by_reason == {"handler_timeout": 300}
        assert len(lines) == KIND
        assert stats.failure_lines_not_logged == 300 - KIND
        await trio.sleep(1)
        (said,) = seen["agent"].not_logged()
        assert said.not_logged == 300 - KIND  # type: ignore[attr-defined]


async def test_a_flood_of_a_thousand_failing_agents_with_the_log_on_dev_full_is_counted_whole(
    restore_logging: None, autojump_clock: trio.testing.MockClock
) -> None:
    """The log on a full disk (``/dev/full``: each write fails with ENOSPC) while 1,000
    agents fail in a moment and the kernel closes within the second: nothing raises into
    the kernel, nothing blocks it (it closes at once, on the mock clock), every failure is
    counted and dead-lettered, and the records the handlers lost are those the bounds let
    through: 200 failure lines, 100 dead-letter lines, and the two lines saying the rest
    (1,000 + 100 + 2 before the kind's bound)."""
    with json_log_on_dev_full() as lost:
        async with open_kernel(make_config()) as kernel:
            for n in range(AGENTS):
                kernel.spawn(failing, name=f"w{n:04}")
            for n in range(AGENTS):
                kernel.send_nowait(f"w{n:04}", n)
            await trio.testing.wait_all_tasks_blocked()
            assert trio.current_time() < 1.0  # (the records' second has not ended)
        stats = kernel.stats()
    assert stats.failed == AGENTS
    assert stats.dead_letters_by_reason == {"handler_error": AGENTS}
    assert stats.failure_lines_not_logged == AGENTS - KIND
    assert stats.dead_letter_lines_not_logged == AGENTS - PER_KEY
    assert lost.records == KIND + PER_KEY + 2, lost
    assert lost.calls_failed == 0


def test_a_budget_s_kind_bound_counts_what_it_holds_back_by_kind() -> None:
    """``LineBudget(total=)``: at most ``total`` lines a second of all keys, each key at
    most ``limit``; what it holds back is said at the second's end with the counts by
    key, and counted under its kind, process-wide, as it is said."""
    now = [0.0]
    said: list[tuple[int, str]] = []
    before = log_lines_dropped()
    budget = LineBudget(
        2,
        lambda total, by: said.append((total, by)),
        lambda: None,
        lambda: now[0],
        total=3,
        kind="test.budget",
    )
    assert [budget.allowed(k) for k in "aaab"] == [True, True, False, True]
    assert [budget.allowed(k) for k in "cd"] == [False, False]
    assert budget.not_logged == 3
    assert _delta(before, "test.budget") == 0  # (counted there as their line is said)
    now[0] = 1.0
    assert budget.allowed("c")  # the next second counts afresh
    assert said == [(3, "a 1, c 1, d 1")]
    assert _delta(before, "test.budget") == 3


def test_a_throttle_of_a_kind_counts_the_lines_it_holds_back() -> None:
    """``Throttle(kind=)``: each line it holds back is counted under its kind; one of no
    kind counts none (a throttle of something else than a line)."""
    now = [0.0]
    before = log_lines_dropped()
    throttle = Throttle(1.0, clock=lambda: now[0], kind="test.throttle")
    assert [throttle.due() for _ in range(4)] == [True, False, False, False]
    now[0] = 1.0
    assert throttle.due()
    assert _delta(before, "test.throttle") == 3
    plain = Throttle(1.0, clock=lambda: now[0])
    assert [plain.due() for _ in range(3)] == [True, False, False]
    assert log_lines_dropped().keys() - before.keys() <= {"test.throttle"}
