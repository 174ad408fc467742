"""The original Nexus command lines work as written: options without a command mean
``run`` (for ``nexus`` and ``nexus-runtime``), and the image's entrypoint takes both
``docker run IMAGE -n 100 -d 30`` and ``docker run IMAGE nexus-runtime -n 100 -d 30``.

There is no Docker daemon here: the docker tests build the command line docker would run
(ENTRYPOINT + the arguments, with the image's ENV) from the Dockerfile and run that.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from nexus_trio.cli import app
from nexus_trio.cli._app import default_to_run
from tests.cli_runner import CliRunner

from .test_install import examples_path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ROOT_OPTIONS = frozenset({"--help", "-h", "--version", "-V"})
pytestmark = pytest.mark.usefixtures("restore_logging")
WIDE = {"COLUMNS": "200", "NO_COLOR": "1"}


def invoke(args: list[str]):
    return CliRunner().invoke(app, args, env=WIDE)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ("-n 4 -d 10", "run -n 4 -d 10"),
        ("--generate-config FILE", "run --generate-config FILE"),
        ("--config FILE", "run --config FILE"),
        ("--config=FILE", "run --config=FILE"),
        ("nexus-runtime -n 100 -d 30", "run -n 100 -d 30"),
        ("nexus -n 100", "run -n 100"),
        ("nexus-runtime run -n 1", "run -n 1"),
        ("nexus-runtime", ""),
        ("run -n 1", "run -n 1"),
        ("version", "version"),
        ("--help", "--help"),
        ("-h", "-h"),
        ("--version", "--version"),
        ("-V", "-V"),
        ("nexus --version", "--version"),
        ("config show", "config show"),
        ("-- -n", "-- -n"),
        ("", ""),
    ],
)
def test_options_without_a_command_mean_run(argv: str, expected: str) -> None:
    assert default_to_run(shlex.split(argv), ROOT_OPTIONS) == shlex.split(expected)


@pytest.fixture
def captured_runs(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """``nexus run`` up to the point it would start the kernel: the RunOptions it built."""
    from nexus_trio.cli import _run

    runs: list[object] = []

    def execute_run(opts: object, **_: object) -> int:
        runs.append(opts)
        return 0

    monkeypatch.setattr(_run, "execute_run", execute_run)
    return runs


@pytest.mark.parametrize("program", [[], ["nexus-runtime"], ["nexus"]], ids=repr)
def test_the_originals_command_lines_reach_run_with_their_values(
    program: list[str], isolated: Path, captured_runs: list[object]
) -> None:
    result = invoke([*program, "-n", "4", "-d", "10"])
    assert result.exit_code == 0, result.output
    (opts,) = captured_runs
    assert (opts.agents, opts.duration, opts.workload, opts.demo) == (4, 10.0, "ring", True)  # type: ignore[attr-defined]
    (isolated / "nexus.toml").write_text("[app]\nagents = 12\n")
    result = invoke([*program, "--config", "nexus.toml"])
    assert result.exit_code == 0, result.output
    assert captured_runs[-1].agents == 12  # type: ignore[attr-defined]


@pytest.mark.parametrize("program", ["nexus", "nexus-runtime"])
@pytest.mark.parametrize(
    ("args", "example"),
    [
        ([], "run --agents 1000 --duration 10"),
        (["run"], "config init FILE writes every key"),
        (["bench"], "bench --quick"),
        (["send"], 'send "python3 examples/python_agent_example.py"'),
    ],
    ids=lambda value: " ".join(value) if isinstance(value, list) else None,
)
def test_the_help_s_examples_name_the_program_that_was_run(
    program: str, args: list[str], example: str
) -> None:
    """Forty-sixth pass: ``nexus-runtime --help`` showed its examples as ``nexus ...``;
    each help page's examples now name the program as it was invoked (``nexus`` for
    ``python -m nexus_trio.cli``). (Fails on f647f8e for nexus-runtime: ``nexus run``.)"""
    result = CliRunner().invoke(app, [*args, "--help"], env=WIDE, prog_name=program)
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert f"{program} {example}" in said
    other = "nexus-runtime" if program == "nexus" else "nexus"
    assert f" {other} {example}" not in said


def test_generate_config_without_run_writes_the_template(isolated: Path) -> None:
    result = invoke(["--generate-config", "nexus.toml"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"wrote {isolated / 'nexus.toml'}"
    assert "[kernel]" in (isolated / "nexus.toml").read_text()
    again = invoke(["nexus-runtime", "--generate-config", "other.toml"])
    assert again.exit_code == 0, again.output
    assert (isolated / "other.toml").exists()


def test_config_without_run_runs_what_the_file_says(isolated: Path) -> None:
    (isolated / "nexus.toml").write_text("[app]\nagents = 7\nduration = 0.3\n")
    result = CliRunner().invoke(app, ["--config", "nexus.toml", "--json"], env=WIDE)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["workload"], summary["agents"], summary["stopped_by"]) == (
        "ring",
        7,
        "duration",
    )
    assert summary["conserved"] is True


def test_root_help_version_and_commands_still_work(isolated: Path) -> None:
    for args in (["--help"], ["-h"]):
        result = invoke(args)
        assert result.exit_code == 0
        assert "Usage: nexus [OPTIONS] COMMAND [ARGS]..." in result.output
    for args in (["--version"], ["-V"], ["version"], ["nexus", "version"]):
        result = invoke(args)
        assert result.exit_code == 0, args
        assert result.output.startswith("nexus_trio "), args
    run_help = invoke(["-n", "4", "--help"])
    assert run_help.exit_code == 0
    assert "Usage: nexus run [OPTIONS]" in run_help.output
    show = invoke(["config", "show"])
    assert show.exit_code == 0 and "mailbox_capacity" in show.output


def test_an_unknown_option_without_a_command_is_an_error_of_run(isolated: Path) -> None:
    result = invoke(["--agentz", "4"])
    assert result.exit_code == 2
    out = " ".join(result.output.split())
    assert "Usage: nexus run [OPTIONS]" in out
    assert "No such option: --agentz" in out


# --- real processes: nexus-runtime as installed, and as the image runs it ---------------------


def run_summary(argv: list[str], env: dict[str, str], cwd: Path) -> dict[str, object]:
    result = subprocess.run(
        argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    summary: dict[str, object] = json.loads(result.stdout)
    return summary


def clean_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
    env.update(WIDE, XDG_CONFIG_HOME=str(tmp_path / "xdg"))
    return env


def test_nexus_runtime_with_options_only_runs_the_demo(tmp_path: Path) -> None:
    summary = run_summary(
        [str(BIN / "nexus-runtime"), "-n", "4", "-d", "1", "--json"], clean_env(tmp_path), tmp_path
    )
    assert (summary["workload"], summary["agents"], summary["stopped_by"]) == (
        "ring",
        4,
        "duration",
    )
    assert summary["handled"] and summary["conserved"] is True


def last_stage(dockerfile: str) -> dict[str, list[str]]:
    """Instructions of the Dockerfile's last stage, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", dockerfile)
    found: dict[str, list[str]] = {}
    for line in re.split(r"^FROM ", text, flags=re.M)[-1].splitlines():
        if line.strip() and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            found.setdefault(keyword.upper(), []).append(rest.strip())
    return found


@pytest.mark.parametrize(
    "docker_args",
    [["-n", "100", "-d", "1"], ["nexus-runtime", "-n", "100", "-d", "1"]],
    ids=" ".join,
)
def test_docker_run_image_with_the_originals_arguments_runs_the_demo(
    docker_args: list[str], tmp_path: Path
) -> None:
    """``docker run IMAGE ARGS`` runs ENTRYPOINT + ARGS (ARGS replace CMD) with the ENV."""
    stage = last_stage((ROOT / "Dockerfile").read_text())
    entrypoint = json.loads(stage["ENTRYPOINT"][-1])
    assert entrypoint == ["nexus-runtime"]
    env = clean_env(tmp_path)
    for assignment in shlex.split(" ".join(stage["ENV"])):
        key, _, value = assignment.partition("=")
        env[key] = value.replace("$PATH", env.get("PATH", ""))
    env["PATH"] = os.pathsep.join([str(BIN), os.environ.get("PATH", "")])
    env["NEXUS_METRICS__PORT"] = "0"  # the image's 9464 may be taken on this machine
    env["PYTHONPATH"] = examples_path()
    argv = [str(BIN / entrypoint[0]), *entrypoint[1:], *docker_args, "--json"]
    summary = run_summary(argv, env, tmp_path)
    # the demo the arguments ask for, not the image's default service
    assert (summary["app"], summary["workload"], summary["agents"]) == (None, "ring", 100)
    assert summary["stopped_by"] == "duration"
    assert summary["conserved"] is True
