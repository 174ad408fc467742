from __future__ import annotations

import json
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nexus_trio import SYSTEM_ID, Message, MessageDecodeError, MessageKind, new_id

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
