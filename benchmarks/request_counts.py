"""What one local request/reply round trip costs, counted against raw Trio's (a channel
plus a reply channel, ``_reqrep.raw_trio_pairs``' shape): counts that do not move with
the machine's load.

    python benchmarks/request_counts.py count [--trips 2000]
    python benchmarks/request_counts.py loop kernel|raw TRIPS

``count``: per round trip, Trio's task steps by task and its I/O waits (a Trio
instrument), and the Python instructions by function (``opcode_count.py``'s counter;
the instrument's own functions are counted too, the same on both sides).

``loop``: ``TRIPS`` back-to-back round trips and nothing else, to run under cachegrind
twice (e.g. 2,000 and 8,000) and take the difference over the extra trips (the start,
imports and shutdown cancel out)::

    PYTHONHASHSEED=0 valgrind --tool=cachegrind --cache-sim=yes --branch-sim=yes \\
        python benchmarks/request_counts.py loop kernel 8000

Trio's scheduler is seeded (``trio._core._run._r.seed(0)``) so that both runs take the
same scheduling choices.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path
from typing import Any

import trio

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from opcode_count import InstructionCounter, by_code  # noqa: E402  (beside this script)

from nexus_trio import open_kernel  # noqa: E402
from nexus_trio.bench._reqrep import _echo  # noqa: E402

#: warm-up round trips before anything is counted
WARM = 50


class _Steps(trio.abc.Instrument):
    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.counts["step:" + task.name.rsplit(".", 1)[-1][:50]] += 1

    def before_io_wait(self, timeout: float) -> None:
        self.counts["io_wait"] += 1


async def _kernel_trips(trips: int, counter: InstructionCounter | None, steps: Any) -> None:
    async with open_kernel() as kernel:
        ref = kernel.spawn(_echo)
        for i in range(WARM if counter else 0):
            await kernel.request(ref, i)
        if counter:
            trio.lowlevel.add_instrument(steps)
            counter.start()
        for i in range(trips):
            await kernel.request(ref, i)
        if counter:
            counter.stop()
            trio.lowlevel.remove_instrument(steps)


async def _raw_trips(trips: int, counter: InstructionCounter | None, steps: Any) -> None:
    send, receive = trio.open_memory_channel[tuple[int, Any]](1024)
    reply_send, reply_receive = trio.open_memory_channel[int](1)

    async def server() -> None:
        async for payload, reply in receive:
            reply.send_nowait(payload)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server)
        for i in range(WARM if counter else 0):
            send.send_nowait((i, reply_send))
            await reply_receive.receive()
        if counter:
            trio.lowlevel.add_instrument(steps)
            counter.start()
        for i in range(trips):
            send.send_nowait((i, reply_send))
            await reply_receive.receive()
        if counter:
            counter.stop()
            trio.lowlevel.remove_instrument(steps)
        nursery.cancel_scope.cancel()


_SIDES = {"raw": _raw_trips, "kernel": _kernel_trips}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    count = sub.add_parser("count")
    count.add_argument("--trips", type=int, default=2000)
    loop = sub.add_parser("loop")
    loop.add_argument("side", choices=sorted(_SIDES))
    loop.add_argument("trips", type=int)
    args = parser.parse_args()
    trio._core._run._r.seed(0)
    if args.mode == "loop":
        trio.run(_SIDES[args.side], args.trips, None, None)
        return
    n = args.trips
    for side, trips in _SIDES.items():
        counter = InstructionCounter()
        steps = _Steps()
        trio.run(trips, n, counter, steps)
        total = by_code(counter.hits)
        print(f"== {side}: {sum(total.values()) / n:.1f} Python instructions a round trip")
        for key, value in sorted(steps.counts.items()):
            print(f"   {key}: {value / n:.3f} a round trip")
        for code, hits in total.most_common():
            if hits / n < 0.5:
                break
            where = f"{Path(code.co_filename).name}:{code.co_firstlineno}"
            print(f"   {hits / n:7.1f} {code.co_name} ({where})")


if __name__ == "__main__":
    main()
