"""Helpers for testing your own agents with pytest and pytest-trio.

Installed as a pytest plugin: the ``nexus_kernel`` fixture opens a kernel on Trio's
``MockClock(autojump_threshold=0)``, so timeouts and backoffs happen instantly and
deterministically. A test of an agent fits in five lines::

    from nexus_trio import agent

    @agent(name="echo")
    async def echo(ctx, msg):
        return {"echo": msg.payload}

    async def test_echo(nexus_kernel, autojump_clock):
        ref = nexus_kernel.spawn(echo)
        assert await nexus_kernel.request(ref, "hi") == {"echo": "hi"}

The functions below work with any kernel: :func:`settle` runs everything that can run
right now, :func:`step_until_idle` also lets time pass (backoffs, timeouts) until no
message is left in flight, :func:`send_and_wait` sends and then steps until idle,
:func:`dead_letters`, :func:`assert_dead_lettered` and :func:`assert_no_dead_letters`
inspect what was not handled, :func:`record_events` collects lifecycle events and
:func:`assert_events` compares them, :func:`spawn_probe` stands in for an agent and records
what it receives, :func:`assert_conserved` checks the kernel's accounting.

Under pytest this module alone has its ``assert`` statements rewritten (so its helpers
fail with pytest's detailed messages): a plugin's entry point asks pytest to rewrite
every module of its distribution, and each of the kernel's other modules opts out in its
docstring, so your tests run the kernel's code as your production does.
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import math
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Final

import attrs
import pytest
import trio
import trio.testing

from ._agent import AgentRef, Context, agent, checked_seconds
from ._block import async_block
from ._brief import brief
from ._child import enum_member
from ._config import SECTIONS, Config
from ._deadletter import DeadLetter, DeadLetterReason
from ._errors import error_repr, nearest
from ._events import EventKind, LifecycleEvent
from ._kernel import Kernel, open_kernel
from ._message import SYSTEM_ID, Message, MessageKind

__all__ = [
    "EventRecorder",
    "Probe",
    "assert_conserved",
    "assert_dead_lettered",
    "assert_events",
    "assert_no_dead_letters",
    "dead_letters",
    "nexus_kernel",
    "open_test_kernel",
    "record_events",
    "send_and_wait",
    "settle",
    "spawn_probe",
    "step_until_idle",
    "test_config",
]


def test_config(**options: Any) -> Config:
    """Defaults for tests: a large dead-letter ring, immediate restarts, config otherwise default.

    A section's name takes a mapping of its options (``supervision={"max_restarts": 1}``,
    ``kernel=``, ``runtime=``, ``logging=``, ``metrics=``, ``app=``, ``nats=``), set over
    the test defaults; any other keyword is a ``[kernel]`` option
    (``test_config(mailbox_capacity=8)``). An option a section does not have is a
    ``TypeError`` naming it and the nearest (a misspelt section's name, the section); a
    bad value, the section's ``ValueError``."""
    sections = {name: _section_options(name, options.pop(name, None)) for name in SECTIONS}
    _check_kernel_keywords(options, sections["kernel"])
    sections["kernel"] = {"dead_letter_buffer": 100_000, **sections["kernel"], **options}
    sections["supervision"] = {
        "backoff_initial_ms": 0,
        "backoff_max_ms": 0,
        **sections["supervision"],
    }
    return Config(**{name: cls(**sections[name]) for name, cls in SECTIONS.items()})


def _section_options(section: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``test_config``'s ``section=`` mapping, checked: every key an option of the section."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise TypeError(
            f"test_config: {section}= takes a mapping of [{section}] options to values,"
            f" got {options!r}"
        )
    known = [field.name for field in attrs.fields(SECTIONS[section])]
    for key in options:
        if key not in known:
            near = nearest(str(key), known)
            hint = f"; did you mean {near!r}?" if near else ""
            raise TypeError(
                f"test_config: {key!r} is no [{section}] option{hint}"
                f" (they are: {', '.join(known)})"
            )
    return dict(options)


def _check_kernel_keywords(keywords: Mapping[str, Any], kernel: Mapping[str, Any]) -> None:
    """The ``[kernel]`` options given as keywords: each one of the section's, and not also
    in ``kernel=``; one of another section's is named with how to give it."""
    for key in keywords:
        owners = [s for s, cls in SECTIONS.items() if key in attrs.fields_dict(cls)]
        if owners and owners[0] != "kernel":
            raise TypeError(
                f"test_config: {key!r} is no [kernel] option; it is a [{owners[0]}] one:"
                f" test_config({owners[0]}={{{key!r}: ...}})"
            )
        if key in kernel:
            raise TypeError(
                f"test_config: [kernel] {key!r} is given twice (as {key}= and in kernel=)"
            )
        kernel_options = attrs.fields_dict(SECTIONS["kernel"])
        near = nearest(str(key), SECTIONS)
        if not owners and near and not nearest(str(key), kernel_options):
            # a misspelt section (``supervison=``), not a [kernel] option
            raise TypeError(
                f"test_config: {key!r} is no [kernel] option; did you mean the section"
                f" {near}=? (the sections are: {', '.join(SECTIONS)})"
            )
    _section_options("kernel", keywords)


test_config.__test__ = False  # type: ignore[attr-defined]  # not a test, despite its name


@async_block("open_test_kernel()", "kernel")
async def open_test_kernel(
    config: Config | None = None, *, seed: int = 0, timeout: float = 60.0
) -> AsyncIterator[Kernel]:
    """Open a kernel for a test (see :func:`test_config`); shut down and check it on exit.

    On a mock clock the shutdown is graceful once every task is blocked. If they do not
    all block within ``timeout`` seconds of real time (an agent that sends to itself on
    every message), a graceful shutdown could never end there, the clock not moving while
    a task runs: the kernel is shut down at once (grace 0) and an ``AssertionError`` says
    so, or, if the block raised, a note on its exception does.
    """
    if config is not None and not isinstance(config, Config):
        # (what the test would write instead: its options as test_config's keywords)
        options = (
            ", ".join(f"{key}={value!r}" for key, value in config.items())
            if isinstance(config, Mapping) and all(isinstance(key, str) for key in config)
            else "..."
        )
        raise TypeError(
            "open_test_kernel(config) takes a nexus_trio.Config, got"
            f" {type(config).__name__} {config!r}: test_config({options}) builds one"
            " (test_config(supervision={...}) for another section's options)"
        )
    checked_seconds(timeout, "open_test_kernel's timeout")
    async with open_kernel(config or test_config(), seed=seed) as kernel:
        try:
            yield kernel
        except Exception as exc:
            busy = await _shut_down_if_busy(kernel, timeout)
            if busy:
                exc.add_note(busy)
            raise
        busy = await _shut_down_if_busy(kernel, timeout)
        if busy:
            raise AssertionError(busy)
    assert_conserved(kernel)


def _check_kernel(kernel: object, helper: str, uses: str) -> None:
    """A :class:`TypeError` naming ``helper`` unless ``kernel`` is a kernel, or a
    stand-in for one with the method ``uses`` that ``helper`` calls: what else was passed
    (``None``, a name, the block ``open_kernel()`` returns without ``async with``)
    failed deep inside with an ``AttributeError`` that named no helper, or, for
    ``settle``, was taken without a word."""
    if isinstance(kernel, Kernel) or callable(getattr(type(kernel), uses, None)):
        return
    hint = (
        ": that is the block itself; use 'async with open_test_kernel() as kernel:' and pass kernel"
        if hasattr(type(kernel), "__aenter__")
        else " (open_test_kernel(), open_kernel() or the nexus_kernel fixture gives one)"
    )
    raise TypeError(
        f"{helper}: kernel must be a nexus_trio.Kernel, got {type(kernel).__name__}"
        f" {brief(kernel, 60)}{hint}"
    )


async def _shut_down_if_busy(kernel: Kernel, timeout: float) -> str:
    """Shut ``kernel`` down at once if its tasks never all block within ``timeout`` s of
    real time, and say so (else ``""``, the graceful shutdown left to the block's end).
    Only on a mock clock that moves by jumps alone: any other ends the grace period
    by itself, and the agent is stopped then, as in production."""
    clock = trio.lowlevel.current_clock()
    if not (isinstance(clock, trio.testing.MockClock) and clock.rate == 0):
        return ""
    if await _all_blocked(timeout):
        return ""
    busy = ", ".join(
        f"{node.get('name') or node['id']} ({node['mailbox_depth']} queued,"
        f" {int(node.get('handling') is not None)} in hand)"
        for node in _nodes(kernel)
        if node.get("mailbox_depth") or node.get("handling") is not None
    )
    await kernel.shutdown(0)
    return (
        f"open_test_kernel: the kernel's tasks never all blocked within {timeout:g} s of"
        f" real time when its block ended {_BUSY}: on a mock clock its graceful shutdown"
        f" could never end, so it was shut down at once (grace 0); agents with messages"
        f" queued or in hand: {busy or 'none'}"
    )


def _nodes(kernel: Kernel) -> list[dict[str, Any]]:
    """Every supervisor and agent of the tree, as :meth:`Kernel.describe` shows them."""
    found: list[dict[str, Any]] = []
    nodes = [kernel.describe()]
    while nodes:
        node = nodes.pop()
        nodes.extend(node.get("children", ()))
        found.append(node)
    return found


_BUSY = "(did an agent keep itself busy, sending to itself on every message?)"


async def settle(kernel: Kernel | None = None, *, timeout: float = 60.0) -> None:
    """Let every task run until all are blocked: messages sent so far are handled or waiting.

    Time does not move. ``AssertionError`` if tasks are still running after ``timeout``
    seconds of real time (an agent that sends to itself on every message never lets
    them all block), where the wait would go on forever.
    """
    if kernel is not None:
        _check_kernel(kernel, "settle", "stats")
    checked_seconds(timeout, "settle's timeout")
    if not await _all_blocked(timeout):
        raise AssertionError(f"tasks not all blocked after {timeout:g} s of real time {_BUSY}")


async def _all_blocked(seconds: float) -> bool:
    """``wait_all_tasks_blocked``, given up after ``seconds`` of real time: False then.

    A mock clock does not move while tasks run, so its deadlines cannot bound this
    wait: a timer thread does, calling into the run only if the time runs out (none
    for an infinite ``seconds``: a ``threading.Timer`` cannot wait that long).
    """
    if math.isinf(seconds):
        await trio.testing.wait_all_tasks_blocked()
        return True
    token = trio.lowlevel.current_trio_token()
    with trio.CancelScope() as scope:

        def expire() -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(scope.cancel)

        timer = threading.Timer(max(seconds, 0.0), expire)
        timer.daemon = True
        timer.start()
        try:
            await trio.testing.wait_all_tasks_blocked()
        finally:
            timer.cancel()
    return not scope.cancelled_caught


async def step_until_idle(kernel: Kernel, *, timeout: float = 60.0) -> None:
    """Run the kernel until no accepted message is left in flight, no agent waits for
    its restart, and every task is blocked.

    Unlike :func:`settle` this lets time pass, so restart backoffs, handler timeouts and
    sleeps in handlers play out — instantly on a ``MockClock`` with ``autojump_threshold=0``
    (the ``autojump_clock`` fixture), in real time otherwise. Raises ``AssertionError``
    saying how many messages are still in flight (which agents are handling them, which
    are restarting) if the kernel is not idle after ``timeout`` seconds of the run's
    clock (on the ``autojump_clock``, mock seconds: a handler that sleeps an hour needs
    ``timeout=3600`` or more, though it takes no real time), e.g. because a handler
    waits forever, or if its tasks do not all block within
    ``timeout`` seconds of real time (an agent that sends to itself on every message:
    a mock clock does not move meanwhile); ``RuntimeError`` if time has to pass but the clock
    is a ``MockClock`` that does not jump (pytest-trio's ``mock_clock``), where it would
    wait forever.
    """
    _check_kernel(kernel, "step_until_idle", "stats")
    checked_seconds(timeout, "step_until_idle's timeout")
    deadline = trio.current_time() + timeout
    while True:
        handled = kernel.stats().handled
        if not await _all_blocked(timeout):
            s = kernel.stats()
            raise AssertionError(
                f"kernel not idle after {timeout:g} s: its tasks never all blocked {_BUSY};"
                f" {s.handled - handled} message(s) handled meanwhile, {s.in_flight}"
                f" message(s) in flight; agents: {kernel.describe()}"
            )
        in_flight = kernel.stats().in_flight
        # A failure dead-letters its message at once: during the restart's backoff nothing
        # is in flight, but the restart has yet to happen.
        restarting = _restarting(kernel) if in_flight == 0 else []
        if in_flight == 0 and not restarting:
            return
        if trio.current_time() >= deadline:
            waiting = f", agents restarting: {restarting}" if restarting else ""
            raise AssertionError(
                f"kernel not idle after {timeout:g} s: {in_flight} message(s) still in flight"
                f"{waiting}{_in_hand(kernel)}{_on_the_mock_clock(kernel, timeout)};"
                f" agents: {kernel.describe()}"
            )
        _check_time_can_pass()
        await trio.sleep(min(_until_next_wakeup(), max(deadline - trio.current_time(), 0.0)))


def _in_hand(kernel: Kernel) -> str:
    """``, being handled by 'slow'``: the agents whose handler has not returned."""
    busy = [
        repr(node.get("name") or node["id"])
        for node in _nodes(kernel)
        if node.get("handling") is not None
    ]
    return f", being handled by {', '.join(busy)}" if busy else ""


def _on_the_mock_clock(kernel: Kernel, timeout: float) -> str:
    """What ``timeout`` counted on a mock clock that jumps: its seconds, not real ones,
    so a handler, sleep or backoff meant to take longer needs a larger one; with process
    agents, that they work in real time, which such a clock does not wait for (a larger
    timeout would not help)."""
    clock = trio.lowlevel.current_clock()
    if not (isinstance(clock, trio.testing.MockClock) and clock.rate == 0):
        return ""
    processes = _process_agents(kernel)
    if processes:
        return (
            f" (process agents {', '.join(map(repr, processes))} work in real time, which"
            " a mock clock that jumps does not wait for: it jumps whenever every task waits,"
            " for a child process's answer too, so no timeout= helps; test them on a real"
            " clock, see docs/testing.md)"
        )
    return (
        f" ({timeout:g} s of the mock clock, which took no real time: a handler, sleep or"
        f" backoff meant to take longer needs a larger timeout=, e.g. timeout=3600)"
    )


def _process_agents(kernel: Kernel) -> list[str]:
    """The names (else ids) of ``kernel``'s live process agents (``process_agent``) that
    hold a message in flight (queued, waiting for room, or in hand): one idle beside an
    agent whose handler sleeps an hour is none of the cause, and the larger timeout= is
    what helps then."""
    if not isinstance(kernel, Kernel):
        return []
    from .bridges import bridge_stats  # (here: a test without process agents needs none)

    ids = {str(agent_id) for agent_id in bridge_stats(kernel)}
    return sorted(
        node.get("name") or node["id"]
        for node in _nodes(kernel)
        if node["id"] in ids
        and (
            node.get("mailbox_depth", 0)
            or node.get("senders_waiting", 0)
            or node.get("handling") is not None
        )
    )


def _until_next_wakeup() -> float:
    """How long to sleep before looking at the kernel again, every task being blocked.

    On a ``MockClock`` that jumps (``autojump_threshold=0``, the ``autojump_clock``
    fixture) it jumps to the run's next timer (a sleep, a timeout, a backoff), so
    nothing can happen before that timer fires: sleeping until then wakes this loop a
    few times for an hour's sleep in a handler, where steps of 0.01 s took 360,000
    turns, and real time. On any other clock a thread or a process may end the wait
    before a timer does: it looks again every 0.01 s.
    """
    step = 0.01
    clock = trio.lowlevel.current_clock()
    if isinstance(clock, trio.testing.MockClock) and clock.autojump_threshold != float("inf"):
        step = float("inf")
    return max(min(step, trio.lowlevel.current_statistics().seconds_to_next_deadline), 0.0)


def _restarting(kernel: Kernel) -> list[str]:
    """The names (else ids) of the agents and supervisors waiting for their restart."""
    return sorted(
        node.get("name") or node["id"]
        for node in _nodes(kernel)
        if node.get("state") == "restarting"
    )


def _check_time_can_pass() -> None:
    clock = trio.lowlevel.current_clock()
    if (
        isinstance(clock, trio.testing.MockClock)
        and clock.rate == 0
        and clock.autojump_threshold == float("inf")
    ):
        raise RuntimeError(
            "step_until_idle needs time to pass, but the clock is a MockClock that does not"
            " jump (autojump_threshold=inf, rate=0): it would wait forever. Use pytest-trio's"
            " autojump_clock fixture (MockClock(autojump_threshold=0)), or jump the clock"
            " yourself before calling it"
        )


async def send_and_wait(
    kernel: Kernel,
    to: Any,
    payload: Any = None,
    *,
    kind: MessageKind = MessageKind.COMMAND,
    sender: Any = SYSTEM_ID,
    timeout: float = 60.0,
) -> Message:
    """Send one message, then :func:`step_until_idle`; return the message that was sent.

    For agents that do not answer (events, commands): what the message caused — state,
    messages to other agents, dead letters, restarts — has happened when this returns.
    To get an answer back use ``await kernel.request(to, payload)``.
    """
    _check_kernel(kernel, "send_and_wait", "send")
    checked_seconds(timeout, "send_and_wait's timeout")  # (before the message is sent)
    message = await kernel.send(to, payload, kind=kind, sender=sender)
    await step_until_idle(kernel, timeout=timeout)
    return message


def dead_letters(kernel: Kernel, reason: DeadLetterReason | str | None = None) -> list[DeadLetter]:
    """Dead letters so far (oldest first), optionally only those with ``reason``: the
    last ``[kernel] dead_letter_buffer`` the kernel keeps (100,000 with :func:`test_config`);
    ``kernel.stats().dead_lettered`` counts them all."""
    _check_kernel(kernel, "dead_letters", "recent_dead_letters")
    letters = kernel.recent_dead_letters()
    if reason is None:
        return letters
    wanted = enum_member(DeadLetterReason, reason, "reason")
    return [letter for letter in letters if letter.reason is wanted]


def assert_dead_lettered(
    kernel: Kernel,
    *,
    payload: Any = attrs.NOTHING,
    reason: DeadLetterReason | str | None = None,
    error: type[BaseException] | None = None,
) -> DeadLetter:
    """Assert one dead letter matches and return it; the message says what was there instead."""
    _check_kernel(kernel, "assert_dead_lettered", "recent_dead_letters")
    if error is not None and not (isinstance(error, type) and issubclass(error, BaseException)):
        if isinstance(error, BaseException):
            raise TypeError(
                f"assert_dead_lettered: error must be an exception type"
                f" ({type(error).__name__}), not the exception {error_repr(error)}; to check"
                " its text, look at the returned letter's .error"
            )
        raise TypeError(
            "assert_dead_lettered: error must be an exception type, such as ValueError,"
            f" not {type(error).__name__} {error!r}"
        )
    letters = dead_letters(kernel, reason)
    matching = [
        d
        for d in letters
        if (payload is attrs.NOTHING or d.message.payload == payload)
        and (error is None or isinstance(d.error, error))
    ]
    if not matching:
        seen = [
            (d.reason.value, d.message.payload, error_repr(d.error))
            for d in kernel.recent_dead_letters()
        ]
        given = [
            f"{what}={value!r}"
            for what, value, unset in (
                ("payload", payload, attrs.NOTHING),
                ("reason", reason, None),
                ("error", error, None),
            )
            if value is not unset
        ]
        wanted = f" with {' '.join(given)}" if given else " at all"
        total = _dead_lettered(kernel, len(seen))
        looked = (
            f" among the last {len(seen):,} of {total:,} (the kernel keeps the last [kernel]"
            f" dead_letter_buffer: the {total - len(seen):,} before them were let go, not looked at)"
            if total > len(seen)
            else ""
        )
        raise AssertionError(f"no dead letter{wanted}{looked}; dead letters: {seen}")
    return matching[0]


def _dead_lettered(kernel: Kernel, kept: int) -> int:
    """How many messages ``kernel`` dead-lettered in all: more than the ``kept`` its ring
    of recent dead letters (``[kernel] dead_letter_buffer``) holds once it let the oldest
    go, which the dead-letter helpers say (a letter let go read as one never
    dead-lettered). A stand-in for a kernel without ``stats`` is taken as keeping all."""
    stats = getattr(kernel, "stats", None)
    return max(stats().dead_lettered, kept) if callable(stats) else kept


def assert_no_dead_letters(kernel: Kernel) -> None:
    """Assert that nothing was dead-lettered; the message lists what was."""
    _check_kernel(kernel, "assert_no_dead_letters", "recent_dead_letters")
    letters = kernel.recent_dead_letters()
    if letters:
        seen = [(d.reason.value, d.message.payload, error_repr(d.error)) for d in letters]
        total = _dead_lettered(kernel, len(letters))
        count = (
            f"{total:,} (the last {len(letters):,} shown: the kernel keeps the last [kernel]"
            " dead_letter_buffer)"
            if total > len(letters)
            else str(total)
        )
        raise AssertionError(f"expected no dead letters, got {count}: {seen}")


def assert_conserved(kernel: Kernel) -> None:
    """Every accepted message is handled, replied, forwarded, dead-lettered or in flight,
    and what the counters say is in flight is really there.

    The kernel's ``in_flight`` is what the other counters leave of ``accepted``, so the
    sum alone cannot catch a miscount: the messages in flight are also counted one by
    one, from the tree (:meth:`Kernel.describe`): those queued in mailboxes, those whose
    senders wait for room in a full one (the kernel counts them as accepted while they
    wait), and those an agent is handling. After the shutdown nothing may be in flight.
    Call it when every task is blocked (after :func:`settle`, say, or after the kernel
    closed): a task that was just woken (a waiting sender whose wait was cancelled, a
    handler whose message was just taken) has not yet done its part of the accounting.
    """
    _check_kernel(kernel, "assert_conserved", "stats")
    s = kernel.stats()
    total = s.handled + s.replies_delivered + s.forwarded + s.dead_lettered + s.in_flight
    if s.accepted != total or s.in_flight < 0:
        raise AssertionError(f"message accounting does not add up: {s}")
    if kernel.stopped:
        if s.in_flight:
            raise AssertionError(f"{s.in_flight} messages still in flight after shutdown")
        return
    queued = handling = 0
    for node in _nodes(kernel):
        queued += node.get("mailbox_depth", 0) + node.get("senders_waiting", 0)
        handling += node.get("handling") is not None
    if s.in_flight != queued + handling:
        raise AssertionError(
            f"{s.in_flight} messages in flight by the counters, but {queued} queued in"
            f" mailboxes (or waiting for room) and {handling} being handled: {s}"
        )


@attrs.define
class EventRecorder:
    """Lifecycle events collected by :func:`record_events`.

    ``dropped``: events the recorder missed because its buffer was full (inside the block,
    as of the last event it took: after :func:`settle`, all of them); :func:`assert_events`
    fails while it is not 0.
    """

    events: list[LifecycleEvent] = attrs.Factory(list)
    dropped: int = 0

    def kinds(self, name: str | None = None) -> list[EventKind]:
        return [e.kind for e in self.events if name is None or e.name == name]

    def of(self, kind: EventKind | str) -> list[LifecycleEvent]:
        wanted = enum_member(EventKind, kind, "event kind")
        return [e for e in self.events if e.kind is wanted]


def assert_events(
    recorder: EventRecorder, name: str | None, expected: list[EventKind | str]
) -> None:
    """Assert the lifecycle events of agent ``name`` (all agents if ``None``) were ``expected``.

    ``expected`` lists kinds in order, as :class:`EventKind` or their values (``"failed"``).
    """
    if not isinstance(recorder, EventRecorder):
        raise TypeError(
            "assert_events: recorder must be the EventRecorder of 'async with"
            f" record_events(kernel) as recorder:', got {type(recorder).__name__}"
            f" {brief(recorder, 60)}"
        )
    if isinstance(expected, str | EventKind):  # (a str would be gone through letter by letter)
        raise TypeError(
            "assert_events: the expected kinds must be a list of event kinds, got the"
            f" {type(expected).__name__} {expected!r} (write [{expected!r}])"
        )
    wanted = [enum_member(EventKind, kind, "event kind") for kind in expected]
    if recorder.dropped:
        raise AssertionError(
            f"events of {name or 'all agents'}: the recorder missed {recorder.dropped} events"
            " (buffer full); give record_events a larger buffer"
        )
    got = [e for e in recorder.events if name is None or e.name == name]
    if [e.kind for e in got] != wanted:
        raise AssertionError(_events_differ(recorder, name, wanted, got))


#: lists of events this long or shorter are shown whole in an assert_events failure
_SHOWN_WHOLE: Final = 10
#: events shown either side of the first difference of longer lists
_AROUND: Final = 3


def _events_differ(
    recorder: EventRecorder, name: str | None, wanted: list[EventKind], got: list[LifecycleEvent]
) -> str:
    """``assert_events``'s failure: both lists when short, else their lengths; the index of
    the first difference; for long lists a window around it, expected beside got (each
    with its agent's name when all agents' events are compared)."""
    expected = [kind.value for kind in wanted]
    actual = [e.kind.value if name is not None else f"{e.kind.value} ({e.name})" for e in got]
    first = next(
        (i for i, (a, b) in enumerate(zip(wanted, got, strict=False)) if a is not b.kind),
        min(len(wanted), len(got)),
    )
    head = f"events of {name or 'all agents'}: "
    where = _at(first, expected, actual) if got else _no_such_name(recorder, name)
    if max(len(wanted), len(got)) <= _SHOWN_WHOLE:
        return f"{head}expected {expected}, got {[e.kind.value for e in got]}{where}"
    lines = [f"{head}expected {len(wanted)} events, got {len(got)}{where}"]
    end = min(max(len(wanted), len(got)), first + _AROUND + 1)
    rows = [("index", "expected", "got")] + [
        (str(i), _nth(expected, i), _nth(actual, i)) for i in range(max(0, first - _AROUND), end)
    ]
    index_width = max(len(row[0]) for row in rows)
    kind_width = max(len(row[1]) for row in rows)
    for index, want, have in rows:
        mark = ">" if index == str(first) else " "
        lines.append(f"  {mark} {index:>{index_width}}  {want:<{kind_width}}  {have}".rstrip())
    return "\n".join(lines)


def _nth(kinds: list[str], index: int) -> str:
    return kinds[index] if index < len(kinds) else "-"


def _at(index: int, expected: list[str], actual: list[str]) -> str:
    """``; first difference at index 12: expected 'started', got 'stopped'``."""
    want = repr(expected[index]) if index < len(expected) else "no more events"
    have = repr(actual[index]) if index < len(actual) else "no more events"
    return f"; first difference at index {index}: expected {want}, got {have}"


def _no_such_name(recorder: EventRecorder, name: str | None) -> str:
    """Why no event was found for ``name``, when no event names it: a misspelt name
    would otherwise read as an agent that was never spawned."""
    names = sorted({e.name for e in recorder.events if e.name is not None})
    if name is None or name in names:
        return ""
    near = nearest(name, names)
    hint = f"; did you mean {near!r}?" if near else ";"
    there = ", ".join(map(repr, names)) or "none"
    return f" (no event names an agent {name!r}{hint} the events are of: {there})"


@async_block("record_events(kernel)", "events")
async def record_events(kernel: Kernel, buffer: int = 100_000) -> AsyncIterator[EventRecorder]:
    """Collect lifecycle events while the block runs (events are taken as they happen;
    what a full ``buffer`` loses is counted in ``recorder.dropped``).

    ``RuntimeError`` on a kernel whose shutdown is over: no event can come, and those of
    its run were not kept (an empty recorder would make ``assert_events(..., [])`` pass
    for anything)."""
    _check_kernel(kernel, "record_events", "events")
    if isinstance(kernel, Kernel) and kernel.stopped:
        raise RuntimeError(
            "record_events: the kernel has stopped (its shutdown is over): no event can"
            " come any more, and the events of its run were not kept; open"
            " 'async with record_events(kernel) as events:' inside the kernel's block,"
            " before what it should record"
        )
    recorder = EventRecorder()
    #: the block's own error, raised as it is: not in the group of the collecting
    #: task's nursery, which the block runs in (as open_kernel's block's)
    body_error: BaseException | None = None
    alone: BaseException | None = None
    # (the stream first: a bad buffer is its own error, not one of the nursery's group)
    async with kernel.events(buffer) as stream:

        async def collect() -> None:
            async for event in stream:
                recorder.events.append(event)
                # (kept current: an ``assert_events`` inside the block fails too once the
                # buffer lost events; a loss leaves events buffered, so one is taken after)
                recorder.dropped = stream.dropped

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(collect)
                try:
                    yield recorder
                except BaseException as exc:
                    body_error = exc
                    raise
                finally:
                    try:
                        # Bounded: with an agent that keeps itself busy, take what came
                        # within it. (Raises at once in a block cancelled from outside.)
                        await _all_blocked(60.0)
                    finally:
                        nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            if body_error is None or list(group.exceptions) != [body_error]:
                raise
            alone = body_error
        finally:
            # What the stream holds still, taken once ``collect`` has ended (it appends
            # an event it was handed before its cancel first: the order kept), also
            # when the block was cancelled: an ``await`` here raised at once then, and
            # the events of the block's last moments were lost, not counted as dropped.
            while True:
                try:
                    recorder.events.append(stream.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                    break
            recorder.dropped = stream.dropped
    if alone is not None:
        # (raised after the handler: its context is its own, not the group around it)
        raise alone


@attrs.define(eq=False)
class _Waiter:
    """An ``expect`` waiting for a message, parked with Trio's ``wait_task_rescheduled``:
    handed one directly, in arrival order, and rescheduled."""

    task: trio.lowlevel.Task
    message: Message | None = None


@attrs.define(eq=False)
class Probe:
    """An agent that records what it receives, made by :func:`spawn_probe` (Akka
    TestKit's ``TestProbe``): a stand-in for an agent the one under test talks to.

    ``messages`` are the messages received, in order (``payloads`` their payloads);
    :meth:`expect` takes them one by one, waiting for the next. Tasks waiting on one probe
    at once are served first come, first served (as Trio's own ``Lock``, ``Semaphore``
    and memory channels serve their waiters): the first to wait gets the next message.
    """

    ref: AgentRef
    messages: list[Message] = attrs.Factory(list)
    _taken: int = 0
    #: the expects waiting, the first to wait first (while any waits, every message
    #: received is taken: each is handed to the first waiter as it comes)
    _waiting: collections.deque[_Waiter] = attrs.Factory(collections.deque)

    @property
    def payloads(self) -> list[Any]:
        return [m.payload for m in self.messages]

    def _receive(self, msg: Message) -> None:
        self.messages.append(msg)
        if self._waiting:
            # Handed to the first waiter, not taken by whichever task Trio runs first
            # (it may run woken tasks in either order), nor by an expect that came later.
            waiter = self._waiting.popleft()
            waiter.message = msg
            self._taken += 1
            trio.lowlevel.reschedule(waiter.task)

    async def expect(self, timeout: float = 3.0) -> Message:
        """The next message ``expect`` has not returned yet, waiting for it up to
        ``timeout`` seconds (of the run's clock: on the mock clock no real time);
        ``AssertionError`` if none comes, naming the probe and what it received. Tasks
        waiting at once get the messages in the order they began to wait."""
        checked_seconds(timeout, "expect's timeout", zero=True)
        if self._taken < len(self.messages):
            # (none waits: a waiter would have been handed it)
            self._taken += 1
            return self.messages[self._taken - 1]
        waiter = _Waiter(trio.lowlevel.current_task())
        self._waiting.append(waiter)

        def abort(raise_cancel: Any) -> trio.lowlevel.Abort:
            # Timed out or cancelled (a scope around it), and not handed a message yet: it
            # leaves the queue as the cancel comes, as a task waiting on a Trio memory
            # channel does. (A waiter woken by an Event stayed in it until its task ran
            # again: a message handed to it meanwhile left with its cancel, taken by
            # nobody.) Once handed one, it is rescheduled: no cancel reaches it there.
            self._waiting.remove(waiter)
            return trio.lowlevel.Abort.SUCCEEDED

        with trio.move_on_after(timeout):
            await trio.lowlevel.wait_task_rescheduled(abort)
        if waiter.message is not None:
            return waiter.message
        name = self.ref.name or str(self.ref.id)
        raise AssertionError(
            f"probe {name!r} received no message within {timeout:g} s"
            f" ({len(self.messages)} received so far, all taken by expect: {self.payloads})"
        )


def spawn_probe(
    kernel: Kernel, name: str | None = None, *, answer: Callable[[Message], Any] | None = None
) -> Probe:
    """Spawn a :class:`Probe` named ``name``: it records every message it receives and
    returns ``answer(msg)`` (so a request gets it as its answer; an exception it raises
    fails the message as a handler's would). Without ``answer`` it answers nothing."""
    _check_kernel(kernel, "spawn_probe", "spawn")
    if answer is not None and not callable(answer):
        raise TypeError(
            "spawn_probe: answer must be a function of the message (answer=lambda msg: ...),"
            f" got {answer!r}"
        )
    if inspect.iscoroutinefunction(answer):
        shown = getattr(answer, "__name__", repr(answer))
        raise TypeError(
            f"spawn_probe: answer is called, not awaited: make {shown} a plain 'def', not an"
            " 'async def'"
        )

    async def record(ctx: Context, msg: Message) -> Any:
        probe._receive(msg)
        if answer is None:
            return None
        reply = answer(msg)
        if inspect.isawaitable(reply):
            # (a lambda around an async function: the kernel's own hint, "write
            # 'return await ...'", cannot be followed inside a lambda)
            if inspect.iscoroutine(reply):
                reply.close()  # (never awaited: no RuntimeWarning besides this error)
            raise TypeError(
                f"spawn_probe: answer returned {reply!r}, to be awaited: answer is called,"
                " not awaited; give a plain function that returns the answer itself"
            )
        return reply

    probe = Probe(kernel.spawn(agent(record, name=name)))
    return probe


# --- pytest plugin -----------------------------------------------------------------------


@pytest.fixture
async def nexus_kernel() -> AsyncIterator[Kernel]:
    """A kernel on a mock clock for the duration of the test.

    Requires pytest-trio, and the test must also take pytest-trio's ``autojump_clock``
    fixture as an argument (pytest-trio picks the clock from the test's own arguments):
    ``async def test_x(nexus_kernel, autojump_clock)``. Without it (also with
    ``mock_clock``, which never moves by itself) the fixture fails with an error saying
    so, rather than letting timeouts take real time or never fire.
    """
    clock = trio.lowlevel.current_clock()
    if not isinstance(clock, trio.testing.MockClock):
        raise pytest.UsageError(
            "nexus_kernel needs a mock clock: add 'autojump_clock' to the test's arguments"
        )
    if clock.autojump_threshold == float("inf") and clock.rate == 0:
        raise pytest.UsageError(
            "nexus_kernel needs a mock clock that jumps: add 'autojump_clock' to the test's"
            " arguments (mock_clock does not move by itself: timeouts would never fire)"
        )
    # The kernel runs in a task of the fixture's own: a test that shuts it down
    # (``await nexus_kernel.shutdown()``) runs beside its block, which the kernel then
    # ends; were the block the fixture's, pytest-trio would fail the test for a fixture
    # that was cancelled. The task's errors (the accounting check) are the fixture's:
    # raised as they are, not in one more group than before the task (the nursery's).
    done = trio.Event()
    alone: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            kernel: Kernel = await nursery.start(_hold_test_kernel, done)
            yield kernel
            done.set()
    except BaseExceptionGroup as group:
        if len(group.exceptions) != 1:
            raise
        alone = group.exceptions[0]
    if alone is not None:
        # (raised after the handler: its context is its own, not the group around it)
        raise alone


async def _hold_test_kernel(
    done: trio.Event, *, task_status: trio.TaskStatus[Kernel] = trio.TASK_STATUS_IGNORED
) -> None:
    """``nexus_kernel``'s kernel, open until ``done`` (or until a test shuts it down)."""
    async with open_test_kernel() as kernel:
        task_status.started(kernel)
        await done.wait()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test that takes ``nexus_kernel`` but that pytest-trio does not run (a plain
    ``def``; no ``trio_mode = true``, no ``@pytest.mark.trio``) fails saying so, before pytest's
    own, vaguer error about an async fixture nothing handled. One that is a Hypothesis
    test fails too: pytest-trio runs each example in a Trio run of its own but sets the
    fixture up once, so the examples after the first would get a kernel shut down."""
    if "nexus_kernel" not in getattr(item, "fixturenames", ()):
        return
    if getattr(getattr(item, "obj", None), "is_hypothesis_test", False):
        pytest.fail(
            f"{item.name} uses the nexus_kernel fixture in a Hypothesis test: the fixture is"
            " set up once for the test, not for each example (the second example would get"
            " the first one's kernel, shut down): open a kernel in each example with"
            " 'async with open_test_kernel() as kernel:' (see docs/testing.md)",
            pytrace=False,
        )
    if not item.get_closest_marker("trio"):
        test = getattr(item, "obj", None)
        if callable(test) and not inspect.iscoroutinefunction(test):
            # (trio_mode marks only async tests: "set trio_mode" would mislead here)
            name = getattr(test, "__name__", item.name)
            pytest.fail(
                f"{item.name} uses the nexus_kernel fixture but is a plain 'def': the"
                f" fixture's kernel runs in the test's Trio run, so the test must be"
                f" 'async def {name}(nexus_kernel, autojump_clock)'",
                pytrace=False,
            )
        pytest.fail(
            f"{item.name} uses the nexus_kernel fixture but pytest-trio does not run it: set"
            f" trio_mode = true {_where_settings_go(item.config)} (or mark the test"
            " @pytest.mark.trio)",
            pytrace=False,
        )


def _where_settings_go(config: pytest.Config) -> str:
    """Where ``trio_mode = true`` goes: the file pytest read its settings from, if any,
    in that file's section. A project with a ``pytest.ini`` told to use ``pyproject.toml``
    would set it where pytest never looks (the first such file found wins)."""
    path = config.inipath
    if path is None:
        return "under [tool.pytest.ini_options] in pyproject.toml"
    section = {"pyproject.toml": "[tool.pytest.ini_options]", "setup.cfg": "[tool:pytest]"}
    return f"under {section.get(path.name, '[pytest]')} in {path}, where pytest reads its settings"
