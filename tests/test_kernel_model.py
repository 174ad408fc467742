"""A stateful model test of the kernel's public API.

``test_kernel_model`` draws operations one at a time against one kernel on a
``MockClock(autojump_threshold=0)`` (Hypothesis' ``st.data()``: what is drawn next depends
on what the kernel holds, as in a ``RuleBasedStateMachine``, and shrinks the same way). It
spawns plain and named agents, agents with ``on_start``/``on_stop`` (every restart type and
directive, overflow policies, small mailboxes), supervisors (``one_for_one``,
``one_for_all``, ``rest_for_one``) and agents under them; it tells with ``send`` and
``send_nowait``, requests with timeouts, stops (draining or not), monitors (through a
watcher agent), waits with ``wait_stopped``, reuses freed names, lets time pass, and has
handlers that succeed, fail, hang, sleep, spawn linked children, exit, stop another agent,
request one with a timeout or flood one from ``ctx.nursery`` tasks (which may wait for room
in a full mailbox as their run ends); agents may spawn a linked child in their ``on_start``
(trees grow levels) or in their ``on_stop``; supervisors' children may start slowly (a stop
or a group restart comes while they start). Steps run inline or concurrently. After each step, once
every task is blocked, the model checks:

* conservation (``assert_conserved``: accepted = handled + replies + dead-lettered + in
  flight, the last counted one by one); every dead letter has a reason and is counted;
* ``send_nowait`` to a full mailbox did what its overflow policy says (``MailboxFull`` for
  ``block`` and ``reject``; ``drop_newest`` dead-letters that message, ``drop_oldest`` the
  oldest, both ``mailbox_overflow``), and a send to a name never spawned is
  ``AgentNotFound`` counted in ``rejected``;
* an agent whose ``kernel.stop`` returned is gone: not among ``kernel.agents()``, its
  ``stopped`` event published, each of its runs that started stopped, its name free (a
  spawn under it succeeds);
* each monitor gets one ``stopped`` notice once its target stopped for good, never two;
* every ``on_start`` is matched by at most one ``on_stop`` (none for a run that never entered it) and
  no run handles a message after its ``on_stop``;
* an agent whose ``wait_stopped`` returned is stopped for good (not among
  ``kernel.agents()``, its ``stopped`` event published: a restart is not a stop);
* ``stats().failed`` and ``timed_out`` are the ``handler_error`` and ``handler_timeout``
  dead letters; ``stats().restarts`` is the number of ``restarted`` events;
  ``stats(agents=True)`` lists exactly ``kernel.agents()``, no mailbox deeper (nor its high
  water) than its capacity (+ 1, the message Trio hands a parked agent), and their depths
  sum to at most ``in_flight``; ``agents_alive`` is never negative, and while the kernel
  runs it is the number of ``kernel.agents()``.

The kernel ends at a random step (left, shut down with a random grace, shut down from a
handler, or cancelled from outside); then: no task left, nothing in flight, no agent
alive, every agent and supervisor spawned has one ``stopped`` event and it is its last, a
supervisor stops after its children and a linked child before its parent, every
``on_start`` that returned has exactly one ``on_stop``, every ``wait_stopped`` returned
(unless the block was cancelled), and every request (from outside or from a handler)
ended with its answer or a documented error.

CI runs 100 derandomized examples (a few seconds); ``NEXUS_MODEL_EXAMPLES=5000`` runs it
long, on fresh examples each time (``NEXUS_MODEL_SHRINK=0`` reports a failure at once,
unshrunk).
"""

from __future__ import annotations

import itertools
import os
import uuid
from collections import Counter
from collections.abc import Callable
from contextlib import suppress
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from nexus_trio import (
    Agent,
    AgentNotFound,
    AgentNotRunning,
    AgentRef,
    AgentSpec,
    Backoff,
    Config,
    Context,
    DeadLetterReason,
    EventKind,
    KernelConfig,
    KernelPhase,
    KernelShuttingDown,
    LifecycleEvent,
    MailboxFull,
    Message,
    MessageKind,
    SupervisionConfig,
    Supervisor,
    agent,
    open_kernel,
    pool,
    resize_pool,
)
from nexus_trio.testing import assert_conserved

from .hang_guard import DOCUMENTED, fault_settings_from, run_on_mock_clock_here, tasks_living

#: a long run draws fresh examples each time (the CI run is derandomized)
MODEL_SETTINGS = fault_settings_from("NEXUS_MODEL_EXAMPLES", 100)
if os.environ.get("NEXUS_MODEL_SHRINK") == "0":
    MODEL_SETTINGS = settings(MODEL_SETTINGS, phases=[Phase.explicit, Phase.generate])

actions = st.one_of(
    st.sampled_from([("ok",), ("ok",), ("ok",), ("raise",), ("hang",), ("spawn",), ("exit",)]),
    st.tuples(st.just("sleep"), st.sampled_from([0.001, 0.05, 0.3, 2.0])),
    st.tuples(st.just("stop"), st.integers(0, 31)),
    st.tuples(st.just("ask"), st.integers(0, 31), st.sampled_from([0.01, 0.5, 2.0])),
    st.tuples(st.just("flood"), st.integers(0, 31), st.integers(1, 4)),
)


class Model:
    """What the test knows of the kernel, and the journal its agents write."""

    def __init__(self) -> None:
        self.tokens = itertools.count()
        self.seqs = itertools.count()
        self.names = itertools.count()
        # runs (one token per run of a class agent)
        self.entered: Counter[int] = Counter()
        self.returned: Counter[int] = Counter()
        self.stopped: Counter[int] = Counter()
        self.stop_order: dict[int, int] = {}
        self.handled_after_stop: list[int] = []
        self.self_ended: set[int] = set()
        self.parent_of: dict[int, int] = {}
        self.runs_of: dict[Any, list[int]] = {}  # agent id -> its runs' tokens
        # what may be addressed: (name, ref, spec facts) of everything spawned
        self.known: list[dict[str, Any]] = []
        self.freed: list[str] = []  # names of agents whose kernel.stop returned
        self.stopped_for_good: list[AgentRef] = []
        # monitors (one per target): target id -> notices ("stopped", reason)
        self.monitored: set[Any] = set()
        self.notices: dict[Any, list[tuple[str, Any]]] = {}
        self.outcomes: list[str] = []
        self.requests = 0
        # wait_stopped: refs waited for, and those whose wait returned
        self.waits: list[AgentRef] = []
        self.waited: list[AgentRef] = []
        self.outside: trio.Nursery | None = None
        self.events: list[LifecycleEvent] = []
        self.problems: list[str] = []
        #: the spec of a journaling agent (set by the test: it closes over the model)
        self.probe_spec: Callable[..., AgentSpec] = AgentSpec


def make_probe(model: Model) -> Any:
    class Probe(Agent):
        """Journals its run and does what each message says."""

        def __init__(self, parent: int | None, slow_start: bool, quirk: str) -> None:
            self.token = next(model.tokens)
            self.slow_start = slow_start
            self.quirk = quirk
            if parent is not None:
                model.parent_of[self.token] = parent

        async def on_start(self, ctx: Context) -> None:
            model.runs_of.setdefault(ctx.id, []).append(self.token)
            model.entered[self.token] += 1
            if self.quirk == "start_spawns":
                # a linked child spawned as this run starts (a tree grows a level)
                with suppress(KernelShuttingDown):
                    ref = ctx.spawn(model.probe_spec(parent=self.token))
                    model.known.append({"name": None, "ref": ref, "agent": True, "cap": None})
            if self.slow_start:
                await trio.sleep(0.05)
            if self.quirk == "start_fails":
                model.self_ended.add(self.token)
                raise RuntimeError("on_start fails")
            model.returned[self.token] += 1

        async def handle(self, ctx: Context, msg: Message) -> Any:
            if model.stopped[self.token]:
                model.handled_after_stop.append(self.token)
            return await act(model, ctx, msg, self.token)

        async def on_stop(self, ctx: Context) -> None:
            model.stopped[self.token] += 1
            model.stop_order[self.token] = len(model.stop_order)
            if self.quirk == "stop_fails":
                model.self_ended.add(self.token)
                raise OSError("on_stop fails")
            if self.quirk == "slow_stop":
                await trio.sleep(0.1)
            if self.quirk == "stop_spawns":
                # a linked child spawned by a stopping run: refused once the kernel
                # stops its tree, else stopped with this run (not before it: unrecorded)
                with suppress(KernelShuttingDown, AgentNotRunning):
                    ref = ctx.spawn(model.probe_spec())
                    model.known.append({"name": None, "ref": ref, "agent": True, "cap": None})

    return Probe


async def act(model: Model, ctx: Context, msg: Message, token: int | None) -> Any:
    """What a message asks of its handler."""
    if msg.kind is MessageKind.EVENT or not isinstance(msg.payload, tuple):
        return None
    action, seq = msg.payload
    what = action[0]
    if what == "raise":
        if token is not None:
            model.self_ended.add(token)
        raise RuntimeError(f"model {seq}")
    if what == "hang":
        await trio.sleep_forever()
    elif what == "sleep":
        await trio.sleep(action[1])
    elif what == "spawn":
        with suppress(KernelShuttingDown):
            ref = ctx.spawn(model.probe_spec(parent=token))
            model.known.append({"name": None, "ref": ref, "agent": True, "cap": None})
    elif what == "exit":
        if token is not None:
            model.self_ended.add(token)
        ctx.stop()
    elif what == "stop" and model.known:
        entry = model.known[action[1] % len(model.known)]
        with suppress(AgentNotFound, ValueError):
            await ctx.kernel.stop(entry["ref"] or entry["name"])
    elif what == "flood" and model.known:
        # background tells that may wait for room in a full mailbox (block) while this
        # run stops, restarts or the kernel stops: cancelled with the run
        entry = model.known[action[1] % len(model.known)]
        for _ in range(action[2]):
            ctx.nursery.start_soon(
                tell_from, model, ctx, entry["ref"] or entry["name"], next(model.seqs)
            )
    elif what == "ask" and model.known:
        # a request from a handler: its deadline races the asked agent's stops, restarts
        # and hangs, and this handler's own timeout and stop
        entry = model.known[action[1] % len(model.known)]
        asked = next(model.seqs)
        try:
            answer = await ctx.request(
                entry["ref"] or entry["name"], (("ok",), asked), timeout=action[2]
            )
        except DOCUMENTED as exc:
            model.outcomes.append(type(exc).__name__)
        except Exception as exc:  # recorded: the property fails on it below
            model.outcomes.append(f"unexpected: {exc!r}")
        else:
            model.outcomes.append("answered" if answer == {"seq": asked} else f"wrong {answer!r}")
    return {"seq": seq} if msg.kind is MessageKind.QUERY else None


async def tell_from(model: Model, ctx: Context, to: Any, seq: int) -> None:
    try:
        await ctx.send(to, (("ok",), seq))
    except DOCUMENTED:
        pass
    except Exception as exc:  # recorded: the property fails on it below
        model.outcomes.append(f"unexpected: {exc!r}")


spawn_steps = st.tuples(
    st.just("spawn"),
    st.sampled_from(["plain", "probe", "probe", "slow_start", "sup", "slow_sup", "pool"]),
    st.sampled_from(["permanent", "transient", "temporary"]),
    st.sampled_from(["resume", "restart", "stop"]),
    st.sampled_from([1, 2, 8]),
    st.sampled_from(["block", "drop_newest", "drop_oldest", "reject"]),
    st.sampled_from(
        ["none", "none", "start_fails", "stop_fails", "slow_stop", "start_spawns", "stop_spawns"]
    ),
    st.sampled_from(["one_for_one", "one_for_all", "rest_for_one"]),
)
targets = st.integers(0, 31)
steps = st.one_of(
    spawn_steps,
    st.tuples(st.just("tell"), targets, actions),
    st.tuples(st.just("tell"), targets, actions),
    st.tuples(st.just("nowait"), targets, actions),
    st.tuples(st.just("nowait"), targets, actions),
    st.tuples(st.just("request"), targets, actions, st.sampled_from([0.01, 0.1, 1.0])),
    st.tuples(st.just("stop"), targets, st.booleans()),
    st.tuples(st.just("monitor"), targets),
    st.tuples(
        st.just("unknown"),
    ),
    st.tuples(st.just("reuse"), targets),
    st.tuples(st.just("wait"), targets),
    st.tuples(st.just("resize"), targets, st.integers(1, 4)),
    st.tuples(st.just("sleep"), st.sampled_from([0.001, 0.05, 0.2, 1.0, 5.0])),
)
endings = st.sampled_from(["leave", "shutdown", "handler_shutdown", "cancel"])


@MODEL_SETTINGS
@given(data=st.data())
def test_kernel_model(data: st.DataObject) -> None:
    model = Model()
    Probe = make_probe(model)
    grace_ms = data.draw(st.sampled_from([0, 100, 1000]), label="grace_ms")

    def probe_spec(
        *,
        parent: int | None = None,
        slow_start: bool = False,
        restart: str = "transient",
        on_error: str = "restart",
        capacity: int | None = None,
        overflow: str | None = None,
        quirk: str = "none",
    ) -> AgentSpec:
        return AgentSpec(
            factory=lambda: Probe(parent, slow_start, quirk),
            restart=restart,
            on_error=on_error,
            mailbox_capacity=capacity,
            overflow=overflow,
        )

    model.probe_spec = probe_spec

    async def plain(ctx: Context, msg: Message) -> Any:
        return await act(model, ctx, msg, None)

    async def watcher(ctx: Context, msg: Message) -> None:
        if msg.kind is MessageKind.EVENT:
            notice = msg.payload
            model.notices.setdefault(uuid.UUID(notice["agent"]), []).append(
                (notice["event"], notice["reason"])
            )
        else:
            ctx.monitor(msg.payload)

    config = Config(
        kernel=KernelConfig(
            dead_letter_buffer=100_000,
            shutdown_grace_ms=grace_ms,
            handle_timeout_ms=1000,
            send_timeout_ms=100,
            request_timeout_ms=5000,
        ),
        supervision=SupervisionConfig(max_restarts=3, backoff_initial_ms=1, backoff_max_ms=10),
    )

    def entry_at(index: int) -> dict[str, Any] | None:
        return model.known[index % len(model.known)] if model.known else None

    def address(entry: dict[str, Any]) -> Any:
        return entry["ref"] if entry["ref"] is not None else entry["name"]

    def spawn(kernel: Any, step: tuple[Any, ...]) -> None:
        _, kind, restart, on_error, capacity, overflow, quirk, strategy = step
        name = f"m{next(model.names)}"
        if kind == "plain":
            target: Any = agent(
                plain, name=name, mailbox_capacity=capacity, overflow=overflow, restart=restart
            )
            ref = kernel.spawn(target)
            model.known.append(
                {"name": name, "ref": ref, "agent": True, "cap": capacity, "overflow": overflow}
            )
        elif kind in ("probe", "slow_start"):
            spec = probe_spec(
                slow_start=kind == "slow_start",
                restart=restart,
                on_error=on_error,
                capacity=capacity,
                overflow=overflow,
                quirk=quirk,
            ).with_options(name=name)
            ref = kernel.spawn(spec)
            model.known.append(
                {"name": name, "ref": ref, "agent": True, "cap": capacity, "overflow": overflow}
            )
        elif kind == "pool":
            routing = {
                "one_for_one": "round_robin",
                "one_for_all": "least_loaded",
                "rest_for_one": "consistent_hash",
            }[strategy]
            ref = kernel.spawn(
                pool(
                    probe_spec(restart=restart, on_error=on_error, quirk=quirk),
                    size=2,
                    routing=routing,
                    key=repr if routing == "consistent_hash" else None,
                    name=name,
                    supervision=Supervisor(
                        max_restarts=3, within=1.0, backoff=Backoff(0.001, 0.01)
                    ),
                )
            )
            model.known.append({"name": name, "ref": ref, "agent": True, "cap": None, "pool": True})
        else:
            children = [f"{name}.{i}" for i in range(3)]
            specs = [
                probe_spec(
                    slow_start=kind == "slow_sup", restart=restart, on_error=on_error, quirk=quirk
                ).with_options(name=c)
                for c in children
            ]
            ref = kernel.spawn(
                Supervisor(
                    children=specs,
                    strategy=strategy,
                    name=name,
                    max_restarts=3,
                    within=1.0,
                    backoff=Backoff(0.001, 0.01),
                    restart=restart,
                )
            )
            model.known.append({"name": name, "ref": ref, "agent": False, "children": children})
            model.known.extend(
                {"name": c, "ref": None, "agent": True, "cap": None} for c in children
            )

    async def run_step(kernel: Any, step: tuple[Any, ...]) -> None:
        what = step[0]
        seq = next(model.seqs)
        with suppress(*DOCUMENTED):
            if what == "spawn":
                spawn(kernel, step)
            elif what == "tell" and model.known:
                entry = entry_at(step[1])
                assert entry is not None
                await kernel.send(address(entry), (step[2], seq))
            elif what == "nowait" and model.known:
                entry = entry_at(step[1])
                assert entry is not None
                nowait(kernel, entry, (step[2], seq))
            elif what == "request" and model.known:
                entry = entry_at(step[1])
                assert entry is not None
                model.requests += 1
                try:
                    answer = await kernel.request(address(entry), (step[2], seq), timeout=step[3])
                except DOCUMENTED as exc:
                    model.outcomes.append(type(exc).__name__)
                except trio.Cancelled:
                    model.outcomes.append("cancelled")
                    raise
                except Exception as exc:  # recorded: the property fails on it below
                    model.outcomes.append(f"unexpected: {exc!r}")
                else:
                    model.outcomes.append(
                        "answered" if answer == {"seq": seq} else f"wrong {answer!r}"
                    )
            elif what == "stop" and model.known:
                entry = entry_at(step[1])
                assert entry is not None
                try:
                    await kernel.stop(address(entry), drain=step[2])
                except AgentNotFound:
                    return
                ref = entry["ref"] or kernel_ref(kernel, entry)
                await check_gone(kernel, entry, ref)
            elif what == "monitor" and model.known:
                entry = entry_at(step[1])
                assert entry is not None
                ref = entry["ref"] or kernel_ref(kernel, entry)
                if ref is not None and ref.id not in model.monitored:
                    model.monitored.add(ref.id)
                    await kernel.send("watcher", ref.id)
            elif what == "unknown" and kernel.phase is KernelPhase.RUNNING:
                before = kernel.stats().rejected.get("no_such_agent", 0)
                with pytest.raises(AgentNotFound, match="never-spawned"):
                    await kernel.send("never-spawned", None)
                assert kernel.stats().rejected["no_such_agent"] == before + 1
            elif what == "reuse" and model.freed:
                name = model.freed.pop(step[1] % len(model.freed))
                try:
                    ref = kernel.spawn(agent(plain, name=name))
                except KernelShuttingDown:
                    return
                model.known.append({"name": name, "ref": ref, "agent": True, "cap": None})
            elif what == "wait" and model.known and model.outside is not None:
                entry = entry_at(step[1])
                assert entry is not None
                ref = entry["ref"] or kernel_ref(kernel, entry)
                if ref is not None:
                    model.waits.append(ref)
                    model.outside.start_soon(wait_for, kernel, ref)
            elif what == "resize":
                pools = [e for e in model.known if e.get("pool")]
                if not pools:
                    return
                entry = pools[step[1] % len(pools)]
                try:
                    size = await resize_pool(kernel, entry["ref"], step[2])
                except DOCUMENTED as exc:
                    model.outcomes.append(type(exc).__name__)
                except Exception as exc:  # recorded: the property fails on it below
                    model.outcomes.append(f"unexpected: {exc!r}")
                else:
                    model.outcomes.append("resized" if size == step[2] else f"wrong {size}")
            elif what == "sleep":
                await trio.sleep(step[1])

    async def wait_for(kernel: Any, ref: AgentRef) -> None:
        await kernel.wait_stopped(ref)
        model.waited.append(ref)

    def kernel_ref(kernel: Any, entry: dict[str, Any]) -> AgentRef | None:
        try:
            ref: AgentRef = kernel.lookup(entry["name"])
        except AgentNotFound:
            return None
        entry["ref"] = ref
        return ref

    def nowait(kernel: Any, entry: dict[str, Any], payload: Any) -> None:
        """send_nowait, checked against the overflow policy when the mailbox is full."""
        ref = entry["ref"]
        cap, overflow = entry.get("cap"), entry.get("overflow")
        full = False
        if entry["agent"] and ref is not None and cap is not None and ref in kernel.agents():
            with suppress(AgentNotFound):
                full = kernel.mailbox_depth(ref) >= cap
        letters_before = len(kernel.recent_dead_letters())
        try:
            msg = kernel.send_nowait(address(entry), payload)
        except MailboxFull:
            if full and overflow not in ("block", "reject"):
                model.problems.append(f"{overflow} refused a message to a full mailbox")
            raise
        if not full:
            return
        if overflow in ("block", "reject"):
            model.problems.append(f"{overflow} accepted a message to a full mailbox")
            return
        # (an evicted query whose requester gave up on it is a request_timeout, as
        # wherever such a query leaves its mailbox)
        new = kernel.recent_dead_letters()[letters_before:]
        if len(new) != 1:
            model.problems.append(f"{overflow}: {len(new)} dead letters for one overflow")
        elif (new[0].message.id == msg.id) != (overflow == "drop_newest"):
            model.problems.append(f"{overflow} dropped the wrong message")
        elif new[0].reason is not DeadLetterReason.MAILBOX_OVERFLOW and not (
            new[0].reason is DeadLetterReason.REQUEST_TIMEOUT
            and new[0].message.kind is MessageKind.QUERY
        ):
            model.problems.append(f"{overflow}: dead letter {new[0].reason}")

    async def check_gone(kernel: Any, entry: dict[str, Any], ref: AgentRef | None) -> None:
        """After kernel.stop(x) returned: x is gone, its runs stopped, its name free."""
        if ref is None:
            return
        if ref in kernel.agents():
            model.problems.append(f"{entry['name']} still an agent after its stop returned")
        model.stopped_for_good.append(ref)
        if entry["name"] is not None:
            try:
                holder = kernel.lookup(entry["name"])
            except AgentNotFound:
                if entry["name"] not in model.freed:
                    model.freed.append(entry["name"])
            else:  # (taken again meanwhile, by a step that ran concurrently)
                if holder == ref:
                    model.problems.append(f"{entry['name']} still registered after its stop")
        for token in model.runs_of.get(ref.id, []):
            if model.returned[token] and not model.stopped[token] and token not in model.self_ended:
                model.problems.append(f"run {token} of {entry['name']} not stopped after stop")

    def check_midway(kernel: Any) -> None:
        assert_conserved(kernel)
        letters = kernel.recent_dead_letters()
        assert all(isinstance(d.reason, DeadLetterReason) for d in letters)
        stats = kernel.stats()
        assert len(letters) == stats.dead_lettered == sum(stats.dead_letters_by_reason.values())
        assert all(n <= 1 for n in model.stopped.values()), "a run stopped twice"
        # (an on_start that raised gets its on_stop, one that was cancelled does not)
        assert all(model.entered[t] for t in model.stopped), "on_stop without on_start"
        assert not model.handled_after_stop, model.handled_after_stop
        stopped_ids = {e.agent_id for e in model.events if e.kind is EventKind.STOPPED}
        for ref in model.stopped_for_good:
            assert ref.id in stopped_ids, f"no stopped event for {ref} after its stop returned"
        for target, notices in model.notices.items():
            assert [n[0] for n in notices].count("stopped") <= 1, (target, notices)
        # wait_stopped returned: stopped for good (a restart is not a stop)
        alive = {ref.id for ref in kernel.agents()}
        for ref in model.waited:
            assert ref.id not in alive, f"wait_stopped({ref}) returned, the agent still runs"
            assert ref.id in stopped_ids, f"wait_stopped({ref}) returned before its stopped event"
        # each handler call that raised or timed out is counted once and dead-letters its message
        by_reason = stats.dead_letters_by_reason
        assert stats.failed == by_reason.get("handler_error", 0), (stats.failed, by_reason)
        assert stats.timed_out == by_reason.get("handler_timeout", 0), (stats.timed_out, by_reason)
        # the counters agree with the events and with the agents listed
        restarted = sum(e.kind is EventKind.RESTARTED for e in model.events)
        assert stats.restarts == restarted, (stats.restarts, restarted)
        per_agent = kernel.stats(agents=True).agents
        assert {a.id for a in per_agent} == alive
        assert stats.agents_alive >= 0, stats.agents_alive
        assert 0 <= stats.sends_waiting <= stats.in_flight, stats
        if kernel.phase is KernelPhase.RUNNING:
            assert stats.agents_alive == len(alive), (stats.agents_alive, len(alive))
        for a in per_agent:
            # (capacity + 1 for an agent parked on its empty mailbox: Trio hands it one
            # straight away, docs/kernel.md; a flood of background tells hits it)
            assert a.mailbox_depth <= a.mailbox_capacity + 1, a
            assert a.mailbox_high_water <= a.mailbox_capacity + 1, a
        assert sum(a.mailbox_depth for a in per_agent) <= stats.in_flight
        if kernel.phase.name == "RUNNING":
            for target in model.monitored:
                stops = [n for n in model.notices.get(target, []) if n[0] == "stopped"]
                if target in stopped_ids:
                    assert len(stops) == 1, f"monitor of {target}: {model.notices.get(target)}"
        assert not model.problems, model.problems

    async def scenario() -> None:
        baseline = tasks_living()
        ending = "leave"
        kernel: Any = None
        with trio.fail_after(3600), trio.CancelScope() as everything:
            async with trio.open_nursery() as outside:
                async with open_kernel(config, seed=0) as kernel:
                    stream = kernel.events(100_000)

                    async def collect() -> None:
                        with trio.CancelScope(shield=True):  # the stream ends at shutdown
                            async for event in stream:
                                model.events.append(event)

                    outside.start_soon(collect)
                    model.outside = outside
                    kernel.spawn(agent(watcher, name="watcher", mailbox_capacity=10_000))
                    for _ in range(data.draw(st.integers(1, 4), label="initial")):
                        spawn(kernel, data.draw(spawn_steps))
                    for _ in range(data.draw(st.integers(0, 40), label="steps")):
                        if data.draw(st.integers(0, 30), label="end?") == 0:
                            break
                        step = data.draw(steps)
                        if data.draw(st.booleans(), label="concurrently"):
                            outside.start_soon(run_step, kernel, step)
                        else:
                            await run_step(kernel, step)
                        await trio.testing.wait_all_tasks_blocked()
                        check_midway(kernel)
                    ending = data.draw(endings, label="ending")
                    if ending == "shutdown":
                        await kernel.shutdown(data.draw(st.sampled_from([0, 0.05, 2.0])))
                    elif ending == "handler_shutdown":

                        async def shut(ctx: Context, msg: Message) -> None:
                            await ctx.kernel.shutdown()

                        kernel.spawn(agent(shut, name="shut"))
                        await kernel.send("shut", None)
                    elif ending == "cancel":
                        everything.cancel()
        assert tasks_living() == baseline, "the kernel left tasks behind"
        stats = kernel.stats()
        assert stats.in_flight == stats.sends_waiting == 0
        assert stats.agents_alive == 0
        assert_conserved(kernel)
        letters = kernel.recent_dead_letters()
        assert all(isinstance(d.reason, DeadLetterReason) for d in letters)
        assert len(letters) == stats.dead_lettered
        kinds: dict[Any, list[EventKind]] = {}
        stop_at: dict[Any, int] = {}
        for i, e in enumerate(model.events):
            kinds.setdefault(e.agent_id, []).append(e.kind)
            if e.kind is EventKind.STOPPED:
                stop_at[e.agent_id] = i
        for agent_id, seen in kinds.items():
            assert seen[-1] is EventKind.STOPPED, (agent_id, seen)
            assert seen.count(EventKind.STOPPED) == 1, (agent_id, seen)
        for entry in model.known:
            if not entry["agent"] and entry["ref"] is not None:
                names: dict[Any, Any] = {}
                for e in model.events:
                    names.setdefault(e.name, e.agent_id)
                for child in entry["children"]:
                    if child in names and names[child] in stop_at:
                        assert stop_at[names[child]] < stop_at[entry["ref"].id], (
                            f"{child} stopped after its supervisor {entry['name']}"
                        )
        for target, notices in model.notices.items():
            assert [n[0] for n in notices].count("stopped") <= 1, (target, notices)
        if ending != "cancel":  # (a cancel ends the waits with everything else)
            assert sorted(r.id for r in model.waited) == sorted(r.id for r in model.waits), (
                "a wait_stopped never returned though its agent stopped at the shutdown"
            )
        stopped_ids = {e.agent_id for e in model.events if e.kind is EventKind.STOPPED}
        assert all(r.id in stopped_ids for r in model.waited)
        assert stats.restarts == sum(e.kind is EventKind.RESTARTED for e in model.events)
        assert stats.failed == stats.dead_letters_by_reason.get("handler_error", 0)
        assert stats.timed_out == stats.dead_letters_by_reason.get("handler_timeout", 0)

    # (in this thread: the scenario draws from Hypothesis inside the run)
    run_on_mock_clock_here(scenario, real_seconds=30)

    assert all(model.stopped[t] == 1 for t in model.returned), "an on_start without on_stop"
    assert all(model.entered[t] == 1 for t in model.stopped), "on_stop without on_start"
    for child, parent in model.parent_of.items():
        if {child, parent} & model.self_ended:
            continue
        if child in model.stop_order and parent in model.stop_order:
            assert model.stop_order[child] < model.stop_order[parent], "child after parent"
    unexpected = [o for o in model.outcomes if o.startswith(("unexpected", "wrong"))]
    assert not unexpected, unexpected
    assert not model.problems, model.problems
