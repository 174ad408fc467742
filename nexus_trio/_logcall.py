"""Log calls of the kernel that cannot fail the kernel.

The kernel logs on paths that must finish whatever happens: a dead letter is counted and
published, a restart scheduled, a shutdown completed, a child's stderr relayed. A log call
runs the application's filters and handlers, and one of those that raises (a filter with a
bug, a handler whose ``handleError`` re-raises) would otherwise break the kernel's
accounting or its shutdown. :func:`log_guarded` makes the call and keeps such an exception
out of the kernel: the first one is shown on standard error with its traceback, as
``logging`` shows a handler's error, and each is counted in :func:`log_calls_failed`
(once per process: a broken filter on the dead-letter logger would otherwise print a
traceback per dead letter).

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import traceback
from collections.abc import Mapping
from typing import Any, Final

__all__ = ["log_calls_failed", "log_guarded"]


class _Failures:
    """Log calls of the kernel that raised, in this process."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.count = 0

    def add(self, logger_name: str) -> None:
        with self.lock:
            self.count += 1
            first = self.count == 1
        if first and logging.raiseExceptions:
            _report(logger_name)


_FAILURES: Final = _Failures()


def _report(logger_name: str) -> None:
    """Show the exception being handled on standard error, if it can be written."""
    stream = sys.stderr
    if stream is None:  # standard error closed (``2>&-``)
        return
    with contextlib.suppress(Exception):  # the stream that would report it failed too
        stream.write(
            f"--- nexus_trio: a log call to {logger_name} raised (a filter or handler of the "
            "application); the kernel goes on, and such failures are counted in "
            "nexus_trio.logs.log_calls_failed(), this one shown only ---\n"
        )
        traceback.print_exc(file=stream)
        stream.flush()


def log_guarded(
    logger: logging.Logger | logging.LoggerAdapter[Any],
    level: int,
    msg: str,
    *args: object,
    exc_info: BaseException | None = None,
    extra: Mapping[str, object] | None = None,
) -> None:
    """``logger.log(level, msg, *args, exc_info=, extra=)``, raising nothing.

    The record carries the caller's file and line. An exception from the application's
    filters or handlers is counted in :func:`log_calls_failed` (and the first one shown
    on standard error); the kernel's work around the call goes on.
    """
    try:
        logger.log(level, msg, *args, exc_info=exc_info, extra=extra, stacklevel=2)
    except Exception:
        _FAILURES.add(logger.name)


def log_calls_failed() -> int:
    """How many log calls of the kernel raised in this process (a filter or handler of
    the application that raised on the record); the first is shown on standard error."""
    return _FAILURES.count
