"""``nexus run --spawn``: programs that start say so, programs that do not say why.

Real ``nexus run`` processes spawn small programs written here: one that registers,
one that exits before registering, one that prints garbage instead of registering.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from nexus_trio import open_kernel
from nexus_trio.bridges.process import ProcessAgent, process_agent
from nexus_trio.cli import app
from nexus_trio.cli._spawn import agent_names, program_name, register_timeout
from tests.cli_runner import CliRunner
from tests.conftest import make_config
from tests.test_cli import flat
from tests.test_process_agents import refused

PYTHON = shlex.quote(sys.executable)

REGISTERS = textwrap.dedent(
    """
    import json, sys
    # registers under a name made of its arguments, then answers nothing until shutdown
    frame = {"type": "register", "payload": {"id": "x", "name": "+".join(sys.argv[1:])}}
    print(json.dumps(frame), flush=True)
    for line in sys.stdin:
        if json.loads(line).get("type") == "shutdown":
            break
    """
)
EXITS = "import sys\nprint('cannot start: no API key', file=sys.stderr)\nsys.exit(3)\n"
GARBAGE = "import time\nprint('hello garbage', flush=True)\ntime.sleep(60)\n"


@pytest.mark.parametrize(
    ("command", "name"),
    [
        ("python3 exits.py", "exits"),
        ("python3 -u agents/calc.py --port 1", "calc"),
        ("/usr/bin/python3.11 calc.py", "calc"),
        ("python -m pkg.agents.calc", "calc"),
        ("node dist/agent.js", "agent"),
        ("./bin/calculator --fast", "calculator"),
        ("uv run worker.py", "worker"),
        ("python3", "python3"),
        # an interpreter option's value is not the script (it named the agent "dev")
        ("python -X dev -W error script.py", "script"),
        ("python3 -W ignore::DeprecationWarning -X importtime agents/calc.py", "calc"),
        ("python3 -Xdev -Werror calc.py", "calc"),
        ("python3 -uX dev calc.py", "calc"),
        ("python3 -OO -X dev -m pkg.calc --port 1", "calc"),
        ("python3 -um pkg.calc", "calc"),
        ("python3 --check-hash-based-pycs always calc.py", "calc"),
        # code given on the command line: no script, the interpreter names it
        ("python3 -c 'import calc; calc.main()'", "python3"),
        ("python3 -X dev", "python3"),
        ("python3 -", "python3"),
        ("node --require ./trace.js --max-old-space-size=512 dist/agent.js", "agent"),
        ("node -r ./trace.js --import=./loader.mjs -- dist/agent.js", "agent"),
        ("node --eval 'require(\"./agent\")'", "node"),
        ("ruby -I lib -r json agent.rb", "agent"),
        ("perl -Mstrict -I lib agent.pl", "agent"),
        ("perl -w -Mfeature=say -I lib agent.pl", "agent"),
        ("perl -ne 'print if /x/'", "perl"),
        ("bash -eu -o pipefail run-agent.sh", "run-agent"),
        ("bash -c 'exec ./agent'", "bash"),
        ("php -d memory_limit=1G -f agent.php", "agent"),
        ("java -cp lib/app.jar com.example.Calc", "Calc"),
        ("java -Xmx1g -jar build/calc.jar", "calc"),
        ("java Calc.java", "Calc"),
        ("deno run --allow-net -c deno.json main.ts", "main"),
        ("bun run --cwd app index.ts", "index"),
        ("bun exec x.ts", "x"),
        ("uv run --with httpx --python 3.12 worker.py", "worker"),
        ("uv run python -X dev worker.py", "worker"),
        ("uv run -m pkg.worker", "worker"),
        ("npx --yes -p cowsay cowsay hi", "cowsay"),
        # env runs the program after its assignments and options (it named them "env")
        ("env VAR=1 python x.py", "x"),
        ("env -i PATH=/usr/bin DEBUG=1 python3 -u agents/calc.py", "calc"),
        ("env -u HOME --unset=LANG -C /srv VAR=1 node dist/agent.js", "agent"),
        ("env --chdir=/srv -- python3 worker.py", "worker"),
        ("env -S 'python3 -u calc.py' --port 1", "calc"),
        ("/usr/bin/env python3 calc.py", "calc"),
        ("env VAR=1", "env"),
        # TypeScript through tsx: the script names it, not the runner (it was "tsx")
        ("npx tsx agent.ts", "agent"),
        ("npx --yes tsx agent.ts", "agent"),
        ("npx -y tsx watch --tsconfig tsconfig.json src/agent.ts", "agent"),
        ("tsx --import ./env.mjs agent.ts", "agent"),
        ("node --import tsx agent.ts", "agent"),
        ("npx ts-node -P tsconfig.json agent.ts", "agent"),
        ("tsx -e 'console.log(1)'", "tsx"),
        # the Windows launcher: its version selectors take no value
        ("py -3 x.py", "x"),
        ("py -3.12 -X dev calc.py", "calc"),
        ("py -V:3.12 -m pkg.calc", "calc"),
    ],
)
def test_agents_are_named_after_their_script_not_an_option_value(command: str, name: str) -> None:
    assert program_name(shlex.split(command)) == name


@pytest.mark.parametrize(
    ("argv", "name"),
    [
        (["python.exe", "x.py"], "x"),
        (["C:\\Python312\\python.exe", "C:\\agents\\calc.py"], "calc"),
        (["C:\\Python312\\python3.12.exe", "-X", "dev", "agents\\calc.py"], "calc"),
        (["PYTHON.EXE", "-m", "pkg.calc"], "calc"),
        (["C:\\Windows\\py.exe", "-3", "D:\\work\\worker.py"], "worker"),
        (["C:\\Program Files\\nodejs\\node.exe", "dist\\agent.js"], "agent"),
        (["npx.cmd", "tsx", "src\\agent.ts"], "agent"),
        (["C:\\tools\\calculator.exe", "--fast"], "calculator"),
        (["python.exe", "-c", "pass"], "python"),
    ],
)
def test_agents_are_named_the_same_from_windows_style_paths(argv: list[str], name: str) -> None:
    """``python.exe``, ``python3.12.exe``, ``py -3`` and scripts behind backslashes (the
    program was named ``C:\\Python312\\python`` on a POSIX machine, or ``python3``)."""
    assert program_name(argv) == name


def test_repeated_programs_get_numbered_names() -> None:
    commands = [["python3", "a.py"], ["node", "a.js"], ["python3", "b.py"], ["./a"]]
    assert agent_names(commands) == ["a", "a-2", "b", "a-3"]


def test_a_program_named_root_or_with_spaces_around_gets_a_name_an_agent_may_have() -> None:
    """Regression: ``--spawn ./root`` was named ``root``, the root supervisor's name, and
    a program ``'./calc '`` was ``'calc '``; both are refused as agent names now, so the
    names given are ``root-2`` (``root`` taken as given) and ``calc``."""
    commands = [["./root"], ["python3", "root.py"], ["./calc "]]
    assert agent_names(commands) == ["root-2", "root-3", "calc"]


def test_spawned_programs_names_are_cut_to_255_characters_before_their_number() -> None:
    """Regression: a program whose file name has 255 bytes, spawned twice, was named
    ``<name>-2`` for the second, 257 characters: ``nexus run`` failed at its spawn with a
    traceback. The names are cut to 255 characters (a name's limit), the number kept."""
    long = "p" * 255
    names = agent_names([[f"./{long}"], [f"./{long}"], ["java", "-cp", ".", "a." + "q" * 300]])
    assert names == [long, "p" * 253 + "-2", "q" * 255]


def test_the_registration_wait_never_exceeds_the_shutdown_grace() -> None:
    assert register_timeout(5.0) == 5.0
    assert register_timeout(1.5) == 1.5
    assert register_timeout(60.0) == 10.0


def nexus_run(tmp_path: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
    env.update(COLUMNS="200", NO_COLOR="1", XDG_CONFIG_HOME=str(tmp_path / "xdg"))
    return subprocess.run(
        [sys.executable, "-m", "nexus_trio.cli", "run", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_a_program_of_the_config_that_did_not_start_is_named_by_its_key(
    tmp_path: Path,
) -> None:
    """Regression: a program of ``[app] spawn`` whose start failed was said as ``--spawn
    'CMD' did not start``, naming a flag the user never gave; it names the key and the
    file now, as the usage errors of that key do."""
    (tmp_path / "exits.py").write_text(EXITS)
    (tmp_path / "nexus.toml").write_text(f"[app]\nspawn = [{f'{PYTHON} exits.py'!r}]\n")
    result = nexus_run(tmp_path, "-c", "nexus.toml", "-d", "30", "--json")
    assert result.returncode == 1, result.stderr
    command = f"{sys.executable} exits.py"
    hint = f"[app] spawn (file {tmp_path / 'nexus.toml'})"
    assert json.loads(result.stdout)["error"] == (
        f"SpawnFailed: {hint} {command!r} did not start: exited (status 3) before registering"
        "; on stderr: 'cannot start: no API key'"
    )
    assert f"{hint} {command!r} did not start" in result.stderr
    assert "--spawn" not in result.stderr


def test_a_program_that_exits_before_registering_fails_the_run_naming_it(
    tmp_path: Path,
) -> None:
    (tmp_path / "exits.py").write_text(EXITS)
    result = nexus_run(tmp_path, "--spawn", f"{PYTHON} exits.py", "-d", "30", "--json")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    summary = json.loads(result.stdout)
    command = f"{sys.executable} exits.py"
    assert summary["error"] == (
        f"SpawnFailed: --spawn {command!r} did not start: exited (status 3) before registering"
        "; on stderr: 'cannot start: no API key'"
    )
    # stopped at the failure, not at -d 30 (that stop would say "duration": the first
    # stop asked names it), before the run's start was announced
    assert summary["stopped_by"] == "spawn failed"
    assert "for 30 s (Ctrl-C to stop)" not in result.stderr
    assert summary["workload"] is None
    (program,) = summary["spawned"]
    assert program["name"] == "exits"
    assert program["registered"] is False
    # the failed start is not restarted (it was: a restart killed at the stop showed
    # last_exit -15 beside the error's status 3, and 2 starts): its status is the error's
    assert (program["starts"], program["last_exit"]) == (1, 3)
    assert "restarting exits" not in result.stderr
    # what the program said on its way out is in the log once, and quoted by the errors
    # that say it did not start (the agent's failure, the run's)
    said = [line for line in result.stderr.splitlines() if "cannot start: no API key" in line]
    assert [line for line in said if "on stderr:" not in line] == [
        line for line in said if "nexus_trio.bridge.stderr" in line
    ]
    assert len(said) == 3, said


def test_a_program_that_prints_garbage_is_named_with_its_first_line_within_the_grace(
    tmp_path: Path,
) -> None:
    (tmp_path / "garbage.py").write_text(GARBAGE)
    (tmp_path / "nexus.toml").write_text("[kernel]\nshutdown_grace_ms = 1000\n")
    result = nexus_run(
        # (-d 30: the register timeout, not a stop during the handshake, ends its start;
        # a stop before it would give the handshake up: a graceful stop, no failure)
        tmp_path,
        "-c",
        "nexus.toml",
        "--spawn",
        f"{PYTHON} garbage.py",
        "-d",
        "30",
        "--json",
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    summary = json.loads(result.stdout)
    # a line that is no frame may be an agent's banner (the original kernel skipped it):
    # the register is waited for, at most the 1 s grace, and the failure names the line
    assert summary["error"].endswith(
        "did not start: did not register within 1s; it wrote 1 line that is no register"
        " frame: 'hello garbage' (a bridge agent's first frame on stdout is its register;"
        " logs go to stderr)"
    )
    # then the program gets SIGTERM at once (no shutdown frame and its grace: it never
    # spoke the protocol) and exits at it (no SIGKILL after a grace); the first code held
    # it 13 s
    (program,) = summary["spawned"]
    assert program["problem"].startswith("did not register within 1s")
    assert "skipped a line before its register: 'hello garbage'" in result.stderr
    assert (program["starts"], program["last_exit"]) == (1, -signal.SIGTERM)
    # (said so: "is not answering" was wrong of a program that wrote a line at once)
    assert result.stderr.count("has not registered (it is sent no shutdown frame); sending") == 1
    assert "is not answering" not in result.stderr
    assert "of shutdown; sending SIGTERM" not in result.stderr
    assert "sending SIGKILL" not in result.stderr


def test_a_registered_program_is_named_after_it_and_said_to_register_once(
    tmp_path: Path,
) -> None:
    (tmp_path / "my agent.py").write_text(REGISTERS)
    command = f"{PYTHON} 'my agent.py' --x 1"
    result = nexus_run(tmp_path, "--spawn", command, "-d", "0.5", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["error"] is None
    (program,) = summary["spawned"]
    counts = program.pop("counts")
    assert program == {
        "command": f"{sys.executable} 'my agent.py' --x 1",
        "name": "my agent",
        "registered": True,
        "registered_as": "--x+1",
        "starts": 1,
        "last_exit": 0,  # it exited at the shutdown frame
        "problem": None,
    }
    assert (counts["starts"], counts["lines_in"], counts["lines_out"]) == (1, 1, 1)
    (line,) = [ln for ln in result.stderr.splitlines() if "registered as" in ln]
    assert line.count("registered as") == 1
    assert "process agent my agent registered as '--x+1' (protocol 1)" in line
    # (a name other than its address: the line says which name addresses it)
    assert (
        "(protocol 1); its address is 'my agent', not the name it registered (send to 'my agent')"
    ) in line


@pytest.mark.parametrize(
    ("command", "missing"),
    [
        (f"{PYTHON} -u missing_agent.py --x 1", "missing_agent.py"),
        ("node dist/missing_agent.js", "dist/missing_agent.js"),
        (f"env X=1 {PYTHON} missing_agent.py", "missing_agent.py"),
    ],
)
def test_a_spawned_script_that_is_not_there_is_refused_before_anything_starts(
    tmp_path: Path, command: str, missing: str
) -> None:
    """Regression: ``--spawn "python3 missing_agent.py"`` (a typo, the wrong directory)
    started the run and the program, which failed with python's "can't open file": exit
    1 after the handshake's wait. A script the command certainly opens from here and that
    is not here is a usage error now (exit 2, naming it and the directory)."""
    result = nexus_run(tmp_path, "--spawn", command, "-d", "30")
    text = refused(result.returncode, result.stderr)
    assert (
        f"Invalid value for '--spawn': {missing!r} (in {command!r}) is not in the current"
        f" directory ({tmp_path}): the program would start and fail to open it"
    ) in text, text
    assert "spawned process agent" not in text


def test_the_summary_table_says_what_was_spawned(tmp_path: Path) -> None:
    (tmp_path / "ok.py").write_text(REGISTERS)
    (tmp_path / "exits.py").write_text(EXITS)
    result = nexus_run(
        tmp_path, "--spawn", f"{PYTHON} ok.py", "--spawn", f"{PYTHON} exits.py", "-d", "30"
    )
    assert result.returncode == 1
    out = " ".join(result.stdout.split())
    assert "run spawn: 2 process agents" in out
    assert f"ok {sys.executable} ok.py: registered as '' (1 start)" in out
    assert f"exits {sys.executable} exits.py: did not start: exited (status 3)" in out
    assert "ring workload" not in out


def test_the_summary_table_cuts_a_huge_registered_name_as_the_log_does(tmp_path: Path) -> None:
    """Regression: the summary table printed the name a program registered with whole: a
    program registering a 200 kB name made a 200 kB summary line. The table now shows it
    as the kernel's log line does (cut to 60 characters); JSON keeps it whole."""
    (tmp_path / "huge.py").write_text(REGISTERS.replace('"+".join(sys.argv[1:])', '"N" * 200_000'))
    result = nexus_run(tmp_path, "--spawn", f"{PYTHON} huge.py", "-d", "0.5")
    assert result.returncode == 0, result.stderr
    out = " ".join(result.stdout.split())
    assert f"huge {sys.executable} huge.py: registered as '{'N' * 59}... (1 start)" in out
    assert len(result.stdout) < 10_000, len(result.stdout)
    (logged,) = [ln for ln in result.stderr.splitlines() if "registered as" in ln]
    assert f"registered as '{'N' * 59}... (protocol 1)" in logged
    as_json = nexus_run(tmp_path, "--spawn", f"{PYTHON} huge.py", "-d", "0.5", "--json")
    assert json.loads(as_json.stdout)["spawned"][0]["registered_as"] == "N" * 200_000


@pytest.mark.parametrize(
    "payload", ['{"id": "x"}', '{"id": "x", "name": None}', '{"id": "x", "name": 42}']
)
def test_a_program_registered_without_a_name_shows_no_name(tmp_path: Path, payload: str) -> None:
    """Regression: a program whose ``register`` has no name (or a null one) was shown as
    registered as ``'None'`` in the table and ``"None"`` in ``--json``, as if it had
    chosen that name. JSON now says null and the table no name."""
    (tmp_path / "anon.py").write_text(
        REGISTERS.replace('{"id": "x", "name": "+".join(sys.argv[1:])}', payload)
    )
    as_json = nexus_run(tmp_path, "--spawn", f"{PYTHON} anon.py", "-d", "0.5", "--json")
    assert as_json.returncode == 0, as_json.stderr
    (program,) = json.loads(as_json.stdout)["spawned"]
    assert (program["registered"], program["registered_as"]) == (True, None)
    table = nexus_run(tmp_path, "--spawn", f"{PYTHON} anon.py", "-d", "0.5")
    assert table.returncode == 0, table.stderr
    out = " ".join(table.stdout.split())
    assert f"anon {sys.executable} anon.py: registered (1 start)" in out
    assert "None" not in out


def test_duration_counts_from_when_the_spawned_programs_registered(tmp_path: Path) -> None:
    """Regression: ``--duration`` counted from before the programs' handshakes, so a
    program slower to register than the duration (1.5 s here, against ``-d 0.3``) was
    stopped before it registered and never ran. The duration now counts from when every
    program has registered (or failed), as it counts from the end of the demo's spawning."""
    (tmp_path / "slow.py").write_text("import time\ntime.sleep(1.5)\n" + REGISTERS)
    started = time.monotonic()
    result = nexus_run(tmp_path, "--spawn", f"{PYTHON} slow.py", "-d", "0.3", "--json")
    took = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    (program,) = summary["spawned"]
    assert (program["registered"], program["problem"]) == (True, None)
    assert summary["stopped_by"] == "duration"
    assert took >= 1.8  # the handshake's 1.5 s, then the 0.3 s of the run


def test_the_summary_has_each_programs_final_bridge_counts(tmp_path: Path) -> None:
    """Regression: the summary copied a program's bridge counters while its agent was
    alive (at its start and at the run's stop) and had none but ``starts`` and
    ``last_exit``: what the program did afterwards (its way out, its exit status) and its
    line counts were lost. The bridge keeps a stopped agent's final counters now, and the
    summary reads them once the kernel has stopped."""
    (tmp_path / "noisy.py").write_text(
        REGISTERS.replace(
            "for line in sys.stdin:",
            "print('not a frame', flush=True)\n"
            "print('a warning', file=sys.stderr, flush=True)\n"
            "for line in sys.stdin:",
        ).replace("break", "print('bye', file=sys.stderr, flush=True); sys.exit(4)")
    )
    result = nexus_run(tmp_path, "--spawn", f"{PYTHON} noisy.py", "-d", "0.5", "--json")
    assert result.returncode == 0, result.stderr
    (program,) = json.loads(result.stdout)["spawned"]
    assert (program["registered"], program["starts"], program["last_exit"]) == (True, 1, 4)
    counts = program["counts"]
    assert (counts["starts"], counts["lines_in"], counts["invalid_lines"]) == (1, 2, 1)
    # the shutdown frame out; both stderr lines, the last one written on its way out
    assert (counts["lines_out"], counts["stderr_lines"], counts["sends_failed"]) == (1, 2, 0)


#: registers, then exits with status 4 a moment later: a program that keeps crashing
CRASHES = textwrap.dedent(
    """
    import json, sys, time
    print(json.dumps({"type": "register", "payload": {"id": "x", "name": "c"}}), flush=True)
    time.sleep(0.2)
    print("lost the database", file=sys.stderr, flush=True)
    sys.exit(4)
    """
)


def test_a_program_its_supervisor_gives_up_on_fails_and_stops_the_run(tmp_path: Path) -> None:
    """Regression: a program that registered and then kept crashing was restarted until
    its supervisor gave up on it (restart intensity exceeded, 'stopped for good; the
    kernel goes on'), and the run went on with nothing left to run until --duration (or
    forever, until Ctrl-C), then exited 0 with no error and ``problem`` null. It stops
    the run now, as a program whose first start fails: exit status 1, ``stopped_by``
    ``spawn failed``, the error and ``problem`` name the program, that it was given up
    on and its last failure; said once in the log, and in the table."""
    (tmp_path / "crashes.py").write_text(CRASHES)
    (tmp_path / "ok.py").write_text(REGISTERS)
    result = nexus_run(
        tmp_path, "--spawn", f"{PYTHON} ok.py", "--spawn", f"{PYTHON} crashes.py", "-d", "30",
        "--json",
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    summary = json.loads(result.stdout)
    command = f"{sys.executable} crashes.py"
    problem = (
        "stopped for good: restart intensity exceeded; last failure: exited with status 4;"
        " on stderr: 'lost the database'"
    )
    assert summary["error"] == f"SpawnFailed: --spawn {command!r} {problem}"
    # stopped when given up on, not at -d 30 (that stop would say "duration")
    assert summary["stopped_by"] == "spawn failed"
    ok, crashes = summary["spawned"]
    assert (ok["registered"], ok["problem"], ok["last_exit"]) == (True, None, 0)
    assert (crashes["registered"], crashes["problem"]) == (True, problem)
    assert (crashes["starts"], crashes["last_exit"]) == (4, 4)
    assert result.stderr.count(f"--spawn {command!r} {problem}") == 1
    table = nexus_run(tmp_path, "--spawn", f"{PYTHON} crashes.py", "-d", "30")
    assert table.returncode == 1, table.stderr
    out = " ".join(table.stdout.split())
    assert f"crashes {command}: registered as 'c' (4 starts), then {problem}" in out


#: registers, then ignores the shutdown frame and SIGTERM: only SIGKILL stops it
STUBBORN = textwrap.dedent(
    """
    import json, signal, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print(json.dumps({"type": "register", "payload": {"id": "x", "name": "s"}}), flush=True)
    while True:
        time.sleep(1)
    """
)


def test_a_program_that_ignores_its_stop_is_held_no_longer_than_the_kernel_s_grace(
    tmp_path: Path,
) -> None:
    """Regression: with ``[kernel] shutdown_grace_ms = 1000`` a registered program that
    ignored the shutdown frame and SIGTERM held the stop 10 s (the bridge's own 5 s grace,
    twice), where one that never registered is bounded by the kernel's grace. A --spawn
    program now gets the kernel's grace (at most the bridge's 5 s): 1 s after the
    shutdown frame, 1 s after SIGTERM, then SIGKILL. (The grace also bounds the wait for
    the program's register frame: 0.5 s failed a CI run at load, a Python child that had
    not started yet.)"""
    (tmp_path / "stubborn.py").write_text(STUBBORN)
    (tmp_path / "nexus.toml").write_text("[kernel]\nshutdown_grace_ms = 1000\n")
    result = nexus_run(
        tmp_path, "-c", "nexus.toml", "--spawn", f"{PYTHON} stubborn.py", "-d", "0.3", "--json"
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["spawned"][0]["last_exit"] == -9
    assert summary["elapsed_s"]["shutdown"] < 5.0, summary["elapsed_s"]
    assert "did not exit within 1s of shutdown; sending SIGTERM" in result.stderr


@pytest.mark.parametrize(
    ("args", "hint", "said"),
    [
        (
            ["send", "python3 agent.py 2>/dev/null", "1"],
            "'CMD'",
            "holds the shell operator '>', but no shell runs it",
        ),
        (["send", "FOO=1 python3 agent.py", "1"], "'CMD'", "variable assignment 'FOO=1'"),
        (["run", "--spawn", "python3 agent.py | tee log", "-d", "1"], "'--spawn'", "operator '|'"),
        # regression: expansions reached the program as text (python3 was asked for the
        # file '~/agent.py', or '$HOME/agent.py', and the agent died before registering)
        (["run", "--spawn", "python3 ~/agent.py", "-d", "1"], "'--spawn'", "tilde expansion"),
        (["send", "python3 $HOME/agent.py", "1"], "'CMD'", "variable expansion '$HOME'"),
        (["send", "python3 agents/*.py", "1"], "'CMD'", "the glob 'agents/*.py'"),
        (["run", "--spawn", "python3 `pwd`/a.py", "-d", "1"], "'--spawn'", "substitution '`pwd`'"),
    ],
)
def test_shell_syntax_in_a_command_string_is_refused_naming_it(
    args: list[str], hint: str, said: str
) -> None:
    """Before: ``nexus send "python3 agent.py 2>/dev/null" 1`` ran the agent with the
    arguments '2' and '/dev/null' (ignored: exit 0, stderr not redirected), and ``FOO=1
    python3 ...`` said "command 'FOO=1' not found on PATH": no shell runs the command.
    Likewise ``~/agent.py``, ``$HOME``, a glob or backticks reached python3 unexpanded,
    which died with "can't open file '/cwd/~/agent.py'" before registering."""
    from nexus_trio.cli import app
    from tests.cli_runner import CliRunner

    result = CliRunner().invoke(app, args, env={"COLUMNS": "300"})
    assert result.exit_code == 2, result.output
    out = " ".join(result.output.replace("│", " ").split())
    assert f"Invalid value for {hint}: command " in out
    assert said in out


@pytest.mark.parametrize("cmd", ["", "   "])
def test_an_empty_command_for_nexus_send_is_refused_in_the_cli_s_words(cmd: str) -> None:
    """Regression: ``nexus send "" 1`` said "process_agent: empty command []", the words
    of the Python API (and its split) rather than of the command line."""
    from nexus_trio.cli import app
    from tests.cli_runner import CliRunner

    result = CliRunner().invoke(app, ["send", cmd, "1"], env={"COLUMNS": "300"})
    assert result.exit_code == 2, result.output
    out = " ".join(result.output.replace("│", " ").split())
    said = f"Invalid value for 'CMD': empty command {cmd!r}: give the program to start"
    assert " ".join(said.split()) in out
    assert "process_agent" not in out


HUGE_LINE = textwrap.dedent(
    """
    import json, sys, time, uuid
    register = {"type": "register", "payload": {"id": str(uuid.uuid4()), "name": "huge"}}
    sys.stdout.write(json.dumps(register) + "\\n")
    sys.stdout.write("x" * (1 << 21) + "\\n")
    sys.stdout.flush()
    time.sleep(60)
    """
)
#: what a user of nexus send or nexus run --spawn, who cannot set process_agent's
#: line_limit, is told of a child's line over the limit
LINE_ADVICE = (
    "exceeds the limit of 1048576 bytes; discarded (the child is to write shorter lines, e.g."
    " a large answer in parts; the limit is process_agent(line_limit=) for a program that"
    " spawns it, and 1048576 bytes under nexus send and nexus run --spawn)"
)


def test_a_line_over_the_limit_says_what_a_spawn_user_can_do(tmp_path: Path) -> None:
    """Regression: the error pointed to ``process_agent(line_limit=)`` alone, which a
    user of ``nexus run --spawn`` or ``[app] spawn`` cannot set."""
    (tmp_path / "huge.py").write_text(HUGE_LINE)
    result = nexus_run(tmp_path, "--spawn", f"{PYTHON} huge.py", "-d", "2", "--json")
    assert "Traceback" not in result.stderr
    assert LINE_ADVICE in result.stderr, result.stderr


def test_a_line_over_the_limit_says_what_a_send_user_can_do(tmp_path: Path) -> None:
    """As above, for ``nexus send``: the answer's line over the limit fails the send."""
    toy = Path(__file__).parent / "children" / "toy_agent.py"
    command = f"{PYTHON} {shlex.quote(str(toy))}"
    payload = json.dumps({"op": "huge", "size": 1_100_000})
    result = subprocess.run(
        [sys.executable, "-m", "nexus_trio.cli", "send", command, payload, "-t", "30"],
        env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "Traceback" not in result.stderr
    assert "nexus send: the message failed (malformed)" in result.stderr, result.stderr
    assert LINE_ADVICE in result.stderr.splitlines()[-1]


@pytest.mark.parametrize("kind", ["Query", "Command"])
def test_nexus_send_waits_as_long_as_its_timeout_says_beyond_the_handle_timeout(
    kind: str,
) -> None:
    """Regression: ``--timeout`` ("seconds to wait for the answer") was cut short by the
    kernel's handle timeout (``[kernel] handle_timeout_ms``, 30 s by default): ``nexus send
    CMD JSON -t 60`` to an agent answering after 40 s failed at 30 s with ``the message
    failed (handler_timeout): handler_timeout``. A handle timeout of 0.5 s here stands for
    the 30 s; the agent answers after 1.5 s, within -t 20."""
    toy = Path(__file__).parent / "children" / "toy_agent.py"
    command = f"{PYTHON} {shlex.quote(str(toy))}"
    payload = json.dumps({"op": "sleep", "seconds": 1.5})
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    env["NEXUS_KERNEL__HANDLE_TIMEOUT_MS"] = "500"

    cli = [sys.executable, "-m", "nexus_trio.cli", "send", command, payload, "--compact"]

    def send(wait: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*cli, "-t", wait, "--kind", kind],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    result = send("20")
    assert (result.returncode, result.stdout) == (0, '"slept"\n'), result.stderr
    # A wait that ends before the answer is said in --timeout's words, not the handler's.
    result = send("0.5")
    assert result.returncode == 1
    last = result.stderr.splitlines()[-1]
    assert last == "nexus send: no answer within 0.5s (--timeout gives it longer)", last


#: registers, notes each frame and a SIGTERM in a file, and never answers
NOTES_ITS_STOP = textwrap.dedent(
    """
    import json, signal, sys
    notes = sys.argv[1]
    def note(what):
        with open(notes, "a") as f:
            f.write(what + "\\n")
    def on_term(*_):
        note("SIGTERM")
        sys.exit(0)
    signal.signal(signal.SIGTERM, on_term)
    frame = {"type": "register", "payload": {"id": "x", "name": "deaf"}}
    print(json.dumps(frame), flush=True)
    for line in sys.stdin:
        note(json.loads(line)["type"])
    """
)


def _send_to_noting_agent(
    tmp_path: Path, source: str, **env: str
) -> tuple[subprocess.Popen[str], Path]:
    """``nexus send`` of one message to the agent program ``source`` (NOTES_ITS_STOP or a
    variation), which notes what it gets in the file returned beside the process."""
    (tmp_path / "agent.py").write_text(source)
    notes = tmp_path / "notes"
    command = f"{PYTHON} agent.py {shlex.quote(str(notes))}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "nexus_trio.cli", "send", command, "1", "-t", "60"],
        cwd=tmp_path,
        env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return proc, notes


def _wait_noted(proc: subprocess.Popen[str], notes: Path, word: str) -> None:
    """Until the agent has noted ``word`` (a 60 s guard against a hang, not a timing)."""
    deadline = time.monotonic() + 60
    while not (notes.exists() and word in notes.read_text()):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"the agent never noted {word!r}"
        time.sleep(0.05)


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP"])
def test_a_sigterm_or_sighup_of_nexus_send_stops_the_agent_gracefully(
    signame: str, tmp_path: Path
) -> None:
    """Regression: ``nexus send`` took SIGTERM (``timeout 5 nexus send ...``, a service
    manager) and SIGHUP (a closed terminal) by their default action: it died at once,
    without a word (status -15 / -1), and its agent was SIGKILLed by the kernel's guardian,
    without being told to stop. It now stops as for Ctrl-C: the kernel stops the agent
    (the message it holds given up, the child sent SIGTERM, which it can handle), says
    so, and exits 128 + the signal's number."""
    proc, notes = _send_to_noting_agent(tmp_path, NOTES_ITS_STOP)
    try:
        _wait_noted(proc, notes, "message")
        signum = signal.Signals[signame]
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 128 + signum, err
    assert out == ""
    assert f"{signame}: stopping the agent gracefully" in err
    assert f"nexus send: stopped by {signame}: no answer; the agent was stopped" in err
    assert "Traceback" not in err
    assert notes.read_text().split() == ["message", "SIGTERM"]


def test_a_ctrl_c_of_nexus_send_says_the_message_had_no_answer_as_a_sigterm_does(
    tmp_path: Path,
) -> None:
    """Regression (forty-second pass, a user's first hour): a Ctrl-C of ``nexus send``
    while its agent worked on the message ended it with status 130 and an empty line:
    nothing said that the message had no answer, where a SIGTERM says so. It says so
    too. (The kernel's Ctrl-C: its shutdown gives the message the grace, 1 s here.)"""
    proc, notes = _send_to_noting_agent(
        tmp_path, NOTES_ITS_STOP, NEXUS_KERNEL__SHUTDOWN_GRACE_MS="1000"
    )
    try:
        _wait_noted(proc, notes, "message")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 130, err
    assert out == ""
    assert "KeyboardInterrupt: shutting down gracefully" in err
    assert err.splitlines()[-1] == (
        "nexus send: stopped by SIGINT (Ctrl-C): no answer; the agent was stopped"
    ), err
    assert "Traceback" not in err
    assert notes.read_text().split()[-1] == "SIGTERM"


async def test_a_ctrl_c_that_lands_in_the_handler_after_its_write_stops_the_child_as_stuck(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cause of the rare failure of the test above ('shutdown' != 'SIGTERM': 1 of 42
    runs at load before d4d9e80): Trio raises a Ctrl-C's KeyboardInterrupt in the code
    that runs when it comes, unless that code is protected, and a process agent's handler
    is not. A Ctrl-C sent once the child had noted the message landed, when this process
    had been held off the CPU since the write (load), in the handler between its write and
    its wait for the answer. The handler caught only ``Cancelled`` there: the message was
    not given up but dropped from those in flight, so ``on_stop`` took the child for one
    that reads its shutdown frame and sent it that, not the stuck child's SIGTERM. Here
    the KeyboardInterrupt is raised at that very point: the kernel takes it as its Ctrl-C
    (a graceful shutdown, then ``open_kernel`` raises it) and the child is sent SIGTERM."""
    (tmp_path / "agent.py").write_text(NOTES_ITS_STOP)
    notes = tmp_path / "notes"
    write = ProcessAgent._write

    async def interrupted_after_the_message(self: ProcessAgent, data: bytes, **how: Any) -> None:
        await write(self, data, **how)
        if json.loads(data)["type"] == "message":
            # once the child has noted it (as in the failure: else a loaded machine's
            # child may be sent SIGTERM before it read the line, CI 214)
            while not (notes.exists() and "message" in notes.read_text()):  # noqa: ASYNC110
                await trio.sleep(0.01)  # (another process's file: no event)
            raise KeyboardInterrupt  # (as Trio raises a Ctrl-C in unprotected code)

    monkeypatch.setattr(ProcessAgent, "_write", interrupted_after_the_message)
    spec = process_agent(
        [sys.executable, "agent.py", str(notes)],
        cwd=tmp_path,
        restart="temporary",
        shutdown_grace=1.0,
    )
    with trio.fail_after(60), pytest.raises(KeyboardInterrupt):  # (a guard, not a timing)
        async with open_kernel(make_config(shutdown_grace_ms=1000)) as kernel:
            await kernel.request(kernel.spawn(spec), 1, timeout=60)
    assert notes.read_text().split() == ["message", "SIGTERM"]


#: ``nexus``, its log's writer thread held back before each record (as at load, where it
#: is behind the main thread): what the command writes last must not depend on it
BEHIND_LOG_WRITER = """
import sys, time
from nexus_trio import logs
write = logs._CountsLostRecords.write_queued
def behind(self, *args):
    time.sleep(0.3)  # (the writer thread held off the CPU: a simulated lag, no timing)
    write(self, *args)
logs._CountsLostRecords.write_queued = behind
from nexus_trio.cli import main
sys.argv[0] = "nexus"
main()
"""


def test_nexus_send_writes_its_last_line_after_the_records_of_its_log(tmp_path: Path) -> None:
    """Forty-fourth pass: the other rare failure of the Ctrl-C test above (1 of 48 at
    load, a log record after ``nexus send: stopped by SIGINT ...``). The log's records go
    to standard error from a writer thread (a pipe there), and ``nexus send`` wrote its
    last line without waiting for the records queued: one written behind came after it.
    It waits for them first now (``flush_logs``), as ``nexus run`` does before its
    summary. Here the writer is held back on purpose, and the child fails to start."""
    (tmp_path / "nexus_behind.py").write_text(BEHIND_LOG_WRITER)
    failing = f"{PYTHON} -c 'import sys; sys.exit(3)'"
    sent = subprocess.run(
        [sys.executable, "nexus_behind.py", "send", failing, "1"],
        cwd=tmp_path,
        env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert sent.returncode == 1, sent.stderr
    lines = sent.stderr.splitlines()
    assert lines[-1].startswith("nexus send: the agent did not start: "), sent.stderr
    assert any("ERROR" in line and "exited (status 3)" in line for line in lines[:-1])


def test_nexus_send_reads_the_payload_from_standard_input_given_as_dash(tmp_path: Path) -> None:
    """Regression (forty-second pass, a user's first hour): a payload larger than one
    argument may be (128 KiB on Linux: ``Argument list too long``) could not be sent at
    all; ``-`` (not JSON, so no payload it was) reads it from standard input, as ``curl
    -d @-`` and ``jq`` take theirs. Bad input is named as the argument's is."""
    example = Path(__file__).resolve().parent.parent / "examples" / "python_agent_example.py"
    command = [sys.executable, "-m", "nexus_trio.cli", "send", f"{PYTHON} {example}", "-"]
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    big = json.dumps({"operation": "add", "a": 40, "b": 2, "note": "x" * 200_000})
    sent = subprocess.run(
        [*command, "--compact"], input=big, env=env, capture_output=True, text=True, timeout=60
    )
    assert (sent.returncode, sent.stdout) == (0, '{"result": 42}\n'), sent.stderr
    # (bad input is refused before any agent starts: in process)
    for given, said in [
        ("{oops", "Invalid value for 'JSON': not JSON: Expecting property name"),
        (b"\xff", "standard input (-) is not UTF-8 text (invalid start byte at byte 0)"),
    ]:
        result = CliRunner().invoke(app, ["send", command[4], "-"], input=given, env=env)
        assert result.exit_code == 2, result.output
        assert said in flat(result.output), result.output


#: as NOTES_ITS_STOP, but a SIGTERM takes it a while: it notes it, then exits 1.5 s later
SLOW_TO_STOP = NOTES_ITS_STOP.replace(
    'note("SIGTERM")\n    sys.exit(0)',
    'note("SIGTERM")\n    import time; time.sleep(1.5)\n    sys.exit(0)',
)


@pytest.mark.parametrize("second", ["SIGTERM", "SIGHUP"])
def test_a_second_signal_while_nexus_send_stops_its_agent_changes_nothing(
    second: str, tmp_path: Path
) -> None:
    """Review of the thirty-fourth pass: a second SIGTERM or SIGHUP, while ``nexus send``
    stops its agent after a first SIGTERM (an impatient ``kill``, a closed terminal), was
    left pending in the signal receiver, and Trio raises what is pending again as the
    receiver closes, with the default action back: the process was killed by it once
    the agent had stopped, without its last line and its exit status (-15 / -1 for
    Popen). It is taken now, as the first one: exit 143, said once."""
    assert SLOW_TO_STOP != NOTES_ITS_STOP
    proc, notes = _send_to_noting_agent(tmp_path, SLOW_TO_STOP)
    try:
        _wait_noted(proc, notes, "message")
        proc.send_signal(signal.SIGTERM)
        _wait_noted(proc, notes, "SIGTERM")  # (the agent is being stopped: it takes 1.5 s)
        proc.send_signal(signal.Signals[second])
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, err)
    assert out == ""
    assert err.count("stopping the agent gracefully") == 1, err
    assert "nexus send: stopped by SIGTERM: no answer; the agent was stopped" in err
    assert "Traceback" not in err
