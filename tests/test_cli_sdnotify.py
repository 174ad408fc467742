"""``nexus run`` under a systemd unit of ``Type=notify``: ``READY=1`` on ``NOTIFY_SOCKET``
once the workload runs, ``STOPPING=1`` at the stop, nothing from what the run starts.

Real processes (real time, generous bounds), a real datagram socket in systemd's place.
"""

from __future__ import annotations

import signal
import socket
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from nexus_trio.cli._sdnotify import SEND_TIMEOUT, notify, take_notify_socket

from .test_cli_workers import (
    StderrLines,
    pytestmark_linux,
    signal_and_collect,
    start_nexus,
    tagged_processes,
)
from .test_cli_workers import tag as tag  # (the fixture)

pytestmark = pytestmark_linux


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket bound where systemd's would be (an abstract name, as systemd's
    own ``/run/systemd/notify`` is a path: both are taken) and ``NOTIFY_SOCKET``'s value."""
    name = f"@nexus-test-notify-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name[1:])
        yield sock, name


def receive(sock: socket.socket, timeout: float) -> bytes | None:
    sock.settimeout(timeout)
    try:
        return sock.recv(4096)
    except TimeoutError:
        return None


def fill(name: str) -> int:
    """Datagrams sent to the abstract socket ``name`` until its queue is full: how many."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as filler:
        filler.setblocking(False)
        for queued in range(100_000):
            try:
                filler.sendto(b"X=1", "\0" + name[1:])
            except BlockingIOError:
                return queued
    raise AssertionError("the socket's queue never filled")


def run_to_its_end(
    args: list[str], tag: str, tmp_path: Path, notify_name: str, timeout: float
) -> tuple[int, str]:
    """``nexus ARGS`` with ``NOTIFY_SOCKET=notify_name``, until it ends: its status and
    standard error."""
    proc = start_nexus(args, tag, tmp_path, NOTIFY_SOCKET=notify_name)
    try:
        _, err = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    return proc.returncode, err


APP = textwrap.dedent(
    """
    import os
    import subprocess
    import sys

    import trio


    async def main(kernel):
        child = subprocess.run(
            [sys.executable, "-c", "import os; print(os.environ.get('NOTIFY_SOCKET'))"],
            capture_output=True,
            text=True,
            check=True,
        )
        with open("seen.tmp", "w") as f:
            f.write(f"{os.environ.get('NOTIFY_SOCKET')} {child.stdout.strip()}")
        os.replace("seen.tmp", "seen.txt")  # (whole when the test sees it)
        await trio.sleep_forever()
    """
)


def test_a_run_tells_systemd_it_is_ready_then_stopping_and_its_children_cannot(
    tag: str, tmp_path: Path, notify_socket: tuple[socket.socket, str]
) -> None:
    sock, name = notify_socket
    (tmp_path / "notifyapp.py").write_text(APP)
    proc = start_nexus(["run", "--app", "notifyapp:main"], tag, tmp_path, NOTIFY_SOCKET=name)
    try:
        stderr = StderrLines(proc)
        ready = receive(sock, 60)
        assert ready == b"READY=1\nSTATUS=running", stderr.text()
        # said as the workload runs: the run's line before it
        assert "running app notifyapp:main" in stderr.text()
        # neither the app (os.environ) nor its subprocess got the socket to speak for the unit
        deadline = time.monotonic() + 30
        while not (tmp_path / "seen.txt").exists():
            assert time.monotonic() < deadline, stderr.text()
            time.sleep(0.1)
        assert (tmp_path / "seen.txt").read_text() == "None None"
        _, err = signal_and_collect(proc, stderr, signal.SIGTERM, 60)
        assert proc.returncode == 0, err
        assert receive(sock, 5) == b"STOPPING=1\nSTATUS=stopping (SIGTERM)"
        assert receive(sock, 0.5) is None  # once each
        assert "systemd" not in err  # (no failure to tell it)
    finally:
        proc.kill()


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["run", "-c", "bad.toml"], "nexus: error: "),
        (["run", "--spawn", "/no/such/program", "-d", "1"], "Invalid value for '--spawn'"),
        (["run", "-W", "2", "-c", "bad.toml"], "nexus: error: "),
    ],
    ids=["bad-config", "no-such-spawn-program", "workers-bad-config"],
)
def test_a_run_that_fails_at_its_start_tells_systemd_nothing(
    tag: str, tmp_path: Path, notify_socket: tuple[socket.socket, str], args: list[str], said: str
) -> None:
    """Fifty-fifth pass, checked: a run refused at its start (a bad config, a ``--spawn``
    program not found; exit 2) sends neither ``READY=1`` nor ``STOPPING=1``: for a unit of
    ``Type=notify`` a main process that exits before ``READY=1`` is a failed start
    (systemd.service(5), ``Type=notify``), which ``Restart=on-failure`` restarts; a
    ``STOPPING=1`` there would say a started service stopped. (Mutant checked: a
    ``notify("READY=1")`` as ``take_notify_socket`` takes the socket fails each case.)"""
    sock, name = notify_socket
    (tmp_path / "bad.toml").write_text("x = [\n")
    status, err = run_to_its_end(args, tag, tmp_path, name, 120)
    assert status == 2, err
    assert said in err
    assert receive(sock, 0.5) is None


def test_the_workers_parent_alone_tells_systemd_once_every_worker_joined(
    tag: str, tmp_path: Path, notify_socket: tuple[socket.socket, str]
) -> None:
    sock, name = notify_socket
    args = ["run", "-W", "2", "-n", "10", "-d", "0", "--json"]
    proc = start_nexus(args, tag, tmp_path, NOTIFY_SOCKET=name)
    try:
        stderr = StderrLines(proc)
        ready = receive(sock, 120)
        assert ready == b"READY=1\nSTATUS=running: 2 workers joined", stderr.text()
        workers = {
            env["NEXUS_WORKER"]: env
            for env in tagged_processes(tag).values()
            if "NEXUS_WORKER" in env
        }
        assert sorted(workers) == ["worker-0", "worker-1"]
        assert all("NOTIFY_SOCKET" not in env for env in workers.values())
        assert receive(sock, 1) is None  # (no worker said it too)
        _, err = signal_and_collect(proc, stderr, signal.SIGTERM, 120)
        assert proc.returncode == 0, err
        # the parent's stop, as a single run's (once, though each worker stopped too)
        assert receive(sock, 5) == b"STOPPING=1\nSTATUS=stopping (SIGTERM)"
        assert receive(sock, 0.5) is None
    finally:
        proc.kill()


def test_the_workers_parent_tells_systemd_it_stops_as_its_workers_end_by_themselves(
    tag: str, tmp_path: Path, notify_socket: tuple[socket.socket, str]
) -> None:
    """``--duration``: no stop is passed on, the workers end on their own; the parent
    says ``STOPPING=1`` as the first ends (as a single run says it at its duration)."""
    sock, name = notify_socket
    args = ["run", "-W", "2", "-n", "10", "-d", "3", "--json"]
    status, err = run_to_its_end(args, tag, tmp_path, name, 180)
    assert status == 0, err
    assert receive(sock, 5) == b"READY=1\nSTATUS=running: 2 workers joined", err
    stopping = receive(sock, 5)
    assert stopping in (
        b"STOPPING=1\nSTATUS=stopping (worker-0 ended)",
        b"STOPPING=1\nSTATUS=stopping (worker-1 ended)",
    ), err
    assert receive(sock, 0.5) is None  # (once, though both ended)


def test_the_workers_parent_whose_worker_dies_at_its_start_tells_systemd_nothing(
    tag: str, tmp_path: Path, notify_socket: tuple[socket.socket, str]
) -> None:
    """Review of the fifty-sixth pass: a worker that ends before it joined (its app's
    import raised) stops the group before ``READY=1``, and the parent said
    ``STOPPING=1\nSTATUS=stopping (worker-1 died)``, where a single run that fails at its
    start says nothing (for ``Type=notify`` an exit before ``READY=1`` is a failed start;
    a ``STOPPING=1`` says a started service stopped). (Checked: fails on main's
    ``_cluster_cmd.py``, the datagram received.)"""
    sock, name = notify_socket
    (tmp_path / "diesatstart.py").write_text(
        textwrap.dedent(
            """
            import os
            import sys

            if os.environ.get("NEXUS_WORKER") == "worker-1":
                sys.exit(3)


            async def main(kernel):
                pass
            """
        )
    )
    args = ["run", "-W", "2", "--app", "diesatstart:main", "--json"]
    status, err = run_to_its_end(args, tag, tmp_path, name, 180)
    assert status != 0, err
    assert "worker-1" in err, err
    assert receive(sock, 1) is None, err


@pytest.mark.parametrize(
    ("value", "said"),
    [
        ("notify.sock", "NOTIFY_SOCKET='notify.sock' is no socket path (/...) nor abstract name"),
        ("/nonexistent-dir/notify", "cannot tell systemd READY=1 on NOTIFY_SOCKET="),
    ],
)
def test_a_notify_socket_that_cannot_be_told_is_named_and_the_run_goes_on(
    tag: str, tmp_path: Path, value: str, said: str
) -> None:
    proc = start_nexus(["run", "-n", "10", "-d", "1"], tag, tmp_path, NOTIFY_SOCKET=value)
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert said in err
    assert "stopped by" in out and "duration" in out


def test_a_notify_socket_whose_queue_is_full_delays_the_run_at_most_its_bound(
    notify_socket: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """systemd's reader fallen behind: its socket's queue full (``max_dgram_qlen``), a
    ``sendto`` blocks. From the run's event loop it froze the run for good (measured:
    still blocked 5 s on); it now gives up after ``SEND_TIMEOUT`` and says why."""
    sock, name = notify_socket
    queued = fill(name)
    assert queued > 0
    monkeypatch.setenv("NOTIFY_SOCKET", name)
    said: list[str | None] = []

    def tell() -> None:
        with take_notify_socket():
            said.append(notify("READY=1\nSTATUS=running"))

    teller = threading.Thread(target=tell, daemon=True)
    started = time.monotonic()
    teller.start()
    teller.join(30)  # (far above the bound: a loaded machine)
    assert not teller.is_alive(), "the notification still blocks"
    assert time.monotonic() - started >= SEND_TIMEOUT * 0.9
    assert said == [f"cannot tell systemd READY=1 on NOTIFY_SOCKET={name!r}: timed out"]
    # (what was queued is systemd's to read, untouched; nothing of ours joined it)
    received = [sock.recv(64) for _ in range(queued)]
    assert set(received) == {b"X=1"}


ENDING_APP = """\
import contextlib
import sys

import trio

from nexus_trio import AgentNotFound, agent


@agent(name="boom", restart="permanent", on_error="restart")
async def boom(ctx, msg):
    raise RuntimeError("boom")


async def main(kernel):
"""


@pytest.mark.parametrize(
    ("body", "status", "stopping"),
    [
        (
            "raise ValueError('boom\\nsecond line')",
            1,
            b"STOPPING=1\nSTATUS=stopping (failed: ValueError: boom second line)",
        ),
        ("sys.exit(3)", 3, b"STOPPING=1\nSTATUS=stopping (sys.exit(3))"),
        (
            "kernel.spawn(boom)\nwhile True:  # (until the escalation stops the kernel)\n"
            "    with contextlib.suppress(AgentNotFound):\n"
            "        await kernel.send('boom', 'x')\n"
            "    await trio.sleep(0.01)",
            1,
            b"STOPPING=1\nSTATUS=stopping (failed: SupervisorEscalation: restart intensity",
        ),
        (
            # (far above a datagram's bound; a lone surrogate, as an undecodable file name)
            "raise ValueError('\\ud800' + 'x' * 300_000)",
            1,
            b"STOPPING=1\nSTATUS=stopping (failed: ValueError: ?" + b"x" * 378 + "…)".encode(),
        ),
        (
            # (a NUL: systemd drops a datagram that holds one, STOPPING=1 with it)
            "raise ValueError('a\\x00b\\x1b[31mc=d')",
            1,
            b"STOPPING=1\nSTATUS=stopping (failed: ValueError: a\\x00b\\x1b[31mc=d)",
        ),
        (
            # (an error whose str() raises: that error took the app's place, as the run's)
            "class E(Exception):\n    def __str__(self):\n        raise RuntimeError('no')\n"
            "raise E()",
            1,
            b"STOPPING=1\nSTATUS=stopping (failed: E: <str() raised RuntimeError>)",
        ),
        ("await kernel.shutdown()", 0, b"STOPPING=1\nSTATUS=stopping (kernel shutdown)"),
        ("return", 0, b"STOPPING=1\nSTATUS=stopping (app finished)"),
    ],
    ids=[
        "raises",
        "sys-exit",
        "escalates",
        "raises-at-length",
        "raises-with-nul",
        "raises-unprintable",
        "kernel-shutdown",
        "returns",
    ],
)
def test_an_app_that_ends_after_ready_tells_systemd_it_stops_and_why(
    tag: str,
    tmp_path: Path,
    notify_socket: tuple[socket.socket, str],
    body: str,
    status: int,
    stopping: bytes,
) -> None:
    """A started service that ends, however (its ``main`` raised, ``sys.exit(N)``, an
    escalation to the kernel, an agent's ``kernel.shutdown()``, ``main`` returned), says
    ``STOPPING=1`` once as its stop begins, with a one-line ``STATUS=`` naming why
    (sd_notify(3): "failing programs could pass a human-readable error message"), as a
    stop by a signal or ``--duration`` does. Fifty-sixth pass: a ``main`` that raised,
    called ``sys.exit`` or escalated sent ``READY=1`` and then nothing (checked: those
    three cases fail on main's ``_run.py``, ``receive`` None). Review of the fifty-sixth
    pass: an error's message with a NUL was sent as it is, and systemd drops a
    notification holding one, ``STOPPING=1`` with it; a control is escaped now, as log
    text is (raises-with-nul fails on the pass's ``_run.py``: the NUL and ESC raw)."""
    sock, name = notify_socket
    (tmp_path / "endingapp.py").write_text(ENDING_APP + textwrap.indent(body, "    ") + "\n")
    # (an escalation reaches the kernel when the config says so: else the kernel goes on)
    escalate = {
        "NEXUS_SUPERVISION__MAX_RESTARTS": "1",
        "NEXUS_SUPERVISION__ESCALATE_TO_KERNEL": "true",
    }
    proc = start_nexus(
        ["run", "--app", "endingapp:main"], tag, tmp_path, NOTIFY_SOCKET=name, **escalate
    )
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == status, err
    assert receive(sock, 5) == b"READY=1\nSTATUS=running", err
    said = receive(sock, 5)
    assert said is not None, err
    if stopping.endswith(b")"):
        assert said == stopping, err
    else:  # (the escalation's message goes on: its start)
        assert said.startswith(stopping) and said.endswith(b")") and b"\n" not in said[11:], said
    assert b"\0" not in said  # (systemd: "embedded NUL bytes. Ignoring.")
    assert receive(sock, 0.5) is None  # (once)
