"""A joined node's ``/metrics`` carries its cluster's series (``nexus_cluster_*``), added
through ``nexus_trio.metrics.add_collector`` at the join and removed at the leave."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import attrs
import pytest
import trio
from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from nexus_trio import Context, Message, agent, open_kernel
from nexus_trio._nats import NatsServer, join_cluster
from nexus_trio._nats._cluster import ClusterStats
from nexus_trio._nats._metrics import (
    CLUSTER_BREAKDOWNS,
    CLUSTER_COUNTERS,
    CLUSTER_GAUGES,
    NOT_EXPORTED,
)
from nexus_trio.metrics import (
    MetricsRenderer,
    add_collector,
    build_registry,
    remove_collector,
    render_snapshot,
    take_snapshot,
)

from .nats_server import PATIENT, node_config


def _samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text: (name, sorted labels) -> value."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
    }


def _cluster_names(text: bytes) -> set[str]:
    return {name for name, _ in _samples(text) if name.startswith("nexus_cluster_")}


@agent(name="sink-b")
async def sink(ctx: Context, msg: Message) -> Any:
    return "done" if msg.payload == "done" else None


async def test_a_joined_node_exports_its_cluster_series_and_stops_at_its_leave(
    nats: NatsServer,
) -> None:
    async with open_kernel(node_config()) as kb:
        renderer = MetricsRenderer(kb, cache_seconds=0, process=False)
        assert _cluster_names(await renderer.render()) == set()  # not joined yet
        async with join_cluster(kb, nats.url, "b", options=PATIENT) as cb:
            kb.spawn(sink)
            await cb.names_published()
            before = _samples(await renderer.render())
            assert before[("nexus_cluster_node_info", (("node", "b"),))] == 1
            assert before[("nexus_cluster_forwarded_in_total", ())] == 0
            # every reason the cluster names is there from the first scrape, at 0
            key = ("nexus_cluster_inbound_dropped_total", (("reason", "no_such_agent"),))
            assert before[key] == 0
            async with open_kernel(node_config()) as ka:
                async with join_cluster(ka, nats.url, "a", options=PATIENT) as ca:
                    with trio.fail_after(30):
                        await ca.wait_for_name("sink-b")
                        for i in range(25):
                            await ka.send("sink-b", i)
                        assert await ka.request("sink-b", "done") == "done"
                    after_a = _samples(render_snapshot(take_snapshot(ka), process=False))
                    stats_a = ca.stats()
            after = _samples(await renderer.render())
            stats_b = cb.stats()
        # b's series are b's stats of the moment, and they moved with the tells
        assert after[("nexus_cluster_forwarded_in_total", ())] == stats_b.forwarded_in >= 26
        assert (
            after[("nexus_cluster_forwarded_in_total", ())]
            > before[("nexus_cluster_forwarded_in_total", ())]
        )
        assert after[("nexus_cluster_received_total", ())] == stats_b.received
        assert after[("nexus_cluster_batches_received_total", ())] >= 1
        assert after[key] == stats_b.inbound_dropped.get("no_such_agent", 0) == 0
        assert after[("nexus_cluster_members", ())] == len(stats_b.members) >= 1
        assert after[("nexus_cluster_published_total", ())] == stats_b.published
        # a's: what it sent
        assert after_a[("nexus_cluster_node_info", (("node", "a"),))] == 1
        assert after_a[("nexus_cluster_published_total", ())] == stats_a.published >= 1
        assert after_a[("nexus_cluster_batches_published_total", ())] >= 1
        assert after_a[("nexus_cluster_members", ())] == 2
        # b left the cluster, its kernel runs on: no cluster series any more
        left = await renderer.render()
        assert _cluster_names(left) == set()
        assert _samples(left)[("nexus_kernel_up", ())] == 1
        await kb.shutdown()


def test_every_cluster_stat_is_exported_as_one_kind_of_series() -> None:
    exported = [*CLUSTER_COUNTERS, *CLUSTER_GAUGES, *CLUSTER_BREAKDOWNS]
    assert len(exported) == len(set(exported))
    fields = {f.name for f in attrs.fields(ClusterStats)}
    assert set(exported) == fields - NOT_EXPORTED
    assert fields >= NOT_EXPORTED
    names = [name for name, *_ in (*CLUSTER_COUNTERS.values(), *CLUSTER_BREAKDOWNS.values())]
    names += [name for name, _ in CLUSTER_GAUGES.values()]
    assert all(n.startswith("nexus_cluster_") and not n.endswith("_total") for n in names)
    assert len(names) == len(set(names))


class _Fixed:
    def __init__(self, value: int) -> None:
        self.value = value

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily("nexus_test_extra", "A test series.", value=self.value)


async def test_an_added_collector_is_in_every_scrape_until_removed() -> None:
    async with open_kernel() as kernel:
        extra = _Fixed(7)
        add_collector(kernel, extra)
        with pytest.raises(ValueError, match="already added"):
            add_collector(kernel, extra)
        key = ("nexus_test_extra_total", ())
        renderer = MetricsRenderer(kernel, cache_seconds=0, process=False)
        for text in (
            await renderer.render(),
            render_snapshot(take_snapshot(kernel), process=False),
            generate_latest(build_registry(kernel, process=False)),
        ):
            assert _samples(text)[key] == 7
        extra.value = 9  # collected at each snapshot
        assert _samples(await renderer.render())[key] == 9
        async with open_kernel() as other:  # another kernel's scrape has none of it
            assert key not in _samples(render_snapshot(take_snapshot(other), process=False))
        remove_collector(kernel, extra)
        remove_collector(kernel, extra)  # not added: left alone
        assert key not in _samples(await renderer.render())
