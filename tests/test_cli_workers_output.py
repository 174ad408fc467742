"""``nexus run --workers N``: what reaches the parent's standard error, whole and counted.

Lines far over ``PIPE_BUF`` (which a full pipe takes in pieces) through a pipe read
slowly: the parent's own records and the relayed lines, and in a worker an app's lines on
``sys.stderr`` and the log thread's records, never cut into each other; lines still in
the relay as the run ends with the parent's standard error unread are counted.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, ClassVar

import pytest

from nexus_trio.cli._cluster_cmd import WORKER_ENV

from .test_cli_workers import NO_SERVER, canned_summary, echo, fake_python, pytestmark_linux

#: far over PIPE_BUF (4 KiB): a full pipe takes such a line in many pieces
LONG = 100_000

#: a thread that logs short records to ``log`` (one at a time, each written before the
#: next) until ``done`` is set: Python source
CHATTER = """
done = threading.Event()
records = [0]

def chatter():
    while not done.is_set():
        log.warning("short record %d", records[0])
        records[0] += 1
        flush_logs()

thread = threading.Thread(target=chatter)
thread.start()
"""

#: the parent of fake workers, logging short records of its own (one at a time, each
#: written before the next, so that they come while the relay writes) until they end
PARENT_LOGGING_WHILE_IT_RELAYS = (
    """
import json, logging, sys, threading
from nexus_trio import LoggingConfig
from nexus_trio.cli._cluster_cmd import run_workers
from nexus_trio.logs import configure_logging, flush_logs

configure_logging(LoggingConfig(), stream=sys.stderr)
log = logging.getLogger("nexus_trio.test")
"""
    + CHATTER
    + """try:
    summary, status = run_workers(2, [], nats_url="nats://127.0.0.1:1", python=sys.argv[1])
finally:
    done.set()
    thread.join()
print(json.dumps({"summary": summary, "records": records[0]}))
sys.exit(status)
"""
)


def _writer(lines: int, size: int) -> str:
    """A shell command that writes ``lines`` lines of ``size`` copies of its argument to
    its standard error, each in one write."""
    return (
        f"{sys.executable} -S -c 'import os, sys\n"
        f'for _ in range({lines}): os.write(2, sys.argv[1].encode() * {size} + b"\\n")\' '
    )


def _fake_workers(tmp_path: Path, lines: int, size: int) -> str:
    done = canned_summary("worker-{i}")
    return fake_python(
        tmp_path,
        {
            f"worker-{i}": f"{_writer(lines, size)}{letter}; {echo(done.replace('{i}', str(i)))}"
            for i, letter in enumerate("AB")
        },
    )


def _run_read_slowly(argv: list[str], **popen: Any) -> tuple[bytes, bytes]:
    """Stdout and stderr of ``argv`` run to its end (status 0), its stderr read 4 kB at a
    time (the pipe fills); killed if it has not ended within 120 s."""
    with subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        guard = threading.Timer(120, proc.kill)
        guard.start()
        try:
            out: list[bytes] = []
            stdout = proc.stdout
            reader = threading.Thread(target=lambda: out.append(stdout.read()), daemon=True)
            reader.start()
            chunks = []
            while data := os.read(proc.stderr.fileno(), 4096):
                chunks.append(data)
            reader.join(120)
            err = b"".join(chunks)
            assert proc.wait(timeout=120) == 0, err[-3000:]
        finally:
            guard.cancel()
            proc.kill()
    return out[0], err


@pytestmark_linux
def test_the_parents_own_records_never_cut_a_relayed_line_far_over_pipe_buf(
    tmp_path: Path,
) -> None:
    """Regression: the parent relayed each worker's line whole under a lock of its own,
    but its own log thread wrote its records beside it: with the pipe full, a long line
    went out in pieces and a record of the parent's went between them (seen twice in
    1,600 lines). The relay and the log thread now write under one lock
    (``nexus_trio.logs.output_lock``)."""
    lines = 30
    python = _fake_workers(tmp_path, lines, LONG)
    out, err = _run_read_slowly([sys.executable, "-c", PARENT_LOGGING_WHILE_IT_RELAYS, python])
    got = err.split(b"\n")
    assert got[-1] == b""
    long_lines = [line for line in got if len(line) > 200]
    cut = [line[:40] + b"..." + line[-40:] for line in long_lines if len(line) != LONG]
    assert cut == []
    assert sorted(long_lines) == [b"A" * LONG] * lines + [b"B" * LONG] * lines
    short = [line.decode() for line in got[:-1] if len(line) <= 200]
    numbers = [re.fullmatch(r".* WARNING +nexus_trio\.test short record (\d+)", s) for s in short]
    assert None not in numbers, short
    said = json.loads(out)
    assert sorted(int(m[1]) for m in numbers if m) == list(range(said["records"]))
    assert said["summary"]["log_records_lost"] == 0


@pytestmark_linux
def test_lines_still_in_the_relay_when_the_parents_stderr_is_unread_are_counted(
    tmp_path: Path,
) -> None:
    """Regression: a relay blocked on the parent's full standard error (its reader
    stopped reading) held its lines, and those still in the worker's pipe, when the run
    ended: lost, counted nowhere. Now every line is written whole or counted in the
    summary's ``log_records_lost``: the lines read afterwards and those counted add up to
    every line the workers wrote (100 of 1 kB: the pipe takes 64 kB; the rest fits in the
    workers' pipes, so that they end: more would block them as a single run blocks)."""
    lines, size = 50, 1000
    python = _fake_workers(tmp_path, lines, size)
    read_err, write_err = os.pipe()
    try:
        with subprocess.Popen(
            [sys.executable, "-c", RUN_FAKE_WORKERS_QUIET, python],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=write_err,
        ) as proc:
            os.close(write_err)
            write_err = -1
            try:
                out, _ = proc.communicate(timeout=120)  # (its stderr not read meanwhile)
            finally:
                proc.kill()
        err = b""
        os.set_blocking(read_err, False)
        while True:
            try:
                data = os.read(read_err, 1 << 16)
            except BlockingIOError:
                break
            if not data:
                break
            err += data
    finally:
        os.close(read_err)
        if write_err >= 0:
            os.close(write_err)
    assert proc.returncode == 0, err[-2000:]
    whole = [line for line in err.split(b"\n") if line in (b"A" * size, b"B" * size)]
    summary = json.loads(out)
    assert 0 < len(whole) < 2 * lines  # (the pipe took some, not all)
    assert len(whole) + summary["log_records_lost"] == 2 * lines


#: the parent of fake workers, logging nothing of its own
RUN_FAKE_WORKERS_QUIET = """
import json, sys
from nexus_trio.cli._cluster_cmd import run_workers
summary, status = run_workers(2, [], nats_url="nats://127.0.0.1:1", python=sys.argv[1])
print(json.dumps(summary))
sys.exit(status)
"""


#: an app whose import writes long lines to ``sys.stderr`` (``write`` and ``print``) while
#: a thread of its logs short records (one at a time, each written before the next)
LONG_LINES_APP = (
    """
import logging, sys, threading
from nexus_trio.logs import flush_logs

log = logging.getLogger("nexus_trio.app")
"""
    + CHATTER
    + f"""for i in range(20):
    sys.stderr.write("A" * {LONG} + "\\n")
    print("B" * {LONG}, file=sys.stderr)
done.set()
thread.join()
print(f"records {{records[0]}}", file=sys.stderr)


async def main(kernel):
    pass
"""
)


APP = ("--app", "long_lines_app:main")


@pytestmark_linux
def test_a_workers_app_lines_on_stderr_and_its_log_records_never_cut_each_other(
    tmp_path: Path,
) -> None:
    """Regression: in a worker, what the app wrote to ``sys.stderr`` went to the pipe
    beside the log thread's records: a line far over PIPE_BUF, which a full pipe takes in
    pieces, and a record cut into each other (seen under ``--workers``: the parent relays
    what it reads, cut). A worker writes its app's lines whole, each under the log
    handler's lock (``print`` too, whose text and end are two writes)."""
    (tmp_path / "long_lines_app.py").write_text(LONG_LINES_APP, encoding="utf-8")
    out, err = _run_read_slowly(
        [sys.executable, "-m", "nexus_trio.cli", "run", "--json", "--no-live", *APP],
        cwd=tmp_path,
        env={**os.environ, WORKER_ENV: "worker-0"},
    )
    got = err.split(b"\n")
    long_lines = [line for line in got if len(line) > 200]
    cut = [line[:40] + b"..." + line[-40:] for line in long_lines if len(line) != LONG]
    assert cut == []
    assert sorted(long_lines) == [b"A" * LONG] * 20 + [b"B" * LONG] * 20
    short = [line.decode() for line in got if 0 < len(line) <= 200]
    (said,) = [int(s.split()[1]) for s in short if s.startswith("records ")]
    numbers = [re.fullmatch(r".* WARNING +nexus_trio\.app short record (\d+)", s) for s in short]
    numbered = sorted(int(m[1]) for m in numbers if m)
    assert numbered == list(range(said))
    assert json.loads(out)["log_records_lost"] == 0


BAD_TYPES = ("--nats", "nats://127.0.0.1:1", "--node", "worker-1", "--types", "nosuchmod:Foo")


def test_a_workers_own_usage_error_box_is_labelled_with_its_name(tmp_path: Path) -> None:
    """Regression: a worker's own usage error (its ``--types`` that it could not import,
    where the parent could) was typer's box, unlabelled: N workers' boxes in the parent's
    standard error read as one, the parent's. Each line of it names the worker now."""
    proc = subprocess.run(
        [sys.executable, "-m", "nexus_trio.cli", "run", "--json", "--no-live", *BAD_TYPES],
        cwd=tmp_path,
        env={**os.environ, WORKER_ENV: "worker-1", "COLUMNS": "100"},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if " nexus_trio.config " not in line]
    assert any("Invalid value for '--types'" in line for line in lines), lines
    assert any(line.startswith("worker-1: Usage: nexus run") for line in lines), lines
    assert [line for line in lines if not line.startswith("worker-1: ")] == []
    assert proc.stdout == ""


@pytest.mark.parametrize(
    ("held", "unread", "lines"),
    [(1, b"def\n", 1), (1, b"", 1), (0, b"", 0), (0, b"x\ny", 2), (1, b"d\ne", 2), (0, b"x\n", 1)],
)
def test_a_given_up_relay_counts_each_line_held_or_unread_once(
    held: int, unread: bytes, lines: int
) -> None:
    """A relay given up counts the line it holds without its end (``held``) and the lines
    still in the worker's pipe: the end of the held line, unread, is not a line more."""
    from nexus_trio.cli._cluster_cmd import _Relay

    read, write = os.pipe()
    os.write(write, unread)
    os.close(write)
    with os.fdopen(read, "rb") as file:
        relay = _Relay(file)
        relay.give_up()
        relay._pending = held
        relay._count_unread(read)
    assert relay.lost_now() == lines


def test_a_relay_stuck_inside_a_write_when_given_up_counts_its_workers_pipe() -> None:
    """Regression: a relay whose thread was inside a write that blocks when it was given
    up (a terminal stopped with Ctrl-S, a socket's buffer full) left the lines still in
    its worker's pipe uncounted: only its thread counted them, at its end, after the
    summary's count. The caller counts them now (``count_unread_now``); once the thread
    ends it counts no line twice."""
    from nexus_trio.cli._cluster_cmd import _Relay, _relays_lost

    read, write = os.pipe()
    os.write(write, b"a\nb\nc\n")  # (its first read: the write it is stuck in)
    stuck, release = threading.Event(), threading.Event()

    def blocking_write(piece: bytes) -> int:
        stuck.set()
        release.wait(60)  # (os.write blocks until the terminal or socket takes it)
        return len(piece)

    relay = _Relay(os.fdopen(read, "rb"))
    relay._write = blocking_write  # type: ignore[method-assign]
    relay.thread.start()
    try:
        assert stuck.wait(60)
        os.write(write, b"d\ne\n")  # still in the pipe, unread
        # the three in the write (counted held: it may never return) and the two unread
        assert _relays_lost([relay], 0.0) == 5
    finally:
        release.set()
        relay.thread.join(60)
        os.close(write)
    assert not relay.thread.is_alive()
    assert relay.lost_now() == 2  # (the write returned: the two unread, once)


#: the end of the two scripts below: fork while ``thread`` holds a lock (until ``release``);
#: the child prints a line through ``lines``, and the parent prints its exit status
_FORK_AND_PRINT = """
pid = os.fork()
if pid == 0:
    signal.alarm(30)  # (the guard of a child that waits for ever, not a measure)
    lines.write("printed in the child\\n")
    sys.stderr.flush()
    os._exit(0)
release.set()
thread.join()
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status))
"""


def _run_forking(script: str) -> subprocess.CompletedProcess[str]:
    """Run ``script`` (one of those below); assert its child printed and exited 0."""
    done = subprocess.run(
        [sys.executable, "-W", "ignore::DeprecationWarning", "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert (done.stdout, done.returncode) == ("0\n", 0), done.stderr
    assert "printed in the child\n" in done.stderr
    return done


#: a process whose log thread holds ``output_lock`` as it forks; the child prints a line
#: to the worker's ``sys.stderr`` redirect (its own lock after the fork), and says so;
#: a child that waits for ever is ended by its alarm (exit status -SIGALRM)
FORK_WHILE_THE_LOCK_IS_HELD = (
    """
import os, signal, sys, threading
from nexus_trio.cli._app import WholeLines
from nexus_trio.logs import output_lock

lines = WholeLines(sys.stderr, lock=output_lock)
held, release = threading.Event(), threading.Event()

def log_thread():
    with output_lock():  # (the log handler, writing a record)
        held.set()
        release.wait()

thread = threading.Thread(target=log_thread)
thread.start()
held.wait()
"""
    + _FORK_AND_PRINT
)


def test_a_child_forked_while_the_log_thread_writes_can_print_to_stderr() -> None:
    """Regression: a worker's ``sys.stderr`` redirect kept the ``output_lock`` it was
    made with, but a fork replaces it in the child (it may be held by a thread of the
    parent, which the child has not): a child forked while the log thread wrote a record
    (``multiprocessing`` with fork, ``os.fork`` in an app) waited for ever on its first
    line to ``sys.stderr``. The redirect takes the lock of the moment at each line."""
    _run_forking(FORK_WHILE_THE_LOCK_IS_HELD)


#: a process with a thread inside a write of a WholeLines (its target waits, as a write
#: to a full pipe does) as it forks; the child writes a line through it, and says so; a
#: child that waits for ever is ended by its alarm (exit status -SIGALRM)
FORK_WHILE_A_LINE_IS_WRITTEN = (
    """
import os, signal, sys, threading
from nexus_trio.cli._app import WholeLines

held, release = threading.Event(), threading.Event()

class Target:
    def write(self, text):
        if text == "blocks\\n":  # (the parent's thread: a full pipe, the reader away)
            held.set()
            release.wait()
        sys.stderr.write(text)

    def flush(self):
        sys.stderr.flush()

lines = WholeLines(Target())
thread = threading.Thread(target=lines.write, args=("blocks\\n",))
thread.start()
held.wait()
"""
    + _FORK_AND_PRINT
)


def test_a_child_forked_while_another_thread_writes_a_line_can_write_its_own() -> None:
    """Regression: ``WholeLines``' own lock (one write of whole lines at a time) was
    the parent's in a forked child: a child forked while another thread of the parent
    was inside a write (a full pipe) waited for ever on its first line. The child gets
    a new lock at the fork (``os.register_at_fork``), as ``output_lock`` does."""
    assert "blocks\n" in _run_forking(FORK_WHILE_A_LINE_IS_WRITTEN).stderr


class _LateReader(threading.Thread):
    """A worker's stdout reader (the thread whose target is ``run_workers``' ``read``)
    starved past any bound in time a waiter sets: a ``join`` with a timeout returns with
    it not started yet (as a loaded machine's scheduler may leave it for longer than any
    grace), one without lets it run and waits for it. Other threads are left as they are."""

    late: ClassVar[list[_LateReader]] = []

    def __init__(self, *args: Any, target: Any = None, **kwargs: Any) -> None:
        self.gate = threading.Event()
        self.is_late = getattr(target, "__name__", "") == "read"
        if self.is_late:
            inner, gate = target, self.gate

            def gated(*inner_args: Any) -> None:
                gate.wait()
                inner(*inner_args)

            target = gated
            _LateReader.late.append(self)
        super().__init__(*args, target=target, **kwargs)

    def join(self, timeout: float | None = None) -> None:
        if self.is_late and timeout is not None and not self.gate.is_set():
            return  # (the bound passed, the reader still starved)
        self.gate.set()
        super().join(timeout)


def test_a_workers_summary_read_late_by_a_starved_reader_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: the parent gave each worker's stdout reader 2 s from the worker's exit
    to reach the pipe's end, killed its group and gave it 2 s more, then took what was
    read as its output: a reader thread starved for longer on a loaded machine lost the
    summary the worker had written (the worker then counted dead, the run failed). The
    reader is now waited for as long as the pipe has bytes; only a pipe empty for the
    grace after the exit (held open by a process the worker started) ends it. (Fails on
    the old code: both workers ``died: exit code 0``, no summary.)"""
    from types import SimpleNamespace

    from nexus_trio.cli import _cluster_cmd

    fake_threading = SimpleNamespace(**vars(threading))
    fake_threading.Thread = _LateReader
    monkeypatch.setattr(_cluster_cmd, "threading", fake_threading)
    monkeypatch.setattr(_LateReader, "late", [])
    python = fake_python(
        tmp_path, {f"worker-{i}": echo(canned_summary(f"worker-{i}")) for i in range(2)}
    )
    try:
        summary, status = _cluster_cmd.run_workers(2, [], nats_url=NO_SERVER, python=python)
    finally:
        for reader in _LateReader.late:  # (the old code's, never waited for: let them end)
            reader.gate.set()
    assert len(_LateReader.late) == 2
    assert [(w["node"], w["died"], w["exit"]) for w in summary["per_worker"]] == [
        ("worker-0", False, "exit code 0"),
        ("worker-1", False, "exit code 0"),
    ]
    assert (summary["workers_died"], summary["conserved"], status) == ([], True, 0)


def _pipe(size: int = 4096) -> tuple[int, int]:
    """A pipe holding ``size`` bytes (Linux; elsewhere its default)."""
    read, write = os.pipe()
    try:
        import fcntl

        fcntl.fcntl(read, fcntl.F_SETPIPE_SZ, size)
    except (ImportError, AttributeError, OSError):
        pass
    return read, write


def _reading(
    read: int, exited: threading.Event, grace: float
) -> tuple[threading.Thread, list[bytes], list[bool]]:
    """``_read_output`` of the pipe ``read`` in a thread (started): the thread, the bytes
    kept and (once it ended) what it returned."""
    from nexus_trio.cli._cluster_cmd import _read_output

    kept: list[bytes] = []
    result: list[bool] = []
    reader = threading.Thread(
        target=lambda: result.append(_read_output(read, exited, kept.append, grace))
    )
    reader.start()
    return reader, kept, result


def test_a_pipe_held_open_with_nothing_in_it_ends_the_read_with_all_the_worker_wrote() -> None:
    """A worker's stdout held open by a process it started (an app's helper): once the
    worker exited and the pipe had nothing for the grace, the read ends (False: not at the
    pipe's end) with every byte the worker wrote kept."""
    read, write = _pipe()
    try:
        os.write(write, b'{"node": "worker-0"}\n')
        exited = threading.Event()
        exited.set()
        reader, kept, result = _reading(read, exited, 0.0)
        reader.join(60)  # (a fail-safe: a read to the pipe's end waited for good)
        assert not reader.is_alive()
        assert result == [False]
        assert b"".join(kept) == b'{"node": "worker-0"}\n'
    finally:
        os.close(write)
        reader.join(60)
        os.close(read)


def test_a_pipe_read_before_the_worker_exited_waits_for_its_end_however_idle() -> None:
    """Before the worker exited an idle pipe is no end: the read (grace 0) goes on until
    the pipe's end, True, with all of it."""
    read, write = _pipe()
    reader, kept, result = _reading(read, threading.Event(), 0.0)
    try:
        for part in (b"a" * 5000, b"b" * 5000, b"end\n"):  # (more than the pipe holds)
            os.write(write, part)
    finally:
        os.close(write)
        reader.join(60)
        os.close(read)
    assert result == [True]
    assert b"".join(kept) == b"a" * 5000 + b"b" * 5000 + b"end\n"


def test_a_process_writing_on_to_an_exited_workers_pipe_ends_the_read() -> None:
    """A process the worker started that writes on, for good, to its stdout: the read
    ends once it read more since the exit than the pipe holds (the worker's bytes were all
    in it, so all read), with them first, though the pipe is never idle."""
    read, write = _pipe()
    os.write(write, b"summary\n")
    exited = threading.Event()
    exited.set()
    stop = threading.Event()

    def babble() -> None:
        with contextlib.suppress(OSError):  # (EPIPE once the read end is closed)
            while not stop.is_set():
                os.write(write, b"x" * 512)

    babbler = threading.Thread(target=babble)
    babbler.start()
    reader, kept, result = _reading(read, exited, 3600.0)
    reader.join(60)  # (a fail-safe: the old rule read on for good)
    stop.set()
    alive = reader.is_alive()
    os.close(read)
    babbler.join(60)
    os.close(write)
    assert not alive
    assert result == [False]
    assert b"".join(kept).startswith(b"summary\nxxx")


class _StarvedThread(threading.Thread):
    """A relay's thread that does not run until it was waited for ``rounds`` times with a
    timeout (each returning at once: the waiter's time passing while the scheduler leaves
    the thread out), then runs; a wait without a timeout lets it run at once."""

    def __init__(self, target: Any, rounds: int) -> None:
        self.gate, self.rounds = threading.Event(), rounds
        super().__init__(target=lambda: (self.gate.wait(), target()), daemon=True)

    def join(self, timeout: float | None = None) -> None:
        self.rounds -= 1
        if timeout is not None and self.rounds > 0:
            return
        self.gate.set()
        super().join(timeout)


def test_a_relay_starved_past_the_grace_is_waited_for_not_counted_lost(
    capfd: pytest.CaptureFixture[str],
) -> None:
    """Regression: the run's end gave each worker's stderr relay 2 s (a deadline) to write
    what it held, then gave it up and counted its lines lost: a relay thread starved for
    longer on a loaded machine lost lines this process's standard error would have taken.
    A relay is now waited for as long as the standard error takes what it writes (given
    up once it took nothing for the grace, counted in the relay's own waits). (Fails on
    the old code: 2 lines counted lost, none written.)"""
    from nexus_trio.cli._cluster_cmd import _Relay, _relays_lost

    read, write = os.pipe()
    os.write(write, b"first line\nsecond line\n")
    os.close(write)
    relay = _Relay(os.fdopen(read, "rb"))
    # starved for 1,000 of the waiter's waits (50 s of _LOOK_AGAIN's, far past any grace)
    relay.thread = _StarvedThread(relay._run, 1000)
    relay.exited.set()
    relay.thread.start()
    try:
        lost = _relays_lost([relay], 2.0)
    finally:
        relay.thread.gate.set()
        threading.Thread.join(relay.thread, 60)
    assert lost == 0
    assert capfd.readouterr().err.splitlines() == ["first line", "second line"]


class _CountedJoins(threading.Thread):
    """A relay's thread whose waits with a timeout return at once, counted (the waiter's
    time passing: each is one of _LOOK_AGAIN's, 50 ms), in step with the refusals of a
    :class:`_LateLock`: one refusal, one wait."""

    def __init__(self, target: Any, rounds: int) -> None:
        super().__init__(target=target, daemon=True)
        self.joins, self.rounds = 0, rounds
        self.refused, self.go = threading.Semaphore(0), threading.Semaphore(0)
        self.stopped = threading.Event()  # (the test's end: no more steps)

    def join(self, timeout: float | None = None) -> None:
        if timeout is None or self.joins >= self.rounds:
            super().join(timeout)
            return
        while not self.refused.acquire(timeout=0.01):  # (a step, or the thread's end)
            if not self.is_alive():
                return
        self.joins += 1
        self.go.release()


class _LateLock:
    """The output lock, held by a log thread run late: refused until the waiter has
    waited ``thread.rounds`` times (one refusal a wait), then taken."""

    def __init__(self, thread: _CountedJoins, relay: Any) -> None:
        self.thread, self.relay, self.refusals = thread, relay, 0

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if self.thread.joins >= self.thread.rounds:
            return True
        self.refusals += 1
        self.thread.refused.release()
        while not self.thread.go.acquire(timeout=0.01):  # (its wait, or given up)
            if self.relay._given_up or self.thread.stopped.is_set():
                break
        return False

    def release(self) -> None:
        pass


def test_a_relay_waiting_for_a_late_lock_holder_with_stderr_writable_is_not_given_up(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The relay writes under the log handler's lock: a wait for it that times out while
    the standard error is writable is the holder run late (a loaded machine), not a
    standard error that takes nothing, and does not count toward giving the relay up.
    (Fails with the lock's timeouts counted as blocked: both lines counted lost.)"""
    from nexus_trio.cli import _cluster_cmd

    read, write = os.pipe()
    os.write(write, b"first line\nsecond line\n")
    os.close(write)
    relay = _cluster_cmd._Relay(os.fdopen(read, "rb"))
    # (1,000 of the waiter's waits: 50 s, far past the grace)
    relay.thread = thread = _CountedJoins(relay._run, 1000)
    lock = _LateLock(thread, relay)
    monkeypatch.setattr(_cluster_cmd, "output_lock", lambda: lock)
    relay.exited.set()
    thread.start()
    try:
        lost = _cluster_cmd._relays_lost([relay], 2.0)
    finally:
        thread.stopped.set()
        threading.Thread.join(thread, 60)
    assert lost == 0
    assert lock.refusals == 1000
    assert capfd.readouterr().err.splitlines() == ["first line", "second line"]
