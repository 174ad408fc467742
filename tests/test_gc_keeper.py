"""The heap keeper: when the kernel freezes and unfreezes the cycle collector's heap."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
import trio
import trio.testing

from nexus_trio import Config, Context, KernelConfig, Message, agent, open_kernel
from nexus_trio._gc import HeapKeeper


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()


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
