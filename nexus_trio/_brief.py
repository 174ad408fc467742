"""Values from outside the kernel, cut short for a log line or a summary.

A process agent's child, a peer or a program chooses its own values (a name it registers
with, an id, a feature list); one of them can be as long as a line may be (1 MiB). Every
line that shows such a value shows it through :func:`brief`, so none of them can flood a
log or a table.
"""

from __future__ import annotations

from typing import Any


def brief(value: Any, size: int = 120) -> str:
    """``repr(value)``, cut to about ``size`` characters (``...`` marks the cut)."""
    text = repr(value)
    return text if len(text) <= size else text[:size] + "..."
