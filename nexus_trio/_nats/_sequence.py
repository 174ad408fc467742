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

A gap is believed only as far as the sender's credit window allows: a sender never has
more than ``window`` tells the receiver has not taken, so a number (or a batch's last
number) more than ``window`` past the last one taken was never given by a true sender
(a hostile or corrupt head, e.g. a huge ``first``). Of such a claim, the tells the window
allows are counted lost, and the claim once in ``overreaches`` (the caller counts it
malformed): it no longer inflates ``lost`` by up to 2**64, nor the credit returned for it.
The window is this node's own ``node_window``: the nodes of a cluster are meant to share
it (a sender with a larger one that loses more than this node's window at once has the
rest of that gap counted as one overreach, not as lost tells).
"""

from __future__ import annotations

from typing import final


@final
class InboundSequences:
    """The receiving side: the next expected number of each sending process."""

    def __init__(self, own_prefix: int, window: int | None = None) -> None:
        #: this process's id prefix: numbers meant for another process of the same node
        #: name (an earlier run) are not ours to judge
        self.own_prefix = own_prefix
        # One entry per sending process heard from, kept until the stream table
        # (``_streams``) lets it go: a tell still in flight from a process that left
        # must not look like the start of a new stream.
        self._expected: dict[str, int] = {}
        #: the most tells a sender may have that this node has not taken (None: no bound)
        self.window = window
        #: tells counted as lost so far
        self.lost = 0
        #: numbers and batches that claimed a gap past ``window`` (see the module)
        self.overreaches = 0

    def _believed(self, gap: int, in_flight: int) -> int:
        """Of ``gap`` numbers skipped before ``in_flight`` more tells, those the window
        allows (all of them without a window); one overreach if that is fewer."""
        window = self.window
        if window is None or gap + in_flight <= window:
            return gap
        self.overreaches += 1
        return max(0, min(gap, window - in_flight))

    def observe(self, stream: str, dest_prefix: int, number: int, *, is_mark: bool) -> int:
        """Take tell ``number`` (or a mark saying ``number`` was the last one sent) of
        ``stream``; return how many tells this shows were lost (also added to ``lost``)."""
        if dest_prefix != self.own_prefix:
            return 0
        expected = self._expected.get(stream, 1)
        if number < expected:
            return 0  # a mark already covered, or a repeat: nothing new
        # a mark's number was sent (lost with the gap), a tell's is here (in flight)
        lost = self._believed(number - expected + (1 if is_mark else 0), 0 if is_mark else 1)
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
        lost = self._believed(max(0, first - expected), count)
        self._expected[stream] = end
        self.lost += lost
        return lost
