"""A binary tell's payload against hostile values: what goes on the wire is what the
standard library's ``json.dumps`` writes, or the payload is refused as before the
read-back (check_json's error), whatever the payload's classes claim about equality."""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import json
import uuid
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nexus_trio import Message
from nexus_trio._message import check_json
from nexus_trio._nats import _wire as wire

from .hang_guard import SLOW_DRAWS


def _standard(payload: Any) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def _old_path(payload: Any) -> tuple[str, Any]:
    """What a tell's payload became before the read-back: refused by check_json (its
    error), or the standard library's JSON (the same values)."""
    try:
        check_json(payload)
        return "ok", repr(json.loads(_standard(payload)))
    except (TypeError, ValueError) as exc:
        return "error", (type(exc), str(exc))


def _sent(payload: Any) -> tuple[str, Any]:
    msg = Message(sender=uuid.UUID(int=1), to="sink", payload=payload)
    try:
        body = wire.encode_tell(msg)
    except (TypeError, ValueError) as exc:
        return "error", (type(exc), str(exc))
    return "ok", repr(wire.decode_tell(body).payload)


class _EqualsAnything:
    def __eq__(self, other: object) -> bool:
        return True

    def __hash__(self) -> int:
        return 0


@dataclasses.dataclass(eq=False)
class _Point(_EqualsAnything):
    x: int = 1


class _Id(_EqualsAnything, uuid.UUID):
    pass


class _Tags(_EqualsAnything, set[int]):
    pass


class _When(_EqualsAnything, datetime.date):
    pass


class _Amount(_EqualsAnything, decimal.Decimal):
    pass


class _Color(enum.Enum):
    """An Enum equal to its value (a common idiom): json.dumps refuses it."""

    RED = "red"

    def __eq__(self, other: object) -> bool:
        return bool(self.value == other or other is self)

    def __hash__(self) -> int:
        return hash(self.value)


class _Items(dict[str, int]):
    """What json.dumps writes of a dict subclass is what its items() give."""

    def items(self) -> Any:
        return [("x", 9)]


class _Iter(list[int]):
    """What json.dumps writes of a list subclass is what iterating it gives."""

    def __iter__(self) -> Any:
        return iter([7])


LIARS: dict[str, Any] = {
    "a dataclass equal to anything": _Point(),
    "a UUID equal to anything": _Id(int=5),
    "a set equal to anything": _Tags([1]),
    "a date equal to anything": _When(2020, 1, 2),
    "a Decimal equal to anything": _Amount("1.5"),
    "an Enum equal to its value": _Color.RED,
}


@pytest.mark.parametrize("value", LIARS.values(), ids=LIARS)
def test_a_value_json_has_no_type_for_is_refused_even_if_it_equals_what_msgspec_wrote(
    value: Any,
) -> None:
    """msgspec writes each of these (an object, a string, a list), and reading that back
    gives a value the payload's own __eq__ calls equal: the read-back let it through,
    where check_json (and json.dumps) refuse it. It is refused again, with check_json's
    error naming the type and where it sits."""
    name = type(value).__qualname__
    for payload, where in (([0, value], "payload[1]"), ({"k": value}, "payload['k']")):
        kind, got = _sent(payload)
        assert kind == "error", got
        assert got[0] is TypeError
        assert got[1].startswith(f"{where} is of type {__name__}.{name}, which JSON has no type")
        assert _old_path(payload) == (kind, got)


@pytest.mark.parametrize(
    "payload",
    [[_Items(a=1)], {"k": _Items(a=1)}, [_Iter([1, 2])], {"k": [0, _Iter([1, 2])]}],
    ids=["dict subclass in a list", "dict subclass in a dict", "list subclass", "nested"],
)
def test_a_dict_or_list_subclass_goes_as_json_dumps_writes_it(payload: Any) -> None:
    """json.dumps writes a dict subclass through its items() and a list subclass through
    its iterator; msgspec reads their storage. The payload carries json.dumps's values."""
    kind, got = _sent(payload)
    assert (kind, got) == ("ok", repr(json.loads(_standard(payload))))


class _Int(int):
    def __eq__(self, other: object) -> bool:
        return True

    def __hash__(self) -> int:
        return 1


class _Str(str):
    def __hash__(self) -> int:
        return 7


class _Float(float):
    def __repr__(self) -> str:
        return "999.0"


class _Level(enum.IntEnum):
    LOW = 1


leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**63 - 2, max_value=2**70)
    | st.floats()
    | st.sampled_from([0.0, -0.0, 1e16, float("nan")])
    | st.text(st.characters(exclude_categories=()), max_size=3)
    | st.builds(_Int, st.integers(-3, 3))
    | st.builds(_Str, st.text(max_size=2))
    | st.builds(_Float, st.floats(allow_nan=False))
    | st.just(_Level.LOW)
    | st.sampled_from(list(LIARS.values()))
)
keys = (
    st.text(max_size=3)
    | st.integers(-2, 2)
    | st.booleans()
    | st.none()
    | st.builds(_Str, st.text(max_size=2))
)
hostile = st.recursive(
    leaves,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.lists(inner, max_size=3).map(tuple)
        | st.dictionaries(keys, inner, max_size=3)
        | st.dictionaries(st.text(max_size=2), st.integers(), max_size=2).map(_Items)
    ),
    max_leaves=10,
)


@SLOW_DRAWS
@given(payload=st.lists(hostile, max_size=3) | st.dictionaries(keys, hostile, max_size=3))
def test_a_hostile_dict_or_list_payload_goes_as_before_the_read_back(payload: Any) -> None:
    """Property: each dict or list payload, with booleans and ints (True == 1), -0.0,
    NaN, ints past 64 bits, lone surrogates, subclasses of int, str and float with odd
    __eq__, __hash__ or __repr__, str-subclass keys and values that equal anything,
    arrives as the standard library's JSON reads (repr: True is not 1, -0.0 is not 0.0),
    or is refused with the error the checked way raised."""
    try:
        _standard(payload)
    except UnicodeEncodeError:  # a lone surrogate: no encoder here writes it
        with pytest.raises(UnicodeEncodeError):
            wire.encode_tell(Message(sender=uuid.UUID(int=1), to="sink", payload=payload))
        return
    except (TypeError, ValueError):
        pass
    assert _sent(payload) == _old_path(payload)
