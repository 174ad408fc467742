"""Python opcodes per fan-out message, kernel and asyncio, by function: a count that does
not move with the machine's load.

    python benchmarks/fanout_opcodes.py [--side kernel|asyncio|both] [--short 80000]
                                        [--long 160000] [--agents 1000] [--top 25]

Runs the goal's own fan-out functions (``nexus_trio.bench._fanout``: ``kernel_fanout``, and
``asyncio_fanout``, the original post's script) under ``sys.settrace`` with
``f_trace_opcodes``, once with ``--short`` and once with ``--long`` messages after an
untraced warm-up run, and prints the difference divided by the difference in messages:
what one more message costs, sent and handled, without the fixed cost of spawning,
activating and stopping the agents. Both lengths are past the 65,536 messages after which
the kernel samples one handled message in 64 for latency instead of one in eight, so the
kernel's figure is the one a million-message run pays. Opcodes are not time (an opcode
may be a dict lookup or an allocation), but two runs of the same code give the same count,
on a quiet machine or a loaded one; the tracer makes a run about 20 times slower.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nexus_trio.bench import _fanout

Counts = collections.Counter[str]


def _where(frame: FrameType) -> str:
    code = frame.f_code
    path = code.co_filename
    for marker in ("site-packages/", "/nexus_trio/", "/lib/python"):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker == "/nexus_trio/":
                path = "nexus_trio/" + path
            break
    return f"{path}:{code.co_firstlineno} {code.co_name}"


def _traced(run: Callable[[], Any]) -> Counts:
    counts: Counts = collections.Counter()

    def on_call(frame: FrameType, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        frame.f_trace_lines = False
        key = _where(frame)

        def on_opcode(frame: FrameType, event: str, arg: Any) -> Any:
            if event == "opcode":
                counts[key] += 1
            return on_opcode

        return on_opcode

    sys.settrace(on_call)
    try:
        run()
    finally:
        sys.settrace(None)
    return counts


def _run(side: str, agents: int, messages: int) -> Callable[[], Any]:
    if side == "kernel":
        return lambda: trio.run(_fanout.kernel_fanout, agents, messages)
    return lambda: asyncio.run(_fanout.asyncio_fanout(agents, messages))


def per_message(side: str, agents: int, short: int, long: int) -> dict[str, float]:
    """Opcodes per message by function: (run of ``long`` - run of ``short``) / difference."""
    _run(side, agents, 20_000)()  # warm-up, untraced
    a = _traced(_run(side, agents, short))
    b = _traced(_run(side, agents, long))
    span = long - short
    return {key: (b[key] - a[key]) / span for key in a.keys() | b.keys()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", choices=("kernel", "asyncio", "both"), default="both")
    parser.add_argument("--agents", type=int, default=1_000)
    parser.add_argument("--short", type=int, default=80_000)
    parser.add_argument("--long", type=int, default=160_000)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    if not 0 < args.short < args.long:
        parser.error("--short must be a positive number of messages below --long")
    sides = ("kernel", "asyncio") if args.side == "both" else (args.side,)
    for side in sides:
        costs = per_message(side, args.agents, args.short, args.long)
        print(f"{side}: {sum(costs.values()):.1f} opcodes per message")
        ranked = sorted(costs.items(), key=lambda item: -abs(item[1]))
        for key, value in ranked[: args.top]:
            if abs(value) >= 0.05:
                print(f"  {value:8.2f}  {key}")


if __name__ == "__main__":
    main()
