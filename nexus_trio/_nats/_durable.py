"""At-least-once delivery through JetStream (``Cluster.send_durable``).

A durable message is stored in the stream ``<prefix>-durable`` on the subject
``<prefix>.durable.<node>.<agent id>`` with the header ``Nats-Msg-Id`` = the message id,
so a sender that retries after a lost PubAck does not store it twice (JetStream's
duplicate window). The stream is a work queue: a message goes once it is acked or
terminated. Each node pulls its own subject with a durable consumer named after
the node, never more than ``max_in_flight`` messages at a time (the pull is sized to
what it has room for), and hands each one to the recipient agent **as a Query with the
original message id** (``ctx.message.kind is MessageKind.QUERY``):

* the handler returns a value (its reply) -> the message is **acknowledged**; the
  reply goes nowhere else;
* the handler raises or times out (the Query is dead-lettered) -> **nak** with
  ``redelivery_delay``; JetStream delivers it again;
* nothing comes back within ``ack_wait`` of the fetch (e.g. the node died, or the
  handler returned ``None``, which sends no reply) -> JetStream redelivers it (its
  in-flight slot here is free then; an answer that comes later still acks it);
* after ``max_deliver`` deliveries it is terminated, logged and counted as dead (also
  when the last one got no answer within ``ack_wait``);
* addressed by an agent id that no agent of this node has (an id of an earlier
  incarnation of the node, or of an agent that stopped: ids are never used again) ->
  terminated at once, counted as dead and logged with that reason;
* addressed by a name that no agent of this node has (stopped, not spawned again yet:
  a pool restarted by hand) -> nak with a delay that grows each delivery n,
  ``min(missing_agent_delay * 2**(n-1), missing_agent_delay_max)`` (1, 2, 4, 8 s by
  default: the message outlives a gap of 15 s), counted in ``agent_missing``; dead
  after ``max_deliver`` as any other. Each holds an unacked slot of the consumer while
  it waits: at most ``max_waiting`` (10,000 by default: a rolling restart of a busy
  name) wait at a time, one past that is terminated at once (``wait_full``), and the
  consumer's ``max_ack_pending`` is ``4 x max_in_flight + max_waiting``, so those
  waiting never take the slots the node's other messages need.

The messages stored for a node that is lost are taken over by one survivor (the
rendezvous owner of ``durable:<node>`` over the reachable members), which pulls that
node's consumer until the node is heard again: by name forwarded to where the name runs
now (or waiting as above, at most that consumer's slots beyond ``4 x max_in_flight``:
see ``taken_bound``), by agent id dead at once;
see :meth:`DurableChannel.take_over`. What is stored for a node no member any more (left
cleanly, forgotten) is taken over the same way by its owner's look ``last_notice_wait``
after it went, and what no look took (its owner went first, or it came after) by a
sweep of the stream (see :meth:`DurableChannel._sweeps`). Its fetches ask idle heartbeats as the node's own
do: one JetStream does not answer at all is a failed fetch (``takeover_fetch_failures``).

While the node itself holds a message (fetched, not handed over yet: waiting behind
the others of its batch, or for room in a full ``block`` mailbox, at most the send
deadline each) it tells JetStream every ``ack_wait / 2`` that the message is in progress
(``+WPI``), so that the wait does not make JetStream deliver it again; one held that long
is given a fresh ``ack_wait`` at its handover. Once handed over, the node cannot tell a
handler still at work from one that returned ``None``, so ``ack_wait`` runs on.

JetStream acks, naks and terminates a *message*, whichever delivery of it the reply
subject names: a nak sent for delivery k once delivery k+1 is out makes it deliver the
message once more. So the node keeps each delivery apart (the Query object it handed
over names it, and a dead letter carries that object): a failure naks only the newest
delivery of its message, while that delivery's ``ack_wait`` runs and the node holds no
newer one fetched; the failure of an earlier delivery (its handler ran past ``ack_wait``
and the message was delivered again meanwhile) leaves the newer one to its own handler.
An answer acks the message through its newest delivery, whichever delivery answered.

Redeliveries carry the same message id, so a handler makes its effect idempotent by
keying it on ``ctx.message.id``; the consumer also skips (and re-acks) ids it acked
recently in case an ack was lost, and an answer to an id it acked already (a redelivery
handed over before the first answer came: such ids are remembered apart from the acked
ones, so many acks in between do not make it forget them) goes nowhere: both are counted
in ``duplicates``.

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import sys
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Coroutine, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final, TypeGuard, TypeVar, final

import attrs
import nats.errors
import nats.js.errors
import trio
from nats.aio.msg import Msg as NatsMsg
from nats.js.api import ConsumerConfig, DiscardPolicy, RetentionPolicy, StreamConfig

from .._agent import AgentRef, checked_seconds
from .._brief import brief
from .._config import (
    DURABLE_IN_FLIGHT_MAX,
    DURABLE_SWEEP_LOOKS,
    DURABLE_WAITING_MAX,
    INT64_MAX,
    JETSTREAM_SECONDS_MAX,
)
from .._errors import (
    AgentNotFound,
    KernelShuttingDown,
    MailboxFull,
    MessageDecodeError,
    TransportUnavailable,
    error_repr,
    unsendable,
)
from .._logcall import log_guarded
from .._message import ID_LIMIT, SYSTEM_ID, Message, MessageKind, new_id
from .._throttle import Throttle
from . import _wire as wire
from ._aio import Outbox, call_aio, call_aio_bounded
from ._auth import redact
from ._direct import end_fetch, fetched, take_queued, unsubscribe_server_first
from ._placement import placement_weight
from ._stream_caps import CONSUMERS_OVER_LIMIT, STREAM_MAX_CONSUMERS

if TYPE_CHECKING:
    from .._config import DurableConfig
    from ._cluster import Cluster
    from ._membership import NodeInfo

log = logging.getLogger("nexus_trio.nats.durable")

#: a look of this node's consumer for given-up messages that fails again and again (a
#: permission its NATS user lacks, JetStream down): said at its first failure, then at
#: each this many more in a row (an hour at the default period of 72 s; see
#: DurableChannel._look_failed), with the count
_LOOK_FAILURES_SAID: Final = 50

_K = TypeVar("_K")
_V = TypeVar("_V")

#: how many entries each of a durable channel's bounded memories keeps (the ids acked,
#: the answers due, the late deliveries, the answers of dead ones, the sequences
#: terminated): past it the oldest is forgotten (see _keep)
_DONE_MEMORY: Final = 65536
#: seconds a cancelled fetch is waited for to end (its asyncio side may outlive the
#: cancel): past it the pull ends all the same, and the node's nursery with it (a fetch
#: waited for as long as it took held the leave's exit until it returned); below the
#: leave's share for the pull (``_LEAVE_DURABLE_WAIT / 2`` there) it would never be
#: abandoned, so the two are apart: the stop abandons first, then the pull ends
_PULL_CANCEL_WAIT: Final = 1.0
#: the header of a durable message forwarded to the node its name moved to: how many
#: times it was (see DurableChannel._forward)
FORWARDS_HEADER: Final = "Nexus-Forwards"
#: the most times a durable message is forwarded: nodes whose views of a name disagree
#: (one not told of a move yet) pass it on no further; it waits where it is then
FORWARD_HOPS: Final = 4
#: the op of a forward in the settle queue: this prefix, then the subject
#: the connection the acks, naks and terms go on (the cluster's ``connections`` role)
_DATA: Final = "data"
_FORWARD: Final = "forward "
#: likewise, of a forward of a message stored for a lost node (see DurableChannel.take_over)
_TAKEN: Final = "taken "
#: an op: a nak handing a takeover's fetched message back at a leave (or one a fetch
#: cancelled under way at the leave's stop took, see DurableChannel._fetch_shielded), counted in
#: ``handed_back_at_leave`` once sent (one the leave does not send is unsettled)
_HAND_BACK: Final = "hand back"
#: an op: a nak handing back what the old pull subscription's queue held when the pull
#: was set up again (see DurableChannel._set_up_again), counted in
#: ``handed_back_at_remake`` once sent (one the leave does not send is unsettled)
_REMADE_BACK: Final = "hand back remade"
#: the periodic sweep of the stream for messages no node pulls (see
#: DurableChannel._sweeps) comes this many ``last_notice_wait`` apart (72 s by default),
#: by one live node (the rendezvous owner of this key); the config's warning of a
#: ``max_age`` not above that period reads the same constant
SWEEP_LOOKS: Final = DURABLE_SWEEP_LOOKS
_SWEEP_KEY: Final = "durable-sweep"
#: a sweep reads at most this many pages of the stream's subjects (nats-server's pages:
#: 100,000 subjects, about 2.4 MB of JSON, 2-3 s of a loaded server each): past them
#: the sweep is cut (``sweeps_cut``, said), and the next one reads on from there
SWEEP_SUBJECT_PAGES: Final = 2
#: likewise, the pages of the stream's consumers (nats-server's pages: 256 consumers,
#: one per node that ever ran the durable path, about 150 KB of JSON each): past them
#: the sweep is cut (``sweeps_cut``, said) and the next one reads on from there, the
#: consumers read so far kept (a pass over them may take several sweeps: see
#: DurableChannel._unpulled); an answer that pages for ever (a server that ignores the
#: offset) ends here too; and the consumers a sweep asks for one by one (the nodes of
#: subjects with no consumer in a pass of several sweeps) are as many at most
SWEEP_CONSUMER_PAGES: Final = 20
#: what a sweep cut while it asks for the consumers of nodes one by one read (said so)
_UNSEEN: Final = "nodes of subjects with no consumer"
#: seconds a takeover of a node no member waits, its consumer with no pull request
#: waiting, before it reads the consumer again to see whether someone pulls it (moved
#: meanwhile: see DurableChannel._pulled_by_others): a node's pull loop long-polls
#: FETCH_WAIT, and fetches again or acks within that while it delivers
_PULLER_ACTIVITY_WAIT: Final = 2.0
#: the rounds of counts (the stream's, its consumers', the stream's again) a sweep makes
#: before it reads the subjects when none settles it (see DurableChannel._unpulled)
_SWEEP_COUNTS: Final = 3
#: seconds a JetStream API request of the sweep waits for its answer (nats-py's own)
_JS_API_WAIT: Final = 5.0
#: seconds more a page of the stream's subjects waits, for each subject the stream
#: holds: nats-server's time for a page grows with all of them, not with the page
#: (forty-sixth pass, nats-server 2.15.1: about 0.25 s a page at 250,000 subjects, 1.2
#: to 5.1 s at 1,000,000 at load 2.6-6.4, about 5 us a subject at worst; twice that)
_SUBJECT_WAIT: Final = 10e-6
#: the longest a page of subjects waits (a stream of 2,500,000 subjects and more)
_SUBJECTS_WAIT_MAX: Final = 30.0


def subjects_wait(subjects: int | None) -> float:
    """Seconds a page of the durable stream's subjects waits for its answer, the
    stream holding ``subjects`` subjects (None: not said: as any request of the sweep)."""
    if subjects is None:
        return _JS_API_WAIT
    return min(_JS_API_WAIT + subjects * _SUBJECT_WAIT, _SUBJECTS_WAIT_MAX)


def _forward_headers(jsmsg: NatsMsg) -> dict[str, str]:
    """The headers of the copy of ``jsmsg``'s message forwarded to another node (see
    DurableChannel._send_forward)."""
    msg_id = (jsmsg.headers or {}).get(wire.MSG_ID_HEADER, "")
    return {
        wire.MSG_ID_HEADER: f"{msg_id}>{jsmsg.metadata.sequence.stream}",
        FORWARDS_HEADER: str(_hops(jsmsg) + 1),
    }


def _hops(jsmsg: NatsMsg) -> int:
    """How many times ``jsmsg``'s message was forwarded (its header; 0 if none). A header
    that is no small whole number (any publisher may write one) counts as the most: such
    a message is not forwarded."""
    text = (jsmsg.headers or {}).get(FORWARDS_HEADER, "0")
    # (ASCII digits: str.isdigit() also takes '²', which int() refuses: raised here, it
    # ended the node's pull, and the node)
    return int(text) if text.isascii() and text.isdigit() and len(text) < 4 else FORWARD_HOPS


#: seconds a durable fetch waits for messages (its long poll), and the interval of the
#: idle heartbeats JetStream sends it meanwhile: a poll that ends with none of them (no
#: message, no status, no heartbeat) was not answered, which an idle one is (JetStream
#: refuses a heartbeat above half the poll's wait)
FETCH_WAIT: Final = 1.0
FETCH_HEARTBEAT: Final = 0.25
#: JetStream's error code for a publish its stream's store refused (``JSStreamStoreFailedF``):
#: past one of the stream's limits with discard new, or another store failure (a store
#: closed by a delete or a shutdown, a disk error), told apart by its description only
_STORE_FAILED: Final = 10077
#: the limit each description of that code names (nats-server's store errors)
STORE_LIMITS_SAID: Final = {
    "maximum messages exceeded": "max_msgs",
    "maximum bytes exceeded": "max_bytes",
    "maximum messages per subject exceeded": "max_msgs_per_subject",
}
#: JetStream's codes for a publish past the server's JetStream storage (its
#: ``max_file_store`` or ``max_memory_store``: 10023, ``insufficient resources``) or past
#: the account's JetStream limits (10002, ``resource limits exceeded for account``, whose
#: code other refusals share: told by the description), measured on nats-server 2.15
_SERVER_FULL: Final = 10023
_ACCOUNT_LIMITS: Final = 10002
_ACCOUNT_FULL_SAID: Final = "resource limits exceeded for account"


async def _poll(psub: Any, batch: int, idle: bool) -> tuple[list[NatsMsg], bool | None]:
    """A fetch of a durable consumer through ``psub`` (a long poll of FETCH_WAIT): its
    messages, and whether JetStream answered it: True (messages, or its idle heartbeats
    while it had none, or something that came in since the last fetch ended), False
    (nothing at all came back), None (not known: no heartbeats asked, see below).
    ``idle``: the consumer's last fetch got nothing. Run on the asyncio loop; for this
    node's own consumer and for a lost node's it takes over."""
    # Something in the subscription's queue came after the last fetch ended: most often
    # the 408 that ends its request, a hair after nats-py's own timeout (14 of 20 idle
    # polls on loopback), which the fetch below discards. JetStream answered then;
    # counted so when this poll gets nothing in time either. (Read as "not known", a
    # node whose fetches had failed stayed "jetstream unavailable" for as long as the
    # 408s came late, 19 s and more, while each such poll asked no heartbeats: see below.)
    late = bool(psub.pending_msgs)
    # Heartbeats only after a fetch that got nothing (while messages flow, each fetch
    # returns some: the requests they leave lingering would each send heartbeats), and
    # only when nats-py's fetch will not first hand out messages an earlier request left
    # in the subscription's queue: it asks no expiry then, and JetStream refuses a
    # heartbeat without one (400 heartbeat value too large), which the fetch raised,
    # dropping the messages it took from the queue (a delivery each). (No await between
    # the look and the fetch's own: nothing comes in between.)
    probe = idle and not late
    try:
        got: list[NatsMsg] = await psub.fetch(
            batch=batch, timeout=FETCH_WAIT, heartbeat=FETCH_HEARTBEAT if probe else None
        )
    except nats.js.errors.FetchTimeoutError:
        return [], True  # heartbeats came: nothing to pull within the poll
    except TimeoutError:  # (nats' is one)
        # Something in the queue now came during this fetch (it took what was there
        # first): JetStream answered, read after nats-py's own timer fired. A loop backed
        # up behind the kernel's work (the first second of `nexus run --nats`'s ring, 6
        # of 6 runs) reads the socket late, and the timer and the poll's heartbeats come
        # due in one turn: before the fifty-seventh pass that read as no answer, a
        # "durable fetch failed" logged and counted on a healthy JetStream.
        if psub.pending_msgs:
            return [], True
        return [], False if probe else (True if late else None)
    return got, True


def _whole(least: int, most: int) -> Callable[[Any, attrs.Attribute[Any], Any], None]:
    """A validator of a whole number from ``least`` to ``most`` (a bool is none: until the
    fifty-seventh pass ``max_deliver=True`` was taken, and ``max_deliver=2**63`` failed
    the join with JetStream's raw ``cannot unmarshal``; the bounds are ``[durable]``'s)."""

    def check(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not least <= value <= most:
            raise ValueError(
                f"DurableOptions {attribute.name} must be a whole number from {least} to"
                f" {most}; got {brief(value, 60)} ({type(value).__name__})"
            )

    return check


_count: Final = _whole(0, DURABLE_WAITING_MAX)


def is_finite_seconds(value: Any, *, above: bool) -> bool:
    """Whether ``value`` is a finite number of seconds, ``> 0`` if ``above`` else ``>= 0``
    (a bool is no number of seconds; NaN and infinities are refused): the test of the
    durable and cluster options' validators, each with its own words."""
    return (
        not isinstance(value, bool)
        and isinstance(value, int | float)
        and math.isfinite(value)
        and (value > 0 if above else value >= 0)
    )


def _finite_seconds(bound: str) -> Callable[[Any, attrs.Attribute[Any], Any], None]:
    """A validator of a finite number of seconds, ``bound`` ``", at least 0"`` (a
    JetStream nak delay) or ``" above 0"`` (JetStream takes them in nanoseconds:
    ``ack_wait=inf`` was taken and failed the join with an OverflowError)."""
    above = bound == " above 0"

    def check(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if not is_finite_seconds(value, above=above) or value > JETSTREAM_SECONDS_MAX:
            raise ValueError(
                f"DurableOptions {attribute.name} must be a finite number of seconds{bound},"
                f" at most {JETSTREAM_SECONDS_MAX} (Go's time.Duration, in which JetStream"
                f" takes it); got {value!r} ({type(value).__name__})"
            )

    return check


_seconds: Final = _finite_seconds(", at least 0")
_positive_seconds: Final = _finite_seconds(" above 0")


def missing_agent_delay(options: DurableOptions, delivered: int) -> float:
    """The nak delay for delivery ``delivered`` (1 the first) of a message by name whose
    agent the node does not have: doubles each delivery from ``missing_agent_delay``, at
    most ``missing_agent_delay_max``."""
    # (2.0 ** 1000 is finite; the product may be inf, which the cap takes)
    delay = options.missing_agent_delay * 2.0 ** min(max(delivered - 1, 0), 1000)
    return min(delay, options.missing_agent_delay_max)


#: why durable messages are given up (``ClusterStats.durable_dead_reasons``: their sum is
#: ``durable_dead``), a throttled log line of its own each (see DurableChannel.dead_reasons)
DEAD_REASONS: Final = (
    "undecodable",
    "agent_gone",
    "agent_missing",
    "failed",
    "unanswered",
    "wait_full",
    "lost_node",
    "unforwarded",
    "consumer_max_deliver",
)

#: JetStream's error code for a message delete that failed (its description says why)
_MSG_DELETE_FAILED: Final = 10057
#: JetStream's advisory that a consumer delivers a message no more (its max_deliver
#: reached), for the stream and consumer named after it
_MAX_DELIVERIES_ADVISORY: Final = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES"
#: how many messages a look at a consumer's state reads before it checks, with one
#: CONSUMER.INFO, that the consumer is still the one read (then deletes them): see
#: DurableChannel._made_anew_since
_LOOK_PAGE: Final = 100
#: why a message found given up by a look at a consumer's state was (see DurableChannel._stranded):
#: its deliveries are not known then, so not whether an operator lowered the consumer's
#: max_deliver or a process of the node died in the message's last delivery
_FOUND_WHY: Final = (
    "its max_deliver reached while no process of the node heard JetStream's advisory: a"
    " process of the node stopped, died or was cut off during its last delivery, or an operator"
    " lowered the consumer's max_deliver"
)
#: one past the highest stream sequence JetStream has (a uint64)
_SEQ_END: Final = 2**64

#: JetStream's error code for a consumer whose max_ack_pending is over the server's or
#: the account's limit (``jetstream { limits { max_ack_pending } }``)
_MAX_ACK_PENDING_OVER_LIMIT: Final = 10121


class _ConsumersFull(ValueError):
    """JetStream refused a node's durable consumer: the stream (or its account) is at
    its limit of consumers (see DurableChannel._setup)."""


def max_ack_pending(options: DurableOptions) -> int:
    """The unacked slots of a node's own consumer: ``4 x max_in_flight`` for its messages
    in flight (fetched, handed over, past ``ack_wait``) and ``max_waiting`` for those
    that wait for a missing name's agent (see :class:`_Waiting`)."""
    return max(options.max_in_flight, 1) * 4 + options.max_waiting


def taken_bound(slots: int, options: DurableOptions) -> int:
    """How many messages may wait for their names on a lost node's consumer with
    ``slots`` unacked slots (its ``max_ack_pending``, read from JetStream's consumer
    info) that this node takes over: its slots beyond ``4 x max_in_flight`` (its
    ``max_waiting``, when it was made with this node's options), or three quarters of
    them on a consumer with no more than that (made with ``max_waiting`` 0, or by a node
    of a version before it), always leaving at least one slot to the messages that do
    not wait (a consumer of 1 to 3 slots had all of them waiting); a consumer with no
    limit (-1 or 0) stalls nothing. Those held by other pullers when it is bound count
    against it too (see :meth:`_Waiting.bind`)."""
    if slots <= 0:
        return sys.maxsize
    in_flight = max(options.max_in_flight, 1) * 4
    return slots - in_flight if slots > in_flight else slots - max(slots // 4, 1)


def _owner_of(node: str, own: str, live: Sequence[str], key: str | None = None) -> bool:
    """Whether this node (``own``) is the rendezvous owner of ``node``'s durable
    messages among the survivors ``live`` (the other members that run the path): the
    first survivor that beats it ends the test. (``key``: another key than
    ``durable:<node>``, the periodic sweep's.)"""
    key = f"durable:{node}" if key is None else key
    mine = (placement_weight(own, key), own)
    return all((placement_weight(other, key), other) < mine for other in live)


def held_at_most(ack_wait: float, options: DurableOptions) -> float:
    """Seconds an unacked slot another puller held when a consumer was bound may stay
    held: a message in flight there until ``ack_wait`` (the consumer's) after its fetch,
    one nakked to wait for its name until its delay (at most
    ``missing_agent_delay_max``; this node's, the only one known), each a fetch's wait
    later at most."""
    return max(ack_wait, options.missing_agent_delay_max) + FETCH_WAIT


@final
class _ErrorSaid:
    """``": " + error_repr(error)`` ("" for no error) when a log line is formatted: a
    line its throttle holds back makes no repr of the handler's error."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException | None) -> None:
        self.error = error

    def __str__(self) -> str:
        return "" if self.error is None else f": {error_repr(self.error)}"


@final
class _Waiting:
    """The messages by name nakked to wait for their agent on one durable consumer (this
    node's own, or a lost node's it takes over), by stream sequence: when their
    redelivery is due at the latest. JetStream counts each in the consumer's unacked
    slots (``max_ack_pending``) until it is delivered again: at most ``bound`` wait, so
    the consumer's other messages keep the rest of the slots (all of them waiting
    stalled every other durable message of that consumer until they died, 15 s at the
    default delays). One per consumer in a process (this node's own, and one per lost
    node kept across its takeovers); the slots other pullers held when it was bound
    count against the bound too (see :meth:`bind`)."""

    def __init__(self, bound: int) -> None:
        self.bound = bound
        self.due: dict[int, float] = {}
        # no entry of ``due`` is due before this (a lower bound: see room)
        self._next_due = math.inf
        self._made: object = None
        #: unacked slots of the consumer that other pullers held when it was bound (see
        #: bind), counted as waiting until ``_others_until`` or their redelivery here
        self.others = 0
        self._others_until = -math.inf

    @property
    def count(self) -> int:
        """How many count against the bound now: those nakked to wait here, and the
        slots other pullers held at the bind (not overdue yet)."""
        if self.others and self._others_until <= trio.current_time():
            self.others = 0
        return len(self.due) + self.others

    def bind(self, bound: int, made: object, held: int = 0, held_for: float = 0.0) -> bool:
        """The consumer (re)bound: at most ``bound`` wait; ``made``: when it or its stream
        was made (None: not known). One made anew (an operator deleted the stream: its
        sequences begin at 1 again, what waited went with the old one) forgets what
        waited: kept, those entries held the bound until their time was up (a message for
        a missing name past it was terminated for nothing). Bound again to the same one
        (a server restarted, a fetch refused), they are kept.

        ``held``: the consumer's unacked slots JetStream counted at the bind
        (``num_ack_pending``). Those not nakked here are another puller's (the lost
        node's in flight or waiting, an earlier process of this node's, a survivor's that
        took the consumer over): they count against the bound as waiting ones until they
        are delivered here again or ``held_for`` seconds have passed (the longest they can
        stay held, :func:`held_at_most`), so that this puller's waiting ones and theirs
        together leave the consumer's other messages their slots. (Across processes
        no puller sees another's naks after the bind: JetStream's ``max_ack_pending`` is
        the bound then.)

        True if the stream was made anew since the last bind (both times known)."""
        self.bound = bound
        anew = False
        if made != self._made:
            if self._made is not None:
                self.due.clear()
                self._next_due = math.inf
                anew = made is not None
            self._made = made
        self.others = max(held - len(self.due), 0)
        self._others_until = trio.current_time() + held_for
        return anew

    def delivered(self, jsmsg: NatsMsg) -> None:
        """``jsmsg`` is a delivery of its message: it waits no more (if it did; if it
        was none of this puller's and delivered before, one slot other pullers held is
        free)."""
        metadata = jsmsg.metadata
        if (
            self.due.pop(metadata.sequence.stream, None) is None
            and self.others
            and metadata.num_delivered > 1
        ):
            self.others -= 1

    def room(self, jsmsg: NatsMsg, options: DurableOptions) -> bool:
        """Room for ``jsmsg`` (its agent missing) to wait for its redelivery, taken if so:
        fewer than ``bound`` messages wait (those whose redelivery did not come when due,
        the stream purged or made anew, another puller given it, are not counted), as
        Akka's shard region buffers messages for a shard with no home up to its
        ``buffer-size`` and drops the rest to dead letters. Keyed by stream sequence: a
        stream made anew numbers from 1 again, so a stale entry of the old one is at most
        replaced by (or dropped at the delivery of) the new message of its sequence, never
        counted beside it, and goes when its time is up."""
        due = self.due
        now = trio.current_time()
        if len(due) + self.others >= self.bound:
            # (looked through only once one may be overdue: with max_waiting 10,000
            # waiting, a burst past the bound scanned them all for each message)
            if self._next_due <= now:
                for seq in [seq for seq, at in due.items() if at <= now]:
                    del due[seq]
                self._next_due = min(due.values(), default=math.inf)
            if self.count >= self.bound:
                return False
        delay = missing_agent_delay(options, jsmsg.metadata.num_delivered)
        at = now + delay + options.ack_wait + FETCH_WAIT
        due[jsmsg.metadata.sequence.stream] = at
        self._next_due = min(self._next_due, at)
        return True


@final
@attrs.frozen
class DurableOptions:
    """JetStream settings of the at-least-once path (seconds)."""

    enabled: bool = True
    ack_wait: float = attrs.field(default=30.0, validator=_positive_seconds)
    max_deliver: int = attrs.field(default=5, validator=_whole(1, INT64_MAX))
    redelivery_delay: float = attrs.field(default=0.1, validator=_seconds)
    max_in_flight: int = attrs.field(default=64, validator=_whole(1, DURABLE_IN_FLIGHT_MAX))
    duplicate_window: float = attrs.field(default=120.0, validator=_positive_seconds)
    #: bounds of the stream this node makes (None: none): a message older than
    #: ``max_age`` goes, taken or not; a send past ``max_messages`` stored is refused
    max_age: float | None = attrs.field(
        default=None, validator=attrs.validators.optional(_positive_seconds)
    )
    max_messages: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(_whole(1, INT64_MAX))
    )
    #: a message by name whose agent this node does not have (stopped and not spawned
    #: again yet, a pool being restarted) is nakked with a delay that grows with each
    #: delivery n: min(missing_agent_delay * 2**(n-1), missing_agent_delay_max) (0: at once)
    missing_agent_delay: float = attrs.field(default=1.0, validator=_seconds)
    missing_agent_delay_max: float = attrs.field(default=15.0, validator=_seconds)
    #: how many such messages (by a name no agent has here yet) may wait for their agent
    #: at a time; one past that is terminated at once, dead (``durable_wait_full``). Each
    #: holds an unacked slot of the node's consumer in JetStream, whose
    #: ``max_ack_pending`` is ``4 x max_in_flight + max_waiting`` (0: none waits)
    max_waiting: int = attrs.field(default=10_000, validator=_count)

    @classmethod
    def from_config(cls, section: DurableConfig) -> DurableOptions:
        """The options of a config's ``[durable]`` section (each key is the field of its
        name; the section's checks are these options' own, so any section makes options)."""
        return cls(**{field.name: getattr(section, field.name) for field in attrs.fields(cls)})

    def __attrs_post_init__(self) -> None:
        if self.missing_agent_delay_max < self.missing_agent_delay:
            raise ValueError(
                f"DurableOptions missing_agent_delay_max ({self.missing_agent_delay_max:g}s)"
                f" must be at least missing_agent_delay ({self.missing_agent_delay:g}s): it"
                " caps the delay that grows from it"
            )
        if self.max_age is not None and self.max_age < self.duplicate_window:
            raise ValueError(
                f"DurableOptions max_age ({self.max_age:g}s) must be at least duplicate_window"
                f" ({self.duplicate_window:g}s): JetStream refuses a stream that forgets a"
                " message before the ids it keeps to refuse a resent one"
            )


def dead_by_id(to: uuid.UUID, node: str, info: NodeInfo | None) -> str:
    """Why a message by id to agent ``to`` of ``node`` (its member record ``info``, None
    once forgotten), taken over from ``node``'s consumer, is dead: its durable path is off
    (a member back with it off), else it died with its node, which was lost when the
    message was fetched (heard again since: a new process of its name, whose agents have
    other ids, or the same process at the message's last delivery; a message for the same
    process heard again before its last delivery goes back to it, see
    ``DurableChannel._take``)."""
    if info is not None and info.reachable and not info.runs_durable:
        return (
            f"agent {to} is of node {node!r}, whose durable path is off now (a delivery by"
            " id can go nowhere else)"
        )
    since = "; heard again since" if info is not None and info.reachable else ""
    return f"agent {to} died with node {node!r} (lost{since}; an agent id is never used again)"


@final
class DurableChannel:
    """One node's end of the durable path: publishing, pulling, acking (see module doc)."""

    def __init__(self, cluster: Cluster, options: DurableOptions) -> None:
        self.cluster = cluster
        self.options = options
        self._stream = f"{cluster.prefix}-durable"
        self._psub: Any = None
        # handed to an agent, not answered yet, by message id: its newest delivery (the
        # JetStream message), when that delivery's ack_wait ends (oldest first; see
        # _expire) and the Query the agent got for it (a failure names its delivery by
        # that object: JetStream naks a message, not a delivery, see failed)
        self._in_flight: dict[uuid.UUID, tuple[NatsMsg, float, Message]] = {}
        self._done: OrderedDict[uuid.UUID, None] = OrderedDict()
        # past ack_wait unanswered, JetStream delivers them again: an answer still acks
        self._late: OrderedDict[uuid.UUID, tuple[NatsMsg, Message]] = OrderedDict()
        # handed over again while an earlier delivery was unanswered: how many answers
        # may come beyond the one that acks (kept apart from _done, which forgets an id
        # after _DONE_MEMORY later acks, and only these ids get a second answer)
        self._answers_due: OrderedDict[uuid.UUID, int] = OrderedDict()
        # counted dead as their consumer gave them up while a delivery of them was in
        # an agent's hands (see _forget_delivery): a later answer of it is dropped
        self._dead_answers: OrderedDict[uuid.UUID, None] = OrderedDict()
        # fetched and not handed over yet, in order (the first may wait for room): kept
        # in progress in JetStream by _keep_held every ack_wait / 2 (the last time: _tick)
        self._held: deque[NatsMsg] = deque()
        self._tick = -math.inf
        self._room = trio.Event()
        self._ops: Outbox[tuple[NatsMsg, str]] = Outbox(
            self._send_ops, held=cluster.held, what="failed sends of durable acks and naks"
        )
        # stop() ends the pull before it closes _ops: nothing is fetched after that
        self._pulling = trio.CancelScope()
        self._pull_ended = trio.Event()
        # the pull's subscription was unsubscribed as the kernel's run ended (see
        # _drop_pull_requests): the leave's _end_pull_requests does not again
        self._pull_dropped = False
        # the leave's stop gave up waiting for the pull to end (see stop): what it holds
        # is left to JetStream, counted then
        self._abandoned = False
        # acks, naks and terms queued, and sent (JetStream got them: see _send_ops); the
        # difference when the leave closed the queue went unsent (see stop)
        self._settles_queued = 0
        self._settles_sent = 0
        # failed fetches: logged at once, then at most once a second (an outage)
        self._fetch_log = Throttle(kind="durable.fetch")
        #: failed fetches of this node's own consumer, each tried again
        self.fetch_failures = 0
        #: Trio time of the first of the failed fetches in a row of this node's own
        #: consumer (None: its last fetch worked, or none failed): JetStream unavailable
        #: behind connections that are up (the node's readiness says so, see
        #: Cluster.readiness)
        self.fetch_failing_since: float | None = None
        # the last fetch of this node's consumer got nothing: the next asks for heartbeats
        self._idle = True
        # bodies no kernel wrote (a hostile or broken publisher): each terminated and
        # counted dead, logged at once, then at most once a second with a running count
        self._undecodable_log = Throttle(kind="durable.undecodable")
        self._undecodable = 0
        # for an agent id gone for good: terminated at once, logged likewise
        self._gone_log = Throttle(kind="durable.gone")
        self._gone = 0
        self.acked = 0
        self.redelivered = 0
        self.dead = 0
        self.duplicates = 0
        #: deliveries nakked with a growing delay: no agent had their name here
        self.agent_missing = 0
        #: messages by name whose agent runs on another node now, stored for that node
        #: and acked here (see _forward)
        self.forwarded = 0
        #: messages dead because their forward failed on their last delivery (counted by
        #: the asyncio side, which sends the forward; in ClusterStats.durable_dead)
        self.dead_unforwarded = 0
        #: messages the leave left unsettled (see stop): JetStream delivers them again
        self.unsettled_at_leave = 0
        #: messages stored for a lost node that this node took over and settled (see
        #: take_over): forwarded to where their name runs now, or dead (also counted in
        #: ``forwarded`` and ``dead``)
        self.taken_over = 0
        #: messages by agent id stored for a lost node, fetched by this node's takeover
        #: when that node was heard again (the same process: it was frozen or cut off),
        #: nakked back to its consumer, which it pulls itself again (see _take)
        self.given_back = 0
        # the lost nodes whose durable consumers this node pulls (see take_over), and
        # the event set (then made anew) as one of those takeovers ends (see stop)
        self._takeovers: dict[str, trio.CancelScope] = {}
        self._takeover_ended = trio.Event()
        #: fetches cancelled under way (the leave's stop) that have not returned yet:
        #: what each takes is nakked back as it returns (see _fetch_shielded), and the
        #: event the last of them sets
        self._fetches_ending: set[asyncio.Future[Any]] = set()
        self._fetches_ended = trio.Event()
        self._fetches_abandoned = False  # (said once: see stop)
        #: messages a takeover had fetched when this node began to leave (its kernel
        #: shutting down, its cluster closing), nakked back to their consumer, not taken:
        #: the next owner's takeover, or the node's own process, gets them (see
        #: take_over); counted as each nak is sent (one the leave does not send is in
        #: ``unsettled_at_leave`` instead)
        self.handed_back_at_leave = 0
        # the ack subjects of the naks counted in handed_back_at_leave (a leave's few): one
        # taken back out of the client's reconnect buffer is counted unsettled instead
        # (see unsent_in_client)
        self._handed_back: set[str] = set()
        #: messages the old pull subscription's queue held when the pull was set up
        #: again (see _set_up_again), nakked back to the consumer (which delivers them
        #: to the new subscription at once), counted as each nak is sent (one the leave
        #: does not send is in ``unsettled_at_leave`` instead)
        self.handed_back_at_remake = 0
        #: settles of deliveries of a stream since made anew, not sent (an ack would
        #: remove the new stream's message of the same sequence: see _stream_made_anew),
        #: and messages the old pull subscription held then, not nakked
        self.stale_settles = 0
        # when the stream this node's pull last found made anew was made (JetStream's
        # ``created``; None: never in this process): a delivery stored before it is of
        # a stream gone (see _of_old_stream)
        self._anew_at: datetime | None = None
        # the ack subjects of those naks, the last max_ack_pending of them (no more can
        # be unsettled at once): one taken back out of the client's reconnect buffer at
        # the leave is counted unsettled instead (see unsent_in_client)
        self._remade_back: OrderedDict[str, None] = OrderedDict()
        # the nodes gone whose stored messages this node looks at later (see _look_later)
        self._looks: dict[str, trio.CancelScope] = {}
        # the lost nodes whose consumers this node takes over that are looked at again
        # after their takeover's fetch under way (see _stored_since)
        self._taken_looks: set[str] = set()
        # the other members that ran the durable path when membership last changed: one
        # gone from them since (its leave heard, or forgotten) is looked at later
        self._durable_members: set[str] = set()
        # the live members that ran the durable path when membership last changed: one
        # gone from them since (lost, left, forgotten) makes every node sweep the stream
        # a last_notice_wait later (see _sweeps)
        self._live_durable: set[str] = set()
        # when the next sweep is due (Trio time; inf: none asked) and the event that
        # wakes the sweeper when one is asked sooner; the sweeper's scope (ended at stop)
        self._sweep_due = math.inf
        self._sweep_asked = trio.Event()
        self._sweeping = trio.CancelScope()
        #: sweeps of the stream made (see _sweeps), and those JetStream did not answer
        self.sweeps = 0
        self.sweep_failures = 0
        #: takeovers a sweep started: a gone node's stored messages no look took (its
        #: owner left or died before its look, or they were stored after a look found
        #: nothing; see _sweep)
        self.swept = 0
        self._sweep_log = Throttle(kind="durable.sweep")
        #: sweeps whose read of the stream's subjects stopped at its bound
        #: (SWEEP_SUBJECT_PAGES), and where the next one reads on (see _unpulled)
        self.sweeps_cut = 0
        self._sweep_cut_log = Throttle(kind="durable.sweep_cut")
        self._subjects_from = 0
        self._consumers_from = 0
        #: the pass over the stream's consumers under way (see _unpulled): the stream's
        #: state read at its start, and what each consumer read in it holds
        self._pass_before: _StreamCounts | None = None
        self._pass_held: dict[str, int] = {}
        #: takeovers by a look or a sweep of a node no member that ended at once, leaving
        #: its consumer to the pull requests that waited on it (a process of its name
        #: whose join is not heard here yet, or another node's takeover; see take_over)
        self.left_to_pullers = 0
        self._left_log = Throttle(kind="durable.left_to_pullers")
        # when each member that ran the path went from the members here, for a
        # last_notice_wait (see _sweep); when this node's path started
        self._left_at: dict[str, float] = {}
        self._started = math.inf
        self._nursery: trio.Nursery | None = None
        self._lost_log = Throttle(kind="durable.lost")
        self._takeover_log = Throttle(kind="durable.takeover")
        self._unpulled_log = Throttle(kind="durable.unpulled")
        #: deliveries by name not forwarded to the node their agent runs on, whose
        #: durable path is off (see _moved_to): they wait here (``agent_missing``)
        self.not_forwarded = 0
        #: failed fetches of lost nodes' consumers (see take_over), each tried again
        self.takeover_fetch_failures = 0
        # messages by name nakked here to wait for their agent (see failed): at most
        # max_waiting, which the consumer's max_ack_pending (4 x max_in_flight +
        # max_waiting) holds beside the slots of the node's other messages
        self._waiting = _Waiting(options.max_waiting)
        # the same for each lost node's consumer this node takes over, by node: one per
        # consumer, kept across its takeovers (see take_over)
        self._waits: dict[str, _Waiting] = {}
        # of wait_full: those of lost nodes' consumers (also in _with_node_dead)
        self._taken_wait_full = 0
        #: failures to make the stream or this node's consumer anew (see _set_up_again)
        self.remake_failures = 0
        self._wait_full_log = Throttle(kind="durable.wait_full")
        # the per-message lines a burst repeats (10,000 messages dying at once were
        # 10,000 ERROR lines): each kind logged at once, then at most once a second with
        # its count so far; the rest held (HeldLines: said at the leave). The counters
        # stay exact: the log is what is bounded
        self._failed_dead_log = Throttle(kind="durable.failed_dead")
        self._failed_dead = 0
        # by name, no agent of it here on the last delivery (no handler ran: not failed)
        self._missing_dead_log = Throttle(kind="durable.agent_missing_dead")
        self._missing_dead = 0
        self._unanswered_dead_log = Throttle(kind="durable.unanswered_dead")
        self._unanswered_dead = 0
        self._with_node_dead = 0
        self._too_big_log = Throttle(kind="durable.too_big")
        self._too_big = 0
        self._unforwarded_log = Throttle(kind="durable.unforwarded")
        self._lowered_log = Throttle(kind="durable.consumer_max_deliver")
        self._advisory_log = Throttle(kind="durable.max_deliveries_advisory")
        self._undeleted_log = Throttle(kind="durable.consumer_max_deliver_undeleted")
        self._stranded_log = Throttle(kind="durable.given_up_look")
        # the looks for what this node's consumer gave up unheard (see _given_up_looks):
        # their task's scope (ended at stop), the event that asks one now (a reconnect),
        # whether the next look is a fresh one (at the start, after a reconnect: it
        # reaches on to the last message delivered then), the stream sequence the
        # looks must reach still (0: none: the last look reached it), and how many times
        # this node's pull found the stream made anew (a look that ran across one keeps
        # no target: it was the old stream's sequence, see _find_stranded)
        self._looking = trio.CancelScope()
        self._look_asked = trio.Event()
        self._look_fresh = True
        self._look_reach = 0
        self._made_anew = 0
        self._look_failures = 0  # (in a row: see _look_failed)
        # the stream sequences of the messages this node terminated, counted dead (see
        # _terminate): one its consumer gave up as the term went (its last delivery's
        # ack_wait over) is deleted by a look and counted nowhere more (see
        # _delete_given_up)
        self._dead_seqs: OrderedDict[int, None] = OrderedDict()
        #: messages JetStream delivered no more before this node's ``max_deliver`` said
        #: they were dead (an operator lowered its consumer's): deleted from the stream,
        #: counted here (in ``ClusterStats.durable_dead``; see _max_deliveries)
        self.dead_lowered = 0
        self._forward_failed_log = Throttle(kind="durable.forward_failed")
        self._forward_failures = 0
        #: deliveries by name whose agent this node did not have, terminated (dead)
        #: because as many messages as their consumer's bound waited for theirs already
        #: (see _Waiting): this node's own consumer's, or a lost node's it takes over
        self.wait_full = 0

    def dead_reasons(self) -> dict[str, int]:
        """``dead`` (with ``dead_unforwarded``) by why each was given up, the counts of
        the throttled lines (``(N so far)``) that say them: see
        ``ClusterStats.durable_dead_reasons``."""
        taken = self._taken_wait_full
        counts = (
            self._undecodable,
            self._gone,
            self._missing_dead,
            self._failed_dead,
            self._unanswered_dead,
            self.wait_full,
            self._with_node_dead - taken,
            self.dead_unforwarded,
            self.dead_lowered,
        )
        return dict(zip(DEAD_REASONS, counts, strict=True))

    @property
    def forward_failures(self) -> int:
        """Forwards JetStream did not take (nakked, tried again; see _send_forward)."""
        return self._forward_failures

    @property
    def too_big(self) -> int:
        """Deliveries by name not forwarded: too big with the forward's headers."""
        return self._too_big

    @property
    def wait_bound(self) -> int:
        """How many messages by name may wait for their agent on this node's consumer at
        once (``DurableOptions.max_waiting``; see _Waiting)."""
        return self._waiting.bound

    async def start(self, nursery: trio.Nursery) -> None:
        if not self.options.enabled:
            return
        try:
            self._psub, made, held = await call_aio(self._setup)
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code != _MAX_ACK_PENDING_OVER_LIMIT:
                raise
            opts = self.options
            raise ValueError(
                f"JetStream refuses node {self.cluster.node!r}'s durable consumer: its"
                f" max_ack_pending, 4 x DurableOptions.max_in_flight ({opts.max_in_flight})"
                f" + max_waiting ({opts.max_waiting}) = {max_ack_pending(opts)}, is over"
                f" the limit of the server or account ({exc.description}); lower"
                " max_waiting (or max_in_flight)"
            ) from exc
        self._bind_own(made, held)
        # (JetStream's advisories of messages a consumer delivers no more: this node's,
        # and those of the lost nodes it takes over, see _max_deliveries; the
        # subscription ends with the data connection at the leave, not at the stop: an
        # UNSUB can wait on a stuck flusher, and the stop is bounded)
        try:
            await call_aio(
                self.cluster.nc.subscribe,
                f"{_MAX_DELIVERIES_ADVISORY}.{self._stream}.*",
                cb=self._max_deliveries,
            )
        except (nats.errors.Error, OSError) as exc:
            # (the path works without it: only a consumer an operator edits strands)
            log_guarded(
                log,
                logging.WARNING,
                "node %s: could not subscribe to JetStream's max deliveries advisories"
                " (%r): a message its consumer delivers no more before this node's"
                " max_deliver (an operator lowered the consumer's) stays in the stream",
                self.cluster.node,
                exc,
            )
        await self._ops.start()
        self._nursery = nursery
        self._started = trio.current_time()
        nursery.start_soon(self._pull)
        nursery.start_soon(self._sweeps)
        nursery.start_soon(self._given_up_looks)

    def _bind_own(self, made: object, held: int) -> bool:
        """This node's consumer (re)bound: its waiting ones bounded by ``max_waiting``,
        ``held`` (its unacked slots at the bind) less what this node holds itself counted
        as other pullers' (see :meth:`_Waiting.bind`). True if the stream was made anew
        since the last bind."""
        opts = self.options
        mine = len(self._in_flight) + len(self._held)
        return self._waiting.bind(
            opts.max_waiting, made, max(held - mine, 0), held_at_most(opts.ack_wait, opts)
        )

    async def _setup(self) -> tuple[Any, object, int]:
        """Make the stream (unless it is there) and this node's consumer (or bind it);
        the pull subscription, when the stream was made (JetStream's ``created``:
        another value later is a stream made anew) and the consumer's unacked slots then
        (``num_ack_pending``: other pullers' too, see :meth:`_Waiting.bind`). Run on the
        asyncio loop (``call_aio``)."""
        cluster = self.cluster
        js = cluster.data_js
        opts = self.options
        config = StreamConfig(
            name=self._stream,
            subjects=[f"{cluster.prefix}.durable.>"],
            num_replicas=cluster.options.kv_replicas,
            duplicate_window=opts.duplicate_window,
            # a message goes once its node acked or terminated it (by limits, the
            # default, every message ever sent stayed for good); each node's consumer
            # takes its own subjects, so no two consumers overlap
            retention=RetentionPolicy.WORK_QUEUE,
            # the bounds, if set: what no node takes (a node gone for good, a subject no
            # node pulls) would stay for good otherwise
            max_age=opts.max_age,
            max_msgs=-1 if opts.max_messages is None else opts.max_messages,
            discard=DiscardPolicy.OLD if opts.max_messages is None else DiscardPolicy.NEW,
            max_consumers=STREAM_MAX_CONSUMERS,
        )
        info = await self._make_stream(js, config)
        try:
            psub = await self._subscribe(cluster.node)
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code != CONSUMERS_OVER_LIMIT:
                raise
            raise _ConsumersFull(
                f"JetStream refuses node {cluster.node!r}'s durable consumer: the durable"
                f" stream {self._stream!r} is at its limit of consumers, its max_consumers"
                f" ({info.config.max_consumers}; -1: the server's default_max_consumers,"
                f" 1,000 on nats-server 2.15) or its account's ({exc.description}); each"
                " node that ran the durable path keeps a consumer until a takeover drains"
                " it: raise the limit, or delete the consumers of nodes gone for good"
            ) from exc
        try:
            held = (await psub.consumer_info()).num_ack_pending or 0
        except (nats.errors.Error, OSError):
            # (the count refines the wait bound only: a JetStream that does not answer it
            # fails neither the join nor a remake, and none is counted, the bound as
            # before the forty-third pass; a takeover needs its info: _subscribe_taken)
            held = 0
        except BaseException:
            with contextlib.suppress(nats.errors.Error, OSError, ValueError):
                await psub.unsubscribe()
            raise
        return psub, info.created, held

    async def _make_stream(self, js: Any, config: StreamConfig) -> Any:
        """The durable stream's info: made with ``config`` unless it is there; one there
        with other settings (another node's options) used as it is, its limit of
        consumers lifted if it sets none (made by an earlier version; see _stream_caps).
        Asyncio side."""
        return await self.cluster.stream_caps.make(js, config)

    async def _subscribe(self, node: str) -> Any:
        """The pull subscription of ``node``'s durable consumer (made if missing, bound if
        there): this node's own, or a lost node's (see :meth:`take_over`). Run on the
        asyncio loop."""
        opts = self.options
        js = self.cluster.data_js
        own: dict[str, Any] = {
            "ack_wait": opts.ack_wait,
            "max_deliver": opts.max_deliver,
            "max_ack_pending": max_ack_pending(opts),
        }
        # Its own consumer takes all of this node's settings; a lost node's (taken over)
        # only its max_deliver, which the takeover's settling assumes: its ack_wait is
        # kept (what the lost node had in flight is delivered again when the node that
        # fetched it said; the takeover settles what it fetches at once)
        wanted = own if node == self.cluster.node else {"max_deliver": opts.max_deliver}
        with contextlib.suppress(nats.js.errors.NotFoundError):
            # There already (made by an earlier process of the node, with other options,
            # or by the lost node whose messages this node takes over): a message nakked
            # to wait at delivery 2 of this node's 5 was never delivered again by a
            # consumer of max_deliver 2 (it stayed in the stream, uncounted)
            info = await js.consumer_info(self._stream, node)
            config = info.config
            # (ack_wait goes as whole nanoseconds: 1/3 s comes back as 0.333333333)
            if any(
                not math.isclose(getattr(config, key) or 0, value, abs_tol=1e-9)
                for key, value in wanted.items()
            ):
                await js.add_consumer(self._stream, config=config.evolve(**wanted))
        return await js.pull_subscribe(
            wire.durable_subject(self.cluster.prefix, node, "*"),
            durable=node,
            stream=self._stream,
            config=ConsumerConfig(**own),
        )

    async def _set_up_again(self) -> None:
        """JetStream refused a fetch (the stream or this node's consumer deleted, or lost
        with JetStream's store; or JetStream busy electing a leader): make them anew, or
        bind them again, and pull through the new subscription. What fails is retried at
        the next failed fetch."""
        try:
            psub, made, held = await call_aio(self._setup)
        except (nats.errors.Error, OSError, _ConsumersFull) as exc:
            self.remake_failures += 1
            self._say(
                self._fetch_log,
                "failures to make the durable stream anew",
                logging.WARNING,
                "node %s: could not make the durable stream %s or its consumer anew: %r",
                self.cluster.node,
                self._stream,
                exc,
            )
            return
        old, self._psub = self._psub, psub
        anew = self._bind_own(made, held)
        if anew:
            self._anew_at = made if isinstance(made, datetime) else None
            # (the looks for given-up messages reach on from the new stream's sequences,
            # and the old stream's terms name none of its messages)
            self._look_reach = 0
            self._made_anew += 1
            self._dead_seqs.clear()
            self._stream_made_anew()
        # (the old subscription ends as the stop's and the leave's do: the server told
        # first, shielded and bounded, see _unsubscribe_pull; what a request of it still
        # on the server delivered meanwhile, or since its last fetch ended, is in its
        # queue, nakked back to the consumer, which delivers it to the new subscription
        # at once; before the fiftieth pass nats-py's unsubscribe forgot the
        # subscription first and its queue was dropped: each message waited out
        # ack_wait, a delivery used up, counted nowhere)
        await _unsubscribe_pull(old, trio.current_time() + _PULL_CANCEL_WAIT)
        if (took := take_queued(old)) and anew:
            # (the old stream's messages went with it, and a nak of one would reach
            # the new stream's message of the same sequence: see _stream_made_anew)
            self.stale_settles += len(took)
        elif took:
            for jsmsg in took:
                self._settle(jsmsg, _REMADE_BACK)
            log_guarded(
                log,
                logging.INFO,
                "node %s: the durable pull set up again; the %d messages its old"
                " subscription held are nakked back to its consumer",
                self.cluster.node,
                len(took),
            )

    def _stream_made_anew(self) -> None:
        """The pull was set up again on a stream made anew (deleted by an operator, or
        lost with JetStream's store): its sequences begin at 1 again, and JetStream
        settles an ack, nak or term by the consumer and stream sequence its subject
        names, never asking which stream's message it was for. The deliveries of the old
        stream this node still holds (handed to agents, past ``ack_wait``, fetched and
        not handed over, their settles queued) are settled nowhere from now on, counted
        in ``stale_settles`` as each would have been sent (see :meth:`_send_ops`): their
        messages went with the old stream, and an answer's ack of one removed the new
        stream's message of its sequence from the work queue, in hand or not, never
        handled (measured before the fifty-first pass: its handler's failure was nakked
        to nothing and it was lost). Which they are is told at each send by when the
        delivery's message was stored (:meth:`_of_old_stream`), not by what was held
        here now: a batch the settle task took already, a takeover's settle of the new
        stream, a second remake (fifty-second pass: each escaped the set of ack
        subjects this kept, or was caught by it). Here only said."""
        held = [jsmsg for jsmsg, _due, _query in self._in_flight.values()]
        held.extend(jsmsg for jsmsg, _query in self._late.values())
        held.extend(self._held)
        held.extend(jsmsg for jsmsg, _op in self._ops.queued)
        stale = {jsmsg.reply for jsmsg in held if self._of_old_stream(jsmsg)}
        if stale:
            log_guarded(
                log,
                logging.WARNING,
                "node %s: the durable stream %s was made anew; the %d deliveries of the"
                " old one this node still holds are settled nowhere (their messages went"
                " with it; an ack would remove the new stream's message of its sequence)",
                self.cluster.node,
                self._stream,
                len(stale),
            )

    def _of_old_stream(self, jsmsg: NatsMsg) -> bool:
        """``jsmsg`` is a delivery of a durable stream since made anew: its message was
        stored before the stream this node's pull last found made anew was made (the
        time its ack subject carries, JetStream's store time, against the stream's
        ``created``; both the server's clock). A stream made anew numbers from 1 again,
        so nothing else in an ack subject tells the two apart."""
        made = self._anew_at
        return made is not None and jsmsg.metadata.timestamp < made

    async def stop(self, timeout: float = math.inf) -> None:
        """Leaving: end the pull (what it fetched and did not hand over is nakked), then
        send the acks, naks and terms still queued; within ``timeout`` seconds, at most
        half of it for the pull to end.

        A fetch under way is cancelled and ended at once: what it took is nakked back
        (``handed_back_at_leave``, see :meth:`_fetch_shielded`; waited for until three
        quarters of ``timeout``, then cancelled for good, what it took left to
        JetStream, said once). A pull not ended in its half (its fetch apart: a
        delivery that outlived its cancel) is abandoned: what it
        fetched and did not hand over is left to JetStream, which delivers it again
        after ``ack_wait``. (That half runs on the clock while the data connection is
        down, unlike the acks' half: ending the pull needs no connection, the fetch's
        cancel is the client's own, and holding it would only make the leave longer.)
        Acks, naks and terms not sent when the queue closes (its
        flush, the batch under way included, cut at the end of ``timeout``), or
        made after it (an answer that came later), are not sent: JetStream delivers
        those messages again too. Both are counted in ``unsettled_at_leave`` and
        logged once."""
        if self._psub is None:
            return
        start = trio.current_time()
        self._nursery = None  # (no takeover starts now)
        for scope in self._looks.values():
            scope.cancel()
        self._sweeping.cancel()
        self._looking.cancel()
        self._pulling.cancel()
        # (the takeovers end at their next safe point, their fetch under way answered:
        # what it took is handed back, see take_over; one still fetching at the bound,
        # an idle long poll most often, is cancelled: its fetch is ended, and what it
        # took, if anything, is nakked back, see _fetch_shielded, and so is what its
        # request took after that, see _end_taken; before the forty-eighth pass it
        # waited out ack_wait, before the forty-ninth that request's take did)
        await self._takeovers_ended(start + timeout / 2)
        for scope in self._takeovers.values():
            scope.cancel()
        with trio.move_on_at(start + timeout / 2):
            await self._pull_ended.wait()
        if not self._pull_ended.is_set() and not self._abandoned:  # (once: see below)
            self._abandoned = True
            held = len(self._held)
            self.unsettled_at_leave += held
            log_guarded(
                log,
                logging.WARNING,
                "node %s: the durable pull did not end within %gs of its cancel:"
                " abandoned; %d messages it fetched and had not handed over are left to"
                " JetStream, which delivers them again after ack_wait (%gs)",
                self.cluster.node,
                timeout / 2,
                held,
                self.options.ack_wait,
            )
        # (a fetch cancelled under way ends first: one cancelled in its first, no-wait
        # request can still send its long poll's as it ends, and only a request the
        # server has before the inbox's unsubscribe is dropped by it)
        await self._cancelled_fetches_ended(start + timeout / 2)
        await self._end_pull_requests(start + timeout / 2 + _PULL_CANCEL_WAIT)
        # (the fetches cancelled under way, ended at their cancel, return: what they took
        # is nakked back before the queue closes; a quarter of the bound is left for the
        # queue; with a nats-py whose fetch end_fetch cannot end, FETCH_WAIT from their
        # start)
        await self._cancelled_fetches_ended(start + timeout * 3 / 4)
        # (the takeovers cancelled above unsubscribe, and hand back what their requests
        # took, once their fetch ended: see _end_taken)
        await self._takeovers_ended(start + timeout * 3 / 4)
        if self._fetches_ending and not self._fetches_abandoned:  # (once, as the pull's)
            self._fetches_abandoned = True
            for task in self._fetches_ending:
                task.cancel()  # (as before the forty-eighth pass: what it took is dropped)
            log_guarded(
                log,
                logging.WARNING,
                "node %s: %d durable fetches cancelled at the leave did not end within"
                " %gs of its start: cancelled; what they took, if anything, is left to"
                " JetStream, which delivers it again after ack_wait (%gs)",
                self.cluster.node,
                len(self._fetches_ending),
                timeout * 3 / 4,
                self.options.ack_wait,
            )
        await self._close_ops(start + timeout)
        self._count_unsent()

    async def _takeovers_ended(self, until: float) -> None:
        """Leaving: wait until the takeovers have ended (see :meth:`take_over`), or
        ``until``."""
        with trio.move_on_at(until):
            while self._takeovers:
                await self._takeover_ended.wait()

    async def _cancelled_fetches_ended(self, until: float) -> None:
        """Leaving: wait until the fetches cancelled under way have returned (see
        :meth:`_fetch_shielded`), or ``until``."""
        with trio.move_on_at(until):
            while self._fetches_ending:
                await self._fetches_ended.wait()

    def _count_unsent(self) -> None:
        """Leaving, the queue closed: the acks, naks and terms queued and not sent are
        counted in ``unsettled_at_leave`` (once), logged."""
        unsent = self._settles_queued - self._settles_sent
        if unsent > 0:
            self.unsettled_at_leave += unsent
            log_guarded(
                log,
                logging.ERROR,
                "node %s: leaving, %d durable acks, naks or terms not sent (failed, in"
                " the batch the leave stopped, or still queued when its share for them"
                " ran out): JetStream delivers those messages again (their handlers see"
                " the same ids again)",
                self.cluster.node,
                unsent,
            )
            # counted: a second stop (the leave's, after a caller's) counts them not again
            self._settles_sent = self._settles_queued

    async def _end_pull_requests(self, until: float) -> None:
        """Leaving: the pull's cancel ends the fetch here, not its request on the
        server, which waits out the fetch's wait there (``FETCH_WAIT``): a message stored
        for this node meanwhile (by a sender that has not heard the leave yet) went to
        it, into an inbox nobody reads, and waited out ``ack_wait`` before the node's next
        process or a survivor's takeover could have it. The inbox is unsubscribed, and the
        server has it (a flush), before the leave is announced: the server drops a
        request whose inbox has no subscriber (see :meth:`_drop_pull_requests`). Bounded
        by ``until``; what fails is left to the requests' expiry, as before, and so are
        they while the data connection is down, or its client holds unwritten bytes (a
        reconnect under way the watch has not marked yet): the server dropped the inbox
        with a connection that went, and what the client holds is the leave's to count
        (see ``Cluster._take_client_buffer``), not to be pushed out by this flush. What
        the subscription's queue holds is nakked back then too (counted unsettled if the
        nak is not sent: before the fiftieth pass it was left unread, uncounted)."""
        try:
            nc = self.cluster.nc
        except TransportUnavailable:
            return  # (never connected)
        psub = self._psub
        down = self.cluster.connections.down_at(_DATA) is not None or nc.pending_data_size
        if not (down or self._pull_dropped):  # (dropped: unsubscribed already)
            await _unsubscribe_pull(psub, until)
        # (what the request took after the fetch ended, before the server had the
        # unsubscribe, is in the subscription's queue, which nobody reads: nakked back,
        # not left to wait out ack_wait; second review of the forty-eighth pass; kept
        # there until the server had the unsubscribe, see unsubscribe_server_first:
        # forty-ninth pass)
        if took := take_queued(psub):
            self._hand_back_cancelled(
                took, "its pull's request outlived its fetch until the inbox's unsubscribe"
            )

    async def _close_ops(self, until: float) -> None:
        """Leaving: close the queue of acks, naks and terms (they are sent on the data
        connection) by ``until``, a bound that stands still while that connection is
        down (as the leave's other steps' bounds: a failover of 4 s under a
        ``server_lost_wait`` of 5 s cut the send at 1.5 s, and JetStream delivered those
        messages again), and is cut once it has been down ``server_lost_wait``. One gone
        already (the server died) gets the bound as it stands, as before."""
        connections = self.cluster.connections
        wait = self.cluster.options.server_lost_wait
        if connections.gone(_DATA, wait):
            with trio.move_on_at(until):
                await self._ops.close()
            return
        with trio.CancelScope(deadline=until) as bound:
            await connections.unless_gone(_DATA, wait, self._ops.close, bound=bound)

    def unsent_in_client(self, subjects: list[str]) -> None:
        """Leaving with the data connection down: the acks, naks and terms this channel
        counted sent (the NATS client took them, into its reconnect buffer) to
        ``subjects`` (their ``$JS.ACK.`` subjects) were taken out of that buffer, never
        sent (see ``Cluster._take_client_buffer``): JetStream delivers their messages
        again. Counted in ``unsettled_at_leave``, logged; a hand-back among them is
        taken out of ``handed_back_at_leave`` (counted there as the client took it:
        before the fiftieth pass it stayed there too, the message counted twice), and
        one of a set-up again's out of ``handed_back_at_remake``."""
        settles = len(subjects)
        back = self._handed_back.intersection(subjects)
        self._handed_back -= back
        self.handed_back_at_leave -= len(back)
        remade = [subject for subject in subjects if subject in self._remade_back]
        for subject in remade:
            del self._remade_back[subject]
        self.handed_back_at_remake -= len(remade)
        self.unsettled_at_leave += settles
        log_guarded(
            log,
            logging.ERROR,
            "node %s: leaving with the NATS connection down, %d durable acks, naks or"
            " terms in the client's reconnect buffer not sent: JetStream delivers those"
            " messages again (their handlers see the same ids again)",
            self.cluster.node,
            settles,
        )

    # --- a lost node's messages ---------------------------------------------------------------

    def takeovers_changed(self) -> None:
        """Membership changed (a node lost, one left, one heard): take over the durable
        messages of each lost member (unreachable, not forgotten) whose rendezvous owner
        over the reachable members that run the durable path (their records say so) is
        this node, unless it does already (see
        :meth:`take_over`). The survivors that see the same members pick the same one;
        one that is lost in turn is replaced at that loss. Two nodes pulling the same
        lost node's consumer (their views differ for a moment) is harmless: JetStream
        delivers each message to one of them at a time. A member that ran the path and
        is gone since (its leave heard) is looked at later by its owner (see
        :meth:`_look_later`)."""
        cluster, nursery = self.cluster, self._nursery
        if nursery is None or not self.options.enabled or self._leaving():
            return
        own = cluster.node
        members = cluster.members.members
        # (among the members that run the durable path: one whose record says it does
        # not would win and take nothing, see NodeInfo.runs_durable)
        live = [
            n
            for n in cluster.live_nodes()
            if n != own and ((info := members.get(n)) is None or info.runs_durable)
        ]
        members_now = cluster.member_list()
        for node in [n for n in self._looks if n in cluster.members.members]:
            self._looks.pop(node).cancel()  # (a member again: the members' rules)
        gone = self._durable_members - {info.node for info in members_now}
        self._durable_members = {i.node for i in members_now if i.runs_durable and i.node != own}
        now = trio.current_time()
        for node in sorted(gone):
            self._left_at[node] = now
            if node not in self._takeovers and _owner_of(node, own, live):
                self._look_later(node)
        # A live member gone from the live ones (lost, left, forgotten): it may have owned
        # looks that no one takes now, so each node sweeps a last_notice_wait later, and
        # takes what it owns of what no node pulls (see _sweep)
        live_durable = {
            i.node for i in members_now if i.reachable and i.runs_durable and i.node != own
        }
        if self._live_durable - live_durable:
            self._ask_sweep(now, cluster.options.last_notice_wait)
        self._live_durable = live_durable
        for info in members_now:
            node = info.node
            # (a reachable member that runs no durable path pulls its consumer no more:
            # one made by an earlier process of its name, which ran it)
            if (info.reachable and info.runs_durable) or node == own or node in self._takeovers:
                continue
            if _owner_of(node, own, live):
                self._start_takeover(nursery, node)

    def _leaving(self) -> bool:
        """Whether this node is leaving: its kernel shutting down (its agents draining,
        the leave to come), its cluster closing, or its durable path stopped. No
        takeover starts then (a membership change's, a look's, a sweep's): what a node
        that leaves took would wait out ``ack_wait`` in JetStream, or be forwarded to its
        agents as they stop; the others take it over once its leave is heard."""
        cluster = self.cluster
        return self._nursery is None or cluster.closing or cluster.kernel.shutting_down

    def _look_later(self, node: str) -> None:
        """Look at the stream ``last_notice_wait`` from now for what is stored for
        ``node``, gone from the members (its clean leave heard, or forgotten), and take it
        over then if it is still gone (see :meth:`_look_again`)."""
        nursery = self._nursery
        if nursery is None or self._leaving() or node in self._takeovers or node in self._looks:
            return
        scope = self._looks[node] = trio.CancelScope()
        nursery.start_soon(self._look_again, node, scope)

    async def _look_again(self, node: str, scope: trio.CancelScope) -> None:
        """A node that left cleanly keeps its consumer, for a process of its name that
        comes back soon (a rolling restart) to pull it itself; what senders stored for it
        after (their views still had it), or anything its leave left, waited for
        ``max_age`` (for ever without one), uncounted, when it never came back. Its
        rendezvous owner among the survivors looks ``last_notice_wait`` after the leave
        (the time the others wait for its last notice: a sender that still had it then
        was cut off) and, the node still gone and something stored on its subject, takes
        it over as a lost node's (by name forwarded to where the name runs now, by id dead
        with its reason); that takeover looks again as long after it ends, until a look
        finds nothing."""
        stored = False
        try:
            with scope:
                await trio.sleep(self.cluster.options.last_notice_wait)
                if node in self.cluster.members.members:
                    return  # (a member again: back, or lost: the members' rules)
                try:
                    stored = await call_aio(self._stored_for, node)
                except (nats.errors.Error, OSError):
                    stored = True  # (the takeover finds out, and retries as it fetches)
        finally:
            if self._looks.get(node) is scope:
                del self._looks[node]
        nursery = self._nursery
        if (
            stored
            and nursery is not None
            and not self._leaving()
            and node not in self._takeovers
            and node not in self.cluster.members.members
        ):
            self._start_takeover(nursery, node)

    def _ask_sweep(self, now: float, after: float) -> None:
        """Sweep the stream ``after`` seconds from ``now`` (or sooner, if one is due)."""
        due = now + after
        if due < self._sweep_due:
            self._sweep_due = due
            self._sweep_asked.set()

    async def _sweeps(self) -> None:
        """Sweep the stream (see :meth:`_sweep`) when asked (a live member gone: its looks
        went with it), and every ``SWEEP_LOOKS x last_notice_wait`` if this node is the
        rendezvous owner of the sweep among the live members that run the durable path
        (one node a cluster: two requests a period), for what is stored after a look
        found nothing (a sender cut off longer than ``last_notice_wait``)."""
        every = SWEEP_LOOKS * self.cluster.options.last_notice_wait
        periodic = trio.current_time() + every
        with self._sweeping:
            while True:
                self._sweep_asked = trio.Event()
                with trio.move_on_at(min(periodic, self._sweep_due)):
                    await self._sweep_asked.wait()
                    continue
                now = trio.current_time()
                asked = now >= self._sweep_due
                if asked:
                    self._sweep_due = math.inf
                every_node = False
                if now >= periodic:
                    periodic = now + every
                    every_node = _owner_of(
                        "", self.cluster.node, sorted(self._live_durable), key=_SWEEP_KEY
                    )
                if asked or every_node:
                    await self._sweep(every_node)

    async def _sweep(self, every_node: bool = False) -> None:
        """Find the nodes no member any more whose subjects hold messages (see
        :meth:`_unpulled`) and take over those this node owns (the rendezvous owner of
        ``durable:<node>`` over the live members that run the durable path), as a look
        does (see :meth:`_look_again`); ``every_node`` (the periodic sweep, made by one
        node for the cluster): each one found, whoever owns it (its owner sweeps only
        when a live member goes: what is stored after a look found nothing was left to
        the sweeper's share of the owners, the other shares waited for ``max_age``). A
        node that is a member again, or taken over or looked at here already, is left
        to those. A sweep JetStream does not answer is counted (``sweep_failures``),
        logged, and made again at the next period. None is made while this node leaves
        (see :meth:`_leaving`), and one under way when it begins to leave starts no
        takeover: cut there, it took nothing."""
        if self._leaving():
            return  # (the others sweep once its leave is heard)
        self.sweeps += 1
        try:
            found, cut = await call_aio(self._unpulled)
        except (nats.errors.Error, OSError, TimeoutError, ValueError) as exc:
            self.sweep_failures += 1
            self._say(
                self._sweep_log,
                "failed sweeps of the durable stream",
                logging.WARNING,
                "node %s: could not sweep the durable stream %s for messages no node pulls:"
                " %r (swept again later)",
                self.cluster.node,
                self._stream,
                exc,
            )
            return
        if cut is not None:
            self.sweeps_cut += 1
            what, read, total = cut
            if what == _UNSEEN:
                bound, then = (
                    f"{SWEEP_CONSUMER_PAGES} asked",
                    "the others are left to the next pass",
                )
            else:
                pages = SWEEP_SUBJECT_PAGES if what == "subjects" else SWEEP_CONSUMER_PAGES
                bound, then = (
                    f"{pages} pages of nats-server's",
                    "the next sweep reads on from there",
                )
            self._say(
                self._sweep_cut_log,
                "sweeps of the durable stream cut at their bound",
                logging.WARNING,
                "node %s: the sweep of the durable stream %s read %s, its bound (%s); %s"
                " (%d so far)",
                self.cluster.node,
                self._stream,
                f"{read} of its {what}" if total is None else f"{read} of its {total} {what}",
                bound,
                then,
                self.sweeps_cut,
            )
        nursery = self._nursery
        if nursery is None or self._leaving():
            return  # (it began to leave during the reads: nothing taken, see _leaving)
        members = self.cluster.members.members
        own = self.cluster.node
        live = sorted(self._live_durable)
        # (a node gone less than last_notice_wait ago is left to its look, and to a
        # sender that still had it; one this node never saw go, to this node's first
        # last_notice_wait; membership is read here, after the reads, with no await
        # before the takeovers start: see take_over for a join not heard yet)
        recent = trio.current_time() - self.cluster.options.last_notice_wait
        for node, at in list(self._left_at.items()):
            if at < recent:
                del self._left_at[node]
        for node in sorted(found):
            if (
                node == own
                or node in members
                or self._left_at.get(node, self._started) >= recent
                or node in self._takeovers
                or node in self._looks
                or not (every_node or _owner_of(node, own, live))
            ):
                continue
            self.swept += 1
            self._start_takeover(nursery, node)

    async def _unpulled(self) -> tuple[set[str], tuple[str, int, int | None] | None]:
        """The nodes whose subjects hold messages that may be pulled by no one (asyncio
        side; the caller leaves out the members): those whose consumers hold some
        (pending or unacked) and have no pull request waiting, and the nodes of the
        stream's subjects that have no consumer (a consumer deleted when drained, and
        messages stored for its node after), and, if a read was cut at its bound, what
        was read (``"consumers"``: ``SWEEP_CONSUMER_PAGES``; ``"subjects"``:
        ``SWEEP_SUBJECT_PAGES``; ``_UNSEEN``: the nodes of subjects with no consumer,
        asked for it one by one, ``SWEEP_CONSUMER_PAGES``), how far, and of how many (None: not said, as for the consumers).

        The consumers are read in passes: a sweep reads on from where the last one was
        cut, the consumers read so far kept (their names and what each holds), so a pass
        over more than a sweep's bound takes several sweeps, each bounded. A sweep whose
        read is cut knows only some consumers: the nodes found among them are the
        sweep's, and no subject is read (a node whose consumer was not read would be
        taken for one with none). The sweep that ends a pass reads the subjects as below,
        against all the consumers seen in that pass.

        The subjects (one per agent addressed) are read only when the stream may hold
        more than its consumers do. JetStream has no request for both counts at once, so
        the stream's count is read before and after the consumers' (at the pass's start
        and at its end): the messages stored between (its last sequence's rise) are all
        that can be in the consumers' count and not in the first, so a count of the
        consumers at least the first plus those means no message on a subject with no
        consumer was there at the first read and still is at the second (a consumer
        read twice in a pass, the pages shifted by one created, counts once). Not so
        (messages acknowledged between the reads, on a busy stream): the counts again,
        at most ``_SWEEP_COUNTS`` times, then the subjects; at once if nothing was stored
        or acknowledged between (they differ then for sure), or if the pass took several
        sweeps (its consumers are not read again).

        A pass of several sweeps may have missed a consumer created (or shifted by one
        deleted) during it: each node of a subject with no consumer in that pass is
        asked for its consumer, one request each, at most ``SWEEP_CONSUMER_PAGES`` a
        sweep; one that has a consumer now, and those past the bound (the sweep cut,
        said), are left to the next pass."""
        js = self.cluster.data_js
        if not self._consumers_from or self._pass_before is None:
            self._consumers_from = 0
            self._pass_before = await self._stream_counts()
            self._pass_held = {}
        before = self._pass_before
        for _ in range(_SWEEP_COUNTS):
            start = self._consumers_from
            nodes, held, stop = await self._consumers(js, start)
            self._pass_held.update(held)
            if stop is not None:
                self._consumers_from = stop
                return nodes, ("consumers", stop, None)
            named = self._pass_held
            self._consumers_from, self._pass_before, self._pass_held = 0, None, {}
            after = await self._stream_counts()
            stored = after.last_seq - before.last_seq
            # (a last sequence that fell: the stream made anew between the reads, no
            # measure of what was stored: not settled)
            if stored >= 0 and before.messages + stored <= sum(named.values()):
                return nodes, None
            if start or (stored == 0 and before.messages == after.messages):
                break  # (a pass of several sweeps, or nothing moved between the reads)
            before = self._pass_before = after
        head = f"{self.cluster.prefix}.durable."
        offset = self._subjects_from
        # (the count of subjects the last read of the stream said: it sizes a page's wait)
        total = after.subjects
        unnamed: set[str] = set()
        cut: tuple[str, int, int | None] | None = None
        for _ in range(SWEEP_SUBJECT_PAGES):
            page, total = await self._subjects_page(offset, subjects_wait(total))
            for subject in page:
                node = subject.removeprefix(head).partition(".")[0]
                if node not in named:
                    unnamed.add(node)
            offset += len(page)
            if not page or offset >= total:
                break
        else:
            # (the subjects past the bound: the next sweep reads on from here; one
            # stored or gone between two pages shifts the pages by one, found at the
            # next turn)
            self._subjects_from = offset
            cut = ("subjects", offset, total)
        if cut is None:
            self._subjects_from = 0
        if start:
            asked, unnamed = await self._without_consumer(js, unnamed)
            cut = cut or asked
        return nodes | unnamed, cut

    async def _consumers(self, js: Any, offset: int) -> tuple[set[str], dict[str, int], int | None]:
        """The stream's consumers from ``offset``, read page by page, at most
        ``SWEEP_CONSUMER_PAGES`` (asyncio side): the nodes of those that hold messages
        with no pull request waiting, how many messages each holds (pending or unacked),
        and, if the read stopped at its bound, the offset the next read starts from
        (None: read to the end)."""
        nodes: set[str] = set()
        held: dict[str, int] = {}
        for _ in range(SWEEP_CONSUMER_PAGES):
            page = await js.consumers_info(self._stream, offset=offset)
            offset += len(page)
            for info in page:
                count = held[info.name] = (info.num_pending or 0) + (info.num_ack_pending or 0)
                # (one with pull requests waiting is pulled: a process of that name whose
                # join is not heard here yet, or another node's takeover)
                if count and not info.num_waiting:
                    nodes.add(info.name)
            if not page:
                return nodes, held, None
        return nodes, held, offset

    async def _without_consumer(
        self, js: Any, unnamed: set[str]
    ) -> tuple[tuple[str, int, int] | None, set[str]]:
        """Of ``unnamed`` (nodes whose subjects hold messages and whose consumer a pass
        of several sweeps did not see), those that have no consumer now (asyncio side),
        asked one by one in their order, at most ``SWEEP_CONSUMER_PAGES``; and, if some
        were left unasked, how many were asked of how many (the rest, and those with a
        consumer, are left to the next pass)."""
        found: set[str] = set()
        ordered = sorted(unnamed)
        for node in ordered[:SWEEP_CONSUMER_PAGES]:
            try:
                await js.consumer_info(self._stream, node)
            except nats.js.errors.NotFoundError:
                found.add(node)
        if len(ordered) > SWEEP_CONSUMER_PAGES:
            return (_UNSEEN, SWEEP_CONSUMER_PAGES, len(ordered)), found
        return None, found

    async def _stream_counts(self) -> _StreamCounts:
        """The stream's counts (asyncio side): its messages and last sequence, and how
        many subjects it holds, which sizes a page of subjects' wait (see subjects_wait).
        One STREAM.INFO request, raw: nats-py's ``stream_info`` drops the subjects'
        count (a sweep that read the subjects asked three times before the forty-seventh
        pass: nats-py's before and after the consumers, then the count)."""
        subject = f"{wire.JS_API}.STREAM.INFO.{self._stream}"
        reply = await self.cluster.nc.request(subject, b"", timeout=_JS_API_WAIT)
        return _stream_counts_answer(reply.data, subject)

    async def _subjects_page(self, offset: int, wait: float) -> tuple[dict[str, int], int]:
        """One page of the stream's subjects from ``offset`` (nats-server pages its
        subjects sorted, 100,000 a page) with their counts, and how many subjects it has
        in all (asyncio side), waited for ``wait`` seconds. nats-py's ``stream_info``
        asks no offset: its request, with one."""
        request = {"subjects_filter": f"{self.cluster.prefix}.durable.>", "offset": offset}
        subject = f"{wire.JS_API}.STREAM.INFO.{self._stream}"
        reply = await self.cluster.nc.request(subject, json.dumps(request).encode(), timeout=wait)
        return _subjects_answer(reply.data, subject, offset)

    def _start_takeover(self, nursery: trio.Nursery, node: str) -> None:
        scope = self._takeovers[node] = trio.CancelScope()
        nursery.start_soon(self.take_over, node, scope)

    def _still_lost(self, node: str) -> bool | None:
        """True while ``node`` is a lost member; False once it is heard again running
        the durable path (its process pulls its own consumer: a restart, a partition
        healed); None once it is no member (forgotten, or its leave heard), or while it
        is a reachable one that runs no durable path (a process of its name restarted
        with it off): its consumer is taken until drained, then deleted."""
        info = self.cluster.members.members.get(node)
        if info is None or (info.reachable and not info.runs_durable):
            return None
        return not info.reachable

    async def take_over(self, node: str, scope: trio.CancelScope) -> None:
        """Pull the durable consumer of lost member ``node`` (whose messages no one else
        pulls: accepted by the senders, they would wait in the stream until its
        ``max_age`` and vanish uncounted), as Akka's shard handoff or an Erlang takeover
        moves a dead node's work: each message by name is forwarded to the node where
        its name runs now (re-placed), or nakked with the missing-agent delays while it
        runs nowhere yet (waiting for a member that runs its type), dead after
        ``max_deliver``; each message by agent id is dead at once (the agent died with
        its node: an id is never used again), logged with that reason (unless the batch
        is settled once the node was heard again, the same process: nakked back to it,
        ``given_back``). Through the lost
        node's own consumer: a process that comes back under its name binds the same
        one, and JetStream gives each message to one puller at a time; a forward stores
        its copy under the message id and the copy's stream sequence, so a message
        forwarded by both (one took it past ``ack_wait``) is stored once.

        Also the consumer of a reachable member whose record says it runs no durable
        path (a process of its name restarted with it off; senders store nothing new
        for it): a message by id is dead then too (no delivery by id can go elsewhere).

        Ends when the node is heard again running the path (after the fetch under way:
        what it fetched is settled first), or, once it is no member (forgotten) or while
        it runs no durable path, when its consumer is drained (at once if it is, or if
        there is none): the consumer is deleted then (no sender can address that node
        any more, or stores for it). Ends as this node begins to leave (its kernel's
        shutdown, its cluster's close: see :meth:`_leaving`) at its next safe point, no
        fetch under way: what the last fetch took is handed back (nakked, see
        :meth:`_hand_back_at_leave`); at the leave's ``stop()``, one still fetching at its
        bound is cancelled (what that fetch took is nakked back as it returns, see
        :meth:`_fetch_shielded`)."""
        cluster = self.cluster
        psub: Any = None
        said = False
        idle = True  # (its last fetch got nothing: the next asks heartbeats, see _poll)
        # (bound to the consumer's slots once subscribed; kept across a resubscription,
        # and across takeovers of the node: lost, heard, lost again, its waiting ones
        # hold their slots still)
        waiting = self._waits.setdefault(node, _Waiting(0))
        took = False  # (subscribed: a node gone is looked at again after, see _look_later)
        checked = False  # (the puller check made, or needed none: see _pulled_by_others)
        looked = False  # (for what its consumer delivers no more: see _find_stranded)
        try:
            with scope:
                # (no takeover goes on while this node leaves: see _leaving; checked at
                # its safe points, before a fetch and after one)
                while (still := self._still_lost(node)) is not False and not self._leaving():
                    try:
                        if psub is None:
                            if still is None and await self._dropped_when_drained(node):
                                return  # (nothing to take: not made anew to find that)
                            if not said:
                                said = True
                                log_guarded(
                                    log,
                                    logging.WARNING,
                                    "node %s: node %r is %s: taking over the durable"
                                    " messages stored for it",
                                    cluster.node,
                                    node,
                                    "lost" if still else "gone, or running no durable path",
                                )
                            psub, info = await call_aio(self._subscribe_taken, node)
                            took = True
                            if not checked and still is None:
                                # (a node no member whose consumer someone pulls: a
                                # process of its name whose join this node has not heard
                                # yet, which the sweep's read found between two of its
                                # fetches, or another node's takeover; left to them, and
                                # looked at again later, see the finally)
                                try:
                                    pulled = await self._pulled_by_others(psub, info)
                                except BaseException:
                                    # (the consumer's read failed, or a cancel: this
                                    # subscription is dropped, the next one checks)
                                    dropped, psub = psub, None
                                    await _unsubscribe_taken(dropped)
                                    raise
                                if pulled:
                                    self._left_to_pullers(node, pulled)
                                    return
                            # (checked, or needed none: no later subscription checks,
                            # its own fetches and settles would look like a puller's;
                            # one whose check failed, the consumer's read refused,
                            # checks at the next, none skipped: forty-eighth pass)
                            checked = True
                            opts = self.options
                            waiting.bind(
                                taken_bound(info.config.max_ack_pending or 0, opts),
                                info.created,
                                info.num_ack_pending or 0,
                                held_at_most(info.config.ack_wait or 0.0, opts),
                            )
                            idle = True
                            if not looked:
                                # (once a takeover: this node holds none of its messages
                                # yet, none of them counted here twice)
                                looked = True
                                self._taken_looks.discard(node)
                                await self._find_stranded(node)
                        elif node in self._taken_looks:
                            # (an advisory of it that looks sent before its store: see
                            # _stored_since; what this node holds of it is pending, which
                            # a look leaves alone, as for its own consumer)
                            self._taken_looks.discard(node)
                            await self._find_stranded(node)
                        msgs, heard = await self._fetch_bounded(
                            lambda msgs: self._hand_back_at_leave(node, msgs, waiting),
                            psub,
                            _poll,
                            psub,
                            self.options.max_in_flight,
                            idle,
                        )
                        idle = not msgs
                    except (nats.errors.TimeoutError, TimeoutError):
                        msgs, heard = [], None
                    except (nats.errors.Error, OSError) as exc:
                        self._takeover_fetch_failed(node, repr(exc))
                        if psub is not None:
                            # (not only dropped: a pull request of it still on the
                            # server would take a message into its inbox, which nobody
                            # reads, to wait out ack_wait; forty-ninth pass)
                            dropped, psub = psub, None
                            await self._end_taken(node, dropped, waiting)
                        await trio.sleep(cluster.options.reconnect_wait)
                        continue
                    if msgs and self._leaving():
                        self._hand_back_at_leave(node, msgs, waiting)
                        return
                    if heard is False:
                        # nothing came back at all (a server hung behind a connection that
                        # is up, a stream with no leader): as a refused fetch, counted
                        self._takeover_fetch_failed(
                            node, "no answer from JetStream within the fetch's wait"
                        )
                        continue
                    if not msgs:
                        # (asked again: the node may be back since the fetch began, its
                        # process binding the consumer, which is no longer to delete)
                        if self._still_lost(node) is None and await self._dropped_when_drained(
                            node
                        ):
                            return
                        continue
                    for jsmsg in msgs:
                        self._take(node, jsmsg, waiting)
        finally:
            # (before the takeover counts as ended: the leave's stop waits for that, so
            # what this hands back is queued before the settles' queue closes)
            try:
                if psub is not None:
                    await self._end_taken(node, psub, waiting)
            finally:
                if self._takeovers.get(node) is scope:
                    del self._takeovers[node]
                    self._taken_looks.discard(node)
                    ended, self._takeover_ended = self._takeover_ended, trio.Event()
                    ended.set()
                    if took and node not in self.cluster.members.members:
                        # (what a sender with a stale view stores for it after the drain)
                        self._look_later(node)

    async def _end_taken(self, node: str, psub: Any, waiting: _Waiting) -> None:
        """A takeover of ``node`` is done with its pull subscription ``psub`` (it ended,
        or a fetch of it failed): unsubscribed (shielded and bounded, see
        :func:`_unsubscribe_taken`) once a fetch cancelled under way has ended (bounded
        by ``_PULL_CANCEL_WAIT``: one cancelled in its first, no-wait request can still
        send its long poll's as it ends, and only a request the server has before the
        unsubscribe is dropped by it, as at the node's own pull's end, see
        :meth:`_end_pull_requests`). What a pull request of it that outlived its fetch
        took into its queue before the unsubscribe, which nobody reads now, is nakked
        back to ``node``'s consumer at a leave (:meth:`_hand_back_at_leave`), settled as
        the takeover settles what it fetches otherwise (:meth:`_take`): before the
        forty-ninth pass it waited out ``ack_wait``, uncounted."""
        with trio.CancelScope(shield=True):
            await self._cancelled_fetches_ended(trio.current_time() + _PULL_CANCEL_WAIT)
        await _unsubscribe_taken(psub)
        if took := take_queued(psub):
            if self._leaving():
                self._hand_back_at_leave(node, took, waiting)
                return
            for jsmsg in took:
                self._take(node, jsmsg, waiting)

    def _hand_back_at_leave(self, node: str, msgs: list[NatsMsg], waiting: _Waiting) -> None:
        """This node began to leave while a takeover of ``node`` fetched ``msgs``: each
        nakked back to that node's consumer (``redelivery_delay``), not taken (forwarded
        to the agents of a node about to stop, or held here until ``ack_wait``): the
        node's next owner, whose takeover starts once this leave is heard, or a process of
        its name gets them, as Akka's shard handoff hands a region's buffered messages
        back when it stops. Logged; each nak counted once: in ``handed_back_at_leave``
        as it is sent (see _send_ops), in ``unsettled_at_leave`` if the leave does not
        send it (the queue closed, or cut unsent: see stop), as any other settle."""
        for jsmsg in msgs:
            waiting.delivered(jsmsg)  # (delivered again: it waits here no more)
            self._settle(jsmsg, _HAND_BACK)
        log_guarded(
            log,
            logging.INFO,
            "node %s: leaving, its takeover of node %r's durable messages ended; the %d"
            " it had fetched are nakked back to that node's consumer (%d handed back so"
            " far)",
            self.cluster.node,
            node,
            len(msgs),
            self.handed_back_at_leave,
        )

    async def _pulled_by_others(self, psub: Any, info: Any) -> str | None:
        """Whether someone pulls the consumer ``info`` (read as the takeover subscribed
        through ``psub``) describes: what says so (None: no one). A pull request waiting
        on it says so at once; with none, its info is read again
        ``_PULLER_ACTIVITY_WAIT`` later, and a consumer whose deliveries, acknowledgements
        or pull requests moved meanwhile is pulled (a puller busy delivering what it
        fetched has no request waiting, and a node's pull loop fetches again, or acks,
        within that); one no one pulls stands still (JetStream delivers, redelivers
        included, only to a pull request)."""
        if info.num_waiting:
            return f"{info.num_waiting} pull requests wait on its consumer"
        await trio.sleep(_PULLER_ACTIVITY_WAIT)
        again = await call_aio(psub.consumer_info)
        if again.num_waiting:
            return f"{again.num_waiting} pull requests wait on its consumer"
        if _activity(again) != _activity(info):
            return (
                f"its consumer delivered or was acked within {_PULLER_ACTIVITY_WAIT:g}s"
                " with no pull request waiting (a puller busy delivering)"
            )
        return None

    def _left_to_pullers(self, node: str, why: str) -> None:
        """A takeover of ``node`` (no member) ended at its start: others pull its
        consumer (``why`` says what shows it). Counted (``left_to_pullers``), logged (at
        most a line a second)."""
        self.left_to_pullers += 1
        self._say(
            self._left_log,
            "takeovers left to the pullers of their consumers",
            logging.INFO,
            "node %s: not taking over the durable messages of node %r: %s (a process of"
            " its name whose join is not heard here yet, or another node's takeover);"
            " looked at again later (%d so far)",
            self.cluster.node,
            node,
            why,
            self.left_to_pullers,
        )

    async def _subscribe_taken(self, node: str) -> tuple[Any, Any]:
        """The pull subscription of lost ``node``'s consumer and its info: its unacked
        slots (``max_ack_pending``, the lost node's settings), those held now
        (``num_ack_pending``), its ``ack_wait`` and when it was made (see
        :class:`_Waiting`). Run on the asyncio loop."""
        psub = await self._subscribe(node)
        try:
            info = await psub.consumer_info()
        except BaseException:
            # (not handed back: its inbox would stay subscribed, fetch requests answered
            # into it)
            with contextlib.suppress(nats.errors.Error, OSError, ValueError):
                await psub.unsubscribe()
            raise
        return psub, info

    def _takeover_fetch_failed(self, node: str, why: str) -> None:
        """A fetch of lost ``node``'s consumer failed (refused, or not answered at all):
        counted in ``takeover_fetch_failures``, logged at once, then at most once a
        second; tried again. (No part of readiness: this node's own fetches say whether
        JetStream answers it.)"""
        self.takeover_fetch_failures += 1
        self._say(
            self._takeover_log,
            "failed fetches of lost nodes' messages",
            logging.WARNING,
            "node %s: could not pull the durable messages of lost node %r: %s (tried again)",
            self.cluster.node,
            node,
            why,
        )

    async def _dropped_when_drained(self, node: str) -> bool:
        """Forgotten ``node``'s consumer deleted if nothing of it is pending or unacked:
        True if it is gone (False if JetStream did not answer: asked again later)."""
        try:
            dropped = await call_aio(self._drop_drained, node)
        except (nats.errors.Error, OSError):
            return False
        if dropped:
            self._waits.pop(node, None)  # (nothing of it waits: made anew if ever again)
        return dropped

    async def _drop_drained(self, node: str) -> bool:
        """asyncio side of :meth:`_dropped_when_drained`. A node with no consumer is
        drained only if nothing is stored on its subject either: a takeover of the node
        before (lost for a moment before its leave) deleted its consumer when drained,
        and what senders stored for it after (their views still had it) waited for
        ``max_age``, uncounted (False then: the takeover makes the consumer, see
        :meth:`_subscribe`, and takes them)."""
        js = self.cluster.data_js
        try:
            info = await js.consumer_info(self._stream, node)
        except nats.js.errors.NotFoundError:
            return not await self._stored_for(node)
        if info.num_pending or info.num_ack_pending or self._still_lost(node) is not None:
            return False  # (or the node back meanwhile: its consumer again)
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_consumer(self._stream, node)
        return True

    async def _stored_for(self, node: str) -> bool:
        """Whether the stream holds a message on ``node``'s subject (asyncio side): its
        first one read (one message, where the stream's info would list every subject
        of the node, one per agent addressed)."""
        subject = wire.durable_subject(self.cluster.prefix, node, "*")
        try:
            await self.cluster.data_js.get_msg(self._stream, seq=1, subject=subject, next=True)
        except nats.js.errors.NotFoundError:
            return False  # none (or no stream: made anew by a node's fetch)
        return True

    def _take(self, node: str, jsmsg: NatsMsg, waiting: _Waiting) -> None:
        """Settle ``jsmsg``, stored for lost ``node`` (see :meth:`take_over`); ``waiting``:
        the messages of that consumer that wait for their names (see :class:`_Waiting`)."""
        waiting.delivered(jsmsg)  # (delivered again)
        try:
            msg = wire.decode_message(jsmsg.data)
        except MessageDecodeError as exc:
            self._terminate_undecodable(jsmsg, exc)
            return
        to = msg.to
        if isinstance(to, uuid.UUID):
            info = self.cluster.members.members.get(node)
            if (
                info is not None
                and info.reachable
                and info.runs_durable
                and info.id_prefix == to.int >> 64
                and jsmsg.metadata.num_delivered < self.options.max_deliver
            ):
                # Heard again, the same process (frozen, or cut off), while this batch was
                # fetched: it pulls its consumer itself again, and its agent may live. The
                # message goes back to it (a nak), as the ones this takeover had not
                # fetched yet do; the node hands it over, or terminates it if that agent
                # is gone. (It was dead here: a message sent once the node was back died.)
                self.given_back += 1
                self._settle(jsmsg, "nak")
                return
            self._dead_with_node(jsmsg, msg.id, dead_by_id(to, node, info))
            return
        where = self._runs_now(jsmsg, to)
        # (one too big with the forward's headers waits as its own node's does: sent, the
        # server closed this node's data connection for good, nothing counted; measured
        # before the fifty-fifth pass, see _too_big_to_forward)
        too_big = where is not None and self._too_big_to_forward(jsmsg, msg.id, to, where[0])
        if where is not None and not too_big:
            subject = wire.durable_subject(self.cluster.prefix, *where)
            self._settle(jsmsg, f"{_TAKEN}{subject}")
        elif jsmsg.metadata.num_delivered >= self.options.max_deliver:
            self._dead_with_node(
                jsmsg,
                msg.id,
                f"its name {to!r} ran where it could not be forwarded, too big with the"
                f" forward's headers, for {self.options.max_deliver} deliveries since node"
                f" {node!r} was lost"
                if too_big
                else f"its name {to!r} ran on no reachable member within"
                f" {self.options.max_deliver} deliveries since node {node!r} was lost",
            )
        elif waiting.room(jsmsg, self.options):
            # re-placed soon, or waiting for a member that runs its type
            self.agent_missing += 1
            self._settle(jsmsg, "wait")
        else:
            # (as on this node's own consumer: the rest of the lost node's messages keep
            # the slots of its consumer beyond the bound, see taken_bound)
            self.wait_full += 1
            self._taken_wait_full += 1
            self._dead_with_node(
                jsmsg,
                msg.id,
                f"its name {to!r} runs on no reachable member, and {waiting.count} messages"
                f" of node {node!r} wait for theirs already (the bound, {waiting.bound}, of"
                " its consumer's unacked slots: more would stall its other messages)",
            )

    def _runs_now(self, jsmsg: NatsMsg, to: Any) -> tuple[str, uuid.UUID] | None:
        """Where the agent named ``to`` runs now: here, or on another reachable member
        (see :meth:`_moved_to`); None if nowhere known."""
        kernel = self.cluster.kernel
        if isinstance(to, str) and _hops(jsmsg) < FORWARD_HOPS and kernel.is_local(to):
            with contextlib.suppress(AgentNotFound):
                return self.cluster.node, kernel.lookup(to).id
        return self._moved_to(jsmsg, to)

    def _dead_with_node(self, jsmsg: NatsMsg, msg_id: uuid.UUID, reason: str) -> None:
        """A lost node's message no delivery can succeed for: terminated, counted dead."""
        self.taken_over += 1
        self._with_node_dead += 1
        self._terminate(
            jsmsg,
            self._lost_log,
            "durable messages of lost nodes terminated",
            "node %s: durable message %s terminated: %s (%d so far)",
            self.cluster.node,
            msg_id,
            reason,
            self._with_node_dead,
        )

    def _terminate(
        self, jsmsg: NatsMsg, throttle: Throttle, what: str, line: str, *args: Any
    ) -> None:
        """Terminate ``jsmsg``, counted dead; ``line`` logged (at most one a second of
        ``what``: the rest said with their count, see ``HeldLines``)."""
        self.dead += 1
        self._say(throttle, what, logging.ERROR, line, *args, counted="durable_dead")
        _keep(self._dead_seqs, jsmsg.metadata.sequence.stream, None)
        self._settle(jsmsg, "term")

    def _say(
        self, throttle: Throttle, what: str, level: int, line: str, *args: Any, counted: str = ""
    ) -> None:
        """Log ``line`` at ``level`` if ``throttle`` lets a line of ``what`` through (at
        most one a second: the rest held, said at the leave, see ``HeldLines``;
        ``counted``: the counter they are in)."""
        if self.cluster.held.due(throttle, what, counted=counted, level=level, logger=log):
            log_guarded(log, level, line, *args)

    # --- sending -------------------------------------------------------------------------------

    def _refusal(self, exc: BaseException) -> tuple[str, bool]:
        """What ``send`` and a forward's lines say of JetStream's refusal ``exc`` of a
        publish beyond its own words, and whether it is a store full (room comes back once
        a message leaves it: a forward's copy refused so waits the growing delay of a
        missing agent's message). From the error's code and description (measured on
        nats-server 2.15): code 10077 with a limit's description (one code for each limit
        of the stream with discard new): the node's own bound, or one an operator set (a
        node sets neither max_bytes nor a limit a subject); 10023, the server's JetStream
        storage; 10002 saying so, the account's JetStream limits. Code 10077 is also
        nats-server's for any other failure of the stream's store (a store closed, a disk
        error): said as that, not as a full stream, and tried again after
        ``redelivery_delay`` (until the fifty-sixth pass it was said "full: a limit of the
        stream" and waited the growing delay)."""
        if not isinstance(exc, nats.js.errors.APIError):
            return "", False
        description = exc.description or "not said"
        if exc.err_code == _SERVER_FULL:
            return f" (full: the server's JetStream storage: {description})", True
        if exc.err_code == _ACCOUNT_LIMITS and description == _ACCOUNT_FULL_SAID:
            return f" (full: the account's JetStream limits: {description})", True
        if exc.err_code != _STORE_FAILED:
            return "", False
        limit = STORE_LIMITS_SAID.get(description)
        if limit is None:
            return f" (the stream's store failed: {description}; no limit of it said)", False
        if limit == "max_msgs":
            return (
                f" (full: the stream's max_messages, {self.options.max_messages} if this"
                " node made it)"
            ), True
        return f" (full: the stream's {limit}, set by an operator: a node sets none)", True

    async def send(
        self,
        to: Any,
        payload: Any = None,
        *,
        sender: uuid.UUID = SYSTEM_ID,
        msg_id: uuid.UUID | None = None,
        timeout: float | None = None,
    ) -> Message:
        """Store a message for ``to`` in JetStream; return it once JetStream has it.

        ``to`` is an agent id, name or AgentRef anywhere in the cluster (this node
        included). From then on it is delivered at least once (see the module doc).
        Passing the same ``msg_id`` again within ``duplicate_window`` stores nothing new.
        Raises ``TypeError`` for what is no address, ``ValueError`` for a type address
        (``type_address``: a durable message goes to one agent), :class:`AgentNotFound`
        for an address no node has,
        :class:`TransportUnavailable` when JetStream has not confirmed storing it within
        ``timeout`` seconds (default: the kernel's send deadline), e.g. during a server
        failover. It may still have been stored then: pass your own ``msg_id`` and send
        again with it to retry without a duplicate (the error text names the id too).
        Once this node's connection closed (its leave, a caller outside its block) it is
        :class:`TransportUnavailable` naming the node. A ``timeout`` that is no number of
        seconds > 0 raises ``TypeError`` or ``ValueError`` naming it, as
        ``kernel.request``'s does; a ``sender`` that is no UUID a ``TypeError`` naming it
        (until the fifty-eighth pass an ``AttributeError``). A ``msg_id`` that is no UUID (nor
        its 128-bit value, as a :class:`Message` takes one) raises ``TypeError`` naming it
        (until the fifty-eighth pass an ``AttributeError`` naming nothing, and 0 was
        replaced by a fresh id).
        A payload the wire cannot carry raises ``TypeError`` (not JSON) or ``ValueError``
        (a lone surrogate, nested too deeply) naming the message, its recipient and the
        problem, as a send to another node does; nothing is stored.
        """
        if not self.options.enabled:
            raise TransportUnavailable("durable delivery is disabled on this node")
        deadline = (
            self.cluster.kernel.config.kernel.send_timeout
            if timeout is None
            else checked_seconds(timeout, "send_durable's timeout")
        )
        msg_id = new_id() if msg_id is None else _msg_id(msg_id)
        if not isinstance(sender, uuid.UUID):
            hint = (
                " (an AgentRef's .id is one)"
                if isinstance(sender, AgentRef)
                else " (uuid.UUID(text) reads a UUID's text)"
                if isinstance(sender, str)
                else ""
            )
            raise TypeError(
                "send_durable's sender must be a uuid.UUID (an agent's id; by default the"
                f" system's), got {type(sender).__name__} {brief(sender, 60)}{hint}"
            )
        with trio.move_on_after(deadline) as scope:
            return await self._send(to, payload, sender, msg_id)
        assert scope.cancelled_caught
        raise TransportUnavailable(
            f"JetStream did not confirm durable message {msg_id} within {deadline:g}s"
            " (NATS down or failing over?); it may or may not be stored: resend it with"
            " the same msg_id to be sure without a duplicate"
        )

    async def _send(self, to: Any, payload: Any, sender: uuid.UUID, msg_id: uuid.UUID) -> Message:
        from .._agent import address_of

        cluster = self.cluster
        address = address_of(to)
        if not isinstance(address, (uuid.UUID, str)):
            raise TypeError(
                "an agent address is an AgentRef, an agent id (uuid.UUID) or a name (str),"
                f" got {type(address).__name__} {brief(address, 60)}"
            )
        if isinstance(address, str) and address.startswith(wire.TYPE_PREFIX):
            raise ValueError(
                f"send_durable cannot go to {address}, an agent type: a durable message is"
                " stored for one agent's node; send it to an agent's name or id"
            )
        if cluster.kernel.is_local(address):
            node = cluster.node
            agent_id = (
                address if isinstance(address, uuid.UUID) else cluster.kernel.lookup(address).id
            )
        else:
            try:
                node, agent_id = cluster.resolve(address)
            except AgentNotFound:
                if not isinstance(address, str):
                    raise
                node, agent_id = await cluster.wait_for_name(address, timeout=0.5)
            info = cluster.members.members.get(node)
            if info is not None and not info.runs_durable:
                # stored on its subject, it would be pulled by no one (see _moved_to)
                raise TransportUnavailable(
                    f"durable message {msg_id} to {brief(address, 60)} not stored: its agent"
                    f" runs on node {node!r}, whose durable path is off"
                    " (DurableOptions(enabled=False) there): no node would pull it"
                )
        msg = Message(sender=sender, to=address, payload=payload, id=msg_id)
        subject = wire.durable_subject(cluster.prefix, node, agent_id)
        try:
            data = wire.encode_message(msg)
        except wire.UNENCODABLE as exc:
            # the caller's error, as for a send to another node (see Router.send)
            failure = wire.unencodable_failure(f"message {msg.id} to {msg.to}", exc)
            raise unsendable(failure) from exc
        headers = {wire.MSG_ID_HEADER: str(msg.id)}
        size = len(data) + wire.header_bytes(headers)
        limit = cluster.max_payload()
        if size > limit:
            # nats-py checks the body alone: a body that fits with a header that does not
            # made the server close the node's data connection (Maximum Payload Violation)
            raise TransportUnavailable(
                f"durable message {msg.id} to {msg.to} is {size} bytes encoded (its"
                f" {wire.MSG_ID_HEADER} header included): more than NATS accepts in one"
                f" message (max_payload {limit} bytes); nothing was stored"
            )
        closed_before = cluster.nc.is_closed
        try:
            ack = await call_aio(cluster.data_js.publish, subject, data, headers=headers)
        except nats.errors.ConnectionClosedError as exc:
            # (this node left the cluster, a caller outside its block sending on, or nats-py
            # gave up reconnecting: name the node, as a placement or a lookup does)
            raise TransportUnavailable(
                f"node {cluster.node!r}'s connection is closed"
                + (" (it left the cluster)" if cluster.closing else "")
                + f": durable message {msg.id} to {brief(msg.to, 60)} "
                + (
                    "not stored"
                    if closed_before
                    else "may or may not be stored (the close cut its publish): resend it"
                    " with the same msg_id from a node in the cluster to be sure without a"
                    " duplicate"
                )
                + f" ({exc!r})"
            ) from exc
        except nats.js.errors.NoStreamResponseError as exc:
            # nothing took the subject: the stream was deleted, or lost with JetStream's
            # store (a node's pull makes it anew)
            raise TransportUnavailable(
                f"JetStream did not store durable message {msg.id}: no JetStream stream"
                f" stored it (stream {self._stream!r} missing, deleted?) on subject"
                f" {subject}; nothing was stored"
            ) from exc
        except nats.js.errors.APIError as exc:
            # (its repr says only its class: ServiceUnavailableError())
            said = self._refusal(exc)[0]
            raise TransportUnavailable(
                redact(
                    f"JetStream did not store durable message {msg.id}: stream"
                    f" {self._stream!r} refused it on subject {subject}: {exc}{said};"
                    " nothing was stored"
                )
            ) from exc
        except (nats.errors.Error, OSError) as exc:
            raise TransportUnavailable(
                redact(f"JetStream did not store durable message {msg.id}: {exc!r}")
            ) from exc
        if ack.duplicate:
            log_guarded(
                log, logging.DEBUG, "durable message %s was already stored (duplicate id)", msg.id
            )
        return msg

    # --- receiving -----------------------------------------------------------------------------

    async def _pull(self) -> None:
        try:
            with self._pulling:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._keep_held)
                    await self._pull_loop()
                    nursery.cancel_scope.cancel()
        finally:
            self._pull_ended.set()

    async def _keep_held(self) -> None:
        """Every ``ack_wait / 2``, tell JetStream the messages held here are in progress
        (``+WPI`` resets their ack_wait): they wait for room, not for a dead node. At most
        ``max_in_flight`` of them a time, each held at most the send deadline per message
        ahead of it."""
        interval = self.options.ack_wait / 2
        held = self._held
        while True:
            await trio.sleep(interval)
            if held:
                self._tick = trio.current_time()
                for jsmsg in held:
                    self._ops.put((jsmsg, "progress"))

    def _give_back_held(self) -> None:
        """Leaving: what was fetched and not handed over goes back to JetStream."""
        held = self._held
        while held:
            self._give_back(held.popleft())

    def _give_back(self, jsmsg: NatsMsg) -> None:
        """Nak a message fetched and not taken, unless the leave abandoned the pull (it
        counted what the pull held then: JetStream delivers it again after ack_wait)."""
        if not self._abandoned:
            self._settle(jsmsg, "nak")

    def _settle(self, jsmsg: NatsMsg, op: str) -> None:
        """Queue an ack, nak or term of ``jsmsg``; counted unsettled once the leave closed
        the queue (JetStream delivers the message again)."""
        if self._ops.put((jsmsg, op)):
            self._settles_queued += 1
        else:
            self.unsettled_at_leave += 1

    async def _pull_loop(self) -> None:
        kernel = self.cluster.kernel
        while True:
            if kernel.stopping:
                # The kernel's run is over: it refuses every message, and each one pulled
                # now would use up a delivery. They wait in JetStream for the next join.
                await self._drop_pull_requests()
                return
            self._expire()
            room = self.options.max_in_flight - len(self._in_flight)
            if room <= 0:
                self._room = trio.Event()
                with trio.move_on_at(next(iter(self._in_flight.values()))[1]):
                    await self._room.wait()
                continue
            asked = trio.current_time()
            try:
                msgs, heard = await self._fetch_bounded(
                    self._hand_back_cancelled, self._psub, self._fetch, room
                )
            except (nats.errors.Error, OSError) as exc:
                if self.cluster.closing:
                    return
                self._fetch_failed(asked, repr(exc))
                await trio.sleep(self.cluster.options.reconnect_wait)
                if isinstance(exc, nats.js.errors.Error):
                    await self._set_up_again()
                continue
            if heard is False:
                if self.cluster.closing:
                    return
                # nothing came back at all, no message, no status, no heartbeat: the
                # consumer did not answer (a stream with no leader, a server hung behind a
                # connection that is up): JetStream unavailable as a refused fetch is
                self._fetch_failed(asked, "no answer from JetStream within the fetch's wait")
                continue
            if heard:
                self.fetch_failing_since = None
            held = self._held
            held.extend(msgs)
            fetched = trio.current_time()
            while held:
                if kernel.stopping:
                    self._give_back_held()
                    await self._drop_pull_requests()
                    return
                try:
                    await self._deliver(held[0], fetched)
                except trio.Cancelled:
                    # leaving: _deliver settled the first; the rest go back to JetStream
                    held.popleft()
                    self._give_back_held()
                    raise
                held.popleft()

    async def _fetch_bounded(
        self,
        orphans: Callable[[list[NatsMsg]], None],
        psub: Any,
        fetch: Callable[..., Coroutine[Any, Any, tuple[list[NatsMsg], bool | None]]],
        *args: Any,
    ) -> tuple[list[NatsMsg], bool | None]:
        """:meth:`_fetch_shielded` from the Trio side, a cancel's wait for it bounded
        (``_PULL_CANCEL_WAIT``, see :func:`call_aio_bounded`): what the fetch took goes to
        ``orphans`` (nakked back) wherever a cancel lands, also after the fetch returned
        and before its result reached this task (before the forty-ninth pass the result
        was dropped there: each message waited out ``ack_wait``)."""

        def dropped(got: tuple[list[NatsMsg], bool | None]) -> None:
            if got[0]:
                orphans(got[0])

        return await call_aio_bounded(
            _PULL_CANCEL_WAIT,
            self._fetch_shielded,
            orphans,
            psub,
            fetch,
            *args,
            dropped=dropped,
        )

    async def _fetch_shielded(
        self,
        orphans: Callable[[list[NatsMsg]], None],
        psub: Any,
        fetch: Callable[..., Coroutine[Any, Any, tuple[list[NatsMsg], bool | None]]],
        *args: Any,
    ) -> tuple[list[NatsMsg], bool | None]:
        """``fetch(*args)`` (a fetch of a durable consumer: see :func:`_poll`), shielded
        from a cancel: cancelled (the leave's stop), this returns at once, the fetch is
        ended (see :func:`end_fetch`: nats-py's fetch keeps what it took so far to
        itself, and a cancel dropped it: those messages waited out ``ack_wait`` in
        JetStream) and what it took goes to ``orphans`` as it returns (nakked back),
        kept until then in ``_fetches_ending`` (the stop cancels one that does not end
        within its bound). ``psub``: the pull subscription the fetch reads. Asyncio
        side."""
        task = asyncio.ensure_future(fetch(*args))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            self._fetches_ending.add(task)
            task.add_done_callback(functools.partial(self._cancelled_fetch_ended, orphans))
            # (with a nats-py not shaped as expected, it ends at the end of its long poll)
            end_fetch(psub)
            raise

    def _cancelled_fetch_ended(
        self, orphans: Callable[[list[NatsMsg]], None], task: asyncio.Future[Any]
    ) -> None:
        """A fetch cancelled under way returned (see :meth:`_fetch_shielded`): what it
        took to ``orphans`` (nothing if it failed: what it took, if anything, waits out
        ``ack_wait`` as before)."""
        self._fetches_ending.discard(task)
        took = [] if task.cancelled() or task.exception() else fetched(task.result()[0])
        if took:
            orphans(took)
        if not self._fetches_ending:
            ended, self._fetches_ended = self._fetches_ended, trio.Event()
            ended.set()

    def _hand_back_cancelled(
        self, msgs: list[NatsMsg], how: str = "its durable fetch under way was cancelled"
    ) -> None:
        """This node's own fetch was cancelled under way (the leave's stop) and took
        ``msgs`` (or, ``how`` says, its pull request did after the fetch ended): each
        nakked back to its consumer, counted in ``handed_back_at_leave`` once sent (in
        ``unsettled_at_leave`` if the leave does not send it), so a survivor's takeover,
        or the node's next process, gets it at once. Logged."""
        for jsmsg in msgs:
            self._settle(jsmsg, _HAND_BACK)
        log_guarded(
            log,
            logging.INFO,
            "node %s: leaving, %s; the %d messages it took are nakked back to its consumer",
            self.cluster.node,
            how,
            len(msgs),
        )

    async def _fetch(self, batch: int) -> tuple[list[NatsMsg], bool | None]:
        """asyncio side of a fetch of this node's own consumer (see :func:`_poll`)."""
        idle, self._idle = self._idle, True
        got, heard = await _poll(self._psub, batch, idle)
        self._idle = not got
        return got, heard

    def _fetch_failed(self, asked: float, why: str) -> None:
        """A fetch of this node's own consumer, asked at ``asked``, failed (refused, or not
        answered at all): counted in ``fetch_failures``; JetStream unavailable (the node's
        readiness) from the first of those in a row until a fetch works. Logged at once,
        then at most once a second."""
        self.fetch_failures += 1
        if self.fetch_failing_since is None:
            self.fetch_failing_since = asked
        self._say(
            self._fetch_log,
            "durable fetches failed",
            logging.WARNING,
            "node %s: durable fetch failed: %s (%d failed so far)",
            self.cluster.node,
            why,
            self.fetch_failures,
        )

    async def _drop_pull_requests(self) -> None:
        """The kernel's run is over: unsubscribe the inbox the pull's requests answer to.

        A fetch's request can reach the server after the fetch timed out here (its timer
        starts first; a loaded machine delays the request), and the server then holds it
        for the fetch's whole wait: the next durable message went to it, a delivery
        nobody handled, that waited out ack_wait and used up one of max_deliver. The
        server drops a request whose inbox has no subscriber instead.

        Unsubscribed the server first, shielded and bounded, as the leave's
        :meth:`_end_pull_requests` (see :func:`_unsubscribe_pull`): what a request
        still on the server delivered until the server had the ``UNSUB`` is in the
        subscription's queue then, nakked back (``handed_back_at_leave``; the node's
        next process, or a survivor's takeover, gets it at once). Before the fiftieth
        pass nats-py's unsubscribe forgot the subscription before the ``UNSUB`` was
        written, dropping such a message: it waited out ``ack_wait``, a delivery used
        up, counted nowhere."""
        psub, self._pull_dropped = self._psub, True
        await _unsubscribe_pull(psub, trio.current_time() + _PULL_CANCEL_WAIT)
        if took := take_queued(psub):
            self._hand_back_cancelled(
                took, "its kernel's run ended while its pull's request was on the server"
            )

    def _terminate_undecodable(self, jsmsg: NatsMsg, exc: MessageDecodeError) -> None:
        """A body no kernel wrote (a hostile or broken publisher): terminated, counted."""
        self._undecodable += 1
        self._terminate(
            jsmsg,
            self._undecodable_log,
            "undecodable durable messages terminated",
            "node %s: undecodable durable message, terminated: %s (%d so far)",
            self.cluster.node,
            exc,
            self._undecodable,
        )

    async def _deliver(self, jsmsg: NatsMsg, fetched: float) -> None:
        kernel = self.cluster.kernel
        try:
            msg = wire.decode_message(jsmsg.data)
        except MessageDecodeError as exc:
            self._terminate_undecodable(jsmsg, exc)
            return
        self._waiting.delivered(jsmsg)  # (delivered again)
        if msg.id in self._done:
            self.duplicates += 1
            self._settle(jsmsg, "ack")
            return
        if jsmsg.metadata.num_delivered > 1:
            self.redelivered += 1
        query = msg.evolve(kind=MessageKind.QUERY)
        if kernel.is_local(msg.sender):
            # Its answer acks it: it must reach the transport, not the sender here, which
            # the handler still sees as ``ctx.message.sender`` (a tell to it reaches it)
            handle = self.cluster.handle
            if handle is not None:
                handle.answer_through_transport(msg.id)
        earlier = self._in_flight.pop(msg.id, None)  # an earlier delivery: this one is newer
        # a late one is replaced too: an answer of it acks through this one (see
        # completed), and kept it would stay (with its payload) once the message is dead
        if earlier is not None or self._late.pop(msg.id, None) is not None:
            # that one's handler may answer too: its answer is a duplicate, not a message
            _keep(self._answers_due, msg.id, self._answers_due.pop(msg.id, 0) + 1)
        # JetStream's ack_wait for this delivery runs from its fetch (or from the last
        # in-progress report: see below)
        self._in_flight[msg.id] = (jsmsg, fetched + self.options.ack_wait, query)
        try:
            await kernel.deliver_from_remote(query)
        except AgentNotFound as exc:
            gone = self._gone_for_good(query.to)
            if gone is None and self._forward(jsmsg, query):
                return
            # a name: its agent may be spawned yet (a pool restarted by hand, a node
            # starting): redelivered after a delay that grows, not burnt in a few
            # redelivery_delays
            self.failed(query, "AgentNotFound", exc, gone=gone, missing=gone is None)
            return
        except (MailboxFull, KernelShuttingDown) as exc:
            self.failed(query, type(exc).__name__, exc)
            return
        except trio.Cancelled:
            # not taken (leaving while it waited for room): not a failed delivery
            if self._in_flight.pop(msg.id, None) is not None:
                self._give_back(jsmsg)
            raise
        if fetched < self._tick:
            # held here across a keep-alive (it waited for room): the agent gets a whole
            # ack_wait from now, here and in JetStream (unless it answered already)
            entry = self._in_flight.get(msg.id)
            if entry is not None and entry[0] is jsmsg:
                deadline = trio.current_time() + self.options.ack_wait
                self._in_flight[msg.id] = (jsmsg, deadline, query)
                self._ops.put((jsmsg, "progress"))

    def _moved_to(self, jsmsg: NatsMsg, to: Any) -> tuple[str, uuid.UUID] | None:
        """Where the agent named ``to``, which no agent of this node has, runs now: the
        node and agent id the names bucket gives it, if that is another reachable
        member's current process (re-placed after a loss, rebalanced, spawned again
        elsewhere); None if it runs nowhere known (its message waits here, see
        :meth:`failed`) or the message was forwarded :data:`FORWARD_HOPS` times already
        (two nodes whose views of the name disagree pass it on no further)."""
        if not isinstance(to, str) or _hops(jsmsg) >= FORWARD_HOPS:
            return None
        cluster = self.cluster
        try:
            node, agent_id = cluster.resolve(to)
        except (AgentNotFound, TransportUnavailable):
            return None
        info = cluster.members.members.get(node)
        if info is None or info.id_prefix != agent_id.int >> 64:
            return None  # an id of an earlier process of that node: gone with it
        if not info.runs_durable:
            # stored there, no one would pull it (an Akka shard is not allocated to a
            # node without the shard role): it waits here for its name to run on a
            # member that runs the durable path, dead after max_deliver, counted
            self.not_forwarded += 1
            if cluster.held.due(
                self._unpulled_log, "durable messages not forwarded to nodes without the path"
            ):
                log_guarded(
                    log,
                    logging.WARNING,
                    "node %s: durable message for %r not forwarded to node %s, where its"
                    " agent runs: that node's durable path is off (its record says so),"
                    " nothing would pull it there; it waits here",
                    cluster.node,
                    to,
                    node,
                )
            return None
        return node, agent_id

    def _forward(self, jsmsg: NatsMsg, query: Message) -> bool:
        """The agent named ``query.to`` runs on another node now: store the message for
        that node (its consumer delivers it) and ack it here once JetStream has the copy,
        as Akka's cluster sharding hands a message for a shard that moved to its new
        region. False (nothing done) if it runs nowhere known, or this delivery is not
        the one out (see :meth:`failed`)."""
        moved = self._moved_to(jsmsg, query.to)
        entry = self._in_flight.get(query.id)
        if moved is None or entry is None or entry[0] is not jsmsg:
            return False
        if self._too_big_to_forward(jsmsg, query.id, query.to, moved[0]):
            return False
        del self._in_flight[query.id]
        self._room.set()
        node, agent_id = moved
        subject = wire.durable_subject(self.cluster.prefix, node, agent_id)
        self._settle(jsmsg, f"{_FORWARD}{subject}")
        return True

    def _too_big_to_forward(self, jsmsg: NatsMsg, msg_id: uuid.UUID, to: Any, node: str) -> bool:
        """Whether ``jsmsg``'s forward to ``node`` (where ``to`` runs) would be too big:
        its forward's headers (a longer ``Nats-Msg-Id``, ``Nexus-Forwards``) put a message
        that fit in ``max_payload`` with its own header past it. Sent, the server closes
        this node's data connection (Maximum Payload Violation), which nats-py then
        closes for good; such a message waits where it is instead (dead after
        ``max_deliver``, counted), counted in ``too_big`` and logged here. Both forwards
        ask: this node's own consumer's (:meth:`_forward`) and a takeover's
        (:meth:`_take`; before the fifty-fifth pass it did not, measured: a lost node's
        such message closed its taker's data connection, its durable path failed every
        fetch after, nothing counted)."""
        size = len(jsmsg.data) + wire.header_bytes(_forward_headers(jsmsg))
        limit = self.cluster.max_payload()
        if size <= limit:
            return False
        self._too_big += 1
        self._say(
            self._too_big_log,
            "durable messages too big to forward",
            logging.WARNING,
            "node %s: durable message %s for %r not forwarded to node %s, where its"
            " agent runs: %d bytes with the forward's headers, more than NATS takes"
            " in one message (max_payload %d bytes); it waits here (%d so far)",
            self.cluster.node,
            msg_id,
            to,
            node,
            size,
            limit,
            self._too_big,
        )
        return True

    def _gone_for_good(self, to: Any) -> str | None:
        """Why no delivery of a message for ``to``, which no local agent has, can ever
        succeed: an agent id is never used again (a name is: None)."""
        if not isinstance(to, uuid.UUID):
            return None
        cluster = self.cluster
        prefix = to.int >> 64
        if prefix != cluster.id_prefix:
            return (
                f"agent {to} is gone with an earlier incarnation of node {cluster.node!r}"
                f" (its ids begin {prefix:016x}, this one's {cluster.id_prefix:016x}):"
                " no agent can have that id again"
            )
        return (
            f"agent {to} is gone: no agent of node {cluster.node!r} has that id any more"
            " (it stopped; an agent id is never used again)"
        )

    def _expire(self) -> None:
        """Give up waiting for the answers not come within ``ack_wait`` (the handler
        returned None, or is still running): JetStream delivers such a message again, so
        its slot is free; on its last delivery it is dead (JetStream delivers it no
        more), counted and logged here."""
        now = trio.current_time()
        while self._in_flight:
            msg_id, (jsmsg, deadline, query) = next(iter(self._in_flight.items()))
            if deadline > now:
                return
            del self._in_flight[msg_id]
            delivered = jsmsg.metadata.num_delivered
            if delivered >= self.options.max_deliver:
                self._unanswered_dead += 1
                self._terminate(
                    jsmsg,
                    self._unanswered_dead_log,
                    "durable messages dead after max_deliver deliveries unanswered within ack_wait",
                    "node %s: durable message %s dead after %d deliveries (last: no reply"
                    " within ack_wait %gs) (%d so far)",
                    self.cluster.node,
                    msg_id,
                    delivered,
                    self.options.ack_wait,
                    self._unanswered_dead,
                )
            else:
                self._late.pop(msg_id, None)  # an older delivery's: this one is newer
                _keep(self._late, msg_id, (jsmsg, query))

    def completed(self, msg_id: uuid.UUID) -> bool:
        """The handler answered durable message ``msg_id``: ack it. False if not durable."""
        entry = self._in_flight.pop(msg_id, None)
        late = self._late.pop(msg_id, None)
        # JetStream acks the message, whichever delivery answered: the newest one
        if entry is not None:
            jsmsg = entry[0]
        elif late is not None:
            jsmsg = late[0]
        elif msg_id in self._dead_answers:
            del self._dead_answers[msg_id]
            # (counted dead already: its consumer gave it up, the message deleted, while
            # this handler ran past ack_wait; see _forget_delivery)
            log_guarded(
                log,
                logging.INFO,
                "durable message %s answered after its consumer gave it up (counted dead,"
                " deleted): the answer is dropped",
                msg_id,
            )
            return True
        elif msg_id in self._answers_due or msg_id in self._done:
            # a redelivery handed over before the first answer acked it: answered twice,
            # the second answer goes nowhere (its sender asked for none)
            due = self._answers_due.pop(msg_id, 0)
            if due > 1:
                self._answers_due[msg_id] = due - 1
            self.duplicates += 1
            log_guarded(
                log, logging.DEBUG, "durable message %s answered again, dropped (duplicate)", msg_id
            )
            return True
        else:
            return False
        _keep(self._done, msg_id, None)
        self.acked += 1
        self._settle(jsmsg, "ack")
        self._room.set()
        return True

    def failed(
        self,
        query: Message,
        reason: str,
        error: BaseException | None,
        *,
        gone: str | None = None,
        missing: bool = False,
    ) -> None:
        """The delivery of a durable message that its agent got as ``query`` was not
        handled: nak it, or give up after max_deliver (at once if ``gone`` says why no
        delivery can succeed). ``missing``: no agent has its name here (yet): the nak
        asks for a delay that grows with each delivery (:func:`missing_agent_delay`).

        Only when it is the newest delivery, still within its ack_wait, and the node holds
        no newer one: JetStream naks the message, not one delivery of it, so a nak sent
        once it has been delivered again would deliver it once more. The failure of an
        earlier delivery (its handler ran past ack_wait) leaves the newer ones alone."""
        msg_id = query.id
        due = self._answers_due.pop(msg_id, 0)
        if due > 1:  # one delivery fewer that may answer
            self._answers_due[msg_id] = due - 1
        entry = self._in_flight.get(msg_id)
        # The Query handed over names its delivery; a copy of it passed on (a pool's
        # router hands its worker one, same id) is of the one out when no earlier
        # delivery handed over may still answer or fail (due 0)
        if entry is None or (entry[2] is not query and due):
            late = self._late.get(msg_id)
            if late is not None and (late[1] is query or not due):
                del self._late[msg_id]  # past its ack_wait: JetStream delivers it again
            elif msg_id in self._in_flight or late is not None:
                log_guarded(
                    log,
                    logging.DEBUG,
                    "durable message %s: an earlier delivery failed (%s), a newer one is out",
                    msg_id,
                    reason,
                )
            return
        del self._in_flight[msg_id]
        self._room.set()
        jsmsg = entry[0]
        delivered = jsmsg.metadata.num_delivered
        if gone is not None:
            self._gone += 1
            self._terminate(
                jsmsg,
                self._gone_log,
                "durable messages terminated",
                "node %s: durable message %s terminated at delivery %d: %s (%d so far)",
                self.cluster.node,
                msg_id,
                delivered,
                gone,
                self._gone,
            )
        elif delivered >= self.options.max_deliver and missing:
            # (no handler ran: its name had no agent here, nor one it could be forwarded
            # to; until the fifty-sixth pass counted under failed, the handler's failure)
            self._missing_dead += 1
            self._terminate(
                jsmsg,
                self._missing_dead_log,
                "durable messages dead after max_deliver deliveries to a missing name",
                "node %s: durable message %s dead after %d deliveries (last: %s%s): no agent"
                " had its name %r here (%d so far)",
                self.cluster.node,
                msg_id,
                delivered,
                reason,
                _ErrorSaid(error),
                query.to,
                self._missing_dead,
            )
        elif delivered >= self.options.max_deliver:
            self._failed_dead += 1
            self._terminate(
                jsmsg,
                self._failed_dead_log,
                "durable messages dead after max_deliver failed deliveries",
                "node %s: durable message %s dead after %d deliveries (last: %s%s) (%d so far)",
                self.cluster.node,
                msg_id,
                delivered,
                reason,
                # (the handler's error is user code: its repr may raise, and this runs in
                # the task that follows the dead letters, whose end would end the node;
                # made only for a line the throttle lets through)
                _ErrorSaid(error),
                self._failed_dead,
            )
        elif entry[1] > trio.current_time() and not self._newer_held(jsmsg):
            if not missing:
                self._settle(jsmsg, "nak")
            elif self._waiting.room(jsmsg, self.options):
                self.agent_missing += 1
                self._settle(jsmsg, "wait")
            else:
                self.wait_full += 1
                self._terminate(
                    jsmsg,
                    self._wait_full_log,
                    "durable messages terminated: too many waiting for their agents",
                    "node %s: durable message %s for %r terminated at delivery %d: no agent"
                    " has its name here, and %d messages wait for theirs already (the bound,"
                    " DurableOptions.max_waiting) (%d so far)",
                    self.cluster.node,
                    msg_id,
                    query.to,
                    delivered,
                    self._waiting.count,
                    self.wait_full,
                )
        # else JetStream has delivered it again already, or its ack_wait is over: it will

    def given_up(self, msg_id: uuid.UUID, error: BaseException) -> None:
        """The agent that took durable message ``msg_id`` over (its handler returned, the
        answer to come in a message of its own: a pool's ``$resize``) cannot answer it
        (``Kernel.fail_query``): the delivery failed, as if its handler had raised, so it
        is nakked at once (or dead past ``max_deliver``) rather than left to wait out its
        ``ack_wait``. Nothing is done while an earlier delivery may still answer or fail:
        which delivery gave up is not known then (see :meth:`failed`)."""
        if self._answers_due.get(msg_id):
            return
        entry = self._in_flight.get(msg_id)
        late = self._late.get(msg_id)
        query = entry[2] if entry is not None else late[1] if late is not None else None
        if query is None:
            return  # not a durable message, or settled already
        reason = getattr(error, "reason", None)
        self.failed(
            query,
            reason if isinstance(reason, str) else type(error).__name__,
            getattr(error, "error", None),
        )

    def _newer_held(self, jsmsg: NatsMsg) -> bool:
        """The node has fetched another delivery of ``jsmsg``'s message and holds it (at
        most max_in_flight to look at, on a failure only)."""
        seq = jsmsg.metadata.sequence.stream
        return any(m is not jsmsg and m.metadata.sequence.stream == seq for m in self._held)

    async def _send_ops(self, batch: list[tuple[NatsMsg, str]]) -> None:
        delay = self.options.redelivery_delay
        for jsmsg, op in batch:
            if self._of_old_stream(jsmsg):
                # a delivery of the stream before it was made anew: settled nowhere (a
                # forward's copy is stored all the same, only its ack is not sent)
                if op != "progress":
                    self.stale_settles += 1
                    self._settles_sent += 1
                    if op.startswith((_FORWARD, _TAKEN)):
                        taken = op.startswith(_TAKEN)
                        subject = op[len(_TAKEN if taken else _FORWARD) :]
                        await self._send_forward(jsmsg, subject, taken=taken, stale=True)
                continue
            try:
                if op == "ack":
                    await jsmsg.ack()
                elif op in ("nak", _HAND_BACK, _REMADE_BACK):
                    await jsmsg.nak(delay=delay)
                elif op == "wait":  # its agent missing: a delay that grows a delivery
                    await jsmsg.nak(
                        delay=missing_agent_delay(self.options, jsmsg.metadata.num_delivered)
                    )
                elif op == "progress":
                    if not jsmsg.is_acked:  # (nats-py sends +WPI even after an ack)
                        await jsmsg.in_progress()
                elif op.startswith(_FORWARD):
                    await self._send_forward(jsmsg, op[len(_FORWARD) :])
                elif op.startswith(_TAKEN):
                    await self._send_forward(jsmsg, op[len(_TAKEN) :], taken=True)
                else:
                    await jsmsg.term()
            except nats.errors.MsgAlreadyAckdError:
                pass
            if op != "progress":
                self._settles_sent += 1
                if op == _HAND_BACK:
                    self.handed_back_at_leave += 1
                    self._handed_back.add(jsmsg.reply)
                elif op == _REMADE_BACK:
                    self.handed_back_at_remake += 1
                    self._remade_back[jsmsg.reply] = None
                    if len(self._remade_back) > max_ack_pending(self.options):
                        self._remade_back.popitem(last=False)

    async def _max_deliveries(self, advisory: NatsMsg) -> None:
        """asyncio side: JetStream's advisory that a consumer delivers a message no more
        (``MAX_DELIVERIES``, sent as it would deliver it again: at the nak, or the
        ``ack_wait``, of its last delivery), heard for this node's consumer and for those
        of the lost nodes it takes over (its subject names the consumer; others' are left
        to their nodes and takers). One whose deliveries are under this node's
        ``max_deliver`` was given up before the node said it was dead: an
        operator lowered the consumer's (``nats consumer edit``: the node puts its own
        back only when it binds the consumer), and the node nakked a delivery it took for
        one of more. Such a message would stay in the stream for good, delivered no more,
        counted nowhere (measured before the fifty-second pass's fix: ``max_deliver`` 2
        under the node's 4, a handler that always failed, handled twice, the stream kept
        it). It is deleted from the stream and counted dead (``consumer_max_deliver``),
        logged: see :meth:`_delete_given_up`. One at the node's own ``max_deliver`` or past
        it is the node's to count (its last delivery failed, went unanswered, and so on).
        One sent while no process heard it is found at the consumer's next bind (see
        :meth:`_stranded`)."""
        consumer = advisory.subject.rpartition(".")[2]
        if consumer != self.cluster.node and consumer not in self._takeovers:
            return
        try:
            said = json.loads(advisory.data)
            seq, deliveries = said["stream_seq"], said["deliveries"]
            if type(seq) is not int or type(deliveries) is not int:
                raise TypeError(f"stream_seq {seq!r}, deliveries {deliveries!r}")
            if not 0 < seq < _SEQ_END:
                raise ValueError(f"stream_seq {seq} is no stream sequence")
            sent = _advisory_time(said.get("timestamp"))
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            # (RecursionError: JSON nested deeper than the interpreter's recursion limit;
            # a stream_seq out of a sequence's range would only make JetStream refuse the
            # read, logged as a message that stays in the stream)
            self._say(
                self._advisory_log,
                "garbled max deliveries advisories",
                logging.WARNING,
                "node %s: a JetStream advisory on %s is garbled (%r), left alone: %s",
                self.cluster.node,
                advisory.subject,
                exc,
                brief(advisory.data, 200),
            )
            return
        if deliveries >= self.options.max_deliver:
            return
        await self._delete_given_up(
            seq,
            consumer,
            f"after {deliveries} deliveries",
            f"its max_deliver was lowered under this node's {self.options.max_deliver}: by"
            " an operator? change DurableOptions.max_deliver instead",
            sent=sent,
        )

    async def _delete_given_up(
        self,
        seq: int,
        node: str,
        how: str,
        why: str,
        stored: Any | None = None,
        sent: datetime | None = None,
    ) -> bool:
        """asyncio side: the message at stream sequence ``seq`` is one ``node``'s consumer
        delivers no more (``how``: what says so; ``why``: why it did, as far as this node
        can tell; ``stored``: the message as read already, else read here): deleted from
        the stream and counted dead
        (``dead_lowered``, reason ``consumer_max_deliver``), logged, by whoever deletes it
        (so once also when two processes of the node, or the node and its taker, hear
        it: the second finds it gone). True if this counted it dead; False if it is gone
        already, or could not be read or deleted (logged then: it stays in the stream).

        A delivery of it this node handed to an agent is forgotten as it is counted dead:
        an answer of that handler that comes after (it ran past ``ack_wait`` on the last
        delivery JetStream made) is dropped, not counted in ``acked`` too (see
        :meth:`completed`): a message is counted once, by what was decided first, as an
        answer after the node's own ``max_deliver`` made it dead is. One this node acked
        already (its answer came first, the ack not applied yet when JetStream gave it
        up) is deleted and counted nowhere more: ``acked`` has it; so is one this node
        terminated and counted dead (its last delivery's ``ack_wait`` over as the term
        went: JetStream gave it up first, and a look found it before the term applied,
        see :meth:`_given_up_looks`)."""
        js = self.cluster.data_js
        failure: Exception | None = None
        msg_id: uuid.UUID | str = ""
        try:
            if stored is None:
                stored = await js.get_msg(self._stream, seq)
            if not self._of_consumer(stored, node):
                return False
            if self._stored_since(stored, sent):
                # (the consumer's state bounds what a look takes)
                if node == self.cluster.node:
                    self._look_soon()
                elif node in self._takeovers:
                    self._taken_looks.add(node)
                return False
            msg_id = (stored.headers or {}).get(wire.MSG_ID_HEADER, "")
            with contextlib.suppress(MessageDecodeError):
                msg_id = wire.decode_message(stored.data or b"").id
            deleted = await js.delete_msg(self._stream, seq)
        except nats.js.errors.APIError as exc:
            if _gone_already(exc):
                return False  # (deleted by another process, or its ack; expired)
            failure = exc
        except (nats.errors.Error, OSError) as exc:
            failure = exc
        if failure is not None:
            self._say(
                self._undeleted_log,
                "durable messages its consumer delivers no more, not deleted",
                logging.WARNING,
                "node %s: durable message at stream sequence %d is delivered no more %s"
                " (%s), and could not be deleted: %r; it stays in the stream %s",
                self.cluster.node,
                seq,
                how,
                why,
                failure,
                self._stream,
            )
            return False
        if not deleted or seq in self._dead_seqs:
            return False  # (terminated here, counted dead: see _terminate)
        if isinstance(msg_id, uuid.UUID):
            if msg_id in self._done:
                return False  # (handled: its answer came first, counted in acked)
            self._forget_delivery(msg_id, seq)
        self.dead_lowered += 1
        self._say(
            self._lowered_log,
            "durable messages dead at their consumer's lower max_deliver",
            logging.ERROR,
            "node %s: durable message %s dead %s: its consumer delivers it no more (%s);"
            " deleted from the stream (%d so far)",
            self.cluster.node,
            msg_id,
            how,
            why,
            self.dead_lowered,
            counted="durable_dead",
        )
        return True

    def _stored_since(self, stored: Any, sent: datetime | None) -> bool:
        """Whether ``stored`` (the message an advisory sent at ``sent`` names) was stored
        after the advisory was sent: then it is not the message JetStream gave up, which
        was stored and delivered before, and is left alone, logged as garbled. The
        advisory says no stream: one heard late, after the stream was made anew (its
        sequences begin at 1 again), or one published by anyone allowed to publish on
        ``$JS.EVENT.>``, named the new stream's message of that sequence, pending,
        which was deleted and counted dead, never handled (review of the fifty-seventh
        pass). Two clocks where the consumer's leader is not the stream's (a cluster of
        servers): one behind by ``d`` makes a message given up within ``d`` of its store
        look so too; this node's consumer is then looked at at once (see
        :meth:`_look_soon`, :meth:`_stranded`), which its state bounds, rather than
        deleting one that may be pending: the message is counted dead by that look (by a
        later one, a period apart, while others are pending under it). Until the
        fifty-seventh pass it was left to the look at the consumer's next bind, the
        node's next start: in the stream, uncounted, meanwhile. A lost node's consumer
        taken over is looked at by its takeover after the fetch under way (one long
        poll); until the fifty-eighth pass only as a takeover bound it, the message in
        the stream, uncounted, until the node was taken over again or forgotten."""
        if sent is None or stored.time is None or stored.time <= sent:
            return False
        self._say(
            self._advisory_log,
            "garbled max deliveries advisories",
            logging.WARNING,
            "node %s: a JetStream advisory sent at %s names the message at stream sequence"
            " %s, stored after it (%s): of a stream since made anew, or not JetStream's;"
            " left alone",
            self.cluster.node,
            sent.isoformat(),
            stored.seq,
            stored.time.isoformat(),
        )
        return True

    def _of_consumer(self, stored: Any, node: str) -> bool:
        """Whether ``stored`` (a message read from the stream) is one of ``node``'s
        consumer's subjects; if not, it is left alone, and the advisory that named it
        logged as garbled: JetStream names only its consumer's messages, and anything
        that may publish on the advisories' subjects could name another node's message,
        pending there, which a delete would lose (before the review of the fifty-third
        pass it was deleted and counted dead)."""
        subject = stored.subject or ""
        filtered = wire.durable_subject(self.cluster.prefix, node, "*")  # (its filter)
        if f"{subject.rpartition('.')[0]}.*" == filtered:
            return True
        self._say(
            self._advisory_log,
            "garbled max deliveries advisories",
            logging.WARNING,
            "node %s: a JetStream advisory for node %r's consumer is garbled (its stream_seq"
            " %s names a message of %s, not of that consumer's subjects), left alone",
            self.cluster.node,
            node,
            stored.seq,
            brief(subject, 200),
        )
        return False

    def _forget_delivery(self, msg_id: uuid.UUID, seq: int) -> None:
        """Message ``msg_id`` (stream sequence ``seq``) is counted dead: a delivery of it
        handed to an agent here is forgotten, and an answer of it that comes later is
        dropped (see :meth:`completed`)."""
        entry = self._in_flight.get(msg_id)
        late = self._late.get(msg_id)
        if entry is not None and entry[0].metadata.sequence.stream == seq:
            del self._in_flight[msg_id]
            self._room.set()
        elif late is not None and late[0].metadata.sequence.stream == seq:
            del self._late[msg_id]
        else:
            return
        _keep(self._dead_answers, msg_id, None)

    def reconnected(self) -> None:
        """The data connection is back (the cluster's reconnect callback): JetStream's
        ``MAX_DELIVERIES`` advisories sent while it was down reached no process of the
        node, and nats-py does not replay them; this node's consumer is looked at now for
        the messages it gave up meanwhile (see :meth:`_given_up_looks`)."""
        self._look_soon()

    def _look_soon(self) -> None:
        """This node's consumer is looked at for the messages it gave up (see
        :meth:`_given_up_looks`) at once, or once the look under way ends (asked again
        and again meanwhile, one look)."""
        if self.options.enabled and self._psub is not None and self._nursery is not None:
            self._look_fresh = True
            self._look_asked.set()

    async def _given_up_looks(self) -> None:
        """Look for the messages this node's consumer delivers no more that nothing
        counted (see :meth:`_stranded`): at the start, after each reconnect of the data
        connection (:meth:`reconnected`), and again every ``SWEEP_LOOKS x
        last_notice_wait`` while a look could not tell all the messages delivered before
        it (others pending under them), until one reaches them. Its own task: the
        start's look ran before the first sweep, which waited on it (about 13 s for 3,000
        found, measured in the fifty-third pass)."""
        every = SWEEP_LOOKS * self.cluster.options.last_notice_wait
        with self._looking:
            while True:
                self._look_asked = trio.Event()
                again = await self._find_stranded(self.cluster.node)
                with trio.move_on_at(trio.current_time() + every if again else math.inf):
                    await self._look_asked.wait()

    async def _find_stranded(self, node: str) -> bool:
        """Look for the messages ``node``'s consumer (this node's, see
        :meth:`_given_up_looks`; a lost node's, as this node takes it over) delivers no
        more while nothing counted them (see :meth:`_stranded`); what JetStream does not
        answer is logged. True if a later look is due (this node's consumer: the look
        failed, or could not tell all it delivered before it)."""
        own = node == self.cluster.node
        fresh = self._look_fresh or not own
        reach = self._look_reach if own else 0
        made_anew = self._made_anew
        if own:
            self._look_fresh = False
        try:
            found, reach = await call_aio(self._stranded, node, reach, fresh)
        except (nats.errors.Error, OSError, ValueError) as exc:
            if own:
                self._look_fresh = self._look_fresh or fresh
                self._look_failed(exc)
                return True
            self._say(
                self._stranded_log,
                "failed looks for durable messages delivered no more",
                logging.WARNING,
                "node %s: could not look for the durable messages node %r's consumer"
                " delivers no more: %r (looked for again at its next takeover)",
                self.cluster.node,
                node,
                exc,
            )
            return False
        if own:
            if self._look_failures:
                log_guarded(
                    log,
                    logging.INFO,
                    "node %s: looked for the durable messages its consumer delivers no"
                    " more again, after %d failed looks in a row",
                    self.cluster.node,
                    self._look_failures,
                )
                self._look_failures = 0
            # (a stream made anew while it ran: its target was a sequence of the old
            # one, which the new one's consumer may take long to pass, or never; kept,
            # it cost a look, two requests, every period until then: fifty-fifth pass)
            self._look_reach = reach if self._made_anew == made_anew else 0
        if found:
            log_guarded(
                log,
                logging.WARNING,
                "node %s: %d durable messages node %r's consumer delivered no more while no"
                " process heard JetStream's advisory: dead, deleted from the stream",
                self.cluster.node,
                found,
                node,
            )
        return own and (self._look_reach > 0 or self._look_fresh)

    def _look_failed(self, exc: BaseException) -> None:
        """A look of this node's consumer failed (``exc``): looked for again a period
        later (see :meth:`_given_up_looks`), said at the first failure in a row and at
        each :data:`_LOOK_FAILURES_SAID` more, with the count (a look refused for good,
        a permission the node's NATS user lacks, said a WARNING every period, about
        1,200 a day at the default period, the same line). Not given up after some
        count, with one ERROR: nothing tells a refusal for good from an outage that
        outlasts the count (a permission violation reaches a request as no answer, as an
        outage does), and a node that stopped looking would leave what its consumer
        gives up unheard uncounted for good, once JetStream answers again."""
        self._look_failures += 1
        failures = self._look_failures
        if failures == 1:
            log_guarded(
                log,
                logging.WARNING,
                "node %s: could not look for the durable messages its consumer delivers no"
                " more: %r; looked for again every %gs (said again at %d failures in a"
                " row: a NATS user without JetStream's API on the durable stream %s?)",
                self.cluster.node,
                exc,
                SWEEP_LOOKS * self.cluster.options.last_notice_wait,
                _LOOK_FAILURES_SAID + 1,
                self._stream,
            )
        elif failures % _LOOK_FAILURES_SAID == 1:
            log_guarded(
                log,
                logging.WARNING,
                "node %s: %d looks in a row for the durable messages its consumer delivers"
                " no more failed (last: %r); looked for again every %gs",
                self.cluster.node,
                failures,
                exc,
                SWEEP_LOOKS * self.cluster.options.last_notice_wait,
            )

    async def _stranded(self, node: str, reach: int, fresh: bool) -> tuple[int, int]:
        """asyncio side of :meth:`_find_stranded`: how many it deleted and counted dead,
        and the stream sequence a later look must reach (0: none): ``reach``, or if
        ``fresh`` the last message the consumer delivered, when the look could not tell
        all up to it.

        JetStream's ``MAX_DELIVERIES`` advisory is not stored: one sent while no process
        of the node heard it (the node restarting, or cut off; a lost node's, before its
        taker listened) left its message in the stream for good, counted nowhere
        (measured before the fifty-third pass's fix, ``max_deliver`` 1 on the consumer:
        the node's next run had ``durable_dead`` 0 and the stream kept it). JetStream
        lists no such message, but its consumer's state tells them (measured on
        nats-server 2.15.1): a work queue keeps a message until it is acked or
        terminated, a message given up leaves the consumer's pending ones, and the
        consumer delivers the stream in order; so a message of the consumer's subjects
        still stored at or under its ack floor, or at or under the last one it
        delivered while none is pending, is one it delivers no more (putting a higher
        ``max_deliver`` back does not deliver it again: measured in the fifty-second
        pass). Each is deleted and counted as the advisory's (:meth:`_delete_given_up`).
        One given up above the ack floor while others are pending is found by a later
        look, once the floor is past it (see :meth:`_given_up_looks`). A message this
        node holds is pending, never under the floor, so no look counts one twice: one
        JetStream gave up in an agent's hands is forgotten there as the advisory's is,
        and one this node terminated is counted nowhere more.

        Only what is of the stream whose consumer's state was read is bounded by it: a
        message of a stream made anew since (deleted by an operator while the look ran:
        its sequences begin at 1 again, under the old bound), pending there, ends the
        look (before the fifty-fifth pass it was deleted and counted dead, never
        handled; see :meth:`_made_anew_since` for how it is told); the look is due again
        then (its target kept, unless this node's pull found the stream made anew
        meanwhile: see :meth:`_find_stranded`)."""
        js = self.cluster.data_js
        state = await self._consumer_state(node)
        floor, last = state.floor, state.last
        upto = floor if state.pending else max(floor, last)
        if fresh:
            reach = max(reach, last)
        subject = wire.durable_subject(self.cluster.prefix, node, "*")
        where = f"node {node!r}'s consumer's state"
        seq, found, more = 1, 0, upto >= 1
        while more:
            page: list[Any] = []
            while more and len(page) < _LOOK_PAGE:
                try:
                    stored = await js.get_msg(self._stream, seq=seq, subject=subject, next=True)
                except nats.js.errors.NotFoundError:
                    stored = None
                if stored is None or stored.seq is None or stored.seq > upto:
                    more = False  # (none left up to the bound)
                else:
                    page.append(stored)
                    seq = stored.seq + 1
                    more = seq <= upto
            if page and await self._made_anew_since(node, state, page):
                return found, max(reach, upto)  # (a stream made anew: not the one read)
            for stored in page:
                # (the message as read goes on: read again, each would cost a request more)
                if await self._delete_given_up(
                    stored.seq, node, f"found at {where}", _FOUND_WHY, stored
                ):
                    found += 1
        return found, reach if upto < reach else 0

    async def _made_anew_since(self, node: str, state: _ConsumerState, page: Sequence[Any]) -> bool:
        """Whether any of ``page``, messages a look read, may be of a stream made anew
        since ``node``'s consumer's ``state`` was read (asyncio side; see
        :meth:`_stranded`): they are of the stream read if the consumer is still the one
        read after they were read (its ``created``: a stream made anew has a consumer
        made anew), one CONSUMER.INFO more a page of :data:`_LOOK_PAGE` messages (one a
        message until the fifty-seventh pass: about 5 ms each on loopback, 5 s more for
        a look over 1,000); when a server does not say ``created``, if each was stored
        before the server's time of that state. Before the fifty-sixth pass any message stored after the state's
        time ended the look: two servers' clocks compared (the stream's leader stamps a
        message, the consumer's leader the answer), a skew of ``d`` s narrowed it.
        Measured, the time of the answer moved by ``d``: behind by 3,600 s, a message
        given up 1 s before was not counted in 15 s (left to a look an hour later);
        ahead by 5 s, a look under way as the stream was made anew deleted the new
        stream's message and counted it dead, never handled (``consumer_max_deliver``
        1). The fifty-sixth pass took a message stored 60 s or more before the state's
        time on its time alone: with the consumer's leader 120 s or 3,600 s ahead, the
        same look deleted the new stream's message and counted it dead again
        (fifty-seventh pass); no time is trusted now where ``created`` is said."""
        try:
            now = await self._consumer_state(node)
        except nats.js.errors.NotFoundError:
            return True  # (the consumer gone: its stream deleted, or it)
        if now.created is None or state.created is None:
            # (a server that does not say it: the times alone, as before)
            return state.at is not None and any(
                stored.time is not None and stored.time > state.at for stored in page
            )
        return now.created != state.created

    async def _consumer_state(self, node: str) -> _ConsumerState:
        """``node``'s consumer's state as a look reads it (asyncio side): one
        CONSUMER.INFO request, raw: nats-py's ``consumer_info`` drops the answer's ``ts``,
        the server's time of it, which with the consumer's ``created`` bounds what the
        look may take for its consumer's (see :meth:`_made_anew_since`;
        ``delivered.last_active`` would not do: a server restarted says none)."""
        subject = f"{wire.JS_API}.CONSUMER.INFO.{self._stream}.{node}"
        reply = await self.cluster.nc.request(subject, b"", timeout=_JS_API_WAIT)
        return _consumer_state_answer(reply.data, subject)

    async def _send_forward(
        self, jsmsg: NatsMsg, subject: str, *, taken: bool = False, stale: bool = False
    ) -> None:
        """asyncio side: store ``jsmsg``'s message on ``subject`` (another node's), then
        ack it here. Its ``Nats-Msg-Id`` is the message id and this copy's stream
        sequence: a redelivery of this copy forwarded again stores nothing new (the
        duplicate window), and a copy forwarded back and forth is stored each time (its
        hops bounded by :data:`FORWARD_HOPS`). A copy JetStream did not take is nakked
        (``redelivery_delay``): forwarded, or delivered here, again; at its last delivery
        (``max_deliver``) it is dead instead, counted and logged (a nak would leave it in
        the stream, delivered no more).

        ``stale``: ``jsmsg`` is a delivery of the stream before it was made anew (see
        :meth:`_stream_made_anew`): its copy is stored, but neither acked nor nakked
        here (either would reach the new stream's message of its sequence), and one
        JetStream did not take is dead at once (its stream is gone: nothing delivers it
        again). Before the review of the fifty-first pass its forward was dropped with
        its ack: the message, which this node held, was handled nowhere.

        A copy the stream refused past a limit of its own (full: its ``max_messages``
        with discard new, or an operator's ``max_bytes``; the copy needs a place
        before the message it copies leaves), or past the server's JetStream storage
        or the account's JetStream limits (see :meth:`_refusal`), is nakked with the
        growing delay of a missing agent's message (:func:`missing_agent_delay`), and
        its lines say which limit: until the fifty-fifth pass it was tried again after
        ``redelivery_delay``, its ``max_deliver`` deliveries used up in a tenth of a
        second and the message dead (``unforwarded``) though the stream had room a
        moment later, the lines saying only ``ServiceUnavailableError()`` (measured:
        ``max_messages`` 2, two messages for a name that moved, both dead in 0.09 s)."""
        msg_id = (jsmsg.headers or {}).get(wire.MSG_ID_HEADER, "")
        try:
            await self.cluster.data_js.publish(subject, jsmsg.data, headers=_forward_headers(jsmsg))
        except (nats.errors.Error, OSError) as exc:
            said, full = self._refusal(exc)
            delivered = jsmsg.metadata.num_delivered
            if stale or delivered >= self.options.max_deliver:
                # a nak of its last delivery is delivered no more: it would stay in the
                # stream, neither handled nor counted (a stale one's stream is gone)
                self.dead_unforwarded += 1
                self._say(
                    self._unforwarded_log,
                    "durable messages dead after max_deliver failed forwards",
                    logging.ERROR,
                    "node %s: durable message %s dead after %d deliveries%s (last: not"
                    " forwarded to %s, where its agent runs: %r%s; if JetStream took the"
                    " copy after all, that node handles it) (%d so far)",
                    self.cluster.node,
                    msg_id,
                    delivered,
                    " (its stream since made anew)" if stale else "",
                    subject,
                    exc,
                    said,
                    self.dead_unforwarded,
                    counted="durable_dead",
                )
                if not stale:
                    await jsmsg.term()
                return
            self._forward_failures += 1
            self._say(
                self._forward_failed_log,
                "failed forwards of durable messages",
                logging.WARNING,
                "node %s: durable message %s not forwarded to %s: %r%s (nakked: tried"
                " again) (%d so far)",
                self.cluster.node,
                msg_id,
                subject,
                exc,
                said,
                self._forward_failures,
            )
            # (a full stream has room again once a message leaves it: given the time a
            # missing agent's message gets, not a tenth of a second for all deliveries)
            delay = self.options.redelivery_delay
            if full:
                delay = max(delay, missing_agent_delay(self.options, delivered))
            await jsmsg.nak(delay=delay)
            return
        self.forwarded += 1
        self.taken_over += taken
        if not stale:
            await jsmsg.ack()


def _keep(memory: OrderedDict[_K, _V], key: _K, value: _V) -> None:
    """``memory[key] = value`` (an entry there keeps its place), the oldest entry then
    forgotten past :data:`_DONE_MEMORY`: the one bound of a durable channel's memories of
    what it settled, so that a node that runs for months holds none without end."""
    memory[key] = value
    if len(memory) > _DONE_MEMORY:
        memory.popitem(last=False)


def _gone_already(exc: nats.js.errors.APIError) -> bool:
    """JetStream's answer to a read or a delete of a stream's message says it has no such
    message (a read: 404, code 10037; a delete: 500, code 10057, whose other causes say
    otherwise; nats-server 2.15.1)."""
    return isinstance(exc, nats.js.errors.NotFoundError) or (
        exc.err_code == _MSG_DELETE_FAILED and exc.description == "no message found"
    )


async def _unsubscribe_taken(psub: Any) -> None:
    """A takeover's pull subscription ``psub`` ended: :func:`_unsubscribe_pull`, within
    ``_PULL_CANCEL_WAIT`` from now."""
    await _unsubscribe_pull(psub, trio.current_time() + _PULL_CANCEL_WAIT)


async def _unsubscribe_pull(psub: Any, until: float) -> None:
    """A pull subscription ``psub`` ended (the node's own at its kernel's stop or its
    leave, a takeover's): unsubscribed the server first (the server then drops the
    fetch requests left: nothing goes to them; what it sent before is kept in the
    subscription's queue, see :func:`unsubscribe_server_first`), shielded from a cancel
    until ``until``, and cut there (the asyncio side then given ``_PULL_CANCEL_WAIT``
    more to end, see :func:`call_aio_bounded`); what fails is left to the requests'
    expiry. (A takeover's was shielded with no bound before the fiftieth pass: an
    ``UNSUB`` whose write waited on a client that sent nothing, its flusher stuck on a
    server not reading, held the takeover's end, and the node's leave, for ever.)"""
    with (
        trio.CancelScope(shield=True, deadline=until),
        contextlib.suppress(nats.errors.Error, OSError, ValueError, TimeoutError),
    ):
        await call_aio_bounded(
            _PULL_CANCEL_WAIT, unsubscribe_server_first, psub, _PULL_CANCEL_WAIT / 2
        )


def _activity(info: Any) -> tuple[int, int, int]:
    """What moves in a consumer's info (nats-py's ``ConsumerInfo``) when someone pulls it:
    its last delivery's and its ack floor's consumer sequences, and its unacked count."""
    delivered, floor = info.delivered, info.ack_floor
    return (
        delivered.consumer_seq if delivered is not None else 0,
        floor.consumer_seq if floor is not None else 0,
        info.num_ack_pending or 0,
    )


def _garbled(subject: str, offset: int | None, problem: str) -> ValueError:
    at = "" if offset is None else f" (offset {offset})"
    return ValueError(f"the answer to {subject}{at} is not nats-server's: {problem}")


def _stream_info_answer(
    data: bytes, subject: str, offset: int | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The answer in ``data`` to the STREAM.INFO request ``subject`` (from ``offset``,
    for a page of subjects), and its stream state: an error nats-server describes raised
    as nats-py raises it; any other answer that is not what nats-server sends, a
    ValueError naming the request and what was wrong (a failed read to the sweep, as
    nats' errors are: counted, swept again at the next period)."""
    try:
        answer = json.loads(data)
    except ValueError:
        raise _garbled(subject, offset, f"not JSON: {brief(data)}") from None
    if not isinstance(answer, dict):
        raise _garbled(subject, offset, f"not a JSON object: {brief(answer)}")
    error = answer.get("error")
    if error is not None:
        if isinstance(error, dict) and isinstance(error.get("code"), int):
            with contextlib.suppress(TypeError):  # (a field nats-py does not take)
                nats.js.errors.APIError.from_error(error)  # (raises the kind's error)
        raise _garbled(subject, offset, f"an error it does not describe: {brief(error)}")
    state = answer.get("state") or {}
    if not isinstance(state, dict):
        raise _garbled(subject, offset, f"its state is not an object: {brief(state)}")
    return answer, state


@attrs.frozen
class _StreamCounts:
    """What a read of the durable stream says to a sweep (see DurableChannel._unpulled):
    its messages, its last sequence, and its subjects (None: the answer does not say)."""

    messages: int
    last_seq: int
    subjects: int | None


def _stream_counts_answer(data: bytes, subject: str) -> _StreamCounts:
    """The stream's counts in ``data``, the answer to STREAM.INFO ``subject``
    (:meth:`DurableChannel._stream_counts`; an answer that is not nats-server's: see
    _stream_info_answer). A count not said is 0 (nats-py's reading), but the subjects'."""
    state = _stream_info_answer(data, subject, None)[1]
    counts: dict[str, int | None] = {}
    for key in ("messages", "last_seq", "num_subjects"):
        count = state.get(key)
        if count is not None and (
            not isinstance(count, int) or isinstance(count, bool) or count < 0
        ):
            raise _garbled(subject, None, f"its {key} is not a count: {brief(count)}")
        counts[key] = count
    return _StreamCounts(counts["messages"] or 0, counts["last_seq"] or 0, counts["num_subjects"])


@attrs.frozen
class _ConsumerState:
    """What a look reads of a consumer (see DurableChannel._stranded): the stream
    sequences of its ack floor and of the last message it delivered, how many of its
    deliveries are pending, and the server's time of the answer (None: not said)."""

    floor: int
    last: int
    pending: int
    at: datetime | None
    #: when the consumer was made, as the server says it (None: not said)
    created: str | None = None


def _is_count(value: object) -> TypeGuard[int]:
    """``value`` is a count nats-server could send: a whole number >= 0 (no bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _consumer_state_answer(data: bytes, subject: str) -> _ConsumerState:
    """The consumer's state in ``data``, the answer to CONSUMER.INFO ``subject``
    (:meth:`DurableChannel._consumer_state`; an error nats-server describes raised as
    nats-py raises it, another answer that is not nats-server's a ValueError: see
    _stream_info_answer). A sequence or count not said is 0, as nats-py reads it."""
    answer = _stream_info_answer(data, subject, None)[0]
    seqs: list[int] = []
    for key in ("ack_floor", "delivered"):
        said = answer.get(key) or {}
        seq = said.get("stream_seq", 0) if isinstance(said, dict) else None
        if not _is_count(seq):
            raise _garbled(subject, None, f"its {key} is not a sequence: {brief(said)}")
        seqs.append(seq)
    pending = answer.get("num_ack_pending") or 0
    if not _is_count(pending):
        raise _garbled(subject, None, f"its num_ack_pending is not a count: {brief(pending)}")
    at: datetime | None = None
    if (ts := answer.get("ts")) is not None:
        try:
            at = datetime.fromisoformat(ts)
        except (TypeError, ValueError):
            raise _garbled(subject, None, f"its ts is no time: {brief(ts)}") from None
        if at.tzinfo is None:
            raise _garbled(subject, None, f"its ts names no time zone: {brief(ts)}")
    created = answer.get("created")
    if created is not None and not isinstance(created, str):
        raise _garbled(subject, None, f"its created is no time: {brief(created)}")
    return _ConsumerState(seqs[0], seqs[1], pending, at, created)


def _msg_id(msg_id: object) -> uuid.UUID:
    """``msg_id`` as :meth:`DurableChannel.send` was given it: a UUID, or its 128-bit
    integer value (``ValueError`` out of range, as a :class:`Message` says); anything
    else is a TypeError naming it."""
    if isinstance(msg_id, uuid.UUID):
        return msg_id
    if type(msg_id) is int:
        if not 0 <= msg_id < ID_LIMIT:
            raise ValueError(
                f"send_durable's msg_id must be a 128-bit value, got {brief(msg_id, 60)}"
            )
        return uuid.UUID(int=msg_id)
    hint = " (uuid.UUID(text) reads a UUID's text)" if isinstance(msg_id, str) else ""
    raise TypeError(
        "send_durable's msg_id must be a uuid.UUID (or its 128-bit integer value; None: a"
        f" fresh id), got {type(msg_id).__name__} {brief(msg_id, 60)}{hint}"
    )


def _advisory_time(said: Any) -> datetime | None:
    """The ``timestamp`` of a JetStream advisory (None: it says none); ValueError or
    TypeError if it is no time with a time zone."""
    if said is None:
        return None
    at = datetime.fromisoformat(said)
    if at.tzinfo is None:
        raise ValueError(f"timestamp {brief(said)} names no time zone")
    return at


def _subjects_answer(data: bytes, subject: str, offset: int) -> tuple[dict[str, int], int]:
    """The page of subjects and the total in ``data``, the answer to the request
    ``subject`` from ``offset`` (:meth:`DurableChannel._subjects_page`; an answer that is
    not nats-server's: see _stream_info_answer)."""
    answer, state = _stream_info_answer(data, subject, offset)
    page = state.get("subjects") or {}
    if not isinstance(page, dict) or not all(isinstance(n, int) for n in page.values()):
        raise _garbled(subject, offset, f"its subjects are not an object of counts: {brief(page)}")
    total = answer.get("total")
    if total is None:
        return page, offset + len(page)
    if not isinstance(total, int) or isinstance(total, bool):
        raise _garbled(subject, offset, f"its total is not an integer: {brief(total)}")
    return page, total
