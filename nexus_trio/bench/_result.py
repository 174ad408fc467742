"""What a benchmark reports: metrics with baselines, ratios and goals.

A :class:`Metric` is one row of the results table: the kernel's value, the values of
the baselines measured in the same process run, the baseline the ratio is taken
against, and optionally the goal from issue 6 with whether it was met and by how much.
Repetitions are folded into one metric by taking medians (:func:`combine`). Where the
kernel and its reference baseline were measured back to back (a pair), each pair's own
ratio is kept as well and the goal is judged on the median of those ratios: a load that
changes between pairs moves both sides of a pair, and one noisy run moves one pair, not
the verdict. The ratio of the medians is reported beside it.

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any, Literal, final

import attrs


class BenchmarkError(Exception):
    """A scenario's counts did not add up (a message was lost or counted twice)."""


@final
@attrs.frozen
class Goal:
    """A target for a metric: ``on`` the ratio or the kernel's own value, ``op`` threshold."""

    text: str
    on: Literal["ratio", "value"]
    op: Literal[">=", "<="]
    threshold: float

    def met(self, value: float) -> bool:
        return value >= self.threshold if self.op == ">=" else value <= self.threshold

    def margin(self, value: float) -> str:
        """By how much the goal is met or missed, in words (``"+12% over"``)."""
        if self.threshold == 0:
            return ""
        rel = (value - self.threshold) / abs(self.threshold)
        if self.op == "<=":
            rel = -rel
        word = "margin" if rel >= 0 else "short"
        return f"{abs(rel) * 100:.0f}% {word}"


@final
@attrs.frozen
class Usage:
    """What the process that measured a row spent over the row's phase: user and system
    CPU seconds and minor page faults (``getrusage`` before and after the phase).

    Where a wall-clock row moves between runs, this says whether the process did more
    work (user time) or the machine charged more for the same pages (system time a fault).
    """

    user_s: float
    sys_s: float
    minor_faults: int

    def __sub__(self, start: Usage) -> Usage:
        return Usage(
            self.user_s - start.user_s,
            self.sys_s - start.sys_s,
            self.minor_faults - start.minor_faults,
        )

    def to_dict(self) -> dict[str, float]:
        return {"user_s": self.user_s, "sys_s": self.sys_s, "minor_faults": self.minor_faults}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Usage:
        return cls(float(data["user_s"]), float(data["sys_s"]), int(data["minor_faults"]))

    @classmethod
    def median(cls, usages: Sequence[Usage]) -> Usage:
        """Field by field, as :func:`combine` folds repetitions."""
        return cls(
            statistics.median(u.user_s for u in usages),
            statistics.median(u.sys_s for u in usages),
            round(statistics.median(u.minor_faults for u in usages)),
        )


@final
@attrs.frozen
class Metric:
    """One measured quantity, the kernel's value beside its baselines."""

    scenario: str
    name: str
    unit: str
    kernel: float
    baselines: Mapping[str, float] = attrs.field(factory=dict)
    #: the baseline the ratio ``kernel / baseline`` is taken against (None: no ratio)
    reference: str | None = None
    goal: Goal | None = None
    higher_is_better: bool = True
    #: the kernel's value in each repetition (filled in by :func:`combine`)
    runs: tuple[float, ...] = ()
    note: str = ""
    #: CPU time and page faults of the process over the phase this row timed (None: not
    #: recorded; runs saved before it was have none)
    usage: Usage | None = None
    #: ``kernel / reference`` of each repetition that measured both back to back (empty:
    #: no pairs; a single repetition has none)
    pair_ratios: tuple[float, ...] = ()

    @property
    def ratio(self) -> float | None:
        """The ratio of the medians: ``kernel / baselines[reference]``."""
        if self.reference is None:
            return None
        base = self.baselines.get(self.reference)
        if not base:
            return None
        return self.kernel / base

    @property
    def paired_ratio(self) -> float | None:
        """The median of :attr:`pair_ratios` (None without pairs)."""
        return statistics.median(self.pair_ratios) if self.pair_ratios else None

    @property
    def verdict_ratio(self) -> float | None:
        """The ratio a goal on the ratio is judged on: the median of the per-pair ratios
        where there are pairs, else the ratio of the medians."""
        paired = self.paired_ratio
        return self.ratio if paired is None else paired

    @property
    def goal_value(self) -> float | None:
        if self.goal is None:
            return None
        return self.verdict_ratio if self.goal.on == "ratio" else self.kernel

    @property
    def met(self) -> bool | None:
        value = self.goal_value
        if self.goal is None or value is None:
            return None
        return self.goal.met(value)

    def to_dict(self) -> dict[str, Any]:
        value = self.goal_value
        return {
            "scenario": self.scenario,
            "metric": self.name,
            "unit": self.unit,
            "kernel": self.kernel,
            "baselines": dict(self.baselines),
            "reference": self.reference,
            "ratio": self.ratio,
            "higher_is_better": self.higher_is_better,
            "goal": self.goal.text if self.goal is not None else None,
            "goal_spec": attrs.asdict(self.goal) if self.goal is not None else None,
            "met": self.met,
            "margin": self.goal.margin(value) if self.goal is not None and value else None,
            "runs": list(self.runs),
            "note": self.note,
            "usage": self.usage.to_dict() if self.usage is not None else None,
            "pair_ratios": list(self.pair_ratios),
            "paired_ratio": self.paired_ratio,
        }


@final
@attrs.frozen
class ScenarioResult:
    """What one repetition of a scenario measured, and the counts it checked."""

    scenario: str
    metrics: tuple[Metric, ...]
    #: message and event counts (for the smoke test: do they add up?)
    counts: Mapping[str, int] = attrs.field(factory=dict)
    skipped: str | None = None


def combine(results: Sequence[ScenarioResult]) -> list[Metric]:
    """Fold repetitions into one metric per row, by medians of every value.

    A repetition measures the kernel and its baselines one after another in one run, so
    its own ratio is a pair: with two or more, the row keeps them (a row that already
    carries pairs of its own gives those instead of its one ratio)."""
    rows: dict[tuple[str, str], list[Metric]] = {}
    for result in results:
        for metric in result.metrics:
            rows.setdefault((metric.scenario, metric.name), []).append(metric)
    combined: list[Metric] = []
    for runs in rows.values():
        first = runs[0]
        names: dict[str, None] = {}
        for m in runs:
            names.update(dict.fromkeys(m.baselines))
        usages = [m.usage for m in runs if m.usage is not None]
        pairs = _pairs(runs)
        baselines = {
            name: statistics.median([m.baselines[name] for m in runs if name in m.baselines])
            for name in names
        }
        combined.append(
            attrs.evolve(
                first,
                kernel=statistics.median(m.kernel for m in runs),
                baselines=baselines,
                runs=tuple(m.kernel for m in runs),
                usage=Usage.median(usages) if usages else None,
                pair_ratios=pairs,
            )
        )
    return combined


def _pairs(runs: Sequence[Metric]) -> tuple[float, ...]:
    """The per-pair ratios of a row's repetitions: each one's own pairs, or its ratio."""
    if len(runs) == 1:
        return runs[0].pair_ratios
    pairs: list[float] = []
    for m in runs:
        ratio = m.ratio
        if m.pair_ratios:
            pairs.extend(m.pair_ratios)
        elif ratio is not None:
            pairs.append(ratio)
        else:
            return ()
    return tuple(pairs)


def pair_ratios(kernel: Sequence[float], baseline: Sequence[float]) -> tuple[float, ...]:
    """``kernel[i] / baseline[i]`` for each pair measured back to back."""
    if len(kernel) != len(baseline):
        raise ValueError(
            f"pairs need as many kernel values as baseline values: {len(kernel)} against {len(baseline)}"
        )
    return tuple(k / b for k, b in zip(kernel, baseline, strict=True))


def check(condition: bool, what: str) -> None:
    """Raise :class:`BenchmarkError` naming ``what`` if ``condition`` is false."""
    if not condition:
        raise BenchmarkError(what)


def metric_from_dict(data: Mapping[str, Any]) -> Metric:
    """The inverse of :meth:`Metric.to_dict` (to redraw or re-tabulate a saved run)."""
    spec = data.get("goal_spec")
    usage = data.get("usage")
    return Metric(
        scenario=data["scenario"],
        name=data["metric"],
        unit=data["unit"],
        kernel=data["kernel"],
        baselines=dict(data["baselines"]),
        reference=data["reference"],
        goal=Goal(**spec) if spec else None,
        higher_is_better=data["higher_is_better"],
        runs=tuple(data.get("runs", ())),
        note=data.get("note", ""),
        usage=Usage.from_dict(usage) if usage else None,
        pair_ratios=tuple(data.get("pair_ratios", ())),
    )
