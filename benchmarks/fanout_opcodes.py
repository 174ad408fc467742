"""Python opcodes per fan-out message, kernel, asyncio and raw trio, by function: a count
that does not move with the machine's load.

    python benchmarks/fanout_opcodes.py [--side kernel|asyncio|trio|both|all] [--short 80000]
                                        [--long 160000] [--agents 1000] [--top 25]
                                        [--cpu ROUNDS] [--messages 1000000]

Runs the goal's own fan-out functions (``nexus_trio.bench._fanout``: ``kernel_fanout``,
``asyncio_fanout``, the original post's script, and ``trio_fanout``, the raw trio row's
channels) under an instruction counter (``opcode_count``: ``sys.monitoring`` on Python
3.12+, ``sys.settrace`` with ``f_trace_opcodes`` on 3.11), once with ``--short`` and once with ``--long`` messages after an
untraced warm-up run, and prints the difference divided by the difference in messages:
what one more message costs, sent and handled, without the fixed cost of spawning,
activating and stopping the agents. Both lengths are past the 65,536 messages after which
the kernel samples one handled message in 64 for latency instead of one in eight, so the
kernel's figure is the one a million-message run pays. Opcodes are not time (an opcode
may be a dict lookup or an allocation), but two runs of the same code give the same count,
on a quiet machine or a loaded one; the tracer makes a run about 20 times slower.

``--cpu ROUNDS``: then runs each side's ``--messages`` fan-out untraced ``ROUNDS`` times,
the sides alternated, each in a fresh process, and prints the CPU time of each run
(``getrusage``, the whole ``trio.run`` / ``asyncio.run``: spawns and start included, a
few milliseconds), the median per message and the median divided by the side's opcodes
per message: what an opcode of that side costs on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import resource
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import CodeType
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nexus_trio.bench import _fanout

sys.path.insert(0, str(Path(__file__).resolve().parent))

from opcode_count import InstructionCounter, by_code

Counts = collections.Counter[str]


def _where(code: CodeType) -> str:
    path = code.co_filename
    for marker in ("site-packages/", "/nexus_trio/", "/lib/python"):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker == "/nexus_trio/":
                path = "nexus_trio/" + path
            break
    return f"{path}:{code.co_firstlineno} {code.co_name}"


def _traced(run: Callable[[], Any]) -> Counts:
    with InstructionCounter() as counter:
        run()
    counts: Counts = collections.Counter()
    for code, n in by_code(counter.hits).items():
        counts[_where(code)] += n
    return counts


def _run(side: str, agents: int, messages: int) -> Callable[[], Any]:
    if side == "kernel":
        return lambda: trio.run(_fanout.kernel_fanout, agents, messages)
    if side == "trio":
        return lambda: trio.run(_fanout.trio_fanout, agents, messages)
    return lambda: asyncio.run(_fanout.asyncio_fanout(agents, messages))


def _cpu(side: str, agents: int, messages: int) -> float:
    """CPU seconds of one untraced fan-out (user + system, ``getrusage``)."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    _run(side, agents, messages)()
    after = resource.getrusage(resource.RUSAGE_SELF)
    return after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def _cpu_rounds(
    sides: tuple[str, ...], agents: int, messages: int, rounds: int
) -> dict[str, float]:
    """Median CPU seconds a message of each side, fresh processes, sides alternated."""
    runs: dict[str, list[float]] = {side: [] for side in sides}
    for _ in range(rounds):
        for side in sides:
            command = [sys.executable, __file__, "--cpu-run", side]
            command += ["--agents", str(agents), "--messages", str(messages)]
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            runs[side].append(float(out))
    for side in sides:
        print(f"{side}: cpu {', '.join(f'{s:.3f}' for s in runs[side])} s")
    return {side: statistics.median(runs[side]) / messages for side in sides}


def per_message(side: str, agents: int, short: int, long: int) -> dict[str, float]:
    """Opcodes per message by function: (run of ``long`` - run of ``short``) / difference."""
    _run(side, agents, 20_000)()  # warm-up, untraced
    a = _traced(_run(side, agents, short))
    b = _traced(_run(side, agents, long))
    span = long - short
    return {key: (b[key] - a[key]) / span for key in a.keys() | b.keys()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--side", choices=("kernel", "asyncio", "trio", "both", "all"), default="both"
    )
    parser.add_argument("--agents", type=int, default=1_000)
    parser.add_argument("--short", type=int, default=80_000)
    parser.add_argument("--long", type=int, default=160_000)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--cpu", type=int, default=0, metavar="ROUNDS")
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--cpu-run", choices=("kernel", "asyncio", "trio"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cpu_run is not None:
        print(_cpu(args.cpu_run, args.agents, args.messages))
        return
    if not 0 < args.short < args.long:
        parser.error("--short must be a positive number of messages below --long")
    if args.cpu < 0 or args.messages < 1:
        parser.error("--cpu must be 0 or more, --messages at least 1")
    sides = {"both": ("kernel", "asyncio"), "all": ("kernel", "asyncio", "trio")}.get(
        args.side, (args.side,)
    )
    opcodes = {}
    for side in sides:
        costs = per_message(side, args.agents, args.short, args.long)
        opcodes[side] = sum(costs.values())
        print(f"{side}: {opcodes[side]:.1f} opcodes per message")
        ranked = sorted(costs.items(), key=lambda item: -abs(item[1]))
        for key, value in ranked[: args.top]:
            if abs(value) >= 0.05:
                print(f"  {value:8.2f}  {key}")
    if args.cpu:
        cpu = _cpu_rounds(sides, args.agents, args.messages, args.cpu)
        for side in sides:
            print(
                f"{side}: {cpu[side] * 1e9:.0f} ns cpu a message (median), "
                f"{cpu[side] * 1e9 / opcodes[side]:.2f} ns an opcode"
            )


if __name__ == "__main__":
    main()
