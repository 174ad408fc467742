"""The figures ``nexus run`` prints mean what they say: the rate is the run's (not diluted
by the shutdown), the last live frame shows the summary's rate and times, and ``--workers``
summaries have the rows of a single run's."""

from __future__ import annotations

import json
import re
import sys
import textwrap
from pathlib import Path

import pytest
from rich.console import Console

from nexus_trio._plural import fmt_count
from nexus_trio.cli import app
from nexus_trio.cli._cluster_cmd import aggregate_summaries
from nexus_trio.cli._view import summary_table
from tests.cli_runner import CliRunner

pytestmark = pytest.mark.usefixtures("restore_logging")
WIDE = {"COLUMNS": "200", "NO_COLOR": "1"}

#: 500 tells and one request handled during the run, then an on_stop that takes a while:
#: the shutdown is long and handles nothing, so a rate diluted by it is easy to tell apart
SLOW_STOP_APP = """
    import trio
    from nexus_trio import Agent

    class Counter(Agent):
        async def handle(self, ctx, msg):
            return "done" if msg.payload == "last" else None

        async def on_stop(self, ctx):
            await trio.sleep(0.2)  # the app's own slow cleanup: what the shutdown waits for

    async def main(kernel):
        kernel.spawn(Counter, name="counter")
        for i in range(500):
            await kernel.send("counter", i)
        assert await kernel.request("counter", "last") == "done"  # FIFO: all 500 handled
"""


@pytest.fixture
def slow_stop_app(isolated: Path) -> str:
    """The app above, written in an isolated directory (forgotten after the test)."""
    (isolated / "slow_stop_app.py").write_text(textwrap.dedent(SLOW_STOP_APP))
    sys.modules.pop("slow_stop_app", None)
    return "slow_stop_app:main"


def flat(text: str) -> str:
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def test_the_rate_is_the_runs_and_the_last_frame_shows_the_summarys_figures(
    slow_stop_app: str,
) -> None:
    result = CliRunner().invoke(app, ["run", "--app", slow_stop_app, "--live", "--json"], env=WIDE)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    elapsed = summary["elapsed_s"]
    assert elapsed["shutdown"] >= 0.2
    processed = summary["handled"] + summary["replies_delivered"] + summary["forwarded"]
    assert processed == 501 + 1  # 500 tells, the request, and its reply
    # everything was processed during the run: the rate is over the run's time only
    assert summary["msgs_per_s"] == pytest.approx(processed / elapsed["run"], rel=1e-9)
    frames = flat(result.stderr)
    final = frames[frames.rindex("nexus run · app") :]
    assert f"msg/s during run {fmt_count(summary['msgs_per_s'])}" in final
    assert f"done · run {elapsed['run']:.2f} s · total {elapsed['total']:.2f} s" in final


def test_the_summary_table_labels_the_rate_as_the_runs(slow_stop_app: str) -> None:
    result = CliRunner().invoke(app, ["run", "--app", slow_stop_app, "--no-live"], env=WIDE)
    assert result.exit_code == 0, result.output
    assert re.search(r"throughput [\d,]+ msg/s during run", flat(result.stdout))


def table_rows(summary: dict[str, object]) -> list[str]:
    console = Console(width=200, record=True, no_color=True)
    console.print(summary_table(summary))
    lines = [line.strip() for line in console.export_text().splitlines()]
    return [line.split("  ")[0] for line in lines if line and "nexus run summary" not in line]


def test_workers_summaries_have_the_rows_of_a_single_run(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    result = CliRunner().invoke(app, ["run", "-n", "10", "-d", "0.3", "--json"], env=WIDE)
    assert result.exit_code == 0, result.output
    single = json.loads(result.stdout)
    total = aggregate_summaries([single, single])
    # the rows of a single run, "sent" counted as what started on each worker, plus
    # the traffic between the workers and one line per worker
    single_rows = table_rows(single)
    rows = table_rows(total)
    assert [r for r in rows if r not in ("forwarded", "lost (counted)", "worker")] == [
        "sent (started here)" if r == "sent (accepted)" else r for r in single_rows
    ]
    assert rows.count("worker") == 2
    assert rows.index("forwarded") == rows.index("handled") + 1
    console = Console(width=200, record=True, no_color=True)
    console.print(summary_table(total))
    text = " ".join(console.export_text().split())
    assert f"run 2 workers: ring workload, {2 * single['agents']} agents" in text
    assert f"{fmt_count(2 * single['msgs_per_s'])} msg/s during run" in text
    latency = total["handle_latency"]
    assert latency["count"] == 2 * single["handle_latency"]["count"]
    assert latency["p99"] == single["handle_latency"]["p99"]


def test_workers_summaries_add_up_the_records_not_logged(tmp_path: Path, monkeypatch) -> None:
    """``--workers``: the dead letters and handler failures past their log limit that
    each worker counted (``dead_letter_lines_not_logged``, ``failure_lines_not_logged``)
    were left out of the total (its ``--json`` had neither key, its table neither row)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    result = CliRunner().invoke(app, ["run", "-n", "10", "-d", "0.3", "--json"], env=WIDE)
    assert result.exit_code == 0, result.output
    single = json.loads(result.stdout)
    first = single | {"dead_letter_lines_not_logged": 3, "failure_lines_not_logged": 5}
    second = single | {"dead_letter_lines_not_logged": 4, "failure_lines_not_logged": 0}
    total = aggregate_summaries([first, second])
    assert (total["dead_letter_lines_not_logged"], total["failure_lines_not_logged"]) == (7, 5)
    rows = table_rows(total)
    assert "dead letters not logged" in rows and "failures not logged" in rows
