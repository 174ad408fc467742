"""One swarm over the workers of ``nexus run --workers N``: layout, start, settle, accounting.

The parent sets ``NEXUS_SWARM_SIZE=N`` in every worker's environment next to
``NEXUS_WORKER=worker-<i>``; a worker that sees both runs the demo workload as a share of
one swarm instead of a copy of its own: agent ``k`` of the workload lives on worker
``k mod N`` (pinned placement), so consecutive ring agents are on different workers and
every ring hop crosses a process. Each worker spawns its share, then waits until it knows
where every agent of the workload runs (the names bucket), then drives its part.

At the end the workers *settle* before any of them shuts down: each one stops its
traffic and publishes its counters in its membership record (:meth:`Cluster.announce`)
until every worker has stopped, holds nothing, and the cluster's books balance — every
message handed to NATS was taken in by a kernel, or counted as dropped or lost — in two
rounds in a row. A worker that settled and left the cluster meanwhile counts with its
last record; one that left without stopping its traffic (its run failed) is counted as
one that died, below.
Only then do the kernels drain and leave: a message still crossing when a worker left
would otherwise be lost without anybody counting it. A worker that has settled still
publishes its final record until every other one has settled too (``swarm_settled`` in
its record), left or been lost (bounded by the same timeout): a record is a core NATS
message, which a slow consumer may drop, and one that left before the others saw its
final books would leave them waiting for it. Each worker's record carries its
books while it settles (:func:`worker_books`), and each worker's summary the books of
every worker it settled with (``settled_books``): final counts, by which the parent
counts a worker that dies after the settle, before it printed its summary.

A stop that comes while the workers start (the parent passed on a SIGTERM) is a graceful
stop too. A worker stopped before it saw every worker join spawns nothing: nothing is ever
sent to it, and it sends nothing. It settles all the same, with the workers it sees only
(a worker it never saw may never join: stopped, not started, dead), so that those which
saw it join, and wait for every worker, count it with its stopped (empty) record. One
stopped while it spawned or resolved the names starts no traffic, and settles with every
worker as after a run. (A worker sends only once it knows where every agent of the
workload runs: if some worker never joined, there was no traffic at all.)

A worker that died (lost: it missed its heartbeats) never stops nor balances: the
others settle without it, once they have seen it lost, when they have stopped, hold
nothing, and their counters were the same two rounds in a row (what went to the dead
worker cannot be told apart in the records from what went to the others, so the books
are not compared here). Each one then reports, per lost worker, the messages it handed
to it and took from it (:func:`cluster_counts`: numbered tells, queries and replies):
the parent's books count the dead worker from outside with them (see
``_cluster_cmd.aggregate_summaries``).

A worker settled without (counted lost) that comes back after, its process thawed or
its connection back, is written off all the same, as Erlang's nodes take a node judged
down that comes back for a new incarnation: the books that settled without it cannot
balance with its own. Each worker lists those it settled without in its record
(``swarm_lost``) and waits for them only until their record says they saw it
(``swarm_written_off_by``), not for them to settle; one that finds itself in a settled
worker's ``swarm_lost`` ends its settle at once and names them in its summary
(``written_off_by``); the parent counts it from outside, as one that died.

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio

from .._agent import AgentRef
from .._errors import TransportUnavailable
from .._logcall import log_guarded
from .._plural import count_of
from .._throttle import Throttle

if TYPE_CHECKING:
    from .._nats import Cluster, ClusterStats, NodeInfo
    from .._nats._watch import ConnectionWatch

log = logging.getLogger("nexus_trio.cli")

#: how long a worker waits for the others to join and for every agent's name
START_TIMEOUT: Final = 120.0
#: how long the workers wait for each other to settle at the end
SETTLE_TIMEOUT: Final = 60.0
#: the default of the seconds a worker at its settle waits for its NATS connection, down
#: (the server gone), to come back before it fails naming the server
#: (:class:`NatsServerLost`): a settle round's KV write to a server that is gone waited
#: nats-py's timeout, ~8 s in all. The wait is the cluster's
#: ``ClusterOptions.server_lost_wait`` (``[nats] server_lost_wait``), the leave's too
SERVER_LOST_WAIT: Final = 5.0
#: the connection the announcement needs (its KV write and its heartbeat go on it)
_ROLE: Final = "control"
#: kinds of error frame sent back for a remote query that was refused (never taken in)
_REFUSED_KINDS: Final = ("no_such_agent", "mailbox_full", "shutting_down")


class NatsServerLost(TransportUnavailable):
    """A worker's NATS connection stayed down ``server_lost_wait`` seconds
    (``ClusterOptions.server_lost_wait``, ``[nats] server_lost_wait``) while it settled: the server is gone, and the settle (and the run) ends; said in one line,
    naming the server (no traceback: nothing of the program failed)."""

    def __init__(self, servers: Sequence[str], why: str) -> None:
        self.servers = tuple(servers)
        super().__init__(
            f"lost the NATS server {', '.join(self.servers) or '(unknown)'} (it died or is"
            f" unreachable): {why}"
        )
        self.why = why

    def __reduce__(self) -> tuple[Any, ...]:
        # (pickled and copied whole: its args are the message, not what it was made of)
        return (type(self), (self.servers, self.why))


def worker_name(index: int) -> str:
    return f"worker-{index}"


@attrs.frozen
class SwarmLayout:
    """Which worker of how many this process is."""

    index: int
    size: int

    @property
    def workers(self) -> tuple[str, ...]:
        return tuple(worker_name(i) for i in range(self.size))

    def worker_of(self, k: int) -> int:
        """The worker that runs agent ``k`` of the workload."""
        return k % self.size

    def local_indices(self, agents: int) -> range:
        return range(self.index, agents, self.size)


def layout_from_env(
    node: str | None, environ: Mapping[str, str] | None = None
) -> SwarmLayout | None:
    """The layout if this process is worker ``node`` of a swarm, else None. A size that
    is not a whole number of at least 1 (``int()`` took `` 3`` and ``３``; ``0`` said
    ``not worker-0..-1``) is a ValueError naming the variable."""
    from ._cluster_cmd import SWARM_ENV, given_to_this_worker
    from ._commands import env_whole_number

    size_text = given_to_this_worker(SWARM_ENV) if environ is None else environ.get(SWARM_ENV)
    if not size_text or node is None:
        return None
    try:
        size = env_whole_number(SWARM_ENV, size_text)
    except ValueError as exc:
        raise ValueError(
            f"{exc}: it is set by `nexus run --workers` for its workers only; unset it"
        ) from None
    for index in range(size):
        if worker_name(index) == node:
            return SwarmLayout(index, size)
    raise ValueError(
        f"{SWARM_ENV}={size_text}, but this node is {node!r}, not worker-0..{size - 1}"
    )


class Swarm:
    """This worker's part in the swarm (see the module doc)."""

    def __init__(
        self,
        cluster: Cluster,
        layout: SwarmLayout,
        *,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> None:
        self.cluster = cluster
        self.layout = layout
        #: the run was asked to stop (a worker died, Ctrl-C): the waits for the others give up
        self.should_stop = should_stop
        #: each worker's counters as last published (kept after it left the cluster)
        self.last_records: dict[str, dict[str, Any]] = {}
        #: once the swarm settled: the books of every worker settled with (not lost), as
        #: its last record said (see :func:`worker_books`; the parent counts a worker that
        #: dies after the settle, without its summary, with them)
        self.settled_books: dict[str, dict[str, int]] = {}
        #: the run was stopped before this worker saw every worker join: it spawned
        #: nothing, and settles with the workers it sees only (see the module doc)
        self.stopped_while_joining = False
        #: then: the workers it had not seen join
        self.not_joined: tuple[str, ...] = ()
        #: announcements of this worker's record that failed while it settled (logged at
        #: once, then at most once a second of the run's clock)
        self.announce_failures = 0
        self._announce_log = Throttle(clock=trio.current_time)
        #: the workers this one settled without (it counted them lost then): written off
        #: for good, as Erlang's nodes take a node judged down that comes back for a new
        #: incarnation; its settle does not wait for them after (see :meth:`settle`)
        self.written_off: frozenset[str] = frozenset()
        #: the settled workers that wrote this one off (it came back, its connection or
        #: its process, after they settled without it): its settle ends, its books are
        #: theirs to count (the parent counts it from outside, as one that died)
        self.written_off_by: tuple[str, ...] = ()

    async def wait_for_workers(self, timeout: float = START_TIMEOUT) -> bool:
        """Until every worker of the swarm is a live member (bounded): True, or False if
        the run was stopped first (see :attr:`stopped_while_joining`)."""
        wanted = set(self.layout.workers)
        with trio.move_on_after(timeout):
            while not self.should_stop():  # membership comes with heartbeats: polled
                if wanted <= set(self.cluster.live_nodes()):
                    # (remembered: one that leaves before the settle is not waited for)
                    self._observe()
                    return True
                await trio.sleep(0.02)
        missing = sorted(wanted - set(self.cluster.live_nodes()))
        if self.should_stop():
            self.stopped_while_joining = True
            self.not_joined = tuple(missing)
            return False
        raise RuntimeError(f"workers {', '.join(missing)} did not join within {timeout:g}s")

    async def resolve(self, names: Sequence[str], timeout: float = START_TIMEOUT) -> list[AgentRef]:
        """The address of every name (the other workers' agents included), once known;
        those known so far if the run is stopped first (it then sends nothing).

        This worker's own names are first published: the others must find them as soon
        as traffic starts (a ring token comes back to this worker on its second hop).
        """
        cluster = self.cluster
        await cluster.names_published()
        refs: list[AgentRef | None] = [None] * len(names)
        pending = list(range(len(names)))
        with trio.move_on_after(timeout):
            while pending and not self.should_stop():
                waiting = []
                for i in pending:
                    holder = cluster.name_holder(names[i])
                    if holder is None:
                        waiting.append(i)
                    else:
                        refs[i] = AgentRef(holder[1], names[i])
                pending = waiting
                if pending:
                    await trio.sleep(0.02)  # names arrive through the KV watch
        if pending and not self.should_stop():
            raise RuntimeError(
                f"{count_of(len(pending), 'agent')} of the swarm (e.g."
                f" {names[pending[0]]!r}) {'was' if len(pending) == 1 else 'were'} not published"
                f" within {timeout:g}s"
            )
        return [ref for ref in refs if ref is not None]

    async def settle(self, timeout: float = SETTLE_TIMEOUT) -> bool:
        """Stop, then wait until the whole swarm is quiet (see the module doc); False if it
        was not within ``timeout`` (then the summary's books show what is missing)."""
        cluster = self.cluster
        cluster.record_extra["swarm_stopped"] = True
        previous: tuple[Any, ...] | None = None
        settled = False
        deadline = trio.current_time() + timeout
        with trio.move_on_after(timeout):
            while True:  # the other workers' state arrives with their records: polled
                cluster.record_extra["swarm_books"] = worker_books(cluster)
                await self._announce()
                snapshot = self._snapshot()
                if self.written_off_by:
                    # (said in its record, which the ones that wrote it off wait for)
                    cluster.record_extra["swarm_written_off_by"] = list(self.written_off_by)
                    await self._announce()
                    break
                if snapshot is not None and snapshot == previous:
                    lost = set(snapshot[-1])
                    self.written_off = frozenset(lost)
                    cluster.record_extra["swarm_lost"] = sorted(lost)
                    self.settled_books = {
                        node: {
                            **record.get("swarm_books", {}),
                            "held": int(record.get("held", 0)),
                        }
                        for node, record in self.last_records.items()
                        if node not in lost and "swarm_books" in record
                    }
                    settled = True
                    break
                previous = snapshot
                await trio.sleep(0.05)
        if settled:
            # Stay, publishing the final record, until every other worker has settled
            # too, left or been lost: one that has not may have missed this worker's
            # last record (a heartbeat is a core NATS message, and may be dropped by a
            # slow consumer), and a worker gone before it saw the final books leaves it
            # waiting for a record that never comes (seen under load: killed by the
            # parent, still "settling", after the others had left).
            cluster.record_extra["swarm_settled"] = True
            with trio.move_on_at(deadline):
                while True:
                    await self._announce()
                    if self._others_settled():
                        break
                    await trio.sleep(0.05)
            return True
        if self.written_off_by:
            log_guarded(
                log,
                logging.WARNING,
                "%s settled without this worker (%s counted it lost): its books are the"
                " others' to count; leaving",
                ", ".join(self.written_off_by),
                "it" if len(self.written_off_by) == 1 else "they",
            )
            return False
        log_guarded(
            log, logging.WARNING, "the swarm did not settle within %gs; leaving anyway", timeout
        )
        return False

    async def _announce(self) -> None:
        """Publish this worker's record now. One that fails (its KV write unanswered: the
        server stalls, JetStream elects a leader) does not end the run: the heartbeat
        carries the record too, and the settle's next round writes it again (bounded by
        the settle's timeout). It had failed the worker's whole run. One that fails while
        the connection is down (the server died: the parent stops the workers then)
        still ends the run at once, as a settle of minutes waiting for a server that is
        gone would hold the whole run's end; and so does a connection down
        ``server_lost_wait`` seconds (:class:`NatsServerLost`, naming the server: a
        KV write while it is down waited nats-py's timeout, ~8 s in all)."""
        connections = self.cluster.connections
        try:
            await self._announce_while_connected(connections)
        except NatsServerLost:
            raise
        except Exception as exc:  # (nats-py's errors, OSError: the record is written later)
            if connections.down_for(_ROLE) is not None:
                # (named: nats-py's bare "TimeoutError: nats: timeout" said nothing of it)
                raise NatsServerLost(
                    getattr(self.cluster, "servers", ()),
                    "could not announce this worker's record while settling:"
                    f" {type(exc).__name__}: {exc}",
                ) from exc
            self.announce_failures += 1
            if self._announce_log.due():
                log_guarded(
                    log,
                    logging.WARNING,
                    "could not announce this worker's record while settling (%s so far): %s: %s",
                    count_of(self.announce_failures, "failure"),
                    type(exc).__name__,
                    exc,
                )

    async def _announce_while_connected(self, connections: ConnectionWatch) -> None:
        """Announce once the connection is up (a KV write while it is down waits nats-py's
        timeout); once it has been down ``server_lost_wait`` seconds (from when it
        went down: before the announcement or during it), raise :class:`NatsServerLost`.
        The cluster's leave asks the same watch the same way (``ConnectionWatch``)."""

        async def announce() -> None:
            await connections.wait_up(_ROLE)  # (down: announced once it is back, if it is)
            await self.cluster.announce()

        wait = self.cluster.options.server_lost_wait
        if not await connections.unless_gone(_ROLE, wait, announce):
            raise NatsServerLost(
                getattr(self.cluster, "servers", ()),
                f"the connection stayed down {wait:g}s while this worker settled"
                " ([nats] server_lost_wait)",
            )

    def _others_settled(self) -> bool:
        """True once every other worker has settled, left the cluster or been lost."""
        me = worker_name(self.layout.index)
        members = {info.node: info for info in self.cluster.member_list()}
        for node in self.layout.workers:
            info = members.get(node)
            if node == me or info is None or not info.reachable:
                continue
            if node in self.written_off:
                # back after this worker settled without it: it is not waited for to
                # settle (its books cannot balance with these), only until its record
                # says it saw this one's, which ends its settle (bounded all the same)
                if me in _names(info.stats, "swarm_written_off_by"):
                    continue
                return False
            if not info.stats.get("swarm_settled"):
                return False
        return True

    def _observe(self) -> set[str]:
        """Keep the records of the workers seen now; the workers lost (see the module doc)."""
        members = {info.node: info for info in self.cluster.member_list()}
        me = worker_name(self.layout.index)
        lost = set()
        for node in self.layout.workers:
            info = members.get(node)
            if info is not None and info.reachable:
                self.last_records[node] = dict(info.stats)
            elif info is not None:
                lost.add(node)  # died: its last record stays as it was
            elif node in self.last_records and not self.last_records[node].get("swarm_stopped"):
                # left without stopping its traffic (its run failed): it sends no more, and
                # its books are those of its last heartbeat: as if it had died
                lost.add(node)
        self.written_off_by = tuple(
            node
            for node, record in sorted(self.last_records.items())
            if node != me and record.get("swarm_settled") and me in _names(record, "swarm_lost")
        )
        return lost

    def _snapshot(self) -> tuple[Any, ...] | None:
        """The swarm's counters if it is quiet now, else None."""
        lost = self._observe()
        # Every worker, once every one joined; else (stopped before: no traffic anywhere)
        # those seen: one never seen may never join.
        everyone = set(self.layout.workers)
        if not self.stopped_while_joining and set(self.last_records) | lost != everyone:
            return None
        records = [
            self.last_records[node]
            for node in self.layout.workers
            if node in self.last_records and node not in lost
        ]
        if not all(r.get("swarm_stopped") for r in records):
            return None
        if any(r.get("in_flight", 0) or r.get("held", 0) for r in records):  # held: parked too
            return None
        if not lost:
            out = sum(int(r.get("published", 0)) for r in records)
            taken = sum(int(r.get("forwarded_in", 0)) + _dropped(r) for r in records)
            if out != taken:
                return None
        snapshot = tuple((r.get("published"), r.get("forwarded_in"), _dropped(r)) for r in records)
        return (*snapshot, tuple(sorted(lost)))


def _names(record: Mapping[str, Any], key: str) -> tuple[str, ...]:
    """The worker names a record lists under ``key`` (none unless a list of strings: a
    record is another process's, read leniently)."""
    value = record.get(key)
    if not isinstance(value, list):
        return ()
    return tuple(name for name in value if isinstance(name, str))


def _dropped(record: Mapping[str, Any]) -> int:
    """What a node's record says it refused or lost of what other nodes sent it."""
    refused = [record.get("errors_replied") or {}, record.get("errors_unsent") or {}]
    return (
        int(record.get("dropped", 0))
        + int(record.get("lost_in_transit", 0))
        + int(record.get("publish_failures", 0))
        + int(record.get("lost_at_leave", 0))
        + sum(int(frames.get(kind, 0)) for frames in refused for kind in _REFUSED_KINDS)
    )


def worker_books(cluster: Cluster) -> dict[str, int]:
    """This worker's books now, as its summary counts them (``sent`` is what started
    here): published in its record while it settles."""
    k = cluster.kernel.stats()
    s = cluster.stats()
    dropped, lost = _dropped_and_lost(s)
    return {
        "sent": k.accepted - s.forwarded_in,
        "accepted": k.accepted,
        "handled": k.handled,
        "replies_delivered": k.replies_delivered,
        "forwarded_out": k.forwarded,
        "forwarded_in": s.forwarded_in,
        "dead_letters": k.dead_lettered,
        "in_flight": k.in_flight,
        "lost_counted": dropped + lost,
    }


def _dropped_and_lost(s: ClusterStats) -> tuple[int, int]:
    """What a node refused on arrival, and what it counted lost otherwise."""
    refused = sum(
        frames.get(kind, 0)
        for frames in (s.errors_replied, s.errors_unsent)
        for kind in _REFUSED_KINDS
    )
    dropped = sum(s.inbound_dropped.values()) + refused
    return dropped, s.lost_in_transit + s.publish_failures + s.lost_with_nodes + s.lost_at_leave


def cluster_counts(cluster: Cluster, also_lost: Collection[str] = ()) -> dict[str, Any]:
    """This worker's traffic with the others, for its summary. ``lost_peers`` lists the
    peers lost now (also gone from the member table since: :func:`_lost_peers`) and
    those of ``also_lost`` (:attr:`Swarm.written_off`: settled without, heard again or
    left since), each with what it handed to them and took from them."""
    s = cluster.stats()
    dropped, lost = _dropped_and_lost(s)
    heard = cluster.ever_heard()
    return {
        "node": s.node,
        "forwarded_in": s.forwarded_in,
        "published": s.published,
        "lost_counted": lost + dropped,
        "lost_counted_by_kind": {
            "dropped_on_arrival": dropped,
            "lost_in_transit": s.lost_in_transit,
            "publish_failures": s.publish_failures,
            "lost_at_leave": s.lost_at_leave,
            "lost_with_nodes": s.lost_with_nodes,
        },
        # writes of the NATS client to a lost connection's socket, dropped (asyncio's
        # ``socket.send() raised exception.``, counted instead): no message of the books
        "closed_socket_writes": s.closed_socket_writes,
        # the same per node (null: too many to keep): by it the parent replaces this
        # worker's estimate of a worker that has books of its own or was counted from
        # outside (see _cluster_cmd.aggregate_summaries)
        "lost_with_nodes_by_node": s.lost_with_nodes_by_node,
        # every node it heard from (null: too many to keep): one missing from every
        # worker's never joined as far as they know (see _cluster_cmd._counted_from_outside)
        "peers_heard": None if heard is None else sorted(heard),
        # per worker lost (died): the messages this worker handed to it and took from it
        "lost_peers": _lost_peers(cluster, also_lost, s.nodes_lost_by_node),
        # what this worker keeps of its peers (bounded: see docs/distributed.md)
        "membership": {
            "nodes_lost": s.nodes_lost,
            # per node, the times it was judged lost (also heard again since; null:
            # too many to keep): the parent's summary says every one (``lost_seen``)
            "nodes_lost_by_node": s.nodes_lost_by_node,
            "nodes_forgotten": s.nodes_forgotten,
            "inbound_streams": s.inbound_streams,
            "streams_evicted": s.streams_evicted,
        },
    }


def _lost_peers(
    cluster: Cluster, also_lost: Collection[str], judged: Mapping[str, int] | None
) -> dict[str, dict[str, Any]]:
    """The peers lost at this worker's end and the workers of ``also_lost``, each with
    what this worker handed to it and took from it (:func:`_seen_of_lost`). Members
    first; then those gone from the member table since (``Cluster.departed``: a leave
    heard, or forgotten after the loss; the last 4,096 kept), by their last record there,
    if it was still lost then, or is of ``also_lost`` and was judged lost here
    (``judged``: ``nodes_lost_by_node``; None, too many to keep: taken as judged).
    Until the forty-fifth pass they were missing (the member table's only), and the
    parent took the own summary of a worker the others wrote off for a live worker's.
    One the settle wrote off only because it left without saying it stopped (its last
    record, see :meth:`Swarm._observe`), never judged lost here, is not listed, as
    before: its own summary says what it did (a real split: see _cluster_cmd)."""
    members = {info.node: info for info in cluster.member_list()}
    peers = {
        node: _seen_of_lost(cluster, info)
        for node, info in members.items()
        if not info.reachable or node in also_lost
    }
    for node, (info, sent) in cluster.departed().items():
        if node in members:
            continue
        if not info.reachable or (node in also_lost and (judged is None or node in judged)):
            peers[node] = _seen_of_lost(cluster, info, sent)
    return dict(sorted(peers.items()))


def _seen_of_lost(cluster: Cluster, info: NodeInfo, sent: int | None = None) -> dict[str, Any]:
    """What this worker handed to a lost worker and took from it, exactly: its numbered
    tells (``sent``: those it handed to a worker gone from the member table, whose
    stream no longer says), and its queries and replies (counted per process, not
    numbered)."""
    asked = {
        "handed_to": cluster.queries_and_replies_sent_to(info.id_prefix),
        "taken_from": cluster.queries_and_replies_taken_from(info.id_prefix),
    }
    return {
        "pid": info.pid,
        "handed_to": (cluster.tells_sent_to(info.node, info.id_prefix) if sent is None else sent)
        + asked["handed_to"],
        "taken_from": cluster.tells_taken_from(info.node, info.id_prefix) + asked["taken_from"],
        "queries_and_replies": asked,
    }
