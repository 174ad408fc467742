"""A joined node's ``nexus_cluster_*`` series: :class:`ClusterCollector` turns
``Cluster.stats()`` into Prometheus families, added to the kernel's ``/metrics`` with
:func:`nexus_trio.metrics.add_collector` at the join and removed at the leave (the core
knows nothing of it).

A counter per count that only grows, a gauge per level (and per count that can fall:
``lost_with_nodes`` is taken back when a node judged lost is heard again), a ``reason``
or ``kind`` label where the stats break a count down; every label the stats name is
there from the first scrape, at 0, as the kernel's ``nexus_dead_letters_total`` is.

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Final

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ._durable import DEAD_REASONS

if TYPE_CHECKING:
    from ._cluster import ClusterStats

__all__ = [
    "CLUSTER_BREAKDOWNS",
    "CLUSTER_COUNTERS",
    "CLUSTER_GAUGES",
    "NOT_EXPORTED",
    "ClusterCollector",
]

#: ClusterStats fields not exported as series of their own: ``node`` (the label of
#: ``nexus_cluster_node_info``), two counted only after the leave, when the node's
#: series are gone (the kernel's dead letters, ``transport_unavailable``, count them),
#: and two per-node breakdowns whose sums are series (``nexus_cluster_lost_with_nodes``,
#: ``nexus_cluster_nodes_lost_total``): a label per node name would grow with every
#: node ever lost
NOT_EXPORTED: Final = frozenset(
    {
        "node",
        "tells_after_leave",
        "requests_after_leave",
        "lost_with_nodes_by_node",
        "nodes_lost_by_node",
    }
)

#: ClusterStats field -> (series name without ``_total``, help): counts that only grow
CLUSTER_COUNTERS: Final = {
    "published": ("nexus_cluster_published", "Messages this node published to NATS."),
    "received": ("nexus_cluster_received", "Messages this node received from NATS."),
    "forwarded_in": (
        "nexus_cluster_forwarded_in",
        "Messages from other nodes taken into the local kernel (replies included).",
    ),
    "batches_published": ("nexus_cluster_batches_published", "Node batches of tells sent."),
    "batches_received": ("nexus_cluster_batches_received", "Node batches of tells received."),
    "outbox_batches": ("nexus_cluster_outbox_batches", "Publishes the outbox made in batches."),
    "outbox_direct": (
        "nexus_cluster_outbox_direct",
        "Publishes sent at once from Trio (the outbox was idle).",
    ),
    "outbox_failures": (
        "nexus_cluster_outbox_failures",
        "Sends of the outbox that failed (refused by the NATS client, or after buffering).",
    ),
    "inbox_wakeups": ("nexus_cluster_inbox_wakeups", "Times the inbox woke the Trio side."),
    "disconnects": ("nexus_cluster_disconnects", "Times the NATS connection was lost."),
    "reconnects": ("nexus_cluster_reconnects", "Times the NATS connection was made again."),
    "nodes_lost": ("nexus_cluster_nodes_lost", "Members this node judged lost."),
    "nodes_forgotten": (
        "nexus_cluster_nodes_forgotten",
        "Lost members forgotten forget_lost_after seconds after their loss.",
    ),
    "replaced": (
        "nexus_cluster_replaced",
        "Placed agents this node re-spawned after their node was lost.",
    ),
    "lost_with_nodes_taken_back": (
        "nexus_cluster_lost_with_nodes_taken_back",
        "Messages counted lost with a node that the node, heard again, took after all.",
    ),
    "requests_lost_with_nodes": (
        "nexus_cluster_requests_lost_with_nodes",
        "Requests failed because the node asked was judged lost.",
    ),
    "publish_failures": (
        "nexus_cluster_publish_failures",
        "Messages the NATS client refused, or still queued when the node left disconnected.",
    ),
    "lost_in_transit": (
        "nexus_cluster_lost_in_transit",
        "Tells to this node that NATS lost on the way (gaps in their sequence numbers).",
    ),
    "lost_at_leave": (
        "nexus_cluster_lost_at_leave",
        "Tells sent to a node that left cleanly which its last notice says it never took.",
    ),
    "closed_socket_writes": (
        "nexus_cluster_closed_socket_writes",
        "Writes to a NATS socket whose connection was lost, dropped (asyncio's lines, counted).",
    ),
    "cancels_sent": ("nexus_cluster_cancels_sent", "Remote cancel frames sent."),
    "cancels_received": ("nexus_cluster_cancels_received", "Remote cancel frames received."),
    "replies_relayed": (
        "nexus_cluster_replies_relayed",
        "Answers and error frames passed on for a query a handler here sent on to a third node.",
    ),
    "streams_evicted": (
        "nexus_cluster_streams_evicted",
        "Live inbound streams evicted past inbound_streams_limit.",
    ),
    "duplicates_stopped": (
        "nexus_cluster_duplicates_stopped",
        "Placed agents stopped here for a later incarnation of their name on another node.",
    ),
    "names_taken": (
        "nexus_cluster_names_taken",
        "Named agents here whose name a later registration on another node took.",
    ),
    "names_written_late": (
        "nexus_cluster_names_written_late",
        "Names entries written on a retry (the names bucket was unreachable).",
    ),
    "records_written_late": (
        "nexus_cluster_records_written_late",
        "Placement records written on a retry (the placed bucket was unreachable).",
    ),
    "untyped_names_lost": (
        "nexus_cluster_untyped_names_lost",
        "Names of lost members of an earlier version with no placement record (not re-placed).",
    ),
    "buckets_made_again": (
        "nexus_cluster_buckets_made_again",
        "Times the cluster's KV buckets were found gone after a reconnect and made again.",
    ),
    "old_session_tells": (
        "nexus_cluster_old_session_tells",
        "Late tells of a sending process's earlier join whose stream was forgotten here:"
        " delivered, their numbers not taken.",
    ),
    "records_contested": (
        "nexus_cluster_records_contested",
        "Membership records of another process under a member's name, ignored.",
    ),
    "entries_malformed": (
        "nexus_cluster_entries_malformed",
        "Membership, placement and names records refused as malformed.",
    ),
    "durable_acked": ("nexus_cluster_durable_acked", "Durable messages acked."),
    "durable_redelivered": (
        "nexus_cluster_durable_redelivered",
        "Durable messages delivered again by JetStream.",
    ),
    "durable_dead": (
        "nexus_cluster_durable_dead",
        "Durable messages given up (max_deliver reached, or refused for good).",
    ),
    "durable_duplicates": (
        "nexus_cluster_durable_duplicates",
        "Durable deliveries of a message already handled (acked again, not handled).",
    ),
    "durable_agent_missing": (
        "nexus_cluster_durable_agent_missing",
        "Durable deliveries by name that no agent of this node had (nakked with a delay).",
    ),
    "durable_forwarded": (
        "nexus_cluster_durable_forwarded",
        "Durable messages by name forwarded to the node their agent runs on now.",
    ),
    "durable_taken_over": (
        "nexus_cluster_durable_taken_over",
        "Durable messages stored for a lost node that this node took over and settled.",
    ),
    "durable_not_forwarded": (
        "nexus_cluster_durable_not_forwarded",
        "Durable deliveries by name not forwarded to their agent's node, whose durable path"
        " is off (they wait here).",
    ),
    "durable_given_back": (
        "nexus_cluster_durable_given_back",
        "Durable messages by agent id of a lost node, fetched by the takeover once it was"
        " heard again: nakked back to it.",
    ),
    "durable_swept": (
        "nexus_cluster_durable_swept",
        "Takeovers of a node no member any more that a sweep of the durable stream started:"
        " stored messages no look took.",
    ),
    "durable_sweep_failures": (
        "nexus_cluster_durable_sweep_failures",
        "Sweeps of the durable stream for messages no node pulls that JetStream did not"
        " answer (made again later).",
    ),
    "durable_sweeps_cut": (
        "nexus_cluster_durable_sweeps_cut",
        "Sweeps of the durable stream whose read of its subjects or consumers stopped at"
        " its bound (the next reads on from there).",
    ),
    "durable_left_to_pullers": (
        "nexus_cluster_durable_left_to_pullers",
        "Takeovers of a node no member left at their start to the pull requests waiting on"
        " its consumer (looked at again later).",
    ),
    "durable_handed_back_at_leave": (
        "nexus_cluster_durable_handed_back_at_leave",
        "Messages a takeover had fetched when its node began to leave, or a fetch cancelled"
        " under way at the leave took, nakked back to their consumer rather than taken (the"
        " next owner's takeover gets them).",
    ),
    "durable_handed_back_at_remake": (
        "nexus_cluster_durable_handed_back_at_remake",
        "Messages the old pull subscription held when the durable pull was set up again"
        " after a refused fetch, nakked back to the consumer (delivered again at once).",
    ),
    "durable_stale_settles": (
        "nexus_cluster_durable_stale_settles",
        "Settles of deliveries of the durable stream from before it was made anew, not"
        " sent (an ack would remove the new stream's message of the same sequence).",
    ),
    "durable_wait_full": (
        "nexus_cluster_durable_wait_full",
        "Durable deliveries by name whose agent was missing, terminated: max_waiting of them"
        " waited for theirs already.",
    ),
    "durable_unsettled_at_leave": (
        "nexus_cluster_durable_unsettled_at_leave",
        "Durable messages this node's leave left unsettled (JetStream delivers them again).",
    ),
    "durable_forward_failures": (
        "nexus_cluster_durable_forward_failures",
        "Forwards of durable messages to their name's node that JetStream did not take"
        " (nakked, tried again).",
    ),
    "durable_too_big": (
        "nexus_cluster_durable_too_big",
        "Durable deliveries not forwarded: over max_payload with the forward's headers"
        " (they wait here).",
    ),
    "durable_remake_failures": (
        "nexus_cluster_durable_remake_failures",
        "Failures to make the durable stream or this node's consumer anew after a refused"
        " fetch (tried again).",
    ),
    "streams_capped": (
        "nexus_cluster_streams_capped",
        "Set-ups of the cluster's JetStream streams that left one allowing fewer than"
        " 2**31 - 1 consumers (the account's limit, or not updated).",
    ),
}

#: ClusterStats field -> (series name, help): levels (``members`` is a count of a tuple)
CLUSTER_GAUGES: Final = {
    "members": ("nexus_cluster_members", "Members of the cluster this node knows (itself too)."),
    "parked": (
        "nexus_cluster_parked",
        "Received messages waiting for room in a full local mailbox now.",
    ),
    "lost_with_nodes": (
        "nexus_cluster_lost_with_nodes",
        "Messages counted lost with lost nodes, less those taken back (can fall).",
    ),
    "inbound_streams": ("nexus_cluster_inbound_streams", "Live inbound streams kept."),
    "inbound_streams_retired": (
        "nexus_cluster_inbound_streams_retired",
        "Retired inbound streams kept for late tells.",
    ),
    "names_unwritten": (
        "nexus_cluster_names_unwritten",
        "Local named agents whose names entry is not written yet (retried).",
    ),
    "records_unwritten": (
        "nexus_cluster_records_unwritten",
        "Placed agents here whose placement record is not written yet (retried).",
    ),
    "placements_waiting": (
        "nexus_cluster_placements_waiting",
        "Placed agents of lost nodes that no reachable member can run now (none runs"
        " their type): re-placed once one is heard.",
    ),
}

#: the reasons ``Cluster`` names when it drops a received message
#: (``ClusterStats.inbound_dropped``), each there from the first scrape; any other it
#: counts appears at its first count
_DROP_REASONS: Final = frozenset(
    {
        "delivery_failed",
        "error",
        "inbox_full",
        "late_error",
        "mailbox_full",
        "malformed",
        "malformed_batch",
        "malformed_notice",
        "no_replica",
        "no_such_agent",
        "shutting_down",
        "unrelayable_reply",
        "unroutable_error",
        "unroutable_reply",
    }
)

#: ClusterStats field -> (series name without ``_total``, label, help, labels there at 0)
CLUSTER_BREAKDOWNS: Final = {
    "inbound_dropped": (
        "nexus_cluster_inbound_dropped",
        "reason",
        "Received messages that could not be delivered locally, by reason.",
        _DROP_REASONS,
    ),
    "errors_replied": (
        "nexus_cluster_errors_replied",
        "kind",
        "Error frames sent back to remote requesters, by kind.",
        frozenset(),
    ),
    "errors_unsent": (
        "nexus_cluster_errors_unsent",
        "kind",
        "Error frames for remote requesters not sent, by kind.",
        frozenset(),
    ),
    "durable_fetch_failures": (
        "nexus_cluster_durable_fetch_failures",
        "consumer",
        "Failed fetches of durable consumers (tried again), by consumer: own or takeover.",
        frozenset({"own", "takeover"}),
    ),
    "durable_dead_reasons": (
        "nexus_cluster_durable_dead_reasons",
        "reason",
        "Durable messages given up (durable_dead), by why: undecodable, agent_gone, failed,"
        " unanswered, wait_full, lost_node, unforwarded, consumer_max_deliver.",
        frozenset(DEAD_REASONS),
    ),
}


class ClusterCollector:
    """Collects ``stats()`` (a :class:`ClusterStats`) as ``nexus_cluster_*`` families, and
    ``nexus_cluster_node_info{node}`` (1): which node the series are of."""

    def __init__(self, stats: Callable[[], ClusterStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        info = GaugeMetricFamily(
            "nexus_cluster_node_info", "This process's node of the cluster.", labels=["node"]
        )
        info.add_metric([s.node], 1)
        yield info
        for field, (name, doc) in CLUSTER_COUNTERS.items():
            yield CounterMetricFamily(name, doc, value=getattr(s, field))
        for field, (name, doc) in CLUSTER_GAUGES.items():
            value = len(s.members) if field == "members" else getattr(s, field)
            yield GaugeMetricFamily(name, doc, value=value)
        for field, (name, label, doc, known) in CLUSTER_BREAKDOWNS.items():
            counts: Mapping[str, int] = getattr(s, field)
            family = CounterMetricFamily(name, doc, labels=[label])
            for key in sorted(known.union(counts)):
                family.add_metric([key], counts.get(key, 0))
            yield family
