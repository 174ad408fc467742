"""``nexus run --workers N``: worker processes joined through a private nats-server."""

from __future__ import annotations

import pytest

from nexus_trio.cli._cluster_cmd import aggregate_summaries, run_workers

# worker_argv (the worker command line from the parsed options): tests/test_cli_workers.py


def test_summaries_add_up() -> None:
    a = {
        "agents": 10,
        "sent": 100,
        "handled": 90,
        "forwarded": 10,
        "msgs_per_s": 1000.0,
        "dead_letters_by_reason": {"no_such_agent": 1},
        "rejected": {},
        "elapsed_s": {"total": 2.0, "run": 1.0},
        "error": None,
        "conserved": True,
    }
    b = {**a, "sent": 50, "msgs_per_s": 500.0, "elapsed_s": {"total": 3.0}, "conserved": True}
    total = aggregate_summaries([a, b])
    assert (total["workers"], total["sent"], total["msgs_per_s"]) == (2, 150, 1500.0)
    assert total["dead_letters_by_reason"] == {"no_such_agent": 2}
    assert total["elapsed_s"]["total"] == 3.0
    assert total["conserved"] is True
    assert aggregate_summaries([a, {**b, "conserved": False, "error": "boom"}])["error"] == "boom"
    assert aggregate_summaries([])["conserved"] is False


def test_bad_worker_count_is_refused() -> None:
    with pytest.raises(ValueError, match="--workers"):
        run_workers(0, [])


def test_two_workers_run_the_demo_and_their_summaries_are_added_up() -> None:
    summary, status = run_workers(2, ["--agents", "20", "--duration", "1"])
    assert status == 0, summary
    assert summary["workers"] == 2
    assert summary["conserved"] is True
    assert summary["sent"] == sum(w["sent"] for w in summary["per_worker"]) > 0
    assert all(w["in_flight"] == 0 for w in summary["per_worker"])


def test_nexus_run_workers_prints_one_added_up_json_summary() -> None:
    import json
    import subprocess
    import sys

    argv = ["run", "--workers", "2", "-n", "20", "-d", "1", "--json"]
    result = subprocess.run(
        [sys.executable, "-m", "nexus_trio.cli", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["workers"] == 2
    assert summary["conserved"] is True
    assert summary["handled"] == sum(w["handled"] for w in summary["per_worker"]) > 0
