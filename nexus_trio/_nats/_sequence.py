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
(a hostile or corrupt head, e.g. a huge ``first``). As TCP drops a segment outside its
receive window, such a claim on a stream kept here is not believed at all: nothing is
counted lost, the stream's expected number does not move (a forged head that moved it
would hide every later loss of the true sender, and keep back the credit of those
losses, until the stream is forgotten: the sender stalls), and the claim counts once in
``overreaches`` (the caller drops it, malformed). The window is the sender's own
``node_window`` when its membership record says it, else this node's. It is kept with
the stream, as the record said it for that stream's process (its session): a node name
joined again by a process with another window (its record then says that one) does
not change how the late numbers of the earlier process are judged. The first number
heard of a stream not kept (never seen, or evicted) starts it wherever it is: the tells
the window allows before it are counted lost, and the claim once in ``overreaches`` if
it skips more.

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
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
        # the window its sender's record gave for a stream (see the module), kept and
        # forgotten with its entry in _expected
        self._windows: dict[str, int] = {}
        #: tells counted as lost so far
        self.lost = 0
        #: numbers and batches that claimed a gap past ``window`` (see the module)
        self.overreaches = 0

    def window_of(self, stream: str, window: int | None = None) -> int | None:
        """The window ``stream`` is judged by: ``window`` (its sender's, as its record
        says for this stream's process: kept for its later numbers), else the one kept
        for it, else this node's."""
        if window is not None:
            self._windows[stream] = window
            return window
        return self._windows.get(stream, self.window)

    def _fits(self, gap: int, in_flight: int, window: int | None) -> bool:
        """Whether ``gap`` numbers skipped before ``in_flight`` more tells fit the
        sender's window (``window``, or this node's if None); one overreach if not."""
        if window is None:
            window = self.window
        if window is None or gap + in_flight <= window:
            return True
        self.overreaches += 1
        return False

    def _start(self, gap: int, in_flight: int, window: int | None) -> int:
        """A stream not kept starts at a number ``gap`` past 1: the tells before it that
        the window allows are counted lost (see the module)."""
        if self._fits(gap, in_flight, window):
            return gap
        bound = self.window if window is None else window
        assert bound is not None  # (_fits takes any gap without a window)
        return max(0, min(gap, bound - in_flight))

    def observe(
        self,
        stream: str,
        dest_prefix: int,
        number: int,
        *,
        is_mark: bool,
        window: int | None = None,
    ) -> int:
        """Take tell ``number`` (or a mark saying ``number`` was the last one sent) of
        ``stream``; return how many tells this shows were lost (also added to ``lost``).
        A number past the sender's ``window`` (see the module) is not taken: 0, and one
        overreach."""
        if dest_prefix != self.own_prefix:
            return 0
        window = self.window_of(stream, window)
        expected = self._expected.get(stream)
        # a mark's number was sent (lost with the gap), a tell's is here (in flight)
        in_flight = 0 if is_mark else 1
        if expected is None:
            lost = self._start(number - 1 + (1 if is_mark else 0), in_flight, window)
        elif number < expected:
            return 0  # a mark already covered, or a repeat: nothing new
        else:
            lost = number - expected + (1 if is_mark else 0)
            if not self._fits(lost, in_flight, window):
                return 0
        self._expected[stream] = number + 1
        self.lost += lost
        return lost

    def keeps(self, stream: str) -> bool:
        """Whether ``stream`` is kept here: its next number is judged against the last
        one taken (else it starts wherever its next number is, see the module)."""
        return stream in self._expected

    def last_numbers(self) -> dict[str, int]:
        """The last number taken (received or counted lost) of each sending process."""
        return {stream: expected - 1 for stream, expected in self._expected.items()}

    def last_number(self, stream: str) -> int:
        """The last number taken of ``stream`` (0 if none)."""
        return self._expected.get(stream, 1) - 1

    def forget(self, stream: str) -> None:
        """Let ``stream`` go: a later number of it is taken as the start of a new stream."""
        self._expected.pop(stream, None)
        self._windows.pop(stream, None)

    def observe_batch(
        self, stream: str, dest_prefix: int, first: int, count: int, window: int | None = None
    ) -> int | None:
        """Take a batch of tells numbered ``first .. first + count - 1`` of ``stream``;
        return how many earlier tells it shows were lost (also added to ``lost``), or
        None if its numbers run past the sender's ``window`` (see the module): not
        taken, one overreach, the batch to be dropped."""
        if dest_prefix != self.own_prefix:
            return 0
        window = self.window_of(stream, window)
        expected = self._expected.get(stream)
        end = first + count
        if expected is None:
            lost = self._start(first - 1, count, window)
        elif end <= expected:
            return 0  # behind the numbers taken: nothing new
        else:
            lost = max(0, first - expected)
            if not self._fits(lost, count, window):
                return None
        self._expected[stream] = end
        self.lost += lost
        return lost
