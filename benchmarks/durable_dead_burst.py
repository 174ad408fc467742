"""How many log lines a burst of durable messages dying at once writes, on a real server.

    python benchmarks/durable_dead_burst.py [--messages 10000]

Starts a private nats-server (JetStream, 127.0.0.1), joins one node with
``DurableOptions(max_deliver=1)``, stores ``--messages`` durable messages for an agent
whose handler raises every time (all at once, as a burst), and waits until every one is
counted dead (``durable_dead``). Prints the lines (and their bytes) the durable path's
logger (``nexus_trio.nats.durable``) wrote, at the leave included; the core's handler
failure lines (``nexus_trio.agent``, its own per-second budget) apart; the node's CPU
seconds (user + system) from the first store to the last death; and the counters.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import trio  # noqa: E402

from nexus_trio import Context, Message, agent, open_kernel  # noqa: E402
from nexus_trio._nats import ClusterOptions, DurableOptions, NatsServer, join_cluster  # noqa: E402
from nexus_trio._nats._aio import call_aio  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))
from durable_waiting import store_burst  # noqa: E402


class _Count(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines = 0
        self.bytes = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.lines += 1
        self.bytes += len(record.getMessage()) + 1


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def one_round(messages: int) -> dict[str, Any]:
    durable_log, agent_log = _Count(), _Count()
    logging.getLogger("nexus_trio.nats.durable").addHandler(durable_log)
    logging.getLogger("nexus_trio.agent").addHandler(agent_log)
    logging.getLogger("nexus_trio").setLevel(logging.WARNING)
    logging.getLogger("nexus_trio").propagate = False
    server = NatsServer().start()

    @agent(name="fails")
    async def fails(ctx: Context, msg: Message) -> Any:
        raise RuntimeError("never handled")

    out: dict[str, Any] = {}
    try:
        options = ClusterOptions(durable=DurableOptions(max_deliver=1))
        async with open_kernel() as kernel:
            async with join_cluster(kernel, server.url, "a", options=options) as cluster:
                kernel.spawn(fails)
                cpu0, start = _own_cpu(), time.monotonic()
                for first in range(0, messages, 500):
                    await call_aio(
                        store_burst, cluster, range(first, min(first + 500, messages)), "fails"
                    )
                with trio.fail_after(600):
                    # (the counters signal no event: polled)
                    while cluster.stats().durable_dead < messages:  # noqa: ASYNC110
                        await trio.sleep(0.05)
                out["burst_s"] = round(time.monotonic() - start, 2)
                out["node_cpu_s"] = round(_own_cpu() - cpu0, 2)
                out["durable_dead"] = cluster.stats().durable_dead
                await kernel.shutdown()
        out["durable_log_lines"] = durable_log.lines
        out["durable_log_bytes"] = durable_log.bytes
        out["agent_log_lines"] = agent_log.lines
    finally:
        server.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=10_000)
    args = parser.parse_args()
    print(json.dumps(trio.run(one_round, args.messages)))


if __name__ == "__main__":
    main()
