"""Bounded fan-out streams (dead letters, lifecycle events).

A :class:`Broadcast` hands every published item to each subscriber's bounded memory
channel without ever blocking the publisher. A subscriber that falls behind loses the
newest items, and the loss is counted (per subscription and in total), so memory stays
bounded whether or not anybody listens. A bounded ring of the most recent items is kept
for inspection after the fact.

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

import weakref
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Generic, TypeVar, final

import trio

T = TypeVar("T")


def _not_with(call: str) -> TypeError:
    """``with kernel.events()`` or ``await kernel.dead_letters()`` (``call``, its
    broadcast's name): what to write."""
    item = {"events()": "event", "dead_letters()": "letter"}.get(call, "item")
    return TypeError(
        f"kernel.{call} is an async context manager and an async iterator: write"
        f" 'async with kernel.{call} as stream:' and 'async for {item} in stream:' inside"
        " an 'async def', not 'with' or 'await'"
    )


@final
class Subscription(Generic[T]):
    """One subscriber's view of a :class:`Broadcast`: an async iterator of items.

    Use it as ``async with kernel.dead_letters() as stream: async for item in stream``;
    leaving the block unsubscribes. A subscription nobody refers to any more (an
    ``async for`` over ``kernel.events()`` left without ``async with``) is unsubscribed
    too: the broadcast holds its subscribers weakly. ``dropped`` counts items this
    subscriber missed because its buffer was full.
    """

    def __init__(self, owner: Broadcast[T], buffer: int) -> None:
        self._owner = owner
        self._send, self._receive = trio.open_memory_channel[T](buffer)
        self.dropped = 0
        #: the stream is finished: nothing more comes after what is buffered
        self._finished = False

    async def __aenter__(self) -> Subscription[T]:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    if not TYPE_CHECKING:  # (a type checker flags 'with' and 'await' itself)

        def __enter__(self) -> Any:
            raise _not_with(self._owner.name)

        def __exit__(self, *exc: object) -> None:
            pass  # (never reached: __enter__ raised)

        def __await__(self) -> Any:
            raise _not_with(self._owner.name)

    def close(self) -> None:
        self._owner._forget(id(self))
        self._send.close()
        self._receive.close()

    def _offer(self, item: T) -> None:
        try:
            self._send.send_nowait(item)
        except trio.WouldBlock:
            self.dropped += 1
            self._owner.dropped += 1

    def _finish(self) -> None:
        self._finished = True
        self._send.close()

    def __aiter__(self) -> Subscription[T]:
        return self

    async def __anext__(self) -> T:
        try:
            if self._finished:
                return self._rest()
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise StopAsyncIteration from None

    async def receive(self) -> T:
        """The next item; raises ``trio.EndOfChannel`` once the stream is finished.

        Once finished (the kernel stopped), what is buffered is read, then the end,
        without a checkpoint: a reader cancelled right after the stream ends (the
        ``open_kernel`` block, which a shutdown asked by an agent cancels once the
        kernel has stopped) still gets every item."""
        if self._finished:
            return self._rest()
        return await self._receive.receive()

    def _rest(self) -> T:
        """The next of what a finished stream had buffered, or ``trio.EndOfChannel``."""
        try:
            return self._receive.receive_nowait()
        except trio.WouldBlock:
            raise trio.EndOfChannel from None

    def receive_nowait(self) -> T:
        """The next item or ``trio.WouldBlock``."""
        return self._receive.receive_nowait()


@final
class Broadcast(Generic[T]):
    """Publish items to any number of bounded subscriptions without blocking."""

    def __init__(self, recent: int, name: str, keep: Callable[[T], T] | None = None) -> None:
        #: what a bad ``buffer`` is reported as (``events()``, ``dead_letters()``)
        self.name = name
        #: what the ring of recent items keeps of an item (subscribers get it as it is)
        self._keep = keep
        #: weak: a subscription dropped without close() (``async for`` over a stream left
        #: by break or cancellation, no ``async with``) must not stay subscribed, with its
        #: buffer, for the kernel's lifetime. A dict of weak references by id, not a
        #: WeakSet: ``has_subscribers`` is asked for each dead letter and event, and a
        #: WeakSet's ``len`` is Python code (a tenth of a restart's kernel work went to
        #: asking it three times)
        self._subscribers: dict[int, weakref.ref[Subscription[T]]] = {}
        self.recent: deque[T] = deque(maxlen=recent)
        self.published = 0
        self.dropped = 0
        self._finished = False

    @property
    def has_subscribers(self) -> bool:
        """Whether anybody listens (publishers skip building items nobody reads)."""
        return bool(self._subscribers)

    def subscribe(self, buffer: int) -> Subscription[T]:
        # an int, not just a number: math.inf would make the stream unbounded
        if isinstance(buffer, bool) or not isinstance(buffer, int) or buffer < 1:
            raise ValueError(f"{self.name} buffer must be an integer >= 1, got {buffer!r}")
        sub = Subscription(self, buffer)
        if self._finished:
            sub._finish()
        else:
            self._subscribers[id(sub)] = weakref.ref(sub, _forgetter(self, id(sub)))
        return sub

    def _forget(self, key: int, ref: weakref.ref[Subscription[T]] | None = None) -> None:
        """Unsubscribe the subscription of id ``key`` (closed, or, ``ref`` given, gone:
        then only if that id was not taken by a newer subscription since)."""
        if ref is None or self._subscribers.get(key) is ref:
            self._subscribers.pop(key, None)

    def _live(self) -> list[Subscription[T]]:
        """The subscriptions still there (a snapshot: offering to one may collect another)."""
        subs = (ref() for ref in list(self._subscribers.values()))
        return [sub for sub in subs if sub is not None]

    def publish(self, item: T) -> None:
        self.published += 1
        keep = self._keep
        self.recent.append(item if keep is None else keep(item))
        if self._subscribers:
            for sub in self._live():
                sub._offer(item)

    def publish_kept(self, kept: T) -> None:
        """Publish an item, while nobody subscribes, as the ring keeps it: the publisher,
        having seen ``has_subscribers`` false, built only that (a dead letter's frame-free
        copy, not the dead letter as well)."""
        self.published += 1
        self.recent.append(kept)

    def finish(self) -> None:
        """End every subscription: iterators stop after the items already buffered."""
        self._finished = True
        for sub in self._live():
            sub._finish()
        self._subscribers.clear()

    def __iter__(self) -> Iterator[T]:
        return iter(self.recent)


def _forgetter(owner: Broadcast[T], key: int) -> Callable[[weakref.ref[Subscription[T]]], None]:
    """The callback of a subscription's weak reference: unsubscribes it once it is gone.
    It holds its broadcast weakly (as a WeakSet does): no cycle through the callback."""
    owner_ref = weakref.ref(owner)

    def gone(ref: weakref.ref[Subscription[T]]) -> None:
        broadcast = owner_ref()
        if broadcast is not None:
            broadcast._forget(key, ref)

    return gone
