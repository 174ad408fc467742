"""A durable message by name whose agent is briefly missing (thirty-ninth pass, issue 14).

Stored while no agent of its node had its name (a pool stopped and spawned again by
hand, a node starting its agents, a sender whose view of the names was stale), its
delivery fails ``AgentNotFound``. It used to be nakked with ``redelivery_delay`` (0.1 s)
like a handler's error, so it burnt its whole ``max_deliver`` in about 0.2 s and was
dead though the agent came back a second later. Now such a nak asks JetStream for a
delay that grows each delivery n: ``min(missing_agent_delay * 2**(n-1),
missing_agent_delay_max)``; a name that never comes back is still dead after
``max_deliver``, counted, its reason logged. Real nats-server: the delays are read off
the naks the node sends, the deliveries off JetStream's consumer info.
"""

from __future__ import annotations

import logging
import math
import re
import uuid
from collections import Counter
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from nats.aio.msg import Msg as NatsMsg
from nats.errors import TimeoutError as NatsTimeoutError

from nexus_trio import Context, Message, agent
from nexus_trio._nats import Cluster, DurableOptions, NatsServer
from nexus_trio._nats import _wire as wire
from nexus_trio._nats._aio import call_aio
from nexus_trio._nats._durable import missing_agent_delay

from .nats_server import consumer_settled, until
from .test_nats import local_node

#: 4 unacknowledged slots in JetStream (``max_in_flight`` 1), 3 of them may wait; no
#: waiting one is delivered again within a test (60 s)
ONE_SLOT_LONG_WAIT = DurableOptions(
    ack_wait=30.0,
    max_deliver=2,
    redelivery_delay=0.01,
    max_in_flight=1,
    max_waiting=3,  # 4 + 3 unacknowledged slots in JetStream, 3 of them may wait
    missing_agent_delay=60.0,
    missing_agent_delay_max=60.0,
)


def _record_naks(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, float | None]]:
    """Every nak the node sends, as (its delivery's number, the delay it asks); sent on."""
    naks: list[tuple[int, float | None]] = []
    real = NatsMsg.nak

    async def nak(self: NatsMsg, delay: float | None = None) -> None:
        naks.append((self.metadata.num_delivered, delay))
        await real(self, delay=delay)

    monkeypatch.setattr(NatsMsg, "nak", nak)
    return naks


async def store_for(
    cluster: Cluster, name: str, payload: Any, node: str | None = None, **headers: str
) -> Message:
    """Store a durable message for ``name`` on the subject of ``node`` (this node's if
    None), as a sender whose view of the names still had it there does (``send_durable``
    itself refuses a name no node has now); ``headers`` added."""
    msg = Message(sender=uuid.uuid4(), to=name, payload=payload)
    await call_aio(
        cluster.data_js.publish,
        wire.durable_subject(cluster.prefix, node or cluster.node, uuid.uuid4()),
        wire.encode_message(msg),
        headers={wire.MSG_ID_HEADER: str(msg.id), **headers},
    )
    return msg


def _own_counts(stats: Any) -> dict[str, int]:
    """The outcomes of a node's own durable messages in ``stats`` (a ClusterStats)."""
    counts = ("agent_missing", "wait_full", "dead", "acked")
    return {key: getattr(stats, f"durable_{key}") for key in counts}


async def _settled(cluster: Cluster) -> Any:
    """This node's consumer once nothing of it is pending and the stream is empty (its
    settles sent: the durable path stopped)."""
    await cluster.durable.stop()
    await call_aio(cluster.nc.flush)
    stream = f"{cluster.prefix}-durable"
    while True:
        info = await call_aio(cluster.data_js.stream_info, stream)
        consumer = await call_aio(cluster.data_js.consumer_info, stream, cluster.node)
        if info.state.messages == 0 and consumer.num_ack_pending == 0:
            return consumer
        await trio.sleep(0.05)


async def test_a_durable_message_whose_agent_comes_back_after_its_first_nak_is_handled_once(
    nats: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent of its name is spawned once the first delivery failed for want of it:
    the nak asked JetStream for ``missing_agent_delay`` (not ``redelivery_delay``), the
    next delivery finds the agent, which handles it once; acked. (If the machine is so
    slow that a second delivery still found no agent, its nak asks double the delay.)"""
    naks = _record_naks(monkeypatch)
    handled: list[Any] = []

    @agent(name="late-a")
    async def late(ctx: Context, msg: Message) -> Any:
        handled.append((msg.id, msg.payload))
        return "ok"

    durable = DurableOptions(
        ack_wait=30.0,
        max_deliver=4,
        redelivery_delay=0.01,
        missing_agent_delay=0.5,
        missing_agent_delay_max=2.0,
    )
    async with local_node(nats.url, durable=durable) as (kernel, cluster):
        with trio.fail_after(20):
            sent = await store_for(cluster, "late-a", "invoice 42")
            await until(lambda: cluster.stats().durable_agent_missing >= 1)
            kernel.spawn(late)
            await until(lambda: cluster.stats().durable_acked >= 1)
            consumer = await _settled(cluster)
        stats = cluster.stats()
    assert handled == [(sent.id, "invoice 42")]
    missed = stats.durable_agent_missing
    assert naks[0] == (1, 0.5)
    assert naks == [(n, min(0.5 * 2 ** (n - 1), 2.0)) for n in range(1, missed + 1)]
    # JetStream's own count: one delivery a nak, and the one that was acked
    assert consumer.delivered.consumer_seq == missed + 1
    assert (stats.durable_redelivered, stats.durable_acked, stats.durable_dead) == (missed, 1, 0)


async def test_a_durable_message_for_a_name_that_never_comes_is_dead_after_spaced_naks(
    nats: NatsServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """No agent ever takes the name: each of the first ``max_deliver - 1`` deliveries is
    nakked with a delay that doubles (capped), the last one is terminated, counted dead
    and logged with its reason."""
    caplog.set_level(logging.ERROR, logger="nexus_trio.nats.durable")
    naks = _record_naks(monkeypatch)
    durable = DurableOptions(
        ack_wait=30.0,
        max_deliver=4,
        redelivery_delay=0.01,
        missing_agent_delay=0.05,
        missing_agent_delay_max=0.15,
    )
    async with local_node(nats.url, durable=durable) as (_kernel, cluster):
        with trio.fail_after(20):
            sent = await store_for(cluster, "never-a", "lost")
            await until(lambda: cluster.stats().durable_dead >= 1)
            consumer = await _settled(cluster)
        stats = cluster.stats()
    assert naks == [(1, 0.05), (2, 0.1), (3, 0.15)]
    assert consumer.delivered.consumer_seq == 4
    assert (
        stats.durable_agent_missing,
        stats.durable_redelivered,
        stats.durable_acked,
        stats.durable_dead,
    ) == (3, 3, 0, 1)
    dead = [r.getMessage() for r in caplog.records if "dead after" in r.getMessage()]
    assert len(dead) == 1, dead
    assert f"durable message {sent.id} dead after 4 deliveries (last: AgentNotFound" in dead[0]
    assert "'never-a'" in dead[0], dead[0]


async def test_a_handler_s_failure_is_still_nakked_with_redelivery_delay(
    nats: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only a missing agent waits longer: a handler that raises is retried after
    ``redelivery_delay``, as before, and counts no missing agent."""
    naks = _record_naks(monkeypatch)
    calls: list[int] = []

    @agent(name="flaky-a")
    async def flaky(ctx: Context, msg: Message) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("first try fails")
        return "ok"

    durable = DurableOptions(
        ack_wait=30.0, max_deliver=4, redelivery_delay=0.02, missing_agent_delay=5.0
    )
    async with local_node(nats.url, durable=durable) as (kernel, cluster):
        kernel.spawn(flaky)
        with trio.fail_after(20):
            await cluster.send_durable("flaky-a", "x")
            await until(lambda: cluster.stats().durable_acked >= 1)
        stats = cluster.stats()
    assert naks == [(1, 0.02)]
    assert (stats.durable_agent_missing, stats.durable_acked, len(calls)) == (0, 1, 2)


def test_the_missing_agent_delay_doubles_each_delivery_up_to_its_cap() -> None:
    defaults = DurableOptions()
    assert [missing_agent_delay(defaults, n) for n in range(1, 7)] == [1, 2, 4, 8, 15, 15]
    # a delivery count far past any exponent a float holds is the cap, not an overflow
    assert missing_agent_delay(defaults, 10**9) == 15
    off = DurableOptions(missing_agent_delay=0.0, missing_agent_delay_max=0.0)
    assert [missing_agent_delay(off, n) for n in (1, 5)] == [0, 0]


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"missing_agent_delay": -1}, "missing_agent_delay must be a finite number"),
        ({"missing_agent_delay": "1"}, "got '1' (str)"),
        ({"missing_agent_delay": True}, "got True (bool)"),
        ({"missing_agent_delay_max": math.inf}, "missing_agent_delay_max must be a finite"),
        ({"missing_agent_delay_max": math.nan}, "missing_agent_delay_max must be a finite"),
        (
            {"missing_agent_delay": 2.0, "missing_agent_delay_max": 1.0},
            "missing_agent_delay_max (1s) must be at least missing_agent_delay (2s)",
        ),
        (
            {"max_waiting": -1},
            "max_waiting must be a whole number from 0 to 1000000000000000000; got -1 (",
        ),
        (
            {"max_waiting": 1.5},
            "max_waiting must be a whole number from 0 to 1000000000000000000; got 1.5 (",
        ),
        (
            {"max_waiting": True},
            "max_waiting must be a whole number from 0 to 1000000000000000000; got True (",
        ),
    ],
)
def test_bad_missing_agent_delays_are_refused_naming_the_option(
    options: dict[str, Any], says: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(says)):
        DurableOptions(**options)


async def test_messages_waiting_for_a_missing_agent_leave_max_in_flight_slots_to_the_others(
    nats: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Regression (the thirty-ninth pass's review; measured in the forty-second): a message
    nakked with a delay stays pending in JetStream, holding one of the consumer's ``4 x
    max_in_flight`` unacknowledged slots until it is delivered again: with all of them
    held by messages for a missing name, a message for an agent that is there waited
    until one of those was dead (the sum of the delays: 15 s with the defaults, 14.75 s
    measured with ``max_in_flight`` 2). At most ``max_waiting`` wait now (3 here): one
    past that is terminated at once, counted (``durable_wait_full``, ``durable_dead``),
    its reason logged, as Akka's shard region drops what its full buffer cannot take;
    the consumer's ``max_ack_pending`` is ``4 x max_in_flight + max_waiting``, so the
    node's other messages keep their slots and are handled while they wait."""
    caplog.set_level(logging.ERROR, logger="nexus_trio.nats.durable")
    handled: list[int] = []
    cluster_of: list[Cluster] = []

    @agent(name="here-a")
    async def here(ctx: Context, msg: Message) -> Any:
        handled.append(cluster_of[0].stats().durable_dead)
        return "ok"

    durable = ONE_SLOT_LONG_WAIT
    async with local_node(nats.url, durable=durable) as (kernel, cluster):
        cluster_of.append(cluster)
        kernel.spawn(here)
        with trio.fail_after(15):
            gone = [await store_for(cluster, "gone-a", n) for n in range(4)]
            await store_for(cluster, "here-a", "not held up")
            await until(lambda: cluster.stats().durable_acked >= 1)
            consumer = await consumer_settled(cluster, f"{cluster.prefix}-durable", cluster.node, 3)
        stats = cluster.stats()
    assert cluster.durable.wait_bound == 3
    # handled while three wait, once the fourth was terminated
    assert handled == [1]
    assert (consumer.num_ack_pending, consumer.num_pending) == (3, 0)
    assert _own_counts(stats) == {
        "agent_missing": 3,
        "wait_full": 1,
        "dead": 1,
        "acked": 1,
    }
    said = [r.getMessage() for r in caplog.records if "too many" not in r.getMessage()]
    assert said == [
        f"node a: durable message {gone[3].id} for 'gone-a' terminated at delivery 1: no"
        " agent has its name here, and 3 messages wait for theirs already (the bound,"
        " DurableOptions.max_waiting) (1 so far)"
    ]


async def test_messages_that_waited_in_a_deleted_stream_hold_no_room_in_the_one_made_anew(
    nats: NatsServer,
) -> None:
    """Forty-second pass: three messages for a missing name wait (the bound,
    ``max_in_flight`` 1), and an operator deletes the stream: they are gone with it, and
    the node makes the stream anew (its sequences from 1 again). Their entries stayed
    until their time was up (here 91 s), holding the bound: the first message for a missing
    name stored in the new stream (sequence 1, none of theirs: 3, 4, 5) was terminated
    (``durable_wait_full``) though nothing waited. The node forgets them when it sees the
    stream made anew: it waits. (An entry whose sequence a new message takes is replaced
    by it, or dropped at its delivery: never counted beside it.)"""
    durable = ONE_SLOT_LONG_WAIT

    @agent(name="here-a")
    async def here(ctx: Context, msg: Message) -> Any:
        return "ok"

    async with local_node(nats.url, durable=durable) as (kernel, cluster):
        kernel.spawn(here)
        stream = f"{cluster.prefix}-durable"
        with trio.fail_after(15):
            for n in range(2):  # (sequences 1 and 2: the waiting ones get 3, 4, 5)
                await store_for(cluster, "here-a", n)
            await until(lambda: cluster.stats().durable_acked >= 2)
            for n in range(3):
                await store_for(cluster, "gone-a", n)
            await until(lambda: cluster.stats().durable_agent_missing >= 3)
            await call_aio(cluster.data_js.delete_stream, stream)
            await until(lambda: cluster.durable.fetch_failures >= 1)
            await until(lambda: cluster.readiness() is None)  # (made anew, fetched from)
            await store_for(cluster, "gone-a", "in the new stream")
            await until(
                lambda: (
                    cluster.stats().durable_agent_missing + cluster.stats().durable_wait_full >= 4
                )
            )
            consumer = await consumer_settled(cluster, stream, cluster.node, 1)
        stats = cluster.stats()
    assert (stats.durable_agent_missing, stats.durable_wait_full, stats.durable_dead) == (4, 0, 0)
    assert (consumer.num_ack_pending, consumer.num_pending) == (1, 0)


async def test_a_burst_past_3_x_max_in_flight_to_a_name_missing_a_while_is_all_handled(
    nats: NatsServer,
) -> None:
    """Regression (the forty-second pass's review): a burst of 250 durable messages, more
    than ``3 x max_in_flight`` (192 by default, the bound before), to a name whose agent
    is missing a while (a rolling restart of its node, a placed agent moving) all wait
    for it (``max_waiting``, 10,000 by default) and are all handled once it comes (on
    the old code 58 of them were terminated at once, dead); meanwhile a message for an
    agent that is there is handled (the consumer has ``4 x max_in_flight +
    max_waiting`` unacked slots)."""
    from .test_durable_lost_node import _keeper  # (it imports this module)

    burst = 250
    handled: list[tuple[uuid.UUID, Any]] = []
    here_handled: list[tuple[uuid.UUID, Any]] = []
    durable = DurableOptions(missing_agent_delay=0.5, missing_agent_delay_max=2.0)
    assert durable.max_waiting == 10_000
    async with local_node(nats.url, durable=durable) as (kernel, cluster):
        kernel.spawn(_keeper(here_handled, "there-a"))
        with trio.fail_after(60):
            for n in range(burst):
                await store_for(cluster, "back-a", n)
            # (each waits, or is terminated: the old bound)
            await until(
                lambda: (
                    cluster.stats().durable_agent_missing + cluster.stats().durable_wait_full
                    >= burst
                )
            )
            waiting = await call_aio(
                cluster.data_js.consumer_info, f"{cluster.prefix}-durable", cluster.node
            )
            await store_for(cluster, "there-a", "not held up")
            await until(lambda: len(here_handled) >= 1)
            kernel.spawn(_keeper(handled, "back-a"))
            await until(
                lambda: cluster.stats().durable_acked + cluster.stats().durable_dead >= burst + 1
            )
            consumer = await _settled(cluster)
        stats = cluster.stats()
    assert (stats.durable_wait_full, stats.durable_dead, stats.durable_acked) == (0, 0, burst + 1)
    assert waiting.config.max_ack_pending == 64 * 4 + 10_000
    # (all still held: a message whose delay ran out between two fetches is pending
    # again, not acked-pending, for a moment: once at load ~20, 249 + 1)
    assert waiting.num_ack_pending + waiting.num_pending == burst
    assert sorted(payload for _id, payload in handled) == list(range(burst))
    assert [payload for _id, payload in here_handled] == ["not held up"]
    assert consumer.num_ack_pending == 0


async def test_a_server_that_caps_max_ack_pending_below_the_consumer_s_refuses_the_join_naming_it() -> (
    None
):
    """A server (or account) may cap the consumers' ``max_ack_pending`` (none does by
    default): one below ``4 x max_in_flight + max_waiting`` refuses the node's consumer,
    and the join fails naming the options to lower, not with JetStream's bare 400; a node
    whose sum fits joins."""
    server = NatsServer(config="jetstream { limits { max_ack_pending: 1000 } }").start()
    try:
        with pytest.raises(ValueError, match="max_waiting") as refused:
            async with local_node(server.url):
                pass
        fits = DurableOptions(max_in_flight=64, max_waiting=744)
        async with local_node(server.url, durable=fits) as (_kernel, cluster):
            consumer = await call_aio(
                cluster.data_js.consumer_info, f"{cluster.prefix}-durable", cluster.node
            )
    finally:
        server.stop()
    assert str(refused.value) == (
        "JetStream refuses node 'a''s durable consumer: its max_ack_pending, 4 x"
        " DurableOptions.max_in_flight (64) + max_waiting (10000) = 10256, is over the limit"
        " of the server or account (consumer max ack pending exceeds system limit of 1000);"
        " lower max_waiting (or max_in_flight)"
    )
    assert consumer.config.max_ack_pending == 1000


class _ScanCount(dict[int, float]):
    """The wait list, counting its look-throughs (``items``)."""

    scans = 0

    def items(self) -> Any:
        self.scans += 1
        return super().items()


def test_a_full_wait_list_is_looked_through_only_once_an_entry_may_be_overdue() -> None:
    """With ``max_waiting`` 10,000 the wait list is large: a burst past the bound looked
    through all of it for each message (old code: one scan per message terminated). Now
    only once an entry's redelivery may be overdue; an overdue one still frees its room."""
    from types import SimpleNamespace

    from nexus_trio._nats._durable import DurableChannel
    from nexus_trio._nats._held import HeldLines

    def delivery(seq: int) -> Any:
        return SimpleNamespace(
            metadata=SimpleNamespace(num_delivered=1, sequence=SimpleNamespace(stream=seq))
        )

    async def main() -> tuple[list[bool], int, bool, int]:
        options = DurableOptions(ack_wait=1.0, missing_agent_delay=1.0, max_waiting=2)
        cluster: Any = SimpleNamespace(prefix="p", held=HeldLines())
        channel = DurableChannel(cluster, options)
        waiting = channel._waiting.due = _ScanCount()
        room = channel._waiting.room
        taken = [room(delivery(seq), options) for seq in range(1, 12)]
        scans = waiting.scans
        # past the delay, ack_wait and a fetch's wait: the two are overdue, room again
        await trio.sleep(1.0 + 1.0 + 10.0)
        return taken, scans, room(delivery(12), options), waiting.scans

    taken, scans, after, scans_after = trio.run(
        main, clock=trio.testing.MockClock(autojump_threshold=0)
    )
    assert taken == [True, True] + [False] * 9
    assert (scans, after, scans_after) == (0, True, 1)


async def test_messages_an_earlier_process_of_the_node_left_waiting_count_against_its_bound(
    nats: NatsServer,
) -> None:
    """Item 1 of the forty-third pass: the waiting bound was per puller. A process of node
    a let 4 messages wait (its bound, ``max_waiting`` 4; ``max_ack_pending`` 4 x 1 + 4 =
    8) and left; they still held their slots (60 s delays). The next process of a began
    with none counted, let 4 more wait, and all 8 slots were held: its message for an
    agent that is there was delivered no more until they died (the wait timed out). The
    slots JetStream counts held at the bind (``num_ack_pending``, those not nakked by
    this process) count against the bound now, until they are delivered here again or
    could be no longer held: the 4 new ones are terminated (``durable_wait_full``), the
    message for ``here-a`` is handled."""
    durable = attrs.evolve(ONE_SLOT_LONG_WAIT, max_waiting=4)

    @agent(name="here-a")
    async def here(ctx: Context, msg: Message) -> Any:
        return "ok"

    async with local_node(nats.url, durable=durable) as (_kernel, cluster):
        with trio.fail_after(15):
            for n in range(4):
                await store_for(cluster, "gone-a", n)
            await until(lambda: cluster.stats().durable_agent_missing >= 4)
    async with local_node(nats.url, durable=durable) as (kernel, cluster):
        kernel.spawn(here)
        with trio.fail_after(15):
            for n in range(4):
                await store_for(cluster, "gone-a", f"again {n}")
            await store_for(cluster, "here-a", "not held up")
            await until(lambda: cluster.stats().durable_acked >= 1)
            consumer = await consumer_settled(cluster, f"{cluster.prefix}-durable", cluster.node, 4)
        stats = cluster.stats()
    assert (consumer.num_ack_pending, consumer.num_pending) == (4, 0)
    assert _own_counts(stats) == {
        "agent_missing": 0,
        "wait_full": 4,
        "dead": 4,
        "acked": 1,
    }


def test_slots_other_pullers_held_at_the_bind_count_until_redelivered_or_overdue() -> None:
    """Item 1 of the forty-third pass (the rule, on a MockClock): ``held`` at the bind,
    less those nakked here, counts against the bound; a redelivery of none of this
    puller's frees one; all are free once they could be held no longer."""
    from types import SimpleNamespace

    from nexus_trio._nats._durable import _Waiting

    def delivery(seq: int, delivered: int = 1) -> Any:
        return SimpleNamespace(
            metadata=SimpleNamespace(num_delivered=delivered, sequence=SimpleNamespace(stream=seq))
        )

    async def main() -> list[Any]:
        options = DurableOptions(
            ack_wait=1.0, missing_agent_delay=20.0, missing_agent_delay_max=20.0, max_waiting=4
        )
        waiting = _Waiting(0)
        waiting.bind(4, "made", held=3, held_for=10.0)
        seen: list[Any] = [waiting.count]
        seen.append(waiting.room(delivery(1), options))  # 3 + 1: the bound
        seen.append(waiting.room(delivery(2), options))
        waiting.delivered(delivery(7, delivered=2))  # one of theirs, delivered here again
        waiting.delivered(delivery(8, delivered=1))  # a first delivery: none of theirs
        seen.append(waiting.count)
        waiting.bind(4, "made", held=4, held_for=10.0)  # again: 1 of the 4 is this one's
        seen.append(waiting.count)
        await trio.sleep(10.0)
        seen.append(waiting.count)  # theirs overdue; this puller's not yet (20 + 1 + 1 s)
        return seen

    seen = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert seen == [3, True, False, 3, 4, 1]


async def test_each_kind_of_dead_durable_message_has_a_counter_of_its_own(
    nats: NatsServer,
) -> None:
    """Item 3 of the forty-third pass: each kind of dead durable message has a throttled
    log line of its own saying its count so far (``(N so far)``), and only the sum was a
    counter (``durable_dead``): an operator could not alert on one kind. Now
    ``durable_dead_reasons`` (and ``nexus_cluster_durable_dead_reasons_total{reason}``)
    counts each, their sum ``durable_dead``: a body no kernel wrote, an agent id gone, a
    handler that failed and one that never answered on the last delivery (``max_deliver``
    1 here)."""
    from nexus_trio._nats._metrics import ClusterCollector

    @agent(name="fails-a")
    async def fails(ctx: Context, msg: Message) -> Any:
        raise RuntimeError("no")

    @agent(name="silent-a")
    async def silent(ctx: Context, msg: Message) -> None:
        return None

    durable = DurableOptions(ack_wait=1.0, max_deliver=1, redelivery_delay=0.01)
    async with local_node(nats.url, durable=durable) as (kernel, cluster):
        kernel.spawn(fails)
        kernel.spawn(silent)
        with trio.fail_after(20):
            subject = wire.durable_subject(cluster.prefix, cluster.node, uuid.uuid4())
            await call_aio(
                cluster.data_js.publish, subject, b"no message", headers={wire.MSG_ID_HEADER: "x"}
            )
            gone = Message(sender=uuid.uuid4(), to=uuid.UUID(int=(0xBADC0DE << 64) | 1))
            await call_aio(
                cluster.data_js.publish,
                subject,
                wire.encode_message(gone),
                headers={wire.MSG_ID_HEADER: str(gone.id)},
            )
            await store_for(cluster, "fails-a", 1)
            await store_for(cluster, "silent-a", 2)
            await until(lambda: cluster.stats().durable_dead >= 4)
        stats = cluster.stats()
        families = {f.name: f for f in ClusterCollector(cluster.stats).collect()}
    assert stats.durable_dead_reasons == {
        "undecodable": 1,
        "agent_gone": 1,
        "agent_missing": 0,
        "failed": 1,
        "unanswered": 1,
        "wait_full": 0,
        "lost_node": 0,
        "unforwarded": 0,
        "consumer_max_deliver": 0,
    }
    assert sum(stats.durable_dead_reasons.values()) == stats.durable_dead == 4
    samples = families["nexus_cluster_durable_dead_reasons"].samples
    assert {s.labels["reason"]: s.value for s in samples if s.name.endswith("_total")} == {
        key: float(value) for key, value in stats.durable_dead_reasons.items()
    }


async def test_a_durable_message_for_a_name_no_agent_has_is_dead_as_agent_missing_not_failed(
    nats: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A message by a name no agent of the node has, on its last delivery, is dead
    without any handler having run: until the fifty-sixth pass it was counted under
    ``failed`` (the handler failed), beside a handler's real failure, so an alert on
    failing handlers fired for a name that was never spawned. Now it is
    ``agent_missing``, with a throttled line of its own whose count is that reason's;
    a handler's failure is still ``failed``."""
    caplog.set_level(logging.ERROR, logger="nexus_trio.nats.durable")

    @agent(name="fails-m")
    async def fails(ctx: Context, msg: Message) -> Any:
        raise RuntimeError("no")

    durable = DurableOptions(ack_wait=30.0, max_deliver=1, redelivery_delay=0.01)
    async with local_node(nats.url, durable=durable) as (kernel, cluster):
        kernel.spawn(fails)
        with trio.fail_after(20):
            never = await store_for(cluster, "never-m", 1)
            await store_for(cluster, "fails-m", 2)
            await until(lambda: cluster.stats().durable_dead >= 2)
        stats = cluster.stats()
    reasons = stats.durable_dead_reasons
    assert (reasons["agent_missing"], reasons["failed"], stats.durable_dead) == (1, 1, 2)
    lines = [r.getMessage() for r in caplog.records if r.name == "nexus_trio.nats.durable"]
    missing = [line for line in lines if "no agent had its name 'never-m' here" in line]
    assert len(missing) == 1, lines
    assert (
        f"durable message {never.id} dead after 1 deliveries (last: AgentNotFound" in (missing[0])
    )
    assert missing[0].endswith("(1 so far)"), missing[0]


async def test_a_dead_line_held_back_makes_no_repr_of_the_handler_s_error(
    nats: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The forty-fourth pass's test of the forty-third's ``_ErrorSaid``: a durable message
    dead after ``max_deliver`` failed deliveries says its handler's error's repr in its
    line, and that line is throttled (one a second, the rest held and counted). The repr
    is user code (it may be slow or raise): the line makes it only when it is written.
    Twenty messages die in a burst. Each error's repr is made once by the core for the
    failed delivery's ``RequestFailed`` (what a caller of a query is raised); one held
    back gets no other (on the old code, which made the line's before the throttle, each
    got a second one)."""
    made: Counter[int] = Counter()

    class Tagged(RuntimeError):
        def __init__(self, tag: int) -> None:
            super().__init__(tag)
            self.tag = tag

        def __repr__(self) -> str:
            made[self.tag] += 1
            return f"Tagged({self.tag})"

    @agent(name="fails-r")
    async def fails(ctx: Context, msg: Message) -> Any:
        raise Tagged(msg.payload)

    durable = DurableOptions(ack_wait=5.0, max_deliver=1, redelivery_delay=0.01)
    caplog.set_level(logging.ERROR, logger="nexus_trio")
    async with local_node(nats.url, durable=durable) as (kernel, cluster):
        kernel.spawn(fails)
        with trio.fail_after(30):
            for tag in range(20):
                await store_for(cluster, "fails-r", tag)
            await until(lambda: cluster.stats().durable_dead_reasons["failed"] >= 20)
    lines = [r.getMessage() for r in caplog.records if r.name == "nexus_trio.nats.durable"]
    written = [line for line in lines if "dead after 1 deliveries" in line]
    said = {int(tag) for line in written for tag in re.findall(r"Tagged\((\d+)\)", line)}
    assert 1 <= len(written) < 20
    assert set(made) == set(range(20))
    assert {tag: made[tag] for tag in made if tag not in said} == {
        tag: 1 for tag in range(20) if tag not in said
    }


async def test_a_failure_to_make_the_durable_stream_anew_is_counted(
    nats: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Item 3 of the forty-third pass: after a refused fetch (an operator deleted the
    stream) the node makes the stream and its consumer anew; a failure of that had a
    throttled line and no counter. ``durable_remake_failures`` counts it now (and
    ``nexus_cluster_durable_remake_failures_total``); the next failed fetch tries again."""
    import nats.errors as nats_errors

    async with local_node(nats.url, durable=ONE_SLOT_LONG_WAIT) as (_kernel, cluster):
        durable = cluster.durable
        real = durable._setup
        calls: list[int] = []

        async def setup() -> Any:
            calls.append(1)
            if len(calls) == 1:
                raise nats_errors.TimeoutError
            return await real()

        with trio.fail_after(20):
            monkeypatch.setattr(durable, "_setup", setup)
            await call_aio(cluster.data_js.delete_stream, f"{cluster.prefix}-durable")
            await until(lambda: cluster.stats().durable_remake_failures >= 1)
            await until(lambda: len(calls) >= 2 and cluster.readiness() is None)
        stats = cluster.stats()
    assert stats.durable_remake_failures == 1
    assert stats.durable_fetch_failures["own"] >= 2


async def test_a_consumer_info_not_answered_at_the_bind_fails_no_join(
    nats: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression (review of the forty-third pass): the bind's count of the slots other
    pullers hold (``num_ack_pending``) was a second consumer info request after the pull
    subscription's, and one not answered (``nats.errors.TimeoutError``, a JetStream slow
    at load) failed the durable path's start, and with it the whole join; at a remake it
    failed the remake though the stream and consumer were made. The count refines the
    wait bound only: not read, none is counted (the bound as before that pass), and the
    node joins and handles its durable messages."""
    from nats.js import JetStreamContext

    asked: list[str] = []

    async def not_answered(self: Any) -> Any:
        asked.append("consumer_info")
        raise NatsTimeoutError

    monkeypatch.setattr(JetStreamContext.PullSubscription, "consumer_info", not_answered)
    handled: list[Any] = []

    @agent(name="here-b")
    async def here(ctx: Context, msg: Message) -> Any:
        handled.append(msg.payload)
        return "ok"

    async with local_node(nats.url, durable=ONE_SLOT_LONG_WAIT) as (kernel, cluster):
        kernel.spawn(here)
        with trio.fail_after(15):
            await store_for(cluster, "here-b", "handled")
            await until(lambda: cluster.stats().durable_acked >= 1)
        stats = cluster.stats()
    assert asked == ["consumer_info"]
    assert handled == ["handled"]
    assert (stats.durable_acked, stats.durable_dead, stats.durable_remake_failures) == (1, 0, 0)
