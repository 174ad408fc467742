"""Redraw a saved run (``--json``) for the docs.

``python -m nexus_trio.bench._markdown RESULTS.json [PLOT.png]`` prints the table as
Markdown and, given a second argument, draws the plot again.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ._report import markdown, plot
from ._runner import Report


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2):
        print(
            "usage: python -m nexus_trio.bench._markdown RESULTS.json [PLOT.png]", file=sys.stderr
        )
        return 2
    data = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    print(markdown(data), end="")
    if len(argv) == 2:
        plot(Report.from_dict(data), Path(argv[1]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
