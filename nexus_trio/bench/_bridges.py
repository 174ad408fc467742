"""Scenario 7, bridges: request/reply through an agent that is a child process.

The echo agents shipped with the bridges (``nexus_trio/bridges/python.py`` and
``nexus_trio/bridges/nexus-bridge.js``) run under :func:`process_agent`; a client does
``kernel.request`` round trips back to back. The baseline is the same client against an
in-process ``@agent`` echo, so the ratio is the price of the process boundary (two pipe
writes, two JSON encodings and decodings, two context switches per round trip).
Skipped, with the reason, when the bridges or ``node`` are not available.

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any

import trio

from .. import AgentSpec, Context, Message, agent, open_kernel
from ._measure import percentile
from ._result import Metric, ScenarioResult, check
from ._scales import Scale

NAME = "bridges"


@agent
async def _echo(ctx: Context, msg: Message) -> Any:
    return msg.payload


def _bridge_specs() -> tuple[dict[str, AgentSpec], list[str]]:
    """The bridge echo agents that can run here, and why the others cannot."""
    try:
        from ..bridges.process import process_agent
    except ImportError as exc:
        return {}, [f"nexus_trio.bridges.process is not available ({exc})"]
    folder = Path(__file__).resolve().parent.parent / "bridges"
    specs: dict[str, AgentSpec] = {}
    missing: list[str] = []
    python_bridge = folder / "python.py"
    if python_bridge.exists():
        specs["python bridge"] = process_agent([sys.executable, str(python_bridge)])
    else:
        missing.append(f"{python_bridge} not found")
    node = shutil.which("node")
    js_bridge = folder / "nexus-bridge.js"
    if node is None:
        missing.append("node is not installed")
    elif not js_bridge.exists():
        missing.append(f"{js_bridge} not found")
    else:
        specs["node bridge"] = process_agent([node, str(js_bridge)])
    return specs, missing


async def _round_trips(spec: AgentSpec, n: int) -> tuple[float, list[float], int]:
    async with open_kernel() as kernel:
        ref = kernel.spawn(spec)
        # The first request waits for the child to start and register.
        await kernel.request(ref, {"warm": True}, timeout=30.0)
        latencies: list[float] = []
        clock = time.perf_counter
        start = clock()
        for i in range(n):
            t0 = clock()
            reply = await kernel.request(ref, {"i": i}, timeout=30.0)
            latencies.append(clock() - t0)
            check(reply == {"i": i}, f"bridge echo answered {reply!r} to {{'i': {i}}}")
        elapsed = clock() - start
        handled = kernel.stats().handled
    return elapsed, latencies, handled


def run(scale: Scale) -> ScenarioResult:
    specs, missing = _bridge_specs()
    if not specs:
        return ScenarioResult(NAME, (), {}, skipped="; ".join(missing))
    n = scale.bridge_round_trips
    base_s, base_lat, _ = trio.run(_round_trips, _echo, n)
    metrics: list[Metric] = []
    counts: dict[str, int] = {}
    for label, spec in specs.items():
        elapsed, latencies, handled = trio.run(_round_trips, spec, n)
        check(len(latencies) == n, f"{label}: {len(latencies)} of {n} round trips")
        counts[f"{label}_round_trips"] = len(latencies)
        counts[f"{label}_handled"] = handled
        metrics.append(
            Metric(
                NAME,
                f"{label}: round trips/s",
                "round trips/s",
                n / elapsed,
                {"in-process agent": n / base_s},
                reference="in-process agent",
            )
        )
        for q, name in ((0.5, "p50"), (0.99, "p99")):
            metrics.append(
                Metric(
                    NAME,
                    f"{label}: {name} latency",
                    "us",
                    percentile(latencies, q) * 1e6,
                    {"in-process agent": percentile(base_lat, q) * 1e6},
                    reference="in-process agent",
                    higher_is_better=False,
                )
            )
    return ScenarioResult(
        NAME, tuple(metrics), counts, skipped="; ".join(missing) if missing else None
    )
