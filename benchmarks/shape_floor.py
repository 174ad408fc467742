"""What the promised shape costs per agent before the kernel adds anything.

    python benchmarks/shape_floor.py [--agents 100000] [--rounds 1] [--json]

Issue 11 promises one memory channel and one child nursery per running agent; its goals
compare the kernel against a *raw trio task + channel* (no nursery, no cancel scope).
This script measures, in a fresh process each, what a hand-written trio program pays for
N agents that each handle one message:

* ``task+channel``: the goals' baseline, one task per agent waiting on ``receive()``;
* ``shape``: the same task opening its own nursery and one cancel scope around the loop
  (the least a run of the promised shape holds: the kernel's run has exactly these two
  scopes, see ``nexus_trio/_cell.py``);
* ``shape, collector off``: the same with ``gc.disable()`` (the kernel keeps its long-lived
  structures away from the collector with ``gc.freeze()``, see ``nexus_trio/_gc.py``).

Each figure: seconds to start N tasks and have each handle one message (tasks started
as the messages arrive, as the kernel's lazy start does), RSS per agent afterwards, and
seconds to cancel them all. Compare with the kernel's ``deliver_s`` / RSS / shutdown in
``python benchmarks/run.py -s goals`` (or ``python -m nexus_trio.bench._scale_child
lifecycle N``).
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio
import trio.testing

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from nexus_trio.bench._measure import rss_bytes  # noqa: E402

KINDS = ("task+channel", "shape", "shape, collector off")


async def _measure(kind: str, n: int) -> dict[str, Any]:
    handled = 0

    async def plain(receive: trio.MemoryReceiveChannel[Any]) -> None:
        nonlocal handled
        while True:
            await receive.receive()
            handled += 1

    async def shaped(receive: trio.MemoryReceiveChannel[Any]) -> None:
        nonlocal handled
        async with trio.open_nursery():
            with trio.CancelScope():
                while True:
                    await receive.receive()
                    handled += 1

    body = plain if kind == "task+channel" else shaped
    if kind == "shape, collector off":
        gc.disable()
    gc.collect()
    rss0 = rss_bytes()
    async with trio.open_nursery() as nursery:
        start = time.perf_counter()
        for _ in range(n):
            send, receive = trio.open_memory_channel[Any](1024)
            nursery.start_soon(body, receive)
            send.send_nowait(None)
        while handled < n:
            await trio.testing.wait_all_tasks_blocked()
        deliver_s = time.perf_counter() - start
        rss_per_agent = (rss_bytes() - rss0) / n
        t1 = time.perf_counter()
        nursery.cancel_scope.cancel()
    shutdown_s = time.perf_counter() - t1
    return {
        "kind": kind,
        "n": n,
        "deliver_s": deliver_s,
        "rss_per_agent": rss_per_agent,
        "shutdown_s": shutdown_s,
        "handled": handled,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.agents < 1 or args.rounds < 1:
        parser.error("--agents and --rounds must be at least 1")
    if args.child:
        print(json.dumps(trio.run(_measure, args.child, args.agents)))
        return 0
    results = []
    for _ in range(args.rounds):
        for kind in KINDS:
            out = subprocess.run(
                [sys.executable, __file__, "--child", kind, "--agents", str(args.agents)],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            result = json.loads(out)
            results.append(result)
            if not args.json:
                print(
                    f"{kind:22} {result['n']:>9,} agents: start + one message each "
                    f"{result['deliver_s']:7.2f} s, {result['rss_per_agent']:6,.0f} B/agent, "
                    f"shutdown {result['shutdown_s']:6.2f} s",
                    flush=True,
                )
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
