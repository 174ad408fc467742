"""A real-time guard for tests that run on Trio's mock clock, and the settings of the
fault-injection properties that run that way.

A task that waits forever inside a *shielded* scope (a hung shutdown) is not stopped by
``trio.fail_after`` on a mock clock; SIGALRM in real time turns such a hang into a test
failure instead of a stuck test run.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Final, TypeVar

import outcome
import trio
import trio.testing
from hypothesis import HealthCheck, settings

import nexus_trio
from nexus_trio import (
    AgentNotFound,
    KernelShuttingDown,
    MailboxFull,
    RequestFailed,
    RequestTimeout,
)

#: what a send or a request to an agent of one kernel may end with, besides its answer
#: (the fault-injection properties of the core accept these and no other error)
DOCUMENTED: Final = (RequestTimeout, RequestFailed, AgentNotFound, MailboxFull, KernelShuttingDown)


class Hung(Exception):
    """The test made no progress within its real-time limit: something waits forever."""


@contextmanager
def real_time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`Hung` in the main thread if the block runs ``seconds`` of real time,
    and again every second after while it still runs: an exception raised by a signal
    handler while a garbage-collection callback or a ``__del__`` runs is only reported
    as unraisable, and a single alarm landing there would leave the hang running."""

    def on_alarm(signum: int, frame: FrameType | None) -> None:
        raise Hung(f"no result after {seconds} s of real time: the kernel hangs")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds, 1.0)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


T = TypeVar("T")


def run_guarded(
    scenario: Callable[[], Awaitable[T]],
    clock: trio.abc.Clock,
    real_seconds: float,
    where: Callable[[], str],
) -> T:
    """``trio.run(scenario, clock=clock)`` in a thread of its own, failing with
    :class:`Hung` after ``real_seconds`` of real time, saying ``where()`` (the step the
    test was at) and where the run's tasks wait.

    Unlike :func:`real_time_limit`, a hang does not abandon the run halfway through
    Trio's loop (an exception raised by a signal handler there left the thread's run
    state set: every later ``trio.run`` in the thread, Hypothesis's replay of the
    example, said "Attempted to call run() from inside a run()" and the report was a
    ``FlakyFailure``). The hung run is left blocked in its own (daemon) thread, which
    holds no CPU; the next run, a replay, starts afresh in a new one."""
    result: list[outcome.Outcome[T]] = []
    tokens: list[trio.lowlevel.TrioToken] = []

    async def main() -> T:
        tokens.append(trio.lowlevel.current_trio_token())
        return await scenario()

    def target() -> None:
        result.append(outcome.capture(lambda: trio.run(main, clock=clock)))

    thread = threading.Thread(target=target, name="trio run (hang guard)", daemon=True)
    thread.start()
    thread.join(real_seconds)
    if thread.is_alive():
        waiting = _tasks_waiting(tokens[0]) if tokens else "(the run never began)"
        raise Hung(
            f"no result after {real_seconds} s of real time: the kernel hangs {where()};"
            f" the run's tasks wait at:\n{waiting}"
        )
    return result[0].unwrap()


#: the folders whose frames say where a task waits: the package's and the tests' (by
#: path, not by name: a checkout in a folder named ``nexus_trio``, as CI's clone is, holds
#: the virtualenv and Trio's frames too)
_OURS = (
    os.path.join(os.path.dirname(os.path.abspath(nexus_trio.__file__)), ""),
    os.path.join(os.path.dirname(os.path.abspath(__file__)), ""),
)


def _tasks_waiting(token: trio.lowlevel.TrioToken, seconds: float = 5.0) -> str:
    """Where each task of a hung run waits (its innermost frames of the kernel and the
    tests), asked of the run itself: its loop, blocked, still takes a callback."""
    lines: list[str] = []
    done = threading.Event()

    def look() -> None:
        try:
            root = trio.lowlevel.current_root_task()
            stack = [] if root is None else [root]
            while stack:
                task = stack.pop()
                for nursery in task.child_nurseries:
                    stack.extend(nursery.child_tasks)
                frames = [
                    f"{frame.f_code.co_name} ({os.path.basename(frame.f_code.co_filename)}:{line})"
                    for frame, line in task.iter_await_frames()
                    if frame.f_code.co_filename.startswith(_OURS)
                ]
                lines.append(f"  {task.name}: {' <- '.join(reversed(frames[-3:]))}")
        finally:
            done.set()

    try:
        token.run_sync_soon(look)
    except trio.RunFinishedError:
        return "(the run has just finished)"
    if not done.wait(seconds):
        return "(the run's loop does not answer: it is stuck outside Trio's waits)"
    return "\n".join(sorted(lines)[:40])


def tasks_living() -> int:
    """The tasks alive in the current Trio run: equal counts before and after a block
    mean it left no task behind."""
    return trio.lowlevel.current_statistics().tasks_living


def fault_settings(max_examples: int) -> settings:
    """The Hypothesis settings of a fault-injection property: ``max_examples`` examples,
    the same ones at every run (derandomized, no example database: CI sees what a
    developer sees), no deadline and no ``too_slow`` check (an example runs a kernel).
    The examples are drawn from a seed Hypothesis derives from the property's body
    (decorators and comments left out): a change to the body draws other examples."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )


def fault_settings_from(variable: str, default: int) -> settings:
    """:func:`fault_settings` of ``default`` examples, or of as many as the environment
    variable ``variable`` says: a long run (``NEXUS_MODEL_EXAMPLES=5000``) draws fresh
    examples each time, the CI run stays derandomized."""
    if variable in os.environ:
        return settings(fault_settings(int(os.environ[variable])), derandomize=False)
    return fault_settings(default)


#: The settings of a property whose examples are slow to draw (recursive JSON documents
#: with text, text from a regular expression, lists of hundreds of draws): no ``too_slow``
#: health check and no deadline, as many examples as Hypothesis's default. On a loaded
#: 2-core CI machine the drawing of the first examples passed the health check's bound
#: now and then ("input generation is slow"), and an example stalled past the 200 ms
#: deadline: failures of the machine, not of the property.
SLOW_DRAWS: Final = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


def run_on_mock_clock(
    scenario: Callable[[], Awaitable[T]],
    real_seconds: float,
    where: Callable[[], str] | None = None,
) -> T:
    """``trio.run(scenario)`` on a ``MockClock(autojump_threshold=0)``, failing with
    :class:`Hung` after ``real_seconds`` of real time, saying ``where()`` (by default the
    scenario's name) and where the run's tasks wait: :func:`run_guarded`, so that a hang
    under Hypothesis fails as itself, not as a ``FlakyFailure`` of the replay."""
    name = getattr(scenario, "__qualname__", repr(scenario))
    return run_guarded(
        scenario,
        trio.testing.MockClock(autojump_threshold=0),
        real_seconds,
        where or (lambda: f"in {name}"),
    )


def run_on_mock_clock_here(scenario: Callable[[], Awaitable[object]], real_seconds: float) -> None:
    """:func:`run_on_mock_clock` in the calling thread, under :func:`real_time_limit`: for
    a scenario that draws from Hypothesis inside the run (``data.draw``), whose build
    context is the test's thread's (in another thread a draw raises "Cannot make notes
    outside of a test"). A hang there abandons the run halfway (see :func:`run_guarded`)."""
    with real_time_limit(real_seconds):
        trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))
