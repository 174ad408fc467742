"""Redraw a saved run (``--json``) for the docs.

``python -m nexus_trio.bench._markdown RESULTS.json [PLOT.png]`` prints the table as
Markdown and, given a second argument, draws the plot again. A file that cannot be read
or is no saved run exits 2, a plot that cannot be drawn 1, each with one line naming the
file (as ``nexus bench`` does), never a traceback.

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ._report import PlotUnavailable, markdown, plot
from ._runner import Report

USAGE = "usage: python -m nexus_trio.bench._markdown RESULTS.json [PLOT.png]"


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2):
        print(USAGE, file=sys.stderr)
        return 2
    source = Path(argv[0])
    try:
        data = json.loads(source.read_text(encoding="utf-8"))
        table = markdown(data)
        report = Report.from_dict(data) if len(argv) == 2 else None
    except OSError as exc:
        print(f"{source}: cannot read it: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError among them
        print(f"{source}: not JSON: {exc}", file=sys.stderr)
        return 2
    except (KeyError, TypeError, AttributeError) as exc:
        print(
            f"{source}: not a run saved by nexus bench --json ({type(exc).__name__}: {exc})",
            file=sys.stderr,
        )
        return 2
    print(table, end="")
    if report is not None:
        target = Path(argv[1])
        try:
            plot(report, target)
        except (PlotUnavailable, ValueError) as exc:
            print(f"{target}: {exc}", file=sys.stderr)
            return 1
        except OSError as exc:
            print(f"{target}: cannot write it: {exc.strerror or exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
