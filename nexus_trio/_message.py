"""Messages: the one value type that travels between agents.

A :class:`Message` has the fields of the original Nexus wire format (``id``,
``timestamp``, ``from``, ``to``, ``kind``, ``conversation_id``, ``reply_to``,
``trace_id``, ``payload``). In Python ``from`` is spelled ``sender``. The JSON form is
produced by one cattrs converter (:data:`converter`), so the renames and the
timestamp/UUID encodings live in exactly one place. Message ids are cheap: a random
per-process prefix plus a counter, no system call per id.
"""

from __future__ import annotations

import enum
import itertools
import json
import os
import random
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, Final, TypeAlias

import attrs
import cattrs
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override
from cattrs.preconf.json import make_converter

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
# uuid4() reads os.urandom (a syscall, ~1.2 us here); we draw 64 random bits once per
# process (and again after fork) and count in the low 64 bits, keeping the RFC 4122
# version-4 and variant bits so the result is a well-formed random-looking UUID.
_VERSION_BITS: Final = (0x4000 << 64) | (0x8000 << 48)
_VERSION_MASK: Final = ~((0xF000 << 64) | (0xC000 << 48)) & ((1 << 128) - 1)
_new_uuid = object.__new__
_set = object.__setattr__
_SAFE_UNKNOWN: Final = uuid.SafeUUID.unknown


class _IdSource:
    __slots__ = ("base", "counter")

    def __init__(self) -> None:
        self.reseed()

    def reseed(self) -> None:
        self.base = ((random.SystemRandom().getrandbits(64) << 64) & _VERSION_MASK) | _VERSION_BITS
        self.counter = itertools.count(random.getrandbits(48))


_ids = _IdSource()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_ids.reseed)


def new_id() -> uuid.UUID:
    """Return a fresh, process-unique UUID (version 4 layout) without a syscall."""
    u = _new_uuid(uuid.UUID)
    # The counter only touches bits 0..62 of the low half: the variant bits stay set.
    _set(u, "int", _ids.base | (next(_ids.counter) & 0x3FFF_FFFF_FFFF_FFFF))
    _set(u, "is_safe", _SAFE_UNKNOWN)
    return u


def _now_us() -> int:
    return time.time_ns() // 1000


_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


@attrs.frozen(slots=True, weakref_slot=False)
class Message:
    """An immutable message.

    ``timestamp`` is whole microseconds since the epoch (UTC), taken when the message
    was created; integers round-trip through the wire form exactly, and the RFC 3339
    text is produced only when serialised (see :attr:`sent_at`).
    ``to`` is an agent id or a unique agent name.
    """

    sender: uuid.UUID
    to: Address
    payload: Any = None
    kind: MessageKind = MessageKind.COMMAND
    id: uuid.UUID = attrs.field(factory=new_id)
    timestamp: int = attrs.field(factory=_now_us)
    conversation_id: uuid.UUID | None = None
    reply_to: uuid.UUID | None = None
    trace_id: uuid.UUID | None = None

    @property
    def sent_at(self) -> datetime:
        """The creation time as an aware UTC datetime."""
        return _EPOCH + timedelta(microseconds=self.timestamp)

    def reply(self, sender: uuid.UUID, payload: Any) -> Message:
        """Build the Response to this message.

        It goes back to this message's sender, answers this message's id, stays in its
        conversation (started by this message if it had none) and keeps its trace id.
        """
        return Message(
            sender=sender,
            to=self.sender,
            payload=payload,
            kind=MessageKind.RESPONSE,
            conversation_id=self.conversation_id or self.id,
            reply_to=self.id,
            trace_id=self.trace_id,
        )

    def to_json(self) -> str:
        """The wire form, one line of JSON."""
        return json.dumps(converter.unstructure(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, data: str | bytes) -> Message:
        """Decode the wire form; raises :class:`MessageDecodeError` naming the bad field."""
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise MessageDecodeError("<document>", f"not JSON: {exc}") from None
        return decode_message(obj)


# --- wire codec -------------------------------------------------------------------------


def format_timestamp(ts: int) -> str:
    """RFC 3339 in UTC with a ``Z`` suffix and microseconds."""
    return (_EPOCH + timedelta(microseconds=ts)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_timestamp(value: Any, _: Any) -> int:
    if not isinstance(value, str):
        raise TypeError(f"expected an RFC 3339 string, got {type(value).__name__}")
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        raise ValueError(f"timestamp {value!r} has no UTC offset")
    return (parsed - _EPOCH) // timedelta(microseconds=1)


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


def _make_converter() -> cattrs.Converter:
    conv = make_converter()
    conv.register_unstructure_hook(uuid.UUID, str)
    conv.register_unstructure_hook(
        Message,
        make_dict_unstructure_fn(
            Message,
            conv,
            sender=override(rename="from"),
            timestamp=override(unstruct_hook=format_timestamp),
            to=override(unstruct_hook=str),
        ),
    )
    conv.register_structure_hook(
        Message,
        make_dict_structure_fn(
            Message,
            conv,
            _cattrs_forbid_extra_keys=False,
            _cattrs_detailed_validation=True,
            sender=override(rename="from", struct_hook=_parse_uuid),
            to=override(struct_hook=parse_address),
            payload=override(struct_hook=lambda v, _: v),
            kind=override(struct_hook=_parse_kind),
            id=override(struct_hook=_parse_uuid),
            timestamp=override(struct_hook=_parse_timestamp),
            conversation_id=override(struct_hook=_parse_optional_uuid),
            reply_to=override(struct_hook=_parse_optional_uuid),
            trace_id=override(struct_hook=_parse_optional_uuid),
        ),
    )
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
