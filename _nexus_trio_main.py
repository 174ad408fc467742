"""The entry of the ``nexus`` and ``nexus-runtime`` console scripts: :func:`main` is
``nexus_trio.cli.main``, imported after SIGINT is taken back for a run.

``nexus run`` takes Ctrl-C (SIGINT) as its stop whatever the process inherited, as the
original Nexus (tokio) does, also when it was started with SIGINT ignored (a background
job of a shell without job control: ``nexus run ... &`` in a script, some CI runners).
It took it back only once the run's own code ran, after the interpreter's start and the
imports of nexus_trio, Trio, typer and rich (about 0.3 s of CPU): a SIGINT in that window
was lost. This module imports none of them (it is outside the package, whose import is
that of Trio), so it gives SIGINT back first; the run's code
(``nexus_trio.cli._run.catch_stop_signals_early``) does the same again. ``python -m
nexus_trio.cli`` imports the package before any module of the command: the package's
first lines import this module for it (only while ``runpy`` imports the packages of a
``-m``, :func:`command_line`), which gives SIGINT back there, before Trio. Only for a run (``run``, or options without a command,
as ``nexus_trio.cli._commands.default_to_run`` reads them), and not in a ``--workers``
worker (its parent starts it with the stop signals blocked, and it notes them itself):
the other commands keep what they inherited, as before.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

#: the root's own options, which keep a command line without a command at the root (the
#: others mean ``run``; tests/test_cli_polish.py checks it against the app's)
ROOT_OPTIONS = frozenset(
    {"--help", "-h", "--version", "-V", "--install-completion", "--show-completion"}
)
#: the program's names: one leading on the command line is skipped (``default_to_run``)
PROGRAM_NAMES = frozenset({"nexus", "nexus-runtime"})
#: set in each worker of ``nexus run --workers`` (``nexus_trio.cli._cluster_cmd.WORKER_ENV``)
WORKER_ENV = "NEXUS_WORKER"


def is_a_run(args: list[str]) -> bool:
    """Whether the command line (without the program) runs ``nexus run``, as the app
    reads it: ``run ...``, or options that are not the root's (``-n 4 -d 10``), after one
    leading program name."""
    if args and args[0] in PROGRAM_NAMES:
        args = args[1:]
    if not args:
        return False
    if args[0] == "run":
        return True
    return (
        args[0].startswith("-")
        and args[0] != "--"
        and args[0].partition("=")[0] not in ROOT_OPTIONS
    )


def take_sigint_back(args: list[str]) -> None:
    """For a run (not a ``--workers`` worker) started with SIGINT ignored, in the main
    thread: Python's own handler back (a KeyboardInterrupt)."""
    if (
        threading.current_thread() is threading.main_thread()
        and not os.environ.get(WORKER_ENV)
        and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        and is_a_run(args)
    ):
        signal.signal(signal.SIGINT, signal.default_int_handler)


#: what ``python -m`` names to run the command (``nexus_trio/cli/__main__.py``)
COMMAND_MODULES = frozenset({"nexus_trio.cli", "nexus_trio.cli.__main__"})


def command_line() -> list[str] | None:
    """The command line (without the program) of the ``nexus`` this process runs, None
    when it runs another program: a console script's ``sys.argv[1:]``; for ``python -m``,
    while ``runpy`` imports the module's packages ``sys.argv[0]`` is ``"-m"`` and the
    module is the item of ``sys.orig_argv`` before the arguments (``-m nexus_trio.cli``
    or ``-mnexus_trio.cli``)."""
    argv = list(getattr(sys, "argv", None) or [""])
    if argv[0] != "-m":
        return argv[1:]
    original = sys.orig_argv
    at = len(original) - len(argv)
    if at >= 0 and original[at].removeprefix("-m") in COMMAND_MODULES:
        return argv[1:]
    return None


def main() -> None:
    """The ``nexus`` command (``nexus_trio.cli.main``), imported now: after the signal."""
    try:
        from nexus_trio.cli import main as command  # (this import is the window)
    except KeyboardInterrupt:
        # (a Ctrl-C this early: said in one line, as one while the app is imported, not
        # with the import's traceback; nothing was started)
        what = ": the run was not started" if is_a_run(sys.argv[1:]) else ""
        sys.stderr.write(f"nexus: interrupted: SIGINT while starting{what}\n")
        sys.exit(130)
    command()


take_sigint_back(command_line() or [])

__all__ = ["main"]
