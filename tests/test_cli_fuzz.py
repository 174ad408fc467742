"""Hostile ``nexus run`` arguments: a bad value exits 2 with a message naming its flag,
never a traceback, and nothing starts."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from nexus_trio.cli import _cluster_cmd, app

pytestmark = pytest.mark.usefixtures("restore_logging", "isolated")
WIDE = {"COLUMNS": "300", "NO_COLOR": "1"}


def flat(text: str) -> str:
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def assert_usage_error(args: list[str], flag: str) -> str:
    result = CliRunner().invoke(app, ["run", *args], env=WIDE)
    output = flat(result.output)
    assert "Traceback" not in output, output
    assert result.exit_code == 2, output
    assert f"Invalid value for '{flag}'" in output, output
    return output


@pytest.mark.parametrize("value", ["inf", "Infinity", "1e400", "+inf"])
def test_an_infinite_rate_is_a_usage_error_naming_the_flag(value: str) -> None:
    output = assert_usage_error(["--rate", value, "-d", "0.1", "-n", "2"], "--rate")
    assert "finite" in output


def test_a_large_finite_rate_still_runs(isolated: Path) -> None:
    result = CliRunner().invoke(
        app, ["run", "--rate", "1e300", "-d", "0.1", "-n", "2", "--json"], env=WIDE
    )
    assert result.exit_code == 0, result.output


def test_a_config_path_too_long_to_look_up_exits_2_naming_it(isolated: Path) -> None:
    result = CliRunner().invoke(app, ["run", "-c", "a" * 5000, "-d", "0.1"], env=WIDE)
    assert result.exit_code == 2, (result.exception, flat(result.output)[:300])
    assert "File name too long" in flat(result.output)


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--metrics-host", " "], "--metrics-host"),
        (["--app", "nocolon"], "--app"),
        (["-n", str(10**30)], "--agents"),
        (["--spawn", "python 'oops"], "--spawn"),
        (["--spawn", "no-such-program-here"], "--spawn"),
        (["--nats", "not-a-url"], "--nats"),
    ],
)
@pytest.mark.parametrize("workers", ["-W", "--workers"])
def test_workers_are_not_started_when_a_flag_is_invalid(
    monkeypatch: pytest.MonkeyPatch, workers: str, args: list[str], flag: str
) -> None:
    started: list[int] = []

    def run_workers(count: int, *_args: object, **_kwargs: object) -> tuple[dict[str, Any], int]:
        started.append(count)
        return {}, 0

    monkeypatch.setattr(_cluster_cmd, "run_workers", run_workers)
    assert_usage_error([workers, "2", *args, "-d", "0.1"], flag)
    assert started == []


def test_workers_are_not_started_when_the_config_file_is_invalid(
    isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[int] = []
    monkeypatch.setattr(_cluster_cmd, "run_workers", lambda count, *a, **k: started.append(count))
    bad = isolated / "bad.toml"
    bad.write_text("[kernel]\nmailbox_capacity = 0\n")
    bad.chmod(0o644)
    result = CliRunner().invoke(app, ["run", "-W", "2", "-c", str(bad)], env=WIDE)
    assert result.exit_code == 2, flat(result.output)
    assert f"{bad}:2: [kernel] mailbox_capacity must be >= 1, got 0" in flat(result.output)
    assert started == []
