"""Statistics: per-agent counters, kernel totals and latency histograms.

Counters are plain integers bumped on the hot path (a Trio kernel runs on one thread,
so no locks are needed); :meth:`Kernel.stats` copies them into frozen snapshots, in
the manner of ``trio.MemoryChannelStatistics``.

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

import math
import operator
import sys
import uuid
from array import array
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Mapping
from functools import reduce
from itertools import accumulate
from typing import Final, final

import attrs

# Log-linear buckets: 8 per power of two (about 9% relative resolution) from 2**-30 s
# (~1 ns) to 2**12 s (~68 min). Recording is one frexp and one list increment.
_SUB: Final = 8
_EMIN: Final = -30
_EMAX: Final = 12
_SLOTS: Final = (_EMAX - _EMIN) * _SUB + 1
# A deferred sample's bucket, from the top 16 bits of its IEEE 754 double (sign, 11
# exponent bits, 4 fraction bits): for a positive normal number, ``bits >> 49`` is
# ``biased exponent * 8 + the top 3 fraction bits``, and ``frexp`` gives exponent
# ``biased - 1022`` and ``int((mantissa - 0.5) * 16)`` the same 3 fraction bits.
assert _SUB == 8, "the bit-pattern bucket takes 3 fraction bits"
_BIAS: Final = (1022 + _EMIN) * _SUB
# which 16-bit half of each double holds its top bits
_TOP_HALF: Final = 3 if sys.byteorder == "little" else 0
#: deferred samples kept before they are folded into the buckets (see Histogram.defer)
FOLD_AT: Final = 1024
#: at most this many deferred samples are folded one by one (more: in bulk)
FOLD_ONE_BY_ONE: Final = 16


def _bucket_upper(index: int) -> float:
    exponent, sub = divmod(index, _SUB)
    return math.ldexp(0.5 + (sub + 1) / (2 * _SUB), exponent + _EMIN)


#: every bucket's upper bound, computed once: a quantile is an index into it
_UPPER: Final = tuple(_bucket_upper(index) for index in range(_SLOTS))
#: the quantiles of a snapshot (p50, p90, p99, p999)
_SNAPSHOT_QS: Final = (0.5, 0.9, 0.99, 0.999)


@final
@attrs.frozen
class HistogramSnapshot:
    """Frozen view of a :class:`Histogram`; values in seconds."""

    count: int
    total: float
    maximum: float
    p50: float
    p90: float
    p99: float
    p999: float

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0


@final
class Histogram:
    """A fixed-size latency histogram with O(1) recording.

    It remembers the lowest and highest bucket used, so a snapshot scans only that
    range once for all its quantiles, and keeps its last snapshot until a sample comes
    in (``Kernel.stats()`` stays cheap: a kernel with no new sample since the last call
    copies nothing of its histograms).
    """

    __slots__ = (
        "_count",
        "_counts",
        "_hi",
        "_kept",
        "_lo",
        "_maximum",
        "_total",
        "defer",
        "unfolded",
    )

    def __init__(self) -> None:
        self._counts = [0] * _SLOTS
        self._lo = _SLOTS
        self._hi = -1
        self._count = 0
        self._total = 0.0
        self._maximum = 0.0
        #: the last snapshot, until the buckets change (a fold, a record, a merge)
        self._kept: HistogramSnapshot | None = None
        #: samples taken by :attr:`defer`, not in the buckets yet: every reader folds
        #: them first (their owner folds them when :data:`FOLD_AT` are kept)
        self.unfolded: list[float] = []
        #: record a finite sample later, at the cost of a list append (no Python frame):
        #: the kernel's latency samples. Folded in order, it gives what :meth:`record`
        #: of each would (same buckets, count, maximum and total, to the bit).
        self.defer: Callable[[float], None] = self.unfolded.append

    @property
    def count(self) -> int:
        if self.unfolded:
            self.fold()
        return self._count

    @property
    def total(self) -> float:
        if self.unfolded:
            self.fold()
        return self._total

    @property
    def maximum(self) -> float:
        if self.unfolded:
            self.fold()
        return self._maximum

    def fold(self) -> None:
        """Put the deferred samples into the buckets, in bulk (the loops in C)."""
        raw = self.unfolded
        if not raw:
            return
        self._kept = None
        if len(raw) <= FOLD_ONE_BY_ONE:
            # A few (a stats() call soon after the last): one by one, as record() adds
            # them (the bulk's arrays and Counter cost more than a few of these).
            add = self._add
            for seconds in raw:
                add(seconds)
            raw.clear()
            return
        self._count += len(raw)
        # Added one by one in order, as record() does (``sum`` could round differently).
        self._total = reduce(operator.add, raw, self._total)
        top = max(raw)
        if top > self._maximum:
            self._maximum = top
        # the top 16 bits of each sample, counted (a list of ints counts faster than the
        # memoryview it comes from)
        tops = Counter(memoryview(array("d", raw)).cast("B").cast("H")[_TOP_HALF::4].tolist())
        raw.clear()
        counts = self._counts
        lo, hi = self._lo, self._hi
        for bits, n in tops.items():
            # the sign bit set (negative, -0.0) or below the first bucket: the first one
            index = 0 if bits >= 0x8000 else min(max((bits >> 1) - _BIAS, 0), _SLOTS - 1)
            counts[index] += n
            if index < lo:
                lo = index
            if index > hi:
                hi = index
        self._lo, self._hi = lo, hi

    def record(self, seconds: float) -> None:
        if self.unfolded:
            self.fold()  # (the total is added in order)
        self._kept = None
        self._add(seconds)

    def _add(self, seconds: float) -> None:
        self._count += 1
        self._total += seconds
        if seconds > self._maximum:
            self._maximum = seconds
        if seconds <= 0.0:
            index = 0
        else:
            mantissa, exponent = math.frexp(seconds)
            index = (exponent - _EMIN) * _SUB + int((mantissa - 0.5) * 2 * _SUB)
            if index < 0:
                index = 0
            elif index >= _SLOTS:
                index = _SLOTS - 1
        self._counts[index] += 1
        if index < self._lo:
            self._lo = index
        if index > self._hi:
            self._hi = index

    def quantiles(self, qs: tuple[float, ...]) -> list[float]:
        """Upper bounds of the buckets holding each quantile of ``qs``, one scan."""
        for q in qs:
            if not 0.0 <= q <= 1.0:
                raise ValueError(f"quantile must be within [0, 1], got {q}")
        if self.unfolded:
            self.fold()
        return self._quantiles(qs)

    def _quantiles(self, qs: tuple[float, ...]) -> list[float]:
        # (the samples folded, ``qs`` checked)
        count = self._count
        if count == 0:
            return [0.0] * len(qs)
        # Running totals over the used buckets and a binary search per quantile: both in
        # C (a Python loop over a few hundred buckets was most of a stats() call).
        lo = self._lo
        running = list(accumulate(self._counts[lo : self._hi + 1]))
        last = len(running)
        maximum = self._maximum
        out: list[float] = []
        for q in qs:
            rank = math.ceil(q * count) or 1
            index = bisect_left(running, rank)
            if index < last:
                upper = _UPPER[lo + index]
                out.append(maximum if maximum < upper else upper)  # min(upper, maximum)
            else:
                out.append(maximum)
        return out

    def quantile(self, q: float) -> float:
        """Upper bound of the bucket holding the ``q`` quantile (0 if empty)."""
        return self.quantiles((q,))[0]

    def merge(self, other: Histogram) -> None:
        self.fold()
        other.fold()
        self._kept = None
        for index in range(other._lo, other._hi + 1):
            n = other._counts[index]
            if n:
                self._counts[index] += n
        self._lo = min(self._lo, other._lo)
        self._hi = max(self._hi, other._hi)
        self._count += other._count
        self._total += other._total
        self._maximum = max(self._maximum, other._maximum)

    def snapshot(self) -> HistogramSnapshot:
        """A frozen view; the same one while no sample comes in (it is immutable)."""
        if self.unfolded:
            self.fold()
        kept = self._kept
        if kept is None:
            p50, p90, p99, p999 = self._quantiles(_SNAPSHOT_QS)
            kept = self._kept = HistogramSnapshot(
                count=self._count,
                total=self._total,
                maximum=self._maximum,
                p50=p50,
                p90=p90,
                p99=p99,
                p999=p999,
            )
        return kept


#: the snapshot of a histogram with no sample
_EMPTY: Final = HistogramSnapshot(
    count=0, total=0.0, maximum=0.0, p50=0.0, p90=0.0, p99=0.0, p999=0.0
)


@final
@attrs.frozen
class AgentStats:
    """Counters of one agent (its address: they survive restarts)."""

    id: uuid.UUID
    name: str | None
    state: str
    received: int
    handled: int
    failed: int
    timed_out: int
    dead_lettered: int
    restarts: int
    mailbox_depth: int
    mailbox_high_water: int
    mailbox_capacity: int
    #: runs that failed outside a handler: ``on_start`` or ``on_stop`` raised, a
    #: background task in ``ctx.nursery`` raised (also while the run was stopping);
    #: once per run (``failed`` counts the handler calls that raised)
    run_failures: int = 0


@final
@attrs.frozen
class KernelStats:
    """Kernel totals (kept counters: O(1)) and, if asked for, one :class:`AgentStats`
    per live agent.

    Conservation: ``accepted == handled + replies_delivered + forwarded + dead_lettered + in_flight``
    (``forwarded``: handed to the transport for a remote kernel).
    ``rejected`` counts sends refused with an exception to the caller (never accepted).
    """

    agents_alive: int
    accepted: int
    handled: int
    replies_delivered: int
    failed: int
    timed_out: int
    dead_lettered: int
    dead_letters_by_reason: Mapping[str, int]
    dead_letter_stream_dropped: int
    rejected: Mapping[str, int]
    forwarded: int
    in_flight: int
    restarts: int
    #: the deepest any mailbox has been since the kernel started (its high water)
    max_mailbox_depth: int
    handle_latency: HistogramSnapshot
    queue_wait: HistogramSnapshot
    agents: tuple[AgentStats, ...] = ()
    #: children the root supervisor stopped for good after too many failures
    given_up: int = 0
    #: agent runs that failed outside a handler: ``on_start`` or ``on_stop`` raised, a
    #: background task in ``ctx.nursery`` raised (also while the run was stopping);
    #: once per run, each also a ``failed`` event (``failed`` counts handler calls)
    run_failures: int = 0
    #: lifecycle events that ``kernel.events()`` subscribers missed because their buffer
    #: was full (summed over subscribers, like ``dead_letter_stream_dropped``)
    event_stream_dropped: int = 0
    #: sends waiting for room in a full mailbox (``block``): counted in ``accepted`` and
    #: ``in_flight`` while they wait; one that never gets in (``MailboxFull`` at its
    #: deadline, or cancelled) is taken out of ``accepted`` again, so ``accepted`` can
    #: fall by these; ``accepted - sends_waiting`` never falls (the metrics counter)
    sends_waiting: int = 0
    #: dead letters that got no log line of their own: past ``[kernel]
    #: dead_letter_log_limit`` lines a second of their reason or ``log_kind_limit`` of
    #: all reasons (said in one line a second)
    dead_letter_lines_not_logged: int = 0
    #: handler failures (and handler timeouts, runs failed outside a handler) that got no
    #: log line (nor traceback) of their own: past ``[kernel] failure_log_limit`` lines a
    #: second of their agent or ``log_kind_limit`` of all agents (said in one line a
    #: second)
    failure_lines_not_logged: int = 0
    #: tells to another node of a cluster this kernel left (its transport detached with
    #: ``left``, see ``Kernel.detach_transport``): accepted and dead-lettered
    #: ``transport_unavailable`` (a cluster counts them in ``tells_after_leave`` until
    #: the kernel closes; this count stays in ``/metrics`` after the leave)
    tells_after_detach: int = 0
    #: requests to such an address, refused with ``TransportUnavailable`` (not in
    #: ``rejected``: counted here only)
    requests_after_detach: int = 0
    #: the handling time of handler calls that raised (``failed``), sampled as
    #: ``handle_latency`` is (which times the calls that returned): a failure's time is
    #: not mixed into the successes' quantiles, and is not lost either
    failed_handle_latency: HistogramSnapshot = attrs.field(factory=lambda: _EMPTY)
    #: sampled messages whose timestamp was after this kernel's clock as their handling
    #: began (their sender's clock ahead of this one: skew across nodes, or a bridge
    #: agent's); ``queue_wait`` counted their wait as 0
    timestamps_ahead: int = 0
