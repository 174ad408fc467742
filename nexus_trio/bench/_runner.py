"""Running the suite: scenarios by name, repetitions, medians, and a progress bar.

Each scenario's ``run(scale)`` performs one repetition of the kernel *and* its baselines
in this process and returns a :class:`ScenarioResult`; the runner repeats it, folds the
repetitions into medians (:func:`combine`) and collects everything into a
:class:`Report`, which the report module renders as a table, JSON or a plot.

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from typing import Any, final

import attrs
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from . import _bridges, _churn, _fanin, _fanout, _goals, _load, _reqrep, _scale
from ._measure import quiet_kernel_logs
from ._result import Metric, ScenarioResult, combine, metric_from_dict
from ._scales import Scale

#: scenario name -> one repetition at a scale
SCENARIOS: dict[str, Callable[[Scale], ScenarioResult]] = {
    "fanout": _fanout.run,
    "reqrep": _reqrep.run,
    "scale": _scale.run,
    "load": _load.run,
    "fanin": _fanin.run,
    "churn": _churn.run,
    "bridges": _bridges.run,
    "goals": _goals.run,
}

#: scenarios measured once whatever ``repeat`` says (each run is long or its own baseline)
_ONCE = frozenset({"scale", "goals"})


@final
@attrs.frozen
class Report:
    """Everything one ``nexus bench`` run measured."""

    scale: str
    repeat: int
    metrics: tuple[Metric, ...]
    counts: dict[str, dict[str, int]]
    skipped: dict[str, str]
    machine: dict[str, Any]
    seconds: float

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        """A report saved with ``--json``, read back (to redraw its plot or table)."""
        return cls(
            scale=data["scale"],
            repeat=data["repeat"],
            metrics=tuple(metric_from_dict(m) for m in data["metrics"]),
            counts=data["counts"],
            skipped=data["skipped"],
            machine=data["machine"],
            seconds=data["seconds"],
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "repeat": self.repeat,
            "seconds": self.seconds,
            "machine": self.machine,
            "metrics": [m.to_dict() for m in self.metrics],
            "counts": self.counts,
            "skipped": self.skipped,
        }


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_info() -> dict[str, Any]:
    """CPU, memory, load and versions, for the record."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    ram_gib: float | None = None
    with contextlib.suppress(ValueError, OSError, AttributeError):
        ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "ram_gib": round(ram_gib, 1) if ram_gib else None,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "nexus_trio": _version("nexus_trio"),
        "trio": _version("trio"),
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def resolve(names: Sequence[str]) -> list[str]:
    """Validate scenario names (all of them when ``names`` is empty)."""
    if not names:
        return list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise ValueError(
            f"unknown scenario {', '.join(map(repr, unknown))}; choose from {', '.join(SCENARIOS)}"
        )
    return list(dict.fromkeys(names))


def run_suite(
    scale: Scale,
    names: Sequence[str] = (),
    *,
    repeat: int | None = None,
    console: Console | None = None,
    progress: bool = True,
) -> Report:
    """Run the chosen scenarios (all by default) ``repeat`` times each, medians folded.

    The kernel's log records are not printed while a scenario runs (see
    ``quiet_kernel_logs``): the table and the counts say what happened.
    """
    chosen = resolve(names)
    repeat = scale.repeat if repeat is None else repeat
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    console = console or Console(stderr=True)
    machine = machine_info()
    metrics: list[Metric] = []
    counts: dict[str, dict[str, int]] = {}
    skipped: dict[str, str] = {}
    plan = [(name, 1 if name in _ONCE else repeat) for name in chosen]
    started = time.perf_counter()
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        disable=not progress,
        transient=False,
    ) as bar:
        task = bar.add_task("benchmarks", total=sum(n for _, n in plan))
        for name, times in plan:
            results: list[ScenarioResult] = []
            for i in range(times):
                bar.update(task, description=f"{name} ({scale.name}) {i + 1}/{times}")
                with quiet_kernel_logs():
                    results.append(SCENARIOS[name](scale))
                bar.advance(task)
            if results[-1].skipped:
                skipped[name] = results[-1].skipped
            counts[name] = dict(results[-1].counts)
            metrics.extend(combine(results))
        bar.update(task, description="done")
    return Report(
        scale=scale.name,
        repeat=repeat,
        metrics=tuple(metrics),
        counts=counts,
        skipped=skipped,
        machine=machine,
        seconds=time.perf_counter() - started,
    )
