"""A storm of dead letters does not flood the log: the first lines of each reason in a
second are written, the rest are counted and said in one line at the second's end."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing
from prometheus_client import generate_latest

from nexus_trio import Context, Message, agent, open_kernel
from nexus_trio.metrics import build_registry

from .conftest import make_config

LIMIT = 5


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def lines(self) -> list[str]:
        return [r.getMessage() for r in self.records]

    def one_by_one(self, reason: str) -> int:
        return sum(1 for r in self.records if getattr(r, "reason", None) == reason)

    def not_logged(self) -> list[logging.LogRecord]:
        return [r for r in self.records if hasattr(r, "not_logged")]


@pytest.fixture
def dead_letter_lines() -> Iterator[ListHandler]:
    logger = logging.getLogger("nexus_trio.dead_letters")
    handler, level = ListHandler(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


@agent(name="sink", mailbox_capacity=1, overflow="drop_newest")
async def sink(ctx: Context, msg: Message) -> None:
    await trio.sleep_forever()


@agent(name="thrower", on_error="resume")
async def thrower(ctx: Context, msg: Message) -> None:
    raise ValueError(msg.payload)


async def test_a_storm_logs_the_limit_of_each_reason_a_second_and_one_line_for_the_rest(
    dead_letter_lines: ListHandler, autojump_clock: trio.testing.MockClock
) -> None:
    """1,000 overflows in one moment: 5 lines of their own (the limit), the other 993
    counted and said in one line when the second ends, with no dead letter after them
    to say it; a handler error in the same second still gets its line (the budget is per
    reason); the next second has a budget of its own."""
    async with open_kernel(make_config(dead_letter_log_limit=LIMIT)) as kernel:
        ref = kernel.spawn(sink)
        kernel.spawn(thrower)
        await trio.testing.wait_all_tasks_blocked()
        for i in range(1_000):
            kernel.send_nowait(ref, i)
        await kernel.send("thrower", "boom")
        await trio.testing.wait_all_tasks_blocked()
        overflowed = kernel.stats().dead_letters_by_reason["mailbox_overflow"]
        assert overflowed >= 990
        assert dead_letter_lines.one_by_one("mailbox_overflow") == LIMIT
        assert dead_letter_lines.one_by_one("handler_error") == 1
        assert dead_letter_lines.not_logged() == []  # (not before the second ends)
        assert kernel.stats().dead_letter_lines_not_logged == overflowed - LIMIT

        await trio.sleep(1.5)  # the second ends, nothing else happens
        (said,) = dead_letter_lines.not_logged()
        assert said.not_logged == overflowed - LIMIT  # type: ignore[attr-defined]
        assert said.getMessage().startswith(
            f"{overflowed - LIMIT:,} dead letters not logged in the last second"
            f" (mailbox_overflow {overflowed - LIMIT:,})"
        )

        for i in range(4):  # a second of its own: each gets its line again
            kernel.send_nowait(ref, i)
        again = kernel.stats().dead_letters_by_reason["mailbox_overflow"] - overflowed
        assert again >= 3  # (the sink took one into its handler meanwhile)
        assert dead_letter_lines.one_by_one("mailbox_overflow") == LIMIT + again
        stats = kernel.stats()
        assert stats.dead_letter_lines_not_logged == overflowed - LIMIT
        text = generate_latest(build_registry(kernel, process=False)).decode()
        assert f"nexus_dead_letter_lines_not_logged_total {overflowed - LIMIT}.0" in text
    assert kernel.stats().accepted == kernel.stats().handled + kernel.stats().dead_lettered


async def test_dead_letters_not_logged_when_the_kernel_closes_are_said_as_it_closes(
    dead_letter_lines: ListHandler, autojump_clock: trio.testing.MockClock
) -> None:
    """A storm right before the end: its line is written as the kernel closes, with the
    count of the shutdown's own dead letters past the limit too."""
    async with open_kernel(make_config(dead_letter_log_limit=LIMIT)) as kernel:
        ref = kernel.spawn(sink)
        await trio.testing.wait_all_tasks_blocked()
        for i in range(100):
            kernel.send_nowait(ref, i)
    stats = kernel.stats()
    overflowed = stats.dead_letters_by_reason["mailbox_overflow"]
    assert overflowed >= 95
    unsaid = overflowed - LIMIT
    assert stats.dead_letter_lines_not_logged == unsaid
    assert stats.dead_lettered == overflowed + stats.dead_letters_by_reason["shutdown"] == 100
    (said,) = dead_letter_lines.not_logged()
    assert said.not_logged == unsaid  # type: ignore[attr-defined]
    assert len(dead_letter_lines.records) == LIMIT + stats.dead_letters_by_reason["shutdown"] + 1


async def test_a_limit_of_0_logs_every_dead_letter(
    dead_letter_lines: ListHandler, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_kernel(make_config(dead_letter_log_limit=0)) as kernel:
        ref = kernel.spawn(sink)
        await trio.testing.wait_all_tasks_blocked()
        for i in range(300):
            kernel.send_nowait(ref, i)
        overflowed = kernel.stats().dead_letters_by_reason["mailbox_overflow"]
        assert dead_letter_lines.one_by_one("mailbox_overflow") == overflowed >= 290
        await trio.sleep(2.0)
        assert dead_letter_lines.not_logged() == []
        assert kernel.stats().dead_letter_lines_not_logged == 0


@pytest.mark.parametrize("key", ["dead_letter_log_limit", "failure_log_limit"])
def test_a_negative_limit_is_refused_naming_the_key(key: str) -> None:
    with pytest.raises(ValueError, match=key):
        make_config(**{key: -1})


@agent(name="other", on_error="resume")
async def other(ctx: Context, msg: Message) -> None:
    raise KeyError(msg.payload)


async def test_a_storm_of_handler_failures_logs_the_limit_of_each_agent_a_second_with_tracebacks(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """200 failures of one agent in a moment: 5 tracebacks (the limit), the other 195
    counted and said in one ERROR line at the second's end; another agent's failure in the
    same second still gets its traceback; every failure is counted and dead-lettered."""
    logger = logging.getLogger("nexus_trio.agent")
    seen = ListHandler()
    logger.addHandler(seen)
    try:
        config = make_config(failure_log_limit=LIMIT)
        async with open_kernel(config) as kernel:
            kernel.spawn(thrower)
            kernel.spawn(other)
            for i in range(200):
                await kernel.send("thrower", i)
            await kernel.send("other", "x")
            await trio.testing.wait_all_tasks_blocked()
            tracebacks = [r for r in seen.records if r.exc_info is not None]
            by_agent = Counter(r.getMessage().split(" failed")[0] for r in tracebacks)
            assert by_agent == {"handler of agent thrower": LIMIT, "handler of agent other": 1}
            assert kernel.stats().failure_lines_not_logged == 200 - LIMIT
            assert seen.not_logged() == []
            await trio.sleep(1.5)
            (said,) = seen.not_logged()
            assert said.levelno == logging.ERROR
            assert said.not_logged == 200 - LIMIT  # type: ignore[attr-defined]
            assert f"(thrower {200 - LIMIT})" in said.getMessage()
            stats = kernel.stats()
            assert stats.failed == 201
            assert stats.dead_letters_by_reason == {"handler_error": 201}
            text = generate_latest(build_registry(kernel, process=False)).decode()
            assert f"nexus_handler_failure_lines_not_logged_total {200 - LIMIT}.0" in text
    finally:
        logger.removeHandler(seen)


async def test_the_line_of_failures_not_logged_names_the_ten_agents_with_most_not_all(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A storm spread over 300 agents (a pool of workers that all fail): the line said
    at the second's end listed every agent with its count, a line that grows with the
    agents (300 here; 100,000 workers would make one line of megabytes). It names the ten
    with the most (ties by name) and counts the others in one item. (No bound of the kind
    here: 300 agents' lines of their own would be past it.)"""
    logger = logging.getLogger("nexus_trio.agent")
    seen = ListHandler()
    logger.addHandler(seen)
    logger.propagate, propagate = False, logger.propagate  # (300 x LIMIT tracebacks)
    try:
        config = make_config(failure_log_limit=LIMIT, log_kind_limit=0)
        async with open_kernel(config) as kernel:
            for n in range(300):
                kernel.spawn(thrower, name=f"w{n:03}")
            # w000-w009: 3 over the limit, w010-w299: 1 over it
            for n in range(300):
                for i in range(LIMIT + (3 if n < 10 else 1)):
                    kernel.send_nowait(f"w{n:03}", i)
            await trio.testing.wait_all_tasks_blocked()
            await trio.sleep(1.5)
            (said,) = seen.not_logged()
            total = 10 * 3 + 290
            assert said.not_logged == total  # type: ignore[attr-defined]
            assert kernel.stats().failure_lines_not_logged == total
            shown = ", ".join(f"w{n:03} 3" for n in range(10))
            assert f"({shown}, 290 others 290)" in said.getMessage()
            assert len(said.getMessage()) < 500
    finally:
        logger.removeHandler(seen)
        logger.propagate = propagate


STORM_APP = """
    import trio
    from nexus_trio import agent

    @agent(name="sink", mailbox_capacity=1, overflow="drop_newest")
    async def sink(ctx, msg):
        await trio.sleep_forever()

    async def main(kernel):
        ref = kernel.spawn(sink)
        await trio.sleep(0.01)
        for i in range(50_000):
            kernel.send_nowait(ref, i)
            if i % 1000 == 0:
                await trio.lowlevel.checkpoint()
"""


@pytest.mark.parametrize("log_format", ["compact", "json"])
def test_nexus_run_through_a_storm_of_dead_letters_writes_lines_in_hundreds_not_a_line_each(
    tmp_path: Path, log_format: str
) -> None:
    """``nexus run`` at its default limit (100 a second of a reason): 50,000 dead letters
    in a fraction of a second are a few hundred log lines at most, and the summary counts
    every dead letter and every one not logged (written in the log's lines too)."""
    (tmp_path / "storm_app.py").write_text(textwrap.dedent(STORM_APP))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    command = ["run", "--app", "storm_app:main", "--json", "-f", log_format]
    done = subprocess.run(
        [sys.executable, "-m", "nexus_trio.cli", *command],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout)
    assert summary["dead_letters"] == 50_000
    assert summary["conserved"]
    lines = done.stderr.splitlines()
    one_by_one = [line for line in lines if "dead letter " in line and "not logged" not in line]
    unsaid = summary["dead_letter_lines_not_logged"]
    assert unsaid == 50_000 - len(one_by_one)
    # At most 100 lines in each second the run touched: bounded by the run's own length
    # (a fixed 20 s was passed at load 10-13: 2,002 lines), far below a line each.
    seconds = math.ceil(summary["elapsed_s"]["total"]) + 1
    assert len(one_by_one) <= 100 * seconds < 50_000
    said = [line for line in lines if "dead letters not logged in the last second" in line]
    if log_format == "json":
        assert sum(json.loads(line)["not_logged"] for line in said) == unsaid
    else:
        assert sum(int(line.rsplit("not_logged=", 1)[1]) for line in said) == unsaid
