"""The guardian of a kernel's process agents: kills them when the kernel process dies.

Started once per kernel process (Linux) by :mod:`nexus_trio.bridges._lineage` as
``python3 -I -S _guardian.py OWNER``, in a session of its own, with a pipe on its stdin
whose only writer is the kernel. It reads until end of input, which comes when the kernel
exits for whatever reason (SIGKILL included, since the kernel holds the pipe and nothing
else does), then SIGKILLs every process whose environment carries
``NEXUS_PROCESS_AGENT=OWNER.<child>``: the children of process agents and every
descendant they started, also those that called ``setsid()`` or ignore end of input.
``PR_SET_PDEATHSIG`` cannot do this job under trio: it fires when the *thread* that
forked the child exits, and trio starts children from worker threads that retire after
a few idle seconds. Standard library only, so that it starts fast and needs no imports
of the package.

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time

MARKER = "NEXUS_PROCESS_AGENT"
#: how long to keep sweeping for processes that a dying parent forked during the sweep
SWEEP_FOR = 2.0


def marked_processes(token_prefix: str) -> list[int]:
    """Pids whose marker entry holds a token starting with ``token_prefix`` (own processes).

    The entry's value is a space-separated list of tokens: a process agent's child that is
    itself a kernel adds its own children's token to the one it inherited.
    """
    entry_prefix = f"{MARKER}=".encode()
    wanted = token_prefix.encode()
    found = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read()
        except OSError:
            continue  # gone, or not ours to read
        for item in environ.split(b"\0"):
            if item.startswith(entry_prefix) and any(
                token.startswith(wanted) for token in item[len(entry_prefix) :].split()
            ):
                found.append(int(entry))
                break
    return found


def sweep(owner: str) -> int:
    """SIGKILL the marked processes of ``owner`` until none is left (bounded); how many."""
    killed: set[int] = set()
    deadline = time.monotonic() + SWEEP_FOR
    while time.monotonic() < deadline:
        fresh = [pid for pid in marked_processes(f"{owner}.") if pid not in killed]
        if not fresh:
            break
        for pid in fresh:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
            killed.add(pid)
    return len(killed)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[1]:
        sys.stderr.write("usage: _guardian.py OWNER\n")
        return 2
    # A Ctrl-C or a hang-up meant for the kernel's terminal is not the kernel's death.
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    stdin = sys.stdin.buffer
    while stdin.read(4096):
        pass  # the kernel never writes: only end of input (its death) matters
    sweep(argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
