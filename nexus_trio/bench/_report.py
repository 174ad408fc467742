"""Showing a :class:`Report`: a rich table, a JSON file, and an optional PNG plot.

The plot needs matplotlib (``pip install 'nexus_trio[plot]'``); it is imported only
when a plot is asked for, and its absence is reported with that install hint.

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ._result import Metric, Usage
from ._runner import Report


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


_SUFFIX_UNITS = ("us", "ms", "s", "KB")


def _unit_after(name: str, unit: str) -> str:
    """`` (unit)`` after a metric's name, unless its values or its name carry it already
    (``1 pair: round trips/s`` was shown ``1 pair: round trips/s (round trips/s)``)."""
    return "" if unit in _SUFFIX_UNITS or name.endswith(unit) else f" ({unit})"


def fmt(value: float | None, unit: str = "") -> str:
    """A number for people: 1.23M, 456k, 78.9, 0.012 (with time and size units)."""
    if value is None or math.isnan(value):
        return "n/a"
    a = abs(value)
    if a >= 10_000_000:
        text = f"{value / 1e6:.1f}M"
    elif a >= 1_000_000:
        text = f"{value / 1e6:.2f}M"
    elif a >= 10_000:
        text = f"{value / 1e3:.0f}k"
    elif a >= 100:
        text = f"{value:.0f}"
    elif a >= 1:
        text = f"{value:.1f}"
    elif a == 0:
        text = "0"
    else:
        text = f"{value:.3g}"
    return f"{text} {unit}" if unit in _SUFFIX_UNITS else text


#: the line above the rows' CPU time and page faults, under the table
USAGE_HEADING = (
    "CPU time and minor page faults of the process that ran each row below, over the phase "
    "the row times (getrusage):"
)


def usage_text(usage: Usage, wall_s: float | None = None) -> str:
    """``user 22.7 s, sys 13.1 s, 1.83M faults (7.2 us sys a fault)``, and with the row's
    wall clock ``; CPU 97% of the wall clock`` (far below 100%: the process waited for a
    CPU, a loaded machine)."""
    faults = usage.minor_faults
    text = (
        f"user {fmt(usage.user_s, 's')}, sys {fmt(usage.sys_s, 's')}, "
        f"{fmt(faults) if faults >= 10_000 else faults} faults"
    )
    if faults > 0 and usage.sys_s > 0:
        text += f" ({usage.sys_s / faults * 1e6:.1f} us sys a fault)"
    if wall_s:
        text += f"; CPU {(usage.user_s + usage.sys_s) / wall_s * 100:.0f}% of the wall clock"
    return text


def usage_lines(rows: Iterable[tuple[str, str, str, float, Usage | None]]) -> list[str]:
    """One ``scenario: metric: usage`` line per row (scenario, metric, unit, kernel value,
    usage) that carries a usage (none: no lines); a row in seconds is its wall clock."""
    return [
        f"{scenario}: {name}: {usage_text(usage, kernel if unit == 's' else None)}"
        for scenario, name, unit, kernel, usage in rows
        if usage is not None
    ]


def _ratio(metric: Metric) -> str:
    ratio, paired = metric.ratio, metric.paired_ratio
    if ratio is None or paired is None:
        return ratio_text(ratio, paired, 0)
    # (the column does not wrap: the pairs' count is in the caption's words)
    return f"{paired:.2f}x\n(medians {ratio:.2f}x)"


def ratio_text(ratio: float | None, paired: float | None, pairs: int) -> str:
    """The ratio column of the Markdown table: the median of ``pairs`` per-pair ratios
    (what the goal is judged on) with the ratio of the medians under it, or the ratio of
    the medians alone."""
    if ratio is None:
        return ""
    if paired is None:
        return f"{ratio:.2f}x"
    return f"{paired:.2f}x<br>(median of {pairs} pairs; ratio of medians {ratio:.2f}x)"


def _met(metric: Metric) -> str:
    met = metric.met
    if met is None:
        return ""
    value = metric.goal_value
    assert metric.goal is not None and value is not None
    margin = metric.goal.margin(value)
    mark = "[green]yes[/]" if met else "[red]no[/]"
    return f"{mark} {margin}" if margin else mark


def table(report: Report) -> Table:
    """Rows grouped by scenario; ``ratio`` is kernel / the first-named (reference) baseline."""
    t = Table(
        title=f"nexus_trio benchmarks ({report.scale} scale, median of {report.repeat})",
        caption=(
            "ratio = kernel / reference baseline (marked *); with pairs (repetitions), the"
            " median of the per-pair ratios (the goal's) over the ratio of the medians;"
            " units in the metric name"
        ),
    )
    t.add_column("metric", ratio=3, overflow="fold")
    t.add_column("kernel", justify="right", no_wrap=True)
    t.add_column("baselines", justify="right", no_wrap=True)
    t.add_column("ratio", justify="right", no_wrap=True)
    t.add_column("goal", ratio=1, overflow="fold")
    t.add_column("met?", no_wrap=True)
    scenario = ""
    for m in report.metrics:
        if m.scenario != scenario:
            scenario = m.scenario
            t.add_row(f"[bold]{scenario}[/]", end_section=False)
        unit = _unit_after(m.name, m.unit)
        baselines = "\n".join(
            f"{'*' if name == m.reference else ''}{name} {fmt(v, m.unit)}"
            for name, v in m.baselines.items()
        )
        t.add_row(
            f"  {m.name}{unit}",
            fmt(m.kernel, m.unit),
            baselines,
            _ratio(m),
            m.goal.text if m.goal else "",
            _met(m),
        )
    return t


def print_report(report: Report, console: Console) -> None:
    console.print(table(report))
    lines = usage_lines((m.scenario, m.name, m.unit, m.kernel, m.usage) for m in report.metrics)
    if lines:
        console.print(Text(USAGE_HEADING))
        for line in lines:
            console.print(Text(f"  {line}"))
    for name, reason in report.skipped.items():
        # Text, not markup: a reason quotes an error (a path, a command line).
        console.print(Text(f"{name}: skipped: {reason}", style="yellow"))
    goals = [m for m in report.metrics if m.met is not None]
    met = sum(1 for m in goals if m.met)
    machine = report.machine
    load = machine["load_average"]
    console.print(
        Text(
            f"{met}/{len(goals)} goals met in {report.seconds:.0f}s on {machine['cpus']} x "
            f"{machine['cpu']}, Python {machine['python']}, trio {machine['trio']} "
            f"(load average at start {_load_average(load)})"
        )
    )


def _load_average(load: list[float] | None) -> str:
    """``os.getloadavg()`` as ``uptime`` shows it (``16.85 11.94 5.32``); "unknown" without it."""
    return "unknown" if load is None else " ".join(f"{value:.2f}" for value in load)


def write_json(report: Report, path: Path) -> None:
    path.write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")


def _advantage(metric: Metric) -> float | None:
    """How many times better the kernel is than the reference (>1: kernel ahead)."""
    ratio = metric.verdict_ratio
    if ratio is None or ratio <= 0:
        return None
    return ratio if metric.higher_is_better else 1 / ratio


def plot(report: Report, path: Path) -> None:
    """A horizontal bar chart of kernel vs reference baseline for every metric with a ratio."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise PlotUnavailable(
            "a plot needs matplotlib: pip install 'nexus_trio[plot]' (or pip install matplotlib)"
        ) from exc
    rows: list[tuple[str, float, Metric]] = []
    for m in report.metrics:
        adv = _advantage(m)
        if adv is not None:
            rows.append((f"{m.scenario}: {m.name}\n(vs {m.reference})", adv, m))
    if not rows:
        raise ValueError("nothing to plot: no metric has a baseline")
    rows.reverse()
    fig: Any
    fig, ax = plt.subplots(figsize=(13, 0.36 * len(rows) + 1.8))
    colours = []
    for _, _, m in rows:
        # Only goals on the ratio are drawn: a goal on the kernel's own value (e.g. a
        # spawn rate) says nothing about this bar.
        met = m.met if m.goal is not None and m.goal.on == "ratio" else None
        colours.append("#4c9a2a" if met else "#c0392b" if met is False else "#5b7db1")
    ax.barh([label for label, _, _ in rows], [adv for _, adv, _ in rows], color=colours)
    for y, (_, adv, m) in enumerate(rows):
        ax.text(adv, y, f" {adv:.2f}x", va="center", fontsize=7)
        goal = m.goal
        if goal is not None and goal.on == "ratio" and goal.threshold > 0:
            target = goal.threshold if m.higher_is_better else 1 / goal.threshold
            ax.plot([target, target], [y - 0.4, y + 0.4], color="black", linewidth=1.5)
    ax.axvline(1.0, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("kernel advantage over the baseline (x, log scale; > 1: kernel better)")
    ax.tick_params(axis="y", labelsize=7)
    machine = report.machine
    ax.set_title(
        f"nexus_trio vs baselines ({report.scale}; {machine['cpus']} x {machine['cpu']}, "
        f"Python {machine['python']})\ngreen: goal on the ratio met, red: missed, "
        "black tick: the goal",
        fontsize=9,
    )
    fig.subplots_adjust(
        left=0.42, right=0.97, top=1 - 0.9 / fig.get_figheight(), bottom=0.6 / fig.get_figheight()
    )
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown(data: dict[str, Any]) -> str:
    """The results table as Markdown, from the JSON form (``--json``) of a report, and
    under it the CPU time and page faults of the rows that carry them (runs saved
    before rows carried them show the table alone)."""
    lines = [
        "| scenario | metric | kernel | baselines (* = ratio reference) | ratio | goal | met? |",
        "|---|---|---:|---|---:|---|---|",
    ]
    for m in data["metrics"]:
        unit = m["unit"]
        suffix = _unit_after(m["metric"], unit)
        baselines = "<br>".join(
            f"{'*' if name == m['reference'] else ''}{name} {fmt(v, unit)}"
            for name, v in m["baselines"].items()
        )
        pairs = m.get("pair_ratios") or []
        ratio = ratio_text(m["ratio"], m.get("paired_ratio"), len(pairs))
        met = "" if m["met"] is None else ("**yes**" if m["met"] else "**no**")
        if m["met"] is not None and m["margin"]:
            met += f" ({m['margin']})"
        lines.append(
            f"| {m['scenario']} | {m['metric']}{suffix} | "
            f"{fmt(m['kernel'], unit)} | {baselines} | {ratio} | {m['goal'] or ''} | {met} |"
        )
    usages = usage_lines(
        (
            m["scenario"],
            m["metric"],
            m["unit"],
            m["kernel"],
            Usage.from_dict(m["usage"]) if m.get("usage") else None,
        )
        for m in data["metrics"]
    )
    if usages:
        lines += ["", USAGE_HEADING, "", *(f"- {line}" for line in usages)]
    return "\n".join(lines) + "\n"
