"""A durable message by name whose agent moved to another node (fortieth pass, issue 14).

Stored on the subject of the node its sender knew (the name was there: the agent was
re-placed after a loss, rebalanced, or spawned again elsewhere since), it found no agent
of its name there: nakked with a growing delay, it waited out ``max_deliver`` (about 15 s
with the defaults) and was dead, though the agent ran on another node all along. Now the
node it reached forwards it to the node the names bucket gives the name (stored there,
acked here), as Akka's cluster sharding hands a message for a shard that moved to its
new region. Real nats-server, two kernels.
"""

from __future__ import annotations

import uuid
from typing import Any

import trio

from nexus_trio import Context, Message, agent
from nexus_trio._nats import Cluster, DurableOptions, NatsServer
from nexus_trio._nats._aio import call_aio
from nexus_trio._nats._durable import FORWARD_HOPS, FORWARDS_HEADER

from .nats_server import until
from .test_durable_missing_agent import store_for
from .test_nats import local_node

#: no missing-agent wait long enough to let a test pass by redelivery to the right node
DURABLE = DurableOptions(
    ack_wait=30.0,
    max_deliver=3,
    redelivery_delay=0.01,
    missing_agent_delay=0.05,
    missing_agent_delay_max=0.1,
)


async def _stream_empty(cluster: Cluster) -> None:
    stream = f"{cluster.prefix}-durable"

    async def empty() -> bool:
        info = await call_aio(cluster.data_js.stream_info, stream)
        return bool(info.state.messages == 0)

    while not await empty():  # noqa: ASYNC110 (the stream on the server: no event)
        await trio.sleep(0.05)


async def test_a_durable_message_for_a_name_that_moved_is_forwarded_and_handled_once(
    nats: NatsServer,
) -> None:
    """Stored for a, its agent on b: a forwards it (counted), b's agent handles it once
    with its id, and the stream is empty; a counts no missing agent and nothing dead.
    (On the old code a nakked it three times and it was dead: durable_dead 1.)"""
    handled: list[tuple[uuid.UUID, Any]] = []

    @agent(name="moved-a")
    async def moved(ctx: Context, msg: Message) -> Any:
        handled.append((msg.id, msg.payload))
        return "ok"

    async with (
        local_node(nats.url, "a", durable=DURABLE) as (_ka, ca),
        local_node(nats.url, "b", durable=DURABLE) as (kb, cb),
    ):
        with trio.fail_after(20):
            kb.spawn(moved)
            await cb.names_published()
            await until(lambda: ca.name_holder("moved-a") is not None)
            await until(lambda: "b" in ca.live_nodes())
            sent = await store_for(ca, "moved-a", "invoice 7")
            await until(lambda: cb.stats().durable_acked >= 1)
            await _stream_empty(ca)
        a, b = ca.stats(), cb.stats()
    assert handled == [(sent.id, "invoice 7")]
    assert (a.durable_forwarded, a.durable_agent_missing, a.durable_dead) == (1, 0, 0)
    assert (b.durable_forwarded, b.durable_acked, b.durable_dead) == (0, 1, 0)


async def test_a_durable_message_forwarded_too_often_waits_where_it_is(
    nats: NatsServer,
) -> None:
    """A message forwarded FORWARD_HOPS times already (nodes whose views of the name
    disagree), or whose forwards header is no number (anyone may publish one), is not
    forwarded again: it is nakked as a missing agent's and dead after max_deliver, as
    before, counted."""
    async with (
        local_node(nats.url, "a", durable=DURABLE) as (_ka, ca),
        local_node(nats.url, "b", durable=DURABLE) as (kb, cb),
    ):

        @agent(name="bounced-a")
        async def bounced(ctx: Context, msg: Message) -> Any:
            return "ok"

        with trio.fail_after(20):
            kb.spawn(bounced)
            await cb.names_published()
            await until(lambda: ca.name_holder("bounced-a") is not None)
            await store_for(ca, "bounced-a", 1, **{FORWARDS_HEADER: str(FORWARD_HOPS)})
            await store_for(ca, "bounced-a", 2, **{FORWARDS_HEADER: "-1"})
            await until(lambda: ca.stats().durable_dead >= 2)
            await _stream_empty(ca)
        a, b = ca.stats(), cb.stats()
    assert (a.durable_forwarded, a.durable_dead, b.durable_acked) == (0, 2, 0)
