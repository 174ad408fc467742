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
    AgentNotFound,
    AgentRef,
    Backoff,
    Config,
    Context,
    EventKind,
    LifecycleEvent,
    Message,
    RequestFailed,
    RequestTimeout,
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


async def fail_then_wait(kernel: Any, target: Any, at: float) -> float:
    """Make ``target`` fail, then wait until ``at`` seconds after it: the time waited."""
    failed_at = trio.current_time()
    await kernel.send(target, "boom")
    # (the failure handled, the backoff begun: then to the stop point)
    await trio.testing.wait_all_tasks_blocked()
    await trio.sleep_until(failed_at + at)
    stop_at = trio.current_time() - failed_at
    assert stop_at == pytest.approx(at)  # (the clock did not jump past it)
    return stop_at


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
                stop_at = await fail_then_wait(kernel, child, at)
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
                stop_at = await fail_then_wait(kernel, failing, at)
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


# --- the fault round: requests, intensity, monitors and stops around a restart ------------


class Eager(Failing):
    """Starts with its supervisor (an ``on_start``), not on its first message; fails after
    half a second on "slowboom"."""

    async def on_start(self, ctx: Context) -> None:
        pass

    async def handle(self, ctx: Context, msg: Message) -> Any:
        if msg.payload == "slowboom":
            await trio.sleep(0.5)
            raise RuntimeError("slowboom")
        return await super().handle(ctx, msg)


def supervisor_s(max_restarts: int, *children: Any) -> Supervisor:
    """``s``, restarting at once, within a window of a minute."""
    return Supervisor(
        name="s", max_restarts=max_restarts, within=60.0, backoff=Backoff(0, 0), children=children
    )


def test_requests_around_a_restart_fail_time_out_or_are_answered_by_the_new_run() -> None:
    """A request whose handler fails mid-way fails at once (``RequestFailed``, at 0.5 s); one
    queued behind it is answered by the restarted run as the backoff ends (1.5 s); one
    whose timeout (0.8 s) ends during the backoff times out then, and its message is
    dead-lettered ``request_timeout`` and never handled by the new run."""
    outcomes: dict[str, tuple[str, float]] = {}

    async def main() -> None:
        async with open_kernel(config()) as kernel:
            async with record_events(kernel) as recorder:
                kernel.spawn(agent(Eager, name="f"))
                await trio.testing.wait_all_tasks_blocked()

                async def ask(payload: str, timeout: float) -> None:
                    try:
                        outcomes[payload] = (
                            repr(await kernel.request("f", payload, timeout=timeout)),
                            trio.current_time(),
                        )
                    except (RequestFailed, RequestTimeout) as exc:
                        outcomes[payload] = (type(exc).__name__, trio.current_time())

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(ask, "slowboom", 5.0)
                    await trio.testing.wait_all_tasks_blocked()
                    nursery.start_soon(ask, "queued", 5.0)
                    nursery.start_soon(ask, "short", 0.8)
            stats = kernel.stats()
        assert outcomes == {
            "slowboom": ("RequestFailed", 0.5),
            "short": ("RequestTimeout", 0.8),
            "queued": ("'queued'", 1.5),
        }
        assert (stats.restarts, stats.failed, stats.handled) == (1, 1, 1)
        assert stats.dead_letters_by_reason == {"handler_error": 1, "request_timeout": 1}
        assert [(e.kind.value, e.time) for e in recorder.events if e.name == "f"][2:] == [
            ("failed", 0.5),
            ("restarted", 1.5),
            ("started", 1.5),
        ]
        assert_conserved(kernel)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_child_failing_past_its_intensity_while_its_supervisor_stops_is_not_restarted() -> None:
    """``f`` has used its one restart (``max_restarts=1``); its supervisor is stopped
    (``kernel.stop``, its younger sibling's ``on_stop`` takes 2 s) and ``f`` fails again
    meanwhile: as OTP's supervisor that is terminating, nothing is restarted, so no
    intensity is exceeded: no escalation, nothing given up on. The failure is reported,
    what is sent to ``f`` after it waits and is dead-lettered ``agent_stopped`` as ``f``
    is stopped in its turn."""

    class SlowStop(Agent):
        async def on_start(self, ctx: Context) -> None:
            pass

        async def handle(self, ctx: Context, msg: Message) -> None:
            pass

        async def on_stop(self, ctx: Context) -> None:
            await trio.sleep(2 * BACKOFF)

    async def main() -> None:
        async with open_kernel(config()) as kernel:
            async with record_events(kernel) as recorder:
                kernel.spawn(supervisor_s(1, agent(Eager, name="f"), agent(SlowStop, name="slow")))
                await trio.testing.wait_all_tasks_blocked()
                await kernel.send("f", "boom")  # its one restart
                await trio.testing.wait_all_tasks_blocked()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(kernel.stop, "s")
                    await trio.sleep(0.1)
                    await kernel.send("f", "boom")
                    await kernel.send("f", "after")
            stats = kernel.stats()
        assert (stats.restarts, stats.failed, stats.given_up) == (1, 2, 0)
        assert stats.dead_letters_by_reason == {"handler_error": 2, "agent_stopped": 1}
        assert [(e.kind.value, e.name, e.reason) for e in recorder.events][5:] == [
            ("failed", "f", "RuntimeError"),
            ("restarted", "f", "backoff 0 s"),
            ("started", "f", ""),
            ("failed", "f", "RuntimeError"),
            ("stopped", "slow", "stopped"),
            ("stopped", "f", "stopped"),
            ("stopped", "s", "stopped"),
        ]
        assert_conserved(kernel)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_monitor_of_an_agent_stopped_during_its_backoff_is_told_failed_then_stopped() -> None:
    """A watcher monitoring ``f`` (and monitoring it again during the backoff) is told
    ``failed`` as it fails, then ``stopped`` once as it is stopped during its backoff:
    nothing of a restart that never ran."""
    notices: list[tuple[float, str, str]] = []

    class Watcher(Agent):
        async def handle(self, ctx: Context, msg: Message) -> None:
            if isinstance(msg.payload, AgentRef):
                ctx.monitor(msg.payload)
            else:
                notices.append((trio.current_time(), msg.payload["event"], msg.payload["reason"]))

    async def main() -> None:
        async with open_kernel(config()) as kernel:
            watcher = kernel.spawn(agent(Watcher, name="w"))
            f = kernel.spawn(agent(Eager, name="f"))
            await kernel.send(watcher, f)
            await trio.testing.wait_all_tasks_blocked()
            await kernel.send(f, "boom")
            await trio.sleep(0.3)
            await kernel.send(watcher, f)  # during the backoff: the same monitor
            await trio.testing.wait_all_tasks_blocked()
            await kernel.stop(f)
            await trio.sleep(3 * BACKOFF)
            stats = kernel.stats()
        assert notices == [(0.0, "failed", "RuntimeError('boom')"), (0.3, "stopped", "stopped")]
        assert stats.restarts == 0
        assert_conserved(kernel)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_child_stopped_during_its_supervisor_s_restart_backoff_stays_stopped() -> None:
    """``s`` gives up (``max_restarts=0``) as ``f`` fails and the root restarts it after
    its 1 s backoff; ``g``, stopped at 0.3 s meanwhile, is stopped for good at once and
    not brought back with ``s``'s new run; ``f`` is."""

    async def main() -> None:
        async with open_kernel(config()) as kernel:
            async with record_events(kernel) as recorder:
                kernel.spawn(supervisor_s(0, agent(Eager, name="f"), agent(Eager, name="g")))
                await trio.testing.wait_all_tasks_blocked()
                await kernel.send("f", "boom")
                await trio.sleep(0.3)
                await kernel.stop("g")
                assert trio.current_time() == pytest.approx(0.3)
                await trio.sleep(3 * BACKOFF)
                assert await kernel.request("f", 1) == 1
                with pytest.raises(AgentNotFound, match=r"stopped for good by kernel\.stop"):
                    kernel.lookup("g")
            stats = kernel.stats()
        assert stats.restarts == 1
        assert [(e.kind.value, e.name, e.reason, round(e.time, 3)) for e in recorder.events][
            5:
        ] == [
            ("failed", "f", "RuntimeError", 0.0),
            ("escalated", "s", "child f", 0.0),
            ("failed", "s", "SupervisorEscalation", 0.0),
            ("stopped", "g", "stopped", 0.3),
            ("restarted", "s", "backoff 1 s", 1.0),
            ("started", "f", "", 1.0),
        ]
        assert_conserved(kernel)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_pending_restart_a_group_restart_takes_along_counts_once() -> None:
    """``rest_for_one`` of ``s`` then ``f``: ``f`` fails and waits out its 1 s backoff; ``s``
    fails at 0.5 s and its group restart takes ``f`` along. ``f``'s pending restart never
    runs: one ``restarted`` for ``f`` (the group's, at 1.5 s), two restarts in all (it was
    three, ``f`` counted twice)."""

    async def main() -> None:
        async with open_kernel(config()) as kernel:
            async with record_events(kernel) as recorder:
                kernel.spawn(
                    Supervisor(
                        strategy="rest_for_one",
                        max_restarts=100,
                        within=60.0,
                        backoff=Backoff(BACKOFF, BACKOFF, jitter=0),
                        children=[agent(Starting, name="s"), agent(Starting, name="f")],
                    )
                )
                await trio.testing.wait_all_tasks_blocked()
                await fail_then_wait(kernel, "f", 0.5)
                await kernel.send("s", "boom")
                await trio.sleep(3 * BACKOFF)
            stats = kernel.stats(agents=True)
        assert {a.name: a.restarts for a in stats.agents} == {"s": 1, "f": 1}
        assert stats.restarts == 2
        restarted = [(e.name, e.time) for e in recorder.events if e.kind is EventKind.RESTARTED]
        assert restarted == [("s", 1.5), ("f", 1.5)]
        check_counted(recorder.events, 2)
        assert_conserved(kernel)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


# --- forty-second pass: what a backoff shows, and the intensity window's count -----------


@pytest.mark.parametrize("with_start", [False, True])
def test_during_a_backoff_the_agent_reads_restarting_with_the_restarts_that_have_run(
    with_start: bool,
) -> None:
    """While ``c`` waits out its 1 s backoff, ``stats(agents=True)`` (and ``describe()``)
    show it ``restarting`` with the restarts that have run (0, then 1): the one waiting
    is the state, counted as its run begins. Then it reads 1, 2, ``running`` (with an
    ``on_start`` or without: a run after a backoff has its task)."""

    def read(kernel: Any) -> tuple[str, int, str]:
        (c,) = [a for a in kernel.stats(agents=True).agents if a.name == "c"]
        (node,) = [n for n in kernel.describe()["children"] if n.get("name") == "c"]
        return c.state, c.restarts, node["state"]

    async def main() -> None:
        async with open_kernel(config()) as kernel:
            kernel.spawn(agent(Starting if with_start else Failing, name="c"))
            await trio.testing.wait_all_tasks_blocked()
            seen = []
            for _ in range(2):
                await fail_then_wait(kernel, "c", 0.5)
                seen.append(read(kernel))
                await trio.sleep(BACKOFF)
                seen.append(read(kernel))
            assert seen == [
                ("restarting", 0, "restarting"),
                ("running", 1, "running"),
                ("restarting", 1, "restarting"),
                ("running", 2, "running"),
            ]
            assert kernel.stats().restarts == 2

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_restart_a_stop_called_off_during_its_backoff_still_counts_in_the_intensity() -> None:
    """``s`` allows one restart a minute. ``a`` fails (its restart is decided, with a 1 s
    backoff) and is stopped at 0.5 s, so its restart never runs and is not counted in
    ``restarts``; but the failure counts in ``s``'s intensity window, as OTP's
    ``add_restart`` counts a restart before it starts the child and Akka's
    ``BackoffSupervisor`` counts ``maxNrOfRetries`` as it schedules the backoff: ``b``
    failing at 0.7 s is the second restart within the minute, and ``s`` escalates."""

    async def main() -> None:
        async with open_kernel(config()) as kernel:
            async with record_events(kernel) as recorder:
                kernel.spawn(
                    Supervisor(
                        name="s",
                        max_restarts=1,
                        within=60.0,
                        backoff=Backoff(BACKOFF, BACKOFF, jitter=0),
                        children=[agent(Eager, name="a"), agent(Eager, name="b")],
                    )
                )
                await trio.testing.wait_all_tasks_blocked()
                await fail_then_wait(kernel, "a", 0.5)
                await kernel.stop("a")
                await trio.sleep(0.2)
                await kernel.send("b", "boom")
                await trio.testing.wait_all_tasks_blocked()
            stats = kernel.stats()
        assert [
            (e.kind.value, e.name, e.reason, round(e.time, 3))
            for e in recorder.events
            if e.kind.value in ("failed", "stopped", "escalated", "restarted")
        ][:5] == [
            ("failed", "a", "RuntimeError", 0.0),
            ("stopped", "a", "stopped", 0.5),
            ("failed", "b", "RuntimeError", 0.7),
            ("escalated", "s", "child b", 0.7),
            ("failed", "s", "SupervisorEscalation", 0.7),
        ]
        assert stats.restarts == 0
        assert_conserved(kernel)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
