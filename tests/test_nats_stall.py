"""Links that stall without closing: one direction of one node's NATS connection stops
carrying bytes mid-write (``tests/nats_proxy.py``'s :meth:`NatsProxy.stall`), the
other direction and the node's other connection flowing, then carries them again. No
reconnect happens (the client's pings are minutes apart): what was written is late,
not lost, and the node's books must say so."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import trio

from nexus_trio import (
    AgentNotFound,
    Context,
    EventKind,
    MailboxFull,
    Message,
    RequestTimeout,
    TransportUnavailable,
    agent,
)
from nexus_trio._nats import NatsServer

from .nats_proxy import NatsProxy
from .nats_server import collector, until
from .test_nats_placement import _node

#: the seconds a link stalls: past the PATIENT loss window (2 s), which the node's
#: heartbeats (on its control connection, not stalled) keep it inside
STALL = 3.0


@agent(name="echo")
async def echo(ctx: Context, msg: Message) -> Any:
    return msg.payload


@pytest.mark.parametrize("upstream", [True, False], ids=["a-to-server", "server-to-a"])
async def test_a_data_link_stalled_one_way_mid_batch_loses_nothing_once_it_flows_again(
    nats: NatsServer, upstream: bool
) -> None:
    """a sends tells to b with a small window (``block``: a send waits for credit)
    through a proxy; one direction of a's data connection stalls in the middle of a
    chunk (upstream: a batch half written; downstream: b's credit and frames held) for
    longer than the loss window, its control connection alive. A request each node
    makes of the other meanwhile times out (its query or its answer is held back). Once the link flows again:
    every tell arrives once, in order; nothing is counted lost in transit or failed;
    nobody is judged lost; the late answer and the late query each end counted on the
    node that gets them (a late reply; a query handled, its answer late) and both
    nodes serve requests again."""
    assert nats.port is not None
    proxy = NatsProxy(nats.port)
    collected: list[Any] = []
    total = 3000
    try:
        async with (
            _node(nats.url, "b", node_window=64, batch_frames=16) as (kb, cb),
            _node(proxy.url, "a", node_window=64, batch_frames=16) as (ka, ca),
        ):
            kb.spawn(collector(collected), name="col-b")
            kb.spawn(echo, name="echo-b")
            ka.spawn(echo, name="echo-a")
            with trio.fail_after(30):  # a hang guard
                await cb.names_published()
                await ca.names_published()
                await ca.wait_for_name("col-b")
                await ca.wait_for_name("echo-b")
                await cb.wait_for_name("echo-a")
                sent = 0

                async def send_all() -> None:
                    nonlocal sent
                    for i in range(total):
                        await ka.send("col-b", i)
                        sent += 1

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(send_all)
                    await until(lambda: len(collected) >= 300)
                    proxy.stall("a", "data", upstream=upstream)
                    await until(lambda: ("a", "data", upstream) in proxy.held_back)
                    stalled_at = len(collected)
                    results: list[Any] = []

                    async def ask(kernel: Any, name: str) -> None:
                        try:
                            results.append(await kernel.request(name, "q", timeout=1))
                        except RequestTimeout as exc:
                            results.append(type(exc).__name__)

                    async with trio.open_nursery() as asks:
                        asks.start_soon(ask, ka, "echo-b")
                        asks.start_soon(ask, kb, "echo-a")
                    await trio.sleep(STALL - 1)
                    # held back: b took nothing past the chunk cut in two, a waits for credit
                    assert len(collected) - stalled_at <= 64
                    assert sent < total
                    proxy.resume("a", "data", upstream=upstream)
                assert results == ["RequestTimeout", "RequestTimeout"]
                await until(lambda: len(collected) == total)
                assert await ka.request("echo-b", 1, timeout=5) == 1
                assert await kb.request("echo-a", 2, timeout=5) == 2
            assert collected == list(range(total))
            sa, sb = ca.stats(), cb.stats()
            assert sb.lost_in_transit == 0 and sa.lost_in_transit == 0
            assert sa.publish_failures == 0 and sb.publish_failures == 0
            assert sa.lost_with_nodes == 0 and sb.lost_with_nodes == 0
            for cluster in (ca, cb):
                assert all(info.reachable for info in cluster.member_list())
            # each timed-out query ends once: its answer late (``late_reply`` where it
            # comes), or skipped after its cancel (``request_timeout`` where it was sent)
            letters = Counter(ka.stats().dead_letters_by_reason)
            letters.update(kb.stats().dead_letters_by_reason)
            assert sum(letters.values()) == 2, letters
            assert set(+letters) <= {"late_reply", "request_timeout"}, letters
            assert proxy.cuts == {}
    finally:
        proxy.close()


def _counted_a_to_c(ca: Any, cc: Any) -> int:
    """Tells a sent c counted lost on either side (c: lost in transit, refused on
    arrival; a: failed publishes, lost with c, net of what c took after all)."""
    sa, sc = ca.stats(), cc.stats()
    return (
        sc.lost_in_transit
        + sum(sc.inbound_dropped.values())
        + sa.publish_failures
        + sa.lost_with_nodes
    )


async def test_a_node_back_under_its_name_right_after_its_loss_leaves_every_tell_counted_once(
    nats: NatsServer,
) -> None:
    """c is cut off from the server (its connections cut and refused) while a sends to
    it without pause, until a judges c lost, and let through at once: c comes back
    under its name, the same process and join. Every tell a accepted for c is then
    handled by c or counted lost on exactly one side, c's collector holds no
    duplicate, both nodes hear each other again, and a's window to c opens again."""
    assert nats.port is not None
    proxy = NatsProxy(nats.port)
    records: list[Any] = []
    try:
        async with (
            _node(nats.url, "a", node_window=64) as (ka, ca),
            _node(proxy.url, "c", node_window=64) as (kc, cc),
        ):
            kc.spawn(collector(records), name="col-c")
            with trio.fail_after(40):  # a hang guard
                await cc.names_published()
                await ca.wait_for_name("col-c")
                accepted = refused = 0
                target, reached = 300, trio.Event()

                async def produce() -> None:
                    nonlocal accepted, refused, target, reached
                    number = 0
                    while True:
                        try:
                            await ka.send("col-c", number)
                            accepted += 1
                        except (TransportUnavailable, MailboxFull, AgentNotFound):
                            refused += 1
                            await trio.sleep(0.01)
                        number += 1
                        if accepted >= target:
                            reached.set()
                        if number % 16 == 0:
                            await trio.lowlevel.checkpoint()

                async with trio.open_nursery() as nursery, ka.events() as events:
                    nursery.start_soon(produce)
                    await reached.wait()
                    proxy.refuse("c")
                    async for event in events:
                        if event.kind is EventKind.UNREACHABLE and event.name == "node:c":
                            break
                    proxy.refuse("c", False)
                    await until(
                        lambda: all(
                            info.reachable for cluster in (ca, cc) for info in cluster.member_list()
                        )
                    )
                    target, reached = accepted + 1000, trio.Event()
                    await reached.wait()
                    nursery.cancel_scope.cancel()
                await until(lambda: len(records) + _counted_a_to_c(ca, cc) >= accepted)
                await until(lambda: _c_confirmed_all(ca))
            sa, sc = ca.stats(), cc.stats()
            counted = _counted_a_to_c(ca, cc)
            assert len(records) + counted == accepted, (len(records), counted, accepted, sa, sc)
            assert records == sorted(set(records))  # in order, no duplicates
            assert sa.nodes_lost >= 1
            assert sc.lost_in_transit == 0 or sa.lost_with_nodes == 0, (sa, sc)
    finally:
        proxy.close()


def _c_confirmed_all(ca: Any) -> bool:
    """c took every number a gave it, and a heard so in c's record."""
    info = ca.members.members["c"]
    numbered = ca._seq_out.get(("c", info.id_prefix), 0)
    return bool(info.confirmed(ca.stream_name) == numbered > 0)
