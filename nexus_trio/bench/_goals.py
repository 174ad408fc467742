"""Scenario ``goals``: every row of the Goals table of issue 11, measured in one run.

Each row is a ratio against a baseline measured in the same process run (or in a
fresh subprocess of the same run where RSS must be clean), or the kernel's own value
where the goal is absolute:

* fan-out tell, ``fanout_agents`` agents, ``await kernel.send(ref, i)`` end to end, vs
  the original post's asyncio script (ints on ``asyncio.Queue``) and vs raw trio memory
  channels drained in batches (see :mod:`._fanout`);
* fan-out throughput with ``goals_agents`` agents vs with ``fanout_agents`` agents, the
  same number of messages, each agent started by its first message inside the clock (as
  in ``nexus run -w fanout``);
* ``Message`` construction vs a bare slotted class with the same fields and keywords (the
  best of many short timings of each, alternated: see :func:`construction_rows_us`);
* request/reply, one pair, p50 vs raw trio (a channel plus a reply channel);
* at ``goals_agents`` agents (fresh subprocesses): deliver one message to each vs a raw
  trio task + channel per agent, RSS per agent after one message vs the same, spawn
  rate, and one ``kernel.stats()`` call;
* ``goals_million`` agents in one kernel and one process: spawn, one message each,
  shutdown, each timed, and nothing lost.

The rows timed in the subprocess (the delivery and spawn rows at ``goals_agents``, the
three phases at ``goals_million``) also carry the user and system CPU time and the minor
page faults of that process over the phase (:class:`._result.Usage`): a wall clock that
moves between runs can then be told apart as more work or dearer pages.

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

import asyncio
import functools
import gc
import statistics
import timeit
import uuid
from typing import Any

import trio

from .. import SYSTEM_ID, Message, MessageKind, new_id
from . import _fanout, _reqrep, _scale
from ._measure import percentile
from ._result import Goal, Metric, ScenarioResult, Usage, check, pair_ratios
from ._scales import Scale

NAME = "goals (issue 11)"


class BareMessage:
    """The baseline for ``Message`` construction: the same fields, keywords and defaults,
    every one assigned, nothing computed (no id, no clock)."""

    __slots__ = (
        "conversation_id",
        "id",
        "kind",
        "payload",
        "reply_to",
        "sender",
        "timestamp",
        "to",
        "trace_id",
    )

    def __init__(
        self,
        sender: uuid.UUID,
        to: uuid.UUID | str,
        payload: Any = None,
        kind: MessageKind = MessageKind.COMMAND,
        id: uuid.UUID | None = None,
        timestamp: int = 0,
        conversation_id: uuid.UUID | None = None,
        reply_to: uuid.UUID | None = None,
        trace_id: uuid.UUID | None = None,
    ) -> None:
        self.sender = sender
        self.to = to
        self.payload = payload
        self.kind = kind
        self.id = id
        self.timestamp = timestamp
        self.conversation_id = conversation_id
        self.reply_to = reply_to
        self.trace_id = trace_id


def construction_us(cls: type[Any], number: int, repeat: int = 5) -> float:
    """Microseconds per ``cls(sender=..., to=..., payload=...)``, best of ``repeat`` timings
    of ``number`` calls each (how a user builds a message; the kernel's own sends use
    ``new_message``, which skips the class call and is not what this row measures). The
    collector stays on as in real use (``timeit`` turns it off by default)."""
    timer = timeit.Timer(
        "cls(sender=sender, to=to, payload=1)",
        setup="gc.enable()",
        globals={"cls": cls, "sender": SYSTEM_ID, "to": new_id(), "gc": gc},
    )
    return min(timer.repeat(repeat=repeat, number=number)) / number * 1e6


def construction_rows_us(number: int, timings: int) -> tuple[float, float]:
    """``Message`` and :class:`BareMessage` construction (microseconds a call), each the
    best of ``timings`` timings of ``number`` calls, the two classes' timings alternated
    (M B, B M, ...) so that both see the same minutes of a shared machine."""
    best = {Message: float("inf"), BareMessage: float("inf")}
    for timing in range(timings):
        for cls in (Message, BareMessage) if timing % 2 == 0 else (BareMessage, Message):
            best[cls] = min(best[cls], construction_us(cls, number, repeat=1))
    return best[Message], best[BareMessage]


def _median(values: list[float]) -> float:
    return statistics.median(values)


#: the sides of the fan-out rows, in the order an even repetition runs them (an odd one
#: runs them in reverse)
FANOUT_SIDES = ("raw trio", "asyncio", "kernel")


def fanout_order(repetition: int) -> tuple[str, ...]:
    """The order repetition ``repetition`` (from 0) runs the fan-out's sides in: the kernel
    last, then first, then last (A B, B A, ...), so a load that rises or falls over the
    run does not favour one side."""
    return FANOUT_SIDES if repetition % 2 == 0 else FANOUT_SIDES[::-1]


def _fanout_rows(scale: Scale, counts: dict[str, int]) -> list[Metric]:
    agents, messages = scale.fanout_agents, scale.fanout_messages
    seconds: dict[str, list[float]] = {side: [] for side in FANOUT_SIDES}
    for repetition in range(scale.repeat):
        for side in fanout_order(repetition):
            if side == "raw trio":
                trio_s, trio_n = trio.run(_fanout.trio_fanout, agents, messages)
                check(
                    trio_n >= messages, f"goals: raw trio fan-out processed {trio_n} of {messages}"
                )
                seconds[side].append(trio_s)
            elif side == "asyncio":
                asyncio_s, asyncio_n = asyncio.run(_fanout.asyncio_fanout(agents, messages))
                check(
                    asyncio_n == messages,
                    f"goals: asyncio fan-out processed {asyncio_n} of {messages}",
                )
                seconds[side].append(asyncio_s)
            else:
                kernel_s, kcounts = trio.run(_fanout.kernel_fanout, agents, messages)
                _check_fanout(kcounts, f"{agents:,} agents")
                seconds[side].append(kernel_s)
    counts["fanout_handled"] = kcounts["handled"]
    # The same offered work over many more agents, each started by its first message
    # inside the clock (as `nexus run -w fanout` does): activation and GC included.
    many = scale.goals_agents
    cold: dict[int, float] = {}
    for size in (agents, many):
        cold_s, cold_counts = trio.run(
            functools.partial(_fanout.kernel_fanout, size, messages, activate=False)
        )
        _check_fanout(cold_counts, f"{size:,} agents, cold")
        counts[f"fanout_cold_{size}_handled"] = cold_counts["handled"]
        cold[size] = messages / cold_s
    return [
        *fanout_metrics(agents, messages, seconds),
        Metric(
            NAME,
            f"fan-out throughput, {many:,} agents vs {agents:,} agents, {messages:,} msgs",
            "msg/s",
            cold[many],
            {f"{agents:,} agents": cold[agents]},
            reference=f"{agents:,} agents",
            goal=Goal(">= 0.7x", "ratio", ">=", 0.7),
            note="agents start on their first message, inside the clock",
        ),
    ]


def fanout_metrics(agents: int, messages: int, seconds: dict[str, list[float]]) -> list[Metric]:
    """The fan-out rows (vs asyncio, share of raw trio) from each side's time per
    repetition (``seconds[side][i]``, the sides of repetition ``i`` run back to back):
    medians of the rates, and each repetition's own ratio as a pair."""
    rates = {side: [messages / s for s in seconds[side]] for side in FANOUT_SIDES}
    kernel_rates = rates["kernel"]
    medians = {side: _median(rates[side]) for side in ("asyncio", "raw trio")}
    label = f"fan-out tell, {agents:,} agents, {messages:,} msgs, await kernel.send"
    runs = tuple(kernel_rates)
    rows = (
        ("asyncio", "vs asyncio (ints on asyncio.Queue)", ">= 1.5x (must: >= 1.0x)", 1.5),
        ("raw trio", "share of raw trio channels, batched drain", ">= 35%", 0.35),
    )
    return [
        Metric(
            NAME,
            f"{label}: {what}",
            "msg/s",
            _median(kernel_rates),
            medians,
            reference=reference,
            goal=Goal(text, "ratio", ">=", threshold),
            runs=runs,
            pair_ratios=pair_ratios(kernel_rates, rates[reference]) if len(runs) > 1 else (),
        )
        for reference, what, text, threshold in rows
    ]


def _check_fanout(counts: dict[str, int], what: str) -> None:
    check(
        counts["handled"] == counts["sent"] == counts["accepted"]
        and counts["dead_lettered"] == 0
        and counts["in_flight"] == 0,
        f"goals: kernel fan-out ({what}) counts do not add up: {counts}",
    )


def _message_rows(scale: Scale) -> list[Metric]:
    message_us, bare_us = construction_rows_us(scale.message_constructions, scale.message_timings)
    baselines = {"bare slotted class": bare_us}
    return [
        Metric(
            NAME,
            "Message construction",
            "us",
            message_us,
            baselines,
            reference="bare slotted class",
            goal=Goal("<= 0.6 us", "value", "<=", 0.6),
            higher_is_better=False,
        ),
        Metric(
            NAME,
            "Message construction vs a bare slotted class",
            "us",
            message_us,
            baselines,
            reference="bare slotted class",
            goal=Goal("<= 1.5x", "ratio", "<=", 1.5),
            higher_is_better=False,
        ),
    ]


def _reqrep_row(scale: Scale, counts: dict[str, int]) -> Metric:
    trips = scale.reqrep_round_trips
    kernel_p50: list[float] = []
    raw_p50: list[float] = []
    for _ in range(scale.repeat):
        _, raw_latencies = trio.run(_reqrep.raw_trio_pairs, 1, trips)
        (_, latencies), kcounts = trio.run(_reqrep.kernel_pairs, 1, trips)
        check(len(raw_latencies) == trips, f"goals: raw trio made {len(raw_latencies)} trips")
        check(
            len(latencies) == trips
            and kcounts["handled"] == kcounts["replies_delivered"] == trips + 1
            and kcounts["dead_lettered"] == 0,
            f"goals: request/reply counts do not add up: {kcounts}",
        )
        kernel_p50.append(percentile(latencies, 0.5) * 1e6)
        raw_p50.append(percentile(raw_latencies, 0.5) * 1e6)
    counts["reqrep_replies_delivered"] = kcounts["replies_delivered"]
    return Metric(
        NAME,
        "request/reply, one pair, p50 latency",
        "us",
        _median(kernel_p50),
        {"raw trio": _median(raw_p50)},
        reference="raw trio",
        goal=Goal("<= 1.5x", "ratio", "<=", 1.5),
        higher_is_better=False,
        runs=tuple(kernel_p50),
    )


def _measure(scale: Scale, kind: str, n: int) -> dict[str, Any]:
    if scale.scale_subprocess:
        return _scale.measure_in_subprocess(kind, n, timeout=3600.0)
    return _scale.measure(kind, n)


def _many_agents_rows(scale: Scale, counts: dict[str, int]) -> list[Metric]:
    n = scale.goals_agents
    k = _measure(scale, "kernel", n)
    raw = _measure(scale, "raw trio", n)
    check(
        k["handled"] == 2 * n == k["accepted"] and k["dead_lettered"] == 0 and k["in_flight"] == 0,
        f"goals: {n:,} agents: kernel counts do not add up (two messages per agent): {k}",
    )
    check(
        raw["handled"] == 2 * n,
        f"goals: {n:,} agents: raw trio handled {raw['handled']} of {2 * n}",
    )
    counts["many_agents_handled"] = k["handled"]

    def per_agent_kb(r: dict[str, Any]) -> float:
        return float(max(r["rss_active"] - r["rss_base"], 0)) / n / 1024

    size = f"{n:,} agents"
    return [
        Metric(
            NAME,
            f"deliver one message to each of {size} (idle)",
            "s",
            k["deliver_s"],
            {"raw trio task+channel": raw["deliver_s"]},
            reference="raw trio task+channel",
            goal=Goal("<= 2x", "ratio", "<=", 2.0),
            higher_is_better=False,
            note="each agent starts on this message (lazy start); the baseline's tasks run",
            usage=Usage.from_dict(k["deliver_usage"]),
        ),
        Metric(
            NAME,
            f"deliver a second message to each of {size} (agents running)",
            "s",
            k["second_deliver_s"],
            {"raw trio task+channel": raw["second_deliver_s"]},
            reference="raw trio task+channel",
            higher_is_better=False,
            note="no goal of its own: the row above without the start of each agent",
            usage=Usage.from_dict(k["second_deliver_usage"]),
        ),
        Metric(
            NAME,
            f"RSS per agent after one message, {size}",
            "KB",
            per_agent_kb(k),
            {"raw trio task+channel": per_agent_kb(raw)},
            reference="raw trio task+channel",
            goal=Goal("<= 1.2x", "ratio", "<=", 1.2),
            higher_is_better=False,
        ),
        Metric(
            NAME,
            f"spawn rate at {size}",
            "agents/s",
            n / k["spawn_s"],
            {"raw trio task+channel": n / raw["spawn_s"]},
            reference="raw trio task+channel",
            goal=Goal(">= 100k/s", "value", ">=", 100_000),
            usage=Usage.from_dict(k["spawn_usage"]),
        ),
        Metric(
            NAME,
            f"kernel.stats() at {size}",
            "us",
            k["stats_s"] * 1e6,
            goal=Goal("<= 50 us", "value", "<=", 50.0),
            higher_is_better=False,
        ),
    ]


def _million_rows(scale: Scale, counts: dict[str, int]) -> list[Metric]:
    n = scale.goals_million
    r = _measure(scale, "lifecycle", n)
    lost = n - r["handled"] - r["dead_lettered"]
    counts["million_accepted"] = r["accepted"]
    counts["million_handled"] = r["handled"]
    counts["million_dead_lettered"] = r["dead_lettered"]
    check(
        r["accepted"] == n and r["in_flight"] == 0 and lost == 0,
        f"goals: {n:,} agents: a message was lost: {r}",
    )
    size = f"{n:,} agents, one process"
    under_30 = Goal("< 30 s", "value", "<=", 30.0)
    rows = [
        Metric(
            NAME,
            f"{size}: {what}",
            "s",
            r[f"{phase}_s"],
            goal=under_30,
            higher_is_better=False,
            usage=Usage.from_dict(r[f"{phase}_usage"]),
        )
        for what, phase in (
            ("spawn", "spawn"),
            ("one message each", "deliver"),
            ("shutdown", "shutdown"),
        )
    ]
    rows.append(
        Metric(
            NAME,
            f"{size}: messages lost",
            "messages",
            float(lost),
            goal=Goal("0 (nothing lost)", "value", "<=", 0),
            higher_is_better=False,
            note=f"{r['handled']:,} handled, {r['dead_lettered']:,} dead-lettered",
        )
    )
    return rows


def run(scale: Scale) -> ScenarioResult:
    counts: dict[str, int] = {}
    metrics: list[Metric] = []
    metrics += _fanout_rows(scale, counts)
    metrics += _message_rows(scale)
    metrics.append(_reqrep_row(scale, counts))
    metrics += _many_agents_rows(scale, counts)
    metrics += _million_rows(scale, counts)
    return ScenarioResult(NAME, tuple(metrics), counts)
