"""Values from outside the kernel, cut short for a log line or a summary.

A process agent's child, a peer or a program chooses its own values (a name it registers
with, an id, a feature list); one of them can be as long as a line may be (1 MiB). Every
line that shows such a value shows it through :func:`brief`, so none of them can flood a
log or a table.

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

import sys
from typing import Any, Final

from ._errors import repr_raised
from ._plural import fmt_count


def brief(value: Any, size: int = 120) -> str:
    """``repr(value)``, cut to about ``size`` characters (``...`` marks the cut); a value
    whose ``repr()`` raises (a ``__repr__`` with a bug) is shown as
    :func:`~nexus_trio._errors.error_repr` shows it, ``<Type, whose repr() raised
    RuntimeError: ...>``: the error or line that shows a value from outside is still
    made, not replaced by the ``__repr__``'s exception (a readiness check answering
    such a value failed every scrape). An integer longer than ``size`` (or than Python
    writes: 4,300 digits) is shown by its size, ``an integer of about 5,000 digits``, its
    digits not built (a cut row of digits tells no one the number)."""
    try:
        if value.__class__ is int:  # (the size form for an element: _repr_prefix)
            text = _int_size(value) if _too_long(value, size) else repr(value)
        else:
            return repr_start(value, size)
    except Exception as exc:  # (not BaseException: a Ctrl-C or a cancel goes on up)
        # (as error_repr shows it: an element's repr raised, so the value's does)
        text = repr_raised(value, exc)
    return text if len(text) <= size else text[:size] + "..."


#: the most digits of an integer within a container that are written out when Python's
#: own limit is off (``sys.set_int_max_str_digits(0)``): its default
_INT_DIGITS: Final = 4300
#: log10(2): the decimal digits a bit of an integer makes
_DIGITS_PER_BIT: Final = 0.30103


def _too_long(value: int, size: int) -> bool:
    """Whether ``repr(value)`` is longer than ``size`` characters, or has more digits than
    ``repr`` writes (``sys.get_int_max_str_digits()``; past it ``repr`` raises
    ``ValueError``), found without building it."""
    room = max(size - (value < 0), 0)  # (the digits that fit)
    limit = sys.get_int_max_str_digits()
    if limit:
        room = min(room, limit)
    # (an integer of b bits has at most b * log10(2) + 1 digits)
    if value.bit_length() * _DIGITS_PER_BIT + 1 <= room:
        return False
    smallest: int = 10**room  # (the smallest integer of room + 1 digits)
    return abs(value) >= smallest


def _int_size(value: int) -> str:
    """``an integer of about 5,000 digits``: an integer by its size (within a digit)."""
    sign = "a negative" if value < 0 else "an"
    return f"{sign} integer of about {fmt_count(value.bit_length() * _DIGITS_PER_BIT)} digits"


def repr_start(value: Any, size: int) -> str:
    """``repr(value)``, cut to about ``size`` characters (``...`` marks the cut) and not
    built whole to be cut (see :func:`_repr_prefix`), raising what ``repr`` raises (a
    list nested too deep for it, RecursionError): :func:`brief`, for a caller that
    shows such a value its own way."""
    text = _repr_prefix(value, size, set())
    return text if len(text) <= size else text[:size] + "..."


#: how the repr of each container type that :func:`_repr_prefix` walks opens and closes
_BRACKETS: Final[dict[type, tuple[str, str]]] = {
    list: ("[", "]"),
    tuple: ("(", ")"),
    dict: ("{", "}"),
    set: ("{", "}"),
    frozenset: ("frozenset({", "})"),
}


def _repr_prefix(value: Any, limit: int, walking: set[int]) -> str:
    """``repr(value)`` (raising what it raises), or a start of it longer than
    ``limit``: the repr of a long value is not built whole to be cut (a 3M-element list
    took 0.3 s, in the kernel's thread, for a 120-character line). Text, bytes and the
    built-in containers (not subclasses: their ``__repr__`` may differ) are read only as
    far as the cut; anything else is ``repr``'d whole, as before. ``reprlib`` is not
    used: its reprs differ from ``repr`` (sorted dict keys, middle cuts, a depth limit),
    and a line must show the value's start as ``repr`` does. ``walking`` holds the
    containers being shown, for a list or dict that holds itself (``[...]``)."""
    kind = type(value)
    if kind is int and _too_long(value, (sys.get_int_max_str_digits() or _INT_DIGITS) + 1):
        # (past what repr writes: not the container's ValueError; within it, the digits
        # as repr writes them, cut with the container)
        return _int_size(value)
    if kind is str or kind is bytes:
        if len(value) <= limit:
            return repr(value)
        # A start of the value, enough for ``limit`` characters (each takes one or
        # more), shown with the quotes and escapes ``repr`` chose for the whole: ending
        # it with the other quote makes ``repr`` choose the same, then that is cut off.
        start = value[: max(limit, 0) + 1]
        single, double = ("'", '"') if kind is str else (b"'", b'"')
        other = single if single in value and double not in value else double
        return repr(start + other)[:-2]
    brackets = _BRACKETS.get(kind)
    if brackets is None or not value:
        return repr(value)
    if id(value) in walking:
        return f"{brackets[0]}...{brackets[1]}"
    walking.add(id(value))
    try:
        parts = [brackets[0]]
        length = len(brackets[0])
        for i, item in enumerate(value.items() if kind is dict else value):
            if i:
                parts.append(", ")
                length += 2
            for n, element in enumerate(item if kind is dict else (item,)):
                if n:
                    parts.append(": ")
                    length += 2
                piece = _repr_prefix(element, limit - length, walking)
                parts.append(piece)
                length += len(piece)
                if length > limit:
                    return "".join(parts)
    finally:
        walking.discard(id(value))
    if kind is tuple and len(value) == 1:
        parts.append(",")
    parts.append(brackets[1])
    return "".join(parts)


def seconds_text(seconds: float) -> str:
    """A duration in seconds for a reason or a log line, to the millisecond and without
    trailing zeros (``0``, ``0.25``, ``1.5``, ``30``); a duration shorter than a
    millisecond (but not 0) keeps one significant digit (``0.0004``), not ``0``."""
    if 0 < abs(seconds) < 0.001:
        return f"{seconds:.1g}"
    text = f"{seconds:.3f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text
