"""What a spawn costs by what is spawned: an agent class, a plain handler, an ``@agent`` spec.

    python benchmarks/spawn_by_class.py [--what class|handler|spec] [--spawns 100000] [--named]

Spawns ``--spawns`` agents of one kind in one kernel (``kernel.spawn(Idle)``, an ``Agent``
subclass; ``kernel.spawn(idle)``, an ``async def``; ``kernel.spawn(agent(idle))``; with
``--named``, each under a name of the spawn, ``name=f"a{i}"``, made beforehand) and
prints the CPU (``time.process_time``) a spawn, and the spawn rate of the goals' row (wall
clock from the first spawn to ``wait_all_tasks_blocked``). Imports the ``nexus_trio`` of
the tree it sits in: copy it into another tree to compare (run the two alternately).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import trio
import trio.testing

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nexus_trio import Agent, Config, Context, KernelConfig, Message, agent, open_kernel


class Idle(Agent):
    async def handle(self, ctx: Context, msg: Message) -> None:
        return None


async def idle(ctx: Context, msg: Message) -> None:
    return None


async def _run(what: str, spawns: int, named: bool) -> tuple[float, float]:
    target: Any = {"class": Idle, "handler": idle, "spec": agent(idle)}[what]
    async with open_kernel(Config(kernel=KernelConfig(mailbox_capacity=1024))) as kernel:
        spawn = kernel.spawn
        spawn(target)  # (the first spawn of a class checks it: not the rate of the rest)
        names = [f"a{i}" for i in range(spawns)] if named else None
        c0 = time.process_time()
        t0 = time.perf_counter()
        if names is None:
            refs = [spawn(target) for _ in range(spawns)]
        else:
            refs = [spawn(target, name=name) for name in names]
        await trio.testing.wait_all_tasks_blocked()
        wall = time.perf_counter() - t0
        cpu = time.process_time() - c0
        del refs
    return cpu, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--what", choices=("class", "handler", "spec"), default="class")
    parser.add_argument("--spawns", type=int, default=100_000)
    parser.add_argument("--named", action="store_true", help="spawn each under a name")
    args = parser.parse_args()
    cpu, wall = trio.run(_run, args.what, args.spawns, args.named)
    print(
        f"{args.what}{' named' if args.named else ''}: {cpu / args.spawns * 1e6:.2f} us CPU a spawn,"
        f" {args.spawns / wall:,.0f} spawns/s (wall)"
    )


if __name__ == "__main__":
    main()
