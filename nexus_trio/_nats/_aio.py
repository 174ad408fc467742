"""The asyncio/Trio boundary: nats-py runs on asyncio, driven from Trio by trio-asyncio.

trio-asyncio runs an asyncio event loop as a Trio task of the same thread, so plain
(non-blocking) calls may cross freely: an asyncio callback may set a Trio event, and a
Trio task may set an asyncio event. What costs is a *scheduled* crossing — each await of
an asyncio coroutine from Trio (``aio_as_trio``) goes through both schedulers, which
measured ~4k msg/s when done per message. So the data path never schedules a crossing
per message:

* asyncio -> Trio: a subscription callback delivers into the kernel with non-blocking
  calls directly (see ``Cluster._on_node_message``); only what must wait goes to an
  :class:`Inbox`, whose callbacks append to a deque and wake one Trio pump task only
  when it sleeps; the pump then takes everything queued at once.
* :class:`Outbox` (Trio -> asyncio): the transport appends without awaiting; one
  asyncio task wakes per batch and hands the whole batch to nats-py.

Control operations (connect, KV puts, stream setup) are rare and use :func:`call_aio`.

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from contextvars import ContextVar
from typing import Any, Final, Generic, TypeVar, final

import nats.errors
import trio
import trio_asyncio  # type: ignore[import-untyped, import-not-found, unused-ignore]

from .._logcall import log_guarded
from .._throttle import Throttle
from ._direct import drive
from ._held import HeldLines

T = TypeVar("T")

log = logging.getLogger("nexus_trio.nats")


#: asyncio's own line for a write to a socket transport whose connection was lost: the
#: write is dropped, silently for the first few (``LOG_THRESHOLD_FOR_CONNLOST_WRITES``,
#: 5), then with this line each (``selector_events._SelectorSocketTransport.write``)
CLOSED_SOCKET_WRITE_LINE: Final = "socket.send() raised exception."

#: who counts asyncio's closed-socket lines in this context (see :func:`closed_writes_counted`)
_CLOSED_WRITES: ContextVar[Callable[[], None] | None] = ContextVar(
    "nexus_closed_socket_writes", default=None
)


class _ClosedSocketWrites(logging.Filter):
    """On the ``asyncio`` logger: asyncio's :data:`CLOSED_SOCKET_WRITE_LINE` logged in
    the context of a NATS connection of a node goes to that node's count instead of
    stderr (unlabelled, through Python's last-resort handler); any other record, and
    that line anywhere else, passes as it came."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != CLOSED_SOCKET_WRITE_LINE:
            return True
        note = _CLOSED_WRITES.get()
        if note is None:
            return True
        note()
        return False


_CLOSED_SOCKET_FILTER: Final = _ClosedSocketWrites()


@contextmanager
def closed_writes_counted(note: Callable[[], None]) -> Iterator[None]:
    """Within it (and in every asyncio task started within it, which copies the context:
    nats-py's reader, flusher and reconnect tasks of a connection opened here), each
    :data:`CLOSED_SOCKET_WRITE_LINE` of asyncio calls ``note()`` and is not printed.

    nats-py's flusher writes what is pending to the socket transport; once the
    connection is lost, and before nats-py's reader has seen it and reconnects, asyncio
    drops those writes, the sixth and later each with that line. What they held is lost
    as a cut socket loses it: tells, which their receivers count lost in transit at the
    sender's next sequence mark (see ``Cluster._sequence``), and pings and flushes,
    which nats-py's reconnect replaces. So the lines are harmless to the books, and say
    nothing a node's own warnings do not (the connection lost, then back)."""
    asyncio_log = logging.getLogger("asyncio")
    if _CLOSED_SOCKET_FILTER not in asyncio_log.filters:
        asyncio_log.addFilter(_CLOSED_SOCKET_FILTER)
    token = _CLOSED_WRITES.set(note)
    try:
        yield
    finally:
        _CLOSED_WRITES.reset(token)


async def call_aio(fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
    """Await an asyncio coroutine function from Trio (one scheduled crossing each way).

    Cancelling the Trio caller cancels the asyncio side. An asyncio side cancelled by
    asyncio instead (see :func:`_closed_under`) raises ``ConnectionClosedError``, as a
    call on a loop that is closed already does (see :func:`_check_open`).
    """
    _check_open(fn)
    try:
        result: T = await trio_asyncio.aio_as_trio(fn)(*args, **kwargs)
    except asyncio.CancelledError:
        raise _closed_under(fn) from None
    return result


def _check_open(fn: Callable[..., Any]) -> None:
    """Raise ``ConnectionClosedError`` for a call on a node's asyncio loop that is
    closed: its node left the cluster, and a task outside the cluster's block calls on
    (a durable send, a placement). trio-asyncio raised ``RuntimeError: Event loop is
    closed``, which said nothing of the node's connection and no caller takes for a
    transport's failure; a closed loop is a closed connection (its connections closed
    with it)."""
    loop = trio_asyncio.current_loop.get()
    if loop is not None and loop.is_closed():
        log.debug("%s called on a closed asyncio loop: taken as a closed connection", fn)
        raise nats.errors.ConnectionClosedError()


def _closed_under(fn: Callable[..., Any]) -> nats.errors.ConnectionClosedError:
    """The error of a call whose asyncio side asyncio cancelled, not its Trio caller
    (whose cancel reaches it as Trio's ``Cancelled``): nats-py closing the connection
    under a request, or the node's asyncio loop ending under a call a task outside the
    cluster's block still made. Let through, ``asyncio.CancelledError`` is a
    BaseException no ``except Exception`` takes, and Trio takes it for a crash of the
    caller's task; it is what a call on the closed connection raises instead."""
    log.debug("asyncio cancelled %s under its Trio caller: taken as a closed connection", fn)
    return nats.errors.ConnectionClosedError()


async def call_aio_bounded(
    cancel_wait: float,
    fn: Callable[..., Coroutine[Any, Any, T]],
    *args: Any,
    dropped: Callable[[T], None] | None = None,
    **kwargs: Any,
) -> T:
    """:func:`call_aio`, but a cancel of the Trio caller waits at most ``cancel_wait``
    seconds for the asyncio side to end once cancelled (call_aio waits for it as long as
    it takes): past it, the caller is cancelled all the same and the asyncio task left
    to the loop (its shutdown cancels it again). For a call whose asyncio side may
    outlive its cancel, which would hold the caller's nursery (a durable fetch).

    ``dropped``: given the result of an asyncio side that returned although the caller
    is cancelled (the cancel landed after it ended, before its end reached the caller,
    or it did not heed its own cancel): the caller raises ``Cancelled``, so the result
    would be lost (a fetch's messages: each would wait out its ``ack_wait``)."""
    _check_open(fn)
    task = trio_asyncio.current_loop.get().create_task(fn(*args, **kwargs))
    done = trio.Event()

    def ended(_: Any) -> None:
        if not task.cancelled():
            task.exception()  # (retrieved: a task abandoned here logs no "never retrieved")
        done.set()

    task.add_done_callback(ended)
    try:
        await done.wait()
    except trio.Cancelled:
        task.cancel()
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + cancel_wait
            await done.wait()
        if dropped is not None and task.done() and not task.cancelled() and not task.exception():
            dropped(task.result())
        raise
    if task.cancelled():
        raise _closed_under(fn)
    result: T = task.result()
    return result


def current_aio_loop() -> Any:
    """The asyncio loop of the calling Trio task (None outside :func:`asyncio_loop`)."""
    return trio_asyncio.current_loop.get()


@contextmanager
def on_loop(loop: Any) -> Iterator[None]:
    """Make ``loop`` the calling Trio task's asyncio loop for the block.

    A task started outside the block of :func:`asyncio_loop` (a producer started before
    the kernel joined the cluster) has no loop in its context, or another node's: there
    :func:`call_aio` raised AttributeError, or ran the node's coroutine on the other
    loop. The node's public entry points that await asyncio (a KV lookup of a name, a
    placement) run under this, on their own node's loop, whichever task calls them.
    """
    if trio_asyncio.current_loop.get() is loop:
        yield
        return
    token = trio_asyncio.current_loop.set(loop)
    try:
        yield
    finally:
        trio_asyncio.current_loop.reset(token)


@asynccontextmanager
async def asyncio_loop() -> AsyncIterator[None]:
    """Run an asyncio event loop on top of Trio for the duration of the block.

    The loop's exception handler is :func:`_on_loop_error`: trio-asyncio's default
    raises every error it is handed into the loop's nursery, which ends the block (the
    node); a write to a socket the transport already lost is no such error (see there).
    """
    async with trio_asyncio.open_loop() as loop:
        loop.set_exception_handler(_on_loop_error)
        yield


def _is_lost_socket_write(context: dict[str, Any]) -> bool:
    """True if an asyncio loop's error ``context`` is a wait for a socket, on behalf of a
    transport already closing, that failed with EBADF: the socket was closed under it.

    The path (Python 3.12, whose socket transport has its own ``writelines``; 3.13.0 has the same code):
    nats-py's flusher calls ``writelines`` on a transport that has lost its connection
    but not yet closed its socket; unlike ``write``, it does not check for the lost
    connection and registers a writer for the socket; the transport then closes the
    socket without removing that writer, and trio-asyncio's wait for it fails with
    EBADF. The bytes were the lost connection's (``write`` drops them silently there,
    and on 3.11, whose ``writelines`` is a loop of ``write``); nats-py reconnects.
    """
    exc = context.get("exception")
    if not isinstance(exc, OSError) or exc.errno != errno.EBADF:
        return False
    # (asyncio's Handle has no public accessor for its callback)
    callback = getattr(context.get("handle"), "_callback", None)
    transport = getattr(callback, "__self__", None)
    return isinstance(transport, asyncio.BaseTransport) and transport.is_closing()


def _on_loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The node's asyncio loop's exception handler: a write to a lost socket (see
    :func:`_is_lost_socket_write`) is the NATS client's reconnect business, logged at debug;
    anything else goes to the loop's default handler (trio-asyncio's raises it in the
    loop's nursery, which ends the join with it as its cause)."""
    if _is_lost_socket_write(context):
        log.debug(
            "a write to a NATS socket already lost failed (%r); the client reconnects",
            context["exception"],
        )
        return
    loop.default_exception_handler(context)


@final
class Inbox(Generic[T]):
    """Items from asyncio callbacks to one Trio consumer, crossing once per batch.

    :meth:`push` never blocks (it is called from asyncio callbacks); it refuses items
    past ``limit`` so that a Trio side which cannot keep up sheds load visibly (the
    caller counts the refusal) instead of growing without bound — the same rule as
    nats-py's slow-consumer limit, one hop later.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._items: deque[T] = deque()
        self._wakeup: trio.Event | None = None
        self._closed = False
        #: wake-ups of the Trio side (one per batch): items / wakeups is the batch size
        self.wakeups = 0

    def push(self, item: T) -> bool:
        """Queue ``item``; False if the inbox is full or closed (the item was not taken)."""
        if self._closed or len(self._items) >= self.limit:
            return False
        self._items.append(item)
        wakeup = self._wakeup
        if wakeup is not None:
            self._wakeup = None
            self.wakeups += 1
            wakeup.set()
        return True

    async def take_batch(self) -> deque[T]:
        """Wait for at least one item and take every item queued so far.

        Raises ``trio.EndOfChannel`` once closed and empty.
        """
        while not self._items:
            if self._closed:
                raise trio.EndOfChannel
            self._wakeup = trio.Event()
            await self._wakeup.wait()
        return self.take_nowait()

    def take_nowait(self) -> deque[T]:
        """Take every item queued now, without waiting (e.g. what is left once closed)."""
        batch, self._items = self._items, deque()
        return batch

    def close(self) -> None:
        self._closed = True
        if self._wakeup is not None:
            self._wakeup.set()
            self._wakeup = None

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called (:meth:`push` refuses every item then)."""
        return self._closed

    def __len__(self) -> int:
        return len(self._items)


@final
class Outbox(Generic[T]):
    """Items from Trio to one asyncio task, crossing once per batch.

    :meth:`put` never awaits. Give one of ``send_batch`` and ``send_one``.
    ``send_batch`` (an asyncio coroutine function) gets every item queued since the last
    batch, in order. :meth:`wait_below` lets a Trio producer
    wait while the backlog is above a mark (backpressure toward the Trio side).

    With ``send_one`` (an asyncio coroutine function that normally completes without
    suspending, like nats-py's ``publish``, which only appends to the client's buffer),
    an item put while nothing is queued is sent at once, in the caller's task: no hop
    to another task at all (when the caller runs inside the loop's block; one started
    before it, without the loop, queues its item for the asyncio task). Should that coroutine suspend after all (the client's
    buffer is full), an asyncio task finishes it, and items put meanwhile queue behind
    it, in order. The asyncio task then sends item by item with ``send_one`` too. An
    item whose coroutine raises *before its first suspension* was refused (nats-py
    checks everything before it buffers the bytes): it goes to ``on_refused(item,
    exc)``, one call per item, so that nothing refused is lost uncounted. A failure
    after the first suspension comes after the bytes were buffered: it is only logged.

    :meth:`pause` holds every item here (e.g. while the connection is down, so that an
    outage fills this bounded queue, on whose high-water mark senders wait, instead of
    the client's reconnect buffer); :meth:`resume` sends them on, in order.

    A failed send is counted (``failed_batches``) and logged at once, then at most once
    a second with the count so far; those after the last line are held in ``held`` (the
    node's :class:`HeldLines`, said at its leave) as ``what``, ``counted`` naming the
    counter they are in.
    """

    def __init__(
        self,
        send_batch: Callable[[list[T]], Awaitable[None]] | None = None,
        send_one: Callable[[T], Coroutine[Any, Any, None]] | None = None,
        on_refused: Callable[[T, Exception], None] | None = None,
        *,
        held: HeldLines | None = None,
        what: str = "failed sends to NATS",
        counted: str = "",
    ) -> None:
        if (send_batch is None) == (send_one is None):
            raise TypeError("Outbox needs one of send_batch and send_one")
        self._send_batch = send_batch
        self._send_one = send_one
        self._on_refused = on_refused
        self._items: list[T] = []
        #: the items waiting, the same list for the outbox's life: ``len(outbox.queued)``
        #: is :meth:`__len__` without a Python call (a sender checks it on every tell).
        #: Read it, never change it.
        self.queued: Sequence[T] = self._items
        self._ready: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # the task driving an item whose publish suspended (put()'s, or the asyncio
        # task's own, in a batch): items put meanwhile queue behind it
        self._unfinished: asyncio.Task[None] | None = None
        self._drained = trio.Event()
        self._closed = False
        self._paused = False
        self.batches = 0
        self.failed_batches = 0
        #: items refused by ``send_one`` (each also went to ``on_refused``)
        self.refused = 0
        self.dropped = 0
        #: items sent at once by :meth:`put` (not through the asyncio task)
        self.direct = 0
        self._failure_log = Throttle(kind="nats.publish_failure")
        # the failures after the last line logged, said at the node's leave (``what``
        # they are, and ``counted``: the ClusterStats field counting them)
        self._held = HeldLines() if held is None else held
        self._what = what
        self._counted = counted

    async def start(self) -> None:
        """Start the asyncio task (call from Trio inside :func:`asyncio_loop`)."""

        async def create() -> None:
            self._ready = asyncio.Event()
            self._loop = asyncio.get_running_loop()
            self._task = self._loop.create_task(self._run())

        await call_aio(create)

    def put(self, item: T) -> bool:
        """Send or queue ``item``; False (not taken, counted in ``dropped``) once closed."""
        if self._closed:
            self.dropped += 1
            return False
        if (
            self._send_one is not None
            and not self._items
            and self._unfinished is None
            and self._loop is not None
            and not self._paused
            # a Trio task started outside the loop's block (e.g. the kernel's root
            # supervisor, dead-lettering a remote query as it stops an agent) has no
            # asyncio loop to run the coroutine in: its item goes through the task
            and trio_asyncio.current_loop.get() is self._loop
        ):
            self.direct += 1
            started = self._start_one(item)
            if started is not None:
                self._unfinished = self._loop.create_task(self._finish(*started))
                if self._ready is not None:
                    self._ready.set()
            return True
        self._items.append(item)
        if len(self._items) == 1 and self._ready is not None:
            self._ready.set()
        return True

    def pause(self) -> None:
        """Hold items here until :meth:`resume` (see the class doc)."""
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        if self._items and self._ready is not None:
            self._ready.set()

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called (:meth:`put` refuses every item then)."""
        return self._closed

    def discard(self) -> list[T]:
        """Take every queued item out (they will not be sent); the caller accounts for them."""
        items = self._items[:]
        self._items.clear()
        self._drained.set()
        return items

    def _start_one(self, item: T) -> tuple[Coroutine[Any, Any, None], Any] | None:
        """Run ``send_one(item)`` up to its first suspension: None if it finished (or was
        refused: reported), else the coroutine and what it waits on."""
        assert self._send_one is not None
        coro = self._send_one(item)
        try:
            waiting_on = coro.send(None)
        except StopIteration:
            return None
        except Exception as exc:
            self.refused += 1
            if self._on_refused is not None:
                self._on_refused(item, exc)
            self._failed(exc)
            return None
        return coro, waiting_on

    async def _finish(self, coro: Coroutine[Any, Any, None], waiting_on: Any) -> None:
        try:
            await self._drive(coro, waiting_on)
        finally:
            self._unfinished = None

    async def _drive(self, coro: Coroutine[Any, Any, None], waiting_on: Any) -> None:
        """Drive a send that suspended after it was started to its end (see
        :func:`drive`); its failure is counted."""
        try:
            await drive(coro, waiting_on)
        except Exception as exc:
            self._failed(exc)

    def _failed(self, exc: Exception) -> None:
        """Count a failed send; log it, at most once a second (an outage fails them all):
        those after the last line are held (see ``held``), said at the node's leave."""
        self.failed_batches += 1
        if self._held.due(self._failure_log, self._what, counted=self._counted):
            log_guarded(
                log,
                logging.WARNING,
                "sending to NATS failed (%d so far): %r",
                self.failed_batches,
                exc,
            )

    def __len__(self) -> int:
        return len(self._items)

    async def wait_below(self, mark: int) -> None:
        """Return once fewer than ``mark`` items wait (checkpoints either way)."""
        while len(self._items) >= mark:
            self._drained = trio.Event()
            await self._drained.wait()
        await trio.lowlevel.checkpoint()

    async def _run(self) -> None:
        assert self._ready is not None
        while True:
            await self._ready.wait()
            self._ready.clear()
            await self._flush()
            self._drained.set()
            if self._closed:
                return  # (close() woke it: everything it could send is sent)

    async def _flush(self) -> None:
        """Send every item queued (unless paused), in order, batch by batch."""
        if self._unfinished is not None:
            await asyncio.wait([self._unfinished])  # keep the order
        while self._items and not self._paused:
            batch = self._items[:]
            self._items.clear()  # (the same list: see queued)
            self.batches += 1
            if self._send_batch is None:
                await self._send_items(batch)
                continue
            try:
                await self._send_batch(batch)
            except asyncio.CancelledError:
                # close() cut by its caller's bound: which of the batch went, only the
                # sender knows (the durable channel counts the rest unsettled)
                self._failed(ConnectionAbortedError(f"close() cut a batch of {len(batch)}"))
                raise
            except Exception as exc:
                self._failed(exc)

    async def _send_items(self, batch: list[T]) -> None:
        """Send ``batch`` item by item; if paused midway, or cancelled (close() cut by its
        bound) while an item's publish is suspended, put the rest back in front: the
        suspended item was buffered already, the rest stays for :meth:`discard`."""
        for index, item in enumerate(batch):
            if self._paused:
                self._items[:0] = batch[index:]
                return
            started = self._start_one(item)
            if started is not None:
                # while it waits, put() queues behind the rest of the batch (it sent
                # at once, ahead of it, with the queue empty)
                self._unfinished = self._task
                try:
                    await self._drive(*started)
                except asyncio.CancelledError:
                    self._items[:0] = batch[index + 1 :]
                    raise
                finally:
                    self._unfinished = None

    async def close(self) -> None:
        """Refuse items from now on, let the asyncio task send what it took and what is
        queued (unless paused), in order, then stop it.

        The caller's cancel scope bounds this: what it cuts is not sent and not lost
        either. Items not handed to the client stay queued, in order, for
        :meth:`discard` (the caller accounts for them, as for those held while paused);
        a ``send_batch`` batch cut midway is counted in ``failed_batches`` (its sender
        knows which of its items went)."""
        self._closed = True

        async def finish() -> None:
            task = self._task
            if task is None or task.done():
                await self._flush()  # (never started: sent from here)
                return
            assert self._ready is not None
            self._ready.set()
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                # cut: stop the task where it is (it puts back what it did not send)
                task.cancel()
                with suppress(asyncio.CancelledError):
                    await task
                raise

        try:
            await call_aio(finish)
        finally:
            self._drained.set()
