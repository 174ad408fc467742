"""Subjects, headers, KV keys and error frames: how kernels talk on NATS.

Subjects (``P`` is the cluster prefix, ``nexus`` by default):

* ``P.node.<node>.agent.<id>`` — a message for an agent on ``<node>``; every kernel
  holds one wildcard subscription ``P.node.<node>.>``, not one per agent (a
  subscription costs ~5 KB and a task in nats-py: a million agents must not pay that).
* ``P.node.<node>.reply.<query id>`` — replies to this node's requests, error frames and
  NATS "no responders" statuses, correlated by the query id in the subject.
* ``P.node.<node>.seq`` — a sequence mark: the last number the sender gave a tell to
  ``<node>`` (the body is that :func:`sequence_value`). Tells carry their own number in
  their body (format 2 below), so the receiving node counts the ones NATS lost. The
  numbers count per *stream*, one sending process (one join of a node) to one
  destination process: ``<node>:<session>.<id prefix>``, the sender's node name with its
  join's session and the id prefix of its process (hex numbers), so that a node that
  joins again, or another process under the same name, starts a stream of its own.
* ``P.node.<node>.batch`` — a node batch from another nexus_trio kernel: many tells
  (and cancel / credit frames) for agents of ``<node>`` in one binary message (``_batch``);
  a tell there is binary too (:func:`encode_tell`: the ids as 16 bytes, not JSON digits).
* ``P.type.<type>`` — a queue group: any one replica of an agent type takes the message.
* ``P.durable.<node>.<id>`` — JetStream (at-least-once) messages for agents on ``<node>``.

The body of a message is compact JSON written by :func:`encode_message`: an array
``[1, id, timestamp_us, from, to, kind, conversation_id, reply_to, trace_id, payload]``
with UUIDs as 128-bit integers (``to`` is an integer for an id, a string for a name);
format 2, ``[2, sequence, id, ...]``, adds a tell's sequence number (a string,
``<node>:<session>.<id prefix>.<destination id prefix>.<number>``, read from the raw
bytes before decoding: not a header, which would halve nats-py's rate).
It carries exactly the fields of the kernel's JSON wire form but costs a fraction of it
(no RFC 3339 formatting, no UUID text) on the path every message takes. A body that is
a JSON *object* is read as the kernel's standard wire form (:meth:`Message.to_json`),
so any NATS client can publish to an agent subject. An error frame has the header
``Nexus-Error`` naming the failure and a JSON body with the details; the requesting node
turns it into the exception a local request would raise.

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

import base64
import json
import marshal
import re
import struct
import uuid
from collections.abc import Callable
from typing import Any, Final

from .._agent import check_agent_name
from .._deadletter import DeadLetterReason
from .._errors import (
    SHUTDOWN_PHASES,
    AgentNotFound,
    KernelShuttingDown,
    MailboxFull,
    MessageDecodeError,
    MessageFailed,
    NexusError,
    RequestFailed,
    error_repr,
)
from .._message import (
    ID_LIMIT,
    JSON_SCALARS,
    LONE_SURROGATE,
    Address,
    Message,
    MessageKind,
    check_json,
    id_value,
    restore_message,
    row_ids,
    stored_fields,
    unicode_text,
    utf8_text,
    uuid_from_int,
)

#: what the message codecs raise for what their form cannot carry: a payload that is not
#: JSON (TypeError), a lone surrogate or, for the JSON form, a time outside the years 1 to
#: 9999 (ValueError), a payload nested deeper than the encoder recurses (RecursionError)
UNENCODABLE: Final = (TypeError, ValueError, RecursionError)

#: the JetStream API prefix of every JetStream request of a node (nats-py's, through the
#: contexts the cluster makes with it, and the durable path's raw ones): the account's
#: own API, no JetStream domain (``$JS.<domain>.API``) and no prefix of an imported API;
#: a cluster has no option for either (see docs/distributed.md, "the JetStream API")
JS_API: Final = "$JS.API"

NODE_HEADER: Final = "Nexus-Node"
ERROR_HEADER: Final = "Nexus-Error"
#: on an error frame a node passes on to the requester of a query that one of its
#: handlers sent on to another node (a router agent): the relaying node (the node that
#: made the frame stays in ``NODE_HEADER``)
RELAYED_HEADER: Final = "Nexus-Relayed"
MSG_ID_HEADER: Final = "Nats-Msg-Id"
#: on a node's last leave notice (an empty heartbeat sent once its data connection is
#: closed): its id prefix, session and the last number it took of each sender's stream
LEFT_HEADER: Final = "Nexus-Left"
#: on a node's leave announcement (an empty heartbeat, sent as the leave begins): the
#: session of the join that leaves, 16 hex digits (a node of an earlier version sends
#: none, and one ignores it: the announcement then ends any join of the node name)
SESSION_HEADER: Final = "Nexus-Session"
TYPE_PREFIX: Final = "type:"

_TOKEN: Final = re.compile(r"[A-Za-z0-9_-]+")
#: the longest node name: a receiver publishes on subjects that hold a sender's name (its
#: credit, see ``_batch``), and NATS refuses a subject past its control line (4 KiB by
#: default) by closing the publisher's connection
NODE_NAME_MAX: Final = 255
_NODE_NAME: Final = re.compile(rf"[A-Za-z0-9_-]{{1,{NODE_NAME_MAX}}}")
_PLAIN_KEY: Final = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")


# --- the message codec --------------------------------------------------------------------

_FORMAT: Final = 1
#: format 2 is format 1 with a sequence number (a string) after the format number
_NUMBERED_FORMAT: Final = 2
#: how a numbered body starts: what a receiver checks before anything else
NUMBERED_PREFIX: Final = b'[2,"'
_KINDS: Final = {kind.value: kind for kind in MessageKind}

_std_dumps: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_std_loads: Final = json.JSONDecoder().decode
_dumps: Callable[[Any], bytes]
_loads: Callable[[bytes | memoryview], Any]
_FAST_DECODE_ERROR: type[Exception]
try:
    # msgspec's JSON codec writes the same compact JSON values as the standard library's
    # (a float may be spelled differently, 1e16 for 1e+16: tested) at a fraction of the
    # cost: ~1 us instead of ~7 us to read a message, the largest cost per message on
    # the NATS path. Where they differ (a non-finite float: msgspec writes null, the
    # standard library Infinity or NaN, which msgspec does not read) the standard
    # library is used: see below.
    import msgspec
except ImportError:  # pragma: no cover - the ``nats`` extra installs it

    def _dumps(obj: Any) -> bytes:
        return _std_dumps(obj).encode()

    def _loads(data: bytes | memoryview) -> Any:
        return _std_loads(str(data, "utf-8"))  # (a view too: see decode_block)

    _FAST_DECODE_ERROR = ValueError
else:
    _dumps = msgspec.json.Encoder().encode
    _loads = msgspec.json.Decoder().decode
    _FAST_DECODE_ERROR = msgspec.DecodeError


def _read_json(data: bytes | memoryview, field: str = "<document>", start: int = 0) -> Any:
    try:
        return _loads(data)
    except _FAST_DECODE_ERROR:
        if data.__class__ is not bytes:
            data = bytes(data)  # (a block's view, see decode_block)
        # Not strict JSON for msgspec: maybe Infinity/NaN (see encode_message), which the
        # standard library reads; anything else fails there too, with its own message,
        # but for a lone surrogate ("\ud800"), which it reads into a string that is not
        # Unicode text: no encoder here could write it again (UnicodeEncodeError). Bytes
        # that are not UTF-8 (msgspec refuses them too) are a MessageDecodeError for
        # ``field``, ``start`` bytes into the body, and a byte order mark is not JSON.
        obj = json.loads(utf8_text(data, field, start))
        if not unicode_text(obj):
            raise ValueError(LONE_SURROGATE) from None
        return obj


def wire_text(data: bytes, what: str) -> str:
    """``data``, a control-plane body off the wire (a membership record, a names bucket
    entry, a place request or answer, an error frame's body), as the UTF-8 text the wire
    says it is; else a :class:`MessageDecodeError` for ``what`` saying ``not UTF-8 (...
    at byte N)``, as the data path says it (``json.loads`` of bytes would guess UTF-16 or
    UTF-32 and skip a byte order mark), or that it starts with a byte order mark."""
    text = utf8_text(data, what)
    if text[:1] == "\ufeff":
        raise MessageDecodeError(what, "a byte order mark at byte 0 (the wire is UTF-8 without)")
    return text


def read_wire_json(data: bytes, what: str) -> Any:
    """The JSON value of a control-plane body (see :func:`wire_text`): ValueError (a
    :class:`MessageDecodeError` for ``what`` if it is not UTF-8 text) or RecursionError
    for one that is no JSON, as its readers count a malformed one."""
    return json.loads(wire_text(data, what))


def _uuid(value: int) -> uuid.UUID:
    # The range check is what matters (uuid.UUID(int=...) checks more and costs ~1 us).
    if value.__class__ is not int or not 0 <= value < ID_LIMIT:
        raise TypeError(f"expected a 128-bit integer id, got {value!r}")
    return uuid_from_int(value)


#: agent ids seen on the wire, as UUIDs: a batch carries the same few senders and
#: recipients over and over, and building a UUID costs more than a dict lookup. Bounded
#: (a peer naming ever-new ids only makes the cache start over).
_AGENT_IDS: dict[int, uuid.UUID] = {}
_AGENT_IDS_MAX: Final = 65_536


def _remember(cache: dict[Any, Any], key: Any, value: Any) -> None:
    """Keep ``value`` under ``key`` in one of the codec's caches of what the wire names
    over and over, which start over past ``_AGENT_IDS_MAX`` entries (a peer naming
    ever-new ids or names cannot grow them)."""
    if len(cache) >= _AGENT_IDS_MAX:
        cache.clear()
    cache[key] = value


def _agent_uuid(value: int) -> uuid.UUID:
    # The class check first: True and 1.0 would find the entry of 1.
    u = _AGENT_IDS.get(value) if value.__class__ is int else None
    if u is None:
        u = _uuid(value)
        _remember(_AGENT_IDS, value, u)
    return u


def _opt_uuid(value: int | None) -> uuid.UUID | None:
    return None if value is None else _uuid(value)


def unencodable_failure(what: str, exc: Exception) -> MessageFailed:
    """What the transport raises for ``what`` (a message) that ``exc`` (one of
    :data:`UNENCODABLE`) says its wire form cannot carry: the kernel dead-letters it
    (``unserialisable``), or raises the caller's error (``_errors.unsendable``); ``exc`` is
    its cause."""
    failure = MessageFailed(
        f"{what} cannot be encoded for NATS: {exc}", reason=DeadLetterReason.UNSERIALISABLE
    )
    failure.__cause__ = exc
    return failure


def encode_message(msg: Message, sequence: str | None = None) -> bytes:
    """The compact body of ``msg`` on NATS (see the module doc); with ``sequence`` (see
    :func:`sequence_value`) in format 2, which carries it right after the format number."""
    to, payload = msg.to, msg.payload
    odd_keys = False
    if payload.__class__ not in JSON_SCALARS:
        # what msgspec writes but the standard library refuses (a datetime, bytes, a set:
        # as a string or a list) would arrive as something else; a float, bool or None
        # key it writes its own way, or refuses (see check_json)
        odd_keys = check_json(payload)
    conversation_id, reply_to, trace_id = msg.conversation_id, msg.reply_to, msg.trace_id
    fields = [
        *((_FORMAT,) if sequence is None else (_NUMBERED_FORMAT, sequence)),
        id_value(msg),
        msg.timestamp,
        msg.sender.int,
        to if to.__class__ is str else to.int,  # type: ignore[union-attr]
        msg.kind.value,
        None if conversation_id is None else conversation_id.int,
        None if reply_to is None else reply_to.int,
        None if trace_id is None else trace_id.int,
        payload,
    ]
    if odd_keys:
        return _std_dumps(fields).encode()
    try:
        body = _dumps(fields)
    except TypeError:
        # msgspec refuses a subclass of str, int or float that is no Enum, which the
        # standard library writes as its base value (check_json passed it)
        return _std_dumps(fields).encode()
    # A null beyond the envelope's own may be a non-finite float that msgspec wrote as
    # null: then the standard library writes the body (``Infinity``, as it always did),
    # never a silent null. A payload with a real null pays for that check.
    nulls = (conversation_id is None) + (reply_to is None) + (trace_id is None)
    if body.count(b"null") > nulls:
        return _std_dumps(fields).encode()
    return body


def numbered_head(node: str, id_prefix: int, dest_prefix: int) -> bytes:
    """The start of every numbered body of one stream (see :func:`encode_numbered`);
    ``node`` is the sending join, ``<node>:<hex session>``, as for :func:`sequence_value`."""
    return NUMBERED_PREFIX + f"{node}.{id_prefix:x}.{dest_prefix:x}.".encode()


def encode_numbered(msg: Message, head: bytes, number: int) -> bytes:
    """What ``encode_message(msg, sequence_value(..., number))`` gives, for the stream
    whose :func:`numbered_head` is ``head``, without formatting the stream per message."""
    body = encode_message(msg)
    return b"".join((head, str(number).encode(), b'",', body[3:]))  # body[:3] == b"[1,"


def decode_message(data: bytes) -> Message:
    """Read a body written by :func:`encode_message`, or the kernel's JSON wire form.

    Raises :class:`MessageDecodeError` naming what was wrong.
    """
    if data[:1] == b"{":
        # (nested too deeply, or a lone surrogate as _read_json refuses it: a
        # MessageDecodeError too)
        return Message.from_json(data)
    try:
        obj = _read_json(data)
    except MessageDecodeError:
        raise
    except (ValueError, RecursionError) as exc:
        # RecursionError: nested deeper than the JSON readers go (a hostile body)
        raise MessageDecodeError("<document>", f"not JSON: {exc}") from None
    # (the format number an integer: true and 1.0 equal 1 in Python, not on the wire)
    if (
        obj.__class__ is list
        and len(obj) == 11
        and obj[0].__class__ is int
        and obj[0] == _NUMBERED_FORMAT
        and obj[1].__class__ is str
    ):
        obj = obj[1:]  # the sequence number was read from the raw bytes (NUMBERED_PREFIX)
    elif (
        obj.__class__ is not list
        or len(obj) != 10
        or obj[0].__class__ is not int
        or obj[0] != _FORMAT
    ):
        raise MessageDecodeError(
            "<document>",
            "expected a nexus message array (format 1, or 2 with a sequence string)"
            " or a JSON object",
        )
    field = "id"
    try:
        msg_id = _uuid(obj[1])
        field = "timestamp"
        timestamp = obj[2]
        if timestamp.__class__ is not int:
            raise TypeError(f"expected integer microseconds, got {timestamp!r}")
        field = "from"
        sender = _uuid(obj[3])
        field = "to"
        to = obj[4]
        if to.__class__ is not str:
            to = _uuid(to)
        elif not to:
            raise TypeError("empty agent name")
        field = "kind"
        kind = _KINDS.get(obj[5])
        if kind is None:
            raise ValueError(f"unknown kind {obj[5]!r}")
        field = "conversation_id"
        conversation_id = _opt_uuid(obj[6])
        field = "reply_to"
        reply_to = _opt_uuid(obj[7])
        field = "trace_id"
        trace_id = _opt_uuid(obj[8])
    except (TypeError, ValueError) as exc:
        raise MessageDecodeError(field, str(exc), obj) from None
    return Message(
        sender=sender,
        to=to,
        payload=obj[9],
        kind=kind,
        id=msg_id,
        timestamp=timestamp,
        conversation_id=conversation_id,
        reply_to=reply_to,
        trace_id=trace_id,
    )


def _decode_json_tell(data: bytes) -> Message:
    """:func:`decode_message` for a body in format 1 (a tell in a node batch of the
    version before, or one :func:`encode_tell` could not write in binary): the checks in
    one pass, and on any doubt the full decoder, whose :class:`MessageDecodeError` names
    the bad field."""
    try:
        obj = _loads(data)
        if (
            obj.__class__ is list
            and len(obj) == 10
            and obj[0] == _FORMAT
            and obj[0].__class__ is int
        ):
            _, msg_id, timestamp, sender, to, kind, conversation_id, reply_to, trace_id, payload = (
                obj
            )
            if (
                timestamp.__class__ is int
                and msg_id.__class__ is int
                and (to.__class__ is not str or to)
            ):
                # positional: Message(sender, to, payload, kind, id, timestamp,
                # conversation_id, reply_to, trace_id), cheaper than keywords. The id
                # goes in as its 128-bit value (Message checks the range): its UUID is
                # built only if someone reads msg.id.
                return Message(
                    _agent_uuid(sender),
                    to if to.__class__ is str else _agent_uuid(to),
                    payload,
                    _KINDS[kind],
                    msg_id,
                    timestamp,
                    None if conversation_id is None else _uuid(conversation_id),
                    None if reply_to is None else _uuid(reply_to),
                    None if trace_id is None else _uuid(trace_id),
                )
    except (ValueError, TypeError, KeyError, RecursionError, _FAST_DECODE_ERROR):
        pass
    return decode_message(data)


# --- the binary tell (a frame body in a node batch) --------------------------------------
#
# A tell between two nexus_trio kernels needs no JSON envelope: writing a 128-bit id as
# 39 decimal digits and reading it back cost more than the rest of the message (~1.7 us
# of a 2.7 us encode here). Big-endian:
#
#   tag u8 (0x80 | flags) | kind u8 | timestamp_us i64 | id 16 | from 16
#   | to: 16 id bytes, or (flag TO_NAME) name length u16 + UTF-8 name
#   | conversation_id 16 (flag) | reply_to 16 (flag) | trace_id 16 (flag) | payload JSON
#
# The tag's high bit tells it from a body in JSON (which starts with "[" or "{"), so a
# frame may also hold format 1 (what encode_tell falls back to for a timestamp outside
# 64 bits or a name past 64 KiB, and all that a batch "NXB1" holds) and decode_tell
# reads both.

_TELL_HEAD: Final = struct.Struct(">BBq16s16s")
_NAME_LEN: Final = struct.Struct(">H")
_BINARY: Final = 0x80
_TO_NAME: Final = 0x01
_CONVERSATION: Final = 0x02
_REPLY_TO: Final = 0x04
_TRACE: Final = 0x08
_FLAGS: Final = _TO_NAME | _CONVERSATION | _REPLY_TO | _TRACE
_KIND_LIST: Final = tuple(MessageKind)
_from_bytes = int.from_bytes


def _payload_json(payload: Any) -> bytes:
    """The JSON of a tell's payload that :func:`encode_tell` did not write at once (not
    a scalar of the built-in classes, not a :func:`_flat` container): a container that
    reads back equal as msgspec wrote it, the rest checked for what the standard library
    refuses and written as ``json.dumps`` writes it."""
    cls = payload.__class__
    if cls is dict or cls is list:
        body = _read_back(payload)
        if body is not None:
            return body
    # what msgspec writes but the standard library refuses, and keys it writes its own
    # way (see encode_message)
    if cls is not float and check_json(payload):
        return _std_dumps(payload).encode()
    try:
        body = _dumps(payload)
    except TypeError:
        return _std_dumps(payload).encode()  # a subclass of str, int or float (see above)
    # msgspec writes a non-finite float as null: a payload that may hold a float and
    # holds a null goes through the standard library, which writes Infinity/NaN (and the
    # same JSON otherwise). Checked by class first: a search costs more than the encode.
    if _has_null(body):
        return _std_dumps(payload).encode()
    return body


def _read_back(payload: dict[Any, Any] | list[Any]) -> bytes | None:
    """msgspec's JSON of container ``payload`` if reading it back gives a value equal to
    ``payload``; None, for the checked way (check_json and its fallbacks), if not, or if
    msgspec refuses it.

    Equal read back means the JSON holds only what ``json.dumps`` would write for it:
    everything msgspec writes but the standard library refuses (a datetime, bytes, a
    set, a UUID, a Decimal, a plain Enum, a dataclass) reads back as a str, list or
    dict, which is not equal to it; a non-finite float reads back as None (msgspec
    writes null), a float, bool or None key as a str; a tuple as a list (those go the
    checked way, as does a dict with int keys). Both run in C: for bench_nats's payload
    the JSON costs 7,800 instructions so against 11,400 walked first (callgrind), and a
    container is what most tells carry. Only a payload of the built-in classes
    themselves is read back (marshal refuses any other, about 4,500 instructions of
    encode_tell's 20,800 for that payload): equality is otherwise the payload's to say.
    """
    try:
        # A class of its own may call itself equal to what msgspec wrote of it (an Enum
        # equal to its value, a dataclass to a dict), which json.dumps refuses; marshal
        # takes none but the built-in classes themselves (no subclass either), in C.
        _exact(payload, 2)
        body = _dumps(payload)
        same = _loads(body) == payload
    except Exception:  # anything msgspec refuses: the checked way says what it was
        return None
    return body if same else None


_exact: Final = marshal.dumps
#: the longest container :func:`_flat` looks through (each of its lists and dicts too):
#: it bounds the walk in Python wasted on one that turns out not flat before the read-back
_FLAT_MAX: Final = 16


def _flat(payload: dict[Any, Any] | list[Any]) -> bool:
    """Whether container ``payload`` (a dict or a list, the classes themselves) holds
    only ``int``, ``str``, ``bool``, ``None`` and finite ``float`` (the classes
    themselves), under ``str`` keys if a dict: msgspec writes such a value so that it
    reads back equal (a finite float in its shortest round-trip spelling, which may
    differ from ``json.dumps``'s text, ``1e16`` for ``1e+16``, as the read-back path
    also sends it), so the read-back need not prove it (a lone surrogate in a string
    raises the same UnicodeEncodeError either way; a non-finite float, which msgspec
    would write as null, is no such value). A payload's containers one level down
    (:func:`encode_stored_tell` walks the payload itself); a loop each, not all() over a
    generator, which costs three times more."""
    if len(payload) > _FLAT_MAX:
        return False
    scalars = _NO_FLOAT
    if payload.__class__ is dict:
        for key, value in payload.items():
            if key.__class__ is not str:
                return False
            cls = value.__class__
            if cls not in scalars and not (cls is float and value - value == 0.0):
                return False
        return True
    for item in payload:
        cls = item.__class__
        if cls not in scalars and not (cls is float and item - item == 0.0):
            return False
    return True


_NO_FLOAT: Final = frozenset((int, str, bool, type(None)))
_has_null: Final = re.compile(rb"null").search
_COMMAND_KIND: Final = MessageKind.COMMAND


#: what a binary tell to a name carries for it (length and UTF-8), by name: a sender
#: names the same agents over and over (bounded like _AGENT_IDS, and see NAME_CACHE_BYTES)
_NAMED: dict[str, bytes] = {}
#: the longest name (UTF-8 bytes) the codec's name caches keep: a name may be 64 KiB, and
#: 65,536 of those would be gigabytes (a peer sending ever-new long names would grow the
#: decoder's cache so); longer names are encoded and decoded each time
NAME_CACHE_BYTES: Final = 256


def name_entry(name: str) -> bytes | None:
    """A name as a binary tell (and a columnar block's table of addresses) carries it:
    its length in UTF-8 bytes (u16), then those bytes; None for a name past 64 KiB.
    UnicodeEncodeError (one of :data:`UNENCODABLE`) for a name no UTF-8 can carry."""
    entry = _NAMED.get(name)
    if entry is None:
        raw = name.encode()
        if len(raw) > 0xFFFF:
            return None
        entry = _NAME_LEN.pack(len(raw)) + raw
        if len(raw) <= NAME_CACHE_BYTES:
            _remember(_NAMED, name, entry)
    return entry


def encode_tell(msg: Message) -> bytes:
    """The binary body of a tell in a node batch (see above)."""
    return encode_stored_tell(msg, stored_fields(msg))


def encode_stored_tell(msg: Message, fields: tuple[Any, ...]) -> bytes:
    """:func:`encode_tell` of ``msg`` whose :func:`stored_fields` are ``fields``: the
    sending node reads them once for a tell (where it leads, then its bytes)."""
    sender, to, payload, kind, msg_id, ns, conversation_id, reply_to, trace_id, _ = fields
    tag = _BINARY
    if isinstance(to, str):
        tag |= _TO_NAME
        to_bytes = _NAMED.get(to) or name_entry(to)
        if to_bytes is None:
            return encode_message(msg)  # a name past 64 KiB: format 1 has no limit
    else:
        to_bytes = to.int.to_bytes(16)
    optional = b""
    if conversation_id is not None or reply_to is not None or trace_id is not None:
        tag, optional = _optional_ids(tag, conversation_id, reply_to, trace_id)
    try:
        head = _TELL_HEAD.pack(
            tag,
            0 if kind is _COMMAND_KIND else _KIND_LIST.index(kind),
            ns // 1000,
            (msg_id if msg_id.__class__ is int else id_value(msg)).to_bytes(16),
            sender.int.to_bytes(16),
        )
    except struct.error:
        # a timestamp outside 64 bits: format 1 carries any integer
        return encode_message(msg)
    return b"".join((head, to_bytes, optional, tell_payload_json(payload)))


def tell_payload_json(payload: Any) -> bytes:
    """The JSON of a tell's payload as a node batch carries it (a binary tell's, a row's
    of a columnar block: see ``_batch``); raises one of :data:`UNENCODABLE` for a
    payload JSON has no type for."""
    # Its common kinds written here, the rest by _payload_json (the read-back of a
    # container, the checked way). A container is written at once if it is flat (see _flat) or holds flat containers
    # (``{"n": 0, "args": [1, 2]}``): that walk is written out here, not a call of
    # _flat (the call was 470 of the 6,090 instructions of bench_nats's payload, 1.4% of
    # a tell sent to another kernel; docs/distributed.md, fortieth pass), and a dict's
    # list is walked in place (the common nested value).
    # (forty-sixth pass: each flat kind returns its JSON where its walk ends, no flag
    # tested after it, and a dict's list tested before a float, the commoner value:
    # 377 instructions of 8,194 a call fewer for bench_nats's payload, cachegrind)
    cls = payload.__class__
    if cls is dict:  # (first: most tells carry a dict)
        if len(payload) <= _FLAT_MAX:
            scalars = _NO_FLOAT
            for key, value in payload.items():
                if key.__class__ is not str:
                    break
                cls = value.__class__
                if cls in scalars:
                    continue
                if cls is list:
                    if len(value) > _FLAT_MAX:
                        break
                    for item in value:
                        if item.__class__ not in scalars and not (
                            item.__class__ is float and item - item == 0.0
                        ):
                            break
                    else:
                        continue
                    break
                if cls is float:
                    if value - value == 0.0:  # finite: inf - inf and nan - nan are nan
                        continue
                    break
                if not (cls is dict and _flat(value)):
                    break
            else:
                return _dumps(payload)
    elif cls in _NO_FLOAT:
        return _dumps(payload)
    elif cls is list and len(payload) <= _FLAT_MAX:
        scalars = _NO_FLOAT
        for item in payload:
            cls = item.__class__
            if cls in scalars or (cls is float and item - item == 0.0):
                continue
            if not ((cls is list or cls is dict) and _flat(item)):
                break
        else:
            return _dumps(payload)
    return _payload_json(payload)


def _optional_ids(
    tag: int,
    conversation_id: uuid.UUID | None,
    reply_to: uuid.UUID | None,
    trace_id: uuid.UUID | None,
) -> tuple[int, bytes]:
    """The tag with the flags of a tell's optional ids, and their bytes (in the order
    of the layout above); apart from encode_tell, since most tells carry none."""
    parts = []
    if conversation_id is not None:
        tag |= _CONVERSATION
        parts.append(conversation_id.int.to_bytes(16))
    if reply_to is not None:
        tag |= _REPLY_TO
        parts.append(reply_to.int.to_bytes(16))
    if trace_id is not None:
        tag |= _TRACE
        parts.append(trace_id.int.to_bytes(16))
    return tag, b"".join(parts)


#: the head of the common tell (no flags: to an agent id, no conversation, reply or trace)
_PLAIN_TELL: Final = struct.Struct(">BBq16s16s16s")
#: the head of a tell to a name (no other flags), up to the name's length
_NAMED_TELL: Final = struct.Struct(">BBq16s16sH")
_PLAIN_SIZE: Final = _PLAIN_TELL.size
_NAMED_SIZE: Final = _NAMED_TELL.size
_unpack_plain: Final = _PLAIN_TELL.unpack_from
_unpack_named: Final = _NAMED_TELL.unpack_from
_BINARY_TO_NAME: Final = _BINARY | _TO_NAME
_KIND_COUNT: Final = len(_KIND_LIST)
#: agent names seen in binary tells, by their UTF-8 bytes (filled by the long way, which
#: checks them; bounded like _AGENT_IDS)
_NAMES: dict[bytes, str] = {}


def _tell_payload(data: bytes, offset: int) -> Any:
    try:
        return _read_json(data[offset:], "payload", offset)
    except MessageDecodeError:
        raise
    except (ValueError, RecursionError) as exc:
        raise MessageDecodeError("payload", str(exc)) from None


#: agent ids seen in binary tells, by their 16 bytes (see _AGENT_IDS)
_AGENT_BYTES: dict[bytes, uuid.UUID] = {}


def _agent_from_bytes(raw: bytes) -> uuid.UUID:
    u = _AGENT_BYTES.get(raw)
    if u is None:
        u = uuid_from_int(_from_bytes(raw))
        _remember(_AGENT_BYTES, raw, u)
    return u


def decode_tell(data: bytes) -> Message:
    """The message of a tell's body in a node batch: binary (:func:`encode_tell`) or,
    starting with a byte below ``0x80``, format 1 JSON (:func:`_decode_json_tell`).
    :class:`MessageDecodeError` names the bad field."""
    # The two common cases (to an id, to a name; no optional ids) in one unpack each;
    # anything else, or any doubt, goes the long way, which names the bad field. (The
    # sizes and the like are module constants: an attribute read per tell adds up. The
    # binary reader is this function itself, not a call away from a dispatcher: a
    # Python call per tell is about 1,000 instructions, docs/distributed.md,
    # thirty-fifth pass.)
    tag = data[0] if data else 0
    size = len(data)
    to: Address | None = None
    if tag == _BINARY and size >= _PLAIN_SIZE:
        _, kind_code, timestamp, msg_id, sender, to_id = _unpack_plain(data)
        to = _AGENT_BYTES.get(to_id) or _agent_from_bytes(to_id)
        start = _PLAIN_SIZE
    elif tag == _BINARY_TO_NAME and size >= _NAMED_SIZE:
        _, kind_code, timestamp, msg_id, sender, length = _unpack_named(data)
        start = _NAMED_SIZE + length
        if length and start <= size:
            to = _NAMES.get(data[_NAMED_SIZE:start])
    if to is not None and kind_code < _KIND_COUNT:
        try:
            payload = _loads(data[start:])
        except (_FAST_DECODE_ERROR, RecursionError):
            # the standard library's reading (Infinity, NaN), or the error naming it
            payload = _tell_payload(data, start)
        return restore_message(
            _AGENT_BYTES.get(sender) or _agent_from_bytes(sender),
            to,
            payload,
            _KIND_LIST[kind_code],
            _from_bytes(msg_id),
            timestamp,
            None,
            None,
            None,
        )
    if tag < _BINARY:
        return _decode_json_tell(data)
    field = "<document>"
    try:
        if size < _TELL_HEAD.size:
            raise ValueError(f"a binary tell of {size} bytes (at least {_TELL_HEAD.size})")
        tag, kind_code, timestamp, msg_id, sender = _TELL_HEAD.unpack_from(data)
        if tag & ~(_BINARY | _FLAGS):
            raise ValueError(f"unknown flags in tag {tag:#04x}")
        field = "kind"
        if kind_code >= len(_KIND_LIST):
            raise ValueError(f"unknown kind code {kind_code}")
        field = "to"
        offset = _TELL_HEAD.size
        address: Address
        if tag & _TO_NAME:
            (length,) = _NAME_LEN.unpack_from(data, offset)
            end = offset + 2 + length
            if not length or end > size:
                raise ValueError(f"a name of {length} bytes does not fit")
            raw = data[offset + 2 : end]
            address = utf8_text(raw, field, offset + 2)
            if length <= NAME_CACHE_BYTES:
                _remember(_NAMES, raw, address)
        else:
            end = offset + 16
            if end > size:
                raise ValueError("truncated id")
            address = _agent_from_bytes(data[offset:end])
        offset = end
        ids: list[uuid.UUID | None] = [None, None, None]
        if tag & _OPTIONAL_IDS:
            for index, (flag, name) in enumerate(_OPTIONAL_ID_FIELDS):
                if tag & flag:
                    field = name
                    end = offset + 16
                    if end > size:
                        raise ValueError("truncated id")
                    ids[index] = uuid_from_int(_from_bytes(data[offset:end]))
                    offset = end
    except MessageDecodeError:
        raise
    except (ValueError, struct.error) as exc:
        raise MessageDecodeError(field, str(exc)) from None
    return restore_message(
        _agent_from_bytes(sender),
        address,
        _tell_payload(data, offset),
        _KIND_LIST[kind_code],
        _from_bytes(msg_id),
        timestamp,
        ids[0],
        ids[1],
        ids[2],
    )


def decode_tells(
    bodies: list[bytes], undecodable: Callable[[MessageDecodeError], object]
) -> list[Message]:
    """The messages of a batch's tell ``bodies``, in order: :func:`decode_tell` of
    each, the body that raises :class:`MessageDecodeError` handed to ``undecodable``
    (in its place in the order) and left out. The common tell (binary, to an id or a
    name seen before, no optional ids, its payload read at once) is read here, in the
    loop: a Python call a tell fewer, about 1,000 instructions (docs/distributed.md,
    thirty-sixth pass); anything else goes through decode_tell, which reads it the same."""
    msgs: list[Message] = []
    add = msgs.append
    for data in bodies:
        tag = data[0] if data else 0
        size = len(data)
        to: Address | None = None
        if tag == _BINARY and size >= _PLAIN_SIZE:
            _, kind_code, timestamp, msg_id, sender, to_id = _unpack_plain(data)
            to = _AGENT_BYTES.get(to_id)
            start = _PLAIN_SIZE
        elif tag == _BINARY_TO_NAME and size >= _NAMED_SIZE:
            _, kind_code, timestamp, msg_id, sender, length = _unpack_named(data)
            start = _NAMED_SIZE + length
            if length and start <= size:
                to = _NAMES.get(data[_NAMED_SIZE:start])
        if to is not None and kind_code < _KIND_COUNT:
            try:
                payload = _loads(data[start:])
            except (_FAST_DECODE_ERROR, RecursionError):
                pass  # decode_tell's reading (Infinity, NaN), or the error naming it
            else:
                add(
                    restore_message(
                        _AGENT_BYTES.get(sender) or _agent_from_bytes(sender),
                        to,
                        payload,
                        _KIND_LIST[kind_code],
                        _from_bytes(msg_id),
                        timestamp,
                        None,
                        None,
                        None,
                    )
                )
                continue
        try:
            add(decode_tell(data))
        except MessageDecodeError as exc:
            undecodable(exc)
    return msgs


# --- columnar blocks (NXB3's ROWS frames, see _batch) -----------------------------------------

#: a block's head: how many rows, how many addresses in its table
_BLOCK_HEAD: Final = struct.Struct(">IH")
#: a row: kind code, time (microseconds), id, sender, index of its address in the table
_ROW: Final = struct.Struct(">Bq16s16sH")
ROW_SIZE: Final = _ROW.size
BLOCK_HEAD_SIZE: Final = _BLOCK_HEAD.size
#: a table entry of an agent id: a name length of 0, then the id's 16 bytes
_ID_ENTRY: Final = b"\x00\x00"


def table_entry(to: Address) -> bytes | None:
    """Address ``to`` as a block's table holds it: a name as a binary tell carries it
    (:func:`name_entry`: None past 64 KiB), an agent id as two zero bytes and its 16."""
    if isinstance(to, str):
        return _NAMED.get(to) or name_entry(to)
    return _ID_ENTRY + to.int.to_bytes(16)


def encode_block(
    rows: list[tuple[tuple[Any, ...], int]], entries: list[bytes], jsons: list[bytes]
) -> bytes:
    """The body of a block of common tells (no optional ids; see ``_batch``): ``rows``
    as ``(stored_fields, index of the address in entries)`` (or ``row_fields``, whose
    ids are drawn here, the block's at once: :func:`row_ids`), the table ``entries``
    (:func:`table_entry`), the payloads' JSON ``jsons`` (:func:`tell_payload_json`, one
    a row), all packed here, in one comprehension and three joins::

        block = rows u32 | addresses u16 | row* | entry* | "[" payload ("," payload)* "]"
        row   = kind u8 | time us i64 | id 16 | sender 16 | address index u16
        entry = name length u16 | name (UTF-8), or 0 u16 | agent id 16
    """
    pack = _ROW.pack
    command = _COMMAND_KIND
    kinds = _KIND_LIST
    # the sender's 16 bytes are those of the row before when it is the same sender (a
    # block is mostly one sender's: an agent's burst, or the kernel's): a test where a
    # 128-bit to_bytes was about 450 instructions a row
    sender: Any = None
    sender_bytes = b""
    packed = [
        pack(
            # (not a dict of the kinds: an Enum member hashes in Python)
            0 if f[3] is command else kinds.index(f[3]),
            f[5] // 1000,
            (value if value.__class__ is int else value.int).to_bytes(16),
            sender_bytes if f[0] is sender else (sender_bytes := (sender := f[0]).int.to_bytes(16)),
            index,
        )
        for (f, index), value in zip(rows, row_ids(rows), strict=True)
    ]
    return b"".join(
        (
            _BLOCK_HEAD.pack(len(rows), len(entries)),
            b"".join(packed),
            b"".join(entries),
            b"[",
            b",".join(jsons),
            b"]",
        )
    )


class BlockError(ValueError):
    """A block that does not check (:func:`decode_block`), and ``rows``: the rows its
    head counts if its bytes could hold that many rows (at least one), else 0: a hostile
    or truncated block's count is not taken on its word alone."""

    rows: int = 0


def decode_block(data: bytes, start: int, end: int) -> list[Message]:
    """The messages of the block ``data[start:end]`` (:func:`encode_block`), in order;
    checked whole before any is made (rows against the count, the table's entries
    against the bytes, the address indexes against the table, the payloads against the
    rows): :class:`BlockError` saying what is wrong (with the rows its head counts once
    its bytes could hold them), no message of it used."""
    if end - start < BLOCK_HEAD_SIZE:
        raise BlockError(f"a block of {end - start} bytes (at least {BLOCK_HEAD_SIZE})")
    count, entries = _BLOCK_HEAD.unpack_from(data, start)
    rows_at = start + BLOCK_HEAD_SIZE
    offset = rows_at + count * ROW_SIZE
    if count < 1 or offset > end:
        raise BlockError(f"{count} rows of {ROW_SIZE} bytes in its {end - rows_at} bytes")
    try:  # (a try costs nothing on 3.11 until it catches)
        if not 1 <= entries <= count:
            raise ValueError(f"{entries} addresses for {count} rows")
        names: list[Address] = []
        for entry in range(entries):
            if offset + 2 > end:
                raise ValueError(f"address {entry} of {entries}: truncated")
            (length,) = _NAME_LEN.unpack_from(data, offset)
            offset += 2
            if offset + (length or 16) > end:
                raise ValueError(f"address {entry} of {entries}: {length or 16} bytes do not fit")
            if length:
                raw = data[offset : offset + length]
                name = _NAMES.get(raw)
                if name is None:
                    name = utf8_text(raw, f"address {entry}", offset - start)
                    if length <= NAME_CACHE_BYTES:
                        _remember(_NAMES, raw, name)
                names.append(name)
                offset += length
            else:
                names.append(_agent_from_bytes(data[offset : offset + 16]))
                offset += 16
        # the payloads read in place (a view, not a copy of half the block): the decoder
        # holds it for the call only, and what it makes (strings, numbers) are new
        # objects. (Not the rows: an iter_unpack of a view, caught in a traceback's
        # cycle by a row's IndexError, is a view with an export that the garbage
        # collector fails to clear, a segfault on 3.11; fiftieth pass.)
        try:
            payloads = _read_json(memoryview(data)[offset:end], "payloads", offset - start)
        except RecursionError:
            raise ValueError("its payloads are nested too deeply") from None
        except ValueError as exc:
            raise ValueError(f"its payloads are no JSON ({exc})") from None
        if payloads.__class__ is not list or len(payloads) != count:
            raise ValueError(
                f"its payloads are a JSON {type(payloads).__name__}"
                f" of {len(payloads) if isinstance(payloads, list) else 1}, not an array of {count}"
            )
        known = _AGENT_BYTES.get
        agent = _agent_from_bytes
        kinds = _KIND_LIST
        try:
            return [
                restore_message(
                    known(sender) or agent(sender),
                    names[to],
                    payload,
                    kinds[kind],
                    _from_bytes(msg_id),
                    us,
                    None,
                    None,
                    None,
                )
                for (kind, us, msg_id, sender, to), payload in zip(
                    _ROW.iter_unpack(data[rows_at : rows_at + count * ROW_SIZE]),
                    payloads,
                    strict=True,
                )
            ]
        except IndexError:
            # (both unsigned: only past the end) said row by row, once, for the log
            for row, (kind, _, _, _, to) in enumerate(
                _ROW.iter_unpack(data[rows_at : rows_at + count * ROW_SIZE])
            ):
                if to >= entries or kind >= _KIND_COUNT:
                    raise ValueError(
                        f"row {row}: address {to} of {entries}, kind code {kind} of {_KIND_COUNT}"
                    ) from None
            raise

    except ValueError as exc:
        # (the rows its head counts, checked above: what the block stands for)
        error = BlockError(str(exc))
        error.rows = count
        raise error from None


_OPTIONAL_IDS: Final = _CONVERSATION | _REPLY_TO | _TRACE
_OPTIONAL_ID_FIELDS: Final = (
    (_CONVERSATION, "conversation_id"),
    (_REPLY_TO, "reply_to"),
    (_TRACE, "trace_id"),
)

# --- subjects -------------------------------------------------------------------------------


def check_token(what: str, value: str) -> str:
    """``value`` as one subject token; ValueError naming ``what`` otherwise."""
    if not isinstance(value, str) or not _TOKEN.fullmatch(value):
        raise ValueError(
            f"{what} {value!r} must be letters, digits, '-' or '_' (it is part of NATS subjects)"
        )
    return value


def is_token(value: str) -> bool:
    """Whether ``value`` (a str) is one subject token (see :func:`check_token`)."""
    return _TOKEN.fullmatch(value) is not None


#: the longest agent type name: a node's membership record names its types, and a type's
#: queue group is a subject (twice in its SUB line) that NATS refuses past its control
#: line (4 KiB by default) by closing the connection, for good in nats-py
TYPE_NAME_MAX: Final = 256


def is_type_name(value: str) -> bool:
    """Whether ``value`` (a str) is an agent type name: a subject token of at most
    :data:`TYPE_NAME_MAX` characters."""
    return len(value) <= TYPE_NAME_MAX and _TOKEN.fullmatch(value) is not None


def check_type_name(value: str) -> str:
    """``value`` as an agent type name (see :func:`is_type_name`); ValueError naming it
    otherwise."""
    check_token("agent type", value)
    if len(value) > TYPE_NAME_MAX:
        raise ValueError(
            f"agent type {value[:40]!r}... is {len(value)} characters long (at most"
            f" {TYPE_NAME_MAX}, as cluster.register_type takes one: it is part of NATS"
            " subjects, which NATS refuses past its control line by closing the connection)"
        )
    return value


def check_node_name(value: str) -> str:
    """``value`` as a node name (one subject token of at most :data:`NODE_NAME_MAX`
    characters); ValueError naming it otherwise."""
    check_token("node name", value)
    if len(value) > NODE_NAME_MAX:
        raise ValueError(
            f"node name {value[:40]!r}... is {len(value)} characters long (at most {NODE_NAME_MAX})"
        )
    return value


def is_node_name(value: str) -> bool:
    """Whether ``value`` (a name a peer sent: a batch head's) is a node name."""
    return _NODE_NAME.fullmatch(value) is not None


def type_address(type_name: str) -> str:
    """The address of "any replica of agent type ``type_name``" (a NATS queue group).

    ``await kernel.send(type_address("worker"), job)`` reaches exactly one agent that
    some node registered with :meth:`Cluster.serve_type`.
    """
    return TYPE_PREFIX + check_type_name(type_name)


def node_wildcard(prefix: str, node: str) -> str:
    return f"{prefix}.node.{node}.>"


def agent_subject(prefix: str, node: str, agent_id: uuid.UUID) -> str:
    return f"{prefix}.node.{node}.agent.{agent_id}"


def reply_subject(prefix: str, node: str, query_id: uuid.UUID) -> str:
    return f"{prefix}.node.{node}.reply.{query_id}"


def batch_subject(prefix: str, node: str, session: int | None = None) -> str:
    """Where node batches for ``node`` go (see ``_batch``): many frames in one message.
    With ``session`` (the destination join's, from its membership record) only that join
    takes them: ``<prefix>.node.<node>.batch.<session hex>``; without, any join of the
    node name does (a destination of an earlier version: its record has no session)."""
    base = f"{prefix}.node.{node}.batch"
    return base if session is None else f"{base}.{session:x}"


def batch_destination(prefix: str, subject: str) -> tuple[str, int | None]:
    """The node and session (None: any join) of a :func:`batch_subject` under ``prefix``;
    ValueError if ``subject`` is not one."""
    head, _, rest = subject.partition(".node.")
    node, _, tail = rest.partition(".batch")
    if head != prefix or not node or "." in node or (tail and not tail.startswith(".")):
        raise ValueError(f"not a batch subject under {prefix!r}: {subject!r}")
    return node, int(tail[1:], 16) if tail else None


def type_subject(prefix: str, type_name: str) -> str:
    return f"{prefix}.type.{type_name}"


def sequence_mark_subject(prefix: str, node: str, session: int | None = None) -> str:
    """Where a sender tells ``node`` the last sequence number it sent it (the body is
    that :func:`sequence_value`); with ``session``, for that join only (as
    :func:`batch_subject`)."""
    base = f"{prefix}.node.{node}.seq"
    return base if session is None else f"{base}.{session:x}"


def sequence_value(node: str, id_prefix: int, dest_prefix: int, number: int) -> str:
    """``number`` in the stream of tells from process ``id_prefix`` (of the join ``node``,
    which nodes write as ``<node>:<hex session>``) to process ``dest_prefix``:
    ``<node>:<session>.<id prefix>.<dest prefix>.<number>`` (hex session and prefixes)."""
    return f"{node}.{id_prefix:x}.{dest_prefix:x}.{number}"


def parse_sequence(value: str) -> tuple[str, int, int]:
    """``(stream, destination id prefix, number)`` of a :func:`sequence_value`; the
    stream names the sending process. ValueError if it is not what :func:`sequence_value`
    writes (``int()`` alone would take " 5", "+5", "1_0", "-5" or "0x1f" too)."""
    match = _SEQUENCE.fullmatch(value)
    if match is None:
        raise ValueError(
            f"malformed sequence number {value[:80]!r}: expected <node>[:<hex session>]"
            ".<hex id prefix>.<hex id prefix>.<decimal number>"
        )
    stream, dest, number = match.groups()
    try:
        return stream, int(dest, 16), int(number)
    except ValueError as exc:  # past the interpreter's limit of digits
        raise ValueError(f"malformed sequence number {value[:80]!r}: {exc}") from None


_HEX: Final = "(?:0|[1-9a-f][0-9a-f]*)"
#: the stream is ``<node>.<id prefix>``, the node with its join's session (``n:5f.1``)
_SEQUENCE: Final = re.compile(
    rf"([A-Za-z0-9_-]{{1,{NODE_NAME_MAX}}}(?::{_HEX})?\.{_HEX})\.({_HEX})\.(0|[1-9][0-9]*)"
)


def durable_subject(prefix: str, node: str, agent_id: uuid.UUID | str) -> str:
    return f"{prefix}.durable.{node}.{agent_id}"


def name_key(name: str) -> str:
    """A KV key for an agent name: the name itself when KV allows it, else ``=base64url``."""
    if _PLAIN_KEY.fullmatch(name) and not name.endswith("."):
        return name
    return "=" + base64.urlsafe_b64encode(name.encode()).decode().rstrip("=")


def name_from_key(key: str) -> str:
    """The agent name of a KV key :func:`name_key` wrote; ValueError for any other key
    (one that anything with access to the bucket may have written there)."""
    if not key.startswith("="):
        name = key
    else:
        body = key[1:]
        try:
            name = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)).decode()
        except ValueError as exc:  # binascii.Error, UnicodeDecodeError
            raise ValueError(f"KV key {key[:80]!r} is not a name's key: {exc}") from None
    # (the base64 reader skips what is not base64: such a key would alias a name's)
    if not name or name_key(name) != key:
        raise ValueError(f"KV key {key[:80]!r} is not a name's key")
    try:
        return check_agent_name(name)  # (no kernel spawns a UUID-like name: a peer's bad one)
    except ValueError as exc:
        raise ValueError(f"KV key {key[:80]!r} holds no agent name: {exc}") from None


def header_bytes(headers: dict[str, str]) -> int:
    """The size of ``headers`` as NATS counts it against ``max_payload`` with the body
    (``NATS/1.0``, ``key: value`` lines, a blank line); nats-py checks the body alone,
    and the server closes a connection that sends more (Maximum Payload Violation),
    which nats-py then closes for good."""
    return 12 + sum(len(k.encode()) + len(v.encode()) + 4 for k, v in headers.items())


# --- error frames -----------------------------------------------------------------------


def error_frame(exc: BaseException) -> tuple[str, bytes]:
    """The ``Nexus-Error`` header value and body for an error a remote request ran into."""
    if isinstance(exc, AgentNotFound):
        # "id": whether the address is an id (a name may look like one); a peer of an
        # earlier version reads no more than "address", and this one reads a frame of it
        address = exc.address
        body: dict[str, Any] = {"address": str(address), "id": isinstance(address, uuid.UUID)}
        if exc.detail:
            body["detail"] = exc.detail
        return "no_such_agent", json.dumps(body).encode()
    if isinstance(exc, MailboxFull):
        body = {
            "recipient": str(exc.recipient),
            "name": exc.name,
            "capacity": exc.capacity,
            "message_id": str(exc.message_id),
        }
        return "mailbox_full", json.dumps(body).encode()
    if isinstance(exc, KernelShuttingDown):
        # "phase": a peer of an earlier version reads no more than "what"
        return "shutting_down", json.dumps({"what": exc.what, "phase": exc.phase}).encode()
    if isinstance(exc, RequestFailed):
        error = None if exc.error is None else _error_text(exc.error)
        body = {"reason": exc.reason, "error": error}
        if exc.at is not None:
            # where a handler passed the query on to (a pool's worker); a peer of an
            # earlier version reads no more than the two above
            body["at"] = str(exc.at)
        if exc.name is not None:
            # the name of the agent asked by id, for the requester's text; a peer of an
            # earlier version reads no more than the above
            body["name"] = exc.name
        return "request_failed", json.dumps(body).encode()
    return "request_failed", json.dumps(
        {"reason": "remote_error", "error": _error_text(exc)}
    ).encode()


#: the most characters of a remote handler's error an error frame carries: the frame must
#: fit in a NATS message (1 MiB by default, else the client refuses it and the requester
#: waits out its timeout), and a requester's log line stays readable
ERROR_TEXT_MAX: Final = 4_000


def _error_text(error: BaseException) -> str:
    """The repr of a remote handler's error for an error frame (never raising: see
    error_repr), cut to ERROR_TEXT_MAX characters saying how many were cut."""
    text = error_repr(error)
    if len(text) <= ERROR_TEXT_MAX:
        return text
    return f"{text[:ERROR_TEXT_MAX]}... ({len(text) - ERROR_TEXT_MAX:,} more characters cut)"


class RemoteError(NexusError):
    """The exception a remote handler raised, as text (exceptions do not cross processes)."""

    def __init__(self, node: str, text: str) -> None:
        self.node = node
        self.text = text
        super().__init__(f"on node {node!r}: {text}")


def error_from_frame(
    kind: str, body: bytes, *, query_id: uuid.UUID, to: uuid.UUID | str, node: str
) -> NexusError:
    """Rebuild, on the requesting node, the error a remote request ran into.

    ValueError naming the kind if the body does not hold what the kind needs (a hostile
    or broken peer) or is no UTF-8 text (see :func:`wire_text`); a body that is not a JSON object (or nested too deeply to read) is
    read as an empty one, and an ``error`` text that is not a string as its JSON."""
    try:
        text = wire_text(body, f"{kind} error frame")
    except MessageDecodeError as exc:
        raise ValueError(f"malformed {kind} error frame: {exc.problem}") from None
    try:
        data: dict[str, Any] = json.loads(text) if text else {}
    except (ValueError, RecursionError):
        data = {}
    if not isinstance(data, dict):
        data = {}
    if kind == "no_such_agent":
        detail = data.get("detail")
        detail = _frame_text(detail) if detail else ""
        return AgentNotFound(_not_found(data, to), detail=detail, node=node)
    if kind == "mailbox_full":
        try:
            name, capacity = data.get("name"), data["capacity"]
            if capacity.__class__ is not int or not (name is None or isinstance(name, str)):
                raise TypeError(
                    "capacity must be an integer and name a string or null, got"
                    f" {type(capacity).__name__} and {type(name).__name__}"
                )
            return MailboxFull(
                uuid.UUID(data["recipient"]),
                name,
                capacity,
                uuid.UUID(data["message_id"]),
                node=node,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"malformed {kind} error frame: {exc!r}") from None
    if kind == "shutting_down":
        phase = data.get("phase")
        return KernelShuttingDown(
            f"{_frame_text(data.get('what', 'request'))} on node {node!r}",
            # one a peer made up is not taken (its text would say nothing true)
            phase if phase in SHUTDOWN_PHASES else "",
        )
    error = data.get("error")
    at = data.get("at")
    name = data.get("name")
    return RequestFailed(
        query_id,
        to,
        _frame_text(data.get("reason", kind)),
        RemoteError(node, _frame_text(error)) if error else None,
        at=None if at is None else _frame_text(at),
        node=node,
        # the name of the agent asked by id, when it has one (read only for an id)
        name=_frame_text(name) if name and isinstance(to, uuid.UUID) else None,
    )


def _not_found(data: dict[str, Any], to: Address) -> Address:
    """The address a ``no_such_agent`` frame names: the agent the node did not find (not
    always ``to``, the one asked: a router agent there may have sent the query on), an
    id or a name as it was. A frame of an earlier version (no ``id``) names its address
    as text: ``to`` if that is its text, else the text; a frame without one, ``to``.
    ValueError for an ``id`` that is not one."""
    address = data.get("address")
    if not isinstance(address, str):
        return to
    is_id = data.get("id")
    if is_id is True:
        try:
            return uuid.UUID(address)
        except ValueError:
            raise ValueError(
                f"malformed no_such_agent error frame: address {address[:80]!r} is not an id"
            ) from None
    if is_id is None and address == str(to):
        return to
    return address


def _frame_text(value: Any) -> str:
    """A text field of an error frame as text: a string as it is, anything else a peer
    wrote there as its JSON (``str()`` of a value nested deeply enough would recurse past
    the interpreter's limit)."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value)
    except (ValueError, RecursionError):
        return "<a value nested too deeply to show>"
