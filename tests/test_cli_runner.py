"""The tests' :class:`tests.cli_runner.CliRunner` (one click command an app, built once)
answers as typer's own ``CliRunner``, which builds the command again at every invoke."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer.main
import typer.testing

from nexus_trio.cli import app
from tests.cli_runner import OWN_RUNNER, CliRunner, command_of

WIDE = {"COLUMNS": "300", "NO_COLOR": "1"}

#: help (which gives flags an empty metavar on the command it writes), usage errors of the
#: root, of a command and of a group's command, an unknown command, a value refused by a
#: callback, a command that runs and prints, a run refused before it starts
CASES = [
    ["--help"],
    ["run", "--help"],
    ["config", "--help"],
    ["nosuchcommand"],
    ["init"],
    ["run", "-n", "many"],
    ["run", "--json=1"],
    ["run", "-W", "2", "--node", "foo", "-d", "1"],
    ["config", "show"],
    ["version"],
    ["send", "", "1"],
    ["-n", "x"],
]


def answer(result: typer.testing.Result) -> tuple[object, ...]:
    return (
        result.exit_code,
        result.stdout,
        result.stderr,
        result.output,
        type(result.exception),
        result.return_value,
    )


@pytest.mark.parametrize("args", CASES, ids=" ".join)
def test_the_shared_command_answers_as_typers_runner_does(
    args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # (config show reads ./config.toml if there is one)
    expected = answer(typer.testing.CliRunner().invoke(app, args, env=WIDE))
    first = answer(CliRunner().invoke(app, args, env=WIDE))
    # after every case once on the same command (the help ones among them)
    for other in CASES:
        CliRunner().invoke(app, other, env=WIDE)
    again = answer(CliRunner().invoke(app, args, env=WIDE))
    assert first == expected
    assert again == expected


def test_the_command_is_built_once_for_each_app(monkeypatch: pytest.MonkeyPatch) -> None:
    """With typer's own runner (OWN_RUNNER: typer 0.26 and later) two invokes of an app
    build its command once; with an older typer's each invoke is typer's."""
    built: list[typer.Typer] = []
    build = typer.main.get_command

    def counted(typer_app: typer.Typer) -> object:
        built.append(typer_app)
        return build(typer_app)

    monkeypatch.setattr(typer.main, "get_command", counted)
    other = typer.Typer()

    @other.command()
    def hello(name: str) -> None:
        print(f"hello {name}")

    result = CliRunner().invoke(other, "world")
    assert (result.exit_code, result.output) == (0, "hello world\n")
    assert CliRunner().invoke(other, ["a", "b"]).exit_code == 2
    assert built == ([other] if OWN_RUNNER else [])
    assert command_of(app) is command_of(app)
    assert command_of(other) is command_of(other) is not command_of(app)
