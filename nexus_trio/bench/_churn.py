"""Scenario 6, supervision churn: restarts per second of an agent that fails every message.

One agent under a ``one_for_one`` supervisor with a restart intensity it never reaches
and ``Backoff(initial=0, maximum=0)`` (restart at once, as OTP does) receives K
messages; its handler raises on each, so each message is dead-lettered
(``handler_error``) and the agent restarted, keeping its mailbox. Timed until K restarts
have happened. The baseline is a hand-written trio restart loop: a task in a fresh
nursery that takes one message from a channel and raises, caught and started again.
Kernel error logs are created but not printed while this runs.

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

import time
from typing import Any

import trio

from .. import Backoff, Context, Message, Supervisor, agent, open_kernel
from ._measure import quiet_kernel_logs, wait_until
from ._result import Metric, ScenarioResult, check
from ._scales import Scale

NAME = "supervision churn"


class _Boom(Exception):
    pass


@agent(name="flaky", on_error="restart")
async def _flaky(ctx: Context, msg: Message) -> None:
    raise _Boom(msg.payload)


async def _kernel_churn(restarts: int) -> dict[str, Any]:
    supervisor = Supervisor(
        strategy="one_for_one",
        max_restarts=10 * restarts + 10,
        within=3600.0,
        backoff=Backoff(initial=0.0, maximum=0.0, jitter=0.0),
        children=(_flaky,),
        name="churn",
    )
    async with open_kernel() as kernel:
        kernel.spawn(supervisor)
        flaky = kernel.lookup("flaky")
        start = time.perf_counter()
        for i in range(restarts):
            await kernel.send(flaky, i)
        await wait_until(lambda: kernel.stats().restarts >= restarts)
        elapsed = time.perf_counter() - start
    stats = kernel.stats()
    return {
        "elapsed": elapsed,
        "sent": restarts,
        "restarts": stats.restarts,
        "failed": stats.failed,
        "handler_errors": stats.dead_letters_by_reason.get("handler_error", 0),
        "accepted": stats.accepted,
        "dead_lettered": stats.dead_lettered,
        "in_flight": stats.in_flight,
    }


async def _trio_churn(restarts: int) -> tuple[float, int]:
    send, receive = trio.open_memory_channel[int](restarts)

    async def failing() -> None:
        payload = await receive.receive()
        raise _Boom(payload)

    for i in range(restarts):
        send.send_nowait(i)
    count = 0
    start = time.perf_counter()
    while count < restarts:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(failing)
        except* _Boom:
            count += 1
    return time.perf_counter() - start, count


def run(scale: Scale) -> ScenarioResult:
    k = scale.churn_restarts
    trio_s, trio_n = trio.run(_trio_churn, k)
    with quiet_kernel_logs():
        r = trio.run(_kernel_churn, k)
    check(trio_n == k, f"raw trio churn restarted {trio_n} of {k} times")
    check(
        r["restarts"] == r["failed"] == r["handler_errors"] == r["sent"] == r["accepted"]
        and r["dead_lettered"] == r["sent"]
        and r["in_flight"] == 0,
        f"churn counts do not add up: {r}",
    )
    metrics = (
        Metric(
            NAME,
            "restarts/s (one_for_one, no backoff)",
            "restarts/s",
            k / r["elapsed"],
            {"raw trio": k / trio_s},
            reference="raw trio",
            note="each restart: handler error, dead letter, supervisor event, new run",
        ),
    )
    counts = {key: r[key] for key in ("sent", "restarts", "failed", "handler_errors")}
    counts["raw_trio_restarts"] = trio_n
    return ScenarioResult(NAME, metrics, counts)
