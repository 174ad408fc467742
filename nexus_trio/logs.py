"""Structured logs through the standard :mod:`logging` module.

The kernel logs to loggers under ``nexus_trio`` (``nexus_trio.kernel``,
``nexus_trio.agent``, ``nexus_trio.dead_letters``, ...) and puts what a record is about
in its attributes: ``agent_id`` and ``agent_name`` for an agent (``ctx.log`` adds them
for you), ``msg_id`` and ``trace_id`` for a message. :func:`configure_logging` installs
one handler on the ``nexus_trio`` logger that renders those attributes in one of three
formats: ``compact`` (one line of text with ``key=value`` pairs), ``json`` (one object per
line, for log collectors) or ``pretty`` (rich, for people at a terminal). Handlers you
install yourself are left alone and keep receiving the records. Log text carries names and
payloads that come from outside (agent names, exception messages, a NATS peer's ``to``), so
every text field is passed through :func:`escape_control`: a newline, a carriage return or
a terminal escape sequence in them cannot forge a log line or drive the terminal. A
handler writing to a file, pipe or terminal hands its records to a writer thread through
a bounded queue, so that a reader that stops reading cannot stop the kernel.

<!-- PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing) -->
"""

from __future__ import annotations

import codecs
import copy
import errno
import inspect
import io
import json
import linecache
import logging
import math
import os
import re
import select
import sys
import threading
import time
import traceback
import weakref
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import Any, Final, TextIO, cast

from ._brief import repr_start
from ._config import LOG_FORMATS, LoggingConfig
from ._logcall import log_calls_failed as log_calls_failed
from ._plural import count_of
from ._throttle import lines_dropped

__all__ = [
    "FIELD_LIMIT",
    "FLUSH_TIMEOUT",
    "ITEMS_LIMIT",
    "TRACEBACK_LIMIT",
    "CompactFormatter",
    "JsonFormatter",
    "configure_logging",
    "cut_field",
    "escape_control",
    "flush_logs",
    "install_default_logging",
    "level_number",
    "log_calls_failed",
    "log_lines_dropped",
    "output_lock",
    "records_lost",
]

_ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None]

LOGGER_NAME = "nexus_trio"

# Marks the handler configure_logging installed, so that a second call replaces it.
_MARK = "_nexus_trio_handler"

_LEVELS = {
    "trace": logging.DEBUG,  # the original's most verbose level; logging has none below DEBUG
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = frozenset(vars(logging.LogRecord("", logging.INFO, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}

# The fields that say what a record is about come first, in this order.
_CONTEXT = ("agent_id", "agent_name", "msg_id", "trace_id")


def level_number(level: str) -> int:
    """The :mod:`logging` level of a ``[logging] level`` name (``"warn"`` -> ``WARNING``)."""
    try:
        return _LEVELS[level.lower()]
    except KeyError:
        raise ValueError(
            f"[logging] level must be one of {', '.join(_LEVELS)}, got {level!r}"
        ) from None


# C0 controls (newline, carriage return, tab, ESC, ...), DEL and C1 controls (NEL, CSI, ...),
# the Unicode line and paragraph separators and the bidirectional overrides that can make a
# line read differently from what it holds ("Trojan Source"), and lone surrogates (JSON's
# "\\ud800" decodes to one), which no UTF-8 stream can write.
_CONTROL: Final = re.compile(
    "[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)
_NAMED: Final = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_one(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_control(text: str) -> str:
    """``text`` with every control character written as a visible escape.

    ``\\n``, ``\\r`` and ``\\t`` for newline, carriage return and tab; ``\\xNN`` for the
    other C0 controls, DEL and the C1 controls (ESC is ``\\x1b``, NEL ``\\x85``);
    ``\\uNNNN`` for U+2028, U+2029, the bidirectional overrides and lone surrogates
    (which no UTF-8 stream could write). Everything else,
    backslashes included, is left as it is, so ordinary text is unchanged (and returned
    as the same object). Use it on any text from outside that is written to a log or a
    terminal, e.g. the lines of a child process's standard error.
    """
    if _CONTROL.search(text) is None:
        return text
    return _CONTROL.sub(_escape_one, text)


def _escape_lines(text: str) -> str:
    """Escape each line of a multi-line text, keeping its line breaks."""
    return "\n".join(escape_control(line) for line in text.split("\n"))


def _escape_exception_texts(
    exc: traceback.TracebackException, seen: set[int], rewrite: Callable[[str], str] | None = None
) -> None:
    """Escape the messages (and notes) of ``exc`` and its causes, contexts and group members.

    The frames of a traceback are lines on their own, but an exception's message is
    arbitrary text written into the traceback's last line: escaped here, a newline in it
    cannot start a line of its own; cut at :data:`FIELD_LIMIT` first (:func:`cut_field`:
    a 10 MB message cost 0.5 s to escape, and was written whole). ``rewrite``: what is done
    to each text instead (the JSON format's: cut only, JSON escapes it).
    ``TracebackException`` keeps the message in ``_str`` (CPython 3.11 to 3.13); without it
    the lines are still escaped one by one.
    """
    if rewrite is None:
        rewrite = _escape_cut
    if id(exc) in seen:
        return
    seen.add(id(exc))
    message = getattr(exc, "_str", None)
    if isinstance(message, str):
        setattr(exc, "_str", rewrite(message))  # noqa: B010 - see the docstring
    notes = getattr(exc, "__notes__", None)
    if isinstance(notes, list):
        exc.__notes__ = [rewrite(str(note)) for note in notes]
    syntax_message = getattr(exc, "msg", None)  # a SyntaxError's message
    if isinstance(syntax_message, str):
        setattr(exc, "msg", rewrite(syntax_message))  # noqa: B010
    for linked in (exc.__cause__, exc.__context__):
        if linked is not None:
            _escape_exception_texts(linked, seen, rewrite)
    for member in getattr(exc, "exceptions", None) or ():
        _escape_exception_texts(member, seen, rewrite)


def _escape_cut(text: str) -> str:
    return escape_control(cut_field(text))


def _format_exception_cut(exc_info: _ExcInfo) -> str:
    """The traceback of ``exc_info`` as ``logging`` writes it, each exception's message
    and note cut at :data:`FIELD_LIMIT` (the JSON format's: JSON escapes the rest)."""
    return _format_exception_escaped(exc_info, cut_field)


def _format_exception_escaped(
    exc_info: _ExcInfo, rewrite: Callable[[str], str] | None = None
) -> str:
    """The traceback of ``exc_info`` as ``logging`` writes it, with control characters escaped.

    Line breaks between the lines of the traceback stay; any other control character,
    including a line break inside an exception's message, is escaped (:func:`escape_control`).
    With ``rewrite``, that is done to each exception's message instead, and the lines are
    not escaped.
    """
    exc_type, exc_value, exc_tb = exc_info
    if exc_type is None or exc_value is None:
        return "NoneType: None"
    formatted = traceback.TracebackException(exc_type, exc_value, exc_tb, compact=True)
    _escape_exception_texts(formatted, set(), rewrite)
    text = "".join(formatted.format()).rstrip("\n")
    return text if rewrite is not None else _escape_lines(text)


def _timestamp(record: logging.LogRecord) -> str:
    # UTC, millisecond precision, formatted only when a record is actually emitted.
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{seconds}.{int(record.msecs):03d}Z"


def _extras(record: logging.LogRecord) -> list[tuple[str, Any]]:
    """The ``extra=`` attributes of a record, context fields first; empty ones left out.
    A key of ``extra=`` that is no ``str`` (``{1: ...}``: ``makeRecord`` takes any key)
    is named by its ``str()`` (as :func:`_shown` gives it): such a key made every
    formatter raise, and the record was lost."""
    attributes = vars(record)
    pairs = [(key, attributes[key]) for key in _CONTEXT if key in attributes]
    for key, value in attributes.items():
        if type(key) is not str:
            # (no attribute: never a standard or private one)
            pairs.append((_shown(key), value))
        elif key not in _STANDARD and key not in _CONTEXT and not key.startswith("_"):
            pairs.append((key, value))
    return [(key, value) for key, value in pairs if not _empty(value)]


def _empty(value: Any) -> bool:
    """Whether ``value`` is None or an empty str, without comparing it: a numpy array's
    ``!=`` gives an array, whose truth raises, and another type's ``__eq__`` may raise
    (``value != ""`` lost such a record, with logging's report, uncounted)."""
    return value is None or (isinstance(value, str) and str.__len__(value) == 0)


def _shown(value: Any) -> str:
    """``str(value)``, or, when that raises (a ``__str__`` with a bug, one that recurses),
    ``<str() failed: ExceptionType>``: the record is written, saying what it could not
    show, rather than lost with logging's report."""
    try:
        return str(value)
    except Exception as exc:  # (RecursionError too: the stack is unwound by now)
        return f"<str() failed: {type(exc).__name__}>"


def _shown_repr(value: Any) -> str:
    """``repr(value)``, as the text formats write an item of an extra's list or dict (the
    ``str`` of a list writes its items' ``repr``), or ``<repr() failed: ExceptionType>``."""
    try:
        return repr(value)
    except Exception as exc:
        return f"<repr() failed: {type(exc).__name__}>"


#: the most characters a log line writes of one text: its message, an extra's value (a
#: string, or the ``str`` of one that is no JSON type; each string in an extra's lists
#: and dicts, and each key; an exception's message). The rest is cut, and the cut said:
#: ``...[10,469,376 bytes cut]`` (its UTF-8 bytes): a 10 MB extra was written whole
FIELD_LIMIT: Final = 16_384
#: the most characters a log line writes of a traceback or a stack (each exception's
#: message and note in it cut at :data:`FIELD_LIMIT` first): a longer one is cut in its
#: middle (:func:`_cut_traceback`), its first and last lines kept
TRACEBACK_LIMIT: Final = 4 * FIELD_LIMIT


def cut_field(text: str, limit: int = FIELD_LIMIT) -> str:
    """``text``, its characters past ``limit`` cut and counted (in UTF-8 bytes). A
    ``str`` subclass is taken as the text it holds (``str.__str__``), its own ``__len__``
    and ``__getitem__`` not asked: one whose ``__len__`` said 0 was written whole."""
    if type(text) is not str:
        text = str.__str__(text)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...[{_utf8_length(text[limit:]):,} bytes cut]"


def _utf8_length(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _cut_traceback(text: str) -> str:
    """A traceback or stack, its middle cut (at line breaks where it has them) when it is
    longer than :data:`TRACEBACK_LIMIT`, the cut said on a line of its own: its first
    lines (where the call came from) and its last (the innermost frames, and of a
    traceback the exception's own line, ``RecursionError: ...``) are kept. Its end was
    cut before: a RecursionError of two functions calling each other (1,000 frames,
    90 KB) was logged without its last line, so without saying what it was."""
    if len(text) <= TRACEBACK_LIMIT:
        return text
    half = TRACEBACK_LIMIT // 2
    start = text.rfind("\n", 0, half) + 1 or _escape_start(text, half)
    end = text.find("\n", len(text) - half)
    if end < 0:
        end = _escape_start(text, len(text) - half)
    return f"{text[:start]}...[{_utf8_length(text[start:end]):,} bytes cut]{text[end:]}"


#: the longest escape :func:`escape_control` writes (``\\u2028``)
_LONGEST_ESCAPE: Final = 6


def _escape_start(text: str, index: int) -> int:
    """``index``, or the first backslash in the characters before it that an escape of
    :func:`escape_control` reaching past ``index`` could start at: a cut there never
    falls inside an escape (a compact traceback's long line is escaped before it is cut:
    ``\\x85`` was cut to ``\\x8`` and ``5``). A backslash is never inside an escape,
    so a cut before one is always on a boundary (one of the text's own costs at most
    five characters more cut)."""
    backslash = text.find("\\", max(index - _LONGEST_ESCAPE + 1, 0), index)
    return index if backslash < 0 else backslash


#: the most items an extra's lists, tuples, dicts and sets write in all (every item at
#: every depth counted); past them, or past :data:`TRACEBACK_LIMIT` characters of their
#: strings and keys (each counted up to :data:`FIELD_LIMIT`), each container ends with
#: ``...[N items left out]``: ``extra={"xs": list(range(10**6))}`` wrote a JSON line of
#: 7.9 MB, and a list of 1,000 lists of 1,000 strings one of 104 MB
ITEMS_LIMIT: Final = 1_000


class _LeftOut:
    """What stands in a container for the items past :data:`ITEMS_LIMIT`: shown (its
    ``str`` and ``repr``) as ``...[N items left out]``; ``[...]`` and ``{...}`` for a
    container inside itself, as ``repr`` shows one."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text

    __str__ = __repr__


class _Budget:
    """What is left of :data:`ITEMS_LIMIT` and of the characters for one extra."""

    __slots__ = ("chars", "items", "shown")

    def __init__(self, shown: Callable[[Any], str]) -> None:
        self.items = ITEMS_LIMIT
        self.chars = TRACEBACK_LIMIT
        self.shown = shown

    def take(self, key: Any, item: Any, deeper: bool) -> bool:
        """Count an item (its key, ``_NO_KEY`` in a list, and the characters of both,
        :func:`_chars`): False when none is left."""
        if self.items <= 0 or self.chars <= 0:
            return False
        self.items -= 1
        self.chars -= _key_chars(key, self.shown) + _chars(item, deeper, self.shown)
        return True


#: the key of an item that has none (in a list, a tuple, a set): counts no characters
_NO_KEY: Final = ""


def _key_chars(key: Any, shown: Callable[[Any], str]) -> int:
    """The characters a dict's key counts in its :class:`_Budget`: those of it ``shown``
    as its format writes a key, at most :data:`FIELD_LIMIT`."""
    text = key if type(key) is str else shown(key)  # (a subclass's str or repr its own)
    return min(str.__len__(text), FIELD_LIMIT)


def _chars(value: Any, deeper: bool, shown: Callable[[Any], str]) -> int:
    """The characters an item or key of an extra's containers counts in its
    :class:`_Budget`, each at most :data:`FIELD_LIMIT` (the most a format writes of one):
    a string's length; an int's digits (at least); bytes' length (their ``repr`` has at
    least as many); the length of a value of another type ``shown`` as its format writes
    it (``json`` its ``str``, the text formats its ``repr``); a container walked into (``deeper``) none, one past :data:`_JSON_DEPTH`
    (written as its ``str``, cut) all, its ``str`` not built to be counted; none for
    None, a bool, a float. Only strings and string keys were counted: a list of 500
    ``bytes`` of 100 KB wrote a ``json`` line of 8.2 MB. A ``str``, ``int``, ``float``
    or ``bytes`` subclass counts as what its format writes: the text formats its own
    ``repr`` (a float subclass whose ``repr`` is 1 MB counted none, and a list of 100
    had 100 MB built to be cut), ``json`` what it holds (it writes one as its base
    type), but a ``bytes`` subclass's ``str``."""
    if value is None or type(value) in _UNCOUNTED:
        return 0
    if isinstance(value, _CONTAINERS):
        return 0 if deeper else FIELD_LIMIT
    if shown is _shown_repr and type(value) not in _COUNTED_BY_SIZE:
        return min(str.__len__(shown(value)), FIELD_LIMIT)
    if isinstance(value, str):
        return min(str.__len__(value), FIELD_LIMIT)
    if isinstance(value, float):
        return 0
    if isinstance(value, int):
        # (int's own bit_length, bytes' own len: a subclass's may say anything, and one
        # that said a negative number gave the budget characters back)
        return int.bit_length(value) * 3 // 10  # (one past FIELD_LIMIT is written cut too)
    if type(value) is bytes or type(value) is bytearray:
        return min(len(memoryview(value)), FIELD_LIMIT)
    return min(str.__len__(shown(value)), FIELD_LIMIT)


#: the types of an extra's items that count no characters (:func:`_chars`)
_UNCOUNTED: Final = frozenset({float, bool})
#: the types the text formats count by their size, not by their ``repr`` (:func:`_chars`)
_COUNTED_BY_SIZE: Final = frozenset({str, int, bytes, bytearray})


#: the containers :func:`_bounded` walks
_CONTAINERS: Final = (list, tuple, dict, set, frozenset)


def _bounded(value: Any, shown: Callable[[Any], str] = _shown) -> Any:
    """``value``, or when its lists, tuples, dicts and sets (and theirs, to
    :data:`_JSON_DEPTH` deep) hold more than a :class:`_Budget` allows, a copy of the
    built-in type of each that holds too many, its items past the budget left out and
    said (:class:`_LeftOut`). A value within the budget is returned as it is (the same
    object: its ``str`` unchanged, a named tuple's say), found so by :func:`_fits`,
    which copies nothing: a dead-letter line's extras (strings) and a small list cost
    a type check and a walk, not a copy (walking with copies cost a record of five
    string extras 15 % more, and one with a list of three items 2.3 times as much). One
    whose walk raises (a list subclass whose ``__iter__`` does) is returned as it is,
    for the format to write as it did (its ``str``): the record was lost. ``shown``: how
    the format writes an item of another type (:func:`_chars`): counted by its ``str``,
    an item the text formats write as a short ``repr`` was left out for a long ``str``."""
    if not isinstance(value, _CONTAINERS):
        return value
    try:
        if _fits(value, [ITEMS_LIMIT, TRACEBACK_LIMIT], 0, shown):
            return value
        return _bounded_copy(value, _Budget(shown), frozenset())
    except Exception:
        return value


def _fits(value: Any, left: list[int], depth: int, shown: Callable[[Any], str]) -> bool:
    """Whether the items of ``value`` (``depth`` containers deep) and theirs, walked and
    counted as :func:`_bounded_copy` walks them (:meth:`_Budget.take`), all fit in what
    is ``left`` (``[items, characters]``, taken from it). A container inside itself is
    walked into again (to :data:`_JSON_DEPTH` deep or until the budget ends: at most
    :data:`ITEMS_LIMIT` items): one that fits is written as its format writes one,
    ``[...]``. (Counted in locals, the common case of a few scalars.)"""
    deeper = depth + 1 < _JSON_DEPTH
    items, chars = left
    keyed = isinstance(value, dict)
    for entry in value.items() if keyed else value:
        if items <= 0 or chars <= 0:
            return False
        items -= 1
        item = entry
        if keyed:
            key, item = entry
            if type(key) is str:
                chars -= min(str.__len__(key), FIELD_LIMIT)
            else:
                chars -= _key_chars(key, shown)
        # (_chars's common cases first, inline: a call an item cost a small list 50 %)
        if type(item) is str:
            chars -= min(str.__len__(item), FIELD_LIMIT)
        elif type(item) is int:
            chars -= item.bit_length() * 3 // 10
        elif isinstance(item, _CONTAINERS):
            if deeper:
                left[:] = items, chars
                if not _fits(item, left, depth + 1, shown):
                    return False
                items, chars = left
            elif _repr_within(item, FIELD_LIMIT):
                chars -= FIELD_LIMIT  # (as _chars counts one past _JSON_DEPTH)
            else:
                # written as its str: one longer than a text is written by
                # _bounded_copy (_too_deep), its str not built whole to be cut
                return False
        elif item is not None and type(item) is not float and type(item) is not bool:
            chars -= _chars(item, deeper, shown)
    left[:] = items, chars
    return True


def _bounded_copy(value: Any, budget: _Budget, within: frozenset[int]) -> Any:
    """:func:`_bounded` of a value that does not fit: ``within``, the ids of the
    containers it is inside of; a container inside itself is ``[...]``."""
    if not isinstance(value, _CONTAINERS):
        return value
    if len(within) >= _JSON_DEPTH:
        return _LeftOut(_too_deep(value))
    if id(value) in within:
        return _LeftOut("{...}" if isinstance(value, dict) else "[...]")
    inside = within | {id(value)}
    deeper = len(inside) < _JSON_DEPTH
    kept: list[Any] = []
    changed = stopped = False
    if isinstance(value, dict):
        for key, item in value.items():
            if not budget.take(key, item, deeper):
                stopped = True
                break
            bounded = _bounded_copy(item, budget, inside)
            changed = changed or bounded is not item
            kept.append((key, bounded))
    else:
        for item in value:
            if not budget.take(_NO_KEY, item, deeper):
                stopped = True
                break
            bounded = _bounded_copy(item, budget, inside)
            changed = changed or bounded is not item
            kept.append(bounded)
    if not changed and not stopped:
        return value
    kind: type[Any] = next(k for k in _CONTAINERS if isinstance(value, k))
    if stopped:
        mark = _LeftOut(_left_out_text(kind.__len__(value) - len(kept)))
        kept.append((mark, _LeftOut("...")) if kind is dict else mark)
    return dict(kept) if kind is dict else kind(kept)


def _left_out_text(left_out: int) -> str:
    """What stands for the items of a container past the budget: how many (counted by its
    built-in type's ``len``, not its own), or, when its walk gave more items than that
    (a subclass's ``__iter__``), ``...[more items left out]``: a list subclass whose
    ``__len__`` said 5 was written ``...[-995 items left out]``."""
    if left_out > 0:
        return f"...[{left_out:,} items left out]"
    return "...[more items left out]"


def _too_deep(value: Any) -> str:
    """A container :data:`_JSON_DEPTH` containers deep in an extra, as the formats write
    it: the start of its ``repr`` (at most :data:`FIELD_LIMIT` characters, ``...``
    marking the cut; :func:`~nexus_trio._brief.repr_start`, which builds no more of it),
    or ``<str() failed: ExceptionType>`` (one nested too deep for that). Its ``str`` was
    built whole to be cut: a million-item list 101 deep took 2 s to log."""
    try:
        return repr_start(value, FIELD_LIMIT - len("..."))
    except Exception as exc:  # (RecursionError too: the stack is unwound by now)
        return f"<str() failed: {type(exc).__name__}>"


def _repr_within(value: Any, limit: int) -> bool:
    """Whether ``repr(value)`` is at most ``limit`` characters (and raises nothing),
    found without building more of it (:func:`~nexus_trio._brief.repr_start`)."""
    try:
        return len(repr_start(value, limit)) <= limit
    except Exception:
        return False


def _text(value: Any) -> str:
    text = cut_field(_shown(_bounded(value, _shown_repr)))
    if not text or any(c.isspace() or c in "\"'=" for c in text):
        # json.dumps escapes C0 controls; escape_control then takes the C1 ones and U+2028.
        return escape_control(json.dumps(text, ensure_ascii=False))
    return escape_control(text)


class _EscapingFormatter(logging.Formatter):
    """Tracebacks and stacks with their control characters escaped, line breaks kept."""

    def formatException(self, ei: Any) -> str:
        return _format_exception_escaped(ei)

    def formatStack(self, stack_info: str) -> str:
        return _escape_lines(stack_info)

    def _exception_text(self, record: logging.LogRecord) -> str | None:
        # Formatted here rather than read from record.exc_text, which another handler's
        # formatter may have filled in unescaped.
        if record.exc_info:
            return _cut_traceback(self.formatException(record.exc_info))
        if record.exc_text:
            return _escape_lines(_cut_traceback(record.exc_text))
        return None


class CompactFormatter(_EscapingFormatter):
    """One line per record: ``time level logger message key=value ...``.

    A traceback, when the record has one, follows on the next lines. Control characters
    in the logger name, the message, the extras and the traceback's texts are escaped
    (:func:`escape_control`), so a record is always exactly one line plus its traceback.
    """

    def format(self, record: logging.LogRecord) -> str:
        parts = [
            _timestamp(record),
            f"{record.levelname:<8}",
            escape_control(record.name),
            escape_control(cut_field(record.getMessage())),
        ]
        parts.extend(
            f"{escape_control(cut_field(key))}={_text(value)}" for key, value in _extras(record)
        )
        line = " ".join(parts)
        exc_text = self._exception_text(record)
        if exc_text:
            line = f"{line}\n{exc_text}"
        if record.stack_info:
            line = f"{line}\n{self.formatStack(_cut_traceback(record.stack_info))}"
        return line


#: an int of at most these bits has fewer than 640 digits, the least limit of
#: ``sys.set_int_max_str_digits``
_FEW_DIGITS_BITS: Final = 2000


#: how deep a JSON line writes an extra's lists, tuples and dicts; one deeper is written
#: as its ``str`` (as the text format writes every extra)
_JSON_DEPTH: Final = 100


def _json_value(value: Any, within: frozenset[int] = frozenset()) -> Any:
    """``value`` as JSON types; ``within``: the ids of the containers it is inside of.

    A container inside itself (``loop.append(loop)``) is written there as ``repr`` writes
    it, ``[...]`` or ``{...}``, not walked into until the recursion limit. One
    :data:`_JSON_DEPTH` containers deep is written as :func:`_shown` writes it (its
    ``str``; ``<str() failed: RecursionError>`` for one too deep for that): an extra
    nested 5,000 deep raised RecursionError here, and the record was lost."""
    if len(within) >= _JSON_DEPTH and isinstance(value, list | tuple | dict):
        return cut_field(_shown(value))
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return cut_field(value)
    if isinstance(value, float):
        # NaN and the infinities are no JSON (RFC 8259 6): json.dumps writes them as NaN
        # and Infinity, which strict parsers (jq, JSON.parse, Go's) refuse, the whole
        # line with them: written as strings, as str() writes them
        return value if math.isfinite(value) else repr(float(value))
    if isinstance(value, int):
        # an int past the digits str() may write (sys.get_int_max_str_digits, at least
        # 640) made json.dumps raise, and the record was lost: shown as _shown shows it
        if int.bit_length(value) > _FEW_DIGITS_BITS:
            try:
                int.__repr__(value)
            except ValueError:
                return cut_field(_shown(value))
        return value
    if isinstance(value, list | tuple | dict):
        if id(value) in within:
            return "{...}" if isinstance(value, dict) else "[...]"
        inside = within | {id(value)}
        if isinstance(value, dict):
            return _json_object(value, inside)
        return [_json_value(item, inside) for item in value]
    return cut_field(_shown(value))


def _json_object(value: dict[Any, Any], within: frozenset[int]) -> dict[str, Any]:
    """A dict inside an extra as a JSON object: each key named by its ``str()``, cut at
    :data:`FIELD_LIMIT`; one named as a key before it (``{1: a, "1": b}``, two keys with the
    same first 16,384 characters and as many cut) is prefixed ``extra_`` until it is free,
    as an extra's own name is: only the last of two equal keys was written, the others'
    values lost with nothing said."""
    entry: dict[str, Any] = {}
    for name, item in value.items():
        key = cut_field(_shown(name))
        while key in entry:
            key = f"extra_{key}"
        entry[key] = _json_value(item, within)
    return entry


# Characters JSON allows raw inside strings but that split lines for some readers (U+2028
# and U+2029 in JavaScript, NEL U+0085 in Python's str.splitlines) or drive a terminal (the
# C1 controls, DEL), the bidirectional overrides, and lone surrogates (which no UTF-8 stream
# can write): written as \\uNNNN escapes. They can only occur inside strings of json.dumps
# output, where such an escape means the same (json.loads gives the surrogate back).
_JSON_ESCAPES: Final = {
    code: f"\\u{code:04x}"
    for code in [
        *range(0x7F, 0xA0),
        0x2028,
        0x2029,
        *range(0x202A, 0x202F),
        *range(0x2066, 0x206A),
        *range(0xD800, 0xE000),
    ]
}


#: keys a JSON line may have of its own after the extras (the traceback, the stack)
_JSON_OWN: Final = frozenset({"exc", "stack"})


class JsonFormatter(logging.Formatter):
    """One JSON object per line.

    Keys: ``ts`` (UTC, ISO 8601), ``level`` (lower case), ``logger``, ``msg``, then
    ``agent_id``, ``agent_name``, ``msg_id``, ``trace_id`` and any other ``extra=``
    attribute when present and not empty, ``exc`` (the formatted traceback) when the
    record carries an exception and ``stack`` for ``stack_info``. Values that are not
    JSON types are written as strings; an extra attribute whose name is taken (by one of
    these keys, or by an extra before it: ``extra={1: a, "1": b}`` are both named
    ``"1"``) is written as ``extra_<name>`` (``extra_extra_<name>`` if that is taken too),
    so no value is lost to a reader that keeps one of two equal keys; a key that is no
    ``str`` is named by its ``str()``. Control characters are ``\\u`` escapes: JSON's own (C0) and also
    DEL, the C1 controls (NEL U+0085 among them), U+2028, U+2029, the bidirectional
    overrides and lone surrogates, so a record is one line for every reader and any UTF-8
    stream can write it.
    """

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": cut_field(record.getMessage()),
        }
        for name, value in _extras(record):
            key = cut_field(name)
            # A name taken (by a field of ours, or an extra before it: keys ``1`` and
            # ``"1"`` are both "1" in JSON) is prefixed until it is free: a reader of
            # the line keeps only one of two equal keys.
            while key in entry or key in _JSON_OWN:
                key = f"extra_{key}"
            try:
                entry[key] = _json_value(_bounded(value))
            except Exception:
                # (a list or dict subclass whose walk raises, its __iter__ or items():
                # written as its str, as one that is no JSON type; the record was lost)
                entry[key] = cut_field(_shown(value))
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc"] = _cut_traceback(record.exc_text)
        if record.stack_info:
            entry["stack"] = _cut_traceback(self.formatStack(record.stack_info))
        return json.dumps(entry, ensure_ascii=False).translate(_JSON_ESCAPES)

    def formatException(self, ei: Any) -> str:
        return _format_exception_cut(ei)


class _PrettyFormatter(_EscapingFormatter):
    """The message and its ``key=value`` extras; rich draws time, level and traceback."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        extras = " ".join(
            f"{escape_control(cut_field(key))}={_text(value)}" for key, value in _extras(record)
        )
        message = escape_control(cut_field(record.getMessage()))
        return f"{message}  {extras}" if extras else message

    def format(self, record: logging.LogRecord) -> str:
        return self.formatMessage(record)


#: how many exceptions of a chain (``raise ... from``, or raised while handling another)
#: the ``pretty`` format draws, the newest half and the oldest half; of a group's how
#: many, and how many groups deep (as CPython's traceback: ``max_group_width`` 15,
#: ``max_group_depth`` 10). The rest is said in a note: a chain of 500 exceptions drew
#: 1 MB in 42 s. Rich bounds each one's frames (100, the middle said hidden).
_CHAIN_LIMIT: Final = 10
_GROUP_WIDTH: Final = 15
_GROUP_DEPTH: Final = 10

#: the ``pretty`` format draws no code of a frame whose lines around it (rich's
#: ``extra_lines``) hold one longer than this: rich lexes and folds a line whole, and one
#: of 2 MB drew 1.9 MB of code in 76 s
_CODE_LINE_LIMIT: Final = 1_000

#: the most lines of source the ``pretty`` format has rich lex for one record: rich lexes
#: a frame's file from its first line to the frame's (and ``extra_lines`` more), each
#: frame anew; the frames past this (the newest exception's innermost frames come first)
#: are drawn without their code. 22 frames at line 3,000 of a file took 62 s to log (a
#: chain of 10 exceptions, 2 frames each at line 2,030 of a file, 19 s)
_CODE_LINES_LIMIT: Final = 5_000

#: the name of a path no file has (a NUL in it) that a :class:`NoCode` file name says it
#: starts with: rich draws no code of a frame whose file starts with a suppressed path
_NO_CODE_PATH: Final = "\x00nexus-no-code"


def _bound_chain(trace: Any) -> None:
    """Keep the newest and the oldest :data:`_CHAIN_LIMIT` // 2 stacks of a rich
    ``Trace`` (its exceptions, newest first), a note on the last one drawn before the
    cut saying how many are not."""
    stacks = trace.stacks
    if len(stacks) <= _CHAIN_LIMIT:
        return
    half = _CHAIN_LIMIT // 2
    left_out = len(stacks) - 2 * half
    trace.stacks = stacks[:half] + stacks[-half:]
    # (drawn oldest first: stacks[-half] comes just before the cut; a new list: rich's
    # stacks without notes of their own share one)
    before = stacks[-half]
    before.notes = [*before.notes, f"...[{left_out:,} more exceptions of the chain not shown]"]


def _long_lines_at(filename: str, lineno: int, around: int = 3) -> bool:
    """Whether a line of ``filename`` within ``around`` lines of ``lineno`` (as rich
    would draw them) is longer than :data:`_CODE_LINE_LIMIT` (``linecache``: the file
    as the traceback reads it)."""
    if filename.startswith("<"):
        return False
    lines = linecache.getlines(filename)
    start = max(lineno - around - 1, 0)
    return any(len(line) > _CODE_LINE_LIMIT for line in lines[start : lineno + around])


class _NoCode(str):
    """The name of a frame's file whose code the ``pretty`` format does not draw (past
    :data:`_CODE_LINES_LIMIT`): it starts with :data:`_NO_CODE_PATH` (rich makes a
    suppressed path absolute: its end), which is among the paths rich suppresses."""

    __slots__ = ()

    def startswith(self, prefix: Any, *bounds: Any) -> bool:
        if isinstance(prefix, str) and prefix.endswith(_NO_CODE_PATH):
            return True
        return str.startswith(self, prefix, *bounds)


def _spend_code_lines(trace: Any, left: int, drawn: tuple[int, int], long_lined: set[str]) -> int:
    """Give each frame of ``trace`` rich will draw (``drawn``: its ``max_frames`` and
    ``extra_lines``) its code while the lines rich lexes for it (to its line, and
    ``extra_lines`` more) fit in what is ``left`` of :data:`_CODE_LINES_LIMIT`, the
    innermost frames of the newest exception first; one past it gets a :class:`_NoCode`
    file name (one ``long_lined`` is drawn without code already). What is left is
    returned."""
    max_frames, extra_lines = drawn
    for stack in trace.stacks:
        for frame in reversed(_drawn_frames(stack.frames, max_frames)):
            name = frame.filename
            if name.startswith("<") or name in long_lined or isinstance(name, _NoCode):
                continue
            lexed = min(frame.lineno + extra_lines, len(linecache.getlines(name)))
            if lexed <= left:
                left -= lexed
            else:
                left = 0
                frame.filename = _NoCode(name)
        for member in stack.exceptions:
            left = _spend_code_lines(member, left, drawn, long_lined)
    return left


def _say_code_not_drawn(trace: Any) -> None:
    """Note on the newest exception (drawn last) how many frames :func:`_spend_code_lines`
    left without their code, and why: a reader saw frames without code and nothing said."""
    left_out = _frames_without_code(trace)
    if left_out and trace.stacks:
        trace.stacks[0].notes.append(
            f"(the code of {count_of(left_out, 'frame')} is not drawn: the pretty format"
            f" lexes at most {_CODE_LINES_LIMIT:,} lines of source a record)"
        )


def _frames_without_code(trace: Any) -> int:
    """How many frames of ``trace`` (and of its groups' exceptions) have a
    :class:`_NoCode` file name."""
    return sum(
        sum(isinstance(frame.filename, _NoCode) for frame in stack.frames)
        + sum(_frames_without_code(member) for member in stack.exceptions)
        for stack in trace.stacks
    )


def _drawn_frames(frames: list[Any], max_frames: int) -> list[Any]:
    """The ``frames`` rich draws of a stack: all, or when there are more than
    ``max_frames`` the first and last half of it (rich's ``Traceback.max_frames``)."""
    if max_frames <= 0 or len(frames) <= max_frames:
        return frames
    half = max(4, max_frames) // 2
    return frames[:half] + frames[len(frames) - half :]


def _make_rich_handler(console: Any, writer: _LossyWriter) -> logging.Handler:
    from rich.logging import RichHandler
    from rich.traceback import Trace, Traceback

    class CodeDrawn(str):
        """The name of a frame's file that a file suppressed for its long lines is a
        prefix of (``/a/tool`` of ``/a/tool_b.py``): rich suppresses a frame whose file
        name starts with a suppressed path, and drew no code of ``tool_b.py``. Only a
        path that is its own name, or a user's ``tracebacks_suppress``, suppresses it."""

        # (no __slots__: a str subclass's must be empty, and each keeps the record's paths)
        long_lined: frozenset[str] = frozenset()

        def startswith(self, prefix: Any, *bounds: Any) -> bool:
            if isinstance(prefix, str) and prefix in self.long_lined and prefix != self:
                return False
            return str.startswith(self, prefix, *bounds)

    def keep_code(trace: Trace, long_lined: frozenset[str]) -> None:
        """Make each frame of ``trace`` whose file is not ``long_lined`` but has one
        of them as a prefix a :class:`CodeDrawn`."""
        for stack in trace.stacks:
            for frame in stack.frames:
                name = frame.filename
                if name not in long_lined and any(name.startswith(p) for p in long_lined):
                    drawn = CodeDrawn(name)
                    drawn.long_lined = long_lined
                    frame.filename = drawn
            for member in stack.exceptions:
                keep_code(member, long_lined)

    def escape_trace(trace: Trace, long_lined: set[str], depth: int = 0) -> None:
        """Escape and cut the texts of ``trace``; bound its chain and groups; add to
        ``long_lined`` the files of its frames whose code is not to be drawn."""
        _bound_chain(trace)
        for stack in trace.stacks:
            stack.exc_type = escape_control(cut_field(stack.exc_type))
            stack.exc_value = escape_control(cut_field(stack.exc_value))
            stack.notes = [escape_control(cut_field(note)) for note in stack.notes]
            for frame in stack.frames:
                if _long_lines_at(frame.filename, frame.lineno):
                    frame.filename = os.path.abspath(frame.filename)
                    long_lined.add(frame.filename)
                frame.filename = escape_control(cut_field(frame.filename))
                frame.name = escape_control(cut_field(frame.name))
                frame.line = escape_control(cut_field(frame.line))
            if stack.syntax_error is not None:
                stack.syntax_error.msg = escape_control(cut_field(stack.syntax_error.msg))
                stack.syntax_error.line = escape_control(cut_field(stack.syntax_error.line))
            if depth >= _GROUP_DEPTH:
                left_out = len(stack.exceptions)
                stack.exceptions = []
            else:
                left_out = max(len(stack.exceptions) - _GROUP_WIDTH, 0)
                del stack.exceptions[_GROUP_WIDTH:]
            if left_out:
                stack.notes.append(f"...[{left_out:,} more exceptions of the group not shown]")
            for member in stack.exceptions:
                escape_trace(member, long_lined, depth + 1)

    class EscapingRichHandler(_CountsLostRecords, RichHandler):
        """RichHandler whose tracebacks show exception texts with control characters escaped.

        Rich writes an exception's message to the terminal as it is (ESC included), so the
        traceback is extracted, escaped and then drawn, as ``RichHandler.emit`` would.
        """

        def emit(self, record: logging.LogRecord) -> None:
            # RichHandler.emit formats the record outside its try: a record whose
            # arguments do not fit its message would raise out of the log call.
            try:
                self._emit(record)
            except RecursionError:
                raise
            except Exception:
                self.handleError(record)

        def _emit(self, record: logging.LogRecord) -> None:
            if not (record.exc_info and record.exc_info[1] is not None):
                super().emit(record)
                return
            exc_type, exc_value, exc_tb = record.exc_info
            assert exc_type is not None
            trace = Traceback.extract(exc_type, exc_value, exc_tb)
            long_lined: set[str] = set()
            escape_trace(trace, long_lined)
            if long_lined:
                keep_code(trace, frozenset(long_lined))
            drawn = (self.tracebacks_max_frames, self.tracebacks_extra_lines)
            _spend_code_lines(trace, _CODE_LINES_LIMIT, drawn, long_lined)
            _say_code_not_drawn(trace)
            rendered = Traceback(
                trace,
                width=self.tracebacks_width,
                extra_lines=self.tracebacks_extra_lines,
                theme=self.tracebacks_theme,
                word_wrap=self.tracebacks_word_wrap,
                # (rich draws no code of a frame in a file it is told to suppress)
                suppress=[*self.tracebacks_suppress, *sorted(long_lined), _NO_CODE_PATH],
                max_frames=self.tracebacks_max_frames,
            )
            message = self.formatter.formatMessage(record) if self.formatter else ""
            try:
                self.console.print(
                    self.render(
                        record=record,
                        traceback=rendered,
                        message_renderable=self.render_message(record, message),
                    )
                )
            except Exception:
                self.handleError(record)

    handler = EscapingRichHandler(
        console=console,
        show_path=False,
        rich_tracebacks=True,
        markup=False,
        log_time_format="%H:%M:%S",
    )
    handler._writer = writer
    handler._records = writer.records
    return handler


class _Losses:
    """Log records the handlers of this module could not write, in this process."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.records = 0

    def add(self, records: int = 1) -> None:
        with self.lock:
            self.records += records


_LOSSES: Final = _Losses()

#: held while a line is written to an OS file: see :func:`output_lock`
_OUTPUT_LOCK = [threading.Lock()]


def output_lock() -> threading.Lock:
    """The lock this process's handlers hold while they write a record to the file
    beneath a text stream (standard error): hold it while writing a line of your own to
    the same file, so that no record goes into the middle of a line longer than the pipe
    takes at once (``PIPE_BUF``, 4 KiB on Linux; a full pipe takes a long line in pieces),
    nor the line into a record. ``nexus run --workers`` relays each worker's lines under
    it, and a worker writes what its app writes to ``sys.stderr`` under it, in whole
    lines. A thread that holds it may block while the file takes nothing (a full pipe):
    never log while holding it. Ask for it at each write, do not keep it: a fork gives the
    child a new one (the one before may be held by a thread of the parent, which the child
    has not)."""
    return _OUTPUT_LOCK[0]


def log_lines_dropped() -> dict[str, int]:
    """How many log lines of each kind the kernel's bounds on floods held back in this
    process so far (a kind with none is not there). Each such line stands for something
    counted elsewhere (a dead letter, a failure, a malformed frame): only its line was not
    written, and a later line of its kind said how many were not (``... not logged in
    the last second``, ``(N so far)``). The kernel's two kinds are counted here as that
    line is said, within the second (``Kernel.stats()`` counts each at once).

    The kinds: ``dead_letter`` and ``agent_failure`` (the kernel's, past ``[kernel]
    dead_letter_log_limit`` / ``failure_log_limit`` lines a second of a reason or an
    agent, or ``log_kind_limit`` of all), ``process_agent.*`` (a process agent's
    per-line warnings and stderr lines), ``endpoint.*`` (the metrics endpoint's accept
    failures and connection limit), and ``cluster.*``, ``durable.*`` and ``nats.*`` (a
    node's warnings, at most a line a second each). ``/metrics`` has them as
    ``nexus_log_lines_dropped_total{kind}``.
    """
    return lines_dropped()


def records_lost() -> int:
    """How many log records the handlers installed by :func:`configure_logging` (or by
    :func:`nexus_trio.open_kernel` when the application configured no logging) could not
    write in this process: their stream raised ``OSError`` (a full disk, a closed pipe, a
    vanished terminal) or was closed. A record counted here is not written, now or later
    (but for the start of one the disk took only part of before the handler was closed);
    every other record is written whole, once.

    Such a record is counted here instead of being reported with a traceback on standard
    error (usually the very stream that failed), and the kernel goes on: no message
    depends on a log line (dead letters are counted in :meth:`Kernel.stats
    <nexus_trio.Kernel.stats>` whether or not their line was written). When the stream
    writes again, the handler first writes a warning saying how many records it lost and
    why. ``nexus run`` reports the count in its summary and ``/metrics`` as
    ``nexus_log_records_lost_total``.
    """
    return _LOSSES.records


class _CountsLostRecords(logging.Handler):
    """Mixin for this module's handlers: what :func:`records_lost` describes.

    Errors other than ``OSError`` (a record whose arguments do not fit its format, say)
    keep the standard ``handleError`` report. A handler given a queue
    (:meth:`write_through_queue`) writes from its writer thread, see :class:`_RecordQueue`.
    """

    _unreported = 0
    _last_error = ""
    _noticing = False
    _notice_failed = False
    #: set for a handler that writes through a _LossyWriter (rich's console)
    _writer: _LossyWriter | None = None
    #: what writes this handler's records to its stream
    _records: _WholeRecords
    #: set for a handler whose records a writer thread writes
    _queue: _RecordQueue | None = None

    def write_through_queue(self, capacity: int) -> None:
        """From now on, queue each record (at most ``capacity``) for a writer thread."""
        self._queue = _RecordQueue(self, capacity)
        self._records.wait_writable = self._queue.wait_writable

    def flush_queue(self, timeout: float) -> bool:
        """What :func:`flush_logs` does for this handler."""
        return self._queue is None or self._queue.flush(timeout)

    def handleError(self, record: logging.LogRecord) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            self._write_failed(exc)
        else:
            super().handleError(record)

    def _write_failed(self, exc: OSError) -> None:
        self._last_error = exc.strerror or repr(exc)
        if self._noticing:
            # The notice of earlier losses did not get through: it is not a record of
            # the application's, and the count it carries stays unreported.
            self._notice_failed = True
            return
        self._unreported += 1
        _LOSSES.add()

    def close(self) -> None:
        queue = self._queue
        if queue is not None and not queue.close(FLUSH_TIMEOUT):
            # The writer thread is still inside a write its stream does not take (a
            # record larger than a pipe's free room): the record is written or counted
            # when that write returns, and nothing else is left to it.
            super().close()
            return
        lock = self.lock
        assert lock is not None
        with lock:
            # The end of a record the disk took only the start of, if the disk still has
            # no room for it: that record is lost (and its start is the file's last line).
            error = self._records.give_up()
            if error is not None:
                self._last_error = error.strerror or repr(error)
                self._unreported += 1
                _LOSSES.add()
        super().close()

    def _count_writer_error(self) -> None:
        writer = self._writer
        if writer is not None and writer.error is not None:
            error, writer.error = writer.error, None
            self._write_failed(error)

    def handle(self, record: logging.LogRecord) -> Any:
        queue = self._queue
        if queue is not None:
            return self._enqueue(queue, record)
        lock = self.lock
        assert lock is not None  # made by logging.Handler.__init__ (an RLock)
        with lock:
            lost = self._unreported
            emitted = super().handle(record)
            self._count_writer_error()
            if lost and emitted and self._unreported == lost:
                # This record got through: the stream writes again. Say what was lost.
                self._report_losses(record, lost)
        return emitted

    def _enqueue(self, queue: _RecordQueue, record: logging.LogRecord) -> Any:
        # logging.Handler.handle, with the record prepared and queued instead of emitted.
        # Not under the handler's lock: logging.shutdown takes it, and the writer never.
        passed = self.filter(record)
        if isinstance(passed, logging.LogRecord):  # (a filter may return one, 3.12+)
            record = passed  # type: ignore[unreachable, unused-ignore]
        if passed:
            try:
                prepared, text = self._prepare(record)
            except RecursionError:
                raise
            except Exception:
                logging.Handler.handleError(self, record)  # (no write failed: not counted)
            else:
                queue.put(prepared, text)
        return passed

    def _prepare(self, record: logging.LogRecord) -> tuple[logging.LogRecord, str | None]:
        """What the writer thread gets for ``record``: its message is formatted here, in
        the thread that logged it, while its arguments still hold what they held then (as
        ``logging.handlers.QueueHandler.prepare`` does); the rest (rich's rendering) is
        left to the writer. A handler that formats the whole record here returns its text."""
        prepared = copy.copy(record)
        prepared.msg, prepared.args = record.getMessage(), None
        return prepared, None

    def _emit_prepared(self, record: logging.LogRecord, text: str | None) -> None:
        """Write what :meth:`_prepare` made (in the writer thread)."""
        self.emit(record)
        self._count_writer_error()

    def write_queued(self, record: logging.LogRecord, text: str | None, dropped: int) -> None:
        """Write a queued record, after the ``dropped`` records the queue could not keep
        before it (the writer thread, the only one that writes this handler's records)."""
        if dropped:
            self._unreported += dropped
            self._last_error = _DID_NOT_KEEP_UP
        lost = self._unreported
        self._emit_prepared(record, text)
        if lost and self._unreported == lost:
            self._report_losses(record, lost)

    def _report_losses(self, after: logging.LogRecord, lost: int) -> None:
        self._unreported = 0
        self._noticing, self._notice_failed = True, False
        self._records.counting = False
        try:
            notice = self._loss_notice(after, lost)
            if self._queue is None:
                super().handle(notice)
                self._count_writer_error()
            elif self.filter(notice):
                self._emit_prepared(notice, None)
        finally:
            self._noticing = False
            self._records.counting = True
        if self._notice_failed:
            self._unreported = lost

    def _loss_notice(self, after: logging.LogRecord, lost: int) -> logging.LogRecord:
        notice = logging.LogRecord(
            "nexus_trio.logs",
            logging.WARNING,
            __file__,
            0,
            "%d log record(s) before this one could not be written (%s): "
            "lost, and counted in records_lost()",
            (lost, self._last_error),
            None,
        )
        notice.created = after.created
        notice.msecs = after.msecs
        return notice


#: The reason a record the queue did not keep is lost for, in the loss notice.
_DID_NOT_KEEP_UP: Final = "the log stream did not keep up"

#: Seconds closing a handler (or :func:`flush_logs` by default) waits for the records
#: it has queued to be written; those not written by then are counted lost.
FLUSH_TIMEOUT: Final = 2.0

#: At most this many characters of records wait in a handler's queue (their messages,
#: and their text where it is formatted before it is queued), besides ``[logging]
#: queue`` records: records of megabytes each (a payload logged whole) would otherwise
#: hold gigabytes while the stream's reader does not read. A record that would pass it
#: is lost and counted as one that finds the queue full; one alone in the queue always
#: has room (a bound in records and characters, as Erlang/OTP's logger's in messages).
QUEUE_CHARS: int = 64 * 1024 * 1024

# Seconds between two looks of the writer thread, while its stream takes nothing, at
# whether a flush or close gave up on the record it holds.
_LOOK_AGAIN: Final = 0.05


class _Queued:
    """A record in the queue, with the records dropped just before it."""

    __slots__ = ("dropped", "record", "seq", "size", "text")

    def __init__(
        self, seq: int, record: logging.LogRecord, text: str | None, dropped: int, size: int
    ):
        self.seq, self.record, self.text, self.dropped = seq, record, text, dropped
        #: what it counts against QUEUE_CHARS
        self.size = size


class _RecordQueue:
    """The bounded queue between the threads that log and the one thread that writes.

    A stream whose reader stops reading (a stuck log shipper, a full pipe) blocks the
    write that does not fit; written from the logging thread, that stops the kernel. So
    the handler of a file, pipe or terminal queues each record and a writer thread
    writes them, as Erlang/OTP's logger does beyond its ``sync_mode_qlen`` and Docker's
    ``mode=non-blocking`` log driver does. A record that finds the queue full is dropped
    and counted lost at once (its loss is noticed after the next record written); logging
    never waits. Before a write the writer waits until the stream takes bytes, looking
    every ``_LOOK_AGAIN`` seconds whether :meth:`flush` gave up on its record: then the
    record is counted lost, not written, and nothing of it is.
    """

    def __init__(self, handler: _CountsLostRecords, capacity: int) -> None:
        self._handler = handler
        self._capacity = capacity
        self._changed = threading.Condition()
        self._items: deque[_Queued] = deque()
        self._chars = 0  # the sizes of the records in _items (see QUEUE_CHARS)
        self._dropped = 0  # dropped since the last record queued
        self._queued = 0  # the number of the last record queued
        self._writing = 0  # the number of the record being written, 0 for none
        self._given_up_to = 0  # records up to this number are not waited for any more
        self._closed = False
        #: the writer; None in a forked child until it logs (see restart_in_child)
        self._thread: threading.Thread | None = self._start_writer()
        _QUEUES.add(self)

    def _start_writer(self) -> threading.Thread:
        thread = threading.Thread(target=self._write_all, name="nexus_trio log writer", daemon=True)
        thread.start()
        return thread

    def restart_in_child(self) -> None:
        """In a child process just forked: none of the parent's records (the parent
        writes those), and a writer thread of its own (the parent's did not come along)
        once it logs. Not at once: ``subprocess`` with a ``preexec_fn`` runs this between
        its fork and its ``exec``, where a thread would only be started to be lost."""
        self._changed = threading.Condition()  # (another thread may have held it)
        self._items.clear()
        self._dropped = self._writing = self._chars = 0
        self._thread = None

    def put(self, record: logging.LogRecord, text: str | None) -> None:
        """Queue ``record``, or count it lost when the queue is full (or closed)."""
        message = record.msg
        size = (len(message) if isinstance(message, str) else 0) + (len(text) if text else 0)
        with self._changed:
            if (
                self._closed
                or len(self._items) >= self._capacity
                or (self._items and self._chars + size > QUEUE_CHARS)
            ):
                self._dropped += 1
                _LOSSES.add()
                return
            if self._thread is None:  # the first record of a forked child
                self._thread = self._start_writer()
            self._queued += 1
            self._chars += size
            self._items.append(_Queued(self._queued, record, text, self._dropped, size))
            self._dropped = 0
            self._changed.notify_all()

    def _write_all(self) -> None:
        while True:
            with self._changed:
                while not self._items and not self._closed:
                    self._changed.wait()
                if not self._items:
                    return
                item = self._items.popleft()
                self._chars -= item.size
                self._writing = item.seq
            try:
                self._handler.write_queued(item.record, item.text, item.dropped)
            except Exception:
                self._handler.handleError(item.record)
            finally:
                with self._changed:
                    self._writing = 0
                    self._changed.notify_all()

    def wait_writable(self, raw: Any) -> None:
        """Return when the file ``raw`` takes bytes; raise ``OSError`` if, before, a
        flush gave up on the record being written (which is then counted lost)."""
        try:
            poller = select.poll()
            poller.register(raw.fileno(), select.POLLOUT)
        except (AttributeError, OSError, ValueError):  # no poll (Windows), no descriptor
            return
        while not poller.poll(_LOOK_AGAIN * 1000):
            if 0 < self._writing <= self._given_up_to:
                raise OSError(errno.ETIMEDOUT, _DID_NOT_KEEP_UP)

    def _settled(self, last: int) -> bool:
        """Whether the records up to number ``last`` are all written or counted lost."""
        waiting = bool(self._items) and self._items[0].seq <= last
        return not waiting and not 0 < self._writing <= last

    def flush(self, timeout: float) -> bool:
        """Wait until the records queued so far are written (or counted lost), at most
        ``timeout`` seconds: True if they were. Else those still queued are dropped and
        counted lost, and so is the one being written, at its writer's next look."""
        deadline = time.monotonic() + timeout
        with self._changed:
            last = self._queued
            while not self._settled(last):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(left)
            else:
                return True
            self._given_up_to = last
            dropped = 0
            while self._items and self._items[0].seq <= last:
                self._chars -= self._items.popleft().size
                dropped += 1
            _LOSSES.add(dropped)
            if self._items:  # (their loss is noticed after the next record written)
                self._items[0].dropped += dropped
            else:
                self._dropped += dropped
            # The record being written: counted lost by its writer, at its next look.
            self._changed.wait_for(lambda: self._settled(last), 4 * _LOOK_AGAIN)
        return False

    def close(self, timeout: float) -> bool:
        """Take no more records, write those queued (:meth:`flush`) and end the writer
        thread: True if it ended (it did not if it is inside a write that blocks)."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        thread = self._thread
        if thread is None:  # a forked child that never logged: nothing was queued
            return True
        if threading.current_thread() is thread:
            return False
        self.flush(timeout)
        thread.join(4 * _LOOK_AGAIN)
        return not thread.is_alive()


_QUEUES: Final[weakref.WeakSet[_RecordQueue]] = weakref.WeakSet()


def _restart_writers_in_child() -> None:
    # (a thread of the parent may have held it as the child was forked)
    _OUTPUT_LOCK[0] = threading.Lock()
    for queue in list(_QUEUES):
        queue.restart_in_child()


if hasattr(os, "register_at_fork"):  # (not on Windows, which does not fork)
    os.register_at_fork(after_in_child=_restart_writers_in_child)


class _StreamHandler(_CountsLostRecords, logging.StreamHandler[TextIO]):
    """``logging.StreamHandler`` that writes each record whole (:class:`_WholeRecords`)
    and counts the records it could not write."""

    def __init__(self, stream: TextIO | None) -> None:
        super().__init__(stream)
        self._records = _WholeRecords()

    def emit(self, record: logging.LogRecord) -> None:
        # logging.StreamHandler.emit, with the write and flush done by _WholeRecords.
        try:
            text = self.format(record)
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)
            return
        self._write_text(record, text)

    def _write_text(self, record: logging.LogRecord, text: str) -> None:
        try:
            if self.stream is None:
                # Made while standard error was closed (``2>&-``: Python's sys.stderr is
                # None): every record is lost, as on the closed descriptor.
                raise OSError(errno.EBADF, "standard error is closed")
            self._records.write(self.stream, text + self.terminator)
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def _prepare(self, record: logging.LogRecord) -> tuple[logging.LogRecord, str | None]:
        return record, self.format(record)

    def _emit_prepared(self, record: logging.LogRecord, text: str | None) -> None:
        if text is None:  # the loss notice
            self.emit(record)
        else:
            self._write_text(record, text)


def _u_escapes(exc: UnicodeError) -> tuple[str, int]:
    """Codec error handler: what an encoding cannot encode as ``\\uNNNN`` escapes (a
    surrogate pair past U+FFFF), which JSON reads back as the text (``backslashreplace``
    writes ``\\xb7`` and ``\\U0001f600``, which are not JSON)."""
    if not isinstance(exc, UnicodeEncodeError):
        raise exc
    escapes = []
    for char in exc.object[exc.start : exc.end]:
        code = ord(char)
        if code > 0xFFFF:
            code -= 0x10000
            escapes.append(f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}")
        else:
            escapes.append(f"\\u{code:04x}")
    return "".join(escapes), exc.end


_U_ESCAPES: Final = "nexus_trio.logs.u_escapes"
codecs.register_error(_U_ESCAPES, _u_escapes)
#: the error handlers of a text file that mean "escape it": a record is escaped as
#: :func:`_u_escapes` does there (another, ``replace`` say, is the file's choice)
_ESCAPING: Final = frozenset({"strict", "backslashreplace"})


# Codecs that start what they encode with a byte order mark: a TextIOWrapper writes it
# once, at the start of the file, so their records are left to the stream to encode.
_MARKED_CODECS: Final = frozenset({"utf-16", "utf-32", "utf-8-sig"})


def _text_file(stream: Any) -> io.TextIOWrapper | None:
    """The ``TextIOWrapper`` that ``stream`` is, or that it writes through to, or None.

    A wrapper that passes each write and flush unchanged and at once to another text
    stream (``nexus``'s watch on standard error, its proxy of whatever ``sys.stderr`` is)
    says so with a ``writes_through_to`` attribute, naming that stream (None for none).
    It is looked up without the wrapper's ``__getattr__``, so that a wrapper that hands
    unknown attributes to the stream it wraps but writes elsewhere (rich's redirect of
    standard error under a live display) is not taken for one.
    """
    for _ in range(8):  # wrappers of wrappers, not without end
        if isinstance(stream, io.TextIOWrapper):
            return stream
        if inspect.getattr_static(stream, "writes_through_to", None) is None:
            return None
        stream = stream.writes_through_to
    return None


def _raw_beneath(file: io.TextIOWrapper) -> Any:
    """The raw file beneath a text file: under its BufferedWriter (``open(path, "a")``,
    ``sys.stderr``) or its buffer itself (``sys.stderr`` under ``python -u`` or
    ``PYTHONUNBUFFERED``); None for another buffer (``io.BytesIO``, ...) or an encoding
    that starts with a byte order mark."""
    buffer = file.buffer
    if isinstance(buffer, io.BufferedWriter):
        raw = buffer.raw
    elif isinstance(buffer, io.RawIOBase):
        raw = buffer
    else:
        return None
    if codecs.lookup(file.encoding).name in _MARKED_CODECS:
        return None
    return raw


def _write_raw(raw: Any, data: bytes) -> tuple[int, OSError | None]:
    """Write ``data`` to the raw file ``raw``: how many bytes it took, and the error that
    stopped it when not all of them (a full disk takes what fits, then fails)."""
    if raw.closed:
        return 0, OSError(errno.EBADF, "the log stream is closed")
    done = 0
    while done < len(data):
        try:
            taken = raw.write(data[done:] if done else data)
        except OSError as exc:
            return done, exc
        if not taken:  # None: a non-blocking descriptor that would block
            return done, BlockingIOError(errno.EAGAIN, "the log stream takes nothing now")
        done += taken
    return done, None


class _WholeRecords:
    """Writes each log record to a stream whole and once, or not at all.

    A buffered text stream (``sys.stderr``, a file opened in text mode) keeps in its buffer
    the bytes of a write that failed (a full disk) and writes them with a later one: a
    record counted lost would appear after all, and up to a buffer of them would wait in
    memory. Over an unbuffered file (``python -u``) a ``TextIOWrapper`` drops the end of a
    short write unseen: half a record, not counted. So such a stream is flushed first
    (what other code wrote to it stays before the record), and the encoded record is
    written to the raw file beneath it. A record the disk takes none of is lost, and raises
    ``OSError``; nothing of it is kept. A record the disk takes only the start of (a short
    write, then ``ENOSPC``) is neither: its end, at most one record's worth, is kept and
    written first when the disk has room again, before the next record, which is lost
    while that fails. :meth:`give_up` drops it for good.

    A stream that writes through to such a file is looked through (:func:`_text_file`).
    Other streams (``io.StringIO``, rich's redirect under a live display) are written and
    flushed as ``logging.StreamHandler`` does. A closed stream raises ``OSError``
    (``EBADF``).
    """

    def __init__(self) -> None:
        #: False while a record of the handler's own (the loss notice) is written
        self.counting = True
        #: called with the raw file before a record is written to it (by a writer thread,
        #: to wait until the file takes bytes); may raise ``OSError``
        self.wait_writable: Callable[[Any], None] | None = None
        self._rest = b""
        self._rest_raw: Any = None
        self._rest_counted = True
        # after give_up (the handler closed): nothing would write or count a kept end
        self._given_up = False
        # the last text file written to, its encoding then and the raw file beneath it
        self._file: io.TextIOWrapper | None = None
        self._encoding = ""
        self._raw: Any = None

    def write(self, stream: Any, text: str) -> None:
        file = _text_file(stream)
        if file is None:
            raw = None
        elif file is self._file and file.encoding == self._encoding:
            raw = self._raw
        else:
            raw = _raw_beneath(file)
            self._file, self._encoding, self._raw = file, file.encoding, raw
        if file is None or raw is None:
            if getattr(stream, "closed", False):
                raise OSError(errno.EBADF, "the log stream is closed")
            if self._rest:
                self._write_rest()
            stream.write(text)
            stream.flush()
            return
        if raw.closed:
            raise OSError(errno.EBADF, "the log stream is closed")
        if self.wait_writable is not None:
            self.wait_writable(raw)
        if os.linesep != "\n":  # what the stream's default newline translation does
            text = text.replace("\n", os.linesep)
        # A narrow file (ASCII, Latin-1) and a value from outside (a peer's or a child's
        # name): the record is written with what it cannot take escaped, not lost
        # uncounted, and a JSON record stays JSON.
        errors = file.errors or "strict"
        data = text.encode(file.encoding, _U_ESCAPES if errors in _ESCAPING else errors)
        # Under output_lock(): a line another thread writes to the file under it (a
        # worker's relayed line, an app's line on sys.stderr) is not cut by the record.
        lock = output_lock()
        while not lock.acquire(timeout=_LOOK_AGAIN):
            if self.wait_writable is not None:  # (raises if a flush gave up on it)
                self.wait_writable(raw)
        try:
            if self._rest:
                self._write_rest()
            file.flush()
            written, error = _write_raw(raw, data)
        finally:
            lock.release()
        if error is None:
            return
        if not written or self._given_up:
            # (after the close, a record the disk took only the start of is lost at once)
            raise error
        self._rest, self._rest_raw, self._rest_counted = data[written:], raw, self.counting

    def _write_rest(self) -> None:
        written, error = _write_raw(self._rest_raw, self._rest)
        self._rest = self._rest[written:]
        if error is not None:
            raise error
        self._rest_raw = None

    def give_up(self) -> OSError | None:
        """Write the end of a record the disk took only the start of, if there is one
        and the disk has room now; else drop it. The error that kept it out, when the
        record was one to count (not the loss notice), else None. From then on, a record
        the disk takes only the start of is lost at once (``write`` raises)."""
        self._given_up = True
        if not self._rest:
            return None
        try:
            self._write_rest()
        except OSError as exc:
            counted = self._rest_counted
            self._rest, self._rest_raw = b"", None
            return exc if counted else None
        return None


class _LossyWriter:
    """What the ``pretty`` handler's rich console writes to: ``stream``, or standard error
    as it is at each write, each write (a record) whole through :attr:`records`. An
    ``OSError`` is kept in :attr:`error` for the handler to count instead of raised: rich
    keeps the text of a failed write and writes it again before the next record, so a
    record counted as lost would reappear later."""

    def __init__(self, stream: TextIO | None) -> None:
        self._stream = stream
        self.error: OSError | None = None
        self.records = _WholeRecords()

    @property
    def target(self) -> TextIO:
        target = self._stream if self._stream is not None else sys.stderr
        if target is None:
            # standard error closed (``2>&-``): Python's sys.stderr is None
            raise OSError(errno.EBADF, "standard error is closed")
        return target

    def write(self, text: str) -> int:
        try:
            self.records.write(self.target, text)
        except OSError as exc:
            self.error = exc
        return len(text)

    def flush(self) -> None:
        """Nothing: each write was flushed (or written beneath the buffer) already."""

    def isatty(self) -> bool:
        try:
            return self.target.isatty()
        except OSError:
            return False

    def fileno(self) -> int:
        return self.target.fileno()

    @property
    def encoding(self) -> str:
        try:
            return getattr(self.target, "encoding", None) or "utf-8"
        except OSError:
            return "utf-8"


def _make_handler(cfg: LoggingConfig, stream: TextIO | None) -> logging.Handler:
    if cfg.format == "json":
        handler: logging.Handler = _StreamHandler(stream or sys.stderr)
        handler.setFormatter(JsonFormatter())
    elif cfg.format == "pretty":
        from rich.console import Console

        writer = _LossyWriter(stream)
        handler = _make_rich_handler(Console(file=cast(TextIO, writer)), writer)
        handler.setFormatter(_PrettyFormatter())
    elif cfg.format in ("compact", "full"):  # (full: the original's name of it)
        handler = _StreamHandler(stream or sys.stderr)
        handler.setFormatter(CompactFormatter())
    else:
        raise ValueError(
            f"[logging] format must be one of {', '.join(LOG_FORMATS)}, got {cfg.format!r}"
        )
    if cfg.queue and _is_os_file(stream if stream is not None else sys.stderr):
        cast(_CountsLostRecords, handler).write_through_queue(cfg.queue)
    return handler


def _is_os_file(stream: Any) -> bool:
    """Whether ``stream`` (or the file it writes through to) is a file, pipe or terminal
    of the system: one whose reader can stop reading. ``io.StringIO``, pytest's capture
    and rich's redirect under a live display are not."""
    file = _text_file(stream)
    target = stream if file is None else file
    try:
        target.fileno()
    except (AttributeError, OSError, ValueError):  # (io.UnsupportedOperation is both)
        return False
    return True


def configure_logging(
    level: str | LoggingConfig = "info",
    format: str = "compact",
    *,
    stream: TextIO | None = None,
) -> None:
    """Send ``nexus_trio`` log records at ``level`` and above to ``stream`` in ``format``.

    ``level`` is a ``[logging] level`` name (``"debug"``, ``"info"``, ``"warning"``, ...)
    and ``format`` one of ``"compact"`` (also ``"full"``), ``"json"``, ``"pretty"``; a
    :class:`LoggingConfig` (``configure_logging(config.logging)``) gives both. Typical
    use, first thing in a program run with plain ``python``::

        nexus_trio.configure_logging()  # agents' ctx.log lines, with times, to stderr

    Installs one handler on the ``nexus_trio`` logger (``stream`` defaults to standard
    error) and sets that logger's level. Calling it again replaces the handler it
    installed before and nothing else: handlers added by the application, on this logger
    or on the root logger, keep working (records still propagate to the root logger, so
    an application that also configures the root logger sees them twice; give it
    ``logging.getLogger("nexus_trio").propagate = False`` if that is not wanted). A bad
    level or format raises ``ValueError`` naming it.

    When the stream is a file, pipe or terminal (it has a ``fileno()``), a writer thread
    writes the records, through a queue of ``queue`` records (a :class:`LoggingConfig`'s;
    10,000 by default): a reader that stops reading cannot stop the kernel. A record that
    finds the queue full is lost, counted in :func:`records_lost`. Replacing the handler
    waits at most :data:`FLUSH_TIMEOUT` seconds for what it queued; what is not written
    by then is counted lost. ``queue=0``, and any other stream (``io.StringIO``), write
    each record in the thread that logs it.
    """
    cfg = level if isinstance(level, LoggingConfig) else LoggingConfig(level=level, format=format)
    _install(_make_handler(cfg, stream), level_number(cfg.level))


def flush_logs(timeout: float = FLUSH_TIMEOUT) -> bool:
    """Wait until the records the handler of :func:`configure_logging` (or of
    :func:`install_default_logging`) has queued are written, at most ``timeout`` seconds.

    True when they are all written, or counted lost by a write that failed. False when
    the stream did not take them in time (its reader stopped reading): those still
    queued, and the one being written, are then counted lost in :func:`records_lost`
    instead, and the handler goes on with the records logged after. Without a queue (the
    stream is no file, pipe or terminal, or ``[logging] queue = 0``) each record was
    written when it was logged, and this returns True at once. ``nexus run`` calls it
    before its summary, so that ``log_records_lost`` counts them.
    """
    settled = True
    for handler in logging.getLogger(LOGGER_NAME).handlers:
        if getattr(handler, _MARK, False) and isinstance(handler, _CountsLostRecords):
            settled = handler.flush_queue(timeout) and settled
    return settled


def _install(handler: logging.Handler, level: int | None) -> None:
    setattr(handler, _MARK, True)
    logger = logging.getLogger(LOGGER_NAME)
    for previous in list(logger.handlers):
        if getattr(previous, _MARK, False):
            logger.removeHandler(previous)
            previous.close()
    logger.addHandler(handler)
    if level is not None:
        logger.setLevel(level)


class _UnlessRootConfigured(logging.Filter):
    """Lets records through only while the root logger has no handlers.

    The default handler stands in for an application that configured no logging; once it
    configures the root logger (``logging.basicConfig`` after the kernel started), records
    reach the root's handlers and would otherwise be written twice.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not logging.getLogger().handlers


def install_default_logging(cfg: LoggingConfig | None = None) -> bool:
    """Give ``nexus_trio`` records a handler if the application configured no logging at all.

    Under plain ``python`` with no logging set up, Python writes only WARNING and above,
    without a time, and ``ctx.log`` lines are lost. So when neither the ``nexus_trio``
    logger nor the root logger has a handler, this installs the handler of
    :func:`configure_logging` (``cfg`` or the defaults: ``info``, ``compact``, standard
    error) and returns True; otherwise it changes nothing and returns False. The handler
    goes quiet as soon as the root logger gets a handler, and :func:`configure_logging`
    replaces it. :func:`nexus_trio.open_kernel` calls this with the kernel's
    ``config.logging``.
    """
    logger = logging.getLogger(LOGGER_NAME)
    if logger.handlers or logging.getLogger().handlers:
        return False
    cfg = cfg if cfg is not None else LoggingConfig()
    handler = _make_handler(cfg, None)
    handler.addFilter(_UnlessRootConfigured())
    # A level the application set on the nexus_trio logger is kept.
    _install(handler, level_number(cfg.level) if logger.level == logging.NOTSET else None)
    return True
