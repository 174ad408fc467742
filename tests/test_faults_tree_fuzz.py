"""A seeded fuzz driver of random supervision trees, stops and shutdowns under a
``MockClock``, with a bound on how long each stop and the shutdown take (the fifty-
seventh pass's hunt found two hangs with such a driver; the fifty-eighth landed it).

Each seed draws a scenario from ``random.Random(seed)``: nested supervisors (all three
strategies, random restart types, intensities and backoffs) over agents that spawn linked
children (``ctx.spawn``, chains of them) in ``on_start`` or in a handler, fail in
``on_start``, a handler, a background task or ``on_stop``, end their own run
(``ctx.stop()``) and take time there; a script sends them messages and calls
``kernel.stop(name, drain=...)`` at random times (racing each other and restarts'
backoffs), and ``kernel.shutdown(grace=g)`` comes at a random point. Properties:

* every accepted message is handled or dead-lettered exactly once, a failed one
  ``handler_error``, every dead letter with a reason and a detail, and the kernel's
  counters conserve (``assert_conserved``);
* every ``on_start`` that returned has exactly one ``on_stop``; linked children stop
  before their parent run's ``on_stop``;
* no task is left behind;
* each ``kernel.stop`` and the shutdown return within twice the scenario's work (every
  sleep the agents began, every restart's maximal backoff) plus 12 s of mock time: an
  agent's ``shutdown_timeout`` of 100 s (or an infinite one) waited out is a hang.

The scenario is printed with the failure (``describe``); rerun one with
``NEXUS_FUZZ_SEEDS=905 pytest -n0 tests/test_faults_tree_fuzz.py`` (a seed, or a range
``A:B``: ``NEXUS_FUZZ_SEEDS=0:5000`` for a hunt). CI runs ``SEEDS`` seeds. Trio picks
the order of the tasks of a round anew at each run, so a failing seed may need a few
runs (``NEXUS_FUZZ_REPEAT=5``).
"""

from __future__ import annotations

import itertools
import math
import os
import random
import uuid
from collections import Counter
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from nexus_trio import (
    Agent,
    Context,
    DeadLetterReason,
    Message,
    agent,
    open_kernel,
    pool,
)
from nexus_trio.testing import assert_conserved

from .conftest import make_config
from .hang_guard import DOCUMENTED, run_on_mock_clock, tasks_living
from .test_tree_properties import (
    STRATEGIES,
    check_linked_stop_first,
    check_runs_stopped_once,
    random_supervisor,
)

#: the seeds CI runs (about 11 s of CPU): they catch both hangs of the fifty-seventh pass
SEEDS = range(300)
#: wider shapes for a hunt (``NEXUS_FUZZ_WIDE=1``): trees four deep, pools among the
#: agents, up to eight stops (other scenarios than CI's for the same seeds)
WIDE = bool(os.environ.get("NEXUS_FUZZ_WIDE"))
DEPTH = 4 if WIDE else 3
#: mock seconds a stop or the shutdown may take beyond twice the scenario's work
SLACK = 12.0
#: the agents' shutdown timeouts: 100 s (a hang waits it out) or none at all
TIMEOUTS = (100.0, 100.0, math.inf)


def seeds() -> list[int]:
    """The seeds to run: ``NEXUS_FUZZ_SEEDS`` (``N`` or ``A:B``), else :data:`SEEDS`."""
    spec = os.environ.get("NEXUS_FUZZ_SEEDS")
    if spec is None:
        return list(SEEDS)
    start, _, end = spec.partition(":")
    return list(range(int(start), int(end))) if end else [int(start)]


@attrs.define
class Behaviour:
    """What one agent (by name) does: drawn from the scenario's seed and its name."""

    spawns: int = 0  # linked children spawned in on_start (each a chain one shorter)
    start_fails: int = 0  # the first runs whose on_start fails
    start_sleep: float = 0.0
    stop_sleep: float = 0.0
    stop_fails: bool = False
    background: float | None = None  # a background task failing the run after this


def behaviour(name: str) -> Behaviour:
    """Drawn from the seed and the name (a child's chain ends three deep); the roots of a
    small scenario spawn."""
    rng = random.Random(f"{J.seed}/{name}")
    depth = name.count(".")
    spawns = rng.choice([1, 2] if J.small and depth == 0 else [0, 0, 1, 2])
    return Behaviour(
        spawns=spawns if depth < 3 else 0,
        start_fails=rng.choice([0, 0, 0, 0, 1]),
        start_sleep=rng.choice([0.0, 0.0, 0.2]),
        stop_sleep=rng.choice([0.0, 0.0, 0.3, 1.0]),
        stop_fails=rng.random() < 0.15,
        background=rng.choice([None, None, None, None, 0.7, 2.5]),
    )


@attrs.define
class Journal:
    """What the agents did, shared by the scenario's agents (one scenario at a time)."""

    seed: int = 0
    small: bool = False
    work: float = 0.0  # every sleep begun, every restart's maximal backoff
    done: Counter[int] = attrs.Factory(Counter)
    raised: Counter[int] = attrs.Factory(Counter)
    entered: Counter[int] = attrs.Factory(Counter)
    returned: Counter[int] = attrs.Factory(Counter)
    stopped: Counter[int] = attrs.Factory(Counter)
    stop_order: dict[int, int] = attrs.Factory(dict)
    spawned_by: dict[int, list[uuid.UUID]] = attrs.Factory(dict)
    runs_of: dict[uuid.UUID, list[int]] = attrs.Factory(dict)
    starts: Counter[str] = attrs.Factory(Counter)
    tokens: itertools.count[int] = attrs.Factory(itertools.count)
    names: itertools.count[int] = attrs.Factory(itertools.count)


J = Journal()


async def sleep(seconds: float) -> None:
    J.work += seconds
    await trio.sleep(seconds)


def depth_of(name: str) -> int:
    return name.count(".")


class Fz(Agent):
    """Does what its :class:`Behaviour` and its messages say. A message is ``(id, kind,
    seconds)``: ``work`` sleeps, ``boom`` sleeps then fails, ``exit`` ends the run,
    ``spawn`` spawns a linked child (a chain, by its behaviour)."""

    token = -1

    async def on_start(self, ctx: Context) -> None:
        name = ctx.name or "?"
        how = behaviour(name)
        self.token = token = next(J.tokens)
        J.entered[token] += 1
        J.runs_of.setdefault(ctx.id, []).append(token)
        J.starts[name] += 1
        await sleep(how.start_sleep)
        if J.starts[name] <= how.start_fails:
            raise RuntimeError(f"{name} fails to start")
        for k in range(how.spawns):
            self.spawn(ctx, f"{name}.{k}")
        if how.background is not None:
            ctx.nursery.start_soon(self.fail_after, how.background)
        J.returned[token] += 1

    def spawn(self, ctx: Context, name: str) -> None:
        ref = ctx.spawn(agent(Fz, name=name, shutdown_timeout=choice_of(name, TIMEOUTS)))
        J.spawned_by.setdefault(self.token, []).append(ref.id)

    async def fail_after(self, seconds: float) -> None:
        await sleep(seconds)
        raise RuntimeError("background task fails")

    async def handle(self, ctx: Context, msg: Message) -> None:
        ident, kind, seconds = msg.payload
        await sleep(seconds)
        if kind == "boom":
            J.raised[ident] += 1
            raise RuntimeError(f"boom {ident}")
        if kind == "exit":
            ctx.stop()
        elif kind == "spawn" and depth_of(ctx.name or "") < 3:
            self.spawn(ctx, f"{ctx.name}.h{next(J.names)}")
        J.done[ident] += 1

    async def on_stop(self, ctx: Context) -> None:
        name = ctx.name or "?"
        how = behaviour(name)
        J.stopped[self.token] += 1
        J.stop_order[self.token] = len(J.stop_order)
        await sleep(how.stop_sleep)
        if how.stop_fails:
            raise RuntimeError("on_stop fails")


def choice_of(name: str, options: tuple[float, ...]) -> float:
    return random.Random(f"{J.seed}/{name}/timeout").choice(options)


@attrs.define
class Scenario:
    """A tree (specs), the agents' names, and a timed script of sends and stops."""

    specs: list[Any]
    agents: list[str]
    sups: list[str]
    steps: list[tuple[float, str, Any]]
    backoff_max: float
    shape: list[str]
    small: bool

    def describe(self) -> str:
        return "\n".join([*self.shape, *(f"  at {t}: {what} {arg}" for t, what, arg in self.steps)])


def draw(seed: int) -> Scenario:
    rng = random.Random(seed)
    counter = itertools.count()
    agents: list[str] = []
    sups: list[str] = []
    shape: list[str] = []
    backoff_max = rng.choice([0.001, 0.5, 2.0])
    supervisor = random_supervisor(rng, backoff_max, 30.0)

    def tree(level: int) -> Any:
        if level >= DEPTH or rng.random() < 0.55:
            name = f"a{next(counter)}"
            agents.append(name)
            shape.append(f"{'  ' * level}{name}")
            spec = agent(Fz, name=name, shutdown_timeout=choice_of(name, TIMEOUTS))
            if WIDE and rng.random() < 0.25:
                # a pool: sends to ``name`` go to its workers, ``name/0`` and ``name/1``
                shape[-1] += " (a pool)"
                agents.extend([f"{name}/0", f"{name}/1"])
                return pool(spec, size=2, name=name)
            return spec
        name = f"s{next(counter)}"
        sups.append(name)
        strategy = rng.choice(STRATEGIES)
        line = len(shape)
        shape.append("")
        children = [tree(level + 1) for _ in range(rng.randint(1, 3))]
        made = supervisor(name, strategy, children)
        shape[line] = f"{'  ' * level}{name} {strategy} {made.restart}"
        return made

    # a third of the seeds are small: one or two spawners at the root, stopped while busy
    # and shut down soon after (where a draining stop meets the grace period's end)
    small = rng.random() < 0.35
    if small:
        specs = [tree(3) for _ in range(rng.randint(1, 2))]
        shape.insert(0, "small")
    else:
        specs = [tree(1 if rng.random() < 0.3 else 0) for _ in range(rng.randint(1, 3))]
    # linked children spawned in on_start are named: they may be sent to and stopped too
    targets = agents + [f"{a}.0" for a in agents] + [f"{a}.0.0" for a in agents[:2]]
    # most sends and stops go to a few agents: queues build up there as stops come
    hot = agents if small else rng.sample(targets, min(len(targets), rng.randint(1, 3)))
    steps: list[tuple[float, str, Any]] = []
    ident = itertools.count()
    for _ in range(rng.randint(3, 25)):
        t = rng.choice([0.0, 0.0, 0.1, 0.5] if small else [0.0, 0.0, 0.1, 0.5, 1.0, 1.5, 3.0])
        kind = rng.choice(("work", "work", "work", "boom", "exit", "spawn"))
        to = rng.choice(hot if rng.random() < 0.7 else targets)
        steps.append((t, "send", (to, (next(ident), kind, rng.choice([0.0, 0.3, 1.0, 2.0])))))
    for _ in range(rng.randint(0, 8 if WIDE else 4)):
        t = rng.choice([0.0, 0.0, 0.1, 0.3] if small else [0.0, 0.0, 0.0, 0.2, 0.5, 1.0, 2.0])
        to = rng.choice(hot if rng.random() < 0.6 else targets + sups)
        steps.append((t, "stop", (to, rng.random() < 0.7)))
    grace = rng.choice([None, 0.0, 0.2, 0.5] if small else [None, 0.0, 0.2, 1.0, 5.0])
    at = rng.choice([0.3, 0.5, 0.8, 1.5] if small else [0.0, 0.5, 1.0, 2.0, 4.0, 8.0])
    steps.append((at, "shutdown", grace))
    steps.sort(key=lambda step: step[0])
    return Scenario(specs, agents, sups, steps, backoff_max, shape, small)


async def play(seed: int, scenario: Scenario) -> None:
    """Run ``scenario``: check the properties of the module's docstring."""
    global J
    J = Journal(seed=seed, small=scenario.small)
    accepted: set[int] = set()
    took: list[tuple[str, Any, float]] = []
    living = tasks_living()
    with trio.fail_after(100_000):
        async with open_kernel(make_config(dead_letter_buffer=100_000)) as kernel:
            for spec in scenario.specs:
                kernel.spawn(spec)

            async def step(t: float, what: str, arg: Any) -> None:
                await trio.sleep_until(t)
                begun = trio.current_time()
                if what == "send":
                    to, payload = arg
                    try:
                        await kernel.send(to, payload)
                    except DOCUMENTED:
                        return
                    accepted.add(payload[0])
                    return
                if what == "stop":
                    with_drain = arg[1]
                    try:
                        await kernel.stop(arg[0], drain=with_drain)
                    except DOCUMENTED:
                        return
                else:
                    await kernel.shutdown(grace=arg)
                took.append((what, arg, trio.current_time() - begun))

            async with trio.open_nursery() as nursery:
                for t, what, arg in scenario.steps:
                    nursery.start_soon(step, t, what, arg)
        letters = kernel.recent_dead_letters()
        assert_conserved(kernel)
    restarts = sum(J.starts.values())
    bound = 2 * (J.work + restarts * scenario.backoff_max) + SLACK
    slow = [(what, arg, round(d, 3)) for what, arg, d in took if d > bound]
    assert not slow, f"stops or the shutdown took longer than {bound:.1f} s: {slow}"
    assert tasks_living() == living, "the kernel left tasks behind"
    dead = Counter(d.message.payload[0] for d in letters if isinstance(d.message.payload, tuple))
    bare = [
        (d.message.payload, d.reason, d.detail)
        for d in letters
        if not (d.reason and (d.detail or d.error))
    ]
    assert not bare, f"dead letters without a reason: {bare}"
    for ident in accepted:
        assert J.done[ident] + dead[ident] == 1, (
            f"message {ident}: handled {J.done[ident]}, dead-lettered {dead[ident]}"
        )
    reasons = {
        d.message.payload[0]: d.reason for d in letters if isinstance(d.message.payload, tuple)
    }
    for ident in J.raised:
        assert reasons.get(ident) is DeadLetterReason.HANDLER_ERROR, (ident, reasons.get(ident))
    check_runs_stopped_once(J.entered, J.returned, J.stopped)
    check_linked_stop_first(J.spawned_by, J.runs_of, J.returned, J.stop_order)


@pytest.mark.parametrize("seed", seeds())
def test_random_trees_stops_and_shutdowns_keep_their_promises_in_bounded_time(seed: int) -> None:
    scenario = draw(seed)
    for _ in range(int(os.environ.get("NEXUS_FUZZ_REPEAT", "1"))):
        try:
            run_on_mock_clock(lambda: play(seed, scenario), real_seconds=15)
        except BaseException as exc:
            raise AssertionError(f"seed {seed}:\n{scenario.describe()}") from exc
