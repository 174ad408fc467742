"""The benchmark suite: the kernel beside raw trio and asyncio baselines, in one process run.

``nexus bench`` (or ``python benchmarks/run.py``) runs the scenarios of issue 6 —
fan-out tell, request/reply, scale, latency under load, fan-in backpressure,
supervision churn and bridges — each several times, and prints a table of medians,
ratios against the baselines and the goals met or missed. From Python::

    from nexus_trio.bench import DEFAULT, run_suite
    report = run_suite(DEFAULT, ["fanout"], repeat=3)
    for metric in report.metrics:
        print(metric.name, metric.kernel, metric.baselines, metric.ratio)

These are benchmarks, not tests: nothing here asserts a timing. Every scenario does
check that its counts add up and raises :class:`BenchmarkError` when they do not.

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

from ._cli import run_cli as run_cli
from ._result import BenchmarkError as BenchmarkError
from ._result import Goal as Goal
from ._result import Metric as Metric
from ._result import ScenarioResult as ScenarioResult
from ._runner import SCENARIOS as SCENARIOS
from ._runner import Report as Report
from ._runner import run_suite as run_suite
from ._scales import DEFAULT as DEFAULT
from ._scales import FULL as FULL
from ._scales import QUICK as QUICK
from ._scales import SCALES as SCALES
from ._scales import SMOKE as SMOKE
from ._scales import Scale as Scale

__all__ = [
    "DEFAULT",
    "FULL",
    "QUICK",
    "SCALES",
    "SCENARIOS",
    "SMOKE",
    "BenchmarkError",
    "Goal",
    "Metric",
    "Report",
    "Scale",
    "ScenarioResult",
    "run_cli",
    "run_suite",
]
