"""Run the nexus_trio benchmark suite: ``python benchmarks/run.py [nexus bench flags]``.

The same command as ``nexus bench`` (``--scenario NAME``..., ``--quick``, ``--full``,
``--repeat N``, ``--json FILE``, ``--plot FILE``); see benchmarks/README.md.
"""

from __future__ import annotations

import typer

from nexus_trio.cli._bench_cmd import register


def main() -> None:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    register(app)
    app(prog_name="benchmarks/run.py")


if __name__ == "__main__":
    main()
