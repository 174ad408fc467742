"""What ``nexus run`` shows: the live view, the plain progress line, the summary, the tree dump.

Everything here renders from plain values (a :class:`Sample` of ``kernel.stats()``, the
summary dict, ``kernel.describe()``), so it is cheap to test and never touches the kernel's
internals.

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

import os
import resource
import signal
import sys
from collections.abc import Mapping
from typing import Any, Final

import attrs
from rich import box
from rich.console import RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from .._brief import brief
from .._plural import count_of, fmt_count
from .._stats import HistogramSnapshot, KernelStats
from ._cluster_cmd import FROM_ITS_RECORD, NOT_STARTED, SEEN_FROM_OUTSIDE

__all__ = [
    "Sample",
    "fmt_bytes",
    "fmt_count",
    "fmt_seconds",
    "plain_line",
    "render_live",
    "render_tree",
    "rss_bytes",
    "summary_table",
]

#: agents listed one by one in a tree dump before only the interesting ones are
_TREE_FULL_LIMIT: Final = 1_000
#: lines of a tree dump at most
_TREE_LINE_LIMIT: Final = 2_000


def rss_bytes() -> int:
    """Resident set size of this process now (Linux), else its peak."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def fmt_seconds(seconds: float) -> str:
    """``1.2 µs``, ``3.4 ms``, ``5.67 s``."""
    if seconds <= 0:
        return "0"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def fmt_reasons(reasons: Mapping[str, int]) -> str:
    if not reasons:
        return "-"
    return ", ".join(f"{k} {v:,}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1]))


@attrs.frozen
class Sample:
    """One look at the kernel for the live view / progress line."""

    elapsed: float
    phase: str
    stats: KernelStats
    rate: float
    rss: int
    #: seconds since the start, for the final frame (``elapsed`` is then the run's time)
    total: float | None = None
    rate_label: str = "msg/s"

    @property
    def processed(self) -> int:
        s = self.stats
        return s.handled + s.replies_delivered + s.forwarded


def _latency(h: HistogramSnapshot) -> str:
    if not h.count:
        return "-"
    return f"p50 {fmt_seconds(h.p50)}  p99 {fmt_seconds(h.p99)}  max {fmt_seconds(h.maximum)}"


def _bar(done: int, total: int, width: int = 30) -> str:
    filled = min(width, width * done // max(total, 1))
    return "━" * filled + "╺" * (filled < width) + " " * max(0, width - filled - 1)


def render_live(
    title: str, sample: Sample, duration: float, spawn: tuple[int, int] | None = None
) -> RenderableType:
    """The live view: one panel, two columns of figures; with ``spawn=(done, total)`` a
    progress bar of the spawning on top.

    Laid out as styled text rather than a rich table: a refresh costs a few milliseconds
    instead of tens, so the view does not slow the kernel down.
    """
    s = sample.stats
    clock = f"{sample.elapsed:.1f} s"
    if duration and sample.phase == "running":
        clock += f" / {duration:g} s"
    if sample.total is not None:
        clock = f"run {sample.elapsed:.2f} s · total {sample.total:.2f} s"
    rows = [
        (sample.rate_label, fmt_count(sample.rate), "agents alive", fmt_count(s.agents_alive)),
        ("handled", fmt_count(s.handled), "replies", fmt_count(s.replies_delivered)),
        ("sent", fmt_count(s.accepted), "in flight", fmt_count(s.in_flight)),
        (
            "handle p50",
            fmt_seconds(s.handle_latency.p50),
            "handle p99",
            fmt_seconds(s.handle_latency.p99),
        ),
        (
            "queue wait p50",
            fmt_seconds(s.queue_wait.p50),
            "queue wait p99",
            fmt_seconds(s.queue_wait.p99),
        ),
        ("max mailbox", fmt_count(s.max_mailbox_depth), "RSS", fmt_bytes(sample.rss)),
        ("restarts", fmt_count(s.restarts), "failed", fmt_count(s.failed)),
        (
            "dead letters",
            fmt_count(s.dead_lettered),
            "rejected sends",
            fmt_count(sum(s.rejected.values())),
        ),
    ]
    # values get at least 11 columns so the panel does not jitter as counts grow
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    widths[1] = max(widths[1], 11)
    widths[3] = max(widths[3], 11)
    label = "bold cyan"
    text = Text()
    if spawn is not None:
        done, total = spawn
        text.append("spawning ", style=label)
        text.append(_bar(done, total), style="magenta")
        text.append(f" {done:,}/{total:,}\n")
    for k, (l1, v1, l2, v2) in enumerate(rows):
        text.append(l1.ljust(widths[0]), style=label)
        value_style = "bold red" if k == len(rows) - 1 and s.dead_lettered else ""
        text.append("  " + v1.rjust(widths[1]), style=value_style)
        text.append("    ")
        text.append(l2.ljust(widths[2]), style=label)
        text.append("  " + v2.rjust(widths[3]))
        if k < len(rows) - 1:
            text.append("\n")
    if s.dead_letters_by_reason:
        text.append("\ndead letters by reason: " + fmt_reasons(s.dead_letters_by_reason))
    return Panel(
        text,
        title=f"[bold]nexus run[/] · {title}",
        subtitle=f"{sample.phase} · {clock}"
        + (" · Ctrl-C to stop" if sample.phase in ("spawning", "running") else ""),
        box=box.ROUNDED,
        expand=False,
    )


def plain_line(sample: Sample, *, node: str | None = None) -> str:
    """The progress line logged every few seconds when standard error is not a terminal;
    ``node`` (a worker of ``nexus run --workers``) leads it as ``node=worker-1``."""
    s = sample.stats
    parts = [f"node={node}"] if node is not None else []
    parts += [
        f"t={sample.elapsed:.1f}s",
        f"phase={sample.phase}",
        f"agents={s.agents_alive}",
        f"msg/s={sample.rate:.0f}",
        f"sent={s.accepted}",
        f"handled={s.handled}",
        f"replies={s.replies_delivered}",
        f"in_flight={s.in_flight}",
        f"p50={fmt_seconds(s.handle_latency.p50)}",
        f"p99={fmt_seconds(s.handle_latency.p99)}",
        f"queue_p99={fmt_seconds(s.queue_wait.p99)}",
        f"max_mailbox={s.max_mailbox_depth}",
        f"dead={s.dead_lettered}",
        f"restarts={s.restarts}",
        f"rss={fmt_bytes(sample.rss)}",
    ]
    if s.dead_letters_by_reason:
        parts.append(
            "dead_by_reason="
            + ",".join(f"{k}:{v}" for k, v in sorted(s.dead_letters_by_reason.items()))
        )
    return " ".join(parts).replace("µs", "us")


def summary_table(summary: Mapping[str, Any], *, ascii_marks: bool = False) -> Table:
    """The end-of-run summary as a rich table (the same figures as ``--json``); with
    ``ascii_marks`` the accounting's ✓ / ✗ are written "ok" / "x" (an output whose
    encoding has not got them)."""
    table = Table(title="nexus run summary", box=box.SIMPLE_HEAVY, show_header=False)
    table.add_column(style="bold cyan", no_wrap=True)
    table.add_column(overflow="fold")
    # Text, not markup: command lines and registered names are the user's or a program's
    table.add_row("run", Text(_run_kind(summary)))
    for program in summary.get("spawned") or ():
        table.add_row(Text("  " + str(program["name"])), Text(_spawned_text(program)))
        traffic = _bridge_counts_text(program)
        if traffic:
            table.add_row("", Text(traffic))
    table.add_row("stopped by", Text(str(summary["stopped_by"])))
    if summary.get("error"):
        table.add_row("error", Text(str(summary["error"]), style="bold red"))
    t = summary["elapsed_s"]
    table.add_row(
        "elapsed",
        f"{t['total']:.2f} s (spawn {t['spawn']:.2f} s, run {t['run']:.2f} s, "
        f"shutdown {t['shutdown']:.2f} s)",
    )
    crossed = summary.get("forwarded_in") or summary.get("workers")
    table.add_row(
        "sent (started here)" if crossed else "sent (accepted)", fmt_count(summary["sent"])
    )
    table.add_row("handled", fmt_count(summary["handled"]))
    if summary["replies_delivered"]:
        table.add_row("replies delivered", fmt_count(summary["replies_delivered"]))
    if crossed:
        table.add_row(
            "forwarded",
            f"out {fmt_count(summary.get('forwarded_out', summary['forwarded']))}"
            f" · in {fmt_count(summary.get('forwarded_in', 0))}",
        )
        table.add_row("lost (counted)", fmt_count(summary.get("lost_counted", 0)))
        if summary.get("workers_died") or summary.get("workers_written_off"):
            table.add_row(
                "handed to dead workers",
                Text(fmt_count(summary.get("handed_to_dead_workers", 0)), style="bold red"),
            )
    elif summary["forwarded"]:
        table.add_row("forwarded", fmt_count(summary["forwarded"]))
    if summary.get("closed_socket_writes"):  # (none is the usual case: no row then)
        table.add_row("closed-socket writes", fmt_count(summary["closed_socket_writes"]))
    table.add_row("dead letters", fmt_count(summary["dead_letters"]))
    table.add_row("  by reason", fmt_reasons(summary["dead_letters_by_reason"]))
    table.add_row("in flight", fmt_count(summary["in_flight"]))
    table.add_row("rejected sends", fmt_reasons(summary["rejected"]))
    table.add_row("failed", fmt_count(summary["failed"]))
    table.add_row("run failures", fmt_count(summary.get("run_failures", 0)))
    table.add_row("timed out", fmt_count(summary["timed_out"]))
    table.add_row("restarts", fmt_count(summary["restarts"]))
    table.add_row("throughput", f"{fmt_count(summary['msgs_per_s'])} msg/s during run")
    for key, label in (("handle_latency", "handle latency"), ("queue_wait", "queue wait")):
        h = summary[key]
        if h["count"]:
            table.add_row(
                label,
                f"p50 {fmt_seconds(h['p50'])} · p90 {fmt_seconds(h['p90'])} · "
                f"p99 {fmt_seconds(h['p99'])} · max {fmt_seconds(h['max'])} "
                f"({fmt_count(h['count'])} sampled)",
            )
        else:
            table.add_row(label, "-")
    table.add_row("peak RSS", fmt_bytes(summary["peak_rss_bytes"]))
    for key, label, limit in (
        ("dead_letter_lines_not_logged", "dead letters not logged", "dead_letter_log_limit"),
        ("failure_lines_not_logged", "failures not logged", "failure_log_limit"),
    ):
        if summary.get(key):
            table.add_row(
                label,
                f"{fmt_count(summary[key])} (past [kernel] {limit} lines a second; counted above)",
            )
    if summary.get("log_records_lost"):
        table.add_row(
            "log records lost",
            Text(
                f"{fmt_count(summary['log_records_lost'])} (writing them failed; "
                "counted, see docs/config.md)",
                style="yellow",
            ),
        )
    if summary.get("log_calls_failed"):
        table.add_row(
            "log calls failed",
            Text(
                f"{fmt_count(summary['log_calls_failed'])} (a logging filter or handler "
                "raised; the run went on, see docs/config.md)",
                style="yellow",
            ),
        )
    for worker in summary.get("per_worker") or ():
        table.add_row(f"  {worker.get('node') or 'worker'}", _worker_text(worker))
    for line in summary.get("lost_seen") or ():  # (said conserved or not: see lost_seen)
        table.add_row("  lost seen", Text(str(line), style="yellow"))
    if summary.get("lost_in_dead_server_said"):
        table.add_row(
            "  lost in server", Text(str(summary["lost_in_dead_server_said"]), style="yellow")
        )
    ok = summary["conserved"]
    law = (
        "every worker: accepted = handled + replies + forwarded out + dead letters;"
        " cluster: sent = handled + replies + dead letters + lost (counted) "
        + (
            "+ handed to dead workers "
            if summary.get("workers_died") or summary.get("workers_written_off")
            else ""
        )
        + ("+ lost in the dead server " if summary.get("lost_in_dead_server") else "")
        if summary.get("workers")
        else "sent = handled + replies + forwarded + dead letters + in flight "
    )
    tick, cross = ("ok", "x") if ascii_marks else ("✓", "✗")
    table.add_row(
        "accounting",
        Text(law + (tick if ok else f"{cross} MISMATCH"), style="green" if ok else "bold red"),
    )
    for reason in () if ok else summary.get("why_not_conserved") or ():
        table.add_row("  why", Text(str(reason), style="bold red"))
    return table


def _worker_text(worker: Mapping[str, Any]) -> Text:
    """One worker's line in a ``--workers`` summary."""
    if worker.get("died"):
        text = f"died: {worker.get('exit', 'no summary')} (pid {worker.get('pid', '?')})"
        books = worker.get("books")
        if books == SEEN_FROM_OUTSIDE:
            text += (
                f" · sent {fmt_count(worker.get('sent', 0))} (came out of it)"
                f" · handed to it {fmt_count(worker.get('handed_to_it', 0))} (handled"
                " there or lost with it: nobody can tell)"
            )
        elif books == FROM_ITS_RECORD:
            text += f" · {FROM_ITS_RECORD} · {_worker_counts(worker)}"
        else:
            text += f" · books {books or 'unknown'}"
        return Text(text, style="bold red")
    if worker.get("not_started"):  # (stopped while it imported the app; no nats-server)
        return Text(f"{worker['not_started']} (nothing to count)")
    if worker.get("exit") == NOT_STARTED:
        return Text("not started: the run was stopped first (nothing to count)")
    text = _worker_counts(worker)
    if worker.get("error"):
        return Text(f"{text} · error: {worker['error']}", style="bold red")
    return Text(text, style="" if worker.get("conserved") else "bold red")


def _worker_counts(worker: Mapping[str, Any]) -> str:
    # (writes to a lost connection's socket: said only when there were some, as none is
    # the usual case and they are no messages of the books)
    closed = worker.get("closed_socket_writes")
    return (
        f"sent {fmt_count(worker.get('sent', 0))} · handled {fmt_count(worker.get('handled', 0))}"
        f" · fwd in {fmt_count(worker.get('forwarded_in', 0))}"
        f" · fwd out {fmt_count(worker.get('forwarded_out', 0))}"
        f" · dead {fmt_count(worker.get('dead_letters', 0))}"
        f" · lost {fmt_count(worker.get('lost_counted', 0))}"
        + (f" · closed-socket writes {fmt_count(closed)}" if closed else "")
    )


def _run_kind(summary: Mapping[str, Any]) -> str:
    """What ran: ``ring workload, 1,000 agents``, ``app m:main, 3 agents``,
    ``spawn: 2 process agents`` (or an app or workload plus spawned programs)."""
    parts: list[str] = []
    agents = count_of(summary["agents"], "agent")
    asked = summary.get("agents_asked")
    if summary.get("workload") and asked is not None and summary["agents"] < asked:
        agents = f"{fmt_count(summary['agents'])} of {count_of(asked, 'agent')}"  # (stopped)
    if summary.get("app"):
        parts.append(f"app {summary['app']}, {agents}")
    elif summary.get("workload"):
        parts.append(f"{summary['workload']} workload, {agents}")
    spawned = summary.get("spawned") or ()
    if spawned:
        parts.append(f"spawn: {count_of(len(spawned), 'process agent')}")
    what = " + ".join(parts) or agents
    workers = summary.get("workers")
    return f"{count_of(workers, 'worker')}: {what}" if workers else what


#: a process agent's counters that say something went wrong, as the summary names them
_BRIDGE_PROBLEMS: Final = (
    ("invalid_lines", "invalid lines"),
    ("oversized_lines", "oversized lines"),
    ("late_responses", "late answers"),
    ("unmatched_responses", "unmatched answers"),
    ("abandoned", "abandoned"),
    ("replaced", "replaced"),
    ("sends_failed", "sends refused"),
    ("pings_missed", "pings missed"),
    ("unserialisable", "unserialisable"),
    ("stderr_lines_not_logged", "stderr lines not logged"),
    ("descendants_killed", "descendants killed"),
    ("children_unbranded", "children unbranded"),
    ("children_nofile_kept", "children with the raised descriptor limit"),
)


def _bridge_counts_text(program: Mapping[str, Any]) -> str:
    """A spawned program's traffic and troubles from its bridge's counters (``counts``
    in ``--json``): frames each way, the problem counters that are not 0, the last exit
    status. Empty when the program never started."""
    counts = program.get("counts") or {}
    if not counts or not program.get("starts"):
        return ""
    parts = [f"frames: {counts.get('lines_out', 0):,} out, {counts.get('lines_in', 0):,} in"]
    parts += [f"{label} {n:,}" for key, label in _BRIDGE_PROBLEMS if (n := counts.get(key))]
    last_exit = program.get("last_exit")
    if last_exit is not None:
        parts.append(f"last exit status {last_exit}{_killed_by(last_exit)}")
    return " · ".join(parts)


def _killed_by(status: Any) -> str:
    """`` (killed by SIGTERM)`` for a negative exit status (``Popen.returncode``'s way of
    saying a signal ended the process), else nothing."""
    if not isinstance(status, int) or status >= 0:
        return ""
    try:
        return f" (killed by {signal.Signals(-status).name})"
    except ValueError:
        return f" (killed by signal {-status})"


def _spawned_text(program: Mapping[str, Any]) -> str:
    starts = program.get("starts") or 0
    started = count_of(starts, "start")
    if program.get("registered"):
        # A registered program's problem: its supervisor gave up on it.
        then = f", then {problem}" if (problem := program.get("problem")) else ""
        if program.get("registered_as") is None:
            return f"{program['command']}: registered ({started}){then}"
        # The program's word: as long as a line may be (1 MiB). Cut as the log cuts it.
        registered_as = brief(program["registered_as"], 60)
        return f"{program['command']}: registered as {registered_as} ({started}){then}"
    return f"{program['command']}: did not start: {program.get('problem') or 'never registered'}"


def render_tree(tree: Mapping[str, Any]) -> str:
    """``kernel.describe()`` as indented text: one line per supervisor and agent.

    Small trees are listed in full. In large ones, agents that are idle with an empty
    mailbox are only counted, so the dump stays readable and shows what is busy or stuck.
    """
    agents = _count_agents(tree)
    full = agents <= _TREE_FULL_LIMIT
    lines: list[str] = []
    omitted = 0

    def visit(node: Mapping[str, Any], depth: int) -> None:
        nonlocal omitted
        pad = "  " * depth
        label = node.get("name") or node["id"]
        if node.get("kind") == "supervisor":
            lines.append(
                f"{pad}supervisor {label} [{node['state']}] strategy={node.get('strategy')} "
                f"restarts={node['restarts']} children={len(node.get('children', ()))}"
            )
            for child in node.get("children", ()):
                visit(child, depth + 1)
            return
        depth_now = node.get("mailbox_depth", 0)
        busy = node.get("handling") is not None
        if not full and not busy and not depth_now and node["state"] in ("idle", "running"):
            omitted += 1
            return
        if len(lines) >= _TREE_LINE_LIMIT:
            omitted += 1
            return
        handling = f" handling={node['handling']}" if busy else ""
        lines.append(
            f"{pad}agent {label} [{node['state']}] mailbox={depth_now}/"
            f"{node.get('mailbox_capacity')} restarts={node['restarts']}{handling}"
        )

    visit(tree, 0)
    if omitted:
        more = count_of(omitted, "more agent")
        lines.append(f"... {more} (idle with empty mailboxes, or past the limit)")
    return f"agent tree ({count_of(agents, 'agent')}):\n" + "\n".join(lines)


def _count_agents(node: Mapping[str, Any]) -> int:
    if node.get("kind") == "agent":
        return 1
    return sum(_count_agents(c) for c in node.get("children", ()))
