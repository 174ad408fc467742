"""Remote cancellation of a request to an agent *type* (a NATS queue group).

Which replica takes such a query is not known to its requester, so a requester that
stops waiting sends its cancel to every reachable node; the node whose replica took the
query cancels that handler (dead letter ``request_timeout``), the others ignore it.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio

from nexus_trio import (
    Context,
    Message,
    RequestTimeout,
    agent,
)
from nexus_trio._nats import Cluster, NatsServer, type_address

from .nats_server import patient_node, until


def _cancellable(started: trio.Event, cancelled: list[Any]) -> Any:
    async def handle(ctx: Context, msg: Message) -> Any:
        started.set()
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            cancelled.append(msg.id)
            raise

    return handle


async def _wait_members(cluster: Cluster, *nodes: str) -> None:
    await until(lambda: set(nodes) <= {m.node for m in cluster.member_list()})


@pytest.mark.parametrize("replica_on", ["b", "a"])
async def test_a_request_to_a_type_that_times_out_cancels_the_replica_that_took_it(
    nats: NatsServer, replica_on: str
) -> None:
    """The replica is on another node (``b``) or on the requester's own node (``a``:
    NATS hands the query back to a's own queue subscription). Before, neither handler
    was cancelled: it ran on to its own handle timeout (here a minute)."""
    started = trio.Event()
    cancelled: list[Any] = []
    async with patient_node(nats.url, "b") as (kb, cb), patient_node(nats.url, "a") as (ka, ca):
        kernel, cluster = (kb, cb) if replica_on == "b" else (ka, ca)
        other = kb if replica_on == "a" else ka
        ref = kernel.spawn(agent(_cancellable(started, cancelled), name="slow-1"))
        await cluster.serve_type("slow", ref)
        async with kernel.dead_letters() as letters:
            with trio.fail_after(30):
                await _wait_members(ca, "b")
                await _wait_members(cb, "a")
                with pytest.raises(RequestTimeout) as timed_out:
                    await ka.request(type_address("slow"), "work", timeout=2.0)
                assert started.is_set()
                await until(lambda: bool(cancelled))
                letter = await anext(aiter(letters))
        other_dead = other.stats().dead_lettered
    query_id = timed_out.value.request_id
    assert cancelled == [query_id]
    assert (letter.reason.value, letter.message.id) == ("request_timeout", query_id)
    # one frame to the one other node, whichever holds the replica
    assert ca.stats().cancels_sent == 1
    assert cb.stats().cancels_received == 1
    # the node without the replica ignored the frame: nothing dead-lettered there
    assert other_dead == 0


async def test_a_type_cancel_reaches_the_replica_among_three_nodes_and_no_other(
    nats: NatsServer,
) -> None:
    """a asks type ``slow``, served only on c: b gets the cancel frame too and ignores it."""
    started = trio.Event()
    cancelled: list[Any] = []
    async with (
        patient_node(nats.url, "c") as (kc, cc),
        patient_node(nats.url, "b") as (kb, cb),
        patient_node(nats.url, "a") as (ka, ca),
    ):
        ref = kc.spawn(agent(_cancellable(started, cancelled), name="slow-c"))
        await cc.serve_type("slow", ref)
        with trio.fail_after(30):
            await _wait_members(ca, "b", "c")
            with pytest.raises(RequestTimeout) as timed_out:
                await ka.request(type_address("slow"), "work", timeout=2.0)
            await until(lambda: bool(cancelled) and cb.stats().cancels_received >= 1)
        b_dead, c_dead = kb.stats().dead_lettered, kc.stats().dead_lettered
    assert cancelled == [timed_out.value.request_id]
    assert ca.stats().cancels_sent == 2  # one frame to each other node
    assert (cb.stats().cancels_received, cc.stats().cancels_received) == (1, 1)
    assert (b_dead, c_dead) == (0, 1)  # c: the cancelled query (request_timeout)


async def test_a_type_query_that_comes_after_its_cancel_is_skipped(
    nats: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The query travels alone, its cancel in a node batch: the cancel may come first.
    The replica's node then has no replica to cancel, but marks the query late, so that
    when it comes it is skipped (dead letter ``request_timeout``), never handled."""
    started = trio.Event()
    cancelled: list[Any] = []
    held: list[Any] = []
    query_held = trio.Event()
    original = Cluster._accept
    holding: list[Cluster] = []

    def accept(self: Cluster, m: Any, type_name: str | None) -> None:
        if self in holding and type_name == "slow" and not held:
            held.append((m, type_name))  # comes after the cancel (below)
            query_held.set()
            return
        original(self, m, type_name)

    monkeypatch.setattr(Cluster, "_accept", accept)
    async with patient_node(nats.url, "b") as (kb, cb), patient_node(nats.url, "a") as (ka, ca):
        holding.append(cb)
        ref = kb.spawn(agent(_cancellable(started, cancelled), name="slow-1"))
        await cb.serve_type("slow", ref)
        async with kb.dead_letters() as letters:
            with trio.fail_after(30):
                await _wait_members(ca, "b")
                await _wait_members(cb, "a")
                with pytest.raises(RequestTimeout) as timed_out:
                    await ka.request(type_address("slow"), "work", timeout=1.0)
                await query_held.wait()
                await until(lambda: cb.stats().cancels_received >= 1)
                original(cb, *held[0])  # the query, after its cancel
                letter = await anext(aiter(letters))
    assert (letter.reason.value, letter.message.id) == (
        "request_timeout",
        timed_out.value.request_id,
    )
    assert not started.is_set() and cancelled == []
