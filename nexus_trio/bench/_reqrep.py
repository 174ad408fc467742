"""Scenario 2, request/reply: round trips per second and latency percentiles.

Two shapes: one client and one echo server doing round trips back to back, and P
client/server pairs doing them concurrently. Baselines in the same process:

* ``raw trio``: a server task reading ``(payload, reply_channel)`` from a memory
  channel and answering with ``send_nowait`` on the client's own reply channel;
* ``asyncio``: a server task reading ``(payload, future)`` from an ``asyncio.Queue``
  and resolving the future;
* ``kernel``: ``await kernel.request(echo, payload)`` on an ``@agent`` that returns the
  payload (a Query, a correlated Response, a request timeout armed per call).

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio
import trio.testing

from .. import Context, Message, agent, open_kernel
from ._measure import percentile
from ._result import Goal, Metric, ScenarioResult, check
from ._scales import Scale

NAME = "request/reply"

# (elapsed seconds, round-trip latencies in seconds)
_Timing = tuple[float, list[float]]


@agent
async def _echo(ctx: Context, msg: Message) -> Any:
    return msg.payload


async def _clients(
    pairs: int, per_pair: int, call: Callable[[int], Awaitable[Any]], nursery: trio.Nursery
) -> _Timing:
    latencies: list[float] = []
    go = trio.Event()
    finished = 0
    all_done = trio.Event()

    async def client(index: int) -> None:
        nonlocal finished
        own: list[float] = []
        clock = time.perf_counter
        await go.wait()
        for i in range(per_pair):
            t0 = clock()
            await call(index)
            own.append(clock() - t0)
            del i
        latencies.extend(own)
        finished += 1
        if finished == pairs:
            all_done.set()

    for index in range(pairs):
        nursery.start_soon(client, index)
    await trio.testing.wait_all_tasks_blocked()
    start = time.perf_counter()
    go.set()
    await all_done.wait()
    return time.perf_counter() - start, latencies


async def kernel_pairs(pairs: int, per_pair: int) -> tuple[_Timing, dict[str, int]]:
    async with open_kernel() as kernel:
        refs = [kernel.spawn(_echo) for _ in range(pairs)]
        for ref in refs:
            await kernel.request(ref, 0)
        request = kernel.request

        async def call(index: int) -> Any:
            return await request(refs[index], index)

        async with trio.open_nursery() as nursery:
            timing = await _clients(pairs, per_pair, call, nursery)
    stats = kernel.stats()
    counts = {
        "requests": pairs * (per_pair + 1),
        "handled": stats.handled,
        "replies_delivered": stats.replies_delivered,
        "accepted": stats.accepted,
        "dead_lettered": stats.dead_lettered,
        "in_flight": stats.in_flight,
    }
    return timing, counts


async def raw_trio_pairs(pairs: int, per_pair: int) -> _Timing:
    async def server(receive: trio.MemoryReceiveChannel[tuple[int, Any]]) -> None:
        async for payload, reply in receive:
            reply.send_nowait(payload)

    async with trio.open_nursery() as servers:
        requests = []
        replies = []
        for _ in range(pairs):
            send, receive = trio.open_memory_channel[tuple[int, Any]](1024)
            servers.start_soon(server, receive)
            requests.append(send)
            replies.append(trio.open_memory_channel[int](1))

        async def call(index: int) -> int:
            reply_send, reply_receive = replies[index]
            requests[index].send_nowait((index, reply_send))
            return await reply_receive.receive()

        async with trio.open_nursery() as nursery:
            timing = await _clients(pairs, per_pair, call, nursery)
        servers.cancel_scope.cancel()
    return timing


async def asyncio_pairs(pairs: int, per_pair: int) -> _Timing:
    loop = asyncio.get_running_loop()

    async def server(queue: asyncio.Queue[tuple[int, asyncio.Future[int]]]) -> None:
        while True:
            payload, future = await queue.get()
            future.set_result(payload)

    queues: list[asyncio.Queue[tuple[int, asyncio.Future[int]]]] = [
        asyncio.Queue(maxsize=1024) for _ in range(pairs)
    ]
    servers = [asyncio.create_task(server(q)) for q in queues]
    latencies: list[float] = []
    go = asyncio.Event()

    async def client(index: int) -> None:
        queue = queues[index]
        own: list[float] = []
        clock = time.perf_counter
        await go.wait()
        for _ in range(per_pair):
            t0 = clock()
            future: asyncio.Future[int] = loop.create_future()
            await queue.put((index, future))
            await future
            own.append(clock() - t0)
        latencies.extend(own)

    clients = [asyncio.create_task(client(i)) for i in range(pairs)]
    await asyncio.sleep(0)
    start = time.perf_counter()
    go.set()
    await asyncio.gather(*clients)
    elapsed = time.perf_counter() - start
    for task in servers:
        task.cancel()
    await asyncio.gather(*servers, return_exceptions=True)
    return elapsed, latencies


def _metrics(shape: str, pairs: int, per_pair: int, timings: dict[str, _Timing]) -> list[Metric]:
    total = pairs * per_pair
    kernel_s, kernel_lat = timings["kernel"]
    base = {k: v for k, v in timings.items() if k != "kernel"}
    rows = [
        Metric(
            NAME,
            f"{shape}: round trips/s",
            "round trips/s",
            total / kernel_s,
            {k: total / s for k, (s, _) in base.items()},
            reference="raw trio",
        )
    ]
    for q, label in ((0.5, "p50"), (0.99, "p99"), (0.999, "p999")):
        goal = None
        if label == "p50" and shape == "1 pair":
            goal = Goal("<= 1.5x raw trio", "ratio", "<=", 1.5)
        rows.append(
            Metric(
                NAME,
                f"{shape}: {label} latency",
                "us",
                percentile(kernel_lat, q) * 1e6,
                {k: percentile(lat, q) * 1e6 for k, (_, lat) in base.items()},
                reference="raw trio",
                goal=goal,
                higher_is_better=False,
            )
        )
    return rows


def run(scale: Scale) -> ScenarioResult:
    metrics: list[Metric] = []
    counts: dict[str, int] = {}
    shapes = (
        ("1 pair", 1, scale.reqrep_round_trips),
        (f"{scale.reqrep_pairs:,} pairs", scale.reqrep_pairs, scale.reqrep_per_pair),
    )
    for shape, pairs, per_pair in shapes:
        raw = trio.run(raw_trio_pairs, pairs, per_pair)
        aio = asyncio.run(asyncio_pairs(pairs, per_pair))
        kernel, kcounts = trio.run(kernel_pairs, pairs, per_pair)
        n = pairs * per_pair
        check(len(raw[1]) == n, f"{shape}: raw trio completed {len(raw[1])} of {n} round trips")
        check(len(aio[1]) == n, f"{shape}: asyncio completed {len(aio[1])} of {n} round trips")
        check(len(kernel[1]) == n, f"{shape}: kernel completed {len(kernel[1])} of {n}")
        check(
            kcounts["handled"] == kcounts["requests"] == kcounts["replies_delivered"]
            and kcounts["accepted"] == 2 * kcounts["requests"]
            and kcounts["dead_lettered"] == 0
            and kcounts["in_flight"] == 0,
            f"{shape}: kernel counts do not add up: {kcounts}",
        )
        prefix = "pair" if pairs == 1 else "pairs"
        counts.update({f"{prefix}_{k}": v for k, v in kcounts.items()})
        counts[f"{prefix}_round_trips"] = n
        metrics.extend(
            _metrics(shape, pairs, per_pair, {"kernel": kernel, "raw trio": raw, "asyncio": aio})
        )
    return ScenarioResult(NAME, tuple(metrics), counts)
