"""Members that say whether they run the durable path (forty-first pass, issue 14).

A node's membership record says ``durable`` (``DurableOptions.enabled``). Before, a
survivor with the path off could win the rendezvous of ``durable:<node>`` for a lost
node and take nothing (the lost node's messages sat until ``max_age``, uncounted), a
message by name was forwarded to a node with the path off (stored there, pulled by no
one) and ``send_durable`` stored one there; a lost node's consumer kept that node's
``ack_wait``/``max_deliver`` under the survivor that took it over (and a node restarted
with other options kept its earlier consumer's). Real nats-server; the lost node is a
child process, SIGKILLed.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import attrs
import nats.js.errors
import pytest
import trio

from nexus_trio import TransportUnavailable
from nexus_trio._nats import Cluster, DurableOptions, NatsServer
from nexus_trio._nats import _durable as durable_module
from nexus_trio._nats._aio import call_aio
from nexus_trio._nats._durable import dead_by_id
from nexus_trio._nats._membership import NodeInfo, decode_record, encode_record, monotonic
from nexus_trio._nats._placement import rendezvous_owner

from .nats_server import NodeProcess, on_loop_of, until
from .test_durable_lost_node import _keeper, _lost_child, _store_for_id, consumer_deleted
from .test_durable_missing_agent import store_for
from .test_durable_moved_name import DURABLE, _stream_empty
from .test_nats import local_node

OFF = DurableOptions(enabled=False)
#: (the ``nats`` fixture hides the module inside the tests that take it)
_NotFound = nats.js.errors.NotFoundError


async def _one_handled_one_dead(ca: Cluster, handled: list[tuple[uuid.UUID, Any]]) -> None:
    """Until the message by name stored for a gone node is handled on a, the one by id is
    dead there, and the stream is empty."""
    await until(lambda: len(handled) >= 1)
    await until(lambda: ca.stats().durable_dead >= 1)
    await _stream_empty(ca)


def test_a_record_says_whether_its_node_runs_the_durable_path_and_a_hostile_value_is_refused() -> (
    None
):
    on = decode_record(encode_record("b", 0xB, 1.0, {}, durable=True), 0.0, "b")
    off = decode_record(encode_record("b", 0xB, 1.0, {}, durable=False), 0.0, "b")
    assert (on.durable, on.runs_durable) == (True, True)
    assert (off.durable, off.runs_durable) == (False, False)
    # a kernel of an earlier version says nothing: taken as running it (as it did)
    old = decode_record(encode_record("b", 0xB, 1.0, {}), 0.0, "b")
    assert (old.durable, old.runs_durable) == (None, True)
    body = json.loads(encode_record("b", 0xB, 1.0, {}, durable=True))
    for bad in (1, 0, "yes", "false", None, [], {}):
        with pytest.raises(ValueError, match="membership record: bad 'durable'") as caught:
            decode_record(json.dumps({**body, "durable": bad}).encode(), 0.0, "b")
        assert "not true or false" in str(caught.value)


def test_a_by_id_message_taken_over_says_why_it_is_dead_by_what_its_node_s_record_says_now() -> (
    None
):
    """A taker's batch is settled after its fetch returns, when the node may have been
    heard again: running the durable path (a frozen node back, a restart), its by-id
    messages of the loss are dead as before, said so; only a member back with the path
    off is said to be one. Before, any reachable member's was said to have its path off
    ('whose durable path is off now'), also one back running it (a mutant of dead_by_id
    with that condition fails this test)."""
    to = uuid.UUID(int=(7 << 64) | 1)

    def member(*, reachable: bool, durable: bool | None) -> NodeInfo:
        return NodeInfo("b", 7, 1, "h", 0.0, {}, 0.0, reachable=reachable, durable=durable)

    off = f"agent {to} is of node 'b', whose durable path is off now (a delivery by id can go"
    died = f"agent {to} died with node 'b' (lost"
    assert dead_by_id(to, "b", member(reachable=True, durable=False)).startswith(off)
    for durable in (True, None):  # (None: a record of an earlier version, which runs it)
        assert dead_by_id(to, "b", member(reachable=True, durable=durable)) == (
            f"{died}; heard again since; an agent id is never used again)"
        )
    for info in (member(reachable=False, durable=False), member(reachable=False, durable=True)):
        assert dead_by_id(to, "b", info) == f"{died}; an agent id is never used again)"
    assert dead_by_id(to, "b", None) == f"{died}; an agent id is never used again)"


async def test_a_lost_node_s_messages_are_taken_over_by_a_member_that_runs_the_durable_path(
    nats: NatsServer,
) -> None:
    """Survivors a (durable path on) and b (off); b wins the rendezvous of ``durable:c``
    over both. c is SIGKILLed with a message stored for a's agent's name and one for c's
    agent's id: a, the owner among the members that run the path, takes both over (one
    forwarded to itself and handled, one dead), and gives c's consumer its own
    ``max_deliver`` (3, not the child's 4; the child's ``ack_wait``, 1 s, is kept). (On the old code b won and took
    nothing, a took nothing: the wait for the handled message timed out.)"""
    assert rendezvous_owner("durable:c", ["a", "b"]) == "b"
    handled: list[tuple[uuid.UUID, Any]] = []
    child: NodeProcess | None = None
    try:
        async with (
            local_node(nats.url, "a", durable=DURABLE) as (ka, ca),
            local_node(nats.url, "b", durable=OFF) as (_kb, cb),
        ):
            with trio.fail_after(60):  # a hang guard (a child start took 15 s and more, loaded)
                ka.spawn(_keeper(handled, "keeper-a"))
                await until(lambda: ca.members.members.get("b") is not None)
                assert ca.members.members["b"].durable is False
                assert cb.members.members["a"].durable is True
                child = await _lost_child(nats.url, ca, cb)
                sent = await store_for(ca, "keeper-a", 1, node="c")
                await _store_for_id(ca, "c", uuid.UUID(child.ids["echo-c"]))
                await _one_handled_one_dead(ca, handled)
                consumer = await call_aio(ca.data_js.consumer_info, f"{ca.prefix}-durable", "c")
            a, b = ca.stats(), cb.stats()
    finally:
        if child is not None:
            await child.stop()
    assert handled == [(sent.id, 1)]
    assert (a.durable_taken_over, a.durable_dead, a.durable_acked) == (2, 1, 1)
    assert (b.durable_taken_over, b.durable_dead) == (0, 0)
    # (its ack_wait is the child's: what c had in flight is delivered again when c said)
    assert (consumer.config.ack_wait, consumer.config.max_deliver) == (1.0, DURABLE.max_deliver)


async def test_no_durable_message_goes_to_a_node_whose_durable_path_is_off(
    nats: NatsServer,
) -> None:
    """b runs ``keeper-b`` with its durable path off. a's ``send_durable`` to it is
    refused (TransportUnavailable naming b; nothing stored), and a message stored for
    that name on a's subject is not forwarded to b: it waits on a, counted
    (``durable_not_forwarded``, ``durable_agent_missing``), dead after ``max_deliver``;
    the stream ends empty. (On the old code the send stored it on b's subject and the
    message was forwarded there: both sat in the stream, pulled by no one.)"""
    handled: list[tuple[uuid.UUID, Any]] = []
    async with (
        local_node(nats.url, "a", durable=DURABLE) as (_ka, ca),
        local_node(nats.url, "b", durable=OFF) as (kb, cb),
    ):
        with trio.fail_after(30):
            kb.spawn(_keeper(handled, "keeper-b"))
            await cb.names_published()
            await until(lambda: ca.name_holder("keeper-b") is not None)
            await until(lambda: "b" in ca.members.members)
            with pytest.raises(TransportUnavailable, match="node 'b', whose durable path is off"):
                await ca.send_durable("keeper-b", "refused")
            await store_for(ca, "keeper-b", "waits")
            await until(lambda: ca.stats().durable_dead >= 1)
            await _stream_empty(ca)
        a = ca.stats()
        with pytest.raises(_NotFound):  # (b never made one: a made none)
            await call_aio(ca.data_js.consumer_info, f"{ca.prefix}-durable", "b")
    assert handled == []
    assert (a.durable_forwarded, a.durable_dead) == (0, 1)
    assert a.durable_not_forwarded == DURABLE.max_deliver
    assert a.durable_agent_missing == DURABLE.max_deliver - 1


async def test_a_node_that_joins_again_with_other_durable_options_makes_its_consumer_s_its_own(
    nats: NatsServer,
) -> None:
    """c joins with ``ack_wait`` 5 s and ``max_deliver`` 2, leaves, and joins again with
    30 s and 3: its consumer (kept across the leave) has the new settings, which its pull
    assumes. (On the old code the consumer was bound as it was: 5 s and 2.)"""
    first = DurableOptions(ack_wait=5.0, max_deliver=2, max_waiting=100)
    stream = "-durable"
    async with local_node(nats.url, "c", durable=first) as (_kc, cc):
        stream = f"{cc.prefix}-durable"
        before = await call_aio(cc.data_js.consumer_info, stream, "c")
    assert (before.config.ack_wait, before.config.max_deliver) == (5.0, 2)
    assert before.config.max_ack_pending == first.max_in_flight * 4 + 100
    async with local_node(nats.url, "c", durable=DURABLE) as (_kc, cc):
        after = await call_aio(cc.data_js.consumer_info, stream, "c")
        # (a message stored now is pulled with the new settings: handled once)
        handled: list[tuple[uuid.UUID, Any]] = []
        _kc.spawn(_keeper(handled, "keeper-c"))
        with trio.fail_after(20):
            await cc.names_published()
            sent = await cc.send_durable("keeper-c", "x")
            await until(lambda: len(handled) >= 1)
    assert (after.config.ack_wait, after.config.max_deliver) == (
        DURABLE.ack_wait,
        DURABLE.max_deliver,
    )
    assert after.config.max_ack_pending == DURABLE.max_in_flight * 4 + DURABLE.max_waiting
    assert handled == [(sent.id, "x")]


@pytest.mark.parametrize("lost_first", [False, True], ids=["left", "lost-then-left"])
async def test_a_node_back_with_its_durable_path_off_has_its_stored_messages_taken_over(
    nats: NatsServer, monkeypatch: pytest.MonkeyPatch, lost_first: bool
) -> None:
    """b runs the durable path, leaves (its consumer stays), and messages are stored for
    it meanwhile (senders whose view still had it): one by the name of a's agent, one by
    the id of b's agent. b joins again with the path off: a, the one member that runs it,
    takes b's consumer over (the name forwarded to a and handled, the id dead: it can go
    nowhere else), and deletes it once drained. (On the old code no one pulled b's
    subject: the wait for the handled message timed out.)

    ``lost-then-left`` (a CI timeout of ``left`` at load ~20): a judged b lost for a
    moment before b's leave (its heartbeats late), so a's takeover of b, on hearing the
    leave, found b's consumer drained and deleted it; what was stored for b after that
    waited with no consumer, and a's takeover at b's comeback found none and ended: it
    waited for ``max_age``, uncounted. A takeover that finds no consumer now looks at the
    stream, and takes what is stored on the node's subject (the consumer made for it).
    The loss is made by hand (and none of b's records heard until its leave: none heals
    it); on the old ``_drop_drained`` the wait for the handled message timed out."""
    handled: list[tuple[uuid.UUID, Any]] = []
    slow: dict[str, Any] = {"heartbeat_interval": 30.0, "missed_heartbeats": 3}
    options = slow if lost_first else {}
    async with local_node(nats.url, "a", durable=DURABLE, **options) as (ka, ca):
        ka.spawn(_keeper(handled, "keeper-a"))
        with trio.fail_after(30):
            async with local_node(nats.url, "b", durable=DURABLE, **options) as (kb, _cb):
                on_b = kb.spawn(_keeper([], "keeper-b"))
                await until(lambda: "b" in ca.members.members)
                if lost_first:
                    deaf = _lose(ca, "b", monkeypatch)  # a takes its consumer over
                    await until(lambda: "b" in ca.durable._takeovers)
            await until(lambda: "b" not in ca.members.members)
            if lost_first:
                await consumer_deleted(ca, "b")  # drained, its leave heard: deleted
                deaf.clear()
            sent = await store_for(ca, "keeper-a", "for b", node="b")
            await _store_for_id(ca, "b", on_b.id)
            async with local_node(nats.url, "b", durable=OFF, **options) as (_kb, _cb):
                await _one_handled_one_dead(ca, handled)
                await consumer_deleted(ca, "b")
        a = ca.stats()
    assert handled == [(sent.id, "for b")]
    assert (a.durable_taken_over, a.durable_dead, a.durable_forwarded) == (2, 1, 1)


async def test_a_takeover_deletes_no_consumer_of_a_node_back_during_its_fetch(
    nats: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: a takeover of a node no longer a member (its leave heard after a
    loss) deletes its consumer once a fetch comes back empty with it drained, but it
    judged that by what it had read of the node before the fetch (up to 1 s): b, back
    in the meanwhile with the path on and bound to its consumer, had it deleted under it
    (its next fetch refused, the consumer made anew, what it had fetched delivered
    again). Here a's first fetch of b's consumer is held until b has left and a message
    was stored for b (taken by that fetch: forwarded to a), the next one, begun with b
    gone, until b is back. The takeover asks again after the fetch now, and ends with
    b's consumer as b bound it; on the old loop it was deleted (consumer info: not
    found, or made anew by b)."""
    handled: list[tuple[uuid.UUID, Any]] = []
    slow: dict[str, Any] = {"heartbeat_interval": 30.0, "missed_heartbeats": 3}
    first, first_go = trio.Event(), asyncio.Event()
    second, second_go = trio.Event(), asyncio.Event()
    async with local_node(nats.url, "a", durable=DURABLE, **slow) as (ka, ca):
        ka.spawn(_keeper(handled, "keeper-a"))
        taken: list[Any] = []
        subscribe_taken = ca.durable._subscribe_taken

        async def recorded(node: str) -> tuple[Any, Any]:
            psub, info = await subscribe_taken(node)
            taken.append(psub)
            return psub, info

        real_poll = durable_module._poll

        async def poll(psub: Any, batch: int, idle: bool) -> tuple[list[Any], bool | None]:
            if not taken or psub is not taken[-1]:
                return await real_poll(psub, batch, idle)  # (a's own, b's)
            gone = "b" not in ca.members.members  # (what the takeover read before it)
            if not first.is_set():
                first.set()
                await first_go.wait()
            got = await real_poll(psub, batch, idle)
            if gone and not got[0] and not second.is_set():
                second.set()
                await second_go.wait()
            return got

        stream = f"{ca.prefix}-durable"
        monkeypatch.setattr(ca.durable, "_subscribe_taken", recorded)
        monkeypatch.setattr(durable_module, "_poll", poll)
        with trio.fail_after(30):
            async with local_node(nats.url, "b", durable=DURABLE, **slow):
                await until(lambda: "b" in ca.members.members)
                deaf = _lose(ca, "b", monkeypatch)  # a takes its consumer over
                await first.wait()
            await until(lambda: "b" not in ca.members.members)
            deaf.clear()
            sent = await store_for(ca, "keeper-a", "for b", node="b")
            first_go.set()  # that fetch takes it
            await second.wait()  # the next, begun with b gone, came back empty
            async with local_node(nats.url, "b", durable=DURABLE, **slow) as (_kb, cb):
                await until(lambda: (b := ca.members.members.get("b")) is not None and b.reachable)
                bound = await call_aio(cb.data_js.consumer_info, stream, "b")
                second_go.set()
                await until(lambda: "b" not in ca.durable._takeovers)
                after = await call_aio(cb.data_js.consumer_info, stream, "b")
                await until(lambda: len(handled) >= 1)
        a = ca.stats()
    assert after.created == bound.created
    assert handled == [(sent.id, "for b")]
    assert (a.durable_taken_over, a.durable_forwarded) == (1, 1)


def _lose(cluster: Cluster, node: str, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """``node`` missed its heartbeats as ``cluster`` sees it (what ``_check_members``
    does on a loss check), and none of its records is heard after (one on its way, its
    join's from the nodes bucket's watch, made it reachable again now and then) until
    the list returned is emptied; its leave is heard."""
    deaf = [node]
    apply = Cluster._apply_member_entry

    def heard(
        self: Cluster, key: str, value: bytes | None, op: str | None, *, live: bool = False
    ) -> None:
        if self is not cluster or key not in deaf or op == "DEL" or not value:
            apply(self, key, value, op, live=live)

    monkeypatch.setattr(Cluster, "_apply_member_entry", heard)
    info = cluster.members.members[node]
    cluster.members.members[node] = attrs.evolve(info, last_seen=-1e9)
    with on_loop_of(cluster):
        for lost in cluster.members.newly_lost(monotonic()):
            cluster._node_lost(lost)
    return deaf


async def test_what_is_stored_for_a_node_gone_for_good_is_taken_over_a_last_notice_wait_later(
    nats: NatsServer,
) -> None:
    """b leaves cleanly and never comes back; senders whose views still had it store for
    it after (one message by the name of a's agent, one by the id of b's agent). Its
    consumer stays for a process of its name that comes back soon; ``last_notice_wait``
    after the leave (1 s here) its rendezvous owner, a, looks at the stream and takes
    what is stored over as a lost node's: the name forwarded to a and handled, the id
    dead with its reason (an id is never used again), the consumer deleted once drained.
    (Before, both waited in the stream for ``max_age``, for ever without one, uncounted:
    the wait for the handled message timed out.)"""
    handled: list[tuple[uuid.UUID, Any]] = []
    quick = {"server_lost_wait": 0.5, "last_notice_wait": 1.0}
    async with local_node(nats.url, "a", durable=DURABLE, **quick) as (ka, ca):
        ka.spawn(_keeper(handled, "keeper-a"))
        with trio.fail_after(30):
            async with local_node(nats.url, "b", durable=DURABLE, **quick) as (kb, _cb):
                on_b = kb.spawn(_keeper([], "keeper-b"))
                await until(lambda: "b" in ca.members.members)
            await until(lambda: "b" not in ca.members.members)
            sent = await store_for(ca, "keeper-a", "for b", node="b")
            await _store_for_id(ca, "b", on_b.id)
            await _one_handled_one_dead(ca, handled)
            await consumer_deleted(ca, "b")
        a = ca.stats()
    assert handled == [(sent.id, "for b")]
    assert (a.durable_taken_over, a.durable_dead, a.durable_forwarded) == (2, 1, 1)
