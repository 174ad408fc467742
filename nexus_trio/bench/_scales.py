"""How big each scenario runs: ``smoke`` (tests, CI), ``quick``, ``default`` and ``full``.

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

from typing import final

import attrs


@final
@attrs.frozen
class Scale:
    """Sizes for every scenario at one scale."""

    name: str
    fanout_agents: int
    fanout_messages: int
    reqrep_round_trips: int
    reqrep_pairs: int
    reqrep_per_pair: int
    scale_sizes: tuple[int, ...]
    #: run each scale size in a fresh subprocess (clean RSS); off for the smoke test
    scale_subprocess: bool
    load_small: int
    load_large: int
    load_rate: int
    load_seconds: float
    fanin_producers: int
    fanin_per_producer: int
    churn_restarts: int
    bridge_round_trips: int
    repeat: int
    #: the "100k agents" rows of the goals scenario (throughput, delivery, RSS, spawn, stats)
    goals_agents: int = 100_000
    #: the "1M agents" row of the goals scenario: spawn, one message each, shutdown
    goals_million: int = 1_000_000
    #: Message constructions per timing of the goals scenario (about a millisecond: a
    #: timing short enough that many of them run between two of a shared machine's
    #: other tasks)
    message_constructions: int = 2_000
    #: timings of each class (``Message``, the bare slotted class), alternated; the best
    #: of each is its row
    message_timings: int = 500


SMOKE = Scale(
    name="smoke",
    fanout_agents=10,
    fanout_messages=2_000,
    reqrep_round_trips=50,
    reqrep_pairs=10,
    reqrep_per_pair=5,
    scale_sizes=(200,),
    scale_subprocess=False,
    load_small=10,
    load_large=100,
    load_rate=2_000,
    load_seconds=0.05,
    fanin_producers=20,
    fanin_per_producer=5,
    churn_restarts=30,
    bridge_round_trips=10,
    repeat=1,
    goals_agents=200,
    goals_million=300,
    message_constructions=200,
    message_timings=5,
)

QUICK = Scale(
    name="quick",
    fanout_agents=1_000,
    fanout_messages=100_000,
    reqrep_round_trips=2_000,
    reqrep_pairs=1_000,
    reqrep_per_pair=5,
    scale_sizes=(1_000, 10_000),
    scale_subprocess=True,
    load_small=1_000,
    load_large=10_000,
    load_rate=20_000,
    load_seconds=0.5,
    fanin_producers=1_000,
    fanin_per_producer=10,
    churn_restarts=1_000,
    bridge_round_trips=200,
    repeat=1,
    goals_agents=10_000,
    goals_million=100_000,
    message_timings=100,
)

DEFAULT = Scale(
    name="default",
    fanout_agents=1_000,
    fanout_messages=1_000_000,
    reqrep_round_trips=20_000,
    reqrep_pairs=1_000,
    reqrep_per_pair=20,
    scale_sizes=(1_000, 10_000, 100_000),
    scale_subprocess=True,
    load_small=1_000,
    load_large=100_000,
    load_rate=50_000,
    load_seconds=2.0,
    fanin_producers=1_000,
    fanin_per_producer=50,
    churn_restarts=10_000,
    bridge_round_trips=2_000,
    repeat=3,
)

FULL = attrs.evolve(DEFAULT, name="full", scale_sizes=(1_000, 10_000, 100_000, 1_000_000))

SCALES = {s.name: s for s in (SMOKE, QUICK, DEFAULT, FULL)}
