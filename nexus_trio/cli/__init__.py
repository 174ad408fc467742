"""The ``nexus`` command line (typer + rich); the app is :data:`nexus_trio.cli._app.app`."""

from __future__ import annotations

from ._app import app, main

__all__ = ["app", "main"]
