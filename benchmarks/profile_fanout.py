"""The kernel side of the fan-out scenario alone, for a profiler.

    py-spy record -o docs/img/flamegraph-fanout.svg -- python benchmarks/profile_fanout.py

Arguments: ``[MESSAGES [AGENTS]]`` (default 1,000,000 to 1,000 agents).
"""

from __future__ import annotations

import sys

import trio

from nexus_trio.bench._fanout import kernel_fanout


def main(argv: list[str]) -> None:
    messages = int(argv[0]) if argv else 1_000_000
    agents = int(argv[1]) if len(argv) > 1 else 1_000
    elapsed, counts = trio.run(kernel_fanout, agents, messages)
    print(f"{messages / elapsed:,.0f} msg/s; {counts}")


if __name__ == "__main__":
    main(sys.argv[1:])
