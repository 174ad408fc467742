"""The latency histogram: one scan gives every quantile (what keeps stats() cheap)."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from nexus_trio._stats import Histogram


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(min_value=1e-9, max_value=1e3), min_size=1, max_size=300))
def test_one_scan_quantiles_match_the_bucket_of_each_ranked_value(values: list[float]) -> None:
    histogram = Histogram()
    for value in values:
        histogram.record(value)
    qs = (0.5, 0.9, 0.99, 0.999)
    got = histogram.quantiles(qs)
    assert got == sorted(got)
    for q, value in zip(qs, got, strict=True):
        rank = max(1, math.ceil(q * len(values)))
        ranked = sorted(values)[rank - 1]
        # Within one bucket (at most 12.5% wide) above the ranked value, never above the max.
        assert ranked <= value * (1 + 1e-12) or value == histogram.maximum
        assert value <= max(ranked * 1.125 * (1 + 1e-9), ranked + 1e-12)
        assert value <= histogram.maximum
    snap = histogram.snapshot()
    assert (snap.p50, snap.p90, snap.p99, snap.p999) == tuple(got)
    assert snap.count == len(values)


def test_an_empty_histogram_reports_zeros_and_merging_keeps_counts() -> None:
    empty = Histogram()
    assert empty.quantiles((0.5, 0.99)) == [0.0, 0.0]
    a, b = Histogram(), Histogram()
    for v in (0.001, 0.002):
        a.record(v)
    b.record(1.0)
    a.merge(b)
    assert a.count == 3 and a.maximum == 1.0
    assert a.quantile(1.0) == 1.0
    assert a.quantile(0.1) < 0.0025
