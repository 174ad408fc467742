"""The bounded mailbox of one agent: a ``trio.open_memory_channel(capacity)`` pair.

The mailbox belongs to the agent's *address*, not to one run of its task: a restarted
agent finds the messages that were queued for it. Trio gives the guarantees: a put
with room never yields (``send_nowait``); a producer that must wait for room parks in
Trio's FIFO of blocked senders, and cancelling it (the send deadline) leaves nothing
enqueued. Because the kernel owns the receive end it can do what a plain channel user
cannot: evict the oldest message (``receive_nowait``), take everything out at stop or
shutdown (a ``receive_nowait`` loop, which also admits the blocked senders in their
order) and keep the depth as a counter of its own, read in O(1).

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, final

import attrs
import trio

from ._message import Message


@final
@attrs.frozen
class MailboxStatistics:
    """A snapshot of one mailbox (``Kernel.mailbox_statistics(ref)``)."""

    #: messages queued now
    depth: int
    capacity: int
    #: the largest depth seen
    high_water: int
    #: producers waiting for room (``block`` policy)
    producers_waiting: int


@final
class HighWater:
    """The largest depth any mailbox of a kernel has reached (shared by its mailboxes)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0


@final
class Mailbox:
    """One agent's bounded FIFO: a memory channel whose receive end the kernel owns.

    ``depth`` counts messages in the channel's buffer. A producer blocked in
    :meth:`put_waiting` is counted once Trio moves its message into the buffer, which
    happens when the consumer takes one out (:meth:`take`): the consumer bumps the count
    for it, so the depth never lags behind the buffer.
    """

    __slots__ = (
        "_kernel_high",
        "_receive",
        "_receiver_parked",
        "admitting",
        "capacity",
        "depth",
        "high_water",
        "sender",
        "waiting",
    )

    def __init__(self, capacity: int, kernel_high: HighWater | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"mailbox capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        # The channel pair is opened when the address first gets mail: an address that
        # never receives anything (most of a million idle agents) costs no channel.
        self._receive: trio.MemoryReceiveChannel[Message | None] | None = None
        #: the send channel once it is open (None before; the mailbox's own, one slot
        #: for both: each is 8 bytes in every agent), for a producer that enqueues
        #: itself with its ``send_nowait`` (the router's fast branch): a call of
        #: :meth:`try_put` per message costs a tenth of a send. After it returns, the
        #: producer does the rest of :meth:`try_put`: ``depth += 1``, and what
        #: :meth:`raise_high_water` does when the depth passed ``high_water``. The channel,
        #: not its bound ``send_nowait``: a bound method kept per agent is 64 bytes more
        #: per running agent and one more object a send to a cold agent touches.
        self.sender: trio.MemorySendChannel[Message | None] | None = None
        self.depth = 0
        self.high_water = 0
        self._kernel_high = kernel_high if kernel_high is not None else HighWater()
        #: producers parked in put_waiting
        self.waiting = 0
        #: True from a producer's going to wait in Trio's FIFO of blocked senders (the
        #: only way into it) until a recount finds that FIFO empty: while it is False, a
        #: take is ``depth -= 1`` even with producers ``waiting`` (their messages were
        #: counted when admitted); see recount. Public for the kernel's stepper, which
        #: takes messages itself: a call of :meth:`recount` per message while a producer
        #: that was admitted has not resumed yet (a transport's tell parked behind a full
        #: mailbox) costs more than a no-op handler.
        self.admitting = False
        #: the consumer parked in receive() on an empty buffer; while ``depth`` is still 0
        #: nothing was handed to it yet (Trio hands the next value straight to it, and a
        #: put counts it in ``depth``). Kept here because reading the channel's
        #: statistics() costs more than a whole message.
        self._receiver_parked = False

    def __len__(self) -> int:
        return self.depth

    def _open(
        self,
    ) -> tuple[trio.MemorySendChannel[Message | None], trio.MemoryReceiveChannel[Message | None]]:
        # ``None`` is the wake-up call for a parked consumer (never buffered, see
        # wake_receiver). Not ``open_memory_channel[Message | None](...)``: subscripting
        # at run time builds a typing alias per call, which costs more than the channel.
        channel: tuple[
            trio.MemorySendChannel[Message | None], trio.MemoryReceiveChannel[Message | None]
        ] = trio.open_memory_channel(self.capacity)
        self.sender, self._receive = channel
        return channel

    def statistics(self) -> MailboxStatistics:
        return MailboxStatistics(
            depth=self.depth,
            capacity=self.capacity,
            high_water=self.high_water,
            producers_waiting=self.senders_waiting(),
        )

    def senders_waiting(self) -> int:
        """Producers whose message is not in the mailbox yet (still in Trio's FIFO of
        blocked senders). Exact, unlike ``waiting``, which counts a producer until it
        resumes, also once a take has moved its message into the buffer."""
        send = self.sender
        return 0 if send is None else send.statistics().tasks_waiting_send

    def try_put(self, msg: Message) -> bool:
        """Enqueue without yielding if there is room; False when full.

        Trio refuses (``WouldBlock``) while earlier producers are still waiting, so a
        newcomer never overtakes them.
        """
        send = self.sender
        if send is None:
            send = self._open()[0]
        try:
            send.send_nowait(msg)
        except trio.WouldBlock:
            return False
        depth = self.depth = self.depth + 1
        if depth > self.high_water:
            self.raise_high_water(depth)
        return True

    def raise_high_water(self, depth: int) -> None:
        """The depth is now ``depth``, past ``high_water``: raise this mailbox's mark and
        the kernel's."""
        self.high_water = depth
        if depth > self._kernel_high.value:
            self._kernel_high.value = depth

    async def put_waiting(self, msg: Message) -> None:
        """Wait for room in Trio's FIFO of blocked senders, then enqueue.

        Cancellation while waiting (e.g. the send deadline) leaves the message *not*
        enqueued. A producer still waiting when the mailbox is closed is admitted by
        :meth:`close` (which hands its message back with the rest); a put after the close
        raises ``trio.BrokenResourceError``.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if self.try_put(msg):
            return
        send = self.sender
        assert send is not None
        # Parked in Trio's FIFO of blocked senders: the consumer that admits the message
        # counts it (see take/receive).
        self.waiting += 1
        self.admitting = True
        try:
            await send.send(msg)
        finally:
            self.waiting -= 1

    def take(self) -> Message:
        """The oldest message, or ``trio.WouldBlock`` when empty."""
        receive = self._receive
        if receive is None:
            raise trio.WouldBlock
        msg = receive.receive_nowait()
        if self.waiting:
            # Trio has just moved a blocked producer's message into the freed slot.
            self.recount()
        else:
            self.depth -= 1
        return msg  # type: ignore[return-value]  # None is never buffered

    def receiver(self) -> trio.MemoryReceiveChannel[Message | None]:
        """The receive channel, for a consumer that takes messages itself with its
        ``receive_nowait``.

        For the serve loop, which calls it only while ``depth`` is non-zero and then does
        the rest of :meth:`take` (``depth -= 1``, or :meth:`recount` while ``waiting``):
        a call of :meth:`take` per message costs more than a no-op handler. The channel,
        not its bound ``receive_nowait``: the serve loop's frame keeps what this returns
        for as long as the agent runs.
        """
        receive = self._receive
        if receive is None:
            receive = self._open()[1]
        return receive

    def recount(self) -> None:
        """Set ``depth`` after a take while producers were waiting.

        One out, and if a producer was parked in Trio's FIFO, one of theirs in. The
        waiting count is decremented by a producer only when it resumes, after Trio
        admitted its message, so the buffer is counted (``statistics()``, which costs
        more than a whole message). Once a count found the FIFO empty, the takes after
        it admit nothing until a producer goes to wait again (nothing else puts one in
        the FIFO): a consumer that takes a batch right after the one producer that
        waited was admitted counts once, not once per message.
        """
        if not self.admitting:
            self.depth -= 1
            return
        assert self.sender is not None
        stats = self.sender.statistics()
        depth = self.depth = stats.current_buffer_used
        self.admitting = stats.tasks_waiting_send > 0
        if depth > self.high_water:
            self.raise_high_water(depth)

    def evict_oldest(self) -> Message:
        """Take the oldest message out to make room (``drop_oldest``)."""
        return self.take()

    def take_all(self) -> list[Message]:
        """Every queued message, oldest first, then those of the producers that were
        waiting for room (Trio admits them in their order as room frees up)."""
        items: list[Message] = []
        receive = self._receive
        if receive is None or (not self.depth and not self.waiting):
            return items
        while True:
            try:
                msg = receive.receive_nowait()
            except (trio.WouldBlock, trio.ClosedResourceError):
                break
            if msg is not None:
                items.append(msg)
        self.depth = 0
        # A consumer that parked here was handed a message already (the depth was not
        # 0): it waits no more, and a wake-up must not put a None in the buffer.
        self._receiver_parked = False
        return items

    async def receive(self) -> Message | None:
        """Wait for the next message; ``None`` if woken by :meth:`wake_receiver`."""
        waiting = self.waiting
        msg = None
        try:
            msg = await self.park()
        finally:
            msg = self.unparked(msg, waiting)
        return msg

    def park(self) -> Coroutine[Any, Any, Message | None]:
        """The wait of :meth:`receive`, for a consumer that awaits it itself (the serve
        loop: a parked agent then keeps no frame of this method, 232 bytes a piece at a
        million agents). Follow it, however it ends, with :meth:`unparked`, given what it
        returned (``None`` if it raised) and :attr:`waiting` as it was before."""
        receive = self._receive
        if receive is None:
            receive = self._open()[1]
        # Trio parks the consumer only on an empty buffer (then no producer waits).
        self._receiver_parked = not self.depth
        return receive.receive()

    def unparked(self, msg: Message | None, waiting: int) -> Message | None:
        """The bookkeeping after :meth:`park`'s wait; returns ``msg``."""
        self._receiver_parked = False
        if msg is None:
            return None
        if waiting or self.waiting:
            # A blocked producer's message may have been admitted, and the producer may
            # already have counted itself out of ``waiting``: recount from the buffer.
            self.recount()
        else:
            self.depth -= 1
        return msg

    def wake_receiver(self) -> None:
        """Wake a consumer parked in :meth:`receive` (it gets ``None``).

        Trio hands a value straight to a parked receiver, so the ``None`` never sits in
        the buffer; if no receiver is parked, or a message was already handed to it
        (the depth is not 0), nothing is sent.
        """
        send = self.sender
        if send is not None and self._receiver_parked and not self.depth:
            self._receiver_parked = False
            send.send_nowait(None)
            # Handed to the consumer, unless its wait was just aborted (its run cancelled
            # in this tick, the task not resumed yet): then the None went into the empty
            # buffer, and is taken back out at once, or it would be taken later as a
            # message and leave the depth one short of what the channel holds. (Cheaper
            # than asking first: the channel's statistics() builds an object.)
            assert self._receive is not None
            try:
                self._receive.receive_nowait()
            except trio.WouldBlock:  # handed over: the common case
                return

    def close(self) -> list[Message]:
        """The agent is gone for good: take what is left (queued messages, then those of
        the producers still waiting, in their order), then close the receive end."""
        items = self.take_all()
        # A channel that was never opened stays so: the address is unrouted by now.
        # Closing the receive end is enough: a put after it raises
        # ``trio.BrokenResourceError`` (the send end's close would cost as much again,
        # at every agent's stop, and change nothing).
        if self._receive is not None:
            self._receive.close()
        return items
