"""The first hour with ``nexus``: ``--app`` mistakes are usage errors that say what is
wrong and where, help reads the same everywhere, and shell completion works."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import typer

from nexus_trio.cli import app
from tests.cli_runner import CliRunner

WIDE = {"COLUMNS": "250", "NO_COLOR": "1"}
BIN = Path(sys.executable).parent


def invoke(args: list[str]):
    return CliRunner().invoke(app, args, env=WIDE)


def flat(text: str) -> str:
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def write(directory: Path, name: str, source: str) -> None:
    (directory / name).write_text(textwrap.dedent(source))


# --- --app checked before the kernel starts -----------------------------------------------------


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (
            "async def main():\n    pass\n",
            "main() cannot be called as main(kernel): nexus run passes the kernel, "
            "so it must be 'async def main(kernel)'",
        ),
        (
            "async def main(kernel, options):\n    pass\n",
            "main(kernel, options) cannot be called as main(kernel)",
        ),
        (
            "def main(kernel):\n    pass\n",
            "main is a plain function ('def'); nexus run awaits it: "
            "expected 'async def main(kernel)'",
        ),
        (
            # an agent handler without @agent: was told to become 'async def main(kernel)'
            "async def main(ctx, msg):\n    return msg.payload\n",
            "main(ctx, msg) is an agent handler without @agent: decorate it with @agent"
            " (nexus run spawns it), or give an 'async def main(kernel)'",
        ),
    ],
    ids=["no-argument", "two-arguments", "not-async", "handler-without-agent"],
)
def test_a_main_of_the_wrong_shape_is_a_usage_error_naming_the_expected_signature(
    isolated: Path, source: str, expected: str
) -> None:
    write(isolated, "shape_app.py", source)
    result = invoke(["run", "--app", "shape_app:main", "-d", "1"])
    assert result.exit_code == 2
    out = flat(result.output)
    assert f"Invalid value for '--app': {expected}" in out
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (
            "class Echo(Agent):\n    def handle(self, ctx, msg):\n        return 1\n\n\n"
            "main = Echo\n",
            "Echo.handle is a plain function ('def'); the kernel awaits it: write"
            " 'async def handle(self, ctx, msg)'",
        ),
        (
            "class Echo(Agent):\n    def on_start(self, ctx):\n        pass\n\n"
            "    async def handle(self, ctx, msg):\n        return 1\n\n\nmain = Echo\n",
            "Echo.on_start is a plain function ('def'); the kernel awaits it: write"
            " 'async def on_start(self, ctx)'",
        ),
        (
            "class Echo(Agent):\n    async def handle(self, ctx, msg):\n        return 1\n\n\n"
            "class Bad(Agent):\n    def on_stop(self, ctx):\n        pass\n\n\n"
            "main = [Echo, Bad]\n",
            "item 1 of the list: Bad.on_stop is a plain function ('def'); the kernel awaits it: write"
            " 'async def on_stop(self, ctx)'",
        ),
    ],
    ids=["handle", "on-start", "in-a-list"],
)
def test_an_agent_class_with_a_plain_def_hook_is_a_usage_error_before_the_run(
    isolated: Path, source: str, expected: str
) -> None:
    """Regression: an Agent subclass given to --app was spawned unchecked, so a 'def
    handle' (or on_start) failed inside the run: exit 1 with a traceback from
    nexus_trio/cli/_run.py, where cli.md promises a usage error before the kernel starts."""
    write(isolated, "class_app.py", "from nexus_trio import Agent\n\n\n" + source)
    result = invoke(["run", "--app", "class_app:main", "-d", "1"])
    assert result.exit_code == 2, result.output
    out = flat(result.output)
    assert f"Invalid value for '--app': {expected}" in out
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("main", "expected"),
    [
        ("[echo, echo]", "to item 0 of the list and to item 1 of the list"),
        (
            "[Supervisor(name='s', children=[echo]), echo.with_options(restart='transient')]",
            "to child 0 of supervisor s and to item 1 of the list",
        ),
        (
            "Supervisor(name='top', children=[echo, Supervisor(name='in', children=[echo])])",
            "to child 0 of supervisor top and to child 0 of supervisor in",
        ),
        ("[Supervisor(name='echo', children=[]), echo]", "to item 0 of the list and to item 1"),
    ],
    ids=["list", "supervisor-and-list", "nested-supervisors", "supervisor-named-so"],
)
def test_a_name_given_twice_in_the_app_is_a_usage_error_before_the_run(
    isolated: Path, main: str, expected: str
) -> None:
    """Regression: ``--app`` naming a list (or a supervisor tree) in which one agent name
    is given twice started the run and spawned the first; the second failed with
    ``NameTaken`` (exit 1, a traceback from nexus_trio/cli/_run.py). It is refused before
    anything starts now, naming both places and how to rename one."""
    write(
        isolated,
        "twice_app.py",
        "from nexus_trio import Supervisor, agent\n\n\n"
        "@agent(name='echo')\nasync def echo(ctx, msg):\n    return msg.payload\n\n\n"
        f"main = {main}\n",
    )
    result = invoke(["run", "--app", "twice_app:main", "-d", "1"])
    assert result.exit_code == 2, result.output
    out = flat(result.output)
    assert f"Invalid value for '--app': the name 'echo' is given twice, {expected}" in out
    assert "a name is unique in a kernel; give one of them another, e.g." in out
    assert "spec.with_options(name='echo-2')" in out
    assert "Traceback" not in result.output


def test_a_list_of_agent_classes_is_spawned_in_order(isolated: Path) -> None:
    """A list may hold Agent subclasses, as one Agent subclass and a Supervisor's children
    may: it was refused as 'must be an AgentSpec ..., a list of AgentSpecs/Supervisors'."""
    write(
        isolated,
        "classes_app.py",
        """\
        from nexus_trio import Agent, agent


        class Echo(Agent):
            async def handle(self, ctx, msg):
                return msg.payload


        @agent(name="named")
        class Named(Agent):
            async def handle(self, ctx, msg):
                return msg.payload


        main = (Echo, Named)
        """,
    )
    result = invoke(["run", "--app", "classes_app:main", "--json", "--no-live", "-d", "0.2"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["app"] == "classes_app:main"
    assert summary["agents"] == 2
    assert summary["error"] is None


def test_a_main_with_optional_extra_parameters_is_accepted(isolated: Path) -> None:
    write(isolated, "optional_app.py", "async def main(kernel, rounds=1, *rest):\n    pass\n")
    result = invoke(["run", "--app", "optional_app:main", "--json", "--no-live"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    ("source", "where", "what"),
    [
        ('import json\nX = 1\nconfig = json.loads("{bad")\n', ":3:", "JSONDecodeError:"),
        ("x = (\n", ":1:", "SyntaxError: '(' was never closed"),
        ("import os\nimport not_installed_dep_xyz\n", ":2:", "No module named 'not_installed"),
        ("def helper():\n    raise RuntimeError('no key')\n\nhelper()\n", ":2:", "RuntimeError"),
        (
            # raised inside nexus_trio (not in site-packages when installed with -e / from
            # a checkout): was named as the place, not the app's line that called it
            "from nexus_trio import agent\n\n\n@agent(name='e')\ndef main(ctx, msg):\n"
            "    return 1\n",
            ":4:",
            "TypeError: @agent needs an 'async def handler(ctx, msg)'; main is a plain"
            " function ('def'): write 'async def main(ctx, msg)'",
        ),
        (
            # raised in the __init__ attrs generates for Supervisor (a file named
            # '<attrs generated methods ...>'): was named as the place, not the app's line
            "from nexus_trio import Agent, Supervisor\n\n\nclass C(Agent):\n"
            "    def handle(self, ctx, msg):\n        return 1\n\n\n"
            "main = Supervisor(name='s', children=[C])\n",
            ":9:",
            "TypeError: Supervisor children[0]: C.handle is a plain function ('def')",
        ),
    ],
    ids=[
        "library-raises",
        "syntax",
        "missing-dependency",
        "own-function",
        "nexus-trio-raises",
        "generated-code-raises",
    ],
)
def test_an_error_while_importing_the_app_names_its_file_and_line(
    isolated: Path, source: str, where: str, what: str
) -> None:
    write(isolated, "broken_app.py", source)
    result = invoke(["run", "--app", "broken_app:main", "-d", "1"])
    assert result.exit_code == 2
    out = flat(result.output)
    path = isolated / "broken_app.py"
    assert f"importing 'broken_app' failed at {path}{where} {what}" in out


# --- help -----------------------------------------------------------------------------------------


def all_command_paths() -> list[list[str]]:
    """Every command and group of the app, as the arguments that reach its help."""
    paths: list[list[str]] = [[]]

    def walk(command: object, prefix: list[str]) -> None:
        for name, sub in getattr(command, "commands", {}).items():
            paths.append([*prefix, name])
            walk(sub, [*prefix, name])

    walk(typer.main.get_command(app), [])
    return paths


#: each command's usage line as docs/cli.md writes its synopsis: arguments by name alone
USAGE = {
    "": "nexus [OPTIONS] COMMAND [ARGS]...",
    "run": "nexus run [OPTIONS]",
    "config": "nexus config [OPTIONS] COMMAND [ARGS]...",
    "config init": "nexus config init [OPTIONS] FILE",
    "config show": "nexus config show [OPTIONS]",
    "health": "nexus health [OPTIONS]",
    "version": "nexus version [OPTIONS]",
    "bench": "nexus bench [OPTIONS]",
    "send": "nexus send [OPTIONS] CMD JSON",
}


def _usage_line(output: str) -> str:
    return next(" ".join(ln.split()[1:]) for ln in output.splitlines() if "Usage:" in ln)


@pytest.mark.parametrize("path", all_command_paths(), ids=lambda p: " ".join(p) or "nexus")
def test_every_usage_line_writes_its_arguments_as_the_docs_do(path: list[str]) -> None:
    """Forty-eighth pass: typer 0.29 put a required argument in braces, ``nexus send
    [OPTIONS] {CMD} {JSON}`` and ``nexus config init [OPTIONS] {file}``, in ``--help`` and
    in every usage error's box, where docs/cli.md (and DESIGN.md) write ``nexus send CMD
    JSON`` and ``nexus config init FILE``. (Fails on 5699b98: run there, send and config
    init, in help and in the box.)"""
    name = " ".join(path)
    assert name in USAGE, f"a command without its usage line here: {name!r}"
    helped = invoke([*path, "--help"])
    assert helped.exit_code == 0, helped.output
    assert _usage_line(helped.output) == USAGE[name]
    # a usage error's box: the same line (the root takes an option as run's)
    refused = invoke([*path, "no-such-command" if name in ("", "config") else "--no-such-flag"])
    assert refused.exit_code == 2, refused.output
    assert _usage_line(refused.output) == USAGE[name]
    # the docs' synopsis of the command names its arguments as the usage line does
    synopsis = Path(__file__).parents[1].joinpath("docs", "cli.md").read_text().split("```")[1]
    documented = [
        line.split("  ")[0].split()
        for line in synopsis.splitlines()
        if line.startswith(f"nexus {name} ") or (not name and line.startswith("nexus --help"))
    ]
    arguments = [w for w in USAGE[name].split() if w.isupper() and w != "[OPTIONS]"]
    if name not in ("", "config"):
        assert documented, f"docs/cli.md has no synopsis of nexus {name}"
        assert [w for w in documented[0] if w.isupper() and w.isalpha()] == arguments


def test_a_missing_argument_is_named_as_the_usage_line_names_it() -> None:
    for args, named in ((["send"], "CMD"), (["send", "x"], "JSON"), (["config", "init"], "FILE")):
        result = invoke(args)
        assert result.exit_code == 2, result.output
        assert f"Missing argument '{named}'." in flat(result.output)


def test_no_arguments_print_the_help_and_exit_2_as_cli_md_says() -> None:
    for args in ([], ["config"]):
        result = invoke(args)
        assert result.exit_code == 2, (args, result.output)
        assert "Usage: nexus" in result.output
        assert "Commands" in result.output
    assert invoke(["--help"]).exit_code == 0


def test_every_command_is_covered() -> None:
    names = {" ".join(p) for p in all_command_paths()}
    assert {"", "run", "version", "health", "config", "config init", "config show"} <= names


@pytest.mark.parametrize("path", all_command_paths(), ids=lambda p: " ".join(p) or "nexus")
def test_help_shows_no_type_on_flags_and_one_default_style(path: list[str]) -> None:
    result = invoke([*path, "--help"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "<bool>" not in out
    assert "-h" in out and "Show this message and exit." in out
    text = flat(out)
    assert "(default" not in text  # defaults are typer's "[default: X]", nothing else
    assert "[default: (" not in text


def test_run_help_shows_the_embedded_defaults_typers_way() -> None:
    text = flat(invoke(["run", "--help"]).output)
    for default in (
        "(config: [app] agents). [default: 1000]",
        "(config: [app] duration). [default: 0.0]",
        "(config: [app] workload). [default: ring]",
        "(config: [metrics] port). [default: 0]",
        "(config: [metrics] host). [default: 127.0.0.1]",
    ):
        assert default in text


def test_run_help_names_every_signal_dump_on_signal_acts_on() -> None:
    """`--dump-on-signal` said SIGINT/SIGTERM; it dumps on SIGHUP too (docs/cli.md)."""
    assert "on SIGINT/SIGTERM/SIGHUP (SIGUSR1 always does)" in flat(
        invoke(["run", "--help"]).output
    )


def test_send_help_lists_the_log_levels_as_run_help_does() -> None:
    """`nexus send --help` showed `-l <str>` where `nexus run --help` lists the levels."""
    text = "".join(re.sub(r"[│╭╮╰╯─]", " ", invoke(["send", "--help"]).output).split())
    assert "-l<trace|debug|info|warn|warning|error|critical>" in text


@pytest.mark.parametrize("path", all_command_paths(), ids=lambda p: " ".join(p) or "nexus")
def test_help_shows_every_choice_of_values_in_one_style(path: list[str]) -> None:
    """`nexus send --help` showed its levels as `[a|b]`, `nexus run --help` as `<a|b>`
    (typer's style for every value): `[...]` is typer's for a default or a range."""
    text = "".join(re.sub(r"[│╭╮╰╯─]", " ", invoke([*path, "--help"]).output).split())
    assert re.findall(r"\[[\w-]+(?:\|[\w-]+)+\]", text) == []


def test_run_help_names_every_demo_workload_where_it_describes_them() -> None:
    """The text below the options listed ring, fanout and request, not pool."""
    from nexus_trio.cli._workloads import WORKLOADS

    text = flat(invoke(["run", "--help"]).output)
    described = text.split("Without --app, --spawn and --types a demo workload runs:", 1)[1]
    described = described.split("Ctrl-C", 1)[0]
    for workload in WORKLOADS:
        assert f"{workload} (" in described, (workload, described)


def test_flags_left_out_still_let_the_config_decide(isolated: Path, monkeypatch) -> None:
    """The flags now have real defaults: only flags given on the command line override."""
    from nexus_trio.cli import _run

    runs: list[object] = []
    monkeypatch.setattr(_run, "execute_run", lambda opts, **_: runs.append(opts) or 0)
    (isolated / "config.toml").write_text(
        '[app]\nagents = 7\nduration = 2.5\nworkload = "fanout"\n[metrics]\nport = 9999\n'
    )
    assert invoke(["run"]).exit_code == 0
    assert invoke(["run", "-n", "1000", "--metrics-port", "0"]).exit_code == 0
    first, second = runs
    assert (first.agents, first.duration, first.workload, first.metrics_port) == (  # type: ignore[attr-defined]
        7,
        2.5,
        "fanout",
        9999,
    )
    assert (second.agents, second.duration, second.metrics_port) == (1000, 2.5, 0)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("name", "said"),
    [
        (" ", "agent name ' ' is only whitespace"),
        ("echo ", "agent name 'echo ' starts or ends with whitespace"),
        ("root", "agent name 'root' is reserved"),
        ("x" * 256, f"agent name {'x' * 40!r}... is 256 characters long (at most 255"),
    ],
)
def test_send_refuses_a_blank_padded_or_reserved_name_as_a_usage_error(
    name: str, said: str
) -> None:
    """Regression: ``nexus send --name ' '`` (or ``'echo '``, ``root``, a name of 256
    characters) was taken as the agent's name. Refused before the run now, naming the
    flag and the name."""
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-m", "nexus_trio.cli", "send", "--name", name, "cat", "1"],
        env={**os.environ, **WIDE, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert f"Invalid value for '--name': {said}" in flat(result.stderr)


def test_send_refuses_a_name_that_is_not_utf_8_as_a_usage_error_naming_it() -> None:
    """Regression: ``nexus send --name $'\\xff'`` (the byte read as ``'\\udcff'``) was
    taken as the agent's name; the child could not be told it in UTF-8. Refused before
    the run now, naming the flag and the name."""
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-m", "nexus_trio.cli", "send", b"--name", b"\xff", "cat", "1"],
        env={**os.environ, **WIDE, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "Invalid value for '--name': agent name '\\udcff' is not UTF-8 text" in flat(
        result.stderr
    )


# --- shell completion -----------------------------------------------------------------------------


def _prints_its_bash_completion(
    program: str, shell: list[str], env: dict[str, str] | None = None
) -> None:
    """Run ``program`` (the installed script) under ``shell`` and check it printed the
    bash completion script registered for the name typed."""
    result = subprocess.run(
        [*shell, str(BIN / program)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    function = "_" + program.replace("-", "_") + "_completion"
    assert f"complete -o default -F {function} {program}" in result.stdout


@pytest.mark.parametrize("program", ["nexus", "nexus-runtime"])
def test_the_completion_script_for_a_named_shell_needs_no_shell_above(program: str) -> None:
    """What docs/cli.md gives for a script, cron or a Dockerfile (no shell to detect):
    ``_NEXUS_COMPLETE=source_bash nexus``, under 'sh -c', where --show-completion fails."""
    var = "_" + program.replace("-", "_").upper() + "_COMPLETE"
    _prints_its_bash_completion(
        program, ["sh", "-c", '"$0"; exit $?'], {**os.environ, var: "source_bash"}
    )


@pytest.mark.parametrize("program", ["nexus", "nexus-runtime"])
def test_show_completion_prints_a_bash_script_for_the_name_typed(program: str) -> None:
    # Under a bash of its own: typer finds the shell among the processes above (shellingham),
    # not from $SHELL, so the suite run from 'sh -c', setsid, cron or a Dockerfile's RUN
    # failed here with "Shell sh not supported." (or "Shell  not supported.").
    _prints_its_bash_completion(program, ["bash", "-c", '"$0" --show-completion; exit $?'])


@pytest.mark.parametrize(
    ("words", "expected"),
    [
        ("nexus r", ["run"]),
        ("nexus run --wor", ["--workload", "--workers"]),
        ("nexus -n 4 --wor", ["--workload", "--workers"]),  # options alone mean run
        ("nexus config ", ["init", "show"]),
    ],
)
def test_completion_completes_commands_and_options(words: str, expected: list[str]) -> None:
    result = subprocess.run(
        [str(BIN / "nexus")],
        env={
            **os.environ,
            "_NEXUS_COMPLETE": "complete_bash",
            "COMP_WORDS": words,
            "COMP_CWORD": str(len(words.split(" ")) - 1),
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == expected


def test_install_completion_is_offered_in_the_root_help() -> None:
    text = flat(invoke(["--help"]).output)
    assert "--install-completion Install completion for the current shell." in text


def test_help_names_the_value_of_every_file_option_and_what_app_takes() -> None:
    """`nexus bench --help` showed `<path>` for --json and --plot while their help said
    FILE; `run --help` did not say that --app takes an Agent subclass or a Supervisor."""
    bench = invoke(["bench", "--help"])
    assert bench.exit_code == 0
    assert "<path>" not in bench.stdout
    assert re.search(r"--json\s+FILE", bench.stdout) and re.search(r"--plot\s+FILE", bench.stdout)
    run = " ".join(invoke(["run", "--help"]).stdout.replace("│", " ").split())
    assert (
        "an @agent spec, an Agent subclass, a Supervisor, a list of these, or async def main(kernel)"
        in run
    )


@pytest.mark.parametrize("command", ["run", "send", "bench"])
def test_the_help_text_after_the_options_is_reflowed_not_ragged(command: str) -> None:
    """Regression: ``nexus send --help`` printed its closing paragraph with the line
    breaks of its source, which the terminal's width broke again: at 80 columns a line
    of 73 characters was followed by one of 16 (``(shutdown frame,``), and so on. The
    paragraph is one text now, reflowed to the width as ``run``'s is."""
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "80", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    after = lines[max(i for i, line in enumerate(lines) if line.startswith("╰")) + 1 :]
    paragraph: list[str] = []
    for line in [*after, ""]:
        text = line.strip()
        if text and not text.startswith(("nexus ", "--", "'")):
            paragraph.append(text)
            continue
        # every line of a paragraph but its last fills the width, give or take a word
        assert all(len(ln) >= 60 for ln in paragraph[:-1]), paragraph
        paragraph = []


def test_the_root_help_lists_each_command_s_summary_reflowed_not_ragged() -> None:
    """Regression (forty-second pass): ``nexus --help`` listed ``health`` as ``... exit``,
    ``0 if healthy`` (a line of 12 characters) and ``(ready), 1 otherwise.``: its summary
    kept the line break of its docstring, which the panel's width broke again. Every
    summary line but a command's last fills the panel's width, give or take a word."""
    result = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "80", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    start = next(i for i, line in enumerate(lines) if "Commands" in line and "╭" in line)
    rows: list[list[str]] = []
    for line in lines[start + 1 :]:
        if line.startswith("╰"):
            break
        name, text = line[2:11].strip(), line[11:].rstrip("│ ")
        if name:
            rows.append([text])
        else:
            rows[-1].append(text.strip())
    assert {row[0].split()[0] for row in rows} >= {"Print", "Run", "Check"}, rows
    for row in rows:
        assert all(len(text) >= 50 for text in row[:-1]), row


def test_counts_the_cli_prints_say_one_in_the_singular(isolated: Path) -> None:
    """Regression: ``nexus run``'s summary said ``app greeter_app:greeter, 1 agents`` (and
    ``1 workers: ...``, ``agent tree (1 agents)``, ``ring workload · 1 agents``)."""
    write(
        isolated,
        "greeter_app.py",
        "from nexus_trio import agent\n\n@agent(name='greeter')\n"
        "async def greeter(ctx, msg):\n    return msg.payload\n",
    )
    result = invoke(["run", "--app", "greeter_app:greeter", "-d", "0.2", "--no-live"])
    assert result.exit_code == 0, result.output
    assert "app greeter_app:greeter, 1 agent " in flat(result.output) + " "
    assert "1 agents" not in flat(result.output)
    from nexus_trio._plural import count_of
    from nexus_trio.cli._view import render_tree

    assert [count_of(n, "worker") for n in (0, 1, 2, 1000)] == [
        "0 workers",
        "1 worker",
        "2 workers",
        "1,000 workers",
    ]
    only = {"kind": "agent", "id": "i", "name": "a", "state": "running", "restarts": 0}
    assert render_tree(only).splitlines()[0] == "agent tree (1 agent):"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["init", "config.toml"], "No such command 'init'. Did you mean 'config init'?"),
        (["show"], "No such command 'show'. Did you mean 'config show'?"),
        (["sned", "x", "1"], "No such command 'sned'. Did you mean 'send'?"),  # typer's own
        (["config", "int", "x"], "No such command 'int'. Did you mean 'init'?"),
    ],
    ids=["init", "show", "typo", "typo-in-a-group"],
)
def test_a_command_of_a_group_given_alone_is_named_with_its_group(
    args: list[str], expected: str
) -> None:
    """Regression: ``nexus init config.toml`` (as ``cargo init``, ``git init``) said
    ``No such command 'init'.`` and nothing more; the command is ``nexus config init``."""
    result = invoke(args)
    assert result.exit_code == 2
    assert expected in flat(result.output)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["run", "myagents:app", "-d", "1"],
            "Got unexpected extra argument(s) (myagents:app); did you mean --app"
            " myagents:app? (nexus run takes no argument: your agents are given as --app"
            " MODULE:ATTR)",
        ),
        (
            ["run", "pkg.agents:main", "app.py"],
            "Got unexpected extra argument(s) (pkg.agents:main app.py); did you mean --app"
            " pkg.agents:main?",
        ),
        (["run", "-n", "5", "stray"], "Got unexpected extra argument(s) (stray)"),
        (["run", "a\x01b:c"], "Got unexpected extra argument(s) (a\\x01b:c)"),
    ],
    ids=["app-reference", "two-arguments", "no-reference", "control-character"],
)
def test_an_app_reference_given_to_run_as_an_argument_is_told_to_be_app(
    args: list[str], expected: str
) -> None:
    """Regression: ``nexus run myagents:app`` (as uvicorn takes an app) was refused with
    ``Got unexpected extra argument(s) (myagents:app)`` alone, naming no flag; so was
    docs/deploy.md's pod, ``args: ["run", "app:main", ...]``. A word that reads as
    ``module:attr`` is now told to be ``--app``; other extra arguments are refused as
    before, their control characters escaped as click escapes them."""
    result = invoke(args)
    assert result.exit_code == 2, result.output
    said = flat(result.output)
    assert expected in said, said
    if "did you mean" not in expected:
        assert "did you mean" not in said


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["run", "x" * 5000],
            f"Got unexpected extra argument(s) ({'x' * 40}... (5,000 characters))",
        ),
        (
            ["run", "pkg:Agents.spec"],
            "Got unexpected extra argument(s) (pkg:Agents.spec); did you mean --app"
            " pkg:Agents.spec?",
        ),
        (
            ["run", "myagents.py:app"],
            "Got unexpected extra argument(s) (myagents.py:app); did you mean --app myagents:app?",
        ),
        (
            ["run", "--app", "x:y", "extra:z"],
            "Got unexpected extra argument(s) (extra:z); --app is given ('x:y') and takes"
            " one MODULE:ATTR, which may name a list of agents (nexus run takes no argument)",
        ),
        (
            ["myagents:app"],
            "No such command 'myagents:app'. Did you mean 'run --app myagents:app'?",
        ),
        (
            ["nexus-runtime", "pkg.agents:main"],
            "No such command 'pkg.agents:main'. Did you mean 'run --app pkg.agents:main'?",
        ),
    ],
    ids=["long", "dotted-attribute", "file", "app-given", "no-run", "no-run-program-name"],
)
def test_an_argument_given_to_run_is_shown_cut_and_told_the_app_it_reads_as(
    args: list[str], expected: str
) -> None:
    """Regression (review of the hint above): a 5,000-character extra argument was echoed
    whole (twice with the hint), where every other value of an error is cut to its first
    40 characters and its length; ``pkg:Agents.spec``, which ``--app`` takes, got no hint;
    ``myagents.py:app`` was told ``--app myagents.py:app``, which ``--app`` refuses in
    turn; with ``--app x:y`` given, ``extra:z`` was told ``did you mean --app extra:z?``;
    and ``nexus myagents:app`` (no ``run``, as ``uvicorn myagents:app``) said ``No such
    command 'myagents:app'.`` alone."""
    result = invoke(args)
    assert result.exit_code == 2, result.output
    said = flat(result.output)
    assert expected in said, said
    assert said.count("x" * 40) <= 1, said


def test_an_app_reference_of_python_identifiers_that_are_not_ascii_is_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fifty-fourth pass: a reference was checked against an ASCII pattern
    (``[A-Za-z_]\\w*``), where Python's identifiers are Unicode's: ``nexus run é:main``
    got no ``--app`` hint (``Got unexpected extra argument(s) (é:main)`` alone), and
    ``--app é:main`` or ``[app] app = "é:main"`` was refused (``must look like
    'package.module:attr'``) though ``import é`` imports ``é.py``. Taken now as Python
    takes them (``str.isidentifier`` for each dotted name); ``1a:b``, ``a:b-c`` and
    ``a::b`` are still refused."""
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "é.py", "async def main(kernel):\n    print('ran é')\n")
    hinted = invoke(["run", "é:main"])
    assert hinted.exit_code == 2, hinted.output
    assert "(é:main); did you mean --app é:main?" in flat(hinted.output)
    ran = invoke(["run", "--app", "é:main", "-d", "0.05", "--no-live"])
    assert ran.exit_code == 0, ran.output
    assert "ran é" in ran.stdout
    (tmp_path / "config.toml").write_text('[app]\napp = "日本.モジュール:main"\n')
    shown = invoke(["config", "show"])
    assert shown.exit_code == 0, shown.output
    assert '"日本.モジュール:main"' in shown.stdout
    for bad in ["1a:b", "a:b-c", "a::b", "é:"]:
        refused = invoke(["run", "--app", bad, "-d", "0.05"])
        assert refused.exit_code == 2, refused.output
        assert (
            f"Invalid value for '--app': must look like 'package.module:attr', got '{bad}'"
            in flat(refused.output)
        ), flat(refused.output)


@pytest.mark.parametrize(
    "args",
    [["run", "-d", "1"], ["config", "show"], ["health"], ["send", "true", "1"]],
    ids=["run", "config show", "health", "send"],
)
@pytest.mark.parametrize("what", ["missing", "directory"])
def test_a_config_file_given_that_cannot_be_used_is_a_bad_value_of_config(
    tmp_path: Path, args: list[str], what: str
) -> None:
    """Forty-eighth pass, walking every flag with bad values: ``-c FILE`` of a file that
    is not there said ``nexus: error: FILE: config file not found`` in ``run``, ``config
    show`` and ``health``, without naming the flag (``send`` named it as ``'--config'``).
    It is a bad value of ``--config``, in the usage box, as a directory already was (the
    flag's parser refuses it). (Fails on 5699b98: the old _app.py and _send_cmd.py
    swapped in, the 4 missing files; the 4 directories pass there.)"""
    given = tmp_path / "nope.toml" if what == "missing" else tmp_path
    said = "config file not found" if what == "missing" else "is a directory"
    result = invoke([*args, "-c", str(given)])
    assert result.exit_code == 2, result.output
    text = flat(result.output)
    assert "Usage: nexus" in text and "Traceback" not in text
    assert "Invalid value for '--config' / '-c': " in text and str(given) in text
    assert said in text


def test_a_demo_flag_the_config_refuses_is_named_in_every_spelling() -> None:
    """Forty-eighth pass: ``-n 99999999999999999999`` (past the config's bound, not the
    flag's parser's) was named ``'--agents'`` alone, where ``-n abc`` names ``'--agents'
    / '-n' / '--num-agents'`` as click does. (Fails on 5699b98: old _app.py swapped in.)"""
    result = invoke(["run", "-n", "99999999999999999999", "-d", "1"])
    assert result.exit_code == 2, result.output
    assert (
        "Invalid value for '--agents' / '-n' / '--num-agents': must be at most"
        " 100000000 (the most one run takes), got 99999999999999999999"
    ) in flat(result.output)


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (
            ["health", "--host", ""],
            "Invalid value for '--host': must be a host name or an address, got ''",
        ),
        (
            ["health", "--host", " "],
            "Invalid value for '--host': must be a host name or an address, got ' '",
        ),
        (
            ["run", "--metrics-host", "abc", "-d", "1"],
            "Invalid value for '--metrics-host': 'abc' is the address of the metrics endpoint,"
            " which is off (no --metrics-port, [metrics] port 0): give --metrics-port P too, or"
            " drop the flag",
        ),
        (
            ["run", "--metrics-host", "127.0.0.1", "--metrics-port", "0", "-d", "1"],
            "Invalid value for '--metrics-host': '127.0.0.1' is the address of the metrics",
        ),
        (
            ["run", "--node", "abc", "-d", "1"],
            "Invalid value for '--node': 'abc' needs --nats URL (or [nats] url in the config)",
        ),
    ],
    ids=["health empty host", "health blank host", "metrics host alone", "metrics port 0", "node"],
)
def test_flags_found_taken_or_ignored_by_the_walk_are_refused_naming_flag_and_value(
    args: list[str], said: str
) -> None:
    """Forty-eighth pass, walking every flag with bad values on a fresh install:
    ``health --host ""`` asked ``http://:1/healthz`` and exited 1 saying the name was
    not known (not the flag); ``run --metrics-host abc`` without a metrics port was
    ignored (exit 0; no endpoint listens), where a demo flag given with ``--app`` is
    refused; ``--node abc`` without ``--nats`` named the flag, not the value. (Fails on
    5699b98: old _app.py and _commands.py swapped in, 5 of 5.)"""
    result = invoke(args)
    assert result.exit_code == 2, result.output
    text = flat(result.output)
    assert "Usage: nexus" in text and "Traceback" not in text
    assert said in text


# --- numbers on the command line as the original takes them (forty-ninth pass) ---------------


def _refused_and_nothing_started(args: list[str], said: str, monkeypatch) -> None:
    """``nexus args`` is a usage error (exit 2) saying ``Invalid value for <said>``, and no
    run starts."""
    from nexus_trio.cli import _run

    started: list[object] = []
    monkeypatch.setattr(_run, "execute_run", lambda *a, **k: started.append(a) or 0)
    result = invoke(args)
    assert result.exit_code == 2, result.output
    assert f"Invalid value for {said}" in flat(result.output)
    assert started == []


def _runs_started(args: list[str], monkeypatch) -> list:
    """The options of the runs ``nexus args`` started (its run stood in for), which
    exited 0."""
    from nexus_trio.cli import _run

    started: list = []
    monkeypatch.setattr(_run, "execute_run", lambda opts, **k: started.append(opts) or 0)
    result = invoke(args)
    assert result.exit_code == 0, result.output
    return started


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (
            ["run", "-n", "1_000"],
            "'--agents' / '-n' / '--num-agents': must be a whole number >= 1, got '1_000' (no"
            " '_' between digits: write 1000)",
        ),
        (
            ["run", "-n", " 5"],
            "'--agents' / '-n' / '--num-agents': must be a whole number >= 1, got ' 5' (blanks"
            " around the number)",
        ),
        (
            ["run", "-n", "0x10"],
            "'--agents' / '-n' / '--num-agents': must be a whole number >= 1, got '0x10'"
            " (decimal digits only: no 0x, 0o or 0b)",
        ),
        (
            ["run", "-n", "\uff15"],
            "'--agents' / '-n' / '--num-agents': must be a whole number >= 1, got '\uff15'"
            " (digits other than 0-9)",
        ),
        (
            ["run", "-W", "1_0"],
            "'--workers' / '-W': must be a whole number >= 0, got '1_0' (no '_' between"
            " digits: write 10)",
        ),
        (
            ["health", "-p", "9_464"],
            "'--port' / '-p': must be a whole number from 1 to 65535, got '9_464' (no '_'"
            " between digits: write 9464)",
        ),
        (
            ["run", "-n", "1" + "0" * 5000],
            "'--agents' / '-n' / '--num-agents': must be a whole number >= 1, got a number of"
            " 5001 digits",
        ),
    ],
)
def test_a_number_flag_takes_the_originals_spelling_not_pythons(isolated, args, said, monkeypatch):
    """Python's ``int()`` reads ``1_000``, `` 5`` and ``５``, which the original's flags
    (clap, Rust's ``u64::from_str``) refuse: ``-n 1_000`` ran 1,000 agents. Refused now, saying what in the spelling is not taken; nothing starts.
    (Fails on main, old _commands.py swapped in: exit 0, a run.)"""
    _refused_and_nothing_started(args, said, monkeypatch)


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (
            ["run", "-d", "1_000"],
            "'--duration' / '-d': must be a finite number >= 0 (0 = until Ctrl-C), got '1_000'"
            " (no '_' between digits: write 1000)",
        ),
        (
            ["run", "--rate", " 2.5 "],
            "'--rate': must be a finite number >= 0 (0 = unpaced), got ' 2.5 ' (blanks around"
            " the number)",
        ),
        (
            ["run", "-d", "\uff15"],
            "'--duration' / '-d': must be a finite number >= 0 (0 = until Ctrl-C), got"
            " '\uff15' (digits other than 0-9)",
        ),
        (
            ["health", "--timeout", "0x10"],
            "'--timeout': must be a finite number >= 0.1, got '0x10' (decimal digits only: no"
            " 0x, 0o or 0b)",
        ),
    ],
)
def test_a_float_flag_takes_the_originals_spelling_not_pythons(isolated, args, said, monkeypatch):
    """The float flags as the whole-number ones (forty-ninth pass, the lead): Python's
    ``float()`` reads ``1_000``, blanks around the number and ``５``, which the original's
    flags (clap, Rust's ``f64::from_str``) refuse; refused, saying what in the spelling is
    not taken, nothing starts. (Fails with the regular expression's check taken out of
    ``finite_at_least``: exit 0, a run of 1,000 s.)"""
    _refused_and_nothing_started(args, said, monkeypatch)


@pytest.mark.parametrize(
    ("spelt", "seconds"),
    [
        ("2.5", 2.5),
        ("+2", 2.0),
        ("5.", 5.0),
        (".5", 0.5),
        ("1e1", 10.0),
        ("1E+1", 10.0),
        ("-0", 0.0),
    ],
)
def test_a_float_flag_still_takes_what_the_original_takes(isolated, spelt, seconds, monkeypatch):
    """Rust's ``f64::from_str`` spelling: a sign, a point with digits on either side, an
    exponent in either case: taken (``-0`` is 0)."""
    started = [opts.duration for opts in _runs_started(["run", "-d", spelt], monkeypatch)]
    assert started == [seconds]
    assert repr(started[0]) == repr(seconds)


@pytest.mark.parametrize(("spelt", "agents"), [("+5", 5), ("007", 7), ("100000000", 10**8)])
def test_a_number_flag_still_takes_what_the_original_takes(isolated, spelt, agents, monkeypatch):
    """A sign and leading zeros are Rust's ``u64::from_str`` spelling too: taken."""
    started = _runs_started(["run", "-n", spelt, "-d", "0.1"], monkeypatch)
    assert [opts.agents for opts in started] == [agents]


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (
            ["bench", "--smoke", "-r", "99999999999999999999"],
            "'--repeat' / '-r': must be a whole number from 1 to 1000, got 99999999999999999999",
        ),
        (
            ["bench", "--smoke", "-r", "1001"],
            "'--repeat' / '-r': must be a whole number from 1 to 1000, got 1001",
        ),
    ],
)
def test_a_count_flag_has_an_upper_bound(isolated, args, said, monkeypatch):
    """``nexus bench -r 99999999999999999999`` was taken and ran (practically) for good.
    Bounded now (docs/cli.md, Numbers on the command line), refused naming the flag,
    nothing run; the bound itself is taken. (Fails on main, old _bench_cmd.py swapped in:
    exit 0, the suite run.)"""
    import nexus_trio.bench

    ran: list[object] = []
    monkeypatch.setattr(nexus_trio.bench, "run_cli", lambda *a, **k: ran.append(k["repeat"]) or 0)
    result = invoke(args)
    assert result.exit_code == 2, result.output
    assert f"Invalid value for {said}" in flat(result.output)
    assert ran == []
    assert invoke(["bench", "--smoke", "-r", "1000"]).exit_code == 0
    assert ran == [1000]


def test_a_value_a_flag_gave_is_refused_in_the_flags_words_a_files_in_the_keys(isolated):
    """``-n 100000001`` and ``--app -1`` were refused as ``[app] agents must be ...`` and
    ``[app] app must ...``, a key the user did not write: the flag's words now (the hint
    names it); the same value from the config file still names the key, file and line.
    (Fails on main, old _app.py swapped in: the key's words.)"""
    out = flat(invoke(["run", "-n", "100000001", "-d", "1"]).output)
    assert (
        "Invalid value for '--agents' / '-n' / '--num-agents': must be at most 100000000 (the"
        " most one run takes), got 100000001" in out
    ), out
    assert "[app]" not in out
    out = flat(invoke(["run", "--app", "-1"]).output)
    assert "Invalid value for '--app': must look like 'package.module:attr', got '-1'" in out
    assert "[app]" not in out
    (isolated / "c.toml").write_text("[app]\nagents = 100000001\n")
    result = invoke(["run", "-c", "c.toml", "-d", "1"])
    assert result.exit_code == 2
    assert (
        "c.toml:2: [app] agents must be at most 100000000 (the most one run takes), got"
        " 100000001" in flat(result.output)
    )


@pytest.mark.parametrize(
    ("host", "why"),
    [
        ("x..y", "got 'x..y' (label empty or too long)"),
        ("x" * 64, "got '" + "x" * 40 + "'... (64 characters) (label too long)"),
        ("a\udcffb", "got 'a\\udcffb' (Invalid character '\\udcff')"),
        (
            "a." * 2000 + "b",
            "got '" + "a." * 20 + "'... (4,001 characters) (a host name has at most 253"
            " characters, this one 4,001)",
        ),
    ],
    ids=["empty-label", "label-of-64", "not-utf-8", "name-of-4001"],
)
def test_health_refuses_a_host_no_resolver_takes_naming_the_flag(host: str, why: str) -> None:
    """Fifty-second pass, walking the flags with bad values: ``health --host x..y`` (an
    empty label), a label past 63 characters or a byte that is not UTF-8 (``$'a\\xffb'``,
    ``a\\udcffb`` to Python) raised ``UnicodeError`` (IDNA) in the check's thread: a
    traceback, then ``unreachable: no whole answer within 3s``, exit 1. Refused now as a
    bad value of ``--host``, exit 2, saying why; an address (``::1``, ``[::1]``) and an
    international name are taken. (Review of the fifty-third pass: a name past DNS's 253
    characters, ``name-of-4001``, was asked for, exit 1, ``unreachable``, the whole name
    echoed; refused now, cut.)"""
    result = invoke(["health", "--host", host, "-p", "9"])
    assert result.exit_code == 2, result.output
    text = flat(result.output)
    assert "Usage: nexus" in text and "Traceback" not in text
    assert f"Invalid value for '--host': must be a host name or an address, {why}" in text


@pytest.mark.parametrize("flag", [["health", "--host"], ["run", "-d", "1", "--metrics-host"]])
def test_a_zone_naming_no_interface_is_refused_naming_the_flag(flag: list[str]) -> None:
    """Fifty-sixth pass: ``health --host fe80::1%25lo`` (the zone as a URL writes it)
    asked for an interface ``25lo``, exit 1, ``unreachable``; ``run --metrics-host`` with
    it failed the run late. Refused now as a bad value of the flag, exit 2, saying what
    to write. (With main's _config.py: health said unreachable, exit 1.)"""
    interface = socket.if_nameindex()[0][1]
    args = [*flag, f"fe80::1%25{interface}"]
    result = invoke([*args, "-p" if flag[0] == "health" else "--metrics-port", "9"])
    assert result.exit_code == 2, result.output
    text = flat(result.output)
    assert "Traceback" not in text
    assert f"Invalid value for '{flag[-1]}': must be " in text, text
    assert f"no interface of this host is named '25{interface}'" in text, text
    assert f"%25 is how a URL writes the %: write %{interface})" in text, text


@pytest.mark.parametrize("flag", [["health", "--host"], ["run", "-d", "1", "--metrics-host"]])
def test_a_wildcard_host_flag_is_refused_naming_the_flag(flag: list[str]) -> None:
    """Fifty-fourth pass: ``run --metrics-host '*'`` ran (glibc took ``*`` as all
    interfaces) and logged ``metrics on http://*:PORT/metrics``; ``health --host '*'``
    asked ``http://*:PORT/healthz``, exit 1, ``unreachable``. Refused now as a bad
    value of the flag, exit 2, with the address to write."""
    result = invoke([*flag, "*", "-p" if flag[0] == "health" else "--metrics-port", "9"])
    assert result.exit_code == 2, result.output
    text = flat(result.output)
    assert "Traceback" not in text
    assert (
        f"Invalid value for '{flag[-1]}': must be " in text
        and "got '*' (a wildcard is no host: all interfaces are 0.0.0.0, or :: for IPv6 too)"
        in text
    ), text


def test_health_of_a_config_host_no_resolver_takes_is_refused_at_load() -> None:
    """Fifty-second pass: the same host from the config (``[metrics] host``, not checked
    there) raised in the check's thread, a traceback, and the check waited out its
    timeout (``no whole answer within 3s``); then it was said in one line, exit 1, as
    unreachable. Fifty-third pass: ``[metrics] host`` is checked as the config loads, so
    it is a config error naming the key and where it was set, exit 2, before any
    check (and before a run: ``nexus run`` with the endpoint off took it silently)."""
    result = CliRunner().invoke(
        app, ["health", "-p", "9", "--timeout", "5"], env={"NEXUS_METRICS__HOST": "x..y"}
    )
    assert result.exit_code == 2, result.output
    text = flat(result.output)
    assert "Traceback" not in text and "no whole answer" not in text
    assert "unreachable" not in text
    assert (
        "environment variable NEXUS_METRICS__HOST: [metrics] host must be an address or a"
        ' host name, got "x..y" (label empty or too long)' in text
    )


# --- long values cut, hosts as URLs write them (fifty-third pass) ------------------------------


@pytest.mark.parametrize(
    ("reference", "said"),
    [
        ("a" * 3000, "must look like 'package.module:attr', got 'A'... (3,000 characters)"),
        ("a" * 3000 + ":x", "no module named 'A'... (3,000 characters) (in 'A'... (3,002"),
        ("os:" + "a" * 3000, "module 'os' has no attribute 'A'... (3,000 characters)"),
    ],
    ids=["shape", "module", "attribute"],
)
def test_a_long_app_reference_is_cut_in_its_error(reference: str, said: str) -> None:
    """Fifty-third pass: an ``--app`` reference of 3,000 characters was echoed whole in
    its error (twice: ``no module named '...' (in '...')``), where every flag's error cuts
    a refused value to its first 40 characters and its length. Cut now, the flag named."""
    result = invoke(["run", "--app", reference, "-d", "1"])
    assert result.exit_code == 2, result.output
    text = flat(result.output)
    assert f"Invalid value for '--app': {said.replace('A', 'a' * 40)}" in text
    assert "a" * 41 not in text
    assert len(result.output) < 2000


def test_a_long_nats_url_of_a_config_file_is_cut_in_its_error(isolated: Path) -> None:
    """The same for a config key checked by ``nexus run`` (``[nats] url`` of 10 kB)."""
    (isolated / "c.toml").write_text(f'[nats]\nurl = "{"a" * 10_000}"\n')
    result = invoke(["run", "-c", "c.toml", "-d", "1"])
    assert result.exit_code == 2, result.output
    text = flat(result.output)
    assert f'expected a URL like nats://127.0.0.1:4222, got "{"a" * 40}"... (10,000' in text
    assert "a" * 41 not in text


def _free_port_of(host: str) -> int:
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("host", ["::1", "[::1]"])
def test_metrics_host_takes_an_ipv6_address_with_or_without_brackets(host: str) -> None:
    """Fifty-third pass: ``--metrics-host ::1`` logged ``http://::1:9100/metrics`` (no
    URL: a reader cannot tell the port from the address), and ``--metrics-host [::1]``
    (as a URL writes it, and as ``nexus health --host [::1]`` took it) failed the run,
    exit 1: ``cannot listen on [::1]:P: Name or service not known``. Both listen on
    ``::1`` now and log ``http://[::1]:P/metrics``; ``health`` takes both the same."""
    port = _free_port_of("::1")
    args = ["run", "-n", "2", "-d", "0.2", "--metrics-port", str(port), "--metrics-host", host]
    result = invoke(args)
    assert result.exit_code == 0, result.output
    assert f"metrics on http://[::1]:{port}/metrics" in result.output
    checked = invoke(["health", "--host", host, "-p", str(port), "--timeout", "2"])
    assert checked.exit_code == 1
    assert flat(checked.output).startswith(f"http://[::1]:{port}/healthz: unreachable: ")


@pytest.mark.parametrize(
    ("host", "why"),
    [
        ("0.0.0.0:9100", "a host, without its port: the port is given on its own"),
        ("[::1]:9100", "a host, without its port: the port is given on its own"),
        ("http://localhost", "a host, not a URL"),
        ("[localhost]", "brackets are for an IPv6 address"),
        ("local host", "a host name has no blanks"),
        ("x..y", "label empty or too long"),
    ],
)
def test_a_bad_metrics_host_is_refused_naming_the_flag_or_the_key(
    isolated: Path, host: str, why: str
) -> None:
    """Fifty-third pass: ``[metrics] host`` was checked only as not blank: a host with
    its port (``0.0.0.0:9100``), a URL or ``x..y`` failed the run late (``cannot listen
    on ...: Name or service not known``, exit 1), or was taken without a word while the
    endpoint was off. Refused as the config loads now, naming the key and the file's
    line (exit 2), and as a value of ``--metrics-host``, naming the flag."""
    (isolated / "c.toml").write_text(f'[metrics]\nhost = "{host}"\n')
    result = invoke(["run", "-c", "c.toml", "-n", "2", "-d", "0.2"])
    assert result.exit_code == 2, result.output
    assert (
        f'c.toml:2: [metrics] host must be an address or a host name, got "{host}" ({why}'
        in flat(result.output)
    )
    port = str(_free_port_of("127.0.0.1"))
    result = invoke(["run", "-n", "2", "-d", "0.2", "--metrics-port", port, "--metrics-host", host])
    assert result.exit_code == 2, result.output
    assert (
        f"Invalid value for '--metrics-host': must be an address or a host name, got"
        f" '{host}' ({why}" in flat(result.output)
    )


@pytest.mark.parametrize(
    ("value", "said"),
    [
        (
            '"a,b"',
            "program 'a,b' not found (not on PATH, or not executable); several commands"
            ' are a TOML array, not a list with commas: ["a", "b"]',
        ),
        (
            "nosuch-a, nosuch-b",
            "program 'nosuch-a,' not found (not on PATH, or not executable); several"
            ' commands are a TOML array, not a list with commas: ["nosuch-a", "nosuch-b"]',
        ),
        (
            '"nosuch-prog --fast"',
            "program 'nosuch-prog --fast' not found (not on PATH, or not executable); the"
            " whole command is in quotes, so it is one program name (a command is split as"
            " a shell splits it): write it without them, nosuch-prog --fast",
        ),
        ("nosuch-prog --fast", "program 'nosuch-prog' not found (not on PATH, or not executable)"),
    ],
    ids=["quoted-commas", "commas", "quoted-command", "plain"],
)
def test_a_quoted_or_comma_separated_spawn_value_is_told_what_to_write(
    value: str, said: str
) -> None:
    """Fifty-sixth pass: ``NEXUS_APP__SPAWN='"a,b"'`` (an env file that keeps quotes, a
    list written with commas) was one command, refused as the program ``a,b`` not found,
    with nothing on what to write. A text key's quoted value is a TOML string
    (``NEXUS_METRICS__HOST='"0.0.0.0"'`` is ``0.0.0.0``); a command's quotes stay shell
    quoting (``'"/opt/my app/agent" -v'`` runs a program with a blank in its path), so
    the value is kept and the error says what to write. (With main's _app.py: no hint.)"""
    result = CliRunner().invoke(app, ["run", "-d", "1"], env={**WIDE, "NEXUS_APP__SPAWN": value})
    assert result.exit_code == 2, result.output
    text = flat(result.output)
    assert "Traceback" not in text
    assert f"Invalid value for [app] spawn (env NEXUS_APP__SPAWN): {said}" in text, text
    assert text.endswith(said), text
