"""The two shortcuts through nats-py (``_direct``). Messages of a subscription taken
inline in nats-py's reading task: the order, the fall-back behind older queued messages,
a failing ``take``. The messages of the client's buffer, read and taken out of it.
Messages written at once: behind what the client's buffer holds, and
the usual way when they must be (malformed subject, not connected, socket backlog, too
big). The data path of two kernels: a query after tells on the same link arrives after
them, taken inline.

The real-server tests run one nats-server on 127.0.0.1; waits are bounded with
``trio.fail_after`` and nothing sleeps.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import attrs
import nats as nats_py
import pytest
import trio
import trio.testing
import trio_asyncio  # type: ignore[import-untyped, import-not-found, unused-ignore]

from nexus_trio import Config, Context, KernelConfig, Message, agent, open_kernel
from nexus_trio._nats import NatsServer, join_cluster
from nexus_trio._nats import _wire as wire
from nexus_trio._nats._aio import asyncio_loop, call_aio, call_aio_bounded, on_loop
from nexus_trio._nats._cluster import AT_ONCE_TELLS
from nexus_trio._nats._direct import (
    deliver_inline,
    flush_after_subscribe,
    parse_commands,
    publish_at_once,
    read_inline,
    take_queued,
    take_unsent,
    unsubscribe_server_first,
)

from .nats_server import FAST, PATIENT, until


def _msg(data: bytes) -> SimpleNamespace:
    return SimpleNamespace(data=data, subject="s")


def test_a_message_behind_older_queued_ones_waits_its_turn() -> None:
    """Messages queued before the shortcut was installed are taken first, by the
    subscription's task; what comes meanwhile goes behind them; then inline again."""
    queue: asyncio.Queue[Any] = asyncio.Queue()
    sub = SimpleNamespace(_pending_queue=queue, _pending_size=0)
    taken: list[bytes] = []
    for data in (b"1", b"22"):  # as nats-py does: count the bytes, then queue
        sub._pending_size += len(data)
        queue.put_nowait(_msg(data))
    assert deliver_inline(sub, lambda m: taken.append(m.data))

    sub._pending_size += 3
    queue.put_nowait(_msg(b"333"))
    assert taken == [] and queue.qsize() == 3  # not inline: older ones wait

    while not queue.empty():  # the subscription's task, whose callback calls take
        m = queue.get_nowait()
        sub._pending_size -= len(m.data)
        taken.append(m.data)
    sub._pending_size += 4
    queue.put_nowait(_msg(b"4444"))
    assert taken == [b"1", b"22", b"333", b"4444"]
    assert queue.empty() and sub._pending_size == 0


def test_a_subscription_of_another_shape_is_left_as_it_is() -> None:
    sub = SimpleNamespace(_pending_queue=[], _pending_size=0)
    assert not deliver_inline(sub, lambda m: None)
    assert sub._pending_queue == []


async def test_messages_are_taken_in_order_in_the_reading_task(nats: NatsServer) -> None:
    count = 200
    taken: list[int] = []
    tasks: set[Any] = set()
    done = trio.Event()

    def take(m: Any) -> None:
        tasks.add(asyncio.current_task())
        taken.append(int(m.data))
        if len(taken) == count:
            done.set()

    async def callback(m: Any) -> None:
        take(m)

    async with asyncio_loop():
        receiver = await call_aio(nats_py.connect, nats.url)
        sender = await call_aio(nats_py.connect, nats.url)

        async def subscribe() -> Any:
            sub = await receiver.subscribe("inline.test", cb=callback)
            await flush_after_subscribe(receiver)
            return sub

        sub = await call_aio(subscribe)
        assert deliver_inline(sub, take)

        async def publish() -> None:
            for n in range(count):
                await sender.publish("inline.test", str(n).encode())
            await sender.flush()

        with trio.fail_after(20):
            await call_aio(publish)
            await done.wait()
        assert taken == list(range(count))
        assert tasks == {receiver._reading_task}  # not the subscription's task
        assert sub.pending_bytes == 0 and sub.pending_msgs == 0
        await call_aio(sender.close)
        await call_aio(receiver.close)


async def test_a_failing_take_is_logged_and_reading_goes_on(
    nats: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    taken: list[bytes] = []
    done = trio.Event()

    def take(m: Any) -> None:
        if m.data == b"boom":
            raise ValueError("bad message")
        taken.append(m.data)
        if m.data == b"last":
            done.set()

    async def callback(m: Any) -> None:
        take(m)

    async with asyncio_loop():
        nc = await call_aio(nats_py.connect, nats.url)

        async def run() -> None:
            sub = await nc.subscribe("inline.fail", cb=callback)
            assert deliver_inline(sub, take)
            await nc.flush()
            for data in (b"first", b"boom", b"last"):
                await nc.publish("inline.fail", data)
            await nc.flush()

        with caplog.at_level(logging.ERROR, "nexus_trio.nats"), trio.fail_after(20):
            await call_aio(run)
            await done.wait()
        assert taken == [b"first", b"last"]
        assert nc.is_connected
        assert any("could not be handled" in r.getMessage() for r in caplog.records)
        await call_aio(nc.close)


async def test_a_query_after_tells_arrives_after_them_taken_inline(nats: NatsServer) -> None:
    """The query and the tells' batch both go through the inline path on the receiving
    node, in the client's reading task; the query still comes after the tells."""
    seen: list[Any] = []

    @agent(name="log")
    async def record(ctx: Context, msg: Message) -> Any:
        seen.append(msg.payload)
        return len(seen)

    config = Config(kernel=KernelConfig(request_timeout_ms=5000, mailbox_capacity=4096))
    options = attrs.evolve(FAST)
    async with (
        open_kernel(config) as kb,
        open_kernel(config) as ka,
        join_cluster(kb, nats.url, "b", options=options) as cb,
        join_cluster(ka, nats.url, "a", options=options) as ca,
    ):
        kb.spawn(record)
        tasks: list[tuple[str, Any]] = []
        on_batch, handle_now = cb._on_batch, cb._handle_now

        def spy_batch(data: bytes) -> None:
            tasks.append(("batch", (asyncio.current_task(), trio.lowlevel.current_task())))
            on_batch(data)

        def spy_single(m: Any) -> bool:
            tasks.append(("single", (asyncio.current_task(), trio.lowlevel.current_task())))
            return handle_now(m)

        cb._on_batch = spy_batch  # type: ignore[method-assign]
        cb._handle_now = spy_single  # type: ignore[method-assign]
        with trio.fail_after(30):
            await cb.names_published()
            await ca.wait_for_name("log")
            for n in range(1, 51):
                await ka.send("log", n)
            assert await ka.request("log", "query") == 51
        assert seen == [*range(1, 51), "query"]
        # the tells' batch(es), then the query, all where the data connection's socket
        # is read (read_inline): one Trio task, in no asyncio task (not nats-py's
        # reading task, which waits for bytes that never reach it)
        kinds = [kind for kind, _ in tasks]
        assert "batch" in kinds and kinds[-1] == "single" and kinds.count("single") == 1
        assert {aio for _, (aio, _) in tasks} == {None}
        assert len({task for _, (_, task) in tasks}) == 1
        await ka.shutdown()
        await kb.shutdown()


class _Parser:
    """nats-py's parser as ``read_inline`` uses it: ``parse`` of b"slow" waits for
    ``gate``, of b"bad" raises."""

    def __init__(self) -> None:
        self.seen: list[bytes] = []
        self.gate: asyncio.Future[None] | None = None

    async def parse(self, data: bytes = b"") -> None:
        if data == b"bad":
            raise ValueError("bad bytes")
        if data == b"slow":
            self.gate = asyncio.get_running_loop().create_future()
            await self.gate
        self.seen.append(data)


def _reading(reader: asyncio.StreamReader, parser: _Parser) -> SimpleNamespace:
    """A client of nats-py's shape, as far as ``read_inline`` reads it."""
    return SimpleNamespace(_transport=SimpleNamespace(_io_reader=reader), _ps=parser)


def test_bytes_are_parsed_where_they_are_read_while_the_reading_task_waits() -> None:
    async def main() -> None:
        reader, parser = asyncio.StreamReader(), _Parser()
        assert read_inline(_reading(reader, parser))
        assert read_inline(_reading(reader, parser))  # (once a reader: not twice)
        reading = asyncio.create_task(reader.read(100))  # nats-py's reading task
        await asyncio.sleep(0)  # it waits for bytes
        reader.feed_data(b"one")
        assert parser.seen == [b"one"]  # parsed in the call that read them
        reader.feed_data(b"two")
        assert parser.seen == [b"one", b"two"] and not reading.done()
        reading.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reading
        # nothing waits for them: buffered, for the reading task's next read, in order
        reader.feed_data(b"three")
        reader.feed_data(b"four")
        assert parser.seen == [b"one", b"two"]
        assert await reader.read(100) == b"threefour"

    asyncio.run(main())


def test_bytes_behind_a_parse_that_suspends_wait_for_it_then_the_end() -> None:
    async def main() -> None:
        reader, parser = asyncio.StreamReader(), _Parser()
        assert read_inline(_reading(reader, parser))
        reading = asyncio.create_task(reader.read(100))
        await asyncio.sleep(0)
        reader.feed_data(b"slow")  # its parse waits for the gate
        reader.feed_data(b"after")
        reader.feed_eof()
        await asyncio.sleep(0)
        assert parser.seen == [] and not reading.done()
        assert parser.gate is not None
        parser.gate.set_result(None)
        # the reading task sees the end only once what came before it was parsed
        assert await asyncio.wait_for(reading, 20) == b""
        assert parser.seen == [b"slow", b"after"]

    asyncio.run(main())


def test_a_parse_that_fails_hands_its_error_to_the_reading_task() -> None:
    """As if nats-py's own parse had raised in its reading task (which then handles a
    protocol error or a lost connection as it always does)."""

    async def main() -> None:
        reader, parser = asyncio.StreamReader(), _Parser()
        assert read_inline(_reading(reader, parser))
        reading = asyncio.create_task(reader.read(100))
        await asyncio.sleep(0)
        reader.feed_data(b"bad")
        with pytest.raises(ValueError, match="bad bytes"):
            await asyncio.wait_for(reading, 20)  # (bounded: not woken is a failure)

    asyncio.run(main())


def test_a_client_of_another_shape_is_read_as_nats_py_reads_it() -> None:
    assert not read_inline(SimpleNamespace())
    assert not read_inline(_reading(SimpleNamespace(), _Parser()))  # type: ignore[arg-type]

    async def main() -> None:
        reader = asyncio.StreamReader()
        assert not read_inline(SimpleNamespace(_transport=SimpleNamespace(_io_reader=reader)))
        assert "feed_data" not in vars(reader)
        for name in ("_waiter", "_limit", "_transport"):  # a reader of another Python
            other = asyncio.StreamReader()
            delattr(other, name)
            assert not read_inline(_reading(other, _Parser()))
            assert "feed_data" not in vars(other)

    asyncio.run(main())


async def test_requests_are_parsed_where_read_also_after_a_reconnect(nats: NatsServer) -> None:
    """Neither a query nor its reply waits for a turn of nats-py's reading task on
    either kernel (one Trio scheduler round less each way); after the data connection
    is lost and made again, the new connection's reader is read the same way."""

    @agent(name="echo")
    async def echo(ctx: Context, msg: Message) -> Any:
        return msg.payload

    config = Config(kernel=KernelConfig(request_timeout_ms=10_000))
    async with (
        open_kernel(config) as kb,
        open_kernel(config) as ka,
        join_cluster(kb, nats.url, "b", options=PATIENT) as cb,
        join_cluster(ka, nats.url, "a", options=PATIENT) as ca,
    ):
        kb.spawn(echo)
        with trio.fail_after(30):
            await cb.names_published()
            await ca.wait_for_name("echo")
            assert await ka.request("echo", 0) == 0
        parsed_by_reading_task = {"a": 0, "b": 0}

        def spy(name: str, cluster: Any) -> None:
            parser = cluster.nc._ps
            parse = parser.parse

            async def counted(data: bytes = b"") -> None:
                if asyncio.current_task() is cluster.nc._reading_task:
                    parsed_by_reading_task[name] += 1
                await parse(data)

            parser.parse = counted  # (nats-py's reading task calls self._ps.parse)

        spy("a", ca)
        spy("b", cb)
        with trio.fail_after(30):
            for n in range(1, 21):
                assert await ka.request("echo", n) == n
        assert parsed_by_reading_task == {"a": 0, "b": 0}

        old_reader = ca.nc._transport._io_reader
        ca.nc._transport._io_writer.transport.abort()  # the data connection is lost
        with trio.fail_after(30):
            await until(lambda: ca.stats().reconnects >= 1)  # (nothing announces it)
            for n in range(21, 41):
                assert await ka.request("echo", n) == n
        assert ca.nc._transport._io_reader is not old_reader
        assert "feed_data" in vars(ca.nc._transport._io_reader)
        reads_before = parsed_by_reading_task["a"]
        with trio.fail_after(30):
            for n in range(41, 61):
                assert await ka.request("echo", n) == n
        assert parsed_by_reading_task["a"] == reads_before
        assert parsed_by_reading_task["b"] == 0
        await ka.shutdown()
        await kb.shutdown()


async def test_small_batches_sealed_at_the_flusher_s_tick_are_written_at_once(
    nats: NatsServer,
) -> None:
    """A node batch of a few tells sealed at the flusher's tick (a ring's few tokens in
    flight) is written to the socket at once, without a turn of nats-py's flusher task;
    a full batch sealed mid-burst, and a tick's batch of more than AT_ONCE_TELLS, still
    go through nats-py's buffer (the small one written behind it): every tell arrives,
    in order."""
    seen: list[int] = []
    arrived = trio.Event()
    wanted = 0

    @agent(name="log")
    async def record(ctx: Context, msg: Message) -> None:
        seen.append(msg.payload)
        if len(seen) == wanted:
            arrived.set()

    config = Config(kernel=KernelConfig(mailbox_capacity=4096))
    options = attrs.evolve(PATIENT, batch_frames=64)
    async with (
        open_kernel(config) as kb,
        open_kernel(config) as ka,
        join_cluster(kb, nats.url, "b", options=options) as cb,
        join_cluster(ka, nats.url, "a", options=options) as ca,
    ):
        kb.spawn(record)
        with trio.fail_after(30):
            await cb.names_published()
            await ca.wait_for_name("log")
        kicks = 0
        publish = ca.nc.publish
        batches_to_b = wire.batch_subject(ca.prefix, "b")

        async def kick(subject: str, *args: Any, **kwargs: Any) -> Any:
            # a batch through nats-py's publish, which asks its flusher task to write
            # (the turn saved). Batches only: a sequence mark the heartbeat sends while a
            # burst is on its way (a loaded machine: a burst outlasting a heartbeat) goes
            # that way too, and counting it failed this test under load (kicks == 2)
            nonlocal kicks
            kicks += subject.startswith(batches_to_b)
            return await publish(subject, *args, **kwargs)

        ca.nc.publish = kick  # type: ignore[method-assign]

        async def burst(first: int, count: int) -> None:
            nonlocal wanted, arrived
            wanted, arrived = first + count, trio.Event()
            with trio.fail_after(30):
                for n in range(first, first + count):
                    ka.send_nowait("log", n)
                await arrived.wait()

        before = ca.stats().batches_published
        for n in range(5):  # one tell a batch, each sealed at the tick
            await burst(n, 1)
        assert ca.stats().batches_published - before == 5
        assert kicks == 0
        await burst(5, 64 + 3)  # a full batch mid-burst, 3 tells at the tick
        assert kicks == 1
        await burst(5 + 67, AT_ONCE_TELLS + 1)  # one batch at the tick, not small
        assert kicks == 2
        assert seen == list(range(5 + 67 + AT_ONCE_TELLS + 1))
        await ka.shutdown()
        await kb.shutdown()


# --- written at once -----------------------------------------------------------------------


async def test_a_message_written_at_once_goes_behind_what_the_buffer_holds(
    nats: NatsServer,
) -> None:
    received: list[tuple[str, str, bytes]] = []
    done = trio.Event()

    async def collect(m: Any) -> None:
        received.append((m.subject, m.reply, m.data))
        if m.data == b"query":
            done.set()

    async with asyncio_loop():
        receiver = await call_aio(nats_py.connect, nats.url)
        sender = await call_aio(nats_py.connect, nats.url)

        async def subscribe() -> None:
            await receiver.subscribe("at-once.>", cb=collect)
            await flush_after_subscribe(receiver)

        await call_aio(subscribe)
        out_before = sender.stats["out_msgs"]
        # buffered by nats-py (its flusher not run yet), then one written at once
        for n in range(3):
            with pytest.raises(StopIteration):
                sender.publish("at-once.tell", str(n).encode()).send(None)
        assert len(sender._pending) == 3
        assert publish_at_once(sender, "at-once.query", "reply.to.me", b"query")
        assert sender._pending == [] and sender._pending_data_size == 0
        assert sender.stats["out_msgs"] == out_before + 4
        with trio.fail_after(20):
            await done.wait()
        assert received == [
            ("at-once.tell", "", b"0"),
            ("at-once.tell", "", b"1"),
            ("at-once.tell", "", b"2"),
            ("at-once.query", "reply.to.me", b"query"),
        ]
        await call_aio(sender.close)
        await call_aio(receiver.close)


async def test_what_cannot_be_written_at_once_is_left_to_publish(nats: NatsServer) -> None:
    async with asyncio_loop():
        nc = await call_aio(nats_py.connect, nats.url)
        out_before = nc.stats["out_msgs"]
        # a reply subject from another node must not inject protocol lines
        assert not publish_at_once(nc, "a.b", "x\r\nPUB evil 1", b"x")
        assert not publish_at_once(nc, "a b", "", b"x")
        assert not publish_at_once(nc, "", "", b"x")
        assert not publish_at_once(nc, "a.b", "", b"x" * (nc.max_payload + 1))
        socket = nc._transport._io_writer.transport
        original = socket.get_write_buffer_size
        socket.get_write_buffer_size = lambda: 1  # a backlog: the flusher drains it
        try:
            assert not publish_at_once(nc, "a.b", "", b"x")
        finally:
            socket.get_write_buffer_size = original
        assert nc._pending == [] and nc.stats["out_msgs"] == out_before
        await call_aio(nc.close)
        assert not publish_at_once(nc, "a.b", "", b"x")  # closed: publish raises


def test_the_messages_of_the_client_s_buffer_are_read_as_nats_py_wrote_them() -> None:
    """What a leave with the connection down finds in the buffer: each message with its
    subject, reply, headers and payload, in order; other commands skipped."""
    from nats.protocol.command import hpub_cmd, pub_cmd, sub_cmd

    header = b"NATS/1.0\r\nNexus-Error: mailbox_full\r\nNexus-Node: b\r\n\r\n"
    data = b"".join(
        (
            pub_cmd("p.node.b.batch.1f", "", b"tells\r\nmore"),
            sub_cmd("p.node.a.>", "", 7),
            pub_cmd("p.node.b.agent.x", "p.node.a.reply.y", b""),
            hpub_cmd("p.node.b.reply.z", "", header, b"{}"),
        )
    )
    assert parse_commands(data) == [
        ("p.node.b.batch.1f", "", None, b"tells\r\nmore"),
        ("p.node.b.agent.x", "p.node.a.reply.y", None, b""),
        ("p.node.b.reply.z", "", {"Nexus-Error": "mailbox_full", "Nexus-Node": "b"}, b"{}"),
    ]
    for cut in (data[:-1], data + b"PUB s 5\r\nabc\r\n", b"PUB s x\r\n", b"PUB s 1"):
        with pytest.raises(ValueError, match=r"byte|invalid literal"):
            parse_commands(cut)


def test_taking_the_buffer_empties_it_or_takes_nothing_when_it_cannot_be_read() -> None:
    from nats.protocol.command import pub_cmd

    command = pub_cmd("s", "", b"x")
    nc = SimpleNamespace(_pending=[command], _pending_data_size=len(command))
    assert take_unsent(nc) == [("s", "", None, b"x")]
    assert (nc._pending, nc._pending_data_size) == ([], 0)
    broken = SimpleNamespace(_pending=[b"PUB s 9\r\nx\r\n"], _pending_data_size=12)
    assert take_unsent(broken) is None and broken._pending_data_size == 12
    assert take_unsent(SimpleNamespace()) is None


def test_a_parse_left_suspended_when_the_reading_task_ends_is_not_resumed() -> None:
    """nats-py ends its reading task at a reconnect or a close (``_attempt_reconnect``,
    ``_close``), which cancelled a parse of its own that was suspended; one that
    ``read_inline`` finishes ends with it: neither it nor the bytes held behind it are
    parsed afterwards (nats-py's parser is the new connection's too by then), and no
    task is left waiting on a future that a cancelled flusher will never complete."""

    async def main() -> None:
        reader, parser = asyncio.StreamReader(), _Parser()
        reading = asyncio.create_task(reader.read(100))  # nats-py's reading task
        client = _reading(reader, parser)
        client._reading_task = reading
        assert read_inline(client)
        await asyncio.sleep(0)
        reader.feed_data(b"slow")  # suspended: waits for the gate
        reader.feed_data(b"old")  # held behind it
        await asyncio.sleep(0)
        finishing = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert reading in finishing and len(finishing) == 2
        reading.cancel()  # the reconnect
        with pytest.raises(asyncio.CancelledError):
            await reading
        for _ in range(5):
            await asyncio.sleep(0)
        assert all(task.done() for task in finishing)
        assert parser.gate is not None
        parser.gate.set_result(None)  # (what it waited for is done after all)
        for _ in range(5):
            await asyncio.sleep(0)
        assert parser.seen == []  # neither it nor what was held behind it

    asyncio.run(main())


class _Pausing(asyncio.ReadTransport):
    """A transport that only counts its pauses and resumes."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def pause_reading(self) -> None:
        self.calls.append("pause")

    def resume_reading(self) -> None:
        self.calls.append("resume")

    def is_closing(self) -> bool:
        return False


def test_bytes_held_behind_a_suspended_parse_pause_the_socket_as_a_buffer_does() -> None:
    """What comes while a parse is suspended is held; past twice the reader's limit the
    transport is paused, as ``StreamReader.feed_data`` pauses it for bytes buffered
    (memory bounded while nats-py waits), and resumed once they are parsed."""

    async def main() -> None:
        reader, parser = asyncio.StreamReader(limit=4), _Parser()
        transport = _Pausing()
        reader.set_transport(transport)
        assert read_inline(_reading(reader, parser))
        reading = asyncio.create_task(reader.read(100))
        await asyncio.sleep(0)
        reader.feed_data(b"slow")
        reader.feed_data(b"12345")
        assert transport.calls == []  # 5 bytes held: under 2 x 4
        reader.feed_data(b"6789")
        assert transport.calls == ["pause"]  # 9 bytes held
        reader.feed_data(b"0")
        assert transport.calls == ["pause"]  # (once)
        assert parser.gate is not None
        parser.gate.set_result(None)
        for _ in range(10):
            await asyncio.sleep(0)
        assert parser.seen == [b"slow", b"12345", b"6789", b"0"]
        assert transport.calls == ["pause", "resume"]
        reading.cancel()

    asyncio.run(main())


async def test_an_asyncio_side_cancelled_under_its_trio_caller_is_a_closed_connection() -> None:
    """Fiftieth pass: an asyncio side cancelled by asyncio, not by its Trio caller (nats-py
    closing the connection under a request, the node's asyncio loop ending under a call a
    task outside the cluster's block still made: a rebalance run on past the node's
    leave), reached the Trio caller as ``asyncio.CancelledError``, a BaseException no
    ``except Exception`` takes, which Trio takes for a crash: the node's process exited 1
    (seen once in ``test_a_node_that_leaves_cleanly_in_the_middle_of_its_rebalance_leaves_no_record_behind``
    on a loaded machine). It is the error a call on a closed connection raises,
    ``nats.errors.ConnectionClosedError``, for :func:`call_aio` and
    :func:`call_aio_bounded` alike; a cancel of the Trio caller is still Trio's
    ``Cancelled``. (On the code before: ``asyncio.CancelledError`` out of both calls.)"""

    async def closed_under() -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # (cancelled by asyncio, as nats-py's close or the loop's end does)
        asyncio.get_running_loop().call_soon(future.cancel)
        await future

    waiting: list[asyncio.Future[None]] = []

    async def waits() -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiting.append(future)
        await future

    async def cancelled(call: Callable[..., Awaitable[None]]) -> None:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(call, waits)
                await trio.testing.wait_all_tasks_blocked()
                scope.cancel()
        assert scope.cancelled_caught

    async with trio_asyncio.open_loop():
        for call in (call_aio, functools.partial(call_aio_bounded, 1.0)):
            with pytest.raises(nats_py.errors.ConnectionClosedError):
                await call(closed_under)
            waiting.clear()
            await cancelled(call)
            assert len(waiting) == 1
            assert waiting[0].cancelled()


async def test_a_call_on_a_closed_asyncio_loop_is_a_closed_connection_and_starts_nothing() -> None:
    """Fiftieth pass: a node's asyncio loop closes with its leave; a task outside the
    cluster's block calling on (``send_durable`` after the leave, its kernel running
    on) had trio-asyncio's ``RuntimeError: Event loop is closed``, which no caller takes
    for a transport's failure (``send_durable`` passed it on as it was). Both calls
    raise nats' ``ConnectionClosedError`` now, as a call on the closed connection does,
    before the coroutine function is called (call_aio_bounded made its coroutine first:
    never awaited). (On the code before: ``RuntimeError`` out of both.)"""
    called: list[str] = []

    async def side() -> None:
        called.append("side")

    async with trio_asyncio.open_loop() as loop:
        pass
    assert loop.is_closed()
    with on_loop(loop):
        for call in (call_aio, functools.partial(call_aio_bounded, 1.0)):
            with pytest.raises(nats_py.errors.ConnectionClosedError):
                await call(side)
    assert called == []


def test_an_unsubscribe_across_a_reconnect_is_said_again_before_it_is_forgotten(
    nats: NatsServer,
) -> None:
    """Fifty-first pass: ``unsubscribe_server_first`` sent the ``UNSUB``, and two flushes
    said the server had it, but a reconnect done in between (the ``UNSUB`` written into
    the connection that was cut, never read: emulated here, the first ``UNSUB`` not
    sent and the connection cut under it) makes the flushes' PONGs the new
    connection's: nats-py's reconnect had sent the subscription's ``SUB`` again, and the
    pull request sent before the cut was still on the server. nats-py's unsubscribe then
    forgot the subscription before its ``UNSUB`` reached the server: a message that
    request took in that round trip (stored here as the second ``UNSUB`` is about to be
    sent) was dropped by the client, delivered and held unacked (ack_wait), counted
    nowhere. The ``UNSUB`` is said again on the new connection now, flushed while the
    subscription still takes what comes: the message is in its queue, or (the server
    had the ``UNSUB``) still in the stream, undelivered. (On main's _direct.py swapped
    in: ``(0, 0, 1)``, delivered into nothing.)"""
    asyncio.run(_unsubscribe_across_a_reconnect(nats.url))


async def _unsubscribe_across_a_reconnect(url: str) -> None:
    up = asyncio.Event()

    async def reconnected() -> None:
        up.set()

    nc = await nats_py.connect(url, reconnected_cb=reconnected, reconnect_time_wait=0.05)
    other = await nats_py.connect(url)
    try:
        js, ojs = nc.jetstream(), other.jetstream()
        await js.add_stream(name="S", subjects=["d.>"], retention="workqueue")
        psub = await js.pull_subscribe("d.b.*", durable="b", stream="S")
        request = json.dumps({"batch": 1, "expires": 20_000_000_000}).encode()
        await nc.publish("$JS.API.CONSUMER.MSG.NEXT.S.b", request, psub._deliver)
        await nc.flush()
        send_unsubscribe = nc._send_unsubscribe
        calls: list[bool] = []

        async def held(sid: int, limit: int = 0) -> None:
            calls.append(sid in nc._subs)
            if len(calls) == 1:  # (written into the connection cut: the server never read it)
                nc._transport._io_writer.transport.abort()
                await up.wait()  # (nats-py sent the subscription's SUB again)
                return
            if sid not in nc._subs:  # nats-py's unsubscribe: forgotten, the UNSUB unsent
                await ojs.publish("d.b.1", b"taken in the round trip")
                while True:
                    info = await ojs.consumer_info("S", "b")
                    if info.num_ack_pending or info.num_pending:
                        break
                    await asyncio.sleep(0.01)
            await send_unsubscribe(sid, limit)

        nc._send_unsubscribe = held  # type: ignore[method-assign]
        await unsubscribe_server_first(psub, 2.0)
        await nc.flush()
        queued = take_queued(psub)
        info = await ojs.consumer_info("S", "b")
    finally:
        await nc.close()
        await other.close()
    assert calls[0] and not calls[-1]
    outcome = (len(queued), info.num_pending, info.num_ack_pending)
    assert outcome in {(1, 0, 1), (0, 1, 0)}, outcome


class _ReconnectingConn:
    """A nats-py client (fake) for ``unsubscribe_server_first``: its flushes (nats-py's
    own, the fake having no ``_send_ping``) fail at the first ``fail`` calls, a reconnect
    done meanwhile if ``reconnect``; what it was asked, in order."""

    is_closed = False
    is_reconnecting = False
    is_connected = True

    def __init__(self, fail: int, reconnect: bool) -> None:
        self.fail = fail
        self.reconnect = reconnect
        self.stats = {"reconnects": 0}
        self.said: list[str] = []

    async def _send_unsubscribe(self, sid: int, limit: int = 0) -> None:
        self.said.append(f"UNSUB {sid}")

    async def flush(self, timeout: float) -> None:
        if self.fail:
            self.fail -= 1
            self.stats["reconnects"] += self.reconnect
            self.said.append("flush failed")
            raise nats_py.errors.FlushTimeoutError
        self.said.append("flush")


def test_a_flush_failed_by_a_reconnect_is_followed_by_the_unsubscribe_said_again() -> None:
    """Fifty-first pass: a flush of ``unsubscribe_server_first`` that fails as the client
    reconnects (its PING's PONG went with the old connection) is no proof the server had
    the ``UNSUB`` either: sent again on the new connection and flushed, then forgotten;
    a flush that fails with no reconnect is given up as before (the subscription
    forgotten, the error raised), and so is a second failure after a reconnect. (On
    main's _direct.py swapped in, the first case: ``['UNSUB 7', 'flush failed',
    'forgotten', 'raised']``.)"""

    async def unsubscribe(conn: _ReconnectingConn) -> list[str]:
        forgotten = conn.said.append
        psub = SimpleNamespace(
            _sub=SimpleNamespace(_conn=conn, _id=7),
            unsubscribe=lambda: asyncio.sleep(0, forgotten("forgotten")),
        )
        try:
            await unsubscribe_server_first(psub, 0.5)
        except nats_py.errors.FlushTimeoutError:
            conn.said.append("raised")
        return conn.said

    told_again = ["UNSUB 7", "flush failed", "UNSUB 7", "flush", "flush", "forgotten"]
    assert asyncio.run(unsubscribe(_ReconnectingConn(1, reconnect=True))) == told_again
    given_up = ["UNSUB 7", "flush failed", "forgotten", "raised"]
    assert asyncio.run(unsubscribe(_ReconnectingConn(1, reconnect=False))) == given_up
    twice = ["UNSUB 7", "flush failed", "UNSUB 7", "flush failed", "forgotten", "raised"]
    assert asyncio.run(unsubscribe(_ReconnectingConn(2, reconnect=True))) == twice
