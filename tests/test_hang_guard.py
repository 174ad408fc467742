"""The real-time guard of the mock-clock properties (tests/hang_guard.py)."""

from __future__ import annotations

import gc
import time

import pytest
import trio
import trio.testing

from tests.hang_guard import Hung, real_time_limit, run_on_mock_clock


# The alarm may land in another gc callback (hypothesis keeps one), which the interpreter
# reports as an unraisable exception: that is the swallowed alarm this test is about.
@pytest.mark.filterwarnings("default::pytest.PytestUnraisableExceptionWarning")
def test_a_hang_whose_first_alarm_is_swallowed_still_fails() -> None:
    # An exception a signal handler raises while a gc callback runs is only reported as
    # unraisable by the interpreter: here the callback takes the first alarm itself.
    swallowed: list[Hung] = []

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            try:
                time.sleep(0.5)  # the first alarm lands here
            except Hung as exc:
                swallowed.append(exc)

    collected = 0.0

    def hang() -> None:
        nonlocal collected
        with real_time_limit(0.1):
            # The youngest generation only: a full collection of a long-lived xdist
            # worker's heap ran for seconds on a loaded machine, and the alarms that came
            # meanwhile landed in other gc callbacks (unraisable), once in pytest's own
            # report of such an unraisable ("Failed to process unraisable exception", base
            # suite run at load 20-54). The callbacks run for a young collection too.
            gc.collect(0)
            # (5 s from the end of the collection, not from the start: on a loaded machine
            # a collection of a long-lived worker's heap ran for seconds, the alarms that
            # came meanwhile made one call of the handler, which the collection's "stop"
            # callback took, and the hang had ended before the next: DID NOT RAISE)
            collected = time.monotonic()
            while time.monotonic() < collected + 5:
                time.sleep(0.01)

    gc.callbacks.append(callback)
    try:
        with pytest.raises(Hung):
            hang()
        ran_for = time.monotonic() - collected
    finally:
        gc.callbacks.remove(callback)
    assert len(swallowed) == 1
    assert ran_for < 5  # a later alarm ended it, not the end of the hang


def test_a_hang_under_run_on_mock_clock_fails_naming_where_it_waits_and_leaves_no_run_behind() -> (
    None
):
    # Before the forty-ninth pass run_on_mock_clock raised Hung from SIGALRM inside the
    # run's loop: the report did not say where the tasks waited, and the loop was left
    # halfway, so the thread's next trio.run (Hypothesis's replay) said "Attempted to call
    # run() from inside a run()". It runs in a thread of its own now (run_guarded).
    async def stuck_in_a_shielded_wait() -> None:
        with trio.CancelScope(shield=True):
            await trio.sleep_forever()

    async def scenario() -> None:
        with trio.fail_after(60):  # (a mock deadline cannot end a shielded wait)
            await stuck_in_a_shielded_wait()

    with pytest.raises(Hung) as info:
        run_on_mock_clock(scenario, 0.5)
    assert "the kernel hangs in " in str(info.value)
    assert "stuck_in_a_shielded_wait (test_hang_guard.py:" in str(info.value)

    async def next_run() -> str:
        await trio.sleep(1)
        return "ran"

    assert trio.run(next_run, clock=trio.testing.MockClock(autojump_threshold=0)) == "ran"
