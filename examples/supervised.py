"""A supervision tree that heals itself.

``rest_for_one`` supervisor "service" with three children started in order:

* ``store``   — holds the data (a dict); everything after it depends on it;
* ``cache``   — asks the store on a miss and remembers the answer;
* ``fetcher`` — flaky: every third request raises, as a network client might.

When ``fetcher`` fails, only it is restarted (it is last). When ``store`` fails, the
cache is restarted too (its contents may be stale), as OTP's ``rest_for_one`` does.
Messages sent while an agent waits out its restart backoff stay in its mailbox.

Run it with ``python examples/supervised.py``. It prints the lifecycle events and
exits 0 when every answer was right and the books balance.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any

import trio

from nexus_trio import (
    Agent,
    Backoff,
    Context,
    EventKind,
    Message,
    RequestFailed,
    Supervisor,
    agent,
    open_kernel,
)


class Store(Agent):
    def __init__(self) -> None:
        self.data = {f"k{i}": i * i for i in range(10)}

    async def handle(self, ctx: Context, msg: Message) -> Any:
        if msg.payload == "crash":
            raise RuntimeError("store lost its disk")
        return self.data.get(msg.payload)


class Cache(Agent):
    def __init__(self) -> None:
        self.entries: dict[str, Any] = {}

    async def on_start(self, ctx: Context) -> None:
        ctx.log.info("cache starting empty")

    async def handle(self, ctx: Context, msg: Message) -> Any:
        key = msg.payload
        if key not in self.entries:
            self.entries[key] = await ctx.request("store", key)
        return {"value": self.entries[key], "cached": len(self.entries)}


class Fetcher(Agent):
    calls = 0  # class-level: survives restarts, so the failures are predictable

    async def handle(self, ctx: Context, msg: Message) -> Any:
        Fetcher.calls += 1
        if Fetcher.calls % 3 == 0:
            raise ConnectionError(f"upstream reset on call {Fetcher.calls}")
        return await ctx.request("cache", msg.payload)


SERVICE = Supervisor(
    name="service",
    strategy="rest_for_one",
    max_restarts=10,
    within=5.0,
    backoff=Backoff(initial=0.01, maximum=0.1, jitter=0.2),
    children=[
        agent(Store, name="store"),
        agent(Cache, name="cache"),
        agent(Fetcher, name="fetcher"),
    ],
)


async def main() -> int:
    wrong = 0
    failed = 0
    async with open_kernel() as kernel:
        async with kernel.events() as events:
            kernel.spawn(SERVICE)

            fetcher_restarts = 0
            restarted = trio.Condition()

            async def show_events() -> None:
                nonlocal fetcher_restarts
                async for event in events:
                    reason = f" ({event.reason})" if event.reason else ""
                    print(f"  event: {event.name} {event.kind.value}{reason}")
                    if event.name == "fetcher" and event.kind is EventKind.RESTARTED:
                        fetcher_restarts += 1
                        async with restarted:
                            restarted.notify_all()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(show_events)
                for i in range(12):
                    key = f"k{i % 10}"
                    try:
                        answer = await kernel.request("fetcher", key, timeout=2.0)
                    except RequestFailed as exc:
                        failed += 1
                        print(f"request {i}: failed ({exc.reason}), the fetcher restarts")
                        continue
                    ok = answer["value"] == (i % 10) ** 2
                    wrong += not ok
                    print(f"request {i}: {key} -> {answer['value']} (cached {answer['cached']})")
                # The fetcher's last failure: its restart runs once its backoff is over
                # (a group restart that came first would take it along, and the restart
                # that never ran would count for nothing). Waited for by its event, not
                # a sleep a loaded machine can outlast.
                with trio.move_on_after(10):
                    async with restarted:
                        while fetcher_restarts < failed:
                            await restarted.wait()
                print("crashing the store: the cache is restarted after it (rest_for_one)")
                with contextlib.suppress(RequestFailed):
                    await kernel.request("store", "crash")
                await trio.sleep(0.2)  # restarts are asynchronous: give the backoff time
                answer = await kernel.request("cache", "k3", timeout=2.0)
                print(f"after the store restart the cache holds {answer['cached']} entry")
                wrong += answer != {"value": 9, "cached": 1}
                await trio.sleep(0.1)
                nursery.cancel_scope.cancel()
        stats = kernel.stats(agents=True)
    restarts = {a.name: a.restarts for a in stats.agents}
    print(f"restarts per agent: {restarts}")
    print(
        f"accepted {stats.accepted} = handled {stats.handled} + replies "
        f"{stats.replies_delivered} + dead letters {stats.dead_lettered} + in flight "
        f"{stats.in_flight}"
    )
    balanced = stats.accepted == (
        stats.handled + stats.replies_delivered + stats.dead_lettered + stats.in_flight
    )
    return 0 if wrong == 0 and failed == 4 and balanced else 1


if __name__ == "__main__":
    sys.exit(trio.run(main))
