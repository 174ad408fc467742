"""Pools of agents: one address, N workers, three ways to pick a worker, resized live.

* ``sessions`` keeps a counter per user in each worker: consistent hashing on the user
  sends all of a user's messages to the same worker, so its state is where it is needed.
  Growing the pool moves only about 1/N of the users (all to the new worker).
* ``crunchers`` does jobs of uneven length: least-loaded routing gives each job to the
  worker with the fewest jobs queued, so the long jobs do not hold up the short ones.
* Both are resized at runtime; shrinking lets the removed workers finish their queues.

Run it with ``python examples/pool.py`` (``--users N --hits N`` to change the load).
"""

from __future__ import annotations

import argparse
from collections import Counter
from typing import Any

import trio

from nexus_trio import Agent, Context, Message, open_kernel, pool, pool_workers, resize_pool


class Session(Agent):
    """Counts hits per user; the counts live in this worker (fresh after a restart)."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()

    async def handle(self, ctx: Context, msg: Message) -> Any:
        user = msg.payload["user"]
        self.hits[user] += 1
        return {"user": user, "hits": self.hits[user], "worker": ctx.name}


async def crunch(ctx: Context, msg: Message) -> Any:
    """A job that takes ``msg.payload`` seconds (short, for the example)."""
    await trio.sleep(msg.payload)
    return ctx.name


async def main(users: int, hits: int) -> None:
    async with open_kernel() as kernel:
        kernel.spawn(
            pool(
                Session,
                size=3,
                name="sessions",
                routing="consistent_hash",
                key=lambda msg: msg.payload["user"],
            )
        )
        names = [f"user-{i}" for i in range(users)]
        homes: dict[str, set[str]] = {user: set() for user in names}
        counted: dict[str, int] = {}
        for _ in range(hits):
            for user in names:
                reply = await kernel.request("sessions", {"user": user})
                homes[user].add(reply["worker"])
                counted[user] = reply["hits"]
        sticky = all(len(workers) == 1 for workers in homes.values())
        complete = all(n == hits for n in counted.values())
        print(
            f"sessions: {users} users x {hits} hits; one worker per user: {sticky}; "
            f"every count reached {hits}: {complete}"
        )
        owner = {user: next(iter(workers)) for user, workers in homes.items()}
        print("users per worker:", dict(sorted(Counter(owner.values()).items())))

        await resize_pool(kernel, "sessions", 4)
        moved = []
        for user in names:
            reply = await kernel.request("sessions", {"user": user})
            if reply["worker"] != owner[user]:
                moved.append((user, reply["worker"], reply["hits"]))
        new_homes = sorted({worker for _, worker, _ in moved})
        print(f"grew sessions to 4 workers: {len(moved)} of {users} users moved, to {new_homes}")

        kernel.spawn(pool(crunch, size=3, name="crunchers", routing="least_loaded"))
        done: Counter[str] = Counter()
        async with trio.open_nursery() as nursery:

            async def job(seconds: float) -> None:
                done[await kernel.request("crunchers", seconds)] += 1

            for i in range(30):
                nursery.start_soon(job, 0.05 if i % 10 == 0 else 0.001)
        print("crunchers (least loaded): jobs per worker", dict(sorted(done.items())))
        await resize_pool(kernel, "crunchers", 1)
        remaining = [ref.name for ref in await pool_workers(kernel, "crunchers")]
        print(f"shrank crunchers to {remaining}")
    stats = kernel.stats()
    print(
        f"shut down cleanly: {stats.handled} handled, {stats.replies_delivered} replies, "
        f"{stats.dead_lettered} dead letters, {stats.in_flight} in flight"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=12, help="distinct users (default 12)")
    parser.add_argument("--hits", type=int, default=5, help="requests per user (default 5)")
    args = parser.parse_args()
    for flag, value in (("--users", args.users), ("--hits", args.hits)):
        if value < 1:  # (--hits 0 left no session to find a worker of)
            parser.error(f"argument {flag}: must be >= 1, got {value}")
    trio.run(main, args.users, args.hits)
