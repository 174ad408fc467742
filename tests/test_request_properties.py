"""Hypothesis: request/reply under fault injection.

Requesters outside the kernel (``kernel.request``) and inside it (an agent's
``ctx.request``) ask agents whose handlers reply, raise, answer nothing, or sleep past the
request timeout or the handle timeout; requesters are cancelled at random points, and the
kernel shuts down at a random point. Every query must end once, and every requester must
get its answer or one of the documented errors.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from contextlib import suppress
from typing import Any

import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from nexus_trio import (
    Agent,
    AgentNotFound,
    AgentSpec,
    Config,
    Context,
    KernelConfig,
    KernelShuttingDown,
    MailboxFull,
    Message,
    MessageFailed,
    MessageKind,
    RequestFailed,
    RequestTimeout,
    SupervisionConfig,
    agent,
    open_kernel,
)
from nexus_trio.testing import assert_conserved

from .conftest import make_config
from .hang_guard import fault_settings, run_on_mock_clock

#: the request timeout is 1 s and the handle timeout 2 s: "slow" sleeps land before,
#: between and after them
BEHAVIOURS = [
    "reply",
    "reply",
    "raise",
    "fail",
    "nothing",
    "slow",
    "slow",
    "cancel requester",
    "stop",
    "shut down",
]
SLEEPS = [0.0, 0.4, 1.0, 1.5, 2.5]

servers = st.lists(
    st.tuples(
        st.integers(1, 3),
        st.sampled_from(["block", "block", "reject", "drop_newest", "drop_oldest"]),
        st.booleans(),
    ),
    min_size=1,
    max_size=3,
)
requests = st.lists(
    st.fixed_dictionaries(
        {
            "inside": st.booleans(),
            "server": st.integers(0, 2),
            "behaviour": st.sampled_from(BEHAVIOURS),
            "sleep": st.sampled_from(SLEEPS),
            "start": st.sampled_from([0.0, 0.0, 0.3, 1.0, 2.0]),
            "timeout": st.sampled_from([None, 0.5, 3.0]),
            "cancel": st.sampled_from([None, None, 0.0, 0.5, 1.2, 2.2]),
        }
    ),
    min_size=1,
    max_size=8,
)

#: what a query that was not answered may be dead-lettered for
QUERY_REASONS = {
    "request_timeout",
    "handler_error",
    "handler_timeout",
    "shutdown",
    "agent_stopped",
    "mailbox_overflow",
}
#: ... and the reply of one answered too late
REPLY_REASONS = {"late_reply", "shutdown"}


class Server(Agent):
    """Answers each query as its payload says; records starts and returns."""

    def __init__(self, record: dict[str, Any]) -> None:
        self.record = record

    async def handle(self, ctx: Context, msg: Message) -> Any:
        payload = msg.payload
        seq = payload["seq"]
        self.record["started"][seq] += 1
        behaviour = payload["behaviour"]
        if behaviour == "raise":
            raise ValueError(f"scripted failure {seq}")
        if behaviour == "fail":
            raise MessageFailed(f"scripted message failure {seq}")
        if behaviour == "cancel requester":
            # the requester is cancelled in the same tick as its answer comes
            self.record["scopes"][seq].cancel()
        elif behaviour == "stop":
            ctx.stop()
        elif behaviour == "shut down":
            await ctx.kernel.shutdown()
        if behaviour == "slow" or (behaviour != "reply" and payload["sleep"]):
            await trio.sleep(payload["sleep"])
        self.record["returned"][seq] += 1
        return None if behaviour == "nothing" else {"answer": seq}


async def ask(record: dict[str, Any], seq: int, call: Any, cancel: float | None) -> None:
    """Make one request and record what came of it, exactly once."""
    outcome: tuple[Any, ...] | None = None
    with trio.CancelScope() as scope:
        if cancel is not None:
            scope.deadline = trio.current_time() + cancel
        record["scopes"][seq] = scope
        try:
            outcome = ("answer", await call())
        except RequestTimeout:
            outcome = ("timeout",)
        except RequestFailed as exc:
            outcome = ("failed", exc.reason)
        except KernelShuttingDown:
            outcome = ("shutting_down",)
        except MailboxFull:
            outcome = ("full",)
        except AgentNotFound:
            outcome = ("not_found",)
        except trio.Cancelled:
            record["outcomes"][seq].append(("cancelled",))
            raise
    if scope.cancelled_caught:
        assert outcome is None
        return
    assert outcome is not None
    record["outcomes"][seq].append(outcome)


class Client(Agent):
    """Makes the request its message describes, from inside the kernel."""

    def __init__(self, record: dict[str, Any], names: list[str]) -> None:
        self.record = record
        self.names = names

    async def handle(self, ctx: Context, msg: Message) -> None:
        r = msg.payload
        to = self.names[r["server"] % len(self.names)]
        query = {"seq": r["seq"], "behaviour": r["behaviour"], "sleep": r["sleep"]}
        self.record["asked"].add(r["seq"])
        await ask(
            self.record,
            r["seq"],
            lambda: ctx.request(to, query, timeout=r["timeout"]),
            r["cancel"],
        )


def check_outcomes(kernel: Any, record: dict[str, Any], asked: set[int]) -> None:
    """Each query ended once, and its requester's outcome agrees with how it ended."""
    query_dead: dict[int, list[str]] = defaultdict(list)
    reply_dead: dict[int, list[str]] = defaultdict(list)
    for letter in kernel.recent_dead_letters():
        payload = letter.message.payload
        if letter.message.kind is MessageKind.QUERY:
            query_dead[payload["seq"]].append(letter.reason.value)
        elif letter.message.kind is MessageKind.RESPONSE:
            reply_dead[payload["answer"]].append(letter.reason.value)
        # (else: a Client's message, cut short or never handled: its request, if it
        # made one, has its outcome recorded as any other)
    started, returned, outcomes = record["started"], record["returned"], record["outcomes"]
    answers = 0
    for seq in asked:
        got = outcomes[seq]
        assert len(got) == 1, (seq, got)
        (outcome,) = got
        assert started[seq] <= 1 and returned[seq] <= started[seq], (seq, started, returned)
        assert len(query_dead[seq]) <= 1 and len(reply_dead[seq]) <= 1, (seq, query_dead)
        assert set(query_dead[seq]) <= QUERY_REASONS, (seq, query_dead[seq])
        assert set(reply_dead[seq]) <= REPLY_REASONS, (seq, reply_dead[seq])
        # the query was handled (its handler returned) or dead-lettered, not both
        assert not (returned[seq] and query_dead[seq]), (seq, outcome, query_dead[seq])
        if started[seq]:
            assert returned[seq] or query_dead[seq], (seq, outcome)
        answered = returned[seq] and outcome != ("answer", None)
        if outcome[0] == "answer":
            answers += 1
            assert outcome[1] == {"answer": seq}, (seq, outcome)
            assert returned[seq] and not reply_dead[seq], (seq, reply_dead[seq])
        elif outcome[0] == "failed":
            assert query_dead[seq] == [outcome[1]], (seq, outcome, query_dead[seq])
        elif answered and record["behaviours"][seq] != "nothing":
            # answered, but not to its requester: the reply is a dead letter, not lost
            assert reply_dead[seq], (seq, outcome)
    stats = kernel.stats()
    assert stats.replies_delivered == answers, (stats.replies_delivered, answers, outcomes)


@fault_settings(150)
@given(
    setups=servers,
    work=requests,
    stop_after=st.sampled_from([0.0, 0.2, 0.7, 1.3, 4.0]),
    grace=st.sampled_from([300, 1500]),
    stops=st.lists(st.tuples(st.sampled_from([0.0, 0.5, 1.2]), st.integers(0, 2)), max_size=2),
)
def test_every_request_gets_its_answer_or_a_documented_error_and_every_query_ends_once(
    setups: list[tuple[int, str, bool]],
    work: list[dict[str, Any]],
    stop_after: float,
    grace: int,
    stops: list[tuple[float, int]],
) -> None:
    record: dict[str, Any] = {
        "started": Counter(),
        "returned": Counter(),
        "outcomes": defaultdict(list),
        "asked": set(),
        "behaviours": {},
        "scopes": {},
    }
    config = Config(
        kernel=KernelConfig(
            send_timeout_ms=300,
            handle_timeout_ms=2000,
            request_timeout_ms=1000,
            shutdown_grace_ms=grace,
            dead_letter_buffer=10_000,
        ),
        supervision=SupervisionConfig(max_restarts=10_000, backoff_initial_ms=1, backoff_max_ms=10),
    )

    async def scenario() -> None:
        tasks_before = trio.lowlevel.current_statistics().tasks_living
        names = [f"server-{i}" for i in range(len(setups))]
        outside: set[int] = set()
        with trio.fail_after(600):
            async with trio.open_nursery() as requesters:
                async with open_kernel(config, seed=1) as kernel:
                    for name, (capacity, overflow, own_timeout) in zip(names, setups, strict=True):
                        kernel.spawn(
                            AgentSpec(
                                factory=lambda: Server(record),
                                mailbox_capacity=capacity,
                                overflow=overflow,
                                shutdown_timeout=0.5 if own_timeout else None,
                            ),
                            name=name,
                        )
                    kernel.spawn(
                        AgentSpec(factory=lambda: Client(record, names), mailbox_capacity=64),
                        name="client",
                    )
                    for seq, r in enumerate(work):
                        record["behaviours"][seq] = r["behaviour"]

                        async def outside_request(seq: int = seq, r: dict[str, Any] = r) -> None:
                            await trio.sleep(r["start"])
                            to = names[r["server"] % len(names)]
                            query = {"seq": seq, "behaviour": r["behaviour"], "sleep": r["sleep"]}
                            outside.add(seq)
                            await ask(
                                record,
                                seq,
                                lambda: kernel.request(to, query, timeout=r["timeout"]),
                                r["cancel"],
                            )

                        async def inside_request(seq: int = seq, r: dict[str, Any] = r) -> None:
                            await trio.sleep(r["start"])
                            with suppress(KernelShuttingDown):
                                await kernel.send("client", {**r, "seq": seq})

                        requesters.start_soon(
                            outside_request if not r["inside"] else inside_request
                        )

                    async def stop(at: float, index: int) -> None:
                        # a server stopped for good while queries wait for it
                        await trio.sleep(at)
                        with suppress(AgentNotFound, KernelShuttingDown):
                            await kernel.stop(names[index % len(names)])

                    for at, index in stops:
                        requesters.start_soon(stop, at, index)
                    await trio.sleep(stop_after)
            # requesters outside the kernel all came to an end, and so did the kernel
        assert_conserved(kernel)
        check_outcomes(kernel, record, outside | record["asked"])
        assert trio.lowlevel.current_statistics().tasks_living == tasks_before

    run_on_mock_clock(scenario, 60)


# --- regressions found by the property -----------------------------------------------------


async def test_the_answer_to_a_requester_cancelled_while_its_handler_ran_is_a_late_reply(
    autojump_clock: Any,
) -> None:
    # The requester is cancelled while the handler runs, and the handler answers before
    # the requester resumes (here the handler itself cancels it: any task could, in the
    # same tick; a handler that does not suspend cannot be stopped). Before: the answer
    # resolved the abandoned request and was counted as a delivered reply that nobody
    # received. Now it is a ``late_reply`` dead letter, for a requester outside the
    # kernel and for an agent (whose mailbox does not get it either).
    scopes: dict[str, trio.CancelScope] = {}
    log: list[Any] = []

    @agent(name="server")
    async def server(ctx: Context, msg: Message) -> Any:
        scopes.pop(msg.payload).cancel()
        return {"answer": msg.payload}

    @agent(name="asker")
    async def asker(ctx: Context, msg: Message) -> None:
        with trio.CancelScope() as scope:
            scopes["from an agent"] = scope
            log.append(("answered", await ctx.request("server", "from an agent")))
        log.append(("asker cancelled", scope.cancelled_caught))

    async with open_kernel(make_config()) as kernel:
        kernel.spawn(server)
        kernel.spawn(asker)
        with trio.CancelScope() as scope:
            scopes["from outside"] = scope
            log.append(("answered", await kernel.request("server", "from outside")))
        log.append(("outside cancelled", scope.cancelled_caught))
        await kernel.send("asker", "ask")
        await trio.testing.wait_all_tasks_blocked()
        assert log == [("outside cancelled", True), ("asker cancelled", True)]
        stats = kernel.stats()
        assert stats.replies_delivered == 0
        assert stats.handled == 3 and stats.dead_letters_by_reason == {"late_reply": 2}
        assert [d.message.payload for d in kernel.recent_dead_letters()] == [
            {"answer": "from outside"},
            {"answer": "from an agent"},
        ]
        assert_conserved(kernel)


async def test_an_answer_that_came_while_its_requester_waited_for_room_reaches_it_even_if_cancelled(
    autojump_clock: Any,
) -> None:
    # The query waits for room in a full mailbox; once admitted, the server handles it
    # and answers before the requester resumes, and the requester is cancelled in that
    # same tick (here by the handler itself). Before: the requester's last checkpoint
    # raised Cancelled although the answer, counted as delivered, was there: nobody got
    # it. Now the requester gets the answer it was counted as having (an operation that
    # completed is not undone by a cancel that came after it).
    release = trio.Event()
    scopes: dict[str, trio.CancelScope] = {}

    @agent(name="narrow", mailbox_capacity=1, handle_timeout=100.0)
    async def narrow(ctx: Context, msg: Message) -> Any:
        if msg.payload == "hold":
            await release.wait()
        if msg.kind is not MessageKind.QUERY:
            return None
        scopes["requester"].cancel()
        return {"answer": msg.payload}

    async with open_kernel(make_config(send_timeout_ms=10_000)) as kernel:
        kernel.spawn(narrow)
        await kernel.send("narrow", "hold")
        await trio.testing.wait_all_tasks_blocked()
        await kernel.send("narrow", "queued")
        got: list[Any] = []

        async def requester() -> None:
            with trio.CancelScope() as scope:
                scopes["requester"] = scope
                got.append(await kernel.request("narrow", "asked", timeout=10.0))
            got.append(("cancelled", scope.cancelled_caught))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(requester)
            await trio.testing.wait_all_tasks_blocked()
            assert kernel.mailbox_statistics("narrow").producers_waiting == 1
            release.set()
        assert got == [{"answer": "asked"}, ("cancelled", False)]
        stats = kernel.stats()
        assert stats.replies_delivered == 1 and stats.dead_lettered == 0
        assert_conserved(kernel)
