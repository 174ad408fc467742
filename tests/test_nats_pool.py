"""A pool on one node, asked from another: cancellation and the errors its requester sees.

Real nats-server (the ``nats`` fixture), two nodes in this process.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio

from nexus_trio import (
    Context,
    Message,
    RequestFailed,
    RequestTimeout,
    agent,
    pool,
)
from nexus_trio._nats import NatsServer

from .nats_server import patient_node, until


async def test_a_remote_request_through_a_pool_that_times_out_cancels_the_worker_s_handler(
    nats: NatsServer,
) -> None:
    """The cancel frame names the pool (the address the requester asked); the router had
    passed the query on to its worker. Before, the worker's handler ran on to its own
    handle timeout (here a minute) and its answer was a late reply."""
    started = trio.Event()
    cancelled: list[Any] = []

    @agent
    async def slow(ctx: Context, msg: Message) -> Any:
        started.set()
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            cancelled.append((ctx.name, msg.id))
            raise

    async with patient_node(nats.url, "b") as (kb, _), patient_node(nats.url, "a") as (ka, ca):
        kb.spawn(pool(slow, size=2, name="slow-pool"))
        async with kb.dead_letters() as letters:
            with trio.fail_after(30):
                await ca.wait_for_name("slow-pool")
                with pytest.raises(RequestTimeout) as timed_out:
                    await ka.request("slow-pool", "work", timeout=2.0)
                assert started.is_set()
                await until(lambda: bool(cancelled))
                letter = await anext(aiter(letters))
    query_id = timed_out.value.request_id
    assert cancelled == [("slow-pool/0", query_id)]
    assert (letter.reason.value, letter.message.id) == ("request_timeout", query_id)
    assert ca.stats().cancels_sent == 1


async def test_a_remote_request_that_fails_at_a_pool_s_worker_names_the_pool_and_the_worker(
    nats: NatsServer,
) -> None:
    """As for a local requester: ``to`` is the pool asked, ``at`` the worker whose handler
    failed. Before, a remote requester's error named only the pool (a local one's only
    the worker's id)."""

    @agent
    async def bad(ctx: Context, msg: Message) -> Any:
        raise ValueError(f"bad {msg.payload}")

    async with patient_node(nats.url, "b") as (kb, _), patient_node(nats.url, "a") as (ka, ca):
        kb.spawn(pool(bad, size=2, name="bad-pool"))
        with trio.fail_after(30):
            await ca.wait_for_name("bad-pool")
            with pytest.raises(RequestFailed) as info:
                await ka.request("bad-pool", "work", timeout=10.0)
    failed = info.value
    assert (failed.to, failed.at, failed.node, failed.reason) == (
        "bad-pool",
        "bad-pool/0",
        "b",
        "handler_error",
    )
    assert str(failed) == (
        f"request {failed.request_id} to 'bad-pool' failed at 'bad-pool/0' on node 'b'"
        " (handler_error):"
        """ RemoteError("on node 'b': ValueError('bad work')")"""
    )
