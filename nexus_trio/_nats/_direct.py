"""Three shortcuts through nats-py for a message between kernels, each saving a task
switch, and a look into its reconnect buffer when a node leaves with its connection down.

Under trio-asyncio every asyncio task switch is a turn of the Trio scheduler (one
callback per ``_main_loop_one``), measured at ~100 us on this 2-core machine against
~30 us in plain asyncio, and a request between two kernels paid six of them that need
no task at all:

* **taken inline** (:func:`deliver_inline`): nats-py queues each message of a
  subscription that has a callback for the subscription's own asyncio task. Our
  callbacks never suspend, so while that queue is empty nothing of it is in flight, and
  a message can be handed to a synchronous ``take`` right where nats-py parsed it, in
  order (the query on the responder, the reply on the requester).
* **written at once** (:func:`publish_at_once`): nats-py's ``publish`` appends to the
  client's buffer and wakes its flusher task, which writes on its next turn. A message
  that goes alone (a query, a reply) is written to the socket at once instead, behind
  what the buffer holds, and the flusher is not woken at all (writing at once but still
  waking it was measured slower than not writing at once: the extra turn costs the CPU
  the server and the receiver need). Only while the socket has nothing unsent: with a
  backlog the message goes through ``publish``, whose flusher waits for the socket
  (``drain``), so the backpressure stays nats-py's.

* **read inline** (:func:`read_inline`): the bytes trio-asyncio's I/O task reads from
  the data connection's socket wake nats-py's reading task, whose turn parses them.
  While that task waits for them with nothing buffered, they are parsed right where
  they were read instead, so a query reaches the responder's kernel (and a reply the
  requester's) in the step that read it: per side of a request, one scheduler round,
  one task step and one asyncio callback fewer (``benchmarks/request_trace.py``).

When a node leaves with its connection down, what nats-py still holds unwritten in its
buffer (handed to it between the disconnect and the moment the node noticed it) would
be dropped with the client: :func:`take_unsent` takes those messages out, so that the
leave counts each of them as it counts what its outbox still held.

And a flush (:func:`flush`) that times out or is cancelled does not leave the client
deaf, as nats-py's own did; and a durable fetch cancelled at a leave is ended at once
with what it took (:func:`end_fetch`), which nats-py's fetch keeps to itself; and a pull
subscription ended there keeps what the server sent it until the server had its
unsubscribe (:func:`unsubscribe_server_first`), which nats-py's unsubscribe drops (a
type's queue group ends so too).

All of them rely on nats-py internals (``Subscription._pending_queue``, ``_pending_size``,
``_conn``, ``_id``; ``PullSubscription._sub``; ``Client._send_unsubscribe``;
``Client._pending``, ``_pending_data_size``, ``_transport``, ``_max_payload``,
``stats``, ``_pongs``, ``_send_ping``, ``_reading_task``, ``_flusher_task``, ``_ps``;
``asyncio.StreamReader``'s ``_buffer``, ``_waiter``, ``_eof``, ``_exception``,
``_transport``, ``_limit``), checked
when used: with a nats-py that lacks them, messages take
the usual way (the reading task, the subscription's task, ``publish``), only later, a
leave can only log the size of the buffer, a flush is nats-py's, a cancelled fetch
runs to the end of its long poll, and an unsubscribe is nats-py's.

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Coroutine
from typing import Any, Final

import nats.errors
from nats.aio.msg import Msg
from nats.js.api import Header as JsHeader
from nats.js.api import StatusCode as JsStatus
from nats.protocol import command as _nats_command

from .._logcall import log_guarded

log = logging.getLogger("nexus_trio.nats")
#: nats-py's own encoder of a PUB command (what ``publish`` writes), typed for mypy
_pub_command: Final[Callable[[str, str, bytes], bytes]] = _nats_command.pub_cmd

#: what nats-py refuses in a subject when it publishes (CRLF would inject commands)
_BAD_SUBJECT: Final = re.compile(r"[ \t\r\n]")


def publish_at_once(nc: Any, subject: str, reply: str, payload: bytes) -> bool:
    """Write a message without headers to client ``nc``'s socket now, behind what its
    buffer holds; True if written.

    False, with nothing written or counted, when it must take the usual way
    (``nc.publish``, which also raises the errors): the client is not connected (or is
    draining or closed), the socket has unsent bytes (backpressure) or is closing, the
    payload is over the server's limit, a subject is malformed, or the client is not
    of the expected shape.
    """
    if not nc.is_connected or len(payload) > getattr(nc, "_max_payload", -1):
        return False
    writer = getattr(getattr(nc, "_transport", None), "_io_writer", None)
    pending = getattr(nc, "_pending", None)
    stats = getattr(nc, "stats", None)
    if not isinstance(writer, asyncio.StreamWriter) or not isinstance(pending, list):
        return False
    if not isinstance(stats, dict):
        return False
    socket = writer.transport
    if socket.is_closing() or socket.get_write_buffer_size():
        return False
    if not subject or _BAD_SUBJECT.search(subject) or _BAD_SUBJECT.search(reply):
        return False
    command = _pub_command(subject, reply, payload)
    try:
        if pending:
            pending.append(command)
            writer.writelines(pending)
        else:
            writer.write(command)
    except (OSError, RuntimeError):
        if pending and pending[-1] is command:
            pending.pop()
        return False
    nc._pending = []
    nc._pending_data_size = 0
    stats["out_msgs"] += 1
    stats["out_bytes"] += len(payload)
    return True


def deliver_inline(sub: Any, take: Callable[[Any], None]) -> bool:
    """Hand the messages of subscription ``sub`` to ``take`` where nats-py parses them
    (its reading task, or where the socket is read: :func:`read_inline`).

    ``sub`` must have been subscribed with a callback that only calls ``take``, and
    ``take`` must never suspend: a message that finds older ones still queued for the
    subscription's task (only those that came before this call) goes behind them, to
    that callback, so the order is kept. An exception from ``take`` is logged, never
    raised into the client's reading task (which would stop reading). Returns False,
    changing nothing, if ``sub`` does not have the expected shape.
    """
    queue = getattr(sub, "_pending_queue", None)
    if not isinstance(queue, asyncio.Queue) or not isinstance(
        getattr(sub, "_pending_size", None), int
    ):
        return False
    queue_put = queue.put_nowait

    def put_nowait(msg: Any) -> None:
        if not queue.empty():
            queue_put(msg)
            return
        # nats-py counted its bytes as waiting for the subscription's task: not any more
        sub._pending_size -= len(msg.data)
        try:
            take(msg)
        except Exception as exc:
            log_guarded(
                log,
                logging.ERROR,
                "a NATS message on %s could not be handled",
                msg.subject,
                exc_info=exc,
            )

    # an instance attribute: this one queue, which nats-py fills through put_nowait
    setattr(queue, "put_nowait", put_nowait)  # noqa: B010
    return True


#: nats-py's own default bound of a flush (``nats.aio.client.DEFAULT_FLUSH_TIMEOUT``)
FLUSH_TIMEOUT: Final = 10


async def flush(nc: Any, timeout: float = FLUSH_TIMEOUT) -> None:
    """``nc.flush(timeout)`` (a PING, then its PONG awaited), but one whose wait ends
    early leaves the client able to read.

    nats-py 2.16 keeps a future per PING in ``Client._pongs`` and sets the result of
    the first on each PONG. A flush that times out (or whose caller is cancelled)
    cancels its future and leaves it in that list: when the server answers the PING
    (it was only slow, say paused or starved, or the answer was on its way), setting
    a result on the cancelled future raises ``InvalidStateError`` in the client's
    reading task, which logs "nats: encountered error" and ends. The connection reads
    nothing more and still looks connected (no reconnect) until its own pings go stale
    (minutes by default): a node heard no heartbeat and no message. Here the future
    in the list is never cancelled: the wait is for a shield of it, and one cut short
    leaves it there to take its PONG for nobody (what other NATS clients do), so the
    later PONGs still reach their own flushes. (Replacing the cancelled future once
    the wait is over is not enough: the cancel and the end of the wait are turns of
    the loop apart, and a PONG read in between killed the reader.) With a nats-py that
    lacks ``_send_ping`` or the list, or whose loops are not running (its own flush
    then writes the buffer without a PING), this is nats-py's flush.
    """
    send_ping = getattr(nc, "_send_ping", None)
    if (
        not callable(send_ping)
        or not isinstance(getattr(nc, "_pongs", None), list)
        or timeout <= 0
        or nc.is_closed
        or not _running(getattr(nc, "_reading_task", None))
        or not _running(getattr(nc, "_flusher_task", None))
    ):
        await nc.flush(timeout)  # (its errors: BadTimeoutError, ConnectionClosedError)
        return
    pong = asyncio.get_running_loop().create_future()
    await send_ping(pong)
    try:
        await asyncio.wait_for(asyncio.shield(pong), timeout)
    except TimeoutError:
        raise nats.errors.FlushTimeoutError from None


def _running(task: Any) -> bool:
    return isinstance(task, asyncio.Future) and not task.done()


async def flush_after_subscribe(nc: Any) -> None:
    """Return once the server has every subscription client ``nc`` made so far.

    ``nc.flush()`` alone does not promise that in nats-py 2.16: it writes its PING
    straight to the socket, while the SUB of a ``subscribe`` just made may still be in the
    client's buffer for the flusher task to write, so the PONG can come back before the
    server has the subscription, and messages published to it in the meantime are dropped
    for lack of interest (seen here: the first messages of a test missing in about one
    run in 40). During the first flush's round trip the flusher writes the buffer, so
    the second PING goes out behind the SUB and its PONG is the barrier.
    """
    await flush(nc)
    await flush(nc)


#: one message as the client's buffer holds it: subject, reply subject, headers, payload
Unsent = tuple[str, str, dict[str, str] | None, bytes]


def take_unsent(nc: Any) -> list[Unsent] | None:
    """Take the messages client ``nc`` holds unwritten in its buffer out of it: they will
    never be sent (the caller accounts for them). Other commands in the buffer (a
    subscription made meanwhile) go with them. None, taking nothing, when the buffer is
    not of the expected shape or does not parse as nats-py writes it."""
    pending = getattr(nc, "_pending", None)
    if not isinstance(pending, list) or not isinstance(
        getattr(nc, "_pending_data_size", None), int
    ):
        return None
    try:
        messages = parse_commands(b"".join(pending))
    except (TypeError, ValueError):
        return None
    nc._pending = []
    nc._pending_data_size = 0
    return messages


def parse_commands(data: bytes) -> list[Unsent]:
    """The messages (``PUB``, ``HPUB``) of the protocol commands ``data``, in order; other
    commands are skipped. ValueError if a message's length runs past the end or a line is
    cut off."""
    messages: list[Unsent] = []
    offset, size = 0, len(data)
    while offset < size:
        end = data.find(b"\r\n", offset)
        if end < 0:
            raise ValueError(f"a command line at byte {offset} has no end")
        words = data[offset:end].split()
        offset = end + 2
        op = words[0].upper() if words else b""
        if op == b"PUB" and len(words) in (3, 4):
            header_size, total = 0, int(words[-1])
        elif op == b"HPUB" and len(words) in (4, 5):
            header_size, total = int(words[-2]), int(words[-1])
        else:
            continue  # SUB, UNSUB: no message
        if not 0 <= header_size <= total or data[offset + total : offset + total + 2] != b"\r\n":
            raise ValueError(f"a message at byte {offset} runs past its {total} bytes")
        body = data[offset : offset + total]
        offset += total + 2
        reply = words[2].decode() if len(words) == (5 if op == b"HPUB" else 4) else ""
        headers = _headers(body[:header_size]) if op == b"HPUB" else None
        messages.append((words[1].decode(), reply, headers, body[header_size:]))
    return messages


def _headers(block: bytes) -> dict[str, str]:
    """The ``Key: value`` lines of a NATS header block (after its ``NATS/1.0`` line)."""
    headers: dict[str, str] = {}
    for line in block.decode().split("\r\n")[1:]:
        key, colon, value = line.partition(":")
        if colon:
            headers[key.strip()] = value.strip()
    return headers


def read_inline(nc: Any) -> bool:
    """Hand what client ``nc``'s socket brings to nats-py's parser where it is read, not
    on a turn of nats-py's reading task; True if installed (or there already).

    nats-py's reading task waits in ``StreamReader.read`` for the socket's bytes, which
    the transport hands to the reader's ``feed_data`` (under trio-asyncio: in the Trio
    task that waits for the socket); that wakes the reading task, one more turn of the
    asyncio loop (a Trio task step and scheduler round) before the parser sees them.
    Here ``feed_data`` parses them at once while the reading task waits for them with
    nothing buffered (nothing is overtaken): a message of a subscription taken inline
    (:func:`deliver_inline`) reaches the kernel in the step that read it. Otherwise (the
    reading task busy, bytes buffered, the stream ended) they are buffered as before.

    A parse that suspends (nats-py's flush queue full, an error callback) is finished
    by an asyncio task, and what comes meanwhile (bytes, the end of the stream) waits
    behind it, in order, then goes the same way; past twice the reader's limit, what is
    held pauses the transport as bytes buffered in the reader do, until it is parsed.
    When nats-py ends its reading task (a reconnect, a close: it cancelled a parse of
    its own there), such a parse is cancelled with it and nothing held is parsed after.
    A parse that raises hands its error to
    the reading task (``StreamReader.set_exception``), which handles it as one of its
    own parse (a protocol error, a reconnect). nats-py makes a new reader at each
    connect: call this again after a reconnect. False, changing nothing, when ``nc``
    is not of the expected shape or no asyncio loop runs.
    """
    reader = getattr(getattr(nc, "_transport", None), "_io_reader", None)
    parse = getattr(getattr(nc, "_ps", None), "parse", None)
    if (
        not isinstance(reader, asyncio.StreamReader)
        or not callable(parse)
        or not isinstance(getattr(reader, "_buffer", None), bytearray)
        or not all(
            hasattr(reader, name)
            for name in ("_waiter", "_eof", "_exception", "_transport", "_limit")
        )
    ):
        return False
    if "feed_data" in vars(reader):
        return True  # (installed on this reader already)
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return False
    stream: Any = reader  # (its private fields, read on every read)
    feed_data, feed_eof = reader.feed_data, reader.feed_eof
    held: list[bytes | None] = []  # behind an unfinished parse, in order (None: the end)
    held_size = 0
    paused: Any = None  # the transport paused for what is held
    busy = False
    finishing: asyncio.Task[None] | None = None  # (held here: the loop keeps a weak one)
    reading: Any = None  # nats-py's reading task, whose end ends the finishing task

    def read(data: bytes) -> None:
        nonlocal busy, finishing, held_size, paused, reading
        if busy:
            held.append(data)
            held_size += len(data)
            transport = stream._transport
            if paused is None and transport is not None and held_size > 2 * stream._limit:
                try:
                    transport.pause_reading()
                except NotImplementedError:
                    pass  # (as feed_data: it cannot be paused, all is held)
                else:
                    paused = transport
            return
        waiter = stream._waiter
        if (
            waiter is None
            or waiter.done()
            or stream._buffer
            or stream._eof
            or stream._exception is not None
            or not data
        ):
            feed_data(data)
            return
        parsing = parse(data)
        try:
            waiting_on = parsing.send(None)
        except StopIteration:
            return
        except Exception as exc:
            reader.set_exception(exc)
            return
        busy = True
        finishing = loop.create_task(finish(parsing, waiting_on))
        reading = getattr(nc, "_reading_task", None)
        if isinstance(reading, asyncio.Task):
            reading.add_done_callback(cut)
        else:
            reading = None

    def cut(_: object) -> None:
        if finishing is not None:
            finishing.cancel()

    async def finish(parsing: Coroutine[Any, Any, None], waiting_on: Any) -> None:
        nonlocal busy, finishing, held_size, paused, reading
        try:
            await drive(parsing, waiting_on)
            while held:
                data = held.pop(0)
                if data is None:
                    feed_eof()
                else:
                    await parse(data)
        except Exception as exc:
            reader.set_exception(exc)
        finally:
            busy, finishing = False, None
            held.clear()
            held_size = 0
            if reading is not None:
                reading.remove_done_callback(cut)
                reading = None
            if paused is not None:
                if not paused.is_closing():
                    paused.resume_reading()
                paused = None

    def end() -> None:
        if busy:
            held.append(None)
        else:
            feed_eof()

    # instance attributes: this one reader, which the transport feeds through them
    setattr(reader, "feed_data", read)  # noqa: B010
    setattr(reader, "feed_eof", end)  # noqa: B010
    return True


async def drive(coro: Coroutine[Any, Any, None], waiting_on: Any) -> None:
    """Drive a coroutine that suspended after it was started (``waiting_on``: what its
    first ``send(None)`` gave) to its end, the way an asyncio task would: resume it (with
    None) each time what it waits on is done; cancelled, it is closed. What it raises
    is raised here."""
    try:
        while True:
            if isinstance(waiting_on, asyncio.Future):
                await asyncio.wait([waiting_on])
            else:
                await asyncio.sleep(0)  # a bare yield
            try:
                waiting_on = coro.send(None)
            except StopIteration:
                return
    except asyncio.CancelledError:
        coro.close()
        raise


#: the subject of the marker :func:`end_fetch` puts in a fetch's queue (no message of
#: JetStream's has it: theirs are the stream's subjects)
_END_SUBJECT: Final = "_nexus.fetch.ended"
_ENDED: Final = "Request Timeout (ended by the leave)"


def end_fetch(psub: Any) -> bool:
    """End the nats-py fetch under way on the pull subscription ``psub`` now, with what
    it took so far, where a cancel dropped it: a marker message (see :func:`fetched`)
    then JetStream's end of a pull request (a ``408 Request Timeout`` status) are put
    in the subscription's queue. Wherever the fetch waits, it takes the marker as a
    message and returns at the status (or at once, for a fetch of one, or one whose
    batch the marker fills), never asking JetStream again: a status alone, read before
    any message, made it send its long poll's request, which took the next message
    stored into an inbox the leave then left. What the fetch does not read stays
    queued: for a subscription that fetches no more (a leave's). False, changing
    nothing, if ``psub`` does not have the expected shape (the fetch then ends at the
    end of its long poll). Asyncio side."""
    sub = getattr(psub, "_sub", None)
    queue = getattr(sub, "_pending_queue", None)
    conn = getattr(sub, "_conn", None)
    if not isinstance(queue, asyncio.Queue) or conn is None:
        return False
    queue.put_nowait(Msg(_client=conn, subject=_END_SUBJECT))
    queue.put_nowait(
        Msg(
            _client=conn,
            subject=_END_SUBJECT,
            headers={
                JsHeader.STATUS.value: JsStatus.REQUEST_TIMEOUT.value,
                JsHeader.DESCRIPTION.value: _ENDED,
            },
        )
    )
    return True


def fetched(msgs: list[Any]) -> list[Any]:
    """The messages of a fetch ended by :func:`end_fetch`, its marker left out."""
    return [msg for msg in msgs if msg.subject != _END_SUBJECT]


def take_queued(psub: Any) -> list[Any]:
    """Take the messages still queued in the pull subscription ``psub`` (unsubscribed:
    nothing reads it any more), its statuses and :func:`end_fetch`'s marker left out:
    what a pull request that outlived its fetch took after the fetch ended (JetStream
    holds each for the consumer until it is acked or nakked, or ``ack_wait`` ends).
    Empty if ``psub`` does not have the expected shape. Asyncio side."""
    sub = getattr(psub, "_sub", None)
    queue = getattr(sub, "_pending_queue", None)
    if not isinstance(queue, asyncio.Queue):
        return []
    took = []
    while not queue.empty():
        msg = queue.get_nowait()
        if msg.subject != _END_SUBJECT and not (msg.headers or {}).get(JsHeader.STATUS.value):
            took.append(msg)
    return took


async def unsubscribe_server_first(psub: Any, timeout: float) -> None:
    """Unsubscribe the pull subscription ``psub`` (or a core subscription, such as a
    type's queue group's) the server first: its ``UNSUB`` is
    sent while the subscription still takes what comes into its queue, until two
    flushes' round trips (bounded by ``timeout`` each; the first PING can overtake the
    ``UNSUB`` still in the client's buffer, see :func:`flush_after_subscribe`) say the
    server had it; then it is forgotten here (nats-py's unsubscribe, whose second
    ``UNSUB`` the server ignores), also when a flush fails. What the server delivered
    to it before it had the ``UNSUB`` is in its queue then, for :func:`take_queued`.
    nats-py's unsubscribe forgets the subscription before the ``UNSUB`` is even
    written: a message the server delivered in that round trip (a pull request's) was
    dropped by the client, and waited out ``ack_wait`` in JetStream. (nats-py's drain
    sends first too, but then waits for the queue to be read, which a pull
    subscription's is not.) A core subscription's callback takes what comes meanwhile,
    as before its unsubscribe (a queue group's member: the server would have given it
    to another member had it had the ``UNSUB``; nats-py's unsubscribe dropped it,
    counted nowhere). nats-py's unsubscribe alone while the client reconnects
    (nothing is sent then: the server dropped the subscription with the old
    connection, and nats-py, which forgets it, sends no ``SUB`` of it again), or with a
    ``psub`` not of the expected shape.

    A reconnect done between the ``UNSUB`` and the flushes' end (nats-py's
    ``stats["reconnects"]``) proves nothing of the ``UNSUB``: written into the
    connection that was cut, the server may never have read it, and nats-py's reconnect
    sent the subscription's ``SUB`` again (it was still subscribed here), and a pull
    request of it survives its client's reconnect on the server (measured, nats-server
    2.x: a request sent before the connection was cut delivered into the replayed
    subscription after it). The ``UNSUB`` is sent again then on the new connection, and
    flushed, before the subscription is forgotten (once: a second reconnect inside the
    same wait forgets it as before). Before the fifty-first pass, what that request
    delivered after nats-py's unsubscribe forgot it, one round trip, was dropped by the
    client and waited out ``ack_wait``. Asyncio side."""
    sub = getattr(psub, "_sub", psub)  # (a pull subscription's core one, or ``psub``)
    conn = getattr(sub, "_conn", None)
    sid = getattr(sub, "_id", None)
    send = getattr(conn, "_send_unsubscribe", None)
    if (
        conn is None
        or not callable(send)
        or not isinstance(sid, int)
        or conn.is_closed
        or conn.is_reconnecting
    ):
        await psub.unsubscribe()
        return
    try:
        for told_again in (False, True):
            reconnects = _reconnects(conn)
            await send(sid)
            try:
                await flush(conn, timeout)
                await flush(conn, timeout)
            except nats.errors.Error:
                if told_again or not _reconnected_since(conn, reconnects):
                    raise
                continue
            if told_again or not _reconnected_since(conn, reconnects):
                break
    finally:
        await psub.unsubscribe()


def _reconnects(conn: Any) -> object:
    """How many times nats-py's client ``conn`` reconnected (None: it does not say)."""
    stats = getattr(conn, "stats", None)
    return stats.get("reconnects") if isinstance(stats, dict) else None


def _reconnected_since(conn: Any, reconnects: object) -> bool:
    """``conn`` reconnected since it said ``reconnects`` and is connected now."""
    return reconnects is not None and _reconnects(conn) != reconnects and bool(conn.is_connected)
