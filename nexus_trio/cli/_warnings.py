"""The config load's warnings, logged by a command once its logging is set up.

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .._logcall import log_guarded

if TYPE_CHECKING:
    from ..config import LoadedConfig


def log_config_warnings(loaded: LoadedConfig) -> None:
    """The load's warnings (``load_config(..., log_warnings=False)``), logged on
    ``nexus_trio.config`` at WARNING once logging is set up, in the command's format:
    logged by the load itself, before, they reached standard error bare (Python's
    last-resort handler: no level, no time, not JSON under ``-f json``)."""
    for warning in loaded.warnings:
        log_guarded(logging.getLogger("nexus_trio.config"), logging.WARNING, "%s", warning)


def log_load(loaded: LoadedConfig) -> None:
    """Which config file the load read (:meth:`LoadedConfig.describe_source`, at INFO),
    then its warnings (:func:`log_config_warnings`): what ``nexus run`` says of its
    config once its logging is set up."""
    log_guarded(
        logging.getLogger("nexus_trio.config"), logging.INFO, "%s", loaded.describe_source()
    )
    log_config_warnings(loaded)
