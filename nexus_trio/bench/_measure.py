"""Measuring: RSS, CPU time and page faults, collections, percentiles, quiet kernel logs
while timing.

RSS is read from ``/proc/self/statm`` (resident pages times the page size), which is
cheap enough to sample while a scenario runs; where there is no ``/proc`` the peak RSS
from ``getrusage`` stands in.

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import resource
import sys
import time
from collections.abc import Callable, Iterator, Sequence

import trio

from ._result import Usage

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """The resident set size of this process, in bytes."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def usage_now() -> Usage:
    """This process's user and system CPU time and minor page faults so far (``getrusage``);
    subtract two of them for a phase's share."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return Usage(r.ru_utime, r.ru_stime, r.ru_minflt)


def collections_now() -> tuple[int, int, int]:
    """The cycle collector's collections so far in this process, by generation (young,
    middle, full: ``gc.get_stats()``); subtract two of them with
    :func:`collections_since` for a phase's."""
    young, middle, full = (int(stats["collections"]) for stats in gc.get_stats())
    return young, middle, full


def collections_since(start: tuple[int, int, int]) -> list[int]:
    """The collections by generation since ``start`` (a :func:`collections_now`), as a
    list (the JSON a measurement prints)."""
    return [now - then for now, then in zip(collections_now(), start, strict=True)]


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) by nearest rank; ``values`` need not be sorted."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@contextlib.contextmanager
def quiet_kernel_logs() -> Iterator[None]:
    """Keep kernel log records (handler failures in the churn scenario, a bridge's start
    and exit) off the terminal, where they would bury the progress bar and the table.

    Records are still created, as in production; they are just not printed. The handlers
    already on the ``nexus_trio`` logger are set aside meanwhile: the first kernel a run
    opens installs the default one (``install_default_logging``), and a record reaching
    it would be printed beside the ``NullHandler`` (30 tracebacks of the churn scenario
    under ``nexus bench --smoke``).
    """
    logger = logging.getLogger("nexus_trio")
    saved_handlers, saved_propagate = logger.handlers[:], logger.propagate
    for handler in saved_handlers:
        logger.removeHandler(handler)
    quiet = logging.NullHandler()
    logger.addHandler(quiet)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(quiet)
        for handler in saved_handlers:
            logger.addHandler(handler)
        logger.propagate = saved_propagate


async def wait_until(done: Callable[[], bool], interval: float = 0.002) -> None:
    """Poll ``done`` (e.g. ``lambda: kernel.stats().handled >= n``) until it is true.

    Scenarios watch the kernel from outside through its public stats, as a user would;
    signalling from inside the handlers would add work to every message measured. A
    ``stats()`` snapshot is not free (it walks every agent and computes quantiles), so
    the pause between polls is at least 20 times what the last poll cost: polling
    takes under 5% of the time it watches.
    """
    clock = time.perf_counter
    while True:
        start = clock()
        if done():
            return
        await trio.sleep(max(interval, 20 * (clock() - start)))
