"""``nexus run --spawn CMD``: process agents that say what went wrong when they never start.

Each program becomes a process agent named after the program (``python3 agents/calc.py``
is ``calc``; repeats get ``-2``, ``-3``), which waits for its ``register`` line at most
the kernel's shutdown grace, so a program that never registers cannot hold the shutdown
past it. A watcher follows the kernel's lifecycle events: a program whose first start
fails (it exited, printed something that is not a register frame, did not register in
time) is not restarted and stops the run, and the summary names the program, what it
did and its exit status. Expected bridge
failures are logged as one line, not with a traceback of the bridge's internals.

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import PureWindowsPath
from typing import TYPE_CHECKING, Any, Final

import attrs

from .. import EventKind, LifecycleEvent, Subscription
from .._agent import NAME_MAX, ROOT_NAME
from .._logcall import log_guarded
from ..bridges.process import process_agent

if TYPE_CHECKING:
    import trio

    from .._kernel import Kernel

log = logging.getLogger("nexus_trio.cli")

#: how long a spawned program may take to register when the shutdown grace is longer
REGISTER_TIMEOUT: Final = 10.0
#: the bridge's own wait after the shutdown frame (process_agent's shutdown_grace)
STOP_GRACE: Final = 5.0


@attrs.frozen
class _Reading:
    """How an interpreter reads its command line, as far as naming its agent needs: which
    options take a value (the next argument, or one attached), so that a value is never
    taken for the script."""

    #: options whose value is something else (``python -X dev``, ``node -r ./trace.js``)
    valued: frozenset[str] = frozenset()
    #: options whose value is code to run: there is no script, the interpreter names it
    code: frozenset[str] = frozenset()
    #: options whose value is a dotted module or class run: its last part names it
    module: frozenset[str] = frozenset()
    #: options whose value is the script run (``php -f agent.php``, ``java -jar calc.jar``)
    script: frozenset[str] = frozenset()
    #: one-letter options may be grouped, the last one taking the value (``-uX dev``, ``-Werror``)
    grouped: bool = False
    #: one-letter options whose value is the rest of their group, never the next argument
    #: (``perl -Mfeature=say``: not an ``-e`` in ``feature``)
    attached: frozenset[str] = frozenset()
    #: options whose value is a command line of its own, named in turn (``env -S 'python3 -u'``)
    split: frozenset[str] = frozenset()
    #: words before the script (``uv run``, ``deno run``, ``bun exec``)
    subcommands: frozenset[str] = frozenset()
    #: ``NAME=value`` words before the program are settings, not the program (``env``)
    assignments: bool = False
    #: the first plain argument is a program of its own, named in turn (``uv run python x.py``)
    launcher: bool = False
    #: a plain argument is a class (``java com.example.Calc``) unless it is a source file
    classes: bool = False
    #: options (of ``valued``) that change the directory the script is looked for in
    #: (``uv run --directory DIR``, ``ruby -C DIR``): where it is then is not known here
    chdir: frozenset[str] = frozenset()

    def takes_value(self, option: str) -> bool:
        return any(
            option in kind
            for kind in (self.valued, self.code, self.module, self.script, self.split)
        )


def _reading(
    valued: str = "",
    code: str = "",
    module: str = "",
    script: str = "",
    subcommands: str = "",
    attached: str = "",
    split: str = "",
    *,
    grouped: bool = False,
    launcher: bool = False,
    classes: bool = False,
    assignments: bool = False,
    chdir: str = "",
) -> _Reading:
    """A :class:`_Reading` from option names separated by spaces."""
    return _Reading(
        valued=frozenset(valued.split()),
        code=frozenset(code.split()),
        module=frozenset(module.split()),
        script=frozenset(script.split()),
        subcommands=frozenset(subcommands.split()),
        attached=frozenset(attached.split()),
        split=frozenset(split.split()),
        grouped=grouped,
        launcher=launcher,
        classes=classes,
        assignments=assignments,
        chdir=frozenset(chdir.split()),
    )


#: node's options that take a value, and those whose value is code (tsx and ts-node run
#: TypeScript through node and read its options too)
_NODE_VALUED: Final = (
    "-r --require --import --loader --experimental-loader -C --conditions --input-type"
    " --inspect-port --env-file --title"
)
_NODE_CODE: Final = "-e --eval -p --print"
#: what a program's name may end with on Windows (``python.exe``, ``npx.cmd``)
_WINDOWS_SUFFIX: Final = re.compile(r"\.(exe|cmd|bat|com)$", re.IGNORECASE)


#: programs whose script names the agent better than they do, and how they read options
_READINGS: Final[tuple[tuple[re.Pattern[str], _Reading], ...]] = (
    (
        # (``py`` is the Windows launcher: its ``-3``, ``-3.12``, ``-V:3.12`` take no value)
        re.compile(r"^((python|pypy)[\d.]*|py)$"),
        _reading("-W -X --check-hash-based-pycs", code="-c", module="-m", grouped=True),
    ),
    (re.compile(r"^(node|nodejs)$"), _reading(_NODE_VALUED, code=_NODE_CODE)),
    (
        re.compile(r"^tsx$"),
        _reading(_NODE_VALUED + " --tsconfig", code=_NODE_CODE, subcommands="watch"),
    ),
    (
        re.compile(r"^ts-node(-esm)?$"),
        _reading(
            _NODE_VALUED + " -P --project -O --compiler-options --compiler -I --ignore --cwd",
            code=_NODE_CODE,
            chdir="--cwd",
        ),
    ),
    (
        re.compile(r"^env$"),
        _reading(
            "-u --unset -C --chdir",
            split="-S --split-string",
            grouped=True,
            launcher=True,
            assignments=True,
            chdir="-C --chdir",
        ),
    ),
    (
        re.compile(r"^deno$"),
        _reading(
            "-c --config --import-map --location --seed --cert -L --log-level --lock",
            subcommands="run exec",
        ),
    ),
    (
        re.compile(r"^bun$"),
        _reading(
            "--cwd -c --config -r --preload --env-file",
            code="-e --eval -p --print",
            subcommands="run exec",
            chdir="--cwd",
        ),
    ),
    (
        re.compile(r"^ruby$"),
        _reading(
            "-I -r -C -E --encoding",
            code="-e",
            attached="-0 -F -K -T -W -i -x",
            grouped=True,
            chdir="-C",
        ),
    ),
    (
        re.compile(r"^perl$"),
        _reading("-I", code="-e -E", attached="-0 -C -D -F -M -d -i -l -m -x", grouped=True),
    ),
    (re.compile(r"^php$"), _reading("-c -d -z", code="-r", script="-f")),
    (re.compile(r"^(bash|sh|zsh)$"), _reading("-o -O", code="-c", grouped=True)),
    (
        re.compile(r"^java$"),
        _reading(
            "-cp -classpath --class-path -p --module-path --add-modules --add-opens"
            " --add-exports --add-reads --upgrade-module-path --limit-modules --patch-module"
            " --source",
            module="-m --module",
            script="-jar",
            classes=True,
        ),
    ),
    (
        re.compile(r"^uv$"),
        _reading(
            "--with --with-requirements --with-editable --python -p --project --directory"
            " --env-file --extra --group --only-group --package --index --default-index"
            " --index-url --extra-index-url",
            module="-m --module",
            script="-s --script",
            subcommands="run exec",
            launcher=True,
            chdir="--directory",
        ),
    ),
    (re.compile(r"^npx$"), _reading("-p --package", code="-c --call", launcher=True)),
)


@attrs.frozen
class _Run:
    """What a command line runs, as far as its agent's name and the files it opens need."""

    #: the name it gives the agent, None for none (code given inline, a script on stdin)
    name: str | None
    #: relative paths the command certainly opens from the directory it starts in: a
    #: program given by a path (``./bin/agent``, ``venv/bin/python``), an interpreter's
    #: script (``python3 agent.py``); not a module or class, nor a script an option moved
    #: elsewhere (``uv run --directory DIR``), nor any other argument (the program may
    #: read ``data.csv`` beside itself)
    opens: tuple[str, ...] = ()


def program_name(argv: Sequence[str]) -> str:
    """The name an agent running ``argv`` gets: its script's stem after an interpreter,
    past the interpreter's options and their values (``python3 -X dev -u calc.py`` ->
    ``calc``, ``python -m pkg.calc`` -> ``calc``), the interpreter's when the code is given
    inline (``python3 -c ...`` -> ``python3``), else the program's (``./calc --x`` -> ``calc``)."""
    name = _program(argv).name
    assert name is not None  # (a program always names it)
    return name


def opened_paths(argv: Sequence[str]) -> tuple[str, ...]:
    """The relative paths ``argv`` certainly opens from the directory it starts in (see
    :class:`_Run`): a program given by a relative path, an interpreter's script."""
    return _program(argv).opens


def missing_script(command: str, argv: Sequence[str]) -> str | None:
    """What ``argv`` (of ``command``) certainly opens from the current directory and is
    not there: an interpreter's script, a file name with a suffix (``python3 agent.py``,
    ``node dist/agent.js``; not ``node agent``, which node resolves to ``agent.js``, nor
    ``bun run dev``, a package script, nor ``deno run npm:x`` or a URL); None if none is
    missing. The program would start and fail (``can't open file``) instead."""
    for path in opened_paths(argv):
        if (
            os.path.splitext(os.path.basename(path))[1]
            and ":" not in path
            and not os.path.exists(path)
        ):
            return (
                f"{path!r} (in {command!r}) is not in the current directory ({os.getcwd()}):"
                " the program would start and fail to open it; give its path from here"
                " (or absolute), or run nexus where it is"
            )
    return None


def _program(argv: Sequence[str]) -> _Run:
    """:func:`program_name`'s name and what the command line opens."""
    # (a Windows path reads on any machine: ``C:\\Python312\\python.exe`` is ``python``)
    program = PureWindowsPath(argv[0]).name
    windows = _WINDOWS_SUFFIX.search(program)
    if windows:
        own = program[: windows.start()]
        program = own.lower()  # (Windows names are case-blind: ``PYTHON.EXE``)
    else:
        own = _stem(program) or program
    # (a bare word is looked up on PATH; a path is taken from here)
    itself = (argv[0],) if "/" in argv[0] and not argv[0].startswith("/") else ()
    for pattern, reading in _READINGS:
        if pattern.match(program):
            run = _run_name(reading, argv[1:])
            return _Run(run.name or own, itself + run.opens)
    return _Run(own, itself)


def _stem(path: str) -> str:
    """A file's name without its suffix, after ``/`` or ``\\`` (``agents\\calc.py``: ``calc``)."""
    return PureWindowsPath(path).stem


def _run_name(reading: _Reading, args: Sequence[str]) -> _Run:
    """What ``args`` run after an interpreter read as ``reading`` names (None: code given
    inline, or nothing), and the script it opens unless an option moved it elsewhere."""
    run = _run_of(reading, args)
    if reading.chdir and any(_option(reading, arg)[0] in reading.chdir for arg in args):
        return _Run(run.name)  # (the script is looked for in another directory)
    return run


def _run_of(reading: _Reading, args: Sequence[str]) -> _Run:
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            return _plain_name(reading, args[i:]) if i < len(args) else _Run(None)
        if arg in reading.subcommands:
            continue
        if not arg.startswith("-") or arg == "-":
            if reading.assignments and "=" in arg:
                continue  # (env's ``NAME=value``)
            return _plain_name(reading, args[i - 1 :])
        option, value = _option(reading, arg)
        if option is None:
            continue
        if value is None:
            if i == len(args):
                return _Run(None)
            value = args[i]
            i += 1
        if option in reading.code:
            return _Run(None)
        if option in reading.module:
            return _Run(_last_part(value))
        if option in reading.script:
            return _Run(_stem(value) or None, (value,))
        if option in reading.split:
            return _split_name(value, args[i:])
    return _Run(None)


def _split_name(command: str, rest: Sequence[str]) -> _Run:
    """What the command line ``command`` (``env -S``'s value) followed by ``rest`` runs."""
    try:
        argv = [*shlex.split(command), *rest]
    except ValueError:  # (an unclosed quote)
        return _Run(None)
    return _program(argv) if argv else _Run(None)


def _option(reading: _Reading, arg: str) -> tuple[str | None, str | None]:
    """The option in ``arg`` that takes a value, and the value if attached (``--x=v``,
    ``-Xdev``, ``-uX``); (None, None) for an option that takes none."""
    if arg.startswith("--"):
        name, eq, value = arg.partition("=")
        if reading.takes_value(name):
            return name, value if eq else None
        return None, None
    if not reading.grouped:
        return (arg, None) if reading.takes_value(arg) else (None, None)
    for j in range(1, len(arg)):
        option = "-" + arg[j]
        if option in reading.attached:
            break
        if reading.takes_value(option):
            return option, arg[j + 1 :] or None
    return None, None


def _plain_name(reading: _Reading, rest: Sequence[str]) -> _Run:
    """What the first plain argument, ``rest[0]``, runs: a program of its own after a
    launcher, a class (its last part names it), else a script (its stem); nothing for
    stdin (``-``)."""
    first = rest[0]
    if first == "-":
        return _Run(None)
    if reading.launcher:
        return _program(rest)
    if reading.classes and not first.endswith(".java"):
        return _Run(_last_part(first))
    return _Run(_stem(first) or None, (first,))


def _last_part(dotted: str) -> str | None:
    """``pkg.agents.calc`` -> ``calc`` (a Java module's ``mod/pkg.Main`` -> ``Main``)."""
    return dotted.rpartition("/")[2].rpartition(".")[2] or None


def agent_names(commands: Sequence[Sequence[str]]) -> list[str]:
    """One distinct name per command (:func:`program_name`, then ``-2``, ``-3`` on repeats);
    whitespace around it dropped, and the root supervisor's ``root`` taken as given (a
    program ``./root`` is ``root-2``), since an agent may not be named so. A name past
    :data:`NAME_MAX` characters is cut to it, before its ``-2`` (a 255-byte file name
    spawned twice: the second was 257 characters, and the run failed at its spawn)."""
    names: list[str] = []
    for argv in commands:
        base = program_name(argv).strip()[:NAME_MAX].rstrip()
        name, n = base, 1
        while name in names or name == ROOT_NAME:
            n += 1
            suffix = f"-{n}"
            name = f"{base[: NAME_MAX - len(suffix)]}{suffix}"
        names.append(name)
    return names


@attrs.define(eq=False)
class SpawnedProgram:
    """One ``--spawn`` program and what became of it."""

    command: tuple[str, ...]
    name: str
    agent_id: uuid.UUID | None = None
    #: it registered at least once (its ``on_start`` finished)
    registered: bool = False
    #: what its first failed start did (before it ever registered), or that its
    #: supervisor gave up on it (``given_up``), else None
    problem: str | None = None
    #: its supervisor gave up on it after it had registered (restart intensity exceeded)
    given_up: bool = False
    #: from the bridge's counters, the latest read (final once the kernel has stopped:
    #: the bridge keeps a stopped agent's); ``registered_as``: the name its ``register``
    #: gave, None if it gave none; ``counts``: :meth:`BridgeStats.counts`
    registered_as: str | None = None
    starts: int = 0
    last_exit: int | None = None
    counts: dict[str, int] = attrs.field(factory=dict)
    #: what gave the command, as its failure names it: ``--spawn``, or ``[app] spawn
    #: (file ...)`` for a command of the config
    source: str = "--spawn"

    @property
    def command_text(self) -> str:
        return shlex.join(self.command)


class SpawnFailed(Exception):
    """A ``--spawn`` program never registered, or its supervisor gave up on it; the
    message names each and what it did."""

    def __init__(self, programs: Sequence[SpawnedProgram]) -> None:
        self.programs = list(programs)
        super().__init__("; ".join(failure_text(p) for p in self.programs))

    def __reduce__(self) -> tuple[Any, ...]:
        # rebuilt from its programs (Exception's own pickling passes the text, its args)
        return type(self), (self.programs,), self.__dict__


def failure_text(program: SpawnedProgram) -> str:
    """``--spawn 'CMD' did not start: ...``, or ``--spawn 'CMD' stopped for good: ...``
    (``[app] spawn (file ...) 'CMD' ...`` for a command of the config)."""
    if program.given_up:
        return f"{program.source} {program.command_text!r} {program.problem}"
    return (
        f"{program.source} {program.command_text!r} did not start: "
        f"{program.problem or 'it never registered'}"
    )


def register_timeout(shutdown_grace: float) -> float:
    """The registration wait: never longer than the shutdown grace, so a program that
    never registers cannot hold the shutdown past the grace."""
    return min(REGISTER_TIMEOUT, shutdown_grace) if shutdown_grace > 0 else REGISTER_TIMEOUT


def stop_grace(shutdown_grace: float) -> float:
    """The wait after the ``shutdown`` frame, and again after SIGTERM: the kernel's
    shutdown grace, at most the bridge's own (5 s), so that a program that ignores its
    stop holds it no longer than the kernel's grace (twice)."""
    return min(STOP_GRACE, shutdown_grace) if shutdown_grace > 0 else STOP_GRACE


def spawn_programs(
    kernel: Kernel, commands: Sequence[Sequence[str]], hint: str = "--spawn"
) -> list[SpawnedProgram]:
    """Spawn one process agent per command, named after its program; ``hint`` names what
    gave the commands (``--spawn``, or ``[app] spawn (file ...)``) in their failures."""
    grace = kernel.config.kernel.shutdown_grace
    programs: list[SpawnedProgram] = []
    for argv, name in zip(commands, agent_names(commands), strict=True):
        ref = kernel.spawn(
            process_agent(
                list(argv),
                name=name,
                register_timeout=register_timeout(grace),
                shutdown_grace=stop_grace(grace),
                # (a first start that fails is not restarted: it stops the run, and the
                # summary's exit status is the failure's, not a restart's killed at the stop)
                first_start_stops=True,
            )
        )
        programs.append(SpawnedProgram(tuple(argv), name, ref.id, source=hint))
        log_guarded(log, logging.INFO, "spawned process agent %s: %s", name, shlex.join(argv))
    return programs


def _problem(error: BaseException | None, reason: str) -> str:
    """What a failed start did, in the bridge's words (its ``problem``) when it has them."""
    if error is None:
        return reason or "failed"
    return str(getattr(error, "problem", None) or error)


async def watch_starts(
    kernel: Kernel,
    events: Subscription[LifecycleEvent],
    programs: Sequence[SpawnedProgram],
    on_failure: Callable[[SpawnedProgram], None],
    *,
    give_ups: bool = False,
    all_started: trio.Event | None = None,
) -> None:
    """Follow ``events`` (a ``kernel.events()`` subscription of ``kernel`` taken before the
    spawns): mark programs registered, record the problem of a first start that failed and call
    ``on_failure(program)`` for it. Returns once every program has registered or failed
    (and sets ``all_started``, if given);
    with ``give_ups``, goes on to the end of ``events``, and a registered program whose
    supervisor gives up on it (it kept failing) gets ``given_up`` and its problem, and
    ``on_failure(program)`` is called for it."""
    by_id = {p.agent_id: p for p in programs}
    pending = set(by_id)
    if not pending and all_started is not None:
        all_started.set()
    async for event in events:
        program = by_id.get(event.agent_id)
        if program is None:
            continue
        if event.kind is EventKind.ESCALATED and program.registered and not program.given_up:
            # An isolating root gave up on it: "stopped for good; the kernel goes on".
            program.given_up = True
            last = _problem(event.error, "") if event.error is not None else ""
            program.problem = f"stopped for good: {event.reason or 'given up on'}" + (
                f"; last failure: {last}" if last else ""
            )
            on_failure(program)
            continue
        if event.agent_id not in pending:
            continue
        if event.kind is EventKind.STARTED:
            program.registered = True
            pending.discard(event.agent_id)
            note_bridge_stats([program], kernel)
        elif event.kind is EventKind.FAILED:
            program.problem = _problem(event.error, event.reason)
            pending.discard(event.agent_id)
            on_failure(program)
        if not pending:
            if all_started is not None:
                all_started.set()
            if not give_ups:
                return


def note_bridge_stats(programs: Sequence[SpawnedProgram], kernel: Kernel) -> None:
    """Copy the bridge's counters of the programs' agents, live or stopped (the final
    counters of a stopped agent, which the bridge keeps)."""
    from ..bridges.process import bridge_stats, stopped_bridge_stats

    stats = {**stopped_bridge_stats(kernel).agents, **bridge_stats(kernel)}
    for program in programs:
        s = stats.get(program.agent_id) if program.agent_id is not None else None
        if s is None:
            continue
        program.starts, program.last_exit = s.starts, s.last_exit
        program.counts = s.counts()
        if s.registered:
            # A name is a string; a register without one (or with null, or a number the
            # bridge warned about) names nothing: None, not the text "None".
            name = s.registered.get("name")
            program.registered_as = name if isinstance(name, str) else None


def spawn_summary(
    programs: Sequence[SpawnedProgram], problems: Mapping[str, str]
) -> list[dict[str, Any]]:
    """The summary's ``spawned`` entries: command, agent name, what it registered as,
    starts, last exit status, the bridge's counts and the problem of a start that failed
    (``problems``: those logged, by agent id)."""
    return [
        {
            "command": p.command_text,
            "name": p.name,
            "registered": p.registered,
            "registered_as": p.registered_as,
            "starts": p.starts,
            "last_exit": p.last_exit,
            "counts": p.counts,
            "problem": p.problem or (None if p.registered else problems.get(str(p.agent_id))),
        }
        for p in programs
    ]


class OneLineBridgeErrors(logging.Filter):
    """Log an expected process-agent failure (``ProcessAgentError``) as one line, and keep
    the first one of each agent (``problems``, by agent id).

    The kernel logs agent failures with a traceback, which for a program that exited or
    printed garbage shows only the bridge's internals. A start that fails during the
    shutdown is published as ``stopped``, without the error: the log record is where the
    CLI learns what the program did.
    """

    def __init__(self) -> None:
        super().__init__()
        self.problems: dict[str, str] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        from ..bridges.process import ProcessAgentError

        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, ProcessAgentError):
            agent_id = getattr(record, "agent_id", None)
            if agent_id is not None:
                self.problems.setdefault(str(agent_id), exc.problem)
            record.msg = f"{record.getMessage()}: {exc.problem}"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True
