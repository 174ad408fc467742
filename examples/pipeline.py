"""A pipeline of agents: a planner fans tasks out to workers, an aggregator collects results.

    planner ──request──▶ worker-0 ┐
            ──request──▶ worker-1 ├─ ctx.run_sync(checksum, ...)   (a blocking call, in a thread)
            ──request──▶ worker-2 ┘  worker-2 is flaky: it crashes on every Nth task it takes
    planner ──send─────▶ aggregator  (one result per task; asked for the total at the end)

The workers run under their own ``one_for_one`` supervisor. When the flaky worker crashes,
the kernel dead-letters the task it was working on, the planner's ``request`` fails at once
with ``RequestFailed``, and the supervisor restarts the worker (same name, same mailbox, so
the tasks queued behind the failed one are not lost). The planner then retries the failed
task on the next worker. The aggregator ignores duplicates, so the total is exact: every task
is counted once, and ``main`` checks it against a direct computation.

Run it with ``python examples/pipeline.py`` (``--help`` for the options); it exits 1 if the
result is incomplete or wrong.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from typing import Any

import trio

from nexus_trio import (
    Agent,
    Backoff,
    Context,
    Kernel,
    Message,
    RequestFailed,
    RequestTimeout,
    Supervisor,
    agent,
    open_kernel,
)


def checksum(text: str, rounds: int) -> int:
    """The blocking work: ``rounds`` chained SHA-256 hashes of ``text``, as a small integer."""
    digest = text.encode()
    for _ in range(rounds):
        digest = hashlib.sha256(digest).digest()
    return int.from_bytes(digest[:4], "big")


class FlakyWorkerError(RuntimeError):
    """The flaky worker's deliberate crash."""


class Worker(Agent):
    """Computes one task per query through ``ctx.run_sync``; optionally crashes every Nth task.

    The count of tasks taken is per run: a restart starts from a fresh instance, so the
    flaky worker keeps failing on every Nth task after each restart too.
    """

    fail_every = 0  # 0 = never fails; set on a subclass for the flaky worker

    def __init__(self) -> None:
        self.taken = 0

    async def handle(self, ctx: Context, msg: Message) -> Any:
        task = msg.payload
        self.taken += 1
        if self.fail_every and self.taken % self.fail_every == 0:
            raise FlakyWorkerError(f"{ctx.name} crashed on task {task['id']} (as designed)")
        value = await ctx.run_sync(checksum, task["text"], task["rounds"])
        return {"id": task["id"], "value": value, "worker": ctx.name}


def worker_specs(count: int, fail_every: int) -> list[Any]:
    """``count`` workers named worker-0.. ; the last one fails every ``fail_every`` tasks."""
    flaky = type("FlakyWorker", (Worker,), {"fail_every": fail_every})
    specs = []
    for i in range(count):
        cls = flaky if i == count - 1 and fail_every else Worker
        specs.append(agent(name=f"worker-{i}", handle_timeout=30.0)(cls))
    return specs


class Aggregator(Agent):
    """Keeps one result per task id and job (a retried task can never be counted twice)."""

    def __init__(self) -> None:
        self.results: dict[int, dict[int, int]] = {}

    async def handle(self, ctx: Context, msg: Message) -> Any:
        payload = msg.payload
        if "summary" in payload:
            # The job is finished: answer and forget it, so a long-running service stays small.
            results = self.results.pop(payload["summary"], {})
            return {"count": len(results), "total": sum(results.values()), "ids": sorted(results)}
        self.results.setdefault(payload["job"], {}).setdefault(payload["id"], payload["value"])
        return None


def make_planner(workers: list[str], max_attempts: int) -> Any:
    """The planner: one job message -> every task run on some worker -> the aggregator's sum."""

    @agent(name="planner", handle_timeout=120.0)
    async def planner(ctx: Context, msg: Message) -> Any:
        tasks = msg.payload["tasks"]
        job = msg.payload.get("job", 0)
        retries = 0
        gave_up: list[int] = []
        per_worker: dict[str, int] = dict.fromkeys(workers, 0)

        async def run_task(index: int, task: dict[str, Any]) -> None:
            nonlocal retries
            for attempt in range(max_attempts):
                worker = workers[(index + attempt) % len(workers)]
                try:
                    result = await ctx.request(worker, task, timeout=30.0)
                except (RequestFailed, RequestTimeout) as exc:
                    if attempt + 1 == max_attempts:  # the last try: no retry follows
                        ctx.log.info("task %s failed on %s (%s)", task["id"], worker, exc)
                        continue
                    retries += 1
                    ctx.log.info("task %s failed on %s (%s); retrying", task["id"], worker, exc)
                    continue
                per_worker[result["worker"]] += 1
                await ctx.send(
                    "aggregator", {"job": job, "id": result["id"], "value": result["value"]}
                )
                return
            times = "1 time" if max_attempts == 1 else f"{max_attempts} times"
            ctx.log.error("task %s failed %s; giving up", task["id"], times)
            gave_up.append(task["id"])

        # The tasks run concurrently; each worker still handles its own queue one at a time.
        async with trio.open_nursery() as nursery:
            for index, task in enumerate(tasks):
                nursery.start_soon(run_task, index, task)
        # Sends from one agent to another keep their order: the summary comes after every result.
        summary = await ctx.request("aggregator", {"summary": job}, timeout=30.0)
        return {**summary, "retries": retries, "gave_up": sorted(gave_up), "per_worker": per_worker}

    return planner


def make_tasks(count: int, rounds: int) -> list[dict[str, Any]]:
    return [{"id": i, "text": f"task-{i}", "rounds": rounds} for i in range(count)]


def spawn_pipeline(kernel: Kernel, *, workers: int, fail_every: int, max_attempts: int) -> None:
    """The workers under their own supervisor, the aggregator and the planner."""
    kernel.spawn(
        Supervisor(
            name="workers",
            strategy="one_for_one",
            # The flaky worker crashes often by design; a real bug crashing faster escalates.
            max_restarts=100,
            within=60.0,
            backoff=Backoff(initial=0.01, maximum=0.1),
            children=worker_specs(workers, fail_every),
        )
    )
    kernel.spawn(Aggregator, name="aggregator")
    names = [f"worker-{i}" for i in range(workers)]
    kernel.spawn(make_planner(names, max_attempts=max_attempts))


async def service(kernel: Kernel) -> None:
    """For ``nexus run --app pipeline:service`` (run in ``examples/``, which ``--app`` imports
    from): run a job every few seconds until stopped.

    This is the workload scripts/deploy.sh and the Dockerfile use by default. Each job's
    summary is logged; a job that loses tasks is logged as an error.
    """
    log = logging.getLogger("nexus_trio.app.pipeline")
    spawn_pipeline(kernel, workers=3, fail_every=7, max_attempts=5)
    tasks, rounds = 20, 2000
    job = 0
    while True:
        job += 1
        try:
            summary = await kernel.request(
                "planner", {"job": job, "tasks": make_tasks(tasks, rounds)}, timeout=120.0
            )
        except (RequestFailed, RequestTimeout) as exc:
            log.error("job %d failed: %s", job, exc)
        else:
            level = logging.INFO if summary["count"] == tasks else logging.ERROR
            log.log(
                level,
                "job %d: %d/%d tasks, total %d, %d retried",
                job,
                summary["count"],
                tasks,
                summary["total"],
                summary["retries"],
            )
        await trio.sleep(SERVICE_PERIOD)


SERVICE_PERIOD = 5.0  # seconds between two jobs of the service


async def run_pipeline(
    *,
    tasks: int = 30,
    workers: int = 3,
    fail_every: int = 4,
    rounds: int = 2000,
    max_attempts: int = 5,
) -> dict[str, Any]:
    """Run the pipeline once and return the planner's summary plus kernel counters."""
    for name, value, minimum in (
        ("tasks", tasks, 1),
        ("workers", workers, 1),
        ("fail_every", fail_every, 0),
        ("rounds", rounds, 1),
        ("max_attempts", max_attempts, 1),
    ):
        if value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value}")
    job = make_tasks(tasks, rounds)
    async with open_kernel() as kernel:
        spawn_pipeline(kernel, workers=workers, fail_every=fail_every, max_attempts=max_attempts)
        summary: dict[str, Any] = await kernel.request("planner", {"tasks": job}, timeout=120.0)
    stats = kernel.stats()
    expected_ids = list(range(tasks))
    expected_total = sum(checksum(t["text"], t["rounds"]) for t in job)
    summary["restarts"] = stats.restarts
    summary["dead_letters"] = dict(stats.dead_letters_by_reason)
    summary["complete"] = summary["ids"] == expected_ids
    summary["correct"] = summary["total"] == expected_total
    summary["conserved"] = stats.accepted == (
        stats.handled
        + stats.replies_delivered
        + stats.forwarded
        + stats.dead_lettered
        + stats.in_flight
    ) and (stats.in_flight == 0)
    del summary["ids"]
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=30, help="number of tasks (default 30)")
    parser.add_argument("--workers", type=int, default=3, help="number of workers (default 3)")
    parser.add_argument(
        "--fail-every",
        type=int,
        default=4,
        help="the last worker crashes every Nth task (default 4; 0 = never)",
    )
    parser.add_argument(
        "--rounds", type=int, default=2000, help="hash rounds per task (default 2000)"
    )
    parser.add_argument(
        "--max-attempts", type=int, default=5, help="tries per task before giving up (default 5)"
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    for flag, value, minimum in (
        ("--tasks", args.tasks, 1),
        ("--workers", args.workers, 1),
        ("--fail-every", args.fail_every, 0),
        ("--rounds", args.rounds, 1),
        ("--max-attempts", args.max_attempts, 1),
    ):
        if value < minimum:
            parser.error(f"argument {flag}: must be >= {minimum}, got {value}")
    # The kernel logs each crash with its traceback at ERROR; one line each is enough here.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_without_traceback)
    try:
        summary = trio.run(
            lambda: run_pipeline(
                tasks=args.tasks,
                workers=args.workers,
                fail_every=args.fail_every,
                rounds=args.rounds,
                max_attempts=args.max_attempts,
            )
        )
    except ValueError as exc:
        parser.error(str(exc))
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    else:
        print(
            f"{summary['count']}/{args.tasks} tasks aggregated, total {summary['total']}, "
            f"{summary['retries']} retried, {summary['restarts']} restart(s), "
            f"gave up on {summary['gave_up'] or 'none'}, "
            f"per worker {summary['per_worker']}"
        )
        print(
            "complete and correct"
            if summary["complete"] and summary["correct"] and summary["conserved"]
            else "INCOMPLETE OR WRONG"
        )
    ok = summary["complete"] and summary["correct"] and summary["conserved"]
    return 0 if ok else 1


def _without_traceback(record: logging.LogRecord) -> bool:
    """Show a logged exception as one line (its repr) instead of a traceback."""
    if record.exc_info and record.exc_info[1] is not None:
        record.msg = f"{record.getMessage()}: {record.exc_info[1]!r}"
        record.args = ()
        record.exc_info = None
        record.exc_text = None
    return True


if __name__ == "__main__":
    sys.exit(main())
