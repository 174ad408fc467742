"""A node's readiness (``/readyz``, ``nexus_ready``): a cluster adds its check to the
kernel's at the join (``nexus_trio.metrics.add_readiness``) and takes it out after the
leave: not ready while it joins, while a NATS connection is down, while its durable
fetches fail (JetStream unavailable), and while it leaves."""

from __future__ import annotations

import math
import os
import re
import signal
from typing import Any

import pytest
import trio
import trio.testing
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeout

from nexus_trio import TransportUnavailable, open_kernel
from nexus_trio._nats import Cluster, NatsServer, join_cluster
from nexus_trio._nats._aio import call_aio
from nexus_trio._nats._durable import FETCH_HEARTBEAT, DurableChannel
from nexus_trio.metrics import readiness, serve_metrics
from nexus_trio.nats import ConnectionWatch

from .nats_server import node_config, until
from .test_metrics import get
from .test_nats import local_node


async def test_a_node_is_not_ready_while_it_joins_its_connection_is_down_or_it_leaves(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The join's steps faked (no server): what the kernel's readiness says at each, and
    the time a connection has been down, by the mock clock."""
    seen: dict[str, str | None] = {}

    def step(name: str) -> object:
        async def run(cluster: Cluster, *args: object) -> None:
            seen[name] = readiness(cluster.kernel)

        return run

    for name in ("_connect", "_start", "_leave", "_disconnect"):
        monkeypatch.setattr(Cluster, name, step(name))
    async with open_kernel(node_config()) as kernel:
        assert readiness(kernel) is None  # a kernel alone
        async with join_cluster(kernel, "nats://127.0.0.1:1", "a") as cluster:
            assert readiness(kernel) is None
            # (public: its type too, for code that asks it as the --workers settle does)
            assert type(cluster.connections) is ConnectionWatch
            cluster.connections.mark("data", trio.current_time())  # (what a disconnect does)
            await trio.sleep(3)
            assert readiness(kernel) == "nats connection down since 3 s (data)"
            cluster.connections.mark("control", trio.current_time())
            await trio.sleep(7)
            assert readiness(kernel) == "nats connection down since 10 s (control, data)"
            cluster.connections.mark("data", None)  # (a reconnect)
            assert readiness(kernel) == "nats connection down since 7 s (control)"
            cluster.connections.mark("control", None)
            assert readiness(kernel) is None
            cluster.connections.mark("control", -math.inf)  # (nats-py gave up: closed)
            assert readiness(kernel) == "nats connection closed"
            cluster.connections.mark("control", None)
        assert readiness(kernel) is None  # left: the kernel alone again
        assert seen == {
            "_connect": "not joined",
            "_start": "not joined",
            "_leave": "leaving",
            "_disconnect": "leaving",
        }

        # A join that fails leaves the kernel's readiness as it found it.
        async def refused(cluster: Cluster) -> None:
            seen["refused"] = readiness(cluster.kernel)
            raise TransportUnavailable("cannot connect to NATS at nats://127.0.0.1:1")

        monkeypatch.setattr(Cluster, "_connect", refused)
        with pytest.raises(TransportUnavailable):
            async with join_cluster(kernel, "nats://127.0.0.1:1", "a"):
                pass  # pragma: no cover
        assert seen["refused"] == "not joined"
        assert readiness(kernel) is None
        await kernel.shutdown()
        assert readiness(kernel) == "shutting down"


async def _wait_for(cluster: Cluster, ready: bool) -> None:
    """Until the cluster's readiness is ``ready``: woken by its connections' changes, and,
    with both up but the node not ready yet (``jetstream unavailable since N s`` until a
    durable fetch of the server restarted is answered), by a poll of the real server's
    state. (Regression: with the connections up, ``wait_up`` returned without a
    checkpoint, so the loop spun: the fetch that would make the node ready never ran and
    ``fail_after`` never fired; CI 213 hung here 10 minutes.)"""
    while (cluster.readiness() is None) != ready:
        if ready:
            for role in ("control", "data"):
                await cluster.connections.wait_up(role)
            if cluster.readiness() is not None:
                await trio.sleep(0.05)
        else:
            await cluster.connections.wait_down("data")


async def test_readyz_is_503_while_the_nats_server_is_gone_and_200_once_it_is_back(
    nats: NatsServer,
) -> None:
    port = nats.port
    restarted: list[NatsServer] = []
    try:
        async with local_node(nats.url) as (kernel, cluster), trio.open_nursery() as nursery:
            metrics_port = await nursery.start(serve_metrics, kernel, "127.0.0.1", 0)
            assert (await get(metrics_port, "/readyz"))[::2] == (200, b"ready\n")
            nats.kill()
            with trio.fail_after(60):
                await _wait_for(cluster, ready=False)
            status, _, body = await get(metrics_port, "/readyz")
            assert status == 503
            assert re.fullmatch(
                rb"nats connection down since \d+ s \((control, data|control|data)\)\n", body
            ), body
            assert (await get(metrics_port, "/healthz"))[::2] == (200, b"ok\n")  # alive
            restarted.append(await trio.to_thread.run_sync(NatsServer(port=port).start))
            with trio.fail_after(60):
                await _wait_for(cluster, ready=True)
            assert (await get(metrics_port, "/readyz"))[::2] == (200, b"ready\n")
            nursery.cancel_scope.cancel()
    finally:
        for server in restarted:
            server.stop()


async def test_a_node_whose_durable_fetches_get_no_answer_is_not_ready_until_one_is_answered() -> (
    None
):
    """Regression: a durable fetch that JetStream did not answer at all (no message, no
    status, no heartbeat: here the nats-server hung by SIGSTOP behind a connection that is
    up; a stream with no leader likewise) read as an idle poll, and the node stayed ready.
    It is a failed fetch now (``durable_fetch_failures{own}``): ``jetstream unavailable
    since N s`` until one is answered; idle polls (answered by heartbeats) count nothing."""
    server = await trio.to_thread.run_sync(NatsServer().start)
    try:
        async with local_node(server.url) as (_kernel, cluster):
            durable = cluster.durable
            polls = [0]
            fetch = durable._psub.fetch

            async def counted(*args: Any, **kwargs: Any) -> Any:
                try:
                    return await fetch(*args, **kwargs)
                finally:
                    polls[0] += 1

            durable._psub.fetch = counted
            with trio.fail_after(30):
                await until(lambda: polls[0] >= 3)  # (idle polls, answered)
                assert (durable.fetch_failures, cluster.readiness()) == (0, None)
                os.kill(server.pid, signal.SIGSTOP)
                try:
                    await until(lambda: durable.fetch_failures >= 2)
                    said = cluster.readiness()
                finally:
                    os.kill(server.pid, signal.SIGCONT)
                assert said is not None
                assert re.fullmatch(r"jetstream unavailable since \d+ s", said), said
                await until(lambda: cluster.readiness() is None)
                failures = durable.fetch_failures
                seen = polls[0]
                await until(lambda: polls[0] >= seen + 2)  # (idle again: counted nothing)
                assert durable.fetch_failures == failures
        assert cluster.stats().durable_fetch_failures["own"] == failures >= 2
    finally:
        server.stop()


class _LateStatuses:
    """A node's pull subscription on an idle, healthy JetStream whose every request's
    end (its 408) comes a hair after nats-py's fetch gave up, as 14 of 20 idle polls'
    did on loopback: a status waits in the queue at each look, and the poll itself gets
    nothing in time (nats-py discards that status at the next fetch)."""

    pending_msgs = 1

    def __init__(self, psub: Any) -> None:
        self.psub = psub
        self.polls = 0
        self.heartbeats: list[float | None] = []

    async def fetch(self, batch: int, timeout: float, heartbeat: float | None = None) -> Any:
        import asyncio

        self.heartbeats.append(heartbeat)
        await asyncio.sleep(0.01)
        self.polls += 1
        raise NatsTimeout

    def __getattr__(self, name: str) -> Any:
        return getattr(self.psub, name)


async def test_a_node_idle_after_failed_fetches_is_ready_again_though_each_poll_ends_late(
    nats: NatsServer,
) -> None:
    """Regression: a fetch that got nothing in time while a status of the last one
    waited in the queue (its 408, come late) read as "not known", and asked no
    heartbeats (a queue not empty): on an idle node whose 408s kept coming late, a
    failed fetch's ``jetstream unavailable since N s`` stayed for as long, 19 s and more
    after JetStream was back (4 idle polls of 60 read as answered on loopback, 0 of the
    rest as not answered). Something come in since the last fetch is JetStream's answer."""
    async with local_node(nats.url) as (_kernel, cluster):
        durable = cluster.durable
        late = _LateStatuses(durable._psub)
        durable._psub = late
        durable.fetch_failing_since = trio.current_time()  # (the outage that just ended)
        with trio.fail_after(30):
            await until(lambda: late.polls >= 3)
        assert cluster.readiness() is None
        assert set(late.heartbeats) == {None}  # (never asked: a status waited each time)
        assert durable.fetch_failures == 0
        durable._psub = late.psub


class _AnswersReadAfterTheTimer(_LateStatuses):
    """A node's pull subscription on a healthy JetStream read by a loop backed up behind
    the kernel's work (the first second of ``nexus run --nats``'s ring): the poll's
    heartbeats and its 408 come due in the same turn as nats-py's timer, which fires
    first; they are in the queue when the fetch gives up (measured: two heartbeats and
    the 408), none before (the fetch took what was there)."""

    pending_msgs = 0

    async def fetch(self, batch: int, timeout: float, heartbeat: float | None = None) -> Any:
        self.pending_msgs = 0
        try:
            return await super().fetch(batch, timeout, heartbeat)
        finally:
            self.pending_msgs = 3


async def test_a_probe_answered_but_read_after_the_fetchs_timer_is_no_failed_fetch(
    nats: NatsServer,
) -> None:
    """Regression: every ``nexus run --nats`` of the default ring logged "durable fetch
    failed: no answer from JetStream within the fetch's wait (1 failed so far)" a second
    or so in (6 of 6 runs), on a healthy JetStream: its loop, backed up behind the ring,
    read the probe's heartbeats after nats-py's timer, and the poll read as not
    answered. What is in the queue when the fetch gives up came during it: answered."""
    async with local_node(nats.url) as (_kernel, cluster):
        durable = cluster.durable
        late = _AnswersReadAfterTheTimer(durable._psub)
        durable._psub = late
        with trio.fail_after(30):
            await until(lambda: late.polls >= 3)
        assert late.heartbeats[0] == FETCH_HEARTBEAT  # (a probe: heartbeats asked)
        assert durable.fetch_failures == 0
        assert cluster.readiness() is None
        durable._psub = late.psub


async def test_a_node_whose_durable_fetches_fail_is_not_ready_until_one_works(
    nats: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: JetStream unavailable behind connections that are up (here: the durable
    stream deleted under the node, and making it anew refused) left the node ready while
    every fetch of its durable path failed. It says ``jetstream unavailable since N s``
    from the first failed fetch until one works (the stream made anew), then ready."""
    refusing = [False]
    setup = DurableChannel._setup

    async def refused_setup(self: DurableChannel) -> Any:
        if refusing[0]:
            raise NatsError("JetStream unavailable (test)")
        return await setup(self)

    monkeypatch.setattr(DurableChannel, "_setup", refused_setup)
    async with local_node(nats.url) as (_kernel, cluster):
        with trio.fail_after(30):
            assert cluster.readiness() is None
            refusing[0] = True  # (from here: the join made them)
            await call_aio(cluster.data_js.delete_stream, f"{cluster.prefix}-durable")
            await until(lambda: cluster.durable.fetch_failures >= 2)
            said = cluster.readiness()
            assert said is not None
            assert re.fullmatch(r"jetstream unavailable since \d+ s", said), said
            refusing[0] = False
            await until(lambda: cluster.readiness() is None)
            failures = cluster.durable.fetch_failures
        assert cluster.stats().durable_fetch_failures["own"] == failures >= 2
