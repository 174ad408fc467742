"""Process agents: a child process speaking newline-delimited JSON is an agent like any other.

:func:`process_agent` builds an :class:`~nexus_trio.AgentSpec` whose behaviour,
:class:`ProcessAgent`, owns one child process per run of the agent. ``on_start`` starts
the child in its own process group and waits for its ``register`` line; ``handle`` writes
each message as a ``message`` frame and waits for the correlated ``response`` (by
``reply_to`` when the child speaks protocol 2; a protocol-1 child, like the original
bridges, need answer only queries, and its answers are matched by the conversation id it
echoes, else by order); a background reader routes ``send`` frames and answers, a second one copies the
child's stderr to the log. The kernel's guarantees carry over: the agent has an address,
a bounded mailbox, a handle timeout per message, dead letters and supervision — a child
that exits, or cannot be written to within the send deadline, fails the agent and its
supervisor restarts it (a fresh child registers under the same address).

Hostile children cannot hurt the kernel: a stdout line longer than ``line_limit``, invalid
JSON, an unknown frame type or missing fields are logged with the agent's fields (at
most once a second for each kind of problem: a flood of bad lines is not a flood of log
lines), counted (:func:`bridge_stats`: every line) and dead-letter the message they answered (reason
``malformed``); the agent goes on. Its stderr is logged up to 100 lines at once, then 10 a
second; the lines past that are counted, and said in one record a second. A child that
stays silent past the handle timeout has its message dead-lettered (``handler_timeout``)
and is replaced before the next
message if it still has not answered; a protocol-2 child that declared the ``cancel``
feature in its ``register`` is sent a ``cancel`` frame for such a message (and for one
whose requester stopped waiting), so that it can stop and answer at once, and the next
message waits a bounded grace (``cancel_grace``) for that answer before it replaces the
child. ``on_stop``
sends ``shutdown``, waits ``shutdown_grace``, then SIGTERMs and finally SIGKILLs the whole
process group and always reaps the child, so nothing outlives the kernel — not a child
that ignores SIGTERM, nor a grandchild that holds the pipes; on Linux :mod:`._lineage`
also kills the descendants that left the group, and those of a kernel killed with SIGKILL.

<!-- PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing) -->
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import functools
import itertools
import json
import logging
import math
import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import termios
import threading
import time
import uuid
import weakref
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, Literal, NoReturn, final

import attrs
import trio

from .._agent import Agent, AgentSpec, Context, RestartType, log_fields, stop_for_good
from .._brief import brief
from .._deadletter import DeadLetterReason
from .._errors import MailboxFull, MessageFailed, NexusError
from .._logcall import log_guarded
from .._message import (
    LONE_SURROGATE,
    SYSTEM_ID,
    Message,
    MessageKind,
    parse_address,
    unicode_text_read,
)
from .._plural import count_of
from .._router import KernelPhase
from .._throttle import LineBudget, Throttle, count_dropped
from . import _lineage

if TYPE_CHECKING:
    from .._kernel import Kernel

log = logging.getLogger("nexus_trio.bridge")

#: the highest protocol version this side speaks
PROTOCOL_VERSION: Final = 2
_CHUNK: Final = 65536
_STDERR_LINE_LIMIT: Final = 16 * 1024
# A write to a pipe of at most this many bytes is all or nothing (POSIX).
_PIPE_ATOMIC: Final = select.PIPE_BUF
#: a child's stderr lines logged at once after a quiet spell, and then a second: a
#: traceback is logged whole, a flood is not copied into the kernel's log (the lines past
#: the rate are counted, and one record a second says how many were not logged)
_STDERR_BURST: Final = 100
_STDERR_RATE: Final = 10.0
#: how long past its due time the kernel's bound of all process agents' stderr lines may
#: keep holding a note of the lines not logged back (a second at a time): past it the
#: note is logged all the same (else a constant flood of them all could hold it forever)
_STDERR_NOTE_WAIT: Final = 5.0
#: how long to wait for the stdout reader to see end-of-file once the group is dead
_READER_DRAIN: Final = 1.0
#: the UTF-8 byte order mark, skipped at the start of a child's stdout
_BOM: Final = b"\xef\xbb\xbf"
#: and the other way round: how long to wait for the child's exit status once its stdout
#: has ended. An exiting process has its pipes closed a moment before its exit can be
#: read (a third of the exits, measured on Linux: up to milliseconds, more under load),
#: so the wait ends at the exit, and a crash is said as ``exited with status N``; only a
#: child that closed its stdout and lives on waits all of it before it is declared lost
_EXIT_AFTER_EOF: Final = 1.0
#: after the leader has gone: how long its process group gets between SIGTERM and SIGKILL
_GROUP_TERM_WAIT: Final = 0.5
#: protocol-1 tells remembered for correlating answers (older ones count as answered)
_TELL_MEMORY: Final = 10_000
#: characters of a child's error text kept in the failure of its message (and so in the
#: log line and the dead letter): the rest is cut, and the cut said
_ERROR_TEXT_LIMIT: Final = 4096
#: free-form trace ids remembered per kernel (their UUID stand-ins travel inside it)
_TRACE_MEMORY: Final = 65_536
#: namespace of the UUIDs that stand in for free-form trace ids inside the kernel
_TRACE_NAMESPACE: Final = uuid.UUID("9b1a4d3e-5c77-5f0e-8a4e-6e657875732d")
#: the wire kinds of a message (docs/protocol.md); a response's is "Response"
_KINDS: Final = frozenset(kind.value for kind in MessageKind)
_RESPONSE: Final = MessageKind.RESPONSE.value

#: kinds of per-line warning a flood of the child's output would repeat (each logged at
#: most once a second per agent; the counters count every line)
_INVALID: Final = "invalid stdout lines"
_OVERSIZED: Final = "oversized stdout lines"
#: the longest stdout line taken by default (``process_agent(line_limit=)``): the limit
#: of every child of ``nexus send`` and ``nexus run --spawn``, which do not set it
_LINE_LIMIT: Final = 1 << 20
_UNMATCHED: Final = "discarded answers"
_REFUSED: Final = "refused sends"
#: (an answer written without its newline, as a message is given up on)
_UNENDED: Final = "messages given up on with a stdout line waiting for its newline"
_STDERR_WARNING = re.compile(
    r"^\s*(Traceback|\w*(Error|Exception)\b|error\b|ERROR|WARN|WARNING|CRITICAL|FATAL|panic)"
    # the shipped bridges' report of a handler (or on_stop) that raised, of a result JSON
    # cannot carry, or of a run that failed (Node: "nexus-bridge[name]: Error: ...")
    r"|^nexus-bridge\[.*\]: (.*\bfailed\b|result of \w+ is not JSON serialisable"
    r"|[\w.]*(Error|Exception)\b)"
)
#: after a warning line, a line that goes on with it (a frame of a traceback or a stack:
#: indented; blank; Python's chaining of exceptions) is a warning too
_STDERR_GOES_ON = re.compile(
    r"^(\s|$|During handling of the above exception|The above exception was the direct cause)"
)
#: the last line of a Python traceback: the exception (``pkg.MyProblem: text``)
_STDERR_EXCEPTION = re.compile(r"^[A-Za-z_][\w.]*:\s")


class ProcessAgentError(NexusError):
    """The child process of a process agent failed (could not start, exited, stopped reading).

    ``agent`` names the agent, ``pid`` is the child's process id (None if it never started).
    Raised inside the agent, where it fails the run: the supervisor restarts it per policy.
    """

    def __init__(self, agent: str, problem: str, pid: int | None = None) -> None:
        self.agent = agent
        self.problem = problem
        self.pid = pid
        where = f" (pid {pid})" if pid is not None else ""
        super().__init__(f"process agent {agent}{where}: {problem}")


#: the metadata that marks a counter of :class:`BridgeStats`
_COUNT: Final = {"count": True}


@attrs.define
class BridgeStats:
    """Counters of one process agent (one address), kept across restarts of its child.

    :func:`bridge_stats` (live agents) and :func:`stopped_bridge_stats` (final counters of
    stopped ones) return copies; the live object belongs to the agent.
    """

    agent_id: uuid.UUID
    name: str | None
    cmd: tuple[str, ...]
    #: pid of the current child (None before the first start)
    pid: int | None = None
    #: protocol version announced by the current child's ``register`` (1 = original Nexus)
    protocol: int = 1
    #: the current child's ``register`` payload
    registered: Mapping[str, Any] = attrs.field(factory=dict)
    #: children started for this address (the first start and every restart)
    starts: int = attrs.field(default=0, metadata=_COUNT)
    #: frames read from the child's stdout (valid or not, oversized ones included)
    lines_in: int = attrs.field(default=0, metadata=_COUNT)
    #: frames written to the child's stdin
    lines_out: int = attrs.field(default=0, metadata=_COUNT)
    #: stdout lines that were not usable frames (invalid JSON, unknown type, missing fields)
    invalid_lines: int = attrs.field(default=0, metadata=_COUNT)
    #: stdout lines longer than the line limit (discarded whole)
    oversized_lines: int = attrs.field(default=0, metadata=_COUNT)
    #: responses or errors that came after their message had timed out (discarded)
    late_responses: int = attrs.field(default=0, metadata=_COUNT)
    #: responses or errors that matched no message in flight, or one answered already,
    #: and pongs that answered no ping in wait (discarded)
    unmatched_responses: int = attrs.field(default=0, metadata=_COUNT)
    #: messages whose handling was cancelled (handle timeout, request timeout) before an answer
    abandoned: int = attrs.field(default=0, metadata=_COUNT)
    #: ``cancel`` frames written (to a child that declared the ``cancel`` feature)
    cancels_sent: int = attrs.field(default=0, metadata=_COUNT)
    #: children replaced in place because they did not answer a timed-out message (or
    #: exited just as it timed out)
    replaced: int = attrs.field(default=0, metadata=_COUNT)
    #: ``send`` frames routed, and those the kernel refused (unknown recipient, full mailbox, ...)
    sends_routed: int = attrs.field(default=0, metadata=_COUNT)
    sends_failed: int = attrs.field(default=0, metadata=_COUNT)
    #: lines the child wrote on stderr, and those of them not logged (past the first 100
    #: at once, then 10 a second)
    stderr_lines: int = attrs.field(default=0, metadata=_COUNT)
    stderr_lines_not_logged: int = attrs.field(default=0, metadata=_COUNT)
    #: pings (protocol 2, ``ping_interval``) not answered in time
    pings_missed: int = attrs.field(default=0, metadata=_COUNT)
    #: answers of a protocol-1 child to tells (forwarded to the teller as a reply, or dropped)
    tell_answers: int = attrs.field(default=0, metadata=_COUNT)
    #: messages failed because their payload cannot be encoded as JSON
    unserialisable: int = attrs.field(default=0, metadata=_COUNT)
    #: descendants of children killed after the child exited (left its group, or outlived it)
    descendants_killed: int = attrs.field(default=0, metadata=_COUNT)
    #: descendants of children that had exited on their own, reparented to the kernel
    #: process (the subreaper), reaped while the child lives (each second, counted by
    #: the agent whose child's brand they carry) or at the sweep after a child's exit
    #: (this agent's or another's: counted by the agent whose sweep reaped them)
    descendants_reaped: int = attrs.field(default=0, metadata=_COUNT)
    #: children started without the kernel's brand (on Linux): their limits not
    #: settable (a set-user-ID program under a kernel that is not root: ``prlimit``
    #: refused, ``EPERM``), a hard ``RLIMIT_LOCKS`` below the brand, or the child gone
    #: before it; their descendants are swept by the rest (mark, session, hold)
    children_unbranded: int = attrs.field(default=0, metadata=_COUNT)
    #: children that kept the kernel's raised soft ``RLIMIT_NOFILE`` (on Linux, once
    #: the first process agent raised it: see ``_lineage.raise_nofile``): ``prlimit``
    #: could not give them the original back (their limits not settable)
    children_nofile_kept: int = attrs.field(default=0, metadata=_COUNT)
    #: exit status of the last child that exited (negative: killed by that signal)
    last_exit: int | None = None

    @property
    def restarts(self) -> int:
        """Children started after the first one (supervisor restarts and in-place replacements)."""
        return max(self.starts - 1, 0)

    def counts(self) -> dict[str, int]:
        """Every counter (``starts``, ``lines_in``, ... ``children_nofile_kept``) by name: what
        the ``nexus run`` summary reports for a spawned program."""
        return {name: getattr(self, name) for name in _COUNTS}


_COUNTS: Final = tuple(f.name for f in attrs.fields(BridgeStats) if f.metadata.get("count"))

#: stopped process agents whose final counters are kept per kernel (the latest stopped):
#: past it the earliest stopped are dropped, and counted (:attr:`StoppedBridgeStats.forgotten`)
STOPPED_BRIDGES_KEPT: Final = 1024


@final
@attrs.frozen
class StoppedBridgeStats:
    """The final counters of the process agents of a kernel that have stopped for good.

    :func:`stopped_bridge_stats` returns one (copies of the counters).
    """

    #: by agent id, in the order the agents stopped (the latest last): at most
    #: :data:`STOPPED_BRIDGES_KEPT` of them
    agents: Mapping[uuid.UUID, BridgeStats]
    #: stopped agents whose counters were dropped to keep that bound (the earliest stopped)
    forgotten: int


@attrs.define(eq=False)
class _Book:
    """The counters of one kernel's process agents: those with a run going on, and those
    whose last run has ended, the latest last and at most :data:`STOPPED_BRIDGES_KEPT`
    (an agent between two runs, waiting for its restart, is among them while its
    address lives: it is counted as live, and never dropped)."""

    running: dict[uuid.UUID, BridgeStats] = attrs.field(factory=dict)
    ended: collections.OrderedDict[uuid.UUID, BridgeStats] = attrs.field(
        factory=collections.OrderedDict
    )
    forgotten: int = 0
    #: the kernel's bound of each kind of line over all its process agents (see
    #: :meth:`lines_of`)
    kinds: dict[str, LineBudget] = attrs.field(factory=dict)

    def lines_of(self, kernel: Kernel, kind: str) -> LineBudget:
        """The bound of the lines of ``kind`` (a child's stderr lines, a kind of per-line
        warning) of all this kernel's process agents: ``[kernel] log_kind_limit`` a second
        (0: none), as the core's handler failures and dead letters are bounded over all
        agents; the lines it holds back are held by their agent (said by its next line of
        the kind, or its note) and counted there, so it says nothing of its own."""
        budget = self.kinds.get(kind)
        if budget is None:
            limit = kernel.config.kernel.log_kind_limit
            budget = self.kinds[kind] = LineBudget(
                0, _said_by_the_agents, _no_wake, trio.current_time, total=limit
            )
        return budget

    def run_started(self, ctx: Context, cmd: tuple[str, ...]) -> BridgeStats:
        """The counters of ``ctx``'s agent, kept across its runs (new on its first)."""
        stats = self.running.get(ctx.id) or self.ended.pop(ctx.id, None)
        if stats is None:
            stats = BridgeStats(ctx.id, ctx.name, cmd)
        self.running[ctx.id] = stats
        return stats

    def run_ended(self, kernel: Kernel, agent_id: uuid.UUID) -> None:
        stats = self.running.pop(agent_id, None)
        if stats is not None:
            self.ended[agent_id] = stats
            self._trim(kernel)

    def sweep(self, kernel: Kernel) -> None:
        """Agents that stopped for good without a run ending (between two runs): ended."""
        gone = [agent_id for agent_id in self.running if not kernel.is_local(agent_id)]
        for agent_id in gone:
            self.ended[agent_id] = self.running.pop(agent_id)
        if gone:
            self._trim(kernel)

    def _trim(self, kernel: Kernel) -> None:
        while len(self.ended) > STOPPED_BRIDGES_KEPT:
            agent_id, stats = self.ended.popitem(last=False)
            if kernel.is_local(agent_id):
                self.running[agent_id] = stats  # waiting for its restart: alive
            else:
                self.forgotten += 1


_books: weakref.WeakKeyDictionary[Kernel, _Book] = weakref.WeakKeyDictionary()

#: how often (seconds) the branded zombies left to the kernel process are reaped while a
#: process agent's child lives (:func:`_reap_while_children_live`), besides the reap at
#: each child's exit
_REAP_EVERY = 1.0
#: brand -> the counters of the agent whose child carries it and the Trio run they are
#: counted in, until the child's exit is swept
_reaped_for: dict[int, tuple[BridgeStats, trio.lowlevel.TrioToken]] = {}
_reaper_lock = threading.Lock()
#: held by the reaper thread while it reads the process table (files of ``/proc`` open
#: for a moment): the last child's sweep waits for it (:func:`_reaper_scan_ended`), so
#: that a kernel whose process agents all ended leaves no such read behind it
_reaper_scanning = threading.Lock()
#: the thread of :func:`_reap_while_children_live`, while it runs
_reaper: threading.Thread | None = None


def _keep_reaping() -> None:
    """A branded child started: make sure the branded zombies left to the kernel process
    are reaped every :data:`_REAP_EVERY` seconds while such a child lives (one thread a
    process, whatever the number of agents, kernels and Trio runs)."""
    global _reaper
    with _reaper_lock:
        if _reaper is None:
            _reaper = threading.Thread(
                target=_reap_while_children_live, name="nexus_trio.bridge reaper", daemon=True
            )
            _reaper.start()


def _reap_while_children_live() -> None:
    """Reap the branded zombies of the kernel process (escapees of process agents'
    children, reparented to it, that exited on their own: no signal tells of them) at
    most :data:`_REAP_EVERY` seconds after they exit, each counted in
    ``descendants_reaped`` of the agent whose child's brand it carries (in that agent's
    Trio run); end when no branded child lives (the sweep at its exit reaps what it
    left). A thread, on the real clock: no deadline of Trio's (a mock clock's test sees
    none), and nothing it meets ends a run."""
    global _reaper
    while True:
        with _reaper_lock:
            if not _lineage.children_live():
                _reaper = None
                return
        time.sleep(_REAP_EVERY)
        with _reaper_scanning:
            # (asked again under this lock: after the last child's sweep, which waits
            # for this lock, no read of the process table begins)
            if not _lineage.children_live():
                continue
            try:
                _reap_once()
            except Exception:  # (logged; the next start begins again)
                log.exception("cannot reap the branded zombies of process agents")
                with _reaper_lock:
                    _reaper = None
                return


async def _reaper_scan_ended() -> None:
    """No branded child lives: wait for a read of the process table the reaper thread
    began before (at most one; none begins after, see :func:`_reap_while_children_live`)."""
    if _reaper_scanning.acquire(blocking=False):
        _reaper_scanning.release()
        return

    def wait_for_the_read() -> None:
        with _reaper_scanning:
            pass

    await trio.to_thread.run_sync(wait_for_the_read)


async def _brand_dropped(value: int | None) -> None:
    """:func:`_lineage.brand_dropped` of a start that failed: if that brand was the last
    (no branded child lives), wait for a pass of the reaper thread under way, as the last
    child's exit does (``ProcessAgent._kill_and_reap``): a pass may have begun while the
    start was in flight. Shielded (a cancelled start too): one read of the process table."""
    _lineage.brand_dropped(value)
    if value is not None and not _lineage.children_live():
        with trio.CancelScope(shield=True):
            await _reaper_scan_ended()


def _reap_once() -> None:
    """One reap of :func:`_reap_while_children_live`: only the zombies whose agent has
    not begun its child's sweep (see ``ProcessAgent._kill_and_reap``), each counted for
    the agent its brand named as it was taken: one the sweep killed is counted in
    ``descendants_killed`` by it, not reaped and counted in ``descendants_reaped`` too."""
    claimed: dict[int, tuple[BridgeStats, trio.lowlevel.TrioToken]] = {}

    def take(value: int) -> bool:
        counted = _reaped_for.get(value)
        if counted is None:
            return False
        claimed[value] = counted
        return True

    for value in _lineage.reap_orphans(take):
        stats, token = claimed[value]
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(_count_reaped, stats)


def _count_reaped(stats: BridgeStats) -> None:
    stats.descendants_reaped += 1


def _forget_reaper() -> None:
    global _reaper, _reaper_lock, _reaper_scanning
    # (a forked child has no such thread, maybe a lock held: its first start makes one;
    # and no child of the parent's agents is its to count: see _lineage's at-fork hook)
    _reaper, _reaper_lock, _reaper_scanning = None, threading.Lock(), threading.Lock()
    _reaped_for.clear()


if _lineage.SUPPORTED:
    os.register_at_fork(after_in_child=_forget_reaper)


def _said_by_the_agents(total: int, by_key: str) -> None:
    """(A kind bound's lines held back are said by their agents: see ``_Book.lines_of``.)"""


def _no_wake() -> None:
    """(Nothing to rouse: a kind bound says nothing of its own.)"""


def bridge_stats(kernel: Kernel) -> dict[uuid.UUID, BridgeStats]:
    """Counters of the live process agents of ``kernel``, by agent id (copies).

    An agent waiting for its restart is live. Those of agents that have stopped for good
    are in :func:`stopped_bridge_stats`.
    """
    book = _books.get(kernel)
    if book is None:
        return {}
    book.sweep(kernel)
    live = itertools.chain(
        book.running.items(),
        ((agent_id, s) for agent_id, s in book.ended.items() if kernel.is_local(agent_id)),
    )
    return {agent_id: attrs.evolve(stats) for agent_id, stats in live}


def stopped_bridge_stats(kernel: Kernel) -> StoppedBridgeStats:
    """The final counters of the process agents of ``kernel`` that have stopped for good
    (stopped, given up on, or stopped with the kernel), the latest
    :data:`STOPPED_BRIDGES_KEPT` of them, and how many earlier ones were dropped (copies).
    """
    book = _books.get(kernel)
    if book is None:
        return StoppedBridgeStats({}, 0)
    book.sweep(kernel)
    return StoppedBridgeStats(
        {
            agent_id: attrs.evolve(stats)
            for agent_id, stats in book.ended.items()
            if not kernel.is_local(agent_id)
        },
        book.forgotten,
    )


_trace_texts: weakref.WeakKeyDictionary[Kernel, collections.OrderedDict[uuid.UUID, str]] = (
    weakref.WeakKeyDictionary()
)


def _trace_id_from_wire(kernel: Kernel, value: Any) -> uuid.UUID | None:
    """The kernel's trace id for a trace id read from a child: any string is accepted.

    The original wire format has free-form trace ids. A canonical UUID string is used as
    it is; any other string gets a stable UUID stand-in inside the kernel and is
    remembered, so that frames written to process agents carry the original text.
    """
    if value is None:
        return None
    if not isinstance(value, str):
        raise _BadFrame(f"trace_id must be a string, got {type(value).__name__}")
    try:
        as_uuid = uuid.UUID(value)
    except ValueError:
        as_uuid = None
    if as_uuid is not None and str(as_uuid) == value:
        return as_uuid
    stand_in = uuid.uuid5(_TRACE_NAMESPACE, value)
    table = _trace_texts.setdefault(kernel, collections.OrderedDict())
    table[stand_in] = value
    table.move_to_end(stand_in)
    if len(table) > _TRACE_MEMORY:
        table.popitem(last=False)
    return stand_in


def trace_text(kernel: Kernel, trace_id: uuid.UUID | None) -> str | None:
    """The text a trace id has on the wire of process agents (None: no trace id)."""
    if trace_id is None:
        return None
    table = _trace_texts.get(kernel)
    text = table.get(trace_id) if table else None
    return text if text is not None else str(trace_id)


@final
@attrs.frozen
class ProcessOptions:
    """What :func:`process_agent` was asked for, validated."""

    cmd: tuple[str, ...]
    env: Mapping[str, str] | None = None
    cwd: str | None = None
    register_timeout: float = 10.0
    line_limit: int = _LINE_LIMIT
    shutdown_grace: float = 5.0
    ping_interval: float | None = None
    ping_timeout: float = 5.0
    cancel_grace: float = 1.0
    #: a first run that fails before the child registers stops the agent for good
    first_start_stops: bool = False
    #: the first start raises the kernel process's soft ``RLIMIT_NOFILE`` (once a process)
    raise_nofile: bool = True


class _Oversized:
    """Marker returned by :class:`_LineReader` for a discarded line."""

    __slots__ = ("size",)

    def __init__(self, size: int) -> None:
        self.size = size


#: how much of a line still waiting for its newline :meth:`_LineReader.pending` gives
_PENDING_HEAD: Final = 200


@final
class _LineReader:
    """Lines from a byte stream, at most ``limit`` bytes each; longer ones are skipped whole."""

    __slots__ = (
        "_buf",
        "_discarded",
        "_eof",
        "_limit",
        "_scan",
        "_stream",
        "received",
        "unterminated",
    )

    def __init__(self, stream: trio.abc.ReceiveStream, limit: int) -> None:
        self._stream = stream
        self._limit = limit
        self._buf = bytearray()
        self._scan = 0
        self._eof = False
        #: bytes of the current line dropped already (it is too long)
        self._discarded = 0
        #: bytes received from the stream so far
        self.received = 0
        #: the line :meth:`next_line` returned last had no newline: the stream ended in it
        self.unterminated = False

    @property
    def taken(self) -> int:
        """Where in the stream the line :meth:`next_line` returned last ends (its newline
        included): what was received, less what is buffered past it."""
        return self.received - len(self._buf)

    def offered(self) -> int:
        """Where the stream has got to: what was received of it, and what waits in its pipe
        (``FIONREAD``; 0 when that cannot be asked). A line the stream ends past this was
        written after it was asked."""
        waiting = 0
        with contextlib.suppress(AttributeError, OSError, ValueError):
            fd = self._stream.fileno()  # type: ignore[attr-defined]
            waiting = int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, bytes(4)), "little")
        return self.received + waiting

    def pending(self) -> tuple[int, bytes]:
        """The line received so far and not ended by a newline: its size (what was
        discarded of it included) and the start of it still held (``b""`` if discarded)."""
        return self._discarded + len(self._buf), bytes(self._buf[:_PENDING_HEAD])

    async def next_line(self) -> bytes | _Oversized | None:
        """The next line without its newline, an :class:`_Oversized` marker, or None at EOF.

        Cancel-safe: all of its state is kept here, so a call cancelled while it waits for
        more input loses nothing, and the next call goes on with the same line.
        """
        while True:
            index = self._buf.find(b"\n", self._scan)
            if index >= 0:
                line = bytes(self._buf[:index])
                del self._buf[: index + 1]
                self._scan = 0
                discarded, self._discarded = self._discarded, 0
                if discarded or len(line) > self._limit:
                    return _Oversized(discarded + len(line))
                return line
            if len(self._buf) > self._limit:
                # Too long already: drop what we have and skip to the next newline.
                self._discarded += len(self._buf)
                self._buf.clear()
            self._scan = len(self._buf)
            if self._eof:
                break
            chunk = await self._stream.receive_some(_CHUNK)
            if not chunk:
                self._eof = True
                continue
            self.received += len(chunk)
            self._buf += chunk
        if self._discarded:
            # The tail of the line discarded goes with it: it is not one more line.
            size = self._discarded + len(self._buf)
            self._buf.clear()
            self._scan = 0
            self._discarded = 0
            return _Oversized(size)
        if self._buf:
            line = bytes(self._buf)
            self._buf.clear()
            self._scan = 0
            self.unterminated = True
            return line
        return None


@final
class _Slot:
    """One message written to the child and waiting for its answer."""

    __slots__ = (
        "abandoned",
        "answer_by",
        "answered",
        "conversation",
        "done",
        "error",
        "event",
        "msg_id",
        "seen",
        "sender",
        "value",
        "written",
    )

    def __init__(self, msg_id: uuid.UUID, conversation: str = "", sender: str = "") -> None:
        self.msg_id = msg_id
        #: the conversation id and sender written with it (protocol-1 answers echo them)
        self.conversation = conversation
        self.sender = sender
        self.event = trio.Event()
        self.value: Any = None
        self.error: Exception | None = None
        self.done = False
        #: the handler stopped waiting (timeout): a later answer is discarded
        self.abandoned = False
        #: the frame's write started: the child may have (part of) it
        self.written = False
        #: bytes of the child's stdout received when the write started: a line that ends
        #: there was written before the child could read the message, and is not about it
        self.seen = 0
        #: the child was told it was cancelled: its answer is awaited until then (the
        #: grace) before it counts as stuck; None: not told, nothing to wait for
        self.answer_by: float | None = None
        #: what settled it, if the child answered it: "response" or "error"
        self.answered: str | None = None

    def resolve(self, value: Any) -> None:
        if not self.done:
            self.done = True
            self.value = value
            self.answered = "response"
            self.event.set()

    def fail(self, error: Exception, *, answered: str | None = None) -> None:
        if not self.done:
            self.done = True
            self.error = error
            self.answered = answered
            self.event.set()


@final
class _Tell:
    """A tell written to a protocol-1 child: it may be answered, or not at all."""

    __slots__ = ("conversation", "msg", "seen", "sender", "written")

    def __init__(self, msg: Message, conversation: str) -> None:
        self.msg = msg
        self.conversation = conversation
        self.sender = str(msg.sender)
        #: the frame's write started: the child may have (part of) it
        self.written = False
        #: bytes of the child's stdout received when the write started (as a slot's)
        self.seen = 0


@final
class _Flood:
    """One kind of per-line warning: when it may be logged next, and how many were held back."""

    __slots__ = ("held", "throttle")

    def __init__(self, kind: str) -> None:
        # The kernel's clock (trio's): a test moves it with a MockClock.
        self.throttle = Throttle(
            1.0, clock=trio.current_time, kind="process_agent." + kind.replace(" ", "_")
        )
        self.held = 0


@final
class _StderrBudget:
    """Which of a child's stderr lines are logged: a token bucket of ``_STDERR_BURST``
    lines refilled at ``_STDERR_RATE`` a second, on the kernel's clock. The lines held
    back are counted until :meth:`noted`, due a second after the first of them."""

    __slots__ = ("_at", "_tokens", "due_at", "held", "held_by_kind", "note_at")

    def __init__(self) -> None:
        self._tokens = float(_STDERR_BURST)
        self._at = -math.inf
        #: lines not logged since the last note, and when that note is next tried (first:
        #: when it is due, ``due_at``; later, after the kernel's bound held it back)
        self.held = 0
        self.note_at = math.inf
        self.due_at = math.inf
        #: of ``held``, those its own bucket let through and the kernel's bound of all
        #: process agents' stderr lines held back
        self.held_by_kind = 0

    def take(self) -> bool:
        """True if the next line may be logged; else it is held back (counted)."""
        now = trio.current_time()
        self._tokens = min(float(_STDERR_BURST), self._tokens + (now - self._at) * _STDERR_RATE)
        self._at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        self.hold()
        return False

    def hold(self) -> None:
        """Hold the next line back (counted, said by the next note)."""
        if not self.held:
            self.note_at = self.due_at = trio.current_time() + 1.0
        self.held += 1

    def noted(self) -> tuple[int, int]:
        """The count of lines held back since the last note (and of them, those the
        kernel's bound held back), and a fresh count."""
        held, by_kind = self.held, self.held_by_kind
        self.held, self.held_by_kind, self.note_at, self.due_at = 0, 0, math.inf, math.inf
        return held, by_kind


#: what ``ctx.send`` raises for a message the kernel refused (nothing of it was taken): the
#: kernel's errors, and TypeError / ValueError for one the transport to another node
#: cannot carry (a number of 5,000 digits)
_REFUSALS: Final = (NexusError, TypeError, ValueError)


class _BadFrame(Exception):
    """A stdout line that is not a usable frame; the text says what is wrong, and
    ``frame_type`` the line's ``type`` when it is a JSON object with a string one."""

    def __init__(
        self, problem: str, frame_type: str | None = None, *, has_payload: bool = True
    ) -> None:
        super().__init__(problem)
        self.frame_type = frame_type
        #: False when the line is an object with a ``type`` string and no ``payload``
        self.has_payload = has_payload


#: the frames of the protocol, both ways: a child whose first frame is one of them other
#: than a usable register speaks the protocol, but wrongly; any other line before its
#: register (a banner, a log line, a JSON log record) is noise, skipped
_FRAME_TYPES: Final = frozenset(
    {"register", "response", "error", "send", "pong", "message", "shutdown", "ping", "cancel"}
)


#: the frames a child writes (a ``message`` from one is an unknown frame type)
_CHILD_FRAME_TYPES: Final = frozenset({"register", "response", "error", "send", "pong"})


def _case_slip(frame_type: str | None, types: frozenset[str] = _FRAME_TYPES) -> str:
    """`` (frame types are lower case: 'register')`` when ``frame_type`` is one of
    ``types`` spelled in another case (``"Register"``, ``"RESPONSE"``), else ``""``: the
    original Nexus's serde read types as written and refused such a frame, and so does
    the kernel, naming the spelling it expects."""
    if frame_type is None or frame_type in types:
        return ""
    lower = frame_type.lower()
    return f" (frame types are lower case: {lower!r})" if lower in types else ""


def _meant_as_frame(exc: _BadFrame) -> bool:
    """Whether a bad line before the register, whose ``type`` is no frame type of the
    protocol, is a frame all the same, spelled in another case: a ``"Register"`` (or
    ``"REGISTER"``) object is certainly meant as the register, and another frame type in
    another case is when the object has a ``payload`` (a JSON log record with a ``"type":
    "Error"`` has none: it stays noise, skipped)."""
    if not _case_slip(exc.frame_type):
        return False
    assert exc.frame_type is not None  # (_case_slip says "" for None)
    return exc.has_payload or exc.frame_type.lower() == "register"


#: lines of noise (no frame) a child may write before its register: the start fails at
#: the next (a child that floods its stdout would cost the kernel a core, 5-7 us a line,
#: until register_timeout; 100,000 lines cost ~0.6 s of CPU, and no banner is that long)
_NOISE_LINES: Final = 100_000
#: bytes of noise a child may write before its register (lines up to line_limit long; a
#: fixed bound: a line_limit raised for large answers needs no longer banner)
_NOISE_BYTES: Final = 16 * 1024 * 1024
#: what a start's failure adds about lines a child wrote before registering
_REGISTER_HINT: Final = (
    " (a bridge agent's first frame on stdout is its register; logs go to stderr)"
)


def _lines(count: int, what: str) -> str:
    """``1 line that is {what}``, ``3 lines that are {what}``."""
    return f"{count:,} line that is {what}" if count == 1 else f"{count:,} lines that are {what}"


class _Unmatched(Exception):
    """An answer that answers no message written (discarded); the text says why."""


def _echoed(answer: dict[str, Any]) -> str:
    """What a protocol-1 answer (no ``reply_to``) echoes to be matched by, in words."""
    conversation = answer.get("conversation_id")
    if conversation is None:
        return "it carries neither reply_to nor conversation_id"
    if isinstance(conversation, str) and conversation:
        return f"conversation_id {brief(conversation, 60)}"
    return f"it carries no reply_to, and conversation_id {brief(conversation, 60)} is no id"


def _frame(kind: str, payload: Any) -> bytes:
    return json.dumps({"type": kind, "payload": payload}, separators=(",", ":")).encode() + b"\n"


def _no_json_constant(word: str) -> NoReturn:
    """``parse_constant`` for a child's lines: ``NaN``, ``Infinity`` and ``-Infinity``,
    which Python's ``json`` reads and JSON has not (RFC 8259; the original Nexus's
    ``serde_json`` and Node's ``JSON.parse`` refuse them): a line holding one is not JSON,
    not a message that only fails at the next agent it is routed to."""
    raise ValueError(f"JSON has no NaN or Infinity: it holds {word}")


def _finite_float(literal: str) -> float:
    """``parse_float`` for a child's lines: a number too large for a double (``1e999``),
    which Python's ``json`` reads as infinity, makes the line not JSON, as ``serde_json``
    (the original Nexus) finds it ("number out of range"): an infinity could be written on
    to no other process agent. One that underflows (``1e-999``) reads as 0, finite."""
    value = float(literal)
    if not math.isfinite(value):
        raise ValueError(f"number out of range: {_clip(literal, 40)}")
    return value


#: made once: ``json.loads`` given ``parse_constant`` makes a decoder on every call (+1.8
#: us a line, 40% of ``_parse``'s time for a 148-byte response)
_STRICT_JSON: Final = json.JSONDecoder(parse_constant=_no_json_constant, parse_float=_finite_float)


def _clip(text: str, size: int) -> str:
    """``text``, cut to ``size`` characters with a note of how many were cut."""
    if len(text) <= size:
        return text
    return f"{text[:size]}... ({len(text) - size:,} characters cut)"


def _unended(stdout: _LineReader) -> str:
    """What ``stdout`` holds of a line not ended by a newline (a frame that waits for it
    for ever: ``it wrote 58 bytes with no newline after them ...``), or ``""``."""
    size, head = stdout.pending()
    if not size:
        return ""
    return (
        f"it wrote {size:,} bytes with no newline after them (a frame ends with \\n):"
        f" {_preview(head.strip())!r}"
    )


#: what the failed start of a child that wrote nothing on its stdout adds
_WROTE_NOTHING: Final = (
    "; it wrote nothing on its stdout (its first line there must be its register frame)"
)


def _first_line(skipped: int) -> str:
    """Which line of its stdout a child's start failed at, ``skipped`` lines of noise
    (no frames) before it."""
    if not skipped:
        return "its first stdout line"
    return f"its first stdout line after {_lines(skipped, 'no frame')} (skipped)"


def _skipped_said(skipped: int, first: bytes) -> str:
    """What a failed start adds about the ``skipped`` lines of noise a child wrote before
    registering (``first`` the first of them), or ``""``."""
    if not skipped:
        return ""
    which = ", the first:" if skipped > 1 else ":"
    return (
        f"; it wrote {_lines(skipped, 'no register frame')}{which}"
        f" {_preview(first.strip())!r}{_REGISTER_HINT}"
    )


def _preview(line: bytes, size: int = 120) -> str:
    text = line[:size].decode("utf-8", "replace")
    return text + ("..." if len(line) > size else "")


class ProcessAgent(Agent):
    """The behaviour of a process agent: one child process for one run of the agent.

    Built by the spec from :func:`process_agent`; not meant to be instantiated directly.
    """

    def __init__(self, options: ProcessOptions) -> None:
        self.options = options
        self.process: trio.Process | None = None
        self.protocol = 1
        #: the current child declared the ``cancel`` feature (protocol 2): it is told
        #: when the kernel gives up on a message it was written
        self.cancels = False
        self._ctx: Context | None = None
        self._stats: BridgeStats | None = None
        self._stdout: _LineReader | None = None
        self._inflight: collections.OrderedDict[uuid.UUID, _Slot] = collections.OrderedDict()
        #: protocol 1: tells written and not known to be finished, oldest first
        self._tells: collections.deque[_Tell] = collections.deque(maxlen=_TELL_MEMORY)
        #: a write was cancelled halfway: the child's input may hold half a frame
        self._torn = False
        #: the marker token of each child not yet reaped, by pid
        self._tokens: dict[int, str] = {}
        #: when each child of a token was seen gone (clock ticks since boot), by its pid
        self._gone_at: dict[int, int] = {}
        #: pid -> the write end of that child's hold (see _lineage.new_hold)
        self._holds: dict[int, int] = {}
        #: pid -> that child's brand (see _lineage.brand)
        self._brands: dict[int, int | None] = {}
        self._write_lock = trio.Lock()
        self._stopping = False
        self._lost = False
        #: the child was lost as its message's handler was cancelled: nothing failed the
        #: agent for it (the Cancelled won), so the next message replaces the child
        self._lost_unreported = False
        #: set when the current child's stdout reader has finished (or never started)
        self._reader_done = trio.Event()
        self._reader_done.set()
        #: the current child's stderr, and set once all of it has been read (end of it)
        self._stderr_lines: _LineReader | None = None
        self._stderr_done = trio.Event()
        #: set once no task reads the current child's stderr (one reader at a time)
        self._stderr_free = trio.Event()
        self._stderr_free.set()
        self._generation = 0
        self._extra: dict[str, Any] | None = None
        self._ping_token: str | None = None
        self._pong = trio.Event()
        #: the current child has sent its register line
        self._child_registered = False
        #: ``(the limits wrapper, the child's environment)`` of a child started through
        #: the wrapper (None: started directly), whose exec of the program may fail in it
        #: (:meth:`_wrapper_exec_failure`)
        self._wrapped_start: tuple[str, Mapping[str, str]] | None = None
        #: bytes of the unusable line the current child's stdout ended in (no newline: it
        #: died or closed its stdout halfway through writing it), 0 if none
        self._unfinished = 0
        #: a message waits for the child to answer a cancelled one (:meth:`_stuck`)
        self._in_grace = False
        #: a protocol-1 tell is being written (:meth:`_write_tell`): a message the child
        #: is still given at a shutdown, as one waiting in ``_inflight`` is answered
        self._telling = False
        #: per-line warnings by kind (:meth:`_warn_line`)
        self._floods: dict[str, _Flood] = {}
        #: which stderr lines of the children of this run are logged (:meth:`_copy_stderr`)
        self._stderr_budget = _StderrBudget()
        #: the last stderr line logged was a warning, or went on with one (a traceback)
        self._stderr_warning = False
        #: the current child's last non-blank stderr line, and its last one that reads as
        #: an error (``Error: ...``, ``python3: can't open file ...``): quoted when it exits
        #: before registering (:meth:`_last_words`)
        self._stderr_last = b""
        self._stderr_error = ""
        #: where the child's stdout had got to (:meth:`_LineReader.offered`) when each of
        #: those was read: a frame that ends past it was written after it (it is dropped
        #: once that frame is handled); one that ends within it may have been either side
        self._stderr_last_at = self._stderr_error_at = 0

    # --- lifecycle ------------------------------------------------------------------------------

    @property
    def label(self) -> str:
        ctx = self._ctx
        if ctx is None:
            return shlex.join(self.options.cmd)
        if ctx.name:
            return f"{ctx.name} ({ctx.id})"
        registered = self._stats.registered.get("name") if self._stats is not None else None
        if not registered or not isinstance(registered, str):
            return str(ctx.id)
        # The child's word, in every line about this agent: kept short.
        return f"{ctx.id} (registered as {brief(registered, 60)})"

    @property
    def stats(self) -> BridgeStats:
        assert self._stats is not None, "the process agent has not started"
        return self._stats

    async def on_start(self, ctx: Context) -> None:
        self._ctx = ctx
        book = _books.setdefault(ctx.kernel, _Book())
        first_run = ctx.id not in book.running and ctx.id not in book.ended
        self._stats = book.run_started(ctx, self.options.cmd)
        # A stop during the handshake gives it up at once (nothing graceful to wait for:
        # the child does not speak the protocol yet) instead of after the agent's long
        # shutdown_timeout, which is the stop sequence's; the run then ends as a stop.
        watch = trio.CancelScope()
        ctx.nursery.start_soon(self._give_up_start_on_stop, ctx, watch, ctx.nursery.cancel_scope)
        try:
            await self._start_child()
            ctx.nursery.start_soon(self._give_up_answers_at_shutdown, ctx)
        except trio.Cancelled:
            # The run is stopped before it started: no on_stop comes (the kernel calls
            # none for an on_start that did not return), so the child is stopped and
            # reaped here, and the run's counters are final.
            with trio.CancelScope(shield=True):
                self._stopping = True
                try:
                    await self._stop_child(graceful=False)
                finally:
                    self._say_floods_held()  # (as on_stop does: none comes)
                    book.run_ended(ctx.kernel, ctx.id)
            raise
        except Exception:
            watch.cancel()  # (the stop asked below is no stop to give the start up for)
            if first_run and self.options.first_start_stops:
                await stop_for_good(ctx)
            raise  # the run fails with it: a ``failed`` event, then ``stopped``
        finally:
            watch.cancel()

    @staticmethod
    async def _give_up_start_on_stop(
        ctx: Context, watch: trio.CancelScope, start: trio.CancelScope
    ) -> None:
        """Cancel ``start`` (a child's start: the run's, or a replacement's) at the stop
        request, unless ``watch`` is cancelled first. Not at a draining stop
        (``kernel.stop(ref, drain=True)``): the queue is to be handled, by the child being
        started, within the agent's ``shutdown_timeout``, which cancels the run."""
        with watch:
            await ctx.wait_stop_requested()
            if not ctx.stop_drains:
                start.cancel()

    async def _give_up_answers_at_shutdown(self, ctx: Context) -> None:
        """At a kernel shutdown whose grace is over, a message the child still works on
        is given up at once (the run is cancelled: the message is dead-lettered
        ``shutdown``, then ``on_stop`` stops the child), as the kernel does with the
        handlers of agents that have no ``shutdown_timeout`` of their own. The agent's
        long one is the stop sequence's (shutdown frame, grace, SIGTERM, grace): the
        answer was waited for that long on top of the grace, 17.5 s of a 5 s grace
        (``nexus send`` to a silent child, Ctrl-C). So is a protocol-1 tell still being
        written to a child that stopped reading (since the fifty-second pass: before, the
        shutdown waited for it through that timeout). A stop of this agent alone
        (``kernel.stop``) still lets the message finish, within that timeout."""
        await ctx.wait_stop_requested()
        if ctx.kernel.phase >= KernelPhase.STOPPING and (
            self._telling or any(not slot.abandoned for slot in self._inflight.values())
        ):
            ctx.nursery.cancel_scope.cancel()

    async def on_stop(self, ctx: Context) -> None:
        self._stopping = True
        # A child still silent on a timed-out message would not read a shutdown frame,
        # nor would one that never registered (it does not speak the protocol).
        stuck = self._torn or any(slot.abandoned for slot in self._inflight.values())
        try:
            await self._stop_child(graceful=not stuck and self._child_registered)
        finally:
            self._say_floods_held()
            # Its counters are final now, unless the agent is restarted.
            book = _books.get(ctx.kernel)
            if book is not None:
                book.run_ended(ctx.kernel, ctx.id)

    async def _start_child(self) -> None:
        ctx = self._ctx
        assert ctx is not None
        options = self.options
        env = dict(os.environ if options.env is None else options.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        env["NEXUS_AGENT_ID"] = str(ctx.id)
        # (what an agent of a later protocol version reads to know it runs as this one)
        env["NEXUS_KERNEL_PROTOCOL"] = str(PROTOCOL_VERSION)
        if ctx.name:
            env["NEXUS_AGENT_NAME"] = ctx.name
        # Descendants carry this mark: they are killed with the child, whatever they do.
        _lineage.protect()
        if options.raise_nofile:
            _lineage.raise_nofile()  # (once: five descriptors a live agent; see _lineage)
        token = _lineage.mark(env)
        stats = self.stats
        self._generation += 1
        self._lost = False
        self._lost_unreported = False
        self._torn = False
        self._tells.clear()
        self._child_registered = False
        self._unfinished = 0
        # No stdout reader runs for this child before it registers: nothing to wait for.
        self._reader_done = trio.Event()
        self._reader_done.set()
        self.protocol = 1
        self.cancels = False
        # ... and hold the read end of a pipe of ours, unless they close it (_lineage).
        hold = _lineage.new_hold()
        # ... and carry its brand, which even closing every descriptor keeps, from its
        # first instruction: set before its exec by a wrapper, where one is (_lineage).
        value = _lineage.new_brand()
        wrapping = _lineage.wrapped(options.cmd, value) if _execs_as_is(options, env) else None
        start = functools.partial(
            trio.lowlevel.open_process,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            env=env,
            cwd=options.cwd,
            pass_fds=() if hold is None else (hold[0],),
        )
        try:
            if wrapping is None:
                process = await start(list(options.cmd))
            else:
                try:
                    process = await start(wrapping[0])
                except OSError as exc:
                    if exc.filename != wrapping[0][0]:
                        raise
                    # The wrapper's exec failed (removed or made unusable since it was
                    # found), not the program's: started without it, and the wrapper
                    # forgotten if that start succeeds (else the program's error is said).
                    process = await start(list(options.cmd))
                    _lineage.wrapper_failed(wrapping[0][0], exc)
                    wrapping = None
        except OSError as exc:
            if hold is not None:
                os.close(hold[1])
            await _brand_dropped(value)
            raise ProcessAgentError(self.label, _start_problem(options, env, exc)) from exc
        except BaseException:
            if hold is not None:
                os.close(hold[1])
            await _brand_dropped(value)
            raise
        finally:
            if hold is not None:
                _lineage.hold_passed(hold[0])
        self.process = process
        self._wrapped_start = None if wrapping is None else (wrapping[0][0], env)
        self._tokens[process.pid] = token
        if wrapping is not None:
            branded = wrapping[1]
            _lineage.brand_started(process.pid, branded)
            _lineage.brand_dropped(value)  # (a brand above the hard limit: none set)
            nofile_given = True
        else:  # (no wrapper: set after the start, what the child forked before has none)
            branded = _lineage.brand(process.pid, value)
            nofile_given = _lineage.give_back_nofile(process.pid)
        self._brands[process.pid] = branded
        if branded is not None:
            _reaped_for[branded] = (stats, trio.lowlevel.current_trio_token())
            _keep_reaping()
        if branded is None and _lineage.SUPPORTED:
            stats.children_unbranded += 1
            if stats.children_unbranded == 1:  # (once an agent: a restart is the same program)
                log_guarded(
                    log,
                    logging.WARNING,
                    "process agent %s: its child (pid %d) could not be branded (its"
                    " limits not settable: a set-user-ID program, or a hard RLIMIT_LOCKS"
                    " below the brand); its descendants are swept by their mark, session"
                    " and hold only (counted in children_unbranded)",
                    self.label,
                    process.pid,
                )
        # ... and get the soft RLIMIT_NOFILE the kernel had before it raised it (_lineage).
        if not nofile_given:
            stats.children_nofile_kept += 1
            if stats.children_nofile_kept == 1:  # (once an agent, as the brand)
                log_guarded(
                    log,
                    logging.WARNING,
                    "process agent %s: its child (pid %d) keeps the kernel's raised soft"
                    " RLIMIT_NOFILE (its limits not settable); a program using select()"
                    " may fail above 1,024 descriptors (counted in children_nofile_kept)",
                    self.label,
                    process.pid,
                )
        if hold is not None:
            self._holds[process.pid] = hold[1]
        _lineage.session_started(process.pid, None if hold is None else hold[1])
        stats.starts += 1
        stats.pid = process.pid
        log_guarded(
            log,
            logging.INFO,
            "process agent %s started %s (pid %d)",
            self.label,
            shlex.join(options.cmd),
            process.pid,
            extra=self._fields(),
        )
        assert process.stdout is not None and process.stderr is not None
        self._stderr_lines = _LineReader(process.stderr, _STDERR_LINE_LIMIT)
        self._stderr_done = trio.Event()
        self._stderr_last, self._stderr_error = b"", ""
        self._stderr_free = trio.Event()
        ctx.nursery.start_soon(
            self._copy_stderr,
            self._stderr_lines,
            self._stderr_done,
            self._stderr_free,
            name=f"stderr of {self.label}",
        )
        self._stdout = _LineReader(process.stdout, options.line_limit)
        await self._await_register(process)
        self._reader_done = trio.Event()
        ctx.nursery.start_soon(
            self._read_stdout,
            process,
            self._generation,
            self._reader_done,
            name=f"stdout of {self.label}",
        )
        ctx.nursery.start_soon(
            self._watch_exit, process, self._generation, name=f"exit of {self.label}"
        )
        if options.ping_interval is not None and self.protocol >= 2:
            ctx.nursery.start_soon(
                self._ping_loop, process, self._generation, name=f"ping of {self.label}"
            )

    async def _await_register(self, process: trio.Process) -> None:
        stdout = self._stdout
        assert stdout is not None
        stats = self.stats
        first_line = True
        #: lines before the register that are no frame (a banner, a log line): skipped,
        #: as the original kernel did, and said when the start fails
        skipped = blank = noise = 0
        first_skipped = b""
        with trio.move_on_after(self.options.register_timeout):
            while True:
                line = await stdout.next_line()
                if first_line and isinstance(line, bytes) and line.startswith(_BOM):
                    # (a byte order mark opening the stream, as a .NET program writes
                    # with Console.OutputEncoding = UTF8: no part of the frame)
                    line = line[len(_BOM) :]
                first_line = False
                if line is None:
                    code = await self._exit_code(process)
                    words = await self._last_words() if code is not None else ""
                    failed = self._wrapper_exec_failure(code)
                    if failed is not None:  # (the program never ran: no pid of its own)
                        raise ProcessAgentError(self.label, failed)
                    if not (words or skipped or blank or self._unfinished):
                        # (a script that ran to its end, say, as a program that is no
                        # bridge agent does: what it should have written)
                        words = _WROTE_NOTHING
                    raise ProcessAgentError(
                        self.label,
                        self._said_unfinished(f"exited (status {code}) before registering")
                        + _skipped_said(skipped, first_skipped)
                        + words
                        if code is not None
                        else self._said_unfinished(
                            "closed its stdout before registering (still running; it will be"
                            " killed)"
                        )
                        + _skipped_said(skipped, first_skipped),
                        process.pid,
                    )
                stats.lines_in += 1
                if isinstance(line, _Oversized):
                    # (a register frame too long for the limit, most likely: a banner is
                    # never a megabyte long)
                    stats.oversized_lines += 1
                    self._not_a_register(
                        process,
                        f"{_first_line(skipped)}, which must be its register frame, was"
                        f" {line.size:,} bytes, over the line limit of"
                        f" {self.options.line_limit:,} bytes (discarded)",
                    )
                if not line.strip():
                    blank += 1
                    noise += len(line) + 1  # (blank lines flood as well: `yes ''`)
                    if skipped + blank >= _NOISE_LINES or noise >= _NOISE_BYTES:
                        self._flooded(process, skipped, blank, noise, first_skipped)
                    continue
                try:
                    frame_type, payload = self._parse(line)
                    if frame_type.lower() == "register" != frame_type:
                        # (certainly meant as the register: refused at once, as the
                        # original Nexus's serde refused it, not skipped as noise)
                        raise _BadFrame(
                            f"its type is {frame_type!r}, not 'register' (frame types are"
                            " lower case)",
                            frame_type,
                        )
                    if frame_type != "register":
                        raise _BadFrame(
                            f"expected a register frame first, got {frame_type!r}"
                            + _case_slip(frame_type),
                            frame_type,
                        )
                    if not isinstance(payload, dict):
                        raise _BadFrame("register payload must be an object", frame_type)
                    version = payload.get("protocol", 1)
                    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
                        # (an original agent sends no protocol: one it cannot parse is
                        # from an agent written for this kernel, wrongly)
                        raise _BadFrame(
                            f"unknown protocol {brief(version)} (an integer: 1, or 2 for the"
                            " extensions)",
                            frame_type,
                        )
                except _BadFrame as exc:
                    if stdout.unterminated:
                        # The output ended halfway through a frame (its register, most
                        # likely): the child died or closed its stdout as it wrote it,
                        # which is what is reported (above), not an invalid line.
                        self._unfinished = len(line)
                        continue
                    stats.invalid_lines += 1
                    quoted = f"{_preview(line.strip())!r}: {exc}"
                    if exc.frame_type not in _FRAME_TYPES and not _meant_as_frame(exc):
                        # No frame of the protocol: a banner or a log line on stdout,
                        # skipped (an agent of the original kernel may print one)
                        skipped += 1
                        if skipped == 1:
                            first_skipped = line
                            quoted += (
                                "; waiting for its register frame (up to register_timeout,"
                                f" {self.options.register_timeout:g}s){_REGISTER_HINT}"
                            )
                        self._warn_line(_INVALID, f"skipped a line before its register: {quoted}")
                        noise += len(line) + 1  # (and its newline)
                        if skipped + blank >= _NOISE_LINES or noise >= _NOISE_BYTES:
                            self._flooded(process, skipped, blank, noise, first_skipped)
                        continue
                    # A frame, but no usable register: it speaks the protocol wrongly (or
                    # another version of it), and would not register later.
                    self._not_a_register(
                        process,
                        f"its register frame is unusable: {quoted}"
                        if (exc.frame_type or "").lower() == "register"
                        else f"{_first_line(skipped)} is not a register frame: {quoted}",
                    )
                self._registered(payload)
                self._child_registered = True
                return
        # A frame written without its newline (sys.stdout.write of the JSON alone) waits
        # for it for ever: say so, or the timeout hides the mistake.
        said = _skipped_said(skipped, first_skipped)
        if unended := _unended(stdout):
            said += f"; {unended}"
        elif not said:  # (silent: say what it should have written)
            said = (
                f"; it wrote {_lines(blank, 'blank')} and nothing else on its stdout (its first"
                " line there must be its register frame)"
                if blank
                else _WROTE_NOTHING
            )
        raise ProcessAgentError(
            self.label,
            f"did not register within {self.options.register_timeout:g}s{said}",
            process.pid,
        )

    def _wrapper_exec_failure(self, code: int | None) -> str | None:
        """The start error of a child started through the limits wrapper whose program the
        wrapper could not exec (it passed :func:`_execs_as_is`, then was removed, or is
        busy being written, or its ELF interpreter is missing): the same as that of a start
        without the wrapper (:func:`_start_problem`), or None. Told apart from a program
        that exits 126 or 127 on its own by what only the wrapper leaves: an exit with
        ``code`` 126 or 127, nothing on stdout, and on stderr its line and nothing else
        (:func:`_wrapper_exec_failure`); the program never ran, so wrote nothing."""
        started, stdout, stderr = self._wrapped_start, self._stdout, self._stderr_lines
        if (
            started is None
            or code not in (126, 127)
            or stdout is None
            or stdout.received
            or stderr is None
            or not self._stderr_done.is_set()
            or stderr.received != len(self._stderr_last) + 1  # (that line and its newline)
        ):
            return None
        wrapper, env = started
        exc = _wrapper_exec_failure(wrapper, self.options.cmd[0], self._stderr_last, code)
        return None if exc is None else _start_problem(self.options, env, exc)

    def _flooded(
        self, process: trio.Process, skipped: int, blank: int, noise: int, first: bytes
    ) -> NoReturn:
        """Fail the start: the child wrote ``skipped`` lines that are no frame and
        ``blank`` blank ones (``noise`` bytes; ``first`` the first that is no frame)
        before its register, the most skipped (a flood: no agent of the original kernel
        prints that much before registering, and each line costs the kernel CPU)."""
        blanks = "all blank; " if not skipped else f"{blank:,} of them blank; " if blank else ""
        said = f"; the first: {_preview(first.strip())!r}" if skipped else ""
        self._not_a_register(
            process,
            f"it wrote {_lines(skipped + blank, 'no register frame')} ({blanks}{noise:,}"
            f" bytes) before registering, the most skipped ({_NOISE_LINES:,} lines or"
            f" {_NOISE_BYTES:,} bytes){said}{_REGISTER_HINT}",
        )

    def _not_a_register(self, process: trio.Process, problem: str) -> NoReturn:
        """Fail the start at the child's first frame when it is no usable register (as
        an exit before registering does), or at a line over the limit: a child that
        speaks the protocol wrongly would not register later, and waiting out
        ``register_timeout`` would only hide why. (Lines that are no frame, a banner or a
        log line on stdout, are skipped: an agent of the original kernel may write one.)"""
        raise ProcessAgentError(self.label, problem, process.pid)

    def _registered(self, payload: dict[str, Any]) -> None:
        # The address is the kernel's: id and name are only what the child calls itself,
        # but the original protocol has both, as strings.
        problems = [
            f"no {field!r}"
            if field not in payload
            else f"{field!r} must be a string, got {brief(payload[field], 60)}"
            for field in ("id", "name")
            if not isinstance(payload.get(field), str)
        ]
        if problems:
            self._warn(f"register: {'; '.join(problems)}")
        # (an integer from 1: _await_register refused any other value)
        announced = payload.get("protocol", 1)
        self.protocol = min(announced, PROTOCOL_VERSION)
        if announced > PROTOCOL_VERSION:
            # Versions are additive (docs/protocol.md): a later one is run as the highest
            # this kernel speaks, as a TLS or Erlang distribution handshake settles on the
            # highest both speak, and the agent is told, here and by NEXUS_KERNEL_PROTOCOL.
            self._warn(
                f"register: it announced protocol {announced}; this kernel speaks protocols 1"
                f" to {PROTOCOL_VERSION} (NEXUS_KERNEL_PROTOCOL={PROTOCOL_VERSION} in its"
                f" environment): it runs as protocol {PROTOCOL_VERSION}, and what later"
                " versions add is not used"
            )
        features = payload.get("features", [])
        if not isinstance(features, list):
            self._warn(f"register: 'features' must be a list of strings, got {brief(features)}")
            features = []
        elif odd := [name for name in features if not isinstance(name, str)]:
            self._warn(f"register: 'features' entries must be strings; ignored: {brief(odd)}")
        # Extensions are protocol 2: a protocol-1 child gets exactly the original frames.
        self.cancels = self.protocol >= 2 and "cancel" in features
        stats = self.stats
        stats.protocol = self.protocol
        stats.registered = dict(payload)
        ctx = self._ctx
        assert ctx is not None
        # A name is a string: a register without one (null, or a number warned about
        # above) names nothing, not the text "None" (as in self.label).
        name = payload.get("name")
        # The name a register frame gives addresses nothing (the kernel named the agent
        # before the child started, and messages may wait for it by that name): one that
        # differs, a hand-written program's own, says which name does.
        address = (
            f"; its address is {ctx.name!r}, not the name it registered (send to {ctx.name!r})"
            if isinstance(name, str) and ctx.name is not None and name != ctx.name
            else ""
        )
        log_guarded(
            log,
            logging.INFO,
            "process agent %s %s (protocol %d)%s",
            ctx.name or ctx.id,  # not self.label, which would say the registered name again
            f"registered as {brief(name, 60)}"
            if isinstance(name, str)
            else "registered without a name",
            self.protocol,
            address,
            extra=self._fields(),
        )

    async def _exit_code(self, process: trio.Process) -> int | None:
        """The child's exit status, waiting at most :data:`_EXIT_AFTER_EOF` (None: it lives)."""
        with trio.move_on_after(_EXIT_AFTER_EOF):
            await self._wait_exit(process)
        code = process.returncode  # (a poll: it reaps a child that exited meanwhile)
        if code is not None:
            self._seen_gone(process)
            self.stats.last_exit = code
        return code

    async def _stop_child(self, *, graceful: bool) -> None:
        """Stop the current child: shutdown frame, grace, SIGTERM, SIGKILL; always reap it."""
        process = self.process
        if process is None:
            return
        grace = self.options.shutdown_grace
        async with trio.open_nursery() as readers:
            self._read_while_stopping(readers, process)
            try:
                if graceful and process.returncode is None:
                    with trio.move_on_after(grace):
                        with contextlib.suppress(ProcessAgentError):
                            await self._write(_frame("shutdown", {}))
                        # End of input too: original-protocol agents may only stop at EOF.
                        await self._close_stdin(process)
                        await self._wait_exit(process)
                    if process.returncode is None:
                        self._warn(f"did not exit within {grace:g}s of shutdown; sending SIGTERM")
                elif process.returncode is None:
                    # (one that never registered does not speak the protocol: it is no
                    # worse for that, it is sent no shutdown frame)
                    self._warn(
                        "is not answering; sending SIGTERM"
                        if self._child_registered
                        else "has not registered (it is sent no shutdown frame); sending SIGTERM"
                    )
                if process.returncode is None:
                    self._signal_group(process, signal.SIGTERM)
                    with trio.move_on_after(grace):
                        await self._wait_exit(process)
            finally:
                # Past this point nothing may be skipped: not even an outer cancellation.
                with trio.CancelScope(shield=True):
                    await self._kill_and_reap(process)
                readers.cancel_scope.cancel()

    def _read_while_stopping(self, readers: trio.Nursery, process: trio.Process) -> None:
        """Read the child's output until it is reaped (the run's readers ended with the run).

        A child that writes more than a pipe holds on its way out (a log flush, its last
        sends) would block on the full pipe and be killed at the end of the grace: its
        stderr is still logged and its stdout still handled (sends routed, late answers
        discarded) while it stops; a child that never registered has its stdout skipped.
        """
        stderr = self._stderr_lines
        if stderr is not None and not self._stderr_done.is_set():
            readers.start_soon(self._copy_stderr_once_free, stderr, self._stderr_done)
        if self._stdout is None:
            return
        self._reader_done = done = trio.Event()
        if self._child_registered:
            readers.start_soon(self._read_stdout, process, self._generation, done)
        else:
            readers.start_soon(self._skip_stdout, done)

    async def _skip_stdout(self, done: trio.Event) -> None:
        """Read and drop the stdout of a child that never registered (counted)."""
        stdout = self._stdout
        assert stdout is not None
        try:
            while await stdout.next_line() is not None:
                self.stats.lines_in += 1
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass
        finally:
            done.set()

    async def _wait_exit(self, process: trio.Process) -> None:
        """``process.wait()``, noting when the child was seen gone (see :meth:`_kill_and_reap`)."""
        await process.wait()
        self._seen_gone(process)

    def _seen_gone(self, process: trio.Process) -> None:
        """Note when the reaped child was seen gone, the first time (see
        :meth:`_kill_and_reap`): as soon as it is seen reaped, by a wait or by the poll
        of its ``returncode`` after one timed out (:meth:`_exit_code`, whose caller may
        take seconds before the next wait: its last words, a restart), for its session
        id, its pid, was no other program's until the reap; from then on it may be (see
        _guardian.Sweep)."""
        if _lineage.SUPPORTED and process.pid in self._tokens and process.pid not in self._gone_at:
            self._gone_at[process.pid] = gone_at = _lineage.ticks_now()
            _lineage.session_gone(process.pid, gone_at)

    async def _kill_and_reap(self, process: trio.Process) -> None:
        if process.returncode is None:
            if not self._stopping:
                self._warn("killing the process group")
            else:
                self._warn("still running; sending SIGKILL")
            self._signal_group(process, signal.SIGKILL)
        await self._wait_exit(process)
        self.stats.last_exit = process.returncode
        # The leader is gone; what is left of its group (grandchildren, maybe holding
        # the pipes) gets SIGTERM, a moment, then SIGKILL. Those that die are reparented
        # to us (the subreaper) and reaped here: nothing else waits for them.
        if self._signal_group(process, signal.SIGTERM):
            with trio.move_on_after(_GROUP_TERM_WAIT):
                # No event tells when the last member of a group is gone: poll.
                while self._signal_group(process, 0):
                    await trio.to_thread.run_sync(_lineage.reap_group, process.pid)
                    await trio.sleep(0.02)
            if self._signal_group(process, signal.SIGKILL):
                await trio.to_thread.run_sync(_lineage.reap_group, process.pid, _GROUP_TERM_WAIT)
        token = self._tokens.pop(process.pid, None)
        hold = self._holds.pop(process.pid, None)
        branded = self._brands.pop(process.pid, None)
        _lineage.unbrand(process.pid, branded)
        if branded is not None:
            # (before the sweep, if no signal to the group did: what it kills is counted
            # killed by it, not reaped by the reaper thread and counted reaped as well)
            _reaped_for.pop(branded, None)
        try:
            await self._sweep_descendants(process, token, hold, branded)
        finally:
            if hold is not None:
                os.close(hold)
        if not _lineage.children_live():
            await _reaper_scan_ended()
        await self._close_stdin(process)
        # What the child wrote before it died is read (its last answer, its last words).
        with trio.move_on_after(_READER_DRAIN):
            await self._reader_done.wait()
            await self._stderr_done.wait()
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                await stream.aclose()
        log_guarded(
            log,
            logging.INFO,
            "process agent %s: child %d %s",
            self.label,
            process.pid,
            self._said_unfinished(f"exited with status {process.returncode}"),
            extra=self._fields(),
        )

    async def _sweep_descendants(
        self, process: trio.Process, token: str | None, hold: int | None, branded: int | None
    ) -> None:
        """Kill what the exited child left behind outside its process group."""
        if token is None:
            return
        # Those that left the group (setsid) or were started by a group member that
        # already died: found by their mark, reparented to us as the subreaper.
        # And those of its session (start_new_session: the child's pid) that left its
        # group with setpgid(), cleared their mark (env -i) and lost their parent.
        # (a child whose reap no wait here saw, a wait cancelled as it returned: by
        # token and parent only, its session's number may be another's by now)
        # And those that hold its hold: left its session too (setsid), unmarked, orphaned.
        # And the kernel's children that carry its brand: those that closed the hold too.
        # (Then the branded zombies left here, escapees that exited on their own, reaped.)
        gone_at = self._gone_at.pop(process.pid, None)
        session = None if gone_at is None else (process.pid, gone_at)
        if session is None:
            _lineage.session_done(process.pid)  # (nor is it the guardian's to take)
        killed, reaped = await _lineage.kill_descendants(token, session, hold, branded)
        # (cancelled before this: the guardian still takes the session at the kernel's
        # death, up to when the child was seen gone)
        _lineage.session_done(process.pid)
        self.stats.descendants_reaped += reaped
        if killed:
            self.stats.descendants_killed += killed
            self._warn(f"killed {killed} descendant process(es) left behind by the child")

    def _signal_group(self, process: trio.Process, sig: int) -> bool:
        """Signal the child's process group; False if no process of it is left."""
        if sig:
            branded = self._brands.get(process.pid)
            if branded is not None:
                # (from the kernel's first signal to the group on, what dies is its
                # doing: not the reaper thread's to count as exited on its own)
                _reaped_for.pop(branded, None)
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return False
        except PermissionError:
            # A group member changed user: nothing we may do; it is not ours to reap.
            return False
        return True

    async def _close_stdin(self, process: trio.Process) -> None:
        if process.stdin is not None:
            async with self._write_lock:
                await process.stdin.aclose()

    # --- messages ----------------------------------------------------------------------------------

    async def handle(self, ctx: Context, msg: Message) -> Any:
        if self._lost_unreported:
            await self._replace_child("was lost as its message was cancelled")
        elif self._lost:
            raise ProcessAgentError(self.label, "the child process is gone", self.stats.pid)
        elif self._torn or any(slot.abandoned for slot in self._inflight.values()):
            problem = await self._stuck()
            if problem is not None:
                await self._replace_child(problem)
        frame, conversation = self._encode(ctx, msg)
        if self.protocol == 1 and msg.kind is not MessageKind.QUERY:
            # The original bridges answer a tell only when the handler returned something:
            # it is handled once written; an answer that comes is routed when it comes.
            await self._write_tell(msg, frame, conversation)
            return None
        slot = _Slot(msg.id, conversation, str(msg.sender))
        self._inflight[msg.id] = slot
        sent = False
        try:
            await self._write(frame, entry=slot)
            sent = True
            await slot.event.wait()
        except (trio.Cancelled, KeyboardInterrupt) as stopped:
            # (a Ctrl-C that lands in this task, not the main one, ends the wait as a
            # cancellation does: the child still works on the message, which is given up:
            # on_stop then stops a stuck child, not one that would read its shutdown frame)
            if not slot.done and slot.written:
                # Handle timeout, request timeout or stop: a late answer to this message
                # is discarded, and a child that never answers is replaced. (Cancelled
                # before its write started, say after a slow replacement of the child,
                # the message never reached the child: nothing to wait for or replace.)
                slot.abandoned = True
                self.stats.abandoned += 1
                if self._stdout is not None and (unended := _unended(self._stdout)):
                    # (an answer written without its newline, process.stdout.write of the
                    # JSON alone, waits for it for ever: the timeout would hide why)
                    # (a warning each message would repeat: a child that answers so
                    # answers every message so, and a short timeout gives up on many a
                    # second)
                    self._warn_line(_UNENDED, f"gave up on message {msg.id} unanswered; {unended}")
                if (
                    sent
                    and self.cancels
                    and isinstance(stopped, trio.Cancelled)
                    and await self._send_cancel(slot)
                ):
                    # Before the Cancelled goes on, so before any later frame: a child
                    # that abandons the work answers at once, and is not replaced,
                    # even by a message already queued (it waits for the answer).
                    grace = self.options.cancel_grace
                    if grace > 0:
                        slot.answer_by = trio.current_time() + grace
            elif slot.answered is not None:
                # Answered in the very instant it was given up on (the answer read
                # before the cancelled handler ran, both woken together): discarded as a
                # late answer is, and counted so, whichever of the two ran first.
                self.stats.abandoned += 1
                self._discard_late(slot, slot.answered)
            elif isinstance(slot.error, ProcessAgentError):
                # The child was lost as this handler was cancelled (same scheduling
                # batch): its error, which would fail the agent, is dropped for the
                # Cancelled. The next message must not pay for it: it replaces the child.
                self._lost_unreported = True
            raise
        finally:
            if not slot.abandoned:
                self._inflight.pop(msg.id, None)
        if slot.error is not None:
            raise slot.error
        payload = slot.value
        if msg.kind is MessageKind.RESPONSE:
            # Answering an answer would start an endless exchange.
            return None
        if msg.kind is MessageKind.QUERY:
            # The child answered explicitly, even with null: the requester gets it.
            return msg.reply(ctx.id, payload)
        if payload is None or msg.sender == SYSTEM_ID:
            # Nobody to receive a reply to a tell from outside any agent.
            return None
        return payload

    def _encode(self, ctx: Context, msg: Message) -> tuple[bytes, str]:
        """The ``message`` frame for ``msg`` and the conversation id written with it.

        A payload JSON cannot carry (``object()``, an application class, NaN) fails this
        message only (:class:`MessageFailed`, dead letter ``unserialisable``). For a
        protocol-1 child a message without a conversation id starts its own conversation
        (``conversation_id`` = its id, as :meth:`Message.reply` does): the original bridges
        echo it in their answers, which tells answers to tells from answers to queries.
        """
        conversation = str(msg.conversation_id or msg.id)
        text = trace_text(ctx.kernel, msg.trace_id)
        try:
            body = msg.to_json()
            stamp = self.protocol == 1 and msg.conversation_id is None
            free_trace = msg.trace_id is not None and text != str(msg.trace_id)
            if stamp or free_trace or "NaN" in body or "Infinity" in body:
                wire = json.loads(body)
                if stamp:
                    wire["conversation_id"] = conversation
                wire["trace_id"] = text
                # NaN and Infinity are not JSON: other languages' parsers refuse them.
                body = json.dumps(wire, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as exc:
            self.stats.unserialisable += 1
            raise MessageFailed(
                f"message {msg.id} to process agent {self.label} cannot be encoded as JSON: {exc}",
                reason=DeadLetterReason.UNSERIALISABLE,
            ) from None
        return b'{"type":"message","payload":' + body.encode() + b"}\n", conversation

    async def _send_cancel(self, slot: _Slot) -> bool:
        """Tell the child that the kernel gave up on ``slot``'s message (``cancel`` feature).

        Shielded (the handler is being cancelled) and bounded by the send timeout; a child
        that cannot be written to is only reported (False): the next message replaces it
        anyway, without a grace.
        """
        frame = _frame(
            "cancel", {"message_id": str(slot.msg_id), "conversation_id": slot.conversation}
        )
        with trio.CancelScope(shield=True):
            try:
                await self._write(frame)
            except ProcessAgentError as exc:
                self._warn(f"cancel of message {slot.msg_id} not written: {exc.problem}")
                return False
        self.stats.cancels_sent += 1
        return True

    async def _stuck(self) -> str | None:
        """Why the child must be replaced before the next message; None if it need not be.

        A message was given up on (or its write torn). A child that was told with a
        ``cancel`` frame gets until the grace ends (``cancel_grace`` from the frame, and at
        most half the time the message now due has left, so that it keeps the rest) to
        answer it, with anything: ``Cancelled`` or the real result, discarded as late. The
        wait ends with the answer, the grace, the child's loss, or the cancellation of the
        message now due (its request timeout, a shutdown: nothing more is waited for then;
        the next message waits out what is left of the grace). An answer read in the
        instant the grace ends counts. Any other child is replaced at once, as before.
        """
        given_up = [slot for slot in self._inflight.values() if slot.abandoned]
        if self._torn or not all(slot.answer_by is not None for slot in given_up):
            return "did not answer a timed-out message"
        # The handler's deadline is set once it suspends: from here on it is known.
        await trio.lowlevel.checkpoint()
        now = trio.current_time()
        cap = now + (trio.current_effective_deadline() - now) / 2
        self._in_grace = True
        try:
            for slot in given_up:
                assert slot.answer_by is not None
                with trio.move_on_at(min(slot.answer_by, cap)):
                    await slot.event.wait()
            if not self._lost and any(slot.msg_id in self._inflight for slot in given_up):
                # Read in the same instant as the grace ended, the answer may be waiting
                # for the reader's turn: it has it first.
                await trio.lowlevel.checkpoint()
        finally:
            self._in_grace = False
        if self._lost:
            return "was lost before it answered a cancelled message"
        if any(slot.msg_id in self._inflight for slot in given_up):
            return "did not answer a cancelled message within the grace"
        return None

    async def _write_tell(self, msg: Message, frame: bytes, conversation: str) -> None:
        tell = _Tell(msg, conversation)
        # Remembered before writing: the answer may be read before the write returns.
        self._tells.append(tell)
        self._telling = True
        try:
            # Bounded by the handle timeout, not the send timeout: a busy child reading
            # tells slowly is backpressure, not a failure. (At a shutdown, by its grace:
            # _give_up_answers_at_shutdown.)
            await self._write(frame, bounded=False, entry=tell)
        except trio.Cancelled:
            if tell.written:
                self._torn = True  # half a frame may be in the pipe: replace the child
                self.stats.abandoned += 1
            with contextlib.suppress(ValueError):
                self._tells.remove(tell)
            raise
        except BaseException:
            with contextlib.suppress(ValueError):
                self._tells.remove(tell)
            raise
        finally:
            self._telling = False

    async def _replace_child(self, problem: str = "did not answer a timed-out message") -> None:
        """The child did not answer a message that timed out: replace it before going on.

        Not once the kernel is stopping (its drain is over, while this agent's own
        ``shutdown_timeout`` still runs) or the agent's stop is asked: no process is
        started then. The message now due is dead-lettered (``shutdown``, or
        ``agent_stopped``; never written) and the child is left to ``on_stop``, which
        stops and reaps it.
        """
        self._refuse_if_stopping(problem)
        stats = self.stats
        stats.replaced += 1
        self._warn(f"{problem}; replacing the child process")
        # Bounded by the kill sequence and the register timeout, whatever the handle
        # deadline: a half-replaced child would be worse than a late message.
        with trio.CancelScope(shield=True):
            old = self.process
            self._generation += 1  # the old reader must not treat the kill as a crash
            for slot in self._inflight.values():
                slot.abandoned = True
            self._inflight.clear()
            self._tells.clear()
            if old is not None:
                await self._kill_and_reap(old)
                # Reaped: nothing for on_stop to stop, should the start be refused below
                # (until the fifty-second pass it was killed and reaped a second time:
                # its group signalled again, its exit logged twice).
                self.process = None
            # The kill may have outlasted the drain: the old child is gone, so a later
            # message (there is none once stopping, but) would have to replace it.
            self._lost_unreported = True
            self._refuse_if_stopping(problem)
            await self._start_replacement(problem)

    async def _start_replacement(self, problem: str) -> None:
        """Start the replacement child, bounded by the register timeout whatever the
        handle deadline. Its handshake is given up at the agent's stop request (the
        kernel's drain over, Ctrl-C, ``kernel.stop``; not a draining stop, see
        :meth:`_give_up_start_on_stop`), as the run's first one is: the new child, which does not speak the protocol yet, is left to ``on_stop`` (SIGTERM, no
        shutdown frame, then SIGKILL; reaped) and the message now due, never written, is
        dead-lettered (:meth:`_refuse_if_stopping`). Until the fifty-second pass the start
        was shielded until the child registered: a shutdown waited up to
        ``register_timeout`` for a child it would not use."""
        ctx = self._ctx
        assert ctx is not None
        handshake, watch = trio.CancelScope(), trio.CancelScope()
        ctx.nursery.start_soon(self._give_up_start_on_stop, ctx, watch, handshake)
        try:
            with handshake, trio.fail_after(self.options.register_timeout + 1.0):
                await self._start_child()
        finally:
            watch.cancel()
        if handshake.cancelled_caught:
            self._refuse(problem, "its replacement is given up before it registered")

    def _refuse_if_stopping(self, problem: str) -> None:
        """Fail the message now due if the kernel is stopping or the agent's stop was
        asked: no new child (see :meth:`_refuse`). Not for a draining stop, which promises
        to handle the queue (the fifty-second pass refused it: the queue was dead-lettered
        ``agent_stopped``)."""
        ctx = self._ctx
        assert ctx is not None
        if ctx.kernel.stopping or (ctx.stop_requested and not ctx.stop_drains):
            self._refuse(problem, "not replaced")

    def _refuse(self, problem: str, given_up: str) -> NoReturn:
        """Fail the message now due, never written: dead-lettered ``shutdown`` in a
        kernel's shutdown, else ``agent_stopped`` (as the kernel does the messages an
        agent stopped leaves in its mailbox)."""
        ctx = self._ctx
        assert ctx is not None
        whom = "the kernel" if ctx.kernel.stopping else "the agent"
        message = ctx.message
        what = f"message {message.id}" if message is not None else "the message"
        self._warn(f"{problem}; {given_up}, {whom} is stopping: {what} is not written")
        raise MessageFailed(
            f"process agent {self.label} {problem}; not replaced while {whom} stops",
            reason=DeadLetterReason.SHUTDOWN
            if ctx.kernel.shutting_down
            else DeadLetterReason.AGENT_STOPPED,
        )

    async def _write(
        self, data: bytes, *, bounded: bool = True, entry: _Slot | _Tell | None = None
    ) -> None:
        """Write one frame, bounded by the kernel's send timeout (if ``bounded``).

        The bound is on the waits the child decides: for the write lock (held by a write
        blocked on the child) and for room in its stdin's pipe. A stall of this process
        (CPU load, a long collection, a stopped and continued kernel) that outlasts the
        bound while the write is not waiting for either is no child's fault: a deadline is
        only judged by a wait. The frame goes in pieces of at most ``PIPE_BUF`` bytes, each
        of which the pipe takes whole or not at all: a piece whose write was cancelled by
        the bound left nothing in the pipe, and is written again once the pipe has room;
        a child that gives no room within the bound stopped reading its stdin. A free
        lock is taken without a schedule point: the write's own is ``send_all``'s.

        ``entry.written`` is set once the write starts (the lock is held): a cancellation
        before that left nothing of the frame in the pipe.
        """
        process = self.process
        assert process is not None and process.stdin is not None
        stdin = process.stdin
        timeout = self._send_timeout() if bounded else math.inf
        lock = self._write_lock
        await trio.lowlevel.checkpoint_if_cancelled()  # (cancelled: nothing written)
        try:
            lock.acquire_nowait()
        except trio.WouldBlock:
            with trio.move_on_after(timeout) as waited:
                await lock.acquire()
            if waited.cancelled_caught:
                raise self._stopped_reading(process, timeout) from None
        broken: trio.BrokenResourceError | None = None
        try:
            if entry is not None:
                entry.written = True
                stdout = self._stdout
                if stdout is not None:
                    entry.seen = stdout.received
            if len(data) <= _PIPE_ATOMIC:
                pieces: Sequence[bytes | memoryview] = (data,)
            else:
                view = memoryview(data)
                pieces = [view[at : at + _PIPE_ATOMIC] for at in range(0, len(data), _PIPE_ATOMIC)]
            for piece in pieces:
                while True:
                    with trio.move_on_after(timeout) as attempt:
                        await stdin.send_all(piece)
                    if not attempt.cancelled_caught:
                        break
                    # Nothing of the piece is in the pipe. Full, or this process stalled
                    # past the deadline before the write could start: only a wait for room
                    # tells (the pipe's readiness is taken before a deadline is judged).
                    with trio.move_on_after(timeout) as room:
                        await stdin.wait_send_all_might_not_block()
                    if room.cancelled_caught:
                        raise self._stopped_reading(process, timeout)
        except trio.BrokenResourceError as exc:
            broken = exc  # the child's end is closed: said below, the lock let go
        except trio.ClosedResourceError as exc:
            # (closed on this side: the child is being stopped)
            raise ProcessAgentError(self.label, "its stdin is closed", process.pid) from exc
        finally:
            lock.release()
        if broken is not None:
            # The child exited, or closed its stdin and lives on: which, as at the end of
            # its stdout (its exit status comes a moment after its pipes close).
            code = await self._exit_code(process)
            problem = (
                f"exited with status {code}{await self._last_words_of(code)}"
                if code is not None
                else "closed its stdin (still running; it will be killed)"
            )
            raise ProcessAgentError(self.label, problem, process.pid) from broken
        self.stats.lines_out += 1

    def _stopped_reading(self, process: trio.Process, timeout: float) -> ProcessAgentError:
        return ProcessAgentError(
            self.label,
            f"stopped reading its stdin (write blocked for {timeout:g}s)",
            process.pid,
        )

    def _send_timeout(self) -> float:
        ctx = self._ctx
        return ctx.kernel.config.kernel.send_timeout if ctx is not None else 0.5

    # --- the child's output -----------------------------------------------------------------------

    async def _read_stdout(self, process: trio.Process, generation: int, done: trio.Event) -> None:
        stdout = self._stdout
        assert stdout is not None
        try:
            while True:
                try:
                    line = await stdout.next_line()
                except (trio.ClosedResourceError, trio.BrokenResourceError):
                    line = None
                if line is None:
                    break
                self.stats.lines_in += 1
                end = stdout.taken
                if isinstance(line, _Oversized):
                    self.stats.oversized_lines += 1
                    self._bad_line(
                        _OVERSIZED,
                        f"stdout line of {line.size} bytes exceeds the limit of"
                        f" {self.options.line_limit} bytes; discarded (the child is to write"
                        " shorter lines, e.g. a large answer in parts; the limit is"
                        " process_agent(line_limit=) for a program that spawns it, and"
                        f" {_LINE_LIMIT} bytes under nexus send and nexus run --spawn)",
                        end,
                    )
                    continue
                if not line.strip():
                    continue  # a stray blank line (print()) carries nothing
                try:
                    frame_type, payload = self._parse(line)
                    await self._dispatch(frame_type, payload)
                    # It came after what it said on stderr before it: a crash from here is
                    # said with what it says next (_last_words_of), not with that. (Not by
                    # the order the two pipes are read in: a line read as the frame waited
                    # in the pipe whole may have been written after it, and it stays.)
                    if self._stderr_last_at < end:
                        self._stderr_last = b""
                    if self._stderr_error_at < end:
                        self._stderr_error = ""
                except _BadFrame as exc:
                    if stdout.unterminated:
                        # The output ended halfway through a frame (a whole frame without
                        # its newline is taken above): the child died or closed its stdout
                        # as it wrote it. That is what is reported (by the exit), not a
                        # malformed answer.
                        if generation == self._generation:
                            self._unfinished = len(line)
                        continue
                    self.stats.invalid_lines += 1
                    self._bad_line(_INVALID, f"{exc}: {_preview(line)}", end)
        finally:
            done.set()
        if self._stopping or generation != self._generation:
            return
        code = await self._exit_code(process)
        if self._stopping or generation != self._generation:
            return
        problem = (
            f"exited with status {code}"
            if code is not None
            else "closed its stdout (still running; it will be killed)"
        )
        await self._lose_child(process, generation, problem, code)

    async def _watch_exit(self, process: trio.Process, generation: int) -> None:
        """Notice the child's exit even when a grandchild keeps its stdout open."""
        await self._wait_exit(process)
        # Let the readers take what the child wrote before it exited (its last answer, its
        # last words on stderr): in one window, not one after the other. (A descendant that
        # holds both pipes made a crash wait twice, and a handle timeout under 2 s then
        # said the message timed out.)
        with trio.move_on_after(_READER_DRAIN):
            await self._reader_done.wait()
            if process.returncode:  # (a crash: said with its last words)
                await self._stderr_done.wait()
        if self._stopping or generation != self._generation:
            return
        self.stats.last_exit = process.returncode
        code = process.returncode
        await self._lose_child(
            process, generation, f"exited with status {code}", code, drained=True
        )

    async def _lose_child(
        self,
        process: trio.Process,
        generation: int,
        problem: str,
        code: int | None,
        *,
        drained: bool = False,
    ) -> None:
        """The child of ``generation`` is lost (its stdout ended, or it exited):
        ``problem``, the unfinished line it left and, for a crash, its last words on
        stderr (read first: it may wait), unless it was stopped or replaced meanwhile."""
        words = await self._last_words_of(code, drained=drained)
        if self._stopping or generation != self._generation:
            return
        self._child_lost(
            ProcessAgentError(self.label, self._said_unfinished(problem) + words, process.pid)
        )

    async def _last_words(self, *, drained: bool = False) -> str:
        """What a child that exited said on stderr, as a clause to add
        to its failure: its last line that reads as an error, else its last line ("" if it
        said nothing). Its stderr is read to the end first, for at most ``_READER_DRAIN``
        (a descendant may hold it open). The lines are logged as they come; this puts the
        reason beside the failure, where a log at warning level (``nexus send``) or a
        summary's ``error`` shows it."""
        if not drained:  # (else waited for already)
            with trio.move_on_after(_READER_DRAIN):
                await self._stderr_done.wait()
        said = self._stderr_error or self._stderr_last.decode("utf-8", "replace").strip()
        return f"; on stderr: {brief(said, 160)}" if said else ""

    async def _last_words_of(self, code: int | None, *, drained: bool = False) -> str:
        """:meth:`_last_words` of a registered child that exited with status ``code``
        (not asked to): of a crash (a status other than 0), what it said since its start
        or since the last frame it wrote, so that ``exited with status 1`` of an
        ``on_start`` that raised says why; "" for a clean exit."""
        return await self._last_words(drained=drained) if code else ""

    def _said_unfinished(self, problem: str) -> str:
        """``problem`` (the child's end), and the unfinished line it left, if it left one."""
        if not self._unfinished:
            return problem
        return f"{problem}, leaving an unfinished stdout line of {self._unfinished:,} bytes"

    async def _ping_loop(self, process: trio.Process, generation: int) -> None:
        """Protocol 2 liveness: an idle child must answer ``ping`` within ``ping_timeout``."""
        interval = self.options.ping_interval
        assert interval is not None
        timeout = self.options.ping_timeout
        while True:
            await trio.sleep(interval)
            if self._stopping or generation != self._generation:
                return
            if self._inflight:
                continue  # busy (one message at a time): the handle timeout watches it
            self._ping_token = token = uuid.uuid4().hex
            self._pong = pong = trio.Event()
            try:
                await self._write(_frame("ping", {"id": token}))
            except ProcessAgentError as exc:
                # Exited (the exit watcher may say so first) or stopped reading its stdin.
                if not self._stopping and generation == self._generation:
                    self._child_lost(exc)
                return
            with trio.move_on_after(timeout):
                await pong.wait()
            if pong.is_set() or self._stopping or generation != self._generation:
                continue
            self.stats.pings_missed += 1
            if self._inflight:
                continue  # a message overtook the ping: its handle timeout applies
            self._child_lost(
                ProcessAgentError(
                    self.label, f"did not answer ping within {timeout:g}s", process.pid
                )
            )
            return

    def _child_lost(self, error: ProcessAgentError) -> None:
        """The child is gone or unusable: fail the message in flight, or else the agent itself."""
        if self._lost:
            return
        self._lost = True
        log_guarded(
            log,
            logging.ERROR,
            "process agent %s: %s",
            self.label,
            error.problem,
            extra=self._fields(),
        )
        for slot in list(self._inflight.values()):
            if not slot.abandoned and not slot.done:
                # The handler raises it: the message is dead-lettered, the agent fails.
                slot.fail(error)
                return
        if self._in_grace:
            # The message now due waits for the answer to a cancelled one: it was never
            # written, so it replaces the child instead (or, cancelled meanwhile, the next).
            self._lost_unreported = True
            for slot in self._inflight.values():
                slot.event.set()
            return
        raise error

    @staticmethod
    def _parse(line: bytes) -> tuple[str, Any]:
        try:
            # Decoded here, not by json.loads: given bytes, it guesses UTF-16 and UTF-32
            # and skips a byte order mark, and frames are UTF-8 (docs/protocol.md).
            text = line.decode("utf-8")
            if text.startswith("\ufeff"):  # (what json.loads says of it)
                raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
            frame = _STRICT_JSON.decode(text)
        except UnicodeDecodeError as exc:  # (the decode's: json.loads reads a str)
            raise _BadFrame(f"not UTF-8 ({exc.reason} at byte {exc.start})") from None
        except ValueError as exc:
            raise _BadFrame(f"not JSON ({exc})") from None
        except RecursionError:
            # (the agent side's words; imported only for such a line: the bridge module
            # brings asyncio, 87 ms, which a kernel that reads no such line does without)
            from .python import too_deep

            raise _BadFrame(f"not JSON ({too_deep(line)})") from None
        if not isinstance(frame, dict):
            raise _BadFrame(f"a frame must be a JSON object, got {type(frame).__name__}")
        frame_type = frame.get("type")
        if not isinstance(frame_type, str):
            frame_type = None
        if not unicode_text_read(line, frame):
            # what Message.from_json refuses: it could reach no other node nor a log file
            raise _BadFrame(LONE_SURROGATE, frame_type)
        if frame_type is None:
            raise _BadFrame("frame has no 'type' string")
        if "payload" not in frame:
            raise _BadFrame(
                f"{frame_type!r} frame has no 'payload'{_case_slip(frame_type)}",
                frame_type,
                has_payload=False,
            )
        return frame_type, frame["payload"]

    async def _dispatch(self, frame_type: str, payload: Any) -> None:
        if frame_type == "response":
            if not isinstance(payload, dict):
                raise _BadFrame("response payload must be an object")
            kind = payload.get("kind", _RESPONSE)
            if not isinstance(kind, str) or kind not in _KINDS:
                # (absent: lenient, as the kernel always was; one of the protocol's kinds
                # other than "Response": an answer all the same, as it always was)
                raise _BadFrame(
                    f"response has an unknown kind {brief(kind, 60)} (a response's kind is"
                    ' "Response"; the kinds are "Command", "Event", "Query", "Response")'
                )
            reply_to = payload.get("reply_to")
            if reply_to is None and self.protocol == 1:
                try:
                    answered = self._in_order(payload)
                except _Unmatched as exc:
                    self.stats.unmatched_responses += 1
                    self._warn_line(_UNMATCHED, f"{exc}; discarded")
                    return
                if isinstance(answered, _Tell):
                    await self._tell_answered(answered, payload)
                    return
                slot = self._claim(answered, "response", _echoed(payload))
            else:
                slot = self._correlate(reply_to, "response")
            if slot is None:
                return
            if "payload" not in payload:
                slot.fail(
                    MessageFailed(
                        f"response from process agent {self.label} has no 'payload' field",
                        reason=DeadLetterReason.MALFORMED,
                    )
                )
                raise _BadFrame("response has no 'payload' field")
            slot.resolve(payload["payload"])
        elif frame_type == "error":
            if not isinstance(payload, dict):
                raise _BadFrame("error payload must be an object")
            slot = self._correlate(payload.get("reply_to"), "error")
            if slot is None:
                return
            error = payload.get("error")
            error_type = payload.get("error_type")
            text = error if isinstance(error, str) else json.dumps(error)
            detail = f"{error_type}: {text}" if isinstance(error_type, str) else text
            # Up to the line limit (1 MiB) long: the log and the requester get its start.
            detail = _clip(detail, _ERROR_TEXT_LIMIT)
            slot.fail(
                MessageFailed(f"process agent {self.label} failed the message: {detail}"),
                answered="error",
            )
        elif frame_type == "send":
            await self._route_send(payload)
        elif frame_type == "pong":
            token = payload.get("id") if isinstance(payload, dict) else None
            if token is not None and token == self._ping_token:
                self._ping_token = None  # answered: a second pong answers nothing
                self._pong.set()
            else:
                # None written, another's id, a second answer: discarded as unmatched.
                self.stats.unmatched_responses += 1
                self._warn_line(
                    _UNMATCHED,
                    f"pong with id {brief(token, 60)} answers no ping in wait; discarded",
                )
        elif frame_type == "register":
            raise _BadFrame("already registered")
        else:
            raise _BadFrame(
                f"unknown frame type {frame_type!r}{_case_slip(frame_type, _CHILD_FRAME_TYPES)}"
            )

    def _in_order(self, answer: dict[str, Any]) -> _Tell | _Slot | None:
        """What a protocol-1 answer (no ``reply_to``) answers: a tell, the query, or nothing.

        The child handles messages in order, so the answer belongs to the oldest message
        written that has the ``conversation_id`` (and ``to``) the answer echoes; with
        nothing echoed, to the oldest message written. Tells written before that message
        are finished: they were handled without an answer. An answer that echoes a
        ``conversation_id`` no message written has answers none of them (the late answer
        to a message already failed by an unusable line, say); so does one whose ``to``
        names no sender of that conversation's messages, which never falls back to a
        message of another conversation: when the query is of that conversation, the
        answer is a malformed answer to it (it fails, ``malformed``: :class:`_BadFrame`).
        """
        query = next((s for s in self._inflight.values() if not s.done), None)
        written: list[_Tell | _Slot] = [*self._tells]
        if query is not None:
            written.append(query)
        if not written:
            return None
        conversation = answer.get("conversation_id")
        to = answer.get("to")
        index = 0
        if isinstance(conversation, str) and conversation:
            same = [i for i, entry in enumerate(written) if entry.conversation == conversation]
            if not same:
                return None
            if isinstance(to, str):
                index = next((i for i in same if written[i].sender == to), -1)
                if index < 0:
                    problem = (
                        f"response echoes conversation_id {conversation} but 'to' {to!r}, "
                        "which sent no message of that conversation"
                    )
                    if query is None or query.conversation != conversation:
                        raise _Unmatched(f"{problem}: it answers no message written")
                    query.fail(
                        MessageFailed(
                            f"process agent {self.label} answered message {query.msg_id} "
                            f"with a mismatched response: {problem}",
                            reason=DeadLetterReason.MALFORMED,
                        )
                    )
                    raise _BadFrame(problem)
            else:
                index = same[0]
        for _ in range(min(index + 1, len(self._tells))):
            self._tells.popleft()
        return written[index]

    async def _tell_answered(self, tell: _Tell, answer: dict[str, Any]) -> None:
        """A protocol-1 child answered a tell: the teller gets it as a reply, like any agent's."""
        ctx = self._ctx
        assert ctx is not None
        self.stats.tell_answers += 1
        if "payload" not in answer:
            raise _BadFrame("response has no 'payload' field")
        msg = tell.msg
        value = answer["payload"]
        if value is None or msg.kind is MessageKind.RESPONSE or msg.sender == SYSTEM_ID:
            return  # nobody to tell, or an answer to an answer
        try:
            await ctx.send(msg.reply(ctx.id, value))
        except _REFUSALS as exc:
            self.stats.sends_failed += 1
            self._warn_line(_REFUSED, f"answer to a tell from {msg.sender} not delivered: {exc}")
        except BaseException:
            self.stats.sends_failed += 1  # cancelled waiting for room (the agent stops)
            raise
        else:
            self.stats.sends_routed += 1

    def _correlate(self, reply_to: Any, what: str) -> _Slot | None:
        """The slot a response or error belongs to; None if it is discarded."""
        if reply_to is not None:
            try:
                key = uuid.UUID(reply_to) if isinstance(reply_to, str) else None
            except ValueError:
                key = None
            if key is None:
                raise _BadFrame(f"{what} has an invalid 'reply_to' {reply_to!r}")
            slot = self._inflight.get(key)
            matched_by = f"reply_to={key}"
        else:
            # Original protocol: one message at a time, answers in order.
            slot = next((s for s in self._inflight.values() if not s.done), None)
            matched_by = "it carries no reply_to"
        return self._claim(slot, what, matched_by)

    def _claim(self, slot: _Slot | None, what: str, matched_by: str) -> _Slot | None:
        """``slot`` if the answer found for it is to be used; None if it is discarded.

        ``matched_by`` says what the answer carried to be matched (for the warning)."""
        stats = self.stats
        if slot is None:
            stats.unmatched_responses += 1
            self._warn_line(
                _UNMATCHED, f"{what} matches no message in flight ({matched_by}); discarded"
            )
            return None
        if slot.abandoned:
            del self._inflight[slot.msg_id]
            self._discard_late(slot, what)
            slot.event.set()  # answered: the next message, if it waits, need not replace it
            return None
        if slot.done:
            # Answered (or failed) already, and still in flight only because its handler
            # has not run since: a second answer read in the same batch as the first.
            stats.unmatched_responses += 1
            self._warn_line(
                _UNMATCHED,
                f"{what} to message {slot.msg_id}, which was answered already; discarded",
            )
            return None
        return slot

    def _discard_late(self, slot: _Slot, what: str) -> None:
        """An answer to ``slot``'s message, which timed out, is discarded: counted, logged."""
        self.stats.late_responses += 1
        self._warn_line(
            _UNMATCHED, f"late {what} to message {slot.msg_id} (it timed out); discarded"
        )

    async def _route_send(self, payload: Any) -> None:
        ctx = self._ctx
        assert ctx is not None
        if not isinstance(payload, dict):
            raise _BadFrame("send payload must be an object")
        if "to" not in payload:
            raise _BadFrame("send frame has no 'to'")
        try:
            to = parse_address(payload["to"])
            kind = MessageKind(payload.get("kind", "Command"))
            conversation_id = payload.get("conversation_id")
            if conversation_id is not None and not isinstance(conversation_id, str):
                raise TypeError(
                    f"conversation_id must be a UUID string, got {type(conversation_id).__name__}"
                )
            if "trace_id" in payload:
                trace_id = _trace_id_from_wire(ctx.kernel, payload["trace_id"])
            else:
                # Like ctx.send: the trace of the message being handled carries over.
                current = ctx.message
                trace_id = current.trace_id if current is not None else None
            msg = Message(
                sender=ctx.id,
                to=to,
                payload=payload.get("payload"),
                kind=kind,
                conversation_id=uuid.UUID(conversation_id) if conversation_id else None,
                trace_id=trace_id,
            )
        except (TypeError, ValueError) as exc:
            raise _BadFrame(f"invalid send frame: {exc}") from None
        # To its own mailbox while a message waits for this child's answer: only the
        # handler takes from that mailbox, and it waits for an answer this reader is to
        # read after this send, so no room can come before the send deadline (a child
        # that tells itself things stalled the agent a send deadline each).
        own = (to == ctx.id or to == ctx.name) and self._waits_for_the_child()
        try:
            if own:
                ctx.send_nowait(msg)
            else:
                await ctx.send(msg)
        except _REFUSALS as exc:
            self.stats.sends_failed += 1
            # (the error's text quotes ``to`` again: a name of the child's, of any size)
            self._warn_line(
                _REFUSED,
                f"send to {brief(payload['to'], 60)} refused: {type(exc).__name__}:"
                f" {brief(str(exc), 200)}"
                + (
                    " (its own mailbox, full, while its message waits for this child's"
                    " answer: no room can come, so it does not wait)"
                    if own and isinstance(exc, MailboxFull)
                    else ""
                ),
            )
        except BaseException:
            # cancelled waiting for room (the agent stops): not sent (Trio takes nothing
            # from a cancelled send), and no line of the child's goes uncounted
            self.stats.sends_failed += 1
            raise
        else:
            self.stats.sends_routed += 1

    def _waits_for_the_child(self) -> bool:
        """Whether the agent's handler waits for what this child writes next: the answer
        to its message, or (in the cancel grace) the answer to one given up on."""
        return self._in_grace or any(
            not slot.done and not slot.abandoned for slot in self._inflight.values()
        )

    def _bad_line(self, kind: str, problem: str, end: int) -> None:
        """Report an unusable stdout line; it fails the message in flight, if there is one.

        Not a message the line was read whole before it was written (``end``, where the
        line ends in the child's stdout, is within what had been received when its write
        started), nor one whose write has not started: the child wrote that line before
        it could read the message (a second register, a banner), so it is no answer to it.
        """
        self._warn_line(kind, problem)
        for slot in self._inflight.values():
            if not slot.abandoned and not slot.done:
                if not slot.written or end <= slot.seen:
                    break  # written before the child had the message: not about it
                slot.fail(
                    MessageFailed(
                        f"process agent {self.label} wrote an unusable line: {problem}",
                        reason=DeadLetterReason.MALFORMED,
                    )
                )
                break

    async def _copy_stderr_once_free(self, reader: _LineReader, done: trio.Event) -> None:
        """Copy the rest of the child's stderr (:meth:`_copy_stderr`) once the run's copy
        has ended: a stop as the child started cancelled that one before its first
        checkpoint, where it already held the pipe, and a second reader then failed the
        agent with ``BusyResourceError``. (Run to the end of the stderr, the run's copy
        leaves nothing to copy.)"""
        await self._stderr_free.wait()
        if not done.is_set():
            self._stderr_free = free = trio.Event()
            await self._copy_stderr(reader, done, free)

    async def _copy_stderr(self, reader: _LineReader, done: trio.Event, free: trio.Event) -> None:
        """Log the child's stderr line by line; ``done`` is set at its end (not if
        cancelled), ``free`` once this copy has ended, however.

        A child can write a million lines a second on its stderr, and a record each would
        drown the kernel's log: the first ``_STDERR_BURST`` lines at once are logged, then
        ``_STDERR_RATE`` a second (:class:`_StderrBudget`). The others are counted, and a
        record a second after the first of them says how many were not logged, as does the
        end of the child's stderr (or of this copy).
        """
        logger = logging.LoggerAdapter(
            logging.getLogger("nexus_trio.bridge.stderr"), self._fields()
        )
        budget = self._stderr_budget
        try:
            while True:
                # Wait for a line, but not past the note of those held back. (The reader is
                # cancel-safe: a line cut short by the deadline is read whole next time.)
                with trio.move_on_at(budget.note_at) as wait:
                    try:
                        line = await reader.next_line()
                    except (trio.ClosedResourceError, trio.BrokenResourceError):
                        line = None
                if budget.held and trio.current_time() >= budget.note_at:
                    self._note_stderr_not_logged(logger, bounded=True)
                if wait.cancelled_caught:
                    continue
                if line is None:
                    if budget.held:
                        self._note_stderr_not_logged(logger)
                    done.set()
                    return
                self._log_stderr_line(logger, line)
        finally:
            free.set()
            if budget.held:
                # Cancelled (the child is stopping): say it now, the copy may not resume.
                self._note_stderr_not_logged(logger)

    def _log_stderr_line(
        self, logger: logging.LoggerAdapter[Any], line: bytes | _Oversized
    ) -> None:
        stats = self.stats
        stats.stderr_lines += 1
        at = 0
        if isinstance(line, _Oversized) or line.strip():
            # (a child that never registers, or dies, says why here: since its start or
            # the last frame it wrote; a line too long to keep is its last words all the
            # same, by its size, not a line said before it)
            stdout = self._stdout
            at = stdout.offered() if stdout is not None else 0
            last = (
                f"<a stderr line of {line.size:,} bytes, not shown>".encode()
                if isinstance(line, _Oversized)
                else line
            )
            self._stderr_last, self._stderr_last_at = last, at
        budget = self._stderr_budget
        if not budget.take() or not self._kind_allows("stderr", budget):
            stats.stderr_lines_not_logged += 1
            count_dropped("process_agent.stderr")
            return
        if isinstance(line, _Oversized):
            log_guarded(
                logger,
                logging.WARNING,
                "[%s] <stderr line of %d bytes not shown>",
                self.label,
                line.size,
            )
            return
        text = line.decode("utf-8", "replace").rstrip("\r")
        if (
            text[:1].strip()
            and not text.startswith("Traceback")
            and (_STDERR_WARNING.match(text) or _STDERR_EXCEPTION.match(text))
        ):
            self._stderr_error, self._stderr_error_at = text.strip(), at
        if _STDERR_WARNING.match(text):
            level = logging.WARNING
            self._stderr_warning = True
        elif self._stderr_warning and _STDERR_GOES_ON.match(text):
            # A traceback's frames (Python's "  File ...", Node's "    at ..."): at the
            # level of its header, so that a warning level shows a traceback whole.
            level = logging.WARNING
        elif self._stderr_warning and _STDERR_EXCEPTION.match(text):
            level = logging.WARNING  # the traceback's last line: its exception
            self._stderr_warning = False
        else:
            level = logging.INFO
            self._stderr_warning = False
        log_guarded(logger, level, "[%s] %s", self.label, text)

    def _note_stderr_not_logged(
        self, logger: logging.LoggerAdapter[Any], *, bounded: bool = False
    ) -> None:
        """Say how many stderr lines were not logged. ``bounded``: a note of a second's
        end, itself a stderr line of the kernel's bound (one it holds back is said a
        second later, its count kept), but not more than ``_STDERR_NOTE_WAIT`` past its
        due time: then it is said past the bound; the end of the stderr says it in any
        case."""
        budget = self._stderr_budget
        now = trio.current_time()
        if bounded and now < budget.due_at + _STDERR_NOTE_WAIT and not self._kind_allows("stderr"):
            budget.note_at = min(now + 1.0, budget.due_at + _STDERR_NOTE_WAIT)
            return
        held, by_kind = budget.noted()
        of_all = ""
        lines = self._lines_of("stderr")
        if by_kind and lines is not None:
            of_all = f"; {by_kind:,} of them past {lines.total:,} a second of all process agents"
        log_guarded(
            logger,
            logging.WARNING,
            "[%s] %s not logged (more than %d at once, then %g a second%s)",
            self.label,
            count_of(held, "stderr line"),
            _STDERR_BURST,
            _STDERR_RATE,
            of_all,
        )

    # --- logging -----------------------------------------------------------------------------------

    def _fields(self) -> dict[str, Any]:
        ctx = self._ctx
        if self._extra is None and ctx is not None:
            self._extra = log_fields(ctx.id, ctx.name)
        return self._extra or {}

    def _lines_of(self, kind: str) -> LineBudget | None:
        """The kernel's bound of the lines of ``kind`` of all its process agents (None
        before the start: no kernel yet)."""
        ctx = self._ctx
        if ctx is None:
            return None
        return _books.setdefault(ctx.kernel, _Book()).lines_of(ctx.kernel, kind)

    def _kind_allows(self, kind: str, held_in: _StderrBudget | None = None) -> bool:
        """Whether the kernel's bound of ``kind`` over all its process agents lets one
        more line through this second (``[kernel] log_kind_limit``); one it holds back
        is held in ``held_in`` (a stderr line: said by the agent's next note)."""
        budget = self._lines_of(kind)
        if budget is None or budget.allowed(kind):
            return True
        if held_in is not None:
            held_in.hold()
            held_in.held_by_kind += 1
        return False

    def _warn(self, problem: str) -> None:
        log_guarded(
            log, logging.WARNING, "process agent %s: %s", self.label, problem, extra=self._fields()
        )

    def _say_floods_held(self) -> None:
        """Say how many per-line warnings of each kind are still held back (the run ends:
        no later one of the kind will say them)."""
        for kind, flood in self._floods.items():
            if flood.held:
                held, flood.held = flood.held, 0
                self._warn(
                    f"{held:,} more {kind} since the last one logged, not logged (at most one"
                    " warning a second of a kind; the counters count each)"
                )

    def _warn_line(self, kind: str, problem: str) -> None:
        """Warn about one of the child's lines: at most once a second for each ``kind``.

        A child can write a million bad lines a second, and one log record each would fill
        a disk or drown the log. The first is logged at once; those within the next second
        are held back (the counters still count each one) and the next one logged after
        it says how many were, or the end of the run (:meth:`_say_floods_held`).
        """
        flood = self._floods.get(kind)
        if flood is None:
            flood = self._floods[kind] = _Flood(kind)
        if not flood.throttle.due():
            flood.held += 1
            return
        if not self._kind_allows(kind):
            # Past the kernel's bound of the kind over all process agents: held as one
            # of the agent's own (its next line of the kind says it), counted.
            flood.held += 1
            count_dropped(flood.throttle.kind)
            return
        if flood.held:
            problem = f"{problem} (and {flood.held:,} more since the last one logged)"
            flood.held = 0
        self._warn(problem)


#: bytes of a program read for its ``#!`` line (Linux reads at most 256)
_SHEBANG_READ: Final = 256


def _interpreter(path: str) -> str | None:
    """The interpreter the ``#!`` line of the file at ``path`` names (None: no such line)."""
    try:
        with open(path, "rb") as file:
            head = file.read(_SHEBANG_READ)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    # As the system reads it: up to the first blank, a CR (a file saved on Windows) kept.
    line = head[2:].split(b"\n", 1)[0].lstrip(b" \t")
    name = re.split(rb"[ \t]", line, maxsplit=1)[0]
    return name.decode("utf-8", "backslashreplace") or None


def _interpreters(path: str, cwd: str) -> list[str]:
    """The interpreters the ``#!`` lines from the file at ``path`` name, each that of
    the one before while it is a file (``cwd`` the child's): up to the first that is not
    there, at most :data:`_SHEBANG_DEPTH` (no ``#!`` line: none)."""
    chain: list[str] = []
    while len(chain) < _SHEBANG_DEPTH:
        interpreter = _interpreter(path)
        if interpreter is None:
            break
        chain.append(interpreter)
        path = os.path.join(cwd, interpreter)
        if not os.path.isfile(path):
            break
    return chain


def _execs_as_is(options: ProcessOptions, env: Mapping[str, str]) -> bool:
    """Whether the child's program is one the system execs as it is: a binary (ELF) for
    this machine, or a script whose ``#!`` line names an executable file that is one
    (found as ``subprocess`` finds it: the child's ``PATH``, its ``cwd``). Only then is it
    started through the limits wrapper (:func:`_lineage.wrapped`): for any other its start
    fails, and fails as before, with the system's error at the start (a wrapper's
    ``execvp`` would run a file the system cannot exec, ``Exec format error``, with
    ``/bin/sh``: a script without a ``#!`` line, an interpreter that is no program, an ELF
    of another machine or no ELF at all but its first four bytes). An exec that fails in
    the wrapper all the same is told by its line (:func:`_wrapper_exec_failure`). (At each
    start: a lookup and a read of at most 256 bytes a file of the ``#!`` chain.)"""
    program, cwd = options.cmd[0], options.cwd or ""
    if os.sep in program:
        candidates = [os.path.join(cwd, program)]
    else:
        candidates = [os.path.join(cwd, d, program) for d in os.get_exec_path(dict(env))]
    for path in candidates:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return _runs_as_is(path, cwd)
    return False


#: ``#!`` lines Linux follows from a program to the binary that runs it (its
#: ``BINPRM_MAX_RECURSION``: a script's interpreter may be a script, four deep)
_SHEBANG_DEPTH: Final = 4
#: the part of an ELF header that says whether this machine runs it: ``e_ident`` (class,
#: byte order), ``e_type``, ``e_machine``
_ELF_HEAD: Final = 20


def _runs_as_is(path: str, cwd: str, depth: int = 0) -> bool:
    """Whether the system execs the file at ``path`` (an executable file) as it is: an
    ELF program of this machine's kind (:func:`_this_machine`), or a script whose ``#!``
    line names an executable file that is one (relative to ``cwd``, as the system reads
    it), at most :data:`_SHEBANG_DEPTH` lines deep."""
    try:
        with open(path, "rb") as file:
            head = file.read(_ELF_HEAD)
    except OSError:
        return False
    if head[:4] == b"\x7fELF":
        kind, own = _elf_kind(head), _this_machine()
        return kind is not None and (own is None or kind == own)
    if not head.startswith(b"#!") or depth >= _SHEBANG_DEPTH:
        return False
    interpreter = _interpreter(path)
    if interpreter is None:
        return False
    found = os.path.join(cwd, interpreter)
    return (
        os.path.isfile(found) and os.access(found, os.X_OK) and _runs_as_is(found, cwd, depth + 1)
    )


def _elf_kind(head: bytes) -> tuple[int, int, int] | None:
    """``(class, byte order, machine)`` of an ELF header's start, or None: no program
    (``e_type`` neither ``ET_EXEC`` nor ``ET_DYN``) or too short, or an unknown byte order."""
    if len(head) < _ELF_HEAD or head[5] not in (1, 2):
        return None
    order: Literal["little", "big"] = "little" if head[5] == 1 else "big"
    if int.from_bytes(head[16:18], order) not in (2, 3):
        return None
    return head[4], head[5], int.from_bytes(head[18:20], order)


@functools.cache
def _this_machine() -> tuple[int, int, int] | None:
    """:func:`_elf_kind` of the running Python (``/proc/self/exe``), once a process: what
    this system surely runs (another kind, a 32-bit program on a 64-bit system, may run
    too: it is started directly, which fails or not as the system says)."""
    try:
        with open("/proc/self/exe", "rb") as file:
            return _elf_kind(file.read(_ELF_HEAD))
    except OSError:
        return None


#: error numbers by the system's text for them (``strerror``, as ``prlimit`` says them
#: in the C locale)
_ERRNO_BY_TEXT: Final = {os.strerror(number): number for number in sorted(errno.errorcode)}


def _wrapper_exec_failure(wrapper: str, program: str, line: bytes, code: int) -> OSError | None:
    """The error of the exec of ``program`` in the limits wrapper ``wrapper`` (util-linux's
    ``prlimit``, which says ``prlimit: failed to execute <program>: <the system's text>``
    on stderr and exits 127 for ``ENOENT``, else 126: util-linux's ``errexec``), read
    from ``line``, the stderr line of a child that exited with ``code``: as the start
    without the wrapper raises it, or None if ``line`` is not that line to the letter
    (another program named, an error text the system has not, a status that does not go
    with it, or words translated: a ``LANG`` whose ``prlimit`` messages are installed)."""
    head = f"{os.path.basename(wrapper)}: failed to execute ".encode()
    head += os.fsencode(program) + b": "
    if not line.startswith(head):
        return None
    number = _ERRNO_BY_TEXT.get(line[len(head) :].decode("utf-8", "replace"))
    if number is None or code != (127 if number == errno.ENOENT else 126):
        return None
    return OSError(number, os.strerror(number), program)


def _start_problem(options: ProcessOptions, env: Mapping[str, str], exc: OSError) -> str:
    """Why the child could not be started, in words that name what is wrong.

    The system's words mislead in three common cases: a script whose ``#!`` line names a
    missing interpreter (or ends in a CR) is ``No such file or directory`` about the script
    itself; a cwd removed after the spec was built is the same error about the directory;
    an environment too large is ``Argument list too long`` about the program. (On the
    failing path only: a read of at most 256 bytes of the program.)
    """
    command = shlex.join(options.cmd)
    cwd = options.cwd
    if cwd is not None and exc.filename == cwd:
        return (
            f"cannot start {command} in {cwd!r}: its cwd is no directory (any more):"
            f" [Errno {exc.errno}] {exc.strerror}"
        )
    said = f"cannot start {command}: {exc}"
    if exc.errno == errno.ENOENT:
        program = options.cmd[0]
        if os.sep in program:
            path: str | None = os.path.join(cwd or "", program)
        else:
            path = shutil.which(program, path=env.get("PATH", os.defpath))
        chain = _interpreters(path, cwd or "") if path is not None else []
        if chain:
            # (the interpreter of an interpreter that is a script: the one not found)
            deeper = "".join(f" names {name!r} in its own, which" for name in chain[1:])
            return (
                f"{said} (it exists: its interpreter {chain[0]!r}, named by its #! line,"
                f"{deeper} was not found)"
            )
    elif exc.errno == errno.ENOEXEC:
        return (
            f"{said} (a script needs a #! line naming its interpreter; a binary must be"
            " built for this system)"
        )
    elif exc.errno == errno.E2BIG:
        strings = [
            *(len(os.fsencode(part)) + 1 for part in options.cmd),
            *(len(os.fsencode(f"{key}={value}")) + 1 for key, value in env.items()),
        ]
        return (
            f"{said} (its arguments and environment are {sum(strings):,} bytes, its largest"
            f" string is {max(strings):,} bytes: more than the system takes; Linux takes at"
            " most 128 KiB a string)"
        )
    return said


def _check_positive(name: str, value: Any, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ValueError(f"process_agent: {name} must be a number of seconds, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero) or math.isinf(value):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"process_agent: {name} must be finite and {bound}, got {value!r}")
    return float(value)


#: a variable assignment before a command, as a shell reads ``NAME=value cmd``
_ASSIGNMENT: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")


def shell_syntax_problem(cmd: str, parts: Sequence[str]) -> str | None:
    """What is wrong with the command string ``cmd`` (split as ``parts``) for a program
    started without a shell, or None: it is split as a shell would, but a shell operator
    outside quotes (``| cat``, ``2> err.log``, ``&& ...``) would reach the program as an
    argument, which most programs ignore, an expansion (``$HOME``, ``${X}``, ``$(cmd)``,
    backticks, a glob such as ``*.py``, ``~/x``) or a comment (``# ...``) would reach it
    unexpanded, as text, and ``NAME=x cmd`` would be looked for as a program named
    ``NAME=x``. (Also for ``nexus run --spawn`` and ``nexus send``.)"""
    # (the hints write the command to give, quoted as a shell reads it: until the
    # fifty-seventh pass they said 'sh -c "..."' and 'env NAME=a b ...', which a command
    # holding a " or an assignment with a blank broke: 'env X=a b' runs the program b)
    found = _shell_construct(cmd)
    in_shell = f"sh -c {_shell_quote(cmd)}"
    if found is not None and found[0] == "operator":
        return (
            f"command {cmd!r} holds the shell operator {found[1]!r}, but no shell runs it"
            " (the operator would reach the program as an argument): leave it out (the"
            " agent's stderr goes to the kernel's log), or give the command to a shell:"
            f" {in_shell}"
        )
    if found is not None:
        what, text = found
        done = "drop" if what == "comment" else "expand"
        meant = "leave it out" if what == "comment" else "write out what it stands for"
        if what == "tilde expansion":
            meant += f" ({os.path.expanduser(text)!r})"
        return (
            f"command {cmd!r} holds the {what} {text!r}, which a shell would {done}, but"
            f" no shell runs it (the program would get {text!r} as it is): {meant},"
            f" quote it ('...') to pass it as it is, or give the command to a shell: {in_shell}"
        )
    if parts and _ASSIGNMENT.match(parts[0]):
        return (
            f"command {cmd!r} starts with the variable assignment {parts[0]!r}, but no"
            f" shell runs it: put env before it ({' '.join(map(_shell_quote, ['env', *parts]))}), or set it"
            " in the environment (process_agent's env=; for nexus run and nexus send,"
            " nexus's own)"
        )
    return None


#: how a character a terminal would act on is written in ``$'...'`` (else ``\xHH``,
#: ``\uHHHH``, ``\UHHHHHHHH``)
_CONTROL_ESCAPES: Final = {"\a": "\\a", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _shell_quote(text: str) -> str:
    """``text`` quoted as a shell reads it back (:func:`shlex.quote`), its characters that
    are not printable (an escape sequence, a newline, a tab) written as escapes in
    ``$'...'`` (bash, zsh, ksh, POSIX.1-2024 sh; GNU ls's ``shell-escape`` quoting), not
    raw: a hint printed to a terminal does not act on it. Until the fifty-eighth pass a
    command holding ``ESC[2J`` wrote it verbatim in its ``sh -c '...'`` hint."""
    pieces = []
    for printable, run in itertools.groupby(text, str.isprintable):
        chars = "".join(run)
        if printable:
            pieces.append(shlex.quote(chars))
        else:
            pieces.append("$'" + "".join(map(_control_escape, chars)) + "'")
    return "".join(pieces) or "''"


def _control_escape(char: str) -> str:
    if char in _CONTROL_ESCAPES:
        return _CONTROL_ESCAPES[char]
    code = ord(char)
    if code < 0x80:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


#: the characters of a shell's control and redirection operators
_OPERATOR_CHARS: Final = frozenset("|&;<>()")

#: what follows a ``$`` that a shell expands: a name, ``{``, ``(``, a digit or a special
#: parameter (``$@``, ``$?``, ...)
_DOLLAR: Final = re.compile(
    r"\$(?:\{[^}]*\}?|\(\(?[^)]*\)?\)?|[A-Za-z_][A-Za-z0-9_]*|[0-9@*#?$!-])"
)


def _shell_construct(cmd: str) -> tuple[str, str] | None:
    """The first construct in ``cmd`` that a POSIX shell would act on but a program
    started without one takes as text, as ``(what, text)``: ``("operator", run)`` for a
    run of operator characters, else an expansion or a comment (``"variable expansion"``,
    ``"command substitution"``, ``"glob"``, ``"tilde expansion"``, ``"comment"``); or None. Read as
    the shell reads it: quotes and backslashes count inside a word too (``--opt='x>y'``,
    ``a\\|b``, ``'$HOME'``, ``\\*`` are text), which a split into whole tokens does not
    see; in double quotes only ``$`` and backticks expand."""
    quote = ""  # the quote open at this point, or ""
    escaped = False
    word_start = True  # (no quote open, not escaped)
    run: list[str] = []
    for i, char in enumerate(cmd):
        if run and char not in _OPERATOR_CHARS:
            return "operator", "".join(run)
        at_word_start, word_start = word_start, False
        if escaped:
            escaped = False
        elif quote == "'":
            if char == "'":
                quote = ""
        elif char == "\\":
            escaped = True  # (in double quotes too: the next character is text either way)
        elif char == "`":
            end = cmd.find("`", i + 1)
            return "command substitution", cmd[i : end + 1 if end >= 0 else len(cmd)]
        elif char == "$" and (dollar := _DOLLAR.match(cmd, i)) is not None:
            text = dollar.group()
            kind = "command substitution" if text.startswith("$(") else "variable expansion"
            return kind, text
        elif quote:
            if char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
        elif char in _OPERATOR_CHARS:
            run.append(char)
        elif char.isspace():
            word_start = True
        elif char in "*?" or (char == "[" and "]" in _word_at(cmd, i)):
            return "glob", _word_at(cmd, i)
        elif at_word_start and char in "~#":
            what = "tilde expansion" if char == "~" else "comment"
            return what, _word_at(cmd, i) if char == "~" else cmd[i:]
    return ("operator", "".join(run)) if run else None


def _word_at(cmd: str, index: int) -> str:
    """The unquoted word of ``cmd`` around ``index`` (up to whitespace), for a message."""
    start = index
    while start > 0 and not cmd[start - 1].isspace():
        start -= 1
    end = index
    while end < len(cmd) and not cmd[end].isspace():
        end += 1
    return cmd[start:end]


def unsplit_comment_problem(cmd: str) -> str | None:
    """For a command :func:`shlex.split` refuses, what :func:`shell_syntax_problem` says
    of it if a shell would split it: a quote in a comment (``python3 a.py # it's``),
    which a shell drops, said as the comment; until the review of the fifty-seventh pass
    ``No closing quotation``. None if a shell would refuse it too."""
    try:
        parts = shlex.split(cmd, comments=True)
    except ValueError:
        return None
    return shell_syntax_problem(cmd, parts)


def _command(
    cmd: Sequence[str] | str, env: Mapping[str, str] | None, cwd: str | None
) -> tuple[str, ...]:
    if isinstance(cmd, str):
        try:
            parts = shlex.split(cmd)
        except ValueError as exc:
            why = (
                unsplit_comment_problem(cmd)
                or f"command {cmd!r} cannot be split as a shell would: {exc}"
            )
            raise ValueError(f"process_agent: {why}") from None
        problem = shell_syntax_problem(cmd, parts)
        if problem is not None:
            raise ValueError(f"process_agent: {problem}")
    elif isinstance(cmd, bytes | bytearray):  # (a Sequence too: of ints)
        raise TypeError(
            "process_agent: cmd must be a list of strings or a string, got"
            f" {type(cmd).__name__} {cmd!r} (decode it)"
        )
    elif isinstance(cmd, Sequence):
        parts = [os.fspath(part) if isinstance(part, os.PathLike) else part for part in cmd]
    else:
        raise TypeError(f"process_agent: cmd must be a list of strings or a string, got {cmd!r}")
    for i, part in enumerate(parts):
        if not isinstance(part, str):
            raise TypeError(
                f"process_agent: command items must be strings, got {part!r} (item {i})"
            )
    if not parts or not parts[0]:
        raise ValueError(f"process_agent: empty command {cmd!r}")
    program = parts[0]
    if os.sep in program:
        path = program if os.path.isabs(program) else os.path.join(cwd or os.getcwd(), program)
        if not os.path.isfile(path) or not os.access(path, os.X_OK):
            raise ValueError(f"process_agent: command {program!r} is not an executable file")
    else:
        search = (env if env is not None else os.environ).get("PATH", os.defpath)
        if shutil.which(program, path=search) is None:
            raise ValueError(f"process_agent: command {program!r} not found on PATH")
    return tuple(parts)


def process_agent(
    cmd: Sequence[str] | str,
    *,
    name: str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    restart: RestartType | str = RestartType.PERMANENT,
    register_timeout: float = 10.0,
    line_limit: int = _LINE_LIMIT,
    shutdown_grace: float = 5.0,
    handle_timeout: float | None = None,
    mailbox_capacity: int | None = None,
    ping_interval: float | None = None,
    ping_timeout: float = 5.0,
    cancel_grace: float = 1.0,
    first_start_stops: bool = False,
    raise_nofile: bool = True,
) -> AgentSpec:
    """An agent spec that runs ``cmd`` as a child process speaking the NDJSON bridge protocol.

    ``cmd`` is an argument list (a string is split with :func:`shlex.split`); its program
    must exist when the spec is built. ``env`` replaces the environment of the child
    (default: the kernel's); the child also gets ``NEXUS_AGENT_ID``,
    ``NEXUS_AGENT_NAME`` and ``NEXUS_KERNEL_PROTOCOL`` (the highest protocol version the
    kernel speaks). The child must write its ``register`` line within
    ``register_timeout`` seconds (lines that are no frame before it are skipped, up to
    100,000 lines or 16 MiB); stdout lines longer than ``line_limit`` bytes are
    discarded. Stopping sends ``shutdown`` and waits ``shutdown_grace`` seconds before
    SIGTERM, and as long again before SIGKILL. With ``ping_interval``, a child that
    announced protocol 2 is pinged whenever it has been idle that long and must answer
    within ``ping_timeout`` seconds, else the agent fails (and is restarted). A child
    that declared the ``cancel`` feature, told that a message was given up on, has
    ``cancel_grace`` seconds to answer it before the next message replaces it (at most
    half that message's handle timeout; 0: at once, as a child without the feature).
    ``restart``, ``handle_timeout`` and ``mailbox_capacity`` are those of
    :func:`nexus_trio.agent`. With ``first_start_stops``, a first start that fails (the
    child exits, or does not register, before it ever registered) stops the agent for
    good instead of restarting it, as an OTP supervisor's start fails with a child whose
    ``init`` fails: its ``failed`` event, then ``stopped`` with reason ``start_failed``;
    the child's exit status stays that of the failure. Later runs restart per ``restart``.
    On Linux the first start of a process agent raises the kernel process's soft
    ``RLIMIT_NOFILE`` to its hard limit, once (each live one holds five descriptors), and
    each child gets the original back; ``raise_nofile=False`` keeps this agent's starts
    from raising it (your own ``subprocess`` children then inherit the limit unraised;
    a raise by another agent stands).

    Without ``name`` the agent has none: none is derived from ``cmd`` (as ``nexus run
    --spawn`` does), since a spec spawned twice (in a loop) would then fail its second
    spawn with ``NameTaken``, and the child would be told a name over its own.
    """
    cwd_text = os.fspath(cwd) if isinstance(cwd, str | os.PathLike) else cwd
    if cwd_text is not None and not isinstance(cwd_text, str):
        raise TypeError(
            f"process_agent: cwd must be a directory's path (a str or a pathlib.Path), got {cwd!r}"
        )
    if cwd_text is not None and not os.path.isdir(cwd_text):
        raise ValueError(f"process_agent: cwd {cwd_text!r} is not a directory")
    if env is not None:
        if not isinstance(env, Mapping):
            raise TypeError(
                f"process_agent: env must be a mapping of strings to strings, got {env!r}"
            )
        for key, value in env.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise TypeError(
                    f"process_agent: env must map strings to strings, got {key!r}: {value!r}"
                )
            # What the system cannot carry in an environment: refused here, naming the
            # variable, not at each start of the child.
            if "\0" in key:
                raise ValueError(f"process_agent: env variable name {key!r} holds a NUL character")
            if "=" in key:
                raise ValueError(
                    f"process_agent: env variable name {key!r} holds '=' (an environment"
                    " entry is NAME=VALUE)"
                )
            if not key:
                # (subprocess passes it on as the entry "=VALUE", which names nothing;
                # os.putenv and glibc's setenv refuse an empty name)
                raise ValueError(
                    "process_agent: env variable name '' is empty (an environment entry is"
                    " NAME=VALUE)"
                )
            if "\0" in value:
                raise ValueError(f"process_agent: env variable {key!r} holds a NUL character")
    command = _command(cmd, env, cwd_text)
    register = _check_positive("register_timeout", register_timeout)
    grace = _check_positive("shutdown_grace", shutdown_grace, allow_zero=True)
    if isinstance(line_limit, bool) or not isinstance(line_limit, int) or line_limit < 64:
        raise ValueError(
            f"process_agent: line_limit must be an integer >= 64 bytes, got {line_limit!r}"
        )
    interval = None if ping_interval is None else _check_positive("ping_interval", ping_interval)
    pong_wait = _check_positive("ping_timeout", ping_timeout)
    answer_grace = _check_positive("cancel_grace", cancel_grace, allow_zero=True)
    if not isinstance(first_start_stops, bool):
        raise TypeError(
            f"process_agent: first_start_stops must be True or False, got {first_start_stops!r}"
        )
    if not isinstance(raise_nofile, bool):
        raise TypeError(f"process_agent: raise_nofile must be True or False, got {raise_nofile!r}")
    options = ProcessOptions(
        cmd=command,
        env=dict(env) if env is not None else None,
        cwd=cwd_text,
        register_timeout=register,
        line_limit=line_limit,
        shutdown_grace=grace,
        ping_interval=interval,
        ping_timeout=pong_wait,
        cancel_grace=answer_grace,
        first_start_stops=first_start_stops,
        raise_nofile=raise_nofile,
    )
    return AgentSpec(
        factory=functools.partial(ProcessAgent, options),
        name=name,
        mailbox_capacity=mailbox_capacity,
        handle_timeout=handle_timeout,
        restart=restart,
        # shutdown frame + grace, SIGTERM + grace, then the kill and reap (never skipped).
        shutdown_timeout=2 * grace + _READER_DRAIN + _GROUP_TERM_WAIT + 1.0,
    )
