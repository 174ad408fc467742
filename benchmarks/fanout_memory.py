"""Where the fan-out's page faults come from: the goal's fan-out (one producer, ``await
kernel.send(ref, i)`` round-robin to no-op agents, against the original post's asyncio
script) split into its two phases, with the minor page faults and the CPU time of each.

    python benchmarks/fanout_memory.py [--rounds 3] [--messages 1000000] [--agents 1000]
    python benchmarks/fanout_memory.py --side kernel|asyncio [--sites]
    python benchmarks/fanout_memory.py --side kernel --cold --wakes --agents 100000

Without ``--side``, runs each side ``--rounds`` times, alternating, each in a fresh process
(a process keeps some of what a run freed, which would hide a later run's faults), and
prints every run and the medians. The asyncio side is the goal's own function; the
kernel's agents (and asyncio's consumer tasks) are started and parked before the first
send, as in the goal; ``send`` is the producer's loop, which never yields while every
mailbox has room (``handled`` during it is printed: 0 means every message was queued at
once), ``drain`` the agents handling them all. Faults and CPU time are ``getrusage``'s,
which do not move much with the machine's load; wall time does. Each phase also prints
the collections of each generation that ran in it (``gc.callbacks``).

``--cold`` (kernel side): the agents are not started before the clock; each starts on its
first message inside the send phase, as in the goal's "100,000 agents vs 1,000" row.
``--wakes`` (kernel side): count the task steps Trio runs in each phase (an instrument,
one more Python call per step, so the CPU time is not the same run's): how many times the
agents were woken, and so how many messages each wake-up took.

``--sites``: the send phase under ``tracemalloc`` instead, the bytes it left allocated per
message by the line that allocated them (what the queued messages are made of; pymalloc
rounds each block up to a multiple of 16 bytes and maps it in 1 MiB arenas, touched one
4 KiB page at a time).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import resource
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
import trio.testing

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nexus_trio import Config, KernelConfig, open_kernel
from nexus_trio.bench._fanout import _noop, asyncio_fanout

Mark = tuple[int, float, float]

#: collections started so far, by generation
_COLLECTIONS = [0, 0, 0]


def _count_collection(phase: str, info: dict[str, int]) -> None:
    if phase == "start":
        _COLLECTIONS[info["generation"]] += 1


class _Steps(trio.abc.Instrument):
    """Counts the task steps Trio runs (``--wakes``)."""

    def __init__(self) -> None:
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += 1


def _mark() -> Mark:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_minflt, usage.ru_utime + usage.ru_stime, usage.ru_stime


class _Phases:
    """The marks of one run: before the first send, after the last, after the drain."""

    def __init__(self, sites: bool) -> None:
        self.sites = sites
        self.marks: list[Mark] = []
        self.handled_while_sending = -1
        self.snapshot: tracemalloc.Snapshot | None = None
        self.collections: list[list[int]] = []
        self.steps: _Steps | None = None
        self.step_counts: list[int] = []

    def __call__(self, phase: str, handled: int) -> None:
        if phase == "start" and self.sites:
            tracemalloc.start()
        self.marks.append(_mark())
        self.collections.append(list(_COLLECTIONS))
        if self.steps is not None:
            self.step_counts.append(self.steps.steps)
        if phase == "sent":
            self.handled_while_sending = handled
            if self.sites:
                self.snapshot = tracemalloc.take_snapshot()
                tracemalloc.stop()


async def kernel_phases(
    agents: int,
    messages: int,
    phase: Callable[[str, int], object],
    cold: bool = False,
    steps: trio.abc.Instrument | None = None,
) -> None:
    """The kernel's fan-out, ``phase`` called as ``asyncio_fanout`` calls it (also for
    ``fanout_drain.py``); ``cold``: the agents start on their first message inside the
    send phase; ``steps``: an instrument added at the start of the send phase."""
    async with open_kernel(Config(kernel=KernelConfig(mailbox_capacity=1024))) as kernel:
        refs = [kernel.spawn(_noop) for _ in range(agents)]
        warm = 0 if cold else agents
        if not cold:
            for ref in refs:
                kernel.send_nowait(ref, None)
        await trio.testing.wait_all_tasks_blocked()
        send = kernel.send
        if steps is not None:
            trio.lowlevel.add_instrument(steps)
        phase("start", 0)
        for i in range(messages):
            await send(refs[i % agents], i)
        phase("sent", kernel.stats().handled - warm)
        await trio.testing.wait_all_tasks_blocked()
        handled = kernel.stats().handled - warm
        phase("handled", handled)
        if handled != messages:
            raise SystemExit(f"kernel handled {handled} of {messages}")


def run_side(
    side: str, agents: int, messages: int, sites: bool, cold: bool = False, wakes: bool = False
) -> str:
    phases = _Phases(sites)
    if wakes:
        phases.steps = _Steps()
    gc.callbacks.append(_count_collection)
    if side == "kernel":
        trio.run(kernel_phases, agents, messages, phases, cold, phases.steps)
    else:
        asyncio.run(asyncio_fanout(agents, messages, phase=phases))
    gc.callbacks.remove(_count_collection)
    if phases.snapshot is not None:
        lines = []
        for stat in phases.snapshot.statistics("lineno")[:6]:
            frame = stat.traceback[0]
            where = f"{Path(frame.filename).name}:{frame.lineno}"
            lines.append(
                f"  {stat.size / messages:7.1f} B/msg in {stat.count / messages:5.3f} "
                f"blocks/msg  {where}"
            )
        return f"{side}: bytes left allocated by the send phase\n" + "\n".join(lines)
    (f0, c0, s0), (f1, c1, s1), (f2, c2, s2) = phases.marks
    g0, g1, g2 = phases.collections
    collected = [
        "collections " + "/".join(str(b - a) for a, b in zip(before, after, strict=True))
        for before, after in ((g0, g1), (g1, g2))
    ]
    if phases.step_counts:
        t0, t1, t2 = phases.step_counts
        collected[0] += f", {t1 - t0} task steps"
        collected[1] += f", {t2 - t1} task steps (the producer's included)"
    return (
        f"{side} send {f1 - f0} faults {c1 - c0:.3f} s cpu ({s1 - s0:.3f} sys), "
        f"handled meanwhile {phases.handled_while_sending}, {collected[0]}; "
        f"drain {f2 - f1} faults {c2 - c1:.3f} s cpu ({s2 - s1:.3f} sys), {collected[1]}; "
        f"total {f2 - f0} faults {c2 - c0:.3f} s cpu"
    )


def _alternate(args: argparse.Namespace) -> None:
    faults: dict[str, list[int]] = {"kernel": [], "asyncio": []}
    cpu: dict[str, list[float]] = {"kernel": [], "asyncio": []}
    for _ in range(args.rounds):
        for side in ("asyncio", "kernel"):
            command = [sys.executable, __file__, "--side", side]
            command += ["--agents", str(args.agents), "--messages", str(args.messages)]
            line = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            print(line.strip(), flush=True)
            total = line.split("total ", 1)[1].split()
            faults[side].append(int(total[0]))
            cpu[side].append(float(total[2]))
    median: Callable[[list[Any]], Any] = statistics.median
    for side in ("asyncio", "kernel"):
        print(
            f"median {side}: {median(faults[side]) / args.messages * 4096:.0f} bytes "
            f"faulted in per message ({median(faults[side])} faults), "
            f"{median(cpu[side]):.3f} s cpu"
        )


def parse_sizes(
    parser: argparse.ArgumentParser, argv: list[str], rounds: int
) -> argparse.Namespace:
    """``argv`` parsed with ``--agents``, ``--messages`` and ``--rounds`` added to ``parser``
    (also for ``fanout_drain.py``), each checked to be at least 1."""
    parser.add_argument("--agents", type=int, default=1_000)
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=rounds)
    args = parser.parse_args(argv)
    if min(args.agents, args.messages, args.rounds) < 1:
        parser.error("--agents, --messages and --rounds must be at least 1")
    return args


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", choices=("kernel", "asyncio"))
    parser.add_argument("--sites", action="store_true")
    parser.add_argument("--cold", action="store_true")
    parser.add_argument("--wakes", action="store_true")
    args = parse_sizes(parser, argv, rounds=3)
    if (args.cold or args.wakes) and args.side != "kernel":
        parser.error("--cold and --wakes need --side kernel")
    if args.side is None:
        _alternate(args)
    else:
        started = time.perf_counter()
        print(run_side(args.side, args.agents, args.messages, args.sites, args.cold, args.wakes))
        if args.sites:
            print(f"  ({time.perf_counter() - started:.1f} s)")


if __name__ == "__main__":
    main(sys.argv[1:])
