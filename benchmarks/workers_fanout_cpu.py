"""The ``--workers 2`` fan-out's driving worker, in two processes: CPU (or Python opcodes,
by function) a crossing tell of the sending process, over a fixed number of messages.

    python benchmarks/workers_fanout_cpu.py [--agents 1000] [--messages 200000]
                                            [--opcodes] [--top 30] [--json]

Starts a private nats-server and a receiving process (half the agents, sinks named
``r-K``); this process is worker 0's role: a kernel with the other half (local sinks)
and the demo's fan-out driver (``_drive_fanout``'s loop: ``await kernel.send`` round
robin over the agents, local and remote alternating, a checkpoint every ``4 x agents``
sends), so half of the messages cross. After a warm-up round (every mailbox open, every
route known) it sends ``--messages`` and waits until both halves counted theirs, and
prints this process's and the receiver's CPU (``time.process_time``: all threads) a
**crossing tell** (this process's includes the local tell beside each one, as
``docs/distributed.md``'s forty-fifth pass counted it). A count, not a rate: it moves
less with the machine's load than tells a second.

``--opcodes``: count this process's Python instructions over the sends and the wait
(``opcode_count.InstructionCounter``) and print them a crossing tell by function (the
driver loop, ``Kernel.send``, ``Router.fast``/``send``, ``take_tell``, the seal, nats-py):
a count that does not move with the load at all (the waits' polls do, a little).
``--receiver-opcodes``: the same count in the receiving process (its trio thread: the
batches opened, the tells put in the mailboxes, the sinks' runs; fiftieth pass).

Run from a copy of the repository to measure that copy: the receiver gets this script's
repository on its ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(Path(__file__).resolve().parent))

#: the demo's default payload (``--payload-size 16``)
BLOB = "x" * 16
#: the demo's most sends between two yields of the driver
_DRIVER_BATCH = 8192


def _config() -> Any:
    from nexus_trio import Config, KernelConfig

    return Config(kernel=KernelConfig(mailbox_capacity=4096, request_timeout_ms=10000))


def _options(patient: bool) -> Any:
    """The join's options: the defaults, or (``--opcodes``, where the count slows the
    sender's thread tenfold and its heartbeats with it) a detector that waits a minute."""
    from nexus_trio._nats import ClusterOptions

    if not patient:
        return None
    return ClusterOptions(heartbeat_interval=2.0, missed_heartbeats=30, server_lost_wait=60.0)


async def _receiver(url: str, agents: int, patient: bool) -> None:
    import trio

    from nexus_trio import agent, open_kernel
    from nexus_trio._nats import cluster_of, join_cluster

    count = 0

    async def sink(ctx: Any, msg: Any) -> None:
        nonlocal count
        count += 1

    opcodes: Any = None

    @agent(name="count")
    async def counter(ctx: Any, msg: Any) -> Any:
        nonlocal opcodes
        if msg.payload == "stats":  # (what a drain that did not end says)
            return f"{ctx.kernel.stats()!r:.1500} {cluster_of(ctx.kernel).stats()!r:.2000}"
        if msg.payload == "opcodes-on":
            from opcode_count import InstructionCounter

            opcodes = InstructionCounter()
            opcodes.start()
            return "on"  # (a handler's None is no reply)
        if msg.payload == "opcodes-off":
            opcodes.stop()
            return _by_function(opcodes)
        return count if msg.payload == "count" else time.process_time()

    async with open_kernel(_config()) as kernel:
        for k in range(agents):
            kernel.spawn(agent(name=f"r-{k}")(sink))
        kernel.spawn(counter)
        async with join_cluster(kernel, url, "receiver", options=_options(patient)) as cluster:
            await cluster.names_published()
            print("READY", flush=True)
            await trio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)
            await kernel.shutdown()


def _by_function(counter: Any) -> dict[str, tuple[int, int]]:
    """An InstructionCounter's count by function: ``{name: (opcodes, runs)}``, most first."""
    by_function: collections.Counter[str] = collections.Counter()
    calls: collections.Counter[str] = collections.Counter()
    for (code, offset), hits in counter.hits.items():
        where = Path(code.co_filename)
        name = f"{where.parent.name}/{where.name}:{code.co_qualname}"
        by_function[name] += hits
        if offset == 0:  # (a code object's first instruction: its runs)
            calls[name] += hits
    return {name: (hits, calls[name]) for name, hits in by_function.most_common()}


def _callgrind(state: str) -> None:
    """Turn callgrind's count of this process on or off (``--toggle``)."""
    subprocess.run(
        ["callgrind_control", "-i", state, str(os.getpid())], check=True, capture_output=True
    )


async def _sender(
    url: str,
    agents: int,
    messages: int,
    opcodes: bool,
    patient: bool,
    toggle: bool,
    receiver_opcodes: bool = False,
) -> dict[str, Any]:
    import trio

    from nexus_trio import MailboxFull, agent, open_kernel
    from nexus_trio._nats import join_cluster

    count = 0

    async def sink(ctx: Any, msg: Any) -> None:
        nonlocal count
        count += 1

    result: dict[str, Any] = {}
    async with (
        open_kernel(_config()) as kernel,
        join_cluster(kernel, url, "sender", options=_options(opcodes or patient)) as cluster,
    ):
        half = agents // 2
        local = [kernel.spawn(agent(name=f"l-{k}")(sink)) for k in range(half)]
        with trio.fail_after(60):
            # every name of both sides known before the sends (as the demo's resolve
            # has them): a name learnt sends the tells the long way again once
            await cluster.names_published()
            await cluster.wait_for_name("count")
            for k in range(half):
                await cluster.wait_for_name(f"r-{k}")
        refs: list[Any] = []
        for k in range(half):
            refs += [local[k], f"r-{k}"]
        n = len(refs)
        send = kernel.send
        batch = max(256, min(4 * n, _DRIVER_BATCH))

        from nexus_trio.cli import _workloads

        sends = getattr(_workloads, "send_round_robin", None)
        if sends is None:
            # (a copy of the demo from before send_round_robin: its loop, as it was)
            async def sends(send: Any, refs: Any, payload: Any, i: int, count: int) -> int:
                for _ in range(count):
                    with contextlib.suppress(MailboxFull):
                        await send(refs[i % n], payload)
                    i += 1
                return i

        async def drive(total: int) -> None:
            # _drive_fanout's loop (the demo's driver, unpaced), for ``total`` messages
            i = 0
            while i < total:
                i = await sends(send, refs, BLOB, i, min(batch, total - i))
                await trio.lowlevel.checkpoint()

        def refused() -> int:
            return sum(kernel.stats().rejected.values())

        async def drained(local_goal: int, remote_goal: int) -> None:
            # (a send refused MailboxFull after send_timeout, counted rejected by the
            # kernel and skipped by the driver, is not waited for)
            remote = 0
            with trio.move_on_after(120):
                while count + remote < local_goal + remote_goal - refused():
                    await trio.sleep(0.002)
                    # (a receiver counting its opcodes answers ten times slower)
                    remote = await kernel.request("count", "count", timeout=60)
                return
            raise RuntimeError(
                f"handled {count} of {local_goal} here, {remote} of {remote_goal} there,"
                f" {refused()} refused"
                f" after 120 s: {kernel.stats().dead_lettered} dead letters; here"
                f" {kernel.stats()!r:.1500} {cluster.stats()!r:.2000};"
                f" there {await kernel.request('count', 'stats')}"
            )

        await drive(4 * n)  # warm-up: mailboxes open, routes known
        await drained(2 * n, 2 * n)
        base_local = count + refused()  # (the goal below takes off all refused)
        base_remote = await kernel.request("count", "count")
        cpu_there = await kernel.request("count", "cpu")
        counter = None
        if opcodes:
            from opcode_count import InstructionCounter

            counter = InstructionCounter()
            counter.start()
        if receiver_opcodes:
            await kernel.request("count", "opcodes-on")
        if toggle:
            _callgrind("on")
        cpu_here = time.process_time()
        t0 = time.perf_counter()
        await drive(messages)
        await drained(base_local + messages // 2, base_remote + messages // 2)
        cpu_here = time.process_time() - cpu_here
        elapsed = time.perf_counter() - t0
        if toggle:
            _callgrind("off")
        if counter is not None:
            counter.stop()
        cpu_there = await kernel.request("count", "cpu") - cpu_there
        crossing = messages // 2
        if receiver_opcodes:
            there = await kernel.request("count", "opcodes-off", timeout=120)
            result["receiver_opcodes_per_crossing_tell"] = (
                sum(hits for hits, _ in there.values()) / crossing
            )
            result["receiver_by_function"] = {
                name: (hits / crossing, runs / crossing) for name, (hits, runs) in there.items()
            }
        result["sender_cpu_us_per_crossing_tell"] = cpu_here / crossing * 1e6
        result["receiver_cpu_us_per_crossing_tell"] = cpu_there / crossing * 1e6
        result["messages_per_s"] = messages / elapsed
        if counter is not None:
            here = _by_function(counter)
            result["opcodes_per_crossing_tell"] = sum(hits for hits, _ in here.values()) / crossing
            result["by_function"] = {
                name: (hits / crossing, runs / crossing) for name, (hits, runs) in here.items()
            }
        await kernel.shutdown()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--opcodes", action="store_true")
    parser.add_argument(
        "--patient",
        action="store_true",
        help="a failure detector that waits a minute (implied by --opcodes; for valgrind)",
    )
    parser.add_argument("--receiver-opcodes", action="store_true")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument(
        "--toggle",
        action="store_true",
        help="run under valgrind --tool=callgrind --instr-atstart=no: count the sends and"
        " the drain only (callgrind_control; implies --patient)",
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import trio

    if args.serve:
        trio.run(_receiver, args.serve, args.agents // 2, args.patient)
        return

    from nexus_trio._nats import NatsServer

    with NatsServer() as server:
        receiver = subprocess.Popen(
            [sys.executable, __file__, "--serve", server.url, "--agents", str(args.agents)]
            + ["--patient"]
            * (args.patient or args.opcodes or args.toggle or args.receiver_opcodes),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
        )
        try:
            assert receiver.stdout is not None
            line = receiver.stdout.readline().decode().strip()
            if line != "READY":
                raise RuntimeError(f"the receiver did not start (said {line!r})")
            result = trio.run(
                _sender,
                server.url,
                args.agents,
                args.messages,
                args.opcodes,
                args.patient or args.toggle or args.receiver_opcodes,
                args.toggle,
                args.receiver_opcodes,
            )
        finally:
            assert receiver.stdin is not None
            receiver.stdin.close()
            try:
                receiver.wait(20)
            except subprocess.TimeoutExpired:
                receiver.kill()
                receiver.wait()
    if args.json:
        print(json.dumps(result))
        return
    print(
        f"sender {result['sender_cpu_us_per_crossing_tell']:.2f} us CPU a crossing tell,"
        f" receiver {result['receiver_cpu_us_per_crossing_tell']:.2f},"
        f" {result['messages_per_s']:,.0f} messages/s"
    )
    for side, key in (("sender", "by_function"), ("receiver", "receiver_by_function")):
        if key in result:
            total = sum(hits for hits, _ in result[key].values())
            print(f"opcodes a crossing tell ({side}): {total:.1f}")
            print("  opcodes   runs  (a crossing tell)")
            for name, (hits, runs) in list(result[key].items())[: args.top]:
                print(f"  {hits:7.2f} {runs:6.3f}  {name}")


if __name__ == "__main__":
    main()
