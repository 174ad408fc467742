"""``nexus bench``: run the benchmark suite (see :mod:`nexus_trio.bench`).

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._commands import Command, file_path, shown, whole_number


def _scenario(text: str) -> str:
    """The ``parser=`` of ``--scenario``: a usage error naming the flag, the scenarios and
    the value, as ``nexus run --workload`` says it (the suite's own check said it without
    the flag, outside the usage box)."""
    from ..bench import SCENARIOS  # (the suite is imported when a bench runs, not before)

    if text not in SCENARIOS:
        listed = ", ".join(SCENARIOS)
        raise typer.BadParameter(f"must be one of {listed}, got {shown(text, quoted=True)}")
    return text


def _written_file(text: str) -> Path:
    """The ``parser=`` of ``--json``: a file whose folder exists, else a usage error
    naming the flag and the folder, before any scenario runs (it was a plain line,
    outside the usage box every other bad value gets)."""
    path = file_path(text)
    if not path.parent.is_dir():
        raise typer.BadParameter(
            f"folder {shown(str(path.parent), quoted=True)} does not exist,"
            f" got {shown(text, quoted=True)}"
        )
    return path


def _plot_file(text: str) -> Path:
    """The ``parser=`` of ``--plot``: as ``--json``'s, and matplotlib must be importable
    (a usage error naming the flag and what to install, not a plain line)."""
    path = _written_file(text)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise typer.BadParameter(
            "needs matplotlib, which is not installed: pip install 'nexus_trio[plot]' (or"
            f" pip install matplotlib), got {shown(text, quoted=True)}"
        ) from None
    return path


#: the flags that each pick the sizes of the suite, of which one may be given
_SCALE_FLAGS = ("--quick", "--full", "--smoke")
#: the most repetitions ``--repeat`` takes: a repetition of the suite at its tiny
#: ``--smoke`` sizes takes seconds and at its default sizes minutes, so 1,000 are hours to
#: days, more than a median needs; ``-r 99999999999999999999`` was taken and ran for good
MAX_REPEAT = 1000


_EPILOG = """\
[bold]Examples[/]

  nexus bench --quick                           [dim]# every scenario, small, ~1 min[/]

  nexus bench -s fanout -s reqrep --repeat 5    [dim]# two scenarios, median of 5[/]

  nexus bench --json bench.json --plot bench.png

  nexus bench --full -s scale                   [dim]# up to 1M agents (~2 min more)[/]

Scenarios: fanout, reqrep, scale, load, fanin, churn, bridges, goals.
"""


def register(app: typer.Typer) -> None:
    """Add the ``bench`` command to ``app``."""

    @app.command(cls=Command, epilog=_EPILOG)
    def bench(
        scenario: Annotated[
            list[str] | None,
            typer.Option(
                "--scenario",
                "-s",
                metavar="<name>",
                parser=_scenario,
                help="Run only this scenario (repeatable): fanout, reqrep, scale, load, "
                "fanin, churn, bridges, goals.",
            ),
        ] = None,
        quick: Annotated[
            bool, typer.Option("--quick", help="Small sizes, one repetition (about a minute).")
        ] = False,
        full: Annotated[
            bool, typer.Option("--full", help="Default sizes plus 1,000,000 idle agents.")
        ] = False,
        smoke: Annotated[
            bool, typer.Option("--smoke", help="Tiny sizes: does every scenario run (seconds).")
        ] = False,
        repeat: Annotated[
            int | None,
            typer.Option(
                "--repeat",
                "-r",
                help="Repetitions per scenario (medians are shown).",
                min=1,
                max=MAX_REPEAT,
                parser=whole_number(1, MAX_REPEAT),
            ),
        ] = None,
        json_file: Annotated[
            Path | None,
            typer.Option(
                "--json",
                metavar="FILE",
                parser=_written_file,
                help="Also write the results as JSON to FILE.",
            ),
        ] = None,
        plot_file: Annotated[
            Path | None,
            typer.Option(
                "--plot",
                metavar="FILE",
                parser=_plot_file,
                help="Also draw a PNG bar chart to FILE (needs matplotlib).",
            ),
        ] = None,
        no_progress: Annotated[
            bool, typer.Option("--no-progress", help="No progress bar (e.g. in CI logs).")
        ] = False,
    ) -> None:
        """Benchmark the kernel against raw trio and asyncio baselines, in one process run."""
        from ..bench import run_cli

        given = [flag for flag, on in zip(_SCALE_FLAGS, (quick, full, smoke), strict=True) if on]
        if len(given) > 1:
            # (a usage error naming the flag, as a bad value's: it was a plain line)
            raise typer.BadParameter(
                f"cannot go with {given[0]}: --quick, --full and --smoke each pick the"
                " sizes of the suite, give one",
                param_hint=f"'{given[1]}'",
            )
        scale = "quick" if quick else "full" if full else "smoke" if smoke else "default"
        status = run_cli(
            scenario or (),
            scale=scale,
            repeat=repeat,
            json_path=json_file,
            plot_path=plot_file,
            progress=not no_progress,
        )
        if status:
            raise typer.Exit(status)
