"""``nexus run --types MODULE:ATTR`` (``[app] types``): agent types registered before the node
joins the cluster.

An app run by ``nexus run --nats``/``--workers`` gets a kernel the CLI already joined; a
``cluster_of(kernel).register_type(...)`` in its ``main`` comes after the join, so a
member that places an agent of the type on it at once gets ``UnknownAgentType``. The
types ``--types`` names go to ``join_cluster(..., types=...)`` instead. Their checks (a
mapping, type names, specs) run in the parent before any worker starts, as ``--app``'s.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from nexus_trio import Agent, Context, Message, agent, open_kernel
from nexus_trio.cli import _cluster_cmd, _run, app
from tests.cli_runner import CliRunner

from .nats_server import PATIENT, node_config
from .test_cli_workers import parse_run

WIDE = {"COLUMNS": "300", "NO_COLOR": "1"}

TYPES_MODULE = """
from nexus_trio import Agent, Supervisor, agent


@agent
class Counter(Agent):
    async def handle(self, ctx, msg):
        return 1


class Plain(Agent):
    async def handle(self, ctx, msg):
        return 2


async def handler(ctx, msg):
    return 3


def sync_handler(ctx, msg):
    return 4


TYPES = {"counter": Counter, "plain": Plain, "fn": handler}
OTHER = {"other": Counter}
LIST = [Counter]
EMPTY = {}
DOTTED = {"a.b": Counter}
NUMBERED = {1: Counter}
NUMBER = {"counter": 3}
HANDLER = {"counter": sync_handler}
SUPERVISOR = {"counter": Supervisor(children=[Counter])}
"""


def flat(text: str) -> str:
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch, isolated: Path, restore_logging: None) -> list[Any]:
    """What ``nexus run`` would have started: a swarm (its worker count) or a run (its
    options); neither starts. ``types_app.py`` is in the current directory."""
    (isolated / "types_app.py").write_text(TYPES_MODULE, encoding="utf-8")
    seen: list[Any] = []

    def run_workers(workers: int, *_args: object, **_kwargs: object) -> tuple[dict, int]:
        seen.append(workers)
        return {"workers": workers, "log_records_lost": 0, "log_calls_failed": 0}, 0

    def execute_run(opts: _run.RunOptions, **_kwargs: object) -> int:
        seen.append(opts)
        return 0

    monkeypatch.setattr(_cluster_cmd, "default_workers", lambda: 2)
    monkeypatch.setattr(_cluster_cmd, "run_workers", run_workers)
    monkeypatch.setattr(_run, "execute_run", execute_run)
    monkeypatch.delenv(_cluster_cmd.WORKER_ENV, raising=False)
    return seen


def invoke(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["run", *args], env=WIDE)
    return result.exit_code, flat(result.output)


CLUSTERS = {"workers": ["-W", "2"], "nats": ["--nats", "nats://127.0.0.1:1"]}


@pytest.mark.parametrize("cluster", sorted(CLUSTERS))
@pytest.mark.parametrize(
    ("attr", "expected"),
    [
        pytest.param(*case, id=case[0] or "no-attribute")
        for case in [
            (
                "LIST",
                "types_app:LIST must be a mapping of agent type names to AgentSpecs (@agent) or"
                " Agent subclasses, e.g. {'counter': Counter}; got list [AgentSpec(",
            ),
            ("EMPTY", "types_app:EMPTY is an empty mapping: no agent type to register"),
            (
                "DOTTED",
                "types_app:DOTTED: agent type 'a.b' must be letters, digits, '-' or '_' (it is part"
                " of NATS subjects)",
            ),
            ("NUMBERED", "types_app:NUMBERED: agent type 1 is of type int, not a str"),
            (
                "NUMBER",
                "types_app:NUMBER: agent type 'counter' is int 3; expected an AgentSpec (@agent) or"
                " an Agent subclass",
            ),
            (
                "HANDLER",
                "types_app:HANDLER: agent type 'counter' is sync_handler, a handler that is no"
                " coroutine: use async def",
            ),
            (
                "SUPERVISOR",
                "types_app:SUPERVISOR: agent type 'counter' is a Supervisor: a placed agent is one"
                " agent, given by its AgentSpec (@agent) or Agent subclass",
            ),
            ("MISSING", "module 'types_app' has no attribute 'MISSING'"),
            ("", "must look like 'package.module:attr', got 'types_app:'"),
        ]
    ],
)
def test_types_that_are_no_mapping_of_names_to_specs_are_refused_naming_types_before_a_start(
    started: list[Any], cluster: str, attr: str, expected: str
) -> None:
    code, out = invoke([*CLUSTERS[cluster], "-d", "1", "--json", "--types", f"types_app:{attr}"])
    assert code == 2, out
    assert f"Invalid value for '--types': {expected}" in out
    assert started == []


@pytest.mark.parametrize("cluster", sorted(CLUSTERS))
def test_types_from_the_flag_or_the_config_reach_the_run_the_flag_first(
    started: list[Any], isolated: Path, cluster: str
) -> None:
    code, out = invoke([*CLUSTERS[cluster], "-d", "1", "--json", "--types", "types_app:TYPES"])
    assert code == 0, out
    (isolated / "config.toml").write_text('[app]\ntypes = "types_app:OTHER"\n')
    code, out = invoke([*CLUSTERS[cluster], "-d", "1", "--json"])
    assert code == 0, out
    code, out = invoke([*CLUSTERS[cluster], "-d", "1", "--json", "--types", "types_app:TYPES"])
    assert code == 0, out
    if cluster == "workers":  # (the workers take the flag, or read the same config)
        assert started == [2, 2, 2]
        return
    # a plain async handler is a type as kernel.spawn takes it ("fn")
    assert [sorted(opts.types) for opts in started] == [
        ["counter", "fn", "plain"],
        ["other"],
        ["counter", "fn", "plain"],
    ]
    # a node given types hosts placed agents: no demo workload next to them
    assert [opts.demo for opts in started] == [False, False, False]


def test_types_in_the_config_that_are_no_mapping_are_refused_naming_the_key(
    started: list[Any], isolated: Path
) -> None:
    (isolated / "config.toml").write_text('[app]\ntypes = "types_app:LIST"\n')
    code, out = invoke(["-W", "2", "-d", "1", "--json"])
    assert code == 2, out
    config = isolated / "config.toml"
    assert f"Invalid value for [app] types (file {config}): types_app:LIST must be a mapping" in out
    (isolated / "config.toml").write_text('[app]\ntypes = "nocolon"\n')
    code, out = invoke(["-W", "2", "-d", "1", "--json"])
    assert code == 2, out
    assert "config.toml:2: [app] types must look like 'package.module:attr', got \"nocolon\"" in out
    assert started == []


def test_types_without_a_cluster_are_a_usage_error_naming_the_flag_or_the_key(
    started: list[Any], isolated: Path
) -> None:
    needs = (
        "needs --nats URL or --workers N (or [nats] url in the config): agent types are for"
        " placements from other members of a cluster"
    )
    code, out = invoke(["-d", "1", "--types", "types_app:TYPES"])
    assert code == 2, out
    assert f"Invalid value for '--types': {needs}" in out
    (isolated / "config.toml").write_text('[app]\ntypes = "types_app:TYPES"\n')
    code, out = invoke(["-d", "1"])
    assert code == 2, out
    assert f"Invalid value for [app] types (file {isolated / 'config.toml'}): {needs}" in out
    assert started == []
    # [nats] url is a cluster (the run joins it)
    (isolated / "config.toml").write_text(
        '[app]\ntypes = "types_app:TYPES"\n[nats]\nurl = "nats://127.0.0.1:1"\n'
    )
    code, out = invoke(["-d", "1"])
    assert code == 0, out
    assert [sorted(opts.types) for opts in started] == [["counter", "fn", "plain"]]


def test_the_workers_get_the_types_flag_on_their_command_line() -> None:
    ctx = parse_run(["-W", "2", "--types", "m:TYPES", "--app", "m:main"])
    argv = _cluster_cmd.worker_argv(ctx)
    assert argv == ["--app=m:main", "--types=m:TYPES"]
    assert parse_run(argv).params["types_ref"] == "m:TYPES"


# --- real runs: nats-server, worker processes ----------------------------------------------------

#: Each worker places PLACED counters on the other worker as soon as it is a member, then
#: names an agent ``placed-by-<node>``; the worker waits until the other did the same (or
#: left: it placed all it would), so every placement on it came before the code below.
#: With TYPES_IN_MAIN set, only then does it register the type, as an app without
#: --types can: after the join. Each worker asks each counter it placed once, waits until
#: it answered the other's questions, and prints what it saw.
PLACING_APP = """
import os
import sys

import trio

from nexus_trio import Agent, agent
from nexus_trio.nats import UnknownAgentType, cluster_of

PLACED = 5


@agent
class Counter(Agent):
    def __init__(self):
        self.count = 0

    async def handle(self, ctx, msg):
        self.count += 1
        return self.count


TYPES = {"counter": Counter}


@agent
async def marker(ctx, msg):
    return None


async def until(condition):
    while not condition():
        await trio.sleep(0.01)


async def main(kernel):
    cluster = cluster_of(kernel)
    me = cluster.node
    other = "worker-1" if me == "worker-0" else "worker-0"
    await until(lambda: other in cluster.live_nodes())
    placed = refused = 0
    for i in range(PLACED):
        try:
            await cluster.spawn("counter", name=f"{me}-{i}", node=other, timeout=30)
            placed += 1
        except UnknownAgentType:
            refused += 1
    kernel.spawn(marker, name=f"placed-by-{me}")
    await until(
        lambda: cluster.name_holder(f"placed-by-{other}") is not None
        or other not in cluster.live_nodes()
    )
    if os.environ.get("TYPES_IN_MAIN"):
        cluster.register_type("counter", Counter)
    answers = [await kernel.request(f"{me}-{i}", "hi", timeout=30) for i in range(placed)]
    hosted = sum(kernel.is_local(f"{other}-{i}") for i in range(PLACED))
    await until(lambda: kernel.stats().handled >= hosted)
    # one write: two workers share standard error, and print() writes the line and its
    # end separately (another worker's line could come between them)
    sys.stderr.write(f"{me}: placed {placed}, refused {refused}, answers {answers}, hosted {hosted}\\n")
"""


def run_placing_workers(tmp_path: Path, args: list[str], **env: str) -> tuple[dict, list[str]]:
    (tmp_path / "placing.py").write_text(PLACING_APP, encoding="utf-8")
    environ = {**os.environ, "NO_COLOR": "1", **env}
    environ.pop(_cluster_cmd.WORKER_ENV, None)
    argv = [sys.executable, "-m", "nexus_trio.cli", "run", "-W", "2", "--app", "placing:main"]
    result = subprocess.run(
        [*argv, *args, "--json", "--no-live"],
        cwd=tmp_path,
        env=environ,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    # (each worker's line found wherever it is: the workers share standard error)
    lines = sorted(re.findall(r"worker-\d+: placed .*?hosted \d+", result.stderr))
    return json.loads(result.stdout), lines


@pytest.mark.parametrize("given", ["--types", "[app] types"])
def test_two_workers_placing_on_each_other_at_start_all_land_with_types(
    tmp_path: Path, given: str
) -> None:
    """Every placement lands although the worker it lands on never registers the type
    itself: ``--types`` (or ``[app] types``) registered it when the worker joined."""
    if given == "--types":
        args = ["--types", "placing:TYPES"]
    else:
        (tmp_path / "config.toml").write_text('[app]\ntypes = "placing:TYPES"\n')
        args = []
    summary, lines = run_placing_workers(tmp_path, args)
    assert lines == [
        "worker-0: placed 5, refused 0, answers [1, 1, 1, 1, 1], hosted 5",
        "worker-1: placed 5, refused 0, answers [1, 1, 1, 1, 1], hosted 5",
    ]
    assert summary["workers_died"] == []
    assert summary["stopped_by"] == "app finished"
    assert summary["agents"] == 2 * (5 + 1)  # the counters each hosts, and its marker
    assert (summary["handled"], summary["replies_delivered"]) == (10, 10)
    assert summary["conserved"] is True


def test_without_types_a_placement_before_main_registers_the_type_is_refused(
    tmp_path: Path,
) -> None:
    """The race ``--types`` closes, made certain: a type registered in ``main`` (after
    the join) is unknown to a placement that comes before that line."""
    summary, lines = run_placing_workers(tmp_path, [], TYPES_IN_MAIN="1")
    assert lines == [
        "worker-0: placed 0, refused 5, answers [], hosted 0",
        "worker-1: placed 0, refused 5, answers [], hosted 0",
    ]
    assert summary["agents"] == 2  # the markers alone
    assert summary["handled"] == 0
    assert summary["conserved"] is True


HOST_TYPES = """
from nexus_trio import Agent, agent


@agent
class Counter(Agent):
    def __init__(self):
        self.count = 0

    async def handle(self, ctx, msg):
        self.count += 1
        return self.count


TYPES = {"counter": Counter}
"""


@agent
class Counter(Agent):
    """The test's own kernel runs the names that hash to it (HOST_TYPES's twin)."""

    def __init__(self) -> None:
        self.count = 0

    async def handle(self, ctx: Context, msg: Message) -> int:
        self.count += 1
        return self.count


TYPES = {"counter": Counter}


async def test_a_node_given_only_types_hosts_placed_agents_and_runs_no_demo(
    nats: Any, tmp_path: Path
) -> None:
    """``nexus run --nats URL --types ...`` without ``--app``: a node that hosts placed
    agents of those types (a demo workload next to them would be noise in the cluster)."""
    from nexus_trio._nats import join_cluster

    (tmp_path / "host_types.py").write_text(HOST_TYPES, encoding="utf-8")
    argv = [sys.executable, "-m", "nexus_trio.cli", "run", "--nats", nats.url, "--node", "host"]
    environ = {**os.environ, "NO_COLOR": "1"}
    environ.pop(_cluster_cmd.WORKER_ENV, None)
    proc = subprocess.Popen(
        [*argv, "--types", "host_types:TYPES", "--json", "--no-live"],
        cwd=tmp_path,
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Patient: the test is not about the detector, and on a loaded machine the host
        # process (starting up, or stalled) was silent for longer than FAST's 0.6 s now
        # and then: the placer judged it lost and the pinned spawn failed. PATIENT's 2 s
        # was not enough either (a whole-suite run at load 20-54: lost after 2.1 s of
        # silence): the host heartbeats at the CLI's default, once a second, so 2 s is
        # two missed heartbeats. 30 s: the placer's heartbeats stay PATIENT's
        patient = attrs.evolve(PATIENT, missed_heartbeats=150)
        async with (
            open_kernel(node_config()) as kernel,
            join_cluster(kernel, nats.url, "placer", options=patient, types=TYPES) as cluster,
        ):
            with trio.fail_after(60):  # the process joins (membership comes with heartbeats)
                while "host" not in cluster.live_nodes():
                    assert proc.poll() is None, proc.communicate()
                    await trio.sleep(0.05)
            placed = [await cluster.spawn("counter", name=f"c-{i}", timeout=30) for i in range(3)]
            placed += [await cluster.spawn("counter", name="c-pinned", node="host", timeout=30)]
            on_host = [p.name for p in placed if p.node == "host"]
            assert "c-pinned" in on_host
            for name in on_host:
                assert await kernel.request(name, "hi", timeout=30) == 1
            await kernel.shutdown()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "as host (agent types: counter)" in err
    summary = json.loads(out)
    assert (summary["app"], summary["workload"]) == (None, None)
    assert summary["stopped_by"] == "SIGTERM"
    assert summary["agents"] == len(on_host)
    assert summary["handled"] == len(on_host)
    assert summary["conserved"] is True
