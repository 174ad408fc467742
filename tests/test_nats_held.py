"""``HeldLines``: what a node's throttled warnings held back since their last line, said
at its leave (a clock the test moves; the NATS tests of the floods are in
test_nats_hostile.py)."""

from __future__ import annotations

import logging

import pytest

from nexus_trio._nats._held import HeldLines
from nexus_trio._throttle import Throttle


def test_what_a_throttle_held_back_after_its_last_line_is_said_once_by_kind(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    throttle = Throttle(1.0, clock=lambda: now[0])  # shared by two kinds, as _loss_log is
    held = HeldLines()
    caplog.set_level(logging.INFO, logger="nexus_trio.nats")
    assert held.due(throttle, "tells lost in transit", 3, counted="lost_in_transit")
    assert not held.due(throttle, "tells lost in transit", 5, counted="lost_in_transit")
    assert not held.due(throttle, "malformed batches dropped", level=logging.INFO)
    assert not held.due(throttle, "tells lost in transit", 2, counted="lost_in_transit")
    assert held.held("tells lost in transit") == 7
    now[0] = 1.0
    # a line of a kind says its count so far: nothing of that kind is held any more
    assert held.due(throttle, "tells lost in transit", 1, counted="lost_in_transit")
    assert held.held("tells lost in transit") == 0
    assert not held.due(throttle, "tells lost in transit", 4_000, counted="lost_in_transit")
    assert held.held("malformed batches dropped") == 1
    held.say("a")
    said = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert said == [
        (
            logging.INFO,
            "node a: 1 more malformed batches dropped after the last line logged about them,"
            " not logged (at most a line a second)",
        ),
        (
            logging.WARNING,
            "node a: 4,000 more tells lost in transit after the last line logged about them,"
            " not logged (at most a line a second; counted in lost_in_transit)",
        ),
    ]
    caplog.clear()
    held.say("a")  # said once
    assert caplog.records == []
    assert held.held("tells lost in transit") == 0
