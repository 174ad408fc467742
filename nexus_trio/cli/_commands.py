"""The click classes behind the ``nexus`` typer app: how its command lines are read and
how its help looks.

Options without a command mean ``run`` and a leading program name is skipped
(:func:`default_to_run`), so the original Nexus's ``nexus-runtime -n 4 -d 10`` and
``docker run IMAGE nexus-runtime -n 100 -d 30`` work as written. Flags are shown without
a type in help: typer labels every boolean flag ``<bool>``, which reads as if it took a
value. A flag taking a number of seconds or a rate reads it with :func:`finite_at_least`.

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

import enum
import json
import math
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final, TypeVar

import typer.core

from .._config import cut, host_problem, is_app_reference, meant_app_reference, unbracketed

__all__ = [
    "PROGRAM_NAMES",
    "Command",
    "Group",
    "RunByDefaultGroup",
    "RunCommand",
    "as_app_reference",
    "default_to_run",
    "file_path",
    "finite_at_least",
    "host_name",
]

#: names of this program: one leading name on the command line is skipped, so that under
#: the image's ``ENTRYPOINT ["nexus-runtime"]``, ``docker run IMAGE nexus-runtime -n 100``
#: (the original's form, giving ``nexus-runtime nexus-runtime -n 100``) works as written
PROGRAM_NAMES: Final = frozenset({"nexus", "nexus-runtime"})


def default_to_run(args: list[str], root_options: frozenset[str]) -> list[str]:
    """The command line with the original's shorthands spelt out.

    One leading program name (:data:`PROGRAM_NAMES`) is dropped, and a command line that
    starts with an option which is not one of the root's (``--help``, ``--version``, ...)
    means ``run``: ``nexus-runtime -n 4 -d 10`` is ``nexus-runtime run -n 4 -d 10``.
    """
    args = list(args)
    if args and args[0] in PROGRAM_NAMES:
        del args[0]
    if args and args[0].startswith("-") and args[0] != "--":
        name = args[0].partition("=")[0]
        if name not in root_options:
            args.insert(0, "run")
    return args


# ``ctx`` below is typer's bundled click Context, which typer does not export by name.


def _hide_flag_types(command: Any, ctx: Any) -> None:
    """Give flags (the help option included) an empty metavar, so help shows no type."""
    for param in command.get_params(ctx):
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""


#: a command line of an example in an epilog: ``nexus`` at a line's indent, or at the start
#: of an italic span (``[i]nexus config init FILE[/]``), followed by its arguments
_EXAMPLE_PROGRAM = re.compile(r"(?m)(^ +|\[i\])nexus(?= )")


def program_named(text: str, program: str) -> str:
    """``text`` (an epilog) with its examples' ``nexus`` named ``program``, the name the
    user ran (``nexus-runtime --help`` shows ``nexus-runtime run ...``)."""
    return _EXAMPLE_PROGRAM.sub(lambda m: f"{m[1]}{program}", text)


@contextmanager
def _help_of(command: Any, ctx: Any) -> Iterator[None]:
    """While ``command``'s help is written: flags without ``<bool>``, and the examples of
    its epilog naming the program as invoked (the root context's name)."""
    _hide_flag_types(command, ctx)
    written = command.epilog
    if written:
        command.epilog = program_named(written, ctx.find_root().info_name or "nexus")
    try:
        yield
    finally:
        command.epilog = written


#: ``ctx.meta`` key (one dict for a command line's contexts): the command's own code runs,
#: and handles a Ctrl-C itself (:meth:`Command.invoke`)
_COMMAND_RUNS: Final = "nexus_trio.cli.command_runs"

#: the exit status of a Ctrl-C's end, as Python's (128 + SIGINT)
_INTERRUPTED: Final = 130


def _interrupted_while_starting(run: bool) -> typer.Exit:
    """Say in one line that a Ctrl-C came inside click's handling, before the command's
    own code ran (its command line parsed, a flag's value checked): status 130, as the
    entry's own window says it (``_nexus_trio_main.interrupted_while_starting``), where
    click said ``Aborted!``, exit 1 (typer before 0.26), or typer nothing, exit 130."""
    what = ": the run was not started" if run else ""
    typer.echo(f"nexus: interrupted: SIGINT while starting{what}", err=True)
    return typer.Exit(_INTERRUPTED)


class Command(typer.core.TyperCommand):
    """A ``nexus`` command: flags without ``<bool>`` in its help, examples named as the
    program was run, arguments in its usage line as the docs write them."""

    def invoke(self, ctx: Any) -> Any:
        ctx.meta[_COMMAND_RUNS] = True  # (a Ctrl-C from here on is the command's own)
        return super().invoke(ctx)

    def format_help(self, ctx: Any, formatter: Any) -> None:
        with _help_of(self, ctx):
            super().format_help(ctx, formatter)

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        """The usage line (of ``--help`` and of a usage error's box) as docs/cli.md and
        the original's ``--help`` write it, ``nexus send [OPTIONS] CMD JSON``: a required
        argument by its name alone, an optional one in brackets. typer 0.29 puts a
        required one in braces (``{CMD} {JSON}``), which reads as a choice or a set."""
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, typer.core.TyperArgument):
                name = param.display_name_raw
                name = name if param.required else f"[{name}]"
                pieces.append(name if param.nargs == 1 else f"{name}...")
            else:
                pieces.extend(param.get_usage_pieces(ctx))
        return pieces


#: what click escapes in an unexpected argument it shows (terminal control characters)
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def as_app_reference(arg: str) -> str | None:
    """The ``--app`` reference that ``arg``, a word given where ``nexus run`` takes none,
    reads as: ``myagents:app`` and ``pkg:Agents.spec`` as written, ``myagents.py:app``
    (a file) as ``myagents:app``, which ``--app`` takes; None for a word with no colon."""
    if ":" not in arg:
        return None
    meant = meant_app_reference(arg)  # (first: ``app.py:main`` reads as a reference too)
    return meant if meant is not None else arg if is_app_reference(arg) else None


class RunCommand(Command):
    """``nexus run``: an argument that reads as an app reference (``nexus run
    myagents:app``, as uvicorn and gunicorn take one) is told to be given as ``--app``.
    It was refused as ``Got unexpected extra argument(s) (myagents:app)`` alone, naming
    no flag (docs/deploy.md's pod had ``args: ["run", "app:main", ...]``). The arguments
    are shown cut as the other errors' values are (:func:`nexus_trio._config.cut`)."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if ctx.allow_extra_args or ctx.resilient_parsing:
            return list(super().parse_args(ctx, args))
        ctx.allow_extra_args = True  # (the extra arguments are refused below)
        try:
            rest = list(super().parse_args(ctx, args))
        finally:
            ctx.allow_extra_args = False
        if rest:
            extra = _CONTROL.sub(lambda m: f"\\x{ord(m[0]):02x}", cut(" ".join(rest)))
            references = [ref for ref in map(as_app_reference, rest) if ref is not None]
            given = ctx.params.get("app_ref")
            hint = ""
            if given is not None and references:
                hint = (
                    f"; --app is given ({cut(given, repr)}) and takes one MODULE:ATTR, which"
                    " may name a list of agents (nexus run takes no argument)"
                )
            elif references:
                hint = (
                    f"; did you mean --app {cut(references[0])}? (nexus run takes no"
                    " argument: your agents are given as --app MODULE:ATTR)"
                )
            ctx.fail(f"Got unexpected extra argument(s) ({extra}){hint}")
        return rest


class Group(typer.core.TyperGroup):
    """A ``nexus`` command group: flags without ``<bool>`` in its help, examples named
    as the program was run."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        with _help_of(self, ctx):
            super().format_help(ctx, formatter)


#: ``ctx.meta`` key: the command line as the root group parses it (:func:`default_to_run`)
_COMMAND_LINE: Final = "nexus_trio.cli.command_line"


def _asks_json(args: list[str]) -> bool:
    """Whether the command line (:func:`default_to_run`'s) is a ``nexus run`` given
    ``--json`` (before a ``--``)."""
    if args[:1] != ["run"]:
        return False
    flags = args[1 : args.index("--")] if "--" in args else args[1:]
    return "--json" in flags


def say_refused_as_json(kind: str, message: str, status: int) -> None:
    """``nexus run --json`` refused before any run began (``kind``: a ``"usage error"``,
    its box on standard error, or a ``"config error"``, ``nexus: error: ...``; exit
    ``status``, 2): one JSON object on standard output naming the error, as a run's
    failure is named in its summary, for a script that reads standard output (it read
    nothing at all). ``stopped_by`` is ``kind``; ``started`` false: no run began. A
    SIGTERM or SIGHUP that came as it started ends the process by it at its exit (the
    scripts' entry, ``stop_not_taken``): ``exit_status`` is then 128 + its number, as the
    process's status is (it said 2, the process ended by SIGTERM: 143)."""
    entry = sys.modules.get("_nexus_trio_main")
    ending = entry.stop_not_taken() if entry is not None else None
    if ending is not None:
        status = 128 + int(ending)
    said = {
        "stopped_by": kind,
        "error": f"{kind}: {message}",
        "exit_status": status,
        "started": False,
    }
    try:
        sys.stdout.write(json.dumps(said, indent=2) + "\n")
        sys.stdout.flush()
    except OSError as exc:
        # (a full disk, ``>&-``: raised here, in the usage error's handling, it took the
        # place of the error, whose box was never shown: the refusal is said first, then
        # the entry says this, :func:`refusal_not_written`)
        _unwritten[:] = [exc]


#: the ``OSError`` that kept :func:`say_refused_as_json`'s object from standard output
_unwritten: list[OSError] = []


def refusal_not_written() -> OSError | None:
    """The ``OSError`` that kept a refused ``run --json``'s object from standard output
    (:func:`say_refused_as_json`), None if it was written or none was: the entry
    (``nexus_trio.cli._app.main``), once the refusal is said on standard error, says
    that its output could not be written, status 1, as for any output of its own. Taken:
    the next call returns None (a process that goes on, a test, invokes it again)."""
    unwritten, _unwritten[:] = _unwritten[:1], []
    return unwritten[0] if unwritten else None


class RunByDefaultGroup(Group):
    """The root group: options without a command mean ``run`` (:func:`default_to_run`)."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        # (inside click's handling of KeyboardInterrupt from here on: the scripts' entry
        # stops saying a Ctrl-C as one while starting, _nexus_trio_main.run_command)
        entry = sys.modules.get("_nexus_trio_main")
        if entry is not None:
            entry.command_began()
        root_options = frozenset(
            name for param in self.get_params(ctx) for name in (*param.opts, *param.secondary_opts)
        )
        args = default_to_run(args, root_options)
        ctx.meta[_COMMAND_LINE] = list(args)
        return super().parse_args(ctx, args)

    def make_context(
        self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any
    ) -> Any:
        """As click's; a Ctrl-C as the command line is parsed is said in one line, 130
        (:func:`_interrupted_while_starting`)."""
        try:
            return super().make_context(info_name, args, parent, **extra)
        except KeyboardInterrupt:
            options = frozenset(name for param in self.params for name in param.opts)
            run = default_to_run(list(args), options)[:1] == ["run"]
            raise _interrupted_while_starting(run) from None

    def invoke(self, ctx: Any) -> Any:
        """As click's; in a worker of ``nexus run --workers``, a usage error's box (which
        typer prints to ``sys.stderr`` after this returns) has each of its lines labelled
        with the worker's name (:class:`._app.LabelledLines`), as the worker's own log lines
        are: N workers' boxes in the parent's standard error read as one, the parent's.
        A Ctrl-C before the command's own code runs (as its flags are parsed and checked)
        is said in one line, 130; one after is the command's (a run's summary)."""
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            if ctx.meta.get(_COMMAND_RUNS):
                raise
            raise _interrupted_while_starting(ctx.invoked_subcommand == "run") from None
        except typer.TyperException as exc:  # (a usage error: typer vendors its click)
            from ._app import LabelledLines
            from ._cluster_cmd import worker_node

            worker = worker_node()
            if worker and sys.stderr is not None:
                sys.stderr = LabelledLines(sys.stderr, f"{worker}: ")
            elif not worker and _asks_json(ctx.meta.get(_COMMAND_LINE, [])):
                say_refused_as_json("usage error", exc.format_message(), exc.exit_code)
            raise

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        """As typer's (``Did you mean 'send'?`` for a typo), and a command of a group
        given alone is named with its group: ``nexus init`` (as ``cargo init``, ``git
        init``) says ``Did you mean 'config init'?``, where it said no more than ``No
        such command 'init'.``."""
        if args and args[0] not in self.commands:
            reference = as_app_reference(args[0])
            if reference is not None:  # (``nexus myagents:app``, as ``uvicorn`` takes one)
                ctx.fail(
                    f"No such command {cut(args[0], repr)}. Did you mean"
                    f" 'run --app {cut(reference)}'?"
                )
            nested = [
                f"{name} {args[0]}"
                for name, command in self.commands.items()
                if isinstance(command, typer.core.TyperGroup) and args[0] in command.commands
            ]
            if nested:
                suggestions = ", ".join(f"{n!r}" for n in nested)
                ctx.fail(f"No such command {args[0]!r}. Did you mean {suggestions}?")
        return super().resolve_command(ctx, args)


def file_path(text: Any) -> Path:
    """The ``parser=`` of a flag or argument naming a file: a path that is no directory,
    where an empty one (``-c "$CONFIG"`` with the variable unset) is said to be empty
    (typer's own check said ``file '' is a directory``)."""
    if isinstance(text, Path):
        return text  # (a default, as given)
    if not text:
        raise typer.BadParameter("an empty path names no file")
    if os.path.isdir(text):
        raise typer.BadParameter(f"file {text!r} is a directory")
    return Path(text)


def host_name(text: Any) -> str:
    """The ``parser=`` of a flag naming a host (``health --host``, ``run --metrics-host``):
    an address, an IPv6 one with or without brackets (given without them: ``[::1]`` is
    ``::1``, which a URL brackets again), or a name the resolver can be asked
    (:func:`nexus_trio._config.host_problem`). ``--host ""`` asked ``http://:9464/healthz``
    and said the name was not known, exit 1, not the flag; ``x..y``, a 64-character label
    or a non-UTF-8 byte (``a\udcffb``) raised ``UnicodeError`` in the check's thread: a
    traceback, then ``unreachable: no whole answer within 3s``, exit 1."""
    spelt = str(text)
    got = f"must be a host name or an address, got {shown(spelt, quoted=True)}"
    if not spelt.strip():
        raise typer.BadParameter(got)
    problem = host_problem(spelt)
    if problem is not None:
        raise typer.BadParameter(f"{got} ({problem})")
    return unbracketed(spelt)


#: a whole number as a flag takes it, as the original's (Rust's ``u64``/``i64``
#: ``from_str``, through clap) does: an optional sign, then ASCII decimal digits. Python's
#: ``int()`` also took ``1_000``, `` 5 `` (blanks around) and non-ASCII digits (``５``).
_WHOLE_NUMBER: Final = re.compile(r"[+-]?[0-9]+")


#: a number as a float flag takes it, as the original's (Rust's ``f64`` ``from_str``,
#: through clap) does: an optional sign, ASCII decimal digits with an optional point
#: (``5``, ``2.5``, ``5.``, ``.5``) and exponent (``1e3``), or ``inf``/``infinity``/``nan``
#: in any case (refused by the range, with their own words). Python's ``float()`` also took
#: ``1_000``, blanks around the number and non-ASCII digits.
_DECIMAL: Final = re.compile(
    r"[+-]?(?:(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|(?i:inf|infinity|nan))"
)


def shown(text: str, *, quoted: bool = False) -> str:
    """``text`` as an error shows it (``repr`` if ``quoted``): whole up to 40 characters
    (``nexus_trio._config.SHOWN_MAX``), else its first 40 and its length. A value of
    4,301 digits (past ``int()``'s limit) was echoed whole: 4,300 characters of digits
    in one error line."""
    return cut(text, repr if quoted else str)


def _why_not(spelt: str) -> str:
    """What a flag's number spelling that Python's ``int()`` or ``float()`` would read
    has that the flags refuse: said after the value, so ``1_000`` does not read as a
    typo."""
    if spelt != spelt.strip():
        return " (blanks around the number)"
    if "_" in spelt:
        return f" (no '_' between digits: write {spelt.replace('_', '')})"
    if any(c.isdigit() and not c.isascii() for c in spelt):
        return " (digits other than 0-9)"
    if spelt.lstrip("+-")[:2].lower() in ("0x", "0o", "0b"):
        return " (decimal digits only: no 0x, 0o or 0b)"
    return ""


def env_whole_number(name: str, spelt: str, minimum: int = 1) -> int:
    """The whole number of at least ``minimum`` that the environment variable ``name``
    gives as ``spelt``, in the flags' spelling (ASCII digits, an optional sign), else a
    ValueError naming the variable, its value and what it has that is refused: ``int()``
    took `` 3``, ``1_0`` and other scripts' digits (``３``)."""
    problem = f"{name}={shown(spelt)} is not a whole number of at least {minimum}"
    if not _WHOLE_NUMBER.fullmatch(spelt):
        raise ValueError(problem + _why_not(spelt))
    try:
        value = int(spelt)
    except ValueError:  # (past Python's 4,300 digits)
        raise ValueError(problem) from None
    if value < minimum:
        raise ValueError(problem)
    return value


def whole_number(minimum: int | None = None, maximum: int | None = None) -> Callable[[Any], int]:
    """The ``parser=`` of an integer flag: a whole number in its range, else a usage error
    naming the flag (click adds it) and the range, ``must be a whole number from 0 to
    65535, got 70000``, where typer's own answer was pydantic's (``Input should be less
    than or equal to 65535``, ``Input should be a valid integer, unable to parse string as
    an integer``). ``min=``/``max=`` stay beside it for the help's ``[0<=x<=65535]``."""
    if minimum is not None and maximum is not None:
        accepted = f"a whole number from {minimum} to {maximum}"
    elif minimum is not None:
        accepted = f"a whole number >= {minimum}"
    else:
        accepted = "a whole number"

    def parse(text: Any) -> int:
        if isinstance(text, int):
            value = text
        else:
            spelt = str(text)
            if not _WHOLE_NUMBER.fullmatch(spelt):
                raise typer.BadParameter(
                    f"must be {accepted}, got {shown(spelt, quoted=True)}{_why_not(spelt)}"
                )
            try:
                value = int(spelt)
            except ValueError:  # (past Python's 4,300 digits: no flag takes it)
                digits = len(spelt.lstrip("+-"))
                raise typer.BadParameter(
                    f"must be {accepted}, got a number of {digits} digits"
                ) from None
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            raise typer.BadParameter(f"must be {accepted}, got {shown(str(value))}")
        return value

    return parse


_E = TypeVar("_E", bound=enum.StrEnum)


def one_of(choices: type[_E]) -> Callable[[Any], _E]:
    """The ``parser=`` of a flag that takes one of ``choices``' values (in any case): a
    usage error naming the flag (click adds it) and the choices as the config file's error
    does, ``must be one of compact, full, json, pretty, got 'xml'``. typer's own answer was
    ``Value error, 'xml' is not one of 'compact', 'json', 'pretty'.`` (pydantic's words);
    the help still lists the choices (``<compact|json|pretty>``)."""
    by_value = {choice.value.lower(): choice for choice in choices}
    listed = ", ".join(choice.value for choice in choices)

    def parse(text: Any) -> _E:
        if isinstance(text, choices):
            return text
        found = by_value.get(str(text).lower())
        if found is None:
            raise typer.BadParameter(
                f"must be one of {listed}, got {shown(str(text), quoted=True)}"
            )
        return found

    return parse


def finite_at_least(minimum: float, meaning: str = "") -> Callable[[Any], float]:
    """The ``parser=`` of a float flag: a finite number >= ``minimum``, else a usage error
    naming the flag (click adds it) and the accepted range, ``meaning`` after it.

    typer's ``min=`` (kept beside it for the help's ``[x>=0]``) answers ``nan`` with "should
    be greater than or equal to 0" and lets ``inf`` (also ``1e999``, read as ``inf``)
    through, which no flag means: a run until Ctrl-C is ``-d 0``, and an infinite timeout
    overflows the threads' timers. ``-0`` is 0.
    """
    accepted = f"a finite number >= {minimum:g}{f' ({meaning})' if meaning else ''}"

    def parse(text: Any) -> float:
        if isinstance(text, str) and not _DECIMAL.fullmatch(text):
            raise typer.BadParameter(
                f"must be {accepted}, got {shown(text, quoted=True)}{_why_not(text)}"
            )
        try:
            value = float(text)
        except (TypeError, ValueError):
            raise typer.BadParameter(
                f"must be {accepted}, got {shown(str(text), quoted=True)}"
            ) from None
        if not (math.isfinite(value) and value >= minimum):
            spelt = str(text).strip()
            if math.isfinite(value) or spelt.lower().lstrip("+-") in ("inf", "infinity", "nan"):
                said = shown(spelt)
            else:  # (1e999)
                said = f"{shown(spelt)} (read as {value!r})"
            raise typer.BadParameter(f"must be {accepted}, got {said}")
        return value + 0.0  # (-0.0 is 0.0)

    return parse
