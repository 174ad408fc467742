"""Placement: which kernel of the cluster runs a named agent, and where it goes when that kernel is lost.

``await cluster.spawn("counter", name="counter-7")`` puts the agent on one live member:
by default the one that wins *rendezvous hashing* (highest random weight) of the name
over the reachable members that run its type (each member's record names the types it
registered: one that joined only to send runs none), with a stable hash (blake2b of
node and name, never Python's salted ``hash()``), so every node computes the same
owner, and a member joining or leaving moves only the names it wins or held; or on a
node given by name (``node="worker-2"``). The spec must be resolvable on that node:
every node registers the specs it can run under a *type name*
(:meth:`Placement.register`), and a request for a type the owner does not know fails
with :class:`UnknownAgentType` naming it (as does one no reachable member runs).
If the owner is this node the agent is spawned here; otherwise the owner is asked with
one request on the control connection (``<prefix>.place.<node>``). Either way the owner
writes a *placement record* (name -> type) into the ``<prefix>-placed`` KV bucket, and
the caller learns the name's node and id from the answer: the name -> node map (the
names bucket every node watches) has it at once, with no further round trip.

When a member is *lost* (missed heartbeats: a crash, a SIGKILL, a partition), each
survivor computes, for every record the lost node held, the owner over the surviving
members that run its type; exactly that one re-spawns it from its registry (restart
semantics: fresh state; a ``restarted`` lifecycle event and a log line say "re-placed
from node X"). If no survivor runs the type, the record is kept and the agent waits
(counted in ``placements_waiting``) until a member that runs it is heard (see
:meth:`Placement.owners_changed`), as Akka allocates a shard only to a member with its
region's role. What the lost node held is counted, never silently dropped (see
:meth:`Placement.node_lost`).
A node that leaves *cleanly* stopped its agents on purpose (its kernel shut down, or it
left the cluster): it deletes its records, and its agents are not re-placed. A member
counted lost that was only partitioned away keeps its copies; once the nodes hear each
other again, the copy whose names-bucket entry is the older one is stopped on its node
(:meth:`Placement.superseded`, reason :data:`DUPLICATE_REASON`). Members
joining do not move agents that are already running (moving one costs its state):
:meth:`Placement.rebalance` moves a node's agents that a member which joined since now
wins, when the operator asks.

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import inspect
import json
import logging
import uuid
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Final, final

import attrs
import nats.errors
import nats.js.errors
import trio

from .._agent import CONTEXT_NAMES, Agent, AgentRef, AgentSpec, check_agent_name
from .._errors import AgentNotFound, KernelShuttingDown, NameTaken, NexusError, TransportUnavailable
from .._events import EventKind, LifecycleEvent
from .._logcall import log_guarded
from .._plural import count_of, first_few
from .._supervisor import Supervisor
from .._throttle import Throttle
from . import _kvops as kvops
from . import _wire as wire
from ._aio import call_aio
from ._direct import flush_after_subscribe
from ._membership import TYPES_MAX, NodeInfo

if TYPE_CHECKING:
    from nats.aio.msg import Msg as NatsMsg
    from nats.js.kv import KeyValue

    from ._cluster import Cluster

log = logging.getLogger("nexus_trio.nats")


def check_agent_type(type_name: object, spec: object) -> None:
    """What ``cluster.register_type`` (and ``nexus run --types``) refuses, before a
    placement finds it: a ``type_name`` that is no str (TypeError) or no NATS token
    (ValueError: letters, digits, ``-``, ``_``), a ``spec`` that is not one agent as
    ``kernel.spawn`` takes it (TypeError): an AgentSpec (``@agent``), an Agent subclass or
    a plain ``async def handler(ctx, msg)`` pass; a Supervisor (a placed agent is one
    agent), a handler that is no ``async def``, any other value are refused. The error
    names the type."""
    if not isinstance(type_name, str):
        raise TypeError(
            f"agent type {type_name!r} is of type {type(type_name).__name__}, not a str"
        )
    wire.check_token("agent type", type_name)
    if len(type_name) > wire.TYPE_NAME_MAX:
        raise ValueError(
            f"agent type {type_name[:40]!r}... is {len(type_name)} characters long (at most"
            f" {wire.TYPE_NAME_MAX}: its node's membership record names it)"
        )
    if isinstance(spec, AgentSpec) or (isinstance(spec, type) and issubclass(spec, Agent)):
        return
    if inspect.iscoroutinefunction(spec):
        return  # a plain handler: kernel.spawn takes it as agent(handler) does
    where = f"agent type {type_name!r} is"
    if isinstance(spec, Supervisor):
        raise TypeError(
            f"{where} a Supervisor: a placed agent is one agent, given by its AgentSpec"
            " (@agent) or Agent subclass"
        )
    if inspect.isfunction(spec):
        name = getattr(spec, "__qualname__", repr(spec))
        try:
            first = next(iter(inspect.signature(spec).parameters), None)
        except (TypeError, ValueError):  # no signature to read
            first = None
        if first in CONTEXT_NAMES:  # handler(ctx, msg) without async
            raise TypeError(f"{where} {name}, a handler that is no coroutine: use async def")
        raise TypeError(
            f"{where} the function {name}; expected an AgentSpec (@agent) or an Agent subclass"
        )
    raise TypeError(
        f"{where} {type(spec).__name__} {spec!r:.60}; expected an AgentSpec (@agent) or an"
        " Agent subclass"
    )


#: how long :meth:`Placement.spawn` waits for a remote owner's answer by default
DEFAULT_PLACE_TIMEOUT: Final = 5.0
#: a placement request that found nobody on a member's subject is asked again after
#: this long (the member announced itself and does not listen yet: it is joining)
_ASK_AGAIN_AFTER: Final = 0.05
#: the least wait given to a request (nats-py takes no timeout of 0)
_MIN_WAIT: Final = 0.001
#: names a warning lists (the rest counted: "and N more")
_NAMES_SHOWN: Final = 20
#: the reason (``stopped`` event, dead letters' detail) of a placed agent stopped because
#: another incarnation of its name won (see :meth:`Placement.superseded`)
DUPLICATE_REASON: Final = "duplicate after partition"
#: why the record of a placed agent whose name claim the names bucket did not take is
#: not written at once: a holder of the name may be there, unseen (the claim's read
#: failed), and the record's key is the holder's; written on a retry once the agent
#: holds the name (see :meth:`Placement.retry_records`), never by a copy that lost it
_NAME_UNWRITTEN: Final = "its name is not in the names bucket yet; written once it is"
#: the reason of a copy started for a placement whose name another node claimed first
#: (see :meth:`Placement._claim`): stopped at once, the placement refused with NameTaken
REFUSED_REASON: Final = "name held on another node"
#: the reason of a copy started for a placement whose name claim this node's closed
#: connection cut (its leave closing the connection and loop under the claim): stopped
#: at once, the placement refused with TransportUnavailable
CLOSED_REASON: Final = "its name claim was cut: the node's connection closed"
#: why the record of a placed agent whose placement's caller was cancelled while the
#: record was written is written again (it may have landed or not)
_CALLER_CANCELLED: Final = "its placement's caller was cancelled while it was written"


def placement_weight(node: str, name: str) -> int:
    """The rendezvous weight of ``node`` for ``name``: 64 bits of blake2b, the same in
    every process and on every host (unlike Python's ``hash()``, salted per process)."""
    digest = hashlib.blake2b(
        node.encode() + b"\x00" + name.encode(), digest_size=8, person=b"nexus-place"
    ).digest()
    return int.from_bytes(digest, "big")


def rendezvous_owner(name: str, nodes: Iterable[str]) -> str:
    """The node of ``nodes`` that wins ``name`` (highest weight; ties by node name).

    Removing a node moves only the names it won; adding one moves only the names it now
    wins. ``ValueError`` if ``nodes`` is empty.
    """
    best: tuple[int, str] | None = None
    for node in nodes:
        key = (placement_weight(node, name), node)
        if best is None or key > best:
            best = key
    if best is None:
        raise ValueError(f"no live node to place {name!r} on")
    return best[1]


class UnknownAgentType(NexusError, LookupError):
    """The node asked to run an agent has no spec registered under ``type_name``; or,
    ``node`` None, no reachable member has (none advertises it in its record)."""

    def __init__(self, type_name: str, node: str | None) -> None:
        self.type_name = type_name
        self.node = node
        how = "join_cluster(..., types={...}) or cluster.register_type(type_name, spec)"
        if node is None:
            text = (
                f"no reachable member runs agent type {type_name!r}: none has it registered"
                f" (give the nodes that are to run it {how})"
            )
        else:
            text = (
                f"node {node!r} has no agent type {type_name!r} registered (register it there"
                f" with {how}, or pin the agent to a node that has it with node=...)"
            )
        super().__init__(text)


class PlacementFailed(NexusError):
    """The owner node could not spawn the agent (its error, as text)."""

    def __init__(self, name: str, node: str, error: str) -> None:
        self.name = name
        self.node = node
        self.error = error
        super().__init__(f"placing {name!r} on node {node!r} failed: {error}")


@final
@attrs.frozen
class PlacedAgent:
    """Where :meth:`Placement.spawn` put an agent: its name, node and id."""

    name: str
    node: str
    id: uuid.UUID


@final
@attrs.frozen
class PlacementRecord:
    """A placed agent as the ``<prefix>-placed`` bucket keeps it."""

    type_name: str
    #: the node it was pinned to, None if placed by hash
    pinned: str | None = None
    #: the id of the agent it was written for, as read from the bucket (None: not read
    #: yet, or written by a kernel of an earlier version, whose records name no agent)
    agent_id: uuid.UUID | None = None

    def encode(self, agent_id: uuid.UUID | None = None) -> bytes:
        """The record written for agent ``agent_id`` (None: :attr:`agent_id`; neither
        known, no ``"id"``): the id tells a drop of this incarnation's record from the
        claim of a later one (see ``Cluster.record_dropped``)."""
        fields: dict[str, str | None] = {"type": self.type_name, "pinned": self.pinned}
        written_for = self.agent_id if agent_id is None else agent_id
        if written_for is not None:
            fields["id"] = str(written_for)
        return json.dumps(fields).encode()

    @classmethod
    def decode(cls, data: bytes) -> PlacementRecord:
        obj = wire.read_wire_json(data, "placement record")
        pinned = obj.get("pinned")
        agent_id = obj.get("id")
        return cls(
            str(obj["type"]),
            None if pinned is None else str(pinned),
            None if agent_id is None else uuid.UUID(agent_id),
        )


@final
class Placement:
    """One node's side of placement (see the module doc); ``cluster.placement``."""

    def __init__(self, cluster: Cluster) -> None:
        self._cluster = cluster
        self._specs: dict[str, Any] = {}
        #: every placement record in the cluster (the KV watcher keeps it)
        self.records: dict[str, PlacementRecord] = {}
        #: placed agents this node runs: name -> (agent id, KV revision of the record it
        #: wrote for it; None while that write failed and is to be retried)
        self._held: dict[str, tuple[uuid.UUID, int | None]] = {}
        #: the records to write again (their agents' revision in ``_held`` is None)
        self._unwritten: dict[str, PlacementRecord] = {}
        #: records whose write failed (see :meth:`_record_unwritten`): one line a second
        self._unwritten_log = Throttle(kind="placement.record_unwritten")
        #: placed agents a rebalance is moving (asked of their new owner, not yet stopped
        #: here): out of ``_held`` meanwhile, their entry and record to write again as
        #: they were there; dropped by a clean leave, or by their stop, as ``_held``'s
        self._moving: dict[str, tuple[tuple[uuid.UUID, int | None], PlacementRecord | None]] = {}
        #: the record drops of stopped agents under way: name -> (agent id, set once the
        #: drop landed or failed; see :meth:`agent_stopped`)
        self._dropping: dict[str, tuple[uuid.UUID, trio.Event]] = {}
        #: records written on a retry (see :meth:`retry_records`)
        self.records_written_late = 0
        #: records of the placed bucket refused: a key this code does not write, a body
        #: that is not a record (not strict UTF-8 JSON, wrong fields)
        self.records_refused = kvops.Refusals("a placement record", cluster.held)
        self._kv: KeyValue | None = None
        self._nursery: trio.Nursery | None = None
        self._subject = f"{cluster.prefix}.place.{cluster.node}"
        #: agents this node re-spawned after their node was lost
        self.replaced = 0
        #: names of lost nodes of an earlier version with no record (see
        #: :meth:`_untyped_names_lost`)
        self.untyped_names_lost = 0
        #: messages counted as lost with lost nodes (see :meth:`node_lost`)
        self.lost_with_nodes = 0
        #: the same, per node (see :attr:`lost_with_node`)
        self._lost_with: dict[str, int] | None = {}
        #: lost processes (node, id prefix) whose held messages this node counted
        self._counted: set[tuple[str, int]] = set()
        #: per node judged lost, what its loss counted here (see :meth:`heard_from`)
        self._loss_counts: dict[str, _LossCount] = {}
        #: what this node counted as held by a lost process whose own loss it had not
        #: judged yet (lost in the same check as the node that owned its count): taken
        #: into that loss's count when it is judged (see :meth:`_count_held`)
        self._held_before_loss: dict[tuple[str, int], int] = {}
        #: messages counted in ``lost_with_nodes`` that their node, heard again, took or
        #: still held after all: taken back out of it (see :meth:`heard_from`)
        self.lost_with_nodes_taken_back = 0
        #: names this node is re-placing now (their task started, not done)
        self._replacing: set[str] = set()
        #: placed agents stopped here as duplicates (see :meth:`superseded`)
        self.duplicates_stopped = 0
        #: names whose copy here is being stopped as a duplicate: set once it is gone
        #: (it holds the name in the kernel until then; a re-placement here waits)
        self._stopping: dict[str, trio.Event] = {}
        #: placement requests from other nodes under way (see _on_place_request), and
        #: the last one of each name
        self._requests: set[asyncio.Future[None]] = set()
        self._placing: dict[str, asyncio.Future[None]] = {}
        #: record writes of those requests at once
        self._writing = asyncio.Semaphore(kvops.WINDOW)
        #: placed agents of lost nodes that no reachable member can run (none has their
        #: type): name -> the lost node; re-placed once a member that can joins (or
        #: registers the type), their record kept meanwhile (see :meth:`owners_changed`)
        self._waiting: dict[str, str] = {}
        #: names in ``records`` whose record no node wrote: noted from the names-bucket
        #: entry of a node lost between its claim and its record (see
        #: :meth:`_claimed_unrecorded`); dropped once the placed bucket speaks of them
        self._unrecorded: set[str] = set()

    # --- registry ---------------------------------------------------------------------------

    def register(self, type_name: str, spec: Any) -> None:
        """Let this node run agents of ``type_name``: an AgentSpec (``@agent``) or an
        Agent subclass (see :func:`check_agent_type` for what is refused). Its membership
        record names its types: a type new to a joined node has the record written again
        at once (the others place agents of the type on it from then on), and a placed
        agent of the type waiting for a member that runs it is re-placed."""
        check_agent_type(type_name, spec)
        new = type_name not in self._specs
        if new and len(self._specs) >= TYPES_MAX:
            raise ValueError(
                f"agent type {type_name!r}: this node has {TYPES_MAX} types registered"
                " already (the most its membership record names)"
            )
        self._specs[type_name] = spec
        if new and self._nursery is not None and not self._leaving():
            self._nursery.start_soon(self._announce_types)
            self.owners_changed()

    @property
    def types(self) -> list[str]:
        """The agent types this node runs (registered), sorted: its record says them."""
        return sorted(self._specs)

    async def _announce_types(self) -> None:
        """This node's record, with a type just registered, written now (not at the next
        heartbeat); a write that fails is made by the next heartbeat."""
        try:
            await self._cluster.announce()
        except Exception as exc:
            log_guarded(
                log,
                logging.WARNING,
                "node %s: membership record with its new agent types not written: %r (the"
                " next heartbeat writes it)",
                self._cluster.node,
                exc,
            )

    def runs(self, node: str, type_name: str) -> bool:
        """Whether member ``node`` can run agents of ``type_name``: this node, if it has
        the type registered; another, if its record names it (or names no types: a
        kernel of an earlier version, taken as able to run any, as it always was)."""
        if node == self._cluster.node:
            return type_name in self._specs
        info = self._cluster.members.members.get(node)
        return info is None or info.runs(type_name)

    def _owners(self, nodes: Iterable[str], type_name: str) -> list[str]:
        """The members of ``nodes`` that can run ``type_name`` (see :meth:`runs`)."""
        return [node for node in nodes if self.runs(node, type_name)]

    # --- placing ----------------------------------------------------------------------------

    def owner(
        self,
        name: str,
        type_name: str,
        *,
        pinned: str | None = None,
        without: str | None = None,
    ) -> str:
        """The node that should run ``name``, of ``type_name``, now: ``pinned`` if it is
        a reachable member, else the rendezvous winner over the reachable members (minus
        ``without``) that can run the type (see :meth:`runs`): a member that registers
        no type (one that joined only to send) runs nothing placed by hash.
        :class:`UnknownAgentType` (its node None) if no reachable member can."""
        live = [n for n in self._cluster.live_nodes() if n != without]
        if pinned is not None and pinned in live:
            return pinned
        owners = self._owners(live, type_name)
        if not owners:
            raise UnknownAgentType(type_name, None)
        return rendezvous_owner(name, owners)

    async def spawn(
        self,
        type_name: str,
        *,
        name: str,
        node: str | None = None,
        timeout: float = DEFAULT_PLACE_TIMEOUT,
    ) -> PlacedAgent:
        """Spawn an agent of ``type_name`` named ``name`` somewhere in the cluster.

        ``node`` pins it to that member (:class:`AgentNotFound` naming the node if it is
        not a reachable member); without it the name's rendezvous owner over the
        members that run the type runs it (see :meth:`owner`).
        Raises :class:`NameTaken` if the name runs on a reachable node already,
        :class:`UnknownAgentType` if no reachable member runs the type (its ``node``
        None) or the owner has no spec for it after all,
        :class:`PlacementFailed` with the owner's error otherwise, and
        :class:`TransportUnavailable` if the owner does not answer within ``timeout``
        (or this node's connection closed under the request), and at once once this
        node left the cluster or is leaving it.
        A record the owner could not write does not fail it: the agent runs, and the
        write is retried (see :meth:`retry_records`). A ``type_name`` that is no str is
        a TypeError, an empty ``name`` a ValueError, here, before any node is asked.
        """
        if not isinstance(type_name, str):
            raise TypeError(
                "cluster.spawn takes the name of an agent type registered with"
                " cluster.register_type(type_name, spec) (a str), got a value of type"
                f" {type(type_name).__name__}"
            )
        wire.check_token("agent type", type_name)
        check_agent_name(name)
        cluster = self._cluster
        if cluster.closing:
            # (its connection and loop go or are gone: no placement starts, as no move
            # of a rebalance does; an agent spawned here now ran on unnamed, unrecorded)
            raise TransportUnavailable(
                f"node {cluster.node!r} left the cluster (or is leaving): {name!r} not placed"
            )
        if node is not None and node not in cluster.live_nodes():
            live = ", ".join(repr(n) for n in cluster.live_nodes())
            raise AgentNotFound(
                f"node:{node}",
                detail=f"no live member {node!r} to pin {name!r} on; live members: {live}",
            )
        holder = cluster.name_holder(name)
        if holder is not None and holder[0] in cluster.live_nodes():
            raise NameTaken(name, holder[1], node=holder[0])
        owner = node if node is not None else self.owner(name, type_name)
        if owner != cluster.node:
            return await self._ask(owner, type_name, name, node, timeout)
        try:
            return await self._spawn_here(type_name, name, node, replaced_from=None)
        except NameTaken as exc:
            if exc.node is not None:
                raise
            raise NameTaken(name, exc.holder, node=cluster.node) from None  # this kernel's

    async def _ask(
        self,
        owner: str,
        type_name: str,
        name: str,
        pinned: str | None,
        timeout: float,
        replaces: tuple[str, uuid.UUID] | None = None,
        *,
        replaced_from: str | None = None,
    ) -> PlacedAgent:
        """Have node ``owner`` spawn the agent (one request on the control connection);
        ``replaces``: the copy whose name entry its claim may take over (a rebalance's);
        ``replaced_from``: the lost node whose agent it re-places (the owner counts it
        in ``replaced``, see :meth:`owners_changed`)."""
        cluster = self._cluster
        fields: dict[str, Any] = {"type": type_name, "name": name, "pinned": pinned}
        if replaces is not None:
            fields["replaces"] = [replaces[0], str(replaces[1])]
        if replaced_from is not None:
            fields["replaced_from"] = replaced_from
        body = json.dumps(fields).encode()
        subject = f"{cluster.prefix}.place.{owner}"
        deadline = trio.current_time() + timeout
        while True:
            left = deadline - trio.current_time()
            try:
                answer = await call_aio(
                    cluster.control.request, subject, body, timeout=max(left, _MIN_WAIT)
                )
                break
            except nats.errors.NoRespondersError as exc:
                # A joining node announces itself before it listens on its placement
                # subject: a member heard that soon is asked again, within the timeout,
                # while it is a reachable member.
                if left > _ASK_AGAIN_AFTER and owner in cluster.live_nodes():
                    await trio.sleep(_ASK_AGAIN_AFTER)
                    continue
                error: Exception = exc
            except nats.errors.TimeoutError as exc:
                error = exc
            except nats.errors.ConnectionClosedError as exc:
                # (this node's connection closed under the request or before it: its
                # leave, or nats-py giving up reconnecting)
                error = exc
            raise TransportUnavailable(
                f"node {owner!r} did not answer the request to place {name!r}: {error!r}"
                + (f" (node {cluster.node!r} left the cluster)" if cluster.closing else "")
            ) from None
        placed, named = _decode_answer(answer.data, name, owner)
        cluster.learn_name(placed.name, placed.node, placed.id, named=named)
        return placed

    async def _spawn_here(
        self, type_name: str, name: str, pinned: str | None, *, replaced_from: str | None
    ) -> PlacedAgent:
        cluster = self._cluster
        ref, record = self._spawn_local(type_name, name, pinned)
        try:
            named = await call_aio(self._claim, name, ref.id, record, None)
        except NameTaken:
            await self._stop_refused(ref.id)
            raise
        except nats.errors.ConnectionClosedError:
            # The leave closed the connection and loop under the claim (asyncio cancelled
            # it, see _aio.call_aio): the copy ran on in the kernel, unnamed and
            # unrecorded, its caller told the placement failed.
            with contextlib.suppress(AgentNotFound, KernelShuttingDown):
                await cluster.kernel.stop(ref.id, reason=CLOSED_REASON)
            raise TransportUnavailable(
                f"the connection of node {cluster.node!r} closed"
                + (" (it left the cluster)" if cluster.closing else "")
                + f" under the claim of {name!r}: not placed"
            ) from None
        except trio.Cancelled:
            self._claim_cancelled(name, ref.id, record)
            raise
        await self._write_record(name, ref.id, record, named)
        if replaced_from is not None:
            self._note_replaced(name, ref.id, replaced_from)
        return PlacedAgent(name, cluster.node, ref.id)

    async def _write_record(
        self, name: str, agent_id: uuid.UUID, record: PlacementRecord, named: bool
    ) -> None:
        """Write the record of ``agent_id``, running here as ``name``, whose claim of the
        name just ended (``named``: the bucket took it; if not, the record waits for it)."""
        kv = self._kv
        if kv is not None and not named:
            self._record_unwritten(name, agent_id, record, _NAME_UNWRITTEN)
        elif kv is not None:
            try:
                revision = await call_aio(kv.put, wire.name_key(name), record.encode(agent_id))
            except Exception as exc:  # the bucket unreachable: the agent runs all the same
                self._record_unwritten(name, agent_id, record, exc)
            except trio.Cancelled:  # (written or not: written again on a retry)
                self._record_unwritten(name, agent_id, record, _CALLER_CANCELLED)
                raise
            else:
                await self._hold(name, agent_id, revision)

    def _note_replaced(self, name: str, agent_id: uuid.UUID, replaced_from: str) -> None:
        """``agent_id`` runs here as ``name``, re-placed from the lost ``replaced_from``:
        counted, logged, and said by a ``restarted`` event."""
        self.replaced += 1
        self._waiting.pop(name, None)
        reason = f"re-placed from node {replaced_from}"
        log_guarded(
            log,
            logging.WARNING,
            "node %s: agent %r %s (fresh state)",
            self._cluster.node,
            name,
            reason,
        )
        self._cluster.kernel.report_event(
            LifecycleEvent(EventKind.RESTARTED, agent_id, name, trio.current_time(), reason)
        )

    async def _hold(self, name: str, agent_id: uuid.UUID, revision: int) -> None:
        """Note the record just written for ``name``, to drop on a clean leave; if this
        node is leaving already (its leave may have dropped the records), or the agent
        stopped for good while the record was written (its STOPPED event found nothing
        held to drop), drop it now."""
        if not self._cluster.closing and self._running(name, agent_id):
            self._now_held(name, agent_id, revision)
            return
        await self._drop_record(name, revision)

    def _claim_cancelled(self, name: str, agent_id: uuid.UUID, record: PlacementRecord) -> None:
        """The caller of the placement of ``agent_id``, spawned here as ``name``, was
        cancelled while its name was claimed: the agent runs, its claim taken as one the
        bucket did not take (name and record written on a retry, see ``_retry_names`` and
        :meth:`retry_records`), not left in neither bucket for good. As for such a claim
        (see :meth:`_claim`), the name is not noted as this node's: a holder this node
        knows stays where the name routes, and the copy is checked against it once held."""
        self.records[name] = record
        self._cluster.claim_unanswered(name, agent_id)
        if self._kv is not None:
            self._record_unwritten(name, agent_id, record, _NAME_UNWRITTEN)

    def _now_held(self, name: str, agent_id: uuid.UUID, revision: int) -> None:
        """``agent_id`` runs here as placed ``name``, its record written at ``revision``;
        a later incarnation heard while it was written wins (it is stopped)."""
        self._held[name] = (agent_id, revision)
        self._unwritten.pop(name, None)
        self._cluster.check_duplicate(name)

    def _running(self, name: str, agent_id: uuid.UUID) -> bool:
        """Whether ``agent_id`` still runs here as ``name`` (the kernel forgets a name
        before it reports the agent STOPPED)."""
        try:
            return self._cluster.kernel.lookup(name).id == agent_id
        except AgentNotFound:
            return False

    def _record_unwritten(
        self, name: str, agent_id: uuid.UUID, record: PlacementRecord, exc: Exception | str
    ) -> None:
        """The record of ``agent_id``, just spawned here as ``name``, could not be written
        (the placed bucket unreachable: a NATS-cluster partition, JetStream down), or is
        not to be yet (its name not written: see :data:`_NAME_UNWRITTEN`). The
        agent runs: it is held as placed all the same (stopped if another incarnation
        wins its name, its record dropped if it stops), and :meth:`retry_records` writes
        the record once the bucket takes writes again."""
        cluster = self._cluster
        if cluster.closing:
            return  # its leave: no record to drop
        if not self._running(name, agent_id):
            self.records.pop(name, None)  # stopped for good meanwhile: none written
            return
        self._held[name] = (agent_id, None)
        self._unwritten[name] = record
        if cluster.held.due(
            self._unwritten_log,
            "placement records not written",
            counted="records_unwritten",
        ):
            log_guarded(
                log,
                logging.WARNING,
                "node %s: placement record of %r (%s) not written: %r; the agent runs, the"
                " write is retried (%d unwritten now, counted in records_unwritten; logged"
                " at most once a second)",
                cluster.node,
                name,
                agent_id,
                exc,
                len(self._unwritten),
            )
        # placed now: a holder of its name heard already wins (its name unwritten, the
        # check at its claim found nothing held to stop)
        cluster.check_duplicate(name)

    def write_again(self) -> int:
        """The placed bucket was found gone or made anew (see ``Cluster._check_buckets``):
        the record of every placed agent held here is to be written again (by
        :meth:`retry_records`). How many."""
        count = 0
        for name, (agent_id, _) in list(self._held.items()):
            record = self._unwritten.get(name) or self.records.get(name)
            if record is None:
                continue
            self._held[name] = (agent_id, None)
            self._unwritten[name] = record
            count += 1
        return count

    async def retry_records(self) -> bool:
        """Write the records whose write failed (see :meth:`_record_unwritten`), of the
        agents still held here whose name this node holds in the names bucket: a copy
        whose name is not written yet waits for it, one that lost its name to another
        incarnation is stopped instead (see :meth:`superseded`). False if a write failed
        again (the bucket still unreachable: the others wait for the next try). The
        records written are said in one line (a bucket made anew has them all written
        again)."""
        written: list[str] = []
        try:
            return await self._retry_records(written)
        finally:
            if written:
                log_guarded(
                    log,
                    logging.WARNING,
                    "node %s: %s written on a retry: %s",
                    self._cluster.node,
                    count_of(len(written), "placement record"),
                    first_few(written),
                )

    async def _retry_records(self, written: list[str]) -> bool:
        """:meth:`retry_records`'s pass; the names whose record it wrote go to ``written``."""
        cluster = self._cluster
        kv = self._kv
        if kv is None:
            return True
        for name, record in list(self._unwritten.items()):
            if cluster.closing:
                return True
            held = self._held.get(name)
            if held is None or held[1] is not None:
                del self._unwritten[name]  # stopped, moved or left since
                continue
            agent_id = held[0]
            if not cluster.holds_name(name, agent_id):
                continue
            try:
                revision = await call_aio(kv.put, wire.name_key(name), record.encode(agent_id))
            except Exception as exc:
                log_guarded(
                    log,
                    logging.DEBUG,
                    "node %s: record %r still not written: %r",
                    cluster.node,
                    name,
                    exc,
                )
                return False
            if self._held.get(name) != (agent_id, None):
                # Stopped for good or leaving while it was written: dropped again. (A
                # copy stopped as a duplicate meanwhile leaves it: the winner's record.)
                holder = cluster.name_holder(name)
                if cluster.closing or holder is None or holder[0] == cluster.node:
                    await self._drop_record(name, revision)
                continue
            self._held[name] = (agent_id, revision)
            del self._unwritten[name]
            self.records_written_late += 1
            written.append(name)
        return True

    @property
    def records_held(self) -> int:
        """Placed agents running here (their records are dropped on a clean leave), those a
        rebalance is moving included."""
        return len(self._held) + len(self._moving)

    @property
    def records_unwritten(self) -> int:
        """Placed agents running here whose record is still to be written."""
        return len(self._unwritten)

    def _spawn_local(
        self, type_name: str, name: str, pinned: str | None
    ) -> tuple[AgentRef, PlacementRecord]:
        """Spawn a placed agent in this kernel (the caller claims its name, see
        :meth:`_claim`, then writes its record to KV)."""
        cluster = self._cluster
        spec = self._specs.get(type_name)
        if spec is None:
            raise UnknownAgentType(type_name, cluster.node)
        ref = cluster.kernel.spawn(spec, name=name)
        cluster.claiming(name, ref.id, type_name)
        return ref, PlacementRecord(type_name, pinned)

    async def _claim(
        self,
        name: str,
        agent_id: uuid.UUID,
        record: PlacementRecord,
        replaces: tuple[str, uuid.UUID] | None,
    ) -> bool:
        """asyncio side: claim ``name`` in the names bucket for ``agent_id``, just spawned
        here (see ``Cluster.claim_name``: first writer wins). :class:`NameTaken` naming
        the holder's node if another node this one hears holds it: the caller stops the
        copy (:meth:`_stop_refused`) and writes no record (the holder's stays). False if
        the bucket did not take the claim: the caller writes no record yet either (see
        :data:`_NAME_UNWRITTEN`), and the name is not noted as this node's: a holder this
        node knows stays where the name routes, and the copy is checked against it once
        held (see :meth:`_record_unwritten`). Noted so, it hid that holder: the copy ran
        on, a duplicate, until a names retry read the holder's entry from the bucket."""
        cluster = self._cluster
        named = await cluster.claim_name(name, agent_id, replaces=replaces)
        self.records[name] = record
        # (not while stopped meanwhile: its entry was dropped)
        if named and self._running(name, agent_id):
            cluster.learn_name(name, cluster.node, agent_id)
        return named

    async def _stop_refused(self, agent_id: uuid.UUID) -> None:
        """Stop the copy whose name another node held first (queued messages, if any,
        are dead-lettered ``agent_stopped`` with the reason)."""
        with contextlib.suppress(AgentNotFound, KernelShuttingDown):
            await self._cluster.kernel.stop(agent_id, reason=REFUSED_REASON)

    async def _on_place_request(self, m: NatsMsg) -> None:
        """asyncio side: another node asks this one to run an agent.

        NATS hands a subscription's messages to this callback one after another, so it
        only reads the request and starts a task for it (up to :data:`_kvops.WINDOW`
        write their records at once, each name's in the order asked): awaited here, each
        record's write held back every later request (10,000 agents placed over three
        nodes: about 650 a second)."""
        try:
            obj = wire.read_wire_json(m.data, "place request")
            type_name, name = str(obj["type"]), check_agent_name(obj["name"])
            pinned = obj.get("pinned")
            replaces = _decode_replaces(obj.get("replaces"))
            replaced_from = _decode_replaced_from(obj.get("replaced_from"))
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            await m.respond(json.dumps({"error": "malformed", "text": repr(exc)}).encode())
            return
        if self._cluster.closing:
            text = f"node {self._cluster.node!r} is leaving the cluster"
            await m.respond(json.dumps({"error": "failed", "text": text}).encode())
            return
        before = self._placing.get(name)
        task = asyncio.ensure_future(
            self._place_requested(m, type_name, name, pinned, replaces, before, replaced_from)
        )
        self._placing[name] = task
        self._requests.add(task)
        task.add_done_callback(functools.partial(self._placed_requested, name))

    def _placed_requested(self, name: str, task: asyncio.Future[None]) -> None:
        self._requests.discard(task)
        if self._placing.get(name) is task:
            del self._placing[name]

    async def _place_requested(
        self,
        m: NatsMsg,
        type_name: str,
        name: str,
        pinned: object,
        replaces: tuple[str, uuid.UUID] | None,
        before: asyncio.Future[None] | None,
        replaced_from: str | None = None,
    ) -> None:
        """One request of :meth:`_on_place_request`, once ``before`` (the one asked
        before it for the same name) is over; ``replaced_from``: the lost node whose
        agent it re-places (see :meth:`owners_changed`)."""
        if before is not None:
            await asyncio.wait([before])
        try:
            # Spawned here, on the asyncio side of the same thread: kernel.spawn does not
            # wait, and the name and record are written with the asyncio KV client
            # directly.
            pin = None if pinned is None else str(pinned)
            ref, record = self._spawn_local(type_name, name, pin)
            try:
                named = await self._claim(name, ref.id, record, replaces)
            except NameTaken:
                assert self._nursery is not None
                self._nursery.start_soon(self._stop_refused, ref.id)
                raise
        except UnknownAgentType as exc:
            answer: dict[str, Any] = {
                "error": "unknown_type",
                "type": exc.type_name,
                "node": exc.node,
            }
        except NameTaken as exc:
            holder_node = self._cluster.node if exc.node is None else exc.node
            answer = {"error": "name_taken", "holder": str(exc.holder), "node": holder_node}
        except Exception as exc:
            text = f"agent {name!r} not started: {type(exc).__name__}: {exc}"
            answer = {"error": "failed", "text": text}
        else:
            # The agent runs: the answer says so, whatever becomes of its record.
            if replaced_from is not None:
                self._note_replaced(name, ref.id, replaced_from)
            if named:
                await self._record_requested(name, ref.id, record)
            elif self._kv is not None:
                self._record_unwritten(name, ref.id, record, _NAME_UNWRITTEN)
            answer = {"node": self._cluster.node, "id": str(ref.id)}
            if not named:  # (its claim failed: the asker keeps a holder it hears)
                answer["named"] = False
        try:
            await m.respond(json.dumps(answer).encode())
        except Exception as exc:  # the connection closed meanwhile: the asker times out
            log_guarded(
                log,
                logging.WARNING,
                "node %s: could not answer the request to place %r: %r",
                self._cluster.node,
                name,
                exc,
            )

    async def _record_requested(
        self, name: str, agent_id: uuid.UUID, record: PlacementRecord
    ) -> None:
        """asyncio side: write the record of ``agent_id``, just spawned here as ``name``
        for another node (see :meth:`_hold`, its trio side). Never raises: the agent
        runs, and its asker is told so; a record not written is retried, one not dropped
        is logged, as anywhere else."""
        kv = self._kv
        if kv is None:
            return
        try:
            async with self._writing:
                revision = await kv.put(wire.name_key(name), record.encode(agent_id))
        except Exception as exc:  # the bucket unreachable: the agent runs
            self._record_unwritten(name, agent_id, record, exc)
            return
        if not self._cluster.closing and self._running(name, agent_id):
            self._now_held(name, agent_id, revision)
            return
        # its leave dropped the records already, or the agent stopped for good while its
        # record was written (see _hold)
        try:
            await kv.delete(wire.name_key(name), last=revision)
        except nats.js.errors.BadRequestError:
            pass  # changed since: another incarnation's record
        except Exception as exc:
            self._not_dropped(name, exc)

    async def _requests_answered(self) -> None:
        """asyncio side: until the placement requests under way are answered."""
        while self._requests:
            await asyncio.wait(list(self._requests))

    async def rebalance(self, *, timeout: float = DEFAULT_PLACE_TIMEOUT) -> list[str]:
        """Move this node's hash-placed agents that another live member now wins (it
        joined since) to that member; return their names.

        Restart semantics, as for a lost node: the agent here is stopped (what is still
        queued for it is dead-lettered ``agent_stopped``, as for any stop) and a fresh
        one starts on the new owner. Pinned agents stay. Not automatic: moving agents
        costs their state, so the operator (or the app) decides when. Up to
        :data:`_kvops.WINDOW` agents move at once (each one placed there, then stopped
        here). If a new owner refuses an agent or does not answer, it runs on here and
        the owner's error is raised once the moves under way have ended (no agent is
        moved after it). Once this node is leaving the cluster (or its kernel shutting
        down) no move starts (its agents stop with it: a clean leave); the leave drops the
        records of those under way, as of any agent of the node, unless the new owner's
        replaced them.
        """
        cluster = self._cluster
        if self._leaving():
            return []  # its agents stop with it (a clean leave): none is moved
        live = cluster.live_nodes()
        to_move: list[tuple[str, str]] = []
        for name in self._held:
            record = self.records.get(name)
            if record is None or record.pinned is not None:
                continue
            owners = self._owners(live, record.type_name)
            if not owners:
                continue  # (this node runs it: its type was registered here)
            owner = rendezvous_owner(name, owners)
            if owner != cluster.node:
                to_move.append((name, owner))
        moved: set[str] = set()
        errors: list[Exception] = []
        window = trio.Semaphore(kvops.WINDOW)

        async def move(name: str, owner: str) -> None:
            try:
                if await self._move(name, owner, timeout):
                    moved.add(name)
            except Exception as exc:
                errors.append(exc)
            finally:
                window.release()

        async with trio.open_nursery() as nursery:
            for name, owner in to_move:
                await window.acquire()
                if errors or self._leaving():  # (no new move, see _move)
                    window.release()
                    break
                nursery.start_soon(move, name, owner)
        if errors:
            raise errors[0]
        return [name for name, _ in to_move if name in moved]

    async def _move(self, name: str, owner: str, timeout: float) -> bool:
        """One agent of :meth:`rebalance`: False if it stopped (or moved) meanwhile.

        Placed on ``owner`` first, stopped here once placed: this node killed in between
        leaves the agent running here (re-placed with this node) or there (the name's
        holder now), never nowhere, as stopping it and dropping its record before the
        request did. The owner's record replaces this node's (the same type, no pin)."""
        cluster = self._cluster
        held = self._held.get(name)
        record = self.records.get(name)
        if held is None or record is None or self._leaving():
            return False
        agent_id = held[0]
        # (in _moving while asked, not _held: the owner's name heard before the answer
        # does not stop it as a duplicate; a clean leave meanwhile drops its record, as
        # its stop for good does, see agent_stopped)
        del self._held[name]
        self._moving[name] = (held, self._unwritten.pop(name, None))
        try:
            await self._ask(owner, record.type_name, name, None, timeout, (cluster.node, agent_id))
        except BaseException:
            # Refused, no answer, or the rebalance cancelled (trio.Cancelled: nothing may
            # await here): it runs on here, untouched (an owner that spawned it but whose
            # answer was lost has the newer copy: this one is stopped as a duplicate once
            # its name is heard).
            self._move_undone(name, agent_id)
            raise
        self._moving.pop(name, None)  # (its stop below is the move's: no record to drop)
        with contextlib.suppress(AgentNotFound):
            await cluster.kernel.stop(agent_id)
        log_guarded(
            log,
            logging.INFO,
            "node %s: agent %r moved to node %s (rebalanced)",
            cluster.node,
            name,
            owner,
        )
        return True

    def _leaving(self) -> bool:
        """This node leaves the cluster (or its kernel shuts down): a clean leave."""
        return self._cluster.closing or self._cluster.kernel.shutting_down

    def _move_undone(self, name: str, agent_id: uuid.UUID) -> None:
        """The move of ``agent_id`` (placed ``name``) failed or was cancelled: held here
        again if it still runs (a clean leave under way drops its record then). One that
        stopped for good meanwhile stays in ``_moving`` until its STOPPED event, or the
        leave, drops its record (see :meth:`agent_stopped`); one the leave took out of
        ``_moving`` has its record dropped already, and runs on until its kernel stops
        it, as any agent of a node that left."""
        moving = self._moving.get(name)
        if moving is None or moving[0][0] != agent_id:
            return
        if not self._running(name, agent_id) or name in self._held:
            return
        del self._moving[name]
        held, unwritten = moving
        self._held[name] = held
        if unwritten is not None:
            self._unwritten[name] = unwritten
        if self._nursery is not None and not self._leaving():
            self._nursery.start_soon(self._name_after_undone, name, agent_id)

    async def _name_after_undone(self, name: str, agent_id: uuid.UUID) -> None:
        """The move of ``agent_id`` (placed ``name``) failed, its copy held here again
        (see :meth:`_move_undone`), but the new owner may have claimed the name (and
        written its record) before its answer failed to come. Its copy there, if its node
        is heard, is the newer one: this one is stopped as a duplicate (see
        ``Cluster.check_duplicate``), as the move's doc says. If that node is not heard
        (SIGKILLed after its claim, judged lost), the copy here is the one that runs:
        its name and record are claimed back for it. Left, the name routed to the dead
        node for good, and its loss re-placed nothing (the survivors' owner of it was
        this node, which runs it: it is no lost node's to re-place here). Two claims at
        once (a survivor re-placing it) end as any: the first writer wins, the other copy
        is stopped."""
        cluster = self._cluster
        held = self._held.get(name)
        record = self.records.get(name)
        if (
            self._leaving()
            or held is None
            or held[0] != agent_id
            or record is None
            or cluster.holds_name(name, agent_id)
        ):
            return
        entry = cluster.name_entry(name)
        if entry is not None and entry[0] != cluster.node and entry[0] in cluster.live_nodes():
            cluster.check_duplicate(name)
            return
        try:
            named = await call_aio(self._claim, name, agent_id, record, None)
        except NameTaken:
            cluster.check_duplicate(name)  # (a survivor re-placed it first: it wins)
            return
        except (nats.errors.Error, TransportUnavailable) as exc:
            # (its leave closed the connection, or the bucket failing: the names retry
            # writes it, see Cluster.claim_name)
            log_guarded(
                log,
                logging.WARNING,
                "node %s: the name of %r (%s), whose move failed, not claimed back: %r",
                cluster.node,
                name,
                agent_id,
                exc,
            )
            return
        log_guarded(
            log,
            logging.WARNING,
            "node %s: agent %r (%s) runs here after all: its move to node %s failed after"
            " that node claimed its name; name and record claimed back",
            cluster.node,
            name,
            agent_id,
            "?" if entry is None else entry[0],
        )
        await self._write_record(name, agent_id, record, named)

    # --- records ----------------------------------------------------------------------------

    def _apply_record(self, key: str, value: bytes | None, op: str | None) -> None:
        try:
            name = wire.name_from_key(key)
        except ValueError as exc:
            # not a key this code writes (the watch of the bucket would end with it)
            self.records_refused.refuse(self._cluster.node, key, str(exc))
            return
        self._unrecorded.discard(name)
        if op in ("DEL", "PURGE") or not value:
            # (stopped for good: its name's entry, if its delete did not land, is no
            # claim to re-place; the entry of a later claim, heard first, is)
            dropped = self.records.pop(name, None)
            self._cluster.record_dropped(name, None if dropped is None else dropped.agent_id)
            self._waiting.pop(name, None)
            return
        try:
            self.records[name] = PlacementRecord.decode(value)
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            self.records_refused.refuse(self._cluster.node, key, "not a placement record")

    async def agent_stopped(self, name: str, agent_id: uuid.UUID) -> None:
        """A placed agent of this node stopped for good: drop its record (it is not
        re-placed if this node is lost later), also while a rebalance moves it (only if it
        is still this node's: the new owner's record is kept). A second call for the
        agent while its drop is under way (a second ``kernel.stop`` of it, or one from
        inside it) returns once that drop landed (or failed): returning at once, its
        stop began with the record still in the bucket, and a SIGKILL then had the
        stopped agent re-placed."""
        dropping = self._dropping.get(name)
        if dropping is not None and dropping[0] == agent_id:
            await dropping[1].wait()
            return
        held = self._held.get(name)
        if held is not None and held[0] == agent_id:
            del self._held[name]
            self._unwritten.pop(name, None)
            self.records.pop(name, None)
        else:
            # one a rebalance is moving: this node's record only (a compare-and-set: the
            # new owner's, written since, is kept, and the watch says which)
            moving = self._moving.get(name)
            if moving is None or moving[0][0] != agent_id:
                return
            del self._moving[name]
            held = moving[0]
        done = trio.Event()
        self._dropping[name] = (agent_id, done)
        try:
            await self._drop_record(name, held[1])
        finally:
            done.set()
            if self._dropping.get(name) == (agent_id, done):
                del self._dropping[name]

    async def _drop_record(self, name: str, revision: int | None) -> None:
        """Drop ``name``'s record (see _delete_record); one the bucket refuses (the KV
        down) stays, logged: the node goes on."""
        try:
            await self._delete_record(name, revision)
        except Exception as exc:
            self._not_dropped(name, exc)

    def _not_dropped(self, name: str, exc: Exception) -> None:
        self._records_not_dropped([(name, exc)])

    def _records_not_dropped(self, failed: Sequence[tuple[str, Exception]]) -> None:
        kvops.say_not_dropped(self._cluster.node, "placement record", failed)

    async def _delete_record(self, name: str, revision: int | None) -> None:
        kv = self._kv
        if kv is None or revision is None:
            return  # None: its write failed (nothing of this node's to drop)
        try:
            # Only if nobody re-placed the name since (optimistic concurrency).
            await call_aio(kv.delete, wire.name_key(name), last=revision)
        except nats.js.errors.BadRequestError as exc:
            log_guarded(
                log,
                logging.DEBUG,
                "node %s: record %r changed since: %r",
                self._cluster.node,
                name,
                exc,
            )

    # --- a member lost --------------------------------------------------------------------------

    def node_lost(self, info: NodeInfo) -> None:
        """Re-place what ``info``'s node held, and count what was lost with it.

        Counted (``lost_with_nodes``, in ``ClusterStats``): the tells this node sent to
        the lost one that it had not confirmed receiving in its last heartbeat (each
        heartbeat carries the last sequence number received from every sender), and,
        on exactly one survivor (the rendezvous owner of ``loss:<node>``), the messages
        the lost node still held at that heartbeat (in its mailboxes, in handlers,
        waiting for room). An upper bound: what the lost node finished after its last
        heartbeat is counted too (at most one heartbeat interval's worth).

        The survivor designated for a node lost earlier (to re-place an agent, or to
        count what it held) may be this one: what it had to do falls to the owner over
        the survivors now (see :meth:`to_replace`, :meth:`_count_held`).
        """
        cluster = self._cluster
        survivors = [n for n in cluster.live_nodes() if n != info.node]
        confirmed = info.confirmed(cluster.stream_name)
        sent = cluster.tells_sent_to(info.node, info.id_prefix)
        unconfirmed = max(0, sent - confirmed)
        members = {i.node for i in cluster.member_list()}
        for node in [n for n in self._loss_counts if n not in members]:
            del self._loss_counts[node]  # (forgotten: bounded by the members)
        earlier_loss = self._loss_counts.pop(info.node, None)
        if earlier_loss is not None and earlier_loss.same_process(info):
            # lost again: what the earlier loss still counted is past what it confirmed,
            # so in the count below (counted once)
            self._take_back_confirmed(earlier_loss, info)
            self._count_lost(info.node, earlier_loss.taken - earlier_loss.unconfirmed)
        self._loss_counts[info.node] = _LossCount(
            info.id_prefix,
            info.session,
            confirmed,
            unconfirmed,
            held=self._held_before_loss.pop((info.node, info.id_prefix), 0),
        )
        if unconfirmed:
            self._count_lost(info.node, unconfirmed)
            log_guarded(
                log,
                logging.WARNING,
                "node %s: counted %d messages as lost with node %r (sent by this node and"
                " not confirmed received at its last heartbeat)",
                cluster.node,
                unconfirmed,
                info.node,
            )
        earlier = self._lost_earlier(info.node)
        if survivors:
            if info.types is None:
                self._untyped_names_lost(info.node)
            if rendezvous_owner(f"loss:{info.node}", survivors) == cluster.node:
                self._count_held(info)
            if earlier and cluster.node in survivors:
                own = cluster.node
                for other in earlier:
                    # its counter was the node just lost (the owner over the survivors
                    # and it), and this node is the owner over the survivors: the lost
                    # node's weight beats this node's, which beats every survivor's.
                    # (Cheapest test first, and the survivors only until one beats this
                    # node: two owners over every survivor for each node lost before
                    # made a loss cost O(lost x survivors), a flood of fake members
                    # judged lost O(n^3): 71 of 5,000 fakes took 67 s of CPU.)
                    key = f"loss:{other.node}"
                    mine = (placement_weight(own, key), own)
                    if (placement_weight(info.node, key), info.node) > mine and all(
                        (placement_weight(node, key), node) < mine
                        for node in survivors
                        if node != own
                    ):
                        self._count_held(other)
        if (
            not survivors
            or cluster.kernel.shutting_down
            or cluster.closing
            or self._nursery is None
        ):
            return  # leaving: this node's agents are not to be re-placed, nor re-placed here
        gone = [info.node, *(other.node for other in earlier)]
        self._start_replacing(self.to_replace(gone, survivors), info.node)

    def _untyped_names_lost(self, node: str) -> None:
        """Lost ``node`` is a kernel of an earlier version (its membership record names no
        agent types): its names-bucket entries name no type, so a name of it with no
        placement record is not re-placed. It may be a plain ``kernel.spawn`` name, or a
        placed agent it claimed and did not record (SIGKILLed between the two): the two
        cannot be told apart. Such names go on routing to ``node`` (each send refused at
        once) until it is forgotten (``forget_lost_after``); counted here
        (``untyped_names_lost``) and said in one warning, not left silent."""
        cluster = self._cluster
        names = sorted(
            name
            for name in cluster.names_held_on([node])
            if name not in self.records and cluster.placed_type(name) is None
        )
        if not names:
            return
        self.untyped_names_lost += len(names)
        shown = ", ".join(repr(name) for name in names[:_NAMES_SHOWN])
        more = len(names) - _NAMES_SHOWN
        log_guarded(
            log,
            logging.WARNING,
            "node %s: node %r, of an earlier version (its names entries name no agent"
            " type), was lost with %d name(s) that have no placement record: %s%s; not"
            " re-placed (plain kernel.spawn names, or placements it claimed and never"
            " recorded, which cannot be told apart): sends to them are refused until"
            " it is forgotten (forget_lost_after)",
            cluster.node,
            node,
            len(names),
            shown,
            f" and {more} more" if more > 0 else "",
        )

    def member_left(self, node: str) -> None:
        """``node`` left the cluster cleanly: its agents are not re-placed, but it may have
        been the survivor designated to re-place agents of nodes lost earlier and not
        have done it; those whose owner over the members left is this node are."""
        cluster = self._cluster
        if cluster.kernel.shutting_down or cluster.closing or self._nursery is None:
            return
        earlier = [other.node for other in self._lost_earlier(node)]
        if earlier:
            self._start_replacing(self.to_replace(earlier, cluster.live_nodes()), node)

    def _lost_earlier(self, node: str) -> list[NodeInfo]:
        """The members lost before (unreachable, not forgotten), but ``node``."""
        own = self._cluster.node
        return [
            i
            for i in self._cluster.member_list()
            if not i.reachable and i.node != node and i.node != own
        ]

    def _count_held(self, info: NodeInfo) -> None:
        """Count what ``info``'s node held at its last heartbeat (once per process)."""
        key = (info.node, info.id_prefix)
        if key in self._counted:
            return
        live = {(i.node, i.id_prefix) for i in self._cluster.member_list()}
        self._counted.intersection_update(live)  # forgotten nodes: bounded
        self._counted.add(key)
        held = info.count("in_flight") + info.count("held")
        loss = self._loss_counts.get(info.node)
        if loss is not None and loss.same_process(info):
            loss.held = held  # (taken back if it is heard again)
        elif held:
            # a member lost earlier whose own loss is not judged here yet: lost in the
            # same check as the node just judged (``Members.newly_lost`` marks every
            # silent member unreachable before each is judged), which owned its count.
            # Its loss, judged next, keeps this to take it back if it is heard again:
            # before, nothing did, and what it held was counted both there and here
            for gone in [k for k in self._held_before_loss if k not in live]:
                del self._held_before_loss[gone]  # (forgotten: bounded by the members)
            self._held_before_loss[key] = held
        if held:
            self._count_lost(info.node, held)
            log_guarded(
                log,
                logging.WARNING,
                "node %s: counted %d messages as lost with node %r (held there at its last"
                " heartbeat)",
                self._cluster.node,
                held,
                info.node,
            )

    def _count_lost(self, node: str, count: int) -> None:
        """Count ``count`` messages lost with ``node`` (negative: taken back), in all and
        per node."""
        self.lost_with_nodes += count
        per_node = self._lost_with
        if per_node is None:
            return
        now = per_node.get(node, 0) + count
        if now:
            per_node[node] = now
        else:
            per_node.pop(node, None)
        if len(per_node) > LOST_WITH_NODES_MAX:
            self._lost_with = None  # (a node under a new name at every restart: bounded)

    @property
    def lost_with_node(self) -> dict[str, int] | None:
        """``lost_with_nodes`` per node it counts lost with (their sum; nodes whose count
        is back to 0 left out), also nodes forgotten since; None once more than
        :data:`LOST_WITH_NODES_MAX` nodes had a count at once (then only the sum is
        kept). By it the parent of ``nexus run --workers`` replaces this estimate of a
        worker by that worker's own books (see ``_cluster_cmd.aggregate_summaries``)."""
        return None if self._lost_with is None else dict(self._lost_with)

    def heard_from(self, info: NodeInfo) -> None:
        """A record of ``info``'s node was heard: if this node counted messages lost with
        it and it is the same process (a freeze, a partition: not a restart), what it
        took after all is taken back out of ``lost_with_nodes``: the tells it confirms
        now past what it had confirmed at its loss (it handled them, or counted them
        lost in transit itself), and what it held then (it still holds it: its own
        books count it), so that nothing is counted both handled there and lost here.
        What it never confirms stays counted."""
        if not self._loss_counts:
            return
        loss = self._loss_counts.get(info.node)
        if loss is None or not info.reachable:
            return
        if not loss.same_process(info):
            del self._loss_counts[info.node]  # a new process: the old one's are lost
            return
        self._take_back_confirmed(loss, info)
        if loss.held:
            back, loss.held = loss.held, 0
            self._count_lost(info.node, -back)
            self.lost_with_nodes_taken_back += back
            self._counted.discard((info.node, info.id_prefix))  # (a new loss counts again)
            self._log_taken_back(info.node, back, "held there")
        if loss.taken >= loss.unconfirmed:
            del self._loss_counts[info.node]

    def _take_back_confirmed(self, loss: _LossCount, info: NodeInfo) -> None:
        taken = min(
            loss.unconfirmed, max(0, info.confirmed(self._cluster.stream_name) - loss.confirmed)
        )
        if taken > loss.taken:
            back, loss.taken = taken - loss.taken, taken
            self._count_lost(info.node, -back)
            self.lost_with_nodes_taken_back += back
            self._log_taken_back(info.node, back, "sent by this node")

    def _log_taken_back(self, node: str, count: int, what: str) -> None:
        log_guarded(
            log,
            logging.WARNING,
            "node %s: node %r is heard again and took %d messages counted as lost with it"
            " (%s): no longer counted lost",
            self._cluster.node,
            node,
            count,
            what,
        )

    def _start_replacing(self, names: list[str], lost: str) -> None:
        assert self._nursery is not None
        for name in names:
            holder = self._cluster.name_holder(name)
            self._replacing.add(name)
            from_node = lost if holder is None else holder[0]
            self._nursery.start_soon(self._replace, name, self.records[name], from_node)

    def to_replace(self, lost: str | Iterable[str], survivors: Sequence[str]) -> list[str]:
        """The placed agents of node(s) ``lost`` that this node re-spawns: those whose
        rendezvous owner over ``survivors`` it is (each survivor gets the same answer),
        but for those it is re-placing already."""
        cluster = self._cluster
        gone = {lost} if isinstance(lost, str) else set(lost)
        self._claimed_unrecorded(gone)
        owners: dict[str, list[str]] = {}  # by type
        mine = []
        for name, record in self.records.items():
            if name in self._replacing:
                continue
            holder = cluster.name_holder(name)
            if holder is None or holder[0] not in gone:
                continue
            type_name = record.type_name
            of_type = owners.get(type_name)
            if of_type is None:
                of_type = owners[type_name] = self._owners(survivors, type_name)
            if not of_type:
                self._wait(name, record, holder[0])
            elif rendezvous_owner(name, of_type) == cluster.node:
                mine.append(name)
        return mine

    def _claimed_unrecorded(self, gone: set[str]) -> None:
        """The names that node(s) ``gone`` claimed for a placed agent and wrote no record
        of (lost between the two: SIGKILLed there) are re-placed as recorded ones: a
        record of the type their names-bucket entry names (see ``Cluster.placed_type``)
        is noted here, as the record the lost node would have written. Left, their
        entries routed the names to the lost node until it was forgotten
        (``forget_lost_after``, 300 s): every send to them failed meanwhile."""
        cluster = self._cluster
        for name in cluster.names_held_on(gone):
            if name in self.records:
                continue
            type_name = cluster.placed_type(name)
            holder = cluster.name_holder(name)
            if type_name is not None and holder is not None:
                self.records[name] = PlacementRecord(type_name, None, holder[1])
                self._unrecorded.add(name)

    def _wait(self, name: str, record: PlacementRecord, lost: str) -> None:
        """No reachable member can run ``name``'s type: its record is kept, and it is
        re-placed once one can (see :meth:`owners_changed`); counted meanwhile in
        ``placements_waiting``, and said once."""
        if name in self._waiting:
            return
        self._waiting[name] = lost
        log_guarded(
            log,
            logging.WARNING,
            "node %s: %r (type %r) of node %s not re-placed yet: no reachable member runs"
            " the type; its record is kept, and it is re-placed once a member that runs it"
            " is heard",
            self._cluster.node,
            name,
            record.type_name,
            lost,
        )

    async def _adopt_orphans(self) -> None:
        """Once this node joined, after one loss window (the records, names and members
        replayed; a stop or a leave under way at the join settled), count as waiting,
        and re-place once a member that runs their type is heard (see
        :meth:`owners_changed`), the placed agents whose name entry names a node that
        is no member (lost before this node joined: its membership record expired) or
        an earlier process of a member (restarted under its name since). The survivors
        of their loss count them (see :meth:`_wait`); this node, which joined after it,
        knew nothing of them: once those survivors had left too, a member that runs the
        type came, and nobody re-placed them. A node this one knows as lost is not
        looked at: its loss here re-placed them or made them wait (see
        :meth:`node_lost`). A record with no name entry is not either: it may be
        anyone's on the account (a record no kernel placed). (The name entry of one
        waiting is kept when its node is forgotten, see :meth:`waits`.)"""
        cluster = self._cluster
        await trio.sleep(cluster.members.lost_after)
        if self._leaving():
            return
        adopted = []
        for name in list(self.records):
            holder = cluster.name_holder(name)
            if holder is None or name in self._waiting or name in self._replacing:
                continue
            node, agent_id = holder
            if node == cluster.node:
                if cluster.kernel.is_local(agent_id) or name in self._held:
                    continue
            else:
                info = cluster.members.members.get(node)
                if info is not None and (
                    not info.reachable or info.id_prefix == agent_id.int >> 64
                ):
                    continue  # it runs there, or it is that loss's to place
            self._waiting[name] = node
            adopted.append(name)
        if adopted:
            log_guarded(
                log,
                logging.WARNING,
                "node %s: %s placed agents run nowhere it knows (their node lost before it"
                " joined, or restarted since): %s; counted in placements_waiting, each"
                " re-placed once a member that runs its type is heard",
                cluster.node,
                len(adopted),
                first_few(adopted),
            )
            self.owners_changed()

    @property
    def placements_waiting(self) -> int:
        """Placed agents of lost nodes that no reachable member can run (none has their
        type registered): their records are kept until one can."""
        return len(self._waiting)

    def waits(self, name: str) -> bool:
        """Whether placed agent ``name`` waits here for a member that runs its type (see
        :meth:`_wait`): its name entry, which names its lost node, is kept when that node
        is forgotten, so that a node joining later (once the survivors that count it
        left) adopts it (see :meth:`_adopt_orphans`)."""
        return name in self._waiting

    def owners_changed(self) -> None:
        """A member was heard that may run types the others do not (it joined, came
        back, or registered a type; or this node registered one): each placed agent
        waiting for a member that runs its type (see :meth:`_wait`) goes to the
        rendezvous owner over the reachable members that do, as a re-placement. Its
        owner re-places it, also asked by the other nodes where it waits (a member that
        joined after the loss does not know of it; the second ask finds the name taken)."""
        cluster = self._cluster
        if not self._waiting or self._nursery is None or self._leaving():
            return
        live = cluster.live_nodes()
        for name, lost in list(self._waiting.items()):
            record = self.records.get(name)
            holder = cluster.name_holder(name)
            if record is None or (holder is not None and self._runs_live(*holder)):
                del self._waiting[name]  # stopped (its record dropped), or placed since
                continue
            owners = self._owners(live, record.type_name)
            if not owners or name in self._replacing:
                continue
            del self._waiting[name]
            self._replacing.add(name)
            owner = rendezvous_owner(name, owners)
            if owner == cluster.node:
                self._nursery.start_soon(self._replace, name, record, lost)
            else:
                self._nursery.start_soon(self._replace_on, owner, name, record, lost)

    def _runs_live(self, node: str, agent_id: uuid.UUID) -> bool:
        """Whether ``agent_id`` is an agent of the current process of ``node``, a
        reachable member (not of an earlier process of its name)."""
        if node == self._cluster.node:
            return self._cluster.kernel.is_local(agent_id)
        info = self._cluster.members.node_of(agent_id)
        return info is not None and info.node == node and info.reachable

    async def _replace_on(self, owner: str, name: str, record: PlacementRecord, lost: str) -> None:
        """Ask ``owner`` to re-place ``name`` of the lost node ``lost`` (see
        :meth:`owners_changed`). Found taken, it is placed (by this ask or another's);
        an ask that fails leaves it waiting, as it was, and logged."""
        try:
            await self._ask(
                owner,
                record.type_name,
                name,
                record.pinned,
                DEFAULT_PLACE_TIMEOUT,
                replaced_from=lost,
            )
        except NameTaken:
            pass
        except KernelShuttingDown:
            return
        except Exception as exc:
            log_guarded(
                log,
                logging.WARNING,
                "node %s: node %s did not re-place %r (type %r) of node %s: %s",
                self._cluster.node,
                owner,
                name,
                record.type_name,
                lost,
                exc,
            )
            if not self._leaving() and name in self.records:
                self._waiting.setdefault(name, lost)
        finally:
            self._replacing.discard(name)

    async def _replace(self, name: str, record: PlacementRecord, lost: str) -> None:
        try:
            if self._cluster.closing or not await self._still_placed(name):
                return
            stopping = self._stopping.get(name)
            if stopping is not None:
                # This node's copy lost to the incarnation on the node lost now, and is
                # still stopping: it holds the name in the kernel until it is gone.
                await stopping.wait()
                if self._cluster.closing:
                    return
            await self._spawn_here(record.type_name, name, record.pinned, replaced_from=lost)
        except (KernelShuttingDown, TransportUnavailable):
            return
        except NameTaken as exc:
            log_guarded(
                log,
                logging.INFO,
                "node %s: %r not re-placed from node %s: %s",
                self._cluster.node,
                name,
                lost,
                exc,
            )
        except Exception as exc:
            log_guarded(
                log,
                logging.ERROR,
                "node %s: could not re-place %r (type %r) from node %s: %s",
                self._cluster.node,
                name,
                record.type_name,
                lost,
                exc,
            )
        finally:
            self._replacing.discard(name)

    async def _still_placed(self, name: str) -> bool:
        """Whether ``name``'s record is still in the placed bucket (its holder may have
        left cleanly since, dropping it, before the watch brought that here)."""
        kv = self._kv
        if kv is None:
            return True
        try:
            await call_aio(kv.get, wire.name_key(name))
        except nats.js.errors.KeyNotFoundError:
            if name in self._unrecorded and self._cluster.placed_type(name) is not None:
                return True  # claimed by its lost node, no record written: still its entry
            log_guarded(
                log,
                logging.INFO,
                "node %s: %r not re-placed: its record is gone",
                self._cluster.node,
                name,
            )
            return False
        except Exception as exc:  # the KV unavailable: the put decides
            log_guarded(
                log,
                logging.DEBUG,
                "node %s: could not read record %r: %r",
                self._cluster.node,
                name,
                exc,
            )
        return True

    # --- two incarnations of a name ------------------------------------------------------------

    def superseded(self, name: str, agent_id: uuid.UUID, winner: str) -> bool:
        """The names bucket holds a later incarnation of ``name``, on node ``winner``,
        than ``agent_id``, this node's copy (two copies after a partition healed: see
        ``Cluster.check_duplicate``): stop this one, with the reason
        :data:`DUPLICATE_REASON` (its ``stopped`` event; what was queued for it is
        dead-lettered ``agent_stopped`` with that reason in the detail). Only a placed
        agent of this node (one with its record held here); its record is not dropped:
        the winner's agent has the same record, re-placed if its node is lost later.
        False if ``agent_id`` is no placed agent of this node (a plain ``kernel.spawn``
        name: the caller says so), True otherwise."""
        cluster = self._cluster
        held = self._held.get(name)
        if held is None or held[0] != agent_id:
            # a copy a rebalance is moving: decided once the move is answered (stopped
            # here then, or checked again if the move failed, see _name_after_undone)
            moving = self._moving.get(name)
            return moving is not None and moving[0][0] == agent_id
        if self._nursery is None or cluster.closing or cluster.kernel.shutting_down:
            return True  # its leave drops the record and the name
        del self._held[name]
        self._unwritten.pop(name, None)
        self.duplicates_stopped += 1
        log_guarded(
            log,
            logging.WARNING,
            "node %s: agent %r (%s) stopped: %s (the names bucket holds a later"
            " incarnation of it, on node %s)",
            cluster.node,
            name,
            agent_id,
            DUPLICATE_REASON,
            winner,
        )
        gone = self._stopping[name] = trio.Event()
        self._nursery.start_soon(self._stop_duplicate, name, agent_id, gone)
        return True

    async def _stop_duplicate(self, name: str, agent_id: uuid.UUID, gone: trio.Event) -> None:
        try:
            with contextlib.suppress(AgentNotFound, KernelShuttingDown):
                await self._cluster.kernel.stop(agent_id, reason=DUPLICATE_REASON)
        finally:
            if self._stopping.get(name) is gone:
                del self._stopping[name]
            gone.set()

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self, nursery: trio.Nursery, kv: KeyValue) -> None:
        """Load the records, watch them, and answer placement requests for this node."""
        self._nursery = nursery
        self._kv = kv
        cluster = self._cluster
        await nursery.start(cluster.watch_bucket, kv, self._apply_record)
        nursery.start_soon(self._adopt_orphans)

        async def subscribe() -> None:
            await cluster.control.subscribe(self._subject, cb=self._on_place_request)
            await flush_after_subscribe(cluster.control)

        await call_aio(subscribe)

    async def leave(self) -> None:
        """A clean leave: this node's agents are not to be re-placed; drop its records.

        Called once the cluster is closing: a record written after that is dropped by its
        writer (see :meth:`_hold`), one written before is in ``_held`` by now (the
        requests of other nodes under way are answered first)."""
        await call_aio(self._requests_answered)
        self._unwritten.clear()
        held, self._held = self._held, {}
        # The agents a rebalance is moving: their records too, each only if it is still
        # this node's (a compare-and-set: the new owner's, written already, is kept).
        held.update({name: entry for name, (entry, _) in self._moving.items()})
        self._moving.clear()
        kv = self._kv
        if kv is None:
            return
        # (a write whose answer is lost is None: nothing of this node's to drop)
        dropped = [(name, revision) for name, (_, revision) in held.items() if revision is not None]
        await kvops.delete_names(kv, dropped, self._records_not_dropped)


def _decode_replaces(moved: object) -> tuple[str, uuid.UUID] | None:
    """A place request's ``replaces``: ``[node, agent id]`` of the copy a rebalance moves
    (or absent). Anything else is a ValueError naming the field (a peer's id that is not
    a string made uuid.UUID raise AttributeError: the request went unanswered)."""
    if moved is None:
        return None
    if (
        isinstance(moved, list)
        and len(moved) == 2
        and isinstance(moved[0], str)
        and isinstance(moved[1], str)
    ):
        try:
            return moved[0], uuid.UUID(moved[1])
        except ValueError:
            pass
    raise ValueError(f"replaces: not [node, agent id]: {moved!r:.200}")


def _decode_replaced_from(node: object) -> str | None:
    """A place request's ``replaced_from``: the name of the lost node whose agent it
    re-places (or absent); anything else is a ValueError naming the field."""
    if node is None or (isinstance(node, str) and wire.is_node_name(node)):
        return node
    raise ValueError(f"replaced_from: not a node name: {node!r:.200}")


def _decode_answer(data: bytes, name: str, owner: str) -> tuple[PlacedAgent, bool]:
    """The owner's answer to a place request, and whether the agent's claim of its name
    was taken (``named``: false if not, absent from an owner of an earlier version). One
    that is no JSON object, or whose field (``holder``, ``node``, ``id``) is no string of
    its kind, is
    :class:`PlacementFailed` naming the field (a peer's ``holder`` or ``id`` that was no
    string made uuid.UUID raise AttributeError out of the placement)."""
    try:
        obj = wire.read_wire_json(data, "place answer")
    except (ValueError, RecursionError):
        obj = None
    if not isinstance(obj, dict):
        raise PlacementFailed(name, owner, f"malformed answer {data[:200]!r}")
    error = obj.get("error")
    if error == "unknown_type":
        raise UnknownAgentType(str(obj.get("type")), str(obj.get("node", owner)))
    if error == "name_taken":
        node = obj.get("node")
        holder = _answer_id(obj, "holder", data, name, owner)
        raise NameTaken(name, holder, node=None if node is None else str(node))
    if error is not None:
        raise PlacementFailed(name, owner, str(obj.get("text", error)))
    node = obj.get("node")
    if not isinstance(node, str) or not node:
        raise PlacementFailed(name, owner, f"malformed answer: node: {data[:200]!r}")
    placed = PlacedAgent(name, node, _answer_id(obj, "id", data, name, owner))
    return placed, obj.get("named") is not False


def _answer_id(obj: dict[str, Any], field: str, data: bytes, name: str, owner: str) -> uuid.UUID:
    """The agent id in field ``field`` of an owner's answer (see :func:`_decode_answer`)."""
    value = obj.get(field)
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return uuid.UUID(value)
    raise PlacementFailed(name, owner, f"malformed answer: {field}: {data[:200]!r}")


#: the most nodes :attr:`Placement.lost_with_node` counts at once (past it, None)
LOST_WITH_NODES_MAX: Final = 4096


@attrs.define
class _LossCount:
    """What a survivor counted in ``lost_with_nodes`` when a node was judged lost."""

    id_prefix: int
    session: int | None
    #: the last of this node's tells the lost one had confirmed at its loss
    confirmed: int
    #: this node's tells past it, counted lost
    unconfirmed: int
    #: of those, the ones taken back since (it confirmed them, heard again)
    taken: int = 0
    #: what it held at its last heartbeat, counted lost here (0: counted elsewhere)
    held: int = 0

    def same_process(self, info: NodeInfo) -> bool:
        return (info.id_prefix, info.session) == (self.id_prefix, self.session)
