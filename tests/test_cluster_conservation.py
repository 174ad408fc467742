"""Cluster-wide conservation under membership churn, over a real nats-server (issue 14).

Three kernels in three processes (``tests.placement_node``) stream tells and requests
from every node to 24 placed agents, at a steady rate, while a fault happens: a node
paused (SIGSTOP) past its loss judgement and resumed, the nats-server restarted with a
fresh store, a node joining while another leaves cleanly or is SIGKILLed. Each node
writes a ledger line per streamed tell handled or dead-lettered there, as it happens
(it survives a SIGKILL). Once the cluster is quiet, the books are summed over the
nodes: every tell a ``send`` accepted is handled, dead-lettered with a reason, or
counted by the NATS layer (``inbound_dropped``, ``lost_in_transit``,
``lost_with_nodes``, ``publish_failures``, ``lost_at_leave``): see docs/distributed.md,
"What a node counts". Every request ends once, answered or failed.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest
import trio

from nexus_trio._nats import NatsServer

from .nats_server import nats_cluster
from .placement_node import Node, pause_past_loss, read_ledger, stopped_at_end, until

#: the reasons of ``inbound_dropped`` that count replies and error frames, not tells
REPLY_REASONS = ("unroutable_reply", "late_error", "unroutable_error", "unrelayable_reply")
NAMES = [f"kept-{i}" for i in range(24)]


async def _start(
    url: str, names: list[str], ledgers: Path, handle_delay: float = 0.0
) -> list[Node]:
    nodes = [Node(url, name, ledger=ledgers / name) for name in names]
    for node in nodes:
        await node.start()
        await node.call("no_acks")
        await node.call("slow_handlers", delay=handle_delay)
    for node in nodes:
        assert await node.call("wait_live", count=len(names), timeout=40) == sorted(names)
    return nodes


def _handled(ledgers: Path) -> int:
    return sum(
        count
        for path in ledgers.iterdir()
        for line, count in read_ledger(path).items()
        if line.startswith("H ")
    )


class Books:
    """The streams' outcomes and every node's counts, summed."""

    def __init__(self) -> None:
        self.accepted = 0
        self.refused: dict[str, int] = {}
        self.requests: dict[str, Any] = {"sent": 0, "answered": 0, "failed": {}}
        #: the last cluster stats of each node (a node that left or was killed: as last read)
        self.stats: dict[str, dict[str, Any]] = {}

    def counted(self, ledgers: Path) -> dict[str, Any]:
        handled = dead = 0
        dead_by: dict[str, int] = {}
        for path in ledgers.iterdir():
            for line, count in read_ledger(path).items():
                if line.startswith("H "):
                    handled += count
                else:
                    dead += count
                    reason = line.split()[2]
                    dead_by[reason] = dead_by.get(reason, 0) + count
        lost: dict[str, int] = {}
        for stats in self.stats.values():
            for reason, count in stats["inbound_dropped"].items():
                if reason not in REPLY_REASONS:
                    lost[f"dropped_{reason}"] = lost.get(f"dropped_{reason}", 0) + count
            for key in ("lost_in_transit", "lost_with_nodes", "publish_failures", "lost_at_leave"):
                lost[key] = lost.get(key, 0) + stats[key]
        return {
            "by_node": {
                node: {
                    k: stats[k]
                    for k in (
                        "lost_with_nodes_by_node",
                        "lost_with_nodes_taken_back",
                        "lost_in_transit",
                    )
                }
                for node, stats in self.stats.items()
            },
            "accepted": self.accepted,
            "handled": handled,
            "dead": dead_by,
            "lost": {k: v for k, v in lost.items() if v},
            "unaccounted": self.accepted - handled - dead - sum(lost.values()),
        }


async def _streams(nodes: list[Node], count: int, asks: int) -> list[tuple[Node, int, int]]:
    started = []
    for node in nodes:
        tells = await node.call("stream", to=NAMES, count=count, batch=20, pause=0.02, why=True)
        requests = await node.call("ask_stream", to=NAMES, count=asks, pause=0.02)
        started.append((node, tells, requests))
    return started


def _add(into: dict[str, int], counts: dict[str, int]) -> None:
    for kind, n in counts.items():
        into[kind] = into.get(kind, 0) + n


def _took(books: Books, result: dict[str, Any], asked: dict[str, Any]) -> None:
    books.accepted += result["accepted"]
    _add(books.refused, result["refused_by"])
    books.requests["sent"] += asked["sent"]
    books.requests["answered"] += asked["answered"]
    _add(books.requests["failed"], asked["failed"])


async def _ended(books: Books, started: list[tuple[Node, int, int]]) -> None:
    for node, tells, requests in started:
        result = await node.call("stream_result", stream=tells, timeout=90)
        asked = await node.call("stream_result", stream=requests, timeout=90)
        _took(books, result, asked)


async def _quiet(books: Books, nodes: list[Node], ledgers: Path) -> dict[str, Any]:
    """The books once they stop moving (every count read twice, 0.5 s apart, alike)."""
    last: dict[str, Any] = {}

    async def still() -> bool:
        nonlocal last
        for node in nodes:
            books.stats[node.node] = await node.call("stats")
        now = books.counted(ledgers)
        same = now == last
        last = now
        return same and now["unaccounted"] <= 0

    with contextlib.suppress(trio.TooSlowError):  # (then asserted as they are)
        with trio.fail_after(20):
            while True:
                if await still():
                    break
                await trio.sleep(0.5)
    return last


async def _settled(
    books: Books, nodes: list[Node], started: list[tuple[Node, int, int]], ledgers: Path
) -> dict[str, Any]:
    """Once every node hears three members and every stream ended: the books, quiet;
    every request ended once (answered, or failed)."""
    for node in nodes:
        await node.call("wait_live", count=3, timeout=40)
    await _ended(books, started)
    counted = await _quiet(books, nodes, ledgers)
    requests = books.requests
    assert requests["sent"] == requests["answered"] + sum(requests["failed"].values()), requests
    return counted


@pytest.mark.trio
async def test_tells_and_requests_conserved_across_a_node_paused_past_its_loss(
    tmp_path: Path,
) -> None:
    """(a) c paused (SIGSTOP) while every node streams to the 24 agents, until a and b
    judged it lost and re-placed its agents, then resumed (SIGCONT). Each tell takes a
    counter 4 ms (here and in ``_churn``): c's old copies hold tells when it stops them
    as duplicates, dead-lettered ``agent_stopped`` there (1,216 of 17,983 in a run), and
    what c held at its last heartbeat, counted lost by a survivor, is taken back."""
    with nats_cluster() as servers:
        async with stopped_at_end() as nodes:
            nodes += await _start(servers[0].url, ["a", "b", "c"], tmp_path, handle_delay=0.004)
            a, b, c = nodes
            placed = await a.call("spawn_each", type="counter", names=NAMES, timeout=60)
            on_c = [n for n in NAMES if placed[n][0] == "c"]
            books = Books()
            started = await _streams(nodes, count=6000, asks=300)
            await until(lambda: trio.to_thread.run_sync(lambda: _handled(tmp_path) >= 600))
            await pause_past_loss(c, [a, b], len(on_c))
            counted = await _settled(books, nodes, started, tmp_path)
            assert counted["unaccounted"] == 0, counted


@pytest.mark.trio
async def test_tells_and_requests_conserved_across_a_server_restarted_with_a_fresh_store(
    tmp_path: Path,
) -> None:
    """(b) the nats-server killed while every node streams to the 24 agents, and started
    again on its port 4 s later without its store (its buckets gone). What the server
    held is lost: counted by the receivers as gaps (``lost_in_transit``); what each node
    counted lost with the others while it could not hear them is taken back once it
    hears them again. Before the fifty-second pass's fix, what a node held, counted by
    a node that judged it lost in the same check as another, was never taken back (1
    run in 4: unaccounted -7, ``lost_with_nodes_by_node`` {'c': 7} on b; see
    ``test_what_a_node_lost_in_the_same_check_held_is_taken_back_when_it_is_heard_again``)."""
    server = NatsServer().start()
    port = server.port
    restarted: list[NatsServer] = []
    try:
        async with stopped_at_end() as nodes:
            # (each tell takes a counter 2 ms: its mailbox holds some at each heartbeat,
            # which a node's loss counts as held there)
            nodes += await _start(server.url, ["a", "b", "c"], tmp_path, handle_delay=0.002)
            a, _, _ = nodes
            placed = await a.call("spawn_each", type="counter", names=NAMES, timeout=60)
            assert all(isinstance(placed[n], list) for n in NAMES), placed
            books = Books()
            started = await _streams(nodes, count=10000, asks=300)
            await until(lambda: trio.to_thread.run_sync(lambda: _handled(tmp_path) >= 1500))
            server.kill()
            # the outage, past the loss window (2 s): every node judges the others lost
            # in one check, then hears them again
            await trio.sleep(4.0)
            restarted.append(await trio.to_thread.run_sync(NatsServer(port=port).start))
            counted = await _settled(books, nodes, started, tmp_path)
            assert counted["unaccounted"] == 0, counted
    finally:
        server.stop()
        for extra in restarted:
            extra.stop()


async def _churn(tmp_path: Path, servers: list[NatsServer], kill: bool) -> None:
    """a, b, c stream (c too, unless it is to be killed: a SIGKILLed sender's queued
    tells die with it, which no survivor can count); d joins and streams while c leaves
    cleanly or is SIGKILLed."""
    async with stopped_at_end() as nodes:
        nodes += await _start(servers[0].url, ["a", "b", "c"], tmp_path, handle_delay=0.004)
        a, b, c = nodes
        placed = await a.call("spawn_each", type="counter", names=NAMES, timeout=60)
        assert all(isinstance(placed[n], list) for n in NAMES), placed
        books = Books()
        started = await _streams([a, b] if kill else nodes, count=6000, asks=300)
        await until(lambda: trio.to_thread.run_sync(lambda: _handled(tmp_path) >= 1500))
        d = Node(servers[0].url, "d", ledger=tmp_path / "d")
        final: dict[str, Any] = {}
        before: dict[str, int] = {}

        async def join() -> None:
            await d.start()
            nodes.append(d)
            await d.call("no_acks")
            started.extend(await _streams([d], count=3000, asks=150))

        async def leave() -> None:
            if kill:
                # what c handled in its last second: the bound of what its loss counts
                # twice (its heartbeat every 0.2 s: what it handled after the last one
                # is counted lost too, docs/distributed.md, "When a member is lost")
                before.update(read_ledger(tmp_path / "c"))
                await trio.sleep(1.0)
                c.kill()
                assert c.process is not None
                await c.process.wait()
            else:
                final.update(await c.leave())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(join)
            nursery.start_soon(leave)
        nodes.remove(c)
        started = [s for s in started if s[0] is not c]
        last_second = 0
        if kill:
            last_second = sum(read_ledger(tmp_path / "c").values()) - sum(before.values())
        else:
            tells, asks = final["streams"]
            _took(books, tells, asks)
            books.stats["c"] = final["cluster"]
        counted = await _settled(books, nodes, started, tmp_path)
        if kill:
            # nothing lost uncounted; counted twice at most what c handled after its
            # last heartbeat
            assert -last_second <= counted["unaccounted"] <= 0, (counted, last_second)
        else:
            assert counted["unaccounted"] == 0, counted


@pytest.mark.trio
async def test_a_request_a_clean_leave_cuts_in_flight_is_counted_as_ended(
    tmp_path: Path, nats: NatsServer
) -> None:
    """The books take the requests of a node that left cleanly from its last line: one
    its leave cut in flight (the end of its commands cancels its streams) was counted
    sent and never ended, and "every request ends once" failed with one request over
    (the churn test's ``leaves`` case, at load ~22: sent 761, answered 521, failed
    239). It is counted ended, as ``Cancelled``. Here the request waits behind a tell
    the counter takes 5 s over, so the leave comes while it is in flight."""
    async with stopped_at_end() as nodes:
        nodes += await _start(nats.url, ["a"], tmp_path, handle_delay=5.0)
        (a,) = nodes
        placed = await a.call("spawn_each", type="counter", names=["kept-0"], timeout=60)
        assert placed["kept-0"][0] == "a"
        await a.call("stream", to=["kept-0"], count=1)
        asks = await a.call("ask_stream", to=["kept-0"], count=1, timeout=60)
        final = await a.leave()
    assert final["streams"][asks] == {"sent": 1, "answered": 0, "failed": {"Cancelled": 1}}


@pytest.mark.trio
@pytest.mark.parametrize("kill", [False, True], ids=["leaves", "killed"])
async def test_tells_and_requests_conserved_as_a_node_joins_while_another_leaves_or_is_killed(
    tmp_path: Path, kill: bool
) -> None:
    """(c) d joins while c leaves cleanly, every node streaming; (d) d joins while c is
    SIGKILLed, a, b and d streaming."""
    with nats_cluster() as servers:
        await _churn(tmp_path, servers, kill=kill)
