"""Scrapes of ``/metrics`` during a kernel's shutdown: a back-to-back scraper must not
stretch the stop, and ``nexus_agents_alive`` follows the agents as they stop.

On a ``MockClock(autojump_threshold=0)``: the tests count agents and samples, not time.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from typing import Any

import pytest
import trio
import trio.testing

import nexus_trio.metrics
from nexus_trio import Agent, Context, Message, Supervisor
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
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A scrape gives the other tasks as much loop time as each slice of its work took,
    # by the real clock (the next test's subject): a slice that a loaded machine paused
    # for a second let the whole stop run inside one scrape's turn (CI at load ~25 saw
    # one scrape in the stop). Here every slice looks instant, so a scrape gives way
    # for one checkpoint a slice and the count of scrapes in the stop does not depend
    # on the machine's load.
    monkeypatch.setattr(nexus_trio.metrics, "time", types.SimpleNamespace(perf_counter=lambda: 0.0))
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


async def test_back_to_back_scrapes_take_a_share_of_a_subtree_stop_not_every_round(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Before: outside a shutdown (a supervisor's subtree stopped), back-to-back uncached
    per-agent scrapes rendered a piece (~2 ms) in every scheduling round of the stop,
    whose agents with an ``on_stop`` stop one at a time, a few rounds each: 1,000 such
    agents took 16-35 s to stop instead of 0.4-0.6 s. A scrape now gives the other tasks
    as much loop time as each of its pieces took: many rounds of the stop per piece."""
    rounds = pieces = 0

    class CountingRenderer(MetricsRenderer):
        def _pieces(self, snapshot: Any) -> Iterator[bytes]:
            nonlocal pieces
            for piece in super()._pieces(snapshot):
                pieces += 1
                yield piece

    async with open_test_kernel() as kernel:
        sub = kernel.spawn(Supervisor(name="sub"))
        for i in range(N):
            kernel.spawn(Stopper, name=f"s{i}", supervisor=sub)
        for i in range(N):
            await kernel.send(f"s{i}", "wake")
        await trio.testing.wait_all_tasks_blocked()
        renderer = CountingRenderer(
            kernel, per_agent=True, per_agent_limit=N, cache_seconds=0, process=False
        )

        async def scrape_forever() -> None:
            while True:
                await renderer.render()

        async def count_rounds() -> None:
            nonlocal rounds
            while True:
                await trio.lowlevel.checkpoint()
                rounds += 1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(scrape_forever)
            nursery.start_soon(count_rounds)
            await trio.lowlevel.checkpoint()  # (the scraper busy: nothing ever blocks)
            rounds = pieces = 0
            await kernel.stop(sub)
            stopped_in = (rounds, pieces)
            nursery.cancel_scope.cancel()
        assert kernel.stats().agents_alive == 0
    rounds, pieces = stopped_in
    assert rounds >= N, stopped_in  # (a few rounds per agent)
    # Before: a piece in every round (904 rounds, 905 pieces at N = 300; 33 pieces now).
    assert pieces * 3 <= rounds, stopped_in
