"""Durable messages stored for a node that is lost (fortieth pass, issue 14).

Stored on the subject of a node that is then SIGKILLed and never comes back, they were
pulled by no one: accepted (``send_durable`` had returned) and left in the stream until
its ``max_age``, then gone uncounted. Now one survivor, the rendezvous owner of
``durable:<node>`` over the reachable members, pulls the lost node's consumer: a message
by name goes to where its name runs now (forwarded), or waits with the missing-agent
delays while it runs nowhere, dead after ``max_deliver``; a message by agent id is dead at
once (the agent died with its node). Counted in ``durable_taken_over``. Once the node is
forgotten and its consumer drained, the consumer is deleted. A process that comes back
under the lost node's name mid-takeover pulls the same consumer: each message is handled
once. Real nats-server; the lost node is a child process, SIGKILLed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import nats.errors
import nats.js.errors
import pytest
import trio

from nexus_trio import Context, Kernel, Message, agent
from nexus_trio._nats import Cluster, DurableOptions, NatsServer
from nexus_trio._nats import _wire as wire
from nexus_trio._nats._aio import call_aio
from nexus_trio._nats._durable import _Waiting, taken_bound
from nexus_trio._nats._membership import NodeInfo, monotonic
from nexus_trio._nats._placement import rendezvous_owner
from nexus_trio._throttle import Throttle

from .nats_server import PATIENT, NodeProcess, consumer_settled, until
from .test_durable_missing_agent import ONE_SLOT_LONG_WAIT, store_for
from .test_durable_moved_name import DURABLE, _stream_empty
from .test_nats import local_node

#: (the ``nats`` fixture hides the module inside the tests that take it)
_NotFound = nats.js.errors.NotFoundError
_FetchTimeout = nats.errors.TimeoutError


async def _store_for_id(cluster: Cluster, node: str, agent_id: uuid.UUID) -> Message:
    """Store a durable message for agent ``agent_id`` of ``node`` (as ``send_durable``
    did before the node was lost)."""
    msg = Message(sender=uuid.uuid4(), to=agent_id, payload="for the id")
    await call_aio(
        cluster.data_js.publish,
        wire.durable_subject(cluster.prefix, node, agent_id),
        wire.encode_message(msg),
        headers={wire.MSG_ID_HEADER: str(msg.id)},
    )
    return msg


async def _lost_child(
    url: str, *survivors: Cluster, name: str = "c", ack_wait: float = PATIENT.durable.ack_wait
) -> NodeProcess:
    """Child node ``name`` started (its durable consumer's ``ack_wait`` given), seen by
    the survivors, SIGKILLed and judged lost."""
    child = await NodeProcess(url, name, ack_wait=ack_wait).start()
    await until(lambda: all(name in s.live_nodes() for s in survivors))
    await _kill(child, *survivors)
    return child


async def _kill(child: NodeProcess, *survivors: Cluster) -> None:
    """SIGKILL ``child``; return once the survivors judged it lost."""
    child.kill()
    assert child.process is not None
    await child.process.wait()
    await until(lambda: all(child.node not in s.live_nodes() for s in survivors))


async def consumer_deleted(cluster: Cluster, node: str) -> None:
    """Return once ``node``'s durable consumer is gone from the server (polled: the
    server's state, no event here)."""
    stream = f"{cluster.prefix}-durable"
    while True:
        try:
            await call_aio(cluster.data_js.consumer_info, stream, node)
        except _NotFound:
            return
        await trio.sleep(0.05)


def _keeper(handled: list[tuple[uuid.UUID, Any]], name: str) -> Any:
    @agent(name=name)
    async def keep(ctx: Context, msg: Message) -> Any:
        handled.append((msg.id, msg.payload))
        return "ok"

    return keep


@asynccontextmanager
async def _survivors(
    url: str, handled: list[tuple[uuid.UUID, Any]], **options: Any
) -> AsyncIterator[tuple[Kernel, Cluster, Cluster]]:
    """Nodes a and b (``options``), b running ``keeper-a`` (which keeps what it gets in
    ``handled``), a knowing it there: a's kernel, a and b."""
    async with (
        local_node(url, "a", **options) as (ka, ca),
        local_node(url, "b", **options) as (kb, cb),
    ):
        with trio.fail_after(20):
            kb.spawn(_keeper(handled, "keeper-a"))
            await cb.names_published()
            await until(lambda: ca.name_holder("keeper-a") is not None)
        yield ka, ca, cb


async def test_a_lost_node_s_durable_messages_are_forwarded_or_dead_and_its_consumer_dropped(
    nats: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    """c is SIGKILLed with messages stored for it: by the name of an agent on b (two:
    forwarded, handled once each), by c's agent's id (dead: it died with c) and by a
    name nowhere (dead after max_deliver). Exactly one survivor, the rendezvous owner
    of ``durable:c``, takes them (``durable_taken_over`` 4); the stream ends empty, and
    once c is forgotten its drained consumer is deleted. (On the old code nobody pulled
    c's subject: the stream never emptied.) The two dead are logged as their kind's
    throttled lines are: one line with the count so far (the throttles' clock stands
    still here), the other said at the leave."""
    caplog.set_level(logging.ERROR, logger="nexus_trio.nats")
    handled: list[tuple[uuid.UUID, Any]] = []
    child: NodeProcess | None = None
    forget = {"forget_lost_after": 2.0}
    try:
        async with _survivors(nats.url, handled, durable=DURABLE, **forget) as (_ka, ca, cb):
            for cluster in (ca, cb):
                cluster.durable._lost_log = Throttle(1.0, clock=lambda: 0.0)
            with trio.fail_after(40):
                child = await _lost_child(nats.url, ca, cb)
                echo_c = uuid.UUID(child.ids["echo-c"])
                sent = [
                    await store_for(ca, "keeper-a", 1, node="c"),
                    await store_for(ca, "keeper-a", 2, node="c"),
                ]
                await _store_for_id(ca, "c", echo_c)
                await store_for(ca, "nowhere-a", 3, node="c")
                await until(lambda: len(handled) >= 2)
                await until(lambda: ca.stats().durable_dead + cb.stats().durable_dead >= 2)
                await _stream_empty(ca)
                await consumer_deleted(ca, "c")
            stats = {c.node: c.stats() for c in (ca, cb)}
    finally:
        if child is not None:
            await child.stop()
    assert sorted(handled) == sorted((m.id, m.payload) for m in sent)
    taker = rendezvous_owner("durable:c", ["a", "b"])
    other = "a" if taker == "b" else "b"
    t = stats[taker]
    assert (t.durable_taken_over, t.durable_dead) == (4, 2)
    assert t.durable_forwarded == 2
    assert (stats[other].durable_taken_over, stats[other].durable_dead) == (0, 0)
    assert stats["b"].durable_acked == 2
    lines = [r.getMessage() for r in caplog.records if r.name == "nexus_trio.nats.durable"]
    dead = [line for line in lines if line.startswith(f"node {taker}: durable message ")]
    assert len(dead) == 1 and dead[0].endswith(") (1 so far)"), lines
    tail = f"node {taker}: 1 more durable messages of lost nodes terminated after the last"
    assert len([line for line in lines if line.startswith(tail)]) == 1, lines


#: the missing-agent delays give the comeback time to start: 1, 2, 4 s (the lost child's
#: consumer is made with the same ack_wait: see the test)
SLOW_MISSING = DurableOptions(
    ack_wait=30.0,
    max_deliver=4,
    redelivery_delay=0.01,
    missing_agent_delay=1.0,
    missing_agent_delay_max=4.0,
)


@pytest.mark.parametrize("count", [20])
async def test_a_lost_node_that_comes_back_mid_takeover_handles_nothing_twice(
    nats: NatsServer, count: int
) -> None:
    """c is SIGKILLed with messages stored for it: by the name of b's agent (taken over:
    forwarded to b) and by a name nowhere yet (taken over: waiting, nakked). A new c
    comes back under the name while they wait and spawns that name: the survivor's
    takeover ends, c's own pull takes the rest. Every message is handled exactly once,
    nothing is dead, the stream ends empty. (On the old code nobody took c's messages
    before it came back: the wait for the takeover timed out.)

    The lost c's consumer has the new c's ``ack_wait``: made by a child with FAST's 1 s,
    the new c's 30 s changed it at the join, and what the survivor had nakked (a 1-4 s
    delay) was not delivered again for ~30 s (seen: 20 unacked, the consumer's delivered
    count still, 24 s after the join; nats-server seems to date a nak's delay from the
    ack_wait at the nak). The test took 34-35 s at load 15 and failed its 40 s bound at
    load 20; now the comeback's wait is the delays'. The child's start (15 s and more,
    loaded) is bounded apart from what the test waits for."""
    handled: list[tuple[uuid.UUID, Any]] = []
    later: list[tuple[uuid.UUID, Any]] = []
    child: NodeProcess | None = None
    try:
        async with _survivors(nats.url, handled, durable=SLOW_MISSING) as (_ka, ca, cb):
            with trio.fail_after(60):  # a hang guard (its start alone has this bound)
                child = await _lost_child(nats.url, ca, cb, ack_wait=SLOW_MISSING.ack_wait)
            with trio.fail_after(30):
                sent = [await store_for(ca, "keeper-a", i, node="c") for i in range(count)]
                waiting = [await store_for(ca, "later-a", i, node="c") for i in range(count)]
                survivors = (ca, cb)
                await until(lambda: len(handled) >= count)
                await until(lambda: sum(c.stats().durable_agent_missing for c in survivors) > 0)
                async with local_node(nats.url, "c", durable=SLOW_MISSING) as (kc, cc):
                    kc.spawn(_keeper(later, "later-a"))
                    await until(lambda: len(later) >= count)
                    await _stream_empty(cc)
                    back = cc.stats()
            stats = [c.stats() for c in survivors]
    finally:
        if child is not None:
            await child.stop()
    assert sorted(handled) == sorted((m.id, m.payload) for m in sent)
    assert sorted(later) == sorted((m.id, m.payload) for m in waiting)
    assert sum(s.durable_dead for s in stats) + back.durable_dead == 0
    assert sum(s.durable_taken_over for s in stats) >= count


async def test_when_the_survivor_taking_over_is_lost_too_the_next_owner_takes_over(
    nats: NatsServer,
) -> None:
    """Children f and d; d is SIGKILLed and f, the rendezvous owner of ``durable:d`` over
    a, b and f, takes d's messages over (a message by b's agent's name, forwarded: f
    counts it). f is SIGKILLed in turn: a, the owner over a and b, takes d's messages
    over from then (the next one is handled, a counts it). (On the old code nobody
    took d's messages: the first wait timed out.)"""
    assert rendezvous_owner("durable:d", ["a", "b", "f"]) == "f"
    assert rendezvous_owner("durable:d", ["a", "b"]) == "a"
    handled: list[tuple[uuid.UUID, Any]] = []
    children: list[NodeProcess] = []
    try:
        async with _survivors(nats.url, handled, durable=DURABLE) as (ka, ca, cb):
            with trio.fail_after(60):
                f = NodeProcess(nats.url, "f")
                children.append(f)
                await f.start()
                await until(lambda: all("f" in c.live_nodes() for c in (ca, cb)))
                # (d, a child too: it cannot be in children before it started)
                d = NodeProcess(nats.url, "d")
                children.append(d)
                await d.start()
                await until(lambda: all("d" in c.live_nodes() for c in (ca, cb)))
                await _kill(d, ca, cb)
                first = await store_for(ca, "keeper-a", "via f", node="d")
                await until(lambda: len(handled) >= 1)
                on_f = await ka.request("stats-f", None)
                assert on_f["durable_taken_over"] == 1
                await _kill(f, ca, cb)
                second = await store_for(ca, "keeper-a", "via a", node="d")
                await until(lambda: len(handled) >= 2)
                await _stream_empty(ca)
            a, b = ca.stats(), cb.stats()
    finally:
        for child in children:
            await child.stop()
    assert handled == [(first.id, "via f"), (second.id, "via a")]
    assert (a.durable_taken_over, b.durable_taken_over) == (1, 0)


async def test_a_by_id_message_the_takeover_fetched_once_its_node_was_heard_again_goes_back_to_it(
    nats: NatsServer,
) -> None:
    """Item 4 of the forty-second pass: a takeover's batch is settled after its fetch
    returns, when the lost node may have been heard again. A message by id for an agent of
    that node's *same* process (it was frozen or cut off, not restarted: its record's id
    prefix is the agent's) went dead, also one sent once the node was back; it is nakked
    back to the node's consumer now (``durable_given_back``), which the node pulls itself
    again: JetStream delivers it again (delivery 2, same body), nothing acked. One for an
    agent of an earlier process of the name (a restart: another id prefix) is still dead.
    Real nats-server; c's record is set by hand (heard again while the batch was out)."""
    same, earlier = 0xC0FFEE, 0xBADC0DE
    async with local_node(nats.url, "a", durable=DURABLE) as (_ka, ca):
        with trio.fail_after(15):
            back = await _store_for_id(ca, "c", uuid.UUID(int=(same << 64) | 1))
            gone = await _store_for_id(ca, "c", uuid.UUID(int=(earlier << 64) | 1))
            psub = await call_aio(ca.durable._subscribe, "c")
            first = await call_aio(psub.fetch, 2, timeout=5.0)
            assert len(first) == 2
            # heard again while the batch was out (its heartbeat: not judged lost in the test)
            ca.members.members["c"] = NodeInfo(
                "c", same, 1, "h", 0.0, {}, monotonic() + 3600, reachable=True, durable=True
            )
            for jsmsg in first:
                ca.durable._take("c", jsmsg, _Waiting(4))
            again = await call_aio(psub.fetch, 1, timeout=5.0)
            stats = ca.stats()
            await call_aio(again[0].ack)
            del ca.members.members["c"]
    assert wire.decode_message(again[0].data).id == back.id
    assert again[0].metadata.num_delivered == 2
    assert (stats.durable_given_back, stats.durable_dead, stats.durable_taken_over) == (1, 1, 1)
    assert gone.id != back.id  # (the dead one: terminated, not delivered again)


async def test_messages_waiting_on_a_lost_node_s_consumer_leave_slots_to_its_other_messages(
    nats: NatsServer,
) -> None:
    """Forty-second pass: c is SIGKILLed, its consumer has 4 unacknowledged slots
    (``max_ack_pending``; a node makes it ``4 x max_in_flight``; its ``ack_wait`` 30 s, not
    the child's 1 s, so that a loaded machine redelivers nothing); stored for it: 4 messages
    by a name that runs nowhere, then one by the name of a's agent. The takeover's naks of
    the 4 (missing-agent delays) held all 4 slots, and JetStream delivered the fifth no
    more until they died (60 s here; 15 s at the default delays): the wait timed out. As
    on a node's own consumer, at most 3/4 of the slots wait now: the fourth is terminated
    (``durable_wait_full``, dead, taken over), and the fifth is forwarded and handled."""
    handled: list[tuple[uuid.UUID, Any]] = []
    child: NodeProcess | None = None
    stream = "-durable"
    try:
        async with local_node(nats.url, "a", durable=ONE_SLOT_LONG_WAIT) as (ka, ca):
            ka.spawn(_keeper(handled, "keeper-a"))
            stream = f"{ca.prefix}-durable"
            with trio.fail_after(40):  # (a hang guard: a child's start is slow when loaded)
                child = await NodeProcess(nats.url, "c").start()
                await until(lambda: "c" in ca.live_nodes())
                info = await call_aio(ca.data_js.consumer_info, stream, "c")
                await call_aio(
                    ca.data_js.add_consumer,
                    stream,
                    config=info.config.evolve(max_ack_pending=4, ack_wait=30.0),
                )
                await _kill(child, ca)
            with trio.fail_after(15):
                for n in range(4):
                    await store_for(ca, "nowhere-a", n, node="c")
                sent = await store_for(ca, "keeper-a", "not held up", node="c")
                await until(lambda: len(handled) >= 1)
                await until(lambda: ca.stats().durable_taken_over >= 2)
                consumer = await consumer_settled(ca, stream, "c", 3)
            stats = ca.stats()
    finally:
        if child is not None:
            await child.stop()
    assert handled == [(sent.id, "not held up")]
    assert (consumer.num_ack_pending, consumer.num_pending) == (3, 0)
    assert _takeover_counts(stats) == _THREE_WAIT_ONE_FULL


async def test_a_takeover_s_fetches_that_get_no_answer_are_counted_and_it_goes_on_after() -> None:
    """Forty-second pass: the takeover's fetches of a lost node's consumer asked no idle
    heartbeats, so one JetStream did not answer at all (here the nats-server hung by
    SIGSTOP behind connections that stay up) read as an idle poll: the messages waited,
    nothing counted. They ask heartbeats as the node's own fetches do now: such a fetch
    is counted in ``durable_fetch_failures{takeover}`` (idle polls count nothing), and
    the takeover goes on once the server does (a message stored then is handled)."""
    handled: list[tuple[uuid.UUID, Any]] = []
    child: NodeProcess | None = None
    server = await trio.to_thread.run_sync(NatsServer().start)
    try:
        async with local_node(server.url, "a", durable=DURABLE) as (ka, ca):
            ka.spawn(_keeper(handled, "keeper-a"))
            with trio.fail_after(40):  # (a hang guard: a child's start is slow when loaded)
                child = await _lost_child(server.url, ca)
            durable = ca.durable
            with trio.fail_after(15):
                await store_for(ca, "keeper-a", "before", node="c")
                await until(lambda: len(handled) >= 1)  # (the takeover pulls)
                assert durable.takeover_fetch_failures == 0
                os.kill(server.pid, signal.SIGSTOP)
                try:
                    await until(lambda: durable.takeover_fetch_failures >= 1)
                finally:
                    os.kill(server.pid, signal.SIGCONT)
                sent = await store_for(ca, "keeper-a", "after", node="c")
                await until(lambda: len(handled) >= 2)
            stats = ca.stats()
    finally:
        if child is not None:
            await child.stop()
        server.stop()
    assert handled[1] == (sent.id, "after")
    assert stats.durable_fetch_failures["takeover"] == durable.takeover_fetch_failures >= 1
    assert stats.durable_dead == 0


#: a takeover's outcomes when 3 of its messages wait, the next is terminated (too many
#: wait) and a message by a name that runs is forwarded
_THREE_WAIT_ONE_FULL: dict[str, int] = {
    "agent_missing": 3,
    "wait_full": 1,
    "dead": 1,
    "taken_over": 2,
    "forwarded": 1,
}


def _takeover_counts(stats: Any) -> dict[str, int]:
    """A takeover's outcomes in ``stats`` (a ClusterStats)."""
    counts = ("agent_missing", "wait_full", "dead", "taken_over", "forwarded")
    return {key: getattr(stats, f"durable_{key}") for key in counts}


def _lost_record(reachable: bool = False) -> NodeInfo:
    """A member record of node c (made by hand: no process of c runs), lost or heard."""
    return NodeInfo(
        "c", 0xC0FFEE, 1, "h", 0.0, {}, monotonic() + 3600, reachable=reachable, durable=True
    )


@asynccontextmanager
async def _a_and_c_of_four_slots(
    url: str, handled: list[tuple[uuid.UUID, Any]]
) -> AsyncIterator[tuple[Cluster, Any]]:
    """Node a (``ONE_SLOT_LONG_WAIT``) running ``keeper-a`` (which keeps what it gets in
    ``handled``), and node c's durable consumer with 4 unacknowledged slots (as a node of
    ``max_in_flight`` 1 made it with ``max_waiting`` 0), ``ack_wait`` 30 s: a, and a pull
    subscription of that consumer. c's record (set by hand) is dropped at the end."""
    async with local_node(url, "a", durable=ONE_SLOT_LONG_WAIT) as (ka, ca):
        ka.spawn(_keeper(handled, "keeper-a"))
        try:
            with trio.fail_after(10):
                stream = f"{ca.prefix}-durable"
                psub = await call_aio(ca.durable._subscribe, "c")
                info = await call_aio(ca.data_js.consumer_info, stream, "c")
                config = info.config.evolve(max_ack_pending=4, ack_wait=30.0)
                await call_aio(ca.data_js.add_consumer, stream, config=config)
            yield ca, psub
        finally:
            ca.members.members.pop("c", None)


async def test_a_takeover_counts_the_slots_the_lost_node_held_against_its_waiting_bound(
    nats: NatsServer,
) -> None:
    """Item 2 of the forty-third pass: c's consumer has 4 unacknowledged slots (made with
    ``max_waiting`` 0), and c held one of them when it was lost (fetched, never answered:
    held until its ``ack_wait``, 30 s). The takeover let 3 wait (3/4 of the slots), so
    with c's one all 4 were held and the message by the name of a's agent, stored after
    them, was delivered no more until they died (60 s here): the wait timed out. The
    slots JetStream counts held at the takeover's bind (``num_ack_pending``) count against
    its bound now: 2 wait, the next is terminated (``durable_wait_full``) and a's message
    is forwarded and handled. (c's record is set by hand: no process of it runs.)"""
    handled: list[tuple[uuid.UUID, Any]] = []
    async with _a_and_c_of_four_slots(nats.url, handled) as (ca, psub):
        with trio.fail_after(15):
            await store_for(ca, "nowhere-a", "held by c", node="c")
            held = await call_aio(psub.fetch, 1, timeout=5.0)
            await call_aio(psub.unsubscribe)
            for n in range(3):
                await store_for(ca, "nowhere-a", n, node="c")
            sent = await store_for(ca, "keeper-a", "not held up", node="c")
            ca.members.members["c"] = _lost_record()
            ca.durable.takeovers_changed()
            await until(lambda: len(handled) >= 1)
            await until(lambda: ca.stats().durable_taken_over >= 2)
            consumer = await consumer_settled(ca, f"{ca.prefix}-durable", "c", 3)
        stats = ca.stats()
    assert len(held) == 1
    assert handled == [(sent.id, "not held up")]
    assert (consumer.num_ack_pending, consumer.num_pending) == (3, 0)  # c's one, 2 waiting
    assert _takeover_counts(stats) == {
        "agent_missing": 2,
        "wait_full": 1,
        "dead": 1,
        "taken_over": 2,
        "forwarded": 1,
    }
    assert stats.durable_dead_reasons["wait_full"] == 1
    assert stats.durable_dead_reasons["lost_node"] == 0


async def test_messages_a_takeover_left_waiting_count_against_the_next_takeover_of_the_node(
    nats: NatsServer,
) -> None:
    """Item 1 of the forty-third pass: the waiting bound was per takeover. c lost, its
    takeover let 3 of its messages wait (its bound: 3/4 of 4 slots); c heard again, the
    takeover ended; c lost again, the next takeover began with none counted while the 3
    still held their slots (60 s delays here), let one more wait, and all 4 slots were
    held: a's message stored after it was delivered no more (the wait timed out). One
    bound per consumer now, kept across its takeovers (and the slots held at a bind
    counted, see the test above): the fourth is terminated, a's message handled."""
    handled: list[tuple[uuid.UUID, Any]] = []
    async with _a_and_c_of_four_slots(nats.url, handled) as (ca, psub):
        with trio.fail_after(20):
            await call_aio(psub.unsubscribe)
            for n in range(3):
                await store_for(ca, "nowhere-a", n, node="c")
            ca.members.members["c"] = _lost_record()
            ca.durable.takeovers_changed()
            await until(lambda: ca.stats().durable_agent_missing >= 3)
            ca.members.members["c"] = _lost_record(reachable=True)  # heard again
            await until(lambda: "c" not in ca.durable._takeovers)
            ca.members.members["c"] = _lost_record()  # lost again
            ca.durable.takeovers_changed()
            await store_for(ca, "nowhere-a", 3, node="c")
            sent = await store_for(ca, "keeper-a", "not held up", node="c")
            await until(lambda: len(handled) >= 1)
        stats = ca.stats()
    assert handled == [(sent.id, "not held up")]
    assert _takeover_counts(stats) == _THREE_WAIT_ONE_FULL


def test_a_taken_over_consumer_of_few_slots_keeps_one_for_the_messages_that_do_not_wait() -> None:
    """Item 2 of the forty-third pass: on a consumer with no more than ``4 x
    max_in_flight`` slots three quarters may wait, which was all of them on one of 1 to 3
    slots (``slots - slots // 4``): the takeover could fetch nothing else until they came
    back. One slot is always left now (a consumer of one slot lets none wait)."""
    options = DurableOptions(max_in_flight=1, max_waiting=0)
    bounds = [taken_bound(slots, options) for slots in (1, 2, 3, 4, 5, 8)]
    assert bounds == [0, 1, 2, 3, 1, 4]


#: quick redeliveries of a message whose name runs nowhere: JetStream gives it up within
#: a second once its consumer's max_deliver is lowered under the node's 4
_QUICK_WAITS = attrs.evolve(
    SLOW_MISSING, ack_wait=1.0, missing_agent_delay=0.1, missing_agent_delay_max=0.2
)


async def _once_dead(cluster: Cluster, stream: str) -> tuple[Any, int]:
    """``cluster``'s stats once it counted a message dead (waited for at most 10 s: the
    code before the fix counts none), and how many messages the stream keeps then."""
    with trio.move_on_after(10):
        await until(lambda: cluster.stats().durable_dead >= 1)
    left = (await call_aio(cluster.data_js.stream_info, stream)).state.messages
    return cluster.stats(), left


async def test_a_message_a_lost_node_s_consumer_gave_up_unheard_is_dead_at_its_takeover(
    nats: NatsServer,
) -> None:
    """Fifty-third pass: c's consumer gave a message up (its ``max_deliver`` lowered to 1,
    its one delivery nakked) while no one listened for JetStream's ``MAX_DELIVERIES``
    advisory (c's process gone); the takeover of lost c puts a's ``max_deliver`` back on
    the consumer, which delivers it no more: it stayed in the stream, counted nowhere. The
    takeover looks at the consumer's state as it binds it now: dead
    (``consumer_max_deliver``), deleted. (On main's _durable.py swapped in:
    ``durable_dead`` 0 after 10 s, the stream kept it.)"""
    async with local_node(nats.url, "a", durable=_QUICK_WAITS) as (_ka, ca):
        stream = f"{ca.prefix}-durable"
        js = ca.data_js
        try:
            with trio.fail_after(10):
                psub = await call_aio(ca.durable._subscribe, "c")
                info = await call_aio(js.consumer_info, stream, "c")
                await call_aio(js.add_consumer, stream, config=info.config.evolve(max_deliver=1))
                await store_for(ca, "nowhere-a", "given up", node="c")
                (delivery,) = await call_aio(psub.fetch, 1, timeout=5.0)
                await call_aio(delivery.nak)
                with pytest.raises(_FetchTimeout):  # (given up, not redelivered)
                    await call_aio(psub.fetch, 1, timeout=0.5)
                await call_aio(psub.unsubscribe)
                given_up = await consumer_settled(ca, stream, "c", 0)
                ca.members.members["c"] = _lost_record()
                ca.durable.takeovers_changed()
                await until(lambda: "c" in ca.durable._takeovers)
            stats, left = await _once_dead(ca, stream)
        finally:
            ca.members.members.pop("c", None)
    assert (given_up.num_pending, given_up.num_ack_pending) == (0, 0)
    assert (stats.durable_dead, stats.durable_dead_reasons["consumer_max_deliver"], left) == (
        1,
        1,
        0,
    )


async def _given_up_in_a_takeover(url: str) -> tuple[Any, int]:
    """Node a takes lost c's consumer over; an operator lowers its ``max_deliver`` to 2
    under a's 4, and a message for a name that runs nowhere waits (nakked with the
    missing-agent delay) twice: JetStream gives it up and sends its ``MAX_DELIVERIES``
    advisory for c's consumer. a's stats once it counted a message dead (see
    :func:`_once_dead`), and how many messages the stream keeps then."""
    async with local_node(url, "a", durable=_QUICK_WAITS) as (_ka, ca):
        stream = f"{ca.prefix}-durable"
        js = ca.data_js
        try:
            with trio.fail_after(10):
                ca.members.members["c"] = _lost_record()
                ca.durable.takeovers_changed()
                while True:  # (the takeover's pull request waits on c's consumer)
                    with contextlib.suppress(_NotFound):
                        info = await call_aio(js.consumer_info, stream, "c")
                        if info.num_waiting:
                            break
                    await trio.sleep(0.05)
                await call_aio(js.add_consumer, stream, config=info.config.evolve(max_deliver=2))
                await store_for(ca, "nowhere-a", "waits", node="c")
            return await _once_dead(ca, stream)
        finally:
            ca.members.members.pop("c", None)


async def test_a_max_deliveries_advisory_of_a_consumer_taken_over_is_heard_by_its_taker(
    nats: NatsServer,
) -> None:
    """Fifty-third pass: a takes lost c's consumer over, which JetStream gives a message
    of up (see :func:`_given_up_in_a_takeover`); its ``MAX_DELIVERIES`` advisory for c's
    consumer went to c's own process only: the message stayed in the stream, counted
    nowhere. The taker listens for the consumers it takes over too: dead
    (``consumer_max_deliver``), deleted. (On main's _durable.py swapped in:
    ``durable_agent_missing`` 2, ``durable_dead`` 0 after 10 s, the stream kept it.)"""
    stats, left = await _given_up_in_a_takeover(nats.url)
    assert stats.durable_agent_missing == 2
    assert (stats.durable_dead, stats.durable_dead_reasons["consumer_max_deliver"], left) == (
        1,
        1,
        0,
    )


async def test_an_advisory_of_a_taken_over_consumer_sent_before_its_store_asks_a_look_at_once(
    nats: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fifty-eighth pass: an advisory that looks sent before its message was stored (the
    consumer's leader's clock behind the stream's leader's, here by an hour) is left
    alone; for this node's own consumer it asks a look at once (fifty-seventh pass), for
    a consumer this node takes over it asked none: the message JetStream gave up stayed
    in the stream, uncounted, until the node was taken over again (its takeover's one
    look is at its bind) or forgotten. It asks the takeover's look now, after its fetch
    under way (one long poll): dead once (``consumer_max_deliver``), deleted. (On main's
    _durable.py swapped in: ``durable_dead`` 0 after 10 s, the stream kept it.)"""
    from .test_faults_durable import advisories_an_hour_behind

    advisories_an_hour_behind(monkeypatch)
    stats, left = await _given_up_in_a_takeover(nats.url)
    assert stats.durable_agent_missing == 2
    assert (stats.durable_dead, stats.durable_dead_reasons["consumer_max_deliver"], left) == (
        1,
        1,
        0,
    )
