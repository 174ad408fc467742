"""The console scripts' entry (``_nexus_trio_main``): a run started with SIGINT ignored
takes it back before the heavy imports (nexus_trio, Trio, typer, rich), not once the
run's code runs; the other commands, and ``--workers`` workers, keep what they
inherited. Real processes, the entry read from pyproject.toml as the installer does."""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

from nexus_trio.cli import app
from nexus_trio.cli._cluster_cmd import WORKER_ENV
from nexus_trio.cli._commands import PROGRAM_NAMES, default_to_run

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]

#: from its run on, notes each SIGINT handler set and whether ``{module}`` had been
#: imported yet (``seen``)
SPY_ON_SIGINT = """
import signal, sys

seen = []
real = signal.signal


def spy(signum, handler):
    if signum == signal.SIGINT:
        seen.append({{"handler": handler is not signal.SIG_IGN, "late": {module!r} in sys.modules}})
    return real(signum, handler)


signal.signal = spy
"""

#: run in a process started with SIGINT ignored: imports the console script's entry as
#: the generated script does, and says, for each SIGINT handler set from then on,
#: whether nexus_trio had been imported yet; then calls it
PROBE = (
    SPY_ON_SIGINT.format(module="nexus_trio")
    + """
import importlib, json

module, _, attr = sys.argv[1].partition(":")
sys.argv = ["nexus", *sys.argv[2:]]
main = getattr(importlib.import_module(module), attr)
print(json.dumps({"at_import": list(seen),
                  "ignored": signal.getsignal(signal.SIGINT) is signal.SIG_IGN}), flush=True)
main()
"""
)


def probe(args: list[str], **env: str) -> tuple[dict[str, object], int]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    environ["XDG_CONFIG_HOME"] = str(ROOT / "no-such-dir")
    environ.update(env)
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, SCRIPTS["nexus"], *args],
        env=environ,
        cwd=ROOT / "tests",
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    first = proc.stdout.splitlines()[0] if proc.stdout else "{}"
    assert first.startswith("{"), proc.stdout + proc.stderr
    return json.loads(first), proc.returncode


def test_both_scripts_have_the_one_entry() -> None:
    assert SCRIPTS == {"nexus": "_nexus_trio_main:main", "nexus-runtime": "_nexus_trio_main:main"}


@pytest.mark.parametrize(
    "args", [["run", "-n", "2", "-d", "0.01", "--no-live"], ["-n", "2", "-d", "0.01"]], ids=" ".join
)
def test_a_run_started_with_sigint_ignored_takes_it_back_before_importing_nexus_trio(
    args: list[str],
) -> None:
    """Regression: the run took SIGINT back only once its own code ran, after the
    interpreter's start and the imports of nexus_trio, Trio, typer and rich (a median
    561 ms from exec under strace, 545 files opened; docs/cli.md, Signals): a Ctrl-C in
    that window was lost. The entry now gives Python's handler back before it imports
    nexus_trio (31 ms, 44 files)."""
    said, status = probe(args)
    assert status == 0
    assert said["at_import"] == [{"handler": True, "late": False}]
    assert said["ignored"] is False


@pytest.mark.parametrize("args", [["version"], ["config", "show"], ["--help"]], ids=" ".join)
def test_the_other_commands_keep_sigint_ignored(args: list[str]) -> None:
    said, status = probe(args)
    assert status == 0
    assert said == {"at_import": [], "ignored": True}


def test_a_workers_worker_keeps_its_signals_to_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker (``NEXUS_WORKER`` set) is started with the stop signals blocked and notes
    them itself once its run starts (``catch_stop_signals_early``): the entry leaves it."""
    said, _status = probe(["version"], **{WORKER_ENV: "worker-0"})
    assert said == {"at_import": [], "ignored": True}
    said, _status = probe(["run", "--help"], **{WORKER_ENV: "worker-0"})
    assert said == {"at_import": [], "ignored": True}


def entry(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.setattr(sys, "argv", ["nexus", "version"])  # (its import then sets nothing)
    return importlib.import_module("_nexus_trio_main")


#: as PROBE's start, then a SIGINT to itself as nexus_trio begins to be imported
INTERRUPTED = """
import importlib, os, signal, sys


class Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == "nexus_trio":
            os.kill(os.getpid(), signal.SIGINT)
        return None


sys.meta_path.insert(0, Interrupt())
module, _, attr = sys.argv[1].partition(":")
sys.argv = ["nexus", *sys.argv[2:]]
getattr(importlib.import_module(module), attr)()
"""


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["run", "-d", "5"], "nexus: interrupted: SIGINT while starting: the run was not started"),
        (["-n", "2"], "nexus: interrupted: SIGINT while starting: the run was not started"),
    ],
    ids=["run", "options"],
)
def test_a_ctrl_c_before_the_run_s_code_runs_ends_it_in_one_line(
    args: list[str], said: str
) -> None:
    """A SIGINT that comes as nexus_trio is imported (a run started with it ignored
    takes it there now) ends the run unstarted, status 130, in one line as one while the
    app is imported does, not with the import's traceback."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-c", INTERRUPTED, SCRIPTS["nexus"], *args],
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (130, "", said + "\n")


def test_the_entry_reads_a_command_line_as_the_app_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """The entry cannot import the app (that import is the window): it reads the command
    line on its own, with the root's options, the program names and the worker marker
    written again; they must be the app's."""
    main = entry(monkeypatch)
    import typer.main

    group = typer.main.get_command(app)
    ctx = group.make_context("nexus", ["version"])
    root = frozenset(
        name for param in group.get_params(ctx) for name in (*param.opts, *param.secondary_opts)
    )
    assert root == main.ROOT_OPTIONS
    assert main.PROGRAM_NAMES == PROGRAM_NAMES
    assert main.WORKER_ENV == WORKER_ENV
    for line in [
        [],
        ["run"],
        ["run", "-n", "4"],
        ["-n", "4", "-d", "10"],
        ["--agents=4"],
        ["nexus-runtime", "-n", "4"],
        ["nexus", "run"],
        ["nexus", "nexus", "run"],
        ["nexus-runtime"],
        ["--", "run"],
        ["-h"],
        ["--help"],
        ["-V"],
        ["--version"],
        ["--show-completion"],
        ["--install-completion=bash"],
        ["version"],
        ["config", "show"],
        ["send", "x", "1"],
        ["bench"],
        ["health"],
        ["runn"],
    ]:
        as_the_app = default_to_run(line, root)
        assert main.is_a_run(line) == (as_the_app[:1] == ["run"]), line


#: a ``sitecustomize`` that says, for each SIGINT handler set in the process, whether
#: Trio had been imported yet (in the file ``SPY_OUT``, at the exit)
SPY = (
    SPY_ON_SIGINT.format(module="trio")
    + """
import atexit, json, os

atexit.register(lambda: open(os.environ["SPY_OUT"], "w").write(json.dumps(seen)))
"""
)


def python_m(
    tmp_path: Path,
    site: str,
    module: str,
    args: list[str],
    *,
    ignored: bool = False,
    ignoring: tuple[signal.Signals, ...] = (),
    **env: str,
) -> subprocess.CompletedProcess[str]:
    """``python -m module args`` in ``tmp_path``, with ``site`` as its ``sitecustomize``
    and ``env``, started with SIGINT ignored if ``ignored``, and the signals ``ignoring``."""
    ignore = (signal.SIGINT,) * ignored + ignoring

    def ignoring_them() -> None:
        for signum in ignore:
            signal.signal(signum, signal.SIG_IGN)

    (tmp_path / "sitecustomize.py").write_text(site)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
    paths = [str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH")]
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, paths))
    environ["XDG_CONFIG_HOME"] = str(tmp_path / "no-such-dir")
    environ.update(env)
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        env=environ,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=ignoring_them if ignore else None,
    )


def spied_m(tmp_path: Path, module: str, args: list[str]) -> tuple[list[dict[str, bool]], int]:
    """The SIGINT handlers ``python -m module args`` set, started with SIGINT ignored."""
    (tmp_path / "otherapp").mkdir(exist_ok=True)
    (tmp_path / "otherapp" / "__init__.py").write_text("import nexus_trio\n")
    (tmp_path / "otherapp" / "__main__.py").write_text("print('other')\n")
    proc = python_m(tmp_path, SPY, module, args, ignored=True, SPY_OUT=str(tmp_path / "seen.json"))
    assert proc.returncode == 0, proc.stderr
    return json.loads((tmp_path / "seen.json").read_text()), proc.returncode


def test_python_m_a_run_takes_sigint_back_before_importing_trio(tmp_path: Path) -> None:
    """Forty-sixth pass: ``python -m nexus_trio.cli run`` imports the package (Trio) and
    ``nexus_trio.cli`` (typer, rich) before its ``__main__``, and took SIGINT back only
    once the run's code ran (a median 892 ms from exec under strace at load 8, 548 files
    opened): the package's first lines now give it back for such a run, before Trio
    (47 ms, 45 files); the other commands, and other ``-m`` programs that import
    nexus_trio, keep what they inherited. (Fails on f647f8e: the first handler is set
    with Trio imported.)"""
    seen, _ = spied_m(tmp_path, "nexus_trio.cli", ["run", "-n", "2", "-d", "0.01", "--no-live"])
    assert seen[:1] == [{"handler": True, "late": False}]
    assert spied_m(tmp_path, "nexus_trio.cli", ["version"])[0] == []
    assert spied_m(tmp_path, "otherapp", ["run", "-n", "2"])[0] == []


#: a ``sitecustomize`` that sends its process a SIGINT as the module ``KI_AT`` begins
#: to be imported (once)
INTERRUPT_AT = """
import os, signal, sys


class Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == os.environ["KI_AT"]:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None


sys.meta_path.insert(0, Interrupt())
"""


@pytest.mark.parametrize(
    ("args", "at", "said"),
    [
        (["run", "-d", "5"], "trio", ": the run was not started"),
        (["-n", "2"], "typer", ": the run was not started"),
        (["version"], "rich", ""),
        (["config", "show"], "nexus_trio.cli._app", ""),
    ],
    ids=["run-trio", "options-typer", "version-rich", "config-app"],
)
def test_python_m_a_ctrl_c_while_the_packages_are_imported_ends_in_one_line(
    tmp_path: Path, args: list[str], at: str, said: str
) -> None:
    """Forty-seventh pass: ``python -m nexus_trio.cli`` imports the package (Trio) and
    ``nexus_trio.cli`` (typer, rich) before its ``__main__``; a Ctrl-C there ended in
    Python's ``KeyboardInterrupt`` traceback (the process killed by SIGINT), where the
    console scripts say it in one line. It is said so now, status 130, as theirs.
    (Fails on 1242268: a traceback, status -2.)"""
    proc = python_m(tmp_path, INTERRUPT_AT, "nexus_trio.cli", args, KI_AT=at)
    line = f"nexus: interrupted: SIGINT while starting{said}\n"
    assert (proc.returncode, proc.stdout, proc.stderr) == (130, "", line)


#: a ``sitecustomize`` that sends its process the signal ``STOP_SIGNAL`` (a name), ``STOP_TIMES``
#: times, as the module ``STOP_AT`` begins to be imported (once); ``STOP_SIGNAL`` may
#: name several, comma-separated, sent in that order
STOP_AT = """
import os, signal, sys


class Stop:
    def find_spec(self, name, path=None, target=None):
        if name == os.environ["STOP_AT"]:
            sys.meta_path.remove(self)
            for _ in range(int(os.environ["STOP_TIMES"])):
                for signame in os.environ["STOP_SIGNAL"].split(","):
                    os.kill(os.getpid(), getattr(signal, signame))
        return None


sys.meta_path.insert(0, Stop())
"""


@pytest.mark.parametrize(
    ("how", "signame", "at"),
    [
        ("-m", "SIGTERM", "trio"),
        ("-m", "SIGHUP", "typer"),
        ("script", "SIGTERM", "nexus_trio"),
        ("script", "SIGHUP", "rich"),
    ],
    ids=["m-sigterm-trio", "m-sighup-typer", "script-sigterm", "script-sighup-rich"],
)
def test_a_stop_signal_while_nexus_starts_is_the_run_s_graceful_stop(
    tmp_path: Path, how: str, signame: str, at: str, sighup_default: None
) -> None:
    """Fiftieth pass: a SIGTERM or SIGHUP that came while ``nexus run`` started (the
    interpreter importing nexus_trio, Trio, typer and rich: a second or more on a busy
    host) ended the process by the signal's default action: status -15 / -1 (143 / 129
    in a shell), nothing on stdout, not a word on stderr; one a moment later was the
    run's graceful stop with its summary (measured: ``nexus run -d 0 --json``, SIGTERM
    1.0, 2.0 and 2.6 s after the exec: -15 each; at 3.2 s: 0 and the summary). The entry
    now notes them, and the run takes them as its stop once it can: the summary,
    ``stopped_by`` the signal, exit 0. (Fails with main's ``_nexus_trio_main.py``: status
    -15 / -1, stdout empty.)"""
    args = ["run", "-n", "2", "-d", "30", "--json", "--no-live"]
    env = {"STOP_AT": at, "STOP_SIGNAL": signame, "STOP_TIMES": "1"}
    module = "nexus_trio.cli"
    if how == "script":  # the console script's entry, called as the generated script does
        (tmp_path / "nexus_script.py").write_text("from _nexus_trio_main import main\nmain()\n")
        module = "nexus_script"
    proc = python_m(tmp_path, STOP_AT, module, args, **env)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"{signame}: shutting down gracefully" in proc.stderr
    summary = json.loads(proc.stdout)
    assert (summary["stopped_by"], summary["error"], summary["conserved"]) == (signame, None, True)


def test_two_sigterms_while_nexus_starts_force_the_exit(tmp_path: Path) -> None:
    """Each SIGTERM that comes while ``nexus run`` starts counts, as once it runs: a
    second forces the exit, status 130, no summary (docs/cli.md, Signals). (With main's
    entry: killed by the first, status -15.)"""
    args = ["run", "-n", "2", "-d", "30", "--json", "--no-live"]
    env = {"STOP_AT": "trio", "STOP_SIGNAL": "SIGTERM", "STOP_TIMES": "2"}
    proc = python_m(tmp_path, STOP_AT, "nexus_trio.cli", args, **env)
    assert (proc.returncode, proc.stdout) == (130, ""), proc.stderr
    assert "SIGTERM again: forced exit" in proc.stderr


@pytest.mark.parametrize(
    ("how", "signame", "args", "said"),
    [
        ("-m", "SIGTERM", ["run", "--help"], ("stdout", "Usage: nexus run [OPTIONS]")),
        ("script", "SIGTERM", ["run", "-n", "abc"], ("stderr", "Invalid value for '--agents'")),
        ("-m", "SIGHUP", ["-n", "abc"], ("stderr", "Invalid value for '--agents'")),
        ("-m", "SIGTERM", ["run", "--generate-config", "made.toml"], ("stdout", "wrote ")),
        ("script", "SIGHUP", ["run", "-c", "bad.toml"], ("stderr", "nexus: error: ")),
    ],
    ids=["help", "usage-error-script", "usage-error-sighup", "generate-config", "bad-config"],
)
def test_a_stop_signal_while_nexus_starts_ends_a_command_that_runs_nothing_by_it(
    tmp_path: Path,
    how: str,
    signame: str,
    args: list[str],
    said: tuple[str, str],
    sighup_default: None,
) -> None:
    """Fifty-first pass: a SIGTERM or SIGHUP that came while ``nexus run`` started (noted
    by the entry, fiftieth pass) was dropped when the command ran no run (``--help``, a
    usage error, ``--generate-config``, a config refused): status 0 or 2, as if it never
    came, where a ``timeout`` or a service manager that sent it expects the process to
    end by it. Now its output is written whole, then the process ends by the signal's
    default action: status -15 / -1 (143 / 129 in a shell). (With main's
    ``_nexus_trio_main.py`` and ``_run.py``: status 0, 2, 2, 0, 2.)"""
    (tmp_path / "bad.toml").write_text("x = [\n")
    env = {"STOP_AT": "trio", "STOP_SIGNAL": signame, "STOP_TIMES": "1"}
    module = "nexus_trio.cli"
    if how == "script":  # the console script's entry, called as the generated script does
        (tmp_path / "nexus_script.py").write_text("from _nexus_trio_main import main\nmain()\n")
        module = "nexus_script"
    proc = python_m(tmp_path, STOP_AT, module, args, **env)
    assert proc.returncode == -getattr(signal, signame), (proc.returncode, proc.stderr)
    stream, text = said
    assert text in getattr(proc, stream), (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    if "--generate-config" in args:
        assert (tmp_path / "made.toml").read_text().startswith("#")


@pytest.mark.parametrize(
    ("args", "kind"),
    [(["-n", "abc"], "usage error"), (["-c", "bad.toml"], "config error")],
    ids=["usage-error", "config-error"],
)
def test_a_refused_run_json_says_the_status_of_a_stop_that_came_as_it_started(
    tmp_path: Path, args: list[str], kind: str, sighup_default: None
) -> None:
    """Fifty-fifth pass (review): a refused ``nexus run --json`` writes one object with
    its ``exit_status``; a SIGTERM that came as it started (here as Trio is imported) ends
    the process by it at its exit (status -15, 143 in a shell), as documented, while the
    object said ``exit_status`` 2. It says 143 now, the status the process has. (With
    main's _commands.py and _nexus_trio_main.py: 2.)"""
    (tmp_path / "bad.toml").write_text("x = [\n")
    proc = python_m(
        tmp_path,
        STOP_AT,
        "nexus_trio.cli",
        ["run", "--json", *args],
        STOP_AT="trio",
        STOP_SIGNAL="SIGTERM",
        STOP_TIMES="1",
    )
    assert proc.returncode == -signal.SIGTERM, (proc.returncode, proc.stderr)
    said = json.loads(proc.stdout)
    assert (said["stopped_by"], said["started"]) == (kind, False)
    assert said["exit_status"] == 128 + signal.SIGTERM


#: a ``sitecustomize`` that sends its process a SIGUSR1 from its last exit function (the
#: first registered), after the run's handlers are put back and its summary written
USR1_AT_EXIT = """
import atexit, os, signal

atexit.register(lambda: os.kill(os.getpid(), signal.SIGUSR1))
"""


@pytest.mark.parametrize(
    ("how", "at", "workers"),
    [
        ("-m", "trio", 0),
        ("script", "nexus_trio", 0),
        ("-m", "myapp", 0),
        ("-m", "exit", 0),
        ("-m", "exit", 1),
    ],
    ids=["m-trio", "script-nexus-trio", "app-import", "at-exit", "workers-at-exit"],
)
def test_a_sigusr1_while_no_run_handler_is_in_place_is_harmless(
    tmp_path: Path, how: str, at: str, workers: int
) -> None:
    """Fifty-fifth pass: a SIGUSR1 (``kill -USR1``, the agent tree) that came while ``nexus
    run`` started (the imports, the config, the app's import) or once the run's handler
    was put back (the summary written, at the exit; with ``--workers`` the parent's and
    each worker's, which the parent passes it on to) ended the process by its default
    action: status -10 (138 in a shell), no summary. The entry now gives it a handler
    that does nothing from its first lines: the run goes on, its summary and status 0.
    (With main's ``_nexus_trio_main.py``: -10 in each case, stdout empty but for
    ``at-exit``, whose summary was written before.)"""
    (tmp_path / "myapp.py").write_text("async def main(kernel):\n    pass\n")
    args = ["run", "-d", "0.2", "--json", "--no-live"]
    args += ["--app", "myapp:main"] if at == "myapp" else ["-n", "2"]
    if workers:
        args += ["-W", str(workers)]
    env = {"STOP_AT": at, "STOP_SIGNAL": "SIGUSR1", "STOP_TIMES": "1"}
    module = "nexus_trio.cli"
    if how == "script":  # the console script's entry, called as the generated script does
        (tmp_path / "nexus_script.py").write_text("from _nexus_trio_main import main\nmain()\n")
        module = "nexus_script"
    site = USR1_AT_EXIT if at == "exit" else STOP_AT
    proc = python_m(tmp_path, site, module, args, **env)
    assert proc.returncode == 0, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    summary = json.loads(proc.stdout)
    assert (summary["error"], summary["conserved"]) == (None, True)
    if workers:
        assert [w["exit"] for w in summary["per_worker"]] == ["exit code 0"]


#: :data:`STOP_AT` with an exit function registered before ``nexus``'s code, as coverage's
#: or a ``sitecustomize``'s is: it writes ``ran`` to ``$ATEXIT_FILE``
ATEXIT_BEFORE = (
    """
import atexit, os


def said():
    with open(os.environ["ATEXIT_FILE"], "a") as file:
        file.write("ran\\n")


atexit.register(said)
"""
    + STOP_AT
)


@pytest.mark.parametrize("how", ["-m", "script"])
def test_an_exit_function_registered_before_nexus_runs_before_a_stop_ends_it(
    tmp_path: Path, how: str
) -> None:
    """Fifty-second pass: the end by a SIGTERM that came as ``nexus run --help`` started
    (status -15, the test above) was done in an exit function of the entry's, which
    runs before those registered earlier (``atexit`` runs them last first): a
    ``sitecustomize``'s or coverage's never ran (measured: the file below not written).
    The exit functions all run first now, once each, as CPython's own end by an unhandled
    Ctrl-C runs them before it ends the process by SIGINT."""
    ran = tmp_path / "atexit.txt"
    env = {"STOP_AT": "trio", "STOP_SIGNAL": "SIGTERM", "STOP_TIMES": "1"}
    module = "nexus_trio.cli"
    if how == "script":
        (tmp_path / "nexus_script.py").write_text("from _nexus_trio_main import main\nmain()\n")
        module = "nexus_script"
    proc = python_m(tmp_path, ATEXIT_BEFORE, module, ["run", "--help"], ATEXIT_FILE=str(ran), **env)
    assert proc.returncode == -signal.SIGTERM, (proc.returncode, proc.stderr)
    assert "Usage: " in proc.stdout
    assert "Traceback" not in proc.stderr
    assert ran.read_text() == "ran\n"


#: :data:`ATEXIT_BEFORE` with a non-daemon thread that writes ``thread`` to
#: ``$ATEXIT_FILE`` once the main thread is over (as the interpreter's exit marks it), as a
#: flusher does
THREAD_BEFORE = (
    """
import threading, time


def flusher():
    deadline = time.monotonic() + 60
    while threading.main_thread().is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    with open(os.environ["ATEXIT_FILE"], "a") as file:
        file.write("thread\\n")


threading.Thread(target=flusher).start()
"""
    + ATEXIT_BEFORE
)


def test_a_non_daemon_thread_ends_before_a_stop_ends_a_command_that_ran_no_run(
    tmp_path: Path,
) -> None:
    """Fifty-second pass: :func:`_nexus_trio_main.end_at_the_command_s_end` ran the exit
    functions, then the kill, but not what the interpreter's own exit does before them:
    wait for the non-daemon threads (and ``threading``'s exit hooks, which tell
    ``concurrent.futures``' workers to end). Measured on that code: the file held
    ``ran`` alone (the thread killed); before it (the kill an exit function, after the
    interpreter's join) the thread wrote. Now: the thread, then the exit functions, then
    the end by the SIGTERM."""
    ran = tmp_path / "atexit.txt"
    env = {"STOP_AT": "trio", "STOP_SIGNAL": "SIGTERM", "STOP_TIMES": "1"}
    proc = python_m(
        tmp_path, THREAD_BEFORE, "nexus_trio.cli", ["run", "--help"], ATEXIT_FILE=str(ran), **env
    )
    assert proc.returncode == -signal.SIGTERM, (proc.returncode, proc.stderr)
    assert "Usage: " in proc.stdout
    assert ran.read_text() == "thread\nran\n"


#: :data:`STOP_AT` with an exit function that says so in ``$ATEXIT_FILE``, then hangs
HANGING_AT_EXIT = (
    """
import atexit, os, time


def hangs():
    with open(os.environ["ATEXIT_FILE"], "a") as file:
        file.write("hanging\\n")
    time.sleep(120)


atexit.register(hangs)
"""
    + STOP_AT
)


def test_a_second_sigterm_ends_a_command_whose_exit_function_hangs(tmp_path: Path) -> None:
    """Fifty-second pass: a SIGTERM as ``nexus run --help`` started ends it after the exit
    functions; one of them hung, and a second SIGTERM was noted by the entry's handler
    and dropped (measured: the process lived on until the function's end), where one that
    never caught SIGTERM ends at once. Now the signal's default action is back before
    the exit functions run."""
    ran = tmp_path / "atexit.txt"
    (tmp_path / "sitecustomize.py").write_text(HANGING_AT_EXIT)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
    paths = [str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH")]
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, paths))
    environ["XDG_CONFIG_HOME"] = str(tmp_path / "no-such-dir")
    environ.update(STOP_AT="trio", STOP_SIGNAL="SIGTERM", STOP_TIMES="1", ATEXIT_FILE=str(ran))
    proc = subprocess.Popen(
        [sys.executable, "-m", "nexus_trio.cli", "run", "--help"],
        env=environ,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60  # (a real process: polled, as it starts)
        while not (ran.exists() and ran.read_text() == "hanging\n"):
            assert proc.poll() is None and time.monotonic() < deadline, proc.returncode
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == -signal.SIGTERM
    finally:
        proc.kill()
        proc.wait()


#: a ``sitecustomize`` that sends its process the signals ``AFTER_SIGNALS`` (names,
#: comma-separated, in order) once ``nexus run`` notes SIGTERM itself, past the entry
#: (``_run.catch_stop_signals_early``: the config not yet loaded)
AFTER_THE_CATCH = """
import os, signal

real = signal.signal


def spy(signum, handler):
    old = real(signum, handler)
    if signum == signal.SIGTERM and getattr(handler, "__name__", "") == "_note_early":
        signal.signal = real
        for signame in os.environ["AFTER_SIGNALS"].split(","):
            os.kill(os.getpid(), getattr(signal, signame))
    return old


signal.signal = spy
"""


@pytest.mark.parametrize(
    ("how", "site", "first"),
    [
        ("-m", STOP_AT, "SIGTERM"),
        ("script", STOP_AT, "SIGHUP"),
        ("-m", AFTER_THE_CATCH, "SIGTERM"),
    ],
    ids=["entry-sigterm", "entry-script-sighup", "after-the-catch"],
)
def test_a_ctrl_c_after_a_stop_signal_while_nexus_starts_exits_130(
    tmp_path: Path, how: str, site: str, first: str, sighup_default: None
) -> None:
    """Fifty-first pass, review: a SIGTERM (or SIGHUP) then a Ctrl-C while ``nexus run``
    started: the Ctrl-C ended the command, 130, ``nexus: interrupted: SIGINT while
    starting`` (or typer's silent 130 once the run's code notes the stops itself), and
    then the exit raised the stop noted before it again: status -15 / -1, where a Ctrl-C
    after a stop forces, 130, as in a run (docs/cli.md, Signals), and as before the
    re-raise came. (With main's ``_nexus_trio_main.py`` and ``_app.py``: -15, -1, -15.)"""
    args = ["run", "-n", "2", "-d", "30", "--json", "--no-live"]
    signals = f"{first},SIGINT"
    env = {"STOP_AT": "trio", "STOP_SIGNAL": signals, "STOP_TIMES": "1", "AFTER_SIGNALS": signals}
    module = "nexus_trio.cli"
    if how == "script":
        (tmp_path / "nexus_script.py").write_text("from _nexus_trio_main import main\nmain()\n")
        module = "nexus_script"
    proc = python_m(tmp_path, site, module, args, **env)
    assert (proc.returncode, proc.stdout) == (130, ""), (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    if site == STOP_AT:
        said = "nexus: interrupted: SIGINT while starting: the run was not started\n"
        assert proc.stderr == said


@pytest.mark.parametrize(
    ("args", "status", "said"),
    [
        (["run", "--generate-config", "made.toml"], 0, ("stdout", "wrote ")),
        (["run", "-c", "bad.toml"], 2, ("stderr", "nexus: error: ")),
    ],
    ids=["generate-config", "bad-config"],
)
def test_a_sigterm_ignored_when_nexus_run_started_does_not_end_a_command_that_runs_nothing(
    tmp_path: Path, args: list[str], status: int, said: tuple[str, str]
) -> None:
    """Fifty-first pass, review: a ``nexus run`` started with SIGTERM ignored (a parent's
    ``trap '' TERM``) that got one once its code noted SIGTERM, and then ran no run, was
    ended at its exit by SIGTERM's default action (-15): the re-raise is for the end the
    process would have had without catching the signal, and that was none. Its status
    is its own now (0, 2). (With main's ``_nexus_trio_main.py``: -15, -15.)"""
    (tmp_path / "bad.toml").write_text("x = [\n")
    proc = python_m(
        tmp_path,
        AFTER_THE_CATCH,
        "nexus_trio.cli",
        args,
        ignoring=(signal.SIGTERM,),
        AFTER_SIGNALS="SIGTERM",
    )
    assert proc.returncode == status, (proc.returncode, proc.stderr)
    stream, text = said
    assert text in getattr(proc, stream), (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr


def test_two_sigterms_while_a_workers_parent_starts_with_an_app_force_its_stop(
    tmp_path: Path,
) -> None:
    """Fifty-first pass: two SIGTERMs that came while ``nexus run -W 2 --app ...``
    started (held by the entry) were one: the first skipped the parent's import of the
    app, and the second, noted, was dropped with the summary of a run stopped before any
    worker started: status 0, where a second SIGTERM forces everywhere else, also a
    moment later in the same parent (``forced by SIGTERM before any worker started``,
    130). It forces here too now: the summary says so, status 130, nothing started.
    (With main's ``_app.py``: status 0, ``stopped_by`` without ``forced by``.)"""
    (tmp_path / "myapp.py").write_text("async def main(kernel):\n    pass\n")
    args = ["run", "-W", "2", "--app", "myapp:main", "-d", "30", "--json"]
    env = {"STOP_AT": "trio", "STOP_SIGNAL": "SIGTERM", "STOP_TIMES": "2"}
    proc = python_m(tmp_path, STOP_AT, "nexus_trio.cli", args, **env)
    assert proc.returncode == 130, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["stopped_by"] == (
        "SIGTERM; stopped while importing 'myapp:main' (--app), before any worker started;"
        " forced by SIGTERM before any worker started"
    )
    assert [w["exit"] for w in summary["per_worker"]] == ["not started", "not started"]


#: a ``sitecustomize`` that writes the name of each SIGINT handler set (``SPY_OUT``)
NAMES_OF_HANDLERS = """
import atexit, json, os, signal

seen = []
real = signal.signal


def spy(signum, handler):
    if signum == signal.SIGINT:
        seen.append(getattr(handler, "__qualname__", str(handler)))
    return real(signum, handler)


signal.signal = spy
atexit.register(lambda: open(os.environ["SPY_OUT"], "w").write(json.dumps(seen)))
"""


def test_python_m_gives_sigint_back_to_the_command_once_imported(tmp_path: Path) -> None:
    """The one-line say covers the imports only: the command's own code gets Python's
    handler back before it runs (Trio's ``run`` takes SIGINT only from that one), and a
    Ctrl-C in it is the command's. (Fails with ``imports_done()`` taken out of
    ``nexus_trio/cli/__main__.py``: the run's code starts under the one-line say.)"""
    run = ["run", "-n", "2", "-d", "0.01", "--no-live"]
    proc = python_m(
        tmp_path, NAMES_OF_HANDLERS, "nexus_trio.cli", run, SPY_OUT=str(tmp_path / "seen.json")
    )
    assert proc.returncode == 0, proc.stderr
    seen = json.loads((tmp_path / "seen.json").read_text())
    assert seen[:2] == ["_on_sigint_while_importing", "default_int_handler"], seen


#: a ``sitecustomize`` that sends this process a SIGINT at a point of its start:
#: ``KILL_AT=swap``, as Python's SIGINT handler is put back for the command
#: (``imports_done``, ``python -m``); ``KILL_AT=main``, as ``nexus_trio.cli.main`` is
#: called (its lines before click's ``try``)
CTRL_C_AT = """
import os, signal, sys

real = signal.signal


def spy(signum, handler):
    old = real(signum, handler)
    if signum == signal.SIGINT and handler is signal.default_int_handler:
        signal.signal = real
        os.kill(os.getpid(), signal.SIGINT)
    return old


def at_main(frame, event, arg):
    code = frame.f_code
    if event == "call" and code.co_name == "main" and code.co_filename.endswith("_app.py"):
        sys.setprofile(None)
        os.kill(os.getpid(), signal.SIGINT)


if os.environ["KILL_AT"] == "swap":
    signal.signal = spy
else:
    sys.setprofile(at_main)
"""


def _run_an_app_by(tmp_path: Path, how: str) -> tuple[str, list[str]]:
    """The module to run (``python -m``'s, or the console script's entry as the generated
    script calls it, for ``how == "script"``) and the arguments of a short ``nexus run``
    of an app that does nothing, both written into ``tmp_path``."""
    (tmp_path / "myapp.py").write_text("async def main(kernel):\n    pass\n")
    args = ["run", "--app", "myapp:main", "-d", "0.1", "--no-live", "--json"]
    if how != "script":
        return "nexus_trio.cli", args
    (tmp_path / "nexus_script.py").write_text("from _nexus_trio_main import main\nmain()\n")
    return "nexus_script", args


@pytest.mark.parametrize(
    ("how", "at"), [("-m", "swap"), ("-m", "main"), ("script", "main")], ids=str
)
def test_a_ctrl_c_as_the_command_takes_sigint_over_is_said_in_one_line(
    tmp_path: Path, how: str, at: str
) -> None:
    """Fifty-third pass: a Ctrl-C in the bytecodes between the entry's one-line say and
    the command's own handling (click's, then the run's) raised a bare
    ``KeyboardInterrupt``, its traceback printed: right after ``imports_done()`` gave
    SIGINT back to Python (``python -m``), and in ``nexus_trio.cli.main``'s lines before
    click's ``try`` (both entries). Said in one line now, status 130, nothing started.
    (With main's ``_nexus_trio_main.py``, ``cli/__main__.py`` and ``_commands.py``:
    ``Traceback ... KeyboardInterrupt``, status -2: Python's own end by SIGINT.)"""
    module, args = _run_an_app_by(tmp_path, how)
    proc = python_m(tmp_path, CTRL_C_AT, module, args, KILL_AT=at)
    assert proc.returncode == 130, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr == "nexus: interrupted: SIGINT while starting: the run was not started\n"
    assert proc.stdout == ""


#: a ``sitecustomize`` that sends this process a SIGINT as the function whose qualified
#: name is ``KILL_IN`` is called: inside click's handling of a Ctrl-C, before the command
CTRL_C_IN = """
import os, signal, sys


def at(frame, event, arg):
    if event == "call" and frame.f_code.co_qualname == os.environ["KILL_IN"]:
        sys.setprofile(None)
        os.kill(os.getpid(), signal.SIGINT)


sys.setprofile(at)
"""


@pytest.mark.parametrize("how", ["-m", "script"])
@pytest.mark.parametrize(
    ("where", "args", "said"),
    [
        ("default_to_run", [], ": the run was not started"),
        ("RunCommand.parse_args", [], ": the run was not started"),
        ("finite_at_least.<locals>.parse", ["health", "--timeout", "1"], ""),
    ],
    ids=["root-parse", "run-parse", "health-flag"],
)
def test_a_ctrl_c_as_click_parses_the_command_line_is_said_in_one_line(
    tmp_path: Path, how: str, where: str, args: list[str], said: str
) -> None:
    """Fifty-fourth pass: a Ctrl-C inside click's handling, before the command's own code
    ran (the command line parsed, a flag's value checked), ended as click's ``Aborted!``,
    exit 1 (typer before 0.26, which ``typer>=0.15.4`` allows), or, with typer 0.29,
    silently, exit 130: not the one line every other early Ctrl-C says. Said in one line
    now, 130, by both entries."""
    module, run = _run_an_app_by(tmp_path, how)
    proc = python_m(tmp_path, CTRL_C_IN, module, args or run, KILL_IN=where)
    assert (proc.returncode, proc.stdout, proc.stderr) == (
        130,
        "",
        f"nexus: interrupted: SIGINT while starting{said}\n",
    )


@pytest.mark.parametrize("how", ["-m", "script"])
def test_a_ctrl_c_in_the_command_s_own_code_stays_the_command_s(tmp_path: Path, how: str) -> None:
    """Review of the fifty-fourth pass: the one line of a Ctrl-C as click parses the
    command line is said only before the command's own code runs (``Command.invoke``
    marks the start of it); a Ctrl-C in that code (here ``nexus health``'s request) ends
    it as before, 130, without a word about starting. No test held the mark: with it
    taken out, ``test_cli_entry.py`` and ``test_cli_late_signals.py`` passed (66)."""
    module, _ = _run_an_app_by(tmp_path, how)
    args = ["health", "--port", "9", "--timeout", "1"]
    proc = python_m(tmp_path, CTRL_C_IN, module, args, KILL_IN="_probe_health")
    assert (proc.returncode, proc.stdout, proc.stderr) == (130, "", "")


#: a ``sitecustomize`` that sends this process a SIGINT in ``nexus_trio.cli.main``'s lines
#: before click's handling of a Ctrl-C (as it reads its program's name: not from a profile
#: or trace function, in which Python traces nothing), then ``SECOND`` (a signal's name)
#: as the entry says the first in one line: at ``AT``, ``call`` of
#: ``interrupted_while_starting``, or ``said``, its line written (at ``exiting_with``)
TWO_SIGNALS = """
import os, pathlib, signal, sys

real = pathlib.PurePath.name


def name(self):
    caller = sys._getframe(1).f_code
    if caller.co_name == "main" and caller.co_filename.endswith("_app.py"):
        pathlib.PurePath.name = real
        sys.settrace(at_saying)
        os.kill(os.getpid(), signal.SIGINT)
    return real.fget(self)


def second():
    sys.settrace(None)
    os.kill(os.getpid(), getattr(signal, os.environ["SECOND"]))


def at_said(frame, event, arg):
    line = open(frame.f_code.co_filename).read().splitlines()[frame.f_lineno - 1]
    if event == "line" and "exiting_with(" in line:
        second()
    return at_said


def at_saying(frame, event, arg):
    if event == "call" and frame.f_code.co_name == "interrupted_while_starting":
        if os.environ["AT"] == "call":
            second()
        return at_said
    return None


pathlib.PurePath.name = property(name)
"""


@pytest.mark.parametrize(
    ("second", "at"), [("SIGINT", "call"), ("SIGINT", "said"), ("SIGTERM", "call")]
)
@pytest.mark.parametrize("how", ["-m", "script"])
def test_a_second_signal_as_a_ctrl_c_while_starting_is_said_is_the_same_stop(
    tmp_path: Path, how: str, second: str, at: str
) -> None:
    """Fifty-third pass (review): a second Ctrl-C (the terminal's and a parent's, or a
    user's twice) while the entry said the first in one line, after the fifty-third
    pass widened that block to ``nexus_trio.cli.main``'s lines, raised a second bare
    ``KeyboardInterrupt`` from inside its ``except``: both tracebacks printed, status -2.
    Until click's handling begins the entry's own SIGINT handler says it now (as while
    ``python -m`` imports the packages), which a second Ctrl-C only runs again: one
    line, 130. A SIGTERM there is noted for the run, which a Ctrl-C's 130 stands over."""
    module, args = _run_an_app_by(tmp_path, how)
    proc = python_m(tmp_path, TWO_SIGNALS, module, args, SECOND=second, AT=at)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 130, (proc.returncode, proc.stderr)
    assert proc.stderr == "nexus: interrupted: SIGINT while starting: the run was not started\n"
    assert proc.stdout == ""
