"""Scenario 1, fan-out tell: N messages round-robin to A agents with a no-op handler.

Timed from the first send until every message has been *processed*, for four
implementations run one after another in the same process:

* ``raw trio``: one memory channel per consumer, ``send_nowait`` and a consumer that
  drains up to 64 messages per wake-up with ``receive_nowait`` (the ceiling: no
  handler call, no message object, no accounting);
* ``asyncio``: the baseline of the original post, one ``asyncio.Queue(maxsize=1024)``
  per agent, ``await q.put(...)``, handler loop ``await q.get(); await asyncio.sleep(0)``;
* ``asyncio + Message objects``: the same, but putting a nexus ``Message`` (what the
  kernel builds for every send) instead of an int, which isolates the cost of the
  message object from the cost of the kernel's queueing and accounting;
* ``kernel``: nexus_trio with every guarantee on (handle timeout armed, stats,
  dead-letter accounting), ``await kernel.send(...)`` from a driver task, waiting until
  ``stats().handled`` reaches N. Agents are activated by one message each first, as the
  baselines' consumer tasks are started before their clocks start.

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import trio
import trio.lowlevel

from .. import SYSTEM_ID, Config, Context, KernelConfig, Message, agent, new_id, open_kernel
from ._measure import wait_until
from ._result import Goal, Metric, ScenarioResult, check
from ._scales import Scale

NAME = "fan-out tell"
_BATCH = 64


@agent
async def _noop(ctx: Context, msg: Message) -> None:
    return None


async def kernel_fanout(
    agents: int, messages: int, *, activate: bool = True
) -> tuple[float, dict[str, int]]:
    """Timed fan-out through the kernel. ``activate``: every agent handles one message
    before the clock starts (as the baselines' consumer tasks are started first);
    without it the clock includes each agent's first start, as in ``nexus run -w fanout``."""
    config = Config(kernel=KernelConfig(mailbox_capacity=1024))
    warm = agents if activate else 0
    async with open_kernel(config) as kernel:
        refs = [kernel.spawn(_noop) for _ in range(agents)]
        if activate:
            for ref in refs:
                kernel.send_nowait(ref, None)
            await wait_until(lambda: kernel.stats().handled >= agents)
        send = kernel.send
        start = time.perf_counter()
        for i in range(messages):
            await send(refs[i % agents], i)
        target = warm + messages
        await wait_until(lambda: kernel.stats().handled >= target)
        elapsed = time.perf_counter() - start
        stats = kernel.stats()
    final = kernel.stats()
    counts = {
        "sent": warm + messages,
        "accepted": final.accepted,
        "handled": final.handled,
        "dead_lettered": final.dead_lettered,
        "in_flight": final.in_flight,
        "handled_before_shutdown": stats.handled,
    }
    return elapsed, counts


async def trio_fanout(agents: int, messages: int) -> tuple[float, int]:
    processed = 0
    done = trio.Event()

    async def consumer(receive: trio.MemoryReceiveChannel[int]) -> None:
        nonlocal processed
        receive_nowait = receive.receive_nowait
        while True:
            await receive.receive()
            n = 1
            try:
                while n < _BATCH:
                    receive_nowait()
                    n += 1
            except trio.WouldBlock:
                pass
            processed += n
            if processed >= messages:
                done.set()

    async with trio.open_nursery() as nursery:
        senders = []
        for _ in range(agents):
            send, receive = trio.open_memory_channel[int](1024)
            senders.append(send)
            nursery.start_soon(consumer, receive)
        await trio.lowlevel.checkpoint()
        start = time.perf_counter()
        for i in range(messages):
            channel = senders[i % agents]
            try:
                channel.send_nowait(i)
            except trio.WouldBlock:
                await channel.send(i)
        await done.wait()
        elapsed = time.perf_counter() - start
        nursery.cancel_scope.cancel()
    return elapsed, processed


async def asyncio_fanout(
    agents: int,
    messages: int,
    with_messages: bool = False,
    phase: Callable[[str, int], object] | None = None,
) -> tuple[float, int]:
    """``phase``, if given, is called with ``"start"``, ``"sent"`` and ``"handled"`` and
    the count of messages handled so far, outside the clock's per-message loops
    (``benchmarks/fanout_memory.py`` reads the process's page faults there)."""
    processed = 0
    done = asyncio.Event()

    async def handler(queue: asyncio.Queue[Any]) -> None:
        nonlocal processed
        while True:
            await queue.get()
            await asyncio.sleep(0)
            processed += 1
            if processed == messages:
                done.set()

    queues: list[asyncio.Queue[Any]] = [asyncio.Queue(maxsize=1024) for _ in range(agents)]
    tasks = [asyncio.create_task(handler(q)) for q in queues]
    await asyncio.sleep(0)
    if phase is not None:
        phase("start", processed)
    start = time.perf_counter()
    if with_messages:
        # The same queues carrying the kernel's own Message objects (id, timestamp, ...):
        # isolates what the kernel adds beyond building a message per send.
        ids = [new_id() for _ in range(agents)]
        for i in range(messages):
            await queues[i % agents].put(Message(sender=SYSTEM_ID, to=ids[i % agents], payload=i))
    else:
        for i in range(messages):
            await queues[i % agents].put(i)
    if phase is not None:
        phase("sent", processed)
    await done.wait()
    elapsed = time.perf_counter() - start
    if phase is not None:
        phase("handled", processed)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return elapsed, processed


def run(scale: Scale) -> ScenarioResult:
    agents, messages = scale.fanout_agents, scale.fanout_messages
    trio_s, trio_n = trio.run(trio_fanout, agents, messages)
    asyncio_s, asyncio_n = asyncio.run(asyncio_fanout(agents, messages))
    asyncio_msg_s, asyncio_msg_n = asyncio.run(asyncio_fanout(agents, messages, True))
    kernel_s, counts = trio.run(kernel_fanout, agents, messages)
    check(trio_n >= messages, f"raw trio fan-out processed {trio_n} of {messages}")
    check(asyncio_n == messages, f"asyncio fan-out processed {asyncio_n} of {messages}")
    check(asyncio_msg_n == messages, f"asyncio (Message) processed {asyncio_msg_n} of {messages}")
    check(
        counts["handled"] == counts["sent"] == counts["accepted"]
        and counts["dead_lettered"] == 0
        and counts["in_flight"] == 0,
        f"kernel fan-out counts do not add up: {counts}",
    )
    rates: dict[str, Any] = {
        "raw trio": messages / trio_s,
        "asyncio": messages / asyncio_s,
        "asyncio + Message objects": messages / asyncio_msg_s,
    }
    kernel_rate = messages / kernel_s
    label = f"{messages:,} msgs to {agents:,} agents"
    metrics = (
        Metric(
            NAME,
            f"{label}: throughput",
            "msg/s",
            kernel_rate,
            rates,
            reference="asyncio",
            goal=Goal(">= 1.0x asyncio (stretch 1.5x)", "ratio", ">=", 1.0),
        ),
        Metric(
            NAME,
            f"{label}: share of the raw trio ceiling",
            "msg/s",
            kernel_rate,
            rates,
            reference="raw trio",
            goal=Goal(">= 35% of raw trio", "ratio", ">=", 0.35),
        ),
    )
    counts = dict(
        counts,
        raw_trio_processed=trio_n,
        asyncio_processed=asyncio_n,
        asyncio_message_processed=asyncio_msg_n,
    )
    return ScenarioResult(NAME, metrics, counts)
