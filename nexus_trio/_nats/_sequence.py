"""Counting tells that NATS lost on the way: sequence numbers per pair of processes.

Core NATS is at most once: a server failover (or a subscriber that the server cuts off
as a slow consumer) loses messages and tells nobody. So every tell from one kernel
process to another carries the next number of that pair's stream, and every heartbeat
the sender publishes a *mark* (the last number it gave out) on the same connection.
NATS keeps the order of one connection's messages, so the receiver knows: a number
past the next expected one means those between will never come, and a mark past the
last number received means the tail of a burst was lost. Tells between two kernels
travel in node batches (``_batch``): a batch carries the numbers of its tells as a
range (first, count), so one NATS message lost is all its tells counted. Each lost tell is counted
once, on the receiving node. What the NATS client refuses outright never gets a
number (the sender counts it), so nothing is counted twice.
"""

from __future__ import annotations

from typing import final


@final
class InboundSequences:
    """The receiving side: the next expected number of each sending process."""

    def __init__(self, own_prefix: int) -> None:
        #: this process's id prefix: numbers meant for another process of the same node
        #: name (an earlier run) are not ours to judge
        self.own_prefix = own_prefix
        # One entry per sending process heard from, kept until the stream table
        # (``_streams``) lets it go: a tell still in flight from a process that left
        # must not look like the start of a new stream.
        self._expected: dict[str, int] = {}
        #: tells counted as lost so far
        self.lost = 0

    def observe(self, stream: str, dest_prefix: int, number: int, *, is_mark: bool) -> int:
        """Take tell ``number`` (or a mark saying ``number`` was the last one sent) of
        ``stream``; return how many tells this shows were lost (also added to ``lost``)."""
        if dest_prefix != self.own_prefix:
            return 0
        expected = self._expected.get(stream, 1)
        if number < expected:
            return 0  # a mark already covered, or a repeat: nothing new
        lost = number - expected + (1 if is_mark else 0)
        self._expected[stream] = number + 1
        self.lost += lost
        return lost

    def last_numbers(self) -> dict[str, int]:
        """The last number taken (received or counted lost) of each sending process."""
        return {stream: expected - 1 for stream, expected in self._expected.items()}

    def last_number(self, stream: str) -> int:
        """The last number taken of ``stream`` (0 if none)."""
        return self._expected.get(stream, 1) - 1

    def forget(self, stream: str) -> None:
        """Let ``stream`` go: a later number of it is taken as the start of a new stream."""
        self._expected.pop(stream, None)

    def observe_batch(self, stream: str, dest_prefix: int, first: int, count: int) -> int:
        """Take a batch of tells numbered ``first .. first + count - 1`` of ``stream``;
        return how many earlier tells it shows were lost (also added to ``lost``)."""
        if dest_prefix != self.own_prefix:
            return 0
        expected = self._expected.get(stream, 1)
        end = first + count
        if end <= expected:
            return 0  # a repeat: nothing new
        lost = max(0, first - expected)
        self._expected[stream] = end
        self.lost += lost
        return lost
