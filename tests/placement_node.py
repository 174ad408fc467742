"""A kernel in a child process for the placement tests, driven by JSON lines on stdin.

``python -m tests.placement_node --url URL --node NAME`` joins the cluster with the
agent type ``counter`` (and nothing else; none with ``--no-types``: a member that joined
only to send; ``temporary`` counters with ``--temporary``), prints ``READY <node>`` and then answers one
JSON line on stdout for each command line on stdin (see :func:`_command`). A ``counter``
counts the tells it handled in this incarnation and acknowledges each one to the
``collector`` of the node whose name is in the tell, so a test can tell handled
messages from lost ones even after the counter's node was SIGKILLed. With ``--ledger
PATH`` the node also writes a line per streamed tell handled (``H <sender>``) or
dead-lettered (``D <sender> <reason>``) here, as it happens, which a SIGKILL does not
lose: the cluster-wide books of ``tests/test_cluster_conservation.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import trio
from nats.js.errors import KeyNotFoundError

from nexus_trio import Agent, Context, EventKind, Message, MessageKind, agent, open_kernel
from nexus_trio._nats import Cluster, join_cluster
from nexus_trio._nats import _wire as wire
from nexus_trio._nats._aio import call_aio
from nexus_trio._nats._placement import Placement, rendezvous_owner

from .nats_server import PATIENT, node_config, read_line, sigkill

REPO = Path(__file__).resolve().parent.parent


class Counter(Agent):
    """Fresh state per incarnation: a restart (or a re-placement) starts from zero."""

    def __init__(self) -> None:
        self.handled = 0

    async def handle(self, ctx: Context, msg: Message) -> Any:
        if msg.kind is MessageKind.QUERY:
            return {"node": NODE, "handled": self.handled, "name": ctx.name}
        end = msg.payload.get("end") if isinstance(msg.payload, dict) else None
        if end == "raise":  # (``end``: its run ends by itself, for good if temporary)
            raise RuntimeError("ends by itself")
        if end == "stop":
            ctx.stop()
            return None
        self.handled += 1
        if HANDLE_DELAY:
            await trio.sleep(HANDLE_DELAY)
        _ledger(f"H {msg.payload['ack']}")
        if ACKS:
            await ctx.send(f"collector-{msg.payload['ack']}", msg.payload["seq"])
        return None

    async def on_stop(self, ctx: Context) -> None:
        on_stops.append(ctx.name)
        if HOLD_ON_STOP:  # a kill point (``hold_on_stop``): the stop under way
            await trio.sleep_forever()


#: the names of the counters whose ``on_stop`` ran (began) here
on_stops: list[str | None] = []
#: ``hold_on_stop``: each counter's ``on_stop`` waits for ever (a test SIGKILLs the node)
HOLD_ON_STOP = False


#: seconds each counter takes over a tell (``slow_handlers``: its mailbox holds some)
HANDLE_DELAY = 0.0
#: acknowledge each handled tell to the sender's collector (off: ``no_acks``, so that
#: the only tells between nodes are the streams' own)
ACKS = True
#: the file descriptor of this node's ledger (``--ledger``): a line per streamed tell
#: handled (``H <sender>``) or dead-lettered (``D <sender> <reason>``) here, written
#: as it happens (one ``os.write`` each), so that it survives a SIGKILL of the node
LEDGER = -1


def _ledger(line: str) -> None:
    if LEDGER >= 0:
        os.write(LEDGER, line.encode() + b"\n")


def read_ledger(path: Path) -> dict[str, int]:
    """A node's ledger summed: ``H <sender>`` and ``D <sender> <reason>`` -> count."""
    counts: dict[str, int] = {}
    for line in path.read_text().splitlines():
        counts[line] = counts.get(line, 0) + 1
    return counts


NODE = ""
#: seconds join_cluster took to return (the buckets replayed, this node announced)
JOINED_IN = 0.0
acks: list[int] = []


@agent(name="collector")
async def collector(ctx: Context, msg: Message) -> None:
    acks.append(msg.payload)


async def _command(cluster: Cluster, nursery: trio.Nursery, cmd: dict[str, Any]) -> Any:
    op = cmd["op"]
    kernel = cluster.kernel
    if op == "live":
        return cluster.live_nodes()
    if op == "wait_live":
        with trio.fail_after(cmd.get("timeout", 30)):
            while True:  # membership lives in other processes: polled, bounded
                if len(cluster.live_nodes()) == cmd["count"]:
                    break
                await trio.sleep(0.02)
        return cluster.live_nodes()
    if op == "owner":
        return rendezvous_owner(cmd["name"], cluster.live_nodes())
    if op == "types_of":
        # the agent types node cmd["node"]'s record names as this node heard it
        info = cluster.members.members.get(cmd["node"])
        return None if info is None or info.types is None else sorted(info.types)
    if op == "spawn":
        placed = await cluster.spawn(cmd["type"], name=cmd["name"], node=cmd.get("node"))
        return {"node": placed.node, "id": str(placed.id)}
    if op == "spawn_many":
        # cmd["count"] agents named f"{prefix}{i}", cmd["window"] placements at a time
        names = [f"{cmd['prefix']}{i}" for i in range(cmd["count"])]
        limit = trio.Semaphore(cmd.get("window", 100))
        failed: list[str] = []

        async def place(name: str) -> None:
            async with limit:
                try:
                    await cluster.spawn(cmd["type"], name=name)
                except Exception as exc:
                    failed.append(f"{name}: {exc!r}")

        started = trio.current_time()
        async with trio.open_nursery() as places:
            for name in names:
                places.start_soon(place, name)
        return {"seconds": trio.current_time() - started, "failed": failed[:10]}
    if op == "spawn_each":
        # each of cmd["names"] placed at once: name -> [node, id] or "Error: text"
        # (each request's timeout cmd["place_timeout"], 5 s by default, as Cluster.spawn's)
        results: dict[str, Any] = {}
        place_timeout = cmd.get("place_timeout", 5.0)

        async def place_one(name: str) -> None:
            try:
                placed = await cluster.spawn(
                    cmd["type"], name=name, node=cmd.get("node"), timeout=place_timeout
                )
            except Exception as exc:
                results[name] = f"{type(exc).__name__}: {exc}"
            else:
                results[name] = [placed.node, str(placed.id)]

        async with trio.open_nursery() as places:
            for name in cmd["names"]:
                places.start_soon(place_one, name)
        return results
    if op == "local":
        # the names of this kernel's agents among cmd["names"], with their ids
        return {n: str(kernel.lookup(n).id) for n in cmd["names"] if kernel.is_local(n)}
    if op == "known":
        # how many of f"{prefix}{i}" (i < count) this node knows where they run
        return sum(
            cluster.name_holder(f"{cmd['prefix']}{i}") is not None for i in range(cmd["count"])
        )
    if op == "joined_in":
        return JOINED_IN
    if op == "held":
        return cluster.placement.records_held
    if op == "where":
        holder = cluster.name_holder(cmd["name"])
        return None if holder is None else [holder[0], str(holder[1])]
    if op == "restarted":
        return restarted
    if op == "rebalance":
        return await cluster.rebalance()
    if op == "slow_asks":
        # every placement this node asks of another node waits cmd["delay"] s first (an
        # owner slow to reach: a test kills this node while its asks wait)
        ask = Placement._ask

        async def slow_ask(self: Placement, *args: Any) -> Any:
            asks_started.append(args[1])
            await trio.sleep(cmd["delay"])
            return await ask(self, *args)

        Placement._ask = slow_ask  # type: ignore[method-assign]
        return None
    if op == "slow_records":
        # every placement record this node writes waits cmd["delay"] s first (its KV
        # slow: a test has it leave while it answers placement requests)
        from nats.js.kv import KeyValue

        put = KeyValue.put

        async def slow_put(self: KeyValue, key: str, *args: Any, **kw: Any) -> int:
            if self._name.endswith("-placed"):
                await asyncio.sleep(cmd["delay"])
            return await put(self, key, *args, **kw)

        KeyValue.put = slow_put  # type: ignore[method-assign]
        return None
    if op == "hold_answers":
        # a kill point: every placement this node is asked for from now on spawns its
        # agent, claims the name and writes the record, then its answer waits for ever
        # (a test SIGKILLs the node there); answers_held says how many wait
        record_requested = Placement._record_requested

        async def record_then_hold(self: Placement, *args: Any) -> None:
            await record_requested(self, *args)
            answers_held.append(args[0])
            await asyncio.Event().wait()

        Placement._record_requested = record_then_hold  # type: ignore[method-assign]
        return None
    if op == "hold_records":
        # a kill point: every placement this node makes from now on (asked by another
        # node, or its own) spawns its agent and claims the name, then waits for ever
        # before writing the record (a test SIGKILLs the node there); answers_held says
        # how many wait
        async def hold_requested(self: Placement, *args: Any) -> None:
            answers_held.append(args[0])
            await asyncio.Event().wait()

        async def hold_own(self: Placement, *args: Any) -> None:
            answers_held.append(args[0])
            await trio.sleep_forever()

        Placement._record_requested = hold_requested  # type: ignore[method-assign]
        Placement._write_record = hold_own  # type: ignore[method-assign]
        return None
    if op == "hold_name_drops":
        # a kill point: from now on this node's drops of names-bucket entries (an agent
        # stopped: its entry's delete) wait for ever; its placement records' drops land
        # (a test SIGKILLs the node between the two)
        from nexus_trio._nats import _kvops as kvops

        delete_names = kvops.delete_names

        async def held_drops(kv: Any, *args: Any, **kw: Any) -> Any:
            if kv._name.endswith("-names"):
                await trio.sleep_forever()
            return await delete_names(kv, *args, **kw)

        kvops.delete_names = held_drops  # type: ignore[assignment]
        return None
    if op == "hold_record_drops":
        # a kill point: from now on this node's drops of its placement records (an agent
        # stopped for good) wait for ever (a test SIGKILLs the node there); drops_held
        # says how many wait
        async def held_drop(self: Placement, name: str, *args: Any) -> None:
            drops_held.append(name)
            await trio.sleep_forever()

        Placement._delete_record = held_drop  # type: ignore[method-assign]
        return None
    if op == "hold_on_stop":
        # a kill point: from now on each counter's on_stop waits for ever (its stop under
        # way: a test SIGKILLs the node there); on_stops says how many began
        global HOLD_ON_STOP
        HOLD_ON_STOP = True
        return None
    if op == "drops_held":
        return len(drops_held)
    if op == "on_stops":
        return sorted(n for n in on_stops if n is not None)
    if op == "stop_soon":
        # each of cmd["names"], an agent of this kernel, stopped for good, in the
        # background (the stops wait at a kill point)
        for name in cmd["names"]:
            nursery.start_soon(kernel.stop, kernel.lookup(name).id)
        return None
    if op == "end":
        # each of cmd["names"], an agent of this kernel, told to end its run by itself
        # (cmd["how"]: "raise" or "stop", ``ctx.stop()``); for good if it is temporary
        # (``--temporary``)
        for name in cmd["names"]:
            await kernel.send(kernel.lookup(name), {"end": cmd["how"]})
        return None
    if op == "stop":
        # each of cmd["names"], an agent of this kernel, stopped for good
        for name in cmd["names"]:
            await kernel.stop(kernel.lookup(name).id)
        return None
    if op == "answers_held":
        return len(answers_held)
    if op == "records":
        # the names among cmd["names"] that have a placement record, as this node knows
        return sorted(n for n in cmd["names"] if n in cluster.placement.records)
    if op in ("names_in_bucket", "records_in_bucket"):
        # the names among cmd["names"] that have an entry in the names bucket (or a
        # record in the placed bucket) now
        kv = cluster._names_kv if op == "names_in_bucket" else cluster.placement._kv
        assert kv is not None

        async def entries() -> list[str]:
            found = []
            for name in cmd["names"]:
                try:
                    await kv.get(wire.name_key(name))
                except KeyNotFoundError:
                    continue
                found.append(name)
            return found

        return await call_aio(entries)
    if op == "asks_started":
        return len(asks_started)
    if op == "rebalance_soon":
        # started in the background (the node may be killed in the middle of it)
        nursery.start_soon(cluster.rebalance)
        return None
    if op == "rebalance_beyond":
        # started in the background in a nursery around the cluster block: it runs on
        # through the clean leave at the end of the commands (not cancelled with them),
        # and the kernel shuts down once it has ended, after the leave
        assert OUTER is not None

        async def rebalance() -> None:
            try:
                beyond["moved"] = await cluster.rebalance()
            except Exception as exc:
                beyond["error"] = f"{type(exc).__name__}: {exc}"

        OUTER.start_soon(rebalance)
        return None
    if op == "request":
        return await kernel.request(cmd["to"], "report", timeout=cmd.get("timeout", 5))
    if op == "stream":
        # tells to the named counters, round robin, paced; counts the ones accepted
        done = trio.Event()
        # (with cmd["why"]: the refused ones by their error's type too)
        result: dict[str, Any] = {"accepted": 0, "refused": 0}
        if cmd.get("why"):
            result["refused_by"] = {}

        async def stream() -> None:
            names = cmd["to"]
            for i in range(cmd["count"]):
                try:
                    await kernel.send(names[i % len(names)], {"seq": i, "ack": NODE})
                    result["accepted"] += 1
                except Exception as exc:
                    result["refused"] += 1
                    if "refused_by" in result:
                        kind = type(exc).__name__
                        result["refused_by"][kind] = result["refused_by"].get(kind, 0) + 1
                if i % cmd.get("batch", 50) == 0:
                    await trio.sleep(cmd.get("pause", 0.005))
            done.set()

        nursery.start_soon(stream)
        streams.append((done, result))
        return len(streams) - 1
    if op == "stream_result":
        done, result = streams[cmd["stream"]]
        with trio.fail_after(cmd.get("timeout", 30)):
            await done.wait()
        return result
    if op == "acks":
        return len(acks)
    if op == "no_acks":
        global ACKS
        ACKS = False
        return None
    if op == "slow_handlers":
        global HANDLE_DELAY
        HANDLE_DELAY = cmd["delay"]
        return None
    if op == "ask_stream":
        # requests to the named counters, round robin, paced: the answers, and the
        # requests that failed by their error's type (each request ends once); one the
        # end of the commands (a clean leave) cut in flight ended so: "Cancelled"
        done = trio.Event()
        result = {"sent": 0, "answered": 0, "failed": {}}

        async def ask_stream() -> None:
            names = cmd["to"]
            for i in range(cmd["count"]):
                result["sent"] += 1
                try:
                    await kernel.request(
                        names[i % len(names)], "report", timeout=cmd.get("timeout", 2)
                    )
                    result["answered"] += 1
                except (Exception, trio.Cancelled) as exc:
                    kind = type(exc).__name__
                    result["failed"][kind] = result["failed"].get(kind, 0) + 1
                    if isinstance(exc, trio.Cancelled):
                        raise
                await trio.sleep(cmd.get("pause", 0.01))
            done.set()

        nursery.start_soon(ask_stream)
        streams.append((done, result))
        return len(streams) - 1
    if op == "stats":
        return attrs.asdict(cluster.stats())
    raise ValueError(f"unknown op {op!r}")


streams: list[tuple[trio.Event, dict[str, Any]]] = []
#: the nursery around the cluster block (see ``rebalance_beyond``), and what that
#: rebalance returned or raised (in the node's last line, see ``Node.leave``)
OUTER: trio.Nursery | None = None
beyond: dict[str, Any] = {}
#: the names of the placements this node asked of others since ``slow_asks``
asks_started: list[str] = []
#: the names of the placements whose answers wait since ``hold_answers`` (a kill point)
answers_held: list[str] = []
#: the names whose record drops wait since ``hold_record_drops`` (a kill point)
drops_held: list[str] = []
#: (name, reason) of every ``restarted`` lifecycle event of this kernel
restarted: list[tuple[str | None, str]] = []


async def _follow_events(kernel: Any, task_status: trio.TaskStatus[None]) -> None:
    async with kernel.events() as events:
        task_status.started()
        async for event in events:
            if event.kind is EventKind.RESTARTED:
                restarted.append((event.name, event.reason))


async def _follow_dead_letters(kernel: Any, task_status: trio.TaskStatus[None]) -> None:
    async with kernel.dead_letters(buffer=1_000_000) as letters:
        task_status.started()
        async for letter in letters:
            payload = letter.message.payload
            if (
                letter.message.kind is not MessageKind.QUERY
                and isinstance(payload, dict)
                and "seq" in payload
                and "ack" in payload
            ):
                _ledger(f"D {payload['ack']} {letter.reason.value}")


class Node:
    """``tests.placement_node`` in a child process, one JSON command at a time."""

    def __init__(
        self,
        url: str,
        node: str,
        *,
        types: bool = True,
        ledger: Path | None = None,
        temporary: bool = False,
    ) -> None:
        self.node = node
        self.temporary = temporary
        self.ledger = ledger
        self.url = url
        self.types = types
        self.process: trio.Process | None = None
        self._buffer = b""

    async def start(self) -> Node:
        argv = [
            sys.executable,
            "-m",
            "tests.placement_node",
            "--url",
            self.url,
            "--node",
            self.node,
            *([] if self.types else ["--no-types"]),
            *(["--temporary"] if self.temporary else []),
            *([] if self.ledger is None else ["--ledger", str(self.ledger)]),
        ]
        self.process = await trio.lowlevel.open_process(
            argv,
            cwd=str(REPO),
            env=dict(os.environ, PYTHONPATH=str(REPO)),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        with trio.fail_after(60):  # (generous: a loaded machine starts Python slowly)
            line = await self._readline()
        assert line == f"READY {self.node}", line
        return self

    async def _readline(self) -> str:
        assert self.process is not None
        line, self._buffer = await read_line(self.process, self._buffer, f"node {self.node}")
        return line

    async def call(self, op: str, timeout: float = 30, **args: Any) -> Any:
        assert self.process is not None and self.process.stdin is not None
        await self.process.stdin.send_all(json.dumps({"op": op, **args}).encode() + b"\n")
        with trio.fail_after(timeout):
            answer = json.loads(await self._readline())
        if "error" in answer:
            raise RuntimeError(f"{self.node}: {op}: {answer['error']}: {answer['text']}")
        return answer["ok"]

    async def leave(self) -> dict[str, Any]:
        """End of commands (a clean leave); the node's last line, once its kernel has
        stopped: its kernel's counters and what a ``rebalance_beyond`` came to."""
        assert self.process is not None and self.process.stdin is not None
        await self.process.stdin.aclose()
        with trio.fail_after(60):
            final: dict[str, Any] = json.loads(await self._readline())["final"]
            await self.process.wait()
        return final

    def kill(self) -> None:
        sigkill(self.process)

    async def stop(self) -> None:
        process = self.process
        if process is None:
            return
        if process.poll() is None and process.stdin is not None:
            with trio.move_on_after(10):
                await process.stdin.aclose()  # end of commands: a clean leave
                await process.wait()
        self.kill()
        await process.wait()


async def until(check: Any, timeout: float = 15.0) -> None:
    """Poll a child's state (it lives in another process: no Trio event to wait on)."""
    with trio.fail_after(timeout):
        while True:
            if await check():
                return
            await trio.sleep(0.05)


@contextlib.asynccontextmanager
async def stopped_at_end() -> AsyncIterator[list[Node]]:
    """A list for the child nodes a test starts: each one stopped at the end, whatever
    happened (a clean leave, a kill if it does not end in 10 s)."""
    nodes: list[Node] = []
    try:
        yield nodes
    finally:
        with trio.CancelScope(shield=True):
            for node in nodes:
                await node.stop()


async def pause_past_loss(paused: Node, survivors: list[Node], replaced: int) -> None:
    """SIGSTOP ``paused`` until ``survivors`` re-placed ``replaced`` of its agents
    (judged it lost), then SIGCONT it (also when the wait fails)."""
    assert paused.process is not None
    os.kill(paused.process.pid, signal.SIGSTOP)
    try:
        with trio.fail_after(20):
            while True:  # (other processes: polled, bounded)
                stats = [await n.call("stats") for n in survivors]
                if sum(s["replaced"] for s in stats) == replaced:
                    break
                await trio.sleep(0.05)
    finally:
        os.kill(paused.process.pid, signal.SIGCONT)


async def _main(url: str, node: str, with_types: bool, restart: str) -> None:
    global NODE, JOINED_IN, OUTER
    NODE = node
    async with open_kernel(node_config()) as kernel, trio.open_nursery() as OUTER:
        kernel.spawn(collector, name=f"collector-{node}")
        # PATIENT: a loaded machine left a node silent for longer than FAST's 0.6 s now
        # and then, and the others judged it lost (a killed node is still judged lost, 2 s
        # after its last heartbeat). connect_timeout 10 s, not 2 s: the join bounds its
        # connect at 11.6 s with 2 s, and in a whole-suite run at load 20-54 a kernel of
        # the test process took longer than that to connect (the server is up here)
        joining = trio.current_time()
        options = attrs.evolve(PATIENT, connect_timeout=10.0)
        types = {"counter": agent(Counter, name="counter", restart=restart)} if with_types else None
        # (events followed from before the join: the others may ask this node to place an
        # agent as soon as they hear it, before join_cluster returns here)
        async with trio.open_nursery() as follower:
            await follower.start(_follow_events, kernel)
            await follower.start(_follow_dead_letters, kernel)
            async with join_cluster(kernel, url, node, options=options, types=types) as cluster:
                JOINED_IN = trio.current_time() - joining
                await cluster.names_published()
                print(f"READY {node}", flush=True)
                stdin = trio.lowlevel.FdStream(os.dup(0))
                buffer = b""
                async with trio.open_nursery() as nursery:
                    while True:
                        chunk = await stdin.receive_some(65536)
                        if not chunk:
                            break
                        buffer += chunk
                        while b"\n" in buffer:
                            line, buffer = buffer.split(b"\n", 1)
                            try:
                                answer: Any = {
                                    "ok": await _command(cluster, nursery, json.loads(line))
                                }
                            except Exception as exc:
                                answer = {"error": type(exc).__name__, "text": str(exc)}
                            print(json.dumps(answer), flush=True)
                    nursery.cancel_scope.cancel()
                if not OUTER.child_tasks:
                    await kernel.shutdown()  # (else after the leave: see rebalance_beyond)
            follower.cancel_scope.cancel()
    stats = kernel.stats()
    final = {
        "accepted": stats.accepted,
        "handled": stats.handled,
        "replies_delivered": stats.replies_delivered,
        "forwarded": stats.forwarded,
        "dead_lettered": stats.dead_lettered,
        "in_flight": stats.in_flight,
        # the cluster's counts after the leave, and what each stream and ask_stream came
        # to (cut by the end of the commands)
        "cluster": attrs.asdict(cluster.stats()),
        "streams": [result for _, result in streams],
        **beyond,
    }
    print(json.dumps({"final": final}), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m tests.placement_node")
    parser.add_argument("--url", required=True)
    parser.add_argument("--node", required=True)
    parser.add_argument("--no-types", action="store_true")
    parser.add_argument("--ledger")
    parser.add_argument("--temporary", action="store_true")  # (temporary counters)
    args = parser.parse_args(sys.argv[1:])
    if args.ledger:
        LEDGER = os.open(args.ledger, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    restart = "temporary" if args.temporary else "permanent"
    trio.run(_main, args.url, args.node, not args.no_types, restart)
