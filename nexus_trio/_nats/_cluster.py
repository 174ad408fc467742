"""A kernel joined to a NATS cluster: the transport, names, types, membership, durable sends.

``async with join_cluster(kernel, "nats://127.0.0.1:4222", "a") as cluster:`` connects
to NATS, announces the node, and attaches a :class:`Cluster` as the kernel's transport:
from then on the kernel hands every message for a non-local address to it.

Routing a non-local address:

* an agent **id** -> the node whose id prefix it carries (see ``_membership``);
* an agent **name** -> the ``<prefix>-names`` KV bucket (every node publishes its
  named agents there and watches the bucket, so a lookup is a dict hit);
* ``type:<type>`` -> the queue group of that agent type (any one replica takes it).

Guarantees (what the caller of ``kernel.send`` / ``kernel.request`` gets):

* a **tell** (``send``) to a remote agent is *at most once*: it returns when the message
  is queued for the NATS client; a remote mailbox that stays full or an agent that is
  gone drops it (counted on the receiving node: ``stats().inbound_dropped``); a server
  failover may lose it in flight, and then it is counted too: tells to a node carry a
  per-destination sequence number, so the receiving node counts every gap
  (``stats().lost_in_transit``), and what the NATS client refuses is counted on the
  sending node (``stats().publish_failures``). While the connection is down tells wait
  here (``outbox_high_water``, then ``TransportUnavailable`` at the send deadline:
  not accepted);
* a **request** gets its reply, or the error the remote kernel ran into
  (``AgentNotFound``, ``MailboxFull``, ``RequestFailed`` with the remote handler's
  error as text), or ``AgentNotFound`` when NATS reports no responders (the node is
  gone), or ``TransportUnavailable`` when the node is known unreachable, or
  ``RequestTimeout`` at the kernel's deadline; a query the remote handler forwards to
  an agent on a third node gets that agent's answer or error, passed on by the node in
  between, and a cancel passed on the same way (``replies_relayed``, ``cancels_sent``),
  or, when the query cannot reach that node (refused, the node lost), an error frame
  the node in between makes (``errors_replied``);
* :meth:`Cluster.send_durable` is *at least once* through JetStream (see ``_durable``).

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import logging
import math
import os
import re
import socket
import sys
import time
import uuid
import warnings
import weakref
from collections import Counter, OrderedDict, deque
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Mapping,
    Sequence,
)
from contextlib import (
    AbstractContextManager,
    asynccontextmanager,
    nullcontext,
    suppress,
)
from contextvars import ContextVar
from typing import Any, Final, TypeVar, final

import attrs
import nats
import nats.errors
import nats.js.errors
import trio
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg as NatsMsg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext, api
from nats.js.api import KeyValueConfig
from nats.js.client import KV_PRE_TEMPLATE, KV_STREAM_TEMPLATE
from nats.js.kv import KeyValue

from .._agent import check_agent_name
from .._brief import brief
from .._config import (
    Config,
    loss_window,
    max_age_below_sweep,
    not_said_by_a_load,
    prefix_too_long,
    switched_on,
)
from .._deadletter import DeadLetterReason
from .._errors import (
    AgentNotFound,
    KernelShuttingDown,
    MailboxFull,
    MessageDecodeError,
    MessageFailed,
    NameTaken,
    NexusError,
    RequestFailed,
    TransportUnavailable,
)
from .._events import EventKind, LifecycleEvent
from .._kernel import Kernel
from .._logcall import log_guarded
from .._message import (
    SYSTEM_ID,
    Address,
    Message,
    MessageKind,
    id_value,
    row_fields,
    stored_fields,
)
from .._plural import count_of, first_few
from .._router import DeliveryRunFailed, KernelPhase, TransportHandle, detached_phase
from .._throttle import Throttle
from . import _batch as batch
from . import _direct as direct
from . import _kvops as kvops
from . import _wire as wire
from ._aio import (
    Inbox,
    Outbox,
    asyncio_loop,
    call_aio,
    closed_writes_counted,
    current_aio_loop,
    on_loop,
)
from ._auth import NatsAuth, install_redaction, redact, split_credentials
from ._durable import DurableChannel, DurableOptions, is_finite_seconds
from ._held import HeldLines
from ._membership import (
    MemberTable,
    NodeInfo,
    bucket_birth,
    compare_joins,
    decode_record,
    encode_record,
    hex64,
    monotonic,
    node_uuid,
    process_id_prefix,
)
from ._placement import PlacedAgent, Placement
from ._sequence import InboundSequences
from ._stream_caps import STREAM_MAX_CONSUMERS, StreamCaps
from ._streams import InboundStream, InboundStreams, new_session, parse_stream_name
from ._watch import ConnectionWatch

log = logging.getLogger("nexus_trio.nats")
# Every log record of the NATS layer goes through redact(): no credential in any line.
install_redaction(("nexus_trio.nats", "nexus_trio.nats.durable", "nexus_trio.nats.membership"))

_ROUTE_MEMORY: Final = 65536
#: addresses whose routes a node keeps for its tells (then it starts over)
_KNOWN_LINKS_MAX: Final = 65_536
#: A sender that seals a full node batch yields, so that the asyncio side writes it at
#: once, only while fewer tasks than this are runnable. Those that are run before the
#: writer does (Trio runs its queue in order), most of them agents of this kernel that
#: the sender's own tells woke, each for about one message: a driver sending to a
#: thousand agents, half of them on another node, made its local agents handle one
#: message a wake instead of four. The sender yields anyway once the node window is
#: full (it waits for credit), at most ``node_window / batch_frames`` batches later.
#: A lone bulk sender (bench_nats.py: 0-3 runnable at a seal) yields as before.
#: docs/distributed.md, thirty-third pass.
_SEAL_YIELD_RUNNABLE: Final = 32
#: what every frame of a node batch costs on top of its body (a module constant: read per tell)
_FRAME_OVERHEAD: Final = batch.FRAME_OVERHEAD
#: a tell frame's length and kind, packed (see _add_tell)
_tell_frame_head: Final = batch.frame_head
_TELL: Final = batch.TELL
_ROW_COST: Final = batch.ROW_COST
_BLOCK_COST: Final = batch.BLOCK_COST
_TABLE_MAX: Final = batch.TABLE_MAX
_NS_MIN: Final = batch.NS_MIN
_NS_MAX: Final = batch.NS_MAX


def _is_row(fields: tuple[Any, ...]) -> bool:
    """Whether a tell (its ``stored_fields``) goes as a row of a columnar block: no
    optional ids, a creation time whose microseconds fit 64 bits (the rest go as single
    tells, in order with the rows)."""
    return (
        fields[6] is None
        and fields[7] is None
        and fields[8] is None
        and _NS_MIN <= fields[5] < _NS_MAX
    )


_KV_OPS_DELETED: Final = ("DEL", "PURGE")
_T = TypeVar("_T")
#: deleted names whose delete's revision a node keeps (then the oldest are forgotten)
_NAME_DELETES_KEPT: Final = 4096
#: how long a clean leave waits for a retry of failed bucket writes under way (seconds)
_RETRY_WAIT_AT_LEAVE: Final = 2.0
#: how long a clean leave is given (seconds), plus this much per name and placement
#: record it drops (a bucket takes a few thousand deletes a second): with 5,000 agents
#: on the node, the fixed 5 s cut its leave off before it announced itself
_LEAVE_WAIT: Final = 5.0
_LEAVE_WAIT_PER_ENTRY: Final = 0.001
#: each step of a clean leave has its own share of that bound, so that a slow one does
#: not skip the rest (a durable pull that outlived its cancel used it all up: the
#: node's names and record stayed, its leave was never announced): the durable path's
#: stop (end the pull, send the acks) at most this long from the start (the acks' part
#: held while the data connection is down, see Durable.stop)...
_LEAVE_DURABLE_WAIT: Final = 1.5
#: ...the drops of the names and placement records up to this long before the end...
_LEAVE_TAIL: Final = 3.0
#: ...the announcement and the record's delete at most this long, and the flush of the
#: outgoing messages the rest, at least this long
_LEAVE_RECORD_WAIT: Final = 1.0
_LEAVE_FLUSH_WAIT: Final = 2.0
#: seconds each of the two flushes of a type's queue-group unsubscribe waits for the
#: server's answer (see _forget_replica)
_TYPE_UNSUBSCRIBE_WAIT: Final = 1.0
#: a connection down ``ClusterOptions.server_lost_wait`` (from when it went down, before
#: the leave or during it) is gone for the leave: the steps that need it are skipped or
#: cut, not waited out (a worker whose server died waited ~3.5 s of the bounds above: see
#: _unless_gone); one back sooner gets the clean leave, each step's bound held while the
#: connection was down (the ``--workers`` settle asks the same option)
#: streams to nodes that left cleanly whose last notice (see _on_last_notice) is awaited
_LEFT_STREAMS_MAX: Final = 4096
#: later processes under this node's name remembered (see Cluster._successors)
_SUCCESSORS_MAX: Final = 64
#: members that left the member table (a leave, or forgotten) whose last record this
#: node keeps (see Cluster.departed); then the oldest are let go
_DEPARTED_MAX: Final = 4096
#: times a join reads and judges the record under its name, then writes its own against
#: it, before it gives up (each refused write: another process wrote under the name)
_CLAIM_TRIES: Final = 3
#: writes of a join's first record that expect the nodes bucket's last revision (so the
#: record can say the revision it gets, see Cluster._claim_in_order) before the claim
#: is written without that expectation (a bucket others write between each read and
#: write: the record after it says the order)
_ORDERED_CLAIM_TRIES: Final = 5
#: JetStream's "wrong last sequence" (a compare-and-set refused), with and without the
#: sequence in its text
_WRONG_LAST_SEQUENCE: Final = (10071, 10164)
#: how often a placed name's claim reads and writes its entry again when another node
#: wrote it in between (then it is unwritten, retried as any name, see _retry_names)
_NAME_CLAIM_TRIES: Final = 5

#: the subjects of JetStream's acks, naks, terms and in-progress reports (a durable
#: message's reply subject), and the payload of the last
_JS_ACK: Final = "$JS.ACK."
_IN_PROGRESS: Final = b"+WPI"
#: a stream of numbered tells: the destination node and its id prefix (its process)
_Stream = tuple[str, int]
#: where a message goes: subject, reply subject, body (None for a tell to number and
#: encode when it is queued) and the tell's stream, or for a message that goes alone
#: the id prefix of the process it goes to (None: a type, a client that is no kernel)
_Routed = tuple[str, str, bytes | None, _Stream | int | None]
#: a node batch sealed at the flusher's tick with 1 to this many tells is written to the
#: socket at once (see Cluster._flush_pending)
AT_ONCE_TELLS: Final = 32
#: what an outgoing item is: a plain message, a numbered tell (a loss of which the
#: receiver counts), a sequence mark, a node batch (its tells numbered)
_PLAIN, _NUMBERED, _MARK, _BATCH = 0, 1, 2, 3
#: the most parked batched tells handed to the kernel as one run (see _deliver_parked):
#: about what a woken consumer makes room for, bounding the run built for nothing
_PARKED_RUN: Final = 128
#: while tells wait behind a full mailbox, the credit of those that went in is returned
#: before a wait once it is this share of the node window, or once this many seconds
#: have passed since the last return (a slow agent: its senders are not held back
#: longer than that for want of credit; see _deliver_parked)
_PARKED_CREDIT_SHARE: Final = 8
_PARKED_CREDIT_AFTER: Final = 0.01
#: one outgoing NATS message: subject, reply subject, headers, body, what it is
_Outgoing = tuple[str, str, dict[str, str] | None, bytes, int]
#: keys of the per-peer counts of queries and replies kept past the members' (the id
#: prefixes of clients that are no kernel) before they are dropped (see _check_members)
_PEER_COUNTS_SLACK: Final = 1024
#: sequence marks go out every heartbeat when the stream moved, else every this many
_MARK_EVERY: Final = 5
#: a message waiting for room in a full mailbox: the NATS message it came in (None for
#: a batched tell), the message, whether it is a query, the stream to credit
_Parked = tuple[NatsMsg | None, Message, bool, str | None]
#: a received batch, checked: its head, its tells' bodies, its control frames (kind,
#: body), and the stream to credit, named
#: ``<node>:<session>.<id prefix>`` of its sender (None when it was meant for another
#: process of this node's name)
#: a batch checked and read: its head, its tells' messages in order (the undecodable
#: ones counted and left out), its control frames, the stream its credit goes to
_OpenBatch = tuple[batch.BatchHead, list[Message], list[tuple[int, bytes]], str | None]


@final
@attrs.define
class _LeftStream:
    """What this node numbered for a join that left cleanly (see
    Cluster._restart_streams), until its last notice says what it took: the last number
    sent, the last one the join confirmed (credit, its last record), and when the notice
    is late (monotonic)."""

    sent: int
    confirmed: int
    due: float


def _finite_seconds(bound: str) -> Callable[[Any, attrs.Attribute[Any], Any], None]:
    """A validator of a finite number of seconds ``>= 0`` or ``> 0`` (``bound``), named as
    the caller gives it (``last_notice_wait``, not its private field). ``not value >= 0``
    refuses NaN too; an infinite wait would never count (``heartbeat_interval=inf`` was
    taken and a node never beat); the config refuses what this refuses, with the key's
    words."""
    above = bound == "> 0"

    def check(inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if not is_finite_seconds(value, above=above):
            raise ValueError(
                f"{attribute.alias or attribute.name} must be a finite number of seconds"
                f" {bound}, got {value!r}"
            )

    return check


_positive: Final = _finite_seconds("> 0")
_seconds: Final = _finite_seconds(">= 0")


def _reconnect_attempts(inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < -1:
        raise ValueError(
            f"max_reconnect_attempts must be a whole number >= -1 (-1: for ever), got {value!r}"
        )


def _check_prefix(value: Any) -> None:
    """A cluster prefix: one subject token, short enough for its JetStream names."""
    wire.check_token("prefix", value)
    if why := prefix_too_long(value):
        raise ValueError(f"prefix {value[:40]!r}... {why}")


def _seconds_or_derived(inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    """:func:`_seconds`, or None: left out (derived when read)."""
    if value is not None:
        _seconds(inst, attribute, value)


_at_least_one: Final = attrs.validators.ge(1)

#: seconds the leave's close of a connection may take (``_disconnect``)
_CLOSE_WAIT: Final = 3.0
#: seconds the leave's send of its last notice may take while the control connection is
#: up (held while it is down, cut once it has been down ``server_lost_wait``)
_LAST_NOTICE_SEND_WAIT: Final = 2.0
#: ``ClusterOptions.last_notice_wait`` left out is ``server_lost_wait`` plus this: the
#: bounds of the leave's steps between its announcement (which the others time their
#: wait from) and its last notice: the record's delete, the flush (at most the leave's
#: fixed bound, whatever the node's count of names and records: see _leave), the data
#: connection's close and the notice's send, with 2 s to spare
#: (13 s; 18 s with the 5 s default wait; 15 s, fixed, until the forty-first pass).
#: ``notice_wait_at_leave`` is no part of it: that wait comes after the notice is sent
_LAST_NOTICE_MARGIN: Final = (
    _LEAVE_RECORD_WAIT + _LEAVE_WAIT + _CLOSE_WAIT + _LAST_NOTICE_SEND_WAIT + 2.0
)


@final
@attrs.frozen(eq=False, repr=False)
class ClusterOptions:
    """How a kernel takes part in the cluster.

    ``heartbeat_interval`` x ``missed_heartbeats`` is how long a silent node stays
    reachable. ``kv_replicas`` should be 3 on a 3-server NATS cluster so that names and
    membership survive the loss of one server. ``outbox_high_water`` bounds the
    messages waiting for the NATS client: ``send`` waits below it, ``send_nowait``
    raises ``TransportUnavailable`` above ``outbox_limit``. ``inbound_limit`` bounds
    messages received but not yet delivered to local mailboxes, ``parked_limit`` those
    waiting for room in one full mailbox (past them they are refused and counted: core
    NATS is at-most-once). ``inbound_streams_limit`` bounds the sending joins of other
    kernels this node keeps numbers and credit for (see ``_streams``).
    ``docs/distributed.md`` has the table of all options.
    """

    prefix: str = attrs.field(default="nexus", validator=lambda _i, _a, v: _check_prefix(v))
    heartbeat_interval: float = attrs.field(default=1.0, validator=_positive)
    missed_heartbeats: int = attrs.field(default=5, validator=_at_least_one)
    kv_replicas: int = attrs.field(default=1, validator=_at_least_one)
    connect_timeout: float = attrs.field(default=2.0, validator=_positive)
    connect_attempts: int = attrs.field(default=2, validator=_at_least_one)
    join_timeout: float = attrs.field(default=15.0, validator=_positive)
    reconnect_wait: float = attrs.field(default=0.2, validator=_seconds)
    max_reconnect_attempts: int = attrs.field(default=-1, validator=_reconnect_attempts)
    #: seconds a connection may stay down (the server gone, a failover) before the leave
    #: gives up the steps that need it (see Cluster._leave) and a ``--workers`` worker's
    #: settle fails (``NatsServerLost``); one back sooner comes through. Raise it above
    #: how long a failover of your NATS servers takes (``[nats] server_lost_wait``).
    #: Left out (or None), it is derived when read: the members' own loss window,
    #: ``heartbeat_interval`` x ``missed_heartbeats`` (5 s by default; a fixed 5 s until
    #: the forty-third pass, 2 s until the forty-second, which a restart of the server of
    #: 3 s failed), so an outage that loses no member does not make a leave give up its
    #: steps (the others judged such a node lost), as Akka's failure detector allows its
    #: ``acceptable-heartbeat-pause``; a node with a 10 s heartbeat rides out 50 s. (The
    #: field keeps what was given, None if nothing: ``server_lost_wait`` is the property
    #: below.)
    _server_lost_wait: float | None = attrs.field(
        default=None, validator=_seconds_or_derived, alias="server_lost_wait"
    )
    outbox_high_water: int = attrs.field(default=4096, validator=_at_least_one)
    outbox_limit: int = attrs.field(default=65536, validator=_at_least_one)
    inbound_limit: int = attrs.field(default=65536, validator=_at_least_one)
    parked_limit: int = attrs.field(default=4096, validator=_at_least_one)
    durable: DurableOptions = attrs.field(factory=DurableOptions)
    #: tells to one destination process not yet consumed there (credit; see ``_batch``):
    #: sixteen batches, so that a sender sending to many agents seldom waits for the
    #: credit's round trip (each wait wakes its local agents for fewer messages; 2048
    #: until the thirty-sixth pass, docs/distributed.md)
    node_window: int = attrs.field(default=8192, validator=_at_least_one)
    #: a node batch leaves when it holds this many frames or bytes (or on the next tick);
    #: 512 frames: each batch costs both ends a publish, a wake-up and a credit frame
    #: (docs/distributed.md, thirty-second pass)
    batch_frames: int = attrs.field(default=512, validator=_at_least_one)
    batch_bytes: int = attrs.field(default=256 * 1024, validator=_at_least_one)
    #: inbound streams (sending joins of other kernels) kept; past it the least recently
    #: active is evicted (counted in ``ClusterStats.streams_evicted``; see ``_streams``)
    inbound_streams_limit: int = attrs.field(default=4096, validator=_at_least_one)
    #: a lost member stays in the member table (unreachable: a send to it says so) this
    #: many seconds past its loss, then is forgotten (a node under a new name at every
    #: restart must not grow the table forever)
    forget_lost_after: float = attrs.field(default=300.0, validator=_positive)
    #: seconds a node awaits the last notice of a join that left cleanly, from when it
    #: heard the leave, before it counts what that join did not confirm in
    #: ``lost_at_leave`` (an upper bound). Keep it above how long a leave takes to send
    #: its notice after it announced itself: 11 s at most (its steps are bounded, see
    #: Cluster._leave and _disconnect), plus ``server_lost_wait`` (a leave rides out a
    #: failover that long). Left out (or None), it is derived when read:
    #: ``server_lost_wait`` + 13 s (18 s by default), also in a copy made by
    #: ``attrs.evolve`` with another ``server_lost_wait``; given, it must be above
    #: ``server_lost_wait`` (else ``ValueError`` naming both), as Akka checks related
    #: settings as the system starts. (The field keeps what was given, None if nothing:
    #: ``last_notice_wait`` is the property below.)
    _last_notice_wait: float | None = attrs.field(
        default=None, validator=_seconds_or_derived, alias="last_notice_wait"
    )
    #: seconds a clean leave waits for the last notices this node still awaits (those
    #: that have not come then are counted as late)
    notice_wait_at_leave: float = attrs.field(default=2.0, validator=_seconds)

    @property
    def server_lost_wait(self) -> float:
        """Seconds a connection may stay down before the leave gives up the steps that
        need it: as given, else ``heartbeat_interval`` x ``missed_heartbeats`` (see the
        field ``_server_lost_wait``)."""
        given = self._server_lost_wait
        if given is None:
            return loss_window(self.heartbeat_interval, self.missed_heartbeats)
        return given

    @property
    def last_notice_wait(self) -> float:
        """Seconds a node awaits the last notice of a join that left cleanly: as given,
        else ``server_lost_wait`` + 13 s (see the field ``_last_notice_wait``)."""
        given = self._last_notice_wait
        return self.server_lost_wait + _LAST_NOTICE_MARGIN if given is None else given

    @classmethod
    def from_config(cls, config: Config) -> ClusterOptions:
        """The options of ``config``: its ``[cluster]`` keys (each the field of its name),
        ``[nats] server_lost_wait`` and its ``[durable]`` keys (``durable``). ``nexus run
        --nats`` (each ``--workers`` worker too) and :func:`join_cluster` without
        ``options`` use these; a config that loaded makes options (its checks are theirs,
        the rules across keys included). What a load would warn of (a short
        ``server_lost_wait`` or ``[durable] max_age``) is said here, once, as a
        :class:`ClusterOptionsWarning` in the config's words, for a config built in
        Python; a loaded one's load said it, also of a copy ``attrs.evolve`` made of it
        while the words are the same (``nexus_trio._config.not_said_by_a_load``)."""
        for said in not_said_by_a_load(config):
            warnings.warn(said, ClusterOptionsWarning, stacklevel=_users_level())
        section = config.cluster
        given = {
            field.alias: getattr(section, field.alias)
            for field in attrs.fields(cls)
            if field.alias not in ("server_lost_wait", "durable")
        }
        with switched_on(_FROM_A_LOAD):  # (said above, or by the load of the config)
            return cls(
                **given,
                server_lost_wait=config.nats.server_lost_wait,
                durable=DurableOptions.from_config(config.durable),
            )

    def _effective(self) -> tuple[tuple[str, Any], ...]:
        # (each option as the caller names it, with the value the node uses: a derived
        # one as derived; see __repr__ and __eq__)
        return tuple(
            (field.alias or field.name, getattr(self, field.alias or field.name))
            for field in attrs.fields(ClusterOptions)
        )

    def __repr__(self) -> str:
        """The options by their public names, with the values a node uses: one left out
        shows what it derives (``server_lost_wait=5.0, ..., last_notice_wait=18.0``), so
        the repr, evaluated, gives options equal to these (:meth:`__eq__`)."""
        shown = ", ".join(f"{name}={value!r}" for name, value in self._effective())
        return f"ClusterOptions({shown})"

    def __eq__(self, other: object) -> bool:
        """Equal when a node would use the same values: a derived ``last_notice_wait``
        of 18 s equals one given as 18 s (as a dataclass compares a value derived in
        ``__post_init__``). What was left out is derived again in a copy made by
        ``attrs.evolve``, so two equal options may evolve to different ones."""
        if not isinstance(other, ClusterOptions):
            return NotImplemented
        return self._effective() == other._effective()

    def __hash__(self) -> int:
        return hash(self._effective())

    def __attrs_post_init__(self) -> None:
        if self.last_notice_wait > self.server_lost_wait:
            _warn_if_doubtful(self)
            return
        # (the rule of nexus_trio._config.check_across_sections, in the words of these
        # options: a value left out is said to be derived, and from what)
        derived = ""
        if self._server_lost_wait is None:
            derived = (
                "; server_lost_wait, left out, is heartbeat_interval x missed_heartbeats"
                f" ({self.heartbeat_interval:g} x {self.missed_heartbeats}): give it, or"
                " lower those"
            )
        if self._last_notice_wait is None:
            raise ValueError(
                f"server_lost_wait ({self.server_lost_wait:g} s) is too large:"
                f" last_notice_wait, left out, is server_lost_wait + {_LAST_NOTICE_MARGIN:g}"
                " s, which must be above it and is not (a float that large ignores the"
                f" addition); lower server_lost_wait{derived}"
            )
        raise ValueError(
            f"last_notice_wait ({self.last_notice_wait:g} s) must be above"
            f" server_lost_wait ({self.server_lost_wait:g} s): a leave riding out a"
            " failover sends its last notice up to server_lost_wait late, and the"
            " others would count what it took as lost; raise last_notice_wait, or"
            f" leave it out (server_lost_wait + 13 s){derived}"
        )


class ClusterOptionsWarning(UserWarning):
    """Cluster options that are valid but will not do what they are for: a
    ``server_lost_wait`` above 0 and not above ``reconnect_wait`` (given so, or derived
    so from the heartbeats), which gives up a lost connection before the client's second
    attempt to reconnect; a durable ``max_age`` not above the durable sweep's period
    (4 x ``last_notice_wait``), which lets a message stored for a node gone for good
    expire uncounted. Given by :class:`ClusterOptions` built in Python (also by
    ``attrs.evolve``), at the line that built them; options of a loaded config
    (:meth:`ClusterOptions.from_config`, :func:`join_cluster` without ``options``) say
    nothing, the config's load said it (``load_config``'s warnings, which ``nexus`` logs),
    nor do those of a copy ``attrs.evolve`` made of a loaded config that the load said it
    of in the same words; those of a ``Config`` built in Python say it at
    ``from_config`` (so at the join), in the config's words. A warning, as Python's libraries warn of a valid but doubtful
    argument: filtered, made an error (``-W error::nexus_trio.nats.ClusterOptionsWarning``)
    or recorded (``pytest.warns``) by its category, and said once per line by the default
    filters."""


class NodeReplaced(NexusError):
    """Out of :func:`join_cluster`'s block: this process was cut off or paused past its
    loss, a later process joined under its node name meanwhile (an orchestrator took
    this one for dead), and this one, heard again, left the cluster to it: Akka
    Cluster's quarantine of an old incarnation of an address (it must restart to join
    again), Erlang's refusal of a second node of one name. ``node`` is the name,
    ``pid``, ``host`` and ``id_prefix`` the later process's."""

    def __init__(self, node: str, pid: int, host: str, id_prefix: int) -> None:
        self.node = node
        self.pid = pid
        self.host = host
        self.id_prefix = id_prefix
        super().__init__(
            f"node {node!r} was replaced: a later process joined under its name (pid {pid}"
            f" on {host}, id prefix {id_prefix:016x}) while this one was cut off or paused"
            " past its loss; this process left the cluster to it (its agents are not"
            " reachable from the members any more): stop it, or join under another name"
        )


#: set while options are made from a config, whose load says what they would warn of
_FROM_A_LOAD: ContextVar[bool] = ContextVar("_FROM_A_LOAD", default=False)


def _users_level() -> int:
    """The ``stacklevel`` of :func:`warnings.warn`, called by this function's caller, that
    names the first caller outside attrs, contextlib and this module (the user's line)."""
    level, frame = 2, sys._getframe(2)
    while frame.f_back is not None and (
        frame.f_code.co_filename.startswith("<attrs generated")
        or frame.f_globals.get("__name__", "").partition(".")[0] in ("attr", "attrs")
        or frame.f_globals.get("__name__") in (__name__, "contextlib")
    ):
        frame, level = frame.f_back, level + 1
    return level


def _warn_if_doubtful(options: ClusterOptions) -> None:
    """A :class:`ClusterOptionsWarning` for each doubtful value of options built in
    Python, attributed to the user's line: a ``server_lost_wait`` above 0 and not above
    ``reconnect_wait`` (the check of ``nexus_trio._config.short_server_lost_wait``, in the
    options' words), a durable path's ``max_age`` not above the sweep's period
    (``max_age_below_sweep``)."""
    if _FROM_A_LOAD.get():
        return
    said: list[str] = []
    wait, reconnect = options.server_lost_wait, options.reconnect_wait
    if 0 < wait <= reconnect:
        derived = ""
        if options._server_lost_wait is None:
            derived = (
                ", left out: heartbeat_interval x missed_heartbeats"
                f" ({options.heartbeat_interval:g} x {options.missed_heartbeats})"
            )
        said.append(
            f"server_lost_wait ({wait:g} s{derived}) is not above reconnect_wait"
            f" ({reconnect:g} s): a node gives up a lost NATS connection before its second"
            " attempt to reconnect, so even a restart of the server is not ridden out;"
            " give server_lost_wait above reconnect_wait and above how long your servers"
            " take to fail over"
        )
    durable = options.durable
    short_age = durable.enabled and max_age_below_sweep(
        durable.max_age,
        options.last_notice_wait,
        age="DurableOptions.max_age",
        wait="ClusterOptions.last_notice_wait",
    )
    if short_age:
        said.append(short_age)
    for warning in said:
        warnings.warn(warning, ClusterOptionsWarning, stacklevel=_users_level())


@final
@attrs.frozen
class ClusterStats:
    """Counters of one node's traffic through NATS."""

    node: str
    published: int
    received: int
    #: received messages that could not be delivered locally, by reason
    inbound_dropped: dict[str, int]
    #: error frames sent back to remote requesters (handed to the outbox and not
    #: refused there), by kind
    errors_replied: dict[str, int]
    disconnects: int
    reconnects: int
    nodes_lost: int
    inbox_wakeups: int
    outbox_batches: int
    #: of the outbox's publishes, those sent at once from Trio (the outbox was idle), not
    #: through its asyncio task
    outbox_direct: int
    durable_acked: int
    durable_redelivered: int
    durable_dead: int
    durable_duplicates: int
    #: messages the NATS client refused, or still queued (or in the client's reconnect
    #: buffer) when the node left with the connection down: not sent, lost (queries among
    #: them failed at once; error frames are counted in ``errors_unsent`` instead; tells
    #: numbered for a node before it was judged lost in ``lost_with_nodes``)
    publish_failures: int
    #: tells to this node that NATS lost on the way (gaps in their sequence numbers:
    #: a server failover, a subscriber that NATS cut off as a slow consumer)
    lost_in_transit: int
    #: received messages waiting for room in a full local mailbox right now
    parked: int
    members: tuple[str, ...]
    #: messages from other nodes taken into the local kernel (replies included)
    forwarded_in: int = 0
    #: messages counted as lost with lost nodes (see ``Placement.node_lost``), less those
    #: taken back
    lost_with_nodes: int = 0
    #: messages counted in ``lost_with_nodes`` that their node, heard again (it was
    #: frozen or cut off, not dead), took after all: taken back out of it
    lost_with_nodes_taken_back: int = 0
    #: ``lost_with_nodes`` per node it counts lost with (their sum; a node whose count
    #: is back to 0 left out); None once more than 4,096 nodes had a count at once
    #: (``_placement.LOST_WITH_NODES_MAX``: then only the sum is kept). By it the parent
    #: of ``nexus run --workers`` counts a worker judged lost by some workers and settled
    #: with by others exactly: its own books, not their estimate of it
    lost_with_nodes_by_node: dict[str, int] | None = attrs.field(factory=dict)
    #: ``nodes_lost`` per node (times judged lost, also those heard again or forgotten
    #: since); None past 4,096 names (then only the sum is kept)
    nodes_lost_by_node: dict[str, int] | None = attrs.field(factory=dict)
    #: placed agents this node re-spawned after their node was lost
    replaced: int = 0
    #: placed agents of lost nodes that no reachable member can run now (none has their
    #: type registered): their records are kept, and they are re-placed once a member
    #: that runs the type is heard (see ``Placement.owners_changed``)
    placements_waiting: int = 0
    #: node batches sent / received (each carries many tells)
    batches_published: int = 0
    batches_received: int = 0
    #: remote cancel frames sent (a request here timed out or its caller was cancelled;
    #: one per reachable node for a request to a type) and received (a handler here
    #: was asked to stop; for a type, also on a node none of whose replicas took it)
    cancels_sent: int = 0
    cancels_received: int = 0
    #: answers and error frames passed on to the requester on another node of a query
    #: that a handler here sent on to a third node (a router agent), once in the outbox
    #: (an error frame as it came, not in ``errors_replied``: this node refused nothing)
    replies_relayed: int = 0
    #: inbound streams kept now: live (current senders), retired (kept for late tells)
    inbound_streams: int = 0
    inbound_streams_retired: int = 0
    #: live inbound streams evicted past ``inbound_streams_limit``
    streams_evicted: int = 0
    #: lost members forgotten ``forget_lost_after`` seconds after their loss
    nodes_forgotten: int = 0
    #: placed agents stopped here because the names bucket holds a later incarnation of
    #: their name on another node (two copies after a partition healed)
    duplicates_stopped: int = 0
    #: plain (``kernel.spawn``) named agents here whose name a later registration on
    #: another node took (last writer wins: they run on, other nodes reach the later one)
    names_taken: int = 0
    #: local named agents whose entry could not be written to the names bucket (it was
    #: unreachable) and is not yet (retried), and such entries written on a retry
    names_unwritten: int = 0
    names_written_late: int = 0
    #: placed agents running here whose placement record could not be written (the
    #: placed bucket unreachable), and such records written later, on a retry
    records_unwritten: int = 0
    records_written_late: int = 0
    #: names of lost members of an earlier version (their entries name no agent type)
    #: that had no placement record: not re-placed, refused until the member is
    #: forgotten; counted by each node that judged it lost
    untyped_names_lost: int = 0
    #: times this node found the cluster's KV buckets gone or made anew after a reconnect
    #: (a nats-server restarted without its JetStream store), made them if need be and
    #: wrote its membership record, names and placement records again
    buckets_made_again: int = 0
    #: error frames for remote requesters not sent, by kind (``relayed``: one this node
    #: was passing on, see ``replies_relayed``): made after this node's leave had closed
    #: its outbox, refused by the NATS client, or still queued when the node left with the
    #: connection down (their requesters get ``RequestTimeout``)
    errors_unsent: dict[str, int] = attrs.field(factory=dict)
    #: tells this node sent to a node that left cleanly which that node's last notice
    #: says it never took: they reached NATS after its data connection had closed,
    #: before this node heard of the leave; if the notice is lost (late), the tells that
    #: node had not confirmed (an upper bound)
    lost_at_leave: int = 0
    #: asyncio's ``socket.send() raised exception.`` lines of this node's connections:
    #: writes of nats-py to a socket whose connection was lost, dropped (the sixth and
    #: later of each loss; tells in them are counted by their receivers in
    #: ``lost_in_transit``); counted here, said once a loss, not printed each
    closed_socket_writes: int = 0
    #: durable messages this node's leave left unsettled, which JetStream delivers again
    #: (their handlers see the same ids again): acks, naks and terms it could not send
    #: (or made after it, an answer that came late), and what a pull that did not end in
    #: the leave's share for it had fetched and not handed over
    durable_unsettled_at_leave: int = 0
    #: deliveries of durable messages by name that no agent of this node had (stopped and
    #: not spawned again yet): each nakked with a delay that grows a delivery
    #: (``DurableOptions.missing_agent_delay``), dead after ``max_deliver`` (``durable_dead``)
    durable_agent_missing: int = 0
    #: durable messages by name whose agent runs on another node now (re-placed after a
    #: loss, rebalanced, spawned again there): stored for that node and acked here
    durable_forwarded: int = 0
    #: durable messages stored for a lost node that this node took over (the rendezvous
    #: owner of the loss over the survivors) and settled: forwarded to where their name
    #: runs now, or dead (an agent id: it died with its node; a name that ran nowhere
    #: within ``max_deliver``); also counted in ``durable_forwarded``/``durable_dead``
    durable_taken_over: int = 0
    #: failed fetches of durable consumers, each logged (at most a line a second) and
    #: tried again, by consumer: ``own`` (this node's) and ``takeover`` (a lost node's
    #: this node takes over, see ``durable_taken_over``)
    durable_fetch_failures: dict[str, int] = attrs.field(factory=dict)
    #: deliveries of durable messages by name whose agent runs on a node whose durable
    #: path is off (its record says so): not forwarded there, where no one would pull
    #: them; each is counted besides in what came of it: waiting here
    #: (``durable_agent_missing``), or dead (``durable_dead``: its last delivery, or
    #: ``durable_wait_full``); a reason, not an outcome: no sum adds it to those
    durable_not_forwarded: int = 0
    #: deliveries of durable messages by name that no agent of this node had, terminated
    #: (also in ``durable_dead``) because ``DurableOptions.max_waiting`` of them waited
    #: for their agents already: JetStream holds an unacked slot of the node's consumer
    #: (``max_ack_pending``, ``4 x max_in_flight + max_waiting``) for each until it is
    #: delivered again, and more waiting would stall every other durable message of the
    #: node; also those of a lost node's consumer this node takes over (its slots beyond
    #: ``4 x max_in_flight`` wait, or 3/4 of them on a consumer made before
    #: ``max_waiting``; also in ``durable_taken_over``)
    durable_wait_full: int = 0
    #: durable messages by agent id stored for a lost node that this node's takeover
    #: fetched when that node was heard again (the same process: frozen, or cut off):
    #: nakked back to the node's consumer, which the node pulls itself again (its agent
    #: may live), not dead
    durable_given_back: int = 0
    #: takeovers of a node no member any more that a sweep of the durable stream started
    #: (its stored messages no look took: the look's owner left or died before it, or
    #: they were stored after a look found nothing; their messages are counted in
    #: ``durable_taken_over`` as any takeover's), and sweeps JetStream did not answer
    #: (made again later; see ``DurableChannel._sweeps``)
    durable_swept: int = 0
    durable_sweep_failures: int = 0
    #: sweeps whose read of the stream's subjects stopped at its bound (2 pages of
    #: nats-server's 100,000 subjects; the next sweep reads on from there), or of its
    #: consumers (20 pages of 256, or 20 asked one by one), and takeovers
    #: by a look or a sweep of a node no member that ended at once, leaving its consumer
    #: to the pull requests waiting on it (a process of its name whose join was not heard
    #: yet, or another node's takeover; looked at again later)
    durable_sweeps_cut: int = 0
    durable_left_to_pullers: int = 0
    #: messages a takeover had fetched when its node began to leave (its kernel shutting
    #: down, its cluster closing), and since the forty-eighth pass those a fetch (a
    #: takeover's, the node's own) cancelled under way at the leave's ``stop()`` took,
    #: nakked back to their consumer rather than taken: the next owner's takeover (or the
    #: node's next process) gets them (see ``DurableChannel.take_over``)
    durable_handed_back_at_leave: int = 0
    #: messages the old pull subscription of this node's consumer held when the pull was
    #: set up again after JetStream refused a fetch, nakked back to the consumer, which
    #: delivers them to the new subscription at once (before the fiftieth pass they
    #: were dropped with the old subscription and waited out ``ack_wait``)
    durable_handed_back_at_remake: int = 0
    #: settles (acks, naks, terms, forwards) of deliveries of the durable stream from
    #: before it was made anew (an operator deleted it), not sent, and messages its old
    #: pull subscription held then, not nakked: JetStream settles by stream sequence,
    #: and the new stream numbers from 1 again, so an ack of one removed the new
    #: stream's message of that sequence (before the fifty-first pass); the old
    #: stream's messages went with it
    durable_stale_settles: int = 0
    #: ``durable_dead`` by why each was given up (their sum), each kind with a throttled
    #: log line of its own (at most one a second, the rest said at the leave): this
    #: counts them all. ``undecodable`` (a body no kernel wrote), ``agent_gone`` (by an
    #: agent id no agent of this node has any more), ``agent_missing`` (by a name no
    #: agent of this node had, nor one it could be forwarded to, on the last of
    #: ``max_deliver`` deliveries: no handler ran), ``failed`` (its delivery failed on
    #: the last of them: its handler raised or timed out, the mailbox was full, or it
    #: was dead-lettered as the agent stopped or the kernel shut down), ``unanswered``
    #: (no answer within ``ack_wait`` on the last), ``wait_full`` (``durable_wait_full``:
    #: this node's consumer's and the takeovers'), ``lost_node`` (taken over from a lost
    #: node: by
    #: agent id, or a name that ran nowhere within ``max_deliver``), ``unforwarded`` (its
    #: forward to where its name runs failed on the last delivery), ``consumer_max_deliver``
    #: (JetStream delivered it no more before this node's ``max_deliver`` said it was dead:
    #: an operator lowered its consumer's; or found given up, uncounted, at this node's
    #: start or a takeover's bind: see docs/distributed.md; deleted from the stream)
    durable_dead_reasons: dict[str, int] = attrs.field(factory=dict)
    #: forwards of durable messages to where their name runs now that JetStream did not
    #: take (each nakked and tried again; dead on the last delivery, ``unforwarded``
    #: in ``durable_dead_reasons``)
    durable_forward_failures: int = 0
    #: deliveries of durable messages by name not forwarded to the node their agent runs
    #: on because the forward's headers made them bigger than NATS's ``max_payload``:
    #: they wait here (``durable_agent_missing`` not counted; dead after ``max_deliver``)
    durable_too_big: int = 0
    #: failures to make the durable stream or this node's consumer anew (or bind them
    #: again) after JetStream refused a fetch, each tried again at the next failed fetch
    durable_remake_failures: int = 0
    #: set-ups of the cluster's JetStream streams (its KV buckets' at the join, the
    #: durable stream's at the join and at a remake) that left one allowing fewer than
    #: 2**31 - 1 consumers, each said (a throttled warning naming the stream, its limit
    #: and why): the account's JetStream limit of consumers is lower (the stream takes
    #: it), an operator set one, or a stream that sets none could not be updated (the
    #: server's ``default_max_consumers`` caps it: 1,000 on nats-server 2.15). Past that
    #: many nodes, a node's join is refused
    streams_capped: int = 0
    #: the outbox's sends that failed, each logged (at most a line a second, the rest
    #: said at the leave): a message the NATS client refused (also counted as what it
    #: was: ``publish_failures``, ``errors_unsent``, or a gap at its receiver) and one
    #: whose publish failed after its bytes were buffered (counted only here)
    outbox_failures: int = 0
    #: tells this node's kernel sent after the node left the cluster (it runs on) to an
    #: agent the node knew on another node: not sent (dead-lettered there
    #: ``transport_unavailable``), not raised to their senders (see ``_tell_after_leave``)
    tells_after_leave: int = 0
    #: requests this node's kernel sent after the node left the cluster to an agent the
    #: node knew on another node: not sent, failed at once for their callers
    #: (``TransportUnavailable`` saying the node left)
    requests_after_leave: int = 0
    #: requests this node had sent that were waiting for their answer when the node
    #: asked was judged lost: failed for their callers with ``TransportUnavailable``
    #: naming the node and why it was judged lost
    requests_lost_with_nodes: int = 0
    #: records and entries of the cluster's buckets refused, each time one is heard: a
    #: membership record (also one on the heartbeat subjects), a placement record or a
    #: names entry whose key this code does not write or whose body is not one (not
    #: strict UTF-8 JSON, wrong fields); logged at most once a second
    entries_malformed: int = 0
    #: tells of an earlier join of a sending process that came after this node had
    #: forgotten that join's stream, while it keeps a later join's: delivered, their
    #: numbers not taken (nothing counted lost, no credit), the later stream not retired
    old_session_tells: int = 0
    #: membership records heard on the heartbeat subjects under the name of a member
    #: from another process than the one this node holds under it, and ignored: this
    #: node's own name, or a process that joined before (or with the same join time as)
    #: the one held. Two live processes started with one node name, or a peer on the
    #: NATS account speaking for a node (see docs/distributed.md, "Who is trusted");
    #: logged at most once a second, naming both processes. Not a stale record the
    #: nodes bucket's watch gives once after a restart (not counted)
    records_contested: int = 0


#: the most node names ``ClusterStats.nodes_lost_by_node`` keeps (then None)
_LOST_BY_NODE_MAX: Final = 4096

_decode: Final = wire.decode_message


def _record_session(record: bytes) -> int | None:
    """The session of the join a membership record is of (None: a record without one, of
    an earlier version); ValueError if it cannot be read."""
    try:
        session = wire.read_wire_json(record, "membership record").get("session")
        return int(session, 16) if isinstance(session, str) else None
    except (AttributeError, RecursionError) as exc:
        raise ValueError(f"membership record: {exc!r}") from None


def _mark(marks: dict[str, _T], node: str, mark: _T) -> None:
    """Note ``mark`` of ``node`` in ``marks`` as its last entry, the oldest dropped past
    _LEFT_STREAMS_MAX."""
    marks.pop(node, None)
    marks[node] = mark
    if len(marks) > _LEFT_STREAMS_MAX:
        del marks[next(iter(marks))]


def _name_entry_type(value: bytes | None) -> str | None:
    """The agent type an entry of the names bucket names (a placed agent's claim, see
    ``Cluster.placed_type``), None if it names none (or one no type name could be)."""
    if not value or b'"type"' not in value:
        return None
    try:
        type_name = wire.read_wire_json(value, "names bucket entry").get("type")
    except (ValueError, TypeError, AttributeError, RecursionError):
        return None
    return type_name if isinstance(type_name, str) and wire.is_token(type_name) else None


def _decode_name_entry(value: bytes | None) -> tuple[str, uuid.UUID] | None:
    """``(node, agent id)`` of an entry of the names bucket, None if malformed."""
    try:
        obj = wire.read_wire_json(value or b"", "names bucket entry")
        node, agent_id = obj["node"], obj["id"]
    except (ValueError, KeyError, TypeError, RecursionError):
        return None
    # (strings, or no entry: uuid.UUID raises AttributeError for a number or a list)
    if not isinstance(node, str) or not isinstance(agent_id, str):
        return None
    try:
        return node, uuid.UUID(agent_id)
    except ValueError:
        return None


#: read as a module constant on the per-message paths: ``MessageKind.QUERY`` (a class
#: attribute of an enum) costs ~175 ns a read on Python 3.11, a module constant ~12 ns
_QUERY: Final = MessageKind.QUERY
#: errors of the connection itself, not an answer of the server (which says more: an
#: 'Authorization Violation', a TLS requirement, a protocol error)
_CONNECTION_ERRORS: Final = (
    OSError,
    nats.errors.StaleConnectionError,
    nats.errors.ConnectionClosedError,
    nats.errors.NoServersError,
)

#: nats-py's words when the first line from the server is no INFO (it read nothing, or
#: another protocol's greeting: an HTTP or SSH server on the port)
_NO_INFO: Final = "when expecting INFO message"


def _no_nats_there(
    answer: Sequence[Exception], last_error: Sequence[Exception], connect_timeout: float
) -> str | None:
    """What a failed connect says when what listens at the URL did not speak NATS, or
    None: its first line was no ``INFO`` (nats-py: ``empty response from server when
    expecting INFO message``, said as what ``the server said`` until the fifty-seventh
    pass, for an HTTP or SSH server's greeting too), or it accepted the connection and
    sent nothing (nats-py: a bare ``TimeoutError()``)."""
    check = "is a NATS server listening at the URL's port (4222 by default)?"
    if answer and _NO_INFO in str(answer[0]):
        return (
            "what answers there is not NATS: its first line was no INFO (it sent nothing,"
            f" or another protocol's greeting): {check}"
        )
    if not answer and last_error and isinstance(last_error[0], TimeoutError):
        return (
            "what answers there is not NATS, or too busy to greet, or wants TLS first (a"
            " tls:// URL): it took the connection and sent no INFO within connect_timeout"
            f" ({connect_timeout:g}s): {check}"
        )
    return None


#: what the NATS client says when it refuses a message for want of a connection (it
#: reconnects and its buffer is full, or it is closed): nothing it is given after that
#: is written until it is connected again
_NOT_CONNECTED: Final = (nats.errors.OutboundBufferLimitError, nats.errors.ConnectionClosedError)


@final
class Cluster:
    """This kernel's membership in a NATS cluster, and its transport (see the module doc).

    Get one from :func:`join_cluster`. The kernel calls :meth:`deliver` /
    :meth:`deliver_nowait`; users call :meth:`serve_type`, :meth:`send_durable`,
    :meth:`wait_for_name`, :meth:`members` and :meth:`stats`, and place agents in the
    cluster with :meth:`register_type` and :meth:`spawn` (see ``_placement``).
    """

    # Slots, not only an instance dict: an instance of more than 30 attributes has a dict
    # of its own (CPython 3.11 shares the keys of at most 30), whose reads and writes
    # specialize only "with hint", and the cluster has over a hundred; a tell reads a
    # dozen of them on the way out and as many on the way in. "__dict__" stays, empty,
    # so that a test can still stand a function in for a method of one cluster. A new
    # attribute must be named here (see docs/distributed.md, thirty-second pass).
    __slots__ = (
        "__dict__",
        "_after_leave_log",
        "_aio_loop",
        "_alone_in",
        "_alone_out",
        "_batch_bytes",
        "_batch_frames",
        "_batch_subject",
        "_batch_versions",
        "_batches_published",
        "_batches_received",
        "_body_scope",
        "_bucket_births",
        "_bucket_last_seqs",
        "_buckets_made_again",
        "_buckets_renewed",
        "_buckets_to_check",
        "_cancels_received",
        "_cancels_sent",
        "_claimed_types",
        "_closed_socket_writes",
        "_closed_writes_said",
        "_closing",
        "_contested_log",
        "_ctl",
        "_data_closed",
        "_data_js",
        "_data_up",
        "_deleted_before_leave",
        "_deliveries",
        "_deliveries_ended",
        "_departed",
        "_dirty",
        "_disconnecting",
        "_disconnects",
        "_drain_task",
        "_drop_log",
        "_dropped",
        "_errors_replied",
        "_errors_unsent",
        "_flush_wanted",
        "_forwarded_in",
        "_heartbeat_sub",
        "_heartbeat_subject",
        "_heartbeats_read",
        "_hidden_names",
        "_high_water",
        "_inbound",
        "_inbox",
        "_join_batch_subject",
        "_join_mark_subject",
        "_join_order",
        "_joined_at",
        "_js",
        "_json_requests",
        "_known_links",
        "_leave_announced",
        "_leave_heard_by",
        "_left_before_delete",
        "_left_counted",
        "_left_streams",
        "_links",
        "_links_version",
        "_local_names",
        "_loss_log",
        "_lost_at_leave",
        "_lost_by_node",
        "_lost_numbered",
        "_malformed_log",
        "_mark_subject",
        "_marks_sent",
        "_name_deletes",
        "_name_ops",
        "_name_ops_recv",
        "_name_revisions",
        "_name_types",
        "_names",
        "_names_idle",
        "_names_kv",
        "_names_lock",
        "_names_of_forgotten",
        "_names_pending",
        "_names_refused",
        "_names_taken",
        "_names_written_late",
        "_nc",
        "_node_bytes",
        "_node_subject_prefix",
        "_nodes_forgotten",
        "_nodes_kv",
        "_nodes_lost",
        "_nodes_subject_prefix",
        "_notice_log",
        "_notices_in",
        "_old_session_tells",
        "_outbox",
        "_outbox_queued",
        "_outstanding",
        "_own_name_log",
        "_parked",
        "_publish_failures",
        "_published",
        "_published_names",
        "_ready_phase",
        "_received",
        "_reconnects",
        "_record_lock",
        "_record_revision",
        "_record_sessions",
        "_records_contested",
        "_records_refused",
        "_refused_batches",
        "_relaying",
        "_replaced",
        "_replacing",
        "_replies_relayed",
        "_reply_routes",
        "_requests_after_leave",
        "_requests_lost_with_nodes",
        "_retry_over",
        "_retry_wanted",
        "_seq_in",
        "_seq_marked",
        "_seq_out",
        "_session",
        "_successor_heard",
        "_successors",
        "_taken_names",
        "_tells_after_leave",
        "_type_queries",
        "_type_subs",
        "_type_taken",
        "_type_tells",
        "_type_turn",
        "_types",
        "_unread_drops",
        "_unsure_drops",
        "_unwritten_log",
        "_unwritten_names",
        "_write_now",
        "auth",
        "connections",
        "durable",
        "handle",
        "held",
        "id_prefix",
        "kernel",
        "members",
        "node",
        "options",
        "placement",
        "prefix",
        "record_extra",
        "servers",
        "stream_caps",
    )

    #: :meth:`deliver` is told of a send from outside the agents (``OutsideTold``): the
    #: kernel marks no task per tell
    tells_outside: Final = True

    def __init__(
        self,
        kernel: Kernel,
        servers: Sequence[str],
        node: str,
        options: ClusterOptions,
        auth: NatsAuth | None = None,
    ) -> None:
        self.kernel = kernel
        #: the way into the kernel, from ``kernel.attach_transport`` (None when detached)
        self.handle: TransportHandle | None = None
        # Credentials in the URLs move to ``auth``: the URLs are shown in logs and errors.
        self.servers, self.auth = split_credentials(list(servers), auth or NatsAuth())
        self.node = wire.check_node_name(node)
        self.options = options
        self.prefix = options.prefix
        self.id_prefix = process_id_prefix()
        #: the asyncio loop this node's NATS clients run on (built inside asyncio_loop());
        #: the entry points a task outside the join block may call run on it (on_loop)
        self._aio_loop = current_aio_loop()
        self._nc: NatsClient | None = None
        self._ctl: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._data_js: JetStreamContext | None = None
        self._nodes_kv: KeyValue | None = None
        self._names_kv: KeyValue | None = None
        self._node_subject_prefix = f"{self.prefix}.node.{self.node}."
        self._nodes_subject_prefix = f"{self.prefix}.node."
        self._heartbeat_subject = f"{self.prefix}.hb.{self.node}"
        self._mark_subject = wire.sequence_mark_subject(self.prefix, self.node)
        self._batch_subject = wire.batch_subject(self.prefix, self.node)
        self._node_bytes = self.node.encode()
        # node batches: one link per destination process, the links with frames or
        # credit waiting, and the flusher's wake-up (see _flush_batches)
        self._links: dict[_Stream, batch.NodeLink] = {}
        self._dirty: dict[batch.NodeLink, None] = {}
        self._flush_wanted = trio.Event()
        #: True while the flusher seals a small batch at its tick: written to the socket
        #: at once (see _flush_pending)
        self._write_now = False
        #: tells' routes: address (an id by its 128-bit value, which hashes in C) -> the
        #: node batch its tells join (see _link_for)
        self._known_links: dict[int | str, batch.NodeLink] = {}
        self._links_version = -1
        self._batch_bytes = batch.batch_limit(1 << 20, self.node, options.batch_bytes)
        # options read by every tell (the options are frozen)
        self._batch_frames = options.batch_frames
        #: the node-batch versions this node reads, as its record lists them (see _batch)
        self._batch_versions = batch.READ_VERSIONS
        self._high_water = options.outbox_high_water
        # this join's session: streams of an earlier join of this process are apart (and
        # its sessions in the order of its joins, see _streams.new_session)
        self._session = new_session()
        # where batches and marks numbered for this join come (senders that know its
        # session from its record); the plain subjects above take those of senders of
        # an earlier version (see _take_node_message)
        self._join_batch_subject = wire.batch_subject(self.prefix, self.node, self._session)
        self._join_mark_subject = wire.sequence_mark_subject(self.prefix, self.node, self._session)
        self._batches_published = 0
        self._batches_received = 0
        self._cancels_sent = 0
        self._cancels_received = 0
        self._replies_relayed = 0
        self.members = MemberTable(node, options.heartbeat_interval * options.missed_heartbeats)
        self._joined_at = time.time()
        # name -> (node, agent id) for every named agent in the cluster (KV watcher)
        self._names: dict[str, tuple[str, uuid.UUID]] = {}
        # name -> the KV revision of its entry in ``_names``, where known (an older entry
        # heard late, from a read that raced the watch, must not undo a newer one)
        self._name_revisions: dict[str, int] = {}
        # name -> the KV revision of its delete, for names deleted since (bounded): the
        # put it deleted, heard late, must not map the name to its stopped agent again
        self._name_deletes: OrderedDict[str, int] = OrderedDict()
        # name -> (the entry a placement answer hid, the copy it named): a copy whose
        # claim failed, learnt over the entry of a holder not heard here then (see
        # learn_name); the entry routes the name again once its node is heard (the
        # copy's node stops the copy as its duplicate then), unless the bucket spoke since
        self._hidden_names: dict[str, tuple[tuple[str, uuid.UUID], tuple[str, uuid.UUID]]] = {}
        # names of forgotten members' agents still in the names bucket -> the revision of
        # the entry to delete (a process killed deletes none of its own; see
        # _drop_names_of_forgotten), and this node's own whose delete failed (see
        # _drop_name_again)
        self._names_of_forgotten: dict[str, int] = {}
        # local names this node published: name -> (agent id, KV revision)
        self._published_names: dict[str, tuple[uuid.UUID, int]] = {}
        # local names as they should be in KV (what was queued for publishing)
        self._local_names: dict[str, uuid.UUID] = {}
        # local names claimed by placement: name -> (agent id, agent type), the type
        # written into the name's entry with the node and id (see _name_value)
        self._claimed_types: dict[str, tuple[uuid.UUID, str]] = {}
        # name -> the agent type its names-bucket entry names (a placed agent's claim):
        # a node lost between its claim and its record still has it re-placed (see
        # placed_type)
        self._name_types: dict[str, str] = {}
        # local names whose put failed (the bucket unreachable): name -> agent id, to
        # write again (see _retry_names); and how many such writes landed
        self._unwritten_names: dict[str, uuid.UUID] = {}
        self._names_written_late = 0
        # local names stopped while unwritten: name -> the stopped agent's id. Its entry
        # may be in the bucket all the same (a put whose answer was lost, or one that
        # landed in a bucket made anew before this node noticed, see _check_buckets):
        # the stop deletes it if the bucket holds this node's entry of that agent
        self._unsure_drops: dict[str, uuid.UUID] = {}
        # those of them whose entry the bucket did not answer a read of: read again (and
        # deleted if this node's of that agent) with the retries, see _own_entries
        self._unread_drops: dict[str, uuid.UUID] = {}
        # the streams of the cluster's KV buckets and when the server made them (see
        # _check_buckets); whether to check them at the next heartbeat (a reconnect, a
        # write that found no bucket); how often they were found gone or made anew
        self._bucket_births: dict[str, object] = {}
        # each bucket's stream's last sequence when it was opened (where a join's first
        # record expects the nodes bucket to be, see _claim_in_order)
        self._bucket_last_seqs: dict[str, int] = {}
        # this join's place in the order of joins (NodeInfo.join_order: the nodes
        # bucket's birth, the revision of the join's first record; set once that record
        # landed)
        self._join_order: tuple[int, int] | None = None
        self._buckets_to_check = False
        self._buckets_made_again = 0
        # set (and replaced) when the buckets were found made anew: the watches of the
        # old ones start again on the new (see _start_watch)
        self._buckets_renewed = trio.Event()
        self._names_taken = 0
        # the local agent counted in it, by name: counted once, however often its name is
        # checked again (a heal, the watch's replay); dropped with the local name
        self._taken_names: dict[str, uuid.UUID] = {}
        # local names a rebalance moved here, until their entry is written: name ->
        # (agent id, the moved copy's (node, agent id)), whose entry the claim, a retry
        # and the duplicate check take as the one this copy replaces (see _entry_stands)
        self._replacing: dict[str, tuple[uuid.UUID, tuple[str, uuid.UUID]]] = {}
        # one write of a name at a time: _publish_names's, or a retry's
        self._names_lock = trio.Lock()
        self._name_ops: trio.MemorySendChannel[tuple[str, uuid.UUID | None]]
        self._name_ops_recv: trio.MemoryReceiveChannel[tuple[str, uuid.UUID | None]]
        self._name_ops, self._name_ops_recv = trio.open_memory_channel(1 << 30)
        self._names_pending = 0
        self._names_idle = trio.Event()
        self._names_idle.set()
        # set to retry the failed writes to the buckets at once (see _retry_writes)
        self._retry_wanted = trio.Event()
        # set while no retry of those writes is under way (a clean leave waits for one)
        self._retry_over = trio.Event()
        self._retry_over.set()
        # responder side: query id -> NATS reply subject of the remote requester
        self._reply_routes: OrderedDict[uuid.UUID, str] = OrderedDict()
        # queries that came in the kernel's JSON wire form: their replies go out in it too
        self._json_requests: OrderedDict[uuid.UUID, int] = OrderedDict()
        # requester side: query id -> (address asked, node asked)
        self._outstanding: OrderedDict[uuid.UUID, tuple[Address, str]] = OrderedDict()
        # Queries and replies go alone, not numbered: per peer process (its id prefix),
        # those handed to NATS for it and those taken from it (delivered here, or refused
        # and counted), so that a lost peer's share of the books is known exactly here
        # (see queries_and_replies_sent_to). The peer is the node at the other end of the
        # frame (see _peer_of), not the process a message's id names: a query a router
        # agent sends on keeps its requester's id, and the answer it passes back its
        # responder's: the answer says so (Nexus-Relayed, see _relaying), for a requester
        # that no longer knows where it asked (late) or never knew (a query to a type).
        self._alone_out: dict[int, int] = {}
        self._alone_in: dict[int, int] = {}
        # the headers of an answer this node passes on (_reply_in_now): set while the
        # kernel hands it to this transport, for _seal
        self._relaying: dict[str, str] | None = None
        # queries to a type (a queue group: which replica takes one is unknown when it
        # leaves), counted for the process that answers, when its answer comes (bounded)
        self._type_queries: OrderedDict[uuid.UUID, bool] = OrderedDict()
        #: tells to a type sent lately (the last _ROUTE_MEMORY): each goes with a reply
        #: subject, so that NATS's "no responders" (no node serves the type) comes back
        #: here and is counted, inbound_dropped["no_replica"]
        self._type_tells: OrderedDict[uuid.UUID, bool] = OrderedDict()
        # responder side: queries to a type taken here -> the local replica they went to,
        # so that their requester's cancel (sent to every node) finds the handler
        self._type_taken: OrderedDict[uuid.UUID, uuid.UUID] = OrderedDict()
        self._types: dict[str, list[uuid.UUID]] = {}
        # messages from NATS waiting for room in a full local mailbox, per recipient
        # (with the stream of a batched tell: it is credited once it leaves)
        self._parked: dict[Address, deque[_Parked]] = {}
        # the nursery of the delivering tasks (see _run_deliveries; None once it ended)
        self._deliveries: trio.Nursery | None = None
        self._deliveries_ended = trio.Event()
        self._type_subs: dict[str, Any] = {}
        self._type_turn = itertools.count()
        #: what the throttled warnings held back since their last line, said at the leave
        self.held: HeldLines = HeldLines()
        #: the limits of consumers of the cluster's streams, lifted (see _stream_caps)
        self.stream_caps = StreamCaps(node, self.held)
        self._inbox: Inbox[NatsMsg | _OpenBatch] = Inbox(options.inbound_limit)
        self._outbox: Outbox[_Outgoing] = Outbox(
            send_one=self._publish_one,
            on_refused=self._publish_refused,
            held=self.held,
            counted="outbox_failures",
        )
        #: what waits in the outbox (len() of it: every tell checks the backlog)
        self._outbox_queued = self._outbox.queued
        # tells' sequence numbers: the last given per destination, the last marked,
        # and the next expected per sending process (see ``_sequence``)
        self._seq_out: dict[_Stream, int] = {}
        self._seq_marked: dict[_Stream, int] = {}
        self._seq_in = InboundSequences(self.id_prefix, options.node_window)
        # per sending stream: its numbers (above) and the tells consumed here (delivered,
        # refused, or lost: the credit returned to it), bounded (see ``_streams``)
        self._inbound = InboundStreams(
            self._seq_in,
            options.inbound_streams_limit,
            node=node,
            on_forget=self._forget_sender,
            held=self.held,
        )
        self._marks_sent = 0
        self._publish_failures = 0
        #: asyncio's closed-socket lines of this node's connections (see _closed_write)
        self._closed_socket_writes = 0
        #: the connections (roles) whose closed-socket writes were said since they were
        #: last back: said once a loss of the connection, then counted
        self._closed_writes_said: set[str] = set()
        # streams to joins that left, ended at their leave as this node heard it (see
        # _restart_streams), with tells not confirmed: (node, id prefix, session) -> what
        # was sent and confirmed, until the join's last notice says what it took (see
        # _on_last_notice) or it is late (see _count_late_notices); oldest first
        self._left_streams: OrderedDict[tuple[str, int, int], _LeftStream] = OrderedDict()
        # set once no last notice is awaited, for a leave that waits for them
        self._notices_in: trio.Event | None = None
        # the joins above whose tells were counted (their notice, or its lateness), as
        # long as they would be kept awaited: a batch this node leaves with unsent is not
        # counted again (see _unsent_at_leave)
        self._left_counted: OrderedDict[tuple[str, int, int], None] = OrderedDict()
        self._lost_at_leave = 0
        # joins judged lost: (node, id prefix, session) -> the last number numbered for it
        # when it was, which Placement.node_lost counted in lost_with_nodes as far as the
        # join had not confirmed it: a batch this node leaves with unsent is not counted
        # again (see _unsent_at_leave); the last _LEFT_STREAMS_MAX losses
        self._lost_numbered: OrderedDict[tuple[str, int, int | None], int] = OrderedDict()
        # batches the NATS client refused for want of a connection (subject, the batch's
        # head): counted by their receivers once a later number or mark of their stream
        # reaches them, i.e. once marks go out with the connection up again (see
        # _send_sequence_marks); by this node if it leaves with the connection still down
        self._refused_batches: list[tuple[str, bytes]] = []
        # node -> the session of the last record of it the nodes bucket's watch gave
        # (None: a record without one); see _apply_node_entry
        self._record_sessions: dict[str, int | None] = {}
        # node -> the session of its join whose leave was heard before the nodes bucket's
        # watch gave the delete of its record: a record of that join the watch gives
        # meanwhile was written before the leave (see _apply_node_entry)
        self._left_before_delete: dict[str, int] = {}
        # node -> (the session of its join whose record's delete the nodes bucket's watch
        # gave before its leave was heard on the core subject, until when): a heartbeat
        # of that join heard meanwhile was sent before the leave (see _on_heartbeat)
        self._deleted_before_leave: dict[str, tuple[int, float]] = {}
        self._loss_log = Throttle(kind="cluster.loss")
        self._notice_log = Throttle(kind="cluster.notice")
        #: malformed membership records (anyone on the account can write one, by the
        #: thousand)
        self._records_refused = kvops.Refusals("a membership record", self.held)
        #: names bucket entries refused (see _apply_name_entry)
        self._names_refused = kvops.Refusals("a names bucket entry", self.held)
        #: records under this node's name from another process (see _apply_member_entry)
        self._own_name_log = Throttle(kind="cluster.own_name")
        #: the id prefixes of the processes under this node's name that joined after this
        #: one, heard live (their heartbeats): this process was cut off or paused past its
        #: loss and its name restarted meanwhile (see _on_other_batch); the last 64
        self._successors: OrderedDict[int, None] = OrderedDict()
        #: set as a later process of this node's name is heard live: the task of
        #: _leave_if_replaced reads the nodes bucket to confirm it holds the name
        self._successor_heard = trio.Event()
        #: the record of the later process this one left the cluster to (see
        #: _leave_if_replaced), None while it was not replaced
        self._replaced: NodeInfo | None = None
        #: the scope of join_cluster's block, cancelled once this process is replaced
        self._body_scope: trio.CancelScope | None = None
        #: records heard live under a member's name from another process than the one
        #: held, ignored (see _contested)
        self._records_contested = 0
        self._contested_log = Throttle(kind="cluster.contested")
        self._drop_log = Throttle(kind="cluster.drop")
        #: undecodable frames from peers (a broken or hostile peer sends them by the
        #: thousand: one line a second, each counted in inbound_dropped["malformed"])
        self._malformed_log = Throttle(kind="cluster.malformed")
        #: see _tell_after_leave
        self._tells_after_leave = 0
        #: see _tell_after_leave
        self._requests_after_leave = 0
        #: see _node_lost
        self._requests_lost_with_nodes = 0
        self._after_leave_log = Throttle(kind="cluster.after_leave")
        #: local names whose put failed (see _name_unwritten): a bucket that refuses
        #: every put failed each of 10,000 names, one line each
        self._unwritten_log = Throttle(kind="cluster.name_unwritten")
        self._data_up = trio.Event()  # set while the data connection is up
        self._data_up.set()
        #: when each connection ("data", "control") went down, while it is down (closed:
        #: for good): the leave's steps (see _unless_gone) and the ``--workers`` settle
        #: ask it whether the connection is gone
        self.connections = ConnectionWatch()
        self.durable = DurableChannel(self, options.durable)
        self._published = 0
        self._received = 0
        #: see _old_session_batch
        self._old_session_tells = 0
        self._dropped: Counter[str] = Counter()
        self._errors_replied: Counter[str] = Counter()
        self._errors_unsent: Counter[str] = Counter()
        self._disconnects = 0
        self._reconnects = 0
        self._nodes_lost = 0
        #: times each node was judged lost (None past _LOST_BY_NODE_MAX names)
        self._lost_by_node: dict[str, int] | None = {}
        self._nodes_forgotten = 0
        # the last record of each member that left the table, and the numbered tells
        # this process had sent it by then (see departed)
        self._departed: OrderedDict[str, tuple[NodeInfo, int]] = OrderedDict()
        self._closing = False
        #: what readiness() says of the join: "not joined" until the join is done,
        #: "joined", then "leaving" from when the join_cluster block is left
        self._ready_phase = "not joined"
        #: set once the data connection is closed for good: by nats-py's ``closed_cb``, or
        #: at the next seal of a batch (see _seal_batch) for a close nats-py made without
        #: its callbacks. take_tell reads it instead of the client's ``is_closed``, a
        #: property (a Python call from C: about 950 instructions, 3% of a tell sent to
        #: another kernel; docs/distributed.md, fortieth pass)
        self._data_closed = False
        #: set as this node closes its connections itself (after a leave, or a join that
        #: failed): their disconnects are no loss to warn about
        self._disconnecting = False
        #: set as the leave is announced: from then on no record of this node goes out
        #: (the others would take the node back as a member, the bucket hold it again)
        self._leave_announced = False
        #: when (Trio's clock) the leave's announcement went out, if it did: the others
        #: await this join's last notice ``last_notice_wait`` from when they heard it,
        #: so a notice sent later is of no use (see _send_last_notice)
        self._leave_heard_by: float | None = None
        #: the revision of this node's record in the nodes bucket as this node last wrote
        #: or read it: each write of the record expects it (see _write_record)
        self._record_revision = 0
        #: one write of the record at a time (a heartbeat's, announce()'s): each expects
        #: the revision the one before wrote, not the same one
        self._record_lock = trio.Lock()
        self._forwarded_in = 0
        self.placement = Placement(self)
        #: extra fields for this node's membership record (e.g. a run's phase), seen by
        #: every node in ``NodeInfo.stats`` at the next heartbeat or :meth:`announce`
        self.record_extra: dict[str, Any] = {}
        #: the heartbeat subjects' subscription (on the control connection)
        self._heartbeat_sub: Subscription | None = None
        #: set once the heartbeats pending when a loss check began are read (see
        #: _read_pending_heartbeats); None when no such read is under way
        self._heartbeats_read: trio.Event | None = None
        #: that read's asyncio task (held here: the loop keeps only a weak reference)
        self._drain_task: asyncio.Task[None] | None = None

    # --- connecting ------------------------------------------------------------------------

    @property
    def nc(self) -> NatsClient:
        """The data connection: agent messages, replies, queue groups, durable messages."""
        if self._nc is None:
            raise TransportUnavailable(f"node {self.node!r} is not connected to NATS")
        return self._nc

    @property
    def _control(self) -> NatsClient:
        if self._ctl is None:
            raise TransportUnavailable(f"node {self.node!r} is not connected to NATS")
        return self._ctl

    @property
    def js(self) -> JetStreamContext:
        """JetStream on the control connection (KV buckets: membership and names)."""
        if self._js is None:
            raise TransportUnavailable(f"node {self.node!r} is not connected to NATS")
        return self._js

    @property
    def data_js(self) -> JetStreamContext:
        """JetStream on the data connection (the durable stream)."""
        if self._data_js is None:
            raise TransportUnavailable(f"node {self.node!r} is not connected to NATS")
        return self._data_js

    async def _connect(self) -> None:
        """Open the data and the control connection.

        Two connections so that membership (heartbeats, KV watches) never waits behind a
        backlog of agent messages on one socket: a node flooded with messages must not
        look dead to the others, nor see them as dead.
        """
        self._nc = await self._open("data")
        try:
            self._ctl = await self._open("control")
        except BaseException:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await call_aio(self._nc.close)
            raise
        self._data_js = self._nc.jetstream(prefix=wire.JS_API)
        self._js = self._ctl.jetstream(prefix=wire.JS_API)

    async def _open(self, role: str) -> NatsClient:
        opts = self.options
        nc: NatsClient | None = None
        connected = False
        down = False  # between a disconnect and the reconnect: one warning, not one a try

        async def on_disconnect() -> None:
            nonlocal down
            if role == "data":
                self._disconnects += 1
                # Tells wait in the bounded outbox until the reconnect, not in the
                # client's reconnect buffer, whose overflow nobody would see.
                self._outbox.pause()
                self._data_up = trio.Event()
            self.connections.mark(role, trio.current_time())
            if not self._closing and not self._disconnecting and not down:
                log_guarded(
                    log,
                    logging.WARNING,
                    "node %s: %s connection to NATS lost; reconnecting",
                    self.node,
                    role,
                )
            down = True

        async def on_closed() -> None:
            if role == "data":
                self._data_closed = True
            self.connections.mark(role, -math.inf)  # (never back)

        async def on_reconnect() -> None:
            nonlocal down
            down = False
            self._closed_writes_said.discard(role)
            self.connections.mark(role, None)
            # the server may be another one, or the same restarted without its store
            self._buckets_to_check = True
            self.stream_caps.account.forget()  # (or one whose limits were reloaded)
            if role == "data":
                self._reconnects += 1
                if nc is not None:
                    direct.read_inline(nc)  # (nats-py read the new socket with a new reader)
                self._outbox.resume()
                self._data_up.set()
                # (JetStream's advisories sent meanwhile reached no one: see reconnected)
                self.durable.reconnected()
            url = nc.connected_url.netloc if nc is not None and nc.connected_url else "?"
            log_guarded(
                log,
                logging.WARNING,
                "node %s: %s connection to NATS back, at %s",
                self.node,
                role,
                redact(url),
            )

        # while connecting: the server's own answer (e.g. 'Authorization Violation'), and
        # the last error of any kind (a server that refuses may also reset the socket,
        # and that reset must not hide why it refused)
        answer: list[Exception] = []
        last_error: list[Exception] = []

        async def on_error(exc: Exception) -> None:
            if not connected:
                last_error[:] = [exc]
                if not answer and not isinstance(exc, _CONNECTION_ERRORS):
                    answer.append(exc)
            if not connected or down or self._closing:
                log_guarded(log, logging.DEBUG, "node %s: NATS (%s): %r", self.node, role, exc)
            else:
                log_guarded(
                    log,
                    logging.WARNING,
                    "node %s: NATS client error (%s): %r",
                    self.node,
                    role,
                    exc,
                )

        where = ", ".join(self.servers)
        # nats-py retries the *first* connect forever when reconnects are unbounded: bound
        # it to ``connect_attempts`` rounds over the servers, then restore the option.
        attempts = max(1, opts.connect_attempts)
        limit = (opts.connect_timeout + opts.reconnect_wait) * (attempts + 1) * len(self.servers)
        try:
            auth_options = self.auth.connect_options()
        except ValueError as exc:
            raise TransportUnavailable(f"cannot connect to NATS at {where}: {exc}") from None
        try:
            with (
                trio.fail_after(limit + 5),
                closed_writes_counted(functools.partial(self._closed_write, role)),
            ):
                nc = await call_aio(
                    nats.connect,
                    servers=self.servers,
                    name=f"nexus:{self.node}:{role}",
                    connect_timeout=max(1, round(opts.connect_timeout)),
                    reconnect_time_wait=opts.reconnect_wait,
                    max_reconnect_attempts=attempts,
                    allow_reconnect=True,
                    disconnected_cb=on_disconnect,
                    reconnected_cb=on_reconnect,
                    closed_cb=on_closed,
                    error_cb=on_error,
                    **auth_options,
                )
        except trio.TooSlowError:
            # the last error says why, e.g. a TLS handshake that failed on every attempt
            # (Python 3.13 verifies certificates strictly: a CA without a key identifier)
            said = f"; last error: {last_error[0]!r}" if last_error else ""
            raise TransportUnavailable(
                redact(
                    f"cannot connect to NATS at {where} ({self._auth_kind()}): "
                    f"no answer within {limit + 5:g}s{said}"
                )
            ) from None
        except Exception as exc:
            # from None: the cause's text may quote what the server was sent
            if (not_nats := _no_nats_there(answer, last_error, opts.connect_timeout)) is not None:
                said = f"; {not_nats}"
            elif answer:
                said = f"; the server said: {answer[0]!r}"
            else:
                said = f"; last error: {last_error[0]!r}" if last_error else ""
            raise TransportUnavailable(
                redact(f"cannot connect to NATS at {where} ({self._auth_kind()}): {exc!r}{said}")
            ) from None
        assert nc is not None
        nc.options["max_reconnect_attempts"] = opts.max_reconnect_attempts
        connected = True
        if role == "data":
            # a query, a reply, a batch reach the kernel in the step that read them
            direct.read_inline(nc)
        return nc

    def _closed_write(self, role: str) -> None:
        """asyncio's ``socket.send() raised exception.`` for a write of this node's
        ``role`` connection after it was lost (see :func:`._aio.closed_writes_counted`):
        counted (``closed_socket_writes``), said once a loss of that connection, in
        this node's words, not printed each."""
        self._closed_socket_writes += 1
        if role in self._closed_writes_said:
            return
        self._closed_writes_said.add(role)
        log_guarded(
            log,
            logging.WARNING,
            "node %s: %s connection to NATS lost: the client's writes to its closed socket"
            " are dropped until it reconnects (asyncio's 'socket.send() raised exception.',"
            " a line a write: counted in closed_socket_writes, not printed)",
            self.node,
            role,
        )

    def _auth_kind(self) -> str:
        """How this node authenticates, for error texts (never the secret itself)."""
        a = self.auth
        kinds = (
            ("user/password", a.user),
            ("token", a.token),
            ("creds file", a.creds_file),
            ("NKEY seed", a.nkey_seed),
        )
        kind = next((name for name, value in kinds if value is not None), "no auth")
        return f"{kind}, TLS" if a.uses_tls else kind

    async def _kv(self, bucket: str, *, ttl: float | None) -> KeyValue:
        """The KV bucket ``bucket`` (made with ``ttl`` unless it is there), its stream's
        limit of consumers lifted (see _stream_caps), when its stream was made recorded
        (``_bucket_births``). A bucket there (every join but a cluster's first) costs one
        request, its stream's info, which the lift and the birth read: nats-py's
        ``create_key_value`` (refused once the limit was lifted: another config) then
        ``key_value`` and this node's own reads made four (forty-eighth pass). A bucket
        not there costs two, its info's "not found" and its stream's make, whose answer
        carries the info (nats-py's ``create_key_value`` returns none: its stream read
        again and updated made four, forty-ninth pass)."""
        config = KeyValueConfig(bucket=bucket, ttl=ttl, replicas=self.options.kv_replicas)
        stream = KV_STREAM_TEMPLATE.format(bucket=bucket)

        async def open_bucket() -> KeyValue:
            js = self.js
            caps = self.stream_caps
            try:
                info = await caps.lift(js, await js.stream_info(stream))
            except nats.js.errors.NotFoundError:
                # made with a limit of consumers of its own (nats-py's create_key_value
                # gives none: the server's default_max_consumers caps it, see
                # _stream_caps); one made meanwhile by another node is used as it is
                info = await caps.make(js, kvops.bucket_stream(config, STREAM_MAX_CONSUMERS))
            if (info.config.max_msgs_per_subject or 0) < 1:
                raise nats.js.errors.BadBucketError  # (as nats-py's key_value)
            self._bucket_births[stream] = info.created
            self._bucket_last_seqs[stream] = info.state.last_seq or 0
            return KeyValue(
                name=bucket,
                stream=stream,
                pre=KV_PRE_TEMPLATE.format(bucket=bucket),
                js=js,
                direct=bool(info.config.allow_direct),
            )

        # A JetStream cluster that is still electing its leader answers with timeouts or
        # "unavailable" for a few seconds: retry within ``join_timeout``.
        # Said once at INFO (what is retried, for how long, and the usual cause: a server
        # started without -js gives the same answer), then at DEBUG: every retry at INFO
        # was 60 lines in the 15 s a user waited for the error that says "-js".
        deadline = trio.current_time() + self.options.join_timeout
        retries = 0
        while True:
            try:
                return await call_aio(open_bucket)
            except (nats.errors.Error, OSError) as exc:
                if trio.current_time() < deadline and isinstance(
                    exc,
                    nats.errors.TimeoutError
                    | TimeoutError
                    | nats.js.errors.ServiceUnavailableError,
                ):
                    retries += 1
                    log_guarded(
                        log,
                        logging.INFO if retries == 1 else logging.DEBUG,
                        "node %s: JetStream not ready yet (%r); retrying%s",
                        self.node,
                        exc,
                        (
                            f" for up to {self.options.join_timeout:g}s (a nats-server"
                            " started without -js answers so too)"
                            if retries == 1
                            else f" ({retries})"
                        ),
                    )
                    await trio.sleep(0.25)
                    continue
                raise TransportUnavailable(
                    redact(
                        f"NATS at {', '.join(self.servers)} has no usable JetStream for the KV"
                        f" bucket {bucket!r} (start nats-server with -js): {exc!r}"
                    )
                ) from exc

    # --- the transport interface -------------------------------------------------------------

    async def deliver(
        self, msg: Message, outside: bool = False, *, deadline: float | None = None
    ) -> None:
        """Publish ``msg`` for its remote recipient (see the module doc for guarantees).

        A tell to an agent of another kernel joins the batch of its destination process
        (see ``_batch``); it waits only while that process has ``node_window`` tells not
        yet consumed, or ``outbox_high_water`` messages wait for the NATS client, and
        then at most the kernel's send deadline: :class:`MailboxFull` (the destination
        does not keep up, as a full local mailbox) or :class:`TransportUnavailable`
        (NATS is down), the message not taken. An unknown name is looked up in KV once
        before :class:`AgentNotFound`. ``deadline`` (Trio time): that of a tell routed
        again after a wait (see below), which bounds the whole send, that lookup
        included. ``outside``: a send from outside the agents (see ``OutsideTold``).
        """
        # A message's public fields are properties (~440 instructions a read on 3.11,
        # none specialized): read once here, for the link and the encode
        fields = stored_fields(msg)
        link = self._known_link(fields[1], fields[3], fields[7])
        if link is None:
            try:
                routed = self._route(msg)
            except AgentNotFound:
                if not isinstance(msg.to, str) or msg.to.startswith(wire.TYPE_PREFIX):
                    raise
                await self._refresh_name(msg.to)
                routed = self._route(msg)
            if routed is None:
                return
            if routed[2] is not None:
                await self._deliver_alone(msg, routed, outside)
                return
            link = self._link_for(msg, routed)
        # its bytes (or its payload's JSON, for a row) before any wait: refused at once
        # if they cannot be written
        row = link.columnar and _is_row(fields)
        body = self._row_json(msg, fields) if row else self._tell_body(msg, fields)
        # (link.has_room(), written out: every tell to another kernel comes here)
        if (
            link.sent + link.tells - link.consumed >= link.window
            or len(self._outbox_queued) >= self._high_water
        ):
            if deadline is None:
                deadline = trio.current_time() + self.kernel.config.kernel.send_timeout
            # (a send from outside the agents: a shutdown's start refuses it, not taken)
            with self._refused_at_shutdown(outside):
                await self._wait_for_room(msg, link, deadline)
            # The node may have left while this tell waited (its outbox closes then, and
            # nothing would send or count it): refused, not taken.
            self._check_usable()
            if self._link_ended(link):
                # its stream started over or ended meanwhile (see _restart_streams), or its
                # node was lost (see _node_lost): routed again, as a new send would be,
                # within the same deadline, its name's lookup in KV included; past it,
                # refused as its wait would have been (nothing was taken: the tell is
                # taken with no checkpoint that raises Cancelled)
                with trio.move_on_at(deadline) as routing:
                    await self.deliver(msg, outside, deadline=deadline)
                if routing.cancelled_caught:
                    raise self._no_room(msg, link)
                return
        if row:
            sealed = self._add_row(link, msg, fields, body)
        else:
            self._published += 1
            sealed = self._add_tell(link, body)
        if sealed and trio.lowlevel.current_statistics().tasks_runnable < _SEAL_YIELD_RUNNABLE:
            # A full batch was sealed: let the asyncio side write it to the socket now
            # (the destination starts on it while this sender goes on), without raising
            # Cancelled: the message is taken. (Not yielding here was tried and undone:
            # cross-node tells -20% on a quiet machine, docs/distributed.md, thirtieth pass.)
            # Not while many tasks are runnable (see _SEAL_YIELD_RUNNABLE).
            await trio.lowlevel.cancel_shielded_checkpoint()

    def take_tell(self, msg: Message) -> int:
        """``TakesTells``: a tell whose node batch is known (see _known_link) and has
        room joins it now, as :meth:`deliver` would have it join without waiting (the
        kernel calls ``deliver`` for anything else: 0). 2 when it sealed a full batch
        and the sender should yield (see ``deliver``), 1 otherwise."""
        # _known_link and _tell_body written out (every tell of a send to another
        # kernel comes here: their two calls were 4% of the sending process), in their
        # order: a closed connection raises for a known link, an encode that fails
        # raises only for a tell that has room. row_fields: its id is drawn when its
        # block closes, with the block's other ids (encode_block); a tell that goes as a
        # single frame has it drawn below (stored_fields)
        fields = row_fields(msg)
        if (
            fields[3] is _QUERY
            or fields[7] is not None
            or self.members.version != self._links_version
        ):
            return 0  # (deliver's _known_link forgets the routes of older members)
        to = fields[1]
        # the address as the links and a block's table key it (read once for both)
        key = to.int if isinstance(to, uuid.UUID) else to
        link = self._known_links.get(key)
        if link is None:
            return 0
        # (the client's is_closed as this node learnt it: see _data_closed)
        if self._data_closed or self._closing or self._nc is None:
            self._check_usable()
        if (
            link.sent + link.tells - link.consumed >= link.window
            or len(self._outbox_queued) >= self._high_water
        ):
            return 0
        if (
            link.columnar
            and fields[6] is None
            and fields[8] is None
            and _NS_MIN <= fields[5] < _NS_MAX
        ):  # (_is_row, written out: reply_to is None here)
            try:
                json = wire.tell_payload_json(fields[2])
            except wire.UNENCODABLE as exc:
                raise self._unencodable(msg, exc) from exc
            table = link.table
            index = table.get(key)
            size = len(json) + _ROW_COST
            entry = None
            if index is None and link.rows and len(table) < _TABLE_MAX:
                # an address new to the open block: a fan-out to many agents makes
                # nearly every row of a batch one (its entry added below, as _add_row
                # adds it; a name no table holds goes there, to go as a single tell)
                try:
                    entry = wire.table_entry(to)
                except wire.UNENCODABLE as exc:
                    raise self._unencodable(msg, exc) from exc
                if entry is not None:
                    index = -1
                    size += len(entry)
            if (
                index is not None
                and link.size + size < self._batch_bytes
                and link.tells + 1 < self._batch_frames
            ):
                # _add_row, written out for a row of the open block that leaves its batch
                # open (a call a tell fewer; two where its address is new to the block)
                if entry is not None:
                    index = table[key] = len(table)
                    link.entries.append(entry)
                self._published += 1
                link.rows.append((fields, index))
                link.jsons.append(json)
                link.tells += 1
                link.size += size
                dirty = self._dirty
                if link not in dirty:  # (_want_flush)
                    dirty[link] = None
                    self._flush_wanted.set()
                return 1
            if (
                self._add_row(link, msg, fields, json)
                and trio.lowlevel.current_statistics().tasks_runnable < _SEAL_YIELD_RUNNABLE
            ):
                return 2
            return 1
        try:
            body = wire.encode_stored_tell(msg, stored_fields(msg))
        except wire.UNENCODABLE as exc:
            raise self._unencodable(msg, exc) from exc
        length = len(body)
        size = length + _FRAME_OVERHEAD
        limit = self._batch_bytes
        if size > limit and size > self._max_frame():
            raise self._too_big(msg, len(body))
        self._published += 1
        if (link.size + size > limit and link.frames) or link.rows:
            # the open batch has no room for it: sealed first; or rows wait before it
            # (see _add_tell)
            sealed = self._add_tell(link, body)
        else:
            # _add_tell, written out for a tell that fits its open batch
            frames = link.frames
            frames.append(_tell_frame_head(length + 1, _TELL))
            frames.append(body)
            tells = link.tells = link.tells + 1
            size = link.size = link.size + size
            if size >= limit or tells >= self._batch_frames:
                self._seal_batch(link)
                sealed = True
            else:
                dirty = self._dirty
                if link not in dirty:  # (_want_flush)
                    dirty[link] = None
                    self._flush_wanted.set()
                return 1
        if sealed and trio.lowlevel.current_statistics().tasks_runnable < _SEAL_YIELD_RUNNABLE:
            return 2
        return 1

    async def _deliver_alone(self, msg: Message, routed: _Routed, outside: bool) -> None:
        """A message that goes alone (a query, a reply, a message to a type)."""
        high_water = self.options.outbox_high_water
        if len(self._outbox) >= high_water:
            deadline = self.kernel.config.kernel.send_timeout
            try:
                with self._refused_at_shutdown(outside), trio.move_on_after(deadline):
                    await self._outbox.wait_below(high_water)
            except (trio.Cancelled, KernelShuttingDown):
                # its requester stopped waiting, or the shutdown refused a request from
                # outside the agents: not sent, nothing will answer it
                self._forget_outstanding(msg)
                raise
            if len(self._outbox) >= high_water:
                self._forget_outstanding(msg)
                raise TransportUnavailable(
                    f"{len(self._outbox)} messages still wait for NATS on node {self.node!r}"
                    f" after {deadline:g}s; message {msg.id} not sent"
                )
            try:
                # left while it waited (the outbox closes then): refused, not taken
                self._check_usable()
            except TransportUnavailable:
                self._forget_outstanding(msg)
                raise
        self._put_alone(msg, routed)

    def _refused_at_shutdown(self, outside: bool) -> AbstractContextManager[None]:
        """Around a wait for room: the kernel refuses one of a send from outside its
        agents when its shutdown starts (``KernelShuttingDown``, counted there), as it
        refuses such a send waiting for room in a full local mailbox; an agent's send
        waits on (see ``TransportHandle.waiting_for_room``)."""
        handle = self.handle
        return nullcontext() if handle is None else handle.waiting_for_room(outside)

    def _put_alone(self, msg: Message, routed: _Routed) -> None:
        """Hand a message that goes alone to the outbox, counted for its peer first: the
        outbox may send it at once, and a refusal then takes it back (see _not_handed)."""
        peer = routed[3]
        if isinstance(peer, int):
            self._alone_out[peer] = self._alone_out.get(peer, 0) + 1
        self._outbox.put(self._seal(msg, routed))
        self._published += 1

    def _forget_outstanding(self, msg: Message) -> None:
        if msg.kind is _QUERY:
            self._outstanding.pop(msg.id, None)

    def deliver_nowait(self, msg: Message) -> None:
        """Like :meth:`deliver` but never waits: past ``outbox_limit`` raises
        TransportUnavailable; a destination process with ``node_window`` tells not yet
        consumed raises :class:`MailboxFull` at once (as a full local mailbox does)."""
        if len(self._outbox) >= self.options.outbox_limit:
            raise TransportUnavailable(
                f"{len(self._outbox)} messages already wait for NATS on node {self.node!r}"
            )
        fields = stored_fields(msg)
        link = self._known_link(fields[1], fields[3], fields[7])
        if link is None:
            routed = self._route(msg)
            if routed is None:
                return
            if routed[2] is not None:
                self._put_alone(msg, routed)
                return
            link = self._link_for(msg, routed)
        row = link.columnar and _is_row(fields)
        body = self._row_json(msg, fields) if row else self._tell_body(msg, fields)
        if not link.has_room():
            raise self._no_room(msg, link, waited=False)
        if row:
            self._add_row(link, msg, fields, body)
        else:
            self._add_tell(link, body)
            self._published += 1

    def cancel_query(self, query_id: uuid.UUID, to: Address) -> None:
        """The requester stopped waiting: a cancel frame goes to the node the query went
        to, in its next batch, and cancels the handler there (``TransportHandle.cancel_query``).
        A query to a type (a queue group: which replica took it is unknown here) is
        cancelled on every reachable node, and here if a replica here took it; a node
        where no replica took it (yet) only marks it late. Best effort and never raises: a
        query to a node now unreachable is not cancelled; the handler then runs to its
        own deadline and a reply is dead-lettered ``late_reply`` here."""
        asked = self._outstanding.pop(query_id, None)
        if asked is None or self._closing:
            return
        node = asked[1]
        if node.startswith(wire.TYPE_PREFIX):
            self._cancel_type_query(query_id, to)
            return
        info = self.members.members.get(node)
        if info is None or not info.reachable:
            return
        self._send_cancel(node, info.id_prefix, query_id, to)

    def _send_cancel(self, node: str, id_prefix: int, query_id: uuid.UUID, to: Address) -> None:
        stream = (node, id_prefix)
        link = self._links.get(stream) or self._new_link(stream)
        link.add_cancel(query_id, to)
        self._cancels_sent += 1
        self._want_flush(link)

    def _cancel_type_query(self, query_id: uuid.UUID, to: Address) -> None:
        """Cancel query ``query_id`` to type address ``to`` wherever a replica took it: a
        frame to every other reachable node (those without it only mark it late), and
        the handler here if a replica here took it (NATS handed the query back to this
        node's own queue subscription)."""
        for node, info in list(self.members.members.items()):
            if node != self.node and info.reachable:
                self._send_cancel(node, info.id_prefix, query_id, to)
        self._cancel_taken_type_query(query_id)

    def _cancel_taken_type_query(self, query_id: uuid.UUID) -> None:
        """If a replica here took query ``query_id`` to a type, cancel its handler."""
        replica = self._type_taken.pop(query_id, None) if self._type_taken else None
        if replica is None:
            return
        self._take_route(query_id)  # nobody waits for its answer any more
        if self.handle is not None:
            self.handle.cancel_query(query_id, replica)

    def query_failed(self, query_id: uuid.UUID, error: BaseException) -> None:
        """Query ``query_id`` from a remote requester will get no answer (dead-lettered
        here, or given up by the agent that took it over: ``Kernel.fail_query``): its
        requester gets ``error`` in an error frame, if the query came with a reply
        subject this node still remembers (counted in ``errors_replied``)."""
        reply, _ = self._take_route(query_id)
        if reply is not None:
            self._publish_error(reply, error)

    def query_given_up(self, query_id: uuid.UUID, error: BaseException) -> None:
        """The agent that took query ``query_id`` over cannot answer it
        (``Kernel.fail_query``, after :meth:`query_failed`): a durable message's delivery
        failed, nakked at once (see DurableChannel.given_up)."""
        self.durable.given_up(query_id, error)

    def _take_route(self, query_id: uuid.UUID) -> tuple[str | None, bool]:
        """Forget the requester on another node of query ``query_id``: the reply subject
        it gave (None if none is kept), and whether it asked in the kernel's JSON form."""
        subject = self._reply_routes.pop(query_id, None)
        if self._type_taken:
            self._type_taken.pop(query_id, None)
        return subject, bool(self._json_requests and self._json_requests.pop(query_id, 0))

    # --- node batches (sending side; see _batch) ----------------------------------------------

    def _known_link(
        self, to: Address, kind: MessageKind, reply_to: uuid.UUID | None
    ) -> batch.NodeLink | None:
        """The node batch an earlier tell to ``to`` joined, if nothing that decides where
        it leads changed since (membership, names: see _link_for); None for anything but
        a tell (``kind`` and ``reply_to`` of the message), and for an address not routed
        yet."""
        if kind is _QUERY or reply_to is not None:
            return None
        version = self.members.version
        if version != self._links_version:
            self._known_links.clear()
            self._links_version = version
        link = self._known_links.get(to.int if isinstance(to, uuid.UUID) else to)
        if link is not None:
            # what _route checks first, for every message (_check_usable's test, written
            # out: it raises there)
            nc = self._nc
            if nc is None or nc.is_closed or self._closing:
                self._check_usable()
        return link

    def _link_for(self, msg: Message, routed: _Routed) -> batch.NodeLink:
        """The node batch of a tell that _route routed; kept for the next tells to the
        same address (routing a tell costs about as much as encoding it). The cache is
        emptied when the members change (a version of the table) and past
        _KNOWN_LINKS_MAX addresses; a name's own route is dropped when the name is
        learnt, moved or dropped (_set_name), and the routes to a link when it is
        (_drop_link)."""
        stream = routed[3]
        assert isinstance(stream, tuple)
        link = self._links.get(stream) or self._new_link(stream)
        to = msg.to
        if isinstance(to, uuid.UUID) or len(to) <= wire.NAME_CACHE_BYTES:  # (see there)
            known = self._known_links
            if len(known) >= _KNOWN_LINKS_MAX:
                known.clear()
            known[to.int if isinstance(to, uuid.UUID) else to] = link
        return link

    def _set_name(self, name: str, entry: tuple[str, uuid.UUID] | None) -> None:
        """Where ``name`` runs as this node knows it (None: nowhere known). The one way
        ``_names`` changes: a name learnt, moved or dropped sends its next tell the long
        way again (see _link_for); an entry written again as it was (a placement answer,
        the bucket's watch heard again) keeps its route, and no other address's route
        goes through the name (an id's route is its node's, a type's is never kept)."""
        names = self._names
        if entry is None:
            if names.pop(name, None) is None:
                return
        elif names.get(name) == entry:
            return
        else:
            names[name] = entry
        self._name_types.pop(name, None)
        self._known_links.pop(name, None)

    def _drop_link(self, stream: _Stream) -> None:
        """Forget the link of ``stream`` and the tells' routes that lead to it (those of
        the addresses on its node's process: the routes kept to every other link stay;
        each value of ``_known_links`` is a link of ``_links``); a sender waiting for its
        credit, which can no longer come, is woken to route its tell again (see
        deliver)."""
        link = self._links.pop(stream, None)
        if link is not None:
            known = self._known_links
            for key in [key for key, kept in known.items() if kept is link]:
                del known[key]
            link.wake_waiters()

    def _restart_streams(self, node: str, ended: NodeInfo | None = None) -> None:
        """``node`` left, or joined again: its next join numbers the tells it gets from
        1 (a new ``_seq_in``), so the streams to it start over, with new links, now; not
        at the next heartbeat (see _send_sequence_marks), by which time the same process
        may have joined again and counted every tell of the old join lost.

        The tells still in an old link's open batch are not sent: numbered on the old
        stream, they would be miscounted by a new join, and a node that left takes
        nothing; counted here (``publish_failures``). Credit due the other way moves to
        the new link (a new join's checks ignore an old join's credit). A sender waiting
        for an old link's credit is woken (see _drop_link) and routes its tell again.

        ``ended``: the join that ended (not counted lost already): what was numbered for
        it and not confirmed is kept until its last notice says what it took (see
        _on_last_notice), or is counted once the notice is late (_count_late_notices)."""
        for stream in [key for key in self._links if key[0] == node]:
            link = self._links[stream]
            if (
                ended is not None
                and ended.session is not None
                and ended.id_prefix == stream[1]
                and link.sent
            ):
                confirmed = max(link.consumed, ended.confirmed(self.stream_name))
                self._await_notice((node, ended.id_prefix, ended.session), link.sent, confirmed)
            self._dirty.pop(link, None)
            self._drop_link(stream)
            self._seq_out.pop(stream, None)
            self._seq_marked.pop(stream, None)
            if link.tells:
                self._publish_failures += link.tells
                log_guarded(
                    log,
                    logging.WARNING,
                    "node %s: %d tells for node %r not sent: it left or joined again"
                    " (counted in publish_failures)",
                    self.node,
                    link.tells,
                    node,
                )
            if link.credit_due is not None:
                fresh = self._new_link(stream)
                fresh.credit_due = link.credit_due
                self._want_flush(fresh)

    def _await_notice(self, join: tuple[str, int, int], sent: int, confirmed: int) -> None:
        """Keep what was numbered for ``join`` (node, id prefix, session), which left, until
        its last notice comes or is late; nothing if it confirmed all of it. Past
        _LEFT_STREAMS_MAX joins awaited, the oldest is counted as late."""
        if sent <= confirmed:
            return
        left = self._left_streams
        left[join] = _LeftStream(sent, confirmed, monotonic() + self.options.last_notice_wait)
        left.move_to_end(join)
        if len(left) > _LEFT_STREAMS_MAX:
            oldest, stream = left.popitem(last=False)
            self._count_unconfirmed(
                oldest, stream, f"{_LEFT_STREAMS_MAX} later leaves await their last notice"
            )

    def _count_late_notices(self, now: float) -> None:
        """Count the joins whose last notice is late at ``now`` (monotonic; every
        _check_members, and at this node's leave): the notice may be lost (core NATS, e.g.
        in a failover) and nothing else will count what the join did not confirm, so it
        is counted as lost at leave, an upper bound (what the join took after it last
        confirmed is counted there too). A notice that comes later counts nothing."""
        left = self._left_streams
        while left:
            join, stream = next(iter(left.items()))
            if stream.due > now:
                break
            del left[join]
            self._count_unconfirmed(join, stream, "its last notice did not come")
        self._notice_settled()

    def _count_unconfirmed(self, join: tuple[str, int, int], stream: _LeftStream, why: str) -> None:
        lost = stream.sent - stream.confirmed
        self._lost_at_leave += lost
        self._counted_at_leave(join)
        log_guarded(
            log,
            logging.WARNING,
            "node %s: counted %d tells for node %r as lost at leave: %s (numbered up to %d,"
            " it confirmed up to %d; an upper bound)",
            self.node,
            lost,
            join[0],
            why,
            stream.sent,
            stream.confirmed,
        )

    def _counted_at_leave(self, join: tuple[str, int, int]) -> None:
        counted = self._left_counted
        counted[join] = None
        if len(counted) > _LEFT_STREAMS_MAX:
            counted.popitem(last=False)

    def _notice_settled(self) -> None:
        """Wake a leave waiting for the last notices, once none is awaited."""
        if not self._left_streams and self._notices_in is not None:
            self._notices_in.set()

    def _left_credit(self, head: batch.BatchHead, consumed: int) -> None:
        """Credit from a join that left (it comes on the data connection, the leave on the
        control one): what it confirms need not be counted if its last notice is lost."""
        join = (head.node, head.sender_prefix, head.session)
        stream = self._left_streams.get(join)
        if stream is not None and consumed > stream.confirmed:
            stream.confirmed = min(consumed, stream.sent)
            if stream.confirmed == stream.sent:
                del self._left_streams[join]
                self._notice_settled()

    def _new_link(self, stream: _Stream) -> batch.NodeLink:
        """A link to process ``stream``: columnar (NXB3) if the record of that process, as
        the member table holds it, lists NXB3 (a rejoin with another record gets a new
        link, see _restart_streams), NXB2 otherwise; one made before that record came
        (the link that returns credit for a batch that came first) turns NXB3 at its
        next batch once the record comes (_apply_member_entry, NodeLink.read_columnar_next)."""
        info = self.members.members.get(stream[0])
        columnar = (
            info is not None and info.id_prefix == stream[1] and info.reads_batches(batch.COLUMNAR)
        )
        link = self._links[stream] = batch.NodeLink(
            stream[0], stream[1], self.options.node_window, columnar
        )
        return link

    def _tell_body(self, msg: Message, fields: tuple[Any, ...]) -> bytes:
        """The encoded tell ``msg`` (its ``stored_fields``: ``fields``)."""
        try:
            body = wire.encode_stored_tell(msg, fields)
        except wire.UNENCODABLE as exc:
            # refused before it joins a batch: the others there go on
            raise self._unencodable(msg, exc) from exc
        size = len(body) + _FRAME_OVERHEAD
        # the second test only for a big one: a tell that fits a batch fits NATS
        if size > self._batch_bytes and size > self._max_frame():
            raise self._too_big(msg, len(body))
        return body

    def _too_big(self, msg: Message, size: int) -> TransportUnavailable:
        return TransportUnavailable(
            f"message {msg.id} to {msg.to} is {size} bytes encoded: more than"
            f" NATS accepts in one message (max_payload {self.max_payload()} bytes)"
        )

    def max_payload(self) -> int:
        """The most bytes NATS takes in one message, headers included (the server's
        ``max_payload``; 1 MiB, its default, before the connection tells)."""
        nc = self._nc
        return nc.max_payload if nc is not None and nc.max_payload else 1 << 20

    def _max_frame(self) -> int:
        return batch.batch_limit(self.max_payload(), self.node, self.max_payload())

    def _add_tell(self, link: batch.NodeLink, body: bytes) -> bool:
        """Put a tell in its link's batch; seal the batch when it is full (a frame that
        does not fit in the open batch goes in the next one, alone if need be). True if
        a batch was sealed."""
        limit = self._batch_bytes
        sealed = False
        size = len(body)
        if link.size + size + _FRAME_OVERHEAD > limit and (link.frames or link.rows):
            self._seal_batch(link)
            sealed = True
        if link.rows:
            link.close_rows()  # a single tell after rows: in order, after their block
        # link.add_tell(body), written out: every tell to another kernel comes here
        frames = link.frames
        frames.append(_tell_frame_head(size + 1, _TELL))
        frames.append(body)
        return self._grown(link, size + _FRAME_OVERHEAD, sealed)

    def _grown(self, link: batch.NodeLink, size: int, sealed: bool) -> bool:
        """A tell of ``size`` bytes joined ``link``'s open batch (``sealed``: one was
        sealed before it): count it, seal the batch if it is full now, else want it
        flushed. True if a batch was sealed."""
        tells = link.tells = link.tells + 1
        size = link.size = link.size + size
        if size >= self._batch_bytes or tells >= self._batch_frames:
            self._seal_batch(link)
            return True
        # _want_flush, inline: every tell to another kernel comes here
        dirty = self._dirty
        if link not in dirty:
            dirty[link] = None
            self._flush_wanted.set()
        return sealed

    def _row_json(self, msg: Message, fields: tuple[Any, ...]) -> bytes:
        """The payload's JSON of a tell that goes as a row (see _add_row)."""
        try:
            return wire.tell_payload_json(fields[2])
        except wire.UNENCODABLE as exc:
            raise self._unencodable(msg, exc) from exc

    def _add_row(
        self, link: batch.NodeLink, msg: Message, fields: tuple[Any, ...], json: bytes
    ) -> bool:
        """Put a tell (``_is_row``, its payload's JSON ``json``) in its columnar link's
        open block of rows, counted published; seal the batch when it is full, as
        :meth:`_add_tell` does (one that does not fit goes in the next batch). Its head
        is packed with the block's other rows at the block's close (``close_rows``). An
        address the block's table cannot hold (a name past 64 KiB, a table full) goes as
        a single tell, in order. True if a batch was sealed."""
        to = fields[1]
        key = to if to.__class__ is str else to.int
        table = link.table
        index = table.get(key)
        size = len(json) + _ROW_COST
        if index is None:
            try:
                entry = wire.table_entry(to)
            except wire.UNENCODABLE as exc:
                raise self._unencodable(msg, exc) from exc
            if entry is None or len(table) >= _TABLE_MAX:
                # (drawn now: take_tell's fields leave the id to the block's close)
                body = self._tell_body(msg, stored_fields(msg))
                self._published += 1
                return self._add_tell(link, body)
            size += len(entry)
        else:
            entry = None
        if not link.rows:
            size += _BLOCK_COST
        limit = self._batch_bytes
        if size > limit and size > self._max_frame():
            raise self._too_big(msg, size)
        self._published += 1
        sealed = False
        if link.size + size > limit and (link.frames or link.rows):
            self._seal_batch(link)
            sealed = True
            if entry is None:
                entry = wire.table_entry(to)
                assert entry is not None  # (it was in the table)
            # a new block (and table) in the new batch
            size = len(json) + _ROW_COST + len(entry) + _BLOCK_COST
            table = link.table
            index = None
        if index is None:
            index = table[key] = len(table)
            link.entries.append(entry)  # type: ignore[arg-type]
        link.rows.append((fields, index))
        link.jsons.append(json)
        return self._grown(link, size, sealed)

    def _want_flush(self, link: batch.NodeLink) -> None:
        # A link already dirty was flagged since the last flush (which empties _dirty
        # right after it takes a new event): each tell of a burst need not set it again.
        if link not in self._dirty:
            self._dirty[link] = None
            self._flush_wanted.set()

    def _seal_batch(self, link: batch.NodeLink) -> None:
        """Hand ``link``'s open batch to the outbox (numbering its tells now, so that a
        sequence mark never names a number still waiting here)."""
        if not self._data_closed:
            # once a batch, what take_tell does not ask each tell (see _data_closed)
            nc = self._nc
            self._data_closed = nc is not None and nc.is_closed
        body, tells = link.seal(self._node_bytes, self.id_prefix, self._session)
        if tells:
            self._seq_out[(link.node, link.dest_prefix)] = link.sent
        # to the join of its destination process that the member table holds (its
        # session): a later join of that process never takes it (see _on_other_batch)
        info = self.members.members.get(link.node)
        session = info.session if info is not None and info.id_prefix == link.dest_prefix else None
        out = (wire.batch_subject(self.prefix, link.node, session), "", None, body, _BATCH)
        if not self._outbox.put(out):
            # Sealed after the leave closed the outbox: its tells are numbered, but no
            # later number or mark will show the receiver the gap; counted here.
            self._publish_refused(out, ConnectionError("the node left the cluster"), leaving=True)
            return
        self._batches_published += 1

    def _flush_pending(self) -> None:
        """Seal every open batch (in the order the links got their first frame).

        One of 1 to ``AT_ONCE_TELLS`` tells (a ring's few tokens in flight, a lone send)
        is written to the socket at once when nothing waits for nats-py's flusher task
        (``direct.publish_at_once``: behind what nats-py's buffer holds), without that
        task's turn: an asyncio callback, a task step and a scheduler round of the eight
        task steps and five rounds such a batch cost each worker. A bigger one goes
        through nats-py's buffer as before: the turn is shared by its tells, and the
        flusher joins the batches of a turn into one write. So does one of control
        frames alone (credit, cancels), whose timing this change leaves as it was."""
        dirty, self._dirty = self._dirty, {}
        try:
            for link in dirty:
                if link.pending:
                    self._write_now = 0 < link.tells <= AT_ONCE_TELLS
                    self._seal_batch(link)
        finally:
            self._write_now = False

    async def _flush_batches(self) -> None:
        """Trio side: seal the open batches one scheduler tick after the first frame of a
        burst: a lone tell waits for no timer, and the tells of a burst share a batch."""
        while True:
            await self._flush_wanted.wait()
            # one yield: the tasks that are ready now add their frames first
            await trio.lowlevel.cancel_shielded_checkpoint()
            self._flush_wanted = trio.Event()
            self._flush_pending()

    async def _wait_for_room(self, msg: Message, link: batch.NodeLink, deadline: float) -> None:
        """Wait until ``link`` has room and the outbox is below its high water, until
        ``deadline`` at most (then raise, see _no_room). Returns early, without room, once
        the link ended (see _link_ended: both wake its waiters): credit no longer comes
        to it, and the caller routes the tell again."""
        high_water = self.options.outbox_high_water
        with trio.move_on_at(deadline):
            while not link.has_room() or len(self._outbox) >= high_water:
                if not link.has_room():
                    await link.wait_for_room()
                    if self._link_ended(link):
                        return
                else:
                    await self._outbox.wait_below(high_water)
            return
        raise self._no_room(msg, link)

    def _link_ended(self, link: batch.NodeLink) -> bool:
        """``link`` no longer leads where its tells go: dropped (its stream started over
        or ended: credit finds the links in _links), or its node lost (no credit comes)."""
        if self._links.get((link.node, link.dest_prefix)) is not link:
            return True
        info = self.members.members.get(link.node)
        return info is None or not info.reachable

    def _no_room(self, msg: Message, link: batch.NodeLink, waited: bool = True) -> NexusError:
        """What a tell refused for lack of room says: NATS down, or the destination
        process not keeping up (``MailboxFull`` with the node window as capacity, saying
        that its node's credit ran out, not its mailbox: ``detail``). ``waited``: the
        send waited its deadline (not ``send_nowait``)."""
        waiting = len(self._outbox)
        if self._outbox.paused or waiting >= self.options.outbox_high_water:
            return TransportUnavailable(
                f"{waiting} messages wait for NATS on node {self.node!r} (connection"
                f" {'down' if self._outbox.paused else 'slow'}); message {msg.id} not sent"
            )
        try:
            _, agent_id = self.resolve(msg.to)
        except (AgentNotFound, TransportUnavailable) as exc:
            return exc
        name = msg.to if isinstance(msg.to, str) else None
        when = f"within {self.kernel.config.kernel.send_timeout:g}s" if waited else "(send_nowait)"
        return MailboxFull(
            agent_id,
            name,
            link.window,
            msg.id,
            detail=(
                f"no credit from node {link.node!r} {when}: node {self.node!r} has its whole"
                f" window of {link.window} tells (ClusterOptions.node_window) there, not yet"
                " taken in: that node's agents do not keep up (this one's mailbox may have"
                " room); send again later, send less (or by request), or raise node_window"
            ),
        )

    def _seal(self, msg: Message, routed: _Routed) -> _Outgoing:
        """The outgoing item of a message that goes alone (a query, a reply, a message
        to a type). Open batches are sealed first: a query or reply never overtakes a
        tell sent before it."""
        subject, reply, data, _ = routed
        assert data is not None
        if self._dirty:
            self._flush_pending()
        return subject, reply, self._relaying, data, _PLAIN

    def _check_usable(self) -> None:
        nc = self._nc
        if nc is None or nc.is_closed or self._closing:
            raise TransportUnavailable(
                redact(
                    f"node {self.node!r} has no NATS connection (servers {', '.join(self.servers)})"
                )
            )

    def _route(self, msg: Message) -> _Routed | None:
        """Where ``msg`` goes on NATS; None if it was consumed here (a durable ack)."""
        self._check_usable()
        reply_to = msg.reply_to
        if reply_to is not None:
            subject, json_form = self._take_route(reply_to)
            if subject is not None:
                try:
                    # asked in the kernel's JSON wire form (e.g. by a non-Python client), or
                    # to the node whose reply subject it is (the query came from it)
                    data = msg.to_json().encode() if json_form else wire.encode_message(msg)
                except wire.UNENCODABLE as exc:
                    raise self._unencodable_reply(msg, reply_to, subject, exc) from exc
                relaying = self._relaying
                # An answer NATS cannot carry in one message: the client would refuse it as
                # it is written, counted, and its requester would wait out its timeout.
                # Passed on, it goes with a header, which NATS counts too (see
                # _publish_one).
                size = len(data) if relaying is None else len(data) + wire.header_bytes(relaying)
                if size > self.max_payload():
                    with_header = (
                        "" if relaying is None else f" with its {wire.RELAYED_HEADER} header"
                    )
                    too_big = ValueError(
                        f"the answer is {size} bytes{with_header}: more than NATS accepts in"
                        f" one message (max_payload {self.max_payload()} bytes)"
                    )
                    raise self._unencodable_reply(msg, reply_to, subject, too_big)
                if json_form:
                    return subject, "", data, None
                return subject, "", data, self._peer_of(subject, reply_to.int >> 64)
            if self.durable.completed(reply_to):
                return None
        to = msg.to
        peer: int | None = None
        if isinstance(to, str) and to.startswith(wire.TYPE_PREFIX):
            type_name = to[len(wire.TYPE_PREFIX) :]
            if not wire.is_type_name(type_name):
                # No replica can serve it (serve_type refuses such a name, as does
                # type_address): refused at once, as an address no node has. Published,
                # "a.b" or ">" went out as a subject of its own (a tell then counted
                # no_replica; ">" a wildcard subject) and "a b" was refused by the NATS
                # client as it was written (counted and logged as a failure of NATS; a
                # request failed TransportUnavailable).
                raise AgentNotFound(
                    to,
                    detail=f"no node serves type {brief(type_name, 60)}: an agent type is"
                    f" letters, digits, '-' or '_', at most {wire.TYPE_NAME_MAX} characters"
                    " (serve_type and type_address take no other)",
                )
            subject = wire.type_subject(self.prefix, type_name)
            node = f"type:{type_name}"
            if msg.kind is _QUERY:
                self._remember(self._type_queries, msg.id, True)
            else:
                try:
                    data = wire.encode_message(msg)
                except wire.UNENCODABLE as exc:
                    raise self._unencodable(msg, exc) from exc
                self._remember(self._type_tells, msg.id, True)
                return subject, wire.reply_subject(self.prefix, self.node, msg.id), data, None
        else:
            node, agent_id = self.resolve(to)
            if msg.kind is not _QUERY:
                # A tell goes in the node's batch (no subject of its own), numbered so
                # that its loss in transit is counted (a lost query needs no number:
                # its requester gets RequestTimeout).
                return "", "", None, (node, self.members.members[node].id_prefix)
            subject = wire.agent_subject(self.prefix, node, agent_id)
            peer = self.members.members[node].id_prefix  # (resolve found the member)
        try:
            data = wire.encode_message(msg)
        except wire.UNENCODABLE as exc:
            raise self._unencodable(msg, exc) from exc
        if msg.kind is _QUERY:
            # A query goes alone, on the agent's subject: NATS answers "no responders"
            # at once when the node is gone, and a single request waits for no batch.
            reply = wire.reply_subject(self.prefix, self.node, msg.id)
            self._remember(self._outstanding, msg.id, (to, node))
            return subject, reply, data, peer
        return subject, "", data, None

    def _unencodable_reply(
        self, msg: Message, query_id: uuid.UUID, reply: str, exc: Exception
    ) -> MessageFailed:
        """A reply its wire form cannot carry (not JSON, nested too deeply, a time
        outside the years 1 to 9999 for the JSON form): its requester gets the error
        instead, and the reply is failed as a process agent fails a message it cannot
        write (the kernel dead-letters it, ``unserialisable``)."""
        self._publish_error(reply, RequestFailed(query_id, msg.sender, "unserialisable", exc))
        return wire.unencodable_failure(f"reply {msg.id} to request {query_id}", exc)

    def _unencodable(self, msg: Message, exc: Exception) -> MessageFailed:
        """A message for another node that its wire form cannot carry (a payload that
        is not JSON or nested too deeply): not sent. The kernel dead-letters a handler's
        message so (``unserialisable``); a caller's send raises instead (see
        ``Router.send``). The requester of a query that came from another node gets the
        error frame now (a requester here gets the dead letter's RequestFailed)."""
        if msg.kind is _QUERY:
            if self._type_queries:
                self._type_queries.pop(msg.id, None)
            self.query_failed(msg.id, RequestFailed(msg.id, msg.to, "unserialisable", exc))
        return wire.unencodable_failure(f"message {msg.id} to {msg.to}", exc)

    def resolve(self, address: Address) -> tuple[str, uuid.UUID]:
        """The node and agent id behind a remote ``address`` (an id or a name).

        :class:`AgentNotFound` if no node has it; :class:`TransportUnavailable` if its
        node is unreachable.
        """
        if isinstance(address, uuid.UUID):
            info = self.members.node_of(address)
            if info is None or info.node == self.node:
                raise AgentNotFound(address)
            node, agent_id = info.node, address
        else:
            entry = self._names.get(address)
            if entry is None or entry[0] == self.node:
                raise AgentNotFound(address)
            node, agent_id = entry
            info = self.members.members.get(node)
            if info is None:
                raise AgentNotFound(address)
        if not info.reachable:
            raise TransportUnavailable(
                f"node {node!r} hosting {address} is unreachable"
                f" (no heartbeat for {monotonic() - info.last_seen:.1f}s)"
            )
        return node, agent_id

    @staticmethod
    def _remember(table: OrderedDict[uuid.UUID, Any], key: uuid.UUID, value: Any) -> None:
        table[key] = value
        if len(table) > _ROUTE_MEMORY:
            table.popitem(last=False)

    def _publish_one(self, out: _Outgoing) -> Coroutine[Any, Any, None]:
        subject, reply, headers, data, kind = out
        nc = self.nc
        # a message that goes alone (a query, a reply), and a small batch the flusher
        # seals at its tick (see _flush_pending), wait for no flusher task of nats-py
        if headers is None:
            if (kind == _PLAIN or (kind == _BATCH and self._write_now)) and direct.publish_at_once(
                nc, subject, reply, data
            ):
                return _written()
        elif len(data) + wire.header_bytes(headers) > self.max_payload():
            # nats-py checks the body alone: the server would close the connection, and
            # nats-py then closes it for good (every later send failing). Refused here
            # as nats-py refuses a body over the limit (see _publish_refused)
            return _refused(nats.errors.MaxPayloadError())
        return nc.publish(subject, data, reply=reply, headers=headers)

    def _publish_refused(self, out: _Outgoing, exc: Exception, *, leaving: bool = False) -> None:
        """The NATS client refused ``out`` (or the node leaves with it unsent): count it
        once, and fail it at once if it was a query.

        A numbered tell is counted by its receiver (the gap shows at the next number or
        mark), except when this node leaves with it: nothing comes after it then. An error
        frame was counted in ``errors_replied`` as it went into the outbox: not sent after
        all, it moves to ``errors_unsent`` (its query is counted once, not here too).
        """
        subject, reply, headers, data, kind = out
        if headers is not None and wire.ERROR_HEADER in headers:
            if wire.RELAYED_HEADER in headers:
                self._relay_not_sent(subject, repr(exc))
            else:
                self._error_not_sent(headers[wire.ERROR_HEADER], subject, repr(exc))
            return
        if kind == _BATCH:
            # Its tells are numbered: the receiver counts the gap, unless this node
            # leaves now (no later number or mark will show it), or leaves before its
            # connection is back (see _refused_batches).
            if leaving:
                self._unsent_at_leave(subject, data)
            elif isinstance(exc, _NOT_CONNECTED):
                self._refused_batches.append((subject, data[: batch.parse_head(data)[1]]))
            return
        if kind == _MARK or (kind == _NUMBERED and not leaving):
            return
        self._publish_failures += 1
        if (headers is None or wire.RELAYED_HEADER in headers) and data[:1] != b"{":
            self._not_handed(subject)  # (an answer passed on too: error frames returned)
        if reply:
            query_id = self._reply_query_id(reply.rsplit(".", 1)[-1])
            if query_id is not None and self._type_queries:
                self._type_queries.pop(query_id, None)
            if query_id is not None and self._outstanding.pop(query_id, None) is not None:
                self._fail_request(
                    query_id,
                    TransportUnavailable(redact(f"NATS refused request {query_id}: {exc!r}")),
                )
        if self.held.due(
            self._loss_log, "messages the NATS client refused", counted="publish_failures"
        ):
            log_guarded(
                log,
                logging.WARNING,
                "node %s: the NATS client refused a message for %s (%d so far): %r",
                self.node,
                subject,
                self._publish_failures,
                exc,
            )

    def _unsent_at_leave(self, subject: str, data: bytes) -> None:
        """This node leaves with batch ``data`` (for ``subject``) unsent: its tells are
        counted here (``publish_failures``) and taken off what was numbered for their
        destination's join, so that its last notice, or what it did not confirm, does not
        count them again in ``lost_at_leave``: nothing is sent after them on that stream
        (the leave's unsent batches are the last of each). Counted nowhere here if that
        join's notice (or its lateness) counted them already, nor those numbered before
        that join was judged lost (``lost_with_nodes`` counted them, see _node_lost)."""
        head = batch.parse_head(data)[0]
        numbered, dest_prefix = head.numbered, head.dest_prefix
        if not numbered:
            return
        node, session = wire.batch_destination(self.prefix, subject)
        # numbered before its destination was judged lost: in lost_with_nodes already
        at_loss = self._lost_numbered.get((node, dest_prefix, session), 0)
        uncounted = numbered - max(0, min(at_loss - head.first + 1, numbered))
        if session is not None:
            join = (node, dest_prefix, session)
            if join in self._left_counted:
                return  # in lost_at_leave already (see _on_last_notice)
            stream = self._left_streams.get(join)
            if stream is not None:
                stream.sent -= numbered
                if stream.sent <= stream.confirmed:
                    del self._left_streams[join]
                    self._notice_settled()
        key = (node, dest_prefix)
        link = self._links.get(key)
        info = self.members.members.get(node)
        if link is not None and info is not None and info.session == session:
            link.sent -= numbered  # (the next seal, refused too, numbers from there)
            if key in self._seq_out:
                self._seq_out[key] = link.sent
        self._publish_failures += uncounted

    def _take_client_buffer(self) -> list[_Outgoing]:
        """Leaving with the connection down: the messages the NATS client still holds
        unwritten, taken out of it (see ``direct.take_unsent``) as the outbox items they
        were, to be counted as what the outbox still holds is. Not what the durable
        channel published (JetStream's own subjects, ``<prefix>.durable.``): its senders
        learn of that; but its acks, naks and terms (``$JS.ACK.``), which it counted
        sent once the client took them, are counted unsettled by it (JetStream delivers
        their messages again). If the buffer cannot be read, its size is logged (not
        counted)."""
        nc = self.nc
        size = nc.pending_data_size
        taken = direct.take_unsent(nc)
        if taken is None:
            if size:
                log_guarded(
                    log,
                    logging.ERROR,
                    "node %s: leaving with the NATS connection down: %d bytes of messages"
                    " in the client's reconnect buffer are lost (not counted: the buffer"
                    " cannot be read)",
                    self.node,
                    size,
                )
            return []
        prefix, durable = f"{self.prefix}.node.", f"{self.prefix}.durable."
        items: list[_Outgoing] = []
        settles: list[str] = []
        for subject, reply, headers, data in taken:
            if subject.startswith(_JS_ACK):
                # an ack, nak or term the durable channel counted sent (the client took
                # it); an in-progress report settles nothing
                if data != _IN_PROGRESS:
                    settles.append(subject)
                continue
            if subject.startswith(("$JS.", durable)):
                continue
            kind = _PLAIN
            if subject.startswith(prefix):
                what = subject[len(prefix) :].split(".")[1:2]
                kind = _BATCH if what == ["batch"] else _MARK if what == ["seq"] else _PLAIN
            items.append((subject, reply, headers, data, kind))
        if items:
            log_guarded(
                log,
                logging.ERROR,
                "node %s: leaving with the NATS connection down: %d messages (%d bytes) in"
                " the client's reconnect buffer not sent, counted as those queued",
                self.node,
                len(items),
                size,
            )
        if settles:
            self.durable.unsent_in_client(settles)
        return items

    def _not_handed(self, subject: str) -> None:
        """A query or reply that the NATS client refused is counted lost here
        (``publish_failures``), not handed to its peer: taken back from the per-peer
        count. Its subject names the peer as it did when it was counted (see _peer_of;
        the last token is the agent's id, a query, or the query's, a reply); a type's
        subject was not counted."""
        try:
            made_by = uuid.UUID(subject.rsplit(".", 1)[-1]).int >> 64
        except ValueError:
            return
        peer = self._peer_of(subject, made_by)
        count = self._alone_out.get(peer, 0)
        if count:
            self._alone_out[peer] = count - 1

    def _peer_of(self, subject: str, made_by: int) -> int:
        """The peer process at the other end of a query or reply on ``subject`` (see
        ``_alone_out``): the id prefix of the member whose subject it is
        (``<prefix>.node.<node>.``: its agents', its replies'); ``made_by``, the process
        a message's id names, for another subject (a plain NATS client's inbox) or a
        node that is no member."""
        nodes = self._nodes_subject_prefix
        if subject.startswith(nodes):
            info = self.members.members.get(subject[len(nodes) :].partition(".")[0])
            if info is not None:
                return info.id_prefix
        return made_by

    def _publish_error(self, reply: str, exc: BaseException) -> None:
        """Answer a remote requester with the error its query ran into. Counted in
        ``errors_replied`` once the frame is in the outbox; made after the leave closed
        it (a query refused before the disconnect, a dead letter the follower still
        sees), it goes nowhere: counted in ``errors_unsent``, and its requester, which
        nothing answers, gets ``RequestTimeout`` at its deadline. One the NATS client
        refuses, or that the leave throws away with the connection down, moves from
        ``errors_replied`` to ``errors_unsent`` (see _publish_refused): each frame is
        counted once."""
        kind, body = wire.error_frame(exc)
        headers = {wire.ERROR_HEADER: kind, wire.NODE_HEADER: self.node}
        # counted first: the outbox may send it at once, and a refusal then moves it
        self._errors_replied[kind] += 1
        if not self._outbox.put((reply, "", headers, body, _PLAIN)):
            self._error_not_sent(kind, reply, "the node left the cluster")

    def _error_not_sent(self, kind: str, reply: str, why: str, *, replied: bool = True) -> None:
        """An error frame counted in ``errors_replied`` (``replied``) did not go: counted
        in ``errors_unsent`` instead."""
        if replied:
            counted = self._errors_replied
            counted[kind] -= 1
            if counted[kind] <= 0:
                del counted[kind]
        self._errors_unsent[kind] += 1
        if log.isEnabledFor(logging.INFO):
            log_guarded(
                log,
                logging.INFO,
                "node %s: error frame (%s) for %s not sent: %s (counted in errors_unsent)",
                self.node,
                kind,
                reply,
                why,
            )

    # --- inbound -----------------------------------------------------------------------------

    async def _on_node_message(self, m: NatsMsg) -> None:
        # what the subscription's task calls (messages that did not go inline)
        self._take_node_message(m)

    _on_type_message = _on_node_message

    def _take_node_message(self, m: NatsMsg) -> None:
        """asyncio side: a NATS message for this node or for one of its agent types,
        taken inline where nats-py parses it (see ``_direct``); it must never suspend.

        trio-asyncio runs this callback inside a Trio task of the same thread, so the
        kernel's non-blocking calls are safe here: the common case (room in the mailbox,
        or the reply to a request of this node) is delivered at once, with no hop to
        another task. What has to wait goes to the Trio pump, which keeps the order.
        """
        subject = m.subject
        if subject == self._join_batch_subject:
            self._on_batch(m.data)
            return
        if subject.startswith(self._batch_subject):
            self._on_other_batch(subject, m.data)
            return
        self._received += 1
        if self._successors and self._for_successor(subject):
            return
        data = m.data
        if data[:4] == wire.NUMBERED_PREFIX:
            end = data.find(b'"', 4)
            self._check_sequence(data[4:end].decode(errors="replace"), is_mark=False)
        elif subject.startswith(self._mark_subject):
            if subject == self._join_mark_subject or subject == self._mark_subject:
                self._check_sequence(data.decode(errors="replace"), is_mark=True)
            # else a mark of a stream numbered for another join of this node name: an
            # earlier one of this process took or counted that stream (see _on_other_batch),
            # and another process's stream is not this one's to judge
            return
        if not self._inbox and not self.kernel.shutting_down:
            try:
                if self._handle_now(m):
                    return
            except Exception as exc:
                self._not_handled(m.subject, exc)
                return
        if not self._inbox.push(m):
            if self._inbox.closed:
                # the leave closed it (see _stop_deliveries): refused as what it held
                self._refuse_inbound(m)
            else:
                self._dropped["inbox_full"] += 1
                self._dropped_unread(m)

    def _on_batch(self, data: bytes) -> None:
        """asyncio side: a node batch. Checked whole (a malformed one is counted in
        ``inbound_dropped["malformed_batch"]`` and dropped, never raised), its numbers
        observed, then delivered at once frame by frame, unless earlier messages still
        wait for the pump: then it waits behind them."""
        opened = self._open_batch(data)
        if opened is None:
            return
        if not self._inbox and not self.kernel.shutting_down:
            try:
                self._deliver_batch(opened)
            except Exception as exc:
                log_guarded(
                    log,
                    logging.ERROR,
                    "node %s: a batch from %s failed",
                    self.node,
                    opened[0].node,
                    exc_info=exc,
                )
            return
        if not self._inbox.push(opened):
            if self._inbox.closed:
                self._refuse_inbound(opened)  # the leave closed it, as above
                return
            head, msgs, _, stream = opened
            self._dropped["inbox_full"] += len(msgs)  # (the undecodable ones counted)
            self._credit(stream, head.numbered)

    def _on_other_batch(self, subject: str, data: bytes) -> None:
        """asyncio side: a batch on the plain batch subject (from a sender of an earlier
        version, which knows no sessions: taken as any batch), or on the subject of
        another join of this node name. One numbered for an earlier join of this process
        (a sender's outbox held it, or it was on its way, while that join left and this
        one joined) is dropped unseen: its sender counts it, in ``lost_at_leave``, by that
        join's last notice, which says it never took it; taken here, it would be handled
        as well and its stream's earlier numbers counted lost in transit (a phantom gap).
        One numbered for another process of the name is left to it (fifty-sixth pass):
        a later process takes it itself (its subscription is the same wildcard), and what
        was numbered for an earlier one is counted by its sender, lost with that process
        (see _apply_member_entry: a restart under the name is that process's loss).
        Before, it was taken: a process cut off past its loss while its name was
        restarted, whose data link came back before its control link, handled each tell
        the members sent the later process (it had not heard of that one yet); and a
        later process took the tells numbered for an earlier one that its senders counted
        lost with it. Akka drops the messages of an old incarnation of an address once it
        is quarantined: the incarnation a message was sent to is the only one to take
        it."""
        if subject != self._batch_subject:
            try:
                head, _ = batch.read_head(data)
            except batch.BatchError:
                head = None  # counted as malformed below
            if head is not None and head.dest_prefix != self.id_prefix:
                # For another process of this node name: a later one (the members route
                # the name to it, and it takes this batch itself: its subscription is the
                # same wildcard), heard or not yet, or an earlier one (its sender counts
                # what that one did not confirm lost with it). Taken here too, every
                # tell to a name both processes run was handled twice.
                self._batches_received += 1
                log_guarded(
                    log,
                    logging.DEBUG,
                    "node %s: left a batch of %d tells from %r to the %s process of this"
                    " node name it was numbered for (id prefix %016x, %s)",
                    self.node,
                    head.numbered,
                    head.node,
                    "later" if head.dest_prefix in self._successors else "other",
                    head.dest_prefix,
                    subject,
                )
                return
            if head is not None and head.dest_prefix == self.id_prefix:
                self._batches_received += 1
                log_guarded(
                    log,
                    logging.DEBUG,
                    "node %s: dropped a batch of %d tells from %r numbered for an earlier"
                    " join of this process (%s); its sender counts them",
                    self.node,
                    head.numbered,
                    head.node,
                    subject,
                )
                return
        self._on_batch(data)

    def _for_successor(self, subject: str) -> bool:
        """Whether ``subject`` is an agent's or a reply subject of this node name whose id
        (the agent's, the query's) was made by a later process of the name, alive (see
        _successors): that process takes the message itself (the same wildcard
        subscription); taken here too, a query to a name both processes run was
        answered by this stale one, or refused ``AgentNotFound`` in a race with the
        right answer, and its requester took whichever came first."""
        rest = subject[len(self._node_subject_prefix) :]
        kind, _, text = rest.partition(".")
        if kind not in ("agent", "reply") or not subject.startswith(self._node_subject_prefix):
            return False
        try:
            made_by = uuid.UUID(text).int >> 64
        except ValueError:
            return False  # (counted as malformed where it is read)
        if made_by not in self._successors:
            return False
        log_guarded(
            log,
            logging.DEBUG,
            "node %s: left %s to the later process of this node name (id prefix %016x)",
            self.node,
            subject,
            made_by,
        )
        return True

    def _joined_before(self, info: NodeInfo) -> bool:
        """Whether this join came before the process whose record is ``info`` (by the
        bucket's join order where both have one, else by the wall clocks' ``joined``, as
        :meth:`NodeInfo.compare_join` orders two records)."""
        return compare_joins(self._join_order, self._joined_at, info.join_order, info.joined) < 0

    def _open_batch(self, data: bytes) -> _OpenBatch | None:
        self._batches_received += 1
        try:
            head, offset = batch.read_head(data)
        except batch.BatchError as exc:
            self._malformed_batch(exc)
            return None
        sender = f"{head.node}:{head.session:x}.{head.sender_prefix:x}"
        # None: for an earlier process of this node name, no credit
        stream = sender if head.dest_prefix == self.id_prefix else None
        if stream is not None and not self._inbound.touch(stream):
            return self._old_session_batch(head, data, offset)
        overreaches = self._seq_in.overreaches
        fresh = not self._seq_in.keeps(sender)
        lost = self._seq_in.observe_batch(
            sender,
            head.dest_prefix,
            head.first,
            head.numbered,
            self._window_of(head.node, head.session),
        )
        self._received += head.numbered
        if lost is None:
            # not believed (see _sequence): dropped whole, as TCP drops a segment
            # outside its window; nothing taken, nothing credited
            self._malformed_batch(
                batch.BatchError(
                    f"numbered from {head.first}, past its sender's window of"
                    f" {self._seq_in.window_of(sender)} tells after the last one taken here"
                ),
                head,
            )
            self._dropped["malformed"] += head.numbered
            return None
        if self._seq_in.overreaches != overreaches:
            self._overreach(sender, f"a batch numbered from {head.first}", started=True)
        if lost:
            self._log_loss(lost, sender)
        self._credit(stream, _skipped_credit(head.first - 1) if fresh else lost)
        try:
            msgs, controls = self._read_frames(head, data, offset)
        except batch.BatchError as exc:
            self._malformed_batch(exc, head)
            self._dropped["malformed"] += head.numbered
            self._credit(stream, head.numbered)
            return None
        return head, msgs, controls, stream

    def _read_frames(
        self, head: batch.BatchHead, data: bytes, offset: int
    ) -> tuple[list[Message], list[tuple[int, bytes]]]:
        """The messages and control frames of a batch (checked whole: BatchError); a
        tell that does not decode is counted (``malformed``) and left out, and so are the
        rows of an NXB3 block that does not (``read_columnar``'s ``bad_rows``)."""
        undecodable = functools.partial(self._undecodable, head)
        if head.columnar:
            bad_rows = functools.partial(self._bad_block, head)
            return batch.read_columnar(data, offset, head.numbered, undecodable, bad_rows)
        tells, controls = batch.split_frames(data, offset, head.numbered)
        return wire.decode_tells(tells, undecodable), controls

    def _old_session_batch(
        self, head: batch.BatchHead, data: bytes, offset: int
    ) -> _OpenBatch | None:
        """A batch of an earlier join of its sending process, whose stream this node no
        longer keeps, while a later join's stream is kept (a late tell of a join that is
        over: see ``_streams.earlier_session``): its tells are delivered, as a late tell of
        a stream still kept is, but their numbers are not taken (no stream started for a
        join that is over: no numbers before them counted lost, no credit for them, the
        later join's stream not retired); counted in ``old_session_tells``."""
        self._received += head.numbered
        try:
            msgs, controls = self._read_frames(head, data, offset)
        except batch.BatchError as exc:
            self._malformed_batch(exc, head)
            self._dropped["malformed"] += head.numbered
            return None
        self._old_session_tells += head.numbered
        return head, msgs, controls, None

    def _malformed_batch(self, exc: batch.BatchError, head: batch.BatchHead | None = None) -> None:
        self._dropped["malformed_batch"] += 1
        if self.held.due(
            self._loss_log,
            "malformed batches dropped",
            counted='inbound_dropped["malformed_batch"]',
        ):
            log_guarded(
                log,
                logging.WARNING,
                "node %s: dropped a malformed batch%s (%d so far): %s",
                self.node,
                f" from {head.node!r}" if head is not None else "",
                self._dropped["malformed_batch"],
                exc,
            )

    def _deliver_batch(self, opened: _OpenBatch) -> None:
        """Deliver a checked batch without waiting: its control frames, then its tells
        in order (tells for a full mailbox are parked behind it, as single messages are)."""
        head, msgs, controls, stream = opened
        for kind, body in controls:
            self._control_frame(head, kind, body)
        consumed = head.numbered - len(msgs)  # (the undecodable ones: counted)
        # Runs of plain enqueues (one lookup per address) while nothing is parked here;
        # the message a run stops at takes the single way (_admit), then the next run.
        handle = self.handle
        admit = self._admit
        count = len(msgs)
        index = 0
        try:
            while index < count:
                if handle is not None and not self._parked:
                    try:
                        taken = handle.deliver_run_nowait(msgs, index)
                    except DeliveryRunFailed as exc:
                        # the tells it took are delivered: counted once, as taken
                        self._forwarded_in += exc.taken - index
                        consumed += exc.taken - index
                        index = exc.taken
                        raise
                    self._forwarded_in += taken - index
                    consumed += taken - index
                    index = taken
                    if index == count:
                        break
                msg = msgs[index]
                if admit(None, msg, False, stream):
                    consumed += 1
                    index += 1
                    continue
                index += 1
                # Parked behind a full mailbox: the tells after it to the same address
                # wait behind it too (what _admit does with each, without its call; an
                # address that is not the same object takes _admit's way)
                parked = self._parked[msg.to]
                to = msg.to
                while index < count and (msg := msgs[index]).to is to:
                    parked.append((None, msg, False, stream))
                    index += 1
        except Exception:
            # A fault (a bug: nothing here raises by design; the caller logs it): the
            # tells not delivered are counted, and their credit goes back, or the
            # sender's window would never reopen (its every later tell to this process
            # waiting its send deadline, then MailboxFull)
            self._dropped["delivery_failed"] += count - index
            consumed += count - index
            raise
        finally:
            self._credit(stream, consumed)

    async def _handle_batch(self, opened: _OpenBatch) -> None:
        """Trio side (the pump): a batch that had to wait; while the kernel shuts down
        its tells are delivered under the draining rules, as single messages are."""
        if not self.kernel.shutting_down:
            self._deliver_batch(opened)
            return
        head, msgs, controls, stream = opened
        for kind, body in controls:
            self._control_frame(head, kind, body)
        consumed = head.numbered - len(msgs)  # (the undecodable ones: counted)
        try:
            for index, msg in enumerate(msgs):
                consumed += 1
                try:
                    await self._into_kernel(msg)
                except (AgentNotFound, MailboxFull, KernelShuttingDown) as exc:
                    self._refuse(None, msg, exc)
                except trio.Cancelled:
                    # The leave (see _stop_deliveries): this tell and the rest of the
                    # batch are refused, counted (see _settle_cancelled)
                    self._settle_cancelled(None, msg, False)
                    self._refuse_tells(msgs[index + 1 :])
                    consumed = head.numbered
                    raise
        finally:
            self._credit(stream, consumed)

    def _refuse_tells(self, msgs: list[Message]) -> None:
        """Leaving: tells of a batch that will not be delivered; refused, counted (the
        caller returns their credit)."""
        leaving = self._left_the_cluster()
        for msg in msgs:
            self._refuse(None, msg, leaving)

    def _settle_cancelled(self, m: NatsMsg | None, msg: Message, is_query: bool) -> None:
        """The leave cancelled the pump's wait to deliver ``msg``: a cancelled delivery
        took nothing (a cancelled wait for room enqueues nothing, and a reply the router
        took is not followed by a Cancelled), so it is refused, counted."""
        self._refused(m, msg, self._left_the_cluster(), is_query)

    def _refuse_inbound(self, item: NatsMsg | _OpenBatch) -> None:
        """Leaving: an item of the inbox that the pump will not deliver any more;
        refused, counted (a query gets its error frame, a reply to this node goes in
        without a wait if it can, as on arrival)."""
        if isinstance(item, tuple):
            head, msgs, _, stream = item
            self._refuse_tells(msgs)
            self._credit(stream, head.numbered)
            return
        subject = item.subject
        if subject.startswith(self._node_subject_prefix):
            if subject[len(self._node_subject_prefix) :].startswith("reply."):
                if not self._handle_now(item):
                    self._dropped["unroutable_reply"] += 1
                    self._dropped_unread(item)
                return
            type_name = None
        else:
            type_name = subject[len(self.prefix) + 6 :]  # "<prefix>.type.<name>"
        msg = self._decode_for(item, type_name)
        if msg is not None:
            self._refuse(item, msg, self._left_the_cluster())

    def _undecodable(self, head: batch.BatchHead, exc: MessageDecodeError) -> None:
        self._malformed("undecodable tell in a batch from %r", head.node, exc)

    def _bad_block(self, head: batch.BatchHead, rows: int, exc: batch.BatchError) -> None:
        """An NXB3 block that does not check, left out of its batch: its rows counted."""
        what = f"undecodable block of {rows} tells in a batch from %r"
        self._malformed(what, head.node, exc, rows)

    def _malformed(self, what: str, where: object, exc: Exception, count: int = 1) -> None:
        """A frame from a peer that could not be used (``what`` with ``where`` in it):
        its ``count`` tells counted in ``inbound_dropped["malformed"]``; logged at once,
        then at most once a second with the count so far (the rest held, said at the
        leave)."""
        self._dropped["malformed"] += count
        if self.held.due(
            self._malformed_log,
            "malformed frames dropped",
            counted='inbound_dropped["malformed"]',
        ):
            log_guarded(
                log,
                logging.WARNING,
                f"node %s: {what}: %s (%d malformed so far)",
                self.node,
                where,
                exc,
                self._dropped["malformed"],
            )

    def _control_frame(self, head: batch.BatchHead, kind: int, body: bytes) -> None:
        try:
            if kind == batch.CREDIT:
                session, consumed = batch.parse_credit(body)
                if session == self._session and head.dest_prefix == self.id_prefix:
                    if self._from_current_join(head):
                        link = self._links.get((head.node, head.sender_prefix))
                        if link is not None:
                            link.credit(head.session, consumed)
                    elif self._left_streams:
                        self._left_credit(head, consumed)
            elif kind == batch.CANCEL:
                query_id, to = batch.parse_cancel(body)
                self._cancels_received += 1
                self._requester_gone(query_id, to)
        except batch.BatchError as exc:
            self._malformed("bad frame in a batch from %r", head.node, exc)

    def _requester_gone(self, query_id: uuid.UUID, to: Address) -> None:
        """The requester on another node of query ``query_id`` stopped waiting (its
        cancel frame came): the handler here is cancelled (``TransportHandle.cancel_query``)
        and, if a handler here sent the query on to another node (a router agent), the
        cancel goes on there (see :meth:`cancel_query`). Nothing goes back to that
        requester any more: an answer that comes anyway is a late reply here."""
        to_type = isinstance(to, str) and to.startswith(wire.TYPE_PREFIX)
        # Sent to every node (see _cancel_type_query): only the node whose replica took
        # the query has a handler to cancel (read before _take_route forgets it).
        replica = self._type_taken.pop(query_id, None) if to_type and self._type_taken else None
        self._take_route(query_id)
        # first: for an address not here, the kernel asks this transport to cancel the
        # query where it went, with that address, not the one it was sent on to
        sent_on = self._outstanding.get(query_id)
        if sent_on is not None:
            self.cancel_query(query_id, sent_on[0])
        if to_type:
            if self.handle is not None:
                # No replica here took it (yet): the kernel marks it late all the same,
                # so that a query that comes after its cancel is skipped, as any is.
                self.handle.cancel_query(query_id, replica if replica is not None else to)
            return
        if self.handle is not None:
            self.handle.cancel_query(query_id, to)

    def _from_current_join(self, head: batch.BatchHead) -> bool:
        """The batch comes from the join of its node that the member table holds (the
        session its record names). Credit of another join counts for nothing: an earlier
        join of that process, heard after its leave or new join (credit travels on the
        data connection, membership on the control one), would be taken for the new
        join's and open its window past ``node_window`` (see _restart_streams). A record
        without a session (a kernel of an earlier version) is taken at its word."""
        info = self.members.members.get(head.node)
        return info is not None and (info.session is None or info.session == head.session)

    def _credit(self, stream: str | None, consumed: int) -> None:
        """``consumed`` more tells of ``stream`` left this node's hands: the total goes
        back to their sender with the next batch the other way."""
        if stream is None or not consumed:
            return
        self._return_credit(self._inbound.consumed(stream, consumed))

    def _credit_again(self, stream: str) -> None:
        """A sequence mark of ``stream`` came that shows nothing new: the credit it was
        given goes back again with the next batch the other way. The batch that carried it
        may be lost (core NATS: a server restart or failover, a slow-consumer cut), and
        credit goes back only as tells are consumed: a sender whose whole window was
        consumed here before that loss sends no more tells, so none would bring it back
        and its window stayed full for good. Credit is a running total: a repeat gives its
        sender nothing twice. A mark comes at most once a heartbeat a stream (see
        _send_sequence_marks)."""
        self._return_credit(self._inbound.consumed(stream, 0))

    def _return_credit(self, kept: InboundStream | None) -> None:
        if kept is None or kept.prefix < 0 or not kept.consumed:
            return  # evicted, or not a stream of batches (a kernel of an earlier version)
        link = self._links.get((kept.node, kept.prefix)) or self._new_link((kept.node, kept.prefix))
        link.credit_due = (kept.session, kept.consumed)
        self._want_flush(link)

    def _forget_sender(self, node: str, prefix: int) -> None:
        """The inbound streams of process ``prefix`` of ``node`` are all gone: a link kept
        only to return credit to it goes too (one that carried tells goes with its
        sequence marks, see _send_sequence_marks)."""
        link = self._links.get((node, prefix))
        if link is not None and not link.sent and not link.frames and not link.rows:
            self._drop_link((node, prefix))

    def _check_sequence(self, value: str, *, is_mark: bool) -> None:
        """Count the tells a gap in a sender's numbers says were lost (see ``_sequence``)."""
        try:
            stream, dest_prefix, number = wire.parse_sequence(value)
        except ValueError:
            self._dropped["malformed"] += 1
            return
        if dest_prefix == self.id_prefix and not self._inbound.touch(stream):
            # of a join that is over, not kept here (see _old_session_batch): a single
            # tell is delivered, its number not taken; a mark says nothing
            if not is_mark:
                self._old_session_tells += 1
            return
        overreaches = self._seq_in.overreaches
        fresh = dest_prefix == self.id_prefix and not self._seq_in.keeps(stream)
        parts = parse_stream_name(stream)
        lost = self._seq_in.observe(
            stream,
            dest_prefix,
            number,
            is_mark=is_mark,
            window=None if parts is None else self._window_of(parts[0], parts[1]),
        )
        if self._seq_in.overreaches != overreaches:
            what = f"{'a mark' if is_mark else 'a tell'} numbered {number}"
            self._overreach(stream, what, started=fresh)
        self._credit(stream, _skipped_credit(number - (0 if is_mark else 1)) if fresh else lost)
        if is_mark and not lost and not fresh and dest_prefix == self.id_prefix:
            self._credit_again(stream)
        self._log_loss(lost, stream)

    def _overreach(self, stream: str, what: str, *, started: bool = False) -> None:
        """A number of ``stream`` ran past what its sender's window allows (see
        ``_sequence``): one malformed number, logged; not believed on a stream kept here,
        the start of one not kept (``started``: only the window's worth counted lost)."""
        self._dropped["malformed"] += 1
        if self.held.due(
            self._loss_log,
            "numbers past their sender's window",
            counted='inbound_dropped["malformed"]',
        ):
            log_guarded(
                log,
                logging.WARNING,
                "node %s: %s from %s runs past its sender's window (%d tells after the last"
                " one taken here): %s",
                self.node,
                what,
                stream,
                self._seq_in.window_of(stream),
                "a stream not kept here, started there, at most that many counted lost"
                if started
                else "not believed, counted malformed",
            )

    def _window_of(self, node: str, session: int) -> int | None:
        """The ``node_window`` of the join ``session`` of ``node``: what its membership
        record says if it is that join's (or names none: a kernel of an earlier version);
        else None, and the window its stream was last given, or this node's, is used (see
        ``_sequence``). The record of a later join of the name says that join's window: a
        process with a smaller one judged the late batches of the earlier process by it,
        and dropped an honest one of more tells whole (malformed)."""
        info = self.members.members.get(node)
        if info is None or (info.session is not None and info.session != session):
            return None
        return info.window

    def _log_loss(self, lost: int, stream: str) -> None:
        if lost and self.held.due(
            self._loss_log, "tells lost in transit", lost, counted="lost_in_transit"
        ):
            log_guarded(
                log,
                logging.WARNING,
                "node %s: %d tells from %s were lost in transit (%d so far; a NATS"
                " failover or a slow-consumer cut), counted in lost_in_transit",
                self.node,
                lost,
                stream,
                self._seq_in.lost,
            )

    def _send_sequence_marks(self) -> None:
        """Trio side, every heartbeat: tell each destination the last number sent to it,
        so that tells lost at the end of a burst are counted too (see _check_sequence).
        None once the leave closed the outbox: the leave sent the last marks before it
        closed it (see _flush_at_leave), and a heartbeat that ticked after (the leave
        still flushing, on a loaded machine) put one into the closed outbox, counted
        there as an item refused (``Outbox.dropped``), none of them a tell."""
        if self._outbox.closed:
            return
        self._marks_sent += 1
        periodic = self._marks_sent % _MARK_EVERY == 0
        members = self.members.members
        refused = self._refusals_shown()
        for key, number in list(self._seq_out.items()):
            node, id_prefix = key
            info = members.get(node)
            if info is None or info.id_prefix != id_prefix:
                # that process is gone: its stream ends here
                self._seq_out.pop(key, None)
                self._seq_marked.pop(key, None)
                self._drop_link(key)
                continue
            # (and every heartbeat while its window is full: the receiver answers a
            # mark with its credit again, see _credit_again)
            link = self._links.get(key)
            if (
                periodic
                or key in refused
                or self._seq_marked.get(key) != number
                or (link is not None and not link.has_room())
            ):
                self._seq_marked[key] = number
                subject = wire.sequence_mark_subject(self.prefix, node, info.session)
                mark = wire.sequence_value(
                    f"{self.node}:{self._session:x}", self.id_prefix, id_prefix, number
                )
                self._outbox.put((subject, "", None, mark.encode(), _MARK))

    def _refusals_shown(self) -> set[_Stream]:
        """The streams of the batches the NATS client refused for want of a connection,
        once it is back (else none): the marks about to go show the receivers the gap,
        and they count it; this node no longer does (see _refused_batches)."""
        refused = self._refused_batches
        if not refused or self._outbox.paused or not self.nc.is_connected:
            return set()
        self._refused_batches = []
        return {
            (wire.batch_destination(self.prefix, subject)[0], batch.parse_head(head)[0].dest_prefix)
            for subject, head in refused
        }

    def _handle_now(self, m: NatsMsg) -> bool:
        """Handle ``m`` without waiting; False if it needs the pump."""
        subject = m.subject
        if subject.startswith(self._node_subject_prefix):
            rest = subject[len(self._node_subject_prefix) :]
            if rest.startswith("reply."):
                query_id = self._reply_query_id(rest[6:])
                if query_id is None:
                    return True
                asked = self._outstanding.pop(query_id, None)
                if asked is None:
                    # a tell to a type of this node that no node serves, or not known as
                    # ours (False): the pump delivers without forwarding
                    return bool(self._type_tells) and self._type_tell_came_back(m, query_id)
                reply = self._reply_message(m, query_id, asked)
                if reply is not None:
                    self._reply_in_now(reply, query_id)
                return True
            self._accept(m, None)
            return True
        self._accept(m, subject[len(self.prefix) + 6 :])  # "<prefix>.type.<name>"
        return True

    async def _pump(self) -> None:
        """Trio side: what could not be delivered at once, in arrival order."""
        while True:
            try:
                items = await self._inbox.take_batch()
            except trio.EndOfChannel:
                return
            while items:
                m = items.popleft()
                try:
                    if isinstance(m, tuple):
                        await self._handle_batch(m)
                    else:
                        await self._handle(m)
                except trio.Cancelled:
                    # The leave (see _stop_deliveries): what this task took from the
                    # inbox and has not delivered is refused, counted.
                    for rest in items:
                        self._refuse_inbound(rest)
                    raise
                except Exception as exc:
                    self._not_handled(getattr(m, "subject", self._batch_subject), exc)

    def _not_handled(self, subject: str, exc: Exception) -> None:
        log_guarded(
            log,
            logging.ERROR,
            "node %s: a message on %s could not be handled",
            self.node,
            subject,
            exc_info=exc,
        )

    async def _handle(self, m: NatsMsg) -> None:
        subject = m.subject
        if subject.startswith(self._node_subject_prefix):
            rest = subject[len(self._node_subject_prefix) :]
            if rest.startswith("reply."):
                await self._handle_reply(m, rest[6:])
                return
            await self._handle_message(m, None)
            return
        type_name = subject[len(self.prefix) + 6 :]  # "<prefix>.type.<name>"
        await self._handle_message(m, type_name)

    def _reply_query_id(self, query_text: str) -> uuid.UUID | None:
        try:
            return uuid.UUID(query_text)
        except ValueError:
            self._dropped["malformed"] += 1
            return None

    def _reply_message(
        self, m: NatsMsg, query_id: uuid.UUID, asked: tuple[Address, str] | None
    ) -> Message | None:
        """The reply in ``m``; or None once an error frame / no-responders status failed
        the request (or the body was malformed)."""
        headers = m.headers
        if headers and (headers.get("Status") == "503" or wire.ERROR_HEADER in headers):
            to, node = asked if asked is not None else ("?", "?")
            if self._type_queries and self._type_queries.pop(query_id, False):
                # the replica that refused or failed it took it: handed to its process,
                # or to the one that passed the frame on (NATS's "no responders" names
                # none: no replica took it)
                taker = headers.get(wire.RELAYED_HEADER) or headers.get(wire.NODE_HEADER, "")
                info = self.members.members.get(taker)
                if info is not None:
                    self._alone_out[info.id_prefix] = self._alone_out.get(info.id_prefix, 0) + 1
            if self._reply_routes and query_id in self._reply_routes:
                self._relay_error(m, query_id, to, node)
                return None
            counted = False  # (as malformed)
            if wire.ERROR_HEADER in headers:
                try:
                    error: NexusError = wire.error_from_frame(
                        headers[wire.ERROR_HEADER],
                        m.data,
                        query_id=query_id,
                        to=to,
                        node=headers.get(wire.NODE_HEADER, node),
                    )
                except ValueError as exc:
                    self._malformed("undecodable error frame on %s", m.subject, exc)
                    error = RequestFailed(query_id, to, "malformed", exc)
                    counted = True
            else:
                error = _no_responders(to, node)
            handle = self.handle
            if (handle is None or not handle.fail_request(query_id, error)) and not counted:
                self._unawaited_error(m, query_id)
            return None
        try:
            reply = _decode(m.data)
        except MessageDecodeError as exc:
            self._malformed("undecodable reply on %s", m.subject, exc)
            return None
        self._took_reply(reply, query_id, None if asked is None else asked[1], m)
        return reply

    def _type_tell_came_back(self, m: NatsMsg, tell_id: uuid.UUID) -> bool:
        """Whether ``m``, on the reply subject of message ``tell_id``, is about a tell to
        a type this node sent: NATS's "no responders" (no node served the type when the
        tell got there: it is lost) is counted in ``inbound_dropped["no_replica"]`` and
        logged as drops are; anything else there (nothing a kernel sends) is dropped."""
        if self._type_tells.pop(tell_id, None) is None:
            return False
        headers = m.headers
        if headers and headers.get("Status") == "503":
            self._dropped["no_replica"] += 1
            if log.isEnabledFor(logging.INFO) and self.held.due(
                self._drop_log,
                "tells to a type no node serves",
                counted='inbound_dropped["no_replica"]',
                level=logging.INFO,
            ):
                log_guarded(
                    log,
                    logging.INFO,
                    "node %s: tell %s to a type was lost: no node serves the type (%d so far)",
                    self.node,
                    tell_id,
                    self._dropped["no_replica"],
                )
        return True

    def _unawaited_error(self, m: NatsMsg, query_id: uuid.UUID) -> None:
        """A well-formed error frame (or NATS's "no responders") for query ``query_id``
        that no request here waits for: counted in ``inbound_dropped`` as an answer there
        is, ``late_error`` if its requester here gave up (an answer then is dead-lettered
        ``late_reply``), else ``unroutable_error`` (as ``unroutable_reply``)."""
        handle = self.handle
        late = handle is not None and handle.gave_up(query_id)
        reason = "late_error" if late else "unroutable_error"
        self._dropped[reason] += 1
        # a peer may send such frames by the thousand: logged as _refuse logs its drops
        if log.isEnabledFor(logging.INFO) and self.held.due(
            self._drop_log,
            f"error frames dropped ({reason})",
            counted=f'inbound_dropped["{reason}"]',
            level=logging.INFO,
        ):
            log_guarded(
                log,
                logging.INFO,
                "node %s: dropped an error frame (%s) for query %s on %s: %s (%d so far)",
                self.node,
                brief((m.headers or {}).get(wire.ERROR_HEADER, "no responders"), 60),
                query_id,
                brief(m.subject, 200),
                reason,
                self._dropped[reason],
            )

    def _relay_error(self, m: NatsMsg, query_id: uuid.UUID, to: Address, asked: str) -> None:
        """The error frame (or NATS's "no responders") for a query this node took from a
        requester on another node and a handler here sent on to a third (a router
        agent): no request waits for it here; the frame goes on to that requester, as it
        is (counted in ``replies_relayed``, not ``errors_replied``: this node refused
        nothing). No responders (the agent it went on to is gone with its node) goes on
        as ``RequestFailed`` (``no_such_agent``), as a query a handler here forwards to an
        agent that does not exist fails, its error naming the node ``asked`` and that NATS
        had no responders there, as a direct request's does."""
        subject, _ = self._take_route(query_id)
        assert subject is not None  # (the caller found the route)
        headers = m.headers or {}
        if wire.ERROR_HEADER in headers:
            kind, body = headers[wire.ERROR_HEADER], m.data
            node = headers.get(wire.NODE_HEADER, "?")
        else:
            reason = DeadLetterReason.NO_SUCH_AGENT.value
            error = _no_responders(to, asked)
            kind, body = wire.error_frame(RequestFailed(query_id, to, reason, error))
            node = self.node
        relayed = {wire.ERROR_HEADER: kind, wire.NODE_HEADER: node, wire.RELAYED_HEADER: self.node}
        # counted first: the outbox may send it at once, and a refusal then takes it back
        self._replies_relayed += 1
        if not self._outbox.put((subject, "", relayed, body, _PLAIN)):
            self._relay_not_sent(subject, "the node left the cluster")

    def _relay_not_sent(self, subject: str, why: str) -> None:
        """An error frame counted in ``replies_relayed`` did not go: counted in
        ``errors_unsent`` (kind ``relayed``) instead."""
        self._replies_relayed -= 1
        self._error_not_sent("relayed", subject, why, replied=False)

    def _took_reply(
        self, reply: Message, query_id: uuid.UUID, asked: str | None, m: NatsMsg
    ) -> None:
        """Count a reply taken from the process it came from (see ``_alone_in``), and a
        query to a type as handed to it, now that its answer says which one took it.
        That is the node that passed it on, for an answer a router agent there had from
        a third node (its ``Nexus-Relayed`` header: also for a query to a type, or one
        no longer outstanding here); else the node ``asked`` (the query went there); for
        a query to a type, or one no longer outstanding here (late), the process that
        made the reply."""
        members = self.members.members
        headers = m.headers
        relayed = headers.get(wire.RELAYED_HEADER) if headers else None
        info = members.get(relayed) if relayed is not None else None
        if info is None and asked is not None:
            info = members.get(asked)
        peer = id_value(reply) >> 64 if info is None else info.id_prefix
        taken = self._alone_in
        taken[peer] = taken.get(peer, 0) + 1
        if self._type_queries and self._type_queries.pop(query_id, False):
            self._alone_out[peer] = self._alone_out.get(peer, 0) + 1

    def _dropped_unread(self, m: NatsMsg) -> None:
        """A query, reply or message to a type dropped before it was read (the inbox
        full, a late reply as the node leaves): counted for the process that made it, as
        one read is (a rare path: it is read here for that)."""
        headers = m.headers
        if headers and ("Status" in headers or wire.ERROR_HEADER in headers):
            return  # no message: an error frame, or NATS's "no responders"
        if m.data[:4] == wire.NUMBERED_PREFIX:
            return  # a numbered tell: counted with its stream
        try:
            msg = _decode(m.data)
        except MessageDecodeError:
            return
        rest = m.subject[len(self._node_subject_prefix) :]
        if m.subject.startswith(self._node_subject_prefix) and rest.startswith("reply."):
            try:
                query_id = uuid.UUID(rest[6:])
            except ValueError:
                return  # (no query of this node: counted malformed where it was read)
            self._took_reply(msg, query_id, None, m)
            return
        made_by = id_value(msg) >> 64
        peer = self._peer_of(m.reply, made_by) if m.reply else made_by
        self._alone_in[peer] = self._alone_in.get(peer, 0) + 1

    def _reply_in_now(self, reply: Message, query_id: uuid.UUID) -> None:
        """The answer to query ``query_id`` of this node, into the kernel without a wait.
        For a query taken from a requester on another node that a handler here sent on
        (a router agent), the kernel passes the answer on, through the route kept for it
        (see _route), counted in ``replies_relayed``."""
        relaying = bool(self._reply_routes) and query_id in self._reply_routes
        try:
            if not relaying:
                self.kernel.send_nowait(reply)
            elif self.handle is None:
                raise self._refusal("relay")
            else:
                # also while the kernel drains or after it stopped: the route is known
                # and the transport up, and the requester waits. It goes out naming this
                # node (see _took_reply): the answer's id names the node that made it
                self._relaying = {wire.RELAYED_HEADER: self.node}
                try:
                    self.handle.relay_nowait(reply)
                finally:
                    self._relaying = None
        except (AgentNotFound, KernelShuttingDown, MailboxFull, TransportUnavailable) as exc:
            self._dropped["unroutable_reply"] += 1
            if relaying:
                # not passed on (the transport detached, or leaving): the requester
                # gets the error at once, if the route is still kept (query_failed)
                self.query_failed(query_id, exc)
        except (TypeError, ValueError):
            # An answer to pass on that the requester's wire form cannot carry (its
            # JSON form: nested too deeply, say): _route sent that requester an error
            # frame instead (see _unencodable_reply)
            self._dropped["unrelayable_reply"] += 1
        else:
            self._forwarded_in += 1
            if relaying and query_id not in self._reply_routes:
                self._replies_relayed += 1

    async def _handle_reply(self, m: NatsMsg, query_text: str) -> None:
        query_id = self._reply_query_id(query_text)
        if query_id is None:
            return
        asked = self._outstanding.pop(query_id, None)
        if asked is None and self._type_tells and self._type_tell_came_back(m, query_id):
            return
        reply = self._reply_message(m, query_id, asked)
        if reply is None:
            return
        if self._reply_routes and query_id in self._reply_routes:
            # to pass on (see _reply_in_now): no request waits for it in this kernel,
            # which would take it as a reply to nobody
            self._reply_in_now(reply, query_id)
            return
        try:
            await self._into_kernel(reply)
        except (AgentNotFound, KernelShuttingDown, MailboxFull):
            self._dropped["unroutable_reply"] += 1

    async def _handle_message(self, m: NatsMsg, type_name: str | None) -> None:
        if not self.kernel.shutting_down:
            self._accept(m, type_name)
            return
        # Shutting down: public sends are refused, but the kernel still takes messages
        # from remote kernels while its agents drain (the same rule as local agents).
        msg = self._decode_for(m, type_name)
        if msg is None:
            return
        is_query = bool(m.reply) and msg.kind is _QUERY
        if is_query:
            self._remember(self._reply_routes, msg.id, m.reply)
        try:
            await self._into_kernel(msg)
        except (AgentNotFound, MailboxFull, KernelShuttingDown) as exc:
            self._refused(m, msg, exc, is_query)
        except trio.Cancelled:
            self._settle_cancelled(m, msg, is_query)  # the leave (see _stop_deliveries)
            raise

    def _decode_for(self, m: NatsMsg, type_name: str | None) -> Message | None:
        try:
            msg = _decode(m.data)
        except MessageDecodeError as exc:
            self._malformed("undecodable message on %s", m.subject, exc)
            if m.reply:
                self._publish_error(m.reply, RequestFailed(uuid.UUID(int=0), "?", "malformed", exc))
            return None
        # taken from the process it came from: a query's requester node (its reply
        # subject says which; a plain client's, or a message to a type without one: the
        # process its id names; see _alone_in)
        made_by = id_value(msg) >> 64
        peer = self._peer_of(m.reply, made_by) if m.reply else made_by
        self._alone_in[peer] = self._alone_in.get(peer, 0) + 1
        if type_name is not None:
            replica = self._pick_replica(type_name)
            if replica is None:
                self._refuse(m, msg, AgentNotFound(msg.to))
                return None
            msg = msg.evolve(to=replica)
            if m.reply and msg.kind is _QUERY:
                self._remember(self._type_taken, msg.id, replica)
        if m.data[:1] == b"{" and m.reply:
            self._remember(self._json_requests, msg.id, 1)
        return msg

    def _accept(self, m: NatsMsg, type_name: str | None) -> None:
        """Deliver an agent message without waiting, or park it for a full mailbox."""
        msg = self._decode_for(m, type_name)
        if msg is None:
            return
        is_query = bool(m.reply) and msg.kind is _QUERY
        if is_query:
            self._remember(self._reply_routes, msg.id, m.reply)
        self._admit(m, msg, is_query, None)

    def _admit(self, m: NatsMsg | None, msg: Message, is_query: bool, stream: str | None) -> bool:
        """Deliver ``msg`` (from NATS message ``m``, or from a batch of ``stream`` when
        None) without waiting, or park it behind its full mailbox. True when done with
        it (delivered or refused), False when parked."""
        # (an id's hash is a Python call: none when nothing is parked, the common case)
        parked = self._parked.get(msg.to) if self._parked else None
        if parked is None:
            # The common case: room in the mailbox, enqueued without waiting. A full
            # mailbox must not stall the messages for every other agent of this node,
            # so the message waits in a queue of its own recipient (below).
            handle = self.handle
            try:
                if handle is None:
                    raise self._refusal("remote delivery")
                if handle.deliver_nowait(msg):  # never forwarded again from here
                    self._forwarded_in += 1
                    return True
            except (AgentNotFound, KernelShuttingDown) as exc:
                self._refused(m, msg, exc, is_query)
                return True
            deliveries = self._deliveries
            if deliveries is None:
                # The node left (its delivering tasks ended, see _stop_deliveries) and
                # is not yet disconnected: this will not get in through it any more.
                self._refused(m, msg, self._left_the_cluster(), is_query)
                return True
            parked = self._parked[msg.to] = deque()
            deliveries.start_soon(self._deliver_parked, msg.to, parked)
        elif stream is None and _singles(parked) >= self.options.parked_limit:
            to = msg.to
            try:
                ref = self.kernel.lookup(to) if isinstance(to, str) else None
            except AgentNotFound:
                ref = None
            cell_full = MailboxFull(
                ref.id if ref is not None else to if isinstance(to, uuid.UUID) else SYSTEM_ID,
                ref.name if ref is not None else None,
                self.options.parked_limit,
                msg.id,
            )
            self._refused(m, msg, cell_full, is_query)
            return True
        parked.append((m, msg, is_query, stream))
        return False

    async def _deliver_parked(self, address: Address, parked: deque[_Parked]) -> None:
        """Feed one recipient whose mailbox was full, in arrival order, waiting for room
        up to the send deadline per message like a local ``send``. If the mailbox stays
        full that long, the single messages parked for it are refused (at most once);
        batched tells wait on (bounded by their senders' ``node_window``), except one
        that the agent refuses without a wait (``reject``): refused here, counted."""
        # The credit of the tells that went in, returned at the end and before a wait once
        # it is an eighth of the node window or 10 ms after the last return (with the
        # next batch the other way, either way), not once per tell nor once per wait: a
        # wait comes each time the agent makes room (a batch of its, 64 by default), and
        # credit returned that often cost a control-only batch each, a publish here and
        # a wake-up there, over twice as many as the tells' own batches
        # (docs/distributed.md, thirty-eighth pass). An agent slower than that gets its
        # credit returned before every wait, as before: its senders wait for it.
        owed_stream: str | None = None
        owed = 0
        credit_at = max(1, self.options.node_window // _PARKED_CREDIT_SHARE)
        # when the last wait began (MailboxFull comes only out of a wait)
        started = credited = trio.current_time()
        try:
            while parked:
                m, msg, is_query, stream = parked[0]
                if stream is not None and (handle := self.handle) is not None:
                    # Batched tells of one stream at its head go in as a run while the
                    # mailbox has room (deliver_run_nowait: as deliver_nowait would take
                    # each, counted alike); the one it stops at takes the single way.
                    run = [msg]
                    for entry in itertools.islice(parked, 1, _PARKED_RUN):
                        if entry[3] != stream:
                            break
                        run.append(entry[1])
                    failed: Exception | None = None
                    try:
                        taken = handle.deliver_run_nowait(run, 0)
                    except Exception as exc:
                        # A fault (a bug: nothing there raises by design): what the run
                        # took is delivered and counted; the tell it stopped at is counted
                        # failed and credited (as _deliver_batch counts the rest of its
                        # batch), the fault logged, and the queue goes on.
                        taken = exc.taken if isinstance(exc, DeliveryRunFailed) else 0
                        failed = exc
                    if taken:
                        self._forwarded_in += taken
                        for _ in range(taken):
                            parked.popleft()
                        owed_stream, owed = self._owe(owed_stream, owed, stream, taken)
                    if failed is not None:
                        if taken < len(run):
                            self._dropped["delivery_failed"] += 1
                            owed_stream, owed = self._owe(owed_stream, owed, stream)
                            parked.popleft()
                        log_guarded(
                            log,
                            logging.ERROR,
                            "node %s: a tell waiting for room could not be delivered",
                            self.node,
                            exc_info=failed,
                        )
                        continue
                    if taken:
                        continue
                try:
                    if not self._into_kernel_nowait(msg):
                        started = trio.current_time()
                        if owed and (
                            owed >= credit_at or started - credited >= _PARKED_CREDIT_AFTER
                        ):
                            self._credit(owed_stream, owed)
                            owed = 0
                            credited = started
                        try:
                            await self._into_kernel(msg)
                        except trio.Cancelled:
                            # The leave (see _stop_deliveries). A cancelled wait enqueued
                            # nothing: it and what waits behind it are refused, counted,
                            # here (this task's finally forgets the queue). Not by the
                            # leave itself: a message the consumer admitted as it woke
                            # this task is in, and only this task can tell. Their credit
                            # goes back too (below): it confirms them to their senders.
                            leaving = self._left_the_cluster()
                            while parked:
                                m, msg, is_query, stream = parked.popleft()
                                self._refused(m, msg, leaving, is_query)
                                if stream is not None:
                                    owed_stream, owed = self._owe(owed_stream, owed, stream)
                            raise
                except MailboxFull as exc:
                    # (half the deadline: a wait that ran to it, measured on a float
                    # clock, may come out a hair short of it)
                    if stream is not None and (
                        trio.current_time() - started >= self.kernel.config.kernel.send_timeout / 2
                    ):
                        # A batched tell waits on for room: its senders' credit bounds
                        # how many wait here, and it is the senders that wait (up to
                        # their send deadline, see _batch), as for a full local mailbox.
                        continue
                    if stream is not None:
                        # Refused before its send deadline could pass: the agent refuses
                        # when full (``reject``), as it would a local send; waiting again
                        # would only be refused again at once. Refused here, counted.
                        self._refused(m, msg, exc, is_query)
                        parked.popleft()
                        owed_stream, owed = self._owe(owed_stream, owed, stream)
                        continue
                    # A single message still refused after the send deadline: it and
                    # the single messages behind it are refused (at most once).
                    kept = [entry for entry in parked if entry[3] is not None]
                    for m, msg, is_query, stream in parked:
                        if stream is None:
                            self._refused(m, msg, exc, is_query)
                    parked.clear()
                    parked.extend(kept)
                    continue
                except (AgentNotFound, KernelShuttingDown) as exc:
                    self._refused(m, msg, exc, is_query)
                parked.popleft()
                if stream is not None:
                    owed_stream, owed = self._owe(owed_stream, owed, stream)
        finally:
            if owed:
                self._credit(owed_stream, owed)
            del self._parked[address]

    def _owe(
        self, owed_stream: str | None, owed: int, stream: str, count: int = 1
    ) -> tuple[str, int]:
        """``count`` more tells of ``stream`` left this node's hands (see
        _deliver_parked): what is owed, after returning what was owed to another stream."""
        if stream != owed_stream:
            if owed:
                self._credit(owed_stream, owed)
            return stream, count
        return stream, owed + count

    def _refused(self, m: NatsMsg | None, msg: Message, exc: NexusError, is_query: bool) -> None:
        if is_query:
            self._take_route(msg.id)
        self._refuse(m, msg, exc)

    def _refuse(self, m: NatsMsg | None, msg: Message, exc: NexusError) -> None:
        if m is not None and m.reply and msg.kind is _QUERY:
            self._publish_error(m.reply, exc)
            return
        reason = {
            AgentNotFound: "no_such_agent",
            MailboxFull: "mailbox_full",
            KernelShuttingDown: "shutting_down",
        }.get(type(exc), "error")
        self._dropped[reason] += 1
        # A peer may send such messages by the thousand (or a shutdown refuse them): a
        # line at once, then at most one a second, each with the count so far (all are
        # counted in stats().inbound_dropped).
        if log.isEnabledFor(logging.INFO) and self.held.due(
            self._drop_log,
            f"messages from other nodes dropped ({reason})",
            counted=f'inbound_dropped["{reason}"]',
            level=logging.INFO,
        ):
            # The peer chose the name, as long as NATS takes (AgentNotFound's text repeats
            # it): cut short, as every line about a value from outside.
            to = msg.to if isinstance(msg.to, uuid.UUID) else brief(msg.to, 60)
            log_guarded(
                log,
                logging.INFO,
                "node %s: dropped message %s to %s from another node: %s (%s; %d so far)",
                self.node,
                msg.id,
                to,
                reason,
                type(exc).__name__ if isinstance(exc, AgentNotFound) else brief(str(exc), 200),
                self._dropped[reason],
            )

    def _fail_request(self, query_id: uuid.UUID, error: BaseException) -> None:
        """Query ``query_id`` that this node sent will get no answer: its requester gets
        ``error``. One that waits here has it raised by its request; for a query a
        handler here sent on for a requester on another node (a router agent), no request
        waits here and that requester gets ``error`` in an error frame (made here, so
        counted in ``errors_replied``, see :meth:`query_failed`)."""
        handle = self.handle
        if handle is None or not handle.fail_request(query_id, error):
            self.query_failed(query_id, error)

    def _into_kernel_nowait(self, msg: Message) -> bool:
        """:meth:`_into_kernel` if it needs no wait: True if taken. Once the consumer
        has made room, what waited behind the message that had to wait for it goes in
        without a wait of its own (no cancel scope, no delivery coroutines); False sends
        the caller to :meth:`_into_kernel`, also while the kernel drains (which that
        path still serves)."""
        handle = self.handle
        if handle is None:
            return False
        try:
            taken = handle.deliver_nowait(msg)
        except KernelShuttingDown:
            return False
        if taken:
            self._forwarded_in += 1
        return taken

    def _refusal(self, what: str) -> KernelShuttingDown:
        """The refusal of ``what`` (a message from or to another node) once the transport
        is detached or the kernel shuts down, naming the kernel's phase (``detached``
        while it runs on)."""
        return KernelShuttingDown(what, detached_phase(self.kernel.phase))

    def _left_the_cluster(self) -> KernelShuttingDown:
        """The refusal of a message from another node that the leave did not deliver."""
        if self.kernel.phase is KernelPhase.RUNNING:
            return self._refusal("remote delivery")
        # (the kernel's phase says it shuts down: the leave is said too)
        return self._refusal("remote delivery (the node left the cluster)")

    async def _into_kernel(self, msg: Message) -> None:
        """A message from another node, delivered under local rules (see TransportHandle)."""
        if self.handle is None:
            raise self._refusal("remote delivery")
        await self.handle.deliver(msg)
        self._forwarded_in += 1

    # --- names -------------------------------------------------------------------------------

    def _apply_name_entry(
        self, key: str, value: bytes | None, op: str | None, revision: int | None = None
    ) -> None:
        try:
            name = wire.name_from_key(key)
        except ValueError as exc:
            # not a key this code writes (the watch of the bucket would end with it)
            self._names_refused.refuse(self.node, key, str(exc))
            return
        if revision is not None and revision < (
            self._name_revisions.get(name) or self._name_deletes.get(name, 0)
        ):
            return  # older than the entry (or delete) known here: heard late
        self._hidden_names.pop(name, None)
        if op in _KV_OPS_DELETED or not value:
            self._name_revisions.pop(name, None)
            if revision is not None:
                deletes = self._name_deletes
                deletes[name] = revision
                deletes.move_to_end(name)
                if len(deletes) > _NAME_DELETES_KEPT:
                    deletes.popitem(last=False)
            self._set_name(name, None)
            return
        entry = _decode_name_entry(value)
        if entry is None:
            self._names_refused.refuse(self.node, key, "not a names entry")
            return
        heard_again = revision is not None and self._name_revisions.get(name) == revision
        self._set_name(name, entry)
        type_name = _name_entry_type(value)
        if type_name is None:
            self._name_types.pop(name, None)
        elif not heard_again:  # (the same entry heard again keeps record_dropped's word)
            self._name_types[name] = type_name
        if revision is not None:
            self._name_revisions[name] = revision
            self._name_deletes.pop(name, None)
            if entry[0] != self.node:
                self.check_duplicate(name)

    def check_duplicate(self, name: str) -> None:
        """Stop this node's placed agent ``name`` if the names bucket holds another
        incarnation of it registered later, on a node this one hears (also asked by
        placement once it takes a local copy as placed).

        Two incarnations of one placed name come from a partition: the survivors counted
        this node lost and re-placed its agents while they ran on here (or this node
        re-placed theirs). Whichever entry is the later one in the names bucket wins:
        the bucket orders every write, so every node picks the same one, and it is where
        names route already. A copy whose put failed (the bucket unreachable) is in the
        bucket nowhere: any entry there was written before it, and wins. Not decided
        while this node's own put of the name is on its way (it may be the later one:
        checked when it lands), nor while the winner's node is unreachable from here
        (then local senders keep the copy here; checked when that node is heard again,
        see ``_apply_member_entry``). The entry of the copy a rebalance moved here, while
        this one's is unwritten, never wins: that copy stops on its node once the move is
        answered, and this one would run nowhere (see :meth:`_entry_stands`).
        """
        local = self._local_names.get(name)
        entry = self._names.get(name)
        if local is None or entry is None or entry[0] == self.node:
            return
        published = self._published_names.get(name)
        if published is not None and published[0] == local:
            written = published[1]
        elif self._unwritten_names.get(name) == local:
            written = 0
        else:
            return  # its put is on its way
        if self._name_revisions.get(name, 0) <= written:
            return
        if not self._entry_stands(entry, self._replaced_by(name, local)):
            return
        if not self.placement.superseded(name, local, entry[0]):
            # A plain kernel.spawn name, registered later on another node: the last
            # registration wins (docs/distributed.md, Addresses); said, as a first step
            # towards the first registration winning, as for placed names. Once per
            # agent: a healed partition or the watch's replay checks it again.
            if self._taken_names.get(name) == local:
                return
            self._taken_names[name] = local
            self._names_taken += 1
            log_guarded(
                log,
                logging.WARNING,
                "node %s: the name %r of agent %s here was registered since by node %s"
                " (plain kernel.spawn names are unique per kernel, the last registration"
                " wins in the cluster): other nodes' sends to %r reach that node's agent,"
                " this one keeps running; a later version may refuse the second"
                " registration instead, as for placed names (cluster.spawn)",
                self.node,
                name,
                local,
                entry[0],
                name,
            )

    def _entry_stands(
        self, holder: tuple[str, uuid.UUID] | None, replaces: tuple[str, uuid.UUID] | None
    ) -> bool:
        """Whether the names bucket entry ``holder`` of a name (None: malformed) stands
        against a local copy of it: the copy's claim (:meth:`_claim`) and its retry
        (:meth:`_write_name_again`) do not overwrite it, and a copy whose entry is older
        or unwritten is a duplicate (:meth:`check_duplicate`). It stands if it is another
        node's, that node heard here in its current process (the entry of a restarted
        node's old process, or of a node counted lost, is overwritten: re-placing that
        agent), and not ``replaces``, the copy a rebalance moved here (stopped on its
        node once the move is answered: this copy is the one to run)."""
        if holder is None or holder == replaces or holder[0] == self.node:
            return False
        info = self.members.members.get(holder[0])
        return info is not None and info.reachable and holder[1].int >> 64 == info.id_prefix

    def _replaced_by(self, name: str, agent_id: uuid.UUID) -> tuple[str, uuid.UUID] | None:
        """The copy local ``agent_id`` (``name``) replaces, if a rebalance moved it here
        and its entry is not written yet (see ``_replacing``)."""
        replacing = self._replacing.get(name)
        return replacing[1] if replacing is not None and replacing[0] == agent_id else None

    def _check_duplicates_on(self, node: str) -> None:
        """``node`` is heard again: the local names whose later incarnation runs there."""
        for name in list(self._local_names):
            entry = self._names.get(name)
            if entry is not None and entry[0] == node:
                self.check_duplicate(name)

    async def _refresh_name(self, name: str) -> None:
        kv = self._names_kv
        if kv is None:
            return
        try:
            check_agent_name(name)
        except ValueError:
            # No node could have written it (every spawn refuses it): not looked up, nor
            # the bucket's entry of its key refused as a peer's malformed one (counted in
            # entries_malformed and logged at each send to it, before)
            return

        async def get() -> tuple[bytes | None, str | None, int | None]:
            try:
                entry = await kv.get(wire.name_key(name))
            except nats.js.errors.KeyNotFoundError as exc:
                # A deleted key's error carries the delete (its revision orders it).
                deleted = getattr(exc, "entry", None)
                return None, "DEL", None if deleted is None else deleted.revision
            return entry.value, entry.operation, entry.revision

        with on_loop(self._aio_loop):  # (the caller may be a task outside the join block)
            value, op, revision = await call_aio(get)
        self._apply_name_entry(wire.name_key(name), value, op, revision)

    async def wait_for_name(self, name: str, timeout: float = 5.0) -> tuple[str, uuid.UUID]:
        """Wait (bounded) until ``name`` is known in the cluster; return ``(node, agent id)``.

        Useful right after another node spawned it (KV propagation takes milliseconds).
        Raises :class:`AgentNotFound` after ``timeout`` seconds (its text says how long
        it waited), :class:`TransportUnavailable` for a name not known here once this
        node left the cluster (or is leaving it) or its connection closed: no lookup
        could answer it.
        """
        with trio.move_on_after(timeout):
            while True:
                if self.kernel.is_local(name):
                    return self.node, self.kernel.lookup(name).id
                entry = self._names.get(name)
                if entry is not None:
                    return entry
                if self._closing:
                    # (its loop closed, a lookup raised asyncio's RuntimeError)
                    raise TransportUnavailable(
                        f"node {self.node!r} left the cluster (or is leaving):"
                        f" {name!r} not looked up"
                    )
                try:
                    await self._refresh_name(name)
                except nats.errors.ConnectionClosedError:
                    raise TransportUnavailable(
                        f"node {self.node!r}'s connection is closed"
                        + (" (it left the cluster)" if self._closing else "")
                        + f": {name!r} not looked up"
                    ) from None
                if name in self._names:
                    continue
                await trio.sleep(0.02)
        raise AgentNotFound(name, detail=f"not in the cluster after waiting {timeout:g}s for it")

    def _note_local_name(self, name: str, agent_id: uuid.UUID | None) -> None:
        """Queue a put (``agent_id``) or delete (None) of a local name in KV, once."""
        if agent_id is None:
            if self._local_names.pop(name, None) is None:
                return
        elif self._local_names.get(name) == agent_id:
            return
        else:
            self._local_names[name] = agent_id
        self._claimed_types.pop(name, None)
        self._taken_names.pop(name, None)
        unwritten = self._unwritten_names.pop(name, None)  # the op queued now decides
        if agent_id is None and unwritten is not None:
            self._unsure_drops[name] = unwritten
        else:
            self._unsure_drops.pop(name, None)
        self._replacing.pop(name, None)
        if self._names_pending == 0:
            self._names_idle = trio.Event()
        self._names_pending += 1
        self._name_ops.send_nowait((name, agent_id))

    def _sync_local_names(self) -> None:
        for ref in self.kernel.agents():
            if ref.name is not None:
                self._note_local_name(ref.name, ref.id)

    async def _publish_names(self) -> None:
        """Trio side: put/delete this node's names in KV, in the order they happened.

        What is queued is taken at once (up to :data:`_kvops.WINDOW` ops) and written
        concurrently, in rounds where each name appears once: the ops of one name keep
        their order, those of distinct names (independent keys) do not wait for each
        other. One at a time (one round trip each), a node spawning thousands of named
        agents fell behind: of 10,000 agents placed over three nodes, a third of one
        node's names reached the bucket 2 s after the last placement was answered."""
        kv = self._names_kv
        assert kv is not None
        recv = self._name_ops_recv
        async for op in recv:
            ops = [op]
            with suppress(trio.WouldBlock):
                while len(ops) < kvops.WINDOW:
                    ops.append(recv.receive_nowait())
            try:
                for names_once in _rounds(ops):
                    try:
                        async with self._names_lock:
                            await self._publish_round(kv, names_once)
                    except Exception as exc:
                        self._name_not_dropped(names_once[0][0], exc)
            finally:
                self._names_pending -= len(ops)
                if self._names_pending == 0:
                    self._names_idle.set()

    async def _publish_round(
        self, kv: KeyValue, ops: Sequence[tuple[str, uuid.UUID | None]]
    ) -> None:
        """Write the puts and deletes of ``ops`` (each name once) concurrently."""
        puts = [(name, agent_id) for name, agent_id in ops if agent_id is not None]
        drops = []
        unsure = []
        for name, agent_id in ops:
            stopped = self._unsure_drops.pop(name, None) if agent_id is None else None
            if agent_id is None and name in self._local_names:
                continue  # a later agent holds the name here: its own write replaces the entry
            if agent_id is None and (published := self._published_names.pop(name, None)):
                drops.append((name, published[1]))
            elif stopped is not None:
                unsure.append((name, stopped))
        if unsure:
            drops += await self._own_entries(kv, unsure, self._names_not_dropped)
        if drops:
            outcomes = await kvops.delete_names(kv, drops, self._names_not_dropped)
            for (name, dropped_at), outcome in zip(drops, outcomes, strict=True):
                if isinstance(outcome, Exception):
                    self._drop_name_again(name, dropped_at)
        if puts:
            written = await kvops.put_values(
                kv,
                [
                    (wire.name_key(name), self._name_value(name, agent_id))
                    for name, agent_id in puts
                ],
            )
            for (name, agent_id), revision in zip(puts, written, strict=True):
                if isinstance(revision, Exception):
                    self._name_unwritten(name, agent_id, revision)
                else:
                    self._name_written(name, agent_id, revision)

    async def _own_entries(
        self,
        kv: KeyValue,
        stopped: Sequence[tuple[str, uuid.UUID]],
        not_read: Callable[[Sequence[tuple[str, Exception]]], None],
    ) -> list[tuple[str, int]]:
        """``(name, revision)`` of each entry of ``stopped`` (``(name, agent id)``: stops of
        agents whose names were unwritten, see _unsure_drops) that the bucket holds as
        this node's of that agent. Read all at once, and the reads the bucket did not
        answer logged as drops not made in one line: read one at a time, each waited out
        its own timeout (nats-py's 5 s: a round of 256 such stops held the names lock
        ~21 minutes), and each logged a line of its own. Those not read are handed to
        ``not_read`` in one call and read again with the retries (_unread_drops): given
        up, an entry that had landed named a stopped agent for good, as a delete that
        failed did before :meth:`_drop_name_again`."""
        entries = await kvops.read_names(kv, [name for name, _ in stopped])
        own = []
        failed = []
        unread = self._unread_drops
        for (name, agent_id), entry in zip(stopped, entries, strict=True):
            if isinstance(entry, Exception):
                failed.append((name, entry))
                unread[name] = agent_id
                continue
            if unread.get(name) == agent_id:
                del unread[name]
            if entry is not None and _decode_name_entry(entry.value) == (self.node, agent_id):
                own.append((name, int(entry.revision)))
        if failed:
            # (read again by the next heartbeat interval's retry; not _retry_wanted,
            # which set here had the retries read a bucket that never answers at once)
            not_read(failed)
        return own

    async def _drop_unread_names(self) -> None:
        """The retries' share of :meth:`_own_entries`: the stops whose entries the bucket
        did not answer a read of, read again; those still not answered wait for the next
        retry (said at DEBUG: the stop said it, as a forgotten node's names are)."""
        kv = self._names_kv
        if kv is None:
            return
        async with self._names_lock:
            if self._closing:
                return
            drops = await self._own_entries(
                kv, list(self._unread_drops.items()), self._names_not_dropped_yet
            )
            outcomes = await kvops.delete_names(kv, drops, self._names_not_dropped)
            for (name, dropped_at), outcome in zip(drops, outcomes, strict=True):
                if isinstance(outcome, Exception):
                    self._drop_name_again(name, dropped_at)

    def _names_not_dropped_yet(self, failed: Sequence[tuple[str, Exception]]) -> None:
        log_guarded(
            log,
            logging.DEBUG,
            "node %s: %s of stopped agents not read yet: %s (%r)",
            self.node,
            count_of(len(failed), "name"),
            first_few([name for name, _ in failed]),
            failed[0][1],
        )

    def claiming(self, name: str, agent_id: uuid.UUID, type_name: str) -> None:
        """Local ``agent_id``, just spawned as ``name`` by placement, has its entry written
        by :meth:`claim_name`, not by the names publisher (whose unconditional put would
        overwrite another node's claim). Called before anything awaits. The entry names
        ``type_name`` too: a node lost after its claim and before its record was written
        has the agent re-placed all the same (see :meth:`placed_type`)."""
        self._local_names[name] = agent_id
        self._claimed_types[name] = (agent_id, type_name)
        self._taken_names.pop(name, None)
        self._unwritten_names.pop(name, None)
        self._replacing.pop(name, None)

    async def claim_name(
        self, name: str, agent_id: uuid.UUID, *, replaces: tuple[str, uuid.UUID] | None = None
    ) -> bool:
        """asyncio side: write ``name``'s entry for local ``agent_id`` (see :meth:`claiming`)
        only if the name is free: the first writer wins, as a globally registered name in
        OTP. ``kv.create`` fails if the key exists; an entry there is then overwritten only
        with a compare-and-set on its revision, and only if it is ``replaces`` (the copy a
        rebalance moves here), this node's own, or held on a node this one does not hear
        (lost: re-placing its agent). An entry of a node this one hears is
        :class:`NameTaken` naming its agent and node. A bucket that does not take the write
        does not fail it: the agent runs, its name unwritten and retried (see
        ``_retry_names``), as for any named agent; False then (True otherwise)."""
        kv = self._names_kv
        if kv is None:
            return True
        if replaces is not None and self._local_names.get(name) == agent_id:
            self._replacing[name] = (agent_id, replaces)  # (its retry may need it)
        key = wire.name_key(name)
        try:
            revision = await self._claim(kv, key, name, agent_id, replaces)
        except NameTaken:
            raise
        except Exception as exc:  # the bucket unreachable (or the entry kept changing)
            self._name_unwritten(name, agent_id, exc)
            return False
        if self._closing or self._local_names.get(name) != agent_id:
            # Its leave may have dropped the names already; or the agent stopped (or was
            # replaced) while the claim was on its way, and its stop's delete found no
            # entry of it to drop: left, the entry would name it for good.
            try:
                await kv.delete(key, last=revision)
            except nats.js.errors.BadRequestError:
                pass  # "wrong last sequence": written again since
            except Exception as exc:  # (the bucket failing: logged, tried again)
                self._name_not_dropped(name, exc)
                self._drop_name_again(name, revision)
            return True
        self._name_written(name, agent_id, revision)
        return True

    async def _claim(
        self,
        kv: KeyValue,
        key: str,
        name: str,
        agent_id: uuid.UUID,
        replaces: tuple[str, uuid.UUID] | None,
    ) -> int:
        """The revision of the entry :meth:`claim_name` wrote (or found its own)."""
        value = self._name_value(name, agent_id)
        for _ in range(_NAME_CLAIM_TRIES):
            try:
                return await kv.create(key, value)
            except nats.js.errors.KeyWrongLastSequenceError:
                pass  # the name has an entry
            try:
                entry = await kv.get(key)
            except nats.js.errors.KeyNotFoundError:
                continue  # deleted meanwhile: free again
            holder = _decode_name_entry(entry.value)
            if holder == (self.node, agent_id) and entry.revision is not None:
                return entry.revision  # (an answer lost, asked again)
            if self._entry_stands(holder, replaces):
                assert holder is not None
                self._apply_name_entry(key, entry.value, entry.operation, entry.revision)
                raise NameTaken(name, holder[1], node=holder[0])
            try:
                return await kv.update(key, value, last=entry.revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                continue  # written by another node meanwhile: read again
        raise TransportUnavailable(
            f"the names bucket entry of {name!r} changed under each of {_NAME_CLAIM_TRIES}"
            " claims of it"
        )

    def _name_value(self, name: str, agent_id: uuid.UUID) -> bytes:
        fields = {"node": self.node, "id": str(agent_id)}
        claimed = self._claimed_types.get(name)
        if claimed is not None and claimed[0] == agent_id:
            fields["type"] = claimed[1]  # (a placed agent's: see placed_type)
        return json.dumps(fields).encode()

    def placed_type(self, name: str) -> str | None:
        """The agent type that ``name``'s names-bucket entry (as this node knows it)
        names: the entry of a placed agent's claim names it, written before the agent's
        placement record. A node lost between the two (SIGKILLed there) left no record,
        only the entry: the survivors re-place the agent by this type, as one recorded
        (see ``Placement.to_replace``). None for a plain ``kernel.spawn`` name, or an
        entry written by an earlier version."""
        return self._name_types.get(name)

    def record_dropped(self, name: str, agent_id: uuid.UUID | None = None) -> None:
        """``name``'s placement record was dropped from the placed bucket (its agent
        stopped for good): the type its names-bucket entry names no longer asks for a
        re-placement (see :meth:`placed_type`). The stop drops the record and the entry
        concurrently; a node SIGKILLed between the two left the entry alone, and its
        loss re-placed the stopped agent from the entry's type.

        ``agent_id``: the agent the dropped record was written for (None: not known, a
        record of an earlier version or not heard). An entry of another agent is a later
        claim (the two buckets' watches are not ordered with each other: it may be heard
        before the earlier incarnation's record's drop) and keeps its type: forgotten,
        that claim was not re-placed if its node was lost before its record was written,
        and its name was refused until the node was forgotten (``forget_lost_after``)."""
        if agent_id is not None:
            entry = self._names.get(name)
            if entry is not None and entry[1] != agent_id:
                return
        self._name_types.pop(name, None)

    async def agent_stopping(self, agent_id: uuid.UUID, name: str | None) -> None:
        """The kernel is about to stop agent ``agent_id`` for good (``kernel.stop``; see
        ``nexus_trio.StopsTold``): a placed agent's record is dropped first,
        so that this node SIGKILLed at any point of the stop leaves the agent running
        (its record kept: re-placed on the loss) or nothing placed; dropped once the
        agent had stopped, a kill before the drop landed had the stopped agent re-placed
        on a survivor. Shielded: the caller's cancel does not leave the agent running
        with its record half dropped. A drop the bucket refuses is logged, and the stop
        goes on."""
        if name is None or self._closing:
            return
        with trio.CancelScope(shield=True), on_loop(self._aio_loop):
            await self.placement.agent_stopped(name, agent_id)

    def names_held_on(self, nodes: Iterable[str]) -> list[str]:
        """The names whose names-bucket entry, as this node knows it, names one of
        ``nodes`` (their agents ran there)."""
        gone = set(nodes)
        return [name for name, (node, _) in self._names.items() if node in gone]

    def _name_written(self, name: str, agent_id: uuid.UUID, revision: int) -> None:
        """This node's entry of ``name`` (``agent_id``) is in the bucket at ``revision``."""
        self._published_names[name] = (agent_id, revision)
        if self._replaced_by(name, agent_id) is not None:
            del self._replacing[name]
        if revision < self._name_revisions.get(name, 0):
            # another incarnation was registered after this one (heard already)
            self.check_duplicate(name)
        else:
            self._name_revisions[name] = revision
            self._set_name(name, (self.node, agent_id))

    def claim_unanswered(self, name: str, agent_id: uuid.UUID) -> None:
        """The caller of :meth:`claim_name` for local ``agent_id`` was cancelled before its
        answer: the entry may be written or not, so it is taken as not written, and
        ``_retry_names`` writes it (or finds it written, or held by another node)."""
        self._name_unwritten(name, agent_id, "its claim's caller was cancelled")

    def _name_unwritten(self, name: str, agent_id: uuid.UUID, exc: Exception | str) -> None:
        """The put of local ``name`` failed (the bucket unreachable: a NATS-cluster
        partition, JetStream down): the agent runs, in the bucket nowhere, so no other
        node can find it, nor judge it a duplicate. Written again by ``_retry_names``."""
        if self._local_names.get(name) != agent_id:
            return  # stopped or replaced since: the op queued for that decides
        self._unwritten_names[name] = agent_id
        if self.held.due(
            self._unwritten_log,
            "names not written to the names bucket",
            counted="names_unwritten",
        ):
            log_guarded(
                log,
                logging.WARNING,
                "node %s: name %r (%s) not written to the names bucket: %r; retried (%d"
                " unwritten now, counted in names_unwritten; logged at most once a second)",
                self.node,
                name,
                agent_id,
                exc,
                len(self._unwritten_names),
            )
        self.check_duplicate(name)  # a holder heard already wins

    async def _retry_names(self) -> bool:
        """Write the local names whose put failed, once the bucket takes writes again.

        Decided as a put at that moment would be, but with the entry found there:
        free (none, or deleted), this node's entry is created; this node's own (its
        put landed, the answer was lost) is kept; the entry of a node this one *hears*
        wins (that incarnation was registered first, and serves the others: a placed
        copy here is stopped as a duplicate, see ``check_duplicate``; a plain named
        agent runs on unregistered, retried); the entry of a node this one does not
        hear (counted lost), or an older one of this node, is overwritten (only that
        revision: a later write wins), as re-placing that node's agent does. False if
        the bucket is still unreachable (the others wait for the next try).
        """
        kv = self._names_kv
        if kv is None:
            return True
        written: list[str] = []
        try:
            for name, agent_id in list(self._unwritten_names.items()):
                if self._closing:
                    return True
                async with self._names_lock:
                    if self._unwritten_names.get(name) != agent_id:
                        continue  # stopped, or written, since
                    try:
                        if await self._write_name_again(kv, name, agent_id):
                            written.append(name)
                    except nats.js.errors.KeyWrongLastSequenceError:
                        continue  # written by another node meanwhile: read again next time
                    except Exception as exc:
                        log_guarded(
                            log,
                            logging.DEBUG,
                            "node %s: name %r still not written: %r",
                            self.node,
                            name,
                            exc,
                        )
                        return False
            return True
        finally:
            # one line a pass (a bucket made anew has every name written again)
            if written:
                log_guarded(
                    log,
                    logging.WARNING,
                    "node %s: %s written to the names bucket on a retry: %s",
                    self.node,
                    count_of(len(written), "name"),
                    first_few(written),
                )

    async def _write_name_again(self, kv: KeyValue, name: str, agent_id: uuid.UUID) -> bool:
        """One name of ``_retry_names`` (under the names lock): whether it was written."""
        key = wire.name_key(name)

        async def read() -> Any:
            try:
                return await kv.get(key)
            except nats.js.errors.KeyNotFoundError:
                return None

        entry = await call_aio(read)
        value = self._name_value(name, agent_id)
        if entry is None:
            revision = await call_aio(kv.create, key, value)
        else:
            holder = _decode_name_entry(entry.value)
            if holder == (self.node, agent_id):
                revision = entry.revision
            elif self._entry_stands(holder, self._replaced_by(name, agent_id)):
                assert holder is not None
                self._apply_name_entry(key, entry.value, entry.operation, entry.revision)
                self.check_duplicate(name)
                log_guarded(
                    log,
                    logging.DEBUG,
                    "node %s: name %r held by node %s: not written",
                    self.node,
                    name,
                    holder[0],
                )
                return False
            else:
                revision = await call_aio(kv.update, key, value, last=entry.revision)
        if self._closing:  # its leave dropped the names already
            await self._delete_name(kv, name, revision)
            return False
        if self._unwritten_names.get(name) == agent_id:
            del self._unwritten_names[name]
        self._names_written_late += 1
        self._name_written(name, agent_id, revision)
        return True

    def _name_not_dropped(self, name: str, exc: Exception) -> None:
        self._names_not_dropped([(name, exc)])

    def _names_not_dropped(self, failed: Sequence[tuple[str, Exception]]) -> None:
        kvops.say_not_dropped(self.node, "name", failed)

    def _drop_name_again(self, name: str, revision: int) -> None:
        """This node's delete of ``name``'s entry at ``revision`` failed (the bucket
        unreachable): tried again with the retries, as a forgotten node's names are (see
        :meth:`_drop_names_of_forgotten`), only while that entry is still there. Left,
        it named a stopped agent for good, and since names are claimed (first writer
        wins) no other node could place the name while this one lived."""
        if not self._closing:
            self._names_of_forgotten[name] = revision
            self._retry_wanted.set()

    async def _delete_name(self, kv: KeyValue, name: str, revision: int) -> None:
        """Delete ``name``'s entry if it is still the one of ``revision`` (one written
        again since is kept)."""
        try:
            # Only if nobody re-registered the name since (optimistic concurrency).
            await call_aio(kv.delete, wire.name_key(name), last=revision)
        except nats.js.errors.BadRequestError as exc:
            # "wrong last sequence": the name was re-registered (or already dropped) since.
            log_guarded(
                log,
                logging.DEBUG,
                "node %s: name %r changed since its entry %d: %r",
                self.node,
                name,
                revision,
                exc,
            )

    def _note_names_of_forgotten(self, node: str, id_prefix: int) -> None:
        """Member ``node`` (its process ``id_prefix``) is forgotten: the names of its
        agents still in the names bucket are to be deleted (a killed process deletes none
        of its own, and a cluster whose peers come back under new names would keep one
        entry per name of each lost process for good, here and in the bucket). Not those
        of placed agents that wait for a member that runs their type (no survivor does):
        their entries say where they ran, which a node that joins later needs to adopt
        them once the survivors that count them left (their placement records are kept
        as long: one entry each, not one per lost process)."""
        revisions = self._name_revisions
        waits = self.placement.waits
        for name, (holder, agent_id) in self._names.items():
            revision = revisions.get(name)
            if holder == node and agent_id.int >> 64 == id_prefix and revision and not waits(name):
                self._names_of_forgotten[name] = revision
        if self._names_of_forgotten:
            self._retry_wanted.set()

    async def _drop_names_of_forgotten(self) -> None:
        """Delete the names noted by :meth:`_note_names_of_forgotten`, each only if its
        entry is still the one noted (a compare-and-set on its revision: every survivor
        tries, one delete lands, and a name registered again since is kept); the watch
        of the bucket then drops them here and on every node. One the bucket does not
        take now is tried again with the next retries."""
        kv = self._names_kv
        if kv is None:
            return
        dropped = 0
        async with self._names_lock:
            if self._closing:
                return
            noted = self._names_of_forgotten
            to_drop = []
            for name, revision in list(noted.items()):
                if self._name_revisions.get(name) != revision:
                    del noted[name]  # written again, or dropped, since
                else:
                    to_drop.append((name, revision))
            outcomes = await kvops.delete_names(kv, to_drop)
            for (name, revision), outcome in zip(to_drop, outcomes, strict=True):
                if isinstance(outcome, Exception):
                    log_guarded(
                        log,
                        logging.DEBUG,
                        "node %s: name %r of a forgotten node not dropped yet: %r",
                        self.node,
                        name,
                        outcome,
                    )
                    continue  # (the bucket unreachable: the next retry)
                dropped += outcome  # (False: another node deleted or wrote it first)
                if noted.get(name) == revision:
                    del noted[name]
        if dropped:
            log_guarded(
                log,
                logging.INFO,
                "node %s: dropped %d name(s) of forgotten nodes (or of this node's stopped"
                " agents, a delete retried) from the names bucket",
                self.node,
                dropped,
            )

    async def names_published(self) -> None:
        """Wait until every local name spawned so far is in (or out of) the KV bucket."""
        self._sync_local_names()
        await self._names_idle.wait()

    async def _follow_kernel(self, task_status: trio.TaskStatus[None]) -> None:
        """Track local named agents and replicas from the kernel's lifecycle events."""
        async with self.kernel.events(buffer=65536) as events:
            self._sync_local_names()
            task_status.started()
            seen_drops = 0
            async for event in events:
                if events.dropped != seen_drops:
                    seen_drops = events.dropped
                    log_guarded(
                        log,
                        logging.WARNING,
                        "node %s: missed lifecycle events; resyncing names",
                        self.node,
                    )
                    self._sync_local_names()
                if event.kind is EventKind.SPAWNED and event.name is not None:
                    if self.kernel.is_local(event.agent_id):
                        self._note_local_name(event.name, event.agent_id)
                elif event.kind is EventKind.STOPPED:
                    name = event.name
                    if name is not None and self._local_names.get(name) == event.agent_id:
                        self._note_local_name(name, None)
                        await self.placement.agent_stopped(name, event.agent_id)
                    await self._forget_replica(event.agent_id)

    async def _follow_dead_letters(self, task_status: trio.TaskStatus[None]) -> None:
        """Durable messages whose delivery died here are retried. (A remote request whose
        Query died here gets the error from the kernel, as the query is dead-lettered:
        :meth:`query_failed`; not from this stream, which drops what overflows it.)"""
        async with self.kernel.dead_letters(buffer=65536) as letters:
            task_status.started()
            async for letter in letters:
                msg = letter.message
                if msg.kind is not _QUERY:
                    continue
                if letter.reason is DeadLetterReason.REQUEST_TIMEOUT:
                    # Its requester stopped waiting (that is what cancelled it).
                    continue
                self.durable.failed(msg, letter.reason.value, letter.error)

    # --- agent types (queue groups) -------------------------------------------------------------

    async def serve_type(self, type_name: str, agent: Any) -> None:
        """Make local ``agent`` (an AgentRef or id) a replica of ``type_name``.

        Messages sent to ``type_address(type_name)`` from any node go to exactly one
        replica in the cluster (a NATS queue group; on a node, replicas take turns).
        The replica is removed when the agent stops.
        """
        with on_loop(self._aio_loop):
            await self._serve_type(type_name, agent)

    async def _serve_type(self, type_name: str, agent: Any) -> None:
        wire.check_type_name(type_name)
        agent_id: uuid.UUID = getattr(agent, "id", agent)
        if not self.kernel.is_local(agent_id):
            raise AgentNotFound(agent_id)
        replicas = self._types.setdefault(type_name, [])
        if agent_id not in replicas:
            replicas.append(agent_id)
        if type_name not in self._type_subs:
            subject = wire.type_subject(self.prefix, type_name)

            async def subscribe() -> Any:
                sub = await self.nc.subscribe(
                    subject,
                    queue=subject,
                    cb=self._on_type_message,
                    pending_msgs_limit=self.options.inbound_limit,
                )
                direct.deliver_inline(sub, self._take_node_message)
                await direct.flush_after_subscribe(self.nc)
                return sub

            self._type_subs[type_name] = await call_aio(subscribe)

    def _pick_replica(self, type_name: str) -> uuid.UUID | None:
        replicas = [r for r in self._types.get(type_name, ()) if self.kernel.is_local(r)]
        if not replicas:
            return None
        return replicas[next(self._type_turn) % len(replicas)]

    async def _forget_replica(self, agent_id: uuid.UUID) -> None:
        for type_name, replicas in list(self._types.items()):
            if agent_id in replicas:
                replicas.remove(agent_id)
                if not replicas:
                    del self._types[type_name]
                    sub = self._type_subs.pop(type_name, None)
                    if sub is not None:
                        # The server first: a message it gave this member of the queue
                        # group in the round trip of the UNSUB reaches _decode_for
                        # (no replica: counted no_such_agent, a query answered with its
                        # error frame), where nats-py's unsubscribe dropped it uncounted
                        try:
                            await call_aio(
                                direct.unsubscribe_server_first, sub, _TYPE_UNSUBSCRIBE_WAIT
                            )
                        except (nats.errors.Error, OSError) as exc:
                            # (a server slow to answer the flushes, or the connection
                            # closed: forgotten here all the same, as before the
                            # server-first unsubscribe; raised, it ended this task and
                            # took the node's nursery down with it)
                            log_guarded(
                                log,
                                logging.WARNING,
                                "node %s: the unsubscribe of type %r's queue group (its"
                                " last replica here stopped) not confirmed by the server:"
                                " %r; a message it gave this node meanwhile is dropped"
                                " uncounted",
                                self.node,
                                type_name,
                                exc,
                            )

    # --- durable -----------------------------------------------------------------------------

    async def send_durable(
        self,
        to: Any,
        payload: Any = None,
        *,
        sender: uuid.UUID = SYSTEM_ID,
        msg_id: uuid.UUID | None = None,
        timeout: float | None = None,
    ) -> Message:
        """Send at least once through JetStream; see :class:`DurableChannel.send`."""
        with on_loop(self._aio_loop):
            return await self.durable.send(
                to, payload, sender=sender, msg_id=msg_id, timeout=timeout
            )

    # --- membership --------------------------------------------------------------------------

    def _stats_summary(self) -> dict[str, Any]:
        s = self.kernel.stats()
        return {
            "accepted": s.accepted,
            "handled": s.handled,
            "dead_lettered": s.dead_lettered,
            "forwarded": s.forwarded,
            "in_flight": s.in_flight,
            "agents_alive": s.agents_alive,
            "published": self._published,
            "received": self._received,
            "publish_failures": self._publish_failures,
            "lost_in_transit": self._seq_in.lost,
            "forwarded_in": self._forwarded_in,
            # for the survivors' count of what is lost if this node is (Placement.node_lost)
            "recv": self._inbound.heartbeat_numbers(self._is_member),
            "held": len(self._inbox) + sum(len(q) for q in self._parked.values()),
            "dropped": sum(self._dropped.values()),
            "errors_replied": dict(self._errors_replied),
            "errors_unsent": dict(self._errors_unsent),
            "lost_at_leave": self._lost_at_leave,
            **self.record_extra,
        }

    def _record(self) -> bytes:
        return encode_record(
            self.node,
            self.id_prefix,
            self._joined_at,
            self._stats_summary(),
            self._session,
            self.options.node_window,
            self.placement.types,
            self.durable.options.enabled,
            self._batch_versions,
            self._join_order,
        )

    async def _heartbeat_once(self) -> None:
        """Announce this node on core NATS (what liveness is judged by) and in KV (so
        that nodes joining later find it)."""
        record = self._record()
        await call_aio(self._control.publish, self._heartbeat_subject, record)
        kv = self._nodes_kv
        assert kv is not None
        await self._write_record(kv, record)

    async def _write_record(self, kv: KeyValue, record: bytes) -> None:
        """Write this node's membership record to the nodes bucket, never over its leave's
        delete. Each write expects the revision this node last wrote or read (a KV update,
        not a put), so one still on its way when the leave deletes the record (sent before
        the leave was announced, held up on the way, its answer lost) is refused by the
        bucket, whichever comes first there: the delete is this node's last write of its
        record. A write refused while the node is not leaving (a write whose answer was
        lost had landed, another process wrote under this node's name, the record was
        deleted or expired) is made again, expecting the revision the bucket holds now;
        not once the leave is announced (that revision may be the leave's delete)."""
        async with self._record_lock:
            await self._write_record_now(kv, record)

    async def _write_record_now(self, kv: KeyValue, record: bytes) -> None:
        if self._leave_announced:
            return  # (waited for the write before it past the announcement)
        try:
            self._record_revision = await call_aio(
                kv.update, self.node, record, self._record_revision
            )
            return
        except nats.js.errors.KeyWrongLastSequenceError:
            if self._leave_announced:
                return
        held, last = await self._read_own_record(kv)
        if self._leave_announced:
            return  # (checked after the read: the revision read may be the leave's delete)
        if self._successors and self._held_by_successor(held):
            # a later process of this name, heard live, wrote the record: this one no
            # longer writes over it (before, it did at each heartbeat, and the later one
            # wrote back: a read by _leave_if_replaced found either, and a process whose
            # heartbeats went unheard through the later one's join wait, busy, not
            # dead, stayed joined beside it); judged now, it leaves
            self._successor_heard.set()
            return
        self._record_revision = await call_aio(kv.update, self.node, record, last)

    def _held_by_successor(self, record: bytes | None) -> bool:
        """Whether ``record`` (the nodes bucket's under this node's name) is a later
        process's of this name, heard live (see _successors)."""
        try:
            holder = decode_record(record or b"", monotonic(), self.node)
        except ValueError:
            return False
        return holder.id_prefix in self._successors

    async def _heartbeats(self) -> None:
        """Core NATS heartbeats: they fail over with the connection in milliseconds, while
        KV (JetStream) may need seconds to elect new stream leaders after a server loss;
        a node must not look dead for that."""
        failing = False
        while True:
            await trio.sleep(self.options.heartbeat_interval)
            self._send_sequence_marks()
            if self._leave_announced:
                continue
            try:
                record = self._record()
                # written to the socket from here when it can be (behind what the control
                # connection's buffer holds): through the asyncio loop, the heartbeat
                # waited its turn behind every callback queued there, one a Trio
                # scheduler round (see _aio), and a node writing its names (1,000 KV
                # puts) while its agents kept each round long sent them seconds apart
                if not direct.publish_at_once(self._control, self._heartbeat_subject, "", record):
                    await call_aio(self._control.publish, self._heartbeat_subject, record)
                if failing:
                    log_guarded(
                        log, logging.INFO, "node %s: heartbeats go through again", self.node
                    )
                failing = False
            except Exception as exc:
                if not failing:
                    log_guarded(
                        log, logging.WARNING, "node %s: heartbeat failed: %r", self.node, exc
                    )
                failing = True

    async def _kv_heartbeats(self) -> None:
        failing = False
        kv = self._nodes_kv
        assert kv is not None
        while True:
            await trio.sleep(self.options.heartbeat_interval)
            if self._leave_announced:
                return
            try:
                if self._buckets_to_check:
                    await self._check_buckets()
                await self._write_record(kv, self._record())
                if failing:
                    log_guarded(
                        log, logging.INFO, "node %s: membership record writable again", self.node
                    )
                    self._retry_wanted.set()
                failing = False
            except Exception as exc:
                if isinstance(exc, nats.js.errors.NoStreamResponseError):
                    self._buckets_to_check = True  # no stream took the write: gone?
                if not failing:
                    log_guarded(
                        log,
                        logging.INFO,
                        "node %s: membership record not written: %r",
                        self.node,
                        exc,
                    )
                failing = True

    def _buckets(self) -> tuple[tuple[str, float | None], ...]:
        """The cluster's KV buckets and their TTLs."""
        opts = self.options
        return (
            (f"{self.prefix}-nodes", opts.heartbeat_interval * opts.missed_heartbeats),
            (f"{self.prefix}-names", None),
            (f"{self.prefix}-placed", None),
        )

    async def _check_buckets(self) -> None:
        """After a reconnect (or a bucket write no stream took): are the buckets those
        this node wrote into? A nats-server restarted without its JetStream store (a new
        store directory, a container without its volume) comes back without them, or
        with ones another node made anew: what this node wrote is gone. Then the
        buckets are made (if still gone) and the node's membership record, names and
        placement records are written again (by the heartbeat and the retries).
        Raises, the check left to the next heartbeat, if the server does not answer."""
        self._buckets_to_check = False
        try:
            gone: list[str] = []
            for stream, born in self._bucket_births.items():
                try:
                    info = await call_aio(self.js.stream_info, stream)
                except nats.js.errors.NotFoundError:
                    gone.append(stream)
                    continue
                if info.created != born:
                    gone.append(stream)
            if not gone:
                return
            for bucket, ttl in self._buckets():
                await self._kv(bucket, ttl=ttl)  # (its birth recorded anew)
        except BaseException:
            self._buckets_to_check = True
            raise
        self._buckets_made_again += 1
        # The new buckets number their entries from 1 again: the revisions known of the
        # old ones would take the new entries for ones heard late. The watches of the
        # old streams hear nothing of the new ones (an ordered consumer resumes after
        # the last sequence it saw): they start again, replaying what the new buckets
        # hold and following them.
        self._name_revisions.clear()
        self._name_deletes.clear()
        # This node's own entries' revisions (and those of the deletes it retries) are
        # the old buckets' too: a delete "only if still at" one of them, for an agent
        # stopped before its name is written again, could match another node's entry
        # of the name at the same number in the new bucket and drop it (fifty-fourth
        # pass). Nothing of this node is in the new bucket until written again, which
        # records the new revisions.
        self._published_names.clear()
        self._names_of_forgotten.clear()
        renewed, self._buckets_renewed = self._buckets_renewed, trio.Event()
        renewed.set()
        for name, agent_id in self._local_names.items():
            self._unwritten_names.setdefault(name, agent_id)
        records = self.placement.write_again()
        log_guarded(
            log,
            logging.WARNING,
            "node %s: KV bucket%s %s gone from NATS or made anew (a nats-server restarted"
            " without its JetStream store?): writing this node's record, %d name%s and %d"
            " placement record%s again",
            self.node,
            "" if len(gone) == 1 else "s",
            ", ".join(stream.removeprefix("KV_") for stream in gone),
            len(self._local_names),
            "" if len(self._local_names) == 1 else "s",
            records,
            "" if records == 1 else "s",
        )
        self._retry_wanted.set()

    async def _retry_writes(self) -> None:
        """Write again what could not be written to the buckets: every heartbeat
        interval while there is any, and at once when they may take writes again (a node
        heard again, this node's membership record written again)."""
        while True:
            with trio.move_on_after(self.options.heartbeat_interval):
                await self._retry_wanted.wait()
            self._retry_wanted = trio.Event()
            if self._closing:
                return
            self._retry_over = trio.Event()
            try:
                if self._unwritten_names and not await self._retry_names():
                    continue
                if self._unread_drops:
                    await self._drop_unread_names()
                if self._names_of_forgotten:
                    await self._drop_names_of_forgotten()
                await self.placement.retry_records()
            finally:
                self._retry_over.set()

    async def _on_heartbeat(self, m: NatsMsg) -> None:
        """asyncio side: another node's heartbeat (or its clean leave: an empty body;
        its last notice, see _on_last_notice, has a header)."""
        node = m.subject[len(self._heartbeat_subject) - len(self.node) :]
        if not m.data and m.headers:
            if wire.LEFT_HEADER in m.headers:
                self._on_last_notice(node, m.headers[wire.LEFT_HEADER])
                return
            session = m.headers.get(wire.SESSION_HEADER)
            deleted = self._deleted_before_leave.get(node)
            if deleted is not None and session == f"{deleted[0]:016x}":
                del self._deleted_before_leave[node]  # (its last heartbeat came before)
            if not self._ends_current_join(node, session):
                return
        elif m.data:
            # (a heartbeat: live, whatever leave was heard of it; a leaving node sends
            # none after its announcement)
            self._left_before_delete.pop(node, None)
            if node in self._deleted_before_leave and self._sent_before_leave(node, m.data):
                return
        self._apply_member_entry(node, m.data, None if m.data else "DEL", live=True)

    def _sent_before_leave(self, node: str, record: bytes) -> bool:
        """Whether a heartbeat of ``node`` was sent before the leave whose delete of its
        record the watch gave already: of the join that delete ended, within a loss
        window of it. The watch's entries are applied as they are read, a subject's
        messages in their turn, so the delete can overtake a heartbeat the server
        delivered before it; taken for the node's, such a heartbeat made it a member
        again until its announcement came (its leave logged twice), or for good had the
        announcement been lost. Only for a loss window: a live node whose record another
        deleted, and whose writes of it fail meanwhile, is heard again by its heartbeats
        after that (a record it writes brings it back at once, see _apply_node_entry)."""
        session, until = self._deleted_before_leave[node]
        if monotonic() >= until:
            del self._deleted_before_leave[node]
            return False
        try:
            sent_in = _record_session(record)
        except ValueError:
            sent_in = None  # (malformed: _apply_member_entry says so)
        # (another join's heartbeat, a restart's, leaves the window open for the last
        # heartbeats of the join that left, which may be read after it)
        return sent_in == session

    def _ends_current_join(self, node: str, session: str | int | None) -> bool:
        """Whether the leave of the join of ``node`` with ``session`` (hex text from a
        leave announcement, or a number) is the leave of the join the member table holds.
        Not when both sessions are known and differ: the leave of an earlier join of the
        node heard after a later one's heartbeat (the announcement travels on another
        connection than the new join's heartbeats, and the bucket's watch lags the core
        subject) must not end the later one. A leave without a session (a node of an
        earlier version), or one that is not a 64-bit hex number, ends the join held."""
        info = self.members.members.get(node)
        if session is None or info is None or info.session is None:
            return True
        if isinstance(session, str):
            try:
                session = int(session, 16)
            except ValueError:
                return True
        if session == info.session:
            return True
        log_guarded(
            log,
            logging.INFO,
            "node %s: the leave of an earlier join of node %r (session %016x) came after"
            " its join %016x was heard: ignored",
            self.node,
            node,
            session,
            info.session,
        )
        return False

    def _apply_node_entry(self, key: str, value: bytes | None, op: str | None) -> None:
        """An entry of the nodes bucket, from its watch: a record, or its delete. A delete
        is for the join whose record the watch gave last (the bucket orders them): it
        does not end a later join of the node already heard on the core subject."""
        sessions = self._record_sessions
        if op in _KV_OPS_DELETED:
            if self._ends_current_join(key, sessions.pop(key, None)):
                info = self.members.members.get(key)
                self._apply_member_entry(key, value, op)
                if (
                    info is not None
                    and info.session is not None
                    and key not in self.members.members
                ):
                    # (a delete, not a PURGE: an expired record leaves the member to
                    # the loss checker)
                    self._note_deleted_before_leave(key, info.session)
            self._left_before_delete.pop(key, None)  # (what the watch gives next is newer)
            return
        if value:
            try:
                sessions[key] = _record_session(value)
            except ValueError:
                sessions.pop(key, None)  # (malformed: _apply_member_entry says so)
            else:
                deleted = self._deleted_before_leave.get(key)
                if deleted is not None and deleted[0] == sessions[key]:
                    # (a record of the join after its delete: written again, the node
                    # lives; its heartbeats count again. Not one of another join: the
                    # process that joined under the name as soon as the leave deleted
                    # the record (a restart within milliseconds) says nothing of the
                    # join that left, whose last heartbeats, read on the core subject
                    # after this, were taken for a second live process of the name)
                    del self._deleted_before_leave[key]
                left = self._left_before_delete.get(key)
                if left is not None and left == sessions[key]:
                    # A record the join wrote before its leave, given by the watch after
                    # the leave was heard on the core subject (the watch lags it): not a
                    # member again (it was taken back until the record's delete came,
                    # and its leave logged twice). A leaving node writes no record
                    # after its announcement (see _write_record).
                    return
        self._apply_member_entry(key, value, op)

    def _on_last_notice(self, node: str, notice: str) -> None:
        """The last notice of a join of ``node`` that left: sent once its data connection
        was closed, it says the last number it took of each sender's stream. The tells
        this node numbered for that join past its number reached NATS after the join
        stopped receiving (sent before this node heard the leave): nobody else can count
        them, so they are counted here, ``lost_at_leave``. Also a leave notice, for the
        join the member table holds (not for a later join of that process)."""
        try:
            prefix, session, taken = _parse_last_notice(notice, self.stream_name)
        except (ValueError, RecursionError) as exc:
            # Anyone may publish on the heartbeat subjects: counted, logged at most once a
            # second, and it changes nothing (no leave, no count)
            self._dropped["malformed_notice"] += 1
            if self.held.due(
                self._notice_log,
                "malformed last notices ignored",
                counted='inbound_dropped["malformed_notice"]',
            ):
                log_guarded(
                    log,
                    logging.WARNING,
                    "node %s: ignoring a malformed last notice on the subject of %r (%s;"
                    " %d malformed so far): %s",
                    self.node,
                    node,
                    exc if isinstance(exc, ValueError) else "nested too deeply",
                    self._dropped["malformed_notice"],
                    brief(notice),
                )
            return
        info = self.members.members.get(node)
        if info is not None and info.id_prefix == prefix and info.session in (None, session):
            self._apply_member_entry(node, None, "DEL")
        # (none awaited: all confirmed, or counted already as the notice was late)
        stream = self._left_streams.pop((node, prefix, session), None)
        if stream is None:
            return
        self._notice_settled()
        taken = max(taken, stream.confirmed)  # (what it confirmed, it counted)
        if stream.sent > taken:
            self._lost_at_leave += stream.sent - taken
            self._counted_at_leave((node, prefix, session))
            log_guarded(
                log,
                logging.WARNING,
                "node %s: %d tells for node %r were lost: they reached NATS after it left"
                " (numbered up to %d, it took up to %d), counted in lost_at_leave",
                self.node,
                stream.sent - taken,
                node,
                stream.sent,
                taken,
            )

    def _apply_member_entry(
        self, key: str, value: bytes | None, op: str | None, *, live: bool = False
    ) -> None:
        """A record or a leave (a delete) of node ``key``, from the nodes bucket's watch or
        the heartbeat subjects. This node's own entry is its own join's records only: a
        delete of its key or a leave on its subject (an earlier process of its name, its
        own leave's delete, anyone on the account) never removes it, and a record under
        its name from another process (another id prefix or session) never replaces it;
        it is a member of its own table until it leaves. ``live``: heard on the
        heartbeat subjects (sent just now), not given by the bucket's watch."""
        if op == "DEL":
            if key == self.node:
                return
            info = self.members.left(key)
            if info is not None:
                self._note_departed(info)
                log_guarded(log, logging.INFO, "node %s: node %r left the cluster", self.node, key)
                if info.session is not None:
                    self._note_left_before_delete(key, info.session)
                # (one lost before was counted then, see Placement.node_lost)
                self._restart_streams(key, info if info.reachable else None)
                self._forget_names_of(info)
                self._drop_hidden_names_of(key)
                self.placement.member_left(key)
                self.durable.takeovers_changed()
            return
        if op == "PURGE" or not value:
            return  # expired by TTL: the loss checker decides, on this node's clock
        try:
            info = decode_record(value, monotonic(), key)
        except ValueError as exc:
            self._records_refused.refuse(self.node, key, str(exc))
            return
        if info.node == self.node and (info.id_prefix, info.session) != (
            self.id_prefix,
            self._session,
        ):
            if live:
                self._records_contested += 1
                if info.id_prefix != self.id_prefix and self._joined_before(info):
                    self._successors[info.id_prefix] = None
                    self._successors.move_to_end(info.id_prefix)
                    if len(self._successors) > _SUCCESSORS_MAX:
                        self._successors.popitem(last=False)
                    self._successor_heard.set()  # (judged by _leave_if_replaced)
            if self.held.due(
                self._own_name_log,
                "membership records under this node's name from another process ignored",
            ):
                log_guarded(
                    log,
                    logging.WARNING,
                    "node %s: ignoring a membership record under its own name from another"
                    " process (pid %d on %s, id prefix %016x; an earlier process of this"
                    " name, or two nodes named %r?)",
                    self.node,
                    info.pid,
                    info.host,
                    info.id_prefix,
                    self.node,
                )
            return
        previous = self.members.members.get(info.node)
        if previous is not None and info.node != self.node:
            if previous.id_prefix != info.id_prefix:
                if info.compare_join(previous) <= 0 and (previous.reachable or not live):
                    # A late record of an older process under that name (stale), or,
                    # heard live, a process that still runs under it: two of one name,
                    # or a peer speaking for it. The one held stays while it is heard
                    # (one with the same join time too: the first heard, not one then
                    # the other at each heartbeat, each taken for a restart of the
                    # other); once it went silent, the one heard live is taken back
                    if live:
                        self._contested(info, previous)
                    return
                if previous.reachable:
                    # A new process under the name (a restart) before the old one's loss
                    # was noticed: the old one is lost all the same (its agents re-placed,
                    # what it held counted); first, while its streams are still known.
                    self._node_lost(
                        previous,
                        f"node {previous.node!r} (pid {previous.pid} on {previous.host})"
                        f" restarted (pid {info.pid} on {info.host}) before its loss was"
                        " noticed",
                    )
            if previous.joined != info.joined:
                # joined again (its leave unheard here): the new join counts from number 1
                same = previous.id_prefix == info.id_prefix and previous.reachable
                self._restart_streams(info.node, previous if same else None)
        if (previous is None or previous.joined != info.joined) and info.node != self.node:
            self._compare_windows(info)
        if (
            info.node != self.node
            and info.reads_batches(batch.COLUMNAR)
            and (
                previous is None
                or previous.id_prefix != info.id_prefix
                or not previous.reads_batches(batch.COLUMNAR)
            )
        ):
            # a link made before this record (the credit link of a batch that came
            # first): NXB3 from its next batch on, never mid-batch (see _new_link)
            link = self._links.get((info.node, info.id_prefix))
            if link is not None:
                link.read_columnar_next()
        back = self.members.heard(info)
        if back:
            log_guarded(
                log, logging.WARNING, "node %s: node %r is reachable again", self.node, info.node
            )
            self._check_duplicates_on(info.node)
            self._restore_hidden_names(info.node)
            self._retry_wanted.set()  # a partition healed: the buckets may take writes again
        if info.node != self.node and (
            back
            or previous is None
            or previous.types != info.types
            or previous.durable != info.durable
            or not previous.reachable
        ):
            # it may run types no member heard ran: placed agents waiting for one go
            self.placement.owners_changed()
            # (a new member, or one that runs the durable path now, may be the one to
            # take over a lost node's durable messages)
            self.durable.takeovers_changed()
        # (what its loss counted here that it took after all is no longer counted lost)
        self.placement.heard_from(info)

    def _contested(self, info: NodeInfo, held: NodeInfo) -> None:
        """A record heard live under the name of member ``held`` from a process that
        joined no later than it (see _apply_member_entry): ignored, counted, and said at
        most once a second, naming both processes."""
        self._records_contested += 1
        if not self.held.due(
            self._contested_log,
            "membership records of another process under a member's name ignored",
            counted="records_contested",
        ):
            return
        log_guarded(
            log,
            logging.WARNING,
            "node %s: ignoring a membership record of node %r from pid %d on %s (id prefix"
            " %016x, joined %.3f): this node holds the process of that name that joined"
            " %s it (pid %d on %s, id prefix %016x, joined %.3f); two live processes named"
            " %r, or a peer on the NATS account speaking for it (%d such records so far)%s",
            self.node,
            info.node,
            info.pid,
            info.host,
            info.id_prefix,
            info.joined,
            "after" if info.compare_join(held) < 0 else "at the same time as",
            held.pid,
            held.host,
            held.id_prefix,
            held.joined,
            info.node,
            self._records_contested,
            (
                ""
                if info.join_order is None or held.join_order is None
                else "; joins ordered by the nodes bucket, not the hosts' clocks: revision"
                f" {info.join_order[1]} against {held.join_order[1]}"
                + (
                    ""
                    if info.join_order[0] == held.join_order[0]
                    else " (the held one's in the bucket made anew)"
                )
            ),
        )

    def _note_left_before_delete(self, node: str, session: int) -> None:
        """The leave of ``node``'s join ``session`` was heard: until the watch gives the
        delete of its record (when the leave was heard there, at once), the join's
        records it gives are stale (see _apply_node_entry). Kept for the last
        _LEFT_STREAMS_MAX leaves whose delete never came (the leave's delete failed)."""
        _mark(self._left_before_delete, node, session)

    def _note_deleted_before_leave(self, node: str, session: int) -> None:
        """The watch gave the delete of the record of ``node``'s join ``session`` before
        its leave was heard on the core subject: until its announcement comes (or a
        record of it written after the delete: the node lives, its record was deleted
        by another), the join's heartbeats are stale (see _on_heartbeat). Kept for the
        last _LEFT_STREAMS_MAX such deletes (an announcement that never came), each for
        one loss window at most."""
        _mark(self._deleted_before_leave, node, (session, monotonic() + self.members.lost_after))

    def _compare_windows(self, info: NodeInfo) -> None:
        """A join heard for the first time: warn if its ``node_window`` is not this
        node's. Its gaps are judged by its own window all the same (see _window_of); but
        this node's credit and its gaps to it follow this node's, and a node of an
        earlier version, which does not say its window, judges by its own."""
        if info.window is not None and info.window != self.options.node_window:
            log_guarded(
                log,
                logging.WARNING,
                "node %s: node %r has node_window %d, this node %d: give the nodes of a"
                " cluster the same ClusterOptions.node_window",
                self.node,
                info.node,
                info.window,
                self.options.node_window,
            )

    def _note_departed(self, info: NodeInfo) -> None:
        """Keep ``info`` (a member that left the table) for :meth:`departed`, with the
        tells sent to its process so far (its stream's count goes with its links)."""
        departed = self._departed
        departed[info.node] = (info, self.tells_sent_to(info.node, info.id_prefix))
        departed.move_to_end(info.node)
        if len(departed) > _DEPARTED_MAX:
            departed.popitem(last=False)

    def _forget_lost_members(self, now: float) -> None:
        """Forget the members lost ``forget_lost_after`` seconds ago (see _check_members)."""
        for info in self.members.forget_lost(now, self.options.forget_lost_after):
            self._nodes_forgotten += 1
            self._note_departed(info)
            self._record_sessions.pop(info.node, None)
            self._note_names_of_forgotten(info.node, info.id_prefix)
            self._drop_hidden_names_of(info.node)
            log_guarded(
                log,
                logging.INFO,
                "node %s: forgot node %r (lost %.0fs ago; a send to its agents is now"
                " AgentNotFound, not TransportUnavailable)",
                self.node,
                info.node,
                now - info.last_seen - self.members.lost_after,
            )

    async def _check_members(self) -> None:
        interval = self.options.heartbeat_interval
        # the longest a hold lasts (see below): the loss window itself
        longest = interval * self.options.missed_heartbeats
        checked = held_until = hold_started = monotonic()
        held = False
        while True:
            await trio.sleep(interval / 2)
            now = monotonic()
            if now - checked > interval:
                # This process stalled (a GC pause, a starved CPU): the heartbeats that
                # came meanwhile still wait in the socket, read by this thread too
                # (trio-asyncio). Silence is judged again once they had an interval to
                # be read, and each live peer to send a fresh one. A stall during the
                # hold (pauses come in bursts) extends it, but a hold ends within the
                # loss window of its start, late or not: a process starved for good
                # (every check late) still judges a dead peer lost.
                if not held:
                    hold_started = now
                if now - hold_started < longest:
                    held_until = now + interval
            checked = now
            held = now < held_until
            if held:
                continue
            if self.members.silent(now):
                # Before a member is judged lost, what waits in this node's socket is read:
                # the hold ends by the clock, and a check that woke from a stall past it
                # (stalls in a row, a loaded machine) judged at once, before this thread
                # had read the heartbeats that came meanwhile: a live peer was lost.
                await self._read_pending_heartbeats()
                checked = now = monotonic()
                for info in self.members.newly_lost(now):
                    self._node_lost(info)
            self._count_late_notices(now)
            self._forget_lost_members(now)
            # streams of senders gone (left, lost, replaced) leave the heartbeat record
            self._inbound.retire_gone(self._is_live_member, self.options.heartbeat_interval)
            members = self.members.by_prefix
            for counts in (self._alone_out, self._alone_in):
                if len(counts) > len(members) + _PEER_COUNTS_SLACK:
                    # the ids of clients that are no kernel (JSON requesters) and of
                    # members forgotten: only a member's count is ever read
                    for key in [key for key in counts if key not in members]:
                        del counts[key]

    async def _read_pending_heartbeats(self) -> None:
        """Read and apply the heartbeats that reached this node so far: a PING on the
        control connection, whose PONG comes after every heartbeat the server sent it
        before, then until the subscription's queue is handled (``_on_heartbeat`` never
        waits). Waits the loss window at most: a connection down, or an asyncio side that
        cannot run (a task blocking this thread), reads nothing more, and the check
        judges on what was read (the read goes on, and its heartbeats count when read)."""
        sub, control = self._heartbeat_sub, self._ctl
        window = self.members.lost_after
        if sub is None or control is None:
            return
        read = self._heartbeats_read
        if read is None:
            read = self._heartbeats_read = trio.Event()

            async def drain() -> None:
                try:
                    await direct.flush(control, max(1, math.ceil(window)))
                    # (what is queued now is handled in order, all of it at the task's
                    # next turn: bounded, as more keep coming)
                    for _ in range(sub.pending_msgs):
                        await asyncio.sleep(0)
                        if not sub.pending_msgs:
                            break
                except (nats.errors.Error, TimeoutError) as exc:
                    log_guarded(
                        log,
                        logging.INFO,
                        "node %s: could not read the pending heartbeats before judging: %r",
                        self.node,
                        exc,
                    )
                finally:
                    read.set()
                    self._heartbeats_read = None

            # (not awaited through call_aio: a Trio timeout would wait there until the
            # asyncio side ran to take the cancellation; a PING whose wait ends early,
            # its timeout or a cancel, is defused by direct.flush)
            self._drain_task = current_aio_loop().create_task(drain())
        with trio.move_on_after(window):
            await read.wait()

    def _is_member(self, node: str, id_prefix: int) -> bool:
        info = self.members.members.get(node)
        return info is not None and info.id_prefix == id_prefix

    def _is_live_member(self, node: str, id_prefix: int) -> bool:
        info = self.members.members.get(node)
        return info is not None and info.reachable and info.id_prefix == id_prefix

    def _node_lost(self, info: NodeInfo, reason: str | None = None) -> None:
        self._nodes_lost += 1
        lost_by_node = self._lost_by_node
        if lost_by_node is not None:
            lost_by_node[info.node] = lost_by_node.get(info.node, 0) + 1
            if len(lost_by_node) > _LOST_BY_NODE_MAX:
                self._lost_by_node = None  # (new names at every restart: bounded)
        if reason is None:
            silent = monotonic() - info.last_seen
            reason = (
                f"node {info.node!r} (pid {info.pid} on {info.host}) missed"
                f" {self.options.missed_heartbeats} heartbeats: silent for {silent:.1f}s"
            )
        log_guarded(log, logging.WARNING, "node %s: %s", self.node, reason)
        # The event names the node; its agent_id is the first id of the node's id space.
        self.kernel.report_event(
            LifecycleEvent(
                EventKind.UNREACHABLE,
                node_uuid(info.id_prefix),
                f"node:{info.node}",
                trio.current_time(),
                reason,
            )
        )
        for query_id, (to, node) in list(self._outstanding.items()):
            if node == info.node:
                del self._outstanding[query_id]
                self._requests_lost_with_nodes += 1
                self._fail_request(
                    query_id,
                    TransportUnavailable(
                        f"node {info.node!r} hosting {to} is unreachable: it was lost while"
                        f" the request waited for its answer ({reason})"
                    ),
                )
        # Tells waiting for its credit: routed again, they fail as a new send does (the
        # links stay: a node heard from again credits what it took meanwhile).
        for (node, _), link in self._links.items():
            if node == info.node:
                link.wake_waiters()
        numbered = self._seq_out.get((info.node, info.id_prefix), 0)
        if numbered:
            # what the count below covers: not counted again if this node leaves with
            # some of it unsent (see _unsent_at_leave)
            lost = self._lost_numbered
            join = (info.node, info.id_prefix, info.session)
            lost[join] = max(numbered, lost.pop(join, 0))
            if len(lost) > _LEFT_STREAMS_MAX:
                lost.popitem(last=False)
        self.placement.node_lost(info)
        # its durable messages: one survivor takes them over (see DurableChannel.take_over)
        self.durable.takeovers_changed()

    def member_list(self) -> list[NodeInfo]:
        """The nodes as last seen (including this one), sorted by name."""
        return sorted(self.members.members.values(), key=lambda i: i.node)

    def ever_heard(self) -> frozenset[str] | None:
        """The nodes this node has heard from since it joined (itself included), also
        those that left or were lost and forgotten since; None when there were too many
        to keep (see ``Membership.ever_heard``)."""
        heard = self.members.ever_heard
        return None if heard is None else frozenset(heard)

    def departed(self) -> dict[str, tuple[NodeInfo, int]]:
        """Per node that left this node's member table (its leave heard, or forgotten
        ``forget_lost_after`` seconds after its loss): its last record there (not
        ``reachable``: it was still lost here), and the numbered tells this process had
        sent to that process by then (what :meth:`tells_sent_to` said, which no longer
        does once its streams are gone); the last 4,096 that left, oldest first. One
        that is a member again since is listed all the same (ask the member table
        first)."""
        return dict(self._departed)

    def live_nodes(self) -> list[str]:
        """The reachable members (this node always among them), sorted by name."""
        live = {n for n, info in self.members.members.items() if info.reachable}
        live.add(self.node)
        return sorted(live)

    async def announce(self) -> None:
        """Publish this node's record (its counters) now, not at the next heartbeat
        (nothing once its leave is announced)."""
        if self._leave_announced:
            return
        with on_loop(self._aio_loop):
            await self._heartbeat_once()

    # --- placement (see _placement) ------------------------------------------------------------

    def register_type(self, type_name: str, spec: Any) -> None:
        """Let this node run placed agents of ``type_name`` (see :meth:`spawn`): ``spec``
        is an AgentSpec (``@agent``) or an Agent subclass. Anything else (a Supervisor, a
        handler without ``@agent``) is a TypeError naming the type, a name that is no
        NATS token a ValueError, here (see ``_placement.check_agent_type``). This node's
        membership record names its types: a joined node's is written again at once, and
        placed agents of lost nodes that waited for a member running the type are
        re-placed (on this node's loop, whichever task calls it)."""
        with on_loop(self._aio_loop):
            self.placement.register(type_name, spec)

    async def spawn(
        self, type_name: str, *, name: str, node: str | None = None, timeout: float = 5.0
    ) -> PlacedAgent:
        """Spawn an agent of a registered type on the member that owns ``name`` (or
        on ``node``); see ``Placement.spawn`` and docs/distributed.md."""
        with on_loop(self._aio_loop):
            return await self.placement.spawn(type_name, name=name, node=node, timeout=timeout)

    async def rebalance(self) -> list[str]:
        """Move this node's hash-placed agents to the members that now win them (after
        members joined); the names moved. See ``Placement.rebalance``."""
        with on_loop(self._aio_loop):
            return await self.placement.rebalance()

    @property
    def closing(self) -> bool:
        """True once this node started leaving the cluster (its loops wind down)."""
        return self._closing

    def readiness(self) -> str | None:
        """None while this node is joined and both its NATS connections are up, else why
        not: ``not joined`` (connecting, announcing, loading the tables), ``nats
        connection down since N s (control, data)`` (nats-py reconnecting; the roles that
        are down), ``nats connection closed`` (it gave up reconnecting), ``leaving``
        (from when the :func:`join_cluster` block is left), ``jetstream unavailable since N
        s`` (its connections up, the durable path's fetches of this node's consumer have
        failed since then, refused or not answered at all: until one works). :func:`join_cluster` adds it to the kernel's
        readiness (``/readyz``) for the join's length."""
        if self._ready_phase != "joined":
            return self._ready_phase
        down = {
            role: at
            for role in ("control", "data")
            if (at := self.connections.down_at(role)) is not None
        }
        if not down:
            since = self.durable.fetch_failing_since
            if since is None:
                return None
            return f"jetstream unavailable since {trio.current_time() - since:.0f} s"
        first = min(down.values())
        if first == -math.inf:
            return "nats connection closed"
        roles = ", ".join(sorted(down))
        return f"nats connection down since {trio.current_time() - first:.0f} s ({roles})"

    @property
    def control(self) -> NatsClient:
        """The control connection (membership, names, placement requests)."""
        return self._control

    @property
    def stream_name(self) -> str:
        """How receivers name this process's stream of numbered tells (its node batches
        carry the node, this join's session and the id prefix; see ``_open_batch``)."""
        return f"{self.node}:{self._session:x}.{self.id_prefix:x}"

    def tells_sent_to(self, node: str, id_prefix: int) -> int:
        """Numbered tells this process sent to process ``id_prefix`` of ``node``."""
        return self._seq_out.get((node, id_prefix), 0)

    def tells_taken_from(self, node: str, id_prefix: int) -> int:
        """Numbered tells of process ``id_prefix`` of ``node`` that this process took:
        received, or counted lost on the way (kept while its streams are)."""
        return self._inbound.taken_from(node, id_prefix)

    def queries_and_replies_sent_to(self, id_prefix: int) -> int:
        """Queries and replies this process handed to NATS for process ``id_prefix`` (the
        node at the other end, whoever made them: a query a handler here sends on to it
        counts for it, not for its requester), whatever came of them (a query to a type
        counts once an answer says which process took it; one the NATS client refused
        is not counted here: it is lost, counted in ``publish_failures``)."""
        return self._alone_out.get(id_prefix, 0)

    def queries_and_replies_taken_from(self, id_prefix: int) -> int:
        """Queries and replies (and messages to a type) that came to this process from
        process ``id_prefix`` (the node at the other end: a query's requester node, as
        its reply subject says; an answer's node asked, or the node that passed it on,
        as its ``Nexus-Relayed`` header says; else the process a message's id names: a
        reply no longer known here that no node passed on, a message to a type without
        a reply subject), whoever made them: delivered here, late, or refused, or
        dropped unread, and counted."""
        return self._alone_in.get(id_prefix, 0)

    def name_holder(self, name: str) -> tuple[str, uuid.UUID] | None:
        """``(node, agent id)`` of ``name`` as this node knows it (no round trip)."""
        if self.kernel.is_local(name):
            return self.node, self.kernel.lookup(name).id
        return self._names.get(name)

    def name_entry(self, name: str) -> tuple[str, uuid.UUID] | None:
        """``(node, agent id)`` of ``name``'s names-bucket entry as this node knows it
        (not this kernel's own agent of the name, as :meth:`name_holder` says first)."""
        return self._names.get(name)

    def holds_name(self, name: str, agent_id: uuid.UUID) -> bool:
        """Whether ``name``'s entry in the names bucket is this node's ``agent_id``, as far
        as this node knows: its put landed, and no later entry of the name was heard."""
        published = self._published_names.get(name)
        return (
            published is not None
            and published[0] == agent_id
            and self._name_revisions.get(name, 0) <= published[1]
        )

    def learn_name(self, name: str, node: str, agent_id: uuid.UUID, *, named: bool = True) -> None:
        """Note where ``name`` runs (a placement answer), ahead of the names bucket; not
        if ``node`` left since (it answered, then left cleanly: its leave dropped the name,
        maybe before the answer was read here, see _forget_names_of).

        ``named`` False: the copy's claim of the name failed (the bucket did not take
        it). Its node stops it as a duplicate of an entry the bucket holds for the name,
        of a node it hears (see check_duplicate), and nothing in the bucket changes: the
        route learnt here would stay, to a copy gone. So an entry known here of another
        node heard here is kept (the copy's node will stop the copy); one of a node not
        heard is set aside, and routes the name again once that node is heard (see
        _restore_hidden_names), unless the bucket said otherwise since. A second such
        answer keeps the entry set aside (what ``_names`` holds then is the first copy,
        no bucket entry): only the copy learnt changes."""
        if node != self.node and node not in self.members.members:
            return
        entry = (node, agent_id)
        held = self._names.get(name)
        if not named and held is not None and held != entry:
            if self._entry_stands(held, None):
                return
            hidden = self._hidden_names.get(name)
            self._hidden_names[name] = (held if hidden is None else hidden[0], entry)
        self._set_name(name, entry)

    def _restore_hidden_names(self, node: str) -> None:
        """``node`` is heard again: the names bucket entries of it that placement answers
        hid (see learn_name) route their names again, where the copy learnt still does."""
        for name, (hidden, copy) in list(self._hidden_names.items()):
            if hidden[0] != node:
                continue
            del self._hidden_names[name]
            if self._names.get(name) == copy and self._entry_stands(hidden, None):
                self._set_name(name, hidden)

    def _drop_hidden_names_of(self, node: str) -> None:
        """``node`` left or is forgotten: the entries of it that placement answers set
        aside (see learn_name) are never given back (one heard again later is a new
        member); kept, they would grow with every name it held."""
        hidden = self._hidden_names
        for name in [name for name, (held, _) in hidden.items() if held[0] == node]:
            del hidden[name]

    def _forget_names_of(self, info: NodeInfo) -> None:
        """``info``'s node left cleanly: its names are no longer where anything runs. Its
        leave drops them from the bucket, but one learnt here from a placement answer read
        after that drop was heard would stay (a later process of the name, another id
        prefix, keeps its own)."""
        for name, (holder, agent_id) in list(self._names.items()):
            if holder == info.node and agent_id.int >> 64 == info.id_prefix:
                self._set_name(name, None)

    async def watch_bucket(
        self, kv: KeyValue, apply: Any, task_status: trio.TaskStatus[None]
    ) -> None:
        """Apply every update of ``kv`` (started once the current values are in)."""
        await self._start_watch(kv, apply, task_status)

    # --- watchers (asyncio side) -------------------------------------------------------------

    async def _start_watch(
        self,
        kv: KeyValue,
        apply: Any,
        task_status: trio.TaskStatus[None],
        *,
        revisions: bool = False,
    ) -> None:
        """Apply every KV update to local state; started once the initial values are in.
        ``apply(key, value, operation)``, and the entry's revision with ``revisions``."""

        def apply_entry(entry: Any) -> None:
            if revisions:
                apply(entry.key, entry.value, entry.operation, entry.revision)
            else:
                apply(entry.key, entry.value, entry.operation)

        watch = kvops.Watch(apply_entry)
        # (taken before each start: buckets made anew during a start start it again)
        renewed = self._buckets_renewed
        await call_aio(watch.start, self.js, kv)
        task_status.started()
        try:
            while True:
                # (the buckets made anew: see _check_buckets)
                await renewed.wait()
                renewed = self._buckets_renewed
                old, watch = watch, kvops.Watch(apply_entry)
                with trio.move_on_after(2):
                    try:
                        await call_aio(old.stop)
                    except Exception as exc:
                        log_guarded(
                            log, logging.DEBUG, "node %s: stopping a KV watcher: %r", self.node, exc
                        )
                while True:
                    try:
                        await call_aio(watch.start, self.js, kv)
                        break
                    except (nats.errors.Error, OSError) as exc:
                        # (the server gone again meanwhile: tried again a heartbeat later)
                        log_guarded(
                            log,
                            logging.WARNING,
                            "node %s: watching a KV bucket made anew failed: %r",
                            self.node,
                            exc,
                        )
                        with suppress(Exception):
                            await call_aio(watch.stop)
                        watch = kvops.Watch(apply_entry)
                        await trio.sleep(self.options.heartbeat_interval)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                try:
                    await call_aio(watch.stop)
                except Exception as exc:
                    log_guarded(
                        log, logging.DEBUG, "node %s: stopping a KV watcher: %r", self.node, exc
                    )

    # --- lifecycle ---------------------------------------------------------------------------

    async def _run_deliveries(self, task_status: trio.TaskStatus[None]) -> None:
        """The nursery of the tasks that deliver what could not be delivered at once (the
        pump, and the tasks that deliver parked messages, see _deliver_parked), apart
        from the cluster's: the leave ends them before it closes the outbox (see
        _stop_deliveries), so that a query they refuse still gets its error frame."""
        try:
            async with trio.open_nursery() as nursery:
                self._deliveries = nursery
                try:
                    nursery.start_soon(self._pump)
                    task_status.started()
                    await trio.sleep_forever()
                finally:
                    # Before the nursery waits for its tasks: it stops taking new ones as
                    # the last ends, and this task would learn that only when it resumes
                    # (a tell for a full mailbox in between raised "closed to new
                    # arrivals"). From here such a tell is refused (see _admit).
                    self._deliveries = None
        finally:
            self._deliveries_ended.set()

    async def _stop_deliveries(self) -> None:
        """Leaving: cancel the delivering tasks and wait for them to settle what they hold
        (each refuses what it waits with and what is parked behind that: nothing is
        parked once they have ended), then refuse what is still in the inbox; all while
        the outbox is open, for the error frames of refused queries."""
        nursery = self._deliveries
        if nursery is not None:
            nursery.cancel_scope.cancel()
            await self._deliveries_ended.wait()
        self._inbox.close()
        for item in self._inbox.take_nowait():
            self._refuse_inbound(item)

    async def _start(self, nursery: trio.Nursery) -> None:
        # first: messages may be parked as soon as the subscriptions start
        await nursery.start(self._run_deliveries)
        opts = self.options
        ttl = opts.heartbeat_interval * opts.missed_heartbeats
        self._nodes_kv = await self._kv(f"{self.prefix}-nodes", ttl=ttl)
        self._names_kv = await self._kv(f"{self.prefix}-names", ttl=None)
        await self._outbox.start()
        self._batch_bytes = batch.batch_limit(self.max_payload(), self.node, opts.batch_bytes)
        # Judged before this node takes anything meant for its name; subscribed before
        # its record (which makes it a live member to the others) is written
        sub: Any = None

        async def subscribe() -> None:
            nonlocal sub
            sub = await self.nc.subscribe(
                wire.node_wildcard(self.prefix, self.node),
                cb=self._on_node_message,
                pending_msgs_limit=opts.inbound_limit,
                pending_bytes_limit=0,
            )
            direct.deliver_inline(sub, self._take_node_message)
            await direct.flush_after_subscribe(self.nc)

        async def unsubscribe() -> None:
            nonlocal sub
            if sub is not None:
                sub, was = None, sub
                await was.unsubscribe()

        await self._claim_the_name(
            functools.partial(call_aio, subscribe), functools.partial(call_aio, unsubscribe)
        )

        # this join's place among the joins under any name, as the server ordered them
        # (the bucket's revision of its first record), not this host's clock: every
        # record says it (the first one too unless the bucket was too busy, see
        # _claim_in_order)
        async def subscribe_heartbeats() -> None:
            self._heartbeat_sub = await self._control.subscribe(
                f"{self.prefix}.hb.*", cb=self._on_heartbeat
            )
            await direct.flush_after_subscribe(self._control)

        await call_aio(subscribe_heartbeats)
        # (its record is in the bucket already: _claim_the_name wrote it)
        await call_aio(self._control.publish, self._heartbeat_subject, self._record())
        await nursery.start(self._start_watch, self._nodes_kv, self._apply_node_entry)
        await nursery.start(
            functools.partial(self._start_watch, revisions=True),
            self._names_kv,
            self._apply_name_entry,
        )
        # (each bucket's birth recorded as _kv opened it)
        await self.placement.start(nursery, await self._kv(f"{self.prefix}-placed", ttl=None))
        nursery.start_soon(self._flush_batches)
        nursery.start_soon(self._heartbeats)
        nursery.start_soon(self._kv_heartbeats)
        nursery.start_soon(self._check_members)
        nursery.start_soon(self._publish_names)
        nursery.start_soon(self._retry_writes)
        nursery.start_soon(self._leave_if_replaced)
        await nursery.start(self._follow_kernel)
        await nursery.start(self._follow_dead_letters)
        await self.durable.start(nursery)
        await self.names_published()

    async def _leave_if_replaced(self) -> None:
        """Leave the cluster once a later process of this node's name holds it: heard
        live (its heartbeats, see _apply_member_entry) and its record the one the nodes
        bucket holds under the name (its join's compare-and-set wrote it; this one's
        writes are refused since). This process was cut off or paused past its loss and
        its name restarted meanwhile: it cancels join_cluster's block, which leaves (its
        durable consumer pulled no more, its names and record left to the later process
        where that one wrote them: compare-and-set drops) and raises
        :class:`NodeReplaced`. Akka Cluster quarantines an old incarnation of an address,
        which must restart to join again; Erlang refuses a second node of one name. A
        record heard on the heartbeat subject only (a peer on the account speaking for
        the name) is counted as contested and changes nothing: the bucket must say it
        too. A read that fails is tried again at the successor's next heartbeat."""
        kv = self._nodes_kv
        assert kv is not None
        while True:
            await self._successor_heard.wait()
            self._successor_heard = trio.Event()
            if self._closing:
                return
            try:
                record, _ = await self._read_own_record(kv)
            except Exception as exc:
                log_guarded(
                    log,
                    logging.DEBUG,
                    "node %s: could not read its name's record to judge a later process: %r",
                    self.node,
                    exc,
                )
                continue
            try:
                holder = decode_record(record or b"", monotonic(), self.node)
            except ValueError:
                continue  # (none, or not a kernel's: this one's own writes go on)
            if holder.id_prefix not in self._successors or self._closing:
                continue
            self._replaced = holder
            log_guarded(
                log,
                logging.ERROR,
                "node %s: replaced: a later process of this node name holds it (pid %d on"
                " %s, id prefix %016x; this one, id prefix %016x, was cut off or paused past"
                " its loss); leaving the cluster to it: join_cluster raises NodeReplaced",
                self.node,
                holder.pid,
                holder.host,
                holder.id_prefix,
                self.id_prefix,
            )
            if self._body_scope is not None:
                self._body_scope.cancel()
            return

    async def _claim_the_name(
        self,
        subscribe: Callable[[], Awaitable[None]],
        unsubscribe: Callable[[], Awaitable[None]],
    ) -> None:
        """Write this node's first record under its name, a compare-and-set against the
        record :meth:`_refuse_a_live_namesake` judged (none, or a dead process's): two
        processes joining under one name at the same instant both find no record, but
        only the first write lands; the other's is refused by the bucket, and it judges
        the record written meanwhile as any (its writer heartbeats: ValueError). The node
        subscribes to its subject after the judgement and before the write: the others
        take it for a live member from its record, and send to it from then on (what
        they sent before it subscribed would go nowhere); a refused write unsubscribes
        before judging again. It is the join's record in the bucket (its first heartbeat
        is on core NATS only)."""
        kv = self._nodes_kv
        assert kv is not None
        held: tuple[bytes | None, int] | None = None
        for _ in range(_CLAIM_TRIES):
            last = await self._refuse_a_live_namesake(held)
            await subscribe()
            held = await self._claim_in_order(kv, last)
            if held is None:
                return
            # written under the name since it was read: judged again, unsubscribed
            await unsubscribe()
        raise ValueError(
            f"node name {self.node!r} is taken: other processes wrote its membership record"
            f" each of the {_CLAIM_TRIES} times this one was about to (two or more nodes"
            " given one name?); give each node its own name"
        )

    async def _claim_in_order(self, kv: KeyValue, last: int) -> tuple[bytes | None, int] | None:
        """Write this join's first record, expecting ``last`` as its name's revision
        (if the name was written since, not written: what it holds now is returned, see
        :meth:`_read_own_record`, else None), and set its
        :attr:`NodeInfo.join_order` (the nodes bucket's birth and the record's revision)
        in that record too: the write also expects the bucket's last revision (JetStream's
        ``Nats-Expected-Last-Sequence``), so the revision it gets is that one's next, known
        before it is written. Refused for that alone (another node wrote into the bucket
        meanwhile: the name's revision read unchanged), it is tried again expecting the
        bucket's last revision now, :data:`_ORDERED_CLAIM_TRIES` times in all; then
        written expecting the name's revision only, the order in the records after it
        (until the forty-ninth pass, always so: a join's first record had no order, and
        a peer judged it by the hosts' clocks). A bucket with no birth (a server that
        gives no ``created``) gives no order."""
        nodes_stream = KV_STREAM_TEMPLATE.format(bucket=f"{self.prefix}-nodes")
        born = bucket_birth(self._bucket_births.get(nodes_stream))
        if born is not None:
            subject = f"{KV_PRE_TEMPLATE.format(bucket=f'{self.prefix}-nodes')}{self.node}"
            bucket_last = self._bucket_last_seqs.get(nodes_stream, 0)
            for _ in range(_ORDERED_CLAIM_TRIES):
                self._join_order = (born, bucket_last + 1)
                headers = {
                    api.Header.EXPECTED_LAST_SUBJECT_SEQUENCE: str(last),
                    api.Header.EXPECTED_LAST_SEQUENCE: str(bucket_last),
                }
                try:
                    ack = await call_aio(self.js.publish, subject, self._record(), headers=headers)
                except nats.js.errors.APIError as exc:
                    self._join_order = None
                    if exc.err_code not in _WRONG_LAST_SEQUENCE:
                        raise
                    held = await self._read_own_record(kv)
                    if held[1] != last:
                        return held  # (JetStream checks the name's revision first)
                    bucket_last = await self._bucket_moved_on(nodes_stream, exc)
                    continue
                self._record_revision = ack.seq
                self._join_order = (born, ack.seq)  # (bucket_last + 1: as the record says)
                return None
        try:
            self._record_revision = await call_aio(kv.update, self.node, self._record(), last)
        except nats.js.errors.KeyWrongLastSequenceError:
            return await self._read_own_record(kv)
        if born is not None:
            self._join_order = (born, self._record_revision)
        return None

    async def _read_own_record(self, kv: KeyValue) -> tuple[bytes | None, int]:
        """The record under this node's name in the nodes bucket ``kv`` (None if none)
        and its revision (its delete's, or 0 if never written or expired)."""

        async def read() -> tuple[bytes | None, int]:
            try:
                entry = await kv.get(self.node)
            except nats.js.errors.KeyNotFoundError as exc:
                # deleted (the delete marker's revision) or expired, or never written (0)
                return None, (exc.entry.revision or 0) if exc.entry is not None else 0
            return entry.value, entry.revision or 0

        return await call_aio(read)

    async def _bucket_moved_on(self, stream: str, refusal: nats.js.errors.APIError) -> int:
        """The nodes bucket's last revision now, after a first record's write expecting
        it at an earlier one was refused (the name's revision as expected). The refusal
        says it (nats-server 2.15: ``wrong last sequence: 41``); a server that does not
        is asked (a STREAM.INFO)."""
        said = re.fullmatch(r"wrong last sequence: (\d+)", refusal.description or "")
        if said is not None:
            return int(said[1])
        return (await call_aio(self.js.stream_info, stream)).state.last_seq or 0

    async def _refuse_a_live_namesake(self, held: tuple[bytes | None, int] | None = None) -> int:
        """Raise ValueError if another process is a live member under this node's name
        (two nodes given one name): joining would split the name in two. The nodes
        bucket holds a record of the name from another process (a live one writes it
        every heartbeat interval; a dead one's expires after the loss window): if that
        process's heartbeat is heard within two heartbeat intervals (a second more, for a
        loaded host; at most the loss window), it lives. A process restarted under its
        name before its loss was noticed heartbeats no more and joins after that wait.
        Returns the revision of the record read (its delete's or 0 if none), for the
        compare-and-set of :meth:`_claim_the_name`. ``held``: the record and revision a
        refused claim read already (see :meth:`_read_own_record`), judged unread."""
        kv = self._nodes_kv
        assert kv is not None
        record, revision = await self._read_own_record(kv) if held is None else held
        if record:
            try:
                holder = decode_record(record, monotonic(), self.node)
            except ValueError:
                return revision  # (not a kernel's record: nothing to judge it by)
            if (holder.id_prefix, holder.session) == (self.id_prefix, self._session):
                return revision
        # No record: none was ever written, its process is gone (it expired), or a live
        # process's writes of it wait past the bucket's TTL (its asyncio loop backed up,
        # its heartbeats on time): listened for too unless no process subscribes to the
        # name's subjects (NATS answers "no responders" at once: a first join waits no
        # longer for it)
        heard: list[NodeInfo] = []
        alive = trio.Event()

        async def on_heartbeat(m: NatsMsg) -> None:
            if not m.data:
                return  # a leave or a last notice
            try:
                info = decode_record(m.data, monotonic(), self.node)
            except ValueError:
                return
            heard.append(info)
            alive.set()

        async def subscribe() -> Subscription:
            sub = await self._control.subscribe(self._heartbeat_subject, cb=on_heartbeat)
            await direct.flush_after_subscribe(self._control)
            return sub

        sub = await call_aio(subscribe)
        try:
            opts = self.options
            interval = opts.heartbeat_interval
            wait = min(interval * opts.missed_heartbeats, 2 * interval + 1)
            with trio.move_on_after(wait) as listening:
                async with trio.open_nursery() as nursery:
                    if not record:
                        nursery.start_soon(self._end_if_unsubscribed, listening, wait)
                    await alive.wait()
                    nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True), suppress(nats.errors.Error, OSError, ValueError):
                await call_aio(sub.unsubscribe)
        if heard:
            live = heard[-1]
            raise ValueError(
                f"node name {self.node!r} is taken: a live process heartbeats under it"
                f" (pid {live.pid} on {live.host}, id prefix {live.id_prefix:016x}); give"
                " each node its own name"
            )
        return revision

    async def _end_if_unsubscribed(self, listening: trio.CancelScope, wait: float) -> None:
        """Cancel ``listening`` if no process subscribes to this node name's subjects: a
        request on them (the sequence mark subject of session 0, no join's, which a live
        process of the name takes and leaves) that NATS answers "no responders". One
        that is taken is never answered: its wait ends with ``listening``'s."""
        subject = wire.sequence_mark_subject(self.prefix, self.node, 0)
        try:
            await call_aio(self._control.request, subject, b"", timeout=wait + 1)
        except nats.errors.NoRespondersError:
            listening.cancel()
        except (nats.errors.Error, OSError):
            pass  # (a timeout, the connection gone: listened for to the end)

    def _tell_after_leave(self, msg: Message) -> str | None:
        """What the kernel, running on after this node left (or while it leaves, its
        transport detached), asks of a tell to an address not local (see
        ``Kernel.detach_transport``): the dead letter's detail if the address was on
        another node as this node last knew the cluster, None if not (``AgentNotFound``).

        As in OTP, where a send to a node no longer connected is dropped: the tell is not
        raised to its sender. A handler that acknowledges each message to its sender's
        node (a tell) failed on every message still queued here when the node left, each
        a handler error logged with its traceback; a node that left with a few thousand
        queued was silent seconds in its leave, and judged lost. The tell goes the way of
        any tell lost on the way to another node (at most once): counted here, in
        ``tells_after_leave``, and logged at once, then at most once a second with the
        count so far (what came after the last line said as the kernel closes, see
        _said_after_leave). A request (a query) is not sent either: its requester gets
        ``TransportUnavailable`` with the text, counted in ``requests_after_leave``,
        nothing logged (the requester has the error)."""
        try:
            node, _ = self.resolve(msg.to)
        except AgentNotFound:
            return None
        except TransportUnavailable:
            node = "an unreachable node"
        else:
            node = f"node {node!r}"
        if msg.kind is _QUERY:
            self._requests_after_leave += 1
            return f"node {self.node!r} left the cluster: request to {msg.to!r} on {node} not sent"
        self._tells_after_leave += 1
        if self.held.due(
            self._after_leave_log,
            "tells to agents on other nodes (not sent: the node left)",
            counted="tells_after_leave",
        ):
            log_guarded(
                log,
                logging.WARNING,
                "node %s left the cluster: tells its kernel sends to agents on other nodes"
                " are not sent (%d so far, counted in tells_after_leave and dead-lettered"
                " transport_unavailable; logged at most once a second)",
                self.node,
                self._tells_after_leave,
            )
        return f"node {self.node!r} left the cluster: not sent to {msg.to!r} on {node}"

    def _said_after_leave(self) -> None:
        """The kernel closes (or joins again): its tells after the leave (the last kind
        held, see _tell_after_leave) are over; say what their lines held back."""
        self.held.say(self.node)

    async def _leave(self) -> None:
        """Clean leave, while the connection is still up: flush acks and queued messages,
        drop this node's names and membership record. Never raises."""
        self._closing = True
        entries = len(self._published_names) + self.placement.records_held
        deadline = trio.current_time() + _LEAVE_WAIT + entries * _LEAVE_WAIT_PER_ENTRY
        with trio.CancelScope(shield=True):
            try:
                # (bounded: what it leaves unsent is counted and logged, and JetStream
                # delivers those messages again)
                await self.durable.stop(_LEAVE_DURABLE_WAIT)
            except Exception as exc:
                log_guarded(
                    log,
                    logging.WARNING,
                    "node %s: could not flush durable acks: %r",
                    self.node,
                    exc,
                )
            # (what the connection gone skipped or cut, or the step's bound cut once it
            # was gone, is said below; a bound that cut a step on a slow server is not)
            skipped: list[str] = []
            dropped = announced = False
            dropped = await self._unless_gone("control", self._drop_entries, deadline - _LEAVE_TAIL)
            if not dropped and self._gone("control"):
                skipped.append("its names and placement records")
            # (heartbeats end here even if the announcement is skipped: see below)
            self._leave_announced = True
            announced_at = trio.current_time()
            announced = await self._unless_gone(
                "control", self._announce_leave, announced_at + _LEAVE_RECORD_WAIT
            )
            if announced:
                self._leave_heard_by = announced_at
            if not announced and self._gone("control"):
                skipped.append("its membership record (the leave not announced)")
            if skipped:
                log_guarded(
                    log,
                    logging.WARNING,
                    "node %s: leaving with its NATS connection down %gs or more (the server"
                    " gone?): not dropped: %s; the other nodes judge this node lost",
                    self.node,
                    self.options.server_lost_wait,
                    ", ".join(skipped),
                )
            # (the flush's wait for the data connection back, at most until it has been
            # down server_lost_wait, comes before its own share)
            back_by = trio.current_time()
            down_at = self.connections.down_at("data")
            if down_at is not None:
                back_by = max(back_by, down_at + self.options.server_lost_wait)
            # (the flush's share is the leave's fixed bound at most: the 1 ms per name and
            # record is for the drops, before the announcement; past it, the others'
            # last_notice_wait, whose margin holds the fixed bound only, came first: a
            # node of 5,000 names and records with a stalled flush sent its last notice
            # up to 10 s after the announcement instead of 5)
            flush_by = min(deadline, trio.current_time() + _LEAVE_WAIT)
            with trio.move_on_at(max(flush_by, back_by + _LEAVE_FLUSH_WAIT)):
                await self._flush_at_leave()

    async def _unless_gone(
        self, role: str, step: Callable[[], Awaitable[None]], until: float = math.inf
    ) -> bool:
        """Leaving: run ``step`` (one that needs the ``role`` connection) until ``until``
        (its bound; none by default), skipped or cut once that connection has been down
        ``server_lost_wait`` seconds (from when it went down: the server died, say); True
        if it ran to its end. A
        connection back sooner lets it go on (nats-py sends what it buffered meanwhile),
        with the time its bound had left when it went down (the bound stands still while
        it is down: a failover longer than the step's share had cut it). A worker whose
        server died waited each step's bound out against the connection down, ~3.5 s of
        its ~5.5 s to its error line. (The race is ``ConnectionWatch.unless_gone``, the
        ``--workers`` settle's too.)"""
        with trio.CancelScope(deadline=until) as bound:
            return await self.connections.unless_gone(
                role, self.options.server_lost_wait, step, bound=bound
            )
        return False  # (the bound cut the step)

    def _gone(self, role: str) -> bool:
        """Whether the ``role`` connection has been down ``server_lost_wait`` s."""
        return self.connections.gone(role, self.options.server_lost_wait)

    async def _drop_entries(self) -> None:
        """Leaving: drop this node's placement records and names."""
        # A retry's write on its way lands after the drops below otherwise, and the
        # retry, cancelled once the leave is over, would leave it behind. Once it
        # has its answer it sees the leave and drops what it wrote (bounded: with
        # JetStream that slow, the drops below fail too).
        with trio.move_on_after(_RETRY_WAIT_AT_LEAVE):
            await self._retry_over.wait()
        await self.placement.leave()
        kv = self._names_kv
        if kv is not None:
            await kvops.delete_names(
                kv,
                [(name, revision) for name, (_, revision) in self._published_names.items()],
                self._names_not_dropped,
            )

    async def _drop_own_record(self, kv: KeyValue) -> None:
        """Leaving (asyncio side): delete this node's membership record if it is this
        join's: at the revision this node last wrote; refused (a write whose answer was
        lost had landed, or another process wrote under this node's name since), at the
        revision the bucket holds if the record there is still of this join. A record
        of another process of this name (one that joined while this one was silent:
        frozen, cut off, then leaving cleanly) is left to it: deleted, the watch made
        every node drop that live process as a member that left, and ignore its
        heartbeats until its next record write was read (see _sent_before_leave)."""
        if self._record_revision > 0:
            try:
                await kv.delete(self.node, last=self._record_revision)
                return
            except nats.js.errors.BadRequestError:
                pass  # ("wrong last sequence": written since, see above)
        try:
            entry = await kv.get(self.node)
        except nats.js.errors.KeyNotFoundError:
            return  # (deleted or expired already)
        try:
            session = _record_session(entry.value or b"")
        except ValueError:
            return  # (malformed: no record of this join's)
        if session == self._session:
            await kv.delete(self.node, last=entry.revision)

    async def _announce_leave(self) -> None:
        """Leaving: announce it; drop this node's membership record."""
        # Heartbeats go on until here: a node silent through a slow leave would be
        # judged lost. None after: one that ticked after the announcement (or a put
        # after the record's delete) announced the node again, and the others took
        # it back as a member until its last notice, and logged its leave twice. A
        # write of the record already on its way is refused by the bucket if it
        # comes after the delete (see _write_record). (Set by _leave before this.)
        try:
            # (naming this join: heard after a later join's heartbeat of this
            # process, it must not end that one, see _on_heartbeat)
            await call_aio(
                self._control.publish,
                self._heartbeat_subject,
                b"",
                headers={wire.SESSION_HEADER: f"{self._session:016x}"},
            )
        except Exception as exc:
            log_guarded(
                log, logging.WARNING, "node %s: could not announce leaving: %r", self.node, exc
            )
        if self._nodes_kv is not None:
            try:
                await call_aio(self._drop_own_record, self._nodes_kv)
            except Exception as exc:
                log_guarded(
                    log,
                    logging.WARNING,
                    "node %s: could not drop membership: %r",
                    self.node,
                    exc,
                )

    async def _flush_at_leave(self) -> None:
        """Leaving: send the outgoing messages still queued (or count them, the connection
        down)."""
        try:
            await self._stop_deliveries()
            self._flush_pending()  # open batches first: the marks must cover them
            if self._outbox.paused:
                # Down now: give the client a bounded chance to reconnect first: until
                # it has been down server_lost_wait (none after: the server gone, see
                # _unless_gone)
                down_at = self.connections.down_at("data")
                if down_at is not None:
                    until = down_at + self.options.server_lost_wait
                else:
                    until = trio.current_time() + min(2.0, self.kernel.config.kernel.send_timeout)
                with trio.move_on_at(until):
                    await self._data_up.wait()
            if not self._outbox.paused:
                # (also once the connection is back: tells NATS lost in the outage
                # with no later number behind them show only in a mark)
                self._send_sequence_marks()  # the receivers count a lost tail
            try:
                await self._outbox.close()
            finally:
                # (also when the leave's bound cut the close: what it did not send is
                # still queued, and counted here, not dropped)
                self._count_unsent_at_leave()
            try:
                await call_aio(direct.flush, self.nc, 2)
            except Exception:
                if not self._outbox.paused:
                    self._count_unflushed_at_leave()
                raise
        except Exception as exc:
            log_guarded(
                log,
                logging.WARNING,
                "node %s: could not flush outgoing messages: %r",
                self.node,
                exc,
            )

    def _count_unflushed_at_leave(self) -> None:
        """Leaving with the connection up, the server did not answer the last flush (it
        stalls, say paused or starved): what this node handed to NATS may still sit in
        the client's buffer or the socket's when the connection closes, and nothing
        would count it (a receiver sees a gap only before a later number). Counted in
        ``publish_failures``: each destination's tells not confirmed taken in (its
        credit, or the ``recv`` of its last record). An upper bound, as for a lost
        member: what arrives after all is counted too, at most a window per
        destination."""
        stream_name = self.stream_name
        unconfirmed = 0
        for (node, dest_prefix), link in self._links.items():
            info = self.members.members.get(node)
            if info is None or info.id_prefix != dest_prefix:
                continue  # (left, lost or joined again: counted by those paths)
            confirmed = max(link.consumed, info.confirmed(stream_name))
            unconfirmed += max(0, link.sent - confirmed)
        if unconfirmed:
            self._publish_failures += unconfirmed
            log_guarded(
                log,
                logging.ERROR,
                "node %s: leaving, NATS did not confirm the last flush: %d tells their"
                " receivers had not confirmed are counted in publish_failures (an upper"
                " bound: some may still arrive)",
                self.node,
                unconfirmed,
            )

    def _count_unsent_at_leave(self) -> None:
        """Leaving: count what the outbox did not send (the connection down, or the
        leave's bound cut its close), each item as the NATS client's refusal."""
        unsent = self._outbox.discard()
        if self._outbox.paused:
            # handed to the client just before the disconnect was noticed: never
            # written, and no later mark will tell the receivers of them
            unsent[:0] = self._take_client_buffer()
        if unsent:
            why = (
                "the NATS connection down"
                if self._outbox.paused
                else "the leave's bound cut their flush"
            )
            log_guarded(
                log,
                logging.ERROR,
                "node %s: leaving, %d queued messages not sent (%s), counted in"
                " publish_failures (error frames for remote requesters in errors_unsent)",
                self.node,
                len(unsent),
                why,
            )
            for out in unsent:
                self._publish_refused(out, ConnectionError(why), leaving=True)
        if self._outbox.paused:
            # refused by the client while it reconnected: nothing came after them
            refused, self._refused_batches = self._refused_batches, []
            for subject, head in refused:
                self._unsent_at_leave(subject, head)

    async def _disconnect(self) -> None:
        """Close the NATS connections (after the background tasks stopped)."""
        # Not nc.drain(): it waits for every subscription's callback queue, and a
        # subscription whose task is already gone (cancelled watcher) never drains.
        # What we publish was flushed in _leave; close() also flushes what is left.
        self._disconnecting = True
        data, control = self._nc, self._ctl
        for nc in (data, control):
            if nc is None or nc.is_closed:
                continue
            if nc is control and self._closing and (data is None or data.is_closed):
                await self._send_last_notice(nc)
                if self._left_streams:
                    # the last notices of nodes that left just before: a bounded wait
                    # (they come on this connection), then those late are counted below
                    self._notices_in = trio.Event()
                    wait = self.options.notice_wait_at_leave
                    # (none comes once the connection is gone: see _unless_gone; the
                    # wait's bound stands still while it is down, as the leave's steps'
                    # do: a failover within server_lost_wait cut it, and the notices
                    # that came after were counted late, in lost_at_leave)
                    with trio.CancelScope(shield=True):
                        await self._unless_gone(
                            "control", self._notices_in.wait, trio.current_time() + wait
                        )
            with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_WAIT):
                try:
                    await call_aio(nc.close)
                except Exception as exc:
                    log_guarded(log, logging.DEBUG, "node %s: close: %r", self.node, exc)
        self._count_late_notices(math.inf)  # no notice comes any more

    async def _send_last_notice(self, control: NatsClient) -> None:
        """After a clean leave, once the data connection is closed (nothing more comes
        in): the last number this join took of each sender's stream, so that a sender
        that numbered more before it heard the leave counts them (see _on_last_notice).

        Sent on the control connection up: while it is down the send waits for it back
        (its 2 s bound stands still, as the leave's other steps'), at most until it has
        been down ``server_lost_wait`` (and never past the others' ``last_notice_wait``
        from the announcement: a notice after it is of no use). A notice handed to
        nats-py while the connection was down sat in its reconnect buffer, which the
        close right after dropped: a failover within ``server_lost_wait`` lost the
        notice, and the others counted all this join had not confirmed in
        ``lost_at_leave``."""
        notice = json.dumps(
            {
                "id_prefix": f"{self.id_prefix:016x}",
                "session": f"{self._session:016x}",
                "recv": self._seq_in.last_numbers(),
            },
            separators=(",", ":"),
        )

        async def send() -> None:
            await self.connections.wait_up("control")
            await call_aio(
                control.publish, self._heartbeat_subject, b"", headers={wire.LEFT_HEADER: notice}
            )

        heard_by = self._leave_heard_by
        useless_at = math.inf if heard_by is None else heard_by + self.options.last_notice_wait
        sent = False
        with trio.CancelScope(shield=True), trio.move_on_at(useless_at):
            try:
                sent = await self._unless_gone(
                    "control", send, trio.current_time() + _LAST_NOTICE_SEND_WAIT
                )
            except Exception as exc:
                log_guarded(
                    log,
                    logging.WARNING,
                    "node %s: could not send its last notice: %r",
                    self.node,
                    exc,
                )
                return
        if not sent and self._gone("control"):
            log_guarded(
                log,
                logging.WARNING,
                "node %s: leaving with its NATS connection down %gs or more (the server"
                " gone?): its last notice not sent; the other nodes count what it had not"
                " confirmed in lost_at_leave after their last_notice_wait",
                self.node,
                self.options.server_lost_wait,
            )

    def stats(self) -> ClusterStats:
        d = self.durable
        return ClusterStats(
            node=self.node,
            published=self._published,
            received=self._received,
            inbound_dropped=dict(self._dropped),
            errors_replied=dict(self._errors_replied),
            disconnects=self._disconnects,
            reconnects=self._reconnects,
            nodes_lost=self._nodes_lost,
            inbox_wakeups=self._inbox.wakeups,
            outbox_batches=self._outbox.batches,
            outbox_direct=self._outbox.direct,
            durable_acked=d.acked,
            durable_redelivered=d.redelivered,
            durable_dead=d.dead + d.dead_unforwarded + d.dead_lowered,
            durable_duplicates=d.duplicates,
            durable_unsettled_at_leave=d.unsettled_at_leave,
            durable_agent_missing=d.agent_missing,
            durable_forwarded=d.forwarded,
            durable_taken_over=d.taken_over,
            durable_fetch_failures={"own": d.fetch_failures, "takeover": d.takeover_fetch_failures},
            durable_not_forwarded=d.not_forwarded,
            durable_wait_full=d.wait_full,
            durable_given_back=d.given_back,
            durable_swept=d.swept,
            durable_sweep_failures=d.sweep_failures,
            durable_sweeps_cut=d.sweeps_cut,
            durable_left_to_pullers=d.left_to_pullers,
            durable_handed_back_at_leave=d.handed_back_at_leave,
            durable_handed_back_at_remake=d.handed_back_at_remake,
            durable_stale_settles=d.stale_settles,
            durable_dead_reasons=d.dead_reasons(),
            durable_forward_failures=d.forward_failures,
            durable_too_big=d.too_big,
            durable_remake_failures=d.remake_failures,
            streams_capped=self.stream_caps.capped,
            publish_failures=self._publish_failures,
            closed_socket_writes=self._closed_socket_writes,
            lost_in_transit=self._seq_in.lost,
            parked=sum(len(q) for q in self._parked.values()),
            members=tuple(i.node for i in self.member_list()),
            forwarded_in=self._forwarded_in,
            lost_with_nodes=self.placement.lost_with_nodes,
            lost_with_nodes_taken_back=self.placement.lost_with_nodes_taken_back,
            lost_with_nodes_by_node=self.placement.lost_with_node,
            nodes_lost_by_node=None if self._lost_by_node is None else dict(self._lost_by_node),
            replaced=self.placement.replaced,
            placements_waiting=self.placement.placements_waiting,
            batches_published=self._batches_published,
            batches_received=self._batches_received,
            cancels_sent=self._cancels_sent,
            cancels_received=self._cancels_received,
            replies_relayed=self._replies_relayed,
            inbound_streams=self._inbound.live,
            inbound_streams_retired=self._inbound.retired,
            streams_evicted=self._inbound.evicted,
            nodes_forgotten=self._nodes_forgotten,
            duplicates_stopped=self.placement.duplicates_stopped,
            names_taken=self._names_taken,
            names_unwritten=len(self._unwritten_names),
            names_written_late=self._names_written_late,
            records_unwritten=self.placement.records_unwritten,
            records_written_late=self.placement.records_written_late,
            untyped_names_lost=self.placement.untyped_names_lost,
            buckets_made_again=self._buckets_made_again,
            errors_unsent=dict(self._errors_unsent),
            lost_at_leave=self._lost_at_leave,
            outbox_failures=self._outbox.failed_batches,
            tells_after_leave=self._tells_after_leave,
            requests_after_leave=self._requests_after_leave,
            requests_lost_with_nodes=self._requests_lost_with_nodes,
            old_session_tells=self._old_session_tells,
            records_contested=self._records_contested,
            entries_malformed=(
                self._records_refused.count
                + self._names_refused.count
                + self.placement.records_refused.count
            ),
        )


async def _refused(exc: Exception) -> None:
    """What ``Cluster._publish_one`` gives the outbox for a message it refuses."""
    raise exc


async def _written() -> None:
    """What ``Cluster._publish_one`` gives the outbox for a message already written."""


def _no_responders(to: Address, node: str) -> AgentNotFound:
    """NATS's "no responders" for a query to ``to`` sent to ``node`` (a member's name, or
    ``type:<name>`` for a query to a type; "?" if no longer known)."""
    if node.startswith("type:"):
        return AgentNotFound(to, detail=f"NATS had no responders: no node serves type {node[5:]!r}")
    if node == "?":
        return AgentNotFound(to, detail="NATS had no responders")
    return AgentNotFound(
        to,
        detail=f"NATS had no responders: node {node!r} does not listen (it left the"
        " cluster or lost its NATS connection, and is not judged lost here yet)",
        node=node,
    )


def _singles(parked: deque[_Parked]) -> int:
    """How many of ``parked`` came as single messages (``parked_limit`` bounds those;
    batched tells are bounded by their senders' node windows)."""
    return sum(1 for entry in parked if entry[3] is None)


_joined: weakref.WeakKeyDictionary[Kernel, Cluster] = weakref.WeakKeyDictionary()


def cluster_of(kernel: Kernel) -> Cluster | None:
    """The :class:`Cluster` that ``kernel`` joined with :func:`join_cluster`, if any
    (e.g. for an app started by ``nexus run --nats`` that wants :meth:`Cluster.serve_type`)."""
    return _joined.get(kernel)


def default_node_name() -> str:
    """``<host>-<pid>`` made into one NATS subject token (dots and other characters -> ``_``)."""
    host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"
    return f"{host}-{os.getpid()}"


@asynccontextmanager
async def join_cluster(
    kernel: Kernel,
    url: str | Sequence[str] | None,
    node: str,
    *,
    options: ClusterOptions | None = None,
    prefix: str | None = None,
    auth: NatsAuth | None = None,
    types: Mapping[str, Any] | None = None,
) -> AsyncIterator[Cluster]:
    """Join ``kernel`` to the NATS cluster at ``url`` as node ``node`` for the block.

    ``types`` maps agent type names to AgentSpecs or Agent subclasses: each is checked
    and registered (:meth:`Cluster.register_type`) before anything connects, so before
    the node listens for placements: a member that places an agent here as soon as it
    hears this node never finds the type unknown (``register_type`` inside the block
    leaves that window open).

    ``url`` is one server URL, a comma-separated list, or a sequence (the client fails
    over between them); None takes ``[nats] url`` of the kernel's config (ValueError naming
    a URL that is no server address: another scheme than nats, tls, ws, wss, no host, a
    port that is no number from 1 to 65535). ``auth`` (the
    credentials and TLS settings) defaults to the ``[nats]`` section of the kernel's
    config, so ``NEXUS_NATS__PASSWORD`` and friends work without code; credentials
    written in a URL are taken out of it (and never logged). ``options`` defaults to
    :class:`ClusterOptions.from_config` of the kernel's config (its ``[cluster]`` and
    ``[durable]`` keys and ``[nats] server_lost_wait``, from the file or
    ``NEXUS_CLUSTER__HEARTBEAT_INTERVAL`` and friends); ``options`` given are taken as
    they are. On entry: connect
    (:class:`TransportUnavailable` naming the URL, without credentials, if no server
    answers or the server refuses them), create the KV buckets if needed (ValueError if
    a live process of the cluster holds the name ``node``), announce the node, load the member and name tables, publish the kernel's named agents and attach
    the transport. On exit: detach, remove the node's names and membership record, flush
    and close. Leaving does not shut the kernel down; to let it drain with the cluster
    still attached, ``await kernel.shutdown()`` inside the block.
    """
    section = kernel.config.nats
    if url is None:
        url = section.url
        if url is None:
            raise ValueError("no NATS URL: pass one, or set [nats] url (NEXUS_NATS__URL)")
    servers = [u.strip() for u in url.split(",")] if isinstance(url, str) else list(url)
    if auth is None:
        auth = NatsAuth.from_config(section)
    # (the config's [cluster], [durable] and [nats] server_lost_wait: options given win,
    # as auth does)
    opts = options or ClusterOptions.from_config(kernel.config)
    if prefix is not None:
        with switched_on(_FROM_A_LOAD):  # (said as the options were built, or by the load)
            opts = attrs.evolve(opts, prefix=prefix)
    # (imported at a join, so that importing nexus_trio.nats loads no prometheus_client)
    from .. import metrics
    from ._metrics import ClusterCollector

    try:
        async with asyncio_loop():
            cluster = Cluster(kernel, servers, node, opts, auth)
            for type_name, spec in (types or {}).items():
                cluster.register_type(type_name, spec)
            # (not ready from here to the end of the leave: see Cluster.readiness)
            ready_check = cluster.readiness
            metrics.add_readiness(kernel, ready_check)
            try:
                await cluster._connect()
                async with trio.open_nursery() as nursery:
                    # Attached first: messages from other nodes may arrive as soon as the
                    # subscriptions start, and they come in through the handle.
                    cluster.handle = kernel.attach_transport(cluster)
                    try:
                        await cluster._start(nursery)
                    except BaseException:
                        # (a join that failed leaves the kernel as it found it: free
                        # to join again, and an unknown address AgentNotFound)
                        kernel.detach_transport()
                        raise
                    _joined[kernel] = cluster
                    cluster._ready_phase = "joined"
                    # (its series in the kernel's /metrics while it is joined)
                    collector = ClusterCollector(cluster.stats)
                    metrics.add_collector(kernel, collector)
                    try:
                        # (cancelled once a later process holds the name: see
                        # Cluster._leave_if_replaced; NodeReplaced raised below)
                        with trio.CancelScope() as body:
                            cluster._body_scope = body
                            if cluster._replaced is not None:
                                # (judged replaced during the join, before the block had a
                                # scope to cancel: the block begins cancelled)
                                body.cancel()
                            yield cluster
                    finally:
                        cluster._body_scope = None
                        cluster._ready_phase = "leaving"
                        metrics.remove_collector(kernel, collector)
                        _joined.pop(kernel, None)
                        kernel.detach_transport(
                            cluster._tell_after_leave, at_close=cluster._said_after_leave
                        )
                        await cluster._leave()
                        nursery.cancel_scope.cancel()
                replaced = cluster._replaced
                if replaced is not None:
                    # (the block ended, by the cancel above or by itself: not by an error,
                    # which goes out as it came)
                    raise NodeReplaced(
                        cluster.node, replaced.pid, replaced.host, replaced.id_prefix
                    )
            finally:
                try:
                    await cluster._disconnect()
                finally:
                    metrics.remove_readiness(kernel, ready_check)
                # (no later line will say what the throttled warnings held back)
                cluster.held.say(cluster.node)
    except BaseExceptionGroup as group:
        # The task groups here are an implementation detail: one error comes out as itself.
        leaf = _sole_leaf(group)
        if leaf is None:
            raise
        raise leaf from None


#: the most credit a stream started afresh returns for the numbers before its first:
#: never reached by a true sender, and far from the u64 of a credit frame (a forged first)
_SKIPPED_CREDIT_MAX: Final = 1 << 62


def _skipped_credit(skipped: int) -> int:
    """The credit returned for the ``skipped`` numbers before the first one heard of a
    stream not kept here (never seen, or evicted: see ``_streams``). All of them, not only
    those counted lost (the window's worth): each left its sender's hands, taken here
    before an eviction or lost, and its sender's credit may already cover more than a
    window of them; with less, it would wait for credit that never comes."""
    return min(skipped, _SKIPPED_CREDIT_MAX)


def _parse_last_notice(notice: str, stream: str) -> tuple[int, int, int]:
    """The id prefix and session of the join a last notice is for, and the last number
    it took of ``stream`` (0 if none); ValueError if it is not a notice a kernel sends
    (hex strings of 64-bit numbers, a whole number of at least 0)."""
    obj = json.loads(notice)
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    prefix, session, recv = obj.get("id_prefix"), obj.get("session"), obj.get("recv")
    if not (isinstance(prefix, str) and isinstance(session, str) and isinstance(recv, dict)):
        raise ValueError("id_prefix, session (hex strings) and recv (an object) expected")
    try:
        ids = hex64(prefix), hex64(session)  # (what a membership record holds, read alike)
    except ValueError:
        raise ValueError("id_prefix and session are 64-bit numbers") from None
    taken = recv.get(stream, 0)
    if type(taken) is not int or taken < 0:
        raise ValueError(f"the last number taken of this node's stream is {brief(taken)}")
    return ids[0], ids[1], taken


def _rounds(
    ops: Sequence[tuple[str, uuid.UUID | None]],
) -> list[list[tuple[str, uuid.UUID | None]]]:
    """``ops`` of names in rounds where each name appears once, each name's ops in their
    order (the n-th op of a name in the n-th round)."""
    rounds: list[list[tuple[str, uuid.UUID | None]]] = []
    seen: dict[str, int] = {}
    for op in ops:
        index = seen[op[0]] = seen.get(op[0], -1) + 1
        if index == len(rounds):
            rounds.append([])
        rounds[index].append(op)
    return rounds


def _sole_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    leaves: list[BaseException] = []
    stack: list[BaseException] = [group]
    while stack:
        exc = stack.pop()
        if isinstance(exc, BaseExceptionGroup):
            stack.extend(exc.exceptions)
        else:
            leaves.append(exc)
    return leaves[0] if len(leaves) == 1 else None
