"""typer's ``CliRunner`` with each app's click command built once a test process.

``typer.testing.CliRunner.invoke`` builds the app's click command again (``typer.main.
get_command``) at every call: about 18 ms of CPU for ``nexus``'s app here, for each of
the CLI tests' hundreds of invokes (213 in ``test_cli_fuzz.py`` alone, 4.2 s of its CPU).
The command is what ``nexus`` builds once at its start, and nothing the CLI does changes
it between two parses (click makes a new context for each), so :class:`CliRunner` builds
it once for each app (:func:`command_of`) and runs it as typer's runner does: in the
runner's :meth:`~typer.testing.CliRunner.isolation` (standard streams, ``env``, the help's
80 columns), its exit code, exception and output read the same way, into typer's
:class:`~typer.testing.Result`.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import typer
import typer.main
import typer.testing

#: the command built for each app, by the app's identity (a Typer is hashed by it)
_COMMANDS: dict[typer.Typer, Any] = {}

#: typer's runner is its own (typer 0.26 and later, which vendor click): an older typer's
#: is click's, whose isolation and Result differ; there each invoke is typer's, as before
OWN_RUNNER = typer.testing.CliRunner.__bases__ == (object,)


def command_of(app: typer.Typer) -> Any:
    """``app``'s click command, built the first time it is asked for in this process."""
    command = _COMMANDS.get(app)
    if command is None:
        command = _COMMANDS[app] = typer.main.get_command(app)
    return command


class CliRunner(typer.testing.CliRunner):
    """As typer's, with the app's command built once (:func:`command_of`)."""

    def invoke(
        self,
        app: typer.Typer,
        args: str | Sequence[str] | None = None,
        input: bytes | str | None = None,
        env: Mapping[str, str | None] | None = None,
        catch_exceptions: bool = True,
        color: bool = False,
        **extra: Any,
    ) -> typer.testing.Result:
        if not OWN_RUNNER:
            return super().invoke(app, args, input, env, catch_exceptions, color, **extra)
        cli = command_of(app)
        exc_info: Any = None
        exception: BaseException | None = None
        return_value: Any = None
        exit_code = 0
        with self.isolation(input=input, env=env, color=color) as (out, err, mixed):
            if isinstance(args, str):
                args = shlex.split(args)
            prog_name = (
                extra.pop("prog_name") if "prog_name" in extra else self.get_default_prog_name(cli)
            )
            try:
                return_value = cli.main(args=args or (), prog_name=prog_name, **extra)
            except SystemExit as e:
                exc_info = sys.exc_info()
                code = 0 if e.code is None else e.code
                if code != 0:
                    exception = e
                if not isinstance(code, int):
                    sys.stdout.write(f"{code}\n")
                    code = 1
                exit_code = code
            except Exception as e:
                if not catch_exceptions:
                    raise
                exception = e
                exit_code = 1
                exc_info = sys.exc_info()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                stdout, stderr, output = out.getvalue(), err.getvalue(), mixed.getvalue()
        return typer.testing.Result(
            runner=self,
            stdout_bytes=stdout,
            stderr_bytes=stderr,
            output_bytes=output,
            return_value=return_value,
            exit_code=exit_code,
            exception=exception,
            exc_info=exc_info,
        )
