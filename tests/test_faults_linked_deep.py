"""Fault injection on linked children three levels deep and on restarts (thirty-first pass).

A parent ``p`` spawns a linked child ``c`` in its ``on_start``, which spawns a linked
grandchild ``g`` in its own. The kernel then stops at an unlucky moment: while ``g`` is
still in ``on_start``, while ``c`` waits out a restart's backoff, while ``p``'s
``on_stop`` sends to ``c``, while ``c``'s ``on_stop`` spawns a child of its own, while
``ctx.nursery`` tasks wait for room in a sibling's full mailbox. Each ends three ways
(the block left, ``kernel.shutdown(0)``, the block cancelled from outside). After each:
no task left, every ``on_start`` that returned matched by one ``on_stop``, children
stopped before their parents, and every message sent accounted for (sent = handled +
dead-lettered + rejected, from ``kernel.stats()``).

Then restart storms: a child failing every message near its supervisor's intensity
limit while its parent is stopped, a restart racing a sibling's stop, a request to an
agent restarted in the middle of its handler. Everything runs on a
``MockClock(autojump_threshold=0)``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

import pytest
import trio
import trio.testing

from nexus_trio import (
    Agent,
    AgentNotFound,
    AgentSpec,
    Backoff,
    Config,
    Context,
    KernelConfig,
    KernelShuttingDown,
    MailboxFull,
    Message,
    NexusError,
    RequestFailed,
    RequestTimeout,
    SupervisionConfig,
    Supervisor,
    agent,
    open_kernel,
)
from nexus_trio.testing import assert_conserved

from .hang_guard import real_time_limit, tasks_living

Hook = Callable[[Context], Awaitable[None]]
PARENT_OF = {"c": "p", "g": "c", "h": "c"}


class Tree:
    """A journal of runs: ("start", x) as on_start begins, ("up", x) once it returned,
    ("stop", x) as on_stop begins; the sends the test and the agents tried."""

    def __init__(self, parents: dict[str, str] | None = None) -> None:
        #: child -> the parent it must stop before
        self.parents = PARENT_OF if parents is None else parents
        self.journal: list[tuple[str, str]] = []
        self.sent = 0
        self.cancelled = 0
        self.refused: Counter[str] = Counter()
        self.errors: list[BaseException] = []

    def spec(
        self,
        label: str,
        *,
        kids: tuple[str, ...] = (),
        start: Hook | None = None,
        stop: Hook | None = None,
        handle: Callable[[Context, Message], Awaitable[Any]] | None = None,
        **options: Any,
    ) -> AgentSpec:
        tree = self

        class Node(Agent):
            async def on_start(self, ctx: Context) -> None:
                tree.journal.append(("start", label))
                for kid in kids:
                    ctx.spawn(tree.specs[kid])
                if start is not None:
                    await start(ctx)
                tree.journal.append(("up", label))

            async def handle(self, ctx: Context, msg: Message) -> Any:
                if handle is not None:
                    return await handle(ctx, msg)
                return None

            async def on_stop(self, ctx: Context) -> None:
                tree.journal.append(("stop", label))
                if stop is not None:
                    await stop(ctx)

        return agent(Node, name=label, **options)

    specs: dict[str, AgentSpec]

    async def send(self, ctx: Context | Any, to: str, payload: Any) -> None:
        """A send counted as sent; a refusal is counted by its kind."""
        self.sent += 1
        try:
            await ctx.send(to, payload)
        except (AgentNotFound, MailboxFull, KernelShuttingDown) as exc:
            self.refused[type(exc).__name__] += 1
        except trio.Cancelled:
            # a send cancelled while it waited for room never got in: not accepted
            self.cancelled += 1
            raise

    def check(self, kernel: Any) -> None:
        """The invariants, once the kernel has closed."""
        up = Counter(x for what, x in self.journal if what == "up")
        stops = Counter(x for what, x in self.journal if what == "stop")
        starts = Counter(x for what, x in self.journal if what == "start")
        for label, n in stops.items():
            assert n <= starts[label], f"{label}: {n} on_stop for {starts[label]} on_start"
        for label, n in up.items():
            assert stops[label] == n, f"{label}: {n} on_start returned, {stops[label]} on_stop"
        last_stop = {x: i for i, (what, x) in enumerate(self.journal) if what == "stop"}
        for child, parent in self.parents.items():
            if child in last_stop and parent in last_stop:
                assert last_stop[child] < last_stop[parent], (
                    f"{child} stopped after its parent {parent}: {self.journal}"
                )
        stats = kernel.stats()
        assert stats.in_flight == 0
        assert stats.agents_alive == 0
        assert_conserved(kernel)
        # every send is accepted (and then handled, replied or dead-lettered) or refused
        assert self.sent == stats.accepted + sum(stats.rejected.values()) + self.cancelled, (
            self.sent,
            stats,
            self.refused,
        )
        assert stats.accepted == stats.handled + stats.replies_delivered + stats.dead_lettered
        assert sum(self.refused.values()) == sum(stats.rejected.values()), (self.refused, stats)
        assert not self.errors, self.errors


def config(**kernel: Any) -> Config:
    options: dict[str, Any] = {"shutdown_grace_ms": 100, "send_timeout_ms": 10_000}
    options.update(kernel)
    return Config(
        kernel=KernelConfig(**options),
        supervision=SupervisionConfig(
            max_restarts=1000, backoff_initial_ms=1000, backoff_max_ms=1000
        ),
    )


#: how the kernel ends: its block left, ``shutdown(0)``, the block cancelled from outside;
#: or ``kernel.stop("p")`` first (the kernel runs on), after which no agent may be left
ENDINGS = ["leave", "shutdown", "cancel", "stop_p"]


async def run_tree(
    tree: Tree,
    ending: str,
    act: Callable[[Any], Awaitable[None]],
    cfg: Config | None = None,
    top: AgentSpec | Supervisor | None = None,
    settle: Callable[[], Awaitable[None]] = trio.testing.wait_all_tasks_blocked,
) -> Any:
    """Spawn ``top`` (``p`` by default; and whatever it spawns), let ``act`` set the
    scene, wait for ``settle`` (all tasks blocked, by default), end the kernel as
    ``ending`` says, and check that nothing was left running."""
    baseline = tasks_living()
    kernel: Any = None
    with real_time_limit(20), trio.fail_after(3600), trio.CancelScope() as outside:
        async with open_kernel(cfg or config(), seed=0) as kernel:
            kernel.spawn(tree.specs["p"] if top is None else top)
            await trio.testing.wait_all_tasks_blocked()
            await act(kernel)
            await settle()
            if ending == "stop_p":
                await kernel.stop("p")
                await trio.testing.wait_all_tasks_blocked()
                left = [r.name for r in kernel.agents()]
                assert left == [], f"left after their parent's stop: {left}"
            elif ending == "shutdown":
                await kernel.shutdown(0)
            elif ending == "cancel":
                outside.cancel()
    assert tasks_living() == baseline, "the kernel left tasks behind"
    tree.check(kernel)
    return kernel


async def nothing(kernel: Any) -> None:
    pass


async def boom(ctx: Context, msg: Message) -> None:
    raise RuntimeError(f"boom {msg.payload}")


def three_levels(
    tree: Tree,
    p: dict[str, Any] | None = None,
    c: dict[str, Any] | None = None,
    g: dict[str, Any] | None = None,
    **more: AgentSpec,
) -> None:
    """p spawns c in its on_start, c spawns g in its own; ``p``, ``c``, ``g``: their
    other options (hooks, mailbox); ``more``: further specs by label."""
    p = {"kids": ("c",), **(p or {})}
    c = {"kids": ("g",), **(c or {})}
    tree.specs = {
        "p": tree.spec("p", **p),
        "c": tree.spec("c", **c),
        "g": tree.spec("g", **(g or {})),
        **more,
    }


def quick_sup(tree: Tree, *labels: str, **options: Any) -> Supervisor:
    """A supervisor ``sup`` of ``labels``, restarting after 1 ms unless told otherwise."""
    options.setdefault("backoff", Backoff(0.001, 0.001, jitter=0.0))
    return Supervisor(name="sup", children=[tree.specs[x] for x in labels], **options)


@pytest.mark.parametrize("ending", ENDINGS)
async def test_stop_while_a_grandchild_is_in_on_start(
    ending: str, autojump_clock: trio.testing.MockClock
) -> None:
    tree = Tree()

    async def forever(ctx: Context) -> None:
        await trio.sleep_forever()

    three_levels(tree, g={"start": forever})
    await run_tree(tree, ending, nothing)
    assert ("start", "g") in tree.journal
    assert ("up", "g") not in tree.journal
    assert [x for what, x in tree.journal if what == "stop"] == ["c", "p"]


@pytest.mark.parametrize("ending", ENDINGS)
async def test_stop_while_a_child_waits_to_restart(
    ending: str, autojump_clock: trio.testing.MockClock
) -> None:
    tree = Tree()
    three_levels(tree, c={"handle": boom})

    async def act(kernel: Any) -> None:
        await tree.send(kernel, "c", "fail")
        await tree.send(kernel, "c", "queued")  # waits in c's mailbox through the backoff

    kernel = await run_tree(tree, ending, act)
    # c's run failed and stopped (g first); its restart, a second away, never came
    assert tree.journal == [
        ("start", "p"),
        ("up", "p"),
        ("start", "c"),
        ("up", "c"),
        ("start", "g"),
        ("up", "g"),
        ("stop", "g"),
        ("stop", "c"),
        ("stop", "p"),
    ]
    assert kernel.stats().failed == 1


@pytest.mark.parametrize("ending", ENDINGS)
async def test_stop_while_a_parent_s_on_stop_sends_to_its_child(
    ending: str, autojump_clock: trio.testing.MockClock
) -> None:
    tree = Tree()
    got: list[Any] = []

    async def tell_child(ctx: Context) -> None:
        await tree.send(ctx, "c", "bye")

    async def note(ctx: Context, msg: Message) -> None:
        got.append(msg.payload)

    three_levels(tree, p={"stop": tell_child}, c={"handle": note})
    await run_tree(tree, ending, nothing)
    # c stopped before p's on_stop: the send is refused (counted), not lost
    assert got == []
    assert tree.sent == 1
    assert sum(tree.refused.values()) == 1, tree.refused


@pytest.mark.parametrize("ending", ENDINGS)
async def test_stop_while_a_child_spawns_a_linked_child_in_its_on_stop(
    ending: str, autojump_clock: trio.testing.MockClock
) -> None:
    """c's ``on_stop`` spawns h: refused once the kernel stops its tree; in a
    ``kernel.stop(p)`` (the kernel runs on) h is spawned and must not outlive c, nor p."""
    tree = Tree()
    refused: list[str] = []

    async def spawn_h(ctx: Context) -> None:
        try:
            ctx.spawn(tree.specs["h"])
        except NexusError as exc:
            refused.append(type(exc).__name__)

    three_levels(tree, c={"stop": spawn_h}, h=tree.spec("h"))
    await run_tree(tree, ending, nothing)
    if ending == "stop_p":
        # (h, spawned by a run that is ending, is stopped before its start)
        assert refused == []
        assert ("start", "h") not in tree.journal
    else:
        assert refused == ["KernelShuttingDown"], (refused, tree.journal)


@pytest.mark.parametrize("kids", [("s", "c"), ("c", "s")])
@pytest.mark.parametrize("ending", ENDINGS)
async def test_stop_while_nursery_tasks_wait_for_room_in_a_sibling_s_mailbox(
    ending: str, kids: tuple[str, str], autojump_clock: trio.testing.MockClock
) -> None:
    """c's ``ctx.nursery`` tasks tell its sibling s (capacity 1, ``block``, a handler
    that hangs) four times; the stop comes to c first (s spawned first) or to s."""
    tree = Tree()

    async def hang(ctx: Context, msg: Message) -> None:
        await trio.sleep_forever()

    async def flood(ctx: Context) -> None:
        async def one(i: int) -> None:
            await tree.send(ctx, "s", i)

        for i in range(4):
            ctx.nursery.start_soon(one, i)

    sibling = tree.spec("s", handle=hang, mailbox_capacity=1, overflow="block")
    three_levels(tree, p={"kids": kids}, c={"start": flood}, s=sibling)
    waiting: list[int] = []

    async def act(kernel: Any) -> None:
        waiting.append(kernel.stats().in_flight)

    kernel = await run_tree(tree, ending, act)
    # one handled (hanging), one queued, two waiting for room: all four accounted for
    assert waiting == [4]
    assert tree.sent == 4
    stats = kernel.stats()
    if kids == ("c", "s") and ending == "stop_p":
        # s stops first: the waiting two get in as it stops, all four dead-lettered
        assert (stats.accepted, tree.cancelled, stats.dead_letters_by_reason) == (
            4,
            0,
            {"agent_stopped": 4},
        )
    else:
        # the two waiting senders are cancelled with c's run: they never got in
        assert (stats.accepted, tree.cancelled, stats.dead_lettered) == (2, 2, 2)
    assert sum(tree.refused.values()) == 0


# --- restart storms ---------------------------------------------------------------------------


@pytest.mark.parametrize("before", [2, 3])
async def test_a_child_failing_every_message_near_its_limit_while_its_parent_is_stopped(
    before: int, autojump_clock: trio.testing.MockClock
) -> None:
    """c fails every message (two failures of three allowed a second, then six more
    messages) as its linked parent p is stopped in the same tick."""
    tree = Tree()
    three_levels(tree, c={"handle": boom})
    cfg = Config(
        kernel=KernelConfig(shutdown_grace_ms=100),
        supervision=SupervisionConfig(
            max_restarts=3, within_ms=1000, backoff_initial_ms=1, backoff_max_ms=1
        ),
    )
    left: list[Any] = []

    async def act(kernel: Any) -> None:
        await storm(tree, kernel, "c", "p", before)
        left.extend(kernel.agents())

    kernel = await run_tree(tree, "leave", act, cfg)
    assert left == []
    check_storm(tree, kernel, "c", before)


async def storm(tree: Tree, kernel: Any, target: str, top: str, before: int) -> None:
    """``before`` failing messages to ``target``, one at a time, then six at once beside
    ``kernel.stop(top)``."""
    for i in range(before):
        await tree.send(kernel, target, i)
        await trio.sleep(0.01)  # (mock time) it fails and is restarted
    async with trio.open_nursery() as nursery:
        for i in range(before, before + 6):
            nursery.start_soon(tree.send, kernel, target, i)
        nursery.start_soon(kernel.stop, top)


def check_storm(tree: Tree, kernel: Any, target: str, before: int) -> None:
    """The first failing message of the six is handled before the stop lands (its
    failure is counted, not restarted, nor escalated past the limit); the other five
    are dead-lettered with the stop; each run of ``target`` took its child along."""
    stats = kernel.stats()
    assert (stats.failed, stats.restarts, stats.given_up) == (before + 1, before, 0)
    assert dict(stats.dead_letters_by_reason) == {"handler_error": before + 1, "agent_stopped": 5}
    runs = Counter(tree.journal)
    assert runs[("start", target)] == runs[("start", "g")] == runs[("stop", "g")] == before + 1


@pytest.mark.parametrize("before", [2, 3])
async def test_a_child_failing_every_message_near_its_limit_while_its_supervisor_is_stopped(
    before: int, autojump_clock: trio.testing.MockClock
) -> None:
    tree = Tree({"g": "w"})
    tree.specs = {"w": tree.spec("w", kids=("g",), handle=boom), "g": tree.spec("g")}
    left: list[Any] = []

    async def act(kernel: Any) -> None:
        await storm(tree, kernel, "w", "sup", before)
        left.extend(kernel.agents())

    sup = quick_sup(tree, "w", max_restarts=3, within=1.0)
    kernel = await run_tree(tree, "leave", act, top=sup)
    assert left == []
    check_storm(tree, kernel, "w", before)


async def test_a_group_restart_racing_a_sibling_s_exit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """one_for_all: w fails as its sibling s exits (``ctx.stop()``) in the same tick."""
    tree = Tree({"g": "w"})

    async def leave(ctx: Context, msg: Message) -> None:
        ctx.stop()

    tree.specs = {
        "w": tree.spec("w", kids=("g",), handle=boom),
        "s": tree.spec("s", handle=leave, restart="transient"),
        "g": tree.spec("g"),
    }
    names: list[str] = []

    async def act(kernel: Any) -> None:
        tree.sent += 2
        kernel.send_nowait("w", "x")
        kernel.send_nowait("s", "x")
        await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(1)
        names.extend(sorted(r.name for r in kernel.agents()))

    sup = quick_sup(tree, "w", "s", strategy="one_for_all", max_restarts=10, within=1.0)
    await run_tree(tree, "leave", act, top=sup)
    assert names == ["g", "w"], (names, tree.journal)
    # the group restart came after s's exit: w (and g) restarted once, s not (transient)
    assert Counter(tree.journal) == {
        **{(what, x): 2 for what in ("start", "up", "stop") for x in ("w", "g")},
        **{(what, "s"): 1 for what in ("start", "up", "stop")},
    }


async def test_a_restart_racing_kernel_stop_from_a_sibling(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A sibling's handler stops w (``ctx.kernel.stop``) while w waits out its backoff."""
    tree = Tree({"g": "w"})

    async def stop_w(ctx: Context, msg: Message) -> None:
        await ctx.kernel.stop("w")

    tree.specs = {
        "w": tree.spec("w", kids=("g",), handle=boom),
        "s": tree.spec("s", handle=stop_w),
        "g": tree.spec("g"),
    }
    names: list[str] = []

    async def act(kernel: Any) -> None:
        for to in ("w", "w", "s"):
            await tree.send(kernel, to, "x")
        await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(2)
        names.extend(sorted(r.name for r in kernel.agents()))

    backoff = Backoff(0.5, 0.5, jitter=0.0)
    sup = quick_sup(tree, "w", "s", max_restarts=10, within=1.0, backoff=backoff)
    kernel = await run_tree(tree, "leave", act, top=sup)
    assert names == ["s"], (names, tree.journal)
    assert Counter(tree.journal)[("start", "w")] == 1, tree.journal
    # w's failed message is a handler_error; the second one is dead-lettered with the stop
    assert dict(kernel.stats().dead_letters_by_reason) == {"handler_error": 1, "agent_stopped": 1}


@pytest.mark.parametrize("how", ["group", "background", "parent"])
async def test_a_request_to_an_agent_restarted_mid_handle_fails_at_once(
    how: str, autojump_clock: trio.testing.MockClock
) -> None:
    """The handler answering a request is cancelled by a restart (a one_for_all sibling
    fails, a background task of its own fails, its linked parent restarts): the caller
    gets RequestFailed naming why, at once, not its timeout; the query is counted."""
    tree = Tree({"w": "p"})
    holding = trio.Event()

    async def slow(ctx: Context, msg: Message) -> Any:
        if how == "background":

            async def crash() -> None:
                await trio.sleep(0.1)
                raise RuntimeError("background crash")

            ctx.nursery.start_soon(crash)
        holding.set()
        await trio.sleep(100)
        return "late"

    tree.specs = {
        "w": tree.spec("w", handle=slow),
        "x": tree.spec("x", handle=boom),
        "p": tree.spec("p", kids=("w",), handle=boom),
    }
    top = {
        "group": quick_sup(tree, "w", "x", strategy="one_for_all"),
        "background": quick_sup(tree, "w"),
        "parent": tree.specs["p"],
    }[how]
    outcome: list[Any] = []

    async def ask(kernel: Any) -> None:
        start = trio.current_time()
        tree.sent += 1
        try:
            outcome.append(await kernel.request("w", "q", timeout=30))
        except (RequestFailed, RequestTimeout) as exc:
            outcome.append(exc)
        outcome.append(trio.current_time() - start)

    async def act(kernel: Any) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask, kernel)
            await holding.wait()
            if how != "background":
                await tree.send(kernel, "x" if how == "group" else "p", "fail")

    kernel = await run_tree(tree, "leave", act, config(request_timeout_ms=60_000), top)
    error, took = outcome
    # the handler in hand is cut short after its shutdown_timeout (the grace, 0.1 s):
    # the query is dead-lettered and the caller told why, not left to its 30 s timeout
    assert isinstance(error, RequestFailed), outcome
    assert took == pytest.approx(0.1), outcome
    assert (error.reason, error.to) == ("agent_stopped", "w")
    assert "failed (agent_stopped)" in str(error)
    assert kernel.stats().dead_letters_by_reason["agent_stopped"] == 1


async def test_a_group_restart_under_way_at_the_tree_s_stop_counts_each_agent_out_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Regression (found by the kernel model, 3,000 examples): one_for_all children with a
    slow ``on_start`` (and no ``on_stop``); one fails and the kernel shuts down with a
    grace while the group restarts. A sibling's run ended in the tree's stop (counted out
    of ``agents_alive``), then a run of the restart started after it (called off at once)
    ended too and counted it out again: ``agents_alive`` was -2 after the shutdown."""
    size = 3

    class Slow(Agent):
        async def on_start(self, ctx: Context) -> None:
            await trio.sleep(0.05)

        async def handle(self, ctx: Context, msg: Message) -> None:
            raise RuntimeError("boom")

    sup = Supervisor(
        name="sup",
        strategy="one_for_all",
        children=[agent(Slow, name=f"c{i}") for i in range(size)],
        max_restarts=3,
        within=1.0,
        backoff=Backoff(0.001, 0.01, jitter=0.0),
    )
    alive: list[int] = []
    baseline = tasks_living()
    with real_time_limit(20), trio.fail_after(3600):
        async with open_kernel(config(shutdown_grace_ms=0), seed=0) as kernel:
            kernel.spawn(sup)
            await trio.testing.wait_all_tasks_blocked()
            await kernel.send(f"c{size - 1}", "fail")
            await trio.testing.wait_all_tasks_blocked()
            alive.append(kernel.stats().agents_alive)
            await kernel.shutdown(2.0)
            alive.append(kernel.stats().agents_alive)
    assert tasks_living() == baseline
    assert_conserved(kernel)
    assert alive == [size, 0]


@pytest.mark.parametrize("when", ["stop_requested", "on_stop"])
@pytest.mark.parametrize("ending", ENDINGS)
async def test_a_background_task_spawning_while_its_parent_stops(
    ending: str, when: str, autojump_clock: trio.testing.MockClock
) -> None:
    """p's ``ctx.nursery`` task spawns a linked child (with a child of its own) as p is
    asked to stop, or once p's ``on_stop`` runs: that child must not outlive p."""
    tree = Tree({"c": "p", "g": "c", "late": "p", "g2": "late"})
    stopping = trio.Event()
    spawned: list[str] = []

    async def background(ctx: Context) -> None:
        async def spawn_late() -> None:
            if when == "on_stop":
                await stopping.wait()
            else:
                await ctx.wait_stop_requested()
            try:
                ctx.spawn(tree.specs["late"])
            except NexusError as exc:
                spawned.append(type(exc).__name__)
            else:
                spawned.append("late")

        ctx.nursery.start_soon(spawn_late)

    async def on_stop(ctx: Context) -> None:
        stopping.set()
        await trio.sleep(0.01)

    late = tree.spec("late", kids=("g2",))
    three_levels(tree, p={"start": background, "stop": on_stop}, late=late, g2=tree.spec("g2"))
    await run_tree(tree, ending, nothing)
    # (ctx.nursery's tasks are cancelled before on_stop: none spawns then; one woken by
    # the stop request is refused once the kernel stops its tree, and what it spawns in
    # a stop of p alone is stopped before its start)
    if when == "on_stop":
        assert spawned == []
    else:
        assert spawned == ["late" if ending == "stop_p" else "KernelShuttingDown"]
    assert ("start", "late") not in tree.journal


class Link(Agent):
    """``c<i>`` spawns ``c<i+1>`` as it starts, up to :attr:`length` agents in a chain;
    journals its ``on_stop``."""

    length: ClassVar[int] = 0
    stops: ClassVar[list[str]] = []

    async def on_start(self, ctx: Context) -> None:
        i = int((ctx.name or "c0")[1:])
        if i + 1 < Link.length:
            ctx.spawn(agent(Link, name=f"c{i + 1}"))

    async def on_stop(self, ctx: Context) -> None:
        Link.stops.append(ctx.name or "?")


@pytest.mark.parametrize("drain", [False, True])
async def test_a_stop_of_a_long_chain_of_spawned_agents_stops_them_deepest_first(
    autojump_clock: Any, drain: bool
) -> None:
    """``c0`` spawned ``c1``, which spawned ``c2``, ... 600 agents in a chain;
    ``kernel.stop("c0", drain=...)`` stops them all, deepest first, and returns. Before
    (fifty-eighth pass) each level of the chain took two frames of the supervisor
    loop's stack (``_stop_child``, ``_stop_linked``): about 500 levels raised
    ``RecursionError`` there, the kernel's block crashed with it, and no ``on_stop``
    ran."""
    Link.length, Link.stops = 600, []
    async with open_kernel(config()) as kernel:
        kernel.spawn(agent(Link, name="c0"))
        await trio.testing.wait_all_tasks_blocked()
        assert len(kernel.agents()) == 600
        await kernel.stop("c0", drain=drain)
        assert kernel.agents() == []
    assert_conserved(kernel)
    assert Link.stops == [f"c{i}" for i in reversed(range(600))]
