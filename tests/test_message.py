from __future__ import annotations

import collections
import dataclasses
import enum
import json
import re
import sys
import time
import uuid
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any, Final

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nexus_trio import SYSTEM_ID, Message, MessageDecodeError, MessageKind, new_id
from nexus_trio._message import (
    check_json,
    id_value,
    new_message,
    row_fields,
    row_ids,
    stored_fields,
)

from .hang_guard import SLOW_DRAWS

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=12,
)


def test_wire_shape_matches_the_original_fields() -> None:
    msg = Message(
        SYSTEM_ID, "bob", {"ping": True}, MessageKind.QUERY, timestamp=1_700_000_000_123_456
    )
    wire = json.loads(msg.to_json())
    assert set(wire) == {
        "id",
        "timestamp",
        "from",
        "to",
        "kind",
        "conversation_id",
        "reply_to",
        "trace_id",
        "payload",
    }
    assert wire["from"] == "00000000-0000-0000-0000-000000000000"
    assert wire["to"] == "bob"
    assert wire["kind"] == "Query"
    assert wire["timestamp"] == "2023-11-14T22:13:20.123456Z"
    assert wire["conversation_id"] is None and wire["reply_to"] is None and wire["trace_id"] is None
    assert wire["payload"] == {"ping": True}


@SLOW_DRAWS
@given(payload=json_values, kind=st.sampled_from(MessageKind), named=st.booleans())
def test_json_round_trip_is_exact(payload: object, kind: MessageKind, named: bool) -> None:
    to: uuid.UUID | str = "agent-b" if named else uuid.uuid4()
    msg = Message(
        uuid.uuid4(), to, payload, kind, trace_id=uuid.uuid4(), conversation_id=uuid.uuid4()
    )
    assert Message.from_json(msg.to_json()) == msg


def test_reply_follows_the_design() -> None:
    asker = uuid.uuid4()
    trace = uuid.uuid4()
    query = Message(asker, "b", 1, MessageKind.QUERY, trace_id=trace)
    answer = query.reply(uuid.uuid4(), 2)
    assert answer.to == asker
    assert answer.kind is MessageKind.RESPONSE
    assert answer.reply_to == query.id
    assert answer.conversation_id == query.id
    assert answer.trace_id == trace
    follow_up = answer.reply(asker, 3)
    assert follow_up.conversation_id == query.id


def test_original_bridge_response_without_id_or_timestamp_decodes() -> None:
    sender = uuid.uuid4()
    msg = Message.from_json(
        json.dumps(
            {"from": str(sender), "to": str(SYSTEM_ID), "kind": "Response", "payload": {"r": 42}}
        )
    )
    assert msg.sender == sender and msg.to == SYSTEM_ID and msg.payload == {"r": 42}
    assert msg.reply_to is None and isinstance(msg.id, uuid.UUID)


@pytest.mark.parametrize(
    ("document", "field", "problem"),
    [
        ("not json", "<document>", "not JSON"),
        ("[1]", "<document>", "expected a JSON object"),
        ('{"to":"a","kind":"Command","payload":1}', "from", "missing"),
        ('{"from":"nope","to":"a","kind":"Command","payload":1}', "from", "UUID"),
        ('{"from":"%s","to":"a","kind":"Shout","payload":1}', "kind", "unknown kind 'Shout'"),
        ('{"from":"%s","to":"a","kind":7,"payload":1}', "kind", "expected a string"),
        ('{"from":"%s","to":5,"kind":"Command","payload":1}', "to", "agent id or name"),
        ('{"from":"%s","to":"a","kind":"Command"}', "payload", "missing"),
        (
            '{"from":"%s","to":"a","kind":"Command","payload":1,"timestamp":3}',
            "timestamp",
            "RFC 3339",
        ),
        (
            '{"from":"%s","to":"a","kind":"Command","payload":1,"timestamp":"2024-01-01T00:00:00"}',
            "timestamp",
            "no UTC offset",
        ),
        ('{"from":"%s","to":"a","kind":"Command","payload":1,"reply_to":"zz"}', "reply_to", "UUID"),
    ],
)
def test_bad_input_names_the_field(document: str, field: str, problem: str) -> None:
    if "%s" in document:
        document = document % uuid.uuid4()
    with pytest.raises(MessageDecodeError) as info:
        Message.from_json(document)
    assert info.value.field == field
    assert problem in str(info.value)
    assert repr(field) in str(info.value)


def test_json_nested_past_the_recursion_limit_is_a_decode_error() -> None:
    """Regression: a document nested deeper than the JSON reader goes raised
    RecursionError out of ``Message.from_json`` instead of the decode error it promises."""
    nested = "[" * 100_000 + "1" + "]" * 100_000
    document = f'{{"from":"{uuid.uuid4()}","to":"a","kind":"Command","payload":{nested}}}'
    with pytest.raises(MessageDecodeError) as info:
        Message.from_json(document)
    assert info.value.field == "<document>"
    assert "recursion" in str(info.value)


def test_ids_are_unique_well_formed_version_4() -> None:
    ids = [new_id() for _ in range(10_000)]
    assert len(set(ids)) == 10_000
    assert {i.version for i in ids} == {4}
    assert {i.variant for i in ids} == {uuid.RFC_4122}
    assert uuid.UUID(str(ids[0])) == ids[0]


def test_messages_are_immutable() -> None:
    msg = Message(SYSTEM_ID, "a")
    with pytest.raises(AttributeError):
        msg.payload = 1  # type: ignore[misc]


def test_every_field_is_read_only() -> None:
    msg = Message(SYSTEM_ID, "a")
    for name in (
        "sender",
        "to",
        "payload",
        "kind",
        "id",
        "timestamp",
        "conversation_id",
        "reply_to",
        "trace_id",
    ):
        with pytest.raises(AttributeError):
            setattr(msg, name, None)
    with pytest.raises(AttributeError):
        msg.extra = 1  # type: ignore[attr-defined]
    assert msg.to == "a" and msg.payload is None


def test_the_id_is_built_once_on_first_access_and_stays() -> None:
    msg = Message(SYSTEM_ID, "a")
    first = msg.id
    assert first is msg.id
    assert first.version == 4 and first.variant == uuid.RFC_4122
    assert uuid.UUID(str(first)) == first
    # ids of messages and new_id() come from one counter: never the same
    ids = {Message(SYSTEM_ID, "a").id for _ in range(1000)} | {new_id() for _ in range(1000)}
    assert len(ids) == 2000


def test_an_id_is_drawn_when_first_needed_not_when_the_message_is_built() -> None:
    first, second = Message(SYSTEM_ID, "a"), Message(SYSTEM_ID, "b")
    # the later message asked first draws the earlier number of the one counter
    second_id = second.id
    first_id = first.id
    assert first_id.int == second_id.int + 1
    assert (first.id, second.id) == (first_id, second_id)  # and they stay
    built, encoded = Message(SYSTEM_ID, "a"), Message(SYSTEM_ID, "a")
    drawn = id_value(encoded)  # an encode draws it too, as a plain value
    assert built.id.int == drawn + 1 and encoded.id.int == drawn


def test_threads_reading_a_new_message_id_at_once_all_see_the_same_id() -> None:
    import threading

    messages = [Message(SYSTEM_ID, "a") for _ in range(2000)]
    seen: list[list[uuid.UUID]] = [[] for _ in range(4)]
    start = threading.Barrier(4)

    def read(out: list[uuid.UUID]) -> None:
        start.wait()
        out.extend(msg.id for msg in messages)

    threads = [threading.Thread(target=read, args=(out,)) for out in seen]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert seen[0] == seen[1] == seen[2] == seen[3] == [msg.id for msg in messages]
    assert len(set(seen[0])) == 2000


def test_threads_reading_a_new_message_id_through_stored_fields_see_the_same_id() -> None:
    """A codec's read (stored_fields, which draws an id not drawn yet) and ``.id``
    from four threads at once: one id per message, the same for all."""
    import threading

    messages = [Message(SYSTEM_ID, "a") for _ in range(2000)]
    seen: list[list[int]] = [[] for _ in range(4)]
    start = threading.Barrier(4)

    def read(index: int, out: list[int]) -> None:
        start.wait()
        if index % 2:
            # as stored: the value, or the UUID another thread's ``.id`` made of it
            values = (stored_fields(msg)[4] for msg in messages)
            out.extend(v if isinstance(v, int) else v.int for v in values)
        else:
            out.extend(msg.id.int for msg in messages)

    threads = [threading.Thread(target=read, args=(index, out)) for index, out in enumerate(seen)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert seen[0] == seen[1] == seen[2] == seen[3] == [msg.id.int for msg in messages]
    assert len(set(seen[0])) == 2000


def test_row_ids_draw_the_ids_row_fields_left_and_keep_one_read_since() -> None:
    """A columnar block's rows take their fields without the id's draw (row_fields);
    row_ids draws them at the block's close, in order, from the one counter, under one
    hold of the lock, and stores each in its message; an id read between the two (a
    sender reading ``msg.id`` after its send) is the one the row carries."""
    messages = [Message(SYSTEM_ID, "a", {"n": n}) for n in range(5)]
    fields = [row_fields(msg) for msg in messages]
    assert all(f[4].__class__ not in (int, uuid.UUID) for f in fields)  # not drawn
    assert all(f[9] is msg for f, msg in zip(fields, messages, strict=True))
    read_since = messages[2].id  # drawn now, after its fields were taken
    ids = row_ids([(f, 0) for f in fields])
    values = [v if isinstance(v, int) else v.int for v in ids]
    assert values == [msg.id.int for msg in messages]
    assert values[2] == read_since.int and len(set(values)) == 5
    # drawn once: the same ids again, and the ones stored_fields reads
    again = row_ids([(f, 0) for f in fields])
    assert [v if isinstance(v, int) else v.int for v in again] == values
    assert [stored_fields(msg)[4] for msg in messages] == again


def test_an_encoded_tell_draws_its_id_in_stored_fields_without_id_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The binary encode of a new tell reads its id drawn by stored_fields (from the one
    counter, as id_value draws it, and kept), without a call of id_value a tell."""
    from nexus_trio._nats import _wire

    calls = 0

    def counting(msg: Message) -> int:
        nonlocal calls
        calls += 1
        return id_value(msg)

    monkeypatch.setattr(_wire, "id_value", counting)
    first, second, third = (Message(SYSTEM_ID, "a", {"n": n}) for n in range(3))
    fields = stored_fields(second)
    assert fields[4].__class__ is int
    assert stored_fields(second)[4] == fields[4] == id_value(second) == second.id.int
    assert first.id.int == fields[4] + 1  # the next number of the one counter
    body = _wire.encode_tell(third)
    assert calls == 0
    assert _wire.decode_tell(body).id == third.id == uuid.UUID(int=fields[4] + 2)


def test_an_explicit_id_and_timestamp_are_kept_exactly() -> None:
    given = uuid.uuid4()
    msg = Message(SYSTEM_ID, "a", id=given, timestamp=1_700_000_000_123_456)
    assert msg.id is given
    assert msg.timestamp == 1_700_000_000_123_456
    assert isinstance(msg.timestamp, int)
    assert msg.sent_at.isoformat() == "2023-11-14T22:13:20.123456+00:00"


def test_an_id_given_as_its_128_bit_value_is_that_uuid() -> None:
    value = uuid.uuid4().int
    msg = Message(SYSTEM_ID, "a", id=value)
    assert id_value(msg) == value  # no UUID needed to read it back
    assert msg.id == uuid.UUID(int=value) and msg.id is msg.id
    assert msg == Message(SYSTEM_ID, "a", id=uuid.UUID(int=value), timestamp=msg.timestamp)
    assert id_value(Message(SYSTEM_ID, "a", id=msg.id)) == value
    fresh = Message(SYSTEM_ID, "a")
    assert id_value(fresh) == fresh.id.int


@pytest.mark.parametrize("value", [-1, 1 << 128])
def test_an_id_value_out_of_range_is_refused_naming_it(value: int) -> None:
    with pytest.raises(ValueError, match="message id must be a 128-bit value"):
        Message(SYSTEM_ID, "a", id=value)


def test_an_id_value_too_long_to_write_is_refused_by_its_size() -> None:
    """An id of 5,000 digits was refused with Python's own ValueError (the refusal's
    ``{id!r}`` past the 4,300-digit limit), naming no id: now the refusal, by its size."""
    with pytest.raises(ValueError, match=r"^a message id") as caught:
        Message(SYSTEM_ID, "a", id=10**5000)
    assert str(caught.value) == (
        "a message id must be a 128-bit value, got an integer of about 5,000 digits"
    )


def test_the_timestamp_is_whole_microseconds_now() -> None:
    import time

    before = time.time_ns() // 1000
    msg = Message(SYSTEM_ID, "a")
    after = time.time_ns() // 1000
    assert isinstance(msg.timestamp, int)
    assert before <= msg.timestamp <= after


def test_new_message_builds_what_the_constructor_builds() -> None:
    # The kernel's hot paths build messages with new_message (no class call): the result
    # must be the same object the constructor makes, with its own fresh id and time.
    to, trace, conversation, answered = (uuid.uuid4() for _ in range(4))
    before = time.time_ns() // 1000
    built = new_message(SYSTEM_ID, to, [1], MessageKind.RESPONSE, trace, conversation, answered)
    after = time.time_ns() // 1000
    assert type(built) is Message
    assert before <= built.timestamp <= after
    same = Message(
        SYSTEM_ID,
        to,
        [1],
        MessageKind.RESPONSE,
        id=built.id,
        timestamp=built.timestamp,
        conversation_id=conversation,
        reply_to=answered,
        trace_id=trace,
    )
    assert built == same and repr(built) == repr(same)
    assert Message.from_json(built.to_json()) == built
    plain = new_message(SYSTEM_ID, "bob", None, MessageKind.COMMAND, None)
    assert (plain.conversation_id, plain.reply_to, plain.trace_id) == (None, None, None)
    assert plain.id != built.id and plain.id.version == 4
    with pytest.raises(AttributeError):
        plain.payload = 1  # type: ignore[misc]


def test_equality_hash_and_repr_cover_every_field() -> None:
    msg = Message(SYSTEM_ID, "a", 1, MessageKind.EVENT, timestamp=5, trace_id=SYSTEM_ID)
    same = Message(SYSTEM_ID, "a", 1, MessageKind.EVENT, id=msg.id, timestamp=5, trace_id=SYSTEM_ID)
    assert msg == same
    assert (msg != same) is False
    assert hash(msg) == hash(same)
    assert len({msg, same}) == 1
    assert msg != same.evolve(payload=2)
    assert msg != same.evolve(timestamp=6)
    assert msg != Message(SYSTEM_ID, "a", 1, MessageKind.EVENT, timestamp=5, trace_id=SYSTEM_ID)
    assert msg != (SYSTEM_ID, "a", 1)
    assert repr(msg) == (
        "Message(sender=UUID('00000000-0000-0000-0000-000000000000'), to='a', payload=1, "
        f"kind=<MessageKind.EVENT: 'Event'>, id={msg.id!r}, timestamp=5, conversation_id=None, "
        "reply_to=None, trace_id=UUID('00000000-0000-0000-0000-000000000000'))"
    )
    with pytest.raises(TypeError, match="unhashable"):
        hash(Message(SYSTEM_ID, "a", {"a": 1}))


def test_evolve_changes_only_the_named_fields_and_keeps_the_id() -> None:
    msg = Message(SYSTEM_ID, "a", 1, MessageKind.QUERY, trace_id=SYSTEM_ID)
    changed = msg.evolve(to="b", kind=MessageKind.COMMAND)
    assert (changed.to, changed.kind) == ("b", MessageKind.COMMAND)
    assert (changed.id, changed.timestamp, changed.payload, changed.trace_id) == (
        msg.id,
        msg.timestamp,
        1,
        SYSTEM_ID,
    )
    assert (msg.to, msg.kind) == ("a", MessageKind.QUERY)
    with pytest.raises(TypeError, match="unknown field 'colour'"):
        msg.evolve(colour="red")


@pytest.mark.parametrize("access_id_first", [True, False])
def test_pickling_round_trips_with_the_same_id(access_id_first: bool) -> None:
    import copy
    import pickle

    msg = Message(SYSTEM_ID, "a", {"x": [1, 2]}, MessageKind.QUERY, reply_to=SYSTEM_ID)
    expected_id = msg.id if access_id_first else None
    copied = pickle.loads(pickle.dumps(msg))
    assert copied == msg and copied.id == msg.id
    if expected_id is not None:
        assert copied.id == expected_id
    assert copy.copy(msg) == msg and copy.deepcopy(msg) == msg


def test_positional_and_pattern_matching_order_is_the_field_order() -> None:
    msg = Message(SYSTEM_ID, "a", 3, MessageKind.EVENT)
    match msg:
        case Message(sender, to, payload, kind):
            assert (sender, to, payload, kind) == (SYSTEM_ID, "a", 3, MessageKind.EVENT)
        case _:
            pytest.fail("Message did not match positionally")


def test_the_converter_reports_every_bad_field_at_once() -> None:
    from cattrs import ClassValidationError

    from nexus_trio._message import converter

    with pytest.raises(ClassValidationError) as info:
        converter.structure({"from": "x", "to": 5, "kind": "Command", "payload": 1}, Message)
    names = [note.name for exc in info.value.exceptions for note in exc.__notes__]
    assert names == ["sender", "to"]


# (in a fresh interpreter of its own: one this suite's threads ran in warns at os.fork()
# on Python 3.12+, "This process is multi-threaded", a fork that may deadlock its child)
FORKED_IDS = """
import os
from nexus_trio import SYSTEM_ID, Message, new_id
from nexus_trio._message import id_value, stored_fields

read, write = os.pipe()
before = Message(SYSTEM_ID, "a")  # created before the fork, id not yet drawn
also = Message(SYSTEM_ID, "b")
encoded = Message(SYSTEM_ID, "c")  # its id drawn by an encode in the child
fields = Message(SYSTEM_ID, "d")  # ... and by a codec's read of its fields
pid = os.fork()
if pid == 0:
    os.write(
        write,
        f"{new_id()} {before.id} {also.id} {id_value(encoded)} {stored_fields(fields)[4]}".encode(),
    )
    os._exit(0)
os.close(write)
child = os.read(read, 400).decode()
os.close(read)
os.waitpid(pid, 0)
print(child)
print(new_id(), before.id, also.id, encoded.id.int, stored_fields(fields)[4], fields.id.int)
"""


def test_a_forked_child_draws_ids_from_a_new_sequence() -> None:
    import os
    import subprocess

    if not hasattr(os, "fork"):
        pytest.skip("no fork on this platform")
    # (-W error: a fork the interpreter warns about fails the run)
    run = subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning", "-c", FORKED_IDS],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0 and run.stderr == "", run.stderr
    child, parent = (line.split() for line in run.stdout.splitlines())
    child_new, child_before, child_also, child_encoded, child_fields = child
    parent_new, before, also, encoded, fields, fields_id = parent
    assert uuid.UUID(child_new).int >> 64 != uuid.UUID(parent_new).int >> 64
    # the same message has the same id in both processes, whichever asked first
    assert child_before == before
    assert child_also == also != before
    assert child_encoded == encoded
    assert child_fields == fields == fields_id
    assert uuid.UUID(before).version == 4 and uuid.UUID(before).variant == uuid.RFC_4122


@pytest.mark.parametrize(
    ("timestamp", "text"),
    [
        (-62_135_596_800_000_000, "0001-01-01T00:00:00.000000Z"),
        (-30_610_224_000_000_001, "0999-12-31T23:59:59.999999Z"),
        (0, "1970-01-01T00:00:00.000000Z"),
        (1_767_323_045_000_006, "2026-01-02T03:04:05.000006Z"),
    ],
)
def test_the_json_form_writes_four_digit_years_and_reads_them_back(
    timestamp: int, text: str
) -> None:
    """Regression: a timestamp before the year 1000 was written with a year of three
    digits (``999-12-31T...``), which ``from_json`` refused: the message could not be read
    back."""
    msg = Message(SYSTEM_ID, "bob", None, timestamp=timestamp)
    assert json.loads(msg.to_json())["timestamp"] == text
    assert Message.from_json(msg.to_json()) == msg


@pytest.mark.parametrize("text", ["9999-12-31T23:59:59-05:00", "0001-01-01T00:00:00+00:01"])
def test_a_json_form_timestamp_outside_the_years_1_to_9999_utc_is_refused(text: str) -> None:
    """Regression: an RFC 3339 time whose offset puts it past the year 9999 (or before
    the year 1) in UTC was read, and the message's to_json raised OverflowError."""
    obj = {"from": str(SYSTEM_ID), "to": "bob", "kind": "Command", "payload": 1}
    with pytest.raises(MessageDecodeError) as err:
        Message.from_json(json.dumps({**obj, "timestamp": text}))
    assert err.value.field == "timestamp"
    assert "outside the years 1 to 9999 UTC" in str(err.value)


@pytest.mark.parametrize("timestamp", [253_402_300_800_000_000, -62_135_596_800_000_001, 2**70])
def test_to_json_of_a_timestamp_rfc_3339_cannot_write_is_a_value_error(timestamp: int) -> None:
    """Regression: a message dated past the year 9999 or before the year 1 (the NATS
    codecs carry any integer: another node may send one) raised OverflowError from
    to_json, which a process agent's bridge does not catch (it dead-letters a message
    whose to_json raises ValueError, reason unserialisable)."""
    msg = Message(SYSTEM_ID, "bob", None, timestamp=timestamp)
    with pytest.raises(ValueError, match="outside the years 1 to 9999 UTC"):
        msg.to_json()
    for edge in (-62_135_596_800_000_000, 253_402_300_799_999_999):
        ok = msg.evolve(timestamp=edge)
        assert Message.from_json(ok.to_json()) == ok


def test_to_json_of_a_payload_nested_past_the_recursion_limit_is_a_value_error() -> None:
    """Regression: a payload nested a few hundred levels deep (the NATS codecs and
    from_json read a thousand) raised RecursionError from to_json, which a process
    agent's bridge does not catch: it escaped the agent's handler instead of the
    message being dead-lettered as unserialisable."""
    depth = 900
    text = json.dumps({"from": str(SYSTEM_ID), "to": "bob", "kind": "Command", "payload": 1})
    text = text.replace('"payload": 1', '"payload": ' + "[" * depth + "]" * depth)
    msg = Message.from_json(text)
    with pytest.raises(ValueError, match="nested too deeply to write as JSON"):
        msg.to_json()
    shallow = msg.evolve(payload=[[[[]]]])
    assert Message.from_json(shallow.to_json()) == shallow


_SENDER = str(uuid.UUID(int=1))


@pytest.mark.parametrize(
    "document",
    [
        '{"from": "%s", "to": "\\ud800", "kind": "Command", "payload": 1}',
        '{"from": "%s", "to": "a", "kind": "Command", "payload": ["x\\udfff"]}',
        '{"from": "%s", "to": "a", "kind": "Command", "payload": {"\\ud83d": 1}}',
        '{"from": "%s", "to": "a", "kind": "Command", "payload": "\ud800"}',  # the character
        b'{"from": "%s", "to": "a", "kind": "Command", "payload": "\xed\xa0\x80"}',
        # an id as the recipient: the payload is checked all the same
        '{"from": "%s", "to": "%s", "kind": "Command", "payload": "\\ud800"}',
    ],
)
def test_from_json_refuses_a_lone_surrogate_as_the_nats_receive_path_does(
    document: str | bytes,
) -> None:
    """Regression: Message.from_json read a string holding half of a surrogate pair, which
    no UTF-8 encoder writes (answering or forwarding the message raised
    UnicodeEncodeError); the NATS codecs refused it already."""
    data = (
        document.replace(b"%s", _SENDER.encode())
        if isinstance(document, bytes)
        else document.replace("%s", _SENDER)
    )
    # (its UTF-8 form in bytes is no UTF-8: refused as that, as msgspec does)
    why = "lone surrogate" if isinstance(data, str) else r"not UTF-8 \(invalid continuation byte"
    with pytest.raises(MessageDecodeError, match=why) as err:
        Message.from_json(data)
    assert err.value.field == "<document>"
    # a whole pair is its one character, as before
    pair = '{"from": "%s", "to": "a", "kind": "Command", "payload": "\\ud83d\\ude00"}'
    assert Message.from_json(pair.replace("%s", _SENDER)).payload == "\U0001f600"


@pytest.mark.parametrize("timestamp", [253_402_300_800_000_000, -62_135_596_800_000_001, 2**70])
def test_sent_at_of_a_timestamp_outside_the_years_1_to_9999_is_a_value_error_naming_it(
    timestamp: int,
) -> None:
    """Regression: sent_at raised a bare OverflowError (from datetime) for a time the
    NATS codecs carry but datetime cannot hold; it refuses it as to_json does."""
    msg = Message(SYSTEM_ID, "bob", None, timestamp=timestamp)
    with pytest.raises(ValueError, match=f"^timestamp {timestamp} .*outside the years 1 to 9999"):
        _ = msg.sent_at
    for edge in (-62_135_596_800_000_000, 253_402_300_799_999_999):
        ok = msg.evolve(timestamp=edge)
        assert ok.sent_at == datetime.fromisoformat(json.loads(ok.to_json())["timestamp"])


@pytest.mark.parametrize(
    ("to", "payload"),
    [
        ("a", "\ud800"),
        ("\udfff", 1),
        ("a", {"k\udc00": [1]}),
        ("a", ["\ud83d\ude00"]),
        (SYSTEM_ID, ["\ud800"]),
    ],
)
def test_to_json_refuses_a_lone_surrogate_that_from_json_would_refuse(
    to: str | uuid.UUID, payload: object
) -> None:
    """What to_json writes, from_json reads: a string no UTF-8 encoder writes is a
    ValueError (a process agent's bridge dead-letters it, unserialisable), not JSON that
    every reader refuses. (In a str two surrogates are no pair either.)"""
    msg = Message(SYSTEM_ID, to, payload)
    with pytest.raises(ValueError, match="lone surrogate"):
        msg.to_json()
    fine = msg.evolve(to="a", payload=["\U0001f600", "\\ud800 is text here"])
    assert Message.from_json(fine.to_json()) == fine


# --- payloads that JSON has no type for -------------------------------------------------------


class _Colour(enum.Enum):
    RED = "red"


class _Level(enum.IntEnum):
    HIGH = 2


@dataclasses.dataclass
class _Point:
    x: int


#: payloads that a faster JSON encoder (msgspec's, the NATS codecs') or the JSON form's
#: converter wrote as something else (a datetime as a str, bytes as base64 or base85 text,
#: a set as a list, an Enum as its value, a dataclass as an object) and the standard
#: library's json refuses: by name, the payload and the start of the TypeError naming
#: its type and where it sits
NOT_JSON: Final[dict[str, tuple[Any, str]]] = {
    "datetime": (datetime(2026, 12, 3, 16, 3, 14), "payload is of type datetime.datetime,"),
    "date": (date(2026, 12, 3), "payload is of type datetime.date,"),
    "timedelta": (timedelta(days=1), "payload is of type datetime.timedelta,"),
    "bytes": (b"ab", "payload is of type bytes,"),
    "bytearray": (bytearray(b"ab"), "payload is of type bytearray,"),
    "set": ({1, 2}, "payload is of type set,"),
    "frozenset": (frozenset({3}), "payload is of type frozenset,"),
    "UUID": (uuid.UUID(int=7), "payload is of type uuid.UUID,"),
    "Decimal": (Decimal("1.5"), "payload is of type decimal.Decimal,"),
    "Enum": (_Colour.RED, f"payload is of type {__name__}._Colour,"),
    "dataclass": (_Point(1), f"payload is of type {__name__}._Point,"),
    "in a dict": (
        {"job": {"due": datetime(2026, 12, 3)}},
        "payload['job']['due'] is of type datetime.datetime",
    ),
    "in a list": ([1, (2, {3})], "payload[1][1] is of type set,"),
    "UUID key": ({"a": {uuid.UUID(int=7): 1}}, "payload['a'] has a key of type uuid.UUID,"),
}


@pytest.mark.parametrize(("payload", "error"), NOT_JSON.values(), ids=NOT_JSON)
def test_to_json_refuses_a_payload_json_has_no_type_for_instead_of_changing_it(
    payload: Any, error: str
) -> None:
    """Regression: the JSON form (a process agent's frame, the answer to a NATS client)
    wrote a datetime, a date, bytes (as base85 text), a set, a UUID, an Enum or a
    dataclass as a string, a list or an object, so that its reader got another value
    than was sent (a Decimal, a timedelta raised a TypeError naming neither the message
    nor where it sat). It raises TypeError naming the type and where it sits now, as the
    standard library's json does."""
    msg = Message(SYSTEM_ID, "bob", payload)
    with pytest.raises(TypeError, match=re.escape(error)):
        msg.to_json()
    # what JSON has a type for is written as before
    for fine in ([1, (2, 3)], {1: "a", None: 1.5}, _Level.HIGH):
        assert Message.from_json(msg.evolve(payload=fine).to_json()).payload == json.loads(
            json.dumps(fine)
        )


def test_a_payload_that_contains_itself_or_nests_too_deeply_is_a_value_error_saying_where() -> None:
    """Regression: ``check_json`` (and so every wire encoder and ``to_json``) raised
    RecursionError for a payload that contains itself, naming neither the message nor
    where; ``json.dumps`` says "Circular reference detected". A ValueError names the
    place now; one nested past the recursion limit says so. A value shared by two
    branches is no loop, and a wide shared one is not walked once per path; one nested
    100,000 levels deep is walked no deeper than the limit (the first version walked it
    all, 0.6 s of the kernel's thread per encode: a node missed its heartbeats)."""
    loop: dict[str, Any] = {"a": [1, 2]}
    loop["a"].append({"up": loop})
    with pytest.raises(
        ValueError, match=re.escape("payload['a'][2]['up'] is a dict that holds it")
    ):
        check_json(loop)
    selfish: list[Any] = []
    selfish.append(selfish)
    with pytest.raises(ValueError, match=re.escape("x[0] is a list that holds it")):
        check_json(selfish, "x")
    past = re.escape(
        f"payload is nested more than {sys.getrecursionlimit():,} levels deep, past this"
        " interpreter's recursion limit"
    )
    for levels in (3_000, 100_000):
        deep: Any = "leaf"
        for _ in range(levels):
            deep = {"d": deep}
        with pytest.raises(ValueError, match=past):
            check_json(deep)
    # every level twice: 2**1200 paths, one container each
    shared: Any = 0
    for _ in range(1_200):
        shared = [shared, shared]
    with pytest.raises(ValueError, match=past):
        check_json(shared)
    with pytest.raises(ValueError, match=re.escape("is a list that holds it")):
        Message(SYSTEM_ID, "bob", {"v": selfish}).to_json()
    same = [1]
    check_json({"a": same, "b": [same, same]})  # shared, not circular: fine


_Pair = collections.namedtuple("_Pair", "a b")


class _Text(str):
    pass


@pytest.mark.parametrize(
    "value",
    [
        *(payload for payload, _ in NOT_JSON.values()),
        object(),
        {(1, 2): 3},
        {"a": [1, {"b": {1j}}]},
        [None, True, 1, 1.5, "s", [], {}, ()],
        {1: 2, 1.5: 3, False: 4, None: 5, "k": [(1, 2)]},
        _Level.HIGH,
        {_Level.HIGH: [_Pair(1, 2)]},
        collections.OrderedDict(a=[1]),
        collections.defaultdict(list, a=[2]),
        _Text("x"),
        {_Text("k"): _Text("v")},
        float("nan"),
        2**80,
    ],
)
def test_check_json_refuses_exactly_what_the_standard_library_json_refuses(value: Any) -> None:
    def refuses(write: Any) -> bool:
        try:
            write(value)
        except TypeError:
            return True
        return False

    assert refuses(check_json) == refuses(json.dumps), value
