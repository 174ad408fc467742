"""How long after a ``cluster.register_type`` made after the join another node still
places the type as if the registering node did not run it (the window the docs speak
of), on a real nats-server, and what a spawn from that node meets in it.

    python benchmarks/register_window.py [--rounds 5]

Two nodes (``a``, ``b``) on a private nats-server; each round ``b`` registers a new type
and ``a`` looks, every 0.1 ms of Trio's clock, whether it takes ``b`` for a member that
runs it (``Cluster.runs``: what placement asks). Also, at once after the registration,
``a`` (which runs no type) spawns an agent of the type by hash: the outcome is printed.
"""

from __future__ import annotations

import argparse
import time

import trio

from nexus_trio import Config, Context, Message, agent, open_kernel
from nexus_trio._nats import NatsServer, join_cluster


@agent(name="noop")
async def noop(ctx: Context, msg: Message) -> None:
    pass


async def main(rounds: int) -> None:
    with NatsServer() as server:
        async with (
            open_kernel(Config()) as ka,
            join_cluster(ka, server.url, "a") as ca,
            open_kernel(Config()) as kb,
            join_cluster(kb, server.url, "b") as cb,
        ):
            while "b" not in {i.node for i in ca.member_list()}:  # noqa: ASYNC110
                await trio.sleep(0.01)
            for n in range(rounds):
                type_name = f"t{n}"
                started = time.perf_counter()
                cb.register_type(type_name, noop)
                try:
                    await ca.spawn(type_name, name=f"x{n}", timeout=2.0)
                    outcome = "placed"
                except Exception as exc:
                    outcome = f"{type(exc).__name__}: {exc}"
                while not ca.placement.runs("b", type_name):  # noqa: ASYNC110
                    await trio.sleep(0.0001)
                heard = time.perf_counter() - started
                print(
                    f"round {n + 1}: a heard b runs {type_name} after {heard * 1e3:.1f} ms;"
                    f" a spawn by hash at once (a runs no type): {outcome}"
                )
            await ka.shutdown()
            await kb.shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    trio.run(main, parser.parse_args().rounds)
