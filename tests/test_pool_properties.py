"""Hypothesis fault injection on pools: resizes, failing workers, stops and restarts.

``test_fault_injection_pools_settle_to_their_size_and_count_every_message``: a pool of
random size, ``max_size`` and routing, directly under the root or beside a sibling under
a ``one_for_all`` supervisor (whose failure restarts the router, and with it the pool);
workers whose handlers return, raise (and are restarted, or resume), exit, or hang past
the handle timeout, under a ``one_for_one``, ``one_for_all`` or ``rest_for_one``
supervisor whose restarts back off briefly or for up to 2 s, with a ``block``,
``drop_oldest``, ``drop_newest`` or ``reject`` mailbox; tells and requests to the pool
from outside and from a client agent; ``$resize`` requests and tells up, down, to the
same size, to 0 and past ``max_size``; ``$workers`` and ``$broadcast``; a worker stopped
or drained from outside; the pool stopped or drained and spawned again; the kernel shut
down at a random point. Then: no hang, no task left, every accepted message handled or
dead-lettered once (``assert_conserved``), every request answered or failed with a
documented error, every bad resize refused, and at each settled point the pool's
``pool_workers`` are exactly its running workers and a resize gives it the asked number.
Once the pool has stopped none of its workers runs. The regressions it found follow it,
made deterministic.

Derandomized, without an example database. Mock time bounds an example
(``trio.fail_after``), real time a hang that mock time cannot cut (``hang_guard``).
"""

from __future__ import annotations

import random
import re
from contextlib import suppress
from typing import Any

import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from nexus_trio import (
    Agent,
    AgentNotFound,
    Backoff,
    Config,
    Context,
    KernelConfig,
    KernelShuttingDown,
    MailboxFull,
    Message,
    MessageKind,
    RequestFailed,
    RequestTimeout,
    SupervisionConfig,
    Supervisor,
    agent,
    open_kernel,
    pool,
    pool_workers,
    resize_pool,
)
from nexus_trio.testing import assert_conserved, open_test_kernel, step_until_idle

from .hang_guard import fault_settings, run_on_mock_clock, tasks_living

#: mock seconds an example may take before it counts as hung
MOCK_LIMIT = 3600
#: real seconds one example may take before it counts as hung (shielded shutdown)
REAL_LIMIT = 20
#: the errors a request to a pool may end with, besides its answer (Kernel.request)
REQUEST_ERRORS = (RequestFailed, RequestTimeout, AgentNotFound, MailboxFull, KernelShuttingDown)
WORKER = re.compile(r"workers/\d+")
OPS = ("ok", "ok", "ok", "slow", "raise", "hang", "exit")


def work_key(msg: Message) -> Any:
    return msg.payload["key"]


@agent
async def worker_named(ctx: Context, msg: Message) -> Any:
    return ctx.name


@fault_settings(300)
@given(
    size=st.integers(1, 4),
    headroom=st.integers(0, 3),
    routing=st.sampled_from(["round_robin", "least_loaded", "consistent_hash"]),
    supervised=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_fault_injection_pools_settle_to_their_size_and_count_every_message(
    size: int, headroom: int, routing: str, supervised: bool, seed: int
) -> None:
    """Random traffic, faults, resizes and stops on a pool; then: no hang, no task left,
    conservation, every request answered or failed with a documented error, bad resizes
    refused, and at each settled point ``pool_workers`` lists exactly the running
    workers and a resize leaves the asked number of them."""
    rng = random.Random(seed)
    max_size = size + headroom
    worker_restart = rng.choice(["permanent", "permanent", "transient", "temporary"])
    #: failures the workers' supervisor takes before it escalates (and the root
    #: restarts it)
    worker_intensity = rng.choice([0, 2, 100])
    worker_strategy = rng.choice(["one_for_one", "one_for_one", "one_for_all", "rest_for_one"])
    #: brief, or long enough that messages meet workers waiting out a restart
    worker_backoff = rng.choice([Backoff(0.001, 0.01), Backoff(0.001, 0.01), Backoff(0.5, 2.0)])
    worker_overflow = rng.choice(["block", "block", "drop_oldest", "drop_newest", "reject"])
    #: a raise restarts the worker, or (a function agent's default) it resumes
    worker_on_error = rng.choice(["restart", "restart", None])
    # a request's outcome: ("answer", value) or ("error", exception)
    outcomes: list[tuple[str, Any, Any]] = []
    unexpected: list[BaseException] = []

    @agent(restart=worker_restart, overflow=worker_overflow, on_error=worker_on_error)
    async def worker(ctx: Context, msg: Message) -> Any:
        op = msg.payload.get("op", "ok") if isinstance(msg.payload, dict) else "ok"
        if op == "raise":
            raise RuntimeError("worker fails")
        if op == "hang":
            await trio.sleep(10)  # past the handle timeout (1 s)
        elif op == "slow":
            await trio.sleep(0.05)
        elif op == "exit":
            ctx.stop()
        return ctx.name if msg.kind is MessageKind.QUERY else None

    pool_spec = pool(
        worker,
        size=size,
        max_size=max_size,
        routing=routing,
        key=work_key if routing == "consistent_hash" else None,
        supervision=Supervisor(
            strategy=worker_strategy,
            max_restarts=worker_intensity,
            within=5.0,
            backoff=worker_backoff,
        ),
    )

    @agent
    async def sibling(ctx: Context, msg: Message) -> None:
        raise RuntimeError("sibling fails: the group restarts, the pool with it")

    top: Any = pool_spec
    if supervised:
        top = Supervisor(
            strategy="one_for_all",
            max_restarts=100,
            backoff=Backoff(0.001, 0.01),
            children=[pool_spec, agent(sibling, name="sibling")],
            name="group",
        )

    async def ask(requester: Any, payload: Any, timeout: float) -> None:
        try:
            answer = await requester.request("workers", payload, timeout=timeout)
        except REQUEST_ERRORS as exc:
            outcomes.append(("error", payload, exc))
        except BaseException as exc:
            if not isinstance(exc, trio.Cancelled):
                unexpected.append(exc)
            raise
        else:
            outcomes.append(("answer", payload, answer))

    @agent(name="client")
    async def client(ctx: Context, msg: Message) -> None:
        how, payload = msg.payload
        if how == "tell":
            with suppress(AgentNotFound, MailboxFull, KernelShuttingDown):
                await ctx.send("workers", payload)
        else:
            await ask(ctx, payload, 0.5)

    def work() -> dict[str, Any]:
        return {"op": rng.choice(OPS), "key": rng.randint(0, 9)}

    def resize_to() -> Any:
        return rng.choice([0, 1, size, max_size, max_size + 1, rng.randint(1, max_size), "3"])

    plan: list[tuple[Any, ...]] = []
    for _ in range(rng.randint(0, 25)):
        r = rng.random()
        if r < 0.3:
            plan.append(("tell", work()))
        elif r < 0.45:
            plan.append(("ask", work()))
        elif r < 0.55:
            plan.append(("client", rng.choice(["tell", "ask"]), work()))
        elif r < 0.67:
            how = rng.choice(["tell", "ask", "client"])
            plan.append(("resize", how, resize_to()))
        elif r < 0.7:
            plan.append(("ask", {"$workers": None}))
        elif r < 0.73:
            plan.append(("ask", {"$broadcast": work()}))
        elif r < 0.78:
            plan.append(("stop_worker", rng.random() < 0.5))
        elif r < 0.8:
            plan.append(("stop_pool", rng.random() < 0.5))
        elif r < 0.82:
            plan.append(("respawn_pool",))
        elif r < 0.85 and supervised:
            plan.append(("restart_pool",))
        elif r < 0.9:
            plan.append(("check", rng.randint(1, max_size)))
        elif r < 0.97:
            plan.append(("pause", rng.choice([0.001, 0.05, 0.5, 2.0])))
        else:
            plan.append(("shutdown",))
    stop_after = rng.choice([0.0, 0.01, 0.5, 3.0])
    config = Config(
        kernel=KernelConfig(
            dead_letter_buffer=100_000,
            shutdown_grace_ms=rng.choice([0, 100, 1000]),
            handle_timeout_ms=1000,
            send_timeout_ms=100,
            mailbox_capacity=rng.choice([2, 16, 1024]),
        ),
        supervision=SupervisionConfig(max_restarts=100, backoff_initial_ms=1, backoff_max_ms=10),
    )

    async def scenario() -> None:
        baseline = tasks_living()
        with trio.fail_after(MOCK_LIMIT):
            async with trio.open_nursery() as outside:
                async with open_kernel(config, seed=seed) as kernel:
                    # (a shutdown step runs beside the block, which it then ends)
                    stopping_kernel = kernel
                    kernel.spawn(top)
                    kernel.spawn(client)
                    #: background jobs (requests, stops) not done yet; quiet: when 0
                    pending = 0
                    quiet = trio.Event()
                    quiet.set()

                    def running_workers() -> set[str]:
                        return {
                            ref.name
                            for ref in kernel.agents()
                            if ref.name is not None and WORKER.fullmatch(ref.name)
                        }

                    def exists(name: str) -> bool:
                        try:
                            kernel.lookup(name)
                        except AgentNotFound:
                            return False
                        return True

                    async def in_background(job: Any, *args: Any) -> None:
                        nonlocal pending, quiet
                        if not pending:
                            quiet = trio.Event()
                        pending += 1
                        try:
                            await job(*args)
                        finally:
                            pending -= 1
                            if not pending:
                                quiet.set()

                    async def stop(target: Any, drain: bool) -> None:
                        with suppress(AgentNotFound):
                            await kernel.stop(target, drain=drain)

                    async def stop_pool(drain: bool) -> None:
                        try:
                            await kernel.stop("workers", drain=drain)
                        except AgentNotFound:
                            return
                        if not kernel.stopping:
                            assert running_workers() == set(), "workers outlived their pool"
                            assert not exists("workers/supervisor")

                    async def settled() -> bool:
                        """Waits until nothing is pending; False if the kernel stops."""
                        await quiet.wait()
                        if kernel.stopping:
                            return False
                        await step_until_idle(kernel, timeout=600)
                        await trio.sleep(5)  # restart backoffs, drains after a shrink
                        await step_until_idle(kernel, timeout=600)
                        return not kernel.stopping

                    async def check(n: int) -> None:
                        if not await settled():
                            return
                        if not exists("workers"):
                            assert running_workers() == set(), "workers outlived the pool"
                            assert not exists("workers/supervisor")
                            return
                        listed = {ref.name for ref in await pool_workers(kernel, "workers")}
                        assert listed == running_workers(), (
                            f"pool_workers says {sorted(map(str, listed))}, "
                            f"running: {sorted(running_workers())}"
                        )
                        answer = await kernel.request("workers", {"$resize": n})
                        assert answer == {"size": n}
                        in_order = [str(r.name) for r in await pool_workers(kernel, "workers")]
                        assert len(in_order) == n, f"resized to {n}, has {in_order}"
                        assert set(in_order) == running_workers()
                        assert_conserved(kernel)
                        # Routing over the settled pool: idle workers, so least loaded
                        # picks the oldest each time, round robin each worker once, and a
                        # key always the same worker.
                        answers = [
                            await kernel.request("workers", {"op": "ok", "key": 7})
                            for _ in range(n)
                        ]
                        if routing == "least_loaded":
                            assert answers == [in_order[0]] * n
                        elif routing == "round_robin":
                            assert sorted(answers) == sorted(in_order)
                        else:
                            assert len(set(answers)) == 1

                    for step in plan:
                        with suppress(AgentNotFound, MailboxFull, KernelShuttingDown):
                            what = step[0]
                            if what == "tell":
                                await kernel.send("workers", step[1])
                            elif what == "ask":
                                outside.start_soon(in_background, ask, kernel, step[1], 2.0)
                            elif what == "client":
                                await kernel.send("client", (step[1], step[2]))
                            elif what == "resize":
                                _, how, n = step
                                if how == "tell":
                                    await kernel.send("workers", {"$resize": n})
                                elif how == "ask":
                                    await in_background(ask, kernel, {"$resize": n}, 30.0)
                                else:
                                    await kernel.send("client", ("ask", {"$resize": n}))
                            elif what == "stop_worker":
                                names = sorted(running_workers())
                                if names:
                                    target = rng.choice(names)
                                    outside.start_soon(in_background, stop, target, step[1])
                            elif what == "stop_pool":
                                outside.start_soon(in_background, stop_pool, step[1])
                            elif what == "respawn_pool":
                                # once the stopped pool is gone, a new one under its name
                                gone = not exists("workers") and not exists("workers/supervisor")
                                if gone and not running_workers():
                                    kernel.spawn(pool_spec)
                            elif what == "restart_pool":
                                await kernel.send("sibling", None)
                            elif what == "check":
                                await check(step[1])
                            elif what == "pause":
                                await trio.sleep(step[1])
                            else:
                                outside.start_soon(kernel.shutdown)
                    await trio.sleep(stop_after)
        assert tasks_living() == baseline, "the kernel left tasks behind"
        assert stopping_kernel.stats().in_flight == 0
        assert_conserved(stopping_kernel)

    run_on_mock_clock(scenario, REAL_LIMIT)

    assert not unexpected, f"requests ended with undocumented errors: {unexpected!r}"
    for kind, payload, value in outcomes:
        if isinstance(payload, dict) and "$resize" in payload:
            # (30 s is more than any shrink's drain takes here: an answer that never came)
            assert not (isinstance(value, RequestTimeout) and value.timeout == 30.0), (
                f"a resize to {payload} got no answer"
            )
            n = payload["$resize"]
            valid = isinstance(n, int) and 1 <= n <= max_size
            if kind == "answer":
                assert valid, f"a resize to {n!r} (max_size {max_size}) was carried out"
                assert value == {"size": n}
            elif not valid and isinstance(value, RequestFailed) and value.reason == "handler_error":
                assert "$resize" in str(value.error), value


# --- regressions found by fault injection, made deterministic -------------------------------


async def test_a_pool_lists_and_resizes_only_the_workers_still_running(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Regression: a worker that stopped for good (here by ``kernel.stop``; also a
    transient or temporary one that exited) stayed in the router's list until a message
    was routed to it: ``pool_workers`` listed it, and a ``$resize`` counted it, so a
    resize to the pool's old size answered ``{"size": 2}`` with one worker running. The
    control messages now drop the stopped workers first."""
    async with open_test_kernel() as kernel:
        kernel.spawn(pool(worker_named, size=2))
        await step_until_idle(kernel)
        _, second = await pool_workers(kernel, "workers")
        await kernel.stop(second)
        assert [ref.name for ref in await pool_workers(kernel, "workers")] == ["workers/0"]
        assert await resize_pool(kernel, "workers", 2) == 2
        workers = await pool_workers(kernel, "workers")
        assert [ref.name for ref in workers] == ["workers/0", "workers/2"]
        assert all(kernel.is_local(ref) for ref in workers)
        assert await kernel.request("workers", {"$broadcast": "x"}) == {
            "sent": 2,
            "dropped": 0,
            "refused": 0,
        }


async def test_a_shrink_skips_a_removed_worker_stopped_before_it_started(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Regression: a shrink stops each removed worker once it has started. A removed
    worker stopped from outside before it started never starts, and the shrink waited
    for it forever: the workers removed after it were never stopped (they ran on,
    outside the pool) and the ``$resize`` request was never answered. Such a worker is
    skipped now.

    Regression too: the shrink then looked every 10 ms whether such a worker was stopped
    meanwhile (nothing told the pool), so on mock time it moved the clock in 10 ms steps.
    It waits for the worker's start or its stop for good (``Kernel.wait_stopped``) now,
    and no time passes."""
    gate = trio.Event()

    class Worker(Agent):
        async def on_start(self, ctx: Context) -> None:
            if ctx.name == "workers/0":
                await gate.wait()  # the ordered start: /1 and /2 wait behind /0

        async def handle(self, ctx: Context, msg: Message) -> Any:
            return ctx.name

    async with open_test_kernel() as kernel:
        kernel.spawn(pool(Worker, size=3))
        await trio.testing.wait_all_tasks_blocked()
        answers: list[int] = []
        async with trio.open_nursery() as nursery:

            async def shrink() -> None:
                answers.append(await resize_pool(kernel, "workers", 1, timeout=60))

            nursery.start_soon(shrink)
            await trio.testing.wait_all_tasks_blocked()
            before = trio.current_time()
            await kernel.stop(kernel.lookup("workers/2"))  # not started yet
            for _ in range(3):  # the shrink waits for /1 to start: nothing moves the clock
                await trio.testing.wait_all_tasks_blocked()
            assert trio.current_time() == before
            gate.set()
        assert answers == [1]
        assert trio.current_time() == before
        assert {ref.name for ref in kernel.agents()} == {"workers", "workers/0"}
        assert [ref.name for ref in await pool_workers(kernel, "workers")] == ["workers/0"]


async def test_a_shrink_s_requester_hears_at_once_when_the_pool_stops_before_it_answers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Regression: a ``$resize`` request that shrinks the pool is answered once the
    removed workers have stopped. When the pool stopped (or its supervisor restarted
    it) before that, the answer was never sent and the requester waited out its whole
    timeout for a pool that was gone. The request fails at once now (``RequestFailed``,
    ``agent_stopped``)."""

    @agent
    async def slow(ctx: Context, msg: Message) -> Any:
        await trio.sleep(1)
        return ctx.name

    async with open_test_kernel() as kernel:
        kernel.spawn(pool(slow, size=3))
        await step_until_idle(kernel)
        for i in range(6):
            await kernel.send("workers", i)  # two each: the shrink drains /2, then /1
        errors: list[Exception] = []
        async with trio.open_nursery() as nursery:

            async def shrink() -> None:
                try:
                    await resize_pool(kernel, "workers", 1, timeout=100)
                except (RequestFailed, RequestTimeout) as exc:
                    errors.append(exc)

            nursery.start_soon(shrink)
            await trio.sleep(0.5)  # while /2 drains
            started = trio.current_time()
            await kernel.stop("workers")
        (error,) = errors
        assert isinstance(error, RequestFailed), error
        assert error.reason == "agent_stopped"
        assert trio.current_time() - started < 2


async def _failure_of(kernel: Any, to: str, payload: Any) -> RequestFailed:
    try:
        await kernel.request(to, payload, timeout=100)
    except RequestFailed as exc:
        return exc
    raise AssertionError(f"the request to {to!r} did not fail")  # pragma: no cover


async def test_a_shrink_s_requester_gets_the_error_a_core_request_gets_when_its_agent_stops(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Regression: a ``$resize`` request whose pool stopped mid-shrink failed with
    ``RequestFailed(error=AgentStopped(...))``, an error that is deprecated and documented
    as never raised. A request queued at any agent that stops fails with
    ``RequestFailed(reason="agent_stopped", error=None)`` (the error is a handler's
    exception, and none raised): the pool's requester gets exactly that now."""

    @agent
    async def stuck(ctx: Context, msg: Message) -> Any:
        await trio.sleep_forever()

    async with open_test_kernel() as kernel:
        kernel.spawn(stuck.with_options(name="plain"))
        kernel.spawn(pool(stuck, size=3))
        await step_until_idle(kernel)
        # the core: a query queued behind a message being handled, the agent stopped
        await kernel.send("plain", "busy")
        # the pool: shrunk while a removed worker is stuck, then stopped
        for i in range(3):
            await kernel.send("workers", i)  # one each: the shrink waits on /2, then /1
        failures: list[RequestFailed] = []
        async with trio.open_nursery() as nursery:

            async def ask(to: str, payload: Any) -> None:
                failures.append(await _failure_of(kernel, to, payload))

            nursery.start_soon(ask, "plain", "queued")
            nursery.start_soon(ask, "workers", {"$resize": 1})
            await trio.testing.wait_all_tasks_blocked()
            assert [ref.name for ref in await pool_workers(kernel, "workers")] == ["workers/0"]
            nursery.start_soon(kernel.stop, "plain")
            nursery.start_soon(kernel.stop, "workers")
        core, shrink = sorted(failures, key=lambda exc: str(exc.to))
        assert core.to == "plain"
        assert (type(core), core.reason, core.error) == (RequestFailed, "agent_stopped", None)
        assert (type(shrink), shrink.reason, shrink.error) == (RequestFailed, "agent_stopped", None)


async def test_a_shrink_s_remote_requester_hears_at_once_when_the_pool_stops_before_it_answers(
    nats: Any,
) -> None:
    """Regression: when a pool stopped before the workers a ``$resize`` request removed had
    stopped, only a requester on the pool's own node heard it at once (``RequestFailed``,
    ``agent_stopped``); one on another node waited out its whole timeout. It gets the same
    ``RequestFailed`` now, through the cluster's error frame."""
    from nexus_trio._nats import join_cluster

    from .nats_server import PATIENT

    release = trio.Event()

    @agent
    async def stuck(ctx: Context, msg: Message) -> Any:
        await release.wait()
        return ctx.name

    async with open_kernel() as kb, open_kernel() as ka:
        kb.spawn(pool(stuck, size=3))
        await step_until_idle(kb)
        for i in range(6):
            await kb.send("workers", i)  # two each: the shrink waits for /2 to drain
        async with (
            # (patient: a stall of the loaded machine while the request is out must not
            # make b lost, the request failing with TransportUnavailable)
            join_cluster(kb, nats.url, "b", options=PATIENT) as cb,
            join_cluster(ka, nats.url, "a", options=PATIENT) as ca,
            trio.open_nursery() as nursery,
        ):
            with trio.fail_after(30):
                await cb.names_published()
                await ca.wait_for_name("workers")
            errors: list[Exception] = []
            ended = trio.Event()

            async def shrink() -> None:
                try:
                    await resize_pool(ka, "workers", 1, timeout=60)
                except (RequestFailed, RequestTimeout) as exc:
                    errors.append(exc)
                ended.set()

            nursery.start_soon(shrink)
            with trio.fail_after(30):
                # (the shrink begins on b when the request has crossed NATS: nothing
                # here tells when, so the pool's list is watched)
                while len(await pool_workers(kb, "workers")) != 1:  # noqa: ASYNC110
                    await trio.sleep(0.01)
            nursery.start_soon(kb.stop, "workers")
            with trio.fail_after(15):  # not the request's 60 s
                await ended.wait()
            release.set()
        (error,) = errors
        assert isinstance(error, RequestFailed), error
        assert error.reason == "agent_stopped"
        assert error.error is None  # as for a query queued at an agent that stops
        await ka.shutdown()
        await kb.shutdown()
