"""Counts written for people: a number with its noun, singular for one.

The CLI's summaries, the swarm's errors and the log lines of the cluster runner and of
process agents all count things; they write a count through :func:`count_of`, so every one
of them reads ``1 agent`` / ``2 agents`` / ``1,000 agents`` the same way. It lives below the
CLI and the bridges (it imports nothing of the package) so that any of them can use it
without an import cycle.

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["count_of", "first_few", "fmt_count"]

#: how many items :func:`first_few` names (as the log budgets name ten keys)
FEW = 10


def fmt_count(n: float) -> str:
    """``1,000``: a count with thousands separators, no fraction."""
    return f"{n:,.0f}"


def count_of(n: float, thing: str) -> str:
    """``1 agent``, ``2 agents``, ``1,000 agents``: a count with its noun, singular for one."""
    return f"{fmt_count(n)} {thing}" + ("" if n == 1 else "s")


def first_few(items: Sequence[str], shown: int = FEW) -> str:
    """``'a', 'b' and 3 more``: the first ``shown`` items quoted, the rest counted (a line
    about thousands of names stays a line)."""
    named = ", ".join(repr(item) for item in items[:shown])
    rest = len(items) - shown
    return f"{named} and {fmt_count(rest)} more" if rest > 0 else named
