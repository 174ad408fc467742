"""The heap keeper: when the kernel freezes and unfreezes the cycle collector's heap."""

from __future__ import annotations

import gc
import logging
import weakref
from collections.abc import Iterator

import pytest
import trio
import trio.testing

from nexus_trio import (
    Agent,
    Config,
    Context,
    Kernel,
    KernelConfig,
    Message,
    SupervisionConfig,
    agent,
    open_kernel,
)
from nexus_trio._gc import YOUNG, HeapKeeper


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
    assert keeper.freezes == 0 and gc.get_freeze_count() == 0
    marker = [object()]  # a tracked object made before the freeze
    keeper.created()
    assert keeper.freezes == 1 and gc.get_freeze_count() > 0
    assert not any(o is marker for o in gc.get_objects())
    for _ in range(4):
        keeper.created()
    assert keeper.freezes == 2
    # 8 frozen: 3 ended runs are not enough (batch 4), the 4th is (4 * 2 >= 8).
    for _ in range(3):
        keeper.run_ended()
    assert keeper.thaws == 0
    keeper.run_ended()
    assert keeper.thaws == 1 and gc.get_freeze_count() == 0
    assert any(o is marker for o in gc.get_objects())


def test_a_run_that_ends_undoes_its_creations_so_restarts_never_freeze(unfrozen: None) -> None:
    """Regression: every restart counted as growth (a freeze each ``batch`` restarts)."""
    keeper = HeapKeeper(True, batch=4)
    keeper.created()  # the spawn
    for _ in range(100):
        keeper.created()  # a run starts ...
        keeper.run_ended()  # ... and ends: restarted
    assert keeper.freezes == 0 and gc.get_freeze_count() == 0
    for _ in range(100):
        keeper.created()  # a dormant agent woken: its task ...
        keeper.created()  # ... and its run
        keeper.run_ended(2)
    assert keeper.freezes == 0 and gc.get_freeze_count() == 0
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
    assert keeper.thaws == 1 and gc.get_freeze_count() == 0
    for _ in range(100):
        keeper.run_ended()
        keeper.created()
    assert keeper.freezes == 1 and keeper.thaws == 1 and gc.get_freeze_count() == 0


def test_disabled_keeper_never_freezes(unfrozen: None) -> None:
    keeper = HeapKeeper(False, batch=1)
    for _ in range(10):
        keeper.created()
        keeper.run_ended()
    keeper.close()
    assert keeper.freezes == 0 and gc.get_freeze_count() == 0


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
        frozen_while_running = gc.get_freeze_count()
    # 3,000 spawns + 3,000 activations + 3,000 starts: 4 batches of 2,048.
    assert (frozen_while_running > 0) is enabled
    assert gc.get_freeze_count() == 0
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
    assert keeper.freezes == 0 and gc.get_freeze_count() == 0
    # Cyclic garbage that exists at a freeze is held back by it (only that is at stake).
    node = _Node()
    ref = weakref.ref(node)
    del node
    keeper.backlog(4)
    assert keeper.freezes == 1 and gc.get_freeze_count() > 0
    gc.collect()
    assert ref() is not None
    # Growth is measured from the last freeze: 4 + 3 is not enough, 4 + 4 is.
    keeper.backlog(7)
    assert keeper.freezes == 1
    keeper.backlog(8)
    assert keeper.freezes == 2
    # Drained to below half before 16 backlog freezes: growth restarts from there, no thaw.
    keeper.backlog(3)
    assert keeper.thaws == 0 and gc.get_freeze_count() > 0
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
    assert keeper.thaws == 1 and gc.get_freeze_count() == 0
    gc.collect()
    assert ref() is None


def test_a_disabled_keeper_ignores_the_backlog(unfrozen: None) -> None:
    keeper = HeapKeeper(False, batch=1)
    for queued in range(100):
        keeper.backlog(queued)
    assert keeper.freezes == 0 and gc.get_freeze_count() == 0


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
    assert gc.get_freeze_count() == 0


async def _frozen_then_handled(kernel: Kernel, queued: int, handled: int) -> int:
    """The heap's freeze count while ``queued`` messages wait; then each is handled, and
    the kernel has handled ``handled`` in all."""
    frozen = gc.get_freeze_count()
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
    assert gc.get_freeze_count() == 0


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
            frozen_in_burst.append(gc.get_freeze_count())

    with pytest.raises(ExceptionGroup) as info:
        await burst()
    assert info.group_contains(RuntimeError, match="log disk full")
    assert frozen_in_burst[0] > 0
    assert gc.get_freeze_count() == 0


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
        assert gc.get_freeze_count() == 0
        assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0 and gc.get_threshold() == before


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
        assert gc.get_freeze_count() == 0
        assert gc.get_threshold() == before
        # Growth still freezes: agents that stay.
        refs = [kernel.spawn(once) for _ in range(2048)]
        assert gc.get_freeze_count() > 0
        assert len(refs) == 2048
    assert gc.get_freeze_count() == 0 and gc.get_threshold() == before
