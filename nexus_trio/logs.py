"""Structured logs through the standard :mod:`logging` module.

The kernel logs to loggers under ``nexus_trio`` (``nexus_trio.kernel``,
``nexus_trio.agent``, ``nexus_trio.dead_letters``, ...) and puts what a record is about
in its attributes: ``agent_id`` and ``agent_name`` for an agent (``ctx.log`` adds them
for you), ``msg_id`` and ``trace_id`` for a message. :func:`configure_logging` installs
one handler on the ``nexus_trio`` logger that renders those attributes in one of three
formats: ``compact`` (one line of text with ``key=value`` pairs), ``json`` (one object per
line, for log collectors) or ``pretty`` (rich, for people at a terminal). Handlers you
install yourself are left alone and keep receiving the records.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

from ._config import LoggingConfig

__all__ = ["CompactFormatter", "JsonFormatter", "configure_logging", "level_number"]

LOGGER_NAME = "nexus_trio"

# Marks the handler configure_logging installed, so that a second call replaces it.
_MARK = "_nexus_trio_handler"

_LEVELS = {
    "trace": logging.DEBUG,  # the original's most verbose level; logging has none below DEBUG
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = frozenset(vars(logging.LogRecord("", logging.INFO, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}

# The fields that say what a record is about come first, in this order.
_CONTEXT = ("agent_id", "agent_name", "msg_id", "trace_id")


def level_number(level: str) -> int:
    """The :mod:`logging` level of a ``[logging] level`` name (``"warn"`` -> ``WARNING``)."""
    try:
        return _LEVELS[level.lower()]
    except KeyError:
        raise ValueError(
            f"[logging] level must be one of {', '.join(_LEVELS)}, got {level!r}"
        ) from None


def _timestamp(record: logging.LogRecord) -> str:
    # UTC, millisecond precision, formatted only when a record is actually emitted.
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{seconds}.{int(record.msecs):03d}Z"


def _extras(record: logging.LogRecord) -> list[tuple[str, Any]]:
    """The ``extra=`` attributes of a record, context fields first; empty ones left out."""
    attributes = vars(record)
    pairs = [(key, attributes[key]) for key in _CONTEXT if key in attributes]
    pairs.extend(
        (key, value)
        for key, value in attributes.items()
        if key not in _STANDARD and key not in _CONTEXT and not key.startswith("_")
    )
    return [(key, value) for key, value in pairs if value is not None and value != ""]


def _text(value: Any) -> str:
    text = str(value)
    if not text or any(c.isspace() or c in "\"'=" for c in text):
        return json.dumps(text, ensure_ascii=False)
    return text


class CompactFormatter(logging.Formatter):
    """One line per record: ``time level logger message key=value ...``.

    A traceback, when the record has one, follows on the next lines.
    """

    def format(self, record: logging.LogRecord) -> str:
        parts = [_timestamp(record), f"{record.levelname:<8}", record.name, record.getMessage()]
        parts.extend(f"{key}={_text(value)}" for key, value in _extras(record))
        line = " ".join(parts)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line = f"{line}\n{record.exc_text}"
        if record.stack_info:
            line = f"{line}\n{self.formatStack(record.stack_info)}"
        return line


def _json_value(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_json_value(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _json_value(item) for key, item in value.items()}
    return str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per line.

    Keys: ``ts`` (UTC, ISO 8601), ``level`` (lower case), ``logger``, ``msg``, then
    ``agent_id``, ``agent_name``, ``msg_id``, ``trace_id`` and any other ``extra=``
    attribute when present and not empty, ``exc`` (the formatted traceback) when the
    record carries an exception and ``stack`` for ``stack_info``. Values that are not
    JSON types are written as strings; an extra attribute whose name is taken is written
    as ``extra_<name>``.
    """

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in _extras(record):
            entry[key if key not in entry else f"extra_{key}"] = _json_value(value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False)


class _PrettyFormatter(logging.Formatter):
    """The message and its ``key=value`` extras; rich draws time, level and traceback."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        extras = " ".join(f"{key}={_text(value)}" for key, value in _extras(record))
        message = record.getMessage()
        return f"{message}  {extras}" if extras else message

    def format(self, record: logging.LogRecord) -> str:
        return self.formatMessage(record)


def _make_handler(cfg: LoggingConfig, stream: TextIO | None) -> logging.Handler:
    if cfg.format == "json":
        handler: logging.Handler = logging.StreamHandler(stream or sys.stderr)
        handler.setFormatter(JsonFormatter())
    elif cfg.format == "pretty":
        from rich.console import Console
        from rich.logging import RichHandler

        console = Console(file=stream) if stream is not None else Console(stderr=True)
        handler = RichHandler(
            console=console,
            show_path=False,
            rich_tracebacks=True,
            markup=False,
            log_time_format="%H:%M:%S",
        )
        handler.setFormatter(_PrettyFormatter())
    elif cfg.format == "compact":
        handler = logging.StreamHandler(stream or sys.stderr)
        handler.setFormatter(CompactFormatter())
    else:
        raise ValueError(
            f"[logging] format must be one of compact, json, pretty, got {cfg.format!r}"
        )
    return handler


def configure_logging(cfg: LoggingConfig, *, stream: TextIO | None = None) -> None:
    """Send ``nexus_trio`` log records at ``cfg.level`` and above to ``stream`` in ``cfg.format``.

    Installs one handler on the ``nexus_trio`` logger (``stream`` defaults to standard
    error) and sets that logger's level. Calling it again replaces the handler it
    installed before and nothing else: handlers added by the application, on this logger
    or on the root logger, keep working (records still propagate to the root logger, so
    an application that also configures the root logger sees them twice; give it
    ``logging.getLogger("nexus_trio").propagate = False`` if that is not wanted).
    """
    level = level_number(cfg.level)
    handler = _make_handler(cfg, stream)
    setattr(handler, _MARK, True)
    logger = logging.getLogger(LOGGER_NAME)
    for previous in list(logger.handlers):
        if getattr(previous, _MARK, False):
            logger.removeHandler(previous)
            previous.close()
    logger.addHandler(handler)
    logger.setLevel(level)
