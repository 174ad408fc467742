"""How the kernel's and the cluster transport's attribute accesses specialized, per hot function.

    python benchmarks/attr_forms.py [--side kernel|cluster|both] [--messages 200000]
                                    [--tells 20000] [--min-calls 0.05] [--all]

Warms a representative workload up in this process (``kernel``: the fan-out goal's own
``kernel_fanout``; ``cluster``: two kernels joined through a private nats-server, one
sending ``--tells`` tells and requests to the other's agents, both sides in this process),
then lists, for every function of ``nexus_trio`` called at least ``--min-calls`` times per
message (counted by a second, profiled run), the CPython 3.11 specialized form of each of
its attribute loads, stores and method loads (``dis.get_instructions(code, adaptive=True)``).
Good forms: ``*_INSTANCE_VALUE``, ``*_SLOT``, ``LOAD_METHOD_WITH_VALUES`` / ``NO_DICT`` /
``MODULE`` / ``CLASS``. Bad: ``*_WITH_HINT`` and ``LOAD_METHOD_WITH_DICT`` (an instance dict
of its own: more than 30 attributes), ``*_ADAPTIVE`` (not specializable: a property, a class
attribute read through an instance, a ``__getattr__``; or a line the workload never ran).
Then it counts the instance attributes of every live ``nexus_trio`` object by class.
"""

from __future__ import annotations

import argparse
import collections
import dis
import gc
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nexus_trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from opcode_count import Hits, InstructionCounter

PACKAGE = str(Path(nexus_trio.__file__).resolve().parent)
_BAD = ("_WITH_HINT", "_ADAPTIVE", "LOAD_METHOD_WITH_DICT")
_ATTR_OPS = ("LOAD_ATTR", "STORE_ATTR", "LOAD_METHOD")


def _codes(code: types.CodeType) -> Iterator[types.CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _codes(const)


def _package_codes() -> Iterator[types.CodeType]:
    seen: set[int] = set()
    classes: set[type] = set()
    for module in list(sys.modules.values()):
        if not getattr(module, "__file__", "") or not str(module.__file__).startswith(PACKAGE):
            continue
        stack: list[Any] = list(vars(module).values())
        while stack:
            item = stack.pop()
            if isinstance(item, type) and item.__module__ == module.__name__:
                if item in classes:
                    continue
                classes.add(item)
                stack.extend(vars(item).values())
                continue
            if isinstance(item, (staticmethod, classmethod)):
                item = item.__func__
            if isinstance(item, property):
                stack.extend(f for f in (item.fget, item.fset) if f is not None)
                continue
            code = getattr(item, "__code__", None)
            if isinstance(code, types.CodeType) and code.co_filename.startswith(PACKAGE):
                for inner in _codes(code):
                    if id(inner) not in seen:
                        seen.add(id(inner))
                        yield inner


def _label(code: types.CodeType) -> str:
    return (
        f"{code.co_filename.split('/nexus_trio/', 1)[1]}:{code.co_firstlineno} {code.co_qualname}"
    )


def forms(code: types.CodeType) -> list[tuple[int, str, str, int | None]]:
    """(offset, specialized opname, attribute, line) of each attribute access of ``code``."""
    out = []
    for ins in dis.get_instructions(code, adaptive=True):
        if ins.opname.startswith(_ATTR_OPS):
            line = ins.positions.lineno if ins.positions else None
            out.append((ins.offset, ins.opname, str(ins.argval), line))
    return out


def instance_attributes() -> dict[str, int]:
    """Most instance-dict keys of any live object of each ``nexus_trio`` class."""
    most: dict[str, int] = {}
    for obj in gc.get_objects():
        cls = type(obj)
        if not cls.__module__.startswith("nexus_trio") or isinstance(obj, type):
            continue
        try:
            count = len(object.__getattribute__(obj, "__dict__"))
        except (AttributeError, TypeError):
            continue
        name = f"{cls.__module__}.{cls.__qualname__}"
        most[name] = max(most.get(name, 0), count)
    return most


_LIVE: dict[str, int] = {}
_SAMPLE = False


def _sample() -> None:
    if _SAMPLE:  # reading __dict__ materializes it: only after the snapshot of the forms
        for name, n in instance_attributes().items():
            _LIVE[name] = max(_LIVE.get(name, 0), n)


async def _kernel(messages: int) -> int:
    from nexus_trio.bench._fanout import kernel_fanout

    async def sample_soon() -> None:
        await trio.sleep(0.5)
        _sample()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sample_soon)
        await kernel_fanout(1000, messages)
    return messages


async def _cluster(tells: int) -> int:
    from nexus_trio import Config, KernelConfig, agent, open_kernel
    from nexus_trio._nats import NatsServer, join_cluster
    from nexus_trio.bench._measure import wait_until

    count = 0

    @agent(name="echo")
    async def echo(ctx: Any, msg: Any) -> Any:
        return msg.payload

    @agent(name="sink")
    async def sink(ctx: Any, msg: Any) -> None:
        nonlocal count
        count += 1

    config = Config(
        kernel=KernelConfig(
            mailbox_capacity=4096, request_timeout_ms=60_000, send_timeout_ms=60_000
        )
    )
    payload = {"task": "resize", "n": 0, "args": [1, 2, 3]}
    with NatsServer() as server:
        async with (
            open_kernel(config) as responder,
            open_kernel(config) as client,
            join_cluster(responder, server.url, "responder") as serving,
            join_cluster(client, server.url, "client") as cluster,
        ):
            responder.spawn(echo)
            responder.spawn(sink)
            await serving.names_published()
            await cluster.wait_for_name("echo")
            await cluster.wait_for_name("sink")
            for _ in range(tells // 10):
                await client.request("echo", payload)
            for _ in range(tells):
                await client.send("sink", payload)
            await wait_until(lambda: count >= tells)
            _sample()
            await client.shutdown()
            await responder.shutdown()
    return tells + tells // 10


def _traced(run: Callable[[], int]) -> tuple[Hits, int]:
    """Executions of each instruction (code, offset) of the package during ``run``."""
    with InstructionCounter(lambda code: code.co_filename.startswith(PACKAGE)) as counter:
        messages = run()
    return counter.hits, messages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", choices=["kernel", "cluster", "both"], default="both")
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--tells", type=int, default=20_000)
    parser.add_argument("--min-calls", type=float, default=0.05, help="calls per message")
    parser.add_argument("--all", action="store_true", help="list good forms too")
    args = parser.parse_args()
    runs: list[tuple[Callable[[], int], Callable[[], int]]] = []
    if args.side in ("kernel", "both"):
        runs.append(
            (
                lambda: trio.run(_kernel, args.messages),
                lambda: trio.run(_kernel, args.messages // 10),
            )
        )
    if args.side in ("cluster", "both"):
        runs.append(
            (lambda: trio.run(_cluster, args.tells), lambda: trio.run(_cluster, args.tells // 4))
        )
    for warm, _ in runs:  # specialize
        warm()
    snapshot = {code: forms(code) for code in _package_codes()}
    global _SAMPLE
    _SAMPLE = True
    per_message: collections.Counter[tuple[types.CodeType, int]] = collections.Counter()
    for _, traced in runs:
        hits, messages = _traced(traced)
        for key, n in hits.items():
            per_message[key] += n / messages
    totals: collections.Counter[str] = collections.Counter()
    rows = []
    for code, accesses in snapshot.items():
        hot = [
            (per_message[(code, offset)], *access)
            for offset, *access in accesses
            if per_message[(code, offset)] >= args.min_calls
        ]
        totals.update(a[1] for a in hot)
        bad = [a for a in hot if args.all or any(b in a[1] for b in _BAD)]
        if bad:
            rows.append((max(a[0] for a in hot), code, bad))
    for _, code, bad in sorted(rows, key=lambda r: -r[0]):
        print(_label(code))
        for n, opname, attr, line in bad:
            print(f"  {n:7.2f}/msg  {line}: {opname} .{attr}")
    print("\nforms over the hot functions:")
    for opname, n in totals.most_common():
        print(f"  {n:5} {opname}")
    print("\ninstance attributes (most on a live object), classes with a __dict__:")
    for name, n in sorted(_LIVE.items(), key=lambda kv: -kv[1]):
        print(f"  {n:3} {name}")


if __name__ == "__main__":
    main()
