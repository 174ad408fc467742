"""Structured logging: formats, the agent fields on records, one handler of our own."""

from __future__ import annotations

import collections
import errno
import io
import json
import logging
import os
import re
import subprocess
import sys
import textwrap
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from nexus_trio import Context, Kernel, LoggingConfig, Message, agent, open_kernel
from nexus_trio._brief import brief
from nexus_trio.logs import (
    FIELD_LIMIT,
    FLUSH_TIMEOUT,
    ITEMS_LIMIT,
    TRACEBACK_LIMIT,
    CompactFormatter,
    JsonFormatter,
    configure_logging,
    cut_field,
    escape_control,
    flush_logs,
    level_number,
    records_lost,
)
from nexus_trio.testing import settle, test_config


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
    # (kernel.md: "logged on the nexus_trio.dead_letters logger at INFO")
    assert [(d["level"], d["msg_id"], d["trace_id"], d["reason"], d["agent_id"]) for d in dead] == [
        ("info", str(failing.id), str(trace), "handler_error", str(ref.id))
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


def test_json_writes_an_extra_that_contains_itself_as_repr_does(
    nexus_logger: logging.Logger,
) -> None:
    """Regression: an extra holding itself (a list in itself, a dict as its own value)
    raised RecursionError out of the log call with the json format (``ctx.log.info`` in a
    handler failed the handler), where compact writes ``[[...]]``. The way back into a
    container being written is now the text ``[...]`` or ``{...}``, as ``repr`` writes
    it; a container that only occurs twice is written twice."""
    stream = configured("json")
    loop: list[Any] = [1]
    loop.append(loop)
    own: dict[str, Any] = {"n": 2}
    own["self"] = own
    shared = [3]
    logging.getLogger("nexus_trio.x").info(
        "cycles", extra={"loop": loop, "own": own, "twice": {"a": shared, "b": shared}}
    )
    (record,) = json_lines(stream)
    assert record["msg"] == "cycles"
    assert record["loop"] == [1, "[...]"]
    assert record["own"] == {"n": 2, "self": "{...}"}
    assert record["twice"] == {"a": [3], "b": [3]}


def test_json_writes_an_extra_nested_too_deeply_cut_at_100_levels(
    nexus_logger: logging.Logger,
) -> None:
    """Fifty-fourth pass: an extra nested 5,000 lists deep (no cycle) raised
    RecursionError out of the log call with the json format (the compact format writes
    ``<str() failed: RecursionError>``), and the record was lost. A JSON line writes 100
    levels of an extra's containers; the one below is written as its ``str``, as the
    compact format writes an extra (so a shallow one is kept whole)."""
    stream = configured("json")
    deep: Any = "bottom"
    for _ in range(5_000):
        deep = [deep]
    shallow: Any = {"k": 1}
    for _ in range(99):
        shallow = [shallow]
    logging.getLogger("nexus_trio.x").info("deep", extra={"deep": deep, "shallow": shallow})
    (record,) = json_lines(stream)
    assert record["msg"] == "deep"
    value, levels = record["deep"], 0
    while isinstance(value, list):
        (value,) = value
        levels += 1
    assert (levels, value) == (100, "<str() failed: RecursionError>")
    value, levels = record["shallow"], 0
    while isinstance(value, list):
        (value,) = value
        levels += 1
    assert (levels, value) == (99, {"k": 1})


@pytest.mark.parametrize("fmt", ["compact", "json"])
def test_a_container_past_100_levels_is_written_without_building_its_whole_str(
    fmt: str, nexus_logger: logging.Logger
) -> None:
    """Fifty-eighth pass: an extra's container one past the 100 levels a line walks was
    written as its ``str``, built whole to be cut at ``FIELD_LIMIT``: a list of a
    million items 101 deep took 2 s to log in the compact format, 0.27 s in json.
    Now it is written as the start of its ``repr``, built only that far (``...`` marks
    the cut): of 100,000 items, only the repr of those it shows is asked (main: 100,000
    calls)."""
    items = [_Counted() for _ in range(100_000)]
    deep: Any = items
    for _ in range(101):
        deep = [deep]
    _Counted.calls = 0
    stream = configured(fmt)
    logging.getLogger("nexus_trio.x").info("deep", extra={"deep": deep})
    # (walked at most twice as far as it is written: to find it too long, then to write it)
    assert _Counted.calls <= 2 * (FIELD_LIMIT // len("c, ") + 1), _Counted.calls
    if fmt == "json":
        (record,) = json_lines(stream)
        value = record["deep"]
        for _ in range(100):
            (value,) = value
        assert value.startswith("[[c, c, ")
        assert (len(value) <= FIELD_LIMIT, value[-3:]) == (True, "...")


class _Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("str boom")


@pytest.mark.parametrize("fmt", ["compact", "json", "pretty"])
def test_an_extra_whose_str_raises_is_named_and_the_record_written(
    nexus_logger: logging.Logger, capsys: pytest.CaptureFixture[str], fmt: str
) -> None:
    """Regression: an ``extra=`` value whose ``str()`` raised lost its whole record, with
    logging's "--- Logging error ---" traceback on standard error instead. The record is
    now written, the value shown as ``<str() failed: RuntimeError>``, the other fields as
    they are."""
    stream = configured(fmt)
    logging.getLogger("nexus_trio.x").info("hostile", extra={"payload": _Unprintable(), "count": 3})
    text = stream.getvalue()
    if fmt == "json":
        (record,) = json_lines(stream)
        assert (record["msg"], record["count"]) == ("hostile", 3)
        assert record["payload"] == "<str() failed: RuntimeError>"
    else:
        assert len(text.splitlines()) == 1
        assert 'payload="<str() failed: RuntimeError>"' in text
        assert "count=3" in text
    assert "Logging error" not in capsys.readouterr().err


class _ArrayLike:
    """Compares as a numpy array does: ``!=`` gives an array-like, whose truth raises."""

    def __ne__(self, other: object) -> _ArrayLike:  # type: ignore[override]
        return self

    def __eq__(self, other: object) -> _ArrayLike:  # type: ignore[override]
        return self

    def __bool__(self) -> bool:
        raise ValueError("the truth value of an array with more than one element is ambiguous")

    def __str__(self) -> str:
        return "[1 2 3]"


@pytest.mark.parametrize("fmt", ["compact", "json", "pretty"])
def test_an_extra_that_compares_as_an_array_does_is_written(
    nexus_logger: logging.Logger, capsys: pytest.CaptureFixture[str], fmt: str
) -> None:
    """Regression (fifty-first pass): the formatters left out empty extras with ``value !=
    ""``; a numpy array's ``!=`` is an array, whose truth raises, so a record with one in
    ``extra=`` (``ctx.log.info("batch", extra={"weights": arr})``) was lost, with
    logging's "--- Logging error ---" on standard error and not counted in
    ``records_lost()``. It is written, the value as ``str()`` shows it; empty strings and
    None are still left out."""
    stream = configured(fmt)
    before = records_lost()
    logging.getLogger("nexus_trio.x").info(
        "batch", extra={"weights": _ArrayLike(), "count": 3, "none": None, "empty": ""}
    )
    assert flush_logs()
    text = stream.getvalue()
    if fmt == "json":
        (record,) = json_lines(stream)
        assert (record["msg"], record["weights"], record["count"]) == ("batch", "[1 2 3]", 3)
        assert "none" not in record and "empty" not in record
    else:
        assert len(text.splitlines()) == 1
        assert 'weights="[1 2 3]"' in text and "count=3" in text
        assert "none=" not in text and "empty=" not in text
    assert "Logging error" not in capsys.readouterr().err
    assert records_lost() == before


def test_json_writes_nan_infinities_and_ints_past_the_digit_limit_as_json(
    nexus_logger: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    """Regression (fifty-first pass): a float extra that is NaN or infinite was written
    as ``NaN`` / ``Infinity``, which is no JSON (RFC 8259 6): strict parsers (jq,
    ``JSON.parse``, Go's) refuse the line, and a collector drops it. An int past the
    digits ``str()`` may write (4,300 by default) made ``json.dumps`` raise: the record
    was lost with logging's report. Such floats are written as strings (``"nan"``,
    ``"inf"``, ``"-inf"``, as ``str()``), such an int as ``_shown`` shows what it cannot
    write; finite floats and other ints stay numbers."""
    stream = configured("json")
    logging.getLogger("nexus_trio.x").info(
        "odd numbers",
        extra={
            "ratio": float("nan"),
            "bounds": [float("-inf"), 0.5, float("inf")],
            "big": 10**5000,
            "fine": 10**600,
        },
    )
    assert flush_logs()

    def refuse(constant: str) -> Any:
        raise ValueError(f"{constant} is no JSON")

    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0], parse_constant=refuse)
    assert record["ratio"] == "nan"
    assert record["bounds"] == ["-inf", 0.5, "inf"]
    assert record["big"] == "<str() failed: ValueError>"
    assert record["fine"] == 10**600
    assert "Logging error" not in capsys.readouterr().err


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


# --- log injection: control characters are escaped in every text field ----------------------

FORGED = "x\n2026-01-01T00:00:00.000Z CRITICAL nexus_trio.kernel forged\r\x1b[2J\x1b]0;t\x07"
FORGED_ESCAPED = (
    "x\\n2026-01-01T00:00:00.000Z CRITICAL nexus_trio.kernel forged\\r\\x1b[2J\\x1b]0;t\\x07"
)


@pytest.mark.parametrize(
    ("text", "escaped"),
    [
        ("plain text, unicode é ü 日本, back\\slash", "plain text, unicode é ü 日本, back\\slash"),
        ("a\nb\rc\td", "a\\nb\\rc\\td"),
        ("\x00\x01\x1b\x1f\x7f", "\\x00\\x01\\x1b\\x1f\\x7f"),
        ("nel\x85 csi\x9b", "nel\\x85 csi\\x9b"),
        ("ls\u2028ps\u2029", "ls\\u2028ps\\u2029"),
        ("bidi \u202egnp.exe\u2066", "bidi \\u202egnp.exe\\u2066"),
        ("lone \ud800 surrogates \udfff", "lone \\ud800 surrogates \\udfff"),
        (FORGED, FORGED_ESCAPED),
    ],
)
def test_escape_control_writes_control_characters_as_visible_escapes(
    text: str, escaped: str
) -> None:
    from nexus_trio.logs import escape_control

    assert escape_control(text) == escaped
    assert len(escape_control(text).splitlines()) <= 1


def test_escape_control_returns_clean_text_unchanged() -> None:
    from nexus_trio.logs import escape_control

    text = "nothing to escape here"
    assert escape_control(text) is text


def _raise_forged() -> None:
    try:
        raise KeyError("inner\nCRITICAL forged-by-cause")
    except KeyError as cause:
        error = ValueError(FORGED)
        error.add_note("note\nCRITICAL forged-by-note")
        raise error from cause


def test_compact_escapes_name_message_extras_and_exception_texts(
    nexus_logger: logging.Logger,
) -> None:
    stream = configured("compact")
    try:
        _raise_forged()
    except ValueError:
        logging.getLogger("nexus_trio.dead_letters").exception(
            "dead letter to %s", FORGED, extra={"agent_name": FORGED, "reason": "a\x1bb"}
        )
    text = stream.getvalue()
    lines = text.splitlines()
    # Exactly one line starts with a timestamp: nothing was forged.
    stamped = [line for line in lines if re.match(r"\d{4}-\d\d-\d\dT", line)]
    assert len(stamped) == 1
    quoted_name = json.dumps(FORGED)  # has spaces: quoted, and JSON escapes C0 controls
    assert stamped[0].endswith(
        f" ERROR    nexus_trio.dead_letters dead letter to {FORGED_ESCAPED} "
        f"agent_name={quoted_name} reason=a\\x1bb"
    ), stamped[0]
    assert "\x1b" not in text and "\r" not in text and "\x07" not in text
    assert not any(
        "CRITICAL" in line and "forged" in line for line in lines[1:] if "\\n" not in line
    )
    assert f"ValueError: {FORGED_ESCAPED}" in lines
    assert "KeyError: 'inner\\nCRITICAL forged-by-cause'" in lines
    assert "note\\nCRITICAL forged-by-note" in lines
    assert lines[1] == "Traceback (most recent call last):"


def test_compact_escapes_every_member_of_an_exception_group(nexus_logger: logging.Logger) -> None:
    stream = configured("compact")
    try:
        raise ExceptionGroup("group\nforged", [RuntimeError("one\nforged"), OSError("two\x1b")])
    except ExceptionGroup:
        logging.getLogger("nexus_trio.kernel").exception("failed")
    text = stream.getvalue()
    assert "\x1b" not in text
    assert not any(line.lstrip(" |+-").startswith("forged") for line in text.splitlines())
    assert "RuntimeError: one\\nforged" in text and "OSError: two\\x1b" in text
    assert "group\\nforged" in text


def test_compact_does_not_trust_a_traceback_another_formatter_cached(
    nexus_logger: logging.Logger,
) -> None:
    other = logging.StreamHandler(io.StringIO())  # a plain formatter fills record.exc_text
    nexus_logger.addHandler(other)
    stream = configured("compact")
    try:
        raise ValueError("a\nforged")
    except ValueError:
        logging.getLogger("nexus_trio.kernel").exception("failed")
    assert "ValueError: a\\nforged" in stream.getvalue().splitlines()


async def test_an_agent_named_and_failing_with_newlines_logs_one_line_per_record(
    nexus_kernel: Kernel, autojump_clock: Any, nexus_logger: logging.Logger
) -> None:
    stream = configured("compact", level="info")

    @agent
    async def evil(ctx: Context, msg: Message) -> None:
        ctx.log.info("got %s", msg.payload)
        raise RuntimeError(FORGED)

    # a name with a newline is refused at spawn (since the thirty-fifth pass); one that
    # reaches a record all the same (a log call's own extra) is escaped like the text
    with pytest.raises(ValueError, match="control character"):
        nexus_kernel.spawn(evil, name="evil\nCRITICAL forged-by-name")
    ref = nexus_kernel.spawn(evil, name="evil")
    await nexus_kernel.send(ref, FORGED)
    await settle()
    logging.getLogger("nexus_trio.agent").info(
        "from a name", extra={"agent_name": "evil\nCRITICAL forged-by-name"}
    )
    text = stream.getvalue()
    assert "\x1b" not in text and "\r" not in text
    starts = [line for line in text.splitlines() if re.match(r"\d{4}-\d\d-\d\dT", line)]
    assert not [line for line in starts if "CRITICAL" in line.split()[1]]
    assert any(f"got {FORGED_ESCAPED}" in line for line in starts)
    assert f"RuntimeError: {FORGED_ESCAPED}" in text.splitlines()
    assert "evil\\nCRITICAL forged-by-name" in text


def test_json_escapes_line_separators_and_c1_controls_and_keeps_the_text(
    nexus_logger: logging.Logger,
) -> None:
    stream = configured("json")
    nasty = "a\u2028b\u2029c\x85d\x9be\x1bf\ng\u202eh"
    try:
        raise ValueError(nasty)
    except ValueError:
        logging.getLogger("nexus_trio.x").exception(nasty, extra={"agent_name": nasty})
    raw = stream.getvalue()
    assert raw.count("\n") == 1 and raw.endswith("\n")
    for char in "\u2028\u2029\x85\x9b\x1b\u202e":
        assert char not in raw
    assert "\\u2028" in raw and "\\u0085" in raw
    assert len(raw.splitlines()) == 1  # str.splitlines splits at NEL and U+2028 too
    record = json.loads(raw)
    assert record["msg"] == nasty and record["agent_name"] == nasty
    assert record["exc"].endswith("ValueError: " + nasty)


def test_pretty_escapes_message_extras_and_the_rich_traceback(
    nexus_logger: logging.Logger,
) -> None:
    stream = configured("pretty")
    try:
        _raise_forged()
    except ValueError:
        logging.getLogger("nexus_trio.agent").error(
            "failed %s", FORGED, extra={"agent_name": "n\x1b[31m"}, exc_info=True
        )
    text = stream.getvalue()
    assert "\x1b" not in text and "\r" not in text and "\x07" not in text
    assert "forged\\r\\x1b[2J" in text
    assert "agent_name=n\\x1b[31m" in text
    assert "Traceback" in text  # still rich's traceback
    assert not any(line.strip().startswith("2026-01-01T") for line in text.splitlines())


@pytest.mark.parametrize("fmt", ["compact", "json", "pretty"])
def test_a_lone_surrogate_is_escaped_and_the_record_reaches_a_utf8_log_file(
    fmt: str, nexus_logger: logging.Logger, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A peer's or a child's JSON can hold "\\ud800": json.loads makes it a lone surrogate,
    # which no UTF-8 file takes. The record is written, with the surrogate escaped.
    nasty = json.loads('"agent \\ud800x\\udfff"')
    path = tmp_path / "nexus.log"
    with open(path, "a", encoding="utf-8") as file:
        configure_logging(LoggingConfig(level="info", format=fmt), stream=file)
        try:
            raise ValueError(nasty)
        except ValueError:
            logging.getLogger("nexus_trio.dead_letters").exception(
                "dead letter to %s", nasty, extra={"agent_name": nasty}
            )
        configure_logging(LoggingConfig(level="info", format=fmt), stream=io.StringIO())
    assert "Logging error" not in capsys.readouterr().err
    text = path.read_text(encoding="utf-8")
    assert "dead letter to agent \\ud800x\\udfff" in text
    assert "ValueError: agent \\ud800x\\udfff" in text
    if fmt == "json":
        record = json.loads(text)
        assert record["msg"] == f"dead letter to {nasty}" and record["agent_name"] == nasty
    elif fmt == "compact":
        assert 'agent_name="agent \\ud800x\\udfff"' in text


@pytest.mark.parametrize("fmt", ["compact", "json", "pretty"])
def test_a_record_a_narrow_log_file_cannot_encode_is_written_escaped(
    fmt: str, nexus_logger: logging.Logger, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A log file opened as ASCII (strict): a peer's agent name in Japanese made the record
    # fail to encode; it was lost, uncounted, with logging's own traceback on stderr.
    path = tmp_path / "nexus.log"
    before = records_lost()  # (process-wide: what earlier tests' handlers lost is not ours)
    with open(path, "a", encoding="ascii") as file:
        configure_logging(LoggingConfig(level="info", format=fmt), stream=file)
        logging.getLogger("nexus_trio.kernel").info("agent %s started", "日本")
        lost = records_lost() - before
        configure_logging(LoggingConfig(level="info", format=fmt), stream=io.StringIO())
    assert "Logging error" not in capsys.readouterr().err
    text = path.read_text(encoding="ascii")
    assert "agent \\u65e5\\u672c started" in text
    if fmt == "json":  # (the same escape in JSON: the record reads back whole)
        assert json.loads(text)["msg"] == "agent 日本 started"
    assert lost == 0


@pytest.mark.parametrize("errors", ["strict", "backslashreplace"])
def test_a_json_record_a_narrow_log_file_cannot_encode_is_still_json(
    errors: str, nexus_logger: logging.Logger, tmp_path: Path
) -> None:
    """Regression: what an ASCII file cannot take was escaped as ``backslashreplace`` does:
    ``\\xe9`` for é, ``\\U0001f600`` past U+FFFF, which are not JSON escapes: the record
    did not load. They are ``\\uNNNN`` escapes (a surrogate pair past U+FFFF)."""
    path = tmp_path / "nexus.log"
    before = records_lost()
    with open(path, "a", encoding="ascii", errors=errors) as file:
        configure_logging(LoggingConfig(level="info", format="json"), stream=file)
        logging.getLogger("nexus_trio.kernel").info("agent %s started", "café · 😀 日本")
        lost = records_lost() - before
        configure_logging(LoggingConfig(level="info", format="compact"), stream=file)
        logging.getLogger("nexus_trio.kernel").info("agent %s started", "café😀")
        configure_logging(LoggingConfig(level="info", format="json"), stream=io.StringIO())
    first, second = path.read_text(encoding="ascii").splitlines()
    assert json.loads(first)["msg"] == "agent café · 😀 日本 started"
    assert '"agent caf\\u00e9 \\u00b7 \\ud83d\\ude00 \\u65e5\\u672c started"' in first
    assert second.endswith("agent caf\\u00e9\\ud83d\\ude00 started")
    assert lost == 0


# --- configure_logging(level, format) and the default handler --------------------------------


def test_configure_logging_takes_level_and_format_names(
    nexus_logger: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    import nexus_trio

    nexus_trio.configure_logging("warning", "json")
    logging.getLogger("nexus_trio.kernel").info("quiet")
    logging.getLogger("nexus_trio.kernel").warning("loud")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [line["msg"] for line in lines] == ["loud"]
    with pytest.raises(
        ValueError, match=r"format must be one of compact, full, json, pretty, got 'xml'"
    ):
        nexus_trio.configure_logging("info", "xml")
    with pytest.raises(ValueError, match=r"level must be one of .*, got 'loud'"):
        nexus_trio.configure_logging("loud")


def test_the_full_format_writes_the_compact_line(nexus_logger: logging.Logger) -> None:
    """``full`` (the original's name of its one-line format, which its configs may carry)
    writes what ``compact`` writes: it was refused."""
    lines = []
    for fmt in ("full", "compact"):
        stream = configured(fmt)
        logging.getLogger("nexus_trio.kernel").warning("loud", extra={"step": 1})
        lines.append(stream.getvalue())
    full, compact = (line.split(" ", 1)[1] for line in lines)  # (past the time)
    assert full == compact == "WARNING  nexus_trio.kernel loud step=1\n"


def configure_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make this a process that configured no logging, until the test ends: pytest's capture
    handlers on the root logger (added once the test body runs, hence called from it) and
    the handlers earlier tests left on ``nexus_trio`` are set aside."""
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    monkeypatch.setattr(logging.getLogger("nexus_trio"), "handlers", [])


def test_default_logging_is_installed_only_when_nothing_is_configured(
    nexus_logger: logging.Logger,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from nexus_trio.logs import install_default_logging

    configure_nothing(monkeypatch)
    nexus_logger.setLevel(logging.NOTSET)
    assert install_default_logging() is True
    assert install_default_logging() is False  # already there
    assert nexus_logger.level == logging.INFO
    log = logging.getLogger("nexus_trio.agent")
    log.debug("hidden")
    log.info("shown", extra={"agent_name": "w"})
    err = capsys.readouterr().err
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO     nexus_trio\.agent shown agent_name=w\n",
        err,
    ), err
    # The application configures the root logger later: the default handler goes quiet.
    root_records = ListHandler()
    logging.getLogger().addHandler(root_records)
    log.info("once")
    assert capsys.readouterr().err == ""
    assert [r.getMessage() for r in root_records.records] == ["once"]


def test_default_logging_leaves_a_configured_application_alone(
    nexus_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nexus_trio.logs import install_default_logging

    configure_nothing(monkeypatch)
    logging.getLogger().addHandler(ListHandler())
    before = list(nexus_logger.handlers)
    assert install_default_logging() is False
    assert nexus_logger.handlers == before


def test_default_logging_keeps_a_level_the_application_set(
    nexus_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nexus_trio.logs import install_default_logging

    configure_nothing(monkeypatch)
    nexus_logger.setLevel(logging.ERROR)
    assert install_default_logging(LoggingConfig(level="debug")) is True
    assert nexus_logger.level == logging.ERROR


def test_under_plain_python_configure_logging_shows_ctx_log_and_tracebacks_with_times(
    tmp_path: Path,
) -> None:
    script = tmp_path / "app.py"
    script.write_text(
        textwrap.dedent(
            """
            import trio
            import nexus_trio
            from nexus_trio import agent, open_kernel

            @agent(name="worker")
            async def worker(ctx, msg):
                ctx.log.info("working on %s", msg.payload)
                raise RuntimeError("boom")

            async def main():
                async with open_kernel() as kernel:
                    await kernel.send(kernel.spawn(worker), "job")
                    await trio.sleep(0.5)

            nexus_trio.configure_logging()
            trio.run(main)
            """
        )
    )
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z "
    working = [line for line in lines if "working on job" in line]
    assert len(working) == 1 and re.match(stamp + r"INFO     nexus_trio\.agent ", working[0])
    assert "agent_name=worker" in working[0]
    failed = [i for i, line in enumerate(lines) if re.match(stamp + "ERROR", line)]
    assert failed, result.stderr
    assert lines[failed[0] + 1] == "Traceback (most recent call last):"
    assert "RuntimeError: boom" in lines


# --- a stream that cannot be written (a full disk, a reader gone) --------------------------------


class FullDisk(io.StringIO):
    """A log stream that fails like a full disk until ``full`` is cleared."""

    def __init__(self) -> None:
        super().__init__()
        self.full = True
        self.failed_writes = 0

    def write(self, text: str) -> int:
        if self.full:
            self.failed_writes += 1
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(text)


def configured_on(stream: TextIO, fmt: str, level: str = "debug") -> None:
    configure_logging(LoggingConfig(level=level, format=fmt), stream=stream)


@pytest.mark.parametrize("fmt", ["compact", "json", "pretty"])
def test_records_a_full_disk_refuses_are_counted_and_reported_once_it_writes_again(
    fmt: str, nexus_logger: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    stream = FullDisk()
    configured_on(stream, fmt)
    log = logging.getLogger("nexus_trio.test")
    before = records_lost()
    for i in range(5):
        log.info("lost-%d", i)
    assert records_lost() - before == 5
    assert stream.failed_writes >= 5
    assert stream.getvalue() == ""
    # No "--- Logging error ---" traceback per record on standard error.
    assert capsys.readouterr().err == ""

    stream.full = False
    log.info("first after")
    log.info("second after")
    text = stream.getvalue()
    assert records_lost() - before == 5  # nothing more lost
    assert "first after" in text and "second after" in text
    # One notice, after the first record that got through, with the count and the reason.
    assert text.count("could not be written") == 1
    assert (
        text.index("first after") < text.index("could not be written") < text.index("second after")
    )
    assert re.search(r"5 log record\(s\) before this one could not be\s+written", text)
    assert "No space left on device" in " ".join(text.split())
    # What was counted as lost is never written later (rich would retry its buffer).
    assert "lost-" not in text


class Disk(io.RawIOBase):
    """The file beneath a buffered log stream, on a disk with ``room`` bytes left (None:
    plenty). A write takes what fits, a short write as a real disk makes when it fills
    up, and fails with ENOSPC when nothing does."""

    def __init__(self) -> None:
        super().__init__()
        self.data = bytearray()
        self.room: int | None = None

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        chunk = bytes(b)
        if self.room is not None:
            if self.room == 0:
                raise OSError(errno.ENOSPC, "No space left on device")
            chunk = chunk[: self.room]
            self.room -= len(chunk)
        self.data += chunk
        return len(chunk)


class WritesThrough(io.TextIOBase):
    """A wrapper that passes writes unchanged to ``stream``, and says so (as ``nexus``'s
    watch on standard error does)."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self.stream = stream

    @property
    def writes_through_to(self) -> TextIO:
        return self.stream

    def write(self, text: str) -> int:
        return self.stream.write(text)

    def flush(self) -> None:
        # (also at its garbage collection, io's close: the file beneath may be closed by
        # then, and its ValueError was an unraisable exception in whichever test ran)
        if not self.stream.closed:
            self.stream.flush()


def text_file(disk: Disk, shape: str = "buffered") -> TextIO:
    """A log stream over ``disk``: a file opened in text mode (and ``sys.stderr``), as
    ``open()`` makes it, ``sys.stderr`` under ``python -u`` (no buffer, write-through), or
    a wrapper that writes through to the first."""
    if shape == "unbuffered":
        return io.TextIOWrapper(disk, encoding="utf-8", write_through=True)
    file = io.TextIOWrapper(io.BufferedWriter(disk), encoding="utf-8")
    return WritesThrough(file) if shape == "written through" else file


NOTICE = re.compile(
    r"(\d+) log record\(s\) before this one could not be\s+written \(No space left on device\)"
)


@pytest.mark.parametrize("shape", ["buffered", "unbuffered", "written through"])
@pytest.mark.parametrize("fmt", ["compact", "json", "pretty"])
def test_a_log_file_on_a_full_disk_writes_each_record_whole_once_or_counts_it_lost(
    fmt: str, shape: str, nexus_logger: logging.Logger
) -> None:
    """A buffered stream keeps what it could not write and writes it later, an unbuffered
    one drops the end of a short write: a record counted lost must not appear after all,
    nor be cut in half, nor pile up in memory."""
    disk = Disk()
    stream = text_file(disk, shape)
    configured_on(stream, fmt)
    log = logging.getLogger("nexus_trio.test")
    before = records_lost()
    log.info("rec-000")
    disk.room = 100  # the next record fits, the one after it only in part
    for i in range(1, 300):  # far more than the stream's buffer (8 KiB) holds
        log.info("rec-%03d", i)
    during = bytes(disk.data)
    disk.room = None
    stream.flush()
    # The stream kept nothing of the records it was given while the disk was full.
    assert bytes(disk.data) == during
    log.info("rec-300")
    log.info("rec-301")
    stream.flush()
    text = disk.data.decode()

    lost = records_lost() - before
    written = re.findall(r"rec-\d{3}", text)
    assert len(written) == len(set(written))  # none twice
    # every record is either written or counted lost, never both
    assert 0 < lost == 302 - len(written)
    assert "rec-300" in written and "rec-301" in written
    # the notice after the first record written again counts exactly what is missing
    notices = NOTICE.findall(" ".join(text.split()))
    assert notices == [str(lost)]
    if fmt == "compact":
        line = re.compile(
            r"\S+Z (INFO    |WARNING ) nexus_trio\.(test rec-\d{3}|logs "
            + NOTICE.pattern
            + r": lost, and counted in records_lost\(\))"
        )
        assert all(line.fullmatch(each) for each in text.split("\n")[:-1]), text
    elif fmt == "json":
        assert all(json.loads(each)["msg"] for each in text.split("\n")[:-1]), text
    assert text.endswith("\n")


@pytest.mark.parametrize("room_at_close", [False, True])
def test_a_record_the_disk_took_only_the_start_of_is_lost_if_the_handler_closes_before_room(
    room_at_close: bool, nexus_logger: logging.Logger
) -> None:
    disk = Disk()
    stream = text_file(disk)
    configured_on(stream, "compact")
    log = logging.getLogger("nexus_trio.test")
    before = records_lost()
    disk.room = 40
    log.info("rec-000")  # the disk takes its first 40 bytes
    log.info("rec-001")  # lost: the end of rec-000 goes first, and does not fit
    assert records_lost() - before == 1
    assert len(disk.data) == 40
    if room_at_close:
        disk.room = None
    configure_logging(LoggingConfig(format="compact"), stream=io.StringIO())  # closes it
    disk.room = None
    stream.flush()  # the stream holds nothing more of them
    text = disk.data.decode()
    if room_at_close:  # the end of rec-000 is written on close: it is not lost
        assert records_lost() - before == 1
        assert text.endswith(" nexus_trio.test rec-000\n") and text.count("\n") == 1
    else:  # its start is the file's last line, and it is counted lost
        assert records_lost() - before == 2
        assert len(text) == 40 and "\n" not in text


def test_a_record_the_disk_took_only_the_start_of_after_the_handler_closed_is_counted_lost(
    nexus_logger: logging.Logger,
) -> None:
    """Regression: a record that reached the handler after it was closed (a worker thread
    that took the logger's handlers just before ``configure_logging`` replaced this one)
    and that the disk took only the start of kept its end for a close that had been
    already: nothing was left to write it or count it, and it was not counted lost."""
    disk = Disk()
    stream = text_file(disk)
    configured_on(stream, "compact")
    (handler,) = [h for h in nexus_logger.handlers if getattr(h, "_nexus_trio_handler", False)]
    configure_logging(LoggingConfig(format="compact"), stream=io.StringIO())  # closes it
    before = records_lost()
    disk.room = 40
    handler.handle(
        logging.LogRecord("nexus_trio.test", logging.INFO, __file__, 0, "rec-000", None, None)
    )
    assert len(disk.data) == 40
    assert records_lost() - before == 1
    disk.room = None
    handler.close()  # (logging.shutdown closes it again, if it is still alive)
    handler.handle(
        logging.LogRecord("nexus_trio.test", logging.INFO, __file__, 0, "rec-001", None, None)
    )
    assert records_lost() - before == 1
    text = disk.data.decode()
    # rec-000's start, then rec-001 whole and the notice of the one record lost
    assert "rec-000" not in text and " nexus_trio.test rec-001\n" in text
    assert NOTICE.findall(" ".join(text.split())) == ["1"]


@pytest.mark.parametrize("fmt", ["compact", "json", "pretty"])
@pytest.mark.parametrize("shape", ["buffered", "string"])
def test_records_to_a_closed_log_stream_are_counted_lost(
    fmt: str, shape: str, nexus_logger: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    disk = Disk()
    stream: TextIO = text_file(disk) if shape == "buffered" else io.StringIO()
    configured_on(stream, fmt)
    log = logging.getLogger("nexus_trio.test")
    log.info("written")
    stream.close()  # by the application, with the handler still installed
    before = records_lost()
    log.info("lost-1")
    log.info("lost-2")
    assert records_lost() - before == 2
    # No "--- Logging error ---" report (ValueError: I/O operation on closed file).
    assert capsys.readouterr().err == ""
    if shape == "buffered":
        assert "written" in disk.data.decode() and "lost-" not in disk.data.decode()


def test_text_other_code_wrote_to_the_log_stream_stays_in_order(
    nexus_logger: logging.Logger,
) -> None:
    disk = Disk()
    stream = text_file(disk)
    configured_on(stream, "compact")
    stream.write("before\n")  # in the stream's buffer, as print() to a file leaves it
    logging.getLogger("nexus_trio.test").info("record")
    stream.write("after\n")
    stream.flush()
    assert [line.split()[-1] for line in disk.data.decode().splitlines()] == [
        "before",
        "record",
        "after",
    ]


@pytest.mark.parametrize("fmt", ["compact", "json", "pretty"])
def test_records_to_rich_s_redirect_of_standard_error_go_through_the_redirect(
    fmt: str, nexus_logger: logging.Logger
) -> None:
    """Under a live display rich redirects standard error (``FileProxy``: it prints each
    line above the display, and hands unknown attributes such as ``buffer`` to the
    stream it replaced): a record must go through it, not to the file beneath."""
    from rich.console import Console
    from rich.file_proxy import FileProxy

    disk = Disk()
    shown = io.StringIO()
    # over a stream that writes through to the file, as in ``nexus run``
    configured_on(FileProxy(Console(file=shown), text_file(disk, "written through")), fmt)
    logging.getLogger("nexus_trio.test").info("above the display")
    assert "above the display" in shown.getvalue()
    assert disk.data == b""


def test_a_notice_that_fails_too_keeps_the_count_for_the_next_record(
    nexus_logger: logging.Logger,
) -> None:
    class FailsEveryOther(io.StringIO):
        """Refuses writes 1, 3 and 5 (the record, then the notice after a good one)."""

        def __init__(self) -> None:
            super().__init__()
            self.calls = 0

        def write(self, text: str) -> int:
            self.calls += 1
            if self.calls in (1, 3):
                raise OSError(errno.EIO, "Input/output error")
            return super().write(text)

    stream = FailsEveryOther()
    configured_on(stream, "compact")
    log = logging.getLogger("nexus_trio.test")
    before = records_lost()
    log.info("one")  # write 1 fails: lost
    log.info("two")  # write 2: written; write 3, the notice, fails
    log.info("three")  # write 4: written; write 5, the notice again, gets through
    assert records_lost() - before == 1  # the failed notice is not a record of the program
    lines = stream.getvalue().splitlines()
    assert [line.split(" nexus_trio.")[1] for line in lines] == [
        "test two",
        "test three",
        "logs 1 log record(s) before this one could not be written (Input/output error): "
        "lost, and counted in records_lost()",
    ]


@pytest.mark.parametrize("fmt", ["compact", "json", "pretty"])
def test_a_record_that_does_not_fit_its_format_keeps_logging_s_report(
    fmt: str, nexus_logger: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    """In every format (regression for ``pretty``, whose handler let the ``TypeError``
    out of the log call: a handler logging such a record failed)."""
    stream = io.StringIO()
    configured_on(stream, fmt)
    (ours,) = [h for h in nexus_logger.handlers if getattr(h, "_nexus_trio_handler", False)]
    before = records_lost()
    # Straight to our handler: pytest's own capture handler raises on such a record.
    record = logging.LogRecord(
        "nexus_trio.test", logging.INFO, __file__, 1, "%d items", ("not a number",), None
    )
    ours.handle(record)
    assert records_lost() == before  # not a write failure
    assert "--- Logging error ---" in capsys.readouterr().err


async def test_a_kernel_logging_to_a_full_disk_keeps_every_count(
    nexus_kernel: Kernel, autojump_clock: Any, nexus_logger: logging.Logger
) -> None:
    """A full disk of logs loses log lines, counted, and nothing else: the failures and
    their dead letters are all in the kernel's stats."""
    stream = FullDisk()
    configured_on(stream, "json", level="info")
    seen = ListHandler()  # what the kernel logged, for the count
    seen.setLevel(logging.INFO)
    nexus_logger.addHandler(seen)
    before = records_lost()
    ref = nexus_kernel.spawn(worker)
    for i in range(20):
        await nexus_kernel.send(ref, "fail" if i % 2 else f"ok-{i}")
    await settle()

    stats = nexus_kernel.stats()
    assert stats.handled == 10
    assert stats.failed == 10
    assert stats.dead_letters_by_reason == {"handler_error": 10}
    assert stats.in_flight == 0
    assert stats.accepted == stats.handled + stats.dead_lettered
    # every record the kernel and the agent wrote (10 "handling", 10 handler errors, 10
    # dead letters, and whatever else at info) is counted as lost, none written
    assert len(seen.records) >= 30
    assert records_lost() - before == len(seen.records)
    assert stream.getvalue() == ""


# --- a broken log configuration of the application -------------------------------------------


class RaisingFilter(logging.Filter):
    """An application's filter with a bug: it raises on every record."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def filter(self, record: logging.LogRecord) -> bool:
        self.calls += 1
        raise KeyError("the filter's bug")


class RaisingHandler(logging.Handler):
    """A handler whose write fails and whose ``handleError`` re-raises (as some
    applications' handlers do, to fail loudly in development)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.calls += 1
        raise ValueError("the handler's bug")

    def handleError(self, record: logging.LogRecord) -> None:
        raise


@pytest.fixture(params=["filter", "handler"])
def broken_log(request: pytest.FixtureRequest) -> Iterator[Any]:
    """A filter on, or a handler of, ``nexus_trio.dead_letters`` and the kernel's other
    loggers, raising on every record; removed afterwards."""
    names = [
        "nexus_trio.dead_letters",
        "nexus_trio.agent",
        "nexus_trio.supervisor",
        "nexus_trio.kernel",
        "nexus_trio.bridge.stderr",
    ]
    broken: Any = RaisingFilter() if request.param == "filter" else RaisingHandler()
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.DEBUG)
        if isinstance(broken, logging.Filter):
            logger.addFilter(broken)
        else:
            logger.addHandler(broken)
    yield broken
    for logger, level in zip(loggers, levels, strict=True):
        logger.removeFilter(broken)
        logger.removeHandler(broken)
        logger.setLevel(level)


@agent(name="slow")
async def slow_worker(ctx: Context, msg: Message) -> None:
    if msg.payload == "fail":
        raise RuntimeError("boom")
    if msg.payload == "stall":
        await trio.sleep_forever()


async def test_a_raising_log_filter_or_handler_loses_no_count_and_shutdown_completes(
    broken_log: Any, autojump_clock: Any
) -> None:
    """A log call of the kernel that raises (the application's filter or handler) loses
    no count and does not stop the shutdown: handler errors, a handler timeout and the
    messages still queued at the shutdown are all dead-lettered, counted and published."""
    config = test_config(handle_timeout_ms=1000, shutdown_grace_ms=0)
    async with open_kernel(config) as kernel:
        ref = kernel.spawn(slow_worker)
        for payload in ["fail", "ok", "fail", "stall", "ok", "ok"]:
            await kernel.send(ref, payload)
        await settle()
        assert kernel.stats().failed == 2
        await trio.sleep(2)  # past the handle timeout of "stall"
        await settle()
        assert kernel.stats().handled == 3
        for _ in range(3):
            await kernel.send(ref, "stall")
        await settle()
    stats = kernel.stats()
    assert stats.failed == 2
    assert stats.timed_out == 1
    assert stats.dead_letters_by_reason == {
        "handler_error": 2,
        "handler_timeout": 1,
        "shutdown": 3,
    }
    assert stats.accepted == stats.handled + stats.dead_lettered == 9
    assert stats.in_flight == 0
    # every dead letter was published too (the stream is after the log line)
    assert len(kernel.recent_dead_letters()) == 6
    assert broken_log.calls >= 6


@agent(name="crashing", on_error="restart")
async def crashing(ctx: Context, msg: Message) -> None:
    if msg.payload == "fail":
        raise RuntimeError("boom")


async def test_a_raising_log_filter_or_handler_does_not_stop_restarts(
    broken_log: Any, autojump_clock: Any
) -> None:
    """The supervisor logs each failure and restart: with those log calls raising, the
    agent is still restarted each time and handles what comes after."""
    async with open_kernel(test_config()) as kernel:
        ref = kernel.spawn(crashing)
        for payload in ["fail", "ok", "fail", "fail", "ok"]:
            await kernel.send(ref, payload)
            await trio.sleep(0.1)
        stats = kernel.stats()
        assert stats.restarts == 3
        assert stats.failed == 3
        assert stats.handled == 2
    assert kernel.stats().accepted == 5


def test_a_raising_log_call_is_shown_once_and_counted(tmp_path: Path) -> None:
    """A broken filter on the dead-letter logger: the first failure is shown on standard
    error with its traceback, the others only counted (not a traceback per dead letter)."""
    code = textwrap.dedent(
        """
        import logging
        import trio
        from nexus_trio import agent, open_kernel
        from nexus_trio.logs import log_calls_failed

        class Broken(logging.Filter):
            def filter(self, record):
                raise KeyError("the filter's bug")

        logging.getLogger("nexus_trio.dead_letters").addFilter(Broken())

        @agent(name="failing")
        async def failing(ctx, msg):
            raise RuntimeError("boom")

        async def main():
            async with open_kernel() as kernel:
                ref = kernel.spawn(failing)
                for _ in range(5):
                    await kernel.send(ref, "x")
                await trio.testing.wait_all_tasks_blocked()
                print(kernel.stats().dead_letters_by_reason, log_calls_failed())

        import trio.testing
        trio.run(main)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "{'handler_error': 5} 5"
    assert result.stderr.count("--- nexus_trio: a log call to nexus_trio.dead_letters raised") == 1
    assert result.stderr.count('KeyError: "the filter\'s bug"') == 1


# --- a log reader that stops reading (a stuck log shipper, a full pipe) -----------------------

COMPACT_RECORD = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (INFO    |WARNING ) \S+ .*")


def read_what_is_there(fd: int) -> bytes:
    """Everything the pipe holds now, without waiting for more."""
    os.set_blocking(fd, False)
    data = bytearray()
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return bytes(data)
        if not chunk:
            return bytes(data)
        data += chunk


def logging_to_a_pipe_nobody_reads(script: str, cwd: Path) -> tuple[dict[str, Any], str]:
    """Run ``script`` (``python -c``) with the write end of a pipe that nobody reads as
    ``sys.argv[1]``: what it printed (JSON), and then what the pipe holds."""
    read_end, write_end = os.pipe()
    try:
        result = subprocess.run(
            [sys.executable, "-c", script, str(write_end)],
            pass_fds=(write_end,),
            capture_output=True,
            text=True,
            # (a hang guard: code that blocks in the first write that does not fit hangs
            # here; a child paused on a loaded machine took over 60 s)
            timeout=180,
            cwd=cwd,
        )
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout), read_what_is_there(read_end).decode("utf-8")
    finally:
        os.close(read_end)
        os.close(write_end)


#: The script's last record, held by the writer thread when the close gave up on it, is
#: counted lost at that thread's next look, which a loaded machine can put after the
#: close returned (it waits 4 looks): the count is read once the thread ended.
WRITER_ENDED = """
import threading
for thread in threading.enumerate():
    if thread.name == "nexus_trio log writer":
        thread.join(60)
"""

STUCK_KERNEL = """
import io, json, logging, os, sys, time
import trio
from nexus_trio import agent, open_kernel
from nexus_trio.logs import configure_logging, records_lost
from nexus_trio.testing import test_config

N = 15_000  # more records than the pipe (64 KiB) and the queue (10,000) hold together


class Counted(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.records = 0

    def emit(self, record):
        self.records += 1


@agent(name="chatty")
async def chatty(ctx, msg):
    ctx.log.info("message %s", msg.payload)


configure_logging("info", "compact", stream=open(int(sys.argv[1]), "w", encoding="utf-8"))
seen = Counted()
logging.getLogger("nexus_trio").addHandler(seen)


async def main():
    # (a send waits for room by the real clock: the default 0.5 s ran out in a pause)
    async with open_kernel(test_config(send_timeout_ms=60_000)) as kernel:
        ref = kernel.spawn(chatty)
        for i in range(N):
            await kernel.send(ref, i)
        await kernel.shutdown()
        return kernel.stats()


stats = trio.run(main)
logged = seen.records
started = time.monotonic()
configure_logging("info", "compact", stream=io.StringIO())  # closes the stuck handler
closing = time.monotonic() - started
WRITER_ENDED
print(json.dumps({
    "handled": stats.handled, "accepted": stats.accepted, "dead": stats.dead_lettered,
    "in_flight": stats.in_flight, "logged": logged, "lost": records_lost(),
    "closing_s": closing,
}))
""".replace("WRITER_ENDED\n", WRITER_ENDED)


def test_a_log_pipe_nobody_reads_loses_records_counted_and_the_kernel_runs_on(
    tmp_path: Path,
) -> None:
    """A log stream whose reader stopped reading (a stuck log shipper) blocked the first
    write that did not fit, and with it the whole process: no agent ran, no shutdown came.
    The records go through a bounded queue to a writer thread now: the kernel handles
    every message, what the pipe did not take is counted lost, closing returns in time,
    and every record the pipe took is whole."""
    outcome, text = logging_to_a_pipe_nobody_reads(STUCK_KERNEL, tmp_path)
    assert outcome["handled"] == 15_000
    assert outcome["accepted"] == outcome["handled"] + outcome["dead"]
    assert outcome["in_flight"] == 0
    assert outcome["closing_s"] < FLUSH_TIMEOUT + 1.5
    # every record that got through is whole: lines of one record each, none torn
    assert text.endswith("\n")
    lines = text.split("\n")[:-1]
    assert all(COMPACT_RECORD.fullmatch(line) for line in lines), [
        line for line in lines if not COMPACT_RECORD.fullmatch(line)
    ][:3]
    written = [line for line in lines if " nexus_trio.logs " not in line]  # not a loss notice
    assert 0 < len(written) < outcome["logged"]
    # what the pipe did not take is counted lost, and nothing else
    assert outcome["lost"] == outcome["logged"] - len(written)


STUCK_REPLACED = """
import io, json, logging, sys, time
from nexus_trio.logs import configure_logging, records_lost

configure_logging("info", "compact", stream=open(int(sys.argv[1]), "w", encoding="utf-8"))
log = logging.getLogger("nexus_trio.test")
for i in range(2000):  # 300 KB: more than a pipe holds
    log.info("record %04d %s", i, "x" * 120)
started = time.monotonic()
configure_logging("info", "compact", stream=io.StringIO())
took = time.monotonic() - started
WRITER_ENDED
print(json.dumps({"took": took, "lost": records_lost()}))
""".replace("WRITER_ENDED\n", WRITER_ENDED)


def test_replacing_the_handler_of_a_stuck_log_pipe_returns_within_the_bound(
    tmp_path: Path,
) -> None:
    outcome, text = logging_to_a_pipe_nobody_reads(STUCK_REPLACED, tmp_path)
    assert outcome["took"] < FLUSH_TIMEOUT + 1.5
    lines = text.split("\n")
    assert lines.pop() == ""  # the last record is whole too
    assert all(COMPACT_RECORD.fullmatch(line) for line in lines)
    written = re.findall(r"record (\d{4})", text)
    assert written == [f"{i:04d}" for i in range(len(written))]  # in order, none twice
    assert 0 < len(written) < 2000
    assert outcome["lost"] == 2000 - len(written)


@pytest.mark.parametrize("fmt", ["compact", "json", "pretty"])
def test_records_to_a_log_file_are_written_by_the_writer_thread_and_flush_logs_waits_for_them(
    fmt: str, nexus_logger: logging.Logger, tmp_path: Path
) -> None:
    path = tmp_path / "nexus.log"
    with open(path, "a", encoding="utf-8") as file:
        configure_logging(LoggingConfig(format=fmt), stream=file)
        log = logging.getLogger("nexus_trio.test")
        items = ["before"]
        log.info("items %s", items)
        items.append("after")  # formatted when logged, not when the writer writes it
        assert flush_logs() is True
        text = path.read_text(encoding="utf-8")
        configure_logging(LoggingConfig(format=fmt), stream=io.StringIO())
    assert "items ['before']" in text and "after" not in text


def test_queue_0_writes_each_record_to_a_log_file_when_it_is_logged(
    nexus_logger: logging.Logger, tmp_path: Path
) -> None:
    def writers() -> int:
        return sum(thread.name == "nexus_trio log writer" for thread in threading.enumerate())

    path = tmp_path / "nexus.log"
    with open(path, "a", encoding="utf-8") as file:
        before = writers()
        configure_logging(LoggingConfig(queue=0), stream=file)
        assert writers() == before  # no writer thread of its own
        logging.getLogger("nexus_trio.test").info("at once")
        assert path.read_text(encoding="utf-8").endswith(" nexus_trio.test at once\n")
        configure_logging(LoggingConfig(queue=0), stream=io.StringIO())


FORKED = """
import logging, os, sys
from nexus_trio.logs import configure_logging, records_lost

configure_logging("info", "compact", stream=open(sys.argv[1], "a", encoding="utf-8"))
log = logging.getLogger("nexus_trio.test")
log.info("parent before the fork")
pid = os.fork()
if pid == 0:
    import threading
    writers = lambda: sum(t.name == "nexus_trio log writer" for t in threading.enumerate())
    # none until the child logs (a fork before an exec starts no thread to lose)
    assert writers() == 0, writers()
    log.info("child")
    assert writers() == 1, writers()
    sys.exit(records_lost())  # (logging.shutdown closes the handler: it writes what is queued)
_, status = os.waitpid(pid, 0)
log.info("parent after the child exited %d", os.waitstatus_to_exitcode(status))
"""


def test_a_forked_child_has_a_log_writer_of_its_own(tmp_path: Path) -> None:
    """A child forked from a process with a log writer thread has none of the parent's
    threads: its records waited in the queue for a writer that never came, and were
    counted lost at its exit. It starts one when it first logs, not at the fork (a
    ``preexec_fn`` runs between the fork and the exec of a subprocess)."""
    path = tmp_path / "nexus.log"
    result = subprocess.run(
        [sys.executable, "-W", "ignore::DeprecationWarning", "-c", FORKED, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    messages = [line.split(" nexus_trio.test ")[1] for line in path.read_text().splitlines()]
    # Each once: the child wrote none of the parent's records still queued at the fork.
    # The parent's first record may be written after the child's (its writer thread
    # writes when it gets the CPU: seen on a loaded machine); the child's comes before
    # the parent's last, which was logged after the child had exited.
    assert sorted(messages) == sorted(
        ["parent before the fork", "child", "parent after the child exited 0"]
    )
    assert messages.index("child") < messages.index("parent after the child exited 0")


OVERFLOWING = """
import json, logging, os, threading
from nexus_trio import LoggingConfig
from nexus_trio.logs import configure_logging, flush_logs, records_lost
import io

read_end, write_end = os.pipe()
stream = open(write_end, "w", encoding="utf-8")
configure_logging(LoggingConfig(queue=5), stream=stream)
log = logging.getLogger("nexus_trio.test")
for i in range(100):  # 100 KB: the pipe takes about 60, the queue 5 more
    log.info("big %03d %s", i, "x" * 1000)
lost = records_lost()
received = []
reader = threading.Thread(target=lambda: received.extend(iter(lambda: os.read(read_end, 65536), b"")))
reader.start()  # the log shipper reads again
flushed = [flush_logs(30)]  # (the queue has room again)
log.info("after")
flushed.append(flush_logs(30))
configure_logging(LoggingConfig(), stream=io.StringIO())
stream.close()
reader.join()
print(json.dumps({"lost": lost, "flushed": flushed, "total": records_lost(), "text": b"".join(received).decode()}))
"""


BIG_RECORDS = """
import json, logging, os, threading, io
import nexus_trio.logs
from nexus_trio import LoggingConfig
from nexus_trio.logs import configure_logging, flush_logs, records_lost

nexus_trio.logs.QUEUE_CHARS = 4_000_000
read_end, write_end = os.pipe()
stream = open(write_end, "w", encoding="utf-8")
configure_logging(LoggingConfig(), stream=stream)  # a queue of 10,000 records
log = logging.getLogger("nexus_trio.test")
# (1 MB a record in 64 extras: one text is cut at 16,384 characters, FIELD_LIMIT)
extra = {f"x{j:02}": "x" * 15_625 for j in range(64)}
for i in range(40):  # 40 MB: the pipe takes 64 KiB of them
    log.info("big %03d", i, extra=extra)
lost = records_lost()
received = []
reader = threading.Thread(target=lambda: received.extend(iter(lambda: os.read(read_end, 1 << 20), b"")))
reader.start()
flushed = flush_logs(30)
configure_logging(LoggingConfig(), stream=io.StringIO())
stream.close()
reader.join()
lines = b"".join(received).decode().splitlines()
print(json.dumps({"lost": lost, "flushed": flushed, "big": [l[l.index(" big ") + 5 :][:3] for l in lines if " big " in l]}))
"""


def test_the_queue_keeps_at_most_queue_chars_of_records_not_only_a_number_of_them(
    tmp_path: Path,
) -> None:
    """Regression: the queue was bounded in records only (10,000 by default), so records
    of megabytes each (a payload logged whole) held gigabytes while the stream's reader
    did not read: 40 records of 1 MB were all kept. At most ``QUEUE_CHARS`` characters
    wait now (4 MB here): the others are lost and counted, as records that find the
    queue full."""
    result = subprocess.run(
        [sys.executable, "-c", BIG_RECORDS], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout)
    assert outcome["flushed"] is True
    written = outcome["big"]
    # the one being written when the pipe filled, at most 4 queued, and maybe one more
    # taken while the writer held one out of the queue
    assert 1 <= len(written) <= 6, written
    assert outcome["lost"] == 40 - len(written)
    assert written == sorted(written) and written[0] == "000"


def test_records_a_full_queue_drops_are_counted_and_noticed_when_the_reader_reads_again(
    tmp_path: Path,
) -> None:
    result = subprocess.run(
        [sys.executable, "-c", OVERFLOWING], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout)
    assert outcome["flushed"] == [True, True]
    assert outcome["total"] == outcome["lost"]  # nothing lost once the reader read again
    lines = outcome["text"].split("\n")
    assert lines.pop() == ""
    assert all(COMPACT_RECORD.fullmatch(line) for line in lines)
    messages = [line.split(" nexus_trio.")[1] for line in lines]
    big = [m for m in messages if m.startswith("test big ")]
    # Those the queue had room for got through, whole and in order (the first always:
    # the queue is empty then); those it had no room for were dropped, counted, and the
    # notice after the next record written says so. Which ones had room depends on how
    # far the writer thread got before the pipe filled (on a loaded machine it may fall
    # behind at once, and records are dropped before the pipe is full: then the next one
    # written has its own notice), so the test does not ask for the first N in a row, nor
    # for a single notice.
    numbers = [int(m.split()[2]) for m in big]
    assert numbers == sorted(set(numbers)) and numbers[0] == 0, numbers
    assert big == [f"test big {i:03d} {'x' * 1000}" for i in numbers]
    assert outcome["lost"] == 100 - len(big) > 0
    # each gap (records dropped) is noticed, with its count, right after the next record
    # written ("test after" follows the last big one); no other notice
    notice = (
        "logs {} log record(s) before this one could not be written "
        "(the log stream did not keep up): lost, and counted in records_lost()"
    )
    expected: list[str] = []
    for previous, number in zip([-1, *numbers], [*numbers, 100], strict=True):
        expected.append(f"test big {number:03d} {'x' * 1000}" if number < 100 else "test after")
        if number - previous > 1:
            expected.append(notice.format(number - previous - 1))
    assert messages == expected


class _Counted:
    """A value whose ``repr`` counts its calls."""

    calls = 0

    def __repr__(self) -> str:
        _Counted.calls += 1
        return "c"


def _cut(text: str, size: int) -> str:
    return text if len(text) <= size else text[:size] + "..."


def test_brief_reads_a_long_value_only_as_far_as_its_cut() -> None:
    """Regression (fifty-second pass): ``brief`` built the whole ``repr`` of a value to
    cut it to 120 characters: 0.3 s in the kernel's thread for a 3M-element list a child
    registered with. It reads text, bytes and built-in containers only as far as the cut
    (counted here: the element ``repr`` calls), and shows what ``repr`` shows up to it.
    (Fails with main's _brief.py: 1,000,000 calls, and 2,000,000 for the nested one.)"""
    one = _Counted()
    _Counted.calls = 0
    assert brief([one] * 1_000_000) == _cut("[" + ", ".join(["c"] * 100), 120)
    assert _Counted.calls <= 41
    _Counted.calls = 0
    nested = {"a": ([one] * 1_000_000, frozenset({1})), "b": [one] * 1_000_000}
    assert brief(nested, 30) == "{'a': ([c, c, c, c, c, c, c, c..."
    assert _Counted.calls <= 10
    # Text and bytes: a start of them, in the quotes and escapes repr chose for the whole.
    for text in ("'" * 3_000_000 + '"', "'" * 3_000_000, "x\n" * 1_000_000):
        assert brief(text, 50) == _cut(repr(text), 50)
        assert brief(text.encode(), 50) == _cut(repr(text.encode()), 50)
    assert brief("'" * 3_000_000 + '"', 5) == r"'\'\'..."
    assert brief("'" * 3_000_000, 5) == "\"''''..."


_PLAIN = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(max_size=30),
    st.binary(max_size=30),
)
_VALUES = st.recursive(
    _PLAIN,
    lambda inner: st.one_of(
        st.lists(inner, max_size=6),
        st.lists(inner, max_size=6).map(tuple),
        st.dictionaries(st.one_of(st.text(max_size=8), st.integers()), inner, max_size=6),
        st.frozensets(st.one_of(st.integers(), st.text(max_size=8)), max_size=6),
        st.sets(st.one_of(st.integers(), st.text(max_size=8)), max_size=6),
    ),
    max_leaves=40,
)


@settings(max_examples=400, deadline=None)
@given(value=_VALUES, size=st.integers(min_value=0, max_value=150))
def test_brief_shows_what_repr_shows_up_to_the_cut(value: Any, size: int) -> None:
    """``brief`` reads a value only as far as its cut, and shows exactly what ``repr``
    would, cut there: quotes and escapes of text and bytes, 1-tuples, empty sets and
    frozensets, dict order (the guard of the bounded reading above; it holds on main's
    whole-repr ``brief`` too); an integer longer than the cut is shown by its size
    (below)."""
    shown = repr(value)
    if type(value) is int and len(shown) > size:
        shown = f"{'a negative' if value < 0 else 'an'} integer of about {_digits(value)} digits"
    assert brief(value, size) == _cut(shown, size)


def _digits(value: int) -> str:
    """How many digits ``brief`` says an integer has: within one of its count."""
    said = round(value.bit_length() * 0.30103)
    assert abs(said - len(str(abs(value)))) <= 1
    return f"{said:,}"


def test_brief_of_a_container_that_holds_itself_is_repr_s() -> None:
    looped: list[Any] = [1]
    looped.append(looped)
    table: dict[str, Any] = {}
    table["me"] = table
    assert brief(looped) == "[1, [...]]" == repr(looped)
    assert brief(table) == "{'me': {...}}" == repr(table)
    assert brief([looped, looped]) == repr([looped, looped])


def test_json_keeps_every_extra_whose_name_is_taken_also_keys_that_are_no_str(
    nexus_logger: logging.Logger,
) -> None:
    """Regression (fifty-second pass): ``extra={1: a, "1": b}`` (``makeRecord`` takes any
    key) raised out of every formatter (``'int' object has no attribute 'startswith'``):
    the record was lost. Such a key is named by its ``str()``; in a JSON line a name
    taken, by one of its own keys (``exc`` too) or by an extra before it, is prefixed
    ``extra_`` until it is free, where one extra overwrote another before (``ts`` then
    ``extra_ts``), and a reader keeps one of two equal keys. (Fails with main's logs.py:
    no line written, ``records_lost()`` one more.)"""
    stream = configured("json")
    lost = records_lost()
    extra: dict[Any, Any] = {1: "int", "1": "str", "extra_1": "third", None: "none"}
    extra.update({"ts": "t", "extra_ts": "u", "exc": "mine", (2, 3): "pair"})
    try:
        raise ValueError("bad")
    except ValueError:
        logging.getLogger("nexus_trio.x").exception("odd keys", extra=extra)
    (record,) = json_lines(stream)
    assert records_lost() == lost
    assert {key: record[key] for key in record if key not in ("ts", "level", "logger")} == {
        "msg": "odd keys",
        "1": "int",
        "extra_1": "str",
        "extra_extra_1": "third",
        "None": "none",
        "extra_ts": "t",
        "extra_extra_ts": "u",
        "extra_exc": "mine",
        "(2, 3)": "pair",
        "exc": record["exc"],
    }
    assert record["exc"].endswith("ValueError: bad")
    stream = configured("compact")
    logging.getLogger("nexus_trio.x").info("odd keys", extra={1: "int", "1": "str"})
    assert stream.getvalue().rstrip("\n").endswith(" nexus_trio.x odd keys 1=int 1=str")
    assert records_lost() == lost


class _ReprBug:
    def __repr__(self) -> str:
        raise RuntimeError("repr bug")


def test_brief_of_a_value_whose_element_repr_raises_is_shown_as_error_repr_shows_it() -> None:
    """An element's ``repr`` that raises makes the value's raise: shown as before the
    bounded reading, ``<list, whose repr() raised RuntimeError: repr bug>``, not a
    half-shown list; one past the cut is never read."""
    assert brief([1, _ReprBug()]) == "<list, whose repr() raised RuntimeError: repr bug>"
    assert brief({"a": (_ReprBug(),)}) == "<dict, whose repr() raised RuntimeError: repr bug>"
    assert brief(["x" * 200, _ReprBug()]) == "['" + "x" * 118 + "..."


@pytest.fixture
def int_digits_unlimited() -> Iterator[None]:
    """Python's limit on the digits ``str()`` of an integer writes, off for one test."""
    limit = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)
    try:
        yield
    finally:
        sys.set_int_max_str_digits(limit)


def test_brief_shows_an_integer_too_long_for_its_cut_by_its_size() -> None:
    """Fifty-eighth pass: an integer past Python's 4,300 digits was shown
    ``<int, whose repr() raised ValueError: Exceeds the limit (4300 digits) ...>`` (a
    list holding one as ``<list, whose repr() raised ...>``), and one of 400 digits by
    its first 60, while a pool's refusals said ``an integer of about 5,000 digits``.
    ``brief`` shows one longer than its cut by its size, as the pool did, without
    building its digits; one that fits, or one in a container that ``repr`` writes, as
    ``repr`` does."""
    assert brief(10**5000) == "an integer of about 5,000 digits"
    assert brief(-(10**5000), 60) == "a negative integer of about 5,000 digits"
    assert brief([1, 10**5000]) == "[1, an integer of about 5,000 digits]"
    assert brief({"n": -(10**5000)}) == "{'n': a negative integer of about 5,000 digits}"
    assert brief(10**400, 60) == "an integer of about 400 digits"
    assert brief([10**400], 60) == _cut(repr([10**400]), 60)
    for fits in [10**119, -(10**118), 10**59 - 1]:
        assert brief(fits) == repr(fits)
    assert brief(10**120) == "an integer of about 120 digits"
    assert brief(-(10**119)) == "a negative integer of about 119 digits"


@pytest.mark.usefixtures("int_digits_unlimited")
def test_brief_shows_an_integer_by_its_size_with_python_s_digit_limit_off() -> None:
    """With ``sys.set_int_max_str_digits(0)`` a huge integer is still shown by its size,
    in a container too (its digits are not built: 10**10**6 would take seconds); one
    that fits the cut is written."""
    assert brief([10**10**6]) == "[an integer of about 1,000,000 digits]"
    assert brief(10**5000, 10**4) == repr(10**5000)  # (it fits the cut: written)
    assert brief([10**4000], 10**4) == repr([10**4000])


@pytest.mark.parametrize("fmt", ["compact", "json"])
def test_a_huge_field_is_cut_at_the_field_limit_saying_how_many_bytes(
    fmt: str, nexus_logger: logging.Logger
) -> None:
    """Fifty-fifth pass: a 10 MB ``extra=`` string (or message, or exception text) was
    written whole, a 10 MB log line. Each text of a line is cut at ``FIELD_LIMIT``
    characters (a traceback at ``TRACEBACK_LIMIT``, its exception's message at
    ``FIELD_LIMIT`` first, so its last line is kept), the cut said in UTF-8 bytes; a JSON
    line stays JSON, a compact record one line plus its traceback."""
    stream = configured(fmt)
    big = "x" * 10_000_000
    wide = "é" * 20_000  # (two UTF-8 bytes each: the cut is said in bytes)
    try:
        raise ValueError(big)
    except ValueError:
        logging.getLogger("nexus_trio.x").exception(
            big, extra={"big": big, "wide": wide, "nested": [{"k": big}], "small": "s"}
        )
    text = stream.getvalue()
    assert len(text) < 8 * FIELD_LIMIT, len(text)
    said = f"{'x' * FIELD_LIMIT}...[{10_000_000 - FIELD_LIMIT:,} bytes cut]"
    wide_said = f"{'é' * FIELD_LIMIT}...[{2 * (20_000 - FIELD_LIMIT):,} bytes cut]"
    if fmt == "json":
        (record,) = json_lines(stream)
        assert record["msg"] == said
        assert record["big"] == said
        assert record["wide"] == wide_said
        assert record["nested"] == [{"k": said}]
        assert record["small"] == "s"
        assert record["exc"].startswith("Traceback (most recent call last):")
        assert record["exc"].endswith(f"\nValueError: {said}")
    else:
        first, *traceback_lines = text.splitlines()
        assert f' {said} big="{said}" wide="{wide_said}" nested=' in first
        assert first.endswith(" small=s")
        assert traceback_lines[0] == "Traceback (most recent call last):"
        assert traceback_lines[-1] == f"ValueError: {said}"
    short = "x" * FIELD_LIMIT
    assert cut_field(short) is short
    assert len(cut_field("x" * (TRACEBACK_LIMIT + 1), TRACEBACK_LIMIT)) == TRACEBACK_LIMIT + 16


def _ping(n: int) -> int:
    return _pong(n)


def _pong(n: int) -> int:
    return _ping(n)


def _log_from_deep(depth: int) -> None:
    if depth:
        _log_from_deeper(depth - 1)
        return
    logging.getLogger("nexus_trio.x").error("deep", stack_info=True)  # (the stack's last)


def _log_from_deeper(depth: int) -> None:
    _log_from_deep(depth)  # (two functions: no "[Previous line repeated ...]")


@pytest.mark.parametrize("fmt", ["compact", "json"])
def test_a_traceback_past_its_limit_is_cut_in_its_middle_keeping_the_exception_line(
    fmt: str, nexus_logger: logging.Logger
) -> None:
    """Fifty-fifth pass review: a traceback (or stack) longer than ``TRACEBACK_LIMIT``
    had its end cut, and so the exception's own line: a RecursionError of two functions
    calling each other (1,000 frames, ~90 KB) was logged without ``RecursionError:
    maximum recursion depth exceeded``, a stack without its innermost frames. The middle
    is cut now, at line breaks, the cut said on a line of its own in UTF-8 bytes."""
    stream = configured(fmt)
    try:
        _ping(0)
    except RecursionError:
        exc_info = sys.exc_info()
        logging.getLogger("nexus_trio.x").exception("recursed")
    _log_from_deep(300)
    formatter = JsonFormatter() if fmt == "json" else CompactFormatter()
    whole = formatter.formatException(exc_info)
    assert len(whole) > TRACEBACK_LIMIT + 10_000, len(whole)  # (what is to be cut)
    if fmt == "json":
        error, deep = json_lines(stream)
        traceback_text, stack_text = error["exc"], deep["stack"]
    else:
        error_text, deep_text = re.split(r"\n(?=\S+ ERROR )", stream.getvalue().rstrip("\n"))
        traceback_text = error_text.split("\n", 1)[1]
        stack_text = deep_text.split("\n", 1)[1]
    lines = traceback_text.split("\n")
    assert lines[0] == "Traceback (most recent call last):"
    assert lines[-1] == "RecursionError: maximum recursion depth exceeded"
    (marker,) = [line for line in lines if line.startswith("...[")]
    head, tail = traceback_text.split(f"\n{marker}\n")
    assert whole.startswith(f"{head}\n")
    assert whole.endswith(f"\n{tail}")
    cut = len(whole) - len(head) - len(tail) - 2  # (ASCII: a byte a character)
    assert marker == f"...[{cut:,} bytes cut]"
    assert TRACEBACK_LIMIT - 400 < len(traceback_text) <= TRACEBACK_LIMIT + len(marker) + 2
    stack_lines = stack_text.split("\n")
    assert stack_lines[0] == "Stack (most recent call last):"
    assert stack_lines[-1].strip() == (
        'logging.getLogger("nexus_trio.x").error("deep", stack_info=True)  # (the stack\'s last)'
    )
    assert (
        sum(line.startswith("...[") and line.endswith(" bytes cut]") for line in stack_lines) == 1
    )
    assert len(stack_text) <= TRACEBACK_LIMIT + 40


def test_keys_of_an_extra_s_dict_named_alike_are_each_written(
    nexus_logger: logging.Logger,
) -> None:
    """Fifty-fifth pass review: a dict inside an extra became a JSON object keyed by each
    key's ``str()``, cut at ``FIELD_LIMIT``: keys ``1`` and ``"1"``, or two keys alike in
    their first 16,384 characters and as long, were one key, the last value written and
    the others lost with nothing said (4 keys, 2 written). Each is written now, a key
    named as one before it prefixed ``extra_`` as an extra's own name is."""
    stream = configured("json")
    long = "k" * FIELD_LIMIT
    cut_key = f"{long}...[1 bytes cut]"
    nested = {long + "a": 1, long + "b": 2, 1: "int", "1": "str", "extra_1": "taken"}
    logging.getLogger("nexus_trio.x").info("m", extra={"d": {"in": [nested]}})
    (record,) = json_lines(stream)
    assert record["d"] == {
        "in": [
            {
                cut_key: 1,
                f"extra_{cut_key}": 2,
                "1": "int",
                "extra_1": "str",
                "extra_extra_1": "taken",
            }
        ]
    }


@pytest.mark.parametrize("pad", range(6))
@pytest.mark.parametrize("char", ["\x85", "\u2028"])
def test_a_compact_traceback_cut_inside_a_long_line_lands_between_escapes(
    pad: int, char: str, nexus_logger: logging.Logger
) -> None:
    """Fifty-sixth pass: a compact traceback is escaped before it is cut, and the cut of
    a line longer than half of ``TRACEBACK_LIMIT`` (an exception's message of 16,384
    control characters, each four or six characters escaped) fell at a character count:
    inside an escape, ``\\x85`` left as ``x85`` after the cut (``pad`` 5). The cut moves
    back to the escape's backslash."""
    stream = configured("compact")
    try:
        raise ValueError("a" * pad + char * FIELD_LIMIT)
    except ValueError:
        logging.getLogger("nexus_trio.x").exception("m")
    text = stream.getvalue()
    escape = re.escape(escape_control(char))
    # the traceback's cut first (at the line break before the exception's line), the
    # message's own (at FIELD_LIMIT characters, before it was escaped) at the end
    marker = re.findall(r"\.\.\.\[[\d,]+ bytes cut\]", text)[0]
    head, tail = text.split(marker, 1)
    assert head.endswith("\n")
    assert re.fullmatch(rf"({escape})*(\.\.\.\[\d+ bytes cut\])?\n", tail), tail[:20]
    # what the marker says was cut is what is not there (ASCII: a byte a character)
    whole = "ValueError: " + escape_control(cut_field("a" * pad + char * FIELD_LIMIT))
    tail_line = tail[:-1]
    assert whole.endswith(tail_line)
    assert marker == f"...[{len(whole) - len(tail_line):,} bytes cut]"


@pytest.mark.parametrize("fmt", ["compact", "json"])
def test_the_items_of_an_extra_s_lists_and_dicts_are_bounded_saying_how_many_were_left_out(
    fmt: str, nexus_logger: logging.Logger
) -> None:
    """Fifty-sixth pass: the depth of an extra's lists and dicts was bounded (100) and
    each text in them, not how many items they hold: ``extra={"xs": list(range(10**6))}``
    wrote a JSON line of 7.9 MB, a list of 1,000 lists of 1,000 strings of 100 characters
    one of 104 MB (a compact line was cut at ``FIELD_LIMIT``, after ``str()`` had built
    the whole). ``ITEMS_LIMIT`` items in all are written of an extra, and at most
    ``TRACEBACK_LIMIT`` characters of its strings and keys; each container past them ends
    with ``...[N items left out]``; a JSON line stays JSON; a value within them is
    written as before."""
    stream = configured(fmt)
    rows = [["a" * 100] * 1000] * 1000
    extra = {
        "xs": list(range(10**6)),
        "d": {i: i for i in range(5000)},
        "rows": rows,
        "small": [1, (2, 3), {"k": "v"}],
    }
    logging.getLogger("nexus_trio.x").info("m", extra=extra)
    text = stream.getvalue()
    assert len(text) < 2 * TRACEBACK_LIMIT, len(text)
    if fmt == "json":
        (record,) = json_lines(stream)
        assert record["xs"] == [*range(ITEMS_LIMIT), "...[999,000 items left out]"]
        assert record["d"] == {
            **{str(i): i for i in range(ITEMS_LIMIT)},
            "...[4,000 items left out]": "...",
        }
        first, said = record["rows"]
        assert said == "...[999 items left out]"
        *strings, left = first
        assert set(strings) == {"a" * 100}
        # the characters ran out before the items: 656 strings (65,600 characters)
        assert len(strings) == TRACEBACK_LIMIT // 100 + 1
        assert left == f"...[{1000 - len(strings)} items left out]"
        assert record["small"] == [1, [2, 3], {"k": "v"}]
    else:
        (line,) = text.splitlines()
        xs = "[" + ", ".join(map(str, range(ITEMS_LIMIT))) + ", ...[999,000 items left out]]"
        d = "{" + ", ".join(f"{i}: {i}" for i in range(ITEMS_LIMIT))
        assert f" xs={json.dumps(xs)} " in line
        assert f" d={json.dumps(d + ', ...[4,000 items left out]: ...}')} " in line
        assert " rows=\"[['" in line
        assert line.endswith(" small=\"[1, (2, 3), {'k': 'v'}]\"")


class _LongStr:
    """A value of no JSON type whose ``str`` is 100,000 characters."""

    def __str__(self) -> str:
        return "o" * 100_000


@pytest.mark.parametrize(
    ("kind", "kept"),
    [("bytes", 4), ("objects", 4), ("ints", TRACEBACK_LIMIT // 3986 + 1)],
)
def test_the_bytes_objects_and_ints_of_an_extra_s_lists_count_in_its_character_bound(
    kind: str, kept: int, nexus_logger: logging.Logger
) -> None:
    """Fifty-seventh pass: only the strings and keys of an extra's lists and dicts were
    counted in its ``TRACEBACK_LIMIT`` characters; a list of 500 ``bytes`` of 100 KB (or
    of 500 values whose ``str`` is that long) wrote a ``json`` line of 8.2 MB, each cut
    at ``FIELD_LIMIT`` only, and 1,000 ints of 4,000 digits one of 4 MB. Their written
    length counts now (bytes by their length, an int by its digits, another value by its
    ``str``, each at most ``FIELD_LIMIT``): the list ends with the items left out."""
    values: dict[str, list[Any]] = {
        "bytes": [b"b" * 100_000] * 500,
        "objects": [_LongStr()] * 500,
        "ints": [10**3999] * 1000,
    }
    stream = configured("json")
    logging.getLogger("nexus_trio.x").info("m", extra={"xs": values[kind]})
    assert len(stream.getvalue()) < 2 * TRACEBACK_LIMIT, len(stream.getvalue())
    (record,) = json_lines(stream)
    *written, said = record["xs"]
    assert len(written) == kept
    assert said == f"...[{len(values[kind]) - kept} items left out]"


class _ReprOf:
    """A value of no JSON type whose ``str`` and ``repr`` are given."""

    def __init__(self, shown: str, represented: str) -> None:
        self.shown, self.represented = shown, represented

    def __str__(self) -> str:
        return self.shown

    def __repr__(self) -> str:
        return self.represented


@pytest.mark.parametrize("fmt", ["compact", "full", "pretty"])
def test_the_text_formats_count_an_extra_s_items_by_the_repr_they_write(
    fmt: str, nexus_logger: logging.Logger
) -> None:
    """Fifty-seventh pass's review: an extra's values of other types counted their
    ``str`` in the character bound, but the text formats write a list's items by their
    ``repr`` (the ``str`` of a list): 500 values written ``<v>`` whose ``str`` is 100 KB
    were written as 4 of them and ``...[496 items left out]``; 500 whose ``repr`` is
    100 KB (a ``str`` of one character) had a line of 50 MB built to be cut. Now each
    counts what its format writes: all 500 ``<v>`` are written, the long ones left out."""
    log = logging.getLogger("nexus_trio.x")
    stream = configured(fmt)
    log.info("m", extra={"xs": [_ReprOf("s" * 100_000, "<v>") for _ in range(500)]})
    written = stream.getvalue()
    assert (written.count("<v>"), "left out" in written) == (500, False)
    stream = configured(fmt)
    log.info("m", extra={"xs": [_ReprOf("s", "r" * 100_000) for _ in range(500)]})
    # (the line is cut at FIELD_LIMIT before the items left out are said: what it cut)
    (cut,) = re.findall(r"\.\.\.\[([\d,]+) bytes cut\]", stream.getvalue())
    assert int(cut.replace(",", "")) < 5 * 100_000, cut


def _long_repr(value: Any) -> Any:
    """``value`` as an instance of a subclass of its type whose ``repr`` is 100 KB."""
    kind = type(value)
    return type(f"Long{kind.__name__}", (kind,), {"__repr__": lambda _: "r" * 100_000})(value)


@pytest.mark.parametrize("value", ["a", 1, 1.0, b"a"], ids=type)
def test_a_str_int_float_or_bytes_subclass_counts_the_repr_the_text_formats_write(
    value: Any, nexus_logger: logging.Logger
) -> None:
    """Fifty-eighth pass: an extra's items of a ``str``, ``int``, ``float`` or ``bytes``
    subclass counted what they hold (a float none) in the character bound, but the text
    formats write such an item by its own ``repr``: a list of 100 whose ``repr`` is
    1 MB had a line of 100 MB built to be cut at ``FIELD_LIMIT`` (0.35 s). Now each
    counts the ``repr`` written (the list ends with the items left out); ``json``, which
    writes one as its base type (a ``bytes`` subclass as its ``str``), writes all."""
    log = logging.getLogger("nexus_trio.x")
    stream = configured("compact")
    log.info("m", extra={"xs": [_long_repr(value)] * 100})
    # (the line is cut at FIELD_LIMIT before the items left out are said: what it cut)
    (cut,) = re.findall(r"\.\.\.\[([\d,]+) bytes cut\]", stream.getvalue())
    assert int(cut.replace(",", "")) < 5 * 100_000, cut
    stream = configured("json")
    log.info("m", extra={"xs": [_long_repr(value)] * 100})
    (record,) = json_lines(stream)
    assert record["xs"] == [value if not isinstance(value, bytes) else str(value)] * 100


class _ShortLen(list[int]):
    """A list whose ``len()`` says 5, whatever it holds."""

    def __len__(self) -> int:
        return 5


class _LongIter(list[int]):
    """An empty list whose walk gives 5,000 items."""

    def __iter__(self) -> Iterator[int]:
        return iter(range(5_000))


@pytest.mark.parametrize("fmt", ["compact", "json"])
def test_the_items_left_out_of_a_list_whose_len_lies_are_never_a_negative_count(
    fmt: str, nexus_logger: logging.Logger
) -> None:
    """Fifty-eighth pass: the items left out of a container past the bound were counted
    by its own ``len()``: a list subclass of 5,000 items whose ``__len__`` says 5 was
    written ``...[-995 items left out]``, an empty one whose ``__iter__`` gives 5,000
    items ``...[-1,000 items left out]``. Now they are counted by the built-in ``len``
    (4,000), and when the walk gave more than that, said without a number."""
    stream = configured(fmt)
    log = logging.getLogger("nexus_trio.x")
    log.info("m", extra={"short": _ShortLen(range(5_000)), "long": _LongIter()})
    said = re.findall(r"\.\.\.\[([^]]+) items left out\]", stream.getvalue())
    assert said == ["4,000", "more"]


def _chained(n: int) -> None:
    try:
        if n:
            _chained(n - 1)
        raise ValueError("base")
    except ValueError as exc:
        raise ValueError(f"level {n}") from exc


@pytest.mark.parametrize("case", ["source", "name", "chain", "group"])
def test_the_pretty_traceback_is_bounded_in_code_names_chain_and_group(
    case: str, tmp_path: Path, nexus_logger: logging.Logger
) -> None:
    """Fifty-sixth pass: the ``pretty`` format's rich traceback had its exception texts
    cut, not the rest: a source line of 2 MB drew 1.9 MB of code (76 s), a function
    named with 2 MB 2.8 MB, a chain of 500 exceptions 1 MB (42 s), and a group drew every
    exception it holds. Now a frame whose lines around it hold one past 1,000 characters
    is drawn without its code, a frame's function and file name are cut at
    ``FIELD_LIMIT``, a chain keeps its 5 newest and 5 oldest exceptions and a group 15
    (as CPython's traceback), each cut said in a note. (Frames: rich's ``max_frames``,
    100 a stack, already.)"""
    stream = configured("pretty")
    if case == "source":
        path = tmp_path / "long_line.py"
        path.write_text("def fail():\n    x = 1; " + "y = 2; " * 20_000 + "raise KeyError('k')\n")
        namespace: dict[str, Any] = {}
        exec(compile(path.read_text(), str(path), "exec"), namespace)
        failing = namespace["fail"]
    elif case == "name":

        def failing() -> None:
            raise KeyError("k")

        failing.__code__ = failing.__code__.replace(co_name="n" * 200_000)
    elif case == "chain":

        def failing() -> None:
            _chained(60)

    else:

        def failing() -> None:
            raise ExceptionGroup("g", [KeyError(i) for i in range(40)])

    try:
        failing()
    except Exception:
        logging.getLogger("nexus_trio.x").exception("failed")
    text = stream.getvalue()
    assert len(text) < 4 * FIELD_LIMIT, len(text)
    if case == "source":
        assert "y = 2;" not in text
        assert "long_line.py" in text.replace("\n", "")  # (the frame is there, its code not)
    elif case == "name":
        assert text.count("n") > FIELD_LIMIT
    elif case == "chain":
        shown = sorted(int(n) for n in re.findall(r"ValueError: level (\d+)", text))
        assert shown == [0, 1, 2, 3, 56, 57, 58, 59, 60]
        assert "...[52 more exceptions of the chain not shown]" in " ".join(text.split())
    else:
        assert text.count("Sub-exception #") == 15
        assert "...[25 more exceptions of the group not shown]" in " ".join(text.split())


@pytest.mark.parametrize(("depth", "not_drawn"), [(3, "3 frames"), (1, "1 frame")])
def test_the_pretty_traceback_lexes_at_most_code_lines_limit_lines_of_source_a_record(
    tmp_path: Path, nexus_logger: logging.Logger, depth: int, not_drawn: str
) -> None:
    """Fifty-seventh pass: rich lexes a frame's file from its first line to the frame's,
    anew for each frame: 22 frames at line 3,000 of a file took 62 s to log in the
    ``pretty`` format (the chain case above, 10 exceptions of 2 frames at line 2,030,
    19 s). The frames whose code would take rich past ``_CODE_LINES_LIMIT`` lines are
    drawn without it, the innermost first drawn with it; each frame's file, line and
    function stay."""
    path = tmp_path / "deep_in_a_file.py"
    filler = "".join(f"x_{i} = {i}\n" for i in range(2_000))
    path.write_text(filler + "def fail(k):\n    if k: fail(k - 1)\n    raise ValueError('v')\n")
    scope: dict[str, Any] = {}
    exec(compile(path.read_text(), str(path), "exec"), scope)
    stream = configured("pretty")
    try:
        scope["fail"](depth)
    except ValueError:
        logging.getLogger("nexus_trio.x").exception("failed")
    text = stream.getvalue()
    assert text.replace("\n", "").count("deep_in_a_file.py:") == depth + 1
    # (rich marks a frame's own line in its code: ❱ 2003, the innermost; ❱ 2002 the rest)
    drawn = re.findall(r"❱ (\d+)", text)
    assert drawn == ["2002", "2003"], drawn
    # (the fifty-seventh pass's review: the frames without code were left unexplained)
    said = f"the code of {not_drawn} is not drawn: the pretty format lexes at most 5,000 lines"
    assert said in " ".join(text.split())


class _Unwalkable(list[int]):
    """A list whose iteration raises (its ``repr`` does not iterate)."""

    def __iter__(self) -> Any:
        raise RuntimeError("not walkable")


class _NoItems(dict[str, int]):
    """A dict whose ``items()`` raises."""

    def items(self) -> Any:
        raise RuntimeError("no items")


@pytest.mark.parametrize("fmt", ["compact", "json", "pretty"])
def test_an_extra_whose_walk_raises_is_written_as_its_str(
    fmt: str, nexus_logger: logging.Logger
) -> None:
    """Fifty-sixth pass: bounding an extra's items walks it before the format writes it;
    a list subclass whose ``__iter__`` raises (or a dict's ``items()``) made the compact
    and pretty formats lose the record, which wrote its ``str`` before (the JSON format
    lost it before too). It is written as its ``str``, as a value of no JSON type is."""
    stream = configured(fmt)
    log = logging.getLogger("nexus_trio.x")
    log.info("m", extra={"v": _Unwalkable([1, 2]), "after": "kept"})
    log.info("m", extra={"v": _NoItems(a=1), "after": "kept"})
    text = stream.getvalue()
    if fmt == "json":
        assert [(r["v"], r["after"]) for r in json_lines(stream)] == [
            ("[1, 2]", "kept"),
            ("{'a': 1}", "kept"),
        ]
    else:
        assert text.count("after=kept") == 2, text
        assert 'v="[1, 2]"' in text
        assert "v=\"{'a': 1}\"" in text


def test_a_small_extra_holding_itself_is_written_as_its_str_writes_it(
    nexus_logger: logging.Logger,
) -> None:
    """Fifty-sixth pass: an extra within the items' bounds is written as it was before
    they were bounded (its ``str``), a container inside itself too: a tuple in a list
    in it was copied and written ``([[...]],)``, a named tuple's name lost, where its
    ``str`` is ``([(...)],)``, ``P(x=[P(x=[...])])``."""
    point = collections.namedtuple("P", "x")
    pair: tuple[list[Any]] = ([],)
    pair[0].append(pair)
    named = point([])
    named.x.append(named)
    stream = configured("compact")
    logging.getLogger("nexus_trio.x").info("m", extra={"pair": pair, "named": named})
    (line,) = stream.getvalue().splitlines()
    assert line.endswith(' pair=([(...)],) named="P(x=[P(x=[...])])"'), line


def test_the_pretty_traceback_draws_the_code_of_a_file_a_long_lined_one_is_a_prefix_of(
    tmp_path: Path, nexus_logger: logging.Logger
) -> None:
    """Fifty-sixth pass: a file with a line past 1,000 characters near a frame is drawn
    without code (rich's ``suppress``), and rich suppresses every file whose name
    starts with a suppressed path: the code of ``tool_b.py`` was not drawn when a
    frame of ``tool`` (a script without a suffix, in the same folder) was long-lined."""
    tool = tmp_path / "tool"
    tool.write_text(f"x = {'a' * 2000!r}\ndef main(fail):\n    fail()\n")
    helper = tmp_path / "tool_b.py"
    helper.write_text("def fail():\n    marker_of_tool_b = 1\n    raise ValueError('boom')\n")
    scope: dict[str, Any] = {}
    exec(compile(tool.read_text(), str(tool), "exec"), scope)
    exec(compile(helper.read_text(), str(helper), "exec"), scope)
    stream = configured("pretty")
    try:
        scope["main"](scope["fail"])
    except ValueError:
        logging.getLogger("nexus_trio.x").exception("failed")
    text = stream.getvalue()
    assert "marker_of_tool_b" in text, text
    assert "aaaaaaaaaa" not in text


class _NegativeBits(int):
    def bit_length(self) -> int:
        return -(10**9)


class _ZeroBits(int):
    def bit_length(self) -> int:
        return 0


class _NoBytes(bytes):
    def __len__(self) -> int:
        return 0


class _NoChars(str):
    def __len__(self) -> int:
        return 0


def test_an_extra_s_int_bytes_and_str_subclasses_count_what_they_hold(
    nexus_logger: logging.Logger,
) -> None:
    """Fifty-seventh pass: the character bound of an extra's items asked an int its
    ``bit_length()`` and bytes their ``len()``, and ``cut_field`` a string its ``len()``:
    a subclass's may say anything. An int whose ``bit_length`` says -10**9 gave the
    bound 300 million characters back (1,000 strings of 16 KB after it wrote a JSON line
    of 16 MB), bytes whose ``len`` says 0 counted none (500 of 100 KB, 8.2 MB), a str
    whose ``len`` says 0 was never cut (4 of 100 KB, 400 KB), and an int of 5,000 digits
    whose ``bit_length`` says 0 made ``json.dumps`` raise, the record lost. Now each is
    counted and cut by what it holds (``int.bit_length``, the bytes' buffer, the str's
    own text)."""
    stream = configured("json")
    log = logging.getLogger("nexus_trio.x")
    log.info("int", extra={"xs": [_NegativeBits(1)] + ["x" * FIELD_LIMIT] * 1_000})
    log.info("bytes", extra={"xs": [_NoBytes(b"b" * 100_000)] * 500})
    log.info("str", extra={"xs": [_NoChars("s" * 100_000)] * 4, "s": _NoChars("s" * 10**6)})
    log.info("huge", extra={"n": _ZeroBits(10**5000)})
    lines = stream.getvalue().splitlines()
    assert max(len(line) for line in lines) < 2 * TRACEBACK_LIMIT, [len(x) for x in lines]
    assert [json.loads(line)["msg"] for line in lines] == ["int", "bytes", "str", "huge"]
    assert json.loads(lines[3])["n"] == "<str() failed: ValueError>"  # (as a plain int's)
