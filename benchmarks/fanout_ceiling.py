"""How fast can a fan-out of real messages go in the promised shape? A ceiling, measured.

    python benchmarks/fanout_ceiling.py [--rounds 3] [--messages 1000000] [--agents 1000]

The fan-out goal of issue 11 compares ``await kernel.send(ref, i)`` with the original
post's asyncio script, which puts bare ints on ``asyncio.Queue``. This script measures,
in alternating rounds of the same process run, what the shape itself allows:

* ``asyncio``: the baseline (``nexus_trio.bench._fanout.asyncio_fanout``);
* ``minimal``: the least a kernel of this shape can do per tell: build a ``Message``
  (``new_message``, as the kernel does), look the recipient up in a dict, ``send_nowait``
  on its memory channel, count; one task per agent that takes up to 64 messages per
  wake-up with ``receive_nowait`` and steps a no-op ``async def`` handler by hand (as the
  kernel does, to arm a deadline only for a handler that suspends). No policies, no
  ledger, no supervision, no sampling;
* ``minimal, collector off``: the same with ``gc.disable()`` (the kernel's heap keeper
  freezes queued messages so that the collector does not walk them; this shows what the
  collector costs a design that does not);
* ``minimal, ints``: the same carrying the int instead of a ``Message``;
* ``kernel``: ``nexus_trio.bench._fanout.kernel_fanout`` (the goal's measurement).

Each figure is messages per second from the first send until every message is handled;
ratios are against asyncio in the same round.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
import trio.testing

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from nexus_trio import SYSTEM_ID, MessageKind, new_id  # noqa: E402
from nexus_trio._message import new_message  # noqa: E402
from nexus_trio.bench._fanout import asyncio_fanout, kernel_fanout  # noqa: E402

_BATCH = 64
_COMMAND = MessageKind.COMMAND


async def _no_op(ctx: Any, msg: Any) -> None:
    return None


async def minimal_fanout(agents: int, messages: int, *, ints: bool = False) -> float:
    """Seconds for ``messages`` tells round-robin over ``agents`` (see the module doc)."""
    handled = 0
    done = trio.Event()
    ids = [new_id() for _ in range(agents)]
    routes: dict[uuid.UUID, trio.MemorySendChannel[Any]] = {}

    async def consumer(receive: trio.MemoryReceiveChannel[Any]) -> None:
        nonlocal handled
        receive_nowait = receive.receive_nowait
        while True:
            msg = await receive.receive()
            for n in range(_BATCH):
                if n:
                    try:
                        msg = receive_nowait()
                    except trio.WouldBlock:
                        break
                coro = _no_op(None, msg)
                try:
                    coro.send(None)
                except StopIteration as stop:
                    _ = stop.value  # the kernel's loop reads the result too
                handled += 1
            else:
                await trio.lowlevel.checkpoint()
            if handled >= messages:
                done.set()

    async with trio.open_nursery() as nursery:
        for agent_id in ids:
            send, receive = trio.open_memory_channel[Any](1024)
            routes[agent_id] = send
            nursery.start_soon(consumer, receive)
        await trio.testing.wait_all_tasks_blocked()

        async def tell(to: uuid.UUID, payload: int) -> None:
            channel = routes[to]
            value = payload if ints else new_message(SYSTEM_ID, to, payload, _COMMAND, None)
            try:
                channel.send_nowait(value)
            except trio.WouldBlock:
                await channel.send(value)

        start = time.perf_counter()
        for i in range(messages):
            await tell(ids[i % agents], i)
        await done.wait()
        elapsed = time.perf_counter() - start
        nursery.cancel_scope.cancel()
    return elapsed


def _collector_off(run: Callable[[], float]) -> float:
    gc.disable()
    try:
        return run()
    finally:
        gc.enable()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--agents", type=int, default=1_000)
    args = parser.parse_args()
    agents, messages = args.agents, args.messages

    def run_asyncio() -> float:
        seconds, count = asyncio.run(asyncio_fanout(agents, messages))
        assert count == messages
        return seconds

    def run_kernel() -> float:
        seconds, counts = trio.run(kernel_fanout, agents, messages)
        assert counts["handled"] == counts["sent"] and counts["dead_lettered"] == 0
        return seconds

    def run_minimal(ints: bool = False) -> Callable[[], float]:
        async def go() -> float:
            return await minimal_fanout(agents, messages, ints=ints)

        def run() -> float:
            return trio.run(go)

        return run

    cases: dict[str, Callable[[], float]] = {
        "asyncio": run_asyncio,
        "minimal": run_minimal(),
        "minimal, collector off": lambda: _collector_off(run_minimal()),
        "minimal, ints": run_minimal(ints=True),
        "kernel": run_kernel,
    }
    ratios: dict[str, list[float]] = {name: [] for name in cases}
    rates: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        seconds = {name: run() for name, run in cases.items()}
        for name, s in seconds.items():
            rates[name].append(messages / s)
            ratios[name].append(seconds["asyncio"] / s)
    print(f"fan-out ceiling: {messages:,} messages to {agents:,} agents, {args.rounds} rounds")
    for name in cases:
        per_round = " ".join(f"{r:.2f}x" for r in ratios[name])
        print(
            f"{name:24} {statistics.median(rates[name]):>10,.0f} msg/s"
            f"   vs asyncio: median {statistics.median(ratios[name]):.2f}x ({per_round})"
        )


if __name__ == "__main__":
    main()
