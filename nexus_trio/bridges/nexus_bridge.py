"""The Python bridge under the original Nexus module name, for agents written for the original.

``from nexus_bridge import NexusAgent, Message, MessageKind, run_agent`` works unchanged
with this directory on ``sys.path`` (or ``from nexus_trio.bridges.nexus_bridge import
...``): every name comes from :mod:`nexus_trio.bridges.python`, loaded from the file
beside this one when the package is not installed. ``python3 nexus_bridge.py`` runs the
echo agent, as the original did.

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

try:
    from . import python as _bridge
except ImportError:  # imported as a top-level module: load python.py from beside this file
    _spec = importlib.util.spec_from_file_location(
        "nexus_bridge_python", Path(__file__).resolve().with_name("python.py")
    )
    if _spec is None or _spec.loader is None:  # pragma: no cover - the file ships with us
        raise
    _bridge = sys.modules.get(_spec.name) or importlib.util.module_from_spec(_spec)
    if _spec.name not in sys.modules:
        sys.modules[_spec.name] = _bridge
        _spec.loader.exec_module(_bridge)

FEATURES = _bridge.FEATURES
KINDS = _bridge.KINDS
PROTOCOL_VERSION = _bridge.PROTOCOL_VERSION
Agent = _bridge.Agent
BadEnvironment = _bridge.BadEnvironment
Cancelled = _bridge.Cancelled
EchoAgent = _bridge.EchoAgent
InvalidFrame = _bridge.InvalidFrame
Message = _bridge.Message
MessageKind = _bridge.MessageKind
NexusAgent = _bridge.NexusAgent
main = _bridge.main
run_agent = _bridge.run_agent

__all__ = [
    "FEATURES",
    "KINDS",
    "PROTOCOL_VERSION",
    "Agent",
    "BadEnvironment",
    "Cancelled",
    "EchoAgent",
    "InvalidFrame",
    "Message",
    "MessageKind",
    "NexusAgent",
    "main",
    "run_agent",
]


def __getattr__(name: str) -> Any:
    return getattr(_bridge, name)


if __name__ == "__main__":
    sys.exit(main())
