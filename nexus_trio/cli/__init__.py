"""The ``nexus`` command line."""

from __future__ import annotations


def main() -> None:
    raise SystemExit("nexus: the command line is not built yet")
