"""Whether an output's encoding can carry a text (an ASCII terminal: ``LC_ALL=C``,
``PYTHONIOENCODING=ascii``), and what ``nexus`` writes in its place: ASCII stand-ins for
its own marks (:func:`stand_ins`).

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

from typing import Final

__all__ = ["encodes", "stand_ins"]


def encodes(text: str, encoding: object) -> bool:
    """Whether ``text`` can be written in ``encoding`` as it is; True when there is
    nothing to go by (no encoding, or one Python does not know)."""
    if not isinstance(encoding, str):
        return True
    try:
        text.encode(encoding)
    except UnicodeEncodeError:
        return False
    except LookupError:
        return True
    return True


#: ASCII stand-ins for the characters nexus itself writes (the summary, the live view,
#: rich's ellipsis, its log lines), for an output whose encoding has not got them: one
#: character for one, as rich lays out its tables before they are written (the summary
#: writes its ✓ as "ok" itself there; rich draws its boxes in ASCII)
_STAND_INS: Final = {
    "µ": "u",
    "·": "-",
    "—": "-",
    "…": ".",
    "✓": "v",
    "✗": "x",
    "━": "-",
    "╺": "-",
}


def stand_ins(encoding: object) -> dict[int, str] | None:
    """The ``str.translate`` table of the stand-ins for the marks ``encoding`` cannot
    encode, None if it encodes them all."""
    missing = {c: t for c, t in _STAND_INS.items() if not encodes(c, encoding)}
    return str.maketrans(missing) if missing else None
