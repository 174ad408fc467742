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

import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import trio
from nats import errors as nats_errors
from nats.js.api import StreamConfig

from nexus_trio import Context, Kernel, Message, agent
from nexus_trio._nats import Cluster, DurableOptions, NatsServer
from nexus_trio._nats import _wire as wire
from nexus_trio._nats._aio import call_aio
from nexus_trio._nats._durable import FORWARD_HOPS, FORWARDS_HEADER
from nexus_trio._throttle import Throttle

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


async def _running_on_b(ca: Cluster, kb: Kernel, cb: Cluster, handler: Any, name: str) -> None:
    """Spawn ``handler`` (named ``name``) on b and wait until a knows it runs there."""
    kb.spawn(handler)
    await cb.names_published()
    await until(lambda: ca.name_holder(name) is not None)
    await until(lambda: "b" in ca.live_nodes())


@contextlib.asynccontextmanager
async def _a_and_b_running(nats: NatsServer, name: str) -> AsyncIterator[tuple[Cluster, Cluster]]:
    """Nodes a and b, an agent named ``name`` (it answers "ok") running on b, a knowing it."""

    @agent(name=name)
    async def answers(ctx: Context, msg: Message) -> Any:
        return "ok"

    async with (
        local_node(nats.url, "a", durable=DURABLE) as (_ka, ca),
        local_node(nats.url, "b", durable=DURABLE) as (kb, cb),
    ):
        with trio.fail_after(20):
            await _running_on_b(ca, kb, cb, answers, name)
        yield ca, cb


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
            await _running_on_b(ca, kb, cb, moved, "moved-a")
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
    disagree), or whose forwards header is no number (anyone may publish one: "-1",
    "\u00b2", a digit int() does not read, which raised in the pull), is not
    forwarded again: it is nakked as a missing agent's and dead after max_deliver, as
    before, counted."""
    async with _a_and_b_running(nats, "bounced-a") as (ca, cb):
        with trio.fail_after(20):
            await store_for(ca, "bounced-a", 1, **{FORWARDS_HEADER: str(FORWARD_HOPS)})
            await store_for(ca, "bounced-a", 2, **{FORWARDS_HEADER: "-1"})
            # a digit that is no decimal digit: str.isdigit() takes it, int() does not
            await store_for(ca, "bounced-a", 3, **{FORWARDS_HEADER: "\u00b2"})
            await until(lambda: ca.stats().durable_dead >= 3)
            await _stream_empty(ca)
        a, b = ca.stats(), cb.stats()
    assert (a.durable_forwarded, a.durable_dead, b.durable_acked) == (0, 3, 0)


async def test_a_durable_message_whose_forward_fails_at_its_last_delivery_is_dead_counted(
    nats: NatsServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A forward that JetStream does not take is nakked and tried again; at the message's
    last delivery (max_deliver) such a nak was delivered no more: the message stayed in
    the stream, neither handled nor counted (durable_dead 0). Now it is dead there,
    counted, and the stream is empty. Its WARNING lines (one a failed forward: an outage
    was one a delivery of every message) are throttled, each kind its own: one line
    with the count so far (the throttles' clock stands still here), the rest said at the
    leave."""
    caplog.set_level(logging.WARNING, logger="nexus_trio.nats")
    async with _a_and_b_running(nats, "unstored-a") as (ca, cb):
        ca.durable._forward_failed_log = Throttle(1.0, clock=lambda: 0.0)
        ca.durable._unforwarded_log = Throttle(1.0, clock=lambda: 0.0)
        js = ca.data_js
        real = js.publish
        forwards: list[str] = []

        async def publish(subject: str, payload: bytes = b"", **kwargs: Any) -> Any:
            if subject.startswith(f"{ca.prefix}.durable.b."):
                forwards.append(subject)
                raise nats_errors.TimeoutError
            return await real(subject, payload, **kwargs)

        with trio.fail_after(20):
            monkeypatch.setattr(js, "publish", publish)
            await store_for(ca, "unstored-a", 1)
            await until(lambda: ca.stats().durable_dead >= 1)
            await _stream_empty(ca)
        a, b = ca.stats(), cb.stats()
    assert len(forwards) == DURABLE.max_deliver
    assert (a.durable_forwarded, a.durable_dead, b.durable_acked) == (0, 1, 0)
    # (forty-third pass: the counts its lines say, counters of their own)
    assert (a.durable_forward_failures, a.durable_dead_reasons["unforwarded"]) == (
        DURABLE.max_deliver - 1,
        1,
    )
    lines = [r.getMessage() for r in caplog.records if r.name == "nexus_trio.nats.durable"]
    nakked = [line for line in lines if line.endswith("(nakked: tried again) (1 so far)")]
    assert len(nakked) == 1, lines
    assert len([line for line in lines if "(nakked: tried again)" in line]) == 1, lines
    held = DURABLE.max_deliver - 2  # (the first logged, the last one dead)
    tail = f"node a: {held} more failed forwards of durable messages after the last line"
    assert len([line for line in lines if line.startswith(tail)]) == 1, lines
    dead = [line for line in lines if "dead after 3 deliveries (last: not forwarded" in line]
    assert len(dead) == 1 and dead[0].endswith("that node handles it) (1 so far)"), lines


async def test_a_durable_message_too_big_for_its_forward_s_headers_waits_where_it_is(
    nats: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A message that fit in max_payload with its own header, but not with the forward's
    (a longer Nats-Msg-Id, Nexus-Forwards): forwarded, the server closed the node's data
    connection (Maximum Payload Violation), for good. Now it is not forwarded: it waits
    as a missing agent's message, dead after max_deliver, counted; the connection stays.
    Its WARNING line (one a delivery) is throttled: one line with the count so far (the
    throttle's clock stands still here), the rest said at the leave."""
    caplog.set_level(logging.WARNING, logger="nexus_trio.nats")
    async with _a_and_b_running(nats, "big-a") as (ca, cb):
        ca.durable._too_big_log = Throttle(1.0, clock=lambda: 0.0)
        with trio.fail_after(30):
            msg = Message(sender=uuid.uuid4(), to="big-a", payload="")
            headers = {wire.MSG_ID_HEADER: str(msg.id)}
            room = ca.max_payload() - wire.header_bytes(headers) - len(wire.encode_message(msg))
            msg = msg.evolve(payload="x" * room)
            data = wire.encode_message(msg)
            assert len(data) + wire.header_bytes(headers) == ca.max_payload()
            await call_aio(
                ca.data_js.publish,
                wire.durable_subject(ca.prefix, "a", uuid.uuid4()),
                data,
                headers=headers,
            )
            await until(lambda: ca.stats().durable_dead >= 1)
            await _stream_empty(ca)
        a, b = ca.stats(), cb.stats()
        assert not ca.nc.is_closed
    assert (a.durable_forwarded, a.durable_dead, b.durable_acked) == (0, 1, 0)
    # (forty-third pass: the count its line says, a counter of its own)
    # (fifty-sixth pass: no handler ran, so agent_missing, where it was failed before)
    assert (a.durable_too_big, a.durable_dead_reasons["agent_missing"]) == (DURABLE.max_deliver, 1)
    lines = [r.getMessage() for r in caplog.records if r.name == "nexus_trio.nats.durable"]
    big = [line for line in lines if "more than NATS takes in one message" in line]
    assert len(big) == 1 and big[0].endswith("it waits here (1 so far)"), lines
    held = DURABLE.max_deliver - 1  # (each delivery but the first)
    tail = f"node a: {held} more durable messages too big to forward after the last line"
    assert len([line for line in lines if line.startswith(tail)]) == 1, lines


async def _forward_waits_for_room(
    url: str,
    caplog: pytest.LogCaptureFixture,
    hold: float,
    *,
    fill: Callable[[Cluster], Awaitable[None]] | None = None,
    **durable: Any,
) -> tuple[list[Any], Any, Any, list[str]]:
    """Nodes a and b (``durable``: the options changed): an agent on b holds a message
    (``"held"``, or ``_BIG`` bytes when ``fill``) until ``hold`` s after a's first
    failed forward, a message for a name that moved to b (``"moved"``, or as big) is
    stored on a's subject after ``fill(a)``; what was handled (the payloads, or their
    sizes), a's and b's stats once b acked both or a counted one dead, and a's lines of
    refused forwards."""
    options = DurableOptions(
        ack_wait=30.0,
        max_deliver=3,
        redelivery_delay=0.01,
        missing_agent_delay=1.0,
        missing_agent_delay_max=15.0,
        **durable,
    )
    release = trio.Event()
    handled: list[Any] = []

    def payload(text: str) -> str:
        return text if fill is None else text[0] * _BIG

    def took(msg: Message) -> None:
        handled.append(msg.payload if fill is None else len(msg.payload))

    @agent(name="moved-a")
    async def moved(ctx: Context, msg: Message) -> Any:
        took(msg)
        return "ok"

    @agent(name="holds-b")
    async def holds(ctx: Context, msg: Message) -> Any:
        await release.wait()
        took(msg)
        return "ok"

    async with (
        local_node(url, "a", durable=options) as (_ka, ca),
        local_node(url, "b", durable=options) as (kb, cb),
    ):
        with trio.fail_after(20):
            await _running_on_b(ca, kb, cb, holds, "holds-b")
            await _running_on_b(ca, kb, cb, moved, "moved-a")
            if fill is not None:
                await fill(ca)
            await ca.send_durable("holds-b", payload("held"))
            await store_for(ca, "moved-a", payload("moved"))
            await until(lambda: ca.stats().durable_forward_failures >= 1)
        with trio.move_on_after(hold):  # (the old naks: all deliveries used up by then)
            await until(lambda: ca.stats().durable_dead >= 1)
        release.set()
        with trio.move_on_after(20):
            await until(lambda: cb.stats().durable_acked >= 2 or ca.stats().durable_dead >= 1)
            await _stream_empty(ca)
        a, b = ca.stats(), cb.stats()
    lines = [r.getMessage() for r in caplog.records if r.name == "nexus_trio.nats.durable"]
    return handled, a, b, [line for line in lines if "(nakked: tried again)" in line]


async def test_a_forward_the_full_stream_refuses_waits_for_room_and_says_which_limit(
    nats: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Fifty-fifth pass: a forward's copy needs a place in the stream before the message
    it copies leaves; a stream full to its ``max_messages`` (discard new) refused it, and
    the message was nakked for ``redelivery_delay``: its ``max_deliver`` deliveries used up
    in a tenth of a second, dead (``unforwarded``) though the stream had room as soon as
    another message was handled, the lines saying only ``ServiceUnavailableError()``
    (measured: ``max_messages`` 2, two messages for a name that moved, both dead in
    0.09 s). A refused copy is now nakked with a missing agent's growing delay (here 1 s,
    then 2 s), and the lines say the limit. Here the stream holds 2 of 2: one in the
    hands of an agent on b until half a second after the first refusal, one for a name
    that moved to b. (On main's _durable.py swapped in: ``durable_dead`` 1, forwarded 0,
    the line without the limit.)"""
    caplog.set_level(logging.WARNING, logger="nexus_trio.nats")
    handled, a, b, refused = await _forward_waits_for_room(nats.url, caplog, 0.5, max_messages=2)
    assert sorted(handled) == ["held", "moved"]
    assert (a.durable_dead, a.durable_forwarded, b.durable_acked) == (0, 1, 2)
    assert refused, caplog.records
    assert (
        "ServiceUnavailableError() (full: the stream's max_messages, 2 if this node made it)"
        in refused[0]
    )


#: the bytes of each payload of the server-storage test: far above what the buckets'
#: writes add while it runs, far under NATS's max_payload
_BIG = 200_000


async def _fill(cluster: Cluster, used: int) -> None:
    """Store in a stream of the test until the server's JetStream storage holds ``used``
    bytes (the last message cut to fit)."""
    await call_aio(cluster.data_js.add_stream, StreamConfig(name="filler", subjects=["filler"]))
    while (left := used - (await call_aio(cluster.data_js.account_info)).storage) > 100:
        await call_aio(cluster.data_js.publish, "filler", b"f" * min(left - 50, _BIG))


async def test_a_forward_the_servers_full_storage_refuses_waits_for_room_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Fifty-sixth pass: JetStream refuses a publish past the server's JetStream storage
    (its ``max_file_store``) with code 10023, ``insufficient resources``, not the
    stream's 10077: a forward's copy refused so was nakked for ``redelivery_delay``, its
    ``max_deliver`` deliveries used up in a tenth of a second, dead (``unforwarded``)
    though the storage had room once another message left, the line saying only
    ``ServiceUnavailableError()``. It waits the growing delay of a full stream now, its
    line naming the server's storage. Here a stream of the test fills the server's
    storage but room for one big message and a half (nats-server refuses a publish once
    its storage is past the limit, not one that would pass it): one held by an agent on
    b until 2 s after the first refusal, one for a name that moved to b, whose copy finds
    no room. (On main's _durable.py swapped in: ``durable_dead`` 1, forwarded 0, b
    acked 1, dead 0.02 s after the first refusal, the line without the storage.)"""
    caplog.set_level(logging.WARNING, logger="nexus_trio.nats")
    storage = 16 * _BIG

    async def fill(cluster: Cluster) -> None:
        await _fill(cluster, storage - 3 * _BIG // 2)

    # (the growing delay's third delivery, the last, is 3 s after the first)
    with NatsServer(config=f"jetstream {{ max_file_store: {storage} }}") as server:
        handled, a, b, refused = await _forward_waits_for_room(server.url, caplog, 2.0, fill=fill)
    assert handled == [_BIG, _BIG]
    assert (a.durable_dead, a.durable_forwarded, b.durable_acked) == (0, 1, 2)
    assert refused, caplog.records
    assert (
        "ServiceUnavailableError() (full: the server's JetStream storage: insufficient"
        " resources) (nakked: tried again)" in refused[0]
    )
