"""The shared log-bucket histogram: percentiles, merging, wire round trip and Prometheus buckets."""

from __future__ import annotations

import random

import msgpack
import pytest

from orchestrator.common.histogram import BOUNDS_US, PROM_BOUNDS_US, Histogram


def _lognormal(n: int, seed: int = 1) -> list[float]:
    rng = random.Random(seed)
    return [rng.lognormvariate(5.0, 1.2) for _ in range(n)]  # median ~150 us, long tail


def _exact(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def test_empty_histogram_has_no_percentiles() -> None:
    h = Histogram()
    assert h.quantile(0.5) is None
    assert h.mean() is None


@pytest.mark.parametrize("q", [0.5, 0.9, 0.99])
def test_percentiles_within_bucket_resolution(q: float) -> None:
    values = _lognormal(20000)
    h = Histogram()
    for v in values:
        h.record(v)
    est, exact = h.quantile(q), _exact(values, q)
    assert abs(est - exact) / exact < 0.10, (q, est, exact)


def test_merge_equals_recording_everything_in_one() -> None:
    values = _lognormal(5000)
    a, b, whole = Histogram(), Histogram(), Histogram()
    for i, v in enumerate(values):
        (a if i % 3 else b).record(v)
        whole.record(v)
    a.merge(b)
    assert a.counts == whole.counts
    assert a.count == whole.count == len(values)
    assert a.sum_us == pytest.approx(whole.sum_us)


def test_wire_round_trip_through_msgpack() -> None:
    h = Histogram()
    for v in (0.5, 3.0, 250.0, 250.0, 1e9):  # below the first edge and above the last one too
        h.record(v)
    data = msgpack.unpackb(msgpack.packb(h.to_wire()))  # strict map keys: the form must not need int keys
    back = Histogram.from_wire(data)
    assert back.counts == h.counts and back.count == 5 and back.sum_us == pytest.approx(h.sum_us)
    assert back.quantile(1.0) == BOUNDS_US[-1]  # the overflow bucket reports its lower edge


def test_cumulative_counts_match_le_semantics() -> None:
    values = _lognormal(3000) + [16.0, 32.0]  # values exactly on an edge count as <= that edge
    h = Histogram()
    for v in values:
        h.record(v)
    cum = h.cumulative()
    assert [edge for edge, _ in cum] == list(PROM_BOUNDS_US)
    for edge, n in cum:
        assert n == sum(1 for v in values if v <= edge), edge
    assert all(a[1] <= b[1] for a, b in zip(cum, cum[1:], strict=False))
