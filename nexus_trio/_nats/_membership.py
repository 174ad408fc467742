"""Membership: which kernels are in the cluster, and which of them stopped answering.

Every kernel publishes a record (its heartbeat) on the core subject
``<prefix>.hb.<node>`` and puts it under its node name into the KV bucket
``<prefix>-nodes`` every ``heartbeat_interval`` seconds. Liveness is judged on the core
subject, which fails over with the client connection in milliseconds (JetStream, behind
KV, may need seconds to elect new leaders after a server is lost); the bucket, with a
TTL of ``missed_heartbeats`` intervals, lets a node that joins later find the others.
Each kernel stamps every record it sees with its *own* monotonic clock (no cross-host
clock skew); a node not seen for ``missed_heartbeats`` intervals is *unreachable*: it is
logged, a :class:`LifecycleEvent` of kind ``UNREACHABLE`` is published on
``kernel.events()``, requests waiting on it fail with ``TransportUnavailable``, and
sends to its agents fail the same way until it is heard from again. A node that leaves
cleanly deletes its record and is simply gone.

The record also carries the node's *id prefix*: nexus_trio mints agent ids as a random
per-process 64-bit prefix plus a counter, so the high 64 bits of any agent id name the
process that spawned it. Routing a message by id is one dict lookup here — no
per-agent registration anywhere.

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Iterable
from typing import Any, Final, final

import attrs

from .._brief import brief
from .._errors import MessageDecodeError
from .._logcall import log_guarded
from ._wire import is_type_name, read_wire_json

log = logging.getLogger("nexus_trio.nats.membership")


#: the most node names :attr:`Membership.ever_heard` keeps (then it says it cannot tell)
_EVER_HEARD_MAX: Final = 4096
#: the most agent types one node registers and its record advertises (a record past it,
#: or naming a type longer than ``_wire.TYPE_NAME_MAX``, is not what a kernel writes:
#: refused)
TYPES_MAX: Final = 1024


def process_id_prefix() -> int:
    """The high 64 bits shared by every agent id minted in this process."""
    from .._message import new_id

    return new_id().int >> 64


def node_uuid(id_prefix: int) -> uuid.UUID:
    """The UUID that stands for a whole node in lifecycle events: its id space's first id."""
    return uuid.UUID(int=id_prefix << 64)


def compare_joins(
    order: tuple[int, int] | None,
    joined: float,
    other_order: tuple[int, int] | None,
    other_joined: float,
) -> int:
    """Negative if the join of ``(order, joined)`` came before the other's, 0 at the same
    time, positive after: by the join orders when both are known (the bucket orders every
    write, and a later bucket is a later one: no host's clock decides), else by the wall
    clocks' ``joined`` (a record of a kernel of an earlier version). The one rule of
    :meth:`NodeInfo.compare_join` and of a node comparing its own join with a record's."""
    if order is not None and other_order is not None:
        return (order > other_order) - (order < other_order)
    return (joined > other_joined) - (joined < other_joined)


@final
@attrs.frozen
class NodeInfo:
    """What the cluster knows about one kernel."""

    node: str
    id_prefix: int
    pid: int
    host: str
    #: seconds since the epoch when the node joined (its own clock)
    joined: float
    #: kernel counters the node reported in its last heartbeat (accepted, handled, ...)
    stats: dict[str, Any]
    #: this kernel's monotonic clock when the last heartbeat was seen
    last_seen: float
    reachable: bool = True
    #: the session of the node's join (random per join, see ``_batch``): whose credit
    #: counts (None in the record of a kernel of an earlier version)
    session: int | None = None
    #: its ``node_window`` (the most tells it sends ahead of its credit; None in the
    #: record of a kernel of an earlier version): how far a gap in its numbers is believed
    window: int | None = None
    #: the agent types it registered, which it can run when placed (None in the record
    #: of a kernel of an earlier version, which does not say: taken as able to run any)
    types: frozenset[str] | None = None
    #: whether it runs the durable path (``DurableOptions.enabled``: pulls its own
    #: durable consumer, takes lost nodes' over); None in the record of a kernel of an
    #: earlier version, which does not say: taken as running it
    durable: bool | None = None
    #: the node-batch versions it reads ("NXB2", "NXB3", see ``_batch``); None in the
    #: record of a kernel of an earlier version, which reads NXB2 only
    batches: frozenset[str] | None = None
    #: where its join stands in the order of joins, as the NATS server decided it: the
    #: nodes bucket's birth (microseconds since the epoch, the server's clock, see
    #: :func:`bucket_birth`) and the revision at which the join's first record landed
    #: there (the first record says it too: written expecting the bucket's last
    #: revision, see ``Cluster._claim_in_order``). None in the first record of a join
    #: whose bucket others kept writing into (the write then expects the name's revision
    #: only), of a join of a kernel before the forty-ninth pass, in the record of a
    #: kernel of an earlier version, and where the server gave no birth: then ``joined``
    #: (the host's clock) orders it (see :meth:`compare_join`)
    join_order: tuple[int, int] | None = None

    def compare_join(self, other: NodeInfo) -> int:
        """Negative if this process joined before ``other``, 0 at the same time, positive
        after: by :attr:`join_order` when both records carry one (the bucket orders every
        write, and a later bucket is a later one: no host's clock decides), else by
        ``joined``, each host's wall clock (a record of a kernel of an earlier version)."""
        return compare_joins(self.join_order, self.joined, other.join_order, other.joined)

    def reads_batches(self, version: str) -> bool:
        """Whether a node batch of ``version`` may be written to the node: its record
        lists it (NXB2 for a record that lists none: a kernel of an earlier version)."""
        if self.batches is None:
            return version == "NXB2"
        return version in self.batches

    @property
    def runs_durable(self) -> bool:
        """Whether the node pulls durable messages (stored for it, or taken over from a
        lost node): its record says so, or says nothing (a kernel of an earlier version)."""
        return self.durable is not False

    def runs(self, type_name: str) -> bool:
        """Whether placement may put an agent of ``type_name`` on the node: its record
        names the type, or says nothing of its types (a kernel of an earlier version)."""
        return self.types is None or type_name in self.types

    def count(self, key: str) -> int:
        """The count its record's ``stats`` hold under ``key`` (``in_flight``, ``held``):
        0 if it is no whole number of at least zero. A record is the sender's word, and
        anyone on the account can write one: a survivor adds these counts on the node's
        loss, so a text, a fraction or a negative number must count nothing."""
        return _count(self.stats.get(key))

    def confirmed(self, stream: str) -> int:
        """The last number of ``stream`` that its record says the node took (its
        ``recv``): 0 if none, or no whole number of at least zero (see :meth:`count`)."""
        received = self.stats.get("recv")
        return _count(received.get(stream)) if isinstance(received, dict) else 0


def encode_record(
    node: str,
    id_prefix: int,
    joined: float,
    stats: dict[str, Any],
    session: int | None = None,
    window: int | None = None,
    types: Iterable[str] | None = None,
    durable: bool | None = None,
    batches: Iterable[str] | None = None,
    join_order: tuple[int, int] | None = None,
) -> bytes:
    record: dict[str, Any] = {
        "node": node,
        "id_prefix": f"{id_prefix:016x}",
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "joined": joined,
        "stats": stats,
    }
    if session is not None:
        record["session"] = f"{session:016x}"
    if window is not None:
        record["window"] = window
    if types is not None:
        record["types"] = sorted(types)
    if durable is not None:
        record["durable"] = durable
    if batches is not None:
        record["batches"] = list(batches)
    if join_order is not None:
        record["join_order"] = list(join_order)
    return json.dumps(
        record,
        separators=(",", ":"),
    ).encode()


def decode_record(data: bytes, seen_at: float, node: str | None = None) -> NodeInfo:
    """The :class:`NodeInfo` of a record; ValueError naming what is wrong with one that no
    kernel writes. Anyone who may write the nodes bucket or publish on the heartbeat
    subjects can send one, so nothing in it may raise anything else (a record nested too
    deeply, a pid of ``Infinity``) or carry a number a kernel cannot use. ``node``: the
    node its heartbeat subject or bucket key names, which the record must name too (NATS
    permissions can restrict a subject or a key to one node, not what a record says)."""
    try:
        obj = read_wire_json(data, "membership record")
    except RecursionError:
        raise ValueError("membership record: nested too deeply") from None
    except MessageDecodeError as exc:
        raise ValueError(f"membership record: {exc.problem}") from None
    except ValueError as exc:
        raise ValueError(f"membership record: not JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"membership record: a JSON {type(obj).__name__}, not an object")

    def field(name: str, convert: Any) -> Any:
        try:
            return convert(obj[name])
        except KeyError:
            raise ValueError(f"membership record: no {name!r}") from None
        except (ValueError, TypeError, OverflowError) as exc:
            raise ValueError(
                f"membership record: bad {name!r}: {brief(obj[name], 60)} ({exc})"
            ) from None

    joined = field("joined", float)
    if not math.isfinite(joined):
        raise ValueError(f"membership record: bad 'joined': {joined} (not a finite time)")
    stats = obj.get("stats") or {}
    if not isinstance(stats, dict):
        raise ValueError(f"membership record: bad 'stats': a JSON {type(stats).__name__}")
    name = field("node", str)
    if node is not None and name != node:
        raise ValueError(f"membership record: names node {brief(name, 60)}, sent as {node!r}")
    return NodeInfo(
        node=name,
        id_prefix=field("id_prefix", hex64),
        pid=field("pid", int),
        host=field("host", str),
        joined=joined,
        stats=stats,
        last_seen=seen_at,
        session=field("session", hex64) if "session" in obj else None,
        window=field("window", _window) if "window" in obj else None,
        types=field("types", _types) if "types" in obj else None,
        durable=field("durable", _flag) if "durable" in obj else None,
        batches=field("batches", _batches) if "batches" in obj else None,
        join_order=field("join_order", _join_order) if "join_order" in obj else None,
    )


def _join_order(value: Any) -> tuple[int, int]:
    """A record's ``join_order``: a list of two whole numbers, a bucket's birth of at
    least 0 and a revision of at least 1, each below 2**63; ValueError if not."""
    if type(value) is not list or len(value) != 2:
        raise ValueError("not a list of a bucket's birth and a revision")
    born, revision = value
    if type(born) is not int or not 0 <= born < 1 << 63:
        raise ValueError("the bucket's birth is no whole number of at least 0")
    if type(revision) is not int or not 1 <= revision < 1 << 63:
        raise ValueError("the revision is no whole number of at least 1")
    return born, revision


_EPOCH: Final = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


def bucket_birth(created: object) -> int | None:
    """A bucket's birth as a record's :attr:`NodeInfo.join_order` carries it: the
    ``created`` of its stream's info (the server's time) in microseconds since the
    epoch; None if the server gave none (or no aware time), or one before the epoch."""
    if not isinstance(created, datetime.datetime) or created.tzinfo is None:
        return None
    born = (created - _EPOCH) // datetime.timedelta(microseconds=1)
    return born if 0 <= born < 1 << 63 else None


def _flag(value: Any) -> bool:
    """A record's ``durable``: JSON true or false; ValueError if not (a 1, a "yes")."""
    if type(value) is not bool:
        raise ValueError("not true or false")
    return value


#: the most batch versions a record may list, and the longest name of one
BATCHES_MAX: Final = 16
_BATCH_NAME_MAX: Final = 16


def _batches(value: Any) -> frozenset[str]:
    """A record's ``batches``: a list of at most :data:`BATCHES_MAX` version names
    (strings of 1 to 16 characters; one this kernel does not know is kept, never
    written to); ValueError if not."""
    if type(value) is not list:
        raise ValueError("not a list of batch versions")
    if len(value) > BATCHES_MAX:
        raise ValueError(f"{len(value)} versions, more than {BATCHES_MAX}")
    for name in value:
        if type(name) is not str or not 1 <= len(name) <= _BATCH_NAME_MAX:
            raise ValueError(f"{brief(name, 60)} is no batch version")
    return frozenset(value)


def _window(value: Any) -> int:
    """A record's ``window``: a whole number of tells, at least 1; ValueError if not."""
    if type(value) is not int or value < 1:
        raise ValueError("not a whole number of at least 1")
    return value


def _types(value: Any) -> frozenset[str]:
    """A record's ``types``: a list of at most :data:`TYPES_MAX` agent type names (NATS
    tokens of at most ``_wire.TYPE_NAME_MAX`` characters); ValueError if not."""
    if type(value) is not list:
        raise ValueError("not a list of agent type names")
    if len(value) > TYPES_MAX:
        raise ValueError(f"{len(value)} names, more than {TYPES_MAX}")
    for name in value:
        if type(name) is not str or not is_type_name(name):
            raise ValueError(f"{brief(name, 60)} is no agent type name")
    return frozenset(value)


def _count(value: Any) -> int:
    return value if type(value) is int and value > 0 else 0


def hex64(value: str) -> int:
    """A 64-bit number written in hex (an id prefix, a session); ValueError if it is not
    one (an id prefix past 64 bits has no id space, see :func:`node_uuid`)."""
    number = int(value, 16)
    if not 0 <= number < 1 << 64:
        raise ValueError("not a 64-bit number")
    return number


@final
class MemberTable:
    """The members as last seen, indexed by node name and by id prefix.

    Pure bookkeeping (no I/O), fed by the KV watcher and the loss checker, so its
    rules can be tested without a server.
    """

    def __init__(self, self_node: str, lost_after: float) -> None:
        self.self_node = self_node
        self.lost_after = lost_after
        self.members: dict[str, NodeInfo] = {}
        self.by_prefix: dict[int, str] = {}
        #: (id prefix, the two nodes) of each clash reported: once each, not per heartbeat
        self._clashes: set[tuple[int, frozenset[str]]] = set()
        #: every node heard from since this node joined (itself too), also those that left
        #: or were forgotten since, up to _EVER_HEARD_MAX names; None past that (a node
        #: that comes back under a new name at every restart must not grow it for ever)
        self.ever_heard: set[str] | None = {self_node}
        #: changes whenever where an address leads may have changed (a member joined, left,
        #: restarted or was lost, or came back); not for a plain heartbeat. Caches of
        #: routes compare it.
        self.version = 0

    def heard(self, info: NodeInfo) -> bool:
        """Record a heartbeat; True if the node was unreachable and is back."""
        previous = self.members.get(info.node)
        if (
            previous is not None
            and previous.id_prefix != info.id_prefix
            and self.by_prefix.get(previous.id_prefix) == info.node
        ):
            # (a node that shared the old prefix keeps it)
            del self.by_prefix[previous.id_prefix]
        holder = self.by_prefix.get(info.id_prefix)
        if holder is not None and holder != info.node and self._new_clash(info, holder):
            log_guarded(
                log,
                logging.ERROR,
                "nodes %r and %r share the id prefix %016x (two kernels in one process?):"
                " agent ids cannot tell them apart; address their agents by name",
                holder,
                info.node,
                info.id_prefix,
            )
        if (
            previous is None
            or previous.id_prefix != info.id_prefix
            or previous.reachable != info.reachable
        ):
            self.version += 1
            if previous is None and self.ever_heard is not None:
                self.ever_heard.add(info.node)
                if len(self.ever_heard) > _EVER_HEARD_MAX:
                    self.ever_heard = None
        self.members[info.node] = info
        self.by_prefix[info.id_prefix] = info.node
        return previous is not None and not previous.reachable

    def _new_clash(self, info: NodeInfo, holder: str) -> bool:
        """True the first time ``info.node`` and ``holder`` are seen sharing an id prefix
        (each heartbeat of either would otherwise log it again)."""
        clash = (info.id_prefix, frozenset((holder, info.node)))
        if clash in self._clashes:
            return False
        self._clashes.add(clash)
        return True

    def left(self, node: str) -> NodeInfo | None:
        info = self.members.pop(node, None)
        if info is not None:
            self.version += 1
            if self.by_prefix.get(info.id_prefix) == node:
                del self.by_prefix[info.id_prefix]
        return info

    def silent(self, now: float) -> bool:
        """True if a reachable member was not heard from for ``lost_after`` seconds (what
        :meth:`newly_lost` would mark, unmarked)."""
        return any(
            node != self.self_node and info.reachable and now - info.last_seen > self.lost_after
            for node, info in self.members.items()
        )

    def newly_lost(self, now: float) -> list[NodeInfo]:
        """Mark and return the reachable members not heard from for ``lost_after`` seconds."""
        lost = []
        for node, info in self.members.items():
            if node != self.self_node and info.reachable and now - info.last_seen > self.lost_after:
                self.members[node] = attrs.evolve(info, reachable=False)
                self.version += 1
                lost.append(info)
        return lost

    def forget_lost(self, now: float, after: float) -> list[NodeInfo]:
        """Drop and return the members lost more than ``after`` seconds ago (silent for
        ``lost_after + after``): an unreachable entry is kept only so long, or a node that
        comes back under a new name at every restart would grow the table forever. One
        heard from again later is a new member."""
        horizon = self.lost_after + after
        gone = [
            info
            for node, info in self.members.items()
            if node != self.self_node and not info.reachable and now - info.last_seen > horizon
        ]
        for info in gone:
            self.left(info.node)
        return gone

    def node_of(self, agent_id: uuid.UUID) -> NodeInfo | None:
        node = self.by_prefix.get(agent_id.int >> 64)
        return None if node is None else self.members.get(node)


def monotonic() -> float:
    return time.monotonic()
