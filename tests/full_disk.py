"""The kernel's JSON log on a full disk (``/dev/full``: every write fails with ENOSPC),
for the fault tests that count what such a log loses (use with the ``restore_logging``
fixture, which puts the logging configuration back)."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

import attrs
import pytest

from nexus_trio import LoggingConfig
from nexus_trio.logs import configure_logging, flush_logs, log_calls_failed, records_lost


@attrs.define
class Lost:
    """What the log lost within the block, known once it ended: records counted lost
    (``records_lost()``) and log calls that failed (``log_calls_failed()``)."""

    records: int = 0
    calls_failed: int = 0


@contextlib.contextmanager
def json_log_on_dev_full(**logging_options: Any) -> Iterator[Lost]:
    """The ``nexus_trio`` log as JSON at ``info`` to ``/dev/full`` for the block
    (``logging_options``: more of ``LoggingConfig``, e.g. ``queue=0``). Once the block ends
    without an error the log is flushed (it must be) and the result holds what was lost;
    the handlers added are removed however it ends, before their stream closes."""
    if not os.path.exists("/dev/full"):
        pytest.fail("this test needs /dev/full (Linux)")
    logger = logging.getLogger("nexus_trio")
    kept = list(logger.handlers)
    lost = Lost()
    with open("/dev/full", "w") as full:
        try:
            config = LoggingConfig(level="info", format="json", **logging_options)
            configure_logging(config, stream=full)
            records_before, failed_before = records_lost(), log_calls_failed()
            yield lost
            assert flush_logs()
            lost.records = records_lost() - records_before
            lost.calls_failed = log_calls_failed() - failed_before
        finally:
            for handler in [h for h in logger.handlers if h not in kept]:
                logger.removeHandler(handler)  # (before its stream closes)
                handler.close()
