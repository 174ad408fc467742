"""Fault injection on a real cluster: node processes SIGKILLed (and started again under
their name), two of three members gone at once, requests whose node dies under them or
whose cancel races their reply. Every wait is bounded; conservation is checked on each
side (what a sender had accepted is handled, or counted lost or dropped, somewhere)."""

from __future__ import annotations

import random
import re
from typing import Any

import pytest
import trio

from nexus_trio import Context, Message, RequestTimeout, TransportUnavailable, agent
from nexus_trio._nats import NatsServer

from .nats_server import FAST, until
from .test_nats import local_node, nodes
from .test_nats_datapath import _node


async def test_a_request_in_flight_to_a_killed_node_fails_naming_it_within_its_timeout(
    nats: NatsServer,
) -> None:
    """b is SIGKILLed while a's request to its agent waits for the answer: the caller
    gets TransportUnavailable naming b (its loss, FAST: 0.6 s), well within the
    request's own 8 s timeout, and the kernel counts the request failed, not handled."""
    async with (
        nodes(nats.url, "b") as (b,),
        local_node(nats.url, base=FAST) as (kernel, cluster),
    ):
        with trio.fail_after(60):
            await cluster.wait_for_name("sleepy-b")
            assert await kernel.request("sleepy-b", 0) == "awake"
        published = cluster.stats().published
        outcome: list[tuple[BaseException, float]] = []

        async def ask() -> None:
            started = trio.current_time()
            try:
                await kernel.request("sleepy-b", 60.0, timeout=8.0)
            except (TransportUnavailable, RequestTimeout) as exc:
                outcome.append((exc, trio.current_time() - started))

        with trio.fail_after(30):  # a hang guard
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask)
                await until(lambda: cluster.stats().published > published)
                b.kill()
        ((error, took),) = outcome
        assert isinstance(error, TransportUnavailable), error
        said = str(error)
        assert re.search(
            r"node 'b' hosting sleepy-b is unreachable: it was lost while the request waited"
            r" for its answer \(node 'b' \(pid \d+ on \S+\) missed 3 heartbeats",
            said,
        ), said
        assert took < 8.0, took
        stats = cluster.stats()
        assert (stats.nodes_lost, stats.requests_lost_with_nodes) == (1, 1)
        # a's books: the failed request was handed to the transport, nothing in flight
        kstats = kernel.stats()
        assert (kstats.accepted, kstats.forwarded, kstats.in_flight) == (3, 2, 0)


@pytest.mark.parametrize("seed", [0, 1])
async def test_a_cancel_racing_its_reply_ends_in_the_reply_or_one_late_reply_never_both(
    nats: NatsServer, seed: int
) -> None:
    """Requests whose timeout falls as their reply is made (the handler ignores the
    cancel and answers after ``delay``, the caller waits about as long): for each, the
    caller has its reply, or exactly one ``late_reply`` dead letter is made for it, on
    the answering node (the cancel came first) or the asking one (the reply crossed).
    Never both, never neither: replies + late replies == requests answered."""
    rng = random.Random(seed)
    count = 60
    started: list[int] = []
    answered: list[int] = []

    @agent(name="racer")
    async def racer(ctx: Context, msg: Message) -> Any:
        started.append(1)
        with trio.CancelScope(shield=True):
            await trio.sleep(msg.payload)
        answered.append(1)
        return msg.payload

    async with _node(nats.url, "b") as (kb, cb), _node(nats.url, "a") as (ka, ca):
        for i in range(count):  # one each: no request waits behind another
            kb.spawn(racer, name=f"racer-{i}")
        await cb.names_published()
        replies = timeouts = 0

        def late() -> int:
            return sum(k.stats().dead_letters_by_reason.get("late_reply", 0) for k in (ka, kb))

        with trio.fail_after(60):  # a hang guard
            for i in range(count):
                await ca.wait_for_name(f"racer-{i}")

            async def one(i: int, delay: float, timeout: float) -> None:
                nonlocal replies, timeouts
                try:
                    assert await ka.request(f"racer-{i}", delay, timeout=timeout) == delay
                    replies += 1
                except RequestTimeout:
                    timeouts += 1

            async with trio.open_nursery() as nursery:
                for i in range(count):
                    delay = rng.uniform(0.02, 0.06)
                    nursery.start_soon(one, i, delay, delay + rng.uniform(-0.01, 0.01))
                    await trio.sleep(0.005)
            await until(lambda: len(started) == count == len(answered))
            await until(lambda: replies + late() >= count)
            # b's late replies went out before the answer to this one: all have come
            assert await ka.request("racer-0", 0.0) == 0.0
        assert replies + timeouts == count
        assert 0 < timeouts < count, (replies, timeouts)
        assert late() == timeouts, (replies, timeouts, late())
        assert ka.stats().in_flight == kb.stats().in_flight == 0
