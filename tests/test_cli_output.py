"""``nexus`` when its own output cannot be written: a full disk under standard output or
standard error, a closed descriptor. Real processes: a file-size limit of 0 (``ulimit -f
0``, with SIGXFSZ ignored) makes every write to a regular file fail with ``EFBIG`` ("File
too large"), as a full disk fails with ``ENOSPC``, on any POSIX system."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import pytest
from rich.console import Console

from nexus_trio.cli import main
from nexus_trio.cli._view import summary_table
from nexus_trio.logs import flush_logs, log_calls_failed, records_lost

from .test_logs import RaisingFilter

RECORD = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z ", re.MULTILINE)
RUN = ["run", "-n", "10", "-d", "0.2", "--json", "--no-live"]


def nexus_env(cwd: Path, *, unbuffered: bool = False) -> dict[str, str]:
    """The environment of a ``nexus`` run in ``cwd``: no ``NEXUS_*`` variables, no config
    file, wide and plain output."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("NEXUS_") and k != "PYTHONUNBUFFERED"
    }
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    return env | {"XDG_CONFIG_HOME": str(cwd / "xdg"), "COLUMNS": "200", "NO_COLOR": "1"}


def nexus(
    args: list[str], cwd: Path, redirect: str, *, limited: bool = False, unbuffered: bool = False
) -> Any:
    """``python -m nexus_trio.cli ARGS REDIRECT`` in bash, with writes to regular files
    failing (``EFBIG``) when ``limited``. Standard error is buffered, as Python makes it
    unless ``unbuffered`` (``PYTHONUNBUFFERED=1``, as with ``python -u``)."""
    command = shlex.join([sys.executable, "-m", "nexus_trio.cli", *args])
    prefix = "ulimit -f 0; trap '' XFSZ; " if limited else ""
    return subprocess.run(
        ["bash", "-c", f"{prefix}exec {command} {redirect}"],
        cwd=cwd,
        env=nexus_env(cwd, unbuffered=unbuffered),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_summary_that_cannot_be_written_is_a_one_line_error_and_status_1(
    tmp_path: Path,
) -> None:
    out = tmp_path / "summary.json"
    result = nexus(RUN, tmp_path, f"> {shlex.quote(str(out))}", limited=True)
    assert result.returncode == 1
    assert "nexus: error: cannot write to standard output: File too large" in result.stderr
    assert "Traceback" not in result.stderr
    assert out.read_bytes() == b""
    # The same with the table instead of JSON, and for help text.
    for args in (RUN[:-2], ["--help"], ["config", "show"]):
        result = nexus(args, tmp_path, f"> {shlex.quote(str(out))}", limited=True)
        assert result.returncode == 1, args
        assert result.stderr.strip().splitlines()[-1] == (
            "nexus: error: cannot write to standard output: File too large"
        ), args


def test_a_closed_standard_output_is_named_too(tmp_path: Path) -> None:
    result = nexus(RUN, tmp_path, ">&-")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "nexus: error: cannot write to standard output: it is closed"
    )


@pytest.mark.parametrize(
    ("redirect", "limited", "why"),
    [("> refused.json", True, "File too large"), (">&-", False, "it is closed")],
    ids=["full", "closed"],
)
def test_a_refused_run_json_whose_object_cannot_be_written_still_says_why_it_was_refused(
    tmp_path: Path, redirect: str, limited: bool, why: str
) -> None:
    """Fifty-fifth pass (review): ``nexus run --json`` refused by a usage error writes one
    JSON object on standard output; when that cannot be written (a full disk, ``>&-``)
    the write's ``OSError``, raised in the usage error's handling, took its place: the
    usage box, what was wrong, was never shown, only ``cannot write to standard output``.
    The refusal is said first now, then the output failure (status 1, as for any output
    of nexus's own that cannot be written), as a config error's already was."""
    result = nexus(["run", "--json", "-n", "abc"], tmp_path, redirect, limited=limited)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert "Invalid value for '--agents'" in result.stderr
    assert "got 'abc'" in result.stderr
    assert lines[-1] == f"nexus: error: cannot write to standard output: {why}"
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("unbuffered", [False, True])
def test_log_records_a_full_disk_refuses_are_counted_in_the_summary(
    tmp_path: Path, unbuffered: bool
) -> None:
    # What the run logs when standard error can be written ...
    written = nexus(RUN, tmp_path, "", unbuffered=unbuffered)
    assert written.returncode == 0, written.stderr
    records = len(RECORD.findall(written.stderr))
    assert records >= 2  # the config line and the "running" line at least
    assert json.loads(written.stdout)["log_records_lost"] == 0
    # ... is lost and counted when it cannot; the run itself is unaffected, and the
    # buffer of standard error holds nothing of them for Python's last flush to fail on
    # (it made the status 120).
    log = tmp_path / "nexus.log"
    full = nexus(RUN, tmp_path, f"2> {shlex.quote(str(log))}", limited=True, unbuffered=unbuffered)
    assert full.returncode == 0
    assert log.read_bytes() == b""
    summary = json.loads(full.stdout)
    assert summary["log_records_lost"] == records
    assert summary["conserved"] is True
    assert summary["handled"] > 0
    # A closed standard error loses them the same way.
    closed = nexus(RUN, tmp_path, "2>&-")
    assert closed.returncode == 0
    summary = json.loads(closed.stdout)
    assert summary["log_records_lost"] == records
    assert summary["conserved"] is True


def full_pipe() -> tuple[int, int]:
    """A pipe (read end, write end) already full, as one whose reader stopped reading."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    try:
        while True:
            os.write(write_end, b"x" * 4096)
    except BlockingIOError:
        pass
    os.set_blocking(write_end, True)  # (the flag is the pipe's: the child's too)
    return read_end, write_end


@pytest.mark.parametrize("fmt", ["compact", "pretty"])
def test_nexus_run_with_standard_error_a_pipe_nobody_reads_finishes_and_counts_its_losses(
    tmp_path: Path, fmt: str
) -> None:
    """Standard error a pipe whose reader stopped reading (a stuck log shipper, Docker's
    blocking log mode with its buffer full): the first log record blocked ``nexus run``
    for good. The run finishes now, exits 0, and its summary counts every record that
    could not be written."""
    args = [*RUN, "--log-format", fmt]
    records = len(RECORD.findall(nexus([*RUN, "--log-format", "compact"], tmp_path, "").stderr))
    read_end, write_end = full_pipe()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "nexus_trio.cli", *args],
            stderr=write_end,
            stdout=subprocess.PIPE,
            cwd=tmp_path,
            env=nexus_env(tmp_path),
            text=True,
            timeout=60,  # today's run hangs in its first log record
        )
        os.set_blocking(read_end, False)
        taken = bytearray()
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(read_end, 65536):
                taken += chunk
    finally:
        os.close(read_end)
        os.close(write_end)
    assert result.returncode == 0
    summary = json.loads(result.stdout)
    assert summary["conserved"] is True
    assert summary["handled"] > 0
    assert summary["log_records_lost"] == records
    assert set(taken) == {ord("x")}  # nothing of the run's got into the pipe


@pytest.mark.parametrize("fmt", ["json", "pretty"])
def test_every_log_format_counts_what_it_could_not_write(tmp_path: Path, fmt: str) -> None:
    log = tmp_path / "nexus.log"
    result = nexus(
        [*RUN, "--log-format", fmt], tmp_path, f"2> {shlex.quote(str(log))}", limited=True
    )
    assert result.returncode == 0
    assert json.loads(result.stdout)["log_records_lost"] >= 2
    assert log.read_bytes() == b""


def test_the_table_summary_shows_the_records_lost(tmp_path: Path) -> None:
    log = tmp_path / "nexus.log"
    result = nexus(RUN[:-2], tmp_path, f"2> {shlex.quote(str(log))}", limited=True)
    assert result.returncode == 0
    assert re.search(r"log records lost\s+[1-9]\d* \(writing them failed", result.stdout)
    # and a run whose logs were written has no such row
    assert "log records lost" not in nexus(RUN[:-2], tmp_path, "").stdout


@pytest.mark.parametrize("fmt", ["compact", "json", "pretty"])
def test_a_program_started_with_standard_error_closed_counts_its_log_records(
    tmp_path: Path, fmt: str
) -> None:
    """Under plain Python (no ``nexus`` command around it) a closed standard error is
    ``sys.stderr = None``: the handler counts what it cannot write, nothing crashes."""
    code = (
        "import logging\n"
        "from nexus_trio.logs import configure_logging, records_lost\n"
        f"configure_logging('info', {fmt!r})\n"
        "for i in range(3):\n"
        "    logging.getLogger('nexus_trio.test').info('record %d', i)\n"
        "print(records_lost())\n"
    )
    result = subprocess.run(
        ["bash", "-c", f"exec {shlex.quote(sys.executable)} -c {shlex.quote(code)} 2>&-"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0
    assert result.stdout.strip() == "3"


class _Refusing(io.RawIOBase):
    """Standard error's file, refusing every write: a full disk (``ENOSPC``) or a reader
    gone (``EPIPE``)."""

    def __init__(self, code: int) -> None:
        super().__init__()
        self.code = code
        self.writes = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.writes += 1
        raise OSError(self.code, os.strerror(self.code))


def _run_in_process(args: list[str], stderr: TextIO | None) -> tuple[Any, dict[str, Any]]:
    """``nexus ARGS`` in this process (``nexus_trio.cli.main``), standard error ``stderr``:
    its exit status and its ``--json`` summary."""
    out = io.StringIO()
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, stderr  # type: ignore[assignment]
    try:
        with pytest.raises(SystemExit) as exited:
            main(args)
    finally:
        sys.stdout, sys.stderr = saved
    return exited.value.code, json.loads(out.getvalue())


@pytest.mark.usefixtures("restore_logging", "isolated")
@pytest.mark.parametrize("fmt", ["compact", "json", "pretty"])
@pytest.mark.parametrize(
    "stderr",
    ["full disk", "full disk, unbuffered", "broken pipe", "closed"],
)
def test_nexus_run_in_process_with_standard_error_failing_finishes_and_counts_its_own_losses(
    fmt: str, stderr: str
) -> None:
    """Every log record of the run is lost (counted), the run itself is not: it finishes,
    exits 0 with its books balanced, and its summary counts the records *it* lost, also
    when an earlier run in the same process lost some (``records_lost()`` is
    process-wide)."""
    code = errno.EPIPE if stderr == "broken pipe" else errno.ENOSPC
    statuses, reported, lost = [], [], []
    for _ in range(2):
        raw = _Refusing(code)
        if stderr == "closed":
            stream: TextIO | None = None
        elif stderr == "full disk, unbuffered":
            stream = io.TextIOWrapper(raw, encoding="utf-8", write_through=True)
        else:
            stream = io.TextIOWrapper(io.BufferedWriter(raw), encoding="utf-8")
        before = records_lost()
        status, summary = _run_in_process(
            ["run", "-n", "10", "-d", "0.1", "--json", "--no-live", "-f", fmt],
            stream,
        )
        statuses.append(status)
        lost.append(records_lost() - before)
        reported.append(summary["log_records_lost"])
        assert summary["conserved"] is True
        assert summary["handled"] > 0
        assert stderr == "closed" or raw.writes >= lost[-1]
    assert statuses == [0, 0]
    assert lost[0] >= 2  # the config line and the "running" line at least
    assert reported == lost


@pytest.mark.usefixtures("restore_logging", "isolated")
def test_nexus_run_workers_counts_the_lines_of_the_parent_its_standard_error_lost(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``nexus run --workers 2 2>/dev/full`` said ``log_records_lost: 7``, the sum of its
    workers' (4 + 3), when 8 were lost: the parent's own line (``started nats-server``;
    also ``worker-1 died``, a forced stop) was counted nowhere. Here the workers are
    stood in for by two such lines of the parent and a summary of none lost: the run's
    summary counts the two."""
    from nexus_trio.cli import _cluster_cmd

    def two_lines(count: int, argv: Any, **kwargs: Any) -> Any:
        logger = logging.getLogger("nexus_trio.cli")
        logger.error("worker-1 died: exit status 1")
        logger.warning("worker-0 forced")
        summary = _cluster_cmd.not_started_summary(
            count, private_server=True, stopped_by="duration"
        )
        assert summary["log_records_lost"] == summary["log_calls_failed"] == 0
        return summary, 0

    monkeypatch.setattr(_cluster_cmd, "run_workers", two_lines)
    lost, failed = records_lost(), log_calls_failed()
    status, summary = _run_in_process(
        ["run", "--workers", "2", "-d", "0.1", "--json", "--no-live"],
        io.TextIOWrapper(io.BufferedWriter(_Refusing(errno.ENOSPC)), encoding="utf-8"),
    )
    assert status == 0
    assert records_lost() - lost >= 2
    assert summary["log_records_lost"] == records_lost() - lost
    assert summary["log_calls_failed"] == log_calls_failed() - failed == 0


class _RefusingLater(_Refusing):
    """A full disk (``ENOSPC``) under a descriptor (``/dev/null``'s, which ``poll`` finds
    writable), so that ``nexus run`` queues its log records for a writer thread; the
    writes of that thread wait for :attr:`released` before they fail."""

    def __init__(self, fd: int) -> None:
        super().__init__(errno.ENOSPC)
        self.fd = fd
        self.released = threading.Event()

    def fileno(self) -> int:
        return self.fd

    def write(self, b: Any) -> int:
        if threading.current_thread() is not threading.main_thread():
            assert self.released.wait(30), "the test never released the log writer"
        return super().write(b)


@pytest.mark.usefixtures("restore_logging", "isolated")
@pytest.mark.parametrize("fmt", ["compact", "json", "pretty"])
def test_nexus_run_counts_the_records_its_log_writer_lost_after_the_summary_was_built(
    monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    """``test_every_log_format_counts_what_it_could_not_write`` failed once under load:
    1 record lost where 2 were. The summary read ``records_lost()`` when it was built,
    and again only before the last flush of the queue; a record the writer thread counted
    lost between the two (it was still being written when the summary was built) was in
    neither. Here the writer fails its records exactly then: all of them are counted."""
    from nexus_trio.cli import _run

    built = _run.build_summary

    def build_then_let_the_writer_fail(*args: Any, **kwargs: Any) -> dict[str, Any]:
        summary = built(*args, **kwargs)
        assert summary["log_records_lost"] == 0  # (nothing failed yet: the writer waits)
        raw.released.set()
        assert flush_logs(30)  # its records: all counted lost now
        return summary

    monkeypatch.setattr(_run, "build_summary", build_then_let_the_writer_fail)
    fd = os.open(os.devnull, os.O_WRONLY)
    raw = _RefusingLater(fd)
    try:
        before = records_lost()
        status, summary = _run_in_process(
            ["run", "-n", "10", "-d", "0.1", "--json", "--no-live", "-f", fmt],
            io.TextIOWrapper(io.BufferedWriter(raw), encoding="utf-8"),
        )
        lost = records_lost() - before
    finally:
        raw.released.set()
        os.close(fd)
    assert status == 0
    assert raw.writes == lost >= 2  # the config line and the "running" line at least
    assert summary["log_records_lost"] == lost
    assert summary["conserved"] is True


FAILING_APP = """
import trio.testing
from nexus_trio import agent

@agent(name="failing")
async def failing(ctx, msg):
    raise RuntimeError("boom")

async def main(kernel):
    ref = kernel.spawn(failing)
    for i in range(4):
        await kernel.send(ref, i)
    await trio.testing.wait_all_tasks_blocked()
"""


@pytest.fixture
def broken_dead_letter_log() -> Iterator[None]:
    logger = logging.getLogger("nexus_trio.dead_letters")
    broken, level = RaisingFilter(), logger.level
    logger.setLevel(logging.DEBUG)
    logger.addFilter(broken)
    yield
    logger.removeFilter(broken)
    logger.setLevel(level)


@pytest.mark.usefixtures("restore_logging", "broken_dead_letter_log")
def test_nexus_run_counts_the_log_calls_of_the_run_that_raised(isolated: Path) -> None:
    """A raising filter of the application on the dead-letter logger: each of the run's
    dead letters is still counted, and the summary says how many log calls raised (in
    this run: a second run in the process counts its own), in JSON and in the table."""
    (isolated / "failing_app.py").write_text(FAILING_APP)
    reported, failed = [], []
    for _ in range(2):
        before = log_calls_failed()
        status, summary = _run_in_process(
            ["run", "--app", "failing_app:main", "--json", "--no-live"], io.StringIO()
        )
        assert status == 0
        assert summary["dead_letters_by_reason"] == {"handler_error": 4}
        assert summary["conserved"] is True
        failed.append(log_calls_failed() - before)
        reported.append(summary["log_calls_failed"])
    assert reported == failed == [4, 4]
    console = Console(record=True, width=200)
    console.print(summary_table(summary))
    assert re.search(
        r"log calls failed\s+4 \(a logging filter or handler raised", console.export_text()
    )


@pytest.fixture
def broken_cli_log() -> Iterator[list[str]]:
    """A filter of the application on ``nexus`` 's own loggers that raises on every record
    (all levels on); yields the messages it was called for. Removed afterwards."""
    calls: list[str] = []

    class Broken(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            calls.append(str(record.msg))
            raise KeyError("the filter's bug")

    loggers = [logging.getLogger(name) for name in ("nexus_trio.cli", "nexus_trio.config")]
    broken, levels = Broken(), [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.DEBUG)
        logger.addFilter(broken)
    yield calls
    for logger, level in zip(loggers, levels, strict=True):
        logger.removeFilter(broken)
        logger.setLevel(level)


@pytest.mark.usefixtures("restore_logging", "isolated")
@pytest.mark.parametrize("args", [["--json"], []], ids=["json", "table"])
def test_nexus_run_with_its_own_log_calls_raising_finishes_and_prints_its_summary(
    broken_cli_log: list[str], args: list[str]
) -> None:
    """A raising filter of the application on ``nexus_trio.cli`` and
    ``nexus_trio.config``: the run's own log lines (the config's source, "spawning",
    "running", the shutdown, "run took") raised out of the run, which then failed with a
    traceback and printed no summary. The run finishes now, balanced, status 0, and its
    summary counts them."""
    before = log_calls_failed()
    out = io.StringIO()
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, io.StringIO()
    try:
        with pytest.raises(SystemExit) as exited:
            main(["run", "-n", "10", "-d", "0.1", "--no-live", *args])
    finally:
        sys.stdout, sys.stderr = saved
    assert exited.value.code == 0
    assert len(broken_cli_log) >= 3
    assert log_calls_failed() - before == len(broken_cli_log)
    if args:
        summary = json.loads(out.getvalue())
        assert summary["conserved"] is True
        assert summary["handled"] > 0
        # all but the last line, "run took", which comes after the summary is made
        assert broken_cli_log[-1].startswith("run took")
        assert summary["log_calls_failed"] == len(broken_cli_log) - 1
    else:
        text = out.getvalue()
        assert re.search(r"log calls failed\s+\d+ \(a logging filter or handler raised", text)
        assert re.search(r"accounting .* ✓", text, re.DOTALL)
