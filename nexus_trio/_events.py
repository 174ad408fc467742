"""Lifecycle events of agents and supervisors, published on ``kernel.events()``.

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

import enum
import uuid
from typing import final

import attrs


class EventKind(enum.Enum):
    SPAWNED = "spawned"
    STARTED = "started"
    FAILED = "failed"
    RESTARTED = "restarted"
    STOPPED = "stopped"
    ESCALATED = "escalated"
    #: an external process or remote node became unreachable
    UNREACHABLE = "unreachable"


@final
@attrs.frozen
class LifecycleEvent:
    """Something that happened to one agent or supervisor."""

    kind: EventKind
    agent_id: uuid.UUID
    name: str | None
    #: kernel clock time (``trio.current_time()``)
    time: float
    reason: str = ""
    error: BaseException | None = None
    #: restarts of this agent so far, for ``restarted`` events
    restarts: int = 0
