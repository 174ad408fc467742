"""``nexus run --workers N``: what the parent sets in a worker's environment is the worker's
alone, not inherited by what the worker's app starts (a tool, a nested ``nexus``).

Played by hand, as the other worker tests do: a one-process ``nexus run`` with the
worker's variables set, whose app starts a child that prints them and nested ``nexus
run`` commands. The worker's own reads (``nexus_trio.cli.worker_node``, its app's
``os.environ``) keep its name and the swarm's size.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from nexus_trio.cli._cluster_cmd import FOR_THE_WORKER, READY_FD_ENV, SWARM_ENV, WORKER_ENV

from .test_cli_workers import HANG_GUARD, pytestmark_linux, start_nexus, tagged_processes
from .test_cli_workers import tag as tag  # (the fixture)

#: an app that starts a child printing the worker's variables as it sees them, a nested
#: ``nexus run`` and a nested usage error, and writes what it saw to ``$SEEN_FILE``
CHILD_STARTING_APP = (
    f"NAMES = {FOR_THE_WORKER!r}\n"
    + """
import json, os, subprocess, sys

import trio

SHOW = "import json, os; print(json.dumps({n: os.environ.get(n) for n in " + repr(NAMES) + "}))"
NEXUS = [sys.executable, "-m", "nexus_trio.cli", "run"]


async def nested(argv):
    done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    return {"status": done.returncode, "out": done.stdout.decode(), "err": done.stderr.decode()}


async def main(kernel):
    from nexus_trio.cli import worker_node

    seen = {"own": {n: os.environ.get(n) for n in NAMES}, "node": worker_node()}
    child = await trio.run_process([sys.executable, "-c", SHOW], capture_stdout=True)
    seen["child"] = json.loads(child.stdout)
    copied = await trio.run_process(
        [sys.executable, "-c", SHOW], capture_stdout=True, env={**os.environ}
    )
    seen["copied"] = json.loads(copied.stdout)
    spawned = subprocess.run([sys.executable, "-c", SHOW], stdout=subprocess.PIPE, close_fds=False)
    seen["spawned"] = json.loads(spawned.stdout)
    seen["run"] = await nested([*NEXUS, "-n", "10", "-d", "0.2", "--json", "--no-live"])
    seen["usage"] = await nested([*NEXUS, "--no-such-flag"])
    with open(os.environ["SEEN_FILE"], "w") as file:
        json.dump(seen, file)
"""
)


def test_what_a_workers_app_starts_inherits_none_of_the_workers_variables(
    tmp_path: Path,
) -> None:
    """Regression (fifty-first pass): a process a worker's ``--app`` started inherited
    ``NEXUS_WORKER``, ``NEXUS_SWARM_SIZE`` and ``NEXUS_READY_FD``: a ``nexus run`` it
    started acted as worker-0 (its config line not said, a usage error labelled
    ``worker-0: ``, ``--workers`` refused, ...). A ``nexus`` process takes them out of
    what it passes on as it starts (as systemd's ``sd_listen_fds(unset_environment=1)``);
    the worker and its app still read its name and the swarm's size in ``os.environ``
    (docs/cli.md's contract: an app that picks its role by ``NEXUS_WORKER``), or ask
    ``nexus_trio.cli.worker_node()``. A child given an environment built from
    ``os.environ`` (``env={**os.environ}``, or ``subprocess``'s ``posix_spawn`` path,
    taken with ``close_fds=False``, which passes ``os.environ``) gets those two from it, as
    documented; ``NEXUS_READY_FD`` (internal) is out of ``os.environ`` too."""
    (tmp_path / "child_starting_app.py").write_text(CHILD_STARTING_APP, encoding="utf-8")
    seen_file = tmp_path / "seen.json"
    given = {WORKER_ENV: "worker-0", SWARM_ENV: "1", READY_FD_ENV: "999"}
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200", "SEEN_FILE": str(seen_file)}
    app = ["--app", "child_starting_app:main", "-d", "60", "--json", "--no-live"]
    proc = subprocess.run(
        [sys.executable, "-m", "nexus_trio.cli", "run", *app],
        cwd=tmp_path,
        env={**env, **given},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["stopped_by"] == "app finished"
    seen = json.loads(seen_file.read_text())
    assert seen["node"] == "worker-0"  # the worker's app asks for its name
    kept = {WORKER_ENV: "worker-0", SWARM_ENV: "1", READY_FD_ENV: None}
    assert seen["own"] == kept  # os.environ keeps the two an app may read
    assert seen["child"] == dict.fromkeys(FOR_THE_WORKER)  # its child: none of them
    assert seen["copied"] == kept  # env={**os.environ}: what os.environ holds
    assert seen["spawned"] == kept  # posix_spawn's: os.environ too
    run = seen["run"]
    assert run["status"] == 0, run["err"]
    summary = json.loads(run["out"])  # its summary on its stdout, alone
    assert summary["handled"] > 0
    assert summary["dead_letters"] == 0
    assert " nexus_trio.config " in run["err"]  # a one-process run says its config
    assert "worker-0" not in run["err"]
    usage = seen["usage"]
    assert usage["status"] == 2
    assert "No such option: --no-such-flag" in usage["err"]
    assert "worker-0" not in usage["err"]  # not labelled as a worker's


#: an app that says on standard error what it and a child it started see of the variables
SAYING_APP = (
    f"NAMES = {FOR_THE_WORKER!r}\n"
    + """
import os, sys

import trio

SHOW = "import os; print(*[os.environ.get(n) for n in " + repr(NAMES) + "])"


async def main(kernel):
    child = await trio.run_process([sys.executable, "-c", SHOW], capture_stdout=True)
    from nexus_trio.cli import worker_node

    own = worker_node()
    read = os.environ.get("NEXUS_WORKER")
    sys.stderr.write(f"TEST own {own} environ {read} child {child.stdout.decode().strip()}\\n")
"""
)


@pytestmark_linux
def test_a_real_workers_app_sees_its_name_and_its_child_sees_none(tag: str, tmp_path: Path) -> None:
    """The same through a real parent: ``nexus run -W 2``, whose workers' app each start a
    child. (On the fiftieth pass's code each child printed its worker's name and the
    swarm's size.)"""
    (tmp_path / "saying_app.py").write_text(SAYING_APP, encoding="utf-8")
    args = ["run", "-W", "2", "--app", "saying_app:main", "-d", "60", "--json", "--no-live"]
    proc = start_nexus(args, tag, tmp_path)
    out, err = proc.communicate(timeout=HANG_GUARD)
    assert proc.returncode == 0, err
    assert json.loads(out)["stopped_by"] == "app finished"
    said = sorted(line.partition("TEST ")[2] for line in err.splitlines() if "TEST own" in line)
    assert said == [  # os.environ["NEXUS_WORKER"] is the worker's name (docs/cli.md)
        "own worker-0 environ worker-0 child None None None",
        "own worker-1 environ worker-1 child None None None",
    ]
    assert tagged_processes(tag) == {}
