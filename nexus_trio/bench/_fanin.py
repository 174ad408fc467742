"""Scenario 5, fan-in backpressure: many producers, one slow consumer with a small mailbox.

P producer tasks each ``await kernel.send`` M messages to one agent whose mailbox holds
16 and whose handler yields (``await trio.sleep(0)``) on every message, so the
producers must be throttled. Measured: how long each send waited for room (p50, p99,
max), RSS growth from the moment every producer is running and blocked until the end
(sampled every 5 ms), the mailbox's high-water mark, and conservation (every message
sent is handled, nothing dead-lettered or rejected).

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

import time
from typing import Any

import trio
import trio.lowlevel
import trio.testing

from .. import Config, Context, KernelConfig, Message, agent, open_kernel
from ._measure import percentile, rss_bytes, wait_until
from ._result import Goal, Metric, ScenarioResult, check
from ._scales import Scale

NAME = "fan-in backpressure"
CAPACITY = 16


@agent(name="sink", mailbox_capacity=CAPACITY)
async def _slow_consumer(ctx: Context, msg: Message) -> None:
    await trio.lowlevel.checkpoint()


async def _fanin(producers: int, per_producer: int) -> dict[str, Any]:
    # A generous send deadline: this scenario is about being throttled, not timing out.
    config = Config(kernel=KernelConfig(send_timeout_ms=600_000))
    waits: list[float] = []
    rss_samples: list[int] = []
    async with open_kernel(config) as kernel:
        sink = kernel.spawn(_slow_consumer)
        total = producers * per_producer
        go = trio.Event()

        async def producer() -> None:
            clock = time.perf_counter
            own: list[float] = []
            await go.wait()
            for i in range(per_producer):
                t0 = clock()
                await kernel.send(sink, i)
                own.append(clock() - t0)
            waits.extend(own)

        async def sample_rss() -> None:
            while True:
                rss_samples.append(rss_bytes())
                await trio.sleep(0.005)

        async with trio.open_nursery() as nursery:
            for _ in range(producers):
                nursery.start_soon(producer)
            await trio.testing.wait_all_tasks_blocked()
            go.set()
            # Steady state: every producer has run and is parked on the full mailbox.
            steady = min(total, max(producers, CAPACITY))
            await wait_until(lambda: kernel.stats().handled >= steady)
            rss_start = rss_bytes()
            start = time.perf_counter()
            nursery.start_soon(sample_rss)
            await wait_until(lambda: len(waits) >= total and kernel.stats().handled >= total)
            elapsed = time.perf_counter() - start
            rss_samples.append(rss_bytes())
            nursery.cancel_scope.cancel()
        stats = kernel.stats(agents=True)
    final = kernel.stats()
    return {
        "sent": total,
        "waits": waits,
        "rss_start": rss_start,
        "rss_max": max(rss_samples),
        "elapsed": elapsed,
        "handled": final.handled,
        "accepted": final.accepted,
        "dead_lettered": final.dead_lettered,
        "rejected": sum(final.rejected.values()),
        "in_flight": final.in_flight,
        "high_water": stats.agents[0].mailbox_high_water,
    }


def run(scale: Scale) -> ScenarioResult:
    r = trio.run(_fanin, scale.fanin_producers, scale.fanin_per_producer)
    check(
        r["handled"] == r["sent"] == r["accepted"] == len(r["waits"])
        and r["dead_lettered"] == 0
        and r["rejected"] == 0
        and r["in_flight"] == 0,
        f"fan-in counts do not add up: sent {r['sent']}, accepted {r['accepted']}, "
        f"handled {r['handled']}, dead-lettered {r['dead_lettered']}, rejected {r['rejected']}",
    )
    check(
        r["high_water"] <= CAPACITY,
        f"fan-in: mailbox high water {r['high_water']} exceeds its capacity {CAPACITY}",
    )
    shape = (
        f"{scale.fanin_producers:,} producers x {scale.fanin_per_producer} -> capacity {CAPACITY}"
    )
    growth_kb = max(r["rss_max"] - r["rss_start"], 0) / 1024
    waits = r["waits"]
    metrics = (
        Metric(
            NAME,
            "RSS growth while throttled",
            "KB",
            growth_kb,
            goal=Goal("< 1 MB", "value", "<=", 1024.0),
            higher_is_better=False,
            note=shape,
        ),
        Metric(NAME, "producer wait p50", "us", percentile(waits, 0.5) * 1e6, note=shape),
        Metric(NAME, "producer wait p99", "us", percentile(waits, 0.99) * 1e6, note=shape),
        Metric(NAME, "producer wait max", "ms", max(waits) * 1e3, note=shape),
        Metric(NAME, "consumer throughput", "msg/s", r["sent"] / r["elapsed"], note=shape),
        Metric(
            NAME,
            "mailbox high water",
            "messages",
            r["high_water"],
            goal=Goal(f"<= capacity {CAPACITY}", "value", "<=", CAPACITY),
            higher_is_better=False,
        ),
        Metric(
            NAME,
            "messages lost",
            "messages",
            r["sent"] - r["handled"],
            goal=Goal("0 (conservation)", "value", "<=", 0),
            higher_is_better=False,
        ),
    )
    counts = {k: r[k] for k in ("sent", "accepted", "handled", "dead_lettered", "rejected")}
    return ScenarioResult(NAME, metrics, counts)
