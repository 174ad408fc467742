"""What one cross-kernel request costs each side, counted (repeatable under load).

    python benchmarks/request_trace.py [--requests 1000] [--side nexus|raw|both] [--json]

The set-up of ``bench_nats.py`` (a private nats-server, a responder process, this
process as the client), one request at a time, but instead of timing them it counts,
on each side, per request:

* ``rounds``: turns of the event loop (Trio: its scheduler's I/O waits, ``blocking``
  those with a timeout, i.e. the process went to sleep; asyncio: ``_run_once``);
* ``steps``: Trio task steps, by task (nexus);
* ``handles``: asyncio callbacks run (under trio-asyncio each is a step of its loop's
  Trio task), by callback;
* ``sends``, ``recvs``: socket writes and reads (``socket.socket.send``/``recv`` and
  their kin, what asyncio's transports call);
* ``cpu_us``: user + system CPU time.

The responder reports its counters through a probe (a request before and after the
measured ones; their own cost is in the difference, 1/``--requests`` of it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import socket
import sys
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from responder_process import ResponderProcess  # noqa: E402  (beside this script)

PAYLOAD = {"task": "resize", "n": 0, "args": [1, 2, 3]}


class Counts:
    """Counters of one process (installed once, read as a snapshot)."""

    def __init__(self) -> None:
        self.c: Counter[str] = Counter()

    def snapshot(self) -> dict[str, float]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        out = dict(self.c)
        out["cpu_us"] = (usage.ru_utime + usage.ru_stime) * 1e6
        return out


COUNTS = Counts()


def _install_common() -> None:
    c = COUNTS.c

    def wrap_sock(name: str, key: str) -> None:
        original = getattr(socket.socket, name)

        def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
            c[key] += 1
            return original(self, *args, **kwargs)

        setattr(socket.socket, name, counted)

    for name in ("send", "sendall", "sendmsg"):
        wrap_sock(name, "sends")
    for name in ("recv", "recv_into"):
        wrap_sock(name, "recvs")

    handle_run = asyncio.events.Handle._run

    def run(self: Any) -> None:
        c["handles"] += 1
        cb = getattr(self, "_callback", None)
        name = getattr(cb, "__qualname__", None) or type(cb).__name__
        owner = getattr(cb, "__self__", None)
        if owner is not None and type(owner).__name__ in ("Task", "Future"):
            coro = getattr(owner, "get_coro", lambda: None)()
            name = f"{type(owner).__name__}:{getattr(coro, '__qualname__', '?')}.{name}"
        c["handle:" + name] += 1
        handle_run(self)

    asyncio.events.Handle._run = run  # type: ignore[method-assign]


def _install_trio() -> Any:
    import trio

    c = COUNTS.c

    class Steps(trio.abc.Instrument):
        def before_task_step(self, task: trio.lowlevel.Task) -> None:
            c["steps"] += 1
            c["step:" + task.name.rsplit(".", 1)[-1][:60]] += 1

        def before_io_wait(self, timeout: float) -> None:
            c["rounds"] += 1
            if timeout > 0:
                c["blocking"] += 1

    return Steps()


def _install_asyncio() -> None:
    import asyncio.base_events as base

    c = COUNTS.c
    run_once = base.BaseEventLoop._run_once

    def counted(self: Any) -> None:
        c["rounds"] += 1
        if not self._ready:
            c["blocking"] += 1  # (may sleep in select)
        run_once(self)

    base.BaseEventLoop._run_once = counted  # type: ignore[method-assign]


def _kernel_config() -> Any:
    from nexus_trio import Config, KernelConfig

    # (bench_nats.py's)
    return Config(kernel=KernelConfig(mailbox_capacity=4096, request_timeout_ms=5000))


# --- responders ------------------------------------------------------------------------------


async def _raw_responder(url: str) -> None:
    import nats

    nc = await nats.connect(url)

    async def echo(msg: Any) -> None:
        await msg.respond(msg.data)

    async def probe(msg: Any) -> None:
        await msg.respond(json.dumps(COUNTS.snapshot()).encode())

    await nc.subscribe("bench.echo", cb=echo)
    await nc.subscribe("bench.probe", cb=probe)
    # twice: nats-py 2.16's flush writes its PING ahead of the SUBs still in its buffer, so
    # only the second PONG says the server has them (see _direct.flush_after_subscribe)
    await nc.flush()
    await nc.flush()
    print("READY", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await nc.close()


async def _nexus_responder(url: str) -> None:
    import trio

    from nexus_trio import agent, open_kernel
    from nexus_trio._nats import join_cluster

    trio.lowlevel.add_instrument(_install_trio())

    @agent(name="echo")
    async def echo(ctx: Any, msg: Any) -> Any:
        return msg.payload

    @agent(name="probe")
    async def probe(ctx: Any, msg: Any) -> Any:
        return COUNTS.snapshot()

    async with open_kernel(_kernel_config()) as kernel:
        kernel.spawn(echo)
        kernel.spawn(probe)
        async with join_cluster(kernel, url, "responder") as cluster:
            await cluster.names_published()
            print("READY", flush=True)
            await trio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)
            await kernel.shutdown()


# --- clients ---------------------------------------------------------------------------------


def _diff(after: dict[str, float], before: dict[str, float], n: int) -> dict[str, float]:
    keys = set(after) | set(before)
    out = {k: (after.get(k, 0) - before.get(k, 0)) / n for k in keys}
    return {k: round(v, 3) for k, v in sorted(out.items()) if abs(v) >= 0.005}


async def _raw_client(url: str, requests: int) -> dict[str, Any]:
    import nats

    nc = await nats.connect(url)
    body = json.dumps(PAYLOAD).encode()
    for _ in range(200):
        await nc.request("bench.echo", body, timeout=5)
    remote0 = json.loads((await nc.request("bench.probe", b"", timeout=5)).data)
    local0 = COUNTS.snapshot()
    for _ in range(requests):
        await nc.request("bench.echo", body, timeout=5)
    local1 = COUNTS.snapshot()
    remote1 = json.loads((await nc.request("bench.probe", b"", timeout=5)).data)
    await nc.close()
    return {
        "client": _diff(local1, local0, requests),
        "responder": _diff(remote1, remote0, requests),
    }


async def _nexus_client(url: str, requests: int) -> dict[str, Any]:
    import trio

    from nexus_trio import open_kernel
    from nexus_trio._nats import join_cluster

    trio.lowlevel.add_instrument(_install_trio())
    async with (
        open_kernel(_kernel_config()) as kernel,
        join_cluster(kernel, url, "client") as cluster,
    ):
        await cluster.wait_for_name("echo")
        await cluster.wait_for_name("probe")
        for _ in range(200):
            await kernel.request("echo", PAYLOAD)
        remote0 = await kernel.request("probe", None)
        local0 = COUNTS.snapshot()
        for _ in range(requests):
            await kernel.request("echo", PAYLOAD)
        local1 = COUNTS.snapshot()
        remote1 = await kernel.request("probe", None)
        await kernel.shutdown()
    return {
        "client": _diff(local1, local0, requests),
        "responder": _diff(remote1, remote0, requests),
    }


def _show(label: str, result: dict[str, Any], detail: bool) -> None:
    print(f"== {label}")
    for side in ("client", "responder"):
        counts = result[side]
        main = {k: v for k, v in counts.items() if ":" not in k}
        print(f"  {side:10}", "  ".join(f"{k} {v:g}" for k, v in main.items()))
        if detail:
            for k, v in counts.items():
                if ":" in k:
                    print(f"      {k} {v:g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--side", choices=["nexus", "raw", "both"], default="both")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--detail", action="store_true", help="per task and callback")
    parser.add_argument("--serve", choices=["raw", "nexus"], help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    _install_common()
    if args.serve == "raw":
        _install_asyncio()
        asyncio.run(_raw_responder(args.url))
        return
    if args.serve == "nexus":
        import trio

        trio.run(_nexus_responder, args.url)
        return

    from nexus_trio._nats import NatsServer

    results: dict[str, Any] = {}
    with NatsServer() as server:
        if args.side in ("raw", "both"):
            responder = ResponderProcess(__file__, "raw", server.url)
            try:
                _install_asyncio()
                results["raw"] = asyncio.run(_raw_client(server.url, args.requests))
            finally:
                responder.close()
        if args.side in ("nexus", "both"):
            import trio

            responder = ResponderProcess(__file__, "nexus", server.url)
            try:
                results["nexus"] = trio.run(_nexus_client, server.url, args.requests)
            finally:
                responder.close()
    if args.json:
        print(json.dumps(results))
        return
    for label, result in results.items():
        _show(label, result, args.detail)


if __name__ == "__main__":
    main()
