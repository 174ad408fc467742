"""The transport interface: how the kernel reaches agents that are not in this process.

The kernel's routing is a dict of local agents. Only when an address is *not* local
does the kernel hand the message to its transport (if one is attached), so in-process
delivery pays nothing for the remote path. A transport delivers to remote kernels and
feeds messages that arrive from them into the local kernel with
:meth:`Kernel.deliver_from_remote`. Like httpx's transports, the kernel knows only this
small interface; NATS, or an in-memory transport in tests, live outside the core.

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

import uuid
from typing import Protocol

from ._message import Address, Message


class Transport(Protocol):
    """What the kernel needs from a transport.

    Both methods raise :class:`AgentNotFound` when no remote agent has the address,
    :class:`MailboxFull` when the remote side refuses for lack of room,
    :class:`TransportUnavailable` when the remote side cannot be reached, and
    :class:`MessageFailed` with a :class:`DeadLetterReason` (``unserialisable``) for a
    message that cannot go at all (the kernel dead-letters a message it routes with
    that reason, and raises a caller's send as ``TypeError`` if the exception's cause is
    one, else ``ValueError``). Returning means the transport took the message (its delivery
    guarantee is the transport's: e.g. at-most-once for core NATS).
    """

    async def deliver(self, msg: Message) -> None:
        """Hand ``msg`` to the remote side.

        May wait, but the transport itself must bound the wait by the kernel's send
        deadline (``config.kernel.send_timeout``) and then raise
        :class:`TransportUnavailable`: the kernel does not wrap each call in a timeout.
        A wait for room before it takes the message (credit, an outgoing buffer) goes in
        ``TransportHandle.waiting_for_room()``: for a send from outside the agents, a
        shutdown's start ends it with :class:`KernelShuttingDown`, the message not taken,
        as the kernel refuses such a send waiting for room in a full local mailbox.
        (The kernel marks the task of such a send for the length of the call; a
        transport that is :class:`OutsideTold` is told instead.)
        """
        ...

    def deliver_nowait(self, msg: Message) -> None:
        """Hand ``msg`` to the remote side without waiting (buffer it or refuse)."""
        ...

    def cancel_query(self, query_id: uuid.UUID, to: Address) -> None:
        """The requester of a query this transport carried to ``to`` stopped waiting
        (its timeout passed or it was cancelled): ask the remote kernel to cancel the
        handler (there: ``TransportHandle.cancel_query``). Must not wait or raise; a
        transport that cannot reach the peer may drop the request (the handler then
        runs to its own deadline and its reply is a late reply)."""
        ...


class OutsideTold(Protocol):
    """What a transport may add to :class:`Transport` (the kernel looks for it when the
    transport is attached): it is told, as ``deliver``'s second argument, that a send is
    from outside the agents (``Kernel.send``, ``Kernel.request``), and passes that on to
    ``TransportHandle.waiting_for_room(outside)`` around a wait for room. The kernel then
    marks nothing per send; without it, the kernel marks the sending task for the length
    of each such ``deliver`` and ``waiting_for_room()`` looks the task up."""

    #: True: ``deliver`` takes ``outside`` (the kernel passes it only for such a send)
    tells_outside: bool

    async def deliver(self, msg: Message, outside: bool = False) -> None:
        """:meth:`Transport.deliver`; ``outside``: a send from outside the agents."""
        ...


class TakesTells(Protocol):
    """What a transport may add to :class:`Transport` (the kernel looks for it when the
    transport is attached): a tell it can take at once, without a coroutine. The kernel
    offers it each tell for an address with no local agent, on its fast branch (so not
    on the send in sixteen that checks for cancellation), and each such tell a handler
    returns, before ``deliver``; never a request's query (that goes to ``deliver``, which
    sets up the route of its reply)."""

    def take_tell(self, msg: Message) -> int:
        """Take tell ``msg`` now if nothing stands in the way (its route known, room for
        it): 0 if not taken (the kernel calls ``deliver`` then, which does the rest and
        may wait), 1 if taken, 2 if taken and the sender should yield once (a batch was
        sealed). Never waits; raises as ``deliver`` does for a message it refuses."""
        ...


class QueryFailing(Protocol):
    """What a transport may add to :class:`Transport` (the kernel looks for it, and a
    transport without it keeps working: its remote requesters then wait for their
    deadline instead of failing at once)."""

    def query_failed(self, query_id: uuid.UUID, error: BaseException) -> None:
        """Query ``query_id``, which this transport brought from a remote requester, will
        get no answer: it was dead-lettered here (for any reason but ``request_timeout``:
        e.g. a handler forwarded it to an agent that does not exist, is full or stopped;
        ``error`` is the :class:`RequestFailed` naming the reason), or the agent that took
        it over (its handler returned, the answer to come later) cannot give one (see
        :meth:`Kernel.fail_query`). Send the requester ``error``. Called as it happens,
        possibly more than once for one query (the transport may have answered it on its
        own already): must not wait or raise, and a query the transport does not know (or
        no longer) is left alone."""
        ...


class QueryGivingUp(Protocol):
    """What a transport may add besides :class:`QueryFailing` (the kernel looks for it,
    and a transport without it keeps working: the NATS cluster has it, for its durable
    messages)."""

    def query_given_up(self, query_id: uuid.UUID, error: BaseException) -> None:
        """The agent that took query ``query_id`` over (its handler returned, the answer
        to come later: a pool's ``$resize``) cannot answer it (:meth:`Kernel.fail_query`),
        called once, after :meth:`QueryFailing.query_failed`. Not called for a dead-lettered
        query. For a query the transport delivered on terms of its own (a durable message,
        acked by its answer): its delivery failed. Must not wait or raise; a query the
        transport does not know is left alone."""
        ...


class StopsTold(Protocol):
    """What a transport may add to :class:`Transport` (the kernel looks for it at each
    ``kernel.stop``; a transport without it keeps working): it is told that an agent of
    this kernel is being stopped for good, before its stop begins, and is awaited. The
    NATS cluster drops a placed agent's placement record there, so that a node
    SIGKILLed at any point of the stop leaves either the agent running (the record kept:
    it is re-placed) or nothing placed: dropped after the stop, the record of an agent
    stopped already was re-placed from on the node's loss."""

    async def agent_stopping(self, agent_id: uuid.UUID, name: str | None) -> None:
        """Agent (or supervisor) ``agent_id`` (``name``, None for an unnamed one) is
        stopped for good by ``kernel.stop``: it is out of the routing table already (new
        sends to it fail), its stop (its queue, ``on_stop``) begins once this returns.
        Also a named agent whose run ends by itself for good (``temporary``, or its
        handler's directive ``stop``: before its ``on_stop``; a ``transient`` one's normal
        exit: once its ``on_stop`` returned), from its own run, before its ``stopped``
        event; not during the kernel's shutdown. That call is shielded and bounded by the
        agent's ``shutdown_timeout`` (then cancelled, a WARNING logged).
        Must not raise; should not wait long (the stop waits for it). The kernel shields
        the call from its caller's cancel (the agent is unrouted already), bounded by the
        agent's ``shutdown_timeout`` (then cancelled, a WARNING logged), and the stop is
        carried out whatever this ends with (an error is raised to the caller once the
        stop began)."""
        ...
