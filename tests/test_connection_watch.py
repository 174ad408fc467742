"""``ConnectionWatch``'s waits always checkpoint, as Trio's own waits do (forty-fifth
pass, issue 14).

``wait_up`` on a connection that is up (``wait_down`` on one that is down) returned at
once without a checkpoint: a loop over it could not be cancelled and starved every
other task (a readiness test hung CI 10 minutes that way, forty-fourth pass). Trio's own
tests check a checkpoint with ``trio.testing.assert_checkpoints``; so do these, and that
a loop over the wait ends at its cancel scope's deadline. (Each fails on f4c2c8f's
``_watch.py``, swapped in: ``assert_checkpoints`` raises "assert_checkpoints block did
not yield!", and the loop never lets the task that cancels it run: cut by ``hang_guard``'s real-time bound.)
"""

from __future__ import annotations

import math

import pytest
import trio
import trio.testing

from nexus_trio._nats._watch import ConnectionWatch

from .hang_guard import run_on_mock_clock


def _watch(down: bool) -> ConnectionWatch:
    watch = ConnectionWatch()
    if down:
        watch.mark("data", 0.0)
    return watch


@pytest.mark.parametrize(("wait", "down"), [("wait_up", False), ("wait_down", True)])
async def test_a_wait_already_answered_is_a_checkpoint(wait: str, down: bool) -> None:
    watch = _watch(down)
    with trio.testing.assert_checkpoints():
        await getattr(watch, wait)("data")
    # (a cancelled scope is honoured: the wait raises Cancelled, caught by its scope)
    with trio.CancelScope() as scope:
        scope.cancel()
        await getattr(watch, wait)("data")
    assert scope.cancelled_caught


@pytest.mark.parametrize(("wait", "down"), [("wait_up", False), ("wait_down", True)])
def test_a_loop_over_a_wait_already_answered_lets_another_task_cancel_it(
    wait: str, down: bool
) -> None:
    """As trio's tests check a checkpoint: a loop of the wait lets another task run,
    which cancels it, and the loop ends there."""
    laps: list[int] = []

    async def scenario() -> None:
        watch = _watch(down)
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_cancel, scope)
                while True:
                    await getattr(watch, wait)("data")
                    laps.append(1)
        assert scope.cancelled_caught

    run_on_mock_clock(scenario, real_seconds=10)
    assert laps  # (the wait returned, then the cancel came)


async def _cancel(scope: trio.CancelScope) -> None:
    await trio.lowlevel.checkpoint()
    scope.cancel()


async def test_a_wait_not_answered_yet_returns_at_the_change(
    autojump_clock: trio.testing.MockClock,
) -> None:
    watch = ConnectionWatch()
    woken: list[str] = []

    async def up() -> None:
        await watch.wait_up("data")
        woken.append("up")

    async with trio.open_nursery() as nursery:
        watch.mark("data", 1.0)
        nursery.start_soon(up)
        await trio.testing.wait_all_tasks_blocked()
        assert woken == []
        watch.mark("data", None)
    assert woken == ["up"]
    watch.mark("data", -math.inf)
    with trio.move_on_after(1) as scope:
        await watch.wait_up("data")  # (closed: never)
    assert scope.cancelled_caught
