"""Scenario 3, scale: many idle agents.

For each size N, in a fresh subprocess per implementation so that RSS is clean: spawn
N agents (time until the supervisor has taken them all in), RSS per idle agent, and
the shutdown of those idle agents; then, in a second kernel in the same process, N
agents again, the time to deliver one message to each and see it handled (each agent
starts on its first message), RSS per agent once each has run, the time to deliver a
second message to each (now every agent's task is running, parked on its empty
mailbox, as the baseline's tasks are for both rounds), and that shutdown. The baseline
is what a hand-written trio program would do: one task and one memory channel per
agent, the task waiting on ``receive()``.

Run one measurement by hand with ``python -m nexus_trio.bench._scale_child kernel 10000``;
it prints one JSON object.

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import time
import timeit
from collections.abc import Awaitable, Callable
from typing import Any

import trio
import trio.testing

from .. import Config, Context, KernelConfig, Message, agent, open_kernel
from ._measure import collections_now, collections_since, rss_bytes, usage_now, wait_until
from ._result import BenchmarkError, Goal, Metric, ScenarioResult, check
from ._scales import Scale

NAME = "scale"
#: the implementations compared at each size
KINDS = ("kernel", "raw trio")
#: what ``_scale_child`` can measure: the two above, and ``lifecycle`` (spawn, one
#: message each, shutdown, in one kernel: the 1M-agents goal)
MEASUREMENTS = (*KINDS, "lifecycle")


@agent
async def _idle(ctx: Context, msg: Message) -> None:
    return None


async def _measure_kernel(n: int) -> dict[str, Any]:
    config = Config(kernel=KernelConfig(mailbox_capacity=1024))
    rss0 = rss_bytes()
    # 1. Idle agents: spawn, measure, shut down (none of them ever ran).
    async with open_kernel(config) as kernel:
        spawn = kernel.spawn
        u0 = usage_now()
        t0 = time.perf_counter()
        refs = [spawn(_idle) for _ in range(n)]
        await trio.testing.wait_all_tasks_blocked()
        spawn_s = time.perf_counter() - t0
        spawn_usage = usage_now() - u0
        rss_idle = rss_bytes()
        del refs
        t1 = time.perf_counter()
    idle_shutdown_s = time.perf_counter() - t1
    # 2. The same number again, each then handling one message, then shut down.
    async with open_kernel(config) as kernel:
        spawn = kernel.spawn
        refs = [spawn(_idle) for _ in range(n)]
        await trio.testing.wait_all_tasks_blocked()
        u2 = usage_now()
        t2 = time.perf_counter()
        send_nowait = kernel.send_nowait
        for ref in refs:
            send_nowait(ref, None)
        await wait_until(lambda: kernel.stats().handled >= n)
        deliver_s = time.perf_counter() - t2
        deliver_usage = usage_now() - u2
        await trio.testing.wait_all_tasks_blocked()
        rss_active = rss_bytes()
        stats_s = time_stats(kernel.stats)
        # 3. A second message to each: the agents run now (parked on an empty mailbox).
        u4 = usage_now()
        t4 = time.perf_counter()
        for ref in refs:
            send_nowait(ref, None)
        await wait_until(lambda: kernel.stats().handled >= 2 * n)
        second_deliver_s = time.perf_counter() - t4
        second_deliver_usage = usage_now() - u4
        await trio.testing.wait_all_tasks_blocked()
        del refs
        t3 = time.perf_counter()
    shutdown_s = time.perf_counter() - t3
    stats = kernel.stats()
    return {
        "n": n,
        "spawn_s": spawn_s,
        "idle_shutdown_s": idle_shutdown_s,
        "deliver_s": deliver_s,
        "second_deliver_s": second_deliver_s,
        "shutdown_s": shutdown_s,
        "rss_base": rss0,
        "rss_idle": rss_idle,
        "rss_active": rss_active,
        "stats_s": stats_s,
        # CPU time and minor page faults of this process over each phase
        "spawn_usage": spawn_usage.to_dict(),
        "deliver_usage": deliver_usage.to_dict(),
        "second_deliver_usage": second_deliver_usage.to_dict(),
        # both rounds: 2 * n
        "handled": stats.handled,
        "accepted": stats.accepted,
        "dead_lettered": stats.dead_lettered,
        "in_flight": stats.in_flight,
    }


def time_stats(snapshot: Callable[[], object], number: int = 10, repeat: int = 100) -> float:
    """The time of one ``kernel.stats()`` call (seconds): the best of ``repeat`` timings
    of ``number`` calls each (``timeit``'s convention: a timing that another task of a
    shared machine interrupted is not the call's cost), the collector on as in real use.
    The agents are idle: the first call folds the latency samples the delivery left and
    builds the histograms' snapshots, the others reuse them (as ``stats()`` does while no
    message is handled)."""
    timer = timeit.Timer(snapshot, setup=gc.enable)
    return min(timer.repeat(repeat=repeat, number=number)) / number


async def _measure_lifecycle(n: int) -> dict[str, Any]:
    """One kernel, one process: spawn ``n`` agents, one message each, shut down.

    Each phase is timed to its end as a user sees it: spawning until every agent is
    registered and the scheduler is idle, delivery until ``stats().handled`` reaches
    ``n``, shutdown until ``open_kernel``'s block has exited. Each phase's CPU time and
    minor page faults (``getrusage``) are reported beside its time (``*_usage``), and the
    cycle collector's collections in it by generation (``*_collections``: young, middle,
    full; a collection of a million agents' objects is seconds of user time).
    """
    config = Config(kernel=KernelConfig(mailbox_capacity=1024))
    async with open_kernel(config) as kernel:
        spawn = kernel.spawn
        c0 = collections_now()
        u0 = usage_now()
        t0 = time.perf_counter()
        refs = [spawn(_idle) for _ in range(n)]
        await trio.testing.wait_all_tasks_blocked()
        spawn_s = time.perf_counter() - t0
        u1 = usage_now()
        spawn_usage = u1 - u0
        spawn_collections = collections_since(c0)
        c1 = collections_now()
        send_nowait = kernel.send_nowait
        t1 = time.perf_counter()
        for ref in refs:
            send_nowait(ref, None)
        await wait_until(lambda: kernel.stats().handled >= n)
        deliver_s = time.perf_counter() - t1
        u2 = usage_now()
        deliver_usage = u2 - u1
        deliver_collections = collections_since(c1)
        c2 = collections_now()
        del refs
        t2 = time.perf_counter()
    shutdown_s = time.perf_counter() - t2
    shutdown_usage = usage_now() - u2
    shutdown_collections = collections_since(c2)
    stats = kernel.stats()
    return {
        "n": n,
        "spawn_s": spawn_s,
        "deliver_s": deliver_s,
        "shutdown_s": shutdown_s,
        "spawn_usage": spawn_usage.to_dict(),
        "deliver_usage": deliver_usage.to_dict(),
        "shutdown_usage": shutdown_usage.to_dict(),
        "spawn_collections": spawn_collections,
        "deliver_collections": deliver_collections,
        "shutdown_collections": shutdown_collections,
        "rss_peak": rss_bytes(),
        "handled": stats.handled,
        "accepted": stats.accepted,
        "dead_lettered": stats.dead_lettered,
        "in_flight": stats.in_flight,
    }


async def _measure_raw_trio(n: int) -> dict[str, Any]:
    rss0 = rss_bytes()
    handled = 0
    target = n
    all_handled = trio.Event()

    async def agent_task(receive: trio.MemoryReceiveChannel[Any]) -> None:
        nonlocal handled
        async for _ in receive:
            handled += 1
            if handled == target:
                all_handled.set()

    def start_all(nursery: trio.Nursery) -> list[trio.MemorySendChannel[Any]]:
        senders = []
        for _ in range(n):
            send, receive = trio.open_memory_channel[Any](1024)
            senders.append(send)
            nursery.start_soon(agent_task, receive)
        return senders

    # 1. Idle: spawn, measure, shut down gracefully (close every channel, tasks finish).
    async with trio.open_nursery() as nursery:
        t0 = time.perf_counter()
        senders = start_all(nursery)
        await trio.testing.wait_all_tasks_blocked()
        spawn_s = time.perf_counter() - t0
        rss_idle = rss_bytes()
        t1 = time.perf_counter()
        for send in senders:
            send.close()
    idle_shutdown_s = time.perf_counter() - t1
    del senders
    # 2. Again, one message to each, then shut down the same way.
    async with trio.open_nursery() as nursery:
        senders = start_all(nursery)
        await trio.testing.wait_all_tasks_blocked()
        t2 = time.perf_counter()
        for send in senders:
            send.send_nowait(None)
        await all_handled.wait()
        deliver_s = time.perf_counter() - t2
        await trio.testing.wait_all_tasks_blocked()
        rss_active = rss_bytes()
        # 3. A second message to each (the same as the first for tasks that always run).
        target, all_handled = 2 * n, trio.Event()
        t4 = time.perf_counter()
        for send in senders:
            send.send_nowait(None)
        await all_handled.wait()
        second_deliver_s = time.perf_counter() - t4
        await trio.testing.wait_all_tasks_blocked()
        t3 = time.perf_counter()
        for send in senders:
            send.close()
    shutdown_s = time.perf_counter() - t3
    return {
        "n": n,
        "spawn_s": spawn_s,
        "idle_shutdown_s": idle_shutdown_s,
        "deliver_s": deliver_s,
        "second_deliver_s": second_deliver_s,
        "shutdown_s": shutdown_s,
        "rss_base": rss0,
        "rss_idle": rss_idle,
        "rss_active": rss_active,
        # both rounds: 2 * n
        "handled": handled,
    }


_MEASUREMENTS: dict[str, Callable[[int], Awaitable[dict[str, Any]]]] = {
    "kernel": _measure_kernel,
    "raw trio": _measure_raw_trio,
    "lifecycle": _measure_lifecycle,
}


def measure(kind: str, n: int) -> dict[str, Any]:
    """One measurement in this process (``kind``: one of :data:`MEASUREMENTS`)."""
    if kind not in _MEASUREMENTS:
        raise ValueError(f"scale: unknown implementation {kind!r}; expected one of {MEASUREMENTS}")
    return trio.run(_MEASUREMENTS[kind], n)


def measure_in_subprocess(kind: str, n: int, timeout: float = 900.0) -> dict[str, Any]:
    """One measurement in a fresh interpreter, so that RSS is this measurement's alone."""
    proc = subprocess.run(
        [sys.executable, "-m", "nexus_trio.bench._scale_child", kind, str(n)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise BenchmarkError(
            f"scale subprocess ({kind}, {n}) exited {proc.returncode}: {proc.stderr[-2000:]}"
        )
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def run(scale: Scale) -> ScenarioResult:
    metrics: list[Metric] = []
    counts: dict[str, int] = {}
    for n in scale.scale_sizes:
        runs: dict[str, dict[str, Any]] = {}
        for kind in KINDS:
            runs[kind] = (
                measure_in_subprocess(kind, n) if scale.scale_subprocess else measure(kind, n)
            )
        k, raw = runs["kernel"], runs["raw trio"]
        check(
            k["handled"] == 2 * n == k["accepted"]
            and k["dead_lettered"] == 0
            and k["in_flight"] == 0,
            f"scale {n}: kernel counts do not add up (two messages per agent): {k}",
        )
        check(raw["handled"] == 2 * n, f"scale {n}: raw trio handled {raw['handled']} of {2 * n}")
        counts[f"{n}_kernel_handled"] = k["handled"]
        counts[f"{n}_raw_handled"] = raw["handled"]

        def per_agent(r: dict[str, Any], key: str, n: int = n) -> float:
            return float(max(r[key] - r["rss_base"], 0)) / n / 1024

        size = f"{n:,} agents"
        metrics += [
            Metric(
                NAME,
                f"{size}: spawn rate",
                "agents/s",
                n / k["spawn_s"],
                {"raw trio": n / raw["spawn_s"]},
                reference="raw trio",
                goal=Goal(">= 100k agents/s", "value", ">=", 100_000),
            ),
            Metric(
                NAME,
                f"{size}: RSS per idle agent",
                "KB",
                per_agent(k, "rss_idle"),
                {"raw trio": per_agent(raw, "rss_idle")},
                reference="raw trio",
                goal=Goal("<= 1.5x raw trio task+channel", "ratio", "<=", 1.5)
                if n >= 10_000
                else None,
                higher_is_better=False,
            ),
            Metric(
                NAME,
                f"{size}: RSS per agent after one message",
                "KB",
                per_agent(k, "rss_active"),
                {"raw trio": per_agent(raw, "rss_active")},
                reference="raw trio",
                higher_is_better=False,
            ),
            Metric(
                NAME,
                f"{size}: deliver one message to each",
                "s",
                k["deliver_s"],
                {"raw trio": raw["deliver_s"]},
                reference="raw trio",
                higher_is_better=False,
            ),
            Metric(
                NAME,
                f"{size}: deliver a second message to each (agents running)",
                "s",
                k["second_deliver_s"],
                {"raw trio": raw["second_deliver_s"]},
                reference="raw trio",
                higher_is_better=False,
            ),
            *(
                [
                    Metric(
                        NAME,
                        f"{size}: spawn + shutdown, idle, in one process",
                        "s",
                        k["spawn_s"] + k["idle_shutdown_s"],
                        {"raw trio": raw["spawn_s"] + raw["idle_shutdown_s"]},
                        reference="raw trio",
                        higher_is_better=False,
                        goal=Goal("completes (< 10 min)", "value", "<=", 600.0),
                    )
                ]
                if n >= 1_000_000
                else []
            ),
            Metric(
                NAME,
                f"{size}: shutdown, idle",
                "s",
                k["idle_shutdown_s"],
                {"raw trio": raw["idle_shutdown_s"]},
                reference="raw trio",
                higher_is_better=False,
            ),
            Metric(
                NAME,
                f"{size}: shutdown after one message each",
                "s",
                k["shutdown_s"],
                {"raw trio": raw["shutdown_s"]},
                reference="raw trio",
                higher_is_better=False,
            ),
        ]
    return ScenarioResult(NAME, tuple(metrics), counts)
