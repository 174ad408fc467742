"""The NATS transport's pure parts, without a server: message codec, subjects, error
frames, membership bookkeeping."""

from __future__ import annotations

import gc
import json
import logging
import math
import re
import struct
import uuid
from typing import Any, Final

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nexus_trio import (
    SYSTEM_ID,
    AgentNotFound,
    KernelShuttingDown,
    MailboxFull,
    Message,
    MessageDecodeError,
    MessageKind,
    RequestFailed,
)
from nexus_trio._message import id_value, row_fields, stored_fields
from nexus_trio._nats import ClusterOptions, DurableOptions, RemoteError, type_address
from nexus_trio._nats import _batch as batch
from nexus_trio._nats import _wire as wire
from nexus_trio._nats._membership import (
    MemberTable,
    NodeInfo,
    decode_record,
    encode_record,
    node_uuid,
)

from .hang_guard import SLOW_DRAWS
from .test_message import NOT_JSON

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text() | st.floats(allow_nan=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
ids = st.builds(uuid.UUID, int=st.integers(0, (1 << 128) - 1))


@SLOW_DRAWS
@given(
    sender=ids,
    to=ids | st.text(min_size=1),
    payload=json_values,
    kind=st.sampled_from(MessageKind),
    conversation_id=st.none() | ids,
    reply_to=st.none() | ids,
    trace_id=st.none() | ids,
)
def test_codec_round_trips_every_field(**fields: object) -> None:
    msg = Message(**fields)  # type: ignore[arg-type]
    body = wire.encode_message(msg)
    assert wire.decode_message(body) == msg
    assert wire.decode_tell(body) == msg  # the batch path reads the same


@SLOW_DRAWS
@given(payload=json_values | st.sampled_from([float("inf"), float("-inf"), [None, 1e308 * 10]]))
def test_the_fast_json_means_what_the_standard_library_writes(payload: object) -> None:
    msg = Message(sender=uuid.uuid4(), to="x", payload=payload)
    body = wire.encode_message(msg)
    standard = json.dumps(
        [1, msg.id.int, msg.timestamp, msg.sender.int, "x", "Command", None, None, None, payload],
        separators=(",", ":"),
        ensure_ascii=False,
    ).encode()
    # the same values (a float may be spelled differently: 1e16 for 1e+16), and a
    # non-finite float stays one (never a silent null)
    assert json.loads(body) == json.loads(standard)
    assert wire.decode_tell(body).payload == payload


@pytest.mark.parametrize(("payload", "error"), NOT_JSON.values(), ids=NOT_JSON)
@pytest.mark.parametrize("to", [uuid.UUID(int=5), "sink"], ids=["to an id", "to a name"])
def test_the_codecs_refuse_a_payload_json_has_no_type_for_instead_of_changing_it(
    payload: Any, error: str, to: uuid.UUID | str
) -> None:
    """Regression: msgspec writes what the standard library's json refuses (a datetime,
    bytes, a set, a UUID, a Decimal, an Enum, a dataclass) as a string, a list or an
    object: every codec of a message for another node (the binary tell of a node batch,
    format 1 for a query, a reply, a durable message, format 2) wrote it, and the
    recipient got another value than was sent. They raise TypeError naming the type
    and where it sits, as for any payload that is not JSON."""
    msg = Message(sender=uuid.uuid4(), to=to, payload=payload)
    head = wire.numbered_head("a:5", 1, 2)
    for encode in (
        wire.encode_tell,
        wire.encode_message,
        lambda m: wire.encode_numbered(m, head, 3),
    ):
        with pytest.raises(TypeError, match=re.escape(error)):
            encode(msg)


@pytest.mark.parametrize(("payload", "error"), NOT_JSON.values(), ids=NOT_JSON)
def test_a_binary_tell_refuses_what_json_has_no_type_for_inside_a_dict_or_a_list(
    payload: Any, error: str
) -> None:
    """A dict or a list payload is written by msgspec and read back, and only a value
    read back equal goes without the walk of check_json (the common payload, at half
    its cost): each value the standard library's json refuses, inside a dict or a list,
    still raises TypeError naming the type and where it sits (msgspec writes each of
    them as a string, a list or an object)."""
    where = error.removeprefix("payload")
    for wrapped, path in (({"k": payload}, "payload['k']"), ([0, payload], "payload[1]")):
        msg = Message(sender=uuid.uuid4(), to="sink", payload=wrapped)
        with pytest.raises(TypeError, match=re.escape(path + where)):
            wire.encode_tell(msg)


@pytest.mark.parametrize(
    "payload",
    [
        [float("nan"), None],
        {"a": float("inf"), "b": None},
        {"a": [float("-inf")]},
        {"n": 1, "k": [1, 2]},
        [1, [2, {"x": None}]],
    ],
)
def test_a_binary_tell_of_a_dict_or_a_list_carries_what_json_dumps_writes(payload: Any) -> None:
    """What msgspec reads back equal goes as msgspec wrote it; a non-finite float (which
    msgspec writes as null) goes as the standard library writes it, never a silent
    null."""
    msg = Message(sender=uuid.uuid4(), to="sink", payload=payload)
    got = wire.decode_tell(wire.encode_tell(msg)).payload
    assert repr(got) == repr(json.loads(json.dumps(payload)))


@pytest.mark.parametrize(
    ("payload", "read_back"),
    [
        ([999, "x" * 16], 0),
        ({"op": "add", "n": 2**70, "ok": True, "none": None}, 0),
        ([], 0),
        ([1.5, 2, -0.0, 1e16, 5e-324], 0),  # finite floats read back equal
        ({"x": float("inf")}, 1),  # msgspec would write null: checked
        ([1, [float("nan")]], 1),
        ({"task": "resize", "n": 0, "args": [1, 2, 3]}, 0),  # bench_nats's
        ([1, {"k": [2]}], 1),  # nested past one level
        ({"k": [True, None, "x", 2.5, -0.0]}, 0),  # a dict's list (walked in place)
        ({"k": [1, [2]]}, 1),  # ... nested past one level
        ({"k": [1, float("inf")]}, 1),  # ... a non-finite float in it
        ({"k": list(range(17))}, 1),  # ... past the walk's bound
        ({"k": [1, (2,)]}, 1),  # ... a tuple in it
        ([1, (2,)], 1),  # a tuple: json.dumps writes a list
        ({1: "a"}, 1),  # a key msgspec writes as a string
        (list(range(17)), 1),  # past the walk's bound
        # the payload's own walk, written out in encode_stored_tell (fortieth pass)
        ({"k": {"a": 1, "b": 2.5}}, 0),  # a dict's dict
        ([True, None, -0.0, {"k": 1.5}, ["x"]], 0),  # a list's dict and list
        ({"k": {"a": 1, "b": [2]}}, 1),  # a dict's dict nested past one level
        ({"a": 1, "b": float("nan")}, 1),  # a non-finite float after a good value
        ({"a": 1, 2: "b"}, 1),  # a key msgspec writes as a string after a good one
        ({"k": {1: "a"}}, 1),  # ... in a dict's dict
        ({"k": {"a": (1,)}}, 1),  # a tuple in a dict's dict: json.dumps writes a list
        ({"k": dict.fromkeys("abcdefghijklmnopq", 1)}, 1),  # a dict's dict past the bound
        (dict.fromkeys("abcdefghijklmnopq", 1), 1),  # a dict past the bound
        ([1, {"k": float("inf")}], 1),  # a non-finite float in a list's dict
    ],
)
def test_a_flat_dict_or_list_payload_is_encoded_without_reading_it_back(
    monkeypatch: pytest.MonkeyPatch, payload: Any, read_back: int
) -> None:
    """A container of ints, strs, bools and Nones (str keys), or of such containers, is
    what msgspec writes as json.dumps does: encoded once, not read back to prove it (the
    ring's and bench_nats's payloads); the rest still is. Either way the bytes read as
    json.dumps wrote them."""
    calls: list[Any] = []
    real = wire._read_back

    def counted(value: Any) -> bytes | None:
        calls.append(value)
        return real(value)

    monkeypatch.setattr(wire, "_read_back", counted)
    msg = Message(sender=uuid.uuid4(), to="ring-1", payload=payload)
    body = wire.encode_tell(msg)
    assert len(calls) == read_back
    got = wire.decode_tell(body).payload
    assert repr(got) == repr(json.loads(json.dumps(payload)))


class _Text(str):
    pass


class _Int(int):
    pass


class _Float(float):
    pass


def test_the_codecs_refuse_a_payload_that_contains_itself_saying_where() -> None:
    """Regression: a payload that contains itself raised RecursionError from each
    codec, and the sender's error (``cannot be encoded for NATS: maximum recursion
    depth exceeded``) named no place. A ValueError names it now."""
    loop: list[Any] = [0]
    loop.append([loop])
    msg = Message(sender=uuid.uuid4(), to="x", payload={"job": loop})
    head = wire.numbered_head("a:5", 1, 2)
    for encode in (
        wire.encode_tell,
        wire.encode_message,
        lambda m: wire.encode_numbered(m, head, 3),
    ):
        with pytest.raises(ValueError, match=re.escape("payload['job'][1][0] is a list that")):
            encode(msg)


@pytest.mark.parametrize(
    "payload",
    [
        (1, [2, (3,)]),
        {1: "a", 2.5: [None]},
        1.5,
        float("inf"),
        {"a": [{1e16: 1, 1e-7: 2, float("nan"): 3, float("-inf"): 4}]},
        {True: 1, False: [{None: 2}]},
        [_Text("s"), {_Text("k"): _Int(3)}, _Float(0.5)],
        _Text("alone"),
    ],
    ids=[
        "tuple",
        "number keys",
        "float",
        "inf",
        "float keys",
        "bool and None keys",
        "subclasses",
        "a str subclass",
    ],
)
def test_a_tuple_and_a_number_key_cross_as_the_standard_library_writes_them(payload: Any) -> None:
    """What JSON has no type for but the standard library writes (a tuple as a list, a
    number, bool or None key as a string) crosses as that, in every codec.

    Regression for the last two: msgspec wrote a float key its own way (``1e16``,
    ``1e-7``, ``nan``, ``-inf`` where ``json.dumps`` writes ``1e+16``, ``1e-07``,
    ``NaN``, ``-Infinity``), so the key arrived changed, and refused a bool or None key
    (TypeError) that ``json.dumps`` writes (``true``, ``null``), and a subclass of str,
    int or float."""
    msg = Message(sender=uuid.uuid4(), to="x", payload=payload)
    expected = json.loads(json.dumps(payload))
    head = wire.numbered_head("a:5", 1, 2)
    assert wire.decode_tell(wire.encode_tell(msg)).payload == expected
    assert wire.decode_message(wire.encode_message(msg)).payload == expected
    assert wire.decode_message(wire.encode_numbered(msg, head, 3)).payload == expected
    assert Message.from_json(msg.to_json()).payload == expected


def test_the_kernels_standard_json_form_is_accepted_too() -> None:
    msg = Message(sender=uuid.uuid4(), to="echo", payload={"a": [1, 2]}, kind=MessageKind.QUERY)
    assert wire.decode_message(msg.to_json().encode()) == msg


def test_a_name_that_looks_like_an_id_stays_a_name() -> None:
    name = str(uuid.uuid4())
    msg = Message(sender=uuid.uuid4(), to=name)
    assert wire.decode_message(wire.encode_message(msg)).to == name


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"not json", "<document>"),
        (b'[2,1,1,1,1,"Command",null,null,null,null]', "<document>"),
        (b"[1,1,1,1]", "<document>"),
        (b'[1,"x",1,1,1,"Command",null,null,null,null]', "id"),
        (b'[1,true,1,1,1,"Command",null,null,null,null]', "id"),
        (b'[1,-1,1,1,1,"Command",null,null,null,null]', "id"),
        (b'[1,340282366920938463463374607431768211456,1,1,1,"Command",null,null,null,null]', "id"),
        (b'[1,1,1.5,1,1,"Command",null,null,null,null]', "timestamp"),
        (b'[1,1,1,-1,1,"Command",null,null,null,null]', "from"),
        (b'[1,1,1,1,"","Command",null,null,null,null]', "to"),
        (b'[1,1,1,1,1,"Shout",null,null,null,null]', "kind"),
        (b'[1,1,1,1,1,"Command","c",null,null,null]', "conversation_id"),
        (b'[1,1,1,1,1,"Command",null,1e3,null,null]', "reply_to"),
        (b'[1,1,1,1,1,"Command",null,null,true,null]', "trace_id"),
        (b'{"from":"x","to":"a","kind":"Command","payload":1}', "from"),
    ],
)
@pytest.mark.parametrize("decode", [wire.decode_message, wire.decode_tell])
def test_malformed_bodies_name_the_bad_field(decode: Any, body: bytes, field: str) -> None:
    with pytest.raises(MessageDecodeError) as err:
        decode(body)
    assert err.value.field == field


def test_a_batched_tell_keeps_its_id_as_a_value_until_it_is_read() -> None:
    msg = Message(uuid.uuid4(), uuid.uuid4(), {"n": 1})
    decoded = wire.decode_tell(wire.encode_message(msg))
    assert id_value(decoded) == msg.id.int
    assert decoded.id == msg.id and decoded == msg


@pytest.mark.parametrize("body", [b"", b"\x00", b"\x7f", b" ", b"["])
def test_a_tell_body_that_is_neither_binary_nor_format_1_is_refused_by_name(body: bytes) -> None:
    """decode_tell reads a binary tell itself and hands a body starting below 0x80 to
    the format 1 reader: an empty body or one that is no message is a decode error
    naming the document, never an IndexError or a message."""
    with pytest.raises(MessageDecodeError) as err:
        wire.decode_tell(body)
    assert err.value.field == "<document>"


@pytest.mark.parametrize("sender", [b"true", b"1.0"])
def test_a_cached_agent_id_does_not_let_a_look_alike_through(sender: bytes) -> None:
    """Batched tells cache agent ids as UUIDs; ``true`` and ``1.0`` equal the key 1."""
    good = wire.decode_tell(b'[1,7,1,1,1,"Command",null,null,null,null]')
    assert good.sender == uuid.UUID(int=1)
    body = b"[1,8,1," + sender + b',1,"Command",null,null,null,null]'
    with pytest.raises(MessageDecodeError) as err:
        wire.decode_tell(body)
    assert err.value.field == "from"


@SLOW_DRAWS
@given(
    sender=ids,
    to=ids | st.text(min_size=1),
    payload=json_values | st.sampled_from([float("inf"), [None, float("-inf")], {"n": None}]),
    kind=st.sampled_from(MessageKind),
    id=st.none() | st.integers(0, (1 << 128) - 1),
    timestamp=st.none() | st.integers(-(2**63), 2**63 - 1) | st.integers(2**63, 2**80),
    conversation_id=st.none() | ids,
    reply_to=st.none() | ids,
    trace_id=st.none() | ids,
)
def test_binary_tells_round_trip_every_field(**fields: object) -> None:
    msg = Message(**fields)  # type: ignore[arg-type]
    body = wire.encode_tell(msg)
    decoded = wire.decode_tell(body)
    # repr: equality would fail for the same non-finite float spelled twice (nan)
    assert repr(decoded) == repr(msg)
    assert id_value(decoded) == msg.id.int
    if -(2**63) <= msg.timestamp < 2**63:
        assert body[0] & 0x80  # binary
    else:
        assert body.startswith(b"[1,")  # format 1 carries any integer


def test_a_binary_tell_is_a_third_of_the_json_one() -> None:
    msg = Message(uuid.uuid4(), uuid.uuid4(), 12345)
    binary, text = wire.encode_tell(msg), wire.encode_message(msg)
    # 1 tag + 1 kind + 8 timestamp + 3 x 16 ids + "12345"
    assert len(binary) == 63
    assert len(binary) * 2 < len(text)
    assert wire.decode_tell(binary) == wire.decode_tell(text) == msg


def test_tells_to_names_decode_to_their_own_name_past_the_bound_of_the_name_cache(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The encoder keeps each name's bytes; its cache starts over past its bound.
    monkeypatch.setattr(wire, "_AGENT_IDS_MAX", 4)
    monkeypatch.setattr(wire, "_NAMED", {})
    names = [f"agent-{i}" for i in range(10)] + ["é" * 3]
    sender = uuid.uuid4()
    for name in names * 2 + names[::-1]:
        body = wire.encode_tell(Message(sender, name, name))
        decoded = wire.decode_tell(body)
        assert (decoded.to, decoded.payload) == (name, name)
        assert len(wire._NAMED) <= 4


def test_the_codecs_name_caches_keep_no_long_names(monkeypatch: pytest.MonkeyPatch) -> None:
    # A peer sending tells to ever-new 64 KiB names must not grow the decoder's cache by
    # gigabytes: only names up to NAME_CACHE_BYTES are kept (on both sides); longer ones
    # still encode and decode, each time.
    monkeypatch.setattr(wire, "_NAMES", {})
    monkeypatch.setattr(wire, "_NAMED", {})
    sender = uuid.uuid4()
    short, edge = "s" * 10, "e" * wire.NAME_CACHE_BYTES
    longs = [f"{i:04d}" + "n" * 60_000 for i in range(20)]
    for name in [short, edge, *longs, short, *longs]:
        decoded = wire.decode_tell(wire.encode_tell(Message(sender, name, 1)))
        assert decoded.to == name
    assert sorted(wire._NAMED) == sorted([short, edge])
    assert sorted(wire._NAMES) == sorted([short.encode(), edge.encode()])


def test_a_name_past_64_kib_falls_back_to_format_1() -> None:
    name = "n" * 70_000
    msg = Message(uuid.uuid4(), name, None)
    body = wire.encode_tell(msg)
    assert body.startswith(b"[1,")
    assert wire.decode_tell(body).to == name


def _binary(tag: int = 0x80, kind: int = 0, rest: bytes = b"\x11" * 16 + b"1") -> bytes:
    return bytes([tag, kind]) + (7).to_bytes(8) + b"\x01" * 16 + b"\x02" * 16 + rest


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"\x80\x00", "<document>"),
        (_binary()[:41], "<document>"),
        (_binary(tag=0x90), "<document>"),
        (_binary(kind=4), "kind"),
        (_binary(kind=200, rest=b""), "kind"),
        (_binary(rest=b"\x11" * 16 + b"[1,"), "payload"),
        (_binary(rest=b"\x11" * 16), "payload"),
        (_binary(rest=b"\x11" * 15), "to"),
        (_binary(tag=0x81, rest=b"\x00\x05ab"), "to"),
        (_binary(tag=0x81, rest=b"\x00\x00null"), "to"),
        (_binary(tag=0x81, rest=b"\x00\x02\xff\xfenull"), "to"),
        (_binary(tag=0x82, rest=b"\x11" * 16 + b"\x22" * 8), "conversation_id"),
        (_binary(tag=0x84, rest=b"\x11" * 16), "reply_to"),
        (_binary(tag=0x88, rest=b"\x11" * 16 + b"\x22" * 15), "trace_id"),
        (_binary(tag=0x8E, rest=b"\x11" * 16 + b"\x22" * 48 + b"{"), "payload"),
    ],
)
def test_malformed_binary_tells_name_the_bad_field(body: bytes, field: str) -> None:
    with pytest.raises(MessageDecodeError) as err:
        wire.decode_tell(body)
    assert err.value.field == field


_DEEP: Final = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (_DEEP, "<document>"),
        (b'[1,1,1,1,1,"Command",null,null,null,' + _DEEP + b"]", "<document>"),
        (b'{"a":' * 50_000 + b"1" + b"}" * 50_000, "<document>"),
        (_binary(rest=b"\x11" * 16 + _DEEP), "payload"),
    ],
)
def test_json_nested_past_the_recursion_limit_is_a_decode_error(body: bytes, field: str) -> None:
    """Regression: a body nested deeper than the JSON readers recurse raised
    RecursionError, which no caller catches (a durable message with it ended the node's
    pull task, and with it the node's cluster); it is a MessageDecodeError now."""
    decoders = (
        [wire.decode_tell] if body[:1] >= b"\x80" else [wire.decode_message, wire.decode_tell]
    )
    for decode in decoders:
        with pytest.raises(MessageDecodeError) as err:
            decode(body)
        assert err.value.field == field
        assert "recursion" in str(err.value)


def test_a_named_tell_reads_the_same_the_second_time() -> None:
    # the second tell to a name takes the short way (the name cached by its bytes): the
    # same message, and the same errors for a bad kind or payload after the name
    named = _binary(tag=0x81, rest=b"\x00\x05alice[1]")
    written = ("alice", MessageKind.COMMAND, 7, uuid.UUID(bytes=b"\x01" * 16), [1])
    first, second = wire.decode_tell(named), wire.decode_tell(named)
    for msg in (first, second):
        assert (msg.to, msg.kind, msg.timestamp, msg.id, msg.payload) == written
        assert msg.sender == uuid.UUID(bytes=b"\x02" * 16)
    assert second == first
    for body, field in [
        (_binary(tag=0x81, rest=b"\x00\x05alice[1"), "payload"),
        (_binary(tag=0x81, kind=9, rest=b"\x00\x05alice[1]"), "kind"),
        (_binary(tag=0x81, rest=b"\x00\x06alice[1]"), "payload"),
        (_binary(tag=0x81, rest=b"\x00\x09alice[1]"), "to"),
    ]:
        with pytest.raises(MessageDecodeError) as err:
            wire.decode_tell(body)
        assert err.value.field == field


def test_a_well_formed_binary_tell_reads_as_written() -> None:
    msg = wire.decode_tell(_binary(tag=0x81, kind=2, rest=b"\x00\x03bob[true]"))
    assert (msg.to, msg.kind, msg.payload, msg.timestamp) == ("bob", MessageKind.QUERY, [True], 7)
    # the layout: tag, kind, timestamp, id, sender, to, ...
    assert msg.id == uuid.UUID(bytes=b"\x01" * 16)
    assert msg.sender == uuid.UUID(bytes=b"\x02" * 16)


def test_tokens_and_type_addresses() -> None:
    assert type_address("resize") == "type:resize"
    for bad in ("", "a.b", "a b", "*", ">", "ü"):
        with pytest.raises(ValueError, match="agent type"):
            type_address(bad)
    with pytest.raises(ValueError, match="prefix"):
        ClusterOptions(prefix="a.b")


@pytest.mark.parametrize(
    "bad",
    [
        {"heartbeat_interval": 0},
        {"missed_heartbeats": 0},
        {"kv_replicas": 0},
        {"outbox_high_water": 0},
        {"parked_limit": -1},
        {"reconnect_wait": -0.1},
        {"forget_lost_after": 0},
        {"last_notice_wait": -1.0},
        {"last_notice_wait": math.nan},
        {"last_notice_wait": math.inf},
        {"last_notice_wait": "15"},
        {"notice_wait_at_leave": -0.5},
        {"notice_wait_at_leave": math.nan},
        {"notice_wait_at_leave": True},
        {"notice_wait_at_leave": None},
        # (forty-third pass: what the config refused, Python took)
        {"heartbeat_interval": math.inf},
        {"connect_timeout": math.nan},
        {"join_timeout": math.inf},
        {"reconnect_wait": math.inf},
        {"forget_lost_after": math.inf},
        {"max_reconnect_attempts": -5},
        {"max_reconnect_attempts": 1.5},
    ],
)
def test_bad_options_are_refused_naming_the_option(bad: dict[str, Any]) -> None:
    (name,) = bad
    with pytest.raises(ValueError, match=name):
        ClusterOptions(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_deliver"):
        DurableOptions(max_deliver=0)
    assert wire.agent_subject("p", "n", uuid.UUID(int=5)).startswith("p.node.n.agent.")


@pytest.mark.parametrize(
    "bad",
    [
        {"ack_wait": math.inf},  # (the join failed: OverflowError in nanoseconds)
        {"ack_wait": 0},
        {"duplicate_window": math.nan},
        {"max_age": math.inf},
        {"redelivery_delay": math.inf},
    ],
)
def test_bad_durable_options_are_refused_naming_the_option(bad: dict[str, Any]) -> None:
    """Finite seconds, as the ``[durable]`` keys: ``ack_wait=inf`` was taken and failed
    the join far from here."""
    (name,) = bad
    with pytest.raises(ValueError, match=f"^DurableOptions {name} must be a finite number"):
        DurableOptions(**bad)
    assert DurableOptions(max_age=None).max_age is None


def test_last_notice_wait_follows_server_lost_wait_or_must_be_above_it() -> None:
    """``last_notice_wait`` must stay above ``server_lost_wait`` (a leave riding out a
    failover sends its last notice up to that late; the others counted what it took as
    lost): left out, it is derived (``server_lost_wait`` + 13 s, 18 s by default, as
    Akka derives a setting from the one it follows); given, one not above it is a
    ValueError naming both, as Akka checks related settings at start."""
    assert ClusterOptions().last_notice_wait == 18.0
    assert ClusterOptions(server_lost_wait=30).last_notice_wait == 43.0
    assert ClusterOptions(server_lost_wait=0).last_notice_wait == 13.0
    assert ClusterOptions(server_lost_wait=30, last_notice_wait=30.5).last_notice_wait == 30.5
    for asked in ({"server_lost_wait": 30, "last_notice_wait": 20}, {"last_notice_wait": 5.0}):
        with pytest.raises(ValueError, match=r"^last_notice_wait") as raised:
            ClusterOptions(**asked)  # type: ignore[arg-type]
        wait = asked.get("server_lost_wait", 5.0)
        derived = (
            ""
            if "server_lost_wait" in asked
            else "; server_lost_wait, left out, is heartbeat_interval x missed_heartbeats"
            " (1 x 5): give it, or lower those"
        )
        assert str(raised.value) == (
            f"last_notice_wait ({asked['last_notice_wait']:g} s) must be above"
            f" server_lost_wait ({wait:g} s): a leave riding out a failover sends its last"
            " notice up to server_lost_wait late, and the others would count what it took"
            f" as lost; raise last_notice_wait, or leave it out (server_lost_wait + 13 s){derived}"
        )
    # a bad server_lost_wait is still its own error, not the derivation's
    for bad in ("2", True, math.nan):
        with pytest.raises(ValueError, match=r"^server_lost_wait must be"):
            ClusterOptions(server_lost_wait=bad)  # type: ignore[arg-type]


def test_an_evolved_copy_derives_last_notice_wait_again() -> None:
    """Regression: ``last_notice_wait`` left out was derived once, at construction, and
    ``attrs.evolve`` copied it as if given: evolving the defaults to a
    ``server_lost_wait`` of 30 s was refused (15 s not above 30 s), and one of 10 s kept
    15 s where 23 s was due. Left out (or None), it is derived when read, in a copy
    too; one given is kept as given."""
    base = ClusterOptions()
    assert attrs.evolve(base, server_lost_wait=30).last_notice_wait == 43.0
    assert attrs.evolve(base, server_lost_wait=10).last_notice_wait == 23.0
    given = ClusterOptions(last_notice_wait=50.0)
    assert attrs.evolve(given, server_lost_wait=30).last_notice_wait == 50.0
    assert attrs.evolve(given, last_notice_wait=None).last_notice_wait == 18.0
    assert attrs.evolve(base, last_notice_wait=20.0).last_notice_wait == 20.0
    assert ClusterOptions(last_notice_wait=None).last_notice_wait == 18.0
    with pytest.raises(ValueError, match=r"^last_notice_wait \(20 s\) must be above"):
        attrs.evolve(given, server_lost_wait=30, last_notice_wait=20.0)
    # (a bad one is named as the caller gives it, not as the private field that keeps it)
    with pytest.raises(ValueError, match=r"^last_notice_wait must") as raised:
        ClusterOptions(last_notice_wait=-1.0)
    assert str(raised.value) == "last_notice_wait must be a finite number of seconds >= 0, got -1.0"


def test_server_lost_wait_left_out_follows_the_heartbeat_options() -> None:
    """Regression: ``server_lost_wait`` left out was a fixed 5 s, the members' loss
    window (``heartbeat_interval`` x ``missed_heartbeats``) at their defaults only: a
    node with a 10 s heartbeat gave up its leave's steps after 5 s of an outage its
    members ride out for 50 s. Left out (or None), it is derived when read, in a copy
    made by ``attrs.evolve`` too, and ``last_notice_wait`` follows it; given, it wins."""
    assert ClusterOptions().server_lost_wait == 5.0
    slow = ClusterOptions(heartbeat_interval=10)
    assert (slow.server_lost_wait, slow.last_notice_wait) == (50.0, 63.0)
    assert ClusterOptions(heartbeat_interval=0.5, missed_heartbeats=3).server_lost_wait == 1.5
    assert ClusterOptions(server_lost_wait=None).server_lost_wait == 5.0
    assert attrs.evolve(ClusterOptions(), missed_heartbeats=8).server_lost_wait == 8.0
    given = ClusterOptions(heartbeat_interval=10, server_lost_wait=3)
    assert (given.server_lost_wait, given.last_notice_wait) == (3, 16.0)
    assert attrs.evolve(given, heartbeat_interval=20).server_lost_wait == 3
    assert attrs.evolve(given, server_lost_wait=None).server_lost_wait == 50.0
    # a given last_notice_wait is checked against the derived wait
    with pytest.raises(ValueError, match=r"^last_notice_wait \(20 s\) must be above"):
        ClusterOptions(heartbeat_interval=10, last_notice_wait=20.0)


def test_the_rule_across_options_says_what_a_left_out_wait_is_derived_from() -> None:
    """Regression: with ``server_lost_wait`` left out, ``ClusterOptions(heartbeat_interval
    =10, last_notice_wait=30)`` said only that 30 s must be above "server_lost_wait (50
    s)", a value the caller never gave; and a wait so large that adding 13 s to it
    changes no float (``heartbeat_interval=1e300``, or a given ``server_lost_wait`` of
    2e17) said "leave it out" of a ``last_notice_wait`` that was left out. As the config's
    rule says (``[nats] server_lost_wait is unset, so it is [cluster] heartbeat_interval x
    missed_heartbeats``), the options name what a left-out wait derives from, and a
    derived ``last_notice_wait`` that cannot be above is said to be the wait's size."""
    with pytest.raises(ValueError, match=r"^last_notice_wait \(30 s\) must be above") as raised:
        ClusterOptions(heartbeat_interval=10, last_notice_wait=30.0)
    assert str(raised.value).endswith(
        "; server_lost_wait, left out, is heartbeat_interval x missed_heartbeats (10 x 5):"
        " give it, or lower those"
    )
    # given, it is not said to be derived
    with pytest.raises(ValueError, match=r"^last_notice_wait \(30 s\) must be above") as raised:
        ClusterOptions(heartbeat_interval=10, server_lost_wait=50, last_notice_wait=30.0)
    assert "left out" not in str(raised.value).partition("leave it out")[2]
    with pytest.raises(ValueError, match=r"^server_lost_wait \(2e\+17 s\) is too large") as raised:
        ClusterOptions(server_lost_wait=2e17)
    assert str(raised.value) == (
        "server_lost_wait (2e+17 s) is too large: last_notice_wait, left out, is"
        " server_lost_wait + 13 s, which must be above it and is not (a float that large"
        " ignores the addition); lower server_lost_wait"
    )
    with pytest.raises(ValueError, match=r"^server_lost_wait \(1e\+301 s\) is too large") as raised:
        ClusterOptions(heartbeat_interval=1e300, missed_heartbeats=10)
    assert str(raised.value) == (
        "server_lost_wait (1e+301 s) is too large: last_notice_wait, left out, is"
        " server_lost_wait + 13 s, which must be above it and is not (a float that large"
        " ignores the addition); lower server_lost_wait; server_lost_wait, left out, is"
        " heartbeat_interval x missed_heartbeats (1e+300 x 10): give it, or lower those"
    )


def test_the_repr_and_equality_show_the_values_a_node_uses() -> None:
    """Regression: ``repr(ClusterOptions())`` showed the private ``_last_notice_wait=None``
    (and would show ``_server_lost_wait=None``), and a derived 18 s ``last_notice_wait``
    did not compare equal to one given as 18 s. The repr names each option as the caller
    gives it, with the value the node uses (derived or given), and evaluates to equal
    options; equality and the hash go by those values."""
    shown = repr(ClusterOptions())
    assert "_last_notice_wait" not in shown and "_server_lost_wait" not in shown
    assert shown.startswith("ClusterOptions(prefix='nexus', heartbeat_interval=1.0,")
    assert ", server_lost_wait=5.0, " in shown and ", last_notice_wait=18.0, " in shown
    assert ", server_lost_wait=50.0, " in repr(ClusterOptions(heartbeat_interval=10))
    assert eval(shown, {"ClusterOptions": ClusterOptions, "DurableOptions": DurableOptions}) == (
        ClusterOptions()
    )
    explicit = ClusterOptions(server_lost_wait=5.0, last_notice_wait=18.0)
    assert explicit == ClusterOptions() and hash(explicit) == hash(ClusterOptions())
    assert {explicit, ClusterOptions()} == {ClusterOptions()}
    assert ClusterOptions(last_notice_wait=19.0) != ClusterOptions()
    assert ClusterOptions(heartbeat_interval=2) != ClusterOptions(heartbeat_interval=2.5)
    assert ClusterOptions() != "ClusterOptions()"
    # (what was left out is derived again in a copy: equal options may evolve apart)
    assert attrs.evolve(ClusterOptions(), server_lost_wait=10).last_notice_wait == 23.0
    assert attrs.evolve(explicit, server_lost_wait=10).last_notice_wait == 18.0


@pytest.mark.parametrize(
    "name", ["echo", "a.b", "with space", "ünï", "x" * 255, "-", "\U0001f600" * 255]
)
def test_name_keys_round_trip(name: str) -> None:
    key = wire.name_key(name)
    assert wire.name_from_key(key) == name
    assert " " not in key
    assert len(key) <= 1361  # (255 characters of 4 bytes, base64: well inside NATS' line)


def test_a_key_of_a_name_no_spawn_takes_is_refused_as_a_peer_s_malformed_one() -> None:
    """A name of more than 255 characters (what a node before the forty-first pass could
    write) is no agent name here: its entry is refused (counted in entries_malformed)."""
    with pytest.raises(ValueError, match=r"holds no agent name: .* 256 characters long"):
        wire.name_from_key(wire.name_key("x" * 256))


def test_error_frames_become_the_errors_a_local_request_raises() -> None:
    qid, rid, mid = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    cases: list[tuple[BaseException, type[BaseException]]] = [
        (AgentNotFound("x"), AgentNotFound),
        (MailboxFull(rid, "x", 8, mid), MailboxFull),
        (KernelShuttingDown("send"), KernelShuttingDown),
        (RequestFailed(qid, "x", "handler_error", ValueError("boom")), RequestFailed),
        (RuntimeError("odd"), RequestFailed),
    ]
    for exc, expected in cases:
        kind, body = wire.error_frame(exc)
        json.loads(body)
        back = wire.error_from_frame(kind, body, query_id=qid, to="x", node="b")
        assert isinstance(back, expected), (exc, back)
    # a refusal of the shutdown keeps its phase across the wire (a frame of an earlier
    # version carries none, and one a peer made up is not taken)
    kind, body = wire.error_frame(KernelShuttingDown("remote delivery", "stopping"))
    refused = wire.error_from_frame(kind, body, query_id=qid, to="x", node="b")
    assert isinstance(refused, KernelShuttingDown)
    assert (refused.what, refused.phase) == ("remote delivery on node 'b'", "stopping")
    for sent in ({"what": "send"}, {"what": "send", "phase": "over"}, {"phase": 3}):
        other = wire.error_from_frame(
            kind, json.dumps(sent).encode(), query_id=qid, to="x", node="b"
        )
        assert isinstance(other, KernelShuttingDown) and other.phase == ""
    kind, body = wire.error_frame(MailboxFull(rid, "x", 8, mid))
    full = wire.error_from_frame(kind, body, query_id=qid, to="x", node="b")
    assert isinstance(full, MailboxFull)
    assert (full.recipient, full.capacity, full.message_id) == (rid, 8, mid)
    kind, body = wire.error_frame(RequestFailed(qid, "x", "handler_error", ValueError("boom")))
    failed = wire.error_from_frame(kind, body, query_id=qid, to="x", node="b")
    assert isinstance(failed, RequestFailed)
    assert failed.reason == "handler_error"
    assert isinstance(failed.error, RemoteError)
    assert "boom" in str(failed.error) and "'b'" in str(failed.error)


@pytest.mark.parametrize(
    "address", ["ghost", uuid.UUID("12345678-1234-5678-1234-567812345678"), "12345678-1234"]
)
def test_an_agent_not_found_frame_names_the_agent_not_found_and_its_node(
    address: uuid.UUID | str,
) -> None:
    """Regression: the requester rebuilt an AgentNotFound from the frame as one for the
    address it had asked, whatever the frame said: for a query a router agent had sent on
    to an agent that did not exist, it named the router (which exists), and an id came
    back as its text only when asked for. It names the agent not found now, as an id or a
    name as it was, and the node that said so (``node``, in its text)."""
    kind, body = wire.error_frame(AgentNotFound(address))
    back = wire.error_from_frame(kind, body, query_id=uuid.uuid4(), to="router", node="c")
    assert type(back) is AgentNotFound
    assert back.address == address and type(back.address) is type(address)
    assert back.node == "c"
    assert back.args == (f"no agent is registered as {address!r} on node 'c'",)
    assert str(back) == back.args[0]
    local = AgentNotFound(address)
    assert local.node is None and str(local) == f"no agent is registered as {address!r}"


def test_an_agent_not_found_frame_of_an_earlier_version_is_read_as_before() -> None:
    """A frame of a peer of the version before (``{"address": text}`` only) keeps the
    address asked, an id as an id, if the frame names it; else the address in the frame."""
    asked = uuid.uuid4()
    body = json.dumps({"address": str(asked)}).encode()
    back = wire.error_from_frame("no_such_agent", body, query_id=asked, to=asked, node="c")
    assert isinstance(back, AgentNotFound) and back.address == asked and back.node == "c"
    body = json.dumps({"address": "ghost"}).encode()
    back = wire.error_from_frame("no_such_agent", body, query_id=asked, to="router", node="c")
    assert isinstance(back, AgentNotFound) and back.address == "ghost"
    back = wire.error_from_frame("no_such_agent", b"", query_id=asked, to="router", node="c")
    assert isinstance(back, AgentNotFound) and back.address == "router"
    with pytest.raises(ValueError, match="malformed no_such_agent error frame"):
        wire.error_from_frame(
            "no_such_agent", b'{"address": "x", "id": true}', query_id=asked, to="x", node="c"
        )


def _info(node: str, prefix: int, seen: float) -> NodeInfo:
    return NodeInfo(node, prefix, 1, "h", 0.0, {}, seen)


def test_member_table_marks_silent_nodes_lost_once_and_finds_nodes_by_id() -> None:
    table = MemberTable("a", lost_after=3.0)
    table.heard(_info("a", 1, 0.0))
    table.heard(_info("b", 2, 0.0))
    agent_of_b = uuid.UUID(int=(2 << 64) | 77)
    assert table.node_of(agent_of_b) is not None
    assert table.newly_lost(2.0) == []
    assert (table.silent(2.0), table.silent(3.5)) == (False, True)  # never this node itself
    assert table.members["b"].reachable  # (silent marks nothing)
    lost = table.newly_lost(3.5)
    assert [i.node for i in lost] == ["b"]  # never this node itself
    assert table.newly_lost(10.0) == []  # reported once
    assert not table.silent(10.0)  # (lost already)
    assert table.heard(_info("b", 2, 11.0)) is True  # back
    assert table.members["b"].reachable
    table.left("b")
    assert table.node_of(agent_of_b) is None
    assert node_uuid(2).int >> 64 == 2


def test_a_lost_member_is_forgotten_after_the_horizon_and_only_then() -> None:
    table = MemberTable("a", lost_after=3.0)
    table.heard(_info("a", 1, 0.0))
    table.heard(_info("b", 2, 0.0))
    table.heard(_info("c", 3, 0.0))
    assert [i.node for i in table.newly_lost(3.5)] == ["b", "c"]
    table.heard(_info("c", 3, 4.0))  # c is back: reachable members are never forgotten
    assert table.forget_lost(13.0, after=10.0) == []  # b lost 10 s ago, not more
    forgotten = table.forget_lost(13.5, after=10.0)
    assert [i.node for i in forgotten] == ["b"]
    assert sorted(table.members) == ["a", "c"]
    assert table.node_of(uuid.UUID(int=2 << 64)) is None  # its id prefix goes too
    assert table.forget_lost(1000.0, after=10.0) == []  # never this node, never c (live)
    # heard from again later: a new member, not one "reachable again"
    assert table.heard(_info("b", 2, 2000.0)) is False
    assert table.members["b"].reachable


def test_the_member_tables_version_moves_when_routes_may_change_not_per_heartbeat() -> None:
    # Nodes cache the routes of their tells while the version stays the same.
    table = MemberTable("a", lost_after=3.0)
    seen = [table.version]

    def moved() -> bool:
        seen.append(table.version)
        return seen[-1] != seen[-2]

    table.heard(_info("a", 1, 0.0))
    assert moved()  # joined
    table.heard(_info("b", 2, 0.0))
    assert moved()
    table.heard(_info("b", 2, 1.0))
    assert not moved()  # a heartbeat
    table.heard(_info("b", 9, 2.0))
    assert moved()  # restarted: a new id prefix
    assert table.newly_lost(4.0) == [] and not moved()
    assert [i.node for i in table.newly_lost(5.5)] == ["b"] and moved()  # lost
    table.heard(_info("b", 9, 6.0))
    assert moved()  # back
    table.left("b")
    assert moved()
    table.left("b")
    assert not moved()  # nothing left
    table.heard(_info("c", 3, 7.0))
    assert moved()
    assert [i.node for i in table.newly_lost(10.5)] == ["c"] and moved()
    assert [i.node for i in table.forget_lost(100.0, after=10.0)] == ["c"] and moved()


def test_a_restarted_node_replaces_its_old_id_prefix() -> None:
    table = MemberTable("a", lost_after=3.0)
    table.heard(_info("b", 2, 0.0))
    table.heard(_info("b", 9, 1.0))
    assert table.node_of(uuid.UUID(int=2 << 64)) is None
    assert table.node_of(uuid.UUID(int=9 << 64)) is not None


# --- node batches ---------------------------------------------------------------------------


def test_a_sealed_batch_reads_back_frame_for_frame_with_its_tells_numbered() -> None:
    link = batch.NodeLink("b", dest_prefix=0xB, window=100)
    query = uuid.uuid4()
    link.add_tell(b"one")
    link.add_cancel(query, "slow-b")
    link.add_tell(b"two")
    link.credit_due = (7, 41)
    first, tells = link.seal(b"a", 0xA, 0x5E55)
    link.add_tell(b"three")
    second, _ = link.seal(b"a", 0xA, 0x5E55)
    assert tells == 2 and link.sent == 3 and not link.pending

    head, offset = batch.parse_head(first)
    assert (head.node, head.sender_prefix, head.session, head.dest_prefix) == (
        "a",
        0xA,
        0x5E55,
        0xB,
    )
    assert (head.first, head.numbered) == (1, 2)
    tells, controls = batch.split_frames(first, offset, head.numbered)
    assert tells == [b"one", b"two"]
    assert [kind for kind, _ in controls] == [batch.CREDIT, batch.CANCEL]
    assert batch.parse_credit(controls[0][1]) == (7, 41)
    assert batch.parse_cancel(controls[1][1]) == (query, "slow-b")
    head2, _ = batch.parse_head(second)
    assert (head2.first, head2.numbered) == (3, 1)  # numbers go on across batches


def test_the_window_counts_unconsumed_tells_and_a_rejoined_peer_rebases_it() -> None:
    link = batch.NodeLink("b", dest_prefix=1, window=3)
    for body in (b"1", b"2", b"3"):
        assert link.has_room()
        link.add_tell(body)
    assert not link.has_room()  # waiting in the open batch counts too
    link.seal(b"a", 2, 9)
    link.credit(peer_session=100, consumed=2)
    assert link.has_room() and link.in_flight == 1
    link.credit(peer_session=100, consumed=1)  # stale: never goes back
    assert link.consumed == 2
    link.add_tell(b"4")
    link.add_tell(b"5")
    link.seal(b"a", 2, 9)
    assert not link.has_room()
    # the peer left and joined again in its process: its count restarts from what it got
    link.credit(peer_session=200, consumed=0)
    assert link.in_flight == 0
    link.credit(peer_session=200, consumed=10**9)  # never more than was sent
    assert link.consumed == link.sent == 5


def _frame(kind: int, body: bytes) -> bytes:
    return struct.pack(">IB", len(body) + 1, kind) + body


@pytest.mark.parametrize(
    ("frames", "numbered", "problem"),
    [
        (_frame(batch.TELL, b"one") + b"\x00\x00", 1, "frame 1 at byte 8: truncated length"),
        (_frame(batch.TELL, b"one")[:-1], 1, "frame 0 at byte 0: length 4 runs past the batch's 7"),
        (struct.pack(">IB", 0, batch.TELL), 1, "frame 0 at byte 0: length 0 runs past"),
        (
            _frame(batch.CREDIT, bytes(16)) + _frame(99, b"x"),
            0,
            "frame 1 at byte 21: unknown kind 99",
        ),
        (_frame(batch.TELL, b"one") + _frame(batch.TELL, b"two"), 1, "says 1 tells, it holds 2"),
        (_frame(batch.CANCEL, bytes(18)), 1, "says 1 tells, it holds 0"),
    ],
)
def test_a_batch_whose_frames_do_not_add_up_is_refused_whole(
    frames: bytes, numbered: int, problem: str
) -> None:
    with pytest.raises(batch.BatchError, match=re.escape(problem)):
        batch.split_frames(frames, 0, numbered)


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"NXB1", "shorter than"),
        (b"NXB4" + bytes(40), "not b'NXB2' or b'NXB3'"),
        (b"NXB1" + bytes(36) + b"\x00\x05ab", "does not fit"),
        (b"NXB1" + bytes(36) + b"\x00\x01a", "first number 0"),
    ],
)
def test_malformed_batch_heads_are_refused_saying_what_is_wrong(body: bytes, problem: str) -> None:
    with pytest.raises(batch.BatchError, match=problem):
        batch.parse_head(body)


def test_a_batch_of_the_version_before_is_still_read() -> None:
    # NXB1: the same head, its tells in format 1 JSON (what decode_tell reads as well)
    link = batch.NodeLink("b", 0xB, window=16)
    msg = Message(uuid.uuid4(), "sink", {"n": 1})
    link.add_tell(wire.encode_message(msg))
    body, tells = link.seal(b"a", 0xA, 0x5E55)
    assert body.startswith(b"NXB2") and tells == 1
    old = b"NXB1" + body[4:]
    head, offset = batch.parse_head(old)
    [frame], controls = batch.split_frames(old, offset, head.numbered)
    assert (head.node, controls) == ("a", [])
    assert wire.decode_tell(frame) == msg


def test_a_batch_subject_gives_back_its_node_and_session() -> None:
    for session in (None, 0, 0x5E55, (1 << 64) - 1):
        subject = wire.batch_subject("nexus", "node-1", session)
        assert wire.batch_destination("nexus", subject) == ("node-1", session)
    for subject in ("other.node.a.batch", "nexus.node.a.agent.x", "nexus.node.a.batchy"):
        with pytest.raises(ValueError, match="not a batch subject"):
            wire.batch_destination("nexus", subject)


@pytest.mark.parametrize(
    ("kind", "body"),
    [
        ("request_failed", b"[" * 100_000 + b"]" * 100_000),
        ("request_failed", b'{"reason": ' + b"[" * 900 + b"]" * 900 + b', "error": 1}'),
        ("request_failed", b'{"error": {"trace": [1, 2]}}'),
        ("shutting_down", b'{"what": ["send"]}'),
        ("mailbox_full", b'{"recipient": "%s", "capacity": Infinity, "message_id": "%s"}'),
        ("mailbox_full", b'{"recipient": "%s", "capacity": 2.5, "message_id": "%s"}'),
        ("mailbox_full", b'{"recipient": "%s", "capacity": 2, "name": 7, "message_id": "%s"}'),
    ],
)
def test_a_hostile_error_frame_is_an_error_with_text_or_a_value_error(
    kind: str, body: bytes
) -> None:
    """Regression: an error frame nested past the recursion limit raised RecursionError,
    and a mailbox_full one with a capacity of Infinity OverflowError, where the caller
    catches ValueError (the reply handler of the node would end); a capacity of 2.5 was
    taken as 2, a name or error text that is not a string was kept as it was."""
    uid = str(uuid.uuid4()).encode()
    body = body.replace(b"%s", uid)
    qid = uuid.uuid4()
    if kind == "mailbox_full":
        with pytest.raises(ValueError, match="malformed mailbox_full error frame"):
            wire.error_from_frame(kind, body, query_id=qid, to="x", node="b")
        return
    error = wire.error_from_frame(kind, body, query_id=qid, to="x", node="b")
    assert str(error)
    if isinstance(error, RequestFailed):
        assert isinstance(error.reason, str)
        if error.error is not None:
            assert isinstance(error.error, RemoteError)
            assert error.error.text in ("1", '{"trace": [1, 2]}')
    else:
        assert isinstance(error, KernelShuttingDown)
        assert '["send"] on node' in str(error)


@pytest.mark.parametrize(
    "head",
    [
        b"[true,",
        b"[1.0,",
        b'["1",',
        b"[2.0,",
        b"[2,5,",
        b"[2,null,",
        b"[true,true,",
        b'[true,"n.1.2.3",',
    ],
)
def test_a_message_array_whose_format_is_not_the_integer_1_or_2_is_refused(head: bytes) -> None:
    """Regression: ``true`` and ``1.0`` were read as format 1 (they equal 1 in Python),
    and format 2 took any sequence value, not only a string."""
    fields = b'1,1700000000000000,2,3,"Command",null,null,null,{"x":1}]'
    body = head + fields
    if head.count(b",") == 1 and head.startswith(b"[2"):
        body = head + b'"n.1.2.3",' + fields
    for decode in (wire.decode_message, wire.decode_tell):
        with pytest.raises(MessageDecodeError, match="format 1"):
            decode(body)
    assert wire.decode_tell(b"[1," + fields).payload == {"x": 1}
    assert wire.decode_message(b'[2,"n.1.2.3",' + fields).payload == {"x": 1}


@pytest.mark.parametrize(
    "value",
    [
        "n.1.2. 5",
        "n.1.2.+5",
        "n.1.2.1_0",
        "n.1.2.-5",
        "n.1.0x2.5",
        "n.0x1.2.5",
        "n.1.-2.5",
        "n.01.2.5",
        "n.1.2.05",
        "n.1.2.٣",
        "n.A.2.5",
        ".1.2.5",
        "n. 1.2.5",
        "n.1.2.5\n",
    ],
)
def test_a_sequence_number_not_written_as_sequence_value_writes_it_is_refused(
    value: str,
) -> None:
    """Regression: int() read " 5", "+5", "1_0", "-5", "٣" (an Arabic-Indic 3) and
    "0x2" (base 16), so such values passed for sequence numbers; only what
    sequence_value writes is read now."""
    with pytest.raises(ValueError, match="malformed sequence number"):
        wire.parse_sequence(value)
    assert wire.parse_sequence(wire.sequence_value("n-1", 0xAB, 0, 12)) == ("n-1.ab", 0, 12)
    # the stream as nodes name it: the node with its join's session
    assert wire.parse_sequence("n:5f.ab.0.12") == ("n:5f.ab", 0, 12)
    with pytest.raises(ValueError, match="malformed sequence number"):
        wire.parse_sequence("n:5F.ab.0.12")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'[1,1,1,1,"\\ud800","Command",null,null,null,1]', "<document>"),
        (b'[1,1,1,1,"bob","Command",null,null,null,["\\udfff", Infinity]]', "<document>"),
        (_binary(rest=b"\x11" * 16 + b'{"a": "\\ud800"}'), "payload"),
        (b'{"from": "%s", "to": "\\ud800", "kind": "Command", "payload": 1}', "<document>"),
        # an id as the recipient (the check of the JSON form missed the payload then)
        (b'{"from": "%s", "to": "%s", "kind": "Command", "payload": "\\ud800"}', "<document>"),
    ],
)
def test_a_lone_surrogate_is_a_decode_error_not_a_message_no_encoder_writes(
    body: bytes, field: str
) -> None:
    """Regression: msgspec refuses a lone surrogate ("\\ud800"), and the standard library
    it falls back to read it: the message was accepted, and encode_tell / encode_message
    raised UnicodeEncodeError on it (when forwarded, answered with it, ...)."""
    body = body.replace(b"%s", str(uuid.UUID(int=1)).encode())
    decoders = (
        [wire.decode_tell] if body[:1] >= b"\x80" else [wire.decode_message, wire.decode_tell]
    )
    for decode in decoders:
        with pytest.raises(MessageDecodeError, match="lone surrogate") as err:
            decode(body)
        assert err.value.field == field
    # a pair of surrogates is one character, and Infinity still reads
    pair = b'[1,1,1,1,"bob","Command",null,null,null,["\\ud83d\\ude00", Infinity]]'
    msg = wire.decode_tell(pair)
    assert msg.payload == ["\U0001f600", math.inf]
    assert wire.decode_tell(wire.encode_tell(msg)) == msg


def test_two_nodes_sharing_an_id_prefix_are_reported_once_not_per_heartbeat(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Two kernels in one process share the prefix; each heartbeat of either logged it again.
    table = MemberTable("a", lost_after=3.0)
    with caplog.at_level(logging.ERROR, logger="nexus_trio.nats.membership"):
        for beat in range(10):
            table.heard(_info("a", 5, float(beat)))
            table.heard(_info("b", 5, float(beat)))
        table.heard(_info("c", 5, 10.0))  # another pair: reported too
        table.heard(_info("b", 6, 11.0))  # b restarted: its prefix is its own now
        table.heard(_info("d", 6, 12.0))  # and a new clash
    # c, which took prefix 5 over, keeps it when b's restart drops b's old one
    found = table.node_of(uuid.UUID(int=(5 << 64) | 1))
    assert found is not None and found.node == "c"
    clashes = [r.getMessage() for r in caplog.records if "share the id prefix" in r.getMessage()]
    assert clashes == [
        "nodes 'a' and 'b' share the id prefix 0000000000000005 (two kernels in one process?):"
        " agent ids cannot tell them apart; address their agents by name",
        "nodes 'b' and 'c' share the id prefix 0000000000000005 (two kernels in one process?):"
        " agent ids cannot tell them apart; address their agents by name",
        "nodes 'b' and 'd' share the id prefix 0000000000000006 (two kernels in one process?):"
        " agent ids cannot tell them apart; address their agents by name",
    ]


class _ReprRaises(Exception):
    def __repr__(self) -> str:
        raise RuntimeError("no repr")


def test_an_error_frame_is_bounded_and_the_rebuilt_error_names_the_node_and_why() -> None:
    """Regression: a remote handler's error went into its frame as its whole repr: one of
    a megabyte made a frame NATS refuses (max_payload), and the requester waited out its
    timeout; one whose repr raises raised in the frame's making. The RequestFailed and
    MailboxFull a requester rebuilt from a frame did not say which node refused (a
    handler_timeout or agent_stopped one said nothing of where), and an AgentNotFound
    lost what that node knew of why (being stopped, given up on)."""
    qid, rid, mid = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    kind, body = wire.error_frame(RequestFailed(qid, "h", "handler_error", ValueError("x" * 2**20)))
    assert len(body) < 5_000
    back = wire.error_from_frame(kind, body, query_id=qid, to="h", node="b")
    assert isinstance(back, RequestFailed) and back.node == "b"
    assert isinstance(back.error, RemoteError)
    assert back.error.text.startswith("ValueError('xxx")
    assert back.error.text.endswith(f"... ({2**20 + 14 - 4_000:,} more characters cut)")
    kind, body = wire.error_frame(RequestFailed(qid, "h", "handler_error", _ReprRaises()))
    back = wire.error_from_frame(kind, body, query_id=qid, to="h", node="b")
    assert isinstance(back, RequestFailed) and isinstance(back.error, RemoteError)
    assert back.error.text == "<_ReprRaises, whose repr() raised RuntimeError: no repr>"
    kind, body = wire.error_frame(RequestFailed(qid, "h", "handler_timeout", None))
    back = wire.error_from_frame(kind, body, query_id=qid, to="h", node="b")
    assert str(back) == f"request {qid} to 'h' failed on node 'b' (handler_timeout)"
    kind, body = wire.error_frame(MailboxFull(rid, "tiny", 1, mid))
    back = wire.error_from_frame(kind, body, query_id=qid, to="tiny", node="b")
    assert isinstance(back, MailboxFull) and back.node == "b"
    assert str(back) == (
        f"mailbox of agent 'tiny' ({rid}) on node 'b' is full (capacity 1); message {mid}"
        " was not enqueued"
    )
    stopping = AgentNotFound("h", detail="it is being stopped: it takes no new messages")
    kind, body = wire.error_frame(stopping)
    back = wire.error_from_frame(kind, body, query_id=qid, to="h", node="b")
    assert isinstance(back, AgentNotFound) and back.node == "b"
    assert back.detail == "it is being stopped: it takes no new messages"
    assert str(back) == (
        "no agent is registered as 'h' on node 'b' (it is being stopped: it takes no new messages)"
    )


_CAFE_OBJECT: Final = json.dumps(
    {"from": str(uuid.UUID(int=1)), "to": "caf\u00e9", "kind": "Command", "payload": "caf\u00e9"},
    ensure_ascii=False,
)
_CAFE_ARRAY: Final = '[1,1,1,1,"caf\u00e9","Command",null,null,null,"caf\u00e9"]'


@pytest.mark.parametrize("text", [_CAFE_OBJECT, _CAFE_ARRAY], ids=["object", "array"])
@pytest.mark.parametrize(
    "encoding",
    ["utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be", "utf-16", "latin-1", "utf-8-sig", "cesu"],
)
def test_a_body_that_is_not_utf_8_is_refused_saying_so(text: str, encoding: str) -> None:
    """Regression: the wire is UTF-8 JSON (docs/distributed.md), but the JSON form was read
    by ``json.loads(bytes)``, which guesses UTF-16 and UTF-32 and skips a byte order mark:
    a message in UTF-16-LE or UTF-32-LE (and to Message.from_json in any of them) was
    taken; bytes that were no UTF-8 were said as "'utf-8' codec can't decode byte 0xe9 in
    position 15". Now each decoder says it as the stdio bridges say it of a line."""
    if encoding == "cesu":  # UTF-8's form of a surrogate is no UTF-8 either
        body = text.replace("caf\u00e9", "\ud83d\ude00").encode("utf-8", "surrogatepass")
    else:
        body = text.encode(encoding)
    if encoding == "utf-8-sig":
        problem = "not JSON: Unexpected UTF-8 BOM"
    else:
        with pytest.raises(UnicodeDecodeError) as bad:
            body.decode()
        problem = f"not UTF-8 ({bad.value.reason} at byte {bad.value.start})"
    decoders: list[Any] = [wire.decode_message, wire.decode_tell]
    if text[0] == "{":
        decoders.append(Message.from_json)
    for decode in decoders:
        with pytest.raises(MessageDecodeError) as err:
            decode(body)
        assert err.value.field == "<document>", decode
        if decode is not wire.decode_tell or body[0] < 0x80:  # (else a binary tell's head)
            assert problem in str(err.value), (decode, str(err.value))
    # the same in UTF-8 reads
    assert wire.decode_message(text.encode()).payload == "caf\u00e9"


@pytest.mark.parametrize(
    ("rest", "field", "problem"),
    [
        (b'"caf\xe9"', "payload", "not UTF-8 (invalid continuation byte at byte 62)"),
        (b'\xef\xbb\xbf"cafe"', "payload", "Unexpected UTF-8 BOM"),
    ],
)
def test_a_binary_tell_whose_payload_is_not_utf_8_is_refused_saying_so(
    rest: bytes, field: str, problem: str
) -> None:
    """A binary tell's JSON payload is UTF-8 too: say where it is not, in the tell."""
    with pytest.raises(MessageDecodeError) as err:
        wire.decode_tell(_binary(rest=b"\x11" * 16 + rest))
    assert (err.value.field, problem in str(err.value)) == (field, True), str(err.value)


def test_a_binary_tell_to_a_name_that_is_not_utf_8_is_refused_saying_so() -> None:
    body = _binary(tag=0x81, rest=(4).to_bytes(2) + b"caf\xe9" + b"1")
    with pytest.raises(MessageDecodeError) as err:
        wire.decode_tell(body)
    assert err.value.field == "to"
    assert "not UTF-8 (unexpected end of data at byte 47)" in str(err.value)


def test_a_request_failed_frame_names_the_agent_asked_by_id() -> None:
    """Regression: a request by id that failed on another node said ``request ... to
    UUID('5b0c...') failed on node 'b' (handler_error)``: the frame carries the agent's
    name now, and the requester's error names it as a local one does; a frame of an
    earlier version (no name) names the id alone, written plainly."""
    qid, aid = uuid.uuid4(), uuid.uuid4()
    kind, body = wire.error_frame(RequestFailed(qid, aid, "handler_error", None, name="doomed"))
    back = wire.error_from_frame(kind, body, query_id=qid, to=aid, node="b")
    assert isinstance(back, RequestFailed) and back.name == "doomed"
    assert str(back) == f"request {qid} to 'doomed' ({aid}) failed on node 'b' (handler_error)"
    kind, body = wire.error_frame(RequestFailed(qid, aid, "handler_error", None))
    back = wire.error_from_frame(kind, body, query_id=qid, to=aid, node="b")
    assert str(back) == f"request {qid} to {aid} failed on node 'b' (handler_error)"
    # a name for a request asked by name is not taken (the text shows the name asked)
    body = json.dumps({"reason": "handler_error", "name": "other"}).encode()
    back = wire.error_from_frame("request_failed", body, query_id=qid, to="h", node="b")
    assert isinstance(back, RequestFailed) and back.name is None
    assert str(back) == f"request {qid} to 'h' failed on node 'b' (handler_error)"


def test_a_batchs_tells_decode_as_one_by_one_with_errors_in_their_order() -> None:
    """decode_tells (the batch receiver's loop) reads every kind of tell body as
    decode_tell does, in order, and hands each undecodable one's error to its callback,
    in order, leaving it out: binary to a known id and to an unknown one, to a name seen
    and not yet seen, with optional ids, an infinite payload (the standard library's
    reading), format 1 JSON, and bodies that are no tell."""
    me, known = uuid.uuid4(), uuid.uuid4()
    wire.decode_tell(wire.encode_tell(Message(me, known, 0)))  # known: its id cached
    name = f"fresh-{uuid.uuid4().hex}"  # a name no tell carried yet
    msgs = [
        Message(me, known, {"n": 1, "args": [1, 2]}),
        Message(me, uuid.uuid4(), [2, "two"]),
        Message(me, name, 3),
        Message(me, name, {"n": 4}),
        Message(me, known, 5, MessageKind.EVENT, trace_id=uuid.uuid4()),
        Message(me, "sink", math.inf),
        Message(me, known, {"n": 7}, conversation_id=uuid.uuid4(), reply_to=uuid.uuid4()),
    ]
    bodies = [wire.encode_tell(m) for m in msgs]
    bad = [b"", bodies[0][:50], bodies[0][:-1], b'{"from":"x","to":"a","kind":"Command"}']
    json_tell = Message(me, "json", 8)
    mixed = [
        bodies[0], bad[0], *bodies[1:3], bad[1], bodies[3], bad[2],
        *bodies[4:], wire.encode_message(json_tell), bad[3],
    ]  # fmt: skip
    errors: list[tuple[str, str]] = []
    decoded = wire.decode_tells(mixed, lambda exc: errors.append((exc.field, str(exc))))
    assert decoded == [*msgs, json_tell]
    assert [m.id for m in decoded] == [m.id for m in [*msgs, json_tell]]
    expected = []
    for body in bad:
        with pytest.raises(MessageDecodeError) as err:
            wire.decode_tell(body)
        expected.append((err.value.field, str(err.value)))
    assert errors == expected
    assert [field for field, _ in errors] == ["<document>", "to", "payload", "payload"]


# --- columnar node batches (NXB3) -------------------------------------------------------------


def _frames(body: bytes) -> list[tuple[int, bytes]]:
    """The frames of a batch as ``(kind, body)``, read here, not by _batch."""
    _head, offset = batch.read_head(body)
    frames = []
    while offset < len(body):
        length, kind = struct.unpack_from(">IB", body, offset)
        frames.append((kind, body[offset + 5 : offset + 4 + length]))
        offset += 4 + length
    return frames


def _frame_kinds(body: bytes) -> list[int]:
    return [kind for kind, _ in _frames(body)]


def test_rare_and_common_tells_in_one_columnar_batch_keep_their_order() -> None:
    """Per-sender order holds across a block's rows and the single tells between them: a
    tell with an optional id, to a name past 64 KiB, or of a time whose microseconds do
    not fit 64 bits goes alone, after the rows before it (the block closes there) and
    before the rows after it (a new block)."""
    from .test_wire_fuzz import add_columnar

    me, peer = uuid.uuid4(), uuid.uuid4()
    msgs = [
        Message(me, "sink", {"n": 0}),
        Message(me, peer, [1, 2]),
        Message(me, "sink", 2, conversation_id=uuid.uuid4()),  # rare: an optional id
        Message(me, "sink", {"n": 3}),
        Message(me, "x" * 70_000, 4),  # rare: a name past 64 KiB (format 1)
        Message(me, peer, "five", kind=MessageKind.EVENT),
        Message(me, "sink", 6, timestamp=2**70),  # rare: a time past 64 bits of us
        Message(me, "sink", {"n": 7}),
        Message(me, "sink", 8, trace_id=uuid.uuid4()),  # rare, last
    ]
    link = batch.NodeLink("b", 2, window=100, columnar=True)
    for msg in msgs:
        add_columnar(link, msg)
    link.add_cancel(uuid.uuid4(), "sink")
    body, tells = link.seal(b"a", 1, 7)
    assert body[:4] == b"NXB3" and tells == len(msgs)
    R, T, C = batch.ROWS, batch.TELL, batch.CANCEL
    assert _frame_kinds(body) == [R, T, R, T, R, T, R, T, C]
    head, offset = batch.read_head(body)
    errors: list[MessageDecodeError] = []
    read, controls = batch.read_columnar(body, offset, head.numbered, errors.append)
    assert read == msgs and errors == [] and [k for k, _ in controls] == [C]
    # a tell that does not decode among them is counted alone, the rest read in order
    link = batch.NodeLink("b", 2, window=100, columnar=True)
    add_columnar(link, msgs[0])
    link.add_tell(b"\x80bad")
    add_columnar(link, msgs[1])
    body, _ = link.seal(b"a", 1, 7)
    head, offset = batch.read_head(body)
    read, _ = batch.read_columnar(body, offset, head.numbered, errors.append)
    assert read == msgs[:2] and len(errors) == 1


def test_a_block_of_rows_is_read_in_place_from_its_batchs_bytes() -> None:
    """read_columnar hands each block to decode_block as the batch's own bytes and the
    block's bounds in them, not as a copy of the block (fiftieth pass: a block is most
    of a batch); the messages are those sent, in order, and a block refused by a row
    (its IndexError caught inside decode_block) leaves nothing the garbage collector
    cannot clear (an iter_unpack of a memoryview there was a segfault on 3.11)."""
    from .test_wire_fuzz import add_columnar

    me = uuid.UUID(int=9)
    msgs = [Message(me, "sink", {"n": n}) for n in range(3)]
    single = Message(me, "sink", 3, conversation_id=uuid.uuid4())  # a single tell
    link = batch.NodeLink("b", 2, window=100, columnar=True)
    for msg in [*msgs[:2], single, msgs[2]]:
        add_columnar(link, msg)
    body, _ = link.seal(b"a", 1, 7)
    head, offset = batch.read_head(body)
    calls: list[tuple[bool, bytes]] = []
    real_decode = wire.decode_block

    def decode(data: bytes, start: int, end: int) -> list[Message]:
        calls.append((data is body, bytes(data[start:end])))
        return real_decode(data, start, end)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(wire, "decode_block", decode)
        read, _ = batch.read_columnar(body, offset, head.numbered, print)
    assert read == [*msgs[:2], single, msgs[2]]
    blocks = [frame for kind, frame in _frames(body) if kind == batch.ROWS]
    assert [same for same, _ in calls] == [True, True]
    assert [block for _, block in calls] == blocks and len(blocks) == 2
    block, _ = _good_block()
    bad = _block_batch(_patched(block, 6 + 2 * 43, b"\x63"), 3)  # a kind code of 99
    head, offset = batch.parse_head(bad)
    for _ in range(20):
        with pytest.raises(batch.BatchError, match="kind code 99"):
            batch.read_columnar(bad, offset, head.numbered, print)
        gc.collect()


def test_a_block_of_rows_carries_each_rows_sender_and_the_id_drawn_at_its_close() -> None:
    """The rows of a block taken as take_tell takes them (row_fields: the id not drawn
    at the send) read back as the messages sent: each row its own sender where senders
    alternate (a row reuses the bytes of the sender of the row before only when it is
    the same), and the ids drawn when the block closes, one read before that included."""
    first, second = uuid.uuid4(), uuid.UUID(int=7)
    senders = [first, first, second, first, second, second, SYSTEM_ID]
    msgs = [Message(s, "sink", {"n": n}) for n, s in enumerate(senders)]
    link = batch.NodeLink("b", 2, window=100, columnar=True)
    link.entries.append(wire.table_entry("sink") or b"")
    for msg in msgs:
        fields = row_fields(msg)
        link.rows.append((fields, 0))
        link.jsons.append(wire.tell_payload_json(fields[2]))
        link.tells += 1
    read_before = msgs[3].id  # a sender reading its message's id after the send
    body, _ = link.seal(b"a", 1, 7)
    head, offset = batch.read_head(body)
    errors: list[MessageDecodeError] = []
    read, _ = batch.read_columnar(body, offset, head.numbered, errors.append)
    assert errors == [] and read == msgs
    assert [m.sender for m in read] == senders and read[3].id == read_before
    assert len({m.id for m in read}) == len(msgs)


def _block_batch(block: bytes, numbered: int, columnar: bool = True) -> bytes:
    link = batch.NodeLink("b", 2, window=100, columnar=columnar)
    link.frames += [batch.frame_head(len(block) + 1, batch.ROWS), block]
    link.tells = numbered
    return link.seal(b"a", 1, 7)[0]


def _good_block() -> tuple[bytes, list[Message]]:
    """A block of three rows to two addresses (offsets: head 6, rows 43 each, then the
    table: a name of 4 bytes, an id; then the payloads)."""
    me = uuid.UUID(int=9)
    msgs = [Message(me, "sink", 0), Message(me, uuid.UUID(int=3), [1]), Message(me, "sink", 2)]
    rows = [(stored_fields(m), i) for m, i in zip(msgs, [0, 1, 0], strict=True)]
    entries = [wire.table_entry("sink"), wire.table_entry(uuid.UUID(int=3))]
    jsons = [wire.tell_payload_json(m.payload) for m in msgs]
    return wire.encode_block(rows, [e for e in entries if e is not None], jsons), msgs


def _patched(data: bytes, at: int, new: bytes) -> bytes:
    return data[:at] + new + data[at + len(new) :]


_TABLE_AT: Final = 6 + 3 * 43
_JSON_AT: Final = _TABLE_AT + 6 + 18


@pytest.mark.parametrize(
    ("change", "numbered", "problem"),
    [
        (lambda b: _patched(b, 0, struct.pack(">I", 1000)), 1000, "1000 rows of 43 bytes"),
        (lambda b: _patched(b, 0, struct.pack(">I", 0)), 0, "0 rows"),
        (lambda b: _patched(b, 4, struct.pack(">H", 0)), 3, "0 addresses for 3 rows"),
        (lambda b: _patched(b, 4, struct.pack(">H", 3)), 3, "address 2 of 3:"),
        (lambda b: _patched(b, 4, struct.pack(">H", 4)), 3, "4 addresses for 3 rows"),
        (lambda b: _patched(b, 6 + 43 + 41, struct.pack(">H", 2)), 3, "row 1: address 2 of 2"),
        (lambda b: _patched(b, 6 + 2 * 43, b"\x63"), 3, "row 2: address 0 of 2, kind code 99"),
        (lambda b: _patched(b, _TABLE_AT, struct.pack(">H", 900)), 3, "900 bytes do not fit"),
        (lambda b: _patched(b, _TABLE_AT + 2, b"\xff"), 3, "not UTF-8"),
        (lambda b: b[:_JSON_AT] + b"[0,[1]]", 3, "of 2, not an array of 3"),
        (lambda b: b[:_JSON_AT] + b'{"a":1}', 3, "a JSON dict of 1, not an array of 3"),
        (lambda b: b[:_JSON_AT] + b"[0,[1],", 3, "payloads"),
        (lambda b: b[:3], 3, "a block of 3 bytes"),
        (lambda b: b, 4, "batch head says 4 tells, it holds 3"),
    ],
)
def test_a_bad_block_of_rows_is_refused_whole_saying_what_is_wrong(
    change: Any, numbered: int, problem: str
) -> None:
    block, msgs = _good_block()
    body = _block_batch(block, 3)
    head, offset = batch.read_head(body)
    assert batch.read_columnar(body, offset, 3, print)[0] == msgs
    body = _block_batch(change(block), numbered)
    head, offset = batch.parse_head(body)
    with pytest.raises(batch.BatchError, match=re.escape(problem)):
        batch.read_columnar(body, offset, head.numbered, print)
    # as the node reads it (bad_rows, forty-fifth pass): the block left out, its rows
    # counted, where its head's count is the batch's and (forty-sixth pass) its bytes
    # could hold that many rows (6 bytes of head, 43 a row); else the batch is refused
    # whole (the head that says 1000 rows in the bytes of 3 among them)
    changed = change(block)
    rows = struct.unpack_from(">I", changed)[0] if len(changed) >= 4 else 0
    bad: list[tuple[int, str]] = []
    if 1 <= rows == numbered and 6 + rows * 43 <= len(changed):
        read, _ = batch.read_columnar(
            body, offset, head.numbered, print, lambda n, e: bad.append((n, str(e)))
        )
        assert read == [] and len(bad) == 1 and bad[0][0] == numbered
        assert problem in bad[0][1]
    else:
        with pytest.raises(batch.BatchError, match=re.escape(problem)):
            batch.read_columnar(
                body, offset, head.numbered, print, lambda n, e: bad.append((n, str(e)))
            )
        assert bad == []


def test_a_bad_block_among_good_frames_is_left_out_and_the_rest_read_in_order() -> None:
    """With ``bad_rows`` (the node's reading), a bad block between a good block and a
    single tell: the good ones read in order, the bad one's rows handed to ``bad_rows``
    once, in its place (after the undecodable tell before it)."""
    block, msgs = _good_block()
    bad_block = _patched(block, 6 + 43 + 41, struct.pack(">H", 2))  # row 1: address 2 of 2
    link = batch.NodeLink("b", 2, window=100, columnar=True)
    tell = wire.encode_tell(msgs[0])
    for part in (block, b"\x80bad", bad_block, tell):
        kind = batch.TELL if part in (b"\x80bad", tell) else batch.ROWS
        link.frames += [batch.frame_head(len(part) + 1, kind), part]
    link.tells = 3 + 1 + 3 + 1
    body, _ = link.seal(b"a", 1, 7)
    head, offset = batch.read_head(body)
    said: list[Any] = []
    read, _ = batch.read_columnar(
        body, offset, head.numbered, said.append, lambda n, e: said.append((n, str(e)))
    )
    assert read == [*msgs, msgs[0]]
    assert len(said) == 2 and isinstance(said[0], MessageDecodeError)
    assert said[1][0] == 3 and "block of rows 1, after 2 tells: row 1: address 2 of 2" in said[1][1]


def test_a_block_whose_head_counts_more_rows_than_its_bytes_hold_is_the_batchs_fault() -> None:
    """A block's head is not taken on its word (forty-sixth pass): one that says more
    rows than its bytes could hold refuses the batch whole, naming the block, even where
    its count adds up to the batch's head (a single tell and a block said to hold 5,
    whose bytes hold 3); no tell of it is delivered and ``bad_rows`` is not called
    (until then the tell was delivered and the 5 rows handed to ``bad_rows``). One
    that says exactly as many as its bytes hold, but is bad otherwise, is its rows'
    loss only."""
    block, msgs = _good_block()
    tell = wire.encode_tell(msgs[0])

    def batch_of(part: bytes, numbered: int) -> bytes:
        link = batch.NodeLink("b", 2, window=100, columnar=True)
        link.frames += [batch.frame_head(len(tell) + 1, batch.TELL), tell]
        link.frames += [batch.frame_head(len(part) + 1, batch.ROWS), part]
        link.tells = numbered
        return link.seal(b"a", 1, 7)[0]

    bad_json = block[:_JSON_AT] + b"[0,[1],"  # 3 rows, payloads no JSON
    overclaimed = _patched(bad_json, 0, struct.pack(">I", 5))
    assert len(overclaimed) < 6 + 5 * 43
    said: list[Any] = []
    body = batch_of(overclaimed, 1 + 5)
    head, offset = batch.read_head(body)
    with pytest.raises(batch.BatchError, match=re.escape("block of rows 0, after 1 tells: 5 rows")):
        batch.read_columnar(body, offset, head.numbered, said.append, lambda *a: said.append(a))
    assert said == []
    body = batch_of(bad_json, 1 + 3)
    head, offset = batch.read_head(body)
    read, _ = batch.read_columnar(
        body, offset, head.numbered, said.append, lambda n, e: said.append((n, str(e)))
    )
    assert read == [msgs[0]] and len(said) == 1 and said[0][0] == 3
    assert "block of rows 0, after 1 tells: its payloads are no JSON" in said[0][1]


def test_a_block_of_rows_is_no_frame_of_an_nxb2_batch() -> None:
    block, _ = _good_block()
    body = _block_batch(block, 3, columnar=False)
    head, offset = batch.read_head(body)
    assert body[:4] == b"NXB2" and not head.columnar
    with pytest.raises(batch.BatchError, match="unknown kind 4"):
        batch.split_frames(body, offset, head.numbered)


def test_a_record_lists_the_batch_versions_its_node_reads() -> None:
    """A record without ``batches`` (a kernel of an earlier version) reads NXB2 only: no
    NXB3 is written to it; one that lists NXB3 gets it; a version this kernel does not
    know is kept and never written; a bad list is refused naming the field."""
    old = decode_record(encode_record("a", 1, 0.0, {}), 0.0)
    assert old.batches is None
    assert old.reads_batches("NXB2") and not old.reads_batches("NXB3")
    new = decode_record(encode_record("a", 1, 0.0, {}, batches=("NXB2", "NXB3", "NXB9")), 0.0)
    assert new.reads_batches("NXB3") and new.reads_batches("NXB2")
    assert new.batches == frozenset({"NXB2", "NXB3", "NXB9"})
    three = decode_record(encode_record("a", 1, 0.0, {}, batches=["NXB3"]), 0.0)
    assert not three.reads_batches("NXB2")
    for bad in ("NXB3", [3], [""], ["x" * 17], ["NXB2"] * 17):
        record = json.loads(encode_record("a", 1, 0.0, {}))
        record["batches"] = bad
        with pytest.raises(ValueError, match="bad 'batches'"):
            decode_record(json.dumps(record).encode(), 0.0)
