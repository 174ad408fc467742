"""The click classes behind the ``nexus`` typer app: how its command lines are read and
how its help looks.

Options without a command mean ``run`` and a leading program name is skipped
(:func:`default_to_run`), so the original Nexus's ``nexus-runtime -n 4 -d 10`` and
``docker run IMAGE nexus-runtime -n 100 -d 30`` work as written. Flags are shown without
a type in help: typer labels every boolean flag ``<bool>``, which reads as if it took a
value.
"""

from __future__ import annotations

from typing import Any, Final

import typer.core

__all__ = ["PROGRAM_NAMES", "Command", "Group", "RunByDefaultGroup", "default_to_run"]

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


class Command(typer.core.TyperCommand):
    """A ``nexus`` command: flags without ``<bool>`` in its help."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        _hide_flag_types(self, ctx)
        super().format_help(ctx, formatter)


class Group(typer.core.TyperGroup):
    """A ``nexus`` command group: flags without ``<bool>`` in its help."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        _hide_flag_types(self, ctx)
        super().format_help(ctx, formatter)


class RunByDefaultGroup(Group):
    """The root group: options without a command mean ``run`` (:func:`default_to_run`)."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        root_options = frozenset(
            name for param in self.get_params(ctx) for name in (*param.opts, *param.secondary_opts)
        )
        return super().parse_args(ctx, default_to_run(args, root_options))
