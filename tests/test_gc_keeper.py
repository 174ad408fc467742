"""The heap keeper: when the kernel freezes and unfreezes the cycle collector's heap."""

from __future__ import annotations

import contextlib
import gc
import logging
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from nexus_trio import (
    Agent,
    AgentNotFound,
    Backoff,
    Config,
    Context,
    Kernel,
    KernelConfig,
    KernelShuttingDown,
    Message,
    SupervisionConfig,
    Supervisor,
    agent,
    open_kernel,
)
from nexus_trio._gc import YOUNG, HeapKeeper
from nexus_trio.testing import assert_conserved

from .hang_guard import fault_settings, run_on_mock_clock

# CPython 3.12's collector moves the immortal objects it meets into the permanent
# generation, which gc.get_freeze_count() counts (375 on 3.12.1, after any collection since
# the last unfreeze); 3.11 and 3.13 do not (0 here). Measured once, before any test froze.
gc.unfreeze()
gc.collect()
IMMORTALS = gc.get_freeze_count()
gc.unfreeze()


def frozen_objects() -> int:
    """gc.get_freeze_count() without 3.12's immortals (the same number on 3.11 and 3.13)."""
    count = gc.get_freeze_count()
    return 0 if count == IMMORTALS else count


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    thresholds = gc.get_threshold()
    yield
    YOUNG.unwatch()
    gc.unfreeze()
    gc.set_threshold(*thresholds)


def watching() -> bool:
    return any(getattr(callback, "__self__", None) is YOUNG for callback in gc.callbacks)


def test_a_freeze_raises_the_young_threshold_until_the_keeper_closes(unfrozen: None) -> None:
    gc.set_threshold(100, 7, 9)
    keeper = HeapKeeper(True, batch=4)
    for _ in range(3):
        keeper.created()
    assert gc.get_threshold() == (100, 7, 9)
    keeper.created()
    assert keeper.freezes == 1
    # above what a batch allocates: the next freeze comes before a young collection
    assert gc.get_threshold() == (4 * 64, 7, 9)
    assert watching()
    keeper.close()
    assert gc.get_threshold() == (100, 7, 9)
    assert not watching()


def test_a_collection_that_starts_anyway_puts_the_threshold_back(unfrozen: None) -> None:
    gc.set_threshold(100, 7, 9)
    keeper = HeapKeeper(True, batch=4)
    for _ in range(4):
        keeper.created()
    assert gc.get_threshold()[0] == 256
    gc.collect(0)  # a burst is over (or someone collects): the usual threshold again
    assert gc.get_threshold() == (100, 7, 9)
    for _ in range(4):
        keeper.created()  # the next burst raises it again
    assert gc.get_threshold()[0] == 256
    for _ in range(8):
        keeper.run_ended()  # a thaw gives the collector everything back, thresholds too
    assert keeper.thaws == 1
    assert gc.get_threshold() == (100, 7, 9)
    keeper.close()
    assert gc.get_threshold() == (100, 7, 9)


@pytest.mark.parametrize("thresholds", [(0, 10, 10), (1_000_000, 10, 10)])
def test_young_collections_the_application_turned_off_or_made_rare_are_left_so(
    unfrozen: None, thresholds: tuple[int, int, int]
) -> None:
    gc.set_threshold(*thresholds)
    keeper = HeapKeeper(True, batch=1)
    keeper.created()
    assert keeper.freezes == 1
    assert gc.get_threshold() == thresholds
    keeper.close()
    assert gc.get_threshold() == thresholds


def test_a_disabled_keeper_leaves_the_thresholds_alone(unfrozen: None) -> None:
    gc.set_threshold(500, 7, 9)
    keeper = HeapKeeper(False, batch=1)
    keeper.created()
    keeper.backlog(10)
    keeper.close()
    assert gc.get_threshold() == (500, 7, 9)
    assert not watching()


def test_freezes_after_each_batch_and_thaws_when_half_the_frozen_stopped(unfrozen: None) -> None:
    keeper = HeapKeeper(True, batch=4)
    for _ in range(3):
        keeper.created()
    assert keeper.freezes == 0 and frozen_objects() == 0
    marker = [object()]  # a tracked object made before the freeze
    keeper.created()
    assert keeper.freezes == 1 and frozen_objects() > 0
    assert not any(o is marker for o in gc.get_objects())
    for _ in range(4):
        keeper.created()
    assert keeper.freezes == 2
    # 8 frozen: 3 ended runs are not enough (batch 4), the 4th is (4 * 2 >= 8).
    for _ in range(3):
        keeper.run_ended()
    assert keeper.thaws == 0
    keeper.run_ended()
    assert keeper.thaws == 1 and frozen_objects() == 0
    assert any(o is marker for o in gc.get_objects())


def test_a_run_that_ends_undoes_its_creations_so_restarts_never_freeze(unfrozen: None) -> None:
    """Regression: every restart counted as growth (a freeze each ``batch`` restarts)."""
    keeper = HeapKeeper(True, batch=4)
    keeper.created()  # the spawn
    for _ in range(100):
        keeper.created()  # a run starts ...
        keeper.run_ended()  # ... and ends: restarted
    assert keeper.freezes == 0 and frozen_objects() == 0
    for _ in range(100):
        keeper.created()  # a dormant agent woken: its task ...
        keeper.created()  # ... and its run
        keeper.run_ended(2)
    assert keeper.freezes == 0 and frozen_objects() == 0
    # Growth still freezes: 1 + 3 spawns.
    for _ in range(3):
        keeper.created()
    assert keeper.freezes == 1
    # A crash loop after the freeze is no growth either, and its ended runs count
    # towards the thaw (4 ended, batch 4, 4 * 2 >= 4 frozen), as stops do.
    for _ in range(3):
        keeper.run_ended()
        keeper.created()
    assert keeper.freezes == 1 and keeper.thaws == 0
    keeper.run_ended()
    keeper.created()
    assert keeper.thaws == 1 and frozen_objects() == 0
    for _ in range(100):
        keeper.run_ended()
        keeper.created()
    assert keeper.freezes == 1 and keeper.thaws == 1 and frozen_objects() == 0


def test_disabled_keeper_never_freezes(unfrozen: None) -> None:
    keeper = HeapKeeper(False, batch=1)
    for _ in range(10):
        keeper.created()
        keeper.run_ended()
    keeper.close()
    assert keeper.freezes == 0 and frozen_objects() == 0


@agent
async def noop(ctx: Context, msg: Message) -> None:
    return None


@pytest.mark.parametrize("enabled", [True, False])
async def test_a_kernel_freezes_under_many_agents_and_unfreezes_when_it_closes(
    unfrozen: None, enabled: bool
) -> None:
    frozen_while_running = 0
    async with open_kernel(Config(kernel=KernelConfig(gc_freeze=enabled))) as kernel:
        refs = [kernel.spawn(noop) for _ in range(3000)]
        for ref in refs:
            kernel.send_nowait(ref, 1)
        await trio.testing.wait_all_tasks_blocked()
        assert kernel.stats().handled == 3000
        frozen_while_running = frozen_objects()
    # 3,000 spawns + 3,000 activations + 3,000 starts: 4 batches of 2,048.
    assert (frozen_while_running > 0) is enabled
    assert frozen_objects() == 0
    assert kernel.stats().handled == 3000 and kernel.stats().dead_lettered == 0


class _Node:
    """A weak-referenceable object to put in a reference cycle."""

    def __init__(self) -> None:
        self.me = self


def test_a_growing_backlog_freezes_and_a_drained_one_thaws_after_enough_freezes(
    unfrozen: None,
) -> None:
    keeper = HeapKeeper(True, batch=4)
    keeper.backlog(3)
    assert keeper.freezes == 0 and frozen_objects() == 0
    # Cyclic garbage that exists at a freeze is held back by it (only that is at stake).
    node = _Node()
    ref = weakref.ref(node)
    del node
    keeper.backlog(4)
    assert keeper.freezes == 1 and frozen_objects() > 0
    gc.collect()
    assert ref() is not None
    # Growth is measured from the last freeze: 4 + 3 is not enough, 4 + 4 is.
    keeper.backlog(7)
    assert keeper.freezes == 1
    keeper.backlog(8)
    assert keeper.freezes == 2
    # Drained to below half before 16 backlog freezes: growth restarts from there, no thaw.
    keeper.backlog(3)
    assert keeper.thaws == 0 and frozen_objects() > 0
    keeper.backlog(6)
    assert keeper.freezes == 2  # 3 + 4 is the next mark
    for queued in range(7, 7 + 4 * 14, 4):
        keeper.backlog(queued)
    assert keeper.freezes == 16 and keeper.thaws == 0
    # Half of the last mark is not below it; one less is: the heap goes back.
    mark = 7 + 4 * 13
    keeper.backlog(mark // 2 + 1)
    assert keeper.thaws == 0
    keeper.backlog(mark // 2 - 1)
    assert keeper.thaws == 1 and frozen_objects() == 0
    gc.collect()
    assert ref() is None


def test_a_disabled_keeper_ignores_the_backlog(unfrozen: None) -> None:
    keeper = HeapKeeper(False, batch=1)
    for queued in range(100):
        keeper.backlog(queued)
    assert keeper.freezes == 0 and frozen_objects() == 0


@pytest.mark.parametrize("enabled", [True, False])
async def test_a_fan_out_burst_freezes_the_queued_messages(unfrozen: None, enabled: bool) -> None:
    # Four agents (far from a batch of spawns): only the backlog can freeze.
    config = Config(kernel=KernelConfig(gc_freeze=enabled, mailbox_capacity=4096))
    async with open_kernel(config) as kernel:
        refs = [kernel.spawn(noop) for _ in range(4)]
        for i in range(4 * 4096):
            await kernel.send(refs[i % 4], i)  # never yields with room: all queued
        frozen_in_burst = await _frozen_then_handled(kernel, 4 * 4096, 4 * 4096)
    assert (frozen_in_burst > 0) is enabled
    assert frozen_objects() == 0


async def _frozen_then_handled(kernel: Kernel, queued: int, handled: int) -> int:
    """The heap's freeze count while ``queued`` messages wait; then each is handled, and
    the kernel has handled ``handled`` in all."""
    frozen = frozen_objects()
    assert kernel.stats().in_flight == queued
    await trio.testing.wait_all_tasks_blocked()
    stats = kernel.stats()
    assert stats.handled == handled and stats.in_flight == 0 and stats.dead_lettered == 0
    return frozen


class _Nowhere:
    """A transport that carries nothing: the test hands the kernel its remote tells."""

    async def deliver(self, msg: Message) -> None:
        raise AssertionError("nothing is sent")

    def deliver_nowait(self, msg: Message) -> None:
        raise AssertionError("nothing is sent")

    def cancel_query(self, query_id: object, to: object) -> None:
        pass

    def query_failed(self, query_id: object, error: BaseException) -> None:
        pass


@pytest.mark.parametrize("enabled", [True, False])
async def test_a_burst_of_remote_tells_freezes_the_queued_messages(
    unfrozen: None, enabled: bool
) -> None:
    """Tells from another kernel queue up like a local burst's (a node batch's runs,
    ``TransportHandle.deliver_run_nowait``): the keeper is told the backlog and freezes
    it, as for local sends (it was never told of remote ones: no freeze)."""
    config = Config(kernel=KernelConfig(gc_freeze=enabled, mailbox_capacity=4096))
    async with open_kernel(config) as kernel:
        handle = kernel.attach_transport(_Nowhere())
        refs = [kernel.spawn(noop) for _ in range(4)]
        for ref in refs:  # each mailbox's first message opens it (the single way)
            assert handle.deliver_nowait(Message(ref.id, ref.id, -1))
        await trio.testing.wait_all_tasks_blocked()
        for ref in refs:
            for first in range(0, 4000, 250):  # batches of 250 tells
                batch = [Message(ref.id, ref.id, i) for i in range(first, first + 250)]
                assert handle.deliver_run_nowait(batch, 0) == 250
        frozen_in_burst = await _frozen_then_handled(kernel, 4 * 4000, 4 * 4001)
    assert (frozen_in_burst > 0) is enabled
    assert frozen_objects() == 0


@pytest.mark.parametrize("enabled", [True, False])
async def test_starting_a_burst_of_agents_runs_no_young_collection(
    unfrozen: None, enabled: bool
) -> None:
    """Between two freezes a batch of starts allocates less than the raised threshold, so
    no young collection walks objects the next freeze takes anyway; without the keeper,
    hundreds do."""
    young: list[int] = []

    def count(phase: str, info: dict[str, int]) -> None:
        if phase == "start" and info["generation"] == 0:
            young.append(1)

    config = Config(kernel=KernelConfig(gc_freeze=enabled))
    before = gc.get_threshold()
    async with open_kernel(config) as kernel:
        refs = [kernel.spawn(noop) for _ in range(3 * 2048)]
        await trio.testing.wait_all_tasks_blocked()
        gc.callbacks.append(count)
        try:
            for ref in refs:
                kernel.send_nowait(ref, None)
            await trio.testing.wait_all_tasks_blocked()
        finally:
            gc.callbacks.remove(count)
        assert kernel.stats().handled == 3 * 2048
    if enabled:
        assert len(young) <= 2
    else:
        assert len(young) > 100
    assert gc.get_threshold() == before
    assert not watching()


async def test_a_shutdown_that_fails_half_way_still_gives_the_heap_back(
    unfrozen: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nexus_trio._ledger import Ledger

    def broken(self: Ledger) -> None:
        raise RuntimeError("log disk full")

    # The last step of the shutdown before the heap is given back raises.
    monkeypatch.setattr(Ledger, "finish_streams", broken)
    frozen_in_burst = []

    async def burst() -> None:
        async with open_kernel(Config(kernel=KernelConfig(mailbox_capacity=4096))) as kernel:
            refs = [kernel.spawn(noop) for _ in range(4)]
            for i in range(3 * 2048):
                await kernel.send(refs[i % 4], i)
            frozen_in_burst.append(frozen_objects())

    with pytest.raises(ExceptionGroup) as info:
        await burst()
    assert info.group_contains(RuntimeError, match="log disk full")
    assert frozen_in_burst[0] > 0
    assert frozen_objects() == 0


class _FailsOnStart(Agent):
    """Fails on every message, with an ``on_start`` (so each restart starts a run at once)."""

    async def on_start(self, ctx: Context) -> None:
        return None

    async def handle(self, ctx: Context, msg: Message) -> None:
        raise RuntimeError("boom")


@agent(on_error="restart")
async def fails(ctx: Context, msg: Message) -> None:
    """Fails on every message, without ``on_start`` (restarted dormant, woken by the next)."""
    raise RuntimeError("boom")


@pytest.mark.parametrize("behaviour", ["on_start", "dormant"])
async def test_restarts_do_not_freeze_the_heap(
    unfrozen: None,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
    behaviour: str,
) -> None:
    """Regression: each restart of a crashing agent counted as a long-lived creation, so
    2,048 restarts froze the heap and raised the young threshold to 131,072, and the
    dead runs' cycles (a process agent's run: its Process, pipes, events, tasks) piled up
    until that many objects were allocated: a process agent's kernel grew from 33 to 52
    MB of RSS over 4,000 restarts, and kept the high water. A run that ends undoes the
    creations it made: restarts are no growth, and freeze nothing."""
    caplog.set_level(logging.CRITICAL, logger="nexus_trio")  # a failure logged per restart
    restarts = 3 * 2048
    config = Config(
        supervision=SupervisionConfig(
            max_restarts=restarts + 1, backoff_initial_ms=0, backoff_max_ms=0
        )
    )
    before = gc.get_threshold()
    target = (
        agent(_FailsOnStart, name="f", on_error="restart") if behaviour == "on_start" else fails
    )
    async with open_kernel(config) as kernel:
        ref = kernel.spawn(target)
        for i in range(restarts):
            await kernel.send(ref, i)
            await trio.testing.wait_all_tasks_blocked()
        stats = kernel.stats()
        assert stats.restarts == restarts and stats.failed == restarts
        assert frozen_objects() == 0
        assert gc.get_threshold() == before
    assert frozen_objects() == 0 and gc.get_threshold() == before


@agent
async def once(ctx: Context, msg: Message) -> None:
    return None


@pytest.mark.parametrize("woken", [True, False], ids=["handled-one", "idle"])
async def test_agents_spawned_and_stopped_over_and_over_do_not_freeze_the_heap(
    unfrozen: None, autojump_clock: trio.testing.MockClock, woken: bool
) -> None:
    """Regression: the spawn of an agent stopped for good stayed counted as growth, so a
    kernel that spawns and stops short-lived agents (one per job) froze the heap each
    2,048 of them and kept the young threshold raised, with the stopped agents' cycles
    piling up as a crash loop's did. An agent stopped for good undoes its spawn's count:
    a kernel that spawns as many as it stops freezes nothing; growth still freezes."""
    before = gc.get_threshold()
    async with open_kernel() as kernel:
        for i in range(3 * 2048):
            ref = kernel.spawn(once)
            if woken:
                await kernel.send(ref, i)
                await trio.testing.wait_all_tasks_blocked()
            await kernel.stop(ref)
        stats = kernel.stats()
        assert stats.agents_alive == 0
        assert stats.handled == (3 * 2048 if woken else 0)
        assert frozen_objects() == 0
        assert gc.get_threshold() == before
        # Growth still freezes: agents that stay.
        refs = [kernel.spawn(once) for _ in range(2048)]
        assert frozen_objects() > 0
        assert len(refs) == 2048
    assert frozen_objects() == 0 and gc.get_threshold() == before


async def test_agents_woken_and_stopped_at_once_do_not_freeze_the_heap(
    unfrozen: None, autojump_clock: trio.testing.MockClock
) -> None:
    """Regression: a dormant agent's first message counts its run's task as a long-lived
    creation (activate); a stop handled before that run began (the same scheduling round)
    called the run off and never took the count back, so a kernel that wakes agents and
    stops them at once (a job per agent, cancelled) drifted by one per called-off run and
    froze the heap for nothing (half of 3 x 2,048 here, by Trio's order of the round: over
    one batch). The called-off run undoes its task's count as a run that ran does."""
    before = gc.get_threshold()
    async with open_kernel() as kernel:
        for i in range(3 * 2048):
            ref = kernel.spawn(once)
            await kernel.send(ref, i)  # wakes it: its run's task is scheduled
            await kernel.stop(ref)  # in the same round: its run may not have begun
        stats = kernel.stats()
        assert stats.agents_alive == 0 and stats.in_flight == 0
        # some runs were called off (their message dead-lettered), some began
        assert 0 < stats.dead_lettered < 3 * 2048
        assert stats.handled + stats.dead_lettered == stats.accepted == 3 * 2048
        assert frozen_objects() == 0
        assert gc.get_threshold() == before
    assert frozen_objects() == 0 and gc.get_threshold() == before


@contextlib.contextmanager
def heap_counts() -> Iterator[list[int]]:
    """The heap keepers' creations counted, less those taken back (unclamped, unlike the
    keeper's own count since its last freeze): 0 when every creation was undone."""
    net = [0]
    created, run_ended, removed = HeapKeeper.created, HeapKeeper.run_ended, HeapKeeper.removed

    def counting_created(self: HeapKeeper) -> None:
        net[0] += 1
        created(self)

    def counting_run_ended(self: HeapKeeper, made: int = 1) -> None:
        net[0] -= made
        run_ended(self, made)

    def counting_removed(self: HeapKeeper) -> None:
        net[0] -= 1
        removed(self)

    HeapKeeper.created = counting_created  # type: ignore[method-assign]
    HeapKeeper.run_ended = counting_run_ended  # type: ignore[method-assign]
    HeapKeeper.removed = counting_removed  # type: ignore[method-assign]
    try:
        yield net
    finally:
        HeapKeeper.created = created  # type: ignore[method-assign]
        HeapKeeper.run_ended = run_ended  # type: ignore[method-assign]
        HeapKeeper.removed = removed  # type: ignore[method-assign]


@agent(on_error="restart")
async def wakes(ctx: Context, msg: Message) -> None:
    """Fails on "boom" (restarted dormant, woken by its next message)."""
    if msg.payload == "boom":
        raise RuntimeError("boom")


#: one step of a wake/stop interleaving
_STEPS = st.one_of(
    st.tuples(st.just("spawn"), st.integers(0, 3)),  # at the root, or under a supervisor
    st.tuples(st.just("supervisor"), st.integers(0, 1)),  # max_restarts 0 or 1
    st.tuples(
        st.sampled_from(
            ["send", "boom", "wake_stop", "stop", "stop_later", "stop_sup", "stop_sup_later"]
        ),
        st.integers(0, 7),  # which: the latest spawned first
    ),
    # agents spawned, woken and stopped at once, one after another (at the root, or under
    # the latest supervisor)
    st.tuples(st.sampled_from(["churn", "churn_sup"]), st.integers(1, 8)),
    st.tuples(st.sampled_from(["settle", "round", "sleep"]), st.just(0)),
)


@given(steps=st.lists(_STEPS, max_size=40), shutdown_woken=st.booleans())
@fault_settings(120)
def test_the_heap_keeper_s_count_is_conserved_over_wakes_and_stops(
    steps: list[tuple[str, int]], shutdown_woken: bool
) -> None:
    """Every creation the heap keeper counts (a spawn, a dormant agent's wake, a run's
    start) is taken back when it is garbage (the agent stopped for good, the run ended or
    called off), whatever the interleaving of first messages, failures, restarts,
    ``kernel.stop`` of agents and of their supervisors (which may give up), and rounds:
    once every agent is stopped the count is back to 0. No other count drifts: nothing
    alive, nothing in flight, every message sent handled, dead-lettered or rejected."""

    async def scenario() -> None:
        with heap_counts() as net:
            async with open_kernel() as kernel, trio.open_nursery() as stops:
                agents: list[Any] = []
                sups: list[Any] = []
                sent = 0

                async def stop(ref: Any) -> None:
                    with contextlib.suppress(AgentNotFound):
                        await kernel.stop(ref)

                for kind, n in steps:
                    if kind == "spawn":
                        under = sups[n - 1] if 0 < n <= len(sups) else None
                        with contextlib.suppress(AgentNotFound):
                            agents.append(kernel.spawn(wakes, supervisor=under))
                    elif kind == "supervisor":
                        sups.append(kernel.spawn(Supervisor(max_restarts=n, backoff=Backoff(0, 0))))
                    elif kind in ("send", "boom", "wake_stop") and agents:
                        ref = agents[-1 - n % len(agents)]
                        sent += 1
                        with contextlib.suppress(AgentNotFound, KernelShuttingDown):
                            await kernel.send(ref, kind)
                        if kind == "wake_stop":
                            # stopped in the round its message woke it (if it was dormant)
                            await stop(ref)
                    elif kind.startswith("stop"):
                        refs = sups if "sup" in kind else agents
                        if not refs:
                            continue
                        if kind.endswith("later"):
                            stops.start_soon(stop, refs[-1 - n % len(refs)])
                        else:
                            await stop(refs[-1 - n % len(refs)])
                    elif kind.startswith("churn"):
                        under = sups[-1] if sups and kind == "churn_sup" else None
                        for _ in range(n):
                            try:
                                ref = kernel.spawn(wakes, supervisor=under)
                            except AgentNotFound:  # its supervisor is gone
                                break
                            agents.append(ref)
                            sent += 1
                            await kernel.send(ref, "send")
                            await stop(ref)
                    elif kind == "settle":
                        await trio.testing.wait_all_tasks_blocked()
                    elif kind == "round":
                        await trio.lowlevel.checkpoint()
                    elif kind == "sleep":
                        await trio.sleep(1)
                if shutdown_woken and agents:
                    # the kernel's shutdown in the round a first message woke one (its
                    # close gives the heap back: only the other counts are looked at)
                    sent += 1
                    with contextlib.suppress(AgentNotFound):
                        await kernel.send(agents[-1], "last")
                else:
                    for ref in [*agents, *sups]:
                        stops.start_soon(stop, ref)
                    await trio.testing.wait_all_tasks_blocked()
                    stats = kernel.stats()
                    assert net[0] == 0, stats
                    assert stats.agents_alive == 0 and stats.in_flight == 0, stats
                    assert_conserved(kernel)
            stats = kernel.stats()
            assert stats.agents_alive == 0 and stats.in_flight == 0, stats
            assert_conserved(kernel)
            rejected = sum(stats.rejected.values())
            assert sent == stats.handled + stats.dead_lettered + rejected, (sent, stats)

    logger = logging.getLogger("nexus_trio")
    level = logger.level
    logger.setLevel(logging.CRITICAL)  # a failure logged per "boom"
    try:
        run_on_mock_clock(scenario, real_seconds=20)
    finally:
        logger.setLevel(level)
