"""Fixed log-bucket latency histogram shared by worker telemetry and the supervisor's monitor.

Pure data structure, no threads: workers record into it on their serving thread and ship it in reports;
the supervisor merges reports and derives percentiles and Prometheus buckets. Values are microseconds.
"""

from __future__ import annotations

from bisect import bisect_left

#: Sub-buckets per octave: 4 gives bucket edges 19% apart, so a percentile is off by at most ~9%
#: after geometric interpolation.
PER_OCTAVE = 4
#: Upper bucket edges in microseconds, from 1 us to 2**27 us (134 s); one overflow bucket follows.
BOUNDS_US: tuple[float, ...] = tuple(2.0 ** (i / PER_OCTAVE) for i in range(27 * PER_OCTAVE + 1))
NBUCKETS = len(BOUNDS_US) + 1
#: Edges exported to Prometheus: one per octave from 4 us. Cumulative counts at a subset of the fine
#: edges are exact, so the coarser exposition loses resolution but never accuracy.
PROM_BOUNDS_US: tuple[float, ...] = BOUNDS_US[2 * PER_OCTAVE :: PER_OCTAVE]


class Histogram:
    """Counts per fixed bucket plus count and sum. `record` costs one bisect and three adds."""

    __slots__ = ("counts", "count", "sum_us")

    def __init__(self) -> None:
        self.counts = [0] * NBUCKETS
        self.count = 0
        self.sum_us = 0.0

    def record(self, value_us: float) -> None:
        self.counts[bisect_left(BOUNDS_US, value_us)] += 1
        self.count += 1
        self.sum_us += value_us

    def merge(self, other: Histogram) -> None:
        if not other.count:
            return
        mine = self.counts
        for i, n in enumerate(other.counts):
            if n:
                mine[i] += n
        self.count += other.count
        self.sum_us += other.sum_us

    def clear(self) -> None:
        self.counts = [0] * NBUCKETS
        self.count = 0
        self.sum_us = 0.0

    def quantile(self, q: float) -> float | None:
        """Value (us) below which a fraction `q` of the samples lie; None when empty.

        Interpolates geometrically inside the bucket, since buckets are evenly spaced in log space.
        """
        if not self.count:
            return None
        rank = q * self.count
        seen = 0
        for i, n in enumerate(self.counts):
            if not n:
                continue
            if seen + n >= rank:
                if i >= len(BOUNDS_US):
                    return BOUNDS_US[-1]  # overflow bucket: the best we can say is "at least this"
                hi = BOUNDS_US[i]
                lo = BOUNDS_US[i - 1] if i > 0 else hi / 2.0 ** (1 / PER_OCTAVE)
                frac = max(0.0, min(1.0, (rank - seen) / n))
                return lo * (hi / lo) ** frac
            seen += n
        return BOUNDS_US[-1]

    def mean(self) -> float | None:
        return self.sum_us / self.count if self.count else None

    def cumulative(self, bounds_us: tuple[float, ...] = PROM_BOUNDS_US) -> list[tuple[float, int]]:
        """(upper edge us, samples <= edge) at each of `bounds_us`, which must be fine edges."""
        out: list[tuple[float, int]] = []
        running = 0
        j = 0
        for edge in bounds_us:
            stop = bisect_left(BOUNDS_US, edge) + 1
            while j < stop:
                running += self.counts[j]
                j += 1
            out.append((edge, running))
        return out

    def to_wire(self) -> dict:
        """msgpack-friendly sparse form: only non-empty buckets, as [index, count] pairs."""
        return {"b": [[i, n] for i, n in enumerate(self.counts) if n], "n": self.count, "s": self.sum_us}

    @classmethod
    def from_wire(cls, data: dict | None) -> Histogram:
        h = cls()
        if not data:
            return h
        for i, n in data.get("b", ()):
            if 0 <= i < NBUCKETS:
                h.counts[i] += int(n)
        h.count = int(data.get("n", 0))
        h.sum_us = float(data.get("s", 0.0))
        return h
