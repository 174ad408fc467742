"""The kernel process's memory over thousands of restarts of one process agent (Linux).

    python benchmarks/restart_memory.py [--restarts 4000] [--every 1000] [--before-register]
                                        [--no-gc-freeze] [--tracemalloc]

Runs one kernel with one process agent whose child (``/bin/sh``: it starts in about a
millisecond) writes its ``register`` line and exits at once (``--before-register``: exits
without registering), restarted by the root supervisor with no backoff until it has been
restarted ``--restarts`` times. Every ``--every`` restarts it prints the kernel process's
RSS and anonymous memory (``/proc/self/status``, ``smaps_rollup``), the Python heap
(``tracemalloc``, with ``--tracemalloc``: it slows the run down), the objects the cycle
collector tracks and those frozen (``gc.freeze``), its young threshold, glibc's
``mallinfo2`` (arena bytes in use and free), open descriptors, threads and zombie
children (one that just exited shows until it is reaped); at the end, RSS after
``malloc_trim(0)``. See docs/bridges.md, "Memory over restarts", for the figures.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import logging
import os
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import trio

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from nexus_trio import Config, KernelConfig, SupervisionConfig, open_kernel  # noqa: E402
from nexus_trio.bridges import bridge_stats, process_agent  # noqa: E402
from nexus_trio.bridges._lineage import process_table  # noqa: E402

_REGISTER = (
    'printf \'{"type":"register","payload":{"id":"%s","name":"c","protocol":2}}\\n\' '
    '"$NEXUS_AGENT_ID"; exit 3'
)


_MALLINFO2_FIELDS = ("arena", "ordblks", "smblks", "hblks", "hblkhd")
_MALLINFO2_FIELDS += ("usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in _MALLINFO2_FIELDS]


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _Mallinfo2
    return libc


def _status_mb(path: str, key: str) -> float:
    with open(path) as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    return float("nan")


def _zombies() -> int:
    me = os.getpid()
    return sum(state == "Z" and parent == me for _, state, parent, _ in process_table())


def _row(libc: ctypes.CDLL, restarts: int, started: float) -> None:
    info = libc.mallinfo2()
    heap = tracemalloc.get_traced_memory()[0] / 2**20 if tracemalloc.is_tracing() else None
    print(
        f"{restarts:7d} {time.monotonic() - started:7.1f}s"
        f" rss {_status_mb('/proc/self/status', 'VmRSS:'):5.1f} MB"
        f" anon {_status_mb('/proc/self/smaps_rollup', 'Anonymous:'):5.1f} MB"
        + (f" py-heap {heap:5.1f} MB" if heap is not None else "")
        + f" tracked {len(gc.get_objects()):7d} frozen {gc.get_freeze_count():6d}"
        f" young-threshold {gc.get_threshold()[0]:6d}"
        f" malloc used {info.uordblks / 2**20:4.1f} free {info.fordblks / 2**20:4.1f} MB"
        f" fds {len(os.listdir('/proc/self/fd')):3d} threads {threading.active_count()}"
        f" zombies {_zombies()}",
        flush=True,
    )


async def _main(args: argparse.Namespace) -> None:
    libc = _libc()
    script = "exit 3" if args.before_register else _REGISTER
    config = Config(
        kernel=KernelConfig(gc_freeze=not args.no_gc_freeze),
        supervision=SupervisionConfig(
            max_restarts=10 * args.restarts + 10, backoff_initial_ms=0, backoff_max_ms=0
        ),
    )
    started = time.monotonic()
    async with open_kernel(config) as kernel:
        ref = kernel.spawn(process_agent(["/bin/sh", "-c", script], name="c"))
        _row(libc, 0, started)
        shown = 0
        while shown < args.restarts:
            await trio.sleep(0.02)
            stats = bridge_stats(kernel).get(ref.id)
            restarts = stats.restarts if stats is not None else 0
            if restarts >= shown + args.every:
                shown = restarts - restarts % args.every
                _row(libc, restarts, started)
    libc.malloc_trim(0)
    print(f"after malloc_trim(0): rss {_status_mb('/proc/self/status', 'VmRSS:'):.1f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--restarts", type=int, default=4000)
    parser.add_argument("--every", type=int, default=1000)
    parser.add_argument("--before-register", action="store_true")
    parser.add_argument("--no-gc-freeze", action="store_true")
    parser.add_argument("--tracemalloc", action="store_true")
    args = parser.parse_args()
    if not sys.platform.startswith("linux"):
        parser.error("Linux only: it reads /proc and calls glibc")
    if args.restarts < 1 or args.every < 1:
        parser.error("--restarts and --every must be at least 1")
    logging.disable(logging.CRITICAL)  # a warning per crash is not what is measured
    if args.tracemalloc:
        tracemalloc.start()
    trio.run(_main, args)


if __name__ == "__main__":
    main()
