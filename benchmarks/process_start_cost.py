"""What one start and exit of a process agent's child costs the kernel process and the
child, in CPU time (Linux): the cost the limits wrapper (``prlimit(1)``, forty-eighth
pass) adds to a start.

    python benchmarks/process_start_cost.py [--starts 300] [--child sh|python]

One kernel, one process agent whose child writes its ``register`` line and exits at once
(``sh``: ``/bin/sh -c printf ...``, about a millisecond; ``python``: this interpreter
with ``-c``), restarted by the root supervisor with no backoff until it has started
``--starts`` times. Prints per start: the kernel process's CPU time (all its threads,
``time.process_time``), its reaped children's (``RUSAGE_CHILDREN``: the children, the
wrapper's exec in them included), their sum, and the wall time. Run it alternately
against two trees with ``PYTHONPATH`` (the script imports whichever ``nexus_trio`` is
first on the path).
"""

from __future__ import annotations

import argparse
import logging
import resource
import sys
import time

import trio

from nexus_trio import Config, KernelConfig, SupervisionConfig, open_kernel
from nexus_trio.bridges import bridge_stats, process_agent

_REGISTER = (
    'printf \'{"type":"register","payload":{"id":"%s","name":"c","protocol":2}}\\n\' '
    '"$NEXUS_AGENT_ID"; exit 3'
)
_PYTHON = (
    "import json, os; print(json.dumps({'type': 'register', 'payload': {'id':"
    " os.environ['NEXUS_AGENT_ID'], 'name': 'c', 'protocol': 2}}), flush=True); os._exit(3)"
)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


async def _main(args: argparse.Namespace) -> None:
    config = Config(
        kernel=KernelConfig(),
        supervision=SupervisionConfig(
            max_restarts=10 * args.starts + 10, backoff_initial_ms=0, backoff_max_ms=0
        ),
    )
    cmd = (
        ["/bin/sh", "-c", _REGISTER]
        if args.child == "sh"
        else [sys.executable, "-I", "-S", "-c", _PYTHON]
    )
    async with open_kernel(config) as kernel:
        ref = kernel.spawn(process_agent(cmd, name="c"))
        while True:  # (the first start: the guardian and the wrapper's lookup are not counted)
            stats = bridge_stats(kernel).get(ref.id)
            if stats is not None and stats.starts >= 2:
                break
            await trio.sleep(0.02)
        first = stats.starts
        cpu, children, wall = time.process_time(), _children_cpu(), time.monotonic()
        while True:
            await trio.sleep(0.02)
            stats = bridge_stats(kernel).get(ref.id)
            if stats is not None and stats.starts >= first + args.starts:
                break
        starts = stats.starts - first
        cpu = time.process_time() - cpu
        children = _children_cpu() - children
        wall = time.monotonic() - wall
        await kernel.stop(ref)
    per = 1e3 / starts
    print(
        f"{starts} starts: kernel {cpu * per:.3f} ms, children {children * per:.3f} ms,"
        f" sum {(cpu + children) * per:.3f} ms, wall {wall * per:.3f} ms a start"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--starts", type=int, default=300)
    parser.add_argument("--child", choices=("sh", "python"), default="sh")
    args = parser.parse_args()
    if not sys.platform.startswith("linux"):
        parser.error("Linux only")
    if args.starts < 1:
        parser.error("--starts must be at least 1")
    logging.disable(logging.CRITICAL)  # a warning per crash is not what is measured
    trio.run(_main, args)


if __name__ == "__main__":
    main()
