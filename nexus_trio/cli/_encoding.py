"""Whether an output's encoding can carry a text (an ASCII terminal: ``LC_ALL=C``,
``PYTHONIOENCODING=ascii``), for what ``nexus`` writes in its place."""

from __future__ import annotations

__all__ = ["encodes"]


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
