"""The one entry point behind ``nexus bench`` and ``python benchmarks/run.py``.

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.text import Text

from ._report import PlotUnavailable, plot, print_report, write_json
from ._result import BenchmarkError
from ._runner import resolve, run_suite
from ._scales import SCALES


def run_cli(
    scenarios: Sequence[str] = (),
    *,
    scale: str = "default",
    repeat: int | None = None,
    json_path: Path | None = None,
    plot_path: Path | None = None,
    progress: bool = True,
    console: Console | None = None,
) -> int:
    """Run, print the table, write the JSON and the plot; returns an exit status.

    0: done (goals missed are reported, not failures); 1: a scenario's counts did not
    add up, or the JSON or the plot could not be written; 2: bad arguments (the message names them).
    """
    out = console or Console()
    err = Console(stderr=True)

    def fail(message: str) -> None:
        # Text, not markup: the message quotes what the user wrote (a scenario, a path)
        # and the extra to install ('nexus_trio[plot]'), which markup would read as tags.
        err.print(Text(message, style="red"))

    if scale not in SCALES:
        fail(f"--scale: unknown scale {scale!r}; choose from {', '.join(SCALES)}")
        return 2
    if repeat is not None and repeat < 1:
        fail(f"--repeat must be >= 1, got {repeat}")
        return 2
    for flag, path in (("--json", json_path), ("--plot", plot_path)):
        if path is not None and not path.parent.is_dir():
            fail(f"{flag}: folder {str(path.parent)!r} does not exist")
            return 2
    if plot_path is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            fail(
                "--plot needs matplotlib: pip install 'nexus_trio[plot]' (or pip install matplotlib)"
            )
            return 2
    try:
        names = resolve(scenarios)
    except ValueError as exc:
        fail(f"--scenario: {exc}")
        return 2
    try:
        report = run_suite(SCALES[scale], names, repeat=repeat, console=err, progress=progress)
    except BenchmarkError as exc:
        fail(f"benchmark counts do not add up: {exc}")
        return 1
    print_report(report, out)
    status = 0
    if json_path is not None:
        # The table above is printed already: a file that cannot be written is named,
        # and the plot is still tried.
        try:
            write_json(report, json_path)
        except OSError as exc:
            fail(f"--json: cannot write {str(json_path)!r}: {exc.strerror or exc}")
            status = 1
        else:
            err.print(Text(f"wrote {json_path}"))
    if plot_path is not None:
        try:
            plot(report, plot_path)
        except (PlotUnavailable, ValueError) as exc:
            fail(f"--plot: {exc}")
            return 1
        except OSError as exc:
            fail(f"--plot: cannot write {str(plot_path)!r}: {exc.strerror or exc}")
            return 1
        err.print(Text(f"wrote {plot_path}"))
    return status
