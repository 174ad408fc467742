"""The inbound stream table (``_streams``) alone: its bound, retiring, eviction and the
exact numbers of a retired stream, without a server (the behaviour over a real
nats-server is in test_nats_datapath)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nexus_trio._nats import ClusterOptions
from nexus_trio._nats._sequence import InboundSequences
from nexus_trio._nats._streams import (
    InboundStreams,
    earlier_session,
    new_session,
    parse_stream_name,
)
from nexus_trio._throttle import Throttle

OWN = 0xABC


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _table(limit: int) -> tuple[InboundStreams, InboundSequences, list[tuple[str, int]]]:
    sequences = InboundSequences(OWN)
    forgotten: list[tuple[str, int]] = []
    table = InboundStreams(
        sequences, limit, node="b", on_forget=lambda n, p: forgotten.append((n, p))
    )
    return table, sequences, forgotten


def _take(table: InboundStreams, sequences: InboundSequences, name: str, first: int) -> int | None:
    """A one-tell batch numbered ``first`` of ``name``, as the cluster takes it (None: of
    an earlier join of its process, not kept: its number not taken)."""
    if not table.touch(name):
        return None
    return sequences.observe_batch(name, OWN, first, 1)


@settings(deadline=None)  # (an example stalled past 200 ms on a loaded machine)
@given(st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 40), st.integers(0, 9))))
def test_the_table_and_the_numbers_never_outgrow_the_limit(
    batches: list[tuple[str, int, int]],
) -> None:
    table, sequences, _ = _table(limit=5)
    for node, session, prefix in batches:
        _take(table, sequences, f"{node}:{session:x}.{prefix:x}", 1)
        assert len(table) <= 5
        assert len(sequences.last_numbers()) == len(table)


def test_a_new_session_retires_the_old_and_a_late_tell_of_it_counts_exactly() -> None:
    table, sequences, forgotten = _table(limit=10)
    for n in range(1, 4):
        assert _take(table, sequences, "a:1.7", n) == 0
    _take(table, sequences, "a:2.7", 1)  # the process joined again
    assert (table.live, table.retired) == (1, 1)
    assert _take(table, sequences, "a:1.7", 4) == 0  # late: its numbers were kept
    assert (table.live, table.retired) == (2, 0)
    assert table.heartbeat_numbers(lambda node, prefix: True) == {"a:1.7": 4, "a:2.7": 1}
    # the sweep retires the superseded join again once it is quiet
    assert table.retire_gone(lambda node, prefix: True, quiet_for=0.0) == 1
    assert table.heartbeat_numbers(lambda node, prefix: True) == {"a:2.7": 1}
    assert forgotten == []
    assert sequences.lost == 0


def test_retired_streams_go_first_uncounted_then_the_least_recently_active_is_evicted() -> None:
    table, sequences, forgotten = _table(limit=3)
    for name in ("a:1.1", "b:1.2", "c:1.3"):
        _take(table, sequences, name, 1)
    assert table.retire_gone(lambda node, prefix: node != "b", quiet_for=0.0) == 1
    _take(table, sequences, "a:1.1", 2)  # a is now the most recently active
    _take(table, sequences, "d:1.4", 1)  # room: b (retired) goes, not counted
    assert table.evicted == 0 and "b:1.2" not in table
    _take(table, sequences, "e:1.5", 1)  # room: c, the least recently active live one
    assert table.evicted == 1 and "c:1.3" not in table
    assert forgotten == [("b", 2), ("c", 3)]
    # a tell on an evicted stream starts it afresh: its earlier numbers counted lost
    assert _take(table, sequences, "c:1.3", 2) == 1
    assert table.evicted == 2


def test_a_sender_is_forgotten_only_with_its_last_stream() -> None:
    table, sequences, forgotten = _table(limit=2)
    _take(table, sequences, "a:1.7", 1)
    _take(table, sequences, "a:2.7", 1)  # same process, newer join: the old one retired
    _take(table, sequences, "b:1.8", 1)  # room: a's old join goes, a:2.7 still kept
    assert forgotten == []
    _take(table, sequences, "c:1.9", 1)  # room: a's last stream goes
    assert forgotten == [("a", 7)]


def test_only_quiet_streams_of_senders_gone_are_retired() -> None:
    clock = _Clock()
    table = InboundStreams(
        InboundSequences(OWN), 10, node="b", on_forget=lambda n, p: None, clock=clock
    )
    table.touch("a:1.7")
    table.touch("x:1.8")
    clock.now = 0.5
    table.touch("x:1.8")  # still sending
    assert table.retire_gone(lambda node, prefix: False, quiet_for=0.5) == 1
    assert (table.live, table.retired) == (1, 1)
    assert table.consumed("a:1.7", 3) is not None  # a retired stream is still credited
    assert table.consumed("zz:1.1", 3) is None  # one not kept is not resurrected


def test_stream_names_and_the_limit_are_checked() -> None:
    assert parse_stream_name("node-1:ff.a0") == ("node-1", 0xFF, 0xA0)
    assert parse_stream_name("old.a0") is None
    assert parse_stream_name("n:zz.a0") is None
    with pytest.raises(ValueError, match="inbound_streams_limit"):
        ClusterOptions(inbound_streams_limit=0)


def test_a_throttle_is_due_at_once_then_once_per_interval() -> None:
    now = [1000.0]
    throttle = Throttle(1.0, clock=lambda: now[0])
    seen = []
    for step in range(25):  # 0.0 .. 2.4 s in steps of 0.1 s
        now[0] = 1000.0 + step / 10
        seen.append(throttle.due())
    assert [step for step, due in enumerate(seen) if due] == [0, 10, 20]


def test_a_late_tell_of_a_forgotten_earlier_join_does_not_retire_the_current_one() -> None:
    """Regression: a stream of an earlier join of a process, forgotten here (retired,
    then dropped for room), came back with a late tell as that process's newest and
    retired its current stream. A session of a join before a kept one is refused by the
    table (the cluster delivers its tell without taking its number): nothing kept or
    retired."""
    first, second = new_session(), new_session()
    assert earlier_session(first, second) and not earlier_session(second, first)
    old, current = f"a:{first:x}.7", f"a:{second:x}.7"
    table, sequences, _ = _table(limit=2)
    assert _take(table, sequences, old, 1) == 0
    assert _take(table, sequences, current, 1) == 0  # the process joined again
    assert _take(table, sequences, "c:1.9", 1) == 0  # room: the retired old one goes
    assert old not in table and (table.live, table.retired) == (2, 0)
    assert table.touch(old) is False
    assert old not in table and (table.live, table.retired) == (2, 0)
    assert table.heartbeat_numbers(lambda node, prefix: True) == {current: 1, "c:1.9": 1}
    assert not sequences.keeps(old)
    # the current join's tells go on, its numbers exact
    assert _take(table, sequences, current, 2) == 0


def test_sessions_of_one_process_are_ordered_and_others_are_not_comparable() -> None:
    sessions = [new_session() for _ in range(5)]
    assert all(earlier_session(a, b) for a, b in itertools.pairwise(sessions))
    assert not any(earlier_session(s, s) for s in sessions)
    # a random session (another process, a kernel of an earlier version): as before,
    # the stream heard last is the newest
    random_session = sessions[0] ^ (0x5A5A << 40)
    assert not earlier_session(random_session, sessions[-1])
    assert not earlier_session(sessions[0], random_session)
    table, sequences, _ = _table(limit=10)
    _take(table, sequences, f"a:{sessions[-1]:x}.7", 1)
    assert table.touch(f"a:{random_session:x}.7") is True
    assert (table.live, table.retired) == (1, 1)
