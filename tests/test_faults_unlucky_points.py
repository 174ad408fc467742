"""Fault injection on the core kernel, thirty-third pass: what earlier rounds left out.

Handlers that raise what is no ``Exception`` (``GeneratorExit``, ``SystemExit``, a
``trio.Cancelled`` of a scope that is not theirs), a stop of one agent asked by several
tasks at once and by the agent itself, ``ctx.nursery`` tasks that shield themselves from
their run's stop, an agent that waits for room in its own full mailbox, messages sent
while the kernel drains, and a shutdown (or a cancel of the block) at a step of a run
that Hypothesis chooses: a restart's backoff, an ``on_start`` spawning linked children,
an ``on_stop`` asking a sibling that has stopped, a handler waiting on a child it
spawned, an escalation while the parent stops. After each: what was sent is handled,
dead-lettered or refused (``kernel.stats()``), and no task is left.
Everything runs on a ``MockClock(autojump_threshold=0)``.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from nexus_trio import (
    Agent,
    AgentSpec,
    Backoff,
    Config,
    Context,
    Kernel,
    KernelConfig,
    KernelPhase,
    LifecycleEvent,
    MailboxFull,
    Message,
    NexusError,
    Subscription,
    Supervisor,
    agent,
    open_kernel,
)
from nexus_trio.testing import assert_conserved

from .hang_guard import fault_settings, real_time_limit, tasks_living
from .test_faults_linked_deep import ENDINGS, Tree, boom, run_tree, three_levels


def _leaves(error: BaseException) -> list[BaseException]:
    """The exceptions a (nested) group holds, in order."""
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]


async def _ended_by_a_handler(
    specs: list[Any], before: list[tuple[str, str]], last: tuple[str, str]
) -> tuple[Kernel, BaseExceptionGroup[BaseException]]:
    """Open a kernel, spawn ``specs``, send ``before`` (recipient, payload) and, once
    every task is blocked, ``last``, whose handler ends the kernel: the kernel and the
    group ``open_kernel`` raised. No task is left."""
    kernels: list[Kernel] = []

    async def run() -> None:
        async with open_kernel(Config()) as kernel:
            kernels.append(kernel)
            for spec in specs:
                kernel.spawn(spec)
            for to, payload in before:
                await kernel.send(to, payload)
            await trio.testing.wait_all_tasks_blocked()
            await kernel.send(*last)
            await trio.sleep(1)

    living = tasks_living()
    with pytest.raises(BaseExceptionGroup) as raised:
        await run()
    assert tasks_living() == living
    [kernel] = kernels
    return kernel, raised.value


async def test_a_handler_raising_generator_exit_leaves_the_other_agents_handlers_alone(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Regression: a handler that raised ``GeneratorExit`` before its first suspension
    ended the kernel's shared stepper (the generator that steps every handler re-raised
    it as its own close): every handler stepped after it, in any agent, failed with
    ``StopIteration`` (counted failed, dead-lettered ``handler_error``, its agent
    restarted) while the kernel went down. It goes on up as any other ``BaseException``
    of a handler (``SystemExit``): the kernel ends with it; an agent it woke in the same
    round handles its message."""
    innocent_got: list[Any] = []

    @agent(name="innocent")
    async def innocent(ctx: Context, msg: Message) -> None:
        innocent_got.append(msg.payload)

    @agent(name="bad")
    async def bad(ctx: Context, msg: Message) -> None:
        # (no await: the shared stepper runs this handler; the tell wakes 'innocent',
        # which steps its handler before the crash's cancel reaches it)
        ctx.send_nowait("innocent", "woken")
        raise GeneratorExit

    kernel, raised = await _ended_by_a_handler(
        [innocent, bad], [("innocent", "first")], ("bad", "crash")
    )
    letters = kernel.recent_dead_letters()
    assert [type(leaf) for leaf in _leaves(raised)] == [GeneratorExit]
    assert innocent_got == ["first", "woken"]
    stats = kernel.stats()
    assert (stats.failed, stats.handled) == (1, 2)  # 'bad' only
    assert [letter.reason.value for letter in letters] == ["handler_error"]
    assert not any(isinstance(letter.error, StopIteration) for letter in letters)
    assert_conserved(kernel)


def _drained(events: Subscription[LifecycleEvent]) -> list[tuple[str, str | None]]:
    """The lifecycle events queued for ``events``, as (kind, agent name)."""
    seen = []
    while True:
        try:
            event = events.receive_nowait()
        except trio.WouldBlock:
            return seen
        seen.append((event.kind.value, event.name))


class _Halt(BaseException):
    """An application's own BaseException (not an Exception)."""


@pytest.mark.parametrize("suspends", [False, True])
@pytest.mark.parametrize(
    "error",
    [SystemExit(3), GeneratorExit(), _Halt("halt"), BaseExceptionGroup("g", [_Halt("halt")])],
)
async def test_a_handler_raising_what_is_no_exception_ends_the_kernel_its_message_dead_lettered_with_it(
    error: BaseException, suspends: bool, autojump_clock: trio.testing.MockClock
) -> None:
    """A handler raising a ``BaseException`` that is no ``Exception`` (``sys.exit()``
    in a handler, say) ends the kernel, as Trio lets such exceptions through: the tree
    stops (each ``on_stop`` that is due runs once, queued messages dead-lettered), and
    ``open_kernel`` raises it in a group. Regression: its message was dead-lettered
    ``agent_stopped``, 'cancelled while being handled', as if a stop had cut its
    handler short; it is ``handler_error``, with the exception. Regression (fifty-seventh
    pass): such a failure, counted in ``failed``, was not timed in
    ``failed_handle_latency`` (count 0 for failed 1); and a ``BaseExceptionGroup`` of
    one (a handler's own nursery's) was still dead-lettered ``agent_stopped`` and not
    counted failed at all."""
    stops: list[str] = []

    class Keeper(Agent):
        async def handle(self, ctx: Context, msg: Message) -> None:
            await trio.sleep_forever()

        async def on_stop(self, ctx: Context) -> None:
            stops.append(ctx.name or "")

    @agent(name="quitter")
    async def quitter(ctx: Context, msg: Message) -> None:
        if suspends:
            await trio.sleep(0.1)
        raise error

    kernel, raised = await _ended_by_a_handler(
        [AgentSpec(Keeper, name="keeper"), quitter],
        [("keeper", "in hand"), ("keeper", "queued")],
        ("quitter", "bye"),
    )
    assert _leaves(raised) == _leaves(error)
    assert stops == ["keeper"]
    stats = kernel.stats()
    assert (stats.failed, stats.failed_handle_latency.count) == (1, 1)
    letters = {letter.message.payload: letter for letter in kernel.recent_dead_letters()}
    assert sorted(letters) == ["bye", "in hand", "queued"]
    assert letters["bye"].reason.value == "handler_error"
    said = letters["bye"].error  # (a copy without the handler's frames)
    assert type(said) is type(error) and repr(said) == repr(error)  # (its args too)
    assert_conserved(kernel)


async def _a_spent_cancel() -> trio.Cancelled:
    """A ``trio.Cancelled`` of a scope that is over: what code that caught one and kept
    it raises again later."""
    with trio.CancelScope() as scope:
        scope.cancel()
        try:
            await trio.lowlevel.checkpoint()
        except trio.Cancelled as exc:
            return exc
    raise AssertionError("the scope did not cancel its checkpoint")


@pytest.mark.parametrize("where", ["handle", "on_start", "background_task", "on_stop"])
async def test_a_cancel_of_no_scope_around_it_raised_by_an_agent_s_code_is_its_failure(
    where: str, autojump_clock: trio.testing.MockClock
) -> None:
    """Regression: a ``trio.Cancelled`` raised by an agent's code where no cancel scope
    around it was cancelled (one caught elsewhere and raised again) was taken by the
    run's nursery for a cancel of its own, once its failure had cancelled it: the run
    ended as a normal exit. A transient agent was gone for good with nothing counted or
    logged (its message dead-lettered ``agent_stopped``, 'cancelled while being
    handled'); an ``on_stop`` raising it was no failure either. It is the agent's failure
    now, as an exception would be: a ``RuntimeError`` saying so (the ``Cancelled`` its
    cause), dead-lettered ``handler_error`` for a handler, the agent restarted, and
    timed in ``failed_handle_latency`` (it was not, counted failed all the same)."""
    spent = await _a_spent_cancel()
    runs: list[int] = []

    class Raiser(Agent):
        async def on_start(self, ctx: Context) -> None:
            runs.append(len(runs) + 1)
            if len(runs) > 1:
                return
            if where == "on_start":
                raise spent
            if where == "background_task":

                async def task() -> None:
                    await trio.sleep(1)
                    raise spent

                ctx.nursery.start_soon(task)

        async def handle(self, ctx: Context, msg: Message) -> None:
            if where == "handle" and msg.payload == "raise":
                raise spent

        async def on_stop(self, ctx: Context) -> None:
            if where == "on_stop":
                raise spent

    living = tasks_living()
    async with open_kernel(Config()) as kernel:
        events = kernel.events()
        kernel.spawn(AgentSpec(Raiser, name="raiser", restart="transient"))
        await trio.sleep(0.5)
        await kernel.send("raiser", "raise")
        await trio.sleep(2)
        if where == "on_stop":
            await kernel.stop("raiser")
        await trio.testing.wait_all_tasks_blocked()
        stats = kernel.stats()
        letters = kernel.recent_dead_letters()
        alive = [ref.name for ref in kernel.agents()]
        seen = _drained(events)
    assert ("failed", "raiser") in seen, seen
    if where == "on_stop":
        assert (stats.run_failures, stats.restarts, runs) == (1, 0, [1])
        return
    assert (stats.restarts, runs) == (1, [1, 2])
    assert alive == ["raiser"]
    if where == "handle":
        assert (stats.failed, stats.run_failures, stats.handled) == (1, 0, 0)
        # (timed as the failure it is counted as: count 0 until the fifty-seventh pass)
        assert stats.failed_handle_latency.count == 1
        [letter] = letters
        assert letter.reason.value == "handler_error"
        assert isinstance(letter.error, RuntimeError)
        assert isinstance(letter.error.__cause__, trio.Cancelled)
    else:
        assert (stats.failed, stats.run_failures, stats.handled) == (0, 1, 1)
        assert letters == []
    assert_conserved(kernel)
    assert tasks_living() == living


@pytest.mark.parametrize("where", ["handle", "on_start", "on_stop"])
async def test_a_send_to_its_own_full_mailbox_from_the_agent_s_run_fails_at_once_saying_so(
    where: str, autojump_clock: trio.testing.MockClock
) -> None:
    """Regression: an agent whose handler (or ``on_start``, or ``on_stop``) sent to its
    own full ``block`` mailbox waited out the whole send deadline for room that only its
    own run could make (the run waits in the send), then failed with the plain 'is
    full' of any MailboxFull (``on_stop``: after ``ctx.stop()``, its address takes
    messages until its run is over). It fails at once now, saying why no room can come (counted
    rejected ``mailbox_full``). A task of its ``ctx.nursery`` still waits: its run takes
    from the mailbox meanwhile, and the send gets in."""
    outcomes: list[tuple[str, float, str]] = []

    async def to_self(ctx: Context, label: str) -> None:
        try:
            await ctx.send(ctx.id, label)
        except MailboxFull as exc:
            outcomes.append((label, trio.current_time(), exc.detail))
        else:
            outcomes.append((label, trio.current_time(), "in"))

    class Selfish(Agent):
        async def on_start(self, ctx: Context) -> None:
            if where == "on_start":
                for label in ("a", "b"):
                    await to_self(ctx, label)

        async def handle(self, ctx: Context, msg: Message) -> None:
            if where == "handle" and msg.payload == "go":
                for label in ("a", "b"):
                    await to_self(ctx, label)
                # a task of its own waits for room that this run makes after it returns
                ctx.nursery.start_soon(to_self, ctx, "from a task")
            if where == "on_stop" and msg.payload == "stop":
                ctx.stop()  # the message queued behind it stays: on_stop finds it full

        async def on_stop(self, ctx: Context) -> None:
            if where == "on_stop":
                await to_self(ctx, "late")

    living = tasks_living()
    async with open_kernel(Config(kernel=KernelConfig(send_timeout_ms=500))) as kernel:
        kernel.spawn(AgentSpec(Selfish, name="selfish", mailbox_capacity=1, restart="temporary"))
        await trio.testing.wait_all_tasks_blocked()
        if where == "handle":
            await kernel.send("selfish", "go")
        if where == "on_stop":
            await kernel.send("selfish", "stop")
            await kernel.send("selfish", "fills it")
        await trio.sleep(1)
        stats = kernel.stats()
        assert_conserved(kernel)
    own = "its own mailbox"
    if where == "handle":
        assert [o[:2] for o in outcomes] == [("a", 0.0), ("b", 0.0), ("from a task", 0.0)]
        assert outcomes[0][2] == outcomes[2][2] == "in"
    elif where == "on_start":
        assert [o[:2] for o in outcomes] == [("a", 0.0), ("b", 0.0)]
        assert outcomes[0][2] == "in"
    else:
        assert [o[:2] for o in outcomes] == [("late", 0.0)]
    refused = [detail for *_, detail in outcomes if detail != "in"]
    assert len(refused) == 1 and own in refused[0] and "selfish" in refused[0], refused
    assert stats.rejected == {"mailbox_full": 1}
    assert tasks_living() == living


async def test_a_message_an_agent_returns_to_its_own_full_mailbox_is_dead_lettered_saying_so(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Regression: a handler that returned a message to its own agent, whose ``block``
    mailbox was full, had it refused at once (its run routes it, and only that run takes
    from the mailbox) but dead-lettered ``mailbox_full`` 'still full after 0.5s', a wait
    that never was (at 0.0). The dead letter says why now; the message behind is handled
    at once."""
    seen: list[tuple[str, float]] = []
    letters: list[tuple[str, float, str]] = []

    class Returner(Agent):
        async def handle(self, ctx: Context, msg: Message) -> Message | None:
            seen.append((msg.payload, trio.current_time()))
            if msg.payload == "go":
                return Message(sender=ctx.id, to=ctx.id, payload="again")
            return None

    living = tasks_living()
    async with open_kernel(Config(kernel=KernelConfig(send_timeout_ms=500))) as kernel:
        dead = kernel.dead_letters()
        kernel.spawn(AgentSpec(Returner, name="returner", mailbox_capacity=1))
        await trio.testing.wait_all_tasks_blocked()
        await kernel.send("returner", "go")
        await kernel.send("returner", "filler")  # fills it while "go" is handled
        await trio.sleep(1)
        with contextlib.suppress(trio.WouldBlock):
            while True:
                letter = dead.receive_nowait()
                letters.append((letter.message.payload, trio.current_time(), letter.detail))
        stats = kernel.stats()
        assert_conserved(kernel)
    assert seen == [("go", 0.0), ("filler", 0.0)]
    [(payload, _, detail)] = letters
    assert payload == "again"
    assert "after" not in detail and "its own mailbox" in detail, detail
    assert (stats.accepted, stats.handled, stats.dead_letters_by_reason) == (
        3,
        2,
        {"mailbox_full": 1},
    )
    assert tasks_living() == living


# --- a shutdown at a step Hypothesis chooses ----------------------------------------------


def _scene(tree: Tree, scene: str) -> tuple[Callable[[Any], Awaitable[None]], Supervisor | None]:
    """Build ``tree`` for ``scene``; what sets it going, and the top of the tree (None:
    ``p``)."""

    async def nothing(kernel: Any) -> None:
        pass

    async def slow(ctx: Context) -> None:
        await trio.sleep(0.3)

    if scene == "restart_backoff":
        # c fails its first message; its restart waits out a 1 s backoff, the second
        # message queued meanwhile
        three_levels(tree, c={"handle": boom})

        async def fail_c(kernel: Any) -> None:
            await tree.send(kernel, "c", "fail")
            await tree.send(kernel, "c", "queued")

        return fail_c, None
    if scene == "on_start_spawns":
        # p, c and g each spawn in on_start, then take 0.3 s more to start
        three_levels(tree, p={"start": slow}, c={"start": slow}, g={"start": slow})
        return nothing, None
    if scene == "on_stop_tells_stopped_sibling":
        # p spawns c then s; c's on_stop (after s's, reverse spawn order) tells s
        async def tell_s(ctx: Context) -> None:
            await trio.sleep(0.1)
            await tree.send(ctx, "s", "bye")

        tree.parents = {"c": "p", "s": "p"}
        tree.specs = {
            "p": tree.spec("p", kids=("c", "s")),
            "c": tree.spec("c", stop=tell_s),
            "s": tree.spec("s", stop=slow),
        }
        return nothing, None
    if scene == "handler_waits_on_its_child":
        # p's handler spawns k, tells it to finish and waits for its stop
        async def finish(ctx: Context, msg: Message) -> None:
            await trio.sleep(0.2)
            ctx.stop()

        async def spawn_and_wait(ctx: Context, msg: Message) -> None:
            kid = ctx.spawn(tree.specs["k"])
            await tree.send(ctx, "k", "finish")
            await ctx.kernel.wait_stopped(kid)

        tree.parents = {"k": "p"}
        tree.specs = {
            "p": tree.spec("p", handle=spawn_and_wait),
            "k": tree.spec("k", handle=finish, stop=slow),
        }

        async def go(kernel: Any) -> None:
            await tree.send(kernel, "p", "go")

        return go, None
    assert scene == "escalation_while_stopping"
    # supervisor p (one restart within 5 s) of c, which fails each message: the third
    # failure gives up on p (the root isolates it); g, c's child, stops first each time
    tree.parents = {"g": "c"}
    tree.specs = {"c": tree.spec("c", kids=("g",), handle=boom), "g": tree.spec("g", stop=slow)}
    top = Supervisor(
        name="p",
        children=[tree.specs["c"]],
        max_restarts=1,
        backoff=Backoff(0.05, 0.05, jitter=0.0),
    )

    async def fail_thrice(kernel: Any) -> None:
        for i in range(3):
            await tree.send(kernel, "c", i)

    return fail_thrice, top


SCENES = [
    "restart_backoff",
    "on_start_spawns",
    "on_stop_tells_stopped_sibling",
    "handler_waits_on_its_child",
    "escalation_while_stopping",
]


@fault_settings(120)
@given(
    scene=st.sampled_from(SCENES),
    ending=st.sampled_from(ENDINGS),
    delay=st.sampled_from([0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.9, 1.0, 1.2]),
    rounds=st.integers(0, 12),
)
def test_a_shutdown_at_any_step_of_a_restart_a_start_or_a_stop_leaves_nothing_behind(
    scene: str, ending: str, delay: float, rounds: int
) -> None:
    """The kernel ends (its block left, ``shutdown(0)``, the block cancelled, or
    ``kernel.stop('p')`` with the kernel running on) after ``delay`` seconds and
    ``rounds`` scheduling rounds of a scene: a restart's backoff, linked children
    spawned by slow ``on_start``s, an ``on_stop`` telling a sibling that stopped before
    it, a handler waiting for the stop of a child it spawned, a supervisor giving up. No
    task is left, each ``on_start`` that returned has one ``on_stop``, children stop
    before their parents, every send is accepted and then handled or dead-lettered, or
    refused (see Tree.check)."""

    async def scenario() -> None:
        tree = Tree()
        act, top = _scene(tree, scene)

        async def settle() -> None:
            await trio.testing.wait_all_tasks_blocked()
            await trio.sleep(delay)
            for _ in range(rounds):
                await trio.lowlevel.checkpoint()

        await run_tree(tree, ending, act, top=top, settle=settle)

    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))


# --- a Ctrl-C at a step of the shutdown Hypothesis chooses --------------------------------


class _CtrlCAtStep(trio.abc.Instrument):
    """Raises SIGINT from Trio's own context (delivered to the main task, in the
    shutdown of the block) before the ``at``-th task step once armed."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.steps = 0
        self.armed = False

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if self.armed:
            self.steps += 1
            if self.steps == self.at:
                trio.lowlevel.current_trio_token().run_sync_soon(signal.raise_signal, signal.SIGINT)


class _Slow(Agent):
    """Spawns a kid in on_start; handles in 0.3 s, stops in 0.2 s."""

    async def on_start(self, ctx: Context) -> None:
        ctx.spawn(AgentSpec(_SlowKid, name=f"{ctx.name}-kid"))

    async def handle(self, ctx: Context, msg: Message) -> None:
        await trio.sleep(0.3)

    async def on_stop(self, ctx: Context) -> None:
        await trio.sleep(0.2)


class _SlowKid(Agent):
    async def handle(self, ctx: Context, msg: Message) -> None:
        await trio.sleep(5)

    async def on_stop(self, ctx: Context) -> None:
        await trio.sleep(0.1)


@fault_settings(40)
@given(at=st.integers(1, 70))
def test_a_ctrl_c_at_any_step_of_the_shutdown_leaves_a_closed_kernel_and_no_waiter(
    at: int,
) -> None:
    """A Ctrl-C while the block's shutdown runs (three agents with a linked kid each,
    messages queued, a request pending, two stream readers and a task beside the block
    waiting for the shutdown in ``kernel.shutdown()``) forces the exit: open_kernel
    raises it. Regression: a Ctrl-C before the tree had stopped left the task beside
    waiting forever (a hang), ``kernel.stopped`` false and the phase ``draining`` or
    ``stopping`` after the kernel had closed, agents_alive 3 (the runs cut short in the
    drain never counted out) and, cut at the first step, a message in flight for good.
    Now the cut-short shutdown ends as one: the tree's cancel counts its agents out,
    what is queued is dead-lettered ``shutdown``, the kernel is stopped, its waiters
    return."""
    ended: list[str] = []
    ctrl_c = _CtrlCAtStep(at)
    kernels: list[Kernel] = []
    outcome: list[str] = []

    async def read(stream: Any, label: str) -> None:
        async for _ in stream:
            pass
        ended.append(label)

    async def ask(kernel: Kernel) -> None:
        with contextlib.suppress(NexusError):
            await kernel.request("a", "q", timeout=1000)
        ended.append("request")

    async def beside(kernel: Kernel) -> None:
        await kernel.wait_shutting_down()
        await kernel.shutdown()
        ended.append("beside")

    async def main() -> None:
        living = tasks_living()
        with trio.move_on_after(600) as hang:
            async with trio.open_nursery() as others:
                try:
                    async with open_kernel(
                        Config(kernel=KernelConfig(shutdown_grace_ms=500))
                    ) as kernel:
                        kernels.append(kernel)
                        others.start_soon(read, kernel.events(), "events")
                        others.start_soon(read, kernel.dead_letters(), "dead letters")
                        for name in "abc":
                            kernel.spawn(AgentSpec(_Slow, name=name))
                        await trio.testing.wait_all_tasks_blocked()
                        for name in "abc":
                            await kernel.send(name, 1)
                            await kernel.send(f"{name}-kid", 1)
                        others.start_soon(ask, kernel)
                        await trio.testing.wait_all_tasks_blocked()
                        others.start_soon(beside, kernel)
                        ctrl_c.armed = True
                    outcome.append("closed")
                    await trio.lowlevel.checkpoint()  # (a Ctrl-C after the close lands here)
                except BaseException as exc:
                    outcome.append("KeyboardInterrupt" if _is_ctrl_c(exc) else repr(exc))
        assert not hang.cancelled_caught, f"a waiter was left waiting: {ended}"
        assert tasks_living() == living

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with real_time_limit(20), contextlib.suppress(KeyboardInterrupt):
            trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0), instruments=[ctrl_c])
    finally:
        signal.signal(signal.SIGINT, previous)
    [kernel] = kernels
    assert outcome in (["KeyboardInterrupt"], ["closed", "KeyboardInterrupt"], ["closed"])
    assert sorted(ended) == ["beside", "dead letters", "events", "request"]
    stats = kernel.stats()
    assert kernel.stopped and kernel.phase is KernelPhase.STOPPED
    assert (stats.agents_alive, stats.in_flight) == (0, 0), stats
    assert_conserved(kernel)


def _is_ctrl_c(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return exc.subgroup(KeyboardInterrupt) is not None
    return isinstance(exc, KeyboardInterrupt)


# --- stops that meet: several callers, the agent itself, a shielded background task ------


@pytest.mark.parametrize("address", ["name", "id"])
async def test_a_stop_asked_by_two_tasks_and_by_the_agent_itself_stops_it_once(
    address: str, autojump_clock: trio.testing.MockClock
) -> None:
    """The agent's handler calls ``kernel.stop`` on itself (returns at once), then two
    tasks ask the same stop while its handler still runs: ``on_stop`` runs once, after
    the message in hand; every call returns when it has stopped; one ``stopped`` event;
    the message queued behind is dead-lettered ``agent_stopped``. (Passes on main.)"""
    journal: list[tuple[str, float]] = []

    class Stoppable(Agent):
        async def handle(self, ctx: Context, msg: Message) -> None:
            if msg.payload == "stop yourself":
                await ctx.kernel.stop(ctx.id if address == "id" else "stoppable")
                journal.append(("own stop returned", trio.current_time()))
            await trio.sleep(1)

        async def on_stop(self, ctx: Context) -> None:
            journal.append(("on_stop", trio.current_time()))
            await trio.sleep(2)

    async def stop(kernel: Kernel, target: Any, label: str) -> None:
        await kernel.stop(target)
        journal.append((label, trio.current_time()))

    living = tasks_living()
    async with open_kernel(Config()) as kernel:
        events = kernel.events()
        ref = kernel.spawn(AgentSpec(Stoppable, name="stoppable", shutdown_timeout=5))
        await trio.testing.wait_all_tasks_blocked()
        await kernel.send(ref, "stop yourself")
        await kernel.send(ref, "queued")
        async with trio.open_nursery() as nursery:
            await trio.sleep(0.1)
            nursery.start_soon(stop, kernel, ref, "stop by ref returned")
            await trio.sleep(0.1)
            nursery.start_soon(stop, kernel, "stoppable" if address == "name" else ref.id, "2nd")
        stats = kernel.stats()
        seen = _drained(events)
        letters = kernel.recent_dead_letters()
    assert journal[0] == ("own stop returned", 0.0)
    assert journal[1] == ("on_stop", 1.0)
    assert sorted(journal[2:]) == [("2nd", 3.0), ("stop by ref returned", 3.0)]
    assert seen.count(("stopped", "stoppable")) == 1
    assert [(d.message.payload, d.reason.value) for d in letters] == [("queued", "agent_stopped")]
    assert (stats.handled, stats.agents_alive) == (1, 0)
    assert_conserved(kernel)
    assert tasks_living() == living


async def test_a_stop_waits_for_a_background_task_that_shields_itself_then_runs_on_stop(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A ``ctx.nursery`` task shielded from cancellation for 3 s when the agent is
    stopped with a 1 s shutdown timeout: the handler in hand is cancelled at the
    timeout (dead-lettered ``agent_stopped``), but the run's nursery cannot close before
    the shielded task is done (Trio's rule: a shield is kept), so ``on_stop`` runs and
    ``kernel.stop`` returns at 3 s, once; what the task sends after its shield (no
    checkpoint: a send with room) is accepted and handled by its peer. (Passes on main.)"""
    journal: list[tuple[str, float]] = []

    class Stubborn(Agent):
        async def on_start(self, ctx: Context) -> None:
            async def shielded() -> None:
                with trio.CancelScope(shield=True):
                    await trio.sleep(3)
                journal.append(("task done", trio.current_time()))
                await ctx.send("peer", "from the task")

            ctx.nursery.start_soon(shielded)

        async def handle(self, ctx: Context, msg: Message) -> None:
            await trio.sleep(10)

        async def on_stop(self, ctx: Context) -> None:
            journal.append(("on_stop", trio.current_time()))

    @agent(name="peer")
    async def peer(ctx: Context, msg: Message) -> None:
        journal.append((f"peer got {msg.payload}", trio.current_time()))

    living = tasks_living()
    async with open_kernel(Config()) as kernel:
        kernel.spawn(peer)
        kernel.spawn(AgentSpec(Stubborn, name="stubborn", shutdown_timeout=1))
        await trio.testing.wait_all_tasks_blocked()
        await kernel.send("stubborn", "in hand")
        await kernel.send("stubborn", "queued")
        await trio.testing.wait_all_tasks_blocked()
        await kernel.stop("stubborn")
        journal.append(("stop returned", trio.current_time()))
        await trio.testing.wait_all_tasks_blocked()
        stats = kernel.stats()
        letters = kernel.recent_dead_letters()
    # (the peer's handler runs in the same round as on_stop, in Trio's order)
    assert journal[0] == ("task done", 3.0)
    assert sorted(journal[1:]) == [
        ("on_stop", 3.0),
        ("peer got from the task", 3.0),
        ("stop returned", 3.0),
    ]
    assert journal.index(("on_stop", 3.0)) < journal.index(("stop returned", 3.0))
    assert sorted((d.message.payload, d.reason.value) for d in letters) == [
        ("in hand", "agent_stopped"),
        ("queued", "agent_stopped"),
    ]
    assert (stats.accepted, stats.handled, stats.dead_lettered) == (3, 1, 2)
    assert_conserved(kernel)
    assert tasks_living() == living
