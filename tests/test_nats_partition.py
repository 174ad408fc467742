"""Real partitions: one node's NATS connections cut by a TCP proxy while its process
lives (``tests/nats_proxy.py``), for longer than the loss window, then let through
again. ``test_nats_placement.py`` heals a partition it makes by hand (each node told
the other is lost, then heard again, both writing the names bucket); here the cut node
really misses its heartbeats and really cannot reach the bucket while it is cut off, as
the minority side of a partition from the server cannot."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import pytest
import trio

from nexus_trio import Context, EventKind, Kernel, LifecycleEvent, Message, agent, open_kernel
from nexus_trio._nats import Cluster, NatsServer, NodeReplaced, join_cluster
from nexus_trio._nats import _cluster as cluster_module

from .nats_proxy import NatsProxy
from .nats_server import PATIENT, NodeProcess, collector, node_config, until
from .test_fault_monitors import buffered
from .test_nats_placement import BLOCKING, DUPLICATE, ON_C, _node, _place_one_on_each, _replaced


def _ready(clusters: tuple[Cluster, ...]) -> bool:
    """Each node hears the others and knows they run ``blocking`` (their records say)."""
    return all(
        len(cluster.member_list()) == len(clusters)
        and all("blocking" in (info.types or ()) for info in cluster.member_list())
        for cluster in clusters
    )


def _keeper(records: list[Any]) -> Any:
    """An agent that keeps each payload in ``records`` and answers "ok" (a durable
    message is acked by its handler's answer)."""

    @agent(name="keeper")
    async def keep(ctx: Context, msg: Message) -> Any:
        records.append(msg.payload)
        return "ok"

    return keep


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


async def _old_b(
    kb: Kernel,
    url: str,
    clusters: list[Cluster],
    raised: list[BaseException],
    joined: trio.Event,
    left: trio.Event,
) -> None:
    """The old process of ``b``: ``kb`` joined at ``url`` (the proxy) until a later process
    of its name replaces it; its cluster in ``clusters`` and ``joined`` set as the block
    begins, its ``NodeReplaced`` in ``raised``, ``left`` set as it ends either way."""
    try:
        async with join_cluster(kb, url, "b", options=PATIENT) as cb:
            clusters.append(cb)
            joined.set()
            await trio.sleep_forever()  # (the replacement cancels it)
    except NodeReplaced as exc:
        raised.append(exc)
    finally:
        left.set()


async def _old_b_serving(
    joined: trio.Event, clusters: list[Cluster], ka: Kernel, ca: Cluster, old: list[Any]
) -> Cluster:
    """The old b (see _old_b) joined, its names published and heard by a, and its
    ``collector-b`` (collecting into ``old``) took a's ``"before"``: its cluster."""
    await joined.wait()
    (cb,) = clusters
    await cb.names_published()
    await ca.wait_for_name("collector-b")
    await ka.send("collector-b", "before")
    await until(lambda: old == ["before"])
    return cb


async def _b_unreachable(events: AsyncIterator[LifecycleEvent]) -> None:
    """Until ``events`` (a's) says node b unreachable."""
    async for event in events:
        if event.kind is EventKind.UNREACHABLE and event.name == "node:b":
            return


async def test_a_process_cut_off_past_its_loss_and_restarted_meanwhile_leaves_its_name_to_the_new_one(
    nats: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    """b (this process, through the proxy) is cut off from the server until a counts it
    lost; a new process is started under the name b meanwhile (an orchestrator's
    restart: ``tests.nats_server``'s child node, its own id prefix) and joins; then the
    old b is let through again, alive. It hears the later process's heartbeats, finds
    that process's record under its name in the nodes bucket, and leaves the cluster to
    it: its ``join_cluster`` block is cancelled and raises ``NodeReplaced`` naming the
    later process, with one ERROR line (Akka's quarantine of an old incarnation). Its
    kernel runs on (leaving never shuts it down), its ``collector-b`` with it, out of
    the cluster. Then the tells and queries a sends to ``collector-b`` all reach the new
    process, and so do its durable messages to ``flaky-b`` (which both processes run:
    the old one a keeper that answers "ok"): the old one pulls the node name's durable
    consumer (shared: the consumer is the name's) no more. Before (fifty-fourth pass
    code), the old b stayed joined until its operator stopped it, unreachable, and
    pulled the shared durable consumer as the new one did: in a run of this test with
    the leave's task not started (the code before, but for the unused error class), the
    old b was still joined 15 s after it was back, and its agent took 8 of a's 10
    durable messages to ``flaky-b`` (2 of them redelivered to it after the new one's
    first delivery failed), the new one's 2."""
    caplog.set_level(logging.WARNING, logger="nexus_trio.nats")
    assert nats.port is not None
    proxy = NatsProxy(nats.port)
    old: list[Any] = []
    old_durable: list[Any] = []  # (what the old b's flaky-b took)
    later = NodeProcess(nats.url, "b")
    raised: list[BaseException] = []
    clusters: list[Cluster] = []
    joined, left = trio.Event(), trio.Event()

    try:
        async with (
            _node(nats.url, "a") as (ka, ca),
            open_kernel(node_config()) as kb,
            trio.open_nursery() as nursery,
        ):
            kb.spawn(collector(old), name="collector-b")
            kb.spawn(_keeper(old_durable), name="flaky-b")
            nursery.start_soon(_old_b, kb, proxy.url, clusters, raised, joined, left)
            with trio.fail_after(90):  # a hang guard (the child's imports are slow)
                cb = await _old_b_serving(joined, clusters, ka, ca, old)
                async with ka.events() as events:
                    proxy.refuse("b")
                    await _b_unreachable(events)
                await later.start()
                later_prefix = uuid.UUID(later.ids["collector-b"]).int >> 64
                await until(lambda: ca.member_list()[1].id_prefix == later_prefix)
                await until(lambda: ca.member_list()[1].reachable)
                proxy.refuse("b", False)
                # the old b is back: it hears the later process and leaves the name to it
                with trio.move_on_after(15):
                    await left.wait()
                assert ca.name_holder("collector-b") == ("b", uuid.UUID(later.ids["collector-b"]))
                taken = kb.stats().accepted
                for i in range(20):
                    await ka.send("collector-b", i)
                sent = [await ca.send_durable("flaky-b", f"d{i}") for i in range(10)]
                dump: list[Any] = []
                for _ in range(50):
                    dump = await ka.request("collector-b", "dump", timeout=5)
                    report = await ka.request("flaky-b", "report", timeout=5)
                    if len(dump) == 20 and len(report["applied"]) == 10:
                        break
                    await trio.sleep(0.2)
                await trio.sleep(3.0)  # (3 x ack_wait: a delivery unacked comes again)
                report = await ka.request("flaky-b", "report", timeout=5)
                applied = sorted(report["applied"])
                assert (applied, old_durable, left.is_set()) == (
                    [f"d{i}" for i in range(10)],
                    [],
                    True,
                )
                # (flaky-b fails each message's first delivery by design, applies the second)
                assert report["attempts"] == {str(m.id): 2 for m in sent}
                assert dump == list(range(20))
            assert old == ["before"]
            assert kb.stats().accepted == taken  # nothing of the later process's
            assert kb.is_local("collector-b")  # (its kernel runs on, out of the cluster)
            assert [type(exc) for exc in raised] == [NodeReplaced]
            replaced = raised[0]
            assert isinstance(replaced, NodeReplaced)
            assert (replaced.node, replaced.id_prefix) == ("b", later_prefix)
            assert f"id prefix {later_prefix:016x}" in str(replaced)
            assert cb.stats().inbound_dropped == {}
            assert cb.readiness() is not None  # (not ready: it left)
            said = [r.getMessage() for r in caplog.records if "node b: replaced:" in r.getMessage()]
            assert len(said) == 1, said
            assert [(i.node, i.id_prefix) for i in ca.member_list()] == [
                ("a", ca.id_prefix),
                ("b", later_prefix),
            ]
    finally:
        await later.stop()
        proxy.close()


async def test_a_process_that_heard_its_successor_leaves_it_the_tells_before_the_bucket_confirms(
    nats: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The successor filter's window: the old b (cut off past its loss, its name
    restarted meanwhile, then let through again) hears the later process's heartbeats at
    once, but leaves only once a read of the nodes bucket confirms that process holds the
    name. Here that read is held (a slow JetStream) while a sends 20 tells to
    ``collector-b``: their batches are numbered for the later process, and the old b's
    wildcard subscription to the name's batch subjects gets them too. It leaves them to
    the later process (which takes all 20, once each): the old ``collector-b`` takes
    none, and the old kernel accepts nothing. Let the read through, the old b leaves
    (``NodeReplaced``). Fails with either filter taken out: ``Cluster._on_other_batch``'s
    ``head.dest_prefix != self.id_prefix`` made False (before the fifty-sixth pass's fix,
    ``head.dest_prefix in self._successors``), the old ``collector-b`` took the 20 tells
    too, each handled twice (``accepted`` 21 on the old kernel against 1);
    ``Cluster._for_successor`` made to return False, the old kernel took the 2 queries
    to the later process's ``collector-b`` (2 in that run: ``accepted`` 3 against 1)."""
    assert nats.port is not None
    proxy = NatsProxy(nats.port)
    old: list[Any] = []
    later = NodeProcess(nats.url, "b")
    raised: list[BaseException] = []
    clusters: list[Cluster] = []
    joined, left, gate = trio.Event(), trio.Event(), trio.Event()
    held: list[str] = []
    real_read = Cluster._read_own_record

    async def slow_read(self: Cluster, kv: Any) -> tuple[bytes | None, int]:
        if self.node == "b":
            held.append(self.node)
            await gate.wait()
        return await real_read(self, kv)

    try:
        async with (
            _node(nats.url, "a") as (ka, ca),
            open_kernel(node_config()) as kb,
            trio.open_nursery() as nursery,
        ):
            kb.spawn(collector(old), name="collector-b")
            nursery.start_soon(_old_b, kb, proxy.url, clusters, raised, joined, left)
            with trio.fail_after(90):  # a hang guard (the child's imports are slow)
                cb = await _old_b_serving(joined, clusters, ka, ca, old)
                monkeypatch.setattr(Cluster, "_read_own_record", slow_read)
                async with ka.events() as events:
                    proxy.refuse("b")
                    await _b_unreachable(events)
                await later.start()
                later_prefix = uuid.UUID(later.ids["collector-b"]).int >> 64
                await until(lambda: ca.member_list()[1].id_prefix == later_prefix)
                await until(lambda: ca.member_list()[1].reachable)
                await until(
                    lambda: (
                        ca.name_holder("collector-b") == ("b", uuid.UUID(later.ids["collector-b"]))
                    )
                )
                reconnects = cb.stats().reconnects  # (the data connection's)
                proxy.refuse("b", False)
                await until(lambda: later_prefix in cb._successors and bool(held))
                # The control link, back first, may hear the later process before the
                # data link is back: tells sent then reach no subscription of the old b
                # (core NATS keeps nothing for it), and the wait for its batches below
                # never ends (hung to the 90 s guard: 1 run in 12 under load). Its
                # reconnect is counted after nats-py's flush (its subscriptions in place).
                await until(lambda: cb.stats().reconnects > reconnects)
                taken = kb.stats().accepted
                received = cb.stats().batches_received
                for i in range(20):
                    await ka.send("collector-b", i)
                dump: list[Any] = []
                while len(dump) < 20:
                    dump = await ka.request("collector-b", "dump", timeout=5)
                    await trio.sleep(0.05)
                await until(lambda: cb.stats().batches_received > received)
                assert not left.is_set()  # (still in the window: the read is held)
                assert (old, kb.stats().accepted) == (["before"], taken)
                assert dump == list(range(20))
                # the queries to the later process's collector-b reached the old b too
                # (its subscription to the name's agent subjects): left, not refused
                assert cb.stats().errors_replied == {}
                gate.set()
                await left.wait()
            assert [type(exc) for exc in raised] == [NodeReplaced]
            assert old == ["before"]
    finally:
        await later.stop()
        proxy.close()


async def test_a_batch_queued_to_a_cut_off_process_for_its_successor_is_not_handled_twice(
    nats: NatsServer,
) -> None:
    """A pulled cable, not a refused one: every byte of the old b's two connections is
    held by the proxy, both ways, with the connections left open (the server still
    counts the old b's subscriptions, as it does until its pings time out). a counts b
    lost, a new process joins under the name b, and a sends 20 tells to ``collector-b``:
    their batches are numbered for the later process, which takes them; the server
    queues a copy of each to the old b's data connection too (its subscription to the
    name's batch subjects). Then the old b's data link carries bytes again before its
    control link does (the order two TCP connections come back in is anyone's): the old
    b reads the batches before it has heard the later process. It leaves them alone
    (numbered for another process of its name that it does not know of as an earlier
    one): the old ``collector-b`` takes none of the 20, and the old b, once its control
    link is back, leaves the name to the later process (``NodeReplaced``). Measured on
    the code before (main's ``_cluster.py`` swapped in): the old ``collector-b`` took all
    20 too, each tell handled by both processes (``['before', 0, 1, ..., 19]``)."""
    assert nats.port is not None
    proxy = NatsProxy(nats.port)
    old: list[Any] = []
    later = NodeProcess(nats.url, "b")
    raised: list[BaseException] = []
    clusters: list[Cluster] = []
    joined, left = trio.Event(), trio.Event()
    ways = [(role, upstream) for role in ("data", "control") for upstream in (True, False)]

    try:
        async with (
            _node(nats.url, "a") as (ka, ca),
            open_kernel(node_config()) as kb,
            trio.open_nursery() as nursery,
        ):
            kb.spawn(collector(old), name="collector-b")
            nursery.start_soon(_old_b, kb, proxy.url, clusters, raised, joined, left)
            with trio.fail_after(90):  # a hang guard (the child's imports are slow)
                cb = await _old_b_serving(joined, clusters, ka, ca, old)
                async with ka.events() as events:
                    for role, upstream in ways:
                        proxy.stall("b", role, upstream=upstream)
                    await _b_unreachable(events)
                await later.start()
                later_id = uuid.UUID(later.ids["collector-b"])
                await until(lambda: ca.member_list()[1].id_prefix == later_id.int >> 64)
                await until(lambda: ca.member_list()[1].reachable)
                await until(lambda: ca.name_holder("collector-b") == ("b", later_id))
                received = cb.stats().batches_received
                for i in range(20):
                    await ka.send("collector-b", i)
                dump: list[Any] = []
                while len(dump) < 20:
                    dump = await ka.request("collector-b", "dump", timeout=5)
                    await trio.sleep(0.05)
                assert proxy.nodes().count("b") == 2  # (the old b's links, held open)
                for upstream in (True, False):
                    proxy.resume("b", "data", upstream=upstream)
                await until(lambda: cb.stats().batches_received > received)
                assert not cb._successors  # (its control link still held: not heard yet)
                for upstream in (True, False):
                    proxy.resume("b", "control", upstream=upstream)
                await left.wait()
                assert dump == list(range(20))
            # (the queries by name to the later process's collector-b reached the old
            # b too, unheard of yet: it answered them, late: a dead-letters them late_reply)
            assert old == ["before"]
            assert [type(exc) for exc in raised] == [NodeReplaced]
    finally:
        await later.stop()
        proxy.close()


async def test_tells_numbered_for_a_process_restarted_unnoticed_are_counted_lost_with_it(
    nats: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sender's view of b is still the old process when a new process has joined
    under the name: the old b's links refused (a crashed process: the server drops its
    subscriptions), a new b joined, and a's control link held (server to a) so that a
    hears neither the new process nor the old one's silence (a's loss window is 40 s). a
    sends 20 tells to ``collector-b``: numbered for the old process, on its join's
    subject, and taken by the new b's wildcard subscription, which leaves them (not its
    own: fifty-sixth pass). Not lost silently: once a hears the new process it counts the
    old one lost and the 20 tells it never confirmed with it (``lost_with_nodes``, by node
    ``b``: 20), the new ``collector-b`` having taken none of them. On the code before
    the fifty-sixth pass (``_on_other_batch`` taking a batch numbered for an earlier
    process of the name), the new ``collector-b`` took all 20, counted lost all the same."""
    assert nats.port is not None
    proxy = NatsProxy(nats.port)
    old: list[Any] = []
    new: list[Any] = []
    try:
        async with (
            _node(proxy.url, "a", missed_heartbeats=200) as (ka, ca),
            _node(proxy.url, "b") as (kb, cb),
        ):
            with trio.fail_after(60):  # a hang guard
                kb.spawn(collector(old), name="collector-b")
                await cb.names_published()
                await ca.wait_for_name("collector-b")
                await ka.send("collector-b", "before")
                await until(lambda: old == ["before"])
                await until(
                    lambda: any(
                        i.node == "b" and i.confirmed(ca.stream_name) == 1 for i in ca.member_list()
                    )
                )
                proxy.stall("a", "control", upstream=False)
                proxy.refuse("b")
                async with AsyncExitStack() as stack:
                    with monkeypatch.context() as patch:  # (another process: its own prefix)
                        patch.setattr(cluster_module, "process_id_prefix", lambda: 0xE2)
                        kb2, cb2 = await stack.enter_async_context(_node(nats.url, "b"))
                    kb2.spawn(collector(new), name="collector-b")
                    await cb2.names_published()
                    assert ca.name_holder("collector-b")[0] == "b"
                    assert ca.tells_sent_to("b", cb.id_prefix) == 1
                    published = ca.stats().batches_published
                    received = cb2.stats().batches_received
                    for i in range(20):
                        await ka.send("collector-b", i)  # (a routes it to the old b)
                    await until(lambda: ca.tells_sent_to("b", cb.id_prefix) == 21)
                    await until(
                        lambda: (
                            cb2.stats().batches_received - received
                            >= ca.stats().batches_published - published
                        )
                    )
                    assert ca.stats().lost_with_nodes == 0
                    proxy.resume("a", "control", upstream=False)
                    await until(
                        lambda: any(
                            i.node == "b" and i.id_prefix == cb2.id_prefix for i in ca.member_list()
                        )
                    )
                    # counted lost with the old b (its record replaced) or at its leave (a
                    # delete of its record heard first: its last notice never comes)
                    await until(lambda: ca.stats().lost_with_nodes + ca.stats().lost_at_leave >= 20)
                    stats = ca.stats()
                    assert stats.lost_with_nodes + stats.lost_at_leave == 20
                    assert cb2.stats().inbound_dropped == {}
                    assert new == []
                    assert old == ["before"]
    finally:
        proxy.close()


async def _all_taken(ca: Cluster, cb: Cluster, got: list[Any], sent: int) -> None:
    """Wait until b took each of the ``sent`` numbered tells of a (received, or counted
    lost: a later number or mark showed the gap), then (5 s at most: local delivery, no
    network) until ``got`` holds each one received: the caller's exact assertions then
    fail at once on a loss not counted. Waiting on ``len(got) + lost_in_transit`` alone
    (until the fifty-eighth pass) ran to the 30 s hang guard on such a count, with no
    assertion saying what was short."""
    await until(lambda: cb.tells_taken_from("a", ca.id_prefix) >= sent)
    with trio.move_on_after(5):
        await until(lambda: len(got) + cb.stats().lost_in_transit >= sent)


async def test_tells_the_server_loses_in_part_are_each_handled_or_counted_lost_once(
    nats: NatsServer,
) -> None:
    """Loss without a cut (what the server does to a slow consumer): the proxy drops
    every 3rd message it would write to b's data connection for b's name (batches and
    sequence marks alike, whole, the link kept) and every 2nd heartbeat of b to a. Of
    a's 900 tells to ``collector-b`` each is handled once, in order, or counted once
    in b's ``lost_in_transit`` (the gaps the next number or mark shows); the window's
    credit comes back for both (200 more tells after the loss all arrive), and neither
    node takes the other for lost. (Sound on 701a6638: the first hunt of loss by
    dropped messages.)"""
    assert nats.port is not None
    proxy = NatsProxy(nats.port)
    got: list[Any] = []
    try:
        async with _node(proxy.url, "a") as (ka, ca), _node(proxy.url, "b") as (kb, cb):
            with trio.fail_after(30):  # a hang guard
                kb.spawn(collector(got), name="collector-b")
                await cb.names_published()
                await ca.wait_for_name("collector-b")
                proxy.lose("b", "data", ".node.b.", 3)
                proxy.lose("a", "control", ".hb.b", 2)
                for i in range(900):
                    await ka.send("collector-b", i)
                    if i % 50 == 49:
                        await trio.sleep(0.01)  # (many batches, not a few big ones)
                await _all_taken(ca, cb, got, 900)
                lost = cb.stats().lost_in_transit
                assert proxy.lost[("b", "data")] >= 3 and lost > 0
                assert got == sorted(set(got)), got
                assert len(got) + lost == 900, (len(got), lost)
                proxy.lose("b", "data", ".node.b.", 0)
                for i in range(900, 1100):
                    await ka.send("collector-b", i)
                await _all_taken(ca, cb, got, 1100)
                assert len(got) + lost == 1100, (len(got), lost)
                assert got[-200:] == list(range(900, 1100))
                assert cb.stats().lost_in_transit == lost
                await until(lambda: proxy.lost[("a", "control")] >= 5)  # (1 s of them)
                assert (ca.stats().nodes_lost, cb.stats().nodes_lost) == (0, 0)
                assert cb.stats().inbound_dropped == {}
    finally:
        proxy.close()
