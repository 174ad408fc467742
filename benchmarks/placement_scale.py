"""Placement at scale: N placed agents over three node processes, a fourth joining, rebalance.

    python benchmarks/placement_scale.py [--agents 10000] [--window 100] [--json]

One nats-server and three node processes (``tests/placement_node.py``: ``join_cluster``,
one ``counter`` type) on this machine. Measured (docs/distributed.md, "Placement at
scale"):

* **placing**: ``cluster.spawn`` of ``--agents`` names from node a, ``--window`` at a time;
* **names known**: after the last placement's answer, until every node knows every name;
* **join**: node d's ``join_cluster`` (both buckets replayed through their watches);
* **rebalance**: ``cluster.rebalance()`` on a, b and c one after the other once d is a
  live member everywhere: the agents moved (d's share) and the seconds each took;
  then every name is held once (the records held on the four nodes add up to N).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


async def measure(agents: int, window: int) -> dict[str, Any]:
    import trio

    from nexus_trio._nats import NatsServer
    from tests.placement_node import Node

    out: dict[str, Any] = {"agents": agents}
    with NatsServer() as server:
        nodes = [Node(server.url, name) for name in "abc"]
        a = nodes[0]
        try:
            async with trio.open_nursery() as starting:  # (each a process of its own)
                for node in nodes:
                    starting.start_soon(node.start)
            for node in nodes:
                await node.call("wait_live", count=len(nodes))
            placed = await a.call(
                "spawn_many", timeout=600, type="counter", prefix="c-", count=agents, window=window
            )
            out["placing_s"] = placed["seconds"]
            out["placing_failed"] = placed["failed"]
            started = time.perf_counter()
            for node in nodes:
                while True:  # the names bucket's watch, in another process: polled
                    if await node.call("known", prefix="c-", count=agents) == agents:
                        break
                    await trio.sleep(0.01)
            out["names_known_after_s"] = time.perf_counter() - started
            d = Node(server.url, "d")
            nodes.append(d)
            await d.start()
            out["join_s"] = await d.call("joined_in")
            out["d_knows"] = await d.call("known", prefix="c-", count=agents)
            for node in nodes:
                await node.call("wait_live", count=4)
            out["rebalance"] = []
            for node in nodes[:3]:
                started = time.perf_counter()
                moved = await node.call("rebalance", timeout=600)
                out["rebalance"].append((node.node, len(moved), time.perf_counter() - started))
            with trio.fail_after(60):
                while True:
                    held = [await node.call("held") for node in nodes]
                    if sum(held) == agents:
                        break
                    await trio.sleep(0.05)
            out["held"] = dict(zip("abcd", held, strict=True))
            return out
        finally:
            with trio.CancelScope(shield=True):
                await _stop_all(nodes)


async def _stop_all(nodes: list[Any]) -> None:
    """A clean leave of each node (a kill if it does not end in time)."""
    for node in nodes:
        await node.stop()


def main() -> None:
    import trio

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--agents", type=int, default=10000, help="placed agents")
    parser.add_argument("--window", type=int, default=100, help="placements at a time")
    args = parser.parse_args()
    r = trio.run(measure, args.agents, args.window)
    if args.json:
        print(json.dumps(r))
        return
    print(
        f"placing {r['agents']:,} agents: {r['placing_s']:.1f} s ({len(r['placing_failed'])}"
        f" failed); every node knows every name +{r['names_known_after_s']:.2f} s"
    )
    print(f"a fourth node joins: {r['join_s']:.1f} s (knows {r['d_knows']:,} names)")
    for node, moved, seconds in r["rebalance"]:
        print(f"rebalance() on {node}: {moved:,} moved in {seconds:.1f} s")
    print(f"records held per node: {r['held']}")


if __name__ == "__main__":
    main()
