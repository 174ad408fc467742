"""Cross-kernel traffic through NATS vs raw nats-py, measured in one run on loopback.

    python benchmarks/bench_nats.py [--requests 2000] [--tells 20000] [--rounds 3] [--json]

Starts a private nats-server (JetStream on, 127.0.0.1, a port it picks), one responder
process per side, and measures from this process as the client, the two sides taking
turns for ``--rounds`` rounds (each figure is the median over the rounds; an idle
responder costs nothing while the other side runs):

* **raw**: nats-py in pure asyncio. The responder subscribes ``bench.echo`` (replies with
  the payload) and ``bench.sink`` (counts). The client times ``nc.request`` one at a
  time, then publishes ``--tells`` messages and waits until the responder counted them.
* **nexus**: two kernels joined with :func:`join_cluster`. The responder kernel hosts
  agents ``echo`` (returns the payload) and ``sink`` (counts); the client kernel times
  ``kernel.request("echo", ...)`` one at a time, then ``kernel.send("sink", ...)``
  ``--tells`` times (the transport's credit per destination node, ``node_window``, is
  what slows the sender down to what the sink can take: tells travel in node batches),
  and waits until the sink counted them.

``--workers 2`` against one process is measured by ``benchmarks/bench_workers.py``
(``--workers N`` runs one swarm whose traffic crosses the workers).

Payloads are the same small JSON object on both sides (the kernel adds its envelope).
Prints p50/p99 request latency, tell throughput (``send``, and ``send_nowait``), and
nexus/raw ratios; for nexus also the CPU time a tell of each process (the client's and
the responder's ``time.process_time``, all threads, over each tell phase and its polls
for the count: ``client_cpu_us_per_tell``, ``responder_cpu_us_per_tell``, and
``..._nowait``), which moves less with the machine's load than a rate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from responder_process import ResponderProcess  # noqa: E402  (beside this script)

PAYLOAD = {"task": "resize", "n": 0, "args": [1, 2, 3]}


def _quantile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --- raw nats-py (asyncio) ------------------------------------------------------------------


async def _raw_responder(url: str) -> None:
    import nats

    nc = await nats.connect(url)
    count = 0

    async def echo(msg: Any) -> None:
        await msg.respond(msg.data)

    async def sink(msg: Any) -> None:
        nonlocal count
        count += 1

    async def counter(msg: Any) -> None:
        await msg.respond(str(count).encode())

    await nc.subscribe("bench.echo", cb=echo)
    await nc.subscribe("bench.sink", cb=sink, pending_msgs_limit=1_000_000)
    await nc.subscribe("bench.count", cb=counter)
    # twice: nats-py 2.16's flush writes its PING ahead of the SUBs still in its buffer, so
    # only the second PONG says the server has them (see _direct.flush_after_subscribe)
    await nc.flush()
    await nc.flush()
    print("READY", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await nc.close()


async def _raw_client(url: str, requests: int, tells: int) -> dict[str, float]:
    import nats

    nc = await nats.connect(url)
    body = json.dumps(PAYLOAD).encode()
    for _ in range(200):  # warm up
        await nc.request("bench.echo", body, timeout=5)
    samples = []
    for _ in range(requests):
        t0 = time.perf_counter()
        await nc.request("bench.echo", body, timeout=5)
        samples.append(time.perf_counter() - t0)
    base = int((await nc.request("bench.count", b"", timeout=5)).data)
    t0 = time.perf_counter()
    for _ in range(tells):
        await nc.publish("bench.sink", body)
    await nc.flush()
    deadline = time.monotonic() + 120
    while True:  # until the responder counted them all
        counted = int((await nc.request("bench.count", b"", timeout=5)).data) - base
        if counted >= tells or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.001)
    elapsed = time.perf_counter() - t0
    if counted < tells:
        raise RuntimeError(f"raw: only {counted} of {tells} tells arrived")
    await nc.close()
    return _summary(samples, tells, elapsed)


def _median_of(results: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in results) for key in results[0]}


def _summary(samples: list[float], tells: int, elapsed: float) -> dict[str, float]:
    return {
        "req_p50_us": _quantile(samples, 0.50) * 1e6,
        "req_p99_us": _quantile(samples, 0.99) * 1e6,
        "req_mean_us": statistics.fmean(samples) * 1e6,
        "tell_per_s": tells / elapsed,
    }


# --- nexus_trio kernels ---------------------------------------------------------------------


def _kernel_config() -> Any:
    from nexus_trio import Config, KernelConfig

    return Config(kernel=KernelConfig(mailbox_capacity=4096, request_timeout_ms=5000))


async def _nexus_responder(url: str) -> None:
    import trio

    from nexus_trio import agent, open_kernel
    from nexus_trio._nats import join_cluster

    count = 0

    @agent(name="echo")
    async def echo(ctx: Any, msg: Any) -> Any:
        return msg.payload

    @agent(name="sink")
    async def sink(ctx: Any, msg: Any) -> Any:
        nonlocal count
        if msg.payload == "count":
            return count
        if msg.payload == "cpu":  # this process's CPU seconds so far (all its threads)
            return time.process_time()
        count += 1
        return None

    async with open_kernel(_kernel_config()) as kernel:
        kernel.spawn(echo)
        kernel.spawn(sink)
        async with join_cluster(kernel, url, "responder") as cluster:
            await cluster.names_published()
            print("READY", flush=True)
            await trio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)
            await kernel.shutdown()


async def _nexus_client(url: str, requests: int, tells: int) -> dict[str, float]:
    import trio

    from nexus_trio import MailboxFull, open_kernel
    from nexus_trio._nats import join_cluster

    result: dict[str, float] = {}
    async with (
        open_kernel(_kernel_config()) as kernel,
        join_cluster(kernel, url, "client") as cluster,
    ):
        await cluster.wait_for_name("echo")
        await cluster.wait_for_name("sink")
        for _ in range(200):
            await kernel.request("echo", PAYLOAD)
        samples = []
        for _ in range(requests):
            t0 = time.perf_counter()
            await kernel.request("echo", PAYLOAD)
            samples.append(time.perf_counter() - t0)

        async def tell_rate(nowait: bool) -> float:
            # The transport's credit per destination node (``node_window`` tells not yet
            # consumed there) is the backpressure: ``send`` waits for it; ``send_nowait``
            # raises MailboxFull when the window is full, and the producer then waits
            # with ``send`` (what a producer that must lose nothing does).
            base = await kernel.request("sink", "count")
            cpu_there = await kernel.request("sink", "cpu")
            cpu_here = time.process_time()
            t0 = time.perf_counter()
            for _ in range(tells):
                if nowait:
                    try:
                        kernel.send_nowait("sink", PAYLOAD)
                    except MailboxFull:
                        await kernel.send("sink", PAYLOAD)
                else:
                    await kernel.send("sink", PAYLOAD)
            deadline = time.monotonic() + 120
            while True:  # until the sink counted them all
                counted = await kernel.request("sink", "count") - base
                if counted >= tells or time.monotonic() > deadline:
                    break
                await trio.sleep(0.001)
            if counted < tells:
                raise RuntimeError(f"nexus: only {counted} tells of {tells} arrived")
            rate = tells / (time.perf_counter() - t0)
            # CPU a tell of each process (the polls for the count included: a few ms)
            key = "_nowait" if nowait else ""
            result[f"client_cpu_us_per_tell{key}"] = (time.process_time() - cpu_here) / tells * 1e6
            cpu = await kernel.request("sink", "cpu") - cpu_there
            result[f"responder_cpu_us_per_tell{key}"] = cpu / tells * 1e6
            return rate

        result.update(_summary(samples, tells, 1.0))
        result["tell_per_s"] = await tell_rate(nowait=False)
        result["tell_nowait_per_s"] = await tell_rate(nowait=True)
        stats = cluster.stats()
        result["outbox_batches"] = stats.outbox_batches
        result["outbox_direct"] = stats.outbox_direct
        result["inbox_wakeups"] = stats.inbox_wakeups
        await kernel.shutdown()
    return result


# --- driver --------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--tells", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (median)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--serve", choices=["raw", "nexus"], help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve == "raw":
        asyncio.run(_raw_responder(args.url))
        return
    if args.serve == "nexus":
        import trio

        trio.run(_nexus_responder, args.url)
        return

    import trio

    from nexus_trio._nats import NatsServer

    rounds: list[tuple[dict[str, float], dict[str, float]]] = []
    with NatsServer() as server:
        # Both responders wait idle while the other side is measured; the rounds
        # alternate so that a change in the machine's load hits both sides alike.
        raw_responder = ResponderProcess(__file__, "raw", server.url)
        try:
            nexus_responder = ResponderProcess(__file__, "nexus", server.url)
            try:
                for _ in range(args.rounds):
                    raw_round = asyncio.run(_raw_client(server.url, args.requests, args.tells))
                    nexus_round = trio.run(_nexus_client, server.url, args.requests, args.tells)
                    rounds.append((raw_round, nexus_round))
            finally:
                nexus_responder.close()
        finally:
            raw_responder.close()
    raw = _median_of([r for r, _ in rounds])
    nexus = _median_of([n for _, n in rounds])
    ratios = {
        "req_p50_ratio": nexus["req_p50_us"] / raw["req_p50_us"],
        "req_p99_ratio": nexus["req_p99_us"] / raw["req_p99_us"],
        "tell_throughput_ratio": nexus["tell_per_s"] / raw["tell_per_s"],
        "tell_nowait_throughput_ratio": nexus["tell_nowait_per_s"] / raw["tell_per_s"],
    }
    if args.json:
        print(json.dumps({"raw": raw, "nexus": nexus, "ratios": ratios}))
        return
    print(
        f"cross-process over NATS on loopback ({args.requests} requests, {args.tells} tells;"
        f" median of {args.rounds} alternating rounds)"
    )
    print(f"{'':10}{'req p50':>12}{'req p99':>12}{'tells/s':>12}")
    for label, r in (("raw nats", raw), ("nexus", nexus)):
        print(
            f"{label:10}{r['req_p50_us']:>10.0f}us{r['req_p99_us']:>10.0f}us"
            f"{r['tell_per_s']:>12,.0f}"
        )
    print(f"nexus tells with send_nowait: {nexus['tell_nowait_per_s']:,.0f}/s")
    print(
        f"ratios nexus/raw: req p50 {ratios['req_p50_ratio']:.2f}x,"
        f" p99 {ratios['req_p99_ratio']:.2f}x, tell throughput"
        f" {ratios['tell_throughput_ratio']:.2f}x (goals: req p50 <= 1.3x; tells >= 1.5x,"
        " at least 0.7x)"
    )


if __name__ == "__main__":
    main()
