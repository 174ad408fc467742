"""Chaos for the cluster: kernels joined over a real nats-server, a drawn program, books.

``test_cluster_chaos_programs_keep_their_books`` draws a program against two or three
kernels in one process (one ``trio.run``, real time: nats-py runs on asyncio loops that
trio-asyncio hosts), each joined to one real nats-server with the patient failure
detector (``PATIENT``). Each node hosts agents: plain ones, named ones with a small
mailbox that handle slowly, ones that raise, and agents placed in the cluster
(``cluster.spawn``, by hash or pinned). Every agent does what each message asks: answer,
raise, sleep, route the message (a tell or a query, as a router agent does) to an agent
of another node, tell or ask one. The program sends tells and requests from every node,
by name and by ref (a ref of another kernel in the same process is ``AgentNotFound``:
the kernels share an id prefix, see docs/distributed.md, "Limits"), ``send_nowait`` into
full remote mailboxes, requests with short timeouts (remote cancellation) and requests
whose caller is cancelled; steps run inline or concurrently. At random points an agent
is stopped, an agent is placed, a node leaves: its kernel shuts down inside the cluster
block (also twice at once), or the cluster block is left with the kernel running, or
the node's whole block is cancelled from outside. A node that leaves takes its placed
agents with it (a clean leave is not a failure: nothing is re-placed). Whatever the
program:

* every node's block ends within a real-time bound, and no task is left;
* every kernel's books balance (``assert_conserved``, midway and at the end, nothing in
  flight after shutdown), and every dead letter is counted under its reason;
* cluster-wide, every tell a ``send`` accepted (from the program or from a handler) is
  handled once, or dead-lettered once on some node, or counted lost by the NATS layer
  (``inbound_dropped``, ``lost_in_transit``, ``publish_failures``, ``lost_at_leave``,
  ``lost_with_nodes``): none handled twice, none both handled and dead-lettered, none
  unaccounted, and none of the tells whose ``send`` raised is handled anywhere;
* every request ends once: its answer, or a documented error (``RequestTimeout``,
  ``RequestFailed``, ``AgentNotFound``, ``MailboxFull``, ``TransportUnavailable``,
  ``KernelShuttingDown``), or cancelled with its caller.

``NEXUS_CHAOS_SCALE=N`` multiplies the number of examples (to hunt locally).
"""

from __future__ import annotations

import itertools
import os
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import suppress
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from nexus_trio import (
    AgentNotFound,
    AgentRef,
    Config,
    Context,
    KernelConfig,
    KernelShuttingDown,
    MailboxFull,
    Message,
    MessageKind,
    NameTaken,
    RequestFailed,
    RequestTimeout,
    SupervisionConfig,
    TransportUnavailable,
    agent,
    open_kernel,
)
from nexus_trio._nats import (
    Cluster,
    NatsServer,
    PlacementFailed,
    UnknownAgentType,
    join_cluster,
)
from nexus_trio.testing import assert_conserved

from .hang_guard import fault_settings, real_time_limit, tasks_living
from .nats_server import PATIENT, nats_cluster

SCALE = int(os.environ.get("NEXUS_CHAOS_SCALE", "1"))

#: what a request may end with, besides its answer
DOCUMENTED = (
    RequestTimeout,
    RequestFailed,
    AgentNotFound,
    MailboxFull,
    TransportUnavailable,
    KernelShuttingDown,
)
#: what a tell's send may raise (the message not accepted)
SEND_ERRORS = (AgentNotFound, MailboxFull, TransportUnavailable, KernelShuttingDown)
#: what placing an agent may raise
PLACE_ERRORS = (
    NameTaken,
    PlacementFailed,
    UnknownAgentType,
    TransportUnavailable,
    AgentNotFound,
    KernelShuttingDown,
)
#: the reasons of ``inbound_dropped`` that count tells (the others count replies, error
#: frames, notices and malformed input, which a program of live kernels never sends)
TELL_DROPS = ("no_such_agent", "mailbox_full", "shutting_down", "inbox_full")
NODES = ("a", "b", "c")
#: patient (see tests/nats_server.py); a small node window, so that tells to a slow
#: agent fill it (``send`` waits, then ``MailboxFull``; ``send_nowait`` raises at once);
#: a leave waits less for notices than by default
OPTIONS = attrs.evolve(PATIENT, node_window=8, notice_wait_at_leave=1.0)
REAL_LIMIT = 60
_prefixes = itertools.count()


def _config() -> Config:
    return Config(
        kernel=KernelConfig(
            request_timeout_ms=2000,
            send_timeout_ms=500,
            shutdown_grace_ms=1000,
            dead_letter_buffer=100_000,
        ),
        supervision=SupervisionConfig(max_restarts=1000, backoff_initial_ms=0, backoff_max_ms=0),
    )


# --- the program ---------------------------------------------------------------------------

targets = st.integers(0, 31)
simple_actions = st.one_of(
    st.just(("ok",)),
    st.just(("ok",)),
    st.just(("raise",)),
    st.tuples(st.just("sleep"), st.sampled_from([0.001, 0.05, 0.3, 3.0])),
)
actions = st.one_of(
    simple_actions,
    st.tuples(st.just("route"), targets, simple_actions),
    st.tuples(st.just("tell"), targets),
    st.tuples(st.just("nowait"), targets),
    st.tuples(st.just("ask"), targets, st.sampled_from([0.05, 0.5, None])),
)
#: an agent of a node: kind, and whether it is placed in the cluster (by hash, pinned)
agent_kinds = st.sampled_from(["plain", "plain", "small", "raiser", "placed", "pinned"])
senders = st.integers(0, 2)
steps = st.one_of(
    # tells and requests from a node's driver, by name or by ref
    st.tuples(st.just("tell"), senders, targets, st.booleans(), actions),
    st.tuples(st.just("tell"), senders, targets, st.booleans(), actions),
    st.tuples(st.just("nowait"), senders, targets, st.integers(1, 20), actions),
    st.tuples(st.just("burst"), senders, targets, st.integers(1, 20), actions),
    st.tuples(
        st.just("request"),
        senders,
        targets,
        st.booleans(),
        actions,
        st.sampled_from([0.05, 0.3, 2.0, None]),
    ),
    st.tuples(st.just("request"), senders, targets, st.booleans(), actions, st.just(0.05)),
    st.tuples(st.just("abandon"), senders, targets, actions, st.sampled_from([0.01, 0.1])),
    st.tuples(st.just("stop"), senders, targets),
    st.tuples(st.just("place"), senders, st.booleans()),
    st.tuples(st.just("sleep"), st.sampled_from([0.0, 0.01, 0.05, 0.2])),
    st.just(("inspect",)),
    st.tuples(st.just("leave"), senders, st.sampled_from(["shutdown", "twice", "block", "cancel"])),
)
programs = st.tuples(
    st.integers(2, 3),
    st.lists(st.lists(agent_kinds, min_size=1, max_size=3), min_size=3, max_size=3),
    st.lists(st.tuples(steps, st.booleans()), min_size=8, max_size=30),
    st.sampled_from(["shutdown", "twice", "block", "cancel"]),
    st.booleans(),
)


# --- the run -------------------------------------------------------------------------------


@attrs.define
class Books:
    """What the program did, and what became of it, for the whole cluster."""

    tokens: Iterator[int] = attrs.field(factory=itertools.count)
    #: tell tokens a send accepted / refused with a documented error / whose sender was
    #: cancelled in the send (either may be)
    accepted: set[int] = attrs.field(factory=set)
    refused: set[int] = attrs.field(factory=set)
    unsure: set[int] = attrs.field(factory=set)
    #: tell tokens whose handler returned (routed ones are not: they went on)
    handled: Counter[int] = attrs.field(factory=Counter)
    #: request outcomes: "answered", an error's class name, "cancelled", or "unexpected ..."
    outcomes: list[str] = attrs.field(factory=list)
    requests_made: int = 0
    unexpected: list[str] = attrs.field(factory=list)


@attrs.define
class Node:
    name: str
    kernel: Any
    cluster: Cluster
    inbox: trio.MemorySendChannel[Any]
    scope: trio.CancelScope
    done: trio.Event = attrs.field(factory=trio.Event)
    leaving: bool = False


def _token_of(msg: Message) -> int | None:
    payload = msg.payload
    if isinstance(payload, (list, tuple)) and len(payload) == 2 and isinstance(payload[0], int):
        return payload[0]
    return None


async def _run_program(url: str, program: tuple[Any, ...]) -> None:
    size, kinds, plan, ending, concurrent_end = program
    prefix = f"cc{next(_prefixes)}"
    books = Books()
    names: list[str] = []  # every name an agent ever had (some stopped, some gone)
    refs: list[AgentRef] = []
    nodes: dict[str, Node] = {}
    kernels: dict[str, Any] = {}
    clusters: dict[str, Cluster] = {}
    placed_names = itertools.count()

    def target(index: int) -> str:
        return names[index % len(names)] if names else "nobody"

    def ref_or_name(index: int, by_ref: bool) -> Any:
        """A name, or a ref or id (an even or odd ``index``) of an agent spawned by name."""
        if by_ref and refs:
            ref = refs[index % len(refs)]
            return ref.id if index % 2 else ref
        return target(index)

    def message(action: tuple[Any, ...]) -> tuple[int, list[Any]]:
        token = next(books.tokens)
        return token, [token, list(action)]

    async def tell(sender: Any, to: Any, action: tuple[Any, ...], nowait: bool = False) -> None:
        token, payload = message(action)
        try:
            if nowait:
                sender.send_nowait(to, payload)
            else:
                await sender.send(to, payload)
        except SEND_ERRORS:
            books.refused.add(token)
        except trio.Cancelled:
            books.unsure.add(token)
            raise
        except Exception as exc:
            books.unsure.add(token)
            books.unexpected.append(f"send to {to!r} raised {exc!r}")
        else:
            books.accepted.add(token)

    async def ask(requester: Any, to: Any, action: tuple[Any, ...], timeout: float | None) -> None:
        books.requests_made += 1
        token, payload = message(action)
        try:
            answer = await requester.request(to, payload, timeout=timeout)
        except DOCUMENTED as exc:
            books.outcomes.append(type(exc).__name__)
        except trio.Cancelled:
            books.outcomes.append("cancelled")
            raise
        except Exception as exc:  # recorded: the property fails on it below
            books.outcomes.append(f"unexpected: {exc!r}")
        else:
            right = answer == ["answer", token]
            books.outcomes.append("answered" if right else f"unexpected answer {answer!r}")

    async def act(ctx: Context, msg: Message) -> Any:
        """What a message asks of its handler."""
        token = _token_of(msg)
        if token is None or msg.kind not in (MessageKind.COMMAND, MessageKind.QUERY):
            return None
        action = msg.payload[1]
        what = action[0]
        if what == "raise":
            raise RuntimeError(f"chaos {token}")
        if what == "sleep":
            await trio.sleep(action[1])
        elif what == "route":
            # sent on as it is (a query too, as a router agent does): not handled here
            return msg.evolve(to=target(action[1]), payload=[token, action[2]])
        elif what in ("tell", "nowait"):
            await tell(ctx, target(action[1]), ("ok",), nowait=what == "nowait")
        elif what == "ask":
            await ask(ctx, target(action[1]), ("ok",), action[2])
        if msg.kind is MessageKind.QUERY:
            return ["answer", token]
        books.handled[token] += 1
        return None

    async def probe(ctx: Context, msg: Message) -> Any:
        return await act(ctx, msg)

    async def slow(ctx: Context, msg: Message) -> Any:
        await trio.sleep(0.02)
        return await act(ctx, msg)

    async def raiser(ctx: Context, msg: Message) -> Any:
        token = _token_of(msg)
        if token is not None and token % 2:
            raise RuntimeError(f"raiser {token}")
        return await act(ctx, msg)

    probe_spec = agent(probe)

    async def place(node: Node, pinned: bool, where: str | None = None) -> None:
        name = f"placed{next(placed_names)}"
        pin = where if pinned else None
        try:
            placed = await node.cluster.spawn("probe", name=name, node=pin, timeout=3.0)
        except PLACE_ERRORS:
            return
        except Exception as exc:
            books.unexpected.append(f"placing {name} raised {exc!r}")
            return
        names.append(placed.name)

    async def run_step(node: Node, step: tuple[Any, ...]) -> None:
        kernel = node.kernel
        what = step[0]
        if what == "tell":
            _, _, index, by_ref, action = step
            await tell(kernel, ref_or_name(index, by_ref), action)
        elif what == "nowait":
            _, _, index, count, action = step
            for _ in range(count):
                await tell(kernel, target(index), action, nowait=True)
        elif what == "burst":
            _, _, index, count, action = step
            for _ in range(count):
                await tell(kernel, target(index), action)
        elif what == "request":
            _, _, index, by_ref, action, timeout = step
            await ask(kernel, ref_or_name(index, by_ref), action, timeout)
        elif what == "abandon":
            _, _, index, action, after = step
            with trio.move_on_after(after):
                await ask(kernel, target(index), action, 2.0)
        elif what == "stop":
            with suppress(AgentNotFound):
                name = target(step[2])
                if kernel.is_local(name):
                    await kernel.stop(name)
        elif what == "place":
            await place(node, step[2], node.name)
        elif what == "call":
            await step[1](node)

    async def leave(node: Node, how: str) -> None:
        """Make ``node`` leave the cluster ``how``; returns once it is gone."""
        if node.leaving:
            await node.done.wait()
            return
        node.leaving = True
        if how == "cancel":
            node.scope.cancel()
        else:
            node.inbox.send_nowait(("leave", how))
        await node.done.wait()

    async def serve(
        name: str, own: list[str], task_status: trio.TaskStatus[Node] = trio.TASK_STATUS_IGNORED
    ) -> None:
        send, receive = trio.open_memory_channel[Any](1000)
        how = "block"
        with trio.CancelScope() as scope:
            try:
                async with open_kernel(_config()) as kernel:
                    async with join_cluster(kernel, url, name, options=OPTIONS, prefix=prefix) as c:
                        c.register_type("probe", probe_spec)
                        kernels[name], clusters[name] = kernel, c
                        node = Node(name, kernel, c, send, scope)
                        nodes[name] = node
                        for i, kind in enumerate(own):
                            agent_name = f"{kind}{i}-{name}"
                            if kind == "plain":
                                refs.append(kernel.spawn(agent(probe, name=agent_name)))
                            elif kind == "small":
                                spec = agent(slow, name=agent_name, mailbox_capacity=1)
                                refs.append(kernel.spawn(spec))
                            elif kind == "raiser":
                                refs.append(kernel.spawn(agent(raiser, name=agent_name)))
                            else:
                                continue
                            names.append(agent_name)
                        await c.names_published()
                        task_status.started(node)
                        async with trio.open_nursery() as steps_nursery:
                            async for item in receive:
                                if item[0] == "leave":
                                    how = item[1]
                                    break
                                step, concurrently, finished = item
                                if concurrently:
                                    steps_nursery.start_soon(run_step, node, step)
                                    finished.set()
                                else:
                                    try:
                                        await run_step(node, step)
                                    finally:
                                        finished.set()
                            if how == "shutdown":
                                await kernel.shutdown()
                            elif how == "twice":
                                async with trio.open_nursery() as both:
                                    both.start_soon(kernel.shutdown)
                                    both.start_soon(kernel.shutdown)
                        if how in ("shutdown", "twice"):
                            assert kernel.stopped
                    if how == "block":
                        assert not kernel.stopped  # left the cluster, the kernel running
            finally:
                node_done = nodes.get(name)
                if node_done is not None:
                    node_done.leaving = True
                    node_done.done.set()

    async def inspect() -> None:
        with trio.move_on_after(2):
            await trio.testing.wait_all_tasks_blocked()
            for node in nodes.values():
                if not node.leaving:
                    assert_conserved(node.kernel)

    tasks_before = tasks_living()
    async with trio.open_nursery() as nursery:
        for i in range(size):
            await nursery.start(serve, NODES[i], kinds[i])
        # (cluster calls run in the node's driver: a task outside its join_cluster block
        # has no asyncio loop for the KV lookups)
        for node in nodes.values():
            await _run_on(node, ("call", _waiter(list(names))))
        # the placed agents: by hash, or pinned on the node that drew them
        for i in range(size):
            for kind in kinds[i]:
                if kind in ("placed", "pinned"):
                    await _run_on(nodes[NODES[i]], ("call", _placer(place, kind == "pinned")))
        for step, concurrently in plan:
            what = step[0]
            if what == "sleep":
                await trio.sleep(step[1])
            elif what == "inspect":
                await inspect()
            else:
                # (node a leaves at the end only: some traffic goes on to the end)
                index = step[1] % (size - 1) + 1 if what == "leave" else step[1] % size
                node = nodes.get(NODES[index])
                if node is None or node.leaving:
                    continue
                if what == "leave":
                    if concurrently:
                        nursery.start_soon(leave, node, step[2])
                    else:
                        await leave(node, step[2])
                else:
                    await _run_on(node, step, concurrently)
        # the end: the nodes left leave, one after the other or all at once
        async with trio.open_nursery() as ends:
            for node in list(nodes.values()):
                if concurrent_end:
                    ends.start_soon(leave, node, ending)
                else:
                    await leave(node, ending)
    assert tasks_living() == tasks_before, "a task was left behind"
    if os.environ.get("NEXUS_CHAOS_VERBOSE"):
        print(
            f"{size} nodes, {len(plan)} steps, names {names}: tells accepted"
            f" {len(books.accepted)}, refused {len(books.refused)}, handled"
            f" {len(books.handled)}; requests {Counter(books.outcomes)};"
            f" {[(k, v.stats().dead_letters_by_reason) for k, v in kernels.items()]}"
            f" {[_losses(c) for c in clusters.values()]}"
        )
    _check_books(books, kernels, clusters)


async def _run_on(node: Node, step: tuple[Any, ...], concurrently: bool = False) -> None:
    """Run ``step`` in ``node``'s driver (inside its cluster block: where its asyncio loop
    is) and wait until it ran (or started, if ``concurrently``), or the node is gone."""
    finished = trio.Event()
    node.inbox.send_nowait((step, concurrently, finished))
    async with trio.open_nursery() as either:

        async def wait(event: trio.Event) -> None:
            await event.wait()
            either.cancel_scope.cancel()

        either.start_soon(wait, finished)
        either.start_soon(wait, node.done)


def _waiter(names: list[str]) -> Any:
    async def call(node: Node) -> None:
        with trio.fail_after(10):
            for name in names:
                await node.cluster.wait_for_name(name)

    return call


def _placer(place: Any, pinned: bool) -> Any:
    async def call(node: Node) -> None:
        await place(node, pinned, node.name)

    return call


def _losses(cluster: Cluster) -> dict[str, Any]:
    """What ``cluster`` counted lost or refused, and its cancels (for a failure's text)."""
    s = cluster.stats()
    return {
        "node": s.node,
        "inbound_dropped": s.inbound_dropped,
        "lost_in_transit": s.lost_in_transit,
        "publish_failures": s.publish_failures,
        "lost_at_leave": s.lost_at_leave,
        "lost_with_nodes": s.lost_with_nodes,
        "errors_replied": s.errors_replied,
        "errors_unsent": s.errors_unsent,
        "cancels": (s.cancels_sent, s.cancels_received),
        "nodes_lost": s.nodes_lost,
    }


def _check_books(books: Books, kernels: dict[str, Any], clusters: dict[str, Cluster]) -> None:
    for kernel in kernels.values():
        assert kernel.stopped
        assert_conserved(kernel)
        stats = kernel.stats()
        assert stats.in_flight == 0
        assert sum(stats.dead_letters_by_reason.values()) == stats.dead_lettered
        assert len(kernel.recent_dead_letters()) == stats.dead_lettered
    dead: Counter[int] = Counter()
    for kernel in kernels.values():
        for letter in kernel.recent_dead_letters():
            token = _token_of(letter.message)
            if token is not None and letter.message.kind is MessageKind.COMMAND:
                dead[token] += 1
    twice = {t for t, n in (books.handled + dead).items() if n > 1}
    assert not twice, f"tells handled or dead-lettered more than once: {sorted(twice)}"
    ended = set(books.handled) | set(dead)
    assert not (ended & books.refused), (
        f"tells whose send raised were delivered: {sorted(ended & books.refused)}"
    )
    unaccounted = books.accepted - ended
    counted = 0
    for cluster in clusters.values():
        s = cluster.stats()
        counted += sum(s.inbound_dropped.get(reason, 0) for reason in TELL_DROPS)
        counted += s.lost_in_transit + s.publish_failures + s.lost_at_leave + s.lost_with_nodes
    assert len(unaccounted) <= counted, (
        f"{len(unaccounted)} accepted tells neither handled nor dead-lettered, but only"
        f" {counted} counted lost: {sorted(unaccounted)};"
        f" {[_losses(c) for c in clusters.values()]}"
    )
    assert not books.unexpected, books.unexpected
    wrong = [o for o in books.outcomes if o.startswith("unexpected")]
    assert not wrong, wrong
    assert len(books.outcomes) == books.requests_made, "a request neither ended nor raised"


@pytest.fixture(scope="module")
def shared_nats() -> Iterator[NatsServer]:
    """One server for the property's examples (each takes a prefix of its own)."""
    with nats_cluster(1) as servers:
        yield servers[0]


@fault_settings(30 * SCALE)
@given(program=programs)
def test_cluster_chaos_programs_keep_their_books(
    shared_nats: NatsServer, program: tuple[Any, ...]
) -> None:
    started = time.monotonic()
    with real_time_limit(REAL_LIMIT):
        trio.run(_run_program, shared_nats.url, program)
    assert time.monotonic() - started < REAL_LIMIT
