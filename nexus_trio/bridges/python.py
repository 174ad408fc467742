"""The agent side of the Nexus stdio bridge for Python: write an agent, run it as a child.

An agent is a subclass of :class:`NexusAgent` that overrides :meth:`~NexusAgent.handle_message`
(and optionally :meth:`~NexusAgent.on_start` / :meth:`~NexusAgent.on_stop`), plain or
``async def``; calling :meth:`~NexusAgent.run_agent` (or ``run_agent(agent)``, the original
Nexus spelling) speaks newline-delimited JSON with the kernel over stdin/stdout:
it sends ``register``, answers every ``message`` with exactly one ``response`` (or ``error``)
frame, one message at a time, answers ``ping`` with ``pong`` and stops on ``shutdown`` or end of
input. In protocol 2 it declares the ``cancel`` feature: a thread reads the input while a
handler runs, and a ``cancel`` frame for the message being handled sets
:attr:`~NexusAgent.cancelled` (and cancels an ``async def`` handler). Stdout carries nothing but frames: while the agent runs, ``print()`` and anything written
to file descriptor 1 (also by child processes) goes to stderr. The wire format is described in
docs/protocol.md. This module uses only the standard library and runs on Python 3.9+, so it can
be copied next to an agent or run as ``python3 python.py`` (an echo agent). Agents written
for the original Nexus bridge run unchanged: the handler's ``message`` is a :class:`Message`,
a dict of the wire fields that also has the original attributes (``message.payload``,
``message.kind == MessageKind.COMMAND.value``, ``message.from_id``, ``message.reply(...)``),
and ``from nexus_bridge import NexusAgent, Message, MessageKind, run_agent`` works with
``nexus_bridge.py`` beside this file.

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

import argparse
import asyncio
import builtins
import collections
import contextlib
import enum
import inspect
import io
import json
import math
import os
import re
import select
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator
from itertools import accumulate, islice, repeat
from operator import mul, sub
from typing import IO, Any, NoReturn

__all__ = [
    "FEATURES",
    "KINDS",
    "PROTOCOL_VERSION",
    "Agent",
    "BadEnvironment",
    "Cancelled",
    "EchoAgent",
    "InvalidFrame",
    "Message",
    "MessageKind",
    "NexusAgent",
    "main",
    "run_agent",
]

#: The newest protocol version this bridge speaks (announced in ``register``).
PROTOCOL_VERSION = 2

#: Optional protocol-2 extensions this bridge declares in ``register`` (``features``).
FEATURES = ("cancel",)

#: Message kinds, spelled as on the wire.
KINDS = ("Command", "Event", "Query", "Response")

#: cancel frames remembered for messages not (yet) being handled
_EARLY_CANCELS = 64

#: protocol 2: bytes of input the thread reads ahead of the main loop, at most (then it
#: waits, and so does the kernel's next write: backpressure)
_READ_AHEAD = 1 << 20

_MESSAGE_FIELDS = ("from", "to", "kind", "payload")


class MessageKind(str, enum.Enum):  # noqa: UP042 (StrEnum is 3.11+; this file runs on 3.9)
    """Message kinds; the values are the wire spellings (``MessageKind.COMMAND.value``)."""

    COMMAND = "Command"
    EVENT = "Event"
    QUERY = "Query"
    RESPONSE = "Response"


#: attribute of the original bridge's ``Message`` -> key on the wire
_ATTRIBUTES = {
    "from_id": "from",
    "to_id": "to",
    "kind": "kind",
    "payload": "payload",
    "timestamp": "timestamp",
    "conversation_id": "conversation_id",
    "trace_id": "trace_id",
    "id": "id",
    "reply_to": "reply_to",
}


class Message(dict[str, Any]):
    """A message as the handler sees it: the wire object, with attribute access too.

    It is a ``dict`` of the wire fields (``message["payload"]``, ``message.get("id")``),
    and it has the attributes of the original Nexus bridge's message: ``from_id``,
    ``to_id``, ``kind`` (the wire string, so ``message.kind == MessageKind.COMMAND.value``
    holds), ``payload``, ``timestamp``, ``conversation_id``, ``trace_id`` (and ``id``,
    ``reply_to``); absent fields read as ``None``. ``Message(from_id=..., to_id=...,
    kind=..., payload=..., timestamp=...)`` builds one as the original did.
    """

    def __init__(
        self,
        from_id: str | None = None,
        to_id: str | None = None,
        kind: Any = MessageKind.COMMAND,
        payload: Any = None,
        timestamp: str | None = None,
        conversation_id: str | None = None,
        trace_id: str | None = None,
    ) -> None:
        super().__init__()
        self["from"] = from_id
        self["to"] = to_id
        self["kind"] = kind.value if isinstance(kind, MessageKind) else kind
        self["payload"] = payload
        self["timestamp"] = timestamp if timestamp is not None else _timestamp()
        if conversation_id:
            self["conversation_id"] = conversation_id
        if trace_id:
            self["trace_id"] = trace_id

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Message:
        """The message for a wire object (all its fields kept)."""
        message = cls.__new__(cls)
        dict.update(message, data)
        return message

    def to_dict(self) -> dict[str, Any]:
        """The wire object (a plain dict)."""
        return dict(self)

    def reply(self, sender_id: str, payload: Any) -> Message:
        """The Response to this message, as the original bridge built it."""
        return Message(
            from_id=sender_id,
            to_id=self.get("from"),
            kind=MessageKind.RESPONSE,
            payload=payload,
            conversation_id=self.get("conversation_id"),
            trace_id=self.get("trace_id"),
        )

    def __getattr__(self, attribute: str) -> Any:
        key = _ATTRIBUTES.get(attribute)
        if key is None:
            raise AttributeError(f"Message has no attribute {attribute!r}")
        return self.get(key)


_SNIPPET = 60

#: characters of an error's text written in an ``error`` frame (or a protocol-1 error
#: response); the rest is cut, and the cut said. The kernel keeps 4,096 of them; a frame
#: this long (at most 6 bytes a character, escaped) stays under its 1 MiB line limit
ERROR_TEXT_LIMIT = 16_384


def _cut_error_text(text: str) -> str:
    """``text`` (an error's, or its type's name) cut at :data:`ERROR_TEXT_LIMIT`, the cut said."""
    if len(text) <= ERROR_TEXT_LIMIT:
        return text
    return f"{text[:ERROR_TEXT_LIMIT]}... ({len(text) - ERROR_TEXT_LIMIT:,} characters cut)"


#: what ``too_deep`` keeps of a line once its strings are out: ``{`` as ``[``, ``}`` as ``]``,
#: every other byte deleted (one C pass over the bytes, not a regex: 16 ms for 1 MiB)
_BRACKETS = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))
#: the bytes that matter to a line's strings and depth: deleted first, the others cannot
#: make a piece to split
_NOT_QUOTES_NOR_BRACKETS = bytes(sorted(set(range(256)) - set(b'"[]{}')))
#: a pass that takes out fewer innermost pairs (of the brackets left) than this share of
#: them is the last: the ``[]`` left are few then (each costs a piece of a split)
_PASS_SHARE = 16


def too_deep(line: str | bytes) -> str:
    """What a JSON line nested deeper than the JSON reader goes is (its RecursionError),
    naming how deep it nests its arrays and objects (its strings skipped; one left open
    runs to the end of the line). Only such a line is walked. The kernel says it in these
    words too. It runs on the kernel's event loop (a child's line), so each step is a
    pass of C over the line's bytes, Python stepping a few times a line, not a step per
    byte in Python (which held the loop 120-150 ms for a 1 MiB ``[[[...``)."""
    raw = line.encode("utf-8", "surrogatepass") if isinstance(line, str) else line
    if b'"' in raw:
        # An escaped backslash, then an escaped quote, is no quote; left to right, as a
        # JSON reader takes them. Then every other piece between quotes is outside them:
        # an empty string (``""``, also once the bytes that are no quote nor bracket are
        # out) joins two pieces alike, so it goes first (1 MiB of ``"``: one piece).
        raw = raw.replace(b"\\\\", b"__").replace(b'\\"', b"__")
        raw = raw.translate(None, _NOT_QUOTES_NOR_BRACKETS).replace(b'""', b"")
        raw = b"".join(raw.split(b'"')[0::2])
    brackets = raw.translate(_BRACKETS, _NOT_BRACKETS)
    return f"nested {_deepest(brackets):,} levels deep, past the JSON reader's recursion limit"


def _deepest(brackets: bytes) -> int:
    """The most ``[`` open at once in ``brackets`` (``[`` and ``]`` only; 0 if never one).

    What follows its last ``]`` only opens: deepest at the end. Before it, each deepest
    point is a ``[]``; taking every ``[]`` out (one C pass) leaves the other points as
    deep as they were, so the deepest is one more than that of what is left, and so on.
    Passes go on while they take out a share of what is left (1 MiB of ``[],``: all of it
    in one pass); the deepest of the rest is then read at its ``[]``, in C too. This
    replaced runs of 4,096 split at each ``]`` (1 MiB of ``[[],[[]]],`` took 85 ms)."""
    left, passes, deepest, taken = brackets, 0, 0, 0
    while True:
        end = left.rfind(b"]") + 1
        if end < len(left):
            deepest = max(deepest, passes + 2 * left.count(b"[") - len(left))
            left = left[:end]
        if passes and taken * _PASS_SHARE < len(left) + taken:
            break
        rest = left.replace(b"[]", b"")
        taken = len(left) - len(rest)
        if not taken:
            break
        passes += 1
        left = rest
    if not left:
        return max(deepest, passes)
    peak = _peaks(left)
    if peak > 0 or not passes:
        return max(deepest, passes + peak)
    # (a line of no JSON that goes below where it started: read whole, once)
    return max(deepest, _peaks(brackets[: brackets.rfind(b"]") + 1]))


def _peaks(closed: bytes) -> int:
    """The most ``[`` open at once in ``closed`` (which ends in ``]``, or is empty), read
    at each ``[]`` (its deepest points) from the pieces between them, in C (no step of
    Python each)."""
    pieces = closed.split(b"[]")
    if len(pieces) == 1:
        return 0  # (``]]][[]``-like: never deeper than where it started)
    # the depth after each piece (a ``[]`` between two adds nothing), then at its ``[``
    net: Iterator[int] = map(
        sub, map(mul, map(bytes.count, pieces, repeat(b"[")), repeat(2)), map(len, pieces)
    )
    deepest: int = max(islice(accumulate(net), len(pieces) - 1))
    return max(0, deepest + 1)


#: how the kernel writes a message frame (docs/protocol.md): its ``from`` first, then
#: ``to`` and ``payload``, then the rest of its fields (``kind``, ``id``, ...), none nested
_MESSAGE_HEAD = re.compile(r'\{"type":"message","payload":\{"from":("(?:[^"\\]|\\.)*")')
_AFTER_PAYLOAD = ',"kind":'


def _fields_beside_payload(text: str) -> dict[str, Any] | None:
    """The fields of a ``message`` frame too deep for the JSON reader, all but its
    ``payload`` (the part nested too deeply), read as the kernel writes the frame: its
    ``from``, then what follows the payload (``"kind":...``, ``"id":...``, scalars) up to
    the frame's end. None for a line not so written. Two small reads, not a walk."""
    head = _MESSAGE_HEAD.match(text)
    end = text.rstrip("\r\n")
    tail = end.rfind(_AFTER_PAYLOAD)
    if head is None or tail < head.end() or not end.endswith("}}"):
        return None
    try:
        fields = _loads("{" + end[tail + 1 : -2] + "}")
        sender = _loads(head.group(1))
    except (ValueError, RecursionError):
        return None
    if not isinstance(fields, dict) or "payload" in fields:
        return None
    return {"from": sender, **fields}


class InvalidFrame(ValueError):
    """An input line that is not a frame this bridge understands (reported, then skipped).

    ``message`` is set when the line was a ``message`` frame with bad fields: the kernel
    waits for one answer per message it wrote, so that message still gets an error answer.
    """

    def __init__(self, problem: str, message: dict[str, Any] | None = None) -> None:
        super().__init__(problem)
        self.message = message


class BadEnvironment(ValueError):
    """A ``NEXUS_*`` environment variable the agent was started with has a value it cannot
    use (``variable`` names it, ``value`` is what it held): raised by :class:`NexusAgent`'s
    constructor. The kernel sets these variables; a wrong one comes from a hand-made
    environment or a kernel of another version. ``run_agent(MyAgent)`` (the class, built
    inside) and the echo agent report it in one line on stderr and exit 2.
    """

    def __init__(self, variable: str, value: str, problem: str) -> None:
        super().__init__(f"{variable} {problem}, got {value!r}")
        self.variable = variable
        self.value = value
        self.problem = problem

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.variable, self.value, self.problem)


class Cancelled(Exception):
    """The kernel cancelled the message being handled (:meth:`NexusAgent.check_cancelled`).

    Raised out of ``handle_message`` it is answered as an ``error`` frame with
    ``error_type`` ``Cancelled``; the kernel had already given up on the message.
    """


class _NotSerialisable(TypeError):
    pass


class _ReadAhead:
    """Input lines handed from the input thread to the main loop, in order.

    :meth:`put` waits while ``limit`` bytes or more are waiting to be handled, so a flood
    of input is not taken into memory while a handler runs.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._lines: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._closed = False
        self._refused: list[bytes] = []
        self._changed = threading.Condition()

    def put(self, raw: bytes) -> None:
        with self._changed:
            while self._size >= self._limit and not self._closed:
                self._changed.wait()
            if self._closed:
                self._refused.append(raw)  # the run is over: kept for :meth:`leftover`
                return
            self._lines.append(raw)
            self._size += len(raw)
            self._changed.notify_all()

    def close(self) -> None:
        """The run is over: :meth:`put` waits no more, and keeps what it is given aside."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def leftover(self) -> bytes:
        """The lines never taken, in order (once closed and the thread has ended)."""
        with self._changed:
            rest = b"".join([*self._lines, *self._refused])
            self._lines.clear()
            self._refused.clear()
            self._size = 0
        return rest

    def get(self) -> bytes:
        with self._changed:
            while not self._lines:
                self._changed.wait()
            raw = self._lines.popleft()
            self._size -= len(raw)
            self._changed.notify_all()
        return raw


def _reject(value: Any) -> Any:
    raise _NotSerialisable(type(value).__name__)


def _encode(obj: Any, subject: Any = None) -> str:
    """``obj`` as one JSON line; ``subject`` is the part of it the user gave (a result, a
    payload sent), where an error says a lone surrogate is."""
    # allow_nan=False: NaN/Infinity are not JSON and other languages' parsers reject them.
    text = json.dumps(obj, separators=(",", ":"), allow_nan=False, default=_reject)
    if "\\ud" in text:
        # json.dumps writes a lone surrogate (a file name that is not UTF-8, decoded with
        # surrogateescape; half of a pair) as the escape \udcff, a line the kernel refuses
        # (not Unicode text); a valid pair is escaped too, so look at the strings
        place = None if subject is None else _lone_surrogate_place(subject, "")
        if place is None:
            place = _lone_surrogate_place(obj, "")
        if place is not None:
            raise _NotSerialisable(f"{place} (half of a surrogate pair: not Unicode text)")
    return text


def _has_lone_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _lone_surrogate_place(value: Any, path: str) -> str | None:
    """Where in ``value`` the first string (or key) holding a lone surrogate is, in the
    words of an error: ``string with a lone surrogate at .cut[1]``."""
    if isinstance(value, str):
        if _has_lone_surrogate(value):
            return f"string with a lone surrogate at {path or '.'}"
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and _has_lone_surrogate(key):
                return f"key with a lone surrogate in {path or '.'}"
            found = _lone_surrogate_place(item, f"{path}.{key}")
            if found is not None:
                return found
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            found = _lone_surrogate_place(item, f"{path}[{i}]")
            if found is not None:
                return found
    return None


def _timestamp() -> str:
    """Now as RFC 3339 in UTC with microseconds and a ``Z`` suffix (the kernel's format)."""
    now = time.time()
    whole = math.floor(now)
    micros = min(int((now - whole) * 1_000_000), 999_999)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{micros:06d}Z"


def _is_fd0(stream: IO[bytes]) -> bool:
    """True if ``stream`` reads file descriptor 0 (the process's stdin)."""
    try:
        return stream.fileno() == 0
    except (AttributeError, OSError, ValueError):
        return False


#: input read from file descriptor 0 past the frame that ended a run, for the next run
#: (a pipe cannot be given it back: see :meth:`_FdLines.give_back`)
_fd0_unread = b""


class _FdLines:
    """The lines read from file descriptor ``fd`` (with their newline; the last may lack it).

    Reads wait for the input or for :meth:`stop`, whichever comes first, so the input
    thread can be ended between two reads: once a run is over, no thread reads the
    process's stdin (the program may read it, or run an agent again). Where the input
    cannot be waited for (no ``poll``/``select`` on it), reads block as plain reads and
    :attr:`stoppable` is False. What was read but not yet handed out is :attr:`pending`.
    """

    def __init__(self, fd: int, unread: bytes = b"") -> None:
        self._fd = fd
        self.pending = bytearray(unread)
        self._wake_r, self._wake_w = os.pipe()
        self.stoppable = self._wait(0.0) is not None

    def _wait(self, timeout: float | None) -> bool | None:
        """Whether the input is readable (False: stop asked); None if it cannot be waited on."""
        try:
            if hasattr(select, "poll"):
                poller = select.poll()
                poller.register(self._fd, select.POLLIN)
                poller.register(self._wake_r, select.POLLIN)
                events = poller.poll(None if timeout is None else int(timeout * 1000))
                ready = [fd for fd, _ in events]
            else:
                ready = select.select([self._fd, self._wake_r], [], [], timeout)[0]
        except (OSError, ValueError):
            return None  # e.g. a pipe on Windows
        return self._wake_r not in ready

    def stop(self) -> None:
        """End the iteration before the next read (a read under way is not interrupted)."""
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def close(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def give_back(self, data: bytes) -> None:
        """Put ``data``, read past the end of the run, back in front of the input.

        A regular file is rewound; other input (a pipe, a terminal) keeps it for the next
        run of an agent in this process, since nothing can be put back into a pipe.
        """
        global _fd0_unread
        if not data:
            return
        try:
            os.lseek(self._fd, -len(data), os.SEEK_CUR)
        except OSError:
            if self._fd == 0:
                _fd0_unread = data

    def __iter__(self) -> Iterator[bytes]:
        pending = self.pending
        scan = 0
        while True:
            index = pending.find(b"\n", scan)
            if index >= 0:
                line = bytes(pending[: index + 1])
                del pending[: index + 1]
                scan = 0
                yield line
                continue
            scan = len(pending)
            if self.stoppable and not self._wait(None):
                return
            chunk = os.read(self._fd, 65536)
            if not chunk:
                if pending:
                    line = bytes(pending)
                    pending.clear()
                    yield line
                return
            pending += chunk


def _take_buffered(stream: Any) -> bytes:
    """What ``stream`` (a buffered reader of fd 0) holds read ahead, without blocking.

    The input thread reads the descriptor, not the stream: input the program read into
    ``sys.stdin.buffer`` (a ``readline()`` takes a whole chunk) would be skipped. The
    descriptor is non-blocking for that one call, so an empty buffer does not wait for
    input (what a file gives past the run is given back at its end).
    """
    if not isinstance(stream, io.BufferedReader):
        return b""
    try:
        blocking = os.get_blocking(0)
        os.set_blocking(0, False)
        try:
            data = stream.read1(_READ_AHEAD)
        except BlockingIOError:
            data = b""
        finally:
            os.set_blocking(0, blocking)
    except (OSError, ValueError):
        return b""  # closed, or no descriptor to speak of: nothing buffered to take
    return data or b""


def _no_json_constant(word: str) -> NoReturn:
    """``parse_constant`` for input lines: ``NaN``, ``Infinity`` and ``-Infinity``, which
    Python's ``json`` reads and JSON has not, make a line not JSON, as ``JSON.parse`` (the
    JavaScript bridge) and the kernel find it."""
    raise ValueError(f"JSON has no NaN or Infinity: it holds {word}")


def _finite_float(literal: str) -> float:
    """``parse_float`` for input lines: a number too large for a double (``1e999``), which
    Python's ``json`` reads as infinity, makes a line not JSON, as the kernel finds it (and
    the original Nexus's ``serde_json``: "number out of range"). ``1e-999`` reads as 0."""
    value = float(literal)
    if not math.isfinite(value):
        shown = literal if len(literal) <= 40 else f"{literal[:40]}..."
        raise ValueError(f"number out of range: {shown}")
    return value


#: made once: ``json.loads`` given ``parse_constant`` makes a decoder on every call (+1.8
#: us a line; shared by threads as ``json.loads``'s own default decoder is)
_STRICT_JSON = json.JSONDecoder(parse_constant=_no_json_constant, parse_float=_finite_float)


def _loads(text: str) -> Any:
    """``json.loads`` of an input line, as strict as JSON (see :func:`_no_json_constant`)."""
    if text.startswith("\ufeff"):  # (what json.loads says of it)
        raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
    return _STRICT_JSON.decode(text)


def _is_shutdown(raw: bytes) -> bool:
    """Whether input line ``raw`` is a ``shutdown`` frame (the main loop stops at it)."""
    if b'"shutdown"' not in raw:
        return False
    try:
        frame = _loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        return False
    return isinstance(frame, dict) and frame.get("type") == "shutdown"


def _well_formed(text: str) -> str:
    """``text`` with each lone surrogate written as its escape (``\\udcff``): a frame
    cannot carry one (not Unicode text), and an error's text may hold one (a file name
    that is not UTF-8, decoded with surrogateescape)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _exception_text(exc: BaseException) -> str:
    """``str(exc)`` as a frame can carry it; never raises (a ``__str__`` of the handler's
    exception class may: the error frame is written all the same)."""
    try:
        text = str(exc)
    except Exception as inner:
        text = f"<str() of the {_well_formed(type(exc).__name__)} raised {type(inner).__name__}>"
    return _well_formed(text)


#: how many of an exception group's exceptions its error text names, and how deep in
#: groups inside groups: as CPython's traceback shows a group (``max_group_width`` 15,
#: ``max_group_depth`` 10)
GROUP_WIDTH = 15
GROUP_DEPTH = 10

# (None before Python 3.11, where the standard library has no exception groups)
_GROUP: Any = getattr(builtins, "BaseExceptionGroup", None)


def _error_text(exc: BaseException, depth: int = 0) -> str:
    """:func:`_exception_text`, and for an exception group the type and text of its
    exceptions: ``boom (2 sub-exceptions): [ValueError: a; KeyError: 'b']``, at most
    :data:`GROUP_WIDTH` of each group (``and 3 more``), :data:`GROUP_DEPTH` groups deep,
    each cut at :data:`ERROR_TEXT_LIMIT` and none named past that many characters in
    all. ``str()`` of a group names only how many it holds, so the error frame said
    nothing of what failed (a ``trio`` or ``asyncio.TaskGroup`` handler raises one)."""
    text = _exception_text(exc)
    members = exc.exceptions if _GROUP is not None and isinstance(exc, _GROUP) else ()
    if not members or depth >= GROUP_DEPTH:
        return text
    parts: list[str] = []
    length = 0
    for member in members[:GROUP_WIDTH]:
        if length > ERROR_TEXT_LIMIT:
            break
        name = _well_formed(type(member).__name__)
        part = _cut_error_text(f"{name}: {_error_text(member, depth + 1)}")
        parts.append(part)
        length += len(part)
    more = len(members) - len(parts)
    if more:
        parts.append(f"and {more:,} more")
    return f"{text}: [{'; '.join(parts)}]"


def _nesting(value: Any) -> int | None:
    """How deep ``value`` nests its dicts, lists and tuples (``[]`` is 1), or None if it
    holds itself. Without recursion (it is asked of a value too deep for the JSON
    encoder's), each container entered once, read as ``json`` reads it, no code of the
    value's run (a subclass's ``__iter__``): the walk of a value the handler built."""
    containers = (dict, list, tuple)
    if not isinstance(value, containers):
        return 0
    path: list[Iterator[Any]] = [_items(value)]
    on_path = {id(value)}
    ids = [id(value)]
    # how many levels each container walked holds (``[]``: 1), kept: one met again (a
    # shared one) is as deep under each place it is at, as the JSON writer writes it there
    height: dict[int, int] = {}
    below = [0]  # for each container on the path: the most levels of one inside it
    while path:
        for item in path[-1]:
            if not isinstance(item, containers):
                continue
            if id(item) in height:
                below[-1] = max(below[-1], height[id(item)])
                continue
            if id(item) in on_path:
                return None
            on_path.add(id(item))
            ids.append(id(item))
            path.append(_items(item))
            below.append(0)
            break
        else:
            path.pop()
            left = ids.pop()
            on_path.discard(left)
            height[left] = levels = below.pop() + 1
            if below:
                below[-1] = max(below[-1], levels)
    return height[id(value)]


def _items(container: Any) -> Iterator[Any]:
    if isinstance(container, dict):
        return iter(dict.values(container))
    return iter(
        list.__iter__(container) if isinstance(container, list) else tuple.__iter__(container)
    )


def _describe_unserialisable(exc: Exception, subject: Any = None) -> tuple[str, str]:
    """(text, error_type) for a result json refused to encode (or whose encoding raised:
    a result nested deeper than the recursion limit, a mapping whose ``items()`` raises).
    ``subject`` is the result (or payload sent): a RecursionError is said as how deep it
    nests, in the words the bridges and the kernel use of a line nested too deeply."""
    if isinstance(exc, RecursionError):
        depth = _nesting(subject)
        if depth is None:  # (as json says of one it finds before the limit)
            return "result of handle_message is not JSON serialisable: circular reference", (
                "ValueError"
            )
        what = f"nested {depth:,} levels deep, past the JSON writer's recursion limit"
        return f"result of handle_message is not JSON serialisable: {what}", "TypeError"
    # (json's own ValueErrors are told by their words: one the result's code raised, a
    # mapping's items(), is said as it is, and its text may not be readable)
    text = _exception_text(exc)
    if isinstance(exc, _NotSerialisable):
        what = text
    elif isinstance(exc, ValueError) and text.startswith("Circular reference"):
        what = "circular reference"
    elif isinstance(exc, ValueError) and text.startswith("Out of range float"):
        what = "float (NaN or Infinity)"
    else:
        what = f"{_well_formed(type(exc).__name__)}: {text}"
    kind = "ValueError" if isinstance(exc, ValueError) else "TypeError"
    return f"result of handle_message is not JSON serialisable: {what}", kind


def _protocol_from(value: Any, source: str) -> int:
    text = str(value).strip()
    if text not in ("1", "2"):
        if source.startswith("NEXUS_"):
            raise BadEnvironment(source, value, "must be 1 or 2")
        raise ValueError(f"{source} must be 1 or 2, got {value!r}")
    return int(text)


def _kernel_protocol_from(value: str) -> int:
    """The highest version the kernel speaks, from ``NEXUS_KERNEL_PROTOCOL`` (any later one is
    fine: the bridge then speaks its own highest; versions are additive)."""
    text = value.strip()
    if not text.isdigit() or not text.isascii() or int(text) < 1:
        raise BadEnvironment(
            "NEXUS_KERNEL_PROTOCOL", value, "must be a protocol version (1, 2, ...)"
        )
    return int(text)


class NexusAgent:
    """Base class for an agent that runs as a child process of a nexus_trio kernel.

    Subclasses override :meth:`handle_message`; its return value is the response payload
    (``None`` becomes JSON ``null``). An exception in it becomes an error frame for that
    message and the agent goes on with the next one.

    The name is, in order: the ``name`` argument, the environment variable
    ``NEXUS_AGENT_NAME``, the class attribute :attr:`default_name`, the class name. The id:
    ``agent_id``, ``NEXUS_AGENT_ID``, a fresh UUID. The protocol: ``protocol``,
    ``NEXUS_PROTOCOL``, 2, and at most the kernel's ``NEXUS_KERNEL_PROTOCOL`` (the highest
    version both sides speak, as the kernel settles on for a later one). Protocol 1 is the original Nexus wire format (no ``protocol`` in
    ``register``, responses without ``id``/``reply_to``, errors as a response payload
    ``{"error": ..., "error_type": ...}``, no ``ping`` and no agent-initiated ``send``).

    ``stdin``/``stdout``/``stderr`` default to the process's own streams; pass binary streams
    (and a text stream for stderr) to drive an agent in-process, e.g. in a test.
    """

    #: The agent's name unless the constructor argument or ``NEXUS_AGENT_NAME`` gives one.
    default_name: str | None = None

    def __init__(
        self,
        name: str | None = None,
        agent_id: str | None = None,
        protocol: int | None = None,
        *,
        stdin: IO[bytes] | None = None,
        stdout: IO[bytes] | None = None,
        stderr: IO[str] | None = None,
    ) -> None:
        env = os.environ
        resolved_name = name or env.get("NEXUS_AGENT_NAME") or self.default_name
        self.name: str = resolved_name or type(self).__name__
        raw_id = agent_id or env.get("NEXUS_AGENT_ID") or str(uuid.uuid4())
        try:
            self.id: str = str(uuid.UUID(raw_id))
        except ValueError:
            if agent_id:
                raise ValueError(f"agent_id must be a UUID, got {raw_id!r}") from None
            raise BadEnvironment("NEXUS_AGENT_ID", raw_id, "must be a UUID") from None
        if protocol is not None:
            self.protocol = _protocol_from(protocol, "protocol")
        elif env.get("NEXUS_PROTOCOL"):
            self.protocol = _protocol_from(env["NEXUS_PROTOCOL"], "NEXUS_PROTOCOL")
        else:
            self.protocol = PROTOCOL_VERSION
        if env.get("NEXUS_KERNEL_PROTOCOL"):
            # A kernel that speaks only an earlier version gets that one (what it would run
            # the agent as anyway), so the agent's own checks (send(), ping) follow it.
            kernel = _kernel_protocol_from(env["NEXUS_KERNEL_PROTOCOL"])
            self.protocol = min(self.protocol, kernel)
        self._stdin = stdin
        self._stdout = stdout
        self._stderr = stderr
        self._out: IO[bytes] | None = None
        self._write_lock = threading.Lock()
        #: the error of the last write to the output that failed: it ends the run
        self._output_error: OSError | None = None
        self._line_number = 0
        #: the event loop of ``async def`` hooks, created on first use, kept for the run
        self._loop: asyncio.AbstractEventLoop | None = None
        # The message being handled and its cancellation, shared with the input thread.
        self._state_lock = threading.Lock()
        self._current_id: str | None = None
        self._cancel = threading.Event()
        self._task: asyncio.Future[Any] | None = None
        #: ids of cancel frames that named no message being handled (it may come next)
        self._early_cancels: collections.deque[str] = collections.deque(maxlen=_EARLY_CANCELS)
        #: Counters of what crossed the wire (useful in tests and on_stop reports).
        self.handled = 0
        self.failed = 0
        self.invalid_lines = 0
        #: lines :meth:`log` could not write (stderr on a full disk, or closed)
        self.lines_not_logged = 0

    # --- the agent's hooks ---------------------------------------------------------------

    def handle_message(self, message: Message) -> Any:
        """Handle one message (a :class:`Message`: ``from``, ``to``, ``kind``, ``payload``...).

        Return the response payload (JSON-serialisable, ``None`` for ``null``). May be an
        ``async def``: it is awaited before the next message is read.
        """
        return None

    def on_start(self) -> None:
        """Called once after ``register`` was sent, before the first message."""

    def on_stop(self) -> None:
        """Called once on ``shutdown``, on end of input, or when the kernel stopped reading."""

    # --- talking to the kernel -----------------------------------------------------------

    def send(
        self,
        to: str | uuid.UUID,
        payload: Any,
        kind: str = "Command",
        *,
        conversation_id: str | None = None,
        trace_id: str | None = None,
    ) -> None:
        """Send a message to another agent (by id or name) through the kernel (protocol 2).

        The kernel routes it with this agent as sender; delivery failures are logged and
        counted on the kernel side, not reported back. Safe to call from other threads.
        """
        if self.protocol < 2:
            raise RuntimeError("send() needs protocol 2; this agent speaks protocol 1")
        if isinstance(to, uuid.UUID):
            to = str(to)
        if not isinstance(to, str) or not to:
            raise ValueError(f"send(): 'to' must be an agent id or name, got {to!r}")
        if kind not in KINDS:
            raise ValueError(f"send(): unknown kind {kind!r} (expected one of {', '.join(KINDS)})")
        frame: dict[str, Any] = {"to": to, "kind": kind, "payload": payload}
        # Checked here: the kernel treats a send frame with a bad id as an invalid line,
        # which fails the message being handled.
        if conversation_id is not None:
            try:
                frame["conversation_id"] = str(uuid.UUID(str(conversation_id)))
            except ValueError:
                raise ValueError(
                    f"send(): conversation_id must be a UUID, got {conversation_id!r}"
                ) from None
        if trace_id is not None:
            # A trace id is free text (the original's Option<String>): kept as given.
            if not isinstance(trace_id, (str, uuid.UUID)):
                raise ValueError(f"send(): trace_id must be a string, got {trace_id!r}")
            frame["trace_id"] = str(trace_id)
        try:
            line = _encode({"type": "send", "payload": frame}, payload)
        except Exception as exc:  # (a RecursionError too: a payload nested too deeply)
            text, _ = _describe_unserialisable(exc, payload)
            raise TypeError(text.replace("result of handle_message", "send() payload")) from None
        self._write_line(line)

    @property
    def cancelled(self) -> bool:
        """True once the kernel cancelled the message being handled (protocol 2).

        The kernel sends ``cancel`` when it gives up on a message (handle timeout, request
        timeout): a handler that runs long can poll this and stop early. An ``async def``
        handler is cancelled too (``asyncio.CancelledError`` at its next ``await``). The
        answer written after a cancel is discarded by the kernel, which then goes on
        with this process instead of replacing it.
        """
        return self._cancel.is_set()

    def check_cancelled(self) -> None:
        """Raise :class:`Cancelled` if the kernel cancelled the message being handled."""
        if self._cancel.is_set():
            raise Cancelled("cancelled by the kernel")

    def log(self, text: str) -> None:
        """Write one line to stderr (the kernel logs it with this agent's fields).

        A line stderr cannot take (a full disk, a closed pipe) is lost, counted in
        ``lines_not_logged``: a diagnostic that cannot be written does not stop the agent.
        """
        stream = self._stderr or sys.stderr
        try:
            stream.write(f"{text}\n")
            stream.flush()
        except (OSError, ValueError):  # (ValueError: the stream was closed)
            self.lines_not_logged += 1

    # --- the loop ------------------------------------------------------------------------

    def run_agent(self) -> int:
        """Register, serve messages until ``shutdown`` or end of input, return the exit code.

        0 after a clean stop; 1 if :meth:`on_stop` raised; 130 on Ctrl-C. An exception in
        :meth:`on_start` propagates (the process exits non-zero and the kernel restarts it
        per its policy).
        """
        restore = self._claim_stdout()
        started = False
        try:
            try:
                self._write_frame("register", self._register_payload())
                self._call(self.on_start)
                started = True
                try:
                    self._serve()
                except KeyboardInterrupt:
                    self._stop()
                    return 130
            except OSError as exc:
                if exc is not self._output_error:
                    raise
                return self._output_failed(exc, started)
            return self._stop()
        finally:
            restore()
            self._out = None  # a late send() (e.g. from a thread) gets a clear error

    def _output_failed(self, exc: OSError, started: bool) -> int:
        """End the run whose output cannot be written: a closed pipe (the kernel is gone)
        is a clean stop; any other error (a full disk) lost what was written: status 1."""
        if isinstance(exc, BrokenPipeError):
            self.log(f"nexus-bridge[{self.name}]: the kernel stopped reading stdout; stopping")
            failed = 0
        else:
            said = exc.strerror or exc
            self.log(f"nexus-bridge[{self.name}]: cannot write to stdout ({said}); stopping")
            failed = 1
        if not started:  # (no on_stop for an on_start that did not return)
            self._close_loop()
            return failed
        return max(self._stop(), failed)

    def _register_payload(self) -> dict[str, Any]:
        payload: dict[str, Any] = {"id": self.id, "name": self.name}
        if self.protocol >= 2:
            payload["protocol"] = self.protocol
            payload["features"] = list(FEATURES)
        return payload

    def _stop(self) -> int:
        try:
            self._call(self.on_stop)
        except Exception:
            self.log(f"nexus-bridge[{self.name}]: on_stop failed:\n{traceback.format_exc()}")
            return 1
        finally:
            self._close_loop()
        return 0

    def _call(self, hook: Any, *args: Any) -> Any:
        """Call a hook; an ``async def`` one runs to completion on the agent's event loop."""
        result = hook(*args)
        if inspect.isawaitable(result):
            result = self._await(result)
        return result

    def _await(self, awaitable: Awaitable[Any]) -> Any:
        # One loop for the whole run, not one per message: state an async agent keeps
        # (clients, locks, queues made in on_start) stays bound to a live loop.
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        return self._loop.run_until_complete(awaitable)

    def _close_loop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    def _claim_stdout(self) -> Any:
        """Keep the real stdout for frames and send everything else written to it to stderr."""
        if self._stdout is not None:
            self._out = self._stdout
            return lambda: None
        saved = sys.stdout
        if saved is None:
            raise RuntimeError("the bridge needs a stdout to write frames to, and there is none")
        try:
            is_fd1 = saved.fileno() == 1
        except (AttributeError, OSError, ValueError):
            is_fd1 = False
        if not is_fd1:
            buffer = getattr(saved, "buffer", None)
            if buffer is None:
                raise RuntimeError("sys.stdout has no binary buffer: pass stdout= explicitly")
            self._out = buffer
            sys.stdout = sys.stderr
            return lambda: setattr(sys, "stdout", saved)
        saved.flush()
        # Stray writes to fd 1 (os.write, C code, child processes) must not reach the kernel:
        # frames go to a duplicate of the real stdout and fd 1 is pointed at stderr.
        frames_fd = os.dup(1)
        os.dup2(2, 1)
        out = os.fdopen(frames_fd, "wb")
        self._out = out
        sys.stdout = sys.stderr

        def restore() -> None:
            sys.stdout = saved
            with contextlib.suppress(OSError):
                out.flush()
            os.dup2(frames_fd, 1)
            with contextlib.suppress(OSError):
                out.close()

        return restore

    def _serve(self) -> None:
        source = self._stdin if self._stdin is not None else sys.stdin.buffer
        if self.protocol < 2:
            self._serve_lines(source.readline)
            return
        global _fd0_unread
        # Read ahead in a thread, so that a cancel frame is seen while a handler runs;
        # the lines are still handled here, one at a time and in order. The process's
        # stdin is read from its descriptor, also when it was given as ``stdin=``: a
        # daemon thread blocked inside sys.stdin.buffer holds its lock, and the
        # interpreter would abort when it closes it at exit.
        lines = _ReadAhead(_READ_AHEAD)
        fd_lines: _FdLines | None = None
        if self._stdin is None or _is_fd0(source):
            fd_lines = _FdLines(0, _fd0_unread + _take_buffered(source))
            _fd0_unread = b""
        reader = threading.Thread(
            target=self._read_input,
            args=(fd_lines if fd_lines is not None else iter(source.readline, b""), lines),
            name="nexus-bridge-input",
            daemon=True,
        )
        reader.start()
        try:
            self._serve_lines(lines.get)
        finally:
            # The run is over: the thread must not read on (the program may go on
            # reading its stdin, or run an agent again). It stops at a ``shutdown``
            # frame by itself, else it is woken and stopped here before its next read.
            if fd_lines is not None:
                fd_lines.stop()
            lines.close()
            if fd_lines is not None:
                if fd_lines.stoppable:
                    reader.join()
                    fd_lines.give_back(lines.leftover() + bytes(fd_lines.pending))
                fd_lines.close()

    def _serve_lines(self, read: Any) -> None:
        while True:
            raw = read()
            if not raw:
                return  # end of input: the kernel is gone or closed our stdin
            self._line_number += 1
            line = raw.rstrip(b"\r\n")
            if not line.strip():
                continue  # blank lines (e.g. an extra Enter on a tty) carry nothing
            try:
                frame = self._parse(line)
            except InvalidFrame as exc:
                self._report(str(exc))
                if exc.message is not None:
                    # Answer it anyway: the kernel must not hang until its handle timeout
                    # and protocol-1 order correlation must stay intact.
                    self._send_error(exc.message, str(exc), "InvalidFrame")
                continue
            kind = frame["type"]
            if kind == "shutdown":
                return
            if kind == "message":
                self._on_message(Message.from_dict(frame["payload"]))
            elif kind == "ping":
                self._write_frame("pong", {"id": frame["payload"]["id"]})
            # a cancel frame was acted on by the input thread when it was read

    def _read_input(self, read: Iterable[bytes], lines: _ReadAhead) -> None:
        """The input thread: every line goes to the main loop; cancels take effect now.

        It reads nothing past a ``shutdown`` frame: the run ends there.
        """
        try:
            for raw in read:
                if b'"cancel"' in raw:
                    self._cancel_from(raw)
                lines.put(raw)
                if _is_shutdown(raw):
                    return
        except (OSError, ValueError):
            pass  # stdin closed under us: end of input
        finally:
            lines.put(b"")

    def _cancel_from(self, raw: bytes) -> None:
        try:
            # decoded as _parse decodes (json.loads of bytes would skip a byte order mark
            # and read UTF-16: a cancel the main loop skips would still cancel)
            frame = _loads(raw.decode("utf-8"))
            target = frame["payload"]["message_id"] if frame["type"] == "cancel" else None
        except (ValueError, TypeError, KeyError, RecursionError):
            # Not a usable cancel frame: the main loop reports the line. (A line nested
            # too deeply must not end this thread: the bridge would stop as at end of input.)
            return
        if not isinstance(target, str):
            return
        with self._state_lock:
            if target != self._current_id:
                self._early_cancels.append(target)
                return
            self._cancel.set()
            task, loop = self._task, self._loop
        if task is not None and loop is not None:
            loop.call_soon_threadsafe(task.cancel)

    def _parse(self, line: bytes) -> dict[str, Any]:
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidFrame(f"not UTF-8 ({exc.reason} at byte {exc.start})") from None
        try:
            frame = _loads(text)
        except ValueError as exc:
            raise InvalidFrame(f"not JSON ({exc}): {text[:_SNIPPET]!r}") from None
        except RecursionError:
            # A message frame still gets its answer (the kernel waits for one per message
            # it wrote): its fields beside the payload are read without it.
            raise InvalidFrame(
                f"not JSON ({too_deep(line)}): {text[:_SNIPPET]!r}", _fields_beside_payload(text)
            ) from None
        if not isinstance(frame, dict):
            raise InvalidFrame(f"a frame must be a JSON object, got {type(frame).__name__}")
        kind = frame.get("type")
        if not isinstance(kind, str):
            raise InvalidFrame(f"frame has no string 'type': {text[:_SNIPPET]!r}")
        payload = frame.get("payload")
        if kind == "shutdown":
            return frame
        if kind == "message":
            self._check_message(payload)
            return frame
        if kind == "ping" and self.protocol >= 2:
            if not isinstance(payload, dict) or not isinstance(payload.get("id"), str):
                raise InvalidFrame("ping frame needs a payload with a string 'id'")
            return frame
        if kind == "cancel" and self.protocol >= 2:
            if not isinstance(payload, dict) or not isinstance(payload.get("message_id"), str):
                raise InvalidFrame("cancel frame needs a payload with a string 'message_id'")
            return frame
        raise InvalidFrame(f"unknown frame type {kind!r}")

    def _check_message(self, payload: Any) -> None:
        if not isinstance(payload, dict):
            raise InvalidFrame("message frame needs an object payload")
        missing = [key for key in _MESSAGE_FIELDS if key not in payload]
        problem = None
        if missing:
            problem = f"missing field(s) {', '.join(missing)}"
        elif not isinstance(payload["from"], str):
            problem = "field 'from' must be a string"
        elif payload["kind"] not in KINDS:
            problem = f"unknown kind {payload['kind']!r}"
        if problem is not None:
            raise InvalidFrame(f"invalid message frame: {problem}", payload)

    def _report(self, problem: str) -> None:
        self.invalid_lines += 1
        self.log(f"nexus-bridge[{self.name}]: skipped input line {self._line_number}: {problem}")

    def _on_message(self, message: Message) -> None:
        msg_id = message.get("id")
        current = msg_id if isinstance(msg_id, str) else None
        with self._state_lock:
            self._current_id = current
            if current is not None and current in self._early_cancels:
                self._early_cancels.remove(current)
                self._cancel.set()
        try:
            self._handle_current(message)
        finally:
            with self._state_lock:
                self._current_id = None
                self._task = None
                self._cancel.clear()

    def _run_handler(self, message: Message) -> Any:
        result = self.handle_message(message)
        if not inspect.isawaitable(result):
            return result
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        task = asyncio.ensure_future(result, loop=self._loop)
        with self._state_lock:
            self._task = task
        if self._cancel.is_set():
            task.cancel()
        return self._loop.run_until_complete(task)

    def _handle_current(self, message: Message) -> None:
        if self._cancel.is_set():
            # Cancelled before it was started (say during a slow on_start): not handled.
            self.failed += 1
            self._send_error(message, "cancelled by the kernel", "Cancelled")
            return
        try:
            result = self._run_handler(message)
        except (Exception, asyncio.CancelledError) as exc:
            if self._cancel.is_set():
                # The kernel gave up on it: one line, not a traceback, and still one answer.
                self.failed += 1
                self.log(f"nexus-bridge[{self.name}]: message {message.get('id')} cancelled")
                self._send_error(
                    message, _exception_text(exc) or "cancelled by the kernel", "Cancelled"
                )
                return
            if isinstance(exc, asyncio.CancelledError):
                raise  # not ours: as before, it ends the agent
            self.failed += 1
            self.log(f"nexus-bridge[{self.name}]: handle_message failed:\n{traceback.format_exc()}")
            # (its text, or its class's name, may hold a lone surrogate, or its __str__
            # raise: the error frame is written all the same, and the agent goes on)
            error_type = _well_formed(type(exc).__name__)
            self._send_error(message, _error_text(exc) or error_type, error_type)
            return
        try:
            line = _encode({"type": "response", "payload": self._response(message, result)}, result)
        except Exception as exc:
            # Only the handler's result can fail to encode: every other field is a string.
            # (TypeError, ValueError; a RecursionError for a result nested too deeply, or
            # what the result's own code raised as it was read: an error frame all the same)
            self.failed += 1
            text, error_type = _describe_unserialisable(exc, result)
            self.log(f"nexus-bridge[{self.name}]: {text}")
            self._send_error(message, text, error_type)
            return
        self.handled += 1
        self._write_line(line)

    def _response(self, message: Any, payload: Any) -> dict[str, Any]:
        sender = message.get("from") if isinstance(message, dict) else None
        response: dict[str, Any] = {
            "from": self.id,
            "to": sender,
            "kind": "Response",
            "payload": payload,
            "timestamp": _timestamp(),
        }
        if self.protocol >= 2 and isinstance(message, dict):
            msg_id = message.get("id")
            response["id"] = str(uuid.uuid4())
            if msg_id is not None:
                response["reply_to"] = msg_id
            response["conversation_id"] = message.get("conversation_id") or msg_id
            response["trace_id"] = message.get("trace_id")
        elif isinstance(message, dict):
            # As the original bridge did: echoed when set. The kernel matches answers to
            # messages by the conversation id it gave them.
            for field in ("conversation_id", "trace_id"):
                if message.get(field):
                    response[field] = message[field]
        return response

    def _send_error(self, message: Any, text: str, error_type: str) -> None:
        # (a 5 MB exception text, or class name, made a frame over the kernel's line limit:
        # the message failed "malformed", the line discarded, not with the handler's error)
        text, error_type = _cut_error_text(text), _cut_error_text(error_type)
        if self.protocol >= 2:
            msg_id = message.get("id") if isinstance(message, dict) else None
            self._write_frame(
                "error", {"reply_to": msg_id, "error": text, "error_type": error_type}
            )
        else:
            payload = {"error": text, "error_type": error_type}
            self._write_frame("response", self._response(message, payload))

    def _write_frame(self, kind: str, payload: Any) -> None:
        self._write_line(_encode({"type": kind, "payload": payload}))

    def _write_line(self, line: str) -> None:
        out = self._out
        if out is None:
            raise RuntimeError("the agent is not running: call run_agent() first")
        data = line.encode("utf-8") + b"\n"
        with self._write_lock:
            try:
                out.write(data)
                out.flush()
            except OSError as exc:
                self._output_error = exc
                raise


#: Short alias for subclassing: ``class MyAgent(Agent): ...``.
Agent = NexusAgent


def run_agent(agent: NexusAgent | Callable[[], NexusAgent]) -> int:
    """Run ``agent`` until ``shutdown`` or end of input (the original bridge's entry point).

    Same as ``agent.run_agent()``; exits the process with the status when it is not 0.
    Given the class (or any callable that returns the agent) instead, builds it first: a
    bad ``NEXUS_*`` variable (:class:`BadEnvironment`) is then one line on stderr and exit
    status 2, as for the echo agent, instead of a traceback and 1.
    """
    if not isinstance(agent, NexusAgent):
        try:
            agent = agent()
        except BadEnvironment as exc:
            _report_bad_environment(exc)
            raise SystemExit(2) from None
    code = agent.run_agent()
    if code != 0:
        raise SystemExit(code)
    return code


def _report_bad_environment(exc: BadEnvironment) -> None:
    with contextlib.suppress(OSError, ValueError):
        print(f"nexus-bridge: {exc}", file=sys.stderr, flush=True)


class EchoAgent(NexusAgent):
    """Answers every message with its payload, unchanged."""

    default_name = "echo"

    def handle_message(self, message: Message) -> Any:
        return message.get("payload")


_ECHO_DESCRIPTION = """\
The Nexus stdio bridge for Python agents (Python 3.9+, standard library only). Run
as a program, it is an echo agent: it registers with the kernel and answers every
message with its payload, in newline-delimited JSON on stdin and stdout
(docs/protocol.md). Under a kernel:
  nexus send 'python3 -m nexus_trio.bridges.python' '{"hello": 1}'"""

_LIBRARY_USE = """\
As a library: from nexus_trio.bridges.python import NexusAgent (or, with this file
beside your agent as nexus_bridge.py, from nexus_bridge import NexusAgent);
subclass NexusAgent, override handle_message(message) (may be async def) and call
run_agent(). See docs/bridges.md."""


def _agent_name(text: str) -> str:
    """``--name``'s value: an empty one is a mistake (it fell back to the default name)."""
    if not text:
        raise argparse.ArgumentTypeError(
            "must not be empty (leave it out for the default: NEXUS_AGENT_NAME or 'echo')"
        )
    return text


def _program_name() -> str | None:
    """The program's name in ``--help``'s usage line: ``python3 -m
    nexus_trio.bridges.python`` when run by ``-m`` (argparse before Python 3.14 said
    ``usage: python.py``, the file's name, which no one can type from where they
    are), else None: argparse's own (the file's name, ``python.py`` or
    ``nexus_bridge.py``, run as a script)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    name = getattr(spec, "name", None)
    if not name:
        return None
    python = os.path.basename(sys.executable) or "python3"
    return f"{python} -m {name}"


def main(argv: list[str] | None = None) -> int:
    """Run an :class:`EchoAgent` (``python3 python.py [--name N] [--protocol 1|2]``);
    ``--help`` says so, and how to use the file as a library (as nexus-bridge.js does)."""
    parser = argparse.ArgumentParser(
        prog=_program_name(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_ECHO_DESCRIPTION,
        epilog=_LIBRARY_USE,
    )
    parser.add_argument(
        "--name", type=_agent_name, help="agent name (default: NEXUS_AGENT_NAME or 'echo')"
    )
    parser.add_argument(
        "--protocol",
        choices=("1", "2"),
        help="wire protocol version (default: NEXUS_PROTOCOL or 2)",
    )
    args = parser.parse_args(argv)
    try:
        agent = EchoAgent(name=args.name, protocol=int(args.protocol) if args.protocol else None)
    except BadEnvironment as exc:
        _report_bad_environment(exc)
        return 2
    return agent.run_agent()


if __name__ == "__main__":
    sys.exit(main())
