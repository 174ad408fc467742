"""Scenario 4, latency under load: the same offered load spread over few or many agents.

A driver offers ``rate`` messages per second (in ticks of 1 ms) round-robin over A
agents for a fixed time; every agent was activated by one message beforehand, so no
first-message start-up is measured. The no-op handler records how long after it was
sent each message was handled (send-to-handle latency: queueing plus scheduling), and
the kernel's own ``handle_latency`` histogram gives the handler time. The goal: p99 with
many agents within 1.5x of p99 with few agents.

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

import time
from typing import Any

import trio
import trio.testing

from .. import Config, Context, KernelConfig, Message, agent, open_kernel
from ._measure import percentile, wait_until
from ._result import Goal, Metric, ScenarioResult, check
from ._scales import Scale

NAME = "latency under load"
_TICK = 0.001


async def _offer(agents: int, rate: int, seconds: float) -> dict[str, Any]:
    latencies: list[float] = []
    clock = time.perf_counter

    @agent
    async def stamp(ctx: Context, msg: Message) -> None:
        sent = msg.payload
        if sent is not None:
            latencies.append(clock() - sent)

    config = Config(kernel=KernelConfig(mailbox_capacity=1024))
    async with open_kernel(config) as kernel:
        refs = [kernel.spawn(stamp) for _ in range(agents)]
        for ref in refs:
            kernel.send_nowait(ref, None)
        await wait_until(lambda: kernel.stats().handled >= agents)
        await trio.testing.wait_all_tasks_blocked()
        warm = kernel.stats().handle_latency.count
        per_tick = max(1, round(rate * _TICK))
        ticks = max(1, round(seconds / _TICK))
        total = per_tick * ticks
        send = kernel.send
        start = trio.current_time()
        i = 0
        for tick in range(ticks):
            for _ in range(per_tick):
                await send(refs[i % agents], clock())
                i += 1
            await trio.sleep_until(start + (tick + 1) * _TICK)
        offered_s = trio.current_time() - start
        await wait_until(lambda: kernel.stats().handled >= agents + total)
        stats = kernel.stats()
    return {
        "latencies": latencies,
        "sent": total,
        "offered_s": offered_s,
        "handled": stats.handled - agents,
        "dead_lettered": stats.dead_lettered,
        "handle_p99": stats.handle_latency.p99,
        "handle_samples": stats.handle_latency.count - warm,
    }


def run(scale: Scale) -> ScenarioResult:
    rate, seconds = scale.load_rate, scale.load_seconds
    small = trio.run(_offer, scale.load_small, rate, seconds)
    large = trio.run(_offer, scale.load_large, rate, seconds)
    counts: dict[str, int] = {}
    for label, r in (("small", small), ("large", large)):
        check(
            r["handled"] == r["sent"] == len(r["latencies"]) and r["dead_lettered"] == 0,
            f"latency under load ({label}): sent {r['sent']}, handled {r['handled']}, "
            f"recorded {len(r['latencies'])}, dead-lettered {r['dead_lettered']}",
        )
        counts[f"{label}_sent"] = r["sent"]
        counts[f"{label}_handled"] = r["handled"]
    achieved = small["sent"] / small["offered_s"]
    small_name = f"{scale.load_small:,} agents"
    large_name = f"{scale.load_large:,} agents"
    load = f"{rate:,} msg/s offered ({achieved:,.0f} achieved)"
    metrics = []
    for q, label in ((0.5, "p50"), (0.99, "p99")):
        metrics.append(
            Metric(
                NAME,
                f"{label} send-to-handle, {large_name} vs {small_name}",
                "us",
                percentile(large["latencies"], q) * 1e6,
                {small_name: percentile(small["latencies"], q) * 1e6},
                reference=small_name,
                goal=Goal("<= 1.5x", "ratio", "<=", 1.5) if label == "p99" else None,
                higher_is_better=False,
                note=load,
            )
        )
    # The kernel samples one message in eight *per agent* for its handle_latency
    # histogram: agents that handle fewer than eight messages are never sampled.
    if large["handle_samples"] and small["handle_samples"]:
        metrics.append(
            Metric(
                NAME,
                f"p99 handler time, {large_name} vs {small_name}",
                "us",
                large["handle_p99"] * 1e6,
                {small_name: small["handle_p99"] * 1e6},
                reference=small_name,
                higher_is_better=False,
                note="kernel handle_latency histogram (sampled)",
            )
        )
    return ScenarioResult(NAME, tuple(metrics), counts)
