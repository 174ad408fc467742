"""The ``nexus`` command line (typer + rich); the app is :data:`nexus_trio.cli._app.app`.

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

from ._app import app, main


def worker_node() -> str | None:
    """This process's node name (``worker-<i>``) if it is a worker of ``nexus run
    --workers N``, else None: what its parent set in ``NEXUS_WORKER`` (which
    ``os.environ`` also keeps; the command takes it out of the process environment that
    what it starts without ``env=`` inherits: docs/cli.md, `--workers N`). The preferred
    way for an app to ask."""
    from ._cluster_cmd import worker_node as node

    return node()


__all__ = ["app", "main", "worker_node"]
