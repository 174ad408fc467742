"""Inbound streams: what a node keeps per sending process, bounded however peers behave.

Each join of another kernel that sends tells here (its node name, its session, its id
prefix) is one *inbound stream*: the next number expected of it (``_sequence``) and how
many of its tells this node consumed (the credit returned to it, ``_batch``). Those names
come from the peers, so :class:`InboundStreams` bounds them: at most ``limit`` streams
are kept. A stream whose sender is gone is *retired* — its node left or was lost,
another process took its node name, or the same process joined again (a newer session,
at once) — which takes it out of the heartbeat record and puts it first in line when
room is needed; its numbers are kept until then, so a late tell of it (the tail of a
clean leave travels on another connection than the leave notice) is still numbered and
credited exactly and makes it live again. Past the limit the oldest retired stream goes
without a word; with none retired, the least recently active live stream is *evicted*,
counted and logged. A tell on a stream no longer kept starts it afresh, as a stream never
seen does: the numbers before its batch's first are counted lost (this node cannot tell
which of them it took before), so an eviction may over-count ``lost_in_transit`` but never
hides a loss, and the credit those numbers return lets the sender's window open again.

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Final, final

from .._logcall import log_guarded
from .._throttle import Throttle
from ._held import HeldLines
from ._sequence import InboundSequences

log = logging.getLogger("nexus_trio.nats")

#: ``(node, id prefix)``: one sending process
Sender = tuple[str, int]


#: the low bits of a session: the count of its process's joins (see :func:`new_session`)
_JOIN_BITS: Final = 24
_JOIN_MASK: Final = (1 << _JOIN_BITS) - 1
#: this process's sessions so far: the random high bits, and the last join's count
_sessions = [int.from_bytes(os.urandom(5), "big") << _JOIN_BITS, 0]


def new_session() -> int:
    """A session for a new join of this process: 40 random bits, the same for every join
    of the process, then the count of its joins (1, 2, ...). So the sessions of one
    sending process (one id prefix) are in the order of its joins (:func:`earlier_session`),
    which a random session did not say; another process's, or a kernel's of an earlier
    version (random), are not comparable with them (their high bits differ but once in
    2**40). Past 2**24 - 1 joins the process takes new random bits."""
    base, joins = _sessions
    if joins == _JOIN_MASK:
        base, joins = int.from_bytes(os.urandom(5), "big") << _JOIN_BITS, 0
    _sessions[:] = base, joins + 1
    return base | (joins + 1)


def earlier_session(session: int, than: int) -> bool:
    """Whether ``session`` is of an earlier join of the process whose join ``than`` is
    (both made by :func:`new_session` in that process); False when they cannot be
    compared (another process's, a random one)."""
    return session >> _JOIN_BITS == than >> _JOIN_BITS and session < than


def parse_stream_name(name: str) -> tuple[str, int, int] | None:
    """``(node, session, id prefix)`` of a stream named ``<node>:<session>.<id prefix>``
    (hex numbers), or None if it is not named so."""
    rest, _, prefix = name.rpartition(".")
    node, _, session = rest.rpartition(":")
    try:
        return (node, int(session, 16), int(prefix, 16)) if node else None
    except ValueError:
        return None


@final
class InboundStream:
    """One sending join: who it is, and what this node owes it."""

    __slots__ = ("consumed", "last_active", "node", "prefix", "session")

    def __init__(self, node: str, session: int, prefix: int, now: float) -> None:
        self.node = node
        self.session = session
        self.prefix = prefix
        #: tells of it consumed here (delivered, refused or counted lost): its credit
        self.consumed = 0
        self.last_active = now


@final
class InboundStreams:
    """The inbound streams of this process, at most ``limit`` of them (see the module doc).

    ``on_forget(node, prefix)`` is called when the last stream of a sending process
    goes, so that what the node keeps for answering it (a link carrying only credit)
    can go too.
    """

    def __init__(
        self,
        sequences: InboundSequences,
        limit: int,
        *,
        node: str,
        on_forget: Callable[[str, int], None],
        clock: Callable[[], float] = time.monotonic,
        held: HeldLines | None = None,
    ) -> None:
        if limit < 1:
            raise ValueError(f"inbound_streams_limit must be at least 1, not {limit}")
        self.sequences = sequences
        self.limit = limit
        self.node = node
        self._on_forget = on_forget
        self._clock = clock
        # least recently active first
        self._live: OrderedDict[str, InboundStream] = OrderedDict()
        # retired longest ago first
        self._retired: OrderedDict[str, InboundStream] = OrderedDict()
        # the kept streams of each sending process, its newest session last
        self._senders: dict[Sender, dict[str, None]] = {}
        #: live streams evicted to make room (a retired stream going is not counted)
        self.evicted = 0
        self._eviction_log = Throttle(clock=clock, kind="cluster.stream_eviction")
        # the node's: the evictions after the last line are said at its leave
        self._held = HeldLines() if held is None else held

    @property
    def live(self) -> int:
        """Streams kept as current senders (in the heartbeat record if members)."""
        return len(self._live)

    @property
    def retired(self) -> int:
        """Streams kept only for late tells, first to go when room is needed."""
        return len(self._retired)

    def __len__(self) -> int:
        return len(self._live) + len(self._retired)

    def __contains__(self, name: str) -> bool:
        return name in self._live or name in self._retired

    def touch(self, name: str) -> bool:
        """A batch or mark of stream ``name`` arrived for this process: keep it (making
        room if it is new), live and most recently active, and True. A new session of a
        sending process retires its older ones. False, and nothing kept or retired, for
        a stream not kept here of an earlier join of a process of which a later join's
        stream is kept (:func:`earlier_session`): a late tell of a join that is over,
        whose stream this node forgot, must not retire its process's current stream."""
        now = self._clock()
        stream = self._live.get(name)
        if stream is not None:
            self._live.move_to_end(name)
            stream.last_active = now
            return True
        stream = self._retired.pop(name, None)
        if stream is not None:  # a late tell: live again, its numbers intact
            stream.last_active = now
            self._live[name] = stream
            return True
        parts = parse_stream_name(name)
        # a name not so formed (an older kernel) is kept too, as a sender of its own
        node, session, prefix = parts if parts is not None else (name, 0, -1)
        sender = (node, prefix)
        kept = self._senders.get(sender)
        if kept and parts is not None:
            for other in kept:
                known = self._live.get(other) or self._retired[other]
                if earlier_session(session, known.session):
                    return False
        while len(self) >= self.limit:
            self._make_room(name)
        older = self._senders.setdefault(sender, {})
        for old in older:
            self._retire(old)  # that process joined again: the old join is over
        older[name] = None
        self._live[name] = InboundStream(node, session, prefix, now)
        return True

    def consumed(self, name: str, count: int) -> InboundStream | None:
        """Add ``count`` to what this node consumed of stream ``name``; the stream (its
        ``consumed`` is the credit owed to it), or None if it is not kept (evicted or
        forgotten: the credit goes with the stream's next batch, if any)."""
        stream = self._live.get(name) or self._retired.get(name)
        if stream is not None:
            stream.consumed += count
        return stream

    def retire_gone(self, is_current: Callable[[str, int], bool], quiet_for: float) -> int:
        """Retire every live stream quiet for ``quiet_for`` seconds whose sending process
        is not current (``is_current(node, prefix)``: a reachable member) or that a newer
        session of its process replaced; how many were retired."""
        horizon = self._clock() - quiet_for
        gone = [
            name
            for name, s in self._live.items()
            if s.last_active <= horizon
            and (
                not is_current(s.node, s.prefix)
                or next(reversed(self._senders[(s.node, s.prefix)])) != name
            )
        ]
        for name in gone:
            self._retire(name)
        return len(gone)

    def taken_from(self, node: str, prefix: int) -> int:
        """The tells of process ``prefix`` of ``node`` this process took (received or
        counted lost), over the streams of it still kept (every join's)."""
        last = self.sequences.last_number
        return sum(last(name) for name in self._senders.get((node, prefix), ()))

    def heartbeat_numbers(self, is_member: Callable[[str, int], bool]) -> dict[str, int]:
        """The last number taken of each live stream of a member (``is_member(node,
        prefix)``): what this node's heartbeat confirms to its senders."""
        last = self.sequences.last_number
        return {name: last(name) for name, s in self._live.items() if is_member(s.node, s.prefix)}

    def _retire(self, name: str) -> None:
        stream = self._live.pop(name, None)
        if stream is not None:
            self._retired[name] = stream

    def _make_room(self, incoming: str) -> None:
        if self._retired:
            name, stream = self._retired.popitem(last=False)
        else:
            name, stream = self._live.popitem(last=False)
            self.evicted += 1
            if self._held.due(
                self._eviction_log, "inbound streams evicted", counted="streams_evicted"
            ):
                log_guarded(
                    log,
                    logging.WARNING,
                    "node %s: %d inbound streams kept (inbound_streams_limit): stream %s,"
                    " the least recently active, evicted for %s (%d evicted so far; a tell"
                    " on it later starts it afresh, its earlier numbers counted lost)",
                    self.node,
                    self.limit,
                    name,
                    incoming,
                    self.evicted,
                )
        self.sequences.forget(name)
        sender = (stream.node, stream.prefix)
        names = self._senders[sender]
        del names[name]
        if not names:
            del self._senders[sender]
            self._on_forget(*sender)
