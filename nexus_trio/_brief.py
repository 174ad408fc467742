"""Values from outside the kernel, cut short for a log line or a summary.

A process agent's child, a peer or a program chooses its own values (a name it registers
with, an id, a feature list); one of them can be as long as a line may be (1 MiB). Every
line that shows such a value shows it through :func:`brief`, so none of them can flood a
log or a table.

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

from typing import Any

from ._errors import error_repr


def brief(value: Any, size: int = 120) -> str:
    """``repr(value)``, cut to about ``size`` characters (``...`` marks the cut); a value
    whose ``repr()`` raises (a ``__repr__`` with a bug) is shown as
    :func:`~nexus_trio._errors.error_repr` shows it, ``<Type, whose repr() raised
    RuntimeError: ...>``: the error or line that shows a value from outside is still
    made, not replaced by the ``__repr__``'s exception (a readiness check answering
    such a value failed every scrape)."""
    text = error_repr(value)
    return text if len(text) <= size else text[:size] + "..."


def seconds_text(seconds: float) -> str:
    """A duration in seconds for a reason or a log line, to the millisecond and without
    trailing zeros (``0``, ``0.25``, ``1.5``, ``30``); a duration shorter than a
    millisecond (but not 0) keeps one significant digit (``0.0004``), not ``0``."""
    if 0 < abs(seconds) < 0.001:
        return f"{seconds:.1g}"
    text = f"{seconds:.3f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text
