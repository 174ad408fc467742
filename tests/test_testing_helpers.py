"""Our testing helpers, used the way a user would use them."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from nexus_trio import Agent, Context, EventKind, Kernel, LifecycleEvent, Message, agent
from nexus_trio.testing import (
    EventRecorder,
    assert_conserved,
    assert_dead_lettered,
    assert_events,
    dead_letters,
    record_events,
    settle,
)

from .conftest import run_pytest


@agent(name="echo")
async def echo(ctx: Context, msg: Message) -> Any:
    return {"echo": msg.payload}


async def test_an_agent_in_five_lines(nexus_kernel: Kernel, autojump_clock: Any) -> None:
    ref = nexus_kernel.spawn(echo)
    assert await nexus_kernel.request(ref, "hi") == {"echo": "hi"}


async def test_the_fixture_runs_on_a_mock_clock(nexus_kernel: Kernel, autojump_clock: Any) -> None:
    @agent(handle_timeout=3600)
    async def sleepy(ctx: Context, msg: Message) -> str:
        await trio.sleep(3000)
        return "rested"

    ref = nexus_kernel.spawn(sleepy)
    assert await nexus_kernel.request(ref, None, timeout=4000) == "rested"
    assert trio.current_time() >= 3000


async def test_dead_letter_and_event_assertions(nexus_kernel: Kernel, autojump_clock: Any) -> None:
    class Flaky(Agent):
        async def handle(self, ctx: Context, msg: Message) -> None:
            if msg.payload == "bad":
                raise ValueError("bad input")

    async with record_events(nexus_kernel) as events:
        ref = nexus_kernel.spawn(Flaky, name="flaky")
        await nexus_kernel.send(ref, "bad")
        await nexus_kernel.send(ref, "good")
        await settle()
    letter = assert_dead_lettered(
        nexus_kernel, payload="bad", reason="handler_error", error=ValueError
    )
    assert letter.recipient == ref.id
    assert len(dead_letters(nexus_kernel)) == 1
    assert events.kinds("flaky") == [
        EventKind.SPAWNED,
        EventKind.STARTED,
        EventKind.FAILED,
        EventKind.RESTARTED,
        EventKind.STARTED,
    ]
    with pytest.raises(AssertionError, match="no dead letter with payload='good'"):
        assert_dead_lettered(nexus_kernel, payload="good")
    assert_conserved(nexus_kernel)


async def test_assert_conserved_counts_what_is_in_flight_one_by_one(
    nexus_kernel: Kernel, autojump_clock: Any
) -> None:
    """The kernel's ``in_flight`` is what its other counters leave of ``accepted``: the
    sum the helper checked held whatever was miscounted (a message dropped without its
    dead letter counted, say). It now counts the messages in flight from the tree."""
    gate = trio.Event()

    @agent
    async def slow(ctx: Context, msg: Message) -> None:
        await gate.wait()

    ref = nexus_kernel.spawn(slow)
    for i in range(3):
        await nexus_kernel.send(ref, i)
    await trio.testing.wait_all_tasks_blocked()
    assert_conserved(nexus_kernel)  # 3 in flight: 1 being handled, 2 queued
    real = type(nexus_kernel).stats

    def miscounted(kernel: Kernel, *, agents: bool = False) -> Any:
        # one message more accepted than is anywhere: lost, and counted nowhere
        s = real(kernel, agents=agents)
        return attrs.evolve(s, accepted=s.accepted + 1, in_flight=s.in_flight + 1)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(nexus_kernel), "stats", miscounted)
        with pytest.raises(AssertionError, match="4 messages in flight by the counters, but 2"):
            assert_conserved(nexus_kernel)
    gate.set()
    await settle()
    assert_conserved(nexus_kernel)


async def test_assert_conserved_counts_a_message_whose_sender_waits_for_room(
    nexus_kernel: Kernel, autojump_clock: Any
) -> None:
    """A sender that waits for room in a full mailbox (``block``) has its message counted
    as accepted while it waits (the consumer may admit it before the sender resumes).
    The helper counted only the queued and handled ones, so it failed a kernel whose
    accounting was right ("2 messages in flight by the counters, but 1 queued"); it
    counts the waiting senders' messages too now."""
    gate = trio.Event()

    @agent(mailbox_capacity=1)
    async def slow(ctx: Context, msg: Message) -> None:
        await gate.wait()

    ref = nexus_kernel.spawn(slow)
    await nexus_kernel.send(ref, "handled")
    await trio.testing.wait_all_tasks_blocked()
    await nexus_kernel.send(ref, "queued")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(nexus_kernel.send, ref, "waits for room")
        await trio.testing.wait_all_tasks_blocked()
        assert nexus_kernel.mailbox_statistics(ref).producers_waiting == 1
        assert nexus_kernel.stats().in_flight == 3
        assert_conserved(nexus_kernel)
        gate.set()
    await settle()
    assert_conserved(nexus_kernel)
    assert nexus_kernel.stats().handled == 3


async def test_an_event_recorder_that_missed_events_says_so(
    nexus_kernel: Kernel, autojump_clock: Any
) -> None:
    # 12 spawns before the recorder's task can read: its buffer of 4 keeps 4 events. The
    # record was incomplete without a word, and assert_events compared against it.
    async with record_events(nexus_kernel) as full, record_events(nexus_kernel, buffer=4) as events:
        for i in range(12):
            nexus_kernel.spawn(echo, name=f"echo{i}")
    assert len(events.events) == 4 and full.dropped == 0
    assert events.dropped == len(full.events) - 4 > 0
    assert_events(full, "echo0", ["spawned"])
    with pytest.raises(AssertionError, match=r"the recorder missed \d+ events \(buffer full\)"):
        assert_events(events, "echo0", ["spawned"])


@pytest.mark.parametrize(
    ("ini", "text", "where"),
    [
        ("pytest.ini", "[pytest]\n", "under [pytest] in {path}, where pytest reads its settings"),
        (
            "pyproject.toml",
            "[tool.pytest.ini_options]\n",
            "under [tool.pytest.ini_options] in {path}, where pytest reads its settings",
        ),
        (
            "setup.cfg",
            "[tool:pytest]\n",
            "under [tool:pytest] in {path}, where pytest reads its settings",
        ),
        (None, "", "under [tool.pytest.ini_options] in pyproject.toml"),
    ],
    ids=["pytest.ini", "pyproject.toml", "setup.cfg", "no settings file"],
)
def test_nexus_kernel_in_a_test_pytest_trio_does_not_run_names_trio_mode(
    tmp_path: Path, ini: str | None, text: str, where: str
) -> None:
    """Without ``trio_mode = true`` the quickstart's tests failed with pytest's "requested
    an async fixture 'nexus_kernel', with no plugin or hook that handled it", and the
    next test with an ``AssertionError`` from inside pytest; each fails now saying what
    to switch on, and where: in the file pytest read its settings from (a project with a
    pytest.ini was told to set it in pyproject.toml, where pytest then never looked)."""
    if ini is not None:
        (tmp_path / ini).write_text(text, encoding="utf-8")
    (tmp_path / "test_mine.py").write_text(
        "async def test_one(nexus_kernel, autojump_clock):\n"
        "    pass\n\n\n"
        "async def test_two(nexus_kernel, autojump_clock):\n"
        "    pass\n",
        encoding="utf-8",
    )
    result = run_pytest(tmp_path, timeout=120)
    report = result.stdout + result.stderr
    assert result.returncode == 1, report
    assert "2 errors" in report, report
    for name in ("test_one", "test_two"):
        assert (
            f"{name} uses the nexus_kernel fixture but pytest-trio does not run it: set"
            f" trio_mode = true {where.format(path=tmp_path / (ini or ''))} (or mark the"
            " test @pytest.mark.trio)"
        ) in report, report
    assert "AssertionError" not in report, report


def test_nexus_kernel_in_a_plain_def_test_says_to_make_it_async(tmp_path: Path) -> None:
    """With ``trio_mode = true`` set, a plain ``def test_x(nexus_kernel)`` was told to
    "set trio_mode = true", which was set: pytest-trio marks only ``async def`` tests.
    It is now told to be an ``async def``; an async test beside it runs."""
    (tmp_path / "pytest.ini").write_text("[pytest]\ntrio_mode = true\n", encoding="utf-8")
    (tmp_path / "test_mine.py").write_text(
        "import pytest\n\n\n"
        "def test_plain(nexus_kernel):\n"
        "    pass\n\n\n"
        "@pytest.mark.parametrize('n', [1])\n"
        "def test_plain_too(nexus_kernel, n):\n"
        "    pass\n\n\n"
        "async def test_async(nexus_kernel, autojump_clock):\n"
        "    pass\n",
        encoding="utf-8",
    )
    result = run_pytest(tmp_path, timeout=120)
    report = result.stdout + result.stderr
    assert result.returncode == 1, report
    assert "1 passed, 2 errors" in report, report
    for shown, name in (("test_plain", "test_plain"), ("test_plain_too[1]", "test_plain_too")):
        assert (
            f"{shown} uses the nexus_kernel fixture but is a plain 'def': the fixture's"
            " kernel runs in the test's Trio run, so the test must be"
            f" 'async def {name}(nexus_kernel, autojump_clock)'"
        ) in report, report
    assert "set trio_mode = true" not in report, report


def test_nexus_kernel_s_accounting_failure_is_its_own_error_not_one_more_group(
    tmp_path: Path,
) -> None:
    """The fixture's kernel runs in a task of the fixture's own (so that a test may shut
    it down): a failed check at its end (the accounting, the busy kernel's) then came out
    of that task's nursery wrapped in one more ExceptionGroup than before, at the end of
    the test and after the test's own shutdown alike. It is raised as the fixture's own
    error again, as pytest-trio shows any fixture's: one group (pytest-trio's), then it."""
    (tmp_path / "pytest.ini").write_text("[pytest]\ntrio_mode = true\n", encoding="utf-8")
    (tmp_path / "conftest.py").write_text(
        "import pytest\n\n\n"
        "def _shape(exc):\n"
        "    if isinstance(exc, BaseExceptionGroup):\n"
        "        inner = ', '.join(_shape(e) for e in exc.exceptions)\n"
        "        return f'{type(exc).__name__}[{inner}]'\n"
        "    return f'{type(exc).__name__}({exc})'\n\n\n"
        "@pytest.hookimpl(hookwrapper=True)\n"
        "def pytest_runtest_makereport(item, call):\n"
        "    yield\n"
        "    if call.excinfo is not None:\n"
        "        print(f'SHAPE {item.name} {call.when}: {_shape(call.excinfo.value)}')\n",
        encoding="utf-8",
    )
    (tmp_path / "test_mine.py").write_text(
        "import trio\n"
        "import nexus_trio.testing\n\n\n"
        "def _miscount(kernel):\n"
        "    raise AssertionError('1 message lost')\n\n\n"
        "async def test_at_the_end(nexus_kernel, autojump_clock, monkeypatch):\n"
        "    monkeypatch.setattr(nexus_trio.testing, 'assert_conserved', _miscount)\n\n\n"
        "async def test_after_its_own_shutdown(nexus_kernel, autojump_clock, monkeypatch):\n"
        "    monkeypatch.setattr(nexus_trio.testing, 'assert_conserved', _miscount)\n"
        "    await nexus_kernel.shutdown(grace=0)\n"
        "    await trio.sleep(1)\n"
        "    raise RuntimeError('not reached: the failed check cancels the test')\n",
        encoding="utf-8",
    )
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        check=False,
    )
    report = result.stdout + result.stderr
    assert "2 failed" in report, report
    shapes = sorted(line for line in report.splitlines() if "SHAPE " in line)
    assert [line[line.index("SHAPE ") :] for line in shapes] == [
        "SHAPE test_after_its_own_shutdown call: ExceptionGroup[AssertionError(1 message lost)]",
        "SHAPE test_at_the_end call: ExceptionGroup[AssertionError(1 message lost)]",
    ], report


def _recorded(*events: tuple[str, str]) -> EventRecorder:
    ids = {name: uuid.uuid4() for name, _ in events}
    return EventRecorder(
        events=[LifecycleEvent(EventKind(kind), ids[name], name, 0.0) for name, kind in events]
    )


def test_assert_events_on_long_lists_names_the_first_difference_and_shows_around_it() -> None:
    """Before: both lists whole (``expected ['spawned', 'started', 'failed', ...]``, twenty
    entries each on one line), leaving the reader to find where they part."""
    cycles = ["spawned"] + ["started", "failed", "restarted"] * 6
    got = [*cycles[:12], "stopped", *cycles[13:], "stopped"]
    recorder = _recorded(*[("w", kind) for kind in got], ("x", "spawned"))
    with pytest.raises(AssertionError) as info:
        assert_events(recorder, "w", cycles)
    assert str(info.value) == (
        "events of w: expected 19 events, got 20; first difference at index 12: expected"
        " 'restarted', got 'stopped'\n"
        "    index  expected   got\n"
        "        9  restarted  restarted\n"
        "       10  started    started\n"
        "       11  failed     failed\n"
        "  >    12  restarted  stopped\n"
        "       13  started    started\n"
        "       14  failed     failed\n"
        "       15  restarted  restarted"
    )
    # all agents' events: each got entry with its agent's name
    with pytest.raises(AssertionError) as info:
        assert_events(recorder, None, cycles)
    assert str(info.value).splitlines()[5] == "  >    12  restarted  stopped (w)"
    # one list a prefix of the other: the first entry past the shorter one
    with pytest.raises(AssertionError) as info:
        assert_events(recorder, "w", cycles[:12])
    lines = str(info.value).splitlines()
    assert lines[0] == (
        "events of w: expected 12 events, got 20; first difference at index 12: expected"
        " no more events, got 'stopped'"
    )
    assert lines[5:7] == ["  >    12  -          stopped", "       13  -          started"]
    # short lists are shown whole, with the index
    with pytest.raises(AssertionError) as info:
        assert_events(recorder, "x", ["spawned", "started"])
    assert str(info.value) == (
        "events of x: expected ['spawned', 'started'], got ['spawned']; first difference"
        " at index 1: expected 'started', got no more events"
    )


def test_a_misspelt_reason_or_event_kind_lists_the_known_ones() -> None:
    """``dead_letters(kernel, "handler_eror")`` raised Python's bare "'handler_eror' is
    not a valid DeadLetterReason", which does not say what the valid ones are."""
    recorder = EventRecorder()
    with pytest.raises(ValueError, match=r"^event kind must be one of") as raised:
        recorder.of("strated")
    assert str(raised.value).startswith("event kind must be one of 'spawned', 'started', ")
    assert str(raised.value).endswith(
        ", got 'strated' (did you mean 'started', or EventKind.STARTED?)"
    )
    with pytest.raises(ValueError, match=r"event kind must be one of .*, got 'strated'"):
        assert_events(recorder, None, ["spawned", "strated"])

    class NoLetters:
        def recent_dead_letters(self) -> list[Any]:
            return []

    with pytest.raises(ValueError, match=r"^reason must be one of") as raised:
        dead_letters(NoLetters(), "handler_eror")  # type: ignore[arg-type]
    assert str(raised.value).startswith("reason must be one of 'no_such_agent', ")
    assert "'handler_error'" in str(raised.value)
    assert str(raised.value).endswith(
        ", got 'handler_eror' (did you mean 'handler_error', or DeadLetterReason.HANDLER_ERROR?)"
    )


def test_nexus_kernel_with_a_mock_clock_that_does_not_jump_names_autojump_clock(
    tmp_path: Path,
) -> None:
    """With pytest-trio's ``mock_clock`` (which never moves by itself) the fixture let the
    test run: a request timeout never fired and ``step_until_idle`` waited forever, so
    the test hung instead of failing, though the page says the fixture stops a test
    without ``autojump_clock``."""
    (tmp_path / "pytest.ini").write_text("[pytest]\ntrio_mode = true\n", encoding="utf-8")
    (tmp_path / "test_mine.py").write_text(
        "async def test_one(nexus_kernel, mock_clock):\n    pass\n",
        encoding="utf-8",
    )
    result = run_pytest(tmp_path, timeout=120)
    report = result.stdout + result.stderr
    assert result.returncode == 1, report
    assert "1 failed" in report, report  # pytest-trio sets its fixtures up in the test
    assert (
        "nexus_kernel needs a mock clock that jumps: add 'autojump_clock' to the test's"
        " arguments (mock_clock does not move by itself: timeouts would never fire)"
    ) in report, report


async def test_assert_dead_lettered_names_only_what_it_looked_for(
    nexus_kernel: Kernel, autojump_clock: Any
) -> None:
    """A failed ``assert_dead_lettered(kernel, reason="late_reply")`` said "no dead letter
    with payload=NOTHING reason='late_reply' error=None": attrs' ``NOTHING`` (its "not
    given") read as a payload looked for, and criteria not given were listed as ``None``."""

    @agent(name="failing")
    async def failing(ctx: Context, msg: Message) -> None:
        raise ValueError("no")

    await nexus_kernel.send(nexus_kernel.spawn(failing), 4)
    await settle()
    with pytest.raises(AssertionError) as raised:
        assert_dead_lettered(nexus_kernel, reason="late_reply")
    assert str(raised.value) == (
        "no dead letter with reason='late_reply'; dead letters:"
        " [('handler_error', 4, \"ValueError('no')\")]"
    )
    with pytest.raises(AssertionError) as raised:
        assert_dead_lettered(nexus_kernel, payload=None, error=KeyError)
    assert str(raised.value).startswith(
        "no dead letter with payload=None error=<class 'KeyError'>; dead letters: ["
    )
    assert assert_dead_lettered(nexus_kernel).message.payload == 4


def test_nexus_kernel_in_a_hypothesis_test_says_to_open_a_kernel_per_example(
    tmp_path: Path,
) -> None:
    """pytest-trio runs each Hypothesis example in a Trio run of its own but sets the
    fixture up once: from the second example on the test got the first one's kernel,
    shut down ("kernel is shutting down: spawn refused", and "<fixture 'nexus_kernel'>
    cancelled the test but didn't raise an error"), or passed on it without a word if it
    only read it. It now fails at setup saying what to write instead."""
    (tmp_path / "pytest.ini").write_text("[pytest]\ntrio_mode = true\n", encoding="utf-8")
    (tmp_path / "test_mine.py").write_text(
        "from hypothesis import HealthCheck, given, settings, strategies as st\n\n\n"
        "@settings(max_examples=5, database=None,"
        " suppress_health_check=[HealthCheck.function_scoped_fixture])\n"
        "@given(st.integers())\n"
        "async def test_one(nexus_kernel, autojump_clock, x):\n"
        "    assert not nexus_kernel.stopped\n",
        encoding="utf-8",
    )
    result = run_pytest(tmp_path, timeout=120)
    report = result.stdout + result.stderr
    assert result.returncode == 1, report
    assert "1 error" in report, report
    assert (
        "test_one uses the nexus_kernel fixture in a Hypothesis test: the fixture is set up"
        " once for the test, not for each example (the second example would get the first"
        " one's kernel, shut down): open a kernel in each example with"
        " 'async with open_test_kernel() as kernel:' (see docs/testing.md)"
    ) in report, report


def test_under_pytest_only_the_testing_module_has_its_asserts_rewritten() -> None:
    # the plugin's entry point marks the whole distribution for pytest's rewrite: the
    # kernel's modules opt out, so a test runs the kernel's code as production does
    import ast
    import importlib

    import nexus_trio.testing

    package = Path(nexus_trio.testing.__file__).parent
    rewritten_globals = "@pytest_ar"  # the import pytest adds to a module it rewrites
    assert rewritten_globals in vars(nexus_trio.testing)
    for name in ("_kernel", "_cell", "_supervisor", "_mailbox", "_router", "_pool", "logs"):
        module = importlib.import_module(f"nexus_trio.{name}")
        assert rewritten_globals not in vars(module), name
    from nexus_trio._cell import AgentCell

    assert not any(local.startswith("@py") for local in AgentCell.run_once.__code__.co_varnames)
    # and every module but the testing one says so, new ones included
    unmarked = [
        path.relative_to(package).as_posix()
        for path in sorted(package.rglob("*.py"))
        if path.name != "testing.py" or path.parent != package
        if "PYTEST_DONT_REWRITE" not in (ast.get_docstring(ast.parse(path.read_text())) or "")
    ]
    assert unmarked == []
    assert "PYTEST_DONT_REWRITE" not in (nexus_trio.testing.__doc__ or "")
