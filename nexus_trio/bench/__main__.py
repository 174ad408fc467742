"""``python -m nexus_trio.bench``: the same command as ``nexus bench``.

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

import typer

from ..cli._bench_cmd import register


def main() -> None:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    register(app)
    app(prog_name="python -m nexus_trio.bench")


if __name__ == "__main__":
    main()
