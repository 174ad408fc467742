"""What a flood of handler failures costs: log lines written and CPU seconds.

    python benchmarks/failure_flood.py [--agents 1000] [--each 10] [--rounds 1]

Opens a kernel at its default limits, the ``nexus_trio`` log as JSON to ``/dev/null``
(every line formatted and written, as to a file), spawns ``--agents`` agents whose
handler raises every time, and sends each ``--each`` messages at once, ``--rounds``
times. Prints one JSON line: the lines the agent and dead-letter loggers wrote, the
failures counted, and the CPU seconds (user + system, ``time.process_time``) from the
first send to the last failure counted. ``--agents 1 --each 1000 --rounds 100`` is the
path of a failure whose line is held back (the agent's budget spent): what a failure costs with
no line (``--frozen-clock``: all in one second, the same lines each run). Run it from the copy of the repository to measure (it puts that copy first on
the path); alternate two copies in pairs, as the load of the machine moves.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import trio  # noqa: E402
import trio.testing  # noqa: E402

from nexus_trio import Context, LoggingConfig, Message, agent, open_kernel  # noqa: E402
from nexus_trio.logs import configure_logging, flush_logs  # noqa: E402


class _Count(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.lines += 1


@agent(on_error="resume")
async def failing(ctx: Context, msg: Message) -> None:
    raise ValueError(msg.payload)


async def main(agents: int, each: int, rounds: int) -> dict[str, object]:
    counted = _Count()
    for name in ("nexus_trio.agent", "nexus_trio.dead_letters"):
        logging.getLogger(name).addHandler(counted)
    async with open_kernel() as kernel:
        names = [f"w{n:05}" for n in range(agents)]
        for name in names:
            kernel.spawn(failing, name=name)
        await trio.testing.wait_all_tasks_blocked()
        total = agents * each * rounds
        started = time.process_time()
        for _ in range(rounds):
            for _ in range(each):
                for name in names:
                    kernel.send_nowait(name, 0)
            # (each round drained before the next: a mailbox holds 1,024)
            await trio.testing.wait_all_tasks_blocked()
        cpu = time.process_time() - started
        stats = kernel.stats()
    return {
        "agents": agents,
        "each": each,
        "rounds": rounds,
        "failed": stats.failed,
        "lines": counted.lines,
        "failure_lines_not_logged": stats.failure_lines_not_logged,
        "cpu_s": round(cpu, 4),
        "us_per_failure": round(cpu / total * 1e6, 3),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--each", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument(
        "--frozen-clock",
        action="store_true",
        help="a MockClock that stands still: every failure in the same second, so the lines"
        " written do not move with the machine's speed (the held-back path alone)",
    )
    args = parser.parse_args()
    with open("/dev/null", "w") as sink:
        configure_logging(LoggingConfig(level="info", format="json"), stream=sink)
        clock = trio.testing.MockClock() if args.frozen_clock else None
        result = trio.run(main, args.agents, args.each, args.rounds, clock=clock)
        flush_logs()
    print(json.dumps(result))
