"""A restart is counted and published when its run begins (forty-first pass).

A child stopped while it waits out its restart backoff (``kernel.stop``, its linked parent
exiting or stopped), or its elder sibling's ``on_start`` in a group restart, never runs
again: it gets no ``restarted`` event and counts in no ``restarts`` (Akka's
``BackoffSupervisor`` starts no child whose backoff a stop cut short). Until this pass
both came as the restart was decided. Each test stops the child at a random point of the
backoff, or after it, and checks the events and counters exactly: every ``restarted``
event is one restart in ``stats().restarts`` and in the event's own count.
Everything runs on a ``MockClock(autojump_threshold=0)``.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from nexus_trio import (
    Agent,
    AgentRef,
    Backoff,
    Config,
    Context,
    EventKind,
    LifecycleEvent,
    Message,
    SupervisionConfig,
    Supervisor,
    agent,
    open_kernel,
)
from nexus_trio.testing import assert_conserved, record_events

BACKOFF = 1.0
#: stop points: inside the backoff (not at its very end, where the two timers tie) or after
inside = st.floats(min_value=0.0, max_value=BACKOFF - 0.01)
after = st.floats(min_value=BACKOFF + 0.01, max_value=3 * BACKOFF)


def config() -> Config:
    ms = int(BACKOFF * 1000)
    return Config(
        supervision=SupervisionConfig(
            max_restarts=100,
            within_ms=60_000,
            backoff_initial_ms=ms,
            backoff_max_ms=ms,
            backoff_jitter=0,
        )
    )


def kinds(events: list[LifecycleEvent], agent_id: Any) -> list[tuple[str, str]]:
    return [(e.kind.value, e.reason) for e in events if e.agent_id == agent_id]


def check_counted(events: list[LifecycleEvent], restarts: int) -> None:
    """Every ``restarted`` event is one restart counted, and each carries its agent's
    count so far (1, 2, ... per agent)."""
    restarted = [e for e in events if e.kind is EventKind.RESTARTED]
    assert len(restarted) == restarts
    seen: dict[Any, int] = {}
    for event in restarted:
        seen[event.agent_id] = seen.get(event.agent_id, 0) + 1
        assert event.restarts == seen[event.agent_id]


class Failing(Agent):
    async def handle(self, ctx: Context, msg: Message) -> Any:
        if msg.payload == "boom":
            raise RuntimeError("boom")
        return msg.payload


class Starting(Failing):
    """With an ``on_start``: its restart's run opens a gate (the other path)."""

    async def on_start(self, ctx: Context) -> None:
        await trio.lowlevel.checkpoint()


def parent_spec(with_start: bool, seen: list[AgentRef]) -> Any:
    class Parent(Agent):
        async def on_start(self, ctx: Context) -> None:
            seen.append(ctx.spawn(agent(Starting if with_start else Failing, name="c")))

        async def handle(self, ctx: Context, msg: Message) -> Any:
            if msg.payload == "die":
                raise RuntimeError("die")

    return agent(Parent, name="p")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    at=inside | after,
    way=st.sampled_from(["parent_exited", "parent_stopped", "stopped"]),
    with_start=st.booleans(),
)
@example(at=0.0, way="parent_exited", with_start=False)
@example(at=0.5, way="parent_exited", with_start=True)
@example(at=0.5, way="stopped", with_start=False)
@example(at=1.5, way="parent_stopped", with_start=True)
def test_a_linked_child_stopped_during_its_backoff_is_not_restarted(
    at: float, way: str, with_start: bool
) -> None:
    """Its events after the failure are ``failed`` then ``stopped`` (the stop's reason):
    no ``restarted``, no restart counted. Stopped after the backoff, it was restarted:
    ``restarted`` (1), ``started``, then ``stopped``."""

    async def main() -> None:
        seen: list[AgentRef] = []
        async with open_kernel(config()) as kernel:
            async with record_events(kernel) as recorder:
                kernel.spawn(parent_spec(with_start, seen))
                await trio.testing.wait_all_tasks_blocked()
                child = seen[0]
                failed_at = trio.current_time()
                await kernel.send(child, "boom")
                # (the failure handled, the backoff begun: then to the stop point)
                await trio.testing.wait_all_tasks_blocked()
                await trio.sleep_until(failed_at + at)
                stop_at = trio.current_time() - failed_at
                assert stop_at == pytest.approx(at)  # (the clock did not jump past it)
                if way == "parent_exited":
                    await kernel.send("p", "die")
                elif way == "parent_stopped":
                    await kernel.stop("p")
                else:
                    await kernel.stop(child)
                await trio.sleep(5 * BACKOFF)
            restarts = kernel.stats().restarts
        events = recorder.events
        restarted = stop_at > BACKOFF
        expected = [("spawned", ""), ("started", ""), ("failed", "RuntimeError")]
        if restarted:
            expected += [("restarted", "backoff 1 s"), ("started", "")]
        expected.append(("stopped", way))
        assert kinds(events, child.id) == expected
        # the parent's own restart, after it failed
        assert restarts == int(restarted) + int(way == "parent_exited")
        check_counted(events, restarts)
        assert_conserved(kernel)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


class Slow(Failing):
    """Its ``on_start`` takes ``BACKOFF`` seconds: a younger sibling's restart waits."""

    async def on_start(self, ctx: Context) -> None:
        await trio.sleep(BACKOFF)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    at=inside | after,
    failing=st.sampled_from(["a", "b"]),
    stopped=st.sampled_from(["a", "b"]),
    waits_for_elder=st.booleans(),
)
@example(at=0.5, failing="a", stopped="b", waits_for_elder=False)
@example(at=0.5, failing="b", stopped="b", waits_for_elder=True)
def test_a_group_member_stopped_before_its_restart_runs_is_not_restarted(
    at: float, failing: str, stopped: str, waits_for_elder: bool
) -> None:
    """``one_for_all`` of ``a`` then ``b``: one fails, both wait out the backoff (or, with
    no backoff, ``b`` waits for ``a``'s slow ``on_start``); one is stopped meanwhile. It
    gets no ``restarted`` and is not counted; the other is restarted and counted once."""

    async def main() -> None:
        backoff = Backoff(0, 0) if waits_for_elder else Backoff(BACKOFF, BACKOFF, jitter=0)
        async with open_kernel(config()) as kernel:
            async with record_events(kernel) as recorder:
                kernel.spawn(
                    Supervisor(
                        strategy="one_for_all",
                        children=[
                            agent(Slow if waits_for_elder else Starting, name="a"),
                            agent(Starting, name="b"),
                        ],
                        max_restarts=100,
                        within=60.0,
                        backoff=backoff,
                        name="s",
                    )
                )
                await trio.testing.wait_all_tasks_blocked()
                await trio.sleep(5 * BACKOFF)
                ids = {name: kernel.lookup(name).id for name in ("a", "b")}
                failed_at = trio.current_time()
                await kernel.send(failing, "boom")
                await trio.testing.wait_all_tasks_blocked()
                await trio.sleep_until(failed_at + at)
                stop_at = trio.current_time() - failed_at
                assert stop_at == pytest.approx(at)  # (the clock did not jump past it)
                await kernel.stop(stopped)
                await trio.sleep(5 * BACKOFF)
            restarts = kernel.stats().restarts
        events = recorder.events
        other = "b" if stopped == "a" else "a"
        # With no backoff, only b waits (for a's on_start): a's restart runs at once.
        cut = stop_at < BACKOFF and (not waits_for_elder or stopped == "b")
        mine = [k for k, _ in kinds(events, ids[stopped])[2:]]
        assert mine.count("restarted") == (0 if cut else 1)
        assert mine[-1] == "stopped"
        assert [k for k, _ in kinds(events, ids[other])[2:]].count("restarted") == 1
        assert restarts == (1 if cut else 2)
        check_counted(events, restarts)
        assert_conserved(kernel)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
