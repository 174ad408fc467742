"""Hypothesis: the kernel's conservation law and ordering guarantees under random workloads."""

from __future__ import annotations

import uuid
from collections import defaultdict
from typing import Any

import trio
import trio.testing
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from nexus_trio import (
    Agent,
    AgentSpec,
    Config,
    Context,
    KernelConfig,
    MailboxFull,
    Message,
    SupervisionConfig,
    open_kernel,
)

behaviours = st.sampled_from(["return", "return", "return", "raise", "hang", "slow"])
agent_setups = st.lists(
    st.tuples(
        st.integers(1, 4), st.sampled_from(["block", "drop_newest", "drop_oldest", "reject"])
    ),
    min_size=1,
    max_size=5,
)
workloads = st.lists(
    st.lists(
        st.tuples(st.integers(0, 4), behaviours, st.sampled_from([0, 0, 0.05, 0.5])), max_size=12
    ),
    min_size=1,
    max_size=3,
)


class Probe(Agent):
    """Records what it handled and in which order; behaves as each payload says."""

    def __init__(self, record: dict[str, Any]) -> None:
        self.record = record

    async def handle(self, ctx: Context, msg: Message) -> None:
        payload = msg.payload
        self.record["started"][(msg.sender, ctx.name)].append(payload["seq"])
        behaviour = payload["behaviour"]
        if behaviour == "raise":
            if ctx.kernel.shutting_down:
                # Failing while the kernel drains: this run ends now, and if the drain
                # is over by the time the failure is handled (the grace period ran out
                # at the same instant), its on_stop runs before the ordered stop would
                # have reached it, and it is not restarted.
                self.record["failed_in_shutdown"].append(ctx.name)
            raise ValueError(f"scripted failure {payload['seq']}")
        if behaviour == "hang":
            await trio.sleep_forever()
        if behaviour == "slow":
            await trio.sleep(0.3)
        self.record["handled"].append(msg.id)

    async def on_stop(self, ctx: Context) -> None:
        if ctx.kernel.stopping:
            self.record["stopped"].append(ctx.name)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(setups=agent_setups, work=workloads, stop_after=st.sampled_from([0, 0.1, 0.7, 3.0]))
# Found by Hypothesis: agent-0's failing message is handled at the very instant the grace
# period runs out (the ordering check used to count its on_stop as out of order).
@example(
    setups=[(2, "block"), (1, "block")],
    work=[[(0, "slow", 0), (0, "slow", 0), (0, "raise", 0)]],
    stop_after=0.1,
)
def test_every_accepted_message_is_handled_or_dead_lettered_exactly_once(
    setups: list[tuple[int, str]], work: list[list[tuple[int, str, float]]], stop_after: float
) -> None:
    record: dict[str, Any] = {
        "started": defaultdict(list),
        "handled": [],
        "stopped": [],
        "failed_in_shutdown": [],
    }
    accepted: list[uuid.UUID] = []
    config = Config(
        kernel=KernelConfig(
            send_timeout_ms=100,
            handle_timeout_ms=1000,
            shutdown_grace_ms=500,
            dead_letter_buffer=10_000,
        ),
        supervision=SupervisionConfig(max_restarts=10_000, backoff_initial_ms=1, backoff_max_ms=10),
    )

    async def scenario() -> None:
        tasks_before = trio.lowlevel.current_statistics().tasks_living
        names: list[str | None] = []
        async with open_kernel(config, seed=1) as kernel:
            for index, (capacity, overflow) in enumerate(setups):
                ref = kernel.spawn(
                    AgentSpec(
                        factory=lambda: Probe(record), mailbox_capacity=capacity, overflow=overflow
                    ),
                    name=f"agent-{index}",
                )
                names.append(ref.name)

            async def producer(sequence: list[tuple[int, str, float]]) -> None:
                sender = uuid.uuid4()
                for seq, (target, behaviour, pause) in enumerate(sequence):
                    to = names[target % len(names)]
                    try:
                        msg = await kernel.send(
                            to, {"seq": seq, "behaviour": behaviour}, sender=sender
                        )
                    except MailboxFull:
                        continue
                    accepted.append(msg.id)
                    if pause:
                        await trio.sleep(pause)

            async with trio.open_nursery() as nursery:
                for sequence in work:
                    nursery.start_soon(producer, sequence)
                await trio.sleep(stop_after)
                nursery.cancel_scope.cancel()
            names_alive = [a.name for a in kernel.agents()]
            await trio.testing.wait_all_tasks_blocked()
        stats = kernel.stats()
        assert stats.in_flight == 0
        assert stats.accepted == stats.handled + stats.replies_delivered + stats.dead_lettered
        dead = [d.message.id for d in kernel.recent_dead_letters()]
        handled = record["handled"]
        assert len(set(handled)) == len(handled)
        assert len(set(dead)) == len(dead)
        assert not set(handled) & set(dead)
        assert set(handled) | set(dead) == set(accepted)
        assert len(accepted) == stats.accepted
        for seqs in record["started"].values():
            assert seqs == sorted(seqs)
        # Agents running at shutdown stop in reverse spawn order (one waiting out a
        # restart backoff has no run to stop; one whose handler failed during the grace
        # period ended then, out of that order, and is not restarted).
        stopped = record["stopped"]
        assert len(set(stopped)) == len(stopped)
        assert set(stopped) <= set(names_alive)
        ordered = [name for name in stopped if name not in record["failed_in_shutdown"]]
        assert ordered == sorted(ordered, key=names.index, reverse=True)
        # Nothing of the kernel is left running.
        assert trio.lowlevel.current_statistics().tasks_living == tasks_before

    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))
