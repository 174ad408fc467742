"""Real partitions: one node's NATS connections cut by a TCP proxy while its process
lives (``tests/nats_proxy.py``), for longer than the loss window, then let through
again. ``test_nats_placement.py`` heals a partition it makes by hand (each node told
the other is lost, then heard again, both writing the names bucket); here the cut node
really misses its heartbeats and really cannot reach the bucket while it is cut off, as
the minority side of a partition from the server cannot."""

from __future__ import annotations

from typing import Any

import trio

from nexus_trio import EventKind, Kernel
from nexus_trio._nats import Cluster, NatsServer

from .nats_proxy import NatsProxy
from .nats_server import until
from .test_fault_monitors import buffered
from .test_nats_placement import BLOCKING, DUPLICATE, ON_C, _node, _place_one_on_each, _replaced


def _ready(clusters: tuple[Cluster, ...]) -> bool:
    """Each node hears the others and knows they run ``blocking`` (their records say)."""
    return all(
        len(cluster.member_list()) == len(clusters)
        and all("blocking" in (info.types or ()) for info in cluster.member_list())
        for cluster in clusters
    )


def _one_incarnation(name: str, nodes: dict[str, tuple[Kernel, Cluster]]) -> bool:
    """``name`` runs on one node only, and every node routes it to that agent."""
    running = [node for node, (kernel, _) in nodes.items() if kernel.is_local(name)]
    if len(running) != 1:
        return False
    kernel, _ = nodes[running[0]]
    holder = (running[0], kernel.lookup(name).id)
    return all(cluster.name_holder(name) == holder for _, cluster in nodes.values())


async def test_a_real_partition_of_a_node_from_the_server_heals_to_one_incarnation_each(
    nats: NatsServer,
) -> None:
    """c's connections are cut and refused (a partition between c and the server) until
    a, which still reaches the server, counts c lost and re-places c's agent ``svc-0``
    (c's copy holds one message in its handler and two queued). c, cut off, may count a
    lost too and re-place a's ``on-a`` on its side (its claim in the names bucket cannot
    land: the copy runs unwritten). Let through again, each name ends with one
    incarnation, the same on both nodes: the one whose entry the bucket holds, a's (the
    side that kept the server: Akka's downing of the unreachable side, Erlang
    ``global``'s one registered name after a reconnect); c's copy of ``svc-0`` is
    stopped (``duplicate after partition``) and the three messages it held are
    dead-lettered ``agent_stopped`` on c, none dropped; requests from both nodes reach
    the winners. (Behaved on 1242268 as it does now: this test is the first to make the
    partition with real missed heartbeats and a real unreachable bucket.)"""
    assert nats.port is not None
    proxy = NatsProxy(nats.port)
    try:
        async with _node(nats.url, "a") as (ka, ca), _node(proxy.url, "c") as (kc, cc):
            nodes = {"a": (ka, ca), "c": (kc, cc)}
            for cluster in (ca, cc):
                cluster.register_type("blocking", BLOCKING)
            with trio.fail_after(30):  # a hang guard
                await until(lambda: _ready((ca, cc)))
                on_c, on_a = await _place_one_on_each(ca, cc)
                for payload in ("block", 1, 2):
                    await kc.send(ON_C, payload)
                async with ka.events() as events_a, kc.events() as events_c:
                    proxy.refuse("c")
                    replaced = await _replaced(events_a, ON_C)
                    assert replaced.reason == "re-placed from node c"
                    assert kc.is_local(ON_C)  # (both sides run it now)
                    async with kc.dead_letters() as letters_c:
                        proxy.refuse("c", False)
                        await until(
                            lambda: (
                                _one_incarnation(ON_C, nodes) and _one_incarnation("on-a", nodes)
                            )
                        )
                        letters = [await letters_c.receive() for _ in range(3)]
                    stopped = [
                        event
                        for event in buffered(events_c)
                        if event.kind is EventKind.STOPPED and event.name == ON_C
                    ]
                assert ka.is_local(ON_C) and ka.is_local("on-a")
                assert ka.lookup("on-a").id == on_a.id  # (a's own copy kept its state)
                assert [event.agent_id for event in stopped] == [on_c.id]
                assert stopped[0].reason == DUPLICATE
                assert [letter.recipient for letter in letters] == [on_c.id] * 3
                assert [letter.message.payload for letter in letters] == ["block", 1, 2]
                assert {letter.reason.value for letter in letters} == {"agent_stopped"}
                for kernel in (ka, kc):
                    answer: Any = await kernel.request(ON_C, "hi", timeout=5)
                    assert answer["name"] == ON_C
                    assert (await kernel.request("on-a", "hi", timeout=5))["name"] == "on-a"
                assert ca.stats().duplicates_stopped == 0
                assert cc.stats().duplicates_stopped >= 1  # (svc-0, and on-a if c re-placed it)
                assert proxy.cuts["c"] >= 2
            await kc.shutdown()
            await ka.shutdown()
    finally:
        proxy.close()
