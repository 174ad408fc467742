"""SIGUSR1 to the parent of ``nexus run --workers N``: each worker writes its agent tree.

Real processes (real time, generous bounds), as in ``test_cli_workers``.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

from .test_cli_workers import StderrLines, pytestmark_linux, signal_and_collect, start_nexus
from .test_cli_workers import tag as tag  # (the fixture)

pytestmark = pytestmark_linux


def wait_for(
    proc: subprocess.Popen[str], stderr: StderrLines, count: int, text: str, what: str
) -> None:
    deadline = time.monotonic() + 120
    while stderr.text().count(text) < count:
        assert proc.poll() is None, f"the run ended, status {proc.returncode}: {stderr.text()}"
        assert time.monotonic() < deadline, f"{what}: {stderr.text()}"
        time.sleep(0.1)


def test_sigusr1_to_the_workers_parent_writes_every_workers_tree_and_the_run_goes_on(
    tag: str, tmp_path: Path
) -> None:
    """The signal docs/cli.md gives for "why is it hung?" (`kill -USR1 <pid>`), sent to
    the process a service manager shows for a ``--workers`` run, its parent: unhandled
    there, its default action ended the run (status 138, no summary)."""
    proc = start_nexus(["run", "-W", "2", "-n", "20", "-d", "0", "--json"], tag, tmp_path)
    try:
        stderr = StderrLines(proc)
        wait_for(proc, stderr, 2, ": running ring workload", "the workers never ran")
        proc.send_signal(signal.SIGUSR1)
        wait_for(proc, stderr, 2, ": SIGUSR1: agent tree (10 agents):", "no tree written")
        text = stderr.text()
        assert "worker-0: SIGUSR1: agent tree (10 agents):" in text
        assert "worker-1: SIGUSR1: agent tree (10 agents):" in text
        assert proc.poll() is None
        out, err = signal_and_collect(proc, stderr, signal.SIGTERM, 120)
        assert proc.returncode == 0, err
        summary = json.loads(out)
        assert summary["stopped_by"] == "SIGTERM"
        assert summary["conserved"] is True
    finally:
        proc.kill()
