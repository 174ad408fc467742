"""The ``nexus`` command line (typer + rich); the app is :data:`nexus_trio.cli._app.app`.

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

from ._app import app, main

__all__ = ["app", "main"]
