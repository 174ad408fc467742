"""One swarm over ``nexus run --workers 2`` vs one process, and what a SIGKILLed worker loses.

    python benchmarks/bench_workers.py [--duration 5] [--agents 1000] [--json]
    python benchmarks/bench_workers.py --hop [--rounds 4] [--duration 3] [--json]

Measured in one run on this machine:

* **ring**: the demo ring (``--agents`` agents, every hop a message) in one process vs
  ``nexus run --workers 2``, where agent ``k`` runs on worker ``k mod 2``: *every* hop
  crosses between the two processes through NATS. The figure is hops per second: the
  messages handled by agents over the run (added up over the workers), not ``msgs_per_s``,
  which counts a crossing message twice (forwarded by one worker, handled by the other).
* **fanout**: the demo fan-out in one process vs ``--workers 2``, where worker 0 sends to
  all agents: half of them are on worker 1, so half of the traffic crosses.
* **sigkill**: three kernels in three processes (``tests/placement_node.py``) place 24
  agents by rendezvous hashing; one node streams 20,000 tells to the agents of a second
  node, which is SIGKILLed after 500 of them were acknowledged. Every tell accepted by the
  sender must end acknowledged as handled (each handled tell is acknowledged back) or
  counted as lost (``lost_with_nodes`` + ``lost_in_transit`` + refused on arrival):
  ``unaccounted`` must be 0; ``counted_twice`` is how much the count over-states (what the
  killed node handled after its last heartbeat).
* **hop** (``--hop``, on its own): the time of one hop with one token each way, which no
  queue of other tokens hides: a ring of two agents over ``--workers 2`` (every hop
  crosses; two tokens in flight, so a hop is 2 / the handled rate) and in one process,
  against its floor on this machine, raw nats-py between two processes through a
  nats-server of their own (publish, echo, receive: one-way time of a round trip),
  alternating ``--rounds`` times so that the machine's load moves both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _handled_per_s(summary: dict[str, Any]) -> float:
    workers = summary.get("per_worker") or [summary]
    run = max(w["elapsed_s"]["run"] for w in workers)
    handled = sum(w["handled"] + w["replies_delivered"] for w in workers)
    return float(handled / run) if run > 0 else 0.0


def _run_summary(workers: int, demo: list[str], duration: float) -> dict[str, Any]:
    """The JSON summary of ``nexus run DEMO`` in one process (``workers`` 1) or over
    ``--workers N``; a failed swarm raises, naming its workload and error."""
    from nexus_trio.cli._cluster_cmd import run_workers

    if workers == 1:
        out = subprocess.run(
            [sys.executable, "-m", "nexus_trio.cli", "run", *demo, "--json", "--no-live"],
            check=True,
            capture_output=True,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
            timeout=duration * 10 + 120,
        ).stdout
        return dict(json.loads(out))
    summary, status = run_workers(workers, demo)
    if status != 0:
        raise RuntimeError(f"--workers {workers} {' '.join(demo)} failed: {summary.get('error')}")
    return summary


def compare(workload: str, agents: int, duration: float) -> dict[str, Any]:
    """One process vs ``--workers 2``: handled messages per second, and the ratio."""
    demo = ["--agents", str(agents), "--duration", f"{duration:g}", "--workload", workload]
    single = _run_summary(1, demo, duration)
    swarm = _run_summary(2, demo, duration)
    one, two = _handled_per_s(single), _handled_per_s(swarm)
    return {
        "one_process_per_s": one,
        "two_workers_per_s": two,
        "ratio": two / one if one else 0.0,
        "crossed": swarm["forwarded_in"],
        "handled": swarm["handled"],
        "conserved": swarm["conserved"],
    }


def _ring_hop_us(workers: int, duration: float) -> float:
    """Microseconds a hop of the demo ring of two agents (two tokens in flight)."""
    demo = ["--agents", "2", "--duration", f"{duration:g}", "--workload", "ring"]
    per_s = _handled_per_s(_run_summary(workers, demo, duration))
    if per_s <= 0:  # (was a ZeroDivisionError)
        raise RuntimeError(f"the ring of two over {workers} process(es) handled no message")
    return 2e6 / per_s


async def _echo(url: str) -> None:
    """The raw nats-py floor's other process: publish back every message on "ping"."""
    import asyncio

    import nats

    nc = await nats.connect(url)

    async def back(msg: Any) -> None:
        await nc.publish("pong", msg.data)

    await nc.subscribe("ping", cb=back)
    # twice: nats-py 2.16's flush writes its PING ahead of the SUBs still in its buffer, so
    # only the second PONG says the server has them (see _direct.flush_after_subscribe)
    await nc.flush()
    await nc.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()


async def _raw_hop_us(url: str, duration: float) -> float:
    """One-way microseconds of a raw nats-py round trip through ``url`` to _echo."""
    import asyncio
    import time

    import nats

    echo = subprocess.Popen(
        [sys.executable, __file__, "--echo", url], stdout=subprocess.PIPE, text=True
    )
    try:
        assert echo.stdout is not None
        if echo.stdout.readline().strip() != "ready":
            raise RuntimeError("the raw nats-py echo process did not start")
        nc = await nats.connect(url)
        got: asyncio.Queue[bytes] = asyncio.Queue()

        async def pong(msg: Any) -> None:
            got.put_nowait(msg.data)

        await nc.subscribe("pong", cb=pong)
        await nc.flush()
        payload = b"x" * 100
        count, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < duration:
            await nc.publish("ping", payload)
            await asyncio.wait_for(got.get(), 30)
            count += 1
        await nc.close()
        return elapsed / count / 2 * 1e6
    finally:
        echo.kill()
        echo.wait()


def hop(rounds: int, duration: float) -> dict[str, Any]:
    """One hop with one token each way: the ring of two over two workers, in one process,
    and raw nats-py's floor, alternating (see the module doc)."""
    import asyncio
    import statistics

    from nexus_trio._nats import NatsServer

    runs: dict[str, list[float]] = {"two_workers_us": [], "one_process_us": [], "raw_nats_us": []}
    for _ in range(rounds):
        runs["two_workers_us"].append(_ring_hop_us(2, duration))
        runs["one_process_us"].append(_ring_hop_us(1, duration))
        with NatsServer() as server:
            runs["raw_nats_us"].append(asyncio.run(_raw_hop_us(server.url, duration)))
    # (the median of the rounds as written: of the unrounded ones it could lie outside
    # them, 20.2167 over two rounds written 20.2 and 20.2)
    shown = {k: [round(x, 1) for x in v] for k, v in runs.items()}
    medians = {f"median_{k}": statistics.median(v) for k, v in shown.items()}
    return {**shown, **medians}


async def sigkill() -> dict[str, Any]:
    """Three nodes, one SIGKILLed mid-stream: every accepted tell handled or counted."""
    import trio

    from nexus_trio._nats import NatsServer
    from nexus_trio._nats._placement import rendezvous_owner
    from tests.placement_node import Node

    with NatsServer() as server:
        nodes = [Node(server.url, name) for name in ("a", "b", "c")]
        try:
            for node in nodes:
                await node.start()
            for node in nodes:
                await node.call("wait_live", count=3)
            a, b, c = nodes
            names = [f"counter-{i}" for i in range(24)]
            for name in names:
                await a.call("spawn", type="counter", name=name)
            on_c = [n for n in names if rendezvous_owner(n, ["a", "b", "c"]) == "c"]
            stream = await a.call("stream", to=on_c, count=20000, batch=50, pause=0.005)
            with trio.fail_after(60):
                while True:  # the acknowledgements are counted in another process
                    if await a.call("acks") >= 500:
                        break
                    await trio.sleep(0.05)
            c.kill()
            result = await a.call("stream_result", stream=stream, timeout=120)
            counts: dict[str, int] = {}
            with trio.move_on_after(30):
                while True:  # the last acknowledgements may still be on their way
                    stats = [await n.call("stats") for n in (a, b)]
                    counts["acked"] = await a.call("acks")
                    counts["lost"] = sum(
                        s["lost_with_nodes"]
                        + s["lost_in_transit"]
                        + sum(s["inbound_dropped"].values())
                        for s in stats
                    )
                    if counts["acked"] + counts["lost"] >= result["accepted"]:
                        break
                    await trio.sleep(0.1)
            accepted = result["accepted"]
            return {
                "accepted": accepted,
                "refused_at_send": result["refused"],
                "acknowledged_handled": counts["acked"],
                "counted_lost": counts["lost"],
                "unaccounted": max(0, accepted - counts["acked"] - counts["lost"]),
                "counted_twice": max(0, counts["acked"] + counts["lost"] - accepted),
                "replaced": sum(s["replaced"] for s in stats),
            }
        finally:
            with trio.CancelScope(shield=True):
                for node in nodes:
                    node.kill() if node.node == "c" else None
                    await node.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=None, help="seconds a run (5; --hop: 3)")
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--hop", action="store_true", help="only the one-token hop (see above)")
    parser.add_argument("--rounds", type=int, default=4, help="--hop: alternating rounds")
    parser.add_argument("--echo", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo:
        import asyncio

        asyncio.run(_echo(args.echo))
        return
    if args.hop:
        h = hop(args.rounds, args.duration or 3.0)
        if args.json:
            print(json.dumps({"hop": h}))
            return
        for key, label in (
            ("two_workers_us", "ring of 2 over --workers 2"),
            ("one_process_us", "ring of 2 in one process"),
            ("raw_nats_us", "raw nats-py, one way"),
        ):
            each = " / ".join(f"{x:,.0f}" for x in h[key])
            print(f"{label:28} {h['median_' + key]:>8,.1f} us a hop (median; {each})")
        return
    import trio

    results = {
        "ring": compare("ring", args.agents, args.duration or 5.0),
        "fanout": compare("fanout", args.agents, args.duration or 5.0),
        "sigkill": trio.run(sigkill),
    }
    if args.json:
        print(json.dumps(results))
        return
    for workload, goal in (("ring", 1.0), ("fanout", 1.3)):
        r = results[workload]
        print(
            f"{workload:7} one process {r['one_process_per_s']:>10,.0f}/s   --workers 2"
            f" {r['two_workers_per_s']:>10,.0f}/s   {r['ratio']:.2f}x (goal >= {goal}x);"
            f" {r['crossed']:,} of {r['handled']:,} crossed, books balance: {r['conserved']}"
        )
    k = results["sigkill"]
    print(
        f"sigkill: {k['accepted']:,} tells accepted, {k['acknowledged_handled']:,} handled,"
        f" {k['counted_lost']:,} counted lost, {k['unaccounted']} unaccounted (goal 0),"
        f" {k['counted_twice']:,} counted twice; {k['replaced']} agents re-placed"
    )


if __name__ == "__main__":
    main()
