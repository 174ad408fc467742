"""What ``DurableOptions.max_waiting`` messages waiting for a missing name cost, on a real server.

    python benchmarks/durable_waiting.py [--messages 10000] [--missing 10] [--rounds 1]

Starts a private nats-server (JetStream, 127.0.0.1), joins one node with the default
``DurableOptions`` (``max_waiting`` 10,000, ``max_in_flight`` 64), stores ``--messages``
durable messages for a name no agent has (as a sender whose view still had it does),
lets them wait ``--missing`` seconds (each nakked with the growing delay, 1, 2, 4, 8 s,
and delivered again), then spawns the agent and waits until every one is handled.
Meanwhile, with all of them waiting, it times one message to an agent that is there.

Prints, per round: the server's resident memory (VmRSS) before storing, once stored, and
once all wait; this process's (the node's) resident memory; CPU seconds (user + system)
of the server and of this process during the wait and during the drain; the wall time
of the live agent's message, and of the drain; and the node's counters.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import trio  # noqa: E402

from nexus_trio import Context, Message, agent, open_kernel  # noqa: E402
from nexus_trio._nats import NatsServer, join_cluster  # noqa: E402
from nexus_trio._nats import _wire as wire  # noqa: E402
from nexus_trio._nats._aio import call_aio  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def _server_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def _rss_mib(pid: int | str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def store_burst(cluster: Any, payloads: range, to: str = "back") -> None:
    """Store a durable message for the name ``to`` per payload, as a sender whose view
    still had it does, all at once (run on the asyncio loop)."""
    sends = []
    for n in payloads:
        msg = Message(sender=uuid.uuid4(), to=to, payload=n)
        sends.append(
            cluster.data_js.publish(
                wire.durable_subject(cluster.prefix, cluster.node, uuid.uuid4()),
                wire.encode_message(msg),
                headers={wire.MSG_ID_HEADER: str(msg.id)},
            )
        )
    await asyncio.gather(*sends)


def _missing_or_refused(cluster: Any) -> int:
    """Deliveries that found no agent: each waits, or is terminated past max_waiting."""
    stats = cluster.stats()
    return int(stats.durable_agent_missing + stats.durable_wait_full)


async def _until(check: Any, timeout: float = 300.0) -> None:
    # (the node's counters signal no event: polled, as the tests' ``until`` does)
    with trio.fail_after(timeout):
        while not check():  # noqa: ASYNC110
            await trio.sleep(0.05)


async def one_round(messages: int, missing: float) -> dict[str, Any]:
    server = NatsServer().start()
    handled: list[int] = []
    live: list[float] = []
    try:
        pid = server.pid

        @agent(name="back")
        async def back(ctx: Context, msg: Message) -> Any:
            handled.append(msg.payload)
            return "ok"

        @agent(name="there")
        async def there(ctx: Context, msg: Message) -> Any:
            live.append(time.monotonic())
            return "ok"

        out: dict[str, Any] = {}
        async with open_kernel() as kernel, join_cluster(kernel, server.url, "a") as cluster:
            kernel.spawn(there)
            out["server_rss_start_mib"] = _rss_mib(pid)
            out["node_rss_start_mib"] = _rss_mib("self")
            start = time.monotonic()
            for first in range(0, messages, 500):
                await call_aio(store_burst, cluster, range(first, min(first + 500, messages)))
            out["store_s"] = round(time.monotonic() - start, 2)
            out["server_rss_stored_mib"] = _rss_mib(pid)
            cpu0, scpu0 = _own_cpu(), _server_cpu(pid)
            await _until(lambda: _missing_or_refused(cluster) >= messages)
            waiting = await call_aio(
                cluster.data_js.consumer_info, f"{cluster.prefix}-durable", cluster.node
            )
            out["ack_pending_waiting"] = waiting.num_ack_pending
            out["max_ack_pending"] = waiting.config.max_ack_pending
            sent = time.monotonic()
            await cluster.send_durable("there", "live")
            await _until(lambda: bool(live))
            out["live_message_s"] = round(live[0] - sent, 3)
            await trio.sleep(missing)
            out["server_rss_waiting_mib"] = _rss_mib(pid)
            out["node_rss_waiting_mib"] = _rss_mib("self")
            out["node_cpu_wait_s"] = round(_own_cpu() - cpu0, 2)
            out["server_cpu_wait_s"] = round(_server_cpu(pid) - scpu0, 2)
            cpu0, scpu0, start = _own_cpu(), _server_cpu(pid), time.monotonic()
            kernel.spawn(back)
            await _until(
                lambda: cluster.stats().durable_acked + cluster.stats().durable_dead >= messages + 1
            )
            out["drain_s"] = round(time.monotonic() - start, 2)
            out["node_cpu_drain_s"] = round(_own_cpu() - cpu0, 2)
            out["server_cpu_drain_s"] = round(_server_cpu(pid) - scpu0, 2)
            out.update(counters(cluster))
            out["handled"] = len(handled)
            out["handled_distinct"] = len(set(handled))
            await kernel.shutdown()
        return out
    finally:
        server.stop()


def counters(cluster: Any, prefix: str = "") -> dict[str, int]:
    """The node's durable counters of a round (``prefix`` before each key)."""
    stats = cluster.stats()
    keys = ("agent_missing", "wait_full", "dead", "acked")
    return {f"{prefix}{key}": getattr(stats, f"durable_{key}") for key in keys}


def print_rounds(rounds: int, one: Any, *args: Any) -> None:
    """Run ``one(*args)`` ``rounds`` times, each printed as a line of JSON."""
    for _ in range(rounds):
        print(json.dumps(trio.run(one, *args)), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--missing", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    print_rounds(args.rounds, one_round, args.messages, args.missing)


if __name__ == "__main__":
    main()
