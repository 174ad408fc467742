"""Structured logging: formats, the agent fields on records, one handler of our own."""

from __future__ import annotations

import io
import json
import logging
import re
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from nexus_trio import Context, Kernel, LoggingConfig, Message, agent
from nexus_trio.logs import CompactFormatter, JsonFormatter, configure_logging, level_number
from nexus_trio.testing import settle


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def nexus_logger() -> Iterator[logging.Logger]:
    """The ``nexus_trio`` logger, with its handlers and level restored after the test."""
    logger = logging.getLogger("nexus_trio")
    handlers, level = list(logger.handlers), logger.level
    yield logger
    for handler in list(logger.handlers):
        if handler not in handlers:
            logger.removeHandler(handler)
            handler.close()
    logger.setLevel(level)


def configured(fmt: str, level: str = "debug") -> io.StringIO:
    stream = io.StringIO()
    configure_logging(LoggingConfig(level=level, format=fmt), stream=stream)
    return stream


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


@agent(name="worker")
async def worker(ctx: Context, msg: Message) -> None:
    if msg.payload == "fail":
        raise RuntimeError("boom")
    ctx.log.info("handling %s", msg.payload, extra={"step": 1})


async def test_json_lines_of_a_kernel_carry_agent_and_message_fields(
    nexus_kernel: Kernel, autojump_clock: Any, nexus_logger: logging.Logger
) -> None:
    stream = configured("json", level="info")
    ref = nexus_kernel.spawn(worker)
    trace = uuid.uuid4()
    hello = await nexus_kernel.send(ref, "hello")
    failing = await nexus_kernel.send(ref, "fail", trace_id=trace)
    await nexus_kernel.send(ref, "again")
    await settle()

    records = json_lines(stream)  # every line is one JSON object
    assert all({"ts", "level", "logger", "msg"} <= r.keys() for r in records)
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", r["ts"]) for r in records)

    handled = [r for r in records if r["msg"].startswith("handling ")]
    assert [r["msg"] for r in handled] == ["handling hello", "handling again"]
    for record in handled:
        assert record["level"] == "info"
        assert record["logger"] == "nexus_trio.agent"
        assert record["agent_id"] == str(ref.id)
        assert record["agent_name"] == "worker"
        assert record["step"] == 1  # the caller's extra= is kept
    assert handled[0]["msg_id"] == str(hello.id)
    assert not handled[0].get("trace_id")  # none given: empty or left out

    errors = [r for r in records if r["level"] == "error"]
    assert len(errors) == 1
    error = errors[0]
    assert error["msg"].startswith("handler of agent")
    assert error["agent_id"] == str(ref.id)
    assert error["agent_name"] == "worker"
    assert error["msg_id"] == str(failing.id)
    assert error["trace_id"] == str(trace)
    assert error["exc"].startswith("Traceback (most recent call last):")
    assert error["exc"].endswith("RuntimeError: boom")

    dead = [r for r in records if r["logger"] == "nexus_trio.dead_letters"]
    assert [(d["msg_id"], d["trace_id"], d["reason"], d["agent_id"]) for d in dead] == [
        (str(failing.id), str(trace), "handler_error", str(ref.id))
    ]


async def test_level_filters_kernel_records(
    nexus_kernel: Kernel, autojump_clock: Any, nexus_logger: logging.Logger
) -> None:
    stream = configured("json", level="error")
    ref = nexus_kernel.spawn(worker)
    await nexus_kernel.send(ref, "hello")
    await nexus_kernel.send(ref, "fail")
    await settle()
    assert [r["level"] for r in json_lines(stream)] == ["error"]


def test_configure_logging_replaces_only_its_own_handler(nexus_logger: logging.Logger) -> None:
    mine = ListHandler()
    nexus_logger.addHandler(mine)
    first = configured("compact")
    second = configured("json", level="warning")
    ours = [h for h in nexus_logger.handlers if getattr(h, "_nexus_trio_handler", False)]
    assert len(ours) == 1
    assert mine in nexus_logger.handlers
    assert nexus_logger.level == logging.WARNING

    log = logging.getLogger("nexus_trio.kernel")
    log.info("quiet")
    log.warning("loud")
    assert first.getvalue() == ""
    assert [r["msg"] for r in json_lines(second)] == ["loud"]
    assert [r.getMessage() for r in mine.records] == ["loud"]


def test_records_still_reach_the_root_logger(
    nexus_logger: logging.Logger, caplog: pytest.LogCaptureFixture
) -> None:
    stream = configured("compact")
    with caplog.at_level(logging.INFO):
        logging.getLogger("nexus_trio.supervisor").info("propagated")
    assert "propagated" in stream.getvalue()
    assert [r.getMessage() for r in caplog.records] == ["propagated"]


def test_compact_line_has_time_level_logger_message_and_extras(
    nexus_logger: logging.Logger,
) -> None:
    stream = configured("compact")
    logging.getLogger("nexus_trio.agent").info(
        "hello %s",
        "world",
        extra={"agent_id": "a1", "agent_name": "two words", "msg_id": "m1", "trace_id": ""},
    )
    line = stream.getvalue()
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO     nexus_trio\.agent hello world "
        r'agent_id=a1 agent_name="two words" msg_id=m1\n',
        line,
    ), line


def test_compact_puts_the_traceback_on_following_lines(nexus_logger: logging.Logger) -> None:
    stream = configured("compact")
    try:
        raise ValueError("bad")
    except ValueError:
        logging.getLogger("nexus_trio.kernel").exception("failed", extra={"agent_id": "a1"})
    first, *rest = stream.getvalue().splitlines()
    assert first.endswith(" ERROR    nexus_trio.kernel failed agent_id=a1")
    assert rest[0] == "Traceback (most recent call last):"
    assert rest[-1] == "ValueError: bad"


def test_json_keeps_other_extras_and_stringifies_odd_values(nexus_logger: logging.Logger) -> None:
    stream = configured("json")
    ident = uuid.uuid4()
    logging.getLogger("nexus_trio.x").debug(
        'quote " and\nnewline', extra={"agent_id": ident, "count": 3, "level": "shadowed"}
    )
    (line,) = stream.getvalue().splitlines()
    record = json.loads(line)
    assert record["msg"] == 'quote " and\nnewline'
    assert record["level"] == "debug"
    assert record["agent_id"] == str(ident)
    assert record["count"] == 3
    assert record["extra_level"] == "shadowed"
    assert "exc" not in record


def test_pretty_renders_message_and_extras_with_rich(nexus_logger: logging.Logger) -> None:
    stream = configured("pretty")
    logging.getLogger("nexus_trio.agent").warning("short", extra={"agent_id": "a1"})
    text = stream.getvalue()
    assert "WARNING" in text
    assert "short  agent_id=a1" in text


def test_formatters_work_on_plain_handlers_too() -> None:
    record = logging.LogRecord("app", logging.INFO, __file__, 1, "m %d", (1,), None)
    record.agent_name = "w"
    assert json.loads(JsonFormatter().format(record))["agent_name"] == "w"
    assert CompactFormatter().format(record).endswith(" INFO     app m 1 agent_name=w")


@pytest.mark.parametrize(
    ("name", "number"),
    [
        ("trace", logging.DEBUG),
        ("debug", logging.DEBUG),
        ("INFO", logging.INFO),
        ("warn", logging.WARNING),
        ("warning", logging.WARNING),
        ("error", logging.ERROR),
        ("critical", logging.CRITICAL),
    ],
)
def test_level_names_map_to_logging_levels(name: str, number: int) -> None:
    assert level_number(name) == number


def test_unknown_level_name_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"^\[logging\] level must be one of .*, got 'loud'$"):
        level_number("loud")
