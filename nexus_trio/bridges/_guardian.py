"""The guardian of a kernel's process agents: kills them when the kernel process dies.

Started once per kernel process (Linux) by :mod:`nexus_trio.bridges._lineage` as
``python3 -I -S _guardian.py OWNER``, in a session of its own, with a pipe on its stdin
whose only writer is the kernel. It reads until end of input, which comes when the kernel
exits for whatever reason (SIGKILL included, since the kernel holds the pipe and nothing
else does), and all the kernel writes there are notes of its children's sessions
(:class:`Sessions`). Then it SIGKILLs every process whose environment carries
``NEXUS_PROCESS_AGENT=OWNER.<child>``, or that is of a child's session: the children of
process agents and every descendant they started, also those that called ``setsid()``
or ignore end of input, the children of those (marked or not), and those caught in the
middle of an exec (:class:`Sweep`; :mod:`._lineage` sweeps one child's token the same
way).
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
from collections.abc import Callable, Collection

MARKER = "NEXUS_PROCESS_AGENT"
#: how long to keep sweeping for processes that a dying parent forked during the sweep
SWEEP_FOR = 2.0


#: ``flags`` bit of a kernel thread (<linux/sched.h>): it has no environment, ever
_PF_KTHREAD = 0x00200000
#: how long to wait between two reads of a process caught in the middle of its exec
_EXEC_PAUSE = 0.001
#: the resource limit whose soft value carries a child's *brand* (see :func:`brand_prefix`):
#: ``RLIMIT_LOCKS`` (<sys/resource.h>), which Linux has not enforced since 2.4.25. A
#: process inherits its limits through ``fork``, ``exec``, ``setsid()`` and ``env -i``,
#: and closing its file descriptors does not drop them.
BRAND_LIMIT = 10
#: the low bits of a brand that number the children of one kernel process
BRAND_BITS = 20


def brand_prefix(owner: str) -> int:
    """The high bits of the brands of the children of the kernel process ``owner``
    (``<pid>-<hex>``, see ``_lineage.owner``): bit 42 and 40 bits of its hex part, so a
    brand is below 2**63, and far above any count of locks."""
    try:
        return (1 << 42) | int(owner.rpartition("-")[2][:10], 16)
    except ValueError:
        return 1 << 42


def brand_owner(brand: int) -> int:
    """The :func:`brand_prefix` of the kernel process that gave ``brand`` (its high bits;
    the low :data:`BRAND_BITS` number that process's children)."""
    return brand >> BRAND_BITS


class Proc:
    """What the sweeps read of a process in ``/proc`` (the readers are swapped in tests)."""

    @staticmethod
    def pids() -> list[int]:
        return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]

    @staticmethod
    def environ(pid: int) -> bytes | None:
        """Its environment (``b""`` while an exec sets it up); None if gone or not ours."""
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                return f.read()
        except OSError:
            return None

    @staticmethod
    def children(pid: int) -> list[int] | None:
        """The children of ``pid`` (each of its threads', Linux 3.5+); None if unknown: no
        thread's list could be read (a kernel built without ``CONFIG_PROC_CHILDREN``). A
        thread that ended as its list was read leaves the others' read."""
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            return None
        found: list[int] = []
        read = False
        for tid in tids:
            with contextlib.suppress(OSError, ValueError):
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    found.extend(int(child) for child in f.read().split())
                read = True
        return found if read else None

    @staticmethod
    def holds(pid: int, links: Collection[str]) -> bool:
        """Whether ``pid`` has the *read* end of one of the pipes ``links``
        (``pipe:[<inode>]``) open. (Both ends read the same link: a process forked from
        the kernel process without an exec holds copies of its write ends, and is no
        holder: the access mode in ``fdinfo`` tells them apart.)"""
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            return False
        for fd in fds:
            with contextlib.suppress(OSError, ValueError):
                if os.readlink(f"/proc/{pid}/fd/{fd}") in links:
                    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                        info = dict(line.split(":", 1) for line in f if ":" in line)
                    if int(info["flags"].strip(), 8) & os.O_ACCMODE == os.O_RDONLY:
                        return True
        return False

    @staticmethod
    def brand(pid: int) -> int | None:
        """The soft value of its ``BRAND_LIMIT`` (a zombie's too); None if unlimited, gone
        or not ours to read."""
        try:
            with open(f"/proc/{pid}/limits") as f:
                for line in f:
                    if line.startswith("Max file locks "):
                        soft = line.split()[3]
                        return int(soft) if soft.isdigit() else None
        except (OSError, IndexError):
            pass
        return None

    @classmethod
    def kill(cls, pid: int, start: int) -> bool:
        """SIGKILL ``pid`` if it is still the process read as started at ``start`` (clock
        ticks since boot, its stat's field 22); False, not signalled, if its pid is
        another process's now (reused since it was read). The process is pinned first
        (a pidfd, Linux 5.3+), its start read again, and the signal sent through the
        pidfd: a pid reused after the pin is not signalled. Where pidfds are not
        supported, a plain kill after the check (the window narrowed to that). A process
        gone already is left, as before (True: nothing to signal)."""
        pidfd = cls.pin(pid)
        try:
            stat = cls.stat(pid)
            if stat is not None and stat[3] != start:
                return False
            if stat is not None:
                cls.send_kill(pid, pidfd)
            return True
        finally:
            if pidfd is not None:
                os.close(pidfd)

    @staticmethod
    def pin(pid: int) -> int | None:
        """A pidfd of ``pid`` (None: gone, or pidfds not supported)."""
        pidfd_open = getattr(os, "pidfd_open", None)
        if pidfd_open is None:
            return None
        try:
            fd: int = pidfd_open(pid)
        except OSError:
            return None
        return fd

    @staticmethod
    def send_kill(pid: int, pidfd: int | None) -> None:
        """SIGKILL the process ``pidfd`` pins (``pid`` by number without one)."""
        with contextlib.suppress(OSError):
            if pidfd is not None:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)

    @staticmethod
    def stat(pid: int) -> tuple[str, int, int, int, int, int] | None:
        """``(state, parent pid, flags, start time, env_end, session id)``; None if gone.

        ``env_end`` (Linux 3.5+) is where its environment ends in its memory: 0 from the
        moment an exec replaced its memory until the exec has set the new one up (the
        window in which ``environ`` reads empty), and for a process that has released its
        memory on the way out; -1 where the kernel does not show it.
        """
        try:
            with open(f"/proc/{pid}/stat") as f:
                # after the command name, which may hold anything but ends at the last ")"
                fields = f.read().rsplit(")", 1)[1].split()
            env_end = int(fields[48]) if len(fields) > 48 else -1
            state, parent, flags, start = fields[0], int(fields[1]), int(fields[6]), int(fields[19])
            return state, parent, flags, start, env_end, int(fields[3])
        except (OSError, IndexError, ValueError):
            return None


def _has_token(environ: bytes, wanted: bytes) -> bool:
    entry_prefix = f"{MARKER}=".encode()
    for item in environ.split(b"\0"):
        if item.startswith(entry_prefix) and any(
            token.startswith(wanted) for token in item[len(entry_prefix) :].split()
        ):
            return True
    return False


_Stat = tuple[str, int, int, int, int, int]


class Sweep:
    """Find and SIGKILL the processes of one token prefix, also those caught mid-exec.

    A process is *ours* if its environment carries a token of ``token_prefix``, or if its
    parent is ours (the same process: same pid and start time, so that a reused pid is
    not taken), which covers a child that dropped the mark while its parent lives, or
    if it holds the child's *hold* (``holds``: the read end of a pipe each child is given
    and its descendants inherit unless they close it; the kernel keeps the write end and
    knows at no cost whether any process still holds it, so it reads file descriptors
    only then), which covers one that dropped the mark and lost its parent. A live
    process whose environment reads empty because an exec is under way (``env_end`` 0 in
    its stat; not a zombie, not a kernel thread) is *unsure*: it is read again after a
    short pause until its exec is done, then judged like the others. A scan reads every
    process before it kills any (a parent killed first would take its children's link
    with it). :meth:`run` ends after a scan that found nothing new and left nothing
    unsure, or at its deadline.

    ``session``: ``(session id, time)`` of a child that ran in a session of its own (its
    pid), now reaped, and when it was seen gone (``sessions``: any number of them, as
    ``{session id: time}``; the guardian's, from the kernel's notes, :class:`Sessions`) (clock ticks since boot, as
    ``/proc/<pid>/stat`` dates a start): a process of that session that started no later
    is ours too, token or not, parent or not (a descendant that cleared its environment,
    left the child's group with ``setpgid()`` and lost its parent). The number is not
    reused while a member of the session lives, nor was it before the child was reaped:
    a session of that number whose members started later is another program's.
    """

    def __init__(
        self,
        token_prefix: str,
        proc: type[Proc] = Proc,
        session: tuple[int, int] | None = None,
        *,
        sessions: dict[int, int] | None = None,
        orphans_here: bool = True,
        holds: Callable[[], Collection[str]] | None = None,
        brands: Callable[[int], bool] | None = None,
        not_ours: Collection[int] = (),
    ) -> None:
        self.wanted = token_prefix.encode()
        self.proc = proc
        #: session id -> the latest start a process of it may have to be taken
        self.sessions: dict[int, int] = dict(sessions or {})
        if session is not None:
            self.sessions[session[0]] = session[1]
        #: whether a session's orphans hang off this process (the subreaper): the kernel's
        #: sweeps; the guardian's is no one's parent, so it reads every stat
        self.orphans_here = orphans_here
        #: the links of the children's holds (see the class) some process may still hold,
        #: asked at each scan (none, the common case: no file descriptor is read)
        self.holds = holds
        #: which brands (see :data:`BRAND_LIMIT`) are ours: read of this process's children
        #: only where orphans hang off it (a branded orphan's descendants are linked by
        #: their parent), of every process for the guardian; ``not_ours``: children of this
        #: process whose brand and session are not read (the live children of process
        #: agents: each in a session of its own, its descendants not orphans)
        self.brands = brands
        self.not_ours = frozenset(not_ours)
        self.me = os.getpid()
        #: pid -> start time of the processes found ours (this sweep's)
        self.ours: dict[int, int] = {}
        #: the pids SIGKILLed, in order
        self.killed: list[int] = []
        #: the pids found ours and not SIGKILLed: another process's by the kill (reused)
        self.reused: list[int] = []
        self._done: set[tuple[int, int]] = set()

    def _read(self, pid: int, environ: bytes | None) -> tuple[_Stat, bool | None] | None:
        """``(stat, marked)`` of ``pid`` (its ``environ`` just read), ``marked`` None while
        its exec is under way; None if it is gone, not ours to read, dead or a kernel thread."""
        if environ is None:
            return None  # gone, or not ours to read
        stat = self.proc.stat(pid)
        if stat is None or stat[0] in ("Z", "X") or stat[2] & _PF_KTHREAD:
            return None
        bound = self.sessions.get(stat[5])
        if bound is not None and stat[3] <= bound:
            return stat, True  # of a child's session
        if not environ:
            if stat[4] == 0:
                return stat, None  # its exec has not set its environment up yet
            # read while an exec ran, which has set it up since (env_end): once more
            environ = self.proc.environ(pid) or b""
        return stat, _has_token(environ, self.wanted)

    def _scan(self) -> tuple[list[int], list[int]]:
        """One read of every process: (ours, unsure)."""
        table: dict[int, _Stat] = {}
        marks: dict[int, bool | None] = {}
        environs = {pid: self.proc.environ(pid) for pid in self.proc.pids() if pid != self.me}
        # (this process's children, read once a scan where orphans hang off it and a
        # brand or a session is looked for among them; None: unknown, or not read)
        kids = (
            self.proc.children(self.me)
            if self.orphans_here and (self.brands is not None or self.sessions)
            else None
        )
        marked = {pid for pid, env in environs.items() if env and _has_token(env, self.wanted)}
        held = () if self.holds is None else self.holds()
        if held:
            marked |= {
                pid
                for pid, env in environs.items()
                if env is not None and self.proc.holds(pid, held)
            }
        if self.brands is not None:
            marked |= self._branded(environs, kids)
        # (with no process of ours in sight, an unmarked one with an environment is no
        # child to link: its stat is not read)
        links = bool(marked or self.ours or self._session_orphans(kids))
        for pid, environ in environs.items():
            if environ and not links:
                continue
            read = self._read(pid, environ)
            if read is not None:
                table[pid], marks[pid] = read
        children: dict[int, list[int]] = {}
        for pid, stat in table.items():
            children.setdefault(stat[1], []).append(pid)
        # the marked, those already found ours (still the same process), and their descendants
        found = [
            pid
            for pid in table
            if marks[pid] or pid in marked or self.ours.get(pid, -1) == table[pid][3]
        ]
        for pid in found:
            self.ours[pid] = table[pid][3]
        i = 0
        while i < len(found):
            for child in children.get(found[i], ()):
                if child not in self.ours or self.ours[child] != table[child][3]:
                    self.ours[child] = table[child][3]
                    found.append(child)
            i += 1
        unsure = [pid for pid in table if marks[pid] is None and pid not in self.ours]
        return found, unsure

    def _branded(self, environs: dict[int, bytes | None], kids: list[int] | None) -> set[int]:
        """The processes (live, readable) that carry a brand of ours (see the class):
        among ``kids``, this process's children, unless None (every process read)."""
        wanted = self.brands
        assert wanted is not None
        found = set()
        for pid in environs if kids is None else kids:
            if pid in self.not_ours or environs.get(pid) is None:
                continue
            brand = self.proc.brand(pid)
            if brand is not None and wanted(brand):
                found.add(pid)
        return found

    def _session_orphans(self, children: list[int] | None) -> bool:
        """Whether a process of the child's session (see the class) may be about with
        neither a mark nor a parent of ours: one whose parent died was reparented to this
        process, the subreaper, so such a tree hangs off one of its children. (Their stats
        only, not every process's: a scan that finds nothing reads no stat.)"""
        sessions = self.sessions
        if not sessions:
            return False
        if children is None:
            return True  # (its children unknown: any process may be one, every stat is read)
        for child in children:
            if child in self.not_ours:
                continue  # (a live agent's child: in a session of its own)
            stat = self.proc.stat(child)
            if stat is not None and stat[3] <= sessions.get(stat[5], -1):
                return True
        return False

    def _recheck(self, pid: int) -> bool | None:
        """Read ``pid`` again: ours, not ours (or gone), or None: still mid-exec."""
        read = self._read(pid, self.proc.environ(pid))
        if read is None:
            return False
        stat, marked = read
        parent = stat[1]
        if not marked and parent in self.ours:
            parent_stat = self.proc.stat(parent)
            marked = parent_stat is not None and parent_stat[3] == self.ours[parent]
        if marked:
            self.ours[pid] = stat[3]
            return True
        return None if marked is None else False

    def _kill_new(self, pids: list[int]) -> int:
        """SIGKILL those of ``pids`` (found ours) that this sweep has not; how many."""
        fresh = 0
        for pid in pids:
            key = (pid, self.ours[pid])
            if key in self._done:
                continue  # SIGKILLed, not yet gone
            self._done.add(key)
            if not self.proc.kill(pid, key[1]):
                self.reused.append(pid)  # (not the process read: another's now)
                continue
            self.killed.append(pid)
            fresh += 1
        return fresh

    def run(
        self,
        for_seconds: float,
        sleep: Callable[[float], object] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> list[int]:
        """Sweep (at most ``for_seconds``); the pids killed, in order."""
        deadline = clock() + for_seconds
        while True:
            ours, unsure = self._scan()
            fresh = self._kill_new(ours)
            while unsure and clock() < deadline:
                sleep(_EXEC_PAUSE)
                verdicts = {pid: self._recheck(pid) for pid in unsure}
                fresh += self._kill_new([pid for pid, ours in verdicts.items() if ours])
                unsure = [pid for pid, ours in verdicts.items() if ours is None]
            if not fresh or clock() >= deadline:
                return self.killed


def sweep(owner: str, sessions: dict[int, int] | None = None, holds: Collection[str] = ()) -> int:
    """SIGKILL the marked processes of ``owner``, those of ``sessions``, the holders of
    ``holds`` and those branded by ``owner`` (see :class:`Sweep`), until none is left
    (bounded); how many."""
    kept = frozenset(holds)
    prefix = brand_prefix(owner)
    sweeper = Sweep(
        f"{owner}.",
        sessions=sessions,
        orphans_here=False,
        holds=lambda: kept,
        brands=lambda brand: brand_owner(brand) == prefix,
    )
    return len(sweeper.run(SWEEP_FOR))


def ticks_now() -> int:
    """Now, in the clock ticks since boot that ``/proc/<pid>/stat`` dates a start in."""
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * os.sysconf("SC_CLK_TCK"))


class Sessions:
    """The sessions of the kernel's live children, as the kernel's notes tell them.

    One note a line: ``+SID [INODE]`` (a child started in session ``SID``, its pid, with
    the hold of that pipe inode), ``=SID TICKS``
    (it was seen gone then) and ``-SID`` (its exit's sweep is done: no longer ours to
    guard). A line this does not know is passed by.
    """

    def __init__(self) -> None:
        #: session id -> when its child was seen gone (None: not yet)
        self.live: dict[int, int | None] = {}
        #: session id -> the link of its child's hold (``+SID INODE``)
        self.holds: dict[int, str] = {}

    def note(self, line: bytes) -> None:
        if not line.endswith(b"\n"):
            return  # (cut short: the kernel writes each note whole, in one write)
        fields = line.split()
        try:
            if len(fields) in (1, 2) and fields[0][:1] == b"+":
                sid = int(fields[0][1:])
                inode = int(fields[1]) if len(fields) == 2 else None
                self.live[sid] = None
                if inode is not None:
                    self.holds[sid] = f"pipe:[{inode}]"
            elif len(fields) == 1 and fields[0][:1] == b"-":
                self.live.pop(int(fields[0][1:]), None)
                self.holds.pop(int(fields[0][1:]), None)
            elif len(fields) == 2 and fields[0][:1] == b"=":
                sid = int(fields[0][1:])
                if sid in self.live:
                    self.live[sid] = int(fields[1])
        except ValueError:
            pass

    def bounds(self, now: int) -> dict[int, int]:
        """Session id -> the latest start taken: when its child was seen gone, else
        ``now`` (the kernel's death: the child lived, or died unreaped, and its session's
        number was no one else's while the kernel lived)."""
        return {sid: now if gone is None else gone for sid, gone in self.live.items()}


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[1]:
        sys.stderr.write("usage: _guardian.py OWNER\n")
        return 2
    # A Ctrl-C or a hang-up meant for the kernel's terminal is not the kernel's death.
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    stdin = sys.stdin.buffer
    sessions = Sessions()
    # The kernel writes only notes of its children's sessions; end of input is its death.
    for line in stdin:
        sessions.note(line)
    sweep(argv[1], sessions.bounds(ticks_now()), sessions.holds.values())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
