"""The bounded mailbox of one agent.

A mailbox is a FIFO with a fixed capacity, one consumer (the agent) and any number of
producers. Putting into a mailbox with room never yields (the fast path); a producer
that must wait for room parks in FIFO order and is woken as the agent takes messages
out. The consumer parks when the mailbox is empty and is rescheduled by the next put.
The mailbox belongs to the agent's *address*, not to one run of its task: a restarted
agent finds the messages that were queued for it.

It is built on ``trio.lowlevel`` primitives (a deque, a parking lot, task
rescheduling) rather than a memory channel because the kernel needs what a channel
does not offer: evicting the oldest message, taking everything out at shutdown, and
reading the depth without a statistics object per call.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Final, final

import attrs
import trio

from ._message import Message

_WOKEN: Final = object()


@final
@attrs.frozen
class MailboxStatistics:
    """A snapshot of one mailbox."""

    depth: int
    capacity: int
    high_water: int
    producers_waiting: int


@final
class _Activation:
    """Stands in for the consumer task of an agent that has not started yet."""

    __slots__ = ("activate",)

    def __init__(self, activate: Callable[[], None]) -> None:
        self.activate = activate


@final
class Mailbox:
    """A bounded FIFO of messages with one consuming task."""

    __slots__ = (
        "_blocked",
        "_consumer",
        "_reserved",
        "_waiting",
        "capacity",
        "closed",
        "high_water",
        "queue",
    )

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"mailbox capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.queue: deque[Message] = deque()
        self.high_water = 0
        self._consumer: trio.lowlevel.Task | _Activation | None = None
        # Created when a producer first has to wait: most mailboxes never need one.
        self._blocked: trio.lowlevel.ParkingLot | None = None
        # Slots freed by the consumer and promised to a woken producer that has not run
        # yet: counting them keeps newcomers from overtaking producers that waited.
        self._reserved = 0
        # Producers parked for room, as a plain int: ParkingLot.__bool__ is a Python-level
        # call and this is checked on every put and take.
        self._waiting = 0
        self.closed = False

    def __len__(self) -> int:
        return len(self.queue)

    def statistics(self) -> MailboxStatistics:
        return MailboxStatistics(
            depth=len(self.queue),
            capacity=self.capacity,
            high_water=self.high_water,
            producers_waiting=self._waiting,
        )

    def has_room(self) -> bool:
        """Whether :meth:`try_put` would enqueue now."""
        return not self._waiting and len(self.queue) + self._reserved < self.capacity

    def try_put(self, msg: Message) -> bool:
        """Enqueue without yielding if there is room and nobody is queued for room.

        Returns False when full (or when earlier producers are still waiting, so that a
        newcomer cannot overtake them).
        """
        queue = self.queue
        if self._waiting or len(queue) + self._reserved >= self.capacity:
            return False
        queue.append(msg)
        depth = len(queue)
        if depth > self.high_water:
            self.high_water = depth
        if self._consumer is not None:
            self._wake_consumer()
        return True

    def force_put(self, msg: Message) -> None:
        """Enqueue ignoring the capacity (used right after an eviction)."""
        self.queue.append(msg)
        depth = len(self.queue)
        if depth > self.high_water:
            self.high_water = depth
        if self._consumer is not None:
            self._wake_consumer()

    async def put_waiting(self, msg: Message) -> None:
        """Wait for room (in FIFO order among waiting producers), then enqueue.

        Does not yield if there is room. Cancellation while waiting (e.g. the send
        deadline) leaves the message *not* enqueued.
        """
        queue = self.queue
        if self._waiting or len(queue) + self._reserved >= self.capacity:
            # Woken by take()/take_all(), which reserve a slot for us first, or by close().
            if self._blocked is None:
                self._blocked = trio.lowlevel.ParkingLot()
            self._waiting += 1
            try:
                await self._blocked.park()
            finally:
                self._waiting -= 1
            if self.closed:
                raise trio.ClosedResourceError("the agent of this mailbox has stopped")
            self._reserved -= 1
        queue.append(msg)
        depth = len(queue)
        if depth > self.high_water:
            self.high_water = depth
        if self._consumer is not None:
            self._wake_consumer()

    def remove(self, msg: Message) -> bool:
        """Take one specific queued message out (rare path: O(depth))."""
        for index, queued in enumerate(self.queue):
            if queued is msg:
                del self.queue[index]
                if self._waiting and len(self.queue) + self._reserved < self.capacity:
                    assert self._blocked is not None
                    self._reserved += len(self._blocked.unpark())
                return True
        return False

    def evict_oldest(self) -> Message:
        return self.queue.popleft()

    def take(self) -> Message:
        """Remove the oldest message (the caller checked the mailbox is not empty)."""
        msg = self.queue.popleft()
        if self._waiting:
            self.room_freed()
        return msg

    def room_freed(self) -> None:
        """A message was taken out: hand the slot to the longest-waiting producer."""
        if len(self.queue) + self._reserved < self.capacity:
            # _waiting still counts producers woken but not yet run: unpark may find none.
            assert self._blocked is not None
            self._reserved += len(self._blocked.unpark())

    def take_all(self) -> list[Message]:
        """Remove every queued message, oldest first; waiting producers get room."""
        items = list(self.queue)
        self.queue.clear()
        room = self.capacity - self._reserved
        if self._waiting and room > 0:
            assert self._blocked is not None
            woken = self._blocked.unpark(count=room)
            self._reserved += len(woken)
        return items

    def close(self) -> None:
        """The agent is gone for good: producers waiting for room get ``ClosedResourceError``."""
        self.closed = True
        self._reserved = 0
        if self._blocked is not None:
            self._blocked.unpark_all()

    async def wait_nonempty(self) -> None:
        """Park the consumer until a message arrives or :meth:`wake_consumer` is called.

        Always a schedule point; raises ``trio.Cancelled`` if cancelled while parked.
        """
        if self.queue:
            await trio.lowlevel.checkpoint()
            return
        self._consumer = trio.lowlevel.current_task()

        def abort(_: object) -> trio.lowlevel.Abort:
            self._consumer = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def wake_consumer(self) -> None:
        """Wake a parked consumer even if nothing arrived (e.g. to make it stop)."""
        if self._consumer is not None:
            self._wake_consumer()

    def _wake_consumer(self) -> None:
        consumer = self._consumer
        self._consumer = None
        if isinstance(consumer, _Activation):
            consumer.activate()
        else:
            assert consumer is not None
            trio.lowlevel.reschedule(consumer)

    def activate_on_put(self, activate: Callable[[], None]) -> None:
        """Call ``activate`` when the next message arrives (the agent has no task yet)."""
        self._consumer = _Activation(activate)

    def cancel_activation(self) -> None:
        if isinstance(self._consumer, _Activation):
            self._consumer = None
