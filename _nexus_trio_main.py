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

import atexit
import os
import signal
import sys
import threading

TYPE_CHECKING = False  # (typing's import would be a third of this module's)
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import NoReturn

#: the root's own options, which keep a command line without a command at the root (the
#: others mean ``run``; tests/test_cli_polish.py checks it against the app's)
ROOT_OPTIONS = frozenset(
    {"--help", "-h", "--version", "-V", "--install-completion", "--show-completion"}
)
#: the program's names: one leading on the command line is skipped (``default_to_run``)
PROGRAM_NAMES = frozenset({"nexus", "nexus-runtime"})
#: set in each worker of ``nexus run --workers`` (``nexus_trio.cli._cluster_cmd.WORKER_ENV``)
WORKER_ENV = "NEXUS_WORKER"


def is_a_worker() -> bool:
    """Whether this process is a worker of ``nexus run --workers`` (its parent set
    :data:`WORKER_ENV`; ``nexus_trio.cli._cluster_cmd.worker_node`` once the package is
    imported, which takes it out of what the process's children inherit)."""
    return bool(os.environ.get(WORKER_ENV))


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
        and not is_a_worker()
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


def interrupted_while_starting(args: list[str]) -> NoReturn:
    """Say in one line that a Ctrl-C came while ``nexus`` (the command line ``args``)
    started, before any of its code ran; exit 130: nothing was started."""
    _exit["said"] = True
    what = ": the run was not started" if is_a_run(args) else ""
    sys.stderr.write(f"nexus: interrupted: SIGINT while starting{what}\n")
    exiting_with(INTERRUPTED)
    sys.exit(INTERRUPTED)


def _on_sigint_while_importing(signum: int, frame: object) -> None:
    """SIGINT while ``nexus`` starts (``python -m nexus_trio.cli`` imports its packages,
    the command begins): one line, 130. A second one while the first is said is the same
    stop: nothing more (it raised a second ``KeyboardInterrupt``, its traceback printed)."""
    if not _exit["said"]:
        interrupted_while_starting(_started_as or [])


#: the command line of the ``python -m nexus_trio.cli`` whose imports
#: :func:`_on_sigint_while_importing` covers (None: it covers none)
_started_as: list[str] | None = None


def say_a_ctrl_c_in_one_line(args: list[str]) -> None:
    """``python -m nexus_trio.cli``: ``runpy`` imports the package, then ``nexus_trio.cli``
    (Trio, typer, rich), before the command's ``__main__`` runs, so that a Ctrl-C there
    reached the top level as Python's ``KeyboardInterrupt`` traceback. Until
    :func:`imports_done` (which :func:`command_began` calls, as click's handling begins)
    a SIGINT that would raise it says so in one line and exits 130 instead; the console
    scripts set it in :func:`run_command`. Not in a ``--workers`` worker (its run notes
    the stop signals itself), nor where SIGINT is ignored or someone else's handler."""
    global _started_as
    if (
        threading.current_thread() is threading.main_thread()
        and not is_a_worker()
        and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    ):
        _started_as = args
        signal.signal(signal.SIGINT, _on_sigint_while_importing)


#: the SIGTERMs and SIGHUPs that came while ``nexus run`` started, in order (:func:`hold_stops`)
_held: list[int] = []
#: of SIGTERM and SIGHUP, those ignored when ``nexus run`` started (``nohup``, a parent's
#: ``trap '' TERM``): the process never ends by them (:func:`end_by_a_stop_not_taken`)
_ignored_at_start: set[int] = set()
#: the exit status of a Ctrl-C's end (interrupted as it started, or a stop it forced)
INTERRUPTED = 130
#: whether the command exits with :data:`INTERRUPTED` (:func:`exiting_with`)
#: and whether a Ctrl-C while it started was said (:func:`interrupted_while_starting`)
_exit = {"interrupted": False, "said": False}


def _hold(signum: int, frame: object) -> None:
    _held.append(signum)


def hold_stops(args: list[str]) -> None:
    """For a run (not a ``--workers`` worker), in the main thread: a SIGTERM or SIGHUP
    (one with its default action: ``nohup``'s ignored SIGHUP stays ignored) that comes
    while ``nexus`` starts is noted, each arrival, for the run to take as its stop
    (``nexus_trio.cli._run.catch_stop_signals_early`` takes them,
    :func:`stops_while_starting`). One while the interpreter imported nexus_trio, Trio,
    typer and rich (a second or more on a busy host) ended the process by its default
    action (status 143, 129): no summary, not a word, where a Ctrl-C there is said in one
    line and one a moment later is the run's graceful stop."""
    if (
        threading.current_thread() is threading.main_thread()
        and not is_a_worker()
        and is_a_run(args)
    ):
        for signum in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
            if signum is not None and signal.getsignal(signum) is signal.SIG_IGN:
                _ignored_at_start.add(signum)
            elif signum is not None and signal.getsignal(signum) is signal.SIG_DFL:
                signal.signal(signum, _hold)
        atexit.register(end_by_a_stop_not_taken)  # (the first registered: it runs last)


def _usr1_unwatched(signum: int, frame: object) -> None:
    """SIGUSR1 while no run's handler is in place (:func:`hold_usr1`): no tree to write."""


def hold_usr1(args: list[str]) -> None:
    """For a run (a ``--workers`` worker too), in the main thread: a SIGUSR1 (asks for the
    agent tree) that has its default action gets a handler that does nothing, from the
    entry's first lines to the process's exit. Its default action ended the process
    (status 138, no summary, nothing said) while it started (the imports, the config,
    the app's import), and once the run's own handler was gone:
    the summary being written, the ``--workers`` parent's after its handlers were put
    back, a worker that ended by itself and was not reaped yet when the parent passed a
    SIGUSR1 on. The run's handler (``nexus_trio.cli._run``) takes over while the run
    runs and puts this one back after. A Python handler, not ``SIG_IGN``: a program the
    run starts (``--spawn``) gets SIGUSR1's default action back at its ``exec``, as it
    would have had (an ignored signal stays ignored across ``exec``)."""
    if (
        threading.current_thread() is threading.main_thread()
        and hasattr(signal, "SIGUSR1")
        and signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
        and is_a_run(args)
    ):
        signal.signal(signal.SIGUSR1, _usr1_unwatched)


def stops_while_starting() -> list[int]:
    """The signals :func:`hold_stops` noted so far, in order; they are the caller's now
    (the next call returns only those noted after)."""
    held, _held[:] = list(_held), []
    return held


def end_by_a_stop_not_taken() -> None:
    """At the exit of a ``nexus run`` that ended before any run began (``--help``, a
    usage error, ``--generate-config``, a config refused), while a SIGTERM or SIGHUP came
    as it started (:func:`hold_stops`, then ``nexus_trio.cli._run.stops_not_taken``):
    its output written, the process ends by the first such signal's default action
    (status 143, 129 in a shell), as a Unix program that catches a signal to finish its
    work re-raises it (the GNU C library's manual, "Termination in Handler"): its parent
    (a shell's ``timeout``, a service manager) sees it ended by the signal it sent. Until
    the fifty-first pass such a signal was noted and dropped: status 0 or 2. A stop
    that a run took is the run's (its summary, exit 0): nothing is done then. Nor when
    the command exits interrupted, 130 (:func:`exiting_with`): a Ctrl-C after the stop
    forced the end, as a second stop forces a run's (one before it ended the command
    first), and the status said so (``nexus: interrupted: ...``); nor by a signal the
    process was started with ignored (``nohup``, ``trap '' TERM``), which one that had
    not caught it would have gone on after: its run takes a SIGTERM all the same, as its
    stop (docs/cli.md, Signals)."""
    signum = _stop_not_taken()
    if signum is not None:
        _end_by(signum)


def stop_not_taken() -> int | None:
    """The signal (a SIGTERM or SIGHUP noted as ``nexus run`` started, that no run took)
    by which :func:`end_by_a_stop_not_taken` will end a command that ends before any run
    began, or None: a refused ``run --json`` says ``128 +`` its number as its exit status
    (``nexus_trio.cli._commands.say_refused_as_json``), 143 where it said 2."""
    return _stop_not_taken()


def _stop_not_taken() -> int | None:
    """The signal :func:`end_by_a_stop_not_taken` ends the process by, or None."""
    pending = list(_held)
    run = sys.modules.get("nexus_trio.cli._run")
    if run is not None:
        pending += run.stops_not_taken()
    pending = [signum for signum in pending if signum not in _ignored_at_start]
    if (
        not pending
        or _exit["interrupted"]
        or threading.current_thread() is not threading.main_thread()
    ):
        return None
    return pending[0]


def _end_by(signum: int) -> None:
    """The output flushed, the process ends by ``signum``'s default action."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):  # (a reader gone, a stream closed: nothing to keep)
            pass
    signal.signal(signum, signal.SIG_DFL)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signum})
    os.kill(os.getpid(), signum)


def end_at_the_command_s_end() -> None:
    """Where the command ends (its ``SystemExit`` goes out of ``nexus_trio.cli.main``, in
    :func:`main` and ``nexus_trio/cli/__main__.py``): when :func:`end_by_a_stop_not_taken`
    would end the process by a signal, it does so now, after every exit function
    (``atexit``) ran, also those registered before this module's (a ``sitecustomize``'s,
    coverage's), which as exit functions of their own would run after
    :func:`end_by_a_stop_not_taken`, and so never ran: CPython's own exit by an unhandled
    Ctrl-C runs its finalization, the exit functions in it, before it ends itself by
    SIGINT (``Modules/main.c``, ``exit_sigint``). Exit functions registered while the
    exit functions run are not run (as at an ordinary exit). As that finalization does,
    the non-daemon threads are waited for first, after ``threading``'s own exit hooks
    (``concurrent.futures``' workers are told to end there): the kill came before them,
    a thread's last writes lost (until the fifty-second pass's entry ran the kill as an
    exit function, after the interpreter joined them). The signal's default action is
    back before that wait: a second such signal while a thread or an exit function hangs
    ends the process at once, as it would one that never caught it (it was noted and
    dropped, the process left to hang)."""
    signum = _stop_not_taken()
    if signum is None:
        return
    atexit.unregister(end_by_a_stop_not_taken)
    signal.signal(signum, signal.SIG_DFL)  # (a second one now: the end, at once)
    shutdown = getattr(threading, "_shutdown", None)  # (what Py_FinalizeEx calls first)
    if callable(shutdown):
        shutdown()
    atexit._run_exitfuncs()
    _end_by(signum)


def exiting_with(status: object) -> None:
    """The command exits with ``status`` (a ``SystemExit``'s code, as
    ``nexus_trio.cli.main`` sees it go): :data:`INTERRUPTED` stands, the stops noted
    before are not raised again at the exit (:func:`end_by_a_stop_not_taken`)."""
    if status == INTERRUPTED:
        _exit["interrupted"] = True


def imports_done() -> None:
    """The command's code handles a Ctrl-C now (:func:`command_began`): SIGINT raises
    ``KeyboardInterrupt`` again, which the command handles (and Trio's ``run`` takes
    only from that handler)."""
    if signal.getsignal(signal.SIGINT) is _on_sigint_while_importing:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def main() -> None:
    """The ``nexus`` command (``nexus_trio.cli.main``), imported now: after the signal."""
    run_command(None)


#: whether the command's own code took Ctrl-C over (:func:`command_began`)
_began = {"yes": False}


def command_began() -> None:
    """The command's own code handles a Ctrl-C from here on (click's, then the run's:
    ``nexus_trio.cli._commands.RunByDefaultGroup.parse_args`` says so, the first of it
    that runs inside click's handling of ``KeyboardInterrupt``): Python's SIGINT handler
    is given back (:func:`imports_done`); one that comes as it is given back is still
    said in one line."""
    try:
        imports_done()
    except KeyboardInterrupt:
        interrupted_while_starting(command_line() or sys.argv[1:])
    _began["yes"] = True


def run_command(command: Callable[[], object] | None) -> None:
    """``command()`` (``nexus_trio.cli.main``; None: imported here), then, as it returns
    or exits (``SystemExit``), :func:`end_at_the_command_s_end`.

    Until the command's own code takes a Ctrl-C over (:func:`command_began`, which gives
    Python's handler back), SIGINT has the handler that says it in one line
    (:func:`interrupted_while_starting`, 130): ``python -m``'s since the packages'
    import (:func:`say_a_ctrl_c_in_one_line`), the scripts' from here, over the import of
    the command and ``nexus_trio.cli.main``'s lines before click's ``try``. A bare
    ``KeyboardInterrupt`` raised there printed its traceback (after ``imports_done()``,
    ``python -m``; after the import's ``except``, the scripts); and while such a one was
    said, the block below, a second Ctrl-C did (the fifty-third pass): the handler, run
    again while the first is said, adds nothing (one line, 130)."""
    try:
        try:
            args = command_line()
            say_a_ctrl_c_in_one_line(sys.argv[1:] if args is None else args)
            if command is None:
                from nexus_trio.cli import main as imported  # (this import is the window)

                command = imported
            command()
        except KeyboardInterrupt:
            if _began["yes"]:
                raise  # (the command's own, let out: as before)
            # (a Ctrl-C this early: said in one line, as one while the app is imported,
            # not with a traceback; nothing was started)
            interrupted_while_starting(command_line() or sys.argv[1:])
    except SystemExit:
        end_at_the_command_s_end()
        raise
    end_at_the_command_s_end()


def _on_import() -> None:
    """What importing this module does: SIGINT back for a run; under ``python -m
    nexus_trio.cli``, a Ctrl-C while the packages are imported said in one line."""
    args = command_line()
    if args is None:
        return
    hold_usr1(args)
    take_sigint_back(args)
    hold_stops(args)
    if sys.argv[0] == "-m":
        say_a_ctrl_c_in_one_line(args)


_on_import()

__all__ = [
    "INTERRUPTED",
    "command_began",
    "end_at_the_command_s_end",
    "end_by_a_stop_not_taken",
    "exiting_with",
    "imports_done",
    "main",
    "run_command",
    "stop_not_taken",
    "stops_while_starting",
]
