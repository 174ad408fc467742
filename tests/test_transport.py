"""The transport hook: two kernels joined by an in-memory transport."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import trio
import trio.testing

from nexus_trio import (
    Agent,
    AgentNotFound,
    AgentSpec,
    Context,
    DeadLetterReason,
    EventKind,
    Kernel,
    Message,
    MessageFailed,
    MessageKind,
    RequestFailed,
    RequestTimeout,
    TransportHandle,
    TransportUnavailable,
    agent,
    open_kernel,
)

from .conftest import make_config


class Loopback:
    """Delivers every non-local message to the peer kernel, as a network transport would."""

    def __init__(self) -> None:
        #: the peer kernel's handle for this link (what its attach_transport returned)
        self.peer: TransportHandle | None = None
        self.carried: list[Message] = []
        self.down = False
        self.cancelled: list[uuid.UUID] = []

    async def deliver(self, msg: Message) -> None:
        if self.down or self.peer is None:
            raise TransportUnavailable("peer down")
        self.carried.append(msg)
        await self.peer.deliver(msg)

    def deliver_nowait(self, msg: Message) -> None:
        raise TransportUnavailable("this loopback only delivers with send()")

    def cancel_query(self, query_id: uuid.UUID, to: uuid.UUID | str) -> None:
        self.cancelled.append(query_id)
        if self.peer is not None:
            self.peer.cancel_query(query_id, to)

    def query_failed(self, query_id: uuid.UUID, error: BaseException) -> None:
        if self.peer is not None:
            self.peer.fail_request(query_id, error)


@agent(name="doubler")
async def doubler(ctx: Context, msg: Message) -> Any:
    return msg.payload * 2


async def test_requests_cross_kernels_and_replies_find_their_way_back() -> None:
    link_ab, link_ba = Loopback(), Loopback()
    async with open_kernel(make_config()) as a, open_kernel(make_config()) as b:
        # Each link delivers into the other kernel through that kernel's handle.
        link_ba.peer = a.attach_transport(link_ab)
        link_ab.peer = b.attach_transport(link_ba)
        remote = b.spawn(doubler)
        assert not a.is_local(remote) and b.is_local(remote)
        assert await a.request(remote.id, 21) == 42
        assert await a.request("doubler", 5) == 10
        await trio.testing.wait_all_tasks_blocked()
        assert [m.kind.value for m in link_ab.carried] == ["Query", "Query"]
        assert [m.payload for m in link_ba.carried] == [42, 10]
        stats_a, stats_b = a.stats(), b.stats()
        assert stats_a.forwarded == 2 and stats_a.replies_delivered == 2
        assert stats_b.handled == 2 and stats_b.forwarded == 2
        with pytest.raises(AgentNotFound):
            await a.send("nobody-anywhere", 1)
    for kernel in (a, b):
        stats = kernel.stats()
        assert stats.in_flight == 0
        assert stats.accepted == (
            stats.handled + stats.replies_delivered + stats.forwarded + stats.dead_lettered
        )


async def test_local_delivery_never_touches_the_transport() -> None:
    link = Loopback()
    link.down = True
    async with open_kernel(make_config()) as kernel:
        kernel.attach_transport(link)
        ref = kernel.spawn(doubler)
        assert await kernel.request(ref, 2) == 4
        with pytest.raises(TransportUnavailable):
            await kernel.send("elsewhere", 1)
    assert link.carried == []


async def test_a_routed_result_the_transport_cannot_take_is_dead_lettered() -> None:
    link = Loopback()
    link.down = True

    @agent(name="forwarder")
    async def forwarder(ctx: Context, msg: Message) -> Message:
        return Message(ctx.id, "remote-agent", msg.payload)

    async with open_kernel(make_config()) as kernel:
        kernel.attach_transport(link)
        await kernel.send(kernel.spawn(forwarder), "x")
        await trio.testing.wait_all_tasks_blocked()
    [letter] = kernel.recent_dead_letters()
    assert letter.reason is DeadLetterReason.TRANSPORT_UNAVAILABLE
    assert letter.detail == "peer down"


@agent(name="stuck")
async def stuck(ctx: Context, msg: Message) -> Any:
    await trio.sleep_forever()


async def _abandoned_and_cancelled_there(a: Kernel, b: Kernel, link_ab: Loopback, how: str) -> None:
    """``a`` asks ``b``'s ``stuck`` and gives up at 1 s (``how``: its timeout, or its
    caller cancelled); the query's cancel goes over the link and ``b``'s handler is
    stopped: dead-lettered ``request_timeout``, nothing left in flight."""
    if how == "timeout":
        with pytest.raises(RequestTimeout):
            await a.request("stuck", "x", timeout=1.0)
    else:
        with trio.move_on_after(1.0):
            await a.request("stuck", "x", timeout=60.0)
    [query] = link_ab.carried
    assert link_ab.cancelled == [query.id]
    await trio.testing.wait_all_tasks_blocked()
    [letter] = b.recent_dead_letters()
    assert letter.reason is DeadLetterReason.REQUEST_TIMEOUT
    assert letter.message.id == query.id
    assert b.stats().in_flight == 0


@pytest.mark.parametrize("how", ["timeout", "requester cancelled"])
async def test_a_remote_request_abandoned_cancels_the_remote_handler(
    mock_clock: trio.testing.MockClock, how: str
) -> None:
    mock_clock.autojump_threshold = 0
    link_ab, link_ba = Loopback(), Loopback()
    async with open_kernel(make_config()) as a, open_kernel(make_config()) as b:
        link_ba.peer = a.attach_transport(link_ab)
        link_ab.peer = b.attach_transport(link_ba)
        b.spawn(stuck)
        await _abandoned_and_cancelled_there(a, b, link_ab, how)
        # 1 s, not the request's 60 s: the handler stopped when its requester did.
        assert trio.current_time() < 2.0


@pytest.mark.parametrize("how", ["timeout", "requester cancelled"])
async def test_a_remote_request_abandoned_cancels_the_remote_handler_while_a_local_namesake_stops(
    mock_clock: trio.testing.MockClock, how: str
) -> None:
    """Names are unique per kernel, not across kernels: ``a`` has a ``stuck`` of its own,
    being stopped (its message in hand for up to its 30 s shutdown timeout), so it is
    unrouted and ``a``'s request to ``stuck`` goes through the transport to ``b``'s. When
    the requester gives up, ``b``'s handler must be cancelled as for any remote request.
    The fifty-first pass's fallback in ``expire_query`` (an agent being stopped is found
    among the live ones) found ``a``'s local ``stuck``, whose message in hand is not the
    query, and returned without telling the transport: ``b``'s handler ran on to the
    request's 60 s (review of the fifty-first pass; fails with that _router.py:
    ``link_ab.cancelled == []``)."""
    mock_clock.autojump_threshold = 0
    link_ab, link_ba = Loopback(), Loopback()
    async with open_kernel(make_config()) as a, open_kernel(make_config()) as b:
        link_ba.peer = a.attach_transport(link_ab)
        link_ab.peer = b.attach_transport(link_ba)
        b.spawn(stuck)
        local = a.spawn(stuck.with_options(shutdown_timeout=30.0))
        await a.send(local, "in hand")
        await trio.testing.wait_all_tasks_blocked()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(a.stop, local)
            await trio.testing.wait_all_tasks_blocked()
            assert not a.is_local(local)  # being stopped: unrouted
            await _abandoned_and_cancelled_there(a, b, link_ab, how)
            # 1 s, not the request's 60 s: the remote handler stopped when its requester did
            assert trio.current_time() == pytest.approx(1.0)
        # the local namesake's message in hand ran out its shutdown timeout, untouched
        assert trio.current_time() == pytest.approx(30.0)


class Capture(Loopback):
    """Keeps what the kernel hands it (a remote peer that never answers by itself)."""

    async def deliver(self, msg: Message) -> None:
        self.carried.append(msg)


async def test_deliver_nowait_takes_what_has_room_and_says_no_for_a_full_mailbox(
    autojump_clock: Any,
) -> None:
    """``TransportHandle.deliver_nowait``, the path of a transport's batched tells: room
    -> taken and counted; a full ``block`` or ``reject`` mailbox -> False (the transport
    waits or parks it; not a refused send); ``drop_newest`` -> taken and dead-lettered;
    not local -> AgentNotFound; a reply -> resolves its request; stopping -> refused."""
    from nexus_trio import KernelShuttingDown, OverflowPolicy

    gate = trio.Event()

    @agent(name="held", mailbox_capacity=2, shutdown_timeout=1000.0)
    async def held(ctx: Context, msg: Message) -> None:
        await gate.wait()

    @agent(name="refuser", mailbox_capacity=1, overflow=OverflowPolicy.REJECT)
    async def refuser(ctx: Context, msg: Message) -> None:
        await gate.wait()

    @agent(name="dropper", mailbox_capacity=1, overflow=OverflowPolicy.DROP_NEWEST)
    async def dropper(ctx: Context, msg: Message) -> None:
        await gate.wait()

    transport = Capture()
    async with open_kernel(make_config(handle_timeout_ms=10**9)) as kernel:
        handle = kernel.attach_transport(transport)
        held_ref, dropper_ref = kernel.spawn(held), kernel.spawn(dropper)
        kernel.spawn(refuser)
        sender = uuid.uuid4()

        def tell(to: Any, payload: int) -> bool:
            return handle.deliver_nowait(Message(sender, to, payload))

        assert tell(held_ref.id, 0)
        await trio.testing.wait_all_tasks_blocked()  # 0 is being handled
        assert [tell(held_ref.id, i) for i in (1, 2, 3)] == [True, True, False]
        assert tell("refuser", 0) and tell("dropper", 0)
        await trio.testing.wait_all_tasks_blocked()  # both handle their first
        assert [tell("refuser", i) for i in (1, 2)] == [True, False]
        assert [tell("dropper", i) for i in (1, 2, 3)] == [True, True, True]
        with pytest.raises(AgentNotFound):
            tell(uuid.uuid4(), 0)
        stats = kernel.stats()
        assert stats.rejected == {}  # a full mailbox is the transport's wait, not a refusal
        assert stats.accepted == 3 + 2 + 4
        dropped = [d for d in kernel.recent_dead_letters() if d.recipient == dropper_ref.id]
        assert [(d.message.payload, d.reason) for d in dropped] == [
            (2, DeadLetterReason.MAILBOX_OVERFLOW),
            (3, DeadLetterReason.MAILBOX_OVERFLOW),
        ]

        async def ask() -> None:
            assert await kernel.request("far-away", "q", timeout=100.0) == "answer"

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask)
            await trio.testing.wait_all_tasks_blocked()
            (query,) = transport.carried
            assert handle.deliver_nowait(query.reply(uuid.uuid4(), "answer"))
        assert kernel.stats().replies_delivered == 1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(kernel.shutdown)
            await trio.testing.wait_all_tasks_blocked()  # draining: "held" still works
            with pytest.raises(KernelShuttingDown):
                tell(held_ref.id, 9)
            gate.set()


async def test_deliver_run_nowait_takes_a_batch_s_plain_enqueues_and_stops_at_the_rest(
    autojump_clock: Any,
) -> None:
    """``TransportHandle.deliver_run_nowait``, the path of a batch's tells: it takes
    messages in order while each is an enqueue with room (runs to one address and to
    another alike), counted as ``deliver_nowait`` counts them, and stops, taking nothing
    more, at the first that needs the single way: a full mailbox, an unknown address, a
    reply; from a given start, and not at all once the kernel drains."""
    from nexus_trio import KernelShuttingDown

    gate = trio.Event()
    handled: list[tuple[str, int]] = []

    @agent(name="small", mailbox_capacity=3, shutdown_timeout=1000.0)
    async def small(ctx: Context, msg: Message) -> None:
        await gate.wait()
        handled.append(("small", msg.payload))

    @agent(name="big", mailbox_capacity=100)
    async def big(ctx: Context, msg: Message) -> None:
        await gate.wait()
        handled.append(("big", msg.payload))

    transport = Capture()
    async with open_kernel(make_config(handle_timeout_ms=10**9)) as kernel:
        handle = kernel.attach_transport(transport)
        small_ref = kernel.spawn(small)
        kernel.spawn(big)
        sender = uuid.uuid4()
        # each mailbox's first message opens its channel (the single way)
        assert handle.deliver_nowait(Message(sender, "small", 0))
        assert handle.deliver_nowait(Message(sender, "big", 0))
        await trio.testing.wait_all_tasks_blocked()  # both hold their first message
        accepted = kernel.stats().accepted

        run = [Message(sender, "big", i) for i in (1, 2)]
        run += [Message(sender, small_ref.id, i) for i in (1, 2, 3, 4)]
        run += [Message(sender, "big", 3)]
        # small takes 1..3 (its capacity), 4 finds it full: the run stops there
        assert handle.deliver_run_nowait(run, 0) == 5
        assert kernel.stats().accepted == accepted + 5
        assert kernel.mailbox_depth(small_ref.id) == 3
        assert handle.deliver_run_nowait(run, 5) == 5  # still full: nothing taken
        assert handle.deliver_run_nowait(run, 6) == 7  # from a start after it
        assert handle.deliver_run_nowait(run, 7) == 7  # at the end

        unknown = [Message(sender, "big", 4), Message(sender, "nobody", 0)]
        assert handle.deliver_run_nowait(unknown, 0) == 1
        answer = Message(sender, "big", 5, reply_to=uuid.uuid4())
        assert handle.deliver_run_nowait([Message(sender, "big", 6), answer], 0) == 1
        assert kernel.stats().accepted == accepted + 5 + 1 + 1 + 1
        assert kernel.stats().rejected == {}

        async with trio.open_nursery() as nursery:
            nursery.start_soon(kernel.shutdown)
            await trio.testing.wait_all_tasks_blocked()  # draining
            assert handle.deliver_run_nowait([Message(sender, "big", 7)], 0) == 0
            with pytest.raises(KernelShuttingDown):
                handle.deliver_nowait(Message(sender, "big", 7))
            gate.set()
    assert [p for a, p in handled if a == "small"] == [0, 1, 2, 3]
    assert [p for a, p in handled if a == "big"] == [0, 1, 2, 3, 4, 6]


async def test_a_remote_delivery_refused_as_the_kernel_drains_is_the_transports_to_count(
    autojump_clock: Any,
) -> None:
    """Regression: ``deliver_nowait`` refused a message once the kernel drained and
    counted it in the kernel's ``rejected`` (``shutting_down``), which ``deliver``, its
    awaited twin, and every other refusal of a remote delivery do not (the transport
    counts them: AgentNotFound, a full mailbox). While the kernel drains, ``deliver``
    still takes the message the transport then hands it: it was counted accepted and
    rejected both. Neither path counts a refusal; the message is handled once."""
    from nexus_trio import KernelShuttingDown

    gate = trio.Event()
    seen: list[int] = []

    @agent(name="held", shutdown_timeout=1000.0)
    async def held(ctx: Context, msg: Message) -> None:
        seen.append(msg.payload)
        await gate.wait()

    async with open_kernel(make_config(handle_timeout_ms=10**9)) as kernel:
        handle = kernel.attach_transport(Capture())
        kernel.spawn(held)
        sender = uuid.uuid4()
        assert handle.deliver_nowait(Message(sender, "held", 0))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(kernel.shutdown)
            await trio.testing.wait_all_tasks_blocked()  # draining: "held" still works
            with pytest.raises(KernelShuttingDown):
                handle.deliver_nowait(Message(sender, "held", 1))
            await handle.deliver(Message(sender, "held", 1))  # (the drain takes it)
            gate.set()
        stats = kernel.stats()
    assert seen == [0, 1]
    assert stats.rejected == {}
    assert (stats.accepted, stats.handled, stats.in_flight) == (2, 2, 0)


class _Nowhere:
    """A transport of the required methods only, which reaches no other kernel."""

    async def deliver(self, msg: Message) -> None:
        raise TransportUnavailable("nowhere")

    def deliver_nowait(self, msg: Message) -> None:
        raise TransportUnavailable("nowhere")

    def cancel_query(self, query_id: uuid.UUID, to: uuid.UUID | str) -> None:
        return None


async def test_a_transport_without_query_failed_still_works_when_a_query_is_failed() -> None:
    """``query_failed`` is optional (``QueryFailing``): a transport written before it
    existed keeps working when an agent fails a query it took over; one with it gets the
    call for a query this kernel does not wait for."""

    failed: list[uuid.UUID] = []

    class Failing(_Nowhere):
        def query_failed(self, query_id: uuid.UUID, error: BaseException) -> None:
            failed.append(query_id)

    query_id = uuid.uuid4()
    error = RequestFailed(query_id, "pool", "agent_stopped", None)
    async with open_kernel(make_config()) as kernel:
        kernel.attach_transport(_Nowhere())
        kernel.fail_query(query_id, error)  # no one to tell, nothing raised
        kernel.detach_transport()
        kernel.attach_transport(Failing())
        kernel.fail_query(query_id, error)
    assert failed == [query_id]


async def test_a_transport_with_query_given_up_hears_of_a_query_given_up_once_after_query_failed(
    autojump_clock: Any,
) -> None:
    """``query_given_up`` (``QueryGivingUp``, optional too) is called once, after
    ``query_failed``, when an agent gives up a query it took over (``fail_query``), and
    not for a query that is dead-lettered (that one is told by ``query_failed`` alone):
    the durable path naks a message's delivery there, and a dead-lettered one reaches it
    through the dead-letter stream, with the very Query that failed."""
    calls: list[tuple[str, uuid.UUID]] = []

    class GivingUp(_Nowhere):
        def query_failed(self, query_id: uuid.UUID, error: BaseException) -> None:
            calls.append(("failed", query_id))

        def query_given_up(self, query_id: uuid.UUID, error: BaseException) -> None:
            calls.append(("given_up", query_id))

    @agent(name="raises", on_error="resume")
    async def raises(ctx: Context, msg: Message) -> None:
        raise RuntimeError("no")

    given_up = uuid.uuid4()
    async with open_kernel(make_config()) as kernel:
        kernel.attach_transport(GivingUp())
        kernel.spawn(raises)
        kernel.fail_query(given_up, RequestFailed(given_up, "pool", "agent_stopped", None))
        dead = Message(sender=uuid.uuid4(), to="raises", kind=MessageKind.QUERY)
        await kernel.deliver_from_remote(dead)
        await trio.testing.wait_all_tasks_blocked()
        kernel.detach_transport()
    assert calls == [("failed", given_up), ("given_up", given_up), ("failed", dead.id)]


class Telling(Loopback):
    """A Loopback that records the queries it is told failed."""

    def __init__(self) -> None:
        super().__init__()
        self.told: list[tuple[uuid.UUID, str]] = []

    def query_failed(self, query_id: uuid.UUID, error: BaseException) -> None:
        self.told.append((query_id, getattr(error, "reason", "?")))
        super().query_failed(query_id, error)


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        ("nobody", "no_such_agent"),
        ("refuser", "mailbox_full"),
        ("dropper", "mailbox_overflow"),
        ("stopping", "agent_stopped"),
        ("raiser", "handler_error"),
    ],
)
async def test_a_query_dead_lettered_on_the_kernel_that_took_it_fails_its_remote_requester(
    mock_clock: trio.testing.MockClock, target: str, reason: str
) -> None:
    """Regression: a query from a requester on kernel a, forwarded by b's agent (returned
    to another agent, as a router agent does) and dead-lettered on b (no such agent, a
    full ``reject`` or ``drop_newest`` mailbox, its agent stopped with it queued, its
    handler raised), left a's requester waiting for its whole timeout: the kernel failed
    only a requester pending in itself, and told the transport nothing. It tells the
    transport (``query_failed``, once), and a's request fails at once with the reason."""
    from nexus_trio import OverflowPolicy

    mock_clock.autojump_threshold = 0
    held, release = trio.Event(), trio.Event()

    async def holds(ctx: Context, msg: Message) -> None:
        if msg.payload == "hold":
            held.set()
            await release.wait()
        elif msg.payload == "raise":
            raise RuntimeError("no")

    @agent(name="forwards")
    async def forwards(ctx: Context, msg: Message) -> Any:
        return msg.evolve(to=target, payload="raise")  # the query goes on

    link_ab, link_ba = Telling(), Telling()
    async with open_kernel(make_config()) as a, open_kernel(make_config()) as b:
        link_ba.peer = a.attach_transport(link_ab)
        link_ab.peer = b.attach_transport(link_ba)
        b.spawn(forwards)
        b.spawn(agent(holds, name="raiser"))
        b.spawn(agent(holds, name="refuser", mailbox_capacity=1, overflow=OverflowPolicy.REJECT))
        b.spawn(
            agent(holds, name="dropper", mailbox_capacity=1, overflow=OverflowPolicy.DROP_NEWEST)
        )
        b.spawn(agent(holds, name="stopping", shutdown_timeout=1.0))
        if target in ("refuser", "dropper", "stopping"):
            await b.send(target, "hold")
            await held.wait()
        if target in ("refuser", "dropper"):
            await b.send(target, "filler")  # the mailbox is full now
        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            if target == "stopping":

                async def stop_once_queued() -> None:
                    await trio.testing.wait_all_tasks_blocked()  # the query is queued
                    assert b.mailbox_depth(target) == 1
                    await b.stop(target)

                nursery.start_soon(stop_once_queued)
            with pytest.raises(RequestFailed) as failed:
                await a.request("forwards", "work", timeout=30)
        release.set()
        # at once: not after the request's 30 s (nor the stop's 1 s, for a queued one)
        assert trio.current_time() - started <= (1.0 if target == "stopping" else 0.0)
        [query] = link_ab.carried
        assert failed.value.reason == reason
        assert failed.value.request_id == query.id
        assert link_ba.told == [(query.id, reason)]
        # an answered query tells nothing
        b.spawn(doubler)
        assert await a.request("doubler", 2) == 4
        assert link_ba.told == [(query.id, reason)]
        assert link_ab.told == []
    assert a.stats().in_flight == 0
    # (and the message the stopped agent held, cancelled)
    assert b.stats().dead_letters_by_reason[reason] == (2 if target == "stopping" else 1)


class WaitsForRoom:
    """A transport that takes a message once ``room`` is set, its wait in
    ``waiting_for_room``; ``told``: told of sends from outside the agents (OutsideTold)
    or not (the kernel marks their tasks)."""

    def __init__(self, told: bool) -> None:
        self.tells_outside = told
        self.handle: TransportHandle | None = None
        self.calls: list[tuple[Any, bool | None]] = []
        self.taken: list[Any] = []
        self.room = trio.Event()

    async def deliver(self, msg: Message, outside: bool = False) -> None:
        assert self.handle is not None
        self.calls.append((msg.payload, outside if self.tells_outside else None))
        wait = self.handle.waiting_for_room(outside) if self.tells_outside else None
        with wait or self.handle.waiting_for_room():
            await self.room.wait()
        self.taken.append(msg.payload)

    def deliver_nowait(self, msg: Message) -> None:
        raise TransportUnavailable("this transport only delivers with send()")

    def cancel_query(self, query_id: uuid.UUID, to: uuid.UUID | str) -> None:
        pass


@pytest.mark.parametrize("told", [True, False], ids=["told", "marked"])
async def test_a_wait_for_room_in_the_transport_is_refused_at_shutdown_for_an_outside_send_only(
    autojump_clock: Any, told: bool
) -> None:
    """A send from outside the agents (``Kernel.send``, ``Kernel.request``) that waits
    in the transport for room when the shutdown starts is refused (``draining``, never
    taken); an agent's waits on and is taken. A transport that says ``tells_outside``
    (OutsideTold) is told which sends are from outside (its ``deliver``'s second
    argument, passed on to ``waiting_for_room``): the kernel marks no task for it. One
    that does not is not told: the kernel marks the task, as before."""
    from nexus_trio import KernelShuttingDown

    transport = WaitsForRoom(told)
    refused: list[tuple[str, str]] = []

    @agent(name="relay")
    async def relay(ctx: Context, msg: Message) -> None:
        await ctx.send("far", "from an agent")

    async def outside(what: str) -> None:
        try:
            if what == "tell":
                await kernel.send("far", "told from outside")
            else:
                await kernel.request("far", "asked from outside")
        except KernelShuttingDown as exc:
            refused.append((what, exc.phase))

    async with open_kernel(make_config(handle_timeout_ms=10**9)) as kernel:
        transport.handle = kernel.attach_transport(transport)
        await kernel.send(kernel.spawn(relay), "go")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(outside, "tell")
            nursery.start_soon(outside, "request")
            await trio.testing.wait_all_tasks_blocked()
            assert sorted(transport.calls, key=str) == sorted(
                [
                    ("from an agent", False if told else None),
                    ("told from outside", True if told else None),
                    ("asked from outside", True if told else None),
                ],
                key=str,
            )
            nursery.start_soon(kernel.shutdown)
            await trio.testing.wait_all_tasks_blocked()
            assert sorted(refused) == [("request", "draining"), ("tell", "draining")]
            transport.room.set()
        stats = kernel.stats()
    assert transport.taken == ["from an agent"]
    assert stats.rejected == {"shutting_down": 2}
    assert (stats.forwarded, stats.handled) == (1, 1)


class Taking:
    """A transport that takes tells at once (``take_tell``, TakesTells), answering
    ``answer`` (0: not taken, 1: taken, 2: taken, the sender to yield), else by
    ``deliver``; ``refuse``: ``take_tell`` raises it."""

    def __init__(self, answer: int, refuse: Exception | None = None) -> None:
        self.answer = answer
        self.refuse = refuse
        self.taken: list[Any] = []
        self.delivered: list[Any] = []

    def take_tell(self, msg: Message) -> int:
        if self.refuse is not None:
            raise self.refuse
        if self.answer:
            self.taken.append(msg.payload)
        return self.answer

    async def deliver(self, msg: Message) -> None:
        self.delivered.append(msg.payload)

    def deliver_nowait(self, msg: Message) -> None:
        raise TransportUnavailable("this transport only delivers with send()")

    def cancel_query(self, query_id: uuid.UUID, to: uuid.UUID | str) -> None:
        pass


@pytest.mark.parametrize("answer", [0, 1, 2])
async def test_a_transport_that_takes_tells_at_once_gets_them_on_the_fast_branch(
    answer: int,
) -> None:
    """A tell for no local agent is offered to ``take_tell`` first (not on the send in
    sixteen that checks for cancellation): taken tells never reach ``deliver``, one not
    taken does; every tell is counted accepted and forwarded once, in the order sent;
    a tell taken with 1 is sent without a checkpoint, one taken with 2 yields (a task
    started before the send has run by its end: Trio may run it before or after the
    sender in the batch that follows the yield, so over the 30 taken tells)."""
    transport = Taking(answer)
    async with open_kernel(make_config()) as kernel:
        kernel.attach_transport(transport)
        before = kernel.stats()
        ran: list[int] = []
        ran_before_end: list[int] = []

        async def other(i: int) -> None:
            ran.append(i)

        async with trio.open_nursery() as nursery:
            for i in range(32):
                taken = len(transport.taken)
                nursery.start_soon(other, i)
                if answer == 1 and i % 16 not in (0, 15):
                    with trio.testing.assert_no_checkpoints():
                        await kernel.send("elsewhere", i)
                else:
                    await kernel.send("elsewhere", i)
                if len(transport.taken) > taken and i in ran:
                    ran_before_end.append(i)
                await trio.testing.wait_all_tasks_blocked()
        stats = kernel.stats()
    if answer == 2:
        assert ran_before_end
    else:
        assert not ran_before_end
    assert sorted(transport.taken + transport.delivered) == list(range(32))
    assert len(transport.delivered) == (32 if answer == 0 else 2)
    assert transport.taken == sorted(transport.taken)
    assert stats.forwarded - before.forwarded == 32


@pytest.mark.parametrize("cause", [TypeError, ValueError])
async def test_a_tell_the_transport_refuses_to_take_raises_as_one_it_refuses_to_deliver(
    cause: type[Exception],
) -> None:
    """``take_tell`` raising MessageFailed (a payload it cannot carry): the caller's send
    raises the error of an API misuse of its cause's class, as from ``deliver``;
    nothing counted forwarded."""
    refusal = MessageFailed("message 1 to elsewhere: not JSON")
    refusal.__cause__ = cause("not JSON")
    async with open_kernel(make_config()) as kernel:
        kernel.attach_transport(Taking(1, refusal))
        for _ in range(15):  # (never the send in sixteen: that one goes to deliver)
            with pytest.raises(cause, match="not JSON"):
                await kernel.send("elsewhere", {1, 2})
        assert kernel.stats().forwarded == 0


class TakingInOrder(Taking):
    """:class:`Taking` that also notes every tell it got, taken or delivered, in the
    order it got them."""

    def __init__(self, answer: int) -> None:
        super().__init__(answer)
        self.got: list[Any] = []

    def take_tell(self, msg: Message) -> int:
        taken = super().take_tell(msg)
        if taken:
            self.got.append(msg.payload)
        return taken

    async def deliver(self, msg: Message) -> None:
        self.got.append(msg.payload)
        await super().deliver(msg)


@pytest.mark.parametrize("answer", [1, 2])
async def test_an_agents_tells_taken_at_once_keep_their_order_and_yield_only_when_asked(
    answer: int,
) -> None:
    """Review of the thirty-fourth pass: an agent's ``ctx.send`` (not only a send from
    outside) offers a tell for no local agent to ``take_tell``: 30 of 32 taken, the two
    sends in sixteen that check for cancellation go to ``deliver``, all in the order sent,
    each counted forwarded once; a tell taken with 1 returns without a checkpoint, one
    taken with 2 yields (another task may run before the send returns)."""
    transport = TakingInOrder(answer)
    ran_during: list[int] = []
    checkpoints: list[int] = []
    async with open_kernel(make_config()) as kernel:
        kernel.attach_transport(transport)
        async with trio.open_nursery() as nursery:
            done = trio.Event()

            @agent(name="teller")
            async def teller(ctx: Context, msg: Message) -> None:
                for i in range(32):
                    ran: list[int] = []

                    async def other(i: int = i, ran: list[int] = ran) -> None:
                        ran.append(i)

                    nursery.start_soon(other)
                    taken = len(transport.taken)
                    try:
                        with trio.testing.assert_no_checkpoints():
                            await ctx.send("elsewhere", i)
                    except AssertionError:
                        checkpoints.append(i)
                    if len(transport.taken) > taken and ran:
                        ran_during.append(i)
                done.set()

            before = kernel.stats()
            await kernel.send(kernel.spawn(teller), "go")
            await done.wait()
        stats = kernel.stats()
    assert transport.got == list(range(32))
    assert len(transport.delivered) == 2
    assert transport.taken == [i for i in range(32) if i not in transport.delivered]
    assert stats.forwarded - before.forwarded == 32
    if answer == 1:
        # (only the two sends that go to Router.send pass a checkpoint)
        assert len(checkpoints) == 2, checkpoints
        assert not ran_during
    else:
        assert len(checkpoints) == 32 - 2 + 2, checkpoints
        assert ran_during  # (about half of 30: Trio runs a batch in either order)


async def test_a_request_for_another_kernel_is_not_offered_to_take_tell(
    mock_clock: trio.testing.MockClock,
) -> None:
    """Review of the thirty-fourth pass: ``take_tell`` is offered tells (``TakesTells``: a
    tell it can take at once), but a request's query took the same fast branch and was
    offered too: a transport that takes what it is offered as a tell (the interface says
    no more) carried the query without its reply's route, and the requester waited out its
    timeout for nothing. A request's query goes to ``deliver``, as before that pass."""
    mock_clock.autojump_threshold = 0
    transport = Taking(1)
    async with open_kernel(make_config()) as kernel:
        kernel.attach_transport(transport)
        for i in range(3):
            with pytest.raises(RequestTimeout):
                await kernel.request("elsewhere", f"query {i}", timeout=1.0)
        await kernel.send("elsewhere", "tell")
    assert transport.taken == ["tell"]
    assert transport.delivered == ["query 0", "query 1", "query 2"]


@pytest.mark.parametrize("answer", [0, 1, 2])
async def test_a_handlers_returned_tell_for_another_kernel_is_offered_to_take_tell(
    answer: int,
) -> None:
    """A message a handler returns for no local agent (a ring's next hop across
    ``--workers``) is offered to ``take_tell`` as a send's is: taken ones never reach
    ``deliver``, one not taken does; every one counted accepted and forwarded once, in
    the order handled, none dead-lettered; one taken with 2 lets another task run before
    the agent's next message (taken with 1: none runs in between)."""
    transport = Taking(answer)
    between: list[int] = []
    async with open_kernel(make_config()) as kernel:
        kernel.attach_transport(transport)
        async with trio.open_nursery() as nursery:

            @agent(name="relay")
            async def relay(ctx: Context, msg: Message) -> Message:
                async def other() -> None:
                    between.append(len(transport.taken) + len(transport.delivered))

                nursery.start_soon(other)
                return Message(sender=ctx.id, to="elsewhere", payload=msg.payload)

            ref = kernel.spawn(relay)
            before = kernel.stats()
            for i in range(32):
                kernel.send_nowait(ref, i)
            await trio.testing.wait_all_tasks_blocked()
        stats = kernel.stats()
    assert transport.taken + transport.delivered == list(range(32))
    assert len(transport.delivered) == (32 if answer == 0 else 0)
    assert stats.forwarded - before.forwarded == 32
    assert stats.dead_lettered == before.dead_lettered
    assert stats.accepted - before.accepted == 32 + 32
    assert stats.handled - before.handled == 32
    # (how many were taken when each other task ran)
    if answer == 2:
        assert min(between) < 32
    else:
        # all 32 handled in one run of the agent: the others ran after it
        assert between == [32] * 32


async def test_a_handlers_returned_tell_the_transport_refuses_to_take_is_dead_lettered() -> None:
    """``take_tell`` raising MessageFailed for a handler's returned message: dead-lettered
    with the transport's reason and detail, as a refusal from ``deliver`` is, not
    forwarded, and the agent goes on with its next message."""
    refusal = MessageFailed("message to elsewhere: not JSON", reason=DeadLetterReason.MALFORMED)
    async with open_kernel(make_config()) as kernel:
        kernel.attach_transport(Taking(1, refusal))

        @agent(name="relay")
        async def relay(ctx: Context, msg: Message) -> Message:
            return Message(sender=ctx.id, to="elsewhere", payload=msg.payload)

        ref = kernel.spawn(relay)
        for i in range(3):
            await kernel.send(ref, i)
        await trio.testing.wait_all_tasks_blocked()
        stats = kernel.stats()
        dead = kernel.recent_dead_letters()
    assert stats.forwarded == 0
    assert stats.handled == 3
    assert [(d.reason, d.message.payload) for d in dead] == [
        (DeadLetterReason.MALFORMED, i) for i in range(3)
    ]


#: lines of a run's bookkeeping after a message went into its mailbox, and of its count:
#: (function, line, at its nth run, messages taken)
_AFTER_THE_ENQUEUE = [
    ("deliver_from_remote_run", "if depth > mailbox.high_water:", 3, 3),
    # (the mailbox's high water is 1 from its first message: raised from the 2nd of the run)
    ("deliver_from_remote_run", "mailbox.raise_high_water(depth)", 2, 3),
    ("deliver_from_remote_run", "cell.received += 1", 3, 3),
    ("deliver_from_remote_run", "if cell.dormant:", 3, 3),
    ("deliver_from_remote_run", "self.heap.backlog(ledger.in_flight)", 1, 5),
]


@pytest.mark.parametrize(("function", "line", "nth", "taken"), _AFTER_THE_ENQUEUE)
async def test_a_fault_after_a_run_enqueued_a_message_counts_it_taken_once(
    autojump_clock: Any, function: str, line: str, nth: int, taken: int
) -> None:
    """Fault injection: a line of ``deliver_run_nowait``'s bookkeeping raises after a
    message went into its mailbox (the third message of five, or the count at the run's
    end). ``DeliveryRunFailed.taken`` counts every message in the mailbox, each counted
    accepted once and handled: the transport counts failed only those not taken. Before,
    the message being counted was in the mailbox and handled, yet said not taken (the
    transport counted it ``delivery_failed`` too), and a fault in the run's count raised
    past ``DeliveryRunFailed``, so that the transport counted the whole run failed."""
    from nexus_trio import _router
    from nexus_trio._router import DeliveryRunFailed
    from nexus_trio.testing import assert_conserved

    from .fault_lines import InjectedFault, fault_at

    got: list[int] = []

    @agent(name="sink", mailbox_capacity=100)
    async def sink(ctx: Context, msg: Message) -> None:
        got.append(msg.payload)

    async with open_kernel(make_config()) as kernel:
        handle = kernel.attach_transport(Capture())
        ref = kernel.spawn(sink)
        sender = uuid.uuid4()
        assert handle.deliver_nowait(Message(sender, "sink", 0))  # opens its channel
        await trio.testing.wait_all_tasks_blocked()
        accepted = kernel.stats().accepted
        run = [Message(sender, "sink", i) for i in range(1, 6)]
        with (
            fault_at(_router, function, line, nth) as fired,
            pytest.raises(DeliveryRunFailed) as raised,
        ):
            handle.deliver_run_nowait(run, 0)
        assert fired
        assert isinstance(raised.value.__cause__, InjectedFault)
        assert raised.value.taken == taken
        assert kernel.mailbox_depth(ref.id) == taken
        assert kernel.stats().accepted == accepted + taken
        await trio.testing.wait_all_tasks_blocked()
        assert got == list(range(taken + 1))
        assert_conserved(kernel)


async def test_a_detached_transports_at_close_is_called_once_when_its_left_is_let_go(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``detach_transport(left, at_close=...)``: ``at_close`` is called once, when no
    tell can reach ``left`` any more: at the next attach (or detach), or as the kernel
    closes, after its shutdown (a transport says there what its throttled lines about
    those tells held back); one that raises is logged, and the kernel closes all the
    same."""
    calls: list[str] = []

    def at_close(what: str) -> Any:
        def call() -> None:
            calls.append(what)
            if what == "raises":
                raise RuntimeError("at_close failed")

        return call

    async with open_kernel(make_config()) as kernel:
        kernel.attach_transport(_Nowhere())
        kernel.detach_transport(lambda msg: "left", at_close=at_close("first"))
        assert calls == []
        kernel.attach_transport(_Nowhere())  # let go of the first's left
        assert calls == ["first"]
        kernel.detach_transport(at_close=at_close("second"))
        kernel.detach_transport(at_close=at_close("third"))  # replaces the second
        assert calls == ["first", "second"]
        handle = kernel.attach_transport(_Nowhere())
        handle.detach(at_close=at_close("raises"))
        assert calls == ["first", "second", "third"]
    assert calls == ["first", "second", "third", "raises"]
    raised = [r for r in caplog.records if r.exc_info and "at_close" in r.getMessage()]
    assert len(raised) == 1 and str(raised[0].exc_info[1]) == "at_close failed"


async def test_tells_and_requests_a_detached_transports_left_takes_stay_in_the_metrics() -> None:
    """Regression: a cluster counted the tells and requests sent after its leave
    (``tells_after_leave``, ``requests_after_leave``), but its series leave ``/metrics``
    with it, and those counts came after: not in any series. The kernel counts what a
    detached transport's ``left`` takes (``stats().tells_after_detach``,
    ``requests_after_detach``) and exports it in its own series."""
    from prometheus_client import generate_latest

    from nexus_trio import AgentNotFound, TransportUnavailable
    from nexus_trio.metrics import build_registry

    async with open_kernel(make_config()) as kernel:
        kernel.detach_transport(lambda msg: "left" if msg.to == "far" else None)
        await kernel.send("far", 1)
        await kernel.send("far", 2)
        with pytest.raises(TransportUnavailable):
            await kernel.request("far", 3, timeout=1.0)
        with pytest.raises(AgentNotFound):
            await kernel.send("nowhere", 4)  # (not the left cluster's: not counted)
        stats = kernel.stats()
        assert (stats.tells_after_detach, stats.requests_after_detach) == (2, 1)
        assert stats.dead_letters_by_reason["transport_unavailable"] == 2
        assert dict(stats.rejected) == {"no_such_agent": 1}  # ("nowhere" only)
        text = generate_latest(build_registry(kernel, process=False)).decode()
        assert "\nnexus_tells_after_detach_total 2.0\n" in text
        assert "\nnexus_requests_after_detach_total 1.0\n" in text


class _StopsTold(_Nowhere):
    """A transport told of each ``kernel.stop`` (``StopsTold``) that takes a while over
    it, without shielding itself from the caller's cancel (``seconds``), or raises."""

    def __init__(self, seconds: float, error: Exception | None = None) -> None:
        self.seconds = seconds
        self.error = error
        self.told: list[str | None] = []

    async def agent_stopping(self, agent_id: uuid.UUID, name: str | None) -> None:
        self.told.append(name)
        await trio.sleep(self.seconds)
        if self.error is not None:
            raise self.error


@pytest.mark.parametrize("how", ["cancelled", "raises"])
async def test_a_stop_whose_agent_stopping_is_cancelled_or_raises_still_stops_the_agent(
    autojump_clock: Any, how: str
) -> None:
    """The kernel awaits ``agent_stopping`` (``StopsTold``) after the agent left the
    routing table and before its stop begins. A caller cancelled there (a
    ``move_on_after`` around ``kernel.stop``), or a transport that raises, still has the
    agent stopped (its ``on_stop`` run, its ``stopped`` event, gone from ``agents()``),
    as a cancel after the stop began has: before the fifty-third pass's review the
    agent ran on, out of the routing table (every send refused, 'being stopped') and
    never stopped."""
    stopped: list[str] = []

    class Held(Agent):
        async def handle(self, ctx: Context, msg: Message) -> None:
            return None

        async def on_stop(self, ctx: Context) -> None:
            stopped.append("on_stop")

    # (one that raises does so within the agent's shutdown_timeout, 5 s: past it, the
    # call is cancelled, see the test below)
    transport = (
        _StopsTold(10.0) if how == "cancelled" else _StopsTold(1.0, RuntimeError("told badly"))
    )
    async with open_kernel(make_config()) as kernel:
        kernel.attach_transport(transport)
        ref = kernel.spawn(Held, name="held")
        await kernel.send(ref, "wake")  # (a lazy agent's run starts with its first message)
        await trio.testing.wait_all_tasks_blocked()
        if how == "cancelled":
            with trio.move_on_after(1.0) as scope:
                await kernel.stop(ref)
            assert scope.cancelled_caught
        else:
            with pytest.raises(RuntimeError, match="told badly"):
                await kernel.stop(ref)
        await trio.testing.wait_all_tasks_blocked()
        assert transport.told == ["held"]
        assert stopped == ["on_stop"]
        assert kernel.agents() == []
        kernel.detach_transport()


async def test_a_stop_whose_caller_gives_up_while_the_transport_hears_of_it_still_stops(
    autojump_clock: Any,
) -> None:
    """``agent_stopping`` (``StopsTold``, optional) is awaited before the stop begins,
    the agent already out of the routing table. A transport that waits there without a
    shield of its own (the NATS cluster has one) and a caller that gives up meanwhile:
    until the fifty-third pass the cancel ended the stop there, and the agent ran on,
    unrouted (a send to it went to the transport), never stopped; a stop whose caller
    gives up goes on (kernel.md), so the kernel shields the call itself."""
    told: list[tuple[uuid.UUID, str | None]] = []

    class Telling(_Nowhere):
        async def agent_stopping(self, agent_id: uuid.UUID, name: str | None) -> None:
            told.append((agent_id, name))
            await trio.sleep(1)

    stopped: list[str] = []

    class Quiet(Agent):
        async def handle(self, ctx: Context, msg: Message) -> None:
            await trio.sleep(5)

        async def on_stop(self, ctx: Context) -> None:
            stopped.append(ctx.name or "?")

    async with open_kernel(make_config()) as kernel:
        kernel.attach_transport(Telling())
        ref = kernel.spawn(AgentSpec(factory=Quiet, name="w"))
        for payload in ("a", "b"):
            await kernel.send("w", payload)
        with trio.move_on_after(0.5) as gave_up:
            await kernel.stop("w")
        assert gave_up.cancelled_caught
        assert told == [(ref.id, "w")]
        await trio.sleep(10)
        assert stopped == ["w"]
        assert [r.name for r in kernel.agents()] == []
        with pytest.raises(AgentNotFound, match="it was stopped for good by kernel"):
            await kernel.stop("w")
        letters = [(d.message.payload, d.reason) for d in kernel.recent_dead_letters()]
        assert letters == [("b", DeadLetterReason.AGENT_STOPPED)]
        kernel.detach_transport()
    assert told == [(ref.id, "w")]


class _EndsTold(_Nowhere):
    """A transport told of each agent that ends for good (``StopsTold``), which takes a
    second over it and then notes it in ``seen`` (with the agents' ``on_stop`` and
    ``stopped`` events)."""

    def __init__(self, seen: list[str]) -> None:
        self.seen = seen

    async def agent_stopping(self, agent_id: uuid.UUID, name: str | None) -> None:
        await trio.sleep(1.0)
        self.seen.append(f"told {name}")


@pytest.mark.parametrize(
    ("restart", "on_error", "how", "expected"),
    [
        # decided whatever on_stop does: told before it
        ("temporary", "restart", "raise", ["told end", "on_stop end", "stopped end"]),
        ("temporary", "restart", "ctx.stop", ["told end", "on_stop end", "stopped end"]),
        ("permanent", "stop", "raise", ["told end", "on_stop end", "stopped end"]),
        # a transient's normal exit: decided once its on_stop returned
        ("transient", "restart", "ctx.stop", ["on_stop end", "told end", "stopped end"]),
        # restarted: not told
        ("transient", "restart", "raise", ["on_stop end"]),
        ("permanent", "restart", "ctx.stop", ["on_stop end"]),
    ],
)
async def test_an_agent_that_ends_by_itself_for_good_is_told_to_the_transport_before_it_stops(
    autojump_clock: Any, restart: str, on_error: str, how: str, expected: list[str]
) -> None:
    """Fifty-third pass: an agent whose run ends by itself for good (a ``temporary`` one
    that raises or calls ``ctx.stop()``, a handler's directive ``stop``, a ``transient``
    one's normal exit) is told to the transport's ``agent_stopping`` as ``kernel.stop``
    is, before its ``on_stop`` where its end is decided without it, and in any case
    before its ``stopped`` event (the NATS cluster drops a placed agent's record there:
    dropped after the agent had stopped, a SIGKILL in between had it re-placed). One
    that is restarted is not told; nor an unnamed one (no call at all)."""
    seen: list[str] = []

    class Ending(Agent):
        async def handle(self, ctx: Context, msg: Message) -> None:
            if msg.payload == "end":
                if how == "raise":
                    raise RuntimeError("ends")
                ctx.stop()

        async def on_stop(self, ctx: Context) -> None:
            seen.append(f"on_stop {ctx.name}")

    async def follow(events: Any) -> None:
        async for event in events:
            if event.kind is EventKind.STOPPED:
                seen.append(f"stopped {event.name}")

    spec = agent(Ending, restart=restart, on_error=on_error)
    async with open_kernel(make_config()) as kernel, trio.open_nursery() as nursery:
        kernel.attach_transport(_EndsTold(seen))
        async with kernel.events() as events:
            nursery.start_soon(follow, events)
            ref = kernel.spawn(spec, name="end")
            unnamed = kernel.spawn(spec)
            for target in (ref, unnamed):
                await kernel.send(target, "end")
            await trio.sleep(5.0)  # (a told agent's stop waits a second: MockClock)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        assert [s for s in seen if s.endswith(" end")] == expected
        assert "told None" not in seen  # (unnamed: no call)
        assert "on_stop None" in seen
        assert ("end" in [a.name for a in kernel.agents()]) is (len(expected) == 1)
        kernel.detach_transport()


async def test_an_agent_that_ends_for_good_whose_agent_stopping_raises_still_stops(
    autojump_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A transport whose ``agent_stopping`` raises as a ``temporary`` agent's run ends by
    itself (told from the run, before its ``on_stop``): the error is logged, naming the
    agent, and the agent stops all the same (its ``on_stop`` runs, it is gone from
    ``agents()``)."""
    stopped: list[str] = []

    class Ending(Agent):
        async def handle(self, ctx: Context, msg: Message) -> None:
            ctx.stop()

        async def on_stop(self, ctx: Context) -> None:
            stopped.append("on_stop")

    transport = _StopsTold(1.0, RuntimeError("told badly"))
    async with open_kernel(make_config()) as kernel:
        kernel.attach_transport(transport)
        ref = kernel.spawn(agent(Ending, restart="temporary"), name="ending")
        await kernel.send(ref, "end")
        await trio.sleep(5.0)
        assert transport.told == ["ending"]
        assert stopped == ["on_stop"]
        assert kernel.agents() == []
        kernel.detach_transport()
    said = [r for r in caplog.records if "agent_stopping raised" in r.getMessage()]
    assert [r.getMessage() for r in said] == [
        "agent ending: the transport's agent_stopping raised; it stops all the same"
    ]


async def test_an_agent_that_ends_for_good_whose_agent_stopping_hangs_stops_within_its_timeout(
    autojump_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A transport whose ``agent_stopping`` does not return (a third-party one that waits
    on a peer gone silent; the protocol asks it not to wait long) as a ``temporary``
    agent's run ends by itself: the call is bounded by the agent's ``shutdown_timeout``
    as its ``on_stop`` is, said in a WARNING line, and the agent stops all the same.
    Until the review of the fifty-third pass the shielded call held the run's end for
    as long as the transport did (here 10,000 s: the agent's ``on_stop`` ran then, and
    the kernel's shutdown waited for it, its stop's cancel shielded off)."""
    stopped: list[float] = []

    class Ending(Agent):
        async def handle(self, ctx: Context, msg: Message) -> None:
            ctx.stop()

        async def on_stop(self, ctx: Context) -> None:
            stopped.append(trio.current_time())

    transport = _StopsTold(10_000.0)
    async with open_kernel(make_config()) as kernel:
        kernel.attach_transport(transport)
        start = trio.current_time()
        ref = kernel.spawn(agent(Ending, restart="temporary", shutdown_timeout=2.0), name="ending")
        await kernel.send(ref, "end")
        await trio.sleep(5.0)
        assert transport.told == ["ending"]
        assert [t - start for t in stopped] == [pytest.approx(2.0)]
        assert kernel.agents() == []
        kernel.detach_transport()
    assert trio.current_time() - start < 100
    said = [r for r in caplog.records if "agent_stopping did not return" in r.getMessage()]
    assert [(r.levelname, r.getMessage()) for r in said] == [
        (
            "WARNING",
            "agent ending: the transport's agent_stopping did not return within its"
            " shutdown_timeout (2s): cancelled; it stops all the same",
        )
    ]


async def test_a_stop_whose_agent_stopping_hangs_goes_on_after_the_agent_s_shutdown_timeout(
    autojump_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """``kernel.stop`` shields the transport's ``agent_stopping`` from its caller's cancel
    (the agent is unrouted already), bounded by the agent's ``shutdown_timeout``: a
    transport that does not return is cancelled then (a WARNING line), the stop goes on,
    and a caller that gave up (``move_on_after(1)``) has its call back then. Until the
    review of the fifty-third pass the shield had no deadline: the caller's
    ``move_on_after(1)`` came back at 10,000 s, when the transport did, and the agent's
    stop (its ``on_stop``) waited as long."""
    stopped: list[float] = []

    class Held(Agent):
        async def handle(self, ctx: Context, msg: Message) -> None:
            return None

        async def on_stop(self, ctx: Context) -> None:
            stopped.append(trio.current_time())

    transport = _StopsTold(10_000.0)
    async with open_kernel(make_config()) as kernel:
        kernel.attach_transport(transport)
        ref = kernel.spawn(agent(Held, shutdown_timeout=2.0), name="held")
        await kernel.send(ref, "wake")
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
        with trio.move_on_after(1.0) as gave_up:
            await kernel.stop(ref)
        assert gave_up.cancelled_caught
        assert trio.current_time() - start == pytest.approx(2.0)
        await trio.testing.wait_all_tasks_blocked()
        assert transport.told == ["held"]
        assert [t - start for t in stopped] == [pytest.approx(2.0)]
        assert kernel.agents() == []
        kernel.detach_transport()
    said = [r for r in caplog.records if "agent_stopping did not return" in r.getMessage()]
    assert [(r.levelname, r.getMessage()) for r in said] == [
        (
            "WARNING",
            "stop of held: the transport's agent_stopping did not return within its"
            " shutdown_timeout (2s): cancelled; the stop goes on",
        )
    ]
