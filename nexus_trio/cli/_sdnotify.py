"""systemd's readiness protocol (sd_notify(3)) for ``nexus run`` under a unit of
``Type=notify``.

systemd gives the service the path of a datagram socket in ``NOTIFY_SOCKET`` and waits
for ``READY=1`` on it before it counts the unit started (``systemctl start`` returns,
units ordered ``After=`` it start); ``STOPPING=1`` says the stop began. ``nexus`` takes the
variable out of its environment as its command starts (what sd_notify's
``unset_environment`` does), so that nothing the run starts (a ``--spawn`` program, a
``--workers`` worker, an app's subprocess) inherits it and speaks for the service. A run
says ``READY=1`` as its workload starts running (when ``/readyz`` stops saying
``starting``): a single run once its agents are spawned (and, with ``--nats``, its node
joined), the parent of ``--workers`` once every worker said it joined (and ``STOPPING=1``
once, at its first stop or its first worker's end). Without the
variable nothing is sent.

A send waits at most :data:`SEND_TIMEOUT` for room on the socket: a datagram socket whose
reader has fallen behind (its queue full: ``net.unix.max_dgram_qlen``, 10 by default)
blocks the sender, and a blocked ``sendto`` in the run's event loop froze the whole run
for good (a SIGTERM could not stop it: the call is retried after the handler). The
notification is then logged as not sent, and the run goes on.

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from typing import Final

#: the variable systemd sets for a unit of ``Type=notify`` (and ``NotifyAccess=``)
NOTIFY_ENV: Final = "NOTIFY_SOCKET"

#: the longest a notification waits for room on the socket (seconds)
SEND_TIMEOUT: Final = 2.0

#: the value taken out of the environment for the command that runs now
_taken: dict[str, str] = {}


@contextlib.contextmanager
def take_notify_socket() -> Iterator[None]:
    """For a ``nexus`` process's command: :data:`NOTIFY_ENV` leaves the environment (and
    ``os.environ``) and is kept for :func:`notify` until the command ends."""
    _taken.clear()
    value = os.environ.pop(NOTIFY_ENV, None)
    if value:
        _taken[NOTIFY_ENV] = value
    try:
        yield
    finally:
        _taken.clear()


def notify(state: str) -> str | None:
    """Send ``state`` (``"READY=1"``, ``"STOPPING=1"``, lines of ``KEY=VALUE``) to systemd's
    socket, if this command was given one. None when sent or when there is none; else why
    it could not be sent, naming the variable (for the caller to log)."""
    path = _taken.get(NOTIFY_ENV)
    if path is None:
        return None
    if path.startswith("@"):
        address = "\0" + path[1:]  # (an abstract socket, as sd_notify reads it)
    elif path.startswith("/"):
        address = path
    else:
        return (
            f"{NOTIFY_ENV}={path!r} is no socket path (/...) nor abstract name (@...):"
            f" systemd was not told {state.splitlines()[0]}"
        )
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.settimeout(SEND_TIMEOUT)  # (a full queue: see the module's docstring)
            # (UTF-8, as systemd reads it: a lone surrogate, as of an undecodable file
            # name in an error's message, is sent as '?', not a UnicodeEncodeError)
            sock.sendto(state.encode(errors="replace"), address)
    except OSError as exc:
        return f"cannot tell systemd {state.splitlines()[0]} on {NOTIFY_ENV}={path!r}: {exc}"
    return None
