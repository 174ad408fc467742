"""Agents in other languages: child processes speaking newline-delimited JSON on stdio.

Agent side (what runs in the child): :mod:`nexus_trio.bridges.python` (stdlib only, also
runnable as a file) and ``nexus-bridge.js`` for Node. Kernel side (what runs in the
kernel): :func:`process_agent` in :mod:`nexus_trio.bridges.process`, re-exported here
lazily so that importing the agent-side module pulls in nothing else.

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .process import BridgeStats as BridgeStats
    from .process import ProcessAgent as ProcessAgent
    from .process import StoppedBridgeStats as StoppedBridgeStats
    from .process import bridge_stats as bridge_stats
    from .process import process_agent as process_agent
    from .process import stopped_bridge_stats as stopped_bridge_stats

__all__ = [
    "BridgeStats",
    "ProcessAgent",
    "StoppedBridgeStats",
    "bridge_stats",
    "process_agent",
    "stopped_bridge_stats",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import process

        return getattr(process, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
