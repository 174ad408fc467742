"""The fields every log record about an agent (and a message) carries: one place builds them.

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._message import Message


def log_fields(agent_id: Any, name: str | None, msg: Message | None = None) -> dict[str, str]:
    """``agent_id`` and ``agent_name``, plus ``msg_id`` and ``trace_id`` of ``msg`` if given."""
    fields = {"agent_id": str(agent_id), "agent_name": name or ""}
    if msg is not None:
        fields["msg_id"] = str(msg.id)
        fields["trace_id"] = str(msg.trace_id) if msg.trace_id else ""
    return fields
