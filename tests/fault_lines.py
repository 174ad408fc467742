"""A fault injected at a chosen line of the kernel's code, through ``sys.settrace``."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class InjectedFault(RuntimeError):
    """What :func:`fault_at` raises."""


@contextmanager
def fault_at(
    module: types.ModuleType, function: str, text: str, nth: int = 1
) -> Iterator[list[int]]:
    """Raise :class:`InjectedFault` at the ``nth`` run of the line of ``module`` that
    starts with ``text`` inside ``function`` (as if that line raised, before it runs).
    Yields a list that gets the line's number once the fault fired."""
    path = module.__file__
    assert path is not None
    with open(path, encoding="utf-8") as source:
        lines = {n for n, line in enumerate(source, 1) if line.strip().startswith(text)}
    assert lines, text
    fired: list[int] = []
    seen = [0]

    def at_line(frame: types.FrameType, event: str, arg: Any) -> Any:
        if fired or event != "line" or frame.f_lineno not in lines:
            return at_line
        seen[0] += 1
        if seen[0] < nth:
            return at_line
        fired.append(frame.f_lineno)
        raise InjectedFault(f"injected at {text!r}")

    def on_call(frame: types.FrameType, event: str, arg: Any) -> Any:
        if fired or frame.f_code.co_filename != path or frame.f_code.co_name != function:
            return None
        return at_line

    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        yield fired
    finally:
        sys.settrace(previous)
