"""No orphans: every process a process agent starts, and every descendant of it, dies with it.

A process agent's child runs in a process group of its own, which the agent kills at stop;
this module covers what a process group cannot. Every child gets the environment entry
``NEXUS_PROCESS_AGENT=<owner>.<child>`` (``owner`` names this kernel process, ``child``
one run of one agent), which its descendants inherit. On Linux, when process agents are
first started, the kernel process becomes a child subreaper
(``prctl(PR_SET_CHILD_SUBREAPER)``), so that descendants whose parent died are reparented
to it instead of to PID 1, and it starts the guardian (:mod:`._guardian`), which kills all
marked processes when the kernel process dies, even by SIGKILL. After each child exits,
:func:`kill_descendants` kills the processes marked with that child's token — those that
left its process group with ``setsid()`` included, their children marked or not, those
caught in the middle of an exec (:class:`._guardian.Sweep`), and the processes of the
child's session (its own: it is started with ``start_new_session``) that started before
it was seen gone, marked or not, those that hold its hold (:func:`new_hold`), and the
kernel's children that carry its brand (:func:`brand`) with their descendants — and
reaps those that were reparented to the kernel, and the branded zombies left to it
(:func:`reap_orphans`). The brand is set before the child's exec where util-linux's
``prlimit(1)`` is installed (:func:`wrapped`), else right after its start. Other
platforms get the process-group kill only (see docs/bridges.md).

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import itertools
import logging
import os
import select
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

import trio

from .._logcall import log_guarded
from ._guardian import (
    BRAND_BITS,
    BRAND_LIMIT,
    MARKER,
    SWEEP_FOR,
    Proc,
    Sweep,
    brand_owner,
    brand_prefix,
)
from ._guardian import ticks_now as ticks_now  # (process.py reads it here)

log = logging.getLogger("nexus_trio.bridge")

#: prctl option numbers from <linux/prctl.h>
_PR_SET_CHILD_SUBREAPER: Final = 36
_PR_GET_CHILD_SUBREAPER: Final = 37
#: how long a killed descendant gets to be reaped (it is SIGKILLed: this is scheduling time)
_REAP_WAIT: Final = 1.0

SUPPORTED: Final = sys.platform.startswith("linux") and os.path.isdir("/proc")

_lock = threading.Lock()
_owner: str | None = None
_guardian: subprocess.Popen[bytes] | None = None
#: the sessions of this process's live children, as told to the guardian (see
#: :class:`._guardian.Sessions`): session id -> when its child was seen gone, or None
_sessions: dict[int, int | None] = {}
#: session id -> " <inode>" of its child's hold as told to the guardian ("" without one)
_holds: dict[int, str] = {}
#: pid -> brand of each live child branded (:func:`brand`), until the sweep of its exit
_branded: dict[int, int] = {}
_brand_numbers = itertools.count(1)
#: brands given to children being started (:func:`new_brand`), their pids not yet known
_starting: set[int] = set()
#: notes the guardian's pipe did not take (full: a guardian that does not read)
notes_lost = 0


def owner() -> str:
    """This kernel process's part of the marker (fresh after a fork)."""
    global _owner
    with _lock:
        if _owner is None or not _owner.startswith(f"{os.getpid()}-"):
            _owner = f"{os.getpid()}-{uuid.uuid4().hex}"
        return _owner


def mark(env: dict[str, str]) -> str:
    """Add a fresh token for one new child to ``env`` (kept beside an inherited one)."""
    token = f"{owner()}.{uuid.uuid4().hex}"
    inherited = env.get(MARKER)
    env[MARKER] = f"{inherited} {token}" if inherited else token
    return token


def new_brand() -> int | None:
    """A brand for a child about to start (None off Linux): a number of this kernel
    process's own (see :func:`brand`), noted as *starting* until its child's pid is known
    (:func:`brand_started`) or its start failed (:func:`brand_dropped`): a child started
    through :func:`wrapped` carries it from its exec on, and until then a zombie with it
    is its ``trio.Process``'s to reap, not :func:`reap_orphans`'s."""
    if not SUPPORTED:
        return None
    value = (brand_prefix(owner()) << BRAND_BITS) | (next(_brand_numbers) % (1 << BRAND_BITS))
    with _lock:
        _starting.add(value)
    return value


def brand_started(pid: int, value: int | None) -> None:
    """The child ``pid`` started with the brand ``value`` (set before its exec)."""
    if value is None:
        return
    with _lock:
        _starting.discard(value)
        _branded[pid] = value


def brand_dropped(value: int | None) -> None:
    """No child carries the brand ``value`` from :func:`new_brand` (its start failed)."""
    if value is None:
        return
    with _lock:
        _starting.discard(value)


def brand(pid: int, value: int | None = None) -> int | None:
    """Brand the child ``pid``, just started: set the soft value of its ``RLIMIT_LOCKS``
    (not enforced by Linux since 2.4.25) to a number of this kernel process's own
    (``value``, from :func:`new_brand`, or a new one), which its descendants inherit
    whatever they do but reset that limit (``setsid()``, ``env -i``, closing every
    descriptor: see :class:`._guardian.Sweep`). Its brand, or None (off Linux; a hard
    limit below it; a child that is gone or changed user). The fallback of a child not
    started through :func:`wrapped`: what it forks before this lands carries none."""
    if not SUPPORTED:
        return None
    import resource

    if value is None:
        value = new_brand()
        assert value is not None
    with _lock:
        _starting.discard(value)
        _branded[pid] = value  # (before it lands: a zombie with it is not ours to reap)
    try:
        hard = resource.prlimit(pid, BRAND_LIMIT)[1]
        if 0 <= hard < value:
            raise ValueError(hard)
        resource.prlimit(pid, BRAND_LIMIT, (value, hard))
    except (OSError, ValueError):
        unbrand(pid, value)
        return None
    return value


#: the most the kernel process's soft ``RLIMIT_NOFILE`` is raised to (Linux's default
#: ``fs.nr_open``, the ceiling of a hard limit)
NOFILE_CAP: Final = 1 << 20
#: ``(soft, hard)`` ``RLIMIT_NOFILE`` of the kernel process before :func:`raise_nofile`
#: raised its soft limit, which each child gets back (:func:`give_back_nofile`); None
#: while not raised (not tried, nothing to raise, or refused)
_nofile_original: tuple[int, int] | None = None
_nofile_tried = False


def raise_nofile() -> None:
    """Once per process, at the first child's start (Linux): raise the kernel process's
    soft ``RLIMIT_NOFILE`` to its hard limit (at most :data:`NOFILE_CAP`), as Go's runtime
    does at its start: a live process agent holds five descriptors (three pipes, a pidfd,
    its hold), so a thousand of them need more than the common soft limit of 1,024. Never
    lowers it (a soft limit at or above the target, a user's own, is kept). Each child
    gets the original soft limit back (:func:`give_back_nofile`): programs using
    ``select()`` break above 1,024. Logged once at INFO; a refusal once at WARNING."""
    global _nofile_original, _nofile_tried
    if not SUPPORTED:
        return
    with _lock:
        if _nofile_tried:
            return
        _nofile_tried = True
        import resource

        try:
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            target = NOFILE_CAP if hard == resource.RLIM_INFINITY else min(hard, NOFILE_CAP)
            if soft != resource.RLIM_INFINITY and soft < target:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            else:
                return
        except (OSError, ValueError) as exc:
            log.warning(
                "cannot raise the soft RLIMIT_NOFILE for process agents (%s): each live"
                " one holds 5 descriptors, so spawns may fail with EMFILE",
                exc,
            )
            return
        _nofile_original = (soft, hard)
    log.info(
        "raised the soft RLIMIT_NOFILE from %d to %d (hard %s) for process agents (5"
        " descriptors each); their children get %d back",
        soft,
        target,
        "unlimited" if hard == resource.RLIM_INFINITY else hard,
        soft,
    )


def give_back_nofile(pid: int) -> bool:
    """Give the child ``pid``, just started, the kernel's original soft ``RLIMIT_NOFILE``
    if :func:`raise_nofile` raised it (one ``prlimit`` right after the start, beside its
    brand: Go's runtime sets it in the child before the exec, which ``subprocess`` offers
    only through ``preexec_fn``). False if ``prlimit`` refused (its agent counts it:
    ``BridgeStats.children_nofile_kept``)."""
    original = _nofile_original
    if original is None:
        return True
    import resource

    try:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, original)
    except (OSError, ValueError):
        return False
    return True


#: where util-linux's ``prlimit(1)`` is looked for besides the kernel's ``PATH``
_WRAPPER_DIRS: Final = "/usr/bin:/bin:/usr/sbin:/sbin"
#: the path of ``prlimit(1)`` (None: none here), looked up once (:func:`limits_wrapper`)
_wrapper: list[str | None] = []


def limits_wrapper() -> str | None:
    """util-linux's ``prlimit(1)``, which sets its own limits and then execs the
    command it is given (so the child is the same process, pid and all), or None: not
    on Linux, not installed, or another program by that name (BusyBox's). Looked up
    once a process."""
    if not SUPPORTED:
        return None
    if not _wrapper:
        search = os.pathsep.join(filter(None, [os.environ.get("PATH"), _WRAPPER_DIRS]))
        found = shutil.which("prlimit", path=search)
        if found is not None and os.path.basename(os.path.realpath(found)) != "prlimit":
            found = None  # (a multi-call binary's link: other options, other words)
        _wrapper[:] = [found]
    return _wrapper[0]


def wrapper_failed(wrapper: str, exc: OSError) -> None:
    """The limits wrapper ``wrapper`` could not be executed (``exc``: removed or made
    unusable since :func:`limits_wrapper` found it), and the program it was to start
    was started without it: forgotten for this process (the brand is set after each
    start from now on, see :func:`brand`), said once."""
    if _wrapper[:1] != [wrapper]:
        return  # (forgotten already, by another start)
    _wrapper[:] = [None]
    log_guarded(
        log,
        logging.WARNING,
        "cannot execute %s (%s): process agents' children are started without it from"
        " now on, branded after their start (what a child forks at once carries no brand)",
        wrapper,
        exc.strerror or exc,
    )


def wrapped(cmd: Sequence[str], value: int | None) -> tuple[list[str], int | None] | None:
    """``cmd`` started through :func:`limits_wrapper`, which gives it the brand
    ``value`` (from :func:`new_brand`) and the kernel's original soft ``RLIMIT_NOFILE``
    (if :func:`raise_nofile` raised it) *before* its program's first instruction: what
    it forks at once carries both. ``(command line, the brand it sets)`` (the brand None
    if the kernel's hard ``RLIMIT_LOCKS`` is below it: unbranded, as :func:`brand`
    would leave it), or None: no wrapper here, or nothing to set."""
    wrapper = limits_wrapper()
    if wrapper is None:
        return None
    import resource

    options = []
    hard = resource.getrlimit(BRAND_LIMIT)[1]
    if value is not None and (hard < 0 or value <= hard):
        options.append(f"--locks={value}:{_limit_text(hard)}")
    else:
        value = None
    original = _nofile_original
    if original is not None:
        # (the hard limit as it is now: one lowered since the raise is not raised back)
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        soft = original[0] if hard < 0 else min(original[0], hard)
        options.append(f"--nofile={soft}:{_limit_text(hard)}")
    if not options:
        return None
    return [wrapper, *options, "--", *cmd], value


def _limit_text(limit: int) -> str:
    return "unlimited" if limit < 0 else str(limit)


def unbrand(pid: int, value: int | None) -> None:
    """The child ``pid`` branded ``value`` is reaped (its exit is swept next)."""
    with _lock:
        if value is not None and _branded.get(pid) == value:
            del _branded[pid]


def reap_orphans(take: Callable[[int], bool] | None = None) -> list[int]:
    """Reap the zombies among this process's children that carry a brand of its own and
    are no live child of a process agent (those are their ``trio.Process``'s to reap):
    descendants of the children, reparented to it (the subreaper), that exited on their
    own. No other child of it carries such a brand: a ``subprocess`` of yours is never
    waited for here. With ``take``, only those whose brand it takes (asked after the
    zombie was seen one). Returns the brand of each one it reaped (its child's)."""
    if not SUPPORTED:
        return []
    prefix = brand_prefix(owner())
    with _lock:
        live = set(_branded)  # (their stats not read: up to a thousand, at each exit)
    reaped = []
    for pid in Proc.children(os.getpid()) or ():
        if pid in live:
            continue
        stat = Proc.stat(pid)
        if stat is None or stat[0] != "Z":
            continue
        found = Proc.brand(pid)
        if found is None or brand_owner(found) != prefix:
            continue
        with _lock:
            # (asked again after its brand was read: a child started and branded since
            # the children were read, and exited, is in _branded from before its brand
            # landed, or its brand is a starting one (set before its exec, its pid not
            # known yet), and its trio.Process reaps it for its exit status)
            if pid in _branded or found in _starting:
                continue
        if take is not None and not take(found):
            continue
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0]:
                reaped.append(found)
    return reaped


def children_live() -> bool:
    """Whether a child of a process agent carries a brand of this process now (started
    and not yet swept): its descendants may leave branded zombies here."""
    with _lock:
        return bool(_branded or _starting)


def is_subreaper() -> bool:
    """Whether this process is a child subreaper (Linux; False elsewhere)."""
    if not SUPPORTED:
        return False
    value = ctypes.c_int(0)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(value), 0, 0, 0) != 0:
        return False
    return value.value != 0


def protect() -> None:
    """Once per process, before the first child: become a subreaper, start the guardian.

    Failures are logged, not raised: a kernel without them still kills its children's
    process groups at stop.
    """
    global _guardian
    if not SUPPORTED:
        return
    mark = owner()
    with _lock:
        if _guardian is not None and _guardian.poll() is None:
            return
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            log.warning(
                "cannot become a child subreaper (%s): descendants of process agents "
                "that leave their process group may outlive the kernel",
                os.strerror(ctypes.get_errno()),
            )
        script = Path(__file__).with_name("_guardian.py")
        try:
            _guardian = subprocess.Popen(
                [sys.executable, "-I", "-S", str(script), mark],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            log.warning(
                "cannot start the process agent guardian (%s): children of process "
                "agents may outlive a killed kernel",
                exc,
            )
            return
        atexit.register(_release_guardian, _guardian)
        if _guardian.stdin is not None:
            os.set_blocking(_guardian.stdin.fileno(), False)
        # A guardian started again (the last one died) hears of the children still live.
        for sid, gone in _sessions.items():
            inode = _holds.get(sid, "")
            _tell(f"+{sid}{inode}\n" if gone is None else f"+{sid}{inode}\n={sid} {gone}\n")


def _tell(note: str) -> None:
    """Write ``note`` to the guardian (under ``_lock``), whole or not at all: never blocks."""
    global notes_lost
    guardian = _guardian
    if guardian is None or guardian.stdin is None:
        return
    try:
        os.write(guardian.stdin.fileno(), note.encode())
    except BlockingIOError:
        notes_lost += 1
        log.warning(
            "the process agent guardian's pipe is full (%r not told): a descendant that "
            "leaves its child's process group may outlive a killed kernel",
            note,
        )
    except (OSError, ValueError):
        pass  # the guardian is gone (it is started again with the next child)


def session_started(sid: int, hold: int | None = None) -> None:
    """A child started in session ``sid`` (its own: ``start_new_session``), with the
    write end ``hold`` of its hold: the guardian takes the processes of that session,
    and the holders of that hold, too when the kernel process dies."""
    if not SUPPORTED:
        return
    inode = "" if hold is None else f" {os.fstat(hold).st_ino}"
    with _lock:
        _sessions[sid] = None
        _holds[sid] = inode
        _tell(f"+{sid}{inode}\n")


def session_gone(sid: int, ticks: int) -> None:
    """The child of session ``sid`` was seen gone at ``ticks`` (see :func:`ticks_now`)."""
    with _lock:
        if sid in _sessions and _sessions[sid] is None:
            _sessions[sid] = ticks
            _tell(f"={sid} {ticks}\n")


def session_done(sid: int) -> None:
    """The sweep after the exit of session ``sid``'s child is done: no longer guarded."""
    with _lock:
        if sid in _sessions:
            del _sessions[sid]
            _holds.pop(sid, None)
            _tell(f"-{sid}\n")


def _release_guardian(guardian: subprocess.Popen[bytes]) -> None:
    """At a normal exit: end of input tells the guardian to sweep (nothing left) and go."""
    if guardian.stdin is not None:
        with contextlib.suppress(OSError):
            guardian.stdin.close()
    with contextlib.suppress(subprocess.TimeoutExpired):
        guardian.wait(timeout=5)


def _parent_of(pid: int) -> int | None:
    stat = Proc.stat(pid)  # (the sweeps' reader of /proc/<pid>/stat)
    return None if stat is None else stat[1]


def _reap(pids: list[int]) -> None:
    """Reap those of ``pids`` that became our children; the others are reaped by theirs."""
    me = os.getpid()
    pending = set(pids)
    deadline = time.monotonic() + _REAP_WAIT
    while pending and time.monotonic() < deadline:
        for pid in list(pending):
            parent = _parent_of(pid)
            if parent is None:
                pending.discard(pid)  # gone (reaped by its own parent, or by us)
            elif parent == me:
                try:
                    done, _ = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    done = pid
                if done:
                    pending.discard(pid)
        if pending:
            time.sleep(0.01)


def process_table() -> list[tuple[int, str, int, int]]:
    """``(pid, state, parent pid, process group)`` of every process (Linux ``/proc``),
    zombies too (state ``"Z"``): one read of each ``/proc/<pid>/stat``; a process gone
    meanwhile, or a line that cannot be read, is left out."""
    table = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                # after the command name, which may hold anything but ends at the last ")"
                fields = f.read().rsplit(")", 1)[1].split()
            table.append((int(entry), fields[0], int(fields[1]), int(fields[2])))
        except (OSError, IndexError, ValueError):
            continue
    return table


def _group_members(pgid: int) -> list[tuple[int, int, str]]:
    """``(pid, parent pid, state)`` of the processes in process group ``pgid``, zombies too."""
    return [(pid, parent, state) for pid, state, parent, group in process_table() if group == pgid]


def reap_group(pgid: int, wait: float = 0.0) -> int:
    """Reap the dead members of process group ``pgid`` that were reparented to us.

    A child's process group is killed with it; members whose parent died with them are
    reparented to the kernel process (the subreaper), and nothing else waits for them: a
    zombie's environment is gone, so :func:`kill_descendants` cannot find it by its mark.
    The group leader (the child itself, ``pid == pgid``) is not touched: its
    ``trio.Process`` reaps it. With ``wait``, goes on (at most ``wait`` seconds) until no
    member of the group is alive or ours to reap. Returns how many it reaped.
    """
    if not SUPPORTED:
        return 0
    me = os.getpid()
    reaped = 0
    deadline = time.monotonic() + wait
    while True:
        left = False
        for pid, parent, state in _group_members(pgid):
            if pid == pgid:
                continue
            if parent == me and state == "Z":
                try:
                    done, _ = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    done = 0
                if done:
                    reaped += 1
                    continue
            if state != "Z" or parent == me:
                left = True
        if not left or time.monotonic() >= deadline:
            return reaped
        time.sleep(0.01)


#: the read ends of holds made and not yet handed to their child (closed in a child
#: forked meanwhile, see :func:`new_hold`)
_unpassed: set[int] = set()


def _close_unpassed() -> None:
    for fd in list(_unpassed):
        with contextlib.suppress(OSError):
            os.close(fd)
    _unpassed.clear()


def new_hold() -> tuple[int, int] | None:
    """A child's *hold*: ``(read end, write end)`` of a new pipe (None off Linux).

    The child gets the read end (``pass_fds``), which its descendants inherit unless
    they close it (Python's ``subprocess`` does by default, a shell's ``&``, ``setsid``
    and ``env -i`` do not); the kernel keeps the write end, which tells with one
    ``poll`` whether any process still holds the read end (:func:`holders_link`). Both
    ends are close-on-exec here, and a process forked by ``os.fork`` before the read end
    is handed over closes it, so no other program of this process holds it.
    """
    if not SUPPORTED:
        return None
    read_end, write_end = os.pipe()
    _unpassed.add(read_end)
    return read_end, write_end


def hold_passed(read_end: int) -> None:
    """The child has its copy of the read end (or was not started): close ours."""
    _unpassed.discard(read_end)
    with contextlib.suppress(OSError):
        os.close(read_end)


def holders_links(write_end: int) -> tuple[str, ...]:
    """``pipe:[<inode>]`` of the hold whose write end is ``write_end`` (what
    ``/proc/<pid>/fd/<n>`` reads for a holder) if a process still holds its read end,
    else nothing."""
    poll = select.poll()
    poll.register(write_end, 0)  # (POLLERR comes unasked: no reader is left)
    if poll.poll(0):
        return ()
    return (f"pipe:[{os.fstat(write_end).st_ino}]",)


def _new_lock() -> None:
    global _lock
    # (a process forked while another thread held it, the process agents' reaper each
    # second: held for good by a thread the child does not have)
    _lock = threading.Lock()


def _forget_children() -> None:
    """In a forked child: none of the kernel process's children is its own. Its books
    start empty (before, :func:`children_live` stayed true in it for good, so the reaper
    thread of its first process agent never ended, and a guardian it started was told
    the parent's live sessions and killed them at its exit), and it lets go of the
    parent's guardian (its copy of the pipe kept that guardian from seeing the parent's
    death while the fork lived; its first process agent starts one of its own)."""
    global _guardian
    _branded.clear()
    _starting.clear()
    _sessions.clear()
    _holds.clear()
    guardian, _guardian = _guardian, None
    if guardian is not None and guardian.stdin is not None:
        with contextlib.suppress(OSError):
            guardian.stdin.close()  # (the fork's copy: the parent's stays open)


if SUPPORTED:
    os.register_at_fork(after_in_child=_close_unpassed)
    os.register_at_fork(after_in_child=_new_lock)
    os.register_at_fork(after_in_child=_forget_children)


def _kill_and_reap_marked(
    token: str,
    session: tuple[int, int] | None = None,
    hold: int | None = None,
    branded: int | None = None,
) -> tuple[int, int]:
    # A dying descendant may fork once more while we look, and one may be caught in the
    # middle of its exec: the sweep looks again until neither is left (see _guardian.Sweep).
    holders = None if hold is None else functools.partial(holders_links, hold)
    with _lock:
        live = set(_branded)
    sweep = Sweep(
        token,
        session=session,
        holds=holders,
        brands=None if branded is None else branded.__eq__,
        not_ours=live,
    )
    killed = sweep.run(SWEEP_FOR)
    if sweep.reused:
        log_guarded(
            log,
            logging.INFO,
            "the sweep of %s left pids %s: each another process by the kill (its pid"
            " reused since it was read), not signalled",
            token,
            sweep.reused,
        )
    _reap(sorted(killed))
    return len(killed), len(reap_orphans())


async def kill_descendants(
    token: str,
    session: tuple[int, int] | None = None,
    hold: int | None = None,
    branded: int | None = None,
) -> tuple[int, int]:
    """SIGKILL every process carrying ``token`` (with ``session``, ``(the reaped child's
    session id, when it was seen gone)``: every process of that session that started no
    later, too; with ``hold``, the write end of the child's hold (:func:`new_hold`):
    every process holding its read end; with ``branded``, the child's brand
    (:func:`brand`): every child of this process, the subreaper, that carries it, and
    its descendants; see :class:`._guardian.Sweep`) and reap those reparented to us; then
    reap the branded zombies left here (:func:`reap_orphans`).

    Run after the child itself has exited (and :func:`unbrand`); returns how many
    processes were killed, and how many zombies were reaped.
    """
    if not SUPPORTED:
        return 0, 0
    return await trio.to_thread.run_sync(_kill_and_reap_marked, token, session, hold, branded)
