"""A live node against a hostile peer on its NATS account.

The codecs are fuzzed alone in ``test_wire_fuzz.py``; here real nodes (kernels joined to
a real nats-server) take what a raw nats-py client publishes on their subjects and
writes into their buckets: mutated node batches, sequence marks, replies and error
frames for nobody, JSON-form messages with wrong fields, membership records of fake
nodes (absurd fields, a live node's name or id prefix, a fake that goes silent), and
placement records naming nodes that do not exist. The nodes must keep serving, hang
never, count what they refuse and lose nothing of their own traffic (see
docs/distributed.md, "Security", for what such a peer can still do).
"""

from __future__ import annotations

import itertools
import json
import struct
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import nats as nats_py
import pytest
import trio

from nexus_trio import (
    Context,
    EventKind,
    Kernel,
    Message,
    MessageKind,
    agent,
    open_kernel,
)
from nexus_trio._nats import Cluster, NatsServer, join_cluster
from nexus_trio._nats import _batch as batch
from nexus_trio._nats import _wire as wire
from nexus_trio._nats._aio import call_aio

from .nats_server import FAST, node_config

_prefixes = itertools.count()


@asynccontextmanager
async def _node(
    url: str, name: str, prefix: str = "nexus"
) -> AsyncIterator[tuple[Kernel, Cluster]]:
    async with (
        open_kernel(node_config()) as kernel,
        join_cluster(kernel, url, name, options=FAST, prefix=prefix) as cluster,
    ):
        yield kernel, cluster
        await kernel.shutdown()


@attrs.define
class Hostile:
    """A raw nats-py client: publishes anything, writes anything into the buckets."""

    nc: Any
    prefix: str

    async def publish(
        self, subject: str, data: bytes, headers: dict[str, str] | None = None
    ) -> None:
        await call_aio(self.nc.publish, subject, data, headers=headers)

    async def put(self, bucket: str, key: str, value: bytes) -> None:
        async def put() -> None:
            kv = await self.nc.jetstream().key_value(f"{self.prefix}-{bucket}")
            await kv.put(key, value)

        await call_aio(put)

    async def flush(self) -> None:
        await call_aio(self.nc.flush)


@asynccontextmanager
async def _hostile(url: str, prefix: str = "nexus") -> AsyncIterator[Hostile]:
    nc = await call_aio(nats_py.connect, url)
    try:
        yield Hostile(nc, prefix)
    finally:
        with trio.CancelScope(shield=True):
            await call_aio(nc.close)


def _record(node: str, /, **fields: Any) -> bytes:
    """A membership record as a kernel writes it, with ``fields`` replaced (raw JSON text
    for a value that is a ``bytes``)."""
    record: dict[str, Any] = {
        "node": node,
        "id_prefix": "00000000000000ab",
        "pid": 1,
        "host": "h",
        "joined": 1.0,
        "stats": {},
        "session": "00000000000000cd",
    }
    record.update(fields)
    parts = [
        f'"{key}":' + (value.decode() if isinstance(value, bytes) else json.dumps(value))
        for key, value in record.items()
    ]
    return ("{" + ",".join(parts) + "}").encode()


def _frame(kind: int, body: bytes) -> bytes:
    return struct.pack(">IB", len(body) + 1, kind) + body


def _tell(to: str, payload: Any, kind: MessageKind = MessageKind.COMMAND) -> bytes:
    return wire.encode_tell(Message(uuid.uuid4(), to, payload, kind))


@agent(name="echo")
async def echo(ctx: Context, msg: Message) -> Any:
    return msg.payload


async def _members_heard(cluster: Cluster, *names: str) -> None:
    """Wait (bounded) until ``cluster`` heard all of ``names`` (the bucket's watch applies
    entries in order: a marker written after a hostile entry is heard after it)."""
    with trio.fail_after(10):
        while True:
            if set(names) <= {info.node for info in cluster.member_list()}:
                return
            await trio.sleep(0.02)


# --- membership records that cannot be read ----------------------------------------------------


@pytest.mark.parametrize(
    "record",
    [
        _record("fake", stats=b"[" * 5000 + b"]" * 5000),  # nested past the recursion limit
        _record("fake", pid=b"Infinity"),  # no integer
        _record("fake", joined=b"NaN"),
        b"[" * 5000 + b"]" * 5000,
    ],
    ids=["deep-stats", "infinite-pid", "nan-joined", "deep-record"],
)
async def test_a_membership_record_that_cannot_be_read_is_ignored_and_the_node_serves(
    nats: NatsServer, record: bytes
) -> None:
    """A record nested too deeply or with a pid that is no integer, written into the
    nodes bucket, raised out of the bucket's watch (RecursionError, OverflowError): the
    node's cluster failed. It is ignored, as any malformed record is."""
    async with _node(nats.url, "b") as (kb, cb), _node(nats.url, "a") as (ka, ca):
        kb.spawn(echo, name="echo-b")
        await cb.names_published()
        async with _hostile(nats.url) as hostile:
            with trio.fail_after(20):
                await hostile.put("nodes", "fake", record)
                await hostile.put("nodes", "marker", _record("marker"))
                await _members_heard(ca, "marker")
                await _members_heard(cb, "marker")
                await ca.wait_for_name("echo-b")
                assert await ka.request("echo-b", 1) == 1
        assert "fake" not in {info.node for info in ca.member_list()}


@pytest.mark.parametrize(
    ("field", "value"),
    [("id_prefix", "-1"), ("id_prefix", "1" + "0" * 16), ("session", "-5"), ("session", "f" * 17)],
)
async def test_a_record_whose_ids_are_no_64_bit_numbers_makes_no_member(
    nats: NatsServer, field: str, value: str
) -> None:
    """A fake node whose id prefix is no 64-bit number was a member, and when it went
    silent its loss (the event naming its id space) raised ValueError in the loss check:
    the node's cluster failed. Such a record is malformed now: no member, nothing lost."""
    async with _node(nats.url, "a") as (ka, ca), _hostile(nats.url) as hostile:
        ka.spawn(echo, name="echo-a")
        with trio.fail_after(20):
            async with ka.events() as events:
                await hostile.publish("nexus.hb.fake", _record("fake", **{field: value}))
                await hostile.put("nodes", "fake", _record("fake", **{field: value}))
                await hostile.put("nodes", "marker", _record("marker"))
                async for event in events:  # the marker goes silent: lost
                    if event.kind is EventKind.UNREACHABLE:
                        break
            assert event.name == "node:marker"
            assert await ka.request("echo-a", 2) == 2
        assert "fake" not in {info.node for info in ca.member_list()}
        assert ca.stats().nodes_lost == 1


@pytest.mark.parametrize(
    "stats",
    [
        {"recv": "everything"},
        {"recv": {"STREAM": "all of it"}},
        {"recv": {"STREAM": -3}},
        {"in_flight": "many"},
        {"in_flight": 1.5},
        {"held": -5},
        {"held": True},
    ],
)
async def test_a_lost_members_counts_that_are_no_counts_are_read_as_none(
    nats: NatsServer, stats: dict[str, Any]
) -> None:
    """The counts a lost member's last record holds (the last number it took of each
    stream, what it held) are added to ``lost_with_nodes`` on its loss. A fake member whose
    counts were no numbers stopped the survivor's loss check (``AttributeError``,
    ``ValueError``: the node's cluster failed), and a negative one took from the count. A
    count that is no whole number of at least zero counts nothing now."""
    async with _node(nats.url, "a") as (ka, ca), _hostile(nats.url) as hostile:
        ka.spawn(echo, name="echo-a")
        recv = stats.get("recv")
        if isinstance(recv, dict):
            stats = {**stats, "recv": {ca.stream_name: recv["STREAM"]}}
        with trio.fail_after(20):
            async with ka.events() as events:
                await hostile.put("nodes", "fake", _record("fake", stats=stats))
                async for event in events:
                    if event.kind is EventKind.UNREACHABLE:
                        break
            assert event.name == "node:fake"
            assert await ka.request("echo-a", 3) == 3
        assert ca.stats().nodes_lost == 1
        assert ca.stats().lost_with_nodes == 0


@pytest.mark.parametrize("via", ["heartbeat", "bucket"])
async def test_a_record_naming_another_node_than_its_subject_or_key_is_ignored(
    nats: NatsServer, via: str
) -> None:
    """A record on the heartbeat subject (or under the bucket key) of node ``fake`` that
    names the live node ``b``, with a new id prefix, was taken as ``b`` restarted: ``a``
    counted ``b`` lost (its agents re-placed, requests to it failed). A subject or a key
    is what NATS permissions can restrict to one node; the name inside the record is
    anyone's to write. Such a record is malformed now and changes nothing."""
    async with (
        _node(nats.url, "b") as (kb, cb),
        _node(nats.url, "a") as (ka, ca),
        _hostile(nats.url) as hostile,
    ):
        kb.spawn(echo, name="echo-b")
        await cb.names_published()
        spoof = _record("b", id_prefix="00000000000000ef", joined=1e12)
        with trio.fail_after(20):
            await _members_heard(ca, "b")
            if via == "heartbeat":
                await hostile.publish("nexus.hb.fake", spoof)
            else:
                await hostile.put("nodes", "fake", spoof)
            await hostile.put("nodes", "marker", _record("marker"))
            await _members_heard(ca, "marker")
            await ca.wait_for_name("echo-b")
            assert await ka.request("echo-b", 4) == 4
        assert ca.stats().nodes_lost == 0
        assert {info.node: info.id_prefix for info in ca.member_list()}["b"] == cb.id_prefix


@pytest.mark.parametrize("sender", ["n" * 5000, "x.*", "with space"])
async def test_a_sender_name_that_is_no_node_name_is_malformed_and_the_node_stays_connected(
    nats: NatsServer, sender: str
) -> None:
    """A batch head or a sequence mark names its sender's node; the receiver returns
    credit to it on ``<prefix>.node.<that name>.batch``. A name of 5,000 characters (past
    the server's control line) or with a dot or a wildcard made the receiver publish on a
    subject the server refuses: it closed the receiver's data connection (what was in
    flight to it lost), at the will of any peer. Such a batch or mark is malformed now."""
    async with _node(nats.url, "a") as (ka, ca), _hostile(nats.url) as hostile:
        echo_ref = ka.spawn(echo, name="echo-a")
        name = sender.encode()
        head = struct.pack(">4sQQQQIH", batch.MAGIC, 1, 2, ca.id_prefix, 5, 1, len(name)) + name
        tell = _frame(batch.TELL, _tell("echo-a", "hostile"))
        mark = f"{sender}:2.1.{ca.id_prefix:x}.9".encode()
        with trio.fail_after(20):
            await hostile.publish("nexus.node.a.batch", head + tell)
            await hostile.publish("nexus.node.a.seq", mark)
            query = Message(uuid.uuid4(), echo_ref.id, "after", MessageKind.QUERY)
            raw = await call_aio(
                hostile.nc.request,
                f"nexus.node.a.agent.{echo_ref.id}",
                query.to_json().encode(),
                timeout=10,
            )
        assert Message.from_json(raw.data).payload == "after"
        stats = ca.stats()
        assert stats.disconnects == 0
        assert stats.inbound_dropped == {"malformed_batch": 1, "malformed": 1}
        assert stats.lost_in_transit == 0
