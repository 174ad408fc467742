"""Messages: the one value type that travels between agents.

A :class:`Message` has the fields of the original Nexus wire format (``id``,
``timestamp``, ``from``, ``to``, ``kind``, ``conversation_id``, ``reply_to``,
``trace_id``, ``payload``). In Python ``from`` is spelled ``sender``. The JSON form is
produced by one cattrs converter (:data:`converter`), so the renames and the
timestamp/UUID encodings live in exactly one place. A message is a slotted class with a
hand-written ``__init__`` because it is built for every send: its id is drawn from a
counter (a random per-process prefix plus a counter, no system call) when ``msg.id`` is
first read or the message is encoded, and becomes a UUID only when ``msg.id`` is read;
its timestamp is one clock read in nanoseconds.

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

import enum
import itertools
import json
import os
import random
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from operator import attrgetter
from typing import TYPE_CHECKING, Any, Final, TypeAlias, final

import cattrs
from cattrs.errors import AttributeValidationNote
from cattrs.preconf.json import make_converter

from ._brief import brief
from ._errors import MessageDecodeError

#: An agent address: its UUID, or its unique name.
Address: TypeAlias = uuid.UUID | str

#: The sender id used for messages that come from outside any agent.
SYSTEM_ID: Final = uuid.UUID(int=0)


class MessageKind(enum.Enum):
    """What a message means to its recipient; the value is the wire spelling."""

    COMMAND = "Command"
    EVENT = "Event"
    QUERY = "Query"
    RESPONSE = "Response"


# --- cheap ids -----------------------------------------------------------------------
# uuid4() reads os.urandom (a syscall, ~1.2 us here). We draw 64 random bits once per
# process (and again after fork) for the high half and count in the low half from a
# random 48-bit start, keeping the RFC 4122 version-4 and variant bits, so that each id
# is one ``next()`` on a counter of whole 128-bit values: a well-formed random-looking
# UUID whose value a message can store as a plain int and turn into a UUID only when
# asked (the low half would need 2**62 ids to carry into the variant bits).
_VERSION_BITS: Final = (0x4000 << 64) | (0x8000 << 48)
_VERSION_MASK: Final = ~((0xF000 << 64) | (0xC000 << 48)) & ((1 << 128) - 1)
_new_uuid = object.__new__
_new_message = object.__new__
_set = object.__setattr__
_SAFE_UNKNOWN: Final = uuid.SafeUUID.unknown


def _id_counter() -> Iterator[int]:
    high = (random.SystemRandom().getrandbits(64) << 64) & _VERSION_MASK
    return itertools.count(high | _VERSION_BITS | random.getrandbits(48))


_next_ids = _id_counter()
#: drawing a message's id on first access is check-then-set: two threads reading a new
#: message's id at once must see the same one
_draw_lock = threading.Lock()
_LOW_62: Final = (1 << 62) - 1


@final
class _Undrawn:
    """What a message holds instead of an id not drawn yet: the generation of ids it
    was built in. A new generation starts at each fork, so that a message built before a
    fork and asked for its id after it has the same id in every process that has it."""

    __slots__ = ("high",)

    def __init__(self) -> None:
        #: the high half of the ids of this generation's messages drawn after a fork
        self.high = (random.SystemRandom().getrandbits(64) << 64) & _VERSION_MASK | _VERSION_BITS


_undrawn = _Undrawn()


def _new_generation_before_fork() -> None:
    global _undrawn
    _undrawn = _Undrawn()


def _reseed_after_fork() -> None:
    global _next_ids, _draw_lock
    _next_ids = _id_counter()
    _draw_lock = threading.Lock()  # a thread of the parent may have held it


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_new_generation_before_fork, after_in_child=_reseed_after_fork)


def uuid_from_int(value: int) -> uuid.UUID:
    """``uuid.UUID(int=value)`` for a value known to be in ``range(ID_LIMIT)``: the
    constructor's own checks cost ~1 us (the wire codec checks the range itself)."""
    u = _new_uuid(uuid.UUID)
    _set(u, "int", value)
    _set(u, "is_safe", _SAFE_UNKNOWN)
    return u


#: one past the largest id value; a constant, since ``1 << 128`` in an expression is
#: computed at each evaluation (CPython folds no constant that large)
ID_LIMIT: Final = 1 << 128


def id_value(msg: Message) -> int:
    """``msg.id.int`` without building the UUID if ``msg.id`` was never read (for codecs)."""
    value = msg._id
    cls = value.__class__
    if cls is int:
        # drawn, its UUID never asked for (a query's, one off the wire); a class test,
        # which mypy does not narrow by
        return value  # type: ignore[return-value]
    if cls is _Undrawn:  # (a final class: its instances are of it exactly)
        # Drawn now, once: check-then-set under the lock (two threads asking at once
        # get one id); acquire()/release(), not ``with``: a third of the cost of a draw.
        # Class tests, not isinstance(): three builtin calls were a sixth of a tell's draw.
        lock = _draw_lock
        lock.acquire()
        try:
            value = msg._id
            if value.__class__ is _Undrawn:
                # Built before a fork if not of this generation: the process that asks
                # cannot know what another one drew, so the id is the message's own: its
                # generation's random high half and its address, which no other object
                # alive at the fork had and which is the same in every process forked since.
                value = msg._id = (
                    next(_next_ids) if value is _undrawn else value.high | (id(msg) & _LOW_62)
                )
                return value
        finally:
            lock.release()
    # a UUID (also one another thread built meanwhile), or an id given to the constructor
    return value if isinstance(value, int) else value.int  # type: ignore[union-attr]


def new_id() -> uuid.UUID:
    """Return a fresh, process-unique UUID (version 4 layout) without a syscall."""
    return uuid_from_int(next(_next_ids))


def id_mark() -> int:
    """An id's value drawn now, to tell later whether an id was drawn before it (see
    :func:`drawn_before`): a kernel's, at its start."""
    return next(_next_ids)


def drawn_before(value: int, mark: int) -> bool:
    """Whether the id of value ``value`` was drawn in this process before ``mark`` (an
    :func:`id_mark`): ids come from one counter, which starts each process (and each
    fork) at a random high half and counts up in the low one; an id of another process,
    or one written by hand, is not (its high half differs)."""
    return value >> 64 == mark >> 64 and value < mark


_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
#: the first and last timestamps (microseconds since the epoch) that the JSON form can
#: carry: the years 1 to 9999 UTC of RFC 3339 (the NATS codecs carry any integer)
_TIMESTAMP_MIN: Final = -62_135_596_800_000_000
_TIMESTAMP_MAX: Final = 253_402_300_799_999_999
_time_ns = time.time_ns
_COMMAND: Final = MessageKind.COMMAND
_QUERY: Final = MessageKind.QUERY
_RESPONSE: Final = MessageKind.RESPONSE

#: field names in order: positional order of ``Message(...)``, repr, equality, wire order
FIELDS: Final = (
    "sender",
    "to",
    "payload",
    "kind",
    "id",
    "timestamp",
    "conversation_id",
    "reply_to",
    "trace_id",
)


class _Slots:
    # The storage of a Message, under private names: the public fields are read-only
    # properties over these, which makes ``msg.payload = 1`` an AttributeError without a
    # ``__setattr__`` hook (such a hook costs a Python call per field in ``__init__``,
    # which would triple the cost of building a message).
    __slots__ = (
        "_conversation_id",
        "_id",
        "_kind",
        "_ns",
        "_payload",
        "_reply_to",
        "_sender",
        "_to",
        "_trace_id",
    )
    #: an _Undrawn until the id is first needed (drawn then), a UUID, or its 128-bit
    #: value until .id is first read
    _id: uuid.UUID | int | _Undrawn


@final
class Message(_Slots):
    """An immutable message.

    ``timestamp`` is whole microseconds since the epoch (UTC), taken when the message
    was created; integers round-trip through the wire form exactly, and the RFC 3339
    text is produced only when serialised (see :attr:`sent_at`).
    ``to`` is an agent id or a unique agent name.

    Fields, in order (also the positional order of the constructor): ``sender`` (UUID),
    ``to`` (UUID or name), ``payload`` (JSON-compatible, default ``None``), ``kind``
    (default ``MessageKind.COMMAND``), ``id`` (default: a fresh id; a UUID, or its 128-bit
    integer value as ``uuid.UUID(int=...)`` takes it), ``timestamp``
    (default: now), ``conversation_id``, ``reply_to`` and ``trace_id`` (UUIDs or ``None``).

    Building one costs a few hundred nanoseconds: the fields are stored as given, the
    id is drawn from a counter when first needed (a read of :attr:`id`, an encode) and
    becomes a :class:`uuid.UUID` on first access of :attr:`id` (most messages are
    handled without anyone asking: they draw none), the clock is read once in
    nanoseconds. Fields cannot be assigned; use
    :meth:`evolve` for a copy with some fields changed. Equality, hashing and the repr
    cover all fields, in the order of :data:`FIELDS`.
    """

    __slots__ = ()
    __match_args__ = FIELDS

    def __init__(
        self,
        sender: uuid.UUID,
        to: Address,
        payload: Any = None,
        kind: MessageKind = _COMMAND,
        id: uuid.UUID | int | None = None,
        timestamp: int | None = None,
        conversation_id: uuid.UUID | None = None,
        reply_to: uuid.UUID | None = None,
        trace_id: uuid.UUID | None = None,
    ) -> None:
        if kind is not _COMMAND and kind.__class__ is not MessageKind:
            raise kind_error(kind)
        self._sender = sender
        self._to = to
        self._payload = payload
        self._kind: MessageKind = kind
        if id is None:
            self._id = _undrawn  # drawn when first needed
        elif id.__class__ is int:
            # The id's 128-bit value, as a codec reads it off the wire: the UUID is built
            # on first access of .id, as for the kernel's own ids.
            if not 0 <= id < ID_LIMIT:
                raise ValueError(f"a message id must be a 128-bit value, got {brief(id, 60)}")
            self._id = id
        else:
            self._id = id
        self._ns = _time_ns() if timestamp is None else timestamp * 1000
        self._conversation_id = conversation_id
        self._reply_to = reply_to
        self._trace_id = trace_id

    if TYPE_CHECKING:
        # What mypy sees; at run time each is a property over its slot (see below).
        @property
        def sender(self) -> uuid.UUID: ...
        @property
        def to(self) -> Address: ...
        @property
        def payload(self) -> Any: ...
        @property
        def kind(self) -> MessageKind: ...
        @property
        def conversation_id(self) -> uuid.UUID | None: ...
        @property
        def reply_to(self) -> uuid.UUID | None: ...
        @property
        def trace_id(self) -> uuid.UUID | None: ...
    else:
        # attrgetter (C) as the getter: ~40 ns a read, half a Python getter's cost.
        sender = property(attrgetter("_sender"), doc="The sending agent's id.")
        to = property(attrgetter("_to"), doc="The recipient: an agent id or unique name.")
        payload = property(attrgetter("_payload"), doc="The content (JSON-compatible).")
        kind = property(attrgetter("_kind"), doc="What the message means.")
        conversation_id = property(
            attrgetter("_conversation_id"), doc="The conversation it belongs to, if any."
        )
        reply_to = property(attrgetter("_reply_to"), doc="The id of the message it answers.")
        trace_id = property(attrgetter("_trace_id"), doc="The trace it belongs to, if any.")

    @property
    def id(self) -> uuid.UUID:
        """This message's unique id (drawn from the counter on first access)."""
        value = self._id
        if isinstance(value, uuid.UUID):
            return value
        # Drawn now if it never was; two threads may both build the UUID: equal UUIDs,
        # either one kept.
        value = self._id = uuid_from_int(id_value(self))
        return value

    @property
    def timestamp(self) -> int:
        """Creation time in whole microseconds since the epoch (UTC)."""
        return self._ns // 1000

    @property
    def sent_at(self) -> datetime:
        """The creation time as an aware UTC datetime.

        ValueError naming the timestamp for one outside the years 1 to 9999 UTC, which
        a datetime cannot hold (as :meth:`to_json` refuses it; a message from another
        node may carry any integer)."""
        ts = self.timestamp
        _check_timestamp(ts)
        return _EPOCH + timedelta(microseconds=ts)

    def _values(self) -> tuple[Any, ...]:
        return (
            self._sender,
            self._to,
            self._payload,
            self._kind,
            self.id,
            self._ns // 1000,
            self._conversation_id,
            self._reply_to,
            self._trace_id,
        )

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not Message:
            return NotImplemented
        assert isinstance(other, Message)
        return self._values() == other._values()

    def __hash__(self) -> int:
        # Like a frozen attrs class: a payload that is not hashable makes this raise.
        return hash((Message, *self._values()))

    def __repr__(self) -> str:
        fields = ", ".join(f"{n}={v!r}" for n, v in zip(FIELDS, self._values(), strict=True))
        return f"Message({fields})"

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (Message, self._values())

    def evolve(self, **changes: Any) -> Message:
        """A copy with ``changes`` applied (keywords are field names), like
        :func:`attrs.evolve` for attrs classes. The id is kept unless changed."""
        fields = dict(zip(FIELDS, self._values(), strict=True))
        unknown = changes.keys() - fields.keys()
        if unknown:
            raise TypeError(
                f"Message.evolve: unknown field {', '.join(map(repr, sorted(unknown)))}; "
                f"fields are {', '.join(FIELDS)}"
            )
        fields.update(changes)
        return Message(**fields)

    def reply(self, sender: uuid.UUID, payload: Any) -> Message:
        """Build the Response to this message.

        It goes back to this message's sender, answers this message's id, stays in its
        conversation (started by this message if it had none) and keeps its trace id.
        """
        answered = self.id
        return new_message(
            sender,
            self._sender,
            payload,
            _RESPONSE,
            self._trace_id,
            self._conversation_id or answered,
            answered,
        )

    def to_json(self) -> str:
        """The wire form, one line of JSON.

        ValueError for what it cannot carry: a payload JSON has no form for, a
        timestamp outside the years 1 to 9999 UTC (RFC 3339's), a payload nested
        deeper than the converter recurses (one from another node or a NATS client), or
        a string holding a lone surrogate, which :meth:`from_json` refuses. TypeError for
        a payload the standard library's ``json`` refuses (see :func:`check_json`): the
        converter would write a datetime, bytes, a set, a UUID or an Enum as a string or
        a list, and its reader would get something else."""
        payload = self._payload
        if payload.__class__ not in JSON_SCALARS:
            check_json(payload)
        try:
            text = json.dumps(converter.unstructure(self), separators=(",", ":"))
        except RecursionError:
            raise ValueError(
                f"message {self.id}: its payload is nested too deeply to write as JSON"
            ) from None
        # Every surrogate is written as a \ud800-\udfff escape (the text is ASCII): only
        # then can a string hold a lone one.
        if "\\ud" in text and not unicode_text((self._to, self._payload)):
            raise ValueError(f"message {self.id}: {LONE_SURROGATE}, which JSON readers refuse")
        return text

    @classmethod
    def from_json(cls, data: str | bytes) -> Message:
        """Decode the wire form; raises :class:`MessageDecodeError` naming the bad field.

        A string holding a lone surrogate (``"\\ud800"``: half of a pair, not Unicode
        text, which no UTF-8 encoder writes again) is refused, as the NATS codecs do.
        Bytes are read as UTF-8, as the wire says (``json.loads`` would guess UTF-16 or
        UTF-32 from them and skip a byte order mark): others are refused as ``not UTF-8
        (<why> at byte <n>)``, a byte order mark as not JSON."""
        text = data if isinstance(data, str) else utf8_text(data)
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError) as exc:
            # RecursionError: nested deeper than the JSON reader goes (a hostile document)
            raise MessageDecodeError("<document>", f"not JSON: {exc}") from None
        msg = decode_message(obj)
        if not unicode_text_read(data, (msg.to, msg.payload)):
            raise MessageDecodeError("<document>", LONE_SURROGATE)
        return msg


def kind_error(kind: object) -> TypeError:
    """The error for a ``kind`` that is no :class:`MessageKind` (e.g. the text
    ``"Command"``): taken, it would match no kind test (``msg.kind is
    MessageKind.QUERY``) and fail only where the message is encoded."""
    members = ", ".join(f"MessageKind.{k.name}" for k in MessageKind)
    # (any case: "event" is as surely meant as "Event" or "EVENT")
    folded = kind.casefold() if isinstance(kind, str) else None
    spelt = next((k for k in MessageKind if folded in (k.value.lower(), k.name.lower())), None)
    hint = f": write kind=MessageKind.{spelt.name}" if spelt is not None else f" ({members})"
    return TypeError(
        f"a message's kind must be a MessageKind, not {type(kind).__name__} {kind!r}{hint}"
    )


def new_message(
    sender: uuid.UUID,
    to: Address,
    payload: Any,
    kind: MessageKind,
    trace_id: uuid.UUID | None,
    conversation_id: uuid.UUID | None = None,
    reply_to: uuid.UUID | None = None,
) -> Message:
    """``Message(sender, to, payload, kind, trace_id=..., conversation_id=...,
    reply_to=...)`` with a fresh id and the time now: what the kernel builds for each
    send, request and reply.

    The same object the constructor builds, built by a Python-level call: calling the
    class goes through ``type.__call__`` into ``__init__`` from C, which costs a fifth of
    the message on Python 3.11 (the hot paths build one per send).
    """
    msg = _new_message(Message)
    msg._sender = sender
    msg._to = to
    msg._payload = payload
    msg._kind = kind
    msg._id = _undrawn  # drawn when first needed (most messages never need one)
    msg._ns = _time_ns()
    msg._conversation_id = conversation_id
    msg._reply_to = reply_to
    msg._trace_id = trace_id
    return msg


def new_query(sender: uuid.UUID, to: Address, payload: Any, trace_id: uuid.UUID | None) -> Message:
    """:func:`new_message` for a request's Query, its id drawn now: the requester keys
    its wait by the id's value, and the reply and the serving agent look it up, so it is
    always drawn. Drawn without :func:`id_value`'s lock: the lock makes two threads
    asking for one message's id agree, and a message only its builder holds cannot be
    asked for twice (``next`` on the counter is atomic, as in :func:`new_id`)."""
    msg = _new_message(Message)
    msg._sender = sender
    msg._to = to
    msg._payload = payload
    msg._kind = _QUERY
    msg._id = next(_next_ids)
    msg._ns = _time_ns()
    msg._conversation_id = None
    msg._reply_to = None
    msg._trace_id = trace_id
    return msg


def stored_fields(msg: Message) -> tuple[Any, ...]:
    """``(sender, to, payload, kind, id, ns, conversation_id, reply_to, trace_id, msg)``
    of a message, for codecs: ``id`` as stored (a UUID, or its 128-bit value if ``msg.id`` was
    never read), drawn now if it never was (as :func:`id_value` draws it: a codec
    writes it), and ``ns`` the creation time in nanoseconds (the ``timestamp`` property
    is a Python-level call, a tenth of a binary encode).

    A Python function, not ``operator.attrgetter``: the interpreter reads a slot it has
    seen before in a few instructions, where attrgetter takes the generic attribute
    lookup for each of the nine (callgrind, one encode_tell of bench_nats's payload:
    about 1,950 instructions in attrgetter against some 400 here)."""
    value = msg._id
    if value.__class__ is _Undrawn:
        # id_value's draw, written out: every tell a kernel sends to another one is
        # drawn here (a new message's id is drawn lazily), and the call of id_value was
        # 2,440 instructions of the encode's 18,000 (docs/distributed.md, thirty-eighth
        # pass)
        lock = _draw_lock
        lock.acquire()
        try:
            value = msg._id
            if value.__class__ is _Undrawn:
                value = msg._id = (
                    next(_next_ids) if value is _undrawn else value.high | (id(msg) & _LOW_62)
                )
        finally:
            lock.release()
    return (
        msg._sender,
        msg._to,
        msg._payload,
        msg._kind,
        value,
        msg._ns,
        msg._conversation_id,
        msg._reply_to,
        msg._trace_id,
        msg,
    )


def row_fields(msg: Message) -> tuple[Any, ...]:
    """:func:`stored_fields` without the id's draw, and the message last: ``(sender, to,
    payload, kind, id, ns, conversation_id, reply_to, trace_id, msg)``, ``id`` as stored,
    which may not be drawn yet (:func:`row_ids` draws it, a whole block of them under one
    hold of the lock). For a codec that writes a tell's id later than its send: the
    columnar block packs its rows' heads when it closes. The draw was a third of
    stored_fields' cost a tell: the lock's acquire and release alone about 890 of
    3,000 instructions (docs/distributed.md, forty-fifth pass)."""
    return (
        msg._sender,
        msg._to,
        msg._payload,
        msg._kind,
        msg._id,
        msg._ns,
        msg._conversation_id,
        msg._reply_to,
        msg._trace_id,
        msg,
    )


def row_ids(rows: Iterable[tuple[tuple[Any, ...], int]]) -> list[Any]:
    """The id of each row's message (``(fields, ...)``: :func:`stored_fields`' or
    :func:`row_fields`', whose last is the message), as stored: a UUID or its 128-bit
    value, in order; one not drawn yet is drawn now, as :func:`stored_fields` would
    have drawn it, the lock held once for them all (read under it: a thread may have
    read ``msg.id`` since the fields were taken)."""
    ids: list[Any] = []
    append = ids.append
    undrawn = _Undrawn
    lock = _draw_lock
    lock.acquire()
    try:
        for fields, _ in rows:
            msg = fields[9]
            value = msg._id
            if value.__class__ is undrawn:
                value = msg._id = (
                    next(_next_ids) if value is _undrawn else value.high | (id(msg) & _LOW_62)
                )
            append(value)
    finally:
        lock.release()
    return ids


def restore_message(
    sender: uuid.UUID,
    to: Address,
    payload: Any,
    kind: MessageKind,
    id: int,
    timestamp: int,
    conversation_id: uuid.UUID | None,
    reply_to: uuid.UUID | None,
    trace_id: uuid.UUID | None,
) -> Message:
    """A message read by a codec whose fields are already checked (``id`` a value in
    ``range(ID_LIMIT)``, ``timestamp`` whole microseconds): what ``Message(...)`` builds
    with the same arguments, without its checks or the class call (see new_message)."""
    msg = _new_message(Message)
    msg._sender = sender
    msg._to = to
    msg._payload = payload
    msg._kind = kind
    msg._id = id
    msg._ns = timestamp * 1000
    msg._conversation_id = conversation_id
    msg._reply_to = reply_to
    msg._trace_id = trace_id
    return msg


# --- wire codec -------------------------------------------------------------------------

#: why a decoded string is refused (see :func:`unicode_text`)
LONE_SURROGATE: Final = "a string holds a lone surrogate: not Unicode text"
#: (what JSON has no form for, a message's UUID ``to`` among them, is no string: null)
_json_text: Final = json.JSONEncoder(
    separators=(",", ":"), ensure_ascii=False, skipkeys=True, default=lambda _: None
).encode


def unicode_text(value: Any) -> bool:
    """Whether the strings in ``value`` (a decoded JSON value) are Unicode text: no lone
    surrogate, which JSON's ``\\u`` escapes and Python's readers let through and no
    UTF-8 encoder writes. What every decoder of messages checks."""
    try:
        _json_text(value).encode()
    except UnicodeEncodeError:
        return False
    except (ValueError, TypeError, RecursionError):
        pass  # (not the question asked: read as it is)
    return True


def utf8_text(data: bytes, field: str = "<document>", start: int = 0) -> str:
    """``data``, bytes off the wire, as the UTF-8 text the wire says they are; else a
    :class:`MessageDecodeError` for ``field`` saying ``not UTF-8 (invalid continuation
    byte at byte 100)``, counting from ``start`` (where ``data`` begins in the frame),
    as the stdio bridges say it of a line."""
    try:
        return data.decode()
    except UnicodeDecodeError as exc:
        raise MessageDecodeError(
            field, f"not UTF-8 ({exc.reason} at byte {exc.start + start})"
        ) from None


def unicode_text_read(data: str | bytes, value: Any) -> bool:
    """:func:`unicode_text` of ``value``, read from the JSON ``data`` by ``json.loads``;
    checked only if ``data`` can hold a lone surrogate: an escape, the UTF-8 lead byte of
    the surrogates (json reads bytes with surrogatepass), or a str's own characters."""
    maybe = (
        "\\u" in data or not data.isascii()
        if isinstance(data, str)
        else b"\\u" in data or b"\xed" in data
    )
    return not maybe or unicode_text(value)


#: the classes of a JSON value that hold no other value: what the wire encoders take with
#: no walk (the class, not isinstance: a subclass goes the long way)
JSON_SCALARS: Final = frozenset((str, int, float, bool, type(None)))
#: what JSON writes for a dict key, as the standard library's ``json`` takes it
_JSON_KEYS: Final = (str, int, float, type(None))
#: what the standard library's ``json`` writes as a number or a string, subclasses too
_JSON_LEAVES: Final = (str, int, float)


class _NotJSON(Exception):
    """Raised by :func:`_walk_json` at what JSON has no form for (``problem``, from its
    verb on); each container on the way out adds where it sat (only a payload that fails
    pays for the path)."""

    def __init__(self, problem: str) -> None:
        self.problem = problem
        self.path: list[str] = []


def check_json(value: Any, what: str = "payload") -> bool:
    """Raise TypeError, naming the type and where it sits in ``value`` (``what``), if
    the standard library's ``json`` would refuse ``value``: anything but a dict (keys
    str, int, float, bool or None), list, tuple, str, int, float, bool or None, also
    nested. A faster JSON encoder (msgspec's) writes more than that, a datetime, bytes,
    a set, a UUID, a Decimal, an Enum or a dataclass, as a string, a list or an object,
    so that the value would arrive as something else: every wire encoder of payloads
    calls this first. ValueError, naming where, for a value that contains itself (as
    ``json.dumps`` raises) and for one nested deeper than the interpreter recurses (the
    encoders would raise RecursionError, which says neither what nor where). A caller on
    a hot path checks ``value.__class__`` against :data:`JSON_SCALARS` first: such a
    value needs no walk.

    True if ``value`` has a dict key other than a str or an int (a float, a bool, None,
    a subclass): the standard library writes such a key its own way (``1e+16``,
    ``true``, ``null``, ``NaN``), which a faster encoder does not (``1e16``, ``nan``) or
    refuses (a bool or None key); likewise a subclass of dict, list or tuple, which the
    standard library writes through its items() or iterator, a faster encoder from its
    storage. So an encoder that must write what ``json.dumps``
    writes gives such a value to the standard library's."""
    odd: list[Any] = []
    try:
        _walk_json(value, odd)
    except _NotJSON as exc:
        where = "".join(reversed(exc.path))
        raise TypeError(f"{what}{where} {exc.problem}") from None
    except RecursionError:
        # Only now is the value walked again, without recursion, to say which: the walk
        # above keeps no record of what it has seen (it runs on every payload sent).
        raise ValueError(_too_deep(value, what)) from None
    return bool(odd)


def _too_deep(value: Any, what: str) -> str:
    """Why the walk of ``value`` recursed too deeply: where it contains itself (a
    circular reference) or, if nowhere, how deep it goes. Depth first without recursion,
    in the order of the walk that failed, each container entered once (a value shared by
    two branches is not walked twice), and no deeper than the recursion limit: so it
    does at most what that walk did before it failed (a payload nested 100,000 levels
    deep costs no more than one nested 1,000: a hostile one cannot hold the kernel)."""
    limit = sys.getrecursionlimit()
    containers = (dict, list, tuple)
    # the containers on the path from ``value`` down, each with what is left of its
    # items, and the step into it (``[key]`` or ``[index]``)
    path: list[Iterator[tuple[str, Any]]] = [_steps(value)]
    steps: list[str] = [what]
    ids = [id(value)]
    on_path = set(ids)
    done: set[int] = set()
    deepest = 1
    while path:
        for step, item in path[-1]:
            if not isinstance(item, containers) or id(item) in done:
                continue
            if id(item) in on_path:
                return (
                    f"{''.join(steps)}{step} is a {_type_name(item)} that holds it (a"
                    " circular reference: json.dumps refuses it too)"
                )
            if len(path) >= limit:
                return (
                    f"{what} is nested more than {limit:,} levels deep, past this"
                    " interpreter's recursion limit, which no JSON encoder here goes beyond"
                )
            on_path.add(id(item))
            ids.append(id(item))
            path.append(_steps(item))
            steps.append(step)
            deepest = max(deepest, len(path))
            break
        else:
            path.pop()
            steps.pop()
            left = ids.pop()
            on_path.discard(left)
            done.add(left)
    return (
        f"{what} is nested {deepest:,} levels deep, deeper than this interpreter's recursion"
        f" limit ({limit:,}) lets a JSON encoder go from where it was called"
    )


def _steps(container: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(container, dict):
        return ((f"[{brief(key, 60)}]", item) for key, item in container.items())
    return ((f"[{index}]", item) for index, item in enumerate(container))


def _type_name(value: Any) -> str:
    cls = type(value)
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"


def _walk_json(value: Any, odd: list[Any]) -> None:
    # Exact classes first (the common case), isinstance only for the rest: the standard
    # library takes subclasses of dict, list, tuple, str, int and float too. ``odd``
    # gets the keys that are neither a str nor an int (see check_json).
    cls = value.__class__
    if cls is dict or (cls is not list and cls is not tuple and isinstance(value, dict)):
        if cls is not dict:
            odd.append(value)  # json.dumps writes what its items() give, msgspec its storage
        for key, item in value.items():
            if key.__class__ is not str and key.__class__ is not int:
                if not isinstance(key, _JSON_KEYS):
                    raise _NotJSON(
                        f"has a key of type {_type_name(key)}, {brief(key, 60)} (JSON keys"
                        " are strings: json.dumps takes str, int, float, bool or None keys"
                        " only)"
                    )
                odd.append(key)
            if item.__class__ not in JSON_SCALARS:
                try:
                    _walk_json(item, odd)
                except _NotJSON as exc:
                    exc.path.append(f"[{brief(key, 60)}]")
                    raise
    elif cls is list or cls is tuple or isinstance(value, (list, tuple)):
        if cls is not list and cls is not tuple:
            odd.append(value)  # json.dumps writes what iterating it gives, msgspec its storage
        for item in value:
            if item.__class__ not in JSON_SCALARS:
                try:
                    _walk_json(item, odd)
                except _NotJSON as exc:
                    index = next(i for i, each in enumerate(value) if each is item)
                    exc.path.append(f"[{index}]")
                    raise
    elif cls not in JSON_SCALARS and not isinstance(value, _JSON_LEAVES):
        raise _NotJSON(
            f"is of type {_type_name(value)}, which JSON has no type for (json.dumps refuses"
            " it too: send a str, int, float, bool, None, list, tuple or dict)"
        )


def _check_timestamp(ts: int) -> None:
    if not _TIMESTAMP_MIN <= ts <= _TIMESTAMP_MAX:
        raise ValueError(
            f"timestamp {ts} (microseconds since the epoch) is outside the years 1 to 9999"
            " UTC that a datetime and the JSON form can carry"
        )


def format_timestamp(ts: int) -> str:
    """RFC 3339 in UTC with a ``Z`` suffix and microseconds (the year in four digits:
    ``strftime("%Y")`` writes the years before 1000 in fewer, which no reader takes).

    ValueError for a time outside the years 1 to 9999 UTC, which RFC 3339 cannot write
    (a message from another node may carry any integer)."""
    _check_timestamp(ts)
    return (_NAIVE_EPOCH + timedelta(microseconds=ts)).isoformat(timespec="microseconds") + "Z"


_NAIVE_EPOCH: Final = datetime(1970, 1, 1)


def _parse_timestamp(value: Any, _: Any) -> int:
    if not isinstance(value, str):
        raise TypeError(f"expected an RFC 3339 string, got {type(value).__name__}")
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        raise ValueError(f"timestamp {value!r} has no UTC offset")
    timestamp = (parsed - _EPOCH) // timedelta(microseconds=1)
    if not _TIMESTAMP_MIN <= timestamp <= _TIMESTAMP_MAX:
        # "9999-12-31T23:59:59-05:00" is in the year 10000 UTC
        raise ValueError(f"timestamp {value!r} is outside the years 1 to 9999 UTC")
    return timestamp


def _parse_uuid(value: Any, _: Any) -> uuid.UUID:
    if not isinstance(value, str):
        raise TypeError(f"expected a UUID string, got {type(value).__name__}")
    return uuid.UUID(value)


def _parse_optional_uuid(value: Any, _: Any) -> uuid.UUID | None:
    return None if value is None else _parse_uuid(value, None)


def parse_address(value: Any, _: Any = None) -> Address:
    """A UUID string becomes a UUID; any other non-empty string is an agent name."""
    if not isinstance(value, str) or not value:
        raise TypeError(f"expected an agent id or name string, got {value!r}")
    try:
        return uuid.UUID(value)
    except ValueError:
        return value


def _parse_kind(value: Any, _: Any) -> MessageKind:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    try:
        return MessageKind(value)
    except ValueError:
        known = ", ".join(k.value for k in MessageKind)
        raise ValueError(f"unknown kind {value!r} (expected one of {known})") from None


def _optional_uuid_text(value: uuid.UUID | None) -> str | None:
    return None if value is None else str(value)


#: wire key -> (Message keyword, parser) in wire order; ``id`` and ``timestamp`` may be
#: absent (the original bridges omit them), the others are checked by decode_message
_PARSERS: Final[tuple[tuple[str, str, Callable[[Any, Any], Any]], ...]] = (
    ("from", "sender", _parse_uuid),
    ("to", "to", parse_address),
    ("payload", "payload", lambda v, _: v),
    ("kind", "kind", _parse_kind),
    ("id", "id", _parse_uuid),
    ("timestamp", "timestamp", _parse_timestamp),
    ("conversation_id", "conversation_id", _parse_optional_uuid),
    ("reply_to", "reply_to", _parse_optional_uuid),
    ("trace_id", "trace_id", _parse_optional_uuid),
)
_OPTIONAL_KEYS: Final = frozenset({"id", "timestamp", "conversation_id", "reply_to", "trace_id"})


def _make_converter() -> cattrs.Converter:
    conv = make_converter()
    conv.register_unstructure_hook(uuid.UUID, str)
    unstructure = conv.unstructure

    # Message is a plain slotted class, so cattrs cannot generate its hooks (make_dict_*_fn
    # needs attrs fields): these two are the hooks it generated for the attrs version,
    # written out, registered on this one converter.
    def unstructure_message(msg: Message) -> dict[str, Any]:
        to = msg.to
        return {
            "from": str(msg.sender),
            "to": to if to.__class__ is str else str(to),
            "payload": unstructure(msg.payload),
            "kind": msg.kind.value,
            "id": str(msg.id),
            "timestamp": format_timestamp(msg.timestamp),
            "conversation_id": _optional_uuid_text(msg.conversation_id),
            "reply_to": _optional_uuid_text(msg.reply_to),
            "trace_id": _optional_uuid_text(msg.trace_id),
        }

    def structure_message(obj: Mapping[str, Any], _: Any) -> Message:
        # Every field is checked and every failure reported, like cattrs' detailed
        # validation: one ClassValidationError whose exceptions carry the attribute name.
        values: dict[str, Any] = {}
        errors: list[Exception] = []
        for key, name, parse in _PARSERS:
            if key not in obj:
                if key in _OPTIONAL_KEYS:
                    continue
                problem: Exception = KeyError(key)
            else:
                try:
                    values[name] = parse(obj[key], None)
                    continue
                except Exception as exc:
                    problem = exc
            problem.add_note(
                AttributeValidationNote(f"Structuring class Message @ attribute {name}", name, Any)
            )
            errors.append(problem)
        if errors:
            raise cattrs.ClassValidationError("While structuring Message", errors, Message)
        return Message(**values)

    conv.register_unstructure_hook(Message, unstructure_message)
    conv.register_structure_hook(Message, structure_message)
    return conv


#: The converter that owns the JSON shape of every wire value.
converter: Final = _make_converter()

_REQUIRED: Final = ("from", "to", "kind", "payload")
_WIRE_NAME: Final = {"sender": "from"}


def _first_failing_field(exc: BaseException) -> tuple[str, str]:
    """Dig the attribute name and the innermost problem out of a cattrs error group."""
    if isinstance(exc, cattrs.ClassValidationError):
        for sub in exc.exceptions:
            for note in getattr(sub, "__notes__", ()):
                name = getattr(note, "name", None)
                if name is not None:
                    return _WIRE_NAME.get(name, name), _first_failing_field(sub)[1]
        if exc.exceptions:
            return _first_failing_field(exc.exceptions[0])
    return "<document>", str(exc)


def decode_message(obj: Any) -> Message:
    """Structure a decoded JSON object into a :class:`Message`.

    ``id`` and ``timestamp`` may be absent (the original bridges omit them): a fresh id
    and the current time are used. ``from``, ``to``, ``kind`` and ``payload`` are required.
    """
    if not isinstance(obj, dict):
        raise MessageDecodeError("<document>", f"expected a JSON object, got {type(obj).__name__}")
    for key in _REQUIRED:
        if key not in obj:
            raise MessageDecodeError(key, "missing")
    try:
        return converter.structure(obj, Message)
    except Exception as exc:  # cattrs wraps every hook error in a group
        field, problem = _first_failing_field(exc)
        raise MessageDecodeError(field, problem, obj.get(field)) from None
