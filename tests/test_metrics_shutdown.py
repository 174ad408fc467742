"""Scrapes of ``/metrics`` during a kernel's shutdown: a back-to-back scraper must not
stretch the stop, and ``nexus_agents_alive`` follows the agents as they stop.

On a ``MockClock(autojump_threshold=0)``: the tests count agents and samples, not time.
"""

from __future__ import annotations

import trio
import trio.testing

from nexus_trio import Agent, Context, Message
from nexus_trio.metrics import MetricsRenderer
from nexus_trio.testing import open_test_kernel

N = 300


class Stopper(Agent):
    """An agent with an ``on_stop``: the tree stops such agents one at a time."""

    async def handle(self, ctx: Context, msg: Message) -> None:
        return None

    async def on_stop(self, ctx: Context) -> None:
        return None


def _gauge(body: bytes, name: bytes) -> float:
    for line in body.splitlines():
        if line.startswith(name + b" "):
            return float(line.split()[1])
    raise AssertionError(f"no {name!r} in the scrape")


async def test_back_to_back_scrapes_during_a_stop_render_no_per_agent_series(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stopped_during: list[tuple[float, float, int]] = []  # alive, exported, agent samples
    async with open_test_kernel() as kernel:
        for i in range(N):
            kernel.spawn(Stopper, name=f"s{i}")
        for i in range(N):
            await kernel.send(f"s{i}", "wake")
        await trio.testing.wait_all_tasks_blocked()
        assert kernel.stats().agents_alive == N
        renderer = MetricsRenderer(
            kernel, per_agent=True, per_agent_limit=N, cache_seconds=0, process=False
        )
        before = await renderer.render()
        assert _gauge(before, b"nexus_agent_series_exported") == N  # on while running

        async def scrape_forever() -> None:
            while True:
                started_in_stop = kernel.shutting_down
                body = await renderer.render()
                if started_in_stop and not kernel.stopped:
                    samples = sum(
                        1 for line in body.splitlines() if line.startswith(b"nexus_agent_")
                    )
                    stopped_during.append(
                        (
                            _gauge(body, b"nexus_agents_alive"),
                            _gauge(body, b"nexus_agent_series_exported"),
                            samples,
                        )
                    )

        async with trio.open_nursery() as nursery:
            nursery.start_soon(scrape_forever)
            await trio.lowlevel.checkpoint()  # (the scraper busy: nothing ever blocks)
            await kernel.shutdown()
            nursery.cancel_scope.cancel()
        assert kernel.stats().agents_alive == 0
    assert len(stopped_during) >= 3
    # Bounded work per scrape in the stop: kernel-wide series only, whatever N.
    assert {exported for _, exported, _ in stopped_during} == {0.0}
    # (the family headers of nexus_agent_series_* only: two samples)
    assert {samples for _, _, samples in stopped_during} == {2}
    # The gauge follows the agents as they stop, not N until the very end.
    alive = [a for a, _, _ in stopped_during]
    assert alive == sorted(alive, reverse=True)
    assert min(alive) < N / 2, alive
