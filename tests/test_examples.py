"""Every file in examples/ runs: as a user runs it (a real process), with short arguments.

The set of example files is pinned: adding an example without a test here fails
``test_every_example_is_covered``, so none is left unrun by accident.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from nexus_trio import Message, MessageKind

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

# Python examples run as scripts, with the arguments that keep them short.
SCRIPTS: dict[str, list[str]] = {
    "ping_agent.py": [],
    "pipeline.py": ["--tasks", "12", "--fail-every", "3", "--rounds", "200", "--json"],
    "supervised.py": [],
    "pool.py": ["--users", "20", "--hits", "3"],
}
# Agents in other processes, spoken to over the NDJSON stdio protocol.
PROCESS_AGENTS = {"python_agent_example.py"}
# JavaScript examples run in the bridge tests, which need node (tests/test_bridge_agents.py).
RUN_BY_BRIDGE_TESTS = {
    "javascript_agent_example.js": ROOT / "tests" / "test_bridge_agents.py",
    # Agents written for the original Nexus bridge API, run under the kernel.
    "original_python_agent.py": ROOT / "tests" / "test_process_agents.py",
    "original_javascript_agent.js": ROOT / "tests" / "test_process_agents.py",
}

TIMEOUT = 120  # seconds; generous for a loaded machine, the examples take about one


def example_files() -> set[str]:
    return {
        p.name
        for p in EXAMPLES.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix in {".py", ".js"}
    }


def run_example(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=ROOT,
        check=False,
    )


def test_every_example_is_covered() -> None:
    covered = set(SCRIPTS) | PROCESS_AGENTS | set(RUN_BY_BRIDGE_TESTS)
    present = example_files()
    assert present - covered == set(), f"examples without a test here: {sorted(present - covered)}"
    assert covered - present == set(), (
        f"examples tested here but missing: {sorted(covered - present)}"
    )


def test_ping_agent_pings_and_shuts_down_cleanly() -> None:
    result = run_example("ping_agent.py")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert sum(line.startswith("system got pong from A") for line in lines) == 2
    assert sum(line.startswith("A got pong from B") for line in lines) == 2
    assert [line for line in lines if line.startswith("B got ping")] == [
        "B got ping #1 from A",
        "B got ping #2 from A",
    ]
    assert lines[-1].endswith("0 dead letters, 0 in flight"), lines[-1]


def test_pipeline_aggregates_every_task_once_despite_the_flaky_worker() -> None:
    result = run_example("pipeline.py", *SCRIPTS["pipeline.py"])
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["count"] == 12
    assert summary["complete"] and summary["correct"] and summary["conserved"]
    assert summary["gave_up"] == []
    # worker-2 crashes on every third task it takes: it was restarted and its tasks retried.
    # One retry per crash; the last restart may still be in its backoff at shutdown.
    assert 1 <= summary["restarts"] <= summary["retries"]
    assert summary["dead_letters"] == {"handler_error": summary["retries"]}
    assert sum(summary["per_worker"].values()) == 12
    assert "FlakyWorkerError" in result.stderr


def test_pipeline_rejects_bad_arguments_naming_the_flag() -> None:
    result = run_example("pipeline.py", "--tasks", "0")
    assert result.returncode == 2
    assert "--tasks" in result.stderr and "must be >= 1" in result.stderr


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--hits", "0"], "argument --hits: must be >= 1, got 0"),
        (["--users", "-1"], "argument --users: must be >= 1, got -1"),
    ],
)
def test_pool_rejects_bad_arguments_naming_the_flag(args: list[str], said: str) -> None:
    """Regression: ``pool.py --hits 0`` ended in a traceback (StopIteration, no session to
    find a worker of) and ``--users -1`` printed 'sessions: -1 users x 5 hits'."""
    result = run_example("pool.py", *args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert said in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_pipeline_reports_an_incomplete_result_with_exit_status_1() -> None:
    # One worker crashing on every other task, one attempt per task: some tasks are lost.
    result = run_example(
        "pipeline.py", "--workers", "1", "--fail-every", "2", "--max-attempts", "1", "--json"
    )
    assert result.returncode == 1
    summary = json.loads(result.stdout)
    assert summary["gave_up"] and not summary["complete"]
    assert summary["count"] + len(summary["gave_up"]) == 30


def test_pipeline_tries_each_task_as_often_as_max_attempts_says() -> None:
    # The only worker crashes on every task: each task is tried --max-attempts times, each
    # try a handler_error dead letter, each but the last followed by a retry, then given up
    # on (until the fifty-third pass the last try counted as a retry too: 3 * 2).
    result = run_example(
        "pipeline.py",
        *("--tasks", "3", "--workers", "1", "--fail-every", "1", "--max-attempts", "2"),
        *("--rounds", "10", "--json"),
    )
    assert result.returncode == 1, result.stderr
    summary = json.loads(result.stdout)
    assert summary["gave_up"] == [0, 1, 2]
    assert summary["count"] == 0
    assert summary["retries"] == 3 * (2 - 1)
    assert summary["dead_letters"] == {"handler_error": 3 * 2}
    assert summary["conserved"]
    assert result.stderr.count("failed 2 times; giving up") == 3, result.stderr


def test_pipeline_counts_no_retry_after_a_task_s_last_try() -> None:
    """Regression: with ``--max-attempts 1`` no task is tried twice, yet the summary said
    ``3 retried`` beside ``gave up on [0, 1, 2]``, and each failure was logged ``retrying``
    before ``failed 1 times; giving up``: the last try's failure counted as a retry."""
    result = run_example(
        "pipeline.py",
        *("--tasks", "3", "--workers", "1", "--fail-every", "1", "--max-attempts", "1"),
        *("--rounds", "10"),
    )
    assert result.returncode == 1, result.stderr
    summary_line = result.stdout.splitlines()[0]
    assert summary_line.startswith("0/3 tasks aggregated, total 0, 0 retried, "), summary_line
    assert summary_line.endswith(", gave up on [0, 1, 2], per worker {'worker-0': 0}")
    assert "retrying" not in result.stderr, result.stderr
    assert result.stderr.count("failed 1 time; giving up") == 3, result.stderr


async def test_pipeline_in_process() -> None:
    sys.path.insert(0, str(EXAMPLES))
    try:
        import pipeline  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(EXAMPLES))
    summary = await pipeline.run_pipeline(tasks=9, workers=3, fail_every=2, rounds=50)
    assert summary["count"] == 9
    assert summary["complete"] and summary["correct"] and summary["conserved"]
    assert summary["restarts"] >= 1


def test_supervised_example_runs() -> None:
    result = run_example("supervised.py", *SCRIPTS["supervised.py"])
    assert result.returncode == 0, result.stderr
    out = result.stdout
    # Four fetcher failures, each answered with RequestFailed, then rest_for_one after the
    # store's crash restarts store, cache and fetcher (the cache comes back empty).
    assert out.count("failed (handler_error), the fetcher restarts") == 4
    assert "restarts per agent: {'store': 1, 'cache': 1, 'fetcher': 5}" in out
    assert "after the store restart the cache holds 1 entry" in out
    assert "in flight 0" in out


def _frame(process: subprocess.Popen[str]) -> dict[str, Any]:
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line, "the agent closed stdout"
    frame: dict[str, Any] = json.loads(line)
    return frame


def test_python_agent_example_answers_over_the_stdio_protocol() -> None:
    process = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "python_agent_example.py")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        register = _frame(process)
        assert register["type"] == "register"
        agent_id = register["payload"]["id"]
        uuid.UUID(agent_id)
        assert process.stdin is not None
        answers = {}
        for payload in (
            {"operation": "add", "a": 40, "b": 2},
            {"operation": "divide", "a": 1, "b": 0},
        ):
            msg = Message(
                sender=uuid.uuid4(), to=uuid.UUID(agent_id), payload=payload, kind=MessageKind.QUERY
            )
            process.stdin.write(
                json.dumps({"type": "message", "payload": json.loads(msg.to_json())}) + "\n"
            )
            process.stdin.flush()
            response = _frame(process)
            assert response["type"] == "response"
            answers[payload["operation"]] = response["payload"]["payload"]
        assert answers["add"] == {"result": 42}
        assert answers["divide"]["code"] == "division_by_zero"
        process.stdin.write(json.dumps({"type": "shutdown", "payload": {}}) + "\n")
        process.stdin.flush()
        assert process.wait(timeout=TIMEOUT) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for stream in (process.stdin, process.stdout, process.stderr):
            if stream is not None:
                stream.close()


@pytest.mark.parametrize("name", sorted(RUN_BY_BRIDGE_TESTS))
def test_javascript_examples_are_run_by_the_bridge_tests(name: str) -> None:
    bridge_tests = RUN_BY_BRIDGE_TESTS[name]
    assert bridge_tests.exists(), f"{bridge_tests} (which runs examples/{name}) is missing"
    assert name in bridge_tests.read_text(), f"{bridge_tests.name} does not run examples/{name}"


def test_pipeline_service_runs_under_nexus_run() -> None:
    # What scripts/deploy.sh and the Dockerfile run: `nexus run --app pipeline:service`.
    result = subprocess.run(
        [
            *(sys.executable, "-m", "nexus_trio.cli", "run", "--app", "pipeline:service"),
            *("--duration", "3", "--log-format", "json"),
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=EXAMPLES,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = [
        json.loads(line)
        for line in result.stderr.splitlines()
        if line.startswith("{") and '"nexus_trio.app.pipeline"' in line
    ]
    assert jobs, result.stderr
    assert jobs[0]["msg"].startswith("job 1: 20/20 tasks"), jobs[0]
    assert all(job["level"] == "info" for job in jobs), jobs


def test_pool_example_keeps_users_on_one_worker_and_moves_few_when_growing() -> None:
    result = run_example("pool.py", *SCRIPTS["pool.py"])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == (
        "sessions: 20 users x 3 hits; one worker per user: True; every count reached 3: True"
    )
    grew = next(line for line in lines if line.startswith("grew sessions to 4 workers"))
    moved = int(grew.split(": ")[1].split(" of ")[0])
    assert 1 <= moved <= 10, grew  # about a quarter of 20, never most of them
    assert grew.endswith("users moved, to ['sessions/3']"), grew
    crunched = next(line for line in lines if line.startswith("crunchers (least loaded)"))
    jobs = ast.literal_eval(crunched.split("jobs per worker ")[1])
    assert sum(jobs.values()) == 30 and len(jobs) == 3, crunched
    assert "shrank crunchers to ['crunchers/0']" in lines
    assert lines[-1].endswith("0 dead letters, 0 in flight"), lines[-1]
