"""Real NATS for the distributed tests: servers on loopback, and kernel child processes.

* :func:`nats_cluster` starts one server, or several joined by routes, each on a port
  the server picked itself, and stops them by PID.
* :class:`NodeProcess` runs ``python -m tests.nats_server node ...``: a kernel in a
  child process, joined to the cluster, hosting the test agents below. It prints
  ``READY <node>`` once its names are published; tests wait for that line (bounded)
  instead of sleeping.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, ClassVar

import attrs
import trio

from nexus_trio import (
    Agent,
    Config,
    Context,
    Kernel,
    KernelConfig,
    Message,
    SupervisionConfig,
    agent,
    open_kernel,
)
from nexus_trio._nats import (
    Cluster,
    ClusterOptions,
    DurableOptions,
    NatsServer,
    cluster_of,
    join_cluster,
)
from nexus_trio._nats._aio import call_aio, on_loop
from nexus_trio._nats._server import free_ports

REPO = Path(__file__).resolve().parent.parent

#: fast failure detection and redelivery so the tests stay short; ``server_lost_wait``
#: given as the 5 s the tests were written against (left out, it would derive 0.6 s from
#: the fast heartbeats, 2 s in PATIENT: see test_nats_wire)
FAST = ClusterOptions(
    heartbeat_interval=0.2,
    missed_heartbeats=3,
    server_lost_wait=5.0,
    durable=DurableOptions(ack_wait=1.0, max_deliver=4, redelivery_delay=0.05),
)

#: FAST, but a member is judged lost after 2 s of silence, not 0.6 s: for live nodes in a
#: test that is not about the detector. On a loaded 2-core CI machine a process (the GIL,
#: the scheduler) can leave its nodes silent for 0.7 s now and then, and FAST's nodes then
#: judge each other lost (requests between them fail with TransportUnavailable)
PATIENT = attrs.evolve(FAST, missed_heartbeats=10)


@contextlib.contextmanager
def nats_cluster(size: int = 1) -> Iterator[list[NatsServer]]:
    """``size`` nats-servers with JetStream on 127.0.0.1 (a routed cluster if size > 1)."""
    servers: list[NatsServer] = []
    try:
        if size == 1:
            servers.append(NatsServer().start())
        else:
            ports = free_ports(size)
            routes = [f"nats://127.0.0.1:{port}" for port in ports]
            for i, port in enumerate(ports):
                server = NatsServer(
                    server_name=f"s{i}",
                    cluster_name="nexus-test",
                    cluster_port=port,
                    routes=routes,
                )
                servers.append(server)
                server.start()
            for server in servers:
                server.wait_for_log("metadata leader")
        yield servers
    finally:
        for server in servers:
            server.stop()


def node_config() -> Config:
    return Config(
        kernel=KernelConfig(request_timeout_ms=5000, send_timeout_ms=10000),
        supervision=SupervisionConfig(max_restarts=1000, backoff_initial_ms=0, backoff_max_ms=0),
    )


@contextlib.asynccontextmanager
async def patient_node(url: str, name: str) -> AsyncIterator[tuple[Kernel, Cluster]]:
    """A kernel (5 s request timeout, 60 s handle timeout) joined to the cluster at
    ``url`` as ``name`` with the PATIENT options, shut down at the end of the block."""
    config = Config(kernel=KernelConfig(request_timeout_ms=5000, handle_timeout_ms=60000))
    async with (
        open_kernel(config) as kernel,
        join_cluster(kernel, url, name, options=PATIENT) as cluster,
    ):
        yield kernel, cluster
        await kernel.shutdown()


def on_loop_of(cluster: Cluster) -> contextlib.AbstractContextManager[None]:
    """Run a step done by hand on ``cluster`` (what its own tasks do: ``_node_lost``,
    ``_apply_member_entry``, ``_on_heartbeat``...) on its own asyncio loop, as they do.

    With two nodes in one process each join opens a trio-asyncio loop, and the test
    task's is the last joined node's; a task such a step starts there (a re-placement
    started by a loss, a duplicate stopped, Trio's start_soon copies the caller's
    context) inherits it, and ran this node's NATS calls on the other node's loop:
    cancelled as that node left first (an asyncio CancelledError out of this node's
    join block, in a test that had passed)."""
    return on_loop(cluster._aio_loop)


async def until(check: Any) -> None:
    """Poll ``check()`` (state of the nodes that no event announces); the callers bound it."""
    while True:
        if check():
            return
        await trio.sleep(0.02)


async def consumer_settled(cluster: Cluster, stream: str, consumer: str, held: int) -> Any:
    """The consumer's info once it holds at most ``held`` unacknowledged slots: a node
    publishes its acks and terms without waiting for the server, which applies them a
    moment after the node's stats count them settled (a read at once saw one slot more in
    a CI run). A slot a bug keeps held stays: the callers bound the wait and assert the
    exact counts after."""
    info = await call_aio(cluster.data_js.consumer_info, stream, consumer)
    while info.num_ack_pending > held:  # (the server's state: no event)
        await trio.sleep(0.05)
        info = await call_aio(cluster.data_js.consumer_info, stream, consumer)
    return info


# --- the child kernel --------------------------------------------------------------------------


def collector(records: list[Any]) -> Any:
    """An agent that keeps each payload in ``records`` and answers ``"dump"`` with a copy."""

    @agent(name="collector")
    async def collect(ctx: Context, msg: Message) -> Any:
        if msg.payload == "dump":
            return list(records)
        records.append(msg.payload)
        return None

    return collect


async def _serve_node(
    url: str,
    node: str,
    replicas: int,
    kv_replicas: int,
    missed_heartbeats: int,
    ack_wait: float = PATIENT.durable.ack_wait,
) -> None:
    # Patient: no test asks a child node to judge a member lost (the test's own node
    # judges a killed child), while a stall of the test's process (a loaded machine) for
    # longer than FAST's 0.6 s made the child judge the test's live node lost, and a
    # request the child then made to it failed with TransportUnavailable (the tests that
    # stall their process for long give more missed heartbeats still)
    options = attrs.evolve(
        PATIENT,
        kv_replicas=kv_replicas,
        missed_heartbeats=missed_heartbeats,
        durable=attrs.evolve(PATIENT.durable, ack_wait=ack_wait),
    )

    @agent(name="echo")
    async def echo(ctx: Context, msg: Message) -> Any:
        return {"echo": msg.payload, "node": node, "kind": msg.kind.value}

    collected: list[Any] = []
    keeper = collector(collected)

    @agent(name="relay")
    async def relay(ctx: Context, msg: Message) -> Any:
        return await ctx.request(msg.payload["to"], msg.payload["value"], timeout=2.0)

    class Flaky(Agent):
        """Fails the first delivery of each message; applies each message id once."""

        attempts: ClassVar[Counter[str]] = Counter()
        applied: ClassVar[dict[str, Any]] = {}

        async def handle(self, ctx: Context, msg: Message) -> Any:
            if msg.payload == "report":
                return {"attempts": dict(Flaky.attempts), "applied": list(Flaky.applied.values())}
            key = str(msg.id)
            Flaky.attempts[key] += 1
            if Flaky.attempts[key] == 1:
                raise RuntimeError(f"first delivery of {key} fails")
            Flaky.applied.setdefault(key, msg.payload)
            return "done"

    gate = trio.Event()
    passed: list[Any] = []

    @agent(name="gate", mailbox_capacity=1)
    async def gate_agent(ctx: Context, msg: Message) -> Any:
        """Holds every message until ``opener`` is asked (a stuck agent with a full mailbox)."""
        if msg.payload == "dump":
            return list(passed)
        await gate.wait()
        passed.append(msg.payload)
        return None

    @agent(name="opener")
    async def opener(ctx: Context, msg: Message) -> Any:
        gate.set()
        return "open"

    @agent(name="sleepy")
    async def sleepy(ctx: Context, msg: Message) -> Any:
        await trio.sleep(msg.payload)
        return "awake"

    @agent(name="doomed")
    async def doomed(ctx: Context, msg: Message) -> Any:
        raise RuntimeError("always fails")

    @agent(name="crashes")
    async def crashes(ctx: Context, msg: Message) -> Any:
        """Hangs on a message whose payload is this process's id (the test kills the
        process meanwhile: a crash mid-message); answers any other."""
        if msg.payload == os.getpid():
            await trio.sleep_forever()
        return {"node": node, "pid": os.getpid()}

    @agent(name="stats")
    async def stats(ctx: Context, msg: Message) -> Any:
        """This node's cluster counters, for the tests to check the receiving side."""
        cluster = cluster_of(ctx.kernel)
        assert cluster is not None
        return attrs.asdict(cluster.stats())

    @agent(name="worker")
    async def worker(ctx: Context, msg: Message) -> Any:
        return {"node": node, "replica": ctx.name, "job": msg.payload}

    async with open_kernel(node_config()) as kernel:
        kernel.spawn(echo, name=f"echo-{node}")
        kernel.spawn(keeper, name=f"collector-{node}")
        kernel.spawn(relay, name=f"relay-{node}")
        kernel.spawn(agent(Flaky, name="flaky"), name=f"flaky-{node}")
        kernel.spawn(gate_agent, name=f"gate-{node}")
        kernel.spawn(opener, name=f"opener-{node}")
        kernel.spawn(sleepy, name=f"sleepy-{node}")
        kernel.spawn(doomed, name=f"doomed-{node}")
        kernel.spawn(stats, name=f"stats-{node}")
        kernel.spawn(crashes, name=f"crashes-{node}")
        async with join_cluster(kernel, url, node, options=options) as cluster:
            for i in range(replicas):
                ref = kernel.spawn(worker, name=f"worker-{node}-{i}")
                await cluster.serve_type("work", ref)
            await cluster.names_published()
            ids = {ref.name: str(ref.id) for ref in kernel.agents()}
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                print(f"READY {node} {json.dumps(ids)}", flush=True)
                async for _ in signals:
                    break
            await kernel.shutdown()


def _node_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.nats_server node")
    parser.add_argument("--url", required=True)
    parser.add_argument("--node", required=True)
    parser.add_argument("--replicas", type=int, default=0)
    parser.add_argument("--kv-replicas", type=int, default=1)
    parser.add_argument("--missed-heartbeats", type=int, default=PATIENT.missed_heartbeats)
    parser.add_argument("--ack-wait", type=float, default=PATIENT.durable.ack_wait)
    args = parser.parse_args(argv)
    trio.run(
        _serve_node,
        args.url,
        args.node,
        args.replicas,
        args.kv_replicas,
        args.missed_heartbeats,
        args.ack_wait,
    )


def sigkill(process: trio.Process | None) -> None:
    """SIGKILL a child process if it is still running (a node killed mid-test)."""
    if process is not None and process.poll() is None:
        os.kill(process.pid, signal.SIGKILL)


async def read_line(process: trio.Process, buffer: bytes, who: str) -> tuple[str, bytes]:
    """The next line ``process`` prints (and what it printed after it); RuntimeError
    naming ``who`` if it exits first."""
    assert process.stdout is not None
    while b"\n" not in buffer:
        chunk = await process.stdout.receive_some(65536)
        if not chunk:
            raise RuntimeError(f"{who} exited (code {process.poll()})")
        buffer += chunk
    line, rest = buffer.split(b"\n", 1)
    return line.decode(), rest


class NodeProcess:
    """A kernel in a child process, joined to the cluster (see the module doc)."""

    def __init__(
        self,
        url: str,
        node: str,
        *,
        replicas: int = 0,
        kv_replicas: int = 1,
        missed_heartbeats: int = PATIENT.missed_heartbeats,
        ack_wait: float = PATIENT.durable.ack_wait,
    ) -> None:
        self.node = node
        self.argv = [
            sys.executable,
            "-m",
            "tests.nats_server",
            "node",
            "--url",
            url,
            "--node",
            node,
            "--replicas",
            str(replicas),
            "--kv-replicas",
            str(kv_replicas),
            "--missed-heartbeats",
            str(missed_heartbeats),
            # (its durable consumer's: a node that joins again under this name with
            # another ack_wait changes the consumer's, and what waits for a nak's delay
            # then waits the difference more)
            "--ack-wait",
            repr(ack_wait),
        ]
        self.process: trio.Process | None = None
        self.ids: dict[str, str] = {}
        self._buffer = b""

    async def start(self, *, timeout: float = 60.0) -> NodeProcess:
        # (a generous bound: on a loaded 2-core machine the child's imports alone took
        # more than 15 s now and then)
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.process = await trio.lowlevel.open_process(
            self.argv, cwd=str(REPO), env=env, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL
        )
        with trio.fail_after(timeout):
            line = await self._readline()
        if not line.startswith(f"READY {self.node} "):
            raise RuntimeError(f"node {self.node} did not start: {line!r}")
        self.ids = json.loads(line.split(" ", 2)[2])
        return self

    async def _readline(self) -> str:
        assert self.process is not None
        line, self._buffer = await read_line(self.process, self._buffer, f"node {self.node}")
        return line

    def kill(self) -> None:
        sigkill(self.process)

    async def stop(self) -> None:
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            os.kill(process.pid, signal.SIGINT)
            with trio.move_on_after(5):
                await process.wait()
            if process.poll() is None:
                os.kill(process.pid, signal.SIGKILL)
        await process.wait()
        if process.stdout is not None:
            await process.stdout.aclose()


if __name__ == "__main__":
    if sys.argv[1:2] == ["node"]:
        _node_main(sys.argv[2:])
    else:
        sys.exit("usage: python -m tests.nats_server node --url URL --node NAME")
